//! Secret masking: replaces known secret values with [`MASK`] in whole texts, in output that
//! arrives in chunks, and in the agent's own tracing output.
//!
//! Masking is by value, byte for byte: a secret that a job prints transformed (base64, split
//! over lines, reversed) is not recognised. The matcher keeps its own copy of the secrets, which
//! is not zeroized; it lives as long as the job (or, for [`register_global_secret`], the process).
//!
//! `stream` masks output that arrives in chunks, `names` says which environment variables hold
//! secrets, `log_writer` masks the agent's own tracing output.

use std::fmt;
use std::sync::Arc;

use aho_corasick::{AhoCorasick, MatchKind};

mod log_writer;
mod names;
mod stream;

pub use log_writer::{MaskingMakeWriter, MaskingWriter, global_masker, register_global_secret};
pub use names::{DEFAULT_SECRET_ENV_PATTERNS, SecretNames, glob, is_secret_name};
pub use stream::StreamMasker;

/// What a secret is replaced with.
pub const MASK: &str = "[MASKED]";

/// Secrets shorter than this many characters are not masked. A 1-3 character "secret" (`a`,
/// `1`, `yes`, a variable set to `x` because its name ends in `_KEY`) would turn every occurrence
/// of common text into `[MASKED]`, making logs unreadable while protecting nothing: such a value
/// is guessable anyway.
pub const MIN_SECRET_CHARS: usize = 4;

/// Replaces every occurrence of a set of secrets with [`MASK`]. Where secrets overlap or one is a
/// prefix of another, the leftmost match wins and, among those, the longest. Cheap to clone.
#[derive(Clone, Default)]
pub struct Masker {
    pub(super) matcher: Option<Arc<Matcher>>,
}

pub(super) enum Matcher {
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
        StreamMasker::new(self.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) const TEXT: &str = "token=ghp_abcdef123 then ghp_abcdef123456 and pass hunter22, \
                        ünïcødé-sëcret ok; ghp_abcdef123ghp_abcdef123 end hunter2";

    pub(super) fn masker() -> Masker {
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
}
