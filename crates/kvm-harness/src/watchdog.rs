//! Deadlines for `KVM_RUN`.
//!
//! A vCPU thread arms the watchdog before each `KVM_RUN`. When the deadline
//! passes, the watchdog thread sets the vCPU's `immediate_exit` (so a kick
//! that lands just before entry is not lost) and signals the thread, every
//! few milliseconds until the vCPU disarms: `KVM_RUN` then returns `EINTR`
//! and the harness reports a timeout naming the guest RIP.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, Once, OnceLock};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::task_state::TaskState;
use nix::unistd::Pid;

/// Environment variable overriding the per-run deadline, in seconds.
pub const TIMEOUT_ENV: &str = "KVM_SELFTESTS_TIMEOUT";
/// Deadline of one `KVM_RUN` when [`TIMEOUT_ENV`] is unset.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a fired watchdog re-kicks a vCPU that has not come out yet.
const REKICK: Duration = Duration::from_millis(5);
/// The signal used to kick vCPU threads out of `KVM_RUN` (also sent by
/// [`crate::signal_storm::SignalStorm`]).
pub(crate) const KICK_SIGNAL: libc::c_int = libc::SIGUSR1;

/// Parses a [`TIMEOUT_ENV`] value: positive, finite seconds.
pub(crate) fn parse_timeout(value: &str) -> Result<Duration> {
    let secs: f64 = value
        .trim()
        .parse()
        .map_err(|_| Error::Config(format!("{TIMEOUT_ENV}={value:?} is not a number of seconds")))?;
    if !secs.is_finite() || secs <= 0.0 || secs > 86_400.0 {
        return Err(Error::Config(format!("{TIMEOUT_ENV}={value:?} must be in (0, 86400] seconds")));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// The deadline from the environment (validated once; a bad value is an error).
pub fn configured_timeout() -> Result<Duration> {
    match std::env::var(TIMEOUT_ENV) {
        Ok(value) => parse_timeout(&value),
        Err(std::env::VarError::NotPresent) => Ok(DEFAULT_TIMEOUT),
        Err(std::env::VarError::NotUnicode(v)) => Err(Error::Config(format!("{TIMEOUT_ENV}={v:?} is not UTF-8"))),
    }
}

struct Entry {
    id: u64,
    deadline: Instant,
    thread: libc::pthread_t,
    /// The same thread's id, for its kernel state when the deadline fires.
    tid: Pid,
    /// `kvm_run.immediate_exit` of the armed vCPU, valid while the entry exists.
    immediate_exit: usize,
    /// Set at the first kick: the thread's kernel state just before it
    /// (`Some` is also how `disarm` knows the deadline fired).
    fired: Arc<Mutex<Option<String>>>,
}

#[derive(Default)]
struct State {
    entries: Vec<Entry>,
    next_id: u64,
    /// When the patrol wakes by itself (`None`: only when notified). A new
    /// deadline after it needs no notify: the patrol rechecks every entry
    /// when it wakes. Waking it for every `KVM_RUN` cost a futex wake and
    /// two context switches per guest round trip, about 1 s of a 6.12 run
    /// under TCG (16,000 model steps).
    wakes_at: Option<Instant>,
}

struct Watchdog {
    state: Mutex<State>,
    wake: Condvar,
}

fn watchdog() -> &'static Watchdog {
    static WATCHDOG: OnceLock<Watchdog> = OnceLock::new();
    WATCHDOG.get_or_init(|| {
        install_kick_handler();
        std::thread::Builder::new()
            .name("kvm-watchdog".into())
            .spawn(|| watchdog().patrol())
            .expect("spawn the watchdog thread");
        Watchdog { state: Mutex::new(State::default()), wake: Condvar::new() }
    })
}

thread_local! {
    /// Kick signals this thread's handler ran for: how a [`SignalStorm`]
    /// says what reached its thread. A const-initialized `Cell<u64>` has no
    /// lazy initialization and no destructor, so the handler may touch it.
    ///
    /// [`SignalStorm`]: crate::signal_storm::SignalStorm
    static KICKS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

extern "C" fn on_kick(_: libc::c_int) {
    KICKS.with(|k| k.set(k.get() + 1));
}

/// Kick signals the calling thread has received so far.
pub(crate) fn kicks_received() -> u64 {
    KICKS.with(std::cell::Cell::get)
}

/// Installs the [`KICK_SIGNAL`] handler (it only counts), once per process.
pub(crate) fn install_kick_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // No SA_RESTART: the kick must make KVM_RUN return EINTR.
        let action = nix::sys::signal::SigAction::new(
            nix::sys::signal::SigHandler::Handler(on_kick),
            nix::sys::signal::SaFlags::empty(),
            nix::sys::signal::SigSet::empty(),
        );
        // SAFETY: the handler is async-signal-safe (it only bumps a
        // thread-local counter), and no other part of the process uses SIGUSR1.
        unsafe { nix::sys::signal::sigaction(nix::sys::signal::Signal::SIGUSR1, &action) }
            .expect("install the SIGUSR1 kick handler");
    });
}

impl Watchdog {
    fn patrol(&self) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let now = Instant::now();
            let mut next_wake: Option<Instant> = None;
            for entry in &state.entries {
                if entry.deadline <= now {
                    let mut fired = entry.fired.lock().unwrap_or_else(|e| e.into_inner());
                    if fired.is_none() {
                        // Before the kick changes it: running or asleep, and where.
                        *fired = Some(TaskState::read(entry.tid).map_or_else(|e| e, |s| s.to_string()));
                    }
                    drop(fired);
                    // SAFETY: the entry is registered, so its vCPU (and the
                    // kvm_run mapping holding immediate_exit) is alive and
                    // blocked in or around KVM_RUN; the byte is only ever
                    // accessed atomically while armed.
                    let immediate_exit = unsafe { &*(entry.immediate_exit as *const AtomicU8) };
                    immediate_exit.store(1, Ordering::SeqCst);
                    // SAFETY: the thread is alive: it removes its entry under
                    // this lock before it can exit.
                    unsafe { libc::pthread_kill(entry.thread, KICK_SIGNAL) };
                    next_wake = Some(next_wake.map_or(now + REKICK, |t| t.min(now + REKICK)));
                } else {
                    next_wake = Some(next_wake.map_or(entry.deadline, |t| t.min(entry.deadline)));
                }
            }
            state.wakes_at = next_wake;
            state = match next_wake {
                Some(at) => {
                    let timeout = at.saturating_duration_since(Instant::now());
                    self.wake.wait_timeout(state, timeout).unwrap_or_else(|e| e.into_inner()).0
                }
                None => self.wake.wait(state).unwrap_or_else(|e| e.into_inner()),
            };
        }
    }
}

/// An armed deadline; disarm it as soon as `KVM_RUN` returns.
#[derive(Debug)]
pub(crate) struct Armed {
    id: u64,
    immediate_exit: *mut u8,
    fired: Arc<Mutex<Option<String>>>,
}

/// Arms a deadline `timeout` from now for the calling thread's vCPU.
///
/// # Safety
/// `immediate_exit` must point at the vCPU's `kvm_run.immediate_exit` and
/// stay valid until the returned guard is disarmed, on this thread.
pub(crate) unsafe fn arm(timeout: Duration, immediate_exit: *mut u8) -> Armed {
    let watchdog = watchdog();
    let fired = Arc::new(Mutex::new(None));
    let deadline = Instant::now() + timeout;
    let mut state = watchdog.state.lock().unwrap_or_else(|e| e.into_inner());
    let id = state.next_id;
    state.next_id += 1;
    state.entries.push(Entry {
        id,
        deadline,
        // SAFETY: pthread_self has no preconditions.
        thread: unsafe { libc::pthread_self() },
        tid: nix::unistd::gettid(),
        immediate_exit: immediate_exit as usize,
        fired: fired.clone(),
    });
    let notify = state.wakes_at.is_none_or(|at| deadline < at);
    drop(state);
    if notify {
        watchdog.wake.notify_one();
    }
    Armed { id, immediate_exit, fired }
}

impl Armed {
    /// Removes the deadline; returns, if it fired, what the thread was
    /// doing in the kernel when it did. Clears `immediate_exit` so the next
    /// `KVM_RUN` enters the guest.
    pub(crate) fn disarm(self) -> Option<String> {
        let watchdog = watchdog();
        let mut state = watchdog.state.lock().unwrap_or_else(|e| e.into_inner());
        state.entries.retain(|e| e.id != self.id);
        drop(state);
        let fired = self.fired.lock().unwrap_or_else(|e| e.into_inner()).take();
        if fired.is_some() {
            // SAFETY: `arm`'s contract keeps the pointer valid until now, and
            // the watchdog no longer touches it (the entry is gone).
            let immediate_exit = unsafe { &*(self.immediate_exit as *const AtomicU8) };
            immediate_exit.store(0, Ordering::SeqCst);
        }
        fired
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeout_values_are_validated() {
        assert_eq!(parse_timeout("2.5").unwrap(), Duration::from_millis(2500));
        assert_eq!(parse_timeout(" 10 ").unwrap(), Duration::from_secs(10));
        for bad in ["", "ten", "0", "-1", "inf", "NaN", "1e9"] {
            let err = parse_timeout(bad).unwrap_err().to_string();
            assert!(err.contains(TIMEOUT_ENV), "{bad:?}: {err}");
        }
    }

    #[test]
    fn a_blocked_thread_is_kicked_with_eintr_and_immediate_exit() {
        // Stand-in for KVM_RUN: a blocking read on a pipe nobody writes to.
        let (read_end, _write_end) = nix::unistd::pipe().unwrap();
        let mut immediate_exit = 0u8;
        let start = Instant::now();
        // SAFETY: immediate_exit outlives the guard, disarmed below on this thread.
        let armed = unsafe { arm(Duration::from_millis(200), &mut immediate_exit) };
        let mut buf = [0u8; 1];
        let result = nix::unistd::read(&read_end, &mut buf);
        assert_eq!(result, Err(nix::errno::Errno::EINTR));
        let seen = armed.disarm().expect("the deadline should have fired");
        // Blocked in read(): asleep in the kernel, not running.
        assert!(seen.starts_with("state S"), "{seen}");
        let elapsed = start.elapsed();
        assert!(elapsed >= Duration::from_millis(200), "kicked early: {elapsed:?}");
        assert_eq!(immediate_exit, 0, "disarm must clear immediate_exit");
    }

    #[test]
    fn an_earlier_deadline_armed_while_the_patrol_sleeps_towards_a_later_one_fires_first() {
        let mut far_exit = 0u8;
        // SAFETY: far_exit outlives the guard, disarmed below on this thread.
        let far = unsafe { arm(Duration::from_secs(30), &mut far_exit) };
        // Let the patrol go to sleep until the far deadline.
        std::thread::sleep(Duration::from_millis(50));
        let (read_end, _write_end) = nix::unistd::pipe().unwrap();
        let mut near_exit = 0u8;
        // SAFETY: as above.
        let near = unsafe { arm(Duration::from_millis(100), &mut near_exit) };
        let mut buf = [0u8; 1];
        assert_eq!(nix::unistd::read(&read_end, &mut buf), Err(nix::errno::Errno::EINTR));
        assert!(near.disarm().is_some(), "the near deadline should have fired");
        assert!(far.disarm().is_none(), "the read ended by the far deadline: the patrol slept through the near one");
    }

    #[test]
    fn a_disarmed_deadline_never_fires() {
        let mut immediate_exit = 0u8;
        // SAFETY: as above.
        let armed = unsafe { arm(Duration::from_millis(50), &mut immediate_exit) };
        assert!(armed.disarm().is_none());
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(immediate_exit, 0);
    }
}
