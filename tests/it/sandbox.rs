//! The sandbox, tried as a hostile function would, with the daemon running as
//! a user that is not root: each attack from issue #11 is refused while
//! `/_/health` and another function keep answering.

use std::time::{Duration, Instant};

use crate::support::{Daemon, eventually, have, http, landlock_abi};

/// `k=v&…` from a function's query, as Python code every attacker starts with.
const PRELUDE: &str = "import ctypes, os, signal\n\
q = {}\n\
def args():\n    return dict(p.split('=', 1) for p in os.environ['Http_Query'].split('&') if '=' in p)\n";

/// The answer of a probe function, its lines for the failure message.
fn probe(d: &Daemon, name: &str, query: &str) -> String {
    let r = d.req("GET", &format!("/{name}?{query}"), b"");
    assert_eq!(r.status, 200, "{r:?}\nlog:\n{}", d.log());
    r.text()
}

/// Health and another function answer, and that function's zygote is the same one.
fn still_serving(d: &Daemon) {
    assert_eq!(d.req("GET", "/_/health", b"").status, 200);
    let r = d.req("POST", "/echo", b"still here");
    assert_eq!(
        (r.status, r.text().as_str()),
        (200, "still here\n"),
        "{r:?}"
    );
}

const READ_TOKEN: &str = "\
def scan(pid):\n    out = []\n    for what in ('environ', 'cmdline', 'maps', 'mem'):\n        \
path = '/proc/%s/%s' % (pid, what)\n        try:\n            with open(path, 'rb') as f:\n                \
data = f.read(1 << 20) if what != 'mem' else b''\n            out.append('%s OPENED%s' % (path, ' TOKEN' if b's3cret-token' in data else ''))\n        \
except OSError as e:\n            out.append('%s %s' % (path, e.strerror))\n    \
try:\n        with open('/proc/%s/maps' % pid) as maps, open('/proc/%s/mem' % pid, 'rb') as mem:\n            \
for line in maps:\n                lo, hi = (int(x, 16) for x in line.split()[0].split('-'))\n                \
if 'rw' in line.split()[1]:\n                    try:\n                        mem.seek(lo)\n                        \
if b's3cret-token' in mem.read(min(hi - lo, 64 << 20)):\n                            out.append('MEMORY TOKEN')\n                    \
except OSError:\n                        pass\n    except OSError as e:\n        out.append('scan %s' % e.strerror)\n    return out\n\
def handle(req):\n    a = args()\n    out = scan(a['daemon'])\n    \
out.append('env TOKEN' if any('s3cret-token' in v for v in os.environ.values()) else 'env clean')\n    \
for pid in os.listdir('/proc'):\n        if pid.isdigit():\n            try:\n                \
if b's3cret-token' in open('/proc/%s/environ' % pid, 'rb').read():\n                    out.append('TOKEN in %s' % pid)\n            \
except OSError:\n                pass\n    \
if 'file' in a:\n        try:\n            out.append('file OPENED ' + open(a['file']).read())\n        \
except OSError as e:\n            out.append('file ' + e.strerror)\n    return '\\n'.join(out)\n";

#[test]
fn the_token_cannot_be_read_from_the_daemons_proc_entries_or_memory() {
    let d = Daemon::start_unprivileged(&[("EDGEFAAS_MGMT_TOKEN", "s3cret-token")]);
    let auth = [("Authorization", "Bearer s3cret-token")];
    let r = d.req_h(
        "PUT",
        "/mgmt/thief",
        &auth,
        format!("{PRELUDE}{READ_TOKEN}").as_bytes(),
    );
    assert_eq!(r.status, 201, "{r:?}");
    let out = probe(&d, "thief", &format!("daemon={}", d.pid()));
    assert!(!out.contains("TOKEN"), "{out}");
    for what in ["environ", "mem", "maps"] {
        assert!(
            !out.contains(&format!("{}/{what} OPENED", d.pid())),
            "{what}: {out}"
        );
    }
    assert!(out.contains("env clean"), "{out}");
    still_serving(&d);
}

#[test]
fn the_token_file_is_not_readable_by_functions() {
    if !have("landlock") {
        return;
    }
    let scratch = crate::support::TempDir::new("token");
    let file = scratch.path().join("token");
    std::fs::write(&file, "s3cret-token\n").unwrap();
    if crate::support::euid() == 0 {
        // The daemon's spare uid must read it: its own file, as a Secret volume would be.
        std::fs::set_permissions(
            scratch.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o644))
            .unwrap();
    }
    let path = file.to_str().unwrap();
    let d = Daemon::start_unprivileged(&[("EDGEFAAS_MGMT_TOKEN_FILE", path)]);
    let auth = [("Authorization", "Bearer s3cret-token")];
    let r = d.req_h(
        "PUT",
        "/mgmt/thief",
        &auth,
        format!("{PRELUDE}{READ_TOKEN}").as_bytes(),
    );
    assert_eq!(r.status, 201, "{r:?}");
    let out = probe(&d, "thief", &format!("daemon={}&file={path}", d.pid()));
    assert!(!out.contains("TOKEN"), "{out}");
    assert!(out.contains("file Permission denied"), "{out}");
}

const SIGNALS: &str = "\
def handle(req):\n    a = args()\n    libc = ctypes.CDLL(None, use_errno=True)\n    out = []\n    \
for label in ('daemon', 'zygote', 'base'):\n        pid = int(a[label])\n        \
for sig in ('SIGSTOP', 'SIGKILL'):\n            try:\n                os.kill(pid, getattr(signal, sig))\n                \
out.append('%s %s SENT' % (label, sig))\n            except OSError as e:\n                out.append('%s %s %s' % (label, sig, e.strerror))\n        \
if libc.ptrace(0x4206, pid, None, None) == 0:\n            out.append('%s ptrace ATTACHED' % label)\n        \
else:\n            out.append('%s ptrace %s' % (label, os.strerror(ctypes.get_errno())))\n    \
try:\n        fd = os.pidfd_open(int(a['daemon']))\n        signal.pidfd_send_signal(fd, signal.SIGSTOP)\n        out.append('pidfd SENT')\n    \
except OSError as e:\n        out.append('pidfd ' + e.strerror)\n    \
for target in (-int(a['daemon']), -1):\n        try:\n            os.kill(target, signal.SIGSTOP)\n            out.append('kill(%d) SENT' % target)\n        \
except OSError as e:\n            out.append('kill(%d) %s' % (target, e.strerror))\n    return '\\n'.join(out)\n";

#[test]
fn no_function_can_signal_or_trace_the_daemon_or_another_function() {
    if !have("seccomp") {
        return;
    }
    let d = Daemon::start_unprivileged(&[]);
    d.upload("attacker", &format!("{PRELUDE}{SIGNALS}"));
    assert_eq!(d.req("POST", "/echo", b"warm").status, 200);
    let (zygote, base) = if crate::MODE == "fork" {
        let zygotes = d.zygotes();
        let base = crate::support::children(d.pid())
            .0
            .into_iter()
            .find(|&p| crate::support::is_base(p))
            .unwrap();
        (zygotes["echo"], base)
    } else {
        (d.pid(), d.pid())
    };
    let out = probe(
        &d,
        "attacker",
        &format!("daemon={}&zygote={zygote}&base={base}", d.pid()),
    );
    // Sibling signals need Landlock's scoping (ABI 6); the daemon is also the filter's.
    let scoped = landlock_abi() >= 6;
    for line in out.lines() {
        let sibling = line.starts_with("zygote") || line.starts_with("base");
        if scoped || !sibling || line.contains("ptrace") {
            assert!(
                !line.contains("SENT") && !line.contains("ATTACHED"),
                "{out}"
            );
        }
    }
    still_serving(&d);
    if crate::MODE == "fork" {
        assert_eq!(d.zygotes()["echo"], zygote, "the other zygote lives on");
    }
}

const WRITER: &str = "\
def handle(req):\n    root = args()['root']\n    out = []\n    \
for path, data in [(root + '/victim/handler.py', 'def handle(req):\\n    return \"pwned\"\\n'),\n                       \
(root + '/victim/meta.json', '{}'), (root + '/.runtime/index.py', 'import os\\nos._exit(0)\\n'),\n                       \
(root + '/backdoor/handler.py', 'def handle(req):\\n    return 1\\n'), (root + '/attacker/handler.py', 'x')]:\n        \
try:\n            os.makedirs(os.path.dirname(path), exist_ok=True)\n            with open(path, 'a') as f:\n                f.write(data)\n            \
out.append(path + ' WRITTEN')\n        except OSError as e:\n            out.append(path + ' ' + e.strerror)\n    \
for op, f in [('rename', lambda: os.rename(root + '/victim', root + '/victim2')),\n                  \
('unlink', lambda: os.unlink(root + '/victim/handler.py')),\n                  \
('symlink', lambda: os.symlink('/etc/passwd', root + '/victim/evil')),\n                  \
('chmod', lambda: os.chmod(root + '/victim/handler.py', 0o777)),\n                  \
('read', lambda: open(root + '/victim/handler.py').read())]:\n        \
try:\n            f()\n            out.append(op + ' DONE')\n        except OSError as e:\n            out.append(op + ' ' + e.strerror)\n    \
return '\\n'.join(out)\n";

#[test]
fn no_function_can_write_another_its_metadata_or_the_runner() {
    if !have("landlock") {
        return;
    }
    let d = Daemon::start_unprivileged(&[]);
    d.upload("victim", "def handle(req):\n    return 'v1'\n");
    d.upload("attacker", &format!("{PRELUDE}{WRITER}"));
    let listing = || {
        d.req_h("GET", "/mgmt", &[("Accept", "application/json")], b"")
            .body
    };
    let before = listing();
    let runner = std::fs::read(d.dir.join(".runtime/index.py")).unwrap();
    let out = probe(&d, "attacker", &format!("root={}", d.dir.display()));
    assert!(!out.contains("WRITTEN") && !out.contains("DONE"), "{out}");
    assert_eq!(listing(), before);
    assert_eq!(
        std::fs::read(d.dir.join(".runtime/index.py")).unwrap(),
        runner
    );
    assert_eq!(runner, include_bytes!("../../python/index.py"));
    assert_eq!(d.req("GET", "/victim", b"").text(), "v1\n");
    assert!(!d.dir.join("backdoor").exists());
    still_serving(&d);
}

#[test]
fn a_changed_runner_is_written_again_before_it_runs() {
    let d = Daemon::start_unprivileged(&[]);
    d.upload("f", "def handle(req):\n    return 'fine'\n");
    let runner = d.dir.join(".runtime/index.py");
    std::fs::write(&runner, "import os\nos.write(1, b'patched')\nos._exit(0)\n").unwrap();
    if crate::MODE == "fork" {
        // The base loaded the runner at its start: make it start again.
        let base = crate::support::children(d.pid())
            .0
            .into_iter()
            .find(|&p| crate::support::is_base(p))
            .unwrap();
        std::process::Command::new("kill")
            .args(["-KILL", &base.to_string()])
            .status()
            .unwrap();
        assert!(eventually(Duration::from_secs(5), || {
            !crate::support::alive(base)
        }));
    }
    d.upload("g", "def handle(req):\n    return 'new'\n");
    assert_eq!(d.req("GET", "/g", b"").text(), "new\n");
    assert_eq!(d.req("GET", "/f", b"").text(), "fine\n");
    assert_eq!(
        std::fs::read(&runner).unwrap(),
        include_bytes!("../../python/index.py")
    );
    assert!(d.log().contains("was changed or removed"), "{}", d.log());
}

const SNOOP: &str = "\
import time\n\
def handle(req):\n    out = []\n    deadline = time.time() + 1.5\n    seen = set()\n    \
while time.time() < deadline:\n        for pid in os.listdir('/proc'):\n            \
if not pid.isdigit() or int(pid) == os.getpid():\n                continue\n            \
for what in ('environ', 'cmdline'):\n                try:\n                    data = open('/proc/%s/%s' % (pid, what), 'rb').read()\n                \
except OSError:\n                    continue\n                \
for secret in (b'victim-auth-123', b'victim-body-456'):\n                    if secret in data:\n                        \
seen.add('%s in %s/%s' % (secret.decode(), pid, what))\n            \
try:\n                with open('/proc/%s/mem' % pid, 'rb') as mem:\n                    seen.add('mem OPENED %s' % pid)\n            \
except OSError:\n                pass\n            \
for fd in (0, 1, 2, 3):\n                try:\n                    with open('/proc/%s/fd/%d' % (pid, fd), 'wb') as w:\n                        \
w.write(b'INJECTED')\n                    seen.add('fd WRITTEN %s/%d' % (pid, fd))\n                \
except OSError:\n                    pass\n        time.sleep(0.05)\n    \
return '\\n'.join(sorted(seen)) or 'nothing'\n";

#[test]
fn no_function_can_read_or_write_another_invocation() {
    let d = Daemon::start_unprivileged(&[]);
    d.upload(
        "victim",
        "import time, os\ndef handle(req):\n    time.sleep(2.5)\n    return 'victim saw ' + req + ' ' + os.environ['Http_Authorization']\n",
    );
    d.upload("snoop", &format!("{PRELUDE}{SNOOP}"));
    let port = d.port;
    let victim = std::thread::spawn(move || {
        http::try_request(
            port,
            "POST",
            "/victim",
            &[("Authorization", "Bearer victim-auth-123")],
            b"victim-body-456",
        )
        .unwrap()
    });
    std::thread::sleep(Duration::from_millis(500));
    let out = probe(&d, "snoop", "");
    let v = victim.join().unwrap();
    assert_eq!(v.status, 200, "{v:?}");
    assert_eq!(
        v.text(),
        "victim saw victim-body-456 Bearer victim-auth-123\n"
    );
    // Its own processes (the snoop's zygote) are the only ones it may touch.
    for line in out.lines() {
        assert!(!line.contains("victim-"), "{out}");
        assert!(
            !line.starts_with("fd WRITTEN") && !line.starts_with("mem OPENED"),
            "{out}"
        );
    }
    still_serving(&d);
}

const BOMB: &str = "\
import os, time\n\
def handle(req):\n    n = 0\n    try:\n        while n < 100000:\n            if os.fork() == 0:\n                \
time.sleep(60)\n                os._exit(0)\n            n += 1\n    except OSError as e:\n        \
err = e.strerror\n    time.sleep(2)\n    return '%d %s' % (n, err)\n";

#[test]
fn a_fork_bomb_under_a_pids_limit_hurts_only_itself() {
    const NPROC: u64 = 300;
    let d = Daemon::start_limited(&[], NPROC);
    d.upload("bomb", &format!("# edgefaas: timeout=8\n{BOMB}"));
    d.upload("calm", "def handle(req):\n    return 'calm'\n");
    assert_eq!(d.req("GET", "/calm", b"").status, 200);
    let port = d.port;
    let bomb = std::thread::spawn(move || http::request(port, "GET", "/bomb", b""));
    // Throughout the bomb: health and another function answer.
    let until = Instant::now() + Duration::from_millis(2500);
    let mut checks = 0;
    while Instant::now() < until {
        assert_eq!(d.req("GET", "/_/health", b"").status, 200, "{}", d.log());
        let r = d.req("GET", "/calm", b"");
        assert_eq!((r.status, r.text().as_str()), (200, "calm\n"), "{r:?}");
        checks += 1;
        std::thread::sleep(Duration::from_millis(50));
    }
    let r = bomb.join().unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    let text = r.text();
    let forks: u64 = text.split_whitespace().next().unwrap().parse().unwrap();
    assert!(
        forks > 10 && forks < NPROC && text.contains("Resource temporarily unavailable"),
        "{text}"
    );
    assert!(checks > 10);
    // Its processes die with it.
    assert!(
        eventually(Duration::from_secs(10), || d.strays().is_empty()),
        "{:?}",
        d.strays()
    );
    still_serving(&d);
}

const SECRETS: &str = "\
def handle(req):\n    a = args()\n    out = [os.environ.get('Secrets_Dir', 'none')]\n    \
for path in (os.path.join(os.environ.get('Secrets_Dir', '/nonexistent'), 'key'), a['other'], a['dir']):\n        \
try:\n            out.append(open(path).read().strip() if not os.path.isdir(path) else 'LISTED ' + ','.join(os.listdir(path)))\n        \
except OSError as e:\n            out.append(e.strerror)\n    return '\\n'.join(out)\n";

#[test]
fn secrets_are_readable_by_their_function_alone() {
    if !have("landlock") {
        return;
    }
    let scratch = crate::support::TempDir::new("secrets");
    let secrets = scratch.path().join("secrets");
    for (name, value) in [("alpha", "alpha-secret"), ("beta", "beta-secret")] {
        std::fs::create_dir_all(secrets.join(name)).unwrap();
        std::fs::write(secrets.join(name).join("key"), value).unwrap();
    }
    if crate::support::euid() == 0 {
        crate::support::chown_tree(scratch.path(), 0);
        use std::os::unix::fs::PermissionsExt;
        for p in [
            scratch.path().to_path_buf(),
            secrets.clone(),
            secrets.join("alpha"),
            secrets.join("beta"),
        ] {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
    }
    let d = Daemon::start_unprivileged(&[("EDGEFAAS_SECRETS_DIR", secrets.to_str().unwrap())]);
    d.upload("alpha", &format!("{PRELUDE}{SECRETS}"));
    let out = probe(
        &d,
        "alpha",
        &format!(
            "other={}&dir={}",
            secrets.join("beta/key").display(),
            secrets.display()
        ),
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], secrets.join("alpha").to_str().unwrap(), "{out}");
    assert_eq!(lines[1], "alpha-secret", "{out}");
    assert_eq!(lines[2], "Permission denied", "{out}");
    assert_eq!(lines[3], "Permission denied", "{out}");
}

#[test]
fn start_up_says_what_is_on_and_metrics_export_it() {
    let d = Daemon::start_unprivileged(&[]);
    eventually(Duration::from_secs(5), || d.log().contains("sandbox: "));
    let log = d.log();
    let line = log
        .lines()
        .find(|l| l.contains("sandbox: "))
        .unwrap_or_else(|| panic!("no sandbox line:\n{log}"));
    let metrics = d.req("GET", "/_/metrics", b"").text();
    let abi = landlock_abi().min(7);
    assert!(
        line.contains("seccomp") && line.contains("missing: "),
        "{line}"
    );
    assert!(line.contains("python ") && line.contains(" 3."), "{line}");
    assert!(
        metrics.contains("edgefaas_sandbox{feature=\"seccomp\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("edgefaas_sandbox{feature=\"cgroups\"} 0"),
        "{metrics}"
    );
    assert!(
        metrics.contains(&format!("edgefaas_landlock_abi {abi}")),
        "{metrics}"
    );
    if abi > 0 {
        assert!(line.contains(&format!("landlock ABI {abi}")), "{line}");
    }
}

/// Runs the daemon until it exits on its own (start-up refused): its exit code
/// and stderr. One that is still running after 20 s is killed (code `None`).
fn refused(env: &[(&str, &str)]) -> (Option<i32>, String) {
    let dir = crate::support::TempDir::new("refused");
    let log = dir.path().join("stderr");
    let mut child = crate::support::command()
        .env("EDGEFAAS_FUNCTIONS_DIR", dir.path().join("function"))
        .env("EDGEFAAS_PYTHON", crate::support::python())
        .env("EDGEFAAS_PORT", crate::support::free_port().to_string())
        .env("EDGEFAAS_BIND", "127.0.0.1")
        .env("PYTHONPATH", dir.path())
        .envs(env.iter().copied())
        .stdin(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let code = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status.code();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (code, std::fs::read_to_string(&log).unwrap_or_default())
}

#[test]
fn strict_refuses_to_start_when_functions_could_read_each_other() {
    // PYTHONPATH puts the folder holding the functions dir on every function's read list.
    let (code, err) = refused(&[("EDGEFAAS_SANDBOX", "strict")]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("EDGEFAAS_SANDBOX=strict"), "{err}");
    assert!(err.contains("functions dir"), "{err}");
    // Without that, strict starts where the kernel has it all.
    if have("landlock") {
        let d = Daemon::start_unprivileged(&[("EDGEFAAS_SANDBOX", "strict")]);
        assert_eq!(d.req("POST", "/echo", b"ok").text(), "ok\n");
        assert!(d.log().contains("sandbox: strict with"), "{}", d.log());
    }
}

#[test]
fn a_python_that_cannot_start_stops_start_up_with_one_line() {
    let (code, err) = refused(&[("EDGEFAAS_PYTHON", "/nonexistent/python3")]);
    assert_eq!(code, Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("EDGEFAAS_PYTHON") && err.contains("/nonexistent/python3"),
        "{err}"
    );
}

#[test]
fn each_invocation_writes_only_its_own_folder_which_is_removed_after() {
    let d = Daemon::start_unprivileged(&[]);
    d.upload(
        "scribe",
        "import os\ndef handle(req):\n    t = os.environ['TMPDIR']\n    open(os.path.join(t, 'mine'), 'w').write('x')\n    \
         out = [t]\n    for p in (os.path.join(os.path.dirname(t), 'beside'), '/tmp/edgefaas-scribe', os.path.join(os.getcwd(), 'x')):\n        \
         try:\n            open(p, 'w').write('x')\n            out.append(p + ' WRITTEN')\n        except OSError as e:\n            out.append(e.strerror)\n    \
         return '\\n'.join(out)\n",
    );
    let mut folders = Vec::new();
    for _ in 0..3 {
        let out = probe(&d, "scribe", "");
        let lines: Vec<&str> = out.lines().collect();
        if have("landlock") {
            assert!(!out.contains("WRITTEN"), "{out}");
        }
        folders.push(std::path::PathBuf::from(lines[0]));
    }
    folders.dedup();
    assert_eq!(folders.len(), 3, "one folder per invocation: {folders:?}");
    for f in &folders {
        assert!(
            eventually(Duration::from_secs(5), || !f.exists()),
            "{} outlived its invocation",
            f.display()
        );
    }
}

const ESCAPES: &str = "\
import errno, fcntl, os, platform, signal, socket\n\
NR = {'x86_64': {'clone': 56}, 'aarch64': {'clone': 220}}.get(platform.machine(), {'clone': 120})\n\
def attempt(label, f):\n    try:\n        f()\n        return label + ' DONE'\n    except OSError as e:\n        return label + ' ' + errno.errorcode.get(e.errno, str(e.errno))\n\
def clone_parent():\n    libc = ctypes.CDLL(None, use_errno=True)\n    pid = libc.syscall(NR['clone'], 0x8000 | 17, None, None, None, None)\n    \
if pid == 0:\n        os._exit(0)\n    if pid < 0:\n        raise OSError(ctypes.get_errno(), 'clone')\n\
def uring():\n    libc = ctypes.CDLL(None, use_errno=True)\n    params = ctypes.create_string_buffer(120)\n    \
fd = libc.syscall(425, 8, params)\n    if fd < 0:\n        raise OSError(ctypes.get_errno(), 'io_uring_setup')\n\
def handle(req):\n    a = args()\n    daemon = int(a['daemon'])\n    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)\n    \
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)\n    out = [\n        \
attempt('listen', lambda: (s.bind(('::1', int(a['port']))), s.listen())),\n        \
attempt('acl', lambda: os.setxattr(a['victim'], 'system.posix_acl_access', b'\\x02\\x00\\x00\\x00')),\n        \
attempt('xattr', lambda: os.setxattr(a['victim'], 'user.pwned', b'1')),\n        \
attempt('clone_parent', clone_parent),\n        attempt('io_uring', uring),\n        \
attempt('pidfd_send_signal', lambda: signal.pidfd_send_signal(os.open('/proc/%d' % daemon, os.O_DIRECTORY), signal.SIGSTOP)),\n        \
attempt('f_setown', lambda: fcntl.fcntl(s.fileno(), fcntl.F_SETOWN, daemon)),\n    ]\n    \
return '\\n'.join(out)\n";

#[test]
fn no_function_can_listen_rewrite_modes_or_leave_its_family() {
    if !have("seccomp") {
        return;
    }
    let d = Daemon::start_unprivileged(&[]);
    d.upload("victim", "def handle(req):\n    return 'v1'\n");
    d.upload("escaper", &format!("{PRELUDE}{ESCAPES}"));
    let victim = d.dir.join("victim");
    let out = probe(
        &d,
        "escaper",
        &format!(
            "daemon={}&port={}&victim={}",
            d.pid(),
            d.port,
            victim.display()
        ),
    );
    assert!(!out.contains("DONE"), "{out}");
    assert_eq!(out.lines().count(), 7, "{out}");
    assert_eq!(d.req("GET", "/victim", b"").text(), "v1\n");
    // Nothing took the port on the other address family.
    assert!(std::net::TcpStream::connect(("::1", d.port)).is_err());
    still_serving(&d);
}

#[test]
fn no_zygote_holds_another_functions_settings_in_its_memory() {
    let d = Daemon::start_unprivileged(&[]);
    // Installed (and checked), never invoked: its settings went to the base only as far as needed.
    let r = d.req(
        "PUT",
        "/mgmt/payments?env=STRIPE_KEY%3Dsk_live_victim_only_42",
        b"def handle(req):\n    return 'paid'\n",
    );
    assert_eq!(r.status, 201, "{r:?}");
    // The spy looks for the secret in all of its writable memory at import (its
    // zygote is a fork of the base), without copying memory and skipping its own needle.
    d.upload(
        "spy",
        &format!(
            "import ctypes, sys\nlibc = ctypes.CDLL(None)\nlibc.memmem.restype = ctypes.c_void_p\n\
             libc.memmem.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_size_t]\n\
             needle = bytes.fromhex('{hex}')\nown = id(needle) + sys.getsizeof(b'') - 1\nfound = []\n\
             for line in open('/proc/self/maps'):\n    f = line.split()\n    if not f[1].startswith('rw'):\n        continue\n    \
             lo, hi = (int(x, 16) for x in f[0].split('-'))\n    at = lo\n    while at < hi:\n        \
             p = libc.memmem(at, hi - at, needle, len(needle))\n        if not p:\n            break\n        \
             if p != own:\n                found.append(hex(p))\n        at = p + 1\n\
             def handle(req):\n    return 'found %s' % found\n",
            hex = "736b5f6c6976655f76696374696d5f6f6e6c79"
        ),
    );
    assert_eq!(d.req("GET", "/spy", b"").text(), "found []\n");
    assert_eq!(d.req("GET", "/payments", b"").text(), "paid\n");
}

#[test]
fn concurrent_invocations_cannot_read_each_others_folders() {
    if !have("landlock") {
        return;
    }
    let d = Daemon::start_unprivileged(&[]);
    d.upload(
        "spool",
        "import os, time\ndef handle(req):\n    t = os.environ['TMPDIR']\n    if req.startswith('victim'):\n        \
         open(os.path.join(t, 'upload.bin'), 'w').write(req)\n        time.sleep(2)\n        return 'kept'\n    \
         seen = []\n    parent = os.path.dirname(t)\n    try:\n        names = os.listdir(parent)\n    except OSError as e:\n        \
         names = [n for n in ('x%d' % i for i in range(200))]\n    for n in names:\n        p = os.path.join(parent, n, 'upload.bin')\n        \
         try:\n            seen.append(open(p).read())\n        except OSError:\n            pass\n    return 'seen %s' % seen\n",
    );
    let port = d.port;
    let victim =
        std::thread::spawn(move || http::request(port, "POST", "/spool", b"victim card=4111"));
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(d.req("POST", "/spool", b"snoop").text(), "seen []\n");
    assert_eq!(victim.join().unwrap().text(), "kept\n");
}
