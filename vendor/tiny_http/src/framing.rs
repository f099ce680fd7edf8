//! EdgeFaaS patch: what a request head says, and where its body ends, decided
//! once by RFC 9112's rules with `httparse` (the parser hyper uses), with no
//! I/O here so every rule can be tested and fuzzed on bytes alone.
//!
//! One way to frame a body: one `Content-Length` (repeats must agree), or
//! `Transfer-Encoding: chunked` as the only coding (then a `Content-Length` is
//! ignored and the connection closes after the answer). Anything else that
//! could be read two ways is refused, and the caller closes the connection.

use std::str::FromStr;

use ascii::AsciiString;

use crate::common::{HTTPVersion, Header, HeaderField, Method};

/// Longest chunk-size line, extensions included.
pub(crate) const MAX_CHUNK_LINE: usize = 4096;
/// Most bytes of trailer fields after the last chunk.
pub(crate) const MAX_TRAILERS: usize = 8 * 1024;

/// A request the server will not serve, answered with `status` and closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refusal {
    pub status: u16,
    pub message: String,
}

impl Refusal {
    pub(crate) fn new(status: u16, message: impl Into<String>) -> Refusal {
        Refusal {
            status,
            message: message.into(),
        }
    }
}

fn bad(message: &str) -> Refusal {
    Refusal::new(400, message)
}

/// How the body of a request is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Framing {
    /// No body.
    Empty,
    /// Exactly this many bytes.
    Length(u64),
    /// Chunked transfer coding.
    Chunked,
}

/// A parsed request head.
#[derive(Debug)]
pub(crate) struct Head {
    pub method: Method,
    pub path: String,
    pub version: HTTPVersion,
    pub headers: Vec<Header>,
    pub framing: Framing,
    /// False when the connection must close after this request's answer.
    pub keep_alive: bool,
    /// The client waits for `100 Continue` before sending the body.
    pub expect_continue: bool,
}

/// Where the head in `buf` ends (just past its empty line), looking for the end
/// no earlier than `from` (so a head that arrives byte by byte costs linear time).
pub(crate) fn find_head_end(buf: &[u8], from: usize) -> Option<usize> {
    let start = from.saturating_sub(2);
    let mut i = start;
    while let Some(off) = buf[i..].iter().position(|&b| b == b'\n') {
        let nl = i + off;
        match (buf.get(nl + 1), buf.get(nl + 2)) {
            (Some(b'\n'), _) => return Some(nl + 2),
            (Some(b'\r'), Some(b'\n')) => return Some(nl + 3),
            _ => i = nl + 1,
        }
    }
    None
}

/// Parses a complete head (`bytes` ends with its empty line) and decides its framing.
pub(crate) fn parse_head(bytes: &[u8], max_headers: usize) -> Result<Head, Refusal> {
    let mut slots = vec![httparse::EMPTY_HEADER; max_headers];
    let mut req = httparse::Request::new(&mut slots);
    match req.parse(bytes) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Err(bad("incomplete request head")),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(Refusal::new(431, "too many header lines"));
        }
        Err(httparse::Error::Version) if names_a_version(bytes) => {
            return Err(Refusal::new(
                505,
                "HTTP version not supported: use HTTP/1.1 or HTTP/1.0",
            ));
        }
        Err(e) => return Err(bad(&format!("malformed request head ({e})"))),
    }
    let method = req.method.unwrap_or_default();
    let path = req.path.unwrap_or_default();
    if !path.is_ascii() || path.is_empty() {
        return Err(bad("request target is not ASCII"));
    }
    let version = HTTPVersion(1, req.version.unwrap_or(1));
    let mut headers = Vec::with_capacity(req.headers.len());
    for h in req.headers.iter() {
        // httparse allows obs-text (0x80-0xFF) and refuses controls; refuse both.
        if !h.value.iter().all(|&b| b == b'\t' || (0x20..0x7f).contains(&b)) {
            return Err(bad("header value is not printable ASCII"));
        }
        let field = HeaderField::from_str(h.name).map_err(|_| bad("bad header name"))?;
        let value = AsciiString::from_ascii(h.value).map_err(|_| bad("bad header value"))?;
        headers.push(Header { field, value });
    }
    let method = Method::from_str(method).map_err(|_| bad("bad method"))?;
    let (framing, framing_keeps_alive) = framing(&headers, &version)?;
    let keep_alive = framing_keeps_alive && wants_keep_alive(&headers, &version);
    let expect_continue = expects_continue(&headers, &version)?;
    Ok(Head {
        method,
        path: path.to_string(),
        version,
        headers,
        framing,
        keep_alive,
        expect_continue,
    })
}

/// True when the request line ends in something shaped like `HTTP/<d>.<d>`,
/// so a version error means "unsupported", not "garbage".
fn names_a_version(bytes: &[u8]) -> bool {
    let line_end = bytes.iter().position(|&b| b == b'\n').unwrap_or(bytes.len());
    let line = &bytes[..line_end];
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    match line.rsplit(|&b| b == b' ').next() {
        Some([b'H', b'T', b'T', b'P', b'/', major, b'.', minor]) => {
            major.is_ascii_digit() && minor.is_ascii_digit()
        }
        _ => false,
    }
}

/// The elements of a comma-separated header list, trimmed, empty ones dropped.
fn list<'a>(headers: &'a [Header], name: &'static str) -> impl Iterator<Item = &'a str> {
    headers
        .iter()
        .filter(move |h| h.field.equiv(name))
        .flat_map(|h| h.value.as_str().split(','))
        .map(|e| e.trim_matches(|c| c == ' ' || c == '\t'))
        .filter(|e| !e.is_empty())
}

/// The body's framing, and whether the connection may stay open after it.
fn framing(headers: &[Header], version: &HTTPVersion) -> Result<(Framing, bool), Refusal> {
    let has_te = headers.iter().any(|h| h.field.equiv("Transfer-Encoding"));
    let mut length: Option<u64> = None;
    let mut has_cl = false;
    for value in headers
        .iter()
        .filter(|h| h.field.equiv("Content-Length"))
        .map(|h| h.value.as_str())
    {
        has_cl = true;
        // A list of equal values ("5, 5") is one length; RFC 9110 8.6.
        for item in value.split(',').map(|e| e.trim_matches(|c| c == ' ' || c == '\t')) {
            if item.is_empty() || !item.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad("Content-Length is not a number"));
            }
            // Digits past u64 are still a length: too large for any limit.
            let n = item.parse::<u64>().unwrap_or(u64::MAX);
            if length.is_some_and(|l| l != n) {
                return Err(bad("conflicting Content-Length headers"));
            }
            length = Some(n);
        }
    }
    if has_cl && length.is_none() {
        return Err(bad("empty Content-Length"));
    }
    if !has_te {
        return Ok((length.map_or(Framing::Empty, Framing::Length), true));
    }
    if *version < HTTPVersion(1, 1) {
        // RFC 9112 6.1: Transfer-Encoding in HTTP/1.0 is faulty framing.
        return Err(bad("Transfer-Encoding in an HTTP/1.0 request"));
    }
    let codings: Vec<&str> = list(headers, "Transfer-Encoding").collect();
    let Some((last, rest)) = codings.split_last() else {
        return Err(bad("empty Transfer-Encoding"));
    };
    if rest.iter().any(|c| c.eq_ignore_ascii_case("chunked")) {
        return Err(bad("chunked must be the last and only transfer coding"));
    }
    if let Some(other) = codings.iter().find(|c| !c.eq_ignore_ascii_case("chunked")) {
        return Err(Refusal::new(
            501,
            format!(
                "transfer coding '{}' is not supported; send the body chunked or with Content-Length",
                other.chars().take(40).collect::<String>()
            ),
        ));
    }
    debug_assert!(last.eq_ignore_ascii_case("chunked"));
    // With a Content-Length as well, chunked wins and the connection closes after.
    Ok((Framing::Chunked, !has_cl))
}

/// HTTP/1.1 keeps the connection unless told `close`; HTTP/1.0 only with `keep-alive`.
fn wants_keep_alive(headers: &[Header], version: &HTTPVersion) -> bool {
    let mut close = false;
    let mut keep = false;
    for token in list(headers, "Connection") {
        close |= token.eq_ignore_ascii_case("close");
        keep |= token.eq_ignore_ascii_case("keep-alive");
    }
    !close && (*version >= HTTPVersion(1, 1) || keep)
}

/// `Expect: 100-continue` (HTTP/1.1 only); any other expectation is a 417.
fn expects_continue(headers: &[Header], version: &HTTPVersion) -> Result<bool, Refusal> {
    if *version < HTTPVersion(1, 1) {
        return Ok(false);
    }
    let mut cont = false;
    for e in headers.iter().filter(|h| h.field.equiv("Expect")) {
        if !e.value.as_str().trim().eq_ignore_ascii_case("100-continue") {
            return Err(Refusal::new(417, "only Expect: 100-continue is supported"));
        }
        cont = true;
    }
    Ok(cont)
}

/// What the chunked decoder wants done with the front of its input.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Step {
    /// More input is needed.
    More,
    /// These many framing bytes are consumed.
    Skip(usize),
    /// These many bytes at the front are body data.
    Data(usize),
    /// These many bytes are consumed and the body is complete.
    Done(usize),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Size,
    Data(u64),
    DataEnd,
    Trailers,
    Done,
}

/// An incremental decoder of the chunked transfer coding, bounded in line
/// lengths, trailer size and total body size.
#[derive(Debug)]
pub(crate) struct Chunked {
    state: State,
    received: u64,
    limit: u64,
    max_headers: usize,
}

impl Chunked {
    /// A decoder for a body of at most `limit` bytes.
    pub(crate) fn new(limit: u64, max_headers: usize) -> Chunked {
        Chunked {
            state: State::Size,
            received: 0,
            limit,
            max_headers,
        }
    }

    /// Body bytes decoded so far.
    pub(crate) fn received(&self) -> u64 {
        self.received
    }

    /// Looks at the front of `input` (the unconsumed bytes) and says what it is.
    /// `Err` with 413 when the body passes the limit.
    pub(crate) fn step(&mut self, input: &[u8]) -> Result<Step, Refusal> {
        match self.state {
            State::Size => {
                let Some(nl) = input.iter().take(MAX_CHUNK_LINE).position(|&b| b == b'\n') else {
                    if input.len() >= MAX_CHUNK_LINE {
                        return Err(bad("chunk-size line too long"));
                    }
                    return Ok(Step::More);
                };
                // A chunk-size line ends in CRLF; a bare LF is refused.
                if nl == 0 || input[nl - 1] != b'\r' {
                    return Err(bad("chunk-size line does not end in CRLF"));
                }
                if !chunk_line_is_strict(&input[..nl - 1]) {
                    return Err(bad("malformed chunk size"));
                }
                let size = match httparse::parse_chunk_size(&input[..=nl]) {
                    Ok(httparse::Status::Complete((used, size))) if used == nl + 1 => size,
                    _ => return Err(bad("malformed chunk size")),
                };
                if size == 0 {
                    self.state = State::Trailers;
                } else {
                    if size > self.limit.saturating_sub(self.received) {
                        return Err(Refusal::new(413, ""));
                    }
                    self.state = State::Data(size);
                }
                Ok(Step::Skip(nl + 1))
            }
            State::Data(left) => {
                if input.is_empty() {
                    return Ok(Step::More);
                }
                let n = (input.len() as u64).min(left);
                self.received += n;
                self.state = if n == left {
                    State::DataEnd
                } else {
                    State::Data(left - n)
                };
                Ok(Step::Data(n as usize))
            }
            State::DataEnd => match input {
                [b'\r', b'\n', ..] => {
                    self.state = State::Size;
                    Ok(Step::Skip(2))
                }
                [] | [b'\r'] => Ok(Step::More),
                _ => Err(bad("chunk data does not end in CRLF")),
            },
            State::Trailers => {
                let window = &input[..input.len().min(MAX_TRAILERS)];
                let mut slots = vec![httparse::EMPTY_HEADER; self.max_headers];
                match httparse::parse_headers(window, &mut slots) {
                    Ok(httparse::Status::Complete((used, _))) => {
                        // httparse accepts a bare LF as a line end; so does RFC 9112 for fields.
                        self.state = State::Done;
                        Ok(Step::Done(used))
                    }
                    Ok(httparse::Status::Partial) if window.len() < MAX_TRAILERS => Ok(Step::More),
                    Ok(httparse::Status::Partial) => Err(Refusal::new(431, "trailers too large")),
                    Err(httparse::Error::TooManyHeaders) => {
                        Err(Refusal::new(431, "too many trailer lines"))
                    }
                    Err(_) => Err(bad("malformed trailer")),
                }
            }
            State::Done => Ok(Step::Done(0)),
        }
    }
}

/// A chunk-size line without its CRLF: hex digits, then nothing or extensions
/// (`;`, after optional blanks) of printable ASCII. httparse alone takes an
/// empty size as 0, trailing blanks, and any byte but CR inside an extension.
fn chunk_line_is_strict(line: &[u8]) -> bool {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    let rest = &line[digits..];
    let after_blanks = &rest[rest.iter().take_while(|&&b| b == b' ' || b == b'\t').count()..];
    digits > 0
        && (rest.is_empty() || after_blanks.first() == Some(&b';'))
        && after_blanks
            .iter()
            .all(|&b| b == b'\t' || (0x20..0x7f).contains(&b))
}

/// One request as `parse_one` read it.
#[derive(Debug)]
pub struct Parsed {
    pub path: String,
    pub body: Vec<u8>,
    /// Bytes of the input it took.
    pub used: usize,
    /// Whether the connection would go on to read another request.
    pub keep_alive: bool,
}

/// Parses exactly one request out of `input` as a connection would, for tests
/// and fuzzing: the head, then the body by its framing. Returns the request,
/// or why it was refused, or `None` when the input ends before the request does.
pub fn parse_one(
    input: &[u8],
    max_head: usize,
    max_headers: usize,
    max_body: u64,
) -> Result<Option<Parsed>, (u16, String)> {
    let refuse = |r: Refusal| (r.status, r.message);
    let Some(end) = find_head_end(&input[..input.len().min(max_head)], 0) else {
        if input.len() >= max_head {
            return Err((431, "request head too large".into()));
        }
        return Ok(None);
    };
    let head = parse_head(&input[..end], max_headers).map_err(refuse)?;
    let mut pos = end;
    let mut body = Vec::new();
    match head.framing {
        Framing::Empty => {}
        Framing::Length(n) => {
            if n > max_body {
                return Err((413, String::new()));
            }
            let n = n as usize;
            if input.len() - pos < n {
                return Ok(None);
            }
            body.extend_from_slice(&input[pos..pos + n]);
            pos += n;
        }
        Framing::Chunked => {
            let mut dec = Chunked::new(max_body, max_headers);
            loop {
                match dec.step(&input[pos..]).map_err(refuse)? {
                    Step::More => return Ok(None),
                    Step::Skip(n) => pos += n,
                    Step::Data(n) => {
                        body.extend_from_slice(&input[pos..pos + n]);
                        pos += n;
                    }
                    Step::Done(n) => {
                        pos += n;
                        break;
                    }
                }
            }
        }
    }
    Ok(Some(Parsed {
        path: head.path,
        body,
        used: pos,
        keep_alive: head.keep_alive,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(input: &[u8]) -> Result<Option<(String, Vec<u8>, usize)>, (u16, String)> {
        parse_one(input, 16 * 1024, 100, 1 << 20).map(|r| r.map(|p| (p.path, p.body, p.used)))
    }

    fn status(input: &[u8]) -> u16 {
        match one(input) {
            Ok(Some(_)) => 200,
            Ok(None) => 0,
            Err((s, _)) => s,
        }
    }

    #[test]
    fn content_length_frames_the_body_exactly() {
        let r = one(b"POST /a HTTP/1.1\r\nContent-Length: 3\r\n\r\nabcGET /b HTTP/1.1\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(r.0, "/a");
        assert_eq!(r.1, b"abc");
        assert_eq!(r.2, 42);
    }

    #[test]
    fn chunked_bodies_decode_and_end_at_the_last_chunk() {
        let input = b"POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\nT: v\r\n\r\nNEXT";
        let (path, body, used) = one(input).unwrap().unwrap();
        assert_eq!((path.as_str(), body.as_slice()), ("/a", &b"abcde"[..]));
        assert_eq!(&input[used..], b"NEXT");
    }

    #[test]
    fn ambiguous_framing_is_refused() {
        let cases: &[(&[u8], u16)] = &[
            (b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd", 400),
            (b"POST / HTTP/1.1\r\nContent-Length: 3, 4\r\n\r\nabcd", 400),
            (b"POST / HTTP/1.1\r\nContent-Length: +3\r\n\r\nabc", 400),
            (b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400),
            (b"POST / HTTP/1.1\r\nContent-Length: 0x3\r\n\r\nabc", 400),
            (b"POST / HTTP/1.1\r\nContent-Length:\r\n\r\n", 400),
            (b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
            (b"POST / HTTP/1.1\r\nTransfer-Encoding: identity\r\n\r\n", 501),
            (b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501),
            (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\n", 400),
            (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
            (b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
            (b"POST / HTTP/1.1\r\nX: a\rb\r\n\r\n", 400),
            (b"POST / HTTP/1.1\r\nX: a\0b\r\n\r\n", 400),
            (b"POST / HTTP/1.1\r\nX: a\r\n b\r\n\r\n", 400),
            (b"POST / HTTP/1.1\r\nX : a\r\n\r\n", 400),
            (b"POST / HTTP/1.1\r\nX: \xff\r\n\r\n", 400),
            (b"GET / HTTP/2.0\r\n\r\n", 505),
            (b"GET / HTTP/1.2\r\n\r\n", 505),
            (b"GET / HTTP/0.9\r\n\r\n", 505),
            (b"GET / FOO/1.1\r\n\r\n", 400),
            (b"GET /\r\n\r\n", 400),
            (b"POST / HTTP/1.1\r\nExpect: 200-ok\r\n\r\n", 417),
        ];
        for (input, want) in cases {
            assert_eq!(status(input), *want, "{:?}", String::from_utf8_lossy(input));
        }
    }

    #[test]
    fn malformed_chunk_sizes_are_refused() {
        for size in [
            "+3", " 3", "3 ", "-3", "0x3", "", "g", "fffffffffffffffff", "3\r", ";x", " ;x", "3;a\0b",
            "3;\x7f",
        ] {
            let input =
                format!("POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n{size}\r\nabc\r\n0\r\n\r\n");
            let s = status(input.as_bytes());
            assert!(s == 400 || s == 413, "{size:?}: {s}");
        }
        // Extensions are allowed (and ignored).
        assert_eq!(status(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3 ;a=b\r\nabc\r\n0\r\n\r\n"), 200);
        // A bare LF after the size, or after the data, is not a chunk boundary.
        assert_eq!(status(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\nabc\r\n0\r\n\r\n"), 400);
        assert_eq!(status(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\n0\r\n\r\n"), 400);
    }

    #[test]
    fn chunk_size_lines_and_trailers_are_bounded() {
        let mut endless = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        endless.extend(std::iter::repeat(b'0').take(MAX_CHUNK_LINE + 10));
        assert_eq!(status(&endless), 400);
        let mut trailers = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n".to_vec();
        trailers.extend(std::iter::repeat(b"X: y\r\n").take(2000).flatten());
        trailers.extend_from_slice(b"\r\n");
        assert_eq!(status(&trailers), 431);
    }

    #[test]
    fn cl_with_te_is_chunked_and_closes() {
        let h = parse_head(
            b"POST / HTTP/1.1\r\nContent-Length: 50\r\nTransfer-Encoding: chunked\r\n\r\n",
            100,
        )
        .unwrap();
        assert_eq!(h.framing, Framing::Chunked);
        assert!(!h.keep_alive);
    }

    #[test]
    fn keep_alive_follows_version_and_connection() {
        let ka = |h: &[u8]| parse_head(h, 100).unwrap().keep_alive;
        assert!(ka(b"GET / HTTP/1.1\r\n\r\n"));
        assert!(!ka(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n"));
        assert!(!ka(b"GET / HTTP/1.1\r\nConnection: keep-alive, close\r\n\r\n"));
        assert!(!ka(b"GET / HTTP/1.0\r\n\r\n"));
        assert!(ka(b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n"));
    }

    #[test]
    fn head_end_is_found_incrementally() {
        let h = b"GET / HTTP/1.1\r\nA: b\r\n\r\nrest";
        for from in 0..h.len() - 4 {
            assert_eq!(find_head_end(h, from), Some(h.len() - 4), "from {from}");
        }
        assert_eq!(find_head_end(b"GET / HTTP/1.1\nA: b\n\n", 0), Some(21));
        assert_eq!(find_head_end(b"GET / HTTP/1.1\r\nA: b\r\n", 0), None);
    }
}
