//! Checkout against real servers on loopback: `git http-backend` behind a small HTTP(S) server
//! written here, serving fixture repositories built with the `git` CLI.
//!
//! HTTPS uses a throwaway CA made with rcgen, trusted through `CheckoutSettings::ca_file` (no
//! process-wide state). One test re-runs this binary as a child with `SSL_CERT_FILE` set to show
//! that the system trust route works too, without touching this process's environment.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use gryt_agent::checkout::{
    CheckedOut, CheckoutError, CheckoutRequest, CheckoutSettings, checkout, validate_url,
};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use secrecy::SecretString;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;

const TOKEN: &str = "ghs_test0token0that0must0never0leak0123";

// ---------------------------------------------------------------------------------------------
// Fixture repositories

struct Fixture {
    _dir: tempfile::TempDir,
    /// Directory holding `repo.git` (the served project root).
    root: PathBuf,
    /// Commits on `main`, oldest first.
    main: Vec<String>,
    /// Tip of `feature`.
    feature: String,
    /// The commit before it: on `feature` only, and no branch tip.
    feature_first: String,
}

fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args([
            "-c",
            "user.name=Fixture",
            "-c",
            "user.email=fixture@example.invalid",
        ])
        .args([
            "-c",
            "init.defaultBranch=main",
            "-c",
            "commit.gpgsign=false",
        ])
        .args(args)
        .current_dir(dir)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .output()
        .expect("the `git` CLI is needed to build fixtures (apt-get install git)");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// `main`: three commits; `feature`: branches off the first and adds two. `big` adds an
/// incompressible file of that many bytes to `main`.
fn fixture(big: usize) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("work");
    std::fs::create_dir(&work).unwrap();
    git(&work, &["init", "-q"]);
    let mut main = Vec::new();
    std::fs::write(work.join("README.md"), "one\n").unwrap();
    git(&work, &["add", "."]);
    git(&work, &["commit", "-qm", "one"]);
    main.push(git(&work, &["rev-parse", "HEAD"]));
    git(&work, &["checkout", "-qb", "feature"]);
    std::fs::write(work.join("feature-first.txt"), "first\n").unwrap();
    git(&work, &["add", "."]);
    git(&work, &["commit", "-qm", "feature first"]);
    let feature_first = git(&work, &["rev-parse", "HEAD"]);
    std::fs::write(work.join("feature.txt"), "feature\n").unwrap();
    git(&work, &["add", "."]);
    git(&work, &["commit", "-qm", "feature"]);
    let feature = git(&work, &["rev-parse", "HEAD"]);
    git(&work, &["checkout", "-q", "main"]);
    for n in ["two", "three"] {
        std::fs::write(work.join(format!("{n}.txt")), format!("{n}\n")).unwrap();
        if n == "three" && big > 0 {
            std::fs::write(work.join("big.bin"), noise(big)).unwrap();
        }
        git(&work, &["add", "."]);
        git(&work, &["commit", "-qm", n]);
        main.push(git(&work, &["rev-parse", "HEAD"]));
    }
    let root = dir.path().join("srv");
    std::fs::create_dir(&root).unwrap();
    git(
        dir.path(),
        &["clone", "-q", "--bare", "work", "srv/repo.git"],
    );
    Fixture {
        _dir: dir,
        root,
        main,
        feature,
        feature_first,
    }
}

/// Bytes zlib cannot shrink, so the pack is at least this big.
fn noise(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The server: git http-backend as CGI behind hyper, on 127.0.0.1 only

#[derive(Clone)]
struct Serve {
    root: PathBuf,
    /// Basic `x-access-token:<token>` required when set; 401 otherwise.
    token: Option<String>,
    /// Refuse `want`s of anything but a branch tip, as servers without
    /// `uploadpack.allowReachableSHA1InWant` do over SSH. (`git http-backend` itself serves any
    /// reachable commit.)
    refuse_non_tips: bool,
    /// Accept connections and never answer.
    stall: bool,
    /// Answer every request with a redirect to this base URL (same path and query).
    redirect_to: Option<String>,
    /// Redirect requests under `/old.git` to `/repo.git` on this same server.
    renamed: bool,
    /// Answer every request with this status, content type and body.
    canned: Option<(u16, &'static str, Vec<u8>)>,
    /// Answer every upload-pack request (after a real advertisement) with this `ERR` line.
    err_on_fetch: Option<String>,
    /// Requests received.
    hits: Arc<AtomicUsize>,
}

impl Serve {
    fn new(root: &Path) -> Self {
        Serve {
            root: root.to_owned(),
            token: None,
            refuse_non_tips: false,
            stall: false,
            redirect_to: None,
            renamed: false,
            err_on_fetch: None,
            canned: None,
            hits: Arc::new(AtomicUsize::new(0)),
        }
    }
}

struct Tls {
    acceptor: TlsAcceptor,
    ca_file: PathBuf,
    _dir: tempfile::TempDir,
}

/// A throwaway CA and a certificate for 127.0.0.1/localhost signed by it.
fn tls() -> Tls {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "gryt-agent test CA");
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().unwrap();
    let mut params =
        CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
    params
        .distinguished_name
        .push(DnType::CommonName, "127.0.0.1");
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let cert = params.signed_by(&key, &issuer).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca_cert.pem()).unwrap();
    let key_der = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![cert.der().clone()], key_der)
    .unwrap();
    Tls {
        acceptor: TlsAcceptor::from(Arc::new(config)),
        ca_file,
        _dir: dir,
    }
}

/// Starts serving; returns the base URL (`http[s]://127.0.0.1:PORT`).
async fn start(serve: Serve, tls: Option<TlsAcceptor>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    let scheme = if tls.is_some() { "https" } else { "http" };
    let serve = Arc::new(serve);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let serve = serve.clone();
            let tls = tls.clone();
            tokio::spawn(async move {
                if serve.stall {
                    let _held = stream;
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                    return;
                }
                let service = service_fn(move |req| handle(serve.clone(), req));
                match tls {
                    Some(acceptor) => {
                        if let Ok(stream) = acceptor.accept(stream).await {
                            let _ = http1::Builder::new()
                                .serve_connection(TokioIo::new(stream), service)
                                .await;
                        }
                    }
                    None => {
                        let _ = http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    }
                }
            });
        }
    });
    format!("{scheme}://{addr}")
}

async fn handle(
    serve: Arc<Serve>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    serve.hits.fetch_add(1, Ordering::SeqCst);
    if let Some(base) = &serve.redirect_to {
        let target = format!(
            "{base}{}",
            req.uri().path_and_query().map_or("/", |p| p.as_str())
        );
        return Ok(Response::builder()
            .status(StatusCode::FOUND)
            .header("Location", target)
            .body(Full::new(Bytes::new()))
            .unwrap());
    }
    if serve.renamed
        && let Some(rest) = req.uri().path().strip_prefix("/old.git")
    {
        let query = req.uri().query().map_or(String::new(), |q| format!("?{q}"));
        return Ok(Response::builder()
            .status(StatusCode::MOVED_PERMANENTLY)
            .header("Location", format!("/repo.git{rest}{query}"))
            .body(Full::new(Bytes::new()))
            .unwrap());
    }
    if let Some((status, content_type, body)) = &serve.canned {
        return Ok(Response::builder()
            .status(*status)
            .header("Content-Type", *content_type)
            .body(Full::new(Bytes::from(body.clone())))
            .unwrap());
    }
    if let Some(token) = &serve.token {
        let expected = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("x-access-token:{token}"))
        );
        let given = req
            .headers()
            .get(hyper::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        if given != Some(expected.as_str()) {
            return Ok(Response::builder()
                .status(StatusCode::UNAUTHORIZED)
                .header("WWW-Authenticate", "Basic realm=\"test\"")
                .body(Full::new(Bytes::from_static(b"unauthorized\n")))
                .unwrap());
        }
    }
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    let mut cgi = tokio::process::Command::new("git");
    cgi.arg("http-backend")
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_PROJECT_ROOT", &serve.root)
        .env("GIT_HTTP_EXPORT_ALL", "1")
        .env("REQUEST_METHOD", req.method().as_str())
        .env("PATH_INFO", req.uri().path())
        .env("QUERY_STRING", req.uri().query().unwrap_or_default())
        .env("CONTENT_TYPE", header("content-type"))
        .env("HTTP_CONTENT_ENCODING", header("content-encoding"))
        .env("REMOTE_ADDR", "127.0.0.1")
        .env("REMOTE_USER", "x-access-token")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null());
    cgi.env("GIT_PROTOCOL", header("git-protocol"));
    let body = req.into_body().collect().await.unwrap().to_bytes();
    if serve.refuse_non_tips
        && let Some(id) = non_tip_want(&serve.root.join("repo.git"), &body)
    {
        let line = format!("ERR upload-pack: not our ref {id}\n");
        return Ok(Response::builder()
            .header("Content-Type", "application/x-git-upload-pack-result")
            .body(Full::new(Bytes::from(format!(
                "{:04x}{line}",
                line.len() + 4
            ))))
            .unwrap());
    }
    if let Some(line) = &serve.err_on_fetch
        && body.windows(4).any(|w| w == b"want" || w == b"ls-r")
    {
        return Ok(Response::builder()
            .header("Content-Type", "application/x-git-upload-pack-result")
            .body(Full::new(Bytes::from(format!(
                "{:04x}{line}",
                line.len() + 4
            ))))
            .unwrap());
    }
    let mut child = cgi.spawn().expect("git http-backend");
    let mut stdin = child.stdin.take().unwrap();
    // Written while the output is read: the backend may answer before it has read everything.
    let writer = tokio::spawn(async move {
        let _ = stdin.write_all(&body).await;
    });
    let out = child.wait_with_output().await.unwrap();
    let _ = writer.await;
    Ok(cgi_response(&out.stdout))
}

/// The first `want <id>` in an upload-pack request that is no branch tip.
fn non_tip_want(repo: &Path, body: &[u8]) -> Option<String> {
    let tips = git(
        repo,
        &["for-each-ref", "--format=%(objectname)", "refs/heads"],
    );
    let text = String::from_utf8_lossy(body);
    text.match_indices("want ")
        .filter_map(|(i, _)| text.get(i + 5..i + 45))
        .find(|id| !tips.lines().any(|tip| tip == *id))
        .map(str::to_owned)
}

/// Splits CGI output into a response: `Status:` sets the code, other headers pass through.
fn cgi_response(out: &[u8]) -> Response<Full<Bytes>> {
    let (head, body) = match out.windows(4).position(|w| w == b"\r\n\r\n") {
        Some(i) => (&out[..i], &out[i + 4..]),
        None => match out.windows(2).position(|w| w == b"\n\n") {
            Some(i) => (&out[..i], &out[i + 2..]),
            None => (&out[..0], out),
        },
    };
    let mut response = Response::builder();
    for line in String::from_utf8_lossy(head).lines() {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("status") {
            let code = value.split(' ').next().unwrap_or("500");
            response = response.status(code.parse::<u16>().unwrap_or(500));
        } else {
            response = response.header(name, value);
        }
    }
    response
        .body(Full::new(Bytes::copy_from_slice(body)))
        .unwrap()
}

// ---------------------------------------------------------------------------------------------
// Helpers

fn settings() -> CheckoutSettings {
    CheckoutSettings {
        timeout: Duration::from_secs(60),
        max_bytes: 64 * 1024 * 1024,
        allow_insecure_http: false,
        allow_file_urls: false,
        ca_file: None,
        // The servers here listen on loopback.
        allow_private_hosts: true,
    }
}

fn token() -> SecretString {
    SecretString::from(TOKEN.to_owned())
}

async fn run(
    url: &str,
    branch: &str,
    commit: Option<&str>,
    token: Option<&SecretString>,
    settings: &CheckoutSettings,
) -> (tempfile::TempDir, Result<CheckedOut, CheckoutError>) {
    let dir = tempfile::tempdir().unwrap();
    let req = CheckoutRequest {
        url,
        branch,
        commit,
        token,
    };
    let result = checkout(&req, dir.path(), settings).await;
    if let Err(e) = &result {
        assert_no_token(e);
        assert!(dir.path().is_dir(), "destination removed on failure: {e}");
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            0,
            "destination not emptied on failure: {e}"
        );
    }
    (dir, result)
}

fn assert_no_token(err: &CheckoutError) {
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("x-access-token:{TOKEN}"));
    for text in [err.to_string(), format!("{err:?}")] {
        assert!(!text.contains(TOKEN), "token leaked: {text}");
        assert!(!text.contains(&basic), "token leaked: {text}");
    }
}

fn read(dir: &Path, file: &str) -> Option<String> {
    std::fs::read_to_string(dir.join(file)).ok()
}

// ---------------------------------------------------------------------------------------------
// Tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_with_token_clones_a_branch_shallow() {
    let fx = fixture(0);
    let tls = tls();
    let mut serve = Serve::new(&fx.root);
    serve.token = Some(TOKEN.into());
    let base = start(serve, Some(tls.acceptor.clone())).await;
    let mut s = settings();
    s.ca_file = Some(tls.ca_file.clone());
    let url = format!("{base}/repo.git");

    let (dir, result) = run(&url, "feature", None, Some(&token()), &s).await;
    let out = result.unwrap();
    assert_eq!(out.commit, fx.feature);
    assert_eq!(
        read(dir.path(), "feature.txt").as_deref(),
        Some("feature\n")
    );
    assert_eq!(read(dir.path(), "two.txt"), None);
    // Depth 1: the parent commit is not there.
    let log = git(dir.path(), &["rev-list", "--count", "HEAD"]);
    assert_eq!(log, "1");
    // The token is not written anywhere in the clone's config.
    let config = std::fs::read_to_string(dir.path().join(".git/config")).unwrap();
    assert!(!config.contains(TOKEN), "{config}");

    // The default branch, `main`.
    let (dir, result) = run(&url, "main", None, Some(&token()), &s).await;
    assert_eq!(result.unwrap().commit, fx.main[2]);
    assert_eq!(read(dir.path(), "three.txt").as_deref(), Some("three\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_without_the_ca_is_refused() {
    let fx = fixture(0);
    let tls = tls();
    let base = start(Serve::new(&fx.root), Some(tls.acceptor.clone())).await;
    let (_dir, result) = run(&format!("{base}/repo.git"), "main", None, None, &settings()).await;
    let err = result.unwrap_err();
    assert!(matches!(err, CheckoutError::Other { .. }), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_or_missing_token_is_an_auth_error() {
    let fx = fixture(0);
    let tls = tls();
    let mut serve = Serve::new(&fx.root);
    serve.token = Some("the-right-one".into());
    let base = start(serve, Some(tls.acceptor.clone())).await;
    let mut s = settings();
    s.ca_file = Some(tls.ca_file.clone());
    let url = format!("{base}/repo.git");

    let (_dir, result) = run(&url, "main", None, Some(&token()), &s).await;
    let err = result.unwrap_err();
    assert!(matches!(err, CheckoutError::AuthFailed { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        format!("authentication failed for {url}: check the token")
    );

    let (_dir, result) = run(&url, "main", None, None, &s).await;
    let err = result.unwrap_err();
    assert!(matches!(err, CheckoutError::AuthFailed { .. }), "{err:?}");

    // The same through a commit checkout, which has a fallback path of its own.
    let (_dir, result) = run(&url, "main", Some(&fx.main[0]), Some(&token()), &s).await;
    let err = result.unwrap_err();
    assert!(matches!(err, CheckoutError::AuthFailed { .. }), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_is_fetched_by_id() {
    let fx = fixture(0);
    let base = start(Serve::new(&fx.root), None).await;
    let url = format!("{base}/repo.git");
    let (dir, result) = run(&url, "main", Some(&fx.main[1]), None, &settings()).await;
    assert_eq!(result.unwrap().commit, fx.main[1]);
    assert_eq!(read(dir.path(), "two.txt").as_deref(), Some("two\n"));
    assert_eq!(read(dir.path(), "three.txt"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_falls_back_to_the_branch_when_the_server_refuses_ids() {
    let fx = fixture(0);
    let mut serve = Serve::new(&fx.root);
    serve.refuse_non_tips = true;
    let base = start(serve, None).await;
    let url = format!("{base}/repo.git");
    let (dir, result) = run(&url, "main", Some(&fx.main[0]), None, &settings()).await;
    assert_eq!(result.unwrap().commit, fx.main[0]);
    assert_eq!(read(dir.path(), "README.md").as_deref(), Some("one\n"));
    assert_eq!(read(dir.path(), "two.txt"), None);
    // Only the fallback leaves a tracking branch behind: proof it was taken.
    assert_eq!(
        git(dir.path(), &["rev-parse", "refs/remotes/origin/main"]),
        fx.main[2]
    );

    // Not on that branch: a clear error.
    let (_dir, result) = run(&url, "main", Some(&fx.feature_first), None, &settings()).await;
    let err = result.unwrap_err();
    assert!(
        matches!(err, CheckoutError::CommitNotFound { .. }),
        "{err:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_branch_and_commit_are_named() {
    let fx = fixture(0);
    let base = start(Serve::new(&fx.root), None).await;
    let url = format!("{base}/repo.git");
    let (_dir, result) = run(&url, "nope", None, None, &settings()).await;
    let err = result.unwrap_err();
    assert_eq!(err.to_string(), format!("branch `nope` not found in {url}"));

    let absent = "0123456789abcdef0123456789abcdef01234567";
    let (_dir, result) = run(&url, "main", Some(absent), None, &settings()).await;
    let err = result.unwrap_err();
    assert!(
        matches!(err, CheckoutError::CommitNotFound { .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains(absent), "{err}");

    let (_dir, result) = run(&url, "main", Some("abc123"), None, &settings()).await;
    let err = result.unwrap_err();
    assert!(
        matches!(err, CheckoutError::InvalidRequest { .. }),
        "{err:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_size_limit_stops_the_clone() {
    let fx = fixture(2 * 1024 * 1024);
    let base = start(Serve::new(&fx.root), None).await;
    let mut s = settings();
    s.max_bytes = 256 * 1024;
    let (_dir, result) = run(&format!("{base}/repo.git"), "main", None, None, &s).await;
    let err = result.unwrap_err();
    assert!(
        matches!(err, CheckoutError::TooLarge { limit, .. } if limit == 256 * 1024),
        "{err:?}"
    );

    s.max_bytes = 8 * 1024 * 1024;
    let (dir, result) = run(&format!("{base}/repo.git"), "main", None, None, &s).await;
    result.unwrap();
    assert!(dir.path().join("big.bin").is_file());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_server_times_out() {
    let fx = fixture(0);
    let mut serve = Serve::new(&fx.root);
    serve.stall = true;
    let base = start(serve, None).await;
    let mut s = settings();
    s.timeout = Duration::from_secs(2);
    let started = Instant::now();
    let (_dir, result) = run(&format!("{base}/repo.git"), "main", None, None, &s).await;
    let err = result.unwrap_err();
    assert!(matches!(err, CheckoutError::Timeout { .. }), "{err:?}");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn disallowed_urls_are_refused_before_any_io() {
    let s = settings();
    let cases = [
        ("ssh://git@github.com/a/b.git", "ssh"),
        ("git@github.com:a/b.git", "scp-style"),
        ("ext::sh -c 'touch /tmp/x'", "ext::"),
        ("git://github.com/a/b.git", "git"),
        ("/srv/repo.git", "local path"),
        ("file:///srv/repo.git", "allow_file_urls"),
        ("http://example.com/a.git", "allow_insecure_http"),
        ("https://x-access-token:abc@github.com/a.git", "credentials"),
    ];
    for (url, needle) in cases {
        let err = validate_url(url, &s).unwrap_err();
        assert!(err.to_string().contains(needle), "{url}: {err}");
        // checkout() refuses the same way, leaving the destination alone.
        let (_dir, result) = run(url, "main", None, Some(&token()), &s).await;
        let err = result.unwrap_err();
        assert!(err.to_string().contains(needle), "{url}: {err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_urls_work_when_allowed() {
    let fx = fixture(0);
    let url = format!("file://{}", fx.root.join("repo.git").display());
    let mut s = settings();
    s.allow_file_urls = true;
    let (dir, result) = run(&url, "feature", None, None, &s).await;
    assert_eq!(result.unwrap().commit, fx.feature);
    assert!(dir.path().join("feature.txt").is_file());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destination_must_be_an_empty_directory() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("x"), "").unwrap();
    let req = CheckoutRequest {
        url: "https://127.0.0.1:1/repo.git",
        branch: "main",
        commit: None,
        token: None,
    };
    let err = checkout(&req, dir.path(), &settings()).await.unwrap_err();
    assert!(matches!(err, CheckoutError::Destination { .. }), "{err:?}");
    assert!(dir.path().join("x").is_file());
}

/// The system trust route: with `SSL_CERT_FILE` naming the CA and no `ca_file`, the clone
/// trusts the server. The clone runs in a child process (this same test, re-run with the server's
/// address in its environment) so this process's environment stays untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssl_cert_file_is_honoured() {
    if let (Ok(url), Ok(expect)) = (
        std::env::var("GRYT_TEST_CHILD_URL"),
        std::env::var("GRYT_TEST_CHILD_EXPECT"),
    ) {
        // The child: clone with nothing but SSL_CERT_FILE to trust the server.
        let (_dir, result) = run(&url, "main", None, None, &settings()).await;
        assert_eq!(result.unwrap().commit, expect);
        return;
    }
    let fx = fixture(0);
    let tls = tls();
    let base = start(Serve::new(&fx.root), Some(tls.acceptor.clone())).await;
    let exe = std::env::current_exe().unwrap();
    // This test's name in the test binary: its module path without the crate's name.
    let module = module_path!().split_once("::").map_or("", |(_, m)| m);
    let name = format!("{module}::ssl_cert_file_is_honoured");
    let out = tokio::process::Command::new(exe)
        .args(["--exact", &name, "--nocapture"])
        .env("SSL_CERT_FILE", &tls.ca_file)
        .env("GRYT_TEST_CHILD_URL", format!("{base}/repo.git"))
        .env("GRYT_TEST_CHILD_EXPECT", &fx.main[2])
        .output()
        .await
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(text.contains("1 passed"), "{text}");
}

// ---------------------------------------------------------------------------------------------
// Hostile repositories and servers

/// A bare repository `repo.git` under the returned root, with one commit on `main` holding
/// `files`.
fn repo_of(files: &[(&str, Vec<u8>)]) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("work");
    std::fs::create_dir(&work).unwrap();
    git(&work, &["init", "-q"]);
    for (name, content) in files {
        std::fs::write(work.join(name), content).unwrap();
    }
    git(&work, &["add", "."]);
    git(&work, &["commit", "-qm", "files"]);
    let root = dir.path().join("srv");
    std::fs::create_dir(&root).unwrap();
    git(
        dir.path(),
        &["clone", "-q", "--bare", "work", "srv/repo.git"],
    );
    (dir, root)
}

/// Samples how many bytes of files are under `dir` until stopped; returns the most seen.
struct SizeSampler {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<u64>,
}

impl SizeSampler {
    fn start(dir: &Path) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (dir, stop) = (dir.to_owned(), stop.clone());
            std::thread::spawn(move || {
                let mut most = 0;
                while !stop.load(Ordering::SeqCst) {
                    most = most.max(bytes_under(&dir));
                    std::thread::sleep(Duration::from_millis(2));
                }
                most.max(bytes_under(&dir))
            })
        };
        SizeSampler { stop, thread }
    }

    fn most(self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.join().unwrap()
    }
}

fn bytes_under(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => bytes_under(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// The limit counts what lands in the workspace, not the pack: a pack of some kilobytes that
/// inflates to many megabytes is refused before its files are written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_size_limit_counts_bytes_written_not_pack_bytes() {
    const LIMIT: u64 = 1024 * 1024;
    let mut s = settings();
    s.max_bytes = LIMIT;
    // One blob far larger than the limit, which compresses to almost nothing.
    let (_a, one_blob) = repo_of(&[("zeros.bin", vec![0u8; 64 * 1024 * 1024])]);
    // One blob under the limit, under many names: each one is a file of its own.
    let names: Vec<String> = (0..40).map(|i| format!("copy-{i}.bin")).collect();
    let files: Vec<(&str, Vec<u8>)> = names
        .iter()
        .map(|n| (n.as_str(), vec![7u8; 768 * 1024]))
        .collect();
    let (_b, many_names) = repo_of(&files);
    for root in [one_blob, many_names] {
        let base = start(Serve::new(&root), None).await;
        let dir = tempfile::tempdir().unwrap();
        let sampler = SizeSampler::start(dir.path());
        let req = CheckoutRequest {
            url: &format!("{base}/repo.git"),
            branch: "main",
            commit: None,
            token: None,
        };
        let result = checkout(&req, dir.path(), &s).await;
        let most = sampler.most();
        let err = result.unwrap_err();
        assert!(
            matches!(err, CheckoutError::TooLarge { limit, .. } if limit == LIMIT),
            "{err:?}"
        );
        assert!(err.to_string().contains("GRYT_CHECKOUT_MAX_BYTES"), "{err}");
        assert!(
            most <= 2 * LIMIT,
            "the workspace grew to {most} bytes under a limit of {LIMIT}"
        );
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}

/// Files that a `.gitattributes` filter grows on checkout (`ident` makes `$Id$` 46 bytes): the
/// object sizes fit, what is written does not, and the checkout stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_grown_by_filters_still_hit_the_limit() {
    const LIMIT: u64 = 1024 * 1024;
    let ids = "$Id$\n".repeat(40 * 1024).into_bytes(); // 200 KiB, about 1.9 MiB written
    let (_a, root) = repo_of(&[
        (".gitattributes", b"*.txt ident\n".to_vec()),
        ("a.txt", ids.clone()),
        ("b.txt", ids.clone()),
        ("c.txt", ids),
    ]);
    let base = start(Serve::new(&root), None).await;
    let mut s = settings();
    s.max_bytes = LIMIT;
    let (_dir, result) = run(&format!("{base}/repo.git"), "main", None, None, &s).await;
    let err = result.unwrap_err();
    assert!(matches!(err, CheckoutError::TooLarge { .. }), "{err:?}");

    s.max_bytes = 64 * 1024 * 1024;
    let (dir, result) = run(&format!("{base}/repo.git"), "main", None, None, &s).await;
    result.unwrap();
    assert!(read(dir.path(), "a.txt").unwrap().starts_with("$Id: "));
}

/// A redirect to another host or port is refused before anything connects there; the token
/// never travels.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirect_to_another_host_is_refused() {
    let fx = fixture(0);
    let elsewhere = Serve::new(&fx.root);
    let elsewhere_hits = elsewhere.hits.clone();
    let elsewhere_base = start(elsewhere, None).await;
    let port = elsewhere_base.rsplit(':').next().unwrap().to_owned();
    for target in [elsewhere_base.clone(), format!("http://localhost:{port}")] {
        let mut redirecting = Serve::new(&fx.root);
        redirecting.redirect_to = Some(target.clone());
        let base = start(redirecting, None).await;
        let url = format!("{base}/repo.git");
        let (_dir, result) = run(&url, "main", None, Some(&token()), &settings()).await;
        let err = result.unwrap_err();
        assert!(
            matches!(err, CheckoutError::RedirectRefused { .. }),
            "{target}: {err:?}"
        );
        assert!(err.to_string().contains("another host"), "{err}");
        assert!(!err.to_string().contains(&port), "{err}");
    }
    assert_eq!(elsewhere_hits.load(Ordering::SeqCst), 0);

    // On the same host and port a redirect is still followed (a renamed repository).
    let mut renamed = Serve::new(&fx.root);
    renamed.renamed = true;
    let base = start(renamed, None).await;
    let (_dir, result) = run(&format!("{base}/old.git"), "main", None, None, &settings()).await;
    assert_eq!(result.unwrap().commit, fx.main[2]);
}

/// Loopback and private addresses need `allow_private_hosts`; nothing connects without it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_hosts_are_refused_unless_allowed() {
    let fx = fixture(0);
    let serve = Serve::new(&fx.root);
    let hits = serve.hits.clone();
    let base = start(serve, None).await;
    let port = base.rsplit(':').next().unwrap().to_owned();
    let mut s = settings();
    s.allow_private_hosts = false;
    for url in [
        format!("{base}/repo.git"),
        format!("http://localhost:{port}/repo.git"),
        format!("https://[::ffff:127.0.0.1]:{port}/repo.git"),
        "https://169.254.169.254/latest/meta-data".to_owned(),
        "https://10.0.0.1/repo.git".to_owned(),
    ] {
        let (_dir, result) = run(&url, "main", None, Some(&token()), &s).await;
        let err = result.unwrap_err();
        assert!(
            matches!(err, CheckoutError::PrivateHost { .. }),
            "{url}: {err:?}"
        );
        assert!(
            err.to_string().contains("GRYT_CHECKOUT_ALLOW_PRIVATE"),
            "{err}"
        );
    }
    assert_eq!(hits.load(Ordering::SeqCst), 0);
    s.allow_private_hosts = true;
    let (_dir, result) = run(&format!("{base}/repo.git"), "main", None, None, &s).await;
    assert_eq!(result.unwrap().commit, fx.main[2]);
}

/// What the server sends back never reaches the error: not a body, not an `ERR` line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_servers_reply_text_is_not_copied_into_errors() {
    const MARKER: &str = "MARKER-reflected-0xC0FFEE";
    let fx = fixture(0);
    let err_line = format!("ERR {MARKER} Authorization: Basic secret\n");
    let replies: Vec<(u16, &'static str, Vec<u8>)> = vec![
        (
            500,
            "text/plain",
            format!("internal error: {MARKER}\n").into_bytes(),
        ),
        (404, "text/html", format!("<h1>{MARKER}</h1>").into_bytes()),
        (
            200,
            "application/x-git-upload-pack-advertisement",
            format!("{:04x}{err_line}", err_line.len() + 4).into_bytes(),
        ),
        (
            200,
            "application/x-git-upload-pack-advertisement",
            format!(
                "001e# service=git-upload-pack\n0000{:04x}{err_line}",
                err_line.len() + 4
            )
            .into_bytes(),
        ),
        (200, "text/plain", format!("{MARKER}\n").into_bytes()),
    ];
    for canned in replies {
        let status = canned.0;
        let mut serve = Serve::new(&fx.root);
        serve.canned = Some(canned);
        let base = start(serve, None).await;
        let (_dir, result) =
            run(&format!("{base}/repo.git"), "main", None, None, &settings()).await;
        let err = result.unwrap_err();
        for text in [err.to_string(), format!("{err:?}")] {
            assert!(
                !text.contains(MARKER),
                "the server's text was copied: {text}"
            );
        }
        if status == 500 {
            assert!(err.to_string().contains("HTTP 500"), "{err}");
        }
    }
    // A real advertisement, then an ERR line in answer to the fetch.
    let mut serve = Serve::new(&fx.root);
    serve.err_on_fetch = Some(err_line);
    let base = start(serve, None).await;
    let (_dir, result) = run(&format!("{base}/repo.git"), "main", None, None, &settings()).await;
    let err = result.unwrap_err();
    assert!(!format!("{err} {err:?}").contains(MARKER), "{err}");
}

// ---------------------------------------------------------------------------------------------
// Through the executor: a job with `git_url` and an encrypted token, in a real container.

use crate::support;

use gryt_agent::wire::{JobSpec, JobStatus};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_clones_its_repository_and_works_in_it() {
    let (key, encrypted, plaintext) = support::token_vector(1);
    let fx = fixture(0);
    let tls = tls();
    let mut serve = Serve::new(&fx.root);
    serve.token = Some(plaintext.clone());
    let base = start(serve, Some(tls.acceptor.clone())).await;
    let ca_file = tls.ca_file.clone();
    let agent = support::test_agent("checkout-job", |s| {
        s.encryption_key = Some(key.into());
        s.ca_file = Some(ca_file);
        s.checkout.allow_private_hosts = true;
    })
    .await;
    let pipeline = "version: 1\nsteps:\n  - run: cat README.md && test -f three.txt && test ! -e feature.txt && echo changed > README.md && ls pipeline.yml && git_dir=$(ls -d .git) && echo \"$git_dir\"\n";
    let mut spec = JobSpec {
        job_id: 31,
        pipeline_b64: support::b64(pipeline),
        git_url: Some(format!("{base}/repo.git")),
        github_token_encrypted: Some(encrypted.clone()),
        ..Default::default()
    };
    let result = agent.run(&spec).await;
    assert_eq!(result.status, JobStatus::Success, "{result:?}");
    assert_eq!(result.stdout, "one\npipeline.yml\n.git\n");

    // A branch by name, then a commit.
    spec.git_branch = Some("feature".into());
    spec.pipeline_b64 = support::b64("version: 1\nsteps:\n  - run: cat feature.txt\n");
    let result = agent.run(&spec).await;
    assert_eq!(
        (result.status, result.stdout.as_str()),
        (JobStatus::Success, "feature\n"),
        "{result:?}"
    );
    spec.git_branch = None;
    spec.git_commit = Some(fx.main[1].clone());
    spec.pipeline_b64 = support::b64(
        "version: 1\nsteps:\n  - run: test -f two.txt && test ! -f three.txt && echo at-two\n",
    );
    let result = agent.run(&spec).await;
    assert_eq!(
        (result.status, result.stdout.as_str()),
        (JobStatus::Success, "at-two\n"),
        "{result:?}"
    );
    agent.assert_clean().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkout_failures_are_clear_job_errors_without_the_token() {
    let (key, encrypted, plaintext) = support::token_vector(1);
    let fx = fixture(0);
    let tls = tls();
    let mut serve = Serve::new(&fx.root);
    serve.token = Some("a-different-token-the-server-wants".into());
    let base = start(serve, Some(tls.acceptor.clone())).await;
    let ca_file = tls.ca_file.clone();
    let agent = support::test_agent("checkout-errors", |s| {
        s.encryption_key = Some(key.into());
        s.ca_file = Some(ca_file);
        s.checkout.allow_private_hosts = true;
    })
    .await;
    let job = |url: String, branch: Option<&str>| JobSpec {
        job_id: 32,
        pipeline_b64: support::b64("version: 1\nsteps:\n  - run: true\n"),
        git_url: Some(url),
        git_branch: branch.map(str::to_owned),
        github_token_encrypted: Some(encrypted.clone()),
        ..Default::default()
    };
    let cases = [
        (
            job(format!("{base}/repo.git"), None),
            "authentication failed",
        ),
        (job("ssh://git@example.com/repo.git".into(), None), "ssh"),
        (job("ext::sh -c touch% /tmp/pwned".into(), None), "ext"),
    ];
    for (spec, expected) in cases {
        let result = agent.run(&spec).await;
        assert_eq!(result.status, JobStatus::Error, "{result:?}");
        let error = result.error.clone().unwrap_or_default();
        assert!(error.contains(expected), "{expected:?} not in {error:?}");
        assert!(
            !format!("{result:?}").contains(&plaintext),
            "the token leaked: {result:?}"
        );
    }
    // A branch that does not exist, on a server that accepts the token.
    let mut serve = Serve::new(&fx.root);
    serve.token = Some(plaintext.clone());
    let base = start(serve, Some(tls.acceptor.clone())).await;
    let result = agent
        .run(&job(format!("{base}/repo.git"), Some("no-such-branch")))
        .await;
    assert_eq!(result.status, JobStatus::Error, "{result:?}");
    assert!(result.error.unwrap().contains("no-such-branch"));
    agent.assert_clean().await;
}
