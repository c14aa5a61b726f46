//! Configuration: one TOML file, validated as a whole.
//!
//! Parsing is serde's; what this module adds is that *every* problem is reported at once, each with
//! its key path and reason. Unknown keys are collected with `serde_ignored`; a key whose value has
//! the wrong type is located with `serde_path_to_error`, recorded, removed and the section parsed
//! again, so one bad value does not hide the next. Semantic checks (duplicates, pool sizes, paths)
//! run on whatever parsed.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Deserialize;

/// One problem found in a configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Key path, e.g. `models[1].memory_mb`.
    pub key: String,
    pub reason: String,
}

/// Every problem found in one file.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    pub path: PathBuf,
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.problems.len();
        writeln!(
            f,
            "{}: {} problem{}",
            self.path.display(),
            n,
            if n == 1 { "" } else { "s" }
        )?;
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            if p.key.is_empty() {
                write!(f, "{}: {}", self.path.display(), p.reason)?;
            } else {
                write!(f, "{}: {}: {}", self.path.display(), p.key, p.reason)?;
            }
        }
        Ok(())
    }
}

/// Which program serves a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RuntimeKind {
    LlamaCpp,
    Vllm,
    Command,
}

impl RuntimeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RuntimeKind::LlamaCpp => "llama-cpp",
            RuntimeKind::Vllm => "vllm",
            RuntimeKind::Command => "command",
        }
    }
}

/// How long an idle model stays loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeepWarm {
    For(Duration),
    Forever,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub api_keys: Vec<String>,
    pub max_body_bytes: usize,
    pub runtime_ports: RangeInclusive<u16>,
    /// Async worker threads: 1 runs everything on one thread (no cross-thread wake-ups per request),
    /// more spreads connections over threads.
    pub worker_threads: usize,
}

#[derive(Debug, Clone)]
pub struct ResourcesConfig {
    pub host_memory_mb: u64,
    /// Subtracted from every GPU's memory: what hearth never schedules (driver, display, others).
    pub gpu_reserve_mb: u64,
    /// GPU pools declared in the file (`[[resources.gpus]]`): the pools when NVML is absent, caps
    /// on the measured memory when it is present.
    pub gpus: Vec<GpuDecl>,
    /// Whether to measure GPUs with NVML.
    pub nvml: NvmlMode,
    /// How long to wait, after a runtime on a GPU exits, for NVML to show its memory freed.
    pub gpu_release_timeout: Duration,
    /// How often NVML is read.
    pub gpu_poll_interval: Duration,
}

/// A GPU declared in the config file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GpuDecl {
    pub index: u32,
    pub memory_mb: u64,
}

/// Whether GPUs are measured with NVML.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NvmlMode {
    /// Use NVML when the driver's library loads; else the declared pools.
    Auto,
    /// Refuse to start without NVML.
    Required,
    /// Never load NVML: only the declared pools.
    Off,
}

/// Which GPUs a model may use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GpuPlacement {
    /// One GPU, chosen by the scheduler among those where it fits.
    Any,
    /// Exactly these GPUs (several: the model is split across them, `vram_mb` on each).
    On(Vec<u32>),
}

/// vLLM's sleep mode: what an idle model keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SleepLevel {
    /// Level 1: weights offloaded to host RAM, KV cache discarded.
    Level1,
    /// Level 2: weights and KV cache discarded (reloaded from disk on wake).
    Level2,
}

impl SleepLevel {
    pub fn number(self) -> u8 {
        match self {
            SleepLevel::Level1 => 1,
            SleepLevel::Level2 => 2,
        }
    }
}

/// What a model holds on the GPU and in host RAM while it sleeps (vLLM sleep mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SleepConfig {
    pub level: SleepLevel,
    /// Host RAM held while asleep.
    pub memory_mb: u64,
    /// VRAM held while asleep (the CUDA context and what vLLM keeps), on each placed GPU.
    pub vram_mb: u64,
    /// Asleep this long: stopped.
    pub keep_asleep: KeepWarm,
}

/// Default VRAM a sleeping vLLM keeps (its CUDA context and allocator pools), per GPU.
pub const DEFAULT_SLEEP_VRAM_MB: u64 = 512;

/// Whether runtimes go into cgroups.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupMode {
    /// Use cgroups when the host allows it; otherwise run unconfined and say so loudly.
    Auto,
    /// Refuse to start without working cgroups.
    Required,
    /// Never create cgroups.
    Off,
}

impl CgroupMode {
    pub fn as_str(self) -> &'static str {
        match self {
            CgroupMode::Auto => "auto",
            CgroupMode::Required => "required",
            CgroupMode::Off => "off",
        }
    }
}

/// `[confinement]`: how runtimes are confined (see docs/architecture.md, "Confinement").
#[derive(Debug, Clone)]
pub struct ConfinementConfig {
    pub cgroups: CgroupMode,
    /// This instance's name in the cgroup tree where hearth has no cgroup of its own to nest in:
    /// `/<name>/runtimes/<model>` when hearth is in the v2 root cgroup, and below hearth's cgroup of
    /// each v1 controller. Two instances sharing those need different names. (Below hearth's own v2
    /// cgroup, e.g. `hearth.service/runtimes/<model>`, instances are apart already.)
    pub cgroup_name: String,
}

/// A memory limit: a number of MB or none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemoryMax {
    Mb(u64),
    Unlimited,
}

/// The cgroup limits and the user of one model's runtime.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelLimits {
    pub memory_max: MemoryMax,
    /// Whether `memory_max_mb` was set (a default is dropped where the memory controller is
    /// missing; an explicit limit then fails the model's starts).
    pub memory_max_explicit: bool,
    pub cpu_weight: Option<u64>,
    /// In CPUs (1.5 = one and a half CPUs of time per period).
    pub cpu_quota: Option<f64>,
    /// As configured; where the pids controller is available and this is unset,
    /// [`DEFAULT_PIDS_MAX`] applies.
    pub pids_max: Option<u64>,
    pub cpuset: Option<String>,
    /// The user the runtime runs as; `None`: the default (`hearth-runtime` if it exists, else
    /// `nobody`, when hearth is root).
    pub run_as: Option<String>,
}

/// The default headroom above `memory_mb` for `memory_max_mb`: 25 %, at least 256 MB.
pub fn default_memory_max_mb(memory_mb: u64, headroom_mb: Option<u64>) -> u64 {
    memory_mb + headroom_mb.unwrap_or_else(|| (memory_mb / 4).max(256))
}

/// Default `pids_max` (threads count): llama-server and vLLM run dozens to hundreds of threads;
/// this stops a fork bomb, not a runtime.
pub const DEFAULT_PIDS_MAX: u64 = 4096;

#[derive(Debug, Clone)]
pub struct QueueConfig {
    pub max: usize,
    pub timeout: Duration,
}

/// A model entry, validated and with paths resolved.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub id: String,
    pub aliases: Vec<String>,
    pub runtime: RuntimeKind,
    /// The program to run (resolved from `[runtimes]` or `command[0]`).
    pub program: PathBuf,
    pub model_path: Option<PathBuf>,
    /// `command` runtime: argv after the program, with placeholders.
    pub command_args: Vec<String>,
    pub health_path: String,
    pub args: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub memory_mb: u64,
    pub context_length: u32,
    pub max_concurrency: u32,
    pub keep_warm: KeepWarm,
    pub min_residency: Duration,
    pub start_timeout: Duration,
    pub stop_timeout: Duration,
    pub queue: QueueConfig,
    pub limits: ModelLimits,
    /// VRAM held while loaded, on each GPU it is placed on (0: no GPU).
    pub vram_mb: u64,
    pub gpus: GpuPlacement,
    /// vLLM sleep mode instead of a stop when idle or when its GPU memory is needed.
    pub sleep: Option<SleepConfig>,
}

impl ModelConfig {
    /// Whether the model runs on GPUs.
    pub fn uses_gpu(&self) -> bool {
        self.vram_mb > 0
    }
}

/// Which process is the chat gateway the sensor watches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GatewayTarget {
    /// A cgroup v2 directory (absolute, or relative to the cgroup2 mount).
    Cgroup(PathBuf),
    /// A systemd unit, resolved to its cgroup at start.
    Unit(String),
    /// A process; its cgroup v2 path (or, in the v2 root, a cgroup of its own made for it).
    Pid(u32),
}

/// `[sensor]`: the eBPF gateway sensor.
#[derive(Debug, Clone)]
pub struct SensorConfig {
    /// False without a `[sensor]` gateway (or with `enabled = false`).
    pub enabled: bool,
    pub gateway: Option<GatewayTarget>,
    pub gateway_ports: Vec<u16>,
    /// A session without traffic for this long is `idle`.
    pub idle_after: Duration,
    /// How often the flow counters are read (one interval of per-session byte counts).
    pub poll_interval: Duration,
    /// Closed and idle sessions are dropped from the list after this long.
    pub forget_after: Duration,
    /// `hearth sensor`: the agent to report to (`http://llm-host:8000`).
    pub report_to: Option<String>,
    /// `hearth sensor`: the token it sends (one of the agent's `accept_tokens`).
    pub report_token: Option<String>,
    /// `hearth sensor`: its name in the agent's sessions (default: the hostname).
    pub name: String,
    /// `hearth sensor`: batches kept while the agent is unreachable (oldest dropped first).
    pub report_buffer: usize,
    /// The agent: tokens remote sensors may report with (`POST /hearth/v1/activity`); empty: remote
    /// reports are refused.
    pub accept_tokens: Vec<String>,
}

/// OpenClaw's default gateway port.
pub const DEFAULT_GATEWAY_PORT: u16 = 18789;

#[derive(Debug, Clone)]
pub struct Config {
    pub source: PathBuf,
    pub server: ServerConfig,
    pub resources: ResourcesConfig,
    pub confinement: ConfinementConfig,
    pub sensor: SensorConfig,
    pub models: Vec<ModelConfig>,
}

impl Config {
    /// Reads and validates `path`; every problem is in the error.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            path: path.to_path_buf(),
            problems: vec![Problem {
                key: String::new(),
                reason: format!("cannot read file: {e}"),
            }],
        })?;
        let base = path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        Self::parse(&text, path, &base)
    }

    /// Validates `text`; relative paths are resolved against `base`.
    pub fn parse(text: &str, path: &Path, base: &Path) -> Result<Config, ConfigError> {
        let mut problems = Vec::new();
        let cfg = parse_inner(text, base, &mut problems);
        match cfg {
            Some(cfg) if problems.is_empty() => Ok(Config {
                source: path.to_path_buf(),
                ..cfg
            }),
            _ => Err(ConfigError {
                path: path.to_path_buf(),
                problems,
            }),
        }
    }
}

// ---- raw (as written) ----

#[derive(Deserialize, Default)]
struct RawServer {
    listen: Option<String>,
    api_keys: Option<Vec<String>>,
    max_body_bytes: Option<u64>,
    runtime_ports: Option<String>,
    worker_threads: Option<u64>,
}

#[derive(Deserialize, Default)]
struct RawResources {
    host_memory_mb: Option<u64>,
    gpu_reserve_mb: Option<u64>,
    gpus: Option<Vec<RawGpu>>,
    nvml: Option<String>,
    gpu_release_timeout: Option<String>,
    gpu_poll_interval: Option<String>,
}

#[derive(Deserialize, Default)]
struct RawGpu {
    index: Option<u32>,
    memory_mb: Option<u64>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawGpus {
    List(Vec<u32>),
    Word(String),
}

#[derive(Deserialize, Default)]
struct RawConfinement {
    cgroups: Option<String>,
    cgroup_name: Option<String>,
    run_as: Option<String>,
    memory_headroom_mb: Option<u64>,
}

#[derive(Deserialize, Default)]
struct RawSensor {
    enabled: Option<bool>,
    gateway_cgroup: Option<String>,
    gateway_unit: Option<String>,
    gateway_pid: Option<u32>,
    gateway_ports: Option<Vec<u16>>,
    idle_after: Option<String>,
    poll_interval: Option<String>,
    forget_after: Option<String>,
    report_to: Option<String>,
    report_token: Option<String>,
    name: Option<String>,
    report_buffer: Option<u64>,
    accept_tokens: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawMemoryMax {
    Mb(u64),
    Word(String),
}

#[derive(Deserialize, Default)]
struct RawRuntimes {
    llama_server: Option<String>,
    vllm: Option<String>,
}

#[derive(Deserialize, Default)]
struct RawQueue {
    max: Option<u64>,
    timeout: Option<String>,
}

#[derive(Deserialize, Default)]
struct RawModel {
    id: Option<String>,
    aliases: Option<Vec<String>>,
    runtime: Option<RuntimeKind>,
    model_path: Option<String>,
    command: Option<Vec<String>>,
    health_path: Option<String>,
    args: Option<Vec<String>>,
    env: Option<BTreeMap<String, String>>,
    memory_mb: Option<u64>,
    context_length: Option<u32>,
    max_concurrency: Option<u32>,
    keep_warm: Option<String>,
    min_residency: Option<String>,
    start_timeout: Option<String>,
    stop_timeout: Option<String>,
    queue: Option<RawQueue>,
    memory_max_mb: Option<RawMemoryMax>,
    cpu_weight: Option<u64>,
    cpu_quota: Option<f64>,
    pids_max: Option<u64>,
    cpuset: Option<String>,
    run_as: Option<String>,
    vram_mb: Option<u64>,
    gpus: Option<RawGpus>,
    sleep: Option<String>,
    sleep_memory_mb: Option<u64>,
    sleep_vram_mb: Option<u64>,
    keep_asleep: Option<String>,
}

const TOP_KEYS: &[&str] = &[
    "server",
    "resources",
    "confinement",
    "sensor",
    "runtimes",
    "models",
];

/// A cgroup v1/v2 cpu list: `0-3,6`.
fn valid_cpuset(s: &str) -> bool {
    !s.is_empty()
        && s.split(',').all(|part| {
            let mut it = part.splitn(2, '-');
            let a = it.next().map(|a| a.parse::<u32>());
            let b = it.next().map(|b| b.parse::<u32>());
            match (a, b) {
                (Some(Ok(_)), None) => true,
                (Some(Ok(a)), Some(Ok(b))) => a <= b,
                _ => false,
            }
        })
}

/// Whether `name` exists in the user database.
fn user_exists(name: &str) -> Result<bool, String> {
    nix::unistd::User::from_name(name)
        .map(|u| u.is_some())
        .map_err(|e| format!("looking up user {name:?}: {e}"))
}

/// A name usable as a cgroup directory (as `cgroup::validate_name` accepts).
fn valid_cgroup_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 200
        && !s.starts_with('.')
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-:@+".contains(c))
}

fn problem(problems: &mut Vec<Problem>, key: impl Into<String>, reason: impl Into<String>) {
    problems.push(Problem {
        key: key.into(),
        reason: reason.into(),
    });
}

/// Deserializes `value` into `T`, recording unknown keys and type errors under `prefix`. A key with
/// a bad value is removed and parsing retried, so all bad values are reported.
fn section<T: DeserializeOwned + Default>(
    mut value: toml::Value,
    prefix: &str,
    problems: &mut Vec<Problem>,
) -> T {
    let join = |p: &str| {
        if prefix.is_empty() {
            p.to_string()
        } else if p.is_empty() || p == "?" {
            prefix.to_string()
        } else {
            format!("{prefix}.{p}")
        }
    };
    if !value.is_table() {
        problem(
            problems,
            prefix,
            format!("expected a table, found {}", value.type_str()),
        );
        return T::default();
    }
    for _ in 0..64 {
        let mut unknown = Vec::new();
        let mut track = serde_path_to_error::Track::new();
        let result = {
            let de = serde_path_to_error::Deserializer::new(value.clone(), &mut track);
            serde_ignored::deserialize(de, |path| unknown.push(path.to_string()))
        };
        match result {
            Ok(v) => {
                for u in unknown {
                    problem(problems, join(&u), "unknown key");
                }
                return v;
            }
            Err(e) => {
                let path = track.path();
                let key = path.to_string();
                problem(problems, join(&key), clean_serde_message(&e.to_string()));
                if !remove_path(&mut value, &path) {
                    return T::default();
                }
            }
        }
    }
    T::default()
}

fn clean_serde_message(m: &str) -> String {
    // toml's messages can span several lines with a caret diagram; keep the first meaningful line.
    m.lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or(m)
        .to_string()
}

/// Removes the value at `path` (a path into `value`); false when nothing could be removed.
fn remove_path(value: &mut toml::Value, path: &serde_path_to_error::Path) -> bool {
    use serde_path_to_error::Segment;
    let segs: Vec<&Segment> = path.iter().collect();
    let Some((last, parents)) = segs.split_last() else {
        return false;
    };
    let mut cur = value;
    for seg in parents {
        let next = match seg {
            Segment::Map { key } => cur.get_mut(key.as_str()),
            Segment::Seq { index } => cur.get_mut(*index),
            _ => None,
        };
        match next {
            Some(n) => cur = n,
            None => return false,
        }
    }
    match last {
        Segment::Map { key } => cur
            .as_table_mut()
            .map(|t| t.remove(key.as_str()).is_some())
            .unwrap_or(false),
        Segment::Seq { index } => match cur.as_array_mut() {
            Some(a) if *index < a.len() => {
                a.remove(*index);
                true
            }
            _ => false,
        },
        _ => false,
    }
}

fn duration(
    v: &Option<String>,
    default: Duration,
    key: String,
    problems: &mut Vec<Problem>,
) -> Duration {
    match v {
        None => default,
        Some(s) => match humantime::parse_duration(s.trim()) {
            Ok(d) => d,
            Err(e) => {
                problem(
                    problems,
                    key,
                    format!("invalid duration {s:?}: {e} (use e.g. \"250ms\", \"30s\", \"5m\")"),
                );
                default
            }
        },
    }
}

fn port_range(s: &str) -> Result<RangeInclusive<u16>, String> {
    let (a, b) = s
        .split_once('-')
        .ok_or_else(|| format!("invalid port range {s:?}: expected \"FIRST-LAST\""))?;
    let a: u16 = a
        .trim()
        .parse()
        .map_err(|e| format!("invalid port range {s:?}: {e}"))?;
    let b: u16 = b
        .trim()
        .parse()
        .map_err(|e| format!("invalid port range {s:?}: {e}"))?;
    if a == 0 || a > b {
        return Err(format!("invalid port range {s:?}: need 0 < FIRST <= LAST"));
    }
    Ok(a..=b)
}

/// Resolves a program: with a `/` relative to `base`, else looked up on PATH.
fn resolve_program(p: &str, base: &Path) -> Result<PathBuf, String> {
    if p.contains('/') {
        let path = base.join(p);
        if path.is_file() {
            Ok(path)
        } else {
            Err(format!("program {} does not exist", path.display()))
        }
    } else {
        let path = std::env::var_os("PATH").unwrap_or_default();
        std::env::split_paths(&path)
            .map(|d| d.join(p))
            .find(|c| c.is_file())
            .ok_or_else(|| format!("program {p:?} not found on PATH"))
    }
}

/// `hearth sensor`: only the `[sensor]` section of `path` matters (the gateway host has no models);
/// other sections are not validated, so the agent's file can be reused.
pub fn load_sensor(path: &Path) -> Result<SensorConfig, ConfigError> {
    let fail = |problems: Vec<Problem>| ConfigError {
        path: path.to_path_buf(),
        problems,
    };
    let text = std::fs::read_to_string(path).map_err(|e| {
        fail(vec![Problem {
            key: String::new(),
            reason: format!("cannot read file: {e}"),
        }])
    })?;
    let root: toml::Table = toml::from_str(&text).map_err(|e| {
        fail(vec![Problem {
            key: String::new(),
            reason: format!("invalid TOML: {}", e.message()),
        }])
    })?;
    let mut problems = Vec::new();
    let raw: RawSensor = section(
        root.get("sensor")
            .cloned()
            .unwrap_or_else(|| toml::Value::Table(Default::default())),
        "sensor",
        &mut problems,
    );
    let cfg = sensor_config(raw, &mut problems);
    if !cfg.enabled {
        problem(
            &mut problems,
            "sensor",
            "hearth sensor needs the gateway: set gateway_cgroup, gateway_unit or gateway_pid",
        );
    }
    if cfg.report_to.is_none() {
        problem(
            &mut problems,
            "sensor.report_to",
            "missing: the agent to report to, e.g. \"http://llm-host:8000\"",
        );
    }
    if problems.is_empty() {
        Ok(cfg)
    } else {
        Err(fail(problems))
    }
}

fn sensor_config(r: RawSensor, problems: &mut Vec<Problem>) -> SensorConfig {
    let mut targets = Vec::new();
    if let Some(c) = r.gateway_cgroup.as_deref() {
        if c.trim().is_empty() {
            problem(problems, "sensor.gateway_cgroup", "must not be empty");
        }
        targets.push(GatewayTarget::Cgroup(PathBuf::from(c.trim())));
    }
    if let Some(u) = r.gateway_unit.as_deref() {
        if u.trim().is_empty() {
            problem(problems, "sensor.gateway_unit", "must not be empty");
        }
        targets.push(GatewayTarget::Unit(u.trim().to_string()));
    }
    if let Some(p) = r.gateway_pid {
        if p == 0 {
            problem(problems, "sensor.gateway_pid", "must be a process id (> 0)");
        }
        targets.push(GatewayTarget::Pid(p));
    }
    if targets.len() > 1 {
        problem(
            problems,
            "sensor",
            "give one of gateway_cgroup, gateway_unit, gateway_pid (several are set)",
        );
    }
    let gateway = targets.into_iter().next();
    let enabled = r.enabled.unwrap_or(true) && gateway.is_some();
    if r.enabled == Some(true) && gateway.is_none() {
        problem(
            problems,
            "sensor.enabled",
            "the sensor needs the gateway: set gateway_cgroup, gateway_unit or gateway_pid",
        );
    }
    let gateway_ports = r
        .gateway_ports
        .unwrap_or_else(|| vec![DEFAULT_GATEWAY_PORT]);
    if gateway_ports.is_empty() || gateway_ports.len() > hearth_common::MAX_PORTS {
        problem(
            problems,
            "sensor.gateway_ports",
            format!("give 1 to {} ports", hearth_common::MAX_PORTS),
        );
    }
    if gateway_ports.contains(&0) {
        problem(problems, "sensor.gateway_ports", "port 0 is not a port");
    }
    let idle_after = duration(
        &r.idle_after,
        Duration::from_secs(120),
        "sensor.idle_after".into(),
        problems,
    );
    let poll_interval = duration(
        &r.poll_interval,
        Duration::from_secs(1),
        "sensor.poll_interval".into(),
        problems,
    );
    if poll_interval < Duration::from_millis(100) {
        problem(problems, "sensor.poll_interval", "must be at least 100ms");
    }
    let forget_after = duration(
        &r.forget_after,
        Duration::from_secs(600),
        "sensor.forget_after".into(),
        problems,
    );
    if let Some(u) = &r.report_to {
        match u.parse::<http::Uri>() {
            Ok(uri) if uri.scheme_str() == Some("http") && uri.host().is_some() => {}
            _ => problem(
                problems,
                "sensor.report_to",
                format!("{u:?}: expected the agent's base URL, e.g. \"http://llm-host:8000\""),
            ),
        }
    }
    if r.report_token
        .as_deref()
        .is_some_and(|t| t.trim().is_empty())
    {
        problem(problems, "sensor.report_token", "must not be empty");
    }
    let accept_tokens = r.accept_tokens.unwrap_or_default();
    for (i, t) in accept_tokens.iter().enumerate() {
        if t.trim().is_empty() {
            problem(
                problems,
                format!("sensor.accept_tokens[{i}]"),
                "a token must not be empty",
            );
        }
    }
    let report_buffer = match r.report_buffer {
        Some(0) => {
            problem(problems, "sensor.report_buffer", "must be at least 1");
            1
        }
        Some(n) => n as usize,
        None => 600,
    };
    let name = r.name.unwrap_or_else(|| {
        nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_else(|| "sensor".into())
    });
    if name.trim().is_empty() || name == "local" || name.contains('/') {
        problem(
            problems,
            "sensor.name",
            format!("{name:?}: must be non-empty, without '/', and not \"local\""),
        );
    }
    SensorConfig {
        enabled,
        gateway,
        gateway_ports,
        idle_after,
        poll_interval,
        forget_after,
        report_to: r.report_to,
        report_token: r.report_token,
        name,
        report_buffer,
        accept_tokens,
    }
}

fn parse_inner(text: &str, base: &Path, problems: &mut Vec<Problem>) -> Option<Config> {
    let root: toml::Table = match toml::from_str(text) {
        Ok(t) => t,
        Err(e) => {
            let mut reason = e.message().to_string();
            if let Some(span) = e.span() {
                let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
                reason = format!("line {line}: {reason}");
            }
            problem(problems, "", format!("invalid TOML: {reason}"));
            return None;
        }
    };
    for key in root.keys() {
        if !TOP_KEYS.contains(&key.as_str()) {
            problem(problems, key.clone(), "unknown key");
        }
    }
    let get = |k: &str| {
        root.get(k)
            .cloned()
            .unwrap_or_else(|| toml::Value::Table(Default::default()))
    };
    let raw_server: RawServer = section(get("server"), "server", problems);
    let raw_res: RawResources = section(get("resources"), "resources", problems);
    let raw_rt: RawRuntimes = section(get("runtimes"), "runtimes", problems);
    let raw_conf: RawConfinement = section(get("confinement"), "confinement", problems);
    let cgroups = match raw_conf.cgroups.as_deref() {
        None | Some("auto") => CgroupMode::Auto,
        Some("required") => CgroupMode::Required,
        Some("off") => CgroupMode::Off,
        Some(other) => {
            problem(
                problems,
                "confinement.cgroups",
                format!("{other:?}: expected \"auto\", \"required\" or \"off\""),
            );
            CgroupMode::Auto
        }
    };
    let cgroup_name = raw_conf.cgroup_name.unwrap_or_else(|| "hearth".into());
    if !valid_cgroup_name(&cgroup_name) {
        problem(
            problems,
            "confinement.cgroup_name",
            format!("{cgroup_name:?}: use 1-200 characters of A-Z a-z 0-9 . _ - : @ + (not starting with .)"),
        );
    }
    let check_user = |key: String, name: &str, problems: &mut Vec<Problem>| match user_exists(name)
    {
        Ok(true) => {}
        Ok(false) => problem(problems, key, format!("user {name:?} does not exist")),
        Err(e) => problem(problems, key, e),
    };
    if let Some(u) = &raw_conf.run_as {
        check_user("confinement.run_as".into(), u, problems);
    }
    let headroom = raw_conf.memory_headroom_mb;
    let raw_sensor: RawSensor = section(get("sensor"), "sensor", problems);
    let sensor = sensor_config(raw_sensor, problems);

    let listen = match raw_server
        .listen
        .as_deref()
        .unwrap_or("127.0.0.1:8000")
        .parse()
    {
        Ok(a) => a,
        Err(e) => {
            problem(problems, "server.listen", format!("invalid address: {e}"));
            SocketAddr::from(([127, 0, 0, 1], 8000))
        }
    };
    let api_keys = raw_server.api_keys.unwrap_or_default();
    for (i, k) in api_keys.iter().enumerate() {
        if k.trim().is_empty() {
            problem(
                problems,
                format!("server.api_keys[{i}]"),
                "an API key must not be empty",
            );
        }
    }
    let max_body_bytes = raw_server.max_body_bytes.unwrap_or(16 * 1024 * 1024);
    if max_body_bytes < 1024 {
        problem(problems, "server.max_body_bytes", "must be at least 1024");
    }
    let worker_threads = match raw_server.worker_threads.unwrap_or(1) {
        n @ 1..=256 => n as usize,
        n => {
            problem(
                problems,
                "server.worker_threads",
                format!("{n}: must be between 1 and 256"),
            );
            1
        }
    };
    let runtime_ports =
        match port_range(raw_server.runtime_ports.as_deref().unwrap_or("41000-41999")) {
            Ok(r) => r,
            Err(e) => {
                problem(problems, "server.runtime_ports", e);
                41000..=41999
            }
        };
    if runtime_ports.contains(&listen.port()) {
        problem(
            problems,
            "server.runtime_ports",
            format!("contains the listen port {}", listen.port()),
        );
    }
    let host_memory_mb = match raw_res.host_memory_mb {
        Some(0) => {
            problem(
                problems,
                "resources.host_memory_mb",
                "must be greater than 0",
            );
            0
        }
        Some(v) => v,
        None => {
            problem(
                problems,
                "resources.host_memory_mb",
                "missing: the host-RAM pool size in MB",
            );
            0
        }
    };

    let gpu_reserve_mb = raw_res.gpu_reserve_mb.unwrap_or(0);
    let nvml = match raw_res.nvml.as_deref() {
        None | Some("auto") => NvmlMode::Auto,
        Some("required") => NvmlMode::Required,
        Some("off") => NvmlMode::Off,
        Some(other) => {
            problem(
                problems,
                "resources.nvml",
                format!("{other:?}: expected \"auto\", \"required\" or \"off\""),
            );
            NvmlMode::Auto
        }
    };
    let gpu_release_timeout = duration(
        &raw_res.gpu_release_timeout,
        Duration::from_secs(15),
        "resources.gpu_release_timeout".into(),
        problems,
    );
    let gpu_poll_interval = duration(
        &raw_res.gpu_poll_interval,
        Duration::from_millis(500),
        "resources.gpu_poll_interval".into(),
        problems,
    );
    if gpu_poll_interval < Duration::from_millis(50) {
        problem(
            problems,
            "resources.gpu_poll_interval",
            "must be at least 50ms",
        );
    }
    let mut gpus: Vec<GpuDecl> = Vec::new();
    for (j, g) in raw_res.gpus.unwrap_or_default().into_iter().enumerate() {
        let key = |f: &str| format!("resources.gpus[{j}].{f}");
        if g.index.is_none() {
            problem(
                problems,
                key("index"),
                "missing: the GPU's index (as nvidia-smi numbers it)",
            );
        }
        match g.memory_mb {
            Some(0) | None => {
                problem(
                    problems,
                    key("memory_mb"),
                    "missing or 0: the GPU's memory in MB",
                );
            }
            Some(m) if m <= gpu_reserve_mb => problem(
                problems,
                key("memory_mb"),
                format!("{m} MB leaves nothing after resources.gpu_reserve_mb = {gpu_reserve_mb}"),
            ),
            Some(_) => {}
        }
        let (Some(index), Some(memory_mb)) = (g.index, g.memory_mb) else {
            continue;
        };
        if gpus.iter().any(|d| d.index == index) {
            problem(
                problems,
                key("index"),
                format!("GPU {index} is declared twice"),
            );
            continue;
        }
        gpus.push(GpuDecl { index, memory_mb });
    }
    let gpu_budget = |index: u32| {
        gpus.iter()
            .find(|d| d.index == index)
            .map(|d| d.memory_mb.saturating_sub(gpu_reserve_mb))
    };

    let raw_models: Vec<(usize, RawModel)> = match root.get("models") {
        None => {
            problem(problems, "models", "no [[models]] entry: nothing to serve");
            Vec::new()
        }
        Some(toml::Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, v)| (i, section(v.clone(), &format!("models[{i}]"), problems)))
            .collect(),
        Some(other) => {
            problem(
                problems,
                "models",
                format!(
                    "expected an array of tables ([[models]]), found {}",
                    other.type_str()
                ),
            );
            Vec::new()
        }
    };

    let mut models = Vec::new();
    let mut names: HashMap<String, String> = HashMap::new();
    for (i, m) in raw_models {
        let k = |f: &str| format!("models[{i}].{f}");
        let id = match m.id.as_deref().map(str::trim) {
            Some(id) if !id.is_empty() => id.to_string(),
            Some(_) => {
                problem(problems, k("id"), "must not be empty");
                continue;
            }
            None => {
                problem(problems, k("id"), "missing");
                continue;
            }
        };
        let label = |f: &str| format!("models[{i}] ({id}).{f}");
        if let Some(prev) = names.insert(id.clone(), label("id")) {
            problem(
                problems,
                label("id"),
                format!("duplicate name {id:?} (already used by {prev})"),
            );
        }
        let aliases = m.aliases.clone().unwrap_or_default();
        let mut seen = HashSet::new();
        for (j, a) in aliases.iter().enumerate() {
            let key = label(&format!("aliases[{j}]"));
            if a.trim().is_empty() {
                problem(problems, key, "must not be empty");
            } else if !seen.insert(a.clone()) {
                problem(problems, key, format!("alias {a:?} listed twice"));
            } else if let Some(prev) = names.insert(a.clone(), key.clone()) {
                problem(
                    problems,
                    key,
                    format!("duplicate name {a:?} (already used by {prev})"),
                );
            }
        }
        let Some(runtime) = m.runtime else {
            problem(
                problems,
                label("runtime"),
                "missing: one of \"llama-cpp\", \"vllm\", \"command\"",
            );
            continue;
        };
        let mut model_path = None;
        let mut command_args = Vec::new();
        let program = match runtime {
            RuntimeKind::LlamaCpp | RuntimeKind::Vllm => {
                if m.command.is_some() {
                    problem(
                        problems,
                        label("command"),
                        format!(
                            "only for runtime \"command\" (this model's runtime is {:?})",
                            runtime.as_str()
                        ),
                    );
                }
                match &m.model_path {
                    Some(p) if !p.trim().is_empty() => {
                        // A missing file is not a config error: it may appear later, and the start
                        // failure then says so with the runtime's own log lines. vLLM also takes a
                        // Hugging Face id ("org/name"): kept as written unless it names a path.
                        let local = p.starts_with('/')
                            || p.starts_with("./")
                            || p.starts_with("../")
                            || base.join(p).exists();
                        model_path = Some(if runtime == RuntimeKind::Vllm && !local {
                            PathBuf::from(p)
                        } else {
                            base.join(p)
                        });
                    }
                    _ => problem(
                        problems,
                        label("model_path"),
                        "missing: the model weights to serve",
                    ),
                }
                let (key, name) = if runtime == RuntimeKind::LlamaCpp {
                    (
                        "runtimes.llama_server",
                        raw_rt.llama_server.as_deref().unwrap_or("llama-server"),
                    )
                } else {
                    ("runtimes.vllm", raw_rt.vllm.as_deref().unwrap_or("vllm"))
                };
                match resolve_program(name, base) {
                    Ok(p) => p,
                    Err(e) => {
                        problem(problems, label("runtime"), format!("{e} (set {key})"));
                        PathBuf::new()
                    }
                }
            }
            RuntimeKind::Command => {
                model_path = m.model_path.as_ref().map(|p| base.join(p));
                match m.command.as_deref() {
                    Some([prog, rest @ ..]) => {
                        command_args = rest.to_vec();
                        if !rest.iter().any(|a| a.contains("{port}")) {
                            problem(
                                problems,
                                label("command"),
                                "must pass the port hearth allocates: add an argument with {port}",
                            );
                        }
                        match resolve_program(prog, base) {
                            Ok(p) => p,
                            Err(e) => {
                                problem(problems, label("command[0]"), e);
                                PathBuf::new()
                            }
                        }
                    }
                    _ => {
                        problem(
                            problems,
                            label("command"),
                            "missing: the argv of the runtime (runtime = \"command\")",
                        );
                        PathBuf::new()
                    }
                }
            }
        };
        let health_path = m.health_path.clone().unwrap_or_else(|| "/health".into());
        if !health_path.starts_with('/') {
            problem(problems, label("health_path"), "must start with /");
        }
        let memory_mb = match m.memory_mb {
            Some(0) | None => {
                problem(
                    problems,
                    label("memory_mb"),
                    "missing or 0: what the model holds while loaded, in MB",
                );
                0
            }
            Some(v) => v,
        };
        if host_memory_mb > 0 && memory_mb > host_memory_mb {
            problem(problems, label("memory_mb"), format!("{memory_mb} MB does not fit in pool \"host\" ({host_memory_mb} MB, resources.host_memory_mb)"));
        }
        let context_length = m.context_length.unwrap_or(4096);
        if context_length == 0 {
            problem(problems, label("context_length"), "must be greater than 0");
        }
        let max_concurrency = m.max_concurrency.unwrap_or(4);
        if max_concurrency == 0 {
            problem(problems, label("max_concurrency"), "must be at least 1");
        }
        let keep_warm = match m.keep_warm.as_deref().map(str::trim) {
            None => KeepWarm::For(Duration::from_secs(300)),
            Some("forever") | Some("never") => KeepWarm::Forever,
            Some(_) => KeepWarm::For(duration(
                &m.keep_warm,
                Duration::from_secs(300),
                label("keep_warm"),
                problems,
            )),
        };
        let min_residency = duration(
            &m.min_residency,
            Duration::from_secs(5),
            label("min_residency"),
            problems,
        );
        let start_timeout = duration(
            &m.start_timeout,
            Duration::from_secs(120),
            label("start_timeout"),
            problems,
        );
        let stop_timeout = duration(
            &m.stop_timeout,
            Duration::from_secs(10),
            label("stop_timeout"),
            problems,
        );
        if start_timeout.is_zero() {
            problem(problems, label("start_timeout"), "must be greater than 0");
        }
        let rq = m.queue.unwrap_or_default();
        let queue = QueueConfig {
            max: rq.max.unwrap_or(64) as usize,
            timeout: duration(
                &rq.timeout,
                Duration::from_secs(240),
                label("queue.timeout"),
                problems,
            ),
        };
        if queue.max == 0 {
            problem(
                problems,
                label("queue.max"),
                "must be at least 1 (every request passes through the queue, even when a slot is free)",
            );
        }
        if queue.timeout.is_zero() {
            problem(problems, label("queue.timeout"), "must be greater than 0");
        }
        let memory_max_explicit = m.memory_max_mb.is_some();
        let memory_max = match m.memory_max_mb {
            None => MemoryMax::Mb(default_memory_max_mb(memory_mb, headroom)),
            Some(RawMemoryMax::Mb(0)) => {
                problem(
                    problems,
                    label("memory_max_mb"),
                    "must be greater than 0 (\"unlimited\" for no limit)",
                );
                MemoryMax::Unlimited
            }
            Some(RawMemoryMax::Mb(v)) => MemoryMax::Mb(v),
            Some(RawMemoryMax::Word(w)) if w == "unlimited" => MemoryMax::Unlimited,
            Some(RawMemoryMax::Word(w)) => {
                problem(
                    problems,
                    label("memory_max_mb"),
                    format!("{w:?}: expected a number of MB or \"unlimited\""),
                );
                MemoryMax::Unlimited
            }
        };
        if let Some(w) = m.cpu_weight {
            if !(1..=10_000).contains(&w) {
                problem(
                    problems,
                    label("cpu_weight"),
                    format!("{w}: must be between 1 and 10000 (default 100)"),
                );
            }
        }
        if let Some(q) = m.cpu_quota {
            if !(q.is_finite() && q >= 0.01) {
                problem(
                    problems,
                    label("cpu_quota"),
                    format!("{q}: must be at least 0.01 (CPUs)"),
                );
            }
        }
        let pids_max = match m.pids_max {
            Some(0) => {
                problem(problems, label("pids_max"), "must be at least 1");
                None
            }
            v => v,
        };
        if let Some(c) = &m.cpuset {
            if !valid_cpuset(c) {
                problem(
                    problems,
                    label("cpuset"),
                    format!("{c:?}: expected a cpu list such as \"0-3,6\""),
                );
            }
        }
        if let Some(u) = &m.run_as {
            check_user(label("run_as"), u, problems);
        }
        let vram_mb = m.vram_mb.unwrap_or(0);
        let gpus_placement = match &m.gpus {
            None => GpuPlacement::Any,
            Some(RawGpus::Word(w)) if w == "any" => GpuPlacement::Any,
            Some(RawGpus::Word(w)) => {
                problem(
                    problems,
                    label("gpus"),
                    format!("{w:?}: expected \"any\" or a list of GPU indices such as [0]"),
                );
                GpuPlacement::Any
            }
            Some(RawGpus::List(l)) => {
                let mut l = l.clone();
                l.sort_unstable();
                let n = l.len();
                l.dedup();
                if l.is_empty() {
                    problem(
                        problems,
                        label("gpus"),
                        "an empty list: give GPU indices or \"any\"",
                    );
                } else if l.len() != n {
                    problem(problems, label("gpus"), "lists a GPU twice");
                }
                GpuPlacement::On(l)
            }
        };
        if m.gpus.is_some() && vram_mb == 0 {
            problem(
                problems,
                label("gpus"),
                "set vram_mb too: what the model holds on each GPU, in MB",
            );
        }
        if runtime == RuntimeKind::Vllm && vram_mb == 0 {
            problem(
                problems,
                label("vram_mb"),
                "missing: vLLM runs on a GPU; give what the model holds there, in MB (it sets --gpu-memory-utilization)",
            );
        }
        if vram_mb > 0 && !gpus.is_empty() {
            let listed: Vec<u32> = match &gpus_placement {
                GpuPlacement::On(l) => l.clone(),
                GpuPlacement::Any => Vec::new(),
            };
            for g in &listed {
                match gpu_budget(*g) {
                    None => problem(
                        problems,
                        label("gpus"),
                        format!(
                            "GPU {g} is not declared in [[resources.gpus]] (declared: {})",
                            gpus.iter().map(|d| d.index.to_string()).collect::<Vec<_>>().join(", ")
                        ),
                    ),
                    Some(b) if vram_mb > b => problem(
                        problems,
                        label("vram_mb"),
                        format!("{vram_mb} MB does not fit on GPU {g} ({b} MB: memory_mb - resources.gpu_reserve_mb)"),
                    ),
                    Some(_) => {}
                }
            }
            if listed.is_empty() {
                let best = gpus
                    .iter()
                    .map(|d| d.memory_mb.saturating_sub(gpu_reserve_mb))
                    .max()
                    .unwrap_or(0);
                if vram_mb > best {
                    problem(
                        problems,
                        label("vram_mb"),
                        format!("{vram_mb} MB does not fit on any declared GPU (largest budget {best} MB)"),
                    );
                }
            }
        }
        let sleep = match m.sleep.as_deref().map(str::trim) {
            None | Some("off") => None,
            Some(level @ ("level1" | "level2" | "1" | "2")) => {
                let level = if level.ends_with('1') {
                    SleepLevel::Level1
                } else {
                    SleepLevel::Level2
                };
                if runtime != RuntimeKind::Vllm {
                    problem(
                        problems,
                        label("sleep"),
                        format!(
                            "sleep mode is vLLM's (this model's runtime is {:?})",
                            runtime.as_str()
                        ),
                    );
                }
                let memory = m.sleep_memory_mb.unwrap_or(match level {
                    SleepLevel::Level1 => memory_mb + vram_mb,
                    SleepLevel::Level2 => memory_mb,
                });
                if host_memory_mb > 0 && memory > host_memory_mb {
                    problem(
                        problems,
                        label("sleep_memory_mb"),
                        format!("{memory} MB asleep does not fit in pool \"host\" ({host_memory_mb} MB){}", if m.sleep_memory_mb.is_none() { " (default for level 1: memory_mb + vram_mb; set sleep_memory_mb to what the weights take)" } else { "" }),
                    );
                }
                let vram = m
                    .sleep_vram_mb
                    .unwrap_or(DEFAULT_SLEEP_VRAM_MB.min(vram_mb));
                if vram > vram_mb {
                    problem(
                        problems,
                        label("sleep_vram_mb"),
                        format!("{vram} MB asleep is more than vram_mb = {vram_mb} awake"),
                    );
                }
                let keep_asleep = match m.keep_asleep.as_deref().map(str::trim) {
                    None | Some("forever") | Some("never") => KeepWarm::Forever,
                    Some(_) => KeepWarm::For(duration(
                        &m.keep_asleep,
                        Duration::from_secs(3600),
                        label("keep_asleep"),
                        problems,
                    )),
                };
                Some(SleepConfig {
                    level,
                    memory_mb: memory,
                    vram_mb: vram,
                    keep_asleep,
                })
            }
            Some(other) => {
                problem(
                    problems,
                    label("sleep"),
                    format!("{other:?}: expected \"off\", \"level1\" or \"level2\""),
                );
                None
            }
        };
        if sleep.is_none() {
            for (set, key) in [
                (m.sleep_memory_mb.is_some(), "sleep_memory_mb"),
                (m.sleep_vram_mb.is_some(), "sleep_vram_mb"),
                (m.keep_asleep.is_some(), "keep_asleep"),
            ] {
                if set {
                    problem(
                        problems,
                        label(key),
                        "only with sleep = \"level1\" or \"level2\"",
                    );
                }
            }
        }
        let limits = ModelLimits {
            memory_max,
            memory_max_explicit,
            cpu_weight: m.cpu_weight,
            cpu_quota: m.cpu_quota,
            pids_max,
            cpuset: m.cpuset.clone(),
            run_as: m.run_as.clone().or_else(|| raw_conf.run_as.clone()),
        };
        models.push(ModelConfig {
            id,
            aliases,
            runtime,
            program,
            model_path,
            command_args,
            health_path,
            args: m.args.unwrap_or_default(),
            env: m.env.unwrap_or_default(),
            memory_mb,
            context_length,
            max_concurrency,
            keep_warm,
            min_residency,
            start_timeout,
            stop_timeout,
            queue,
            limits,
            vram_mb,
            gpus: gpus_placement,
            sleep,
        });
    }
    let port_count = runtime_ports.clone().count();
    if models.len() > port_count {
        problem(
            problems,
            "server.runtime_ports",
            format!("{port_count} ports for {} models", models.len()),
        );
    }
    Some(Config {
        source: PathBuf::new(),
        server: ServerConfig {
            listen,
            api_keys,
            max_body_bytes: max_body_bytes as usize,
            runtime_ports,
            worker_threads,
        },
        resources: ResourcesConfig {
            host_memory_mb,
            gpu_reserve_mb,
            gpus,
            nvml,
            gpu_release_timeout,
            gpu_poll_interval,
        },
        confinement: ConfinementConfig {
            cgroups,
            cgroup_name,
        },
        sensor,
        models,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().expect("tempdir");
        let prog = dir.path().join("llama-server");
        std::fs::write(&prog, "").expect("write");
        let text = text.replace("LLAMA", &prog.display().to_string());
        Config::parse(&text, Path::new("t.toml"), dir.path())
    }

    const GOOD: &str = r#"
[server]
listen = "127.0.0.1:8000"
api_keys = ["sk-local"]
[resources]
host_memory_mb = 1000
[runtimes]
llama_server = "LLAMA"
[[models]]
id = "a"
aliases = ["fast"]
runtime = "llama-cpp"
model_path = "a.gguf"
memory_mb = 300
keep_warm = "5m"
queue = { max = 8, timeout = "30s" }
[[models]]
id = "b"
runtime = "llama-cpp"
model_path = "/abs/b.gguf"
memory_mb = 700
keep_warm = "forever"
"#;

    #[test]
    fn good_config_parses_with_defaults_and_resolved_paths() {
        let cfg = parse(GOOD).expect("valid");
        assert_eq!(cfg.models.len(), 2);
        let a = &cfg.models[0];
        assert_eq!(a.aliases, vec!["fast"]);
        assert!(a.model_path.as_ref().expect("path").is_absolute());
        assert_eq!(a.queue.max, 8);
        assert_eq!(a.queue.timeout, Duration::from_secs(30));
        assert_eq!(a.keep_warm, KeepWarm::For(Duration::from_secs(300)));
        assert_eq!(a.max_concurrency, 4);
        assert_eq!(cfg.models[1].keep_warm, KeepWarm::Forever);
        assert_eq!(
            cfg.models[1].model_path.as_deref(),
            Some(Path::new("/abs/b.gguf"))
        );
        assert_eq!(cfg.server.api_keys, vec!["sk-local"]);
    }

    fn parse_with_vllm(text: &str) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().expect("tempdir");
        for name in ["llama-server", "vllm"] {
            std::fs::write(dir.path().join(name), "").expect("write");
        }
        let text = text
            .replace(
                "LLAMA",
                &dir.path().join("llama-server").display().to_string(),
            )
            .replace("VLLM", &dir.path().join("vllm").display().to_string());
        Config::parse(&text, Path::new("t.toml"), dir.path())
    }

    #[test]
    fn gpu_pools_placement_and_sleep_parse_with_defaults() {
        let cfg = parse_with_vllm(
            r#"
[resources]
host_memory_mb = 64000
gpu_reserve_mb = 1000
[[resources.gpus]]
index = 0
memory_mb = 81559
[[resources.gpus]]
index = 1
memory_mb = 81559
[runtimes]
vllm = "VLLM"
llama_server = "LLAMA"
[[models]]
id = "big"
runtime = "vllm"
model_path = "Qwen/Qwen2.5-7B-Instruct"
memory_mb = 2000
vram_mb = 40000
gpus = [1, 0]
sleep = "level1"
keep_asleep = "30m"
[[models]]
id = "small"
runtime = "vllm"
model_path = "org/small"
memory_mb = 1000
vram_mb = 10000
sleep = "level2"
[[models]]
id = "gguf"
runtime = "llama-cpp"
model_path = "m.gguf"
memory_mb = 500
vram_mb = 600
"#,
        )
        .expect("valid");
        let r = &cfg.resources;
        assert_eq!(r.gpu_reserve_mb, 1000);
        assert_eq!(r.gpus.len(), 2);
        assert_eq!(r.nvml, NvmlMode::Auto);
        assert_eq!(r.gpu_release_timeout, Duration::from_secs(15));
        let big = &cfg.models[0];
        // A Hugging Face id stays as written; a path is resolved.
        assert_eq!(
            big.model_path.as_deref(),
            Some(Path::new("Qwen/Qwen2.5-7B-Instruct"))
        );
        assert!(cfg.models[2]
            .model_path
            .as_ref()
            .expect("path")
            .is_absolute());
        assert_eq!(big.gpus, GpuPlacement::On(vec![0, 1]));
        let s = big.sleep.expect("sleep");
        assert_eq!(s.level, SleepLevel::Level1);
        assert_eq!(s.memory_mb, 42000, "level 1 default: memory_mb + vram_mb");
        assert_eq!(s.vram_mb, DEFAULT_SLEEP_VRAM_MB);
        assert_eq!(s.keep_asleep, KeepWarm::For(Duration::from_secs(1800)));
        let small = cfg.models[1].sleep.expect("sleep");
        assert_eq!(small.memory_mb, 1000, "level 2 default: memory_mb");
        assert_eq!(small.keep_asleep, KeepWarm::Forever);
        assert_eq!(cfg.models[1].gpus, GpuPlacement::Any);
        assert!(cfg.models[2].uses_gpu() && cfg.models[2].sleep.is_none());
    }

    #[test]
    fn gpu_and_sleep_problems_are_all_reported() {
        let err = parse_with_vllm(
            r#"
[resources]
host_memory_mb = 4000
gpu_reserve_mb = 500
nvml = "sometimes"
gpus = [{ index = 0, memory_mb = 20000 }, { index = 0, memory_mb = 1 }, { memory_mb = 5 }]
[runtimes]
vllm = "VLLM"
llama_server = "LLAMA"
[[models]]
id = "novram"
runtime = "vllm"
model_path = "org/m"
memory_mb = 100
[[models]]
id = "toobig"
runtime = "vllm"
model_path = "org/m"
memory_mb = 100
vram_mb = 30000
[[models]]
id = "nogpu"
runtime = "vllm"
model_path = "org/m"
memory_mb = 100
vram_mb = 100
gpus = [3]
sleep = "deep"
[[models]]
id = "cpp"
runtime = "llama-cpp"
model_path = "m.gguf"
memory_mb = 100
gpus = "all"
sleep = "level1"
[[models]]
id = "asleep"
runtime = "vllm"
model_path = "org/m"
memory_mb = 100
vram_mb = 10000
sleep = "level1"
keep_asleep = "later"
[[models]]
id = "stray"
runtime = "vllm"
model_path = "org/m"
memory_mb = 100
vram_mb = 100
sleep_vram_mb = 5
"#,
        )
        .expect_err("invalid");
        let text = err.to_string();
        for expected in [
            "resources.nvml",
            "resources.gpus[1].index",
            "resources.gpus[2].index",
            "resources.gpus[2].memory_mb",
            "models[0] (novram).vram_mb",
            "models[1] (toobig).vram_mb",
            "models[2] (nogpu).gpus",
            "models[2] (nogpu).sleep",
            "models[3] (cpp).gpus",
            "models[3] (cpp).sleep",
            "models[4] (asleep).sleep_memory_mb",
            "models[4] (asleep).keep_asleep",
            "models[5] (stray).sleep_vram_mb",
        ] {
            assert!(
                err.problems.iter().any(|p| p.key == expected),
                "missing {expected} in:\n{text}"
            );
        }
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let bad = r#"
colour = "red"
[server]
listen = "nowhere"
bogus = 1
[resources]
host_memory_mb = 500
[runtimes]
llama_server = "LLAMA"
[[models]]
id = "a"
runtime = "llama-cpp"
model_path = "a.gguf"
memory_mb = "lots"
context_length = -5
keep_warm = "soon"
typo_key = true
queue = { max = 0 }
[[models]]
id = "a"
aliases = ["a"]
runtime = "llama-cpp"
model_path = "b.gguf"
memory_mb = 900
"#;
        let err = parse(bad).expect_err("invalid");
        let keys: Vec<&str> = err.problems.iter().map(|p| p.key.as_str()).collect();
        let text = err.to_string();
        for expected in [
            "colour",
            "server.bogus",
            "server.listen",
            "models[0].memory_mb",
            "models[0].context_length",
            "models[0].typo_key",
            "models[0] (a).keep_warm",
            "models[0] (a).queue.max",
            "models[1] (a).id",
            "models[1] (a).aliases[0]",
            "models[1] (a).memory_mb",
        ] {
            assert!(
                keys.contains(&expected),
                "missing {expected} in {keys:?}\n{text}"
            );
        }
        assert!(
            text.contains("t.toml: models[1] (a).memory_mb: 900 MB does not fit"),
            "{text}"
        );
        assert!(text.contains("duplicate name \"a\""), "{text}");
    }

    #[test]
    fn confinement_keys_defaults_and_problems() {
        let cfg = parse(GOOD).expect("valid");
        assert_eq!(cfg.confinement.cgroups, CgroupMode::Auto);
        assert_eq!(cfg.confinement.cgroup_name, "hearth");
        let a = &cfg.models[0].limits;
        // 300 MB declared: + max(256, 25 %) headroom
        assert_eq!(a.memory_max, MemoryMax::Mb(556));
        assert_eq!(cfg.models[1].limits.memory_max, MemoryMax::Mb(956));
        assert_eq!(a.pids_max, None);
        assert!(!a.memory_max_explicit);
        assert_eq!(a.run_as, None);

        let good = GOOD.replace(
            "keep_warm = \"forever\"",
            "keep_warm = \"forever\"\nmemory_max_mb = \"unlimited\"\ncpu_quota = 2.5\ncpu_weight = 300\ncpuset = \"0-1,3\"\nrun_as = \"root\"",
        ) + "[confinement]\ncgroups = \"required\"\ncgroup_name = \"hearth-b\"\nmemory_headroom_mb = 100\n";
        let cfg = parse(&good).expect("valid");
        assert_eq!(cfg.confinement.cgroups, CgroupMode::Required);
        assert_eq!(cfg.confinement.cgroup_name, "hearth-b");
        assert_eq!(cfg.models[0].limits.memory_max, MemoryMax::Mb(400));
        let b = &cfg.models[1].limits;
        assert_eq!(b.memory_max, MemoryMax::Unlimited);
        assert_eq!((b.cpu_quota, b.cpu_weight), (Some(2.5), Some(300)));
        assert_eq!(b.cpuset.as_deref(), Some("0-1,3"));
        assert_eq!(b.run_as.as_deref(), Some("root"));

        let bad = GOOD.replace(
            "keep_warm = \"forever\"",
            "keep_warm = \"forever\"\nmemory_max_mb = \"huge\"\ncpu_quota = 0.0\ncpu_weight = 0\npids_max = 0\ncpuset = \"3-1\"\nrun_as = \"no-such-user-hearth\"",
        ) + "[confinement]\ncgroups = \"sometimes\"\ncgroup_name = \"a/b\"\nrun_as = \"also-missing-hearth\"\n";
        let err = parse(&bad).expect_err("invalid");
        let text = err.to_string();
        for expected in [
            "confinement.cgroups: \"sometimes\"",
            "confinement.cgroup_name: \"a/b\"",
            "confinement.run_as: user \"also-missing-hearth\" does not exist",
            "models[1] (b).memory_max_mb: \"huge\"",
            "models[1] (b).cpu_quota",
            "models[1] (b).cpu_weight",
            "models[1] (b).pids_max",
            "models[1] (b).cpuset: \"3-1\"",
            "models[1] (b).run_as: user \"no-such-user-hearth\" does not exist",
        ] {
            assert!(text.contains(expected), "missing {expected}:\n{text}");
        }
    }

    #[test]
    fn syntax_errors_name_the_line() {
        let err = parse("[server]\nlisten = \n").expect_err("invalid");
        assert!(err.problems[0].reason.contains("line 2"), "{err}");
    }

    #[test]
    fn command_runtime_needs_port_placeholder_and_program() {
        let err = parse(
            r#"
[resources]
host_memory_mb = 100
[[models]]
id = "c"
runtime = "command"
command = ["/no/such/prog", "--x"]
memory_mb = 10
"#,
        )
        .expect_err("invalid");
        let t = err.to_string();
        assert!(
            t.contains("models[0] (c).command: must pass the port"),
            "{t}"
        );
        assert!(
            t.contains("models[0] (c).command[0]: program /no/such/prog does not exist"),
            "{t}"
        );
    }

    #[test]
    fn missing_pool_and_models_are_reported() {
        let err = parse("[server]\n").expect_err("invalid");
        let keys: Vec<&str> = err.problems.iter().map(|p| p.key.as_str()).collect();
        assert!(keys.contains(&"resources.host_memory_mb"));
        assert!(keys.contains(&"models"));
    }
}
