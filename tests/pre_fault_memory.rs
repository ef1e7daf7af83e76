//! `KVM_PRE_FAULT_MEMORY` rules, for (default VM, shared), (protected VM,
//! shared) and (protected VM, private).
//!
//! Port of the kernel's `pre_fault_memory_test.c` (newest upstream, with the
//! worker that deletes and re-creates the memslot while the vCPU prefaults):
//! - `range.size` shrinks exactly when a call makes progress, never on failure;
//! - a range past the end of the memslot stops there: `ENOENT` (no memslot
//!   means emulated MMIO, which cannot be prefaulted), with the rest left in
//!   `range.size`;
//! - `EINTR` is retried (and, beyond upstream, provoked by a signal storm);
//! - a memslot deleted and re-created concurrently neither hangs the call nor
//!   corrupts the result. The call runs under the watchdog: if only the
//!   watchdog's signal ends it, the kernel spun (Debian's 6.12.117 does: it
//!   lacks upstream 20a6cff3b283 "KVM: x86/mmu: Check and free obsolete roots
//!   in kvm_mmu_reload()" and the later "Return -EAGAIN if userspace
//!   deletes/moves memslot during prefault") and the test fails saying which
//!   side was stuck. The worker-free variant is the 6.12 upstream test.
//!
//! Beyond upstream: invalid ranges and flags fail with `EINVAL` and leave the
//! range untouched (virt/kvm/kvm_main.c), and a private GPA whose memslot
//! has no guest_memfd fails with `EFAULT`.

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use guest_payloads::{layout::TEST_AREA_GPA, GUEST_AGENT};
use kvm_harness::bindings::kvm_pre_fault_memory;
use kvm_harness::{
    ensure, watchdog, Agent, Cap, Errno, Error, GmemBinding, HostMemory, Kvm, Need, Region, Result, SignalStorm, Suite,
    Vcpu, Vm, VmType,
};

const PAGE: u64 = 4096;
const SZ_2M: u64 = 2 << 20;
const TEST_SIZE: u64 = SZ_2M + PAGE;
const TEST_SLOT: u32 = 10;
/// 2 MiB aligned, inside the guest's identity map.
const TEST_GPA: u64 = TEST_AREA_GPA + 2 * SZ_2M;

#[derive(Debug, Clone, Copy)]
struct Combo {
    vm_type: VmType,
    private: bool,
}

impl Combo {
    const ALL: [Combo; 3] = [
        Combo { vm_type: VmType::Default, private: false },
        Combo { vm_type: VmType::SwProtected, private: false },
        Combo { vm_type: VmType::SwProtected, private: true },
    ];

    fn name(self) -> String {
        format!("{}_{}", self.vm_type.short(), if self.private { "private" } else { "shared" })
    }

    fn needs(self) -> Vec<Need> {
        vec![Need::Cap(Cap::PreFaultMemory), Need::VmType(self.vm_type)]
    }
}

/// The VM, a vCPU that has not run yet, and the test slot's region (kept so
/// the worker can re-create it exactly, guest_memfd binding included).
fn setup(kvm: &Arc<Kvm>, combo: Combo) -> Result<(Vm, Vcpu, Region)> {
    setup_slot(kvm, combo, TEST_SLOT, TEST_GPA, TEST_SIZE)
}

/// [`setup`] with the slot's id, GPA and size given.
fn setup_slot(kvm: &Arc<Kvm>, combo: Combo, slot: u32, gpa: u64, size: u64) -> Result<(Vm, Vcpu, Region)> {
    let vm = Vm::with_payload(kvm, combo.vm_type, &GUEST_AGENT)?;
    let memory = Arc::new(HostMemory::anonymous(size)?);
    let mut region = Region::new(slot, gpa, memory);
    if combo.private {
        let gmem = Arc::new(vm.create_guest_memfd(size, 0)?);
        region = region.with_guest_memfd(GmemBinding::Memfd(gmem), 0);
    }
    vm.set_region(&region)?;
    if combo.private {
        vm.make_private(gpa, size)?;
    }
    let vcpu = vm.vcpu(0, [0; 4])?;
    Ok((vm, vcpu, region))
}

/// Longest a prefault may take before it counts as hung: the configured
/// watchdog deadline, capped (2 MiB prefaults take well under a second even
/// under nested TCG).
const PREFAULT_DEADLINE_CAP: Duration = Duration::from_secs(5);

/// One prefault of `[TEST_GPA + offset, +size)`, with `race` racing a worker
/// that deletes the slot once prefaulting starts and re-creates it when
/// told; must end with `expected_left` bytes left (and `ENOENT` when that is
/// non-zero).
fn pre_fault(
    vm: &Vm,
    vcpu: &mut Vcpu,
    region: &Region,
    (offset, size, expected_left): (u64, u64, u64),
    race: bool,
) -> Result<()> {
    let mut range = kvm_pre_fault_memory { gpa: TEST_GPA + offset, size, ..Default::default() };
    let what = format!("KVM_PRE_FAULT_MEMORY([{:#x}, +{size:#x}))", range.gpa);
    let deadline = watchdog::configured_timeout()?.min(PREFAULT_DEADLINE_CAP);
    let worker_ready = AtomicBool::new(!race);
    let deleted = AtomicBool::new(false);
    let prefault_ready = AtomicBool::new(false);
    let recreate = AtomicBool::new(false);
    std::thread::scope(|s| -> Result<()> {
        let worker = s.spawn(|| -> Result<()> {
            if !race {
                return Ok(());
            }
            worker_ready.store(true, Ordering::SeqCst);
            while !prefault_ready.load(Ordering::SeqCst) {
                std::hint::spin_loop();
            }
            vm.set_region(&region.deletion())?;
            deleted.store(true, Ordering::SeqCst);
            while !recreate.load(Ordering::SeqCst) {
                std::thread::yield_now();
            }
            vm.set_region(region)
        });
        let mut worker = Some(worker);
        let join_worker = |worker: &mut Option<std::thread::ScopedJoinHandle<'_, Result<()>>>| -> Result<()> {
            recreate.store(true, Ordering::SeqCst);
            match worker.take() {
                Some(handle) => kvm_harness::threads::join_result(handle, "slot worker"),
                None => Ok(()),
            }
        };
        while !worker_ready.load(Ordering::SeqCst) {
            std::hint::spin_loop();
        }
        prefault_ready.store(true, Ordering::SeqCst);

        // Whatever happens below, the worker is told to re-create the slot
        // and joined before the scope ends: a failed check must not leave it
        // waiting (the scope would wait for it forever).
        let checked = (|| -> Result<()> {
            let mut outcome;
            loop {
                let before = range.size;
                let started = Instant::now();
                let (result, fired) = vcpu.pre_fault_memory_with_deadline(&mut range, deadline);
                if fired {
                    let deletion_done = deleted.load(Ordering::SeqCst);
                    join_worker(&mut worker)?;
                    let rule = if race {
                        "KVM_PRE_FAULT_MEMORY never hangs while its memslot is deleted and re-created"
                    } else {
                        "KVM_PRE_FAULT_MEMORY of a memslot-backed range completes"
                    };
                    let race_note = match (race, deletion_done) {
                        (false, _) => String::new(),
                        (true, true) => "; the worker's slot deletion had completed, so the prefault kept retrying \
                         on its own: consistent with a kernel whose kvm_mmu_reload() does not free the roots the \
                         deletion made obsolete (upstream 20a6cff3b283, \"KVM: x86/mmu: Check and free obsolete \
                         roots in kvm_mmu_reload()\")"
                            .to_string(),
                        (true, false) => "; the worker's KVM_SET_USER_MEMORY_REGION2(delete) had not returned either: \
                         the deletion waits for the prefault's kvm->srcu read side while the prefault retries \
                         its fault on the memslot being deleted, a deadlock newer kernels break by failing the \
                         prefault with EAGAIN (upstream \"KVM: x86/mmu: Return -EAGAIN if userspace \
                         deletes/moves memslot during prefault\")"
                            .to_string(),
                    };
                    return Err(Error::rule(
                        rule,
                        format!(
                            "{what} was still in the kernel after {:.1} s and only the watchdog's signal ended it \
                         ({result:?}; gpa {:#x}, {:#x} bytes left){race_note}",
                            started.elapsed().as_secs_f64(),
                            range.gpa,
                            range.size
                        ),
                    ));
                }
                let progressed = range.size < before;
                ensure!(
                    progressed != result.is_err(),
                    "KVM_PRE_FAULT_MEMORY shrinks range.size exactly when it succeeds",
                    "{what}: {} with range.size {before:#x} -> {:#x}",
                    match &result {
                        Ok(()) => "success".to_string(),
                        Err(e) => format!("failure ({e})"),
                    },
                    range.size
                );
                ensure!(
                    !progressed || range.gpa == TEST_GPA + offset + (size - range.size),
                    "KVM_PRE_FAULT_MEMORY advances range.gpa by exactly the bytes it consumed",
                    "{what}: gpa {:#x} with {:#x} bytes left",
                    range.gpa,
                    range.size
                );
                outcome = result;
                if matches!(&outcome, Err(e) if e.errno() == Some(Errno::EINTR)) {
                    continue;
                }
                if worker.is_some() {
                    if race {
                        // What the race looked like, for the log: proof it was exercised.
                        let seen = match &outcome {
                            Ok(()) => format!("{:#x} bytes left", range.size),
                            Err(e) => format!("{:?} with {:#x} bytes left", e.errno(), range.size),
                        };
                        let deletion = if deleted.load(Ordering::SeqCst) { "done" } else { "pending" };
                        println!("pre_fault_memory: {what} against the slot deletion ({deletion}): {seen}");
                    }
                    // Re-create the slot (if the worker deleted it mid-call) and
                    // retry for a stable answer; a finished range is not retried
                    // because size 0 is EINVAL.
                    join_worker(&mut worker)?;
                    if range.size != 0 {
                        continue;
                    }
                }
                if range.size == 0 || outcome.is_err() {
                    break;
                }
            }
            ensure!(
                range.size == expected_left,
                "KVM_PRE_FAULT_MEMORY stops exactly at the end of the memslot",
                "{what}: completed with {:#x} bytes left, expected {expected_left:#x} ({outcome:?})",
                range.size
            );
            if expected_left == 0 {
                kvm_harness::expect_ok("KVM_PRE_FAULT_MEMORY of a fully memslot-backed range succeeds", || outcome)
            } else {
                kvm_harness::expect_errno(
                    "KVM_PRE_FAULT_MEMORY past the end of the memslot fails with ENOENT (no memslot: emulated MMIO)",
                    Errno::ENOENT,
                    || outcome,
                )
            }
        })();
        let joined = join_worker(&mut worker);
        checked.and(joined)
    })
}

/// (offset, size, bytes left): the slot's first 2 MiB; its last page plus
/// the page past its end; only the page past its end.
const CALLS: [(u64, u64, u64); 3] = [(0, SZ_2M, 0), (SZ_2M, 2 * PAGE, PAGE), (TEST_SIZE, PAGE, PAGE)];

fn prefault_then_guest_reads(kvm: &Arc<Kvm>, combo: Combo, race: bool) -> Result<()> {
    let (vm, mut vcpu, region) = setup(kvm, combo)?;
    for call in CALLS {
        pre_fault(&vm, &mut vcpu, &region, call, race)?;
    }
    // The slot is back; the guest reads every page of it without exiting.
    guest_reads_every_page(vcpu, TEST_GPA, TEST_SIZE, "after prefaulting, the guest reads every page of the slot")
}

/// Runs the agent on `vcpu` to read every page of `[gpa, gpa + size)`;
/// any exit on the way is a violation of `rule`.
fn guest_reads_every_page(vcpu: Vcpu, gpa: u64, size: u64, rule: &str) -> Result<()> {
    let mut guest = Agent::start(vcpu)?;
    let touched = guest.touch(gpa, size, PAGE, false).map_err(|e| Error::rule(rule, e.to_string()))?;
    ensure!(touched == size / PAGE, "the guest's touch loop visits every page", "touched {touched}");
    guest.done().map(drop)
}

/// Size of the range prefaulted under a signal storm: large enough that
/// 4 KiB-granular prefaulting (guest_memfd) takes many iterations.
const STORM_SIZE: u64 = 64 << 20;
const STORM_SLOT: u32 = 11;
const STORM_GPA: u64 = TEST_AREA_GPA + (1 << 30);

/// Beyond upstream, which retries EINTR but never provokes it: with signals
/// arriving every 200 µs, each call either fails with EINTR leaving the range
/// untouched or succeeds having consumed part of it, the caller's retries
/// finish the range, and the guest then reads every page without an exit.
fn prefault_interrupted_by_signals(kvm: &Arc<Kvm>, combo: Combo) -> Result<()> {
    let (_vm, mut vcpu, _region) = setup_slot(kvm, combo, STORM_SLOT, STORM_GPA, STORM_SIZE)?;
    let deadline = watchdog::configured_timeout()?;
    let mut range = kvm_pre_fault_memory { gpa: STORM_GPA, size: STORM_SIZE, ..Default::default() };
    let (mut calls, mut eintr) = (0u64, 0u64);
    let storm = SignalStorm::start(Duration::from_micros(200));
    while range.size != 0 {
        let (before_gpa, before_size) = (range.gpa, range.size);
        let (result, fired) = vcpu.pre_fault_memory_with_deadline(&mut range, deadline);
        calls += 1;
        ensure!(!fired, "KVM_PRE_FAULT_MEMORY under signals returns", "call {calls} hung past {deadline:?}");
        let consumed = before_size - range.size;
        match result {
            Err(e) if e.errno() == Some(Errno::EINTR) => {
                eintr += 1;
                ensure!(
                    (range.gpa, range.size) == (before_gpa, before_size),
                    "KVM_PRE_FAULT_MEMORY fails with EINTR only before any progress, leaving the range untouched",
                    "call {calls}: gpa {before_gpa:#x} -> {:#x}, size {before_size:#x} -> {:#x}",
                    range.gpa,
                    range.size
                );
            }
            Ok(()) => ensure!(
                consumed > 0 && range.gpa == before_gpa + consumed,
                "a successful KVM_PRE_FAULT_MEMORY consumed part of the range and advanced gpa by as much",
                "call {calls}: gpa {before_gpa:#x} -> {:#x}, size {before_size:#x} -> {:#x}",
                range.gpa,
                range.size
            ),
            Err(e) => {
                return Err(Error::rule(
                    "KVM_PRE_FAULT_MEMORY of a memslot-backed range fails only with EINTR under signals",
                    format!("call {calls} at gpa {:#x}: {e}", range.gpa),
                ))
            }
        }
    }
    let sent = storm.sent();
    drop(storm);
    println!(
        "pre_fault_memory: {} {STORM_SIZE:#x} bytes in {calls} calls ({eintr} EINTR), {sent} signals",
        combo.name()
    );
    if combo.private {
        // guest_memfd is prefaulted a 4 KiB page at a time: thousands of
        // iterations, so signals every 200 µs must have cut it short.
        ensure!(
            calls > 1,
            "a signal interrupts a long KVM_PRE_FAULT_MEMORY (it checks signal_pending between pages)",
            "{STORM_SIZE:#x} bytes prefaulted in one call despite {sent} signals"
        );
    }
    guest_reads_every_page(
        vcpu,
        STORM_GPA,
        STORM_SIZE,
        "after an interrupted, retried prefault the guest reads every page",
    )
}

fn invalid_ranges(kvm: &Arc<Kvm>, combo: Combo) -> Result<()> {
    let (_vm, vcpu, _region) = setup(kvm, combo)?;
    let cases = [
        ("non-zero flags", kvm_pre_fault_memory { gpa: TEST_GPA, size: PAGE, flags: 1, ..Default::default() }),
        ("an unaligned GPA", kvm_pre_fault_memory { gpa: TEST_GPA + 8, size: PAGE, ..Default::default() }),
        ("an unaligned size", kvm_pre_fault_memory { gpa: TEST_GPA, size: PAGE + 8, ..Default::default() }),
        ("size 0", kvm_pre_fault_memory { gpa: TEST_GPA, size: 0, ..Default::default() }),
        (
            "a wrapping range",
            kvm_pre_fault_memory { gpa: TEST_GPA, size: 0u64.wrapping_sub(TEST_GPA), ..Default::default() },
        ),
    ];
    for (what, request) in cases {
        let mut range = request;
        kvm_harness::expect_errno(
            &format!("KVM_PRE_FAULT_MEMORY with {what} fails with EINVAL"),
            Errno::EINVAL,
            || vcpu.pre_fault_memory(&mut range),
        )?;
        ensure!(
            (range.gpa, range.size, range.flags) == (request.gpa, request.size, request.flags),
            format!("a rejected KVM_PRE_FAULT_MEMORY ({what}) leaves the range untouched"),
            "gpa {:#x} size {:#x} flags {:#x}, passed gpa {:#x} size {:#x} flags {:#x}",
            range.gpa,
            range.size,
            range.flags,
            request.gpa,
            request.size,
            request.flags
        );
    }
    Ok(())
}

fn main() -> ExitCode {
    let mut suite = Suite::new("pre_fault_memory");
    for combo in Combo::ALL {
        suite.test(
            format!("{}_prefault_stops_at_slot_end_then_guest_reads", combo.name()),
            combo.needs(),
            move |kvm| prefault_then_guest_reads(kvm, combo, false),
        );
        suite.test(
            format!("{}_prefault_never_hangs_with_concurrent_slot_delete_recreate", combo.name()),
            combo.needs(),
            move |kvm| prefault_then_guest_reads(kvm, combo, true),
        );
        suite.test(
            format!("{}_prefault_interrupted_by_signals_resumes_to_completion", combo.name()),
            combo.needs(),
            move |kvm| prefault_interrupted_by_signals(kvm, combo),
        );
        suite.test(format!("{}_invalid_ranges_fail_with_einval", combo.name()), combo.needs(), move |kvm| {
            invalid_ranges(kvm, combo)
        });
    }

    let needs = vec![Need::Cap(Cap::PreFaultMemory), Need::VmType(VmType::SwProtected)];
    suite.test("sw_protected_private_gpa_without_guest_memfd_fails_with_efault", needs, |kvm| {
        let vm = Vm::with_payload(kvm, VmType::SwProtected, &GUEST_AGENT)?;
        vm.add_memory(TEST_SLOT, TEST_GPA, TEST_SIZE)?;
        vm.make_private(TEST_GPA, TEST_SIZE)?;
        let vcpu = vm.vcpu(0, [0; 4])?;
        let mut range = kvm_pre_fault_memory { gpa: TEST_GPA, size: SZ_2M, ..Default::default() };
        kvm_harness::expect_errno(
            "KVM_PRE_FAULT_MEMORY of a private GPA whose memslot has no guest_memfd fails with EFAULT",
            Errno::EFAULT,
            || vcpu.pre_fault_memory(&mut range),
        )?;
        ensure!(
            range.size == SZ_2M && range.gpa == TEST_GPA,
            "a failed KVM_PRE_FAULT_MEMORY that made no progress leaves the range untouched",
            "gpa {:#x} size {:#x}",
            range.gpa,
            range.size
        );
        Ok(())
    });
    suite.run()
}
