//! A job's log in pull mode: its combined output decoded to UTF-8 text and buffered in a file, so
//! memory stays bounded whatever the job prints, until the streamer has it on the server.
//!
//! This module decodes and stores; it sends nothing (see `streamer`).

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

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

/// The log file of one job, written by the executor's output callback, read by the streamer.
pub struct LogFile {
    path: PathBuf,
    reader: File,
    inner: Mutex<Writer>,
    /// Bytes of text in the file so far.
    written: AtomicU64,
}

struct Writer {
    file: File,
    stdout: Utf8Decoder,
    stderr: Utf8Decoder,
    /// Set after a write failed (disk full): later output is dropped, said once in the log.
    broken: bool,
}

impl LogFile {
    /// Creates (truncating) the log file at `path`.
    pub fn create(path: &Path) -> std::io::Result<Self> {
        let file = File::create(path)?;
        let reader = File::open(path)?;
        Ok(Self::from_files(path, file, reader, false, 0))
    }

    /// Opens an existing log (a spooled job's) for reading only.
    pub fn open(path: &Path) -> std::io::Result<Self> {
        let reader = File::open(path)?;
        let len = reader.metadata()?.len();
        let file = File::options().append(true).open(path)?;
        Ok(Self::from_files(path, file, reader, true, len))
    }

    /// `broken`: no more output is taken (a reopened log is complete as it is).
    fn from_files(path: &Path, file: File, reader: File, broken: bool, written: u64) -> Self {
        LogFile {
            path: path.to_owned(),
            reader,
            inner: Mutex::new(Writer {
                file,
                stdout: Utf8Decoder::default(),
                stderr: Utf8Decoder::default(),
                broken,
            }),
            written: AtomicU64::new(written),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes of log text so far.
    pub fn len(&self) -> u64 {
        self.written.load(Ordering::Acquire)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The output ended: flush partial characters.
    pub fn finish(&self) {
        let mut w = self.lock();
        let mut text = String::new();
        w.stdout.finish(&mut text);
        w.stderr.finish(&mut text);
        self.append(&mut w, &text);
    }

    /// Up to `max` bytes of text from `offset`, cut at a character boundary. `None` when `offset`
    /// is not at a character boundary of the log (a server answer that cannot be honoured).
    pub fn read(&self, offset: u64, max: usize) -> std::io::Result<Option<String>> {
        let end = self.len();
        if offset >= end {
            return Ok(Some(String::new()));
        }
        let len = ((end - offset) as usize).min(max);
        let mut buf = vec![0u8; len];
        self.reader.read_exact_at(&mut buf, offset)?;
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

    fn append(&self, w: &mut Writer, text: &str) {
        if text.is_empty() || w.broken {
            return;
        }
        match w.file.write_all(text.as_bytes()) {
            Ok(()) => {
                self.written.fetch_add(text.len() as u64, Ordering::AcqRel);
            }
            Err(e) => {
                w.broken = true;
                tracing::error!(path = %self.path.display(), error = %e, "cannot buffer the job's log; later output is not streamed");
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Writer> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl JobObserver for LogFile {
    fn output(&self, stream: OutputStream, data: &[u8]) {
        let mut w = self.lock();
        let mut text = String::new();
        match stream {
            OutputStream::Stdout => w.stdout.push(data, &mut text),
            OutputStream::Stderr => w.stderr.push(data, &mut text),
        }
        self.append(&mut w, &text);
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

    #[test]
    fn streams_keep_their_own_partial_characters_and_reads_stop_at_boundaries() {
        let dir = tempfile::tempdir().unwrap();
        let log = LogFile::create(&dir.path().join("l")).unwrap();
        let e = "é".as_bytes();
        log.output(OutputStream::Stdout, &e[..1]);
        log.output(OutputStream::Stderr, b"err ");
        log.output(OutputStream::Stdout, &e[1..]);
        log.finish();
        assert_eq!(log.read(0, 100).unwrap().unwrap(), "err é");
        assert_eq!(log.len(), 6);
        // A 5-byte read would cut é in half: it stops before it.
        assert_eq!(log.read(0, 5).unwrap().unwrap(), "err ");
        assert_eq!(log.read(5, 10).unwrap(), None);
        assert_eq!(log.read(6, 10).unwrap().unwrap(), "");
    }
}
