//! The local HTTP endpoint: `GET /`, `GET /health`, `GET /metrics` and (push mode)
//! `POST /jobs/execute`. Handlers are thin: they read the agent's state (`crate::state`) or
//! call into push mode.

pub mod conn;
mod health;
pub mod push;

use std::sync::Arc;

use axum::Router;
use axum::routing::get;
use serde_json::json;

use crate::state::AgentState;
pub use conn::{Limits, serve};

/// The endpoint's routes for this agent's settings.
pub fn router(state: Arc<AgentState>) -> Router {
    let mut router = Router::new()
        .route("/", get(root))
        .route("/health", get(health::health));
    if state.settings.metrics {
        router = router.route("/metrics", get(metrics));
    }
    if state.push_keys.is_some() {
        router = router.merge(push::routes(&state));
    }
    router.with_state(state)
}

async fn root() -> axum::Json<serde_json::Value> {
    axum::Json(json!({"service": "Gryt CI Agent", "version": crate::VERSION, "status": "running"}))
}

async fn metrics(
    axum::extract::State(state): axum::extract::State<Arc<AgentState>>,
) -> impl axum::response::IntoResponse {
    state.metrics.set_push_queue(state.slots.queued());
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
}
