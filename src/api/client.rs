//! `ApiClient`: sends each protocol call with retries and turns the answer into an outcome.
//!
//! It must not log or return the API key, follow redirects, or decide anything about jobs.

use std::sync::Arc;
use std::time::Duration;

use backon::Retryable;
use bytes::Bytes;
use reqwest::StatusCode;
use secrecy::SecretString;
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::endpoint::{base_url, http_client};
use super::retry::{Transient, backoff, is_retryable, next_wait, retry_after};
use super::{
    ApiError, Call, CompleteOutcome, HeartbeatOutcome, LeaseOutcome, LogsOutcome, StartOutcome,
};
use crate::wire::pull::{
    CompleteRequest, HeartbeatReply, HeartbeatRequest, Lease, LeaseRequest, LogAck, LogChunk,
    StartRequest,
};

/// Told about every attempt's fate, so `/health` and metrics can show the API's state.
pub trait CallHooks: Send + Sync {
    fn succeeded(&self, call: Call);
    fn failed(&self, call: Call, message: &str);
}

/// How long one request may take, beyond the long poll's own wait.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest server message kept in an error.
const MAX_MESSAGE: usize = 500;

#[derive(Clone)]
pub struct ApiClient {
    http: reqwest::Client,
    base: String,
    hooks: Arc<dyn CallHooks>,
}

/// A final (non-retried) answer.
struct Answer {
    status: StatusCode,
    body: Bytes,
}

impl ApiClient {
    /// Checks the URL (before any connection) and builds the client.
    pub fn new(
        api_url: &str,
        allow_insecure_http: bool,
        key: &SecretString,
        ca_file: Option<&std::path::Path>,
        hooks: Arc<dyn CallHooks>,
    ) -> Result<Self, ApiError> {
        let base = base_url(api_url, allow_insecure_http)?;
        let http = http_client(key, ca_file)?;
        Ok(ApiClient { http, base, hooks })
    }

    /// The endpoint prefix, `<api_url>/api/v1/agent`.
    pub fn base(&self) -> &str {
        &self.base
    }

    pub async fn lease(&self, request: &LeaseRequest) -> Result<LeaseOutcome, ApiError> {
        // The server may hold the request for `wait_seconds`: allow for that on top.
        let timeout = REQUEST_TIMEOUT + Duration::from_secs(request.wait_seconds);
        let answer = self.send(Call::Lease, "/lease", request, timeout).await?;
        match answer.status {
            StatusCode::NO_CONTENT => Ok(LeaseOutcome::NoJob),
            StatusCode::OK => Ok(LeaseOutcome::Job(Box::new(parse::<Lease>(
                Call::Lease,
                &answer,
            )?))),
            _ => Err(self.refused(Call::Lease, &answer)),
        }
    }

    pub async fn start(
        &self,
        job_id: i64,
        request: &StartRequest,
    ) -> Result<StartOutcome, ApiError> {
        let answer = self
            .send(
                Call::Start,
                &job_path(job_id, "start"),
                request,
                REQUEST_TIMEOUT,
            )
            .await?;
        match lost(answer.status) {
            Some(code) => Ok(StartOutcome::NotHeld(code)),
            None if answer.status.is_success() => Ok(StartOutcome::Started),
            None => Err(self.refused(Call::Start, &answer)),
        }
    }

    pub async fn heartbeat(
        &self,
        job_id: i64,
        request: &HeartbeatRequest,
    ) -> Result<HeartbeatOutcome, ApiError> {
        let answer = self
            .send(
                Call::Heartbeat,
                &job_path(job_id, "heartbeat"),
                request,
                REQUEST_TIMEOUT,
            )
            .await?;
        match lost(answer.status) {
            Some(code) => Ok(HeartbeatOutcome::Lost(code)),
            None if answer.status == StatusCode::OK => {
                let reply: HeartbeatReply = parse(Call::Heartbeat, &answer)?;
                Ok(HeartbeatOutcome::Renewed {
                    cancel: reply.cancel,
                    lease_ttl_seconds: reply.lease_ttl_seconds,
                })
            }
            None => Err(self.refused(Call::Heartbeat, &answer)),
        }
    }

    pub async fn logs(&self, job_id: i64, chunk: &LogChunk) -> Result<LogsOutcome, ApiError> {
        let answer = self
            .send(
                Call::Logs,
                &job_path(job_id, "logs"),
                chunk,
                REQUEST_TIMEOUT,
            )
            .await?;
        match lost(answer.status) {
            Some(code) => Ok(LogsOutcome::Lost(code)),
            None if answer.status == StatusCode::OK => {
                let ack: LogAck = parse(Call::Logs, &answer)?;
                Ok(LogsOutcome::Committed(ack.committed))
            }
            None => Err(self.refused(Call::Logs, &answer)),
        }
    }

    pub async fn complete(
        &self,
        job_id: i64,
        request: &CompleteRequest,
    ) -> Result<CompleteOutcome, ApiError> {
        let answer = self
            .send(
                Call::Complete,
                &job_path(job_id, "complete"),
                request,
                REQUEST_TIMEOUT,
            )
            .await?;
        match lost(answer.status) {
            Some(code) => Ok(CompleteOutcome::LeaseLost(code)),
            None if answer.status.is_success() => Ok(CompleteOutcome::Accepted),
            None => Err(self.refused(Call::Complete, &answer)),
        }
    }

    /// POSTs `body` until an answer that is not transient arrives.
    async fn send<B: Serialize + Sync>(
        &self,
        call: Call,
        path: &str,
        body: &B,
        timeout: Duration,
    ) -> Result<Answer, ApiError> {
        let url = format!("{}{path}", self.base);
        // Encoded once, not per attempt (a log chunk is up to 1 MiB); our own types always
        // encode, but if one did not, retrying would not help.
        let payload =
            bytes::Bytes::from(serde_json::to_vec(body).map_err(|e| ApiError::Transport {
                call: call.as_str(),
                message: format!("cannot encode the request: {e}"),
            })?);
        let attempt = || async {
            let response = self
                .http
                .post(&url)
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(payload.clone())
                .timeout(timeout)
                .send()
                .await
                .map_err(|e| transient(&e))?;
            let status = response.status();
            if is_retryable(status) {
                let after = retry_after(response.headers());
                let text = response.text().await.unwrap_or_default();
                return Err(Transient {
                    message: format!("HTTP {status}: {}", clip(&text)),
                    retry_after: after,
                });
            }
            let body = response.bytes().await.map_err(|e| transient(&e))?;
            Ok(Answer { status, body })
        };
        let answer = attempt
            .retry(backoff())
            .sleep(tokio::time::sleep)
            .adjust(|e: &Transient, step| step.map(|s| next_wait(s, e.retry_after)))
            .notify(|e: &Transient, wait| {
                self.hooks.failed(call, &e.message);
                tracing::warn!(
                    call = call.as_str(),
                    error = %e.message,
                    retry_in_ms = wait.as_millis() as u64,
                    "API call failed; retrying"
                );
            })
            .await
            .map_err(|e| ApiError::Transport {
                call: call.as_str(),
                message: e.message,
            })?;
        if answer.status.is_success() || lost(answer.status).is_some() {
            // A lease-lost answer is still the API answering.
            self.hooks.succeeded(call);
        }
        Ok(answer)
    }

    /// A final answer the call does not expect: credentials trouble or another refusal.
    fn refused(&self, call: Call, answer: &Answer) -> ApiError {
        let status = answer.status.as_u16();
        let message = clip(&String::from_utf8_lossy(&answer.body));
        let error = if matches!(status, 401 | 403) {
            ApiError::Unauthorized {
                call: call.as_str(),
                status,
                message,
            }
        } else {
            ApiError::Rejected {
                call: call.as_str(),
                status,
                message,
            }
        };
        self.hooks.failed(call, &error.to_string());
        error
    }
}

fn job_path(job_id: i64, what: &str) -> String {
    format!("/jobs/{job_id}/{what}")
}

/// 404, 409 and 410 all mean "this lease is not (or no longer) yours".
fn lost(status: StatusCode) -> Option<u16> {
    matches!(status.as_u16(), 404 | 409 | 410).then_some(status.as_u16())
}

fn parse<T: DeserializeOwned>(call: Call, answer: &Answer) -> Result<T, ApiError> {
    serde_json::from_slice(&answer.body).map_err(|e| ApiError::Invalid {
        call: call.as_str(),
        message: e.to_string(),
    })
}

fn transient(error: &reqwest::Error) -> Transient {
    // The whole cause chain: "error sending request" alone says nothing useful.
    let mut message = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(s) = source {
        message.push_str(": ");
        message.push_str(&s.to_string());
        source = s.source();
    }
    Transient {
        message,
        retry_after: None,
    }
}

fn clip(text: &str) -> String {
    let text = text.trim();
    match text.char_indices().nth(MAX_MESSAGE) {
        Some((cut, _)) => format!("{}...", &text[..cut]),
        None => text.to_owned(),
    }
}
