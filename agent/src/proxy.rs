//! The one OpenAI-compatible endpoint.
//!
//! The proxy never touches a process: for each request it asks the supervisor for a [`Grant`] and
//! waits (holding the client, no headers sent), then forwards to the runtime the grant names and
//! streams the answer back frame by frame. The grant lives inside the response body, so the slot is
//! released exactly when the stream ends or the client goes away.

use std::borrow::Cow;
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::{Query, Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::Deserialize;
use serde_json::{json, Value};
use subtle::ConstantTimeEq;
use tokio::net::TcpStream;
use tracing::Instrument;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::supervisor::{AcquireError, Grant, Supervisor};

/// An OpenAI-shaped error response.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub kind: &'static str,
    pub code: &'static str,
    pub message: String,
    pub retry_after: Option<Duration>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        let kind = match status.as_u16() {
            401 => "authentication_error",
            400..=499 => "invalid_request_error",
            _ => "server_error",
        };
        ApiError {
            status,
            kind,
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    fn retry_after(mut self, d: Duration) -> ApiError {
        self.retry_after = Some(d);
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body =
            json!({"error": {"message": self.message, "type": self.kind, "code": self.code}});
        let mut resp = (self.status, Json(body)).into_response();
        if let Some(d) = self.retry_after {
            let secs = d.as_secs_f64().ceil().max(1.0) as u64;
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}

impl From<AcquireError> for ApiError {
    fn from(e: AcquireError) -> ApiError {
        let code = match &e {
            AcquireError::QueueFull { .. } => "queue_full",
            AcquireError::QueueTimeout { .. } => "queue_timeout",
            AcquireError::StartFailed { .. } => "model_start_failed",
            AcquireError::ShuttingDown => "shutting_down",
        };
        let retry = e.retry_after();
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, code, e.to_string()).retry_after(retry)
    }
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// How long an idle upstream connection is kept for reuse: below llama-server's keep-alive timeout
/// (cpp-httplib's 5 s), so hearth never sends a request on a connection the runtime is closing.
const UPSTREAM_IDLE: Duration = Duration::from_secs(2);

/// Shared, read-only request-path state.
pub struct AppState {
    pub config: Arc<Config>,
    pub supervisor: Supervisor,
    pub sensor: crate::sensor::Sensor,
    pub metrics: Metrics,
    client: HttpClient,
    /// id and every alias → model index.
    names: HashMap<String, usize>,
    /// Per model (by index): the queue-wait histogram, resolved once.
    queue_wait: Vec<prometheus::Histogram>,
    created: u64,
    /// Requests forwarded so far (any outcome): what the idle-memory housekeeping watches.
    forwarded: AtomicU64,
}

impl AppState {
    pub fn new(
        config: Arc<Config>,
        supervisor: Supervisor,
        sensor: crate::sensor::Sensor,
        metrics: Metrics,
    ) -> Arc<AppState> {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(UPSTREAM_IDLE)
            .build(connector);
        let mut names = HashMap::new();
        for (i, m) in config.models.iter().enumerate() {
            names.insert(m.id.clone(), i);
            for a in &m.aliases {
                names.insert(a.clone(), i);
            }
        }
        let created = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let queue_wait = config
            .models
            .iter()
            .map(|m| metrics.queue_wait.with_label_values(&[&m.id]))
            .collect();
        Arc::new(AppState {
            config,
            supervisor,
            sensor,
            metrics,
            client,
            names,
            queue_wait,
            created,
            forwarded: AtomicU64::new(0),
        })
    }

    /// How many requests have been forwarded (or refused after their model was resolved) so far.
    pub fn forwarded(&self) -> u64 {
        self.forwarded.load(Ordering::Relaxed)
    }

    /// The index of the model named `name` (its id or an alias).
    pub fn resolve(&self, name: &str) -> Result<usize, ApiError> {
        self.names.get(name).copied().ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "model_not_found",
                format!("The model `{name}` does not exist. GET /v1/models lists the models this server has."),
            )
        })
    }
}

/// The whole HTTP surface: OpenAI API, props, health, metrics and the admin API.
pub fn router(state: Arc<AppState>) -> Router {
    let guarded = Router::new()
        .route("/v1/chat/completions", post(forward))
        .route("/v1/completions", post(forward))
        .route("/v1/embeddings", post(forward))
        .route("/v1/models", get(list_models))
        .route("/hearth/v1/status", get(crate::admin::status))
        .route("/hearth/v1/sessions", get(crate::admin::sessions))
        .route("/hearth/v1/models/{id}/load", post(crate::admin::load))
        .route("/hearth/v1/models/{id}/unload", post(crate::admin::unload))
        .route("/hearth/v1/models/{id}/sleep", post(crate::admin::sleep))
        .route(
            "/hearth/v1/models/{id}/page-cache",
            get(crate::admin::page_cache),
        )
        .route(
            "/hearth/v1/models/{id}/page-cache/evict",
            post(crate::admin::page_cache_evict),
        )
        .route(
            "/hearth/v1/models/{id}/prewarm",
            post(crate::admin::prewarm),
        )
        .route_layer(middleware::from_fn_with_state(state.clone(), auth));
    Router::new()
        .merge(guarded)
        .route("/hearth/v1/activity", post(crate::admin::activity))
        .route("/props", get(props))
        .route("/health", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/metrics", get(crate::admin::metrics))
        .fallback(not_found)
        .with_state(state)
}

async fn not_found(req: Request) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("no route for {} {}", req.method(), req.uri().path()),
    )
}

async fn auth(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let keys = &st.config.server.api_keys;
    if keys.is_empty() {
        return next.run(req).await;
    }
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let ok = given.is_some_and(|g| {
        keys.iter().fold(false, |acc, k| {
            acc | bool::from(k.as_bytes().ct_eq(g.as_bytes()))
        })
    });
    if ok {
        next.run(req).await
    } else {
        let msg = if given.is_some() {
            "Incorrect API key provided."
        } else {
            "Missing API key: send `Authorization: Bearer <key>`."
        };
        ApiError::new(StatusCode::UNAUTHORIZED, "invalid_api_key", msg).into_response()
    }
}

fn api_status(state: &str) -> &'static str {
    match state {
        "ready" | "draining" => "loaded",
        // A sleeping vLLM serves nothing until woken: unloaded, and loading while it wakes.
        "starting" | "waking" => "loading",
        "failed" => "failed",
        _ => "unloaded",
    }
}

async fn list_models(State(st): State<Arc<AppState>>) -> Result<Json<Value>, ApiError> {
    let report = st.supervisor.status().await.ok_or_else(shutting_down)?;
    let data: Vec<Value> = report
        .models
        .iter()
        .map(|m| {
            json!({
                "id": m.id,
                "object": "model",
                "created": st.created,
                "owned_by": "hearth",
                "max_model_len": m.context_length,
                "context_length": m.context_length,
                "status": api_status(m.state),
                "aliases": m.aliases,
            })
        })
        .collect();
    Ok(Json(json!({"object": "list", "data": data})))
}

fn shutting_down() -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "shutting_down",
        "hearth is shutting down",
    )
    .retry_after(Duration::from_secs(5))
}

#[derive(Deserialize)]
struct PropsQuery {
    model: Option<String>,
}

/// llama.cpp-style `/props` for one model, from configuration and state only: never loads.
async fn props(
    State(st): State<Arc<AppState>>,
    Query(q): Query<PropsQuery>,
) -> Result<Json<Value>, ApiError> {
    let name = match q.model {
        Some(m) => m,
        None if st.config.models.len() == 1 => st.config.models[0].id.clone(),
        None => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "missing_model",
                "give ?model=ID: this server has several models",
            ))
        }
    };
    let i = st.resolve(&name)?;
    let report = st.supervisor.status().await.ok_or_else(shutting_down)?;
    let m = &st.config.models[i];
    let state = report.models.get(i).map(|s| s.state).unwrap_or("cold");
    Ok(Json(json!({
        "model": m.id,
        "model_alias": m.id,
        "n_ctx": m.context_length,
        "default_generation_settings": {"n_ctx": m.context_length},
        "total_slots": m.max_concurrency,
        "status": api_status(state),
    })))
}

#[derive(Deserialize)]
struct Head<'a> {
    #[serde(borrow)]
    model: Option<Cow<'a, str>>,
    #[serde(default)]
    stream: Option<Value>,
}

const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    header::TRANSFER_ENCODING,
    header::TE,
    header::TRAILER,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
    header::PROXY_AUTHENTICATE,
    HeaderName::from_static("keep-alive"),
];

fn copy_headers(from: &HeaderMap, to: &mut HeaderMap, skip: &[HeaderName]) {
    for (k, v) in from {
        if !HOP_BY_HOP.contains(k) && !skip.contains(k) {
            to.append(k.clone(), v.clone());
        }
    }
}

fn session_of(h: &HeaderMap) -> &str {
    ["session_id", "x-session-affinity"]
        .iter()
        .find_map(|n| h.get(*n).and_then(|v| v.to_str().ok()))
        .unwrap_or("")
}

/// POST /v1/{chat/completions,completions,embeddings}
async fn forward(State(st): State<Arc<AppState>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let limit = st.config.server.max_body_bytes;
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "request_too_large",
            format!("request body is larger than {limit} bytes (server.max_body_bytes)"),
        )
    };
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        drain(body).await;
        return too_large().into_response();
    }
    let bytes = match read_body(body, limit).await {
        Ok(Some(b)) => b,
        Ok(None) => return too_large().into_response(),
        Err(e) => {
            return ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_body",
                format!("reading the request body: {e}"),
            )
            .into_response()
        }
    };
    let (name, streaming) = match serde_json::from_slice::<Head>(&bytes) {
        Ok(Head {
            model: Some(m),
            stream,
        }) => (m.into_owned(), stream == Some(Value::Bool(true))),
        Ok(Head { model: None, .. }) => {
            return ApiError::new(
                StatusCode::BAD_REQUEST,
                "missing_model",
                "the request has no `model`",
            )
            .into_response()
        }
        Err(e) if e.is_data() => {
            return ApiError::new(
                StatusCode::BAD_REQUEST,
                "missing_model",
                format!("`model` must be a string: {e}"),
            )
            .into_response()
        }
        Err(e) => {
            return ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_json",
                format!("the request body is not valid JSON: {e}"),
            )
            .into_response()
        }
    };
    let idx = match st.resolve(&name) {
        Ok(i) => i,
        Err(e) => return e.into_response(),
    };
    let id = st.config.models[idx].id.as_str();
    let span = tracing::info_span!("request", model = %id, session = %session_of(&parts.headers));
    let body = if name != id {
        match rewrite_model(&bytes, id) {
            Some(b) => b,
            None => bytes,
        }
    } else {
        bytes
    };
    st.forwarded.fetch_add(1, Ordering::Relaxed);
    let resp = async {
        let t0 = Instant::now();
        let grant = match st.supervisor.acquire(idx).await {
            Ok(g) => g,
            Err(e) => {
                tracing::info!(error = %e, "request refused");
                return ApiError::from(e).into_response();
            }
        };
        let waited = t0.elapsed();
        st.queue_wait[idx].observe(waited.as_secs_f64());
        if waited > Duration::from_millis(100) {
            tracing::info!(waited = ?waited, "request held until the model was ready");
        }
        send_upstream(&st, parts, body, grant, id, streaming).await
    }
    .instrument(span)
    .await;
    st.metrics
        .requests
        .with_label_values(&[id, resp.status().as_str()])
        .inc();
    resp
}

/// Reads the whole body; `None` when it is larger than `limit` (the rest is drained, so the client
/// reads the 413 instead of a reset).
async fn read_body(mut body: Body, limit: usize) -> Result<Option<Bytes>, axum::Error> {
    let mut buf = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            if buf.len() + data.len() > limit {
                drain(body).await;
                return Ok(None);
            }
            buf.extend_from_slice(&data);
        }
    }
    Ok(Some(buf.freeze()))
}

/// Discards what is left of a rejected body, within bounds (64 MiB, 2 s).
async fn drain(mut body: Body) {
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        let mut n = 0usize;
        while let Some(Ok(f)) = body.frame().await {
            n += f.data_ref().map_or(0, |d| d.len());
            if n > 64 << 20 {
                break;
            }
        }
    })
    .await;
}

fn rewrite_model(bytes: &[u8], id: &str) -> Option<Bytes> {
    let mut v: Value = serde_json::from_slice(bytes).ok()?;
    v.as_object_mut()?
        .insert("model".into(), Value::String(id.into()));
    serde_json::to_vec(&v).ok().map(Bytes::from)
}

async fn send_upstream(
    st: &AppState,
    parts: http::request::Parts,
    body: Bytes,
    grant: Grant,
    model: &str,
    streaming: bool,
) -> Response {
    let pq = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    // The pooled client takes an absolute URI; a request on a connection of its own goes out as is, so
    // it takes the origin form and a Host header.
    let uri = if streaming {
        pq.parse::<http::Uri>()
    } else {
        format!("http://{}{}", grant.addr, pq).parse::<http::Uri>()
    };
    let uri = match uri {
        Ok(u) => u,
        Err(e) => {
            return ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                format!("bad request path: {e}"),
            )
            .into_response()
        }
    };
    let mut up = http::Request::builder().method(parts.method).uri(uri);
    if let Some(h) = up.headers_mut() {
        copy_headers(
            &parts.headers,
            h,
            &[header::HOST, header::AUTHORIZATION, header::CONTENT_LENGTH],
        );
        if streaming {
            // See own_connection.
            h.insert(header::CONNECTION, HeaderValue::from_static("close"));
            if let Ok(host) = HeaderValue::from_str(&grant.addr.to_string()) {
                h.insert(header::HOST, host);
            }
        }
    }
    let up = match up.body(Full::new(body)) {
        Ok(r) => r,
        Err(e) => {
            return ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", e.to_string())
                .into_response()
        }
    };
    let sent = if streaming {
        own_connection(grant.addr, up).await
    } else {
        st.client
            .request(up)
            .await
            .map(|r| (r, None))
            .map_err(UpstreamError::from)
    };
    let (resp, conn) = match sent {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "runtime did not answer");
            let why = match grant.death_reason(DEATH_REASON_WAIT).await {
                Some(r) => format!(": {r}"),
                None => format!(": {e}"),
            };
            return ApiError::new(
                StatusCode::BAD_GATEWAY,
                "upstream_error",
                format!("model {model}: the runtime failed before answering{why}"),
            )
            .into_response();
        }
    };
    let (rparts, incoming) = resp.into_parts();
    let sse = rparts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    let mut out = Response::builder().status(rparts.status);
    if let Some(h) = out.headers_mut() {
        copy_headers(&rparts.headers, h, &[]);
    }
    let body = GrantedBody {
        inner: incoming,
        conn,
        grant: Some(grant),
        sse,
        model: model.to_string(),
        failed: false,
        dying: None,
    };
    out.body(Body::new(body)).unwrap_or_else(|e| {
        ApiError::new(StatusCode::BAD_GATEWAY, "upstream_error", e.to_string()).into_response()
    })
}

/// How long a request whose runtime died waits to learn why (OOM, exit status) before answering.
const DEATH_REASON_WAIT: Duration = Duration::from_secs(1);

type DyingFuture = Pin<Box<dyn Future<Output = String> + Send>>;

/// Why a runtime gave no answer.
#[derive(Debug, thiserror::Error)]
enum UpstreamError {
    #[error("connecting to {addr}: {source}")]
    Connect {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("{0}")]
    Http(#[from] hyper::Error),
    #[error("{0}")]
    Pooled(#[from] hyper_util::client::legacy::Error),
}

/// A streamed request's own upstream connection, driven by the response body that reads from it.
type OwnConn = Pin<Box<hyper::client::conn::http1::Connection<TokioIo<TcpStream>, Full<Bytes>>>>;

/// Sends a streamed request on a connection of its own and drives that connection in this task: no
/// connection task is spawned, and the frames the runtime sent together reach the client in one write
/// (the connection decodes the next frame as soon as the body has taken the previous one). llama-server
/// closes the connection after every streamed response although it announces keep-alive, so a pooled
/// connection reused in that window would fail the next request (measured: 5 % of concurrent streamed
/// requests failed with reuse, none without); `Connection: close` says so to the runtime.
async fn own_connection(
    addr: std::net::SocketAddr,
    req: http::Request<Full<Bytes>>,
) -> Result<(http::Response<hyper::body::Incoming>, Option<OwnConn>), UpstreamError> {
    let connect = |source| UpstreamError::Connect { addr, source };
    let tcp = TcpStream::connect(addr).await.map_err(connect)?;
    tcp.set_nodelay(true).map_err(connect)?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    let mut conn: Option<OwnConn> = Some(Box::pin(conn));
    let mut resp = std::pin::pin!(sender.send_request(req));
    std::future::poll_fn(|cx| {
        if let Some(c) = conn.as_mut() {
            match c.as_mut().poll(cx) {
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e.into())),
                Poll::Ready(Ok(())) => conn = None,
                Poll::Pending => {}
            }
        }
        resp.as_mut().poll(cx).map_err(UpstreamError::from)
    })
    .await
    .map(|r| (r, conn))
}

/// The runtime's response body, passed through frame by frame, holding the grant until it ends.
struct GrantedBody {
    inner: hyper::body::Incoming,
    /// The connection a streamed response arrives on, polled before each frame is read.
    conn: Option<OwnConn>,
    grant: Option<Grant>,
    sse: bool,
    model: String,
    failed: bool,
    /// After a mid-stream failure of an SSE response: the error event, once the reason is known.
    dying: Option<DyingFuture>,
}

impl HttpBody for GrantedBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if self.failed {
            return Poll::Ready(None);
        }
        if let Some(fut) = self.dying.as_mut() {
            return match fut.as_mut().poll(cx) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(event) => {
                    self.dying = None;
                    self.failed = true;
                    Poll::Ready(Some(Ok(Frame::data(Bytes::from(event)))))
                }
            };
        }
        if let Some(c) = self.conn.as_mut() {
            // An error here also ends the body with an error, handled below.
            if c.as_mut().poll(cx).is_ready() {
                self.conn = None;
            }
        }
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(None) => {
                self.grant = None;
                self.conn = None;
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                tracing::warn!(model = %self.model, error = %e, "runtime failed mid-response");
                let grant = self.grant.take();
                if self.sse {
                    // Tell an SSE client in-band (with the reason, once the supervisor knows it),
                    // then end the stream without `[DONE]`. (An error right after the event would
                    // make hyper drop the event unsent.)
                    let model = self.model.clone();
                    let err = e.to_string();
                    let fut: DyingFuture = Box::pin(async move {
                        let why = match &grant {
                            Some(g) => g.death_reason(DEATH_REASON_WAIT).await,
                            None => None,
                        };
                        drop(grant);
                        let ev = json!({"error": {
                            "message": format!("model {model}: the runtime failed mid-response: {}", why.unwrap_or(err)),
                            "type": "server_error",
                            "code": "upstream_error",
                        }});
                        format!("data: {ev}\n\n")
                    });
                    self.dying = Some(fut);
                    self.poll_frame(cx)
                } else {
                    Poll::Ready(Some(Err(Box::new(e))))
                }
            }
            other => other.map(|o| o.map(|r| r.map_err(|e| Box::new(e) as Self::Error))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.failed || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alias_rewrite_replaces_only_model() {
        let b = rewrite_model(
            br#"{"model":"fast","messages":[{"role":"user","content":"hi"}]}"#,
            "smollm2",
        )
        .expect("rewritten");
        let v: Value = serde_json::from_slice(&b).expect("json");
        assert_eq!(v["model"], "smollm2");
        assert_eq!(v["messages"][0]["content"], "hi");
    }

    #[test]
    fn error_body_is_openai_shaped_with_retry_after() {
        let r = ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "queue_full", "full")
            .retry_after(Duration::from_millis(1500))
            .into_response();
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.headers()[header::RETRY_AFTER], "2");
    }

    #[test]
    fn states_map_to_api_status() {
        assert_eq!(api_status("ready"), "loaded");
        assert_eq!(api_status("draining"), "loaded");
        assert_eq!(api_status("starting"), "loading");
        assert_eq!(api_status("stopping"), "unloaded");
        assert_eq!(api_status("waking"), "loading");
        assert_eq!(api_status("sleeping"), "unloaded");
        assert_eq!(api_status("failed"), "failed");
    }
}
