//! `guest_probe`: run before the tests (by the bundle's `run.sh`). It tells
//! a kernel that lacks the features under test (a bisection "skip") apart
//! from one that has them, and from one whose capability and behaviour
//! disagree: that kernel is broken, not untestable, so the probe records a
//! failure and lets the tests run.
//!
//! `guest_probe [--results FILE] [--rules FILE]`: prints its finding; exit 0
//! when the suite can run (a mismatch is recorded as a failed check in
//! FILE), 2 when the kernel offers no protected VMs (untestable), 3 when it
//! could not probe at all (no `/dev/kvm`, bad settings).
//!
//! `guest_probe --kernel-log LOG --results FILE`, after the last test: the
//! kernel-log oracle's final check. It writes the whole kernel log to LOG
//! and adds one failure to FILE for the kernel reports no test's window saw
//! (boot, the probe, between binaries). Its findings are results, so it
//! exits 0 unless it could not write them; a log it cannot read is said
//! once, and nothing is claimed checked.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use kvm_harness::kmsg;
use kvm_harness::results::{Outcome, Record};
use kvm_harness::{errno_name, Cap, Error, Kvm, Vm, VmType};

/// The results-file name of the probe's own check.
const TEST: &str = "protected_vm_capability_matches_creation";

/// Exit status: the kernel offers no protected VMs.
const UNTESTABLE: u8 = 2;
/// Exit status: the probe itself could not run.
const CANNOT_PROBE: u8 = 3;

/// What the kernel advertised and what it did.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Observation {
    vm_types: u64,
    /// `Ok` or the errno name of `KVM_CREATE_VM(KVM_X86_SW_PROTECTED_VM)`.
    created: Result<(), String>,
}

/// The probe's verdict on an observation.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    /// Advertised and created: the suite can run.
    Offered(String),
    /// Neither advertised nor created: nothing to test (bisection skip).
    Untestable(String),
    /// Capability and behaviour disagree: a kernel bug the run must report.
    Mismatch(String),
}

fn judge(o: &Observation) -> Verdict {
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

fn observe() -> Result<Observation, String> {
    let kvm = Arc::new(Kvm::open().map_err(|e| e.to_string())?);
    let created = match Vm::bare(&kvm, VmType::SwProtected) {
        Ok(_) => Ok(()),
        Err(Error::Sys { errno, .. }) => Err(errno_name(errno)),
        Err(e) => return Err(e.to_string()),
    };
    Ok(Observation { vm_types: kvm.vm_types(), created })
}

/// `--results FILE` and `--rules FILE`; anything else is refused.
/// The command line: the probe's files, or the final kernel-log check.
#[derive(Debug, Default, PartialEq, Eq)]
struct Args {
    results: Option<PathBuf>,
    rules: Option<PathBuf>,
    kernel_log: Option<PathBuf>,
}

fn parse_args(args: impl Iterator<Item = String>) -> Result<Args, String> {
    const USAGE: &str = "usage: guest_probe [--results FILE] [--rules FILE] | --kernel-log LOG --results FILE";
    let mut parsed = Args::default();
    let mut args = args;
    while let Some(arg) = args.next() {
        let slot = match arg.as_str() {
            "--results" => &mut parsed.results,
            "--rules" => &mut parsed.rules,
            "--kernel-log" => &mut parsed.kernel_log,
            other => return Err(format!("unknown argument `{other}` ({USAGE})")),
        };
        *slot = Some(PathBuf::from(args.next().ok_or_else(|| format!("{arg} needs a FILE"))?));
    }
    if parsed.kernel_log.is_some() && (parsed.results.is_none() || parsed.rules.is_some()) {
        return Err(format!("--kernel-log needs --results and takes no --rules ({USAGE})"));
    }
    Ok(parsed)
}

/// The kernel-log oracle's final check; see the module comment.
fn final_kernel_log_check(results: &Path, log: &Path) {
    match kmsg::check_run(results, log) {
        Err(why) => println!("kernel-log oracle off for the run: {why}: no test or boot step was checked"),
        Ok(check) => {
            let unchecked = match check.unchecked.len() {
                0 => String::new(),
                n => format!(
                    "; {n} unchecked (the oracle was off: {})",
                    check
                        .unchecked
                        .iter()
                        .take(3)
                        .map(|(who, why)| format!("{who}: {why}"))
                        .collect::<Vec<_>>()
                        .join("; ")
                ),
            };
            let lost = match check.lost {
                0 => String::new(),
                n => format!("; {n} records were overwritten before they were read, unchecked"),
            };
            println!(
                "kernel-log oracle: {} test windows checked{unchecked}; {} reports in the log, {} outside every \
                 test{lost}",
                check.checked,
                check.reports,
                check.outside.len()
            );
        }
    }
}

fn run() -> Result<u8, (u8, String)> {
    let Args { results, rules, kernel_log } = parse_args(std::env::args().skip(1)).map_err(|e| (CANNOT_PROBE, e))?;
    if let (Some(log), Some(results)) = (&kernel_log, &results) {
        final_kernel_log_check(results, log);
        return Ok(0);
    }
    let start = Instant::now();
    let observation = observe().map_err(|e| (CANNOT_PROBE, e))?;
    let (outcome, message) = match judge(&observation) {
        Verdict::Untestable(why) => return Err((UNTESTABLE, why)),
        Verdict::Offered(what) => (Outcome::Pass, what),
        Verdict::Mismatch(what) => (Outcome::Fail, what),
    };
    println!("{message}");
    // The versioned rules as this kernel's tests will apply them, and why.
    let table = kvm_harness::kernel_rules::decision_table(None).map_err(|e| (CANNOT_PROBE, e.to_string()))?;
    if let Some(path) = rules {
        std::fs::write(&path, &table).map_err(|e| (CANNOT_PROBE, format!("writing {}: {e}", path.display())))?;
    }
    if let Some(path) = results {
        let record = Record {
            binary: "guest_probe".into(),
            test: TEST.into(),
            outcome,
            duration_ms: start.elapsed().as_millis() as u64,
            message: if outcome == Outcome::Pass { String::new() } else { message },
        };
        kvm_harness::results::append(&path, &record)
            .map_err(|e| (CANNOT_PROBE, format!("writing {}: {e}", path.display())))?;
    }
    Ok(0)
}

fn main() -> ExitCode {
    match run() {
        Ok(code) => ExitCode::from(code),
        Err((code, why)) => {
            println!("{why}");
            ExitCode::from(code)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdict(vm_types: u64, created: Result<(), &str>) -> Verdict {
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

    #[test]
    fn arguments_are_checked() {
        let args = |s: &str| parse_args(s.split_whitespace().map(String::from));
        assert_eq!(
            args("--results r --rules t").unwrap(),
            Args { results: Some("r".into()), rules: Some("t".into()), kernel_log: None }
        );
        assert_eq!(
            args("--kernel-log l --results r").unwrap(),
            Args { results: Some("r".into()), rules: None, kernel_log: Some("l".into()) }
        );
        assert!(args("--kernel-log l").unwrap_err().contains("--kernel-log needs --results"));
        assert!(args("--results").unwrap_err().contains("--results needs a FILE"));
        assert!(args("--result r").unwrap_err().contains("unknown argument `--result`"));
    }
}
