//! Prometheus metrics (`hearth_` prefix), one registry per daemon.

use prometheus::{
    exponential_buckets, CounterVec, Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::scheduler::Phase;

#[derive(Debug, thiserror::Error)]
#[error("metric {name}: {source}")]
pub struct MetricsError {
    name: &'static str,
    #[source]
    source: prometheus::Error,
}

/// Gauges of one model.
pub struct ModelGauges {
    state: [IntGauge; Phase::ALL.len()],
    pub memory: IntGauge,
    pub queue_depth: IntGauge,
    pub in_flight: IntGauge,
    pub runtime_memory: IntGauge,
    pub runtime_memory_peak: IntGauge,
    pub runtime_pids: IntGauge,
    pub runtime_cpu: prometheus::Counter,
}

impl ModelGauges {
    pub fn set_state(&self, phase: Phase) {
        for (g, p) in self.state.iter().zip(Phase::ALL) {
            g.set(i64::from(p == phase));
        }
    }
}

#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub in_flight: IntGaugeVec,
    pub queue_depth: IntGaugeVec,
    pub queue_wait: HistogramVec,
    pub model_state: IntGaugeVec,
    pub model_memory: IntGaugeVec,
    pub pool_capacity: IntGaugeVec,
    pub pool_used: IntGaugeVec,
    pub load_duration: HistogramVec,
    pub evictions: IntCounterVec,
    pub starts: IntCounterVec,
    pub restarts: IntCounterVec,
    pub failures: IntCounterVec,
    pub runtime_memory: IntGaugeVec,
    pub runtime_memory_peak: IntGaugeVec,
    pub runtime_memory_limit: IntGaugeVec,
    pub runtime_cpu: CounterVec,
    pub runtime_cpu_quota: prometheus::GaugeVec,
    pub runtime_pids: IntGaugeVec,
    pub runtime_pids_limit: IntGaugeVec,
    pub oom_kills: IntCounterVec,
    pub confinement: IntGaugeVec,
    pub sensor_up: IntGauge,
    pub gateway_sessions: IntGaugeVec,
    pub gateway_bytes: IntCounterVec,
    pub sensor_dropped: IntGaugeVec,
    pub sensor_lost_events: IntGaugeVec,
    pub model_tier: IntGaugeVec,
    pub model_vram: IntGaugeVec,
    pub sleeps: IntCounterVec,
    pub wakes: IntCounterVec,
    pub gpu_total: IntGaugeVec,
    pub gpu_budget: IntGaugeVec,
    pub gpu_used: IntGaugeVec,
    pub gpu_measured: IntGaugeVec,
    pub gpu_foreign: IntGaugeVec,
    pub runtime_vram: IntGaugeVec,
    pub gpu_release_wait: HistogramVec,
}

fn reg<C: prometheus::core::Collector + Clone + 'static>(
    r: &Registry,
    name: &'static str,
    c: Result<C, prometheus::Error>,
) -> Result<C, MetricsError> {
    let c = c.map_err(|source| MetricsError { name, source })?;
    r.register(Box::new(c.clone()))
        .map_err(|source| MetricsError { name, source })?;
    Ok(c)
}

impl Metrics {
    pub fn new() -> Result<Self, MetricsError> {
        let r = Registry::new();
        let counter = |name: &'static str, help: &str, labels: &[&str]| {
            reg(&r, name, IntCounterVec::new(Opts::new(name, help), labels))
        };
        let gauge = |name: &'static str, help: &str, labels: &[&str]| {
            reg(&r, name, IntGaugeVec::new(Opts::new(name, help), labels))
        };
        let wait_buckets = exponential_buckets(0.001, 2.5, 14).unwrap_or_default();
        let load_buckets = exponential_buckets(0.05, 2.0, 14).unwrap_or_default();
        Ok(Metrics {
            requests: counter(
                "hearth_requests_total",
                "Requests answered, by model and HTTP status",
                &["model", "status"],
            )?,
            in_flight: gauge(
                "hearth_requests_in_flight",
                "Requests forwarded to a runtime and not finished",
                &["model"],
            )?,
            queue_depth: gauge(
                "hearth_queue_depth",
                "Requests waiting for their model",
                &["model"],
            )?,
            queue_wait: reg(
                &r,
                "hearth_queue_wait_seconds",
                HistogramVec::new(
                    HistogramOpts::new(
                        "hearth_queue_wait_seconds",
                        "Time a request waited before it was forwarded",
                    )
                    .buckets(wait_buckets),
                    &["model"],
                ),
            )?,
            model_state: gauge(
                "hearth_model_state",
                "1 for the model's current state",
                &["model", "state"],
            )?,
            model_memory: gauge(
                "hearth_model_memory_bytes",
                "Memory the model is accounted for while loaded",
                &["model"],
            )?,
            pool_capacity: gauge(
                "hearth_pool_capacity_bytes",
                "Capacity of a memory pool",
                &["pool"],
            )?,
            pool_used: gauge(
                "hearth_pool_used_bytes",
                "Memory of a pool held by runtimes",
                &["pool"],
            )?,
            load_duration: reg(
                &r,
                "hearth_model_load_duration_seconds",
                HistogramVec::new(
                    HistogramOpts::new(
                        "hearth_model_load_duration_seconds",
                        "Spawn-to-ready time of a runtime",
                    )
                    .buckets(load_buckets),
                    &["model"],
                ),
            )?,
            evictions: counter(
                "hearth_evictions_total",
                "Runtimes stopped, by reason (idle, memory, admin)",
                &["model", "reason"],
            )?,
            starts: counter("hearth_runtime_starts_total", "Runtime spawns", &["model"])?,
            restarts: counter(
                "hearth_runtime_restarts_total",
                "Runtime spawns after a failure or crash",
                &["model"],
            )?,
            failures: counter(
                "hearth_runtime_failures_total",
                "Runtime failures, by reason (start_failed, start_timeout, crashed, oom)",
                &["model", "reason"],
            )?,
            runtime_memory: gauge(
                "hearth_runtime_memory_bytes",
                "Memory the runtime's cgroup uses now (memory.current / usage_in_bytes)",
                &["model"],
            )?,
            runtime_memory_peak: gauge(
                "hearth_runtime_memory_peak_bytes",
                "Peak memory of the runtime's cgroup in its current run",
                &["model"],
            )?,
            runtime_memory_limit: gauge(
                "hearth_runtime_memory_limit_bytes",
                "memory_max_mb applied to the runtime's cgroup (0: unlimited or no cgroups)",
                &["model"],
            )?,
            runtime_cpu: reg(
                &r,
                "hearth_runtime_cpu_seconds_total",
                CounterVec::new(
                    Opts::new(
                        "hearth_runtime_cpu_seconds_total",
                        "CPU time used by the runtime's cgroup, over all its runs",
                    ),
                    &["model"],
                ),
            )?,
            runtime_cpu_quota: reg(
                &r,
                "hearth_runtime_cpu_quota_cores",
                prometheus::GaugeVec::new(
                    Opts::new(
                        "hearth_runtime_cpu_quota_cores",
                        "cpu_quota applied to the runtime's cgroup, in CPUs (0: none)",
                    ),
                    &["model"],
                ),
            )?,
            runtime_pids: gauge(
                "hearth_runtime_pids",
                "Tasks (threads) in the runtime's cgroup",
                &["model"],
            )?,
            runtime_pids_limit: gauge(
                "hearth_runtime_pids_limit",
                "pids_max applied to the runtime's cgroup (0: none)",
                &["model"],
            )?,
            oom_kills: counter(
                "hearth_runtime_oom_kills_total",
                "Processes of the runtime the kernel OOM-killed in its cgroup",
                &["model"],
            )?,
            sensor_up: reg(
                &r,
                "hearth_sensor_up",
                IntGauge::new(
                    "hearth_sensor_up",
                    "1 when the eBPF gateway sensor runs on this host, 0 when it is off",
                ),
            )?,
            gateway_sessions: gauge(
                "hearth_gateway_sessions",
                "Gateway sessions (inbound connections to the gateway ports), by state",
                &["state"],
            )?,
            gateway_bytes: counter(
                "hearth_gateway_bytes_total",
                "Bytes of gateway sessions (IP packet lengths), in = to the gateway",
                &["direction"],
            )?,
            sensor_dropped: gauge(
                "hearth_sensor_dropped_batches",
                "Batches a remote sensor dropped while the agent was unreachable, as it last reported",
                &["source"],
            )?,
            sensor_lost_events: gauge(
                "hearth_sensor_lost_events",
                "Connection open/close events a sensor's kernel programs could not queue (their ring \
                 buffer was full) since they were loaded, as the sensor last reported",
                &["source"],
            )?,
            confinement: gauge(
                "hearth_confinement_info",
                "1 for how runtimes are confined: cgroups = cgroup v1 | cgroup v2 | off",
                &["cgroups", "run_as_switch"],
            )?,
            model_tier: gauge(
                "hearth_model_tier",
                "1 for where the model's memory is: hot, sleeping (vLLM sleep mode) or cold",
                &["model", "tier"],
            )?,
            model_vram: gauge(
                "hearth_model_vram_bytes",
                "VRAM the scheduler accounts for the model on each GPU it is placed on",
                &["model", "gpu"],
            )?,
            sleeps: counter(
                "hearth_model_sleeps_total",
                "Times a model was put to sleep (vLLM sleep mode), by level",
                &["model", "level"],
            )?,
            wakes: counter(
                "hearth_model_wakes_total",
                "Wake-ups of a sleeping model, by outcome (ok, failed)",
                &["model", "outcome"],
            )?,
            gpu_total: gauge(
                "hearth_gpu_memory_total_bytes",
                "A GPU's memory (NVML, or as declared)",
                &["gpu"],
            )?,
            gpu_budget: gauge(
                "hearth_gpu_memory_budget_bytes",
                "What hearth may schedule on a GPU: total - gpu_reserve_mb - memory used by processes that are not hearth's runtimes",
                &["gpu"],
            )?,
            gpu_used: gauge(
                "hearth_gpu_memory_used_bytes",
                "GPU memory the scheduler accounts to models",
                &["gpu"],
            )?,
            gpu_measured: gauge(
                "hearth_gpu_memory_measured_bytes",
                "GPU memory in use as NVML reports it (every process and the driver)",
                &["gpu"],
            )?,
            gpu_foreign: gauge(
                "hearth_gpu_memory_foreign_bytes",
                "GPU memory NVML shows in use that is not hearth's runtimes",
                &["gpu"],
            )?,
            runtime_vram: gauge(
                "hearth_runtime_vram_bytes",
                "GPU memory the runtime's processes use (NVML, per process, summed)",
                &["model", "gpu"],
            )?,
            gpu_release_wait: reg(
                &r,
                "hearth_gpu_release_wait_seconds",
                HistogramVec::new(
                    HistogramOpts::new(
                        "hearth_gpu_release_wait_seconds",
                        "Time from a runtime's exit until NVML showed its GPU memory freed",
                    )
                    .buckets(exponential_buckets(0.01, 2.0, 12).unwrap_or_default()),
                    &["gpu"],
                ),
            )?,
            registry: r,
        })
    }

    /// The per-model gauges, resolved once so that updating them is an atomic store.
    pub fn model_gauges(&self, model: &str) -> ModelGauges {
        ModelGauges {
            state: Phase::ALL.map(|p| self.model_state.with_label_values(&[model, p.as_str()])),
            memory: self.model_memory.with_label_values(&[model]),
            queue_depth: self.queue_depth.with_label_values(&[model]),
            in_flight: self.in_flight.with_label_values(&[model]),
            runtime_memory: self.runtime_memory.with_label_values(&[model]),
            runtime_memory_peak: self.runtime_memory_peak.with_label_values(&[model]),
            runtime_pids: self.runtime_pids.with_label_values(&[model]),
            runtime_cpu: self.runtime_cpu.with_label_values(&[model]),
        }
    }

    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        // Encoding into a Vec cannot fail for I/O; a metric family error would be a bug here.
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            tracing::error!(error = %e, "encoding metrics");
        }
        String::from_utf8_lossy(&buf).into_owned()
    }
}
