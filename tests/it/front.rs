//! The HTTP front against a client that lies about lengths, smuggles requests,
//! speaks the wrong version, sends endless lines or trickles bytes: it never
//! reads a body byte as a request, never holds a worker for a client, keeps its
//! memory bounded, and keeps answering everyone else.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

use crate::support::{Daemon, eventually, http};

/// A request line that runs `smuggled`, which leaves a marker if it ever runs.
const SMUGGLED: &str = "GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n";

fn daemon_with_trap(env: &[(&str, &str)]) -> (Daemon, crate::support::Marker) {
    let d = Daemon::start(env);
    let marker = crate::support::Marker::new();
    d.upload(
        "smuggled",
        &format!(
            "def handle(req):\n    {}\n    return 'smuggled'\n",
            marker.send("'ran'")
        ),
    );
    (d, marker)
}

fn connect(port: u16) -> TcpStream {
    let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(15))).unwrap();
    s
}

/// Sends `bytes`, half-closes, and returns everything the server sent until it closed.
fn exchange(port: u16, bytes: &[u8]) -> String {
    let mut s = connect(port);
    let _ = s.write_all(bytes);
    let _ = s.shutdown(Shutdown::Write);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// Final (non-1xx) status codes in a stream of answers.
fn statuses(answers: &str) -> Vec<u16> {
    answers
        .match_indices("HTTP/1.1 ")
        .filter_map(|(i, _)| answers[i + 9..].get(..3)?.parse().ok())
        .filter(|s| *s >= 200)
        .collect()
}

#[test]
fn smuggled_requests_never_run_whatever_the_framing_trick() {
    let (d, marker) = daemon_with_trap(&[("EDGEFAAS_MAX_BODY", "100000")]);
    let pad = "x".repeat(70_000);
    let chunk = |text: &str| format!("{:x}\r\n{text}\r\n0\r\n\r\n", text.len());
    // (what, bytes, acceptable statuses); the framing refusals also close.
    let cases: Vec<(&str, String, &[u16])> = vec![
        (
            "early answer (health) with a body past the old 64 KiB drain",
            format!(
                "POST /_/health HTTP/1.1\r\nContent-Length: {}\r\n\r\n{pad}{SMUGGLED}",
                pad.len() + SMUGGLED.len()
            ),
            &[413],
        ),
        (
            "404 with a large body",
            format!(
                "POST /nosuch HTTP/1.1\r\nContent-Length: {}\r\n\r\n{pad}{SMUGGLED}",
                pad.len() + SMUGGLED.len()
            ),
            &[404],
        ),
        (
            "401 with a body",
            format!(
                "POST /mgmt HTTP/1.1\r\nContent-Length: {}\r\n\r\n{SMUGGLED}",
                SMUGGLED.len()
            ),
            &[400, 401],
        ),
        (
            "413 for a body over the limit",
            format!("POST /echo HTTP/1.1\r\nContent-Length: 200000\r\n\r\n{pad}{SMUGGLED}"),
            &[413],
        ),
        (
            "chunked body on a 404",
            format!(
                "POST /nosuch HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n{}",
                chunk(SMUGGLED)
            ),
            &[404],
        ),
        (
            "two Content-Lengths",
            format!(
                "POST /echo HTTP/1.1\r\nContent-Length: 0\r\nContent-Length: {}\r\n\r\n{SMUGGLED}",
                SMUGGLED.len()
            ),
            &[400],
        ),
        (
            "Content-Length list that disagrees",
            format!(
                "POST /echo HTTP/1.1\r\nContent-Length: 0, {}\r\n\r\n{SMUGGLED}",
                SMUGGLED.len()
            ),
            &[400],
        ),
        (
            "Content-Length with Transfer-Encoding (chunked wins, then close)",
            format!(
                "POST /echo HTTP/1.1\r\nContent-Length: {}\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{SMUGGLED}",
                5 + SMUGGLED.len()
            ),
            &[200],
        ),
        (
            "Transfer-Encoding: gzip",
            format!(
                "POST /echo HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n{}",
                chunk(SMUGGLED)
            ),
            &[501],
        ),
        (
            "Transfer-Encoding: identity",
            format!(
                "POST /echo HTTP/1.1\r\nTransfer-Encoding: identity\r\nContent-Length: 3\r\n\r\nabc{SMUGGLED}"
            ),
            &[501],
        ),
        (
            "Transfer-Encoding: chunked, gzip",
            format!(
                "POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\n{}",
                chunk(SMUGGLED)
            ),
            &[400],
        ),
        (
            "Transfer-Encoding with a space before the colon",
            format!(
                "POST /echo HTTP/1.1\r\nTransfer-Encoding : chunked\r\nContent-Length: 3\r\n\r\nabc{SMUGGLED}"
            ),
            &[400],
        ),
        (
            "obs-fold in Transfer-Encoding",
            format!(
                "POST /echo HTTP/1.1\r\nTransfer-Encoding:\r\n chunked\r\nContent-Length: 3\r\n\r\nabc{SMUGGLED}"
            ),
            &[400],
        ),
        (
            "bare CR in a header value",
            format!(
                "POST /echo HTTP/1.1\r\nX-A: a\rContent-Length: 0\r\nContent-Length: {}\r\n\r\n{SMUGGLED}",
                SMUGGLED.len()
            ),
            &[400],
        ),
        (
            "NUL in a header value",
            format!(
                "POST /echo HTTP/1.1\r\nX-A: a\0b\r\nContent-Length: {}\r\n\r\n{SMUGGLED}",
                SMUGGLED.len()
            ),
            &[400],
        ),
        (
            "chunk size +3",
            format!(
                "POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n+3\r\nabc\r\n0\r\n\r\n{SMUGGLED}"
            ),
            &[400],
        ),
        (
            "chunk size ' 3 '",
            format!(
                "POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n 3 \r\nabc\r\n0\r\n\r\n{SMUGGLED}"
            ),
            &[400],
        ),
        (
            "empty chunk size",
            format!("POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n\r\n{SMUGGLED}"),
            &[400],
        ),
        (
            "chunk size with a bare LF",
            format!(
                "POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\nabc\r\n0\r\n\r\n{SMUGGLED}"
            ),
            &[400],
        ),
        (
            "chunk data longer than its size",
            format!(
                "POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc{SMUGGLED}\r\n0\r\n\r\n"
            ),
            &[400],
        ),
        (
            "Transfer-Encoding in HTTP/1.0",
            format!(
                "POST /echo HTTP/1.0\r\nTransfer-Encoding: chunked\r\nConnection: keep-alive\r\n\r\n0\r\n\r\n{SMUGGLED}"
            ),
            &[400],
        ),
    ];
    for (what, bytes, want) in &cases {
        let answers = exchange(d.port, bytes.as_bytes());
        let got = statuses(&answers);
        assert!(
            got.len() == 1 && want.contains(&got[0]),
            "{what}: expected one answer of {want:?}, got {got:?}:\n{answers}"
        );
        assert!(
            !answers.contains("\r\n\r\nsmuggled\n"),
            "{what}: the smuggled request answered:\n{answers}"
        );
        assert!(
            marker.received().is_empty(),
            "{what}: the smuggled request ran\nlog:\n{}",
            d.log()
        );
        // A refusal of the framing itself (the body was not read to its end) closes.
        let framing_refused =
            matches!(got[0], 413 | 501) || (got[0] == 400 && !what.starts_with("401"));
        if framing_refused || what.contains("then close") {
            assert!(
                answers.contains("Connection: close"),
                "{what}: no Connection: close:\n{answers}"
            );
        }
    }
    // After all that, the daemon serves as before, and keeps a clean connection open.
    let answers = exchange(
        d.port,
        b"POST /echo HTTP/1.1\r\nContent-Length: 2\r\n\r\nokPOST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
    );
    assert_eq!(statuses(&answers), [200, 200], "{answers}");
    eprintln!("smuggling forms tried: {}", cases.len());
}

#[test]
fn expect_100_continue_gets_100_only_when_the_body_will_be_read() {
    let d = Daemon::start(&[("EDGEFAAS_MAX_BODY", "1000")]);
    // Within the limit: 100, then the answer to the body.
    let mut s = connect(d.port);
    s.write_all(b"POST /echo HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n")
        .unwrap();
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"HTTP/1.1 100 Continue\r\n\r\n");
    s.write_all(b"hello").unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let mut rest = String::new();
    s.read_to_string(&mut rest).unwrap();
    assert!(rest.starts_with("HTTP/1.1 200 OK"), "{rest}");
    assert!(rest.ends_with("hello\n"), "{rest}");
    // A 10 GB body: no 100, a 413 at once, and the connection closes.
    let started = Instant::now();
    let mut s = connect(d.port);
    s.write_all(
        b"POST /echo HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 10000000000\r\n\r\n",
    )
    .unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(!answer.contains("100 Continue"), "{answer}");
    assert!(started.elapsed() < Duration::from_secs(3));
}

#[test]
fn unsupported_http_versions_get_505_and_never_hold_a_thread() {
    let d = Daemon::start(&[("EDGEFAAS_MAX_CONNECTIONS", "128")]);
    for line in [
        "GET / HTTP/2.0",
        "PRI * HTTP/2.0",
        "GET /echo HTTP/1.2",
        "GET /echo HTTP/3.0",
    ] {
        let answer = exchange(d.port, format!("{line}\r\n\r\n").as_bytes());
        assert!(answer.starts_with("HTTP/1.1 505"), "{line}: {answer}");
    }
    // 128 connections that each send an HTTP/2.0 line and close, all at once.
    let port = d.port;
    let floods: Vec<_> = (0..128)
        .map(|_| {
            std::thread::spawn(move || {
                if let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) {
                    let _ = s.write_all(b"GET / HTTP/2.0\r\n\r\n");
                }
            })
        })
        .collect();
    for f in floods {
        f.join().unwrap();
    }
    assert!(
        eventually(Duration::from_secs(5), || {
            http::try_request(d.port, "GET", "/_/health", &[], b"").is_ok_and(|r| r.status == 200)
        }),
        "health after the flood\n{}",
        d.log()
    );
    for i in 0..20 {
        assert_eq!(
            d.req("POST", "/echo", format!("{i}").as_bytes()).status,
            200
        );
    }
}

/// VmRSS of a process in kB.
fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Streams `total` bytes of `fill` after `head` until the server stops reading;
/// returns how many it took.
fn stream(port: u16, head: &[u8], fill: u8, total: usize) -> usize {
    let mut s = connect(port);
    s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
    if s.write_all(head).is_err() {
        return 0;
    }
    let block = vec![fill; 64 * 1024];
    let mut sent = 0;
    while sent < total {
        match s.write(&block) {
            Ok(n) if n > 0 => sent += n,
            _ => break,
        }
    }
    sent
}

#[test]
fn endless_lines_leave_memory_bounded() {
    let d = Daemon::start(&[]);
    for _ in 0..50 {
        d.req("POST", "/echo", b"warm");
    }
    let before = rss_kb(d.pid());
    let port = d.port;
    let total = 256 << 20;
    let attacks: Vec<(&str, Vec<u8>, u8)> = vec![
        (
            "chunk-size line",
            b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec(),
            b'0',
        ),
        (
            "chunk extension",
            b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1;".to_vec(),
            b'a',
        ),
        (
            "trailer line",
            b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX: ".to_vec(),
            b'a',
        ),
        ("header line", b"POST /echo HTTP/1.1\r\nX: ".to_vec(), b'a'),
        ("request line", b"GET /".to_vec(), b'a'),
    ];
    let threads: Vec<_> = attacks
        .into_iter()
        .map(|(what, head, fill)| {
            std::thread::spawn(move || (what, stream(port, &head, fill, total)))
        })
        .collect();
    for t in threads {
        let (what, taken) = t.join().unwrap();
        // The daemon stops reading long before: what it took sits in socket buffers at most.
        assert!(taken < 64 << 20, "{what}: the daemon took {taken} bytes");
    }
    let after = rss_kb(d.pid());
    eprintln!("daemon RSS: {before} kB before, {after} kB after the endless lines");
    assert!(
        after < before + 8 * 1024,
        "RSS grew from {before} kB to {after} kB"
    );
    assert_eq!(d.req("POST", "/echo", b"alive").text(), "alive\n");
}

/// Measures the worst latency of health and echo from another client while `attack` runs.
fn worst_latency_during(
    d: &Daemon,
    attackers: Vec<std::thread::JoinHandle<()>>,
    for_secs: u64,
) -> Duration {
    let mut worst = Duration::ZERO;
    let until = Instant::now() + Duration::from_secs(for_secs);
    while Instant::now() < until {
        for (method, path, body) in [("GET", "/_/health", &b""[..]), ("POST", "/echo", b"x")] {
            let started = Instant::now();
            let r = d.req(method, path, body);
            assert_eq!(r.status, 200, "{path}: {r:?}");
            worst = worst.max(started.elapsed());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    for a in attackers {
        a.join().unwrap();
    }
    worst
}

#[test]
fn slow_clients_cost_a_connection_each_never_a_worker() {
    // Few workers, so that a slow client holding one would show at once.
    let d = Daemon::start(&[("EDGEFAAS_MAX_INFLIGHT", "1"), ("EDGEFAAS_IO_TIMEOUT", "3")]);
    let port = d.port;
    let trickle = |head: &'static [u8], byte: &'static [u8], every: Duration| {
        std::thread::spawn(move || {
            let mut s = connect(port);
            let _ = s.write_all(head);
            let until = Instant::now() + Duration::from_secs(4);
            while Instant::now() < until {
                if s.write_all(byte).is_err() {
                    break;
                }
                std::thread::sleep(every);
            }
        })
    };
    let mut attackers = Vec::new();
    for _ in 0..4 {
        // A large body, one byte at a time.
        attackers.push(trickle(
            b"POST /echo HTTP/1.1\r\nContent-Length: 100000\r\n\r\n",
            b"a",
            Duration::from_millis(500),
        ));
        // A head that never ends.
        attackers.push(trickle(
            b"POST /echo HTTP/1.1\r\nX-Slow: ",
            b"a",
            Duration::from_millis(500),
        ));
        // A chunked body, one byte at a time.
        attackers.push(trickle(
            b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nfffff\r\n",
            b"a",
            Duration::from_millis(500),
        ));
        // Expect: 100-continue, then nothing.
        attackers.push(trickle(
            b"POST /echo HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 1000\r\n\r\n",
            b"",
            Duration::from_millis(500),
        ));
    }
    let worst = worst_latency_during(&d, attackers, 4);
    eprintln!("worst health/echo latency during 16 slow clients: {worst:?}");
    assert!(worst < Duration::from_secs(1), "{worst:?}\n{}", d.log());
}

#[test]
fn slow_bodies_are_cut_at_their_total_deadline() {
    let d = Daemon::start(&[("EDGEFAAS_IO_TIMEOUT", "1")]);
    // 10 bytes announced; one byte every 300 ms: each read is quick, the whole is not.
    let mut s = connect(d.port);
    s.write_all(b"POST /echo HTTP/1.1\r\nContent-Length: 10\r\n\r\n")
        .unwrap();
    let started = Instant::now();
    let mut answer = Vec::new();
    for _ in 0..10 {
        if s.write_all(b"a").is_err() {
            break;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    let _ = s.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn connections_per_client_can_be_capped() {
    let d = Daemon::start(&[("EDGEFAAS_MAX_CONNECTIONS_PER_CLIENT", "3")]);
    // Three kept-alive connections, each proven live by an answer (a slot still held
    // by a connection that is just closing may refuse one at first: retry it).
    let held: Vec<TcpStream> = (0..3)
        .map(|_| {
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                let mut s = connect(d.port);
                s.write_all(b"GET /_/health HTTP/1.1\r\n\r\n").unwrap();
                let mut buf = [0u8; 256];
                let n = s.read(&mut buf).unwrap_or(0);
                if buf[..n].starts_with(b"HTTP/1.1 200") {
                    break s;
                }
                assert!(
                    Instant::now() < deadline,
                    "{}",
                    String::from_utf8_lossy(&buf[..n])
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        })
        .collect();
    let r = d.req("POST", "/echo", b"x");
    assert_eq!(
        (r.status, r.text().as_str()),
        (503, "too many connections\n")
    );
    drop(held);
    assert!(eventually(Duration::from_secs(5), || {
        http::try_request(d.port, "POST", "/echo", &[], b"y").is_ok_and(|r| r.status == 200)
    }));
}

/// Processes (threads included) that `uid` runs now, as RLIMIT_NPROC counts them.
fn tasks_of(uid: u32) -> u64 {
    let mut n = 0;
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let owner = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|v| v.split_whitespace().next()?.parse::<u32>().ok());
        if owner == Some(uid) {
            n += status
                .lines()
                .find_map(|l| l.strip_prefix("Threads:"))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(1);
        }
    }
    n
}

/// Sets a soft limit of the daemon's, as its own user (root without
/// CAP_SYS_RESOURCE may not change another user's limits).
fn prlimit(d: &Daemon, what: &str) {
    let mut cmd = match d.uid {
        Some(uid) => {
            let mut c = std::process::Command::new("setpriv");
            c.args([
                &format!("--reuid={uid}"),
                &format!("--regid={uid}"),
                "--clear-groups",
                "prlimit",
            ]);
            c
        }
        None => std::process::Command::new("prlimit"),
    };
    let ok = cmd
        .args(["--pid", &d.pid().to_string(), what])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "prlimit {what} failed");
}

/// The hard limit of `resource` (as /proc/<pid>/limits names it) of a process.
fn hard_limit(pid: u32, resource: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/limits"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(resource))
        .and_then(|l| {
            l[resource.len()..]
                .split_whitespace()
                .nth(1)
                .map(str::to_string)
        })
        .unwrap_or_else(|| "unlimited".into())
}

#[test]
fn no_thread_or_descriptor_to_spare_answers_503_and_the_daemon_lives() {
    let d = Daemon::start_unprivileged(&[]);
    let uid = d.uid.unwrap_or_else(crate::support::euid);
    let mut keep = crate::support::keepalive::Client::new(d.port);
    assert_eq!(keep.send("POST", "/echo", b"before").0, 200);
    // No new thread or process for this user: new connections past the idle
    // threads need one.
    // Any limit below the user's count now stops every new task of the daemon.
    let cap = tasks_of(uid) / 2;
    let nproc_hard = hard_limit(d.pid(), "Max processes");
    prlimit(&d, &format!("--nproc={cap}:"));
    let port = d.port;
    let attempts: Vec<_> = (0..24)
        .map(|_| {
            std::thread::spawn(move || {
                let mut s = connect(port);
                let _ = s.write_all(b"GET /_/health HTTP/1.1\r\n\r\n");
                std::thread::sleep(Duration::from_millis(300));
                let mut out = vec![0u8; 512];
                let n = s.read(&mut out).unwrap_or(0);
                String::from_utf8_lossy(&out[..n]).into_owned()
            })
        })
        .collect();
    let answers: Vec<String> = attempts.into_iter().map(|t| t.join().unwrap()).collect();
    let refused = answers
        .iter()
        .filter(|a| a.starts_with("HTTP/1.1 503"))
        .count();
    let served = answers
        .iter()
        .filter(|a| a.starts_with("HTTP/1.1 200"))
        .count();
    eprintln!("with no thread to spare: {served} served by idle threads, {refused} got 503");
    assert_eq!(refused + served, answers.len(), "{answers:?}\n{}", d.log());
    assert!(
        refused > 0,
        "no connection needed a new thread?\n{}",
        d.log()
    );
    assert!(
        crate::support::alive(d.pid()),
        "the daemon died\n{}",
        d.log()
    );
    // No descriptor to spare: an invocation cannot make its pipes.
    let open = std::fs::read_dir(format!("/proc/{}/fd", d.pid()))
        .unwrap()
        .count();
    prlimit(&d, &format!("--nproc={nproc_hard}:"));
    let nofile_hard = hard_limit(d.pid(), "Max open files");
    prlimit(&d, &format!("--nofile={}:", open + 1));
    let (status, body) = keep.send("POST", "/echo", b"no fds");
    assert_eq!(status, 503, "{}", String::from_utf8_lossy(&body));
    prlimit(&d, &format!("--nofile={nofile_hard}:"));
    assert_eq!(keep.send("POST", "/echo", b"after").1, b"after\n");
    assert!(eventually(Duration::from_secs(5), || {
        http::try_request(d.port, "GET", "/_/health", &[], b"").is_ok_and(|r| r.status == 200)
    }));
}

#[test]
fn bodies_abandoned_midway_give_their_memory_back() {
    let d = Daemon::start(&[]);
    let port = d.port;
    // 20 clients each send all but the last byte of a 1 MiB body (CL or chunked,
    // the chunked ones ending in a malformed chunk size) and leave: 20 MiB would
    // outgrow the 16 MiB body budget if any of it stayed counted.
    let abandon: Vec<_> = (0..20)
        .map(|i| {
            std::thread::spawn(move || {
                let mut s = connect(port);
                let almost = vec![b'a'; (1 << 20) - 1];
                if i % 2 == 0 {
                    let _ = s.write_all(b"POST /echo HTTP/1.1\r\nContent-Length: 1048576\r\n\r\n");
                    let _ = s.write_all(&almost);
                } else {
                    let _ = s.write_all(
                        b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nfffff\r\n",
                    );
                    let _ = s.write_all(&almost);
                    let _ = s.write_all(b"\r\n+1\r\n");
                }
                std::thread::sleep(Duration::from_millis(300));
            })
        })
        .collect();
    for a in abandon {
        a.join().unwrap();
    }
    let body = vec![b'z'; 256 * 1024];
    for round in 0..3 {
        let started = Instant::now();
        let r = d.req("POST", "/echo", &body);
        assert_eq!(r.status, 200, "round {round}: {r:?}");
        assert_eq!(r.body.len(), body.len() + 1);
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "round {round}: {:?}",
            started.elapsed()
        );
    }
}

#[test]
fn a_scheme_inside_an_origin_form_path_is_not_an_absolute_target() {
    let d = Daemon::start(&[]);
    for (method, path) in [
        ("PUT", "/x://y/mgmt/evil"),
        ("GET", "/a://b/mgmt"),
        ("DELETE", "/x://y/mgmt/echo"),
    ] {
        let r = d.req(method, path, b"def handle(req):\n    return 'pwned'\n");
        assert_eq!(r.status, 400, "{method} {path}: {r:?}");
    }
    assert_eq!(d.names(), ["echo"]);
    // A real absolute-form target still routes.
    let r = d.req("POST", &format!("http://127.0.0.1:{}/echo", d.port), b"abs");
    assert_eq!(r.text(), "abs\n");
}

#[test]
fn refusing_connections_past_the_cap_never_holds_up_the_accept_loop() {
    let d = Daemon::start(&[("EDGEFAAS_MAX_CONNECTIONS_PER_CLIENT", "2")]);
    let port = d.port;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // One address opens connections as fast as it can and never reads or closes them.
    let flood = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut held = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && held.len() < 600 {
                if let Ok(s) = TcpStream::connect(("127.0.0.1", port)) {
                    held.push(s);
                }
            }
            held.len()
        })
    };
    std::thread::sleep(Duration::from_millis(200));
    // Another address (127.0.0.2) asks for health meanwhile.
    let probe = format!(
        "import socket, time\nt = time.time()\ns = socket.socket()\ns.bind(('127.0.0.2', 0))\ns.settimeout(10)\ns.connect(('127.0.0.1', {port}))\ns.sendall(b'GET /_/health HTTP/1.1\\r\\nConnection: close\\r\\n\\r\\n')\nout = s.recv(64)\nprint(round(time.time() - t, 3), out.split(b'\\r\\n')[0].decode())\n"
    );
    let mut worst = 0.0f64;
    for _ in 0..5 {
        let out = std::process::Command::new(crate::support::python())
            .args(["-c", &probe])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let (secs, status) = text.trim().split_once(' ').unwrap_or(("99", ""));
        assert_eq!(
            status,
            "HTTP/1.1 200 OK",
            "{text} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        worst = worst.max(secs.parse().unwrap_or(99.0));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let refused = flood.join().unwrap();
    eprintln!("health from another address beside {refused} refused connections: worst {worst}s");
    assert!(worst < 0.5, "{worst}");
}
