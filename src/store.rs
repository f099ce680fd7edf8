//! The on-disk function store: the only code that writes under the functions
//! directory. Installs and deletes are atomic renames, so a crash at any moment
//! leaves the old function or the new one, never half of one.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use log::{info, warn};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::invoke::runner::RUNNER;
use crate::name::FunctionName;
use crate::settings::Settings;

/// The default function, always present.
pub const ECHO: &str = include_str!("../python/echo/handler.py");

const HANDLER: &str = "handler.py";
const META: &str = "meta.json";
const RUNTIME: &str = ".runtime";
/// Prefixes of the daemon's own scratch entries. A leading dot can never start
/// a valid function name, so none of these can be listed or invoked.
const STAGE: &str = ".stage-";
const TRASH: &str = ".trash-";
const OLD: &str = ".old-";

/// What the store keeps beside each handler.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Meta {
    /// The URL it was downloaded from, or `upload`.
    pub source: String,
    /// Seconds since the Unix epoch when it was installed.
    pub installed_at: u64,
    /// Hex sha256 of handler.py.
    pub sha256: String,
    /// Size of handler.py in bytes.
    pub size: u64,
    /// The function's own settings (header lines and install query).
    #[serde(default)]
    pub settings: Settings,
}

/// One row of the JSON listing.
#[derive(Debug, Serialize)]
pub struct Listing {
    pub name: String,
    pub size: u64,
    pub sha256: String,
    pub source: String,
    /// RFC 3339, UTC.
    pub installed_at: String,
    pub settings: Settings,
}

/// Whether an install made a new function or replaced one.
#[derive(Debug, PartialEq, Eq)]
pub enum Installed {
    Created,
    Updated,
}

/// The functions directory.
pub struct Store {
    dir: PathBuf,
    /// Serialises writers; readers need no lock because every change is one rename.
    write: Mutex<()>,
    /// Settings read from metadata, by function; a change of the function drops its entry.
    settings: Mutex<HashMap<FunctionName, Arc<Settings>>>,
    seq: AtomicU64,
}

impl Store {
    /// Opens (creating) the directory, clears what a crash left behind, and
    /// writes the embedded runner and `echo`.
    pub fn open(dir: &Path) -> io::Result<Store> {
        fs::create_dir_all(dir)?;
        let dir = fs::canonicalize(dir)?;
        let store = Store {
            dir,
            write: Mutex::new(()),
            settings: Mutex::default(),
            seq: AtomicU64::new(0),
        };
        store.recover()?;
        store.write_builtin(RUNTIME, "index.py", RUNNER)?;
        store.write_builtin("echo", HANDLER, ECHO)?;
        Ok(store)
    }

    /// The directory itself.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Path of the embedded runner written at start-up.
    pub fn runner_path(&self) -> PathBuf {
        self.dir.join(RUNTIME).join("index.py")
    }

    /// The handler of an installed function.
    pub fn handler(&self, name: &FunctionName) -> Result<PathBuf> {
        let path = self.dir.join(name.as_str()).join(HANDLER);
        if path.is_file() {
            Ok(path)
        } else {
            Err(Error::NotFound(name.to_string()))
        }
    }

    /// Installed functions: `echo` first, the rest sorted.
    pub fn list(&self) -> io::Result<Vec<FunctionName>> {
        let mut names: Vec<FunctionName> = fs::read_dir(&self.dir)?
            .filter_map(|e| FunctionName::parse(e.ok()?.file_name().to_str()?).ok())
            .filter(|n| self.dir.join(n.as_str()).join(HANDLER).is_file())
            .collect();
        names.sort_by(|a, b| (!a.is_echo(), a).cmp(&(!b.is_echo(), b)));
        Ok(names)
    }

    /// What is known of an installed function: size and sha256 from the file itself,
    /// source and time from its metadata (`unknown` and the file's mtime if that is
    /// missing or describes other bytes).
    pub fn describe(&self, name: &FunctionName) -> io::Result<Listing> {
        let dir = self.dir.join(name.as_str());
        let bytes = fs::read(dir.join(HANDLER))?;
        let sha256 = sha256_hex(&bytes);
        let meta = fs::read(dir.join(META))
            .ok()
            .and_then(|m| serde_json::from_slice::<Meta>(&m).ok())
            .filter(|m| m.sha256 == sha256);
        let settings = self.settings(name).as_ref().clone();
        let (source, secs) = match meta {
            Some(m) => (m.source, m.installed_at),
            None => {
                let mtime = fs::metadata(dir.join(HANDLER))?.modified()?;
                (
                    "unknown".into(),
                    mtime.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
                )
            }
        };
        Ok(Listing {
            name: name.to_string(),
            size: bytes.len() as u64,
            sha256,
            source,
            installed_at: rfc3339(secs),
            settings,
        })
    }

    /// The settings of an installed function (its defaults if it has no metadata).
    pub fn settings(&self, name: &FunctionName) -> Arc<Settings> {
        let mut cache = self.settings.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = cache.get(name) {
            return s.clone();
        }
        let s = Arc::new(
            fs::read(self.dir.join(name.as_str()).join(META))
                .ok()
                .and_then(|m| serde_json::from_slice::<Meta>(&m).ok())
                .map(|m| m.settings)
                .unwrap_or_default(),
        );
        cache.insert(name.clone(), s.clone());
        s
    }

    /// The recorded source of an installed function, if it has metadata.
    pub fn source_of(&self, name: &FunctionName) -> Option<String> {
        let m = fs::read(self.dir.join(name.as_str()).join(META)).ok()?;
        serde_json::from_slice::<Meta>(&m).ok().map(|m| m.source)
    }

    /// Installs `source` as function `name`, atomically replacing any old version,
    /// once `verify` accepts the staged `handler.py`; if it refuses, nothing changes.
    pub fn install(
        &self,
        name: &FunctionName,
        source: &[u8],
        origin: &str,
        settings: Settings,
        verify: impl FnOnce(&Path) -> Result<()>,
    ) -> Result<Installed> {
        if name.is_echo() {
            return Err(Error::Protected);
        }
        let meta = Meta {
            source: origin.to_string(),
            installed_at: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            sha256: sha256_hex(source),
            size: source.len() as u64,
            settings,
        };
        // Staged and checked outside the lock: a slow import check holds up no other install.
        let stage = self.scratch(STAGE, name);
        let staged = self
            .stage(&stage, source, &meta)
            .map_err(Error::from)
            .and_then(|()| verify(&stage.join(HANDLER)));
        if let Err(e) = staged {
            let _ = fs::remove_dir_all(&stage);
            return Err(e);
        }
        let _guard = self.write.lock().unwrap_or_else(|p| p.into_inner());
        let target = self.dir.join(name.as_str());
        let outcome = if target.exists() {
            self.swap_in(&stage, &target)?;
            Installed::Updated
        } else {
            fs::rename(&stage, &target)?;
            Installed::Created
        };
        self.forget_settings(name);
        sync_dir(&self.dir)?;
        info!(
            "installed {name} ({} bytes, sha256 {}) from {origin}",
            meta.size, meta.sha256
        );
        Ok(outcome)
    }

    /// Deletes function `name`: one rename out of sight, then removal.
    pub fn delete(&self, name: &FunctionName) -> Result<()> {
        if name.is_echo() {
            return Err(Error::Protected);
        }
        let _guard = self.write.lock().unwrap_or_else(|p| p.into_inner());
        let target = self.dir.join(name.as_str());
        if !target.join(HANDLER).is_file() {
            return Err(Error::NotFound(name.to_string()));
        }
        let trash = self.scratch(TRASH, name);
        fs::rename(&target, &trash)?;
        self.forget_settings(name);
        sync_dir(&self.dir)?;
        if let Err(e) = fs::remove_dir_all(&trash) {
            warn!(
                "cannot remove {}: {e}; it is cleared at next start",
                trash.display()
            );
        }
        info!("deleted {name}");
        Ok(())
    }

    fn forget_settings(&self, name: &FunctionName) {
        self.settings
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
    }

    /// Writes a complete, synced function directory at `stage`.
    fn stage(&self, stage: &Path, source: &[u8], meta: &Meta) -> io::Result<()> {
        fs::create_dir(stage)?;
        write_synced(&stage.join(HANDLER), source)?;
        let meta = serde_json::to_vec(meta).map_err(io::Error::other)?;
        write_synced(&stage.join(META), &meta)?;
        sync_dir(stage)
    }

    /// Replaces `target` by `stage` in one step where the file system can
    /// (RENAME_EXCHANGE), else in two renames that `recover` can undo.
    fn swap_in(&self, stage: &Path, target: &Path) -> io::Result<()> {
        let exchanged = rustix::fs::renameat_with(
            rustix::fs::CWD,
            stage,
            rustix::fs::CWD,
            target,
            rustix::fs::RenameFlags::EXCHANGE,
        )
        .map_err(io::Error::from);
        match exchanged {
            Ok(()) => {
                // `stage` now holds the old version.
                let _ = fs::remove_dir_all(stage);
                Ok(())
            }
            Err(e)
                if e.raw_os_error() == Some(libc::EINVAL)
                    || e.raw_os_error() == Some(libc::ENOSYS) =>
            {
                let name = target
                    .file_name()
                    .and_then(|n| n.to_str())
                    .unwrap_or_default();
                let old = self.dir.join(format!("{OLD}{name}"));
                fs::rename(target, &old)?;
                fs::rename(stage, target)?;
                let _ = fs::remove_dir_all(&old);
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// A fresh scratch path for `name` with the given prefix.
    fn scratch(&self, prefix: &str, name: &FunctionName) -> PathBuf {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        self.dir
            .join(format!("{prefix}{name}.{}.{n}", std::process::id()))
    }

    /// Clears staging and trash left by a crash; puts back an old version whose
    /// replacement never arrived (the two-rename fallback cut in the middle).
    fn recover(&self) -> io::Result<()> {
        for entry in fs::read_dir(&self.dir)? {
            let entry = entry?;
            let file_name = entry.file_name();
            let Some(name) = file_name.to_str() else {
                continue;
            };
            let path = entry.path();
            if let Some(old) = name.strip_prefix(OLD) {
                let target = self.dir.join(old);
                if FunctionName::parse(old).is_ok() && !target.exists() {
                    warn!("restoring {old} after an interrupted update");
                    fs::rename(&path, &target)?;
                    continue;
                }
            }
            if name.starts_with(STAGE) || name.starts_with(TRASH) || name.starts_with(OLD) {
                warn!("removing leftover {name} from an interrupted install or delete");
                fs::remove_dir_all(&path)?;
            }
        }
        sync_dir(&self.dir)
    }

    /// Writes a file the daemon itself ships, unless it is already exactly that.
    fn write_builtin(&self, dir: &str, file: &str, text: &str) -> io::Result<()> {
        let dir = self.dir.join(dir);
        let path = dir.join(file);
        if fs::read(&path).is_ok_and(|old| old == text.as_bytes()) {
            return Ok(());
        }
        fs::create_dir_all(&dir)?;
        let tmp = dir.join(format!(".{file}.tmp"));
        write_synced(&tmp, text.as_bytes())?;
        fs::rename(&tmp, &path)?;
        if dir.file_name().is_some_and(|n| n == "echo") {
            let meta = Meta {
                source: "builtin".into(),
                installed_at: 0,
                sha256: sha256_hex(text.as_bytes()),
                size: text.len() as u64,
                settings: Settings::default(),
            };
            let meta = serde_json::to_vec(&meta).map_err(io::Error::other)?;
            write_synced(&dir.join(META), &meta)?;
        }
        sync_dir(&dir)
    }
}

/// `secs` since the Unix epoch as RFC 3339 UTC (`2026-11-27T20:15:00Z`).
/// Civil-from-days after Howard Hinnant's public-domain algorithm: a dozen lines
/// instead of a date crate in a 1.5 MB binary.
pub fn rfc3339(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Milliseconds since the epoch as RFC 3339 UTC with milliseconds.
pub fn rfc3339_ms(ms: u64) -> String {
    let secs = rfc3339(ms / 1000);
    format!("{}.{:03}Z", secs.trim_end_matches('Z'), ms % 1000)
}

/// Days since the epoch of a civil date (Howard Hinnant's days_from_civil).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `2026-11-30T01:02:03Z` (fraction optional) or unix seconds, as milliseconds.
pub fn parse_time_ms(s: &str) -> Option<u64> {
    if let Ok(secs) = s.parse::<u64>() {
        return secs.checked_mul(1000);
    }
    let s = s.strip_suffix('Z')?;
    let (date, time) = s.split_once('T')?;
    let mut d = date.split('-').map(|p| p.parse::<i64>().ok());
    let (y, mo, day) = (d.next()??, d.next()??, d.next()??);
    let (hms, frac) = time.split_once('.').unwrap_or((time, ""));
    let mut t = hms.split(':').map(|p| p.parse::<i64>().ok());
    let (h, mi, sec) = (t.next()??, t.next()??, t.next()??);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&day) || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    let ms: i64 = format!("{:0<3}", &frac[..frac.len().min(3)]).parse().ok()?;
    let secs = days_from_civil(y, mo, day) * 86_400 + h * 3600 + mi * 60 + sec;
    u64::try_from(secs * 1000 + ms).ok()
}

/// Lowercase hex sha256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

fn write_synced(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut f = File::create(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_parse_back() {
        assert_eq!(parse_time_ms("0"), Some(0));
        assert_eq!(parse_time_ms("1764464523"), Some(1_764_464_523_000));
        let ms = 1_764_464_523_456;
        assert_eq!(parse_time_ms(&rfc3339_ms(ms)), Some(ms));
        assert_eq!(
            parse_time_ms(&rfc3339(1_795_998_123)),
            Some(1_795_998_123_000)
        );
        assert_eq!(
            parse_time_ms("2026-11-30T01:02:03.5Z").map(|m| m % 1000),
            Some(500)
        );
        assert_eq!(parse_time_ms("yesterday"), None);
        assert_eq!(parse_time_ms("2026-13-01T00:00:00Z"), None);
    }

    #[test]
    fn rfc3339_matches_known_instants() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_798_402_500), "2026-12-27T20:15:00Z");
        assert_eq!(rfc3339(4_107_542_399), "2100-02-28T23:59:59Z");
    }

    #[test]
    fn sha256_is_lowercase_hex() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
