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
    st.supervisor.status().await.map(Json).ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "hearth is shutting down",
        )
    })
}

fn model_index(st: &AppState, id: &str) -> Result<usize, ApiError> {
    st.config
        .models
        .iter()
        .position(|m| m.id == id || m.aliases.iter().any(|a| a == id))
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "model_not_found",
                format!("The model `{id}` does not exist."),
            )
        })
}

/// POST /hearth/v1/models/{id}/load
pub async fn load(
    State(st): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let i = model_index(&st, &id)?;
    st.supervisor.load(i);
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"model": st.config.models[i].id, "requested": "load"})),
    ))
}

/// POST /hearth/v1/models/{id}/unload
pub async fn unload(
    State(st): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let i = model_index(&st, &id)?;
    st.supervisor.unload(i);
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"model": st.config.models[i].id, "requested": "unload"})),
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
