//! Exits of different kinds in one vCPU, one after the other: after each,
//! every field a VMM reads holds exactly what KVM must have written, never
//! a value left over from the exit before.
//!
//! `kvm_run`'s exit union is one block of bytes shared by every exit kind,
//! and the VMM writes into it too (an MMIO read's data, a port read's data,
//! a hypercall's answer in `hypercall.ret`). A field KVM forgets to set
//! shows whatever an earlier exit or the VMM left there: upstream made
//! `KVM_EXIT_HYPERCALL` zero `hypercall.ret` (9a1dfeff4414) because QEMU
//! took the field for 0, and `kvm_prepare_memory_fault_exit()` clears
//! `memory_fault.flags` before it ORs in `KVM_MEMORY_EXIT_FLAG_PRIVATE`.
//! The harness checks the fields no scenario can know (ranges, must-be-zero
//! bits, zeroed port data, `hypercall.ret`; see `Vcpu::run`) on every exit
//! of every test; here each exit's scenario-known fields are compared too,
//! and every value the VMM or an exit leaves behind is distinct, so a
//! left-over value cannot pass for a new one.
//!
//! Part of the `private_mem_exits` binary (a binary of its own cost more
//! to start in the guest than its tests took to run).
//!
//! The vCPU runs the guest agent, which reports each command's end with a
//! port write (`KVM_EXIT_IO`, OUT), so an OUT exit lies between any two of
//! the others; the fields it does not overwrite (`hypercall.ret` and
//! `flags`, `memory_fault.size`, `mmio.len`) carry over from the exit
//! before. The kinds: a port read (`KVM_EXIT_IO`, IN), an MMIO read or
//! write (`KVM_EXIT_MMIO`), a private read of a page without guest_memfd
//! (`KVM_EXIT_MEMORY_FAULT`), `KVM_HC_MAP_GPA_RANGE`
//! (`KVM_EXIT_HYPERCALL`, answered with a distinct non-zero value), an
//! instruction fetch from emulated MMIO (`KVM_EXIT_INTERNAL_ERROR`,
//! emulation failure) and a triple fault (`KVM_EXIT_SHUTDOWN`). After the
//! last three the agent is restarted from its entry state.

use std::sync::Arc;

use guest_payloads::layout::TEST_AREA_GPA;
use guest_payloads::GUEST_AGENT;
use kvm_harness::bindings::{kvm_regs, kvm_sregs, KVM_INTERNAL_ERROR_EMULATION, KVM_MEMORY_EXIT_FLAG_PRIVATE};
use kvm_harness::uapi::{KVM_EXIT_HYPERCALL_LONG_MODE, KVM_HC_MAP_GPA_RANGE, KVM_MAP_GPA_RANGE_ENCRYPTED};
use kvm_harness::{Agent, Cap, Errno, Error, Exit, Kvm, Need, Op, Result, Suite, Vm, VmType};

const PAGE: u64 = 4096;
const SLOT: u32 = 1;
/// A memslot of anonymous memory (no guest_memfd): its first page is made
/// private, so a guest read of it exits `KVM_EXIT_MEMORY_FAULT`.
const SLOT_GPA: u64 = TEST_AREA_GPA;
const PRIVATE_GPA: u64 = SLOT_GPA;
/// No memslot covers it: accesses are emulated MMIO.
const MMIO_GPA: u64 = TEST_AREA_GPA + 0x40_0000;
/// What the hypercall asks to convert (the VMM refuses, with its answer).
const MAP_GPA: u64 = SLOT_GPA + PAGE;
/// The port the guest reads (COM2, as in vcpu_state).
const PORT: u16 = 0x2f8;
/// A non-canonical address: any access raises #GP.
const NONCANONICAL: u64 = 0x8000_0000_0000_0000;

/// One kind of exit the sequences make.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Io,
    Mmio,
    MemoryFault,
    Hypercall,
    InternalError,
    Shutdown,
}

impl Kind {
    const ALL: [Kind; 6] =
        [Kind::Io, Kind::Mmio, Kind::MemoryFault, Kind::Hypercall, Kind::InternalError, Kind::Shutdown];

    fn name(self) -> &'static str {
        match self {
            Kind::Io => "io",
            Kind::Mmio => "mmio",
            Kind::MemoryFault => "memory_fault",
            Kind::Hypercall => "hypercall",
            Kind::InternalError => "internal_error",
            Kind::Shutdown => "shutdown",
        }
    }
}

/// A sequence in which every kind follows every kind (itself included)
/// exactly once: a de Bruijn sequence of order 2 over the kinds, turned so
/// that it starts with two hypercalls (the stale `hypercall.ret` upstream
/// fixed shows at once) and made linear by repeating its first element at
/// the end (37 exits).
fn every_pair() -> Vec<Kind> {
    let k = Kind::ALL.len();
    // The standard recursive construction (concatenated Lyndon words).
    fn db(t: usize, p: usize, k: usize, a: &mut [usize; 3], out: &mut Vec<usize>) {
        if t > 2 {
            if 2 % p == 0 {
                out.extend_from_slice(&a[1..=p]);
            }
        } else {
            a[t] = a[t - p];
            db(t + 1, p, k, a, out);
            for j in a[t - p] + 1..k {
                a[t] = j;
                db(t + 1, t, k, a, out);
            }
        }
    }
    let mut out = Vec::new();
    db(1, 1, k, &mut [0; 3], &mut out);
    let hypercall = Kind::ALL.iter().position(|&kind| kind == Kind::Hypercall).expect("a listed kind");
    let turn = (0..out.len()).find(|&i| out[i] == hypercall && out[(i + 1) % out.len()] == hypercall).unwrap_or(0);
    out.rotate_left(turn);
    out.push(out[0]);
    out.into_iter().map(|i| Kind::ALL[i]).collect()
}

/// The vCPU, its entry state, and the values that make each exit distinct.
struct Run {
    vm: Vm,
    agent: Agent,
    entry: (kvm_regs, kvm_sregs),
    /// Counts exits, so each leaves its own values behind.
    n: u64,
}

impl Run {
    fn new(kvm: &Arc<Kvm>) -> Result<Self> {
        let vm = Vm::with_payload(kvm, VmType::SwProtected, &GUEST_AGENT)?;
        vm.add_memory(SLOT, SLOT_GPA, 2 * PAGE)?;
        vm.make_private(PRIVATE_GPA, PAGE)?;
        vm.enable_map_gpa_range_exits()?;
        let vcpu = vm.vcpu(0, [0; 4])?;
        let entry = (vcpu.regs()?, vcpu.sregs()?);
        let agent = Agent::start(vcpu)?;
        Ok(Self { vm, agent, entry, n: 0 })
    }

    /// The agent starts over from its entry state (after an exit it cannot
    /// return from) and reports READY.
    fn restart(&mut self, after: &str) -> Result<()> {
        let vcpu = self.agent.vcpu();
        vcpu.set_sregs(&self.entry.1)?;
        vcpu.set_regs(&self.entry.0)?;
        self.agent.wait_ready(&format!("restarting after {after}")).map(drop)
    }

    /// Makes one exit of `kind`, compares the fields only this scenario
    /// knows, and brings the agent back to READY.
    fn exit(&mut self, kind: Kind) -> Result<()> {
        self.n += 1;
        let n = self.n;
        let rule = format!("{} sets every field a VMM reads", exit_name(kind));
        match kind {
            Kind::Io => {
                let size = [1u8, 2, 4][(n % 3) as usize];
                let preset = 0x0123_4567_89ab_cdef ^ n;
                self.agent.submit(Op::PortIn { port: u64::from(PORT), size: u64::from(size), preset })?;
                let exit = self.agent.vcpu().run()?;
                let want = Exit::Io { port: PORT, out: false, size, count: 1, data: 0 };
                expect_exit(&rule, &exit, &want)?;
                let data = (0x5a5a_5a00 | n as u32).to_le_bytes();
                self.agent.vcpu().complete_pio_in(&data[..usize::from(size)])?;
                self.agent.wait_ready("the port read").map(drop)
            }
            Kind::Mmio if n % 2 == 0 => {
                let value = 0x1111_1111_1111_1111u64.wrapping_mul(n % 15 + 1);
                self.agent.submit(Op::Write { gpa: MMIO_GPA, value })?;
                let exit = self.agent.vcpu().run()?;
                let want = Exit::Mmio { gpa: MMIO_GPA, len: 8, is_write: true, data: value.to_le_bytes() };
                expect_exit(&rule, &exit, &want)?;
                self.agent.wait_ready("the MMIO write").map(drop)
            }
            Kind::Mmio => {
                self.agent.submit(Op::Read { gpa: MMIO_GPA })?;
                let exit = self.agent.vcpu().run()?;
                match exit {
                    Exit::Mmio { gpa: MMIO_GPA, len: 8, is_write: false, .. } => {}
                    other => return Err(unexpected(&rule, "KVM_EXIT_MMIO read of 8 bytes at MMIO_GPA", &other)),
                }
                let value = 0x0f0f_0f0f_0000_0000 | n;
                self.agent.vcpu().complete_mmio_read(&value.to_le_bytes())?;
                let got = self.agent.wait_ready("the MMIO read")?;
                kvm_harness::expect_eq(&rule, "the value the guest's MMIO read returned", got, value)
            }
            Kind::MemoryFault => {
                self.agent.submit(Op::Read { gpa: PRIVATE_GPA + 8 * (n % 512) })?;
                let exit = self.agent.vcpu().run()?;
                let want = Exit::MemoryFault {
                    flags: u64::from(KVM_MEMORY_EXIT_FLAG_PRIVATE),
                    gpa: PRIVATE_GPA,
                    size: PAGE,
                    errno: Some(Errno::EFAULT),
                };
                expect_exit(&rule, &exit, &want)?;
                self.restart("the memory fault")
            }
            Kind::Hypercall => {
                let attrs = if n % 2 == 0 { KVM_MAP_GPA_RANGE_ENCRYPTED } else { 0 };
                self.agent.submit(Op::Hypercall { nr: KVM_HC_MAP_GPA_RANGE, args: [MAP_GPA, 1, attrs, 0] })?;
                let exit = self.agent.vcpu().run()?;
                match exit {
                    Exit::Hypercall { nr: KVM_HC_MAP_GPA_RANGE, args, flags: KVM_EXIT_HYPERCALL_LONG_MODE }
                        if args[..3] == [MAP_GPA, 1, attrs] => {}
                    other => {
                        return Err(unexpected(
                            &rule,
                            &format!(
                                "KVM_EXIT_HYPERCALL {{ nr KVM_HC_MAP_GPA_RANGE, args[0..3] [{MAP_GPA:#x}, 1, {attrs:#x}], \
                                 flags KVM_EXIT_HYPERCALL_LONG_MODE }}"
                            ),
                            &other,
                        ));
                    }
                }
                // A distinct non-zero answer, left in hypercall.ret for the
                // next hypercall exit to overwrite.
                let answer = 0xa5a5_0000 | n;
                self.agent.vcpu().set_hypercall_ret(answer)?;
                let got = self.agent.wait_ready("KVM_HC_MAP_GPA_RANGE")?;
                kvm_harness::expect_eq(&rule, "the guest's rax after the VMM answered", got, answer)
            }
            Kind::InternalError => {
                self.agent.submit(Op::Exec { gpa: MMIO_GPA })?;
                let exit = self.agent.vcpu().run()?;
                match exit {
                    Exit::InternalError { suberror: KVM_INTERNAL_ERROR_EMULATION, .. } => {}
                    other => {
                        return Err(unexpected(
                            &rule,
                            "KVM_EXIT_INTERNAL_ERROR with KVM_INTERNAL_ERROR_EMULATION (a fetch from emulated MMIO)",
                            &other,
                        ));
                    }
                }
                self.restart("the emulation failure")
            }
            Kind::Shutdown => {
                // No IDT: the #GP of a non-canonical read cannot be
                // delivered, nor the #DF that follows: a triple fault.
                let mut sregs = self.entry.1;
                sregs.idt.limit = 0;
                self.agent.vcpu().set_sregs(&sregs)?;
                self.agent.submit(Op::Read { gpa: NONCANONICAL })?;
                let exit = self.agent.vcpu().run()?;
                expect_exit(&rule, &exit, &Exit::Shutdown)?;
                self.restart("the triple fault")
            }
        }
    }
}

fn exit_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Io => "KVM_EXIT_IO",
        Kind::Mmio => "KVM_EXIT_MMIO",
        Kind::MemoryFault => "KVM_EXIT_MEMORY_FAULT",
        Kind::Hypercall => "KVM_EXIT_HYPERCALL",
        Kind::InternalError => "KVM_EXIT_INTERNAL_ERROR",
        Kind::Shutdown => "KVM_EXIT_SHUTDOWN",
    }
}

fn unexpected(rule: &str, wanted: &str, got: &Exit) -> Error {
    Error::rule(rule, format!("expected {wanted}, got {} {got:x?}", got.reason_name()))
}

fn expect_exit(rule: &str, got: &Exit, want: &Exit) -> Result<()> {
    if got == want {
        return Ok(());
    }
    Err(Error::rule(rule, format!("expected {want:x?}, got {} {got:x?}", got.reason_name())))
}

/// Runs `kinds` in one vCPU; a failure names the exit and the ones before.
fn sequence(kvm: &Arc<Kvm>, kinds: &[Kind]) -> Result<()> {
    let mut run = Run::new(kvm)?;
    for (i, &kind) in kinds.iter().enumerate() {
        run.exit(kind).map_err(|e| {
            let before: Vec<&str> = kinds[..i].iter().map(|k| k.name()).collect();
            let context = format!(
                "exit {} of {} ({}), after [{}] in the same vCPU",
                i + 1,
                kinds.len(),
                kind.name(),
                before.join(", ")
            );
            match e {
                Error::Rule { rule, detail } => Error::Rule { rule, detail: format!("{context}: {detail}") },
                other => Error::Guest(format!("{context}: {other}")),
            }
        })?;
    }
    // The VM is still the one the sequence started with.
    run.vm.check_alive()?;
    run.agent.done().map(drop)
}

/// The sequence covers every ordered pair of kinds (a host check of the
/// construction, so the test cannot quietly cover less).
fn every_pair_covers_each_ordered_pair_once() -> Result<()> {
    let seq = every_pair();
    let pairs: Vec<(Kind, Kind)> = seq.windows(2).map(|w| (w[0], w[1])).collect();
    let n = Kind::ALL.len();
    kvm_harness::ensure!(
        pairs.len() == n * n,
        "the sequence has one transition per ordered pair of exit kinds",
        "{} transitions for {} pairs",
        pairs.len(),
        n * n
    );
    for a in Kind::ALL {
        for b in Kind::ALL {
            kvm_harness::ensure!(
                pairs.contains(&(a, b)),
                "the sequence has one transition per ordered pair of exit kinds",
                "{} is never followed by {}",
                a.name(),
                b.name()
            );
        }
    }
    Ok(())
}

/// Registers the scenarios in `suite`.
pub fn register(suite: &mut Suite) {
    // Probed once for the five tests (each VmCap probe makes a VM).
    let needs = [
        Need::VmType(VmType::SwProtected),
        Need::VmCap(VmType::SwProtected, Cap::MemoryAttributes),
        Need::VmCap(VmType::SwProtected, Cap::ExitHypercall),
    ];
    let met: Option<std::result::Result<(), String>> =
        suite.kvm().map(|kvm| needs.iter().try_for_each(|need| need.check(kvm)));
    let needs = || match &met {
        Some(met) => {
            let met = met.clone();
            vec![Need::Check(Box::new(move |_| met.clone()))]
        }
        // No /dev/kvm: the suite reports that itself.
        None => Vec::new(),
    };
    use Kind::*;
    let orders: [&[Kind]; 4] = [
        &[Io, Mmio, MemoryFault, Hypercall],
        &[Hypercall, MemoryFault, Mmio, Io],
        &[Mmio, Hypercall, Io, Hypercall, MemoryFault],
        &[MemoryFault, Io, Hypercall, Mmio, MemoryFault],
    ];
    for order in orders {
        let names: Vec<&str> = order.iter().map(|k| k.name()).collect();
        suite.test(format!("exit_fields_exact_in_order_{}", names.join("_then_")), needs(), move |kvm| {
            sequence(kvm, order)
        });
    }
    suite.test("exit_fields_exact_after_every_other_exit_kind", needs(), |kvm| sequence(kvm, &every_pair()));
    suite.host_test(
        "every_pair_sequence_covers_each_ordered_pair_of_exit_kinds",
        every_pair_covers_each_ordered_pair_once,
    );
}
