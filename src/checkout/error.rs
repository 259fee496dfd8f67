//! Checkout failures, and turning gix's errors into them without leaking the token or quoting
//! the git server.

use std::path::PathBuf;
use std::time::Duration;

/// Why a checkout failed. No variant ever holds the token: URLs are validated to carry no
/// credentials. No variant holds text the git server sent either (a reply body, an `ERR` line, a
/// redirect target, a file name from the repository): messages say which step failed and how
/// (HTTP status, connection, timeout), built from the agent's own words.
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
    #[error(
        "checkout of {url} exceeded the size limit of {limit} bytes written to the workspace \
         (checkout.max_bytes, GRYT_CHECKOUT_MAX_BYTES)"
    )]
    TooLarge { url: String, limit: u64 },
    #[error(
        "git URL host `{host}` {how} a loopback, private or link-local address; allowed only \
         with checkout.allow_private_hosts (GRYT_CHECKOUT_ALLOW_PRIVATE)"
    )]
    PrivateHost { host: String, how: &'static str },
    #[error(
        "checkout of {url} refused: the server redirected to another host or port (a clone \
         only connects to the git_url host)"
    )]
    RedirectRefused { url: String },
    #[error(
        "checkout of {url} refused: credentials were asked for another host (the token is only \
         sent to the git_url host)"
    )]
    TokenWithheld { url: String },
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

/// Which step of the clone failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    Prepare,
    Fetch,
    Checkout,
}

/// What failed, in the agent's words: the step, and an HTTP status, a connection failure (its
/// local cause: refused, TLS, DNS), a timeout or an I/O error kind. gix's own messages are not
/// used: they quote what the server sent (`ERR` lines, unexpected replies, file names).
pub(crate) fn describe(err: &gix::Error, step: Step) -> String {
    let step_text = match step {
        Step::Prepare => "preparing the clone",
        Step::Fetch => "fetching from the git server",
        Step::Checkout => "writing the checked-out files",
    };
    format!("{step_text} failed: {}", what(err, step))
}

fn what(err: &gix::Error, step: Step) -> String {
    for e in err.iter_errors() {
        let Some(e) = e.downcast_ref::<reqwest::Error>() else {
            continue;
        };
        if let Some(status) = e.status() {
            // The status line's canonical text, not the server's reason phrase or body.
            return format!("the server answered HTTP {status}");
        }
        if e.is_timeout() {
            return "the request timed out".into();
        }
        if e.is_connect() {
            return format!("cannot connect: {}", local_causes(e));
        }
        if e.is_redirect() {
            return "a redirect was refused".into();
        }
        return "the connection failed".into();
    }
    let kind = err.iter_errors().find_map(|e| {
        e.downcast_ref::<std::io::Error>()
            .map(std::io::Error::kind)
            .filter(|k| *k != std::io::ErrorKind::Other)
    });
    if let Some(kind) = kind {
        return format!("I/O error ({kind})");
    }
    match step {
        Step::Fetch => "the server's reply is not a usable git response".into(),
        Step::Checkout => "a file could not be written".into(),
        Step::Prepare => "the repository could not be set up".into(),
    }
}

/// The causes below a connection error: made on this machine (refused, TLS verification, name
/// resolution), without reqwest's own text, which quotes the URL of the request.
fn local_causes(e: &reqwest::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        let text = cause.to_string();
        if !text.is_empty() && !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        source = cause.source();
    }
    if parts.is_empty() {
        "no detail".into()
    } else {
        parts.join(": ")
    }
}

/// The whole chain of messages, with `secrets` replaced: for the agent's debug log only, never for
/// a result (gix quotes URLs and server replies in its messages).
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
