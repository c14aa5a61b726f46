//! The admin API under `/hearth/v1/` and `/metrics`: what operators, `hearth status` and later the
//! predictor and the OpenClaw plugin use.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use serde_json::{json, Value};

use crate::pagecache::{self, PageCacheError, Residency};
use crate::proxy::{ApiError, AppState};
use crate::supervisor::StatusReport;

/// GET /hearth/v1/status
pub async fn status(State(st): State<Arc<AppState>>) -> Result<Json<StatusReport>, ApiError> {
    let mut report = st.supervisor.status().await.ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "hearth is shutting down",
        )
    })?;
    report.sensor = st.sensor.report().await.map(|r| r.sensor);
    Ok(Json(report))
}

/// GET /hearth/v1/sessions
pub async fn sessions(
    State(st): State<Arc<AppState>>,
) -> Result<Json<crate::sensor::SessionsReport>, ApiError> {
    st.sensor.report().await.map(Json).ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "hearth is shutting down",
        )
    })
}

/// POST /hearth/v1/activity: a remote sensor's report (token from `[sensor] accept_tokens`).
pub async fn activity(
    State(st): State<Arc<AppState>>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> Result<impl IntoResponse, ApiError> {
    let tokens = &st.config.sensor.accept_tokens;
    if tokens.is_empty() {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "remote_sensors_disabled",
            "this agent accepts no remote sensor reports (set [sensor] accept_tokens)",
        ));
    }
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    let ok = tokens.iter().any(|t| {
        use subtle::ConstantTimeEq;
        bool::from(t.as_bytes().ct_eq(given.as_bytes()))
    });
    if !ok {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "invalid_api_key",
            "missing or wrong sensor token (Authorization: Bearer <one of [sensor] accept_tokens>)",
        ));
    }
    let report: crate::sensor::Report = serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!("not a sensor report: {e}"),
        )
    })?;
    if report.source.is_empty() || report.source == "local" || report.source.contains('/') {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!("invalid sensor name {:?}", report.source),
        ));
    }
    let n = report.batches.len();
    if !st.sensor.accept(report).await {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "hearth is shutting down",
        ));
    }
    Ok((StatusCode::ACCEPTED, Json(json!({"accepted_batches": n}))))
}

/// POST /hearth/v1/models/{id}/load
pub async fn load(
    State(st): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    request(&st, &id, "load")
}

/// POST /hearth/v1/models/{id}/unload
pub async fn unload(
    State(st): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    request(&st, &id, "unload")
}

/// POST /hearth/v1/models/{id}/sleep: put a loaded vLLM model with sleep mode to sleep once it has
/// nothing in flight (409 when it has no sleep mode or is not loaded).
pub async fn sleep(
    State(st): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let i = st.resolve(&id)?;
    st.supervisor
        .sleep(i)
        .await
        .map_err(|why| ApiError::new(StatusCode::CONFLICT, "cannot_sleep", why))?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"model": st.config.models[i].id, "requested": "sleep"})),
    ))
}

/// Hands a load or unload request to the supervisor (which decides when it can happen).
fn request(st: &AppState, name: &str, what: &'static str) -> Result<impl IntoResponse, ApiError> {
    let i = st.resolve(name)?;
    let sent = if what == "load" {
        st.supervisor.load(i)
    } else {
        st.supervisor.unload(i)
    };
    if !sent {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "hearth is shutting down",
        ));
    }
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"model": st.config.models[i].id, "requested": what})),
    ))
}

/// GET /hearth/v1/models/{id}/page-cache: how much of the model's weights file the page cache holds.
pub async fn page_cache(
    State(st): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    cache_op(&st, &id, CacheOp::Residency).await
}

/// POST /hearth/v1/models/{id}/prewarm: reads the weights file into the page cache (returns when it
/// is resident).
pub async fn prewarm(
    State(st): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    cache_op(&st, &id, CacheOp::Prewarm).await
}

/// POST /hearth/v1/models/{id}/page-cache/evict: drops the weights file from the page cache (pages
/// a running runtime maps stay).
pub async fn page_cache_evict(
    State(st): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    cache_op(&st, &id, CacheOp::Evict).await
}

#[derive(Clone, Copy)]
enum CacheOp {
    Residency,
    Prewarm,
    Evict,
}

impl CacheOp {
    fn name(self) -> &'static str {
        match self {
            CacheOp::Residency => "residency",
            CacheOp::Prewarm => "prewarm",
            CacheOp::Evict => "evict",
        }
    }
}

/// Runs a page-cache operation on the model's `model_path` on the blocking pool.
async fn cache_op(st: &AppState, name: &str, op: CacheOp) -> Result<Json<Value>, ApiError> {
    let m = &st.config.models[st.resolve(name)?];
    let Some(path) = m.model_path.clone() else {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "no_model_file",
            format!(
                "model {} (runtime {}) has no model_path: there is no weights file to {}",
                m.id,
                m.runtime.as_str(),
                match op {
                    CacheOp::Residency => "report on",
                    CacheOp::Prewarm => "prewarm",
                    CacheOp::Evict => "evict",
                }
            ),
        ));
    };
    let span = tracing::info_span!("page_cache", model = %m.id, op = op.name());
    let t0 = Instant::now();
    let p = path.clone();
    let worker = span.clone();
    let result = tokio::task::spawn_blocking(move || {
        let _enter = worker.enter();
        match op {
            CacheOp::Residency => pagecache::residency(&p),
            CacheOp::Prewarm => pagecache::prewarm(&p),
            CacheOp::Evict => pagecache::evict(&p),
        }
    })
    .await;
    let seconds = t0.elapsed().as_secs_f64();
    let r: Residency = span.in_scope(|| match result {
        Ok(Ok(r)) => {
            if !matches!(op, CacheOp::Residency) {
                tracing::info!(
                    path = %path.display(),
                    file_bytes = r.file_bytes,
                    resident_bytes = r.resident_bytes,
                    seconds,
                    "page cache: {} done",
                    op.name()
                );
            }
            Ok(r)
        }
        Ok(Err(e)) => Err(cache_error(&m.id, m.runtime, &e)),
        Err(e) => {
            tracing::error!(error = %e, "page-cache task failed");
            Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "page_cache_failed",
                format!("model {}: the page-cache task failed: {e}", m.id),
            ))
        }
    })?;
    let mut body = json!({
        "model": m.id,
        "path": path.display().to_string(),
        "file_bytes": r.file_bytes,
        "resident_bytes": r.resident_bytes,
        "resident_fraction": r.fraction(),
    });
    if !matches!(op, CacheOp::Residency) {
        body["seconds"] = json!(seconds);
    }
    Ok(Json(body))
}

/// 409 when the model has no weights file to work on (missing, or not a regular file: e.g. a vllm
/// hub id or a model directory); 500 for what the OS refused.
fn cache_error(id: &str, runtime: crate::config::RuntimeKind, e: &PageCacheError) -> ApiError {
    if e.is_not_found() || e.is_not_a_file() {
        let hint = if runtime == crate::config::RuntimeKind::Vllm {
            " (a vllm model named by a hub id or a directory has no single weights file)"
        } else {
            ""
        };
        return ApiError::new(
            StatusCode::CONFLICT,
            "no_model_file",
            format!("model {id}: no weights file to work on: {e}{hint}"),
        );
    }
    tracing::warn!(error = %e, "page-cache operation failed");
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "page_cache_failed",
        format!("model {id}: {e}"),
    )
}

/// GET /metrics
pub async fn metrics(State(st): State<Arc<AppState>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        st.metrics.render(),
    )
}
