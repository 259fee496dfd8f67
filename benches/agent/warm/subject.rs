//! One agent under figure 8 and what the figure asks it: its pool (`GET /health`), its warm
//! jobs (`GET /metrics`), a job pushed (`POST /jobs/execute`) or leased through its fake API.

use super::*;

/// One agent of the figure, in pull and push mode at once, with a fake API of its own (two
/// agents on one fake would take each other's jobs).
pub(super) struct Subject {
    pub(super) agent: PullAgent,
    pub(super) fake: FakeApi,
    pub(super) http: reqwest::Client,
    pub(super) pool: bool,
}

impl Subject {
    /// The pool as `/health` reports it: `(target, ready)`. Fails when there is no pool.
    pub(super) async fn pool(&self) -> anyhow::Result<(u64, u64)> {
        let health: Value = self
            .http
            .get(format!("{}/health", self.agent.url))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let Some(pool) = health.get("warm_pool") else {
            bail!(
                "this agent has no warm pool: its GET /health has no `warm_pool` (an agent \
                 built before the warm pool?). Figure 8 measures the pool and cannot run \
                 without it; run the other figures with --only"
            );
        };
        let field = |name: &str| {
            pool[name]
                .as_u64()
                .with_context(|| format!("`warm_pool.{name}` is not a number: {pool}"))
        };
        Ok((field("target")?, field("ready")?))
    }

    /// The pool-off agent must say so, else its figure would not be the cold path.
    pub(super) async fn check_pool(&self) -> anyhow::Result<()> {
        let (target, _) = self.pool().await?;
        if target != 0 {
            bail!("GRYT_WARM_POOL=0 and yet /health reports a pool of {target}");
        }
        Ok(())
    }

    pub(super) async fn wait_ready(&self) -> anyhow::Result<()> {
        if !self.pool {
            return Ok(());
        }
        let deadline = Instant::now() + SETTLE_LIMIT;
        loop {
            let (target, ready) = self.pool().await?;
            if target == 0 {
                bail!("GRYT_WARM_POOL=1 and yet /health reports a pool of 0");
            }
            if ready >= 1 {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "no warm container ready in {SETTLE_LIMIT:?}\n{}",
                    self.agent.tail()
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// `gryt_agent_warm_jobs_total` from `/metrics`.
    pub(super) async fn warm_jobs(&self) -> anyhow::Result<u64> {
        let text = self
            .http
            .get(format!("{}/metrics", self.agent.url))
            .send()
            .await?
            .error_for_status()?
            .text()
            .await?;
        let name = "gryt_agent_warm_jobs_total";
        let values: Vec<f64> = text
            .lines()
            .filter_map(|l| l.strip_prefix(name))
            .filter(|rest| rest.starts_with([' ', '{']))
            .filter_map(|rest| rest.rsplit(' ').next()?.parse().ok())
            .collect();
        if values.is_empty() {
            bail!("the agent's /metrics has no {name}");
        }
        Ok(values.iter().sum::<f64>() as u64)
    }

    pub(super) async fn push(&self) -> anyhow::Result<Duration> {
        push_job(self.http.clone(), self.agent.url.clone())
            .await
            .with_context(|| self.agent.tail())
    }

    /// From the lease enqueued on the fake to the result posted there, the agent parked first.
    pub(super) async fn pull(&self) -> anyhow::Result<Duration> {
        self.fake
            .wait("the agent's lease request", JOB_TIMEOUT, |s| {
                (s.parked > 0).then_some(())
            })
            .await?;
        let clock = Instant::now();
        let id = self.fake.enqueue(TRUE_JOB);
        let done = self
            .fake
            .completed(id, JOB_TIMEOUT)
            .await
            .with_context(|| self.agent.tail())?;
        Ok(done - clock)
    }
}

/// `POST /jobs/execute` of the trivial job: from the request sent to the whole result read.
pub(super) async fn push_job(http: reqwest::Client, url: String) -> anyhow::Result<Duration> {
    let body = json!({"job_id": next_id(), "pipeline_b64": b64(TRUE_JOB)});
    let clock = Instant::now();
    let response = http
        .post(format!("{url}/jobs/execute"))
        .header("x-api-key", KEY)
        .json(&body)
        .send()
        .await?;
    let status = response.status();
    let result: Value = response.json().await?;
    let took = clock.elapsed();
    if !status.is_success() || result["success"] != json!(true) {
        bail!("the pushed job failed ({status}): {result}");
    }
    Ok(took)
}
