//! The masking `tracing` writer: the agent's own log lines pass through the masker of the
//! registered global secrets (API keys, encryption keys, decrypted tokens) before stderr.

use std::io::{self, Write};
use std::sync::RwLock;

use secrecy::{ExposeSecret, SecretString};
use tracing_subscriber::fmt::MakeWriter;

use super::{MIN_SECRET_CHARS, Masker};

/// Secrets masked in everything [`MaskingMakeWriter`] writes: kept as the secrets (to rebuild
/// from) and the masker built from them.
struct GlobalSecrets {
    secrets: Vec<SecretString>,
    masker: Masker,
}

static GLOBAL: RwLock<GlobalSecrets> = RwLock::new(GlobalSecrets {
    secrets: Vec::new(),
    masker: Masker::empty(),
});

/// Adds a secret that the agent's own log output must never show (API key, encryption key, a
/// decrypted token). Too-short and already-registered secrets are ignored.
pub fn register_global_secret(secret: SecretString) {
    let value = secret.expose_secret();
    if value.chars().count() < MIN_SECRET_CHARS {
        return;
    }
    // The log writer sees formatted lines: a JSON log line and a `?field` escape `"`, `\` and
    // control characters, so a secret holding one of them is also masked as it appears there.
    let mut forms = vec![value.to_owned()];
    let quoted = [
        serde_json::to_string(value).unwrap_or_default(),
        format!("{value:?}"),
    ];
    for quoted in quoted {
        if let Some(escaped) = quoted.strip_prefix('"').and_then(|q| q.strip_suffix('"'))
            && !forms.iter().any(|f| f == escaped)
        {
            forms.push(escaped.to_owned());
        }
    }
    // A poisoned lock only means another thread panicked mid-update; the data is still a valid
    // list, and refusing to mask would be worse.
    let mut global = GLOBAL.write().unwrap_or_else(|e| e.into_inner());
    let before = global.secrets.len();
    for form in forms {
        if !global.secrets.iter().any(|s| s.expose_secret() == form) {
            global.secrets.push(SecretString::from(form));
        }
    }
    if global.secrets.len() != before {
        global.masker = Masker::new(global.secrets.iter().map(|s| s.expose_secret()));
    }
}

/// The masker for the registered global secrets, as it is now.
pub fn global_masker() -> Masker {
    GLOBAL
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .masker
        .clone()
}

/// A `tracing_subscriber` writer that masks the [global secrets](register_global_secret) in
/// each log line before passing it on (to stderr by default).
#[derive(Debug, Clone)]
pub struct MaskingMakeWriter<M = fn() -> io::Stderr> {
    inner: M,
}

impl MaskingMakeWriter {
    pub fn stderr() -> Self {
        MaskingMakeWriter { inner: io::stderr }
    }
}

impl Default for MaskingMakeWriter {
    fn default() -> Self {
        Self::stderr()
    }
}

impl<M> MaskingMakeWriter<M> {
    /// Masks what `inner` would be given.
    pub fn new(inner: M) -> Self {
        MaskingMakeWriter { inner }
    }
}

impl<'a, M: MakeWriter<'a>> MakeWriter<'a> for MaskingMakeWriter<M> {
    type Writer = MaskingWriter<M::Writer>;

    fn make_writer(&'a self) -> Self::Writer {
        MaskingWriter::new(self.inner.make_writer())
    }

    fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> Self::Writer {
        MaskingWriter::new(self.inner.make_writer_for(meta))
    }
}

/// One log event's writer: collects the event and writes it masked when flushed or dropped.
/// Collecting the whole event means a secret is never split across two writes.
pub struct MaskingWriter<W: Write> {
    inner: W,
    buf: Vec<u8>,
}

impl<W: Write> MaskingWriter<W> {
    fn new(inner: W) -> Self {
        MaskingWriter {
            inner,
            buf: Vec::new(),
        }
    }

    fn emit(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let masked = global_masker().mask_bytes(&self.buf);
        self.buf.clear();
        self.inner.write_all(&masked)
    }
}

impl<W: Write> Write for MaskingWriter<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.emit()?;
        self.inner.flush()
    }
}

impl<W: Write> Drop for MaskingWriter<W> {
    fn drop(&mut self) {
        // A log line that cannot be written has nowhere to report the failure.
        let _ = self.emit();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// A writer target the tests can read back.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, data: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(data);
            Ok(data.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Sink {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }

    #[test]
    fn a_secret_is_masked_as_json_and_debug_formatting_escape_it() {
        register_global_secret(SecretString::from("qu0te\"back\\slash-key"));
        let masker = global_masker();
        for line in [
            r#"{"key":"qu0te\"back\\slash-key"}"#,
            r#"key="qu0te\"back\\slash-key""#,
            "raw qu0te\"back\\slash-key",
        ] {
            let masked = masker.mask_str(line);
            assert!(!masked.contains("slash-key"), "{line} -> {masked}");
        }
    }

    #[test]
    fn the_tracing_writer_masks_registered_secrets() {
        // Secrets unique to this test: the registry is process-wide.
        register_global_secret(SecretString::from("tr4cing-api-key-7Qx"));
        register_global_secret(SecretString::from("tr4cing-api-key-7Qx"));
        register_global_secret(SecretString::from("ab"));
        let sink = Sink::default();
        let target = sink.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(MaskingMakeWriter::new(move || target.clone()))
            .with_ansi(false)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            tracing::warn!(
                key = "tr4cing-api-key-7Qx",
                "sending tr4cing-api-key-7Qx ab"
            );
            register_global_secret(SecretString::from("l8ter-registered-9Zp"));
            tracing::error!("late l8ter-registered-9Zp");
        });
        let out = sink.text();
        assert!(!out.contains("tr4cing"), "{out}");
        assert!(!out.contains("l8ter"), "{out}");
        assert!(out.contains("sending [MASKED] ab"), "{out}");
        assert!(out.contains("key=\"[MASKED]\""), "{out}");
        assert!(out.contains("late [MASKED]"), "{out}");
    }

    #[test]
    fn the_writer_masks_across_separate_writes_of_one_event() {
        register_global_secret(SecretString::from("spl1t-wr1te-secret"));
        let sink = Sink::default();
        {
            let mut w = MaskingWriter::new(sink.clone());
            w.write_all(b"a spl1t-wr").unwrap();
            w.write_all(b"1te-secret b\n").unwrap();
        }
        assert_eq!(sink.text(), "a [MASKED] b\n");
    }
}
