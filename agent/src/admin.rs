//! The admin API under `/hearth/v1/` and `/metrics`: what operators, `hearth status` and later the
//! predictor and the OpenClaw plugin use.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use serde_json::json;

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
