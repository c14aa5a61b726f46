//! Types shared by hearth's kernel programs (`agent-ebpf`, built for `bpfel-unknown-none`) and the
//! agent's sensor (user side, feature `user`). Everything is `#[repr(C)]`, fixed-size and free of
//! implicit padding, so the kernel and user side agree byte for byte.
#![no_std]

/// How many gateway ports the programs can filter on (`GATEWAY_PORTS`).
pub const MAX_PORTS: usize = 8;
/// Entries of the `FLOWS` LRU map.
pub const MAX_FLOWS: u32 = 16384;
/// Size of the `EVENTS` ring buffer in bytes (a power of two, a multiple of the page size).
pub const EVENTS_BYTES: u32 = 256 * 1024;

/// Address families as the kernel numbers them.
pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

/// Names of the maps, programs and globals in the object, for the loader.
pub mod names {
    pub const FLOWS: &str = "FLOWS";
    pub const EVENTS: &str = "EVENTS";
    pub const GATEWAY_PORTS: &str = "GATEWAY_PORTS";
    pub const N_PORTS: &str = "N_PORTS";
    pub const INGRESS: &str = "hearth_ingress";
    pub const EGRESS: &str = "hearth_egress";
    pub const SOCK_STATE: &str = "hearth_sock_state";
}

/// One TCP flow as the gateway's socket sees it: `local` is the gateway's end. IPv4 addresses are
/// stored in the first 4 bytes of the 16 (the rest zero). Ports in host byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub local_addr: [u8; 16],
    pub remote_addr: [u8; 16],
    pub local_port: u16,
    pub remote_port: u16,
    /// [`AF_INET`] or [`AF_INET6`].
    pub family: u16,
    pub _pad: u16,
}

/// Counters of one flow, updated by the `cgroup_skb` programs. Bytes are IP packet lengths (headers
/// included), `in` = received by the gateway. Times are `bpf_ktime_get_ns` (CLOCK_MONOTONIC), and
/// both are set when the entry is created only: the programs read no clock per packet (it is slow
/// on some VMs); user space dates activity by the counters' changes between its readings.
///
/// `packets_*` count socket buffers as the cgroup hooks see them: with segmentation offload (GSO/TSO
/// on the way out, GRO on the way in, and always on loopback) one of them can carry many wire
/// segments, so they are not wire packets (a 300 kB transfer over loopback is about 15). `bytes_*`
/// are the buffers' lengths: the payload plus one IP and TCP header per buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowStats {
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub packets_in: u64,
    pub packets_out: u64,
    pub first_seen_ns: u64,
    pub last_seen_ns: u64,
}

/// [`FlowEvent::kind`]: the connection reached ESTABLISHED.
pub const EVENT_OPEN: u32 = 1;
/// [`FlowEvent::kind`]: the connection reached CLOSE.
pub const EVENT_CLOSE: u32 = 2;

/// A connection to one of the gateway ports opened or closed (tracepoint
/// `sock/inet_sock_set_state`), sent through the `EVENTS` ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowEvent {
    pub key: FlowKey,
    pub kind: u32,
    pub _pad: u32,
    pub ts_ns: u64,
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain-old-data: #[repr(C)], only integer fields and arrays, no implicit padding (the
    // explicit `_pad` fields fill it), so every bit pattern is a valid value.
    unsafe impl aya::Pod for super::FlowKey {}
    // SAFETY: as above (six u64).
    unsafe impl aya::Pod for super::FlowStats {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::FlowEvent {}
}
