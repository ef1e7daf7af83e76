//! Rules whose outcome changed upstream: the one place the outcome before
//! and after, the upstream change and the commits that carry it (stable
//! backports included) are written down. Which outcome a kernel gets is
//! decided from evidence that it carries the change ([`crate::decide`]),
//! never from the code under test; the model reads the decisions through
//! its [`crate::Profile`], the harness (`kvm_harness::kernel_rules`) for
//! the named tests.

use std::fmt;

use crate::decide::{Decision, KernelFacts};
use crate::{Errno, GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP};

/// A kernel release, `MAJOR.MINOR.PATCH`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct KernelVersion {
    /// `7` in 7.3.4.
    pub major: u32,
    /// `3` in 7.3.4.
    pub minor: u32,
    /// `4` in 7.3.4; 0 when the release names none.
    pub patch: u32,
}

impl KernelVersion {
    /// The `since` of a fix no mainline release carries yet: only a
    /// kernel's history can show it.
    pub const UNRELEASED: KernelVersion = KernelVersion { major: u32::MAX, minor: 0, patch: 0 };

    /// `MAJOR.MINOR`, the first release of a mainline cycle.
    pub const fn new(major: u32, minor: u32) -> Self {
        KernelVersion { major, minor, patch: 0 }
    }

    /// Parses the numeric prefix of a release string (`uname -r`):
    /// `6.12.117-amd64`, `7.3.4`, `6.18.0-rc2+`.
    pub fn parse(release: &str) -> Option<Self> {
        let numeric: String = release.chars().take_while(|c| c.is_ascii_digit() || *c == '.').collect();
        let mut parts = numeric.split('.').map(str::parse::<u32>);
        let major = parts.next()?.ok()?;
        let minor = parts.next()?.ok()?;
        let patch = parts.next().and_then(|p| p.ok()).unwrap_or(0);
        Some(KernelVersion { major, minor, patch })
    }
}

impl fmt::Display for KernelVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// An upstream commit, named as `git log --oneline` would.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Commit {
    /// Abbreviated SHA-1 of the mainline commit; empty where it could not
    /// be confirmed (the subject still finds it with `git log`).
    pub sha: &'static str,
    /// Its subject line, as `git log` and distribution changelogs print it.
    pub subject: &'static str,
}

impl fmt::Display for Commit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.sha {
            "" => write!(f, "\"{}\"", self.subject),
            sha => write!(f, "{sha} (\"{}\")", self.subject),
        }
    }
}

/// A rule whose outcome changed upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Versioned<T: 'static> {
    /// The rule's name in settings and tables (`gmem-binding-overlap`).
    pub id: &'static str,
    /// What the outcome is of, in words.
    pub summary: &'static str,
    /// The outcome without the change.
    pub before: T,
    /// The outcome with it.
    pub after: T,
    /// The first mainline release with `after`.
    pub since: KernelVersion,
    /// The mainline change that brought `after`.
    pub change: Commit,
    /// Other commits whose presence brings `after` as well: the series the
    /// change belongs to, and the subjects stable kernels backported
    /// instead of `change` itself.
    pub carried_by: &'static [Commit],
}

/// The outcome a check applies, with the reason it applies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expectation<T> {
    /// What the kernel must do; `None` when nothing decides between the
    /// rule's two outcomes (then either is accepted, the same in every check
    /// of the run).
    pub outcome: Option<T>,
    /// Which outcome this is and why, for failure messages.
    pub why: String,
}

impl<T: Copy + fmt::Debug + PartialEq> Versioned<T> {
    /// The change and every commit that carries it.
    pub fn commits(&self) -> impl Iterator<Item = &Commit> {
        std::iter::once(&self.change).chain(self.carried_by)
    }

    /// Reads an explicit setting: `before`, `after`, or either outcome as
    /// printed (`EEXIST`, `true`, `0x3`).
    pub fn parse_setting(&self, value: &str) -> Option<T> {
        let value = value.trim();
        let named = |t: T| format!("{t:?}").eq_ignore_ascii_case(value);
        match value {
            "before" => Some(self.before),
            "after" => Some(self.after),
            _ if named(self.before) => Some(self.before),
            _ if named(self.after) => Some(self.after),
            _ => None,
        }
    }

    /// The outcome on the kernel `facts` describes, and what decided it.
    pub fn decide(&self, facts: &KernelFacts) -> Result<Decision<T>, String> {
        facts.decide(self)
    }

    /// [`Self::decide`] as the expectation a failure message quotes.
    pub fn expectation(&self, facts: &KernelFacts) -> Result<Expectation<T>, String> {
        let decision = self.decide(facts)?;
        let why = match decision.outcome {
            Some(outcome) => format!("expected {outcome:?} ({}) because {}", self.id, decision.why),
            None => format!("{} ({}) is undecided: {}", self.summary, self.id, decision.why),
        };
        Ok(Expectation { outcome: decision.outcome, why })
    }
}

/// A versioned rule with its outcome type erased: for the decision table,
/// the settings check and the history queries.
pub trait Rule: Sync {
    /// [`Versioned::id`].
    fn id(&self) -> &'static str;
    /// [`Versioned::summary`].
    fn summary(&self) -> &'static str;
    /// [`Versioned::commits`].
    fn evidence(&self) -> Vec<Commit>;
    /// Whether `value` is a valid setting of this rule.
    fn accepts(&self, value: &str) -> bool;
    /// The decided outcome in words (`EEXIST`, `EINVAL or EEXIST`) and why.
    fn describe(&self, facts: &KernelFacts) -> Result<(String, String), String>;
}

impl<T: Copy + fmt::Debug + PartialEq + Sync> Rule for Versioned<T> {
    fn id(&self) -> &'static str {
        self.id
    }

    fn summary(&self) -> &'static str {
        self.summary
    }

    fn evidence(&self) -> Vec<Commit> {
        self.commits().copied().collect()
    }

    fn accepts(&self, value: &str) -> bool {
        self.parse_setting(value).is_some()
    }

    fn describe(&self, facts: &KernelFacts) -> Result<(String, String), String> {
        let decision = self.decide(facts)?;
        let outcome = match decision.outcome {
            Some(t) => format!("{t:?}"),
            None => format!("{:?} or {:?} (the same in every check)", self.before, self.after),
        };
        Ok((outcome, decision.why))
    }
}

/// A 64-bit value shown in hex in expectations (flag masks).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Hex(pub u64);

impl fmt::Debug for Hex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

/// Binding a guest_memfd range that another memslot already binds, with the
/// GPA ranges disjoint: 6.12's `kvm_gmem_bind()` failed it with its
/// catch-all `-EINVAL`; once bindings are established after the memslot is
/// ready, the check lives in `kvm_gmem_commit_memory_region()`, which
/// returns `-EEXIST`, as for overlapping GPA ranges. Mainline got it in 7.2;
/// the binding rework (kvm-x86 SHAs of the 7.4 cycle) was backported to
/// 7.3.2 and 6.12.118, whose Debian changelogs list its subjects, not
/// 7ea987a90585.
pub const GMEM_BINDING_OVERLAP: Versioned<Errno> = Versioned {
    id: "gmem-binding-overlap",
    summary: "errno of binding a guest_memfd range another memslot binds",
    before: Errno::EINVAL,
    after: Errno::EEXIST,
    since: KernelVersion::new(7, 2),
    change: Commit { sha: "7ea987a90585", subject: "KVM: guest_memfd: Return -EEXIST for overlapping bindings" },
    carried_by: &[
        Commit {
            sha: "3fe5d2944e5a",
            subject: "KVM: guest_memfd: Establish memslot<=>guest_memfd bindings *after* memslot is ready",
        },
        Commit { sha: "83411f32b8ad", subject: "KVM: guest_memfd: Split bind() into prepare()+commit() phases" },
    ],
};

/// Whether `KVM_PRE_FAULT_MEMORY` makes progress on a vCPU whose MMU root a
/// memslot delete or move made obsolete (default VMs zap every root) before
/// the vCPU ran again. Without the change kvm_mmu_reload() reloads only an
/// invalid root, the fault finds the root obsolete (is_page_fault_stale())
/// and kvm_tdp_map_page() retries RET_PF_RETRY until a signal; with it
/// kvm_mmu_reload() frees obsolete roots first.
pub const PREFAULT_FREES_OBSOLETE_ROOTS: Versioned<bool> = Versioned {
    id: "prefault-frees-obsolete-roots",
    summary: "KVM_PRE_FAULT_MEMORY maps on a root a memslot delete made obsolete",
    before: false,
    after: true,
    since: KernelVersion::new(6, 15),
    change: Commit { sha: "20a6cff3b283", subject: "KVM: x86/mmu: Check and free obsolete roots in kvm_mmu_reload()" },
    carried_by: &[],
};

/// Whether a binding's guest_memfd offset plus size is compared as an
/// unsigned value, so that a sum past 2^63 is refused (EINVAL) rather than
/// going negative and passing the "ends inside the file" check (6.13 to
/// 7.1). The model generates such offsets only where this is decided true.
pub const GMEM_BINDING_OFFSETS_UNSIGNED: Versioned<bool> = Versioned {
    id: "gmem-binding-offsets-unsigned",
    summary: "a guest_memfd binding's offset + size is checked as an unsigned sum",
    before: false,
    after: true,
    since: KernelVersion::new(7, 2),
    change: Commit {
        sha: "eba85fee7fc6",
        subject: "KVM: guest_memfd: Treat memslot binding offset+size as unsigned values",
    },
    carried_by: &[],
};

/// `KVM_CAP_GUEST_MEMFD_FLAGS` on `/dev/kvm` and on a VM without private
/// memory (default VM): `kvm_gmem_get_supported_flags()` offers MMAP, and
/// INIT_SHARED where `kvm_arch_supports_gmem_init_shared()`, which x86
/// grants every VM without private memory. Without the change the
/// capability does not exist and reads 0.
pub const GMEM_FLAGS_WITHOUT_PRIVATE_MEM: Versioned<Hex> = Versioned {
    id: "gmem-flags-shared-vm",
    summary: "KVM_CAP_GUEST_MEMFD_FLAGS of /dev/kvm and a default VM",
    before: Hex(0),
    after: Hex(GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED),
    since: KernelVersion::new(6, 18),
    change: INIT_SHARED_FLAG,
    carried_by: &[],
};

/// `KVM_CAP_GUEST_MEMFD_FLAGS` on a VM with private memory
/// (`KVM_X86_SW_PROTECTED_VM`): MMAP only, its memory starts private.
pub const GMEM_FLAGS_WITH_PRIVATE_MEM: Versioned<Hex> = Versioned {
    id: "gmem-flags-protected-vm",
    summary: "KVM_CAP_GUEST_MEMFD_FLAGS of a KVM_X86_SW_PROTECTED_VM",
    before: Hex(0),
    after: Hex(GUEST_MEMFD_FLAG_MMAP),
    since: KernelVersion::new(6, 18),
    change: INIT_SHARED_FLAG,
    carried_by: &[],
};

/// Whether `KVM_EXIT_HYPERCALL` carries `hypercall.ret` = 0. The field is
/// the VMM's answer, which `complete_hypercall_exit()` hands the guest in
/// rax; QEMU up to 9.2 never writes it and relies on it being 0 at the
/// exit. Without the change KVM does not touch it, so the exit shows
/// whatever the union held before `KVM_RUN` (the VMM's previous answer, or
/// bytes of an earlier exit); with it `____kvm_emulate_hypercall()` zeroes
/// it before exiting. Mainline: the kvm/next of December 2024, merged for
/// 6.14 (the release is from that merge, not checked against a tag; it
/// decides nothing for 6.12.118, whose changelog lists none of it, nor for
/// 7.3).
pub const HYPERCALL_EXIT_ZEROES_RET: Versioned<bool> = Versioned {
    id: "hypercall-exit-zeroes-ret",
    summary: "KVM_EXIT_HYPERCALL sets hypercall.ret to 0 (else it keeps what the union held before KVM_RUN)",
    before: false,
    after: true,
    since: KernelVersion::new(6, 14),
    change: Commit {
        sha: "9a1dfeff4414",
        subject: "KVM: x86: clear vcpu->run->hypercall.ret before exiting for KVM_EXIT_HYPERCALL",
    },
    carried_by: &[],
};

const INIT_SHARED_FLAG: Commit = Commit {
    sha: "fe2bf6234e94",
    subject: "KVM: guest_memfd: Add INIT_SHARED flag, reject user page faults if not set",
};

/// Whether a private access whose GFN has a stale MMIO SPTE is a private
/// fault. Without the fix, kvm_mmu_page_fault() never marks a reserved-bit
/// fault PFERR_PRIVATE_ACCESS ("emulated MMIO is shared-only"); when
/// handle_mmio_page_fault() finds the SPTE stale, the fault takes the full
/// path as a shared one and kvm_mmu_faultin_pfn() exits
/// KVM_EXIT_MEMORY_FAULT with flags 0, even where guest_memfd backs the
/// GFN (findings/stale-mmio-spte). No mainline release has the fix, so
/// only a history that names it (a tree carrying it, `--patch`) decides
/// `true`.
pub const STALE_MMIO_PRIVATE_FAULTS: Versioned<bool> = Versioned {
    id: "stale-mmio-private-faults",
    summary: "a private access over a stale MMIO SPTE faults as private",
    before: false,
    after: true,
    since: KernelVersion::UNRELEASED,
    change: Commit { sha: "", subject: "KVM: x86/mmu: Don't treat private faults on stale MMIO SPTEs as shared" },
    carried_by: &[],
};

/// Every versioned rule: settings name them, runs print their decisions.
pub const ALL: &[&dyn Rule] = &[
    &STALE_MMIO_PRIVATE_FAULTS,
    &GMEM_BINDING_OVERLAP,
    &PREFAULT_FREES_OBSOLETE_ROOTS,
    &GMEM_BINDING_OFFSETS_UNSIGNED,
    &GMEM_FLAGS_WITHOUT_PRIVATE_MEM,
    &GMEM_FLAGS_WITH_PRIVATE_MEM,
    &HYPERCALL_EXIT_ZEROES_RET,
];
