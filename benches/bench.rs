//! `make bench`: fork mode against exec mode on loopback, in one run.
//!
//! For each mode: sequential latency of `echo` (p50/p99 over BENCH_REQUESTS,
//! default 500) and throughput at 8 keep-alive clients for BENCH_SECONDS
//! (default 10). Then the memory of the daemon plus its zygotes with 1 and with
//! 20 warm functions (RSS and PSS from /proc/<pid>/smaps_rollup).
//! Uses EDGEFAAS_PYTHON, else /usr/bin/python3, else python3.

#[path = "../tests/it/support/keepalive.rs"]
mod keepalive;

use std::net::TcpStream;

use keepalive::Client;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

const CLIENTS: usize = 8;

fn main() {
    let requests: usize = env_or("BENCH_REQUESTS", 500);
    let seconds: u64 = env_or("BENCH_SECONDS", 10);
    let python = std::env::var("EDGEFAAS_PYTHON").unwrap_or_else(|_| {
        if Path::new("/usr/bin/python3").exists() {
            "/usr/bin/python3".into()
        } else {
            "python3".into()
        }
    });
    println!(
        "edgefaas bench: python {python}, {requests} sequential requests, {CLIENTS} clients x {seconds}s, {} cores",
        cores()
    );

    let mut rows = Vec::new();
    for mode in ["fork", "exec"] {
        let d = Daemon::start(mode, &python);
        for _ in 0..20 {
            d.post("/echo", b"warm-up");
        }
        let mut lat = sequential(&d, requests);
        lat.sort();
        let (rps, errors) = throughput(&d, Duration::from_secs(seconds));
        rows.push((mode, pct(&lat, 50.0), pct(&lat, 99.0), rps, errors));
    }
    let (fork, exec) = (&rows[0], &rows[1]);
    println!();
    println!("| mode | p50 latency | p99 latency | throughput ({CLIENTS} clients) | non-200 |");
    println!("| --- | --- | --- | --- | --- |");
    for (mode, p50, p99, rps, errors) in &rows {
        println!(
            "| {mode} | {:.2} ms | {:.2} ms | {rps:.0} req/s | {errors} |",
            ms(*p50),
            ms(*p99)
        );
    }
    println!(
        "| exec / fork | {:.1}x | {:.1}x | fork {:.1}x exec | |",
        ms(exec.1) / ms(fork.1),
        ms(exec.2) / ms(fork.2),
        fork.3 / exec.3
    );

    println!();
    let d = Daemon::start("fork", &python);
    let source = "def handle(req):\n    return req\n";
    for i in 0..20 {
        d.put(&format!("/mgmt/f{i:02}"), source.as_bytes());
    }
    d.post("/f00", b"x");
    std::thread::sleep(Duration::from_millis(300));
    let one = d.memory();
    for i in 1..20 {
        d.post(&format!("/f{i:02}"), b"x");
    }
    std::thread::sleep(Duration::from_millis(300));
    let twenty = d.memory();
    println!("| warm functions | processes | RSS total | PSS total | daemon RSS |");
    println!("| --- | --- | --- | --- | --- |");
    for (n, m) in [(1, &one), (20, &twenty)] {
        println!(
            "| {n} | {} | {:.1} MB | {:.1} MB | {:.1} MB |",
            m.processes,
            mb(m.rss_kb),
            mb(m.pss_kb),
            mb(m.daemon_rss_kb)
        );
    }
    println!(
        "| each extra function | | {:.1} MB | {:.1} MB | |",
        mb(twenty.rss_kb.saturating_sub(one.rss_kb)) / 19.0,
        mb(twenty.pss_kb.saturating_sub(one.pss_kb)) / 19.0
    );
}

fn env_or<T: std::str::FromStr>(var: &str, default: T) -> T {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn mb(kb: u64) -> f64 {
    kb as f64 / 1024.0
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p / 100.0).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn sequential(d: &Daemon, n: usize) -> Vec<Duration> {
    let mut c = Client::new(d.port);
    (0..n)
        .map(|i| {
            let t = Instant::now();
            let (status, body) = c.send("POST", "/echo", format!("hello {i}").as_bytes());
            assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
            t.elapsed()
        })
        .collect()
}

/// Requests per second over `span` at CLIENTS keep-alive clients, and how many were not 200.
fn throughput(d: &Daemon, span: Duration) -> (f64, u64) {
    let stop = Arc::new(AtomicBool::new(false));
    let (done, bad) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let started = Instant::now();
    let threads: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (stop, done, bad, port) = (stop.clone(), done.clone(), bad.clone(), d.port);
            std::thread::spawn(move || {
                let mut c = Client::new(port);
                while !stop.load(Ordering::Relaxed) {
                    let (status, _) = c.send("POST", "/echo", b"hello");
                    done.fetch_add(1, Ordering::Relaxed);
                    if status != 200 {
                        bad.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(span);
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    let secs = started.elapsed().as_secs_f64();
    (
        done.load(Ordering::Relaxed) as f64 / secs,
        bad.load(Ordering::Relaxed),
    )
}

/// Memory of the daemon and its children.
struct Memory {
    processes: usize,
    rss_kb: u64,
    pss_kb: u64,
    daemon_rss_kb: u64,
}

struct Daemon {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl Daemon {
    fn start(mode: &str, python: &str) -> Daemon {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir =
            std::env::temp_dir().join(format!("edgefaas-bench-{}-{mode}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let child = Command::new(env!("CARGO_BIN_EXE_edgefaas"))
            .env("EDGEFAAS_MODE", mode)
            .env("EDGEFAAS_PORT", port.to_string())
            .env("EDGEFAAS_BIND", "127.0.0.1")
            .env("EDGEFAAS_FUNCTIONS_DIR", &dir)
            .env("EDGEFAAS_PYTHON", python)
            .env("EDGEFAAS_WORKERS", (CLIENTS + 2).to_string())
            .env("EDGEFAAS_MAX_INFLIGHT", CLIENTS.to_string())
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start edgefaas");
        let d = Daemon { child, port, dir };
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "daemon did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        d
    }

    fn post(&self, path: &str, body: &[u8]) {
        let (status, text) = Client::new(self.port).send("POST", path, body);
        assert_eq!(status, 200, "{path}: {}", String::from_utf8_lossy(&text));
    }

    fn put(&self, path: &str, body: &[u8]) {
        let (status, text) = Client::new(self.port).send("PUT", path, body);
        assert!(
            status == 201 || status == 200,
            "{path}: {}",
            String::from_utf8_lossy(&text)
        );
    }

    fn memory(&self) -> Memory {
        let me = self.child.id();
        let mut pids = vec![me];
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let ppid = stat
                .rfind(')')
                .and_then(|i| stat[i + 1..].split_whitespace().nth(1)?.parse::<u32>().ok());
            if ppid == Some(me) {
                pids.push(pid);
            }
        }
        let field = |pid: u32, name: &str| -> u64 {
            let text =
                std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
            text.lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
                .unwrap_or(0)
        };
        Memory {
            processes: pids.len(),
            rss_kb: pids.iter().map(|&p| field(p, "Rss:")).sum(),
            pss_kb: pids.iter().map(|&p| field(p, "Pss:")).sum(),
            daemon_rss_kb: field(me, "Rss:"),
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
