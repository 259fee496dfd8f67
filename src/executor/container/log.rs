//! A job container's output as one stream of pieces (output and marks), and each command's
//! share of it.
//!
//! Every command of a job writes into its container's main-process stdout and stderr, never
//! into pipes of its own (an exec's are gone when nobody is attached to it). Docker's log
//! driver `local` keeps those two streams, in order and apart, while no agent reads them; the
//! agent reads them live through an attach opened before the container starts, and a
//! restarted agent reads them back from the log (`executor::adopt`). Marks (`marks.rs`) cut
//! the stream into commands.

use std::collections::VecDeque;
use std::sync::Arc;

use bollard::container::LogOutput;
use bollard::models::HostConfigLogConfig;
use futures_util::StreamExt;

use super::OutputStream;
use super::marks::{Kind, MarkId, Piece, Scanner};

/// How Docker keeps a job container's output: the `local` driver (compact, rotated files),
/// at most [`LOG_FILES`] files of [`LOG_FILE_SIZE`]. Uncompressed: rotation must not cost the
/// engine CPU under a job printing fast.
pub const LOG_DRIVER: &str = "local";
pub const LOG_FILE_SIZE: &str = "64m";
pub const LOG_FILES: &str = "4";

pub fn log_config() -> HostConfigLogConfig {
    HostConfigLogConfig {
        typ: Some(LOG_DRIVER.into()),
        config: Some(
            [
                ("max-size", LOG_FILE_SIZE),
                ("max-file", LOG_FILES),
                ("compress", "false"),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
        ),
    }
}

/// A stream of a container's (or an exec's) output as Docker gives it.
pub(super) type OutputStreamOf = std::pin::Pin<
    Box<dyn futures_util::Stream<Item = Result<LogOutput, bollard::errors::Error>> + Send>,
>;

/// One piece of one stream.
pub type Item = (OutputStream, Piece);

/// The container's two streams read as pieces, with pieces a command read past its end given
/// back for the next one.
pub struct ContainerLog {
    source: OutputStreamOf,
    scanners: [Scanner; 2],
    pending: VecDeque<Item>,
    ended: bool,
}

fn index(stream: OutputStream) -> usize {
    match stream {
        OutputStream::Stdout => 0,
        OutputStream::Stderr => 1,
    }
}

impl ContainerLog {
    pub fn new(source: OutputStreamOf) -> Self {
        ContainerLog {
            source,
            scanners: Default::default(),
            pending: VecDeque::new(),
            ended: false,
        }
    }

    /// The next piece; `None` once the container's output ended (it stopped).
    pub async fn next(&mut self) -> Option<Result<Item, bollard::errors::Error>> {
        loop {
            if let Some(item) = self.pending.pop_front() {
                return Some(Ok(item));
            }
            if self.ended {
                return None;
            }
            let (stream, bytes) = match self.source.next().await {
                Some(Ok(LogOutput::StdOut { message })) => (OutputStream::Stdout, message),
                Some(Ok(LogOutput::StdErr { message })) => (OutputStream::Stderr, message),
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Some(Err(e)),
                None => {
                    self.ended = true;
                    let mut out = Vec::new();
                    for stream in [OutputStream::Stdout, OutputStream::Stderr] {
                        self.scanners[index(stream)].finish(&mut out);
                        self.pending.extend(out.drain(..).map(|p| (stream, p)));
                    }
                    continue;
                }
            };
            let mut out = Vec::new();
            self.scanners[index(stream)].push(&bytes, &mut out);
            self.pending.extend(out.into_iter().map(|p| (stream, p)));
        }
    }

    /// Gives back pieces read past a command's end, to be read first, in their order.
    fn put_back(&mut self, items: Vec<Item>) {
        for item in items.into_iter().rev() {
            self.pending.push_front(item);
        }
    }
}

/// The output of a container whose only command is its main process: all of it, without marks.
pub fn main_output(log: ContainerLog) -> OutputStreamOf {
    Box::pin(futures_util::stream::unfold(log, |mut log| async move {
        loop {
            match log.next().await? {
                Ok((stream, Piece::Data(data))) => return Some((Ok(output(stream, data)), log)),
                Ok((_, Piece::Mark { .. })) => continue,
                Err(e) => {
                    log.ended = true;
                    log.pending.clear();
                    return Some((Err(e), log));
                }
            }
        }
    }))
}

/// What a command's output stream learned of its end.
#[derive(Debug, Default)]
pub struct EndSeen {
    /// Both end marks were read.
    pub complete: std::sync::atomic::AtomicBool,
    /// The status the stdout end mark carried (the wrapper's `$?`).
    pub status: std::sync::Mutex<Option<i64>>,
    pub notify: tokio::sync::Notify,
}

impl EndSeen {
    pub fn is_complete(&self) -> bool {
        self.complete.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn status(&self) -> Option<i64> {
        *self.status.lock().unwrap_or_else(|e| e.into_inner())
    }
}

struct CommandRead {
    log: tokio::sync::OwnedMutexGuard<ContainerLog>,
    id: MarkId,
    done: [bool; 2],
    /// Pieces of a stream read after that stream's end mark: the next command's.
    later: Vec<Item>,
    end: Arc<EndSeen>,
    failed: bool,
}

/// One exec's share of the container's output: the pieces up to its end mark on each stream.
/// Marks of other ids are dropped (the head mark; an end mark written twice). Ends early when
/// the container's output ends (the container stopped).
pub fn command_output(
    log: tokio::sync::OwnedMutexGuard<ContainerLog>,
    id: MarkId,
    end: Arc<EndSeen>,
) -> OutputStreamOf {
    let read = CommandRead {
        log,
        id,
        done: [false; 2],
        later: Vec::new(),
        end,
        failed: false,
    };
    Box::pin(futures_util::stream::unfold(read, |mut read| async move {
        if read.failed {
            return None;
        }
        loop {
            if read.done == [true, true] {
                let later = std::mem::take(&mut read.later);
                read.log.put_back(later);
                read.end
                    .complete
                    .store(true, std::sync::atomic::Ordering::SeqCst);
                read.end.notify.notify_waiters();
                return None;
            }
            let item = match read.log.next().await {
                None => return None,
                Some(Err(e)) => {
                    read.failed = true;
                    return Some((Err(e), read));
                }
                Some(Ok(item)) => item,
            };
            match item {
                (stream, Piece::Data(data)) if !read.done[index(stream)] => {
                    return Some((Ok(output(stream, data)), read));
                }
                (
                    _,
                    Piece::Mark {
                        id,
                        kind: Kind::Start,
                    },
                ) if id == read.id => {}
                (stream, Piece::Mark { id, kind }) if id == read.id => {
                    read.done[index(stream)] = true;
                    if let Kind::Status(status) = kind {
                        *read.end.status.lock().unwrap_or_else(|e| e.into_inner()) = Some(status);
                    }
                }
                (_, Piece::Mark { .. }) => {}
                later => read.later.push(later),
            }
        }
    }))
}

fn output(stream: OutputStream, data: Vec<u8>) -> LogOutput {
    match stream {
        OutputStream::Stdout => LogOutput::StdOut {
            message: data.into(),
        },
        OutputStream::Stderr => LogOutput::StdErr {
            message: data.into(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(items: Vec<LogOutput>) -> OutputStreamOf {
        Box::pin(futures_util::stream::iter(items.into_iter().map(Ok)))
    }

    fn out(text: &str) -> LogOutput {
        LogOutput::StdOut {
            message: text.as_bytes().to_vec().into(),
        }
    }

    fn err(text: &str) -> LogOutput {
        LogOutput::StdErr {
            message: text.as_bytes().to_vec().into(),
        }
    }

    async fn collect(stream: OutputStreamOf) -> Vec<String> {
        stream
            .map(|item| match item.unwrap() {
                LogOutput::StdOut { message } => format!("o:{}", String::from_utf8_lossy(&message)),
                LogOutput::StdErr { message } => format!("e:{}", String::from_utf8_lossy(&message)),
                _ => unreachable!(),
            })
            .collect()
            .await
    }

    #[tokio::test]
    async fn each_command_reads_up_to_its_marks_and_leaves_the_rest_to_the_next() {
        let (head, one, two) = (MarkId::random(), MarkId::random(), MarkId::random());
        let mark = |id: &MarkId, status: Option<i64>| match status {
            Some(s) => format!("\x1egryt:{}:{s}\x1e\n", id.as_str()),
            None => format!("\x1egryt:{}\x1e\n", id.as_str()),
        };
        let start = |id: &MarkId| format!("\x1egryt:{}:s\x1e\n", id.as_str());
        let log = ContainerLog::new(source(vec![
            out(&mark(&head, None)),
            out(&start(&one)),
            out("one\npart"),
            err("e1\n"),
            out(&mark(&one, Some(4))),
            out("bg\n"),
            err(&mark(&one, None)),
            out(&format!("two{}", mark(&two, Some(0)))),
            err(&mark(&two, None)),
        ]));
        let log = Arc::new(tokio::sync::Mutex::new(log));
        let end = Arc::new(EndSeen::default());
        let first = command_output(log.clone().lock_owned().await, one, end.clone());
        assert_eq!(collect(first).await, ["o:one\npart", "e:e1\n"]);
        assert!(end.is_complete());
        assert_eq!(end.status(), Some(4));
        let end = Arc::new(EndSeen::default());
        let second = command_output(log.clone().lock_owned().await, two, end.clone());
        assert_eq!(collect(second).await, ["o:bg\n", "o:two"]);
        assert_eq!(end.status(), Some(0));
    }

    #[tokio::test]
    async fn the_main_process_output_is_everything_but_marks() {
        let head = MarkId::random();
        let log = ContainerLog::new(source(vec![
            out(&format!("\x1egryt:{}\x1e\n", head.as_str())),
            out("a"),
            err("b"),
            out("c\n"),
        ]));
        assert_eq!(collect(main_output(log)).await, ["o:a", "e:b", "o:c\n"]);
    }

    #[tokio::test]
    async fn a_command_whose_container_stopped_ends_without_its_marks() {
        let log = ContainerLog::new(source(vec![out("x\n")]));
        let log = Arc::new(tokio::sync::Mutex::new(log));
        let end = Arc::new(EndSeen::default());
        let read = command_output(log.lock_owned().await, MarkId::random(), end.clone());
        assert_eq!(collect(read).await, ["o:x\n"]);
        assert!(!end.is_complete());
    }
}
