//! A minimal fake of the pull API for the benchmark (long poll woken at once by an enqueue).

use super::*;

// A minimal fake of the pull API: long poll woken at once by an enqueue, timestamps of what the
// bench measures, log bytes counted (not kept). No lease checks: the agent is not under test here.

#[derive(Default)]
pub(crate) struct FakeState {
    pub(crate) queue: VecDeque<Value>,
    pub(crate) enqueued: HashMap<i64, Instant>,
    pub(crate) started: HashMap<i64, Instant>,
    pub(crate) completed: HashMap<i64, (Instant, String)>,
    pub(crate) committed: HashMap<i64, u64>,
    /// Lease requests held open right now.
    pub(crate) parked: usize,
}

pub(crate) struct FakeInner {
    pub(crate) state: Mutex<FakeState>,
    /// Wakes parked lease requests.
    pub(crate) queued: tokio::sync::Notify,
    /// Bumped on every change the bench may wait for.
    pub(crate) tick: tokio::sync::watch::Sender<u64>,
}

#[derive(Clone)]
pub(crate) struct FakeApi {
    pub(crate) inner: Arc<FakeInner>,
    pub(crate) url: String,
}

impl FakeInner {
    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, FakeState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn changed(&self) {
        self.tick.send_modify(|n| *n += 1);
    }
}

impl FakeApi {
    pub(crate) async fn start() -> anyhow::Result<FakeApi> {
        let inner = Arc::new(FakeInner {
            state: Mutex::new(FakeState::default()),
            queued: tokio::sync::Notify::new(),
            tick: tokio::sync::watch::channel(0).0,
        });
        let app = Router::new()
            .route("/api/v1/agent/lease", post(fake_lease))
            .route("/api/v1/agent/jobs/{job_id}/{call}", post(fake_job_call))
            .layer(DefaultBodyLimit::max(16 * MIB as usize))
            .with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        tokio::spawn(async move { axum::serve(listener, app).await });
        Ok(FakeApi { inner, url })
    }

    /// Queues a job running `pipeline` (YAML); returns its id.
    pub(crate) fn enqueue(&self, pipeline: &str) -> i64 {
        let id = next_id();
        let job = json!({"job_id": id, "pipeline_b64": b64(pipeline), "timeout_seconds": 3600});
        {
            let mut s = self.inner.lock();
            s.queue.push_back(job);
            s.enqueued.insert(id, Instant::now());
        }
        self.inner.queued.notify_waiters();
        id
    }

    pub(crate) fn parked(&self) -> usize {
        self.inner.lock().parked
    }

    /// Waits until `f` says something (at most `timeout`).
    pub(crate) async fn wait<T>(
        &self,
        what: &str,
        timeout: Duration,
        f: impl Fn(&FakeState) -> Option<T>,
    ) -> anyhow::Result<T> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut rx = self.inner.tick.subscribe();
        loop {
            if let Some(v) = f(&self.inner.lock()) {
                return Ok(v);
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {}
                _ => bail!("timed out after {timeout:?} waiting for {what}"),
            }
        }
    }

    /// Waits for job `id`'s completion; fails unless it succeeded.
    pub(crate) async fn completed(&self, id: i64, timeout: Duration) -> anyhow::Result<Instant> {
        let (at, status) = self
            .wait(&format!("job {id} to complete"), timeout, |s| {
                s.completed.get(&id).cloned()
            })
            .await?;
        if status != "success" {
            bail!("job {id} ended with status {status}");
        }
        Ok(at)
    }
}

pub(crate) fn b64(text: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(text)
}

pub(crate) async fn fake_lease(State(f): State<Arc<FakeInner>>, body: Bytes) -> Response {
    let body: Value = serde_json::from_slice(&body).unwrap_or_default();
    let wait = Duration::from_secs(body["wait_seconds"].as_u64().unwrap_or(0));
    let until = tokio::time::Instant::now() + wait;
    loop {
        let notified = f.queued.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if let Some(job) = f.lock().queue.pop_front() {
            let lease = format!("lease-{}", job["job_id"]);
            return axum::Json(json!({"lease_id": lease, "lease_ttl_seconds": 60, "job": job}))
                .into_response();
        }
        if tokio::time::Instant::now() >= until {
            return StatusCode::NO_CONTENT.into_response();
        }
        f.lock().parked += 1;
        f.changed();
        tokio::select! {
            _ = notified => {}
            _ = tokio::time::sleep_until(until) => {}
        }
        f.lock().parked -= 1;
        f.changed();
    }
}

#[derive(serde::Deserialize)]
pub(crate) struct Chunk {
    pub(crate) offset: u64,
    pub(crate) data: String,
}

pub(crate) async fn fake_job_call(
    State(f): State<Arc<FakeInner>>,
    UrlPath((job_id, call)): UrlPath<(i64, String)>,
    body: Bytes,
) -> Response {
    let now = Instant::now();
    let answer = match call.as_str() {
        "start" => {
            f.lock().started.insert(job_id, now);
            StatusCode::OK.into_response()
        }
        "heartbeat" => {
            axum::Json(json!({"cancel": false, "lease_ttl_seconds": 60})).into_response()
        }
        "logs" => {
            let Ok(chunk) = serde_json::from_slice::<Chunk>(&body) else {
                return StatusCode::UNPROCESSABLE_ENTITY.into_response();
            };
            let mut s = f.lock();
            let committed = s.committed.entry(job_id).or_default();
            if chunk.offset <= *committed {
                *committed = (*committed).max(chunk.offset + chunk.data.len() as u64);
            }
            axum::Json(json!({"committed": *committed})).into_response()
        }
        "complete" => {
            let body: Value = serde_json::from_slice(&body).unwrap_or_default();
            let status = body["status"].as_str().unwrap_or("?").to_owned();
            f.lock().completed.entry(job_id).or_insert((now, status));
            StatusCode::OK.into_response()
        }
        _ => StatusCode::NOT_FOUND.into_response(),
    };
    f.changed();
    answer
}

// ---------------------------------------------------------------------------------------------
