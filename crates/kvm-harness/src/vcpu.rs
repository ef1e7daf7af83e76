//! vCPUs: `KVM_RUN` under the watchdog, exit decoding, guest calls.

use std::collections::BTreeMap;
use std::fmt;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use guest_payloads::{layout, protocol, Payload};
use kvm_bindings::kvm_regs;
use nix::errno::Errno;

use crate::error::{Error, Result, SysResult};
use crate::exit_fields::{self, ExitUnion};
use crate::fault_injection::{Failing, Injected, NthFault};
use crate::memory::HostMemory;
use crate::vm::Region;
use crate::{uapi, watchdog};

/// Why `KVM_RUN` returned, decoded from `kvm_run`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// `KVM_EXIT_IO`.
    Io {
        /// Port.
        port: u16,
        /// OUT (true) or IN.
        out: bool,
        /// Access size in bytes.
        size: u8,
        /// Repeat count.
        count: u32,
        /// First element of the data, zero-extended.
        data: u64,
    },
    /// `KVM_EXIT_MMIO`.
    Mmio {
        /// Guest physical address.
        gpa: u64,
        /// Access size.
        len: u32,
        /// Write (true) or read.
        is_write: bool,
        /// Data written (for writes).
        data: [u8; 8],
    },
    /// `KVM_EXIT_HLT`.
    Hlt,
    /// `KVM_EXIT_SHUTDOWN` (e.g. a triple fault).
    Shutdown,
    /// `KVM_EXIT_MEMORY_FAULT`, which `KVM_RUN` reports with a -1 return.
    MemoryFault {
        /// `memory_fault.flags`.
        flags: u64,
        /// `memory_fault.gpa`.
        gpa: u64,
        /// `memory_fault.size`.
        size: u64,
        /// errno of `KVM_RUN` (`None` if it wrongly returned 0).
        errno: Option<Errno>,
    },
    /// `KVM_EXIT_HYPERCALL` (with `KVM_CAP_EXIT_HYPERCALL` enabled).
    Hypercall {
        /// Hypercall number.
        nr: u64,
        /// Arguments.
        args: [u64; 6],
        /// `hypercall.flags` (bit 0: guest in long mode).
        flags: u64,
    },
    /// `KVM_EXIT_INTERNAL_ERROR`.
    InternalError {
        /// `internal.suberror`.
        suberror: u32,
        /// `internal.data[..ndata]`.
        data: Vec<u64>,
    },
    /// `KVM_EXIT_FAIL_ENTRY`.
    FailEntry {
        /// Hardware reason.
        reason: u64,
        /// Host CPU.
        cpu: u32,
    },
    /// `KVM_EXIT_SYSTEM_EVENT`.
    SystemEvent {
        /// Event type.
        kind: u32,
    },
    /// `KVM_EXIT_INTR`.
    Intr,
    /// Any other exit reason.
    Other(u32),
}

impl Exit {
    /// The uAPI name of the exit reason.
    pub fn reason_name(&self) -> String {
        match self {
            Self::Io { .. } => "KVM_EXIT_IO".into(),
            Self::Mmio { .. } => "KVM_EXIT_MMIO".into(),
            Self::Hlt => "KVM_EXIT_HLT".into(),
            Self::Shutdown => "KVM_EXIT_SHUTDOWN".into(),
            Self::MemoryFault { .. } => "KVM_EXIT_MEMORY_FAULT".into(),
            Self::Hypercall { .. } => "KVM_EXIT_HYPERCALL".into(),
            Self::InternalError { .. } => "KVM_EXIT_INTERNAL_ERROR".into(),
            Self::FailEntry { .. } => "KVM_EXIT_FAIL_ENTRY".into(),
            Self::SystemEvent { .. } => "KVM_EXIT_SYSTEM_EVENT".into(),
            Self::Intr => "KVM_EXIT_INTR".into(),
            Self::Other(reason) => format!("exit reason {reason}"),
        }
    }
}

/// A message from the guest (see [`guest_payloads::protocol`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestCall {
    /// `SYNC(value)`.
    Sync(u64),
    /// `DONE`.
    Done,
    /// `ASSERT_FAIL(id, values)`.
    AssertFail {
        /// Assertion id (`protocol::ASSERT_*`).
        id: u64,
        /// Values the guest attached.
        values: [u64; 4],
    },
    /// The agent finished a command with `result` and awaits the next.
    Ready(u64),
    /// A guest exception.
    Exception {
        /// Vector.
        vector: u64,
        /// Error code (0 where the CPU pushes none).
        error_code: u64,
        /// RIP of the faulting instruction.
        rip: u64,
        /// CR2 (the faulting address for #PF).
        cr2: u64,
    },
}

const EXCEPTION_NAMES: [&str; 32] = [
    "#DE",
    "#DB",
    "NMI",
    "#BP",
    "#OF",
    "#BR",
    "#UD",
    "#NM",
    "#DF",
    "vector 9",
    "#TS",
    "#NP",
    "#SS",
    "#GP",
    "#PF",
    "vector 15",
    "#MF",
    "#AC",
    "#MC",
    "#XM",
    "#VE",
    "#CP",
    "vector 22",
    "vector 23",
    "vector 24",
    "vector 25",
    "vector 26",
    "vector 27",
    "#HV",
    "#VC",
    "#SX",
    "vector 31",
];

impl GuestCall {
    /// Decodes the call code in `eax` and its arguments in the registers.
    pub fn decode(code: u32, regs: &kvm_regs) -> Result<Self, u32> {
        Ok(match code {
            protocol::CALL_SYNC => Self::Sync(regs.rdi),
            protocol::CALL_DONE => Self::Done,
            protocol::CALL_ASSERT_FAIL => {
                Self::AssertFail { id: regs.rdi, values: [regs.rsi, regs.r8, regs.r9, regs.r10] }
            }
            protocol::CALL_READY => Self::Ready(regs.rdi),
            protocol::CALL_EXCEPTION => {
                Self::Exception { vector: regs.rdi, error_code: regs.rsi, rip: regs.r8, cr2: regs.r9 }
            }
            other => return Err(other),
        })
    }

    /// A failure description for assertion and exception calls.
    pub fn failure(&self) -> Option<String> {
        match *self {
            Self::AssertFail { id: protocol::ASSERT_PATTERN_MISMATCH, values: [gpa, expected, actual, _] } => {
                Some(format!("guest saw {actual:#018x} at GPA {gpa:#x}, expected {expected:#018x}"))
            }
            Self::AssertFail { id: protocol::ASSERT_UNKNOWN_OP, values: [op, ..] } => {
                Some(format!("guest agent got unknown op {op}"))
            }
            Self::AssertFail { id, values } => Some(format!("guest assertion {id} failed, values {values:#x?}")),
            Self::Exception { vector, error_code, rip, cr2 } => {
                let name = EXCEPTION_NAMES.get(vector as usize).copied().unwrap_or("vector ?");
                Some(format!(
                    "guest exception {name} (vector {vector}) at RIP {rip:#x}, error code {error_code:#x}, CR2 {cr2:#x}"
                ))
            }
            _ => None,
        }
    }
}

/// An exit plus the vCPU state, for failure messages.
#[derive(Debug)]
pub struct ExitReport {
    /// vCPU id.
    pub vcpu: u64,
    /// The exit.
    pub exit: Exit,
    /// Registers at the exit (None if `KVM_GET_REGS` failed).
    pub regs: Option<kvm_regs>,
    /// Label nearest below RIP, if any.
    pub symbol: Option<String>,
}

impl fmt::Display for ExitReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} on vCPU {} ({:x?})", self.exit.reason_name(), self.vcpu, self.exit)?;
        if let Some(r) = &self.regs {
            write!(f, " at RIP {:#x}", r.rip)?;
            if let Some(s) = &self.symbol {
                write!(f, " ({s})")?;
            }
            write!(
                f,
                "; rax={:#x} rbx={:#x} rcx={:#x} rdx={:#x} rsi={:#x} rdi={:#x} rsp={:#x} rbp={:#x} \
                 r8={:#x} r9={:#x} r10={:#x} r11={:#x} r12={:#x} r13={:#x} r14={:#x} r15={:#x} rflags={:#x}",
                r.rax,
                r.rbx,
                r.rcx,
                r.rdx,
                r.rsi,
                r.rdi,
                r.rsp,
                r.rbp,
                r.r8,
                r.r9,
                r.r10,
                r.r11,
                r.r12,
                r.r13,
                r.r14,
                r.r15,
                r.rflags
            )?;
        }
        Ok(())
    }
}

/// Names `rip` as `payload+offset` or `runtime:label+offset`.
fn symbolize(payload: Option<&Payload>, rip: u64) -> Option<String> {
    [payload, Some(&guest_payloads::GUEST_RUNTIME)].into_iter().flatten().find(|p| p.contains(rip)).map(|p| {
        let nearest = p.labels.iter().filter(|(_, at)| *at <= rip).max_by_key(|(_, at)| *at);
        match nearest {
            Some((label, at)) => format!("{}:{label}+{:#x}", p.name, rip - at),
            None => format!("{}+{:#x}", p.name, rip - p.load_gpa),
        }
    })
}

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
    pub(crate) liveness: Option<Arc<crate::runner::Liveness>>,
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
        self.fd
            .get_regs()
            .map(drop)
            .map_err(|e| crate::vm::dead("vCPU", format!("KVM_GET_REGS(vCPU {})", self.id), Errno::from_raw(e.errno())))
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
            let ((ret, errno), fired) = self.under_watchdog(self.timeout, |vcpu| {
                // SAFETY: KVM_RUN on our vCPU fd takes no argument; the kernel
                // writes only into the kvm_run mapping.
                let ret = unsafe { libc::ioctl(vcpu.fd.as_raw_fd(), uapi::KVM_RUN as _, 0) };
                (ret, Errno::last())
            });
            if ret == 0 {
                return self.decode_checked(None, &before);
            }
            match errno {
                Errno::EINTR if fired => return Err(self.timeout_error()),
                Errno::EINTR => continue,
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
        let (call, fired) = self.under_watchdog(self.timeout, |vcpu| {
            let fd = vcpu.fd.as_raw_fd();
            fault.around(failing, || {
                // SAFETY: as in `run`: KVM_RUN takes no argument.
                let ret = unsafe { libc::ioctl(fd, uapi::KVM_RUN as _, 0) };
                (ret, Errno::last())
            })
        });
        let call = call?;
        let (ret, errno) = call.outcome;
        if ret < 0 && errno == Errno::EINTR && fired {
            return Err(self.timeout_error());
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
        let sregs = self.sregs()?;
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

    fn timeout_error(&self) -> Error {
        let rip = self.regs().map(|r| r.rip).unwrap_or(u64::MAX);
        Error::Timeout {
            vcpu: self.id,
            timeout_secs: self.timeout.as_secs_f64(),
            rip,
            symbol: symbolize(self.payload, rip),
        }
    }

    fn decode_exit(&mut self, errno: Option<Errno>) -> Exit {
        let run = self.fd.get_kvm_run();
        let run_base: *const u8 = std::ptr::from_ref(run).cast();
        match run.exit_reason {
            kvm_bindings::KVM_EXIT_IO => {
                // SAFETY: exit_reason says the io member of the union is live.
                let io = unsafe { run.__bindgen_anon_1.io };
                let mut data = [0u8; 8];
                let n = usize::from(io.size).min(8);
                // A stale exit (after a failed KVM_RUN) is not checked: read
                // its data only where it lies inside the mapping.
                let inside = (io.data_offset as usize).checked_add(n).is_some_and(|end| end <= self.mmap_size);
                if inside {
                    // SAFETY: [data_offset, data_offset + n) lies inside the
                    // kvm_run mapping (checked above), alive as long as `self`.
                    let src = unsafe { run_base.add(io.data_offset as usize) };
                    // SAFETY: src has n (<= 8) readable bytes; data is distinct.
                    unsafe { std::ptr::copy_nonoverlapping(src, data.as_mut_ptr(), n) };
                }
                Exit::Io {
                    port: io.port,
                    out: u32::from(io.direction) == kvm_bindings::KVM_EXIT_IO_OUT,
                    size: io.size,
                    count: io.count,
                    data: u64::from_le_bytes(data),
                }
            }
            kvm_bindings::KVM_EXIT_MMIO => {
                // SAFETY: exit_reason says the mmio member is live.
                let mmio = unsafe { run.__bindgen_anon_1.mmio };
                Exit::Mmio { gpa: mmio.phys_addr, len: mmio.len, is_write: mmio.is_write != 0, data: mmio.data }
            }
            kvm_bindings::KVM_EXIT_HLT => Exit::Hlt,
            kvm_bindings::KVM_EXIT_SHUTDOWN => Exit::Shutdown,
            kvm_bindings::KVM_EXIT_MEMORY_FAULT => {
                // SAFETY: exit_reason says the memory_fault member is live.
                let fault = unsafe { run.__bindgen_anon_1.memory_fault };
                Exit::MemoryFault { flags: fault.flags, gpa: fault.gpa, size: fault.size, errno }
            }
            kvm_bindings::KVM_EXIT_HYPERCALL => {
                // SAFETY: exit_reason says the hypercall member is live.
                let hc = unsafe { run.__bindgen_anon_1.hypercall };
                // SAFETY: both union views of the flags word are plain u64/u32.
                let flags = unsafe { hc.__bindgen_anon_1.flags };
                Exit::Hypercall { nr: hc.nr, args: hc.args, flags }
            }
            kvm_bindings::KVM_EXIT_INTERNAL_ERROR => {
                // SAFETY: exit_reason says the internal member is live.
                let internal = unsafe { run.__bindgen_anon_1.internal };
                let n = (internal.ndata as usize).min(internal.data.len());
                Exit::InternalError { suberror: internal.suberror, data: internal.data[..n].to_vec() }
            }
            kvm_bindings::KVM_EXIT_FAIL_ENTRY => {
                // SAFETY: exit_reason says the fail_entry member is live.
                let fe = unsafe { run.__bindgen_anon_1.fail_entry };
                Exit::FailEntry { reason: fe.hardware_entry_failure_reason, cpu: fe.cpu }
            }
            kvm_bindings::KVM_EXIT_SYSTEM_EVENT => {
                // SAFETY: exit_reason says the system_event member is live.
                let ev = unsafe { run.__bindgen_anon_1.system_event };
                Exit::SystemEvent { kind: ev.type_ }
            }
            kvm_bindings::KVM_EXIT_INTR => Exit::Intr,
            other => Exit::Other(other),
        }
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
        Error::UnexpectedExit { while_doing: while_doing.into(), report: Box::new(self.report(exit)) }
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
    pub fn next_ok_call(&mut self) -> Result<GuestCall> {
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
    /// [`crate::runner::Liveness`]): a guest agent left parked at `READY`
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
    /// it) and whether the deadline fired. When it fired, the watchdog's kick
    /// is what ended the call: the caller should treat that as a hang.
    pub fn pre_fault_memory_with_deadline(
        &mut self,
        range: &mut kvm_bindings::kvm_pre_fault_memory,
        deadline: Duration,
    ) -> (Result<()>, bool) {
        self.under_watchdog(deadline, |vcpu| vcpu.pre_fault_memory(range))
    }

    /// Runs `call` (a blocking ioctl on this vCPU) with the watchdog armed;
    /// returns its value and whether the deadline fired.
    fn under_watchdog<R>(&mut self, deadline: Duration, call: impl FnOnce(&mut Self) -> R) -> (R, bool) {
        let run = self.fd.get_kvm_run();
        let immediate_exit: *mut u8 = &mut run.immediate_exit;
        // SAFETY: immediate_exit lives in this vCPU's kvm_run mapping, which
        // lives as long as `self`; the guard is disarmed below, on this thread.
        let armed = unsafe { watchdog::arm(deadline, immediate_exit) };
        let value = call(self);
        (value, armed.disarm())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn regs(rdi: u64, rsi: u64, r8: u64, r9: u64, r10: u64) -> kvm_regs {
        kvm_regs { rdi, rsi, r8, r9, r10, ..Default::default() }
    }

    #[test]
    fn guest_calls_decode_from_registers() {
        let r = regs(1, 2, 3, 4, 5);
        assert_eq!(GuestCall::decode(protocol::CALL_SYNC, &r), Ok(GuestCall::Sync(1)));
        assert_eq!(GuestCall::decode(protocol::CALL_DONE, &r), Ok(GuestCall::Done));
        assert_eq!(GuestCall::decode(protocol::CALL_READY, &r), Ok(GuestCall::Ready(1)));
        assert_eq!(
            GuestCall::decode(protocol::CALL_ASSERT_FAIL, &r),
            Ok(GuestCall::AssertFail { id: 1, values: [2, 3, 4, 5] })
        );
        assert_eq!(
            GuestCall::decode(protocol::CALL_EXCEPTION, &r),
            Ok(GuestCall::Exception { vector: 1, error_code: 2, rip: 3, cr2: 4 })
        );
        assert_eq!(GuestCall::decode(99, &r), Err(99));
    }

    #[test]
    fn failures_are_described_with_values() {
        let mismatch = GuestCall::AssertFail { id: protocol::ASSERT_PATTERN_MISMATCH, values: [0x1000, 0xaa, 0xbb, 0] };
        assert_eq!(
            mismatch.failure().unwrap(),
            "guest saw 0x00000000000000bb at GPA 0x1000, expected 0x00000000000000aa"
        );
        let pf = GuestCall::Exception { vector: 14, error_code: 2, rip: 0x20000, cr2: 0xdead000 };
        assert_eq!(
            pf.failure().unwrap(),
            "guest exception #PF (vector 14) at RIP 0x20000, error code 0x2, CR2 0xdead000"
        );
        assert_eq!(GuestCall::Sync(1).failure(), None);
    }

    #[test]
    fn rips_are_named_by_the_nearest_label() {
        let spin = guest_payloads::SPIN_FOREVER.label("spin");
        assert_eq!(symbolize(Some(&guest_payloads::SPIN_FOREVER), spin).unwrap(), "spin_forever:spin+0x0");
        let ud = guest_payloads::GUEST_RUNTIME.label("vector_6");
        assert_eq!(symbolize(None, ud + 2).unwrap(), "guest_runtime:vector_6+0x2");
        assert_eq!(symbolize(None, 0x5), None);
    }
}
