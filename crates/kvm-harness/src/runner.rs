//! The test runner every scenario binary uses (libtest-mimic underneath).
//!
//! Capabilities are only known when the binary runs, so requirements are
//! checked then: a test whose capability the kernel lacks is reported as
//! ignored with the reason and the value the kernel reported. Strict mode
//! turns every such skip into a failure.

use std::fs::OpenOptions;
use std::io::Write as _;
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use libtest_mimic::{Arguments, Completion, Failed, Trial};

use crate::error::{Error, Result};
use crate::kvm::{Cap, Kvm, VmType, KVM_PATH};
use crate::vm::Vm;
use crate::watchdog;

/// Environment variable: `1` makes every skip a failure (also `--strict`).
pub const STRICT_ENV: &str = "KVM_SELFTESTS_STRICT";
/// Environment variable: a file each binary appends one JSON line per test to.
pub const RESULTS_ENV: &str = "KVM_SELFTESTS_RESULTS";

/// A custom requirement: `Err(reason)` when unmet.
pub type CheckFn = dyn Fn(&Arc<Kvm>) -> Result<(), String> + Send + Sync;

/// A precondition on the running kernel; unmet means "skip" (or fail in strict mode).
pub enum Need {
    /// `KVM_CAP_VM_TYPES` advertises the type.
    VmType(VmType),
    /// The capability is non-zero on the system fd.
    Cap(Cap),
    /// The capability is non-zero on the fd of a fresh VM of the type.
    VmCap(VmType, Cap),
    /// Anything else: `Err(reason)` to skip; the reason must name the
    /// capability and the value the kernel reported.
    Check(Box<CheckFn>),
}

impl std::fmt::Debug for Need {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::VmType(t) => write!(f, "VmType({t})"),
            Self::Cap(c) => write!(f, "Cap({c})"),
            Self::VmCap(t, c) => write!(f, "VmCap({t}, {c})"),
            Self::Check(_) => f.write_str("Check(..)"),
        }
    }
}

impl Need {
    /// `Ok` when met, else the skip reason.
    pub fn check(&self, kvm: &Arc<Kvm>) -> Result<(), String> {
        match self {
            Self::VmType(t) if kvm.supports(*t) => Ok(()),
            Self::VmType(t) => Err(format!("needs {t}: {} = {:#x}", Cap::VmTypes, kvm.vm_types())),
            Self::Cap(c) => match kvm.cap(*c) {
                0 => Err(format!("needs {c}: /dev/kvm reports 0")),
                _ => Ok(()),
            },
            Self::VmCap(t, c) => {
                Self::VmType(*t).check(kvm)?;
                let vm = Vm::bare(kvm, *t).map_err(|e| format!("needs a {t} VM to probe {c}: {e}"))?;
                match vm.cap(*c) {
                    0 => Err(format!("needs {c} on a {t} VM: the VM fd reports 0")),
                    _ => Ok(()),
                }
            }
            Self::Check(f) => f(kvm),
        }
    }
}

type KvmBody = Box<dyn FnOnce(&Arc<Kvm>) -> Result<()> + Send>;

/// Parses a [`STRICT_ENV`] value.
pub fn parse_strict(value: &str) -> Result<bool> {
    match value.trim() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "" | "0" | "false" | "no" | "off" => Ok(false),
        other => Err(Error::Config(format!("{STRICT_ENV}={other:?}: expected 1/0, true/false, yes/no, on/off"))),
    }
}

/// One test binary's tests.
pub struct Suite {
    binary: String,
    args: Arguments,
    strict: bool,
    results: Option<PathBuf>,
    kvm: Result<Arc<Kvm>, String>,
    trials: Vec<Trial>,
}

impl std::fmt::Debug for Suite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Suite").field("binary", &self.binary).field("strict", &self.strict).finish_non_exhaustive()
    }
}

fn config_from_env(args: &mut Vec<String>) -> Result<(bool, Option<PathBuf>)> {
    let flag = args.iter().any(|a| a == "--strict");
    args.retain(|a| a != "--strict");
    let strict = match std::env::var(STRICT_ENV) {
        Ok(v) => parse_strict(&v)?,
        Err(std::env::VarError::NotPresent) => false,
        Err(e) => return Err(Error::Config(format!("{STRICT_ENV}: {e}"))),
    };
    // Validate the watchdog setting once, up front, rather than in every test.
    watchdog::configured_timeout()?;
    let results = std::env::var_os(RESULTS_ENV).filter(|v| !v.is_empty()).map(PathBuf::from);
    Ok((strict || flag, results))
}

impl Suite {
    /// Reads the command line and environment and opens `/dev/kvm`. A bad
    /// setting ends the process with status 2 and a message naming it.
    pub fn new(binary: &str) -> Self {
        let mut raw: Vec<String> = std::env::args().collect();
        let (strict, results) = config_from_env(&mut raw).unwrap_or_else(|e| {
            eprintln!("{binary}: {e}");
            std::process::exit(2);
        });
        let kvm = Kvm::open().map(Arc::new).map_err(|e| format!("needs {KVM_PATH}: {e}"));
        Self { binary: binary.to_string(), args: Arguments::from_iter(raw), strict, results, kvm, trials: Vec::new() }
    }

    /// `/dev/kvm`, when it could be opened: lets a binary generate one test
    /// per supported VM type or flag.
    pub fn kvm(&self) -> Option<&Arc<Kvm>> {
        self.kvm.as_ref().ok()
    }

    /// Whether strict mode is on.
    pub fn strict(&self) -> bool {
        self.strict
    }

    /// Adds a test that needs KVM and `needs`; `body` gets the system fd.
    pub fn test<F>(&mut self, name: impl Into<String>, needs: Vec<Need>, body: F)
    where
        F: FnOnce(&Arc<Kvm>) -> Result<()> + Send + 'static,
    {
        let name = name.into();
        let skip = match &self.kvm {
            Err(reason) => Some(reason.clone()),
            Ok(kvm) => needs.iter().find_map(|n| n.check(kvm).err()),
        };
        let body: Option<(Arc<Kvm>, KvmBody)> = match (&self.kvm, &skip) {
            (Ok(kvm), None) => Some((kvm.clone(), Box::new(body))),
            _ => None,
        };
        let trial = self.wrap(name, skip.clone(), move || match body {
            Some((kvm, body)) => body(&kvm),
            None => Ok(()),
        });
        // Listed as ignored so that nextest reports the skip instead of a pass.
        let flag = skip.is_some() && !self.strict && (self.args.list || self.args.ignored);
        self.trials.push(trial.with_ignored_flag(flag));
    }

    /// Adds a test that does not touch KVM (harness self-tests).
    pub fn host_test<F>(&mut self, name: impl Into<String>, body: F)
    where
        F: FnOnce() -> Result<()> + Send + 'static,
    {
        let trial = self.wrap(name.into(), None, body);
        self.trials.push(trial);
    }

    fn wrap<F>(&self, name: String, skip: Option<String>, body: F) -> Trial
    where
        F: FnOnce() -> Result<()> + Send + 'static,
    {
        let binary = self.binary.clone();
        let results = self.results.clone();
        let strict = self.strict;
        Trial::ignorable_test(name.clone(), move || {
            let start = Instant::now();
            let outcome: Result<Completion, String> = match skip {
                Some(reason) if strict => Err(format!("strict mode ({STRICT_ENV}=1): skip is a failure: {reason}")),
                Some(reason) => Ok(Completion::ignored_with(reason)),
                None => match std::panic::catch_unwind(AssertUnwindSafe(body)) {
                    Ok(Ok(())) => Ok(Completion::Completed),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(panic) => Err(panic_message(&*panic)),
                },
            };
            if let Some(path) = &results {
                record(path, &binary, &name, &outcome, start.elapsed().as_millis());
            }
            outcome.map_err(Failed::from)
        })
    }

    /// Runs the selected tests and returns the exit status (non-zero on any failure).
    pub fn run(self) -> ExitCode {
        libtest_mimic::run(&self.args, self.trials).exit_code()
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    let text = panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "non-string panic payload".into());
    format!("panicked: {text}")
}

fn record(path: &PathBuf, binary: &str, test: &str, outcome: &Result<Completion, String>, duration_ms: u128) {
    let (outcome, message) = match outcome {
        Ok(Completion::Completed) => ("pass", String::new()),
        Ok(Completion::Ignored { reason }) => ("skip", reason.clone().unwrap_or_default()),
        Err(message) => ("fail", message.clone()),
    };
    let line = serde_json::json!({
        "binary": binary,
        "test": test,
        "outcome": outcome,
        "duration_ms": duration_ms as u64,
        "message": message,
    });
    let written = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .and_then(|mut f| f.write_all(format!("{line}\n").as_bytes()));
    if let Err(e) = written {
        // Losing a verdict silently would hide a failure from the VM runner.
        eprintln!("{binary}: cannot append to {RESULTS_ENV}={}: {e}", path.display());
        std::process::exit(2);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strict_values_are_validated() {
        assert!(parse_strict("1").unwrap());
        assert!(parse_strict("yes").unwrap());
        assert!(!parse_strict("0").unwrap());
        assert!(!parse_strict("").unwrap());
        let err = parse_strict("maybe").unwrap_err().to_string();
        assert!(err.contains(STRICT_ENV) && err.contains("maybe"), "{err}");
    }

    #[test]
    fn panic_payloads_become_messages() {
        let payload: Box<dyn std::any::Any + Send> = Box::new("boom");
        assert_eq!(panic_message(&*payload), "panicked: boom");
    }
}
