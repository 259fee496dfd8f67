//! Secrets never leak: every job path (success, failure, clone error, timeout, cancel) runs in
//! pull mode with a known GitHub token, API key and encryption key, the jobs print them, and then
//! every byte the agent wrote — its log, its state dir (spool, log buffers), every body it sent
//! to the API (streamed logs, completions) and the work dir — is searched for them.

use crate::fake_api;
use crate::support;

use std::path::Path;
use std::time::Duration;

use fake_api::FakeApi;
use serde_json::json;
use support::process::Agent;
use support::process::pull::KEY;
use support::{b64, unique_agent_id};

fn files_under(dir: &Path, out: &mut Vec<(String, Vec<u8>)>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            files_under(&path, out);
        } else if let Ok(bytes) = std::fs::read(&path) {
            out.push((path.display().to_string(), bytes));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_any_byte_the_agent_writes() {
    let (enc_key, encrypted, token) = support::token_vector(0);
    let api = FakeApi::start(KEY, 30).await;
    let prints = "echo \"token=$GH api=$API enc=$ENCRYPTION_KEY_COPY\"; echo \"$GH\" >&2";
    let env = json!({"GH": token, "API": KEY, "ENCRYPTION_KEY_COPY": enc_key});
    let job = |id: i64, script: &str| {
        json!({"job_id": id, "pipeline_b64": b64(&format!("version: 1\nsteps:\n  - run: {script}\n")),
               "github_token_encrypted": encrypted, "env_vars": env})
    };
    api.push_job(job(1, prints));
    api.push_job(job(2, &format!("{prints}; exit 3")));
    let mut clone_error = job(3, prints);
    clone_error["git_url"] = json!("http://127.0.0.1:1/private/repo.git");
    api.push_job(clone_error);
    let mut timeout = job(4, &format!("{prints}; sleep 60"));
    timeout["timeout_seconds"] = json!(2);
    api.push_job(timeout);
    api.push_job(job(5, &format!("{prints}; sleep 60")));
    api.faults(|f| {
        f.cancel.insert(5);
    });

    let state = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let mut agent = Agent::pull_in(
        &unique_agent_id("secrets"),
        state.path(),
        work.path(),
        &api.url,
        &[],
        &[
            ("GRYT_ENCRYPTION_KEY", &enc_key),
            ("GRYT_CONCURRENCY", "5"),
            // The clone-error job's repository is on loopback: let it reach the clone.
            ("GRYT_CHECKOUT_ALLOW_PRIVATE", "true"),
        ],
    )
    .await;
    api.wait_for("five completions", Duration::from_secs(90), |a| {
        (1..=5).all(|id| a.job(id).completion.is_some())
    })
    .await;
    let statuses: Vec<String> = (1..=5)
        .map(|id| {
            api.job(id).completion.unwrap()["status"]
                .as_str()
                .unwrap_or("")
                .to_owned()
        })
        .collect();
    assert_eq!(
        statuses,
        ["success", "failed", "error", "timeout", "cancelled"]
    );
    agent.signal("TERM");
    assert_eq!(agent.wait_exit(Duration::from_secs(30)).await, 0);

    // Everything the agent wrote or sent.
    let mut written: Vec<(String, Vec<u8>)> = Vec::new();
    files_under(state.path(), &mut written);
    files_under(work.path(), &mut written);
    for request in api.requests() {
        // The API key legitimately travels in the Authorization header; bodies must not hold it.
        written.push((
            format!("{} body", request.call),
            request.body.to_string().into_bytes(),
        ));
    }
    let mut streamed = String::new();
    for id in 1..=5 {
        let record = api.job(id);
        streamed.push_str(&record.log);
        written.push((format!("job {id} log"), record.log.into_bytes()));
        written.push((
            format!("job {id} result"),
            record.completion.unwrap().to_string().into_bytes(),
        ));
    }
    assert!(
        written.iter().any(|(name, _)| name.contains(".log")),
        "the agent's log was not found"
    );
    for (name, bytes) in &written {
        let text = String::from_utf8_lossy(bytes);
        for (what, secret) in [
            ("token", &token),
            ("API key", &KEY.to_owned()),
            ("encryption key", &enc_key),
        ] {
            assert!(
                !text.contains(secret.as_str()),
                "the {what} leaked into {name}"
            );
        }
    }
    // The jobs did print them: the log shows where masking replaced them.
    assert!(
        streamed.contains("token=[MASKED] api=[MASKED] enc=[MASKED]"),
        "{streamed}"
    );
    let clone = api.job(3).completion.unwrap();
    assert!(
        clone["error"].as_str().unwrap_or("").contains("127.0.0.1"),
        "{clone}"
    );
    agent.assert_clean().await;
}
