//! Figure 5, what a job network adds to a job: the library executor's time per job with
//! `docker.network = "job"` (a network made before the container and removed after it) next to
//! the same job on Docker's default `bridge`, round-robin, medians of M jobs each.

use super::*;

impl Bench {
    fn executor_on(&self, network: &str) -> anyhow::Result<(Executor, String)> {
        let mut settings = Settings::load_from(None, &[], &[])?;
        settings.docker.image = self.hard.image.clone();
        settings.docker.pull_policy = PullPolicy::Never;
        settings.docker.network = network.to_owned();
        settings.work_dir = Some(self.work.path().to_owned());
        let id = format!("bench-net-{}-{}", std::process::id(), next_id());
        let executor = Executor::new(ExecutorSettings::from_settings(&settings, id.clone())?)?;
        Ok((executor, id))
    }

    pub(crate) async fn job_network(&mut self) -> anyhow::Result<Vec<Row>> {
        let (bridge, bridge_id) = self.executor_on("bridge")?;
        let (own, own_id) = self.executor_on(gryt_agent::executor::network::MODE_JOB)?;
        self.agent_ids.extend([bridge_id, own_id.clone()]);
        let job: gryt_agent::wire::JobSpec =
            serde_json::from_value(json!({"job_id": 1, "pipeline_b64": b64(TRUE_JOB)}))?;
        let mut times: [Vec<Duration>; 2] = Default::default();
        // Round 0 warms both paths up and is not kept.
        for round in 0..=self.sizes.m {
            for (slot, executor) in times.iter_mut().zip([&bridge, &own]) {
                let clock = Instant::now();
                let result = executor.run(&job, &Discard, &JobControl::new()).await;
                if !result.success {
                    bail!("job network figure: a job failed: {:?}", result.error);
                }
                if round > 0 {
                    slot.push(clock.elapsed());
                }
            }
        }
        let left = gryt_agent::executor::network::list_job_networks(&self.docker, &own_id).await?;
        if !left.is_empty() {
            bail!("{} job network(s) of this run are left behind", left.len());
        }
        let [on_bridge, on_own] = times.map(|t| median(&t));
        let r = ratio(on_own.as_secs_f64(), on_bridge.as_secs_f64());
        Ok(vec![row(
            "6. per job: own network (`job`) vs `bridge`, library executor",
            format!("{} (+{})", ms(on_own), ms(on_own.saturating_sub(on_bridge))),
            ms(on_bridge),
            format!("{r:.2}×"),
            "(what a job network adds)",
        )])
    }
}
