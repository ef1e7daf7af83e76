//! Exits and guest calls: what `KVM_RUN` returned, decoded from `kvm_run`,
//! the guest-to-host calls carried by port I/O, and the report of an exit
//! with the vCPU's registers and the payload label at RIP. It depends on
//! nothing else in the crate, so the error type and the vCPU can both use it.

use std::fmt;

use guest_payloads::{protocol, Payload};
use kvm_bindings::{kvm_regs, kvm_run};
use nix::errno::Errno;

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
pub(crate) fn symbolize(payload: Option<&Payload>, rip: u64) -> Option<String> {
    [payload, Some(&guest_payloads::GUEST_RUNTIME)].into_iter().flatten().find(|p| p.contains(rip)).map(|p| {
        let nearest = p.labels.iter().filter(|(_, at)| *at <= rip).max_by_key(|(_, at)| *at);
        match nearest {
            Some((label, at)) => format!("{}:{label}+{:#x}", p.name, rip - at),
            None => format!("{}+{:#x}", p.name, rip - p.load_gpa),
        }
    })
}

/// Decodes the exit `run` holds. `mmap_size` is the size of the `kvm_run`
/// mapping `run` starts; `errno` is what `KVM_RUN` returned with it.
pub(crate) fn decode(run: &kvm_run, mmap_size: usize, errno: Option<Errno>) -> Exit {
    let run_base: *const u8 = std::ptr::from_ref(run).cast();
    match run.exit_reason {
        kvm_bindings::KVM_EXIT_IO => {
            // SAFETY: exit_reason says the io member of the union is live.
            let io = unsafe { run.__bindgen_anon_1.io };
            let mut data = [0u8; 8];
            let n = usize::from(io.size).min(8);
            // A stale exit (after a failed KVM_RUN) is not checked: read
            // its data only where it lies inside the mapping.
            let inside = (io.data_offset as usize).checked_add(n).is_some_and(|end| end <= mmap_size);
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
