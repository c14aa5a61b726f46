//! The BPF programs, maps and globals (compiled for `target_arch = "bpf"` only).

// Map keys and values are passed by reference: by value they would be copied onto the 512-byte BPF
// stack first.
#![allow(clippy::needless_borrows_for_generic_args)]

use core::intrinsics::{atomic_xadd, AtomicOrdering};

use aya_ebpf::bindings::{BPF_NOEXIST, BPF_RB_NO_WAKEUP};
use aya_ebpf::helpers::bpf_ktime_get_ns;
use aya_ebpf::macros::{cgroup_skb, map, tracepoint};
use aya_ebpf::maps::{LruHashMap, RingBuf};
use aya_ebpf::programs::{SkBuffContext, TracePointContext};
use aya_ebpf::EbpfContext;
use hearth_common::{
    FlowEvent, FlowKey, FlowStats, AF_INET, AF_INET6, EVENTS_BYTES, MAX_FLOWS, MAX_PORTS,
};

use crate::flow::{self, Direction, IpHeader, SockStateRecord, IPPROTO_TCP};

/// Per-flow counters (`names::FLOWS`). LRU: flows nobody reads any more age out.
#[map]
static FLOWS: LruHashMap<FlowKey, FlowStats> = LruHashMap::with_max_entries(MAX_FLOWS, 0);

/// Open/close events of connections to the gateway ports (`names::EVENTS`).
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_BYTES, 0);

/// The gateway's listening ports (`names::GATEWAY_PORTS`), the first `N_PORTS` used. Set by the loader
/// (`EbpfLoader::override_global`); read only with `read_volatile` so the compiler cannot fold the
/// zero initial value into the code.
#[unsafe(no_mangle)]
static GATEWAY_PORTS: [u16; MAX_PORTS] = [0; MAX_PORTS];

/// How many entries of `GATEWAY_PORTS` are used (`names::N_PORTS`).
#[unsafe(no_mangle)]
static N_PORTS: u32 = 0;

/// The kernel needs a license string; only helpers that are not GPL-only are used (map access,
/// `bpf_skb_load_bytes`, `bpf_ktime_get_ns`, ring buffer; tracepoint fields are read straight from the
/// context), so the project's own license works. A GPL-only helper would need a GPL-compatible string.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 11] = *b"Apache-2.0\0";

#[cgroup_skb(ingress)]
pub fn hearth_ingress(ctx: SkBuffContext) -> i32 {
    count(&ctx, Direction::In);
    1
}

#[cgroup_skb(egress)]
pub fn hearth_egress(ctx: SkBuffContext) -> i32 {
    count(&ctx, Direction::Out);
    1
}

/// Adds a TCP packet (the skb starts at the IP header in `cgroup_skb`) to its flow in `FLOWS`.
#[inline(always)]
fn count(ctx: &SkBuffContext, dir: Direction) -> Option<()> {
    let pkt = Linear::of(ctx);
    let (family, src, dst, l4) = match flow::ip_header(&pkt.read(ctx, 0)?) {
        IpHeader::V4Tcp { src, dst, l4 } => (AF_INET, src, dst, l4),
        IpHeader::V6Tcp => {
            let addrs: [u8; 32] = pkt.read(ctx, 8)?;
            let mut src = [0u8; 16];
            let mut dst = [0u8; 16];
            src.copy_from_slice(&addrs[..16]);
            dst.copy_from_slice(&addrs[16..]);
            (AF_INET6, src, dst, flow::IPV6_L4)
        }
        IpHeader::Other => return None,
    };
    let ports: [u8; 4] = pkt.read(ctx, l4)?;
    let sport = u16::from_be_bytes([ports[0], ports[1]]);
    let dport = u16::from_be_bytes([ports[2], ports[3]]);
    let key = flow::packet_key(family, src, dst, sport, dport, dir);
    let len = u64::from(ctx.len());

    // The hot path reads no clock (slow on some VMs): user space dates activity by the counters'
    // changes at its poll. Only a new entry gets its creation time.
    if let Some(stats) = FLOWS.get_ptr_mut(&key) {
        add(stats, dir, len);
        return Some(());
    }
    // SAFETY: a BPF helper without preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let mut init = FlowStats {
        first_seen_ns: now,
        last_seen_ns: now,
        ..FlowStats::default()
    };
    match dir {
        Direction::In => {
            init.bytes_in = len;
            init.packets_in = 1;
        }
        Direction::Out => {
            init.bytes_out = len;
            init.packets_out = 1;
        }
    }
    if FLOWS.insert(&key, &init, u64::from(BPF_NOEXIST)).is_err() {
        // Another CPU inserted it first (or the map is full of entries it could not evict).
        let stats = FLOWS.get_ptr_mut(&key)?;
        add(stats, dir, len);
    }
    Some(())
}

/// The linear part of the packet, which `cgroup_skb` programs may read directly (`data`..`data_end`).
/// Egress buffers and TCP's received ones have their headers there, so reads rarely need the
/// `bpf_skb_load_bytes` helper, which costs a call each.
struct Linear {
    data: usize,
    end: usize,
}

impl Linear {
    #[inline(always)]
    fn of(ctx: &SkBuffContext) -> Linear {
        let skb = ctx.skb.skb;
        // SAFETY: `skb` is the program's context; reading its `data` and `data_end` fields is what
        // the verifier turns into packet pointers.
        let (data, end) = unsafe { ((*skb).data as usize, (*skb).data_end as usize) };
        Linear { data, end }
    }

    /// `N` bytes at `offset` of the packet: straight from the linear part when they lie in it, else
    /// through the helper (None if the packet is shorter).
    #[inline(always)]
    fn read<const N: usize>(&self, ctx: &SkBuffContext, offset: usize) -> Option<[u8; N]> {
        let start = self.data + offset;
        if start + N > self.end {
            return ctx.load(offset).ok();
        }
        let mut out = [0u8; N];
        let mut i = 0;
        while i < N {
            // SAFETY: start + i < start + N <= end: inside the linear part, checked just above (the
            // verifier proves the same bound before it accepts the load).
            out[i] = unsafe { *((start + i) as *const u8) };
            i += 1;
        }
        Some(out)
    }
}

/// Atomic adds on an entry other CPUs may update at the same time: `lock *(u64 *)(r + off) += r'`
/// (BPF_ATOMIC | BPF_ADD without BPF_FETCH, as the result is unused).
#[inline(always)]
fn add(stats: *mut FlowStats, dir: Direction, len: u64) {
    // SAFETY: `stats` is a map value pointer from a successful lookup: valid, 8-byte aligned and
    // alive for this program's run; the counters are only ever updated atomically.
    unsafe {
        let (bytes, packets) = match dir {
            Direction::In => (&raw mut (*stats).bytes_in, &raw mut (*stats).packets_in),
            Direction::Out => (&raw mut (*stats).bytes_out, &raw mut (*stats).packets_out),
        };
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(bytes, len);
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(packets, 1);
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
    let mut entry = EVENTS.reserve::<FlowEvent>(0)?;
    entry.write(FlowEvent {
        key,
        kind,
        _pad: 0,
        // SAFETY: a BPF helper without preconditions.
        ts_ns: unsafe { bpf_ktime_get_ns() },
    });
    // No wake-up per event (waking the reader cost ~3 µs per state change, measured by
    // `cargo xtask bench sensor`): the reader drains the ring at its poll interval.
    entry.submit(u64::from(BPF_RB_NO_WAKEUP));
    Some(())
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    // Nothing can panic in these programs; were a panic path left in, this loop would make the
    // verifier reject the program instead of hiding the bug.
    loop {}
}
