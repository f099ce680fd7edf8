//! The envelope around every function process, built from what the kernel
//! offers an unprivileged process: Landlock (files; signal and abstract-socket
//! scoping from ABI 6), `no_new_privs`, a seccomp filter, rlimits, and
//! (in the runner) an undumpable process per request. Probed once at start-up;
//! `EDGEFAAS_SANDBOX=strict` refuses to start without Landlock and seccomp.
//!
//! Layers, each narrower than the one it sits in:
//! base (the daemon applies it before exec: read the system, the interpreter,
//! every function and the runner; write the tmp root) ->
//! zygote (the zygote applies the ruleset the daemon sends it, before importing
//! the handler: read only its own folder, its secrets and the runner; write its
//! tmp folder) -> child (the runner: write only its own invocation's folder).
//! Exec mode gets the zygote's layer, for its own invocation folder, before exec.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::Command;

use landlock::{
    ABI, Access, AccessFs, CompatLevel, Compatible, Ruleset, RulesetAttr, RulesetCreatedAttr,
    Scope, path_beneath_rules,
};

/// How much confinement to insist on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    /// Refuse to start unless Landlock and seccomp both work.
    Strict,
    /// Use whatever the kernel has; say at start-up what is missing.
    BestEffort,
    /// No confinement (the function's own memory and timeout settings still apply).
    Off,
}

impl std::str::FromStr for Level {
    type Err = ();
    fn from_str(s: &str) -> Result<Level, ()> {
        match s {
            "strict" => Ok(Level::Strict),
            "best-effort" => Ok(Level::BestEffort),
            "off" => Ok(Level::Off),
            _ => Err(()),
        }
    }
}

/// What the interpreter told about itself at start-up.
#[derive(Clone, Debug, Default)]
pub struct Interpreter {
    pub version: String,
    pub executable: PathBuf,
    /// Its installation: prefixes and every `sys.path` folder.
    pub roots: Vec<PathBuf>,
    /// `ctypes` imports (the runner needs it to confine itself further).
    pub ctypes: bool,
    /// The kernel's Landlock ABI (0: none), as the interpreter's `syscall` saw it.
    pub landlock_abi: i32,
}

/// The probe the interpreter runs at start-up (with `-s -c`).
pub const PROBE: &str = r#"
import os, sys
print("version", sys.version.split()[0])
print("executable", os.path.realpath(sys.executable))
for p in [sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix] + sys.path:
    if p and os.path.isdir(p):
        print("root", os.path.realpath(p))
try:
    import ctypes
    abi = ctypes.CDLL(None, use_errno=True).syscall(444, None, 0, 1)
    print("ctypes yes")
    print("landlock", abi if abi > 0 else 0)
except Exception as e:
    print("ctypes no", e)
"#;

impl Interpreter {
    /// Reads the probe's output.
    pub fn parse(out: &str) -> Interpreter {
        let mut i = Interpreter::default();
        for line in out.lines() {
            let (k, v) = line.split_once(' ').unwrap_or((line, ""));
            match k {
                "version" => i.version = v.to_string(),
                "executable" => i.executable = PathBuf::from(v),
                "root" => {
                    let p = PathBuf::from(v);
                    if !i.roots.contains(&p) {
                        i.roots.push(p);
                    }
                }
                "ctypes" => i.ctypes = v == "yes",
                "landlock" => i.landlock_abi = v.trim().parse().unwrap_or(0),
                _ => {}
            }
        }
        i
    }
}

/// Runs `python` on `code` (with `-s -c`), confined by `confine` if given; its
/// stdout, or why it failed. Bounded at 30 s.
fn run_python(
    python: &str,
    code: &str,
    confine: Option<&dyn Fn(&mut Command)>,
) -> Result<String, String> {
    use std::io::Read;
    let mut cmd = Command::new(python);
    cmd.args(["-s", "-c", code])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("EDGEFAAS_") {
            cmd.env_remove(key);
        }
    }
    if let Some(c) = confine {
        c(&mut cmd);
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {python}: {e}"))?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("{python} did not finish a 30 s probe"));
            }
        }
    };
    let (mut out, mut err) = (String::new(), String::new());
    if let Some(mut o) = child.stdout.take() {
        let _ = o.read_to_string(&mut out);
    }
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    if status.success() {
        Ok(out)
    } else {
        let why = err
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("");
        Err(format!("{python} failed ({status}): {why}"))
    }
}

/// Asks the interpreter what it is (start-up: a bad `EDGEFAAS_PYTHON` stops here).
pub fn probe(python: &str) -> Result<Interpreter, String> {
    let i = Interpreter::parse(&run_python(python, PROBE, None)?);
    if i.version.is_empty() {
        return Err(format!("{python} did not say what it is"));
    }
    Ok(i)
}

impl Sandbox {
    /// Checks that the interpreter starts inside the sandbox (and cannot write
    /// the functions dir); in best-effort, drops what the kernel refuses, seccomp
    /// first, and says so. Strict refuses to go on without all of it.
    pub fn verify(mut self, python: &str) -> Result<Sandbox, String> {
        if self.off() {
            return Ok(self);
        }
        let probe_file = self.functions_dir.join(".sandbox-probe");
        let code = format!(
            "import os\ntry:\n    open({:?}, 'w')\nexcept PermissionError:\n    print('confined')\nelse:\n    os.unlink({:?})\n    print('open')\n",
            probe_file.to_string_lossy(),
            probe_file.to_string_lossy()
        );
        loop {
            let me = &self;
            let confine = |cmd: &mut Command| {
                me.confine(cmd, me.base_ruleset(), Limits::default(), false);
            };
            let tried = run_python(python, &code, Some(&confine));
            let _ = std::fs::remove_file(&probe_file);
            let why = match tried {
                Ok(out) if out.trim() == "confined" || self.landlock == 0 => return Ok(self),
                Ok(_) => "Landlock did not stop a write to the functions dir".to_string(),
                Err(e) => e,
            };
            if self.level == Level::Strict {
                return Err(format!(
                    "EDGEFAAS_SANDBOX=strict: the interpreter cannot run confined: {why}"
                ));
            }
            if self.seccomp {
                log::warn!(
                    "the interpreter cannot run under the seccomp filter ({why}); going on without it"
                );
                self.without_seccomp();
            } else if self.landlock > 0 {
                log::warn!(
                    "the interpreter cannot run under Landlock ({why}); going on without it"
                );
                self.without_landlock();
            } else {
                return Err(format!("the interpreter cannot run confined: {why}"));
            }
        }
    }
}

/// Folders every function process may read (and run programs from), where they exist.
const SYSTEM_READ: &[&str] = &[
    "/usr",
    "/lib",
    "/lib64",
    "/lib32",
    "/bin",
    "/sbin",
    "/etc",
    "/proc",
    "/sys/devices/system/cpu",
    "/run/systemd/resolve",
    "/run/resolvconf",
];
/// Device files every function process may read and write.
const DEVICES: &[&str] = &[
    "/dev/null",
    "/dev/zero",
    "/dev/full",
    "/dev/urandom",
    "/dev/random",
];

/// Where things are, for the rules.
#[derive(Clone, Copy)]
pub struct Places<'a> {
    pub functions_dir: &'a Path,
    /// The runner's folder.
    pub runtime_dir: &'a Path,
    pub secrets_dir: Option<&'a Path>,
    /// Where invocation folders are made.
    pub tmp_root: &'a Path,
    /// More paths no function may read (the token file).
    pub private: &'a [PathBuf],
}

/// What is on: found at start-up, fixed for the daemon's life.
#[derive(Clone, Debug)]
pub struct Sandbox {
    pub level: Level,
    /// Landlock ABI in use (0: none).
    pub landlock: i32,
    /// The seccomp filter is installed in every function process.
    pub seccomp: bool,
    /// The runner can confine each child further (ctypes present).
    pub runner_layers: bool,
    read_roots: Vec<PathBuf>,
    functions_dir: PathBuf,
    runtime_dir: PathBuf,
    secrets_dir: Option<PathBuf>,
    pub tmp_root: PathBuf,
    filter: Vec<libc::sock_filter>,
    /// RLIMIT_NPROC for function processes (see `Tasks`).
    pub tasks: Option<Tasks>,
    /// Roots that contain the functions, the secrets or the tmp root: reads there
    /// cannot be confined to one function.
    pub overlaps: Vec<PathBuf>,
}

/// How the tasks the daemon's user may have (`RLIMIT_NPROC`, or the pids limit
/// of its cgroup, whichever is lower) are shared. The limit counts every
/// process and thread of the user, so the daemon keeps room for its threads;
/// zygotes and the base may go a little further than a request's processes,
/// so a fork bomb in one request stops while zygotes can still fork spares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tasks {
    /// What the user may have in all (the daemon's own limit).
    pub total: u64,
    /// RLIMIT_NPROC of the base and the zygotes.
    pub zygotes: u64,
    /// RLIMIT_NPROC of a request's processes.
    pub children: u64,
}

impl Tasks {
    /// Splits `total`, keeping `daemon` tasks (threads) for the daemon.
    pub fn split(total: u64, daemon: u64) -> Tasks {
        let zygotes = total - daemon.min(total / 2);
        let children = zygotes - 32.min(zygotes / 4);
        Tasks {
            total,
            zygotes,
            children,
        }
    }

    /// The limit that applies now: RLIMIT_NPROC, or the pids limit of the
    /// daemon's cgroup when that is lower (`None`: unlimited).
    pub fn limit() -> Option<u64> {
        let nproc = rustix::process::getrlimit(rustix::process::Resource::Nproc).current;
        [nproc, cgroup_pids_max()].into_iter().flatten().min()
    }
}

/// The pids limit of the daemon's own cgroup (v2, or v1's pids controller).
fn cgroup_pids_max() -> Option<u64> {
    let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let mut limits = Vec::new();
    for line in own.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let base = match controllers {
            "" => PathBuf::from("/sys/fs/cgroup"),
            c if c.split(',').any(|c| c == "pids") => PathBuf::from("/sys/fs/cgroup/pids"),
            _ => continue,
        };
        // The own cgroup and each ancestor visible in the mount.
        let mut dir = base.join(path.trim_start_matches('/'));
        while dir.starts_with(&base) {
            if let Ok(text) = std::fs::read_to_string(dir.join("pids.max")) {
                if let Ok(n) = text.trim().parse::<u64>() {
                    limits.push(n);
                }
            }
            if !dir.pop() {
                break;
            }
        }
    }
    limits.into_iter().min()
}

/// The rlimits a function process starts with.
#[derive(Clone, Copy, Debug, Default)]
pub struct Limits {
    /// RLIMIT_AS, bytes.
    pub memory: Option<u64>,
    /// RLIMIT_CPU, seconds (exec mode; fork mode sets it per child).
    pub cpu: Option<u64>,
}

const ABI_WANTED: ABI = ABI::V6;

impl Sandbox {
    /// The sandbox for this kernel and interpreter (not yet verified: see
    /// `verify`); `daemon_tasks` is how many threads the daemon may need.
    pub fn new(
        level: Level,
        interp: &Interpreter,
        places: &Places<'_>,
        daemon_tasks: u64,
    ) -> Sandbox {
        let Places {
            functions_dir,
            runtime_dir,
            secrets_dir,
            tmp_root,
            private,
        } = *places;
        let mut read_roots: Vec<PathBuf> = SYSTEM_READ
            .iter()
            .map(PathBuf::from)
            .chain(interp.roots.iter().cloned())
            .chain(interp.executable.parent().map(Path::to_path_buf))
            .filter(|p| p.exists())
            .filter_map(|p| p.canonicalize().ok())
            .collect();
        read_roots.sort();
        read_roots.dedup();
        let private: Vec<PathBuf> = [Some(functions_dir), secrets_dir, Some(tmp_root)]
            .into_iter()
            .flatten()
            .map(Path::to_path_buf)
            .chain(private.iter().filter_map(|p| p.canonicalize().ok()))
            .collect();
        let overlaps = read_roots
            .iter()
            .filter(|r| private.iter().any(|p| p.starts_with(r)))
            .cloned()
            .collect();
        let on = level != Level::Off;
        Sandbox {
            level,
            landlock: if on { interp.landlock_abi } else { 0 },
            seccomp: on,
            runner_layers: on && interp.ctypes,
            read_roots,
            functions_dir: functions_dir.to_path_buf(),
            runtime_dir: runtime_dir.to_path_buf(),
            secrets_dir: secrets_dir.map(Path::to_path_buf),
            tmp_root: tmp_root.to_path_buf(),
            filter: if on {
                seccomp_filter(std::process::id())
            } else {
                Vec::new()
            },
            tasks: if on {
                Some(Tasks::split(
                    Tasks::limit().unwrap_or(UNLIMITED_TASKS),
                    daemon_tasks,
                ))
            } else {
                None
            },
            overlaps,
        }
    }

    /// True when nothing is confined.
    pub fn off(&self) -> bool {
        self.level == Level::Off
    }

    /// Turns seccomp off (the kernel refused the filter).
    pub fn without_seccomp(&mut self) {
        self.seccomp = false;
    }

    /// Turns Landlock off (the kernel refused it, or the interpreter cannot start under it).
    pub fn without_landlock(&mut self) {
        self.landlock = 0;
    }

    /// Each protection and whether it is on (for `/_/metrics`).
    pub fn features(&self) -> Vec<(&'static str, bool)> {
        let on = !self.off();
        vec![
            ("landlock", self.landlock > 0),
            ("landlock_scoping", self.landlock >= 6),
            ("seccomp", self.seccomp),
            ("no_new_privs", on),
            ("undumpable_children", self.runner_layers),
            ("rlimits", on),
            ("nproc_split", self.tasks.is_some()),
            ("cgroups", false),
        ]
    }

    /// One line for the start-up log: what is on, what is missing.
    pub fn report(&self) -> String {
        if self.off() {
            return "off (EDGEFAAS_SANDBOX=off): functions are not confined".into();
        }
        let mut on = Vec::new();
        let mut missing = Vec::new();
        match self.landlock {
            0 => missing.push(
                "landlock (files: functions can read and write each other and the runner)"
                    .to_string(),
            ),
            abi if abi < 6 => {
                on.push(format!("landlock ABI {abi} (files)"));
                missing.push(
                    "landlock signal scoping (ABI 6, Linux 6.12: functions can signal each other)"
                        .into(),
                );
            }
            abi => on.push(format!(
                "landlock ABI {abi} (files, signals, abstract sockets)"
            )),
        }
        if self.seccomp {
            on.push("seccomp".into());
        } else {
            missing.push("seccomp (ptrace and process_vm_* are not refused)".into());
        }
        on.push("no_new_privs".into());
        on.push("rlimits".into());
        if self.runner_layers {
            on.push("undumpable children, per-invocation folders".into());
        } else {
            missing.push("ctypes in the interpreter (children stay dumpable)".into());
        }
        missing.push("cgroup v2 per-function pids and memory limits (not used)".into());
        for o in &self.overlaps {
            missing.push(format!(
                "privacy of function folders, secrets and the token file: every function may read {}, which holds one of them",
                o.display()
            ));
        }
        format!(
            "{} with {}; missing: {}",
            match self.level {
                Level::Strict => "strict",
                _ => "best-effort",
            },
            on.join(", "),
            missing.join("; ")
        )
    }

    /// Whether strict mode can run: Landlock, seccomp, and no shared read roots.
    pub fn strict_ok(&self) -> Result<(), String> {
        if self.level != Level::Strict {
            return Ok(());
        }
        let mut why = Vec::new();
        if self.landlock == 0 {
            why.push("Landlock is not available on this kernel".to_string());
        } else if self.landlock < 6 {
            // Without scoping, kill() on one of the daemon's thread ids cannot be told
            // from a function's own child by any filter.
            why.push(format!(
                "Landlock ABI {} has no signal scoping (ABI 6, Linux 6.12)",
                self.landlock
            ));
        }
        if !self.seccomp {
            why.push("seccomp filters are not available".into());
        }
        if !self.runner_layers {
            why.push("the interpreter has no ctypes".into());
        }
        if !self.overlaps.is_empty() {
            why.push("a folder every function may read holds the functions dir, the secrets or the token file".into());
        }
        if why.is_empty() {
            Ok(())
        } else {
            Err(format!("EDGEFAAS_SANDBOX=strict: {}", why.join("; ")))
        }
    }

    /// The folder an invocation of `name` may write (its own subfolders are per invocation).
    pub fn tmp_dir(&self, name: &str) -> PathBuf {
        self.tmp_root.join(name)
    }

    /// A ruleset, or `None` without Landlock: reads under `read`, everything under `write`.
    fn ruleset(&self, read: &[PathBuf], write: &[PathBuf]) -> Option<OwnedFd> {
        if self.landlock == 0 {
            return None;
        }
        let abi = ABI_WANTED;
        let build = || -> Result<Option<OwnedFd>, landlock::RulesetError> {
            let created = Ruleset::default()
                .set_compatibility(CompatLevel::BestEffort)
                .handle_access(AccessFs::from_all(abi))?
                .scope(Scope::Signal | Scope::AbstractUnixSocket)?
                .create()?
                .add_rules(path_beneath_rules(
                    read.iter().filter(|p| p.exists()),
                    AccessFs::from_read(abi),
                ))?
                .add_rules(path_beneath_rules(
                    DEVICES.iter().filter(|p| Path::new(p).exists()),
                    AccessFs::from_read(abi) | AccessFs::WriteFile,
                ))?
                .add_rules(path_beneath_rules(
                    write.iter().filter(|p| p.exists()),
                    AccessFs::from_all(abi),
                ))?;
            Ok(created.into())
        };
        match build() {
            Ok(fd) => fd,
            Err(e) => {
                log::warn!("cannot build a Landlock ruleset: {e}");
                None
            }
        }
    }

    /// The base process's layer: every function and secret readable, the tmp root writable.
    pub fn base_ruleset(&self) -> Option<OwnedFd> {
        let mut read = self.read_roots.clone();
        read.push(self.functions_dir.clone());
        read.extend(self.secrets_dir.clone());
        self.ruleset(&read, std::slice::from_ref(&self.tmp_root))
    }

    /// The folder every function may read that holds `path`, if any (with Landlock).
    pub fn exposes(&self, path: &Path) -> Option<PathBuf> {
        if self.off() || self.landlock == 0 {
            return None;
        }
        let path = path.canonicalize().ok()?;
        self.read_roots
            .iter()
            .find(|r| path.starts_with(r))
            .cloned()
    }

    /// One function's layer (zygote, or an exec-mode request): its own folder, its
    /// secrets and the runner readable; `write` (its tmp folder) writable.
    pub fn function_ruleset(&self, dir: &Path, name: &str, write: &Path) -> Option<OwnedFd> {
        let mut read = self.read_roots.clone();
        read.push(self.runtime_dir.clone());
        read.push(dir.to_path_buf());
        if let Some(s) = &self.secrets_dir {
            read.push(s.join(name));
        }
        self.ruleset(&read, &[write.to_path_buf()])
    }

    /// RLIMIT_NPROC for a request's processes.
    pub fn child_nproc(&self) -> Option<u64> {
        self.tasks.map(|t| t.children)
    }

    /// A request's own layer in fork mode (the child enters it on receiving the
    /// request): what its zygote may read, but of the invocation folders only its
    /// own (read and write), and signals and abstract sockets only among its own
    /// processes. `None` without Landlock or without the runner's layers.
    pub fn child_ruleset(&self, dir: &Path, name: &str, folder: &Path) -> Option<OwnedFd> {
        if self.landlock == 0 || !self.runner_layers {
            return None;
        }
        self.function_ruleset(dir, name, folder)
    }

    /// Confines a command before it execs: oom score, rlimits, no_new_privs, the
    /// Landlock `ruleset`, the seccomp filter. `child`: it runs one request
    /// (exec mode), else it is the base.
    pub fn confine(
        &self,
        cmd: &mut Command,
        ruleset: Option<OwnedFd>,
        limits: Limits,
        child: bool,
    ) {
        if self.off() {
            crate::sys::confine(
                cmd,
                crate::sys::Confinement {
                    memory: limits.memory,
                    cpu: limits.cpu,
                    ..Default::default()
                },
            );
            return;
        }
        crate::sys::confine(
            cmd,
            crate::sys::Confinement {
                oom_score_adj: true,
                no_new_privs: true,
                landlock: ruleset,
                filter: if self.seccomp {
                    Some(self.filter.clone())
                } else {
                    None
                },
                memory: limits.memory,
                cpu: limits.cpu,
                nproc: self
                    .tasks
                    .map(|t| if child { t.children } else { t.zygotes }),
                nofile: Some(1024),
                core: true,
            },
        );
    }
}

/// What the function processes share when neither RLIMIT_NPROC nor a pids limit bounds the user.
const UNLIMITED_TASKS: u64 = 4096;

/// Syscalls no function needs, refused with EPERM: tracing and reading other
/// processes, kernel modules and keys, mounts and namespaces, BPF, perf, and a
/// signal to the daemon (by pid, by its group, or to everyone).
fn seccomp_filter(daemon: u32) -> Vec<libc::sock_filter> {
    use libc::{BPF_ABS, BPF_JEQ, BPF_JMP, BPF_K, BPF_LD, BPF_RET, BPF_W};
    let stmt = |code: u32, k: u32| libc::sock_filter {
        code: code as u16,
        jt: 0,
        jf: 0,
        k,
    };
    let jump = |k: u32, jt: u8, jf: u8| libc::sock_filter {
        code: (BPF_JMP | BPF_JEQ | BPF_K) as u16,
        jt,
        jf,
        k,
    };
    const NR: u32 = 0;
    const ARCH: u32 = 4;
    const ARG0_LOW: u32 = 16;
    const ARG1_LOW: u32 = 24;
    const ARG1_HIGH: u32 = 28;
    let deny = libc::SECCOMP_RET_ERRNO | libc::EPERM as u32;
    let allow = libc::SECCOMP_RET_ALLOW;
    let mut f = vec![
        stmt(BPF_LD | BPF_W | BPF_ABS, ARCH),
        jump(AUDIT_ARCH, 1, 0),
        stmt(BPF_RET | BPF_K, libc::SECCOMP_RET_KILL_PROCESS),
        stmt(BPF_LD | BPF_W | BPF_ABS, NR),
    ];
    #[cfg(target_arch = "x86_64")]
    {
        // x32 system calls reach the same kernel through other numbers: none of them.
        f.push(libc::sock_filter {
            code: (BPF_JMP | libc::BPF_JGE | BPF_K) as u16,
            jt: 0,
            jf: 1,
            k: 0x4000_0000,
        });
        f.push(stmt(BPF_RET | BPF_K, deny));
    }
    for nr in DENIED {
        f.push(jump(*nr as u32, 0, 1));
        f.push(stmt(BPF_RET | BPF_K, deny));
    }
    // utimensat with a path (argument 1) changes another file's times; with none,
    // the open file's (os.utime on a descriptor).
    f.push(jump(libc::SYS_utimensat as u32, 0, 5));
    f.push(stmt(BPF_LD | BPF_W | BPF_ABS, ARG1_LOW));
    f.push(jump(0, 0, 2));
    f.push(stmt(BPF_LD | BPF_W | BPF_ABS, ARG1_HIGH));
    f.push(jump(0, 1, 0));
    f.push(stmt(BPF_RET | BPF_K, deny));
    f.push(stmt(BPF_LD | BPF_W | BPF_ABS, NR));
    // clone3 passes its flags in memory, out of a filter's reach: ENOSYS makes the
    // C library fall back to clone, whose flags (argument 0) are checked.
    f.push(jump(SYS_CLONE3 as u32, 0, 1));
    f.push(stmt(
        BPF_RET | BPF_K,
        libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32,
    ));
    f.push(jump(libc::SYS_clone as u32, 0, 3));
    f.push(stmt(BPF_LD | BPF_W | BPF_ABS, ARG0_LOW));
    f.push(libc::sock_filter {
        code: (BPF_JMP | libc::BPF_JSET | BPF_K) as u16,
        jt: 0,
        jf: 1,
        k: CLONE_REFUSED,
    });
    f.push(stmt(BPF_RET | BPF_K, deny));
    f.push(stmt(BPF_LD | BPF_W | BPF_ABS, NR));
    // Calls refused for some values of one argument: the block loads it and
    // denies on a match, else allows.
    let mut refuse_values = |nr: libc::c_long, offset: u32, values: &[u32]| {
        let n = values.len() as u8;
        // Not this call: skip the block (load, checks, allow, deny) to the reload.
        f.push(jump(nr as u32, 0, n + 3));
        f.push(stmt(BPF_LD | BPF_W | BPF_ABS, offset));
        for (i, v) in values.iter().enumerate() {
            // A match: jump past the remaining checks and the allow, to the deny.
            f.push(jump(*v, n - i as u8, 0));
        }
        f.push(stmt(BPF_RET | BPF_K, allow));
        f.push(stmt(BPF_RET | BPF_K, deny));
        f.push(stmt(BPF_LD | BPF_W | BPF_ABS, NR));
    };
    // Signals: argument 0 is the pid (the daemon, its group, or everyone).
    for nr in SIGNALLING {
        refuse_values(*nr, ARG0_LOW, &[daemon, daemon.wrapping_neg(), u32::MAX]);
    }
    // fcntl: asking for SIGIO (or another signal) to be sent to a pid, e.g. the daemon's.
    let signal_owner = [libc::F_SETOWN as u32, F_SETOWN_EX, F_SETSIG];
    refuse_values(libc::SYS_fcntl, ARG1_LOW, &signal_owner);
    #[cfg(target_arch = "arm")]
    refuse_values(libc::SYS_fcntl64, ARG1_LOW, &signal_owner);
    f.push(stmt(BPF_RET | BPF_K, allow));
    f
}

/// fcntl commands (the same on every Linux architecture; libc lacks them for musl).
const F_SETSIG: u32 = 10;
const F_SETOWN_EX: u32 = 15;

/// clone3's number, the same on every architecture.
const SYS_CLONE3: libc::c_long = 435;

/// clone flags no function needs: a child of its parent's parent (out of reach of
/// the zygote's and the daemon's kills), and new namespaces.
const CLONE_REFUSED: u32 = (libc::CLONE_PARENT
    | libc::CLONE_NEWNS
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUSER
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET
    | libc::CLONE_NEWCGROUP) as u32;

#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH: u32 = 0xC000_003E;
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH: u32 = 0xC000_00B7;
#[cfg(target_arch = "arm")]
const AUDIT_ARCH: u32 = 0x4000_0028;

/// Refused outright.
const DENIED: &[libc::c_long] = &[
    libc::SYS_ptrace,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
    libc::SYS_process_madvise,
    libc::SYS_kcmp,
    libc::SYS_kexec_load,
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_bpf,
    libc::SYS_perf_event_open,
    libc::SYS_userfaultfd,
    libc::SYS_keyctl,
    libc::SYS_add_key,
    libc::SYS_request_key,
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_pivot_root,
    libc::SYS_swapon,
    libc::SYS_swapoff,
    libc::SYS_reboot,
    libc::SYS_setns,
    libc::SYS_unshare,
    libc::SYS_acct,
    libc::SYS_quotactl,
    libc::SYS_syslog,
    libc::SYS_vhangup,
    libc::SYS_open_by_handle_at,
    libc::SYS_name_to_handle_at,
    libc::SYS_fanotify_init,
    libc::SYS_fsopen,
    libc::SYS_fsmount,
    libc::SYS_fspick,
    libc::SYS_move_mount,
    libc::SYS_open_tree,
    // tkill takes a thread id, which no filter can tell from the daemon's threads.
    libc::SYS_tkill,
    // Signals through a pidfd (also a /proc/<pid> directory fd) or with a payload.
    libc::SYS_pidfd_send_signal,
    libc::SYS_rt_sigqueueinfo,
    libc::SYS_rt_tgsigqueueinfo,
    // Listening: a function could take the daemon's port on the other address
    // family (or after a restart) and read the operator's token.
    libc::SYS_listen,
    // POSIX ACLs rewrite modes as chmod would; extended attributes by path.
    libc::SYS_setxattr,
    libc::SYS_lsetxattr,
    libc::SYS_removexattr,
    libc::SYS_lremovexattr,
    SETXATTRAT,
    REMOVEXATTRAT,
    // io_uring runs system calls the filter never sees.
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
    // Modes, owners, times and lengths by path: Landlock does not guard them
    // (truncate before ABI 3), so another function's files could be made
    // unreadable or emptied. Through an open file (fchmod, ftruncate) they stay.
    libc::SYS_fchmodat,
    FCHMODAT2,
    libc::SYS_fchownat,
    libc::SYS_truncate,
    #[cfg(not(target_arch = "aarch64"))]
    libc::SYS_chmod,
    #[cfg(not(target_arch = "aarch64"))]
    libc::SYS_chown,
    #[cfg(not(target_arch = "aarch64"))]
    libc::SYS_lchown,
    #[cfg(not(target_arch = "aarch64"))]
    libc::SYS_utimes,
    #[cfg(not(target_arch = "aarch64"))]
    libc::SYS_futimesat,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_utime,
    #[cfg(target_arch = "arm")]
    libc::SYS_chown32,
    #[cfg(target_arch = "arm")]
    libc::SYS_lchown32,
    #[cfg(target_arch = "arm")]
    libc::SYS_truncate64,
    #[cfg(target_arch = "arm")]
    UTIMENSAT_TIME64,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_iopl,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_ioperm,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_modify_ldt,
    #[cfg(not(target_arch = "arm"))]
    KEXEC_FILE_LOAD,
];

/// kexec_file_load (libc names it for musl on x86_64 only).
#[cfg(target_arch = "x86_64")]
const KEXEC_FILE_LOAD: libc::c_long = 320;
#[cfg(target_arch = "aarch64")]
const KEXEC_FILE_LOAD: libc::c_long = 294;

/// setxattrat and removexattrat (Linux 6.13), the same numbers on every architecture.
const SETXATTRAT: libc::c_long = 463;
const REMOVEXATTRAT: libc::c_long = 466;

/// fchmodat2 (Linux 6.6), the same number on every architecture.
const FCHMODAT2: libc::c_long = 452;
/// utimensat_time64 on 32-bit architectures (refused whatever its arguments:
/// 32-bit C libraries use it for futimens too, which then falls back to utimensat).
#[cfg(target_arch = "arm")]
const UTIMENSAT_TIME64: libc::c_long = 412;

/// Allowed unless argument 0 (a pid) is the daemon, its group, or everyone.
const SIGNALLING: &[libc::c_long] = &[libc::SYS_kill, libc::SYS_tgkill, libc::SYS_pidfd_open];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_probe_is_parsed() {
        let i = Interpreter::parse(
            "version 3.11.2\nexecutable /usr/bin/python3.11\nroot /usr\nroot /usr/lib/python3.11\nroot /usr\nctypes yes\nlandlock 7\n",
        );
        assert_eq!(i.version, "3.11.2");
        assert_eq!(i.roots.len(), 2);
        assert!(i.ctypes);
        assert_eq!(i.landlock_abi, 7);
    }

    #[test]
    fn a_path_root_over_the_functions_is_reported() {
        let i = Interpreter {
            roots: vec![PathBuf::from("/tmp")],
            ctypes: true,
            landlock_abi: 6,
            ..Default::default()
        };
        let places = Places {
            functions_dir: Path::new("/tmp/x/function"),
            runtime_dir: Path::new("/tmp/x/function/.runtime"),
            secrets_dir: None,
            tmp_root: Path::new("/tmp/t"),
            private: &[],
        };
        let s = Sandbox::new(Level::Strict, &i, &places, 40);
        assert!(!s.overlaps.is_empty());
        assert!(s.strict_ok().is_err());
    }

    #[test]
    fn tasks_keep_room_for_the_daemon_and_the_zygotes() {
        let t = Tasks::split(1000, 150);
        assert_eq!((t.zygotes, t.children), (850, 818));
        // A tight limit still leaves the daemon half and the zygotes a quarter.
        let t = Tasks::split(100, 150);
        assert_eq!((t.zygotes, t.children), (50, 38));
    }

    /// Runs a classic BPF program (the subset the filter uses) on one seccomp_data.
    fn run(f: &[libc::sock_filter], nr: i64, arch: u32, arg0: u64) -> u32 {
        let mut data = [0u8; 64];
        data[0..4].copy_from_slice(&(nr as i32).to_le_bytes());
        data[4..8].copy_from_slice(&arch.to_le_bytes());
        data[16..24].copy_from_slice(&arg0.to_le_bytes());
        run_data(f, &data)
    }

    fn run_data(f: &[libc::sock_filter], data: &[u8; 64]) -> u32 {
        let (mut a, mut pc) = (0u32, 0usize);
        loop {
            let ins = &f[pc];
            let code = ins.code as u32;
            match code & 0x07 {
                0x00 => {
                    let k = ins.k as usize;
                    a = u32::from_le_bytes(data[k..k + 4].try_into().unwrap());
                    pc += 1;
                }
                0x05 => {
                    let hit = match code & 0xf0 {
                        libc::BPF_JEQ => a == ins.k,
                        libc::BPF_JGE => a >= ins.k,
                        libc::BPF_JSET => a & ins.k != 0,
                        other => panic!("jump {other:x}"),
                    };
                    pc += 1 + if hit { ins.jt } else { ins.jf } as usize;
                }
                0x06 => return ins.k,
                other => panic!("class {other:x}"),
            }
        }
    }

    #[test]
    fn the_filter_refuses_what_it_should_and_nothing_else() {
        let daemon = 4242u32;
        let f = seccomp_filter(daemon);
        assert!(f.len() < 4096);
        let deny = libc::SECCOMP_RET_ERRNO | libc::EPERM as u32;
        let allow = libc::SECCOMP_RET_ALLOW;
        let kill = |pid: i64| run(&f, libc::SYS_kill, AUDIT_ARCH, pid as u64);
        assert_eq!(kill(daemon as i64), deny);
        assert_eq!(kill(-(daemon as i64)), deny);
        assert_eq!(kill(-1), deny);
        assert_eq!(kill(4243), allow);
        assert_eq!(kill(0), allow);
        assert_eq!(run(&f, libc::SYS_tgkill, AUDIT_ARCH, daemon as u64), deny);
        assert_eq!(run(&f, libc::SYS_tgkill, AUDIT_ARCH, 77), allow);
        assert_eq!(
            run(&f, libc::SYS_pidfd_open, AUDIT_ARCH, daemon as u64),
            deny
        );
        assert_eq!(run(&f, libc::SYS_pidfd_open, AUDIT_ARCH, 99), allow);
        for nr in DENIED {
            assert_eq!(run(&f, *nr, AUDIT_ARCH, 0), deny, "{nr}");
        }
        // utimensat: by path refused, on an open file (path NULL) allowed.
        let utimensat = |path: u64| {
            let mut data = [0u8; 64];
            data[0..4].copy_from_slice(&(libc::SYS_utimensat as i32).to_le_bytes());
            data[4..8].copy_from_slice(&AUDIT_ARCH.to_le_bytes());
            data[24..32].copy_from_slice(&path.to_le_bytes());
            run_data(&f, &data)
        };
        assert_eq!(utimensat(0), allow);
        // clone: a fork or a thread, yes; CLONE_PARENT or a namespace, no; clone3: ENOSYS.
        let clone = |flags: i32| run(&f, libc::SYS_clone, AUDIT_ARCH, flags as u64);
        assert_eq!(
            clone(libc::SIGCHLD | libc::CLONE_CHILD_SETTID | libc::CLONE_CHILD_CLEARTID),
            allow
        );
        assert_eq!(
            clone(
                libc::CLONE_VM
                    | libc::CLONE_FS
                    | libc::CLONE_FILES
                    | libc::CLONE_SIGHAND
                    | libc::CLONE_THREAD
            ),
            allow
        );
        assert_eq!(clone(libc::CLONE_PARENT | libc::SIGCHLD), deny);
        assert_eq!(clone(libc::CLONE_NEWUSER | libc::CLONE_NEWPID), deny);
        assert_eq!(
            run(&f, SYS_CLONE3, AUDIT_ARCH, 0),
            libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32
        );
        // fcntl: F_SETFL yes, F_SETOWN no.
        let fcntl = |cmd: i32| {
            let mut data = [0u8; 64];
            data[0..4].copy_from_slice(&(libc::SYS_fcntl as i32).to_le_bytes());
            data[4..8].copy_from_slice(&AUDIT_ARCH.to_le_bytes());
            data[24..32].copy_from_slice(&(cmd as u64).to_le_bytes());
            run_data(&f, &data)
        };
        assert_eq!(fcntl(libc::F_SETFL), allow);
        assert_eq!(fcntl(libc::F_SETOWN), deny);
        assert_eq!(fcntl(F_SETSIG as i32), deny);
        assert_eq!(fcntl(F_SETOWN_EX as i32), deny);
        assert_eq!(utimensat(0x7fff_0000), deny);
        assert_eq!(utimensat(0x1_0000_0000), deny);
        for nr in [
            libc::SYS_read,
            libc::SYS_write,
            libc::SYS_clone,
            libc::SYS_exit_group,
            libc::SYS_fchmod,
            libc::SYS_ftruncate,
        ] {
            assert_eq!(run(&f, nr, AUDIT_ARCH, daemon as u64), allow, "{nr}");
        }
        assert_eq!(
            run(&f, libc::SYS_read, 0x1234, 0),
            libc::SECCOMP_RET_KILL_PROCESS
        );
    }
}
