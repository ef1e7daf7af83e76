//! The end-of-test check that the VMs and vCPUs a test made still answer
//! (see [`Liveness`]), apart from the runner so that `Vm` and `Vcpu` can
//! report to it without depending on the runner that depends on them.

use std::cell::RefCell;
use std::sync::{Arc, Mutex};

use nix::errno::Errno;

use crate::error::{errno_name, Error};

/// Whether the VMs and vCPUs a test made still work at its end.
///
/// A VM that KVM killed (`kvm_vm_dead()`, e.g. after a `KVM_BUG_ON()`)
/// fails every later ioctl with EIO; a test whose last call on it happened
/// before the kill would pass. So every [`crate::Vm`] and [`crate::Vcpu`] made on
/// a test's thread (and the vCPUs made from those VMs, wherever they go)
/// answers a call that must succeed when the test drops it: the VM fd
/// `KVM_CHECK_EXTENSION`, a vCPU `KVM_GET_REGS` or, for a guest agent left
/// parked at `READY`, one round trip through the guest. A failure lands
/// here and the runner fails the test with it after its body returns, one
/// place for every scenario. Objects the test drops on another thread
/// after its body returned are not seen.
#[derive(Debug, Default)]
pub struct Liveness {
    failures: Mutex<Vec<String>>,
}

thread_local! {
    /// The running test's [`Liveness`], on the thread running its body.
    static CURRENT_TEST: RefCell<Option<Arc<Liveness>>> = const { RefCell::new(None) };
}

impl Liveness {
    /// The [`Liveness`] of the test running on this thread, if any.
    pub fn current() -> Option<Arc<Liveness>> {
        CURRENT_TEST.with(|c| c.borrow().clone())
    }

    /// Records a failed check.
    pub fn report(&self, failure: String) {
        self.failures.lock().unwrap_or_else(|p| p.into_inner()).push(failure);
    }

    /// Runs `body` as this thread's current test.
    pub(crate) fn around<T>(self: &Arc<Self>, body: impl FnOnce() -> T) -> T {
        let previous = CURRENT_TEST.with(|c| c.replace(Some(self.clone())));
        let value = body();
        CURRENT_TEST.with(|c| *c.borrow_mut() = previous);
        value
    }

    /// The outcome of a test body with this test's liveness failures added.
    pub(crate) fn judge(&self, ran: Result<(), String>) -> Result<(), String> {
        let failures = std::mem::take(&mut *self.failures.lock().unwrap_or_else(|p| p.into_inner()));
        if failures.is_empty() {
            return ran;
        }
        // The first few say what happened; a test that made many VMs (a
        // loop, a shrinking search) would otherwise drown its own message.
        const SHOWN: usize = 3;
        let more = match failures.len().saturating_sub(SHOWN) {
            0 => String::new(),
            n => format!("; and {n} more"),
        };
        let what = format!(
            "rule violated: the VMs and vCPUs a test made still work at its end ({} failed): {}{more}",
            failures.len(),
            failures[..failures.len().min(SHOWN)].join("; ")
        );
        match ran {
            Ok(()) => Err(what),
            Err(message) => Err(format!("{message}\nalso: {what}")),
        }
    }
}

/// The error of a liveness check that failed: EIO means KVM killed the VM.
pub(crate) fn dead(what: &str, op: String, errno: Errno) -> Error {
    let cause = if errno == Errno::EIO {
        "KVM marked the VM dead (kvm_vm_dead(), e.g. after a KVM_BUG_ON(); the kernel log has the WARN splat)"
    } else {
        "a call that must succeed failed"
    };
    Error::rule(format!("a live {what} answers its ioctls"), format!("{op} failed with {}: {cause}", errno_name(errno)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn liveness_failures_fail_a_passing_test_and_add_to_a_failing_one() {
        let liveness = Arc::new(Liveness::default());
        assert!(Liveness::current().is_none());
        liveness.around(|| Liveness::current().expect("set while the body runs").report("VM dead".into()));
        assert!(Liveness::current().is_none());
        let failed = liveness.judge(Ok(())).unwrap_err();
        assert!(failed.contains("still work at its end (1 failed): VM dead"), "{failed}");
        assert_eq!(liveness.judge(Ok(())), Ok(()), "failures are reported once");
        liveness.report("vCPU dead".into());
        let both = liveness.judge(Err("boom".into())).unwrap_err();
        assert!(both.starts_with("boom\nalso: rule violated") && both.ends_with("vCPU dead"), "{both}");
        for i in 0..5 {
            liveness.report(format!("VM {i} dead"));
        }
        let many = liveness.judge(Ok(())).unwrap_err();
        assert!(many.contains("(5 failed): VM 0 dead; VM 1 dead; VM 2 dead; and 2 more"), "{many}");
    }
}
