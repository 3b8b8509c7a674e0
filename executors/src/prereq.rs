//! Start-up probes for what glommio needs from the kernel: io_uring and enough locked memory.
//!
//! glommio reports a missing prerequisite by failing deep inside executor construction (or, for
//! its `spawn`, by panicking on the new thread). Probing first lets the node exit with one line
//! that names the cause and the fix. Runs on the launching thread.

/// glommio refuses to build a reactor below this RLIMIT_MEMLOCK (see its `Reactor::new`).
pub const MIN_MEMLOCK_BYTES: u64 = 512 * 1024;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PrereqError {
    #[error(
        "io_uring is not available: the kernel has no io_uring support (ENOSYS); \
         a Linux kernel >= 5.8 is required"
    )]
    IoUringMissing,
    #[error(
        "io_uring is not permitted (EPERM): check sysctl kernel.io_uring_disabled (must be 0) \
         or, in a container, run with a seccomp profile that allows io_uring_setup, \
         io_uring_enter and io_uring_register (see deploy/seccomp-io-uring.json)"
    )]
    IoUringDenied,
    #[error(
        "io_uring setup failed for lack of locked memory (ENOMEM): raise the memlock limit \
         (ulimit -l, or docker --ulimit memlock=-1)"
    )]
    IoUringNoMemory,
    #[error("io_uring setup failed: {0}")]
    IoUringOther(String),
    #[error(
        "locked memory limit is {limit_bytes} bytes, glommio needs at least {needed_bytes}: \
         raise it with `ulimit -l unlimited` (or docker --ulimit memlock=-1)"
    )]
    MemlockTooLow { limit_bytes: u64, needed_bytes: u64 },
}

/// Checks io_uring and RLIMIT_MEMLOCK; the error's text is meant to be printed as is.
pub fn check_prerequisites() -> Result<(), PrereqError> {
    probe_io_uring()?;
    let limit_bytes = memlock_limit_bytes();
    if limit_bytes < MIN_MEMLOCK_BYTES {
        return Err(PrereqError::MemlockTooLow {
            limit_bytes,
            needed_bytes: MIN_MEMLOCK_BYTES,
        });
    }
    Ok(())
}

fn memlock_limit_bytes() -> u64 {
    let mut rlim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes into the struct we pass.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut rlim) };
    if rc != 0 {
        return 0;
    }
    if rlim.rlim_cur == libc::RLIM_INFINITY {
        u64::MAX
    } else {
        rlim.rlim_cur
    }
}

fn probe_io_uring() -> Result<(), PrereqError> {
    // struct io_uring_params is 120 bytes; the kernel fills it in, we only need the fd.
    let mut params = [0u8; 120];
    // SAFETY: io_uring_setup reads and writes `params`, which is large enough, and returns a
    // new fd or -1; nothing else is touched.
    let fd = unsafe { libc::syscall(libc::SYS_io_uring_setup, 4u32, params.as_mut_ptr()) };
    if fd >= 0 {
        // SAFETY: fd is the ring we just created and own.
        unsafe { libc::close(fd as libc::c_int) };
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    Err(match err.raw_os_error() {
        Some(libc::ENOSYS) => PrereqError::IoUringMissing,
        Some(libc::EPERM) | Some(libc::EACCES) => PrereqError::IoUringDenied,
        Some(libc::ENOMEM) => PrereqError::IoUringNoMemory,
        _ => PrereqError::IoUringOther(err.to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_machine_has_io_uring() {
        // The project's tests and CI run where io_uring works; if this fails, the message is
        // the one the node would print.
        probe_io_uring().unwrap();
    }

    #[test]
    fn messages_name_the_fix() {
        assert!(PrereqError::IoUringDenied
            .to_string()
            .contains("kernel.io_uring_disabled"));
        let low = PrereqError::MemlockTooLow {
            limit_bytes: 65536,
            needed_bytes: MIN_MEMLOCK_BYTES,
        };
        assert!(low.to_string().contains("ulimit -l"));
    }
}
