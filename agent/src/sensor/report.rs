//! `hearth sensor`: the sensor alone, on the gateway host, reporting to the agent on the LLM host.
//!
//! The kernel poller's batches go into a bounded buffer (`report_buffer` batches; when full the
//! oldest is dropped and counted) and are posted, up to [`MAX_BATCHES_PER_POST`] at a time, to
//! `<report_to>/hearth/v1/activity` with the `report_token`. A failed post is retried with backoff
//! (0.5 s doubling to 30 s) and nothing is removed until the agent accepted it. Flow counters are
//! cumulative, so a dropped batch loses interval resolution and open/close events, never totals.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::sync::{mpsc, Notify};

use super::kernel::{Kernel, KernelError};
use super::{Batch, Report};
use crate::config::SensorConfig;

/// Batches per POST.
pub const MAX_BATCHES_PER_POST: usize = 50;
const POST_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("hearth sensor: no [sensor] report_to in the config: where should the activity go?")]
    NoTarget,
    #[error("hearth sensor: {0}")]
    Kernel(#[from] KernelError),
}

/// The bounded buffer between the poller and the poster.
#[derive(Debug)]
pub struct Buffer {
    batches: VecDeque<Batch>,
    capacity: usize,
    pub dropped_total: u64,
}

impl Buffer {
    pub fn new(capacity: usize) -> Buffer {
        Buffer {
            batches: VecDeque::new(),
            capacity: capacity.max(1),
            dropped_total: 0,
        }
    }

    /// Adds a batch; when full, drops the oldest and counts it.
    pub fn push(&mut self, b: Batch) {
        if self.batches.len() == self.capacity {
            self.batches.pop_front();
            self.dropped_total += 1;
        }
        self.batches.push_back(b);
    }

    /// Up to `n` of the oldest batches (left in place until [`Buffer::confirm`]).
    pub fn peek(&self, n: usize) -> Vec<Batch> {
        self.batches.iter().take(n).cloned().collect()
    }

    /// Removes the `n` oldest batches after the agent accepted them. Batches dropped meanwhile
    /// (the buffer overflowed during the post) are accounted by `dropped_since`.
    pub fn confirm(&mut self, n: usize, dropped_since: u64) {
        let already_gone = (self.dropped_total - dropped_since) as usize;
        let remove = n.saturating_sub(already_gone).min(self.batches.len());
        self.batches.drain(..remove);
    }

    pub fn len(&self) -> usize {
        self.batches.len()
    }

    pub fn is_empty(&self) -> bool {
        self.batches.is_empty()
    }
}

/// Runs until SIGTERM/SIGINT.
pub async fn run(config: &SensorConfig) -> Result<(), ReportError> {
    let target = config.report_to.clone().ok_or(ReportError::NoTarget)?;
    let kernel = Kernel::load(config)?;
    tracing::info!(cgroup = %kernel.cgroup().display(), ports = ?config.gateway_ports, to = %target, source = %config.name, "hearth sensor: programs attached, reporting");
    let (tx, mut rx) = mpsc::channel::<Batch>(64);
    tokio::spawn(kernel.run(tx, config.poll_interval));
    let buffer = Arc::new(Mutex::new(Buffer::new(config.report_buffer)));
    let wake = Arc::new(Notify::new());
    {
        let buffer = buffer.clone();
        let wake = wake.clone();
        tokio::spawn(async move {
            while let Some(b) = rx.recv().await {
                if let Ok(mut buf) = buffer.lock() {
                    buf.push(b);
                }
                wake.notify_one();
            }
        });
    }
    let poster = post_loop(
        buffer,
        wake,
        format!("{}/hearth/v1/activity", target.trim_end_matches('/')),
        config.report_token.clone(),
        config.name.clone(),
        config.gateway_ports.clone(),
    );
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| KernelError::Load(format!("signal handler: {e}")))?;
    tokio::select! {
        _ = poster => {}
        _ = term.recv() => tracing::info!("hearth sensor: SIGTERM, stopping"),
        _ = tokio::signal::ctrl_c() => tracing::info!("hearth sensor: SIGINT, stopping"),
    }
    Ok(())
}

async fn post_loop(
    buffer: Arc<Mutex<Buffer>>,
    wake: Arc<Notify>,
    url: String,
    token: Option<String>,
    source: String,
    gateway_ports: Vec<u16>,
) {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let mut failures: u32 = 0;
    loop {
        let (batches, dropped_total) = match buffer.lock() {
            Ok(b) => (b.peek(MAX_BATCHES_PER_POST), b.dropped_total),
            Err(_) => return,
        };
        if batches.is_empty() {
            wake.notified().await;
            continue;
        }
        let n = batches.len();
        let report = Report {
            source: source.clone(),
            batches,
            gateway_ports: gateway_ports.clone(),
            dropped_total,
        };
        match post(&client, &url, token.as_deref(), &report).await {
            Ok(()) => {
                if failures > 0 {
                    tracing::info!(
                        after_failures = failures,
                        "hearth sensor: the agent accepts reports again"
                    );
                }
                failures = 0;
                if let Ok(mut b) = buffer.lock() {
                    b.confirm(n, dropped_total);
                }
            }
            Err(e) => {
                failures += 1;
                let wait = Duration::from_millis((500u64 << (failures - 1).min(6)).min(30_000));
                let (queued, dropped) = buffer
                    .lock()
                    .map(|b| (b.len(), b.dropped_total))
                    .unwrap_or((0, 0));
                if failures == 1 || failures.is_power_of_two() {
                    tracing::warn!(error = %e, retry_in = ?wait, queued, dropped, "hearth sensor: reporting to the agent failed");
                }
                tokio::time::sleep(wait).await;
            }
        }
    }
}

async fn post(
    client: &Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
    url: &str,
    token: Option<&str>,
    report: &Report,
) -> Result<(), String> {
    let body = serde_json::to_vec(report).map_err(|e| e.to_string())?;
    let mut req = http::Request::post(url).header(http::header::CONTENT_TYPE, "application/json");
    if let Some(t) = token {
        req = req.header(http::header::AUTHORIZATION, format!("Bearer {t}"));
    }
    let req = req
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| e.to_string())?;
    let resp = tokio::time::timeout(POST_TIMEOUT, client.request(req))
        .await
        .map_err(|_| format!("no answer within {POST_TIMEOUT:?}"))?
        .map_err(|e| format!("{e}"))?;
    let status = resp.status();
    let text = resp
        .into_body()
        .collect()
        .await
        .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
        .unwrap_or_default();
    if status.is_success() {
        Ok(())
    } else {
        Err(format!(
            "{status}: {}",
            text.chars().take(300).collect::<String>()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(i: usize) -> Batch {
        Batch {
            observations: Vec::new(),
            end_interval: i.is_multiple_of(2),
            events_lost: 0,
        }
    }

    #[test]
    fn buffer_drops_oldest_and_counts() {
        let mut b = Buffer::new(3);
        for i in 0..5 {
            b.push(batch(i));
        }
        assert_eq!(b.len(), 3);
        assert_eq!(b.dropped_total, 2);
        // a post of the 2 oldest succeeds: they go
        let dropped = b.dropped_total;
        let sent = b.peek(2);
        assert_eq!(sent.len(), 2);
        b.confirm(2, dropped);
        assert_eq!(b.len(), 1);
    }

    #[test]
    fn overflow_during_a_post_is_not_removed_twice() {
        let mut b = Buffer::new(3);
        for i in 0..3 {
            b.push(batch(i));
        }
        let dropped = b.dropped_total;
        let sent = b.peek(3);
        // meanwhile two more arrive and push out two of the batches being sent
        b.push(batch(3));
        b.push(batch(4));
        b.confirm(sent.len(), dropped);
        // the one sent batch still in the buffer went; the two new ones stay
        assert_eq!(b.len(), 2);
        assert_eq!(b.dropped_total, 2);
    }
}
