//! One runtime process: argv, spawn, output capture, readiness probe, stop.
//!
//! Only the supervisor calls into this module. A process runs in its own process group (so a stop
//! reaches everything it forked), is spawned from argv (never a shell), and reports its readiness and
//! exit as events tagged with the model index and a generation number, so an event from a previous
//! incarnation is recognised and ignored.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::Command;
use tokio::sync::{mpsc, watch};
use tracing::Instrument;

use crate::cgroup::{RuntimeCgroup, Stats};
use crate::config::{ModelConfig, RuntimeKind};
use crate::confine::{self, Sandbox};

/// How many lines of a runtime's output are kept for status and errors.
pub const LOG_LINES: usize = 200;
/// Readiness poll interval (llama-server answers 503 on /health while loading).
pub const READY_POLL: Duration = Duration::from_millis(10);
/// How often a running runtime's cgroup statistics are read.
pub const STATS_EVERY: Duration = Duration::from_secs(1);
/// How long a stopped runtime's cgroup may take to empty after SIGKILL.
const CGROUP_EMPTY_WAIT: Duration = Duration::from_secs(5);

/// The failure reason of an OOM kill, with the limit that was hit.
pub fn oom_reason(limit_mb: Option<u64>) -> String {
    match limit_mb {
        Some(mb) => {
            format!("oom: limit {mb} MB (memory_max_mb) exceeded, the kernel killed the runtime")
        }
        None => "oom: the kernel's OOM killer killed the runtime".to_string(),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("model {model}: cannot spawn {program}: {source}")]
    Spawn {
        model: String,
        program: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("model {model}: no free port in {first}-{last}")]
    NoPort {
        model: String,
        first: u16,
        last: u16,
    },
}

/// The last lines a runtime printed (stdout and stderr, interleaved as read).
#[derive(Clone, Default, Debug)]
pub struct LogTail(Arc<Mutex<VecDeque<String>>>);

impl LogTail {
    pub fn push(&self, line: String) {
        if let Ok(mut q) = self.0.lock() {
            if q.len() == LOG_LINES {
                q.pop_front();
            }
            q.push_back(line);
        }
    }

    /// The last `n` lines.
    pub fn last(&self, n: usize) -> Vec<String> {
        match self.0.lock() {
            Ok(q) => q.iter().skip(q.len().saturating_sub(n)).cloned().collect(),
            Err(_) => Vec::new(),
        }
    }
}

/// What a runtime reports to the supervisor.
#[derive(Debug)]
pub enum RuntimeEvent {
    Ready {
        model: usize,
        generation: u64,
    },
    /// The runtime's cgroup recorded an OOM kill (`kills` in total so far).
    Oom {
        model: usize,
        generation: u64,
        kills: u64,
    },
    /// A periodic reading of the runtime's cgroup.
    Stats {
        model: usize,
        generation: u64,
        stats: Stats,
        /// Proportional set size of the cgroup's processes: the memory they keep resident, shared
        /// file pages (mmap'd weights already in the page cache, which the cgroup is not charged
        /// for) included, each shared page split between its users.
        resident_bytes: Option<u64>,
    },
    /// A sleep or a wake-up (vLLM sleep mode) finished.
    Transition {
        model: usize,
        generation: u64,
        kind: TransitionKind,
        result: Result<(), String>,
    },
    /// The runtime exited; with a cgroup, everything in it is gone and the cgroup removed.
    Exited {
        model: usize,
        generation: u64,
        status: String,
        /// OOM kills its cgroup recorded over its life.
        oom_kills: u64,
    },
}

/// A spawned runtime. Dropping it does not stop the process: call [`RuntimeProcess::stop`].
#[derive(Debug)]
pub struct RuntimeProcess {
    pub pid: u32,
    pub port: u16,
    pub logs: LogTail,
    /// The runtime's cgroup, when confinement has cgroups.
    pub cgroup: Option<RuntimeCgroup>,
    /// The user it runs as, when hearth switched it.
    pub user: Option<confine::Credentials>,
    /// Why this runtime died, once known (OOM, exit status): in-flight requests quote it.
    pub fate: watch::Receiver<Option<String>>,
    exited: watch::Receiver<bool>,
    probe: tokio::task::JoinHandle<()>,
}

/// Where a runtime runs: the GPUs the scheduler placed it on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Placement {
    /// GPU indices (as NVML and `nvidia-smi` number them); empty: host only.
    pub gpus: Vec<u32>,
    /// The smallest memory among those GPUs, in MB (sets vLLM's `--gpu-memory-utilization`).
    pub gpu_total_mb: Option<u64>,
}

impl Placement {
    fn visible_devices(&self) -> String {
        self.gpus
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// The environment hearth adds for a placement: which GPUs the runtime sees, and vLLM's dev mode
/// for its sleep endpoints.
pub fn placement_env(m: &ModelConfig, placement: &Placement) -> Vec<(String, String)> {
    let mut env = Vec::new();
    if m.uses_gpu() && !placement.gpus.is_empty() {
        let devices = placement.visible_devices();
        // NVML numbers GPUs in PCI bus order; CUDA's default is fastest first.
        env.push(("CUDA_DEVICE_ORDER".into(), "PCI_BUS_ID".into()));
        env.push(("CUDA_VISIBLE_DEVICES".into(), devices.clone()));
        if m.runtime == RuntimeKind::LlamaCpp {
            // ggml's Vulkan backend numbers devices itself (in the same order on one-GPU hosts).
            env.push(("GGML_VK_VISIBLE_DEVICES".into(), devices));
        }
    }
    if m.runtime == RuntimeKind::Vllm && m.sleep.is_some() {
        env.push(("VLLM_SERVER_DEV_MODE".into(), "1".into()));
    }
    env
}

/// The argv (program and arguments) for a model on `port`.
pub fn argv(m: &ModelConfig, port: u16, placement: &Placement) -> (PathBuf, Vec<OsString>) {
    let host = "127.0.0.1";
    let has = |names: &[&str]| m.args.iter().any(|a| names.contains(&a.as_str()));
    let mut out: Vec<OsString> = Vec::new();
    let model_path = m.model_path.clone().unwrap_or_default();
    match m.runtime {
        RuntimeKind::LlamaCpp => {
            out.extend(["-m".into(), model_path.into_os_string()]);
            out.extend([
                "--host".into(),
                host.into(),
                "--port".into(),
                port.to_string().into(),
            ]);
            out.extend(["--alias".into(), OsString::from(&m.id)]);
            if !has(&["-c", "--ctx-size"]) {
                out.extend(["-c".into(), m.context_length.to_string().into()]);
            }
            if !has(&["-np", "--parallel"]) {
                out.extend(["-np".into(), m.max_concurrency.to_string().into()]);
                // With an explicit slot count llama-server splits -c between slots unless the KV
                // cache is unified; unified keeps context_length available to every request.
                if !has(&["-kvu", "--kv-unified", "-no-kvu", "--no-kv-unified"]) {
                    out.push("--kv-unified".into());
                }
            }
            if m.uses_gpu() && !has(&["-ngl", "--n-gpu-layers", "--gpu-layers"]) {
                // A model given VRAM is offloaded whole unless the args say otherwise.
                out.extend(["--n-gpu-layers".into(), "999".into()]);
            }
        }
        RuntimeKind::Vllm => {
            out.extend(["serve".into(), model_path.into_os_string()]);
            out.extend([
                "--host".into(),
                host.into(),
                "--port".into(),
                port.to_string().into(),
            ]);
            out.extend(["--served-model-name".into(), OsString::from(&m.id)]);
            if !has(&["--max-model-len"]) {
                out.extend([
                    "--max-model-len".into(),
                    m.context_length.to_string().into(),
                ]);
            }
            if !has(&["--max-num-seqs"]) {
                out.extend([
                    "--max-num-seqs".into(),
                    m.max_concurrency.to_string().into(),
                ]);
            }
            if !has(&["--gpu-memory-utilization"]) {
                if let Some(total) = placement.gpu_total_mb {
                    let u = crate::gpu::memory_utilization(m.vram_mb, total);
                    out.extend(["--gpu-memory-utilization".into(), format!("{u:.2}").into()]);
                }
            }
            if placement.gpus.len() > 1 && !has(&["--tensor-parallel-size", "-tp"]) {
                out.extend([
                    "--tensor-parallel-size".into(),
                    placement.gpus.len().to_string().into(),
                ]);
            }
            if m.sleep.is_some() && !has(&["--enable-sleep-mode"]) {
                out.push("--enable-sleep-mode".into());
            }
        }
        RuntimeKind::Command => {
            let mp = m
                .model_path
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default();
            for a in &m.command_args {
                out.push(
                    a.replace("{port}", &port.to_string())
                        .replace("{host}", host)
                        .replace("{model_path}", &mp)
                        .replace("{id}", &m.id)
                        .replace("{gpus}", &placement.visible_devices())
                        .into(),
                );
            }
        }
    }
    out.extend(m.args.iter().map(OsString::from));
    (m.program.clone(), out)
}

/// Paths polled for readiness, in order; all must answer 2xx.
fn ready_paths(m: &ModelConfig) -> Vec<String> {
    match m.runtime {
        RuntimeKind::LlamaCpp => vec!["/health".into()],
        RuntimeKind::Vllm => vec!["/health".into(), "/v1/models".into()],
        RuntimeKind::Command => vec![m.health_path.clone()],
    }
}

/// Spawns the runtime of model `index` on `port` inside `sandbox`; readiness, statistics, OOM and
/// exit arrive on `events`.
pub fn spawn(
    index: usize,
    generation: u64,
    m: &ModelConfig,
    port: u16,
    sandbox: Sandbox,
    placement: &Placement,
    events: mpsc::UnboundedSender<RuntimeEvent>,
) -> Result<RuntimeProcess, RuntimeError> {
    let (program, args) = argv(m, port, placement);
    let mut cmd = Command::new(&program);
    cmd.args(&args)
        .env_clear()
        .envs(sandbox.env.iter().map(|(k, v)| (k, v)))
        .envs(placement_env(m, placement))
        .envs(&m.env)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(false);
    let parent = std::process::id();
    let join = sandbox.cgroup.as_ref().map(|c| c.join_plan().clone());
    let creds = sandbox.credentials.as_ref().map(|c| (c.uid, c.gid));
    let cap_last = sandbox.cap_last;
    // SAFETY: the closure runs in the forked child before exec, where only async-signal-safe calls
    // are allowed. `join_self` (open/write/close of paths prepared before the fork),
    // `drop_privileges` (prctl/setgroups/setgid/setuid) and `set_no_new_privs` are documented as
    // async-signal-safe and allocation-free; the rest are two raw syscalls (prctl(PR_SET_PDEATHSIG)
    // and getppid). Errors are io::Errors built from errno without allocating. Nothing touches a
    // lock, the allocator or state shared with the parent.
    unsafe {
        cmd.pre_exec(move || {
            // Into the cgroup first (while still root), so nothing of the runtime runs outside.
            if let Some(plan) = &join {
                crate::cgroup::join_self(plan)?;
            }
            match creds {
                Some((uid, gid)) => confine::drop_privileges(uid, gid, cap_last)?,
                None => confine::set_no_new_privs()?,
            }
            // After the credential change, which clears the parent-death signal: if hearth dies
            // without stopping us (kill -9), the kernel kills the runtime.
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)?;
            if nix::unistd::getppid().as_raw() as u32 != parent {
                // The parent died before the line above took effect.
                return Err(std::io::Error::from_raw_os_error(nix::libc::ESRCH));
            }
            Ok(())
        });
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(source) => {
            if let Some(cg) = &sandbox.cgroup {
                let _ = cg.remove();
            }
            return Err(RuntimeError::Spawn {
                model: m.id.clone(),
                program: program.clone(),
                source,
            });
        }
    };
    let pid = child.id().unwrap_or(0);
    let span = tracing::info_span!("runtime", model = %m.id, pid);
    let logs = LogTail::default();
    let mut pumps = Vec::new();
    if let Some(out) = child.stdout.take() {
        pumps.push(tokio::spawn(
            pump(out, logs.clone()).instrument(span.clone()),
        ));
    }
    if let Some(err) = child.stderr.take() {
        pumps.push(tokio::spawn(
            pump(err, logs.clone()).instrument(span.clone()),
        ));
    }
    let (exit_tx, exited) = watch::channel(false);
    let (fate_tx, fate) = watch::channel(None::<String>);
    let fate_tx = std::sync::Arc::new(fate_tx);
    let limit_mb = sandbox.memory_max_mb;
    if let Some(cg) = sandbox.cgroup.clone() {
        tokio::spawn(
            monitor(
                index,
                generation,
                cg,
                limit_mb,
                events.clone(),
                fate_tx.clone(),
                exited.clone(),
            )
            .instrument(span.clone()),
        );
    }
    let ev = events.clone();
    let cgroup = sandbox.cgroup.clone();
    tokio::spawn(
        async move {
            let status = match child.wait().await {
                Ok(s) => s.to_string(),
                Err(e) => format!("wait failed: {e}"),
            };
            let _ = exit_tx.send(true);
            // Whatever the leader left behind goes with it: the whole cgroup (processes that left
            // the process group too), else the process group.
            let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
            let mut oom_kills = 0;
            if let Some(cg) = cgroup {
                match tokio::task::spawn_blocking(move || dismantle(&cg)).await {
                    Ok((kills, r)) => {
                        oom_kills = kills;
                        if let Err(e) = r {
                            tracing::error!(error = %e, "cleaning up the runtime's cgroup");
                        }
                    }
                    Err(e) => tracing::error!(error = %e, "cgroup cleanup task failed"),
                }
            }
            let reason = if oom_kills > 0 {
                oom_reason(limit_mb)
            } else {
                format!("runtime exited ({status})")
            };
            fate_tx.send_if_modified(|f| {
                if f.is_none() || oom_kills > 0 {
                    *f = Some(reason);
                    true
                } else {
                    false
                }
            });
            // Report the exit only with the runtime's last words read (its pipes reach EOF once
            // everything holding them is gone), so a failure message carries them.
            let _ = tokio::time::timeout(PUMP_DRAIN, futures_util::future::join_all(pumps)).await;
            tracing::info!(%status, oom_kills, "runtime exited");
            let _ = ev.send(RuntimeEvent::Exited {
                model: index,
                generation,
                status,
                oom_kills,
            });
        }
        .instrument(span.clone()),
    );
    let probe = tokio::spawn(
        probe_ready(
            index,
            generation,
            port,
            ready_paths(m),
            events,
            exited.clone(),
        )
        .instrument(span),
    );
    Ok(RuntimeProcess {
        pid,
        port,
        logs,
        cgroup: sandbox.cgroup,
        user: sandbox.credentials,
        fate,
        exited,
        probe,
    })
}

/// After the leader's exit: kill what is left in the cgroup, wait until it is empty, read its OOM
/// count and remove it. Blocking (cgroupfs polls); run it off the async threads.
/// Returns the OOM kills the cgroup recorded (read before and after the kill, so a failed cleanup
/// does not lose them) and the cleanup's outcome.
fn dismantle(cg: &RuntimeCgroup) -> (u64, Result<(), crate::cgroup::CgroupError>) {
    let kills = || cg.stats().ok().and_then(|s| s.oom_kills).unwrap_or(0);
    let before = kills();
    let r = cg
        .kill_all()
        .and_then(|()| cg.wait_empty(CGROUP_EMPTY_WAIT));
    let after = kills();
    (before.max(after), r.and_then(|()| cg.remove()))
}

/// What wakes the monitor when the kernel OOM-kills in the cgroup: v1 an eventfd registered on
/// `memory.oom_control`, v2 inotify on `memory.events`.
enum OomSignal {
    V1(tokio::io::unix::AsyncFd<std::fs::File>),
    V2(inotify::EventStream<Vec<u8>>),
    None,
}

impl OomSignal {
    fn new(cg: &RuntimeCgroup) -> OomSignal {
        let r = match cg.kind() {
            crate::cgroup::Hierarchy::V1 => match cg.register_oom_eventfd() {
                // SAFETY: the File owns the eventfd and moves into the AsyncFd, which owns it until
                // dropped; a File's as_raw_fd always returns that same open descriptor.
                Ok(Some(fd)) => {
                    unsafe { tokio::io::unix::AsyncFd::register(std::fs::File::from(fd)) }
                        .map(OomSignal::V1)
                        .map_err(|e| e.to_string())
                }
                Ok(None) => Ok(OomSignal::None),
                Err(e) => Err(e.to_string()),
            },
            crate::cgroup::Hierarchy::V2 => match cg.oom_notify_file() {
                Some(path) => (|| {
                    let ino = inotify::Inotify::init()?;
                    ino.watches().add(&path, inotify::WatchMask::MODIFY)?;
                    ino.into_event_stream(vec![0u8; 1024])
                })()
                .map(OomSignal::V2)
                .map_err(|e| format!("inotify on {}: {e}", path.display())),
                None => Ok(OomSignal::None),
            },
        };
        r.unwrap_or_else(|e| {
            tracing::warn!(error = %e, "no OOM notification; OOM kills are seen by polling every {STATS_EVERY:?}");
            OomSignal::None
        })
    }

    async fn next(&mut self) {
        match self {
            OomSignal::V1(fd) => match fd.readable().await {
                Ok(mut guard) => {
                    let mut buf = [0u8; 8];
                    let _ = guard.try_io(|f| std::io::Read::read(&mut f.get_ref(), &mut buf));
                }
                Err(_) => std::future::pending().await,
            },
            OomSignal::V2(stream) => {
                use futures_util::StreamExt;
                if stream.next().await.is_none() {
                    std::future::pending::<()>().await;
                }
            }
            OomSignal::None => std::future::pending().await,
        }
    }
}

/// Reads the cgroup every [`STATS_EVERY`] and on every OOM notification; reports statistics and
/// new OOM kills until the runtime exits.
async fn monitor(
    index: usize,
    generation: u64,
    cg: RuntimeCgroup,
    limit_mb: Option<u64>,
    events: mpsc::UnboundedSender<RuntimeEvent>,
    fate: std::sync::Arc<watch::Sender<Option<String>>>,
    mut exited: watch::Receiver<bool>,
) {
    let mut oom = OomSignal::new(&cg);
    let mut tick = tokio::time::interval(STATS_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seen = 0u64;
    loop {
        tokio::select! {
            _ = exited.wait_for(|e| *e) => return,
            _ = tick.tick() => {}
            _ = oom.next() => {}
        }
        if *exited.borrow() {
            return;
        }
        let Ok(stats) = cg.stats() else { continue };
        let kills = stats.oom_kills.unwrap_or(0);
        if kills > seen {
            seen = kills;
            tracing::warn!(
                kills,
                limit_mb,
                "the kernel OOM-killed a process of the runtime"
            );
            fate.send_replace(Some(oom_reason(limit_mb)));
            let _ = events.send(RuntimeEvent::Oom {
                model: index,
                generation,
                kills,
            });
        }
        let resident_bytes = cg.pids().ok().and_then(|pids| pss_bytes(&pids));
        let _ = events.send(RuntimeEvent::Stats {
            model: index,
            generation,
            stats,
            resident_bytes,
        });
    }
}

/// The summed `Pss` of `pids` from `/proc/<pid>/smaps_rollup` (processes that vanished are skipped);
/// `None` when none could be read.
fn pss_bytes(pids: &[u32]) -> Option<u64> {
    let mut total = None;
    for pid in pids {
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")) else {
            continue;
        };
        let kb = text
            .lines()
            .find_map(|l| l.strip_prefix("Pss:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok());
        if let Some(kb) = kb {
            *total.get_or_insert(0) += kb * 1024;
        }
    }
    total
}

/// Output is read in batches: once the buffered lines are consumed, wait this long before the next
/// read so that a runtime's per-request log lines (llama-server writes about 8) cost one wake-up, not
/// one each. Nothing is lost: the pipe holds 64 KiB meanwhile.
const LOG_BATCH: Duration = Duration::from_millis(20);
/// How long an exit waits for the rest of the runtime's output.
const PUMP_DRAIN: Duration = Duration::from_secs(1);

async fn pump(r: impl AsyncRead + Unpin, logs: LogTail) {
    let mut r = BufReader::with_capacity(64 * 1024, r);
    let mut buf = Vec::with_capacity(256);
    loop {
        if r.buffer().is_empty() {
            tokio::time::sleep(LOG_BATCH).await;
        }
        buf.clear();
        match r.read_until(b'\n', &mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {
                let line = String::from_utf8_lossy(&buf).trim_end().to_string();
                if line.is_empty() {
                    continue;
                }
                tracing::debug!(target: "hearth::runtime::output", "{line}");
                logs.push(line);
            }
        }
    }
}

async fn probe_ready(
    index: usize,
    generation: u64,
    port: u16,
    paths: Vec<String>,
    events: mpsc::UnboundedSender<RuntimeEvent>,
    exited: watch::Receiver<bool>,
) {
    let client: Client<_, Empty<bytes::Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut tick = tokio::time::interval(READY_POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for path in paths {
        let uri: http::Uri = match format!("http://{addr}{path}").parse() {
            Ok(u) => u,
            Err(e) => {
                tracing::error!(%path, error = %e, "invalid health path");
                return;
            }
        };
        loop {
            tick.tick().await;
            if *exited.borrow() {
                return;
            }
            let fut = client.get(uri.clone());
            if let Ok(Ok(resp)) = tokio::time::timeout(Duration::from_secs(2), fut).await {
                let ok = resp.status().is_success();
                let _ = resp.into_body().collect().await;
                if ok {
                    break;
                }
            }
        }
    }
    let _ = events.send(RuntimeEvent::Ready {
        model: index,
        generation,
    });
}

/// Which way a sleep-mode transition goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransitionKind {
    Sleep,
    Wake,
}

impl TransitionKind {
    pub fn as_str(self) -> &'static str {
        match self {
            TransitionKind::Sleep => "sleep",
            TransitionKind::Wake => "wake",
        }
    }
}

type DevClient = Client<hyper_util::client::legacy::connect::HttpConnector, Empty<bytes::Bytes>>;

/// One call to a runtime's dev endpoint; the body, or why it failed.
async fn dev_call(
    client: &DevClient,
    method: http::Method,
    addr: SocketAddr,
    path_and_query: &str,
    timeout: Duration,
) -> Result<bytes::Bytes, String> {
    let req = http::Request::builder()
        .method(method.clone())
        .uri(format!("http://{addr}{path_and_query}"))
        .body(Empty::new())
        .map_err(|e| format!("{method} {path_and_query}: {e}"))?;
    let resp = tokio::time::timeout(timeout, client.request(req))
        .await
        .map_err(|_| format!("{method} {path_and_query}: no answer in {timeout:?}"))?
        .map_err(|e| format!("{method} {path_and_query}: {e}"))?;
    let status = resp.status();
    let body = tokio::time::timeout(timeout, resp.into_body().collect())
        .await
        .map_err(|_| format!("{method} {path_and_query}: body not read in {timeout:?}"))?
        .map_err(|e| format!("{method} {path_and_query}: {e}"))?
        .to_bytes();
    if !status.is_success() {
        let text = String::from_utf8_lossy(&body);
        let text: String = text.chars().take(300).collect();
        return Err(format!("{method} {path_and_query}: HTTP {status}: {text}"));
    }
    Ok(body)
}

/// `GET /is_sleeping` → `{"is_sleeping": bool}`.
async fn is_sleeping(client: &DevClient, addr: SocketAddr) -> Result<bool, String> {
    let body = dev_call(
        client,
        http::Method::GET,
        addr,
        "/is_sleeping",
        Duration::from_secs(5),
    )
    .await?;
    serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v.get("is_sleeping").and_then(serde_json::Value::as_bool))
        .ok_or_else(|| {
            format!(
                "GET /is_sleeping: not {{\"is_sleeping\": bool}}: {}",
                String::from_utf8_lossy(&body)
            )
        })
}

/// Puts a vLLM runtime to sleep (`POST /sleep?level=N`) or wakes it (`POST /wake_up`), then checks
/// `GET /is_sleeping` until it agrees, within `timeout` in all.
pub async fn transition(
    addr: SocketAddr,
    kind: TransitionKind,
    level: u8,
    timeout: Duration,
) -> Result<(), String> {
    let client: DevClient = Client::builder(TokioExecutor::new()).build_http();
    let deadline = tokio::time::Instant::now() + timeout;
    let (path, want) = match kind {
        TransitionKind::Sleep => (format!("/sleep?level={level}"), true),
        TransitionKind::Wake => ("/wake_up".to_string(), false),
    };
    dev_call(&client, http::Method::POST, addr, &path, timeout).await?;
    loop {
        let last = match is_sleeping(&client, addr).await {
            Ok(s) if s == want => return Ok(()),
            Ok(s) => format!("GET /is_sleeping still says {s}"),
            Err(e) => e,
        };
        if tokio::time::Instant::now() >= deadline {
            return Err(format!("{last} after {timeout:?}"));
        }
        tokio::time::sleep(READY_POLL).await;
    }
}

impl RuntimeProcess {
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// SIGTERM to the process group, then after `grace` SIGKILL to the group and to everything in
    /// the cgroup. Returns at once; the exit arrives as an event.
    pub fn stop(&self, grace: Duration) {
        self.probe.abort();
        let pgid = Pid::from_raw(self.pid as i32);
        if grace.is_zero() {
            kill_now(pgid, self.cgroup.clone());
            return;
        }
        let _ = killpg(pgid, Signal::SIGTERM);
        let mut exited = self.exited.clone();
        let cgroup = self.cgroup.clone();
        tokio::spawn(async move {
            let wait = exited.wait_for(|e| *e);
            if tokio::time::timeout(grace, wait).await.is_err() {
                tracing::warn!(
                    pid = pgid.as_raw(),
                    ?grace,
                    "runtime ignored SIGTERM; sending SIGKILL"
                );
                kill_now(pgid, cgroup);
            }
        });
    }
}

fn kill_now(pgid: Pid, cgroup: Option<RuntimeCgroup>) {
    let _ = killpg(pgid, Signal::SIGKILL);
    if let Some(cg) = cgroup {
        tokio::task::spawn_blocking(move || {
            if let Err(e) = cg.kill_all() {
                tracing::error!(error = %e, "killing the runtime's cgroup");
            }
        });
    }
}

/// A loopback port in `range` that is free now and not in `taken`.
pub fn free_port(
    model: &str,
    range: std::ops::RangeInclusive<u16>,
    taken: &[u16],
) -> Result<u16, RuntimeError> {
    let (first, last) = (*range.start(), *range.end());
    for p in range {
        if taken.contains(&p) {
            continue;
        }
        if std::net::TcpListener::bind(("127.0.0.1", p)).is_ok() {
            return Ok(p);
        }
    }
    Err(RuntimeError::NoPort {
        model: model.to_string(),
        first,
        last,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{KeepWarm, QueueConfig};
    use std::collections::BTreeMap;

    fn model(runtime: RuntimeKind, args: &[&str]) -> ModelConfig {
        ModelConfig {
            id: "m".into(),
            aliases: vec![],
            runtime,
            program: PathBuf::from("/bin/prog"),
            model_path: Some(PathBuf::from("/w/m.gguf")),
            command_args: vec![
                "--listen".into(),
                "{host}:{port}".into(),
                "{model_path}".into(),
            ],
            health_path: "/ready".into(),
            args: args.iter().map(|s| s.to_string()).collect(),
            env: BTreeMap::new(),
            memory_mb: 1,
            context_length: 4096,
            max_concurrency: 2,
            keep_warm: KeepWarm::Forever,
            min_residency: Duration::ZERO,
            start_timeout: Duration::from_secs(1),
            stop_timeout: Duration::from_secs(1),
            queue: QueueConfig {
                max: 1,
                timeout: Duration::from_secs(1),
            },
            limits: crate::config::ModelLimits {
                memory_max: crate::config::MemoryMax::Unlimited,
                memory_max_explicit: false,
                cpu_weight: None,
                cpu_quota: None,
                pids_max: None,
                cpuset: None,
                run_as: None,
            },
            vram_mb: 0,
            gpus: crate::config::GpuPlacement::Any,
            sleep: None,
        }
    }

    fn s(v: &[OsString]) -> Vec<String> {
        v.iter().map(|a| a.to_string_lossy().into_owned()).collect()
    }

    #[test]
    fn llama_cpp_argv_fills_context_and_slots_unless_given() {
        let (_, a) = argv(
            &model(RuntimeKind::LlamaCpp, &["-t", "2"]),
            41001,
            &Placement::default(),
        );
        assert_eq!(
            s(&a),
            "-m /w/m.gguf --host 127.0.0.1 --port 41001 --alias m -c 4096 -np 2 --kv-unified -t 2"
                .split(' ')
                .collect::<Vec<_>>()
        );
        let (_, a) = argv(
            &model(RuntimeKind::LlamaCpp, &["-c", "1024", "-np", "1"]),
            41001,
            &Placement::default(),
        );
        let a = s(&a);
        assert_eq!(a.iter().filter(|x| *x == "-c").count(), 1);
        assert!(!a.contains(&"--kv-unified".to_string()));
    }

    #[test]
    fn vllm_and_command_argv() {
        let (_, a) = argv(&model(RuntimeKind::Vllm, &[]), 5, &Placement::default());
        assert_eq!(
            s(&a).join(" "),
            "serve /w/m.gguf --host 127.0.0.1 --port 5 --served-model-name m --max-model-len 4096 --max-num-seqs 2"
        );
        let (p, a) = argv(
            &model(RuntimeKind::Command, &["-v"]),
            7,
            &Placement::default(),
        );
        assert_eq!(p, PathBuf::from("/bin/prog"));
        assert_eq!(s(&a).join(" "), "--listen 127.0.0.1:7 /w/m.gguf -v");
        assert_eq!(
            ready_paths(&model(RuntimeKind::Command, &[])),
            vec!["/ready"]
        );
    }

    #[test]
    fn gpu_placement_sets_utilization_parallelism_sleep_and_devices() {
        let mut m = model(RuntimeKind::Vllm, &[]);
        m.vram_mb = 40000;
        m.sleep = Some(crate::config::SleepConfig {
            level: crate::config::SleepLevel::Level1,
            memory_mb: 1,
            vram_mb: 1,
            keep_asleep: KeepWarm::Forever,
        });
        let pl = Placement {
            gpus: vec![0, 1],
            gpu_total_mb: Some(80000),
        };
        let (_, a) = argv(&m, 5, &pl);
        assert!(s(&a).join(" ").ends_with(
            "--max-num-seqs 2 --gpu-memory-utilization 0.50 --tensor-parallel-size 2 --enable-sleep-mode"
        ), "{:?}", s(&a));
        let env = placement_env(&m, &pl);
        assert!(env.contains(&("CUDA_VISIBLE_DEVICES".into(), "0,1".into())));
        assert!(env.contains(&("VLLM_SERVER_DEV_MODE".into(), "1".into())));
        // An explicit flag wins.
        let mut given = m.clone();
        given.args = vec!["--gpu-memory-utilization".into(), "0.9".into()];
        let (_, a) = argv(&given, 5, &pl);
        assert_eq!(
            s(&a)
                .iter()
                .filter(|x| *x == "--gpu-memory-utilization")
                .count(),
            1
        );

        let mut l = model(RuntimeKind::LlamaCpp, &[]);
        l.vram_mb = 500;
        let one = Placement {
            gpus: vec![0],
            gpu_total_mb: Some(80000),
        };
        let (_, a) = argv(&l, 5, &one);
        assert!(s(&a).join(" ").contains("--n-gpu-layers 999"));
        let env = placement_env(&l, &one);
        assert!(env.contains(&("GGML_VK_VISIBLE_DEVICES".into(), "0".into())));
        let (_, a) = argv(&model(RuntimeKind::LlamaCpp, &[]), 5, &one);
        assert!(
            !s(&a).join(" ").contains("--n-gpu-layers"),
            "host-only models stay on the CPU"
        );
    }

    #[test]
    fn log_tail_keeps_the_last_lines() {
        let t = LogTail::default();
        for i in 0..(LOG_LINES + 5) {
            t.push(format!("l{i}"));
        }
        let last = t.last(3);
        assert_eq!(
            last,
            vec![
                format!("l{}", LOG_LINES + 2),
                format!("l{}", LOG_LINES + 3),
                format!("l{}", LOG_LINES + 4)
            ]
        );
        assert_eq!(t.last(1000).len(), LOG_LINES);
    }
}
