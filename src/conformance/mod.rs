//! The server conformance checker behind `gryt-agent conformance`: it plays an agent against a
//! main API and checks the server rules of `docs/protocol.md` ("Server rules") one by one, with
//! the three jobs the API team queued under the reserved `gryt-conformance` label. It runs
//! nothing: it only speaks the protocol, and it never asks for any other label.

mod flows;
pub mod http;
pub mod report;
mod session;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use secrecy::SecretString;
use tokio::time::Instant;

use self::flows::{c_expected_by, job_a, job_b_again, job_c_again, job_c_first_lease};
use self::http::Probe;
pub use self::report::{Report, Rule};
use self::session::{Held, Leased, Session};
use crate::api::ApiError;

/// The label the checker leases with; the server gives it only jobs carrying it (R14).
pub const LABEL: &str = "gryt-conformance";
/// The `env_vars` entry every conformance job carries: the checker refuses a job without it.
pub const MARKER: &str = "GRYT_CONFORMANCE";
/// How many conformance jobs a run needs.
pub const JOBS: usize = 3;
/// The shortest grace period after a TTL before an expired job is leased again (R11).
pub const MIN_GRACE: Duration = Duration::from_secs(5);
/// How long after a TTL the checker waits for the job to come back.
pub const MAX_GRACE: Duration = Duration::from_secs(120);
/// The longest lease TTL the checker works with (its run lasts about 1.3 TTL + the grace).
pub const MAX_TTL: Duration = Duration::from_secs(300);
/// `wait_seconds` of the checker's long polls once it holds its jobs.
const POLL_WAIT: u64 = 3;
/// How long the checker waits for the conformance jobs to come at all.
const JOBS_WAIT: Duration = Duration::from_secs(30);

/// Where and as whom to run.
pub struct Options {
    pub api_url: String,
    pub allow_insecure_http: bool,
    pub key: SecretString,
    pub ca_file: Option<PathBuf>,
    pub agent_id: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ConformanceError {
    #[error(transparent)]
    Api(#[from] ApiError),
    #[error("the API at {url} did not answer: {message}")]
    Unreachable { url: String, message: String },
}

/// Runs every check and returns the report; `Err` only when the server cannot be reached.
pub async fn run(options: &Options) -> Result<Report, ConformanceError> {
    let probe = Probe::new(
        &options.api_url,
        options.allow_insecure_http,
        &options.key,
        options.ca_file.as_deref(),
    )?;
    let session = Arc::new(Session::new(probe, options.agent_id.clone()));
    unknown_key(&session).await?;
    let Some([a, b, c]) = take_jobs(&session).await else {
        return Ok(into_report(session));
    };
    session.report().note(format!(
        "jobs: A={} B={} C={}, lease TTL {} s",
        a.job_id,
        b.job_id,
        c.job_id,
        a.ttl.as_secs()
    ));
    for first in ["the first start", "a second start right after it"] {
        let r = session.start(a.job_id, &a.lease_id).await;
        session.check(Rule::R3, r.is_success(), || {
            format!("{first} got {}", r.shown())
        });
    }
    let r = session
        .start(a.job_id, "gryt-conformance-no-such-lease")
        .await;
    session.check(Rule::R10, r.is_lost(), || {
        format!(
            "a start with a lease id the server never gave got {}",
            r.shown()
        )
    });
    let flow_a = tokio::spawn(job_a(session.clone(), a.clone()));
    let flow_c = tokio::spawn({
        let (s, c) = (session.clone(), c.clone());
        async move { job_c_first_lease(&s, &c).await }
    });
    watch(&session, &a, &b, &c, flow_c).await;
    let _ = flow_a.await;
    Ok(into_report(session))
}

fn into_report(session: Arc<Session>) -> Report {
    match Arc::try_unwrap(session) {
        Ok(s) => s.into_report(),
        Err(s) => s.report().clone(),
    }
}

/// R1: a lease with a key the server cannot know.
async fn unknown_key(s: &Session) -> Result<(), ConformanceError> {
    let r = s.probe.post_as_stranger("/lease", &s.lease_body(0)).await;
    if let Some(message) = &r.error {
        return Err(ConformanceError::Unreachable {
            url: s.probe.base().to_owned(),
            message: message.clone(),
        });
    }
    s.check(Rule::R1, r.status == 401, || {
        format!("a lease with an unknown key got {} (want 401)", r.shown())
    });
    let detail = r.body.get("detail").is_some_and(|d| d.is_string());
    s.check(Rule::R1, detail, || {
        format!(
            "the 401 has no JSON body with a `detail` string: {}",
            r.shown()
        )
    });
    let key = s.probe.stranger_key();
    s.check(Rule::R1, !r.text.contains(key), || {
        "the error repeats the key it was sent".into()
    });
    Ok(())
}

/// Leases the three conformance jobs. `None` when the run cannot go on (said in the report):
/// too few jobs came, or the server handed out a job that is not one.
async fn take_jobs(s: &Session) -> Option<[Held; JOBS]> {
    let deadline = Instant::now() + JOBS_WAIT;
    let mut held: Vec<Held> = Vec::new();
    while held.len() < JOBS && Instant::now() < deadline {
        let wait = deadline
            .saturating_duration_since(Instant::now())
            .as_secs()
            .max(1);
        match s.lease(wait).await {
            Leased::Job(job) if !job.conformance => {
                stray(s, &job).await;
                break;
            }
            Leased::Job(job) if job.ttl > MAX_TTL => {
                s.stop(format!(
                    "the lease TTL is {} s; the checker works with at most {} s (give conformance jobs a shorter TTL)",
                    job.ttl.as_secs(),
                    MAX_TTL.as_secs()
                ));
                held.push(job);
                break;
            }
            Leased::Job(job) => held.push(job),
            Leased::Empty(_) => {}
            Leased::Refused(reply) => {
                let hint = if reply.status == 403 {
                    " (a key bound to an agent id needs that id: --agent-id)"
                } else {
                    ""
                };
                s.stop(format!("a lease was refused: {}{hint}", reply.shown()));
                break;
            }
        }
    }
    if !s.stopped() && held.len() < JOBS {
        s.stop(format!(
            "{} of the {JOBS} conformance jobs came within {} s: queue {JOBS} jobs labelled `{LABEL}` (docs/protocol.md)",
            held.len(),
            JOBS_WAIT.as_secs()
        ));
    }
    if s.stopped() {
        for job in &held {
            s.give_back(job, "the conformance run stopped before using this job")
                .await;
        }
        return None;
    }
    held.try_into().ok()
}

/// A job without the conformance marker: it was handed to an agent that asked only for the
/// conformance label. It is completed as `error` without running, and leasing stops.
async fn stray(s: &Session, job: &Held) {
    s.check(Rule::R14, false, || {
        format!(
            "job {} (no `{MARKER}` in env_vars) was handed to an agent whose only label is `{LABEL}`",
            job.job_id
        )
    });
    s.stop(format!(
        "the server handed out job {}, which is not a conformance job; no more leases",
        job.job_id
    ));
    s.give_back(
        job,
        "gryt-agent conformance was given this job by mistake (it is not a conformance job) and did not run it: run it again",
    )
    .await;
}

/// Polls for work until B and C came back (or their time is up) and one poll held with no job
/// (R2), handling what comes.
async fn watch(
    s: &Arc<Session>,
    a: &Held,
    b: &Held,
    c: &Held,
    flow_c: tokio::task::JoinHandle<()>,
) {
    let mut flow_c = Some(flow_c);
    let b_deadline = b.received + b.ttl + MAX_GRACE;
    let mut c_deadline = c.received + c.ttl + MAX_GRACE;
    let (mut b_back, mut c_back, mut held_empty) = (false, false, false);
    let done = |b: bool, c: bool, empty: bool| b && c && empty;
    // Bounds the run when jobs keep coming and no poll is ever empty.
    let give_up = b_deadline.max(c_deadline) + Duration::from_secs(60);
    while !s.stopped() && !done(b_back, c_back, held_empty) {
        let now = Instant::now();
        if now > give_up {
            s.stop("jobs kept coming: no lease poll was ever empty".into());
            break;
        }
        if !b_back && now > b_deadline {
            s.check(Rule::R12, false, || {
                format!(
                    "job B did not come back within TTL + {} s",
                    MAX_GRACE.as_secs()
                )
            });
            s.skip(Rule::R11, "no job came back");
            b_back = true;
        }
        if !c_back && now > c_deadline {
            s.skip(
                Rule::R8,
                "the server ends a started job whose lease expired instead of leasing it again, as the rules allow",
            );
            c_back = true;
        }
        match s.lease(POLL_WAIT).await {
            Leased::Job(job) if !job.conformance => stray(s, &job).await,
            Leased::Job(job) if job.job_id == b.job_id && !b_back => {
                job_b_again(s, b, &job).await;
                c_deadline = c_deadline.min(c_expected_by(b, &job, c));
                b_back = true;
            }
            Leased::Job(job) if job.job_id == c.job_id && !c_back => {
                if let Some(first) = flow_c.take() {
                    let _ = first.await;
                }
                job_c_again(s, c, &job).await;
                c_back = true;
            }
            Leased::Job(job) => {
                if job.job_id == a.job_id {
                    s.check(Rule::R11, false, || {
                        "job A was leased again while its lease was held".into()
                    });
                }
                s.report()
                    .note(format!("an extra conformance job {} came", job.job_id));
                s.give_back(&job, "an extra conformance job").await;
            }
            Leased::Empty(reply) => {
                held_empty = true;
                // A server that does not hold the poll must not make the checker hammer it.
                let spent = reply.received - reply.sent;
                tokio::time::sleep(Duration::from_secs(1).saturating_sub(spent)).await;
            }
            Leased::Refused(reply) => {
                s.stop(format!("a lease was refused: {}", reply.shown()));
            }
        }
    }
    if let Some(first) = flow_c {
        let _ = first.await;
    }
}
