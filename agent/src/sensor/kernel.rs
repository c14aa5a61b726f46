//! The kernel side of the sensor, from user space: loads hearth's eBPF object (built by
//! `cargo xtask build-ebpf`, embedded at build time), attaches the `cgroup_skb` programs to the
//! gateway's cgroup and the tracepoint `sock/inet_sock_set_state`, and polls them into
//! [`Observation`]s.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use aya::maps::{MapData, RingBuf};
use aya::programs::{CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, TracePoint};
use aya::{Ebpf, EbpfLoader};
use hearth_common::user::{size_flows, FlowMaps, LostEvents};
use hearth_common::{names, FlowEvent, FlowKey, PacketCounts, AF_INET6, EVENT_OPEN, MAX_PORTS};
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;

use super::{unix_ms, Batch, FlowCounters, Observation};
use crate::config::{GatewayTarget, SensorConfig};

/// The eBPF object; empty when hearth was built without the eBPF toolchain.
static OBJECT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/hearth-ebpf.o"));

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("this hearth was built without its eBPF programs (run `cargo xtask build-ebpf`, then build hearth again)")]
    NotBuilt,
    #[error(
        "no cgroup2 mount in /proc/self/mountinfo: the sensor attaches to a cgroup v2 directory"
    )]
    NoCgroup2,
    #[error("gateway {what}: {reason}")]
    Gateway { what: String, reason: String },
    #[error("tracefs is not mounted at /sys/kernel/tracing and mounting it failed: {0}")]
    Tracefs(String),
    #[error("loading the eBPF programs: {0} (hearth needs root or CAP_BPF + CAP_NET_ADMIN + CAP_PERFMON)")]
    Load(String),
    #[error("attaching {program} to {target}: {reason}")]
    Attach {
        program: &'static str,
        target: String,
        reason: String,
    },
}

/// A flow whose counters did not move for this long is deleted from `FLOWS` and `FLOW_INFO`
/// (traffic on it later starts a new entry), so the maps and the reader's walk stay small on a busy
/// gateway.
const STALE_AFTER: Duration = Duration::from_secs(600);

/// The loaded and attached programs.
pub struct Kernel {
    ebpf: Ebpf,
    flows: FlowMaps,
    lost: LostEvents,
    /// `lost`'s total at the last reading.
    lost_total: u64,
    cgroup: PathBuf,
    /// Per flow (socket cookie): the counters at the last reading and since when they have not
    /// moved.
    seen: HashMap<u64, (PacketCounts, Instant)>,
    /// Flows whose connection closed: deleted after their final counters were read.
    closed: HashSet<FlowKey>,
}

impl Kernel {
    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }

    /// Loads and attaches; every failure says what is missing.
    pub fn load(config: &SensorConfig) -> Result<Kernel, KernelError> {
        if OBJECT.is_empty() {
            return Err(KernelError::NotBuilt);
        }
        let cgroup = gateway_cgroup(config)?;
        ensure_tracefs()?;
        let mut ports = [0u16; MAX_PORTS];
        for (p, v) in ports.iter_mut().zip(&config.gateway_ports) {
            *p = *v;
        }
        let n = config.gateway_ports.len().min(MAX_PORTS) as u32;
        let mut loader = EbpfLoader::new();
        loader
            .override_global(names::GATEWAY_PORTS, &ports, true)
            .override_global(names::N_PORTS, &n, true);
        let capacity = size_flows(&mut loader).map_err(|e| KernelError::Load(error_chain(&e)))?;
        let mut ebpf = loader
            .load(OBJECT)
            .map_err(|e| KernelError::Load(error_chain(&e)))?;
        let flows = FlowMaps::take(&mut ebpf).map_err(|e| KernelError::Load(error_chain(&e)))?;
        let lost = LostEvents::take(&mut ebpf).map_err(|e| KernelError::Load(error_chain(&e)))?;
        tracing::debug!(flows = capacity, "sensor: FLOWS sized for this host's CPUs");
        let dir = fs::File::open(&cgroup).map_err(|e| KernelError::Attach {
            program: names::INGRESS,
            target: cgroup.display().to_string(),
            reason: e.to_string(),
        })?;
        for (name, kind) in [
            (names::INGRESS, CgroupSkbAttachType::Ingress),
            (names::EGRESS, CgroupSkbAttachType::Egress),
        ] {
            let attach_err = |reason: String| KernelError::Attach {
                program: name,
                target: cgroup.display().to_string(),
                reason,
            };
            let prog: &mut CgroupSkb = ebpf
                .program_mut(name)
                .ok_or_else(|| attach_err("not in the object".into()))?
                .try_into()
                .map_err(|e: aya::programs::ProgramError| attach_err(error_chain(&e)))?;
            prog.load()
                .map_err(|e| KernelError::Load(format!("{name}: {}", error_chain(&e))))?;
            prog.attach(&dir, kind, CgroupAttachMode::Single)
                .map_err(|e| attach_err(error_chain(&e)))?;
        }
        let tp_err = |reason: String| KernelError::Attach {
            program: names::SOCK_STATE,
            target: "tracepoint sock/inet_sock_set_state".into(),
            reason,
        };
        let tp: &mut TracePoint = ebpf
            .program_mut(names::SOCK_STATE)
            .ok_or_else(|| tp_err("not in the object".into()))?
            .try_into()
            .map_err(|e: aya::programs::ProgramError| tp_err(error_chain(&e)))?;
        tp.load().map_err(|e| {
            KernelError::Load(format!("{}: {}", names::SOCK_STATE, error_chain(&e)))
        })?;
        tp.attach("sock", "inet_sock_set_state")
            .map_err(|e| tp_err(error_chain(&e)))?;
        Ok(Kernel {
            ebpf,
            flows,
            lost,
            lost_total: 0,
            cgroup,
            seen: HashMap::new(),
            closed: HashSet::new(),
        })
    }

    /// Polls the flow map every `interval` and drains connection events as they come, sending
    /// observations to the sensor actor until it goes away.
    pub async fn run(mut self, tx: mpsc::Sender<Batch>, interval: Duration) {
        let events = match self.ebpf.take_map(names::EVENTS).map(RingBuf::try_from) {
            Some(Ok(rb)) => {
                // SAFETY: the RingBuf owns its map fd and moves into the AsyncFd, which owns it
                // until dropped; RingBuf::as_raw_fd always returns that same open descriptor.
                match unsafe { AsyncFd::register(rb) } {
                    Ok(fd) => Some(fd),
                    Err(e) => {
                        tracing::error!(error = %e, "polling the sensor's ring buffer; open/close events are lost");
                        None
                    }
                }
            }
            Some(Err(e)) => {
                tracing::error!(error = %error_chain(&e), "the sensor's ring buffer");
                None
            }
            None => None,
        };
        let mut events = events;
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let clock = Clock::new();
        loop {
            let mut obs = Vec::new();
            let end = tokio::select! {
                _ = tick.tick() => {
                    // Events first, so that a connection opened and closed within one interval
                    // is seen in order with its counters.
                    if let Some(ev) = events.as_mut() {
                        drain(ev.get_mut(), &clock, &mut obs, &mut self.closed);
                    }
                    self.read_flows(&clock, &mut obs);
                    true
                }
                ready = async {
                    match events.as_mut() {
                        Some(ev) => ev.readable_mut().await.map(|mut g| g.clear_ready()),
                        None => std::future::pending().await,
                    }
                } => {
                    if let (Ok(()), Some(ev)) = (ready, events.as_mut()) {
                        drain(ev.get_mut(), &clock, &mut obs, &mut self.closed);
                    }
                    false
                }
            };
            if obs.is_empty() && !end {
                continue;
            }
            let batch = Batch {
                observations: obs,
                end_interval: end,
                events_lost: self.lost_total,
            };
            if tx.send(batch).await.is_err() {
                return;
            }
        }
    }

    /// Reports every flow's counters, then deletes closed and stale flows from the maps.
    fn read_flows(&mut self, clock: &Clock, out: &mut Vec<Observation>) {
        match self.lost.total() {
            Ok(n) => self.lost_total = n,
            Err(e) => tracing::debug!(error = %error_chain(&e), "sensor: reading EVENTS_LOST"),
        }
        let reading = self.flows.read();
        if reading.orphans > 0 {
            // Their sockets' next packets start them again, from 0: the tracker sees the
            // counters go down and counts from there.
            tracing::debug!(
                flows = reading.orphans,
                "sensor: flows whose FLOW_INFO the kernel evicted were deleted"
            );
        }
        let now = Instant::now();
        // The programs read no clock per packet: a flow's counters moving is its activity, dated
        // by this reading.
        let now_ms = unix_ms(SystemTime::now());
        let mut stale = Vec::new();
        let mut seen = HashMap::with_capacity(reading.flows.len());
        for f in &reading.flows {
            let since = match self.seen.get(&f.cookie) {
                Some((prev, since)) if *prev == f.counts => *since,
                _ => now,
            };
            if now.duration_since(since) >= STALE_AFTER {
                stale.push(f);
            }
            seen.insert(f.cookie, (f.counts, since));
        }
        for a in reading.by_address() {
            let (local, remote) = addrs(&a.key);
            let c = a.counts;
            out.push(Observation::Counters(FlowCounters {
                local,
                remote,
                bytes_in: c.bytes_in,
                bytes_out: c.bytes_out,
                packets_in: c.packets_in,
                packets_out: c.packets_out,
                first_seen_ms: clock.to_unix_ms(a.first_seen_ns),
                last_seen_ms: now_ms,
            }));
        }
        let closed = std::mem::take(&mut self.closed);
        for cookie in reading.cookies_of(&closed) {
            self.flows.remove(cookie);
            seen.remove(&cookie);
        }
        for f in stale {
            self.flows.remove(f.cookie);
            seen.remove(&f.cookie);
            // The connection may still be open: its next counters start from 0, and the tracker
            // must not subtract the deleted ones from them.
            let (local, remote) = addrs(&f.info.key);
            out.push(Observation::Reset { local, remote });
        }
        self.seen = seen;
    }
}

fn drain(
    rb: &mut RingBuf<MapData>,
    clock: &Clock,
    out: &mut Vec<Observation>,
    closed: &mut HashSet<FlowKey>,
) {
    while let Some(item) = rb.next() {
        let Some(ev) = FlowEvent::from_record(&item) else {
            continue;
        };
        let (local, remote) = addrs(&ev.key);
        let at_ms = clock.to_unix_ms(ev.ts_ns);
        if ev.kind != EVENT_OPEN {
            closed.insert(ev.key);
        }
        out.push(if ev.kind == EVENT_OPEN {
            Observation::Opened {
                local,
                remote,
                at_ms,
            }
        } else {
            Observation::Closed {
                local,
                remote,
                at_ms,
            }
        });
    }
}

/// A FlowKey's (local, remote) socket addresses.
pub fn addrs(k: &FlowKey) -> (SocketAddr, SocketAddr) {
    let ip = |b: &[u8; 16]| -> IpAddr {
        if k.family == AF_INET6 {
            IpAddr::V6(Ipv6Addr::from(*b))
        } else {
            IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3]))
        }
    };
    (
        SocketAddr::new(ip(&k.local_addr), k.local_port),
        SocketAddr::new(ip(&k.remote_addr), k.remote_port),
    )
}

/// Converts `bpf_ktime_get_ns` (CLOCK_MONOTONIC) to wall-clock Unix milliseconds.
struct Clock {
    mono_ns: u64,
    wall_ms: u64,
}

impl Clock {
    fn new() -> Clock {
        Clock {
            mono_ns: monotonic_ns(),
            wall_ms: unix_ms(SystemTime::now()),
        }
    }

    fn to_unix_ms(&self, ns: u64) -> u64 {
        if ns == 0 {
            return 0;
        }
        let delta_ms = (ns as i128 - self.mono_ns as i128) / 1_000_000;
        (self.wall_ms as i128 + delta_ms).max(0) as u64
    }
}

fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// The cgroup2 mount point.
fn cgroup2_mount() -> Result<PathBuf, KernelError> {
    crate::cgroup::cgroup2_mount()
        .ok()
        .flatten()
        .ok_or(KernelError::NoCgroup2)
}

/// Resolves the configured gateway to the cgroup v2 directory to attach to.
fn gateway_cgroup(config: &SensorConfig) -> Result<PathBuf, KernelError> {
    let mount = cgroup2_mount()?;
    let gw_err = |what: String, reason: String| KernelError::Gateway { what, reason };
    match &config.gateway {
        None => Err(gw_err(
            "target".into(),
            "none configured (gateway_cgroup, gateway_unit or gateway_pid)".into(),
        )),
        Some(GatewayTarget::Cgroup(p)) => {
            let p = if p.is_absolute() {
                p.clone()
            } else {
                mount.join(p)
            };
            if !p.join("cgroup.procs").exists() {
                return Err(gw_err(
                    format!("cgroup {}", p.display()),
                    format!(
                        "not a cgroup v2 directory (the cgroup2 mount is {})",
                        mount.display()
                    ),
                ));
            }
            Ok(p)
        }
        Some(GatewayTarget::Unit(unit)) => {
            let out = std::process::Command::new("systemctl")
                .args(["show", "--property=ControlGroup", "--value", unit])
                .output()
                .map_err(|e| gw_err(format!("unit {unit}"), format!("running systemctl: {e}")))?;
            let cg = String::from_utf8_lossy(&out.stdout).trim().to_string();
            if !out.status.success() || cg.is_empty() {
                return Err(gw_err(
                    format!("unit {unit}"),
                    format!(
                        "systemctl show gave no ControlGroup (is the unit running?){}",
                        String::from_utf8_lossy(&out.stderr).trim()
                    ),
                ));
            }
            Ok(mount.join(cg.trim_start_matches('/')))
        }
        Some(GatewayTarget::Pid(pid)) => {
            let text = fs::read_to_string(format!("/proc/{pid}/cgroup"))
                .map_err(|e| gw_err(format!("pid {pid}"), e.to_string()))?;
            let v2 = text
                .lines()
                .find_map(|l| l.strip_prefix("0::"))
                .unwrap_or("/")
                .to_string();
            if v2 == "/" {
                // Attaching at the root would count the whole host, and moving the gateway would
                // not help: a socket keeps the cgroup it was created in, so its listening socket
                // (and every connection accepted from it) would stay uncounted.
                return Err(gw_err(
                    format!("pid {pid}"),
                    "it is in the cgroup v2 root (as every process of a hybrid host is): start the \
                     gateway in a cgroup of its own (a systemd unit: gateway_unit; or a directory \
                     you create: gateway_cgroup), before it opens its sockets"
                        .into(),
                ));
            }
            Ok(mount.join(v2.trim_start_matches('/')))
        }
    }
}

/// The tracepoint needs tracefs; a fresh host may not have it mounted.
fn ensure_tracefs() -> Result<(), KernelError> {
    let dir = Path::new("/sys/kernel/tracing");
    if dir.join("events").exists() || Path::new("/sys/kernel/debug/tracing/events").exists() {
        return Ok(());
    }
    nix::mount::mount(
        Some("tracefs"),
        dir,
        Some("tracefs"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|e| KernelError::Tracefs(e.to_string()))?;
    tracing::info!("mounted tracefs at /sys/kernel/tracing");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_become_socket_addresses() {
        let mut k = FlowKey {
            local_addr: [0; 16],
            remote_addr: [0; 16],
            local_port: 18789,
            remote_port: 50000,
            family: hearth_common::AF_INET,
            _pad: 0,
        };
        k.local_addr[..4].copy_from_slice(&[127, 0, 0, 1]);
        k.remote_addr[..4].copy_from_slice(&[10, 1, 2, 3]);
        let (l, r) = addrs(&k);
        assert_eq!(l, "127.0.0.1:18789".parse::<SocketAddr>().unwrap());
        assert_eq!(r, "10.1.2.3:50000".parse::<SocketAddr>().unwrap());
        k.family = AF_INET6;
        k.local_addr = Ipv6Addr::LOCALHOST.octets();
        let (l, _) = addrs(&k);
        assert_eq!(l, "[::1]:18789".parse::<SocketAddr>().unwrap());
    }

    #[test]
    fn monotonic_times_convert_to_wall_clock() {
        let c = Clock {
            mono_ns: 5_000_000_000,
            wall_ms: 1_700_000_000_000,
        };
        assert_eq!(c.to_unix_ms(6_000_000_000), 1_700_000_001_000);
        assert_eq!(c.to_unix_ms(4_500_000_000), 1_699_999_999_500);
        assert_eq!(c.to_unix_ms(0), 0);
    }
}
