//! Chunk framing of job output: arbitrary bytes, cut at arbitrary points, through the streaming
//! secret masker and the bounded tail capture, as the executor feeds them.
//!
//! Invariants: the concatenated output of `StreamMasker::push`es and `finish` equals
//! `Masker::mask_bytes` of the whole input whatever the cuts, with no more than (longest secret
//! − 1) bytes held back between chunks; a `TailBuffer` holds exactly the last `cap` bytes and
//! counts every byte it dropped.
#![no_main]

use arbitrary::Arbitrary;
use gryt_agent::executor::capture::TailBuffer;
use gryt_agent::secrets::Masker;
use libfuzzer_sys::fuzz_target;

const MAX_DATA: usize = 64 * 1024;
const MAX_SECRETS: usize = 8;
const MAX_SECRET_LEN: usize = 256;
const MAX_CHUNKS: usize = 1024;

#[derive(Arbitrary, Debug)]
struct Input {
    secrets: Vec<String>,
    /// Tail capacity, taken modulo 1024: small, so that dropping happens often and checking the
    /// whole tail after every chunk stays cheap.
    cap: u16,
    /// Chunk lengths; the rest of `data` after the last one is the final chunk.
    cuts: Vec<u16>,
    data: Vec<u8>,
}

/// What `TailBuffer::to_text` must show for `seen` bytes of output with capacity `cap`.
fn expected_tail_text(seen: &[u8], cap: usize) -> String {
    if seen.len() <= cap {
        return String::from_utf8_lossy(seen).into_owned();
    }
    let tail = &seen[seen.len() - cap..];
    let start = tail
        .iter()
        .take(3)
        .take_while(|b| (**b & 0xC0) == 0x80)
        .count();
    format!(
        "[gryt-agent: {} earlier bytes dropped, the last {} are kept]\n{}",
        seen.len() - cap,
        cap,
        String::from_utf8_lossy(&tail[start..])
    )
}

fuzz_target!(|input: Input| {
    if input.data.len() > MAX_DATA
        || input.secrets.len() > MAX_SECRETS
        || input.secrets.iter().any(|s| s.len() > MAX_SECRET_LEN)
        || input.cuts.len() > MAX_CHUNKS
    {
        return;
    }
    let data = &input.data[..];
    let cap = input.cap as usize % 1024;

    let mut chunks = Vec::with_capacity(input.cuts.len() + 1);
    let mut rest = data;
    for &cut in &input.cuts {
        let (chunk, tail) = rest.split_at((cut as usize).min(rest.len()));
        chunks.push(chunk);
        rest = tail;
    }
    chunks.push(rest);

    let masker = Masker::new(&input.secrets);
    let mut stream = masker.stream();
    let mut raw_tail = TailBuffer::new(cap);
    let mut masked_tail = TailBuffer::new(cap);
    let mut fed = 0;
    let mut masked = Vec::new();
    for chunk in &chunks {
        let out = stream.push(chunk);
        assert!(
            stream.held_back() <= masker.longest_secret().saturating_sub(1),
            "held back {} bytes, longest secret {}",
            stream.held_back(),
            masker.longest_secret()
        );
        masked.extend_from_slice(&out);
        masked_tail.push(&out);

        raw_tail.push(chunk);
        fed += chunk.len();
        assert_eq!(raw_tail.dropped(), fed.saturating_sub(cap) as u64);
        assert_eq!(raw_tail.to_text(), expected_tail_text(&data[..fed], cap));
    }
    assert_eq!(fed, data.len());
    let out = stream.finish();
    assert_eq!(stream.held_back(), 0);
    masked.extend_from_slice(&out);
    masked_tail.push(&out);

    let whole = masker.mask_bytes(data);
    assert_eq!(
        masked, whole,
        "streamed masking differs from masking the whole"
    );
    assert_eq!(
        masked_tail.dropped(),
        whole.len().saturating_sub(cap) as u64
    );
    assert_eq!(masked_tail.to_text(), expected_tail_text(&whole, cap));
});
