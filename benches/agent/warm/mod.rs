//! Figure 8, warm start (issue 15): a trivial job's time from arrival to result on an agent whose
//! warm pool holds a ready container, next to the same agent with the pool off, a cold
//! `docker run --rm` and the direct bollard floor, interleaved; throughput at concurrency 4 with
//! the pool on and off; what a refill costs; what a warm container and its agent cost idle.
//!
//! An agent whose `GET /health` has no `warm_pool` fails the figure: a pool figure that was not
//! measured would read as one.
//!
//! This file measures and makes the rows; `subject.rs` is the agents and what is asked of them.

use bollard::query_parameters::StatsOptionsBuilder;
use gryt_agent::executor::container::LABEL_AGENT_ID;
use gryt_agent::executor::warm::LABEL_WARM;

use super::*;

mod subject;

use subject::{Subject, push_job};

/// How often `/health` is read while waiting on the pool.
const POLL: Duration = Duration::from_millis(5);
/// Longest wait for the pool to be ready again, or for an agent's last job to be removed.
const SETTLE_LIMIT: Duration = Duration::from_secs(60);

/// What figure 8 measured, before it is made into rows.
struct Measured {
    /// Per job: pool on push, pool on pull, pool off push, pool off pull, `docker run`, direct.
    per_job: [Vec<Duration>; 6],
    rate_on: f64,
    rate_off: f64,
    /// Of the pool-on throughput jobs, how many ran in a warm container, of how many.
    warm_share: (u64, usize),
    refills: Vec<Duration>,
    idle: Idle,
}

struct Idle {
    /// The warm container's cgroup memory, less its inactive file cache (as `docker stats`).
    memory: u64,
    secs: f64,
    /// CPU ticks of the pool-on and the pool-off agent over the same `secs`.
    ticks: (u64, u64),
}

impl Bench {
    pub(crate) async fn warm(&mut self) -> anyhow::Result<Vec<Row>> {
        let on = self.subject(true).await?;
        let off = self.subject(false).await?;
        // The pool first: without one, nothing else here means anything.
        on.wait_ready().await?;
        off.check_pool().await?;
        let measured = self.warm_measure(&on, &off).await?;
        drop(on);
        drop(off);
        Ok(warm_rows(&measured))
    }

    async fn subject(&mut self, pool: bool) -> anyhow::Result<Subject> {
        let fake = FakeApi::start().await?;
        let env = [
            ("GRYT_WARM_POOL", if pool { "1" } else { "0" }),
            ("GRYT_PUSH", "true"),
        ];
        let agent =
            PullAgent::start_with(&self.agent, &self.hard, self.work.path(), &fake, 4, &env)
                .await?;
        self.agent_ids.push(agent.agent_id.clone());
        let http = reqwest::Client::builder().timeout(JOB_TIMEOUT).build()?;
        Ok(Subject {
            agent,
            fake,
            http,
            pool,
        })
    }

    async fn warm_measure(&self, on: &Subject, off: &Subject) -> anyhow::Result<Measured> {
        let before = on.warm_jobs().await?;
        let per_job = self.warm_per_job(on, off).await?;
        let on_jobs = 2 * (self.sizes.w as u64 + 1);
        let warm = on.warm_jobs().await? - before;
        if warm != on_jobs {
            bail!(
                "only {warm} of the {on_jobs} pool-on jobs ran in a warm container \
                 (gryt_agent_warm_jobs_total): not a warm-start figure\n{}",
                on.agent.tail()
            );
        }
        let quarter = (self.sizes.k / 4).max(1);
        let (mut time_on, mut time_off) = (Duration::ZERO, Duration::ZERO);
        let before = on.warm_jobs().await?;
        // On, off, off, on: drift over the four batches hits both alike.
        for subject in [on, off, off, on] {
            self.settle(on, off).await?;
            let took = self
                .pull_batch(&subject.fake, &subject.agent, quarter)
                .await?;
            match subject.pool {
                true => time_on += took,
                false => time_off += took,
            }
        }
        let warm_share = (on.warm_jobs().await? - before, 2 * quarter);
        let rate = |t: Duration| (2 * quarter) as f64 / t.as_secs_f64();
        let refills = self.refills(on, off, self.sizes.w).await?;
        let idle = self.warm_idle(on, off).await?;
        Ok(Measured {
            per_job,
            rate_on: rate(time_on),
            rate_off: rate(time_off),
            warm_share,
            refills,
            idle,
        })
    }

    /// Round-robin, one job of each variant per round after a warm-up round; each job starts on
    /// quiet agents (pool ready, the last job's container removed), untimed.
    async fn warm_per_job(
        &self,
        on: &Subject,
        off: &Subject,
    ) -> anyhow::Result<[Vec<Duration>; 6]> {
        let work = self.work.path().to_owned();
        let mut times: [Vec<Duration>; 6] = Default::default();
        for round in 0..=self.sizes.w {
            for (variant, slot) in times.iter_mut().enumerate() {
                self.settle(on, off).await?;
                let took = match variant {
                    0 => on.push().await?,
                    1 => on.pull().await?,
                    2 => off.push().await?,
                    3 => off.pull().await?,
                    4 => {
                        let (hard, work) = (self.hard.clone(), work.clone());
                        let clock = Instant::now();
                        tokio::task::spawn_blocking(move || docker_run(&hard, &work)).await??;
                        clock.elapsed()
                    }
                    _ => {
                        let clock = Instant::now();
                        direct_run(&self.docker, &self.hard, &work, "true", false).await?;
                        clock.elapsed()
                    }
                };
                if round > 0 {
                    slot.push(took);
                }
            }
        }
        Ok(times)
    }

    /// Until the pool-on agent has a ready container and neither agent has a job container left.
    async fn settle(&self, on: &Subject, off: &Subject) -> anyhow::Result<()> {
        on.wait_ready().await?;
        let deadline = Instant::now() + SETTLE_LIMIT;
        for subject in [on, off] {
            while self.job_containers(&subject.agent.agent_id).await? > 0 {
                if Instant::now() > deadline {
                    bail!("the agent's last job container was not removed in {SETTLE_LIMIT:?}");
                }
                tokio::time::sleep(POLL).await;
            }
        }
        Ok(())
    }

    /// Containers of `agent_id`: `(id, warm)` of each, `warm` for its pool's.
    async fn containers_of(&self, agent_id: &str) -> anyhow::Result<Vec<(String, bool)>> {
        let filters = HashMap::from([("label", vec![format!("{LABEL_AGENT_ID}={agent_id}")])]);
        let options = ListContainersOptionsBuilder::default()
            .all(true)
            .filters(&filters)
            .build();
        let list = self.docker.list_containers(Some(options)).await?;
        Ok(list
            .into_iter()
            .map(|c| {
                let warm = c.labels.is_some_and(|l| l.contains_key(LABEL_WARM));
                (c.id.unwrap_or_default(), warm)
            })
            .collect())
    }

    async fn job_containers(&self, agent_id: &str) -> anyhow::Result<usize> {
        let all = self.containers_of(agent_id).await?;
        Ok(all.iter().filter(|(_, warm)| !warm).count())
    }

    /// Time from `/health` first showing the pool's container taken by a pushed job to it showing
    /// a ready one again, `n` times.
    async fn refills(
        &self,
        on: &Subject,
        off: &Subject,
        n: usize,
    ) -> anyhow::Result<Vec<Duration>> {
        let mut refills = Vec::with_capacity(n);
        for _ in 0..n.max(1) {
            self.settle(on, off).await?;
            let job = tokio::spawn(push_job(on.http.clone(), on.agent.url.clone()));
            let sent = Instant::now();
            let mut taken = None;
            loop {
                let ready = on.pool().await?.1;
                let now = Instant::now();
                match taken {
                    None if ready == 0 => taken = Some(now),
                    Some(at) if ready >= 1 => {
                        refills.push(now - at);
                        break;
                    }
                    _ => {}
                }
                if now - sent > SETTLE_LIMIT {
                    bail!("the pool was not taken and ready again in {SETTLE_LIMIT:?}");
                }
                tokio::time::sleep(POLL).await;
            }
            job.await??;
        }
        Ok(refills)
    }

    /// Both agents idle, the pool-on one holding a warm container: their CPU over the same few
    /// seconds, and the warm container's memory.
    async fn warm_idle(&self, on: &Subject, off: &Subject) -> anyhow::Result<Idle> {
        self.settle(on, off).await?;
        // Let the last job's cleanup and the refill's after-effects settle.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let pids = [on.agent.pid(), off.agent.pid()];
        let before = pids.map(proc_stat);
        let clock = Instant::now();
        tokio::time::sleep(Duration::from_secs(self.sizes.s.clamp(1, 5))).await;
        let after = pids.map(proc_stat);
        let secs = clock.elapsed().as_secs_f64();
        let [b_on, b_off] = before;
        let [a_on, a_off] = after;
        let ticks = (
            a_on?.cpu_ticks - b_on?.cpu_ticks,
            a_off?.cpu_ticks - b_off?.cpu_ticks,
        );
        let warm = self.containers_of(&on.agent.agent_id).await?;
        let Some((id, _)) = warm.iter().find(|(_, warm)| *warm) else {
            bail!("the pool-on agent has no container labelled {LABEL_WARM}");
        };
        let options = StatsOptionsBuilder::default()
            .stream(false)
            .one_shot(true)
            .build();
        let stats = self
            .docker
            .stats(id, Some(options))
            .next()
            .await
            .context("no stats of the warm container")??;
        let m = stats.memory_stats.unwrap_or_default();
        let cache = m
            .stats
            .as_ref()
            .and_then(|s| s.get("inactive_file").or(s.get("total_inactive_file")))
            .copied()
            .unwrap_or(0);
        let memory = m
            .usage
            .context("no memory usage in the warm container's stats")?
            .saturating_sub(cache);
        Ok(Idle {
            memory,
            secs,
            ticks,
        })
    }
}

fn warm_rows(m: &Measured) -> Vec<Row> {
    let [a, a_pull, b, b_pull, c, d] = &m.per_job;
    let (cm, dm) = (median(c), median(d));
    let vs = |t: &[Duration], base: Duration| format!("{:.2}×", ratio(secs(t), base.as_secs_f64()));
    let warm_target = "≤ 0.4× `docker run --rm`";
    let docker_run = format!("{} (`docker run --rm`)", ms(cm));
    let mut rows = vec![
        row(
            "8. per job, push: pool on (a warm container ready)",
            spread(a),
            docker_run.clone(),
            vs(a, cm),
            warm_target,
        )
        .met(secs(a) <= 0.4 * cm.as_secs_f64()),
        row(
            "8. per job, push: pool off (cold path)",
            spread(b),
            docker_run.clone(),
            vs(b, cm),
            "(context: today's path)",
        ),
        row(
            "8. per job, push: pool on vs the floor",
            ms(median(a)),
            format!("{} (direct bollard)", ms(dm)),
            vs(a, dm),
            "(context)",
        ),
        row(
            "8. per job, pull: pool on",
            spread(a_pull),
            docker_run.clone(),
            vs(a_pull, cm),
            warm_target,
        )
        .met(secs(a_pull) <= 0.4 * cm.as_secs_f64()),
        row(
            "8. per job, pull: pool off",
            spread(b_pull),
            docker_run.clone(),
            vs(b_pull, cm),
            "(context: today's path)",
        ),
        row(
            "8. per job: `docker run --rm`",
            spread(c),
            format!("{} (direct bollard)", ms(dm)),
            vs(c, dm),
            "(baseline)",
        ),
        row(
            "8. per job: direct bollard (floor)",
            spread(d),
            "—".into(),
            "1.00×".into(),
            "(baseline)",
        ),
    ];
    let r = ratio(m.rate_on, m.rate_off);
    rows.push(
        row(
            "8. throughput, concurrency 4: pool on",
            format!(
                "{:.2} jobs/s ({} of {} warm)",
                m.rate_on, m.warm_share.0, m.warm_share.1
            ),
            format!("{:.2} jobs/s (pool off)", m.rate_off),
            format!("{r:.2}×"),
            "≥ 1.0×",
        )
        .met(r >= 1.0),
    );
    rows.push(row(
        "8. refill: pool seen empty → ready again",
        spread(&m.refills),
        docker_run,
        vs(&m.refills, cm),
        "(context: the pool's cold start)",
    ));
    rows.push(row(
        "8. idle warm container: memory",
        format!("{:.2} MiB", m.idle.memory as f64 / MIB as f64),
        "—".into(),
        "—".into(),
        "(context)",
    ));
    let tck = clock_ticks() as f64;
    let pct = |ticks: u64| ticks as f64 / tck / m.idle.secs * 100.0;
    let (on, off) = m.idle.ticks;
    rows.push(
        row(
            "8. idle agent CPU, a warm container ready",
            format!("{:.2}% ({on} ticks in {:.0} s)", pct(on), m.idle.secs),
            format!("{:.2}% (pool off, {off} ticks)", pct(off)),
            "—".into(),
            "≈ 0 (no busy polling)",
        )
        .met(pct(on) < 0.5),
    );
    rows
}

fn secs(t: &[Duration]) -> f64 {
    median(t).as_secs_f64()
}

/// `median (p90 …)`.
fn spread(t: &[Duration]) -> String {
    format!("{} (p90 {})", ms(median(t)), ms(percentile(t, 90.0)))
}

// ---------------------------------------------------------------------------------------------
