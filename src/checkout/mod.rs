//! Repository checkout: a shallow clone of a job's repository into its workspace, with gix.
//!
//! The clone speaks HTTPS itself (gix over reqwest + rustls); the agent runs no `git` binary and
//! links no OpenSSL. It fetches one branch at depth 1, or one commit at depth 1 when the job
//! names one (falling back to the branch's history when the server refuses to serve a commit by
//! id), then writes the worktree into the destination, which the caller mounts as `/workspace`.
//!
//! What the job gets is the repository's files as committed, plus `.git`:
//! - submodules are not fetched (their directories stay empty);
//! - Git LFS files are not fetched: LFS pointer files stay pointer files;
//! - no git config of the machine or user applies (no helpers, filters, proxies from there).
//!
//! `file://` URLs (off unless `checkout.allow_file_urls`; meant for tests and local mirrors) are
//! the exception to "no git binary": gix serves them by running `git-upload-pack` locally.
//!
//! The token is offered only when the server asks (HTTP 401) and only to the `git_url` host, as
//! Basic credentials `x-access-token:<token>`; it never goes into the URL, a log line, an error
//! or the result. The clone connects only to the `git_url` host and port (a redirect elsewhere
//! is refused), and not to loopback, private or link-local addresses unless
//! [`CheckoutSettings::allow_private_hosts`] (`net.rs`). Errors never quote what the server sent.
//! A clone is bounded in time ([`CheckoutSettings::timeout`]) and in bytes written to the
//! workspace, pack and files ([`CheckoutSettings::max_bytes`], `limit.rs`); both stop the clone
//! itself, not only the wait for it.
//! Trust for HTTPS is the platform's (on Linux: the system store, honouring `SSL_CERT_FILE`),
//! plus [`CheckoutSettings::ca_file`] when set.

mod clone;
mod dest;
mod error;
mod limit;
mod net;
mod url;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::time::Duration;

use base64::Engine;
use secrecy::{ExposeSecret, SecretString};

use crate::config::Settings;

pub use error::CheckoutError;
pub use url::validate_url;

use clone::{Failure, Stage};
use error::Cause;
use net::{Guard, Refusal};

/// What the settings say about checkouts.
#[derive(Debug, Clone)]
pub struct CheckoutSettings {
    pub timeout: Duration,
    /// Cap on bytes written to the workspace: the fetched pack plus the checked-out files.
    pub max_bytes: u64,
    /// Allow plain `http://` to hosts other than loopback.
    pub allow_insecure_http: bool,
    pub allow_file_urls: bool,
    /// PEM file of extra CA certificates trusted for the clone, on top of the system's.
    pub ca_file: Option<PathBuf>,
    /// Let `git_url` reach loopback, private, link-local and unique-local addresses.
    pub allow_private_hosts: bool,
}

impl CheckoutSettings {
    pub fn from_settings(settings: &Settings) -> Self {
        CheckoutSettings {
            timeout: Duration::from_secs(settings.checkout.timeout_seconds),
            max_bytes: settings.checkout.max_bytes,
            allow_insecure_http: settings.allow_insecure_http,
            allow_file_urls: settings.checkout.allow_file_urls,
            ca_file: settings.ca_file.clone(),
            allow_private_hosts: settings.checkout.allow_private_hosts,
        }
    }
}

/// One job's repository: the fields of its spec, with the token already decrypted.
#[derive(Debug, Clone, Copy)]
pub struct CheckoutRequest<'a> {
    pub url: &'a str,
    pub branch: &'a str,
    pub commit: Option<&'a str>,
    pub token: Option<&'a SecretString>,
}

/// What was checked out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckedOut {
    /// Hex id of the commit in the worktree.
    pub commit: String,
}

/// How long a clone may take to stop after its deadline before it is left behind. gix notices
/// the interrupt flag within one read; only a request blocked on a silent server waits for the
/// HTTP client's own timeout, which is the checkout timeout too.
const STOP_GRACE_MAX: Duration = Duration::from_secs(60);

/// What the caller did while the clone thread ran (`handoff` in [`checkout_until`]).
const WAITING: u8 = 0;
/// The job was stopped: the destination is emptied whatever the clone's outcome.
const STOPPED: u8 = 1;
/// The caller stopped waiting and returned: empty the destination if it is still there, never
/// make it again.
const ABANDONED: u8 = 2;

/// Puts the destination back after a clone: empty (and present) unless the clone succeeded
/// and is wanted; after an abandoned clone only emptied if the caller has not removed it.
fn tidy(dest: &dest::Dest, handoff: u8, succeeded: bool) {
    let tidied = match handoff {
        ABANDONED => dest.empty_if_present(),
        STOPPED => dest.reset(),
        _ if !succeeded => dest.reset(),
        _ => Ok(()),
    };
    if let Err(e) = tidied {
        tracing::warn!(path = %dest.path().display(), "cannot empty the checkout destination: {e}");
    }
}

/// Clones `req` into `dest` (an existing, empty directory) and checks out its worktree.
///
/// On failure `dest` is left as it was found: present and empty.
pub async fn checkout(
    req: &CheckoutRequest<'_>,
    dest: &Path,
    settings: &CheckoutSettings,
) -> Result<CheckedOut, CheckoutError> {
    checkout_until(req, dest, settings, std::future::pending()).await
}

/// [`checkout`] that also stops, through the same interrupt as its time limit, when `stop`
/// resolves (the job was cancelled): the clone thread itself stops instead of writing on into
/// a workspace that is about to be removed.
pub async fn checkout_until(
    req: &CheckoutRequest<'_>,
    dest: &Path,
    settings: &CheckoutSettings,
    stop: impl std::future::Future<Output = ()>,
) -> Result<CheckedOut, CheckoutError> {
    let allowed = url::classify(req.url, settings)?;
    validate_branch(req.branch)?;
    let commit = req.commit.map(validate_commit).transpose()?;
    let dest = dest::Dest::inspect(dest)?;
    let interrupt = Arc::new(AtomicBool::new(false));
    let budget = limit::Budget::new(settings.max_bytes, interrupt.clone());
    let guard = Guard::new(req.url, settings.allow_private_hosts);
    if guard.is_none() && allowed != url::Allowed::File {
        // Without a guard the clone could connect anywhere: fail closed.
        return Err(CheckoutError::InvalidUrl {
            reason: "the git URL cannot be parsed".into(),
        });
    }
    let job = clone::Job {
        url: req.url.to_owned(),
        branch: req.branch.to_owned(),
        commit,
        token: req.token.cloned(),
        dest: dest.clone(),
        request_timeout: settings.timeout,
        ca_file: settings.ca_file.clone(),
        interrupt: interrupt.clone(),
        budget: budget.clone(),
        max_bytes: settings.max_bytes,
        guard: guard.clone(),
    };
    // The clone thread tidies the destination itself, after its last write and off the async
    // runtime (a failed checkout can be large); `handoff` tells it what the caller did meanwhile.
    let handoff = Arc::new(AtomicU8::new(WAITING));
    let mut task = {
        let (dest, handoff) = (dest.clone(), handoff.clone());
        tokio::task::spawn_blocking(move || {
            let result = clone::run(&job);
            tidy(&dest, handoff.load(Ordering::SeqCst), result.is_ok());
            result
        })
    };
    let mut timed_out = false;
    let mut stopped = false;
    let first = tokio::select! {
        joined = tokio::time::timeout(settings.timeout, &mut task) => joined.ok(),
        _ = stop => {
            stopped = true;
            None
        }
    };
    let joined = match first {
        Some(joined) => joined,
        None => {
            timed_out = !stopped;
            if stopped {
                handoff.store(STOPPED, Ordering::SeqCst);
            }
            interrupt.store(true, Ordering::SeqCst);
            let grace = settings.timeout.min(STOP_GRACE_MAX);
            let joined = tokio::time::timeout(grace, task).await;
            if joined.is_err() {
                // Given up on: the caller is about to remove the workspace, and the thread must
                // not make it again when it finally ends.
                handoff.store(ABANDONED, Ordering::SeqCst);
            }
            match joined {
                Ok(joined) => joined,
                Err(_) if stopped => {
                    tracing::warn!(url = req.url, "stopped clone has not stopped; leaving it");
                    return Err(CheckoutError::Stopped {
                        url: req.url.to_owned(),
                    });
                }
                Err(_) => {
                    tracing::warn!(url = req.url, "timed-out clone has not stopped; leaving it");
                    return Err(CheckoutError::Timeout {
                        url: req.url.to_owned(),
                        after: settings.timeout,
                    });
                }
            }
        }
    };
    if stopped {
        return Err(CheckoutError::Stopped {
            url: req.url.to_owned(),
        });
    }
    let result = match joined {
        Ok(result) => result,
        // A panic inside gix (bad server data): the thread never reached `tidy`.
        Err(e) => {
            let dest = dest.clone();
            let _ = tokio::task::spawn_blocking(move || tidy(&dest, WAITING, false)).await;
            Err(Failure::Panicked(e.to_string()))
        }
    };
    match result {
        Ok(commit) => Ok(CheckedOut { commit }),
        Err(failure) => Err(explain(
            failure,
            req,
            dest.path(),
            settings,
            timed_out,
            budget.exceeded(),
            guard.and_then(|g| g.refusal()),
        )),
    }
}

fn explain(
    failure: Failure,
    req: &CheckoutRequest<'_>,
    dest: &Path,
    settings: &CheckoutSettings,
    timed_out: bool,
    too_large: bool,
    refusal: Option<Refusal>,
) -> CheckoutError {
    let url = req.url.to_owned();
    let secrets = secrets(req.token);
    let secrets: Vec<&str> = secrets.iter().map(String::as_str).collect();
    if let Failure::Gix(e, ..) = &failure {
        // The full story, for the operator's debug log only: it may quote the server.
        tracing::debug!(url, error = ?error::message(e, &secrets), "clone failed");
    }
    // The limits set the interrupt flag; whatever gix then said is a consequence.
    let too_large =
        too_large || matches!(&failure, Failure::Gix(e, ..) if e.is_resource_exhausted());
    if too_large {
        return CheckoutError::TooLarge {
            url,
            limit: settings.max_bytes,
        };
    }
    if timed_out {
        return CheckoutError::Timeout {
            url,
            after: settings.timeout,
        };
    }
    match refusal {
        Some(Refusal::OtherHost) => return CheckoutError::RedirectRefused { url },
        Some(Refusal::TokenElsewhere) => return CheckoutError::TokenWithheld { url },
        Some(Refusal::PrivateAddress) => {
            return CheckoutError::PrivateHost {
                host: url::host_of_url(req.url).unwrap_or_default(),
                how: "resolves to",
            };
        }
        None => {}
    }
    match failure {
        Failure::Gix(e, stage, step) => match (error::cause(&e), stage) {
            (Cause::Auth, _) => CheckoutError::AuthFailed { url },
            (Cause::NotFound, Stage::Branch) => CheckoutError::BranchNotFound {
                branch: req.branch.to_owned(),
                url,
            },
            (Cause::NotFound, Stage::Commit) => CheckoutError::CommitNotFound {
                commit: req.commit.unwrap_or_default().to_owned(),
                branch: req.branch.to_owned(),
                url,
            },
            _ => CheckoutError::Other {
                url,
                message: error::describe(&e, step),
            },
        },
        Failure::CommitMissing => CheckoutError::CommitNotFound {
            commit: req.commit.unwrap_or_default().to_owned(),
            branch: req.branch.to_owned(),
            url,
        },
        Failure::Interrupted => CheckoutError::Other {
            url,
            message: "the clone was interrupted".into(),
        },
        Failure::CaFile(message) => CheckoutError::Other {
            url,
            message: format!("ca_file: {message}"),
        },
        Failure::Panicked(message) => {
            tracing::debug!(url, panic = ?error::scrub(&message, &secrets), "clone panicked");
            CheckoutError::Other {
                url,
                message: "the clone failed inside gix (a panic on the server's data)".into(),
            }
        }
        Failure::Dest(message) => CheckoutError::Destination {
            path: dest.to_owned(),
            reason: error::scrub(&message, &secrets),
        },
    }
}

/// The token as it could appear in any message: raw, and inside a Basic credential.
fn secrets(token: Option<&SecretString>) -> Vec<String> {
    let Some(token) = token.map(ExposeSecret::expose_secret) else {
        return Vec::new();
    };
    if token.is_empty() {
        return Vec::new();
    }
    let basic = base64::engine::general_purpose::STANDARD
        .encode(format!("{}:{token}", clone::TOKEN_USERNAME));
    vec![token.to_owned(), basic]
}

fn validate_branch(branch: &str) -> Result<(), CheckoutError> {
    let bad = branch.is_empty()
        || branch.starts_with('-')
        || branch.chars().any(|c| c.is_control() || c.is_whitespace())
        || gix::validate::reference::name_partial(branch.into()).is_err();
    if bad {
        return Err(CheckoutError::InvalidRequest {
            reason: format!("`{}` is not a valid branch name", branch.escape_debug()),
        });
    }
    Ok(())
}

/// Full hex ids only: a clone by id cannot resolve abbreviations on the server.
fn validate_commit(commit: &str) -> Result<String, CheckoutError> {
    if commit.len() == 40 && commit.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Ok(commit.to_ascii_lowercase());
    }
    Err(CheckoutError::InvalidRequest {
        reason: format!(
            "`{}` is not a full 40-character hex commit id",
            commit.escape_debug()
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_come_from_the_environment_table() {
        let env: Vec<(String, String)> = [
            ("GRYT_CHECKOUT_TIMEOUT", "30"),
            ("GRYT_CHECKOUT_MAX_BYTES", "1048576"),
            ("GRYT_ALLOW_FILE_URLS", "true"),
            ("GRYT_ALLOW_INSECURE_HTTP", "true"),
            ("GRYT_CA_FILE", "/etc/ssl/extra.pem"),
            ("GRYT_CHECKOUT_ALLOW_PRIVATE", "true"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let s = CheckoutSettings::from_settings(&Settings::load_from(None, &env, &[]).unwrap());
        assert_eq!(s.timeout, Duration::from_secs(30));
        assert_eq!(s.max_bytes, 1 << 20);
        assert!(s.allow_file_urls && s.allow_insecure_http && s.allow_private_hosts);
        assert_eq!(s.ca_file.as_deref(), Some(Path::new("/etc/ssl/extra.pem")));

        let d = CheckoutSettings::from_settings(&Settings::default());
        assert_eq!(d.timeout, Duration::from_secs(600));
        assert_eq!(d.max_bytes, 2 << 30);
        assert!(!d.allow_file_urls && !d.allow_insecure_http && d.ca_file.is_none());
        assert!(!d.allow_private_hosts);
    }

    #[test]
    fn branch_and_commit_are_checked() {
        assert!(validate_branch("feature/x").is_ok());
        for bad in ["", "-upload-pack=evil", "a b", "a..b", "x\n"] {
            assert!(validate_branch(bad).is_err(), "{bad:?}");
        }
        let id = "0123456789ABCDEF0123456789abcdef01234567";
        assert_eq!(validate_commit(id).unwrap(), id.to_ascii_lowercase());
        assert!(validate_commit("abc123").is_err());
    }
}
