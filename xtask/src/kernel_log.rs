//! The kernel log of a guest run: the final check (`xtask
//! guest-kernel-log`, run by the guest after its last test), and keeping
//! the guest's whole kernel log and console next to the reports.
//!
//! The per-test check is the harness's (`kvm_harness::kmsg`); this adds
//! the reports no test's window saw (boot, the probe, between binaries) to
//! the results as one failure, and says how many tests were checked.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use kvm_harness::kmsg;

use crate::error::Result;
use crate::util::{self, io_err};

/// The guest's whole kernel log, in the results share and next to the reports.
pub const LOG_FILE: &str = "kernel-log.txt";
/// The serial console of the run, next to the reports.
pub const CONSOLE_FILE: &str = "console.log";

/// `xtask guest-kernel-log`: the final check, inside the guest. Its
/// findings are results (a failure appended to `results`), so it exits 0
/// unless it could not write them; a log it cannot read is said, once, and
/// nothing is claimed checked.
pub fn guest_check(results: &Path, log: &Path) -> Result<ExitCode> {
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
    Ok(ExitCode::SUCCESS)
}

/// Where the run's logs are kept: next to the KTAP and JUnit reports.
pub fn kept(name: &str) -> PathBuf {
    util::output_dir().join(name)
}

/// Copies the guest's kernel log from the results share next to the
/// reports (a run that never got to the final check has none; an older one
/// is removed so that it is never taken for this run's).
pub fn keep_guest_log(results_dir: &Path) -> Result<()> {
    let from = results_dir.join(LOG_FILE);
    let to = kept(LOG_FILE);
    util::create_dir_all(&util::output_dir())?;
    let _ = fs::remove_file(&to);
    if from.is_file() {
        fs::copy(&from, &to).map_err(io_err(&from))?;
        eprintln!("xtask: guest kernel log: {}", to.display());
    }
    Ok(())
}
