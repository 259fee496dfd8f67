//! `POST /jobs/execute`: the existing API's push endpoint, unchanged in paths, fields and codes.
//!
//! Order matters: the key is checked (middleware) before the body is read; the body is then
//! bounded (413), parsed (422 naming the field), its pipeline validated (422), the agent's
//! readiness checked (503 with `Retry-After` while it cannot run jobs, so the API runs the job
//! itself), and only then is a slot taken. With every slot busy the request waits for one in a
//! bounded queue (`push.max_queue`), as the existing agent ran jobs one after another; only a
//! full queue answers 429. A request whose client goes away leaves the queue. A job that ran and
//! failed is still a 200.

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use secrecy::SecretString;
use serde_json::json;

use crate::pipeline::Pipeline;
use crate::state::AgentState;
use crate::state::admit::{Refusal, SlotWait};
use crate::wire::JobSpec;

const API_KEY_HEADER: &str = "x-api-key";
/// What a busy agent tells the API to wait before trying it again.
const RETRY_AFTER_SECONDS: &str = "5";

pub fn routes(state: &Arc<AgentState>) -> Router<Arc<AgentState>> {
    Router::new()
        .route("/jobs/execute", post(execute))
        .layer(DefaultBodyLimit::max(state.settings.push.max_body_bytes))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_key))
}

/// A JSON error body: `error` for people, `detail` as FastAPI clients expect, `field` for 422s.
pub fn error(status: StatusCode, message: &str, field: Option<&str>) -> Response {
    let mut body = json!({"error": message, "detail": message});
    if let Some(field) = field {
        body["field"] = json!(field);
    }
    (status, axum::Json(body)).into_response()
}

async fn require_key(
    State(state): State<Arc<AgentState>>,
    request: Request,
    next: Next,
) -> Response {
    let accepted = match (&state.push_keys, request.headers().get(API_KEY_HEADER)) {
        (Some(keys), Some(presented)) => keys.accepts(presented.as_bytes()),
        _ => false,
    };
    if !accepted {
        return error(
            StatusCode::UNAUTHORIZED,
            "missing or invalid X-API-Key",
            None,
        );
    }
    next.run(request).await
}

async fn execute(
    State(state): State<Arc<AgentState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let body = match body {
        Ok(body) => body,
        Err(rejection) => return error(rejection.status(), &rejection.body_text(), None),
    };
    let job = match JobSpec::from_json(&body) {
        Ok(job) => job,
        Err(e) => {
            return error(
                StatusCode::UNPROCESSABLE_ENTITY,
                &e.to_string(),
                Some(&e.field),
            );
        }
    };
    if let Err(e) = Pipeline::from_b64(&job.pipeline_b64) {
        return error(
            StatusCode::UNPROCESSABLE_ENTITY,
            &format!("invalid pipeline_b64: {e}"),
            Some("pipeline_b64"),
        );
    }
    let max = state.settings.push.max_queue;
    let slot = match state.admit(SlotWait::Queue { max }).await {
        Ok(slot) => slot,
        Err(refusal) => return refused(&refusal),
    };
    // The middleware accepted this header, so it is present and valid.
    let presented = headers
        .get(API_KEY_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(|v| SecretString::from(v.to_owned()))
        .unwrap_or_else(|| SecretString::from(String::new()));
    // Answered once the result is made: the job's task removes its container after.
    let ran = crate::push::run_job(state, job, slot, presented).await;
    if ran.given_back.is_some() {
        // Not the job's failure: 503, so the API falls back as it does for an unable agent.
        return busy(
            StatusCode::SERVICE_UNAVAILABLE,
            ran.result
                .error
                .as_deref()
                .unwrap_or("the agent could not run this job"),
        );
    }
    axum::Json(ran.result).into_response()
}

/// 429 when the queue is full; 503 while the agent drains or cannot run jobs now.
fn refused(refusal: &Refusal) -> Response {
    let status = match refusal {
        Refusal::QueueFull { .. } => StatusCode::TOO_MANY_REQUESTS,
        _ => StatusCode::SERVICE_UNAVAILABLE,
    };
    busy(status, &refusal.message())
}

fn busy(status: StatusCode, message: &str) -> Response {
    let mut response = error(status, message, None);
    response.headers_mut().insert(
        header::RETRY_AFTER,
        HeaderValue::from_static(RETRY_AFTER_SECONDS),
    );
    response
}
