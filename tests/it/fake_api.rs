//! A conformance fake of the main API's pull protocol, written from the server rules of
//! `docs/protocol.md` (not from the agent's client): lease long poll, label matching (the
//! reserved `gryt-conformance` label), lease TTL and expiry, a grace period before an expired job
//! is leased again, start/heartbeat/logs/complete with lease checks (404 unknown, 409 not this
//! lease or job finished, 410 expired, revoked or cancelled), `committed` semantics and logs per
//! lease, idempotent start and complete, the 1 MiB chunk limit. `gryt-agent conformance` passes
//! every rule against it (R8 needs `set_relet_started(true)`; by default a started job whose
//! lease expired ends as lost, which the rules allow and the crash suite relies on). With
//! `set_requeue_run_again(true)` an `error` completion saying "run it again" queues the job again,
//! as a server may. It records every request and has switchable faults, counted ones ("the
//! next N calls") and random ones (a rate of 5xx answers and dropped connections, from a seeded
//! generator so a run can be repeated), and [`Broken`] rules for the checker to catch.
#![allow(dead_code)]

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{Value, json};

pub const PREFIX: &str = "/api/v1/agent";

/// One request as the fake saw it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub call: String,
    pub job_id: Option<i64>,
    pub at: Instant,
    pub body: Value,
    pub authorization: Option<String>,
    pub user_agent: Option<String>,
    /// The status the fake answered (0 when it dropped the connection unanswered).
    pub status: u16,
    /// The fake applied the call (answer `status`) but dropped the connection instead of
    /// answering: the agent cannot know whether it got through.
    pub answer_dropped: bool,
}

/// Switchable misbehaviour. Counters are "the next N calls of that kind".
#[derive(Debug, Default, Clone)]
pub struct Faults {
    /// call name → how many of its next requests get a 503.
    pub errors: HashMap<String, u32>,
    /// Sent as `Retry-After` with every injected 503.
    pub retry_after: Option<u64>,
    /// call name → how many of its next requests have their connection dropped unanswered.
    pub drops: HashMap<String, u32>,
    /// Every answer is delayed this long.
    pub slow: Option<Duration>,
    /// How many of the next log answers report (and keep) only half of what was committed.
    pub lower_committed: u32,
    /// Jobs whose heartbeat says `cancel: true`.
    pub cancel: HashSet<i64>,
    /// Jobs cancelled before they started: their `start` answers 410 (R3) and they are not
    /// leased again.
    pub cancel_before_start: HashSet<i64>,
    /// Jobs whose lease is revoked: every call for them answers 410.
    pub revoke: HashSet<i64>,
    /// Jobs whose start answers 409.
    pub refuse_start: HashSet<i64>,
    /// Every complete answers 503.
    pub complete_down: bool,
    /// Every request answers 401.
    pub unauthorized: bool,
    /// Jobs whose complete answers 503.
    pub refuse_complete: HashSet<i64>,
    /// Share (0.0–1.0) of all requests answered 503 at random.
    pub error_rate: f64,
    /// Share (0.0–1.0) of all requests whose connection is dropped at random. For job calls half
    /// of these are dropped after the call took effect (the answer is lost); `lease` is always
    /// dropped before (a lost lease answer would only delay the job by a TTL and its grace).
    pub drop_rate: f64,
    /// `lease` answers 204 at once, whatever the wait asked for.
    pub instant_204: bool,
    /// `lease` answers 200 with an endless body.
    pub endless_lease_answer: bool,
    /// `logs` keeps nothing and answers what it already had.
    pub stall_logs: bool,
    /// How many of the next log answers claim 1000 bytes more than the server holds.
    pub overshoot_committed: u32,
    /// Every complete answers 400 (a final refusal).
    pub reject_complete: bool,
    /// Server rules this fake breaks on purpose, for the conformance checker to catch.
    pub broken: Broken,
    /// The key is bound to this agent id: a lease from another id gets 403 (R1).
    pub key_bound_to: Option<String>,
}

/// Rules of `docs/protocol.md` the fake can be told to break (all kept by default).
#[derive(Debug, Default, Clone, Copy)]
pub struct Broken {
    /// R2: `lease` answers 204 at once instead of holding the long poll.
    pub poll_at_once: bool,
    /// R3: a second `start` with the same lease answers 409.
    pub start_not_idempotent: bool,
    /// R6: every log chunk is appended whatever its offset (repeats and gaps included).
    pub logs_any_offset: bool,
    /// R11: an expired job is leased again as soon as its TTL ends, without a grace period.
    pub no_grace: bool,
    /// R14: labels are ignored: any job goes to any agent.
    pub ignore_labels: bool,
}

/// The label reserved for conformance jobs: an agent that sends it gets only jobs carrying it.
pub const CONFORMANCE_LABEL: &str = "gryt-conformance";
/// The grace period after a lease's TTL before its job is leased again, unless changed.
pub const GRACE: Duration = Duration::from_secs(5);
/// The largest `data` of a log chunk, in bytes; a larger one gets 413.
pub const MAX_CHUNK: usize = 1024 * 1024;

/// How many faults were injected, by kind.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct FaultCounts {
    /// 503 answers (counted and random).
    pub errors: u64,
    /// Connections dropped before the call took effect.
    pub drops_before: u64,
    /// Connections dropped after the call took effect (answer lost).
    pub drops_after: u64,
}

#[derive(Debug, Clone)]
struct LeaseInfo {
    job_id: i64,
    expires: Instant,
}

/// A job waiting in the queue, with the labels an agent must have to get it.
#[derive(Debug, Clone)]
struct Queued {
    spec: Value,
    labels: Vec<String>,
}

/// What the fake knows of a job.
#[derive(Debug, Clone, Default)]
pub struct JobRecord {
    /// The current (latest) lease.
    pub lease_id: Option<String>,
    /// Started under the current lease.
    pub started: bool,
    /// The log of the current lease (a job leased again starts a new one).
    pub log: String,
    /// How many times the job was leased.
    pub leases: u32,
    /// Its lease expired after it started and it is not leased again (`relet_started` off):
    /// the server ended it as lost.
    pub lost: bool,
    /// The accepted completion (the first one).
    pub completion: Option<Value>,
    /// How many completes were answered 200 (repeats included).
    pub completes_accepted: u32,
    /// The `error` completions saying "run it again" that queued the job again
    /// (`requeue_run_again`), each with the log of its lease.
    pub handed_back: Vec<(Value, String)>,
}

#[derive(Default)]
struct Inner {
    key: String,
    ttl: u64,
    grace: Duration,
    /// A started job whose lease expired is leased again (else it ends as lost).
    relet_started: bool,
    /// An `error` completion saying "run it again" queues the job again (else it is final).
    requeue_run_again: bool,
    /// Leases ended by such a completion: a repeat of it answers 200, any other call 409.
    handed_back: HashSet<String>,
    queue: VecDeque<Queued>,
    /// What each job was queued with, to queue it again when its lease expires.
    specs: HashMap<i64, Queued>,
    leases: HashMap<String, LeaseInfo>,
    jobs: HashMap<i64, JobRecord>,
    requests: Vec<Recorded>,
    faults: Faults,
    running: HashSet<i64>,
    max_running: usize,
    injected: FaultCounts,
    /// Jobs queued again after their lease expired (and not leased since).
    requeued: HashSet<i64>,
    /// splitmix64 state for the random faults.
    rng: u64,
}

impl Inner {
    /// A uniform number in [0, 1) (splitmix64).
    fn roll(&mut self) -> f64 {
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[derive(Clone)]
pub struct FakeApi {
    inner: Arc<Mutex<Inner>>,
    pub url: String,
}

impl FakeApi {
    /// Starts the fake on a free loopback port; leases last `ttl` seconds.
    pub async fn start(key: &str, ttl: u64) -> FakeApi {
        let inner = Arc::new(Mutex::new(Inner {
            key: key.to_owned(),
            ttl,
            grace: GRACE,
            rng: 0x5EED,
            ..Default::default()
        }));
        let app = Router::new()
            .route(&format!("{PREFIX}/lease"), post(lease))
            .route(
                &format!("{PREFIX}/jobs/{{job_id}}/{{call}}"),
                post(job_call),
            )
            // A chunk of 1 MiB of `data` can be up to six times that once JSON-escaped.
            .layer(axum::extract::DefaultBodyLimit::max(8 * MAX_CHUNK))
            .with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        FakeApi { inner, url }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a job (a JobSpec as JSON) that any agent may get.
    pub fn push_job(&self, job: Value) {
        self.push_labelled(job, &[]);
    }

    /// Queues a job for agents that have all of `labels`.
    pub fn push_labelled(&self, job: Value, labels: &[&str]) {
        let queued = Queued {
            spec: job,
            labels: labels.iter().map(|l| l.to_string()).collect(),
        };
        let mut g = self.lock();
        g.specs
            .insert(queued.spec["job_id"].as_i64().unwrap(), queued.clone());
        g.queue.push_back(queued);
    }

    /// Queues the jobs `gryt-agent conformance` expects (docs/protocol.md), ids from `first`.
    pub fn push_conformance_jobs(&self, first: i64) {
        for id in first..first + 3 {
            self.push_labelled(
                json!({"job_id": id,
                       "pipeline_b64": "dmVyc2lvbjogMQpzdGVwczoKICAtIHJ1bjogInRydWUiCg==",
                       "env_vars": {"GRYT_CONFORMANCE": "1"}}),
                &[CONFORMANCE_LABEL],
            );
        }
    }

    /// The grace period after a TTL before an expired job is leased again.
    pub fn set_grace(&self, grace: Duration) {
        self.lock().grace = grace;
    }

    /// Whether a started job whose lease expired is leased again (off: it ends as lost).
    pub fn set_relet_started(&self, relet: bool) {
        self.lock().relet_started = relet;
    }

    /// Whether an `error` completion whose error ends with "run it again" (the agent hands back
    /// a job it could not carry on, `docs/protocol.md`) queues the job again at once, as a
    /// server may: the job is not completed then, and its next lease starts a new log.
    pub fn set_requeue_run_again(&self, requeue: bool) {
        self.lock().requeue_run_again = requeue;
    }

    pub fn faults(&self, f: impl FnOnce(&mut Faults)) {
        f(&mut self.lock().faults);
    }

    /// Seeds the generator behind the random faults.
    pub fn seed(&self, seed: u64) {
        self.lock().rng = seed;
    }

    /// The faults injected so far.
    pub fn injected(&self) -> FaultCounts {
        self.lock().injected
    }

    /// Whether the job's current lease has run out of time without a completion (every call
    /// with it gets 410; the job is leased again once the grace period has passed too).
    pub fn lease_expired(&self, job_id: i64) -> bool {
        let g = self.lock();
        let Some(job) = g.jobs.get(&job_id) else {
            return false;
        };
        job.completion.is_none()
            && job
                .lease_id
                .as_ref()
                .and_then(|l| g.leases.get(l))
                .is_some_and(|info| Instant::now() > info.expires)
    }

    /// Ends the job's current lease now, as if its TTL had run out unrenewed: every call with
    /// it answers 410 (the job is then treated as any expired one).
    pub fn expire_lease(&self, job_id: i64) {
        let mut g = self.lock();
        let lease = g.jobs.get(&job_id).and_then(|j| j.lease_id.clone());
        if let Some(info) = lease.and_then(|l| g.leases.get_mut(&l)) {
            info.expires = Instant::now() - Duration::from_millis(1);
        }
    }

    /// Forgets the job's current lease (a server that lost it): every call with it answers 404
    /// and the job is never leased again.
    pub fn forget_lease(&self, job_id: i64) {
        let mut g = self.lock();
        if let Some(lease) = g.jobs.get(&job_id).and_then(|j| j.lease_id.clone()) {
            g.leases.remove(&lease);
        }
    }

    /// When the job's current lease expires by the fake's clock.
    pub fn lease_expires(&self, job_id: i64) -> Option<Instant> {
        let g = self.lock();
        let lease = g.jobs.get(&job_id)?.lease_id.clone()?;
        g.leases.get(&lease).map(|l| l.expires)
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.lock().requests.clone()
    }

    pub fn count(&self, call: &str) -> usize {
        self.lock()
            .requests
            .iter()
            .filter(|r| r.call == call)
            .count()
    }

    pub fn job(&self, id: i64) -> JobRecord {
        self.lock().jobs.get(&id).cloned().unwrap_or_default()
    }

    pub fn max_running(&self) -> usize {
        self.lock().max_running
    }

    pub fn queued(&self) -> usize {
        self.lock().queue.len()
    }

    /// Waits until `cond` holds (panics after `timeout`).
    pub async fn wait_for(&self, what: &str, timeout: Duration, cond: impl Fn(&FakeApi) -> bool) {
        let until = Instant::now() + timeout;
        while !cond(self) {
            assert!(Instant::now() < until, "timed out waiting for: {what}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

type Shared = Arc<Mutex<Inner>>;

fn lock(s: &Shared) -> std::sync::MutexGuard<'_, Inner> {
    s.lock().unwrap_or_else(|p| p.into_inner())
}

fn header(h: &HeaderMap, name: &str) -> Option<String> {
    h.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned)
}

/// What [`common`] decided for a request.
enum Verdict {
    /// Answer this instead of the real answer.
    Answer(Response),
    /// Handle the call (recorded at this index); then drop the connection instead of
    /// answering when `true`.
    Handle(usize, bool),
}

const DROP: &str = "fake API: dropping the connection (injected fault)";

/// Makes the panics that drop connections silent (other panics are reported as usual).
pub fn quiet_injected_drops() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if info.payload().downcast_ref::<&str>() != Some(&DROP) {
                default(info);
            }
        }));
    });
}

/// Records the request and applies the faults common to every call.
async fn common(
    s: &Shared,
    call: &str,
    job_id: Option<i64>,
    headers: &HeaderMap,
    body: &Value,
) -> Verdict {
    let slow = lock(s).faults.slow;
    if let Some(slow) = slow {
        tokio::time::sleep(slow).await;
    }
    let mut g = lock(s);
    let auth = header(headers, "authorization");
    let mut rec = Recorded {
        call: call.to_owned(),
        job_id,
        at: Instant::now(),
        body: body.clone(),
        authorization: auth.clone(),
        user_agent: header(headers, "user-agent"),
        status: 0,
        answer_dropped: false,
    };
    let mut drop_after = false;
    let drop_now = if let Some(n) = g.faults.drops.get_mut(call).filter(|n| **n > 0) {
        *n -= 1;
        true
    } else if g.faults.drop_rate > 0.0 && g.roll() < g.faults.drop_rate {
        drop_after = call != "lease" && g.roll() < 0.5;
        !drop_after
    } else {
        false
    };
    if drop_now {
        g.injected.drops_before += 1;
        g.requests.push(rec);
        drop(g);
        // A panicking handler makes hyper close the connection without an answer.
        std::panic::panic_any(DROP);
    }
    let expected = format!("Bearer {}", g.key);
    let answer = if g.faults.unauthorized || auth.as_deref() != Some(expected.as_str()) {
        Some(
            (
                StatusCode::UNAUTHORIZED,
                axum::Json(json!({"detail": "invalid agent key"})),
            )
                .into_response(),
        )
    } else if let Some(n) = g.faults.errors.get_mut(call).filter(|n| **n > 0) {
        *n -= 1;
        g.injected.errors += 1;
        Some(unavailable(g.faults.retry_after))
    } else if (call == "complete"
        && (g.faults.complete_down
            || job_id.is_some_and(|id| g.faults.refuse_complete.contains(&id))))
        || (g.faults.error_rate > 0.0 && g.roll() < g.faults.error_rate)
    {
        g.injected.errors += 1;
        Some(unavailable(g.faults.retry_after))
    } else {
        None
    };
    if let Some(a) = &answer {
        rec.status = a.status().as_u16();
        drop_after = false;
    }
    g.requests.push(rec);
    match answer {
        Some(a) => Verdict::Answer(a),
        None => Verdict::Handle(g.requests.len() - 1, drop_after),
    }
}

/// An error answer with the JSON body the rules ask for.
fn detail(status: StatusCode, message: &str) -> Response {
    (status, axum::Json(json!({"detail": message}))).into_response()
}

fn unavailable(retry_after: Option<u64>) -> Response {
    let mut r = (StatusCode::SERVICE_UNAVAILABLE, "injected outage").into_response();
    if let Some(after) = retry_after {
        r.headers_mut()
            .insert("retry-after", after.to_string().parse().unwrap());
    }
    r
}

/// Records the answer given to request number `index`.
fn set_status(s: &Shared, index: usize, status: StatusCode) {
    if let Some(rec) = lock(s).requests.get_mut(index) {
        rec.status = status.as_u16();
    }
}

async fn lease(State(s): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    let body: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return (StatusCode::UNPROCESSABLE_ENTITY, e.to_string()).into_response(),
    };
    let index = match common(&s, "lease", None, &headers, &body).await {
        Verdict::Answer(answer) => return answer,
        Verdict::Handle(index, _) => index,
    };
    for field in [
        "agent_id",
        "hostname",
        "version",
        "labels",
        "capacity",
        "wait_seconds",
    ] {
        if body.get(field).is_none() {
            return (StatusCode::UNPROCESSABLE_ENTITY, format!("{field} missing")).into_response();
        }
    }
    let bound = lock(&s).faults.key_bound_to.clone();
    if let Some(bound) = bound.filter(|b| body["agent_id"].as_str() != Some(b.as_str())) {
        set_status(&s, index, StatusCode::FORBIDDEN);
        return detail(
            StatusCode::FORBIDDEN,
            &format!("this key belongs to agent {bound}"),
        );
    }
    if lock(&s).faults.endless_lease_answer {
        set_status(&s, index, StatusCode::OK);
        let chunk = Bytes::from(vec![b' '; 64 * 1024]);
        let endless = futures_util::stream::repeat_with(move || {
            Ok::<_, std::convert::Infallible>(chunk.clone())
        });
        return (StatusCode::OK, axum::body::Body::from_stream(endless)).into_response();
    }
    let capacity = body["capacity"].as_u64().unwrap_or(0);
    let labels: Vec<String> = body["labels"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|l| l.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    let mut wait = Duration::from_secs(body["wait_seconds"].as_u64().unwrap_or(0));
    if lock(&s).faults.instant_204 {
        wait = Duration::ZERO;
    }
    let until = Instant::now() + wait;
    loop {
        {
            let mut g = lock(&s);
            requeue_expired(&mut g);
            let ignore = g.faults.broken.ignore_labels;
            let pick = g
                .queue
                .iter()
                .position(|q| ignore || labels_match(&q.labels, &labels));
            if capacity > 0
                && let Some(job) = pick.and_then(|i| g.queue.remove(i))
            {
                let job = job.spec;
                let job_id = job["job_id"].as_i64().unwrap();
                let lease_id = format!("lease-{}", uuid::Uuid::new_v4());
                let ttl = g.ttl;
                g.leases.insert(
                    lease_id.clone(),
                    LeaseInfo {
                        job_id,
                        expires: Instant::now() + Duration::from_secs(ttl),
                    },
                );
                g.requeued.remove(&job_id);
                let rec = g.jobs.entry(job_id).or_default();
                // Logs are per lease: a job leased again starts a new log, and a new start.
                rec.lease_id = Some(lease_id.clone());
                rec.started = false;
                rec.log.clear();
                rec.leases += 1;
                drop(g);
                set_status(&s, index, StatusCode::OK);
                return (
                    StatusCode::OK,
                    axum::Json(json!({"lease_id": lease_id, "lease_ttl_seconds": ttl, "job": job})),
                )
                    .into_response();
            }
            if g.faults.broken.poll_at_once {
                drop(g);
                set_status(&s, index, StatusCode::NO_CONTENT);
                return StatusCode::NO_CONTENT.into_response();
            }
        }
        if Instant::now() >= until {
            set_status(&s, index, StatusCode::NO_CONTENT);
            return StatusCode::NO_CONTENT.into_response();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A job goes to an agent that has all of its labels; an agent with the conformance label gets
/// only jobs that carry it.
fn labels_match(job: &[String], agent: &[String]) -> bool {
    let reserved = |l: &[String]| l.iter().any(|l| l == CONFORMANCE_LABEL);
    job.iter().all(|l| agent.contains(l)) && (!reserved(agent) || reserved(job))
}

/// Queues again the jobs whose lease expired more than the grace period ago: a job that never
/// started always, a started one only with `relet_started` (else it ends as lost). Revoked and
/// cancelled jobs are not queued again.
fn requeue_expired(g: &mut Inner) {
    let grace = if g.faults.broken.no_grace {
        Duration::ZERO
    } else {
        g.grace
    };
    let now = Instant::now();
    let mut due = Vec::new();
    for (id, job) in &g.jobs {
        let expired = job
            .lease_id
            .as_ref()
            .and_then(|l| g.leases.get(l))
            .is_some_and(|info| now > info.expires + grace);
        if expired
            && job.completion.is_none()
            && !job.lost
            && !g.requeued.contains(id)
            && !g.faults.revoke.contains(id)
            && !g.faults.cancel.contains(id)
            && !g.faults.cancel_before_start.contains(id)
        {
            due.push((*id, job.started));
        }
    }
    for (id, started) in due {
        if started && !g.relet_started {
            g.jobs.get_mut(&id).unwrap().lost = true;
            g.running.remove(&id);
        } else if let Some(spec) = g.specs.get(&id).cloned() {
            g.running.remove(&id);
            g.requeued.insert(id);
            g.queue.push_front(spec);
        }
    }
}

/// Checks that `lease_id` holds `job_id` now: 404 unknown lease, 409 another job's or a
/// superseded lease, 410 expired or revoked.
fn check_lease(g: &mut Inner, job_id: i64, lease_id: &str) -> Result<(), StatusCode> {
    let Some(info) = g.leases.get(lease_id).cloned() else {
        return Err(StatusCode::NOT_FOUND);
    };
    if info.job_id != job_id {
        return Err(StatusCode::CONFLICT);
    }
    if g.jobs.get(&job_id).and_then(|j| j.lease_id.as_deref()) != Some(lease_id) {
        return Err(StatusCode::CONFLICT);
    }
    if g.faults.revoke.contains(&job_id) || Instant::now() > info.expires {
        g.running.remove(&job_id);
        return Err(StatusCode::GONE);
    }
    Ok(())
}

async fn job_call(
    State(s): State<Shared>,
    Path((job_id, call)): Path<(i64, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let body: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return (StatusCode::UNPROCESSABLE_ENTITY, e.to_string()).into_response(),
    };
    let (index, drop_after) = match common(&s, &call, Some(job_id), &headers, &body).await {
        Verdict::Answer(answer) => return answer,
        Verdict::Handle(index, drop_after) => (index, drop_after),
    };
    let answer = job_answer(&s, job_id, &call, &body);
    set_status(&s, index, answer.status());
    if drop_after {
        let mut g = lock(&s);
        g.requests[index].answer_dropped = true;
        g.injected.drops_after += 1;
        drop(g);
        std::panic::panic_any(DROP);
    }
    answer
}

/// The real answer to a job call (after the common checks).
fn job_answer(s: &Shared, job_id: i64, call: &str, body: &Value) -> Response {
    let Some(lease_id) = body["lease_id"].as_str().map(str::to_owned) else {
        return (StatusCode::UNPROCESSABLE_ENTITY, "lease_id missing").into_response();
    };
    let mut g = lock(s);
    if g.handed_back.contains(&lease_id) {
        return match call {
            "complete" => StatusCode::OK.into_response(),
            _ => detail(StatusCode::CONFLICT, "job handed back under this lease"),
        };
    }
    // A repeated complete of an already completed job with the same lease is answered 200.
    let done = g
        .jobs
        .get(&job_id)
        .is_some_and(|j| j.completion.is_some() && j.lease_id.as_deref() == Some(&lease_id));
    if call == "complete" && done {
        g.jobs.get_mut(&job_id).unwrap().completes_accepted += 1;
        return StatusCode::OK.into_response();
    }
    if done {
        return detail(StatusCode::CONFLICT, "job already completed");
    }
    if let Err(status) = check_lease(&mut g, job_id, &lease_id) {
        return detail(status, "lease not held");
    }
    let ttl = g.ttl;
    match call {
        "start" => {
            let started = g.jobs[&job_id].started;
            if g.faults.refuse_start.contains(&job_id)
                || (started && g.faults.broken.start_not_idempotent)
            {
                detail(StatusCode::CONFLICT, "start refused")
            } else if !started && g.faults.cancel_before_start.contains(&job_id) {
                // Cancelled before it started: the lease is over, the job will not run.
                detail(StatusCode::GONE, "job cancelled")
            } else if body["started_at"].as_str().is_none() {
                (StatusCode::UNPROCESSABLE_ENTITY, "started_at missing").into_response()
            } else {
                g.jobs.get_mut(&job_id).unwrap().started = true;
                g.running.insert(job_id);
                g.max_running = g.max_running.max(g.running.len());
                StatusCode::OK.into_response()
            }
        }
        "heartbeat" => {
            g.leases.get_mut(&lease_id).unwrap().expires =
                Instant::now() + Duration::from_secs(ttl);
            let cancel = g.faults.cancel.contains(&job_id);
            axum::Json(json!({"cancel": cancel, "lease_ttl_seconds": ttl})).into_response()
        }
        "logs" => {
            let (Some(offset), Some(data)) = (body["offset"].as_u64(), body["data"].as_str())
            else {
                return (StatusCode::UNPROCESSABLE_ENTITY, "offset and data required")
                    .into_response();
            };
            if data.len() > MAX_CHUNK {
                return detail(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    &format!("data is {} bytes; at most {MAX_CHUNK}", data.len()),
                );
            }
            if g.faults.stall_logs {
                let committed = g.jobs[&job_id].log.len();
                return axum::Json(json!({"committed": committed})).into_response();
            }
            let overshoot = g.faults.overshoot_committed > 0;
            if overshoot {
                g.faults.overshoot_committed -= 1;
            }
            let lower = g.faults.lower_committed > 0;
            if lower {
                g.faults.lower_committed -= 1;
            }
            let any_offset = g.faults.broken.logs_any_offset;
            let job = g.jobs.get_mut(&job_id).unwrap();
            let committed = job.log.len() as u64;
            // Only what continues the log is kept: a chunk past `committed` is ignored, the
            // part of a chunk the server already has is skipped.
            if any_offset {
                job.log.push_str(data);
            } else if offset <= committed {
                let skip = (committed - offset) as usize;
                if skip < data.len() {
                    match data.get(skip..) {
                        Some(rest) => job.log.push_str(rest),
                        None => {
                            return (
                                StatusCode::UNPROCESSABLE_ENTITY,
                                "offset splits a character",
                            )
                                .into_response();
                        }
                    }
                }
            }
            if lower {
                // The server "lost" the second half of what it had (at a character boundary).
                let mut cut = job.log.len() / 2;
                while !job.log.is_char_boundary(cut) {
                    cut -= 1;
                }
                job.log.truncate(cut);
            }
            let extra = if overshoot { 1000 } else { 0 };
            axum::Json(json!({"committed": job.log.len() + extra})).into_response()
        }
        "complete" => {
            let missing: Vec<&str> = [
                "job_id",
                "status",
                "success",
                "exit_code",
                "stdout",
                "stderr",
                "duration_seconds",
                "started_at",
                "completed_at",
                "error",
                "steps",
                "log_bytes",
            ]
            .into_iter()
            .filter(|f| body.get(*f).is_none())
            .collect();
            if g.faults.reject_complete {
                (StatusCode::BAD_REQUEST, "complete refused (injected)").into_response()
            } else if !missing.is_empty() {
                (
                    StatusCode::UNPROCESSABLE_ENTITY,
                    format!("missing {missing:?}"),
                )
                    .into_response()
            } else if g.requeue_run_again && is_run_again(body) {
                hand_back(&mut g, job_id, &lease_id, body);
                StatusCode::OK.into_response()
            } else {
                g.running.remove(&job_id);
                let job = g.jobs.get_mut(&job_id).unwrap();
                job.completion = Some(body.clone());
                job.completes_accepted += 1;
                StatusCode::OK.into_response()
            }
        }
        _ => StatusCode::NOT_FOUND.into_response(),
    }
}

/// An `error` completion by which the agent hands a job back for another run.
fn is_run_again(body: &Value) -> bool {
    body["status"] == "error"
        && body["error"]
            .as_str()
            .is_some_and(|e| e.ends_with("run it again"))
}

/// Ends `lease_id` with the job not completed and queues the job again at once.
fn hand_back(g: &mut Inner, job_id: i64, lease_id: &str, body: &Value) {
    g.running.remove(&job_id);
    g.leases.remove(lease_id);
    g.handed_back.insert(lease_id.to_owned());
    let job = g.jobs.get_mut(&job_id).unwrap();
    let log = job.log.clone();
    job.handed_back.push((body.clone(), log));
    if let Some(spec) = g.specs.get(&job_id).cloned() {
        g.queue.push_front(spec);
    }
}
