//! The sensor benchmark's results section of docs/benchmarks.md (also printed).

use std::fmt::Write as _;
use std::time::Duration;

use super::kernel::PROGRAMS;
use super::{Agg, Results, ScenarioKind, ScenarioResult};
use crate::bench::stats::{mean_ci, median, summarize};

/// Throughput or request rate lost with the programs attached, at most (percent).
pub const TARGET_LOSS_PCT: f64 = 1.0;
/// Run time of a cgroup_skb program per packet, at most (ns).
const TARGET_NS_PER_PACKET: f64 = 300.0;
/// Above this many CPUs kept busy by other processes on average, the run is called noisy.
const NOISY_CPUS: f64 = 0.1;

fn rate(sc: &ScenarioResult, a: &Agg) -> f64 {
    sc.scenario.units(a.amount) / a.elapsed.as_secs_f64().max(1e-9)
}

/// Percent change from off to on (negative: slower with the programs).
fn change(off: f64, on: f64) -> f64 {
    if off > 0.0 {
        (on / off - 1.0) * 100.0
    } else {
        0.0
    }
}

/// The on/off change of each round (phases were run in pairs).
fn round_changes(sc: &ScenarioResult) -> Vec<f64> {
    sc.off
        .phase_rates
        .iter()
        .zip(&sc.on.phase_rates)
        .map(|(off, on)| change(*off, *on))
        .collect()
}

fn pct(v: f64) -> String {
    format!("{v:+.2} %")
}

fn latency_us(a: &Agg) -> (f64, f64) {
    let s = summarize(
        a.latencies_ns
            .iter()
            .map(|&n| Duration::from_nanos(u64::from(n))),
    );
    (s.p50 * 1e3, s.p99 * 1e3)
}

fn rate_unit(sc: &ScenarioResult) -> &'static str {
    match sc.scenario.kind {
        ScenarioKind::Bulk => "MB/s",
        ScenarioKind::Rr => "req/s",
        ScenarioKind::Connect => "conn/s",
    }
}

/// CPU time of the bench's own processes per unit (bulk: per MB; else per request or connection), µs.
fn cpu_per_unit_us(sc: &ScenarioResult, a: &Agg) -> f64 {
    let units = sc.scenario.units(a.amount);
    if units > 0.0 {
        a.own_cpu_s * 1e6 / units
    } else {
        0.0
    }
}

/// The on/off change of the CPU per unit in each round (percent).
fn round_cpu_changes(sc: &ScenarioResult) -> Vec<f64> {
    sc.off
        .phase_cpu_per_unit
        .iter()
        .zip(&sc.on.phase_cpu_per_unit)
        .map(|(off, on)| change(*off, *on))
        .collect()
}

fn min_max(v: &[f64]) -> (f64, f64) {
    (
        v.iter().copied().fold(f64::INFINITY, f64::min),
        v.iter().copied().fold(f64::NEG_INFINITY, f64::max),
    )
}

/// CPUs other processes kept busy on average during the phases.
fn foreign_cpus(a: &Agg) -> f64 {
    a.foreign_cpu_s / a.elapsed.as_secs_f64().max(1e-9)
}

/// CPUs the hypervisor held back on average during the phases (part of `foreign_cpus`).
fn steal_cpus(a: &Agg) -> f64 {
    a.steal_s / a.elapsed.as_secs_f64().max(1e-9)
}

fn range(v: &[f64]) -> String {
    if v.is_empty() {
        return "-".to_string();
    }
    let (min, max) = min_max(v);
    format!("{min:+.2} .. {max:+.2} %")
}

/// The worst (highest) ns per run of program `i` over the scenarios, with the scenario's label.
/// The highest ns per run of program `i` over the scenarios (bulk and request/response: the
/// packets of established flows). The connect scenario, where one packet in five inserts its flow, is
/// reported next to the target, not judged by it.
fn worst_ns(r: &Results, i: usize) -> Option<(f64, String)> {
    r.scenarios
        .iter()
        .filter(|s| s.scenario.kind != ScenarioKind::Connect && s.on.progs[i].runs > 0)
        .map(|s| (s.on.progs[i].ns_per_run(), s.scenario.label()))
        .max_by(|a, b| a.0.total_cmp(&b.0))
}

/// The throughput target's verdict on a loss's 95 % interval (per cent).
pub fn loss_verdict(lo: f64, hi: f64) -> &'static str {
    if hi < TARGET_LOSS_PCT {
        "pass"
    } else if lo > TARGET_LOSS_PCT {
        "FAIL"
    } else {
        "inconclusive (CI spans the target)"
    }
}

fn verdict(pass: bool) -> &'static str {
    if pass {
        "pass"
    } else {
        "FAIL"
    }
}

pub fn markdown(r: &Results) -> String {
    let a = &r.args;
    let stats = !a.no_bpf_stats;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "### Results: gateway sensor overhead{}\n",
        if a.control {
            " (control: the cgroup_skb programs only return 1)"
        } else {
            ""
        }
    );
    let _ = writeln!(
        o,
        "Produced by `{}` on {} (whole run {:.0} s).\n",
        r.command.trim_end(),
        r.machine.date_utc,
        r.wall.as_secs_f64()
    );
    let _ = writeln!(o, "| | |\n|---|---|");
    let _ = writeln!(o, "| machine | {} |", r.machine.summary());
    let busy = r
        .background_busy
        .map(|b| format!("{:.0} %", b * 100.0))
        .unwrap_or_else(|| "unknown".into());
    let _ = writeln!(
        o,
        "| noise | usable CPUs busy {busy} in the second before the bench started; load average {} at start, {} at end |",
        r.load_start, r.load_end
    );
    let _ = writeln!(
        o,
        "| hearth | git {}; eBPF object `{}` ({} bytes, sha256 {}…) |",
        r.machine.git,
        r.object.display(),
        r.object_bytes,
        r.object_sha256
    );
    let _ = writeln!(o, "| programs | {} |", r.program_sizes.join("; "));
    let _ = writeln!(o, "| rustc | {} |", r.machine.rustc);
    let _ = writeln!(
        o,
        "| setup | server in `{}` on 127.0.0.1:{} (the only gateway port); client outside the cgroup; loopback |",
        r.cgroup.display(),
        r.port
    );
    let _ = writeln!(
        o,
        "| \"on\" | `hearth_ingress` + `hearth_egress` on the cgroup (single mode), `hearth_sock_state` on `sock/inet_sock_set_state`{}{} |",
        if a.no_reader {
            ", no reader (--no-reader)"
        } else {
            ", a reader like hearth's poller (FLOWS every 1 s, EVENTS drained on wake-up)"
        },
        if stats {
            format!(
                ", `kernel.bpf_stats_enabled` = 1 (it was {}; restored after every attached phase)",
                r.stats_sysctl_before
            )
        } else {
            ", without BPF stats (--no-bpf-stats)".to_string()
        }
    );
    let _ = writeln!(
        o,
        "| phases | {} rounds x (off, on) x {} s per scenario, ABBA order, {} s warm-up per configuration |",
        a.rounds,
        a.phase_secs,
        (a.phase_secs / 4.0).min(0.5)
    );
    let _ = writeln!(
        o,
        "| traffic | bulk: one connection, client → server, {} KiB writes; request/response: {} B request, {} B response, TCP_NODELAY; connect: a new connection per request/response, closed by the server |",
        a.bulk_write_kib, a.request_bytes, a.response_bytes
    );

    // Targets.
    let _ = writeln!(o, "\n#### Targets\n");
    let _ = writeln!(o, "| target | measured | verdict |\n|---|---|---|");
    for sc in &r.scenarios {
        if sc.scenario.kind == ScenarioKind::Connect {
            continue; // not in the targets; shown below
        }
        let what = match sc.scenario.kind {
            ScenarioKind::Bulk => "bulk throughput loss".to_string(),
            _ => format!("request rate loss ({} conn.)", sc.scenario.conns),
        };
        let losses: Vec<f64> = round_changes(sc).iter().map(|c| -c).collect();
        let (measured, verdict) = match mean_ci(&losses) {
            Some((mean, lo, hi)) => (
                format!(
                    "{mean:.2} % (95 % CI {lo:.2} .. {hi:.2} %, mean of {} rounds)",
                    losses.len()
                ),
                loss_verdict(lo, hi),
            ),
            None => (
                format!(
                    "{:.2} % (one round: no CI)",
                    losses.first().copied().unwrap_or(0.0)
                ),
                "inconclusive (one round)",
            ),
        };
        let _ = writeln!(
            o,
            "| {what} < {TARGET_LOSS_PCT} % | {measured} | {verdict} |"
        );
    }
    for (i, name) in PROGRAMS.iter().enumerate().take(2) {
        match worst_ns(r, i) {
            Some((ns, label)) if stats => {
                let _ = writeln!(
                    o,
                    "| `{name}` < {TARGET_NS_PER_PACKET:.0} ns per packet | {ns:.0} ns per run (worst scenario: {label}) | {} |",
                    verdict(ns < TARGET_NS_PER_PACKET)
                );
            }
            _ => {
                let _ = writeln!(
                    o,
                    "| `{name}` < {TARGET_NS_PER_PACKET:.0} ns per packet | not measured{} | - |",
                    if stats { "" } else { " (--no-bpf-stats)" }
                );
            }
        }
    }
    if stats {
        for sc in r
            .scenarios
            .iter()
            .filter(|s| s.scenario.kind == ScenarioKind::Connect)
        {
            let ns: Vec<String> = PROGRAMS
                .iter()
                .enumerate()
                .take(2)
                .filter(|(i, _)| sc.on.progs[*i].runs > 0)
                .map(|(i, name)| format!("`{name}` {:.0} ns", sc.on.progs[i].ns_per_run()))
                .collect();
            if !ns.is_empty() {
                let _ = writeln!(
                    o,
                    "| (not a target) per run with a new connection per request | {} per run, averaged over each connection's packets; the first creates the flow (`FLOW_INFO` and `FLOWS` inserts) | - |",
                    ns.join(", ")
                );
            }
        }
    }

    // Rates.
    let _ = writeln!(
        o,
        "\n#### Throughput and rates (off = programs loaded, not attached; on = attached)\n"
    );
    let _ = writeln!(
        o,
        "| scenario | off | on | change | per-round change | per-phase off / on | p50 µs off / on | p99 µs off / on | CPU µs per unit off / on | other processes (CPUs) off / on | of which steal off / on |"
    );
    let _ = writeln!(o, "|---|--:|--:|--:|--:|---|--:|--:|--:|--:|--:|");
    for sc in &r.scenarios {
        let (off, on) = (rate(sc, &sc.off), rate(sc, &sc.on));
        let phases = |a: &Agg| {
            a.phase_rates
                .iter()
                .map(|v| format!("{v:.0}"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        let (lat50, lat99) = if sc.scenario.kind == ScenarioKind::Bulk {
            ("-".to_string(), "-".to_string())
        } else {
            let (o50, o99) = latency_us(&sc.off);
            let (n50, n99) = latency_us(&sc.on);
            (
                format!("{o50:.1} / {n50:.1}"),
                format!("{o99:.1} / {n99:.1}"),
            )
        };
        let _ = writeln!(
            o,
            "| {} ({}) | {off:.1} | {on:.1} | {} | {} | {} / {} | {lat50} | {lat99} | {:.2} / {:.2} | {:.2} / {:.2} | {:.2} / {:.2} |",
            sc.scenario.label(),
            rate_unit(sc),
            pct(change(off, on)),
            range(&round_changes(sc)),
            phases(&sc.off),
            phases(&sc.on),
            cpu_per_unit_us(sc, &sc.off),
            cpu_per_unit_us(sc, &sc.on),
            foreign_cpus(&sc.off),
            foreign_cpus(&sc.on),
            steal_cpus(&sc.off),
            steal_cpus(&sc.on),
        );
    }
    let _ = writeln!(
        o,
        "\nCPU per unit: CPU time of the bench's two processes (client and server, every thread, with the \
         kernel work done in their context: on loopback nearly all of the network stack, the programs \
         included) over the phases, divided by what they moved (per MB for bulk, else per request or \
         connection). Other processes: busy time of the usable CPUs (/proc/stat) minus that, per second \
         (noise; softirq work the kernel hands to ksoftirqd lands here too); steal: time the hypervisor \
         ran something else while this VM wanted the CPU, counted as busy by /proc/stat."
    );

    // CPU cost: less sensitive to the machine's speed changing under the bench than the rates.
    let _ = writeln!(
        o,
        "\n#### CPU cost per unit (the bench's own processes)\n\nWhere the rate is limited by CPU, a rate loss \
         shows up here as a cost increase; this measure does not move when the hypervisor slows the VM down.\n"
    );
    let _ = writeln!(
        o,
        "| scenario | off µs | on µs | change | change, mean of rounds (95 % CI) |\n|---|--:|--:|--:|---|"
    );
    for sc in &r.scenarios {
        let (off, on) = (cpu_per_unit_us(sc, &sc.off), cpu_per_unit_us(sc, &sc.on));
        let ci = match mean_ci(&round_cpu_changes(sc)) {
            Some((m, lo, hi)) => format!("{m:+.2} % ({lo:+.2} .. {hi:+.2} %)"),
            None => "-".to_string(),
        };
        let _ = writeln!(
            o,
            "| {} (per {}) | {off:.2} | {on:.2} | {} | {ci} |",
            sc.scenario.label(),
            sc.scenario.unit(),
            pct(change(off, on))
        );
    }

    // Programs.
    if stats {
        let _ = writeln!(
            o,
            "\n#### The programs' own run time (BPF stats, attached phases)\n"
        );
        let _ = writeln!(
            o,
            "| scenario | program | runs | runs per unit | ns per run | programs' ns per unit (sum) | share of the CPU per unit |"
        );
        let _ = writeln!(o, "|---|---|--:|--:|--:|--:|--:|");
        for sc in &r.scenarios {
            let units = sc.scenario.units(sc.on.amount);
            let total_ns: u64 = sc.on.progs.iter().map(|p| p.run_ns).sum();
            let per_unit_ns = if units > 0.0 {
                total_ns as f64 / units
            } else {
                0.0
            };
            let cpu_ns = cpu_per_unit_us(sc, &sc.on) * 1e3;
            for (i, name) in PROGRAMS.iter().enumerate() {
                let p = &sc.on.progs[i];
                let per_unit = if units > 0.0 {
                    p.runs as f64 / units
                } else {
                    0.0
                };
                let (sum, share) = if i == 0 {
                    (
                        format!("{per_unit_ns:.0}"),
                        if cpu_ns > 0.0 {
                            format!("{:.2} %", per_unit_ns / cpu_ns * 100.0)
                        } else {
                            "-".to_string()
                        },
                    )
                } else {
                    (String::new(), String::new())
                };
                let _ = writeln!(
                    o,
                    "| {} | `{name}` | {} | {per_unit:.2} per {} | {:.0} | {sum} | {share} |",
                    if i == 0 {
                        sc.scenario.label()
                    } else {
                        String::new()
                    },
                    p.runs,
                    sc.scenario.unit(),
                    p.ns_per_run()
                );
            }
        }
        let bulk_note = r
            .scenarios
            .iter()
            .find(|s| s.scenario.kind == ScenarioKind::Bulk)
            .filter(|s| s.on.progs[0].runs > 0)
            .map(|s| {
                format!(
                    " In the bulk scenario one ingress run carries {:.1} KB of payload on average.",
                    s.on.amount as f64 / s.on.progs[0].runs as f64 / 1e3
                )
            })
            .unwrap_or_default();
        let _ = writeln!(
            o,
            "\nA run of `hearth_ingress`/`hearth_egress` is one socket buffer of the server's sockets as the \
             cgroup hook sees it: on loopback (segmentation offload, 64 KiB MTU) a buffer carries up to about \
             64 KiB, so these are far fewer, larger \"packets\" than on a wire; egress runs in the bulk \
             scenario are mostly the server's ACKs.{bulk_note} `hearth_sock_state` runs on every TCP state change \
             of the host (both ends of every connection), not per packet. The run time is the kernel's \
             accounting (`run_time_ns`/`run_cnt`); it excludes the cgroup hook's own dispatch, which the \
             off/on comparison includes."
        );
    }

    // Reader.
    if !a.no_reader {
        let _ = writeln!(o, "\n#### The reader (user space, attached phases)\n");
        let _ = writeln!(
            o,
            "| scenario | CPU per second | of which reading FLOWS | EVENTS records drained | wake-ups by the ring | events lost | FLOWS readings | FLOWS entries at the last reading / left after deleting closed flows |"
        );
        let _ = writeln!(o, "|---|--:|--:|--:|--:|--:|--:|--:|");
        for sc in &r.scenarios {
            let t = &sc.on.reader;
            let per_second = |d: Duration| {
                if t.wall > Duration::ZERO {
                    format!("{:.2} ms", d.as_secs_f64() * 1e3 / t.wall.as_secs_f64())
                } else {
                    "-".to_string()
                }
            };
            let _ = writeln!(
                o,
                "| {} | {} | {} | {} | {} | {} | {} | {} / {} |",
                sc.scenario.label(),
                per_second(t.cpu),
                per_second(t.flows_cpu),
                t.events,
                t.wakeups,
                t.lost,
                t.flow_reads,
                t.flow_entries,
                t.flow_entries_left
            );
        }
        let _ = writeln!(
            o,
            "\nThe reader waits on the ring buffer as hearth's poller does (epoll, edge-triggered): the \
             tracepoint wakes it only while a quarter of the ring or more waits to be read; else it \
             drains the ring at its once-a-second reading. Events lost: `EVENTS_LOST`, what the full \
             ring could not take."
        );
    }

    let mut notes = r.notes.clone();
    let worst_foreign = r
        .scenarios
        .iter()
        .flat_map(|sc| {
            [(sc, "off", &sc.off), (sc, "on", &sc.on)]
                .into_iter()
                .map(|(sc, name, a)| (foreign_cpus(a), format!("{} {name}", sc.scenario.label())))
        })
        .max_by(|a, b| a.0.total_cmp(&b.0));
    if let Some((cpus, what)) = worst_foreign.filter(|(c, _)| *c > NOISY_CPUS) {
        notes.insert(
            0,
            format!(
                "NOISY RUN: other processes kept up to {cpus:.2} CPUs busy during the measured phases (worst: \
                 {what}); these results are only indicative"
            ),
        );
    }
    for sc in &r.scenarios {
        let losses: Vec<f64> = round_changes(sc).iter().map(|c| -c).collect();
        if let (Some(m), Some((_, lo, hi))) = (median(&losses), mean_ci(&losses)) {
            if lo <= TARGET_LOSS_PCT && hi >= TARGET_LOSS_PCT {
                notes.push(format!(
                    "{}: the loss's 95 % CI ({lo:.2} .. {hi:.2} %, median of the rounds {m:.2} %) spans the \
                     {TARGET_LOSS_PCT} % target: the rates vary more from phase to phase than the effect; \
                     more --rounds narrow it",
                    sc.scenario.label()
                ));
            }
        }
    }
    if !notes.is_empty() {
        let _ = writeln!(o, "\n#### Observations\n");
        for n in notes {
            let _ = writeln!(o, "- {}", n.replace('\n', " / "));
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn change_is_relative_to_off() {
        assert!((change(100.0, 99.0) + 1.0).abs() < 1e-9);
        assert!((change(200.0, 210.0) - 5.0).abs() < 1e-9);
        assert_eq!(change(0.0, 5.0), 0.0);
        assert_eq!(range(&[]), "-");
        assert_eq!(range(&[-1.0, 0.5, 2.0]), "-1.00 .. +2.00 %");
    }

    #[test]
    fn confidence_interval_of_the_mean() {
        assert!(mean_ci(&[1.0]).is_none());
        let (m, lo, hi) = mean_ci(&[1.0, 2.0, 3.0, 4.0]).unwrap();
        assert!((m - 2.5).abs() < 1e-9);
        // sd = 1.291, se = 0.6455, t(3) = 3.182
        assert!((hi - m - 3.182 * 0.645_497).abs() < 1e-3);
        assert!((m - lo - (hi - m)).abs() < 1e-9);
    }
}
