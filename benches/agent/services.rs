//! Figure: what one service container adds to a job's time. The library executor on the job's
//! own network (`docker.network = job`) runs the same one-step job without and with a service
//! (busybox `httpd` from the job image, with a `ready_port`), alternating, medians of M each.

use super::*;

/// The service: serves an empty directory on port 8080 once started.
const WITH_SERVICE: &str = "version: 1\nsteps:\n  - run: \"true\"\nservices:\n  - name: web\n    image: IMAGE\n    command: \"exec httpd -f -p 8080 -h /tmp\"\n    ready_port: 8080\n";

impl Bench {
    pub(crate) async fn services(&mut self) -> anyhow::Result<Vec<Row>> {
        let m = self.sizes.m;
        let mut settings = Settings::load_from(None, &[], &[])?;
        settings.docker.image = self.hard.image.clone();
        settings.docker.pull_policy = PullPolicy::Never;
        settings.docker.network = "job".into();
        settings.work_dir = Some(self.work.path().to_owned());
        let id = format!("bench-svc-{}-{}", std::process::id(), next_id());
        let executor = Executor::new(ExecutorSettings::from_settings(&settings, id.clone())?)?;
        self.agent_ids.push(id);
        let with = WITH_SERVICE.replace("IMAGE", &self.hard.image);
        let jobs: [gryt_agent::wire::JobSpec; 2] = [
            serde_json::from_value(json!({"job_id": 1, "pipeline_b64": b64(TRUE_JOB)}))?,
            serde_json::from_value(json!({"job_id": 2, "pipeline_b64": b64(&with)}))?,
        ];
        let mut times: [Vec<Duration>; 2] = Default::default();
        // Round 0 warms both paths up and is not kept.
        for round in 0..=m {
            for (job, slot) in jobs.iter().zip(times.iter_mut()) {
                let clock = Instant::now();
                let result = executor.run(job, &Discard, &JobControl::new()).await;
                if !result.success {
                    bail!("job {} failed: {:?}", job.job_id, result.error);
                }
                if round > 0 {
                    slot.push(clock.elapsed());
                }
            }
        }
        let [without, with] = times.map(|t| median(&t));
        let added = with.saturating_sub(without);
        Ok(vec![
            row(
                "7. per job: job network, no service",
                ms(without),
                "—".into(),
                "1.00×".into(),
                "(baseline)",
            ),
            row(
                "7. per job: job network + one service (ready_port)",
                ms(with),
                ms(without),
                format!("{:.2}×", ratio(with.as_secs_f64(), without.as_secs_f64())),
                &format!("context: one service adds {}", ms(added)),
            ),
        ])
    }
}
