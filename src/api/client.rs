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
    UnreadableLease,
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
/// Largest lease answer read: it carries a job spec (push mode takes 10 MiB bodies by default).
pub const MAX_LEASE_ANSWER: usize = 16 * 1024 * 1024;
/// Largest answer read for the other calls (small JSON objects or error messages).
pub const MAX_ANSWER: usize = 64 * 1024;

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
    /// The body went past this cap: not read further, the call fails.
    too_large: Option<usize>,
}

/// What is read of a lease answer whose job does not decode.
#[derive(serde::Deserialize)]
struct LeaseHead {
    lease_id: String,
    #[serde(default)]
    lease_ttl_seconds: u64,
    job: JobHead,
}

#[derive(serde::Deserialize)]
struct JobHead {
    job_id: i64,
}

/// Reads a body up to `cap` bytes; `None` when it is longer (the rest is never read, so a
/// hostile or broken server cannot make the agent buffer an endless answer).
pub(crate) async fn read_capped(
    mut response: reqwest::Response,
    cap: usize,
) -> Result<Option<Bytes>, reqwest::Error> {
    if response
        .content_length()
        .is_some_and(|len| len > cap as u64)
    {
        return Ok(None);
    }
    let mut body = bytes::BytesMut::new();
    while let Some(chunk) = response.chunk().await? {
        if body.len() + chunk.len() > cap {
            return Ok(None);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Some(body.freeze()))
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
            StatusCode::OK => match parse::<Lease>(Call::Lease, &answer) {
                Ok(lease) => Ok(LeaseOutcome::Job(Box::new(lease))),
                Err(e) => {
                    // A job this agent cannot read but whose lease it can name: the caller
                    // completes it with `error` instead of letting it cycle between agents.
                    let Ok(head) = parse::<LeaseHead>(Call::Lease, &answer) else {
                        return Err(e);
                    };
                    let error = match e {
                        ApiError::Invalid { message, .. } => clip(&message, MAX_MESSAGE),
                        other => other.to_string(),
                    };
                    Ok(LeaseOutcome::Unreadable(Box::new(UnreadableLease {
                        lease_id: head.lease_id,
                        lease_ttl_seconds: head.lease_ttl_seconds,
                        job_id: head.job.job_id,
                        error,
                    })))
                }
            },
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
                let text = match read_capped(response, MAX_ANSWER).await {
                    Ok(Some(body)) => String::from_utf8_lossy(&body).into_owned(),
                    _ => String::new(),
                };
                return Err(Transient {
                    message: format!("HTTP {status}: {}", clip(&text, MAX_MESSAGE)),
                    retry_after: after,
                });
            }
            let cap = if call == Call::Lease {
                MAX_LEASE_ANSWER
            } else {
                MAX_ANSWER
            };
            let body = read_capped(response, cap)
                .await
                .map_err(|e| transient(&e))?;
            Ok(Answer {
                status,
                too_large: body.is_none().then_some(cap),
                body: body.unwrap_or_default(),
            })
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
        if let Some(cap) = answer.too_large {
            let error = ApiError::Invalid {
                call: call.as_str(),
                message: format!(
                    "the answer is larger than {cap} bytes (HTTP {})",
                    answer.status
                ),
            };
            self.hooks.failed(call, &error.to_string());
            return Err(error);
        }
        if answer.status.is_success() || lost(answer.status).is_some() {
            // A lease-lost answer is still the API answering.
            self.hooks.succeeded(call);
        }
        Ok(answer)
    }

    /// A final answer the call does not expect: credentials trouble or another refusal.
    fn refused(&self, call: Call, answer: &Answer) -> ApiError {
        let status = answer.status.as_u16();
        let message = clip(&String::from_utf8_lossy(&answer.body), MAX_MESSAGE);
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
    // The path names the field at fault (`job.timeout_seconds: a value of the wrong type ...`).
    let mut decoder = serde_json::Deserializer::from_slice(&answer.body);
    serde_path_to_error::deserialize(&mut decoder).map_err(|e| ApiError::Invalid {
        call: call.as_str(),
        message: unreadable(&e),
    })
}

/// Why an answer does not decode, from the field's path and the error's kind only: serde's own
/// text may quote the value (a job's env, a token), which must not reach a job's error or a log.
fn unreadable(e: &serde_path_to_error::Error<serde_json::Error>) -> String {
    use serde_json::error::Category;
    let inner = e.inner();
    let text = inner.to_string();
    let what = match inner.classify() {
        // Names a field of the schema, never a value.
        Category::Data if text.starts_with("missing field `") => text
            .split(" at line ")
            .next()
            .unwrap_or("missing field")
            .to_owned(),
        Category::Data => "a value of the wrong type or out of range".to_owned(),
        Category::Syntax => "not valid JSON".to_owned(),
        Category::Eof => "the answer ends too early".to_owned(),
        Category::Io => "the answer cannot be read".to_owned(),
    };
    format!(
        "{}: {what} (line {}, column {})",
        e.path(),
        inner.line(),
        inner.column()
    )
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

/// `text` trimmed and cut after `max` characters, for an error or a report.
pub(crate) fn clip(text: &str, max: usize) -> String {
    let text = text.trim();
    match text.char_indices().nth(max) {
        Some((cut, _)) => format!("{}...", &text[..cut]),
        None => text.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(body: &str) -> String {
        let answer = Answer {
            status: StatusCode::OK,
            body: Bytes::from(body.to_owned()),
            too_large: None,
        };
        match parse::<crate::wire::pull::Lease>(Call::Lease, &answer) {
            Err(ApiError::Invalid { message, .. }) => message,
            other => panic!("decoded: {other:?}"),
        }
    }

    #[test]
    fn an_unreadable_answer_names_the_field_never_the_value() {
        let message = decode(
            r#"{"lease_id":"L","lease_ttl_seconds":30,"job":{"job_id":1,"pipeline_b64":"",
                "env_vars":"hunter2-secret"}}"#,
        );
        assert!(message.starts_with("job.env_vars: "), "{message}");
        assert!(!message.contains("hunter2"), "{message}");
        let message = decode(r#"{"lease_id":"L","lease_ttl_seconds":30}"#);
        assert!(message.contains("missing field `job`"), "{message}");
        assert!(decode("{\"lease_id\": tru").contains("line 1"));
    }
}
