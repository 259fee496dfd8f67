//! Where the API is and how to reach it safely: base URL checks (HTTPS unless loopback or
//! explicitly allowed) and the HTTP client (rustls, private CA, auth and user-agent headers).
//!
//! Checks happen before any connection is made. Nothing here logs or shows the API key.

use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use reqwest::header::{AUTHORIZATION, HeaderMap, HeaderValue, USER_AGENT};
use secrecy::{ExposeSecret, SecretString};

use super::ApiError;

/// The path under the base URL where the agent endpoints live.
pub const PREFIX: &str = "/api/v1/agent";

/// Checks `api_url` and returns the endpoint prefix (`<base>/api/v1/agent`, no trailing slash).
/// `http://` is refused unless the host is loopback or `allow_insecure_http` is on.
pub fn base_url(api_url: &str, allow_insecure_http: bool) -> Result<String, ApiError> {
    let parsed = reqwest::Url::parse(api_url.trim());
    // Errors quote the URL without any credentials in it: they are refused below, but the
    // message saying so must not carry them into a log.
    let api_url = shown(api_url, parsed.as_ref().ok());
    let url = parsed.map_err(|e| ApiError::Url(format!("`{api_url}` is not a URL: {e}")))?;
    let host = url
        .host_str()
        .ok_or_else(|| ApiError::Url(format!("`{api_url}` has no host")))?;
    match url.scheme() {
        "https" => {}
        "http" if allow_insecure_http || is_loopback(host) => {}
        "http" => {
            return Err(ApiError::Url(format!(
                "`{api_url}` is plain http:// to a host that is not loopback: use https://, or set \
                 allow_insecure_http (GRYT_ALLOW_INSECURE_HTTP=true) if you really mean it"
            )));
        }
        other => {
            return Err(ApiError::Url(format!(
                "`{api_url}`: unsupported scheme `{other}` (use https://)"
            )));
        }
    }
    if url.query().is_some() || url.fragment().is_some() || !url.username().is_empty() {
        return Err(ApiError::Url(format!(
            "`{api_url}` must be a plain base URL (no credentials, query or fragment)"
        )));
    }
    let base = url.as_str().trim_end_matches('/');
    Ok(format!("{base}{PREFIX}"))
}

/// `api_url` as it may appear in a message: user and password replaced by `***`.
fn shown(api_url: &str, parsed: Option<&reqwest::Url>) -> String {
    match parsed {
        Some(url) if !url.username().is_empty() || url.password().is_some() => {
            let mut url = url.clone();
            let _ = url.set_username("***");
            let _ = url.set_password(None);
            url.to_string()
        }
        Some(_) => api_url.to_owned(),
        // Not a URL: anything before an `@` after the scheme could be a credential.
        None => match (api_url.find("://"), api_url.rfind('@')) {
            (Some(scheme_end), Some(at)) if at > scheme_end => {
                format!("{}***{}", &api_url[..scheme_end + 3], &api_url[at..])
            }
            _ => api_url.to_owned(),
        },
    }
}

/// `localhost`, `127.0.0.0/8` and `::1`.
fn is_loopback(host: &str) -> bool {
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
        .map(|ip| ip.is_loopback())
        .unwrap_or(false)
}

/// The HTTP client: rustls with the platform's roots (on Linux these honour `SSL_CERT_FILE` and
/// `SSL_CERT_DIR`) plus the PEM certificates in `ca_file`; every request carries the bearer key and
/// `User-Agent: gryt-agent/<version>`.
pub fn http_client(
    key: &SecretString,
    ca_file: Option<&Path>,
) -> Result<reqwest::Client, ApiError> {
    let mut headers = HeaderMap::new();
    let mut auth = HeaderValue::from_str(&format!("Bearer {}", key.expose_secret()))
        .map_err(|_| ApiError::Key)?;
    // Keeps the key out of any debug output of the headers.
    auth.set_sensitive(true);
    headers.insert(AUTHORIZATION, auth);
    headers.insert(
        USER_AGENT,
        HeaderValue::from_static(concat!("gryt-agent/", env!("CARGO_PKG_VERSION"))),
    );
    let mut builder = reqwest::Client::builder()
        .default_headers(headers)
        .connect_timeout(Duration::from_secs(10))
        // The agent talks to one API; a redirect elsewhere would carry the key away.
        .redirect(reqwest::redirect::Policy::none());
    if let Some(path) = ca_file {
        let pem = std::fs::read(path).map_err(|e| ApiError::Ca {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| ApiError::Ca {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        if certs.is_empty() {
            return Err(ApiError::Ca {
                path: path.display().to_string(),
                message: "no PEM certificate in the file".into(),
            });
        }
        builder = builder.tls_certs_merge(certs);
    }
    builder.build().map_err(|e| ApiError::Client(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_in_a_refused_url_stay_out_of_the_error() {
        for url in [
            "https://agent:s3cret-token@api.example.com",
            "http://agent:s3cret-token@api.example.com",
            "ftp://agent:s3cret-token@api.example.com",
            "https://agent:s3cret-token@[not a host",
        ] {
            let error = base_url(url, false).unwrap_err().to_string();
            assert!(!error.contains("s3cret-token"), "{error}");
        }
    }

    #[test]
    fn https_anywhere_http_only_to_loopback_unless_allowed() {
        assert_eq!(
            base_url("https://api.example.com/", false).unwrap(),
            "https://api.example.com/api/v1/agent"
        );
        assert_eq!(
            base_url("http://127.0.0.1:8000", false).unwrap(),
            "http://127.0.0.1:8000/api/v1/agent"
        );
        assert!(base_url("http://localhost:1", false).is_ok());
        assert!(base_url("http://[::1]:1", false).is_ok());
        let err = base_url("http://192.0.2.1:8000", false).unwrap_err();
        assert!(err.to_string().contains("allow_insecure_http"), "{err}");
        assert!(base_url("http://192.0.2.1:8000", true).is_ok());
        assert!(base_url("ftp://api.example.com", true).is_err());
        assert!(base_url("https://user:pw@api.example.com", false).is_err());
        assert_eq!(
            base_url("https://gw.example.com/gryt", false).unwrap(),
            "https://gw.example.com/gryt/api/v1/agent"
        );
    }

    #[test]
    fn a_ca_file_without_certificates_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, "not a certificate").unwrap();
        let key = SecretString::from("k");
        assert!(matches!(
            http_client(&key, Some(&path)),
            Err(ApiError::Ca { .. })
        ));
        assert!(http_client(&key, None).is_ok());
    }
}
