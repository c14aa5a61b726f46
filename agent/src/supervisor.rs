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
use tokio::sync::{mpsc, oneshot, watch};

use crate::cgroup::Stats;
use crate::config::{Config, GpuPlacement, MemoryMax, ModelConfig};
use crate::confine::{Confinement, ConfinementStatus};
use crate::gpu::{GpuPool, GpuReading, GpuSetup};
use crate::metrics::{Metrics, ModelGauges};
use crate::runtime::{self, Placement, RuntimeEvent, RuntimeProcess, TransitionKind};
use crate::scheduler::{
    self, Action, EvictReason, Footprint, ModelView, Phase, Policy, Pool, Queued, Snapshot, Ticket,
    Tier, HOST,
};

/// How long after a model fell asleep its readings count as what it holds asleep (a reading taken
/// while it was going to sleep can arrive after the transition).
const ASLEEP_SETTLE: Duration = Duration::from_secs(2);
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

/// One GPU process NVML reports, and the model it belongs to.
#[derive(Debug, Clone, Serialize)]
pub struct GpuProcessStatus {
    pub pid: u32,
    pub used_bytes: u64,
    pub model: Option<String>,
}

/// One GPU pool, as `hearth status` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct GpuStatus {
    pub index: u32,
    pub name: String,
    pub uuid: Option<String>,
    pub source: crate::gpu::Source,
    pub memory_total_bytes: u64,
    /// What hearth may schedule there now: total - gpu_reserve_mb - foreign use.
    pub budget_bytes: u64,
    /// What the scheduler accounts to models there.
    pub used_bytes: u64,
    /// What NVML reports in use (every process and the driver); `None` without NVML.
    pub measured_used_bytes: Option<u64>,
    /// Memory in use that is not hearth's runtimes (NVML).
    pub foreign_bytes: Option<u64>,
    pub processes: Vec<GpuProcessStatus>,
}

/// The GPU side of status.
#[derive(Debug, Clone, Serialize)]
pub struct GpuSummary {
    /// How the GPUs were found, or why NVML is not used.
    pub reason: String,
    pub measured: bool,
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
    /// What the scheduler accounts for it in host RAM: the larger of declared and observed (asleep:
    /// what it holds asleep).
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
    /// Where its memory is: hot, sleeping or cold.
    pub tier: &'static str,
    /// The GPUs it is placed on (while it holds memory).
    pub gpus: Vec<u32>,
    /// Declared VRAM (`vram_mb`), per GPU.
    pub vram_mb: u64,
    /// The most VRAM a ready run was seen to use on one GPU (NVML), in MB.
    pub vram_observed_mb: Option<u64>,
    /// What the scheduler accounts on each placed GPU now, in bytes.
    pub vram_bytes: u64,
    /// What its processes use on the GPUs now (NVML), in bytes.
    pub vram_used_bytes: Option<u64>,
    pub vram_warning: Option<String>,
    /// vLLM sleep level (1 or 2) when sleep mode is on.
    pub sleep_level: Option<u8>,
    /// Host RAM and VRAM accounted while asleep (MB).
    pub asleep_memory_mb: Option<u64>,
    pub asleep_vram_mb: Option<u64>,
    pub sleeps_total: u64,
    pub wakes_total: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct StatusReport {
    pub version: &'static str,
    pub uptime_seconds: f64,
    pub confinement: ConfinementStatus,
    /// The gateway sensor's state (filled in by the admin API, which also holds the sensor).
    pub sensor: Option<crate::sensor::SensorStatus>,
    pub pools: Vec<PoolStatus>,
    pub gpu: GpuSummary,
    pub gpus: Vec<GpuStatus>,
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
    Sleep {
        model: usize,
        reply: oneshot::Sender<Result<(), String>>,
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
        gpus: GpuSetup,
    ) -> Supervisor {
        let (tx, rx) = mpsc::unbounded_channel();
        let (ev_tx, ev_rx) = mpsc::unbounded_channel();
        let gpu_rx = gpus
            .nvml
            .map(|n| n.spawn_poller(config.resources.gpu_poll_interval));
        let actor = Actor::new(
            config,
            confinement,
            metrics,
            policy,
            (gpus.pools, gpus.reason),
            tx.clone(),
            ev_tx,
        );
        tokio::spawn(actor.run(rx, ev_rx, gpu_rx));
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

    /// Asks to put model `model` to sleep (vLLM sleep mode) once it has nothing in flight; the
    /// error says why it cannot.
    pub async fn sleep(&self, model: usize) -> Result<(), String> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Msg::Sleep { model, reply })
            .map_err(|_| "hearth is shutting down".to_string())?;
        rx.await
            .unwrap_or_else(|_| Err("hearth is shutting down".into()))
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
    /// Where it may run (sets of pool indices) and where it is (pool indices).
    options: Vec<Vec<usize>>,
    placed: Vec<usize>,
    /// The most VRAM a ready run used on one GPU (NVML), in MB (kept across runs).
    observed_vram_mb: u64,
    vram_warning: Option<String>,
    /// What it used asleep (host RAM from its cgroup, VRAM from NVML), in MB.
    observed_asleep_mb: u64,
    observed_asleep_vram_mb: u64,
    /// What its processes use on each GPU now (NVML), and the pids seen there.
    vram_now: Vec<(u32, u64)>,
    gpu_pids: Vec<u32>,
    /// An exited runtime's VRAM, held until NVML shows it freed (or the wait times out).
    release: Option<Release>,
    asleep_since: Option<Instant>,
    sleep_requested: bool,
    sleeps: u64,
    wakes: u64,
    /// The phase it was in when its stop began: what it holds while stopping.
    stop_from: Option<Phase>,
    /// Set when a wake-up failed: the runtime is being stopped and goes cold (not failed), so the
    /// queued requests get a cold start.
    wake_failed: bool,
}

/// VRAM accounting: the observed peak once NVML has seen one (0: not yet), else the declared size.
/// Observed replaces declared both ways: an estimate too large would cause needless evictions, one
/// too small OOM.
fn observed_or_declared(observed_mb: u64, declared_mb: u64) -> u64 {
    if observed_mb > 0 {
        observed_mb
    } else {
        declared_mb
    }
}

/// GPU memory of an exited runtime not yet seen freed.
struct Release {
    since: Instant,
    deadline: Instant,
    pids: Vec<u32>,
    vram_mb: u64,
}

impl ModelState {
    /// What the scheduler accounts: the declared size, or more once a run was seen using more.
    fn accounted_mb(&self) -> u64 {
        self.cfg.memory_mb.max(self.observed_mb)
    }

    /// VRAM accounted per GPU while hot.
    fn accounted_vram_mb(&self) -> u64 {
        if self.cfg.uses_gpu() {
            observed_or_declared(self.observed_vram_mb, self.cfg.vram_mb)
        } else {
            0
        }
    }

    fn hot(&self) -> Footprint {
        Footprint {
            host_mb: self.accounted_mb(),
            vram_mb: self.accounted_vram_mb(),
        }
    }

    /// What it holds asleep: host RAM as declared, or more once seen using more (as awake); VRAM
    /// as observed once seen, else as declared.
    fn asleep(&self) -> Option<Footprint> {
        self.cfg.sleep.map(|s| Footprint {
            host_mb: s.memory_mb.max(self.observed_asleep_mb),
            vram_mb: observed_or_declared(self.observed_asleep_vram_mb, s.vram_mb),
        })
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
    gpu_pools: Vec<GpuPool>,
    gpu_reason: String,
    /// The latest NVML reading; `None` without NVML (or before the first).
    gpu_reading: Option<GpuReading>,
    measured: bool,
}

impl Actor {
    fn new(
        config: Arc<Config>,
        confinement: Arc<Confinement>,
        metrics: Metrics,
        policy: Box<dyn Policy>,
        (gpu_pools, gpu_reason): (Vec<GpuPool>, String),
        tx: mpsc::UnboundedSender<Msg>,
        events: mpsc::UnboundedSender<RuntimeEvent>,
    ) -> Actor {
        let pool_of = |gpu: u32| gpu_pools.iter().position(|p| p.index == gpu).map(|i| i + 1);
        let options_of = |m: &ModelConfig| -> Vec<Vec<usize>> {
            if !m.uses_gpu() {
                return vec![Vec::new()];
            }
            match &m.gpus {
                GpuPlacement::Any => (1..=gpu_pools.len()).map(|p| vec![p]).collect(),
                GpuPlacement::On(list) => {
                    let mapped: Option<Vec<usize>> = list.iter().map(|g| pool_of(*g)).collect();
                    mapped.into_iter().collect()
                }
            }
        };
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
                options: options_of(m),
                placed: Vec::new(),
                observed_vram_mb: 0,
                vram_warning: None,
                observed_asleep_mb: 0,
                observed_asleep_vram_mb: 0,
                vram_now: Vec::new(),
                gpu_pids: Vec::new(),
                release: None,
                asleep_since: None,
                sleep_requested: false,
                sleeps: 0,
                wakes: 0,
                wake_failed: false,
                stop_from: None,
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
        for g in &gpu_pools {
            let label = g.index.to_string();
            metrics
                .gpu_total
                .with_label_values(&[&label])
                .set((g.total_mb * 1024 * 1024) as i64);
            metrics
                .pool_capacity
                .with_label_values(&[&format!("gpu{}", g.index)])
                .set((g.budget_mb * 1024 * 1024) as i64);
        }
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
            gpu_pools,
            gpu_reason,
            gpu_reading: None,
            measured: false,
        }
    }

    async fn run(
        mut self,
        mut rx: mpsc::UnboundedReceiver<Msg>,
        mut ev: mpsc::UnboundedReceiver<RuntimeEvent>,
        mut gpu_rx: Option<watch::Receiver<Option<GpuReading>>>,
    ) {
        self.measured = gpu_rx.is_some();
        let mut handles_gone = false;
        loop {
            let gpu = async {
                match gpu_rx.as_mut() {
                    Some(r) => match r.changed().await {
                        Ok(()) => r.borrow_and_update().clone(),
                        Err(_) => std::future::pending().await,
                    },
                    None => std::future::pending().await,
                }
            };
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
                Some(r) = gpu => self.on_gpu(r),
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
                // Someone wants it: an operator's sleep request no longer applies.
                m.sleep_requested = false;
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
                    m.sleep_requested = false;
                    if matches!(
                        m.phase,
                        Phase::Cold
                            | Phase::Failed
                            | Phase::Stopping
                            | Phase::Sleeping
                            | Phase::Suspending
                    ) {
                        m.load_requested.get_or_insert_with(Instant::now);
                    }
                }
            }
            Msg::Unload { model } => {
                if let Some(m) = self.models.get_mut(model) {
                    m.load_requested = None;
                    m.sleep_requested = false;
                    if matches!(
                        m.phase,
                        Phase::Ready
                            | Phase::Draining
                            | Phase::Starting
                            | Phase::Sleeping
                            | Phase::Suspending
                            | Phase::Waking
                    ) {
                        m.unload_requested = true;
                    }
                }
            }
            Msg::Sleep { model, reply } => {
                let Some(m) = self.models.get_mut(model) else {
                    let _ = reply.send(Err("no such model".into()));
                    return;
                };
                let r = if m.cfg.sleep.is_none() {
                    Err(format!(
                        "model {} has no sleep mode (set sleep = \"level1\" or \"level2\"; vLLM only)",
                        m.cfg.id
                    ))
                } else {
                    match m.phase {
                        Phase::Ready | Phase::Draining | Phase::Starting | Phase::Waking => {
                            m.sleep_requested = true;
                            m.load_requested = None;
                            Ok(())
                        }
                        Phase::Sleeping | Phase::Suspending => Ok(()),
                        p => Err(format!(
                            "model {} is {}: only a loaded model can sleep",
                            m.cfg.id,
                            p.as_str()
                        )),
                    }
                };
                let _ = reply.send(r);
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
                m.stop_from = Some(m.phase);
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
            RuntimeEvent::Transition {
                model,
                generation,
                kind,
                result,
            } => self.on_transition(model, generation, kind, result, now),
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
                m.stop_from = Some(m.phase);
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
                // What its GPUs held at the end (a sleeper little, a runtime being woken both sides).
                let held_vram_mb = Self::view(m).footprint().vram_mb;
                m.stop_from = None;
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
                    (Phase::Waking, None) if !m.wake_failed => {
                        let reason = format!("runtime exited while waking up ({status})");
                        Self::wake_failure(&self.metrics, m, &reason, &logs);
                        None
                    }
                    (
                        Phase::Ready | Phase::Draining | Phase::Sleeping | Phase::Suspending,
                        None,
                    ) => Some(Failure {
                        reason: format!("runtime exited unexpectedly ({status})"),
                        metric: "crashed",
                        logs,
                        during_start: false,
                    }),
                    _ => None,
                };
                m.asleep_since = None;
                m.vram_now.clear();
                for g in &self.gpu_pools {
                    let _ = self
                        .metrics
                        .runtime_vram
                        .remove_label_values(&[&m.cfg.id, &g.index.to_string()]);
                }
                // Its GPU memory counts until NVML shows it freed.
                let held = self
                    .gpu_reading
                    .as_ref()
                    .map(|r| {
                        r.devices
                            .iter()
                            .flat_map(|d| &d.processes)
                            .any(|p| m.gpu_pids.contains(&p.pid))
                    })
                    .unwrap_or(false);
                if !m.placed.is_empty() && self.measured && held {
                    let vram_mb = held_vram_mb;
                    m.release = Some(Release {
                        since: now,
                        deadline: now + self.config.resources.gpu_release_timeout,
                        pids: std::mem::take(&mut m.gpu_pids),
                        vram_mb,
                    });
                } else {
                    m.placed.clear();
                    m.gpu_pids.clear();
                }
                m.ready_since = None;
                m.drain_since = None;
                m.start_deadline = None;
                m.unload_requested = false;
                let wake_failed = std::mem::take(&mut m.wake_failed);
                match failure {
                    None if wake_failed => {
                        // A failed wake-up: the queued requests stay for a cold start.
                        tracing::info!(model = %m.cfg.id, %status, "runtime stopped after a failed wake-up; starting it cold");
                        m.phase = Phase::Cold;
                    }
                    None => {
                        tracing::info!(model = %m.cfg.id, %status, "runtime stopped");
                        m.phase = Phase::Cold;
                    }
                    Some(f) => self.fail(model, f, now),
                }
            }
        }
    }

    /// Records a failed wake-up: counted, quoted in status; the runtime goes cold.
    fn wake_failure(metrics: &Metrics, m: &mut ModelState, reason: &str, logs: &[String]) {
        metrics
            .wakes
            .with_label_values(&[&m.cfg.id, "failed"])
            .inc();
        metrics
            .failures
            .with_label_values(&[&m.cfg.id, "wake_failed"])
            .inc();
        m.failures += 1;
        m.wake_failed = true;
        let full = fmt_logs(logs);
        tracing::warn!(model = %m.cfg.id, reason, "wake-up failed: stopping the runtime for a cold start{full}");
        m.last_error = Some(format!("wake-up failed: {reason}{full}"));
    }

    fn on_transition(
        &mut self,
        i: usize,
        generation: u64,
        kind: TransitionKind,
        result: Result<(), String>,
        now: Instant,
    ) {
        let Some(m) = self.models.get_mut(i) else {
            return;
        };
        let expected = match kind {
            TransitionKind::Sleep => Phase::Suspending,
            TransitionKind::Wake => Phase::Waking,
        };
        if m.generation != generation || m.phase != expected {
            return;
        }
        let level = m.cfg.sleep.map(|s| s.level.number()).unwrap_or(0);
        match (kind, result) {
            (TransitionKind::Sleep, Ok(())) => {
                tracing::info!(model = %m.cfg.id, level, "runtime asleep");
                m.phase = Phase::Sleeping;
                m.asleep_since = Some(now);
                m.drain_since = None;
                m.sleep_requested = false;
                m.sleeps += 1;
                self.metrics
                    .sleeps
                    .with_label_values(&[&m.cfg.id, &level.to_string()])
                    .inc();
            }
            (TransitionKind::Wake, Ok(())) => {
                let took = m.spawned_at.map(|t| now - t).unwrap_or_default();
                tracing::info!(model = %m.cfg.id, seconds = took.as_secs_f64(), "runtime awake");
                m.phase = Phase::Ready;
                m.ready_since = Some(now);
                m.asleep_since = None;
                m.load_requested = None;
                m.wakes += 1;
                self.metrics
                    .wakes
                    .with_label_values(&[&m.cfg.id, "ok"])
                    .inc();
            }
            (kind, Err(e)) => {
                let logs = m
                    .proc
                    .as_ref()
                    .map(|p| p.logs.last(ERROR_LOG_LINES))
                    .unwrap_or_default();
                if kind == TransitionKind::Wake {
                    Self::wake_failure(&self.metrics, m, &e, &logs);
                } else {
                    tracing::warn!(model = %m.cfg.id, error = %e, "going to sleep failed: stopping the runtime");
                    m.pending_failure = Some(Failure {
                        reason: format!("sleep failed: {e}"),
                        metric: "sleep_failed",
                        logs,
                        during_start: false,
                    });
                }
                if let Some(p) = &m.proc {
                    p.stop(m.cfg.stop_timeout);
                }
                m.stop_from = Some(m.phase);
                m.phase = Phase::Stopping;
            }
        }
    }

    /// A new NVML reading: each runtime's VRAM (by its processes), observed peaks, freed memory.
    fn on_gpu(&mut self, reading: GpuReading) {
        let now = Instant::now();
        for m in &mut self.models {
            if let Some(r) = &m.release {
                let listed = reading
                    .devices
                    .iter()
                    .flat_map(|d| &d.processes)
                    .any(|p| r.pids.contains(&p.pid));
                if !listed || now >= r.deadline {
                    let waited = now - r.since;
                    for &p in &m.placed {
                        if let Some(g) = self.gpu_pools.get(p - 1) {
                            self.metrics
                                .gpu_release_wait
                                .with_label_values(&[&g.index.to_string()])
                                .observe(waited.as_secs_f64());
                        }
                    }
                    if listed {
                        tracing::warn!(model = %m.cfg.id, waited = ?waited, pids = ?r.pids, "NVML still lists the stopped runtime's processes on the GPU; scheduling as if its memory were free");
                    } else {
                        tracing::info!(model = %m.cfg.id, waited_ms = waited.as_millis() as u64, "GPU memory of the stopped runtime is freed");
                    }
                    m.release = None;
                    if m.proc.is_none() {
                        m.placed.clear();
                    }
                }
            }
            let Some(p) = &m.proc else { continue };
            if m.placed.is_empty() {
                continue;
            }
            let pids = match &p.cgroup {
                Some(c) => c.pids().unwrap_or_else(|_| vec![p.pid]),
                None => crate::gpu::descendants(p.pid),
            };
            let mut per_gpu = Vec::new();
            let mut seen = Vec::new();
            for d in &reading.devices {
                let mut used = 0;
                for pr in d.processes.iter().filter(|pr| pids.contains(&pr.pid)) {
                    used += pr.used_bytes;
                    seen.push(pr.pid);
                }
                if used > 0 {
                    per_gpu.push((d.index, used));
                }
            }
            seen.sort_unstable();
            seen.dedup();
            if !seen.is_empty() {
                m.gpu_pids = seen;
            }
            let top_mb = per_gpu
                .iter()
                .map(|(_, b)| b.div_ceil(1024 * 1024))
                .max()
                .unwrap_or(0);
            match m.phase {
                Phase::Ready | Phase::Draining if top_mb > m.observed_vram_mb => {
                    m.observed_vram_mb = top_mb;
                    if top_mb > m.cfg.vram_mb && m.vram_warning.is_none() {
                        tracing::warn!(model = %m.cfg.id, observed_mb = top_mb, declared_mb = m.cfg.vram_mb, "model uses more VRAM than declared; scheduling with what it uses");
                    }
                    if top_mb > m.cfg.vram_mb {
                        m.vram_warning = Some(format!(
                            "uses {top_mb} MB of VRAM, more than its declared vram_mb = {}: accounted as {top_mb} MB",
                            m.cfg.vram_mb
                        ));
                    }
                }
                // Only readings taken once it has settled asleep (one taken while it was going to
                // sleep may arrive after the transition).
                Phase::Sleeping
                    if top_mb > m.observed_asleep_vram_mb
                        && m.asleep_since
                            .is_some_and(|t| reading.at >= t + ASLEEP_SETTLE) =>
                {
                    m.observed_asleep_vram_mb = top_mb;
                }
                _ => {}
            }
            for (g, b) in &per_gpu {
                self.metrics
                    .runtime_vram
                    .with_label_values(&[&m.cfg.id, &g.to_string()])
                    .set(*b as i64);
            }
            m.vram_now = per_gpu;
        }
        self.gpu_reading = Some(reading);
    }

    /// Releases whose wait ran out without a reading (NVML stopped answering).
    fn expire_releases(&mut self, now: Instant) {
        for m in &mut self.models {
            if m.release.as_ref().is_some_and(|r| now >= r.deadline) {
                tracing::warn!(model = %m.cfg.id, "no NVML reading showed the stopped runtime's GPU memory freed; scheduling as if it were");
                m.release = None;
                if m.proc.is_none() {
                    m.placed.clear();
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
            if m.phase == Phase::Sleeping
                && m.asleep_since.is_some_and(|t| t.elapsed() >= ASLEEP_SETTLE)
            {
                m.observed_asleep_mb = m.observed_asleep_mb.max(cur.div_ceil(1024 * 1024));
            }
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
            hot: m.hot(),
            asleep: m.asleep(),
            options: &m.options,
            placed: &m.placed,
            asleep_since: m.asleep_since,
            keep_asleep: m
                .cfg
                .sleep
                .map(|s| s.keep_asleep)
                .unwrap_or(crate::config::KeepWarm::Forever),
            sleep_requested: m.sleep_requested,
            releasing_mb: m.release.as_ref().map(|r| r.vram_mb).unwrap_or(0),
            stopping_from: m.stop_from,
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

    /// GPU memory NVML shows in use that is not hearth's runtimes (nor the driver's reserve it
    /// already subtracts), per pool index; 0 without a reading.
    fn foreign_mb(&self, pool: usize) -> Option<u64> {
        let g = self.gpu_pools.get(pool.checked_sub(1)?)?;
        let d = self.gpu_reading.as_ref()?.device(g.index)?;
        let ours: u64 = d
            .processes
            .iter()
            .filter(|p| {
                self.models.iter().any(|m| {
                    m.gpu_pids.contains(&p.pid)
                        || m.release.as_ref().is_some_and(|r| r.pids.contains(&p.pid))
                })
            })
            .map(|p| p.used_bytes)
            .sum();
        Some((d.used_bytes.saturating_sub(ours) + d.reserved_bytes) / (1024 * 1024))
    }

    fn pools(&self) -> Vec<Pool> {
        let mut pools = vec![Pool {
            name: "host".into(),
            capacity_mb: self.config.resources.host_memory_mb,
        }];
        for (k, g) in self.gpu_pools.iter().enumerate() {
            let foreign = self.foreign_mb(k + 1).unwrap_or(0);
            pools.push(Pool {
                name: format!("gpu{}", g.index),
                capacity_mb: g.capacity_mb(foreign),
            });
        }
        pools
    }

    fn snapshot(&self, now: Instant) -> Snapshot<'_> {
        Snapshot {
            now,
            pools: self.pools(),
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
            self.expire_releases(now);
            let plan = scheduler::plan(&self.snapshot(now), self.policy.as_ref());
            let release = self
                .models
                .iter()
                .filter_map(|m| m.release.as_ref().map(|r| r.deadline))
                .min();
            self.wake_at = match (plan.wake_at, release) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
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
            Action::Start { model, gpus } => self.start(model, now, gpus),
            Action::Sleep { model, reason } => {
                let m = &mut self.models[model];
                if m.proc.is_none() {
                    return;
                }
                let level = m.cfg.sleep.map(|s| s.level.number()).unwrap_or(1);
                tracing::info!(model = %m.cfg.id, reason = reason.as_str(), level, "putting runtime to sleep");
                if reason != EvictReason::Admin {
                    self.metrics
                        .evictions
                        .with_label_values(&[&m.cfg.id, reason.as_str()])
                        .inc();
                }
                m.phase = Phase::Suspending;
                m.drain_since = None;
                self.spawn_transition(model, TransitionKind::Sleep, level);
            }
            Action::Wake { model } => {
                let m = &mut self.models[model];
                if m.proc.is_none() {
                    return;
                }
                tracing::info!(model = %m.cfg.id, "waking runtime");
                m.phase = Phase::Waking;
                m.spawned_at = Some(now);
                let level = m.cfg.sleep.map(|s| s.level.number()).unwrap_or(1);
                self.spawn_transition(model, TransitionKind::Wake, level);
            }
            Action::Stop { model, reason } => {
                let m = &mut self.models[model];
                if let Some(p) = &m.proc {
                    tracing::info!(model = %m.cfg.id, reason = reason.as_str(), "stopping runtime");
                    p.stop(m.cfg.stop_timeout);
                    m.stop_from = Some(m.phase);
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
                m.stop_from = Some(m.phase);
                m.phase = Phase::Stopping;
                m.start_deadline = None;
            }
        }
    }

    /// Runs a sleep or wake-up of model `i` off the actor; the outcome comes back as an event.
    fn spawn_transition(&self, i: usize, kind: TransitionKind, level: u8) {
        let m = &self.models[i];
        let Some(p) = &m.proc else { return };
        let addr = p.addr();
        let generation = m.generation;
        let timeout = m.cfg.start_timeout;
        let events = self.events.clone();
        let span = tracing::info_span!("transition", model = %m.cfg.id, kind = kind.as_str());
        tokio::spawn(tracing::Instrument::instrument(
            async move {
                let result = runtime::transition(addr, kind, level, timeout).await;
                let _ = events.send(RuntimeEvent::Transition {
                    model: i,
                    generation,
                    kind,
                    result,
                });
            },
            span,
        ));
    }

    fn start(&mut self, i: usize, now: Instant, gpus: Vec<usize>) {
        let placement = Placement {
            gpus: gpus
                .iter()
                .filter_map(|&p| self.gpu_pools.get(p.checked_sub(1)?).map(|g| g.index))
                .collect(),
            gpu_total_mb: gpus
                .iter()
                .filter_map(|&p| self.gpu_pools.get(p.checked_sub(1)?).map(|g| g.total_mb))
                .min(),
        };
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
                runtime::spawn(
                    i,
                    m.generation,
                    &m.cfg,
                    port,
                    sandbox,
                    &placement,
                    self.events.clone(),
                )
                .map_err(|e| e.to_string())
            });
        match spawned {
            Ok(p) => {
                let cgroup = p
                    .cgroup
                    .as_ref()
                    .and_then(|c| c.dirs().first().map(|d| d.display().to_string()));
                let user = p.user.as_ref().map(|u| u.user.as_str());
                tracing::info!(model = %m.cfg.id, pid = p.pid, port = p.port, cgroup, user, gpus = ?placement.gpus, "runtime starting");
                m.proc = Some(p);
                m.placed = gpus;
                m.gpu_pids.clear();
                m.vram_now.clear();
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
        const MB: i64 = 1024 * 1024;
        let snap = self.snapshot(Instant::now());
        for ((m, g), v) in self.models.iter().zip(&self.gauges).zip(&snap.models) {
            g.set_state(m.phase);
            g.memory.set(v.usage(HOST) as i64 * MB);
            g.queue_depth.set(m.queue.len() as i64);
            g.in_flight.set(i64::from(m.in_flight));
            let tier = m.phase.tier();
            for t in Tier::ALL {
                self.metrics
                    .model_tier
                    .with_label_values(&[&m.cfg.id, t.as_str()])
                    .set(i64::from(t == tier));
            }
            if m.cfg.uses_gpu() {
                for (k, gp) in self.gpu_pools.iter().enumerate() {
                    self.metrics
                        .model_vram
                        .with_label_values(&[&m.cfg.id, &gp.index.to_string()])
                        .set(v.usage(k + 1) as i64 * MB);
                }
            }
        }
        self.pool_used.set(snap.used_mb(HOST) as i64 * MB);
        for (k, gp) in self.gpu_pools.iter().enumerate() {
            let label = gp.index.to_string();
            let used = snap.used_mb(k + 1) as i64 * MB;
            let cap = snap.pools[k + 1].capacity_mb as i64 * MB;
            self.metrics.gpu_used.with_label_values(&[&label]).set(used);
            self.metrics
                .gpu_budget
                .with_label_values(&[&label])
                .set(cap);
            let pool = format!("gpu{}", gp.index);
            self.metrics.pool_used.with_label_values(&[&pool]).set(used);
            self.metrics
                .pool_capacity
                .with_label_values(&[&pool])
                .set(cap);
            if let Some(d) = self.gpu_reading.as_ref().and_then(|r| r.device(gp.index)) {
                self.metrics
                    .gpu_measured
                    .with_label_values(&[&label])
                    .set(d.used_bytes as i64);
                let foreign = self.foreign_mb(k + 1).unwrap_or(0) as i64 * MB;
                self.metrics
                    .gpu_foreign
                    .with_label_values(&[&label])
                    .set(foreign);
            }
        }
    }

    fn gpu_status(&self, snap: &Snapshot<'_>) -> Vec<GpuStatus> {
        const MB: u64 = 1024 * 1024;
        self.gpu_pools
            .iter()
            .enumerate()
            .map(|(k, g)| {
                let d = self.gpu_reading.as_ref().and_then(|r| r.device(g.index));
                GpuStatus {
                    index: g.index,
                    name: g.name.clone(),
                    uuid: g.uuid.clone(),
                    source: g.source,
                    memory_total_bytes: g.total_mb * MB,
                    budget_bytes: snap.pools[k + 1].capacity_mb * MB,
                    used_bytes: snap.used_mb(k + 1) * MB,
                    measured_used_bytes: d.map(|d| d.used_bytes),
                    foreign_bytes: d.and(self.foreign_mb(k + 1)).map(|f| f * MB),
                    processes: d
                        .map(|d| {
                            d.processes
                                .iter()
                                .map(|p| GpuProcessStatus {
                                    pid: p.pid,
                                    used_bytes: p.used_bytes,
                                    model: self
                                        .models
                                        .iter()
                                        .find(|m| m.gpu_pids.contains(&p.pid))
                                        .map(|m| m.cfg.id.clone()),
                                })
                                .collect()
                        })
                        .unwrap_or_default(),
                }
            })
            .collect()
    }

    fn report(&self) -> StatusReport {
        let now = Instant::now();
        let snap = self.snapshot(now);
        StatusReport {
            version: env!("CARGO_PKG_VERSION"),
            uptime_seconds: (now - self.started).as_secs_f64(),
            confinement: self.confinement.status().clone(),
            sensor: None,
            pools: snap
                .pools
                .iter()
                .enumerate()
                .map(|(p, pool)| PoolStatus {
                    name: pool.name.clone(),
                    capacity_mb: pool.capacity_mb,
                    used_mb: snap.used_mb(p),
                })
                .collect(),
            gpu: GpuSummary {
                reason: self.gpu_reason.clone(),
                measured: self.measured,
            },
            gpus: self.gpu_status(&snap),
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
                    memory_accounted_mb: match m.phase {
                        Phase::Sleeping | Phase::Suspending | Phase::Waking => {
                            snap.models[i].usage(HOST)
                        }
                        _ => m.accounted_mb(),
                    },
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
                    tier: m.phase.tier().as_str(),
                    gpus: m
                        .placed
                        .iter()
                        .filter_map(|&p| self.gpu_pools.get(p.checked_sub(1)?).map(|g| g.index))
                        .collect(),
                    vram_mb: m.cfg.vram_mb,
                    vram_observed_mb: (m.observed_vram_mb > 0).then_some(m.observed_vram_mb),
                    vram_bytes: m
                        .placed
                        .first()
                        .map(|&p| snap.models[i].usage(p) * 1024 * 1024)
                        .unwrap_or(0),
                    vram_used_bytes: (!m.vram_now.is_empty())
                        .then(|| m.vram_now.iter().map(|(_, b)| b).sum()),
                    vram_warning: m.vram_warning.clone(),
                    sleep_level: m.cfg.sleep.map(|s| s.level.number()),
                    asleep_memory_mb: m.asleep().map(|a| a.host_mb),
                    asleep_vram_mb: m.asleep().map(|a| a.vram_mb),
                    sleeps_total: m.sleeps,
                    wakes_total: m.wakes,
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
    fn observed_vram_overrides_declared_both_ways() {
        assert_eq!(
            observed_or_declared(0, 4000),
            4000,
            "nothing seen yet: declared"
        );
        assert_eq!(
            observed_or_declared(438, 4000),
            438,
            "smaller than declared"
        );
        assert_eq!(
            observed_or_declared(5000, 4000),
            5000,
            "larger than declared"
        );
    }

    #[test]
    fn backoff_doubles_and_caps() {
        assert_eq!(backoff(1), Duration::from_millis(500));
        assert_eq!(backoff(2), Duration::from_secs(1));
        assert_eq!(backoff(3), Duration::from_secs(2));
        assert_eq!(backoff(20), Duration::from_secs(30));
    }
}
