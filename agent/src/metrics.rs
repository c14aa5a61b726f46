//! Prometheus metrics (`hearth_` prefix), one registry per daemon.

use prometheus::{
    exponential_buckets, Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge,
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
                "Runtime failures, by reason (start_failed, start_timeout, crashed)",
                &["model", "reason"],
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
