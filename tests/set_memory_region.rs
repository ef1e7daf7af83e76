//! Memslot rules that guard the same code as the private ones, ported from
//! the non-private phases of upstream's `set_memory_region_test.c`: KVM_RUN
//! with no memslots, the memslot count limit, the flags each memslot ioctl
//! accepts, and moving / deleting a memslot under a running guest.

use std::process::ExitCode;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use guest_payloads::{layout, protocol, GUEST_AGENT, WATCH_MEMSLOT};
use kvm_harness::bindings::{
    KVM_INTERNAL_ERROR_DELIVERY_EV, KVM_MEM_GUEST_MEMFD, KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY,
    KVM_X86_QUIRK_SLOT_ZAP_ALL,
};
use kvm_harness::{
    ensure, expect_errno, expect_ok, kernel_rules, threads, Agent, Cap, Errno, Error, Exit, GmemBinding, GuestCall,
    HostMemory, Kvm, Op, Region, Result, Suite, Vcpu, Vm, VmType,
};
use kvm_selftests::{valid_region, BEYOND_MAX_GPA};

/// The memslot the move/delete scenarios work on (upstream's MEM_REGION_*):
/// one 2 MiB page, so the initial mapping can be a single huge page.
const SLOT: u32 = 10;
const GPA: u64 = 0xc000_0000;
const SIZE: u64 = 0x20_0000;
/// The value the host returns for guest reads that exit as MMIO.
const MMIO_VAL: u64 = 0xbeef;
/// Iterations of each move/delete scenario (upstream's default).
const LOOPS: usize = 10;
/// How long the host waits for the guest to report (upstream: 2 s).
const REPORT_TIMEOUT: Duration = Duration::from_secs(2);
/// The most the host waits for the guest to spin where it should before
/// going on regardless (upstream sleeps this long every time); the guest's
/// progress counters normally end the wait within microseconds.
const REENTER: Duration = Duration::from_millis(100);
/// Spin iterations (each a read of the watched GPA) the guest makes while
/// the moved-away memslot's old page holds a value it must never see.
const WINDOW_SPINS: u64 = 1000;

// ---- zero memslots, slot limits ----

fn zero_memslots(kvm: &Arc<Kvm>) -> Result<()> {
    let vm = Vm::bare(kvm, VmType::Default)?;
    let mut vcpu = vm.bare_vcpu(0)?;
    vm.set_nr_mmu_pages(64)?;
    match vcpu.run()? {
        Exit::InternalError { .. } => Ok(()),
        other => Err(Error::rule(
            "KVM_RUN on a VM without memslots ends in KVM_EXIT_INTERNAL_ERROR (the reset vector cannot be fetched)",
            format!("got {} ({other:?})", other.reason_name()),
        )),
    }
}

fn max_memslots(kvm: &Arc<Kvm>) -> Result<()> {
    let nr = kvm.cap(Cap::NrMemslots);
    ensure!(nr > 0, "KVM_CAP_NR_MEMSLOTS is positive", "/dev/kvm reports {nr}");
    let nr = nr as u32;
    let vm = Vm::bare(kvm, VmType::Default)?;
    // One reservation for all slots; MAP_NORESERVE keeps it cheap.
    let memory = Arc::new(HostMemory::anonymous(u64::from(nr) * SIZE)?);
    let rule = format!("every slot id below KVM_CAP_NR_MEMSLOTS ({nr}) is accepted");
    for slot in 0..nr {
        let offset = u64::from(slot) * SIZE;
        let region = Region { memory_offset: offset, size: SIZE, ..Region::new(slot, offset, memory.clone()) };
        expect_ok(&rule, || vm.set_region(&region))?;
    }
    let extra = Region::new(nr, u64::from(nr) * SIZE, Arc::new(HostMemory::anonymous(SIZE)?));
    expect_errno(
        &format!("with all {nr} memslots in use, slot id {nr} (= KVM_CAP_NR_MEMSLOTS) is rejected with EINVAL"),
        Errno::EINVAL,
        || vm.set_region_v1(&extra),
    )
}

fn slot_id_limit(kvm: &Arc<Kvm>, slot: u32, accepted: bool) -> Result<()> {
    let nr = kvm.cap(Cap::NrMemslots) as u32;
    let vm = Vm::bare(kvm, VmType::Default)?;
    let region = valid_region(slot, 0)?;
    if accepted {
        expect_ok(&format!("slot id {slot} (KVM_CAP_NR_MEMSLOTS = {nr}) is accepted on an empty VM"), || {
            vm.set_region(&region)
        })
    } else {
        expect_errno(
            &format!("slot id {slot} (KVM_CAP_NR_MEMSLOTS = {nr}) is rejected with EINVAL, however few slots exist"),
            Errno::EINVAL,
            || vm.set_region(&region),
        )
    }
}

// ---- flags of each ioctl ----

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ioctl {
    V1,
    V2,
}

/// Flag bit `bit` alone: accepted exactly when the ioctl and the VM support it.
///
/// `KVM_SET_USER_MEMORY_REGION` only knows LOG_DIRTY_PAGES and READONLY;
/// `..._REGION2` adds GUEST_MEMFD where the VM fd reports KVM_CAP_GUEST_MEMFD.
/// READONLY counts where the VM fd reports KVM_CAP_READONLY_MEM.
fn flag_bit(kvm: &Arc<Kvm>, vm_type: VmType, ioctl: Ioctl, bit: u32) -> Result<()> {
    let vm = Vm::bare(kvm, vm_type)?;
    let flag = 1u32 << bit;
    let readonly = vm.cap(Cap::ReadonlyMem) != 0;
    let gmem = vm.cap(Cap::GuestMemfd) != 0;
    let supported = KVM_MEM_LOG_DIRTY_PAGES
        | if readonly { KVM_MEM_READONLY } else { 0 }
        | if gmem && ioctl == Ioctl::V2 { KVM_MEM_GUEST_MEMFD } else { 0 };
    let mut region = valid_region(0, 0)?;
    region.flags = flag;
    if flag == KVM_MEM_GUEST_MEMFD && gmem {
        let fd = Arc::new(vm.create_guest_memfd(region.size, 0)?);
        region = region.with_guest_memfd(GmemBinding::Memfd(fd), 0);
    }
    let name = match ioctl {
        Ioctl::V1 => "KVM_SET_USER_MEMORY_REGION",
        Ioctl::V2 => "KVM_SET_USER_MEMORY_REGION2",
    };
    let rule = format!(
        "{vm_type}: {name} accepts flag {flag:#x} alone iff it is supported (here {supported:#x}: \
         KVM_CAP_READONLY_MEM = {}, KVM_CAP_GUEST_MEMFD = {} on the VM fd), else EINVAL",
        vm.cap(Cap::ReadonlyMem),
        vm.cap(Cap::GuestMemfd)
    );
    let outcome = match ioctl {
        Ioctl::V1 => vm.set_region_v1(&region),
        Ioctl::V2 => vm.set_region(&region),
    };
    match (supported & flag != 0, outcome) {
        (true, Ok(())) => Ok(()),
        (false, Err(e)) if e.errno() == Some(Errno::EINVAL) => Ok(()),
        (true, Err(e)) => Err(Error::rule(rule, format!("supported, but {e}"))),
        (false, Ok(())) => Err(Error::rule(rule, "unsupported, but the memslot was created")),
        (false, Err(e)) => Err(Error::rule(rule, format!("unsupported: expected EINVAL, got {e}"))),
    }
}

// ---- moving and deleting a memslot under a running guest ----

/// What the vCPU thread saw.
#[derive(Debug)]
enum GuestEnd {
    Done,
    /// `KVM_EXIT_SHUTDOWN` or `KVM_EXIT_INTERNAL_ERROR`, with the RIP then.
    Died(Exit, u64),
}

/// Runs the watch_memslot guest: reports each SYNC value on `reports`,
/// answers MMIO reads of the watched GPA with [`MMIO_VAL`].
fn vcpu_loop(mut vcpu: Vcpu, reports: mpsc::Sender<u64>) -> Result<GuestEnd> {
    loop {
        match vcpu.run()? {
            Exit::Mmio { gpa, len, is_write, .. } => {
                ensure!(
                    !is_write && len == 8 && gpa == GPA,
                    "while its memslot is missing, the guest's only MMIO exit is its 8-byte read of the watched GPA",
                    "got MMIO {} of {len} bytes at {gpa:#x}",
                    if is_write { "write" } else { "read" }
                );
                vcpu.complete_mmio_read(&MMIO_VAL.to_le_bytes())?;
            }
            exit @ (Exit::Shutdown | Exit::InternalError { .. }) => {
                let rip = vcpu.regs()?.rip;
                return Ok(GuestEnd::Died(exit, rip));
            }
            exit => match vcpu.call_from_exit(exit, "watching the memslot")? {
                GuestCall::Sync(value) => {
                    // The host may have given up; the guest goes on either way.
                    let _ = reports.send(value);
                }
                GuestCall::Done => return Ok(GuestEnd::Done),
                other => return Err(Error::Guest(format!("unexpected guest call {other:x?}"))),
            },
        }
    }
}

/// A memslot at `gpa` of fresh 2 MiB anonymous memory, advised to be a huge page.
fn thp_region(gpa: u64) -> Result<Region> {
    let memory = Arc::new(HostMemory::anonymous(SIZE)?);
    // THP may be disabled on the host; the scenario then runs with 4 KiB pages.
    let _ = memory.advise_hugepages();
    Ok(Region::new(SLOT, gpa, memory))
}

/// vCPU 0's mailbox, where the watcher publishes its progress.
struct Progress {
    mailbox: Arc<HostMemory>,
    offset: u64,
}

impl Progress {
    /// Polls until `done(phase + 1 or 0, spins)` holds, for at most [`REENTER`].
    fn wait(&self, done: impl Fn(u64, u64) -> bool) {
        let start = Instant::now();
        while !done(self.word(protocol::MAILBOX_WATCH_PHASE), self.word(protocol::MAILBOX_WATCH_SPINS))
            && start.elapsed() < REENTER
        {
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    fn word(&self, at: u64) -> u64 {
        self.mailbox.read_u64(self.offset + at)
    }

    /// Until the guest spins in `phase` (0-based), so a memslot change lands
    /// while it watches for that phase, as upstream's 100 ms sleep intends.
    fn wait_spinning(&self, phase: u64) {
        self.wait(|current, _| current == phase + 1);
    }

    /// Until the guest has read the watched GPA [`WINDOW_SPINS`] more times.
    fn wait_spins(&self) {
        let from = self.word(protocol::MAILBOX_WATCH_SPINS);
        self.wait(|_, spins| spins >= from + WINDOW_SPINS);
    }
}

/// The VM of both scenarios: the watcher payload, slot 10 at [`GPA`], and
/// the phases' spin values in vCPU 0's mailbox.
fn spawn_vm(
    kvm: &Arc<Kvm>,
    disable_slot_zap_quirk: bool,
    spins: &[u64],
    clobber_idt: bool,
) -> Result<(Vm, Vcpu, Progress)> {
    let vm = Vm::with_payload(kvm, VmType::Default, &WATCH_MEMSLOT)?;
    if disable_slot_zap_quirk {
        vm.enable_cap(Cap::DisableQuirks2, [u64::from(KVM_X86_QUIRK_SLOT_ZAP_ALL), 0, 0, 0])?;
    }
    vm.set_region(&thp_region(GPA)?)?;
    let (mailbox, offset) = vm.shared_view(layout::MAILBOX_GPA, layout::MAILBOX_STRIDE)?;
    for (i, spin) in spins.iter().enumerate() {
        mailbox.write_u64(offset + protocol::MAILBOX_ARG0 + 8 * i as u64, *spin);
    }
    let vcpu = vm.vcpu(0, [GPA, spins.len() as u64, u64::from(clobber_idt), 0])?;
    Ok((vm, vcpu, Progress { mailbox, offset }))
}

/// Waits for the guest's next report.
fn wait_for_vcpu(reports: &mpsc::Receiver<u64>, what: &str) -> Result<u64> {
    reports.recv_timeout(REPORT_TIMEOUT).map_err(|_| {
        Error::rule(
            "the guest reports within 2 s of each memslot change",
            format!("no report {what} within {REPORT_TIMEOUT:?}"),
        )
    })
}

fn expect_in(rule: &str, phase: &str, value: u64, allowed: &[u64]) -> Result<()> {
    ensure!(allowed.contains(&value), rule, "{phase}: guest saw {value:#x}, expected one of {allowed:#x?}");
    Ok(())
}

/// Runs the guest on its own thread while `host` changes memslots; then
/// returns every value the guest reported (the start report first) and how
/// the guest ended. If `host` fails, the system memslot is deleted so the
/// guest dies promptly instead of spinning on.
fn with_running_guest(
    vm: &Vm,
    vcpu: Vcpu,
    host: impl FnOnce(&mpsc::Receiver<u64>, &mut Vec<u64>) -> Result<()>,
) -> Result<(Vec<u64>, GuestEnd)> {
    let (tx, rx) = mpsc::channel();
    std::thread::scope(|scope| {
        let guest = scope.spawn(move || vcpu_loop(vcpu, tx));
        let mut seen = Vec::new();
        let hosted = host(&rx, &mut seen);
        if hosted.is_err() {
            let _ = vm.delete_slot(kvm_harness::SYSTEM_SLOT);
        }
        let end = threads::join(guest, "vCPU thread")?;
        hosted?;
        let end = end?;
        seen.extend(rx.try_iter());
        Ok((seen, end))
    })
}

/// Runs a scenario `LOOPS` times; a violation names its round.
fn in_rounds(kvm: &Arc<Kvm>, quirk_off: bool, once: fn(&Arc<Kvm>, bool) -> Result<()>) -> Result<()> {
    for round in 0..LOOPS {
        once(kvm, quirk_off).map_err(|e| match e {
            Error::Rule { rule, detail } => Error::Rule { rule, detail: format!("round {round}: {detail}") },
            other => other,
        })?;
    }
    Ok(())
}

fn move_once(kvm: &Arc<Kvm>, quirk_off: bool) -> Result<()> {
    // Phases: spin while 0, while MMIO, while 0, while MMIO.
    let (vm, vcpu, progress) = spawn_vm(kvm, quirk_off, &[0, MMIO_VAL, 0, MMIO_VAL], false)?;
    let (seen, end) = with_running_guest(&vm, vcpu, |rx, seen| {
        seen.push(wait_for_vcpu(rx, "at start")?);
        progress.wait_spinning(0);
        let region = vm.slot_at(GPA).ok_or_else(|| Error::misuse("slot 10 is not installed"))?;
        let memory = region.memory.clone().ok_or_else(|| Error::misuse("slot 10 has no memory"))?;
        // KVM_MR_MOVE one page down: the GPA now maps the backing's second
        // page (zero), so the guest must not see what lands in the first.
        vm.set_region(&Region { gpa: GPA - 4096, ..region.clone() })?;
        memory.write_u64(0, 2);
        progress.wait_spins();
        // Change the value before moving back, else the guest could race and see 2.
        memory.write_u64(0, 1);
        vm.set_region(&region)?;
        seen.push(wait_for_vcpu(rx, "after moving the memslot back")?);
        seen.push(wait_for_vcpu(rx, "(the report deferred while the memslot was misaligned)")?);
        Ok(())
    })?;
    let rule = "while its memslot moves, a guest reads either the slot's data or MMIO, never a misaligned page";
    if let GuestEnd::Died(exit, rip) = end {
        return Err(Error::rule(rule, format!("the guest died: {} at RIP {rip:#x}", exit.reason_name())));
    }
    ensure!(seen.len() == 5, rule, "expected the start report and 4 phase reports, got {seen:#x?}");
    expect_in(rule, "phase 1 (spin while 0, moved away)", seen[1], &[1, MMIO_VAL])?;
    expect_in(rule, "phase 2 (spin while MMIO, no MMIO after the move)", seen[2], &[0, 1])?;
    expect_in(rule, "phase 3 (spin while 0, moved back)", seen[3], &[1, MMIO_VAL])?;
    expect_in(rule, "phase 4 (spin while MMIO, moved back)", seen[4], &[1])
}

fn delete_once(kvm: &Arc<Kvm>, quirk_off: bool) -> Result<()> {
    // Phases: spin while 0, while MMIO, while 0, then while MMIO until the
    // code memslot goes away. The IDT is clobbered so that the #PF from the
    // missing code slot escalates to a triple fault.
    let (vm, vcpu, progress) = spawn_vm(kvm, quirk_off, &[0, MMIO_VAL, 0, MMIO_VAL], true)?;
    let (seen, end) = with_running_guest(&vm, vcpu, |rx, seen| {
        seen.push(wait_for_vcpu(rx, "at start")?);
        progress.wait_spinning(0);
        vm.delete_slot(SLOT)?;
        seen.push(wait_for_vcpu(rx, "after deleting the memslot")?);
        progress.wait_spinning(1);
        vm.set_region(&thp_region(GPA)?)?;
        seen.push(wait_for_vcpu(rx, "after re-creating the memslot")?);
        progress.wait_spinning(2);
        vm.delete_slot(SLOT)?;
        seen.push(wait_for_vcpu(rx, "after deleting the memslot again")?);
        progress.wait_spinning(3);
        // Now delete the memslot holding code and page tables.
        vm.delete_slot(kvm_harness::SYSTEM_SLOT)
    })?;
    let rule = "a deleted memslot reads as MMIO, a re-created one as fresh zeroed memory";
    ensure!(seen.len() == 4, rule, "expected the start report and 3 phase reports, got {seen:#x?}");
    expect_in(rule, "phase 1 (memslot deleted)", seen[1], &[MMIO_VAL])?;
    expect_in(rule, "phase 2 (memslot re-created)", seen[2], &[0])?;
    expect_in(rule, "phase 3 (memslot deleted again)", seen[3], &[MMIO_VAL])?;
    let rule = "deleting the memslot with the guest's code and page tables ends the guest in \
                KVM_EXIT_SHUTDOWN or KVM_EXIT_INTERNAL_ERROR (at its final spin loop)";
    let (spin, spin_end) = (WATCH_MEMSLOT.label("spin"), WATCH_MEMSLOT.label("spin_end"));
    match end {
        GuestEnd::Died(Exit::Shutdown, _) => Ok(()),
        // On AMD the VMCB is reset after a shutdown, so only an internal error pins the RIP.
        GuestEnd::Died(Exit::InternalError { .. }, rip) => {
            ensure!(
                (spin..spin_end).contains(&rip),
                rule,
                "internal error at RIP {rip:#x}, not in [{spin:#x}, {spin_end:#x})"
            );
            Ok(())
        }
        GuestEnd::Died(exit, rip) => Err(Error::rule(rule, format!("{} at RIP {rip:#x}", exit.reason_name()))),
        GuestEnd::Done => Err(Error::rule(rule, "the guest finished instead")),
    }
}

/// Whether the VM may disable `KVM_X86_QUIRK_SLOT_ZAP_ALL` (upstream runs the
/// move/delete scenarios both ways when it can).
fn slot_zap_quirk_can_be_disabled(kvm: &Kvm) -> bool {
    kvm.cap(Cap::DisableQuirks2) as u32 & KVM_X86_QUIRK_SLOT_ZAP_ALL != 0
}

// ---- the guest physical address limit, flags-only changes ----

/// kvm_arch_prepare_memory_region(): a memslot whose last GFN lies past
/// kvm_mmu_max_gfn() is rejected with EINVAL, wholly beyond or straddling
/// 2^52; the identical memslot at GPA 0 is accepted.
fn memslot_beyond_max_gfn_rejected_with_einval(kvm: &Arc<Kvm>) -> Result<()> {
    let vm = Vm::bare(kvm, VmType::Default)?;
    for (gpa, what) in [(BEYOND_MAX_GPA, "starting at 2^52"), (BEYOND_MAX_GPA - SIZE / 2, "straddling 2^52")] {
        expect_errno(&format!("a memslot {what} (gpa {gpa:#x}) is rejected with EINVAL"), Errno::EINVAL, || {
            vm.set_region(&valid_region(SLOT, gpa)?)
        })?;
    }
    expect_ok("control: the same memslot at GPA 0 is accepted", || vm.set_region(&valid_region(SLOT, 0)?))
}

/// A guest running the agent with slot `SLOT` at `GPA`, its first u64 set by the host.
fn agent_with_slot(kvm: &Arc<Kvm>) -> Result<(Vm, Agent, Arc<HostMemory>)> {
    let vm = Vm::with_payload(kvm, VmType::Default, &GUEST_AGENT)?;
    let agent = Agent::start(vm.vcpu(0, [0; 4])?)?;
    let memory = vm.add_memory(SLOT, GPA, SIZE)?;
    memory.write_u64(0, HOST_VALUE);
    Ok((vm, agent, memory))
}

/// The guest reads the host's value at `GPA` and its store at `GPA + 8`
/// reaches the host's memory: the slot is in place and intact.
fn expect_slot_intact(agent: &mut Agent, memory: &HostMemory, when: &str) -> Result<()> {
    let read = agent.read(GPA)?;
    ensure!(read == HOST_VALUE, format!("{when}, the guest reads the memslot's memory"), "read {read:#x}");
    agent.write(GPA + 8, GUEST_VALUE)?;
    let seen = memory.read_u64(8);
    ensure!(seen == GUEST_VALUE, format!("{when}, guest stores reach the memslot's memory"), "host sees {seen:#x}");
    Ok(())
}

/// kvm_set_memslot(): a move the architecture rejects (past the max GFN)
/// fails with EINVAL and restores the invalidated slot where it was.
fn moving_memslot_beyond_max_gfn_fails_and_keeps_it_in_place(kvm: &Arc<Kvm>) -> Result<()> {
    let (vm, mut agent, memory) = agent_with_slot(kvm)?;
    expect_slot_intact(&mut agent, &memory, "before the move")?;
    let moved = Region { gpa: BEYOND_MAX_GPA, ..Region::new(SLOT, GPA, memory.clone()) };
    expect_errno(&format!("moving a memslot to {BEYOND_MAX_GPA:#x} is rejected with EINVAL"), Errno::EINVAL, || {
        vm.set_region(&moved)
    })?;
    memory.write_u64(8, 0);
    expect_slot_intact(&mut agent, &memory, "after the rejected move")?;
    agent.done().map(drop)
}

/// KVM_MR_FLAGS_ONLY: turning dirty logging on and off keeps the memslot's
/// memory and the guest's view of it.
fn dirty_logging_toggle_keeps_memslot_memory(kvm: &Arc<Kvm>) -> Result<()> {
    let (vm, mut agent, memory) = agent_with_slot(kvm)?;
    expect_slot_intact(&mut agent, &memory, "before dirty logging")?;
    for (flags, when) in [(KVM_MEM_LOG_DIRTY_PAGES, "with dirty logging on"), (0, "with dirty logging off again")] {
        let region = Region { flags, ..Region::new(SLOT, GPA, memory.clone()) };
        expect_ok(&format!("a flags-only change to {flags:#x} is accepted"), || vm.set_region(&region))?;
        memory.write_u64(8, 0);
        expect_slot_intact(&mut agent, &memory, when)?;
    }
    agent.done().map(drop)
}

/// What the host stores for the guest to read, and the guest for the host.
const HOST_VALUE: u64 = 0x484f_5354_5641_4c55;
const GUEST_VALUE: u64 = 0x4755_4553_5456_414c;

/// A non-canonical address: any access raises #GP(0).
const NONCANONICAL: u64 = 0x8000_0000_0000_0000;
/// How long a vCPU may take to exit after the #GP; a healthy kernel exits
/// within milliseconds, an unfixed one never does.
const VECTORING_DEADLINE: Duration = Duration::from_secs(2);

/// An exception whose IDT lies at a GPA without a memslot cannot be
/// delivered: reading the gate is emulated MMIO, which KVM cannot emulate
/// mid-delivery. KVM must stop with `KVM_EXIT_INTERNAL_ERROR`,
/// `KVM_INTERNAL_ERROR_DELIVERY_EV`, reporting the gate's GPA in `data[3]`
/// (upstream's `test_mmio_during_vectoring`, there with a guest `lidt`).
fn exception_through_slotless_idt_exits_delivery_ev(kvm: &Arc<Kvm>, vm_type: VmType) -> Result<()> {
    let vm = Vm::with_payload(kvm, vm_type, &GUEST_AGENT)?;
    let mut agent = Agent::start(vm.vcpu(0, [0; 4])?)?;
    let idt = layout::TEST_AREA_GPA;
    ensure!(vm.slot_at(idt).is_none(), "the IDT lies outside every memslot", "a memslot covers {idt:#x}");
    let mut sregs = agent.vcpu().sregs()?;
    (sregs.idt.base, sregs.idt.limit) = (idt, 0xfff);
    agent.vcpu().set_sregs(&sregs)?;
    agent.vcpu().set_timeout(VECTORING_DEADLINE);
    agent.submit(Op::Read { gpa: NONCANONICAL })?;

    let gate = idt + 13 * 16;
    let rule = format!(
        "{vm_type}: a #GP whose IDT is at slotless GPA {idt:#x} exits KVM_INTERNAL_ERROR_DELIVERY_EV naming gate GPA \
         {gate:#x}"
    );
    kernel_rules::with_fix_hints(kernel_rules::EVENT_VECTORING_MMIO, || match agent.vcpu().run() {
        Ok(Exit::InternalError { suberror: KVM_INTERNAL_ERROR_DELIVERY_EV, data }) if data.get(3) == Some(&gate) => {
            Ok(())
        }
        Ok(other) => Err(Error::rule(&rule, format!("got {other:x?}"))),
        Err(Error::Timeout { rip, .. }) => Err(Error::rule(
            &rule,
            format!("no exit within {VECTORING_DEADLINE:?}: KVM kept re-entering the guest (RIP {rip:#x})"),
        )),
        Err(e) => Err(e),
    })
}

fn main() -> ExitCode {
    let mut suite = Suite::new(env!("CARGO_CRATE_NAME"));
    suite.test("zero_memslots_run_exits_with_internal_error", vec![], zero_memslots);
    suite.test("all_nr_memslots_accepted_and_one_more_rejected", vec![], max_memslots);
    suite.test("slot_id_below_nr_memslots_accepted_on_empty_vm", vec![], |kvm| {
        slot_id_limit(kvm, kvm.cap(Cap::NrMemslots) as u32 - 1, true)
    });
    suite.test("slot_id_nr_memslots_rejected_on_empty_vm", vec![], |kvm| {
        slot_id_limit(kvm, kvm.cap(Cap::NrMemslots) as u32, false)
    });
    suite.test("slot_id_0x7fff_rejected_on_empty_vm", vec![], |kvm| slot_id_limit(kvm, 0x7fff, false));
    kvm_harness::register!(suite, vec![] =>
        memslot_beyond_max_gfn_rejected_with_einval,
        moving_memslot_beyond_max_gfn_fails_and_keeps_it_in_place,
        dirty_logging_toggle_keeps_memslot_memory,
    );

    suite.per_vm_type(
        "exception_through_slotless_idt_exits_delivery_ev",
        |_| vec![],
        exception_through_slotless_idt_exits_delivery_ev,
    );
    for (ioctl, label) in [(Ioctl::V1, "v1"), (Ioctl::V2, "v2")] {
        for bit in 0..32 {
            suite.per_vm_type(
                &format!("{label}_flag_bit_{bit:02}_accepted_iff_supported"),
                |_| vec![],
                move |kvm, vm_type| flag_bit(kvm, vm_type, ioctl, bit),
            );
        }
    }

    let quirk_modes: Vec<bool> = match suite.kvm() {
        Some(kvm) if slot_zap_quirk_can_be_disabled(kvm) => vec![false, true],
        _ => vec![false],
    };
    for quirk_off in quirk_modes {
        let label = if quirk_off { "slot_zap_quirk_disabled" } else { "slot_zap_quirk_enabled" };
        suite.test(format!("move_in_use_memslot_{label}"), vec![], move |kvm| in_rounds(kvm, quirk_off, move_once));
        suite.test(format!("delete_in_use_memslot_{label}"), vec![], move |kvm| in_rounds(kvm, quirk_off, delete_once));
    }
    suite.run()
}
