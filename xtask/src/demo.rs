//! `cargo xtask demo`: hearth fronting two models that do not fit in memory together.
//!
//! Sets up the dev layout, builds hearth in release mode, runs `hearth run --config models/demo.toml`,
//! runs models/demo_client.py against it (cold start, a request held while the other model streams, the
//! swap, `hearth status`), then stops hearth with SIGTERM and checks that no llama-server it started is
//! left behind.

use std::collections::{BTreeSet, HashMap};
use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::setup;
use crate::util::{self, cargo, Dev};

pub fn run(dev: &Dev) -> Result<()> {
    setup::run(dev)?;
    let root = &dev.root;

    let t = util::step("cargo build --release -p hearth");
    util::run(
        "build",
        cargo()
            .current_dir(root)
            .args(["build", "--release", "-p", "hearth"]),
    )?;
    util::done("build", t, "ok");
    let hearth = root.join("target/release/hearth");

    let config = config_for(dev)?;
    let listen = listen_of(&config)?;
    // A clear message instead of a daemon that dies on a busy port.
    drop(TcpListener::bind(&listen).with_context(|| {
        format!(
            "demo: {listen} (server.listen in {}) is busy; is another hearth running?",
            config.display()
        )
    })?);

    let log_path = dev.dir.join("demo-hearth.log");
    let log = fs::File::create(&log_path)
        .with_context(|| format!("demo: cannot create {}", log_path.display()))?;
    let log2 = log
        .try_clone()
        .with_context(|| format!("demo: cannot reopen {}", log_path.display()))?;
    eprintln!(
        "xtask: demo: starting `{} run --config {}` (log: {})",
        hearth.display(),
        config.display(),
        log_path.display()
    );
    let child = Command::new(&hearth)
        .arg("run")
        .arg("--config")
        .arg(&config)
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
        )
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        .spawn()
        .with_context(|| format!("demo: cannot start {}", hearth.display()))?;
    let mut daemon = Daemon { child };
    let hearth_pid = daemon.child.id();

    let pids_file = dev.dir.join("demo-pids.json");
    let _ = fs::remove_file(&pids_file);
    println!();
    let client_status = util::status(
        "demo client",
        Command::new(dev.python())
            .arg(root.join("models/demo_client.py"))
            .arg("--url")
            .arg(format!("http://{listen}"))
            .arg("--hearth-bin")
            .arg(&hearth)
            .arg("--config")
            .arg(&config)
            .arg("--pids-out")
            .arg(&pids_file),
    )?;
    println!();

    // Every runtime hearth started: the pids the client saw in /hearth/v1/status, and the daemon's
    // descendants right now.
    let mut runtimes: BTreeSet<u32> = descendants(hearth_pid);
    if let Ok(text) = fs::read_to_string(&pids_file) {
        runtimes.extend(
            text.trim_matches(|c: char| c == '[' || c == ']' || c.is_whitespace())
                .split(',')
                .filter_map(|s| s.trim().parse::<u32>().ok()),
        );
    }

    println!("Stopping hearth (pid {hearth_pid}) with SIGTERM...");
    let t = Instant::now();
    let exit = daemon.terminate(Duration::from_secs(30))?;
    println!(
        "  hearth exited in {:.2} s: {}",
        t.elapsed().as_secs_f64(),
        exit.map_or("did not exit within 30 s; killed".to_string(), |s| s
            .to_string())
    );
    let left: Vec<u32> = runtimes
        .iter()
        .copied()
        .filter(|&p| is_live_llama_server(p))
        .collect();
    let mut problems = Vec::new();
    if left.is_empty() {
        println!(
            "  no llama-server left behind (checked {} runtime pid(s): {:?})",
            runtimes.len(),
            runtimes
        );
    } else {
        for p in &left {
            let _ = kill(Pid::from_raw(*p as i32), Signal::SIGKILL);
        }
        problems.push(format!(
            "llama-server process(es) {left:?} outlived hearth (killed them now)"
        ));
    }
    match exit {
        Some(s) if s.success() => {}
        Some(s) => problems.push(format!("hearth exited with {s} after SIGTERM (expected 0)")),
        None => problems.push("hearth did not exit within 30 s of SIGTERM".into()),
    }
    if !client_status.success() {
        problems.push(format!(
            "the demo client failed ({client_status}); hearth's log: {}",
            log_path.display()
        ));
    }
    if !problems.is_empty() {
        bail!("demo: {}", problems.join("; "));
    }
    println!("demo: done (hearth's log: {})", log_path.display());
    Ok(())
}

/// The demo configuration: models/demo.toml for the default dev dir, else a copy of it in the dev dir
/// whose `../.hearth-dev/` paths point at `$HEARTH_DEV_DIR`.
fn config_for(dev: &Dev) -> Result<PathBuf> {
    let base = dev.root.join("models/demo.toml");
    if dev.is_default() {
        return Ok(base);
    }
    let text = fs::read_to_string(&base)
        .with_context(|| format!("demo: cannot read {}", base.display()))?;
    let dir = dev.dir.to_string_lossy();
    if dir.contains('"') || dir.contains('\\') {
        bail!("demo: HEARTH_DEV_DIR {dir} contains a quote or backslash; pick a plain path");
    }
    let derived = text.replace("\"../.hearth-dev/", &format!("\"{dir}/"));
    let path = dev.dir.join("demo.toml");
    util::write_atomic(&path, derived.as_bytes())?;
    eprintln!(
        "xtask: demo: HEARTH_DEV_DIR is set; using {} (a copy of {} with absolute paths)",
        path.display(),
        base.display()
    );
    Ok(path)
}

/// `server.listen` of a configuration (the demo's is a plain `listen = "host:port"` line).
fn listen_of(config: &Path) -> Result<String> {
    let text = fs::read_to_string(config)
        .with_context(|| format!("demo: cannot read {}", config.display()))?;
    text.lines()
        .map(str::trim)
        .find_map(|l| {
            let v = l.strip_prefix("listen")?.trim_start().strip_prefix('=')?;
            Some(v.trim().trim_matches('"').to_string())
        })
        .with_context(|| format!("demo: no `listen = \"host:port\"` in {}", config.display()))
}

/// The daemon; stopped (SIGTERM, then SIGKILL) on every path out of `run`.
struct Daemon {
    child: Child,
}

impl Daemon {
    /// SIGTERM, then wait up to `grace`; SIGKILL after that. `None` if it had to be killed.
    fn terminate(&mut self, grace: Duration) -> Result<Option<ExitStatus>> {
        if let Some(s) = self.child.try_wait().context("demo: waiting for hearth")? {
            return Ok(Some(s));
        }
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Some(s) = self.child.try_wait().context("demo: waiting for hearth")? {
                return Ok(Some(s));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        Ok(None)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.terminate(Duration::from_secs(15));
        }
    }
}

/// All live descendants of `pid`, from /proc/*/stat.
fn descendants(pid: u32) -> BTreeSet<u32> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    if let Ok(entries) = fs::read_dir("/proc") {
        for e in entries.flatten() {
            let Some(p) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            if let Some(pp) = ppid(p) {
                children.entry(pp).or_default().push(p);
            }
        }
    }
    let mut out = BTreeSet::new();
    let mut stack = vec![pid];
    while let Some(p) = stack.pop() {
        for &c in children.get(&p).into_iter().flatten() {
            if out.insert(c) {
                stack.push(c);
            }
        }
    }
    out
}

/// Parent pid and state from /proc/PID/stat ("pid (comm) state ppid ...").
fn stat(pid: u32) -> Option<(char, u32)> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 1..];
    let mut it = rest.split_whitespace();
    let state = it.next()?.chars().next()?;
    let ppid = it.next()?.parse().ok()?;
    Some((state, ppid))
}

fn ppid(pid: u32) -> Option<u32> {
    stat(pid).map(|(_, p)| p)
}

/// A process that still exists (not a zombie) and runs llama-server.
fn is_live_llama_server(pid: u32) -> bool {
    match stat(pid) {
        Some((state, _)) if state != 'Z' && state != 'X' => {
            fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains("llama-server"))
                .unwrap_or(false)
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("xtask-test-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).expect("create scratch dir");
        d
    }

    #[test]
    fn listen_is_read_from_the_shipped_demo_config() {
        let cfg = util::repo_root().join("models/demo.toml");
        let listen = listen_of(&cfg).expect("listen");
        assert!(listen.parse::<std::net::SocketAddr>().is_ok(), "{listen:?}");
    }

    #[test]
    fn derived_config_points_at_the_dev_dir() {
        let dir = scratch("derived");
        let dev = Dev {
            root: util::repo_root(),
            dir: dir.clone(),
        };
        let path = config_for(&dev).expect("derived config");
        assert_eq!(path, dir.join("demo.toml"));
        let text = fs::read_to_string(&path).expect("read derived");
        assert!(!text.contains("\"../.hearth-dev/"), "{text}");
        assert!(text.contains(&format!("\"{}/models/gen-300m.gguf\"", dir.display())));
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn descendants_of_this_process_include_a_child() {
        let mut child = Command::new("sleep").arg("5").spawn().expect("spawn sleep");
        let found = descendants(std::process::id()).contains(&child.id());
        let _ = child.kill();
        let _ = child.wait();
        assert!(found);
        assert!(!is_live_llama_server(child.id()));
    }
}
