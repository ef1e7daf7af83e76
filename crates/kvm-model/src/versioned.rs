//! Rules whose outcome changed in one mainline release: the one place the
//! release, the outcome before and after, and the upstream change are
//! written down. The model applies them by its [`crate::Profile`]'s
//! version; the harness (`kvm_harness::kernel_rules`) applies the same
//! data to the running kernel and names them in its failure messages.

use std::cmp::Ordering;
use std::fmt;

use crate::Errno;

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
    /// Its subject line.
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

/// A rule whose outcome changed in one mainline release.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Versioned<T: 'static> {
    /// The outcome before `since`.
    pub before: T,
    /// The outcome from `since` on.
    pub after: T,
    /// The first mainline release with `after`.
    pub since: KernelVersion,
    /// The change that brought `after`.
    pub change: Commit,
}

/// The outcome a check applies, with the reason it applies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expectation<T> {
    /// What the kernel must do.
    pub outcome: T,
    /// Which of the rule's outcomes this is, and why: for failure messages.
    pub why: String,
}

impl<T: Copy + fmt::Debug> Versioned<T> {
    /// The outcome on a kernel of release `version`.
    pub fn outcome(&self, version: KernelVersion) -> T {
        if version < self.since {
            self.before
        } else {
            self.after
        }
    }

    /// The outcome on `version`, with the reason; `source` says where the
    /// release was read (`uname -r = 7.3.4`).
    pub fn expected_for(&self, version: KernelVersion, source: &str) -> Expectation<T> {
        let (outcome, relation) = match version.cmp(&self.since) {
            Ordering::Less => (self.before, "before"),
            Ordering::Equal | Ordering::Greater => (self.after, "since"),
        };
        let why = format!(
            "expected {outcome:?} because {source} is {relation} {}.{}, which changed it from {:?} to {:?} with {}",
            self.since.major, self.since.minor, self.before, self.after, self.change
        );
        Expectation { outcome, why }
    }
}

/// Binding a guest_memfd range that another memslot already binds, with the
/// GPA ranges disjoint: 6.12's `kvm_gmem_bind()` failed it with its
/// catch-all `-EINVAL`; since 7.2 the check lives in
/// `kvm_gmem_commit_memory_region()`, which returns `-EEXIST`, as for
/// overlapping GPA ranges.
pub const GMEM_BINDING_OVERLAP: Versioned<Errno> = Versioned {
    before: Errno::EINVAL,
    after: Errno::EEXIST,
    since: KernelVersion::new(7, 2),
    change: Commit { sha: "7ea987a90585", subject: "KVM: guest_memfd: Return -EEXIST for overlapping bindings" },
};

/// Whether `KVM_PRE_FAULT_MEMORY` makes progress on a vCPU whose MMU root a
/// memslot delete or move made obsolete (default VMs zap every root) before
/// the vCPU ran again. Before 6.18 kvm_mmu_reload() reloads only an invalid
/// root, the fault finds the root obsolete (is_page_fault_stale()) and
/// kvm_tdp_map_page() retries RET_PF_RETRY until a signal; from 6.18 it
/// frees obsolete roots first.
pub const PREFAULT_FREES_OBSOLETE_ROOTS: Versioned<bool> = Versioned {
    before: false,
    after: true,
    since: KernelVersion::new(6, 18),
    change: Commit { sha: "20a6cff3b283", subject: "KVM: x86/mmu: Check and free obsolete roots in kvm_mmu_reload()" },
};
