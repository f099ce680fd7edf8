//! A function's own settings: from `# edgefaas: key=value ...` lines at the top
//! of its file, overridden by the install request's query parameters, kept in
//! its metadata, and kept by an update unless the update changes them.

use std::collections::BTreeMap;
use std::time::Duration;

use percent_encoding::percent_decode_str;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Everything a function can set for itself; `None` means the daemon's default.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    /// Seconds one invocation may run (default `EDGEFAAS_EXEC_TIMEOUT`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<f64>,
    /// Bytes of address space each of its processes may map.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<u64>,
    /// Invocations of this function running at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<u32>,
    /// Variables added to its environment.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// One warm child serves its requests one after another, keeping its state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reuse: Option<bool>,
    /// MQTT topic filters that invoke it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub topic: Vec<String>,
    /// MQTT topic its output is published to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply: Option<String>,
    /// A 5-field cron expression it runs on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<String>,
}

/// Most bytes a function's `env` settings may take (they travel to its zygote in a pipe).
pub const MAX_ENV: usize = 32 * 1024;

/// Smallest `memory` accepted: an interpreter needs about this much address space to start.
pub const MIN_MEMORY: u64 = 32 << 20;

/// One change a header line or a query parameter asks for.
#[derive(Debug, PartialEq)]
enum Change {
    Timeout(Option<f64>),
    Memory(Option<u64>),
    Concurrency(Option<u32>),
    Env(String, Option<String>),
    Reuse(Option<bool>),
    Topic(Option<String>),
    Reply(Option<String>),
    Schedule(Option<String>),
}

fn bad(key: &str, expected: &str, value: &str) -> Error {
    Error::BadRequest(format!(
        "setting {key}: expected {expected}, got {:?}",
        value.chars().take(100).collect::<String>()
    ))
}

/// Parses one `key=value`; an empty value resets the key to its default.
fn change(key: &str, value: &str) -> Result<Change> {
    let empty = value.is_empty();
    Ok(match key {
        "timeout" => Change::Timeout(if empty {
            None
        } else {
            let secs: f64 = value
                .parse()
                .ok()
                .filter(|s: &f64| s.is_finite() && (0.001..=604_800.0).contains(s))
                .ok_or_else(|| bad(key, "seconds from 0.001 to 604800", value))?;
            Some(secs)
        }),
        "memory" => Change::Memory(if empty {
            None
        } else {
            let bytes = parse_bytes(value)
                .filter(|b| *b >= MIN_MEMORY)
                .ok_or_else(|| bad(key, "bytes with K, M or G, at least 32M", value))?;
            Some(bytes)
        }),
        "concurrency" => Change::Concurrency(if empty {
            None
        } else {
            Some(
                value
                    .parse::<u32>()
                    .ok()
                    .filter(|n| (1..=1024).contains(n))
                    .ok_or_else(|| bad(key, "a whole number from 1 to 1024", value))?,
            )
        }),
        "reuse" => Change::Reuse(match value {
            "" => None,
            "true" => Some(true),
            "false" => Some(false),
            _ => return Err(bad(key, "true or false", value)),
        }),
        "env" => match value.split_once('=') {
            Some((k, v)) => {
                check_env_key(k)?;
                if v.contains('\0') {
                    return Err(bad(key, "a value without NUL", value));
                }
                Change::Env(k.to_string(), Some(v.to_string()))
            }
            // `env=KEY` (no '='): drop KEY.
            None if !empty => {
                check_env_key(value)?;
                Change::Env(value.to_string(), None)
            }
            None => return Err(bad(key, "KEY=VALUE (or KEY to remove it)", value)),
        },
        "topic" => Change::Topic(if empty {
            None
        } else {
            Some(check_topic(key, value, true)?)
        }),
        "reply" => Change::Reply(if empty {
            None
        } else {
            Some(check_topic(key, value, false)?)
        }),
        "schedule" => Change::Schedule(if empty {
            None
        } else {
            let cron = crate::schedule::parse(value).map_err(|_| {
                bad(
                    key,
                    "a 5-field cron expression (or 6, seconds first)",
                    value,
                )
            })?;
            if !crate::schedule::ever_fires(&cron) {
                return Err(bad(
                    key,
                    "a cron expression that names a time that comes",
                    value,
                ));
            }
            Some(value.split_whitespace().collect::<Vec<_>>().join(" "))
        }),
        other => {
            return Err(Error::BadRequest(format!(
                "unknown setting {:?}: use timeout, memory, concurrency, env, reuse, topic, reply or schedule",
                other.chars().take(40).collect::<String>()
            )));
        }
    })
}

/// `64M`, `1G`, `65536`, `512K` (powers of 1024).
pub fn parse_bytes(s: &str) -> Option<u64> {
    let (digits, unit) = match s.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => (&s[..i], &s[i..]),
        None => (s, ""),
    };
    let n: u64 = digits.parse().ok()?;
    let mul: u64 = match unit.to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "K" | "KB" | "KI" | "KIB" => 1 << 10,
        "M" | "MB" | "MI" | "MIB" => 1 << 20,
        "G" | "GB" | "GI" | "GIB" => 1 << 30,
        _ => return None,
    };
    n.checked_mul(mul)
}

fn check_env_key(k: &str) -> Result<()> {
    let ok = k
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && k.len() <= 128;
    if !ok {
        return Err(bad("env", "a variable name of letters, digits and _", k));
    }
    if k.starts_with("EDGEFAAS_")
        || k.starts_with("Http_")
        || k.starts_with("Mqtt_")
        || k == "Secrets_Dir"
    {
        return Err(Error::BadRequest(format!(
            "setting env: {k} is the daemon's to set"
        )));
    }
    Ok(())
}

/// An MQTT topic (or, for `topic`, a filter: `+` and `#` allowed, `$share/<group>/…`).
fn check_topic(key: &str, value: &str, filter: bool) -> Result<String> {
    // (valid_filter and valid_topic refuse control characters too.)
    let ok = value.len() <= 1024
        && if filter {
            crate::mqtt::valid_filter(value)
        } else {
            crate::mqtt::valid_topic(value)
        };
    if !ok {
        let what = if filter {
            "an MQTT topic filter (+ and # only as whole levels, # last; $share/<group>/<filter>)"
        } else {
            "an MQTT topic without + or #"
        };
        return Err(bad(key, what, value));
    }
    Ok(value.to_string())
}

impl Settings {
    /// Applies `changes` in order (later ones win).
    fn apply(&mut self, changes: Vec<Change>) {
        let mut topics_reset = false;
        for c in changes {
            match c {
                Change::Timeout(v) => self.timeout = v,
                Change::Memory(v) => self.memory = v,
                Change::Concurrency(v) => self.concurrency = v,
                Change::Reuse(v) => self.reuse = v,
                Change::Env(k, Some(v)) => {
                    self.env.insert(k, v);
                }
                Change::Env(k, None) => {
                    self.env.remove(&k);
                }
                // Topics given anew replace the old list as a whole.
                Change::Topic(t) => {
                    if !topics_reset {
                        self.topic.clear();
                        topics_reset = true;
                    }
                    if let Some(t) = t {
                        if !self.topic.contains(&t) {
                            self.topic.push(t);
                        }
                    }
                }
                Change::Reply(v) => self.reply = v,
                Change::Schedule(v) => self.schedule = v,
            }
        }
    }

    /// The settings an install gives: the old ones, then the file's header lines,
    /// then the request's query parameters (each later source wins).
    pub fn for_install(old: Option<&Settings>, source: &[u8], query: &str) -> Result<Settings> {
        let mut s = old.cloned().unwrap_or_default();
        s.apply(from_header(source)?);
        s.apply(from_query(query)?);
        let env_bytes: usize = s.env.iter().map(|(k, v)| k.len() + v.len() + 6).sum();
        if env_bytes > MAX_ENV {
            return Err(Error::BadRequest(format!(
                "setting env: the variables take {env_bytes} bytes, more than {MAX_ENV}"
            )));
        }
        Ok(s)
    }

    /// The timeout to apply, given the daemon's default.
    pub fn timeout_or(&self, default: Duration) -> Duration {
        self.timeout
            .and_then(|s| Duration::try_from_secs_f64(s).ok())
            .unwrap_or(default)
    }

    /// True when one warm child serves the function's requests in turn.
    pub fn reuses(&self) -> bool {
        self.reuse == Some(true)
    }

    /// How many of its invocations may run at once (reuse: one).
    pub fn concurrency_limit(&self) -> usize {
        if self.reuses() {
            1
        } else {
            self.concurrency.map_or(usize::MAX, |n| n as usize)
        }
    }
}

/// Changes from the `# edgefaas: key=value ...` lines among the comment lines at
/// the top of a file (blank lines and other comments may sit between them).
fn from_header(source: &[u8]) -> Result<Vec<Change>> {
    let text = String::from_utf8_lossy(source);
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let Some(comment) = line.strip_prefix('#') else {
            break;
        };
        let Some(rest) = comment.trim_start().strip_prefix("edgefaas:") else {
            continue;
        };
        for token in tokens(rest)? {
            let (k, v) = token
                .split_once('=')
                .ok_or_else(|| bad(&token, "key=value", &token))?;
            out.push(change(k, v)?);
        }
    }
    Ok(out)
}

/// Splits a header line at spaces, except inside double quotes (which go):
/// `schedule="*/5 * * * *" env=GREETING="hello world"`.
fn tokens(line: &str) -> Result<Vec<String>> {
    let (mut out, mut cur, mut quoted, mut any) = (Vec::new(), String::new(), false, false);
    for c in line.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                any = true;
            }
            c if c.is_whitespace() && !quoted => {
                if any {
                    out.push(std::mem::take(&mut cur));
                    any = false;
                }
            }
            c => {
                cur.push(c);
                any = true;
            }
        }
    }
    if quoted {
        return Err(Error::BadRequest(format!(
            "settings line {:?}: a quote is not closed",
            line.trim().chars().take(100).collect::<String>()
        )));
    }
    if any {
        out.push(cur);
    }
    Ok(out)
}

/// Changes from a query string (`timeout=30&env=A%3D1`).
fn from_query(query: &str) -> Result<Vec<Change>> {
    let mut out = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let decode = |s: &str| {
            percent_decode_str(&s.replace('+', " "))
                .decode_utf8()
                .map(|c| c.into_owned())
                .map_err(|_| Error::BadRequest(format!("setting {k}: not UTF-8")))
        };
        out.push(change(&decode(k)?, &decode(v)?)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_lines_then_query_then_kept_on_update() {
        let src = b"#!/usr/bin/env python3\n# edgefaas: timeout=30 memory=64M\n# a note\n# edgefaas: env=A=1 env=B=two concurrency=2\nimport os\n# edgefaas: timeout=1\n";
        let s = Settings::for_install(None, src, "memory=128M&env=C%3D3").unwrap();
        assert_eq!(s.timeout, Some(30.0));
        assert_eq!(s.memory, Some(128 << 20));
        assert_eq!(s.concurrency, Some(2));
        assert_eq!(s.env.get("A").map(String::as_str), Some("1"));
        assert_eq!(s.env.get("C").map(String::as_str), Some("3"));
        // An update that says nothing keeps them; one that says something changes that.
        let u = Settings::for_install(Some(&s), b"def handle(r):\n    return r\n", "").unwrap();
        assert_eq!(u, s);
        let u = Settings::for_install(Some(&s), b"# edgefaas: timeout=5 env=A\n", "concurrency=")
            .unwrap();
        assert_eq!(u.timeout, Some(5.0));
        assert_eq!(u.concurrency, None);
        assert!(!u.env.contains_key("A"));
        assert_eq!(u.memory, Some(128 << 20));
    }

    #[test]
    fn quotes_keep_spaces_in_a_header_value() {
        let src = b"# edgefaas: schedule=\"*/5 * * * *\" env=G=\"hello world\" topic=a/b\n";
        let s = Settings::for_install(None, src, "").unwrap();
        assert_eq!(s.schedule.as_deref(), Some("*/5 * * * *"));
        assert_eq!(s.env.get("G").map(String::as_str), Some("hello world"));
        assert_eq!(s.topic, vec!["a/b".to_string()]);
        let q = Settings::for_install(None, b"", "schedule=0+6+*+*+1-5").unwrap();
        assert_eq!(q.schedule.as_deref(), Some("0 6 * * 1-5"));
        assert!(Settings::for_install(None, b"# edgefaas: env=A=\"x\n", "").is_err());
    }

    #[test]
    fn bad_values_name_the_setting() {
        for (q, named) in [
            ("timeout=0", "timeout"),
            ("timeout=abc", "timeout"),
            ("memory=1K", "memory"),
            ("memory=12X", "memory"),
            ("concurrency=0", "concurrency"),
            ("reuse=yes", "reuse"),
            ("env=1A=b", "env"),
            ("env=EDGEFAAS_MGMT_TOKEN=x", "env"),
            ("env=Http_Method=x", "env"),
            ("color=red", "color"),
            ("reply=a/%2B", "reply"),
            ("schedule=*+*", "schedule"),
            ("schedule=0 0 30 2 *", "schedule"),
            ("topic=a/%23/b", "topic"),
            ("topic=a%2Bb", "topic"),
            ("topic=$share/g", "topic"),
            ("topic=$share//a", "topic"),
        ] {
            let e = Settings::for_install(None, b"", q).unwrap_err();
            assert_eq!(e.status(), 400, "{q}");
            assert!(e.to_string().contains(named), "{q}: {e}");
        }
        assert!(Settings::for_install(None, b"# edgefaas: timeout\n", "").is_err());
    }

    #[test]
    fn bytes_take_binary_suffixes() {
        assert_eq!(parse_bytes("64M"), Some(64 << 20));
        assert_eq!(parse_bytes("1g"), Some(1 << 30));
        assert_eq!(parse_bytes("512KiB"), Some(512 << 10));
        assert_eq!(parse_bytes("99999999999999999999G"), None);
        assert_eq!(parse_bytes("M"), None);
    }
}
