//! vCPUs: `KVM_RUN` under the watchdog, the exit checks before decoding
//! (`exit_fields`, then `exit::decode`), guest calls.

use std::collections::BTreeMap;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use guest_payloads::protocol::{self, Op};
use guest_payloads::{layout, Payload};
use kvm_bindings::kvm_regs;
use nix::errno::Errno;

use crate::error::{Error, Result, SysResult};
use crate::exit::{self, symbolize, Exit, ExitReport, GuestCall};
use crate::exit_fields::{self, ExitUnion};
use crate::fault_injection::{Failing, Injected, NthFault};
use crate::memory::HostMemory;
use crate::region::Region;
use crate::{uapi, watchdog};

/// A vCPU of a [`crate::Vm`].
#[derive(Debug)]
pub struct Vcpu {
    pub(crate) fd: kvm_ioctls::VcpuFd,
    pub(crate) id: u64,
    /// The system memslot (mailboxes), absent for bare vCPUs.
    pub(crate) system: Option<Arc<HostMemory>>,
    pub(crate) payload: Option<&'static Payload>,
    pub(crate) timeout: Duration,
    /// Size of the `kvm_run` mapping (`KVM_GET_VCPU_MMAP_SIZE`).
    pub(crate) mmap_size: usize,
    /// The guest agent is parked at `READY` on this vCPU (see
    /// [`crate::Agent`]): a round trip at the end of the test is safe.
    pub(crate) agent_parked: bool,
    /// Where the test that made this vCPU collects liveness failures.
    pub(crate) liveness: Option<Arc<crate::liveness::Liveness>>,
    /// The VM's memslot backings, kept alive while this vCPU can still run.
    pub(crate) _memslots: Arc<Mutex<BTreeMap<u32, Region>>>,
}

impl Vcpu {
    /// The vCPU id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Changes the deadline of each `KVM_RUN` (default: [`watchdog::configured_timeout`]).
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// `KVM_GET_REGS`.
    pub fn regs(&self) -> Result<kvm_regs> {
        self.fd.get_regs().sys(|| format!("KVM_GET_REGS(vCPU {})", self.id))
    }

    /// Requires the vCPU to answer an ioctl that must succeed
    /// (`KVM_GET_REGS`). Once KVM killed its VM (`kvm_vm_dead()`, which
    /// `KVM_BUG_ON()` calls), `kvm_vcpu_ioctl()` fails every vCPU ioctl
    /// with EIO before looking at it.
    pub fn check_alive(&self) -> Result<()> {
        self.fd.get_regs().map(drop).map_err(|e| {
            crate::liveness::dead("vCPU", format!("KVM_GET_REGS(vCPU {})", self.id), Errno::from_raw(e.errno()))
        })
    }

    /// `KVM_SET_REGS`.
    pub fn set_regs(&self, regs: &kvm_regs) -> Result<()> {
        self.fd.set_regs(regs).sys(|| format!("KVM_SET_REGS(vCPU {})", self.id))
    }

    /// One `KVM_RUN` under the watchdog.
    ///
    /// Returns the decoded exit; `KVM_EXIT_MEMORY_FAULT` comes back as
    /// `Ok(Exit::MemoryFault)` with the errno `KVM_RUN` returned. Every
    /// field a VMM reads is checked first (see `exit_fields`): a field that
    /// does not hold what KVM must have written, such as a value left over
    /// from an earlier exit, is an [`Error::Rule`] naming it. Any other
    /// failure is an error; a vCPU still in the guest at the deadline is
    /// [`Error::Timeout`].
    pub fn run(&mut self) -> Result<Exit> {
        loop {
            let before = self.exit_union();
            let ((ret, errno), kick) = self.under_watchdog(self.timeout, |vcpu| {
                // SAFETY: KVM_RUN on our vCPU fd takes no argument; the kernel
                // writes only into the kvm_run mapping.
                let ret = unsafe { libc::ioctl(vcpu.fd.as_raw_fd(), uapi::KVM_RUN as _, 0) };
                (ret, Errno::last())
            });
            if ret == 0 {
                return self.decode_checked(None, &before);
            }
            match errno {
                Errno::EINTR => match kick {
                    Some(state) => return Err(self.timeout_error(state)),
                    None => continue,
                },
                Errno::EFAULT | Errno::EHWPOISON
                    if self.fd.get_kvm_run().exit_reason == kvm_bindings::KVM_EXIT_MEMORY_FAULT =>
                {
                    return self.decode_checked(Some(errno), &before);
                }
                _ => return Err(Error::Sys { op: format!("KVM_RUN(vCPU {})", self.id), errno }),
            }
        }
    }

    /// One `KVM_RUN` with `failing` allocations failing. Returns
    /// the errno (`None` on success) and the exit `kvm_run` holds, which is
    /// stale after errors other than a memory fault (and then unchecked);
    /// a completed exit or a memory fault is checked as in [`Self::run`].
    pub fn run_failing(&mut self, fault: &NthFault, failing: Failing) -> Result<Injected<(Option<Errno>, Exit)>> {
        let before = self.exit_union();
        let (call, kick) = self.under_watchdog(self.timeout, |vcpu| {
            let fd = vcpu.fd.as_raw_fd();
            fault.around(failing, || {
                // SAFETY: as in `run`: KVM_RUN takes no argument.
                let ret = unsafe { libc::ioctl(fd, uapi::KVM_RUN as _, 0) };
                (ret, Errno::last())
            })
        });
        let call = call?;
        let (ret, errno) = call.outcome;
        if let (true, Some(state)) = (ret < 0 && errno == Errno::EINTR, kick) {
            return Err(self.timeout_error(state));
        }
        let errno = (ret < 0).then_some(errno);
        let fault_exit = self.fd.get_kvm_run().exit_reason == kvm_bindings::KVM_EXIT_MEMORY_FAULT
            && matches!(errno, Some(Errno::EFAULT | Errno::EHWPOISON));
        let exit =
            if errno.is_none() || fault_exit { self.decode_checked(errno, &before)? } else { self.decode_exit(errno) };
        Ok(call.map(|_| (errno, exit)))
    }

    /// A copy of `kvm_run`'s exit union, taken before a `KVM_RUN` so that
    /// the checks can tell a left-over value from a new one.
    fn exit_union(&mut self) -> ExitUnion {
        self.fd.get_kvm_run().__bindgen_anon_1
    }

    /// Whether the vCPU is in 64-bit mode (EFER.LMA and CS.L): what
    /// `KVM_EXIT_HYPERCALL_LONG_MODE` must say.
    fn in_64_bit_mode(&self) -> Result<bool> {
        const EFER_LMA: u64 = 1 << 10;
        let sregs = self.fd.get_sregs().sys(|| format!("KVM_GET_SREGS(vCPU {})", self.id))?;
        Ok(sregs.efer & EFER_LMA != 0 && sregs.cs.l == 1)
    }

    /// Checks every field a VMM reads of the exit `kvm_run` holds (see
    /// `exit_fields`), then decodes it.
    fn decode_checked(&mut self, errno: Option<Errno>, before: &ExitUnion) -> Result<Exit> {
        let mmap_size = self.mmap_size;
        let run = self.fd.get_kvm_run();
        let reason = run.exit_reason;
        let now = run.__bindgen_anon_1;
        let run_base: *const u8 = std::ptr::from_ref(run).cast();
        let checked = match reason {
            kvm_bindings::KVM_EXIT_IO => exit_fields::io_data_range(&now, mmap_size).and_then(|range| {
                // SAFETY: io_data_range checked that the range lies inside
                // the kvm_run mapping of `mmap_size` bytes.
                let start = unsafe { run_base.add(range.start) };
                // SAFETY: `range.len()` bytes at `start` lie inside that
                // mapping, alive as long as `self`; nothing writes them
                // while the vCPU is not running.
                let data = unsafe { std::slice::from_raw_parts(start, range.len()) };
                exit_fields::check_io(&now, data)
            }),
            kvm_bindings::KVM_EXIT_MMIO => exit_fields::check_mmio(&now, before),
            kvm_bindings::KVM_EXIT_MEMORY_FAULT => exit_fields::check_memory_fault(&now, before, errno),
            kvm_bindings::KVM_EXIT_HYPERCALL => exit_fields::check_hypercall(&now, before, || self.in_64_bit_mode())?,
            kvm_bindings::KVM_EXIT_INTERNAL_ERROR => exit_fields::check_internal_error(&now),
            _ => Ok(()),
        };
        checked.map_err(|m| m.into_error(self.id))?;
        Ok(self.decode_exit(errno))
    }

    /// The timeout of a vCPU the watchdog kicked; `kernel_state` is what
    /// its thread was doing in the kernel at the kick.
    fn timeout_error(&self, kernel_state: String) -> Error {
        let rip = self.regs().map(|r| r.rip).unwrap_or(u64::MAX);
        Error::Timeout {
            vcpu: self.id,
            timeout_secs: self.timeout.as_secs_f64(),
            rip,
            symbol: symbolize(self.payload, rip),
            kernel_state,
        }
    }

    fn decode_exit(&mut self, errno: Option<Errno>) -> Exit {
        let mmap_size = self.mmap_size;
        exit::decode(self.fd.get_kvm_run(), mmap_size, errno)
    }

    /// Sets the value a `KVM_EXIT_HYPERCALL` returns to the guest in `rax`.
    pub fn set_hypercall_ret(&mut self, ret: u64) -> Result<()> {
        let run = self.fd.get_kvm_run();
        if run.exit_reason != kvm_bindings::KVM_EXIT_HYPERCALL {
            return Err(Error::Misuse(format!("vCPU {} is not in a hypercall exit", self.id)));
        }
        // Writing a Copy union field is safe; the exit reason (checked above)
        // says the hypercall member is the live one.
        run.__bindgen_anon_1.hypercall.ret = ret;
        Ok(())
    }

    /// Supplies the value a guest MMIO read returns: copies `data` into
    /// `kvm_run.mmio.data` before the next `KVM_RUN`.
    pub fn complete_mmio_read(&mut self, data: &[u8]) -> Result<()> {
        let run = self.fd.get_kvm_run();
        if run.exit_reason != kvm_bindings::KVM_EXIT_MMIO {
            return Err(Error::Misuse(format!("vCPU {} is not in an MMIO exit", self.id)));
        }
        // SAFETY: the exit reason (checked above) says the mmio member of the
        // union is the live one; it is plain old data.
        let mut mmio = unsafe { run.__bindgen_anon_1.mmio };
        let n = data.len().min(mmio.data.len()).min(mmio.len as usize);
        mmio.data[..n].copy_from_slice(&data[..n]);
        run.__bindgen_anon_1.mmio = mmio;
        Ok(())
    }

    /// An [`ExitReport`] for `exit` with the current registers.
    pub fn report(&self, exit: Exit) -> ExitReport {
        let regs = self.regs().ok();
        let symbol = regs.and_then(|r| symbolize(self.payload, r.rip));
        ExitReport { vcpu: self.id, exit, regs, symbol }
    }

    /// An [`Error::UnexpectedExit`] for `exit`.
    pub fn unexpected(&self, exit: Exit, while_doing: impl Into<String>) -> Error {
        Error::UnexpectedExit { while_doing: while_doing.into(), report: self.report(exit).to_string() }
    }

    /// Runs until the guest makes a call; any other exit is an error.
    pub fn next_call(&mut self) -> Result<GuestCall> {
        let exit = self.run()?;
        self.call_from_exit(exit, "waiting for a guest call")
    }

    /// Decodes `exit` as a guest call, or fails describing it.
    pub fn call_from_exit(&mut self, exit: Exit, while_doing: &str) -> Result<GuestCall> {
        match exit {
            Exit::Io { port: protocol::PORT, out: true, size: 4, count: 1, data } => {
                let regs = self.regs()?;
                GuestCall::decode(data as u32, &regs)
                    .map_err(|code| self.unexpected(exit, format!("{while_doing}: unknown guest call code {code}")))
            }
            other => Err(self.unexpected(other, while_doing)),
        }
    }

    /// Like [`Self::next_call`], but guest assertions and exceptions are errors.
    pub(crate) fn next_ok_call(&mut self) -> Result<GuestCall> {
        let call = self.next_call()?;
        match call.failure() {
            Some(failure) => Err(Error::Guest(format!("vCPU {}: {failure}", self.id))),
            None => Ok(call),
        }
    }

    /// Requires the next call to be `SYNC(expected)`.
    pub fn expect_sync(&mut self, expected: u64) -> Result<()> {
        match self.next_ok_call()? {
            GuestCall::Sync(v) if v == expected => Ok(()),
            other => Err(Error::Guest(format!("vCPU {}: expected SYNC({expected:#x}), got {other:x?}", self.id))),
        }
    }

    /// Requires the next call to be `DONE`.
    pub fn expect_done(&mut self) -> Result<()> {
        match self.next_ok_call()? {
            GuestCall::Done => Ok(()),
            other => Err(Error::Guest(format!("vCPU {}: expected DONE, got {other:x?}", self.id))),
        }
    }

    /// This vCPU's mailbox in the system memslot.
    pub(crate) fn mailbox(&self) -> Result<(&HostMemory, u64)> {
        let system =
            self.system.as_deref().ok_or_else(|| Error::Misuse(format!("vCPU {} has no system memory", self.id)))?;
        Ok((system, layout::MAILBOX_GPA + self.id * layout::MAILBOX_STRIDE))
    }

    /// Writes `op` into this vCPU's agent mailbox, for the guest agent to
    /// perform when it next runs (see [`crate::Agent`]).
    pub(crate) fn write_agent_op(&self, op: Op) -> Result<()> {
        let (code, args) = op.encode();
        let (memory, mailbox) = self.mailbox()?;
        for (i, arg) in args.iter().enumerate() {
            memory.write_u64(mailbox + protocol::MAILBOX_ARG0 + 8 * i as u64, *arg);
        }
        memory.write_u64(mailbox + protocol::MAILBOX_OP, code);
        Ok(())
    }

    /// One command through the parked agent (a read of its own mailbox,
    /// in the system memslot): the guest still runs and answers.
    fn agent_round_trip(&mut self) -> Result<()> {
        let (_, mailbox) = self.mailbox()?;
        self.agent_parked = false;
        self.write_agent_op(Op::Read { gpa: mailbox + protocol::MAILBOX_OP })?;
        let what = "a round trip of the parked guest agent at the end of the test";
        let call = self.next_ok_call().map_err(|e| match e.errno() {
            Some(errno) => crate::liveness::dead("vCPU", format!("KVM_RUN(vCPU {}) in {what}", self.id()), errno),
            None => e,
        })?;
        match call {
            GuestCall::Ready(_) => {
                self.agent_parked = true;
                Ok(())
            }
            other => Err(Error::Guest(format!("vCPU {}: {what}: expected READY, got {other:x?}", self.id()))),
        }
    }

    /// `KVM_PRE_FAULT_MEMORY`: updates `range` in place as the kernel does.
    pub fn pre_fault_memory(&self, range: &mut kvm_bindings::kvm_pre_fault_memory) -> Result<()> {
        // SAFETY: the kernel reads and writes exactly one kvm_pre_fault_memory,
        // which `range` is, for the duration of the call.
        let ret =
            unsafe { libc::ioctl(self.fd.as_raw_fd(), uapi::KVM_PRE_FAULT_MEMORY as _, std::ptr::from_mut(range)) };
        if ret < 0 {
            return Err(Error::last_os(format!(
                "KVM_PRE_FAULT_MEMORY(vCPU {}, gpa {:#x}, size {:#x})",
                self.id, range.gpa, range.size
            )));
        }
        Ok(())
    }
}

impl Drop for Vcpu {
    /// At the end of a test the vCPU must still work (see
    /// [`crate::liveness::Liveness`]): a guest agent left parked at `READY`
    /// makes one round trip, any other vCPU answers `KVM_GET_REGS`.
    fn drop(&mut self) {
        let Some(liveness) = self.liveness.clone() else { return };
        let checked =
            if self.agent_parked && !std::thread::panicking() { self.agent_round_trip() } else { self.check_alive() };
        if let Err(e) = checked {
            liveness.report(format!("vCPU {} when the test dropped it: {e}", self.id));
        }
    }
}

impl Vcpu {
    /// `KVM_PRE_FAULT_MEMORY` under a deadline, for scenarios where a kernel
    /// bug could keep the ioctl spinning (it only gives up on a signal).
    ///
    /// Returns the ioctl's outcome (with `range` updated as the kernel left
    /// it) and, if the deadline fired, what the thread was doing in the
    /// kernel when it did: the watchdog's kick is what ended the call, and
    /// the caller should treat that as a hang.
    pub fn pre_fault_memory_with_deadline(
        &mut self,
        range: &mut kvm_bindings::kvm_pre_fault_memory,
        deadline: Duration,
    ) -> (Result<()>, Option<String>) {
        self.under_watchdog(deadline, |vcpu| vcpu.pre_fault_memory(range))
    }

    /// Runs `call` (a blocking ioctl on this vCPU) with the watchdog armed;
    /// returns its value and, if the deadline fired, what the thread was
    /// doing in the kernel when it did.
    fn under_watchdog<R>(&mut self, deadline: Duration, call: impl FnOnce(&mut Self) -> R) -> (R, Option<String>) {
        let run = self.fd.get_kvm_run();
        let immediate_exit: *mut u8 = &mut run.immediate_exit;
        // SAFETY: immediate_exit lives in this vCPU's kvm_run mapping, which
        // lives as long as `self`; the guard is disarmed below, on this thread.
        let armed = unsafe { watchdog::arm(deadline, immediate_exit) };
        let value = call(self);
        (value, armed.disarm())
    }
}
