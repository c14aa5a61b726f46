//! hearth's kernel programs, built for `bpfel-unknown-none` by `cargo xtask build-ebpf` into
//! `target/ebpf/hearth-ebpf.o`, which the agent embeds and loads with aya (`hearth_common::names` has
//! the names of everything below).
//!
//! - `hearth_ingress` / `hearth_egress` (`cgroup_skb`, attached to the gateway's cgroup): count every
//!   packet of the cgroup's connected TCP sockets in `FLOWS` (per-CPU counters keyed by the socket's
//!   cookie); a socket's first packet records its addresses, from the gateway's side, in `FLOW_INFO`.
//!   They never drop a packet (always return 1).
//! - `hearth_sock_state` (tracepoint `sock/inet_sock_set_state`): a `FlowEvent` into `EVENTS` when a
//!   connection whose local port is one of `GATEWAY_PORTS` (one the gateway accepted) reaches
//!   ESTABLISHED or CLOSE.
//!
//! On the host this crate is only a stub binary plus the unit tests of `flow` (so that `cargo build`,
//! `cargo clippy --workspace` and `cargo test --workspace` work without the BPF toolchain).
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
// The BPF target has no compare-and-swap, so core's Atomic* types offer no fetch_add there; the
// atomic intrinsics compile to BPF's atomic add (what aya's maintainers recommend). The eBPF build
// runs with RUSTC_BOOTSTRAP=1 (xtask/src/ebpf.rs).
#![cfg_attr(target_arch = "bpf", feature(core_intrinsics))]
#![cfg_attr(target_arch = "bpf", allow(internal_features))]
// The benchmark's control build (feature `control`, `cargo xtask build-ebpf --control`) leaves the
// packet path out of `hearth_ingress`/`hearth_egress`.
#![cfg_attr(feature = "control", allow(dead_code, unused_imports))]

#[cfg(any(target_arch = "bpf", test))]
#[cfg_attr(not(target_arch = "bpf"), allow(dead_code))] // on the host only the tests use it
mod flow;

#[cfg(target_arch = "bpf")]
mod programs;

#[cfg(not(target_arch = "bpf"))]
fn main() {}
