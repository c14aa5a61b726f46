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

use crate::config::{ModelConfig, RuntimeKind};

/// How many lines of a runtime's output are kept for status and errors.
pub const LOG_LINES: usize = 200;
/// Readiness poll interval (llama-server answers 503 on /health while loading).
pub const READY_POLL: Duration = Duration::from_millis(10);

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
    Exited {
        model: usize,
        generation: u64,
        status: String,
    },
}

/// A spawned runtime. Dropping it does not stop the process: call [`RuntimeProcess::stop`].
#[derive(Debug)]
pub struct RuntimeProcess {
    pub pid: u32,
    pub port: u16,
    pub logs: LogTail,
    exited: watch::Receiver<bool>,
    probe: tokio::task::JoinHandle<()>,
}

/// The argv (program and arguments) for a model on `port`.
pub fn argv(m: &ModelConfig, port: u16) -> (PathBuf, Vec<OsString>) {
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

/// Spawns the runtime of model `index` on `port`; readiness and exit arrive on `events`.
pub fn spawn(
    index: usize,
    generation: u64,
    m: &ModelConfig,
    port: u16,
    events: mpsc::UnboundedSender<RuntimeEvent>,
) -> Result<RuntimeProcess, RuntimeError> {
    let (program, args) = argv(m, port);
    let mut cmd = Command::new(&program);
    cmd.args(&args)
        .envs(&m.env)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(false);
    let parent = std::process::id();
    // SAFETY: the closure runs in the forked child before exec, where only async-signal-safe calls
    // are allowed. It makes two raw syscalls (prctl(PR_SET_PDEATHSIG) and getppid) and returns an
    // io::Error built from an errno value without allocating; it touches no lock, no allocator and no
    // state shared with the parent.
    unsafe {
        cmd.pre_exec(move || {
            // If hearth dies without stopping us (kill -9), the kernel kills the runtime.
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)?;
            if nix::unistd::getppid().as_raw() as u32 != parent {
                // The parent died before the line above took effect.
                return Err(std::io::Error::from_raw_os_error(nix::libc::ESRCH));
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(|source| RuntimeError::Spawn {
        model: m.id.clone(),
        program: program.clone(),
        source,
    })?;
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
    let ev = events.clone();
    tokio::spawn(
        async move {
            let status = match child.wait().await {
                Ok(s) => s.to_string(),
                Err(e) => format!("wait failed: {e}"),
            };
            // Whatever the leader left behind in its group goes with it.
            let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
            // Report the exit only with the runtime's last words read (its pipes reach EOF once
            // the group is gone), so a failure message carries them.
            let _ = tokio::time::timeout(PUMP_DRAIN, futures_util::future::join_all(pumps)).await;
            let _ = exit_tx.send(true);
            tracing::info!(%status, "runtime exited");
            let _ = ev.send(RuntimeEvent::Exited {
                model: index,
                generation,
                status,
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
        exited,
        probe,
    })
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

impl RuntimeProcess {
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// SIGTERM to the process group, SIGKILL after `grace`. Returns at once; the exit arrives as
    /// an event.
    pub fn stop(&self, grace: Duration) {
        self.probe.abort();
        let pgid = Pid::from_raw(self.pid as i32);
        let mut exited = self.exited.clone();
        if grace.is_zero() {
            let _ = killpg(pgid, Signal::SIGKILL);
            return;
        }
        let _ = killpg(pgid, Signal::SIGTERM);
        tokio::spawn(async move {
            let wait = exited.wait_for(|e| *e);
            if tokio::time::timeout(grace, wait).await.is_err() {
                tracing::warn!(
                    pid = pgid.as_raw(),
                    ?grace,
                    "runtime ignored SIGTERM; sending SIGKILL"
                );
                let _ = killpg(pgid, Signal::SIGKILL);
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
        }
    }

    fn s(v: &[OsString]) -> Vec<String> {
        v.iter().map(|a| a.to_string_lossy().into_owned()).collect()
    }

    #[test]
    fn llama_cpp_argv_fills_context_and_slots_unless_given() {
        let (_, a) = argv(&model(RuntimeKind::LlamaCpp, &["-t", "2"]), 41001);
        assert_eq!(
            s(&a),
            "-m /w/m.gguf --host 127.0.0.1 --port 41001 --alias m -c 4096 -np 2 --kv-unified -t 2"
                .split(' ')
                .collect::<Vec<_>>()
        );
        let (_, a) = argv(
            &model(RuntimeKind::LlamaCpp, &["-c", "1024", "-np", "1"]),
            41001,
        );
        let a = s(&a);
        assert_eq!(a.iter().filter(|x| *x == "-c").count(), 1);
        assert!(!a.contains(&"--kv-unified".to_string()));
    }

    #[test]
    fn vllm_and_command_argv() {
        let (_, a) = argv(&model(RuntimeKind::Vllm, &[]), 5);
        assert_eq!(
            s(&a).join(" "),
            "serve /w/m.gguf --host 127.0.0.1 --port 5 --served-model-name m --max-model-len 4096 --max-num-seqs 2"
        );
        let (p, a) = argv(&model(RuntimeKind::Command, &["-v"]), 7);
        assert_eq!(p, PathBuf::from("/bin/prog"));
        assert_eq!(s(&a).join(" "), "--listen 127.0.0.1:7 /w/m.gguf -v");
        assert_eq!(
            ready_paths(&model(RuntimeKind::Command, &[])),
            vec!["/ready"]
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
