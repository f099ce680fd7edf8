//! The one thing std and rustix cannot do safely for us: arranging a child's
//! file descriptors between fork and exec. This is the only module with `unsafe`.
#![allow(unsafe_code)] // reason: `CommandExt::pre_exec` is unsafe by definition; the closure below is async-signal-safe

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
