//! Fault injection: SIGKILL in the middle of installs, updates and deletes; a full
//! disk; functions that misbehave with their output.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::time::Duration;

use crate::support::{Daemon, TempDir, eventually, http};

fn source(name: &str, version: u32) -> String {
    format!(
        "def handle(req):\n    return '{name} {version}'\n# {}\n",
        "padding ".repeat(500)
    )
}

#[test]
fn sigkill_at_random_moments_leaves_every_function_whole_and_one_of_its_versions() {
    let mut d = Daemon::start(&[]);
    let names = ["f0", "f1", "f2", "f3"];
    let mut written: BTreeMap<String, BTreeSet<u32>> = BTreeMap::new();
    let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
    let mut random = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut version = 0;
    let rounds = 8;
    for round in 0..rounds {
        // Plan this round's operations up front, so the thread needs no shared state.
        let ops: Vec<(String, Option<u32>)> = (0..60)
            .map(|_| {
                let name = names[(random() % 4) as usize].to_string();
                version += 1;
                let op = if random() % 4 == 0 {
                    None
                } else {
                    Some(version)
                };
                if let Some(v) = op {
                    written.entry(name.clone()).or_default().insert(v);
                }
                (name, op)
            })
            .collect();
        let port = d.port;
        let writer = std::thread::spawn(move || {
            for (name, op) in ops {
                let result = match op {
                    Some(v) => http::try_request(
                        port,
                        "PUT",
                        &format!("/mgmt/{name}"),
                        &[],
                        source(&name, v).as_bytes(),
                    ),
                    None => http::try_request(port, "DELETE", "/mgmt", &[], name.as_bytes()),
                };
                if result.is_err() {
                    return;
                }
            }
        });
        std::thread::sleep(Duration::from_millis(3 + random() % 60));
        d.kill();
        writer.join().unwrap();
        d.restart();
        let listed = d.names();
        assert_eq!(listed[0], "echo");
        for name in &listed[1..] {
            let text = d.req("GET", &format!("/{name}"), b"").text();
            let v: u32 = text
                .trim()
                .strip_prefix(&format!("{name} "))
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("round {round}: {name} answered {text:?}"));
            assert!(
                written[name].contains(&v),
                "round {round}: {name} is version {v}, never written for it"
            );
            let on_disk = std::fs::read_to_string(d.dir.join(name).join("handler.py")).unwrap();
            assert_eq!(
                on_disk,
                source(name, v),
                "round {round}: {name} on disk is not whole"
            );
        }
        let strays: Vec<String> = d
            .dir_entries()
            .into_iter()
            .filter(|e| e.starts_with('.') && e != ".runtime")
            .collect();
        assert!(
            strays.is_empty(),
            "round {round}: scratch left behind: {strays:?}"
        );
    }
    eprintln!("SIGKILLs injected and survived: {rounds}");
}

/// A tmpfs mounted for a test, unmounted when dropped (also when the test fails).
struct Tmpfs(std::path::PathBuf);

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Lazy: the daemon may still hold files there; it goes once they close.
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        // Whichever of the mount and the scratch dir goes first, nothing stays.
        let _ = std::fs::remove_dir_all(&self.0);
        if let Some(scratch) = self.0.parent() {
            let _ = std::fs::remove_dir(scratch);
        }
    }
}

/// Mounts a small tmpfs at `dir` if this process may.
fn mount_tmpfs(dir: &std::path::Path, size: &str) -> Option<Tmpfs> {
    std::fs::create_dir_all(dir).unwrap();
    Command::new("mount")
        .args([
            "-t",
            "tmpfs",
            "-o",
            &format!("size={size}"),
            "tmpfs",
            dir.to_str().unwrap(),
        ])
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
        .then(|| Tmpfs(dir.to_path_buf()))
}

/// Free bytes on the file system holding `dir`, as df reports them.
fn available_bytes(dir: &std::path::Path) -> u64 {
    let out = Command::new("df")
        .args(["--output=avail", "-B1"])
        .arg(dir)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .nth(1)
        .and_then(|l| l.trim().parse().ok())
        .unwrap()
}

#[test]
fn a_full_disk_answers_507_and_keeps_the_old_version() {
    let scratch = TempDir::new("disk");
    let disk = scratch.path().join("disk");
    let tmpfs = mount_tmpfs(&disk, "400k");
    let mounted = tmpfs.is_some();
    let d = if mounted {
        Daemon::start_in(scratch, disk.join("function"), &[])
    } else {
        // No mount here: a file-size limit makes the same writes fail (EFBIG).
        std::fs::create_dir_all(&disk).unwrap();
        eprintln!("no tmpfs mount here: injecting write errors with a 64 KiB file-size limit");
        Daemon::start_in(scratch, disk.join("function"), &[])
    };
    if !mounted {
        let ok = Command::new("prlimit")
            .args(["--pid", &d.pid().to_string(), "--fsize=65536"])
            .status();
        if !ok.is_ok_and(|s| s.success()) {
            crate::support::skip("neither mount nor prlimit is available");
            return;
        }
    }
    d.upload("keep", "def handle(req):\n    return 'old'\n");
    let filler = disk.join("filler");
    if mounted {
        // Leave a few KB free: the daemon's own small writes still fit, a 100 KB function does not.
        let free = available_bytes(&disk).saturating_sub(8 * 1024);
        std::fs::write(&filler, vec![0u8; free as usize]).unwrap();
    }
    let big = format!(
        "def handle(req):\n    return 'new'\n# {}\n",
        "x".repeat(100 * 1024)
    );
    let r = d.req("PUT", "/mgmt/keep", big.as_bytes());
    assert_eq!(
        (r.status, r.text().as_str()),
        (507, "no space left on device; nothing was changed\n")
    );
    let r = d.req("PUT", "/mgmt/fresh", big.as_bytes());
    assert_eq!(r.status, 507);
    assert_eq!(d.req("GET", "/keep", b"").text(), "old\n");
    assert_eq!(d.names(), ["echo", "keep"]);
    assert_eq!(d.dir_entries(), [".runtime", "echo", "keep"]);
    if mounted {
        std::fs::remove_file(&filler).unwrap();
        assert_eq!(d.req("PUT", "/mgmt/keep", big.as_bytes()).status, 200);
        assert_eq!(d.req("GET", "/keep", b"").text(), "new\n");
    }
    drop(tmpfs);
    drop(d);
}

#[test]
fn a_function_that_closes_stdout_early_cannot_hurt_the_daemon() {
    let d = Daemon::start(&[("EDGEFAAS_EXEC_TIMEOUT", "5")]);
    d.upload("closer", "import os, time\ndef handle(req):\n    os.close(1)\n    os.close(2)\n    time.sleep(0.2)\n    return 'gone'\n");
    let r = d.req("POST", "/closer", b"");
    assert!(r.status == 200 || r.status == 500, "{r:?}");
    assert_eq!(d.req("POST", "/echo", b"fine").text(), "fine\n");
    assert!(
        eventually(Duration::from_secs(5), || d.strays().is_empty()),
        "{:?}",
        d.strays()
    );
}

#[test]
fn a_function_writing_gigabytes_is_stopped_at_the_cap() {
    let d = Daemon::start(&[]);
    // Default cap (4 MiB): stopped long before a gigabyte.
    d.upload("gigs", "import os\ndef handle(req):\n    chunk = b'x' * (1 << 20)\n    for _ in range(4096):\n        os.write(1, chunk)\n");
    let r = d.req("POST", "/gigs", b"");
    assert_eq!(r.status, 500);
    assert!(
        r.text().contains("output exceeded EDGEFAAS_MAX_OUTPUT"),
        "{r:?}"
    );
    assert_eq!(d.req("POST", "/echo", b"fine").text(), "fine\n");
    assert!(
        eventually(Duration::from_secs(5), || d.strays().is_empty()),
        "{:?}",
        d.strays()
    );
}
