//! Retry policy for API calls: which failures are worth retrying, and how long to wait.
//!
//! Exponential backoff with full jitter (a uniformly random wait between zero and the current
//! step) through `backon`; a `Retry-After` from the server replaces the jittered wait. This
//! module decides timing only: it sends nothing.

use std::time::Duration;

use backon::ExponentialBuilder;
use reqwest::StatusCode;
use reqwest::header::{HeaderMap, RETRY_AFTER};

/// The first backoff step.
pub const MIN_BACKOFF: Duration = Duration::from_millis(500);
/// The largest backoff step; also how often a refused key is retried.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A server's `Retry-After` is honoured up to this long.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);

/// Why one attempt failed in a way worth another try.
#[derive(Debug, Clone)]
pub struct Transient {
    /// What happened, for logs and `/health` (never contains the API key).
    pub message: String,
    /// The server's `Retry-After`, when it sent one.
    pub retry_after: Option<Duration>,
}

/// Network errors, 408, 429 and 5xx are retried; other answers are final.
pub fn is_retryable(status: StatusCode) -> bool {
    status == StatusCode::REQUEST_TIMEOUT
        || status == StatusCode::TOO_MANY_REQUESTS
        || status.is_server_error()
}

/// The backoff steps before jitter: 0.5 s doubling up to 30 s, with no limit on attempts (callers
/// bound a call by racing it against their own deadline or stop signal).
pub fn backoff() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(MIN_BACKOFF)
        .with_max_delay(MAX_BACKOFF)
        .with_factor(2.0)
        .without_max_times()
}

/// The wait before the next attempt: the server's `Retry-After` if given (capped), else a full
/// jitter draw in `[0, step]`.
pub fn next_wait(step: Duration, retry_after: Option<Duration>) -> Duration {
    match retry_after {
        Some(after) => after.min(MAX_RETRY_AFTER),
        None => full_jitter(step),
    }
}

/// Uniform in `[0, step]`: spreads a fleet of agents that all saw the same outage.
pub fn full_jitter(step: Duration) -> Duration {
    step.mul_f64(fastrand::f64())
}

/// `Retry-After` in delta-seconds form. The HTTP-date form is ignored (backoff applies): agents
/// and servers' clocks need not agree.
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    headers
        .get(RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse::<u64>()
        .ok()
        .map(Duration::from_secs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use backon::BackoffBuilder;

    #[test]
    fn steps_double_up_to_the_cap_and_jitter_stays_below_the_step() {
        let steps: Vec<Duration> = backoff().build().take(9).collect();
        assert_eq!(steps[0], MIN_BACKOFF);
        assert_eq!(steps[1], MIN_BACKOFF * 2);
        assert_eq!(*steps.last().unwrap(), MAX_BACKOFF);
        for _ in 0..100 {
            assert!(full_jitter(Duration::from_secs(2)) <= Duration::from_secs(2));
        }
    }

    #[test]
    fn retry_after_wins_and_is_capped() {
        let mut h = HeaderMap::new();
        h.insert(RETRY_AFTER, "7".parse().unwrap());
        let after = retry_after(&h);
        assert_eq!(after, Some(Duration::from_secs(7)));
        assert_eq!(
            next_wait(Duration::from_secs(1), after),
            Duration::from_secs(7)
        );
        assert_eq!(
            next_wait(Duration::ZERO, Some(Duration::from_secs(9999))),
            MAX_RETRY_AFTER
        );
        h.insert(
            RETRY_AFTER,
            "Wed, 21 Oct 2015 07:28:00 GMT".parse().unwrap(),
        );
        assert_eq!(retry_after(&h), None);
    }

    #[test]
    fn which_statuses_are_retried() {
        for s in [408, 429, 500, 502, 503, 504] {
            assert!(is_retryable(StatusCode::from_u16(s).unwrap()), "{s}");
        }
        for s in [400, 401, 403, 404, 409, 410, 422] {
            assert!(!is_retryable(StatusCode::from_u16(s).unwrap()), "{s}");
        }
    }
}
