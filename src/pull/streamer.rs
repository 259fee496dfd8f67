//! Sends a job's log file to the API in chunks, continuing from the server's `committed` each
//! time (resending what it lacks, skipping what it has), until the whole log is there, or until
//! the log has made no progress for `log_give_up_seconds`.
//!
//! A `committed` beyond what was sent is a protocol error: logged, and streaming continues from
//! what was sent, so no output is ever skipped on the server's word.
//!
//! It reads the log; it never writes it, and it never completes the job.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::Ctx;
use super::logs::LogFile;
use crate::api::LogsOutcome;
use crate::wire::pull::LogChunk;

/// Largest `data` in one chunk, in bytes (the contract's limit is 1 MiB).
pub const MAX_CHUNK: usize = 1024 * 1024;
/// How often new output is sent while it flows (the contract asks for at least once a second).
pub const FLUSH_EVERY: Duration = Duration::from_millis(500);

/// How streaming ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamEnd {
    /// The server holds the whole log.
    Delivered,
    /// The lease is gone: send nothing more for this job.
    Lost,
    /// The server refused the log for good (logged), or the agent was told to stop at once.
    Stopped,
}

pub struct Streamer {
    ctx: Arc<Ctx>,
    job_id: i64,
    lease_id: String,
    log: Arc<LogFile>,
    committed: u64,
    /// No progress for this long: the rest of the log is not sent.
    give_up_after: Duration,
    /// A `committed` beyond what was sent was logged (once per job).
    overshoot_logged: bool,
}

impl Streamer {
    pub fn new(ctx: Arc<Ctx>, job_id: i64, lease_id: String, log: Arc<LogFile>) -> Self {
        Streamer {
            job_id,
            lease_id,
            give_up_after: Duration::from_secs(ctx.state.settings.log_give_up_seconds),
            ctx,
            log,
            committed: 0,
            overshoot_logged: false,
        }
    }

    /// Streams while the job runs; after `done`, sends the rest and returns once the server has
    /// it all. `give_up` stops it at once (lease lost, second signal).
    pub async fn run(mut self, done: CancellationToken, give_up: CancellationToken) -> StreamEnd {
        loop {
            let finished = done.is_cancelled();
            let pushed = tokio::select! {
                biased;
                _ = give_up.cancelled() => return StreamEnd::Stopped,
                r = self.push() => r,
            };
            if let Err(end) = pushed {
                return end;
            }
            if finished {
                return StreamEnd::Delivered;
            }
            tokio::select! {
                _ = give_up.cancelled() => return StreamEnd::Stopped,
                _ = done.cancelled() => {}
                _ = tokio::time::sleep(FLUSH_EVERY) => {}
            }
        }
    }

    /// [`Streamer::run`]; for a job carried on after a restart (`from_server`), whose log is
    /// made again from its start, the server is first asked what it holds, and only what lies
    /// beyond is sent, as the log grows past it.
    pub async fn run_from_server(
        mut self,
        done: CancellationToken,
        give_up: CancellationToken,
        from_server: bool,
    ) -> StreamEnd {
        if from_server {
            let probe = LogChunk {
                lease_id: self.lease_id.clone(),
                offset: 0,
                data: String::new(),
            };
            let asked = tokio::select! {
                _ = give_up.cancelled() => return StreamEnd::Stopped,
                r = self.ctx.client.logs(self.job_id, &probe) => r,
            };
            match asked {
                Ok(LogsOutcome::Committed(n)) => self.committed = n,
                Ok(LogsOutcome::Lost(_)) => return StreamEnd::Lost,
                // Sent from the start then: the server skips what it has.
                Err(e) => {
                    tracing::warn!(job_id = self.job_id, error = %e, "cannot ask the API how much of the job's log it holds")
                }
            }
        }
        let committed = self.committed;
        let (job_id, log) = (self.job_id, self.log.clone());
        let end = self.run(done, give_up).await;
        if from_server && end == StreamEnd::Delivered && log.len() < committed {
            tracing::error!(
                job_id,
                committed,
                log_bytes = log.len(),
                "the carried-on job's log, read again, is shorter than what the API held"
            );
        }
        end
    }

    /// Asks the server what it holds (an empty chunk at offset 0) and sends the rest: for a log
    /// left in the spool by an earlier run.
    pub async fn resume(mut self, give_up: CancellationToken) -> StreamEnd {
        let probe = LogChunk {
            lease_id: self.lease_id.clone(),
            offset: 0,
            data: String::new(),
        };
        let sent = tokio::select! {
            _ = give_up.cancelled() => return StreamEnd::Stopped,
            r = self.ctx.client.logs(self.job_id, &probe) => r,
        };
        match sent {
            // Earlier runs sent the log up to its length at most: more is a protocol error, and
            // the whole log is sent again (the server skips what it has).
            Ok(LogsOutcome::Committed(n)) if n > self.log.len() => self.overshoot(n, 0),
            Ok(LogsOutcome::Committed(n)) => self.committed = n,
            Ok(LogsOutcome::Lost(_)) => return StreamEnd::Lost,
            Err(e) => {
                tracing::error!(job_id = self.job_id, error = %e, "the API refused the job's log");
                return StreamEnd::Stopped;
            }
        }
        tokio::select! {
            _ = give_up.cancelled() => StreamEnd::Stopped,
            r = self.push() => r.err().unwrap_or(StreamEnd::Delivered),
        }
    }

    /// A `committed` beyond `sent`: logged once, and streaming goes on from `sent`.
    fn overshoot(&mut self, committed: u64, sent: u64) {
        if !self.overshoot_logged {
            tracing::error!(
                job_id = self.job_id,
                committed,
                sent,
                "protocol error: the API's `committed` is beyond what was sent; continuing from what was sent"
            );
            self.overshoot_logged = true;
        }
        self.committed = sent;
    }

    /// Sends everything written so far, or gives up after `give_up_after` without progress.
    async fn push(&mut self) -> Result<(), StreamEnd> {
        let mut last_progress = Instant::now();
        while self.committed < self.log.len() {
            let data = match self.log.read(self.committed, MAX_CHUNK).await {
                Ok(Some(data)) => data,
                Ok(None) => {
                    tracing::error!(
                        job_id = self.job_id,
                        committed = self.committed,
                        "the API's `committed` is not at a character boundary of the log; not streaming the rest"
                    );
                    return Err(StreamEnd::Stopped);
                }
                Err(e) => {
                    tracing::error!(job_id = self.job_id, error = %e, "cannot read the buffered log");
                    return Err(StreamEnd::Stopped);
                }
            };
            let sent = self.committed + data.len() as u64;
            let chunk = LogChunk {
                lease_id: self.lease_id.clone(),
                offset: self.committed,
                data,
            };
            let give_up_at = last_progress + self.give_up_after;
            let answer = tokio::select! {
                r = self.ctx.client.logs(self.job_id, &chunk) => r,
                _ = tokio::time::sleep_until(give_up_at) => return Err(self.give_up()),
            };
            match answer {
                Ok(LogsOutcome::Committed(n)) => {
                    if n > sent {
                        self.overshoot(n, sent);
                    } else if n > self.committed {
                        self.ctx
                            .state
                            .metrics
                            .log_bytes_streamed(n - self.committed);
                        self.committed = n;
                    } else {
                        // The server took nothing new (it may have lost what it had): resend
                        // from what it says, after a pause so a stuck server is not hammered.
                        self.committed = n;
                        tokio::select! {
                            _ = tokio::time::sleep(FLUSH_EVERY) => {}
                            _ = tokio::time::sleep_until(give_up_at) => return Err(self.give_up()),
                        }
                        continue;
                    }
                    last_progress = Instant::now();
                }
                Ok(LogsOutcome::Lost(_)) => return Err(StreamEnd::Lost),
                Err(e) => {
                    tracing::error!(job_id = self.job_id, error = %e, "the API refused the job's log");
                    return Err(StreamEnd::Stopped);
                }
            }
        }
        Ok(())
    }

    fn give_up(&self) -> StreamEnd {
        tracing::error!(
            job_id = self.job_id,
            committed = self.committed,
            log_bytes = self.log.len(),
            give_up_seconds = self.give_up_after.as_secs(),
            "the job's log made no progress on the API for log_give_up_seconds; not streaming the rest"
        );
        StreamEnd::Stopped
    }
}
