//! The known-failures list: bugs of the running kernel that a test is
//! expected to hit, so a host can run the suite green without hiding them.

use std::collections::HashMap;

use crate::error::{Error, Result};

/// Environment variable: a file listing known bugs of the running kernel,
/// one `binary::test  reason` per line (`#` comments). A listed test that
/// fails is reported as ignored with the reason and the failure (outcome
/// `xfail` in the results file, also in strict mode); one that passes fails,
/// so a fixed kernel forces the entry out of the list. A race that a run
/// may or may not hit is listed as `binary::test?  reason`: it may pass.
pub const KNOWN_FAILURES_ENV: &str = "KVM_SELFTESTS_KNOWN_FAILURES";

/// One entry of a [`KNOWN_FAILURES_ENV`] file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KnownFailure {
    /// Why the test fails: the kernel bug, ideally with its upstream fix.
    pub reason: String,
    /// The bug is a race a run may not hit (`?` after the name): a pass is accepted.
    pub intermittent: bool,
}

/// Entries by `(binary, test)`.
pub type KnownFailures = HashMap<(String, String), KnownFailure>;

/// Parses a [`KNOWN_FAILURES_ENV`] file: `(binary, test) -> entry`.
pub fn parse(text: &str) -> Result<KnownFailures> {
    let mut known = HashMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (id, reason) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
        let reason = reason.trim();
        let bad = |what: &str| Error::Config(format!("{KNOWN_FAILURES_ENV} line {}: {what}: {line:?}", n + 1));
        let (binary, test) = id.split_once("::").ok_or_else(|| bad("expected `binary::test reason`"))?;
        let (test, intermittent) = match test.strip_suffix('?') {
            Some(test) => (test, true),
            None => (test, false),
        };
        if binary.is_empty() || test.is_empty() || reason.is_empty() {
            return Err(bad("binary, test and reason are all required"));
        }
        let entry = KnownFailure { reason: reason.to_string(), intermittent };
        known.insert((binary.to_string(), test.to_string()), entry);
    }
    Ok(known)
}

/// The list [`KNOWN_FAILURES_ENV`] names; empty when it is unset.
pub fn from_env() -> Result<KnownFailures> {
    match std::env::var_os(KNOWN_FAILURES_ENV).filter(|v| !v.is_empty()) {
        None => Ok(HashMap::new()),
        Some(path) => {
            let text = std::fs::read_to_string(&path)
                .map_err(|e| Error::Config(format!("{KNOWN_FAILURES_ENV}={}: {e}", path.to_string_lossy())))?;
            parse(&text)
        }
    }
}
