//! `GET /health`: serialises the agent's health report (`crate::state::health`).

use std::sync::Arc;

use axum::Json;
use axum::extract::State;

use crate::state::AgentState;
use crate::state::health::Health;

pub async fn health(State(state): State<Arc<AgentState>>) -> Json<Health> {
    Json(state.health())
}
