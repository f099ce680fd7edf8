//! `make bench`: every engine against the same loopback load, in one run.
//!
//! Engines (BENCH_ENGINES, default fork,fork-nosandbox,reuse,exec,ceiling):
//! fork mode and exec mode with the default settings, fork mode with
//! EDGEFAAS_SANDBOX=off (the sandbox's cost), `echo` installed with
//! `reuse=true` (one warm child serving request after request), and as the
//! ceiling a bare persistent Python HTTP server the bench starts itself (stdlib,
//! keep-alive, TCP_NODELAY: no isolation and no daemon, so the ratio to it is the
//! whole cost of a fresh process per request). For each: sequential latency of
//! `echo` (p50/p99 over BENCH_REQUESTS, default 500) and, at 8, 32 and 64
//! keep-alive clients (BENCH_CLIENTS), 2xx answers per second and non-2xx
//! counts over BENCH_SECONDS each (default 10). Then, in fork mode: the first
//! call after an install (median of 20 fresh functions), PSS per extra warm
//! function, and CPU time per request by process. Then (engine `mqtt`, with
//! /usr/sbin/mosquitto): MQTT round trips publish -> echo -> reply, p50/p99 and
//! messages/s with 8 in flight, at QoS 0 and 1, to compare with HTTP's above.
//!
//! EDGEFAAS_BIN benches another build (e.g. the previous release, for a
//! before/after in one sitting); EDGEFAAS_PYTHON, else /usr/bin/python3.

#[path = "../tests/it/support/keepalive.rs"]
mod keepalive;

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use keepalive::Client;

/// The embedded `echo`, installed again with `reuse=true` for the reuse engine.
const ECHO: &str = include_str!("../python/echo/handler.py");

fn main() {
    let requests: usize = env_or("BENCH_REQUESTS", 500);
    let seconds: u64 = env_or("BENCH_SECONDS", 10);
    let levels: Vec<usize> = std::env::var("BENCH_CLIENTS")
        .unwrap_or_else(|_| "8,32,64".into())
        .split(',')
        .filter_map(|n| n.trim().parse().ok())
        .collect();
    let engines: Vec<String> = std::env::var("BENCH_ENGINES")
        .unwrap_or_else(|_| "fork,fork-nosandbox,reuse,exec,ceiling,mqtt".into())
        .split(',')
        .map(str::to_string)
        .collect();
    let python = python();
    let bin = binary();
    println!(
        "edgefaas bench: {}, python {python}, {requests} sequential requests, {levels:?} clients x {seconds}s, {} cores",
        bin.display(),
        cores()
    );

    let mut rows = Vec::new();
    for engine in engines.iter().filter(|e| *e != "mqtt") {
        // fork-nosandbox: the sandbox's cost; reuse: one warm child per function.
        let (server, path) = match engine.as_str() {
            "ceiling" => (Server::ceiling(&python), "/echo"),
            "fork-nosandbox" => (
                Server::daemon(
                    &bin,
                    &python,
                    &[("EDGEFAAS_MODE", "fork"), ("EDGEFAAS_SANDBOX", "off")],
                ),
                "/echo",
            ),
            "reuse" => {
                let d = Server::daemon(&bin, &python, &[("EDGEFAAS_MODE", "fork")]);
                d.put("/mgmt/echor?reuse=true", ECHO.as_bytes());
                (d, "/echor")
            }
            mode => (
                Server::daemon(&bin, &python, &[("EDGEFAAS_MODE", mode)]),
                "/echo",
            ),
        };
        for _ in 0..50 {
            server.post(path, b"warm-up");
        }
        let mut lat = sequential(server.port, path, requests);
        lat.sort();
        let loads: Vec<(f64, u64)> = levels
            .iter()
            .map(|&c| throughput(server.port, path, c, Duration::from_secs(seconds)))
            .collect();
        rows.push((engine.clone(), pct(&lat, 50.0), pct(&lat, 99.0), loads));
    }
    println!();
    let mut header = "| engine | p50 | p99 |".to_string();
    let mut rule = "| --- | --- | --- |".to_string();
    for c in &levels {
        header.push_str(&format!(" 2xx/s at {c} | non-2xx at {c} |"));
        rule.push_str(" --- | --- |");
    }
    println!("{header}\n{rule}");
    for (engine, p50, p99, loads) in &rows {
        let mut line = format!("| {engine} | {:.2} ms | {:.2} ms |", ms(*p50), ms(*p99));
        for (rps, bad) in loads {
            line.push_str(&format!(" {rps:.0} | {bad} |"));
        }
        println!("{line}");
    }
    if let Some(ceiling) = rows.iter().find(|r| r.0 == "ceiling") {
        for r in rows.iter().filter(|r| r.0 != "ceiling") {
            let first = |r: &(String, Duration, Duration, Vec<(f64, u64)>)| {
                r.3.first().map_or(0.0, |l| l.0)
            };
            println!(
                "{} / ceiling: p50 {:.1}x, 2xx/s at {} clients {:.2}x",
                r.0,
                ms(r.1) / ms(ceiling.1),
                levels.first().copied().unwrap_or(0),
                first(r) / first(ceiling).max(1.0)
            );
        }
    }

    if engines.iter().any(|e| e == "fork") {
        println!();
        fork_extras(&bin, &python);
    }
    if engines.iter().any(|e| e == "mqtt") {
        println!();
        mqtt_round_trips(&bin, &python, requests, Duration::from_secs(seconds));
    }
}

/// MQTT: publish -> echo -> reply received, through a mosquitto started here.
/// Sequential round trips (p50/p99) and messages/s with 8 in flight, at QoS 0 and 1.
fn mqtt_round_trips(bin: &Path, python: &str, requests: usize, span: Duration) {
    if !Path::new("/usr/sbin/mosquitto").exists() {
        println!("MQTT: skipped (no /usr/sbin/mosquitto)");
        return;
    }
    let broker_port = free_port();
    // set_tcp_nodelay: mosquitto's default leaves Nagle on, which holds a reply
    // behind the PUBACK before it for a delayed ACK (40 ms) at QoS 1.
    let conf = std::env::temp_dir().join(format!(
        "edgefaas-bench-mosquitto-{}.conf",
        std::process::id()
    ));
    std::fs::write(
        &conf,
        format!("listener {broker_port} 127.0.0.1\nallow_anonymous true\nset_tcp_nodelay true\n"),
    )
    .unwrap();
    let mut broker = Command::new("/usr/sbin/mosquitto")
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("mosquitto");
    let up = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", broker_port)).is_err() {
        assert!(
            up.elapsed() < Duration::from_secs(10),
            "mosquitto did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let url = format!("mqtt://127.0.0.1:{broker_port}");
    let d = Server::daemon(
        bin,
        python,
        &[
            ("EDGEFAAS_MODE", "fork"),
            ("EDGEFAAS_MQTT_URL", &url),
            ("EDGEFAAS_MQTT_CLIENT_ID", "bench"),
        ],
    );
    d.put(
        "/mgmt/mecho?topic=bench/in&reply=bench/out",
        ECHO.as_bytes(),
    );
    println!("| MQTT (echo) | p50 | p99 | messages/s, 8 in flight |");
    println!("| --- | --- | --- | --- |");
    for qos in [0u8, 1] {
        let mut c = mqtt_bench::Client::connect(broker_port, qos);
        for _ in 0..20 {
            c.round_trip();
        }
        let mut lat: Vec<Duration> = (0..requests).map(|_| c.round_trip()).collect();
        lat.sort();
        let rate = c.rate(8, span);
        println!(
            "| QoS {qos} | {:.2} ms | {:.2} ms | {rate:.0} |",
            ms(pct(&lat, 50.0)),
            ms(pct(&lat, 99.0))
        );
    }
    drop(d);
    let _ = broker.kill();
    let _ = broker.wait();
    let _ = std::fs::remove_file(&conf);
}

/// A minimal MQTT 5 client for the bench (the daemon's own codec).
mod mqtt_bench {
    use std::io::{Read, Write};
    use std::net::TcpStream;
    use std::time::{Duration, Instant};

    use bytes::BytesMut;
    use mqttbytes_ng::QoS;
    use mqttbytes_ng::v5::{Connect, Filter, Packet, PubAck, Publish, Subscribe};

    pub struct Client {
        sock: TcpStream,
        buf: BytesMut,
        qos: QoS,
        pkid: u16,
    }

    impl Client {
        pub fn connect(port: u16, qos: u8) -> Client {
            let sock = TcpStream::connect(("127.0.0.1", port)).unwrap();
            sock.set_nodelay(true).unwrap();
            let qos = if qos == 0 {
                QoS::AtMostOnce
            } else {
                QoS::AtLeastOnce
            };
            let mut c = Client {
                sock,
                buf: BytesMut::new(),
                qos,
                pkid: 0,
            };
            let connect = Connect {
                keep_alive: 60,
                client_id: format!("bench-client-{}", std::process::id()),
                clean_start: true,
                properties: None,
            };
            c.send(Packet::Connect(connect, None, None));
            c.next();
            let mut sub = Subscribe::new(Filter::new("bench/out", qos), None);
            sub.pkid = 1;
            c.send(Packet::Subscribe(sub));
            while !matches!(c.next(), Packet::SubAck(_)) {}
            c
        }

        fn send(&mut self, p: Packet) {
            let mut out = BytesMut::new();
            p.write(&mut out, None).unwrap();
            self.sock.write_all(&out).unwrap();
        }

        fn next(&mut self) -> Packet {
            loop {
                match Packet::read(&mut self.buf, None) {
                    Ok(p) => return p,
                    Err(mqttbytes_ng::Error::InsufficientBytes(_)) => {
                        let mut chunk = [0u8; 16 * 1024];
                        let n = self.sock.read(&mut chunk).unwrap();
                        assert!(n > 0, "the broker closed");
                        self.buf.extend_from_slice(&chunk[..n]);
                    }
                    Err(e) => panic!("{e}"),
                }
            }
        }

        fn publish(&mut self) {
            let mut p = Publish::new("bench/in", self.qos, &b"hello"[..], None);
            if self.qos == QoS::AtLeastOnce {
                self.pkid = self.pkid % 60_000 + 2;
                p.pkid = self.pkid;
            }
            self.send(Packet::Publish(p));
        }

        /// Waits for the next reply (acknowledging it at QoS 1).
        fn reply(&mut self) {
            loop {
                if let Packet::Publish(p) = self.next() {
                    if p.qos == QoS::AtLeastOnce {
                        self.send(Packet::PubAck(PubAck::new(p.pkid, None)));
                    }
                    return;
                }
            }
        }

        pub fn round_trip(&mut self) -> Duration {
            let t = Instant::now();
            self.publish();
            self.reply();
            t.elapsed()
        }

        /// Replies per second with `window` messages in flight.
        pub fn rate(&mut self, window: usize, span: Duration) -> f64 {
            for _ in 0..window {
                self.publish();
            }
            let t = Instant::now();
            let mut n = 0u64;
            while t.elapsed() < span {
                self.reply();
                n += 1;
                self.publish();
            }
            for _ in 0..window {
                self.reply();
            }
            n as f64 / t.elapsed().as_secs_f64()
        }
    }
}

/// First call after install, memory per warm function and CPU per request, in fork mode.
fn fork_extras(bin: &Path, python: &str) {
    let d = Server::daemon(bin, python, &[("EDGEFAAS_MODE", "fork")]);
    d.post("/echo", b"warm");
    let source = "def handle(req):\n    return req\n";
    let mut firsts = Vec::new();
    for i in 0..20 {
        let name = format!("first{i:02}");
        d.put(&format!("/mgmt/{name}"), source.as_bytes());
        let started = Instant::now();
        d.post(&format!("/{name}"), b"x");
        firsts.push(started.elapsed());
    }
    firsts.sort();
    println!(
        "first call after install (median of 20 fresh functions): {:.2} ms (min {:.2}, max {:.2})",
        ms(pct(&firsts, 50.0)),
        ms(firsts[0]),
        ms(firsts[firsts.len() - 1])
    );
    drop(d);

    let d = Server::daemon(bin, python, &[("EDGEFAAS_MODE", "fork")]);
    for i in 0..21 {
        d.put(&format!("/mgmt/f{i:02}"), source.as_bytes());
    }
    d.post("/f00", b"x");
    std::thread::sleep(Duration::from_millis(500));
    let one = d.memory();
    for i in 1..21 {
        d.post(&format!("/f{i:02}"), b"x");
    }
    std::thread::sleep(Duration::from_millis(500));
    let many = d.memory();
    println!("| warm functions | processes | RSS total | PSS total | daemon RSS |");
    println!("| --- | --- | --- | --- | --- |");
    for (n, m) in [(1, &one), (21, &many)] {
        println!(
            "| {n} | {} | {:.1} MB | {:.1} MB | {:.1} MB |",
            m.processes,
            mb(m.rss_kb),
            mb(m.pss_kb),
            mb(m.daemon_rss_kb)
        );
    }
    println!(
        "| each extra warm function | | {:.2} MB | {:.2} MB | |",
        mb(many.rss_kb.saturating_sub(one.rss_kb)) / 20.0,
        mb(many.pss_kb.saturating_sub(one.pss_kb)) / 20.0
    );
    drop(d);

    let d = Server::daemon(bin, python, &[("EDGEFAAS_MODE", "fork")]);
    for _ in 0..200 {
        d.post("/echo", b"warm");
    }
    let n = 2000;
    let before = d.cpu();
    sequential(d.port, "/echo", n);
    let after = d.cpu();
    let per = |a: f64, b: f64| (b - a) * 1e6 / n as f64;
    println!(
        "CPU per request (us, {n} sequential echo): daemon {:.0}, zygotes and base {:.0}, children {:.0}",
        per(before.daemon, after.daemon),
        per(before.warm, after.warm),
        per(before.children, after.children)
    );
}

fn env_or<T: std::str::FromStr>(var: &str, default: T) -> T {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn python() -> String {
    std::env::var("EDGEFAAS_PYTHON").unwrap_or_else(|_| {
        if Path::new("/usr/bin/python3").exists() {
            "/usr/bin/python3".into()
        } else {
            "python3".into()
        }
    })
}

fn binary() -> PathBuf {
    std::env::var("EDGEFAAS_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_BIN_EXE_edgefaas")))
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

fn sequential(port: u16, path: &str, n: usize) -> Vec<Duration> {
    let mut c = Client::new(port);
    (0..n)
        .map(|i| {
            let t = Instant::now();
            let (status, body) = c.send("POST", path, format!("hello {i}").as_bytes());
            assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
            t.elapsed()
        })
        .collect()
}

/// 2xx answers per second over `span` at `clients` keep-alive clients, and how many were not 2xx.
fn throughput(port: u16, path: &str, clients: usize, span: Duration) -> (f64, u64) {
    let stop = Arc::new(AtomicBool::new(false));
    let (good, bad) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let started = Instant::now();
    let threads: Vec<_> = (0..clients)
        .map(|_| {
            let (stop, good, bad) = (stop.clone(), good.clone(), bad.clone());
            let path = path.to_string();
            std::thread::spawn(move || {
                let mut c = Client::new(port);
                while !stop.load(Ordering::Relaxed) {
                    // A dropped connection counts as a failed answer, then the client reconnects.
                    match c.send_once("POST", &path, b"hello") {
                        Ok((status, _)) if (200..300).contains(&status) => {
                            good.fetch_add(1, Ordering::Relaxed);
                        }
                        _ => {
                            bad.fetch_add(1, Ordering::Relaxed);
                        }
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
        good.load(Ordering::Relaxed) as f64 / secs,
        bad.load(Ordering::Relaxed),
    )
}

/// Memory of the daemon and all its descendants.
struct Memory {
    processes: usize,
    rss_kb: u64,
    pss_kb: u64,
    daemon_rss_kb: u64,
}

/// CPU seconds: the daemon's own, its long-lived descendants' own, and what
/// those reaped from their children (the per-request processes).
struct Cpu {
    daemon: f64,
    warm: f64,
    children: f64,
}

/// The parent pid and (utime, stime, cutime, cstime) in seconds, from /proc/<pid>/stat.
fn stat(pid: u32) -> Option<(u32, [f64; 4])> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = text[text.rfind(')')? + 2..].split_whitespace().collect();
    let tick = 100.0; // USER_HZ on Linux
    let t = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
            / tick
    };
    Some((fields.get(1)?.parse().ok()?, [t(11), t(12), t(13), t(14)]))
}

/// Every descendant of `root`.
fn descendants(root: u32) -> Vec<u32> {
    let all: Vec<(u32, u32)> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse::<u32>().ok())
        .filter_map(|pid| Some((pid, stat(pid)?.0)))
        .collect();
    let mut out = Vec::new();
    let mut frontier = vec![root];
    while let Some(p) = frontier.pop() {
        for &(pid, ppid) in &all {
            if ppid == p {
                out.push(pid);
                frontier.push(pid);
            }
        }
    }
    out
}

/// Something the bench sends requests to: the daemon, or the ceiling server.
struct Server {
    child: Child,
    port: u16,
    dir: PathBuf,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The ceiling: a persistent stdlib Python HTTP/1.1 echo server.
const CEILING: &str = r#"
import http.server, socket, sys
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def setup(self):
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    def do_POST(self):
        n = int(self.headers.get("Content-Length", 0))
        body = self.rfile.read(n) + b"\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
class S(http.server.ThreadingHTTPServer):
    request_queue_size = 256
    daemon_threads = True
S(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"#;

impl Server {
    fn daemon(bin: &Path, python: &str, env: &[(&str, &str)]) -> Server {
        let port = free_port();
        static N: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "edgefaas-bench-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        let child = Command::new(bin)
            .env("EDGEFAAS_PORT", port.to_string())
            .env("EDGEFAAS_BIND", "127.0.0.1")
            .env("EDGEFAAS_FUNCTIONS_DIR", &dir)
            .env("EDGEFAAS_PYTHON", python)
            .env("RUST_LOG", "warn")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start edgefaas");
        Server::ready(child, port, dir)
    }

    fn ceiling(python: &str) -> Server {
        let port = free_port();
        let child = Command::new(python)
            .args(["-c", CEILING, &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the ceiling server");
        Server::ready(child, port, PathBuf::new())
    }

    fn ready(child: Child, port: u16, dir: PathBuf) -> Server {
        let s = Server { child, port, dir };
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        s
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
        pids.extend(descendants(me));
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

    fn cpu(&self) -> Cpu {
        let me = self.child.id();
        let own = |pid: u32| stat(pid).map_or(0.0, |(_, t)| t[0] + t[1]);
        let reaped = |pid: u32| stat(pid).map_or(0.0, |(_, t)| t[2] + t[3]);
        let warm: Vec<u32> = descendants(me);
        Cpu {
            daemon: own(me),
            warm: warm.iter().map(|&p| own(p)).sum(),
            // Children of the daemon (exec mode) and of its long-lived descendants (fork mode).
            children: warm.iter().map(|&p| reaped(p)).sum::<f64>() + reaped(me),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if !self.dir.as_os_str().is_empty() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
