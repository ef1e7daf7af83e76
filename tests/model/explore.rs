//! Exploration: the profile of the running kernel, the sequences, the
//! cases run under a time budget, and what a whole run must have reached.

use super::*;

/// The VM's rule profile: the running kernel's version and what a fresh VM
/// of `vm_type` reports.
pub(crate) fn probe_profile(kvm: &Arc<Kvm>, vm_type: VmType) -> Result<Profile> {
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
pub(crate) fn case_seed(base: u64, case: u32) -> u64 {
    if case == 0 {
        return base;
    }
    // splitmix64 of base + case.
    let mut z = base.wrapping_add(u64::from(case).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

pub(crate) fn rng(seed: u64) -> TestRng {
    let mut bytes = [0u8; 32];
    for (i, chunk) in bytes.chunks_exact_mut(8).enumerate() {
        chunk.copy_from_slice(&case_seed(seed, i as u32 + 1).to_le_bytes());
    }
    TestRng::from_seed(RngAlgorithm::ChaCha, &bytes)
}

pub(crate) type Sequences = Sequential<RefState, Step, BoxedStrategy<RefState>, BoxedStrategy<Step>>;

pub(crate) fn sequences(profile: &Profile, gmem_only: GmemOnlyAccess, windows: Windows) -> Sequences {
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

/// The huge window's sequences for `small` in the small window: a third
/// (each costs about three times as much), and at least one, so that
/// `KVM_SELFTESTS_MODEL_CASES=1` reruns the first case of every test.
pub(crate) fn huge_cases(small: u32) -> u32 {
    (small / 3).max(1)
}

/// Runs the configured number of random sequences on VMs of `vm_type`; on
/// a mismatch, shrinks it and fails with the reproducer.
pub(crate) fn explore(kvm: &Arc<Kvm>, vm_type: VmType, gmem_only: GmemOnlyAccess, windows: Windows) -> Result<()> {
    let profile = probe_profile(kvm, vm_type)?;
    let base = settings::u64_opt(SEED_ENV)?.unwrap_or(DEFAULT_SEED);
    let small_cases = match settings::u64_opt(CASES_ENV)? {
        None => DEFAULT_CASES,
        Some(n) if (1..=u64::from(u32::MAX)).contains(&n) => n as u32,
        Some(n) => return Err(Error::Config(format!("{CASES_ENV}={n}: expected at least 1"))),
    };
    let in_window = |small: u32| match windows {
        Windows::Small => small,
        Windows::Huge => huge_cases(small),
    };
    let (default_cases, cases) = (in_window(DEFAULT_CASES), in_window(small_cases));
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
            .map_err(|e| Error::Misuse(format!("generating case {case}: {e}")))?;
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
        threads::join_spawned(helper, "VM helper thread")?;
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
pub(crate) struct Resources {
    pub(crate) fds: usize,
    pub(crate) rss_kib: u64,
}

impl Resources {
    pub(crate) fn now() -> Result<Self> {
        // stat() of /proc/self/fd counts the open fds (since 6.2) without
        // taking a reference to any file. Listing the directory takes one
        // on each in turn, and a file a concurrent test closes meanwhile
        // would then be released when this thread returns to user space,
        // not at that test's close, where its model expects it.
        let dir = std::fs::metadata("/proc/self/fd").sys(|| "stat(/proc/self/fd)".into())?;
        let fds = match dir.len() {
            // Before 6.2 the size is 0 (this process has fds open, /dev/kvm
            // at least); such kernels have no guest_memfd to close.
            0 => std::fs::read_dir("/proc/self/fd").sys(|| "opendir(/proc/self/fd)".into())?.count(),
            n => n as usize,
        };
        let status = std::fs::read_to_string("/proc/self/status").sys(|| "read(/proc/self/status)".into())?;
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
pub(crate) fn expect_rules_reached(
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
pub(crate) fn tally_outcomes(
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
