//! The supervisor: a single-owner actor over every model's runtime.
//!
//! All state (phases, processes, queues, in-flight counts) lives in one task. Everything else talks to
//! it through [`Supervisor`], a cheap handle that sends messages: the proxy asks for a [`Grant`] and
//! waits; runtimes report readiness and exit as events. After each message the actor builds a
//! [`Snapshot`](crate::scheduler::Snapshot), asks the pure scheduler for a plan and applies it. No
//! other code reads state to decide a mutation.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use crate::cgroup::Stats;
use crate::config::{Config, MemoryMax, ModelConfig};
use crate::confine::{Confinement, ConfinementStatus};
use crate::metrics::{Metrics, ModelGauges};
use crate::runtime::{self, RuntimeEvent, RuntimeProcess};
use crate::scheduler::{
    self, Action, EvictReason, ModelView, Phase, Policy, Queued, Snapshot, Ticket,
};

/// Log lines quoted in errors.
const ERROR_LOG_LINES: usize = 12;
/// Backoff after consecutive failures: 0.5 s doubling up to 30 s.
fn backoff(attempts: u32) -> Duration {
    let ms = 500u64.saturating_mul(1 << attempts.saturating_sub(1).min(6));
    Duration::from_millis(ms.min(30_000))
}

/// Why a request got no runtime.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AcquireError {
    #[error("model {model}: queue is full ({max} requests waiting)")]
    QueueFull { model: String, max: usize },
    #[error(
        "model {model}: waited {waited:.1?} in the queue without being served (queue.timeout)"
    )]
    QueueTimeout { model: String, waited: Duration },
    #[error("model {model}: {reason}{}", fmt_logs(.logs))]
    StartFailed {
        model: String,
        reason: String,
        logs: Vec<String>,
        retry_after: Duration,
    },
    #[error("hearth is shutting down")]
    ShuttingDown,
}

fn fmt_logs(logs: &[String]) -> String {
    if logs.is_empty() {
        String::new()
    } else {
        format!("; last runtime output:\n{}", logs.join("\n"))
    }
}

/// Permission to forward one request to a ready runtime. Dropping it (when the response body is
/// finished or abandoned) frees the slot.
#[derive(Debug)]
pub struct Grant {
    pub addr: SocketAddr,
    /// Why the runtime died, once known: an in-flight request that loses its runtime quotes it.
    pub fate: tokio::sync::watch::Receiver<Option<String>>,
    _guard: ReleaseGuard,
}

impl Grant {
    /// Waits up to `wait` for the reason the runtime died (OOM, exit status).
    pub async fn death_reason(&self, wait: Duration) -> Option<String> {
        let mut rx = self.fate.clone();
        let r = tokio::time::timeout(wait, rx.wait_for(Option::is_some)).await;
        match r {
            Ok(Ok(v)) => v.clone(),
            _ => None,
        }
    }
}

#[derive(Debug)]
struct ReleaseGuard {
    tx: mpsc::UnboundedSender<Msg>,
    model: usize,
}

impl Drop for ReleaseGuard {
    fn drop(&mut self) {
        let _ = self.tx.send(Msg::Release { model: self.model });
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct PoolStatus {
    pub name: String,
    pub capacity_mb: u64,
    pub used_mb: u64,
}

/// A running runtime's cgroup, as `hearth status` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct CgroupStatus {
    pub path: Vec<std::path::PathBuf>,
    pub memory_current_bytes: Option<u64>,
    pub memory_peak_bytes: Option<u64>,
    pub memory_limit_bytes: Option<u64>,
    /// Proportional set size of its processes (mmap'd weights included).
    pub resident_bytes: Option<u64>,
    pub cpu_seconds: Option<f64>,
    pub pids: Option<u64>,
    pub oom_kills: Option<u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ModelStatus {
    pub id: String,
    pub aliases: Vec<String>,
    pub runtime: &'static str,
    pub state: &'static str,
    pub pid: Option<u32>,
    pub port: Option<u16>,
    pub memory_mb: u64,
    /// The most memory a run of this model was seen to use (cgroup), in MB.
    pub memory_observed_mb: Option<u64>,
    /// What the scheduler accounts for it: the larger of declared and observed.
    pub memory_accounted_mb: u64,
    /// Set when the model uses more than its declared `memory_mb`.
    pub memory_warning: Option<String>,
    /// The user the runtime runs (or would run) as.
    pub user: Option<String>,
    pub cgroup: Option<CgroupStatus>,
    pub oom_kills_total: u64,
    pub context_length: u32,
    pub max_concurrency: u32,
    pub in_flight: u32,
    pub queue_depth: usize,
    pub starts_total: u64,
    pub failures_total: u64,
    pub last_load_seconds: Option<f64>,
    pub idle_seconds: Option<f64>,
    pub last_error: Option<String>,
    pub retry_in_seconds: Option<f64>,
    pub log_tail: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct StatusReport {
    pub version: &'static str,
    pub uptime_seconds: f64,
    pub confinement: ConfinementStatus,
    /// The gateway sensor's state (filled in by the admin API, which also holds the sensor).
    pub sensor: Option<crate::sensor::SensorStatus>,
    pub pools: Vec<PoolStatus>,
    pub models: Vec<ModelStatus>,
}

#[derive(Debug)]
enum Msg {
    Acquire {
        model: usize,
        ticket: Ticket,
        reply: oneshot::Sender<Result<Grant, AcquireError>>,
    },
    Cancel {
        model: usize,
        ticket: Ticket,
    },
    Release {
        model: usize,
    },
    Status {
        reply: oneshot::Sender<StatusReport>,
    },
    Load {
        model: usize,
    },
    Unload {
        model: usize,
    },
    Shutdown {
        reply: oneshot::Sender<()>,
    },
}

/// Handle to the supervisor actor.
#[derive(Clone)]
pub struct Supervisor {
    tx: mpsc::UnboundedSender<Msg>,
    tickets: Arc<AtomicU64>,
}

/// A request waiting in the queue; leaving it (dropped future) cancels the ticket.
struct Pending {
    tx: mpsc::UnboundedSender<Msg>,
    model: usize,
    ticket: Ticket,
    done: bool,
}

impl Drop for Pending {
    fn drop(&mut self) {
        if !self.done {
            let _ = self.tx.send(Msg::Cancel {
                model: self.model,
                ticket: self.ticket,
            });
        }
    }
}

impl Supervisor {
    /// Starts the actor.
    pub fn start(
        config: Arc<Config>,
        confinement: Arc<Confinement>,
        metrics: Metrics,
        policy: Box<dyn Policy>,
    ) -> Supervisor {
        let (tx, rx) = mpsc::unbounded_channel();
        let (ev_tx, ev_rx) = mpsc::unbounded_channel();
        let actor = Actor::new(config, confinement, metrics, policy, tx.clone(), ev_tx);
        tokio::spawn(actor.run(rx, ev_rx));
        Supervisor {
            tx,
            tickets: Arc::new(AtomicU64::new(1)),
        }
    }

    /// Waits until model `model` (an index into the config's models) can take one more request.
    /// Dropping the returned future leaves the queue at once.
    pub async fn acquire(&self, model: usize) -> Result<Grant, AcquireError> {
        let ticket = self.tickets.fetch_add(1, Ordering::Relaxed);
        let (reply, rx) = oneshot::channel();
        let mut pending = Pending {
            tx: self.tx.clone(),
            model,
            ticket,
            done: false,
        };
        if self
            .tx
            .send(Msg::Acquire {
                model,
                ticket,
                reply,
            })
            .is_err()
        {
            pending.done = true;
            return Err(AcquireError::ShuttingDown);
        }
        let r = rx.await;
        pending.done = true;
        r.unwrap_or(Err(AcquireError::ShuttingDown))
    }

    pub async fn status(&self) -> Option<StatusReport> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Msg::Status { reply }).ok()?;
        rx.await.ok()
    }

    /// Asks for model `model` to be loaded now (it still waits for memory like any request).
    pub fn load(&self, model: usize) -> bool {
        self.tx.send(Msg::Load { model }).is_ok()
    }

    /// Asks for model `model` to be drained and stopped.
    pub fn unload(&self, model: usize) -> bool {
        self.tx.send(Msg::Unload { model }).is_ok()
    }

    /// Stops every runtime and waits until they have exited.
    pub async fn shutdown(&self) {
        let (reply, rx) = oneshot::channel();
        if self.tx.send(Msg::Shutdown { reply }).is_ok() {
            let _ = rx.await;
        }
    }
}

struct Failure {
    reason: String,
    metric: &'static str,
    logs: Vec<String>,
    /// The runtime never became ready: the waiting requests fail and the backoff grows.
    during_start: bool,
}

struct ModelState {
    cfg: ModelConfig,
    phase: Phase,
    generation: u64,
    proc: Option<RuntimeProcess>,
    last_logs: runtime::LogTail,
    queue: Vec<Queued>,
    replies: HashMap<Ticket, oneshot::Sender<Result<Grant, AcquireError>>>,
    in_flight: u32,
    last_used: Option<Instant>,
    ready_since: Option<Instant>,
    drain_since: Option<Instant>,
    spawned_at: Option<Instant>,
    start_deadline: Option<Instant>,
    retry_at: Option<Instant>,
    attempts: u32,
    /// Recorded when a stop is a failure (start timeout): applied at exit.
    pending_failure: Option<Failure>,
    last_error: Option<String>,
    starts: u64,
    failures: u64,
    last_load: Option<Duration>,
    load_requested: Option<Instant>,
    unload_requested: bool,
    /// The latest cgroup reading of the running runtime.
    stats: Option<Stats>,
    /// CPU seconds of the current run already added to the counter.
    cpu_counted: f64,
    /// The most memory a ready run was seen to use, in MB (kept across runs).
    observed_mb: u64,
    memory_warning: Option<String>,
    oom_kills: u64,
    /// OOM kills the monitor reported for the current run (the exit's own count may miss them).
    run_oom_kills: u64,
    resident_bytes: Option<u64>,
}

impl ModelState {
    /// What the scheduler accounts: the declared size, or more once a run was seen using more.
    fn accounted_mb(&self) -> u64 {
        self.cfg.memory_mb.max(self.observed_mb)
    }
}

struct Actor {
    config: Arc<Config>,
    confinement: Arc<Confinement>,
    metrics: Metrics,
    gauges: Vec<ModelGauges>,
    pool_used: prometheus::IntGauge,
    policy: Box<dyn Policy>,
    models: Vec<ModelState>,
    tx: mpsc::UnboundedSender<Msg>,
    events: mpsc::UnboundedSender<RuntimeEvent>,
    started: Instant,
    shutting_down: Option<Vec<oneshot::Sender<()>>>,
    wake_at: Option<Instant>,
}

impl Actor {
    fn new(
        config: Arc<Config>,
        confinement: Arc<Confinement>,
        metrics: Metrics,
        policy: Box<dyn Policy>,
        tx: mpsc::UnboundedSender<Msg>,
        events: mpsc::UnboundedSender<RuntimeEvent>,
    ) -> Actor {
        let models = config
            .models
            .iter()
            .map(|m| ModelState {
                cfg: m.clone(),
                phase: Phase::Cold,
                generation: 0,
                proc: None,
                last_logs: runtime::LogTail::default(),
                queue: Vec::new(),
                replies: HashMap::new(),
                in_flight: 0,
                last_used: None,
                ready_since: None,
                drain_since: None,
                spawned_at: None,
                start_deadline: None,
                retry_at: None,
                attempts: 0,
                pending_failure: None,
                last_error: None,
                starts: 0,
                failures: 0,
                last_load: None,
                load_requested: None,
                unload_requested: false,
                stats: None,
                cpu_counted: 0.0,
                observed_mb: 0,
                memory_warning: None,
                oom_kills: 0,
                run_oom_kills: 0,
                resident_bytes: None,
            })
            .collect();
        let cg = confinement.status().cgroups.clone();
        let switch = if confinement.status().privileged {
            "yes"
        } else {
            "no"
        };
        metrics.confinement.with_label_values(&[&cg, switch]).set(1);
        let confined = confinement.hierarchy().is_some();
        for m in &config.models {
            let l = &m.limits;
            let id = m.id.as_str();
            let mem = match (confined, l.memory_max) {
                (true, MemoryMax::Mb(mb)) => (mb * 1024 * 1024) as i64,
                _ => 0,
            };
            metrics
                .runtime_memory_limit
                .with_label_values(&[id])
                .set(mem);
            let quota = l.cpu_quota.filter(|_| confined).unwrap_or(0.0);
            metrics
                .runtime_cpu_quota
                .with_label_values(&[id])
                .set(quota);
            let pids = l.pids_max.filter(|_| confined).unwrap_or(0);
            metrics
                .runtime_pids_limit
                .with_label_values(&[id])
                .set(pids as i64);
        }
        metrics
            .pool_capacity
            .with_label_values(&["host"])
            .set((config.resources.host_memory_mb * 1024 * 1024) as i64);
        let gauges: Vec<ModelGauges> = config
            .models
            .iter()
            .map(|m| {
                let g = metrics.model_gauges(&m.id);
                g.set_state(Phase::Cold);
                g
            })
            .collect();
        let pool_used = metrics.pool_used.with_label_values(&["host"]);
        Actor {
            config,
            confinement,
            metrics,
            gauges,
            pool_used,
            policy,
            models,
            tx,
            events,
            started: Instant::now(),
            shutting_down: None,
            wake_at: None,
        }
    }

    async fn run(
        mut self,
        mut rx: mpsc::UnboundedReceiver<Msg>,
        mut ev: mpsc::UnboundedReceiver<RuntimeEvent>,
    ) {
        let mut handles_gone = false;
        loop {
            let sleep = async {
                match self.wake_at {
                    Some(t) => tokio::time::sleep_until(t.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                msg = rx.recv(), if !handles_gone => match msg {
                    Some(m) => self.on_msg(m),
                    // Every handle is gone: the daemon is exiting.
                    None => {
                        handles_gone = true;
                        self.begin_shutdown(None);
                    }
                },
                Some(e) = ev.recv() => self.on_event(e),
                _ = sleep => {}
            }
            self.schedule();
            self.publish();
            if let Some(waiters) = &mut self.shutting_down {
                if self.models.iter().all(|m| m.proc.is_none()) {
                    for w in waiters.drain(..) {
                        let _ = w.send(());
                    }
                    if handles_gone {
                        return;
                    }
                }
            }
        }
    }

    fn on_msg(&mut self, msg: Msg) {
        match msg {
            Msg::Acquire {
                model,
                ticket,
                reply,
            } => {
                let now = Instant::now();
                let Some(m) = self.models.get_mut(model) else {
                    let _ = reply.send(Err(AcquireError::ShuttingDown));
                    return;
                };
                if self.shutting_down.is_some() {
                    let _ = reply.send(Err(AcquireError::ShuttingDown));
                    return;
                }
                if !scheduler::accepts_request(&Self::view(m), m.cfg.queue.max) {
                    let _ = reply.send(Err(AcquireError::QueueFull {
                        model: m.cfg.id.clone(),
                        max: m.cfg.queue.max,
                    }));
                    return;
                }
                m.queue.push(Queued {
                    ticket,
                    enqueued: now,
                    deadline: now + m.cfg.queue.timeout,
                });
                m.replies.insert(ticket, reply);
            }
            Msg::Cancel { model, ticket } => {
                if let Some(m) = self.models.get_mut(model) {
                    if m.replies.remove(&ticket).is_some() {
                        m.queue.retain(|q| q.ticket != ticket);
                        tracing::debug!(model = %m.cfg.id, ticket, "request left the queue");
                    }
                }
            }
            Msg::Release { model } => {
                if let Some(m) = self.models.get_mut(model) {
                    m.in_flight = m.in_flight.saturating_sub(1);
                    m.last_used = Some(Instant::now());
                }
            }
            Msg::Status { reply } => {
                let _ = reply.send(self.report());
            }
            Msg::Load { model } => {
                if let Some(m) = self.models.get_mut(model) {
                    m.unload_requested = false;
                    if matches!(m.phase, Phase::Cold | Phase::Failed | Phase::Stopping) {
                        m.load_requested.get_or_insert_with(Instant::now);
                    }
                }
            }
            Msg::Unload { model } => {
                if let Some(m) = self.models.get_mut(model) {
                    m.load_requested = None;
                    if matches!(m.phase, Phase::Ready | Phase::Draining | Phase::Starting) {
                        m.unload_requested = true;
                    }
                }
            }
            Msg::Shutdown { reply } => self.begin_shutdown(Some(reply)),
        }
    }

    fn begin_shutdown(&mut self, reply: Option<oneshot::Sender<()>>) {
        let first = self.shutting_down.is_none();
        let waiters = self.shutting_down.get_or_insert_with(Vec::new);
        waiters.extend(reply);
        if !first {
            return;
        }
        tracing::info!("stopping every runtime");
        for m in &mut self.models {
            for (_, r) in m.replies.drain() {
                let _ = r.send(Err(AcquireError::ShuttingDown));
            }
            m.queue.clear();
            m.load_requested = None;
            if let Some(p) = &m.proc {
                p.stop(m.cfg.stop_timeout);
                m.phase = Phase::Stopping;
            }
        }
    }

    fn on_event(&mut self, ev: RuntimeEvent) {
        let now = Instant::now();
        match ev {
            RuntimeEvent::Ready { model, generation } => {
                let Some(m) = self.models.get_mut(model) else {
                    return;
                };
                if m.generation != generation || m.phase != Phase::Starting {
                    return;
                }
                let load = m.spawned_at.map(|t| now - t).unwrap_or_default();
                tracing::info!(model = %m.cfg.id, load_seconds = load.as_secs_f64(), "runtime ready");
                self.metrics
                    .load_duration
                    .with_label_values(&[&m.cfg.id])
                    .observe(load.as_secs_f64());
                m.phase = Phase::Ready;
                m.ready_since = Some(now);
                m.last_load = Some(load);
                m.start_deadline = None;
                m.attempts = 0;
                m.retry_at = None;
                m.load_requested = None;
            }
            RuntimeEvent::Stats {
                model,
                generation,
                stats,
                resident_bytes,
            } => self.on_stats(model, generation, stats, resident_bytes),
            RuntimeEvent::Oom {
                model,
                generation,
                kills,
            } => {
                let Some(m) = self.models.get_mut(model) else {
                    return;
                };
                if m.generation != generation {
                    return;
                }
                m.run_oom_kills = m.run_oom_kills.max(kills);
                if m.pending_failure.is_some() {
                    return;
                }
                let Some(p) = &m.proc else { return };
                // Part of the runtime is gone; whatever is left cannot be trusted to serve.
                tracing::warn!(model = %m.cfg.id, kills, "OOM kill in the runtime's cgroup: stopping it");
                m.pending_failure = Some(Failure {
                    reason: runtime::oom_reason(oom_limit(&m.cfg)),
                    metric: "oom",
                    logs: p.logs.last(ERROR_LOG_LINES),
                    during_start: true,
                });
                p.stop(Duration::ZERO);
                m.phase = Phase::Stopping;
                m.start_deadline = None;
            }
            RuntimeEvent::Exited {
                model,
                generation,
                status,
                oom_kills,
            } => {
                let Some(m) = self.models.get_mut(model) else {
                    return;
                };
                if m.generation != generation {
                    return;
                }
                m.stats = None;
                m.resident_bytes = None;
                // The larger of the exit's count and what the monitor saw during the run.
                let oom_kills = oom_kills.max(std::mem::take(&mut m.run_oom_kills));
                let g = &self.gauges[model];
                g.runtime_memory.set(0);
                g.runtime_memory_peak.set(0);
                g.runtime_pids.set(0);
                if oom_kills > 0 {
                    m.oom_kills += oom_kills;
                    self.metrics
                        .oom_kills
                        .with_label_values(&[&m.cfg.id])
                        .inc_by(oom_kills);
                }
                let logs = m
                    .proc
                    .as_ref()
                    .map(|p| p.logs.last(ERROR_LOG_LINES))
                    .unwrap_or_default();
                if let Some(p) = m.proc.take() {
                    m.last_logs = p.logs;
                }
                let was = m.phase;
                let failure = match (was, m.pending_failure.take()) {
                    (_, Some(f)) => Some(f),
                    // An OOM kill the monitor had not reported yet: the same failure.
                    (_, None) if oom_kills > 0 => Some(Failure {
                        reason: runtime::oom_reason(oom_limit(&m.cfg)),
                        metric: "oom",
                        logs,
                        during_start: true,
                    }),
                    (Phase::Starting, None) => Some(Failure {
                        reason: format!("runtime exited before it was ready ({status})"),
                        metric: "start_failed",
                        logs,
                        during_start: true,
                    }),
                    (Phase::Ready | Phase::Draining, None) => Some(Failure {
                        reason: format!("runtime exited unexpectedly ({status})"),
                        metric: "crashed",
                        logs,
                        during_start: false,
                    }),
                    _ => None,
                };
                m.ready_since = None;
                m.drain_since = None;
                m.start_deadline = None;
                m.unload_requested = false;
                match failure {
                    None => {
                        tracing::info!(model = %m.cfg.id, %status, "runtime stopped");
                        m.phase = Phase::Cold;
                    }
                    Some(f) => self.fail(model, f, now),
                }
            }
        }
    }

    fn on_stats(&mut self, i: usize, generation: u64, stats: Stats, resident: Option<u64>) {
        let Some(m) = self.models.get_mut(i) else {
            return;
        };
        if m.generation != generation || m.proc.is_none() {
            return;
        }
        let g = &self.gauges[i];
        if let Some(c) = stats.memory_current_bytes {
            g.runtime_memory.set(c as i64);
        }
        // What the model really holds: the cgroup's charge, or its processes' resident pages when
        // larger (mmap'd weights cached before are resident but charged to another cgroup).
        let used = match (stats.memory_current_bytes, resident) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        m.resident_bytes = resident;
        if let Some(cur) = used {
            // Only a ready runtime's usage counts as what the model uses (a start reads weights
            // through the page cache in bursts).
            if matches!(m.phase, Phase::Ready | Phase::Draining) {
                let mb = cur.div_ceil(1024 * 1024);
                if mb > m.observed_mb {
                    m.observed_mb = mb;
                    if mb > m.cfg.memory_mb {
                        let w = format!(
                            "uses {mb} MB, more than its declared memory_mb = {}: accounted as {mb} MB",
                            m.cfg.memory_mb
                        );
                        if m.memory_warning.is_none() {
                            tracing::warn!(model = %m.cfg.id, observed_mb = mb, declared_mb = m.cfg.memory_mb, "model uses more memory than declared; scheduling with what it uses");
                        }
                        m.memory_warning = Some(w);
                    }
                }
            }
        }
        if let Some(peak) = stats.memory_peak_bytes {
            g.runtime_memory_peak.set(peak as i64);
        }
        if let Some(p) = stats.pids_current {
            g.runtime_pids.set(p as i64);
        }
        if let Some(cpu) = stats.cpu_usage_seconds {
            if cpu > m.cpu_counted {
                g.runtime_cpu.inc_by(cpu - m.cpu_counted);
                m.cpu_counted = cpu;
            }
        }
        m.stats = Some(stats);
    }

    /// Puts model `i` in `failed`. A failed start fails the requests waiting for it; after a crash
    /// of a ready runtime they stay queued for the restart.
    fn fail(&mut self, i: usize, f: Failure, now: Instant) {
        let during_start = f.during_start;
        let m = &mut self.models[i];
        m.attempts = if during_start { m.attempts + 1 } else { 1 };
        let wait = backoff(m.attempts);
        m.retry_at = Some(now + wait);
        m.phase = Phase::Failed;
        m.failures += 1;
        self.metrics
            .failures
            .with_label_values(&[&m.cfg.id, f.metric])
            .inc();
        let full = fmt_logs(&f.logs);
        tracing::warn!(model = %m.cfg.id, reason = %f.reason, retry_in = ?wait, "runtime failed{full}");
        m.last_error = Some(format!("{}{}", f.reason, full));
        if during_start {
            let err = AcquireError::StartFailed {
                model: m.cfg.id.clone(),
                reason: f.reason,
                logs: f.logs,
                retry_after: wait,
            };
            for (_, r) in m.replies.drain() {
                let _ = r.send(Err(err.clone()));
            }
            m.queue.clear();
            m.load_requested = None;
        }
    }

    fn view(m: &ModelState) -> ModelView<'_> {
        ModelView {
            id: &m.cfg.id,
            phase: m.phase,
            memory_mb: m.accounted_mb(),
            in_flight: m.in_flight,
            max_concurrency: m.cfg.max_concurrency,
            queue: &m.queue,
            last_used: m.last_used,
            ready_since: m.ready_since,
            drain_since: m.drain_since,
            start_deadline: m.start_deadline,
            retry_at: m.retry_at,
            keep_warm: m.cfg.keep_warm,
            min_residency: m.cfg.min_residency,
            load_requested: m.load_requested,
            unload_requested: m.unload_requested,
        }
    }

    fn snapshot(&self, now: Instant) -> Snapshot<'_> {
        Snapshot {
            now,
            pool_mb: self.config.resources.host_memory_mb,
            models: self.models.iter().map(Self::view).collect(),
        }
    }

    fn schedule(&mut self) {
        if self.shutting_down.is_some() {
            self.wake_at = None;
            return;
        }
        for _ in 0..4 {
            let now = Instant::now();
            let plan = scheduler::plan(&self.snapshot(now), self.policy.as_ref());
            self.wake_at = plan.wake_at;
            if plan.actions.is_empty() {
                return;
            }
            for a in plan.actions {
                self.apply(a, now);
            }
        }
    }

    fn apply(&mut self, action: Action, now: Instant) {
        match action {
            Action::Admit { model, ticket } => {
                let m = &mut self.models[model];
                m.queue.retain(|q| q.ticket != ticket);
                let Some(reply) = m.replies.remove(&ticket) else {
                    return;
                };
                let Some(p) = &m.proc else { return };
                m.in_flight += 1;
                m.last_used = Some(now);
                let grant = Grant {
                    addr: p.addr(),
                    fate: p.fate.clone(),
                    _guard: ReleaseGuard {
                        tx: self.tx.clone(),
                        model,
                    },
                };
                // If the client is gone, the returned grant is dropped here and releases its slot.
                let _ = reply.send(Ok(grant));
            }
            Action::Expire { model, ticket } => {
                let m = &mut self.models[model];
                let waited = m
                    .queue
                    .iter()
                    .find(|q| q.ticket == ticket)
                    .map(|q| now - q.enqueued)
                    .unwrap_or_default();
                m.queue.retain(|q| q.ticket != ticket);
                if let Some(r) = m.replies.remove(&ticket) {
                    tracing::info!(model = %m.cfg.id, ?waited, "queued request timed out");
                    let _ = r.send(Err(AcquireError::QueueTimeout {
                        model: m.cfg.id.clone(),
                        waited,
                    }));
                }
            }
            Action::Start { model } => self.start(model, now),
            Action::Stop { model, reason } => {
                let m = &mut self.models[model];
                if let Some(p) = &m.proc {
                    tracing::info!(model = %m.cfg.id, reason = reason.as_str(), "stopping runtime");
                    p.stop(m.cfg.stop_timeout);
                    m.phase = Phase::Stopping;
                    if reason != EvictReason::Admin || m.ready_since.is_some() {
                        self.metrics
                            .evictions
                            .with_label_values(&[&m.cfg.id, reason.as_str()])
                            .inc();
                    }
                } else {
                    m.phase = Phase::Cold;
                }
            }
            Action::Drain { model } => {
                let m = &mut self.models[model];
                tracing::info!(model = %m.cfg.id, in_flight = m.in_flight, "draining: another model needs the memory");
                m.phase = Phase::Draining;
                m.drain_since = Some(now);
            }
            Action::Resume { model } => {
                let m = &mut self.models[model];
                tracing::info!(model = %m.cfg.id, "resuming: memory no longer needed");
                m.phase = Phase::Ready;
                m.drain_since = None;
            }
            Action::StartTimedOut { model } => {
                let m = &mut self.models[model];
                let logs = m
                    .proc
                    .as_ref()
                    .map(|p| p.logs.last(ERROR_LOG_LINES))
                    .unwrap_or_default();
                m.pending_failure = Some(Failure {
                    reason: format!(
                        "runtime not ready after {:?} (start_timeout)",
                        m.cfg.start_timeout
                    ),
                    metric: "start_timeout",
                    logs,
                    during_start: true,
                });
                if let Some(p) = &m.proc {
                    p.stop(Duration::ZERO);
                }
                m.phase = Phase::Stopping;
                m.start_deadline = None;
            }
        }
    }

    fn start(&mut self, i: usize, now: Instant) {
        let taken: Vec<u16> = self
            .models
            .iter()
            .filter_map(|m| m.proc.as_ref().map(|p| p.port))
            .collect();
        let range = self.config.server.runtime_ports.clone();
        let m = &mut self.models[i];
        let restart = m.phase == Phase::Failed;
        m.generation += 1;
        m.cpu_counted = 0.0;
        let spawned = runtime::free_port(&m.cfg.id, range, &taken)
            .map_err(|e| e.to_string())
            .and_then(|port| {
                let sandbox = self.confinement.sandbox(i, &m.cfg)?;
                runtime::spawn(i, m.generation, &m.cfg, port, sandbox, self.events.clone())
                    .map_err(|e| e.to_string())
            });
        match spawned {
            Ok(p) => {
                let cgroup = p
                    .cgroup
                    .as_ref()
                    .and_then(|c| c.dirs().first().map(|d| d.display().to_string()));
                let user = p.user.as_ref().map(|u| u.user.as_str());
                tracing::info!(model = %m.cfg.id, pid = p.pid, port = p.port, cgroup, user, "runtime starting");
                m.proc = Some(p);
                m.phase = Phase::Starting;
                m.spawned_at = Some(now);
                m.start_deadline = Some(now + m.cfg.start_timeout);
                m.starts += 1;
                self.metrics.starts.with_label_values(&[&m.cfg.id]).inc();
                if restart {
                    self.metrics.restarts.with_label_values(&[&m.cfg.id]).inc();
                }
            }
            Err(e) => {
                let f = Failure {
                    reason: e,
                    metric: "start_failed",
                    logs: Vec::new(),
                    during_start: true,
                };
                self.fail(i, f, now);
            }
        }
    }

    fn publish(&self) {
        let mut used = 0;
        for (m, g) in self.models.iter().zip(&self.gauges) {
            g.set_state(m.phase);
            let mem = if m.phase.holds_memory() {
                m.accounted_mb()
            } else {
                0
            };
            used += mem;
            g.memory.set((mem * 1024 * 1024) as i64);
            g.queue_depth.set(m.queue.len() as i64);
            g.in_flight.set(i64::from(m.in_flight));
        }
        self.pool_used.set((used * 1024 * 1024) as i64);
    }

    fn report(&self) -> StatusReport {
        let now = Instant::now();
        let snap = self.snapshot(now);
        StatusReport {
            version: env!("CARGO_PKG_VERSION"),
            uptime_seconds: (now - self.started).as_secs_f64(),
            confinement: self.confinement.status().clone(),
            sensor: None,
            pools: vec![PoolStatus {
                name: "host".into(),
                capacity_mb: self.config.resources.host_memory_mb,
                used_mb: snap.used_mb(),
            }],
            models: self
                .models
                .iter()
                .enumerate()
                .map(|(i, m)| ModelStatus {
                    id: m.cfg.id.clone(),
                    aliases: m.cfg.aliases.clone(),
                    runtime: m.cfg.runtime.as_str(),
                    state: m.phase.as_str(),
                    pid: m.proc.as_ref().map(|p| p.pid),
                    port: m.proc.as_ref().map(|p| p.port),
                    memory_mb: m.cfg.memory_mb,
                    memory_observed_mb: (m.observed_mb > 0).then_some(m.observed_mb),
                    memory_accounted_mb: m.accounted_mb(),
                    memory_warning: m.memory_warning.clone(),
                    user: m
                        .proc
                        .as_ref()
                        .and_then(|p| p.user.as_ref())
                        .or(self.confinement.user_of(i))
                        .map(|u| format!("{} (uid {})", u.user, u.uid)),
                    cgroup: m.proc.as_ref().and_then(|p| p.cgroup.as_ref()).map(|c| {
                        let st = m.stats.clone().unwrap_or_default();
                        CgroupStatus {
                            path: c.dirs(),
                            memory_current_bytes: st.memory_current_bytes,
                            memory_peak_bytes: st.memory_peak_bytes,
                            memory_limit_bytes: st.memory_limit_bytes,
                            resident_bytes: m.resident_bytes,
                            cpu_seconds: st.cpu_usage_seconds,
                            pids: st.pids_current,
                            oom_kills: st.oom_kills,
                        }
                    }),
                    oom_kills_total: m.oom_kills,
                    context_length: m.cfg.context_length,
                    max_concurrency: m.cfg.max_concurrency,
                    in_flight: m.in_flight,
                    queue_depth: m.queue.len(),
                    starts_total: m.starts,
                    failures_total: m.failures,
                    last_load_seconds: m.last_load.map(|d| d.as_secs_f64()),
                    idle_seconds: match m.phase {
                        Phase::Ready | Phase::Draining if m.in_flight == 0 => m
                            .last_used
                            .or(m.ready_since)
                            .map(|t| (now - t).as_secs_f64()),
                        _ => None,
                    },
                    last_error: m.last_error.clone(),
                    retry_in_seconds: match (m.phase, m.retry_at) {
                        (Phase::Failed, Some(t)) if t > now => Some((t - now).as_secs_f64()),
                        _ => None,
                    },
                    log_tail: m
                        .proc
                        .as_ref()
                        .map(|p| &p.logs)
                        .unwrap_or(&m.last_logs)
                        .last(20),
                })
                .collect(),
        }
    }
}

/// The memory limit quoted in a model's OOM failure.
fn oom_limit(m: &ModelConfig) -> Option<u64> {
    match m.limits.memory_max {
        MemoryMax::Mb(mb) => Some(mb),
        MemoryMax::Unlimited => None,
    }
}

impl AcquireError {
    /// When a client may usefully retry.
    pub fn retry_after(&self) -> Duration {
        match self {
            AcquireError::QueueFull { .. } => Duration::from_secs(2),
            AcquireError::QueueTimeout { .. } => Duration::from_secs(5),
            AcquireError::StartFailed { retry_after, .. } => *retry_after,
            AcquireError::ShuttingDown => Duration::from_secs(5),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        assert_eq!(backoff(1), Duration::from_millis(500));
        assert_eq!(backoff(2), Duration::from_secs(1));
        assert_eq!(backoff(3), Duration::from_secs(2));
        assert_eq!(backoff(20), Duration::from_secs(30));
    }
}
