//! Where a clone may connect: only the `git_url` host and port, and only on public addresses
//! unless `checkout.allow_private_hosts`.
//!
//! Two hooks of the HTTP client enforce it on every new connection, whatever asked for it (the
//! first request, a redirect, a retry):
//! - A "proxy" rule that reqwest consults with each connection's destination: the `git_url`
//!   authority goes direct; any other host or port is sent to a proxy name that never
//!   resolves, so nothing leaves the machine, and the refusal is recorded. gix installs its own
//!   redirect policy over any the agent could set (it follows redirects that keep the request's
//!   path), which is why the check sits at connection time rather than in a redirect policy.
//!   This also means proxies from the environment (`HTTPS_PROXY`) are not used: a proxy would
//!   resolve the name itself, out of reach of the address check.
//! - A DNS resolver that resolves only the `git_url` host name and refuses the answer when any
//!   address is private. DNS rebinding between check and connect cannot slip through: the
//!   resolver hands reqwest exactly the addresses it checked, and the connector dials those, not
//!   a second lookup. Each new connection resolves and checks again.
//!
//! IP literals never reach a resolver; `url.rs` refuses private ones before the clone starts, and
//! the proxy rule keeps connections on the `git_url` authority.

use std::error::Error as StdError;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::sync::{Arc, Mutex};

use reqwest::Url;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};

/// Never resolves (RFC 2606 `.invalid`), and the resolver below refuses it anyway.
const NOWHERE: &str = "http://connection-refused.invalid:9";

/// Why the guard stopped a connection or withheld the token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// A connection to another host or port than the `git_url`'s (a redirect, in practice).
    OtherHost,
    /// The `git_url` host name resolved to a private address.
    PrivateAddress,
    /// Credentials were asked for another host than the `git_url`'s.
    TokenElsewhere,
}

/// The connection policy of one clone, and the first refusal it made.
#[derive(Debug)]
pub(crate) struct Guard {
    scheme: String,
    host: String,
    port: u16,
    allow_private: bool,
    refusal: Mutex<Option<Refusal>>,
}

impl Guard {
    /// The guard for an `http(s)` `git_url`; `None` for URLs without a network host (`file://`).
    pub(crate) fn new(git_url: &str, allow_private: bool) -> Option<Arc<Self>> {
        let url = Url::parse(git_url).ok()?;
        if !matches!(url.scheme(), "http" | "https") {
            return None;
        }
        Some(Arc::new(Guard {
            scheme: url.scheme().to_owned(),
            host: url.host_str()?.to_owned(),
            port: url.port_or_known_default()?,
            allow_private,
            refusal: Mutex::new(None),
        }))
    }

    pub(crate) fn refusal(&self) -> Option<Refusal> {
        *self.refusal.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn refuse(&self, why: Refusal) {
        self.refusal
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert(why);
    }

    /// Whether `url` (as reqwest parsed it) points at the `git_url` authority.
    fn is_target(&self, url: &Url) -> bool {
        url.scheme() == self.scheme
            && url.host_str() == Some(self.host.as_str())
            && url.port_or_known_default() == Some(self.port)
    }

    /// Whether gix may offer the token for `url` (the URL it asks credentials for).
    pub(crate) fn may_send_token(&self, url: &[u8]) -> bool {
        let allowed = std::str::from_utf8(url)
            .ok()
            .and_then(|u| Url::parse(u).ok())
            .is_some_and(|u| self.is_target(&u));
        if !allowed {
            self.refuse(Refusal::TokenElsewhere);
        }
        allowed
    }

    /// Installs the policy into the clone's HTTP client.
    pub(crate) fn configure(
        self: &Arc<Self>,
        builder: reqwest::blocking::ClientBuilder,
    ) -> reqwest::blocking::ClientBuilder {
        let guard = self.clone();
        let route = reqwest::Proxy::custom(move |url| {
            if guard.is_target(url) {
                None
            } else {
                guard.refuse(Refusal::OtherHost);
                Some(NOWHERE)
            }
        });
        builder
            .proxy(route)
            .dns_resolver(Arc::new(Resolver(self.clone())))
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Refused(&'static str);

struct Resolver(Arc<Guard>);

impl Resolve for Resolver {
    fn resolve(&self, name: Name) -> Resolving {
        let guard = self.0.clone();
        let name = name.as_str().to_owned();
        Box::pin(async move {
            if !name.eq_ignore_ascii_case(&guard.host) {
                guard.refuse(Refusal::OtherHost);
                return Err(boxed(Refused("not the git_url host")));
            }
            // reqwest's blocking client runs a Tokio runtime of its own; the lookup blocks.
            let lookup = tokio::task::spawn_blocking(move || {
                (name.as_str(), 0).to_socket_addrs().map(Vec::from_iter)
            });
            let addrs: Vec<SocketAddr> = lookup.await.map_err(boxed)?.map_err(boxed)?;
            if !guard.allow_private && addrs.iter().any(|a| is_private(a.ip())) {
                guard.refuse(Refusal::PrivateAddress);
                return Err(boxed(Refused("the host resolves to a private address")));
            }
            Ok(Box::new(addrs.into_iter()) as Addrs)
        })
    }
}

fn boxed(e: impl StdError + Send + Sync + 'static) -> Box<dyn StdError + Send + Sync> {
    Box::new(e)
}

/// Loopback, RFC 1918, link-local (169.254.0.0/16, fe80::/10), unique-local (fc00::/7),
/// site-local (fec0::/10), unspecified and `0.0.0.0/8`, broadcast; IPv6 forms that embed an
/// IPv4 address (mapped, compatible, NAT64) are judged by that address.
pub(crate) fn is_private(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_private_v4(v4),
        IpAddr::V6(v6) => {
            let s = v6.segments();
            let embedded = |s: &[u16]| {
                Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8)
            };
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_private_v4(v4);
            }
            if s[..6] == [0; 6] || s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
                return is_private_v4(embedded(&s));
            }
            v6.is_loopback()
                || v6.is_unspecified()
                || (s[0] & 0xfe00) == 0xfc00
                || (s[0] & 0xffc0) == 0xfe80
                || (s[0] & 0xffc0) == 0xfec0
        }
    }
}

fn is_private_v4(v4: Ipv4Addr) -> bool {
    v4.is_loopback()
        || v4.is_private()
        || v4.is_link_local()
        || v4.is_unspecified()
        || v4.is_broadcast()
        || v4.octets()[0] == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_addresses() {
        for ip in [
            "127.0.0.1",
            "127.8.9.10",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "0.1.2.3",
            "255.255.255.255",
            "::1",
            "::",
            "fc00::1",
            "fd12:3456::1",
            "fe80::1",
            "fec0::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "::127.0.0.1",
            "64:ff9b::10.0.0.1",
        ] {
            assert!(is_private(ip.parse().unwrap()), "{ip}");
        }
        for ip in [
            "1.1.1.1",
            "140.82.112.3",
            "172.32.0.1",
            "192.169.0.1",
            "2606:4700::1111",
            "::ffff:1.1.1.1",
            "64:ff9b::1.1.1.1",
        ] {
            assert!(!is_private(ip.parse().unwrap()), "{ip}");
        }
    }

    #[test]
    fn only_the_git_url_authority_gets_the_token() {
        let guard = Guard::new("https://git.example.com/a/b.git", false).unwrap();
        assert!(guard.may_send_token(b"https://git.example.com/a/b.git"));
        assert!(guard.may_send_token(b"https://GIT.example.com:443/other"));
        assert_eq!(guard.refusal(), None);
        for other in [
            &b"https://evil.example.com/a/b.git"[..],
            b"https://git.example.com:8443/a/b.git",
            b"http://git.example.com/a/b.git",
            b"not a url",
        ] {
            assert!(!guard.may_send_token(other), "{other:?}");
        }
        assert_eq!(guard.refusal(), Some(Refusal::TokenElsewhere));
        assert!(Guard::new("file:///srv/repo.git", false).is_none());
    }

    fn client(guard: &Arc<Guard>) -> reqwest::blocking::Client {
        guard
            .configure(reqwest::blocking::Client::builder())
            .timeout(std::time::Duration::from_secs(60))
            .build()
            .unwrap()
    }

    /// A real HTTP client and a listener on loopback: `localhost` is a name, so only the
    /// resolved address tells it is private; nothing connects unless allowed, and another
    /// authority is never dialled.
    #[test]
    fn connections_are_checked_on_the_resolved_address_and_the_authority() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        let url = format!("http://localhost:{port}/repo.git");

        let guard = Guard::new(&url, false).unwrap();
        let err = client(&guard).get(&url).send().unwrap_err();
        assert!(err.is_connect(), "{err:?}");
        assert_eq!(guard.refusal(), Some(Refusal::PrivateAddress));
        assert!(listener.accept().is_err(), "something connected");

        let guard = Guard::new(&url, true).unwrap();
        let other = format!("http://127.0.0.1:{port}/repo.git");
        let err = client(&guard).get(&other).send().unwrap_err();
        assert!(err.is_connect(), "{err:?}");
        assert_eq!(guard.refusal(), Some(Refusal::OtherHost));
        assert!(listener.accept().is_err(), "something connected");

        listener.set_nonblocking(false).unwrap();
        let server = std::thread::spawn(move || {
            use std::io::{Read, Write};
            let (mut stream, _) = listener.accept().unwrap();
            let mut buf = [0u8; 1024];
            let _ = stream.read(&mut buf).unwrap();
            stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                .unwrap();
        });
        let guard = Guard::new(&url, true).unwrap();
        let response = client(&guard).get(&url).send().unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(guard.refusal(), None);
        server.join().unwrap();
    }
}
