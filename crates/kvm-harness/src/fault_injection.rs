//! Systematic fault injection: `/proc/thread-self/fail-nth` makes the Nth
//! slab or page allocation of this thread fail (`CONFIG_FAILSLAB`,
//! `CONFIG_FAIL_PAGE_ALLOC`). Running one call with N = 1, 2, ... until it
//! reaches no Nth allocation visits every allocation failure the call can
//! meet, the error paths no ordinary test reaches.
//!
//! Only the one raw syscall under test may run while a fault is armed: any
//! other syscall (a `brk` from the allocator, a `write` of a message) could
//! take the fault instead. So the armed window is never handed to tests;
//! the harness's `*_failing` operations build their request first, arm,
//! make the syscall, disarm, and only then interpret the result.

use std::fs::{File, OpenOptions};
use std::marker::PhantomData;
use std::os::fd::RawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::OnceLock;

use nix::errno::Errno;

use crate::error::{Error, Result};

const FAIL_NTH: &str = "/proc/thread-self/fail-nth";
const MAKE_IT_FAIL: &str = "/proc/thread-self/make-it-fail";
const DEBUGFS: &str = "/sys/kernel/debug";

/// The failslab / fail_page_alloc settings that let fail-nth hit the
/// allocations KVM makes: by default both skip allocations that may sleep
/// (GFP_KERNEL, nearly all of them), highmem, and order-0 pages. Their
/// probability stays 0, so they change nothing for threads without fail-nth.
const KNOBS: &[(&str, &str)] = &[
    ("failslab/ignore-gfp-wait", "N"),
    ("failslab/verbose", "0"),
    ("fail_page_alloc/ignore-gfp-wait", "N"),
    ("fail_page_alloc/ignore-gfp-highmem", "N"),
    ("fail_page_alloc/min-order", "0"),
    ("fail_page_alloc/verbose", "0"),
];

/// Whether this kernel can inject allocation failures per thread: `Err`
/// names the missing option and what the kernel showed, for a skip.
pub fn availability() -> std::result::Result<(), String> {
    if !Path::new(FAIL_NTH).exists() {
        return Err(format!("needs CONFIG_FAULT_INJECTION: {FAIL_NTH} does not exist"));
    }
    for dir in ["failslab", "fail_page_alloc"] {
        let path = Path::new(DEBUGFS).join(dir);
        if !path.is_dir() {
            return Err(format!(
                "needs CONFIG_FAILSLAB, CONFIG_FAIL_PAGE_ALLOC and CONFIG_FAULT_INJECTION_DEBUG_FS with debugfs \
                 mounted: {} does not exist",
                path.display()
            ));
        }
    }
    Ok(())
}

/// Writes [`KNOBS`] once per process.
fn configure() -> Result<()> {
    static DONE: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    DONE.get_or_init(|| {
        KNOBS.iter().try_for_each(|(knob, value)| {
            let path = Path::new(DEBUGFS).join(knob);
            std::fs::write(&path, value).map_err(|e| format!("writing {value} to {}: {e}", path.display()))
        })
    })
    .clone()
    .map_err(Error::Misuse)
}

/// The outcome of a call made with the Nth allocation armed to fail.
#[derive(Debug)]
pub struct Injected<T> {
    /// What the call returned.
    pub outcome: T,
    /// Whether the call reached the Nth allocation (which then failed).
    pub injected: bool,
}

impl<T> Injected<T> {
    /// The same injection with `f` applied to the outcome.
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Injected<U> {
        Injected { outcome: f(self.outcome), injected: self.injected }
    }
}

/// Which allocations of the call fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failing {
    /// The `n`th slab or page allocation (fail-nth), counted from 1.
    Nth(u32),
    /// The `nth` allocation and the `then` slab allocations right after it
    /// (one more when the Nth is a page allocation: failslab's budget of
    /// `then + 1` is then untouched by it). Reaches what one failure cannot,
    /// an allocation whose failure the kernel retries (the xarray's
    /// `GFP_NOWAIT` try, then a sleeping one).
    Run {
        /// Where the run starts, counted from 1.
        nth: u32,
        /// How many slab allocations after it fail too.
        then: u32,
    },
}

impl std::fmt::Display for Failing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Nth(n) => write!(f, "allocation {n} failing"),
            Self::Run { nth, then } => write!(f, "allocation {nth} and the {then} slab allocations after it failing"),
        }
    }
}

/// This thread's fail-nth file. Not `Send`: the count belongs to the thread
/// that opened it.
#[derive(Debug)]
pub struct NthFault {
    file: File,
    make_it_fail: File,
    _this_thread: PhantomData<*const ()>,
}

impl NthFault {
    /// Opens this thread's fail-nth and configures the injectors.
    pub fn for_this_thread() -> Result<Self> {
        availability().map_err(Error::Misuse)?;
        configure()?;
        let open = |path: &str| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .open(path)
                .map_err(|e| Error::Misuse(format!("opening {path}: {e}")))
        };
        Ok(Self { file: open(FAIL_NTH)?, make_it_fail: open(MAKE_IT_FAIL)?, _this_thread: PhantomData })
    }

    /// Runs `syscall` with `failing` armed, and disarms it afterwards.
    ///
    /// `syscall` must make exactly one system call and must not allocate.
    /// The run after the Nth allocation comes from failslab's `times` at
    /// probability 100, limited to this thread by `task-filter` and
    /// `make-it-fail`: while fail-nth counts down, the kernel skips those
    /// checks, so the run starts exactly after the Nth allocation.
    pub(crate) fn around<R>(&self, failing: Failing, syscall: impl FnOnce() -> R) -> Result<Injected<R>> {
        let (n, then) = match failing {
            Failing::Nth(n) => (n, 0),
            Failing::Run { nth, then } => (nth, then),
        };
        if then > 0 {
            // The filter first: with it off, probability 100 would fail every task.
            // A slab Nth allocation also takes one of failslab's `times`.
            let times = (then + 1).to_string();
            for (knob, value) in [("task-filter", "Y"), ("interval", "1"), ("times", &times)] {
                slab_knob(knob, value)?;
            }
            slab_knob("probability", "100")?;
        }
        let mut digits = [0u8; 10];
        let armed = self.file.write_at(decimal(n, &mut digits), 0);
        let filtered = if then > 0 { self.make_it_fail.write_at(b"1", 0) } else { Ok(1) };
        let outcome = (armed.is_ok() && filtered.is_ok()).then(syscall);
        let unfiltered = if then > 0 { self.make_it_fail.write_at(b"0", 0) } else { Ok(1) };
        let mut back = [0u8; 16];
        let read = self.file.read_at(&mut back, 0);
        let disarmed = self.file.write_at(b"0", 0);
        if then > 0 {
            slab_knob("probability", "0")?;
        }
        armed
            .and(filtered)
            .and(unfiltered)
            .and(disarmed)
            .map_err(|e| Error::Misuse(format!("fault injection: {e}")))?;
        let len = read.map_err(|e| Error::Misuse(format!("reading {FAIL_NTH}: {e}")))?;
        let left = std::str::from_utf8(&back[..len]).ok().and_then(|s| s.trim().parse::<u32>().ok());
        let reached = left.ok_or_else(|| Error::Misuse(format!("{FAIL_NTH} read back {:?}", &back[..len])))? == 0;
        let outcome = outcome.ok_or_else(|| Error::Misuse("fault injection was not armed".into()))?;
        Ok(Injected { outcome, injected: reached })
    }
}

fn slab_knob(name: &str, value: &str) -> Result<()> {
    let path = Path::new(DEBUGFS).join("failslab").join(name);
    std::fs::write(&path, value).map_err(|e| Error::Misuse(format!("writing {value} to {}: {e}", path.display())))
}

impl NthFault {
    /// `ioctl(fd, request, arg)` for a request that returns a new fd, with
    /// `failing` armed: the fd, or the errno as an error naming `op()`.
    ///
    /// # Safety
    /// `request` must take its argument by value and touch no user memory.
    pub(crate) unsafe fn ioctl_returning_fd(
        &self,
        failing: Failing,
        fd: RawFd,
        request: u64,
        arg: u64,
        op: impl FnOnce() -> String,
    ) -> Result<Injected<Result<RawFd>>> {
        let call = self.around(failing, || {
            // SAFETY: the caller guarantees the request reads no memory.
            let ret = unsafe { libc::ioctl(fd, request as _, arg as libc::c_ulong) };
            (ret, Errno::last())
        })?;
        Ok(call.map(|(ret, errno)| if ret < 0 { Err(Error::Sys { op: op(), errno }) } else { Ok(ret) }))
    }
}

/// `n` in decimal, without allocating.
fn decimal(mut n: u32, buf: &mut [u8; 10]) -> &[u8] {
    let mut at = buf.len();
    loop {
        at -= 1;
        buf[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[at..];
        }
    }
}

/// Drives `attempt` through every allocation failure of one call: with
/// [`Failing::Nth`] for n = 1, 2, ... until an attempt reaches no Nth
/// allocation (its `Ok(false)`), then the same with two failures in a row
/// ([`Failing::Run`] of one more). Returns how many allocations the call
/// made. More than `limit` attempts in either walk is an error: the call
/// never completed.
pub fn at_every_allocation(limit: u32, mut attempt: impl FnMut(Failing) -> Result<bool>) -> Result<u32> {
    let walk = |failing: fn(u32) -> Failing, attempt: &mut dyn FnMut(Failing) -> Result<bool>| {
        for n in 1..=limit {
            if !attempt(failing(n))? {
                return Ok(n - 1);
            }
        }
        Err(Error::Misuse(format!("the call still met {} after {limit} attempts: no end to inject at", failing(limit))))
    };
    let points = walk(Failing::Nth, &mut attempt)?;
    walk(|nth| Failing::Run { nth, then: 1 }, &mut attempt)?;
    Ok(points)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_written_in_decimal() {
        let mut buf = [0u8; 10];
        assert_eq!(decimal(0, &mut buf), b"0");
        assert_eq!(decimal(7, &mut buf), b"7");
        assert_eq!(decimal(1234, &mut buf), b"1234");
        assert_eq!(decimal(u32::MAX, &mut buf), b"4294967295");
    }

    #[test]
    fn the_walks_stop_at_the_first_attempt_without_injection() {
        let mut seen = Vec::new();
        let points = at_every_allocation(10, |f| {
            seen.push(f);
            Ok(matches!(f, Failing::Nth(n) if n < 3) || f == Failing::Run { nth: 1, then: 1 })
        });
        assert_eq!(points.unwrap(), 2);
        let run = |nth| Failing::Run { nth, then: 1 };
        let expected = [Failing::Nth(1), Failing::Nth(2), Failing::Nth(3), run(1), run(2)];
        assert_eq!(seen, expected);
        assert!(at_every_allocation(3, |_| Ok(true)).is_err());
    }
}
