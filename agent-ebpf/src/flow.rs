//! The pure part of the programs: packet and tracepoint fields to a [`FlowKey`], gateway-port
//! matching, state transitions to events. Plain functions over values, so they are unit-tested on the
//! host (`cargo test -p hearth-ebpf`) and compiled unchanged into the BPF object.

use hearth_common::{FlowKey, AF_INET, AF_INET6, EVENT_CLOSE, EVENT_OPEN, MAX_PORTS};

/// `IPPROTO_TCP`.
pub const IPPROTO_TCP: u8 = 6;
/// TCP states as `include/net/tcp_states.h` numbers them.
pub const TCP_ESTABLISHED: i32 = 1;
pub const TCP_CLOSE: i32 = 7;
pub const TCP_LISTEN: i32 = 10;

/// Which way a packet goes, from the gateway's side (the cgroup the programs are attached to).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Direction {
    /// Received by the gateway (`cgroup_skb/ingress`).
    In,
    /// Sent by the gateway (`cgroup_skb/egress`).
    Out,
}

/// An IPv4 address in the 16-byte form of [`FlowKey`] (first 4 bytes, the rest zero). Built from an
/// integer rather than by filling a zeroed array, which LLVM turns into a `memset` call that BPF can
/// only do as a (needless) BPF-to-BPF call.
#[inline(always)]
pub fn v4(a: [u8; 4]) -> [u8; 16] {
    u128::from(u32::from_le_bytes(a)).to_le_bytes()
}

/// A socket's addresses as the kernel keeps them (`struct bpf_sock` for the `cgroup_skb` programs,
/// the `sock/inet_sock_set_state` record for the tracepoint): `local` is the socket's own end.
/// Addresses in network byte order, ports in host byte order.
#[derive(Clone, Copy, Debug)]
pub struct SockAddrs {
    pub family: u16,
    pub local4: [u8; 4],
    pub remote4: [u8; 4],
    pub local6: [u8; 16],
    pub remote6: [u8; 16],
    pub local_port: u16,
    pub remote_port: u16,
}

/// The key of a socket: local = the socket's own address and port. An AF_INET6 socket whose peer is
/// an IPv4-mapped address (`::ffff:a.b.c.d`, a dual-stack listener accepting IPv4) sends and
/// receives IPv4 packets, so its key is the AF_INET one: a gateway listening on `::` gets the same
/// keys for its IPv4 peers whichever way the socket is seen. None for other families.
#[inline(always)]
pub fn sock_key(a: &SockAddrs) -> Option<FlowKey> {
    let (family, local_addr, remote_addr) = match a.family {
        AF_INET => (AF_INET, v4(a.local4), v4(a.remote4)),
        AF_INET6 if is_v4_mapped(&a.remote6) => (
            AF_INET,
            v4([a.local6[12], a.local6[13], a.local6[14], a.local6[15]]),
            v4([a.remote6[12], a.remote6[13], a.remote6[14], a.remote6[15]]),
        ),
        AF_INET6 => (AF_INET6, a.local6, a.remote6),
        _ => return None,
    };
    Some(FlowKey {
        local_addr,
        remote_addr,
        local_port: a.local_port,
        remote_port: a.remote_port,
        family,
        _pad: 0,
    })
}

/// Whether `port` is one of the first `n` (at most [`MAX_PORTS`]) entries of `ports`. `load(i)` reads
/// entry `i` (the BPF side reads the global with a volatile load so that it is not constant-folded).
/// Port 0 never matches.
#[inline(always)]
pub fn is_gateway_port(n: u32, port: u16, load: impl Fn(usize) -> u16) -> bool {
    if port == 0 {
        return false;
    }
    let n = n as usize;
    let mut i = 0;
    while i < MAX_PORTS {
        if i >= n {
            return false;
        }
        if load(i) == port {
            return true;
        }
        i += 1;
    }
    false
}

/// The fields of `sock/inet_sock_set_state` after the 8 bytes of common fields (see
/// /sys/kernel/tracing/events/sock/inet_sock_set_state/format): offset 8 in the record.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct SockStateRecord {
    pub skaddr: u64,
    pub oldstate: i32,
    pub newstate: i32,
    /// The socket's local port, host byte order.
    pub sport: u16,
    /// The peer's port, host byte order.
    pub dport: u16,
    pub family: u16,
    pub protocol: u16,
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
    pub saddr_v6: [u8; 16],
    pub daddr_v6: [u8; 16],
}

/// Offset of [`SockStateRecord`] in the tracepoint record.
pub const SOCK_STATE_OFFSET: usize = 8;

/// The event for a state change of a socket whose local port is a gateway port: [`EVENT_OPEN`] on
/// ESTABLISHED, [`EVENT_CLOSE`] on CLOSE (except a listener's LISTEN -> CLOSE, which is no
/// connection), nothing otherwise.
pub fn event_kind(oldstate: i32, newstate: i32) -> Option<u32> {
    match newstate {
        TCP_ESTABLISHED => Some(EVENT_OPEN),
        TCP_CLOSE if oldstate != TCP_LISTEN => Some(EVENT_CLOSE),
        _ => None,
    }
}

/// The key of the socket of a tracepoint record: the same as the `cgroup_skb` programs give the
/// socket ([`sock_key`]).
pub fn socket_key(r: &SockStateRecord) -> Option<FlowKey> {
    sock_key(&SockAddrs {
        family: r.family,
        local4: r.saddr,
        remote4: r.daddr,
        local6: r.saddr_v6,
        remote6: r.daddr_v6,
        local_port: r.sport,
        remote_port: r.dport,
    })
}

/// `::ffff:0:0/96`.
#[inline(always)]
pub fn is_v4_mapped(a: &[u8; 16]) -> bool {
    a[..10].iter().all(|&b| b == 0) && a[10] == 0xff && a[11] == 0xff
}

#[cfg(test)]
mod tests {
    use super::*;

    const C: [u8; 4] = [10, 0, 0, 2];
    const G: [u8; 4] = [10, 0, 0, 1];

    #[test]
    fn gateway_ports_respect_the_count() {
        let ports = [8080u16, 18789, 0, 0, 0, 0, 0, 0];
        let load = |i: usize| ports[i];
        assert!(is_gateway_port(2, 18789, load));
        assert!(!is_gateway_port(1, 18789, load));
        assert!(!is_gateway_port(8, 0, load));
        assert!(
            !is_gateway_port(100, 9, load),
            "n above MAX_PORTS is bounded"
        );
        assert!(!is_gateway_port(0, 8080, load));
    }

    #[test]
    fn events_from_states() {
        assert_eq!(event_kind(3, TCP_ESTABLISHED), Some(EVENT_OPEN));
        assert_eq!(event_kind(9, TCP_CLOSE), Some(EVENT_CLOSE));
        assert_eq!(event_kind(TCP_LISTEN, TCP_CLOSE), None);
        assert_eq!(event_kind(1, 4), None);
    }

    fn record(family: u16) -> SockStateRecord {
        SockStateRecord {
            skaddr: 0,
            oldstate: 3,
            newstate: 1,
            sport: 8080,
            dport: 51000,
            family,
            protocol: 6,
            saddr: G,
            daddr: C,
            saddr_v6: [0; 16],
            daddr_v6: [0; 16],
        }
    }

    fn v4_key(local: [u8; 4], remote: [u8; 4]) -> FlowKey {
        FlowKey {
            local_addr: v4(local),
            remote_addr: v4(remote),
            local_port: 8080,
            remote_port: 51000,
            family: AF_INET,
            _pad: 0,
        }
    }

    #[test]
    fn ipv4_addresses_take_the_first_four_bytes() {
        assert_eq!(
            v4([10, 0, 0, 1]),
            [10, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
        );
    }

    #[test]
    fn socket_keys() {
        assert_eq!(socket_key(&record(AF_INET)), Some(v4_key(G, C)));

        // A dual-stack listener accepting IPv4: the socket is AF_INET6, its packets IPv4.
        let mut r = record(AF_INET6);
        r.saddr_v6 = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 0, 0, 1];
        r.daddr_v6 = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 0, 0, 2];
        assert_eq!(socket_key(&r), Some(v4_key(G, C)));

        let mut r = record(AF_INET6);
        r.saddr_v6 = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        r.daddr_v6 = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
        let k = socket_key(&r).expect("v6");
        assert_eq!(
            (
                k.family,
                k.local_addr,
                k.remote_addr,
                k.local_port,
                k.remote_port
            ),
            (AF_INET6, r.saddr_v6, r.daddr_v6, 8080, 51000)
        );
        assert_eq!(socket_key(&record(1)), None);
    }

    #[test]
    fn the_programs_and_the_tracepoint_key_a_socket_alike() {
        // What `hearth_ingress`/`hearth_egress` read from `struct bpf_sock` of the same socket.
        let mut r = record(AF_INET6);
        r.saddr_v6 = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 0, 0, 1];
        r.daddr_v6 = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 0, 0, 2];
        let from_sock = sock_key(&SockAddrs {
            family: AF_INET6,
            local4: G,
            remote4: C,
            local6: r.saddr_v6,
            remote6: r.daddr_v6,
            local_port: 8080,
            remote_port: 51000,
        });
        assert_eq!(from_sock, socket_key(&r));
        assert_eq!(from_sock, Some(v4_key(G, C)));
    }

    #[test]
    fn record_layout_matches_the_tracepoint_format() {
        // offsets in the format file minus the 8 bytes of common fields
        assert_eq!(core::mem::offset_of!(SockStateRecord, oldstate) + 8, 16);
        assert_eq!(core::mem::offset_of!(SockStateRecord, sport) + 8, 24);
        assert_eq!(core::mem::offset_of!(SockStateRecord, family) + 8, 28);
        assert_eq!(core::mem::offset_of!(SockStateRecord, saddr) + 8, 32);
        assert_eq!(core::mem::offset_of!(SockStateRecord, saddr_v6) + 8, 40);
        assert_eq!(core::mem::offset_of!(SockStateRecord, daddr_v6) + 8, 56);
        assert_eq!(core::mem::size_of::<SockStateRecord>() + 8, 72);
    }
}
