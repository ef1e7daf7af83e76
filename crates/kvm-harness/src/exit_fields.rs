//! Every field a VMM reads from an exit, checked against what KVM must
//! have written there, before a scenario sees the exit.
//!
//! `kvm_run`'s exit union is shared by every exit kind: bytes one exit
//! writes stay until another exit (or the VMM) overwrites them. A field KVM
//! forgets to set therefore shows a left-over value, which a VMM takes for
//! the exit's own (upstream made KVM zero `hypercall.ret` because QEMU
//! assumed it was 0). The harness keeps a copy of the union from before
//! each `KVM_RUN`, so a failure can say when a field still holds its old
//! value. What is checked, per exit (x86, 6.12 and 7.3):
//!
//! - `KVM_EXIT_IO`: `direction` IN or OUT, `size` 1, 2 or 4, `count` at
//!   least 1, `data_offset` the PIO page (`KVM_PIO_PAGE_OFFSET` pages into
//!   the mapping) with `size * count` bytes inside the mapping, and for IN
//!   those bytes zero (`emulator_pio_in_out()` clears them before exiting).
//! - `KVM_EXIT_MMIO`: `len` 1 to 8, `is_write` 0 or 1, and for a write the
//!   bytes of `data` past `len` as they were before `KVM_RUN`
//!   (`__kvm_prepare_emulated_mmio_exit()` copies exactly `len` bytes).
//! - `KVM_EXIT_MEMORY_FAULT`: `KVM_RUN` failed (EFAULT or EHWPOISON),
//!   `flags` only `KVM_MEMORY_EXIT_FLAG_PRIVATE`, `gpa` page-aligned,
//!   `size` a non-zero multiple of the page size not wrapping past 2^64.
//! - `KVM_EXIT_HYPERCALL`: `flags` only `KVM_EXIT_HYPERCALL_LONG_MODE`, set
//!   exactly when the vCPU is in 64-bit mode; `ret` 0 where the kernel
//!   zeroes it (the versioned rule `hypercall-exit-zeroes-ret`), else what
//!   the union held before `KVM_RUN`.
//! - `KVM_EXIT_INTERNAL_ERROR`: a defined `suberror`, `ndata` at most 16
//!   (the array's length), and for emulation failures `flags` only
//!   `KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES`, with at most 15
//!   instruction bytes.
//! - `KVM_EXIT_SHUTDOWN` carries no fields.
//!
//! The fields whose value only the scenario knows (a port, a GPA, the data
//! written, a hypercall's number and arguments) are its to compare.

/// `kvm_run`'s exit union.
pub(crate) use kvm_bindings::kvm_run__bindgen_ty_1 as ExitUnion;
use nix::errno::Errno;

use crate::error::{Error, Result};
use crate::kernel_rules::{ForRunningKernel, HYPERCALL_EXIT_ZEROES_RET};

/// `KVM_EXIT_IO_IN` / `KVM_EXIT_IO_OUT` as the uAPI numbers them.
const IO_IN: u8 = kvm_bindings::KVM_EXIT_IO_IN as u8;
const IO_OUT: u8 = kvm_bindings::KVM_EXIT_IO_OUT as u8;
/// Where x86 KVM puts port data: `KVM_PIO_PAGE_OFFSET` pages into the mapping.
pub const PIO_DATA_OFFSET: u64 = kvm_bindings::KVM_PIO_PAGE_OFFSET as u64 * 4096;
const PAGE: u64 = 4096;
const MEMORY_FAULT_FLAGS: u64 = kvm_bindings::KVM_MEMORY_EXIT_FLAG_PRIVATE as u64;
const HYPERCALL_FLAGS: u64 = crate::uapi::KVM_EXIT_HYPERCALL_LONG_MODE;
const EMULATION_FLAGS: u64 = kvm_bindings::KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES as u64;

/// A field that does not hold what KVM must have written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Mismatch {
    /// The exit, `KVM_EXIT_HYPERCALL`.
    pub exit: &'static str,
    /// The field as the uAPI names it, `hypercall.ret`.
    pub field: &'static str,
    /// What it must hold, and why where that is not obvious.
    pub expected: String,
    /// What it holds.
    pub actual: String,
    /// The field held this same value before `KVM_RUN`: left over.
    pub stale: bool,
    /// Why the expected value is the rule here, where a versioned rule
    /// decided it.
    pub why: Option<String>,
}

impl Mismatch {
    fn new(exit: &'static str, field: &'static str, expected: impl Into<String>, actual: impl Into<String>) -> Self {
        Self { exit, field, expected: expected.into(), actual: actual.into(), stale: false, why: None }
    }

    fn stale_if(mut self, stale: bool) -> Self {
        self.stale = stale;
        self
    }

    /// The rule violation, naming the field, the expected and the actual value.
    pub(crate) fn into_error(self, vcpu: u64) -> Error {
        let stale = if self.stale {
            " (the value the field held before this KVM_RUN: left over from an earlier exit or the VMM)"
        } else {
            ""
        };
        let why = self.why.map(|why| format!("; {why}")).unwrap_or_default();
        Error::rule(
            format!("{} sets every field a VMM reads", self.exit),
            format!("vCPU {vcpu}: {}: expected {}, got {}{stale}{why}", self.field, self.expected, self.actual),
        )
    }
}

/// The port data of a `KVM_EXIT_IO`: where it lies, checked against the
/// mapping before anything reads it.
pub(crate) fn io_data_range(now: &ExitUnion, mmap_size: usize) -> Result<std::ops::Range<usize>, Mismatch> {
    const EXIT: &str = "KVM_EXIT_IO";
    // SAFETY: the caller saw exit_reason KVM_EXIT_IO, so io is the live member.
    let io = unsafe { now.io };
    if io.direction != IO_IN && io.direction != IO_OUT {
        return Err(Mismatch::new(
            EXIT,
            "io.direction",
            "KVM_EXIT_IO_IN (0) or KVM_EXIT_IO_OUT (1)",
            io.direction.to_string(),
        ));
    }
    if ![1, 2, 4].contains(&io.size) {
        return Err(Mismatch::new(EXIT, "io.size", "1, 2 or 4", io.size.to_string()));
    }
    if io.count == 0 {
        return Err(Mismatch::new(EXIT, "io.count", "at least 1", "0"));
    }
    if io.data_offset != PIO_DATA_OFFSET {
        return Err(Mismatch::new(
            EXIT,
            "io.data_offset",
            format!("{PIO_DATA_OFFSET:#x} (KVM_PIO_PAGE_OFFSET pages)"),
            format!("{:#x}", io.data_offset),
        ));
    }
    let start = io.data_offset as usize;
    let len = usize::from(io.size) * io.count as usize;
    if start.checked_add(len).is_none_or(|end| end > mmap_size) {
        return Err(Mismatch::new(
            EXIT,
            "io.count",
            format!("size * count bytes inside the {mmap_size:#x}-byte kvm_run mapping"),
            format!("{} ({len:#x} bytes at {start:#x})", io.count),
        ));
    }
    Ok(start..start + len)
}

/// `data`: the bytes at `io.data_offset` (see [`io_data_range`]).
pub(crate) fn check_io(now: &ExitUnion, data: &[u8]) -> Result<(), Mismatch> {
    // SAFETY: as in io_data_range.
    let io = unsafe { now.io };
    if io.direction == IO_IN && data.iter().any(|&b| b != 0) {
        return Err(Mismatch::new(
            "KVM_EXIT_IO",
            "the port data of an IN (at io.data_offset)",
            format!("{} zero bytes (KVM clears them before the VMM fills them)", data.len()),
            format!("{data:02x?}"),
        ));
    }
    Ok(())
}

pub(crate) fn check_mmio(now: &ExitUnion, before: &ExitUnion) -> Result<(), Mismatch> {
    const EXIT: &str = "KVM_EXIT_MMIO";
    // SAFETY: the caller saw exit_reason KVM_EXIT_MMIO; `before` is plain
    // bytes read through the same member.
    let (mmio, old) = unsafe { (now.mmio, before.mmio) };
    if !(1..=8).contains(&mmio.len) {
        return Err(Mismatch::new(EXIT, "mmio.len", "1 to 8", mmio.len.to_string()));
    }
    if mmio.is_write > 1 {
        return Err(Mismatch::new(EXIT, "mmio.is_write", "0 or 1", mmio.is_write.to_string()));
    }
    let len = mmio.len as usize;
    if mmio.is_write == 1 && mmio.data[len..] != old.data[len..] {
        return Err(Mismatch::new(
            EXIT,
            "mmio.data past mmio.len",
            format!("{:02x?} as before KVM_RUN (KVM copies exactly len = {len} bytes)", &old.data[len..]),
            format!("{:02x?}", &mmio.data[len..]),
        ));
    }
    Ok(())
}

pub(crate) fn check_memory_fault(now: &ExitUnion, before: &ExitUnion, errno: Option<Errno>) -> Result<(), Mismatch> {
    const EXIT: &str = "KVM_EXIT_MEMORY_FAULT";
    // SAFETY: the caller saw exit_reason KVM_EXIT_MEMORY_FAULT.
    let (fault, old) = unsafe { (now.memory_fault, before.memory_fault) };
    if !matches!(errno, Some(Errno::EFAULT | Errno::EHWPOISON)) {
        return Err(Mismatch::new(
            EXIT,
            "KVM_RUN's return",
            "-1 with EFAULT or EHWPOISON",
            errno.map_or("0".to_string(), |e| format!("-1 with {e:?}")),
        ));
    }
    if fault.flags & !MEMORY_FAULT_FLAGS != 0 {
        return Err(Mismatch::new(
            EXIT,
            "memory_fault.flags",
            format!("no bits but KVM_MEMORY_EXIT_FLAG_PRIVATE ({MEMORY_FAULT_FLAGS:#x})"),
            format!("{:#x}", fault.flags),
        )
        .stale_if(fault.flags == old.flags));
    }
    if fault.gpa % PAGE != 0 {
        return Err(Mismatch::new(EXIT, "memory_fault.gpa", "page-aligned", format!("{:#x}", fault.gpa))
            .stale_if(fault.gpa == old.gpa));
    }
    if fault.size == 0 || fault.size % PAGE != 0 || fault.gpa.checked_add(fault.size).is_none() {
        return Err(Mismatch::new(
            EXIT,
            "memory_fault.size",
            format!("a non-zero multiple of {PAGE:#x} that does not wrap past gpa {:#x}", fault.gpa),
            format!("{:#x}", fault.size),
        )
        .stale_if(fault.size == old.size));
    }
    Ok(())
}

/// `long_mode`: whether the vCPU is in 64-bit mode (EFER.LMA and CS.L),
/// asked only for a hypercall exit.
pub(crate) fn check_hypercall(
    now: &ExitUnion,
    before: &ExitUnion,
    long_mode: impl FnOnce() -> Result<bool>,
) -> Result<Result<(), Mismatch>> {
    const EXIT: &str = "KVM_EXIT_HYPERCALL";
    // SAFETY: the caller saw exit_reason KVM_EXIT_HYPERCALL.
    let hc = unsafe { now.hypercall };
    // SAFETY: `before` is plain bytes read through the same member.
    let old = unsafe { before.hypercall };
    // SAFETY: both views of the flags word are plain integers.
    let flags = unsafe { hc.__bindgen_anon_1.flags };
    // SAFETY: as above.
    let old_flags = unsafe { old.__bindgen_anon_1.flags };
    if flags & !HYPERCALL_FLAGS != 0 {
        return Ok(Err(Mismatch::new(
            EXIT,
            "hypercall.flags",
            format!("no bits but KVM_EXIT_HYPERCALL_LONG_MODE ({HYPERCALL_FLAGS:#x})"),
            format!("{flags:#x}"),
        )
        .stale_if(flags == old_flags)));
    }
    let long = long_mode()?;
    if (flags & HYPERCALL_FLAGS != 0) != long {
        let want = if long { "set: the vCPU is in 64-bit mode" } else { "clear: the vCPU is not in 64-bit mode" };
        return Ok(Err(Mismatch::new(
            EXIT,
            "hypercall.flags bit KVM_EXIT_HYPERCALL_LONG_MODE",
            want,
            format!("{flags:#x}"),
        )
        .stale_if(flags == old_flags)));
    }
    // Decided once per process by ForRunningKernel::expected (deciding
    // searches the kernel history, far too slow for every hypercall exit).
    let expectation = HYPERCALL_EXIT_ZEROES_RET.expected()?;
    if old.ret == 0 {
        // Both outcomes of the rule leave 0 here.
        if hc.ret != 0 {
            return Ok(Err(Mismatch::new(
                EXIT,
                "hypercall.ret",
                "0 (it was 0 before KVM_RUN)",
                format!("{:#x}", hc.ret),
            )));
        }
        return Ok(Ok(()));
    }
    let zeroed = match hc.ret {
        0 => true,
        r if r == old.ret => false,
        r => {
            return Ok(Err(Mismatch::new(
                EXIT,
                "hypercall.ret",
                format!("0 or {:#x}, the value before KVM_RUN ({})", old.ret, HYPERCALL_EXIT_ZEROES_RET.id),
                format!("{r:#x}"),
            )));
        }
    };
    Ok(expectation.check(zeroed).map_err(|check| {
        let expected = if zeroed { format!("{:#x}, left as before KVM_RUN", old.ret) } else { "0x0".to_string() };
        let mut m = Mismatch::new(EXIT, "hypercall.ret", expected, format!("{:#x}", hc.ret)).stale_if(!zeroed);
        // Decided: the reason; undecided: the earlier check it disagrees with.
        m.why = Some(if expectation.outcome.is_some() { expectation.why.clone() } else { check });
        m
    }))
}

pub(crate) fn check_internal_error(now: &ExitUnion) -> Result<(), Mismatch> {
    const EXIT: &str = "KVM_EXIT_INTERNAL_ERROR";
    // SAFETY: the caller saw exit_reason KVM_EXIT_INTERNAL_ERROR; the
    // emulation_failure view overlays the same plain integers.
    let (internal, emulation) = unsafe { (now.internal, now.emulation_failure) };
    if !(kvm_bindings::KVM_INTERNAL_ERROR_EMULATION..=kvm_bindings::KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON)
        .contains(&internal.suberror)
    {
        return Err(Mismatch::new(
            EXIT,
            "internal.suberror",
            "a KVM_INTERNAL_ERROR_* value (1 to 4)",
            internal.suberror.to_string(),
        ));
    }
    let capacity = internal.data.len() as u32;
    if internal.ndata > capacity {
        return Err(Mismatch::new(EXIT, "internal.ndata", format!("at most {capacity}"), internal.ndata.to_string()));
    }
    if internal.suberror == kvm_bindings::KVM_INTERNAL_ERROR_EMULATION && internal.ndata >= 1 {
        if emulation.flags & !EMULATION_FLAGS != 0 {
            return Err(Mismatch::new(
                EXIT,
                "emulation_failure.flags",
                format!("no bits but KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES ({EMULATION_FLAGS:#x})"),
                format!("{:#x}", emulation.flags),
            ));
        }
        if emulation.flags & EMULATION_FLAGS != 0 {
            // SAFETY: the union's only member is plain bytes.
            let insn = unsafe { emulation.__bindgen_anon_1.__bindgen_anon_1 };
            if internal.ndata < 3 || usize::from(insn.insn_size) > insn.insn_bytes.len() {
                return Err(Mismatch::new(
                    EXIT,
                    "emulation_failure.insn_size",
                    "at most 15, with ndata covering flags and the 16 instruction bytes (3 or more)",
                    format!("{} (ndata {})", insn.insn_size, internal.ndata),
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn union() -> ExitUnion {
        ExitUnion { padding: [0; 256] }
    }

    #[test]
    fn io_fields_are_bounded_and_in_data_is_zero() {
        let mut now = union();
        now.io = kvm_bindings::kvm_run__bindgen_ty_1__bindgen_ty_4 {
            direction: IO_IN,
            size: 4,
            port: 0x80,
            count: 1,
            data_offset: PIO_DATA_OFFSET,
        };
        assert_eq!(io_data_range(&now, 0x3000).unwrap(), 0x1000..0x1004);
        assert!(check_io(&now, &[0; 4]).is_ok());
        let stale = check_io(&now, &[0, 0x12, 0, 0]).unwrap_err();
        assert_eq!(stale.field, "the port data of an IN (at io.data_offset)");
        now.io.data_offset = 0x2000;
        let e = io_data_range(&now, 0x3000).unwrap_err().into_error(0).to_string();
        assert!(e.contains("io.data_offset: expected 0x1000 (KVM_PIO_PAGE_OFFSET pages), got 0x2000"), "{e}");
        (now.io.data_offset, now.io.count) = (PIO_DATA_OFFSET, 0x1000);
        assert_eq!(io_data_range(&now, 0x3000).unwrap_err().field, "io.count");
        (now.io.count, now.io.size) = (1, 3);
        assert_eq!(io_data_range(&now, 0x3000).unwrap_err().field, "io.size");
    }

    #[test]
    fn an_mmio_write_leaves_the_bytes_past_len_alone() {
        let mut before = union();
        before.mmio.data = [0xaa; 8];
        let mut now = before;
        // SAFETY: the union's members are plain integers: any bytes are valid.
        let mut mmio = unsafe { now.mmio };
        (mmio.len, mmio.is_write) = (4, 1);
        mmio.data[..4].copy_from_slice(&[1, 2, 3, 4]);
        now.mmio = mmio;
        assert!(check_mmio(&now, &before).is_ok());
        mmio.data[6] = 0;
        now.mmio = mmio;
        assert_eq!(check_mmio(&now, &before).unwrap_err().field, "mmio.data past mmio.len");
        now.mmio.len = 9;
        assert_eq!(check_mmio(&now, &before).unwrap_err().field, "mmio.len");
    }

    #[test]
    fn memory_fault_flags_carry_only_the_private_bit_and_name_stale_values() {
        let mut before = union();
        before.mmio.phys_addr = 0x1234_5000;
        let mut now = before;
        // A kernel that ORs PRIVATE into a field it did not clear.
        // SAFETY: the union's members are plain integers: any bytes are valid.
        let mut fault = unsafe { now.memory_fault };
        fault.flags |= MEMORY_FAULT_FLAGS;
        (fault.gpa, fault.size) = (0x1000, 0x1000);
        now.memory_fault = fault;
        let e = check_memory_fault(&now, &before, Some(Errno::EFAULT)).unwrap_err();
        assert_eq!((e.field, e.actual.as_str(), e.stale), ("memory_fault.flags", "0x12345008", false));
        now.memory_fault.flags = MEMORY_FAULT_FLAGS;
        assert!(check_memory_fault(&now, &before, Some(Errno::EFAULT)).is_ok());
        assert_eq!(check_memory_fault(&now, &before, None).unwrap_err().field, "KVM_RUN's return");
        now.memory_fault.size = 0;
        assert_eq!(check_memory_fault(&now, &before, Some(Errno::EFAULT)).unwrap_err().field, "memory_fault.size");
        let mut same = now;
        (same.memory_fault.size, same.memory_fault.gpa) = (0x1000, 0x1234);
        let e = check_memory_fault(&same, &same, Some(Errno::EFAULT)).unwrap_err();
        assert_eq!((e.field, e.stale), ("memory_fault.gpa", true));
        assert!(e.into_error(3).to_string().contains("left over from an earlier exit"));
    }

    #[test]
    fn hypercall_flags_carry_only_long_mode_matching_the_vcpu() {
        let mut now = union();
        now.hypercall.nr = 12;
        now.hypercall.__bindgen_anon_1.flags = HYPERCALL_FLAGS;
        let before = union();
        assert!(check_hypercall(&now, &before, || Ok(true)).unwrap().is_ok());
        let e = check_hypercall(&now, &before, || Ok(false)).unwrap().unwrap_err();
        assert_eq!(e.field, "hypercall.flags bit KVM_EXIT_HYPERCALL_LONG_MODE");
        now.hypercall.__bindgen_anon_1.flags = 0x3;
        assert_eq!(check_hypercall(&now, &before, || Ok(true)).unwrap().unwrap_err().field, "hypercall.flags");
        now.hypercall.__bindgen_anon_1.flags = HYPERCALL_FLAGS;
        now.hypercall.ret = 0x16;
        let e = check_hypercall(&now, &before, || Ok(true)).unwrap().unwrap_err();
        assert_eq!((e.field, e.actual.as_str()), ("hypercall.ret", "0x16"));
    }

    #[test]
    fn internal_errors_have_defined_suberrors_and_bounded_data() {
        let mut now = union();
        (now.internal.suberror, now.internal.ndata) = (kvm_bindings::KVM_INTERNAL_ERROR_DELIVERY_EV, 6);
        assert!(check_internal_error(&now).is_ok());
        now.internal.ndata = 17;
        assert_eq!(check_internal_error(&now).unwrap_err().field, "internal.ndata");
        (now.internal.suberror, now.internal.ndata) = (9, 0);
        assert_eq!(check_internal_error(&now).unwrap_err().field, "internal.suberror");
        now.emulation_failure.suberror = kvm_bindings::KVM_INTERNAL_ERROR_EMULATION;
        now.emulation_failure.ndata = 3;
        now.emulation_failure.flags = 1;
        now.emulation_failure.__bindgen_anon_1.__bindgen_anon_1.insn_size = 16;
        assert_eq!(check_internal_error(&now).unwrap_err().field, "emulation_failure.insn_size");
        now.emulation_failure.flags = 2;
        assert_eq!(check_internal_error(&now).unwrap_err().field, "emulation_failure.flags");
    }
}
