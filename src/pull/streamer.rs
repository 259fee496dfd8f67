//! Sends a job's log file to the API in chunks, continuing from the server's `committed` each
//! time (resending what it lacks, skipping what it has), until the whole log is there.
//!
//! It reads the log; it never writes it, and it never completes the job.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::Ctx;
use super::logs::LogFile;
use crate::api::LogsOutcome;
use crate::wire::pull::LogChunk;

/// Largest `data` in one chunk, in bytes (the contract's limit is 1 MiB).
pub const MAX_CHUNK: usize = 1024 * 1024;
/// How often new output is sent while it flows (the contract asks for at least once a second).
pub const FLUSH_EVERY: Duration = Duration::from_millis(500);

/// Answers in a row that take none of the log before the streamer gives up on it (a minute at
/// [`FLUSH_EVERY`]); the job is then completed without the rest, as after a refused log.
const MAX_STALLS: u32 = 120;

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
}

impl Streamer {
    pub fn new(ctx: Arc<Ctx>, job_id: i64, lease_id: String, log: Arc<LogFile>) -> Self {
        Streamer {
            ctx,
            job_id,
            lease_id,
            log,
            committed: 0,
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

    /// Sends everything written so far.
    async fn push(&mut self) -> Result<(), StreamEnd> {
        let mut stalls = 0;
        while self.committed < self.log.len() {
            let data = match self.log.read(self.committed, MAX_CHUNK) {
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
            let chunk = LogChunk {
                lease_id: self.lease_id.clone(),
                offset: self.committed,
                data,
            };
            match self.ctx.client.logs(self.job_id, &chunk).await {
                Ok(LogsOutcome::Committed(n)) => {
                    if n > self.committed {
                        self.ctx
                            .state
                            .metrics
                            .log_bytes_streamed(n - self.committed);
                        self.committed = n;
                        stalls = 0;
                    } else {
                        // The server took nothing new (it may have lost what it had): resend from
                        // what it says, after a pause so a stuck server is not hammered; but not
                        // forever, or the job would hold its slot for good.
                        stalls += 1;
                        if stalls > MAX_STALLS {
                            tracing::error!(
                                job_id = self.job_id,
                                committed = n,
                                "the API keeps taking none of the job's log; not streaming the rest"
                            );
                            return Err(StreamEnd::Stopped);
                        }
                        self.committed = n;
                        tokio::time::sleep(FLUSH_EVERY).await;
                    }
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
}
