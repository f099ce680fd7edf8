//! Load and soak: many clients invoking while other functions are installed,
//! updated and deleted, with the default settings. Afterwards: no answer but
//! 200 (no 429: bursts queue), no growth in the daemon's open descriptors,
//! threads or RSS beyond a bound, no zombie or stray process.
//!
//! `cargo test` runs a bounded form (SOAK_REQUESTS, default 20 000, at 16 and
//! at 64 clients); `make soak` runs 300 000.

/// The invocation mode of the daemons here.
pub const MODE: &str = "fork";
/// The sandbox of the daemons here.
pub const SANDBOX: &str = "best-effort";

#[path = "../it/support/mod.rs"]
mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use support::keepalive::Client;
use support::{Daemon, eventually};

/// Allowed growth between the warmed-up start and the end.
const FD_SLACK: i64 = 4;
/// Threads that may be left after the load settles: connection threads idle for less
/// than their 5 s keep-alive. A per-request leak would add thousands.
const THREAD_SLACK: i64 = 8;
/// One-time growth allowed from the warmed-up start (allocator arenas, pools).
const RSS_SLACK_KB: i64 = 8192;
/// Growth allowed between the two halves: more means something leaks per request.
const RSS_LEAK_KB: i64 = 1024;

/// (open fds, threads, RSS kB) of a process.
fn usage(pid: u32) -> (i64, i64, i64) {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count()) as i64;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| -> i64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    (fds, field("Threads:"), field("VmRSS:"))
}

/// Thread names of a process with their counts, to tell what grew.
fn thread_names(pid: u32) -> std::collections::BTreeMap<String, usize> {
    let mut names = std::collections::BTreeMap::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        let name: String = comm
            .trim()
            .chars()
            .filter(|c| !c.is_ascii_digit())
            .collect();
        *names.entry(name).or_insert(0) += 1;
    }
    names
}

/// Counts of one phase's answers.
#[derive(Default)]
struct Tally {
    served: u64,
    errors: u64,
    other: u64,
    cycles: u64,
    unexpected: Vec<String>,
    secs: f64,
}

/// `total` invocations at CLIENTS keep-alive clients, with a churn thread beside them.
fn phase(port: u16, clients: u64, total: u64) -> Tally {
    let done = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let other = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let clients: Vec<_> = (0..clients)
        .map(|c| {
            let (done, errors, other) = (done.clone(), errors.clone(), other.clone());
            std::thread::spawn(move || {
                let mut client = Client::new(port);
                let mut i = 0u64;
                while done.fetch_add(1, Ordering::Relaxed) < total {
                    let path = if (c + i).is_multiple_of(3) {
                        "/work"
                    } else {
                        "/echo"
                    };
                    match client.send("POST", path, format!("c{c} r{i}").as_bytes()).0 {
                        200 => {}
                        s if s >= 500 => {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                        _ => {
                            other.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    i += 1;
                }
            })
        })
        .collect();
    // Churn beside the load: install, update, invoke and delete other functions.
    let churn = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut mgmt = Client::new(port);
            let mut cycles = 0u64;
            let mut unexpected = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let name = format!("churn{}", cycles % 5);
                let v1 = format!("def handle(req):\n    return 'v{cycles}'\n");
                let v2 = format!("def handle(req):\n    return 'w{cycles}'\n");
                for (method, path, body, ok) in [
                    ("PUT", format!("/mgmt/{name}"), v1.into_bytes(), [201, 200]),
                    ("POST", format!("/{name}"), b"x".to_vec(), [200, 200]),
                    ("PUT", format!("/mgmt/{name}"), v2.into_bytes(), [200, 200]),
                    ("POST", format!("/{name}"), b"x".to_vec(), [200, 200]),
                    (
                        "DELETE",
                        "/mgmt".to_string(),
                        name.clone().into_bytes(),
                        [200, 200],
                    ),
                ] {
                    let (status, _) = mgmt.send(method, &path, &body);
                    if !ok.contains(&status) {
                        unexpected.push(format!("{method} {path}: {status}"));
                    }
                }
                cycles += 1;
            }
            (cycles, unexpected)
        })
    };
    for c in clients {
        c.join().unwrap();
    }
    let secs = started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let (cycles, unexpected) = churn.join().unwrap();
    Tally {
        served: total.min(done.load(Ordering::Relaxed)),
        errors: errors.load(Ordering::Relaxed),
        other: other.load(Ordering::Relaxed),
        cycles,
        unexpected,
        secs,
    }
}

/// Usage once connection threads have gone back to idle (tiny_http ends idle pool threads after 5 s).
fn settled(pid: u32) -> (i64, i64, i64) {
    std::thread::sleep(Duration::from_secs(6));
    usage(pid)
}

#[test]
fn soak_at_16_clients_with_churn_leaves_no_errors_leaks_or_strays() {
    soak(16);
}

#[test]
fn soak_at_64_clients_with_churn_leaves_no_errors_leaks_or_strays() {
    soak(64);
}

fn soak(clients: u64) {
    let total: u64 = std::env::var("SOAK_REQUESTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let d = Daemon::start(&[("RUST_LOG", "warn")]);
    d.upload("work", "import hashlib\ndef handle(req):\n    return hashlib.sha256(req.encode()).hexdigest()[:8]\n");
    // Warm up: zygotes started and pools grown before the baseline is taken.
    let mut warm = Client::new(d.port);
    for i in 0..200 {
        let path = if i % 2 == 0 { "/echo" } else { "/work" };
        assert_eq!(warm.send("POST", path, b"warm").0, 200);
    }
    drop(warm);
    let start = settled(d.pid());
    let names_start = thread_names(d.pid());
    // Two equal halves: growth in the first may be one-time (allocator arenas, pools);
    // growth that repeats in the second is a leak.
    let first = phase(d.port, clients, total / 2);
    let middle = settled(d.pid());
    let second = phase(d.port, clients, total - total / 2);
    let end = settled(d.pid());
    let names_end = thread_names(d.pid());
    for (label, t) in [("first half", &first), ("second half", &second)] {
        println!(
            "soak {label}: {} invocations at {clients} clients in {:.1}s ({:.0}/s), {} churn cycles (5 requests each), 5xx: {}, other non-200: {}",
            t.served,
            t.secs,
            t.served as f64 / t.secs,
            t.cycles,
            t.errors,
            t.other
        );
    }
    println!(
        "soak {clients} clients, daemon (start -> middle -> end): fds {} -> {} -> {}, threads {} -> {} -> {}, RSS {} -> {} -> {} kB",
        start.0, middle.0, end.0, start.1, middle.1, end.1, start.2, middle.2, end.2
    );
    println!("soak {clients} clients, threads by name: {names_start:?} -> {names_end:?}");
    for t in [&first, &second] {
        assert_eq!(t.errors, 0, "5xx under load; log:\n{}", d.log());
        assert_eq!(t.other, 0, "non-200 under load");
        assert!(t.unexpected.is_empty(), "churn: {:?}", t.unexpected);
        assert!(
            t.cycles >= 10,
            "management starved under load: {} churn cycles",
            t.cycles
        );
    }
    assert!(
        end.0 - start.0 <= FD_SLACK,
        "fds grew {} -> {}",
        start.0,
        end.0
    );
    assert!(
        end.1 - middle.1 <= THREAD_SLACK,
        "threads kept growing: {} -> {}",
        middle.1,
        end.1
    );
    assert!(
        end.1 - start.1 <= THREAD_SLACK,
        "threads grew {} -> {}",
        start.1,
        end.1
    );
    assert!(
        end.2 - start.2 <= RSS_SLACK_KB,
        "RSS grew {} -> {} kB",
        start.2,
        end.2
    );
    assert!(
        end.2 - middle.2 <= RSS_LEAK_KB,
        "RSS kept growing in the second half: {} -> {} kB",
        middle.2,
        end.2
    );
    assert!(
        eventually(Duration::from_secs(10), || d.strays().is_empty()),
        "strays: {:?}",
        d.strays()
    );
}
