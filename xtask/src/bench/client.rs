//! HTTP client side of the benchmark (hyper 1 with keep-alive connection pooling) and the closed-loop load
//! generator.

use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{header, Method, Request, StatusCode, Uri};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::task::JoinSet;

pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// A keep-alive client. Dropping it (and its clones) closes its idle connections.
pub fn new_client(max_idle_per_host: usize) -> HttpClient {
    let mut conn = HttpConnector::new();
    conn.set_nodelay(true);
    conn.enforce_http(true);
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(max_idle_per_host)
        .pool_idle_timeout(Duration::from_secs(60))
        .build(conn)
}

/// One completed request, times measured from just before the request is handed to the client.
#[derive(Clone, Copy, Debug)]
pub struct Sample {
    /// Until the last byte of the body.
    pub total: Duration,
    /// Until the first byte of the body.
    pub ttfb: Duration,
    /// Streaming only: until the first SSE event carrying a non-empty `delta.content`.
    pub ttft: Option<Duration>,
}

pub fn chat_body(model: &str, max_tokens: u32, stream: bool) -> Bytes {
    let v = serde_json::json!({
        "model": model,
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "seed": 42,
        "stream": stream,
    });
    Bytes::from(v.to_string())
}

/// Sends one chat request and times it. Any failure (transport, non-2xx, error event in the stream, stream
/// without `[DONE]`, timeout) comes back as a message.
pub async fn timed_chat(
    client: &HttpClient,
    uri: &Uri,
    body: &Bytes,
    stream: bool,
    close: bool,
    timeout: Duration,
) -> std::result::Result<Sample, String> {
    let start = Instant::now();
    let fut = async {
        let mut req = Request::builder()
            .method(Method::POST)
            .uri(uri.clone())
            .header(header::CONTENT_TYPE, "application/json");
        if close {
            req = req.header(header::CONNECTION, "close");
        }
        let req = req
            .body(Full::new(body.clone()))
            .map_err(|e| format!("building request: {e}"))?;
        let resp = client
            .request(req)
            .await
            .map_err(|e| format!("request: {}", error_chain(&e)))?;
        let status = resp.status();
        let mut body = resp.into_body();
        if !status.is_success() {
            let bytes = body
                .collect()
                .await
                .map(|c| c.to_bytes())
                .unwrap_or_default();
            return Err(format!("HTTP {status}: {}", snippet(&bytes)));
        }
        let mut ttfb = None;
        let mut ttft = None;
        let mut sse = SseScan::default();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| format!("reading body: {}", error_chain(&e)))?;
            let Some(data) = frame.data_ref() else {
                continue;
            };
            if data.is_empty() {
                continue;
            }
            let now = start.elapsed();
            ttfb.get_or_insert(now);
            if stream && sse.feed(data)? && ttft.is_none() {
                ttft = Some(now);
            }
        }
        let total = start.elapsed();
        if stream && !sse.done {
            return Err("stream ended without `data: [DONE]`".to_string());
        }
        Ok(Sample {
            total,
            ttfb: ttfb.unwrap_or(total),
            ttft,
        })
    };
    match tokio::time::timeout(timeout, fut).await {
        Ok(r) => r,
        Err(_) => Err(format!("timed out after {timeout:?}")),
    }
}

/// Incremental scan of an SSE body: finds the first content token, error events and `[DONE]`.
#[derive(Default)]
struct SseScan {
    partial: Vec<u8>,
    done: bool,
}

impl SseScan {
    /// Returns whether this chunk completed an event with non-empty `choices[0].delta.content`.
    fn feed(&mut self, data: &[u8]) -> std::result::Result<bool, String> {
        self.partial.extend_from_slice(data);
        let mut found = false;
        while let Some(nl) = self.partial.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=nl).collect();
            let line = String::from_utf8_lossy(&line);
            let Some(payload) = line.trim_end().strip_prefix("data:") else {
                continue;
            };
            let payload = payload.trim();
            if payload == "[DONE]" {
                self.done = true;
                continue;
            }
            let v: serde_json::Value = serde_json::from_str(payload)
                .map_err(|e| format!("bad SSE event {}: {e}", snippet(payload.as_bytes())))?;
            if v.get("error").is_some() {
                return Err(format!(
                    "error event in stream: {}",
                    snippet(payload.as_bytes())
                ));
            }
            let content = v
                .pointer("/choices/0/delta/content")
                .and_then(|c| c.as_str())
                .unwrap_or("");
            if !content.is_empty() {
                found = true;
            }
        }
        Ok(found)
    }
}

fn snippet(bytes: &[u8]) -> String {
    let s = String::from_utf8_lossy(bytes);
    let s = s.trim();
    if s.chars().count() > 240 {
        format!("{}...", s.chars().take(240).collect::<String>())
    } else {
        s.to_string()
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// GET or POST with a time limit; returns status and the whole body.
pub async fn call(
    client: &HttpClient,
    method: Method,
    url: &str,
    body: Option<Bytes>,
    timeout: Duration,
) -> Result<(StatusCode, Bytes)> {
    let uri: Uri = url.parse().with_context(|| format!("bad url {url}"))?;
    let mut req = Request::builder().method(method.clone()).uri(uri);
    if body.is_some() {
        req = req.header(header::CONTENT_TYPE, "application/json");
    }
    let req = req.body(Full::new(body.unwrap_or_default()))?;
    let fut = async {
        let resp = client
            .request(req)
            .await
            .map_err(|e| anyhow!("{method} {url}: {}", error_chain(&e)))?;
        let status = resp.status();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| anyhow!("{method} {url}: reading body: {e}"))?
            .to_bytes();
        Ok((status, bytes))
    };
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| anyhow!("{method} {url}: no answer within {timeout:?}"))?
}

pub async fn get_json(client: &HttpClient, url: &str) -> Result<serde_json::Value> {
    call_json(client, Method::GET, url, Duration::from_secs(5)).await
}

/// A bodiless call that must succeed (2xx) and answer JSON.
pub async fn call_json(
    client: &HttpClient,
    method: Method,
    url: &str,
    timeout: Duration,
) -> Result<serde_json::Value> {
    let (status, body) = call(client, method.clone(), url, None, timeout).await?;
    if !status.is_success() {
        return Err(anyhow!("{method} {url}: HTTP {status}: {}", snippet(&body)));
    }
    serde_json::from_slice(&body).with_context(|| format!("{method} {url}: body is not JSON"))
}

/// Failures of one phase: how many, and the first few distinct messages.
#[derive(Default, Debug, Clone)]
pub struct Errors {
    pub count: u64,
    pub examples: Vec<String>,
}

impl Errors {
    pub fn add(&mut self, msg: String) {
        self.count += 1;
        if self.examples.len() < 5 && !self.examples.contains(&msg) {
            self.examples.push(msg);
        }
    }

    pub fn merge(&mut self, other: &Errors) {
        self.count += other.count;
        for m in &other.examples {
            if self.examples.len() < 5 && !self.examples.contains(m) {
                self.examples.push(m.clone());
            }
        }
    }
}

pub struct PhaseResult {
    pub samples: Vec<Sample>,
    pub errors: Errors,
    /// From the start of the phase until its last request finished.
    pub elapsed: Duration,
}

/// Closed loop: `concurrency` workers, each sending the next request as soon as the previous one
/// finished, until `duration` has passed (requests in flight at the deadline are completed and counted).
/// The client and its connections live only for this phase.
pub async fn run_phase(
    uri: &Uri,
    body: &Bytes,
    stream: bool,
    close_streams: bool,
    concurrency: usize,
    duration: Duration,
    timeout: Duration,
) -> PhaseResult {
    let client = new_client(concurrency.max(1) * 2);
    let start = Instant::now();
    let deadline = start + duration;
    let mut set = JoinSet::new();
    for _ in 0..concurrency.max(1) {
        let client = client.clone();
        let uri = uri.clone();
        let body = body.clone();
        set.spawn(async move {
            let mut samples = Vec::new();
            let mut errors = Errors::default();
            while Instant::now() < deadline {
                match timed_chat(
                    &client,
                    &uri,
                    &body,
                    stream,
                    stream && close_streams,
                    timeout,
                )
                .await
                {
                    Ok(s) => samples.push(s),
                    Err(e) => {
                        errors.add(e);
                        // Do not spin on an endpoint that fails at once.
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                }
            }
            (samples, errors)
        });
    }
    let mut samples = Vec::new();
    let mut errors = Errors::default();
    while let Some(joined) = set.join_next().await {
        match joined {
            Ok((s, e)) => {
                samples.extend(s);
                errors.merge(&e);
            }
            Err(e) => errors.add(format!("worker task failed: {e}")),
        }
    }
    PhaseResult {
        samples,
        errors,
        elapsed: start.elapsed(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_scan_finds_first_content_and_done() {
        let mut s = SseScan::default();
        let role =
            b"data: {\"choices\":[{\"delta\":{\"role\":\"assistant\",\"content\":null}}]}\n\n";
        assert_eq!(s.feed(role), Ok(false));
        assert_eq!(s.feed(b"data: {\"choices\":[{\"delta\":{\"con"), Ok(false));
        assert_eq!(s.feed(b"tent\":\"C\"}}]}\n\n"), Ok(true));
        assert!(!s.done);
        assert_eq!(s.feed(b"data: [DONE]\n\n"), Ok(false));
        assert!(s.done);
        let mut e = SseScan::default();
        assert!(e
            .feed(b"data: {\"error\":{\"code\":\"upstream_error\"}}\n")
            .is_err());
    }
}
