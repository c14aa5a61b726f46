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
    /// Received by the gateway (`cgroup_skb/ingress`): the packet's destination is the gateway.
    In,
    /// Sent by the gateway (`cgroup_skb/egress`): the packet's source is the gateway.
    Out,
}

/// The key of a packet with source `src:sport` and destination `dst:dport` (ports in host byte order,
/// addresses as in the packet; IPv4 ones in the first 4 bytes), from the gateway's side.
pub fn packet_key(
    family: u16,
    src: [u8; 16],
    dst: [u8; 16],
    sport: u16,
    dport: u16,
    dir: Direction,
) -> FlowKey {
    let (local_addr, local_port, remote_addr, remote_port) = match dir {
        Direction::Out => (src, sport, dst, dport),
        Direction::In => (dst, dport, src, sport),
    };
    FlowKey {
        local_addr,
        remote_addr,
        local_port,
        remote_port,
        family,
        _pad: 0,
    }
}

/// An IPv4 address in the 16-byte form of [`FlowKey`] (first 4 bytes, the rest zero). Built from an
/// integer rather than by filling a zeroed array, which LLVM turns into a `memset` call that BPF can
/// only do as a (needless) BPF-to-BPF call.
#[inline(always)]
pub fn v4(a: [u8; 4]) -> [u8; 16] {
    u128::from(u32::from_le_bytes(a)).to_le_bytes()
}

/// Header length in bytes of an IPv4 header whose first byte is `b0` (version 4, IHL >= 5).
pub fn ipv4_header_len(b0: u8) -> Option<usize> {
    if b0 >> 4 != 4 {
        return None;
    }
    let ihl = usize::from(b0 & 0x0f) * 4;
    (ihl >= 20).then_some(ihl)
}

/// What the first 20 bytes of a packet (an IPv4 header, or the start of an IPv6 one) say.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum IpHeader {
    /// IPv4 carrying TCP: addresses in the 16-byte key form, and where the TCP header starts.
    V4Tcp {
        src: [u8; 16],
        dst: [u8; 16],
        l4: usize,
    },
    /// IPv6 with TCP right after the fixed header: the addresses are at 8..40, TCP at 40.
    V6Tcp,
    /// Not TCP, not IP, or IPv6 with extension headers: not counted.
    Other,
}

/// The TCP header of an IPv6 packet without extension headers starts here.
pub const IPV6_L4: usize = 40;

/// Reads the first 20 bytes of an IP packet.
#[inline(always)]
pub fn ip_header(h: &[u8; 20]) -> IpHeader {
    match h[0] >> 4 {
        4 => match ipv4_header_len(h[0]) {
            Some(l4) if h[9] == IPPROTO_TCP => IpHeader::V4Tcp {
                src: v4([h[12], h[13], h[14], h[15]]),
                dst: v4([h[16], h[17], h[18], h[19]]),
                l4,
            },
            _ => IpHeader::Other,
        },
        6 if h[6] == IPPROTO_TCP => IpHeader::V6Tcp,
        _ => IpHeader::Other,
    }
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

/// The key of the socket of `r`: local = the socket's own address and port. An AF_INET6 socket whose
/// peer is an IPv4-mapped address (`::ffff:a.b.c.d`, a dual-stack listener accepting IPv4) sends and
/// receives IPv4 packets, so its key is the AF_INET one, the same as the `cgroup_skb` programs build.
pub fn socket_key(r: &SockStateRecord) -> Option<FlowKey> {
    let (family, local_addr, remote_addr) = match r.family {
        AF_INET => (AF_INET, v4(r.saddr), v4(r.daddr)),
        AF_INET6 if is_v4_mapped(&r.daddr_v6) => (AF_INET, v4(r.saddr), v4(r.daddr)),
        AF_INET6 => (AF_INET6, r.saddr_v6, r.daddr_v6),
        _ => return None,
    };
    Some(FlowKey {
        local_addr,
        remote_addr,
        local_port: r.sport,
        remote_port: r.dport,
        family,
        _pad: 0,
    })
}

/// `::ffff:0:0/96`.
pub fn is_v4_mapped(a: &[u8; 16]) -> bool {
    a[..10].iter().all(|&b| b == 0) && a[10] == 0xff && a[11] == 0xff
}

#[cfg(test)]
mod tests {
    use super::*;

    const C: [u8; 4] = [10, 0, 0, 2];
    const G: [u8; 4] = [10, 0, 0, 1];

    #[test]
    fn both_directions_of_a_flow_give_the_same_key() {
        let out = packet_key(AF_INET, v4(G), v4(C), 8080, 51000, Direction::Out);
        let inn = packet_key(AF_INET, v4(C), v4(G), 51000, 8080, Direction::In);
        assert_eq!(out, inn);
        assert_eq!(out.local_port, 8080);
        assert_eq!(out.remote_port, 51000);
        assert_eq!(&out.local_addr[..4], &G);
        assert!(out.local_addr[4..].iter().all(|&b| b == 0));
        assert_eq!(out.family, AF_INET);
    }

    #[test]
    fn ip_headers() {
        let mut v4h = [0u8; 20];
        v4h[0] = 0x46; // IPv4, 24-byte header (one option word)
        v4h[9] = IPPROTO_TCP;
        v4h[12..16].copy_from_slice(&[10, 0, 0, 1]);
        v4h[16..20].copy_from_slice(&[127, 0, 0, 1]);
        assert_eq!(
            ip_header(&v4h),
            IpHeader::V4Tcp {
                src: v4([10, 0, 0, 1]),
                dst: v4([127, 0, 0, 1]),
                l4: 24
            }
        );
        v4h[9] = 17; // UDP
        assert_eq!(ip_header(&v4h), IpHeader::Other);
        let mut v6h = [0u8; 20];
        v6h[0] = 0x60;
        v6h[6] = IPPROTO_TCP;
        assert_eq!(ip_header(&v6h), IpHeader::V6Tcp);
        v6h[6] = 0; // hop-by-hop options first
        assert_eq!(ip_header(&v6h), IpHeader::Other);
        assert_eq!(ip_header(&[0u8; 20]), IpHeader::Other);
    }

    #[test]
    fn ipv4_header_length() {
        assert_eq!(ipv4_header_len(0x45), Some(20));
        assert_eq!(ipv4_header_len(0x4f), Some(60));
        assert_eq!(ipv4_header_len(0x44), None);
        assert_eq!(ipv4_header_len(0x65), None);
    }

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

    #[test]
    fn socket_keys_match_packet_keys() {
        let pk = packet_key(AF_INET, v4(C), v4(G), 51000, 8080, Direction::In);
        assert_eq!(socket_key(&record(AF_INET)), Some(pk));

        // A dual-stack listener accepting IPv4: the socket is AF_INET6, the packets are IPv4.
        let mut r = record(AF_INET6);
        r.saddr_v6 = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 0, 0, 1];
        r.daddr_v6 = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 0, 0, 2];
        assert_eq!(socket_key(&r), Some(pk));

        let mut r = record(AF_INET6);
        r.saddr_v6 = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        r.daddr_v6 = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
        let k = socket_key(&r).expect("v6");
        let pk6 = packet_key(AF_INET6, r.daddr_v6, r.saddr_v6, 51000, 8080, Direction::In);
        assert_eq!(k, pk6);
        assert_eq!(socket_key(&record(1)), None);
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
