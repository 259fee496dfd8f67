//! Posting a push job's result to its `callback_url`, only to allowed hosts, with retries.

use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use secrecy::{ExposeSecret, SecretString};

use crate::wire::JobResult;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum CallbackError {
    #[error("callback_url is not a valid http(s) URL")]
    InvalidUrl,
    #[error("callback host `{0}` is not in push.callback_allow")]
    NotAllowed(String),
}

/// Checks `url` against the allow list (`host` or `host:port` entries, IPv6 as `[addr]:port`
/// or a bare address; a host without a port allows any port). Returns the URL to post to.
pub fn check(url: &str, allow: &[String]) -> Result<reqwest::Url, CallbackError> {
    let parsed = reqwest::Url::parse(url).map_err(|_| CallbackError::InvalidUrl)?;
    if !matches!(parsed.scheme(), "http" | "https")
        || !parsed.username().is_empty()
        || parsed.password().is_some()
    {
        return Err(CallbackError::InvalidUrl);
    }
    let host = parsed
        .host_str()
        .ok_or(CallbackError::InvalidUrl)?
        .to_ascii_lowercase();
    let port = parsed.port_or_known_default().unwrap_or(0);
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    if allow.iter().any(|entry| allows(entry, bare, port)) {
        Ok(parsed)
    } else {
        Err(CallbackError::NotAllowed(format!("{host}:{port}")))
    }
}

/// Whether one allow-list entry covers `host` (IPv6 without brackets) and `port`. An entry whose
/// port is not a number covers nothing.
fn allows(entry: &str, host: &str, port: u16) -> bool {
    let entry = entry.trim().to_ascii_lowercase();
    let (entry_host, entry_port) = if let Some(rest) = entry.strip_prefix('[') {
        match rest.split_once(']') {
            Some((h, "")) => (h, None),
            Some((h, p)) => match p.strip_prefix(':') {
                Some(p) => (h, Some(p)),
                None => return false,
            },
            None => return false,
        }
    } else if entry.matches(':').count() == 1 {
        let (h, p) = entry.split_once(':').unwrap_or((&entry, ""));
        (h, Some(p))
    } else {
        (entry.as_str(), None)
    };
    let port_ok = match entry_port {
        None => true,
        Some(p) => p.parse::<u16>().is_ok_and(|p| p == port),
    };
    !entry_host.is_empty() && entry_host == host && port_ok
}

/// Posts `result` to `url` with `X-API-Key`, retrying network errors and 5xx/408/429 with
/// exponential backoff for about a minute. Logs the outcome; never fails the job.
///
/// `client` must follow no redirects (see [`client`]): the allow list vouches for `url` only,
/// and a redirect would carry the key and the result to a host nobody allowed. A 3xx answer is
/// a failure, not retried.
pub async fn deliver(
    client: &reqwest::Client,
    url: reqwest::Url,
    api_key: &SecretString,
    result: &JobResult,
) {
    let attempt = || async {
        let response = client
            .post(url.clone())
            .header("X-API-Key", api_key.expose_secret())
            .json(result)
            .send()
            .await
            .map_err(Failure::Http)?;
        if response.status().is_redirection() {
            return Err(Failure::Redirect(response.status().as_u16()));
        }
        response
            .error_for_status()
            .map(|_| ())
            .map_err(Failure::Http)
    };
    let retryable = |e: &Failure| match e {
        Failure::Redirect(_) => false,
        Failure::Http(e) => match e.status() {
            Some(s) => s.is_server_error() || s.as_u16() == 408 || s.as_u16() == 429,
            None => true,
        },
    };
    let backoff = ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(500))
        .with_max_delay(Duration::from_secs(15))
        .with_max_times(8)
        .with_jitter();
    let host = url.host_str().unwrap_or("").to_owned();
    match attempt.retry(backoff).when(retryable).await {
        Ok(()) => {
            tracing::info!(job_id = result.job_id, callback_host = %host, "result delivered to callback")
        }
        // Without the URL: `check` refuses credentials in it, but a query string could still
        // carry a token of the API's; the host is logged instead.
        Err(Failure::Http(e)) => {
            let e = e.without_url();
            tracing::warn!(job_id = result.job_id, callback_host = %host, error = %e, "callback failed")
        }
        Err(Failure::Redirect(status)) => {
            tracing::warn!(job_id = result.job_id, callback_host = %host, status, "callback answered with a redirect: not followed, result not delivered")
        }
    }
}

enum Failure {
    Http(reqwest::Error),
    Redirect(u16),
}

/// The HTTP client for callbacks: no redirects followed, a 30 s limit per attempt. `None` when
/// it cannot be built (no fallback to a client that would follow redirects).
pub fn client() -> Option<reqwest::Client> {
    reqwest::Client::builder()
        .user_agent(concat!("gryt-agent/", env!("CARGO_PKG_VERSION")))
        .timeout(Duration::from_secs(30))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .inspect_err(|e| tracing::error!(error = %e, "cannot build the callback HTTP client"))
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_allowed_hosts() {
        let allow = vec!["api.internal".to_string(), "127.0.0.1:9000".to_string()];
        assert!(check("https://api.internal/cb", &allow).is_ok());
        assert!(check("http://api.internal:8080/cb", &allow).is_ok());
        assert!(check("http://127.0.0.1:9000/cb", &allow).is_ok());
        assert_eq!(
            check("http://127.0.0.1:9001/cb", &allow),
            Err(CallbackError::NotAllowed("127.0.0.1:9001".into()))
        );
        assert_eq!(
            check("http://evil.example/cb", &allow),
            Err(CallbackError::NotAllowed("evil.example:80".into()))
        );
        assert_eq!(
            check("ftp://api.internal/cb", &allow),
            Err(CallbackError::InvalidUrl)
        );
        assert_eq!(
            check("http://u:p@api.internal/cb", &allow),
            Err(CallbackError::InvalidUrl)
        );
        assert_eq!(check("not a url", &allow), Err(CallbackError::InvalidUrl));
    }

    #[test]
    fn entries_with_and_without_a_port() {
        let allow = vec![
            " API.Internal:8443 ".to_string(),
            "cb.internal".to_string(),
            "[::1]:9000".to_string(),
            "fd00::5".to_string(),
            "bad.port:http".to_string(),
        ];
        assert!(check("https://api.internal:8443/cb", &allow).is_ok());
        assert!(check("https://api.internal/cb", &allow).is_err());
        assert!(check("http://cb.internal:1234/cb", &allow).is_ok());
        assert!(check("http://[::1]:9000/cb", &allow).is_ok());
        assert!(check("http://[::1]:9001/cb", &allow).is_err());
        assert!(check("http://[fd00::5]:7/cb", &allow).is_ok());
        assert!(check("http://bad.port/cb", &allow).is_err());
        assert!(check("http://bad.port:80/cb", &allow).is_err());
    }
}
