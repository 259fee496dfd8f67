//! Masking output that arrives in chunks (a job's stdout, say): a secret split across chunks is
//! still masked, and only a tail that could start a secret is held back.

use std::fmt;

use super::{MASK, Masker, Matcher};

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
    pub(super) fn new(masker: Masker) -> Self {
        StreamMasker {
            masker,
            pending: Vec::new(),
            saw_output: false,
        }
    }

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

#[cfg(test)]
mod tests {
    use super::super::tests::{TEXT, masker};
    use super::*;

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
