//! Rule family 10: every allocation failure on the private-memory paths is
//! reported as ENOMEM and leaves nothing behind, or is absorbed whole.
//!
//! Each scenario repeats one call with its 1st, 2nd, ... allocation failing
//! (`/proc/thread-self/fail-nth`, see `kvm_harness::fault_injection`) until
//! the call reaches no more allocations, then again with each allocation and
//! the slab allocation after it failing (the xarray retries a failed
//! `GFP_NOWAIT` allocation, so one failure never reaches its error paths).
//! After each failure it checks the
//! state the call must not have changed, then that the call succeeds; an
//! injected failure the kernel absorbs must still give a complete result.
//! These are the error paths of `__kvm_gmem_create()`, `kvm_gmem_allocate()`,
//! `kvm_gmem_bind()` / `kvm_set_memslot()`, `kvm_vm_set_mem_attributes()` and
//! the private fault (`kvm_gmem_get_pfn()`), which no other test reaches.

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::process::ExitCode;
use std::sync::Arc;

use guest_payloads::{layout, GUEST_AGENT};
use kvm_harness::bindings::KVM_MEMORY_EXIT_FLAG_PRIVATE;
use kvm_harness::fault_injection::{self, at_every_allocation, Failing, NthFault};
use kvm_harness::kernel_rules::{ForRunningKernel, Hex, GMEM_BINDING_OVERLAP};
use kvm_harness::{
    ensure, expect_eq, page_size, Agent, Errno, Error, Exit, GmemBinding, GuestMemfd, Kvm, Need, Op, Region, Result,
    Suite, SysResult, Vm, VmType,
};
use kvm_selftests::SLOT_SIZE;

/// More allocation points than any of these calls has: reaching it means
/// the call never completed.
const LIMIT: u32 = 2000;
/// Pages the fallocate and attribute scenarios cover.
const PAGES: u64 = 16;
const SLOT: u32 = 1;
const HUGE_PAGE: u64 = 2 << 20;
const GPA: u64 = layout::TEST_AREA_GPA;
/// What the host writes into the shared backing, so a guest read tells a
/// shared page (this value) from a private one (guest_memfd's zeroes).
const SHARED_MARK: u64 = 0x5a5a_5a5a_0000_0001;

/// The fd table as the scenarios compare it: how many fds are open, and the
/// lowest free number (an fd reserved but never installed shows only there).
fn fd_table() -> Result<(usize, RawFd)> {
    let dir = std::fs::read_dir("/proc/self/fd").sys(|| "opendir(/proc/self/fd)".into())?;
    let open = dir.count();
    let probe = File::open("/dev/null").sys(|| "open(/dev/null)".into())?;
    Ok((open, probe.as_raw_fd()))
}

/// [`at_every_allocation`] for the call behind `rule`, which must reach at
/// least one allocation (else fail-nth injected nothing and the walk proved
/// nothing); returns how many it reached.
fn walk(limit: u32, rule: &str, attempt: impl FnMut(Failing) -> Result<bool>) -> Result<u32> {
    let points = at_every_allocation(limit, attempt)?;
    ensure!(points > 0, rule, "the call reached no allocation: fail-nth injected nothing");
    Ok(points)
}

/// After an ENOMEM with `failing`, the fd table must be as it was before.
fn expect_fd_table(rule: &str, failing: Failing, before: (usize, RawFd)) -> Result<()> {
    expect_eq(rule, format_args!("(open fds, lowest free fd) after ENOMEM with {failing}"), fd_table()?, before)
}

/// How one call with an armed allocation failure ended, when it ended well.
enum Attempt<T> {
    /// ENOMEM from the injected failure.
    Enomem,
    /// Success (injected or not).
    Done(T),
}

/// ENOMEM after an injected failure, or success, are the only acceptable
/// outcomes; also returns whether the failure was injected.
fn judge<T>(rule: &str, failing: Failing, call: fault_injection::Injected<Result<T>>) -> Result<(Attempt<T>, bool)> {
    match call.outcome {
        Ok(value) => Ok((Attempt::Done(value), call.injected)),
        Err(e) if call.injected && e.errno() == Some(Errno::ENOMEM) => Ok((Attempt::Enomem, true)),
        Err(e) if call.injected => {
            Err(Error::rule(rule, format!("with {failing}: expected ENOMEM or success, got {e}")))
        }
        Err(e) => Err(Error::rule(rule, format!("with no allocation failing ({failing} not reached): {e}"))),
    }
}

fn guest_memfd_creation_fails_cleanly_at_every_allocation(kvm: &Arc<Kvm>) -> Result<()> {
    let vm = Vm::bare(kvm, VmType::SwProtected)?;
    let fault = NthFault::for_this_thread()?;
    let fds = fd_table()?;
    let rule = "KVM_CREATE_GUEST_MEMFD fails with ENOMEM leaving no fd, or returns a working guest_memfd";
    walk(LIMIT, rule, |failing| {
        let (attempt, injected) = judge(rule, failing, vm.create_guest_memfd_failing(&fault, failing, SLOT_SIZE, 0)?)?;
        match attempt {
            Attempt::Enomem => {
                expect_fd_table(rule, failing, fds)?;
            }
            Attempt::Done(gmem) => gmem.allocate(0, SLOT_SIZE)?,
        }
        Ok(injected)
    })?;
    Ok(())
}

fn sw_protected_vm_creation_fails_cleanly_at_every_allocation(kvm: &Arc<Kvm>) -> Result<()> {
    let fault = NthFault::for_this_thread()?;
    let fds = fd_table()?;
    let rule =
        "KVM_CREATE_VM(KVM_X86_SW_PROTECTED_VM) fails with ENOMEM leaving no fd, or returns a VM with private memory";
    walk(LIMIT, rule, |failing| {
        let (attempt, injected) = judge(rule, failing, Vm::bare_failing(kvm, &fault, failing, VmType::SwProtected)?)?;
        match attempt {
            Attempt::Enomem => {
                expect_fd_table(rule, failing, fds)?;
            }
            Attempt::Done(vm) => {
                let gmem = vm.create_guest_memfd(SLOT_SIZE, 0)?;
                vm.set_region(&region(&Arc::new(gmem))?)?;
                vm.make_private(GPA, SLOT_SIZE)?;
            }
        }
        Ok(injected)
    })?;
    Ok(())
}

fn sw_protected_vm_vcpu_creation_fails_cleanly_at_every_allocation(kvm: &Arc<Kvm>) -> Result<()> {
    let vm = Vm::bare(kvm, VmType::SwProtected)?;
    let fault = NthFault::for_this_thread()?;
    let rule = "KVM_CREATE_VCPU fails with ENOMEM leaving no fd and its id free, or returns a working vCPU";
    // vCPUs live as long as their VM: each attempt takes the next id.
    let mut id = 0;
    walk(LIMIT, rule, |failing| {
        let fds = fd_table()?;
        let (attempt, injected) = judge(rule, failing, vm.bare_vcpu_failing(&fault, failing, id)?)?;
        let vcpu = match attempt {
            Attempt::Enomem => {
                expect_fd_table(rule, failing, fds)?;
                // A vCPU left behind in the VM's array would refuse its id.
                vm.bare_vcpu(id).map_err(|e| Error::rule(rule, format!("id {id} again after ENOMEM: {e}")))?
            }
            Attempt::Done(vcpu) => vcpu,
        };
        vcpu.regs().map_err(|e| Error::rule(rule, format!("vCPU {id} created with {failing}: {e}")))?;
        id += 1;
        Ok(injected)
    })?;
    Ok(())
}

fn guest_memfd_fallocate_fails_cleanly_at_every_allocation(kvm: &Arc<Kvm>) -> Result<()> {
    let vm = Vm::bare(kvm, VmType::SwProtected)?;
    let fault = NthFault::for_this_thread()?;
    let len = PAGES * page_size();
    let rule = "fallocate() of a guest_memfd fails with ENOMEM and can then be completed, or allocates it all";
    let points = walk(LIMIT, rule, |failing| {
        // A fresh file each time, so every attempt meets the same allocations.
        let gmem = vm.create_guest_memfd(len, 0)?;
        let (attempt, injected) = judge(rule, failing, gmem.allocate_failing(&fault, failing, 0, len)?)?;
        if let Attempt::Enomem = attempt {
            gmem.allocate(0, len)
                .map_err(|e| Error::rule(rule, format!("completing after ENOMEM with {failing}: {e}")))?;
        }
        // Every page is now there iff allocating the range again allocates nothing.
        let again = gmem.allocate_failing(&fault, Failing::Nth(1), 0, len)?;
        ensure!(
            !again.injected && again.outcome.is_ok(),
            rule,
            "after the fallocate with {failing} reported success, the same fallocate still allocated ({:?})",
            again.outcome
        );
        Ok(injected)
    })?;
    ensure!(points >= PAGES as u32, rule, "only {points} allocation points for {PAGES} pages");
    Ok(())
}

fn guest_memfd_memslot_fails_cleanly_at_every_allocation(kvm: &Arc<Kvm>) -> Result<()> {
    let vm = Vm::bare(kvm, VmType::SwProtected)?;
    let fault = NthFault::for_this_thread()?;
    let gmem = Arc::new(vm.create_guest_memfd(SLOT_SIZE, 0)?);
    let rule = "a guest_memfd memslot fails with ENOMEM leaving its range unbound, or is created whole";
    walk(LIMIT, rule, |failing| {
        let region = region(&gmem)?;
        let (attempt, injected) = judge(rule, failing, vm.set_region_failing(&fault, failing, &region)?)?;
        if let Attempt::Enomem = attempt {
            // A binding left behind by the failed call would refuse this.
            vm.set_region(&region)
                .map_err(|e| Error::rule(rule, format!("binding again after ENOMEM with {failing}: {e}")))?;
        }
        binding_is_in_place(&vm, &gmem, failing)?;
        vm.delete_slot(SLOT)?;
        Ok(injected)
    })?;
    Ok(())
}

/// Slot [`SLOT`] at [`GPA`] over all of `gmem`; the first [`PAGES`] pages of
/// its shared backing hold [`SHARED_MARK`].
/// What the guest reads at `gpa` (see [`Agent::read_or_mmio`]), in hex.
fn guest_read(agent: &mut Agent, gpa: u64) -> Result<Option<Hex>> {
    Ok(agent.read_or_mmio(gpa)?.map(Hex))
}

/// Deleting, then moving, a memslot the guest reads, with each allocation
/// failing in turn: ENOMEM must leave the memslot where it was.
fn memslot_delete_and_move_fail_cleanly_at_every_allocation(kvm: &Arc<Kvm>) -> Result<()> {
    let vm = Vm::with_payload(kvm, VmType::SwProtected, &GUEST_AGENT)?;
    let memory = Arc::new(kvm_harness::HostMemory::anonymous(SLOT_SIZE)?);
    memory.write_u64(0, SHARED_MARK);
    let (home, away) = (Region::new(SLOT, GPA, memory.clone()), Region::new(SLOT, GPA + SLOT_SIZE, memory));
    vm.set_region(&home)?;
    let mut agent = Agent::start(vm.vcpu(0, [0; 4])?)?;
    let fault = NthFault::for_this_thread()?;
    for (change, target, moves) in [("deleting", home.deletion(), false), ("moving", away.clone(), true)] {
        let rule = format!("{change} a memslot fails with ENOMEM leaving it in place, or completes");
        walk(LIMIT, &rule, |failing| {
            let (attempt, injected) = judge(&rule, failing, vm.set_region_failing(&fault, failing, &target)?)?;
            let expected = match attempt {
                Attempt::Enomem => [Some(Hex(SHARED_MARK)), None],
                Attempt::Done(()) => [None, moves.then_some(Hex(SHARED_MARK))],
            };
            let seen = [guest_read(&mut agent, GPA)?, guest_read(&mut agent, away.gpa)?];
            let what = format_args!("guest reads at {GPA:#x} and {:#x} after {change} with {failing}", away.gpa);
            expect_eq(&rule, what, seen, expected)?;
            vm.set_region(&home)?;
            Ok(injected)
        })?;
    }
    Ok(())
}

/// The memslot at [`GPA`] binds all of `gmem`: a second memslot binding the
/// same range is refused with the running kernel's errno.
fn binding_is_in_place(vm: &Vm, gmem: &Arc<GuestMemfd>, failing: Failing) -> Result<()> {
    let expected = GMEM_BINDING_OVERLAP.expected()?;
    let memory = Arc::new(kvm_harness::HostMemory::anonymous(gmem.size())?);
    let second = Region::new(SLOT + 1, GPA + gmem.size(), memory).with_guest_memfd(GmemBinding::Memfd(gmem.clone()), 0);
    let rule = format!(
        "the guest_memfd memslot created with {failing} binds its range: a second binding of it is refused; {}",
        expected.why
    );
    expected.expect_errno(&rule, || vm.set_region(&second))
}

fn region(gmem: &Arc<GuestMemfd>) -> Result<Region> {
    let memory = Arc::new(kvm_harness::HostMemory::anonymous(gmem.size())?);
    memory.fill_u64(0, PAGES * page_size(), SHARED_MARK);
    Ok(Region::new(SLOT, GPA, memory).with_guest_memfd(GmemBinding::Memfd(gmem.clone()), 0))
}

/// A protected VM running the agent, with a guest_memfd memslot of `size`
/// bytes at [`GPA`] (see [`region`]).
fn agent_with_private_slot(kvm: &Arc<Kvm>, size: u64) -> Result<(Vm, Agent)> {
    let vm = Vm::with_payload(kvm, VmType::SwProtected, &GUEST_AGENT)?;
    let gmem = Arc::new(vm.create_guest_memfd(size, 0)?);
    vm.set_region(&region(&gmem)?)?;
    let agent = Agent::start(vm.vcpu(0, [0; 4])?)?;
    Ok((vm, agent))
}

/// What the guest reads at the first and the last page of the range.
fn ends(agent: &mut Agent) -> Result<[Hex; 2]> {
    Ok([Hex(agent.read(GPA)?), Hex(agent.read(GPA + (PAGES - 1) * page_size())?)])
}

fn memory_attributes_fail_all_or_nothing_at_every_allocation(kvm: &Arc<Kvm>) -> Result<()> {
    let (vm, mut agent) = agent_with_private_slot(kvm, SLOT_SIZE)?;
    let fault = NthFault::for_this_thread()?;
    let (len, private) = (PAGES * page_size(), u64::from(kvm_harness::bindings::KVM_MEMORY_ATTRIBUTE_PRIVATE));
    let rule = "KVM_SET_MEMORY_ATTRIBUTES(PRIVATE) fails with ENOMEM changing no page, or converts every page";
    walk(LIMIT, rule, |failing| {
        let (attempt, injected) =
            judge(rule, failing, vm.set_memory_attributes_failing(&fault, failing, GPA, len, private)?)?;
        let (expected, when) = match attempt {
            Attempt::Enomem => ([Hex(SHARED_MARK); 2], "ENOMEM"),
            Attempt::Done(()) => ([Hex(0); 2], "success"),
        };
        let seen = ends(&mut agent)?;
        expect_eq(
            rule,
            format_args!("guest reads of the first/last page after {when} with {failing}"),
            seen,
            expected,
        )?;
        vm.make_shared(GPA, len)?;
        Ok(injected)
    })?;
    Ok(())
}

/// One private read of the never-allocated page `gpa` with `failing`
/// allocations failing; `Ok(injected)`.
fn private_read_failing(agent: &mut Agent, fault: &NthFault, failing: Failing, gpa: u64) -> Result<bool> {
    let rule = format!(
        "a private read of {gpa:#x} whose allocation fails returns ENOMEM (any memory-fault exit naming the page), \
         then reads zeroes"
    );
    agent.submit(Op::Read { gpa })?;
    let call = agent.vcpu().run_failing(fault, failing)?;
    let value = match call.outcome {
        (None, exit) => agent.ready_from_exit(exit, "the private read")?,
        (Some(Errno::ENOMEM), exit) if call.injected => {
            let page = Exit::MemoryFault {
                flags: u64::from(KVM_MEMORY_EXIT_FLAG_PRIVATE),
                gpa,
                size: page_size(),
                errno: Some(Errno::ENOMEM),
            };
            ensure!(!matches!(exit, Exit::MemoryFault { .. }) || exit == page, &rule, "with {failing}: {exit:x?}");
            agent.wait_ready("the private read, retried")?
        }
        (errno, exit) => {
            let reached = call.injected;
            return Err(Error::rule(&rule, format!("with {failing} (reached: {reached}): {errno:?}, {exit:x?}")));
        }
    };
    expect_eq(&rule, format_args!("value read after {failing}"), value, 0)?;
    Ok(call.injected)
}

fn private_fault_fails_cleanly_at_every_allocation(kvm: &Arc<Kvm>) -> Result<()> {
    // Each attempt reads the first page of a 2 MiB region no earlier one
    // touched, so it meets the guest_memfd folio and page-table allocations.
    let regions = 64;
    let (vm, mut agent) = agent_with_private_slot(kvm, regions * HUGE_PAGE)?;
    vm.make_private(GPA, regions * HUGE_PAGE)?;
    let fault = NthFault::for_this_thread()?;
    let mut next = 0;
    let rule = "a private fault allocates";
    walk(regions as u32 / 2, rule, |failing| {
        next += 1;
        private_read_failing(&mut agent, &fault, failing, GPA + (next - 1) * HUGE_PAGE)
    })?;
    Ok(())
}

fn main() -> ExitCode {
    let mut suite = Suite::new(env!("CARGO_CRATE_NAME"));
    // The scenarios compare the process's fd table before and after a call.
    suite.one_test_at_a_time();
    let needs = || {
        vec![Need::VmType(VmType::SwProtected), Need::Check(Box::new(|_: &Arc<Kvm>| fault_injection::availability()))]
    };
    kvm_harness::register!(suite, needs() =>
        sw_protected_vm_creation_fails_cleanly_at_every_allocation,
        sw_protected_vm_vcpu_creation_fails_cleanly_at_every_allocation,
        memslot_delete_and_move_fail_cleanly_at_every_allocation,
        guest_memfd_creation_fails_cleanly_at_every_allocation,
        guest_memfd_fallocate_fails_cleanly_at_every_allocation,
        guest_memfd_memslot_fails_cleanly_at_every_allocation,
        memory_attributes_fail_all_or_nothing_at_every_allocation,
        private_fault_fails_cleanly_at_every_allocation,
    );
    suite.run()
}
