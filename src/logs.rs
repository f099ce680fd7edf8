//! Each function's recent log: its stderr lines and the summaries of its
//! failures, newest last, in a bounded ring in memory (`GET /mgmt/<name>/logs`).

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

/// Lines kept per function.
pub const MAX_LINES: usize = 500;
/// Bytes kept per function (lines are cut at 1 KiB).
const MAX_BYTES: usize = 64 * 1024;
const MAX_LINE: usize = 1024;

/// One line and when it was logged (milliseconds since the epoch).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Line {
    pub at_ms: u64,
    pub text: String,
}

#[derive(Default)]
struct Ring {
    lines: VecDeque<Line>,
    bytes: usize,
}

/// The rings, by function name.
#[derive(Default)]
pub struct Logs {
    rings: Mutex<HashMap<String, Ring>>,
}

impl Logs {
    /// Adds `text` (one or more lines) to `name`'s ring, dropping the oldest past the bounds.
    pub fn push(&self, name: &str, text: &str) {
        let at_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let mut rings = self.rings.lock().unwrap_or_else(|p| p.into_inner());
        let ring = rings.entry(name.to_string()).or_default();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let text: String = line.chars().take(MAX_LINE).collect();
            ring.bytes += text.len();
            ring.lines.push_back(Line { at_ms, text });
        }
        while ring.lines.len() > MAX_LINES || ring.bytes > MAX_BYTES {
            match ring.lines.pop_front() {
                Some(old) => ring.bytes -= old.text.len(),
                None => break,
            }
        }
    }

    /// `name`'s lines logged at or after `since_ms`, the last `lines` of them.
    pub fn read(&self, name: &str, since_ms: u64, lines: usize) -> Vec<Line> {
        let rings = self.rings.lock().unwrap_or_else(|p| p.into_inner());
        let Some(ring) = rings.get(name) else {
            return Vec::new();
        };
        let kept: Vec<Line> = ring
            .lines
            .iter()
            .filter(|l| l.at_ms >= since_ms)
            .cloned()
            .collect();
        kept[kept.len().saturating_sub(lines)..].to_vec()
    }

    /// Forgets `name`'s log (deleted: a new function of that name starts clean).
    pub fn forget(&self, name: &str) {
        self.rings
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rings_are_bounded_per_function_and_read_newest_last() {
        let logs = Logs::default();
        for i in 0..(MAX_LINES + 50) {
            logs.push("a", &format!("line {i}"));
        }
        logs.push("b", "only b\n\n");
        let a = logs.read("a", 0, usize::MAX);
        assert_eq!(a.len(), MAX_LINES);
        assert_eq!(a.last().unwrap().text, format!("line {}", MAX_LINES + 49));
        assert_eq!(logs.read("a", 0, 2).len(), 2);
        assert_eq!(logs.read("b", 0, 10)[0].text, "only b");
        assert!(logs.read("a", u64::MAX, 10).is_empty());
        logs.push("big", &"x".repeat(5000));
        assert_eq!(logs.read("big", 0, 1)[0].text.len(), MAX_LINE);
        logs.forget("a");
        assert!(logs.read("a", 0, 10).is_empty());
    }
}
