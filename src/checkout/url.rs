//! Which repository URLs a job may name: checked before any container starts or byte is fetched.
//!
//! Job specs come from the API, so the URL is untrusted input. Only `https` is always allowed;
//! plain `http` only to a loopback host (or with `allow_insecure_http`), `file://` only with
//! `allow_file_urls`. A host that is a loopback, private or link-local address (or `localhost`)
//! needs `allow_private_hosts`; names are checked again on their resolved addresses when the
//! clone connects (`net.rs`). Everything else git understands (ssh, scp-style `host:path`, `git://`,
//! transport helpers like `ext::`, bare local paths) is refused, since several of those run
//! programs or reach places the operator never meant to expose.

use std::net::IpAddr;

use super::{CheckoutError, CheckoutSettings};

/// The kinds of URL that pass [`validate_url`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Allowed {
    Https,
    Http,
    File,
}

/// Checks `url` against the allowed schemes and settings; see the module doc.
pub fn validate_url(url: &str, settings: &CheckoutSettings) -> Result<(), CheckoutError> {
    classify(url, settings).map(|_| ())
}

pub(crate) fn classify(url: &str, settings: &CheckoutSettings) -> Result<Allowed, CheckoutError> {
    let invalid = |reason: &str| CheckoutError::InvalidUrl {
        reason: reason.to_owned(),
    };
    if url.trim().is_empty() {
        return Err(invalid("the git URL is empty"));
    }
    if url.chars().any(char::is_control) {
        // Not echoed back: control characters could forge log lines.
        return Err(invalid("the git URL contains control characters"));
    }
    if url != url.trim() {
        return Err(invalid("the git URL has leading or trailing whitespace"));
    }
    if let Some(helper) = transport_helper(url) {
        return Err(CheckoutError::DisallowedScheme {
            scheme: format!("{helper}::"),
            hint: "git transport helpers run programs and are never allowed; use an https:// URL",
        });
    }
    let Some((scheme, rest)) = url.split_once("://") else {
        return Err(if looks_scp_like(url) {
            CheckoutError::DisallowedScheme {
                scheme: "scp-style ssh (host:path)".into(),
                hint: "ssh is not supported; use an https:// URL",
            }
        } else {
            CheckoutError::DisallowedScheme {
                scheme: "local path".into(),
                hint: "use a file:// URL, which requires checkout.allow_file_urls (GRYT_ALLOW_FILE_URLS)",
            }
        });
    };
    let lower = scheme.to_ascii_lowercase();
    if scheme != lower && matches!(lower.as_str(), "https" | "http" | "file") {
        // gix only knows these schemes in lower case; anything else would reach it unchecked.
        return Err(invalid("write the URL scheme in lower case"));
    }
    let scheme = lower;
    let allowed = match scheme.as_str() {
        "https" => Allowed::Https,
        "http" => Allowed::Http,
        "file" if settings.allow_file_urls => Allowed::File,
        "file" => {
            return Err(CheckoutError::DisallowedScheme {
                scheme,
                hint: "file:// URLs require checkout.allow_file_urls (GRYT_ALLOW_FILE_URLS)",
            });
        }
        _ => {
            return Err(CheckoutError::DisallowedScheme {
                scheme,
                hint: "only https:// is supported (plain http:// to loopback hosts, or anywhere \
                       with allow_insecure_http / GRYT_ALLOW_INSECURE_HTTP)",
            });
        }
    };
    if allowed != Allowed::File {
        let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
        if authority.contains('@') {
            return Err(invalid(
                "the git URL carries credentials (user:password@); they are refused there, the \
                 job's token is sent separately",
            ));
        }
        let host = host_of(authority);
        if host.is_empty() {
            return Err(invalid("the git URL has no host"));
        }
        if allowed == Allowed::Http && !settings.allow_insecure_http && !is_loopback(host) {
            return Err(CheckoutError::DisallowedScheme {
                scheme,
                hint: "plain http:// is only allowed to loopback hosts; use https:// or set \
                       allow_insecure_http (GRYT_ALLOW_INSECURE_HTTP)",
            });
        }
        if !settings.allow_private_hosts {
            refuse_private(url)?;
        }
    }
    // gix does the fetching, so it must read the URL the same way this check did.
    let parsed = gix::url::parse(<&gix::bstr::BStr>::from(url.as_bytes()))
        .map_err(|_| invalid("the git URL cannot be parsed"))?;
    let expected = match allowed {
        Allowed::Https => gix::url::Scheme::Https,
        Allowed::Http => gix::url::Scheme::Http,
        Allowed::File => gix::url::Scheme::File,
    };
    if parsed.scheme != expected {
        return Err(invalid("the git URL is ambiguous"));
    }
    if parsed.user().is_some() || parsed.password().is_some() {
        return Err(invalid(
            "the git URL carries credentials (user:password@); they are refused there, the job's \
             token is sent separately",
        ));
    }
    Ok(allowed)
}

/// Refuses a host that is a private address or `localhost`, read the way the HTTP client reads
/// it (`http://2130706433/` and `http://0x7f.1/` are 127.0.0.1 to it).
fn refuse_private(url: &str) -> Result<(), CheckoutError> {
    let host = host_of_url(url).ok_or_else(|| CheckoutError::InvalidUrl {
        reason: "the git URL cannot be parsed".into(),
    })?;
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let name = host.trim_end_matches('.').to_ascii_lowercase();
    let private = match bare.parse::<IpAddr>() {
        Ok(ip) => super::net::is_private(ip),
        Err(_) => name == "localhost" || name.ends_with(".localhost"),
    };
    if private {
        return Err(CheckoutError::PrivateHost { host, how: "is" });
    }
    Ok(())
}

/// The host of an `http(s)` URL as the HTTP client will read it.
pub(crate) fn host_of_url(url: &str) -> Option<String> {
    reqwest::Url::parse(url)
        .ok()
        .and_then(|u| u.host_str().map(str::to_owned))
}

/// `ext::cmd`, `fd::`, `foo::https://...`: git's `<transport>::<address>` syntax.
fn transport_helper(url: &str) -> Option<&str> {
    let (name, _) = url.split_once("::")?;
    let plain = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'));
    plain.then_some(name)
}

/// Git treats `[user@]host:path` as ssh when the colon comes before any slash.
fn looks_scp_like(url: &str) -> bool {
    match (url.find(':'), url.find('/')) {
        (Some(colon), Some(slash)) => colon < slash,
        (Some(_), None) => true,
        _ => false,
    }
}

/// The host part of `host[:port]` or `[v6]:port`.
fn host_of(authority: &str) -> &str {
    if let Some(rest) = authority.strip_prefix('[') {
        return rest.split(']').next().unwrap_or_default();
    }
    authority.split(':').next().unwrap_or_default()
}

fn is_loopback(host: &str) -> bool {
    let host = host.trim_end_matches('.');
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn settings() -> CheckoutSettings {
        CheckoutSettings {
            timeout: Duration::from_secs(1),
            max_bytes: 1,
            allow_insecure_http: false,
            allow_file_urls: false,
            ca_file: None,
            allow_private_hosts: true,
        }
    }

    #[test]
    fn https_and_loopback_http_pass() {
        let s = settings();
        for url in [
            "https://github.com/epyklab/gryt.git",
            "https://example.com:8443/a/b",
            "http://127.0.0.1:8080/repo.git",
            "http://127.9.9.9/repo",
            "http://[::1]:9000/repo",
            "http://localhost/repo",
        ] {
            assert_eq!(
                validate_url(url, &s).map_err(|e| e.to_string()),
                Ok(()),
                "{url}"
            );
        }
    }

    #[test]
    fn refusals_name_the_scheme_and_the_setting() {
        let s = settings();
        let cases = [
            ("ssh://git@github.com/a/b.git", "`ssh`"),
            ("git@github.com:a/b.git", "scp-style"),
            ("github.com:a/b.git", "scp-style"),
            ("ext::sh -c touch% /tmp/pwned", "`ext::`"),
            ("git://github.com/a/b.git", "`git`"),
            ("/srv/repo.git", "local path"),
            ("./repo", "local path"),
            ("file:///srv/repo.git", "GRYT_ALLOW_FILE_URLS"),
            ("http://example.com/a.git", "GRYT_ALLOW_INSECURE_HTTP"),
            ("http://10.0.0.1/a.git", "GRYT_ALLOW_INSECURE_HTTP"),
        ];
        for (url, needle) in cases {
            let err = validate_url(url, &s).unwrap_err().to_string();
            assert!(err.contains(needle), "{url}: {err}");
        }
    }

    #[test]
    fn settings_open_file_and_insecure_http() {
        let mut s = settings();
        s.allow_file_urls = true;
        s.allow_insecure_http = true;
        validate_url("file:///srv/repo.git", &s).unwrap();
        validate_url("http://example.com/a.git", &s).unwrap();
        assert!(validate_url("ssh://example.com/a.git", &s).is_err());
    }

    #[test]
    fn private_hosts_need_the_setting() {
        let mut s = settings();
        s.allow_private_hosts = false;
        s.allow_insecure_http = true;
        for url in [
            "http://127.0.0.1:8080/repo.git",
            "https://localhost/repo.git",
            "https://LocalHost./repo.git",
            "https://x.localhost/repo.git",
            "https://10.0.0.8/repo.git",
            "https://169.254.169.254/latest/meta-data",
            "https://[::1]/repo.git",
            "https://[fd00::1]/repo.git",
            "https://[::ffff:127.0.0.1]/repo.git",
            "http://2130706433/repo.git",
            "http://0x7f.1/repo.git",
            "https://0.0.0.0/repo.git",
        ] {
            let err = validate_url(url, &s).unwrap_err().to_string();
            assert!(err.contains("GRYT_CHECKOUT_ALLOW_PRIVATE"), "{url}: {err}");
        }
        validate_url("https://github.com/a/b.git", &s).unwrap();
        validate_url("https://8.8.8.8/a/b.git", &s).unwrap();
    }

    #[test]
    fn credentials_and_control_characters_are_refused() {
        let s = settings();
        let err = validate_url("https://user:s3cret@github.com/a/b.git", &s).unwrap_err();
        assert!(err.to_string().contains("credentials"), "{err}");
        assert!(!err.to_string().contains("s3cret"));
        assert!(!format!("{err:?}").contains("s3cret"));
        let err = validate_url("https://tok@github.com/a/b.git", &s).unwrap_err();
        assert!(err.to_string().contains("credentials"), "{err}");
        let err = validate_url("https://github.com/a\n/b.git", &s).unwrap_err();
        assert!(err.to_string().contains("control"), "{err}");
        assert!(validate_url("", &s).is_err());
        assert!(validate_url("HTTPS://github.com/a/b.git", &s).is_err());
        assert!(validate_url("https:///nohost", &s).is_err());
    }
}
