//! Generation: which steps may follow a state ([`transitions`]) and which
//! are valid in it ([`preconditions`]).

use super::*;

pub(crate) fn transitions(state: &RefState) -> BoxedStrategy<Step> {
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
pub(crate) fn lazy<T: fmt::Debug + 'static>(build: impl Fn() -> BoxedStrategy<T> + 'static) -> BoxedStrategy<T> {
    Lazy(build).boxed()
}

pub(crate) struct Lazy<F>(pub(crate) F);

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
pub(crate) struct Pick<T>(pub(crate) Vec<(u32, BoxedStrategy<T>)>);

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
pub(crate) fn preconditions(state: &RefState, step: &Step) -> bool {
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
    if state.vm_closed && step.needs_vm_fd() {
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
