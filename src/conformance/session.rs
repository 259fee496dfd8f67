//! One conformance run's connection to the server: the protocol's calls as the checker makes
//! them (its own agent id, only the conformance label, capacity 1), and the report they feed.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::{Value, json};
use time::OffsetDateTime;
use tokio::time::Instant;

use super::http::{Probe, Reply};
use super::report::{Report, Rule};
use super::{LABEL, MARKER};
use crate::wire::pull::{CompleteRequest, lease_ttl};
use crate::wire::{JobResult, JobStatus, rfc3339};

/// How early a 204 may come before `wait_seconds` and still count as a held long poll.
const POLL_SLACK: Duration = Duration::from_millis(500);
/// The longest `Retry-After` the checker waits for.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(30);
/// How many 429s in a row one lease call takes before giving up.
const MAX_THROTTLED: u32 = 5;

/// A job leased to the checker.
#[derive(Debug, Clone)]
pub struct Held {
    pub job_id: i64,
    pub lease_id: String,
    pub ttl: Duration,
    /// When the lease request was sent (the server's TTL started after this).
    pub sent: Instant,
    /// When the lease answer came (the server's TTL started before this).
    pub received: Instant,
    /// It carries the conformance marker.
    pub conformance: bool,
}

/// What a lease call brought.
#[derive(Debug)]
pub enum Leased {
    Job(Held),
    /// 204, after the poll held as long as it should (or not: R2 says).
    Empty(Reply),
    /// Anything else (already noted in the report).
    Refused(Reply),
}

pub struct Session {
    pub probe: Probe,
    report: Mutex<Report>,
    agent_id: String,
    hostname: String,
    stopped: AtomicBool,
}

impl Session {
    pub fn new(probe: Probe, agent_id: String) -> Session {
        Session {
            probe,
            report: Mutex::new(Report::default()),
            agent_id,
            hostname: gethostname::gethostname().to_string_lossy().into_owned(),
            stopped: AtomicBool::new(false),
        }
    }

    pub fn report(&self) -> std::sync::MutexGuard<'_, Report> {
        self.report.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn into_report(self) -> Report {
        self.report.into_inner().unwrap_or_else(|p| p.into_inner())
    }

    pub fn check(&self, rule: Rule, ok: bool, what: impl FnOnce() -> String) {
        self.report().expect(rule, ok, what);
    }

    /// `rule` cannot be checked against this server, for a reason the rules allow.
    pub fn skip(&self, rule: Rule, why: &str) {
        self.report().skip(rule, why);
    }

    /// No more leases: the server handed out a job that is not a conformance job.
    pub fn stop(&self, why: String) {
        self.stopped.store(true, Ordering::Release);
        self.report().aborted.get_or_insert(why);
    }

    pub fn stopped(&self) -> bool {
        self.stopped.load(Ordering::Acquire)
    }

    pub fn lease_body(&self, wait_seconds: u64) -> Value {
        json!({"agent_id": self.agent_id, "hostname": self.hostname,
               "version": crate::VERSION, "labels": [LABEL], "capacity": 1,
               "wait_seconds": wait_seconds})
    }

    /// One lease call, waiting out 429s (R2: they must carry `Retry-After`).
    pub async fn lease(&self, wait_seconds: u64) -> Leased {
        let wait = Duration::from_secs(wait_seconds);
        let mut throttled = 0;
        loop {
            let reply = self
                .probe
                .post("/lease", &self.lease_body(wait_seconds), wait)
                .await;
            match reply.status {
                200 => return self.parse_lease(reply),
                204 => {
                    let held = reply.received - reply.sent;
                    self.check(Rule::R2, held + POLL_SLACK >= wait, || {
                        format!(
                            "a lease with wait_seconds {wait_seconds} and no job got 204 after {:.2} s",
                            held.as_secs_f64()
                        )
                    });
                    return Leased::Empty(reply);
                }
                429 if throttled < MAX_THROTTLED => {
                    throttled += 1;
                    self.check(Rule::R2, reply.retry_after.is_some(), || {
                        "a 429 on lease without Retry-After".into()
                    });
                    let pause = reply.retry_after.unwrap_or(Duration::from_secs(5));
                    tokio::time::sleep(pause.min(MAX_RETRY_AFTER)).await;
                }
                _ => {
                    self.report()
                        .note(format!("lease was answered {}", reply.shown()));
                    return Leased::Refused(reply);
                }
            }
        }
    }

    fn parse_lease(&self, reply: Reply) -> Leased {
        let b = &reply.body;
        let parsed = (
            b["lease_id"].as_str(),
            b["lease_ttl_seconds"].as_u64(),
            b["job"]["job_id"].as_i64(),
        );
        let (Some(lease_id), Some(ttl), Some(job_id)) = parsed else {
            self.report().note(format!(
                "a 200 lease answer without lease_id, lease_ttl_seconds and job.job_id: {}",
                reply.shown()
            ));
            return Leased::Refused(reply);
        };
        let conformance = b["job"]["env_vars"][MARKER].is_string();
        if conformance {
            // A job that is not one is reported (and given back) by the caller.
            self.check(Rule::R14, true, String::new);
        }
        Leased::Job(Held {
            job_id,
            lease_id: lease_id.to_owned(),
            ttl: lease_ttl(ttl),
            sent: reply.sent,
            received: reply.received,
            conformance,
        })
    }

    pub async fn call(&self, job_id: i64, call: &str, body: Value) -> Reply {
        self.probe
            .post(&format!("/jobs/{job_id}/{call}"), &body, Duration::ZERO)
            .await
    }

    pub async fn start(&self, job_id: i64, lease_id: &str) -> Reply {
        let started_at = rfc3339(OffsetDateTime::now_utc());
        self.call(
            job_id,
            "start",
            json!({"lease_id": lease_id, "started_at": started_at}),
        )
        .await
    }

    pub async fn heartbeat(&self, job_id: i64, lease_id: &str) -> Reply {
        self.call(job_id, "heartbeat", json!({"lease_id": lease_id}))
            .await
    }

    pub async fn logs(&self, job_id: i64, lease_id: &str, offset: u64, data: &str) -> Reply {
        self.call(
            job_id,
            "logs",
            json!({"lease_id": lease_id, "offset": offset, "data": data}),
        )
        .await
    }

    pub async fn complete(&self, job_id: i64, lease_id: &str, body: &Value) -> Reply {
        let mut body = body.clone();
        body["lease_id"] = json!(lease_id);
        self.call(job_id, "complete", body).await
    }

    /// Start, then complete as `error` with `why`, without running anything: for a job the run
    /// cannot use (not a conformance job, or the run stopped).
    pub async fn give_back(&self, held: &Held, why: &str) {
        let start = self.start(held.job_id, &held.lease_id).await;
        let done = self
            .complete(
                held.job_id,
                &held.lease_id,
                &completion(held.job_id, Some(why), 0),
            )
            .await;
        self.report().note(format!(
            "job {} completed as error without running (start {}, complete {})",
            held.job_id,
            start.shown(),
            done.shown()
        ));
    }
}

/// A completion body (without `lease_id`): `success`, or `error` with the reason.
pub fn completion(job_id: i64, error: Option<&str>, log_bytes: u64) -> Value {
    let now = rfc3339(OffsetDateTime::now_utc());
    let result = match error {
        Some(why) => JobResult::agent_error(job_id, why.to_owned()),
        None => JobResult {
            job_id,
            status: JobStatus::Success,
            success: true,
            exit_code: 0,
            stdout: String::new(),
            stderr: String::new(),
            duration_seconds: 0.0,
            started_at: now.clone(),
            completed_at: now,
            error: None,
            steps: Vec::new(),
            oom_killed: false,
            artifacts: Vec::new(),
            services: Vec::new(),
        },
    };
    let request = CompleteRequest {
        lease_id: String::new(),
        result,
        log_bytes,
    };
    serde_json::to_value(&request).unwrap_or(Value::Null)
}
