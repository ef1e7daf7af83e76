//! A storm of signals at one thread, for scenarios that must see an
//! interruptible ioctl (`KVM_PRE_FAULT_MEMORY`, a guest_memfd `fallocate`)
//! return `EINTR` or stop short mid-call.
//!
//! The signals come from a POSIX interval timer aimed at the thread
//! (`SIGEV_THREAD_ID`), not from a sender thread: the timer's interrupt marks
//! the signal pending wherever the target runs, while a sender thread must
//! first be scheduled. In the 7.3.4 guest, with the host loaded, a sender
//! thread once sent nothing during a whole 16 MiB prefault (367 ms: both
//! vCPUs busy in the kernel), and the test read that as a kernel that ignores
//! signals.

use std::marker::PhantomData;
use std::time::Duration;

use nix::sys::signal::{SigEvent, SigevNotify, Signal};
use nix::sys::time::TimeSpec;
use nix::sys::timer::{Expiration, Timer, TimerSetTimeFlags};
use nix::time::ClockId;

use crate::error::{Result, SysResult};
use crate::watchdog::{install_kick_handler, kicks_received, KICK_SIGNAL};

/// Sends the kick signal (a no-op handler, no `SA_RESTART`) to the thread
/// that started it, every `interval`, until dropped: makes interruptible
/// ioctls see pending signals mid-call.
#[derive(Debug)]
pub struct SignalStorm {
    timer: Timer,
    /// [`kicks_received`] on this thread when the storm started.
    kicks_at_start: u64,
    /// Not `Send`: the timer targets the thread that started it, and the
    /// count of received signals is that thread's.
    _on_target_thread: PhantomData<*const ()>,
}

impl SignalStorm {
    /// Starts signalling the calling thread.
    pub fn start(interval: Duration) -> Result<Self> {
        install_kick_handler();
        let signal = Signal::try_from(KICK_SIGNAL).sys(|| "the kick signal".into())?;
        let event = SigEvent::new(SigevNotify::SigevThreadId {
            signal,
            thread_id: nix::unistd::gettid().as_raw(),
            si_value: 0,
        });
        let mut timer = Timer::new(ClockId::CLOCK_MONOTONIC, event)
            .sys(|| "timer_create(CLOCK_MONOTONIC, SIGEV_THREAD_ID)".into())?;
        timer
            .set(Expiration::Interval(TimeSpec::from_duration(interval)), TimerSetTimeFlags::empty())
            .sys(|| format!("timer_settime(every {interval:?})"))?;
        Ok(Self { timer, kicks_at_start: kicks_received(), _on_target_thread: PhantomData })
    }

    /// Signals this thread's handler ran for since the storm started
    /// (signals that arrive while one is pending merge into it).
    pub fn received(&self) -> u64 {
        kicks_received() - self.kicks_at_start
    }
}

impl Drop for SignalStorm {
    fn drop(&mut self) {
        // A zero expiration disarms the timer (timer_settime(2)); Timer's
        // own Drop then deletes it. A signal already pending stays pending,
        // as one a sender thread had sent would.
        let _ = self.timer.set(Expiration::OneShot(TimeSpec::new(0, 0)), TimerSetTimeFlags::empty());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_storm_interrupts_a_blocking_call_on_its_thread() {
        let (read_end, _write_end) = nix::unistd::pipe().unwrap();
        let storm = SignalStorm::start(Duration::from_millis(1)).unwrap();
        let mut buf = [0u8; 1];
        assert_eq!(nix::unistd::read(&read_end, &mut buf), Err(nix::errno::Errno::EINTR));
        assert!(storm.received() >= 1);
    }

    #[test]
    fn a_storm_reaches_a_thread_that_never_blocks() {
        // A busy thread gives a sender thread no help; the timer needs none.
        let storm = SignalStorm::start(Duration::from_micros(200)).unwrap();
        let start = std::time::Instant::now();
        while storm.received() == 0 && start.elapsed() < Duration::from_secs(10) {
            std::hint::spin_loop();
        }
        assert!(storm.received() >= 1, "no signal in {:?}", start.elapsed());
        drop(storm);
        let after = kicks_received();
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(kicks_received(), after, "the storm went on after it was dropped");
    }
}
