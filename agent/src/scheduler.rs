//! Scheduling decisions as pure functions over a snapshot.
//!
//! The supervisor (the only owner of state) builds a [`Snapshot`] after every event and applies the
//! [`Action`]s that [`plan`] returns; nothing here touches a process, a clock or a channel, so every
//! rule is unit-tested below without processes.
//!
//! Rules:
//! - A ready model admits its queued requests in FIFO order up to `max_concurrency`.
//! - Cold models with waiting requests are started in the order of their oldest request (FIFO across
//!   models); a model that does not fit reserves the pool, so a later, smaller one cannot overtake it.
//! - To make room, idle models (nothing in flight or queued, past `min_residency`) are stopped in the
//!   order the [`Policy`] ranks them; only when that is not enough are busy models *drained*: they
//!   finish what is in flight and what was queued before the drain began, admit nothing newer, and are
//!   stopped once empty. A model with requests in flight is never stopped for memory.
//! - Nothing is evicted unless the evictions would really make the waiting model fit.
//! - A draining model whose memory is no longer needed resumes.
//! - Idle models whose policy says so are unloaded; queued requests past their deadline expire;
//!   starts that exceed `start_timeout` fail; failed models retry after their backoff when asked for.

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
}

impl Phase {
    pub const ALL: [Phase; 6] = [
        Phase::Cold,
        Phase::Starting,
        Phase::Ready,
        Phase::Draining,
        Phase::Stopping,
        Phase::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Cold => "cold",
            Phase::Starting => "starting",
            Phase::Ready => "ready",
            Phase::Draining => "draining",
            Phase::Stopping => "stopping",
            Phase::Failed => "failed",
        }
    }

    /// Whether the runtime process exists and so holds memory.
    pub fn holds_memory(self) -> bool {
        matches!(
            self,
            Phase::Starting | Phase::Ready | Phase::Draining | Phase::Stopping
        )
    }
}

/// A request waiting for its model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Queued {
    pub ticket: Ticket,
    pub enqueued: Instant,
    pub deadline: Instant,
}

/// What the scheduler sees of one model.
#[derive(Debug, Clone)]
pub struct ModelView<'a> {
    pub id: &'a str,
    pub phase: Phase,
    pub memory_mb: u64,
    pub in_flight: u32,
    pub max_concurrency: u32,
    pub queue: &'a [Queued],
    pub last_used: Option<Instant>,
    pub ready_since: Option<Instant>,
    pub drain_since: Option<Instant>,
    pub start_deadline: Option<Instant>,
    pub retry_at: Option<Instant>,
    pub keep_warm: KeepWarm,
    pub min_residency: Duration,
    /// An operator asked to load it (admin API), since this instant.
    pub load_requested: Option<Instant>,
    /// An operator asked to unload it.
    pub unload_requested: bool,
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

    fn idle_for(&self, now: Instant) -> Duration {
        self.last_used
            .or(self.ready_since)
            .map(|t| now.saturating_duration_since(t))
            .unwrap_or_default()
    }
}

/// One memory pool (for now: host RAM).
#[derive(Debug, Clone)]
pub struct Snapshot<'a> {
    pub now: Instant,
    pub pool_mb: u64,
    pub models: Vec<ModelView<'a>>,
}

impl Snapshot<'_> {
    pub fn used_mb(&self) -> u64 {
        self.models
            .iter()
            .filter(|m| m.phase.holds_memory())
            .map(|m| m.memory_mb)
            .sum()
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
    /// Spawn the runtime.
    Start { model: usize },
    /// Stop the runtime (it has nothing in flight).
    Stop { model: usize, reason: EvictReason },
    /// Stop admitting newer requests; stop once empty.
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

    /// When model `i`, idle now, should be unloaded; `None` = keep it.
    fn unload_idle_at(&self, snap: &Snapshot<'_>, i: usize) -> Option<Instant>;
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

/// Decides what to do now.
pub fn plan(snap: &Snapshot<'_>, policy: &dyn Policy) -> Plan {
    let now = snap.now;
    let mut out = Plan::default();

    // Deadlines of queued requests.
    let mut expired: Vec<Vec<Ticket>> = vec![Vec::new(); snap.models.len()];
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
    let mut admitted_n = vec![0u32; snap.models.len()];
    for a in &out.actions {
        if let Action::Admit { model, .. } = a {
            admitted_n[*model] += 1;
        }
    }
    let admitted = |i: usize| admitted_n[i];
    let busy: Vec<bool> = (0..snap.models.len())
        .map(|i| snap.models[i].in_flight + admitted(i) > 0 || live(i).next().is_some())
        .collect();

    // Draining models that are now empty of old work stop.
    let mut stopping = vec![false; snap.models.len()];
    for (i, m) in snap.models.iter().enumerate() {
        if m.phase != Phase::Draining {
            continue;
        }
        let since = m.drain_since.unwrap_or(now);
        let old_work = m.in_flight + admitted(i) > 0 || live(i).any(|q| q.enqueued <= since);
        if !old_work {
            let reason = if m.unload_requested {
                EvictReason::Admin
            } else {
                EvictReason::Memory
            };
            out.actions.push(Action::Stop { model: i, reason });
            stopping[i] = true;
        }
    }

    // Operator unloads.
    for (i, m) in snap.models.iter().enumerate() {
        if m.unload_requested && m.phase == Phase::Ready {
            if !busy[i] {
                out.actions.push(Action::Stop {
                    model: i,
                    reason: EvictReason::Admin,
                });
                stopping[i] = true;
            } else {
                out.actions.push(Action::Drain { model: i });
            }
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
                Phase::Cold => true,
                Phase::Failed => !matches!(m.retry_at, Some(t) if t > now),
                _ => false,
            };
            wants && can && !m.unload_requested
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

    let mut held: u64 = snap.used_mb();
    // Memory already on its way out (stopping now, or stopped by this pass).
    let leaving: u64 = snap
        .models
        .iter()
        .enumerate()
        .filter(|(i, m)| m.phase == Phase::Stopping || stopping[*i])
        .map(|(_, m)| m.memory_mb)
        .sum();
    let mut needed_drains: Vec<usize> = Vec::new();
    for &(_, w) in &waiters {
        let need = snap.models[w].memory_mb;
        if held + need <= snap.pool_mb {
            out.actions.push(Action::Start { model: w });
            held += need;
            continue;
        }
        // Not enough: plan evictions, but only if they would make it fit.
        let shortfall = held + need - snap.pool_mb;
        let already = leaving
            + snap
                .models
                .iter()
                .enumerate()
                .filter(|(i, m)| m.phase == Phase::Draining && !stopping[*i])
                .map(|(_, m)| m.memory_mb)
                .sum::<u64>();
        let mut idle: Vec<usize> = Vec::new();
        let mut drainable: Vec<usize> = Vec::new();
        for (i, m) in snap.models.iter().enumerate() {
            if m.phase != Phase::Ready || stopping[i] || !m.resident_enough(now) {
                if m.phase == Phase::Ready {
                    if let Some(t) = m.ready_since {
                        out.wake(t + m.min_residency);
                    }
                }
                continue;
            }
            if busy[i] {
                drainable.push(i);
            } else {
                idle.push(i);
            }
        }
        policy.rank_victims(snap, &mut idle);
        policy.rank_victims(snap, &mut drainable);
        let reclaimable = already
            + idle.iter().map(|&i| snap.models[i].memory_mb).sum::<u64>()
            + drainable
                .iter()
                .map(|&i| snap.models[i].memory_mb)
                .sum::<u64>();
        if reclaimable >= shortfall {
            let mut got = already;
            for &i in &idle {
                if got >= shortfall {
                    break;
                }
                out.actions.push(Action::Stop {
                    model: i,
                    reason: EvictReason::Memory,
                });
                stopping[i] = true;
                got += snap.models[i].memory_mb;
            }
            for &i in &drainable {
                if got >= shortfall {
                    break;
                }
                needed_drains.push(i);
                got += snap.models[i].memory_mb;
            }
        }
        // Also keep any model that is already draining draining while this waiter needs memory.
        for (i, m) in snap.models.iter().enumerate() {
            if m.phase == Phase::Draining && !stopping[i] {
                needed_drains.push(i);
            }
        }
        // Strict FIFO: the pool is reserved for this waiter.
        break;
    }
    for &i in &needed_drains {
        if snap.models[i].phase == Phase::Ready {
            out.actions.push(Action::Drain { model: i });
        }
    }
    for (i, m) in snap.models.iter().enumerate() {
        if m.phase == Phase::Draining
            && !stopping[i]
            && !m.unload_requested
            && !needed_drains.contains(&i)
        {
            out.actions.push(Action::Resume { model: i });
        }
    }

    // Idle unloads.
    for (i, m) in snap.models.iter().enumerate() {
        if m.phase != Phase::Ready || stopping[i] || busy[i] || m.load_requested.is_some() {
            continue;
        }
        if let Some(at) = policy.unload_idle_at(snap, i) {
            if at <= now {
                out.actions.push(Action::Stop {
                    model: i,
                    reason: EvictReason::Idle,
                });
            } else {
                out.wake(at);
            }
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
                memory_mb: m.mem,
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
        let snap = Snapshot {
            now,
            pool_mb: pool,
            models: view(ms),
        };
        plan(&snap, &LongestIdle)
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
        assert_eq!(p.actions, vec![Action::Start { model: 0 }]);
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
            vec![Action::Start { model: 1 }]
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
        assert_eq!(p.actions, vec![Action::Start { model: 2 }]);
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
            vec![Action::Start { model: 0 }]
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
}
