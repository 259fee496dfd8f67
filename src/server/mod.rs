//! The local HTTP endpoint: `GET /`, `GET /health`, `GET /metrics` and (push mode)
//! `POST /jobs/execute`. Handlers are thin: they read the agent's state or call the executor.

mod health;
pub mod push;

use std::future::Future;
use std::sync::Arc;

use axum::Router;
use axum::routing::get;
use serde_json::json;
use tokio::net::TcpListener;

use crate::agent::AgentState;

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

/// Serves until `shutdown` resolves; in-flight requests are allowed to finish.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
}

async fn root() -> axum::Json<serde_json::Value> {
    axum::Json(json!({"service": "Gryt CI Agent", "version": crate::VERSION, "status": "running"}))
}

async fn metrics(
    axum::extract::State(state): axum::extract::State<Arc<AgentState>>,
) -> impl axum::response::IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
}
