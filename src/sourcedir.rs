//! Functions from a read-only folder of `name.py` files (a mounted Kubernetes
//! ConfigMap), kept in sync by polling: new files are installed, changed ones
//! updated, removed ones deleted. The kubelet swaps a ConfigMap volume's
//! contents by renaming its `..data` symlink; reading through the resolved link
//! means one poll sees one version of the whole map, never a mix.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use log::{info, warn};

use crate::app::App;
use crate::error::Result;
use crate::metrics::Origin;
use crate::name::FunctionName;
use crate::store::sha256_hex;

/// The source recorded for a function from `dir`.
fn source_url(dir: &Path, name: &FunctionName) -> String {
    format!("file://{}/{name}.py", dir.display())
}

/// True when `source` says the function comes from the configured source dir.
pub fn is_managed(app: &App, source: &str) -> bool {
    app.config
        .source_dir
        .as_ref()
        .is_some_and(|dir| source.starts_with(&format!("file://{}/", dir.display())))
}

/// The folder the files are read from now: the target of `..data` if the
/// kubelet's layout is there, else the folder itself.
fn snapshot_root(dir: &Path) -> PathBuf {
    match fs::read_link(dir.join("..data")) {
        Ok(target) => dir.join(target),
        Err(_) => dir.to_path_buf(),
    }
}

/// Keeps the store in line with the source dir.
pub struct SourceDir {
    dir: PathBuf,
    /// What the folder looked like at the last complete sync; unchanged means no work.
    last: Option<String>,
}

impl SourceDir {
    pub fn new(dir: PathBuf) -> SourceDir {
        SourceDir { dir, last: None }
    }

    /// One poll: syncs if the folder changed since the last complete sync.
    pub fn poll(&mut self, app: &App) {
        let root = snapshot_root(&self.dir);
        let signature = signature(&root);
        if signature.is_some() && signature == self.last {
            return;
        }
        match self.sync(app, &root) {
            Ok(()) => self.last = signature,
            // Left unset, so the next poll tries again.
            Err(e) => warn!("syncing functions from {}: {e}", self.dir.display()),
        }
    }

    /// Installs what is new or changed and deletes what is gone.
    fn sync(&self, app: &App, root: &Path) -> Result<()> {
        let wanted = read_functions(root, app.config.max_function_size)?;
        for (name, bytes) in &wanted {
            let same = app
                .store
                .describe(name)
                .is_ok_and(|l| l.sha256 == sha256_hex(bytes) && is_managed(app, &l.source));
            if !same {
                match app.install(
                    name,
                    bytes,
                    &source_url(&self.dir, name),
                    Origin::SourceDir,
                    "",
                ) {
                    Ok(_) => {}
                    // Code that would not serve is skipped (an older version keeps
                    // serving) until the file changes; the others go on.
                    Err(e @ crate::error::Error::Unprocessable(_)) => warn!("{e}"),
                    Err(e) => return Err(e),
                }
            }
        }
        for name in app.store.list()? {
            let managed = app
                .store
                .source_of(&name)
                .is_some_and(|s| is_managed(app, &s));
            if managed && !wanted.contains_key(&name) {
                info!("{name}.py left {}: deleting it", self.dir.display());
                app.delete(&name)?;
            }
        }
        Ok(())
    }

    /// Syncs once now, then every `every` on a thread of its own.
    pub fn start(mut self, app: Arc<App>, every: Duration) -> std::io::Result<()> {
        self.poll(&app);
        std::thread::Builder::new()
            .name("source-dir".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(every);
                    self.poll(&app);
                }
            })?;
        Ok(())
    }
}

/// `name.py` files of `root` with valid names, within the size limit.
fn read_functions(root: &Path, max_size: u64) -> std::io::Result<BTreeMap<FunctionName, Vec<u8>>> {
    let mut out = BTreeMap::new();
    for entry in fs::read_dir(root)? {
        let entry = entry?;
        let file = entry.file_name();
        let Some(stem) = file.to_str().and_then(|f| f.strip_suffix(".py")) else {
            continue;
        };
        if stem.starts_with('.') {
            continue;
        }
        let name = match FunctionName::parse(stem) {
            Ok(n) if n.is_echo() => {
                warn!("ignoring echo.py in the source dir: echo is the default function");
                continue;
            }
            Ok(n) => n,
            Err(e) => {
                warn!("ignoring {}: {e}", entry.path().display());
                continue;
            }
        };
        // metadata() follows the symlinks a ConfigMap volume is made of.
        let meta = fs::metadata(entry.path())?;
        if !meta.is_file() {
            continue;
        }
        if meta.len() > max_size {
            warn!(
                "ignoring {}: larger than EDGEFAAS_MAX_FUNCTION_SIZE ({max_size} bytes)",
                entry.path().display()
            );
            continue;
        }
        out.insert(name, fs::read(entry.path())?);
    }
    Ok(out)
}

/// The resolved folder plus name, size and mtime of each entry: changes whenever a file does.
fn signature(root: &Path) -> Option<String> {
    let mut parts = vec![root.display().to_string()];
    for entry in fs::read_dir(root).ok()? {
        let entry = entry.ok()?;
        let meta = fs::metadata(entry.path()).ok()?;
        let mtime = meta
            .modified()
            .ok()?
            .duration_since(UNIX_EPOCH)
            .ok()?
            .as_nanos();
        parts.push(format!("{:?}:{}:{mtime}", entry.file_name(), meta.len()));
    }
    parts.sort();
    Some(parts.join("\n"))
}
