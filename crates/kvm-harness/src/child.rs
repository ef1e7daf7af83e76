//! What must not happen in the test process itself: memory accesses that
//! are expected to kill the accessing process, and fd-creating ioctls under
//! an exhausted fd table.
//!
//! A guest_memfd mapping raises SIGBUS on pages the host may not touch, and
//! lowering `RLIMIT_NOFILE` would starve every other test. The runner
//! executes tests on threads of one process, so such work runs in a child
//! process instead, and the test asserts how the child ended.
//!
//! The child shares this process's memory and fd table (`CLONE_VM |
//! CLONE_FILES`) while the calling thread waits (`CLONE_VFORK`): it holds
//! no reference of its own to any file. A forked child would hold a copy of
//! every fd and mapping of the process, the other test threads' included,
//! until it exits; a file another thread closes and unmaps meanwhile (a
//! guest_memfd whose release a test observes: its memslots lose their
//! file) would live on. That let a model-test sequence see a guest_memfd
//! served several steps after its last mapping went, while a concurrent
//! test's child still held a copy of that mapping.

use std::fmt;

use nix::sys::signal::Signal;
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::Pid;

use crate::error::{Error, Result};
use crate::memory::HostMemory;

/// Bytes of stack a child runs on (it calls a few libc functions only).
const CHILD_STACK: usize = 64 << 10;

/// Runs `body(data)` in a child process that shares this process's memory
/// and fd table but has its own signal dispositions and resource limits
/// (no `CLONE_SIGHAND`, no `CLONE_THREAD`); this thread waits until the
/// child has exited (`CLONE_VFORK`), then reaps it. Returns how it ended.
///
/// # Safety
/// `body` must run only async-signal-safe code that neither allocates nor
/// unwinds: it runs on a small stack of its own, over this thread's
/// thread-local storage, in memory the other threads keep using. It ends
/// the child with `_exit()` or by returning the exit status. `data` must be
/// what `body` expects.
unsafe fn run_in_child<T>(
    what: &str,
    body: extern "C" fn(*mut libc::c_void) -> libc::c_int,
    data: &mut T,
) -> Result<ChildFate> {
    let mut stack = vec![0u8; CHILD_STACK];
    // 16-byte aligned, as x86-64 requires (the buffer's length is a multiple).
    let top = stack.as_mut_ptr().wrapping_add(stack.len() & !15);
    // SAFETY: the stack is ours and outlives the child (CLONE_VFORK returns
    // once it has exited); `data` lives until then too; the caller
    // guarantees what `body` does.
    let pid = unsafe {
        libc::clone(
            body,
            top.cast(),
            libc::CLONE_VM | libc::CLONE_FILES | libc::CLONE_VFORK | libc::SIGCHLD,
            std::ptr::from_mut(data).cast(),
        )
    };
    if pid < 0 {
        return Err(Error::Sys {
            op: format!("clone(CLONE_VM | CLONE_FILES | CLONE_VFORK) for {what}"),
            errno: nix::errno::Errno::last(),
        });
    }
    reap(Pid::from_raw(pid))
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
    /// Runs a child process that performs `access` on every byte of
    /// `[offset, offset + len)` of this mapping in ascending order, then
    /// exits with status 0. Returns how the child ended.
    ///
    /// The child shares this process's memory (see the module
    /// documentation): its stores, and the pages its accesses fault in, are
    /// this process's. The child dumps no core.
    pub fn access_in_child(&self, offset: u64, len: u64, access: Access) -> Result<ChildFate> {
        if offset.checked_add(len).is_none_or(|end| end > self.len()) {
            return Err(Error::Misuse(format!(
                "child access [{offset:#x}, +{len:#x}) outside a {:#x}-byte mapping",
                self.len()
            )));
        }
        let mut job = AccessJob { start: (self.addr() + offset) as *mut u8, len: len as usize, access };
        // SAFETY: access_child runs only async-signal-safe code (signal(),
        // setrlimit(), volatile accesses to a range checked above to lie in
        // this mapping, which lives while this thread waits, _exit()) and
        // never allocates or returns; it gets the AccessJob it expects.
        unsafe { run_in_child("a child access", access_child, &mut job) }
    }
}

/// What [`access_child`] does.
struct AccessJob {
    start: *mut u8,
    len: usize,
    access: Access,
}

/// The child of [`HostMemory::access_in_child`].
extern "C" fn access_child(data: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `data` is the AccessJob the parent passed, alive while it waits.
    let job = unsafe { &*data.cast::<AccessJob>() };
    // SAFETY: the range lies in a live mapping (checked by access_in_child)
    // and this is the child run_in_child started.
    unsafe { child_body(job.start, job.len, job.access) }
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
/// The child shares this process's memory (KVM serves VM ioctls only to the
/// VM's own mm) and fd table (an fd the kernel installs despite the limit
/// stays open in this process); the limit is the child's own.
///
/// # Safety
/// `arg` must be what `request` expects: an integer, or the address of a
/// live value of the request's struct.
pub(crate) unsafe fn ioctl_without_free_fds(op: &str, fd: i32, request: u64, arg: u64) -> Result<()> {
    let op = format!("{op} in a child with RLIMIT_NOFILE 0");
    let mut call = FdIoctl { fd, request, arg };
    // SAFETY: fd_ioctl_child runs only setrlimit and the ioctl (whose
    // argument the caller guarantees) and never allocates; it gets the
    // FdIoctl it expects.
    match unsafe { run_in_child(&op, fd_ioctl_child, &mut call) }? {
        ChildFate::Exited(0) => Ok(()),
        ChildFate::Exited(errno) => Err(Error::Sys { op, errno: nix::errno::Errno::from_raw(errno) }),
        // The child died before it could report: as a panicked thread, not
        // the guest's doing nor a failed call with an errno.
        ChildFate::Signaled(signal) => Err(Error::Panic {
            thread: format!("the child running {op}"),
            message: format!("killed by {}", signal.as_str()),
        }),
    }
}

/// The child's accesses: default fault dispositions, no core dump, the
/// accesses, `_exit(0)`.
///
/// # Safety
/// `[start, start + len)` must be a live mapping of this process; must only
/// be called in a child [`run_in_child`] started.
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
    // SAFETY: _exit skips atexit handlers and stdio flushing, as a child
    // sharing a multi-threaded process's memory must.
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

    /// An exclusive OFD lock on the whole of `fd` (held by its open file
    /// description until that is released), or the errno.
    fn ofd_lock(fd: std::os::fd::BorrowedFd<'_>) -> nix::Result<libc::c_int> {
        let whole = libc::flock {
            l_type: libc::F_WRLCK as libc::c_short,
            l_whence: libc::SEEK_SET as libc::c_short,
            l_start: 0,
            l_len: 0,
            l_pid: 0,
        };
        nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_OFD_SETLK(&whole))
    }

    /// The rule a test that watches a guest_memfd's release relies on: the
    /// child of one thread holds no reference to the files and mappings of
    /// the others, so a file another thread closes and unmaps while such a
    /// child runs is released at once. The release is seen through an OFD
    /// lock, which lives exactly as long as the open file description.
    #[test]
    fn a_running_child_holds_no_reference_to_the_files_of_the_process() {
        use std::os::fd::AsRawFd;
        use std::time::{Duration, Instant};

        let page = page_size();
        let watched = memfd_create(c"watched", MFdFlags::empty()).unwrap();
        nix::unistd::ftruncate(&watched, page as i64).unwrap();
        // A second open file description of the same inode, to probe the lock.
        let probe = nix::fcntl::open(
            format!("/proc/self/fd/{}", watched.as_raw_fd()).as_str(),
            nix::fcntl::OFlag::O_RDWR,
            nix::sys::stat::Mode::empty(),
        )
        .unwrap();
        ofd_lock(watched.as_fd()).unwrap();
        assert_eq!(ofd_lock(probe.as_fd()), Err(nix::errno::Errno::EAGAIN), "the lock is held");
        let mapping = HostMemory::map_fd(watched.as_fd(), 0, page, MapFlags::MAP_SHARED).unwrap();

        // A child that lives a while: its first store marks that it runs,
        // then it writes 16 MiB.
        let long = 16 << 20;
        let busy_fd = memfd_create(c"busy", MFdFlags::empty()).unwrap();
        nix::unistd::ftruncate(&busy_fd, long as i64).unwrap();
        let busy = HostMemory::map_fd(busy_fd.as_fd(), 0, long, MapFlags::MAP_SHARED).unwrap();
        std::thread::scope(|s| {
            let child = s.spawn(|| busy.access_in_child(0, long, Access::Write(0xa5)));
            let deadline = Instant::now() + Duration::from_secs(60);
            while busy.read_u64(0) & 0xff != 0xa5 {
                assert!(Instant::now() < deadline, "the child never started");
                std::thread::yield_now();
            }
            // The child runs; this thread drops the file's last references.
            drop(watched);
            drop(mapping);
            let released = ofd_lock(probe.as_fd());
            let fate = child.join().expect("the probing thread panicked").unwrap();
            assert_eq!(fate, ChildFate::Exited(0));
            assert_eq!(
                released,
                Ok(0),
                "the file closed and unmapped while another thread's child ran was released at once \
                 (its lock went with it)"
            );
        });
    }

    #[test]
    fn out_of_range_requests_are_refused_before_a_child_starts() {
        let (_fd, mem) = half_backed();
        assert!(matches!(mem.access_in_child(2 * page_size(), 1, Access::Read), Err(Error::Misuse(_))));
        assert_eq!(ChildFate::Signaled(Signal::SIGBUS).to_string(), "was killed by SIGBUS");
    }
}
