//! Bounded capture of a job's output: keeps the tail, counts what was dropped.
//!
//! A job may print gigabytes; the result only ever holds the last `cap` bytes of each stream, so
//! memory stays bounded whatever the job does.

use std::collections::VecDeque;

#[derive(Debug)]
pub struct TailBuffer {
    cap: usize,
    buf: VecDeque<u8>,
    dropped: u64,
}

impl TailBuffer {
    pub fn new(cap: usize) -> Self {
        TailBuffer {
            cap,
            buf: VecDeque::new(),
            dropped: 0,
        }
    }

    pub fn push(&mut self, data: &[u8]) {
        if data.len() >= self.cap {
            self.dropped += (self.buf.len() + data.len() - self.cap) as u64;
            self.buf.clear();
            self.buf.extend(&data[data.len() - self.cap..]);
            return;
        }
        let overflow = (self.buf.len() + data.len()).saturating_sub(self.cap);
        if overflow > 0 {
            self.buf.drain(..overflow);
            self.dropped += overflow as u64;
        }
        self.buf.extend(data);
    }

    /// Bytes that did not fit and were dropped from the front.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// The kept text (invalid UTF-8 replaced), preceded by a marker line when bytes were dropped.
    pub fn to_text(&self) -> String {
        let (a, b) = self.buf.as_slices();
        let mut bytes = Vec::with_capacity(a.len() + b.len());
        bytes.extend_from_slice(a);
        bytes.extend_from_slice(b);
        if self.dropped == 0 {
            return String::from_utf8_lossy(&bytes).into_owned();
        }
        // The cut may have split a character: skip its continuation bytes rather than show �.
        let start = bytes
            .iter()
            .take(3)
            .take_while(|b| (**b & 0xC0) == 0x80)
            .count();
        format!(
            "[gryt-agent: {} earlier bytes dropped, the last {} are kept]\n{}",
            self.dropped,
            self.cap,
            String::from_utf8_lossy(&bytes[start..])
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_everything_under_the_cap() {
        let mut t = TailBuffer::new(10);
        t.push(b"hello ");
        t.push(b"you");
        assert_eq!(t.to_text(), "hello you");
        assert_eq!(t.dropped(), 0);
    }

    #[test]
    fn keeps_the_tail_and_says_so() {
        let mut t = TailBuffer::new(4);
        t.push(b"abc");
        t.push(b"def");
        assert_eq!(t.dropped(), 2);
        assert!(t.to_text().ends_with("\ncdef"));
        t.push(b"0123456789");
        assert_eq!(t.dropped(), 12);
        assert!(
            t.to_text()
                .starts_with("[gryt-agent: 12 earlier bytes dropped")
        );
        assert!(t.to_text().ends_with("\n6789"));
    }

    #[test]
    fn a_split_character_is_not_shown_broken() {
        let mut t = TailBuffer::new(4);
        t.push("aé€".as_bytes()); // 1 + 2 + 3 bytes: the cut lands inside é
        assert!(t.to_text().ends_with("\n€"), "{}", t.to_text());
    }
}
