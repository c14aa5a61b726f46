//! `cargo xtask bench sensor --paired`: the throughput loss measured side by side. Two identical
//! servers, each in a cgroup of its own, take the same load at the same time; the programs are
//! attached to one of the two cgroups (alternating A B B A over the rounds, so neither server nor
//! its CPUs is favoured), and each round's loss is 1 - rate of the attached server / rate of the
//! other one over the SAME seconds. On a virtual machine, whose speed moves by several per cent from
//! one second to the next whatever runs on it, this cancels what the sequential off/on phases cannot:
//! both servers see the same slow and fast moments.
//!
//! No BPF stats here (their clock reads would be charged to the attached side); the sequential mode
//! measures the programs' run time.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::kernel::{self, BenchCgroup, Reader, Sensor};
use super::report::{loss_verdict, TARGET_LOSS_PCT};
use super::{interrupted, net, ScenarioKind, SensorArgs};
use crate::bench::procs::Proc;
use crate::bench::stats::{self, mean_ci, Machine};

pub const BEGIN: &str = "<!-- bench-sensor-paired:begin -->";
pub const END: &str = "<!-- bench-sensor-paired:end -->";

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
}

/// One scenario's rounds: the rates of the attached and the detached server, and which was which.
struct PairedResult {
    label: String,
    unit: &'static str,
    on_rates: Vec<f64>,
    off_rates: Vec<f64>,
    /// Per round, whether server A carried the programs.
    on_a: Vec<bool>,
}

impl PairedResult {
    fn losses(&self) -> Vec<f64> {
        self.on_rates
            .iter()
            .zip(&self.off_rates)
            .map(|(on, off)| (1.0 - on / off) * 100.0)
            .collect()
    }
}

fn load(args: &SensorArgs, sc: super::Scenario, addr: SocketAddr, dur: Duration) -> Result<f64> {
    let l = match sc.kind {
        ScenarioKind::Bulk => net::bulk(addr, dur, args.bulk_write_kib * 1024)?,
        ScenarioKind::Rr => net::rr(addr, sc.conns, args.request_bytes, args.response_bytes, dur)?,
        ScenarioKind::Connect => net::connect(addr, args.request_bytes, args.response_bytes, dur)?,
    };
    Ok(sc.units(l.amount) / l.elapsed.as_secs_f64().max(1e-9))
}

/// One round: the programs on `sides[on]`, the same load on both servers at once. Returns the rates
/// of (attached, detached).
fn round(
    args: &SensorArgs,
    sides: &mut [Side; 2],
    on: usize,
    sc: super::Scenario,
    dur: Duration,
) -> Result<(f64, f64)> {
    sides[on].sensor.attach()?;
    let reader = if args.no_reader {
        None
    } else {
        let maps = sides[on]
            .maps
            .take()
            .context("the maps are with a reader")?;
        Some(Reader::start(maps)?)
    };
    let (a, b) = (sides[0].addr, sides[1].addr);
    let rates = std::thread::scope(|s| {
        let ta = s.spawn(move || load(args, sc, a, dur));
        let tb = s.spawn(move || load(args, sc, b, dur));
        let ra = ta.join();
        let rb = tb.join();
        match (ra, rb) {
            (Ok(Ok(ra)), Ok(Ok(rb))) => Ok([ra, rb]),
            (Ok(Err(e)), _) | (_, Ok(Err(e))) => Err(e),
            _ => Err(anyhow::anyhow!("a load thread panicked")),
        }
    });
    if let Some(r) = reader {
        let (maps, _) = r.stop()?;
        sides[on].maps = Some(maps);
    }
    sides[on].sensor.detach()?;
    for (side, name) in sides.iter_mut().zip(["A", "B"]) {
        if let Some(st) = side.server.exited() {
            bail!(
                "server {name} exited ({st}) during {}; last output:\n{}",
                sc.label(),
                side.server.log_tail(20)
            );
        }
    }
    let rates = rates.with_context(|| sc.label())?;
    if interrupted() {
        bail!("interrupted; detached the programs, stopped the servers, removed the cgroups");
    }
    Ok((rates[on], rates[1 - on]))
}

pub fn run(args: &SensorArgs, setup: &super::Setup<'_>) -> Result<String> {
    let (root, mount, object_path, object, work) = setup.parts();
    let wall = Instant::now();
    let machine = Machine::collect(root, None);
    let load_start = stats::loadavg();
    let mut sides = [
        Side::start("a", mount, object, work)?,
        Side::start("b", mount, object, work)?,
    ];
    let phase = Duration::from_secs_f64(args.phase_secs);
    let warmup = Duration::from_secs_f64((args.phase_secs / 4.0).min(0.5));
    let mut results = Vec::new();
    for sc in super::scenarios_of(args) {
        for on in [0, 1] {
            round(args, &mut sides, on, sc, warmup)?;
        }
        let mut res = PairedResult {
            label: sc.label(),
            unit: sc.unit(),
            on_rates: Vec::new(),
            off_rates: Vec::new(),
            on_a: Vec::new(),
        };
        for r in 0..args.rounds {
            // A B B A: each server carries the programs in half the rounds, early and late alike.
            let on = usize::from(matches!(r % 4, 1 | 2));
            let (on_rate, off_rate) = round(args, &mut sides, on, sc, phase)?;
            eprintln!(
                "bench sensor --paired: {} round {}/{}: attached ({}) {on_rate:.1}, detached {off_rate:.1} {}/s, loss {:.2} %",
                sc.label(),
                r + 1,
                args.rounds,
                ["A", "B"][on],
                sc.unit(),
                (1.0 - on_rate / off_rate) * 100.0
            );
            res.on_rates.push(on_rate);
            res.off_rates.push(off_rate);
            res.on_a.push(on == 0);
        }
        results.push(res);
    }
    let cgroups = [
        sides[0].cgroup.path().display().to_string(),
        sides[1].cgroup.path().display().to_string(),
    ];
    drop(sides);
    Ok(markdown(
        args,
        &machine,
        object_path.strip_prefix(root).unwrap_or(object_path),
        &load_start,
        &cgroups,
        &results,
        wall.elapsed(),
    ))
}

fn markdown(
    args: &SensorArgs,
    machine: &Machine,
    object: &Path,
    load_start: &str,
    cgroups: &[String; 2],
    results: &[PairedResult],
    wall: Duration,
) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "### Results: throughput loss, side by side (`--paired`)\n"
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
        "| setup | two servers, A in `{}` and B in `{}`, each on its own loopback port; the same load on both at once (one client thread per connection and server) |",
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
    let _ = writeln!(
        o,
        "| rounds | {} x {} s per scenario, after a {:.2} s warm-up with each side attached |\n",
        args.rounds,
        args.phase_secs,
        (args.phase_secs / 4.0).min(0.5)
    );
    let _ = writeln!(
        o,
        "| scenario | loss < {TARGET_LOSS_PCT} %: mean (95 % CI) | median | verdict | attached / detached rate | loss when A / when B carried them |"
    );
    let _ = writeln!(o, "|---|---|--:|---|--:|--:|");
    for r in results {
        let losses = r.losses();
        let mean_of = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
        let (cell, verdict) = match mean_ci(&losses) {
            Some((mean, lo, hi)) => (
                format!("{mean:.2} % ({lo:.2} .. {hi:.2} %)"),
                loss_verdict(lo, hi),
            ),
            None => ("one round: no CI".to_string(), "inconclusive (one round)"),
        };
        let when = |a: bool| -> Vec<f64> {
            losses
                .iter()
                .zip(&r.on_a)
                .filter(|(_, &x)| x == a)
                .map(|(l, _)| *l)
                .collect()
        };
        let _ = writeln!(
            o,
            "| {} | {cell} | {:.2} % | {verdict} | {:.1} / {:.1} {}/s | {:.2} % / {:.2} % |",
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
        "\nPer round: loss = 1 - (rate of the server whose cgroup has the programs) / (rate of the other server), both over the same {} s. The last column splits the rounds by which server carried the programs: a difference between the two is the servers' own asymmetry (CPU placement), which the A B B A order cancels in the mean.",
        args.phase_secs
    );
    o
}
