//! GPUs as scheduled resources: what NVML measures, or what the config declares.
//!
//! At start [`setup`] finds the GPUs (NVML through `nvml-wrapper`, which loads the driver's
//! `libnvidia-ml.so.1` at run time, so hearth builds and runs without a driver) and makes one pool
//! per GPU: its budget is its memory minus `[resources] gpu_reserve_mb` (a declared `memory_mb`
//! caps it). A poller thread then reads NVML every `gpu_poll_interval`: each device's used memory
//! and its processes' memory, which the supervisor maps to runtimes by pid. Without NVML the declared
//! pools are used as they are and nothing is measured.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::time::{Duration, Instant};

use nvml_wrapper::enums::device::UsedGpuMemory as Used;
use nvml_wrapper::struct_wrappers::device::ProcessInfo;
use nvml_wrapper::Nvml;
use serde::Serialize;
use tokio::sync::watch;

use crate::config::{GpuPlacement, ModelConfig, NvmlMode, ResourcesConfig};

const MB: u64 = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    #[error("NVML could not be loaded ({tried}): {source}")]
    Load {
        tried: String,
        #[source]
        source: nvml_wrapper::error::NvmlError,
    },
    #[error("NVML: {what}: {source}")]
    Nvml {
        what: String,
        #[source]
        source: nvml_wrapper::error::NvmlError,
    },
    #[error("resources.nvml = \"required\" but {0}")]
    Required(String),
    #[error("[[resources.gpus]] declares GPU {index}, which NVML does not see (it sees {seen})")]
    NotPresent { index: u32, seen: String },
    #[error("{0}")]
    Models(String),
}

/// Where the GPU pools come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    Nvml,
    Config,
}

/// One GPU pool.
#[derive(Debug, Clone, Serialize)]
pub struct GpuPool {
    pub index: u32,
    pub name: String,
    pub uuid: Option<String>,
    pub source: Source,
    /// The GPU's memory (NVML, or as declared).
    pub total_mb: u64,
    /// What hearth may schedule there at most: total - gpu_reserve_mb, or less where
    /// `[[resources.gpus]] memory_mb` caps it on a measured GPU.
    pub budget_mb: u64,
    /// `gpu_reserve_mb`.
    pub reserve_mb: u64,
}

impl GpuPool {
    /// What hearth may schedule now, given `foreign_mb` in use by others (NVML): the budget, or
    /// less when the GPU itself has less left.
    pub fn capacity_mb(&self, foreign_mb: u64) -> u64 {
        self.budget_mb.min(
            self.total_mb
                .saturating_sub(self.reserve_mb)
                .saturating_sub(foreign_mb),
        )
    }
}

/// The GPUs found at start.
pub struct GpuSetup {
    pub pools: Vec<GpuPool>,
    /// How the GPUs were found, or why NVML is not used: for the log and status.
    pub reason: String,
    pub nvml: Option<NvmlProbe>,
}

/// Memory one process uses on one GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ProcessVram {
    pub pid: u32,
    pub used_bytes: u64,
}

/// One device as NVML reads it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeviceReading {
    pub index: u32,
    pub total_bytes: u64,
    pub used_bytes: u64,
    /// What the driver sets aside (NVML's memory info v2): never available.
    pub reserved_bytes: u64,
    pub processes: Vec<ProcessVram>,
}

/// One NVML reading of every device.
#[derive(Debug, Clone)]
pub struct GpuReading {
    pub at: Instant,
    pub devices: Vec<DeviceReading>,
}

impl GpuReading {
    pub fn device(&self, index: u32) -> Option<&DeviceReading> {
        self.devices.iter().find(|d| d.index == index)
    }
}

/// NVML, opened.
pub struct NvmlProbe {
    nvml: Nvml,
    indices: Vec<u32>,
}

/// The library names tried in order: the driver installs the versioned name; the bare one only
/// comes with development packages.
const NVML_LIBS: [&str; 2] = ["libnvidia-ml.so.1", "libnvidia-ml.so"];

fn open_nvml() -> Result<Nvml, GpuError> {
    let mut last = None;
    for lib in NVML_LIBS {
        match Nvml::builder().lib_path(OsStr::new(lib)).init() {
            Ok(n) => return Ok(n),
            Err(e) => last = Some(e),
        }
    }
    Err(GpuError::Load {
        tried: NVML_LIBS.join(", "),
        source: last.unwrap_or(nvml_wrapper::error::NvmlError::Unknown),
    })
}

fn nvml_err(what: impl Into<String>) -> impl FnOnce(nvml_wrapper::error::NvmlError) -> GpuError {
    let what = what.into();
    move |source| GpuError::Nvml { what, source }
}

/// Merges the compute and graphics process lists (a process with both contexts appears in both,
/// with the same memory): one entry per pid, the larger figure.
pub fn merge_processes(lists: &[Vec<ProcessInfo>]) -> Vec<ProcessVram> {
    let mut by_pid: BTreeMap<u32, u64> = BTreeMap::new();
    for p in lists.iter().flatten() {
        let used = match p.used_gpu_memory {
            Used::Used(b) => b,
            Used::Unavailable => 0,
        };
        let e = by_pid.entry(p.pid).or_default();
        *e = (*e).max(used);
    }
    by_pid
        .into_iter()
        .map(|(pid, used_bytes)| ProcessVram { pid, used_bytes })
        .collect()
}

impl NvmlProbe {
    /// Reads every device once.
    pub fn read(&self) -> Result<GpuReading, GpuError> {
        let mut devices = Vec::with_capacity(self.indices.len());
        for &index in &self.indices {
            let d = self
                .nvml
                .device_by_index(index)
                .map_err(nvml_err(format!("GPU {index}")))?;
            let mem = d
                .memory_info()
                .map_err(nvml_err(format!("GPU {index}: memory")))?;
            let compute = d
                .running_compute_processes()
                .map_err(nvml_err(format!("GPU {index}: compute processes")))?;
            // Vulkan and OpenGL runtimes (llama.cpp's Vulkan build) have graphics contexts; some
            // drivers refuse the query: then only the compute list counts.
            let graphics = d.running_graphics_processes().unwrap_or_default();
            devices.push(DeviceReading {
                index,
                total_bytes: mem.total,
                used_bytes: mem.used,
                reserved_bytes: mem.reserved,
                processes: merge_processes(&[compute, graphics]),
            });
        }
        Ok(GpuReading {
            at: Instant::now(),
            devices,
        })
    }

    /// Reads NVML every `every` on a thread of its own (NVML calls block) and publishes each reading;
    /// returns the receiver. The thread ends when every receiver is gone.
    pub fn spawn_poller(self, every: Duration) -> watch::Receiver<Option<GpuReading>> {
        let (tx, rx) = watch::channel(None);
        let spawned = std::thread::Builder::new()
            .name("hearth-nvml".into())
            .spawn(move || {
                let mut failing = false;
                loop {
                    match self.read() {
                        Ok(r) => {
                            if failing {
                                tracing::info!("NVML readings are back");
                                failing = false;
                            }
                            if tx.send(Some(r)).is_err() {
                                return;
                            }
                        }
                        Err(e) => {
                            if !failing {
                                tracing::warn!(error = %e, "reading the GPUs failed; scheduling with the last reading and the accounted memory");
                                failing = true;
                            }
                            if tx.is_closed() {
                                return;
                            }
                        }
                    }
                    std::thread::sleep(every);
                }
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the NVML poller thread; GPUs are not measured");
        }
        rx
    }
}

/// Finds the GPUs and builds the pools.
pub fn setup(res: &ResourcesConfig) -> Result<GpuSetup, GpuError> {
    let declared = || -> Vec<GpuPool> {
        res.gpus
            .iter()
            .map(|d| GpuPool {
                index: d.index,
                name: format!("GPU {} (declared)", d.index),
                uuid: None,
                source: Source::Config,
                total_mb: d.memory_mb,
                budget_mb: d.memory_mb.saturating_sub(res.gpu_reserve_mb),
                reserve_mb: res.gpu_reserve_mb,
            })
            .collect()
    };
    let without = |why: String| {
        let pools = declared();
        let reason = if pools.is_empty() {
            format!("no GPUs: {why}, and none declared in [[resources.gpus]]")
        } else {
            format!("GPUs as declared in [[resources.gpus]] (not measured): {why}")
        };
        GpuSetup {
            pools,
            reason,
            nvml: None,
        }
    };
    if res.nvml == NvmlMode::Off {
        return Ok(without("NVML is off (resources.nvml = \"off\")".into()));
    }
    let nvml = match open_nvml() {
        Ok(n) => n,
        Err(e) if res.nvml == NvmlMode::Required => return Err(GpuError::Required(e.to_string())),
        Err(e) => return Ok(without(e.to_string())),
    };
    let count = nvml.device_count().map_err(nvml_err("device count"))?;
    let mut pools = Vec::new();
    for index in 0..count {
        let d = nvml
            .device_by_index(index)
            .map_err(nvml_err(format!("GPU {index}")))?;
        let mem = d
            .memory_info()
            .map_err(nvml_err(format!("GPU {index}: memory")))?;
        let total_mb = mem.total / MB;
        let available = total_mb.saturating_sub(res.gpu_reserve_mb);
        let budget_mb = res
            .gpus
            .iter()
            .find(|g| g.index == index)
            .map_or(available, |g| g.memory_mb.min(available));
        pools.push(GpuPool {
            index,
            name: d.name().unwrap_or_else(|_| format!("GPU {index}")),
            uuid: d.uuid().ok(),
            source: Source::Nvml,
            total_mb,
            budget_mb,
            reserve_mb: res.gpu_reserve_mb,
        });
    }
    for g in &res.gpus {
        if !pools.iter().any(|p| p.index == g.index) {
            return Err(GpuError::NotPresent {
                index: g.index,
                seen: if pools.is_empty() {
                    "none".into()
                } else {
                    pools
                        .iter()
                        .map(|p| p.index.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                },
            });
        }
    }
    let reason = format!(
        "NVML: {} GPU(s): {}",
        pools.len(),
        pools
            .iter()
            .map(|p| format!(
                "{} {} ({} MB, budget {} MB)",
                p.index, p.name, p.total_mb, p.budget_mb
            ))
            .collect::<Vec<_>>()
            .join("; ")
    );
    let indices = pools.iter().map(|p| p.index).collect();
    Ok(GpuSetup {
        pools,
        reason,
        nvml: Some(NvmlProbe { nvml, indices }),
    })
}

/// Checks every GPU model against the pools found at start; all problems at once, each naming the
/// model and key.
pub fn check_models(models: &[ModelConfig], pools: &[GpuPool]) -> Result<(), GpuError> {
    let mut problems = Vec::new();
    let budget = |i: u32| pools.iter().find(|p| p.index == i).map(|p| p.budget_mb);
    for m in models.iter().filter(|m| m.uses_gpu()) {
        match &m.gpus {
            GpuPlacement::On(list) => {
                for g in list {
                    match budget(*g) {
                        None => problems.push(format!(
                            "model {}: gpus lists GPU {g}, which this host does not have",
                            m.id
                        )),
                        Some(b) if m.vram_mb > b => problems.push(format!(
                            "model {}: vram_mb = {} does not fit on GPU {g} (budget {b} MB)",
                            m.id, m.vram_mb
                        )),
                        Some(_) => {}
                    }
                }
            }
            GpuPlacement::Any => {
                let best = pools.iter().map(|p| p.budget_mb).max();
                match best {
                    None => problems.push(format!(
                        "model {}: vram_mb = {} but this host has no GPU (no NVML and no [[resources.gpus]])",
                        m.id, m.vram_mb
                    )),
                    Some(b) if m.vram_mb > b => problems.push(format!(
                        "model {}: vram_mb = {} does not fit on any GPU (largest budget {b} MB)",
                        m.id, m.vram_mb
                    )),
                    Some(_) => {}
                }
            }
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(GpuError::Models(problems.join("; ")))
    }
}

/// vLLM's `--gpu-memory-utilization`: the fraction of the GPU's memory the instance may take,
/// rounded down to 2 decimals (never above what was granted), at least 0.01.
pub fn memory_utilization(vram_mb: u64, total_mb: u64) -> f64 {
    if total_mb == 0 {
        return 0.01;
    }
    let hundredths = (vram_mb.saturating_mul(100) / total_mb).clamp(1, 100);
    hundredths as f64 / 100.0
}

/// The pids of `pid` and its descendants, from `/proc/<pid>/task/<tid>/children` (a runtime
/// without a cgroup).
pub fn descendants(pid: u32) -> Vec<u32> {
    let mut out = vec![pid];
    let mut i = 0;
    while i < out.len() && out.len() < 4096 {
        let p = out[i];
        i += 1;
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{p}/task")) else {
            continue;
        };
        for t in tasks.flatten() {
            if let Ok(c) = std::fs::read_to_string(t.path().join("children")) {
                out.extend(c.split_whitespace().filter_map(|x| x.parse::<u32>().ok()));
            }
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::GpuDecl;

    fn proc_info(pid: u32, used: u64) -> ProcessInfo {
        ProcessInfo {
            pid,
            used_gpu_memory: Used::Used(used),
            gpu_instance_id: None,
            compute_instance_id: None,
        }
    }

    #[test]
    fn processes_in_both_lists_count_once() {
        let compute = vec![proc_info(10, 368 * MB), proc_info(11, 6662 * MB)];
        let graphics = vec![proc_info(10, 368 * MB), proc_info(12, 5 * MB)];
        let merged = merge_processes(&[compute, graphics]);
        assert_eq!(
            merged,
            vec![
                ProcessVram {
                    pid: 10,
                    used_bytes: 368 * MB
                },
                ProcessVram {
                    pid: 11,
                    used_bytes: 6662 * MB
                },
                ProcessVram {
                    pid: 12,
                    used_bytes: 5 * MB
                },
            ]
        );
    }

    #[test]
    fn utilization_rounds_down_and_stays_in_range() {
        assert_eq!(memory_utilization(40000, 80000), 0.5);
        assert_eq!(memory_utilization(20000, 81559), 0.24);
        assert_eq!(memory_utilization(1, 81559), 0.01);
        assert_eq!(memory_utilization(90000, 80000), 1.0);
        assert_eq!(memory_utilization(1, 0), 0.01);
    }

    fn res(gpus: Vec<GpuDecl>) -> ResourcesConfig {
        ResourcesConfig {
            host_memory_mb: 1000,
            gpu_reserve_mb: 500,
            gpus,
            nvml: NvmlMode::Off,
            gpu_release_timeout: Duration::from_secs(1),
            gpu_poll_interval: Duration::from_secs(1),
        }
    }

    #[test]
    fn declared_pools_without_nvml() {
        let s = setup(&res(vec![GpuDecl {
            index: 0,
            memory_mb: 80000,
        }]))
        .expect("setup");
        assert!(s.nvml.is_none());
        assert_eq!(s.pools.len(), 1);
        assert_eq!(s.pools[0].budget_mb, 79500);
        assert_eq!(s.pools[0].source, Source::Config);
        assert_eq!(s.pools[0].capacity_mb(0), 79500);
        assert!(s.reason.contains("declared"), "{}", s.reason);
        let none = setup(&res(vec![])).expect("setup");
        assert!(none.pools.is_empty());
        assert!(none.reason.contains("no GPUs"), "{}", none.reason);
    }

    #[test]
    fn a_declared_cap_holds_until_others_leave_less() {
        let p = GpuPool {
            index: 0,
            name: "H100".into(),
            uuid: None,
            source: Source::Nvml,
            total_mb: 81559,
            budget_mb: 2000,
            reserve_mb: 500,
        };
        assert_eq!(p.capacity_mb(600), 2000);
        assert_eq!(p.capacity_mb(80_000), 81559 - 500 - 80_000);
        assert_eq!(p.capacity_mb(90_000), 0);
    }

    #[test]
    fn required_nvml_without_a_driver_is_an_error() {
        // CI machines have no NVIDIA driver; on a GPU host this test checks nothing.
        if open_nvml().is_ok() {
            eprintln!("NVML present on this machine: skipping the no-driver check");
            return;
        }
        let mut r = res(vec![]);
        r.nvml = NvmlMode::Required;
        let e = setup(&r).err().expect("an error");
        assert!(e.to_string().contains("required"), "{e}");
        r.nvml = NvmlMode::Auto;
        let s = setup(&r).expect("auto falls back");
        assert!(
            s.reason.contains("NVML could not be loaded"),
            "{}",
            s.reason
        );
    }

    #[test]
    fn descendants_include_the_process_itself() {
        let me = std::process::id();
        assert!(descendants(me).contains(&me));
    }
}
