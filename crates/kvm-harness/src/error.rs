//! The harness error type and the helpers tests use to state expectations.

use std::fmt::{self, Debug};

use nix::errno::Errno;

/// Result of a harness operation or of a test body.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the harness or in a test.
///
/// Each kind of failure has its own variant: a kernel call that failed
/// ([`Error::Sys`]), a kernel rule that does not hold ([`Error::Rule`]), the
/// guest or a vCPU misbehaving ([`Error::Guest`], [`Error::UnexpectedExit`],
/// [`Error::Timeout`]), a bad setting ([`Error::Config`]), a harness call the
/// caller got wrong ([`Error::Misuse`]), and a panicked thread ([`Error::Panic`]).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A system call or ioctl failed.
    #[error("{op} failed with {}", errno_name(*errno))]
    Sys {
        /// The call and its arguments, e.g. `KVM_CREATE_VM(type 0x1)`.
        op: String,
        /// The errno the kernel returned.
        errno: Errno,
    },
    /// The vCPU exited in a way the test did not expect.
    #[error("unexpected exit while {while_doing}: {report}")]
    UnexpectedExit {
        /// What the host expected at that point.
        while_doing: String,
        /// The exit, RIP and registers, as `exit::ExitReport` renders them:
        /// rendered when the error is made, so that this type, the bottom of
        /// the crate, depends on nothing in it.
        report: String,
    },
    /// The guest reported a failed assertion or an exception.
    #[error("guest failure: {0}")]
    Guest(String),
    /// The watchdog kicked a vCPU out of `KVM_RUN`.
    #[error("watchdog: vCPU {vcpu} still in KVM_RUN after {timeout_secs:.1} s, at RIP {rip:#x}{}; its thread when kicked: {kernel_state}", symbol.as_deref().map(|s| format!(" ({s})")).unwrap_or_default())]
    Timeout {
        /// vCPU id.
        vcpu: u64,
        /// The deadline that passed.
        timeout_secs: f64,
        /// Guest RIP when the vCPU was kicked out.
        rip: u64,
        /// Payload label at RIP, when known.
        symbol: Option<String>,
        /// What the vCPU thread was doing in the kernel when the deadline
        /// fired (`task_state::TaskState`, rendered), or why it is unknown.
        kernel_state: String,
    },
    /// A kernel rule the test checks does not hold.
    #[error("rule violated: {rule}: {detail}")]
    Rule {
        /// The rule, in words.
        rule: String,
        /// The values seen.
        detail: String,
    },
    /// A failure on a kernel that may lack the upstream fixes named.
    #[error("{error}\n{}", hints.join("\n"))]
    Hinted {
        /// The failure itself.
        error: Box<Error>,
        /// "this kernel may lack upstream fix <sha> (<subject>)" lines.
        hints: Vec<String>,
    },
    /// A setting (environment variable, command-line flag, settings file) is malformed.
    #[error("bad input: {0}")]
    Config(String),
    /// A harness call was made in a state or with arguments it cannot
    /// serve (a bug in the calling test, not in the kernel).
    #[error("harness misuse: {0}")]
    Misuse(String),
    /// A thread of the test panicked, or a child process it started died
    /// of a signal before it could report.
    #[error("{thread} panicked: {message}")]
    Panic {
        /// Which thread, e.g. `vCPU thread`.
        thread: String,
        /// The panic payload's text.
        message: String,
    },
}

impl Error {
    /// Builds an [`Error::Sys`] for `op` from the current `errno`.
    pub(crate) fn last_os(op: impl Into<String>) -> Self {
        Self::Sys { op: op.into(), errno: Errno::last() }
    }

    /// The errno, when the error is a failed call.
    pub fn errno(&self) -> Option<Errno> {
        match self {
            Self::Sys { errno, .. } => Some(*errno),
            _ => None,
        }
    }

    /// A rule violation.
    pub fn rule(rule: impl Into<String>, detail: impl Into<String>) -> Self {
        Self::Rule { rule: rule.into(), detail: detail.into() }
    }

    /// A harness misuse.
    pub fn misuse(what: impl Into<String>) -> Self {
        Self::Misuse(what.into())
    }
}

/// `EINVAL`, `EEXIST`, ...: the symbolic name, which is what kernel developers grep for.
pub fn errno_name(errno: Errno) -> String {
    format!("{errno:?}")
}

/// Turns the result of a system call made outside the harness's own
/// wrappers (nix, kvm-ioctls, std) into an [`Error::Sys`] naming the call.
pub trait SysResult<T> {
    /// Maps the error to [`Error::Sys`] with the call `op` describes.
    fn sys(self, op: impl FnOnce() -> String) -> Result<T>;
}

impl<T> SysResult<T> for nix::Result<T> {
    fn sys(self, op: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|errno| Error::Sys { op: op(), errno })
    }
}

impl<T> SysResult<T> for Result<T, kvm_ioctls::Error> {
    fn sys(self, op: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error::Sys { op: op(), errno: Errno::from_raw(e.errno()) })
    }
}

impl<T> SysResult<T> for std::io::Result<T> {
    fn sys(self, op: impl FnOnce() -> String) -> Result<T> {
        // std reports every failed system call with its errno.
        self.map_err(|e| Error::Sys { op: op(), errno: Errno::from_raw(e.raw_os_error().unwrap_or(0)) })
    }
}

/// Runs `op` and requires it to fail with exactly `expected`.
///
/// `rule` names the kernel rule that must reject the call; the error names
/// the rule, the expected errno and what happened instead.
pub fn expect_errno<T: Debug>(rule: &str, expected: Errno, op: impl FnOnce() -> Result<T>) -> Result<()> {
    match op() {
        Err(e) if e.errno() == Some(expected) => Ok(()),
        Err(e) => Err(match e.errno() {
            Some(got) => {
                Error::rule(rule, format!("expected {}, got {} from {e}", errno_name(expected), errno_name(got)))
            }
            None => Error::rule(rule, format!("expected {}, got a different failure: {e}", errno_name(expected))),
        }),
        Ok(value) => {
            Err(Error::rule(rule, format!("expected {}, but the call succeeded ({value:?})", errno_name(expected))))
        }
    }
}

/// Runs `op` and requires it to succeed; a failure is reported as a violation of `rule`.
pub fn expect_ok<T>(rule: &str, op: impl FnOnce() -> Result<T>) -> Result<T> {
    op().map_err(|e| match e {
        Error::Sys { .. } => Error::rule(rule, format!("expected success, got {e}")),
        other => other,
    })
}

/// Requires `actual == expected`, naming `rule` and `what` on a mismatch.
pub fn expect_eq<T: PartialEq + Debug>(rule: &str, what: impl fmt::Display, actual: T, expected: T) -> Result<()> {
    if actual == expected {
        Ok(())
    } else {
        Err(Error::rule(rule, format!("{what}: expected {expected:?}, got {actual:?}")))
    }
}

/// Checks every item of a sweep, collecting the failures so one bad value
/// never hides another: a violation of `rule` counting the failed items and
/// naming the first three.
pub fn sweep<T: Copy + Debug>(
    rule: &str,
    items: impl IntoIterator<Item = T>,
    mut check: impl FnMut(T) -> Result<()>,
) -> Result<()> {
    let detail = |e: Error| match e {
        Error::Rule { detail, .. } => detail,
        other => other.to_string(),
    };
    let failures: Vec<String> =
        items.into_iter().filter_map(|item| check(item).err().map(|e| format!("{item:#x?}: {}", detail(e)))).collect();
    match failures.len() {
        0 => Ok(()),
        n => Err(Error::rule(rule, format!("{n} value(s) failed; first: {}", failures[..n.min(3)].join("; ")))),
    }
}

/// Returns a rule violation from the enclosing function unless `cond` holds.
#[macro_export]
macro_rules! ensure {
    ($cond:expr, $rule:expr, $($detail:tt)+) => {
        if !$cond {
            return Err($crate::Error::rule($rule, format!($($detail)+)));
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fail(errno: Errno) -> Result<()> {
        Err(Error::Sys { op: "KVM_TEST".into(), errno })
    }

    #[test]
    fn expect_errno_accepts_only_the_named_errno() {
        assert!(expect_errno("r", Errno::EINVAL, || fail(Errno::EINVAL)).is_ok());
        let wrong = expect_errno("slots must not overlap", Errno::EEXIST, || fail(Errno::EINVAL)).unwrap_err();
        assert_eq!(
            wrong.to_string(),
            "rule violated: slots must not overlap: expected EEXIST, got EINVAL from KVM_TEST failed with EINVAL"
        );
        let ok = expect_errno("r", Errno::EINVAL, || Ok(7)).unwrap_err();
        assert!(ok.to_string().ends_with("expected EINVAL, but the call succeeded (7)"), "{ok}");
    }

    #[test]
    fn expect_ok_names_the_rule_and_errno() {
        let e = expect_ok("address space 0 accepts a slot", || fail(Errno::EINVAL)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "rule violated: address space 0 accepts a slot: expected success, got KVM_TEST failed with EINVAL"
        );
    }
}
