//! `cargo xtask bench`: what hearth costs on top of calling llama-server directly.
//!
//! Measures added latency (p50/p90/p99), throughput, cold-start overhead and hearth's idle RSS, prints a
//! table and rewrites the results section of docs/benchmarks.md. Every process it starts is stopped again,
//! error paths included (see `procs::Proc` and `procs::Reaper`). Only loopback addresses are used.
//!
//! `cargo xtask bench sensor` (`sensor.rs`) measures the gateway sensor's eBPF programs instead,
//! `cargo xtask bench warm-tiers` (`warm.rs`) a model's start from disk against one from the page cache.

mod client;
mod procs;
mod report;
mod sensor;
mod stats;
mod warm;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use hyper::{Method, Uri};

use client::{call, chat_body, get_json, new_client, run_phase, timed_chat, Errors, HttpClient};
use procs::{Proc, Reaper};
use stats::{CpuSnapshot, Machine};

/// Set in the environment of the release build that a debug build re-runs.
const REEXEC_ENV: &str = "HEARTH_BENCH_REEXEC";

/// How long hearth is left without requests before its idle RSS is read.
const IDLE_SETTLE: Duration = Duration::from_millis(2500);

/// Model id used in the generated hearth configuration.
const MODEL_ID: &str = "bench-tiny";

#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// Another benchmark instead of the default one (hearth against llama-server)
    #[command(subcommand)]
    pub cmd: Option<BenchCmd>,
    /// GGUF model to serve [default: <dev dir>/models/gen-tiny.gguf]
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Seconds per measured phase (one phase = one path, one scenario)
    #[arg(long, default_value_t = 2.0)]
    pub phase_secs: f64,
    /// Direct/hearth phase pairs per scenario, interleaved ABBA to cancel drift (even is balanced)
    #[arg(long, default_value_t = 10)]
    pub rounds: u32,
    /// Closed-loop concurrency levels
    #[arg(long, value_delimiter = ',', default_value = "1,32")]
    pub concurrency: Vec<usize>,
    /// max_tokens of every request (keep it tiny so the proxy's cost is visible)
    #[arg(long, default_value_t = 2)]
    pub max_tokens: u32,
    /// Cold starts to measure (direct and through hearth, alternating)
    #[arg(long, default_value_t = 5)]
    pub cold_runs: u32,
    /// llama-server threads (`-t`) for the runtime and the direct server
    #[arg(long, default_value_t = 2)]
    pub threads: u32,
    /// hearth's `server.worker_threads` (1 = its default, a one-thread runtime)
    #[arg(long, default_value_t = 1)]
    pub worker_threads: u32,
    /// Do not run `cargo build --release -p hearth` first
    #[arg(long)]
    pub no_build: bool,
    /// hearth binary [default: target/release/hearth]
    #[arg(long)]
    pub hearth_bin: Option<PathBuf>,
    /// llama-server binary [default: <dev dir>/bin/llama-server]
    #[arg(long)]
    pub llama_server: Option<PathBuf>,
    /// RUST_LOG for hearth (the documented default is info)
    #[arg(long, default_value = "info")]
    pub hearth_log: String,
    /// Measure llama-server alone (harness self-test; never writes the results file)
    #[arg(long)]
    pub direct_only: bool,
    #[command(flatten)]
    pub results: ResultsFile,
    /// Run the load generator as it was built (by default a debug build re-runs itself with --release)
    #[arg(long)]
    pub no_reexec: bool,
    /// The hearth path's streamed requests also send `Connection: close`, as the direct path's must
    /// (llama-server closes the connection after every streamed response): a like-for-like client
    /// instead of one that keeps its connection to hearth alive, as the openai SDK does
    #[arg(long)]
    pub hearth_stream_close: bool,
    /// Extra llama-server argument for the model (repeatable; appended to the configuration's `args`,
    /// and so also used by the direct server), e.g. --runtime-arg=--log-disable
    #[arg(long = "runtime-arg", allow_hyphen_values = true)]
    pub runtime_args: Vec<String>,
}

/// Where a benchmark writes its results (every benchmark has these flags).
#[derive(clap::Args, Debug, Clone)]
pub struct ResultsFile {
    /// Print the results but do not rewrite the results file
    #[arg(long)]
    pub no_write: bool,
    /// Results file [default: docs/benchmarks.md]
    #[arg(long)]
    pub output: Option<PathBuf>,
}

impl ResultsFile {
    /// `--output`, else docs/benchmarks.md under the repository root.
    pub fn path(&self, root: &Path) -> PathBuf {
        self.output
            .clone()
            .unwrap_or_else(|| root.join("docs/benchmarks.md"))
    }
}

#[derive(clap::Subcommand, Debug, Clone)]
pub enum BenchCmd {
    /// What the gateway sensor's eBPF programs cost: loopback bulk throughput, request/response and
    /// connection rates through the gateway port with and without the programs attached, and the
    /// programs' own run time (BPF stats). Needs root and the eBPF object; rewrites its own section of
    /// docs/benchmarks.md
    Sensor(sensor::SensorArgs),
    /// The sensor benchmark's server (started by `bench sensor` inside its cgroup)
    #[command(hide = true)]
    SensorServer(sensor::ServerArgs),
    /// A llama.cpp model's start from disk against one from the page cache after `prewarm`, on a
    /// generated ~1.5 GB model; rewrites its own section of docs/benchmarks.md
    WarmTiers(warm::WarmArgs),
}

struct Paths {
    root: PathBuf,
    model: PathBuf,
    llama_server: PathBuf,
    hearth_bin: PathBuf,
    work: PathBuf,
    output: PathBuf,
}

impl Paths {
    fn resolve(args: &BenchArgs) -> Result<Paths> {
        let root = repo_root()?;
        let dev = match std::env::var_os("HEARTH_DEV_DIR") {
            Some(d) => PathBuf::from(d),
            None => root.join(".hearth-dev"),
        };
        let model = args
            .model
            .clone()
            .unwrap_or_else(|| dev.join("models/gen-tiny.gguf"));
        let llama_server = args
            .llama_server
            .clone()
            .unwrap_or_else(|| dev.join("bin/llama-server"));
        for (what, p) in [("model", &model), ("llama-server", &llama_server)] {
            if !p.exists() {
                bail!(
                    "{what} {} does not exist: run `cargo xtask setup` first (or pass --{})",
                    p.display(),
                    if what == "model" {
                        "model"
                    } else {
                        "llama-server"
                    }
                );
            }
        }
        let model = model
            .canonicalize()
            .with_context(|| format!("resolving {}", model.display()))?;
        let llama_server = std::path::absolute(&llama_server)
            .with_context(|| format!("resolving {}", llama_server.display()))?;
        let hearth_bin = args
            .hearth_bin
            .clone()
            .unwrap_or_else(|| root.join("target/release/hearth"));
        let output = args.results.path(&root);
        Ok(Paths {
            work: root.join("target/hearth-bench"),
            root,
            model,
            llama_server,
            hearth_bin,
            output,
        })
    }
}

/// The repository root: from cargo's environment when run through cargo, else the current directory
/// when it is the repository, else where xtask was compiled.
fn repo_root() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("CARGO_MANIFEST_DIR") {
        if let Some(root) = Path::new(&dir).parent() {
            if root.join("xtask/Cargo.toml").is_file() {
                return Ok(root.to_path_buf());
            }
        }
    }
    let cwd = std::env::current_dir().context("current directory")?;
    if cwd.join("xtask/Cargo.toml").is_file() {
        return Ok(cwd);
    }
    Ok(Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("xtask has no parent directory")?
        .to_path_buf())
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Route {
    Direct,
    Hearth,
}

impl Route {
    /// Whether this path's streamed requests use a fresh connection each. llama-server closes the
    /// connection after every streamed response although it announces keep-alive, so a pooled client
    /// races that close and fails ("connection closed before message completed"): the direct path
    /// must. hearth keeps its clients' connections open, so by default its path keeps them alive.
    fn closes_streams(self, args: &BenchArgs) -> bool {
        match self {
            Route::Direct => true,
            Route::Hearth => args.hearth_stream_close,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Route::Direct => "direct",
            Route::Hearth => "hearth",
        }
    }
}

/// All phases of one path in one scenario, merged.
#[derive(Default)]
pub(crate) struct Agg {
    pub samples: Vec<client::Sample>,
    pub errors: Errors,
    pub elapsed: Duration,
    pub phase_rps: Vec<f64>,
    /// hearth's own CPU time during these phases (hearth path only).
    pub hearth_cpu_s: f64,
    /// The load generator's (this process's) CPU time during these phases.
    pub client_cpu_s: f64,
    /// The serving llama-server's CPU time during these phases (the direct server, or hearth's runtime).
    pub server_cpu_s: f64,
    /// Busy share of the usable CPUs, time-weighted over the phases.
    pub busy_weighted: f64,
    /// CPU time that processes other than the bench's own used on the usable CPUs during the phases.
    pub foreign_cpu_s: f64,
}

impl Agg {
    pub fn rps(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            self.samples.len() as f64 / secs
        } else {
            0.0
        }
    }

    /// Average number of CPUs other processes kept busy during these phases (noise).
    pub fn foreign_cpus(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            self.foreign_cpu_s / secs
        } else {
            0.0
        }
    }

    pub fn busy_share(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            self.busy_weighted / secs
        } else {
            0.0
        }
    }
}

pub(crate) struct Scenario {
    pub stream: bool,
    pub concurrency: usize,
    pub direct: Agg,
    pub hearth: Option<Agg>,
}

pub(crate) struct ColdDirect {
    pub spawn_to_ready: Duration,
    pub ttft: Duration,
    pub had_token: bool,
}

pub(crate) struct ColdHearth {
    pub ttft: Duration,
    pub had_token: bool,
    pub last_load_seconds: Option<f64>,
    pub starts: Option<i64>,
}

pub(crate) struct Results {
    pub command: String,
    pub machine: Machine,
    pub background_busy: Option<f64>,
    pub load_start: String,
    pub load_end: String,
    pub model: PathBuf,
    pub model_bytes: u64,
    pub args: BenchArgs,
    pub hearth_version: Option<String>,
    pub runtime_cmd: Option<Vec<String>>,
    pub direct_cmd: Vec<String>,
    pub scenarios: Vec<Scenario>,
    pub cold_direct: Vec<ColdDirect>,
    pub cold_hearth: Vec<ColdHearth>,
    pub rss_start: Option<(u64, u64)>,
    pub rss_after: Option<(u64, u64)>,
    pub rss_after_unload: Option<(u64, u64)>,
    /// hearth's CPU time per second of wall time while idle with the model loaded.
    pub hearth_idle_cpu: Option<f64>,
    pub hearth_exit: Option<String>,
    pub notes: Vec<String>,
    pub wall: Duration,
}

pub fn run(args: BenchArgs) -> Result<()> {
    match &args.cmd {
        Some(BenchCmd::Sensor(s)) => return sensor::run(s),
        Some(BenchCmd::SensorServer(s)) => return sensor::serve(s),
        Some(BenchCmd::WarmTiers(w)) => return warm::run(w),
        None => {}
    }
    if args.phase_secs <= 0.0 || args.phase_secs > 60.0 {
        bail!("--phase-secs must be in (0, 60]");
    }
    if args.concurrency.is_empty() || args.concurrency.iter().any(|&c| c == 0 || c > 256) {
        bail!("--concurrency values must be in 1..=256");
    }
    let paths = Paths::resolve(&args)?;
    if should_reexec(args.no_reexec) {
        // The load generator shares the CPUs with hearth and llama-server: it must be an optimized build.
        return reexec_release(&paths.root);
    }
    if !args.direct_only {
        if !args.no_build {
            build_hearth(&paths.root)?;
        }
        if !paths.hearth_bin.exists() {
            bail!(
                "{} does not exist (build it with `cargo build --release -p hearth`)",
                paths.hearth_bin.display()
            );
        }
    }
    if paths.work.exists() {
        std::fs::remove_dir_all(&paths.work)
            .with_context(|| format!("clearing {}", paths.work.display()))?;
    }
    std::fs::create_dir_all(&paths.work)
        .with_context(|| format!("creating {}", paths.work.display()))?;

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let results = rt.block_on(async {
        tokio::select! {
            r = bench(&args, &paths) => r,
            _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted; stopped every process the bench started")),
        }
    })?;

    println!("{}", report::text(&results));
    if args.direct_only || args.results.no_write {
        eprintln!("bench: results file not written (--direct-only / --no-write)");
    } else {
        report::write_doc(&paths.output, &report::markdown(&results))?;
        eprintln!("bench: wrote {}", paths.output.display());
    }
    eprintln!("bench: logs of this run in {}", paths.work.display());
    Ok(())
}

/// Whether this is a debug build that should re-run itself as a release build.
fn should_reexec(no_reexec: bool) -> bool {
    cfg!(debug_assertions) && !no_reexec && std::env::var_os(REEXEC_ENV).is_none()
}

/// Runs the same command line again as `cargo run --release -p xtask`, and waits for it.
fn reexec_release(root: &Path) -> Result<()> {
    eprintln!("bench: re-running as `cargo run --release -p xtask` (--no-reexec to skip)");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .args(["run", "--release", "--quiet", "-p", "xtask", "--"])
        .args(std::env::args_os().skip(1))
        .env(REEXEC_ENV, "1")
        .current_dir(root)
        .status()
        .context("running the release build of xtask")?;
    if !status.success() {
        bail!("bench failed ({status})");
    }
    Ok(())
}

fn build_hearth(root: &Path) -> Result<()> {
    // hearth embeds target/ebpf/hearth-ebpf.o (agent/build.rs): build it first (fast when up to date).
    crate::ebpf::build(root)?;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    eprintln!("bench: cargo build --release -p hearth");
    let status = Command::new(cargo)
        .args(["build", "--release", "-p", "hearth"])
        .current_dir(root)
        .status()
        .context("running cargo build")?;
    if !status.success() {
        bail!("cargo build --release -p hearth failed ({status})");
    }
    Ok(())
}

/// The command line that produced the results: `cargo xtask ...` when run through cargo, else the binary.
fn invocation() -> String {
    let mut argv = std::env::args();
    let program = argv.next().unwrap_or_default();
    let args: Vec<String> = argv.collect();
    let program = if std::env::var_os("CARGO").is_some() {
        "cargo xtask".to_string()
    } else {
        program
    };
    let affinity = stats::affinity_note();
    format!("{affinity}{program} {}", args.join(" "))
}

/// `argv` with its `--port` value replaced (and `--host` forced to loopback).
fn with_port(argv: &[String], port: u16) -> Vec<String> {
    let mut out = argv.to_vec();
    let mut i = 0;
    while i < out.len() {
        match out[i].as_str() {
            "--port" if i + 1 < out.len() => {
                out[i + 1] = port.to_string();
                i += 1;
            }
            "--host" if i + 1 < out.len() => {
                out[i + 1] = "127.0.0.1".to_string();
                i += 1;
            }
            a if a.starts_with("--port=") => out[i] = format!("--port={port}"),
            a if a.starts_with("--host=") => out[i] = "--host=127.0.0.1".to_string(),
            _ => {}
        }
        i += 1;
    }
    if !out
        .iter()
        .any(|a| a == "--port" || a.starts_with("--port="))
    {
        out.push("--port".to_string());
        out.push(port.to_string());
    }
    out
}

/// The command line hearth is documented to use for a llama-cpp model (used in --direct-only mode and as
/// a fallback when the runtime's real command line cannot be read).
fn documented_llama_argv(p: &Paths, args: &BenchArgs, port: u16, slots: usize) -> Vec<String> {
    vec![
        p.llama_server.display().to_string(),
        "-m".into(),
        p.model.display().to_string(),
        "--host".into(),
        "127.0.0.1".into(),
        "--port".into(),
        port.to_string(),
        "-c".into(),
        "2048".into(),
        "-t".into(),
        args.threads.to_string(),
        "-np".into(),
        slots.to_string(),
    ]
    .into_iter()
    .chain(args.runtime_args.iter().cloned())
    .collect()
}

fn toml_str(s: &str) -> String {
    // A JSON string literal is a valid TOML basic string.
    serde_json::Value::String(s.to_string()).to_string()
}

fn hearth_config(p: &Paths, args: &BenchArgs, port: u16, rp: (u16, u16), slots: usize) -> String {
    format!(
        r#"# generated by `cargo xtask bench`
[server]
listen = "127.0.0.1:{port}"
runtime_ports = "{lo}-{hi}"
worker_threads = {wt}

[resources]
host_memory_mb = 2048

[runtimes]
llama_server = {ls}

[[models]]
id = "{MODEL_ID}"
runtime = "llama-cpp"
model_path = {model}
args = {model_args}
memory_mb = 64
context_length = 2048
max_concurrency = {slots}
keep_warm = "forever"
start_timeout = "60s"
stop_timeout = "5s"
queue = {{ max = 256, timeout = "60s" }}
"#,
        lo = rp.0,
        hi = rp.1,
        wt = args.worker_threads,
        ls = toml_str(&p.llama_server.display().to_string()),
        model = toml_str(&p.model.display().to_string()),
        model_args = serde_json::Value::from(
            ["-t".to_string(), args.threads.to_string()]
                .into_iter()
                .chain(args.runtime_args.iter().cloned())
                .collect::<Vec<_>>()
        ),
    )
}

/// Polls `url` every 5 ms until it answers 200; fails if `proc` exits or `limit` passes.
async fn wait_http_ok(
    client: &HttpClient,
    url: &str,
    proc_: &mut Proc,
    limit: Duration,
) -> Result<()> {
    let start = Instant::now();
    loop {
        if let Some(st) = proc_.exited() {
            bail!(
                "{} exited ({st}) before {url} answered; last output:\n{}",
                proc_.name,
                proc_.log_tail(30)
            );
        }
        if let Ok((s, _)) = call(client, Method::GET, url, None, Duration::from_secs(1)).await {
            if s.is_success() {
                return Ok(());
            }
        }
        if start.elapsed() > limit {
            bail!(
                "{url} not ready after {limit:?}; last output of {}:\n{}",
                proc_.name,
                proc_.log_tail(30)
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The hearth under test, seen through its status and admin API. Every runtime pid it reports is
/// watched, so that no runtime outlives the bench.
struct Hearth<'a> {
    client: HttpClient,
    base: String,
    /// The model the bench configured.
    model: &'static str,
    proc_: &'a mut Proc,
    reaper: &'a mut Reaper,
}

impl Hearth<'_> {
    /// The model's entry in `/hearth/v1/status`; an error (with hearth's last output) if it exited.
    async fn model(&mut self) -> Result<serde_json::Value> {
        if let Some(st) = self.proc_.exited() {
            bail!(
                "hearth exited ({st}); last output:\n{}",
                self.proc_.log_tail(30)
            );
        }
        let id = self.model;
        let st = get_json(&self.client, &format!("{}/hearth/v1/status", self.base)).await?;
        let m = st
            .get("models")
            .and_then(|m| m.as_array())
            .and_then(|m| {
                m.iter()
                    .find(|e| e.get("id").and_then(|i| i.as_str()) == Some(id))
            })
            .cloned()
            .with_context(|| format!("/hearth/v1/status has no model {id}: {st}"))?;
        if let Some(pid) = pid_of(&m) {
            self.reaper.watch(pid);
        }
        Ok(m)
    }

    /// `POST /hearth/v1/models/{model}/{action}`.
    async fn post(&self, action: &str, limit: Duration) -> Result<serde_json::Value> {
        let url = format!("{}/hearth/v1/models/{}/{action}", self.base, self.model);
        client::call_json(&self.client, Method::POST, &url, limit).await
    }

    /// Polls the status every 10 ms until the model's state is `want`.
    async fn wait_state(&mut self, want: &str, limit: Duration) -> Result<serde_json::Value> {
        let start = Instant::now();
        loop {
            let m = self.model().await?;
            let state = m.get("state").and_then(|s| s.as_str()).unwrap_or("?");
            if state == want {
                return Ok(m);
            }
            if state == "failed" {
                bail!(
                    "model {} failed while waiting for {want:?}: {m}",
                    self.model
                );
            }
            if start.elapsed() > limit {
                bail!(
                    "model {} not {want:?} after {limit:?}; status entry: {m}",
                    self.model
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// Stops hearth with SIGTERM (20 s grace), notes an unclean exit and runtimes that outlived it, and
/// says how it exited.
fn stop_hearth(hp: &mut Proc, reaper: &Reaper, notes: &mut Vec<String>) -> Result<String> {
    let stopped = hp.stop(Duration::from_secs(20))?;
    let exit = format!(
        "{} after {:.0} ms{}",
        stopped.status,
        stopped.took.as_secs_f64() * 1e3,
        if stopped.killed {
            " (needed SIGKILL)"
        } else {
            ""
        }
    );
    if !stopped.status.success() || stopped.killed {
        notes.push(format!("hearth did not exit cleanly on SIGTERM: {exit}"));
    }
    let left = reaper.survivors();
    if !left.is_empty() {
        notes.push(format!(
            "runtime processes still running after hearth exited: {left:?} (killed by the bench)"
        ));
    }
    Ok(exit)
}

fn pid_of(entry: &serde_json::Value) -> Option<u32> {
    entry
        .get("pid")
        .and_then(|p| p.as_u64())
        .and_then(|p| u32::try_from(p).ok())
}

async fn bench(args: &BenchArgs, p: &Paths) -> Result<Results> {
    let wall = Instant::now();
    let mut notes = Vec::new();
    let slots = args.concurrency.iter().copied().max().unwrap_or(1);
    let machine = Machine::collect(&p.root, Some(&p.llama_server));
    let load_start = stats::loadavg();
    // How busy the machine is before we start anything: a noise indicator.
    let background_busy = match CpuSnapshot::take() {
        Some(a) => {
            tokio::time::sleep(Duration::from_secs(1)).await;
            CpuSnapshot::take().map(|b| b.busy_share_since(&a))
        }
        None => None,
    };
    let model_bytes = std::fs::metadata(&p.model).map(|m| m.len()).unwrap_or(0);
    let phase = Duration::from_secs_f64(args.phase_secs);
    let warmup = Duration::from_secs_f64((args.phase_secs / 4.0).min(1.0));
    let req_timeout = Duration::from_secs(30);

    // Declared before `hearth_proc` so that it is dropped after it (kills runtimes hearth left behind).
    let mut reaper = Reaper::default();
    let mut hearth_proc: Option<Proc> = None;
    let mut hearth_version = None;
    let mut runtime_cmd = None;
    let mut runtime_pid = None;
    let mut rss_start = None;
    let hearth_port = procs::free_port()?;
    let hearth_base = format!("http://127.0.0.1:{hearth_port}");

    if !args.direct_only {
        let rp = procs::free_port_range(16)?;
        let cfg = p.work.join("hearth.toml");
        std::fs::write(&cfg, hearth_config(p, args, hearth_port, rp, slots))
            .with_context(|| format!("writing {}", cfg.display()))?;
        let argv = vec![
            p.hearth_bin.display().to_string(),
            "run".to_string(),
            "--config".to_string(),
            cfg.display().to_string(),
        ];
        eprintln!("bench: starting {}", argv.join(" "));
        let mut hp = Proc::spawn(
            "hearth",
            &argv,
            &[("RUST_LOG", args.hearth_log.as_str())],
            &p.work.join("hearth.log"),
        )?;
        let client = new_client(4);
        wait_http_ok(
            &client,
            &format!("{hearth_base}/health"),
            &mut hp,
            Duration::from_secs(20),
        )
        .await?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        rss_start = procs::rss_kib(hp.pid()).ok();
        let mut h = Hearth {
            client,
            base: hearth_base.clone(),
            model: MODEL_ID,
            proc_: &mut hp,
            reaper: &mut reaper,
        };
        hearth_version = get_json(&h.client, &format!("{hearth_base}/hearth/v1/status"))
            .await
            .ok()
            .and_then(|s| s.get("version").and_then(|v| v.as_str()).map(String::from));
        if let Err(e) = h.post("load", Duration::from_secs(10)).await {
            notes.push(format!(
                "POST /hearth/v1/models/{MODEL_ID}/load did not work ({e:#}); loaded the model with a request instead"
            ));
            let uri: Uri = format!("{hearth_base}/v1/chat/completions").parse()?;
            let body = chat_body(MODEL_ID, args.max_tokens, false);
            if let Err(e) = timed_chat(
                &h.client,
                &uri,
                &body,
                false,
                false,
                Duration::from_secs(60),
            )
            .await
            {
                bail!(
                    "first request through hearth failed: {e}\nhearth log:\n{}",
                    h.proc_.log_tail(30)
                );
            }
        }
        let entry = h.wait_state("ready", Duration::from_secs(60)).await?;
        match pid_of(&entry) {
            Some(pid) => {
                runtime_pid = Some(pid);
                match procs::cmdline(pid) {
                    Ok(argv) if argv.first().is_some_and(|a| a.contains("llama-server")) => {
                        runtime_cmd = Some(argv)
                    }
                    Ok(argv) => notes.push(format!(
                        "runtime pid {pid} is not llama-server itself (`{}`); the direct server uses the documented arguments",
                        argv.join(" ")
                    )),
                    Err(e) => notes.push(format!("cannot read the runtime's command line: {e:#}")),
                }
            }
            None => notes.push(format!("status entry has no pid: {entry}")),
        }
        hearth_proc = Some(hp);
    }

    // The direct server: same binary and arguments as hearth's runtime, another loopback port. A separate
    // process, so that neither path's idle keep-alive connections occupy the other's HTTP threads.
    let direct_port = procs::free_port()?;
    let direct_cmd = match &runtime_cmd {
        Some(argv) => with_port(argv, direct_port),
        None => documented_llama_argv(p, args, direct_port, slots),
    };
    let direct_base = format!("http://127.0.0.1:{direct_port}");
    let mut direct = Proc::spawn(
        "llama-server (direct)",
        &direct_cmd,
        &[],
        &p.work.join("llama-direct.log"),
    )?;
    wait_http_ok(
        &new_client(2),
        &format!("{direct_base}/health"),
        &mut direct,
        Duration::from_secs(60),
    )
    .await?;

    // Steady state.
    let direct_uri: Uri = format!("{direct_base}/v1/chat/completions").parse()?;
    let hearth_uri: Uri = format!("{hearth_base}/v1/chat/completions").parse()?;
    let mut scenarios = Vec::new();
    for stream in [false, true] {
        let body = chat_body(MODEL_ID, args.max_tokens, stream);
        for &c in &args.concurrency {
            let label = format!("{} c={c}", if stream { "stream" } else { "non-stream" });
            let mut sc = Scenario {
                stream,
                concurrency: c,
                direct: Agg::default(),
                hearth: hearth_proc.as_ref().map(|_| Agg::default()),
            };
            let paths: Vec<Route> = if hearth_proc.is_some() {
                vec![Route::Direct, Route::Hearth]
            } else {
                vec![Route::Direct]
            };
            for &path in &paths {
                let uri = if path == Route::Direct {
                    &direct_uri
                } else {
                    &hearth_uri
                };
                let close = path.closes_streams(args);
                let w = run_phase(uri, &body, stream, close, c, warmup, req_timeout).await;
                if w.errors.count > 0 {
                    notes.push(format!(
                        "{label} {} warm-up (not counted): {} failed requests, e.g. {}",
                        path.name(),
                        w.errors.count,
                        w.errors
                            .examples
                            .iter()
                            .map(|e| format!("`{}`", e.replace('`', "'")))
                            .collect::<Vec<_>>()
                            .join("; ")
                    ));
                }
            }
            for round in 0..args.rounds {
                let mut order = paths.clone();
                if round % 2 == 1 {
                    order.reverse();
                }
                for &path in &order {
                    let uri = if path == Route::Direct {
                        &direct_uri
                    } else {
                        &hearth_uri
                    };
                    // CPU time of every process of ours (load generator, hearth, its runtime, the direct
                    // server) and of the usable CPUs as a whole: what is left is other processes' load.
                    let ours = [
                        Some(std::process::id()),
                        hearth_proc.as_ref().map(|h| h.pid()),
                        runtime_pid,
                        Some(direct.pid()),
                    ];
                    let cpu_now = || -> Vec<Option<f64>> {
                        ours.iter()
                            .map(|p| p.and_then(|pid| procs::cpu_seconds(pid).ok()))
                            .collect()
                    };
                    let before = cpu_now();
                    let busy0 = CpuSnapshot::take();
                    let close = path.closes_streams(args);
                    let r = run_phase(uri, &body, stream, close, c, phase, req_timeout).await;
                    let busy1 = CpuSnapshot::take();
                    let after = cpu_now();
                    let used: Vec<f64> = before
                        .iter()
                        .zip(&after)
                        .map(|(a, b)| match (a, b) {
                            (Some(a), Some(b)) => b - a,
                            _ => 0.0,
                        })
                        .collect();
                    let (busy, busy_cpu_s) = match (busy0, busy1) {
                        (Some(a), Some(b)) => (b.busy_share_since(&a), b.busy_seconds_since(&a)),
                        _ => (0.0, 0.0),
                    };
                    let foreign = (busy_cpu_s - used.iter().sum::<f64>()).max(0.0);
                    let rps = r.samples.len() as f64 / r.elapsed.as_secs_f64().max(1e-9);
                    eprintln!(
                        "bench: {label} round {}/{} {:>6}: {:>6} ok, {} errors, {rps:8.1} req/s",
                        round + 1,
                        args.rounds,
                        path.name(),
                        r.samples.len(),
                        r.errors.count
                    );
                    let agg = match path {
                        Route::Direct => &mut sc.direct,
                        Route::Hearth => match sc.hearth.as_mut() {
                            Some(a) => a,
                            None => continue,
                        },
                    };
                    agg.samples.extend(r.samples);
                    agg.errors.merge(&r.errors);
                    agg.elapsed += r.elapsed;
                    agg.phase_rps.push(rps);
                    agg.busy_weighted += busy * r.elapsed.as_secs_f64();
                    agg.foreign_cpu_s += foreign;
                    agg.client_cpu_s += used[0];
                    match path {
                        Route::Direct => agg.server_cpu_s += used[3],
                        Route::Hearth => {
                            agg.hearth_cpu_s += used[1];
                            agg.server_cpu_s += used[2];
                        }
                    }
                    if let Some(hp) = hearth_proc.as_mut() {
                        if let Some(st) = hp.exited() {
                            bail!(
                                "hearth exited ({st}) during {label}; last output:\n{}",
                                hp.log_tail(30)
                            );
                        }
                    }
                    if let Some(st) = direct.exited() {
                        bail!(
                            "direct llama-server exited ({st}) during {label}; last output:\n{}",
                            direct.log_tail(30)
                        );
                    }
                }
            }
            scenarios.push(sc);
        }
    }
    direct
        .stop(Duration::from_secs(10))
        .context("stopping the direct llama-server")?;

    // hearth's background CPU use (timers, health checks, reading runtime output) with nothing to do.
    let mut hearth_idle_cpu = None;
    if let Some(hp) = hearth_proc.as_ref() {
        let pid = hp.pid();
        let t0 = Instant::now();
        if let Ok(a) = procs::cpu_seconds(pid) {
            tokio::time::sleep(Duration::from_secs(2)).await;
            if let Ok(b) = procs::cpu_seconds(pid) {
                hearth_idle_cpu = Some((b - a) / t0.elapsed().as_secs_f64());
            }
        }
    }

    // Cold start.
    let template = direct_cmd.clone();
    let mut cold_direct = Vec::new();
    let mut cold_hearth = Vec::new();
    let mut rss_after = None;
    let mut rss_after_unload = None;
    let mut hearth_exit = None;
    match hearth_proc.as_mut() {
        None => {
            for i in 0..args.cold_runs {
                match cold_direct_run(args, p, &template, i).await {
                    Ok(c) => cold_direct.push(c),
                    Err(e) => notes.push(format!("direct cold run {i}: {e:#}")),
                }
            }
        }
        Some(hp) => {
            let mut h = Hearth {
                client: new_client(4),
                base: hearth_base.clone(),
                model: MODEL_ID,
                proc_: hp,
                reaper: &mut reaper,
            };
            for i in 0..args.cold_runs {
                let hearth_first = i % 2 == 1;
                for step in 0..2 {
                    if (step == 0) == hearth_first {
                        match cold_hearth_run(args, &mut h).await {
                            Ok(c) => cold_hearth.push(c),
                            Err(e) => {
                                notes.push(format!("cold start through hearth, run {i}: {e:#}"))
                            }
                        }
                    } else {
                        match cold_direct_run(args, p, &template, i).await {
                            Ok(c) => cold_direct.push(c),
                            Err(e) => notes.push(format!("direct cold run {i}: {e:#}")),
                        }
                    }
                }
                if let Some(st) = h.proc_.exited() {
                    bail!(
                        "hearth exited ({st}) during the cold-start runs; last output:\n{}",
                        h.proc_.log_tail(30)
                    );
                }
            }

            // Idle RSS after the benchmark: with the model still loaded, then after unloading it.
            // Idle means no request for IDLE_SETTLE: hearth hands its allocator's free memory back
            // to the OS after a second without requests (checked every second).
            tokio::time::sleep(IDLE_SETTLE).await;
            rss_after = procs::rss_kib(h.proc_.pid()).ok();
            match h.post("unload", Duration::from_secs(10)).await {
                Ok(_) => match h.wait_state("cold", Duration::from_secs(30)).await {
                    Ok(_) => {
                        tokio::time::sleep(IDLE_SETTLE).await;
                        rss_after_unload = procs::rss_kib(h.proc_.pid()).ok();
                    }
                    Err(e) => notes.push(format!("final unload: {e:#}")),
                },
                Err(e) => notes.push(format!("final unload: {e:#}")),
            }
            if let Ok(m) = h.model().await {
                let failures = m
                    .get("failures_total")
                    .and_then(|v| v.as_i64())
                    .unwrap_or(0);
                if failures > 0 {
                    notes.push(format!("hearth reports failures_total = {failures}: {m}"));
                }
            }
            drop(h);

            // Shutdown: SIGTERM must stop every runtime and exit 0.
            hearth_exit = Some(stop_hearth(hp, &reaper, &mut notes)?);
        }
    }

    Ok(Results {
        command: invocation(),
        machine,
        background_busy,
        load_start,
        load_end: stats::loadavg(),
        model: p.model.clone(),
        model_bytes,
        args: args.clone(),
        hearth_version,
        runtime_cmd,
        direct_cmd,
        scenarios,
        cold_direct,
        cold_hearth,
        rss_start,
        rss_after,
        rss_after_unload,
        hearth_idle_cpu,
        hearth_exit,
        notes,
        wall: wall.elapsed(),
    })
}

/// Spawns llama-server, polls /health every 5 ms (spawn-to-ready), then times one streaming request on
/// the fresh server (its first request, like the one hearth forwards after a cold start).
async fn cold_direct_run(
    args: &BenchArgs,
    p: &Paths,
    template: &[String],
    i: u32,
) -> Result<ColdDirect> {
    let port = procs::free_port()?;
    let argv = with_port(template, port);
    let client = new_client(2);
    let base = format!("http://127.0.0.1:{port}");
    let t0 = Instant::now();
    let mut proc_ = Proc::spawn(
        &format!("llama-server (cold {i})"),
        &argv,
        &[],
        &p.work.join(format!("llama-cold-{i}.log")),
    )?;
    wait_http_ok(
        &client,
        &format!("{base}/health"),
        &mut proc_,
        Duration::from_secs(60),
    )
    .await?;
    let spawn_to_ready = t0.elapsed();
    let uri: Uri = format!("{base}/v1/chat/completions").parse()?;
    let body: Bytes = chat_body(MODEL_ID, args.max_tokens, true);
    let s = timed_chat(&client, &uri, &body, true, true, Duration::from_secs(30))
        .await
        .map_err(|e| anyhow!("first request on a fresh llama-server: {e}"))?;
    drop(client);
    proc_.stop(Duration::from_secs(10))?;
    Ok(ColdDirect {
        spawn_to_ready,
        ttft: s.ttft.unwrap_or(s.total),
        had_token: s.ttft.is_some(),
    })
}

/// Unloads the model, waits until hearth says it is cold, then times one streaming request through hearth.
async fn cold_hearth_run(args: &BenchArgs, h: &mut Hearth<'_>) -> Result<ColdHearth> {
    h.post("unload", Duration::from_secs(10)).await?;
    // (A cold model should have no process; `model` watches any pid it reports anyway.)
    let before = h.wait_state("cold", Duration::from_secs(30)).await?;
    let starts_before = before.get("starts_total").and_then(|v| v.as_i64());
    let uri: Uri = format!("{}/v1/chat/completions", h.base).parse()?;
    let body = chat_body(MODEL_ID, args.max_tokens, true);
    let close = args.hearth_stream_close;
    let s = timed_chat(&h.client, &uri, &body, true, close, Duration::from_secs(60))
        .await
        .map_err(|e| anyhow!("request to the cold model: {e}"))?;
    let after = h.model().await?;
    let starts_after = after.get("starts_total").and_then(|v| v.as_i64());
    Ok(ColdHearth {
        ttft: s.ttft.unwrap_or(s.total),
        had_token: s.ttft.is_some(),
        last_load_seconds: after.get("last_load_seconds").and_then(|v| v.as_f64()),
        starts: match (starts_before, starts_after) {
            (Some(a), Some(b)) => Some(b - a),
            _ => None,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_is_replaced_and_host_forced() {
        let argv: Vec<String> = [
            "ls", "-m", "m.gguf", "--host", "0.0.0.0", "--port", "41000", "-np", "4",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let out = with_port(&argv, 5555);
        assert_eq!(
            out.join(" "),
            "ls -m m.gguf --host 127.0.0.1 --port 5555 -np 4"
        );
        let out = with_port(&argv[..3], 6);
        assert_eq!(out.join(" "), "ls -m m.gguf --port 6");
    }
}
