// Shared by the build script (through `include!`) and the crate: the guest
// memory layout and the guest-to-host call protocol. Keep it free of `use`
// items and attributes so both contexts can include it verbatim.

/// Guest physical layout of the "system" memslot every VM gets (slot 0).
pub mod layout {
    /// GDT: null, 64-bit code (0x08), data (0x10), 64-bit TSS (0x18, two entries).
    pub const GDT_GPA: u64 = 0x1000;
    /// The 64-bit TSS the task register points at (VMX insists on a usable TR).
    pub const TSS_GPA: u64 = 0x1800;
    /// 256 interrupt gates; the first 32 point into the guest runtime.
    pub const IDT_GPA: u64 = 0x2000;
    /// Top-level page table.
    pub const PML4_GPA: u64 = 0x3000;
    /// The single PDPT (covers 512 GiB; only the first `IDENTITY_MAP_GIB` entries are used).
    pub const PDPT_GPA: u64 = 0x4000;
    /// First of `IDENTITY_MAP_GIB` page directories, mapping 2 MiB pages.
    pub const PD_GPA: u64 = 0x5000;
    /// GiB of guest physical space identity-mapped (virtual == physical).
    pub const IDENTITY_MAP_GIB: u64 = 8;
    /// Per-vCPU host-to-guest mailboxes, `MAILBOX_STRIDE` bytes each.
    pub const MAILBOX_GPA: u64 = 0xE000;
    /// Size of one vCPU's mailbox.
    pub const MAILBOX_STRIDE: u64 = 0x40;
    /// The guest runtime (exception stubs).
    pub const RUNTIME_GPA: u64 = 0x10000;
    /// Where test payloads are loaded.
    pub const PAYLOAD_GPA: u64 = 0x20000;
    /// Maximum payload size.
    pub const PAYLOAD_MAX: u64 = 0x10000;
    /// Top of the stack of vCPU 0; vCPU n's stack top is `STACKS_TOP - n * STACK_SIZE`.
    pub const STACKS_TOP: u64 = 0x100000;
    /// Stack size of each vCPU.
    pub const STACK_SIZE: u64 = 0x4000;
    /// Most vCPUs the layout has stacks and mailboxes for.
    pub const MAX_VCPUS: u64 = 32;
    /// Size of the system memslot at GPA 0.
    pub const SYSTEM_SLOT_SIZE: u64 = 0x200000;
    /// First GPA outside the system slot that tests may use for their own slots.
    pub const TEST_AREA_GPA: u64 = 0x1_0000_0000;
}

/// The guest-to-host call protocol.
///
/// The guest executes `out dx, eax` with `dx = PORT` and `eax` one of the
/// call codes; arguments travel in `rdi, rsi, r8, r9, r10` (read by the host
/// with `KVM_GET_REGS`). Host-to-guest commands for the agent payload travel
/// through the vCPU's mailbox, whose address the guest finds in `r15`.
pub mod protocol {
    /// I/O port of guest calls (not 0x7e, which KVM quirks).
    pub const PORT: u16 = 0x1000;
    /// `SYNC(rdi)`: a checkpoint value.
    pub const CALL_SYNC: u32 = 1;
    /// `DONE`: the payload finished.
    pub const CALL_DONE: u32 = 2;
    /// `ASSERT_FAIL(rdi = id, rsi, r8, r9, r10 = values)`.
    pub const CALL_ASSERT_FAIL: u32 = 3;
    /// `READY(rdi = result of the previous command)`: the agent awaits a command.
    pub const CALL_READY: u32 = 4;
    /// `EXCEPTION(rdi = vector, rsi = error code, r8 = RIP, r9 = CR2)`.
    pub const CALL_EXCEPTION: u32 = 5;

    /// Mailbox word offsets (each a u64): the command and its arguments.
    pub const MAILBOX_OP: u64 = 0;
    /// First argument; argument n lives at `MAILBOX_ARG0 + 8 * n`.
    pub const MAILBOX_ARG0: u64 = 8;

    /// Agent: `result = *(u64 *)a0`.
    pub const OP_READ: u64 = 1;
    /// Agent: `*(u64 *)a0 = a1`.
    pub const OP_WRITE: u64 = 2;
    /// Agent: fill `a1` bytes (multiple of 8) at `a0` with the u64 `a2`.
    pub const OP_FILL: u64 = 3;
    /// Agent: check `a1` bytes at `a0` hold the u64 `a2`; on a mismatch,
    /// `ASSERT_FAIL(ASSERT_PATTERN_MISMATCH, gpa, expected, actual)` for the
    /// first one only, then `READY(0)`.
    pub const OP_CHECK: u64 = 4;
    /// Agent: `call a0`; result is the callee's `rax`.
    pub const OP_EXEC: u64 = 5;
    /// Agent: KVM hypercall `nr = a0` with `a1..a4` in rbx, rcx, rdx, rsi; result is `rax`.
    pub const OP_HYPERCALL: u64 = 6;
    /// Agent: touch one u64 every `a2` bytes over `a1` bytes at `a0`, writing
    /// the address when `a3 != 0`, else reading; result is the touch count.
    pub const OP_TOUCH: u64 = 7;
    /// Agent: report `DONE`.
    pub const OP_DONE: u64 = 8;

    /// Assertion id: a pattern check found a different value.
    pub const ASSERT_PATTERN_MISMATCH: u64 = 1;
    /// Assertion id: the agent got an op code it does not know (`rsi` = op).
    pub const ASSERT_UNKNOWN_OP: u64 = 2;
}
