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

    impl super::FlowEvent {
        /// The event in a record of the `EVENTS` ring buffer (None if the record is too short).
        pub fn from_record(record: &[u8]) -> Option<super::FlowEvent> {
            if record.len() < core::mem::size_of::<super::FlowEvent>() {
                return None;
            }
            // SAFETY: FlowEvent is plain old data (above: every bit pattern is a value), the record
            // holds at least its size in bytes, and read_unaligned copes with any alignment.
            Some(unsafe { core::ptr::read_unaligned(record.as_ptr().cast()) })
        }
    }

    #[cfg(test)]
    mod tests {
        use super::super::{FlowEvent, FlowKey, AF_INET, EVENT_CLOSE};

        #[test]
        fn a_record_is_read_back_at_any_alignment_and_a_short_one_is_refused() {
            let ev = FlowEvent {
                key: FlowKey {
                    local_addr: [127, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                    remote_addr: [10, 1, 2, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                    local_port: 18789,
                    remote_port: 40000,
                    family: AF_INET,
                    _pad: 0,
                },
                kind: EVENT_CLOSE,
                _pad: 0,
                ts_ns: 123_456_789,
            };
            let size = core::mem::size_of::<FlowEvent>();
            // One byte in, so the record is not 8-byte aligned.
            let mut buf = [0u8; 128];
            // SAFETY: FlowEvent is plain old data; the destination holds `size` bytes after offset 1.
            unsafe {
                core::ptr::copy_nonoverlapping(
                    (&raw const ev).cast::<u8>(),
                    buf.as_mut_ptr().add(1),
                    size,
                );
            }
            assert_eq!(FlowEvent::from_record(&buf[1..1 + size]), Some(ev));
            assert_eq!(FlowEvent::from_record(&buf[1..size]), None);
        }
    }
}
