//! A storm of signals at one thread, for scenarios that must see an
//! interruptible ioctl (`KVM_PRE_FAULT_MEMORY`) return `EINTR` mid-call.

use std::marker::PhantomData;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::watchdog::{install_kick_handler, KICK_SIGNAL};

/// Sends the kick signal (a no-op handler, no `SA_RESTART`) to the thread
/// that started it, every `interval`, until dropped: makes interruptible
/// ioctls such as `KVM_PRE_FAULT_MEMORY` see pending signals mid-call.
#[derive(Debug)]
pub struct SignalStorm {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    sender: Option<JoinHandle<()>>,
    /// Not `Send`: it must be dropped on the target thread, which keeps that
    /// thread alive for as long as signals are sent to it.
    _on_target_thread: PhantomData<*const ()>,
}

impl SignalStorm {
    /// Starts signalling the calling thread.
    pub fn start(interval: Duration) -> Self {
        install_kick_handler();
        // SAFETY: pthread_self has no preconditions.
        let target = unsafe { libc::pthread_self() };
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let sender = {
            let (stop, sent) = (stop.clone(), sent.clone());
            std::thread::Builder::new()
                .name("kvm-signal-storm".into())
                .spawn(move || {
                    while !stop.load(Ordering::SeqCst) {
                        // Counted first: the target may observe the signal
                        // (and read the count) before pthread_kill returns.
                        sent.fetch_add(1, Ordering::SeqCst);
                        // SAFETY: the target is alive: it owns the storm
                        // (which is not Send) and joins this thread in Drop
                        // before it can go away.
                        unsafe { libc::pthread_kill(target, KICK_SIGNAL) };
                        std::thread::sleep(interval);
                    }
                })
                .expect("spawn the signal-storm thread")
        };
        Self { stop, sent, sender: Some(sender), _on_target_thread: PhantomData }
    }

    /// Signals sent so far.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::SeqCst)
    }
}

impl Drop for SignalStorm {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(sender) = self.sender.take() {
            let _ = sender.join();
        }
    }
}
