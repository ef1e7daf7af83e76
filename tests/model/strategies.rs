//! Generation: the proptest strategies of the single steps, over the
//! generator's [`RefState`].

use super::*;

pub(crate) fn gpa_in_window() -> impl Strategy<Value = u64> {
    (0..WINDOW_PAGES, prop_oneof![Just(0u64), Just(8), Just(0x7f8), Just(0xff8), (0..512u64).prop_map(|w| w * 8)])
        .prop_map(|(page, offset)| WINDOW + page * P + offset)
}

/// The GPAs of a memslot's pages worth offering a step: every page of a
/// small window's memslot; of the huge window's, each region's first and
/// last two pages (its own focus picks the rest, from the attributes),
/// which keeps per-step generation from listing a thousand pages.
pub(crate) fn slot_pages(slot: &kvm_model::Slot) -> Vec<u64> {
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
pub(crate) fn guest_gpa(state: &RefState) -> BoxedStrategy<u64> {
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
pub(crate) fn guest_access(gpa: &BoxedStrategy<u64>, state: &RefState) -> BoxedStrategy<Step> {
    let (gpa, value) = (gpa.clone(), state.fixed.value.clone());
    lazy(move || {
        (gpa.clone(), any::<bool>(), value.clone())
            .prop_map(
                |(gpa, write, value)| if write { Step::GuestWrite { gpa, value } } else { Step::GuestRead { gpa } },
            )
            .boxed()
    })
}

pub(crate) fn value() -> impl Strategy<Value = u64> {
    // Some values are code a guest fetch can run (kvm_model::ret_stub).
    prop_oneof![any::<u64>(), (1..0x1_0000u64).prop_map(|v| v * 0x1_0001), any::<u32>().prop_map(kvm_model::ret_stub)]
}

pub(crate) fn create_gmem(profile: &Profile) -> SBoxedStrategy<Step> {
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
pub(crate) fn mappable_gmems(state: &RefState) -> Vec<(usize, u64)> {
    state.model.gmems().iter().enumerate().filter(|(_, g)| g.mmap()).map(|(i, g)| (i, g.size / P)).collect()
}

/// The userspace memory of an `npages` slot, chosen by the random `r`
/// (derived from a number rather than a dependent strategy: a
/// `prop_flat_map` per step reseeds an RNG, a large part of generation).
pub(crate) fn user_memory(mappable: &[(usize, u64)], npages: u64, r: u64) -> UserMemory {
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

pub(crate) fn new_region(state: &RefState) -> BoxedStrategy<Step> {
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

pub(crate) fn new_region_from(ngmem: usize, huge_offsets: bool, mappable: Vec<(usize, u64)>) -> BoxedStrategy<Step> {
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
pub(crate) fn rebinding_focus(state: &RefState) -> Option<BoxedStrategy<Step>> {
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
pub(crate) fn change_region(state: &RefState) -> Option<BoxedStrategy<Step>> {
    let slots: Vec<_> = state.model.slots().values().filter(|s| s.id != 0).cloned().collect();
    if slots.is_empty() {
        return None;
    }
    Some(lazy(move || change_region_of(slots.clone())))
}

pub(crate) fn change_region_of(slots: Vec<kvm_model::Slot>) -> BoxedStrategy<Step> {
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

pub(crate) fn set_attributes(profile: &Profile) -> SBoxedStrategy<Step> {
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
pub(crate) fn map_gpa_range() -> SBoxedStrategy<Step> {
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
pub(crate) fn vmm_attributes(gpa: u64, npages: u64, attrs: u64) -> Option<(u64, u64, u64)> {
    let private = attrs & kvm_model::KVM_MAP_GPA_RANGE_ENCRYPTED != 0;
    Some((gpa, npages.checked_mul(P)?, if private { KVM_MEMORY_ATTRIBUTE_PRIVATE } else { 0 }))
}

/// The guest's rax for an errno (the hypercall ABI: `-errno`).
pub(crate) fn hypercall_ret(result: Result<(), Errno>) -> u64 {
    result.map_or_else(|e| (-i64::from(e.raw())) as u64, |()| 0)
}

/// `KVM_PRE_FAULT_MEMORY` over up to 8 pages of the window, or with one
/// input rule broken (flags, alignment, size 0, a range that wraps).
pub(crate) fn pre_fault() -> SBoxedStrategy<Step> {
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

pub(crate) fn fallocate(state: &RefState) -> Option<BoxedStrategy<Step>> {
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
pub(crate) fn bound_fallocate_focus(state: &RefState) -> Option<BoxedStrategy<Step>> {
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
pub(crate) const BOUND_POSITIONS: u32 = 11;

/// The page range `[first, end)` at `position` relative to the bound page
/// range `[start, stop)`, `n` pages wide where the position leaves the
/// width free. Ranges are clamped at page 0, so near it some collapse into
/// their neighbours (or become empty, which the kernel must refuse).
pub(crate) fn bound_position(start: u64, stop: u64, position: u32, n: u64) -> (u64, u64) {
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
pub(crate) fn bound_positions_of(model: &Model, gmem: usize, offset: u64, len: u64) -> Vec<&'static str> {
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
pub(crate) fn host_write(state: &RefState) -> BoxedStrategy<Step> {
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
pub(crate) fn released_focus(state: &RefState) -> Option<BoxedStrategy<Step>> {
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
pub(crate) fn vm_close_focus(state: &RefState) -> Option<BoxedStrategy<Step>> {
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
pub(crate) fn host_read(state: &RefState) -> Option<BoxedStrategy<Step>> {
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
pub(crate) fn gmem_only_focus(state: &RefState) -> Option<BoxedStrategy<Step>> {
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
