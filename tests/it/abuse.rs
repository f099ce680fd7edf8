//! Connection abuse: idle and slow (slowloris) connections, more connections
//! than the cap, file descriptors running out. Other clients keep being served.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::support::{Daemon, eventually};

fn connect(port: u16) -> TcpStream {
    let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    s
}

/// Reads what the server sends until it closes (bounded by the read timeout).
fn read_all(mut s: TcpStream) -> String {
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn idle_and_slowloris_connections_do_not_stop_other_clients() {
    let d = Daemon::start(&[
        ("EDGEFAAS_MAX_CONNECTIONS", "64"),
        ("EDGEFAAS_IO_TIMEOUT", "2"),
    ]);
    let idle: Vec<TcpStream> = (0..30).map(|_| connect(d.port)).collect();
    let port = d.port;
    let slow: Vec<_> = (0..10)
        .map(|_| {
            std::thread::spawn(move || {
                let mut s = connect(port);
                let _ = s.write_all(b"GET /echo HTTP/1.1\r\nX-Slow: ");
                let started = Instant::now();
                // One byte every 300 ms: each read is quick, the head never ends.
                while started.elapsed() < Duration::from_secs(8) {
                    if s.write_all(b"a").is_err() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(300));
                }
                (started.elapsed(), read_all(s))
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    for i in 0..10 {
        let t = Instant::now();
        let body = format!("client {i}");
        assert_eq!(
            d.req("POST", "/echo", body.as_bytes()).text(),
            format!("{body}\n")
        );
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "request {i} took {:?}",
            t.elapsed()
        );
    }
    for t in slow {
        let (held, answer) = t.join().unwrap();
        assert!(
            answer.starts_with("HTTP/1.1 408"),
            "slowloris got {answer:?}"
        );
        assert!(
            held < Duration::from_secs(6),
            "slowloris held its connection for {held:?}"
        );
    }
    // Idle connections are closed once the IO timeout passes.
    for s in idle {
        let answer = read_all(s);
        assert!(
            answer.is_empty() || answer.starts_with("HTTP/1.1 408"),
            "{answer:?}"
        );
    }
}

#[test]
fn connections_past_the_cap_get_503_and_service_resumes() {
    let d = Daemon::start(&[
        ("EDGEFAAS_MAX_CONNECTIONS", "8"),
        // Long enough that the idle ones are still open when the ninth comes, under load.
        ("EDGEFAAS_IO_TIMEOUT", "3"),
    ]);
    // Eight kept-alive connections, each proven counted by an answer (the slot of a
    // connection that is just closing, such as the start-up probe, may refuse one at first).
    let idle: Vec<TcpStream> = (0..8)
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
    assert!(eventually(Duration::from_secs(10), || d
        .req("POST", "/echo", b"y")
        .status
        == 200));
    drop(idle);
}

#[test]
fn running_out_of_file_descriptors_does_not_stop_the_accept_loop() {
    let d = Daemon::start(&[
        ("EDGEFAAS_MAX_CONNECTIONS", "1000"),
        ("EDGEFAAS_IO_TIMEOUT", "2"),
    ]);
    let limit = std::process::Command::new("prlimit")
        .args(["--pid", &d.pid().to_string(), "--nofile=48:48"])
        .status();
    if !limit.is_ok_and(|s| s.success()) {
        crate::support::skip("prlimit is not available");
        return;
    }
    // More connections than descriptors: accept fails with EMFILE for a while.
    let held: Vec<TcpStream> = (0..80)
        .filter_map(|_| TcpStream::connect(("127.0.0.1", d.port)).ok())
        .collect();
    assert!(
        eventually(Duration::from_secs(5), || d
            .log()
            .contains("Error accepting new client")),
        "no EMFILE seen"
    );
    drop(held);
    assert!(
        eventually(Duration::from_secs(10), || {
            crate::support::http::try_request(d.port, "POST", "/echo", &[], b"z")
                .is_ok_and(|r| r.status == 200)
        }),
        "the daemon stopped accepting"
    );
}
