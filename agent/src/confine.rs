//! Confinement of runtimes: the cgroup each one runs in (through [`crate::cgroup`]), the
//! unprivileged user it runs as, and its clean environment.
//!
//! [`Confinement::setup`] runs once at start: it detects the cgroup hierarchy, proves that runtime
//! cgroups can be created there, kills the runtime cgroups a previous instance left behind, and
//! resolves each model's `run_as` user. [`Confinement::sandbox`] then gives the supervisor, per start,
//! what [`crate::runtime::spawn`] applies in the child between `fork` and `exec`
//! ([`Sandbox`]): join the cgroup, drop the capability bounding set, drop to the user, set
//! `no_new_privs`.

use std::ffi::OsString;
use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Serialize;

use crate::cgroup::{self, CgroupManager, CpuQuota, Hierarchy, Limits, RuntimeCgroup};
use crate::config::{CgroupMode, Config, MemoryMax, ModelConfig, ModelLimits, DEFAULT_PIDS_MAX};

/// The user runtimes run as when hearth is root and the model sets no `run_as`: this one if it
/// exists (`cargo xtask setup` and the install create it), else `nobody`.
pub const DEFAULT_RUNTIME_USER: &str = "hearth-runtime";
const FALLBACK_RUNTIME_USER: &str = "nobody";
/// PATH given to runtimes when hearth itself has none.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

#[derive(Debug, thiserror::Error)]
pub enum ConfineError {
    #[error(
        "confinement.cgroups = \"required\" but runtime cgroups cannot be used here: {reason}"
    )]
    CgroupsRequired { reason: String },
    #[error("model {model}: run_as = {user:?} needs hearth to run as root (it runs as uid {uid})")]
    RunAsNeedsRoot {
        model: String,
        user: String,
        uid: u32,
    },
    #[error("model {model}: run_as user {user:?}: {reason}")]
    User {
        model: String,
        user: String,
        reason: String,
    },
}

/// Who a runtime runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub user: String,
    pub uid: u32,
    pub gid: u32,
    pub home: PathBuf,
}

/// What one spawn applies in the child.
#[derive(Debug, Default)]
pub struct Sandbox {
    /// The runtime's cgroup, created empty with its limits; the child joins it before `exec`.
    pub cgroup: Option<RuntimeCgroup>,
    /// Drop to this user (hearth is root); `None`: keep hearth's user (hearth is not root).
    pub credentials: Option<Credentials>,
    /// The highest capability number, to empty the bounding set (only when dropping from root).
    pub cap_last: Option<u32>,
    /// The environment before the model's own `env`: PATH and HOME.
    pub env: Vec<(OsString, OsString)>,
    /// `memory_max_mb` as applied, for OOM messages.
    pub memory_max_mb: Option<u64>,
}

/// How confinement came out at start, for `hearth status` and the log.
#[derive(Debug, Clone, Serialize)]
pub struct ConfinementStatus {
    /// `cgroup v1`, `cgroup v2` or `off`.
    pub cgroups: String,
    pub reason: String,
    /// Where runtime cgroups are created.
    pub base: Vec<PathBuf>,
    /// The controllers runtime cgroups can use (v2: delegated to hearth's cgroup).
    pub controllers: Vec<String>,
    /// Runtime cgroups of a previous instance killed at start.
    pub leftovers_killed: Vec<String>,
    /// Whether hearth runs as root (and so can switch runtimes to `run_as`).
    pub privileged: bool,
}

#[derive(Debug)]
pub struct Confinement {
    manager: Option<Arc<dyn CgroupManager>>,
    status: ConfinementStatus,
    /// Per model index.
    users: Vec<Option<Credentials>>,
    path_env: OsString,
    home_env: OsString,
    cap_last: u32,
}

impl Confinement {
    /// Detects cgroups, cleans up leftovers and resolves users; see the module docs.
    pub fn setup(config: &Config) -> Result<Confinement, ConfineError> {
        let euid = nix::unistd::geteuid().as_raw();
        let conf = &config.confinement;
        let mut status = ConfinementStatus {
            cgroups: "off".into(),
            reason: String::new(),
            base: Vec::new(),
            controllers: Vec::new(),
            leftovers_killed: Vec::new(),
            privileged: euid == 0,
        };
        let manager: Option<Arc<dyn CgroupManager>> = match conf.cgroups {
            CgroupMode::Off => {
                status.reason = "confinement.cgroups = \"off\"".into();
                None
            }
            mode => match usable_manager(&conf.cgroup_name) {
                Ok((m, reason)) => {
                    status.cgroups = m.kind().to_string();
                    status.reason = reason;
                    status.base = m.base_dirs();
                    status.controllers = m.controllers();
                    for (c, what) in [
                        ("memory", "default memory limits (memory_mb + headroom) and OOM detection are off"),
                        ("pids", "the default pids_max is not applied"),
                    ] {
                        if !status.controllers.iter().any(|x| x == c) {
                            tracing::warn!(controller = c, available = ?status.controllers, "the {c} controller is not available to runtime cgroups here: {what}; explicit limits that need it fail the model's starts");
                        }
                    }
                    match m.cleanup_leftovers() {
                        Ok(killed) => {
                            if !killed.is_empty() {
                                tracing::warn!(cgroups = ?killed, "killed runtime cgroups left by a previous hearth instance");
                            }
                            status.leftovers_killed = killed;
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "cleaning up runtime cgroups of a previous instance")
                        }
                    }
                    Some(m)
                }
                Err(reason) if mode == CgroupMode::Required => {
                    return Err(ConfineError::CgroupsRequired { reason })
                }
                Err(reason) => {
                    status.reason = format!(
                        "unavailable ({reason}); runtimes run WITHOUT cgroup limits (set confinement.cgroups = \"required\" to refuse this)"
                    );
                    None
                }
            },
        };
        let mut users = Vec::with_capacity(config.models.len());
        for m in &config.models {
            users.push(resolve_user(m, euid)?);
        }
        let home_env = std::env::var_os("HOME").unwrap_or_else(|| "/".into());
        Ok(Confinement {
            manager,
            status,
            users,
            path_env: std::env::var_os("PATH").unwrap_or_else(|| DEFAULT_PATH.into()),
            home_env,
            cap_last: cap_last(),
        })
    }

    /// No cgroups, no user switch (unit tests and `confinement.cgroups = "off"` as non-root).
    pub fn unconfined(config: &Config) -> Confinement {
        Confinement {
            manager: None,
            status: ConfinementStatus {
                cgroups: "off".into(),
                reason: "unconfined".into(),
                base: Vec::new(),
                controllers: Vec::new(),
                leftovers_killed: Vec::new(),
                privileged: false,
            },
            users: vec![None; config.models.len()],
            path_env: std::env::var_os("PATH").unwrap_or_else(|| DEFAULT_PATH.into()),
            home_env: std::env::var_os("HOME").unwrap_or_else(|| "/".into()),
            cap_last: cap_last(),
        }
    }

    pub fn status(&self) -> &ConfinementStatus {
        &self.status
    }

    pub fn hierarchy(&self) -> Option<Hierarchy> {
        self.manager.as_ref().map(|m| m.kind())
    }

    /// The user model `index` runs as, for status.
    pub fn user_of(&self, index: usize) -> Option<&Credentials> {
        self.users.get(index).and_then(Option::as_ref)
    }

    /// Prepares one start of model `index`: checks that its user can reach the program and the
    /// weights, and creates its cgroup with its limits. The error is the model's start failure.
    pub fn sandbox(&self, index: usize, m: &ModelConfig) -> Result<Sandbox, String> {
        let credentials = self.user_of(index).cloned();
        if let Some(c) = &credentials {
            check_access(c, &m.program, Access::Execute)?;
            if let Some(p) = &m.model_path {
                if p.exists() {
                    check_access(c, p, Access::Read)?;
                }
            }
        }
        let mut env = vec![("PATH".into(), self.path_env.clone())];
        let home = credentials
            .as_ref()
            .map(|c| c.home.clone().into_os_string())
            .unwrap_or_else(|| self.home_env.clone());
        env.push(("HOME".into(), home));
        let limits = match &self.manager {
            Some(_) => limits_of(&m.limits, &self.status.controllers),
            None => Limits::default(),
        };
        let cgroup = match &self.manager {
            Some(mgr) => Some(
                mgr.create(&cgroup_name(index, &m.id), &limits)
                    .map_err(|e| format!("cannot create the runtime's cgroup: {e}"))?,
            ),
            None => None,
        };
        let cap_last = credentials
            .as_ref()
            .filter(|c| c.uid != 0)
            .map(|_| self.cap_last);
        Ok(Sandbox {
            cgroup,
            credentials,
            cap_last,
            env,
            memory_max_mb: limits.memory_max_bytes.map(|b| b / (1024 * 1024)),
        })
    }
}

/// Detects the hierarchy and proves it usable by creating and removing a probe cgroup.
fn usable_manager(name: &str) -> Result<(Arc<dyn CgroupManager>, String), String> {
    let detected = cgroup::detect(name).map_err(|e| e.to_string())?;
    let m: Arc<dyn CgroupManager> = Arc::from(detected.manager);
    let probe = format!("probe-{}", std::process::id());
    let cg = m
        .create(&probe, &Limits::default())
        .map_err(|e| format!("{} ({})", e, detected.reason))?;
    if let Err(e) = cg.remove() {
        tracing::warn!(error = %e, "removing the probe cgroup");
    }
    Ok((m, detected.reason))
}

/// The cgroup name of model `index`: its id when that is a valid name, else a sanitized form with
/// the index (so that two ids cannot collide).
pub fn cgroup_name(index: usize, id: &str) -> String {
    let ok = |c: char| c.is_ascii_alphanumeric() || "._-:@+".contains(c);
    if !id.is_empty() && id.len() <= 180 && !id.starts_with('.') && id.chars().all(ok) {
        return id.to_string();
    }
    let clean: String = id
        .chars()
        .take(160)
        .map(|c| if ok(c) { c } else { '_' })
        .collect();
    format!("{index}-{}", clean.trim_start_matches('.'))
}

/// The cgroup limits of a model entry, given the controllers available: defaults (memory_max_mb,
/// pids_max) are left out where their controller is missing; explicit limits stay (and fail
/// clearly at creation).
pub fn limits_of(l: &ModelLimits, controllers: &[String]) -> Limits {
    let has = |c: &str| controllers.iter().any(|x| x == c);
    Limits {
        memory_max_bytes: match l.memory_max {
            MemoryMax::Mb(mb) if l.memory_max_explicit || has("memory") => Some(mb * 1024 * 1024),
            _ => None,
        },
        cpu_weight: l.cpu_weight,
        cpu_quota: l.cpu_quota.map(|cpus| CpuQuota {
            quota_us: ((cpus * 100_000.0).round() as u64).max(1000),
            period_us: 100_000,
        }),
        pids_max: l
            .pids_max
            .or_else(|| has("pids").then_some(DEFAULT_PIDS_MAX)),
        cpuset: l.cpuset.clone(),
    }
}

fn resolve_user(m: &ModelConfig, euid: u32) -> Result<Option<Credentials>, ConfineError> {
    let lookup = |name: &str| -> Result<Option<Credentials>, ConfineError> {
        nix::unistd::User::from_name(name)
            .map_err(|e| ConfineError::User {
                model: m.id.clone(),
                user: name.to_string(),
                reason: e.to_string(),
            })
            .map(|u| {
                u.map(|u| Credentials {
                    user: u.name,
                    uid: u.uid.as_raw(),
                    gid: u.gid.as_raw(),
                    home: u.dir,
                })
            })
    };
    if euid != 0 {
        // Not root: runtimes run as hearth's own user; asking for another one is an error.
        if let Some(name) = &m.limits.run_as {
            let same = lookup(name)?.is_some_and(|c| c.uid == euid);
            if !same {
                return Err(ConfineError::RunAsNeedsRoot {
                    model: m.id.clone(),
                    user: name.clone(),
                    uid: euid,
                });
            }
        }
        return Ok(None);
    }
    let creds = match &m.limits.run_as {
        Some(name) => lookup(name)?.ok_or_else(|| ConfineError::User {
            model: m.id.clone(),
            user: name.clone(),
            reason: "no such user".into(),
        })?,
        None => match lookup(DEFAULT_RUNTIME_USER)? {
            Some(c) => c,
            None => lookup(FALLBACK_RUNTIME_USER)?.ok_or_else(|| ConfineError::User {
                model: m.id.clone(),
                user: FALLBACK_RUNTIME_USER.into(),
                reason: format!(
                    "neither {DEFAULT_RUNTIME_USER} nor {FALLBACK_RUNTIME_USER} exists; create one or set run_as"
                ),
            })?,
        },
    };
    if creds.uid == 0 {
        tracing::warn!(model = %m.id, "run_as = root: this runtime runs with every privilege");
    }
    Ok(Some(creds))
}

/// `/proc/sys/kernel/cap_last_cap`, or a safe upper bound.
fn cap_last() -> u32 {
    fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(63)
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Access {
    Read,
    Execute,
}

/// Whether `c` (without supplementary groups, as runtimes run) can reach and read (or execute)
/// `path`, judged from the permission bits of the path and every directory above it. The message
/// names the first component that stops it.
pub fn check_access(c: &Credentials, path: &Path, want: Access) -> Result<(), String> {
    if c.uid == 0 {
        return Ok(());
    }
    let real = path
        .canonicalize()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let bits = |md: &fs::Metadata| -> u32 {
        let mode = md.permissions().mode();
        if md.uid() == c.uid {
            (mode >> 6) & 7
        } else if md.gid() == c.gid {
            (mode >> 3) & 7
        } else {
            mode & 7
        }
    };
    let denied = |p: &Path, md: &fs::Metadata, what: &str| {
        format!(
            "runtime user {} (uid {}) cannot {what} {}: {} is mode {:o}, owned by uid {} gid {}",
            c.user,
            c.uid,
            path.display(),
            p.display(),
            md.permissions().mode() & 0o7777,
            md.uid(),
            md.gid()
        )
    };
    let mut dir = PathBuf::from("/");
    let comps: Vec<_> = real.components().skip(1).collect();
    for comp in &comps[..comps.len().saturating_sub(1)] {
        let md = fs::metadata(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        if bits(&md) & 1 == 0 {
            return Err(denied(&dir, &md, "reach"));
        }
        dir.push(comp);
    }
    let md = fs::metadata(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    if bits(&md) & 1 == 0 {
        return Err(denied(&dir, &md, "reach"));
    }
    let md = fs::metadata(&real).map_err(|e| format!("{}: {e}", real.display()))?;
    let (need, what) = match want {
        Access::Read => (4, "read"),
        Access::Execute => (5, "execute"),
    };
    if bits(&md) & need != need {
        return Err(denied(&real, &md, what));
    }
    Ok(())
}

/// Drops root for the runtime, in the `pre_exec` closure *after* [`cgroup::join_self`]: empties the
/// capability bounding set (`cap_last`: the highest capability number; `None` leaves it), then no
/// supplementary groups, `gid`, `uid`, an empty inheritable set, and `no_new_privs` (setuid binaries
/// and file capabilities cannot give anything back). Changing the uid of a root process clears its
/// permitted, effective and ambient capability sets.
///
/// Async-signal-safe: only `prctl`, `setgroups`, `setgid`, `setuid` and `capset` calls on stack
/// data, no allocation.
///
/// This exists because `std::process::Command::uid`/`gid` (and tokio's) are applied in the child
/// *before* `pre_exec` closures run, so the join would then be attempted as the unprivileged user
/// and fail with `EACCES` (tested in `tests/cgroup_v1.rs`).
pub fn drop_privileges(uid: u32, gid: u32, cap_last: Option<u32>) -> io::Result<()> {
    // SAFETY: plain syscalls with valid arguments (a null list of length 0 for setgroups).
    unsafe {
        if let Some(last) = cap_last {
            for cap in 0..=last {
                // EINVAL for a capability this kernel does not know: nothing to drop.
                if libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) != 0
                    && *libc::__errno_location() != libc::EINVAL
                {
                    return Err(io::Error::last_os_error());
                }
            }
        }
        if libc::setgroups(0, std::ptr::null()) != 0
            || libc::setgid(gid) != 0
            || libc::setuid(uid) != 0
        {
            return Err(io::Error::last_os_error());
        }
        // The uid change cleared the permitted, effective and ambient sets; clear the inheritable
        // set too (dropping capabilities is always allowed).
        let header = CapHeader {
            version: LINUX_CAPABILITY_VERSION_3,
            pid: 0,
        };
        let data = [CapData::default(); 2];
        if libc::syscall(libc::SYS_capset, &header as *const CapHeader, data.as_ptr()) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    set_no_new_privs()
}

/// `struct __user_cap_header_struct` of `<linux/capability.h>`.
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

/// `struct __user_cap_data_struct`; version 3 takes two of them (capabilities 0-31 and 32-63).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// `PR_SET_NO_NEW_PRIVS`; async-signal-safe.
pub fn set_no_new_privs() -> io::Result<()> {
    // SAFETY: a plain prctl with constant arguments.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_names_are_ids_or_sanitized_with_index() {
        assert_eq!(cgroup_name(0, "smollm2"), "smollm2");
        assert_eq!(cgroup_name(3, "qwen2.5:7b"), "qwen2.5:7b");
        assert_eq!(cgroup_name(2, "org/model v1"), "2-org_model_v1");
        assert_eq!(cgroup_name(1, ".hidden"), "1-hidden");
        assert!(cgroup::validate_name(&cgroup_name(4, &"x/".repeat(300))).is_ok());
    }

    #[test]
    fn limits_convert_units() {
        let all: Vec<String> = ["memory", "cpu", "pids", "cpuset"]
            .map(String::from)
            .to_vec();
        let l = limits_of(
            &ModelLimits {
                memory_max: MemoryMax::Mb(512),
                memory_max_explicit: false,
                cpu_weight: Some(200),
                cpu_quota: Some(1.5),
                pids_max: Some(64),
                cpuset: Some("0-1".into()),
                run_as: None,
            },
            &all,
        );
        assert_eq!(l.memory_max_bytes, Some(512 * 1024 * 1024));
        assert_eq!(
            l.cpu_quota,
            Some(CpuQuota {
                quota_us: 150_000,
                period_us: 100_000
            })
        );
        assert_eq!(l.cpu_weight, Some(200));
        assert_eq!(l.pids_max, Some(64));
        let none = ModelLimits {
            memory_max: MemoryMax::Unlimited,
            memory_max_explicit: true,
            cpu_weight: None,
            cpu_quota: None,
            pids_max: None,
            cpuset: None,
            run_as: None,
        };
        // The default pids_max applies where the controller is there.
        let l = limits_of(&none, &all);
        assert_eq!(l.pids_max, Some(DEFAULT_PIDS_MAX));
        assert_eq!(l.memory_max_bytes, None);
        // Defaults are dropped where their controller is missing; explicit limits stay.
        assert_eq!(limits_of(&none, &[]), Limits::default());
        let default_mem = ModelLimits {
            memory_max: MemoryMax::Mb(300),
            memory_max_explicit: false,
            ..none.clone()
        };
        assert_eq!(limits_of(&default_mem, &[]).memory_max_bytes, None);
        let explicit_mem = ModelLimits {
            memory_max_explicit: true,
            ..default_mem
        };
        assert_eq!(
            limits_of(&explicit_mem, &[]).memory_max_bytes,
            Some(300 * 1024 * 1024)
        );
    }

    #[test]
    fn access_is_judged_from_mode_bits_along_the_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sub = dir.path().join("sub");
        fs::create_dir(&sub).expect("mkdir");
        let file = sub.join("w.gguf");
        fs::write(&file, b"x").expect("write");
        let me = nix::unistd::geteuid().as_raw();
        // A user that is neither owner nor group: only the "other" bits count.
        let other = Credentials {
            user: "other".into(),
            uid: me.wrapping_add(4242),
            gid: 4242,
            home: "/".into(),
        };
        let set = |p: &Path, mode: u32| {
            fs::set_permissions(p, fs::Permissions::from_mode(mode)).expect("chmod")
        };
        set(dir.path(), 0o755);
        set(&sub, 0o755);
        set(&file, 0o644);
        assert_eq!(check_access(&other, &file, Access::Read), Ok(()));
        let e = check_access(&other, &file, Access::Execute).expect_err("not executable");
        assert!(e.contains("cannot execute"), "{e}");
        set(&sub, 0o700);
        let e = check_access(&other, &file, Access::Read).expect_err("dir closed");
        assert!(
            e.contains("cannot reach") && e.contains("sub is mode 700"),
            "{e}"
        );
        set(&sub, 0o755);
        set(&file, 0o600);
        let e = check_access(&other, &file, Access::Read).expect_err("file closed");
        assert!(e.contains("cannot read") && e.contains("mode 600"), "{e}");
        // The owner's bits apply to the owner.
        let owner = Credentials {
            uid: me,
            ..other.clone()
        };
        if me != 0 {
            assert_eq!(check_access(&owner, &file, Access::Read), Ok(()));
        }
    }
}
