//! `hearth run`: wires configuration, supervisor and proxy together and handles signals.

use std::sync::Arc;
use std::time::Duration;

use axum::serve::ListenerExt;
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};

use crate::config::Config;
use crate::confine::{ConfineError, Confinement};
use crate::metrics::{Metrics, MetricsError};
use crate::proxy::{router, AppState};
use crate::scheduler::LongestIdle;
use crate::supervisor::Supervisor;

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("cannot listen on {addr}")]
    Listen {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("installing signal handlers")]
    Signals(#[source] std::io::Error),
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    #[error(transparent)]
    Confine(#[from] ConfineError),
    #[error("GPUs")]
    Gpu(#[from] crate::gpu::GpuError),
    #[error("serving HTTP")]
    Serve(#[source] std::io::Error),
}

/// How long without a new request before hearth hands its allocator's free memory back to the OS.
const IDLE_TRIM_AFTER: Duration = Duration::from_secs(1);

/// After a burst of requests the allocator keeps the buffers it freed (glibc raises its trim
/// threshold after large frees, and free chunks inside the heap are never returned on their own), so
/// an idle hearth would stay at its busiest size. Once per idle period (no request for
/// [`IDLE_TRIM_AFTER`]) this returns them. Measured with `cargo xtask bench` on the 2-CPU VM: idle
/// RSS after the bench's ~60,000 requests 11.1 MB before, 9.8 MB with it (8.1 MB at start).
async fn release_memory_when_idle(state: Arc<AppState>) {
    let mut tick = tokio::time::interval(IDLE_TRIM_AFTER);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut seen, mut trimmed) = (state.forwarded(), state.forwarded());
    loop {
        tick.tick().await;
        let now = state.forwarded();
        if now == seen && now != trimmed {
            trimmed = now;
            let _ = tokio::task::spawn_blocking(release_free_memory).await;
        }
        seen = now;
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn release_free_memory() {
    // SAFETY: malloc_trim(3) has no preconditions and takes no pointers: it locks each arena itself
    // and only gives the pages of free chunks back to the kernel, never memory that is allocated.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn release_free_memory() {}

/// Runs until SIGTERM or SIGINT; every runtime is stopped before it returns.
pub async fn run(config: Config) -> Result<(), DaemonError> {
    let config = Arc::new(config);
    let addr = config.server.listen;
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| DaemonError::Listen { addr, source })?;
    let mut term = signal(SignalKind::terminate()).map_err(DaemonError::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(DaemonError::Signals)?;
    let metrics = Metrics::new()?;
    let confinement = Arc::new(Confinement::setup(&config)?);
    {
        let st = confinement.status();
        if confinement.hierarchy().is_some() {
            tracing::info!(cgroups = %st.cgroups, reason = %st.reason, "runtimes are confined in cgroups");
        } else {
            tracing::warn!(reason = %st.reason, "runtime cgroups are OFF");
        }
        if !st.privileged {
            tracing::warn!("hearth is not root: runtimes run as hearth's own user");
        }
    }
    let gpus = crate::gpu::setup(&config.resources)?;
    crate::gpu::check_models(&config.models, &gpus.pools)?;
    if gpus.nvml.is_some() {
        tracing::info!(gpus = %gpus.reason, "GPU memory is measured with NVML");
    } else if gpus.pools.is_empty() {
        tracing::info!(gpus = %gpus.reason, "no GPU pools");
    } else {
        tracing::warn!(gpus = %gpus.reason, "GPU memory is NOT measured");
    }
    let supervisor = Supervisor::start(
        config.clone(),
        confinement,
        metrics.clone(),
        Box::new(LongestIdle),
        gpus,
    );
    let sensor = crate::sensor::Sensor::start(&config.sensor, metrics.clone());
    let state = AppState::new(config.clone(), supervisor.clone(), sensor, metrics);
    tokio::spawn(release_memory_when_idle(state.clone()));
    tracing::info!(
        %addr,
        models = config.models.len(),
        pool_mb = config.resources.host_memory_mb,
        config = %config.source.display(),
        "hearth listening"
    );
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let server = axum::serve(listener, router(state)).with_graceful_shutdown(async {
        let _ = stop_rx.await;
    });
    let server = tokio::spawn(async move { server.await });
    let sig = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    tracing::info!(signal = sig, "shutting down");
    supervisor.shutdown().await;
    let _ = stop_tx.send(());
    match tokio::time::timeout(Duration::from_secs(5), server).await {
        Ok(Ok(Err(e))) => return Err(DaemonError::Serve(e)),
        Ok(_) => {}
        Err(_) => tracing::warn!("connections still open after 5 s; exiting anyway"),
    }
    tracing::info!("stopped");
    Ok(())
}
