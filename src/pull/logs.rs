//! A job's log in pull mode: its combined output decoded to UTF-8 text and buffered in a file, so
//! memory stays bounded whatever the job prints, until the streamer has it on the server.
//!
//! This module decodes and stores; it sends nothing (see `streamer`).

use std::fs::File;
use std::io::{Seek, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};

use tokio_util::sync::CancellationToken;

use crate::executor::{JobObserver, OutputStream};

/// Turns a byte stream into UTF-8 text chunk by chunk: a character split across chunks is joined,
/// invalid bytes become U+FFFD.
#[derive(Debug, Default)]
pub struct Utf8Decoder {
    pending: Vec<u8>,
}

impl Utf8Decoder {
    /// Decodes what can be decoded now; an incomplete character at the end waits for more.
    pub fn push(&mut self, data: &[u8], out: &mut String) {
        self.pending.extend_from_slice(data);
        let mut rest: &[u8] = &self.pending;
        loop {
            match std::str::from_utf8(rest) {
                Ok(text) => {
                    out.push_str(text);
                    rest = &[];
                    break;
                }
                Err(e) => {
                    let (valid, after) = rest.split_at(e.valid_up_to());
                    // Valid by construction: `valid_up_to` says so.
                    out.push_str(std::str::from_utf8(valid).unwrap_or_default());
                    match e.error_len() {
                        Some(bad) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            rest = &after[bad..];
                        }
                        None => {
                            rest = after;
                            break;
                        }
                    }
                }
            }
        }
        self.pending = rest.to_vec();
    }

    /// The stream ended: a dangling partial character becomes U+FFFD.
    pub fn finish(&mut self, out: &mut String) {
        if !self.pending.is_empty() {
            self.pending.clear();
            out.push(char::REPLACEMENT_CHARACTER);
        }
    }
}

/// Output accepted but not yet written beyond which the log is cut: the writer thread has
/// fallen this far behind (a disk slower than the job's output), memory must stay bounded.
const MAX_PENDING: u64 = 64 * 1024 * 1024;

/// The log file of one job, written by the executor's output callback, read by the streamer.
///
/// The callback runs on the async runtime, so it only decodes and queues: a thread of the log's
/// own does the file writes and the final fsync. A write that fails (a full disk) cuts the log:
/// a note saying where goes at its end, nothing more is taken, and [`LogFile::cut`] fires so
/// the runner can end the job with `error`.
pub struct LogFile {
    path: PathBuf,
    reader: Arc<File>,
    shared: Arc<Shared>,
    decoders: Mutex<(Utf8Decoder, Utf8Decoder)>,
    queue: Mutex<Option<mpsc::Sender<Msg>>>,
}

struct Shared {
    /// Bytes of text in the file so far.
    written: AtomicU64,
    /// Bytes queued for the writer.
    pending: AtomicU64,
    /// Why the log was cut, once it was.
    cut: Mutex<Option<String>>,
    cut_signal: CancellationToken,
    /// Output still queued is dropped (nothing more will be sent for the job).
    discard: std::sync::atomic::AtomicBool,
}

enum Msg {
    Text(String),
    /// Everything before this is written: fsync and say how it went.
    Sync(tokio::sync::oneshot::Sender<std::io::Result<()>>),
}

impl LogFile {
    /// Creates (truncating, mode 0600) the log file at `path`. `reserve` is a file the writer
    /// deletes when the disk fills, so the note and the job's result still fit.
    pub async fn create(path: &Path, reserve: Option<PathBuf>) -> std::io::Result<Self> {
        let owned = path.to_owned();
        let (file, reader) = blocking(move || {
            let file = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&owned)?;
            Ok((file, File::open(&owned)?))
        })
        .await?;
        let log = Self::new(path, reader, 0);
        let (tx, rx) = mpsc::channel();
        *log.queue.lock().unwrap_or_else(|p| p.into_inner()) = Some(tx);
        let (shared, path) = (log.shared.clone(), log.path.clone());
        std::thread::Builder::new()
            .name("gryt-job-log".into())
            .spawn(move || write_loop(file, &path, &shared, rx, reserve))?;
        Ok(log)
    }

    /// Opens an existing log (a spooled job's) for reading only.
    pub async fn open(path: &Path) -> std::io::Result<Self> {
        let owned = path.to_owned();
        let (reader, len) = blocking(move || {
            let reader = File::open(&owned)?;
            let len = reader.metadata()?.len();
            Ok((reader, len))
        })
        .await?;
        Ok(Self::new(path, reader, len))
    }

    fn new(path: &Path, reader: File, written: u64) -> Self {
        LogFile {
            path: path.to_owned(),
            reader: Arc::new(reader),
            shared: Arc::new(Shared {
                written: AtomicU64::new(written),
                pending: AtomicU64::new(0),
                cut: Mutex::new(None),
                cut_signal: CancellationToken::new(),
                discard: std::sync::atomic::AtomicBool::new(false),
            }),
            decoders: Mutex::new(Default::default()),
            queue: Mutex::new(None),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes of log text in the file so far.
    pub fn len(&self) -> u64 {
        self.shared.written.load(Ordering::Acquire)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Why the log was cut (disk full, writer too slow), if it was.
    pub fn cut(&self) -> Option<String> {
        self.shared
            .cut
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Fires when the log is cut.
    pub fn cut_signal(&self) -> CancellationToken {
        self.shared.cut_signal.clone()
    }

    /// Drops the output still queued and takes no more: the job's log will not be sent (its
    /// lease is gone), so [`LogFile::finish`] need not wait for a backlog to reach the disk.
    pub fn discard(&self) {
        self.shared.discard.store(true, Ordering::Release);
    }

    /// The output ended: flushes partial characters, waits for the writer and fsyncs the file.
    /// Afterwards the log takes no more output.
    pub async fn finish(&self) -> std::io::Result<()> {
        let mut text = String::new();
        {
            let mut d = self.decoders.lock().unwrap_or_else(|p| p.into_inner());
            d.0.finish(&mut text);
            d.1.finish(&mut text);
        }
        self.queue_text(text);
        let Some(tx) = self.queue.lock().unwrap_or_else(|p| p.into_inner()).take() else {
            return Ok(());
        };
        let (reply, answer) = tokio::sync::oneshot::channel();
        if tx.send(Msg::Sync(reply)).is_err() {
            return Err(std::io::Error::other("the log writer stopped"));
        }
        drop(tx);
        answer
            .await
            .unwrap_or_else(|_| Err(std::io::Error::other("the log writer stopped")))
    }

    /// Up to `max` bytes of text from `offset`, cut at a character boundary. `None` when `offset`
    /// is not at a character boundary of the log (a server answer that cannot be honoured).
    pub async fn read(&self, offset: u64, max: usize) -> std::io::Result<Option<String>> {
        let end = self.len();
        if offset >= end {
            return Ok(Some(String::new()));
        }
        let len = ((end - offset) as usize).min(max);
        let reader = self.reader.clone();
        let mut buf = blocking(move || {
            let mut buf = vec![0u8; len];
            reader.read_exact_at(&mut buf, offset)?;
            Ok(buf)
        })
        .await?;
        let valid = match std::str::from_utf8(&buf) {
            Ok(_) => buf.len(),
            Err(e) => e.valid_up_to(),
        };
        if valid == 0 {
            return Ok(None);
        }
        buf.truncate(valid);
        Ok(String::from_utf8(buf).ok())
    }

    fn queue_text(&self, text: String) {
        if text.is_empty()
            || self.shared.cut_signal.is_cancelled()
            || self.shared.discard.load(Ordering::Acquire)
        {
            return;
        }
        let len = text.len() as u64;
        if self.shared.pending.load(Ordering::Acquire) + len > MAX_PENDING {
            self.shared.mark_cut(format!(
                "the job's output came faster than {} could be written",
                self.path.display()
            ));
            return;
        }
        if let Some(tx) = self
            .queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            self.shared.pending.fetch_add(len, Ordering::AcqRel);
            let _ = tx.send(Msg::Text(text));
        }
    }
}

impl Shared {
    fn mark_cut(&self, reason: String) {
        let mut cut = self.cut.lock().unwrap_or_else(|p| p.into_inner());
        if cut.is_none() {
            tracing::error!(reason = %reason, "the job's log is cut");
            *cut = Some(reason);
        }
        self.cut_signal.cancel();
    }
}

/// The log's writer thread: appends queued text, fsyncs on request; on a failed write it cuts
/// the log (dropping a partial write, adding a note) and takes nothing more.
fn write_loop(
    mut file: File,
    path: &Path,
    shared: &Shared,
    rx: mpsc::Receiver<Msg>,
    reserve: Option<PathBuf>,
) {
    for msg in rx {
        match msg {
            Msg::Text(text) => {
                shared
                    .pending
                    .fetch_sub(text.len() as u64, Ordering::AcqRel);
                if shared.cut_signal.is_cancelled() || shared.discard.load(Ordering::Acquire) {
                    continue;
                }
                match file.write_all(text.as_bytes()) {
                    Ok(()) => {
                        shared
                            .written
                            .fetch_add(text.len() as u64, Ordering::AcqRel);
                    }
                    Err(e) => cut_at_failure(&mut file, path, shared, &e, reserve.as_deref()),
                }
            }
            Msg::Sync(reply) => {
                let _ = reply.send(file.sync_all());
            }
        }
    }
}

fn cut_at_failure(
    file: &mut File,
    path: &Path,
    shared: &Shared,
    error: &std::io::Error,
    reserve: Option<&Path>,
) {
    // Frees the room the job's result needs (see `Spool::reserve_path`).
    if let Some(reserve) = reserve {
        let _ = std::fs::remove_file(reserve);
    }
    let at = shared.written.load(Ordering::Acquire);
    let reason = format!(
        "cannot write the job's log to {} ({error}): the disk is full or failing; the log is cut after {at} bytes",
        path.display()
    );
    // A partial write would leave half a character: back to the last whole write.
    let _ = file.set_len(at);
    let note = format!("\n[gryt-agent: the log is cut here: {reason}]\n");
    if file.seek(std::io::SeekFrom::Start(at)).is_ok() && file.write_all(note.as_bytes()).is_ok() {
        shared
            .written
            .fetch_add(note.len() as u64, Ordering::AcqRel);
    } else {
        let _ = file.set_len(at);
    }
    shared.mark_cut(reason);
}

/// Runs blocking file work off the async runtime.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> std::io::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())))
}

impl JobObserver for LogFile {
    fn output(&self, stream: OutputStream, data: &[u8]) {
        if self.shared.cut_signal.is_cancelled() {
            return;
        }
        let mut text = String::new();
        {
            let mut d = self.decoders.lock().unwrap_or_else(|p| p.into_inner());
            match stream {
                OutputStream::Stdout => d.0.push(data, &mut text),
                OutputStream::Stderr => d.1.push(data, &mut text),
            }
        }
        self.queue_text(text);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(chunks: &[&[u8]]) -> String {
        let mut d = Utf8Decoder::default();
        let mut out = String::new();
        for c in chunks {
            d.push(c, &mut out);
        }
        d.finish(&mut out);
        out
    }

    #[test]
    fn a_character_split_across_chunks_is_joined() {
        let euro = "€".as_bytes();
        assert_eq!(
            decode(&[b"a", &euro[..1], &euro[1..2], &euro[2..], b"b"]),
            "a€b"
        );
    }

    #[test]
    fn invalid_bytes_become_replacement_characters() {
        assert_eq!(decode(&[b"a\xffb", b"\xe2\x82"]), "a\u{FFFD}b\u{FFFD}");
        assert_eq!(decode(&[b"\xc3", b"("]), "\u{FFFD}(");
    }

    #[tokio::test]
    async fn streams_keep_their_own_partial_characters_and_reads_stop_at_boundaries() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l");
        let log = LogFile::create(&path, None).await.unwrap();
        let e = "é".as_bytes();
        log.output(OutputStream::Stdout, &e[..1]);
        log.output(OutputStream::Stderr, b"err ");
        log.output(OutputStream::Stdout, &e[1..]);
        log.finish().await.unwrap();
        assert_eq!(log.read(0, 100).await.unwrap().unwrap(), "err é");
        assert_eq!(log.len(), 6);
        // A 5-byte read would cut é in half: it stops before it.
        assert_eq!(log.read(0, 5).await.unwrap().unwrap(), "err ");
        assert_eq!(log.read(5, 10).await.unwrap(), None);
        assert_eq!(log.read(6, 10).await.unwrap().unwrap(), "");
        assert!(log.cut().is_none());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
