//! Percentiles, machine information and small formatting helpers.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Summary of a set of durations. Percentiles are nearest-rank over every sample (nothing dropped).
#[derive(Clone, Copy, Debug, Default)]
pub struct Summary {
    pub n: usize,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

/// In milliseconds.
pub fn summarize(values: impl IntoIterator<Item = Duration>) -> Summary {
    let mut v: Vec<f64> = values.into_iter().map(|d| d.as_secs_f64() * 1e3).collect();
    if v.is_empty() {
        return Summary::default();
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let pct = |p: f64| {
        let rank = ((p / 100.0) * n as f64).ceil() as usize;
        v[rank.clamp(1, n) - 1]
    };
    Summary {
        n,
        p50: pct(50.0),
        p90: pct(90.0),
        p99: pct(99.0),
        max: v[n - 1],
    }
}

/// Median of plain numbers (mean of the two middle ones for an even count).
pub fn median(values: &[f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

pub struct Machine {
    pub nproc: usize,
    /// Online CPUs of the host ("0-15"), whatever the affinity mask.
    pub online: String,
    pub cpu_model: String,
    pub kernel: String,
    pub mem_total: String,
    pub date_utc: String,
    pub rustc: String,
    pub git: String,
    pub llama_server_version: String,
}

impl Machine {
    /// `llama_server`: the binary whose `--version` is recorded (None: a benchmark without it).
    pub fn collect(root: &Path, llama_server: Option<&Path>) -> Machine {
        let nproc = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0);
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, m)| m.trim().to_string())
            .unwrap_or_else(|| "unknown".to_string());
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "unknown".to_string());
        let mem_total = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines()
                    .find(|l| l.starts_with("MemTotal:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|k| k.parse::<f64>().ok())
            })
            .map(|kib| format!("{:.1} GiB", kib / 1024.0 / 1024.0))
            .unwrap_or_else(|| "unknown".to_string());
        let rustc = command_line_output(Command::new("rustc").arg("--version").current_dir(root));
        let git = command_line_output(
            Command::new("git")
                .args(["rev-parse", "--short", "HEAD"])
                .current_dir(root),
        );
        let git = if git.starts_with("unavailable") {
            "no commit".to_string()
        } else {
            git
        };
        let llama_server_version = match llama_server {
            None => "not used".to_string(),
            Some(llama_server) => match Command::new(llama_server).arg("--version").output() {
                Ok(o) => {
                    let text = format!(
                        "{}{}",
                        String::from_utf8_lossy(&o.stdout),
                        String::from_utf8_lossy(&o.stderr)
                    );
                    let lines: Vec<&str> = text
                        .lines()
                        .filter(|l| l.starts_with("version") || l.starts_with("built with"))
                        .collect();
                    if lines.is_empty() {
                        "unknown".to_string()
                    } else {
                        lines.join("; ")
                    }
                }
                Err(e) => format!("(cannot run: {e})"),
            },
        };
        let online = std::fs::read_to_string("/sys/devices/system/cpu/online")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "unknown".to_string());
        Machine {
            nproc,
            online,
            cpu_model,
            kernel,
            mem_total,
            date_utc: utc_now(),
            rustc,
            git,
            llama_server_version,
        }
    }
}

impl Machine {
    /// "N CPUs usable (nproc; host CPUs online: L), MODEL, M GiB RAM, Linux K", for the results tables.
    pub fn summary(&self) -> String {
        format!(
            "{} CPUs usable (nproc; host CPUs online: {}), {}, {} RAM, Linux {}",
            self.nproc, self.online, self.cpu_model, self.mem_total, self.kernel
        )
    }
}

fn command_line_output(cmd: &mut Command) -> String {
    match cmd.output() {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).trim().to_string(),
        Ok(o) => format!("unavailable ({})", o.status),
        Err(e) => format!("unavailable ({e})"),
    }
}

/// "1-min 5-min 15-min" load averages.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".to_string())
}

/// Share of the CPUs this process may run on (its affinity mask, which `taskset` narrows) that was busy
/// between two readings of /proc/stat.
pub struct CpuSnapshot {
    busy: u64,
    total: u64,
}

/// The CPUs in this process's affinity mask (`Cpus_allowed_list`, e.g. "0-3,8").
fn allowed_cpus() -> Option<Vec<usize>> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let list = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))?
        .trim();
    let mut cpus = Vec::new();
    for part in list.split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => cpus.extend(a.parse::<usize>().ok()?..=b.parse::<usize>().ok()?),
            None => cpus.push(part.parse().ok()?),
        }
    }
    Some(cpus)
}

/// "taskset -c LIST " when this process may not run on every online CPU, else "".
pub fn affinity_note() -> String {
    let online = std::fs::read_to_string("/sys/devices/system/cpu/online")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let allowed = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|st| {
            st.lines()
                .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
                .map(|l| l.trim().to_string())
        })
        .unwrap_or_default();
    if allowed.is_empty() || online.is_empty() || allowed == online {
        String::new()
    } else {
        format!("taskset -c {allowed} ")
    }
}

impl CpuSnapshot {
    pub fn take() -> Option<CpuSnapshot> {
        let text = std::fs::read_to_string("/proc/stat").ok()?;
        let allowed = allowed_cpus();
        let (mut busy, mut total) = (0u64, 0u64);
        for line in text.lines() {
            let Some(rest) = line.strip_prefix("cpu") else {
                continue;
            };
            let mut fields = rest.split_whitespace();
            let Some(Ok(n)) = fields.next().map(|f| f.parse::<usize>()) else {
                continue; // the aggregate "cpu " line
            };
            if allowed.as_ref().is_some_and(|a| !a.contains(&n)) {
                continue;
            }
            let v: Vec<u64> = fields.filter_map(|x| x.parse().ok()).collect();
            let t: u64 = v.iter().take(8).sum();
            // idle + iowait
            let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
            busy += t.saturating_sub(idle);
            total += t;
        }
        (total > 0).then_some(CpuSnapshot { busy, total })
    }

    /// Busy CPU time, in seconds (/proc/stat counts in USER_HZ = 100 ticks per second).
    pub fn busy_seconds_since(&self, earlier: &CpuSnapshot) -> f64 {
        self.busy.saturating_sub(earlier.busy) as f64 / 100.0
    }

    pub fn busy_share_since(&self, earlier: &CpuSnapshot) -> f64 {
        let dt = self.total.saturating_sub(earlier.total);
        if dt == 0 {
            return 0.0;
        }
        self.busy.saturating_sub(earlier.busy) as f64 / dt as f64
    }
}

/// ISO 8601 UTC timestamp without external crates.
pub fn utc_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

pub fn ms(v: f64) -> String {
    format!("{v:.3}")
}

pub fn signed_ms(v: f64) -> String {
    format!("{v:+.3}")
}

/// Two-sided 95 % quantile of Student's t distribution with `df` degrees of freedom.
pub fn t975(df: usize) -> f64 {
    const T: [f64; 30] = [
        12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
        2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
        2.052, 2.048, 2.045, 2.042,
    ];
    match df {
        0 => f64::INFINITY,
        d if d <= T.len() => T[d - 1],
        _ => 1.96,
    }
}

/// Mean of `v` with its 95 % confidence interval (t distribution; the rounds are the samples).
pub fn mean_ci(v: &[f64]) -> Option<(f64, f64, f64)> {
    let n = v.len();
    if n < 2 {
        return None;
    }
    let mean = v.iter().sum::<f64>() / n as f64;
    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
    let half = t975(n - 1) * (var / n as f64).sqrt();
    Some((mean, mean - half, mean + half))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let s = summarize((1..=100).map(Duration::from_millis));
        assert_eq!(s.n, 100);
        assert_eq!(s.p50, 50.0);
        assert_eq!(s.p90, 90.0);
        assert_eq!(s.p99, 99.0);
        assert_eq!(s.max, 100.0);
        let one = summarize([Duration::from_millis(7)]);
        assert_eq!((one.p50, one.p99), (7.0, 7.0));
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
    }

    #[test]
    fn utc_format() {
        let s = utc_now();
        assert_eq!(s.len(), 20);
        assert!(s.starts_with("20"));
    }
}
