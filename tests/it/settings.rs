//! A function's own settings: from its file's `# edgefaas:` lines and the
//! install request's query, shown in the listing, kept by an update that does
//! not change them, and applied: timeout, memory, concurrency, env, reuse.

use std::time::{Duration, Instant};

use crate::support::{Daemon, FileServer, http};

/// The `settings` object of `name` in the JSON listing.
fn settings(d: &Daemon, name: &str) -> serde_json::Value {
    let r = d.req_h("GET", "/mgmt", &[("Accept", "application/json")], b"");
    assert_eq!(r.status, 200);
    let rows: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    rows.as_array()
        .unwrap()
        .iter()
        .find(|row| row["name"] == name)
        .unwrap_or_else(|| panic!("{name} is not listed: {rows}"))["settings"]
        .clone()
}

const SHOW_ENV: &str = "import os\ndef handle(req):\n    return '%s %s' % (os.environ.get('A'), os.environ.get('B'))\n";

#[test]
fn every_setting_round_trips_through_header_query_listing_and_update() {
    let d = Daemon::start(&[]);
    let header = "# edgefaas: timeout=7 memory=96M concurrency=3 env=A=1 reuse=false\n\
                  # edgefaas: topic=sensors/+/temp topic=$share/g/alarms reply=out/t schedule=\"*/5 * * * *\"\n";
    d.upload("s", &format!("{header}{SHOW_ENV}"));
    let s = settings(&d, "s");
    assert_eq!(s["timeout"], 7.0, "{s}");
    assert_eq!(s["memory"], 96 << 20, "{s}");
    assert_eq!(s["concurrency"], 3, "{s}");
    assert_eq!(s["env"]["A"], "1", "{s}");
    assert_eq!(s["reuse"], false, "{s}");
    assert_eq!(
        s["topic"],
        serde_json::json!(["sensors/+/temp", "$share/g/alarms"]),
        "{s}"
    );
    assert_eq!(s["reply"], "out/t", "{s}");
    assert_eq!(s["schedule"], "*/5 * * * *", "{s}");
    assert_eq!(d.req("GET", "/s", b"").text(), "1 None\n");

    // The query overrides the file; an update without settings keeps the rest.
    let r = d.req(
        "PUT",
        "/mgmt/s?timeout=2&env=B%3Dtwo&concurrency=&reuse=true",
        SHOW_ENV.as_bytes(),
    );
    assert_eq!(r.status, 200, "{r:?}");
    let s = settings(&d, "s");
    assert_eq!(s["timeout"], 2.0, "{s}");
    assert_eq!(s["memory"], 96 << 20, "kept: {s}");
    assert!(s.get("concurrency").is_none(), "an empty value resets: {s}");
    assert_eq!(s["env"], serde_json::json!({"A": "1", "B": "two"}), "{s}");
    assert_eq!(s["reuse"], true, "{s}");
    assert_eq!(s["schedule"], "*/5 * * * *", "kept: {s}");
    assert_eq!(d.req("GET", "/s", b"").text(), "1 two\n");

    // Removing one variable, and the memory limit.
    let r = d.req("PUT", "/mgmt/s?env=A&memory=", SHOW_ENV.as_bytes());
    assert_eq!(r.status, 200, "{r:?}");
    let s = settings(&d, "s");
    assert_eq!(s["env"], serde_json::json!({"B": "two"}), "{s}");
    assert!(s.get("memory").is_none(), "{s}");
    assert_eq!(d.req("GET", "/s", b"").text(), "None two\n");

    // Kept across a restart: they live in the metadata.
    let mut d = d;
    d.restart();
    assert_eq!(settings(&d, "s")["env"], serde_json::json!({"B": "two"}));
    assert_eq!(d.req("GET", "/s", b"").text(), "None two\n");
}

#[test]
fn a_url_install_takes_the_query_over_the_file() {
    let d = Daemon::start(&[]);
    let files = FileServer::start();
    let url = files.file(
        "/f.py",
        &format!("# edgefaas: timeout=9 env=A=file\n{SHOW_ENV}"),
    );
    let r = d.req("POST", "/mgmt?env=A%3Dquery&timeout=4", url.as_bytes());
    assert_eq!(r.status, 201, "{r:?}");
    let s = settings(&d, "f");
    assert_eq!(s["timeout"], 4.0, "{s}");
    assert_eq!(d.req("GET", "/f", b"").text(), "query None\n");
}

#[test]
fn a_bad_setting_is_a_400_naming_it_and_changes_nothing() {
    let d = Daemon::start(&[]);
    d.upload("keep", &format!("# edgefaas: timeout=5\n{SHOW_ENV}"));
    let before = d
        .req_h("GET", "/mgmt", &[("Accept", "application/json")], b"")
        .body;
    for (query, header, named) in [
        ("timeout=abc", "", "timeout"),
        ("timeout=0", "", "timeout"),
        ("memory=1K", "", "memory"),
        ("concurrency=0", "", "concurrency"),
        ("reuse=maybe", "", "reuse"),
        ("env=EDGEFAAS_MGMT_TOKEN%3Dx", "", "env"),
        ("env=1bad%3Dx", "", "env"),
        ("colour=red", "", "colour"),
        ("", "# edgefaas: memory=lots\n", "memory"),
        ("", "# edgefaas: timeout\n", "timeout"),
        ("", "# edgefaas: schedule=\"* * *\n", "quote"),
    ] {
        for name in ["keep", "fresh"] {
            let r = d.req(
                "PUT",
                &format!("/mgmt/{name}?{query}"),
                format!("{header}{SHOW_ENV}").as_bytes(),
            );
            assert_eq!(r.status, 400, "{query} {header}: {r:?}");
            assert!(r.text().contains(named), "{query} {header}: {r:?}");
            assert_eq!(r.text().lines().count(), 1, "{r:?}");
        }
    }
    let after = d
        .req_h("GET", "/mgmt", &[("Accept", "application/json")], b"")
        .body;
    assert_eq!(before, after, "nothing changed");
    assert_eq!(d.req("GET", "/fresh", b"").status, 404);
}

#[test]
fn timeout_is_the_functions_own() {
    let d = Daemon::start(&[("EDGEFAAS_EXEC_TIMEOUT", "30")]);
    d.upload(
        "slow",
        "# edgefaas: timeout=0.5\nimport time\ndef handle(req):\n    time.sleep(10)\n",
    );
    let t = Instant::now();
    let r = d.req("GET", "/slow", b"");
    assert_eq!(r.status, 504, "{r:?}");
    assert!(r.text().contains("0.5"), "names its timeout: {r:?}");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
}

#[test]
fn concurrency_queues_the_functions_own_invocations() {
    let d = Daemon::start(&[("EDGEFAAS_MAX_INFLIGHT", "6")]);
    d.upload(
        "one",
        "# edgefaas: concurrency=1\nimport time\ndef handle(req):\n    time.sleep(0.4)\n    return 'done'\n",
    );
    d.req("GET", "/one", b""); // warm
    let port = d.port;
    let t = Instant::now();
    let runs: Vec<_> = (0..3)
        .map(|_| std::thread::spawn(move || http::request(port, "GET", "/one", b"").status))
        .collect();
    // Another function is not held up by them.
    std::thread::sleep(Duration::from_millis(100));
    let echo = Instant::now();
    assert_eq!(d.req("POST", "/echo", b"x").status, 200);
    assert!(
        echo.elapsed() < Duration::from_millis(350),
        "{:?}",
        echo.elapsed()
    );
    for r in runs {
        assert_eq!(r.join().unwrap(), 200);
    }
    // One at a time: three 0.4 s runs take at least 1.2 s.
    assert!(
        t.elapsed() >= Duration::from_millis(1150),
        "{:?}",
        t.elapsed()
    );
}

#[test]
fn reuse_keeps_state_between_requests_until_a_timeout_kill() {
    let d = Daemon::start(&[]);
    d.upload(
        "counter",
        "# edgefaas: reuse=true timeout=1\nimport os, time\nseen = []\n\
         def handle(req):\n    if req == 'hang':\n        time.sleep(30)\n    seen.append(req)\n    \
         return '%d %d %s' % (len(seen), os.getpid(), os.environ.get('Http_Query'))\n",
    );
    let mut pids = Vec::new();
    for i in 1..=3 {
        let r = d.req("POST", &format!("/counter?n={i}"), b"x");
        assert_eq!(r.status, 200, "{r:?}");
        let text = r.text();
        let f: Vec<&str> = text.split_whitespace().collect();
        assert_eq!(f[0], i.to_string(), "{text}");
        // Each request sees its own environment, not the last one's.
        assert_eq!(f[2], format!("n={i}"), "{text}");
        pids.push(f[1].to_string());
    }
    assert!(pids.windows(2).all(|w| w[0] == w[1]), "one child: {pids:?}");
    // A crash in the handler's own exception is the request's; the state stays.
    let r = d.req("POST", "/counter", b"hang");
    assert_eq!(r.status, 504, "{r:?}");
    // Killed and replaced: fresh state, another process.
    let r = d.req("POST", "/counter?n=4", b"x");
    assert_eq!(r.status, 200, "{r:?}");
    let text = r.text();
    assert!(text.starts_with("1 "), "{text}");
    assert_ne!(text.split_whitespace().nth(1).unwrap(), pids[0], "{text}");
}

#[test]
fn a_memory_bomb_under_a_memory_setting_hurts_only_itself() {
    let d = Daemon::start_unprivileged(&[]);
    d.upload(
        "bomb",
        "# edgefaas: memory=64M\ndef handle(req):\n    hog = []\n    while True:\n        hog.append(bytearray(8 << 20))\n",
    );
    d.upload("calm", "def handle(req):\n    return 'calm'\n");
    for _ in 0..3 {
        let r = d.req("GET", "/bomb", b"");
        assert_eq!(r.status, 500, "{r:?}");
        // CPython 3.11 now and then reports a failed allocation as "SystemError:
        // error return without exception set" (seen about 1 run in 10 in exec mode).
        let t = r.text();
        assert!(
            t.contains("MemoryError")
                || t.contains("SystemError: error return without exception set"),
            "{r:?}"
        );
        assert_eq!(d.req("GET", "/_/health", b"").status, 200);
        assert_eq!(d.req("GET", "/calm", b"").text(), "calm\n");
    }
    // Without the setting the same function may use more.
    let r = d.req(
        "PUT",
        "/mgmt/big?memory=",
        b"def handle(req):\n    return len(bytearray(200 << 20))\n",
    );
    assert_eq!(r.status, 201, "{r:?}");
    assert_eq!(d.req("GET", "/big", b"").text(), format!("{}\n", 200 << 20));
}
