//! What the checker does with each of its three jobs (docs/protocol.md, "Conformance checker"):
//! A is held to its end and completed twice; B is never started and must come back after its TTL
//! and grace; C is started, left to expire, and (if the server leases started jobs again) comes
//! back with a new, empty log.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;

use super::MIN_GRACE;
use super::report::Rule;
use super::session::{Held, Session, completion};

/// The largest chunk the rules make the server accept.
const CHUNK_LIMIT: usize = 1024 * 1024;

/// `start` answered 2xx (R3: every start of a held lease).
async fn started(s: &Session, job_id: i64, lease_id: &str, what: &str) -> bool {
    let r = s.start(job_id, lease_id).await;
    s.check(Rule::R3, r.is_success(), || {
        format!("{what} got {}", r.shown())
    });
    r.is_success()
}

/// A call that must find the lease not held (R10).
fn lost(s: &Session, r: &super::http::Reply, what: &str) {
    s.check(Rule::R10, r.is_lost(), || {
        format!("{what} got {} (want 404, 409 or 410)", r.shown())
    });
}

/// A log chunk whose answer must be 200 with `committed` = `want`.
async fn chunk(s: &Session, held: &Held, offset: u64, data: &str, want: u64, what: &str) -> u64 {
    let r = s.logs(held.job_id, &held.lease_id, offset, data).await;
    let got = r.committed();
    s.check(Rule::R6, r.status == 200 && got == Some(want), || {
        format!("{what}: want 200 with committed {want}, got {}", r.shown())
    });
    got.unwrap_or(want)
}

/// Job A: idempotent start (already sent twice by the caller), heartbeats across more than a
/// TTL (sent alongside, as an agent does), every log offset case, the chunk limit, a repeated
/// completion, calls after the end.
pub async fn job_a(s: Arc<Session>, a: Held) {
    let hb = s.heartbeat(a.job_id, &a.lease_id).await;
    let renewed = hb.status == 200
        && hb.body["lease_ttl_seconds"]
            .as_u64()
            .is_some_and(|t| t >= 1);
    s.check(Rule::R5, renewed, || {
        format!(
            "a heartbeat got {} (want 200 with lease_ttl_seconds)",
            hb.shown()
        )
    });
    let last_renewal = if renewed { hb.received } else { a.received };
    let stop = CancellationToken::new();
    let beats = tokio::spawn(keep_alive(s.clone(), a.clone(), last_renewal, stop.clone()));

    let stranger = s
        .probe
        .post_as_stranger(
            &format!("/jobs/{}/heartbeat", a.job_id),
            &serde_json::json!({"lease_id": a.lease_id}),
        )
        .await;
    s.check(Rule::R1, stranger.status == 401, || {
        format!(
            "a heartbeat of a held lease with an unknown key got {}",
            stranger.shown()
        )
    });
    let committed = log_cases(&s, &a).await;

    // The lease must have lived 1.3 TTLs on heartbeats alone before the job ends.
    sleep_until(a.received + a.ttl.mul_f64(1.3)).await;
    stop.cancel();
    let _ = beats.await;
    let (id, lease) = (a.job_id, a.lease_id.as_str());
    let body = completion(id, None, committed);
    let first = s.complete(id, lease, &body).await;
    s.check(Rule::R9, first.is_success(), || {
        format!("the completion got {}", first.shown())
    });
    let again = s.complete(id, lease, &body).await;
    s.check(Rule::R9, again.status == 200, || {
        format!("the same completion again got {} (want 200)", again.shown())
    });
    lost(
        &s,
        &s.heartbeat(id, lease).await,
        "a heartbeat after the job completed",
    );
    lost(
        &s,
        &s.logs(id, lease, committed, "more\n").await,
        "a log chunk after the job completed",
    );
}

/// Heartbeats every TTL/3 from the last renewal until `stop`: each must renew (R5).
async fn keep_alive(s: Arc<Session>, a: Held, mut last_renewal: Instant, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = sleep_until(last_renewal + a.ttl / 3) => {}
        }
        let hb = s.heartbeat(a.job_id, &a.lease_id).await;
        let age = (hb.sent - a.received).as_secs_f64();
        s.check(Rule::R5, hb.status == 200, || {
            format!(
                "a heartbeat {age:.1} s into a lease renewed every TTL/3 got {}",
                hb.shown()
            )
        });
        if hb.status != 200 {
            return;
        }
        last_renewal = hb.received;
    }
}

/// Every log offset case (R6) and the chunk limit (R7) on job A; what the server holds after.
async fn log_cases(s: &Session, a: &Held) -> u64 {
    let (id, lease) = (a.job_id, a.lease_id.as_str());
    let probe = s.logs(id, lease, 0, "").await;
    s.check(Rule::R6, probe.committed() == Some(0), || {
        format!(
            "an empty chunk at 0 on a new lease: want committed 0, got {}",
            probe.shown()
        )
    });
    chunk(s, a, 0, "héllo\n", 7, "the first chunk").await;
    chunk(
        s,
        a,
        0,
        "héllo\n",
        7,
        "the same chunk again (the server must not keep it twice)",
    )
    .await;
    chunk(
        s,
        a,
        100,
        "beyond\n",
        7,
        "a chunk past committed (the server must ignore it)",
    )
    .await;
    chunk(
        s,
        a,
        3,
        "llo\nworld\n",
        13,
        "a chunk overlapping committed (only the part past it is kept)",
    )
    .await;
    let committed = chunk(s, a, 0, "", 13, "an empty chunk asking for committed").await;

    let big = "x".repeat(CHUNK_LIMIT);
    let r = s.logs(id, lease, committed, &big).await;
    s.check(Rule::R7, r.status == 200, || {
        format!("a chunk of exactly 1 MiB got {}", r.shown())
    });
    let committed = r.committed().unwrap_or(committed);
    let r = s.logs(id, lease, committed, &format!("{big}y")).await;
    s.check(Rule::R7, r.status == 413, || {
        format!("a chunk of 1 MiB + 1 byte got {} (want 413)", r.shown())
    });
    committed
}

/// Job C, first lease: started, a line of log, a second start late in the TTL, then no
/// heartbeat: past the TTL every call must find the lease gone (also the "spooled" completion).
pub async fn job_c_first_lease(s: &Session, c: &Held) {
    let (id, lease) = (c.job_id, c.lease_id.as_str());
    if !started(s, id, lease, "the first start").await {
        return;
    }
    chunk(s, c, 0, "attempt-1\n", 10, "the first chunk of job C").await;
    sleep_until(c.received + c.ttl.mul_f64(0.6)).await;
    let restarted = started(s, id, lease, "a second start at 0.6 TTL").await;
    sleep_until(c.received + c.ttl.mul_f64(1.25)).await;
    let hb = s.heartbeat(id, lease).await;
    let what = "a heartbeat 1.25 TTL after the lease (never renewed)";
    if restarted {
        s.check(Rule::R4, hb.is_lost(), || {
            format!(
                "{what}, after a second start at 0.6 TTL, got {} (the start renewed the lease?)",
                hb.shown()
            )
        });
    } else {
        lost(s, &hb, what);
    }
    lost(
        s,
        &s.logs(id, lease, 10, "late\n").await,
        "a log chunk after the TTL",
    );
    let late = s.complete(id, lease, &completion(id, None, 10)).await;
    lost(
        s,
        &late,
        "a completion after the TTL (as a spooled one arrives)",
    );
}

/// R11: the job came back no sooner than TTL + the grace after its lease.
fn grace_kept(s: &Session, first: &Held, again: &Held, name: &str) {
    let earliest = first.sent + first.ttl + MIN_GRACE;
    s.check(Rule::R11, again.received >= earliest, || {
        format!(
            "job {name} was leased again {:.1} s after its lease with a TTL of {} s (want at least TTL + {} s)",
            (again.received - first.sent).as_secs_f64(),
            first.ttl.as_secs(),
            MIN_GRACE.as_secs()
        )
    });
}

/// Job B is back (never started under its first lease).
pub async fn job_b_again(s: &Session, b1: &Held, b2: &Held) {
    grace_kept(s, b1, b2, "B (never started)");
    s.check(Rule::R12, b2.lease_id != b1.lease_id, || {
        "job B came back with its old lease id".into()
    });
    let id = b1.job_id;
    lost(
        s,
        &s.start(id, &b1.lease_id).await,
        "a start with the expired first lease of a job leased again",
    );
    if !started(s, id, &b2.lease_id, "the start of a job leased again").await {
        return;
    }
    let done = s.complete(id, &b2.lease_id, &completion(id, None, 0)).await;
    s.check(Rule::R12, done.is_success(), || {
        format!("completing job B under its new lease got {}", done.shown())
    });
    let old = s.complete(id, &b1.lease_id, &completion(id, None, 0)).await;
    s.check(Rule::R13, old.status == 409, || {
        format!(
            "a completion with job B's expired first lease, after B completed, got {}",
            old.shown()
        )
    });
}

/// Job C is back (started under its first lease): its new lease has a new, empty log.
pub async fn job_c_again(s: &Session, c1: &Held, c2: &Held) {
    grace_kept(s, c1, c2, "C (started)");
    let id = c1.job_id;
    if !started(
        s,
        id,
        &c2.lease_id,
        "the start of a started job leased again",
    )
    .await
    {
        return;
    }
    let probe = s.logs(id, &c2.lease_id, 0, "").await;
    s.check(
        Rule::R8,
        probe.status == 200 && probe.committed() == Some(0),
        || {
            format!(
                "an empty chunk at 0 on the new lease: want committed 0, got {}",
                probe.shown()
            )
        },
    );
    let first = s.logs(id, &c2.lease_id, 0, "attempt-2\n").await;
    s.check(
        Rule::R8,
        first.status == 200 && first.committed() == Some(10),
        || {
            format!(
                "the new lease's first chunk at offset 0: want committed 10, got {}",
                first.shown()
            )
        },
    );
    let done = s
        .complete(id, &c2.lease_id, &completion(id, None, 10))
        .await;
    s.check(Rule::R8, done.is_success(), || {
        format!("completing job C under its new lease got {}", done.shown())
    });
    let old = s
        .complete(id, &c1.lease_id, &completion(id, None, 10))
        .await;
    s.check(Rule::R13, old.status == 409, || {
        format!(
            "a completion with job C's expired first lease, after C completed, got {}",
            old.shown()
        )
    });
}

/// How long after B came back C may still come (they were leased one after the other).
pub fn c_expected_by(b1: &Held, b2: &Held, c1: &Held) -> Instant {
    b2.received + c1.received.saturating_duration_since(b1.received) + Duration::from_secs(10)
}
