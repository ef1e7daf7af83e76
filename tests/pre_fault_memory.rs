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
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::thread::{Scope, ScopedJoinHandle};
use std::time::{Duration, Instant};

use nix::unistd::{gettid, Pid};

use guest_payloads::{layout::TEST_AREA_GPA, GUEST_AGENT};
use kvm_harness::bindings::kvm_pre_fault_memory;
use kvm_harness::kernel_rules::{with_fix_hints, PREFAULT_VS_MEMSLOT_DELETION};
use kvm_harness::task_state::TaskState;
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

    /// Which side of the memory the case pre-faults, for its test names.
    fn side(self) -> &'static str {
        if self.private {
            "private"
        } else {
            "shared"
        }
    }

    fn needs(self) -> Vec<Need> {
        vec![Need::Cap(Cap::PreFaultMemory)]
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
/// watchdog deadline, capped. A healthy 2 MiB prefault took at most 0.15 s
/// in the nested-TCG guests with both host cores busy, but once in about
/// 700 racing calls on 7.3.4, with the host at load 10, one was still in the
/// kernel after 2 s (no progress, the deletion waiting). Under TCG the
/// guest's clocks, its CPU-time accounting included, run on the host's wall
/// clock, so a starved emulator looks the same from inside as a kernel that
/// spins; only a wide margin tells them apart: 5 s. The failure quotes what
/// both threads were doing in the kernel ([`kernel_states_while_running`]).
/// A kernel that spins (6.12.118) costs 5 s per test.
const PREFAULT_DEADLINE_CAP: Duration = Duration::from_secs(5);

/// How often both racing threads' kernel state is sampled while a prefault
/// runs, for the message of a hang.
const STATE_SAMPLE: Duration = Duration::from_millis(250);

/// What the slot racer and the prefaulting thread tell each other.
#[derive(Debug, Default)]
struct RaceFlags {
    /// The worker runs and waits for the go.
    ready: AtomicBool,
    /// The prefault is about to start: delete the slot.
    go: AtomicBool,
    /// The worker's deletion returned.
    deleted: AtomicBool,
    /// Re-create the slot and finish.
    recreate: AtomicBool,
    /// The worker's thread id, for its kernel state if a prefault hangs.
    worker_tid: AtomicI32,
}

/// A worker thread that deletes the test slot the moment a prefault starts
/// and re-creates it when told. Dropping the racer tells it to re-create
/// and joins it, so no early return can leave the scope waiting on it.
struct SlotRacer<'scope> {
    flags: Arc<RaceFlags>,
    worker: Option<ScopedJoinHandle<'scope, Result<()>>>,
}

impl<'scope> SlotRacer<'scope> {
    /// Spawns the worker on `scope`; returns once it is released, so the
    /// caller's next call races the deletion.
    fn start<'env>(scope: &'scope Scope<'scope, 'env>, vm: &'env Vm, region: &'env Region) -> Self {
        let flags = Arc::new(RaceFlags::default());
        let worker = {
            let flags = flags.clone();
            scope.spawn(move || -> Result<()> {
                flags.worker_tid.store(gettid().as_raw(), Ordering::SeqCst);
                flags.ready.store(true, Ordering::SeqCst);
                while !flags.go.load(Ordering::SeqCst) {
                    std::hint::spin_loop();
                }
                vm.set_region(&region.deletion())?;
                flags.deleted.store(true, Ordering::SeqCst);
                while !flags.recreate.load(Ordering::SeqCst) {
                    std::thread::yield_now();
                }
                vm.set_region(region)
            })
        };
        while !flags.ready.load(Ordering::SeqCst) {
            std::hint::spin_loop();
        }
        flags.go.store(true, Ordering::SeqCst);
        Self { flags, worker: Some(worker) }
    }

    /// The worker's thread id, while it runs (not once `finish` joined it).
    fn live_worker_tid(&self) -> Option<Pid> {
        self.worker.as_ref().map(|_| Pid::from_raw(self.flags.worker_tid.load(Ordering::SeqCst)))
    }

    /// The flags, shared with the sampler of a call's kernel states.
    fn flags(&self) -> Arc<RaceFlags> {
        self.flags.clone()
    }

    /// Whether the worker's slot deletion has returned.
    fn deleted(&self) -> bool {
        self.flags.deleted.load(Ordering::SeqCst)
    }

    /// Has the worker re-create the slot and joins it (once; later calls are no-ops).
    fn finish(&mut self) -> Result<()> {
        self.flags.recreate.store(true, Ordering::SeqCst);
        match self.worker.take() {
            Some(worker) => kvm_harness::threads::join_result(worker, "slot worker"),
            None => Ok(()),
        }
    }
}

impl Drop for SlotRacer<'_> {
    fn drop(&mut self) {
        // The error, if any, was already reported through `finish` or is
        // superseded by the failure that dropped the racer early.
        let _ = self.finish();
    }
}

/// One prefault call: the range asked for and the bytes expected to remain.
#[derive(Debug, Clone, Copy)]
struct Call {
    offset: u64,
    size: u64,
    expected_left: u64,
}

/// One prefault of `[slot GPA + offset, +size)`, with `race` racing a
/// [`SlotRacer`]; must end with `expected_left` bytes left (and `ENOENT`
/// when that is non-zero).
fn pre_fault(vm: &Vm, vcpu: &mut Vcpu, region: &Region, call: Call, race: bool) -> Result<()> {
    std::thread::scope(|s| {
        let mut racer = race.then(|| SlotRacer::start(s, vm, region));
        let checked = prefault_until_settled(vcpu, region.gpa, call, racer.as_mut());
        let joined = racer.map_or(Ok(()), |mut racer| racer.finish());
        checked.and(joined)
    })
}

/// Prefaults `call`, retrying `EINTR` and, once, the first settled outcome
/// (the slot is back by then when a racer deleted it); checks every step.
fn prefault_until_settled(
    vcpu: &mut Vcpu,
    slot_gpa: u64,
    call: Call,
    mut racer: Option<&mut SlotRacer<'_>>,
) -> Result<()> {
    let Call { offset, size, expected_left } = call;
    let mut range = kvm_pre_fault_memory { gpa: slot_gpa + offset, size, ..Default::default() };
    let what = format!("KVM_PRE_FAULT_MEMORY([{:#x}, +{size:#x}))", range.gpa);
    let deadline = watchdog::configured_timeout()?.min(PREFAULT_DEADLINE_CAP);
    let mut first_settle = true;
    let outcome = loop {
        let before = range.size;
        let started = Instant::now();
        // A finished racer's worker has exited: only a running one is sampled.
        let threads: Vec<Pid> =
            std::iter::once(gettid()).chain(racer.as_ref().and_then(|r| r.live_worker_tid())).collect();
        // Dropping `returned` wakes the sampler at once when the call ends.
        let (returned, call_ended) = mpsc::channel::<()>();
        let flags = racer.as_ref().map(|r| r.flags());
        let (result, kick, (states, deletion_done)) = std::thread::scope(|s| {
            let threads = &threads;
            let flags = flags.as_deref();
            let sampler = s.spawn(move || kernel_states_while_running(call_ended, threads, flags));
            let (result, kick) = vcpu.pre_fault_memory_with_deadline(&mut range, deadline);
            drop(returned);
            (result, kick, sampler.join().unwrap_or_default())
        });
        if let Some(at_kick) = kick {
            if let Some(racer) = racer.as_mut() {
                racer.finish()?;
            }
            let in_racing_slot = (slot_gpa..slot_gpa + TEST_SIZE).contains(&range.gpa);
            let hang = Hang { waited: started.elapsed(), at_kick, deletion_done, in_racing_slot, states };
            return Err(hang_error(&what, &result, &range, &hang));
        }
        check_progress(&what, &result, &range, before, slot_gpa + offset, size)?;
        if matches!(&result, Err(e) if e.errno() == Some(Errno::EINTR)) {
            continue;
        }
        if first_settle {
            first_settle = false;
            if let Some(racer) = racer.as_mut() {
                // What the race looked like, for the log: proof it was exercised.
                let seen = match &result {
                    Ok(()) => format!("{:#x} bytes left", range.size),
                    Err(e) => format!("{:?} with {:#x} bytes left", e.errno(), range.size),
                };
                let deletion = if racer.deleted() { "done" } else { "pending" };
                println!("pre_fault_memory: {what} against the slot deletion ({deletion}): {seen}");
                racer.finish()?;
            }
            // Retry for a stable answer (the slot is back if the racer deleted
            // it mid-call); a finished range is not retried: size 0 is EINVAL.
            if range.size != 0 {
                continue;
            }
        }
        if range.size == 0 || result.is_err() {
            break result;
        }
    };
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
}

/// `range.size` shrinks exactly when a call succeeds, and `range.gpa`
/// advances by exactly what it consumed.
fn check_progress(
    what: &str,
    result: &Result<()>,
    range: &kvm_pre_fault_memory,
    before: u64,
    start: u64,
    size: u64,
) -> Result<()> {
    let progressed = range.size < before;
    ensure!(
        progressed != result.is_err(),
        "KVM_PRE_FAULT_MEMORY shrinks range.size exactly when it succeeds",
        "{what}: {} with range.size {before:#x} -> {:#x}",
        match result {
            Ok(()) => "success".to_string(),
            Err(e) => format!("failure ({e})"),
        },
        range.size
    );
    ensure!(
        !progressed || range.gpa == start + (size - range.size),
        "KVM_PRE_FAULT_MEMORY advances range.gpa by exactly the bytes it consumed",
        "{what}: gpa {:#x} with {:#x} bytes left",
        range.gpa,
        range.size
    );
    Ok(())
}

/// What `threads` (the prefaulting thread, then the slot worker) were doing
/// in the kernel while the prefault ran: scheduler state, wait channel and
/// kernel CPU time from `/proc` (the lean kernel has no `/proc/PID/stack`),
/// sampled every [`STATE_SAMPLE`] and rendered from the first and the last
/// sample. A retry loop runs (state R, kernel time growing); a stall sleeps
/// (S or D, a wait channel). Empty when the call returned before the first
/// sample. With a racer's `flags`, also whether its deletion had returned
/// at the last sample: read after the kick it would always have, as the
/// kick ends the prefault that a deletion may be waiting for.
fn kernel_states_while_running(
    call_ended: Receiver<()>,
    threads: &[Pid],
    flags: Option<&RaceFlags>,
) -> (String, Option<bool>) {
    let start = Instant::now();
    let sample = || (start.elapsed(), threads.iter().map(|&tid| TaskState::read(tid)).collect::<Vec<_>>());
    let mut first = None;
    let mut last = None;
    let mut deleted = flags.map(|f| f.deleted.load(Ordering::SeqCst));
    while let Err(RecvTimeoutError::Timeout) = call_ended.recv_timeout(STATE_SAMPLE) {
        deleted = flags.map(|f| f.deleted.load(Ordering::SeqCst));
        let now = sample();
        if first.is_none() {
            first = Some(now);
        } else {
            last = Some(now);
        }
    }
    let (Some((t1, first)), Some((t2, last))) = (first, last) else { return (String::new(), deleted) };
    let role = ["prefaulting thread", "slot worker"];
    let states = threads
        .iter()
        .zip(role)
        .zip(first.into_iter().zip(last))
        .map(|((&tid, role), sampled)| match sampled {
            (Ok(a), Ok(b)) => format!(
                "; the {role} (tid {tid}) after {t1:.1?}: state {}, wait channel {}, then after {t2:.1?}: \
                 state {}, wait channel {}, {} ticks of kernel time between",
                a.state,
                a.wchan,
                b.state,
                b.wchan,
                b.kernel_ticks.saturating_sub(a.kernel_ticks)
            ),
            (Err(e), _) | (_, Err(e)) => format!("; the {role} (tid {tid}): {e}"),
        })
        .collect();
    (states, deleted)
}

/// Why a prefault hangs while a default VM's memslot is deleted on a kernel
/// with the fixes of 6.12's livelocks (7.3.4): findings/prefault-obsolete-root.
const OBSOLETE_ROOT: &str = "the deletion's zap of all roots (a default VM's KVM_X86_QUIRK_SLOT_ZAP_ALL) made \
                             the vCPU's root obsolete during the call, and kvm_tdp_page_prefault() retries \
                             RET_PF_RETRY without kvm_mmu_reload() while holding the kvm->srcu read side the \
                             deletion waits for (findings/prefault-obsolete-root)";

/// How a prefault that only the watchdog's kick ended looked.
struct Hang {
    /// Wall time from the call to its end.
    waited: Duration,
    /// The prefaulting thread at the kick, from the watchdog.
    at_kick: String,
    /// `None` without a racer, else whether its deletion had returned
    /// before the kick.
    deletion_done: Option<bool>,
    /// Whether the GPA the call stopped at lies in the slot being deleted.
    in_racing_slot: bool,
    /// Both threads while the call ran ([`kernel_states_while_running`]).
    states: String,
}

/// The failure for a prefault only the watchdog's kick ended.
fn hang_error(what: &str, result: &Result<()>, range: &kvm_pre_fault_memory, hang: &Hang) -> Error {
    let Hang { waited, at_kick, deletion_done, in_racing_slot, states } = hang;
    let rule = if deletion_done.is_some() {
        "KVM_PRE_FAULT_MEMORY never hangs while its memslot is deleted and re-created"
    } else {
        "KVM_PRE_FAULT_MEMORY of a memslot-backed range completes"
    };
    let race_note = match deletion_done {
        None => "",
        Some(true) => {
            "; the worker's slot deletion had completed, so the prefault kept retrying \
             on its own: consistent with a kernel whose kvm_mmu_reload() does not free the roots the \
             deletion made obsolete (upstream 20a6cff3b283, \"KVM: x86/mmu: Check and free obsolete \
             roots in kvm_mmu_reload()\")"
        }
        Some(false) if *in_racing_slot => &format!(
            "; the worker's KVM_SET_USER_MEMORY_REGION2(delete) had not returned either: it waits in \
             synchronize_srcu() for the prefault's kvm->srcu read side while the prefault retries. \
             Upstream fails a prefault on the memslot being deleted with EAGAIN (\"KVM: x86/mmu: \
             Return -EAGAIN if userspace deletes/moves memslot during prefault\"), but not one where \
             {OBSOLETE_ROOT}"
        ),
        Some(false) => &format!(
            "; the worker's KVM_SET_USER_MEMORY_REGION2(delete) had not returned either, and the \
             GPA lies outside the memslot being deleted, so no EAGAIN for that memslot applies: \
             {OBSOLETE_ROOT}"
        ),
    };
    Error::rule(
        rule,
        format!(
            "{what} was still in the kernel after {:.1} s and only the watchdog's signal ended it \
             ({result:?}; gpa {:#x}, {:#x} bytes left; at the kick: {at_kick}){race_note}{states}",
            waited.as_secs_f64(),
            range.gpa,
            range.size
        ),
    )
}

/// The calls of [`prefault_then_guest_reads`]: the slot's first 2 MiB; its
/// last page plus the page past its end; only the page past its end.
const CALLS: [Call; 3] = [
    Call { offset: 0, size: SZ_2M, expected_left: 0 },
    Call { offset: SZ_2M, size: 2 * PAGE, expected_left: PAGE },
    Call { offset: TEST_SIZE, size: PAGE, expected_left: PAGE },
];

/// Rounds of the racing calls: one round loses the race (the deletion ends
/// before the prefault starts, or the prefault before the deletion) in about
/// one run in thirty on a kernel with the livelock, and a lost race checks
/// nothing. Four rounds cost milliseconds on a correct kernel.
const RACE_ROUNDS: usize = 4;

fn prefault_then_guest_reads(kvm: &Arc<Kvm>, combo: Combo, race: bool) -> Result<()> {
    let (vm, mut vcpu, region) = setup(kvm, combo)?;
    for _ in 0..if race { RACE_ROUNDS } else { 1 } {
        for call in CALLS {
            pre_fault(&vm, &mut vcpu, &region, call, race)?;
        }
    }
    // The slot is back; the guest reads every page of it without exiting.
    guest_reads_every_page(vcpu, TEST_GPA, TEST_SIZE, "after prefaulting, the guest reads every page of the slot")
}

/// Upstream's placement: the slot as high as the guest physical address
/// space allows (2 MiB aligned), then the same calls. The guest's page
/// tables do not reach that high, so only the prefault outcomes are checked;
/// they exercise the top of KVM's GFN space (`kvm_mmu_max_gfn()`).
fn prefault_at_top_of_guest_physical_address_space_stops_at_slot_end(kvm: &Arc<Kvm>, combo: Combo) -> Result<()> {
    let bits = kvm.guest_phys_bits()?;
    let max_gfn = (1u64 << bits) / PAGE - 1;
    let gpa = ((max_gfn - TEST_SIZE / PAGE) * PAGE) & !(SZ_2M - 1);
    let (vm, mut vcpu, region) = setup_slot(kvm, combo, TEST_SLOT, gpa, TEST_SIZE)?;
    println!("pre_fault_memory: {bits}-bit guest physical addresses, slot at {gpa:#x}");
    for call in CALLS {
        pre_fault(&vm, &mut vcpu, &region, call, false)?;
    }
    Ok(())
}

/// Runs the agent on `vcpu` to read every page of `[gpa, gpa + size)`;
/// any exit on the way is a violation of `rule`.
fn guest_reads_every_page(vcpu: Vcpu, gpa: u64, size: u64, rule: &str) -> Result<()> {
    let mut guest = Agent::start(vcpu)?;
    let touched = guest.touch(gpa, size, PAGE, false).map_err(|e| Error::rule(rule, e.to_string()))?;
    ensure!(touched == size / PAGE, "the guest's touch loop visits every page", "touched {touched}");
    guest.done().map(drop)
}

/// Deletions of the test memslot the slotless prefaults race: the window
/// (a prefault entering between a deletion's first `synchronize_srcu()`
/// and its zap) was hit after 5 deletions once, and 1,500 calls against a
/// few dozen deletions hit it in 1 run in 20 on 7.3.4.
const SLOTLESS_DELETIONS: u64 = 200;
/// A page no memslot covers: 64 MiB past the test memslot.
const SLOTLESS_GPA: u64 = TEST_GPA + (64 << 20);

/// A prefault of a GPA without a memslot fails with ENOENT at once, also
/// while another memslot is deleted and re-created. On a default VM each
/// deletion zaps all roots (`KVM_X86_QUIRK_SLOT_ZAP_ALL`; a protected VM's
/// zaps just the memslot, which makes its variant a control) between its two
/// `synchronize_srcu()` calls; a prefault that entered before the zap finds
/// its root obsolete on every retry unless the retry loop reloads it, and
/// holds the `kvm->srcu` read side the deletion waits for: both hang
/// (findings/prefault-obsolete-root; 7.3.4). No EAGAIN for an invalid
/// memslot applies, as the GPA is in none.
fn slotless_prefault_fails_with_enoent_while_another_memslot_is_deleted(kvm: &Arc<Kvm>, combo: Combo) -> Result<()> {
    let rule = "KVM_PRE_FAULT_MEMORY of a GPA without a memslot fails with ENOENT, also while another memslot \
                is deleted and re-created";
    let (vm, mut vcpu, region) = setup(kvm, combo)?;
    let deadline = watchdog::configured_timeout()?.min(PREFAULT_DEADLINE_CAP);
    let stop = AtomicBool::new(false);
    let deletions = AtomicU64::new(0);
    std::thread::scope(|s| {
        let worker = s.spawn(|| -> Result<()> {
            while !stop.load(Ordering::SeqCst) {
                vm.set_region(&region.deletion())?;
                deletions.fetch_add(1, Ordering::SeqCst);
                vm.set_region(&region)?;
            }
            Ok(())
        });
        let mut checked = Ok(());
        let mut call = 0u64;
        // A worker that failed (its error is returned below) deletes no more.
        while deletions.load(Ordering::SeqCst) < SLOTLESS_DELETIONS && !worker.is_finished() {
            call += 1;
            // The worker may share this vCPU: without a yield a loop of
            // short calls starves it (3 deletions in 1,500 calls, seen).
            std::thread::yield_now();
            let mut range = kvm_pre_fault_memory { gpa: SLOTLESS_GPA, size: PAGE, ..Default::default() };
            let (result, kick) = vcpu.pre_fault_memory_with_deadline(&mut range, deadline);
            let outcome = match (&result, kick) {
                (_, Some(at_kick)) => Err(format!(
                    "call {call} was still in the kernel after {deadline:?} and only the watchdog's signal \
                     ended it ({result:?}; at the kick: {at_kick}), after {} deletions: {OBSOLETE_ROOT}",
                    deletions.load(Ordering::SeqCst)
                )),
                (Err(e), None) if e.errno() == Some(Errno::ENOENT) && range.size == PAGE => Ok(()),
                (Err(e), None) if e.errno() == Some(Errno::EINTR) => Ok(()),
                (other, None) => Err(format!(
                    "call {call}: expected ENOENT with the page left, got {other:?} with {:#x} bytes left",
                    range.size
                )),
            };
            if let Err(detail) = outcome {
                checked = Err(Error::rule(rule, detail));
                break;
            }
        }
        stop.store(true, Ordering::SeqCst);
        let joined = kvm_harness::threads::join_result(worker, "slot worker");
        println!("pre_fault_memory: {call} slotless prefaults against {} deletions", deletions.load(Ordering::SeqCst));
        checked.and(joined)
    })
}

/// Size of the range prefaulted under a signal storm: large enough that
/// 4 KiB-granular prefaulting (guest_memfd) takes many iterations.
const STORM_SIZE: u64 = 16 << 20;
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
    let storm = SignalStorm::start(Duration::from_micros(200))?;
    while range.size != 0 {
        let (before_gpa, before_size) = (range.gpa, range.size);
        let (result, kick) = vcpu.pre_fault_memory_with_deadline(&mut range, deadline);
        calls += 1;
        ensure!(
            kick.is_none(),
            "KVM_PRE_FAULT_MEMORY under signals returns",
            "call {calls} hung past {deadline:?} (at the kick: {})",
            kick.unwrap_or_default()
        );
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
    let received = storm.received();
    drop(storm);
    println!(
        "pre_fault_memory: {}_{} {STORM_SIZE:#x} bytes in {calls} calls ({eintr} EINTR), {received} signals received",
        combo.vm_type.short(),
        combo.side()
    );
    if combo.private {
        // guest_memfd is prefaulted a 4 KiB page at a time: thousands of
        // iterations, so signals every 200 µs must have cut it short.
        ensure!(
            calls > 1,
            "a signal interrupts a long KVM_PRE_FAULT_MEMORY (it checks signal_pending between pages)",
            "{STORM_SIZE:#x} bytes prefaulted in one call although {received} signals (every 200 µs) reached the thread"
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

fn sw_protected_vm_private_gpa_without_guest_memfd_fails_with_efault(kvm: &Arc<Kvm>) -> Result<()> {
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
}

/// A scenario run once per (VM type, side) combination.
type ComboScenario = fn(&Arc<Kvm>, Combo) -> Result<()>;

fn main() -> ExitCode {
    let mut suite = Suite::new(env!("CARGO_CRATE_NAME"));
    let rules: [(&str, ComboScenario); 5] = [
        ("prefault_stops_at_slot_end_then_guest_reads", |kvm, combo| prefault_then_guest_reads(kvm, combo, false)),
        ("prefault_never_hangs_with_concurrent_slot_delete_recreate", |kvm, combo| {
            with_fix_hints(PREFAULT_VS_MEMSLOT_DELETION, || prefault_then_guest_reads(kvm, combo, true))
        }),
        ("prefault_interrupted_by_signals_resumes_to_completion", prefault_interrupted_by_signals),
        ("invalid_ranges_fail_with_einval", invalid_ranges),
        (
            "prefault_at_top_of_guest_physical_address_space_stops_at_slot_end",
            prefault_at_top_of_guest_physical_address_space_stops_at_slot_end,
        ),
    ];
    // `{type}_vm_{private|shared}_{rule}`: the combinations are not every
    // type with every side, so each is registered for its type.
    for combo in Combo::ALL {
        for (rule, body) in rules {
            let name = format!("{}_{rule}", combo.side());
            suite.for_vm_type(combo.vm_type, &name, combo.needs(), move |kvm, _| body(kvm, combo));
        }
    }

    // Shared sides only: a private prefault of a GPA without a memslot
    // fails with EFAULT before the stale-root check.
    let slotless = Combo::ALL.into_iter().filter(|c| !c.private);
    let hang_prone = Combo::ALL.len() + slotless.clone().count();
    for combo in slotless {
        let rule = "slotless_prefault_fails_with_enoent_while_another_memslot_is_deleted";
        suite.for_vm_type(combo.vm_type, rule, combo.needs(), move |kvm, _| {
            slotless_prefault_fails_with_enoent_while_another_memslot_is_deleted(kvm, combo)
        });
    }
    let needs = vec![Need::Cap(Cap::PreFaultMemory), Need::VmType(VmType::SwProtected)];
    kvm_harness::register!(suite, needs => sw_protected_vm_private_gpa_without_guest_memfd_fails_with_efault);
    // A kernel with the prefault/deletion livelocks (6.12.118) holds each of
    // the three slot delete/re-create tests and the two slotless ones for
    // its whole hang deadline: run at once, they cost one deadline instead
    // of several in a row (10.9 s of the binary's wall time on 6.12.118
    // with two threads and three such tests). A kernel without the bugs
    // finishes them in milliseconds either way.
    suite.test_threads_at_least(hang_prone);
    suite.run()
}
