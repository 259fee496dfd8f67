//! Artifacts and caches against a real S3-compatible object store: a single-node Garage on
//! loopback (`bash tests/store/garage.sh start`, which `.ci/run` does). Without it these tests
//! fail, saying how to start it. Jobs run on the real Docker engine.

use crate::fake_api;
use crate::support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use gryt_agent::config::Settings;
use gryt_agent::executor::{JobControl, OutputStream};
use gryt_agent::wire::{JobResult, JobSpec, JobStatus};
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::{ObjectStore, ObjectStoreExt};
use sha2::{Digest, Sha256};
use support::{Recorder, TestAgent, b64, test_agent};

/// The test server's connection, from the file `tests/store/garage.sh start` writes.
struct Garage {
    endpoint: String,
    region: String,
    bucket: String,
    key_id: String,
    secret: String,
}

fn garage() -> Garage {
    let file = std::env::var("GRYT_TEST_STORE_FILE")
        .unwrap_or_else(|_| "/tmp/gryt-test-garage/store.env".into());
    let how =
        "start the test object store first: `bash tests/store/garage.sh start` (.ci/run does)";
    let text = std::fs::read_to_string(&file)
        .unwrap_or_else(|e| panic!("no object store connection in {file} ({e}): {how}"));
    let get = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .unwrap_or_else(|| panic!("{file} has no {key}: {how}"))
            .to_owned()
    };
    let g = Garage {
        endpoint: get("endpoint"),
        region: get("region"),
        bucket: get("bucket"),
        key_id: get("access_key_id"),
        secret: get("secret_access_key"),
    };
    let addr = g.endpoint.trim_start_matches("http://");
    std::net::TcpStream::connect(addr)
        .unwrap_or_else(|e| panic!("the object store at {addr} does not answer ({e}): {how}"));
    g
}

impl Garage {
    fn addr(&self) -> SocketAddr {
        self.endpoint.trim_start_matches("http://").parse().unwrap()
    }

    /// A prefix of its own for each test, so tests never see each other's objects.
    fn prefix(test: &str) -> String {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        format!("t-{test}-{}-{nanos}", std::process::id())
    }

    fn configure(&self, settings: &mut Settings, prefix: &str, endpoint: &str) {
        let s = &mut settings.store;
        s.url = Some(format!("s3://{}/{prefix}", self.bucket));
        s.endpoint = Some(endpoint.to_owned());
        s.region = Some(self.region.clone());
        s.allow_http = true;
        s.access_key_id = Some(self.key_id.clone().into());
        s.secret_access_key = Some(self.secret.clone().into());
        s.part_size_bytes = gryt_agent::config::MIN_PART_SIZE;
    }

    async fn agent(
        &self,
        test: &str,
        prefix: &str,
        tweak: impl FnOnce(&mut Settings),
    ) -> TestAgent {
        let endpoint = self.endpoint.clone();
        test_agent(test, |s| {
            self.configure(s, prefix, &endpoint);
            tweak(s);
        })
        .await
    }

    /// A client of its own, to look at what the agent stored.
    fn client(&self) -> AmazonS3 {
        AmazonS3Builder::new()
            .with_bucket_name(&self.bucket)
            .with_endpoint(&self.endpoint)
            .with_region(&self.region)
            .with_allow_http(true)
            .with_access_key_id(&self.key_id)
            .with_secret_access_key(&self.secret)
            .build()
            .unwrap()
    }

    async fn get(&self, url: &str) -> Bytes {
        let key = url
            .strip_prefix(&format!("s3://{}/", self.bucket))
            .unwrap_or_else(|| panic!("{url} is not in the bucket"));
        let path = object_store::path::Path::from(key);
        self.client()
            .get(&path)
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap()
    }

    async fn list(&self, prefix: &str) -> Vec<String> {
        use futures_util::StreamExt;
        let path = object_store::path::Path::from(prefix);
        let mut list = self.client().list(Some(&path));
        let mut out = Vec::new();
        while let Some(meta) = list.next().await {
            out.push(meta.unwrap().location.to_string());
        }
        out.sort();
        out
    }
}

fn spec(pipeline: &str) -> JobSpec {
    JobSpec {
        job_id: 7,
        pipeline_b64: b64(pipeline),
        ..Default::default()
    }
}

async fn run(agent: &TestAgent, job: &JobSpec) -> (JobResult, String) {
    let recorder = Recorder::default();
    let result = agent.executor.run(job, &recorder, &JobControl::new()).await;
    let stderr = String::from_utf8_lossy(&recorder.stream(OutputStream::Stderr)).into_owned();
    (result, stderr)
}

fn sha256(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

const MAKE_FILES: &str = "mkdir -p dist/sub reports && echo a > dist/a.txt && echo b > dist/sub/b.txt && echo x > reports/x.xml && echo y > reports/y.txt";

#[tokio::test]
async fn artifacts_upload_by_when_with_globs() {
    let g = garage();
    let prefix = Garage::prefix("when");
    let agent = g.agent("store-when", &prefix, |_| {}).await;
    for (when, exit, uploads) in [
        ("on_success", 0, true),
        ("on_success", 3, false),
        ("on_failure", 3, true),
        ("on_failure", 0, false),
        ("always", 0, true),
        ("always", 3, true),
    ] {
        let pipeline = format!(
            "version: 1\nsteps:\n  - run: {MAKE_FILES} && exit {exit}\nartifacts:\n  paths: [dist/, \"reports/*.xml\", \"nothing/*\"]\n  when: {when}\n"
        );
        let (result, stderr) = run(&agent, &spec(&pipeline)).await;
        let expected = if exit == 0 {
            JobStatus::Success
        } else {
            JobStatus::Failed
        };
        assert_eq!(result.status, expected, "{when}/{exit}: {result:?}");
        if !uploads {
            assert!(
                result.artifacts.is_empty(),
                "{when}/{exit}: {:?}",
                result.artifacts
            );
            continue;
        }
        let paths: Vec<&str> = result.artifacts.iter().map(|a| a.path.as_str()).collect();
        assert_eq!(
            paths,
            ["dist/a.txt", "dist/sub/b.txt", "reports/x.xml"],
            "{when}/{exit}"
        );
        assert!(stderr.contains("`nothing/*` matches no file"), "{stderr}");
        for artifact in &result.artifacts {
            assert_eq!(
                artifact.url,
                format!("s3://{}/{prefix}/artifacts/7/{}", g.bucket, artifact.path)
            );
            let stored = g.get(&artifact.url).await;
            assert_eq!(artifact.size, stored.len() as u64);
            assert_eq!(artifact.sha256, sha256(&stored));
        }
        assert_eq!(&g.get(&result.artifacts[0].url).await[..], b"a\n");
    }
    // The same fields in the job spec's JSON replace the pipeline's.
    let mut job = spec(&format!("version: 1\nsteps:\n  - run: {MAKE_FILES}\n"));
    job.artifacts = Some(gryt_agent::wire::ArtifactsSpec {
        paths: vec!["reports/".into()],
        when: Default::default(),
    });
    let (result, _) = run(&agent, &job).await;
    let paths: Vec<&str> = result.artifacts.iter().map(|a| a.path.as_str()).collect();
    assert_eq!(paths, ["reports/x.xml", "reports/y.txt"]);
    agent.assert_clean().await;
}

/// A loopback HTTP proxy in front of the store that answers every `every`th part upload with
/// a 500 (after reading it whole, as a real server would) and forwards everything else.
struct FailingProxy {
    endpoint: String,
    parts: Arc<AtomicUsize>,
    failed: Arc<AtomicUsize>,
}

async fn failing_proxy(upstream: SocketAddr, every: usize) -> FailingProxy {
    use http_body_util::{BodyExt, Full};
    use hyper::body::Incoming;
    use hyper_util::rt::TokioIo;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let parts = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let (p, f) = (parts.clone(), failed.clone());
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let (p, f) = (p.clone(), f.clone());
            let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
                let (p, f) = (p.clone(), f.clone());
                async move {
                    let part = req.method() == hyper::Method::PUT
                        && req.uri().query().is_some_and(|q| q.contains("partNumber="));
                    if part && (p.fetch_add(1, Ordering::SeqCst) + 1) % every == 0 {
                        let _ = req.into_body().collect().await;
                        f.fetch_add(1, Ordering::SeqCst);
                        let body = Full::new(Bytes::from_static(
                            b"<Error><Code>InternalError</Code><Message>injected</Message></Error>",
                        ))
                        .map_err(|never| match never {})
                        .boxed();
                        return Ok::<_, hyper::Error>(
                            hyper::Response::builder().status(500).body(body).unwrap(),
                        );
                    }
                    let conn = tokio::net::TcpStream::connect(upstream).await.unwrap();
                    let (mut sender, conn) =
                        hyper::client::conn::http1::handshake(TokioIo::new(conn)).await?;
                    tokio::spawn(conn);
                    let response = sender.send_request(req).await?;
                    Ok(response.map(|b| b.boxed()))
                }
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service),
            );
        }
    });
    FailingProxy {
        endpoint,
        parts,
        failed,
    }
}

#[tokio::test]
async fn a_large_artifact_goes_up_in_parts_and_failed_parts_are_retried() {
    let g = garage();
    let proxy = failing_proxy(g.addr(), 2).await;
    let prefix = Garage::prefix("multipart");
    let endpoint = proxy.endpoint.clone();
    let agent = test_agent("store-multipart", |s| g.configure(s, &prefix, &endpoint)).await;
    // 12 MiB and a bit: three parts of 5 MiB at most.
    let pipeline = "version: 1\nsteps:\n  - run: head -c 12583000 /dev/urandom > big.bin\nartifacts:\n  paths: [big.bin]\n";
    let (result, stderr) = run(&agent, &spec(pipeline)).await;
    assert_eq!(result.status, JobStatus::Success, "{result:?}\n{stderr}");
    let artifact = &result.artifacts[0];
    assert_eq!(artifact.size, 12_583_000);
    let stored = g.get(&artifact.url).await;
    assert_eq!(stored.len(), 12_583_000);
    assert_eq!(
        artifact.sha256,
        sha256(&stored),
        "the stored object is the file"
    );
    let (parts, failed) = (
        proxy.parts.load(Ordering::SeqCst),
        proxy.failed.load(Ordering::SeqCst),
    );
    assert!(failed >= 1, "no part upload failed ({parts} part requests)");
    assert_eq!(parts, 3 + failed, "each failed part was retried on its own");
    agent.assert_clean().await;
}

#[tokio::test]
async fn an_upload_that_keeps_failing_fails_the_job_naming_the_file() {
    let g = garage();
    let proxy = failing_proxy(g.addr(), 1).await;
    let prefix = Garage::prefix("fail");
    let endpoint = proxy.endpoint.clone();
    let agent = test_agent("store-fail", |s| {
        g.configure(s, &prefix, &endpoint);
        s.store.retries = 1;
    })
    .await;
    let pipeline = "version: 1\nsteps:\n  - run: head -c 6000000 /dev/zero > big.bin\nartifacts:\n  paths: [big.bin]\n";
    let (result, _) = run(&agent, &spec(pipeline)).await;
    assert_eq!(result.status, JobStatus::Error, "{result:?}");
    let error = result.error.unwrap();
    assert!(
        error.contains("cannot upload artifact `big.bin`"),
        "{error}"
    );
    assert!(g.list(&format!("{prefix}/artifacts")).await.is_empty());
    agent.assert_clean().await;
}

/// A pipeline with one cache keyed on `pipeline.yml` itself (the only file a job without a
/// repository has): `comment` changes the key. The step checks what it finds: a restored file
/// must be there whole and writable by the job's user.
fn cache_pipeline(comment: &str) -> String {
    format!(
        "version: 1\n# {comment}\nsteps:\n  - run: {CACHE_STEP}\ncache:\n  - key: deps\n    files: [pipeline.yml]\n    paths: [cachedir]\n"
    )
}

const CACHE_STEP: &str = "if [ -e cachedir ]; then grep -q one cachedir/x && echo more >> cachedir/x && echo FOUND; else mkdir cachedir && echo one > cachedir/x && echo EMPTY; fi";

fn trusted(pipeline: &str, branch: Option<&str>) -> JobSpec {
    JobSpec {
        trusted: true,
        git_branch: branch.map(str::to_owned),
        ..spec(pipeline)
    }
}

/// Runs a cache job that must succeed; returns whether it found the cache, and its log.
async fn cache_run(agent: &TestAgent, job: &JobSpec) -> (bool, String) {
    let (result, log) = run(agent, job).await;
    assert_eq!(result.status, JobStatus::Success, "{result:?}");
    let found = result.stdout.contains("FOUND");
    assert_eq!(found, log.contains("cache `deps`: restored"), "{log}");
    assert_eq!(!found, log.contains("cache `deps`: miss"), "{log}");
    (found, log)
}

#[tokio::test]
async fn a_cache_misses_then_hits_and_a_key_file_edit_changes_the_key() {
    let g = garage();
    let prefix = Garage::prefix("cache");
    let agent = g.agent("store-cache", &prefix, |_| {}).await;
    let (found, log) = cache_run(&agent, &trusted(&cache_pipeline("v1"), None)).await;
    assert!(!found && log.contains("cache `deps`: saved"), "{log}");
    let (found, log) = cache_run(&agent, &trusted(&cache_pipeline("v1"), None)).await;
    assert!(found, "{log}");
    assert!(!log.contains("saved"), "a hit is not saved again: {log}");
    // The key file changed: a new key, so a miss.
    let (found, log) = cache_run(&agent, &trusted(&cache_pipeline("v2"), None)).await;
    assert!(!found && log.contains("saved"), "{log}");
    let stored = g.list(&format!("{prefix}/cache")).await;
    assert_eq!(stored.len(), 2, "{stored:?}");
    assert!(
        stored
            .iter()
            .all(|s| s.contains("/deps-") && s.ends_with(".tar.zst"))
    );
    agent.assert_clean().await;
}

#[tokio::test]
async fn cache_scopes_keep_branches_and_untrusted_jobs_apart() {
    let g = garage();
    let prefix = Garage::prefix("scope");
    let agent = g.agent("store-scope", &prefix, |_| {}).await;
    let pipeline = cache_pipeline("scope");
    // An untrusted job writes nothing.
    let (found, log) = cache_run(&agent, &spec(&pipeline)).await;
    assert!(
        !found && log.contains("only trusted jobs write caches"),
        "{log}"
    );
    assert!(g.list(&format!("{prefix}/cache")).await.is_empty());
    // A trusted feature branch writes its own scope; main does not see it.
    let (found, _) = cache_run(&agent, &trusted(&pipeline, Some("feature"))).await;
    assert!(!found);
    let (found, _) = cache_run(&agent, &trusted(&pipeline, Some("feature"))).await;
    assert!(found, "the feature branch reads its own scope");
    let (found, log) = cache_run(&agent, &trusted(&pipeline, Some("main"))).await;
    assert!(
        !found,
        "main must not see the feature branch's cache: {log}"
    );
    // Now main has it: untrusted jobs and other branches read main's.
    let (found, log) = cache_run(&agent, &spec(&pipeline)).await;
    assert!(found, "untrusted jobs read main's cache: {log}");
    let (found, log) = cache_run(&agent, &trusted(&pipeline, Some("other"))).await;
    assert!(found, "other branches fall back to main: {log}");
    assert!(log.contains("saved"), "and write their own scope: {log}");
    assert_eq!(g.list(&format!("{prefix}/cache")).await.len(), 3);
    agent.assert_clean().await;
}

#[tokio::test]
async fn paths_escaping_the_workspace_are_refused() {
    let g = garage();
    let prefix = Garage::prefix("escape");
    let agent = g.agent("store-escape", &prefix, |_| {}).await;
    for (tail, field) in [
        (
            "artifacts:\n  paths: [../etc/passwd]\n",
            "artifacts.paths[0]",
        ),
        ("artifacts:\n  paths: [/etc/passwd]\n", "artifacts.paths[0]"),
        (
            "cache:\n  - key: k\n    paths: [a/../../b]\n",
            "cache[0].paths[0]",
        ),
    ] {
        let (r, _) = run(
            &agent,
            &spec(&format!("version: 1\nsteps:\n  - run: 'true'\n{tail}")),
        )
        .await;
        assert_eq!(r.status, JobStatus::Error, "{tail}");
        assert!(r.error.as_deref().unwrap_or("").contains(field), "{r:?}");
    }
    let mut job = spec("version: 1\nsteps:\n  - run: 'true'\n");
    job.artifacts = Some(gryt_agent::wire::ArtifactsSpec {
        paths: vec!["../../x".into()],
        when: Default::default(),
    });
    let (r, _) = run(&agent, &job).await;
    assert_eq!(r.status, JobStatus::Error);
    // Links out of the workspace are not followed.
    let pipeline = "version: 1\nsteps:\n  - run: mkdir dist && ln -s /etc/passwd dist/passwd && ln -s /etc out && echo ok > dist/ok\nartifacts:\n  paths: [dist/, out, out/passwd]\n";
    let (r, log) = run(&agent, &spec(pipeline)).await;
    assert_eq!(r.status, JobStatus::Success, "{r:?}");
    let paths: Vec<&str> = r.artifacts.iter().map(|a| a.path.as_str()).collect();
    assert_eq!(paths, ["dist/ok"]);
    assert!(
        log.contains("`dist/passwd` (from `dist/`) is a symbolic link"),
        "{log}"
    );
    assert!(log.contains("`out` is a symbolic link"), "{log}");
    agent.assert_clean().await;
}

#[tokio::test]
async fn limits_cap_artifacts_and_caches() {
    let g = garage();
    let prefix = Garage::prefix("limits");
    let agent = g
        .agent("store-limits", &prefix, |s| {
            s.store.max_artifact_bytes = 1000;
            s.store.max_cache_bytes = 1000;
        })
        .await;
    let pipeline = "version: 1\nsteps:\n  - run: mkdir big && head -c 2000 /dev/zero > big/f\nartifacts:\n  paths: [big/]\n";
    let (r, _) = run(&agent, &spec(pipeline)).await;
    assert_eq!(r.status, JobStatus::Error);
    assert!(r.error.unwrap().contains("store.max_artifact_bytes"));
    let pipeline = "version: 1\nsteps:\n  - run: mkdir big && head -c 2000 /dev/zero > big/f\ncache:\n  - key: big\n    paths: [big]\n";
    let (r, log) = run(&agent, &trusted(pipeline, None)).await;
    assert_eq!(
        r.status,
        JobStatus::Success,
        "a cache too large is not a failure"
    );
    assert!(
        log.contains("not saved") && log.contains("max_cache_bytes"),
        "{log}"
    );
    assert!(g.list(&format!("{prefix}/cache")).await.is_empty());
    agent.assert_clean().await;
}

#[tokio::test]
async fn store_credentials_never_reach_the_result_or_the_output() {
    let g = garage();
    let prefix = Garage::prefix("secret");
    let agent = g.agent("store-secret", &prefix, |_| {}).await;
    let mut job = spec(
        "version: 1\nsteps:\n  - run: echo \"key=$LEAK\" && echo data > out.txt\nartifacts:\n  paths: [out.txt]\n",
    );
    // A job that got hold of the secret key (here: given it) still cannot print it.
    job.env_vars.insert("LEAK".into(), g.secret.clone());
    let recorder = Recorder::default();
    let result = agent
        .executor
        .run(&job, &recorder, &JobControl::new())
        .await;
    assert_eq!(result.status, JobStatus::Success, "{result:?}");
    assert_eq!(result.artifacts.len(), 1);
    let json = serde_json::to_string(&result).unwrap();
    let output = String::from_utf8_lossy(&recorder.stream(OutputStream::Stdout)).into_owned()
        + &String::from_utf8_lossy(&recorder.stream(OutputStream::Stderr));
    for text in [&json, &output] {
        assert!(!text.contains(&g.secret), "the secret key leaked: {text}");
    }
    assert!(output.contains("key=[MASKED]"), "{output}");
    agent.assert_clean().await;
}

/// `gryt-agent check` proves the store works (a write, read and delete) and fails on bad
/// credentials, without ever printing the secret key.
#[tokio::test]
async fn check_verifies_store_access() {
    let g = garage();
    let image = support::test_image().await;
    let state = tempfile::tempdir().unwrap();
    let prefix = Garage::prefix("check");
    let run = |secret: &str| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_gryt-agent"));
        cmd.arg("check")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("GRYT_PUSH", "true")
            .env("AGENT_API_KEY", "0123456789abcdef0123456789abcdef")
            .env("GRYT_DOCKER_IMAGE", &image)
            .env("GRYT_PULL_POLICY", "never")
            .env("GRYT_STATE_DIR", state.path())
            .env("GRYT_STORE_URL", format!("s3://{}/{prefix}", g.bucket))
            .env("GRYT_STORE_ENDPOINT", &g.endpoint)
            .env("GRYT_STORE_REGION", &g.region)
            .env("GRYT_STORE_ALLOW_HTTP", "true")
            .env("GRYT_STORE_RETRIES", "0")
            .env("AWS_ACCESS_KEY_ID", &g.key_id)
            .env("AWS_SECRET_ACCESS_KEY", secret);
        cmd
    };
    let mut good = run(&g.secret);
    let out = tokio::task::spawn_blocking(move || good.output().unwrap())
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{text}");
    assert!(text.contains("[ok]   object store s3://"), "{text}");
    assert!(
        g.list(&prefix).await.is_empty(),
        "the probe object is deleted"
    );

    let wrong = "wrong-secret-key-0123456789abcdefXYZ";
    let mut bad = run(wrong);
    let out = tokio::task::spawn_blocking(move || bad.output().unwrap())
        .await
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("[FAIL] object store"), "{text}");
    assert!(!text.contains(wrong), "the secret key was printed: {text}");
}

/// `gryt-agent exec --json` uploads artifacts (listed in its result) and, as a local run,
/// writes caches.
#[tokio::test]
async fn exec_uploads_artifacts_and_saves_caches() {
    let g = garage();
    let image = support::test_image().await;
    let dir = tempfile::tempdir().unwrap();
    let prefix = Garage::prefix("exec");
    let pipeline = dir.path().join("pipeline.yml");
    std::fs::write(
        &pipeline,
        "version: 1\nsteps:\n  - run: mkdir -p out cachedir && echo built > out/app && echo c > cachedir/c\nartifacts:\n  paths: [out/]\ncache:\n  - key: exec\n    paths: [cachedir]\n",
    )
    .unwrap();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_gryt-agent"));
    cmd.arg("exec")
        .arg("--json")
        .arg(&pipeline)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("GRYT_DOCKER_IMAGE", &image)
        .env("GRYT_PULL_POLICY", "never")
        .env("GRYT_STATE_DIR", dir.path().join("state"))
        .env("GRYT_STORE_URL", format!("s3://{}/{prefix}", g.bucket))
        .env("GRYT_STORE_ENDPOINT", &g.endpoint)
        .env("GRYT_STORE_REGION", &g.region)
        .env("GRYT_STORE_ALLOW_HTTP", "true")
        .env("AWS_ACCESS_KEY_ID", &g.key_id)
        .env("AWS_SECRET_ACCESS_KEY", &g.secret);
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{stderr}");
    let result: JobResult = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(result.artifacts.len(), 1, "{result:?}");
    assert_eq!(result.artifacts[0].path, "out/app");
    assert_eq!(&g.get(&result.artifacts[0].url).await[..], b"built\n");
    assert!(stderr.contains("cache `exec`: saved"), "{stderr}");
    assert_eq!(g.list(&format!("{prefix}/cache")).await.len(), 1);
    assert!(
        !stderr.contains(&g.secret) && !String::from_utf8_lossy(&out.stdout).contains(&g.secret)
    );
}

impl Garage {
    /// The agent's environment for this store under `prefix`.
    fn env(&self, prefix: &str) -> Vec<(&'static str, String)> {
        vec![
            ("GRYT_STORE_URL", format!("s3://{}/{prefix}", self.bucket)),
            ("GRYT_STORE_ENDPOINT", self.endpoint.clone()),
            ("GRYT_STORE_REGION", self.region.clone()),
            ("GRYT_STORE_ALLOW_HTTP", "true".into()),
            ("AWS_ACCESS_KEY_ID", self.key_id.clone()),
            ("AWS_SECRET_ACCESS_KEY", self.secret.clone()),
        ]
    }
}

fn artifact_job(id: i64) -> serde_json::Value {
    serde_json::json!({
        "job_id": id,
        "pipeline_b64": b64("version: 1\nsteps:\n  - run: mkdir out && echo pushed > out/app\n"),
        "artifacts": {"paths": ["out/"], "when": "always"},
    })
}

/// Push responses and pull completions carry the same `artifacts` as `exec`; the agent's log
/// and the streamed job log never show the secret key.
#[tokio::test]
async fn push_and_pull_results_carry_artifacts() {
    use support::process::Agent;
    let g = garage();
    let prefix = Garage::prefix("modes");
    let env = g.env(&prefix);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();

    let agent = Agent::push("store-push", &env).await;
    let response = agent
        .execute(
            Some(support::process::push::KEY),
            artifact_job(11).to_string(),
        )
        .await;
    let result: JobResult = response.json().await.unwrap();
    assert_eq!(result.status, JobStatus::Success, "{result:?}");
    assert_eq!(result.artifacts.len(), 1, "{result:?}");
    assert_eq!(&g.get(&result.artifacts[0].url).await[..], b"pushed\n");
    assert!(!agent.log_text().contains(&g.secret));
    drop(agent);

    let api = fake_api::FakeApi::start(support::process::pull::KEY, 30).await;
    api.push_job(artifact_job(12));
    let mut agent = Agent::pull("store-pull", &api.url, &["--once"], &env).await;
    assert_eq!(
        agent.wait_exit(std::time::Duration::from_secs(120)).await,
        0,
        "{}",
        agent.log_text()
    );
    let record = api.job(12);
    let done = record.completion.clone().expect("no completion");
    assert_eq!(done["status"], "success", "{done}");
    assert_eq!(done["artifacts"][0]["path"], "out/app", "{done}");
    assert_eq!(
        done["artifacts"][0]["url"],
        format!("s3://{}/{prefix}/artifacts/12/out/app", g.bucket)
    );
    assert!(record.log.contains("artifact out/app"), "{}", record.log);
    assert!(!record.log.contains(&g.secret) && !agent.log_text().contains(&g.secret));
}
