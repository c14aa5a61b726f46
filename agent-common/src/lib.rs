//! Types shared by hearth's kernel programs (`agent-ebpf`, built for `bpfel-unknown-none`) and the
//! agent's sensor (user side, feature `user`). Everything is `#[repr(C)]`, fixed-size and free of
//! implicit padding, so the kernel and user side agree byte for byte.
#![no_std]

/// How many gateway ports the programs can filter on (`GATEWAY_PORTS`).
pub const MAX_PORTS: usize = 8;
/// Entries of `FLOW_INFO`, and the most entries of `FLOWS` (see [`flows_capacity`]).
pub const MAX_FLOWS: u32 = 16384;
/// Size of the `EVENTS` ring buffer in bytes (a power of two, a multiple of the page size).
pub const EVENTS_BYTES: u32 = 256 * 1024;
/// The tracepoint submits its events without waking the reader (the agent drains the ring at its
/// poll interval), until this many bytes wait in the ring: from there on each event wakes the
/// reader, so that a burst of connections is drained before the ring fills (a quarter of the ring,
/// about 1,000 events).
pub const EVENTS_WAKE_BYTES: u32 = EVENTS_BYTES / 4;
/// Memory the per-CPU counters of `FLOWS` may take: every entry holds one [`PacketCounts`] per
/// possible CPU, allocated when the map is created.
pub const FLOWS_COUNTERS_BYTES: u64 = 8 * 1024 * 1024;
/// The fewest entries `FLOWS` gets, however many CPUs.
pub const MIN_FLOWS: u32 = 1024;

/// Address families as the kernel numbers them.
pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

/// Names of the maps, programs and globals in the object, for the loader.
pub mod names {
    pub const FLOWS: &str = "FLOWS";
    pub const FLOW_INFO: &str = "FLOW_INFO";
    pub const EVENTS: &str = "EVENTS";
    pub const EVENTS_LOST: &str = "EVENTS_LOST";
    pub const GATEWAY_PORTS: &str = "GATEWAY_PORTS";
    pub const N_PORTS: &str = "N_PORTS";
    pub const INGRESS: &str = "hearth_ingress";
    pub const EGRESS: &str = "hearth_egress";
    pub const SOCK_STATE: &str = "hearth_sock_state";
}

/// Entries of `FLOWS` on a host with `possible_cpus` CPUs (what per-CPU maps allocate for): as many
/// as [`FLOWS_COUNTERS_BYTES`] hold, between [`MIN_FLOWS`] and [`MAX_FLOWS`]. The loader sets it
/// (`EbpfLoader::map_max_entries`, through `user::size_flows`); the object's own value is [`MAX_FLOWS`].
pub const fn flows_capacity(possible_cpus: u32) -> u32 {
    let cpus = if possible_cpus == 0 {
        1
    } else {
        possible_cpus as u64
    };
    let fit = FLOWS_COUNTERS_BYTES / (cpus * core::mem::size_of::<PacketCounts>() as u64);
    if fit < MIN_FLOWS as u64 {
        MIN_FLOWS
    } else if fit > MAX_FLOWS as u64 {
        MAX_FLOWS
    } else {
        fit as u32
    }
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

/// One CPU's counters of one flow (the per-CPU values of `FLOWS`, keyed by the socket's cookie),
/// updated by the `cgroup_skb` programs; user space adds up the CPUs ([`PacketCounts::add`]). Bytes
/// are IP packet lengths (headers included), `in` = received by the gateway.
///
/// `packets_*` count socket buffers as the cgroup hooks see them: with segmentation offload (GSO/TSO
/// on the way out, GRO on the way in, and always on loopback) one of them can carry many wire
/// segments, so they are not wire packets (a 300 kB transfer over loopback is about 15). `bytes_*`
/// are the buffers' lengths: the payload plus one IP and TCP header per buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PacketCounts {
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub packets_in: u64,
    pub packets_out: u64,
}

impl PacketCounts {
    /// Adds another CPU's counters to these.
    pub fn add(&mut self, other: &PacketCounts) {
        self.bytes_in = self.bytes_in.wrapping_add(other.bytes_in);
        self.bytes_out = self.bytes_out.wrapping_add(other.bytes_out);
        self.packets_in = self.packets_in.wrapping_add(other.packets_in);
        self.packets_out = self.packets_out.wrapping_add(other.packets_out);
    }
}

/// What a flow is (`FLOW_INFO`, keyed by the socket's cookie like `FLOWS`): written once, by the
/// program that saw the socket's first packet. `first_seen_ns` is `bpf_ktime_get_ns`
/// (CLOCK_MONOTONIC) then; the programs read no clock per packet (it is slow on some VMs), so user
/// space dates activity by the counters' changes between its readings.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowInfo {
    pub key: FlowKey,
    pub first_seen_ns: u64,
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
pub mod user;

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain-old-data: #[repr(C)], only integer fields and arrays, no implicit padding (the
    // explicit `_pad` fields fill it), so every bit pattern is a valid value.
    unsafe impl aya::Pod for super::FlowKey {}
    // SAFETY: as above (four u64).
    unsafe impl aya::Pod for super::PacketCounts {}
    // SAFETY: as above (a FlowKey, which is Pod, and a u64; 48 bytes, no padding).
    unsafe impl aya::Pod for super::FlowInfo {}
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
        use super::super::{
            flows_capacity, FlowEvent, FlowInfo, FlowKey, PacketCounts, AF_INET, EVENT_CLOSE,
            MAX_FLOWS, MIN_FLOWS,
        };

        #[test]
        fn flows_capacity_keeps_the_counters_within_their_budget() {
            assert_eq!(flows_capacity(2), MAX_FLOWS);
            assert_eq!(
                flows_capacity(16),
                MAX_FLOWS,
                "16 CPUs x 16384 x 32 B = 8 MiB"
            );
            assert_eq!(flows_capacity(64), 4096);
            assert_eq!(flows_capacity(100), 2621);
            assert_eq!(flows_capacity(4096), MIN_FLOWS);
            assert_eq!(flows_capacity(0), MAX_FLOWS, "no CPU count: as one");
        }

        #[test]
        fn layouts_have_no_padding() {
            assert_eq!(core::mem::size_of::<FlowKey>(), 40);
            assert_eq!(core::mem::size_of::<FlowInfo>(), 48);
            assert_eq!(core::mem::size_of::<PacketCounts>(), 32);
        }

        #[test]
        fn counts_add_up() {
            let mut a = PacketCounts {
                bytes_in: 10,
                bytes_out: 20,
                packets_in: 1,
                packets_out: 2,
            };
            a.add(&PacketCounts {
                bytes_in: 5,
                bytes_out: 0,
                packets_in: 1,
                packets_out: 0,
            });
            assert_eq!(
                a,
                PacketCounts {
                    bytes_in: 15,
                    bytes_out: 20,
                    packets_in: 2,
                    packets_out: 2
                }
            );
        }

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
