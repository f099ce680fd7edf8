//! What operators read: the Prometheus metrics, the JSON listing, and the log.

use std::collections::BTreeMap;

use crate::support::{Daemon, FileServer};

/// Parses the Prometheus text format strictly enough to catch malformed output:
/// every sample is `name{labels} value`, every family has HELP and TYPE first.
fn parse_metrics(text: &str) -> BTreeMap<String, f64> {
    let mut typed = std::collections::BTreeSet::new();
    let mut samples = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split(' ');
            let name = parts.next().unwrap();
            let kind = parts.next().unwrap();
            assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
            typed.insert(name.to_string());
            continue;
        }
        if line.starts_with("# HELP ") {
            continue;
        }
        assert!(
            !line.is_empty() && !line.starts_with('#'),
            "unexpected line {line:?}"
        );
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("no value: {line:?}"));
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value: {line:?}"));
        let name = series.split('{').next().unwrap();
        assert!(
            name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "{line}"
        );
        if let Some(labels) = series.strip_prefix(name) {
            if !labels.is_empty() {
                assert!(labels.starts_with('{') && labels.ends_with('}'), "{line}");
                for pair in labels[1..labels.len() - 1].split("\",") {
                    let (k, v) = pair
                        .split_once("=\"")
                        .unwrap_or_else(|| panic!("bad label in {line:?}"));
                    assert!(
                        k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                        "{line}"
                    );
                    assert!(!v.contains('\n'), "{line}");
                }
            }
        }
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .fold(name, |n, s| n.strip_suffix(s).unwrap_or(n));
        assert!(
            typed.contains(name) || typed.contains(family),
            "no TYPE before {line:?}"
        );
        samples.insert(series.to_string(), value);
    }
    samples
}

#[test]
fn metrics_count_invocations_errors_durations_and_installs() {
    let d = Daemon::start(&[]);
    let files = FileServer::start();
    let boom = "def handle(req):\n    raise RuntimeError('no')\n";
    let url = files.file("/f/boom.py", boom);
    assert_eq!(d.req("POST", "/mgmt", url.as_bytes()).status, 201);
    d.upload("up", "def handle(req):\n    return 1\n");
    assert_eq!(d.req("DELETE", "/mgmt", b"up").status, 200);
    for _ in 0..3 {
        assert_eq!(d.req("POST", "/echo", b"x").status, 200);
    }
    assert_eq!(d.req("POST", "/boom", b"").status, 500);
    assert_eq!(d.req("POST", "/nothing", b"").status, 404);

    let r = d.req("GET", "/_/metrics", b"");
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    let m = parse_metrics(&r.text());
    let get = |k: &str| {
        *m.get(k)
            .unwrap_or_else(|| panic!("missing {k} in\n{}", r.text()))
    };
    assert_eq!(
        get(r#"edgefaas_invocations_total{function="echo",status="2xx"}"#),
        3.0
    );
    assert_eq!(
        get(r#"edgefaas_invocations_total{function="boom",status="5xx"}"#),
        1.0
    );
    assert_eq!(
        get(r#"edgefaas_invocation_errors_total{function="boom"}"#),
        1.0
    );
    assert_eq!(
        get(r#"edgefaas_invocation_errors_total{function="echo"}"#),
        0.0
    );
    assert_eq!(
        get(r#"edgefaas_invocation_duration_seconds_count{function="echo"}"#),
        3.0
    );
    assert_eq!(
        get(r#"edgefaas_invocation_duration_seconds_bucket{function="echo",le="+Inf"}"#),
        3.0
    );
    assert!(get(r#"edgefaas_invocation_duration_seconds_sum{function="echo"}"#) > 0.0);
    assert!(
        !m.keys().any(|k| k.contains("nothing")),
        "unknown names make no series"
    );
    assert_eq!(get(r#"edgefaas_installs_total{source="url"}"#), 1.0);
    assert_eq!(get(r#"edgefaas_installs_total{source="upload"}"#), 1.0);
    assert_eq!(get("edgefaas_deletes_total"), 1.0);
    assert_eq!(get("edgefaas_download_bytes_total"), boom.len() as f64);
    assert_eq!(get("edgefaas_inflight_invocations"), 0.0);
    assert!(get("process_resident_memory_bytes") > 100_000.0);
    assert!(get("edgefaas_uptime_seconds") > 0.0);
    assert!(get("process_start_time_seconds") > 1.7e9);
}

#[test]
fn json_listing_describes_each_function_and_plain_stays_plain() {
    let d = Daemon::start(&[]);
    let files = FileServer::start();
    let source = "def handle(req):\n    return req\n";
    let url = files.file("/a/fromurl.py", source);
    assert_eq!(d.req("POST", "/mgmt", url.as_bytes()).status, 201);
    d.upload("uploaded", source);
    let r = d.req_h("GET", "/mgmt", &[("Accept", "application/json")], b"");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/json"));
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&r.body).unwrap();
    let names: Vec<&str> = rows.iter().map(|r| r["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["echo", "fromurl", "uploaded"]);
    let by = |n: &str| rows.iter().find(|r| r["name"] == n).unwrap().clone();
    assert_eq!(by("fromurl")["source"], url.as_str());
    assert_eq!(by("uploaded")["source"], "upload");
    assert_eq!(by("echo")["source"], "builtin");
    assert_eq!(by("uploaded")["size"], source.len());
    let on_disk = std::fs::read(d.dir.join("uploaded/handler.py")).unwrap();
    assert_eq!(by("uploaded")["sha256"].as_str().unwrap().len(), 64);
    assert_eq!(
        by("uploaded")["sha256"],
        by("fromurl")["sha256"],
        "same bytes, same digest"
    );
    assert_eq!(on_disk, source.as_bytes());
    let at = by("uploaded")["installed_at"].as_str().unwrap().to_string();
    assert!(
        at.len() == 20 && at.ends_with('Z') && at.as_bytes()[10] == b'T',
        "{at}"
    );
    assert!(at.as_str() >= "2024-01-01T00:00:00Z", "{at}");
    // The plain listing is exactly as before.
    assert_eq!(
        d.req("GET", "/mgmt", b"").text(),
        "echo\nfromurl\nuploaded\n"
    );
}

#[test]
fn start_up_says_in_one_line_what_runs_and_how() {
    let d = Daemon::start(&[("EDGEFAAS_MGMT_TOKEN", "t0k3n")]);
    // Written just after the port opens: a probe may be answered a moment before.
    crate::support::eventually(std::time::Duration::from_secs(5), || {
        d.log().contains(" ready on ")
    });
    let log = d.log();
    let line = log
        .lines()
        .find(|l| l.contains(" ready on "))
        .unwrap_or_else(|| panic!("no start-up line:\n{log}"));
    for part in [
        concat!("edgefaas ", env!("CARGO_PKG_VERSION")),
        &format!("127.0.0.1:{}", d.port),
        &format!("{} mode", crate::MODE),
        &format!("(EDGEFAAS_PYTHON={})", crate::support::python()),
        &format!("functions {}", d.dir.canonicalize().unwrap().display()),
        "token set",
        "sandbox: ",
    ] {
        assert!(line.contains(part), "{part:?} missing from: {line}");
    }
    assert!(!line.contains("t0k3n"), "{line}");
    // Timestamped, UTC to the millisecond, outside journald.
    let stamp = line.split_whitespace().next().unwrap();
    assert!(
        stamp.len() == 24 && stamp.ends_with('Z') && stamp.contains('T'),
        "{line}"
    );
}

#[test]
fn every_5xx_the_daemon_makes_is_a_warning_naming_its_cause() {
    let d = Daemon::start(&[("EDGEFAAS_EXEC_TIMEOUT", "0.5"), ("RUST_LOG", "info")]);
    d.upload(
        "sleepy",
        "import time\ndef handle(req):\n    time.sleep(5)\n",
    );
    d.upload(
        "broken",
        "def handle(req):\n    raise ValueError('no such sensor')\n",
    );
    assert_eq!(d.req("GET", "/sleepy", b"").status, 504);
    assert_eq!(d.req("GET", "/broken", b"").status, 500);
    let port = crate::support::free_port();
    let url = format!("http://ops:hunter2@127.0.0.1:{port}/gone.py");
    assert_eq!(d.req("POST", "/mgmt", url.as_bytes()).status, 502);
    for _ in 0..3 {
        assert_eq!(d.req("GET", "/_/health", b"").status, 200);
    }
    // Access lines are written just after the answer: wait for the last one.
    let download = format!("download of http://127.0.0.1:{port}/gone.py failed");
    let warned = |log: &str, what: &str| {
        log.lines()
            .any(|l| l.contains("WARN") && l.contains("access") && l.contains(what))
    };
    crate::support::eventually(std::time::Duration::from_secs(5), || {
        warned(&d.log(), &download)
    });
    let log = d.log();
    assert!(
        warned(&log, "/sleepy 504") && warned(&log, "timed out after 0.5s"),
        "{log}"
    );
    assert!(
        warned(&log, "/broken 500") && warned(&log, "ValueError: no such sensor"),
        "{log}"
    );
    assert!(warned(&log, &download), "{log}");
    assert!(!log.contains("hunter2"), "credentials in the log:\n{log}");
    // Probes are not worth a line at info.
    assert!(!log.contains("/_/health 200"), "{log}");
}

#[test]
fn under_journald_lines_carry_priorities_not_timestamps() {
    let d = Daemon::start(&[("JOURNAL_STREAM", "8:12345"), ("RUST_LOG", "info")]);
    d.upload("broken", "def handle(req):\n    raise ValueError('x')\n");
    assert_eq!(d.req("GET", "/broken", b"").status, 500);
    let log = d.log();
    assert!(log.lines().any(|l| l.starts_with("<6>INFO")), "{log}");
    assert!(log.lines().any(|l| l.starts_with("<4>WARN")), "{log}");
    assert!(!log.lines().any(|l| l.starts_with("20")), "{log}");
}
