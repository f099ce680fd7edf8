//! Functions from EDGEFAAS_SOURCE_DIR, laid out as the kubelet mounts a ConfigMap:
//! `..data -> ..<timestamp>/`, and `name.py -> ..data/name.py` for each key.

use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::support::{Daemon, TempDir, eventually};

/// A ConfigMap volume, updated the way the kubelet does it.
struct ConfigMapVolume {
    dir: PathBuf,
    generation: u32,
}

impl ConfigMapVolume {
    fn new(dir: &Path, files: &[(&str, &str)]) -> ConfigMapVolume {
        std::fs::create_dir_all(dir).unwrap();
        let mut v = ConfigMapVolume {
            dir: dir.to_path_buf(),
            generation: 0,
        };
        v.update(files);
        v
    }

    /// Writes a new timestamped folder, swaps `..data` to it by rename, fixes the
    /// top-level links, then removes the old folder (the kubelet's atomic writer).
    fn update(&mut self, files: &[(&str, &str)]) {
        self.generation += 1;
        let new = format!(
            "..2026_11_27_20_00_{:02}.{}",
            self.generation,
            1000 + self.generation
        );
        std::fs::create_dir(self.dir.join(&new)).unwrap();
        for (name, text) in files {
            std::fs::write(self.dir.join(&new).join(name), text).unwrap();
        }
        let old = std::fs::read_link(self.dir.join("..data")).ok();
        symlink(&new, self.dir.join("..data_tmp")).unwrap();
        std::fs::rename(self.dir.join("..data_tmp"), self.dir.join("..data")).unwrap();
        for entry in std::fs::read_dir(&self.dir).unwrap().flatten() {
            let n = entry.file_name().to_string_lossy().into_owned();
            if !n.starts_with("..") && !files.iter().any(|(f, _)| *f == n) {
                std::fs::remove_file(entry.path()).unwrap();
            }
        }
        for (name, _) in files {
            let link = self.dir.join(name);
            if std::fs::symlink_metadata(&link).is_err() {
                symlink(format!("..data/{name}"), link).unwrap();
            }
        }
        if let Some(old) = old {
            std::fs::remove_dir_all(self.dir.join(old)).unwrap();
        }
    }
}

fn daemon_with(volume: &Path) -> Daemon {
    Daemon::start(&[
        ("EDGEFAAS_SOURCE_DIR", volume.to_str().unwrap()),
        ("EDGEFAAS_SOURCE_INTERVAL", "0.1"),
    ])
}

const V1: &str = "def handle(req):\n    return 'v1'\n";
const V2: &str = "def handle(req):\n    return 'v2'\n";

#[test]
fn functions_in_the_configmap_are_installed_before_the_port_opens() {
    let scratch = TempDir::new("cm");
    let cm = ConfigMapVolume::new(
        &scratch.path().join("cm"),
        &[
            ("hello.py", V1),
            (
                "average.py",
                include_str!("../../python/examples/average.py"),
            ),
        ],
    );
    let d = daemon_with(&cm.dir);
    assert_eq!(d.names(), ["echo", "average", "hello"]);
    assert_eq!(d.req("POST", "/average", b"1,2").text(), "1.5\n");
    let rows: Vec<serde_json::Value> = serde_json::from_slice(
        &d.req_h("GET", "/mgmt", &[("Accept", "application/json")], b"")
            .body,
    )
    .unwrap();
    let hello = rows.iter().find(|r| r["name"] == "hello").unwrap();
    assert_eq!(
        hello["source"],
        format!("file://{}/hello.py", cm.dir.display())
    );
}

#[test]
fn a_configmap_swap_updates_adds_and_deletes() {
    let scratch = TempDir::new("cm");
    let mut cm = ConfigMapVolume::new(
        &scratch.path().join("cm"),
        &[("hello.py", V1), ("gone.py", V1)],
    );
    let d = daemon_with(&cm.dir);
    assert_eq!(d.req("GET", "/hello", b"").text(), "v1\n");
    cm.update(&[("hello.py", V2), ("new.py", V1)]);
    assert!(
        eventually(Duration::from_secs(10), || d.names()
            == ["echo", "hello", "new"]
            && d.req("GET", "/hello", b"").text() == "v2\n"),
        "{:?}",
        d.names()
    );
    assert_eq!(d.req("GET", "/gone", b"").status, 404);
    assert_eq!(d.req("GET", "/new", b"").text(), "v1\n");
}

#[test]
fn functions_from_the_source_dir_cannot_be_changed_through_mgmt() {
    let scratch = TempDir::new("cm");
    let cm = ConfigMapVolume::new(&scratch.path().join("cm"), &[("hello.py", V1)]);
    let d = daemon_with(&cm.dir);
    let conflict = "function 'hello' comes from EDGEFAAS_SOURCE_DIR; change it there\n";
    let r = d.req("PUT", "/mgmt/hello", V2.as_bytes());
    assert_eq!((r.status, r.text().as_str()), (409, conflict));
    let r = d.req("DELETE", "/mgmt", b"hello");
    assert_eq!((r.status, r.text().as_str()), (409, conflict));
    assert_eq!(d.req("GET", "/hello", b"").text(), "v1\n");
    // Other functions stay under /mgmt's control and survive the sync.
    d.upload("mine", V2);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(d.names(), ["echo", "hello", "mine"]);
}

#[test]
fn a_plain_folder_works_too_and_bad_files_are_skipped() {
    let scratch = TempDir::new("dir");
    let dir = scratch.path().join("plain");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("ok.py"), V1).unwrap();
    std::fs::write(dir.join("_hidden.py"), V1).unwrap();
    std::fs::write(dir.join("echo.py"), V2).unwrap();
    std::fs::write(dir.join("notes.txt"), "x").unwrap();
    // Code that would not serve is skipped, and does not hold up the others.
    std::fs::write(dir.join("broken.py"), "def handle(req)\n").unwrap();
    let d = daemon_with(&dir);
    assert_eq!(d.names(), ["echo", "ok"]);
    assert!(
        d.log().contains("broken.py cannot serve: SyntaxError"),
        "{}",
        d.log()
    );
    assert_eq!(d.req("POST", "/echo", b"same").text(), "same\n");
    std::fs::write(dir.join("ok.py"), V2).unwrap();
    assert!(eventually(Duration::from_secs(10), || d
        .req("GET", "/ok", b"")
        .text()
        == "v2\n"));
    // A broken update keeps the version that serves.
    std::fs::write(dir.join("ok.py"), "import no_such_module_anywhere\n").unwrap();
    assert!(eventually(Duration::from_secs(10), || d
        .log()
        .contains("ok.py cannot serve: ModuleNotFoundError")));
    assert_eq!(d.req("GET", "/ok", b"").text(), "v2\n");
    std::fs::remove_file(dir.join("ok.py")).unwrap();
    assert!(eventually(Duration::from_secs(10), || d.names() == ["echo"]));
}
