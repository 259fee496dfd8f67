//! The marks a job container writes into its own output, and finding them in a stream of bytes.
//!
//! A job container's output is one pair of streams (its main process's stdout and stderr), kept
//! by Docker's log driver while no agent reads it (see `log.rs`). Marks cut it up: the main
//! process writes a *head* mark first of all (a replay that does not start with it lost its
//! beginning), and every command run as an exec writes a *start* mark on stdout, then ends each
//! stream with its own *end* mark, the stdout one carrying the command's exit status. A mark is
//! `\x1egryt:<32 hex>[:<status>|:s]\x1e\n`: a random id, so output cannot hit one by chance,
//! and a whole line, so the log driver never splits it from its newline.

/// The byte marks start and end with (ASCII record separator).
const SEP: u8 = 0x1e;
const PREFIX: &[u8] = b"\x1egryt:";
const HEX_LEN: usize = 32;
/// The longest status a mark carries (an `i32`, sign included).
const MAX_STATUS_LEN: usize = 11;
/// The longest mark: prefix, id, `:`, status, separator and newline.
const MAX_MARK_LEN: usize = PREFIX.len() + HEX_LEN + 1 + MAX_STATUS_LEN + 2;

/// A mark's random id. Read back from a record only in the shape [`MarkId::random`] makes: it
/// goes into shell commands.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String")]
pub struct MarkId(String);

impl TryFrom<String> for MarkId {
    type Error = String;

    fn try_from(text: String) -> Result<Self, String> {
        MarkId::parse(&text).ok_or_else(|| "not a mark id (32 hex digits)".to_owned())
    }
}

impl MarkId {
    pub fn random() -> Self {
        MarkId(uuid::Uuid::new_v4().simple().to_string())
    }

    /// The id as the shell scripts print it (`printf '\036gryt:%s\036\n' <id>`).
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// An id read back from a record; `None` unless it has the shape [`MarkId::random`] makes.
    pub fn parse(text: &str) -> Option<Self> {
        let valid = text.len() == HEX_LEN && text.bytes().all(|b| b.is_ascii_hexdigit());
        valid.then(|| MarkId(text.to_ascii_lowercase()))
    }
}

/// A part of one stream: bytes of output, or a mark.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    Data(Vec<u8>),
    Mark { id: MarkId, kind: Kind },
}

/// What a mark says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A head mark, a stderr end mark, or a stdout end mark written for a killed command.
    Plain,
    /// A stdout end mark with the command's exit status.
    Status(i64),
    /// A command's start (stdout, before anything it prints).
    Start,
}

/// Finds marks in one stream fed in chunks of any size: a mark split across chunks is still
/// found, and only bytes that may still become a mark are held back (a tail starting with the
/// separator byte, at most one mark long).
#[derive(Debug, Default)]
pub struct Scanner {
    held: Vec<u8>,
}

/// What the bytes at the start of a slice are.
enum Head {
    Mark {
        len: usize,
        id: MarkId,
        kind: Kind,
    },
    /// The slice ends before it can tell.
    Undecided,
    NotMark,
}

impl Scanner {
    /// Adds `chunk`, appending what it completes to `out`.
    pub fn push(&mut self, chunk: &[u8], out: &mut Vec<Piece>) {
        let mut buf = std::mem::take(&mut self.held);
        buf.extend_from_slice(chunk);
        let mut data_from = 0;
        let mut at = 0;
        while let Some(offset) = buf[at..].iter().position(|&b| b == SEP) {
            let start = at + offset;
            match head(&buf[start..]) {
                Head::Mark { len, id, kind } => {
                    push_data(out, &buf[data_from..start]);
                    out.push(Piece::Mark { id, kind });
                    at = start + len;
                    data_from = at;
                }
                Head::Undecided => {
                    push_data(out, &buf[data_from..start]);
                    self.held = buf[start..].to_vec();
                    return;
                }
                Head::NotMark => at = start + 1,
            }
        }
        push_data(out, &buf[data_from..]);
    }

    /// The stream ended: what was held back is output after all.
    pub fn finish(&mut self, out: &mut Vec<Piece>) {
        let held = std::mem::take(&mut self.held);
        push_data(out, &held);
    }
}

fn push_data(out: &mut Vec<Piece>, data: &[u8]) {
    if data.is_empty() {
        return;
    }
    match out.last_mut() {
        Some(Piece::Data(last)) => last.extend_from_slice(data),
        _ => out.push(Piece::Data(data.to_vec())),
    }
}

/// Reads a mark at the start of `bytes` (which starts with the separator).
fn head(bytes: &[u8]) -> Head {
    let mut i = 0;
    let need = |i: usize| {
        if i < bytes.len() {
            Some(bytes[i])
        } else {
            None
        }
    };
    for &expected in PREFIX {
        match need(i) {
            None => return Head::Undecided,
            Some(b) if b != expected => return Head::NotMark,
            Some(_) => i += 1,
        }
    }
    let id_start = i;
    while i < id_start + HEX_LEN {
        match need(i) {
            None => return Head::Undecided,
            Some(b) if !(b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) => {
                return Head::NotMark;
            }
            Some(_) => i += 1,
        }
    }
    let id = MarkId(String::from_utf8_lossy(&bytes[id_start..i]).into_owned());
    let mut kind = Kind::Plain;
    if need(i) == Some(b':') && need(i + 1) == Some(b's') {
        kind = Kind::Start;
        i += 2;
    } else if need(i) == Some(b':') {
        i += 1;
        let digits_start = i;
        while let Some(b) = need(i) {
            if !(b.is_ascii_digit() || (b == b'-' && i == digits_start)) {
                break;
            }
            if i - digits_start >= MAX_STATUS_LEN {
                return Head::NotMark;
            }
            i += 1;
        }
        if need(i).is_none() {
            return Head::Undecided;
        }
        let digits = std::str::from_utf8(&bytes[digits_start..i]).unwrap_or_default();
        match digits.parse::<i64>() {
            Ok(value) => kind = Kind::Status(value),
            Err(_) => return Head::NotMark,
        }
    }
    match (need(i), need(i + 1)) {
        (Some(SEP), Some(b'\n')) => Head::Mark {
            len: i + 2,
            id,
            kind,
        },
        (None, _) | (Some(SEP), None) => Head::Undecided,
        _ => Head::NotMark,
    }
}

/// A shell command that writes the mark `id` of `kind` to the current stdout; a
/// [`Kind::Status`] mark carries the shell's `$s`, whatever the value given.
pub fn printf(id: &MarkId, kind: Kind) -> String {
    let id = id.as_str();
    match kind {
        Kind::Plain => format!("printf '\\036gryt:%s\\036\\n' {id}"),
        Kind::Start => format!("printf '\\036gryt:%s:s\\036\\n' {id}"),
        Kind::Status(_) => format!("printf '\\036gryt:%s:%s\\036\\n' {id} \"$s\""),
    }
}

const _: () = assert!(MAX_MARK_LEN < 64);

#[cfg(test)]
mod tests {
    use super::*;

    fn id() -> MarkId {
        MarkId("0123456789abcdef0123456789abcdef".into())
    }

    fn mark(kind: Kind) -> Vec<u8> {
        let mut m = format!("\x1egryt:{}", id().as_str()).into_bytes();
        match kind {
            Kind::Plain => {}
            Kind::Start => m.extend_from_slice(b":s"),
            Kind::Status(s) => m.extend_from_slice(format!(":{s}").as_bytes()),
        }
        m.extend_from_slice(b"\x1e\n");
        m
    }

    fn scan(chunks: &[&[u8]]) -> Vec<Piece> {
        let mut scanner = Scanner::default();
        let mut out = Vec::new();
        for chunk in chunks {
            scanner.push(chunk, &mut out);
        }
        scanner.finish(&mut out);
        out
    }

    #[test]
    fn a_mark_after_a_partial_line_ends_the_output_without_a_newline() {
        let mut input = b"partial".to_vec();
        input.extend(mark(Kind::Status(3)));
        input.extend(b"next\n");
        assert_eq!(
            scan(&[&input]),
            vec![
                Piece::Data(b"partial".to_vec()),
                Piece::Mark {
                    id: id(),
                    kind: Kind::Status(3)
                },
                Piece::Data(b"next\n".to_vec()),
            ]
        );
    }

    #[test]
    fn a_mark_split_anywhere_across_chunks_is_found_and_nothing_else_is_held() {
        let mut input = mark(Kind::Start);
        input.extend(b"a\x1eb\n");
        input.extend(mark(Kind::Status(-1)));
        input.extend(mark(Kind::Plain));
        for cut in 0..input.len() {
            for cut2 in cut..input.len() {
                let pieces = scan(&[&input[..cut], &input[cut..cut2], &input[cut2..]]);
                assert_eq!(
                    pieces,
                    vec![
                        Piece::Mark {
                            id: id(),
                            kind: Kind::Start
                        },
                        Piece::Data(b"a\x1eb\n".to_vec()),
                        Piece::Mark {
                            id: id(),
                            kind: Kind::Status(-1)
                        },
                        Piece::Mark {
                            id: id(),
                            kind: Kind::Plain
                        },
                    ],
                    "cut at {cut}, {cut2}"
                );
            }
        }
    }

    #[test]
    fn near_misses_are_output_byte_for_byte() {
        let upper = format!("\x1egryt:{}\x1e\n", id().as_str().to_uppercase());
        let short = "\x1egryt:0123\x1e\n".to_owned();
        let no_newline = format!("\x1egryt:{}\x1ex", id().as_str());
        for text in [upper, short, no_newline, "\x1e\x1e\x1e".to_owned()] {
            assert_eq!(
                scan(&[text.as_bytes()]),
                vec![Piece::Data(text.clone().into_bytes())]
            );
        }
    }

    #[test]
    fn a_stream_ending_inside_a_mark_gives_its_bytes_as_output() {
        let m = mark(Kind::Plain);
        let pieces = scan(&[&m[..20]]);
        assert_eq!(pieces, vec![Piece::Data(m[..20].to_vec())]);
    }

    #[test]
    fn random_ids_parse_back_and_bad_ones_do_not() {
        let made = MarkId::random();
        assert_eq!(MarkId::parse(made.as_str()), Some(made));
        assert_eq!(MarkId::parse("xyz"), None);
        assert_eq!(MarkId::parse(&"g".repeat(32)), None);
        let read: Result<MarkId, _> = serde_json::from_str("\"0; rm -rf /\"");
        assert!(read.is_err());
    }

    #[test]
    fn the_printf_of_a_mark_is_a_shell_word_list() {
        assert_eq!(
            printf(&id(), Kind::Status(0)),
            "printf '\\036gryt:%s:%s\\036\\n' 0123456789abcdef0123456789abcdef \"$s\""
        );
    }
}
