//! The kernel side of the sensor benchmark: the cgroup, the programs (loaded and attached as hearth's
//! `sensor::kernel::Kernel::load` does), the BPF run-time statistics and a reader like hearth's poller.

use std::fs;
use std::io;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use aya::maps::{MapData, RingBuf};
use aya::programs::{
    cgroup_skb::CgroupSkbLinkId, trace_point::TracePointLinkId, CgroupAttachMode, CgroupSkb,
    CgroupSkbAttachType, TracePoint,
};
use aya::{Ebpf, EbpfLoader};
use hearth_common::user::{size_flows, FlowMaps, LostEvents};
use hearth_common::{names, FlowEvent, FlowKey, EVENT_OPEN, MAX_PORTS};
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::time::{clock_gettime, ClockId};

pub const STATS_SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";

/// The programs in the order the results list them.
pub const PROGRAMS: [&str; 3] = [names::INGRESS, names::EGRESS, names::SOCK_STATE];

/// Name prefix of the benchmark's cgroup under the cgroup2 mount.
const CGROUP_PREFIX: &str = "hearth-bench-sensor-";

/// The cgroup2 mount point (/sys/fs/cgroup on pure v2, /sys/fs/cgroup/unified on hybrid hosts).
pub fn cgroup2_mount() -> Result<PathBuf> {
    let info =
        fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    info.lines()
        .find_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            if post.split_whitespace().next() != Some("cgroup2") {
                return None;
            }
            pre.split_whitespace().nth(4).map(PathBuf::from)
        })
        .context("no cgroup2 hierarchy is mounted (/proc/self/mountinfo): the programs attach to a cgroup v2 directory")
}

/// Tracepoints need tracefs; mounts it at /sys/kernel/tracing when missing (as hearth does). Returns a
/// note when it mounted it.
pub fn ensure_tracefs() -> Result<Option<String>> {
    if Path::new("/sys/kernel/tracing/events").is_dir()
        || Path::new("/sys/kernel/debug/tracing/events").is_dir()
    {
        return Ok(None);
    }
    let status = std::process::Command::new("mount")
        .args(["-t", "tracefs", "nodev", "/sys/kernel/tracing"])
        .status()
        .context("running mount -t tracefs")?;
    if !status.success() {
        bail!("tracefs is not mounted and `mount -t tracefs nodev /sys/kernel/tracing` failed ({status})");
    }
    Ok(Some(
        "mounted tracefs at /sys/kernel/tracing (it stays mounted, as hearth leaves it)"
            .to_string(),
    ))
}

/// Removes empty cgroups an earlier run left behind when it was killed (SIGKILL skips the cleanup).
pub fn remove_stale_cgroups(mount: &Path) -> Vec<String> {
    let mut notes = Vec::new();
    let Ok(dir) = fs::read_dir(mount) else {
        return notes;
    };
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with(CGROUP_PREFIX) {
            continue;
        }
        let path = e.path();
        match fs::remove_dir(&path) {
            Ok(()) => notes.push(format!(
                "removed {} left behind by an earlier run",
                path.display()
            )),
            Err(err) => notes.push(format!(
                "{} is left from an earlier run and could not be removed: {err}",
                path.display()
            )),
        }
    }
    notes
}

/// A child cgroup of the cgroup2 root for the server, removed on drop.
pub struct BenchCgroup {
    path: PathBuf,
    v2_path: String,
}

impl BenchCgroup {
    /// `<prefix><pid>` plus `-<tag>` when `tag` is not empty (two cgroups of one run).
    pub fn create_tagged(mount: &Path, tag: &str) -> Result<BenchCgroup> {
        let mut name = format!("{CGROUP_PREFIX}{}", std::process::id());
        if !tag.is_empty() {
            name = format!("{name}-{tag}");
        }
        let path = mount.join(&name);
        fs::create_dir(&path).with_context(|| format!("creating the cgroup {}", path.display()))?;
        Ok(BenchCgroup {
            path,
            v2_path: format!("/{name}"),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The path as /proc/<pid>/cgroup shows it ("0::/hearth-bench-sensor-N").
    pub fn v2_path(&self) -> &str {
        &self.v2_path
    }

    pub fn add(&self, pid: u32) -> Result<()> {
        fs::write(self.path.join("cgroup.procs"), pid.to_string())
            .with_context(|| format!("moving pid {pid} into {}", self.path.display()))
    }
}

impl Drop for BenchCgroup {
    fn drop(&mut self) {
        // The server has been stopped (its Proc drops first); retry while the kernel finishes with it.
        for _ in 0..100 {
            if fs::remove_dir(&self.path).is_ok() || !self.path.exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let left = fs::read_to_string(self.path.join("cgroup.procs")).unwrap_or_default();
        eprintln!(
            "bench sensor: could not remove {} (processes still in it: {:?})",
            self.path.display(),
            left.split_whitespace().collect::<Vec<_>>()
        );
    }
}

/// `kernel.bpf_stats_enabled` = 1 while it lives; the previous value is written back on drop.
pub struct StatsSysctl {
    previous: String,
}

impl StatsSysctl {
    pub fn current() -> Result<String> {
        Ok(fs::read_to_string(STATS_SYSCTL)
            .with_context(|| format!("reading {STATS_SYSCTL}"))?
            .trim()
            .to_string())
    }

    pub fn enable() -> Result<StatsSysctl> {
        let previous = Self::current()?;
        fs::write(STATS_SYSCTL, "1").with_context(|| format!("writing 1 to {STATS_SYSCTL}"))?;
        Ok(StatsSysctl { previous })
    }
}

impl Drop for StatsSysctl {
    fn drop(&mut self) {
        if let Err(e) = fs::write(STATS_SYSCTL, &self.previous) {
            eprintln!(
                "bench sensor: could not restore {STATS_SYSCTL} to {}: {e}",
                self.previous
            );
        }
    }
}

/// Accumulated run time and run count of one program (kernel BPF stats).
#[derive(Clone, Copy, Debug, Default)]
pub struct ProgStat {
    pub run_ns: u64,
    pub runs: u64,
}

impl ProgStat {
    pub fn ns_per_run(&self) -> f64 {
        if self.runs == 0 {
            0.0
        } else {
            self.run_ns as f64 / self.runs as f64
        }
    }
}

/// The maps hearth's poller reads.
pub struct Maps {
    flows: FlowMaps,
    events: RingBuf<MapData>,
    lost: LostEvents,
}

/// The object loaded (every program verified and in the kernel), attached only between `attach` and
/// `detach`. Dropping it detaches whatever is attached and unloads the programs.
pub struct Sensor {
    ebpf: Ebpf,
    cgroup_dir: fs::File,
    cgroup: PathBuf,
    ingress: Option<CgroupSkbLinkId>,
    egress: Option<CgroupSkbLinkId>,
    tracepoint: Option<TracePointLinkId>,
}

fn skb<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut CgroupSkb> {
    ebpf.program_mut(name)
        .with_context(|| format!("no program {name} in the object"))?
        .try_into()
        .map_err(|e| anyhow!("{name} is not a cgroup_skb program: {e}"))
}

fn tracepoint(ebpf: &mut Ebpf) -> Result<&mut TracePoint> {
    ebpf.program_mut(names::SOCK_STATE)
        .with_context(|| format!("no program {} in the object", names::SOCK_STATE))?
        .try_into()
        .map_err(|e| anyhow!("{} is not a tracepoint program: {e}", names::SOCK_STATE))
}

impl Sensor {
    /// Loads the object with `port` as the only gateway port, as hearth does (`Kernel::load`).
    pub fn load(object: &[u8], port: u16, cgroup: &Path) -> Result<(Sensor, Maps)> {
        let mut ports = [0u16; MAX_PORTS];
        ports[0] = port;
        let n_ports: u32 = 1;
        let mut loader = EbpfLoader::new();
        loader
            .override_global(names::GATEWAY_PORTS, &ports, true)
            .override_global(names::N_PORTS, &n_ports, true);
        size_flows(&mut loader)?;
        let mut ebpf = loader.load(object).context("loading the eBPF object")?;
        for name in [names::INGRESS, names::EGRESS] {
            skb(&mut ebpf, name)?
                .load()
                .with_context(|| format!("loading {name}"))?;
        }
        tracepoint(&mut ebpf)?
            .load()
            .with_context(|| format!("loading {}", names::SOCK_STATE))?;
        let flows = FlowMaps::take(&mut ebpf)?;
        let lost = LostEvents::take(&mut ebpf)?;
        let events = RingBuf::try_from(
            ebpf.take_map(names::EVENTS)
                .with_context(|| format!("no map {} in the object", names::EVENTS))?,
        )
        .context("EVENTS is not a ring buffer")?;
        let cgroup_dir = fs::File::open(cgroup)
            .with_context(|| format!("opening the cgroup {}", cgroup.display()))?;
        Ok((
            Sensor {
                ebpf,
                cgroup_dir,
                cgroup: cgroup.to_path_buf(),
                ingress: None,
                egress: None,
                tracepoint: None,
            },
            Maps {
                flows,
                events,
                lost,
            },
        ))
    }

    /// Attaches the three programs as hearth does.
    pub fn attach(&mut self) -> Result<()> {
        let cg = self.cgroup.display().to_string();
        if self.ingress.is_none() {
            let id = skb(&mut self.ebpf, names::INGRESS)?
                .attach(
                    self.cgroup_dir.as_fd(),
                    CgroupSkbAttachType::Ingress,
                    CgroupAttachMode::Single,
                )
                .with_context(|| format!("attaching {} to {cg}", names::INGRESS))?;
            self.ingress = Some(id);
        }
        if self.egress.is_none() {
            let id = skb(&mut self.ebpf, names::EGRESS)?
                .attach(
                    self.cgroup_dir.as_fd(),
                    CgroupSkbAttachType::Egress,
                    CgroupAttachMode::Single,
                )
                .with_context(|| format!("attaching {} to {cg}", names::EGRESS))?;
            self.egress = Some(id);
        }
        if self.tracepoint.is_none() {
            let id = tracepoint(&mut self.ebpf)?
                .attach("sock", "inet_sock_set_state")
                .with_context(|| {
                    format!(
                        "attaching {} to sock/inet_sock_set_state",
                        names::SOCK_STATE
                    )
                })?;
            self.tracepoint = Some(id);
        }
        Ok(())
    }

    pub fn detach(&mut self) -> Result<()> {
        if let Some(id) = self.ingress.take() {
            skb(&mut self.ebpf, names::INGRESS)?
                .detach(id)
                .with_context(|| format!("detaching {}", names::INGRESS))?;
        }
        if let Some(id) = self.egress.take() {
            skb(&mut self.ebpf, names::EGRESS)?
                .detach(id)
                .with_context(|| format!("detaching {}", names::EGRESS))?;
        }
        if let Some(id) = self.tracepoint.take() {
            tracepoint(&mut self.ebpf)?
                .detach(id)
                .with_context(|| format!("detaching {}", names::SOCK_STATE))?;
        }
        Ok(())
    }

    /// "NAME: N bytes of JIT code, M instructions verified" for each program.
    pub fn sizes(&self) -> Vec<String> {
        PROGRAMS
            .iter()
            .map(|name| match self.ebpf.program(name).map(|p| p.info()) {
                Some(Ok(info)) => format!(
                    "`{name}` {} bytes of JIT code{}",
                    info.size_jitted(),
                    info.verified_instruction_count()
                        .map(|n| format!(", {n} instructions verified"))
                        .unwrap_or_default()
                ),
                Some(Err(e)) => format!("`{name}` (no info: {e})"),
                None => format!("`{name}` (not in the object)"),
            })
            .collect()
    }

    /// Run time and count of each program so far (in `PROGRAMS` order); they only grow while
    /// `kernel.bpf_stats_enabled` is 1.
    pub fn stats(&self) -> Result<[ProgStat; 3]> {
        let mut out = [ProgStat::default(); 3];
        for (o, name) in out.iter_mut().zip(PROGRAMS) {
            let info = self
                .ebpf
                .program(name)
                .with_context(|| format!("no program {name}"))?
                .info()
                .with_context(|| format!("program info of {name}"))?;
            *o = ProgStat {
                run_ns: u64::try_from(info.run_time().as_nanos()).unwrap_or(u64::MAX),
                runs: info.run_count(),
            };
        }
        Ok(out)
    }
}

/// What the reader did during one or more phases.
#[derive(Clone, Copy, Debug, Default)]
pub struct ReaderTotals {
    /// Wall time the reader ran.
    pub wall: Duration,
    /// The reader thread's CPU time.
    pub cpu: Duration,
    /// Ring buffer records drained.
    pub events: u64,
    /// Readings of the whole FLOWS map.
    pub flow_reads: u64,
    /// The reader thread's CPU time spent in those readings.
    pub flows_cpu: Duration,
    /// Entries in FLOWS at the last reading.
    pub flow_entries: u64,
    /// Of those, left after the closed flows were deleted.
    pub flow_entries_left: u64,
    /// Times the ring buffer woke the reader between readings.
    pub wakeups: u64,
    /// Events the programs could not queue (`EVENTS_LOST` at the end).
    pub lost: u64,
}

impl ReaderTotals {
    pub fn add(&mut self, o: &ReaderTotals) {
        self.wall += o.wall;
        self.cpu += o.cpu;
        self.events += o.events;
        self.flow_reads += o.flow_reads;
        self.flows_cpu += o.flows_cpu;
        if o.flow_reads > 0 {
            self.flow_entries = o.flow_entries;
            self.flow_entries_left = o.flow_entries_left;
        }
        self.wakeups += o.wakeups;
        self.lost = self.lost.max(o.lost);
    }
}

/// Does what hearth's poller (`sensor::kernel::Kernel::run`) does to the maps: once a second drains
/// EVENTS, reads every entry of FLOWS and deletes the flows whose close event it read; between
/// readings it drains EVENTS whenever the ring buffer signals data (the programs submit without a
/// wake-up, so that is rare). (hearth then turns them into observations for its tracker and also
/// deletes flows idle for 10 minutes; that part is not reproduced.) Stops and joins on drop.
pub struct Reader {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<Result<(Maps, ReaderTotals)>>>,
}

impl Reader {
    pub fn start(maps: Maps) -> Result<Reader> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::Builder::new()
            .name("sensor-reader".into())
            .spawn(move || read_loop(maps, &flag))
            .context("starting the reader thread")?;
        Ok(Reader {
            stop,
            handle: Some(handle),
        })
    }

    pub fn stop(mut self) -> Result<(Maps, ReaderTotals)> {
        self.stop.store(true, Ordering::SeqCst);
        match self.handle.take().map(|h| h.join()) {
            Some(Ok(r)) => r,
            Some(Err(_)) => bail!("the reader thread panicked"),
            None => bail!("the reader was already stopped"),
        }
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// CPU time of the calling thread.
fn thread_cpu() -> Duration {
    clock_gettime(ClockId::CLOCK_THREAD_CPUTIME_ID)
        .map(|t| {
            Duration::new(
                u64::try_from(t.tv_sec()).unwrap_or(0),
                u32::try_from(t.tv_nsec()).unwrap_or(0),
            )
        })
        .unwrap_or_default()
}

fn read_loop(mut maps: Maps, stop: &AtomicBool) -> Result<(Maps, ReaderTotals)> {
    let start = Instant::now();
    let cpu0 = thread_cpu();
    let mut t = ReaderTotals::default();
    let mut closed = std::collections::HashSet::new();
    // hearth's interval ticks at once, then every `poll_interval` (1 s by default).
    let mut next_read = Instant::now();
    let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).context("epoll_create")?;
    epoll
        .add(
            maps.events.as_fd(),
            EpollEvent::new(EpollFlags::EPOLLIN | EpollFlags::EPOLLET, 0),
        )
        .context("epoll_ctl(ADD) of the EVENTS ring buffer")?;
    // Events left from an earlier phase make epoll report the ring ready once at registration:
    // not a wake-up (the first reading below drains them).
    let _ = epoll.wait(&mut [EpollEvent::empty()], EpollTimeout::ZERO);
    while !stop.load(Ordering::SeqCst) {
        let now = Instant::now();
        if now >= next_read {
            drain(&mut maps.events, &mut t, &mut closed);
            let c0 = thread_cpu();
            let mut n = 0u64;
            // The same reading as hearth's, and the same deletion of closed flows.
            let reading = maps.flows.read();
            n += reading.flows.len() as u64;
            let mut deleted = 0u64;
            for cookie in reading.cookies_of(&closed) {
                maps.flows.remove(cookie);
                deleted += 1;
            }
            closed.clear();
            std::hint::black_box(&reading);
            t.flow_reads += 1;
            t.flow_entries = n;
            t.flow_entries_left = n - deleted;
            t.flows_cpu += thread_cpu().saturating_sub(c0);
            next_read += Duration::from_secs(1);
        }
        // Wake when the kernel wakes the ring buffer's waiters (as hearth's AsyncFd does: epoll,
        // edge-triggered; the programs wake them only once a burst filled a quarter of the ring),
        // or in time for the next reading, or within 50 ms to see the stop flag.
        let wait = next_read
            .saturating_duration_since(Instant::now())
            .min(Duration::from_millis(50));
        let ms = u16::try_from(wait.as_millis()).unwrap_or(50);
        let ready = {
            let mut ev = [EpollEvent::empty()];
            match epoll.wait(&mut ev, EpollTimeout::from(ms)) {
                Ok(n) => n > 0,
                Err(nix::errno::Errno::EINTR) => false,
                Err(e) => {
                    return Err(io::Error::from(e)).context("epoll_wait on the EVENTS ring buffer")
                }
            }
        };
        if ready {
            t.wakeups += 1;
            drain(&mut maps.events, &mut t, &mut closed);
        }
    }
    t.lost = maps.lost.total()?;
    t.wall = start.elapsed();
    t.cpu = thread_cpu().saturating_sub(cpu0);
    Ok((maps, t))
}

/// Takes every record out of EVENTS, keeping the keys of closed connections.
fn drain(
    events: &mut RingBuf<MapData>,
    t: &mut ReaderTotals,
    closed: &mut std::collections::HashSet<FlowKey>,
) {
    while let Some(item) = events.next() {
        t.events += 1;
        if let Some(ev) = FlowEvent::from_record(&item) {
            if ev.kind != EVENT_OPEN {
                closed.insert(ev.key);
            }
        }
    }
}
