//! The few Linux system calls std does not wrap, each behind a safe function.
//! This is the only module allowed `unsafe`.
#![allow(unsafe_code)] // reason: thin wrappers over libc calls std lacks; each checked below

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

fn check(ret: libc::c_long) -> io::Result<()> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Sends SIGKILL to every process in group `pgid`; a group already gone is fine.
pub fn kill_group(pgid: u32) -> io::Result<()> {
    match libc::pid_t::try_from(pgid) {
        // Negative: the whole group. pgid > 0, so it never means "every process".
        Ok(pgid) if pgid > 0 => sigkill(-pgid),
        _ => Ok(()),
    }
}

/// Sends SIGKILL to one process; one already gone is fine.
pub fn kill(pid: u32) -> io::Result<()> {
    match libc::pid_t::try_from(pid) {
        Ok(pid) if pid > 0 => sigkill(pid),
        _ => Ok(()),
    }
}

fn sigkill(target: libc::pid_t) -> io::Result<()> {
    // SAFETY: kill(2) only sends a signal; callers never pass 0 or -1.
    let ret = unsafe { libc::kill(target, libc::SIGKILL) };
    match check(ret.into()) {
        Err(e) if e.raw_os_error() == Some(libc::ESRCH) => Ok(()),
        other => other,
    }
}

/// Blocks until child `pid` has exited, leaving it unreaped, so its pid (and
/// process group id) cannot be reused before the caller has killed the group.
pub fn wait_exited_unreaped(pid: u32) -> io::Result<()> {
    let id = libc::id_t::from(pid);
    loop {
        // SAFETY: siginfo_t is plain data; waitid(2) writes into it and nothing else.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: valid pointer to a live siginfo_t; WNOWAIT leaves the child for std to reap.
        let ret =
            unsafe { libc::waitid(libc::P_PID, id, &mut info, libc::WEXITED | libc::WNOWAIT) };
        match check(ret.into()) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

/// Reaps `pid` if it is an exited child of ours; true when it was reaped.
pub fn reap(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    let mut status = 0;
    // SAFETY: waitpid(2) for one specific pid, writing only into `status`.
    unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) == pid }
}

/// Makes orphaned descendants of the daemon its children, so it can reap and kill them.
pub fn become_subreaper() -> io::Result<()> {
    // SAFETY: prctl(2) PR_SET_CHILD_SUBREAPER takes a plain integer argument.
    let ret = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1 as libc::c_ulong, 0, 0, 0) };
    check(ret.into())
}

/// Atomically swaps two directory entries (renameat2 RENAME_EXCHANGE).
/// Fails with EINVAL on file systems that cannot do it.
pub fn rename_exchange(a: &Path, b: &Path) -> io::Result<()> {
    const RENAME_EXCHANGE: libc::c_uint = 2;
    let a = CString::new(a.as_os_str().as_bytes())?;
    let b = CString::new(b.as_os_str().as_bytes())?;
    // SAFETY: both paths are NUL-terminated C strings that outlive the call.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            RENAME_EXCHANGE,
        )
    };
    check(ret)
}

/// A connected pair of SOCK_SEQPACKET Unix sockets (message boundaries kept,
/// EOF when the peer exits), close-on-exec.
pub fn seqpacket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: socketpair(2) writes two fds into the array we own.
    let ret = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    check(ret.into())?;
    // SAFETY: both fds were just created and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Sends one message on a Unix socket with `fds` attached (SCM_RIGHTS).
pub fn send_with_fds(sock: BorrowedFd<'_>, data: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    let raw: Vec<libc::c_int> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let fd_bytes = std::mem::size_of_val(raw.as_slice());
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE(fd_bytes as libc::c_uint) } as usize;
    // u64 words keep the control buffer aligned for cmsghdr.
    let mut control = vec![0u64; space.div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: msghdr is plain data; every pointer set below outlives the sendmsg call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
    msg.msg_controllen = space as _;
    // SAFETY: the control buffer holds CMSG_SPACE(fd_bytes) bytes, so the first header
    // and its data fit; CMSG_FIRSTHDR/CMSG_DATA only compute addresses inside it.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(fd_bytes as libc::c_uint) as _;
        std::ptr::copy_nonoverlapping(raw.as_ptr() as *const u8, libc::CMSG_DATA(cmsg), fd_bytes);
    }
    loop {
        // SAFETY: msg points at live buffers; MSG_NOSIGNAL turns a dead peer into EPIPE.
        let ret = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        match check(ret as libc::c_long) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
            Ok(()) if ret as usize == data.len() => return Ok(()),
            Ok(()) => return Err(io::Error::new(io::ErrorKind::WriteZero, "short sendmsg")),
        }
    }
}

/// Ignores SIGXFSZ, so a write past a file-size limit fails with EFBIG (answered
/// 507) instead of killing the daemon.
pub fn ignore_sigxfsz() {
    // SAFETY: setting a signal's disposition to SIG_IGN installs no handler code.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
}
