//! Confinement of runtimes in cgroups (issue 3): one cgroup per runtime, with limits, stats, OOM
//! counting, kill-everything and removal.
//!
//! Two implementations sit behind [`CgroupManager`]:
//!
//! - [`V2Manager`]: the unified hierarchy (Ubuntu 22.04+ with systemd). Runtimes live under hearth's
//!   own cgroup (`<own>/runtimes/<name>`; under systemd with `Delegate=yes` that is the service's
//!   delegated subtree, e.g. `hearth.service/runtimes/<model>`). A process that sits in the root
//!   cgroup uses `<root>/<base_name>/runtimes/<name>`.
//! - [`V1Manager`]: legacy/hybrid hosts (such as the development machines, see
//!   `shared/notes/machine.md`): one directory per controller (memory, cpu, cpuacct, pids, freezer,
//!   and cpuset when a cpuset is asked for), each at `<mount>/<own path>/<base_name>/runtimes/<name>`,
//!   which is `/sys/fs/cgroup/<controller>/hearth/runtimes/<name>` for a process in the root cgroup.
//!
//! [`detect`] picks one from `/proc/self/mountinfo` and `/proc/self/cgroup` and says why.
//!
//! Everything is plain file I/O on cgroupfs (as youki and runc do) rather than `cgroups-rs`: its
//! hierarchies are bound to fixed mount points (`hierarchies::auto()` picks v1 on a hybrid host and
//! cannot be pointed at a nested base or at a fake tree for tests), its `add_task` moves a process
//! after it started (we join before exec), and `Cgroup::kill` is v2-only. The operations needed here are
//! a handful of files per version, which the unit tests exercise against a fake tree.
//!
//! Nothing here blocks for long except [`RuntimeCgroup::kill_all`] (v1 freeze) and
//! [`RuntimeCgroup::wait_empty`], which poll every 10 ms: call them from `spawn_blocking`.

use std::collections::BTreeSet;
use std::ffi::CString;
use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Which cgroup hierarchy a manager drives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hierarchy {
    V1,
    V2,
}

impl fmt::Display for Hierarchy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Hierarchy::V1 => "cgroup v1",
            Hierarchy::V2 => "cgroup v2",
        })
    }
}

/// A CFS bandwidth limit: `quota_us` of CPU time per `period_us` (200000/100000 = two CPUs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpuQuota {
    pub quota_us: u64,
    pub period_us: u64,
}

/// The limits of one runtime's cgroup. `None` leaves the kernel default (unlimited).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Limits {
    pub memory_max_bytes: Option<u64>,
    /// v2 `cpu.weight` semantics (1..=10000, default 100); on v1 written as
    /// `cpu.shares = weight * 1024 / 100` (systemd's conversion).
    pub cpu_weight: Option<u64>,
    pub cpu_quota: Option<CpuQuota>,
    pub pids_max: Option<u64>,
    /// A cpu list such as `"0-3,6"`.
    pub cpuset: Option<String>,
}

/// What a runtime's cgroup reports. `None`: the kernel does not expose it here (e.g. `memory.peak`
/// before Linux 5.19, or a controller missing from the hierarchy).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Stats {
    pub memory_current_bytes: Option<u64>,
    pub memory_peak_bytes: Option<u64>,
    /// `None` also when unlimited.
    pub memory_limit_bytes: Option<u64>,
    pub cpu_usage_seconds: Option<f64>,
    pub pids_current: Option<u64>,
    /// Processes the kernel OOM-killed in this cgroup (v2 `memory.events` `oom_kill`; v1
    /// `memory.oom_control` `oom_kill`). Not `memory.failcnt`, which counts reclaim, not kills.
    pub oom_kills: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("cannot determine the cgroup setup: {0}")]
    Detect(String),
    #[error("cgroup {cgroup}: {op} {path}: {source}")]
    Io {
        cgroup: String,
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cgroup {cgroup}: cannot parse {path} ({content:?})")]
    Parse {
        cgroup: String,
        path: PathBuf,
        content: String,
    },
    #[error(
        "cgroup {cgroup}: controller {controller} is not available at {path} (available: {available})"
    )]
    ControllerUnavailable {
        cgroup: String,
        controller: &'static str,
        path: PathBuf,
        available: String,
    },
    #[error("invalid cgroup name {name:?}: {why}")]
    InvalidName { name: String, why: &'static str },
    #[error("cgroup {cgroup}: {path} already holds processes {pids:?}")]
    Busy {
        cgroup: String,
        path: PathBuf,
        pids: Vec<u32>,
    },
    #[error("cgroup {cgroup}: processes {pids:?} still present after {waited:?}")]
    NotEmpty {
        cgroup: String,
        pids: Vec<u32>,
        waited: Duration,
    },
}

/// Creates, finds and cleans up runtime cgroups under hearth's base.
pub trait CgroupManager: Send + Sync + fmt::Debug {
    fn kind(&self) -> Hierarchy;
    /// The base directories (one for v2, one per controller for v1), for logs and status.
    fn base_dirs(&self) -> Vec<PathBuf>;
    /// Creates (or reuses, if it exists and is empty) the cgroup `name` under the base and applies
    /// `limits`. Fails if a controller a limit needs is missing, or if the cgroup holds processes.
    fn create(&self, name: &str, limits: &Limits) -> Result<RuntimeCgroup, CgroupError>;
    /// A handle on an existing cgroup `name` (no limits touched).
    fn open(&self, name: &str) -> Result<RuntimeCgroup, CgroupError>;
    /// Names of the runtime cgroups present under the base.
    fn list(&self) -> Result<Vec<String>, CgroupError>;
    /// The controllers runtime cgroups can use here (v2: those of the anchor's
    /// `cgroup.controllers`, i.e. delegated to hearth; v1: the mounted hierarchies).
    fn controllers(&self) -> Vec<String>;

    /// Kills and removes every runtime cgroup under the base (left by a previous instance that
    /// crashed or was `kill -9`ed) and returns their names. Call it at start, before any spawn.
    fn cleanup_leftovers(&self) -> Result<Vec<String>, CgroupError> {
        let mut removed = Vec::new();
        for name in self.list()? {
            let cg = self.open(&name)?;
            cg.kill_all()?;
            cg.wait_empty(Duration::from_secs(5))?;
            cg.remove()?;
            removed.push(name);
        }
        Ok(removed)
    }
}

/// The `cgroup.procs` files a child writes its own pid into before exec, as C strings prepared
/// before `fork`, so that joining allocates nothing. See [`join_self`].
#[derive(Clone, Debug)]
pub struct JoinPlan {
    procs: Vec<CString>,
}

impl JoinPlan {
    fn new(cgroup: &str, files: &[PathBuf]) -> Result<Self, CgroupError> {
        let mut procs = Vec::with_capacity(files.len());
        for f in files {
            let c =
                CString::new(f.as_os_str().as_bytes()).map_err(|_| CgroupError::InvalidName {
                    name: cgroup.to_string(),
                    why: "path contains a NUL byte",
                })?;
            procs.push(c);
        }
        Ok(Self { procs })
    }

    pub fn files(&self) -> impl Iterator<Item = &std::ffi::CStr> {
        self.procs.iter().map(|c| c.as_c_str())
    }
}

/// Moves the calling process into every cgroup of `plan`. Meant for a `pre_exec` closure:
///
/// ```ignore
/// let plan = cgroup.join_plan().clone();
/// unsafe { cmd.pre_exec(move || hearth::cgroup::join_self(&plan)) };
/// ```
///
/// Soundness: between `fork` and `exec` of a multi-threaded parent only async-signal-safe functions
/// may run (another thread may have held the allocator lock at fork time). This function allocates
/// nothing and calls only `getpid`, `open`, `write` and `close` (all async-signal-safe per POSIX /
/// signal-safety(7)); the paths are C strings built before fork, the pid digits are formatted into
/// a stack buffer, and errors are built from `errno` (`io::Error::last_os_error` and
/// `io::Error::from(ErrorKind)` do not allocate). It must run while the process is still root
/// (joining needs write access to `cgroup.procs`): note that std's `Command::uid`/`gid` are applied
/// *before* `pre_exec` closures, so drop privileges in the same closure after joining instead.
pub fn join_self(plan: &JoinPlan) -> io::Result<()> {
    // SAFETY: getpid has no preconditions and is async-signal-safe.
    let pid = unsafe { libc::getpid() };
    let mut buf = [0u8; 20];
    let digits = format_u32(pid as u32, &mut buf);
    for path in &plan.procs {
        // SAFETY: `path` is a valid NUL-terminated string owned by `plan` for the whole call.
        let fd = unsafe { libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `digits` is a valid initialized slice; `fd` is the descriptor opened above.
        let n = unsafe { libc::write(fd, digits.as_ptr().cast(), digits.len()) };
        let err = if n < 0 {
            Some(io::Error::last_os_error())
        } else if n as usize != digits.len() {
            Some(io::Error::from(io::ErrorKind::WriteZero))
        } else {
            None
        };
        // SAFETY: `fd` is ours and closed exactly once.
        unsafe { libc::close(fd) };
        if let Some(e) = err {
            return Err(e);
        }
    }
    Ok(())
}

/// Formats `n` in decimal into the end of `buf`, without allocating.
fn format_u32(mut n: u32, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    &buf[i..]
}

#[derive(Clone, Debug)]
enum Layout {
    V2 {
        dir: PathBuf,
    },
    V1 {
        /// (controller, directory); several controllers may share a directory (co-mounted).
        dirs: Vec<(&'static str, PathBuf)>,
    },
}

/// The cgroup of one runtime.
#[derive(Clone, Debug)]
pub struct RuntimeCgroup {
    name: String,
    layout: Layout,
    join: JoinPlan,
    /// Shared by the clones of one handle: two freeze/kill/thaw sequences at once (a stop's kill
    /// and the exit's cleanup) would thaw each other's freeze.
    kill_lock: std::sync::Arc<std::sync::Mutex<()>>,
}

impl RuntimeCgroup {
    fn new(name: &str, layout: Layout) -> Result<Self, CgroupError> {
        let files: Vec<PathBuf> = match &layout {
            Layout::V2 { dir } => vec![dir.join("cgroup.procs")],
            Layout::V1 { .. } => unique_dirs(&layout)
                .into_iter()
                .map(|d| d.join("cgroup.procs"))
                .collect(),
        };
        let join = JoinPlan::new(name, &files)?;
        Ok(Self {
            name: name.to_string(),
            layout,
            join,
            kill_lock: Default::default(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn kind(&self) -> Hierarchy {
        match self.layout {
            Layout::V2 { .. } => Hierarchy::V2,
            Layout::V1 { .. } => Hierarchy::V1,
        }
    }

    /// The cgroup's directories (one for v2; one per distinct v1 mount).
    pub fn dirs(&self) -> Vec<PathBuf> {
        unique_dirs(&self.layout)
    }

    /// The directory of `controller` (v1), or the cgroup directory (v2).
    pub fn dir_of(&self, controller: &str) -> Option<&Path> {
        match &self.layout {
            Layout::V2 { dir } => Some(dir),
            Layout::V1 { dirs } => dirs
                .iter()
                .find(|(c, _)| *c == controller)
                .map(|(_, d)| d.as_path()),
        }
    }

    /// What a child passes to [`join_self`] in `pre_exec`.
    pub fn join_plan(&self) -> &JoinPlan {
        &self.join
    }

    /// The processes (thread-group ids) in the cgroup, from every directory, deduplicated.
    pub fn pids(&self) -> Result<Vec<u32>, CgroupError> {
        let mut all = BTreeSet::new();
        for dir in self.dirs() {
            all.extend(read_pids(&self.name, &dir.join("cgroup.procs"))?);
        }
        Ok(all.into_iter().collect())
    }

    /// Kills every process of the cgroup, forks in flight included. v2: `cgroup.kill` (Linux 5.14+;
    /// before that, freeze/kill/thaw via `cgroup.freeze`). v1: freeze with the freezer so nothing can
    /// fork, SIGKILL every pid, thaw (the kills are delivered on thaw); if the freezer cannot freeze
    /// within 2 s, thaw and kill without it, round after round. Returns once the signals are
    /// sent; use [`wait_empty`](Self::wait_empty) to wait for the exits. Calls through clones of one
    /// handle are serialized (a stop and the exit cleanup may kill at the same time).
    pub fn kill_all(&self) -> Result<(), CgroupError> {
        // A poisoned lock only means another kill panicked; the sequence below is still safe.
        let _serialized = self
            .kill_lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match &self.layout {
            Layout::V2 { dir } => {
                let kill_file = dir.join("cgroup.kill");
                if kill_file.exists() {
                    return write_file(&self.name, &kill_file, "1");
                }
                let freeze = dir.join("cgroup.freeze");
                if freeze.exists() {
                    write_file(&self.name, &freeze, "1")?;
                    let r = self.sigkill_all(&dir.join("cgroup.procs"));
                    write_file(&self.name, &freeze, "0")?;
                    return r;
                }
                self.sigkill_loop()
            }
            Layout::V1 { dirs } => {
                let Some((_, fdir)) = dirs.iter().find(|(c, _)| *c == "freezer") else {
                    return self.sigkill_loop();
                };
                let state = fdir.join("freezer.state");
                write_file(&self.name, &state, "FROZEN")?;
                let started = Instant::now();
                let limit = Duration::from_secs(2);
                loop {
                    let s = read_file(&self.name, &state)?;
                    if s.trim() == "FROZEN" {
                        break;
                    }
                    if started.elapsed() > limit {
                        // A task the freezer cannot stop (seen on a loaded host: FREEZING for
                        // seconds) must not save the cgroup from being killed: thaw, then kill
                        // without the freezer, round after round, until nothing is left.
                        tracing::warn!(cgroup = %self.name, state = s.trim(), waited = ?limit, "the freezer did not freeze the cgroup; killing without it");
                        write_file(&self.name, &state, "THAWED")?;
                        return self.sigkill_loop();
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                let r = self.sigkill_all(&fdir.join("cgroup.procs"));
                let thaw = write_file(&self.name, &state, "THAWED");
                r.and(thaw)
            }
        }
    }

    fn sigkill_all(&self, procs: &Path) -> Result<(), CgroupError> {
        for pid in read_pids(&self.name, procs)? {
            match kill(Pid::from_raw(pid as i32), Signal::SIGKILL) {
                Ok(()) | Err(Errno::ESRCH) => {}
                Err(e) => {
                    return Err(CgroupError::Io {
                        cgroup: self.name.clone(),
                        op: "SIGKILL a process of",
                        path: procs.to_path_buf(),
                        source: io::Error::from(e),
                    })
                }
            }
        }
        Ok(())
    }

    /// Without a freezer: kill what is there until nothing is left (a fork can race one round).
    fn sigkill_loop(&self) -> Result<(), CgroupError> {
        for _ in 0..50 {
            let dirs = self.dirs();
            let Some(dir) = dirs.first() else {
                return Ok(());
            };
            let procs = dir.join("cgroup.procs");
            if read_pids(&self.name, &procs)?.is_empty() {
                return Ok(());
            }
            self.sigkill_all(&procs)?;
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    /// Waits until no process is left in the cgroup (polls every 10 ms).
    pub fn wait_empty(&self, timeout: Duration) -> Result<(), CgroupError> {
        let started = Instant::now();
        loop {
            let pids = self.pids()?;
            if pids.is_empty() {
                return Ok(());
            }
            if started.elapsed() >= timeout {
                return Err(CgroupError::NotEmpty {
                    cgroup: self.name.clone(),
                    pids,
                    waited: started.elapsed(),
                });
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Removes the (empty) cgroup directories. Retries `EBUSY` for up to a second: an exited
    /// process can still pin the cgroup until it is reaped. A directory already gone is fine.
    pub fn remove(&self) -> Result<(), CgroupError> {
        for dir in self.dirs() {
            let started = Instant::now();
            loop {
                match fs::remove_dir(&dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                    Err(e)
                        if e.raw_os_error() == Some(libc::EBUSY)
                            && started.elapsed() < Duration::from_secs(1) =>
                    {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    Err(source) => {
                        return Err(CgroupError::Io {
                            cgroup: self.name.clone(),
                            op: "remove",
                            path: dir,
                            source,
                        })
                    }
                }
            }
        }
        Ok(())
    }

    /// Current usage, peak, limit, CPU time, pids and OOM kills.
    pub fn stats(&self) -> Result<Stats, CgroupError> {
        let n = &self.name;
        match &self.layout {
            Layout::V2 { dir } => {
                let cpu = read_opt(n, &dir.join("cpu.stat"))?
                    .and_then(|s| keyed(&s, "usage_usec"))
                    .map(|us| us as f64 / 1e6);
                let oom =
                    read_opt(n, &dir.join("memory.events"))?.and_then(|s| keyed(&s, "oom_kill"));
                Ok(Stats {
                    memory_current_bytes: read_u64_opt(n, &dir.join("memory.current"))?,
                    memory_peak_bytes: read_u64_opt(n, &dir.join("memory.peak"))?,
                    memory_limit_bytes: read_u64_opt(n, &dir.join("memory.max"))?,
                    cpu_usage_seconds: cpu,
                    pids_current: read_u64_opt(n, &dir.join("pids.current"))?,
                    oom_kills: oom,
                })
            }
            Layout::V1 { .. } => {
                let mut st = Stats::default();
                if let Some(m) = self.dir_of("memory") {
                    st.memory_current_bytes = read_u64_opt(n, &m.join("memory.usage_in_bytes"))?;
                    st.memory_peak_bytes = read_u64_opt(n, &m.join("memory.max_usage_in_bytes"))?;
                    // v1 reports "unlimited" as a huge page-rounded number.
                    st.memory_limit_bytes = read_u64_opt(n, &m.join("memory.limit_in_bytes"))?
                        .filter(|&v| v < (1 << 62));
                    st.oom_kills = read_opt(n, &m.join("memory.oom_control"))?
                        .and_then(|s| keyed(&s, "oom_kill"));
                }
                if let Some(c) = self.dir_of("cpuacct") {
                    st.cpu_usage_seconds =
                        read_u64_opt(n, &c.join("cpuacct.usage"))?.map(|ns| ns as f64 / 1e9);
                }
                if let Some(p) = self.dir_of("pids") {
                    st.pids_current = read_u64_opt(n, &p.join("pids.current"))?;
                }
                Ok(st)
            }
        }
    }

    /// The file whose changes signal an OOM kill: v2 `memory.events` (poll it for `POLLPRI`/inotify
    /// `IN_MODIFY`, then re-read `oom_kill`); v1 `memory.oom_control` (register an eventfd through
    /// `cgroup.event_control`, see [`RuntimeCgroup::register_oom_eventfd`]).
    pub fn oom_notify_file(&self) -> Option<PathBuf> {
        match &self.layout {
            Layout::V2 { dir } => Some(dir.join("memory.events")),
            Layout::V1 { .. } => self.dir_of("memory").map(|d| d.join("memory.oom_control")),
        }
    }

    /// v1 only: an eventfd that becomes readable (8-byte counter) on every OOM in the cgroup.
    /// Returns `None` on v2 (watch `memory.events` instead).
    pub fn register_oom_eventfd(&self) -> Result<Option<std::os::fd::OwnedFd>, CgroupError> {
        use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
        let Layout::V1 { .. } = &self.layout else {
            return Ok(None);
        };
        let Some(mem) = self.dir_of("memory") else {
            return Ok(None);
        };
        let control_path = mem.join("memory.oom_control");
        let control = fs::File::open(&control_path).map_err(|source| CgroupError::Io {
            cgroup: self.name.clone(),
            op: "open",
            path: control_path.clone(),
            source,
        })?;
        // SAFETY: plain syscall; the result is checked and owned below.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if efd < 0 {
            return Err(CgroupError::Io {
                cgroup: self.name.clone(),
                op: "eventfd for",
                path: control_path,
                source: io::Error::last_os_error(),
            });
        }
        // SAFETY: `efd` is a fresh descriptor nobody else owns.
        let efd = unsafe { OwnedFd::from_raw_fd(efd) };
        write_file(
            &self.name,
            &mem.join("cgroup.event_control"),
            &format!("{} {}", efd.as_raw_fd(), control.as_raw_fd()),
        )?;
        Ok(Some(efd))
    }
}

fn unique_dirs(layout: &Layout) -> Vec<PathBuf> {
    match layout {
        Layout::V2 { dir } => vec![dir.clone()],
        Layout::V1 { dirs } => {
            let mut out: Vec<PathBuf> = Vec::new();
            for (_, d) in dirs {
                if !out.contains(d) {
                    out.push(d.clone());
                }
            }
            out
        }
    }
}

pub fn validate_name(name: &str) -> Result<(), CgroupError> {
    let bad = |why| {
        Err(CgroupError::InvalidName {
            name: name.to_string(),
            why,
        })
    };
    if name.is_empty() || name.len() > 200 {
        return bad("must be 1 to 200 bytes long");
    }
    if name == "." || name == ".." {
        return bad("must not be . or ..");
    }
    if name.starts_with("cgroup.") {
        return bad("must not start with \"cgroup.\"");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"._-:@+".contains(&b))
    {
        return bad("only ASCII letters, digits and . _ - : @ + are allowed");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// file helpers

fn io_err(cgroup: &str, op: &'static str, path: &Path, source: io::Error) -> CgroupError {
    CgroupError::Io {
        cgroup: cgroup.to_string(),
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `content` with one `write` call (cgroupfs parses each write as one value). The file
/// must exist: control files are never created.
fn write_file(cgroup: &str, path: &Path, content: &str) -> Result<(), CgroupError> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)
        .map_err(|e| io_err(cgroup, "open for writing", path, e))?;
    f.write_all(content.as_bytes())
        .map_err(|e| io_err(cgroup, "write", path, e))
}

fn read_file(cgroup: &str, path: &Path) -> Result<String, CgroupError> {
    fs::read_to_string(path).map_err(|e| io_err(cgroup, "read", path, e))
}

fn read_opt(cgroup: &str, path: &Path) -> Result<Option<String>, CgroupError> {
    match fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(cgroup, "read", path, e)),
    }
}

/// A single number; `max` (v2 unlimited) and a missing file are `None`.
fn read_u64_opt(cgroup: &str, path: &Path) -> Result<Option<u64>, CgroupError> {
    let Some(s) = read_opt(cgroup, path)? else {
        return Ok(None);
    };
    let t = s.trim();
    if t == "max" {
        return Ok(None);
    }
    t.parse().map(Some).map_err(|_| CgroupError::Parse {
        cgroup: cgroup.to_string(),
        path: path.to_path_buf(),
        content: t.chars().take(100).collect(),
    })
}

/// The value of `key` in a flat-keyed file (`key value` lines).
fn keyed(content: &str, key: &str) -> Option<u64> {
    content.lines().find_map(|l| {
        let mut it = l.split_whitespace();
        (it.next() == Some(key)).then(|| it.next()?.parse().ok())?
    })
}

fn read_pids(cgroup: &str, procs: &Path) -> Result<Vec<u32>, CgroupError> {
    let s = match fs::read_to_string(procs) {
        Ok(s) => s,
        // The cgroup is gone: nobody is in it.
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err(cgroup, "read", procs, e)),
    };
    s.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            l.trim().parse().map_err(|_| CgroupError::Parse {
                cgroup: cgroup.to_string(),
                path: procs.to_path_buf(),
                content: l.to_string(),
            })
        })
        .collect()
}

fn create_dir(cgroup: &str, dir: &Path) -> Result<(), CgroupError> {
    match fs::create_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(io_err(cgroup, "create", dir, e)),
    }
}

fn list_dirs(dir: &Path) -> Result<Vec<String>, CgroupError> {
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err("-", "list", dir, e)),
    };
    let mut out = Vec::new();
    for entry in rd {
        let entry = entry.map_err(|e| io_err("-", "list", dir, e))?;
        let is_dir = entry
            .file_type()
            .map_err(|e| io_err("-", "stat an entry of", dir, e))?
            .is_dir();
        if is_dir {
            if let Some(n) = entry.file_name().to_str() {
                out.push(n.to_string());
            }
        }
    }
    out.sort();
    Ok(out)
}

fn ensure_empty(cgroup: &str, dir: &Path) -> Result<(), CgroupError> {
    let pids = read_pids(cgroup, &dir.join("cgroup.procs"))?;
    if pids.is_empty() {
        Ok(())
    } else {
        Err(CgroupError::Busy {
            cgroup: cgroup.to_string(),
            path: dir.to_path_buf(),
            pids,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// v2

/// The unified hierarchy.
#[derive(Debug, Clone)]
pub struct V2Manager {
    /// The cgroup the subtree is hung from: hearth's own cgroup, or the hierarchy's root. Controllers
    /// are enabled from here down.
    anchor: PathBuf,
    /// Where runtime cgroups are created (`anchor/runtimes` or `root/<base>/runtimes`).
    base: PathBuf,
}

impl V2Manager {
    /// `anchor` must be an existing cgroup directory, `base` a directory below it.
    pub fn new(anchor: impl Into<PathBuf>, base: impl Into<PathBuf>) -> Self {
        Self {
            anchor: anchor.into(),
            base: base.into(),
        }
    }

    pub fn base(&self) -> &Path {
        &self.base
    }

    /// Creates the directories from the anchor down to the base and enables the controllers the
    /// runtime cgroups need in each `cgroup.subtree_control`.
    fn ensure_base(&self, name: &str, required: &[&'static str]) -> Result<(), CgroupError> {
        let rel = self
            .base
            .strip_prefix(&self.anchor)
            .unwrap_or(Path::new(""));
        let mut chain = vec![self.anchor.clone()];
        let mut cur = self.anchor.clone();
        for c in rel.components() {
            cur.push(c);
            chain.push(cur.clone());
        }
        for (i, dir) in chain.iter().enumerate() {
            if i > 0 {
                create_dir(name, dir)?;
            }
            let avail_path = dir.join("cgroup.controllers");
            let available = read_opt(name, &avail_path)?.unwrap_or_default();
            let avail: BTreeSet<&str> = available.split_whitespace().collect();
            for c in required {
                if !avail.contains(c) {
                    return Err(CgroupError::ControllerUnavailable {
                        cgroup: name.to_string(),
                        controller: c,
                        path: avail_path,
                        available: available.trim().to_string(),
                    });
                }
            }
            // Enable what we need plus what stats read, when available.
            let wanted: BTreeSet<&str> = ["cpu", "memory", "pids"]
                .iter()
                .chain(required.iter())
                .copied()
                .filter(|c| avail.contains(c))
                .collect();
            let sc_path = dir.join("cgroup.subtree_control");
            let enabled = read_opt(name, &sc_path)?.unwrap_or_default();
            let enabled: BTreeSet<&str> = enabled.split_whitespace().collect();
            let missing: Vec<String> = wanted
                .iter()
                .filter(|c| !enabled.contains(*c))
                .map(|c| format!("+{c}"))
                .collect();
            if missing.is_empty() {
                continue;
            }
            let line = missing.join(" ");
            match write_file(name, &sc_path, &line) {
                Ok(()) => {}
                // "No internal processes": a non-root cgroup with processes cannot hand domain
                // controllers to children. This is hearth's own cgroup (e.g. hearth.service): move
                // its processes into a `supervisor` leaf, as systemd-delegated managers do, and retry.
                Err(CgroupError::Io { source, .. })
                    if i == 0 && source.raw_os_error() == Some(libc::EBUSY) =>
                {
                    // Other processes of the cgroup may fork meanwhile (a shell polling hearth):
                    // move what is there until the write succeeds.
                    let leaf = dir.join("supervisor");
                    create_dir(name, &leaf)?;
                    let mut attempt = 0;
                    loop {
                        for pid in read_pids(name, &dir.join("cgroup.procs"))? {
                            match write_file(name, &leaf.join("cgroup.procs"), &pid.to_string()) {
                                Ok(()) => {}
                                // Exited (or a zombie) meanwhile: nothing to move.
                                Err(CgroupError::Io { source, .. })
                                    if source.raw_os_error() == Some(libc::ESRCH) => {}
                                Err(e) => return Err(e),
                            }
                        }
                        match write_file(name, &sc_path, &line) {
                            Ok(()) => break,
                            Err(CgroupError::Io { source, .. })
                                if attempt < 50 && source.raw_os_error() == Some(libc::EBUSY) =>
                            {
                                attempt += 1;
                                std::thread::sleep(Duration::from_millis(2));
                            }
                            Err(e) => return Err(e),
                        }
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

fn required_v2(limits: &Limits) -> Vec<&'static str> {
    let mut r = Vec::new();
    if limits.cpu_weight.is_some() || limits.cpu_quota.is_some() {
        r.push("cpu");
    }
    if limits.cpuset.is_some() {
        r.push("cpuset");
    }
    if limits.memory_max_bytes.is_some() {
        r.push("memory");
    }
    if limits.pids_max.is_some() {
        r.push("pids");
    }
    r
}

impl CgroupManager for V2Manager {
    fn kind(&self) -> Hierarchy {
        Hierarchy::V2
    }

    fn base_dirs(&self) -> Vec<PathBuf> {
        vec![self.base.clone()]
    }

    fn controllers(&self) -> Vec<String> {
        fs::read_to_string(self.anchor.join("cgroup.controllers"))
            .map(|c| c.split_whitespace().map(str::to_string).collect())
            .unwrap_or_default()
    }

    fn create(&self, name: &str, limits: &Limits) -> Result<RuntimeCgroup, CgroupError> {
        validate_name(name)?;
        self.ensure_base(name, &required_v2(limits))?;
        let dir = self.base.join(name);
        create_dir(name, &dir)?;
        ensure_empty(name, &dir)?;
        if let Some(cpus) = &limits.cpuset {
            write_file(name, &dir.join("cpuset.cpus"), cpus)?;
        }
        if let Some(w) = limits.cpu_weight {
            write_file(
                name,
                &dir.join("cpu.weight"),
                &w.clamp(1, 10_000).to_string(),
            )?;
        }
        if let Some(q) = limits.cpu_quota {
            write_file(
                name,
                &dir.join("cpu.max"),
                &format!("{} {}", q.quota_us, q.period_us),
            )?;
        }
        if let Some(m) = limits.memory_max_bytes {
            write_file(name, &dir.join("memory.max"), &m.to_string())?;
            // No swap for runtimes: the limit must mean RAM (ignore a kernel without swap files).
            let swap = dir.join("memory.swap.max");
            if swap.exists() {
                write_file(name, &swap, "0")?;
            }
        }
        if let Some(p) = limits.pids_max {
            write_file(name, &dir.join("pids.max"), &p.to_string())?;
        }
        RuntimeCgroup::new(name, Layout::V2 { dir })
    }

    fn open(&self, name: &str) -> Result<RuntimeCgroup, CgroupError> {
        validate_name(name)?;
        RuntimeCgroup::new(
            name,
            Layout::V2 {
                dir: self.base.join(name),
            },
        )
    }

    fn list(&self) -> Result<Vec<String>, CgroupError> {
        list_dirs(&self.base)
    }
}

// ---------------------------------------------------------------------------------------------
// v1

/// The controllers a v1 runtime cgroup is created in (cpuset only when a cpuset is asked for).
pub const V1_CONTROLLERS: [&str; 6] = ["memory", "cpu", "cpuacct", "pids", "freezer", "cpuset"];

/// Legacy/hybrid hierarchy: one base directory per controller.
#[derive(Debug, Clone)]
pub struct V1Manager {
    /// (controller, mount point of its hierarchy, base directory below it).
    bases: Vec<(&'static str, PathBuf, PathBuf)>,
}

impl V1Manager {
    /// `bases`: for each available controller, its hierarchy's mount point and the base directory
    /// (below the mount) where runtime cgroups go.
    pub fn new(bases: Vec<(&'static str, PathBuf, PathBuf)>) -> Self {
        Self { bases }
    }

    fn base_of(&self, controller: &str) -> Option<&Path> {
        self.bases
            .iter()
            .find(|(c, _, _)| *c == controller)
            .map(|(_, _, b)| b.as_path())
    }

    /// Creates `dir` and its missing parents down from the mount; cpuset directories start with empty
    /// `cpus`/`mems` and refuse tasks, so each new one copies its parent's.
    fn mkdirs(
        &self,
        name: &str,
        controller: &str,
        mount: &Path,
        dir: &Path,
    ) -> Result<(), CgroupError> {
        let rel = dir.strip_prefix(mount).unwrap_or(Path::new(""));
        let mut cur = mount.to_path_buf();
        for c in rel.components() {
            let parent = cur.clone();
            cur.push(c);
            if cur.is_dir() {
                continue;
            }
            create_dir(name, &cur)?;
            if controller == "cpuset" {
                for f in ["cpuset.cpus", "cpuset.mems"] {
                    let v = read_file(name, &parent.join(f))?;
                    write_file(name, &cur.join(f), v.trim())?;
                }
            }
        }
        Ok(())
    }
}

impl CgroupManager for V1Manager {
    fn kind(&self) -> Hierarchy {
        Hierarchy::V1
    }

    fn base_dirs(&self) -> Vec<PathBuf> {
        self.bases.iter().map(|(_, _, b)| b.clone()).collect()
    }

    fn controllers(&self) -> Vec<String> {
        self.bases.iter().map(|(c, _, _)| c.to_string()).collect()
    }

    fn create(&self, name: &str, limits: &Limits) -> Result<RuntimeCgroup, CgroupError> {
        validate_name(name)?;
        for c in required_v2(limits) {
            if self.base_of(c).is_none() {
                return Err(CgroupError::ControllerUnavailable {
                    cgroup: name.to_string(),
                    controller: c,
                    path: PathBuf::from("/proc/self/mountinfo"),
                    available: self
                        .bases
                        .iter()
                        .map(|(c, _, _)| *c)
                        .collect::<Vec<_>>()
                        .join(" "),
                });
            }
        }
        let mut dirs = Vec::new();
        for (controller, mount, base) in &self.bases {
            if *controller == "cpuset" && limits.cpuset.is_none() {
                continue;
            }
            let dir = base.join(name);
            self.mkdirs(name, controller, mount, &dir)?;
            ensure_empty(name, &dir)?;
            dirs.push((*controller, dir));
        }
        let cg = RuntimeCgroup::new(name, Layout::V1 { dirs })?;
        let d = |c: &str| cg.dir_of(c).map(Path::to_path_buf);
        if let (Some(m), Some(dir)) = (limits.memory_max_bytes, d("memory")) {
            write_file(name, &dir.join("memory.limit_in_bytes"), &m.to_string())?;
            // With swap accounting, also cap memory+swap so the limit means RAM.
            let memsw = dir.join("memory.memsw.limit_in_bytes");
            if memsw.exists() {
                write_file(name, &memsw, &m.to_string())?;
            }
        }
        if let Some(dir) = d("cpu") {
            if let Some(w) = limits.cpu_weight {
                let shares = (w.clamp(1, 10_000) * 1024 / 100).max(2);
                write_file(name, &dir.join("cpu.shares"), &shares.to_string())?;
            }
            if let Some(q) = limits.cpu_quota {
                write_file(
                    name,
                    &dir.join("cpu.cfs_period_us"),
                    &q.period_us.to_string(),
                )?;
                write_file(name, &dir.join("cpu.cfs_quota_us"), &q.quota_us.to_string())?;
            }
        }
        if let (Some(p), Some(dir)) = (limits.pids_max, d("pids")) {
            write_file(name, &dir.join("pids.max"), &p.to_string())?;
        }
        if let (Some(cpus), Some(dir)) = (&limits.cpuset, d("cpuset")) {
            write_file(name, &dir.join("cpuset.cpus"), cpus)?;
        }
        Ok(cg)
    }

    fn open(&self, name: &str) -> Result<RuntimeCgroup, CgroupError> {
        validate_name(name)?;
        let dirs = self
            .bases
            .iter()
            .map(|(c, _, b)| (*c, b.join(name)))
            .filter(|(_, d)| d.is_dir())
            .collect();
        RuntimeCgroup::new(name, Layout::V1 { dirs })
    }

    fn list(&self) -> Result<Vec<String>, CgroupError> {
        let mut all = BTreeSet::new();
        for (_, _, base) in &self.bases {
            all.extend(list_dirs(base)?);
        }
        Ok(all.into_iter().collect())
    }
}

// ---------------------------------------------------------------------------------------------
// detection

/// The chosen manager and why (hearth logs the reason at start).
pub struct Detected {
    pub manager: Box<dyn CgroupManager>,
    pub reason: String,
}

impl fmt::Debug for Detected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Detected")
            .field("manager", &self.manager)
            .field("reason", &self.reason)
            .finish()
    }
}

/// Inspects `/proc/self/mountinfo` and `/proc/self/cgroup` and returns the manager for this host.
/// `base_name` (e.g. `"hearth"`) names the subtree when hearth is not in a cgroup of its own.
pub fn detect(base_name: &str) -> Result<Detected, CgroupError> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| io_err("-", "read", Path::new("/proc/self/mountinfo"), e))?;
    let own = fs::read_to_string("/proc/self/cgroup")
        .map_err(|e| io_err("-", "read", Path::new("/proc/self/cgroup"), e))?;
    detect_from(&mountinfo, &own, base_name)
}

/// The mount point of the cgroup2 hierarchy: `/sys/fs/cgroup` on a pure v2 host,
/// `/sys/fs/cgroup/unified` on a hybrid one; `None` without one.
pub fn cgroup2_mount() -> Result<Option<PathBuf>, CgroupError> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| io_err("-", "read", Path::new("/proc/self/mountinfo"), e))?;
    Ok(parse_mountinfo(&mountinfo)
        .into_iter()
        .find(|m| m.v2)
        .map(|m| m.mount_point))
}

/// A cgroup mount from mountinfo.
#[derive(Debug, Clone, PartialEq)]
struct CgroupMount {
    mount_point: PathBuf,
    /// `cgroup2`, or the v1 controllers of the hierarchy.
    v2: bool,
    controllers: Vec<String>,
}

/// Undoes mountinfo's octal escapes (`\040` for a space, ...).
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn parse_mountinfo(mountinfo: &str) -> Vec<CgroupMount> {
    let mut out = Vec::new();
    for line in mountinfo.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let left: Vec<&str> = left.split(' ').collect();
        let right: Vec<&str> = right.split(' ').collect();
        if left.len() < 5 || right.len() < 3 {
            continue;
        }
        let mount_point = PathBuf::from(unescape_mountinfo(left[4]));
        match right[0] {
            "cgroup2" => out.push(CgroupMount {
                mount_point,
                v2: true,
                controllers: Vec::new(),
            }),
            "cgroup" => out.push(CgroupMount {
                mount_point,
                v2: false,
                controllers: right[2]
                    .split(',')
                    .filter(|o| V1_CONTROLLERS.contains(o))
                    .map(str::to_string)
                    .collect(),
            }),
            _ => {}
        }
    }
    out
}

/// `/proc/self/cgroup`: the v2 path (`0::<path>`) and the v1 path of each controller.
fn parse_proc_cgroup(content: &str) -> (Option<String>, Vec<(String, String)>) {
    let mut v2 = None;
    let mut v1 = Vec::new();
    for line in content.lines() {
        let mut it = line.splitn(3, ':');
        let (Some(_id), Some(ctrls), Some(path)) = (it.next(), it.next(), it.next()) else {
            continue;
        };
        if ctrls.is_empty() {
            v2 = Some(path.to_string());
        } else {
            for c in ctrls.split(',') {
                v1.push((c.to_string(), path.to_string()));
            }
        }
    }
    (v2, v1)
}

fn below(mount: &Path, cgroup_path: &str) -> PathBuf {
    mount.join(cgroup_path.trim_start_matches('/'))
}

/// [`detect`] on given file contents (testable).
pub fn detect_from(
    mountinfo: &str,
    proc_cgroup: &str,
    base_name: &str,
) -> Result<Detected, CgroupError> {
    validate_name(base_name)?;
    let mounts = parse_mountinfo(mountinfo);
    let (own_v2, own_v1) = parse_proc_cgroup(proc_cgroup);
    let v2_mount = mounts.iter().find(|m| m.v2);
    let pure_v2 = v2_mount.filter(|m| m.mount_point == Path::new("/sys/fs/cgroup"));
    let v1_mounts: Vec<&CgroupMount> = mounts.iter().filter(|m| !m.v2).collect();
    let has_v1_memory = v1_mounts
        .iter()
        .any(|m| m.controllers.iter().any(|c| c == "memory"));

    let v2 = |m: &CgroupMount, why: String| -> Result<Detected, CgroupError> {
        let own = own_v2.clone().unwrap_or_else(|| "/".to_string());
        // A `supervisor` leaf is where a previous hearth moved the processes of its cgroup to
        // enable controllers (see `ensure_base`): a hearth started from one of them belongs to the
        // same subtree, and must find its runtimes (and leftovers) there.
        let own = match own.strip_suffix("/supervisor") {
            Some(parent) if !parent.is_empty() => parent.to_string(),
            _ => own,
        };
        let (anchor, base, placement) = if own == "/" {
            let anchor = m.mount_point.clone();
            let base = anchor.join(base_name).join("runtimes");
            (anchor, base, "hearth is in the root cgroup".to_string())
        } else {
            let anchor = below(&m.mount_point, &own);
            let base = anchor.join("runtimes");
            (
                anchor,
                base,
                format!("below hearth's own cgroup {own} (under systemd: the service's delegated subtree)"),
            )
        };
        let reason = format!(
            "{why}; runtime cgroups go to {} ({placement})",
            base.display()
        );
        Ok(Detected {
            manager: Box::new(V2Manager::new(anchor, base)),
            reason,
        })
    };

    if let Some(m) = pure_v2 {
        return v2(
            m,
            "cgroup v2: /sys/fs/cgroup is a cgroup2 mount (pure unified hierarchy)".to_string(),
        );
    }
    if has_v1_memory {
        let mut bases = Vec::new();
        for controller in V1_CONTROLLERS {
            let Some(m) = v1_mounts
                .iter()
                .find(|m| m.controllers.iter().any(|c| c == controller))
            else {
                continue;
            };
            let own = own_v1
                .iter()
                .find(|(c, _)| c == controller)
                .map(|(_, p)| p.as_str())
                .unwrap_or("/");
            let base = below(&m.mount_point, own).join(base_name).join("runtimes");
            bases.push((controller, m.mount_point.clone(), base));
        }
        let listed: Vec<String> = bases
            .iter()
            .map(|(c, _, b)| format!("{c}={}", b.display()))
            .collect();
        let unified = match v2_mount {
            Some(m) => format!(
                "; the cgroup2 mount at {} is ignored (on a hybrid host its controllers are bound to v1)",
                m.mount_point.display()
            ),
            None => String::new(),
        };
        let reason = format!(
            "cgroup v1: /sys/fs/cgroup is not a cgroup2 mount and v1 hierarchies carry the memory controller{unified}; runtime cgroups go below hearth's own cgroup of each controller: {}",
            listed.join(", ")
        );
        return Ok(Detected {
            manager: Box::new(V1Manager::new(bases)),
            reason,
        });
    }
    if let Some(m) = v2_mount {
        return v2(
            m,
            format!(
                "cgroup v2: no v1 memory hierarchy, the unified hierarchy is mounted at {}",
                m.mount_point.display()
            ),
        );
    }
    Err(CgroupError::Detect(
        "no cgroup2 mount and no cgroup v1 memory hierarchy in /proc/self/mountinfo".to_string(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONTROL_FILES: &[(&str, &str)] = &[
        ("cgroup.controllers", "cpuset cpu memory pids\n"),
        ("cgroup.subtree_control", ""),
        ("cgroup.procs", ""),
        ("cgroup.kill", ""),
        ("memory.max", "max\n"),
        ("memory.swap.max", "max\n"),
        ("memory.current", "123456\n"),
        ("memory.peak", "654321\n"),
        (
            "memory.events",
            "low 0\nhigh 0\nmax 4\noom 2\noom_kill 2\noom_group_kill 0\n",
        ),
        ("cpu.weight", "100\n"),
        ("cpu.max", "max 100000\n"),
        (
            "cpu.stat",
            "usage_usec 2500000\nuser_usec 2000000\nsystem_usec 500000\n",
        ),
        ("pids.max", "max\n"),
        ("pids.current", "3\n"),
        ("cpuset.cpus", ""),
    ];

    fn fake_cgroup(dir: &Path) {
        fs::create_dir_all(dir).unwrap();
        for (f, c) in CONTROL_FILES {
            fs::write(dir.join(f), c).unwrap();
        }
    }

    /// The fake tree: root (anchor) → hearth → runtimes → `name`, each with control files, as the
    /// kernel would make them appear.
    fn fake_tree(name: &str) -> (tempfile::TempDir, V2Manager) {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_path_buf();
        fake_cgroup(&root);
        fake_cgroup(&root.join("hearth"));
        fake_cgroup(&root.join("hearth/runtimes"));
        fake_cgroup(&root.join("hearth/runtimes").join(name));
        let m = V2Manager::new(root.clone(), root.join("hearth/runtimes"));
        (tmp, m)
    }

    fn read(p: &Path) -> String {
        fs::read_to_string(p).unwrap()
    }

    #[test]
    fn v2_create_writes_limits_and_enables_controllers() {
        let (tmp, m) = fake_tree("llama");
        let limits = Limits {
            memory_max_bytes: Some(64 << 20),
            cpu_weight: Some(250),
            cpu_quota: Some(CpuQuota {
                quota_us: 200_000,
                period_us: 100_000,
            }),
            pids_max: Some(64),
            cpuset: Some("0-1".into()),
        };
        let cg = m.create("llama", &limits).unwrap();
        let dir = tmp.path().join("hearth/runtimes/llama");
        assert_eq!(read(&dir.join("memory.max")), "67108864");
        assert_eq!(read(&dir.join("memory.swap.max")), "0");
        assert_eq!(read(&dir.join("cpu.weight")), "250");
        assert_eq!(read(&dir.join("cpu.max")), "200000 100000");
        assert_eq!(read(&dir.join("pids.max")), "64");
        assert_eq!(read(&dir.join("cpuset.cpus")), "0-1");
        for d in [
            tmp.path().to_path_buf(),
            tmp.path().join("hearth"),
            tmp.path().join("hearth/runtimes"),
        ] {
            assert_eq!(
                read(&d.join("cgroup.subtree_control")),
                "+cpu +cpuset +memory +pids",
                "{}",
                d.display()
            );
        }
        assert_eq!(cg.kind(), Hierarchy::V2);
        assert_eq!(cg.dirs(), vec![dir.clone()]);
        let files: Vec<_> = cg
            .join_plan()
            .files()
            .map(|c| c.to_str().unwrap().to_string())
            .collect();
        assert_eq!(files, vec![dir.join("cgroup.procs").display().to_string()]);
    }

    #[test]
    fn v2_no_limits_touches_no_limit_file() {
        let (tmp, m) = fake_tree("plain");
        m.create("plain", &Limits::default()).unwrap();
        let dir = tmp.path().join("hearth/runtimes/plain");
        assert_eq!(read(&dir.join("memory.max")), "max\n");
        assert_eq!(read(&dir.join("cpu.max")), "max 100000\n");
        assert_eq!(read(&dir.join("pids.max")), "max\n");
    }

    #[test]
    fn v2_missing_controller_is_a_clear_error() {
        let (tmp, m) = fake_tree("x");
        fs::write(tmp.path().join("cgroup.controllers"), "hugetlb\n").unwrap();
        let err = m
            .create(
                "x",
                &Limits {
                    memory_max_bytes: Some(1),
                    ..Limits::default()
                },
            )
            .unwrap_err();
        assert!(
            matches!(
                err,
                CgroupError::ControllerUnavailable {
                    controller: "memory",
                    ..
                }
            ),
            "{err}"
        );
        let msg = err.to_string();
        assert!(
            msg.contains("cgroup x") && msg.contains("memory") && msg.contains("hugetlb"),
            "{msg}"
        );
        // Without limits, a hierarchy without those controllers is fine (join/kill/remove only).
        m.create("x", &Limits::default()).unwrap();
    }

    #[test]
    fn v2_busy_cgroup_is_refused() {
        let (tmp, m) = fake_tree("busy");
        fs::write(
            tmp.path().join("hearth/runtimes/busy/cgroup.procs"),
            "42\n43\n",
        )
        .unwrap();
        let err = m.create("busy", &Limits::default()).unwrap_err();
        assert!(
            matches!(err, CgroupError::Busy { ref pids, .. } if pids == &[42, 43]),
            "{err}"
        );
    }

    #[test]
    fn v2_stats_are_parsed() {
        let (_tmp, m) = fake_tree("s");
        let cg = m
            .create(
                "s",
                &Limits {
                    memory_max_bytes: Some(1 << 30),
                    ..Limits::default()
                },
            )
            .unwrap();
        let st = cg.stats().unwrap();
        assert_eq!(
            st,
            Stats {
                memory_current_bytes: Some(123456),
                memory_peak_bytes: Some(654321),
                memory_limit_bytes: Some(1 << 30),
                cpu_usage_seconds: Some(2.5),
                pids_current: Some(3),
                oom_kills: Some(2),
            }
        );
    }

    #[test]
    fn v2_stats_tolerate_missing_files() {
        let (tmp, m) = fake_tree("old");
        let dir = tmp.path().join("hearth/runtimes/old");
        fs::remove_file(dir.join("memory.peak")).unwrap();
        fs::remove_file(dir.join("pids.current")).unwrap();
        let st = m.open("old").unwrap().stats().unwrap();
        assert_eq!(st.memory_peak_bytes, None);
        assert_eq!(st.pids_current, None);
        assert_eq!(st.memory_limit_bytes, None); // "max"
        fs::write(dir.join("memory.current"), "garbage").unwrap();
        let err = m.open("old").unwrap().stats().unwrap_err();
        assert!(err.to_string().contains("memory.current"), "{err}");
    }

    #[test]
    fn v2_kill_writes_one_and_pids_are_read() {
        let (tmp, m) = fake_tree("k");
        let cg = m.create("k", &Limits::default()).unwrap();
        let dir = tmp.path().join("hearth/runtimes/k");
        fs::write(dir.join("cgroup.procs"), "7\n9\n").unwrap();
        assert_eq!(cg.pids().unwrap(), vec![7, 9]);
        cg.kill_all().unwrap();
        assert_eq!(read(&dir.join("cgroup.kill")), "1");
        let err = cg.wait_empty(Duration::from_millis(30)).unwrap_err();
        assert!(matches!(err, CgroupError::NotEmpty { .. }), "{err}");
        fs::write(dir.join("cgroup.procs"), "").unwrap();
        cg.wait_empty(Duration::from_millis(30)).unwrap();
    }

    #[test]
    fn v2_remove_list_and_cleanup_leftovers() {
        let (tmp, m) = fake_tree("old-1");
        fake_cgroup(&tmp.path().join("hearth/runtimes/old-2"));
        assert_eq!(m.list().unwrap(), vec!["old-1", "old-2"]);
        // The kernel makes control files vanish on rmdir; a fake tree must do that by hand.
        let strip = |d: &Path| {
            for (f, _) in CONTROL_FILES {
                if *f != "cgroup.procs" && *f != "cgroup.kill" {
                    fs::remove_file(d.join(f)).unwrap();
                }
            }
        };
        let d1 = tmp.path().join("hearth/runtimes/old-1");
        let d2 = tmp.path().join("hearth/runtimes/old-2");
        strip(&d1);
        strip(&d2);
        // remove() on a directory that still has files fails with the path in the message.
        let err = m.open("old-1").unwrap().remove().unwrap_err();
        assert!(err.to_string().contains("old-1"), "{err}");
        for d in [&d1, &d2] {
            fs::remove_file(d.join("cgroup.procs")).unwrap();
            fs::remove_file(d.join("cgroup.kill")).unwrap();
        }
        // kill_all without cgroup.kill/cgroup.freeze falls back to the kill loop (nothing to kill).
        assert_eq!(m.cleanup_leftovers().unwrap(), vec!["old-1", "old-2"]);
        assert!(!d1.exists() && !d2.exists());
        assert!(m.list().unwrap().is_empty());
    }

    #[test]
    fn names_are_validated() {
        let (_tmp, m) = fake_tree("ok");
        for bad in ["", ".", "..", "a/b", "cgroup.procs", "a b", "x\0y"] {
            assert!(
                matches!(
                    m.create(bad, &Limits::default()),
                    Err(CgroupError::InvalidName { .. })
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn v1_concurrent_kills_of_one_cgroup_do_not_thaw_each_other() {
        // On a fake freezer, FROZEN reads back at once: without serialization one kill's THAWED can
        // land between the other's FROZEN and its check, which then waits 2 s and fails.
        let tmp = tempfile::tempdir().unwrap();
        let mount = tmp.path().join("freezer");
        let dir = mount.join("hearth/runtimes/m");
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("cgroup.procs"), "").unwrap();
        fs::write(dir.join("freezer.state"), "THAWED").unwrap();
        let m = V1Manager::new(vec![(
            "freezer",
            mount.clone(),
            mount.join("hearth/runtimes"),
        )]);
        let cg = m.create("m", &Limits::default()).unwrap();
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let cg = cg.clone();
                std::thread::spawn(move || {
                    for _ in 0..50 {
                        cg.kill_all()?;
                    }
                    Ok::<(), CgroupError>(())
                })
            })
            .collect();
        for t in threads {
            t.join().expect("thread").expect("kill_all");
        }
        assert_eq!(read(&dir.join("freezer.state")), "THAWED");
    }

    #[test]
    fn v1_create_writes_limits_in_each_controller() {
        let tmp = tempfile::tempdir().unwrap();
        let mut bases = Vec::new();
        for c in ["memory", "cpu", "pids", "freezer"] {
            let mount = tmp.path().join(c);
            let dir = mount.join("hearth/runtimes/m");
            fs::create_dir_all(&dir).unwrap();
            for f in [
                "cgroup.procs",
                "memory.limit_in_bytes",
                "cpu.shares",
                "cpu.cfs_period_us",
                "cpu.cfs_quota_us",
                "pids.max",
            ] {
                fs::write(dir.join(f), "").unwrap();
            }
            bases.push((c, mount.clone(), mount.join("hearth/runtimes")));
        }
        let m = V1Manager::new(bases);
        let limits = Limits {
            memory_max_bytes: Some(1 << 20),
            cpu_weight: Some(50),
            cpu_quota: Some(CpuQuota {
                quota_us: 50_000,
                period_us: 100_000,
            }),
            pids_max: Some(10),
            cpuset: None,
        };
        let cg = m.create("m", &limits).unwrap();
        let p = |c: &str, f: &str| read(&tmp.path().join(c).join("hearth/runtimes/m").join(f));
        assert_eq!(p("memory", "memory.limit_in_bytes"), "1048576");
        assert_eq!(p("cpu", "cpu.shares"), "512");
        assert_eq!(p("cpu", "cpu.cfs_quota_us"), "50000");
        assert_eq!(p("cpu", "cpu.cfs_period_us"), "100000");
        assert_eq!(p("pids", "pids.max"), "10");
        assert_eq!(cg.join_plan().files().count(), 4);
        // cpuset was not asked for and is not mounted: asking for it is an error.
        let err = m
            .create(
                "m",
                &Limits {
                    cpuset: Some("0".into()),
                    ..Limits::default()
                },
            )
            .unwrap_err();
        assert!(
            matches!(
                err,
                CgroupError::ControllerUnavailable {
                    controller: "cpuset",
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn pid_digits_without_allocation() {
        let mut b = [0u8; 20];
        assert_eq!(format_u32(0, &mut b), b"0");
        assert_eq!(format_u32(7, &mut b), b"7");
        assert_eq!(format_u32(4_194_304, &mut b), b"4194304");
        assert_eq!(format_u32(u32::MAX, &mut b), b"4294967295");
    }

    #[test]
    fn join_self_writes_own_pid_into_every_file() {
        let tmp = tempfile::tempdir().unwrap();
        let files = vec![tmp.path().join("a"), tmp.path().join("b")];
        for f in &files {
            fs::write(f, "").unwrap();
        }
        let plan = JoinPlan::new("t", &files).unwrap();
        join_self(&plan).unwrap();
        for f in &files {
            assert_eq!(read(f), std::process::id().to_string());
        }
        let missing = JoinPlan::new("t", &[tmp.path().join("nope")]).unwrap();
        assert_eq!(
            join_self(&missing).unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
    }

    const HYBRID_MOUNTINFO: &str = "\
25 30 0:23 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
37 31 0:34 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    #[test]
    fn detect_hybrid_picks_v1_below_own_cgroups() {
        let own = "9:name=systemd:/\n4:memory:/sandbox/abc\n1:cpu:/\n0::/\n";
        let d = detect_from(HYBRID_MOUNTINFO, own, "hearth").unwrap();
        assert_eq!(d.manager.kind(), Hierarchy::V1);
        let bases = d.manager.base_dirs();
        assert!(
            bases.contains(&PathBuf::from(
                "/sys/fs/cgroup/memory/sandbox/abc/hearth/runtimes"
            )),
            "{bases:?}"
        );
        assert!(
            bases.contains(&PathBuf::from("/sys/fs/cgroup/cpu/hearth/runtimes")),
            "{bases:?}"
        );
        assert!(
            bases.contains(&PathBuf::from("/sys/fs/cgroup/freezer/hearth/runtimes")),
            "{bases:?}"
        );
        assert_eq!(bases.len(), 6, "{bases:?}");
        assert!(
            d.reason.contains("cgroup v1") && d.reason.contains("/sys/fs/cgroup/unified"),
            "{}",
            d.reason
        );
    }

    #[test]
    fn detect_pure_v2_under_systemd_and_in_root() {
        let mi = "30 23 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate\n";
        let d = detect_from(mi, "0::/system.slice/hearth.service\n", "hearth").unwrap();
        assert_eq!(d.manager.kind(), Hierarchy::V2);
        assert_eq!(
            d.manager.base_dirs(),
            vec![PathBuf::from(
                "/sys/fs/cgroup/system.slice/hearth.service/runtimes"
            )]
        );
        assert!(
            d.reason.contains("pure unified") && d.reason.contains("delegated"),
            "{}",
            d.reason
        );
        let d = detect_from(mi, "0::/\n", "hearth").unwrap();
        assert_eq!(
            d.manager.base_dirs(),
            vec![PathBuf::from("/sys/fs/cgroup/hearth/runtimes")]
        );
        // Started from the leaf a previous hearth moved its cgroup's processes into: same subtree.
        let d = detect_from(mi, "0::/system.slice/hearth.service/supervisor\n", "hearth").unwrap();
        assert_eq!(
            d.manager.base_dirs(),
            vec![PathBuf::from(
                "/sys/fs/cgroup/system.slice/hearth.service/runtimes"
            )]
        );
    }

    #[test]
    fn detect_without_cgroups_fails() {
        let err = detect_from("25 30 0:23 / /sys rw - sysfs sysfs rw\n", "", "hearth").unwrap_err();
        assert!(matches!(err, CgroupError::Detect(_)), "{err}");
    }

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape_mountinfo("/mnt/a\\040b"), "/mnt/a b");
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
    }
}
