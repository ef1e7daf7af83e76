// Shared by the build script (through `include!`, inside a module) and the
// crate: the guest memory layout, the guest-to-host call protocol and the
// agent's commands. Keep it free of `use` items and inner attributes so both
// contexts can include it verbatim.

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
    /// The agent's probe tables (`Op::Probe`), one of `PROBE_TABLE_STRIDE`
    /// bytes per vCPU, above the stacks and inside the system memslot.
    pub const PROBE_TABLE_GPA: u64 = STACKS_TOP;
    /// Size of one vCPU's probe table.
    pub const PROBE_TABLE_STRIDE: u64 = 0x8000;
    const _: () = assert!(PROBE_TABLE_GPA + MAX_VCPUS * PROBE_TABLE_STRIDE <= SYSTEM_SLOT_SIZE);
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

    /// A command argument as mailbox words.
    trait Words {
        /// How many words it takes.
        const WORDS: usize;
        /// Appends its words at `words[*n..]`.
        fn put(self, words: &mut [u64; 5], n: &mut usize);
    }

    impl Words for u64 {
        const WORDS: usize = 1;
        fn put(self, words: &mut [u64; 5], n: &mut usize) {
            words[*n] = self;
            *n += 1;
        }
    }

    impl Words for bool {
        const WORDS: usize = 1;
        fn put(self, words: &mut [u64; 5], n: &mut usize) {
            u64::from(self).put(words, n);
        }
    }

    impl<const N: usize> Words for [u64; N] {
        const WORDS: usize = N;
        fn put(self, words: &mut [u64; 5], n: &mut usize) {
            for word in self {
                word.put(words, n);
            }
        }
    }

    /// Defines the agent's commands from one table of `Name = code { args }`
    /// rows: [`Op`] (a command with its arguments, as the host submits it,
    /// with [`Op::encode`]) and [`OpCode`] (which command, as the guest's
    /// dispatcher in the build script matches on it). Adding a command is a
    /// row here plus its handler in `build.rs`, which the compiler demands.
    macro_rules! agent_ops {
        ($( $(#[doc = $doc:literal])* $name:ident = $code:literal { $($arg:ident: $ty:ty),* } )*) => {
            /// One agent command with its arguments (mailbox words `a0..a4`, in order).
            #[derive(Debug, Clone, Copy, PartialEq, Eq)]
            pub enum Op {
                $( $(#[doc = $doc])* $name { $( #[allow(missing_docs)] $arg: $ty ),* }, )*
            }

            /// Which agent command: the code the host writes to `MAILBOX_OP`.
            #[derive(Debug, Clone, Copy, PartialEq, Eq)]
            pub enum OpCode {
                $( $(#[doc = $doc])* $name = $code, )*
            }

            impl OpCode {
                /// Every command, in table order.
                pub const ALL: &'static [OpCode] = &[$(OpCode::$name),*];
            }

            impl Op {
                /// The op code and the five mailbox argument words.
                pub fn encode(self) -> (u64, [u64; 5]) {
                    let (mut words, mut n) = ([0; 5], 0);
                    let code = match self {
                        $( Op::$name { $($arg),* } => {
                            $( Words::put($arg, &mut words, &mut n); )*
                            OpCode::$name
                        } )*
                    };
                    (code as u64, words)
                }
            }

            // Every command's arguments fit the mailbox.
            $( const _: () = assert!(0 $(+ <$ty as Words>::WORDS)* <= 5, stringify!($name)); )*
        };
    }

    /// Mailbox word offsets (each a u64): the command and its arguments.
    pub const MAILBOX_OP: u64 = 0;
    /// First argument; argument n lives at `MAILBOX_ARG0 + 8 * n`.
    pub const MAILBOX_ARG0: u64 = 8;
    /// `watch_memslot` progress, written on every spin iteration so the host
    /// can wait for "the guest is spinning in phase i" instead of sleeping:
    /// the phase index plus one (0: not spinning yet).
    pub const MAILBOX_WATCH_PHASE: u64 = 0x30;
    /// `watch_memslot` progress: spin iterations so far, over all phases.
    pub const MAILBOX_WATCH_SPINS: u64 = 0x38;
    // Both lie past the agent's five arguments and inside one mailbox.
    const _: () = assert!(MAILBOX_WATCH_PHASE >= MAILBOX_ARG0 + 5 * 8);
    const _: () = assert!(MAILBOX_WATCH_SPINS + 8 <= super::layout::MAILBOX_STRIDE);

    agent_ops! {
        /// Read the u64 at `gpa`; result: the value.
        Read = 1 { gpa: u64 }
        /// Write `value` to the u64 at `gpa`.
        Write = 2 { gpa: u64, value: u64 }
        /// Fill `len` bytes (a multiple of 8) at `gpa` with the u64 `pattern`.
        Fill = 3 { gpa: u64, len: u64, pattern: u64 }
        /// Check that `len` bytes at `gpa` hold the u64 `pattern`; on a
        /// mismatch, `ASSERT_FAIL(ASSERT_PATTERN_MISMATCH, gpa, expected,
        /// actual)` for the first one only, then `READY(0)`.
        Check = 4 { gpa: u64, len: u64, pattern: u64 }
        /// Call the code at `gpa`; result: the callee's `rax`.
        Exec = 5 { gpa: u64 }
        /// KVM hypercall `nr` with `args` in rbx, rcx, rdx, rsi; result: `rax`.
        Hypercall = 6 { nr: u64, args: [u64; 4] }
        /// Touch one u64 every `stride` bytes over `len` bytes at `gpa`,
        /// writing its address when `write`, else reading; result: the count.
        Touch = 7 { gpa: u64, len: u64, stride: u64, write: bool }
        /// Report `DONE`.
        Done = 8 {}
        /// Load `preset` into `rax`, then `in` from `port` with an operand
        /// of `size` bytes (1 → `al`, 2 → `ax`, else `eax`); result: `rax`.
        PortIn = 9 { port: u64, size: u64, preset: u64 }
        /// Run `count` probes of the table at `table`, in order, each three
        /// u64s: the 8-byte aligned address with `PROBE_*` flags in its low
        /// bits, the expected value, the value to store. A probe with
        /// `PROBE_CHECK` reads the address and compares; the first
        /// mismatch reports `ASSERT_FAIL(ASSERT_PATTERN_MISMATCH, address,
        /// expected, actual, probe index)` and ends the command. One with
        /// `PROBE_STORE` then stores its value. Result: the probe count.
        Probe = 10 { table: u64, count: u64 }
    }

    /// `Op::Probe` flag: read the address and compare with the expected value.
    pub const PROBE_CHECK: u64 = 1;
    /// `Op::Probe` flag: store the value at the address (after any check).
    pub const PROBE_STORE: u64 = 2;
    /// Bytes of one `Op::Probe` table entry.
    pub const PROBE_ENTRY_SIZE: u64 = 24;

    /// Assertion id: a pattern check found a different value.
    pub const ASSERT_PATTERN_MISMATCH: u64 = 1;
    /// Assertion id: the agent got an op code it does not know (`rsi` = op).
    pub const ASSERT_UNKNOWN_OP: u64 = 2;
}
