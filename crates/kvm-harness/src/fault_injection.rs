//! Systematic fault injection: `/proc/thread-self/fail-nth` makes the Nth
//! slab or page allocation of this thread fail (`CONFIG_FAILSLAB`,
//! `CONFIG_FAIL_PAGE_ALLOC`). Running one call with N = 1, 2, ... until it
//! reaches no Nth allocation visits every allocation failure the call can
//! meet, the error paths no ordinary test reaches.
//!
//! Only the one raw syscall under test may run while a fault is armed: any
//! other syscall (a `brk` from the allocator, a `write` of a message) could
//! take the fault instead. So the armed window is never handed to tests;
//! the harness's `*_failing_nth` operations build their request first, arm,
//! make the syscall, disarm, and only then interpret the result.

use std::fs::{File, OpenOptions};
use std::marker::PhantomData;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::OnceLock;

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
    /// Whether every armed failure happened (for [`Failing::Nth`]: the call
    /// reached the Nth allocation).
    pub injected: bool,
    /// How many allocations failed.
    pub failures: u32,
}

/// Which allocations of the call fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failing {
    /// The `n`th slab or page allocation (fail-nth), counted from 1.
    Nth(u32),
    /// The first `k` slab allocations, one after the other.
    FirstSlab(u32),
}

impl std::fmt::Display for Failing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Nth(n) => write!(f, "allocation {n} failing"),
            Self::FirstSlab(k) => write!(f, "the first {k} slab allocations failing"),
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
    pub(crate) fn around<R>(&self, failing: Failing, syscall: impl FnOnce() -> R) -> Result<Injected<R>> {
        match failing {
            Failing::Nth(n) => self.around_nth(n, syscall),
            Failing::FirstSlab(k) => self.around_first_slab(k, syscall),
        }
    }

    /// Runs `syscall` with this thread's `n`th allocation armed to fail,
    /// and disarms it afterwards if the syscall did not reach it.
    fn around_nth<R>(&self, n: u32, syscall: impl FnOnce() -> R) -> Result<Injected<R>> {
        let mut digits = [0u8; 10];
        let text = decimal(n, &mut digits);
        self.file.write_at(text, 0).map_err(|e| Error::Misuse(format!("arming {FAIL_NTH} with {n}: {e}")))?;
        let outcome = syscall();
        let mut back = [0u8; 16];
        let len = self.file.read_at(&mut back, 0).map_err(|e| Error::Misuse(format!("reading {FAIL_NTH}: {e}")))?;
        let left = std::str::from_utf8(&back[..len]).ok().and_then(|s| s.trim().parse::<u32>().ok());
        match left {
            Some(0) => Ok(Injected { outcome, injected: true, failures: 1 }),
            Some(_) => {
                self.file.write_at(b"0", 0).map_err(|e| Error::Misuse(format!("disarming {FAIL_NTH}: {e}")))?;
                Ok(Injected { outcome, injected: false, failures: 0 })
            }
            None => Err(Error::Misuse(format!("{FAIL_NTH} read back {:?}", &back[..len]))),
        }
    }
}

impl NthFault {
    /// Runs `syscall` with this thread's first `k` slab allocations failing,
    /// one after the other (failslab's `times`, limited to this thread by
    /// `task-filter` and `make-it-fail`). Reaches what one failure cannot:
    /// an allocation whose failure the kernel retries (the xarray's
    /// `GFP_NOWAIT` try, then its sleeping one). `injected` says whether all
    /// `k` failures were used; the syscall rules are those of [`Self::around`].
    fn around_first_slab<R>(&self, k: u32, syscall: impl FnOnce() -> R) -> Result<Injected<R>> {
        let knob = |name: &str, value: &str| {
            let path = Path::new(DEBUGFS).join("failslab").join(name);
            std::fs::write(&path, value)
                .map_err(|e| Error::Misuse(format!("writing {value} to {}: {e}", path.display())))
        };
        // The filter first: with it off, probability 100 would fail every task.
        knob("task-filter", "Y")?;
        knob("interval", "1")?;
        knob("times", &k.to_string())?;
        knob("probability", "100")?;
        let armed = self.make_it_fail.write_at(b"1", 0);
        let outcome = armed.is_ok().then(syscall);
        let disarmed = self.make_it_fail.write_at(b"0", 0);
        knob("probability", "0")?;
        armed.and(disarmed).map_err(|e| Error::Misuse(format!("writing {MAKE_IT_FAIL}: {e}")))?;
        let left = std::fs::read_to_string(Path::new(DEBUGFS).join("failslab/times"))
            .map_err(|e| Error::Misuse(format!("reading failslab/times: {e}")))?;
        let left: u32 = left.trim().parse().map_err(|_| Error::Misuse(format!("failslab/times reads {left:?}")))?;
        let outcome = outcome.ok_or_else(|| Error::Misuse("make-it-fail was not armed".into()))?;
        Ok(Injected { outcome, injected: left == 0, failures: k.saturating_sub(left) })
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
/// allocation (its `Ok(false)`), then with [`Failing::FirstSlab`] for
/// k = 1, 2, ... until the call no longer meets k failing allocations in a
/// row. Returns how many allocations the call made. More than `limit`
/// attempts in either walk is an error: the call never completed.
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
    walk(Failing::FirstSlab, &mut attempt)?;
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
            Ok(matches!(f, Failing::Nth(n) if n < 3) || f == Failing::FirstSlab(1))
        });
        assert_eq!(points.unwrap(), 2);
        let expected =
            [Failing::Nth(1), Failing::Nth(2), Failing::Nth(3), Failing::FirstSlab(1), Failing::FirstSlab(2)];
        assert_eq!(seen, expected);
        assert!(at_every_allocation(3, |_| Ok(true)).is_err());
    }
}
