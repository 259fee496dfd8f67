//! Checkout failures, and turning gix's errors into them without leaking the token.

use std::path::PathBuf;
use std::time::Duration;

/// Why a checkout failed. No variant ever holds the token: URLs are validated to carry no
/// credentials, and messages from gix are scrubbed before they land here.
#[derive(Debug, thiserror::Error)]
pub enum CheckoutError {
    #[error("git URL scheme `{scheme}` is not allowed: {hint}")]
    DisallowedScheme { scheme: String, hint: &'static str },
    #[error("invalid git URL: {reason}")]
    InvalidUrl { reason: String },
    #[error("invalid checkout request: {reason}")]
    InvalidRequest { reason: String },
    #[error("authentication failed for {url}: check the token")]
    AuthFailed { url: String },
    #[error("branch `{branch}` not found in {url}")]
    BranchNotFound { branch: String, url: String },
    #[error("commit {commit} not found in {url} (branch `{branch}`)")]
    CommitNotFound {
        commit: String,
        branch: String,
        url: String,
    },
    #[error("checkout of {url} timed out after {}s", .after.as_secs())]
    Timeout { url: String, after: Duration },
    #[error("checkout of {url} was stopped: the job was cancelled")]
    Stopped { url: String },
    #[error("checkout of {url} exceeded the size limit of {limit} bytes (checkout.max_bytes)")]
    TooLarge { url: String, limit: u64 },
    #[error("checkout destination {path}: {reason}")]
    Destination { path: PathBuf, reason: String },
    #[error("checkout of {url} failed: {message}")]
    Other { url: String, message: String },
}

/// What a failed gix operation means for the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cause {
    Auth,
    NotFound,
    Cancelled,
    Other,
}

pub(crate) fn cause(err: &gix::Error) -> Cause {
    if err.is_unauthenticated() || err.is_permission_denied() || mentions_auth(err) {
        Cause::Auth
    } else if err.is_cancelled() {
        Cause::Cancelled
    } else if err.is_not_found() {
        Cause::NotFound
    } else {
        Cause::Other
    }
}

/// HTTP 401 arrives as an I/O error carrying gix's `AuthenticationRequired`; 403 as a reqwest
/// status. Either may be nested below messages that carry no classification.
fn mentions_auth(err: &gix::Error) -> bool {
    err.iter_errors().any(|e| {
        e.downcast_ref::<gix::protocol::transport::client::AuthenticationRequired>()
            .is_some()
            || e.downcast_ref::<reqwest::Error>()
                .and_then(reqwest::Error::status)
                .is_some_and(|s| s == 401 || s == 403)
    })
}

/// The whole chain of messages, with `secrets` replaced. gix quotes URLs and server replies in
/// its messages; the token should never be among them, but this makes sure.
pub(crate) fn message(err: &gix::Error, secrets: &[&str]) -> String {
    let mut parts: Vec<String> = Vec::new();
    for e in err.iter_errors() {
        let text = e.to_string();
        if !text.is_empty() && !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
    }
    scrub(&parts.join(": "), secrets)
}

pub(crate) fn scrub(text: &str, secrets: &[&str]) -> String {
    let mut text = text.to_owned();
    for secret in secrets.iter().filter(|s| !s.is_empty()) {
        text = text.replace(secret, "***");
    }
    text
}
