//! Start-up, restart, crash recovery, configuration errors and graceful shutdown.

use std::time::{Duration, Instant};

use crate::support::{Daemon, TempDir, alive, eventually, request};

const V1: &str = "def handle(req):\n    return 'v1'\n";

#[test]
fn health_is_ok_while_serving() {
    let d = Daemon::start(&[]);
    let r = d.req("GET", "/_/health", b"");
    assert_eq!((r.status, r.text().as_str()), (200, "OK\n"));
    assert_eq!(d.req("GET", "/_/nothing", b"").status, 404);
}

#[test]
fn installed_functions_survive_a_restart() {
    let mut d = Daemon::start(&[]);
    d.upload("keep", V1);
    d.restart();
    assert_eq!(d.names(), ["echo", "keep"]);
    assert_eq!(d.req("GET", "/keep", b"").text(), "v1\n");
    d.kill();
    d.restart();
    assert_eq!(d.req("GET", "/keep", b"").text(), "v1\n");
}

#[test]
fn leftovers_of_a_crash_are_cleared_and_an_interrupted_update_is_undone() {
    let scratch = TempDir::new("crash");
    let dir = scratch.path().join("function");
    for (entry, text) in [
        (".stage-half.1.0", "def handle(req):\n    return 'half'\n"),
        (".trash-old.1.0", V1),
        (".old-restored", "def handle(req):\n    return 'restored'\n"),
        ("kept", V1),
        (".old-kept", "def handle(req):\n    return 'stale'\n"),
    ] {
        std::fs::create_dir_all(dir.join(entry)).unwrap();
        std::fs::write(dir.join(entry).join("handler.py"), text).unwrap();
    }
    let d = Daemon::start_in(scratch, dir, &[]);
    assert_eq!(d.names(), ["echo", "kept", "restored"]);
    assert_eq!(d.dir_entries(), [".runtime", "echo", "kept", "restored"]);
    assert_eq!(d.req("GET", "/restored", b"").text(), "restored\n");
    assert_eq!(d.req("GET", "/kept", b"").text(), "v1\n");
}

#[test]
fn kill_9_during_installs_leaves_the_old_or_the_new_version() {
    let mut d = Daemon::start(&[]);
    d.upload("f", "def handle(req):\n    return 0\n");
    let versions = 40;
    for round in 0..4u64 {
        let port = d.port;
        let writer = std::thread::spawn(move || {
            for v in 1..=versions {
                let src = format!(
                    "def handle(req):\n    return {v}\n# {}\n",
                    "pad ".repeat(2000)
                );
                if crate::support::http::try_request(port, "PUT", "/mgmt/f", &[], src.as_bytes())
                    .is_err()
                {
                    return;
                }
            }
        });
        // Kill at a different moment each round, while the writer is busy.
        std::thread::sleep(Duration::from_millis(5 + round * 13));
        d.kill();
        writer.join().unwrap();
        d.restart();
        assert_eq!(d.names(), ["echo", "f"], "round {round}");
        let got = d.req("GET", "/f", b"").text();
        let n: u64 = got
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("round {round}: not a version: {got:?}"));
        assert!(n <= versions, "round {round}: {n}");
        assert_eq!(d.dir_entries(), [".runtime", "echo", "f"], "round {round}");
        let on_disk = std::fs::read_to_string(d.dir.join("f/handler.py")).unwrap();
        assert!(
            on_disk.starts_with(&format!("def handle(req):\n    return {n}\n")),
            "round {round}"
        );
    }
}

#[test]
fn sigterm_lets_in_flight_work_finish_then_exits_0() {
    let mut d = Daemon::start(&[("EDGEFAAS_SHUTDOWN_GRACE", "10")]);
    let marker = crate::support::Marker::new();
    d.upload(
        "slow",
        &format!(
            "import time\ndef handle(req):\n    {}\n    time.sleep(1.5)\n    return 'finished'\n",
            marker.send("1")
        ),
    );
    let port = d.port;
    let slow = std::thread::spawn(move || request(port, "POST", "/slow", b""));
    marker.wait();
    d.signal("TERM");
    assert!(eventually(Duration::from_secs(2), || d
        .log()
        .contains("draining")));
    let r = d.req("GET", "/_/health", b"");
    assert_eq!((r.status, r.text().as_str()), (503, "shutting down\n"));
    assert_eq!(d.req("POST", "/echo", b"late").status, 503);
    assert_eq!(slow.join().unwrap().text(), "finished\n");
    let status = d
        .wait_exit(Duration::from_secs(10))
        .expect("daemon did not exit");
    assert_eq!(status.code(), Some(0));
}

#[test]
fn sigterm_kills_what_outlives_the_grace_period() {
    let mut d = Daemon::start(&[
        ("EDGEFAAS_SHUTDOWN_GRACE", "0.5"),
        ("EDGEFAAS_EXEC_TIMEOUT", "60"),
    ]);
    let marker = crate::support::Marker::new();
    d.upload(
        "stuck",
        &format!(
            "import os, time\ndef handle(req):\n    {}\n    time.sleep(300)\n",
            marker.send("os.getpid()")
        ),
    );
    let port = d.port;
    let stuck = std::thread::spawn(move || {
        crate::support::http::try_request(port, "POST", "/stuck", &[], b"")
    });
    let python: u32 = marker.wait().parse().unwrap();
    let started = Instant::now();
    d.signal("TERM");
    let status = d
        .wait_exit(Duration::from_secs(10))
        .expect("daemon did not exit");
    assert_eq!(status.code(), Some(0));
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(
        eventually(Duration::from_secs(2), || !alive(python)),
        "invocation {python} outlived the daemon"
    );
    if let Ok(r) = stuck.join().unwrap() {
        assert!(r.status >= 500, "{r:?}");
    }
}

#[test]
fn a_bad_setting_stops_start_up_with_a_line_naming_it() {
    for (var, value) in [
        ("EDGEFAAS_PORT", "http"),
        ("EDGEFAAS_EXEC_TIMEOUT", "0"),
        ("EDGEFAAS_MAX_BODY", "-5"),
        ("EDGEFAAS_WORKERS", "many"),
    ] {
        let mut cmd = crate::support::command();
        cmd.env(var, value);
        let err = crate::support::start_up_error(cmd, var);
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(
            err.contains(&format!("{var}: expected")) && err.contains(value),
            "{err}"
        );
    }
}
