//! Watching one service container: its output, read from the attach stream, masked and kept as
//! a bounded tail; and its end (exit code, OOM kill), learnt when that stream ends.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use bollard::Docker;
use bollard::container::LogOutput;
use futures_util::{Stream, StreamExt};
use tokio::sync::watch;
use tokio_util::task::AbortOnDropHandle;

use crate::secrets::mask::{Masker, StreamMasker};
use crate::wire::service::{OUTPUT_TAIL_BYTES, OUTPUT_TAIL_LINES};

type Output = Pin<Box<dyn Stream<Item = Result<LogOutput, bollard::errors::Error>> + Send>>;

/// How a service's main process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Ended {
    /// `None` when the engine could not say (it went away, or the container did).
    pub exit_code: Option<i64>,
    pub oom_killed: bool,
}

/// The masked tail of a service's output so far.
struct Tail {
    masker: StreamMasker,
    /// The last bytes, twice as many as the result keeps: its lines are cut from them whole.
    kept: VecDeque<u8>,
}

impl Tail {
    fn push(&mut self, data: &[u8]) {
        self.kept.extend(data);
        let over = self.kept.len().saturating_sub(OUTPUT_TAIL_BYTES * 2);
        self.kept.drain(..over);
    }
}

pub(super) struct Watch {
    tail: Arc<Mutex<Tail>>,
    ended: watch::Receiver<Option<Ended>>,
    task: Option<AbortOnDropHandle<()>>,
}

impl Watch {
    /// Reads `output` until it ends, then asks the engine how the container ended.
    pub fn spawn(docker: Docker, id: String, output: Output, masker: Masker) -> Self {
        let tail = Arc::new(Mutex::new(Tail {
            masker: masker.stream(),
            kept: VecDeque::new(),
        }));
        let (sender, ended) = watch::channel(None);
        let task = tokio::spawn(read(docker, id, output, tail.clone(), sender));
        Watch {
            tail,
            ended,
            task: Some(AbortOnDropHandle::new(task)),
        }
    }

    /// How the service ended, if it has.
    pub fn ended(&self) -> Option<Ended> {
        *self.ended.borrow()
    }

    /// Waits until the service ends (forever while it runs).
    pub async fn until_ended(&self) -> Ended {
        let mut ended = self.ended.clone();
        loop {
            if let Some(e) = *ended.borrow_and_update() {
                return e;
            }
            if ended.changed().await.is_err() {
                // The reader is gone without a word (aborted): nothing more will come.
                std::future::pending::<()>().await;
            }
        }
    }

    /// Stops reading and returns the output's last lines (masked; what the masker held back
    /// as a possible start of a secret is released through it).
    pub fn stop_and_tail(&mut self) -> String {
        drop(self.task.take());
        let mut tail = self.tail.lock().unwrap_or_else(|e| e.into_inner());
        let rest = tail.masker.finish();
        tail.push(&rest);
        last_lines(tail.kept.make_contiguous())
    }
}

async fn read(
    docker: Docker,
    id: String,
    mut output: Output,
    tail: Arc<Mutex<Tail>>,
    ended: watch::Sender<Option<Ended>>,
) {
    while let Some(Ok(chunk)) = output.next().await {
        let bytes = match chunk {
            LogOutput::StdOut { message }
            | LogOutput::StdErr { message }
            | LogOutput::Console { message } => message,
            LogOutput::StdIn { .. } => continue,
        };
        let mut kept = tail.lock().unwrap_or_else(|e| e.into_inner());
        let masked = kept.masker.push(&bytes);
        kept.push(&masked);
    }
    let inspect = docker.inspect_container(&id, None).await.ok();
    let state = inspect.and_then(|i| i.state);
    let end = Ended {
        exit_code: state.as_ref().and_then(|s| s.exit_code),
        oom_killed: state.and_then(|s| s.oom_killed) == Some(true),
    };
    let _ = ended.send(Some(end));
}

/// The last [`OUTPUT_TAIL_LINES`] lines of `bytes`, at most [`OUTPUT_TAIL_BYTES`], as text. A
/// cut never splits a line (unless one line alone is longer) nor a character.
pub(super) fn last_lines(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let body_end = text.strip_suffix('\n').map_or(text.len(), str::len);
    // Where each line starts, the last line first.
    let mut starts = text[..body_end]
        .rmatch_indices('\n')
        .map(|(i, _)| i + 1)
        .chain(std::iter::once(0))
        .peekable();
    let last_line = starts.peek().copied().unwrap_or(0);
    let mut start = None;
    for (count, candidate) in starts.enumerate() {
        if count == OUTPUT_TAIL_LINES || text.len() - candidate > OUTPUT_TAIL_BYTES {
            break;
        }
        start = Some(candidate);
    }
    let mut kept = &text[start.unwrap_or(last_line)..];
    if kept.len() > OUTPUT_TAIL_BYTES {
        let mut cut = kept.len() - OUTPUT_TAIL_BYTES;
        while !kept.is_char_boundary(cut) {
            cut += 1;
        }
        kept = &kept[cut..];
    }
    kept.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_last_lines() {
        let text: String = (0..200).map(|i| format!("line {i}\n")).collect();
        let tail = last_lines(text.as_bytes());
        assert_eq!(tail.lines().count(), OUTPUT_TAIL_LINES);
        assert!(tail.starts_with("line 150\n"), "{tail}");
        assert!(tail.ends_with("line 199\n"), "{tail}");
        assert_eq!(last_lines(b"one\ntwo"), "one\ntwo");
        assert_eq!(last_lines(b"only"), "only");
        assert_eq!(last_lines(b""), "");
    }

    #[test]
    fn keeps_at_most_the_byte_cap_and_whole_characters() {
        let long = "é".repeat(OUTPUT_TAIL_BYTES);
        let tail = last_lines(format!("first\n{long}\n").as_bytes());
        assert!(tail.len() <= OUTPUT_TAIL_BYTES, "{}", tail.len());
        assert!(tail.ends_with("é\n"));
        let lines: String = (0..40).map(|_| format!("{}\n", "x".repeat(300))).collect();
        let tail = last_lines(lines.as_bytes());
        assert!(tail.len() <= OUTPUT_TAIL_BYTES);
        assert!(tail.starts_with('x') && tail.lines().all(|l| l.len() == 300));
    }
}
