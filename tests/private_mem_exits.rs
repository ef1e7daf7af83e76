//! Private-page fault routing on a software-protected VM (`KVM_EXIT_MEMORY_FAULT`).
//!
//! Port of the kernel's `x86/private_mem_kvm_exits_test.c`, plus what it
//! leaves implicit: every access kind (read, write, instruction fetch) gets
//! the same exit, converting the GPA back to shared lets the very same access
//! complete into the host's shared mapping, and bytes the guest writes to
//! private memory never show up in the host's shared mapping.
//!
//! The kernel rules (arch/x86/kvm/mmu/mmu.c, include/linux/kvm_host.h): a
//! fault on a GPA whose attributes say private is routed to guest_memfd; if
//! the memslot has no guest_memfd, or there is no memslot at all, `KVM_RUN`
//! fails with `EFAULT` and `exit_reason = KVM_EXIT_MEMORY_FAULT` with
//! `flags = KVM_MEMORY_EXIT_FLAG_PRIVATE` (read/write/exec are not
//! communicated), `gpa` = the faulting page's base and `size = PAGE_SIZE`.
//!
//! With them, in `exit_sequences`: exits of every kind in one vCPU, each
//! with every field exact, never a value left over from the exit before.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use guest_payloads::{layout::TEST_AREA_GPA, GUEST_AGENT};
use kvm_harness::bindings::KVM_MEMORY_EXIT_FLAG_PRIVATE;
use kvm_harness::{
    ensure, expect_ok, threads, Agent, Errno, Error, Exit, Fill, Kvm, Need, Op, Result, Suite, Vm, VmType,
};

const SLOT: u32 = 10;
const SLOT_SIZE: u64 = 2 << 20;
const PAGE: u64 = 4096;
/// The page the scenarios access: not the slot's first, so a wrong GPA in the
/// exit cannot pass by accident.
const TARGET_GPA: u64 = TEST_AREA_GPA + 3 * PAGE;

fn needs() -> Vec<Need> {
    vec![Need::VmType(VmType::SwProtected)]
}

/// Checks that `exit` is the private memory fault for the page holding
/// `accessed`, with every field exact.
fn expect_private_fault(agent: &mut Agent, exit: Exit, accessed: u64, rule: &str) -> Result<()> {
    let page = accessed & !(PAGE - 1);
    match exit {
        Exit::MemoryFault { flags, gpa, size, errno } => {
            let mut wrong = Vec::new();
            if flags != u64::from(KVM_MEMORY_EXIT_FLAG_PRIVATE) {
                wrong.push(format!(
                    "flags {flags:#x}, expected exactly KVM_MEMORY_EXIT_FLAG_PRIVATE ({KVM_MEMORY_EXIT_FLAG_PRIVATE:#x})"
                ));
            }
            if gpa != page {
                wrong.push(format!("gpa {gpa:#x}, expected the page base {page:#x} (access at {accessed:#x})"));
            }
            if size != PAGE {
                wrong.push(format!("size {size:#x}, expected PAGE_SIZE {PAGE:#x}"));
            }
            if errno != Some(Errno::EFAULT) {
                wrong.push(format!("KVM_RUN errno {errno:?}, expected EFAULT"));
            }
            ensure!(wrong.is_empty(), rule, "KVM_EXIT_MEMORY_FAULT with {}", wrong.join("; "));
            Ok(())
        }
        other => Err(Error::rule(
            rule,
            format!(
                "expected KVM_EXIT_MEMORY_FAULT (EFAULT, flags PRIVATE, gpa {page:#x}, size {PAGE:#x}), got {}",
                agent.vcpu().report(other)
            ),
        )),
    }
}

/// The agent reads `TARGET_GPA`, which must exit as its private memory fault.
fn expect_private_read_fault(agent: &mut Agent, rule: &str) -> Result<()> {
    agent.submit(Op::Read { gpa: TARGET_GPA })?;
    let exit = agent.vcpu().run()?;
    expect_private_fault(agent, exit, TARGET_GPA, rule)
}

/// A protected VM running the agent, with slot `SLOT` at `TEST_AREA_GPA`:
/// anonymous memory only (`gmem == false`) or bound to a guest_memfd.
fn protected_vm(kvm: &Arc<Kvm>, gmem: bool) -> Result<(Vm, Arc<kvm_harness::HostMemory>)> {
    let vm = Vm::with_payload(kvm, VmType::SwProtected, &GUEST_AGENT)?;
    let shared = if gmem {
        let memfd = Arc::new(vm.create_guest_memfd(SLOT_SIZE, 0)?);
        vm.add_private_memory(SLOT, TEST_AREA_GPA, SLOT_SIZE, &memfd, 0)?
    } else {
        vm.add_memory(SLOT, TEST_AREA_GPA, SLOT_SIZE)?
    };
    Ok((vm, shared))
}

#[derive(Debug, Clone, Copy)]
enum Access {
    Read,
    Write,
    Fetch,
}

impl Access {
    const ALL: [Access; 3] = [Access::Read, Access::Write, Access::Fetch];

    fn name(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Write => "write",
            Self::Fetch => "fetch",
        }
    }

    /// Where the guest accesses: reads at the page base (upstream's GPA),
    /// writes in the middle of the page (the exit still names the page).
    fn gpa(self) -> u64 {
        match self {
            Self::Read | Self::Fetch => TARGET_GPA,
            Self::Write => TARGET_GPA + 0x18,
        }
    }

    fn op(self) -> Op {
        match self {
            Self::Read => Op::Read { gpa: self.gpa() },
            Self::Write => Op::Write { gpa: self.gpa(), value: WRITTEN },
            Self::Fetch => Op::Exec { gpa: self.gpa() },
        }
    }
}

/// Host value read back by the guest once the page is shared again.
const HOST_VALUE: u64 = 0x4853_4841_5245_4421;
/// Guest value written once the page is shared again.
const WRITTEN: u64 = 0x5752_4954_5445_4e21;
/// `mov eax, 0x5afe ; ret`: what the guest fetches once the page is shared.
const CODE: [u8; 6] = [0xb8, 0xfe, 0x5a, 0x00, 0x00, 0xc3];

/// Private attribute on a slot without guest_memfd: the access exits with
/// the exact private fault; with `then_shared`, converting the page back to
/// shared lets the same access complete into the host's shared mapping.
fn not_private_slot(kvm: &Arc<Kvm>, access: Access, then_shared: bool) -> Result<()> {
    let (vm, shared) = protected_vm(kvm, false)?;
    let offset = TARGET_GPA - TEST_AREA_GPA;
    shared.write_u64(offset, HOST_VALUE);
    if matches!(access, Access::Fetch) {
        shared.write(offset, &CODE);
    }
    vm.make_private(TARGET_GPA, PAGE)?;
    let mut agent = Agent::start(vm.vcpu(0, [0; 4])?)?;
    agent.submit(access.op())?;
    let exit = agent.vcpu().run()?;
    let rule =
        format!("a private {} of a GPA whose memslot has no guest_memfd exits KVM_EXIT_MEMORY_FAULT", access.name());
    expect_private_fault(&mut agent, exit, access.gpa(), &rule)?;
    // The fault must not have been a one-off: running again without a
    // conversion faults again, identically.
    let again = agent.vcpu().run()?;
    expect_private_fault(&mut agent, again, access.gpa(), &format!("{rule}, every time it is retried"))?;
    if matches!(access, Access::Write) {
        let seen = shared.read_u64(access.gpa() - TEST_AREA_GPA);
        ensure!(
            seen == 0,
            "a private write that faulted leaves the host's shared mapping untouched",
            "host's shared mapping holds {seen:#x} at {:#x} after the faulting write of {WRITTEN:#x}",
            access.gpa()
        );
    }
    if !then_shared {
        return Ok(());
    }
    vm.make_shared(TARGET_GPA, PAGE)?;
    let rule = format!(
        "after KVM_SET_MEMORY_ATTRIBUTES(shared), the faulting {} completes in the host's shared mapping",
        access.name()
    );
    let exit = agent.vcpu().run()?;
    let result = agent.ready_from_exit(exit, access.name()).map_err(|e| Error::rule(&rule, e.to_string()))?;
    match access {
        Access::Read => ensure!(
            result == HOST_VALUE,
            &rule,
            "guest read {result:#x} at {:#x}, host's shared mapping holds {HOST_VALUE:#x}",
            access.gpa()
        ),
        Access::Write => {
            let seen = shared.read_u64(access.gpa() - TEST_AREA_GPA);
            ensure!(
                seen == WRITTEN,
                &rule,
                "guest wrote {WRITTEN:#x} at {:#x}, host's shared mapping holds {seen:#x}",
                access.gpa()
            );
        }
        Access::Fetch => ensure!(
            result == 0x5afe,
            &rule,
            "guest called the host's code at {:#x} and got rax {result:#x}, expected 0x5afe",
            access.gpa()
        ),
    }
    agent.done().map(drop)
}

/// Upstream's scenario: the vCPU keeps reading a private GPA while the host
/// deletes the memslot under it.
fn private_read_exits_memory_fault_when_memslot_is_deleted_under_running_vcpu(kvm: &Arc<Kvm>) -> Result<()> {
    let (vm, _shared) = protected_vm(kvm, true)?;
    vm.make_private(TARGET_GPA, PAGE)?;
    let mut agent = Agent::start(vm.vcpu(0, [0; 4])?)?;
    // Stride 0: the agent reads the same u64 forever.
    agent.submit(Op::Touch { gpa: TARGET_GPA, len: 8, stride: 0, write: false })?;
    std::thread::scope(|s| {
        let runner = s.spawn(move || {
            let exit = agent.vcpu().run();
            (agent, exit)
        });
        // Let the guest fault the page in from guest_memfd and spin on it.
        std::thread::sleep(Duration::from_millis(200));
        vm.delete_slot(SLOT)?;
        let (mut agent, exit) = threads::join(runner, "vCPU thread")?;
        expect_private_fault(
            &mut agent,
            exit?,
            TARGET_GPA,
            "a private read of a GPA whose memslot was deleted exits KVM_EXIT_MEMORY_FAULT",
        )
    })
}

fn private_read_exits_memory_fault_when_memslot_was_deleted(kvm: &Arc<Kvm>) -> Result<()> {
    let (vm, _shared) = protected_vm(kvm, true)?;
    vm.make_private(TARGET_GPA, PAGE)?;
    vm.delete_slot(SLOT)?;
    let mut agent = Agent::start(vm.vcpu(0, [0; 4])?)?;
    expect_private_read_fault(&mut agent, "a private read of a GPA with no memslot exits KVM_EXIT_MEMORY_FAULT")?;
    // Shared again with no memslot: the access is emulated MMIO, not a fault.
    vm.make_shared(TARGET_GPA, PAGE)?;
    match agent.vcpu().run()? {
        Exit::Mmio { gpa: TARGET_GPA, len: 8, is_write: false, .. } => Ok(()),
        other => Err(Error::rule(
            "after conversion to shared, a read of a GPA with no memslot exits KVM_EXIT_MMIO",
            format!("expected an 8-byte MMIO read at {TARGET_GPA:#x}, got {}", agent.vcpu().report(other)),
        )),
    }
}

fn bytes_written_privately_never_appear_in_host_shared_mapping(kvm: &Arc<Kvm>) -> Result<()> {
    const HOST: u64 = 0x4848_4848_4848_4848;
    const PRIVATE_1: u64 = 0x5031_5031_5031_5031;
    const GUEST_SHARED: u64 = 0x5353_5353_5353_5353;
    const PRIVATE_2: u64 = 0x5032_5032_5032_5032;
    const LEN: u64 = 16 * PAGE;
    let (vm, shared) = protected_vm(kvm, true)?;
    let rule = "private writes by the guest never reach the host's shared mapping of the same GPA";
    let leak_check = |when: &str, secrets: &[u64]| -> Result<()> {
        let mut buf = vec![0u8; SLOT_SIZE as usize];
        shared.read(0, &mut buf);
        for (i, word) in buf.chunks_exact(8).enumerate() {
            let value = u64::from_le_bytes(word.try_into().expect("8 bytes"));
            ensure!(
                !secrets.contains(&value),
                rule,
                "{when}: host shared mapping holds the guest's private pattern {value:#x} at GPA {:#x}",
                TEST_AREA_GPA + 8 * i as u64
            );
        }
        Ok(())
    };
    let host_holds = |when: &str, pattern: u64| -> Result<()> {
        shared.expect_filled(rule, 0, LEN, Fill::U64(pattern), |off| {
            format!("{when}: host shared mapping at GPA {:#x}", off + TEST_AREA_GPA)
        })
    };
    shared.fill_u64(0, LEN, HOST);
    let mut guest = Agent::start(vm.vcpu(0, [0; 4])?)?;
    guest.check(TEST_AREA_GPA, LEN, HOST)?;

    vm.make_private(TEST_AREA_GPA, LEN)?;
    guest.fill(TEST_AREA_GPA, LEN, PRIVATE_1)?;
    guest.check(TEST_AREA_GPA, LEN, PRIVATE_1)?;
    host_holds("after the guest's private write", HOST)?;
    leak_check("after the guest's private write", &[PRIVATE_1])?;

    vm.make_shared(TEST_AREA_GPA, LEN)?;
    guest
        .check(TEST_AREA_GPA, LEN, HOST)
        .map_err(|e| Error::rule("a GPA converted to shared reads the host's shared mapping", e.to_string()))?;
    leak_check("after conversion to shared", &[PRIVATE_1])?;
    guest.fill(TEST_AREA_GPA, LEN, GUEST_SHARED)?;
    host_holds("after the guest's shared write", GUEST_SHARED)?;

    vm.make_private(TEST_AREA_GPA, LEN)?;
    guest.fill(TEST_AREA_GPA, LEN, PRIVATE_2)?;
    guest.check(TEST_AREA_GPA, LEN, PRIVATE_2)?;
    host_holds("after the second private write", GUEST_SHARED)?;
    leak_check("after the second private write", &[PRIVATE_1, PRIVATE_2])?;

    vm.make_shared(TEST_AREA_GPA, LEN)?;
    guest.check(TEST_AREA_GPA, LEN, GUEST_SHARED)?;
    leak_check("after the final conversion to shared", &[PRIVATE_1, PRIVATE_2])?;
    guest.done().map(drop)
}

/// Found by the model test: a shared access to a GPA without a memslot
/// leaves an MMIO SPTE (with MMIO caching). After a memslot is created
/// elsewhere (the memslot generation moves on, the SPTE goes stale but stays)
/// and the GPA is made private, the next access takes a reserved-bit fault,
/// which `kvm_mmu_page_fault()` never marks private; the stale SPTE sends it
/// down the full fault path as a *shared* fault, and the is_private mismatch
/// exits with flags 0. The rule: a private GPA without a memslot exits with
/// `KVM_MEMORY_EXIT_FLAG_PRIVATE`, whatever was cached for it before.
fn private_read_of_slotless_gpa_exits_private_after_earlier_mmio(kvm: &Arc<Kvm>) -> Result<()> {
    let vm = Vm::with_payload(kvm, VmType::SwProtected, &GUEST_AGENT)?;
    let mut agent = Agent::start(vm.vcpu(0, [0; 4])?)?;
    mmio_read(&mut agent, TARGET_GPA)?;
    // Any memslot change moves the generation on; this one is far away.
    vm.add_memory(SLOT, TEST_AREA_GPA + (1 << 30), SLOT_SIZE)?;
    vm.make_private(TARGET_GPA, PAGE)?;
    expect_private_read_fault(
        &mut agent,
        "a private read of a GPA with no memslot exits KVM_EXIT_MEMORY_FAULT with flags PRIVATE, also after an \
         earlier shared read of it was emulated MMIO and a memslot was added elsewhere",
    )
}

/// The same stale MMIO SPTE under a guest_memfd memslot created over the
/// GPA afterwards: a private read must be served from guest_memfd without
/// any exit, not bounce to userspace as a shared fault.
fn private_read_served_from_guest_memfd_after_earlier_mmio_at_that_gpa(kvm: &Arc<Kvm>) -> Result<()> {
    let vm = Vm::with_payload(kvm, VmType::SwProtected, &GUEST_AGENT)?;
    let mut agent = Agent::start(vm.vcpu(0, [0; 4])?)?;
    mmio_read(&mut agent, TARGET_GPA)?;
    let gmem = Arc::new(vm.create_guest_memfd(SLOT_SIZE, 0)?);
    vm.add_private_memory(SLOT, TEST_AREA_GPA, SLOT_SIZE, &gmem, 0)?;
    vm.make_private(TARGET_GPA, PAGE)?;
    let rule = "a private read of a guest_memfd-backed GPA completes in the guest (fresh guest_memfd: 0), also after \
                an earlier read of that GPA, before it had a memslot, was emulated MMIO";
    agent.submit(Op::Read { gpa: TARGET_GPA })?;
    let exit = agent.vcpu().run()?;
    if matches!(exit, Exit::MemoryFault { .. } | Exit::Mmio { .. }) {
        return Err(Error::rule(rule, format!("the read exited to userspace: {}", agent.vcpu().report(exit))));
    }
    let value = agent.ready_from_exit(exit, "the private read")?;
    ensure!(value == 0, rule, "the guest read {value:#x}");
    Ok(())
}

/// Closing a guest_memfd while a memslot binds it (kvm_gmem_release()
/// clears the slot's file and zaps its SPTEs): a private access that was
/// served before now exits KVM_EXIT_MEMORY_FAULT (kvm_gmem_get_pfn() finds
/// no file), the shared side keeps working, and the memslot can still be
/// deleted.
fn private_read_exits_memory_fault_after_its_guest_memfd_is_closed(kvm: &Arc<Kvm>) -> Result<()> {
    let vm = Vm::with_payload(kvm, VmType::SwProtected, &GUEST_AGENT)?;
    let mut agent = Agent::start(vm.vcpu(0, [0; 4])?)?;
    let gmem = Arc::new(vm.create_guest_memfd(SLOT_SIZE, 0)?);
    let shared = vm.add_private_memory(SLOT, TEST_AREA_GPA, SLOT_SIZE, &gmem, 0)?;
    vm.make_private(TARGET_GPA, PAGE)?;
    // Control: the private page is served from guest_memfd while it is open.
    agent.write(TARGET_GPA, WRITTEN)?;
    let before = agent.read(TARGET_GPA)?;
    ensure!(before == WRITTEN, "a private page is served from an open guest_memfd", "the guest read {before:#x}");

    vm.forget_guest_memfd(SLOT)?;
    // The last reference: no child of a concurrent test holds a copy of
    // the fd (kvm_harness::child), so the file is released here.
    drop(gmem);
    expect_private_read_fault(
        &mut agent,
        "a private read of a page whose guest_memfd was closed exits KVM_EXIT_MEMORY_FAULT",
    )?;

    shared.write_u64(TARGET_GPA - TEST_AREA_GPA, HOST_VALUE);
    vm.make_shared(TARGET_GPA, PAGE)?;
    let after = agent.read(TARGET_GPA)?;
    ensure!(
        after == HOST_VALUE,
        "after its guest_memfd is closed, the slot's shared side still serves the guest",
        "the guest read {after:#x}, the host wrote {HOST_VALUE:#x}"
    );
    expect_ok("a memslot whose guest_memfd was closed can be deleted", || vm.delete_slot(SLOT))
}

/// Closing the VM fd while a vCPU and a guest_memfd still hold the VM
/// (kvm_vm_release() only drops a reference): the guest keeps running, its
/// private page is still served from guest_memfd and its shared page from
/// the host's memory, and a punch hole in the guest_memfd still reaches the
/// guest.
fn guest_keeps_private_memory_after_the_vm_fd_is_closed(kvm: &Arc<Kvm>) -> Result<()> {
    let vm = Vm::with_payload(kvm, VmType::SwProtected, &GUEST_AGENT)?;
    let mut agent = Agent::start(vm.vcpu(0, [0; 4])?)?;
    let gmem = Arc::new(vm.create_guest_memfd(SLOT_SIZE, 0)?);
    let shared = vm.add_private_memory(SLOT, TEST_AREA_GPA, SLOT_SIZE, &gmem, 0)?;
    let shared_gpa = TARGET_GPA + PAGE;
    shared.write_u64(shared_gpa - TEST_AREA_GPA, HOST_VALUE);
    vm.make_private(TARGET_GPA, PAGE)?;
    agent.write(TARGET_GPA, WRITTEN)?;

    drop(vm);
    let private = agent.read(TARGET_GPA)?;
    let rule = "after the VM fd is closed, a private page is still served from guest_memfd";
    ensure!(private == WRITTEN, rule, "the guest read {private:#x}, it wrote {WRITTEN:#x}");
    let host = agent.read(shared_gpa)?;
    let rule = "after the VM fd is closed, a shared page is still served from the host's memory";
    ensure!(host == HOST_VALUE, rule, "the guest read {host:#x}, the host wrote {HOST_VALUE:#x}");
    expect_ok("PUNCH_HOLE on the guest_memfd succeeds after the VM fd is closed", || {
        gmem.punch_hole(TARGET_GPA - TEST_AREA_GPA, PAGE)
    })?;
    let punched = agent.read(TARGET_GPA)?;
    let rule = "a hole punched after the VM fd is closed reads as zeroes in the guest";
    ensure!(punched == 0, rule, "the guest read {punched:#x}");
    agent.done().map(drop)
}

/// The last close of a guest_memfd racing the deletion of the memslot that
/// binds it, while the guest faults the slot's private page in and the
/// host punches it out: `kvm_gmem_unbind()` then meets a dying file, whose
/// bindings it must change under the file's invalidate lock as
/// `kvm_gmem_release()` does (the 6.12.118 fix "KVM: guest_memfd: take
/// the invalidate lock when unbinding a dying file"). Each round's vCPU
/// ends in the private fault of a page with no guest_memfd (the memslot
/// gone, or its file released first), the VM and vCPU still answer (the
/// runner's liveness check), and the kernel logs nothing (the kernel-log
/// oracle; lockdep and KASAN in `--debug-kernel`).
fn guest_memfd_closed_while_its_memslot_is_deleted_unbinds_under_the_invalidate_lock(kvm: &Arc<Kvm>) -> Result<()> {
    const ROUNDS: usize = 12;
    const PUNCHES: usize = 16;
    for round in 0..ROUNDS {
        let vm = Vm::with_payload(kvm, VmType::SwProtected, &GUEST_AGENT)?;
        let mut agent = Agent::start(vm.vcpu(0, [0; 4])?)?;
        let gmem = Arc::new(vm.create_guest_memfd(SLOT_SIZE, 0)?);
        let _shared = vm.add_private_memory(SLOT, TEST_AREA_GPA, SLOT_SIZE, &gmem, 0)?;
        vm.make_private(TARGET_GPA, PAGE)?;
        agent.write(TARGET_GPA, WRITTEN)?;
        // The memslot no longer counts as a holder: the last Arc is the
        // file's last reference, dropped by the closer thread.
        vm.forget_guest_memfd(SLOT)?;
        // Stride 0: the guest reads the page forever, faulting it in again
        // after every punch, until its memslot or file is gone.
        agent.submit(Op::Touch { gpa: TARGET_GPA, len: 8, stride: 0, write: false })?;
        let start = std::sync::Barrier::new(3);
        std::thread::scope(|s| {
            let vcpu = s.spawn(move || {
                let exit = agent.vcpu().run();
                (agent, exit)
            });
            // Let the guest fault the page in and spin on it.
            std::thread::sleep(Duration::from_millis(50));
            let puncher = {
                let gmem = gmem.clone();
                let start = &start;
                s.spawn(move || -> Result<()> {
                    for _ in 0..PUNCHES {
                        gmem.punch_hole(TARGET_GPA - TEST_AREA_GPA, PAGE)?;
                    }
                    start.wait();
                    Ok(())
                })
            };
            let closer = {
                let start = &start;
                s.spawn(move || {
                    start.wait();
                    drop(gmem);
                })
            };
            start.wait();
            vm.delete_slot(SLOT)?;
            threads::join_result(puncher, "punching thread")?;
            threads::join(closer, "closing thread")?;
            let (mut agent, exit) = threads::join(vcpu, "vCPU thread")?;
            expect_private_fault(
                &mut agent,
                exit?,
                TARGET_GPA,
                &format!(
                    "round {round}: a private read whose memslot was deleted as its guest_memfd was closed exits \
                     KVM_EXIT_MEMORY_FAULT"
                ),
            )
        })?;
    }
    Ok(())
}

/// The guest reads `gpa`, which has no memslot: an 8-byte MMIO read, completed.
fn mmio_read(agent: &mut Agent, gpa: u64) -> Result<()> {
    match agent.read_or_mmio(gpa)? {
        None => Ok(()),
        Some(value) => Err(Error::rule(
            "a shared read of a GPA with no memslot exits KVM_EXIT_MMIO",
            format!("expected an 8-byte MMIO read at {gpa:#x}, but the read completed with {value:#x}"),
        )),
    }
}

#[path = "exit_sequences/mod.rs"]
mod exit_sequences;

fn main() -> ExitCode {
    let mut suite = Suite::new(env!("CARGO_CRATE_NAME"));
    exit_sequences::register(&mut suite);

    kvm_harness::register!(suite, needs() =>
        private_read_exits_memory_fault_when_memslot_is_deleted_under_running_vcpu,
        private_read_exits_memory_fault_when_memslot_was_deleted,
        private_read_of_slotless_gpa_exits_private_after_earlier_mmio,
        private_read_served_from_guest_memfd_after_earlier_mmio_at_that_gpa,
        private_read_exits_memory_fault_after_its_guest_memfd_is_closed,
        guest_keeps_private_memory_after_the_vm_fd_is_closed,
        guest_memfd_closed_while_its_memslot_is_deleted_unbinds_under_the_invalidate_lock,
    );
    for access in Access::ALL {
        suite.test(
            format!("private_{}_exits_memory_fault_when_memslot_has_no_guest_memfd", access.name()),
            needs(),
            move |kvm| not_private_slot(kvm, access, false),
        );
        suite.test(
            format!("private_{}_completes_in_shared_mapping_after_conversion_to_shared", access.name()),
            needs(),
            move |kvm| not_private_slot(kvm, access, true),
        );
    }

    kvm_harness::register!(suite, needs() => bytes_written_privately_never_appear_in_host_shared_mapping);
    suite.run()
}
