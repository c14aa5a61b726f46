//! Turning `Results` into the terminal table and the results section of docs/benchmarks.md.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};

use super::stats::{mean_ci, median, ms, signed_ms, summarize, Summary};
use super::{Agg, Results, Scenario};

pub const BEGIN: &str = "<!-- bench-results:begin -->";
pub const END: &str = "<!-- bench-results:end -->";

/// Used when the results file does not exist yet or has lost its markers.
const TEMPLATE_HEAD: &str =
    "# Benchmarks\n\n(Methodology: see `cargo xtask bench --help` and xtask/src/bench.rs.)\n\n";

const TARGET_P50_MS: f64 = 0.5;
const TARGET_P99_MS: f64 = 2.0;
const TARGET_THROUGHPUT: f64 = 95.0;
const TARGET_COLD_MS: f64 = 100.0;
const TARGET_RSS_MB: f64 = 30.0;

struct Verdict {
    target: String,
    measured: String,
    /// Whether the numbers meet the target (None: not measured).
    pass: Option<bool>,
    /// Requests through hearth failed in the scenarios the target is judged on.
    failures: bool,
    /// The 95 % confidence interval spans the target: neither pass nor FAIL.
    inconclusive: bool,
}

fn totals(a: &Agg) -> Summary {
    summarize(a.samples.iter().map(|s| s.total))
}

fn ttfts(a: &Agg) -> Summary {
    summarize(a.samples.iter().filter_map(|s| s.ttft))
}

fn mode(s: &Scenario) -> &'static str {
    if s.stream {
        "stream"
    } else {
        "non-stream"
    }
}

fn throughput_pct(s: &Scenario) -> Option<f64> {
    let h = s.hearth.as_ref()?;
    let d = s.direct.rps();
    (d > 0.0).then(|| 100.0 * h.rps() / d)
}

/// hearth's rate as a percentage of direct's in each round (the two phases of a round are adjacent
/// in time, so drift between rounds cancels): the mean over the rounds with its 95 % confidence
/// interval.
fn throughput_ci(s: &Scenario) -> Option<(f64, f64, f64)> {
    let h = s.hearth.as_ref()?;
    let per_round: Vec<f64> = s
        .direct
        .phase_rps
        .iter()
        .zip(&h.phase_rps)
        .filter(|(d, _)| **d > 0.0)
        .map(|(d, h)| 100.0 * h / d)
        .collect();
    mean_ci(&per_round)
}

pub struct Cold {
    pub s2r: Option<f64>,
    pub warm_ttft: Option<f64>,
    pub hearth_ttft: Option<f64>,
    pub last_load: Option<f64>,
    pub overhead: Option<f64>,
}

fn cold(r: &Results) -> Cold {
    let s2r: Vec<f64> = r
        .cold_direct
        .iter()
        .map(|c| c.spawn_to_ready.as_secs_f64() * 1e3)
        .collect();
    let warm: Vec<f64> = r
        .cold_direct
        .iter()
        .map(|c| c.ttft.as_secs_f64() * 1e3)
        .collect();
    let hearth: Vec<f64> = r
        .cold_hearth
        .iter()
        .map(|c| c.ttft.as_secs_f64() * 1e3)
        .collect();
    let loads: Vec<f64> = r
        .cold_hearth
        .iter()
        .filter_map(|c| c.last_load_seconds)
        .map(|s| s * 1e3)
        .collect();
    let (s2r, warm_ttft, hearth_ttft) = (median(&s2r), median(&warm), median(&hearth));
    let overhead = match (s2r, warm_ttft, hearth_ttft) {
        (Some(a), Some(b), Some(h)) => Some(h - (a + b)),
        _ => None,
    };
    Cold {
        s2r,
        warm_ttft,
        hearth_ttft,
        last_load: median(&loads),
        overhead,
    }
}

fn mb(kib: u64) -> f64 {
    kib as f64 * 1024.0 / 1e6
}

fn verdicts(r: &Results) -> Vec<Verdict> {
    let mut out = Vec::new();
    let lowest = r.scenarios.iter().map(|s| s.concurrency).min();
    let highest = r.scenarios.iter().map(|s| s.concurrency).max();
    let at = |c: Option<usize>| -> Vec<&Scenario> {
        r.scenarios
            .iter()
            .filter(|s| Some(s.concurrency) == c && s.hearth.is_some())
            .collect()
    };
    let latency = |pick: fn(&Summary) -> f64, limit: f64, name: &str| -> Verdict {
        let mut parts = Vec::new();
        let mut pass = None;
        let mut failures = false;
        for s in at(lowest) {
            if let Some(h) = &s.hearth {
                let d = pick(&totals(h)) - pick(&totals(&s.direct));
                let failed = if h.errors.count > 0 {
                    format!(" ({} hearth requests failed)", h.errors.count)
                } else {
                    String::new()
                };
                parts.push(format!("{} {} ms{failed}", mode(s), signed_ms(d)));
                pass = Some(pass.unwrap_or(true) && d < limit);
                failures |= h.errors.count > 0;
            }
        }
        Verdict {
            target: format!(
                "{name} added latency < {limit} ms (concurrency {})",
                lowest.unwrap_or(1)
            ),
            measured: if parts.is_empty() {
                "not measured".into()
            } else {
                parts.join(", ")
            },
            pass,
            failures,
            inconclusive: false,
        }
    };
    out.push(latency(|s| s.p50, TARGET_P50_MS, "p50"));
    out.push(latency(|s| s.p99, TARGET_P99_MS, "p99"));

    let mut parts = Vec::new();
    let mut pass = None;
    let mut failures = false;
    let mut inconclusive = false;
    for s in at(highest) {
        if let Some(pct) = throughput_pct(s) {
            let failed = match &s.hearth {
                Some(h) if h.errors.count > 0 => {
                    format!(" ({} hearth requests failed)", h.errors.count)
                }
                _ => String::new(),
            };
            // Judged on the per-round ratios' confidence interval where there are rounds enough,
            // else on the merged rates.
            let (ci, ok) = match throughput_ci(s) {
                Some((m, lo, hi)) => {
                    inconclusive |= lo < TARGET_THROUGHPUT && hi >= TARGET_THROUGHPUT;
                    (
                        format!(" (per round {m:.1} %, 95 % CI {lo:.1} .. {hi:.1} %)"),
                        lo >= TARGET_THROUGHPUT,
                    )
                }
                None => (String::new(), pct >= TARGET_THROUGHPUT),
            };
            parts.push(format!("{} {pct:.1} %{ci}{failed}", mode(s)));
            pass = Some(pass.unwrap_or(true) && ok);
            failures |= s.hearth.as_ref().is_some_and(|h| h.errors.count > 0);
        }
    }
    // One scenario clearly below the target fails the target whatever the others' intervals.
    let clearly_below = at(highest)
        .iter()
        .any(|s| throughput_ci(s).is_some_and(|(_, _, hi)| hi < TARGET_THROUGHPUT));
    inconclusive &= !clearly_below;
    out.push(Verdict {
        target: format!(
            "throughput >= {TARGET_THROUGHPUT} % of direct (concurrency {})",
            highest.unwrap_or(0)
        ),
        measured: if parts.is_empty() {
            "not measured".into()
        } else {
            parts.join(", ")
        },
        pass,
        failures,
        inconclusive,
    });

    let c = cold(r);
    out.push(Verdict {
        target: format!("cold-start overhead < {TARGET_COLD_MS} ms (medians)"),
        measured: match c.overhead {
            Some(o) => format!("{} ms", signed_ms(o)),
            None => "not measured".into(),
        },
        pass: c.overhead.map(|o| o < TARGET_COLD_MS),
        failures: r.cold_hearth.len() < r.args.cold_runs as usize,
        inconclusive: false,
    });

    let rss: Vec<u64> = [r.rss_start, r.rss_after, r.rss_after_unload]
        .iter()
        .flatten()
        .map(|(rss, _)| *rss)
        .collect();
    let worst = rss.iter().copied().max();
    out.push(Verdict {
        target: format!("idle RSS of hearth < {TARGET_RSS_MB} MB"),
        measured: match worst {
            Some(k) => format!("{:.1} MB (largest idle reading)", mb(k)),
            None => "not measured".into(),
        },
        pass: worst.map(|k| mb(k) < TARGET_RSS_MB),
        failures: false,
        inconclusive: false,
    });
    out
}

/// Other processes' load above which a run is flagged as noisy.
const NOISY_CPUS: f64 = 0.1;

fn all_aggs(r: &Results) -> impl Iterator<Item = &Agg> {
    r.scenarios
        .iter()
        .flat_map(|s| std::iter::once(&s.direct).chain(s.hearth.as_ref()))
}

fn foreign_avg(r: &Results) -> f64 {
    let (cpu, secs) = all_aggs(r).fold((0.0, 0.0), |(c, t), a| {
        (c + a.foreign_cpu_s, t + a.elapsed.as_secs_f64())
    });
    if secs > 0.0 {
        cpu / secs
    } else {
        0.0
    }
}

fn foreign_max(r: &Results) -> f64 {
    all_aggs(r).map(Agg::foreign_cpus).fold(0.0, f64::max)
}

fn ms2(v: f64) -> String {
    format!("{v:.2}")
}

fn noisy_tag(r: &Results) -> &'static str {
    if foreign_max(r) > NOISY_CPUS {
        ", noisy run"
    } else {
        ""
    }
}

/// A target passes only if its numbers meet it and no request it is judged on failed.
fn verdict_word(v: &Verdict) -> &'static str {
    if v.inconclusive && !v.failures {
        return "inconclusive (CI spans the target)";
    }
    match (v.pass, v.failures) {
        (Some(true), false) => "pass",
        (Some(true), true) => "FAIL (numbers met, but requests failed)",
        (Some(false), false) => "FAIL",
        (Some(false), true) => "FAIL (and requests failed)",
        (None, _) => "n/a",
    }
}

fn path_rows(s: &Scenario) -> Vec<(&'static str, &Agg)> {
    let mut v = vec![("direct", &s.direct)];
    if let Some(h) = &s.hearth {
        v.push(("hearth", h));
    }
    v
}

fn opt_ms(v: Option<f64>) -> String {
    v.map(ms).unwrap_or_else(|| "-".into())
}

/// Plain-text summary for the terminal.
pub fn text(r: &Results) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "\nhearth bench, {} on {} CPUs ({}), kernel {}; background CPU busy {}; other processes {} CPUs on average during the phases (worst {}); load {} -> {}",
        r.machine.date_utc,
        r.machine.nproc,
        r.machine.cpu_model,
        r.machine.kernel,
        r.background_busy
            .map(|b| format!("{:.0} %", b * 100.0))
            .unwrap_or_else(|| "?".into()),
        ms2(foreign_avg(r)),
        ms2(foreign_max(r)),
        r.load_start,
        r.load_end
    );
    let _ = writeln!(
        o,
        "{:<10} {:>4} {:<6} {:>7} {:>5} {:>9} {:>8} {:>8} {:>8} {:>8} {:>9} {:>5} {:>6} {:>8} {:>8}",
        "mode",
        "conc",
        "path",
        "ok",
        "err",
        "req/s",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "max ms",
        "TTFT p50",
        "busy",
        "other",
        "server",
        "client"
    );
    for s in &r.scenarios {
        for (name, a) in path_rows(s) {
            let t = totals(a);
            let f = ttfts(a);
            let _ = writeln!(
                o,
                "{:<10} {:>4} {:<6} {:>7} {:>5} {:>9.1} {:>8} {:>8} {:>8} {:>8} {:>9} {:>4.0}% {:>6.2} {:>5.0} us {:>5.0} us",
                mode(s),
                s.concurrency,
                name,
                t.n,
                a.errors.count,
                a.rps(),
                ms(t.p50),
                ms(t.p90),
                ms(t.p99),
                ms(t.max),
                if s.stream { ms(f.p50) } else { "-".into() },
                a.busy_share() * 100.0,
                a.foreign_cpus(),
                per_request_us(a.server_cpu_s, a),
                per_request_us(a.client_cpu_s, a)
            );
        }
        if let Some(h) = &s.hearth {
            let (dt, ht) = (totals(&s.direct), totals(h));
            let _ = writeln!(
                o,
                "{:<10} {:>4} {:<6} added p50 {} ms, p90 {} ms, p99 {} ms; throughput {:.1} % of direct; hearth CPU {:.0} us/request",
                mode(s),
                s.concurrency,
                "delta",
                signed_ms(ht.p50 - dt.p50),
                signed_ms(ht.p90 - dt.p90),
                signed_ms(ht.p99 - dt.p99),
                throughput_pct(s).unwrap_or(0.0),
                cpu_us_per_request(h)
            );
        }
    }
    let c = cold(r);
    let _ = writeln!(
        o,
        "cold start (medians of {} direct / {} hearth runs): spawn-to-ready {} ms, first token on fresh server {} ms, TTFT through hearth (cold) {} ms, hearth last_load_seconds {} ms -> overhead {} ms",
        r.cold_direct.len(),
        r.cold_hearth.len(),
        opt_ms(c.s2r),
        opt_ms(c.warm_ttft),
        opt_ms(c.hearth_ttft),
        opt_ms(c.last_load),
        c.overhead.map(signed_ms).unwrap_or_else(|| "-".into())
    );
    let rss = |v: Option<(u64, u64)>| {
        v.map(|(k, _)| format!("{:.1} MB", mb(k)))
            .unwrap_or_else(|| "-".into())
    };
    let _ = writeln!(
        o,
        "hearth RSS: after start {}, after bench (model loaded) {}, after unload {}; idle CPU {}; exit: {}",
        rss(r.rss_start),
        rss(r.rss_after),
        rss(r.rss_after_unload),
        idle_cpu(r),
        r.hearth_exit.as_deref().unwrap_or("-")
    );
    if let Some(c) = &r.runtime_cmd {
        let _ = writeln!(o, "runtime command (hearth's): {}", c.join(" "));
    }
    for v in verdicts(r) {
        let _ = writeln!(
            o,
            "[{}{}] {}: {}",
            verdict_word(&v),
            noisy_tag(r),
            v.target,
            v.measured
        );
    }
    for s in &r.scenarios {
        for (name, a) in path_rows(s) {
            if a.errors.count > 0 {
                let _ = writeln!(
                    o,
                    "errors {} c={} {name}: {} e.g. {:?}",
                    mode(s),
                    s.concurrency,
                    a.errors.count,
                    a.errors.examples
                );
            }
        }
    }
    for n in &r.notes {
        let _ = writeln!(o, "note: {n}");
    }
    o
}

fn idle_cpu(r: &Results) -> String {
    r.hearth_idle_cpu
        .map(|f| format!("{:.2} % of one CPU", f * 100.0))
        .unwrap_or_else(|| "-".into())
}

fn cpu_us_per_request(h: &Agg) -> f64 {
    per_request_us(h.hearth_cpu_s, h)
}

fn per_request_us(cpu_s: f64, a: &Agg) -> f64 {
    if a.samples.is_empty() {
        0.0
    } else {
        cpu_s * 1e6 / a.samples.len() as f64
    }
}

fn code(s: &str) -> String {
    format!("`{}`", s.replace('`', "'"))
}

/// The results section (between the markers) of docs/benchmarks.md.
pub fn markdown(r: &Results) -> String {
    let mut o = String::new();
    let m = &r.machine;
    let _ = writeln!(o, "## Results\n");
    let _ = writeln!(
        o,
        "Produced by {} on {} (whole run {:.0} s).\n",
        code(&r.command),
        m.date_utc,
        r.wall.as_secs_f64()
    );
    let busy = r
        .background_busy
        .map(|b| format!("{:.0} %", b * 100.0))
        .unwrap_or_else(|| "unknown".into());
    let _ = writeln!(o, "| | |\n|---|---|");
    let _ = writeln!(o, "| machine | {} |", m.summary());
    let _ = writeln!(
        o,
        "| noise | usable CPUs busy {busy} in the second before the bench started; other processes kept {} CPUs busy on average during the measured phases (worst path/scenario: {}); load average {} at start, {} at end |",
        ms2(foreign_avg(r)),
        ms2(foreign_max(r)),
        r.load_start,
        r.load_end
    );
    let _ = writeln!(
        o,
        "| hearth | {} (git {}), `RUST_LOG={}` |",
        r.hearth_version.as_deref().unwrap_or("?"),
        m.git,
        r.args.hearth_log
    );
    let _ = writeln!(o, "| llama-server | {} |", m.llama_server_version);
    let _ = writeln!(o, "| rustc | {} |", m.rustc);
    let model_name = r
        .model
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let _ = writeln!(
        o,
        "| model | {model_name} ({:.0} KB); chat request \"Hi\", max_tokens {}, temperature 0, seed 42 |",
        r.model_bytes as f64 / 1e3,
        r.args.max_tokens
    );
    let _ = writeln!(
        o,
        "| runtime command (hearth's) | {} |",
        r.runtime_cmd
            .as_ref()
            .map(|c| code(&c.join(" ")))
            .unwrap_or_else(|| "not read".into())
    );
    let _ = writeln!(
        o,
        "| direct server command | {} |",
        code(&r.direct_cmd.join(" "))
    );
    let _ = writeln!(
        o,
        "| phases | {} rounds x (direct, hearth) x {} s per scenario, ABBA order, {} s warm-up per path; {} cold runs each |",
        r.args.rounds,
        r.args.phase_secs,
        (r.args.phase_secs / 4.0).min(1.0),
        r.args.cold_runs
    );
    let _ = writeln!(
        o,
        "| client connections | keep-alive; streamed requests: a fresh connection each on the direct path (llama-server closes it after every streamed response), {} |",
        if r.args.hearth_stream_close {
            "and on the hearth path too (`--hearth-stream-close`)"
        } else {
            "kept alive on the hearth path (hearth keeps its clients' connections open)"
        }
    );

    if foreign_max(r) > NOISY_CPUS {
        let _ = writeln!(
            o,
            "\n**Noisy run:** other processes used more than {NOISY_CPUS} CPUs during some phases; treat the \
             numbers below as indicative only.\n"
        );
    }
    let _ = writeln!(o, "\n### Targets\n");
    let _ = writeln!(o, "| target | measured | verdict |\n|---|---|---|");
    for v in verdicts(r) {
        let _ = writeln!(
            o,
            "| {} | {} | {}{} |",
            v.target,
            v.measured,
            verdict_word(&v),
            noisy_tag(r)
        );
    }

    let _ = writeln!(o, "\n### Steady state (latencies in ms, every sample)\n");
    let _ = writeln!(
        o,
        "| mode | conc. | path | requests | errors | req/s | p50 | p90 | p99 | max | TTFB p50 | TTFT p50 | TTFT p99 | CPUs busy | other processes (CPUs) | llama-server CPU per request | client CPU per request |"
    );
    let _ = writeln!(
        o,
        "|---|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"
    );
    for s in &r.scenarios {
        for (name, a) in path_rows(s) {
            let t = totals(a);
            let f = ttfts(a);
            let b = summarize(a.samples.iter().map(|x| x.ttfb));
            let (fp50, fp99) = if s.stream {
                (ms(f.p50), ms(f.p99))
            } else {
                ("-".into(), "-".into())
            };
            let _ = writeln!(
                o,
                "| {} | {} | {name} | {} | {} | {:.1} | {} | {} | {} | {} | {} | {fp50} | {fp99} | {:.0} % | {:.2} | {:.0} us | {:.0} us |",
                mode(s),
                s.concurrency,
                t.n,
                a.errors.count,
                a.rps(),
                ms(t.p50),
                ms(t.p90),
                ms(t.p99),
                ms(t.max),
                ms(b.p50),
                a.busy_share() * 100.0,
                a.foreign_cpus(),
                per_request_us(a.server_cpu_s, a),
                per_request_us(a.client_cpu_s, a)
            );
        }
    }
    let _ = writeln!(o, "\n### Added by hearth (hearth minus direct)\n");
    let _ = writeln!(
        o,
        "| mode | conc. | p50 | p90 | p99 | TTFT p50 | throughput vs direct | per-phase req/s direct / hearth | hearth CPU per request |"
    );
    let _ = writeln!(o, "|---|--:|--:|--:|--:|--:|--:|---|--:|");
    for s in &r.scenarios {
        let Some(h) = &s.hearth else { continue };
        let (dt, ht) = (totals(&s.direct), totals(h));
        let ttft = if s.stream {
            signed_ms(ttfts(h).p50 - ttfts(&s.direct).p50)
        } else {
            "-".into()
        };
        let rates = |a: &Agg| {
            a.phase_rps
                .iter()
                .map(|x| format!("{x:.0}"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        let _ = writeln!(
            o,
            "| {} | {} | {} | {} | {} | {ttft} | {:.1} % | {} / {} | {:.0} us |",
            mode(s),
            s.concurrency,
            signed_ms(ht.p50 - dt.p50),
            signed_ms(ht.p90 - dt.p90),
            signed_ms(ht.p99 - dt.p99),
            throughput_pct(s).unwrap_or(0.0),
            rates(&s.direct),
            rates(h),
            cpu_us_per_request(h)
        );
    }

    let _ = writeln!(o, "\n### Cold start (ms)\n");
    let _ = writeln!(
        o,
        "| run | direct spawn-to-ready | direct first token on the fresh server | TTFT through hearth, model cold | hearth `last_load_seconds` | starts |"
    );
    let _ = writeln!(o, "|--:|--:|--:|--:|--:|--:|");
    let n = r.cold_direct.len().max(r.cold_hearth.len());
    for i in 0..n {
        let d = r.cold_direct.get(i);
        let h = r.cold_hearth.get(i);
        let flag = |had: bool| if had { "" } else { " (no token; last byte)" };
        let _ = writeln!(
            o,
            "| {} | {} | {} | {} | {} | {} |",
            i + 1,
            d.map(|d| ms(d.spawn_to_ready.as_secs_f64() * 1e3))
                .unwrap_or_else(|| "-".into()),
            d.map(|d| format!("{}{}", ms(d.ttft.as_secs_f64() * 1e3), flag(d.had_token)))
                .unwrap_or_else(|| "-".into()),
            h.map(|h| format!("{}{}", ms(h.ttft.as_secs_f64() * 1e3), flag(h.had_token)))
                .unwrap_or_else(|| "-".into()),
            h.and_then(|h| h.last_load_seconds)
                .map(|s| ms(s * 1e3))
                .unwrap_or_else(|| "-".into()),
            h.and_then(|h| h.starts)
                .map(|s| s.to_string())
                .unwrap_or_else(|| "-".into()),
        );
    }
    let c = cold(r);
    let _ = writeln!(
        o,
        "| **median** | {} | {} | {} | {} | |",
        opt_ms(c.s2r),
        opt_ms(c.warm_ttft),
        opt_ms(c.hearth_ttft),
        opt_ms(c.last_load)
    );
    let _ = writeln!(
        o,
        "\nCold-start overhead = {} - ({} + {}) = **{} ms**.",
        opt_ms(c.hearth_ttft),
        opt_ms(c.s2r),
        opt_ms(c.warm_ttft),
        c.overhead.map(signed_ms).unwrap_or_else(|| "-".into())
    );

    let _ = writeln!(
        o,
        "\n### Idle RSS of the hearth process (runtimes excluded)\n"
    );
    let _ = writeln!(o, "| when | VmRSS | VmHWM (peak so far) |\n|---|--:|--:|");
    for (when, v) in [
        ("after start, no model loaded", r.rss_start),
        ("after the benchmark, model loaded, idle", r.rss_after),
        ("after unloading the model", r.rss_after_unload),
    ] {
        let (a, b) = v
            .map(|(x, y)| (format!("{:.1} MB", mb(x)), format!("{:.1} MB", mb(y))))
            .unwrap_or_else(|| ("-".into(), "-".into()));
        let _ = writeln!(o, "| {when} | {a} | {b} |");
    }
    let _ = writeln!(
        o,
        "\nhearth's CPU use while idle with the model loaded (measured over 2 s after the steady-state \
         phases): {}.",
        idle_cpu(r)
    );
    let _ = writeln!(
        o,
        "\nhearth on SIGTERM: {}.",
        r.hearth_exit
            .as_deref()
            .unwrap_or("not stopped by the bench")
    );

    let mut problems = Vec::new();
    for s in &r.scenarios {
        for (name, a) in path_rows(s) {
            if a.errors.count > 0 {
                problems.push(format!(
                    "{} c={} {name}: {} failed requests, e.g. {}",
                    mode(s),
                    s.concurrency,
                    a.errors.count,
                    a.errors
                        .examples
                        .iter()
                        .map(|e| code(e))
                        .collect::<Vec<_>>()
                        .join("; ")
                ));
            }
        }
    }
    problems.extend(r.notes.iter().cloned());
    let _ = writeln!(o, "\n### Errors and observations\n");
    if problems.is_empty() {
        let _ = writeln!(o, "None: every request succeeded.");
    } else {
        for p in problems {
            let _ = writeln!(o, "- {}", p.replace('\n', " / "));
        }
    }
    o
}

/// Replaces the text between the markers, keeping everything else (the methodology) as it is.
pub fn write_doc(path: &Path, results: &str) -> Result<()> {
    write_section(path, BEGIN, END, results)
}

/// Replaces the text between `begin` and `end` in `path` (appends the section when the markers are
/// missing), keeping everything else as it is.
pub fn write_section(path: &Path, begin: &str, end: &str, results: &str) -> Result<()> {
    let existing = std::fs::read_to_string(path).ok();
    let section = format!("{begin}\n{}\n{end}", results.trim_end());
    let text = match existing {
        Some(t) => match (t.find(begin), t.find(end)) {
            (Some(b), Some(e)) if b < e => {
                format!("{}{section}{}", &t[..b], &t[e + end.len()..])
            }
            _ => format!("{}\n\n{section}\n", t.trim_end()),
        },
        None => format!("{TEMPLATE_HEAD}{section}\n"),
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}
