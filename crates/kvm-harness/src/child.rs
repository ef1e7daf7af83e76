//! What must not happen in the test process itself: memory accesses that
//! are expected to kill the accessing process, and fd-creating ioctls under
//! an exhausted fd table.
//!
//! A guest_memfd mapping raises SIGBUS on pages the host may not touch, and
//! lowering `RLIMIT_NOFILE` would starve every other test. The runner
//! executes tests on threads of one process, so such work runs in a child
//! process instead, and the test asserts how the child ended.

use std::fmt;

use nix::sys::signal::Signal;
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{fork, ForkResult, Pid};

use crate::error::{Error, Result, SysResult};
use crate::memory::HostMemory;

/// Held shared by every forked child's lifetime (fork to reaping), and
/// exclusively by [`without_forked_children`].
static CHILDREN: std::sync::RwLock<()> = std::sync::RwLock::new(());

/// Runs `f` while no child of [`HostMemory::access_in_child`] (or of the
/// fd-exhaustion ioctls) exists.
///
/// A child gets a copy of every fd and mapping of the process, the other
/// test threads' included, and holds those files open until it exits. A
/// test that closes a file and then observes its release (a guest_memfd's
/// `release` unbinding its memslots) closes it here, so no child of a
/// concurrent test keeps it alive a moment longer.
pub fn without_forked_children<R>(f: impl FnOnce() -> R) -> R {
    let _no_children = CHILDREN.write().unwrap_or_else(|e| e.into_inner());
    f()
}

/// What the child does to each byte of the range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// A volatile one-byte load.
    Read,
    /// A volatile one-byte store of the value (like `memset`).
    Write(u8),
}

impl fmt::Display for Access {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Read => f.write_str("read"),
            Self::Write(v) => write!(f, "write of {v:#04x}"),
        }
    }
}

/// How a child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChildFate {
    /// `_exit(status)`: 0 means every access completed.
    Exited(i32),
    /// Killed by a signal.
    Signaled(Signal),
}

impl fmt::Display for ChildFate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Exited(0) => f.write_str("completed every access (exit status 0)"),
            Self::Exited(status) => write!(f, "exited with status {status}"),
            Self::Signaled(signal) => write!(f, "was killed by {}", signal.as_str()),
        }
    }
}

impl HostMemory {
    /// Forks; the child performs `access` on every byte of
    /// `[offset, offset + len)` of this mapping in ascending order, then
    /// exits with status 0. Returns how the child ended.
    ///
    /// Stores that complete before a fault stay visible to the parent when
    /// the mapping is shared (`MAP_SHARED`). The child dumps no core.
    pub fn access_in_child(&self, offset: u64, len: u64, access: Access) -> Result<ChildFate> {
        if offset.checked_add(len).is_none_or(|end| end > self.len()) {
            return Err(Error::Misuse(format!(
                "child access [{offset:#x}, +{len:#x}) outside a {:#x}-byte mapping",
                self.len()
            )));
        }
        let start = (self.addr() + offset) as *mut u8;
        let len = len as usize;
        let _child_lifetime = CHILDREN.read().unwrap_or_else(|e| e.into_inner());
        // SAFETY: the child runs only async-signal-safe code (signal(),
        // setrlimit(), volatile accesses to a range checked above to lie in
        // this live mapping, _exit()) and never returns into Rust code or
        // allocates, so the other threads' locks copied by fork() are never
        // touched.
        match unsafe { fork() }.sys(|| "fork()".to_string())? {
            ForkResult::Child => {
                // SAFETY: see above; this process only touches the mapping and exits.
                unsafe { child_body(start, len, access) }
            }
            ForkResult::Parent { child } => reap(child),
        }
    }
}

/// Waits for `child` to end and says how it did.
fn reap(child: Pid) -> Result<ChildFate> {
    loop {
        match waitpid(child, None) {
            Ok(WaitStatus::Exited(_, status)) => return Ok(ChildFate::Exited(status)),
            Ok(WaitStatus::Signaled(_, signal, _)) => return Ok(ChildFate::Signaled(signal)),
            Ok(_) | Err(nix::errno::Errno::EINTR) => continue,
            Err(errno) => return Err(Error::Sys { op: format!("waitpid({child})"), errno }),
        }
    }
}

/// An fd-creating ioctl for [`ioctl_without_free_fds`]'s child.
#[repr(C)]
struct FdIoctl {
    fd: i32,
    request: u64,
    arg: u64,
}

/// The child: no fd may be installed, then the ioctl; its errno (0: success)
/// is the exit status.
extern "C" fn fd_ioctl_child(data: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `data` is the FdIoctl the parent passed, alive while it waits.
    let call = unsafe { &*data.cast::<FdIoctl>() };
    let none = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: setrlimit reads the struct we pass; the limit is this child's own.
    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &none) };
    // SAFETY: the caller of ioctl_without_free_fds guarantees `arg` suits `request`.
    let ret = unsafe { libc::ioctl(call.fd, call.request as _, call.arg as libc::c_ulong) };
    if ret >= 0 {
        0
    } else {
        nix::errno::Errno::last_raw()
    }
}

/// Runs the fd-creating `ioctl(fd, request, arg)` in a child whose
/// `RLIMIT_NOFILE` is 0, so the kernel cannot install the new fd: `Ok(())`
/// if it succeeded anyway, else the errno, as an [`Error::Sys`] naming `op`.
///
/// The child shares this process's memory (`CLONE_VM`, as KVM serves VM
/// ioctls only to the VM's own mm) but has its own fd table and limits;
/// `CLONE_VFORK` suspends this thread until it exits.
///
/// # Safety
/// `arg` must be what `request` expects: an integer, or the address of a
/// live value of the request's struct.
pub(crate) unsafe fn ioctl_without_free_fds(op: &str, fd: i32, request: u64, arg: u64) -> Result<()> {
    let op = format!("{op} in a child with RLIMIT_NOFILE 0");
    // The child copies the fd table: it counts as a forked child.
    let _child = CHILDREN.read().unwrap_or_else(|e| e.into_inner());
    let mut call = FdIoctl { fd, request, arg };
    let mut stack = vec![0u8; 64 << 10];
    // 16-byte aligned, as x86-64 requires (the buffer's length is a multiple).
    let top = stack.as_mut_ptr().wrapping_add(stack.len() & !15);
    // SAFETY: the stack is ours and outlives the child (CLONE_VFORK returns
    // once it has exited); `call` lives until then too. The child runs only
    // setrlimit and the ioctl and never allocates.
    let pid = unsafe {
        libc::clone(
            fd_ioctl_child,
            top.cast(),
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            std::ptr::from_mut(&mut call).cast(),
        )
    };
    if pid < 0 {
        return Err(Error::Sys { op: "clone(CLONE_VM | CLONE_VFORK)".into(), errno: nix::errno::Errno::last() });
    }
    match reap(Pid::from_raw(pid))? {
        ChildFate::Exited(0) => Ok(()),
        ChildFate::Exited(errno) => Err(Error::Sys { op, errno: nix::errno::Errno::from_raw(errno) }),
        ChildFate::Signaled(signal) => Err(Error::Guest(format!("{op}: the child was killed by {}", signal.as_str()))),
    }
}

/// The forked child: default fault dispositions, no core dump, the accesses, `_exit(0)`.
///
/// # Safety
/// `[start, start + len)` must be a live mapping of this process; must only
/// be called in a freshly forked child.
unsafe fn child_body(start: *mut u8, len: usize, access: Access) -> ! {
    for signal in [libc::SIGBUS, libc::SIGSEGV] {
        // SAFETY: restoring the default disposition is a plain syscall; the
        // runtime's fault handlers must not intercept the fault we observe.
        unsafe { libc::signal(signal, libc::SIG_DFL) };
    }
    let no_core = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: setrlimit reads the struct we pass and nothing else.
    unsafe { libc::setrlimit(libc::RLIMIT_CORE, &no_core) };
    for i in 0..len {
        // SAFETY: the caller guarantees the range lies in a live mapping; a
        // fault on it ends this process, which is what is being observed.
        let byte = unsafe { start.add(i) };
        match access {
            // SAFETY: as above; volatile so every byte is really accessed.
            Access::Read => drop(unsafe { std::ptr::read_volatile(byte) }),
            // SAFETY: as above.
            Access::Write(value) => unsafe { std::ptr::write_volatile(byte, value) },
        }
    }
    // SAFETY: _exit skips atexit handlers and stdio flushing, as a forked
    // child of a multi-threaded process must.
    unsafe { libc::_exit(0) }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use nix::sys::memfd::{memfd_create, MFdFlags};
    use nix::sys::mman::MapFlags;

    use super::*;
    use crate::memory::page_size;

    /// A shared mapping of two pages of a memfd that is only one page long.
    fn half_backed() -> (std::os::fd::OwnedFd, HostMemory) {
        let fd = memfd_create(c"child-test", MFdFlags::empty()).unwrap();
        nix::unistd::ftruncate(&fd, page_size() as i64).unwrap();
        let mem = HostMemory::map_fd(fd.as_fd(), 0, 2 * page_size(), MapFlags::MAP_SHARED).unwrap();
        (fd, mem)
    }

    #[test]
    fn accesses_inside_the_file_complete_and_stores_are_shared() {
        let (_fd, mem) = half_backed();
        assert_eq!(mem.access_in_child(0, page_size(), Access::Write(0x5a)).unwrap(), ChildFate::Exited(0));
        assert_eq!(mem.access_in_child(0, page_size(), Access::Read).unwrap(), ChildFate::Exited(0));
        assert_eq!(mem.read_u64(page_size() - 8), 0x5a5a_5a5a_5a5a_5a5a);
    }

    #[test]
    fn access_past_the_file_kills_the_child_with_sigbus() {
        let (_fd, mem) = half_backed();
        let sigbus = ChildFate::Signaled(Signal::SIGBUS);
        assert_eq!(mem.access_in_child(page_size(), 1, Access::Read).unwrap(), sigbus);
        // A store sweep faults at the first unbacked byte; earlier stores stay.
        assert_eq!(mem.access_in_child(0, 2 * page_size(), Access::Write(0xa5)).unwrap(), sigbus);
        assert_eq!(mem.read_u64(0), 0xa5a5_a5a5_a5a5_a5a5);
    }

    #[test]
    fn out_of_range_requests_are_refused_before_forking() {
        let (_fd, mem) = half_backed();
        assert!(matches!(mem.access_in_child(2 * page_size(), 1, Access::Read), Err(Error::Misuse(_))));
        assert_eq!(ChildFate::Signaled(Signal::SIGBUS).to_string(), "was killed by SIGBUS");
    }
}
