//! The harness error type and the helpers tests use to state expectations.

use std::fmt::{self, Debug};

use nix::errno::Errno;

use crate::vcpu::ExitReport;

/// Result of a harness operation or of a test body.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the harness or in a test.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A system call or ioctl failed.
    #[error("{op} failed with {}{}", errno_name(*errno), context_suffix(context))]
    Sys {
        /// The call, e.g. `KVM_CREATE_VM(type 1)`.
        op: String,
        /// The errno the kernel returned.
        errno: Errno,
        /// What the harness was doing.
        context: String,
    },
    /// The vCPU exited in a way the test did not expect.
    #[error("unexpected exit while {while_doing}: {report}")]
    UnexpectedExit {
        /// What the host expected at that point.
        while_doing: String,
        /// The exit, RIP and registers.
        report: Box<ExitReport>,
    },
    /// The guest reported a failed assertion or an exception.
    #[error("guest failure: {0}")]
    Guest(String),
    /// The watchdog kicked a vCPU out of `KVM_RUN`.
    #[error("watchdog: vCPU {vcpu} still in KVM_RUN after {timeout_secs:.1} s, at RIP {rip:#x}{}", symbol.as_deref().map(|s| format!(" ({s})")).unwrap_or_default())]
    Timeout {
        /// vCPU id.
        vcpu: u64,
        /// The deadline that passed.
        timeout_secs: f64,
        /// Guest RIP when the vCPU was kicked out.
        rip: u64,
        /// Payload label at RIP, when known.
        symbol: Option<String>,
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
    /// The harness was given bad input (environment, arguments).
    #[error("bad input: {0}")]
    Config(String),
}

impl Error {
    /// Builds an [`Error::Sys`] from the current `errno`.
    pub fn last_os(op: impl Into<String>, context: impl Into<String>) -> Self {
        Self::Sys { op: op.into(), errno: Errno::last(), context: context.into() }
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
}

fn context_suffix(context: &str) -> String {
    if context.is_empty() {
        String::new()
    } else {
        format!(" ({context})")
    }
}

/// `EINVAL`, `EEXIST`, ...: the symbolic name, which is what kernel developers grep for.
pub fn errno_name(errno: Errno) -> String {
    format!("{errno:?}")
}

/// Maps a nix call's errno into [`Error::Sys`].
pub(crate) trait SysContext<T> {
    fn sys(self, op: impl FnOnce() -> String) -> Result<T>;
}

impl<T> SysContext<T> for nix::Result<T> {
    fn sys(self, op: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|errno| Error::Sys { op: op(), errno, context: String::new() })
    }
}

impl<T> SysContext<T> for Result<T, kvm_ioctls::Error> {
    fn sys(self, op: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error::Sys { op: op(), errno: Errno::from_raw(e.errno()), context: String::new() })
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
        Err(Error::Sys { op: "KVM_TEST".into(), errno, context: String::new() })
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
