//! The kernel programs of `agent-ebpf/` for real: loads the object hearth embeds
//! (`target/ebpf/hearth-ebpf.o`, via agent/build.rs) with aya, attaches `hearth_ingress` /
//! `hearth_egress` to a fresh child cgroup of the cgroup2 hierarchy and `hearth_sock_state` to
//! `sock/inet_sock_set_state`, runs a TCP server (python3) inside that cgroup on a gateway port, talks
//! to it from outside, and checks `FLOWS` and `EVENTS`; then a burst of connections against the
//! ring buffer's wake-up level and its capacity (`EVENTS_LOST`).
//!
//! Needs root and the object. Without either it is SKIPPED with a loud message (on stderr, past the
//! harness's capture), unless `HEARTH_EBPF_REQUIRED=1` (set by `cargo xtask test` when it runs as
//! root, after setup built the object), which turns the skip into a failure.

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use aya::maps::RingBuf;
use aya::programs::{CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, TracePoint};
use aya::EbpfLoader;
use hearth_common::user::{size_flows, FlowMaps};
use hearth_common::{
    flows_capacity, names, FlowEvent, FlowKey, AF_INET, AF_INET6, EVENT_CLOSE, EVENT_OPEN,
    MAX_PORTS,
};

static OBJECT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/hearth-ebpf.o"));

/// Bytes the client sends to the server, and the server back, on each connection.
const TO_SERVER: usize = 300_000;
const TO_CLIENT: usize = 120_000;
/// Upper bound of IP + TCP header bytes per counted packet (skb): 20 (IPv4) or 40 (IPv6) + 20 TCP +
/// at most 40 bytes of options (a SYN's MSS, SACK-permitted, timestamps and window scale take 20; data
/// segments carry 12 of timestamps) = 100 at the very most.
const HEADER_BOUND: u64 = 100;

const SERVER: &str = r#"
import socket, sys
port, family, conns, to_server, to_client = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6])
port = int(port)
sys.stdin.readline()  # the test moves this process into the cgroup first: sockets take the cgroup
if family == "6":     # of their creator, accepted ones that of their listener
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # dual stack: IPv4 peers are ::ffff:a.b.c.d
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("::", port))
else:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", port))
s.listen(8)
print("ready", flush=True)
for _ in range(conns):
    c, _ = s.accept()
    got = 0
    while got < to_server:
        b = c.recv(65536)
        if not b:
            sys.exit(f"server: the client closed after {got} bytes")
        got += len(b)
    c.sendall(b"y" * to_client)
    while c.recv(65536):  # until the client closes
        pass
    c.close()
s.close()
"#;

#[test]
fn programs_count_gateway_flows_and_report_open_and_close() {
    if skipped("programs_count_gateway_flows_and_report_open_and_close") {
        return;
    }

    let ipv6 = TcpListener::bind((Ipv6Addr::LOCALHOST, 0)).is_ok();
    // Two gateways (two gateway ports): a pure AF_INET server, whose sockets the kernel describes
    // in their IPv4 fields, and, where loopback has IPv6, a dual-stack AF_INET6 one, which sees
    // IPv4 peers as v4-mapped addresses. The programs must key both alike.
    let port4 = free_port(false);
    let port6 = ipv6.then(|| free_port(true));
    let ports: Vec<u16> = std::iter::once(port4).chain(port6).collect();
    let (mut ebpf, capacity) = load(&ports);
    let cpus = aya::util::nr_cpus().expect("possible CPUs");
    assert_eq!(capacity, flows_capacity(cpus as u32));
    let Some(aya::maps::Map::PerCpuLruHashMap(flows)) = ebpf.map(names::FLOWS) else {
        panic!("FLOWS is not a per-CPU LRU hash map");
    };
    assert_eq!(
        flows.info().expect("FLOWS info").max_entries(),
        capacity,
        "FLOWS created with the capacity set"
    );

    let cgroup = TestCgroup::create();
    let cgroup_dir = fs::File::open(&cgroup.path).expect("opening the cgroup directory");
    for (name, attach_type) in [
        (names::INGRESS, CgroupSkbAttachType::Ingress),
        (names::EGRESS, CgroupSkbAttachType::Egress),
    ] {
        let prog: &mut CgroupSkb = ebpf
            .program_mut(name)
            .unwrap_or_else(|| panic!("no program {name}"))
            .try_into()
            .expect("a cgroup_skb program");
        prog.load()
            .unwrap_or_else(|e| panic!("loading {name}: {e:?}"));
        prog.attach(&cgroup_dir, attach_type, CgroupAttachMode::Single)
            .unwrap_or_else(|e| panic!("attaching {name}: {e:?}"));
    }
    attach_tracepoint(&mut ebpf);

    // The servers inside the cgroup, the clients (this process) outside it: an IPv4 client of the
    // AF_INET server, and an IPv4 and an IPv6 client of the dual-stack one.
    let mut targets: Vec<SocketAddr> = vec![(Ipv4Addr::LOCALHOST, port4).into()];
    let mut servers = vec![Server::start(port4, false, 1, &cgroup)];
    if let Some(port6) = port6 {
        targets.push((Ipv4Addr::LOCALHOST, port6).into());
        targets.push((Ipv6Addr::LOCALHOST, port6).into());
        servers.push(Server::start(port6, true, 2, &cgroup));
    } else {
        eprintln!("ebpf_programs: no IPv6 on loopback, testing the AF_INET server only");
    }
    let mut clients = Vec::new();
    for target in &targets {
        let mut s = TcpStream::connect(target).expect("connecting to the server");
        s.set_read_timeout(Some(Duration::from_secs(20))).ok();
        s.write_all(&vec![b'x'; TO_SERVER]).expect("sending");
        let mut back = vec![0u8; TO_CLIENT];
        s.read_exact(&mut back).expect("receiving");
        clients.push((target.port(), s.local_addr().expect("client address")));
        drop(s);
    }
    for server in &mut servers {
        server.wait();
    }

    let keys: Vec<FlowKey> = clients.iter().map(|(port, c)| key(*port, *c)).collect();

    // EVENTS: the server socket's CLOSE comes with the client's last ACK; poll for a while.
    let mut ring = RingBuf::try_from(ebpf.take_map(names::EVENTS).expect("no map EVENTS"))
        .expect("EVENTS is a ring buffer");
    let mut events: Vec<FlowEvent> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        while let Some(item) = ring.next() {
            assert_eq!(item.len(), size_of::<FlowEvent>(), "event size");
            // SAFETY: FlowEvent is plain old data of exactly this size; read unaligned.
            events.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<FlowEvent>()) });
        }
        let closed = keys
            .iter()
            .all(|k| events.iter().any(|e| e.key == *k && e.kind == EVENT_CLOSE));
        if closed || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }

    let mut maps = FlowMaps::take(&mut ebpf).expect("FLOWS and FLOW_INFO");
    let reading = maps.read();
    assert_eq!(reading.orphans, 0, "every FLOWS entry has its FLOW_INFO");
    for ((port, client), k) in clients.iter().zip(&keys) {
        let server = if Some(*port) == port6 {
            "dual-stack"
        } else {
            "AF_INET"
        };
        let what = format!("flow {client} -> port {port} ({server} server)");
        let opens = events
            .iter()
            .filter(|e| e.key == *k && e.kind == EVENT_OPEN)
            .count();
        let closes = events
            .iter()
            .filter(|e| e.key == *k && e.kind == EVENT_CLOSE)
            .count();
        assert_eq!(
            (opens, closes),
            (1, 1),
            "{what}: OPEN/CLOSE events; all events: {events:#?}"
        );
        let open = events.iter().find(|e| e.key == *k && e.kind == EVENT_OPEN);
        let close = events.iter().find(|e| e.key == *k && e.kind == EVENT_CLOSE);
        let (open, close) = (open.expect("open"), close.expect("close"));
        assert!(open.ts_ns > 0 && open.ts_ns <= close.ts_ns, "{what}: times");

        let mine: Vec<_> = reading.flows.iter().filter(|f| f.info.key == *k).collect();
        let [flow] = mine.as_slice() else {
            panic!(
                "{what}: {} FLOWS entries for {k:?} (one socket, one flow): {:#?}",
                mine.len(),
                reading.flows
            );
        };
        let st = flow.counts;
        eprintln!(
            "ebpf_programs: {what}: payload in {TO_SERVER} / counted bytes_in {} in {} packets; \
             payload out {TO_CLIENT} / counted bytes_out {} in {} packets",
            st.bytes_in, st.packets_in, st.bytes_out, st.packets_out
        );
        check_counter(&what, "in", st.bytes_in, st.packets_in, TO_SERVER);
        check_counter(&what, "out", st.bytes_out, st.packets_out, TO_CLIENT);
        // The handshake passes the hook on the listener, so the connection's own socket (and its
        // flow) starts with the ESTABLISHED state; the last packet (the client's last ACK) is
        // counted on its way in, before it moves the socket to CLOSE.
        let first = flow.info.first_seen_ns;
        assert!(
            open.ts_ns <= first && first <= close.ts_ns,
            "{what}: the flow's first packet between the events: {flow:?} {open:?} {close:?}"
        );
    }
    // Only the server's sockets are in the cgroup, and its listener is not counted: every flow is
    // one of ours (the client side of the same connections is not counted a second time).
    for f in &reading.flows {
        assert!(keys.contains(&f.info.key), "unexpected flow {f:?} in FLOWS");
    }
    assert_eq!(reading.flows.len(), keys.len(), "{:#?}", reading.flows);
    // Deleting a flow takes it out of both maps.
    for f in &reading.flows {
        maps.remove(f.cookie);
    }
    assert_eq!(
        maps.entries(),
        (0, 0),
        "FLOWS and FLOW_INFO after deleting every flow"
    );
    drop(ebpf); // detaches everything before the cgroup goes
}

/// The tracepoint's ring buffer under a burst of connections, watched as hearth's poller watches it
/// (tokio's `AsyncFd`: epoll, edge-triggered, woken only when the kernel wakes the ring's waiters):
/// below a quarter of the ring the events wake nobody (the poller drains them at its interval), past
/// it they wake the reader; what the full ring cannot take is counted in `EVENTS_LOST`, exactly.
#[test]
fn a_burst_of_connections_wakes_the_reader_and_counts_what_the_full_ring_loses() {
    if skipped("a_burst_of_connections_wakes_the_reader_and_counts_what_the_full_ring_loses") {
        return;
    }
    use hearth_common::user::LostEvents;
    use hearth_common::{EVENTS_BYTES, EVENTS_WAKE_BYTES};
    use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};

    // Only the tracepoint: it filters by port, so the server can be this process (no cgroup).
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (mut ebpf, _) = load(&[addr.port()]);
    attach_tracepoint(&mut ebpf);
    let lost = LostEvents::take(&mut ebpf).expect("EVENTS_LOST");
    let mut ring = RingBuf::try_from(ebpf.take_map(names::EVENTS).expect("no map EVENTS"))
        .expect("EVENTS is a ring buffer");
    // Registered while the ring is empty, so only wake-ups report it ready.
    let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).expect("epoll_create");
    epoll
        .add(
            &ring,
            EpollEvent::new(EpollFlags::EPOLLIN | EpollFlags::EPOLLET, 0),
        )
        .expect("epoll_ctl ADD");
    let woken = || {
        let mut ev = [EpollEvent::empty()];
        epoll
            .wait(&mut ev, EpollTimeout::from(200u16))
            .expect("epoll_wait")
            > 0
    };

    // One connection = an OPEN and a CLOSE event of the server's socket; a record is the event and
    // the ring's 8-byte header.
    let record = (size_of::<FlowEvent>() + 8) as u64;
    let conns_for = |bytes: u64| bytes / (2 * record);
    let burst = |n: u64| {
        for _ in 0..n {
            let client = TcpStream::connect(addr).expect("connect");
            let (server, _) = listener.accept().expect("accept");
            drop(server); // the server closes first
            let mut c = client;
            let mut rest = Vec::new();
            c.read_to_end(&mut rest).expect("reading to EOF");
        }
        // The last CLOSE comes with the client's final ACK, processed as the close returns.
        std::thread::sleep(Duration::from_millis(100));
    };

    let below = conns_for(u64::from(EVENTS_WAKE_BYTES)) * 3 / 4;
    burst(below);
    assert!(
        !woken(),
        "{below} connections ({} bytes of events, under the wake-up level of {EVENTS_WAKE_BYTES}) \
         woke the reader: events must not wake it one by one",
        below * 2 * record
    );
    let past = conns_for(u64::from(EVENTS_WAKE_BYTES)) / 2;
    burst(past);
    assert!(
        woken(),
        "{} connections ({} bytes of events, past the wake-up level of {EVENTS_WAKE_BYTES}) did \
         not wake the reader",
        below + past,
        (below + past) * 2 * record
    );
    assert_eq!(lost.total().expect("EVENTS_LOST"), 0, "nothing lost yet");
    // Nobody drains: past the ring's size, events are lost and counted.
    let fill = conns_for(u64::from(EVENTS_BYTES)) + 300 - below - past;
    burst(fill);
    let made = below + past + fill;
    let mut queued = 0u64;
    while let Some(item) = ring.next() {
        let ev = FlowEvent::from_record(&item).expect("a whole event");
        assert_eq!(
            ev.key.local_port,
            addr.port(),
            "an event of another port: {ev:?}"
        );
        queued += 1;
    }
    let lost_total = lost.total().expect("EVENTS_LOST");
    eprintln!(
        "ebpf_programs: burst of {made} connections: {queued} events queued, {lost_total} lost \
         (ring {EVENTS_BYTES} bytes, {record} bytes a record)"
    );
    assert!(lost_total > 0, "the ring overflowed, yet EVENTS_LOST is 0");
    assert_eq!(
        queued + lost_total,
        2 * made,
        "every event is either in the ring or counted as lost"
    );
    assert!(
        queued <= u64::from(EVENTS_BYTES) / record,
        "{queued} events in the ring"
    );
}

/// Whether the test must be skipped (loudly: straight to stderr, past the harness's output
/// capture); with `HEARTH_EBPF_REQUIRED=1` a reason to skip fails the test instead.
fn skipped(test: &str) -> bool {
    let Some(reason) = skip_reason() else {
        return false;
    };
    if std::env::var_os("HEARTH_EBPF_REQUIRED").is_some_and(|v| v == "1") {
        panic!("HEARTH_EBPF_REQUIRED=1 but the eBPF test {test} cannot run: {reason}");
    }
    let _ = writeln!(
        std::io::stderr(),
        "\n=== SKIPPED agent/tests/ebpf_programs.rs {test}: {reason} ===\n"
    );
    true
}

/// The object loaded as hearth loads it, with these gateway ports; and the capacity `FLOWS` got.
fn load(gateway_ports: &[u16]) -> (aya::Ebpf, u32) {
    let mut ports = [0u16; MAX_PORTS];
    ports[..gateway_ports.len()].copy_from_slice(gateway_ports);
    let n_ports = gateway_ports.len() as u32;
    let mut loader = EbpfLoader::new();
    loader
        .override_global(names::GATEWAY_PORTS, &ports, true)
        .override_global(names::N_PORTS, &n_ports, true);
    let capacity = size_flows(&mut loader).expect("sizing FLOWS");
    (
        loader.load(OBJECT).expect("loading the eBPF object"),
        capacity,
    )
}

/// `hearth_sock_state` on `sock/inet_sock_set_state` (tracefs mounted first, the record layout
/// checked).
fn attach_tracepoint(ebpf: &mut aya::Ebpf) {
    ensure_tracefs();
    check_tracepoint_format();
    let tp: &mut TracePoint = ebpf
        .program_mut(names::SOCK_STATE)
        .expect("no program hearth_sock_state")
        .try_into()
        .expect("a tracepoint program");
    tp.load().expect("loading hearth_sock_state");
    tp.attach("sock", "inet_sock_set_state")
        .expect("attaching hearth_sock_state");
}

fn check_counter(what: &str, dir: &str, bytes: u64, packets: u64, payload: usize) {
    let payload = payload as u64;
    assert!(
        packets >= 2,
        "{what}: {dir}: {packets} packets (data and acknowledgements)"
    );
    assert!(
        bytes >= payload,
        "{what}: {dir}: {bytes} bytes counted < payload {payload}"
    );
    assert!(
        bytes <= payload + packets * HEADER_BOUND,
        "{what}: {dir}: {bytes} bytes counted > payload {payload} + {packets} packets * \
         {HEADER_BOUND} bytes of headers"
    );
}

/// The key the programs build for the server side of the connection from `client`.
fn key(port: u16, client: SocketAddr) -> FlowKey {
    let (family, local, remote) = match client.ip() {
        IpAddr::V4(ip) => {
            let mut l = [0u8; 16];
            l[..4].copy_from_slice(&Ipv4Addr::LOCALHOST.octets());
            let mut r = [0u8; 16];
            r[..4].copy_from_slice(&ip.octets());
            (AF_INET, l, r)
        }
        IpAddr::V6(ip) => (AF_INET6, Ipv6Addr::LOCALHOST.octets(), ip.octets()),
    };
    FlowKey {
        local_addr: local,
        remote_addr: remote,
        local_port: port,
        remote_port: client.port(),
        family,
        _pad: 0,
    }
}

fn skip_reason() -> Option<String> {
    if env!("HEARTH_EBPF_BUILT") != "1" || OBJECT.is_empty() {
        return Some(
            "hearth was built without its eBPF object (target/ebpf/hearth-ebpf.o is missing: \
             run `cargo xtask build-ebpf`, then rerun the test)"
                .into(),
        );
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root (loading BPF programs and creating cgroups needs root)".into());
    }
    if cgroup2_mount().is_none() {
        return Some("no cgroup2 hierarchy is mounted (/proc/self/mountinfo)".into());
    }
    None
}

/// A port free on both loopbacks (the dual-stack server binds `::`).
fn free_port(ipv6: bool) -> u16 {
    for _ in 0..20 {
        let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
        let port = l.local_addr().expect("addr").port();
        drop(l);
        if !ipv6 || TcpListener::bind((Ipv6Addr::UNSPECIFIED, port)).is_ok() {
            return port;
        }
    }
    panic!("no free port");
}

/// The mount point of the cgroup2 hierarchy (/sys/fs/cgroup on pure v2, /sys/fs/cgroup/unified on
/// hybrid systems).
fn cgroup2_mount() -> Option<PathBuf> {
    hearth::cgroup::cgroup2_mount().expect("read /proc/self/mountinfo")
}

/// A child cgroup of the cgroup2 root, removed on drop.
struct TestCgroup {
    path: PathBuf,
}

impl TestCgroup {
    fn create() -> Self {
        let root = cgroup2_mount().expect("cgroup2 mount");
        let path = root.join(format!("hearth-ebpf-test-{}", std::process::id()));
        fs::create_dir(&path).unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
        Self { path }
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        // The server has exited (or is killed by Server's drop, which runs first); retry briefly
        // while the kernel finishes removing it.
        for _ in 0..50 {
            if fs::remove_dir(&self.path).is_ok() || !self.path.exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("ebpf_programs: could not remove {}", self.path.display());
    }
}

/// The python3 TCP server, moved into the cgroup before it creates its socket.
struct Server {
    child: Child,
    _stdin: ChildStdin,
}

impl Server {
    /// `dual_stack`: an AF_INET6 socket bound to `::` that takes IPv4 peers too; else an AF_INET
    /// socket on 127.0.0.1.
    fn start(port: u16, dual_stack: bool, conns: usize, cgroup: &TestCgroup) -> Self {
        let mut child = Command::new("python3")
            .args(["-c", SERVER])
            .arg(port.to_string())
            .arg(if dual_stack { "6" } else { "4" })
            .arg(conns.to_string())
            .arg(TO_SERVER.to_string())
            .arg(TO_CLIENT.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("starting python3");
        fs::write(cgroup.path.join("cgroup.procs"), child.id().to_string())
            .expect("moving the server into the cgroup");
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(b"go\n").expect("starting the server");
        stdin.flush().ok();
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("reading the server's output");
        assert_eq!(line.trim(), "ready", "the server did not start");
        Self {
            child,
            _stdin: stdin,
        }
    }

    fn wait(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().expect("waiting for the server") {
                assert!(status.success(), "the server failed: {status}");
                return;
            }
            assert!(Instant::now() < deadline, "the server did not finish");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Tracepoints need tracefs, which a fresh machine does not mount.
fn ensure_tracefs() {
    if Path::new("/sys/kernel/tracing/events").is_dir() {
        return;
    }
    let status = Command::new("mount")
        .args(["-t", "tracefs", "nodev", "/sys/kernel/tracing"])
        .status()
        .expect("running mount");
    assert!(status.success(), "mounting tracefs failed: {status}");
}

/// The record layout `hearth_sock_state` reads (agent-ebpf/src/flow.rs, `SockStateRecord`).
fn check_tracepoint_format() {
    let format = fs::read_to_string("/sys/kernel/tracing/events/sock/inet_sock_set_state/format")
        .expect("the format of sock/inet_sock_set_state");
    for (field, offset) in [
        ("skaddr", 8),
        ("oldstate", 16),
        ("newstate", 20),
        ("sport", 24),
        ("dport", 26),
        ("family", 28),
        ("protocol", 30),
        ("saddr[4]", 32),
        ("daddr[4]", 36),
        ("saddr_v6[16]", 40),
        ("daddr_v6[16]", 56),
    ] {
        let line = format
            .lines()
            .find(|l| l.contains(&format!(" {field};")))
            .unwrap_or_else(|| panic!("no field {field} in the tracepoint format:\n{format}"));
        assert!(
            line.contains(&format!("offset:{offset};")),
            "field {field} moved: {line}"
        );
    }
}
