//! Every way an xtask command can fail, each naming what was wrong.

use std::io;
use std::path::PathBuf;
use std::process::ExitStatus;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}\n\nRun `cargo xtask help` for usage.")]
    Usage(String),

    #[error("{0}")]
    Config(String),

    #[error("cannot run `{cmd}`: {source}")]
    Spawn { cmd: String, source: io::Error },

    #[error("`{cmd}` failed ({status})")]
    CommandFailed { cmd: String, status: ExitStatus },

    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },

    #[error("missing host prerequisites: {missing}; install them with `apt-get install {packages}` (as root)")]
    MissingTools { missing: String, packages: String },

    #[error("{} is not a kernel source tree (no Makefile and Kconfig)", .0.display())]
    NotAKernelTree(PathBuf),

    #[error(
        "required kernel options did not stick in {}: {}",
        config.display(),
        options.join(", ")
    )]
    ConfigNotApplied { config: PathBuf, options: Vec<String> },

    #[error(
        "the kernel tree cannot be configured for the suite: its Kconfig defines none of {} \
         (a tree from before guest_memfd and software-protected VMs, 6.8, is untestable)",
        .0.join(", ")
    )]
    TreeLacksOptions(Vec<String>),

    #[error("patch {}: {reason}", .path.display())]
    BadPatch { path: PathBuf, reason: String },

    #[error(
        "patch {} does not apply to {tree}{}:\n  {}",
        .patch.display(),
        match .applied_before {
            0 => String::new(),
            1 => " (after 1 patch that applied)".to_string(),
            n => format!(" (after {n} patches that applied)"),
        },
        .failures.join("\n  ")
    )]
    PatchDoesNotApply { patch: PathBuf, tree: String, applied_before: usize, failures: Vec<String> },

    #[error("findings: {0}")]
    Findings(String),

    #[error("coverage: {0}")]
    Coverage(String),

    #[error("Debian kernel source: {0}")]
    Debian(String),

    #[error("kernel build failed ({status}); last output:\n{tail}")]
    KernelBuild { status: ExitStatus, tail: String },

    #[error("kernel image {} does not exist", .0.display())]
    NoKernelImage(PathBuf),

    #[error("cargo reported no integration-test executables, or no guest_probe, for package `kvm-selftests`")]
    NoTestBinaries,

    #[error("test executable {} does not exist", .0.display())]
    NoSuchTestBinary(PathBuf),

    #[error("guest did not reach init within {0} s (kernel hung or failed to mount the 9p root)")]
    BootTimeout(u64),

    #[error("guest run exceeded {0} s before its first test; QEMU was killed")]
    RunTimeout(u64),

    #[error("guest kernel panicked{}", if *.during_tests { " while running tests" } else { " during boot" })]
    KernelPanic { during_tests: bool },

    #[error("QEMU exited ({status}) before the guest finished{}", if *.booted { "" } else { " booting" })]
    QemuExited { status: ExitStatus, booted: bool },

    #[error("guest kernel has no /dev/kvm (is CONFIG_KVM/KVM_AMD built in and does the vCPU model have SVM/VMX?)")]
    GuestNoKvm,

    #[error("guest KVM lacks a required feature: {0}")]
    GuestMissingFeature(String),

    #[error("guest could not mount the results share or set up its environment: {0}")]
    GuestSetup(String),

    #[error("{}:{line}: malformed result record: {source}", path.display())]
    BadResult { path: PathBuf, line: usize, source: serde_json::Error },

    #[error("no tests ran (does the filter match any test?)")]
    NoTestsRan,

    #[error("upstream C selftests: {0}")]
    Upstream(String),

    #[error("bisect demo: {0}")]
    Demo(String),
}

impl Error {
    /// Whether the failure is the kernel's (it does not build, boot or offer
    /// the features under test) rather than the host's or the user's: the
    /// distinction `git bisect run` needs between "skip" and "abort". A
    /// directory that is no kernel tree at all is the user's mistake, and
    /// so is a recipe whose options the tree defines but does not accept
    /// (the recipe needs fixing, which no bisection step can do). A guest
    /// that dies after its first test started is no error but a failed
    /// test (see `vm::judge`): these are kernels that never got that far.
    pub fn is_kernel_fault(&self) -> bool {
        matches!(
            self,
            Error::TreeLacksOptions(_)
                | Error::KernelBuild { .. }
                | Error::NoKernelImage(_)
                | Error::BootTimeout(_)
                | Error::RunTimeout(_)
                | Error::KernelPanic { during_tests: false }
                | Error::QemuExited { booted: false, .. }
                | Error::GuestNoKvm
                | Error::GuestMissingFeature(_)
        )
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
