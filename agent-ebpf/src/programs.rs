//! The BPF programs, maps and globals (compiled for `target_arch = "bpf"` only).

// Map keys and values are passed by reference: by value they would be copied onto the 512-byte BPF
// stack first.
#![allow(clippy::needless_borrows_for_generic_args)]

use core::intrinsics::{atomic_xadd, AtomicOrdering};
use core::ptr::read_volatile;

use aya_ebpf::bindings::{
    bpf_sock, BPF_NOEXIST, BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP,
};
use aya_ebpf::helpers::{bpf_get_socket_cookie, bpf_ktime_get_ns, bpf_sk_fullsock};
use aya_ebpf::macros::{cgroup_skb, map, tracepoint};
use aya_ebpf::maps::{LruHashMap, LruPerCpuHashMap, PerCpuArray, RingBuf};
use aya_ebpf::programs::{SkBuffContext, TracePointContext};
use aya_ebpf::EbpfContext;
use hearth_common::{
    FlowEvent, FlowInfo, PacketCounts, EVENTS_BYTES, EVENTS_WAKE_BYTES, MAX_FLOWS, MAX_PORTS,
};

use crate::flow::{self, Direction, SockAddrs, SockStateRecord, IPPROTO_TCP, TCP_LISTEN};

/// Per-flow counters (`names::FLOWS`), keyed by the socket's cookie, one [`PacketCounts`] per CPU:
/// a packet updates its own CPU's copy, so the CPUs that receive a flow's requests and the ones that
/// send its responses never share a cache line (on a 16-CPU host one shared entry per flow cost about
/// 170 ns of work per packet, per-CPU ones about 65: docs/benchmarks.md). LRU: flows nobody deletes age out. The loader sizes it to the host's CPU
/// count (`hearth_common::flows_capacity`).
#[map]
static FLOWS: LruPerCpuHashMap<u64, PacketCounts> =
    LruPerCpuHashMap::with_max_entries(MAX_FLOWS, 0);

/// What each flow of `FLOWS` is (`names::FLOW_INFO`): its addresses and when it started, written
/// once with its first packet.
#[map]
static FLOW_INFO: LruHashMap<u64, FlowInfo> = LruHashMap::with_max_entries(MAX_FLOWS, 0);

/// Open/close events of connections to the gateway ports (`names::EVENTS`).
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_BYTES, 0);

/// Events the ring buffer had no room for (`names::EVENTS_LOST`): one counter, per CPU. User space
/// adds up the CPUs and reports the total (metric `hearth_sensor_lost_events`).
#[map]
static EVENTS_LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// The gateway's listening ports (`names::GATEWAY_PORTS`), the first `N_PORTS` used. Set by the loader
/// (`EbpfLoader::override_global`); read only with `read_volatile` so the compiler cannot fold the
/// zero initial value into the code.
#[unsafe(no_mangle)]
static GATEWAY_PORTS: [u16; MAX_PORTS] = [0; MAX_PORTS];

/// How many entries of `GATEWAY_PORTS` are used (`names::N_PORTS`).
#[unsafe(no_mangle)]
static N_PORTS: u32 = 0;

/// The kernel needs a license string; only helpers that are not GPL-only are used (map access,
/// `bpf_get_socket_cookie`, `bpf_sk_fullsock`, `bpf_ktime_get_ns`, ring buffer; tracepoint fields are read straight from the
/// context), so the project's own license works. A GPL-only helper would need a GPL-compatible string.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 11] = *b"Apache-2.0\0";

#[cgroup_skb(ingress)]
pub fn hearth_ingress(ctx: SkBuffContext) -> i32 {
    #[cfg(not(feature = "control"))]
    count(&ctx, Direction::In);
    #[cfg(feature = "control")]
    let _ = ctx;
    1
}

#[cgroup_skb(egress)]
pub fn hearth_egress(ctx: SkBuffContext) -> i32 {
    #[cfg(not(feature = "control"))]
    count(&ctx, Direction::Out);
    #[cfg(feature = "control")]
    let _ = ctx;
    1
}

/// Adds a packet of one of the cgroup's TCP sockets to its flow. The hot path is the socket's cookie
/// (a helper that reads a field of the socket) and one lookup of an 8-byte key; nothing of the packet
/// is parsed. A socket's first packet creates its flow ([`new_flow`]).
#[inline(always)]
fn count(ctx: &SkBuffContext, dir: Direction) -> Option<()> {
    let skb = ctx.skb.skb;
    // SAFETY: a BPF helper called with the program's own context (`struct __sk_buff`). In a
    // cgroup_skb program the buffer always has its socket (the hook runs for a socket), so the
    // cookie is that socket's, stable for its life and never reused.
    let cookie = unsafe { bpf_get_socket_cookie(skb.cast()) };
    let counts = match FLOWS.get_ptr_mut(&cookie) {
        Some(c) => c,
        None => new_flow(ctx, cookie)?,
    };
    let len = u64::from(ctx.len());
    // SAFETY: `counts` is this CPU's value of a `FLOWS` entry from a successful lookup: valid,
    // 8-byte aligned and alive for this program's run. The adds are atomic (`lock add`, on a cache
    // line no other CPU writes, so cheap) because a program on this CPU may be interrupted by
    // another one (egress in process context, ingress in a softirq) updating the same value.
    unsafe {
        let (bytes, packets) = match dir {
            Direction::In => (&raw mut (*counts).bytes_in, &raw mut (*counts).packets_in),
            Direction::Out => (&raw mut (*counts).bytes_out, &raw mut (*counts).packets_out),
        };
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(bytes, len);
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(packets, 1);
    }
    Some(())
}

/// Creates the flow of a socket not in `FLOWS` yet: its `FLOW_INFO` (addresses read from the socket,
/// keyed as the tracepoint keys it) first, so that every `FLOWS` entry user space sees has one, then
/// zeroed counters. Not for other protocols than TCP, nor for a listening socket: the handshake of
/// an accepted connection (SYN, SYN-ACK, the final ACK) passes the hook on the listener, before the
/// connection has a socket of its own, so it is not counted; the connection's flow starts with its
/// first packet after that.
#[inline(always)]
fn new_flow(ctx: &SkBuffContext, cookie: u64) -> Option<*mut PacketCounts> {
    // SAFETY: reading the `sk` field of the program's context, which the verifier turns into a
    // (nullable) socket pointer.
    let sk = unsafe { (*ctx.skb.skb).__bindgen_anon_2.sk };
    if sk.is_null() {
        return None;
    }
    // SAFETY: a BPF helper given a non-null socket pointer from the context; it returns the full
    // socket or null.
    let sk = unsafe { bpf_sk_fullsock(sk) };
    if sk.is_null() {
        return None;
    }
    let addrs = read_sock(sk)?;
    let key = flow::sock_key(&addrs)?;
    let info = FlowInfo {
        key,
        // SAFETY: a BPF helper without preconditions.
        first_seen_ns: unsafe { bpf_ktime_get_ns() },
    };
    // Replaces a stale entry left by an evicted `FLOWS` one.
    FLOW_INFO.insert(&cookie, &info, 0).ok()?;
    // Another CPU may have inserted it first: then this fails and the lookup finds theirs.
    let _ = FLOWS.insert(&cookie, &PacketCounts::default(), u64::from(BPF_NOEXIST));
    FLOWS.get_ptr_mut(&cookie)
}

/// The addresses of a full TCP socket that is not listening, field by field: the context rewrite
/// for `struct bpf_sock` accepts only loads of a field's own size, so every load is a volatile one
/// that the compiler cannot merge with its neighbour.
#[inline(always)]
fn read_sock(sk: *mut bpf_sock) -> Option<SockAddrs> {
    // SAFETY: `sk` is a non-null full socket from `bpf_sk_fullsock`; each read is one field of
    // `struct bpf_sock`, at its own size, which the verifier checks and rewrites.
    unsafe {
        if read_volatile(&raw const (*sk).protocol) != u32::from(IPPROTO_TCP)
            || read_volatile(&raw const (*sk).state) == TCP_LISTEN as u32
        {
            return None;
        }
        let word = |p: *const u32| read_volatile(p).to_le_bytes();
        let six = |p: *const [u32; 4]| {
            let w = p.cast::<u32>();
            let (a, b, c, d) = (word(w), word(w.add(1)), word(w.add(2)), word(w.add(3)));
            [
                a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], c[0], c[1], c[2], c[3], d[0], d[1],
                d[2], d[3],
            ]
        };
        let family = read_volatile(&raw const (*sk).family);
        Some(SockAddrs {
            family: u16::try_from(family).ok()?,
            local4: word(&raw const (*sk).src_ip4),
            remote4: word(&raw const (*sk).dst_ip4),
            local6: six(&raw const (*sk).src_ip6),
            remote6: six(&raw const (*sk).dst_ip6),
            // `src_port` is in host byte order, `dst_port` in network byte order (16 bits).
            local_port: u16::try_from(read_volatile(&raw const (*sk).src_port)).ok()?,
            remote_port: u16::from_be(read_volatile(&raw const (*sk).dst_port)),
        })
    }
}

#[tracepoint]
pub fn hearth_sock_state(ctx: TracePointContext) -> u32 {
    sock_state(&ctx);
    0
}

#[inline(always)]
fn sock_state(ctx: &TracePointContext) -> Option<()> {
    // SAFETY: a tracepoint program may read its context directly; the verifier checks the offsets
    // (within the record, past the common fields, aligned).
    let r: SockStateRecord = unsafe {
        core::ptr::read(
            ctx.as_ptr()
                .cast::<u8>()
                .add(flow::SOCK_STATE_OFFSET)
                .cast::<SockStateRecord>(),
        )
    };
    if r.protocol != u16::from(IPPROTO_TCP) {
        return None;
    }
    let kind = flow::event_kind(r.oldstate, r.newstate)?;
    // SAFETY: volatile reads of globals the loader fills in before loading; the index is < MAX_PORTS.
    let n = unsafe { core::ptr::read_volatile(&raw const N_PORTS) };
    let gateway = flow::is_gateway_port(n, r.sport, |i| unsafe {
        core::ptr::read_volatile(GATEWAY_PORTS.as_ptr().add(i))
    });
    if !gateway {
        return None;
    }
    let key = flow::socket_key(&r)?;
    let Some(mut entry) = EVENTS.reserve::<FlowEvent>(0) else {
        // The ring is full: the reader fell behind. Counted, so that user space can say so.
        if let Some(lost) = EVENTS_LOST.get_ptr_mut(0) {
            // SAFETY: this CPU's slot of a one-entry per-CPU array, from a successful lookup:
            // valid, aligned and alive for this run. (Atomic although tracepoint programs do not
            // nest on one CPU: on this rare path it costs nothing worth an argument.)
            unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(lost, 1) };
        }
        return None;
    };
    entry.write(FlowEvent {
        key,
        kind,
        _pad: 0,
        // SAFETY: a BPF helper without preconditions.
        ts_ns: unsafe { bpf_ktime_get_ns() },
    });
    // No wake-up per event (waking the reader cost ~3 µs per state change, measured by
    // `cargo xtask bench sensor`): the reader drains the ring at its poll interval. Only once a
    // burst has filled a quarter of the ring does each event wake it, so that it drains the ring
    // before it is full instead of losing events until its next poll.
    let queued = EVENTS.query(u64::from(BPF_RB_AVAIL_DATA));
    let wake = if queued >= u64::from(EVENTS_WAKE_BYTES) {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    };
    entry.submit(u64::from(wake));
    Some(())
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    // Nothing can panic in these programs; were a panic path left in, this loop would make the
    // verifier reject the program instead of hiding the bug.
    loop {}
}
