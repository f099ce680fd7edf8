//! Overload: invocations past the running limit wait in a bounded FIFO queue;
//! 429 with `Retry-After` comes only when the queue is full or the wait runs
//! out, never a hang; health, metrics and listings never wait behind them.

use std::time::{Duration, Instant};

use crate::support::{Daemon, request};

/// Uploads `slow`, which reports its start to a marker and sleeps `secs`.
fn slow(d: &Daemon, secs: f64) -> crate::support::Marker {
    let marker = crate::support::Marker::new();
    d.upload(
        "slow",
        &format!(
            "import time\ndef handle(req):\n    {}\n    time.sleep({secs})\n    return 'done'\n",
            marker.send("1")
        ),
    );
    marker
}

#[test]
fn past_the_limit_requests_wait_in_order_and_a_full_queue_is_429_at_once() {
    let d = Daemon::start(&[
        ("EDGEFAAS_MAX_INFLIGHT", "1"),
        ("EDGEFAAS_MAX_QUEUE", "2"),
        ("EDGEFAAS_QUEUE_TIMEOUT", "20"),
    ]);
    let marker = slow(&d, 1.5);
    let port = d.port;
    let running = std::thread::spawn(move || request(port, "POST", "/slow", b""));
    marker.wait();
    // Two wait behind it (the queue holds two)...
    let queued: Vec<_> = (0..2)
        .map(|i| {
            let t = std::thread::spawn(move || {
                let started = Instant::now();
                (
                    request(port, "POST", "/echo", format!("q{i}").as_bytes()),
                    started.elapsed(),
                )
            });
            std::thread::sleep(Duration::from_millis(100));
            t
        })
        .collect();
    // ...a third finds the queue full: 429 at once, with Retry-After.
    let started = Instant::now();
    let r = d.req("POST", "/echo", b"over");
    assert_eq!(
        (r.status, r.text().as_str()),
        (
            429,
            "too many invocations waiting (EDGEFAAS_MAX_QUEUE), try again later\n"
        )
    );
    assert_eq!(r.header("Retry-After"), Some("1"), "{r:?}");
    assert!(r.header("X-Duration-Seconds").is_some(), "{r:?}");
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "{:?}",
        started.elapsed()
    );
    // Health, metrics and the listing do not wait behind the queue.
    for path in ["/_/health", "/_/metrics", "/mgmt"] {
        let started = Instant::now();
        assert_eq!(d.req("GET", path, b"").status, 200, "{path}");
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "{path}: {:?}",
            started.elapsed()
        );
    }
    let metrics = d.req("GET", "/_/metrics", b"").text();
    assert!(
        metrics.contains("edgefaas_queued_invocations 2\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("edgefaas_refused_invocations_total{reason=\"queue_full\"} 1\n"),
        "{metrics}"
    );
    assert_eq!(running.join().unwrap().text(), "done\n");
    for (i, t) in queued.into_iter().enumerate() {
        let (r, waited) = t.join().unwrap();
        assert_eq!((r.status, r.text()), (200, format!("q{i}\n")));
        assert!(
            waited > Duration::from_millis(500),
            "q{i} did not wait: {waited:?}"
        );
    }
}

#[test]
fn a_wait_past_the_queue_timeout_is_429() {
    let d = Daemon::start(&[
        ("EDGEFAAS_MAX_INFLIGHT", "1"),
        ("EDGEFAAS_QUEUE_TIMEOUT", "0.5"),
    ]);
    let marker = slow(&d, 3.0);
    let port = d.port;
    let running = std::thread::spawn(move || request(port, "POST", "/slow", b""));
    marker.wait();
    let started = Instant::now();
    let r = d.req("POST", "/echo", b"late");
    let waited = started.elapsed();
    assert_eq!(
        (r.status, r.text().as_str()),
        (
            429,
            "no slot came free in time (EDGEFAAS_QUEUE_TIMEOUT), try again later\n"
        )
    );
    assert_eq!(r.header("Retry-After"), Some("1"));
    assert!(
        waited >= Duration::from_millis(450) && waited < Duration::from_millis(2000),
        "{waited:?}"
    );
    assert_eq!(running.join().unwrap().text(), "done\n");
    assert_eq!(d.req("POST", "/echo", b"x").status, 200);
}

#[test]
fn sixty_four_concurrent_clients_get_no_429_with_the_defaults() {
    let d = Daemon::start(&[]);
    let port = d.port;
    let clients: Vec<_> = (0..64)
        .map(|i| {
            std::thread::spawn(move || {
                let mut c = crate::support::keepalive::Client::new(port);
                let mut statuses = Vec::new();
                for j in 0..10 {
                    let body = format!("c{i}-{j}");
                    let (status, answer) = c.send("POST", "/echo", body.as_bytes());
                    statuses.push(status);
                    if status == 200 {
                        assert_eq!(answer, format!("{body}\n").into_bytes());
                    }
                }
                statuses
            })
        })
        .collect();
    let mut other = Vec::new();
    for t in clients {
        other.extend(t.join().unwrap().into_iter().filter(|s| *s != 200));
    }
    assert!(other.is_empty(), "non-200 answers: {other:?}");
}

#[test]
fn installs_wait_in_their_own_lane_and_never_take_the_workers_of_health() {
    let files = crate::support::FileServer::start();
    let d = Daemon::start(&[("EDGEFAAS_MAX_INFLIGHT", "1")]);
    // Four slow downloads: each sends one byte of its file every 200 ms.
    let source = b"def handle(req):\n    return 'slowly'\n".to_vec();
    let urls: Vec<String> = (0..4)
        .map(|i| {
            files.route(
                &format!("/s{i}.py"),
                crate::support::files::Route::Slow(source.clone(), Duration::from_millis(40)),
            )
        })
        .collect();
    let port = d.port;
    let installs: Vec<_> = urls
        .into_iter()
        .map(|url| std::thread::spawn(move || request(port, "POST", "/mgmt", url.as_bytes())))
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    for _ in 0..5 {
        for (path, body) in [("/_/health", &b""[..]), ("/echo", b"x"), ("/mgmt", b"")] {
            let method = if path == "/echo" { "POST" } else { "GET" };
            let started = Instant::now();
            let r = d.req(method, path, body);
            assert_eq!(r.status, 200, "{path}: {r:?}");
            assert!(
                started.elapsed() < Duration::from_secs(1),
                "{path} waited {:?} behind slow installs",
                started.elapsed()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    for t in installs {
        assert_eq!(t.join().unwrap().status, 201);
    }
}
