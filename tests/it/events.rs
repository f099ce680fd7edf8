//! Events without a broker: schedules, async calls with callbacks, and each
//! function's log over the API. (MQTT: `mqtt.rs`, against a real mosquitto.)

use std::time::{Duration, Instant};

use crate::support::{Daemon, Marker, Sink, eventually};

#[test]
fn a_schedule_runs_the_function_and_skips_a_run_still_going() {
    let d = Daemon::start(&[]);
    let marker = Marker::new();
    d.upload(
        "tick",
        &format!(
            "# edgefaas: schedule=\"* * * * * *\"\nimport os\ndef handle(req):\n    {}\n",
            marker.send("'tick %r %s' % (req, os.environ.get('Http_X_Edgefaas_Trigger'))")
        ),
    );
    d.upload(
        "slow",
        "# edgefaas: schedule=\"* * * * * *\"\nimport time\ndef handle(req):\n    time.sleep(2.5)\n",
    );
    assert!(
        eventually(Duration::from_secs(6), || marker.received().len() >= 3),
        "{:?}",
        marker.received()
    );
    assert_eq!(marker.received()[0], "tick '' schedule");
    let metrics = d.req("GET", "/_/metrics", b"").text();
    assert!(
        metrics.contains("edgefaas_schedule_runs_total{function=\"tick\"}"),
        "{metrics}"
    );
    assert!(eventually(Duration::from_secs(5), || d
        .req("GET", "/_/metrics", b"")
        .text()
        .contains("edgefaas_schedule_skips_total{function=\"slow\"}")));
    // Unscheduled by an update: no more runs.
    let r = d.req(
        "PUT",
        "/mgmt/tick?schedule=",
        format!("def handle(req):\n    {}\n", marker.send("'late'")).as_bytes(),
    );
    assert_eq!(r.status, 200, "{r:?}");
    std::thread::sleep(Duration::from_millis(1500));
    let before = marker.received().len();
    std::thread::sleep(Duration::from_millis(2000));
    assert_eq!(marker.received().len(), before, "{:?}", marker.received());
}

#[test]
fn an_async_call_is_202_at_once_and_its_result_is_posted_back() {
    let d = Daemon::start(&[]);
    let sink = Sink::start();
    d.upload(
        "shout",
        "import os, time\ndef handle(req):\n    time.sleep(0.3)\n    return {'statusCode': 201, 'body': req.upper() + ' ' + os.environ['Http_Path'], 'headers': {'Content-Type': 'text/x-shout'}}\n",
    );
    let t = Instant::now();
    let r = d.req_h(
        "POST",
        "/async/shout/deep?x=1",
        &[("X-Callback-Url", &sink.url("/done"))],
        b"hello",
    );
    assert_eq!(r.status, 202, "{r:?}");
    assert!(
        t.elapsed() < Duration::from_millis(250),
        "not at once: {:?}",
        t.elapsed()
    );
    let id = r.header("X-Call-Id").unwrap().to_string();
    assert_eq!(id.len(), 16);
    let got = sink.wait(1, Duration::from_secs(10));
    assert_eq!(got.len(), 1, "{got:?}");
    assert!(got[0].head.starts_with("POST /done "), "{:?}", got[0]);
    assert_eq!(got[0].header("x-call-id").as_deref(), Some(id.as_str()));
    assert_eq!(got[0].header("x-function-status").as_deref(), Some("201"));
    assert_eq!(
        got[0].header("content-type").as_deref(),
        Some("text/x-shout")
    );
    assert_eq!(got[0].body, b"HELLO /deep");
    // OpenFaaS's path works too; no callback is fine; unknown functions and bad callbacks are refused.
    assert_eq!(d.req("POST", "/async-function/shout", b"x").status, 202);
    assert_eq!(d.req("POST", "/async/nope", b"x").status, 404);
    let r = d.req_h(
        "POST",
        "/async/shout",
        &[("X-Callback-Url", "file:///etc/passwd")],
        b"x",
    );
    assert_eq!(r.status, 400, "{r:?}");
    assert_eq!(d.req("GET", "/async/shout", b"").status, 405);
}

#[test]
fn queued_calls_survive_a_sigkill_and_a_full_queue_is_429() {
    let mut d = Daemon::start(&[
        ("EDGEFAAS_MAX_INFLIGHT", "1"),
        ("EDGEFAAS_ASYNC_QUEUE", "6"),
    ]);
    let sink = Sink::start();
    d.upload(
        "slow",
        "import time\ndef handle(req):\n    time.sleep(0.5)\n    return req\n",
    );
    let mut ids = Vec::new();
    for i in 0..6 {
        let r = d.req_h(
            "POST",
            "/async/slow",
            &[("X-Callback-Url", &sink.url("/cb"))],
            format!("call {i}").as_bytes(),
        );
        assert_eq!(r.status, 202, "{r:?}");
        ids.push(r.header("X-Call-Id").unwrap().to_string());
    }
    let r = d.req("POST", "/async/slow", b"one too many");
    assert_eq!(r.status, 429, "{r:?}");
    assert!(r.header("Retry-After").is_some());
    // Killed with calls still queued: none is lost.
    std::thread::sleep(Duration::from_millis(300));
    d.kill();
    d.restart();
    let got = sink.wait(6, Duration::from_secs(30));
    let mut seen: Vec<String> = got.iter().filter_map(|g| g.header("x-call-id")).collect();
    seen.sort();
    seen.dedup();
    let mut want = ids.clone();
    want.sort();
    assert_eq!(seen, want, "{got:?}");
    assert!(
        got.iter()
            .all(|g| g.header("x-function-status").as_deref() == Some("200"))
    );
    assert!(eventually(Duration::from_secs(5), || d
        .req("GET", "/_/metrics", b"")
        .text()
        .contains("edgefaas_async_queue_depth 0")));
}

#[test]
fn a_functions_log_holds_its_own_stderr_and_failures_only() {
    let d = Daemon::start(&[("EDGEFAAS_EXEC_TIMEOUT", "1")]);
    d.upload(
        "noisy",
        "import sys\ndef handle(req):\n    sys.stderr.write('reading sensor %s\\n' % req)\n    raise ValueError('sensor %s unplugged' % req)\n",
    );
    d.upload(
        "quiet",
        "import sys\ndef handle(req):\n    sys.stderr.write('all good\\n')\n    return 'ok'\n",
    );
    assert_eq!(d.req("POST", "/noisy", b"7").status, 500);
    assert_eq!(d.req("POST", "/quiet", b"").status, 200);
    let log = d.req("GET", "/mgmt/noisy/logs", b"");
    assert_eq!(log.status, 200, "{log:?}");
    let text = log.text();
    for part in [
        "reading sensor 7",
        "Traceback",
        "ValueError: sensor 7 unplugged",
        "500 function 'noisy' failed",
    ] {
        assert!(text.contains(part), "{part}: {text}");
    }
    assert!(!text.contains("all good"), "{text}");
    assert!(
        text.lines().all(|l| l
            .split_whitespace()
            .next()
            .is_some_and(|t| t.ends_with('Z'))),
        "{text}"
    );
    let quiet = d.req("GET", "/mgmt/quiet/logs", b"").text();
    assert!(
        quiet.contains("all good") && !quiet.contains("sensor"),
        "{quiet}"
    );
    assert_eq!(
        d.req("GET", "/mgmt/noisy/logs?lines=1", b"")
            .text()
            .lines()
            .count(),
        1
    );
    assert_eq!(
        d.req("GET", "/mgmt/noisy/logs?since=2999-01-01T00:00:00Z", b"")
            .text(),
        ""
    );
    assert_eq!(
        d.req("GET", "/mgmt/noisy/logs?since=yesterday", b"").status,
        400
    );
    assert_eq!(d.req("GET", "/mgmt/ghost/logs", b"").status, 404);
    // A new function of a deleted one's name starts with a clean log.
    assert_eq!(d.req("DELETE", "/mgmt/noisy", b"").status, 200);
    d.upload("noisy", "def handle(req):\n    return 'reborn'\n");
    assert_eq!(d.req("GET", "/mgmt/noisy/logs", b"").text(), "");
}

#[test]
fn logs_need_the_token_like_the_rest_of_mgmt() {
    let d = Daemon::start(&[("EDGEFAAS_MGMT_TOKEN", "s3cret")]);
    assert_eq!(d.req("GET", "/mgmt/echo/logs", b"").status, 401);
    let r = d.req_h(
        "GET",
        "/mgmt/echo/logs",
        &[("Authorization", "Bearer s3cret")],
        b"",
    );
    assert_eq!(r.status, 200, "{r:?}");
}

#[test]
fn a_callback_that_never_answers_does_not_hold_up_other_calls() {
    // A listener that accepts and never answers: each callback to it takes its tries.
    let hole = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let hole_url = format!(
        "http://user:hunter2@{}/hook?token=s3cr3t",
        hole.local_addr().unwrap()
    );
    let d = Daemon::start(&[("EDGEFAAS_FETCH_TIMEOUT", "20")]);
    let marker = crate::support::Marker::new();
    d.upload("echoer", "def handle(req):\n    return req\n");
    d.upload(
        "mark",
        &format!(
            "def handle(req):\n    {}\n    return 'ok'\n",
            marker.send("'ran'")
        ),
    );
    // Twenty 4 MB results (they wait in files; past 64 MiB held, calls with a
    // callback wait) for a callback that never answers.
    d.upload(
        "big",
        "def handle(req):\n    return {'body': 'x' * 4000000}\n",
    );
    for _ in 0..20 {
        let r = d.req_h("POST", "/async/big", &[("X-Callback-Url", &hole_url)], b"");
        assert_eq!(r.status, 202, "{r:?}");
    }
    let t = Instant::now();
    assert_eq!(d.req("POST", "/async/mark", b"").status, 202);
    marker.wait();
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    // The callback URL's secrets are never logged.
    std::thread::sleep(Duration::from_millis(500));
    let log = d.log();
    assert!(!log.contains("hunter2") && !log.contains("s3cr3t"), "{log}");
    drop(hole);
}
