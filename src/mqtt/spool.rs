//! Outgoing publishes on disk (`<functions dir>/.spool`), one file each, named
//! by a sequence number, so they are sent in order. A QoS 1 reply is written
//! here before the message that caused it is acknowledged, and its file goes
//! when the broker acknowledges it: a crash or SIGKILL loses neither. While the
//! broker is unreachable the files are also fsynced (a power cut keeps them).
//! Past the byte bound the oldest are dropped, and counted.

use std::collections::VecDeque;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

/// One spooled publish: its file and size.
#[derive(Clone, Debug)]
pub struct Entry {
    pub seq: u64,
    pub path: PathBuf,
    pub size: u64,
}

pub struct Spool {
    dir: PathBuf,
    max_bytes: u64,
    entries: VecDeque<Entry>,
    bytes: u64,
    next: u64,
}

impl Spool {
    /// Opens the spool, keeping what an earlier run left (half-written files go).
    pub fn open(dir: &Path, max_bytes: u64) -> std::io::Result<Spool> {
        fs::create_dir_all(dir)?;
        let mut entries = Vec::new();
        for e in fs::read_dir(dir)?.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            match name
                .strip_suffix(".pub")
                .and_then(|s| s.parse::<u64>().ok())
            {
                Some(seq) => {
                    let size = e.metadata().map_or(0, |m| m.len());
                    entries.push(Entry {
                        seq,
                        path: e.path(),
                        size,
                    });
                }
                // Half-written files go; anything else (the subscriptions list) stays.
                None if name.starts_with('.') && name.ends_with(".tmp") => {
                    let _ = fs::remove_file(e.path());
                }
                None => {}
            }
        }
        entries.sort_by_key(|e| e.seq);
        let next = entries.last().map_or(0, |e| e.seq + 1);
        let bytes = entries.iter().map(|e| e.size).sum();
        Ok(Spool {
            dir: dir.to_path_buf(),
            max_bytes,
            entries: entries.into(),
            bytes,
            next,
        })
    }

    /// Spooled publishes, oldest first.
    pub fn entries(&self) -> impl Iterator<Item = &Entry> {
        self.entries.iter()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Writes one publish (its encoded packet); `durable` fsyncs it. Returns the
    /// entry and how many of the oldest were dropped to stay within the bound.
    pub fn push(&mut self, packet: &[u8], durable: bool) -> std::io::Result<(Entry, usize)> {
        let seq = self.next;
        self.next += 1;
        let path = self.dir.join(format!("{seq:020}.pub"));
        let tmp = self.dir.join(format!(".{seq:020}.tmp"));
        let written = (|| -> std::io::Result<()> {
            let mut f = private_file(&tmp)?;
            f.write_all(packet)?;
            if durable {
                f.sync_all()?;
            }
            fs::rename(&tmp, &path)?;
            if durable {
                fs::File::open(&self.dir)?.sync_all()?;
            }
            Ok(())
        })();
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        let entry = Entry {
            seq,
            path,
            size: packet.len() as u64,
        };
        self.bytes += entry.size;
        self.entries.push_back(entry.clone());
        let mut dropped = 0;
        while self.bytes > self.max_bytes && self.entries.len() > 1 {
            if let Some(old) = self.entries.pop_front() {
                self.bytes -= old.size;
                let _ = fs::remove_file(&old.path);
                dropped += 1;
            }
        }
        Ok((entry, dropped))
    }

    /// Removes a publish the broker acknowledged (or a QoS 0 one that was sent).
    pub fn remove(&mut self, seq: u64) {
        if let Some(i) = self.entries.iter().position(|e| e.seq == seq) {
            if let Some(e) = self.entries.remove(i) {
                self.bytes -= e.size;
                let _ = fs::remove_file(&e.path);
            }
        }
    }

    /// The oldest sequence number still spooled (the spool drops from the front).
    pub fn front_seq(&self) -> u64 {
        self.entries.front().map_or(self.next, |e| e.seq)
    }
}

/// Creates `path` readable by the daemon's user only: spooled replies and
/// queued calls carry payloads and request headers.
pub fn private_file(path: &Path) -> std::io::Result<fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_bound_and_restart() {
        let dir = std::env::temp_dir().join(format!("edgefaas-spool-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let mut s = Spool::open(&dir, 25).unwrap();
        for i in 0..4u8 {
            let (_, dropped) = s.push(&[i; 10], i == 0).unwrap();
            assert_eq!(dropped, usize::from(i >= 2));
        }
        let seqs: Vec<u64> = s.entries().map(|e| e.seq).collect();
        assert_eq!(seqs, vec![2, 3]);
        s.remove(2);
        fs::write(dir.join(".00000000000000000009.tmp"), b"half").unwrap();
        fs::write(dir.join("subscriptions"), b"a/#\n").unwrap();
        let s = Spool::open(&dir, 25).unwrap();
        assert_eq!(s.entries().map(|e| e.seq).collect::<Vec<_>>(), vec![3]);
        assert_eq!(
            fs::read(&s.entries().next().unwrap().path).unwrap(),
            [3u8; 10]
        );
        assert!(!dir.join(".00000000000000000009.tmp").exists());
        assert!(
            dir.join("subscriptions").exists(),
            "the subscriptions list is kept"
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(&s.entries().next().unwrap().path)
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "spooled publishes are private");
        let _ = fs::remove_dir_all(&dir);
    }
}
