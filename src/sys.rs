//! What std and rustix cannot do safely for us: arranging a child between fork
//! and exec (its fd 3; its rlimits, no_new_privs, Landlock restriction and
//! seccomp filter). This is the only module with `unsafe`.
#![allow(unsafe_code)] // reason: `CommandExt::pre_exec` is unsafe by definition; the closures below are async-signal-safe

use std::os::fd::{AsRawFd, OwnedFd};
use std::process::Command;

/// Makes `fd` the child's descriptor number `target` (without close-on-exec).
/// `fd` stays open in the parent until `cmd` is dropped.
pub fn pass_fd_as(cmd: &mut Command, fd: OwnedFd, target: i32) {
    use std::os::unix::process::CommandExt;
    let raw = fd.as_raw_fd();
    // SAFETY: between fork and exec the closure calls only dup2(2) and fcntl(2),
    // which are async-signal-safe, and allocates nothing. `fd` is moved into the
    // closure, so it is open in the parent for as long as `cmd` can spawn.
    unsafe {
        cmd.pre_exec(move || {
            let _keep = &fd;
            if raw == target {
                // dup2 onto itself keeps close-on-exec; clear it instead.
                if libc::fcntl(raw, libc::F_SETFD, 0) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
            } else if libc::dup2(raw, target) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// What to apply to a child between fork and exec.
#[derive(Default)]
pub struct Confinement {
    /// Make it the kernel's first choice when memory runs out (oom_score_adj 1000).
    pub oom_score_adj: bool,
    pub no_new_privs: bool,
    /// A Landlock ruleset to restrict itself to.
    pub landlock: Option<OwnedFd>,
    /// A seccomp BPF program to install.
    pub filter: Option<Vec<libc::sock_filter>>,
    /// RLIMIT_AS, bytes.
    pub memory: Option<u64>,
    /// RLIMIT_CPU, seconds.
    pub cpu: Option<u64>,
    /// RLIMIT_NPROC.
    pub nproc: Option<u64>,
    /// RLIMIT_NOFILE (lowered only).
    pub nofile: Option<u64>,
    /// RLIMIT_CORE 0.
    pub core: bool,
}

/// Applies `c` in the child of `cmd` before it execs; a step the kernel refuses
/// fails the spawn with that error (so a caller can tell what is missing).
pub fn confine(cmd: &mut Command, c: Confinement) {
    use std::os::unix::process::CommandExt;
    let ruleset = c.landlock.as_ref().map(|fd| fd.as_raw_fd());
    // SAFETY: between fork and exec the closure makes only async-signal-safe calls
    // (open, write, close, setrlimit, getrlimit, prctl, syscall) on values prepared
    // before the fork, and allocates nothing. `c` is moved into the closure, so the
    // ruleset fd and the filter program it points at live as long as `cmd`.
    unsafe {
        cmd.pre_exec(move || {
            let _keep = &c;
            if c.oom_score_adj {
                let fd = libc::open(
                    c"/proc/self/oom_score_adj".as_ptr(),
                    libc::O_WRONLY | libc::O_CLOEXEC,
                );
                if fd >= 0 {
                    libc::write(fd, b"1000".as_ptr() as *const libc::c_void, 4);
                    libc::close(fd);
                }
            }
            let set = |res, soft: u64, hard: Option<u64>| -> std::io::Result<()> {
                let mut cur = libc::rlimit {
                    rlim_cur: 0,
                    rlim_max: 0,
                };
                libc::getrlimit(res, &mut cur);
                let max = hard
                    .map_or(cur.rlim_max, |h| h as libc::rlim_t)
                    .min(cur.rlim_max);
                let lim = libc::rlimit {
                    rlim_cur: (soft as libc::rlim_t).min(max),
                    rlim_max: max,
                };
                if libc::setrlimit(res, &lim) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            };
            if c.core {
                set(libc::RLIMIT_CORE, 0, Some(0))?;
            }
            if let Some(n) = c.nofile {
                set(libc::RLIMIT_NOFILE, n, Some(n))?;
            }
            if let Some(n) = c.nproc {
                set(libc::RLIMIT_NPROC, n, Some(n))?;
            }
            if let Some(m) = c.memory {
                set(libc::RLIMIT_AS, m, Some(m))?;
            }
            if let Some(s) = c.cpu {
                // SIGXCPU at the soft limit, SIGKILL a second later.
                set(libc::RLIMIT_CPU, s, Some(s + 1))?;
            }
            if c.no_new_privs && libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            if let Some(fd) = ruleset {
                if libc::syscall(libc::SYS_landlock_restrict_self, fd, 0) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if let Some(f) = &c.filter {
                let prog = libc::sock_fprog {
                    len: f.len() as libc::c_ushort,
                    filter: f.as_ptr() as *mut libc::sock_filter,
                };
                if libc::prctl(
                    libc::PR_SET_SECCOMP,
                    libc::SECCOMP_MODE_FILTER,
                    &prog as *const libc::sock_fprog,
                ) == -1
                {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

/// Marks every descriptor this process inherited (3 and up) close-on-exec, so
/// none of them reaches a function process.
pub fn cloexec_inherited() {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    let fds: Vec<i32> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|&fd| fd > 2)
        .collect();
    for fd in fds {
        // SAFETY: fcntl(F_GETFD/F_SETFD) on a number only reads and sets the
        // descriptor's flags; a number that is not (or no longer) open fails with
        // EBADF, which is ignored. Nothing is closed or dereferenced.
        unsafe {
            let flags = libc::fcntl(fd, libc::F_GETFD);
            if flags >= 0 && flags & libc::FD_CLOEXEC == 0 {
                libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC);
            }
        }
    }
}
