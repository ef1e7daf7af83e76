//! Model-based, randomized test of the whole private-memory uAPI.
//!
//! Random sequences (30 to 50 steps) of `KVM_CREATE_GUEST_MEMFD`,
//! `KVM_SET_USER_MEMORY_REGION2` (create, move, flags, delete, bindings),
//! `KVM_SET_MEMORY_ATTRIBUTES`, `fallocate`/punch hole, guest reads and
//! writes (the guest agent) and host writes run on a real VM and on
//! [`kvm_model::Model`]. After every step the outcomes must agree: the
//! errno, every field of the exit (`KVM_EXIT_MMIO`, `KVM_EXIT_MEMORY_FAULT`),
//! the value a guest read returns, and every byte of the host memory behind
//! the memslots (anonymous memory and host-mappable guest_memfds).
//!
//! The rules come from the model, selected by the running kernel's version
//! and what the VM reports; the test only drives both sides and compares.
//! A mismatch is shrunk (proptest-state-machine drops and simplifies steps
//! while keeping every step valid) and printed as a ready-to-paste test
//! body in harness terms, with the seed that reproduces it.
//!
//! A third test runs the sequences of protected VMs with a second window
//! ([`Windows::Huge`]): two 2 MiB regions at a 1 GiB-aligned GPA, bound by
//! a guest_memfd memslot whose shared side is a THP-backed anonymous
//! mapping, where attribute changes, punches, pre-faults and accesses
//! start and end at every class of offset inside a region. KVM maps a
//! uniform region with one 2 MiB page there (counted with the VM's
//! `pages_2m` statistic; a whole run must see some), so the guest's reads
//! and writes on both sides check the huge-page rules against the model.
//!
//! Settings: `KVM_SELFTESTS_SEED` (u64, decimal or 0x-hex; the default is
//! fixed, so runs are reproducible), `KVM_SELFTESTS_MODEL_CASES` (sequences
//! per VM type, default 200; 40 in the huge window). Each case's seed is printed on failure: with
//! it as `KVM_SELFTESTS_SEED` and `KVM_SELFTESTS_MODEL_CASES=1` that exact
//! case runs first. Cases, steps and shrink iterations are bounded, every
//! `KVM_RUN` has the harness watchdog, and a time budget stops exploring
//! new cases (never the check of one), `KVM_SELFTESTS_MODEL_BUDGET` seconds
//! (default 120).
//!
//! Soak: `KVM_SELFTESTS_MODEL_SOAK=1` (run with `--test-threads=1`, so no
//! other test shares the process) requires the process's open fds to be the
//! same after the sequences as before them, and prints the RSS before and
//! after; every run prints both.

use std::fmt::{self, Write as _};
use std::os::fd::AsRawFd;
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use guest_payloads::layout::{SYSTEM_SLOT_SIZE, TEST_AREA_GPA};
use guest_payloads::GUEST_AGENT;
use kvm_harness::backing::Backing;
use kvm_harness::bindings::{kvm_memory_attributes, kvm_pre_fault_memory, kvm_regs};
use kvm_harness::stats::Stats;
use kvm_harness::{kernel_rules, watchdog};
use kvm_harness::{
    settings, Access, Agent, Cap, ChildFate, Error, Exit, GmemBinding, GuestCall, GuestMemfd, HostMemory, Kvm, Need,
    Op, Region, Result, Suite, Vm, VmType,
};
use kvm_model::{
    Change, Errno, Fallocate, GmemFd, GuestAccess, HostFault, HostMemory as ModelMemory, MapGpaRange, MemoryRegion,
    Model, PreFault, Profile, Rules, UserMemory, KVM_MEMORY_ATTRIBUTE_PRIVATE, KVM_MEM_GUEST_MEMFD,
    KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY, PAGE_SIZE,
};
use nix::sys::mman::MapFlags;
use proptest::collection::SizeRange;
use proptest::prelude::*;
use proptest::strategy::{SBoxedStrategy, ValueTree};
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
use proptest_state_machine::Sequential;

const P: u64 = PAGE_SIZE;
/// The GPA window the sequences play in: 16 pages at the test area.
const WINDOW: u64 = TEST_AREA_GPA;
const WINDOW_PAGES: u64 = 16;
/// Anonymous host mappings a slot may use, in pages (model ids 1 and 2;
/// id 0 is the system memslot's memory).
const ANON_PAGES: [u64; 2] = [8, 8];
/// The huge window: two 2 MiB regions at a 1 GiB-aligned GPA, far from the
/// small window, where a memslot's shared side can be mapped with huge
/// pages ([`Windows::Huge`]).
const HUGE_WINDOW: u64 = TEST_AREA_GPA + (1 << 30);
/// Pages of one 2 MiB region.
const REGION_PAGES: u64 = 512;
/// Pages of the huge window, and of the THP-backed anonymous mapping
/// (model id 3) a memslot there uses.
const HUGE_PAGES: u64 = 2 * REGION_PAGES;
/// Model id of that mapping.
const HUGE_ANON: usize = ANON_PAGES.len() + 1;
/// Slot id of the huge window's memslot (the small window's are 1..=3).
const HUGE_SLOT: u32 = 4;
/// Slot ids the sequences use (0 is the system memslot).
const SLOT_IDS: std::ops::RangeInclusive<u32> = 1..=3;
/// What an emulated MMIO read returns: "MMIOREAD".
const MMIO_READ_VALUE: u64 = 0x4441_4552_4f49_4d4d;
/// An fd number that is not open (`fget()` fails).
const CLOSED_FD: i32 = i32::MAX;

const SEED_ENV: &str = "KVM_SELFTESTS_SEED";
const CASES_ENV: &str = "KVM_SELFTESTS_MODEL_CASES";
const DEFAULT_SEED: u64 = 0x6b76_6d5f_6d6f_6465;
const DEFAULT_CASES: u32 = 200;
/// Sequences of the huge window's test ([`Windows::Huge`]).
const HUGE_DEFAULT_CASES: u32 = 40;
const STEPS: std::ops::RangeInclusive<usize> = 30..=50;
const MAX_SHRINK_RUNS: u32 = 3000;
const BUDGET_ENV: &str = "KVM_SELFTESTS_MODEL_BUDGET";
const SOAK_ENV: &str = "KVM_SELFTESTS_MODEL_SOAK";
const DEFAULT_BUDGET_SECS: u64 = 120;
const SHRINK_BUDGET: Duration = Duration::from_secs(180);

/// One operation of a sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Step {
    /// `KVM_CREATE_GUEST_MEMFD(size, flags)`.
    CreateGmem { size: u64, flags: u64 },
    /// `KVM_SET_USER_MEMORY_REGION2`.
    SetRegion(MemoryRegion),
    /// `KVM_SET_MEMORY_ATTRIBUTES`.
    SetAttributes { address: u64, size: u64, attributes: u64, flags: u64 },
    /// The host closes guest_memfd `gmem`'s fd and unmaps its mapping.
    CloseGmem { gmem: usize },
    /// `fallocate()` on guest_memfd `gmem`.
    Fallocate { gmem: usize, mode: Fallocate, offset: u64, len: u64 },
    /// The guest reads the u64 at `gpa`.
    GuestRead { gpa: u64 },
    /// The guest writes `value` at `gpa`.
    GuestWrite { gpa: u64, value: u64 },
    /// The guest calls the code at `gpa` (an instruction fetch).
    GuestExec { gpa: u64 },
    /// The host reads the u64 at `offset` of guest_memfd `gmem`'s mapping.
    HostRead { gmem: usize, offset: u64 },
    /// `KVM_PRE_FAULT_MEMORY` on the agent's vCPU.
    PreFault { gpa: u64, size: u64, flags: u64 },
    /// `KVM_ENABLE_CAP(KVM_CAP_EXIT_HYPERCALL, [mask])`.
    HypercallExits { mask: u64 },
    /// The guest's `KVM_HC_MAP_GPA_RANGE`; the VMM answers an exit by
    /// applying the attributes ([`vmm_attributes`]).
    MapGpaRange { gpa: u64, npages: u64, attrs: u64 },
    /// The host writes `value` at `offset` of a mapping.
    HostWrite { mem: ModelMemory, offset: u64, value: u64 },
    /// The host closes the VM fd; the agent's vCPU and the guest_memfds
    /// still hold the VM (kvm_vm_release() only drops a reference), so
    /// nothing the guest or a guest_memfd sees may change.
    CloseVm,
}

impl Step {
    /// The variant's name, for the tally.
    fn kind(&self) -> &'static str {
        match self {
            Step::CreateGmem { .. } => "CreateGmem",
            Step::SetRegion(_) => "SetRegion",
            Step::SetAttributes { .. } => "SetAttributes",
            Step::Fallocate { .. } => "Fallocate",
            Step::CloseGmem { .. } => "CloseGmem",
            Step::GuestRead { .. } => "GuestRead",
            Step::GuestWrite { .. } => "GuestWrite",
            Step::GuestExec { .. } => "GuestExec",
            Step::PreFault { .. } => "PreFault",
            Step::HypercallExits { .. } => "HypercallExits",
            Step::MapGpaRange { .. } => "MapGpaRange",
            Step::HostWrite { .. } => "HostWrite",
            Step::HostRead { .. } => "HostRead",
            Step::CloseVm => "CloseVm",
        }
    }
}

/// What a sequence may contain beyond the rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GmemOnlyAccess {
    /// Guest accesses to slots bound to a mmap-able guest_memfd are never
    /// generated (kvm_pvm's known bug: it reaches guest memory through the
    /// host mapping, not the guest_memfd).
    Excluded,
    /// Generated like every other access.
    Included,
    /// Every sequence binds such a slot early and the guest reads it.
    Focused,
}

/// Where a sequence's memslots live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Windows {
    /// The 16-page window alone: memslots of 1 to 4 pages, 4 KiB mappings.
    Small,
    /// Also the huge window: every sequence binds a guest_memfd memslot of
    /// both 2 MiB regions there early, its shared side a THP-backed
    /// anonymous mapping, and converts, accesses, punches and pre-faults
    /// ranges that start and end at every class of offset inside the
    /// regions (aligned, first page, mid, last page, a region's end,
    /// spanning both), so KVM's huge mappings meet mixed attributes.
    Huge,
}

/// The generator's state: the model plus what the run excludes.
#[derive(Debug, Clone)]
struct RefState {
    model: Model,
    gmem_only: GmemOnlyAccess,
    windows: Windows,
    /// Guest hypercalls are generated: not on kvm_pvm, where the vCPU
    /// never leaves KVM_RUN on the agent's hypercall (a kvm_pvm limit; the
    /// protected-VM kernels run them).
    hypercalls: bool,
    /// The strategies that depend on the profile only, built once per
    /// sequence instead of once per step.
    fixed: Arc<Fixed>,
    /// A `CloseVm` step ran: only vCPU and guest_memfd steps remain.
    vm_closed: bool,
}

#[derive(Debug)]
struct Fixed {
    create_gmem: SBoxedStrategy<Step>,
    set_attributes: SBoxedStrategy<Step>,
    value: SBoxedStrategy<u64>,
    pre_fault: SBoxedStrategy<Step>,
    hypercall_exits: SBoxedStrategy<Step>,
    map_gpa_range: SBoxedStrategy<Step>,
    huge: HugeFixed,
}

/// [`Fixed`] of the huge window's steps.
#[derive(Debug)]
struct HugeFixed {
    huge_word: SBoxedStrategy<u64>,
    huge_attributes: SBoxedStrategy<Step>,
    huge_map_gpa_range: SBoxedStrategy<Step>,
    huge_fallocate: SBoxedStrategy<((u64, u64), Fallocate)>,
    huge_pre_fault: SBoxedStrategy<Step>,
}

fn gpa_in_window() -> impl Strategy<Value = u64> {
    (0..WINDOW_PAGES, prop_oneof![Just(0u64), Just(8), Just(0x7f8), Just(0xff8), (0..512u64).prop_map(|w| w * 8)])
        .prop_map(|(page, offset)| WINDOW + page * P + offset)
}

/// The GPAs of a memslot's pages worth offering a step: every page of a
/// small window's memslot; of the huge window's, each region's first and
/// last two pages (its own focus picks the rest, from the attributes),
/// which keeps per-step generation from listing a thousand pages.
fn slot_pages(slot: &kvm_model::Slot) -> Vec<u64> {
    let pages: Vec<u64> = if slot.npages <= WINDOW_PAGES {
        (0..slot.npages).collect()
    } else {
        (0..slot.npages)
            .step_by(REGION_PAGES as usize)
            .flat_map(|r| [r, r + 1, r + REGION_PAGES - 2, r + REGION_PAGES - 1])
            .filter(|&p| p < slot.npages)
            .collect()
    };
    pages.into_iter().map(|i| (slot.base_gfn + i) * P).collect()
}

/// A GPA for a guest access: mostly inside a memslot of the window (most
/// of the window has none), sometimes anywhere in it.
fn guest_gpa(state: &RefState) -> BoxedStrategy<u64> {
    let pages: Vec<u64> =
        state.model.slots().values().filter(|s| s.as_id == 0 && s.id != 0).flat_map(slot_pages).collect();
    if pages.is_empty() {
        return gpa_in_window().boxed();
    }
    lazy(move || {
        let in_slot = (
            proptest::sample::select(pages.clone()),
            prop_oneof![Just(0u64), Just(0xff8), (0..512u64).prop_map(|w| w * 8)],
        )
            .prop_map(|(page, offset)| page + offset);
        prop_oneof![3 => in_slot, 1 => gpa_in_window()].boxed()
    })
}

/// A guest read or write (half each) at a [`guest_gpa`].
fn guest_access(gpa: &BoxedStrategy<u64>, state: &RefState) -> BoxedStrategy<Step> {
    let (gpa, value) = (gpa.clone(), state.fixed.value.clone());
    lazy(move || {
        (gpa.clone(), any::<bool>(), value.clone())
            .prop_map(
                |(gpa, write, value)| if write { Step::GuestWrite { gpa, value } } else { Step::GuestRead { gpa } },
            )
            .boxed()
    })
}

fn value() -> impl Strategy<Value = u64> {
    // Some values are code a guest fetch can run (kvm_model::ret_stub).
    prop_oneof![any::<u64>(), (1..0x1_0000u64).prop_map(|v| v * 0x1_0001), any::<u32>().prop_map(kvm_model::ret_stub)]
}

fn create_gmem(profile: &Profile) -> SBoxedStrategy<Step> {
    let supported = profile.guest_memfd_flags;
    let flags = prop_oneof![
        4 => Just(0u64),
        3 => Just(supported),
        2 => (0..4u64).prop_map(move |f| f & supported),
        1 => (0..64u32).prop_map(|bit| 1u64 << bit),
    ];
    let size = prop_oneof![
        9 => (1..=8u64).prop_map(|pages| pages * P),
        1 => prop_oneof![Just(0u64), Just(P / 2), Just(P + 8), Just(1u64 << 63)],
    ];
    (size, flags).prop_map(|(size, flags)| Step::CreateGmem { size, flags }).sboxed()
}

/// The mmap-able guest_memfds a slot's userspace_addr may point into: (id, pages).
fn mappable_gmems(state: &RefState) -> Vec<(usize, u64)> {
    state.model.gmems().iter().enumerate().filter(|(_, g)| g.mmap()).map(|(i, g)| (i, g.size / P)).collect()
}

/// The userspace memory of an `npages` slot, chosen by the random `r`
/// (derived from a number rather than a dependent strategy: a
/// `prop_flat_map` per step reseeds an RNG, a large part of generation).
fn user_memory(mappable: &[(usize, u64)], npages: u64, r: u64) -> UserMemory {
    // (what, pages it has); anonymous mappings weigh double, as before.
    let mut choices: Vec<(Option<UserMemory>, u64)> = vec![(None, 0)];
    for (i, pages) in ANON_PAGES.iter().enumerate() {
        let anon = UserMemory::Anon { anon: i + 1, page: 0 };
        choices.extend([(Some(anon), *pages), (Some(anon), *pages)]);
    }
    choices.extend(mappable.iter().map(|&(gmem, pages)| (Some(UserMemory::GmemMap { gmem, page: 0 }), pages)));
    choices.retain(|(what, pages)| what.is_none() || npages <= *pages);
    let (what, pages) = choices[(r % choices.len() as u64) as usize];
    let page = (r / choices.len() as u64) % (pages.saturating_sub(npages) + 1);
    match what {
        None => UserMemory::Null,
        Some(UserMemory::Anon { anon, .. }) => UserMemory::Anon { anon, page },
        Some(UserMemory::GmemMap { gmem, .. }) => UserMemory::GmemMap { gmem, page },
        Some(UserMemory::Null) => unreachable!("Null is None"),
    }
}

fn new_region(state: &RefState) -> BoxedStrategy<Step> {
    let ngmem = state.model.gmems().len();
    // Offsets at and past 2^63, where offset + size crosses the signed file
    // offset range: only where the kernel is known to compare them unsigned
    // (GMEM_BINDING_OFFSETS_UNSIGNED: eba85fee7fc6, or its backport); 6.18
    // compared them signed and accepted such bindings (private_memslots'
    // `binding_rejects_offset_*2_63*` tests hold that rule on every kernel).
    let huge_offsets = state.model.profile().rules.gmem_binding_offsets_unsigned.is(true);
    // Only what the strategy needs: cloning the model per step would copy
    // every page it holds.
    let mappable = mappable_gmems(state);
    lazy(move || new_region_from(ngmem, huge_offsets, mappable.clone()))
}

fn new_region_from(ngmem: usize, huge_offsets: bool, mappable: Vec<(usize, u64)>) -> BoxedStrategy<Step> {
    let flags = prop_oneof![
        5 => Just(0u32),
        5 => Just(KVM_MEM_GUEST_MEMFD),
        1 => Just(KVM_MEM_LOG_DIRTY_PAGES),
        1 => Just(KVM_MEM_READONLY),
        1 => Just(KVM_MEM_GUEST_MEMFD | KVM_MEM_READONLY),
        1 => (3..32u32).prop_map(|bit| 1u32 << bit),
    ];
    let as_id = prop_oneof![9 => Just(0u32), 1 => Just(1u32)];
    let fd = if ngmem == 0 {
        prop_oneof![Just(GmemFd::Closed), Just(GmemFd::NotGuestMemfd)].boxed()
    } else {
        prop_oneof![
            8 => (0..ngmem).prop_map(GmemFd::File),
            1 => Just(GmemFd::Closed),
            1 => Just(GmemFd::NotGuestMemfd),
        ]
        .boxed()
    };
    let offset = prop_oneof![9 => (0..8u64).prop_map(|p| p * P), 1 => Just(8u64), huge_offsets as u32 => prop_oneof![
        Just((i64::MAX as u64) & !(P - 1)),
        Just((1u64 << 63) - P),
        Just(1u64 << 63),
        Just(!(P - 1)),
    ]];
    let binding = prop_oneof![9 => (fd, offset).prop_map(Some), 1 => Just(None)];
    ((SLOT_IDS, as_id, flags, 1..=4u64), 0..WINDOW_PAGES, any::<u64>(), binding)
        .prop_map(move |((id, as_id, flags, npages), page, r, guest_memfd)| {
            let guest_memfd =
                if flags & KVM_MEM_GUEST_MEMFD != 0 { guest_memfd.or(Some((GmemFd::Closed, 0))) } else { guest_memfd };
            Step::SetRegion(MemoryRegion {
                slot: as_id << 16 | id,
                flags,
                gpa: WINDOW + page.min(WINDOW_PAGES - npages) * P,
                size: npages * P,
                user: user_memory(&mappable, npages, r),
                guest_memfd,
            })
        })
        .boxed()
}

/// A new guest_memfd memslot at a free GPA binding file pages another
/// memslot binds (the whole range, its first or last page, or one page
/// past either end): the binding-overlap rule, which random offsets
/// rarely reach.
fn rebinding_focus(state: &RefState) -> Option<BoxedStrategy<Step>> {
    let model = &state.model;
    let bound: Vec<(usize, u64, u64)> = model
        .slots()
        .values()
        .filter_map(|s| s.gmem.filter(|&(g, _)| !model.gmems()[g].released).map(|(g, start)| (g, start, s.npages)))
        .collect();
    if bound.is_empty() || !model.profile().guest_memfd_slots {
        return None;
    }
    let used: Vec<u32> = model.slots().values().filter(|s| s.as_id == 0).map(|s| s.id).collect();
    let free: Vec<u32> = SLOT_IDS.filter(|id| !used.contains(id)).collect();
    // Window pages no memslot of address space 0 covers: the new slot goes
    // there, so the GPA overlap check (EEXIST before any binding check)
    // does not decide the outcome instead.
    let gaps: Vec<u64> = (0..WINDOW_PAGES)
        .filter(|p| {
            let gfn = (WINDOW >> 12) + p;
            !model.slots().values().any(|s| s.as_id == 0 && s.base_gfn <= gfn && gfn < s.base_gfn + s.npages)
        })
        .collect();
    if free.is_empty() || gaps.is_empty() {
        return None;
    }
    let mappable = mappable_gmems(state);
    Some(lazy(move || {
        let mappable = mappable.clone();
        let picks = (
            proptest::sample::select(bound.clone()),
            proptest::sample::select(free.clone()),
            0..4u32,
            proptest::sample::select(gaps.clone()),
        );
        (picks, any::<u64>())
            .prop_map(move |(((g, start, npages), slot, shape, page), r)| {
                let first = match shape {
                    0 => start,
                    1 => (start + npages).saturating_sub(1),
                    2 => start.saturating_sub(1),
                    _ => start + npages,
                };
                Step::SetRegion(MemoryRegion {
                    slot,
                    flags: KVM_MEM_GUEST_MEMFD,
                    gpa: WINDOW + page * P,
                    size: P,
                    user: user_memory(&mappable, 1, r),
                    guest_memfd: Some((GmemFd::File(g), first * P)),
                })
            })
            .boxed()
    }))
}

/// Moves, flag changes, deletions and identical re-sends of existing slots.
fn change_region(state: &RefState) -> Option<BoxedStrategy<Step>> {
    let slots: Vec<_> = state.model.slots().values().filter(|s| s.id != 0).cloned().collect();
    if slots.is_empty() {
        return None;
    }
    Some(lazy(move || change_region_of(slots.clone())))
}

fn change_region_of(slots: Vec<kvm_model::Slot>) -> BoxedStrategy<Step> {
    let strategy = (proptest::sample::select(slots), 0..4u32, 0..WINDOW_PAGES).prop_map(|(slot, kind, page)| {
        let same = MemoryRegion {
            slot: slot.as_id << 16 | slot.id,
            flags: slot.flags,
            gpa: slot.base_gfn * P,
            size: slot.npages * P,
            user: slot.user,
            guest_memfd: slot.gmem.map(|(g, pgoff)| (GmemFd::File(g), pgoff * P)),
        };
        // The huge window's memslot is larger than the small window: it
        // moves to the small window's start (and is refused).
        let page = page.min(WINDOW_PAGES.saturating_sub(slot.npages));
        Step::SetRegion(match kind {
            0 => MemoryRegion { size: 0, ..same },
            1 => MemoryRegion { gpa: WINDOW + page * P, flags: same.flags & !KVM_MEM_GUEST_MEMFD, ..same },
            2 => MemoryRegion { flags: same.flags ^ KVM_MEM_LOG_DIRTY_PAGES, ..same },
            _ => same,
        })
    });
    strategy.boxed()
}

fn set_attributes(profile: &Profile) -> SBoxedStrategy<Step> {
    let supported = profile.supported_attributes;
    let range = (0..WINDOW_PAGES, 1..=4u64).prop_map(|(page, n)| (WINDOW + page * P, n.min(WINDOW_PAGES - page) * P));
    let valid = (range.clone(), prop_oneof![Just(KVM_MEMORY_ATTRIBUTE_PRIVATE), Just(0u64)])
        .prop_map(|((address, size), attributes)| Step::SetAttributes { address, size, attributes, flags: 0 });
    // One input rule broken at a time; the attribute is one the VM
    // supports, so only that rule can reject the call.
    let attributes = supported & KVM_MEMORY_ATTRIBUTE_PRIVATE;
    let invalid = (range, 0..6u32, 0..64u32).prop_map(move |((address, size), kind, bit)| {
        let wrong = 8 * u64::from(bit % 4 + 1);
        let (address, size, attributes, flags) = match kind {
            0 => (address, size, attributes, 1u64 << bit),
            1 => (address, size, 1u64 << bit, 0),
            2 => (address, 0, attributes, 0),
            3 => (u64::MAX - P + 1, size + P, attributes, 0),
            4 => (address + wrong, size, attributes, 0),
            _ => (address, size - wrong, attributes, 0),
        };
        Step::SetAttributes { address, size, attributes, flags }
    });
    prop_oneof![6 => valid, 1 => invalid].sboxed()
}

/// A guest's `KVM_HC_MAP_GPA_RANGE` over up to 4 pages of the window, to
/// private or shared, or with one input rule broken (unaligned, no pages,
/// a GFN range that wraps).
fn map_gpa_range() -> SBoxedStrategy<Step> {
    let attrs = prop_oneof![
        2 => Just(kvm_model::KVM_MAP_GPA_RANGE_ENCRYPTED),
        2 => Just(0u64),
        1 => any::<u64>(),
    ];
    let valid = (0..WINDOW_PAGES, 1..=4u64, attrs).prop_map(|(page, n, attrs)| Step::MapGpaRange {
        gpa: WINDOW + page * P,
        npages: n.min(WINDOW_PAGES - page),
        attrs,
    });
    let invalid = (0..WINDOW_PAGES, 0..3u32).prop_map(|(page, kind)| {
        let (gpa, npages) = match kind {
            0 => (WINDOW + page * P + 8, 1),
            1 => (WINDOW + page * P, 0),
            _ => (WINDOW + page * P, u64::MAX),
        };
        Step::MapGpaRange { gpa, npages, attrs: kvm_model::KVM_MAP_GPA_RANGE_ENCRYPTED }
    });
    prop_oneof![5 => valid, 1 => invalid].sboxed()
}

/// How this test's VMM answers a `KVM_HC_MAP_GPA_RANGE` exit: the
/// `KVM_SET_MEMORY_ATTRIBUTES` request it makes (PRIVATE for
/// `KVM_MAP_GPA_RANGE_ENCRYPTED`, else shared), or `None` when the range's
/// size does not fit a u64 (answered -EINVAL without a call).
fn vmm_attributes(gpa: u64, npages: u64, attrs: u64) -> Option<(u64, u64, u64)> {
    let private = attrs & kvm_model::KVM_MAP_GPA_RANGE_ENCRYPTED != 0;
    Some((gpa, npages.checked_mul(P)?, if private { KVM_MEMORY_ATTRIBUTE_PRIVATE } else { 0 }))
}

/// The guest's rax for an errno (the hypercall ABI: `-errno`).
fn hypercall_ret(result: Result<(), Errno>) -> u64 {
    result.map_or_else(|e| (-i64::from(e.raw())) as u64, |()| 0)
}

/// `KVM_PRE_FAULT_MEMORY` over up to 8 pages of the window, or with one
/// input rule broken (flags, alignment, size 0, a range that wraps).
fn pre_fault() -> SBoxedStrategy<Step> {
    let valid = (0..WINDOW_PAGES, 1..=8u64).prop_map(|(page, n)| Step::PreFault {
        gpa: WINDOW + page * P,
        size: n * P,
        flags: 0,
    });
    let invalid = (0..WINDOW_PAGES, 0..4u32, 0..64u32).prop_map(|(page, kind, bit)| {
        let gpa = WINDOW + page * P;
        let (gpa, size, flags) = match kind {
            0 => (gpa, P, 1u64 << bit),
            1 => (gpa + 8 * u64::from(bit % 8 + 1), P, 0),
            2 => (gpa, 0, 0),
            _ => (u64::MAX - P + 1, 2 * P, 0),
        };
        Step::PreFault { gpa, size, flags }
    });
    prop_oneof![4 => valid, 1 => invalid].sboxed()
}

fn fallocate(state: &RefState) -> Option<BoxedStrategy<Step>> {
    let ngmem = state.model.gmems().len();
    if ngmem == 0 {
        return None;
    }
    Some(lazy(move || {
        let mode = prop_oneof![Just(Fallocate::Allocate), Just(Fallocate::PunchHole)];
        let span = prop_oneof![
            9 => (0..8u64, 1..=4u64).prop_map(|(page, n)| (page * P, n * P)),
            1 => prop_oneof![Just((0u64, 0u64)), Just((8, P)), Just((0, P + 8)), Just((0, u64::MAX))],
        ];
        (0..ngmem, mode, span)
            .prop_map(|(gmem, mode, (offset, len))| Step::Fallocate { gmem, mode, offset, len })
            .boxed()
    }))
}

/// `fallocate()` (allocate or punch) at every position relative to a range
/// a memslot binds: ending where it starts, starting where it ends, from
/// its start or to its end from inside, across its start, across its end,
/// across the whole of it, exactly it, strictly inside it, and one page
/// clear of either end. Random offsets reach most of these only by chance.
fn bound_fallocate_focus(state: &RefState) -> Option<BoxedStrategy<Step>> {
    let model = &state.model;
    // Ranges of three pages or more count thrice: across either end and
    // strictly inside need the room, and most bindings are a page or two.
    let bound: Vec<(usize, u64, u64)> = model
        .slots()
        .values()
        .filter_map(|s| s.gmem.filter(|&(g, _)| !model.gmems()[g].closed).map(|(g, start)| (g, start, s.npages)))
        .flat_map(|b| std::iter::repeat_n(b, if b.2 >= 3 { 3 } else { 1 }))
        .collect();
    if bound.is_empty() {
        return None;
    }
    Some(lazy(move || {
        let mode = prop_oneof![Just(Fallocate::Allocate), Just(Fallocate::PunchHole)];
        (proptest::sample::select(bound.clone()), 0..BOUND_POSITIONS, 1..=2u64, mode)
            .prop_map(|((gmem, start, npages), position, n, mode)| {
                let (first, end) = bound_position(start, start + npages, position, n);
                Step::Fallocate { gmem, mode, offset: first * P, len: (end - first) * P }
            })
            .boxed()
    }))
}

/// How many positions [`bound_position`] knows.
const BOUND_POSITIONS: u32 = 11;

/// The page range `[first, end)` at `position` relative to the bound page
/// range `[start, stop)`, `n` pages wide where the position leaves the
/// width free. Ranges are clamped at page 0, so near it some collapse into
/// their neighbours (or become empty, which the kernel must refuse).
fn bound_position(start: u64, stop: u64, position: u32, n: u64) -> (u64, u64) {
    let inner = n.min(stop - start);
    match position {
        0 => (start.saturating_sub(n), start),
        1 => (stop, stop + n),
        2 => (start, start + inner),
        3 => (stop - inner, stop),
        4 => (start.saturating_sub(n), start + inner),
        5 => (stop - inner, stop + n),
        6 => (start.saturating_sub(n), stop + n),
        7 => (start, stop),
        8 => (start + 1, (start + 1).max(stop - 1)),
        9 => (start.saturating_sub(n + 1), start.saturating_sub(1)),
        _ => (stop + 1, stop + 1 + n),
    }
}

/// Where the page range of a fallocate of `gmem` lies relative to each
/// range a memslot binds of it (in the words of [`bound_position`]), for
/// the run's tally; nothing for a range that is empty, unaligned or clear
/// of every binding by more than a page.
fn bound_positions_of(model: &Model, gmem: usize, offset: u64, len: u64) -> Vec<&'static str> {
    let Some(end) = offset.checked_add(len).filter(|_| len > 0 && offset % P == 0 && len % P == 0) else {
        return Vec::new();
    };
    let (first, end) = (offset / P, end / P);
    model
        .slots()
        .values()
        .filter_map(|s| s.gmem.filter(|&(g, _)| g == gmem).map(|(_, start)| (start, start + s.npages)))
        .filter_map(|(start, stop)| {
            Some(match (first.cmp(&start), end.cmp(&stop)) {
                _ if end == start => "ending where it starts",
                _ if first == stop => "starting where it ends",
                _ if end + 1 == start => "ending a page before",
                _ if first == stop + 1 => "starting a page after",
                _ if end < start || first > stop => return None,
                (std::cmp::Ordering::Equal, std::cmp::Ordering::Equal) => "exactly over",
                (std::cmp::Ordering::Equal, std::cmp::Ordering::Less) => "inside from the start of",
                (std::cmp::Ordering::Greater, std::cmp::Ordering::Equal) => "inside to the end of",
                (std::cmp::Ordering::Greater, std::cmp::Ordering::Less) => "strictly inside",
                (std::cmp::Ordering::Less, std::cmp::Ordering::Less) => "across the start of",
                (std::cmp::Ordering::Greater, std::cmp::Ordering::Greater) => "across the end of",
                (std::cmp::Ordering::Equal, std::cmp::Ordering::Greater) => "from the start past the end of",
                (std::cmp::Ordering::Less, std::cmp::Ordering::Equal) => "from before to the end of",
                (std::cmp::Ordering::Less, std::cmp::Ordering::Greater) => "across the whole of",
            })
        })
        .collect()
}

/// A host write to an anonymous mapping or to a guest_memfd's mapping
/// (SIGBUS where its memory is not shared).
fn host_write(state: &RefState) -> BoxedStrategy<Step> {
    let mut targets = vec![(ModelMemory::Anon(1), ANON_PAGES[0] * P), (ModelMemory::Anon(2), ANON_PAGES[1] * P)];
    targets.extend(mappable_gmems(state).into_iter().map(|(g, pages)| (ModelMemory::GmemMap(g), pages * P)));
    lazy(move || {
        (proptest::sample::select(targets.clone()), any::<u64>(), value())
            .prop_map(|((mem, len), at, value)| Step::HostWrite { mem, offset: (at % len) & !7, value })
            .boxed()
    })
}

/// Private accesses to memslots whose guest_memfd was released: make a
/// page private or touch it (random steps alone rarely line the three up).
fn released_focus(state: &RefState) -> Option<BoxedStrategy<Step>> {
    let model = &state.model;
    let pages: Vec<u64> = model
        .slots()
        .values()
        .filter(|s| s.as_id == 0 && s.gmem.is_some_and(|(g, _)| model.gmems()[g].released))
        .flat_map(slot_pages)
        .collect();
    if pages.is_empty() {
        return None;
    }
    let attributes = model.profile().supported_attributes & KVM_MEMORY_ATTRIBUTE_PRIVATE;
    Some(lazy(move || {
        (proptest::sample::select(pages.clone()), 0..3u32, 0..512u64)
            .prop_map(move |(page, kind, word)| match kind {
                0 => Step::SetAttributes { address: page, size: P, attributes, flags: 0 },
                1 => Step::GuestRead { gpa: page + word * 8 },
                _ => Step::GuestWrite { gpa: page + word * 8, value: word },
            })
            .boxed()
    }))
}

/// Around closing the VM fd, on the pages of guest_memfd memslots: before
/// it, making such pages private (where a wrongly released VM would show)
/// or closing; after it, guest accesses to them, which must still be served
/// exactly as before.
fn vm_close_focus(state: &RefState) -> Option<BoxedStrategy<Step>> {
    let model = &state.model;
    let pages: Vec<u64> = model
        .slots()
        .values()
        .filter(|s| s.as_id == 0 && s.gmem.is_some_and(|(g, _)| !model.gmems()[g].released))
        .flat_map(slot_pages)
        .collect();
    if pages.is_empty() {
        return None;
    }
    let private = model.profile().supported_attributes & KVM_MEMORY_ATTRIBUTE_PRIVATE;
    let closed = state.vm_closed;
    Some(lazy(move || {
        (proptest::sample::select(pages.clone()), 0..4u32, 0..512u64)
            .prop_map(move |(page, kind, word)| match (closed, kind) {
                (false, 0 | 1) => Step::SetAttributes { address: page, size: P, attributes: private, flags: 0 },
                (false, _) => Step::CloseVm,
                (true, 0 | 1) => Step::GuestRead { gpa: page + word * 8 },
                (true, _) => Step::GuestWrite { gpa: page + word * 8, value: word },
            })
            .boxed()
    }))
}

/// A host read through a guest_memfd's mapping, if one is mapped.
fn host_read(state: &RefState) -> Option<BoxedStrategy<Step>> {
    let mappable = mappable_gmems(state);
    if mappable.is_empty() {
        return None;
    }
    Some(lazy(move || {
        (proptest::sample::select(mappable.clone()), any::<u64>())
            .prop_map(|((gmem, pages), at)| Step::HostRead { gmem, offset: (at % (pages * P)) & !7 })
            .boxed()
    }))
}

/// A step that binds a mmap-able guest_memfd and reads it from the guest.
fn gmem_only_focus(state: &RefState) -> Option<BoxedStrategy<Step>> {
    let profile = state.model.profile();
    let mmap = kvm_model::GUEST_MEMFD_FLAG_MMAP;
    if profile.guest_memfd_flags & mmap == 0 || !profile.guest_memfd_slots {
        return None;
    }
    let gmem = state.model.gmems().iter().position(|g| g.mmap());
    let bound = state.model.slots().values().any(|s| s.gmem_only);
    Some(match (gmem, bound) {
        (None, _) => Just(Step::CreateGmem { size: 4 * P, flags: profile.guest_memfd_flags }).boxed(),
        (Some(g), false) => (SLOT_IDS, 0..WINDOW_PAGES - 4)
            .prop_map(move |(id, page)| {
                Step::SetRegion(MemoryRegion {
                    slot: id,
                    flags: KVM_MEM_GUEST_MEMFD,
                    gpa: WINDOW + page * P,
                    size: 4 * P,
                    user: UserMemory::Null,
                    guest_memfd: Some((GmemFd::File(g), 0)),
                })
            })
            .boxed(),
        (Some(_), true) => {
            let gpas: Vec<u64> = state.model.slots().values().filter(|s| s.gmem_only).flat_map(slot_pages).collect();
            (proptest::sample::select(gpas), 0..512u64)
                .prop_map(|(page, w)| Step::GuestRead { gpa: page + w * 8 })
                .boxed()
        }
    })
}

/// A range of the huge window, in pages: starts and ends at every class of
/// offset inside a 2 MiB region (aligned, first page, mid, last page, the
/// region's end) and spans both regions.
fn huge_range() -> impl Strategy<Value = (u64, u64)> {
    let offset = prop_oneof![Just(0u64), Just(1), 2..REGION_PAGES - 2, Just(REGION_PAGES - 2), Just(REGION_PAGES - 1)];
    (0..7u32, 0..2u64, offset.clone(), offset).prop_map(|(kind, region, a, b)| {
        let base = region * REGION_PAGES;
        let (lo, hi) = (a.min(b), a.max(b));
        match kind {
            // Inside one region, from an offset to a later one.
            0 => (base + lo, base + hi.max(lo + 1)),
            // From an offset to the region's end.
            1 => (base + a, base + REGION_PAGES),
            // From the region's start to an offset.
            2 => (base, base + a.max(1)),
            // The region's last page, or its first.
            3 => (base + REGION_PAGES - 1, base + REGION_PAGES),
            4 => (base, base + 1),
            // From an offset of the first region into the second, or to its end.
            5 => (a, REGION_PAGES + b.max(1)),
            _ => (a, HUGE_PAGES),
        }
    })
}

/// The huge window's pages worth touching: each region's first and last
/// two, and both sides of every attribute change.
fn huge_boundaries(model: &Model) -> Vec<u64> {
    let base = HUGE_WINDOW >> 12;
    let mut pages = vec![0, 1, REGION_PAGES - 2, REGION_PAGES - 1, REGION_PAGES, REGION_PAGES + 1, HUGE_PAGES - 2];
    pages.push(HUGE_PAGES - 1);
    // Both sides of each run of pages with the same non-zero attributes.
    let mut run: Option<(u64, u64, u64)> = None;
    for (gfn, attributes) in model.attributes_in(base..base + HUGE_PAGES) {
        let page = gfn - base;
        match run {
            Some((_, end, a)) if end == page && a == attributes => run = run.map(|(s, _, a)| (s, page + 1, a)),
            _ => {
                if let Some((start, end, _)) = run {
                    pages.extend([start.saturating_sub(1), start, end - 1, end]);
                }
                run = Some((page, page + 1, attributes));
            }
        }
    }
    if let Some((start, end, _)) = run {
        pages.extend([start.saturating_sub(1), start, end - 1, end]);
    }
    pages.retain(|&p| p < HUGE_PAGES);
    pages.sort_unstable();
    pages.dedup();
    pages
}

/// The huge window's steps ([`Windows::Huge`]): a guest_memfd of both
/// regions and the memslot binding it first, then conversions (host and
/// guest) of [`huge_range`]s, guest and host accesses at
/// [`huge_boundaries`], punches and allocations, pre-faults.
fn huge_focus(state: &RefState) -> Option<BoxedStrategy<Step>> {
    let model = &state.model;
    let profile = model.profile();
    if state.windows != Windows::Huge || !profile.guest_memfd_slots {
        return None;
    }
    let slot = model.slots().contains_key(&(0, HUGE_SLOT));
    // The huge window's guest_memfd: its own size, open, and bound by no
    // memslot but the huge window's (a deleted one is bound anew, but the
    // rebinding focus may have bound some of its pages to small slots).
    let bound_elsewhere =
        |g: usize| model.slots().values().any(|s| s.id != HUGE_SLOT && s.gmem.is_some_and(|(b, _)| b == g));
    let gmem = model
        .gmems()
        .iter()
        .enumerate()
        .rposition(|(g, m)| !m.closed && m.flags == 0 && m.size == HUGE_PAGES * P && !bound_elsewhere(g));
    if !slot {
        return Some(match gmem {
            None => Just(Step::CreateGmem { size: HUGE_PAGES * P, flags: 0 }).boxed(),
            Some(g) => Just(Step::SetRegion(MemoryRegion {
                slot: HUGE_SLOT,
                flags: KVM_MEM_GUEST_MEMFD,
                gpa: HUGE_WINDOW,
                size: HUGE_PAGES * P,
                user: UserMemory::Anon { anon: HUGE_ANON, page: 0 },
                guest_memfd: Some((GmemFd::File(g), 0)),
            }))
            .boxed(),
        });
    }
    let (fixed, huge) = (&state.fixed, &state.fixed.huge);
    let boundaries = huge_boundaries(model);
    let (word, value) = (huge.huge_word.clone(), fixed.value.clone());
    // A boundary page or any page, and a word in it (first, last, any);
    // then whether the guest writes, what the guest or host stores.
    let at = move || {
        (
            prop_oneof![3 => proptest::sample::select(boundaries.clone()), 1 => 0..HUGE_PAGES],
            word.clone(),
            value.clone(),
        )
    };
    let host_at = at.clone();
    let access = lazy(move || {
        (at(), any::<bool>())
            .prop_map(|((page, word, value), write)| {
                let gpa = HUGE_WINDOW + page * P + word * 8;
                if write {
                    Step::GuestWrite { gpa, value }
                } else {
                    Step::GuestRead { gpa }
                }
            })
            .boxed()
    });
    let host = lazy(move || {
        host_at()
            .prop_map(|(page, word, value)| Step::HostWrite {
                mem: ModelMemory::Anon(HUGE_ANON),
                offset: page * P + word * 8,
                value,
            })
            .boxed()
    });
    let mut choices: Vec<(u32, BoxedStrategy<Step>)> =
        vec![(6, access), (2, host), (3, huge.huge_attributes.clone().boxed())];
    if state.hypercalls && profile.hypercall_exit_mask != 0 {
        choices.push((2, huge.huge_map_gpa_range.clone().boxed()));
    }
    if let Some(g) = gmem {
        let ranges = huge.huge_fallocate.clone();
        let fallocate = lazy(move || {
            ranges
                .clone()
                .prop_map(move |((first, end), mode)| Step::Fallocate {
                    gmem: g,
                    mode,
                    offset: first * P,
                    len: (end - first) * P,
                })
                .boxed()
        });
        choices.push((1, fallocate));
    }
    if profile.pre_fault_memory {
        choices.push((1, huge.huge_pre_fault.clone().boxed()));
    }
    Some(Pick(choices).boxed())
}

/// The huge window's strategies that depend on the profile only.
fn huge_fixed(profile: &Profile) -> HugeFixed {
    let private = profile.supported_attributes & KVM_MEMORY_ATTRIBUTE_PRIVATE;
    HugeFixed {
        huge_word: prop_oneof![Just(0u64), Just(511), 0..512u64].sboxed(),
        huge_attributes: (huge_range(), any::<bool>())
            .prop_map(move |((first, end), to_private)| Step::SetAttributes {
                address: HUGE_WINDOW + first * P,
                size: (end - first) * P,
                attributes: if to_private { private } else { 0 },
                flags: 0,
            })
            .sboxed(),
        huge_map_gpa_range: (huge_range(), any::<bool>())
            .prop_map(|((first, end), to_private)| Step::MapGpaRange {
                gpa: HUGE_WINDOW + first * P,
                npages: end - first,
                attrs: if to_private { kvm_model::KVM_MAP_GPA_RANGE_ENCRYPTED } else { 0 },
            })
            .sboxed(),
        huge_fallocate: (huge_range(), prop_oneof![Just(Fallocate::Allocate), Just(Fallocate::PunchHole)]).sboxed(),
        huge_pre_fault: huge_range()
            .prop_map(|(first, end)| Step::PreFault { gpa: HUGE_WINDOW + first * P, size: (end - first) * P, flags: 0 })
            .sboxed(),
    }
}

fn transitions(state: &RefState) -> BoxedStrategy<Step> {
    // Each option is built only if picked (lazy, Pick): what it needs from
    // the state is gathered here, the strategy made from it later.
    let gpa = guest_gpa(state);
    let exec_gpa = gpa.clone();
    let mut choices: Vec<(u32, BoxedStrategy<Step>)> = vec![
        (2, state.fixed.create_gmem.clone().boxed()),
        (4, new_region(state)),
        (2, state.fixed.set_attributes.clone().boxed()),
        (8, guest_access(&gpa, state)),
        (2, lazy(move || exec_gpa.clone().prop_map(|gpa| Step::GuestExec { gpa }).boxed())),
        (2, host_write(state)),
    ];
    if let Some(s) = change_region(state) {
        choices.push((3, s));
    }
    if let Some(s) = rebinding_focus(state) {
        // Only offered while a live binding exists, which is rare enough
        // (about one state in ten) that a lower weight left 200 sequences
        // with one to three overlap checks.
        choices.push((6, s));
    }
    if let Some(s) = fallocate(state) {
        choices.push((2, s));
    }
    if let Some(s) = bound_fallocate_focus(state) {
        // Offered only while a live binding exists, in about one state in
        // twenty-five (6.12, protected VM: 345 of 7961), so weighted high;
        // the run's tally prints how often each position was reached.
        choices.push((12, s));
    }
    if let Some(s) = host_read(state) {
        choices.push((1, s));
    }
    let ngmem = state.model.gmems().len();
    if ngmem > 0 {
        choices.push((1, lazy(move || (0..ngmem).prop_map(|gmem| Step::CloseGmem { gmem }).boxed())));
    }
    // Mostly a guest_memfd a memslot binds, which is what closing is about.
    let bound: Vec<usize> = state.model.slots().values().filter_map(|s| s.gmem.map(|(g, _)| g)).collect();
    if let Some(s) = vm_close_focus(state) {
        choices.push((if state.vm_closed { 6 } else { 3 }, s));
    }
    if !bound.is_empty() {
        let close = move || proptest::sample::select(bound.clone()).prop_map(|gmem| Step::CloseGmem { gmem }).boxed();
        choices.push((1, lazy(close)));
    }
    if let Some(s) = released_focus(state) {
        choices.push((4, s));
    }
    if state.hypercalls && state.model.profile().hypercall_exit_mask != 0 {
        choices.push((1, state.fixed.hypercall_exits.clone().boxed()));
        choices.push((3, state.fixed.map_gpa_range.clone().boxed()));
    }
    if state.model.profile().pre_fault_memory {
        choices.push((2, state.fixed.pre_fault.clone().boxed()));
    }
    if state.gmem_only == GmemOnlyAccess::Focused {
        if let Some(s) = gmem_only_focus(state) {
            choices.push((6, s));
        }
    }
    if let Some(s) = huge_focus(state) {
        // About half the steps: the other steps' weights add up to 40-50.
        choices.push((40, s));
    }
    Pick(choices).boxed()
}

/// A strategy built only when a value is generated from it: of the dozen
/// or so options a step offers only one is picked, and building proptest
/// strategies (boxes, Arcs, closures) cost as much as generating from the
/// picked one.
fn lazy<T: fmt::Debug + 'static>(build: impl Fn() -> BoxedStrategy<T> + 'static) -> BoxedStrategy<T> {
    Lazy(build).boxed()
}

struct Lazy<F>(F);

impl<F> fmt::Debug for Lazy<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Lazy")
    }
}

impl<T: fmt::Debug, F: Fn() -> BoxedStrategy<T>> Strategy for Lazy<F> {
    type Tree = Box<dyn ValueTree<Value = T>>;
    type Value = T;

    fn new_tree(&self, runner: &mut TestRunner) -> proptest::strategy::NewTree<Self> {
        (self.0)().new_tree(runner)
    }
}

/// A weighted choice among strategies that generates only the one it
/// picks. proptest's `Union` also prepares a lazy tree, with a forked
/// random generator, for every option before the pick, so that shrinking
/// can fall back to them; a sequence's steps shrink by being dropped
/// instead, and those forks were most of the time spent generating
/// sequences (under TCG, whole seconds of a run).
#[derive(Debug)]
struct Pick<T>(Vec<(u32, BoxedStrategy<T>)>);

impl<T: fmt::Debug> Strategy for Pick<T> {
    type Tree = Box<dyn ValueTree<Value = T>>;
    type Value = T;

    fn new_tree(&self, runner: &mut TestRunner) -> proptest::strategy::NewTree<Self> {
        let total: u32 = self.0.iter().map(|(weight, _)| weight).sum();
        let mut at = runner.rng().random_range(0..total);
        for (weight, strategy) in &self.0 {
            if at < *weight {
                return strategy.new_tree(runner);
            }
            at -= weight;
        }
        unreachable!("the pick lies below the total weight")
    }
}

/// Whether `step` is valid on `state`: it names things that exist, stays
/// inside its host mappings, and is something the model (and this run)
/// covers.
fn preconditions(state: &RefState, step: &Step) -> bool {
    let model = &state.model;
    let user_fits = |user: UserMemory, npages: u64| match user {
        UserMemory::Null => true,
        UserMemory::Anon { anon, page } => {
            anon != 0 && model.anons().get(anon).is_some_and(|a| page + npages <= a.npages)
        }
        UserMemory::GmemMap { gmem, page } => {
            model.gmems().get(gmem).is_some_and(|g| g.mmap() && !g.closed && (page + npages) * P <= g.size)
        }
    };
    let guest_ok = |gpa: u64, is_write: bool| {
        model.unmodeled_guest_access(gpa, is_write).is_none()
            && !(state.gmem_only == GmemOnlyAccess::Excluded && model.slot_at(gpa).is_some_and(|s| s.gmem_only))
    };
    let needs_vm_fd = matches!(
        step,
        Step::CreateGmem { .. }
            | Step::SetRegion(_)
            | Step::SetAttributes { .. }
            | Step::HypercallExits { .. }
            | Step::MapGpaRange { .. }
            | Step::CloseVm
    );
    if state.vm_closed && needs_vm_fd {
        return false;
    }
    match step {
        Step::CreateGmem { .. }
        | Step::SetAttributes { .. }
        | Step::HypercallExits { .. }
        | Step::MapGpaRange { .. }
        | Step::CloseVm => true,
        // A closed guest_memfd is named only by deleting a slot that maps it.
        Step::SetRegion(r) if r.size == 0 => true,
        Step::SetRegion(r) => {
            user_fits(r.user, r.size / P)
                && match r.guest_memfd {
                    Some((GmemFd::File(g), _)) => model.gmems().get(g).is_some_and(|g| !g.closed),
                    _ => true,
                }
        }
        Step::Fallocate { gmem, .. } | Step::CloseGmem { gmem } => model.gmems().get(*gmem).is_some_and(|g| !g.closed),
        Step::GuestRead { gpa } => guest_ok(*gpa, false),
        Step::GuestWrite { gpa, .. } => guest_ok(*gpa, true),
        Step::GuestExec { gpa } => guest_ok(*gpa, false) && model.unmodeled_guest_fetch(*gpa).is_none(),
        Step::PreFault { gpa, size, flags } => model.unmodeled_pre_fault(*gpa, *size, *flags).is_none(),
        Step::HostWrite { mem, offset, .. } => match *mem {
            ModelMemory::Anon(a) => a != 0 && model.anons().get(a).is_some_and(|m| offset + 8 <= m.npages * P),
            ModelMemory::GmemMap(g) => {
                model.gmems().get(g).is_some_and(|gm| gm.mmap() && !gm.closed && offset + 8 <= gm.size)
            }
        },
        Step::HostRead { gmem, offset } => {
            model.gmems().get(*gmem).is_some_and(|gm| gm.mmap() && !gm.closed && offset + 8 <= gm.size)
        }
    }
}

/// What the model says a step does.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    /// An ioctl or syscall: success or the errno.
    Call(Result<(), Errno>),
    /// A guest access.
    Guest(GuestAccess),
    /// A host write that completed.
    HostWrite,
    /// A host read that completed, with the value.
    HostRead(u64),
    /// A host access killed by SIGBUS (in a child process).
    HostSigbus,
    /// `KVM_PRE_FAULT_MEMORY`: the result and the range written back.
    PreFault(PreFault),
    /// A `KVM_HC_MAP_GPA_RANGE`: the exit's nr, args[0..3] and flags if it
    /// exited, and the guest's rax.
    MapGpa { exit: Option<(u64, [u64; 3], u64)>, ret: u64 },
}

fn apply_model(model: &mut Model, step: &Step) -> Outcome {
    match step {
        Step::CreateGmem { size, flags } => Outcome::Call(model.create_guest_memfd(*size, *flags).map(drop)),
        Step::SetRegion(r) => Outcome::Call(model.set_memory_region(r).map(|_: Change| ())),
        Step::SetAttributes { address, size, attributes, flags } => {
            Outcome::Call(model.set_memory_attributes(*address, *size, *attributes, *flags))
        }
        Step::Fallocate { gmem, mode, offset, len } => Outcome::Call(model.fallocate(*gmem, *mode, *offset, *len)),
        Step::CloseGmem { gmem } => {
            model.close_guest_memfd(*gmem);
            Outcome::Call(Ok(()))
        }
        Step::CloseVm => Outcome::Call(Ok(())),
        Step::GuestRead { gpa } => Outcome::Guest(model.guest_read(*gpa)),
        Step::GuestWrite { gpa, value } => Outcome::Guest(model.guest_write(*gpa, *value)),
        Step::GuestExec { gpa } => Outcome::Guest(model.guest_fetch(*gpa)),
        Step::HypercallExits { mask } => Outcome::Call(model.enable_hypercall_exits(*mask)),
        Step::MapGpaRange { gpa, npages, attrs } => match model.map_gpa_range(*gpa, *npages, *attrs) {
            MapGpaRange::Returned(ret) => Outcome::MapGpa { exit: None, ret },
            MapGpaRange::Exit { args, flags } => {
                let result = match vmm_attributes(args[0], args[1], args[2]) {
                    None => Err(Errno::EINVAL),
                    Some((address, size, attributes)) => model.set_memory_attributes(address, size, attributes, 0),
                };
                Outcome::MapGpa {
                    exit: Some((kvm_model::KVM_HC_MAP_GPA_RANGE, args, flags)),
                    ret: hypercall_ret(result),
                }
            }
        },
        Step::PreFault { gpa, size, flags } => Outcome::PreFault(
            model.pre_fault_memory(*gpa, *size, *flags).expect("preconditions exclude unmodeled pre-faults"),
        ),
        Step::HostWrite { mem, offset, value } => match model.host_write(*mem, *offset, &value.to_le_bytes()) {
            Ok(()) => Outcome::HostWrite,
            Err(HostFault::Sigbus) => Outcome::HostSigbus,
        },
        Step::HostRead { gmem, offset } => {
            let mut buf = [0u8; 8];
            match model.host_read(ModelMemory::GmemMap(*gmem), *offset, &mut buf) {
                Ok(()) => Outcome::HostRead(u64::from_le_bytes(buf)),
                Err(HostFault::Sigbus) => Outcome::HostSigbus,
            }
        }
    }
}

/// A fresh model of a VM made by `Vm::with_payload`: the system memslot
/// and the anonymous mappings the sequences use.
fn initial_model(profile: &Profile, windows: Windows) -> Model {
    let mut model = Model::new(profile.clone());
    let system = model.add_anon(SYSTEM_SLOT_SIZE / P);
    let slot0 = MemoryRegion {
        slot: 0,
        flags: 0,
        gpa: 0,
        size: SYSTEM_SLOT_SIZE,
        user: UserMemory::Anon { anon: system, page: 0 },
        guest_memfd: None,
    };
    model.set_memory_region(&slot0).expect("the model accepts the harness's system memslot");
    for pages in ANON_PAGES {
        model.add_anon(pages);
    }
    if windows == Windows::Huge {
        model.add_anon(HUGE_PAGES);
    }
    model
}

/// The real side of one sequence.
struct Real {
    /// `None` once a `CloseVm` step closed the VM fd.
    vm: Option<Vm>,
    /// Index = model anon id; 0 (the system memory) is not compared.
    anons: Vec<Option<Arc<HostMemory>>>,
    /// Index = model gmem id; `None` once the step closed it.
    gmems: Vec<Option<Arc<GuestMemfd>>>,
    /// The whole-file MAP_SHARED mapping of each mmap-able guest_memfd.
    gmem_maps: Vec<Option<Arc<HostMemory>>>,
    agent: Option<(Agent, kvm_regs)>,
    /// The VM's statistics, in the huge window's sequences: after each
    /// guest step, whether KVM holds a 2 MiB mapping (`pages_2m`).
    stats: Option<Stats>,
    /// Guest_memfd mappings on which a refused access has been seen to
    /// raise SIGBUS (in a child) this sequence.
    sigbus_seen: std::cell::RefCell<std::collections::BTreeSet<ModelMemory>>,
}

/// Where and how a sequence went wrong.
#[derive(Debug)]
struct Mismatch {
    step: usize,
    detail: String,
}

impl Real {
    fn new(kvm: &Arc<Kvm>, vm_type: VmType, windows: Windows) -> Result<Self> {
        let mut vm = Vm::with_payload(kvm, vm_type, &GUEST_AGENT)?;
        // Checked after every step instead (check_steps), where the failure
        // names the step; a shrinking search leaves dead VMs on purpose.
        vm.checked_by_caller();
        let mut anons = vec![None];
        for pages in ANON_PAGES {
            anons.push(Some(Arc::new(HostMemory::anonymous(pages * P)?)));
        }
        let stats = match windows {
            Windows::Small => None,
            Windows::Huge => {
                anons.push(Some(Arc::new(Backing::AnonymousThp.allocate(HUGE_PAGES * P)?)));
                Some(vm.stats()?)
            }
        };
        Ok(Self {
            vm: Some(vm),
            anons,
            gmems: Vec::new(),
            gmem_maps: Vec::new(),
            agent: None,
            stats,
            sigbus_seen: Default::default(),
        })
    }

    /// Whether KVM maps some of the VM with 2 MiB pages, where counted.
    fn huge_mapped(&self) -> Result<Option<bool>, String> {
        self.stats.as_ref().map(|s| s.get("pages_2m").map(|n| n > 0).map_err(|e| e.to_string())).transpose()
    }

    /// The VM fd, for the steps that need it (preconditions keep them out
    /// after a `CloseVm`).
    fn vm(&self) -> Result<&Vm, String> {
        self.vm.as_ref().ok_or_else(|| "the VM fd is closed".to_string())
    }

    fn region(&self, r: &MemoryRegion) -> Region {
        let (memory, memory_offset) = match r.user {
            UserMemory::Null => (None, 0),
            UserMemory::Anon { anon, page } => (self.anons[anon].clone(), page * P),
            // None after the close: only a deletion gets here then.
            UserMemory::GmemMap { gmem, page } => (self.gmem_maps[gmem].clone(), page * P),
        };
        let guest_memfd = r.guest_memfd.map(|(fd, offset)| {
            let binding = match fd {
                // By number: the memslot record must not keep the fd open,
                // since closing it while the slot binds it is a step.
                GmemFd::File(g) => GmemBinding::RawFd(self.gmems[g].as_ref().map_or(CLOSED_FD, |f| f.as_raw_fd())),
                GmemFd::Closed => GmemBinding::RawFd(CLOSED_FD),
                GmemFd::NotGuestMemfd => GmemBinding::RawFd(self.vm.as_ref().map_or(CLOSED_FD, Vm::raw_fd)),
            };
            (binding, offset)
        });
        Region { slot: r.slot, flags: r.flags, gpa: r.gpa, size: r.size, memory, memory_offset, guest_memfd }
    }

    /// Whether KVM left the VM working: the VM fd answers an ioctl that
    /// must succeed, or, once a step closed it, the agent's vCPU does. A VM
    /// KVM killed (`kvm_vm_dead()`, e.g. after a `KVM_BUG_ON()`) fails
    /// both with EIO, so the step that killed it is the one named, not a
    /// later step that happens to use the VM. While the VM fd is open the
    /// vCPU is not asked as well: `kvm_vcpu_ioctl()` tests the same
    /// `kvm->vm_dead` as `kvm_vm_ioctl()`, at several times the cost
    /// (`KVM_GET_REGS` loads the vCPU), and every guest step and the
    /// sequence's closing `DONE` run it through `KVM_RUN`.
    fn check_alive(&self) -> Result<()> {
        match (&self.vm, &self.agent) {
            (Some(vm), _) => vm.check_alive(),
            (None, Some((agent, _))) => agent.vcpu_ref().check_alive(),
            (None, None) => Ok(()),
        }
    }

    /// A fresh VM whose agent is already running, parked at READY.
    fn started(kvm: &Arc<Kvm>, vm_type: VmType, windows: Windows) -> Result<Self> {
        let mut real = Self::new(kvm, vm_type, windows)?;
        real.agent()?;
        Ok(real)
    }

    fn agent(&mut self) -> Result<&mut (Agent, kvm_regs)> {
        if self.agent.is_none() {
            let vm = self.vm.as_ref().ok_or_else(|| Error::Misuse("the VM fd is closed".into()))?;
            let vcpu = vm.vcpu(0, [0; 4])?;
            let entry = vcpu.regs()?;
            self.agent = Some((Agent::start(vcpu)?, entry));
        }
        Ok(self.agent.as_mut().expect("just started"))
    }

    /// Runs a guest access and describes what `KVM_RUN` did in the model's
    /// terms; the agent is parked at READY again afterwards.
    fn guest_access(&mut self, op: Op, expected: &GuestAccess) -> Result<GuestAccess, String> {
        let (agent, entry) = self.agent().map_err(|e| format!("cannot start the agent: {e}"))?;
        agent.submit(op).map_err(|e| e.to_string())?;
        let exit = agent.vcpu().run().map_err(|e| format!("KVM_RUN: {e}"))?;
        match exit {
            Exit::Mmio { gpa, len, is_write, data } => {
                let observed =
                    GuestAccess::Mmio { gpa, len, is_write, data: if is_write { u64::from_le_bytes(data) } else { 0 } };
                if &observed == expected {
                    // Complete the emulation: a read gets MMIO_READ_VALUE.
                    if !is_write {
                        agent.vcpu().complete_mmio_read(&MMIO_READ_VALUE.to_le_bytes()).map_err(|e| e.to_string())?;
                    }
                    let result = agent.wait_ready("completing the MMIO exit").map_err(|e| e.to_string())?;
                    let want = if is_write { 0 } else { MMIO_READ_VALUE };
                    if result != want {
                        return Err(format!("after completing the MMIO exit the guest got {result:#x}, not {want:#x}"));
                    }
                }
                Ok(observed)
            }
            Exit::MemoryFault { flags, gpa, size, errno } => {
                let errno = match errno {
                    Some(nix::errno::Errno::EFAULT) => Errno::EFAULT,
                    other => return Err(format!("KVM_EXIT_MEMORY_FAULT with KVM_RUN errno {other:?}")),
                };
                // The access cannot complete: restart the agent from its entry.
                agent.vcpu().set_regs(entry).map_err(|e| e.to_string())?;
                agent.wait_ready("restarting after a memory fault").map_err(|e| e.to_string())?;
                Ok(GuestAccess::MemoryFault { flags, gpa, size, errno })
            }
            other => match agent.vcpu().call_from_exit(other.clone(), "guest access") {
                Ok(GuestCall::Ready(value)) => Ok(GuestAccess::Done(value)),
                Ok(call) => Err(format!("guest call {call:x?}")),
                Err(e) => Err(e.to_string()),
            },
        }
    }

    /// Performs `step`, returning the outcome in the model's terms.
    fn apply(&mut self, step: &Step, expected: &Outcome) -> Result<Outcome, String> {
        Ok(match step {
            Step::CreateGmem { size, flags } => match self.vm()?.create_guest_memfd(*size, *flags) {
                Ok(gmem) => {
                    let gmem = Arc::new(gmem);
                    let map = if flags & kvm_model::GUEST_MEMFD_FLAG_MMAP != 0 {
                        Some(Arc::new(gmem.map(0, *size, MapFlags::MAP_SHARED).map_err(|e| e.to_string())?))
                    } else {
                        None
                    };
                    self.gmems.push(Some(gmem));
                    self.gmem_maps.push(map);
                    Outcome::Call(Ok(()))
                }
                Err(e) => Outcome::Call(Err(model_errno(&e)?)),
            },
            Step::SetRegion(r) => {
                let region = self.region(r);
                Outcome::Call(match self.vm()?.set_region(&region) {
                    Ok(()) => Ok(()),
                    Err(e) => Err(model_errno(&e)?),
                })
            }
            Step::SetAttributes { address, size, attributes, flags } => {
                let request =
                    kvm_memory_attributes { address: *address, size: *size, attributes: *attributes, flags: *flags };
                Outcome::Call(match self.vm()?.set_memory_attributes_raw(request) {
                    Ok(()) => Ok(()),
                    Err(e) => Err(model_errno(&e)?),
                })
            }
            Step::Fallocate { gmem, mode, offset, len } => {
                let file = self.gmems[*gmem].as_ref().expect("preconditions exclude closed guest_memfds");
                let result = match mode {
                    Fallocate::Allocate => file.allocate(*offset, *len),
                    Fallocate::PunchHole => file.punch_hole(*offset, *len),
                };
                Outcome::Call(match result {
                    Ok(()) => Ok(()),
                    Err(e) => Err(model_errno(&e)?),
                })
            }
            Step::GuestRead { gpa } => {
                let Outcome::Guest(expected) = expected else { unreachable!("a read's outcome is a guest access") };
                Outcome::Guest(self.guest_access(Op::Read { gpa: *gpa }, expected)?)
            }
            Step::GuestWrite { gpa, value } => {
                let Outcome::Guest(expected) = expected else { unreachable!("a write's outcome is a guest access") };
                Outcome::Guest(self.guest_access(Op::Write { gpa: *gpa, value: *value }, expected)?)
            }
            Step::GuestExec { gpa } => {
                let Outcome::Guest(expected) = expected else { unreachable!("a fetch's outcome is a guest access") };
                Outcome::Guest(self.guest_access(Op::Exec { gpa: *gpa }, expected)?)
            }
            Step::HostWrite { .. } | Step::HostRead { .. } => self.host_access(step)?,
            Step::CloseVm => {
                // The agent's vCPU must exist to hold the VM once its fd is gone.
                self.agent().map_err(|e| e.to_string())?;
                self.vm = None;
                Outcome::Call(Ok(()))
            }
            Step::CloseGmem { gmem } => {
                // The file is released here unless a memslot's memory maps
                // it (then when that slot is deleted), as the model says:
                // no other thread's child holds a copy of the fd or a
                // mapping (kvm_harness::child).
                self.gmems[*gmem] = None;
                self.gmem_maps[*gmem] = None;
                Outcome::Call(Ok(()))
            }
            Step::HypercallExits { mask } => {
                Outcome::Call(match self.vm()?.enable_cap(Cap::ExitHypercall, [*mask, 0, 0, 0]) {
                    Ok(()) => Ok(()),
                    Err(e) => Err(model_errno(&e)?),
                })
            }
            Step::MapGpaRange { gpa, npages, attrs } => self.map_gpa_range(*gpa, *npages, *attrs)?,
            Step::PreFault { gpa, size, flags } => self.pre_fault(*gpa, *size, *flags)?,
        })
    }

    /// A host write or read through a mapping.
    fn host_access(&mut self, step: &Step) -> Result<Outcome, String> {
        Ok(match *step {
            Step::HostWrite { mem: mem @ ModelMemory::GmemMap(_), offset, value } => {
                match self.probe(mem, offset, Access::Write(value as u8), value)? {
                    false => Outcome::HostSigbus,
                    true => {
                        self.memory(mem).write_u64(offset, value);
                        Outcome::HostWrite
                    }
                }
            }
            Step::HostWrite { mem, offset, value } => {
                self.memory(mem).write_u64(offset, value);
                Outcome::HostWrite
            }
            Step::HostRead { gmem, offset } => {
                let mem = ModelMemory::GmemMap(gmem);
                match self.probe(mem, offset, Access::Read, 0)? {
                    false => Outcome::HostSigbus,
                    true => Outcome::HostRead(self.memory(mem).read_u64(offset)),
                }
            }
            _ => unreachable!("{step:?} is no host access"),
        })
    }

    /// `KVM_PRE_FAULT_MEMORY` on the agent's vCPU, under the watchdog's
    /// deadline: a kernel that retries forever is a mismatch, not a hang.
    fn pre_fault(&mut self, gpa: u64, size: u64, flags: u64) -> Result<Outcome, String> {
        let (agent, _) = self.agent().map_err(|e| format!("cannot start the agent: {e}"))?;
        let mut range = kvm_pre_fault_memory { gpa, size, flags, ..Default::default() };
        let deadline = watchdog::configured_timeout().map_err(|e| e.to_string())?;
        let result = match agent.vcpu().pre_fault_memory_with_deadline(&mut range, deadline) {
            (_, true) => return Err(format!("KVM_PRE_FAULT_MEMORY still running after {deadline:?}")),
            (Ok(()), false) => Ok(()),
            (Err(e), false) => Err(model_errno(&e)?),
        };
        Ok(Outcome::PreFault(PreFault { result, gpa: range.gpa, size: range.size }))
    }

    /// The guest's `KVM_HC_MAP_GPA_RANGE`, answered as [`vmm_attributes`] says.
    fn map_gpa_range(&mut self, gpa: u64, npages: u64, attrs: u64) -> Result<Outcome, String> {
        let op = Op::Hypercall { nr: kvm_model::KVM_HC_MAP_GPA_RANGE, args: [gpa, npages, attrs, 0] };
        let Some(vm) = self.vm.as_ref() else { return Err("the VM fd is closed".into()) };
        let Some((agent, _)) = self.agent.as_mut() else { return Err("the agent is not running".into()) };
        agent.submit(op).map_err(|e| e.to_string())?;
        let mut exit = None;
        let mut result = agent.vcpu().run().map_err(|e| format!("KVM_RUN: {e}"))?;
        if let Exit::Hypercall { nr, args, flags } = result {
            exit = Some((nr, [args[0], args[1], args[2]], flags));
            let answer = match vmm_attributes(args[0], args[1], args[2]) {
                None => Err(Errno::EINVAL),
                Some((address, size, attributes)) => match vm.set_memory_attributes(address, size, attributes) {
                    Ok(()) => Ok(()),
                    Err(e) => Err(model_errno(&e)?),
                },
            };
            agent.vcpu().set_hypercall_ret(hypercall_ret(answer)).map_err(|e| e.to_string())?;
            result = agent.vcpu().run().map_err(|e| format!("KVM_RUN: {e}"))?;
        }
        let ret = agent.ready_from_exit(result, "KVM_HC_MAP_GPA_RANGE").map_err(|e| e.to_string())?;
        Ok(Outcome::MapGpa { exit, ret })
    }

    /// Whether the 8 bytes at `offset` of `mem` can be accessed. First
    /// through `process_vm_readv`/`writev` on this process (a page the
    /// kernel refuses fails with EFAULT there, not SIGBUS); the first
    /// refused one of each mapping per sequence must then kill a child
    /// process doing `access` with SIGBUS, so the signal itself is checked
    /// and never reaches the test (a child per refusal costs far more than
    /// the syscall under TCG). A write's probe stores the value; the real
    /// write then stores it again.
    fn probe(&self, mem: ModelMemory, offset: u64, access: Access, value: u64) -> Result<bool, String> {
        let memory = self.memory(mem);
        let probed = match access {
            Access::Read => memory.try_read(offset, &mut [0u8; 8]),
            Access::Write(_) => memory.try_write(offset, &value.to_le_bytes()),
        };
        match probed {
            Ok(()) => return Ok(true),
            Err(e) if e.errno() == Some(nix::errno::Errno::EFAULT) => {}
            Err(e) => return Err(e.to_string()),
        }
        if self.sigbus_seen.borrow().contains(&mem) {
            return Ok(false);
        }
        self.sigbus_seen.borrow_mut().insert(mem);
        match memory.access_in_child(offset, 8, access).map_err(|e| e.to_string())? {
            ChildFate::Signaled(nix::sys::signal::Signal::SIGBUS) => Ok(false),
            fate => Err(format!(
                "process_vm_readv/writev found {} at {offset:#x} unmapped (EFAULT), but a host {access} there {fate}",
                describe_memory(mem)
            )),
        }
    }

    fn memory(&self, mem: ModelMemory) -> &HostMemory {
        match mem {
            ModelMemory::Anon(a) => self.anons[a].as_deref().expect("test anons exist"),
            ModelMemory::GmemMap(g) => self.gmem_maps[g].as_deref().expect("mmap-able guest_memfds are mapped"),
        }
    }

    /// The host-visible memories and their sizes in pages.
    fn host_views(model: &Model) -> Vec<(ModelMemory, u64)> {
        let mut views: Vec<(ModelMemory, u64)> =
            (1..model.anons().len()).map(|a| (ModelMemory::Anon(a), model.anons()[a].npages)).collect();
        for (g, gmem) in model.gmems().iter().enumerate() {
            if gmem.mmap() && gmem.host_accessible() && !gmem.closed {
                views.push((ModelMemory::GmemMap(g), gmem.size / P));
            }
        }
        views
    }

    /// Compares every byte the host can see with the model's.
    fn compare_memory(&self, model: &mut Model) -> Result<(), String> {
        for (mem, pages) in Self::host_views(model) {
            for index in 0..pages {
                self.compare_page(model, mem, index)?;
            }
        }
        Ok(())
    }

    /// Compares one host-visible page with the model's, with `memcmp`; only
    /// a differing page is read out to name the first differing byte.
    fn compare_page(&self, model: &mut Model, mem: ModelMemory, index: u64) -> Result<(), String> {
        static ZERO: [u8; P as usize] = [0; P as usize];
        let real = self.memory(mem);
        let want = model.host_page(mem, index).map_err(|f| format!("model: host read of {mem:?} faults: {f:?}"))?;
        let want = want.unwrap_or(&ZERO);
        if real.matches(index * P, want) {
            return Ok(());
        }
        let mut got = vec![0u8; P as usize];
        real.read(index * P, &mut got);
        let i = (0..want.len()).find(|&i| want[i] != got[i]).unwrap_or(0);
        let word = i & !7;
        let w = |b: &[u8]| u64::from_le_bytes(b[word..word + 8].try_into().expect("8 bytes"));
        Err(format!(
            "host view of {} at offset {:#x}: model byte {:#04x}, kernel byte {:#04x} (u64 at {:#x}: \
             model {:#x}, kernel {:#x})",
            describe_memory(mem),
            index * P + i as u64,
            want[i],
            got[i],
            index * P + word as u64,
            w(want),
            w(&got)
        ))
    }
}

/// The host-visible pages `step` may write (before it runs on `model`): the
/// page of a host write, the host pages behind a guest write's GPA, a
/// fallocate's range of a host-mappable guest_memfd.
fn touched_pages(model: &Model, step: &Step) -> Vec<(ModelMemory, u64)> {
    let visible = |g: usize| model.gmems().get(g).is_some_and(|m| m.mmap() && m.host_accessible() && !m.closed);
    match *step {
        Step::HostWrite { mem: ModelMemory::GmemMap(g), .. } if !visible(g) => Vec::new(),
        Step::HostWrite { mem, offset, .. } => vec![(mem, offset / P)],
        Step::GuestWrite { gpa, .. } => {
            let Some(slot) = model.slot_at(gpa) else { return Vec::new() };
            let index = gpa / P - slot.base_gfn;
            let mut pages = Vec::new();
            match slot.user {
                UserMemory::Anon { anon, page } => pages.push((ModelMemory::Anon(anon), page + index)),
                UserMemory::GmemMap { gmem, page } if visible(gmem) => {
                    pages.push((ModelMemory::GmemMap(gmem), page + index))
                }
                _ => {}
            }
            if let Some((g, pgoff)) = slot.gmem.filter(|&(g, _)| visible(g)) {
                pages.push((ModelMemory::GmemMap(g), pgoff + index));
            }
            pages
        }
        Step::Fallocate { gmem, offset, len, .. } if visible(gmem) => {
            let pages = model.gmems()[gmem].size / P;
            let end = offset.saturating_add(len).div_ceil(P).min(pages);
            (offset / P..end).map(|i| (ModelMemory::GmemMap(gmem), i)).collect()
        }
        _ => Vec::new(),
    }
}

fn describe_memory(mem: ModelMemory) -> String {
    match mem {
        ModelMemory::Anon(a) => format!("anon{a}"),
        ModelMemory::GmemMap(g) => format!("the mapping of gmem{g}"),
    }
}

/// The errno of a failed harness call, in the model's terms.
fn model_errno(e: &Error) -> Result<Errno, String> {
    let errno = e.errno().ok_or_else(|| format!("not an errno: {e}"))?;
    Errno::ALL
        .into_iter()
        .find(|m| m.raw() == errno as i32)
        .ok_or_else(|| format!("{errno:?} (unknown to the model): {e}"))
}

/// Where a test thread's time went, for the summary line.
#[derive(Debug, Default, Clone, Copy)]
struct Times {
    generate: Duration,
    setup: Duration,
    guest: Duration,
    calls: Duration,
    model: Duration,
    compare: Duration,
    liveness: Duration,
    teardown: Duration,
    guest_steps: usize,
    other_steps: usize,
    /// Guest steps after which `pages_2m` was read, and those after which
    /// KVM held a 2 MiB mapping ([`Windows::Huge`]).
    huge_counted_steps: usize,
    huge_mapped_steps: usize,
}

thread_local! {
    static TIMES: std::cell::Cell<Times> = std::cell::Cell::new(Times::default());
}

/// Adds the time since `start` to one of the thread's `Times` fields.
fn charge(start: Instant, field: fn(&mut Times) -> &mut Duration) {
    let elapsed = start.elapsed();
    TIMES.with(|t| {
        let mut times = t.get();
        *field(&mut times) += elapsed;
        t.set(times);
    });
}

impl Times {
    fn take() -> Self {
        TIMES.with(|t| t.replace(Times::default()))
    }

    fn summary(&self) -> String {
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let per = |d: Duration, n: usize| if n == 0 { 0.0 } else { ms(d) / n as f64 };
        format!(
            "generation {:.0} ms, VM setup {:.0} ms, guest steps {:.0} ms ({} steps, {:.2} ms each), other calls {:.0} ms ({} steps, {:.2} ms each), model {:.0} ms, host byte checks {:.0} ms, liveness checks {:.0} ms, teardown {:.0} ms",
            ms(self.generate),
            ms(self.setup),
            ms(self.guest),
            self.guest_steps,
            per(self.guest, self.guest_steps),
            ms(self.calls),
            self.other_steps,
            per(self.calls, self.other_steps),
            ms(self.model),
            ms(self.compare),
            ms(self.liveness),
            ms(self.teardown)
        )
    }
}

/// Runs `steps` on a fresh VM and the model, comparing after each step.
fn run_sequence(vms: &Vms, profile: &Profile, steps: &[Step], seen: Option<&AtomicUsize>) -> Result<(), Mismatch> {
    let t = Instant::now();
    let mut real = vms.next().map_err(|e| Mismatch { step: 0, detail: format!("setup: {e}") })?;
    let mut model = initial_model(profile, vms.windows());
    charge(t, |t| &mut t.setup);
    let full = matches!(vms, Vms::InLine { .. });
    let result = check_steps(&mut real, &mut model, steps, seen, full);
    let t = Instant::now();
    vms.release(real);
    charge(t, |t| &mut t.teardown);
    result
}

/// Applies `steps` to both sides, comparing after each: the outcome, and
/// the host-visible bytes. With `full`, every host-visible byte after every
/// step; otherwise the pages a step may write, before and after it, and
/// every byte after the last step. That misses nothing: a byte on which the
/// kernel and the model part stays parted until a step writes its page,
/// and that step checks the page first; the last check sees the rest. A
/// mismatch is then replayed with `full` while it shrinks, so the reported
/// step is the one that made the difference.
fn check_steps(
    real: &mut Real,
    model: &mut Model,
    steps: &[Step],
    seen: Option<&AtomicUsize>,
    full: bool,
) -> Result<(), Mismatch> {
    for (i, step) in steps.iter().enumerate() {
        if let Some(seen) = seen {
            seen.fetch_add(1, Ordering::SeqCst);
        }
        let fail = |detail: String| Mismatch { step: i, detail };
        let mut pages = if full { Vec::new() } else { touched_pages(model, step) };
        let t = Instant::now();
        let checked = pages.iter().try_for_each(|&(mem, index)| real.compare_page(model, mem, index));
        charge(t, |t| &mut t.compare);
        checked.map_err(|e| fail(format!("before {step:x?}: {e}")))?;
        let gmems_before = model.gmems().len();
        let t = Instant::now();
        let expected = apply_model(model, step);
        let undecided = model.take_undecided();
        charge(t, |t| &mut t.model);
        let t = Instant::now();
        let actual = real.apply(step, &expected);
        let guest = matches!(
            step,
            Step::GuestRead { .. } | Step::GuestWrite { .. } | Step::GuestExec { .. } | Step::MapGpaRange { .. }
        );
        charge(t, if guest { |t: &mut Times| &mut t.guest } else { |t: &mut Times| &mut t.calls });
        let huge = if guest { real.huge_mapped().map_err(|e| fail(format!("after {step:x?}: {e}")))? } else { None };
        TIMES.with(|t| {
            let mut times = t.get();
            *(if guest { &mut times.guest_steps } else { &mut times.other_steps }) += 1;
            if let Some(mapped) = huge {
                times.huge_counted_steps += 1;
                times.huge_mapped_steps += usize::from(mapped);
            }
            t.set(times);
        });
        let actual = actual.map_err(|e| fail(format!("{step:x?}: expected {expected:x?}, got {e}")))?;
        if undecided.is_some() {
            // The model assumed the undecided rule's `before`; the kernel
            // may give either, the same in every check of the run.
            accept_undecided(undecided, &actual).map_err(|e| fail(format!("{step:x?}: {e}")))?;
        } else if actual != expected {
            return Err(fail(format!("{step:x?}: expected {}, got {}", show(&expected), show(&actual))));
        }
        // A new host-mappable guest_memfd is checked whole.
        pages.extend(
            Real::host_views(model)
                .into_iter()
                .filter(|(mem, _)| matches!(mem, ModelMemory::GmemMap(g) if *g >= gmems_before))
                .flat_map(|(mem, n)| (0..n).map(move |i| (mem, i))),
        );
        let t = Instant::now();
        let compared = if full || i + 1 == steps.len() {
            real.compare_memory(model)
        } else {
            pages.iter().try_for_each(|&(mem, index)| real.compare_page(model, mem, index))
        };
        charge(t, |t| &mut t.compare);
        compared.map_err(|e| fail(format!("after {step:x?}: {e}")))?;
        let t = Instant::now();
        let alive = real.check_alive();
        charge(t, |t| &mut t.liveness);
        alive.map_err(|e| fail(format!("after {step:x?}, which succeeded as the model says: {e}")))?;
    }
    // Leave the agent cleanly: DONE, which is also the sequence's last
    // guest round trip.
    if let Some((agent, _)) = real.agent.take() {
        agent.done().map_err(|e| Mismatch { step: steps.len(), detail: format!("agent DONE: {e}") })?;
    }
    Ok(())
}

/// Holds the errno of a step whose rule is undecided on this kernel to the
/// rule's outcomes, and to the one every other check of the run saw.
fn accept_undecided(rule: Option<&'static str>, actual: &Outcome) -> std::result::Result<(), String> {
    use kvm_harness::kernel_rules::{ForRunningKernel, GMEM_BINDING_OVERLAP};
    match (rule, actual) {
        (Some(id), Outcome::Call(Err(got))) if id == GMEM_BINDING_OVERLAP.id => {
            GMEM_BINDING_OVERLAP.expected().map_err(|e| e.to_string())?.check(*got)
        }
        (rule, actual) => {
            Err(format!("undecided rule {rule:?} gave an outcome the model cannot judge: {}", show(actual)))
        }
    }
}

/// Where sequences get their VMs and leave them. Exploring prepares each
/// VM (with its agent started) on a helper thread while the previous
/// sequence runs, and destroys finished ones on another, so the kernel's
/// VM creation and teardown (SRCU grace periods included) overlap the
/// sequences; shrinking and reproducing make them in line.
enum Vms {
    InLine { kvm: Arc<Kvm>, vm_type: VmType, windows: Windows },
    Pipelined { ready: std::sync::mpsc::Receiver<Result<Real>>, done: std::sync::mpsc::Sender<Real>, windows: Windows },
}

impl Vms {
    /// The pipelined source and its two helper threads; dropping the
    /// source ends them, joining them waits until every VM is gone.
    fn pipelined(kvm: &Arc<Kvm>, vm_type: VmType, windows: Windows) -> (Self, [std::thread::JoinHandle<()>; 2]) {
        let (ready_tx, ready) = std::sync::mpsc::sync_channel(1);
        let (done, done_rx) = std::sync::mpsc::channel::<Real>();
        let kvm = kvm.clone();
        let maker = std::thread::spawn(move || while ready_tx.send(Real::started(&kvm, vm_type, windows)).is_ok() {});
        let reaper = std::thread::spawn(move || done_rx.into_iter().for_each(drop));
        (Self::Pipelined { ready, done, windows }, [maker, reaper])
    }

    fn windows(&self) -> Windows {
        match self {
            Self::InLine { windows, .. } | Self::Pipelined { windows, .. } => *windows,
        }
    }

    fn next(&self) -> Result<Real> {
        match self {
            Self::InLine { kvm, vm_type, windows } => Real::started(kvm, *vm_type, *windows),
            Self::Pipelined { ready, .. } => {
                ready.recv().map_err(|_| Error::Config("the VM-making thread ended".into()))?
            }
        }
    }

    fn release(&self, real: Real) {
        match self {
            Self::InLine { .. } => drop(real),
            Self::Pipelined { done, .. } => {
                if let Err(back) = done.send(real) {
                    drop(back.0);
                }
            }
        }
    }
}

fn show(outcome: &Outcome) -> String {
    match outcome {
        Outcome::Call(Ok(())) => "success".into(),
        Outcome::Call(Err(e)) => e.name().into(),
        Outcome::Guest(GuestAccess::Done(v)) => format!("completion with {v:#x}"),
        Outcome::Guest(GuestAccess::Mmio { gpa, len, is_write, data }) => {
            format!("KVM_EXIT_MMIO {{ gpa {gpa:#x}, len {len}, is_write {is_write}, data {data:#x} }}")
        }
        Outcome::Guest(GuestAccess::MemoryFault { flags, gpa, size, errno }) => {
            format!("{errno} with KVM_EXIT_MEMORY_FAULT {{ flags {flags:#x}, gpa {gpa:#x}, size {size:#x} }}")
        }
        Outcome::Guest(GuestAccess::Unmodeled(why)) => format!("(unmodeled: {why})"),
        Outcome::HostWrite => "a host write".into(),
        Outcome::HostRead(v) => format!("a host read of {v:#x}"),
        Outcome::HostSigbus => "SIGBUS".into(),
        Outcome::MapGpa { exit, ret } => format!("exit {exit:x?}, guest rax {ret:#x}"),
        Outcome::PreFault(PreFault { result, gpa, size }) => format!(
            "{} with the range left at gpa {gpa:#x}, size {size:#x}",
            result.map_or_else(|e| e.name().to_string(), |()| "success".to_string())
        ),
    }
}

/// Names of the host-side objects in a reproducer.
fn anon_name(a: usize) -> String {
    format!("anon{a}")
}

fn region_expr(r: &MemoryRegion, model: &Model) -> String {
    let (memory, offset) = match r.user {
        UserMemory::Null => ("None".to_string(), 0),
        UserMemory::Anon { anon, page } => (format!("Some({}.clone())", anon_name(anon)), page * P),
        UserMemory::GmemMap { gmem, page } if model.gmems()[gmem].closed => ("None".to_string(), page * P),
        UserMemory::GmemMap { gmem, page } => (format!("Some(gmem{gmem}_map.clone())"), page * P),
    };
    let gmem = match r.guest_memfd {
        None => "None".to_string(),
        Some((fd, off)) => {
            let binding = match fd {
                GmemFd::File(g) => format!("GmemBinding::RawFd(gmem{g}.as_raw_fd())"),
                GmemFd::Closed => format!("GmemBinding::RawFd({CLOSED_FD:#x})"),
                GmemFd::NotGuestMemfd => "GmemBinding::RawFd(vm.raw_fd())".to_string(),
            };
            format!("Some(({binding}, {off:#x}))")
        }
    };
    format!(
        "Region {{ slot: {:#x}, flags: {:#x}, gpa: {:#x}, size: {:#x}, memory: {memory}, memory_offset: {offset:#x}, \
         guest_memfd: {gmem} }}",
        r.slot, r.flags, r.gpa, r.size
    )
}

fn call_line(out: &mut String, what: &str, expected: &Result<(), Errno>, call: &str) {
    match expected {
        Ok(()) => writeln!(out, "    {call}?;"),
        Err(errno) => writeln!(out, "    expect_errno(\"{what}\", Errno::{}, || {call})?;", errno.name()),
    }
    .expect("writing to a String");
}

/// The shrunk sequence as a test body in harness terms, each step
/// asserting what the model expects.
fn reproducer(vm_type: VmType, profile: &Profile, windows: Windows, steps: &[Step], seed: u64) -> String {
    let mut out = String::new();
    let mut model = initial_model(profile, windows);
    reproducer_prelude(&mut out, vm_type, profile, windows, seed);
    let mut agent_started = false;
    let mut ngmem = 0;
    for step in steps {
        let expected = apply_model(&mut model, step);
        let _ = writeln!(out, "    // {step:x?}");
        if matches!(
            step,
            Step::GuestRead { .. }
                | Step::GuestWrite { .. }
                | Step::GuestExec { .. }
                | Step::PreFault { .. }
                | Step::MapGpaRange { .. }
        ) && !agent_started
        {
            agent_started = true;
            let _ = writeln!(
                out,
                "    let vcpu = vm.vcpu(0, [0; 4])?;\n    let entry = vcpu.regs()?;\n    let mut agent = Agent::start(vcpu)?;"
            );
        }
        step_lines(&mut out, step, &expected, &mut ngmem, &model);
    }
    host_view_lines(&mut out, &mut model);
    let _ = writeln!(out, "    Ok(())\n}});");
    out
}

/// The reproducer's first lines: how to rerun the case, the imports, the VM
/// and the anonymous memories.
fn reproducer_prelude(w: &mut String, vm_type: VmType, profile: &Profile, windows: Windows, seed: u64) {
    let vm_type_expr = match vm_type {
        VmType::Default => "VmType::Default",
        VmType::SwProtected => "VmType::SwProtected",
    };
    let _ = writeln!(w, "// {SEED_ENV}={seed:#x} {CASES_ENV}=1 reruns this case; kernel rules {:?}.", profile.rules);
    let _ = writeln!(
        w,
        "// use guest_payloads::GUEST_AGENT; use kvm_harness::bindings::{{kvm_memory_attributes, kvm_pre_fault_memory}};\n\
         // use kvm_harness::{{expect_errno, Access, Agent, Cap, ChildFate, Errno, Exit, GmemBinding, HostMemory, Op, Region, Vm, VmType}};\n\
         // use nix::sys::mman::MapFlags; use nix::sys::signal::Signal; use std::os::fd::AsRawFd; use std::sync::Arc;"
    );
    let _ = writeln!(w, "suite.test(\"model_reproducer\", vec![], |kvm| {{");
    let _ = writeln!(w, "    let vm = Vm::with_payload(kvm, {vm_type_expr}, &GUEST_AGENT)?;");
    for (i, pages) in ANON_PAGES.iter().enumerate() {
        let _ = writeln!(w, "    let {} = Arc::new(HostMemory::anonymous({:#x})?);", anon_name(i + 1), pages * P);
    }
    if windows == Windows::Huge {
        let _ = writeln!(
            w,
            "    let {} = Arc::new(kvm_harness::backing::Backing::AnonymousThp.allocate({:#x})?);",
            anon_name(HUGE_ANON),
            HUGE_PAGES * P
        );
    }
}

/// One step and the outcome the model expects of it, as harness calls.
fn step_lines(w: &mut String, step: &Step, expected: &Outcome, ngmem: &mut usize, model: &Model) {
    match (step, expected) {
        (Step::CreateGmem { size, flags }, Outcome::Call(Ok(()))) => {
            let g = *ngmem;
            *ngmem += 1;
            let _ = writeln!(w, "    let gmem{g} = Arc::new(vm.create_guest_memfd({size:#x}, {flags:#x})?);");
            if flags & kvm_model::GUEST_MEMFD_FLAG_MMAP != 0 {
                let _ =
                    writeln!(w, "    let gmem{g}_map = Arc::new(gmem{g}.map(0, {size:#x}, MapFlags::MAP_SHARED)?);");
            }
        }
        (Step::CreateGmem { size, flags }, Outcome::Call(result)) => {
            call_line(w, "KVM_CREATE_GUEST_MEMFD", result, &format!("vm.create_guest_memfd({size:#x}, {flags:#x})"))
        }
        (Step::SetRegion(r), Outcome::Call(result)) => {
            call_line(w, "KVM_SET_USER_MEMORY_REGION2", result, &format!("vm.set_region(&{})", region_expr(r, model)))
        }
        (Step::SetAttributes { address, size, attributes, flags }, Outcome::Call(result)) => call_line(
            w,
            "KVM_SET_MEMORY_ATTRIBUTES",
            result,
            &format!(
                "vm.set_memory_attributes_raw(kvm_memory_attributes {{ address: {address:#x}, size: {size:#x}, \
                 attributes: {attributes:#x}, flags: {flags:#x} }})"
            ),
        ),
        (Step::Fallocate { gmem, mode, offset, len }, Outcome::Call(result)) => {
            let call = match mode {
                Fallocate::Allocate => "allocate",
                Fallocate::PunchHole => "punch_hole",
            };
            call_line(w, "fallocate", result, &format!("gmem{gmem}.{call}({offset:#x}, {len:#x})"));
        }
        (Step::GuestRead { gpa }, Outcome::Guest(access)) => {
            guest_lines(w, &format!("Op::Read {{ gpa: {gpa:#x} }}"), access)
        }
        (Step::GuestWrite { gpa, value }, Outcome::Guest(access)) => {
            guest_lines(w, &format!("Op::Write {{ gpa: {gpa:#x}, value: {value:#x} }}"), access)
        }
        (Step::GuestExec { gpa }, Outcome::Guest(access)) => {
            guest_lines(w, &format!("Op::Exec {{ gpa: {gpa:#x} }}"), access)
        }
        (Step::HypercallExits { mask }, Outcome::Call(result)) => call_line(
            w,
            "KVM_ENABLE_CAP(KVM_CAP_EXIT_HYPERCALL)",
            result,
            &format!("vm.enable_cap(Cap::ExitHypercall, [{mask:#x}, 0, 0, 0])"),
        ),
        _ => later_step_lines(w, step, expected, model),
    }
}

/// [`step_lines`] of the hypercall, pre-fault, close and host-access steps.
fn later_step_lines(w: &mut String, step: &Step, expected: &Outcome, model: &Model) {
    match (step, expected) {
        (Step::MapGpaRange { gpa, npages, attrs }, Outcome::MapGpa { exit, ret }) => {
            let answer = match (exit, vmm_attributes(*gpa, *npages, *attrs)) {
                (None, _) => "unreachable!(\"no exit expected\")".to_string(),
                (Some(_), None) => format!("Ok({ret:#x})"),
                (Some(_), Some((a, s, at))) => {
                    format!("{{ let _ = vm.set_memory_attributes({a:#x}, {s:#x}, {at:#x}); Ok({ret:#x}) }}")
                }
            };
            let _ = writeln!(
                w,
                "    assert_eq!(agent.hypercall(0xc, [{gpa:#x}, {npages:#x}, {attrs:#x}, 0], |_, nr, args| {{\n        \
                 assert_eq!(Some((nr, [args[0], args[1], args[2]])), {});\n        {answer}\n    }})?, {ret:#x});",
                exit.map_or("None".to_string(), |(nr, [a, n, at], _)| format!("Some(({nr:#x}, [{a:#x}, {n:#x}, {at:#x}]))"))
            );
        }
        (Step::PreFault { gpa, size, flags }, Outcome::PreFault(after)) => {
            let _ = writeln!(
                w,
                "    let mut range = kvm_pre_fault_memory {{ gpa: {gpa:#x}, size: {size:#x}, flags: {flags:#x}, ..Default::default() }};"
            );
            call_line(w, "KVM_PRE_FAULT_MEMORY", &after.result, "agent.vcpu().pre_fault_memory(&mut range)");
            let _ = writeln!(w, "    assert_eq!((range.gpa, range.size), ({:#x}, {:#x}));", after.gpa, after.size);
        }
        (Step::CloseVm, _) => {
            let _ = writeln!(w, "    drop(vm); // the agent's vCPU and the guest_memfds keep the VM alive");
        }
        (Step::CloseGmem { gmem }, _) => {
            let map = if model.gmems()[*gmem].mmap() { format!(" drop(gmem{gmem}_map);") } else { String::new() };
            let _ = writeln!(w, "    drop(gmem{gmem});{map}");
        }
        (Step::HostWrite { mem: ModelMemory::GmemMap(g), offset, value }, Outcome::HostSigbus) => {
            let _ = writeln!(
                w,
                "    assert_eq!(gmem{g}_map.access_in_child({offset:#x}, 8, Access::Write({:#x}))?, ChildFate::Signaled(Signal::SIGBUS));",
                *value as u8
            );
        }
        (Step::HostRead { gmem, offset }, Outcome::HostSigbus) => {
            let _ = writeln!(
                w,
                "    assert_eq!(gmem{gmem}_map.access_in_child({offset:#x}, 8, Access::Read)?, ChildFate::Signaled(Signal::SIGBUS));"
            );
        }
        (Step::HostRead { gmem, offset }, Outcome::HostRead(v)) => {
            let _ = writeln!(w, "    assert_eq!(gmem{gmem}_map.read_u64({offset:#x}), {v:#x});");
        }
        (Step::HostWrite { mem, offset, value }, _) => {
            let name = match mem {
                ModelMemory::Anon(a) => anon_name(*a),
                ModelMemory::GmemMap(g) => format!("gmem{g}_map"),
            };
            let _ = writeln!(w, "    {name}.write_u64({offset:#x}, {value:#x});");
        }
        (step, outcome) => unreachable!("{step:?} cannot have the outcome {outcome:?}"),
    }
}

/// The host's view after the last step, as the model has it: every
/// host-visible u64, checked.
fn host_view_lines(w: &mut String, model: &mut Model) {
    let _ = writeln!(w, "    // Every host-visible u64 after the last step (unlisted ones are 0):");
    let mut views: Vec<(String, ModelMemory, u64)> =
        (1..model.anons().len()).map(|a| (anon_name(a), ModelMemory::Anon(a), model.anons()[a].npages * P)).collect();
    for (g, gmem) in model.gmems().iter().enumerate() {
        if gmem.mmap() && gmem.host_accessible() && !gmem.closed {
            views.push((format!("gmem{g}_map"), ModelMemory::GmemMap(g), gmem.size));
        }
    }
    for (name, mem, len) in views {
        let mut bytes = vec![0u8; len as usize];
        model.host_read(mem, 0, &mut bytes).expect("host-visible memory reads");
        let words: Vec<String> = bytes
            .chunks_exact(8)
            .enumerate()
            .filter_map(|(i, c)| {
                let v = u64::from_le_bytes(c.try_into().expect("8 bytes"));
                (v != 0).then(|| format!("({:#x}, {v:#x})", i * 8))
            })
            .collect();
        let _ = writeln!(
            w,
            "    for off in (0..{len:#x}).step_by(8) {{\n        let want = [{}].iter().find(|w: &&(u64, u64)| w.0 == off).map_or(0, |w| w.1);\n        \
             assert_eq!({name}.read_u64(off), want, \"{name} at {{off:#x}}\");\n    }}",
            words.join(", ")
        );
    }
}

fn guest_lines(w: &mut String, op: &str, access: &GuestAccess) {
    let _ = match access {
        GuestAccess::Done(v) => writeln!(w, "    assert_eq!(agent.perform({op})?, {v:#x});"),
        GuestAccess::Mmio { gpa, len, is_write: false, .. } => writeln!(
            w,
            "    agent.submit({op})?;\n    let exit = agent.vcpu().run()?;\n    \
             assert!(matches!(exit, Exit::Mmio {{ gpa: {gpa:#x}, len: {len}, is_write: false, .. }}), \"{{exit:x?}}\");\n    \
             agent.vcpu().complete_mmio_read(&{MMIO_READ_VALUE:#x}u64.to_le_bytes())?;\n    \
             assert_eq!(agent.wait_ready(\"MMIO read\")?, {MMIO_READ_VALUE:#x});"
        ),
        GuestAccess::Mmio { gpa, len, is_write: true, data } => writeln!(
            w,
            "    agent.submit({op})?;\n    \
             assert_eq!(agent.vcpu().run()?, Exit::Mmio {{ gpa: {gpa:#x}, len: {len}, is_write: true, data: {data:#x}u64.to_le_bytes() }});\n    \
             agent.wait_ready(\"MMIO write\")?;"
        ),
        GuestAccess::MemoryFault { flags, gpa, size, errno } => writeln!(
            w,
            "    agent.submit({op})?;\n    \
             assert_eq!(agent.vcpu().run()?, Exit::MemoryFault {{ flags: {flags:#x}, gpa: {gpa:#x}, size: {size:#x}, errno: Some(Errno::{}) }});\n    \
             agent.vcpu().set_regs(&entry)?;\n    agent.wait_ready(\"restart\")?;",
            errno.name()
        ),
        GuestAccess::Unmodeled(why) => writeln!(w, "    // not generated: {why}"),
    };
}

/// The VM's rule profile: the running kernel's version and what a fresh VM
/// of `vm_type` reports.
fn probe_profile(kvm: &Arc<Kvm>, vm_type: VmType) -> Result<Profile> {
    // The versioned rules' outcomes, decided from the kernel's history,
    // release and KVM_SELFTESTS_RULES, as for the named tests.
    let rules = Rules::decide(kernel_rules::running_kernel()?).map_err(Error::Config)?;
    let mmio_caching = kernel_rules::kvm_param("mmio_caching")
        .map(|v| v == "Y")
        .ok_or_else(|| Error::Config("/sys/module/kvm/parameters/mmio_caching is missing".into()))?;
    let vm = Vm::bare(kvm, vm_type)?;
    Ok(Profile {
        rules,
        guest_memfd: kvm.cap(Cap::GuestMemfd) != 0,
        guest_memfd_slots: vm.cap(Cap::GuestMemfd) != 0,
        guest_memfd_flags: u64::from(vm.cap(Cap::GuestMemfdFlags) as u32),
        memory_attributes_ioctl: kvm.cap(Cap::MemoryAttributes) != 0,
        supported_attributes: u64::from(vm.cap(Cap::MemoryAttributes) as u32),
        readonly_mem: vm.cap(Cap::ReadonlyMem) != 0,
        address_spaces: vm.cap(Cap::MultiAddressSpace).clamp(1, i32::from(u16::MAX)) as u16,
        mmio_caching,
        pre_fault_memory: vm.cap(Cap::PreFaultMemory) != 0,
        // KVM_X86_QUIRK_SLOT_ZAP_ALL is on unless disabled, which no test does.
        slot_zap_all: vm_type == VmType::Default,
        hypercall_exit_mask: u64::from(vm.cap(Cap::ExitHypercall) as u32),
    })
}

/// Case `i`'s seed: case 0 runs the base seed itself, so a printed case
/// seed given back as the base seed reruns exactly that case first.
fn case_seed(base: u64, case: u32) -> u64 {
    if case == 0 {
        return base;
    }
    // splitmix64 of base + case.
    let mut z = base.wrapping_add(u64::from(case).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn rng(seed: u64) -> TestRng {
    let mut bytes = [0u8; 32];
    for (i, chunk) in bytes.chunks_exact_mut(8).enumerate() {
        chunk.copy_from_slice(&case_seed(seed, i as u32 + 1).to_le_bytes());
    }
    TestRng::from_seed(RngAlgorithm::ChaCha, &bytes)
}

type Sequences = Sequential<RefState, Step, BoxedStrategy<RefState>, BoxedStrategy<Step>>;

fn sequences(profile: &Profile, gmem_only: GmemOnlyAccess, windows: Windows) -> Sequences {
    let fixed = Arc::new(Fixed {
        create_gmem: create_gmem(profile),
        set_attributes: set_attributes(profile),
        value: value().sboxed(),
        pre_fault: pre_fault(),
        hypercall_exits: prop_oneof![
            3 => Just(kvm_model::KVM_EXIT_HYPERCALL_VALID_MASK),
            1 => Just(0u64),
            1 => (0..64u32).prop_map(|bit| 1u64 << bit),
        ]
        .prop_map(|mask| Step::HypercallExits { mask })
        .sboxed(),
        map_gpa_range: map_gpa_range(),
        huge: huge_fixed(profile),
    });
    let init = RefState {
        model: initial_model(profile, windows),
        gmem_only,
        windows,
        hypercalls: !on_kvm_pvm(),
        fixed,
        vm_closed: false,
    };
    Sequential::new(
        SizeRange::from(STEPS),
        move || Just(init.clone()).boxed(),
        preconditions,
        transitions,
        |mut state: RefState, step: &Step| {
            apply_model(&mut state.model, step);
            state.vm_closed |= *step == Step::CloseVm;
            state
        },
    )
}

/// Runs the configured number of random sequences on VMs of `vm_type`; on
/// a mismatch, shrinks it and fails with the reproducer.
fn explore(kvm: &Arc<Kvm>, vm_type: VmType, gmem_only: GmemOnlyAccess, windows: Windows) -> Result<()> {
    let profile = probe_profile(kvm, vm_type)?;
    let base = settings::u64_opt(SEED_ENV)?.unwrap_or(DEFAULT_SEED);
    let default_cases = match windows {
        Windows::Small => DEFAULT_CASES,
        Windows::Huge => HUGE_DEFAULT_CASES,
    };
    let cases = match settings::u64_opt(CASES_ENV)? {
        None => default_cases,
        Some(n) if (1..=u64::from(u32::MAX)).contains(&n) => n as u32,
        Some(n) => return Err(Error::Config(format!("{CASES_ENV}={n}: expected at least 1"))),
    };
    eprintln!(
        "model: {vm_type} on {}, {profile:?}, seed {base:#x}, {cases} cases, gmem-only guest accesses {gmem_only:?}, \
         windows {windows:?}, guest hypercalls {}",
        kernel_rules::running_kernel()?.release_source,
        if on_kvm_pvm() { "excluded (kvm_pvm)" } else { "included" }
    );
    let budget = Duration::from_secs(settings::u64_opt(BUDGET_ENV)?.unwrap_or(DEFAULT_BUDGET_SECS));
    let soak = settings::u64_opt(SOAK_ENV)?.is_some_and(|v| v != 0);
    let before = Resources::now()?;
    let start = Instant::now();
    let (vms, helpers) = Vms::pipelined(kvm, vm_type, windows);
    let (mut ran, mut steps_run) = (0u32, 0usize);
    let mut tally = std::collections::BTreeMap::new();
    let mut rule_hits = std::collections::BTreeMap::new();
    for case in 0..cases {
        if start.elapsed() > budget {
            eprintln!("model: time budget of {budget:?} reached, stopping after {ran} of {cases} cases");
            break;
        }
        let seed = case_seed(base, case);
        let t = Instant::now();
        let mut runner = TestRunner::new_with_rng(Config::default(), rng(seed));
        let mut tree = sequences(&profile, gmem_only, windows)
            .new_tree(&mut runner)
            .map_err(|e| Error::Config(format!("generating case {case}: {e}")))?;
        let (_, steps, seen) = tree.current();
        charge(t, |t| &mut t.generate);
        ran += 1;
        steps_run += steps.len();
        let Err(first) = run_sequence(&vms, &profile, &steps, seen.as_deref()) else {
            tally_outcomes(&profile, windows, &steps, &mut tally, &mut rule_hits);
            continue;
        };
        // Said now: shrinking replays the case, and a kernel that dies on
        // a replay (a BUG() with oops=panic) would take the message along.
        eprintln!(
            "model: case {case} (seed {seed:#x}) failed at step {} of {}: {}; shrinking",
            first.step + 1,
            steps.len(),
            first.detail
        );
        drop(vms);
        let in_line = Vms::InLine { kvm: kvm.clone(), vm_type, windows };
        let (steps, mismatch, runs) = shrink(&in_line, &profile, &mut tree, steps, first);
        let repro = reproducer(vm_type, &profile, windows, &steps[..=mismatch.step.min(steps.len() - 1)], seed);
        return Err(Error::rule(
            "KVM agrees with the private-memory model after every step",
            format!(
                "case {case} (seed {seed:#x}) failed; shrunk in {runs} runs to {} steps; step {}: {}\n\
                 shrunk sequence:\n{steps:#x?}\nreproducer:\n{repro}",
                mismatch.step + 1,
                mismatch.step + 1,
                mismatch.detail
            ),
        ));
    }
    drop(vms);
    for helper in helpers {
        helper.join().map_err(|_| Error::Config("a VM helper thread panicked".into()))?;
    }
    eprintln!("model: {vm_type}: {ran} sequences, {steps_run} steps, all matched, in {:.1?}", start.elapsed());
    let times = Times::take();
    eprintln!("model: {vm_type}: time: {}", times.summary());
    let kinds: Vec<String> = tally.iter().map(|(kind, n)| format!("{kind}: {n}")).collect();
    eprintln!("model: outcomes checked: {}", kinds.join(", "));
    let whole_run = ran == cases && cases >= default_cases;
    expect_rules_reached(&profile, &rule_hits, whole_run)?;
    if windows == Windows::Huge {
        eprintln!(
            "model: {vm_type}: KVM held a 2 MiB mapping after {} of {} guest steps",
            times.huge_mapped_steps, times.huge_counted_steps
        );
        kvm_harness::ensure!(
            !whole_run || times.huge_mapped_steps > 0,
            "a whole run of the huge window's sequences has KVM map 2 MiB pages (else it tests none)",
            "pages_2m stayed 0 after all {} guest steps",
            times.huge_counted_steps
        );
    }
    let after = Resources::now()?;
    eprintln!(
        "model: {vm_type}: open fds {} -> {}, RSS {} KiB -> {} KiB over {ran} sequences",
        before.fds, after.fds, before.rss_kib, after.rss_kib
    );
    kvm_harness::ensure!(
        !soak || after.fds == before.fds,
        "VMs, vCPUs, guest_memfds and mappings of finished sequences are all released",
        "{} open fds before {ran} sequences, {} after",
        before.fds,
        after.fds
    );
    Ok(())
}

/// What the process holds: open fds and resident memory.
struct Resources {
    fds: usize,
    rss_kib: u64,
}

impl Resources {
    fn now() -> Result<Self> {
        // stat() of /proc/self/fd counts the open fds (since 6.2) without
        // taking a reference to any file. Listing the directory takes one
        // on each in turn, and a file a concurrent test closes meanwhile
        // would then be released when this thread returns to user space,
        // not at that test's close, where its model expects it.
        let dir = std::fs::metadata("/proc/self/fd").map_err(|e| Error::Config(format!("/proc/self/fd: {e}")))?;
        let fds = match dir.len() {
            // Before 6.2 the size is 0 (this process has fds open, /dev/kvm
            // at least); such kernels have no guest_memfd to close.
            0 => std::fs::read_dir("/proc/self/fd").map_err(|e| Error::Config(format!("/proc/self/fd: {e}")))?.count(),
            n => n as usize,
        };
        let status = std::fs::read_to_string("/proc/self/status")
            .map_err(|e| Error::Config(format!("/proc/self/status: {e}")))?;
        let rss_kib = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .ok_or_else(|| Error::Config("/proc/self/status has no VmRSS".into()))?;
        Ok(Resources { fds, rss_kib })
    }
}

/// The versioned rules this VM's model applies: a whole default run must
/// reach each (a rule its sequences never reach would pass on a kernel that
/// breaks it), and every run prints how often it did.
fn expect_rules_reached(
    profile: &Profile,
    hits: &std::collections::BTreeMap<&'static str, u64>,
    whole_run: bool,
) -> Result<()> {
    use kvm_model::versioned::{GMEM_BINDING_OVERLAP, PREFAULT_FREES_OBSOLETE_ROOTS};
    let mut applied = Vec::new();
    if profile.guest_memfd && profile.guest_memfd_slots {
        applied.push(GMEM_BINDING_OVERLAP.id);
    }
    if profile.pre_fault_memory && profile.slot_zap_all && profile.rules.prefault_frees_obsolete_roots.is(true) {
        applied.push(PREFAULT_FREES_OBSOLETE_ROOTS.id);
    }
    let counts: Vec<String> = applied.iter().map(|id| format!("{id} {}", hits.get(id).copied().unwrap_or(0))).collect();
    eprintln!(
        "model: versioned rules reached (checks): {}",
        if counts.is_empty() { "none apply".into() } else { counts.join(", ") }
    );
    let missed: Vec<&str> = applied.into_iter().filter(|id| !hits.contains_key(id)).collect();
    kvm_harness::ensure!(
        !whole_run || missed.is_empty(),
        "a whole model run reaches every versioned rule its VM applies",
        "no sequence reached {}",
        missed.join(", ")
    );
    Ok(())
}

/// Counts what the steps of a passed sequence did, by kind and outcome, so
/// a run shows what it covered, and which versioned rules decided outcomes.
fn tally_outcomes(
    profile: &Profile,
    windows: Windows,
    steps: &[Step],
    tally: &mut std::collections::BTreeMap<String, usize>,
    rule_hits: &mut std::collections::BTreeMap<&'static str, u64>,
) {
    let mut model = initial_model(profile, windows);
    for step in steps {
        if let Step::Fallocate { gmem, offset, len, .. } = *step {
            for position in bound_positions_of(&model, gmem, offset, len) {
                *tally.entry(format!("Fallocate {position} a binding")).or_insert(0) += 1;
            }
        }
        let outcome = match apply_model(&mut model, step) {
            Outcome::Call(Ok(())) => "ok".to_string(),
            Outcome::Call(Err(e)) => e.name().to_string(),
            Outcome::Guest(GuestAccess::Done(_)) => "done".to_string(),
            Outcome::Guest(GuestAccess::Mmio { .. }) => "KVM_EXIT_MMIO".to_string(),
            Outcome::Guest(GuestAccess::MemoryFault { .. }) => "KVM_EXIT_MEMORY_FAULT".to_string(),
            Outcome::Guest(GuestAccess::Unmodeled(_)) => "unmodeled".to_string(),
            Outcome::HostWrite | Outcome::HostRead(_) => "done".to_string(),
            Outcome::HostSigbus => "SIGBUS".to_string(),
            Outcome::PreFault(PreFault { result: Ok(()), size: 0, .. }) => "ok".to_string(),
            Outcome::PreFault(PreFault { result: Ok(()), .. }) => "partial".to_string(),
            Outcome::PreFault(PreFault { result: Err(e), .. }) => e.name().to_string(),
            Outcome::MapGpa { exit: Some(_), ret: 0 } => "KVM_EXIT_HYPERCALL applied".to_string(),
            Outcome::MapGpa { exit: Some(_), .. } => "KVM_EXIT_HYPERCALL refused".to_string(),
            Outcome::MapGpa { exit: None, ret } => format!("returned {}", ret as i64),
        };
        *tally.entry(format!("{} {outcome}", step.kind())).or_insert(0) += 1;
    }
    for (id, n) in model.rule_hits() {
        *rule_hits.entry(id).or_insert(0) += n;
    }
}

/// proptest's shrink loop, bounded: simplify while the sequence still
/// fails, complicate back when a simplification made it pass.
fn shrink(
    vms: &Vms,
    profile: &Profile,
    tree: &mut <Sequences as Strategy>::Tree,
    steps: Vec<Step>,
    first: Mismatch,
) -> (Vec<Step>, Mismatch, u32) {
    let mut best = (steps, first);
    let start = Instant::now();
    let mut runs = 0;
    if !tree.simplify() {
        return (best.0, best.1, runs);
    }
    while runs < MAX_SHRINK_RUNS && start.elapsed() < SHRINK_BUDGET {
        runs += 1;
        let (_, steps, seen) = tree.current();
        match run_sequence(vms, profile, &steps, seen.as_deref()) {
            Err(mismatch) => {
                best = (steps, mismatch);
                if !tree.simplify() {
                    break;
                }
            }
            Ok(()) => {
                if !tree.complicate() {
                    break;
                }
            }
        }
    }
    (best.0, best.1, runs)
}

fn on_kvm_pvm() -> bool {
    std::path::Path::new("/sys/module/kvm_pvm").exists()
}

/// Whether VMs of `vm_type` can bind a mmap-able guest_memfd to a memslot
/// (7.x, 6.18: `GUEST_MEMFD_FLAG_MMAP`); elsewhere the focused variant is
/// not a rule of the kernel and is not registered, like guest_memfd's flag
/// cases.
fn gmem_only_slots(kvm: Option<&Arc<Kvm>>, vm_type: VmType) -> bool {
    let Some(kvm) = kvm.filter(|k| k.supports(vm_type)) else { return false };
    Vm::bare(kvm, vm_type).is_ok_and(|vm| {
        vm.cap(Cap::GuestMemfdFlags) as u64 & kvm_model::GUEST_MEMFD_FLAG_MMAP != 0 && vm.cap(Cap::GuestMemfd) != 0
    })
}

fn main() -> ExitCode {
    let mut suite = Suite::new("model");
    for vm_type in VmType::ALL {
        let short = vm_type.short();
        // The model's private memory is the VM's KVM_SET_MEMORY_ATTRIBUTES
        // state; a protected VM without it (7.4's in-place conversion,
        // kvm.gmem_in_place_conversion=Y, keeps PRIVATE per guest_memfd) is
        // outside what the model covers, and skips naming the capability.
        let needs = || match vm_type {
            VmType::Default => vec![Need::VmType(vm_type)],
            VmType::SwProtected => vec![Need::VmType(vm_type), Need::VmCap(vm_type, Cap::MemoryAttributes)],
        };
        // kvm_pvm's known bug (see .ci/known-failures/kvm_pvm.txt) is left
        // to the focused test below, which that list names.
        let gmem_only = if on_kvm_pvm() { GmemOnlyAccess::Excluded } else { GmemOnlyAccess::Included };
        suite.test(format!("{short}_vm_random_sequences_match_the_model"), needs(), move |kvm| {
            explore(kvm, vm_type, gmem_only, Windows::Small)
        });
        if gmem_only_slots(suite.kvm(), vm_type) {
            suite.test(format!("{short}_vm_guest_accesses_to_gmem_only_slots_match_the_model"), needs(), move |kvm| {
                explore(kvm, vm_type, GmemOnlyAccess::Focused, Windows::Small)
            });
        }
        // Huge pages under mixed attributes need private memory: VMs
        // without it have no attributes to mix.
        if vm_type == VmType::SwProtected {
            suite.test(
                format!("{short}_vm_sequences_on_huge_page_backed_memslots_match_the_model"),
                needs(),
                move |kvm| explore(kvm, vm_type, gmem_only, Windows::Huge),
            );
        }
    }
    suite.run()
}
