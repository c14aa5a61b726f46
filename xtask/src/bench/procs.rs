//! Processes the benchmark starts (hearth, llama-server) and what it reads about them from /proc.

use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// A child process that is stopped (SIGTERM, then SIGKILL) when dropped, error paths included.
pub struct Proc {
    pub name: String,
    pub log: PathBuf,
    child: Child,
    exited: Option<ExitStatus>,
}

/// How a process ended when we asked it to stop.
pub struct Stopped {
    pub status: ExitStatus,
    /// SIGTERM was not enough within the grace period.
    pub killed: bool,
    pub took: Duration,
}

impl Proc {
    /// Spawns `argv` with stdout and stderr going to `log`.
    pub fn spawn(name: &str, argv: &[String], env: &[(&str, &str)], log: &Path) -> Result<Proc> {
        let Some((program, rest)) = argv.split_first() else {
            bail!("{name}: empty command line");
        };
        let out = File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone().context("duplicating log file handle")?;
        let mut cmd = Command::new(program);
        cmd.args(rest)
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err));
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("{name}: spawning {}", argv.join(" ")))?;
        Ok(Proc {
            name: name.to_string(),
            log: log.to_path_buf(),
            child,
            exited: None,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status if the process has ended.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            if let Ok(Some(st)) = self.child.try_wait() {
                self.exited = Some(st);
            }
        }
        self.exited
    }

    /// SIGTERM, wait up to `grace`, then SIGKILL. Blocks the calling thread.
    pub fn stop(&mut self, grace: Duration) -> Result<Stopped> {
        let start = Instant::now();
        if let Some(status) = self.exited() {
            return Ok(Stopped {
                status,
                killed: false,
                took: Duration::ZERO,
            });
        }
        let pid = Pid::from_raw(i32::try_from(self.pid()).context("pid out of range")?);
        // ESRCH only means it is already gone; try_wait below tells.
        let _ = kill(pid, Signal::SIGTERM);
        while start.elapsed() < grace {
            if let Some(status) = self.exited() {
                return Ok(Stopped {
                    status,
                    killed: false,
                    took: start.elapsed(),
                });
            }
            sleep(Duration::from_millis(5));
        }
        self.child
            .kill()
            .with_context(|| format!("{}: SIGKILL", self.name))?;
        let status = self
            .child
            .wait()
            .with_context(|| format!("{}: waiting after SIGKILL", self.name))?;
        self.exited = Some(status);
        Ok(Stopped {
            status,
            killed: true,
            took: start.elapsed(),
        })
    }

    /// The last `n` lines of the process's output, for error messages.
    pub fn log_tail(&self, n: usize) -> String {
        log_tail(&self.log, n)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.exited().is_none() {
            if let Err(e) = self.stop(Duration::from_secs(10)) {
                eprintln!(
                    "bench: could not stop {} (pid {}): {e:#}",
                    self.name,
                    self.pid()
                );
            }
        }
    }
}

pub fn log_tail(path: &Path, n: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let lines: Vec<&str> = text.lines().collect();
            let from = lines.len().saturating_sub(n);
            lines[from..].join("\n")
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

/// Runtime processes that hearth started: killed on drop if hearth left any behind. Declare it before
/// the hearth `Proc` so that it is dropped after hearth had its chance to stop them.
#[derive(Default)]
pub struct Reaper {
    pids: Vec<u32>,
}

impl Reaper {
    pub fn watch(&mut self, pid: u32) {
        if !self.pids.contains(&pid) {
            self.pids.push(pid);
        }
    }

    /// Pids we saw that still run a llama-server.
    pub fn survivors(&self) -> Vec<u32> {
        self.pids
            .iter()
            .copied()
            .filter(|&pid| is_llama_server(pid))
            .collect()
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        for pid in self.survivors() {
            eprintln!("bench: runtime pid {pid} outlived hearth; sending SIGKILL");
            if let Ok(raw) = i32::try_from(pid) {
                let _ = kill(Pid::from_raw(raw), Signal::SIGKILL);
            }
        }
    }
}

fn is_llama_server(pid: u32) -> bool {
    // A zombie has an empty cmdline, so only live processes match.
    cmdline(pid)
        .map(|argv| argv.first().is_some_and(|a| a.contains("llama-server")))
        .unwrap_or(false)
}

pub fn cmdline(pid: u32) -> Result<Vec<String>> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline"))
        .with_context(|| format!("reading /proc/{pid}/cmdline"))?;
    Ok(raw
        .split(|&b| b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect())
}

/// (VmRSS, VmHWM) in KiB.
pub fn rss_kib(pid: u32) -> Result<(u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let field = |name: &str| -> Result<u64> {
        let line = text
            .lines()
            .find(|l| l.starts_with(name))
            .with_context(|| format!("/proc/{pid}/status has no {name}"))?;
        let kib = line[name.len()..]
            .split_whitespace()
            .next()
            .with_context(|| format!("malformed {line:?}"))?;
        kib.parse::<u64>()
            .with_context(|| format!("malformed {line:?}"))
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

/// User + system CPU time of a process, in seconds.
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // The command name may contain spaces and parentheses: fields start after the last ')'.
    let rest = text
        .rsplit_once(')')
        .map(|(_, r)| r)
        .with_context(|| format!("malformed /proc/{pid}/stat"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    let ticks = |i: usize| -> Result<u64> {
        fields
            .get(i)
            .with_context(|| format!("short /proc/{pid}/stat"))?
            .parse::<u64>()
            .with_context(|| format!("malformed /proc/{pid}/stat"))
    };
    // USER_HZ, the unit of /proc/<pid>/stat times, is 100 on Linux whatever the kernel's HZ.
    Ok((ticks(11)? + ticks(12)?) as f64 / 100.0)
}

pub fn free_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("binding a free loopback port")?;
    Ok(l.local_addr().context("local_addr")?.port())
}

/// `n` consecutive loopback ports that are free right now (for `server.runtime_ports`).
pub fn free_port_range(n: u16) -> Result<(u16, u16)> {
    let seed = u16::try_from(std::process::id() % 500).unwrap_or(0);
    for attempt in 0..200u16 {
        let lo = 30000 + ((seed + attempt * 37) % 500) * 50;
        let hi = lo + n - 1;
        if (lo..=hi).all(|p| TcpListener::bind(("127.0.0.1", p)).is_ok()) {
            return Ok((lo, hi));
        }
    }
    bail!("no {n} consecutive free loopback ports found")
}
