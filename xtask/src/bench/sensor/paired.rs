//! `cargo xtask bench sensor --paired`: the throughput loss measured side by side. Two identical
//! servers, each in a cgroup of its own, take the same load at the same time; the programs are
//! attached to one of the two cgroups, and each round's loss is 1 - rate of the attached server /
//! rate of the other one over the SAME seconds. On a virtual machine, whose speed moves by several
//! per cent from one second to the next whatever runs on it, this cancels what the sequential off/on
//! phases cannot: both servers see the same slow and fast moments.
//!
//! The load runs without a break for the whole scenario (the same client threads, connections and
//! server threads in every round; only the attachment moves), so the two sides keep their places on
//! the CPUs from round to round. What is left of the difference between the two sides (one side's
//! threads on faster CPUs, say) is the same in every round, and the rounds come in crossover pairs,
//! one with the programs on A and one with them on B (A B B A ...): in a pair's geometric mean
//! sqrt((A_on / B_off) x (B_on / A_off)) the sides' own ratio cancels exactly, leaving the programs'
//! cost. The verdict is taken on those pairs.
//!
//! No BPF stats here (their clock reads would be charged to the attached side); the sequential mode
//! measures the programs' run time.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::kernel::{self, BenchCgroup, Reader, Sensor};
use super::net::{self, Running, Traffic};
use super::report::{loss_verdict, TARGET_LOSS_PCT};
use super::{interrupted, ScenarioKind, SensorArgs};
use crate::bench::procs::Proc;
use crate::bench::stats::{self, mean_ci, Machine};

pub const BEGIN: &str = "<!-- bench-sensor-paired:begin -->";
pub const END: &str = "<!-- bench-sensor-paired:end -->";
pub const CONTROL_BEGIN: &str = "<!-- bench-sensor-paired-control:begin -->";
pub const CONTROL_END: &str = "<!-- bench-sensor-paired-control:end -->";

/// After an attach or detach, rounds wait this long before they count (the first packets of every
/// flow create its entries).
const SETTLE: Duration = Duration::from_millis(50);

/// One gateway: its cgroup, server and (loaded, detached) programs. Fields drop in order: the
/// programs detach, the server stops, then the cgroup goes.
struct Side {
    sensor: Sensor,
    maps: Option<kernel::Maps>,
    server: Proc,
    addr: SocketAddr,
    cgroup: BenchCgroup,
}

impl Side {
    fn start(tag: &str, mount: &Path, object: &[u8], work: &Path) -> Result<Side> {
        let (cgroup, server, addr) = super::start_server(mount, work, tag)?;
        let (sensor, maps) = Sensor::load(object, addr.port(), cgroup.path())?;
        Ok(Side {
            sensor,
            maps: Some(maps),
            server,
            addr,
            cgroup,
        })
    }

    /// Attaches the programs and, unless `--no-reader`, starts a reader like hearth's poller.
    fn attach(&mut self, reader: bool) -> Result<Option<Reader>> {
        self.sensor.attach()?;
        if !reader {
            return Ok(None);
        }
        let maps = self.maps.take().context("the maps are with a reader")?;
        Ok(Some(Reader::start(maps)?))
    }

    fn detach(&mut self, reader: Option<Reader>) -> Result<()> {
        if let Some(r) = reader {
            let (maps, _) = r.stop()?;
            self.maps = Some(maps);
        }
        self.sensor.detach()
    }
}

/// One scenario's rounds: the rates of the attached and the detached server, and which was which.
struct PairedResult {
    label: String,
    /// Where `--pin` put the threads.
    pinned: Option<String>,
    unit: &'static str,
    on_rates: Vec<f64>,
    off_rates: Vec<f64>,
    /// Per round, whether server A carried the programs.
    on_a: Vec<bool>,
}

impl PairedResult {
    /// Per round: 1 - attached / detached, in per cent.
    fn losses(&self) -> Vec<f64> {
        self.on_rates
            .iter()
            .zip(&self.off_rates)
            .map(|(on, off)| (1.0 - on / off) * 100.0)
            .collect()
    }

    /// Per crossover pair (rounds 2k and 2k+1, one with the programs on each side), in per cent.
    fn pair_losses(&self) -> Vec<f64> {
        let ratios: Vec<f64> = self
            .on_rates
            .iter()
            .zip(&self.off_rates)
            .map(|(on, off)| on / off)
            .collect();
        pair_losses(&ratios, &self.on_a)
    }
}

/// Crossover pairs of rounds: `ratios[i]` is round i's attached / detached rate, `on_a[i]` whether A
/// carried the programs then. Rounds 2k and 2k+1 form a pair when the programs were on different
/// sides; a pair's loss is 1 - the geometric mean of its two ratios, which cancels a constant
/// difference of speed between the sides: with A = k x B, the ratios are k(1 - L) and (1 - L)/k.
pub fn pair_losses(ratios: &[f64], on_a: &[bool]) -> Vec<f64> {
    ratios
        .chunks_exact(2)
        .zip(on_a.chunks_exact(2))
        .filter(|(_, sides)| sides[0] != sides[1])
        .map(|(r, _)| (1.0 - (r[0] * r[1]).sqrt()) * 100.0)
        .collect()
}

/// Round `r`'s attached side in the A B B A order: every pair of rounds has one of each, and the
/// pairs alternate which side comes first.
fn side_of_round(r: u32) -> usize {
    usize::from(matches!(r % 4, 1 | 2))
}

/// `--pin`: which CPUs each side's client threads and server threads run on. Connection i of side s
/// gets the pair of CPUs 2(s x n + i), 2(s x n + i) + 1 of the usable ones (wrapping around when
/// there are fewer): the client on the first, the server on the second; the server's threads may
/// use all of its side's server CPUs (which thread serves which connection is the server's
/// business).
struct Layout {
    clients: [Vec<usize>; 2],
    servers: [Vec<usize>; 2],
}

impl Layout {
    fn new(cpus: &[usize], conns: usize) -> Layout {
        let at = |k: usize| cpus[k % cpus.len().max(1)];
        let side = |s: usize, role: usize| -> Vec<usize> {
            (0..conns).map(|i| at(2 * (s * conns + i) + role)).collect()
        };
        Layout {
            clients: [side(0, 0), side(1, 0)],
            servers: [side(0, 1), side(1, 1)],
        }
    }

    fn describe(&self) -> String {
        format!(
            "A: clients on CPUs {:?}, server on {:?}; B: clients on {:?}, server on {:?}",
            self.clients[0], self.servers[0], self.clients[1], self.servers[1]
        )
    }
}

fn traffic(args: &SensorArgs, sc: super::Scenario) -> Traffic {
    match sc.kind {
        ScenarioKind::Bulk => Traffic::Bulk {
            write_bytes: args.bulk_write_kib * 1024,
        },
        ScenarioKind::Rr => Traffic::Rr {
            conns: sc.conns,
            req: args.request_bytes,
            resp: args.response_bytes,
        },
        ScenarioKind::Connect => Traffic::Connect {
            req: args.request_bytes,
            resp: args.response_bytes,
        },
    }
}

fn check_servers(sides: &mut [Side; 2], what: &str) -> Result<()> {
    for (side, name) in sides.iter_mut().zip(["A", "B"]) {
        if let Some(st) = side.server.exited() {
            bail!(
                "server {name} exited ({st}) during {what}; last output:\n{}",
                side.server.log_tail(20)
            );
        }
    }
    if interrupted() {
        bail!("interrupted; detached the programs, stopped the servers, removed the cgroups");
    }
    Ok(())
}

/// One scenario: the load starts on both servers and runs until the last round ends; the programs
/// move from side to side between rounds.
fn scenario(args: &SensorArgs, sides: &mut [Side; 2], sc: super::Scenario) -> Result<PairedResult> {
    let phase = Duration::from_secs_f64(args.phase_secs);
    let warmup = Duration::from_secs_f64((args.phase_secs / 4.0).min(0.5));
    let layout = if args.pin {
        Some(Layout::new(&net::usable_cpus()?, sc.conns))
    } else {
        None
    };
    let pinned = layout.as_ref().map(Layout::describe);
    let client_cpus = |s: usize| layout.as_ref().map_or(Vec::new(), |l| l.clients[s].clone());
    let loads = [
        Running::start(sides[0].addr, traffic(args, sc), &client_cpus(0))?,
        Running::start(sides[1].addr, traffic(args, sc), &client_cpus(1))?,
    ];
    if let Some(l) = &layout {
        // Every connection is open by now, so every server thread that will serve it exists.
        for (side, cpus) in sides.iter().zip(&l.servers) {
            net::pin_process(side.server.pid(), cpus)?;
        }
    }
    let mut res = PairedResult {
        label: sc.label(),
        pinned,
        unit: sc.unit(),
        on_rates: Vec::new(),
        off_rates: Vec::new(),
        on_a: Vec::new(),
    };
    // A warm-up with the programs on each side (not counted), then the rounds.
    let plan = [(None, 0), (None, 1)]
        .into_iter()
        .chain((0..args.rounds).map(|r| (Some(r), side_of_round(r))));
    for (r, on) in plan {
        let reader = sides[on].attach(!args.no_reader)?;
        std::thread::sleep(SETTLE);
        let (a0, b0, t0) = (loads[0].units(), loads[1].units(), Instant::now());
        std::thread::sleep(if r.is_some() { phase } else { warmup });
        let (a1, b1, secs) = (
            loads[0].units(),
            loads[1].units(),
            t0.elapsed().as_secs_f64(),
        );
        sides[on].detach(reader)?;
        check_servers(sides, &sc.label())?;
        if loads.iter().any(Running::broken) {
            for (load, name) in loads.into_iter().zip(["A", "B"]) {
                load.stop()
                    .with_context(|| format!("{}: the load on server {name}", sc.label()))?;
            }
            bail!("{}: a client thread ended during the rounds", sc.label());
        }
        let Some(r) = r else { continue };
        let rates = [
            sc.units(a1 - a0) / secs.max(1e-9),
            sc.units(b1 - b0) / secs.max(1e-9),
        ];
        if rates[1 - on] <= 0.0 {
            bail!(
                "{}: the detached server moved nothing in round {}",
                sc.label(),
                r + 1
            );
        }
        eprintln!(
            "bench sensor --paired: {} round {}/{}: attached ({}) {:.1}, detached {:.1} {}/s, loss {:.2} %",
            sc.label(),
            r + 1,
            args.rounds,
            ["A", "B"][on],
            rates[on],
            rates[1 - on],
            sc.unit(),
            (1.0 - rates[on] / rates[1 - on]) * 100.0
        );
        res.on_rates.push(rates[on]);
        res.off_rates.push(rates[1 - on]);
        res.on_a.push(on == 0);
    }
    for (load, name) in loads.into_iter().zip(["A", "B"]) {
        load.stop()
            .with_context(|| format!("{}: the load on server {name}", sc.label()))?;
    }
    Ok(res)
}

pub fn run(args: &SensorArgs, setup: &super::Setup<'_>) -> Result<String> {
    if args.rounds < 2 {
        bail!("--paired needs at least 2 --rounds (one crossover pair)");
    }
    let (root, mount, object_path, object, work) = setup.parts();
    let wall = Instant::now();
    let machine = Machine::collect(root, None);
    let load_start = stats::loadavg();
    // As the sequential mode: the tracepoint needs tracefs, and a killed run may have left cgroups.
    let mut notes: Vec<String> = kernel::ensure_tracefs()?.into_iter().collect();
    notes.extend(kernel::remove_stale_cgroups(mount));
    let mut sides = [
        Side::start("a", mount, object, work)?,
        Side::start("b", mount, object, work)?,
    ];
    let mut results = Vec::new();
    for sc in super::scenarios_of(args) {
        results.push(scenario(args, &mut sides, sc)?);
    }
    let cgroups = [
        sides[0].cgroup.path().display().to_string(),
        sides[1].cgroup.path().display().to_string(),
    ];
    drop(sides);
    let run = RunInfo {
        machine,
        object: object_path.strip_prefix(root).unwrap_or(object_path),
        load_start,
        cgroups,
        notes,
        wall: wall.elapsed(),
    };
    Ok(markdown(args, &run, &results))
}

/// What the results say about the run besides the scenarios.
struct RunInfo<'a> {
    machine: Machine,
    object: &'a Path,
    load_start: String,
    cgroups: [String; 2],
    notes: Vec<String>,
    wall: Duration,
}

fn ci_cell(v: &[f64]) -> (String, &'static str) {
    match mean_ci(v) {
        Some((mean, lo, hi)) => (
            format!("{mean:.2} % ({lo:.2} .. {hi:.2} %)"),
            loss_verdict(lo, hi),
        ),
        None => ("too few: no CI".to_string(), "inconclusive (too few)"),
    }
}

fn markdown(args: &SensorArgs, run: &RunInfo<'_>, results: &[PairedResult]) -> String {
    let RunInfo {
        machine,
        object,
        load_start,
        cgroups,
        notes,
        wall,
    } = run;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "### Results: throughput loss, side by side (`--paired`{})\n",
        if args.control {
            ", control: the cgroup_skb programs only return 1"
        } else {
            ""
        }
    );
    let _ = writeln!(
        o,
        "Produced by `{}` on {} (whole run {:.0} s).\n",
        crate::bench::invocation(),
        stats::utc_now(),
        wall.as_secs_f64()
    );
    let _ = writeln!(o, "| | |\n|---|---|");
    let _ = writeln!(o, "| machine | {} |", machine.summary());
    let _ = writeln!(
        o,
        "| noise | load average {load_start} at start, {} at end |",
        stats::loadavg()
    );
    let _ = writeln!(
        o,
        "| hearth | git {}; eBPF object `{}` |",
        machine.git,
        object.display()
    );
    let _ = writeln!(
        o,
        "| setup | two servers, A in `{}` and B in `{}`, each on its own loopback port; the same load on both at once, without a break for the whole scenario (one client thread per connection and server) |",
        cgroups[0], cgroups[1]
    );
    let _ = writeln!(
        o,
        "| \"attached\" | the programs on the cgroup of A or of B (A B B A over the rounds), with `hearth_sock_state` and {}; no BPF stats |",
        if args.no_reader {
            "no reader (--no-reader)"
        } else {
            "a reader like hearth's poller"
        }
    );
    let pinned: Vec<String> = results
        .iter()
        .filter_map(|r| r.pinned.as_ref().map(|p| format!("{}: {p}", r.label)))
        .collect();
    if !pinned.is_empty() {
        let _ = writeln!(o, "| pinned (--pin) | {} |", pinned.join("; "));
    }
    let _ = writeln!(
        o,
        "| rounds | {} x {} s per scenario ({} crossover pairs), each counted from {} ms after the attach, after a {:.2} s warm-up with each side attached |\n",
        args.rounds,
        args.phase_secs,
        args.rounds / 2,
        SETTLE.as_millis(),
        (args.phase_secs / 4.0).min(0.5)
    );
    let _ = writeln!(
        o,
        "| scenario | loss < {TARGET_LOSS_PCT} %: crossover pairs, mean (95 % CI) | verdict | rounds, mean (95 % CI) | median of rounds | attached / detached rate | loss when A / when B carried them | A's speed / B's |"
    );
    let _ = writeln!(o, "|---|---|---|---|--:|--:|--:|--:|");
    for r in results {
        let losses = r.losses();
        let pairs = r.pair_losses();
        let mean_of = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
        let (pair_cell, verdict) = ci_cell(&pairs);
        let (round_cell, _) = ci_cell(&losses);
        let when = |a: bool| -> Vec<f64> {
            losses
                .iter()
                .zip(&r.on_a)
                .filter(|(_, &x)| x == a)
                .map(|(l, _)| *l)
                .collect()
        };
        // With A = k x B: when A carries them the ratio is k(1 - L), when B does (1 - L)/k.
        let ratio_when = |a: bool| 1.0 - mean_of(&when(a)) / 100.0;
        let k = (ratio_when(true) / ratio_when(false)).sqrt();
        let _ = writeln!(
            o,
            "| {} | {pair_cell} | {verdict} | {round_cell} | {:.2} % | {:.1} / {:.1} {}/s | {:.2} % / {:.2} % | {k:.3} |",
            r.label,
            stats::median(&losses).unwrap_or(0.0),
            mean_of(&r.on_rates),
            mean_of(&r.off_rates),
            r.unit,
            mean_of(&when(true)),
            mean_of(&when(false)),
        );
    }
    let _ = writeln!(
        o,
        "\nPer round: loss = 1 - (rate of the server whose cgroup has the programs) / (rate of the other server), both over the same {} s. Per crossover pair (two consecutive rounds, the programs on A in one and on B in the other): 1 - the geometric mean of the two rounds' ratios, in which the two servers' own difference of speed cancels; the verdict is taken on the pairs. *A's speed / B's* estimates that difference (1.000: none).",
        args.phase_secs
    );
    if !notes.is_empty() {
        let _ = writeln!(o, "\n#### Observations\n");
        for n in notes {
            let _ = writeln!(o, "- {n}");
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::{pair_losses, side_of_round};

    #[test]
    fn crossover_pairs_cancel_the_sides_own_speed() {
        // A is 10 % faster than B; the programs cost 2 %.
        let (k, keep) = (1.1_f64, 0.98_f64);
        let on_a: Vec<bool> = (0..8).map(|r| side_of_round(r) == 0).collect();
        assert_eq!(on_a, [true, false, false, true, true, false, false, true]);
        let ratios: Vec<f64> = on_a
            .iter()
            .map(|&a| if a { k * keep } else { keep / k })
            .collect();
        let pairs = pair_losses(&ratios, &on_a);
        assert_eq!(pairs.len(), 4);
        for l in pairs {
            assert!((l - 2.0).abs() < 1e-9, "{l}");
        }
        // An odd last round has no partner; two rounds on one side are no pair.
        assert_eq!(pair_losses(&ratios[..3], &on_a[..3]).len(), 1);
        assert!(pair_losses(&[0.9, 0.9], &[true, true]).is_empty());
    }
}
