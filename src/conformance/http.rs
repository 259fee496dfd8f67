//! The checker's own small HTTP client: one raw POST per call, no retries, the status and body
//! as the server sent them (the agent's `ApiClient` hides both, by design).

use std::path::Path;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;
use tokio::time::Instant;

use super::ConformanceError;
use crate::api::client::{MAX_ANSWER, clip, read_capped};
use crate::api::endpoint::{base_url, http_client};

/// How long a call may take beyond the long poll's own wait.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest part of a server's answer kept for the report.
const MAX_SHOWN: usize = 200;

/// One answer from the server.
#[derive(Debug, Clone)]
pub struct Reply {
    /// 0 when no answer came (network error or timeout); `error` says why.
    pub status: u16,
    pub body: Value,
    /// The raw body, clipped, for the report.
    pub text: String,
    pub retry_after: Option<Duration>,
    pub sent: Instant,
    pub received: Instant,
    pub error: Option<String>,
}

impl Reply {
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// 404, 409 or 410: the lease is not (or no longer) held.
    pub fn is_lost(&self) -> bool {
        matches!(self.status, 404 | 409 | 410)
    }

    /// `committed` of a logs answer.
    pub fn committed(&self) -> Option<u64> {
        self.body.get("committed").and_then(Value::as_u64)
    }

    /// The answer in a few words, for the report.
    pub fn shown(&self) -> String {
        match &self.error {
            Some(e) => format!("no answer ({e})"),
            None if self.text.is_empty() => format!("{}", self.status),
            None => format!("{} {}", self.status, self.text),
        }
    }
}

#[derive(Clone)]
pub struct Probe {
    http: reqwest::Client,
    /// The same client with a key the server cannot know.
    stranger: reqwest::Client,
    stranger_key: String,
    /// The real key: a server that echoes it back never gets it printed in the report.
    key: SecretString,
    base: String,
}

impl Probe {
    pub fn new(
        api_url: &str,
        allow_insecure_http: bool,
        key: &SecretString,
        ca_file: Option<&Path>,
    ) -> Result<Probe, ConformanceError> {
        let base = base_url(api_url, allow_insecure_http)?;
        let stranger_key = format!("gryt-conformance-unknown-{}", uuid::Uuid::new_v4().simple());
        Ok(Probe {
            http: http_client(key, ca_file)?,
            stranger: http_client(&SecretString::from(stranger_key.clone()), ca_file)?,
            stranger_key,
            key: key.clone(),
            base,
        })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// The key sent by [`Probe::post_as_stranger`].
    pub fn stranger_key(&self) -> &str {
        &self.stranger_key
    }

    pub async fn post(&self, path: &str, body: &Value, wait: Duration) -> Reply {
        self.send(&self.http, path, body, wait).await
    }

    /// The same call with an unknown key.
    pub async fn post_as_stranger(&self, path: &str, body: &Value) -> Reply {
        self.send(&self.stranger, path, body, Duration::ZERO).await
    }

    async fn send(
        &self,
        http: &reqwest::Client,
        path: &str,
        body: &Value,
        wait: Duration,
    ) -> Reply {
        let sent = Instant::now();
        let answer = http
            .post(format!("{}{path}", self.base))
            .json(body)
            .timeout(REQUEST_TIMEOUT + wait)
            .send()
            .await;
        let mut reply = Reply {
            status: 0,
            body: Value::Null,
            text: String::new(),
            retry_after: None,
            sent,
            received: sent,
            error: None,
        };
        match answer {
            Ok(response) => {
                reply.status = response.status().as_u16();
                reply.retry_after = crate::api::retry::retry_after(response.headers());
                match read_capped(response, MAX_ANSWER).await {
                    Ok(Some(bytes)) => {
                        reply.body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                        let text = String::from_utf8_lossy(&bytes)
                            .replace(self.key.expose_secret(), "***");
                        reply.text = clip(&text, MAX_SHOWN);
                    }
                    Ok(None) => reply.error = Some(format!("an answer over {MAX_ANSWER} bytes")),
                    Err(e) => reply.error = Some(e.to_string()),
                }
            }
            Err(e) => reply.error = Some(e.without_url().to_string()),
        }
        reply.received = Instant::now();
        reply
    }
}
