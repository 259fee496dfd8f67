//! Secret masking: replaces known secret values with [`MASK`] in whole texts, in output that
//! arrives in chunks, and in the agent's own tracing output.
//!
//! Masking is by value, byte for byte: a secret that a job prints transformed (base64, split
//! over lines, reversed) is not recognised. The matcher keeps its own copy of the secrets, which
//! is not zeroized; it lives as long as the job (or, for [`register_global_secret`], the process).

use std::fmt;
use std::io::{self, Write};
use std::sync::{Arc, RwLock};

use aho_corasick::{AhoCorasick, MatchKind};
use globset::{GlobBuilder, GlobMatcher, GlobSet, GlobSetBuilder};
use secrecy::{ExposeSecret, SecretString};
use tracing_subscriber::fmt::MakeWriter;

/// What a secret is replaced with.
pub const MASK: &str = "[MASKED]";

/// Secrets shorter than this many characters are not masked. A 1-3 character "secret" (`a`,
/// `1`, `yes`, a variable set to `x` because its name ends in `_KEY`) would turn every occurrence
/// of common text into `[MASKED]`, making logs unreadable while protecting nothing: such a value
/// is guessable anyway.
pub const MIN_SECRET_CHARS: usize = 4;

/// Environment variable names whose values are treated as secrets unless configured otherwise
/// (`secret_env_patterns`).
pub const DEFAULT_SECRET_ENV_PATTERNS: &[&str] = &["*TOKEN*", "*SECRET*", "*PASSWORD*", "*KEY*"];

/// Replaces every occurrence of a set of secrets with [`MASK`]. Where secrets overlap or one is a
/// prefix of another, the leftmost match wins and, among those, the longest. Cheap to clone.
#[derive(Clone, Default)]
pub struct Masker {
    matcher: Option<Arc<Matcher>>,
}

enum Matcher {
    Secrets {
        automaton: AhoCorasick,
        longest: usize,
        /// The secrets' bytes, to tell which held-back tails could still become one.
        secrets: Vec<Box<[u8]>>,
        /// Which bytes some secret starts with: a tail starting with any other byte cannot
        /// become a secret, which spares most of the prefix comparisons on every chunk.
        first_bytes: Box<[bool; 256]>,
    },
    /// The automaton could not be built (only for absurdly large secret sets). Failing closed:
    /// everything is masked rather than anything leaked.
    Everything,
}

impl fmt::Debug for Masker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the automaton: its Debug shows the secrets' bytes.
        let what = match self.matcher.as_deref() {
            None => "nothing",
            Some(Matcher::Secrets { .. }) => "secrets",
            Some(Matcher::Everything) => "everything",
        };
        f.debug_struct("Masker").field("masks", &what).finish()
    }
}

impl Masker {
    /// A masker for `secrets`; empty ones and ones under [`MIN_SECRET_CHARS`] are ignored.
    pub fn new<I, S>(secrets: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut secrets: Vec<S> = secrets
            .into_iter()
            .filter(|s| s.as_ref().chars().count() >= MIN_SECRET_CHARS)
            .collect();
        secrets.sort_by(|a, b| a.as_ref().cmp(b.as_ref()));
        secrets.dedup_by(|a, b| a.as_ref() == b.as_ref());
        let Some(longest) = secrets.iter().map(|s| s.as_ref().len()).max() else {
            return Masker::default();
        };
        let matcher = match AhoCorasick::builder()
            .match_kind(MatchKind::LeftmostLongest)
            .build(secrets.iter().map(|s| s.as_ref().as_bytes()))
        {
            Ok(automaton) => {
                let mut first_bytes = Box::new([false; 256]);
                for secret in &secrets {
                    if let Some(&first) = secret.as_ref().as_bytes().first() {
                        first_bytes[usize::from(first)] = true;
                    }
                }
                Matcher::Secrets {
                    automaton,
                    longest,
                    secrets: secrets
                        .iter()
                        .map(|s| s.as_ref().as_bytes().into())
                        .collect(),
                    first_bytes,
                }
            }
            Err(_) => Matcher::Everything,
        };
        Masker {
            matcher: Some(Arc::new(matcher)),
        }
    }

    /// A masker that masks nothing.
    pub const fn empty() -> Self {
        Masker { matcher: None }
    }

    pub fn is_empty(&self) -> bool {
        self.matcher.is_none()
    }

    /// Length in bytes of the longest secret (0 when there is none).
    pub fn longest_secret(&self) -> usize {
        match self.matcher.as_deref() {
            None | Some(Matcher::Everything) => 0,
            Some(Matcher::Secrets { longest, .. }) => *longest,
        }
    }

    pub fn mask_str(&self, text: &str) -> String {
        match self.matcher.as_deref() {
            None => text.to_owned(),
            Some(Matcher::Everything) if text.is_empty() => String::new(),
            Some(Matcher::Everything) => MASK.to_owned(),
            Some(Matcher::Secrets { automaton, .. }) => {
                let mut out = String::with_capacity(text.len());
                automaton.replace_all_with(text, &mut out, |_, _, out| {
                    out.push_str(MASK);
                    true
                });
                out
            }
        }
    }

    /// [`Masker::mask_str`] for bytes that need not be UTF-8; other bytes pass unchanged.
    pub fn mask_bytes(&self, data: &[u8]) -> Vec<u8> {
        match self.matcher.as_deref() {
            None => data.to_vec(),
            Some(Matcher::Everything) if data.is_empty() => Vec::new(),
            Some(Matcher::Everything) => MASK.as_bytes().to_vec(),
            Some(Matcher::Secrets { automaton, .. }) => {
                let mut out = Vec::with_capacity(data.len());
                automaton.replace_all_with_bytes(data, &mut out, |_, _, out| {
                    out.extend_from_slice(MASK.as_bytes());
                    true
                });
                out
            }
        }
    }

    /// A masker for one stream of output arriving in chunks (a job's stdout, say).
    pub fn stream(&self) -> StreamMasker {
        StreamMasker {
            masker: self.clone(),
            pending: Vec::new(),
            saw_output: false,
        }
    }
}

/// Masks a stream chunk by chunk, so that a secret split across chunks is still masked. Holds
/// back at most (longest secret − 1) bytes between calls, and only a tail that could be the start
/// of a secret whose rest has not arrived yet. The concatenated output of [`StreamMasker::push`]es and
/// [`StreamMasker::finish`] equals [`Masker::mask_bytes`] of the concatenated input.
pub struct StreamMasker {
    masker: Masker,
    pending: Vec<u8>,
    saw_output: bool,
}

impl fmt::Debug for StreamMasker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The held-back bytes may be the start of a secret.
        f.debug_struct("StreamMasker")
            .field("masker", &self.masker)
            .field("held_back", &self.pending.len())
            .finish()
    }
}

impl StreamMasker {
    /// Takes the next chunk; returns the bytes that are now safe to emit (possibly none).
    pub fn push(&mut self, data: &[u8]) -> Vec<u8> {
        let (automaton, longest, secrets, first_bytes) = match self.masker.matcher.as_deref() {
            None => return data.to_vec(),
            Some(Matcher::Everything) => {
                self.saw_output |= !data.is_empty();
                return Vec::new();
            }
            Some(Matcher::Secrets {
                automaton,
                longest,
                secrets,
                first_bytes,
            }) => (automaton, *longest, secrets, first_bytes),
        };
        let mut buf = std::mem::take(&mut self.pending);
        buf.extend_from_slice(data);
        // Held back: the longest tail that is a proper prefix of some secret, i.e. a secret
        // that may still complete with the next chunk. Everything before it is settled: a match
        // starting there either ends within `buf` or could not be extended (else its start would
        // begin such a tail). Holding back only real prefixes keeps ordinary output flowing and
        // in order with the other stream.
        let tail_from = |from: usize| {
            let earliest = from.max(buf.len().saturating_sub(longest.saturating_sub(1)));
            (earliest..buf.len())
                .find(|&i| {
                    if !first_bytes[usize::from(buf[i])] {
                        return false;
                    }
                    let tail = &buf[i..];
                    secrets
                        .iter()
                        .any(|s| s.len() > tail.len() && s.starts_with(tail))
                })
                .unwrap_or(buf.len())
        };
        let mut hold = tail_from(0);
        let mut out = Vec::with_capacity(buf.len());
        let mut pos = 0;
        for m in automaton.find_iter(&buf) {
            if m.start() >= hold {
                break;
            }
            out.extend_from_slice(&buf[pos..m.start()]);
            out.extend_from_slice(MASK.as_bytes());
            pos = m.end();
            if pos > hold {
                hold = tail_from(pos);
            }
        }
        let keep_from = pos.max(hold);
        out.extend_from_slice(&buf[pos..keep_from]);
        // `split_off` leaves the held-back tail in its own small allocation, so a large chunk's
        // buffer is not kept alive between calls.
        self.pending = buf.split_off(keep_from);
        out
    }

    /// Ends the stream: returns the held-back bytes, masked.
    pub fn finish(&mut self) -> Vec<u8> {
        if std::mem::take(&mut self.saw_output) {
            return MASK.as_bytes().to_vec();
        }
        let pending = std::mem::take(&mut self.pending);
        self.masker.mask_bytes(&pending)
    }

    /// Bytes currently held back (never more than the longest secret − 1).
    pub fn held_back(&self) -> usize {
        self.pending.len()
    }
}

/// Case-insensitive glob patterns naming environment variables whose values are secrets.
#[derive(Debug, Clone)]
pub struct SecretNames {
    set: GlobSet,
}

impl SecretNames {
    /// Fails on the first pattern that is not a valid glob.
    pub fn new<S: AsRef<str>>(patterns: &[S]) -> Result<Self, globset::Error> {
        let mut builder = GlobSetBuilder::new();
        for pattern in patterns {
            builder.add(glob(pattern.as_ref())?.glob().clone());
        }
        Ok(SecretNames {
            set: builder.build()?,
        })
    }

    pub fn matches(&self, name: &str) -> bool {
        self.set.is_match(name)
    }

    /// The values of the variables in `env` whose names match: what to hand to [`Masker::new`].
    pub fn secret_values<'a, I, K, V>(&'a self, env: I) -> impl Iterator<Item = &'a str> + 'a
    where
        I: IntoIterator<Item = (&'a K, &'a V)> + 'a,
        K: AsRef<str> + ?Sized + 'a,
        V: AsRef<str> + ?Sized + 'a,
    {
        env.into_iter()
            .filter(|(name, _)| self.matches(name.as_ref()))
            .map(|(_, value)| value.as_ref())
    }
}

/// Compiles one pattern the way [`SecretNames`] does; for validating settings.
pub fn glob(pattern: &str) -> Result<GlobMatcher, globset::Error> {
    Ok(GlobBuilder::new(pattern)
        .case_insensitive(true)
        .build()?
        .compile_matcher())
}

/// Whether `name` matches any of `patterns` (case-insensitive globs such as `*TOKEN*`). A pattern
/// that does not compile matches nothing; settings are validated when loaded, so none should
/// get here. Compiles the patterns on every call: for many names, build a [`SecretNames`] once.
pub fn is_secret_name(name: &str, patterns: &[String]) -> bool {
    patterns
        .iter()
        .filter_map(|p| glob(p).ok())
        .any(|g| g.is_match(name))
}

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
    use super::*;
    use std::sync::Mutex;

    const TEXT: &str = "token=ghp_abcdef123 then ghp_abcdef123456 and pass hunter22, \
                        ünïcødé-sëcret ok; ghp_abcdef123ghp_abcdef123 end hunter2";

    fn masker() -> Masker {
        Masker::new([
            "ghp_abcdef123",
            "ghp_abcdef123456",
            "hunter22",
            "ünïcødé-sëcret",
            "abc",
            "",
        ])
    }

    #[test]
    fn masks_every_occurrence_longest_first() {
        assert_eq!(
            masker().mask_str(TEXT),
            "token=[MASKED] then [MASKED] and pass [MASKED], [MASKED] ok; [MASKED][MASKED] end \
             hunter2"
        );
    }

    #[test]
    fn short_and_empty_secrets_are_ignored() {
        let m = Masker::new(["", "a", "abc"]);
        assert!(m.is_empty());
        assert_eq!(m.mask_str("a abc"), "a abc");
        assert_eq!(Masker::new(["abcd"]).mask_str("abcde"), "[MASKED]e");
    }

    #[test]
    fn debug_does_not_show_secrets() {
        assert!(!format!("{:?}", masker()).contains("hunter"));
        assert!(!format!("{:?}", masker().stream()).contains("hunter"));
    }

    fn streamed(m: &Masker, chunks: &[&[u8]]) -> Vec<u8> {
        let mut s = m.stream();
        let mut out = Vec::new();
        for chunk in chunks {
            out.extend(s.push(chunk));
            assert!(s.held_back() < m.longest_secret().max(1));
        }
        out.extend(s.finish());
        assert_eq!(s.held_back(), 0);
        out
    }

    #[test]
    fn a_stream_split_anywhere_masks_like_the_whole_text() {
        let m = masker();
        let text = TEXT.as_bytes();
        let whole = m.mask_str(TEXT).into_bytes();
        for i in 0..=text.len() {
            assert_eq!(
                streamed(&m, &[&text[..i], &text[i..]]),
                whole,
                "split at {i}"
            );
            for j in i..=text.len() {
                let got = streamed(&m, &[&text[..i], &text[i..j], &text[j..]]);
                assert_eq!(got, whole, "split at {i} and {j}");
            }
        }
        let bytes: Vec<&[u8]> = text.chunks(1).collect();
        assert_eq!(streamed(&m, &bytes), whole);
    }

    #[test]
    fn secrets_made_of_repeats_and_prefixes() {
        let m = Masker::new(["aaaa", "aaaab", "abab"]);
        let text = b"aaaaaaaabababaaaab aaa";
        let whole = m.mask_bytes(text);
        for i in 0..=text.len() {
            assert_eq!(
                streamed(&m, &[&text[..i], &text[i..]]),
                whole,
                "split at {i}"
            );
        }
        let bytes: Vec<&[u8]> = text.chunks(1).collect();
        assert_eq!(streamed(&m, &bytes), whole);
    }

    #[test]
    fn non_utf8_bytes_pass_through() {
        let m = masker();
        let mut data = vec![0xff, 0xfe, b'x', 0xc3];
        data.extend_from_slice(b"hunter22");
        data.extend_from_slice(&[0x80, 0x00, 0xc3]);
        let mut expected = vec![0xff, 0xfe, b'x', 0xc3];
        expected.extend_from_slice(MASK.as_bytes());
        expected.extend_from_slice(&[0x80, 0x00, 0xc3]);
        assert_eq!(m.mask_bytes(&data), expected);
        let bytes: Vec<&[u8]> = data.chunks(1).collect();
        assert_eq!(streamed(&m, &bytes), expected);
    }

    #[test]
    fn an_empty_masker_streams_through_without_holding_back() {
        let mut s = Masker::empty().stream();
        assert_eq!(s.push(b"hello"), b"hello");
        assert_eq!(s.finish(), b"");
    }

    #[test]
    fn secret_names() {
        let defaults: Vec<String> = DEFAULT_SECRET_ENV_PATTERNS
            .iter()
            .map(|p| p.to_string())
            .collect();
        for name in [
            "GITHUB_TOKEN",
            "api_key",
            "DbPassword",
            "MY_SECRET_THING",
            "KEY",
        ] {
            assert!(is_secret_name(name, &defaults), "{name}");
        }
        for name in ["PATH", "HOME", "CI", "TOKE"] {
            assert!(!is_secret_name(name, &defaults), "{name}");
        }
        assert!(!is_secret_name("GITHUB_TOKEN", &[]));
        assert!(!is_secret_name("X", &["[".to_string()]));

        let names = SecretNames::new(DEFAULT_SECRET_ENV_PATTERNS).unwrap();
        let env: std::collections::BTreeMap<String, String> = [
            ("NPM_TOKEN".to_string(), "npm-value".to_string()),
            ("PATH".to_string(), "/usr/bin".to_string()),
        ]
        .into();
        assert_eq!(names.secret_values(&env).collect::<Vec<_>>(), ["npm-value"]);
        assert!(SecretNames::new(&["[unclosed"][..]).is_err());
    }

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

#[cfg(test)]
mod hold_back_tests {
    use super::*;

    #[test]
    fn only_a_possible_secret_start_is_held_back() {
        let masker = Masker::new(["s3cret-value"]);
        let mut stream = masker.stream();
        assert_eq!(stream.push(b"plain text"), b"plain text");
        assert_eq!(stream.held_back(), 0);
        assert_eq!(stream.push(b"then s3c"), b"then ");
        assert_eq!(stream.held_back(), 3);
        assert_eq!(stream.push(b"ret-value!"), b"[MASKED]!");
        assert_eq!(stream.push(b"s3x"), b"s3x");
        assert_eq!(stream.finish(), b"");
    }
}
