//! Scheduling decisions as pure functions over a snapshot.
//!
//! The supervisor (the only owner of state) builds a [`Snapshot`] after every event and applies the
//! [`Action`]s that [`plan`] returns; nothing here touches a process, a clock or a channel, so every
//! rule is unit-tested below without processes.
//!
//! Memory comes in pools: pool 0 is host RAM, the others are GPUs. A model holds memory in the host
//! pool and, when it runs on GPUs, in each GPU pool it is placed on. What it holds depends on its
//! tier: `hot` (a running runtime), `sleeping` (a vLLM in sleep mode: little VRAM, its weights in
//! host RAM at level 1) or `cold` (nothing).
//!
//! Rules:
//! - A ready model admits its queued requests in FIFO order up to `max_concurrency`.
//! - Models with waiting requests are started (cold) or woken (sleeping) in the order of their oldest
//!   request (FIFO across models). A model that may go on any GPU is placed where it fits now (the
//!   tightest fit), else where the fewest evictions make it fit. A waiter that does not fit reserves
//!   its pools: a later waiter may start only on other GPUs and within what is left of host RAM.
//! - To make room, idle models (nothing in flight or queued, past `min_residency`) are put to sleep
//!   (when sleep mode is on and only GPU memory is short) or stopped, in the order the [`Policy`]
//!   ranks them; only when that is not enough are busy models *drained*: they finish what is in
//!   flight and what was queued before the drain began, admit nothing newer, and are stopped (or put
//!   to sleep) once empty. A model with requests in flight is never stopped for memory.
//! - Nothing is evicted unless the evictions would really make the waiting model fit, and no more
//!   is evicted than needed (a pick whose removal still leaves a fit is dropped).
//! - A draining model whose memory is no longer needed resumes.
//! - Idle models whose policy says so go to sleep (sleep mode) or are unloaded; sleeping models are
//!   stopped after `keep_asleep`; queued requests past their deadline expire; starts that exceed
//!   `start_timeout` fail; failed models retry after their backoff when asked for.

use std::time::{Duration, Instant};

use crate::config::KeepWarm;

pub type Ticket = u64;

/// The lifecycle of one model's runtime.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Phase {
    Cold,
    Starting,
    Ready,
    Draining,
    Stopping,
    Failed,
    /// Going to sleep (vLLM sleep mode).
    Suspending,
    Sleeping,
    Waking,
}

/// Where a model's memory is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Tier {
    Hot,
    Sleeping,
    Cold,
}

impl Tier {
    pub const ALL: [Tier; 3] = [Tier::Hot, Tier::Sleeping, Tier::Cold];

    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Hot => "hot",
            Tier::Sleeping => "sleeping",
            Tier::Cold => "cold",
        }
    }
}

impl Phase {
    pub const ALL: [Phase; 9] = [
        Phase::Cold,
        Phase::Starting,
        Phase::Ready,
        Phase::Draining,
        Phase::Stopping,
        Phase::Failed,
        Phase::Suspending,
        Phase::Sleeping,
        Phase::Waking,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Cold => "cold",
            Phase::Starting => "starting",
            Phase::Ready => "ready",
            Phase::Draining => "draining",
            Phase::Stopping => "stopping",
            Phase::Failed => "failed",
            Phase::Suspending => "suspending",
            Phase::Sleeping => "sleeping",
            Phase::Waking => "waking",
        }
    }

    /// Whether the runtime process exists and so holds memory.
    pub fn holds_memory(self) -> bool {
        !matches!(self, Phase::Cold | Phase::Failed)
    }

    /// The tier of a model in this phase (a transition counts as the hotter side).
    pub fn tier(self) -> Tier {
        match self {
            Phase::Cold | Phase::Failed => Tier::Cold,
            Phase::Sleeping => Tier::Sleeping,
            _ => Tier::Hot,
        }
    }
}

/// A request waiting for its model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Queued {
    pub ticket: Ticket,
    pub enqueued: Instant,
    pub deadline: Instant,
}

/// What a model holds: host RAM, and VRAM on each GPU it is placed on (MB).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Footprint {
    pub host_mb: u64,
    pub vram_mb: u64,
}

impl Footprint {
    fn max(self, o: Footprint) -> Footprint {
        Footprint {
            host_mb: self.host_mb.max(o.host_mb),
            vram_mb: self.vram_mb.max(o.vram_mb),
        }
    }
}

/// Index of the host-RAM pool in [`Snapshot::pools`].
pub const HOST: usize = 0;

/// One memory pool: host RAM (index [`HOST`]) or a GPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pool {
    pub name: String,
    /// What hearth may schedule on it now, in MB.
    pub capacity_mb: u64,
}

/// What the scheduler sees of one model.
#[derive(Debug, Clone)]
pub struct ModelView<'a> {
    pub id: &'a str,
    pub phase: Phase,
    /// What it holds while hot.
    pub hot: Footprint,
    /// What it holds while asleep; `None`: no sleep mode.
    pub asleep: Option<Footprint>,
    /// Where it may run: alternative sets of GPU pools (indices into [`Snapshot::pools`]); a
    /// host-only model has one empty set.
    pub options: &'a [Vec<usize>],
    /// The GPU pools it is on while it holds memory.
    pub placed: &'a [usize],
    pub in_flight: u32,
    pub max_concurrency: u32,
    pub queue: &'a [Queued],
    pub last_used: Option<Instant>,
    pub ready_since: Option<Instant>,
    pub drain_since: Option<Instant>,
    pub asleep_since: Option<Instant>,
    pub start_deadline: Option<Instant>,
    pub retry_at: Option<Instant>,
    pub keep_warm: KeepWarm,
    pub keep_asleep: KeepWarm,
    pub min_residency: Duration,
    /// An operator asked to load it (admin API), since this instant.
    pub load_requested: Option<Instant>,
    /// An operator asked to unload it.
    pub unload_requested: bool,
    /// An operator asked to put it to sleep.
    pub sleep_requested: bool,
    /// VRAM an exited runtime of this model still holds on each of `placed` until the GPU shows it
    /// freed; the model does not start again before.
    pub releasing_mb: u64,
    /// While `Stopping`: the phase it was stopped from (a sleeper being stopped holds what it held
    /// asleep, not its awake size).
    pub stopping_from: Option<Phase>,
}

impl ModelView<'_> {
    fn oldest_wait(&self) -> Option<Instant> {
        let q = self.queue.first().map(|q| q.enqueued);
        match (q, self.load_requested) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn resident_enough(&self, now: Instant) -> bool {
        self.ready_since
            .is_none_or(|t| now.saturating_duration_since(t) >= self.min_residency)
    }

    pub fn idle_for(&self, now: Instant) -> Duration {
        self.last_used
            .or(self.ready_since)
            .map(|t| now.saturating_duration_since(t))
            .unwrap_or_default()
    }

    /// What it holds in this phase.
    pub fn footprint(&self) -> Footprint {
        self.footprint_in(self.phase)
    }

    fn footprint_in(&self, phase: Phase) -> Footprint {
        let asleep = self.asleep.unwrap_or_default();
        match phase {
            Phase::Cold | Phase::Failed => Footprint::default(),
            Phase::Sleeping => asleep,
            // Both sides of a transition: level 1 copies the weights to host RAM while the VRAM is
            // still held, and back.
            Phase::Suspending | Phase::Waking => self.hot.max(asleep),
            Phase::Stopping => match self.stopping_from {
                Some(from) if from != Phase::Stopping => self.footprint_in(from),
                _ => self.hot,
            },
            _ => self.hot,
        }
    }

    /// What `f` puts on pool `p` for this model.
    fn on_pool(&self, f: Footprint, p: usize) -> u64 {
        if p == HOST {
            f.host_mb
        } else if self.placed.contains(&p) {
            f.vram_mb
        } else {
            0
        }
    }

    /// What it holds on pool `p` now.
    pub fn usage(&self, p: usize) -> u64 {
        let held = if self.phase.holds_memory() {
            self.on_pool(self.footprint(), p)
        } else {
            0
        };
        if p != HOST && self.placed.contains(&p) {
            held.max(self.releasing_mb)
        } else {
            held
        }
    }

    fn can_sleep(&self) -> bool {
        self.asleep.is_some()
    }
}

/// The pools and the models.
#[derive(Debug, Clone)]
pub struct Snapshot<'a> {
    pub now: Instant,
    /// Pool [`HOST`] first, then the GPUs.
    pub pools: Vec<Pool>,
    pub models: Vec<ModelView<'a>>,
}

impl Snapshot<'_> {
    /// What the models hold on pool `p`.
    pub fn used_mb(&self, p: usize) -> u64 {
        self.models.iter().map(|m| m.usage(p)).sum()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EvictReason {
    /// Idle past what the policy allows.
    Idle,
    /// Its memory is needed by another model.
    Memory,
    /// An operator asked.
    Admin,
}

impl EvictReason {
    pub fn as_str(self) -> &'static str {
        match self {
            EvictReason::Idle => "idle",
            EvictReason::Memory => "memory",
            EvictReason::Admin => "admin",
        }
    }
}

/// What the supervisor must do. Indices are positions in [`Snapshot::models`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Forward this queued request now.
    Admit { model: usize, ticket: Ticket },
    /// This queued request waited too long.
    Expire { model: usize, ticket: Ticket },
    /// Spawn the runtime on these GPU pools (indices into [`Snapshot::pools`]; empty: host only).
    Start { model: usize, gpus: Vec<usize> },
    /// Stop the runtime (it has nothing in flight).
    Stop { model: usize, reason: EvictReason },
    /// Put the runtime to sleep (it has nothing in flight).
    Sleep { model: usize, reason: EvictReason },
    /// Wake the sleeping runtime.
    Wake { model: usize },
    /// Stop admitting newer requests; stop (or sleep) once empty.
    Drain { model: usize },
    /// Draining is no longer needed.
    Resume { model: usize },
    /// The start took longer than `start_timeout`.
    StartTimedOut { model: usize },
}

/// The decisions of one pass, and when to look again if nothing else happens.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Plan {
    pub actions: Vec<Action>,
    pub wake_at: Option<Instant>,
}

impl Plan {
    fn wake(&mut self, at: Instant) {
        self.wake_at = Some(self.wake_at.map_or(at, |w| w.min(at)));
    }
}

/// Chooses whom to evict and when idle models go. The default is [`LongestIdle`]; the learned
/// predictor implements this trait later.
pub trait Policy: Send + Sync {
    /// Orders eviction candidates (indices into `snap.models`), the first evicted first.
    fn rank_victims(&self, snap: &Snapshot<'_>, candidates: &mut Vec<usize>);

    /// When model `i`, hot and idle now, should be unloaded (or put to sleep, with sleep mode);
    /// `None` = keep it.
    fn unload_idle_at(&self, snap: &Snapshot<'_>, i: usize) -> Option<Instant>;

    /// When model `i`, asleep now, should be stopped; `None` = keep it asleep.
    fn stop_asleep_at(&self, snap: &Snapshot<'_>, i: usize) -> Option<Instant> {
        let m = &snap.models[i];
        match m.keep_asleep {
            KeepWarm::Forever => None,
            KeepWarm::For(d) => m.asleep_since.map(|t| t + d),
        }
    }
}

/// Unload after `keep_warm` of idleness; evict first those idle beyond `keep_warm`, then the longest
/// idle.
#[derive(Debug, Default, Clone, Copy)]
pub struct LongestIdle;

impl Policy for LongestIdle {
    fn rank_victims(&self, snap: &Snapshot<'_>, candidates: &mut Vec<usize>) {
        let now = snap.now;
        candidates.sort_by_key(|&i| {
            let m = &snap.models[i];
            let idle = m.idle_for(now);
            let expired = match m.keep_warm {
                KeepWarm::For(d) => idle >= d,
                KeepWarm::Forever => false,
            };
            (!expired, std::cmp::Reverse(idle))
        });
    }

    fn unload_idle_at(&self, snap: &Snapshot<'_>, i: usize) -> Option<Instant> {
        let m = &snap.models[i];
        match m.keep_warm {
            KeepWarm::Forever => None,
            KeepWarm::For(d) => m.last_used.or(m.ready_since).map(|t| t + d),
        }
    }
}

/// Whether one more request may wait for model `m`, whose queue holds at most `queue_max`. Every
/// request passes through the queue, even when a slot is free; a full queue answers at once (503).
pub fn accepts_request(m: &ModelView<'_>, queue_max: usize) -> bool {
    m.queue.len() < queue_max
}

/// How an eviction candidate gives memory back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// Stop it now (idle, or a drained model that is empty).
    Stop,
    /// Put it to sleep now.
    Sleep,
    /// Start draining it (busy).
    Drain,
    /// It is draining already: let it go on.
    KeepDraining,
}

/// One candidate's memory after its step: stopped, or asleep.
fn after_step(m: &ModelView<'_>, to_sleep: bool) -> Footprint {
    if to_sleep {
        m.asleep.unwrap_or_default()
    } else {
        Footprint::default()
    }
}

/// How to make room for one waiter on one placement.
#[derive(Debug, Clone)]
struct RoomPlan {
    /// (model, step, whether it ends asleep)
    picks: Vec<(usize, Step, bool)>,
}

impl RoomPlan {
    /// Lower is better: drains first (they delay the waiter), then evictions, then memory.
    fn cost(&self, snap: &Snapshot<'_>) -> (usize, usize, u64) {
        let drains = self
            .picks
            .iter()
            .filter(|(_, s, _)| *s == Step::Drain)
            .count();
        let evicted = self
            .picks
            .iter()
            .filter(|(_, s, _)| *s != Step::KeepDraining)
            .count();
        let mb = self
            .picks
            .iter()
            .map(|(i, _, _)| {
                let m = &snap.models[*i];
                m.footprint().host_mb + m.footprint().vram_mb
            })
            .sum();
        (drains, evicted, mb)
    }
}

/// The per-pool memory a waiter needs in addition to what it holds now (a sleeping model wakes in
/// place; a cold one needs its whole hot footprint).
fn need(m: &ModelView<'_>, gpus: &[usize], pools: usize) -> Vec<u64> {
    let mut need = vec![0u64; pools];
    let (to, from) = match m.phase {
        Phase::Sleeping => (m.footprint_in(Phase::Waking), m.footprint()),
        _ => (m.hot, Footprint::default()),
    };
    need[HOST] = to.host_mb.saturating_sub(from.host_mb);
    for &g in gpus {
        if g < pools && g != HOST {
            need[g] = to.vram_mb.saturating_sub(from.vram_mb);
        }
    }
    need
}

/// Work state shared by the passes of [`plan`].
struct Pass<'s, 'a> {
    snap: &'s Snapshot<'a>,
    /// Models this pass already stops or puts to sleep (true: to sleep).
    leaving: Vec<Option<bool>>,
    busy: Vec<bool>,
    /// Draining models with nothing old left to serve.
    drained: Vec<bool>,
}

impl Pass<'_, '_> {
    /// What model `i` will hold once what is under way ends (stops, sleeps).
    fn settled(&self, i: usize) -> Footprint {
        let m = &self.snap.models[i];
        match (self.leaving[i], m.phase) {
            (Some(to_sleep), _) => after_step(m, to_sleep),
            (None, Phase::Stopping) => Footprint::default(),
            (None, Phase::Suspending) => m.asleep.unwrap_or_default(),
            (None, p) if p.holds_memory() => m.footprint(),
            _ => Footprint::default(),
        }
    }

    /// Whether model `i` (hot now) can go to sleep without overfilling host RAM, given what is under
    /// way and what this pass decided so far.
    fn sleep_fits(&self, i: usize) -> bool {
        let m = &self.snap.models[i];
        let Some(asleep) = m.asleep else {
            return false;
        };
        let host = self.settled_usage()[HOST];
        host - self.settled(i).host_mb + asleep.host_mb <= self.snap.pools[HOST].capacity_mb
    }

    /// What model `i` will hold on pool `p` once what is under way ends.
    fn settled_on(&self, i: usize, p: usize) -> u64 {
        let m = &self.snap.models[i];
        let v = m.on_pool(self.settled(i), p);
        if p != HOST && m.placed.contains(&p) {
            // Memory being released is on its way out but not gone: it counts until it is.
            v.max(m.releasing_mb)
        } else {
            v
        }
    }

    /// Pool usage once what is under way ends.
    fn settled_usage(&self) -> Vec<u64> {
        let n = self.snap.pools.len();
        let mut u = vec![0u64; n];
        for i in 0..self.snap.models.len() {
            for (p, slot) in u.iter_mut().enumerate() {
                *slot += self.settled_on(i, p);
            }
        }
        u
    }

    /// Plans evictions that make `need` fit in the pools, starting from `usage` (settled). `None`:
    /// even evicting every candidate would not make it fit.
    fn make_room(
        &self,
        waiter: usize,
        need: &[u64],
        usage: &[u64],
        reserved: &[u64],
        policy: &dyn Policy,
        wake: &mut Plan,
    ) -> Option<RoomPlan> {
        let snap = self.snap;
        let now = snap.now;
        let pools = snap.pools.len();
        let over = |u: &[u64]| -> Vec<usize> {
            (0..pools)
                .filter(|&p| {
                    // The pools the waiter needs, and any our picks filled (a sleep adds host RAM).
                    (need[p] > 0 || u[p] > usage[p])
                        && u[p] + need[p] + reserved[p] > snap.pools[p].capacity_mb
                })
                .collect()
        };
        let mut draining: Vec<usize> = Vec::new();
        let mut idle: Vec<usize> = Vec::new();
        let mut busy: Vec<usize> = Vec::new();
        for (i, m) in snap.models.iter().enumerate() {
            // (A model an operator unloads is on its way out already.)
            if i == waiter || self.leaving[i].is_some() || m.unload_requested {
                continue;
            }
            match m.phase {
                Phase::Draining => draining.push(i),
                Phase::Ready if m.load_requested.is_none() => {
                    if !m.resident_enough(now) {
                        if let Some(t) = m.ready_since {
                            wake.wake(t + m.min_residency);
                        }
                    } else if self.busy[i] {
                        busy.push(i);
                    } else {
                        idle.push(i);
                    }
                }
                Phase::Sleeping if !self.busy[i] && m.load_requested.is_none() => idle.push(i),
                _ => {}
            }
        }
        policy.rank_victims(snap, &mut draining);
        policy.rank_victims(snap, &mut idle);
        policy.rank_victims(snap, &mut busy);

        let mut u = usage.to_vec();
        let mut picks: Vec<(usize, Step, bool)> = Vec::new();
        let ordered = draining
            .iter()
            .map(|&i| (i, true))
            .chain(idle.iter().map(|&i| (i, false)))
            .chain(busy.iter().map(|&i| (i, false)));
        for (i, is_draining) in ordered {
            let short = over(&u);
            if short.is_empty() {
                break;
            }
            let m = &snap.models[i];
            let cur = self.settled(i);
            if !short.iter().any(|&p| m.on_pool(cur, p) > 0) {
                continue;
            }
            // Sleep when it helps without making host RAM short; otherwise stop.
            let to_sleep = m.phase != Phase::Sleeping && m.can_sleep() && {
                let asleep = after_step(m, true);
                let host_after = u[HOST] - cur.host_mb + asleep.host_mb;
                let gpu_helps = short
                    .iter()
                    .any(|&p| p != HOST && m.on_pool(asleep, p) < m.on_pool(cur, p));
                gpu_helps
                    && host_after + need[HOST] + reserved[HOST] <= snap.pools[HOST].capacity_mb
            };
            let after = after_step(m, to_sleep);
            for (p, slot) in u.iter_mut().enumerate() {
                *slot = *slot - m.on_pool(cur, p) + m.on_pool(after, p);
            }
            let step = if is_draining {
                if self.drained[i] {
                    if to_sleep {
                        Step::Sleep
                    } else {
                        Step::Stop
                    }
                } else {
                    Step::KeepDraining
                }
            } else if self.busy[i] {
                Step::Drain
            } else if to_sleep {
                Step::Sleep
            } else {
                Step::Stop
            };
            picks.push((i, step, to_sleep));
        }
        if !over(&u).is_empty() {
            // A pick made to sleep may still have to go entirely when host RAM is what is short.
            for k in (0..picks.len()).rev() {
                if over(&u).is_empty() {
                    break;
                }
                let (i, step, to_sleep) = picks[k];
                if !to_sleep {
                    continue;
                }
                let m = &snap.models[i];
                let asleep = after_step(m, true);
                for (p, slot) in u.iter_mut().enumerate() {
                    *slot -= m.on_pool(asleep, p);
                }
                let step = match step {
                    Step::Sleep => Step::Stop,
                    s => s,
                };
                picks[k] = (i, step, false);
            }
            if !over(&u).is_empty() {
                return None;
            }
        }
        // No more than needed: drop, last first, any pick whose memory the fit does not need.
        for k in (0..picks.len()).rev() {
            let (i, _, to_sleep) = picks[k];
            let m = &snap.models[i];
            let cur = self.settled(i);
            let after = after_step(m, to_sleep);
            let mut without = u.clone();
            for (p, slot) in without.iter_mut().enumerate() {
                *slot = *slot - m.on_pool(after, p) + m.on_pool(cur, p);
            }
            if over(&without).is_empty() {
                u = without;
                picks.remove(k);
            }
        }
        Some(RoomPlan { picks })
    }
}

/// Decides what to do now.
pub fn plan(snap: &Snapshot<'_>, policy: &dyn Policy) -> Plan {
    let now = snap.now;
    let n = snap.models.len();
    let pools = snap.pools.len();
    let mut out = Plan::default();

    // Deadlines of queued requests.
    let mut expired: Vec<Vec<Ticket>> = vec![Vec::new(); n];
    for (i, m) in snap.models.iter().enumerate() {
        for q in m.queue {
            if q.deadline <= now {
                out.actions.push(Action::Expire {
                    model: i,
                    ticket: q.ticket,
                });
                expired[i].push(q.ticket);
            } else {
                out.wake(q.deadline);
            }
        }
    }
    let live = |i: usize| {
        let ex = &expired[i];
        snap.models[i]
            .queue
            .iter()
            .filter(move |q| !ex.contains(&q.ticket))
    };

    // Starts that take too long.
    for (i, m) in snap.models.iter().enumerate() {
        if m.phase == Phase::Starting {
            if let Some(d) = m.start_deadline {
                if d <= now {
                    out.actions.push(Action::StartTimedOut { model: i });
                } else {
                    out.wake(d);
                }
            }
        }
    }

    // Admission on ready and draining models.
    for (i, m) in snap.models.iter().enumerate() {
        let admissible: Box<dyn Iterator<Item = &Queued>> = match m.phase {
            Phase::Ready => Box::new(live(i)),
            Phase::Draining => {
                let since = m.drain_since.unwrap_or(now);
                Box::new(live(i).filter(move |q| q.enqueued <= since))
            }
            _ => continue,
        };
        let free = m.max_concurrency.saturating_sub(m.in_flight) as usize;
        for q in admissible.take(free) {
            out.actions.push(Action::Admit {
                model: i,
                ticket: q.ticket,
            });
        }
    }

    // What each model will have in flight or queued after this pass.
    let mut admitted = vec![0u32; n];
    for a in &out.actions {
        if let Action::Admit { model, .. } = a {
            admitted[*model] += 1;
        }
    }
    let busy: Vec<bool> = (0..n)
        .map(|i| snap.models[i].in_flight + admitted[i] > 0 || live(i).next().is_some())
        .collect();
    let drained: Vec<bool> = snap
        .models
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let since = m.drain_since.unwrap_or(now);
            m.phase == Phase::Draining
                && m.in_flight + admitted[i] == 0
                && !live(i).any(|q| q.enqueued <= since)
        })
        .collect();
    let mut pass = Pass {
        snap,
        leaving: vec![None; n],
        busy: busy.clone(),
        drained,
    };

    // Operator unloads and sleeps.
    for (i, m) in snap.models.iter().enumerate() {
        if m.unload_requested {
            let stop_now = match m.phase {
                Phase::Ready => !busy[i],
                Phase::Draining => pass.drained[i],
                Phase::Sleeping => true,
                _ => false,
            };
            if stop_now {
                out.actions.push(Action::Stop {
                    model: i,
                    reason: EvictReason::Admin,
                });
                pass.leaving[i] = Some(false);
            } else if m.phase == Phase::Ready {
                out.actions.push(Action::Drain { model: i });
            }
        } else if m.sleep_requested
            && m.can_sleep()
            && m.phase == Phase::Ready
            && !busy[i]
            && pass.sleep_fits(i)
        {
            out.actions.push(Action::Sleep {
                model: i,
                reason: EvictReason::Admin,
            });
            pass.leaving[i] = Some(true);
        }
    }

    // Models that want to run, oldest waiting first.
    let mut waiters: Vec<(Instant, usize)> = snap
        .models
        .iter()
        .enumerate()
        .filter(|(i, m)| {
            let wants = live(*i).next().is_some() || m.load_requested.is_some();
            let can = match m.phase {
                Phase::Cold | Phase::Sleeping => true,
                Phase::Failed => !matches!(m.retry_at, Some(t) if t > now),
                _ => false,
            };
            wants && can && !m.unload_requested && pass.leaving[*i].is_none() && m.releasing_mb == 0
        })
        .filter_map(|(i, m)| m.oldest_wait().map(|t| (t, i)))
        .collect();
    for (i, m) in snap.models.iter().enumerate() {
        if m.phase == Phase::Failed {
            if let Some(t) = m.retry_at {
                if t > now && (live(i).next().is_some() || m.load_requested.is_some()) {
                    out.wake(t);
                }
            }
        }
    }
    waiters.sort();

    // Held now (what a start must fit beside) and pools reserved by a waiter that does not fit.
    let mut held: Vec<u64> = (0..pools).map(|p| snap.used_mb(p)).collect();
    let mut reserved = vec![0u64; pools];
    let mut blocked_gpus: Vec<usize> = Vec::new();
    let mut blocked = false;
    let mut keep_draining: Vec<usize> = Vec::new();
    for &(_, w) in &waiters {
        let m = &snap.models[w];
        let options: Vec<Vec<usize>> = if m.phase == Phase::Sleeping {
            vec![m.placed.to_vec()]
        } else {
            m.options.to_vec()
        };
        let options: Vec<Vec<usize>> = options
            .into_iter()
            .filter(|o| !o.iter().any(|g| blocked_gpus.contains(g)))
            .collect();
        let fits_now = |o: &Vec<usize>| {
            let nd = need(m, o, pools);
            (0..pools)
                .all(|p| nd[p] == 0 || held[p] + nd[p] + reserved[p] <= snap.pools[p].capacity_mb)
        };
        // The tightest fit now: least GPU memory left over.
        let now_fit = options.iter().filter(|o| fits_now(o)).min_by_key(|o| {
            o.iter()
                .map(|&g| snap.pools[g].capacity_mb.saturating_sub(held[g]))
                .sum::<u64>()
        });
        if let Some(o) = now_fit {
            let nd = need(m, o, pools);
            for p in 0..pools {
                held[p] += nd[p];
            }
            if m.phase == Phase::Sleeping {
                out.actions.push(Action::Wake { model: w });
            } else {
                out.actions.push(Action::Start {
                    model: w,
                    gpus: o.clone(),
                });
            }
            continue;
        }
        if blocked {
            // Only the first waiter that does not fit may evict; later ones start only where it
            // leaves room.
            continue;
        }
        blocked = true;
        let settled = pass.settled_usage();
        let mut best: Option<(Vec<usize>, RoomPlan)> = None;
        for o in &options {
            let nd = need(m, o, pools);
            if let Some(rp) = pass.make_room(w, &nd, &settled, &reserved, policy, &mut out) {
                let better = best
                    .as_ref()
                    .is_none_or(|(_, b)| rp.cost(snap) < b.cost(snap));
                if better {
                    best = Some((o.clone(), rp));
                }
            }
        }
        // Reserve the chosen placement (or the first option when nothing fits) for this waiter.
        let chosen = best
            .as_ref()
            .map(|(o, _)| o.clone())
            .or_else(|| options.first().cloned())
            .unwrap_or_default();
        let nd = need(m, &chosen, pools);
        for p in 0..pools {
            reserved[p] += nd[p];
        }
        blocked_gpus.extend(chosen.iter().copied());
        if let Some((_, rp)) = best {
            for (i, step, to_sleep) in rp.picks {
                match step {
                    Step::Stop => out.actions.push(Action::Stop {
                        model: i,
                        reason: EvictReason::Memory,
                    }),
                    Step::Sleep => out.actions.push(Action::Sleep {
                        model: i,
                        reason: EvictReason::Memory,
                    }),
                    Step::Drain => out.actions.push(Action::Drain { model: i }),
                    Step::KeepDraining => keep_draining.push(i),
                }
                if matches!(step, Step::Stop | Step::Sleep) {
                    pass.leaving[i] = Some(to_sleep);
                } else {
                    keep_draining.push(i);
                }
            }
        } else if options.iter().any(|o| {
            let nd = need(m, o, pools);
            (0..pools).all(|p| nd[p] <= snap.pools[p].capacity_mb)
        }) {
            // Nothing would make it fit yet (memory still leaving, or busy models past their
            // residency later): keep what is draining draining. (If it can never fit, the pools
            // being smaller than it, draining models resume.)
            for (i, mm) in snap.models.iter().enumerate() {
                if mm.phase == Phase::Draining && pass.leaving[i].is_none() {
                    keep_draining.push(i);
                }
            }
        }
    }
    for (i, m) in snap.models.iter().enumerate() {
        if m.phase == Phase::Draining
            && pass.leaving[i].is_none()
            && !m.unload_requested
            && !keep_draining.contains(&i)
        {
            out.actions.push(Action::Resume { model: i });
        }
    }

    // Idle unloads (or sleeps), and sleepers kept too long.
    for (i, m) in snap.models.iter().enumerate() {
        if pass.leaving[i].is_some() || busy[i] || m.load_requested.is_some() {
            continue;
        }
        match m.phase {
            Phase::Ready => {
                if let Some(at) = policy.unload_idle_at(snap, i) {
                    if at <= now {
                        // Sleep only where host RAM can take what it keeps asleep; else stop.
                        let to_sleep = pass.sleep_fits(i);
                        out.actions.push(if to_sleep {
                            Action::Sleep {
                                model: i,
                                reason: EvictReason::Idle,
                            }
                        } else {
                            Action::Stop {
                                model: i,
                                reason: EvictReason::Idle,
                            }
                        });
                        pass.leaving[i] = Some(to_sleep);
                    } else {
                        out.wake(at);
                    }
                }
            }
            Phase::Sleeping => {
                if let Some(at) = policy.stop_asleep_at(snap, i) {
                    if at <= now {
                        out.actions.push(Action::Stop {
                            model: i,
                            reason: EvictReason::Idle,
                        });
                        pass.leaving[i] = Some(false);
                    } else {
                        out.wake(at);
                    }
                }
            }
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    struct M {
        id: &'static str,
        phase: Phase,
        mem: u64,
        in_flight: u32,
        conc: u32,
        queue: Vec<Queued>,
        last_used: Option<Instant>,
        ready_since: Option<Instant>,
        drain_since: Option<Instant>,
        retry_at: Option<Instant>,
        keep_warm: KeepWarm,
        min_residency: Duration,
        vram: u64,
        asleep: Option<Footprint>,
        options: Vec<Vec<usize>>,
        placed: Vec<usize>,
        asleep_since: Option<Instant>,
        keep_asleep: KeepWarm,
        sleep_requested: bool,
    }

    fn m(id: &'static str, phase: Phase, mem: u64) -> M {
        M {
            id,
            phase,
            mem,
            in_flight: 0,
            conc: 4,
            queue: Vec::new(),
            last_used: None,
            ready_since: None,
            drain_since: None,
            retry_at: None,
            keep_warm: KeepWarm::For(Duration::from_secs(300)),
            min_residency: Duration::ZERO,
            vram: 0,
            asleep: None,
            options: vec![vec![]],
            placed: Vec::new(),
            asleep_since: None,
            keep_asleep: KeepWarm::Forever,
            sleep_requested: false,
        }
    }

    fn q(t0: Instant, ticket: Ticket, at_ms: u64) -> Queued {
        Queued {
            ticket,
            enqueued: t0 + Duration::from_millis(at_ms),
            deadline: t0 + Duration::from_secs(240),
        }
    }

    fn view(ms: &[M]) -> Vec<ModelView<'_>> {
        ms.iter()
            .map(|m| ModelView {
                id: m.id,
                phase: m.phase,
                hot: Footprint {
                    host_mb: m.mem,
                    vram_mb: m.vram,
                },
                asleep: m.asleep,
                options: &m.options,
                placed: &m.placed,
                asleep_since: m.asleep_since,
                keep_asleep: m.keep_asleep,
                sleep_requested: m.sleep_requested,
                releasing_mb: 0,
                stopping_from: None,
                in_flight: m.in_flight,
                max_concurrency: m.conc,
                queue: &m.queue,
                last_used: m.last_used,
                ready_since: m.ready_since,
                drain_since: m.drain_since,
                start_deadline: None,
                retry_at: m.retry_at,
                keep_warm: m.keep_warm,
                min_residency: m.min_residency,
                load_requested: None,
                unload_requested: false,
            })
            .collect()
    }

    fn run(now: Instant, pool: u64, ms: &[M]) -> Plan {
        plan(&snapshot(now, &[pool], view(ms)), &LongestIdle)
    }

    #[test]
    fn a_full_queue_refuses_more_requests() {
        let t0 = Instant::now();
        let mut a = m("a", Phase::Starting, 300);
        a.queue = vec![q(t0, 1, 0), q(t0, 2, 1)];
        let ms = [a];
        let views = view(&ms);
        assert!(!accepts_request(&views[0], 2));
        assert!(accepts_request(&views[0], 3));
    }

    #[test]
    fn cold_model_with_a_request_starts_when_it_fits() {
        let t0 = Instant::now();
        let mut a = m("a", Phase::Cold, 300);
        a.queue = vec![q(t0, 1, 0)];
        let p = run(t0, 1000, &[a]);
        assert_eq!(
            p.actions,
            vec![Action::Start {
                model: 0,
                gpus: vec![]
            }]
        );
    }

    #[test]
    fn ready_model_admits_up_to_its_concurrency_in_fifo_order() {
        let t0 = Instant::now();
        let mut a = m("a", Phase::Ready, 300);
        a.conc = 2;
        a.in_flight = 1;
        a.queue = vec![q(t0, 7, 0), q(t0, 8, 1)];
        let p = run(t0, 1000, &[a]);
        assert_eq!(
            p.actions,
            vec![Action::Admit {
                model: 0,
                ticket: 7
            }]
        );
    }

    #[test]
    fn idle_model_is_evicted_for_a_waiting_one() {
        let t0 = Instant::now();
        let mut a = m("a", Phase::Ready, 600);
        a.ready_since = Some(t0);
        a.last_used = Some(t0);
        let mut b = m("b", Phase::Cold, 600);
        b.queue = vec![q(t0, 1, 0)];
        let now = t0 + Duration::from_secs(1);
        let p = run(now, 1000, &[a, b]);
        assert_eq!(
            p.actions,
            vec![Action::Stop {
                model: 0,
                reason: EvictReason::Memory
            }]
        );
    }

    #[test]
    fn waiting_model_starts_once_the_victim_has_exited() {
        let t0 = Instant::now();
        let a = m("a", Phase::Stopping, 600);
        let mut b = m("b", Phase::Cold, 600);
        b.queue = vec![q(t0, 1, 0)];
        assert!(run(t0, 1000, &[a, b]).actions.is_empty());
        let a = m("a", Phase::Cold, 600);
        let mut b = m("b", Phase::Cold, 600);
        b.queue = vec![q(t0, 1, 0)];
        assert_eq!(
            run(t0, 1000, &[a, b]).actions,
            vec![Action::Start {
                model: 1,
                gpus: vec![]
            }]
        );
    }

    #[test]
    fn a_model_with_requests_in_flight_is_drained_never_stopped() {
        let t0 = Instant::now();
        let mut a = m("a", Phase::Ready, 600);
        a.in_flight = 1;
        a.ready_since = Some(t0);
        let mut b = m("b", Phase::Cold, 600);
        b.queue = vec![q(t0, 1, 0)];
        let p = run(t0 + Duration::from_secs(1), 1000, &[a, b]);
        assert_eq!(p.actions, vec![Action::Drain { model: 0 }]);

        // Still in flight while draining: nothing more happens.
        let mut a = m("a", Phase::Draining, 600);
        a.in_flight = 1;
        a.drain_since = Some(t0);
        let mut b = m("b", Phase::Cold, 600);
        b.queue = vec![q(t0, 1, 0)];
        assert!(run(t0 + Duration::from_secs(2), 1000, &[a, b])
            .actions
            .is_empty());

        // In-flight done: stop it.
        let mut a = m("a", Phase::Draining, 600);
        a.drain_since = Some(t0);
        let mut b = m("b", Phase::Cold, 600);
        b.queue = vec![q(t0, 1, 0)];
        assert_eq!(
            run(t0 + Duration::from_secs(3), 1000, &[a, b]).actions,
            vec![Action::Stop {
                model: 0,
                reason: EvictReason::Memory
            }]
        );
    }

    #[test]
    fn draining_model_serves_what_was_queued_before_the_drain_but_nothing_newer() {
        let t0 = Instant::now();
        let mut a = m("a", Phase::Draining, 600);
        a.conc = 1;
        a.drain_since = Some(t0 + Duration::from_millis(10));
        a.queue = vec![q(t0, 1, 5), q(t0, 2, 20)];
        let mut b = m("b", Phase::Cold, 600);
        b.queue = vec![q(t0, 3, 8)];
        let p = run(t0 + Duration::from_millis(30), 1000, &[a, b]);
        assert_eq!(
            p.actions,
            vec![Action::Admit {
                model: 0,
                ticket: 1
            }]
        );

        // Old work done; the newer request waits for a reload after b.
        let mut a = m("a", Phase::Draining, 600);
        a.drain_since = Some(t0 + Duration::from_millis(10));
        a.queue = vec![q(t0, 2, 20)];
        let mut b = m("b", Phase::Cold, 600);
        b.queue = vec![q(t0, 3, 8)];
        let p = run(t0 + Duration::from_millis(40), 1000, &[a, b]);
        assert_eq!(
            p.actions,
            vec![Action::Stop {
                model: 0,
                reason: EvictReason::Memory
            }]
        );
    }

    #[test]
    fn draining_resumes_when_the_waiter_is_gone() {
        let t0 = Instant::now();
        let mut a = m("a", Phase::Draining, 600);
        a.in_flight = 1;
        a.drain_since = Some(t0);
        let b = m("b", Phase::Cold, 600);
        let p = run(t0, 1000, &[a, b]);
        assert_eq!(p.actions, vec![Action::Resume { model: 0 }]);
    }

    #[test]
    fn min_residency_defers_eviction_and_schedules_a_wake_up() {
        let t0 = Instant::now();
        let mut a = m("a", Phase::Ready, 600);
        a.ready_since = Some(t0);
        a.min_residency = Duration::from_secs(10);
        let mut b = m("b", Phase::Cold, 600);
        b.queue = vec![q(t0, 1, 0)];
        let p = run(t0 + Duration::from_secs(2), 1000, &[a, b]);
        assert!(p.actions.is_empty(), "{:?}", p.actions);
        assert_eq!(p.wake_at, Some(t0 + Duration::from_secs(10)));
    }

    #[test]
    fn nothing_is_evicted_if_it_would_not_make_room() {
        let t0 = Instant::now();
        // a is idle but b (busy, in residency) cannot go: evicting a alone does not fit c.
        let mut a = m("a", Phase::Ready, 300);
        a.ready_since = Some(t0);
        let mut b = m("b", Phase::Ready, 600);
        b.ready_since = Some(t0);
        b.in_flight = 1;
        b.min_residency = Duration::from_secs(60);
        let mut c = m("c", Phase::Cold, 800);
        c.queue = vec![q(t0, 1, 0)];
        let p = run(t0 + Duration::from_secs(1), 1000, &[a, b, c]);
        assert!(p.actions.is_empty(), "{:?}", p.actions);
    }

    #[test]
    fn idle_victims_are_preferred_to_draining_busy_ones_and_ranked_by_policy() {
        let t0 = Instant::now();
        let now = t0 + Duration::from_secs(100);
        let mut a = m("a", Phase::Ready, 300);
        a.ready_since = Some(t0);
        a.last_used = Some(t0 + Duration::from_secs(90)); // idle 10 s
        let mut b = m("b", Phase::Ready, 300);
        b.ready_since = Some(t0);
        b.last_used = Some(t0 + Duration::from_secs(10)); // idle 90 s
        let mut c = m("c", Phase::Ready, 300);
        c.ready_since = Some(t0);
        c.in_flight = 2;
        let mut d = m("d", Phase::Cold, 300);
        d.queue = vec![q(t0, 1, 0)];
        let p = run(now, 1000, &[a, b, c, d]);
        assert_eq!(
            p.actions,
            vec![Action::Stop {
                model: 1,
                reason: EvictReason::Memory
            }]
        );
    }

    #[test]
    fn fifo_across_models_a_later_small_waiter_does_not_overtake() {
        let t0 = Instant::now();
        let mut a = m("a", Phase::Ready, 500);
        a.in_flight = 1;
        a.ready_since = Some(t0);
        a.min_residency = Duration::from_secs(60);
        let mut big = m("big", Phase::Cold, 800);
        big.queue = vec![q(t0, 1, 0)];
        let mut small = m("small", Phase::Cold, 100);
        small.queue = vec![q(t0, 2, 5)];
        let p = run(t0 + Duration::from_secs(1), 1000, &[a, big, small]);
        assert!(p.actions.is_empty(), "{:?}", p.actions);

        // With the order reversed, the small one starts and the big one then waits.
        let mut a = m("a", Phase::Ready, 500);
        a.in_flight = 1;
        a.ready_since = Some(t0);
        a.min_residency = Duration::from_secs(60);
        let mut big = m("big", Phase::Cold, 800);
        big.queue = vec![q(t0, 1, 5)];
        let mut small = m("small", Phase::Cold, 100);
        small.queue = vec![q(t0, 2, 0)];
        let p = run(t0 + Duration::from_secs(1), 1000, &[a, big, small]);
        assert_eq!(
            p.actions,
            vec![Action::Start {
                model: 2,
                gpus: vec![]
            }]
        );
    }

    #[test]
    fn queued_requests_expire_at_their_deadline() {
        let t0 = Instant::now();
        let mut a = m("a", Phase::Starting, 300);
        a.queue = vec![
            Queued {
                ticket: 1,
                enqueued: t0,
                deadline: t0 + Duration::from_secs(1),
            },
            Queued {
                ticket: 2,
                enqueued: t0,
                deadline: t0 + Duration::from_secs(5),
            },
        ];
        let p = run(t0 + Duration::from_secs(2), 1000, &[a]);
        assert_eq!(
            p.actions,
            vec![Action::Expire {
                model: 0,
                ticket: 1
            }]
        );
        assert_eq!(p.wake_at, Some(t0 + Duration::from_secs(5)));
    }

    #[test]
    fn idle_models_unload_after_keep_warm_and_forever_never() {
        let t0 = Instant::now();
        let mut a = m("a", Phase::Ready, 300);
        a.ready_since = Some(t0);
        a.last_used = Some(t0);
        a.keep_warm = KeepWarm::For(Duration::from_secs(60));
        let mut b = m("b", Phase::Ready, 300);
        b.ready_since = Some(t0);
        b.keep_warm = KeepWarm::Forever;
        let p = run(t0 + Duration::from_secs(30), 1000, &[a, b]);
        assert!(p.actions.is_empty());
        assert_eq!(p.wake_at, Some(t0 + Duration::from_secs(60)));
        let mut a = m("a", Phase::Ready, 300);
        a.ready_since = Some(t0);
        a.last_used = Some(t0);
        a.keep_warm = KeepWarm::For(Duration::from_secs(60));
        let p = run(t0 + Duration::from_secs(61), 1000, &[a]);
        assert_eq!(
            p.actions,
            vec![Action::Stop {
                model: 0,
                reason: EvictReason::Idle
            }]
        );
    }

    #[test]
    fn failed_model_retries_after_backoff_only_when_asked() {
        let t0 = Instant::now();
        let mut a = m("a", Phase::Failed, 300);
        a.retry_at = Some(t0 + Duration::from_secs(2));
        a.queue = vec![q(t0, 1, 0)];
        let p = run(t0 + Duration::from_secs(1), 1000, &[a]);
        assert!(p.actions.is_empty());
        assert_eq!(p.wake_at, Some(t0 + Duration::from_secs(2)));
        let mut a = m("a", Phase::Failed, 300);
        a.retry_at = Some(t0 + Duration::from_secs(2));
        a.queue = vec![q(t0, 1, 0)];
        assert_eq!(
            run(t0 + Duration::from_secs(3), 1000, &[a]).actions,
            vec![Action::Start {
                model: 0,
                gpus: vec![]
            }]
        );
        // No request: no retry.
        let mut a = m("a", Phase::Failed, 300);
        a.retry_at = Some(t0);
        assert!(run(t0 + Duration::from_secs(3), 1000, &[a])
            .actions
            .is_empty());
    }

    #[test]
    fn a_b_a_interleaving_serves_queued_work_before_swapping() {
        // a is loaded and has a queued request behind its in-flight one; b arrives. a keeps serving
        // its queue (it is drained, not stopped), b waits.
        let t0 = Instant::now();
        let mut a = m("a", Phase::Ready, 600);
        a.conc = 1;
        a.in_flight = 1;
        a.ready_since = Some(t0);
        a.queue = vec![q(t0, 1, 1)];
        let mut b = m("b", Phase::Cold, 600);
        b.queue = vec![q(t0, 2, 2)];
        let p = run(t0 + Duration::from_secs(1), 1000, &[a, b]);
        assert_eq!(p.actions, vec![Action::Drain { model: 0 }]);
    }

    // ---- GPU pools and sleep tiers ----

    fn run_pools(now: Instant, caps: &[u64], ms: &[M]) -> Plan {
        plan(&snapshot(now, caps, view(ms)), &LongestIdle)
    }

    /// Pool 0 (host) and GPU pools of these capacities.
    fn snapshot<'a>(now: Instant, caps: &[u64], models: Vec<ModelView<'a>>) -> Snapshot<'a> {
        Snapshot {
            now,
            pools: caps
                .iter()
                .enumerate()
                .map(|(i, c)| Pool {
                    name: if i == 0 {
                        "host".into()
                    } else {
                        format!("gpu{}", i - 1)
                    },
                    capacity_mb: *c,
                })
                .collect(),
            models,
        }
    }

    /// A model on GPU pool(s): `host` MB of RAM and `vram` MB on each placed GPU.
    fn g(id: &'static str, phase: Phase, host: u64, vram: u64, options: Vec<Vec<usize>>) -> M {
        let mut x = m(id, phase, host);
        x.vram = vram;
        x.options = options;
        if phase.holds_memory() {
            x.placed = x.options[0].clone();
        }
        x
    }

    fn sleeper(x: &mut M, host: u64, vram: u64) {
        x.asleep = Some(Footprint {
            host_mb: host,
            vram_mb: vram,
        });
    }

    #[test]
    fn a_model_over_its_gpus_budget_waits_and_the_busy_one_is_drained_not_stopped() {
        let t0 = Instant::now();
        let mut a = g("a", Phase::Ready, 500, 50_000, vec![vec![1]]);
        a.in_flight = 1;
        a.ready_since = Some(t0);
        let mut b = g("b", Phase::Cold, 500, 50_000, vec![vec![1]]);
        b.queue = vec![q(t0, 1, 1)];
        let p = run_pools(t0 + Duration::from_secs(1), &[8000, 80_000], &[a, b]);
        assert_eq!(p.actions, vec![Action::Drain { model: 0 }]);
        // Host RAM alone would have fit: the GPU is what is short.
        let mut c = g("c", Phase::Cold, 500, 20_000, vec![vec![1]]);
        c.queue = vec![q(t0, 1, 1)];
        let a = g("a", Phase::Ready, 500, 50_000, vec![vec![1]]);
        let p = run_pools(t0, &[8000, 80_000], &[a, c]);
        assert_eq!(
            p.actions,
            vec![Action::Start {
                model: 1,
                gpus: vec![1]
            }]
        );
    }

    #[test]
    fn any_gpu_goes_where_it_fits_tightest() {
        let t0 = Instant::now();
        let x = g("x", Phase::Ready, 100, 60_000, vec![vec![1]]);
        let mut small = g("small", Phase::Cold, 100, 15_000, vec![vec![1], vec![2]]);
        small.queue = vec![q(t0, 1, 0)];
        let p = run_pools(t0, &[8000, 80_000, 80_000], &[x, small]);
        assert_eq!(
            p.actions,
            vec![Action::Start {
                model: 1,
                gpus: vec![1]
            }]
        );
        let x = g("x", Phase::Ready, 100, 60_000, vec![vec![1]]);
        let mut big = g("big", Phase::Cold, 100, 30_000, vec![vec![1], vec![2]]);
        big.queue = vec![q(t0, 1, 0)];
        let p = run_pools(t0, &[8000, 80_000, 80_000], &[x, big]);
        assert_eq!(
            p.actions,
            vec![Action::Start {
                model: 1,
                gpus: vec![2]
            }]
        );
        // A split model needs room on every GPU it lists.
        let x = g("x", Phase::Ready, 100, 60_000, vec![vec![1]]);
        let mut tp = g("tp", Phase::Cold, 100, 30_000, vec![vec![1, 2]]);
        tp.queue = vec![q(t0, 1, 0)];
        let p = run_pools(t0, &[8000, 80_000, 80_000], &[x, tp]);
        assert_eq!(
            p.actions,
            vec![Action::Stop {
                model: 0,
                reason: EvictReason::Memory
            }]
        );
    }

    #[test]
    fn an_idle_sleep_capable_model_sleeps_for_gpu_memory_and_then_counts_in_host_ram() {
        let t0 = Instant::now();
        let mut a = g("a", Phase::Ready, 500, 50_000, vec![vec![1]]);
        sleeper(&mut a, 1500, 0);
        let mut b = g("b", Phase::Cold, 500, 50_000, vec![vec![1]]);
        b.queue = vec![q(t0, 1, 0)];
        let p = run_pools(t0, &[8000, 80_000], &[a, b]);
        assert_eq!(
            p.actions,
            vec![Action::Sleep {
                model: 0,
                reason: EvictReason::Memory
            }]
        );
        // Asleep, it holds host RAM and no VRAM: b starts.
        let mut a = g("a", Phase::Sleeping, 500, 50_000, vec![vec![1]]);
        sleeper(&mut a, 1500, 0);
        let mut b = g("b", Phase::Cold, 500, 50_000, vec![vec![1]]);
        b.queue = vec![q(t0, 1, 0)];
        let ms = [a, b];
        let v = view(&ms);
        assert_eq!(v[0].usage(HOST), 1500);
        assert_eq!(v[0].usage(1), 0);
        let p = run_pools(t0, &[8000, 80_000], &ms);
        assert_eq!(
            p.actions,
            vec![Action::Start {
                model: 1,
                gpus: vec![1]
            }]
        );
        // While it goes to sleep, both sides count.
        let mut s = g("a", Phase::Suspending, 500, 50_000, vec![vec![1]]);
        sleeper(&mut s, 1500, 300);
        let v = view(std::slice::from_ref(&s));
        assert_eq!((v[0].usage(HOST), v[0].usage(1)), (1500, 50_000));
    }

    #[test]
    fn host_ram_pressure_stops_the_sleeper_and_a_sleep_that_would_not_fit_becomes_a_stop() {
        let t0 = Instant::now();
        let mut a = g("a", Phase::Sleeping, 500, 50_000, vec![vec![1]]);
        sleeper(&mut a, 1500, 0);
        let mut b = m("b", Phase::Cold, 1000);
        b.queue = vec![q(t0, 1, 0)];
        let p = run_pools(t0, &[2000, 80_000], &[a, b]);
        assert_eq!(
            p.actions,
            vec![Action::Stop {
                model: 0,
                reason: EvictReason::Memory
            }]
        );
        // Sleeping would need 1500 MB of host RAM beside b's 500: more than 1800.
        let mut a = g("a", Phase::Ready, 500, 50_000, vec![vec![1]]);
        sleeper(&mut a, 1500, 0);
        let mut b = g("b", Phase::Cold, 500, 50_000, vec![vec![1]]);
        b.queue = vec![q(t0, 1, 0)];
        let p = run_pools(t0, &[1800, 80_000], &[a, b]);
        assert_eq!(
            p.actions,
            vec![Action::Stop {
                model: 0,
                reason: EvictReason::Memory
            }]
        );
    }

    #[test]
    fn a_sleeping_model_with_a_request_wakes_in_place_making_room_on_its_gpu() {
        let t0 = Instant::now();
        let mut a = g("a", Phase::Sleeping, 500, 50_000, vec![vec![1]]);
        sleeper(&mut a, 1500, 500);
        a.queue = vec![q(t0, 1, 0)];
        let p = run_pools(t0, &[8000, 80_000], &[a]);
        assert_eq!(p.actions, vec![Action::Wake { model: 0 }]);
        // Its GPU is taken by an idle model that can sleep too: that one sleeps first.
        let mut a = g("a", Phase::Sleeping, 500, 50_000, vec![vec![1]]);
        sleeper(&mut a, 1500, 500);
        a.queue = vec![q(t0, 1, 0)];
        let mut b = g("b", Phase::Ready, 500, 50_000, vec![vec![1]]);
        sleeper(&mut b, 1500, 500);
        b.last_used = Some(t0);
        let p = run_pools(t0 + Duration::from_secs(1), &[8000, 80_000], &[a, b]);
        assert_eq!(
            p.actions,
            vec![Action::Sleep {
                model: 1,
                reason: EvictReason::Memory
            }]
        );
    }

    #[test]
    fn idle_sleep_mode_models_sleep_after_keep_warm_and_stop_after_keep_asleep() {
        let t0 = Instant::now();
        let mut a = g("a", Phase::Ready, 500, 50_000, vec![vec![1]]);
        sleeper(&mut a, 1500, 0);
        a.keep_warm = KeepWarm::For(Duration::from_secs(60));
        a.last_used = Some(t0);
        let p = run_pools(t0 + Duration::from_secs(61), &[8000, 80_000], &[a]);
        assert_eq!(
            p.actions,
            vec![Action::Sleep {
                model: 0,
                reason: EvictReason::Idle
            }]
        );
        let mut a = g("a", Phase::Sleeping, 500, 50_000, vec![vec![1]]);
        sleeper(&mut a, 1500, 0);
        a.asleep_since = Some(t0);
        a.keep_asleep = KeepWarm::For(Duration::from_secs(600));
        let p = run_pools(t0 + Duration::from_secs(10), &[8000, 80_000], &[a]);
        assert!(p.actions.is_empty());
        assert_eq!(p.wake_at, Some(t0 + Duration::from_secs(600)));
        let mut a = g("a", Phase::Sleeping, 500, 50_000, vec![vec![1]]);
        sleeper(&mut a, 1500, 0);
        a.asleep_since = Some(t0);
        a.keep_asleep = KeepWarm::For(Duration::from_secs(600));
        let p = run_pools(t0 + Duration::from_secs(601), &[8000, 80_000], &[a]);
        assert_eq!(
            p.actions,
            vec![Action::Stop {
                model: 0,
                reason: EvictReason::Idle
            }]
        );
    }

    #[test]
    fn no_more_is_evicted_than_needed() {
        // x is idle longest (ranked first) but too small to make room alone; y alone suffices.
        let t0 = Instant::now();
        let mut x = g("x", Phase::Ready, 100, 20_000, vec![vec![1]]);
        x.last_used = Some(t0);
        let mut y = g("y", Phase::Ready, 100, 60_000, vec![vec![1]]);
        y.last_used = Some(t0 + Duration::from_secs(5));
        let mut w = g("w", Phase::Cold, 100, 50_000, vec![vec![1]]);
        w.queue = vec![q(t0, 1, 6000)];
        let p = run_pools(t0 + Duration::from_secs(10), &[8000, 80_000], &[x, y, w]);
        assert_eq!(
            p.actions,
            vec![Action::Stop {
                model: 1,
                reason: EvictReason::Memory
            }]
        );
    }

    #[test]
    fn a_blocked_waiter_reserves_only_its_own_gpu() {
        let t0 = Instant::now();
        let mut busy = g("busy", Phase::Ready, 100, 70_000, vec![vec![1]]);
        busy.in_flight = 1;
        let mut w = g("w", Phase::Cold, 100, 30_000, vec![vec![1]]);
        w.queue = vec![q(t0, 1, 0)];
        let mut v = g("v", Phase::Cold, 100, 30_000, vec![vec![2]]);
        v.queue = vec![q(t0, 2, 5)];
        let mut u = g("u", Phase::Cold, 100, 5_000, vec![vec![1]]);
        u.queue = vec![q(t0, 3, 9)];
        let p = run_pools(
            t0 + Duration::from_secs(1),
            &[8000, 80_000, 80_000],
            &[busy, w, v, u],
        );
        // w waits for busy to drain; v starts on the other GPU; u (small, same GPU as w) does not
        // overtake w.
        assert_eq!(
            p.actions,
            vec![
                Action::Drain { model: 0 },
                Action::Start {
                    model: 2,
                    gpus: vec![2]
                }
            ]
        );
    }

    #[test]
    fn memory_not_yet_freed_on_the_gpu_still_counts_and_blocks_a_restart() {
        let t0 = Instant::now();
        let mut gone = g("gone", Phase::Cold, 100, 50_000, vec![vec![1]]);
        gone.placed = vec![1];
        gone.queue = vec![q(t0, 1, 0)];
        let mut w = g("w", Phase::Cold, 100, 50_000, vec![vec![1]]);
        w.queue = vec![q(t0, 2, 1)];
        let mut ms = vec![gone, w];
        let mut snap_views = view(&ms);
        snap_views[0].releasing_mb = 50_000;
        let snap = snapshot(t0, &[8000, 80_000], snap_views);
        assert_eq!(snap.used_mb(1), 50_000);
        assert!(plan(&snap, &LongestIdle).actions.is_empty());
        // Once freed, w starts (gone's own request comes second: FIFO).
        ms[0].placed.clear();
        let p = run_pools(t0, &[8000, 80_000], &ms);
        assert_eq!(
            p.actions,
            vec![Action::Start {
                model: 0,
                gpus: vec![1]
            }]
        );
    }

    #[test]
    fn an_operator_sleep_waits_for_in_flight_work() {
        let t0 = Instant::now();
        let mut a = g("a", Phase::Ready, 500, 50_000, vec![vec![1]]);
        sleeper(&mut a, 1500, 0);
        a.sleep_requested = true;
        a.in_flight = 1;
        assert!(run_pools(t0, &[8000, 80_000], &[a]).actions.is_empty());
        let mut a = g("a", Phase::Ready, 500, 50_000, vec![vec![1]]);
        sleeper(&mut a, 1500, 0);
        a.sleep_requested = true;
        assert_eq!(
            run_pools(t0, &[8000, 80_000], &[a]).actions,
            vec![Action::Sleep {
                model: 0,
                reason: EvictReason::Admin
            }]
        );
    }

    #[test]
    fn a_sleeper_being_stopped_still_counts_what_it_holds_asleep() {
        let t0 = Instant::now();
        let mut a = g("a", Phase::Stopping, 2000, 50_000, vec![vec![1]]);
        sleeper(&mut a, 42_000, 500);
        let mut w = m("w", Phase::Cold, 50_000);
        w.queue = vec![q(t0, 1, 0)];
        let ms = [a, w];
        let mut v = view(&ms);
        v[0].stopping_from = Some(Phase::Sleeping);
        assert_eq!((v[0].usage(HOST), v[0].usage(1)), (42_000, 500));
        let snap = snapshot(t0, &[60_000, 80_000], v);
        assert!(
            plan(&snap, &LongestIdle).actions.is_empty(),
            "w must wait for the exit"
        );
    }

    #[test]
    fn an_idle_model_stops_instead_of_sleeping_when_host_ram_cannot_take_it() {
        let t0 = Instant::now();
        let mut a = g("a", Phase::Ready, 2000, 50_000, vec![vec![1]]);
        sleeper(&mut a, 42_000, 0);
        a.keep_warm = KeepWarm::For(Duration::from_secs(1));
        a.last_used = Some(t0);
        let mut b = m("b", Phase::Ready, 50_000);
        b.in_flight = 1;
        let p = run_pools(t0 + Duration::from_secs(2), &[60_000, 80_000], &[a, b]);
        assert_eq!(
            p.actions,
            vec![Action::Stop {
                model: 0,
                reason: EvictReason::Idle
            }]
        );
    }

    #[test]
    fn a_pick_that_made_host_room_for_a_sleep_is_not_dropped() {
        let t0 = Instant::now();
        let mut w = g("w", Phase::Sleeping, 500, 50_000, vec![vec![1]]);
        sleeper(&mut w, 1500, 0);
        w.queue = vec![q(t0, 1, 0)];
        let mut b = g("b", Phase::Ready, 4000, 3000, vec![vec![1]]);
        b.last_used = Some(t0);
        let mut c = g("c", Phase::Ready, 500, 35_000, vec![vec![1]]);
        sleeper(&mut c, 6000, 0);
        c.last_used = Some(t0 + Duration::from_secs(1));
        let p = run_pools(t0 + Duration::from_secs(5), &[10_000, 80_000], &[w, b, c]);
        assert_eq!(
            p.actions,
            vec![
                Action::Stop {
                    model: 1,
                    reason: EvictReason::Memory
                },
                Action::Sleep {
                    model: 2,
                    reason: EvictReason::Memory
                }
            ]
        );
    }

    #[test]
    fn draining_models_resume_when_the_waiter_can_never_fit() {
        let t0 = Instant::now();
        let mut a = g("a", Phase::Draining, 100, 30_000, vec![vec![1]]);
        a.drain_since = Some(t0);
        a.queue = vec![q(t0, 2, 10)];
        let mut w = g("w", Phase::Cold, 100, 60_000, vec![vec![1]]);
        w.queue = vec![q(t0, 1, 0)];
        let p = run_pools(t0 + Duration::from_secs(1), &[8000, 50_000], &[a, w]);
        assert_eq!(p.actions, vec![Action::Resume { model: 0 }]);
    }

    #[test]
    fn an_operator_unload_of_a_busy_model_drains_it_once() {
        let t0 = Instant::now();
        let mut a = g("a", Phase::Ready, 100, 50_000, vec![vec![1]]);
        a.in_flight = 1;
        let mut w = g("w", Phase::Cold, 100, 50_000, vec![vec![1]]);
        w.queue = vec![q(t0, 1, 0)];
        let ms = [a, w];
        let mut v = view(&ms);
        v[0].unload_requested = true;
        let snap = snapshot(t0, &[8000, 80_000], v);
        assert_eq!(
            plan(&snap, &LongestIdle).actions,
            vec![Action::Drain { model: 0 }]
        );
    }
}
