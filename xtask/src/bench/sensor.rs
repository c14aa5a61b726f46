//! `cargo xtask bench sensor`: what the gateway sensor's eBPF programs cost the gateway.
//!
//! A TCP server (this binary, `bench sensor-server`) runs in a fresh cgroup v2 child and plays the
//! gateway on a loopback port; the load generator (this process) stays outside the cgroup, like the
//! gateway's clients. Every scenario is measured with the programs loaded but NOT attached ("off")
//! and attached exactly as hearth attaches them ("on": `hearth_ingress`/`hearth_egress` on the cgroup
//! with `CgroupAttachMode::Single`, `hearth_sock_state` on `sock/inet_sock_set_state`, the server's
//! port as the only gateway port, and a reader like hearth's poller), in ABBA order. During the
//! attached phases `kernel.bpf_stats_enabled` is 1, so the kernel accounts each program's run time and
//! run count.
//!
//! Cleanup on every path, errors and SIGINT/SIGTERM included: the programs are detached when
//! `kernel::Sensor` drops, the server is stopped when its `Proc` drops, then the cgroup is removed
//! (`kernel::BenchCgroup`), and the sysctl is restored after every attached phase
//! (`kernel::StatsSysctl`). The guards are declared in that order so they drop in reverse.

mod kernel;
mod net;
mod paired;
mod report;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
use sha2::{Digest, Sha256};

use super::procs::{self, Proc};
use super::stats::{self, CpuSnapshot, Machine};
use kernel::{ProgStat, ReaderTotals};

pub const BEGIN: &str = "<!-- bench-sensor:begin -->";
pub const END: &str = "<!-- bench-sensor:end -->";
/// The same with `--control` (the control object's results have their own section).
pub const CONTROL_BEGIN: &str = "<!-- bench-sensor-control:begin -->";
pub const CONTROL_END: &str = "<!-- bench-sensor-control:end -->";

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScenarioKind {
    /// One connection, the client streams to the server as fast as it can (MB/s)
    Bulk,
    /// Small request/response pairs over keep-alive connections (requests/s, latency)
    Rr,
    /// A fresh connection per request/response, closed by the server (connections/s, latency)
    Connect,
}

#[derive(clap::Args, Debug, Clone)]
pub struct SensorArgs {
    /// Seconds per measured phase (one phase = one configuration, one scenario). Rates vary more
    /// between phases than within one, so more rounds help more than longer phases
    #[arg(long, default_value_t = 1.5)]
    pub phase_secs: f64,
    /// Off/on phase pairs per scenario, interleaved ABBA to cancel drift (even is balanced)
    #[arg(long, default_value_t = 8)]
    pub rounds: u32,
    /// Scenarios to run
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "bulk,rr,connect"
    )]
    pub scenarios: Vec<ScenarioKind>,
    /// Keep-alive connections of the request/response scenario (one scenario per value)
    #[arg(long, value_delimiter = ',', default_value = "1,4")]
    pub rr_connections: Vec<usize>,
    /// Request size in bytes (rr and connect)
    #[arg(long, default_value_t = 128)]
    pub request_bytes: u32,
    /// Response size in bytes (rr and connect)
    #[arg(long, default_value_t = 512)]
    pub response_bytes: u32,
    /// Size of each write of the bulk client, in KiB
    #[arg(long, default_value_t = 256)]
    pub bulk_write_kib: usize,
    /// Attach without kernel.bpf_stats_enabled: no per-program run time, but no stats cost either
    #[arg(long)]
    pub no_bpf_stats: bool,
    /// Attach without the reader that mimics hearth's poller (FLOWS every second, EVENTS drained)
    #[arg(long)]
    pub no_reader: bool,
    /// Measure the throughput loss side by side instead: two servers in two cgroups take the same
    /// load at the same time, the programs attached to one of them (alternating), so both see the
    /// same moments of the machine. No BPF stats; writes its own section of the results file
    #[arg(long)]
    pub paired: bool,
    /// With --paired: pin each client thread and each server to CPUs of its own (A and B on
    /// different ones), so that the scheduler cannot move them between rounds
    #[arg(long, requires = "paired")]
    pub pin: bool,
    /// eBPF object [default: target/ebpf/hearth-ebpf.o]
    #[arg(long)]
    pub object: Option<PathBuf>,
    /// Measure the control object instead (`cargo xtask build-ebpf --control`: the same programs,
    /// but the cgroup_skb ones only return 1): what the kernel's cgroup hook costs by itself. Writes
    /// its own sections of the results file
    #[arg(long)]
    pub control: bool,
    /// Do not run `cargo xtask build-ebpf` first
    #[arg(long)]
    pub no_build: bool,
    #[command(flatten)]
    pub results: super::ResultsFile,
    /// Run the load generator as it was built (by default a debug build re-runs itself with --release)
    #[arg(long)]
    pub no_reexec: bool,
}

#[derive(clap::Args, Debug, Clone)]
pub struct ServerArgs {
    /// Loopback port to listen on
    #[arg(long)]
    pub port: u16,
    /// The cgroup v2 path (as /proc/self/cgroup shows it) to wait for before listening
    #[arg(long)]
    pub cgroup: String,
}

/// One scenario as it is run: what, and with how many connections.
#[derive(Clone, Copy, Debug)]
pub struct Scenario {
    pub kind: ScenarioKind,
    pub conns: usize,
}

impl Scenario {
    pub fn label(&self) -> String {
        match self.kind {
            ScenarioKind::Bulk => "bulk".to_string(),
            ScenarioKind::Rr => format!("request/response, {} conn.", self.conns),
            ScenarioKind::Connect => "connect/request/close".to_string(),
        }
    }

    /// The unit the rate counts.
    pub fn unit(&self) -> &'static str {
        match self.kind {
            ScenarioKind::Bulk => "MB",
            ScenarioKind::Rr => "request",
            ScenarioKind::Connect => "connection",
        }
    }

    /// How many units `amount` (bytes, requests or connections) is.
    pub fn units(&self, amount: u64) -> f64 {
        match self.kind {
            ScenarioKind::Bulk => amount as f64 / 1e6,
            _ => amount as f64,
        }
    }
}

/// All measured phases of one configuration in one scenario, merged.
#[derive(Default)]
pub struct Agg {
    /// Bytes (bulk), requests (rr) or connections (connect).
    pub amount: u64,
    pub elapsed: Duration,
    /// Units per second of each phase, in the order they ran.
    pub phase_rates: Vec<f64>,
    pub latencies_ns: Vec<u32>,
    /// CPU time of the bench's own processes (client and server, all threads, with the kernel work
    /// done in their context) during the phases.
    pub own_cpu_s: f64,
    /// That, per unit, of each phase (µs).
    pub phase_cpu_per_unit: Vec<f64>,
    /// Busy CPU time of the usable CPUs (/proc/stat) during the phases.
    pub busy_cpu_s: f64,
    /// Of that, what processes other than the bench's own (this one and the server) used: noise.
    pub foreign_cpu_s: f64,
    /// CPU time the hypervisor gave to others while this machine wanted it (/proc/stat steal): noise.
    pub steal_s: f64,
    /// Programs' run time and count during the phases (attached phases with stats only).
    pub progs: [ProgStat; 3],
    pub reader: ReaderTotals,
}

impl Agg {
    fn add(&mut self, p: &Phase) {
        self.amount += p.load.amount;
        self.elapsed += p.load.elapsed;
        self.phase_rates.push(p.rate);
        self.latencies_ns.extend_from_slice(&p.load.latencies_ns);
        self.own_cpu_s += p.own_cpu_s;
        self.phase_cpu_per_unit.push(p.cpu_per_unit_us);
        self.busy_cpu_s += p.busy_cpu_s;
        self.foreign_cpu_s += p.foreign_cpu_s;
        self.steal_s += p.steal_s;
        for (a, b) in self.progs.iter_mut().zip(&p.progs) {
            a.run_ns += b.run_ns;
            a.runs += b.runs;
        }
        self.reader.add(&p.reader);
    }
}

pub struct ScenarioResult {
    pub scenario: Scenario,
    pub off: Agg,
    pub on: Agg,
}

pub struct Results {
    pub command: String,
    pub machine: Machine,
    pub background_busy: Option<f64>,
    pub load_start: String,
    pub load_end: String,
    pub object: PathBuf,
    pub object_bytes: usize,
    pub object_sha256: String,
    pub port: u16,
    pub cgroup: PathBuf,
    pub args: SensorArgs,
    pub stats_sysctl_before: String,
    /// Code size of each program as loaded.
    pub program_sizes: Vec<String>,
    pub scenarios: Vec<ScenarioResult>,
    pub notes: Vec<String>,
    pub wall: Duration,
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: nix::libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// SIGINT, SIGTERM or SIGHUP arrived: phases end early and the bench fails, cleaning up as it returns.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::Relaxed)
}

fn install_signal_handlers() -> Result<()> {
    let action = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::empty(),
        SigSet::empty(),
    );
    for sig in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { sigaction(sig, &action) }
            .with_context(|| format!("installing a {sig} handler"))?;
    }
    Ok(())
}

pub fn run(args: &SensorArgs) -> Result<()> {
    if !(args.phase_secs > 0.0 && args.phase_secs <= 60.0) {
        bail!("--phase-secs must be in (0, 60]");
    }
    if args.rounds == 0 {
        bail!("--rounds must be at least 1");
    }
    if args.scenarios.is_empty() {
        bail!("--scenarios: name at least one of bulk, rr, connect");
    }
    if args.rr_connections.is_empty() || args.rr_connections.iter().any(|&c| c == 0 || c > 64) {
        bail!("--rr-connections values must be in 1..=64");
    }
    if args.request_bytes == 0 || args.response_bytes == 0 || args.bulk_write_kib == 0 {
        bail!("--request-bytes, --response-bytes and --bulk-write-kib must be positive");
    }
    let root = super::repo_root()?;
    if super::should_reexec(args.no_reexec) {
        // The load generator and the server share the CPUs: they must be optimized builds.
        return super::reexec_release(&root);
    }
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "`cargo xtask bench sensor` needs root: it loads and attaches BPF programs, creates a cgroup \
             and sets kernel.bpf_stats_enabled (run it as root)"
        );
    }
    if args.control && args.object.is_some() {
        bail!("--control measures the control object: not together with --object");
    }
    if !args.no_build {
        if args.control {
            crate::ebpf::build_control(&root).context(
                "building the control object (`cargo xtask build-ebpf --control`; --no-build uses it as it is)",
            )?;
        } else {
            crate::ebpf::build(&root).context(
                "building the eBPF object (`cargo xtask build-ebpf`; --no-build uses the object as it is)",
            )?;
        }
    }
    let object_path = args.object.clone().unwrap_or_else(|| {
        root.join(if args.control {
            crate::ebpf::CONTROL_OBJECT
        } else {
            crate::ebpf::OBJECT
        })
    });
    let object = std::fs::read(&object_path).map_err(|e| {
        anyhow::anyhow!(
            "no eBPF object at {} ({e}): build it with `cargo xtask build-ebpf` (or pass --object)",
            object_path.display()
        )
    })?;
    if object.len() < 4 || object[..4] != *b"\x7fELF" {
        bail!(
            "{} is not an ELF object ({} bytes): build it with `cargo xtask build-ebpf`",
            object_path.display(),
            object.len()
        );
    }
    let mount = kernel::cgroup2_mount()?;
    if !Path::new(kernel::STATS_SYSCTL).exists() {
        bail!(
            "{} is missing: this kernel cannot account BPF run time (needs Linux 5.1 or later)",
            kernel::STATS_SYSCTL
        );
    }
    install_signal_handlers()?;

    let work = root.join("target/hearth-bench-sensor");
    if work.exists() {
        std::fs::remove_dir_all(&work).with_context(|| format!("clearing {}", work.display()))?;
    }
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;

    let setup = Setup {
        root: &root,
        mount: &mount,
        object_path: &object_path,
        object: &object,
        work: &work,
    };
    let md = if args.paired {
        paired::run(args, &setup)?
    } else {
        report::markdown(&measure(args, &setup)?)
    };
    // Each mode, and its control, has a section of its own.
    let (begin, end) = match (args.paired, args.control) {
        (true, false) => (paired::BEGIN, paired::END),
        (true, true) => (paired::CONTROL_BEGIN, paired::CONTROL_END),
        (false, false) => (BEGIN, END),
        (false, true) => (CONTROL_BEGIN, CONTROL_END),
    };
    println!("{md}");
    if args.results.no_write {
        eprintln!("bench sensor: results file not written (--no-write)");
    } else {
        let output = args.results.path(&root);
        super::report::write_section(&output, begin, end, &md)?;
        eprintln!("bench sensor: wrote {}", output.display());
    }
    eprintln!("bench sensor: server log in {}", work.display());
    Ok(())
}

/// What one phase measured.
struct Phase {
    load: net::Load,
    rate: f64,
    own_cpu_s: f64,
    cpu_per_unit_us: f64,
    busy_cpu_s: f64,
    foreign_cpu_s: f64,
    steal_s: f64,
    progs: [ProgStat; 3],
    reader: ReaderTotals,
}

/// Everything a phase needs.
struct Bench<'a> {
    args: &'a SensorArgs,
    addr: SocketAddr,
    sensor: kernel::Sensor,
    /// The maps the reader uses; moved into it for each attached phase and back.
    maps: Option<kernel::Maps>,
    server: &'a mut Proc,
}

impl Bench<'_> {
    fn phase(&mut self, sc: Scenario, on: bool, dur: Duration) -> Result<Phase> {
        // Declared first, dropped last: the sysctl goes back to its value after the programs are
        // detached (below) or, on an error, after the reader has stopped.
        let stats_guard = if on && !self.args.no_bpf_stats {
            Some(kernel::StatsSysctl::enable()?)
        } else {
            None
        };
        let mut reader = None;
        if on {
            self.sensor.attach()?;
            if !self.args.no_reader {
                let maps = self.maps.take().context("the maps are with a reader")?;
                reader = Some(kernel::Reader::start(maps)?);
            }
        }
        let p0 = if stats_guard.is_some() {
            Some(self.sensor.stats()?)
        } else {
            None
        };
        let ours = [std::process::id(), self.server.pid()];
        let own_cpu = || -> f64 {
            ours.iter()
                .filter_map(|&pid| procs::cpu_seconds(pid).ok())
                .sum()
        };
        let own0 = own_cpu();
        let steal0 = steal_seconds();
        let cpu0 = CpuSnapshot::take();
        let load = match sc.kind {
            ScenarioKind::Bulk => net::bulk(self.addr, dur, self.args.bulk_write_kib * 1024),
            ScenarioKind::Rr => net::rr(
                self.addr,
                sc.conns,
                self.args.request_bytes,
                self.args.response_bytes,
                dur,
            ),
            ScenarioKind::Connect => net::connect(
                self.addr,
                self.args.request_bytes,
                self.args.response_bytes,
                dur,
            ),
        };
        let cpu1 = CpuSnapshot::take();
        let own1 = own_cpu();
        let steal1 = steal_seconds();
        let p1 = if stats_guard.is_some() {
            Some(self.sensor.stats()?)
        } else {
            None
        };
        let mut reader_totals = ReaderTotals::default();
        if let Some(r) = reader {
            let (maps, totals) = r.stop()?;
            self.maps = Some(maps);
            reader_totals = totals;
        }
        if on {
            self.sensor.detach()?;
        }
        drop(stats_guard);
        if let Some(st) = self.server.exited() {
            bail!(
                "the server exited ({st}) during {}; last output:\n{}",
                sc.label(),
                self.server.log_tail(20)
            );
        }
        let load = load.with_context(|| {
            format!(
                "{} with the programs {}",
                sc.label(),
                if on { "attached" } else { "not attached" }
            )
        })?;
        if interrupted() {
            bail!("interrupted; detached the programs, stopped the server, removed the cgroup");
        }
        let mut progs = [ProgStat::default(); 3];
        if let (Some(a), Some(b)) = (p0, p1) {
            for (i, p) in progs.iter_mut().enumerate() {
                p.runs = b[i].runs.saturating_sub(a[i].runs);
                p.run_ns = b[i].run_ns.saturating_sub(a[i].run_ns);
            }
            // The cgroup programs must have seen the server's packets, else the bench measures nothing.
            if progs[0].runs == 0 || progs[1].runs == 0 {
                bail!(
                    "the programs were attached but did not run ({} ingress, {} egress runs) during {}: \
                     is the server in the cgroup?",
                    progs[0].runs,
                    progs[1].runs,
                    sc.label()
                );
            }
        }
        let busy_cpu_s = match (cpu0, cpu1) {
            (Some(a), Some(b)) => b.busy_seconds_since(&a),
            _ => 0.0,
        };
        let own_cpu_s = (own1 - own0).max(0.0);
        let foreign_cpu_s = (busy_cpu_s - own_cpu_s).max(0.0);
        let units = sc.units(load.amount);
        let cpu_per_unit_us = if units > 0.0 {
            own_cpu_s * 1e6 / units
        } else {
            0.0
        };
        let rate = sc.units(load.amount) / load.elapsed.as_secs_f64().max(1e-9);
        Ok(Phase {
            load,
            rate,
            own_cpu_s,
            cpu_per_unit_us,
            busy_cpu_s,
            foreign_cpu_s,
            steal_s: (steal1 - steal0).max(0.0),
            progs,
            reader: reader_totals,
        })
    }
}

/// Steal time of all CPUs so far (/proc/stat, USER_HZ = 100), in seconds.
fn steal_seconds() -> f64 {
    std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|t| {
            t.lines()
                .next()
                .and_then(|l| l.strip_prefix("cpu "))
                .and_then(|rest| rest.split_whitespace().nth(7))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .map(|ticks| ticks as f64 / 100.0)
        .unwrap_or(0.0)
}

fn config_name(on: bool) -> &'static str {
    if on {
        "on"
    } else {
        "off"
    }
}

/// What both modes run with: the repository, the cgroup2 mount, the object and the work directory.
pub struct Setup<'a> {
    pub root: &'a Path,
    pub mount: &'a Path,
    pub object_path: &'a Path,
    pub object: &'a [u8],
    pub work: &'a Path,
}

impl<'a> Setup<'a> {
    /// (root, mount, object path, object, work directory).
    pub fn parts(&self) -> (&'a Path, &'a Path, &'a Path, &'a [u8], &'a Path) {
        (
            self.root,
            self.mount,
            self.object_path,
            self.object,
            self.work,
        )
    }
}

fn measure(args: &SensorArgs, setup: &Setup<'_>) -> Result<Results> {
    let (root, mount, object_path, object, work) = setup.parts();
    let wall = Instant::now();
    let mut notes = Vec::new();
    let machine = Machine::collect(root, None);
    let load_start = stats::loadavg();
    let background_busy = match CpuSnapshot::take() {
        Some(a) => {
            std::thread::sleep(Duration::from_secs(1));
            CpuSnapshot::take().map(|b| b.busy_share_since(&a))
        }
        None => None,
    };
    if let Some(n) = kernel::ensure_tracefs()? {
        notes.push(n);
    }
    notes.extend(kernel::remove_stale_cgroups(mount));
    let stats_sysctl_before = kernel::StatsSysctl::current()?;
    if stats_sysctl_before != "0" && !args.no_bpf_stats {
        notes.push(format!(
            "kernel.bpf_stats_enabled was already {stats_sysctl_before} before the bench: the stats also \
             ran during the phases without the programs"
        ));
    }
    // Guards in the order they must go, last first: the cgroup (removed when empty), the server (stopped
    // before the cgroup is removed), the programs (detached when `bench.sensor` drops).
    let (cgroup, mut server, addr) = start_server(mount, work, "")?;
    let port = addr.port();
    let (sensor, maps) = kernel::Sensor::load(object, port, cgroup.path())?;
    eprintln!(
        "bench sensor: server pid {} on {addr} in {}; programs loaded (not attached)",
        server.pid(),
        cgroup.path().display()
    );
    let program_sizes = sensor.sizes();
    let mut bench = Bench {
        args,
        addr,
        sensor,
        maps: Some(maps),
        server: &mut server,
    };

    let mut scenarios = Vec::new();
    for sc in scenarios_of(args) {
        let phase = Duration::from_secs_f64(args.phase_secs);
        let warmup = Duration::from_secs_f64((args.phase_secs / 4.0).min(0.5));
        for on in [false, true] {
            bench.phase(sc, on, warmup)?;
        }
        let mut res = ScenarioResult {
            scenario: sc,
            off: Agg::default(),
            on: Agg::default(),
        };
        for round in 0..args.rounds {
            let order = if round % 2 == 0 {
                [false, true]
            } else {
                [true, false]
            };
            for on in order {
                let p = bench.phase(sc, on, phase)?;
                eprintln!(
                    "bench sensor: {} round {}/{} {:>3}: {:10.1} {}/s{}",
                    sc.label(),
                    round + 1,
                    args.rounds,
                    config_name(on),
                    p.rate,
                    sc.unit(),
                    if on && p.progs[0].runs > 0 {
                        format!(
                            ", ingress {:.0} ns x {}, egress {:.0} ns x {}, tracepoint {} runs",
                            p.progs[0].ns_per_run(),
                            p.progs[0].runs,
                            p.progs[1].ns_per_run(),
                            p.progs[1].runs,
                            p.progs[2].runs
                        )
                    } else {
                        String::new()
                    }
                );
                if on {
                    res.on.add(&p);
                } else {
                    res.off.add(&p);
                }
            }
        }
        scenarios.push(res);
    }
    if bench.maps.is_none() {
        notes.push("the reader did not hand the maps back".to_string());
    }
    drop(bench); // detaches everything and unloads the programs
    let stopped = server.stop(Duration::from_secs(5))?;
    if stopped.killed {
        notes.push("the server needed SIGKILL".to_string());
    }
    let cgroup_path = cgroup.path().to_path_buf();
    drop(cgroup);

    let sha = Sha256::digest(object);
    let object_sha256: String = sha.iter().take(6).map(|b| format!("{b:02x}")).collect();
    Ok(Results {
        command: super::invocation(),
        machine,
        background_busy,
        load_start,
        load_end: stats::loadavg(),
        object: object_path
            .strip_prefix(root)
            .unwrap_or(object_path)
            .to_path_buf(),
        object_bytes: object.len(),
        object_sha256,
        port,
        cgroup: cgroup_path,
        args: args.clone(),
        stats_sysctl_before,
        program_sizes,
        scenarios,
        notes,
        wall: wall.elapsed(),
    })
}

/// A fresh cgroup (`tag` tells two of one run apart) and the server in it, listening on a free
/// loopback port.
fn start_server(
    mount: &Path,
    work: &Path,
    tag: &str,
) -> Result<(kernel::BenchCgroup, Proc, SocketAddr)> {
    let cgroup = kernel::BenchCgroup::create_tagged(mount, tag)?;
    let port = procs::free_port()?;
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let exe = std::env::current_exe().context("the path of this executable")?;
    let argv = vec![
        exe.display().to_string(),
        "bench".to_string(),
        "sensor-server".to_string(),
        "--port".to_string(),
        port.to_string(),
        "--cgroup".to_string(),
        cgroup.v2_path().to_string(),
    ];
    let (name, log) = if tag.is_empty() {
        ("sensor server".to_string(), work.join("server.log"))
    } else {
        (
            format!("sensor server {tag}"),
            work.join(format!("server-{tag}.log")),
        )
    };
    let mut server = Proc::spawn(&name, &argv, &[], &log)?;
    cgroup.add(server.pid())?;
    net::wait_listening(addr, &mut server, Duration::from_secs(10))?;
    Ok((cgroup, server, addr))
}

/// The scenarios to run, in order: bulk, then request/response per connection count, then connect.
fn scenarios_of(args: &SensorArgs) -> Vec<Scenario> {
    let mut out = Vec::new();
    for kind in [ScenarioKind::Bulk, ScenarioKind::Rr, ScenarioKind::Connect] {
        if !args.scenarios.contains(&kind) {
            continue;
        }
        match kind {
            ScenarioKind::Rr => out.extend(
                args.rr_connections
                    .iter()
                    .map(|&conns| Scenario { kind, conns }),
            ),
            _ => out.push(Scenario { kind, conns: 1 }),
        }
    }
    out
}

/// `bench sensor-server`: waits until the bench has moved it into its cgroup, then listens (so that the
/// listening socket, and the connections it accepts, belong to that cgroup) and serves until killed.
pub fn serve(args: &ServerArgs) -> Result<()> {
    net::serve(args.port, &args.cgroup)
}
