//! Generation in the huge window: ranges that start and end at every
//! class of offset inside the two 2 MiB regions.

use super::*;

/// A range of the huge window, in pages: starts and ends at every class of
/// offset inside a 2 MiB region (aligned, first page, mid, last page, the
/// region's end) and spans both regions.
pub(crate) fn huge_range() -> impl Strategy<Value = (u64, u64)> {
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
pub(crate) fn huge_boundaries(model: &Model) -> Vec<u64> {
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
pub(crate) fn huge_focus(state: &RefState) -> Option<BoxedStrategy<Step>> {
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
pub(crate) fn huge_fixed(profile: &Profile) -> HugeFixed {
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
