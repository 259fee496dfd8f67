//! Prometheus metrics: what the agent counts, and their text exposition for `GET /metrics`.
//!
//! Every mode reports through [`Metrics`]; names carry the `gryt_agent_` prefix.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModeLabel {
    mode: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FinishedLabels {
    mode: &'static str,
    status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabel {
    call: &'static str,
}

/// Which mode a job came through.
#[derive(Clone, Copy, Debug)]
pub enum Mode {
    Pull,
    Push,
}

impl Mode {
    fn as_str(self) -> &'static str {
        match self {
            Mode::Pull => "pull",
            Mode::Push => "push",
        }
    }
}

pub struct Metrics {
    registry: Registry,
    jobs_started: Family<ModeLabel, Counter>,
    jobs_finished: Family<FinishedLabels, Counter>,
    job_duration: Histogram,
    jobs_running: Gauge,
    slots: Gauge,
    lease_calls: Family<OutcomeLabel, Counter>,
    api_errors: Family<CallLabel, Counter>,
    log_bytes: Counter,
    image_pulls: Family<OutcomeLabel, Counter>,
    not_ready: Family<CauseLabel, Gauge>,
    push_queue: Gauge,
    connections: Gauge,
    gc: GcMetrics,
    adoption: AdoptionCounters,
}

/// Jobs an agent process carried on from an earlier one, and those it gave up on
/// (`crate::state::adopted` counts them).
#[derive(Clone, Debug, Default)]
pub struct AdoptionCounters {
    pub adopted: Counter,
    pub given_up: Counter,
}

/// The disk collector's metrics (`crate::gc`).
#[derive(Default)]
struct GcMetrics {
    runs: Counter,
    images_removed: Counter,
    freed_bytes: Counter,
    last_run: Gauge,
    disk_low: Gauge,
}

impl GcMetrics {
    fn register(&self, registry: &mut Registry) {
        registry.register(
            "disk_collections",
            "Disk collections run",
            self.runs.clone(),
        );
        registry.register(
            "disk_collection_images_removed",
            "Image names removed by the disk collector",
            self.images_removed.clone(),
        );
        registry.register(
            "disk_collection_freed_bytes",
            "Bytes of images the disk collector deleted (Docker's sizes)",
            self.freed_bytes.clone(),
        );
        registry.register(
            "disk_collection_last_run_timestamp_seconds",
            "When the disk collector last ran (Unix time)",
            self.last_run.clone(),
        );
        registry.register(
            "disk_low",
            "1 when free space was still below disk.gc_trigger_free_mb after the last collection",
            self.disk_low.clone(),
        );
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CauseLabel {
    cause: &'static str,
}

impl Metrics {
    pub fn new(slots: usize) -> Self {
        let mut registry = Registry::with_prefix("gryt_agent");
        let jobs_started = Family::<ModeLabel, Counter>::default();
        let jobs_finished = Family::<FinishedLabels, Counter>::default();
        let job_duration = Histogram::new(exponential_buckets(0.5, 2.0, 14));
        let jobs_running = Gauge::default();
        let slots_gauge = Gauge::default();
        let lease_calls = Family::<OutcomeLabel, Counter>::default();
        let api_errors = Family::<CallLabel, Counter>::default();
        let log_bytes = Counter::default();
        let image_pulls = Family::<OutcomeLabel, Counter>::default();
        registry.register(
            "jobs_started",
            "Jobs started, by mode",
            jobs_started.clone(),
        );
        registry.register(
            "jobs_finished",
            "Jobs finished, by mode and status",
            jobs_finished.clone(),
        );
        registry.register(
            "job_duration_seconds",
            "Duration of finished jobs",
            job_duration.clone(),
        );
        registry.register("jobs_running", "Jobs running now", jobs_running.clone());
        registry.register("slots", "Job slots (concurrency)", slots_gauge.clone());
        registry.register(
            "lease_calls",
            "Lease calls to the API, by outcome",
            lease_calls.clone(),
        );
        registry.register(
            "api_errors",
            "Failed calls to the API, by call",
            api_errors.clone(),
        );
        registry.register(
            "log_bytes_streamed",
            "Bytes of job log delivered to the API",
            log_bytes.clone(),
        );
        registry.register(
            "image_pulls",
            "Image pulls, by outcome",
            image_pulls.clone(),
        );
        let not_ready = Family::<CauseLabel, Gauge>::default();
        let push_queue = Gauge::default();
        let connections = Gauge::default();
        registry.register(
            "not_ready",
            "1 while this cause stops the agent from taking jobs (docker, directories, descriptors, disk, infra_failure, not_checked)",
            not_ready.clone(),
        );
        registry.register(
            "push_queue",
            "Push requests waiting for a free slot",
            push_queue.clone(),
        );
        registry.register(
            "connections",
            "Open connections to the local endpoint",
            connections.clone(),
        );
        slots_gauge.set(slots as i64);
        let gc = GcMetrics::default();
        gc.register(&mut registry);
        let adoption = AdoptionCounters::default();
        registry.register(
            "jobs_adopted",
            "Jobs an earlier agent process left running that this one carried on",
            adoption.adopted.clone(),
        );
        registry.register(
            "jobs_given_up",
            "Jobs an earlier agent process left that this one could not carry on",
            adoption.given_up.clone(),
        );
        Metrics {
            registry,
            jobs_started,
            jobs_finished,
            job_duration,
            jobs_running,
            slots: slots_gauge,
            lease_calls,
            api_errors,
            log_bytes,
            image_pulls,
            not_ready,
            push_queue,
            connections,
            gc,
            adoption,
        }
    }

    /// The adopted and given-up jobs' counters, for `crate::state::adopted` to count with.
    pub fn adoption(&self) -> AdoptionCounters {
        self.adoption.clone()
    }

    pub fn job_started(&self, mode: Mode) {
        self.jobs_started
            .get_or_create(&ModeLabel {
                mode: mode.as_str(),
            })
            .inc();
        self.jobs_running.inc();
    }

    pub fn job_finished(&self, mode: Mode, status: crate::wire::JobStatus, duration_seconds: f64) {
        let labels = FinishedLabels {
            mode: mode.as_str(),
            status: status.as_str(),
        };
        self.jobs_finished.get_or_create(&labels).inc();
        self.job_duration.observe(duration_seconds);
        self.jobs_running.dec();
    }

    /// `outcome`: `job`, `empty`, `unauthorized`, `error`.
    pub fn lease_call(&self, outcome: &'static str) {
        self.lease_calls
            .get_or_create(&OutcomeLabel { outcome })
            .inc();
    }

    /// `call`: `lease`, `start`, `heartbeat`, `logs`, `complete`, `callback`.
    pub fn api_error(&self, call: &'static str) {
        self.api_errors.get_or_create(&CallLabel { call }).inc();
    }

    pub fn log_bytes_streamed(&self, bytes: u64) {
        self.log_bytes.inc_by(bytes);
    }

    /// `outcome`: `ok` or `error`.
    pub fn image_pull(&self, outcome: &'static str) {
        self.image_pulls
            .get_or_create(&OutcomeLabel { outcome })
            .inc();
    }

    /// `cause`: one of `state::readiness::Cause`'s names.
    pub fn set_not_ready(&self, cause: &'static str, on: bool) {
        self.not_ready
            .get_or_create(&CauseLabel { cause })
            .set(i64::from(on));
    }

    pub fn set_push_queue(&self, waiting: usize) {
        self.push_queue.set(waiting as i64);
    }

    pub fn set_connections(&self, open: usize) {
        self.connections.set(open as i64);
    }

    /// One disk collection: image names removed, bytes deleted, whether the disk is still low.
    pub fn disk_collection(&self, images_removed: u64, freed_bytes: u64, still_low: bool) {
        self.gc.runs.inc();
        self.gc.images_removed.inc_by(images_removed);
        self.gc.freed_bytes.inc_by(freed_bytes);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        self.gc.last_run.set(now);
        self.gc.disk_low.set(i64::from(still_low));
    }

    /// The warm pool's gauge of ready containers and counter of jobs run in a warm container
    /// (the pool updates them: `executor::warm`).
    pub fn register_warm(&mut self, ready: Gauge, jobs: Counter) {
        self.registry.register(
            "warm_containers",
            "Warm containers ready for the next jobs",
            ready,
        );
        self.registry
            .register("warm_jobs", "Jobs that ran in a warm container", jobs);
    }

    pub fn set_slots(&self, slots: usize) {
        self.slots.set(slots as i64);
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Wraps a job's observer and counts what the metrics need from its events (image pulls).
pub struct CountingObserver<'a> {
    pub inner: &'a dyn crate::executor::JobObserver,
    pub metrics: &'a Metrics,
}

impl crate::executor::JobObserver for CountingObserver<'_> {
    fn output(&self, stream: crate::executor::OutputStream, data: &[u8]) {
        self.inner.output(stream, data);
    }

    fn event(&self, event: crate::executor::JobEvent<'_>) {
        match event {
            crate::executor::JobEvent::PullFinished { .. } => self.metrics.image_pull("ok"),
            crate::executor::JobEvent::PullFailed { .. } => self.metrics.image_pull("error"),
            _ => {}
        }
        self.inner.event(event);
    }

    fn progress<'b>(
        &'b self,
        resume: &'b crate::executor::Resume,
    ) -> futures_util::future::BoxFuture<'b, ()> {
        self.inner.progress(resume)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_show_in_the_exposition() {
        let m = Metrics::new(4);
        m.job_started(Mode::Push);
        m.job_finished(Mode::Push, crate::wire::JobStatus::Failed, 1.5);
        m.lease_call("empty");
        let text = m.encode();
        assert!(
            text.contains("gryt_agent_jobs_started_total{mode=\"push\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("gryt_agent_jobs_finished_total{mode=\"push\",status=\"failed\"} 1"),
            "{text}"
        );
        assert!(text.contains("gryt_agent_slots 4"), "{text}");
        assert!(
            text.contains("gryt_agent_lease_calls_total{outcome=\"empty\"} 1"),
            "{text}"
        );
        assert!(text.contains("gryt_agent_jobs_running 0"), "{text}");
    }

    #[test]
    fn disk_collections_show_in_the_exposition() {
        let m = Metrics::new(1);
        m.disk_collection(3, 4096, true);
        let text = m.encode();
        for line in [
            "gryt_agent_disk_collections_total 1",
            "gryt_agent_disk_collection_images_removed_total 3",
            "gryt_agent_disk_collection_freed_bytes_total 4096",
            "gryt_agent_disk_low 1",
        ] {
            assert!(text.contains(line), "{line} missing in {text}");
        }
        assert!(!text.contains("gryt_agent_disk_collection_last_run_timestamp_seconds 0\n"));
    }

    #[test]
    fn adopted_and_given_up_jobs_show_in_the_exposition() {
        let m = Metrics::new(1);
        let text = m.encode();
        assert!(text.contains("gryt_agent_jobs_adopted_total 0"), "{text}");
        assert!(text.contains("gryt_agent_jobs_given_up_total 0"), "{text}");
        let counters = m.adoption();
        counters.adopted.inc_by(2);
        counters.given_up.inc();
        let text = m.encode();
        assert!(text.contains("gryt_agent_jobs_adopted_total 2"), "{text}");
        assert!(text.contains("gryt_agent_jobs_given_up_total 1"), "{text}");
    }

    #[test]
    fn the_warm_pool_metrics_show_in_the_exposition() {
        let mut m = Metrics::new(2);
        let (ready, jobs) = (Gauge::default(), Counter::default());
        m.register_warm(ready.clone(), jobs.clone());
        ready.set(1);
        jobs.inc_by(3);
        let text = m.encode();
        assert!(text.contains("gryt_agent_warm_containers 1"), "{text}");
        assert!(text.contains("gryt_agent_warm_jobs_total 3"), "{text}");
    }
}
