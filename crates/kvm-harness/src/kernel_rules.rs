//! Rules whose outcome changed upstream, and upstream fixes a failure may
//! point at.
//!
//! A test never accepts "either errno": it asks [`Versioned::expected`] for
//! the outcome of the running kernel, which names the kernel release it went
//! by and the upstream change behind it, and it says which one it applied in
//! its failure message. The release comes from `uname -r`, or from
//! `KVM_SELFTESTS_KERNEL_VERSION` for a distribution kernel that carries
//! backports (its own release number would pick the wrong outcome).

use std::fmt;
use std::sync::OnceLock;

// The version-rule data lives in kvm-model, the one place both the model
// and the named tests read it from.
pub use kvm_model::versioned::{Commit, Expectation, KernelVersion, Versioned, GMEM_BINDING_OVERLAP};

use crate::error::{Error, Result, SysResult};
use crate::uapi;

/// Overrides the release read from `uname -r`, as `MAJOR.MINOR[.PATCH]`.
pub const VERSION_VAR: &str = "KVM_SELFTESTS_KERNEL_VERSION";

/// The running kernel's release and where it was read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunningKernel {
    /// The release the expectations go by.
    pub version: KernelVersion,
    /// `uname -r = 6.12.117-amd64` or `KVM_SELFTESTS_KERNEL_VERSION = 7.2`.
    pub source: String,
}

impl RunningKernel {
    fn detect() -> Result<Self> {
        if let Ok(value) = std::env::var(VERSION_VAR) {
            let version = KernelVersion::parse(value.trim()).ok_or_else(|| {
                Error::Config(format!("{VERSION_VAR} must be a kernel release like 7.2 or 6.12.117 (got `{value}`)"))
            })?;
            return Ok(RunningKernel { version, source: format!("{VERSION_VAR} = {}", value.trim()) });
        }
        let uname = nix::sys::utsname::uname().sys(|| "uname() for the kernel release".into())?;
        let release = uname.release().to_string_lossy().into_owned();
        let version = KernelVersion::parse(&release)
            .ok_or_else(|| Error::Config(format!("uname -r = `{release}` is no kernel release; set {VERSION_VAR}")))?;
        Ok(RunningKernel { version, source: format!("uname -r = {release}") })
    }
}

/// The running kernel, read once per process.
pub fn running_kernel() -> Result<&'static RunningKernel> {
    static RUNNING: OnceLock<std::result::Result<RunningKernel, String>> = OnceLock::new();
    RUNNING
        .get_or_init(|| {
            RunningKernel::detect().map_err(|e| match e {
                Error::Config(message) => message,
                other => other.to_string(),
            })
        })
        .as_ref()
        .map_err(|message| Error::Config(message.clone()))
}

/// A rule's outcome for the running kernel.
pub trait ForRunningKernel<T> {
    /// The outcome for the running kernel, with the reason.
    fn expected(&self) -> Result<Expectation<T>>;
}

impl<T: Copy + fmt::Debug> ForRunningKernel<T> for Versioned<T> {
    fn expected(&self) -> Result<Expectation<T>> {
        let kernel = running_kernel()?;
        Ok(self.expected_for(kernel.version, &kernel.source))
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

/// `KVM_CAP_GUEST_MEMFD_FLAGS` on `/dev/kvm` and on a VM without private
/// memory (default VM): `kvm_gmem_get_supported_flags()` offers MMAP, and
/// INIT_SHARED where `kvm_arch_supports_gmem_init_shared()`, which x86
/// grants every VM without private memory. Before 6.18 the capability does
/// not exist and reads 0.
pub const GMEM_FLAGS_WITHOUT_PRIVATE_MEM: Versioned<Hex> = Versioned {
    before: Hex(0),
    after: Hex(uapi::GUEST_MEMFD_FLAG_MMAP | uapi::GUEST_MEMFD_FLAG_INIT_SHARED),
    since: KernelVersion::new(6, 18),
    change: INIT_SHARED_FLAG,
};

/// `KVM_CAP_GUEST_MEMFD_FLAGS` on a VM with private memory
/// (`KVM_X86_SW_PROTECTED_VM`): MMAP only, its memory starts private.
pub const GMEM_FLAGS_WITH_PRIVATE_MEM: Versioned<Hex> = Versioned {
    before: Hex(0),
    after: Hex(uapi::GUEST_MEMFD_FLAG_MMAP),
    since: KernelVersion::new(6, 18),
    change: INIT_SHARED_FLAG,
};

const INIT_SHARED_FLAG: Commit = Commit {
    sha: "fe2bf6234e94",
    subject: "KVM: guest_memfd: Add INIT_SHARED flag, reject user page faults if not set",
};

/// An upstream fix whose absence explains a known failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fix {
    /// The fixing commit.
    pub commit: Commit,
    /// The first mainline release that has it.
    pub mainline: KernelVersion,
}

/// The fixes that make `KVM_PRE_FAULT_MEMORY` return instead of spinning
/// while its memslot is deleted or moved. Both reached mainline through the
/// kvm-x86 MMU pull for 6.18; neither is in Debian's 6.12.117.
pub const PREFAULT_VS_MEMSLOT_DELETION: &[Fix] = &[
    Fix {
        commit: kvm_model::versioned::PREFAULT_FREES_OBSOLETE_ROOTS.change,
        mainline: kvm_model::versioned::PREFAULT_FREES_OBSOLETE_ROOTS.since,
    },
    Fix {
        commit: Commit {
            sha: "3ccbf6f47098",
            subject: "KVM: x86/mmu: Return -EAGAIN if userspace deletes/moves memslot during prefault",
        },
        mainline: KernelVersion::new(6, 18),
    },
];

/// The fix for bindings whose guest_memfd offset plus size crosses 2^63:
/// compared as signed file offsets, the sum went negative and passed the
/// "ends inside the file" check, so KVM accepted a binding far past the end
/// of the guest_memfd (seen on 6.18). 6.12 compared them unsigned.
pub const GMEM_BINDING_OFFSET_SIGNEDNESS: &[Fix] = &[Fix {
    commit: Commit {
        sha: "eba85fee7fc6",
        subject: "KVM: guest_memfd: Treat memslot binding offset+size as unsigned values",
    },
    mainline: KernelVersion::new(7, 2),
}];

/// The series that makes KVM report event delivery it cannot emulate (the
/// IDT or another descriptor table in emulated MMIO) as
/// `KVM_EXIT_INTERNAL_ERROR` / `KVM_INTERNAL_ERROR_DELIVERY_EV`. Before it,
/// SVM emulated the faulting instruction again and re-injected the
/// exception, forever. The mainline SHAs are not confirmed here; the
/// subjects find them with `git log`.
pub const EVENT_VECTORING_MMIO: &[Fix] = &[
    Fix {
        commit: Commit { sha: "", subject: "KVM: x86: Add emulation status for unhandleable vectoring" },
        mainline: KernelVersion::new(6, 14),
    },
    Fix {
        commit: Commit { sha: "", subject: "KVM: SVM: Handle event vectoring error in check_emulate_instruction()" },
        mainline: KernelVersion::new(6, 14),
    },
];

/// Run a test body; if it fails on a kernel older than a fix's mainline
/// release, append "this kernel may lack upstream fix ..." for each such fix
/// (LTP's `linux-git` tags). A pass is never touched.
pub fn with_fix_hints(fixes: &[Fix], body: impl FnOnce() -> Result<()>) -> Result<()> {
    let result = body();
    let Err(err) = result else {
        return result;
    };
    let hints = hints_for(fixes, running_kernel().ok());
    if hints.is_empty() {
        return Err(err);
    }
    Err(Error::Hinted { error: Box::new(err), hints })
}

/// The hint lines for a failure on `kernel` (all of them when the release
/// is unknown).
fn hints_for(fixes: &[Fix], kernel: Option<&RunningKernel>) -> Vec<String> {
    fixes
        .iter()
        .filter(|f| kernel.is_none_or(|k| k.version < f.mainline))
        .map(|f| {
            format!(
                "this kernel may lack upstream fix {} (mainline {}.{})",
                f.commit, f.mainline.major, f.mainline.minor
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use kvm_model::Errno;

    use super::*;

    fn kernel(release: &str) -> RunningKernel {
        RunningKernel { version: KernelVersion::parse(release).unwrap(), source: format!("uname -r = {release}") }
    }

    #[test]
    fn releases_parse_from_uname_strings() {
        assert_eq!(KernelVersion::parse("6.12.117-amd64"), Some(KernelVersion { major: 6, minor: 12, patch: 117 }));
        assert_eq!(KernelVersion::parse("7.3.4"), Some(KernelVersion { major: 7, minor: 3, patch: 4 }));
        assert_eq!(KernelVersion::parse("6.18.0-rc2+"), Some(KernelVersion::new(6, 18)));
        assert_eq!(KernelVersion::parse("7.2"), Some(KernelVersion::new(7, 2)));
        assert_eq!(KernelVersion::parse("6.18.44-fc-v595"), Some(KernelVersion { major: 6, minor: 18, patch: 44 }));
        for bad in ["", "7", "x7.2", "-7.2", "7..2"] {
            assert_eq!(KernelVersion::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn fix_hints_name_only_fixes_newer_than_the_kernel() {
        let old = hints_for(PREFAULT_VS_MEMSLOT_DELETION, Some(&kernel("6.12.117-amd64")));
        assert_eq!(old.len(), 2);
        assert_eq!(
            old[1],
            "this kernel may lack upstream fix 3ccbf6f47098 (\"KVM: x86/mmu: Return -EAGAIN if userspace \
             deletes/moves memslot during prefault\") (mainline 6.18)"
        );
        assert!(hints_for(PREFAULT_VS_MEMSLOT_DELETION, Some(&kernel("7.3.4"))).is_empty());
        assert_eq!(hints_for(PREFAULT_VS_MEMSLOT_DELETION, None).len(), 2);
    }

    #[test]
    fn each_kernel_gets_its_own_outcome_and_the_reason() {
        let at = |k: RunningKernel| GMEM_BINDING_OVERLAP.expected_for(k.version, &k.source);
        let old = at(kernel("6.12.117-amd64"));
        assert_eq!(old.outcome, Errno::EINVAL);
        assert!(old.why.starts_with("expected EINVAL because uname -r = 6.12.117-amd64 is before 7.2"), "{}", old.why);
        let first = at(kernel("7.2"));
        assert_eq!(first.outcome, Errno::EEXIST);
        let new = at(kernel("7.3.4"));
        assert_eq!(new.outcome, Errno::EEXIST);
        assert!(new.why.contains("is since 7.2, which changed it from EINVAL to EEXIST with"), "{}", new.why);
    }
}
