//! The runner protocol: the daemon's half of `python/index.py`. The status
//! lines a request's child (and its zygote) report, the messages to the base
//! process and the zygotes, and the one place that checks what a function
//! returned before any of it reaches the wire.

use serde::Deserialize;

/// The runner every function process executes, embedded so the binary is a complete install.
pub const RUNNER: &str = include_str!("../../python/index.py");

/// Largest request message a spare takes (`REQUEST_MAX` in the runner).
pub const REQUEST_MAX: usize = 64 * 1024;

/// Longest status line kept (an R line carries the headers a handler set).
const MAX_LINE: usize = 64 * 1024;

/// One line on a request's status pipe.
#[derive(Debug, PartialEq, Eq)]
pub enum Status {
    /// `P <pid>`: the child runs, leading its own process group.
    Started(u32),
    /// `R <json>`: `handle()` returned; the JSON carries a dict's status and headers.
    Returned(Vec<u8>),
    /// `F <code>`: `handle()` failed; stderr says why.
    Failed(i32),
    /// `X <wait status>`: (from the zygote) the child exited and its group was killed.
    Exited(i32),
}

impl Status {
    /// Parses one line (without its newline); `None` for anything else.
    pub fn parse(line: &[u8]) -> Option<Status> {
        let (kind, rest) = match line {
            [k, b' ', rest @ ..] => (*k, rest),
            _ => return None,
        };
        let number = || std::str::from_utf8(rest).ok()?.parse::<i64>().ok();
        match kind {
            b'P' => Some(Status::Started(u32::try_from(number()?).ok()?)),
            b'R' => Some(Status::Returned(rest.to_vec())),
            b'F' => Some(Status::Failed(i32::try_from(number()?).ok()?)),
            b'X' => Some(Status::Exited(i32::try_from(number()?).ok()?)),
            _ => None,
        }
    }
}

/// Collects a status pipe's bytes into lines, bounded.
#[derive(Default)]
pub struct Lines {
    partial: Vec<u8>,
    overflow: bool,
}

impl Lines {
    /// Feeds bytes; returns the lines they completed (a line past the bound is dropped).
    pub fn feed(&mut self, mut bytes: &[u8]) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        while let Some(nl) = bytes.iter().position(|&b| b == b'\n') {
            if !self.overflow && self.partial.len() + nl <= MAX_LINE {
                self.partial.extend_from_slice(&bytes[..nl]);
                out.push(std::mem::take(&mut self.partial));
            }
            self.partial.clear();
            self.overflow = false;
            bytes = &bytes[nl + 1..];
        }
        if self.partial.len() + bytes.len() > MAX_LINE {
            self.overflow = true;
            self.partial.clear();
        } else if !self.overflow {
            self.partial.extend_from_slice(bytes);
        }
        out
    }
}

/// What a handler's dict set, as the runner reports it.
#[derive(Deserialize)]
struct Meta {
    /// A number, or (for anything else the handler set) its Python repr as a string.
    #[serde(rename = "statusCode", default = "ok")]
    status: serde_json::Value,
    #[serde(default)]
    headers: Vec<(String, String)>,
}

fn ok() -> serde_json::Value {
    serde_json::Value::from(200)
}

/// Headers that frame the answer or belong to one hop: the daemon's own, never a function's.
const FRAMING: [&str; 8] = [
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
];

/// A function's answer metadata, checked: a status from 200 to 599 and headers
/// that can be written as they are.
#[derive(Debug, PartialEq, Eq)]
pub struct Checked {
    pub status: u16,
    pub headers: Vec<(String, String)>,
}

/// Checks an R line's JSON against the body the function wrote; the error names
/// the field that cannot go on the wire. Framing and hop-by-hop headers are dropped.
pub fn check(json: &[u8], body_len: usize) -> Result<Checked, String> {
    let meta: Meta =
        serde_json::from_slice(json).map_err(|e| format!("its response dict is malformed: {e}"))?;
    let status = meta
        .status
        .as_u64()
        .and_then(|s| u16::try_from(s).ok())
        .filter(|s| (200..=599).contains(s))
        .ok_or_else(|| {
            let shown = match &meta.status {
                serde_json::Value::String(repr) => repr.clone(),
                other => other.to_string(),
            };
            format!("statusCode {shown} is not an integer from 200 to 599")
        })?;
    if matches!(status, 204 | 304) && body_len > 0 {
        return Err(format!(
            "statusCode {status} cannot carry a body, and it wrote {body_len} bytes"
        ));
    }
    let mut headers = Vec::with_capacity(meta.headers.len());
    for (name, value) in meta.headers {
        if !is_token(&name) {
            return Err(format!("header name {name:?} is not an HTTP token"));
        }
        if let Some(bad) = value
            .chars()
            .find(|&c| c != '\t' && (c < ' ' || c == '\x7f'))
        {
            return Err(format!(
                "header {name:?} has a control character ({:?}) in its value",
                bad
            ));
        }
        if !value.is_ascii() {
            return Err(format!("header {name:?} has a value that is not ASCII"));
        }
        if FRAMING.iter().any(|f| name.eq_ignore_ascii_case(f)) {
            continue;
        }
        headers.push((name, value));
    }
    Ok(Checked { status, headers })
}

/// An RFC 9110 token: one or more of letters, digits and ``!#$%&'*+-.^_`|~``.
fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// A request for a zygote: its environment as `key\0value\0...` (keys and
/// values hold no NUL: the router drops those).
pub fn encode_env(env: &[(String, String)]) -> Vec<u8> {
    let mut msg = Vec::with_capacity(env.iter().map(|(k, v)| k.len() + v.len() + 2).sum());
    for (i, (k, v)) in env.iter().enumerate() {
        if i > 0 {
            msg.push(0);
        }
        msg.extend_from_slice(k.as_bytes());
        msg.push(0);
        msg.extend_from_slice(v.as_bytes());
    }
    msg
}

/// A command for the base process: `Z` (fork a zygote) or `C` (fork a check)
/// and the handler path, NUL-separated (the options travel in a pipe).
pub fn base_command(kind: u8, handler: &std::path::Path) -> Vec<u8> {
    use std::os::unix::ffi::OsStrExt;
    let mut msg = vec![kind, 0];
    msg.extend_from_slice(handler.as_os_str().as_bytes());
    msg
}

/// Largest options blob (it must fit a pipe's buffer: the daemon writes it
/// before the child reads it).
pub const OPTIONS_MAX: usize = 48 * 1024;

/// A zygote's or check's `key=value` options, NUL-separated.
pub fn encode_options(options: &[String]) -> Vec<u8> {
    options.join("\0").into_bytes()
}

/// The interpreter running `runner`, with the daemon's environment minus its
/// own `EDGEFAAS_*` settings (the token, broker credentials).
pub fn command(python: &str, runner: &std::path::Path) -> std::process::Command {
    let mut cmd = std::process::Command::new(python);
    // -s: no user site-packages (a function's packages come from the image or a
    // venv), which also spares every exec-mode request a directory lookup.
    cmd.arg("-s").arg(runner);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("EDGEFAAS_") {
            cmd.env_remove(key);
        }
    }
    cmd.env("PYTHONDONTWRITEBYTECODE", "1");
    cmd
}

/// Makes sure the runner file holds the daemon's runner, rewriting it (with a
/// warning) if anything changed it: checked before every process that loads it.
pub fn ensure(path: &std::path::Path) -> std::io::Result<()> {
    if std::fs::read(path).is_ok_and(|b| b == RUNNER.as_bytes()) {
        return Ok(());
    }
    log::warn!(
        "the runner {} was changed or removed; writing it again",
        path.display()
    );
    static SERIAL: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = SERIAL.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = path.with_file_name(format!(".index.py.{}.{n}", std::process::id()));
    let written = std::fs::write(&tmp, RUNNER).and_then(|()| std::fs::rename(&tmp, path));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// `pid <n>` from the base, or `ready <n>` from a zygote.
pub fn pid_reply(msg: &[u8], word: &str) -> Option<u32> {
    std::str::from_utf8(msg)
        .ok()?
        .strip_prefix(word)?
        .strip_prefix(' ')?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines_parse_and_junk_is_refused() {
        assert_eq!(Status::parse(b"P 42"), Some(Status::Started(42)));
        assert_eq!(Status::parse(b"F 3"), Some(Status::Failed(3)));
        assert_eq!(Status::parse(b"X 9"), Some(Status::Exited(9)));
        assert_eq!(
            Status::parse(b"R {}"),
            Some(Status::Returned(b"{}".to_vec()))
        );
        for junk in [
            &b"P"[..],
            b"P x",
            b"Q 1",
            b"",
            b"P -1",
            b"\xff 1",
            b"F 99999999999",
        ] {
            assert_eq!(Status::parse(junk), None, "{junk:?}");
        }
    }

    #[test]
    fn lines_are_split_and_bounded() {
        let mut l = Lines::default();
        assert_eq!(l.feed(b"P 1\nR {"), vec![b"P 1".to_vec()]);
        assert_eq!(l.feed(b"}\n"), vec![b"R {}".to_vec()]);
        let huge = vec![b'a'; MAX_LINE + 10];
        assert!(l.feed(&huge).is_empty());
        assert!(l.feed(b"tail\nF 1\n") == vec![b"F 1".to_vec()]);
    }

    #[test]
    fn answers_are_checked_in_one_place() {
        let ok = check(br#"{"statusCode":201,"headers":[["X-A","b"],["Content-Length","9"],["Connection","close"]]}"#, 3).unwrap();
        assert_eq!(ok.status, 201);
        assert_eq!(ok.headers, vec![("X-A".to_string(), "b".to_string())]);
        assert_eq!(check(b"{}", 0).unwrap().status, 200);
        for (json, len, names) in [
            (&br#"{"statusCode":101}"#[..], 0, "101"),
            (br#"{"statusCode":600}"#, 0, "600"),
            (br#"{"statusCode":-1}"#, 0, "-1"),
            (br#"{"statusCode":"'teapot'"}"#, 0, "'teapot'"),
            (br#"{"statusCode":204}"#, 2, "204"),
            (br#"{"statusCode":304}"#, 1, "304"),
            (br#"{"headers":[["X-A","a\r\nSet-Cookie: x=1"]]}"#, 0, "X-A"),
            (br#"{"headers":[["X-A","a\u0000"]]}"#, 0, "X-A"),
            (br#"{"headers":[["Bad Name","v"]]}"#, 0, "Bad Name"),
            (br#"{"headers":[["X\nY","v"]]}"#, 0, "X\\nY"),
            (br#"{"headers":[["X-U","\u00e9"]]}"#, 0, "X-U"),
            (b"not json", 0, "malformed"),
        ] {
            let err = check(json, len).unwrap_err();
            assert!(err.contains(names), "{err}");
        }
        assert!(check(br#"{"statusCode":204}"#, 0).is_ok());
    }

    #[test]
    fn env_and_commands_are_nul_separated() {
        let env = vec![
            ("Http_Method".to_string(), "GET".to_string()),
            ("Http_Path".to_string(), "/".to_string()),
        ];
        assert_eq!(encode_env(&env), b"Http_Method\0GET\0Http_Path\0/");
        assert_eq!(
            base_command(b'Z', std::path::Path::new("/f/a/handler.py")),
            b"Z\0/f/a/handler.py"
        );
        assert_eq!(
            encode_options(&["tmp=/t".into(), "env=A=1".into()]),
            b"tmp=/t\0env=A=1"
        );
        assert_eq!(pid_reply(b"ready 12", "ready"), Some(12));
        assert_eq!(pid_reply(b"fail x", "ready"), None);
    }
}
