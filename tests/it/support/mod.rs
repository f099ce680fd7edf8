//! Test harness: the real `edgefaas` binary on a free loopback port with a
//! temporary functions dir, a raw HTTP/1.1 client, and a file server.

#![allow(dead_code, unused_imports)] // reason: each test binary uses a different part of the harness

pub mod files;
pub mod http;
pub mod keepalive;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

pub use files::FileServer;
pub use http::{Reply, request};

/// The Python that functions run with: EDGEFAAS_PYTHON, else Debian's fast one, else PATH's.
pub fn python() -> String {
    if let Ok(p) = std::env::var("EDGEFAAS_PYTHON") {
        return p;
    }
    if Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3".into()
    } else {
        "python3".into()
    }
}

/// A temporary directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicU64 = AtomicU64::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("edgefaas-test-{}-{tag}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running daemon. Dropping it kills it; if the test is failing, its stderr is printed.
pub struct Daemon {
    pub child: Option<Child>,
    pub port: u16,
    pub dir: PathBuf,
    pub env: Vec<(String, String)>,
    /// Runs the daemon as this uid (through setpriv) when the tests run as root.
    pub uid: Option<u32>,
    /// RLIMIT_NPROC for the daemon (through prlimit): a pids limit.
    pub nproc: Option<u64>,
    log: PathBuf,
    _scratch: TempDir,
}

/// The effective uid of this test process.
pub fn euid() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|v| v.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(u32::MAX)
}

/// A uid no other test process uses at the same time (for per-uid limits).
pub fn spare_uid() -> u32 {
    static N: AtomicU64 = AtomicU64::new(0);
    40_000 + (std::process::id() % 5_000) * 4 + N.fetch_add(1, Ordering::Relaxed) as u32 % 4
}

/// Gives `path` and everything under it to `uid`.
pub fn chown_tree(path: &Path, uid: u32) {
    let _ = std::os::unix::fs::chown(path, Some(uid), Some(uid));
    if path.is_dir() {
        for e in std::fs::read_dir(path).into_iter().flatten().flatten() {
            chown_tree(&e.path(), uid);
        }
    }
}

/// How to run the binary: EDGEFAAS_BIN (e.g. an ARM build) with an optional
/// EDGEFAAS_BIN_RUNNER prefix, split at spaces (e.g. `qemu-arm-static -cpu
/// arm1176`), else cargo's build.
/// Runs `cmd` (the daemon with a bad setting) over a functions dir it must
/// never create; asserts it stops with status 1 and returns its stderr.
pub fn start_up_error(mut cmd: Command, what: &str) -> String {
    let out = cmd
        .env(
            "EDGEFAAS_FUNCTIONS_DIR",
            std::env::temp_dir().join("edgefaas-never-created"),
        )
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{what}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

pub fn command() -> Command {
    let bin =
        std::env::var("EDGEFAAS_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_edgefaas").into());
    let runner = std::env::var("EDGEFAAS_BIN_RUNNER").unwrap_or_default();
    let mut words = runner.split_whitespace();
    match words.next() {
        Some(program) => {
            let mut c = Command::new(program);
            c.args(words).arg(bin);
            c
        }
        None => Command::new(bin),
    }
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Daemon {
    /// Starts a daemon with default settings plus `env`, and waits until it serves.
    pub fn start(env: &[(&str, &str)]) -> Daemon {
        let scratch = TempDir::new("daemon");
        let dir = scratch.path().join("function");
        Daemon::start_in(scratch, dir, env)
    }

    /// Starts a daemon that does not run as root: as a spare uid through
    /// `setpriv` when the tests run as root, else as the tests' own user.
    pub fn start_unprivileged(env: &[(&str, &str)]) -> Daemon {
        let scratch = TempDir::new("daemon");
        let dir = scratch.path().join("function");
        let uid = (euid() == 0).then(spare_uid);
        if let Some(uid) = uid {
            std::fs::create_dir_all(&dir).unwrap();
            chown_tree(scratch.path(), uid);
        }
        Daemon::launch_new(scratch, dir, env, uid, None)
    }

    /// Like `start_unprivileged`, as a uid of its own (no other test's processes
    /// count against its limits) and with RLIMIT_NPROC `nproc`.
    pub fn start_limited(env: &[(&str, &str)], nproc: u64) -> Daemon {
        let scratch = TempDir::new("daemon");
        let dir = scratch.path().join("function");
        let uid = (euid() == 0).then(|| 50_000 + std::process::id() % 10_000);
        if let Some(uid) = uid {
            std::fs::create_dir_all(&dir).unwrap();
            chown_tree(scratch.path(), uid);
        }
        Daemon::launch_new(scratch, dir, env, uid, Some(nproc))
    }

    /// Starts a daemon over an existing functions dir (for restart tests).
    pub fn start_in(scratch: TempDir, dir: PathBuf, env: &[(&str, &str)]) -> Daemon {
        Daemon::launch_new(scratch, dir, env, None, None)
    }

    fn launch_new(
        scratch: TempDir,
        dir: PathBuf,
        env: &[(&str, &str)],
        uid: Option<u32>,
        nproc: Option<u64>,
    ) -> Daemon {
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let mut d = Daemon {
            child: None,
            port: 0,
            dir,
            env,
            uid,
            nproc,
            log: scratch.path().join("daemon.log"),
            _scratch: scratch,
        };
        d.launch();
        d
    }

    fn launch(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            self.port = free_port();
            self.child = Some(self.spawn());
            if self.wait_ready(deadline) {
                return;
            }
            // The port may have been taken in between: try another, within the bound.
            let status = self.kill();
            assert!(
                Instant::now() < deadline,
                "daemon did not start ({status:?}); log:\n{}",
                self.log()
            );
        }
    }

    fn spawn(&self) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut cmd = match self.uid {
            Some(uid) => {
                let base = command();
                let mut c = Command::new("setpriv");
                c.arg(format!("--reuid={uid}"))
                    .arg(format!("--regid={uid}"))
                    .arg("--clear-groups")
                    .arg("--")
                    .arg(base.get_program())
                    .args(base.get_args());
                c
            }
            None => command(),
        };
        if let Some(n) = self.nproc {
            // prlimit sets the limit on itself and execs the rest: the daemon keeps its pid.
            let inner = cmd;
            cmd = Command::new("prlimit");
            cmd.arg(format!("--nproc={n}:{n}"))
                .arg("--")
                .arg(inner.get_program())
                .args(inner.get_args());
        }
        cmd.env("EDGEFAAS_PORT", self.port.to_string())
            .env("EDGEFAAS_BIND", "127.0.0.1")
            .env("EDGEFAAS_FUNCTIONS_DIR", &self.dir)
            .env("EDGEFAAS_PYTHON", python())
            .env("RUST_LOG", "debug")
            .env("EDGEFAAS_MODE", crate::MODE)
            .env("EDGEFAAS_SANDBOX", crate::SANDBOX)
            // Loopback only: no proxy may carry the test's downloads elsewhere.
            .env_remove("HTTP_PROXY")
            .env_remove("http_proxy")
            .env_remove("HTTPS_PROXY")
            .env_remove("https_proxy")
            .env_remove("ALL_PROXY")
            .env_remove("all_proxy")
            .env_remove("EDGEFAAS_MGMT_TOKEN")
            .env_remove("JOURNAL_STREAM")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        cmd.spawn().expect("cannot start edgefaas")
    }

    /// Polls `/_/health` until 200 and the start-up line is logged (the port
    /// opens before the workers start: a test that takes the daemon's threads
    /// away must not race their start), or the daemon exits; false when it died.
    fn wait_ready(&mut self, deadline: Instant) -> bool {
        while Instant::now() < deadline {
            if let Some(Ok(Some(_))) = self.child.as_mut().map(|c| c.try_wait()) {
                return false;
            }
            if let Ok(r) = http::try_request(self.port, "GET", "/_/health", &[], b"") {
                // (A daemon told to log warnings only never writes the line.)
                let quiet = self
                    .env
                    .iter()
                    .any(|(k, v)| k == "RUST_LOG" && (v == "warn" || v == "error"));
                if r.status == 200 && (quiet || self.log().contains(" ready on ")) {
                    return true;
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// The daemon's stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("daemon running").id()
    }

    /// Sends an HTTP request and returns the answer (panics with the log on I/O failure).
    pub fn req(&self, method: &str, path: &str, body: &[u8]) -> Reply {
        self.req_h(method, path, &[], body)
    }

    /// Like `req`, with extra headers.
    pub fn req_h(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Reply {
        match http::try_request(self.port, method, path, headers, body) {
            Ok(r) => r,
            Err(e) => panic!("{method} {path}: {e}\ndaemon log:\n{}", self.log()),
        }
    }

    /// `PUT /mgmt/<name>` with `source`, asserting success.
    pub fn upload(&self, name: &str, source: &str) {
        let r = self.req("PUT", &format!("/mgmt/{name}"), source.as_bytes());
        assert!(
            r.status == 201 || r.status == 200,
            "upload {name}: {r:?}\nlog:\n{}",
            self.log()
        );
    }

    /// Sends a signal by name (TERM, INT, KILL) to the daemon.
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .unwrap();
        assert!(ok.success());
    }

    /// Waits for the daemon to exit, at most `bound`.
    pub fn wait_exit(&mut self, bound: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + bound;
        let child = self.child.as_mut()?;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }

    /// Kills the daemon at once (SIGKILL), as a power cut would stop it.
    pub fn kill(&mut self) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        let _ = child.kill();
        child.wait().ok()
    }

    /// Starts the daemon again over the same functions dir.
    pub fn restart(&mut self) {
        if self.child.is_some() {
            self.signal("TERM");
            self.wait_exit(Duration::from_secs(15))
                .expect("daemon did not stop");
        }
        self.launch();
    }

    /// Names listed by `GET /mgmt`.
    pub fn names(&self) -> Vec<String> {
        let r = self.req("GET", "/mgmt", b"");
        assert_eq!(r.status, 200);
        r.text().lines().map(str::to_string).collect()
    }

    /// Entries of the functions dir, sorted (to check nothing stray is left).
    /// (The async queue and the MQTT spool, the daemon's own state, are left out.)
    pub fn dir_entries(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(&self.dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n != ".queue" && n != ".spool")
            .collect();
        v.sort();
        v
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("---- edgefaas log ----\n{}\n----", self.log());
        }
    }
}

impl Daemon {
    /// Descendants of the daemon that should not exist: anything but the fork-mode
    /// base, its zygotes and their idle spares, and any zombie. Empty when every
    /// invocation cleaned up after itself.
    pub fn strays(&self) -> Vec<String> {
        let mut out = Vec::new();
        let me = self.pid();
        let mut stack = vec![(me, 0usize)];
        while let Some((parent, depth)) = stack.pop() {
            let (live, zombies) = children(parent);
            out.extend(zombies.iter().map(|z| format!("zombie {z}")));
            for pid in live {
                stack.push((pid, depth + 1));
                let base = depth == 0 && cmdline(pid).iter().any(|a| a == "--base");
                let zygote = depth == 1 && is_base(parent);
                // An idle spare stays in its zygote's process group; a request's child leads its own.
                let spare = depth == 2 && pgid(pid) == Some(parent);
                if !(base || zygote || spare) {
                    out.push(format!("{pid} {:?}", cmdline(pid)));
                }
            }
        }
        out
    }

    /// The daemon's zygotes: function name -> pid.
    pub fn zygotes(&self) -> std::collections::BTreeMap<String, u32> {
        let bases: Vec<u32> = children(self.pid())
            .0
            .into_iter()
            .filter(|&p| is_base(p))
            .collect();
        bases
            .into_iter()
            .flat_map(|b| children(b).0)
            .filter_map(|pid| {
                let cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).ok()?;
                Some((cwd.file_name()?.to_str()?.to_string(), pid))
            })
            .collect()
    }
}

/// Tests that need a kernel feature to check what they check: without it they
/// print why and return false, and under CI=true they fail instead.
pub fn have(feature: &str) -> bool {
    let present = match feature {
        "landlock" => landlock_abi() > 0,
        "seccomp" => {
            std::fs::read_to_string("/proc/self/status").is_ok_and(|s| s.contains("Seccomp:"))
        }
        other => panic!("unknown feature {other}"),
    };
    if !present {
        skip(&format!("this kernel has no {feature}"));
    }
    present
}

/// A test that cannot do what it checks here says why; under CI=true it fails.
pub fn skip(why: &str) {
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "CI=true: cannot test: {why}"
    );
    eprintln!("skipped: {why}");
}

/// The kernel's Landlock ABI (0: none).
pub fn landlock_abi() -> i64 {
    // SAFETY: landlock_create_ruleset with LANDLOCK_CREATE_RULESET_VERSION (1)
    // and no attributes only returns the ABI version (or -1).
    unsafe { libc::syscall(444, std::ptr::null::<u8>(), 0usize, 1u32) }.max(0)
}

/// True for the fork-mode base process.
pub fn is_base(pid: u32) -> bool {
    cmdline(pid).iter().any(|a| a == "--base")
}

/// The process group of a process.
pub fn pgid(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 1..]
        .split_whitespace()
        .nth(2)?
        .parse()
        .ok()
}

/// A process's argv.
pub fn cmdline(pid: u32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| {
            b.split(|&c| c == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Pids of the live (non-zombie) processes whose parent is `ppid`, and the zombies.
pub fn children(ppid: u32) -> (Vec<u32>, Vec<u32>) {
    let (mut live, mut zombies) = (Vec::new(), Vec::new());
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some(close) = stat.rfind(')') else {
            continue;
        };
        let mut f = stat[close + 1..].split_whitespace();
        let state = f.next().unwrap_or("");
        let parent: u32 = f.next().and_then(|p| p.parse().ok()).unwrap_or(0);
        if parent == ppid {
            if state == "Z" {
                zombies.push(pid)
            } else {
                live.push(pid)
            }
        }
    }
    (live, zombies)
}

/// True while `/proc/<pid>` exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rfind(')')
            .is_some_and(|i| !stat[i + 1..].trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// Waits until `cond` holds, at most `bound`; returns whether it did.
pub fn eventually(bound: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + bound;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Where a function reports to the test (it started, its pid): a loopback
/// socket, since the sandbox lets a function write nothing outside its own
/// invocation's folder. Each message is one connection.
pub struct Marker {
    listener: std::net::TcpListener,
    got: std::sync::Mutex<Vec<String>>,
}

impl Marker {
    pub fn new() -> Marker {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        Marker {
            listener,
            got: Default::default(),
        }
    }

    /// A Python expression that sends `expr` (a str) to the marker.
    pub fn send(&self, expr: &str) -> String {
        let port = self.listener.local_addr().unwrap().port();
        format!(
            "__import__('socket').create_connection(('127.0.0.1', {port})).sendall(str({expr}).encode())"
        )
    }

    /// Every message received so far.
    pub fn received(&self) -> Vec<String> {
        use std::io::Read;
        let mut got = self.got.lock().unwrap();
        while let Ok((mut s, _)) = self.listener.accept() {
            s.set_nonblocking(false).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut text = String::new();
            let _ = s.read_to_string(&mut text);
            got.push(text);
        }
        got.clone()
    }

    /// Waits (10 s at most) for the first message.
    pub fn wait(&self) -> String {
        assert!(
            eventually(Duration::from_secs(10), || !self.received().is_empty()),
            "the function never reported"
        );
        self.received()[0].clone()
    }
}

/// One HTTP request a `Sink` received.
#[derive(Clone, Debug)]
pub struct Received {
    pub head: String,
    pub body: Vec<u8>,
}

impl Received {
    /// A header's value (case-insensitive name).
    pub fn header(&self, name: &str) -> Option<String> {
        self.head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    }
}

/// An HTTP endpoint on loopback that records what is POSTed to it (callbacks)
/// and answers `status` (200 unless set).
pub struct Sink {
    pub port: u16,
    got: std::sync::Arc<std::sync::Mutex<Vec<Received>>>,
    pub status: std::sync::Arc<std::sync::atomic::AtomicU16>,
}

impl Sink {
    pub fn start() -> Sink {
        use std::io::{BufRead, BufReader, Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let got: std::sync::Arc<std::sync::Mutex<Vec<Received>>> = Default::default();
        let status = std::sync::Arc::new(std::sync::atomic::AtomicU16::new(200));
        let (theirs, their_status) = (got.clone(), status.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                let mut reader = BufReader::new(stream);
                let mut head = String::new();
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    head.push_str(&line);
                }
                let r = Received {
                    head: head.replace('\r', ""),
                    body: Vec::new(),
                };
                let len: usize = r
                    .header("content-length")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                let mut body = vec![0u8; len];
                let _ = reader.read_exact(&mut body);
                let code = their_status.load(Ordering::SeqCst);
                let mut stream = reader.into_inner();
                let _ = write!(
                    stream,
                    "HTTP/1.1 {code} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                );
                theirs.lock().unwrap().push(Received { body, ..r });
            }
        });
        Sink { port, got, status }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Waits (up to `bound`) until `n` requests arrived; all received so far.
    pub fn wait(&self, n: usize, bound: Duration) -> Vec<Received> {
        eventually(bound, || self.got.lock().unwrap().len() >= n);
        self.got.lock().unwrap().clone()
    }
}
