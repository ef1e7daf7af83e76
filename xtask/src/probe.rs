//! `xtask guest-probe`: run inside the guest before the tests. It tells a
//! kernel that lacks the features under test (a bisection "skip") apart from
//! one that has them, and from one whose capability and behaviour disagree:
//! that kernel is broken, not untestable, so the probe records a failure and
//! lets the tests run.

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use kvm_harness::{errno_name, Cap, Error as HarnessError, Kvm, Vm, VmType};

use crate::error::{Error, Result};
use crate::report::{Outcome, TestResult};
use crate::util::io_err;

/// Where the probe leaves the decision table, next to the results file.
pub const RULES_FILE: &str = "rules.txt";

/// The results-file name of the probe's own check.
const TEST: &str = "protected_vm_capability_matches_creation";

/// What the kernel advertised and what it did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observation {
    pub vm_types: u64,
    /// `Ok` or the errno name of `KVM_CREATE_VM(KVM_X86_SW_PROTECTED_VM)`.
    pub created: std::result::Result<(), String>,
}

/// The probe's verdict on an observation.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Advertised and created: the suite can run.
    Offered(String),
    /// Neither advertised nor created: nothing to test (bisection skip).
    Untestable(String),
    /// Capability and behaviour disagree: a kernel bug the run must report.
    Mismatch(String),
}

pub fn judge(o: &Observation) -> Verdict {
    let advertised = o.vm_types & (1 << VmType::SwProtected.raw()) != 0;
    let cap = format!("{} = {:#x}", Cap::VmTypes, o.vm_types);
    let pvm = VmType::SwProtected;
    match (advertised, &o.created) {
        (true, Ok(())) => Verdict::Offered(format!("{cap}, {pvm} created")),
        (false, Err(e)) => {
            Verdict::Untestable(format!("{cap} does not include {pvm}, and creating one fails with {e}"))
        }
        (false, Ok(())) => Verdict::Mismatch(format!(
            "rule violated: {} must list every VM type KVM_CREATE_VM accepts: {cap} hides {pvm}, but creating one \
             succeeded",
            Cap::VmTypes
        )),
        (true, Err(e)) => Verdict::Mismatch(format!(
            "rule violated: every VM type {} lists must be creatable: {cap} includes {pvm}, but creating one fails \
             with {e}",
            Cap::VmTypes
        )),
    }
}

fn observe() -> Result<Observation> {
    let kvm = Arc::new(Kvm::open().map_err(|e| Error::Probe(e.to_string()))?);
    let created = match Vm::bare(&kvm, VmType::SwProtected) {
        Ok(_) => Ok(()),
        Err(HarnessError::Sys { errno, .. }) => Err(errno_name(errno)),
        Err(e) => return Err(Error::Probe(e.to_string())),
    };
    Ok(Observation { vm_types: kvm.vm_types(), created })
}

/// Probe, print the finding, and record the check in `results`. Untestable
/// kernels are an error (the init script stops the run).
pub fn run(results: Option<&Path>) -> Result<ExitCode> {
    let start = Instant::now();
    let verdict = judge(&observe()?);
    let (outcome, message) = match verdict {
        Verdict::Untestable(why) => return Err(Error::Probe(why)),
        Verdict::Offered(what) => (Outcome::Pass, what),
        Verdict::Mismatch(what) => (Outcome::Fail, what),
    };
    println!("{message}");
    // The versioned rules as this kernel's tests will apply them, and why.
    let table = kvm_harness::kernel_rules::decision_table(None).map_err(|e| Error::Probe(e.to_string()))?;
    if let Some(dir) = results.and_then(Path::parent) {
        let path = dir.join(RULES_FILE);
        std::fs::write(&path, &table).map_err(io_err(&path))?;
    }
    if let Some(path) = results {
        let record = TestResult {
            binary: "guest_probe".into(),
            test: TEST.into(),
            outcome,
            duration_ms: start.elapsed().as_millis() as u64,
            message: if outcome == Outcome::Pass { String::new() } else { message },
        };
        kvm_harness::results::append(path, &record).map_err(io_err(path))?;
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdict(vm_types: u64, created: std::result::Result<(), &str>) -> Verdict {
        judge(&Observation { vm_types, created: created.map_err(String::from) })
    }

    #[test]
    fn capability_and_creation_must_agree() {
        assert!(matches!(verdict(0x3, Ok(())), Verdict::Offered(_)));
        assert!(matches!(verdict(0x1, Err("EINVAL")), Verdict::Untestable(_)));
        let Verdict::Mismatch(m) = verdict(0x1, Ok(())) else { panic!() };
        assert!(m.contains("KVM_CAP_VM_TYPES = 0x1 hides KVM_X86_SW_PROTECTED_VM"), "{m}");
        let Verdict::Mismatch(m) = verdict(0x3, Err("ENOMEM")) else { panic!() };
        assert!(m.contains("fails with ENOMEM"), "{m}");
    }
}
