//! The gateway sensor: per-session traffic to the chat gateway, seen with eBPF.
//!
//! Kernel programs (`agent-ebpf`) count bytes and packets per TCP flow of the gateway's cgroup and
//! report connection open/close on the gateway ports ([`kernel`]). A poller turns them into
//! [`Observation`]s: the same serializable form whether they come from this host's kernel or, later,
//! from a `hearth sensor` on the gateway host. The [`Tracker`] (pure, unit-tested) turns observations
//! into **sessions** (an inbound connection to a gateway port, keyed by its peer) and **channels**
//! (the gateway's outbound connections), with per-interval byte counts and an
//! `active | idle | closed` state. The sensor actor owns the tracker, answers snapshots for
//! `GET /hearth/v1/sessions`, updates the metrics and publishes an [`Activity`] stream (a
//! `broadcast` channel) for the predictor and the event store.

pub mod kernel;
pub mod report;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc, oneshot};

use crate::config::SensorConfig;
use crate::metrics::Metrics;

/// Intervals of per-interval byte counts kept per session.
pub const INTERVALS_KEPT: usize = 60;

/// Milliseconds since the Unix epoch.
pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// One flow's cumulative counters, from the gateway's point of view (`local` is the gateway).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowCounters {
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub packets_in: u64,
    pub packets_out: u64,
    /// When the flow's first packet was seen (Unix ms, the sensor's clock).
    #[serde(default)]
    pub first_seen_ms: u64,
    /// When these counters were read (Unix ms, the sensor's clock): a change since the previous
    /// reading is activity at this time.
    pub last_seen_ms: u64,
}

/// What a sensor reports: cumulative counters per flow, and connection open/close on the gateway
/// ports. Serializable so that a remote sensor sends exactly what the local one produces.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Observation {
    Counters(FlowCounters),
    Opened {
        local: SocketAddr,
        remote: SocketAddr,
        at_ms: u64,
    },
    Closed {
        local: SocketAddr,
        remote: SocketAddr,
        at_ms: u64,
    },
    /// The sensor deleted the flow's counters (idle too long): later counters of it start from 0.
    Reset {
        local: SocketAddr,
        remote: SocketAddr,
    },
}

/// One poll's worth of observations, as the kernel poller produces them and a remote sensor sends
/// them (`POST /hearth/v1/activity`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Batch {
    pub observations: Vec<Observation>,
    /// This batch ends a poll interval of its source.
    pub end_interval: bool,
    /// Open/close events the source's kernel programs could not queue since they were loaded
    /// (their ring buffer was full: the reader fell behind a burst of connections). Cumulative.
    #[serde(default)]
    pub events_lost: u64,
}

/// What a remote sensor posts.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    /// The sensor's name (`[sensor] name`, default the gateway host's hostname).
    pub source: String,
    pub batches: Vec<Batch>,
    /// The gateway ports on that host: flows to them are sessions, the others channels.
    pub gateway_ports: Vec<u16>,
    /// Batches the sensor dropped so far because its buffer was full (the agent was unreachable).
    pub dropped_total: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionState {
    Active,
    Idle,
    Closed,
}

impl SessionState {
    pub const ALL: [SessionState; 3] = [
        SessionState::Active,
        SessionState::Idle,
        SessionState::Closed,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            SessionState::Active => "active",
            SessionState::Idle => "idle",
            SessionState::Closed => "closed",
        }
    }
}

/// One inbound connection to the gateway (CLI, Control UI, a node): a chat session's transport.
#[derive(Debug, Clone, Serialize)]
pub struct Session {
    /// `<source>/<peer ip:port>` (the source is `local` or a remote sensor's name).
    pub id: String,
    pub source: String,
    pub peer: SocketAddr,
    pub gateway: SocketAddr,
    pub state: SessionState,
    pub first_seen_ms: u64,
    pub last_activity_ms: u64,
    pub closed_ms: Option<u64>,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub packets_in: u64,
    pub packets_out: u64,
    /// Bytes (in, out) per poll interval, oldest first, at most [`INTERVALS_KEPT`].
    pub intervals: VecDeque<(u64, u64)>,
    #[serde(skip)]
    interval_now: (u64, u64),
}

/// The gateway's outbound connections to one remote endpoint (a channel: Telegram, Slack, a model
/// provider...), aggregated.
#[derive(Debug, Clone, Serialize)]
pub struct Channel {
    pub source: String,
    pub remote: SocketAddr,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub last_activity_ms: u64,
    pub state: SessionState,
}

/// What the predictor (and the event store) receive.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Activity {
    pub session: String,
    pub at_ms: u64,
    pub kind: ActivityKind,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ActivityKind {
    Opened,
    /// Traffic in the last poll interval.
    Traffic {
        bytes_in: u64,
        bytes_out: u64,
    },
    Idle,
    Closed,
}

/// Turns observations into sessions and channels. Pure: time comes in as arguments.
#[derive(Debug)]
pub struct Tracker {
    /// Gateway ports per source (the local sensor's from the config, a remote sensor's from its
    /// reports).
    ports: HashMap<String, Vec<u16>>,
    idle_after: Duration,
    forget_after: Duration,
    /// Last cumulative counters per (source, local, remote).
    last: HashMap<(String, SocketAddr, SocketAddr), FlowCounters>,
    sessions: BTreeMap<String, Session>,
    channels: BTreeMap<(String, SocketAddr), Channel>,
    /// Byte totals (in, out) of sessions and of channels, for the metrics.
    pub session_bytes: (u64, u64),
    pub channel_bytes: (u64, u64),
}

impl Tracker {
    pub fn new(ports: Vec<u16>, idle_after: Duration, forget_after: Duration) -> Tracker {
        Tracker {
            ports: HashMap::from([("local".to_string(), ports)]),
            idle_after,
            forget_after,
            last: HashMap::new(),
            sessions: BTreeMap::new(),
            channels: BTreeMap::new(),
            session_bytes: (0, 0),
            channel_bytes: (0, 0),
        }
    }

    fn inbound(&self, source: &str, local: &SocketAddr) -> bool {
        self.ports
            .get(source)
            .is_some_and(|p| p.contains(&local.port()))
    }

    /// The gateway ports of `source` (a remote sensor's come with each report).
    pub fn set_ports(&mut self, source: &str, ports: Vec<u16>) {
        self.ports.insert(source.to_string(), ports);
    }

    fn session_id(source: &str, peer: &SocketAddr) -> String {
        format!("{source}/{peer}")
    }

    fn session_mut(
        &mut self,
        source: &str,
        local: SocketAddr,
        remote: SocketAddr,
        at_ms: u64,
        out: &mut Vec<Activity>,
    ) -> &mut Session {
        let id = Self::session_id(source, &remote);
        self.sessions.entry(id.clone()).or_insert_with(|| {
            out.push(Activity {
                session: id.clone(),
                at_ms,
                kind: ActivityKind::Opened,
            });
            Session {
                id,
                source: source.to_string(),
                peer: remote,
                gateway: local,
                state: SessionState::Active,
                first_seen_ms: at_ms,
                last_activity_ms: at_ms,
                closed_ms: None,
                bytes_in: 0,
                bytes_out: 0,
                packets_in: 0,
                packets_out: 0,
                intervals: VecDeque::new(),
                interval_now: (0, 0),
            }
        })
    }

    /// Applies one observation from `source`; returns the activity it causes.
    pub fn apply(&mut self, source: &str, obs: &Observation) -> Vec<Activity> {
        let mut out = Vec::new();
        match *obs {
            Observation::Counters(c) => {
                let key = (source.to_string(), c.local, c.remote);
                let prev = self.last.insert(key, c);
                // A counter that went down is a new flow in the map (the LRU evicted the old one).
                let delta = |now: u64, before: Option<u64>| match before {
                    Some(b) if now >= b => now - b,
                    _ => now,
                };
                let din = delta(c.bytes_in, prev.map(|p| p.bytes_in));
                let dout = delta(c.bytes_out, prev.map(|p| p.bytes_out));
                let dpin = delta(c.packets_in, prev.map(|p| p.packets_in));
                let dpout = delta(c.packets_out, prev.map(|p| p.packets_out));
                if din == 0 && dout == 0 {
                    return out;
                }
                if self.inbound(source, &c.local) {
                    self.session_bytes.0 += din;
                    self.session_bytes.1 += dout;
                    let first = if c.first_seen_ms > 0 {
                        c.first_seen_ms.min(c.last_seen_ms)
                    } else {
                        c.last_seen_ms
                    };
                    let s = self.session_mut(source, c.local, c.remote, first, &mut out);
                    s.bytes_in += din;
                    s.bytes_out += dout;
                    s.packets_in += dpin;
                    s.packets_out += dpout;
                    s.interval_now.0 += din;
                    s.interval_now.1 += dout;
                    s.last_activity_ms = s.last_activity_ms.max(c.last_seen_ms);
                    if s.state == SessionState::Idle {
                        s.state = SessionState::Active;
                    }
                } else {
                    self.channel_bytes.0 += din;
                    self.channel_bytes.1 += dout;
                    let ch = self
                        .channels
                        .entry((source.to_string(), c.remote))
                        .or_insert_with(|| Channel {
                            source: source.to_string(),
                            remote: c.remote,
                            bytes_in: 0,
                            bytes_out: 0,
                            last_activity_ms: c.last_seen_ms,
                            state: SessionState::Active,
                        });
                    ch.bytes_in += din;
                    ch.bytes_out += dout;
                    ch.last_activity_ms = ch.last_activity_ms.max(c.last_seen_ms);
                    ch.state = SessionState::Active;
                }
            }
            Observation::Opened {
                local,
                remote,
                at_ms,
            } => {
                if self.inbound(source, &local) {
                    let s = self.session_mut(source, local, remote, at_ms, &mut out);
                    if s.state == SessionState::Closed {
                        // The same peer address again: a new connection.
                        s.state = SessionState::Active;
                        s.closed_ms = None;
                        s.first_seen_ms = at_ms;
                        out.push(Activity {
                            session: s.id.clone(),
                            at_ms,
                            kind: ActivityKind::Opened,
                        });
                    }
                    s.last_activity_ms = s.last_activity_ms.max(at_ms);
                }
            }
            Observation::Closed {
                local,
                remote,
                at_ms,
            } => {
                if self.inbound(source, &local) {
                    let s = self.session_mut(source, local, remote, at_ms, &mut out);
                    if s.state != SessionState::Closed {
                        s.state = SessionState::Closed;
                        s.closed_ms = Some(at_ms);
                        out.push(Activity {
                            session: s.id.clone(),
                            at_ms,
                            kind: ActivityKind::Closed,
                        });
                    }
                }
                self.last.remove(&(source.to_string(), local, remote));
            }
            Observation::Reset { local, remote } => {
                self.last.remove(&(source.to_string(), local, remote));
            }
        }
        out
    }

    /// Ends a poll interval of `source` at `now_ms`: records its sessions' interval bytes, marks them
    /// (and channels) idle after `idle_after` without traffic, and forgets closed or idle ones after
    /// `forget_after`.
    pub fn end_interval(&mut self, source: &str, now_ms: u64) -> Vec<Activity> {
        let mut out = Vec::new();
        let idle_ms = self.idle_after.as_millis() as u64;
        let forget_ms = self.forget_after.as_millis() as u64;
        for s in self.sessions.values_mut() {
            if s.source != source {
                continue;
            }
            let (bin, bout) = std::mem::take(&mut s.interval_now);
            if s.state != SessionState::Closed || bin > 0 || bout > 0 {
                s.intervals.push_back((bin, bout));
                if s.intervals.len() > INTERVALS_KEPT {
                    s.intervals.pop_front();
                }
            }
            if bin > 0 || bout > 0 {
                out.push(Activity {
                    session: s.id.clone(),
                    at_ms: now_ms,
                    kind: ActivityKind::Traffic {
                        bytes_in: bin,
                        bytes_out: bout,
                    },
                });
            }
            out.extend(s.idle_if_silent(now_ms, idle_ms));
        }
        self.sessions.retain(|_, s| {
            let since = s.closed_ms.unwrap_or(s.last_activity_ms);
            s.state == SessionState::Active || now_ms.saturating_sub(since) < forget_ms
        });
        for ch in self.channels.values_mut() {
            if ch.state == SessionState::Active
                && now_ms.saturating_sub(ch.last_activity_ms) >= idle_ms
            {
                ch.state = SessionState::Idle;
            }
        }
        self.channels
            .retain(|_, c| now_ms.saturating_sub(c.last_activity_ms) < forget_ms);
        out
    }

    pub fn sessions(&self) -> impl Iterator<Item = &Session> {
        self.sessions.values()
    }

    pub fn channels(&self) -> impl Iterator<Item = &Channel> {
        self.channels.values()
    }

    pub fn count(&self, state: SessionState) -> usize {
        self.sessions.values().filter(|s| s.state == state).count()
    }
}

/// Whether the sensor runs, and why not.
#[derive(Debug, Clone, Serialize)]
pub struct SensorStatus {
    /// `on` (kernel programs attached here), `off`.
    pub state: &'static str,
    pub reason: String,
    /// The cgroup the programs are attached to.
    pub gateway_cgroup: Option<String>,
    pub gateway_ports: Vec<u16>,
    /// Open/close events the kernel programs could not queue (see [`Batch::events_lost`]).
    pub events_lost_total: u64,
}

/// A remote sensor as the agent knows it.
#[derive(Debug, Clone, Serialize)]
pub struct RemoteSource {
    pub name: String,
    pub last_report_ms: u64,
    /// Batches it dropped while the agent was unreachable (its bounded buffer was full).
    pub dropped_total: u64,
    /// Open/close events its kernel programs could not queue (see [`Batch::events_lost`]).
    pub events_lost_total: u64,
}

/// `GET /hearth/v1/sessions`.
#[derive(Debug, Clone, Serialize)]
pub struct SessionsReport {
    pub sensor: SensorStatus,
    pub remote_sensors: Vec<RemoteSource>,
    pub idle_after_seconds: f64,
    pub sessions: Vec<Session>,
    pub channels: Vec<Channel>,
}

pub(crate) enum Msg {
    Observe {
        source: String,
        batch: Batch,
    },
    Remote {
        source: String,
        dropped_total: u64,
        gateway_ports: Vec<u16>,
    },
    Report {
        reply: oneshot::Sender<SessionsReport>,
    },
}

/// Handle to the sensor actor.
#[derive(Clone)]
pub struct Sensor {
    tx: mpsc::Sender<Msg>,
    activity: broadcast::Sender<Activity>,
}

impl Sensor {
    /// Starts the sensor actor and, when configured, the kernel side. Never fails: without
    /// privileges, kernel support or configuration the sensor is off and says why.
    pub fn start(config: &SensorConfig, metrics: Metrics) -> Sensor {
        let (tx, rx) = mpsc::channel(256);
        let (activity, _) = broadcast::channel(1024);
        let mut status = SensorStatus {
            state: "off",
            reason: String::new(),
            gateway_cgroup: None,
            gateway_ports: config.gateway_ports.clone(),
            events_lost_total: 0,
        };
        let handle = Sensor {
            tx: tx.clone(),
            activity: activity.clone(),
        };
        if !config.enabled {
            status.reason = "not configured (no [sensor] gateway in the config)".into();
        } else {
            match kernel::Kernel::load(config) {
                Ok(k) => {
                    status.state = "on";
                    status.reason = format!(
                        "eBPF programs attached to {} (ports {:?})",
                        k.cgroup().display(),
                        config.gateway_ports
                    );
                    status.gateway_cgroup = Some(k.cgroup().display().to_string());
                    let (btx, mut brx) = mpsc::channel::<Batch>(64);
                    tokio::spawn(k.run(btx, config.poll_interval));
                    let tx = tx.clone();
                    // The local source goes through the same path as a remote sensor's reports.
                    tokio::spawn(async move {
                        while let Some(batch) = brx.recv().await {
                            let msg = Msg::Observe {
                                source: "local".into(),
                                batch,
                            };
                            if tx.send(msg).await.is_err() {
                                return;
                            }
                        }
                    });
                }
                Err(e) => status.reason = e.to_string(),
            }
        }
        if status.state == "on" {
            tracing::info!(reason = %status.reason, "gateway sensor on");
        } else if config.enabled {
            tracing::warn!(reason = %status.reason, "gateway sensor OFF");
        } else {
            tracing::info!(reason = %status.reason, "gateway sensor off");
        }
        metrics.sensor_up.set(i64::from(status.state == "on"));
        let tracker = Tracker::new(
            config.gateway_ports.clone(),
            config.idle_after,
            config.forget_after,
        );
        tokio::spawn(actor(
            rx,
            tracker,
            Arc::new(status),
            metrics,
            activity,
            config.idle_after,
        ));
        handle
    }

    /// Hands a batch of observations to the tracker (the local poller and
    /// `POST /hearth/v1/activity`).
    pub async fn observe(&self, source: String, batch: Batch) -> bool {
        self.tx.send(Msg::Observe { source, batch }).await.is_ok()
    }

    /// Takes a remote sensor's report (`POST /hearth/v1/activity`), batch by batch, through the
    /// same path as the local poller's.
    pub async fn accept(&self, report: Report) -> bool {
        let source = report.source;
        if self
            .tx
            .send(Msg::Remote {
                source: source.clone(),
                dropped_total: report.dropped_total,
                gateway_ports: report.gateway_ports,
            })
            .await
            .is_err()
        {
            return false;
        }
        for b in report.batches {
            if !self.observe(source.clone(), b).await {
                return false;
            }
        }
        true
    }

    pub async fn report(&self) -> Option<SessionsReport> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Msg::Report { reply }).await.ok()?;
        rx.await.ok()
    }

    /// The activity stream.
    pub fn subscribe(&self) -> broadcast::Receiver<Activity> {
        self.activity.subscribe()
    }
}

async fn actor(
    mut rx: mpsc::Receiver<Msg>,
    mut tracker: Tracker,
    status: Arc<SensorStatus>,
    metrics: Metrics,
    activity: broadcast::Sender<Activity>,
    idle_after: Duration,
) {
    let states =
        SessionState::ALL.map(|s| metrics.gateway_sessions.with_label_values(&[s.as_str()]));
    let bytes_in = metrics.gateway_bytes.with_label_values(&["in"]);
    let bytes_out = metrics.gateway_bytes.with_label_values(&["out"]);
    let mut counted = (0u64, 0u64);
    let mut remotes: BTreeMap<String, RemoteSource> = BTreeMap::new();
    // Per source: events its kernel programs lost, as last reported, and when that was last logged.
    let mut lost: BTreeMap<String, (u64, Option<Instant>)> = BTreeMap::new();
    // Idle transitions also happen without traffic.
    let mut tick = tokio::time::interval((idle_after / 4).max(Duration::from_millis(250)));
    loop {
        let mut events = Vec::new();
        tokio::select! {
            msg = rx.recv() => match msg {
                None => return,
                Some(Msg::Observe { source, batch }) => {
                    for o in &batch.observations {
                        events.extend(tracker.apply(&source, o));
                    }
                    if batch.end_interval {
                        events.extend(tracker.end_interval(&source, unix_ms(SystemTime::now())));
                    }
                    note_lost(&mut lost, &metrics, &source, batch.events_lost);
                }
                Some(Msg::Remote { source, dropped_total, gateway_ports }) => {
                    tracker.set_ports(&source, gateway_ports);
                    metrics
                        .sensor_dropped
                        .with_label_values(&[&source])
                        .set(dropped_total as i64);
                    remotes.insert(source.clone(), RemoteSource {
                        name: source,
                        last_report_ms: unix_ms(SystemTime::now()),
                        dropped_total,
                        events_lost_total: 0,
                    });
                }
                Some(Msg::Report { reply }) => {
                    let lost_of = |source: &str| lost.get(source).map_or(0, |l| l.0);
                    let _ = reply.send(SessionsReport {
                        sensor: SensorStatus {
                            events_lost_total: lost_of("local"),
                            ..(*status).clone()
                        },
                        remote_sensors: remotes
                            .values()
                            .map(|r| RemoteSource {
                                events_lost_total: lost_of(&r.name),
                                ..r.clone()
                            })
                            .collect(),
                        idle_after_seconds: idle_after.as_secs_f64(),
                        sessions: tracker.sessions().cloned().collect(),
                        channels: tracker.channels().cloned().collect(),
                    });
                }
            },
            _ = tick.tick() => {
                events.extend(tracker.end_interval_idle_only(unix_ms(SystemTime::now())));
            }
        }
        for e in events {
            tracing::debug!(session = %e.session, kind = ?e.kind, "session activity");
            let _ = activity.send(e);
        }
        for (g, s) in states.iter().zip(SessionState::ALL) {
            g.set(tracker.count(s) as i64);
        }
        let (bi, bo) = tracker.session_bytes;
        bytes_in.inc_by(bi - counted.0);
        bytes_out.inc_by(bo - counted.1);
        counted = (bi, bo);
    }
}

/// How often a source's growing count of lost events is logged, at most.
const LOST_LOG_EVERY: Duration = Duration::from_secs(60);

/// Records a source's count of lost events (cumulative, as it reported it) in the metric, and
/// warns when it grew, at most once per [`LOST_LOG_EVERY`].
fn note_lost(
    lost: &mut BTreeMap<String, (u64, Option<Instant>)>,
    metrics: &Metrics,
    source: &str,
    total: u64,
) {
    metrics
        .sensor_lost_events
        .with_label_values(&[source])
        .set(i64::try_from(total).unwrap_or(i64::MAX));
    let entry = lost.entry(source.to_string()).or_insert((0, None));
    let grew = total > entry.0;
    entry.0 = total;
    if grew && entry.1.is_none_or(|t| t.elapsed() >= LOST_LOG_EVERY) {
        entry.1 = Some(Instant::now());
        tracing::warn!(
            source,
            events_lost_total = total,
            "gateway sensor: the kernel's event ring was full, connection open/close events were \
             lost (a burst of connections faster than the sensor drains them); their flows' \
             counters are still read"
        );
    }
}

impl Tracker {
    /// Only the idle transitions of [`Tracker::end_interval`] (for the timer between polls), for
    /// sessions without traffic in the interval under way.
    pub fn end_interval_idle_only(&mut self, now_ms: u64) -> Vec<Activity> {
        let idle_ms = self.idle_after.as_millis() as u64;
        self.sessions
            .values_mut()
            .filter(|s| s.interval_now == (0, 0))
            .filter_map(|s| s.idle_if_silent(now_ms, idle_ms))
            .collect()
    }
}

impl Session {
    /// `active` → `idle` once silent for `idle_ms`.
    fn idle_if_silent(&mut self, now_ms: u64, idle_ms: u64) -> Option<Activity> {
        if self.state != SessionState::Active
            || now_ms.saturating_sub(self.last_activity_ms) < idle_ms
        {
            return None;
        }
        self.state = SessionState::Idle;
        Some(Activity {
            session: self.id.clone(),
            at_ms: now_ms,
            kind: ActivityKind::Idle,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("addr")
    }

    fn counters(local: &str, remote: &str, bin: u64, bout: u64, at: u64) -> Observation {
        Observation::Counters(FlowCounters {
            local: addr(local),
            remote: addr(remote),
            bytes_in: bin,
            bytes_out: bout,
            packets_in: bin / 100,
            packets_out: bout / 100,
            first_seen_ms: 0,
            last_seen_ms: at,
        })
    }

    const GW: &str = "127.0.0.1:18789";

    #[test]
    fn inbound_flows_are_sessions_with_deltas_and_intervals() {
        let mut t = Tracker::new(
            vec![18789],
            Duration::from_secs(10),
            Duration::from_secs(600),
        );
        let a = t.apply("local", &counters(GW, "127.0.0.1:50000", 1000, 200, 1_000));
        assert_eq!(a[0].kind, ActivityKind::Opened);
        t.apply("local", &counters(GW, "127.0.0.1:50000", 1500, 900, 2_000));
        // a second client is a second session
        t.apply("local", &counters(GW, "127.0.0.1:50001", 10, 10, 2_000));
        let ev = t.end_interval("local", 2_500);
        let traffic: Vec<_> = ev
            .iter()
            .filter(|e| matches!(e.kind, ActivityKind::Traffic { .. }))
            .collect();
        assert_eq!(traffic.len(), 2);
        let s = t
            .sessions()
            .find(|s| s.peer.port() == 50000)
            .expect("session");
        assert_eq!((s.bytes_in, s.bytes_out), (1500, 900));
        assert_eq!(s.intervals.back(), Some(&(1500, 900)));
        assert_eq!(s.last_activity_ms, 2_000);
        assert_eq!(s.id, "local/127.0.0.1:50000");
        assert_eq!(t.count(SessionState::Active), 2);
        assert_eq!(t.session_bytes, (1510, 910));
        // no traffic in the next interval: a zero interval
        t.apply("local", &counters(GW, "127.0.0.1:50000", 1500, 900, 2_000));
        t.end_interval("local", 3_000);
        let s = t
            .sessions()
            .find(|s| s.peer.port() == 50000)
            .expect("session");
        assert_eq!(s.intervals.back(), Some(&(0, 0)));
    }

    #[test]
    fn silent_sessions_go_idle_then_active_again_and_close() {
        let mut t = Tracker::new(vec![18789], Duration::from_secs(5), Duration::from_secs(60));
        t.apply(
            "local",
            &Observation::Opened {
                local: addr(GW),
                remote: addr("10.0.0.2:4000"),
                at_ms: 0,
            },
        );
        t.apply("local", &counters(GW, "10.0.0.2:4000", 100, 100, 1_000));
        assert!(t
            .end_interval("local", 3_000)
            .iter()
            .all(|e| e.kind != ActivityKind::Idle));
        let ev = t.end_interval("local", 6_000);
        assert!(ev.iter().any(|e| e.kind == ActivityKind::Idle));
        assert_eq!(t.count(SessionState::Idle), 1);
        t.apply("local", &counters(GW, "10.0.0.2:4000", 300, 100, 7_000));
        assert_eq!(t.count(SessionState::Active), 1);
        let ev = t.apply(
            "local",
            &Observation::Closed {
                local: addr(GW),
                remote: addr("10.0.0.2:4000"),
                at_ms: 8_000,
            },
        );
        assert_eq!(ev[0].kind, ActivityKind::Closed);
        assert_eq!(t.count(SessionState::Closed), 1);
        // forgotten after forget_after
        t.end_interval("local", 8_000 + 59_000);
        assert_eq!(t.sessions().count(), 1);
        t.end_interval("local", 8_000 + 61_000);
        assert_eq!(t.sessions().count(), 0);
    }

    #[test]
    fn outbound_flows_are_channels_and_counter_resets_are_new_flows() {
        let mut t = Tracker::new(vec![18789], Duration::from_secs(5), Duration::from_secs(60));
        let ev = t.apply(
            "local",
            &counters("10.0.0.1:41000", "149.154.167.220:443", 500, 80, 1),
        );
        assert!(ev.is_empty(), "channels are not sessions: {ev:?}");
        assert_eq!(t.sessions().count(), 0);
        t.apply(
            "local",
            &counters("10.0.0.1:41000", "149.154.167.220:443", 900, 100, 2),
        );
        // the LRU dropped the flow and it came back with small counters
        t.apply(
            "local",
            &counters("10.0.0.1:41000", "149.154.167.220:443", 50, 10, 3),
        );
        let ch = t.channels().next().expect("channel");
        assert_eq!((ch.bytes_in, ch.bytes_out), (950, 110));
        assert_eq!(t.channel_bytes, (950, 110));
        assert_eq!(t.session_bytes, (0, 0));
    }

    #[test]
    fn a_reset_flow_counts_from_zero_again() {
        let mut t = Tracker::new(vec![18789], Duration::from_secs(5), Duration::from_secs(60));
        t.apply("local", &counters(GW, "10.0.0.2:4000", 1000, 0, 1));
        t.apply(
            "local",
            &Observation::Reset {
                local: addr(GW),
                remote: addr("10.0.0.2:4000"),
            },
        );
        // the new entry already carries more than the old one did: all of it is new traffic
        t.apply("local", &counters(GW, "10.0.0.2:4000", 1500, 0, 2));
        let s = t.sessions().next().expect("session");
        assert_eq!(s.bytes_in, 2500);
    }

    #[test]
    fn sources_are_kept_apart_and_observations_roundtrip_as_json() {
        let mut t = Tracker::new(vec![18789], Duration::from_secs(5), Duration::from_secs(60));
        let o = counters(GW, "127.0.0.1:50000", 100, 100, 1);
        t.apply("local", &o);
        // a remote source's ports are its own: unknown yet, so a channel
        t.apply("gw-host", &o);
        assert_eq!(t.sessions().count(), 1);
        t.set_ports("gw-host", vec![18789]);
        t.apply("gw-host", &counters(GW, "127.0.0.1:50000", 200, 200, 2));
        assert_eq!(t.sessions().count(), 2);
        let json = serde_json::to_string(&o).expect("json");
        assert!(json.contains("\"type\":\"counters\""), "{json}");
        let back: Observation = serde_json::from_str(&json).expect("parse");
        assert_eq!(back, o);
        // A sensor of an earlier version sends no events_lost: none lost.
        let b: Batch = serde_json::from_str(r#"{"observations":[],"end_interval":true}"#)
            .expect("batch without events_lost");
        assert_eq!(b.events_lost, 0);
        let b: Batch =
            serde_json::from_str(r#"{"observations":[],"end_interval":true,"events_lost":7}"#)
                .expect("batch");
        assert_eq!(b.events_lost, 7);
    }
}
