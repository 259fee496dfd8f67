//! The figures: overhead, throughput, pickup latency and footprint, each next to its baseline
//! (the store figure is in `store.rs`).

use super::*;

pub(crate) const TRUE_JOB: &str = "version: 1\nsteps:\n  - run: \"true\"\n";
pub(crate) const JOB_TIMEOUT: Duration = Duration::from_secs(120);

pub(crate) struct Bench {
    pub(crate) docker: Docker,
    pub(crate) hard: Hardening,
    pub(crate) agent: AgentBinary,
    pub(crate) work: tempfile::TempDir,
    pub(crate) sizes: Sizes,
    pub(crate) agent_ids: Vec<String>,
    /// The object store of the `store` figure (`store.rs`), when it runs.
    pub(crate) store: Option<gryt_agent::store::Store>,
}

impl Bench {
    pub(crate) fn executor(&self) -> anyhow::Result<(Executor, String)> {
        let mut settings = Settings::load_from(None, &[], &[])?;
        settings.docker.image = self.hard.image.clone();
        settings.docker.pull_policy = PullPolicy::Never;
        settings.docker.network = self.hard.network.clone();
        settings.work_dir = Some(self.work.path().to_owned());
        let id = format!("bench-lib-{}-{}", std::process::id(), next_id());
        let executor = Executor::new(ExecutorSettings::from_settings(&settings, id.clone())?)?;
        Ok((executor, id))
    }

    pub(crate) async fn pull_agent(
        &mut self,
        fake: &FakeApi,
        concurrency: usize,
    ) -> anyhow::Result<PullAgent> {
        let agent =
            PullAgent::start(&self.agent, &self.hard, self.work.path(), fake, concurrency).await?;
        self.agent_ids.push(agent.agent_id.clone());
        Ok(agent)
    }

    /// Figure 1, per-job overhead: the variants run round-robin, one job each per round, so drift on a
    /// shared machine hits them all alike. Medians of M jobs each. The agent's warm pool is off
    /// (`AgentBinary::command`): this is the cold path, comparable with the figure's history.
    pub(crate) async fn overhead(&mut self) -> anyhow::Result<Vec<Row>> {
        let m = self.sizes.m;
        let fake = FakeApi::start().await?;
        let pull = self.pull_agent(&fake, 1).await?;
        let (executor, lib_id) = self.executor()?;
        self.agent_ids.push(lib_id);
        let pipeline = self.work.path().join("true.yml");
        std::fs::write(&pipeline, TRUE_JOB)?;
        let lib_job: gryt_agent::wire::JobSpec =
            serde_json::from_value(json!({"job_id": 1, "pipeline_b64": b64(TRUE_JOB)}))?;
        let work = self.work.path().to_owned();
        let mut times: [Vec<Duration>; 5] = Default::default();
        // Round 0 warms every path up (first container, connections, page cache) and is not kept.
        for round in 0..=m {
            for (variant, slot) in times.iter_mut().enumerate() {
                let clock = Instant::now();
                let took = match variant {
                    0 => {
                        direct_run(&self.docker, &self.hard, &work, "true", false).await?;
                        clock.elapsed()
                    }
                    1 => {
                        let hard = self.hard.clone();
                        let work = work.clone();
                        tokio::task::spawn_blocking(move || docker_run(&hard, &work)).await??;
                        clock.elapsed()
                    }
                    2 => {
                        let result = executor.run(&lib_job, &Discard, &JobControl::new()).await;
                        if !result.success {
                            bail!("library executor job failed: {:?}", result.error);
                        }
                        clock.elapsed()
                    }
                    3 => {
                        let (agent, hard, work, pipeline) = (
                            AgentBinary {
                                path: self.agent.path.clone(),
                                why: "",
                            },
                            self.hard.clone(),
                            work.clone(),
                            pipeline.clone(),
                        );
                        tokio::task::spawn_blocking(move || agent.exec(&hard, &work, &pipeline))
                            .await??;
                        clock.elapsed()
                    }
                    _ => {
                        // Wait for the agent to be back in its long poll, as an idle agent is.
                        fake.wait("the agent's lease request", JOB_TIMEOUT, |s| {
                            (s.parked > 0).then_some(())
                        })
                        .await?;
                        let clock = Instant::now();
                        let id = fake.enqueue(TRUE_JOB);
                        let done = fake
                            .completed(id, JOB_TIMEOUT)
                            .await
                            .with_context(|| pull.tail())?;
                        done - clock
                    }
                };
                if round > 0 {
                    slot.push(took);
                }
            }
        }
        drop(pull);
        let [direct, docker_run, lib, exec, pull] = times.map(|t| median(&t));
        let floor = direct.as_secs_f64();
        let mut rows = vec![
            row(
                "1. per job: direct bollard (floor)",
                ms(direct),
                "—".into(),
                "1.00×".into(),
                "(baseline)",
            ),
            row(
                "1. per job: `docker run --rm`",
                ms(docker_run),
                ms(direct),
                format!("{:.2}×", ratio(docker_run.as_secs_f64(), floor)),
                "(baseline)",
            ),
        ];
        for (name, t) in [
            ("1. per job: library executor", lib),
            ("1. per job: `gryt-agent exec`", exec),
            (
                "1. per job: pull mode (`gryt-agent run`, warm pool off)",
                pull,
            ),
        ] {
            let r = ratio(t.as_secs_f64(), floor);
            rows.push(
                row(
                    name,
                    ms(t),
                    ms(direct),
                    format!("{r:.2}×"),
                    &format!("≤ 1.05× and < docker run ({})", ms(docker_run)),
                )
                .met(r <= 1.05 && t < docker_run),
            );
        }
        Ok(rows)
    }

    /// Figure 2, throughput at concurrency 4: pull mode vs 4 parallel direct runners, in ABBA order.
    pub(crate) async fn throughput(&mut self) -> anyhow::Result<Vec<Row>> {
        let k = self.sizes.k;
        let half = k / 2;
        let fake = FakeApi::start().await?;
        let pull = self.pull_agent(&fake, 4).await?;
        let (mut direct_time, mut pull_time) = (Duration::ZERO, Duration::ZERO);
        let (mut direct_jobs, mut pull_jobs) = (0usize, 0usize);
        // Warm-up: one of each.
        self.direct_parallel(1).await?;
        self.pull_batch(&fake, &pull, 1).await?;
        for (i, n) in [half / 2, half - half / 2, half - half / 2, half / 2]
            .into_iter()
            .enumerate()
        {
            if i == 0 || i == 3 {
                direct_time += self.direct_parallel(n).await?;
                direct_jobs += n;
            } else {
                pull_time += self.pull_batch(&fake, &pull, n).await?;
                pull_jobs += n;
            }
        }
        let direct_rate = direct_jobs as f64 / direct_time.as_secs_f64();
        let pull_rate = pull_jobs as f64 / pull_time.as_secs_f64();
        let r = ratio(pull_rate, direct_rate);
        Ok(vec![
            row(
                "2. throughput, concurrency 4: pull mode (warm pool off)",
                format!("{pull_rate:.2} jobs/s"),
                format!("{direct_rate:.2} jobs/s (4 direct runners)"),
                format!("{r:.2}×"),
                "≥ 0.95×",
            )
            .met(r >= 0.95),
        ])
    }

    pub(crate) async fn direct_parallel(&self, n: usize) -> anyhow::Result<Duration> {
        let left = Arc::new(AtomicUsize::new(n));
        let clock = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..4 {
            let (docker, hard, work, left) = (
                self.docker.clone(),
                self.hard.clone(),
                self.work.path().to_owned(),
                left.clone(),
            );
            tasks.spawn(async move {
                while left
                    .fetch_update(Ordering::AcqRel, Ordering::Acquire, |l| l.checked_sub(1))
                    .is_ok()
                {
                    direct_run(&docker, &hard, &work, "true", false).await?;
                }
                anyhow::Ok(())
            });
        }
        while let Some(r) = tasks.join_next().await {
            r??;
        }
        Ok(clock.elapsed())
    }

    pub(crate) async fn pull_batch(
        &self,
        fake: &FakeApi,
        pull: &PullAgent,
        n: usize,
    ) -> anyhow::Result<Duration> {
        fake.wait("the agent's lease request", JOB_TIMEOUT, |s| {
            (s.parked > 0).then_some(())
        })
        .await?;
        let clock = Instant::now();
        let ids: Vec<i64> = (0..n).map(|_| fake.enqueue(TRUE_JOB)).collect();
        let mut last = clock;
        for id in ids {
            let at = fake
                .completed(id, JOB_TIMEOUT * 4)
                .await
                .with_context(|| pull.tail())?;
            last = last.max(at);
        }
        Ok(last - clock)
    }

    /// Figure 3, pickup latency: an idle agent (parked in its long poll), a job enqueued, `start` seen.
    /// Baseline: the same protocol done by a bare HTTP client in this process.
    pub(crate) async fn pickup(&mut self) -> anyhow::Result<Vec<Row>> {
        let j = self.sizes.j;
        let fake = FakeApi::start().await?;
        let bare = tokio::spawn(bare_client(fake.url.clone()));
        let base = self.pickups(&fake, j, None).await?;
        bare.abort();
        let _ = bare.await;
        fake.wait("the bare client to leave", Duration::from_secs(5), |s| {
            (s.parked == 0).then_some(())
        })
        .await
        .ok();
        let pull = self.pull_agent(&fake, 1).await?;
        let agent = self.pickups(&fake, j, Some(&pull)).await?;
        drop(pull);
        let (p50, p99) = (percentile(&agent, 50.0), percentile(&agent, 99.0));
        let (b50, b99) = (percentile(&base, 50.0), percentile(&base, 99.0));
        Ok(vec![
            row(
                "3. pickup latency p50",
                ms(p50),
                format!("{} (bare HTTP client)", ms(b50)),
                format!("{:.2}×", ratio(p50.as_secs_f64(), b50.as_secs_f64())),
                "(context)",
            ),
            row(
                "3. pickup latency p99",
                ms(p99),
                format!("{} (bare HTTP client)", ms(b99)),
                format!("{:.2}×", ratio(p99.as_secs_f64(), b99.as_secs_f64())),
                "≤ 50 ms",
            )
            .met(p99 <= Duration::from_millis(50)),
        ])
    }

    pub(crate) async fn pickups(
        &self,
        fake: &FakeApi,
        n: usize,
        agent: Option<&PullAgent>,
    ) -> anyhow::Result<Vec<Duration>> {
        let mut latencies = Vec::with_capacity(n);
        for i in 0..=n {
            fake.wait("a parked lease request", JOB_TIMEOUT, |s| {
                (s.parked > 0).then_some(())
            })
            .await?;
            // Let it sit idle a little, at varying phases.
            tokio::time::sleep(Duration::from_millis(5 + (i as u64 * 7) % 20)).await;
            let id = fake.enqueue(TRUE_JOB);
            let started = fake
                .wait(&format!("job {id} to start"), JOB_TIMEOUT, |s| {
                    s.started.get(&id).copied()
                })
                .await
                .with_context(|| agent.map(|a| a.tail()).unwrap_or_default())?;
            let enqueued = fake.inner.lock().enqueued[&id];
            if agent.is_some() {
                fake.completed(id, JOB_TIMEOUT).await?;
            }
            if i > 0 {
                latencies.push(started - enqueued);
            }
        }
        Ok(latencies)
    }

    /// Figure 4, footprint: an idle agent over S seconds, then a job printing G bytes.
    pub(crate) async fn footprint(&mut self) -> anyhow::Result<Vec<Row>> {
        let fake = FakeApi::start().await?;
        let pull = self.pull_agent(&fake, 1).await?;
        let pid = pull.pid();
        // Let the start-up settle (first sweep, Docker negotiation) before measuring idleness.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let tck = clock_ticks();
        let before = proc_stat(pid)?;
        let clock = Instant::now();
        let mut idle_rss = before.rss_kib;
        while clock.elapsed() < Duration::from_secs(self.sizes.s) {
            tokio::time::sleep(Duration::from_millis(250)).await;
            idle_rss = idle_rss.max(proc_stat(pid)?.rss_kib);
        }
        let after = proc_stat(pid)?;
        let idle_secs = clock.elapsed().as_secs_f64();
        let cpu_pct = (after.cpu_ticks - before.cpu_ticks) as f64 / tck as f64 / idle_secs * 100.0;

        // The log job: G bytes of printable text, through the agent vs read directly.
        let g = self.sizes.g;
        let script = print_script(g);
        let clock = Instant::now();
        let read = direct_run(&self.docker, &self.hard, self.work.path(), &script, true).await?;
        let base_time = clock.elapsed();
        if read != g {
            bail!("the direct log job printed {read} bytes, not {g}");
        }
        let base_rate = g as f64 / base_time.as_secs_f64() / 1e6;

        let pipeline = format!(
            "version: 1\nsteps:\n  - name: print\n    run: |\n{}",
            script
                .lines()
                .map(|l| format!("      {l}\n"))
                .collect::<String>()
        );
        let id = fake.enqueue(&pipeline);
        let mut job_rss = 0;
        let limit = Duration::from_secs(600);
        let done = loop {
            job_rss = job_rss.max(proc_stat(pid)?.rss_kib);
            let finished = fake
                .wait("the log job", Duration::from_millis(100), |s| {
                    s.completed.get(&id).cloned()
                })
                .await;
            if let Ok(done) = finished {
                break done;
            }
            let waited = fake.inner.lock().enqueued[&id].elapsed();
            if waited > limit {
                bail!("the log job did not complete in {limit:?}\n{}", pull.tail());
            }
        };
        if done.1 != "success" {
            bail!("the log job ended with status {}\n{}", done.1, pull.tail());
        }
        let (started, committed) = {
            let s = fake.inner.lock();
            (s.started[&id], s.committed.get(&id).copied().unwrap_or(0))
        };
        if committed != g {
            bail!("the fake API received {committed} log bytes, not {g}");
        }
        let hwm = proc_stat(pid)?.hwm_kib;
        drop(pull);
        let job_time = done.0 - started;
        let rate = committed as f64 / job_time.as_secs_f64() / 1e6;
        let r = ratio(rate, base_rate);
        Ok(vec![
            row(
                "4. idle RSS (max over S)",
                mib(idle_rss),
                "—".into(),
                "—".into(),
                "≤ 15 MB",
            )
            .met(idle_rss * 1024 <= 15_000_000),
            row(
                "4. idle CPU",
                format!(
                    "{cpu_pct:.2}% ({} ticks in {idle_secs:.0} s)",
                    after.cpu_ticks - before.cpu_ticks
                ),
                "—".into(),
                "—".into(),
                "≈ 0 (no busy polling)",
            )
            .met(cpu_pct < 0.5),
            row(
                "4. log delivered to the API",
                format!(
                    "{rate:.0} MB/s ({} MiB in {:.1} s)",
                    g / MIB,
                    job_time.as_secs_f64()
                ),
                format!("{base_rate:.0} MB/s (read directly)"),
                format!("{r:.2}×"),
                "≥ 100 MB/s",
            )
            .met(rate >= 100.0),
            row(
                "4. RSS during the log job (max; peak)",
                format!("{}; {}", mib(job_rss), mib(hwm)),
                "—".into(),
                "—".into(),
                "≤ 64 MB",
            )
            .met(job_rss.max(hwm) * 1024 <= 64_000_000),
        ])
    }

    /// Containers of this run still present (there should be none).
    pub(crate) async fn leftovers(&self) -> usize {
        let mut n = 0;
        let mut labels = vec![format!("{BENCH_LABEL}=true")];
        labels.extend(
            self.agent_ids
                .iter()
                .map(|id| format!("{}={id}", gryt_agent::executor::container::LABEL_AGENT_ID)),
        );
        for label in labels {
            let filters = HashMap::from([("label", vec![label])]);
            let options = ListContainersOptionsBuilder::default()
                .all(true)
                .filters(&filters)
                .build();
            n += self
                .docker
                .list_containers(Some(options))
                .await
                .map(|l| l.len())
                .unwrap_or(0);
        }
        n
    }
}

/// A shell script printing exactly `g` bytes of printable ASCII (65-byte lines), fast.
pub(crate) fn print_script(g: u64) -> String {
    let block = if g >= 16 * MIB && g.is_multiple_of(16 * MIB) {
        16 * MIB
    } else {
        MIB
    };
    let line = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ01";
    let mut s = format!("yes {line} | head -c {MIB} > /tmp/b1\n");
    if block == 16 * MIB {
        s.push_str("cat /tmp/b1 /tmp/b1 /tmp/b1 /tmp/b1 > /tmp/b4\n");
        s.push_str("cat /tmp/b4 /tmp/b4 /tmp/b4 /tmp/b4 > /tmp/b\n");
    } else {
        s.push_str("mv /tmp/b1 /tmp/b\n");
    }
    s.push_str(&format!(
        "n=0; while [ $n -lt {} ]; do cat /tmp/b; n=$((n+1)); done\n",
        g / block
    ));
    s
}

// ---------------------------------------------------------------------------------------------
