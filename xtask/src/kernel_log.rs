//! The kernel log of a guest run, kept next to the run's reports: the
//! serial console as it streamed, and the guest's whole kernel log that the
//! final check (`guest_probe --kernel-log`, run by the bundle's `run.sh`
//! after the last test) wrote into the results share.
//!
//! The per-test check is the harness's (`kvm_harness::kmsg`); the final
//! check adds the reports no test's window saw (boot, the probe, between
//! binaries) to the results as one failure.

use std::fs;
use std::path::Path;

use crate::error::Result;
use crate::util::io_err;

/// The guest's whole kernel log, in the results share and next to the reports.
pub const LOG_FILE: &str = "kernel-log.txt";
/// The serial console of the run, next to the reports.
pub const CONSOLE_FILE: &str = "console.log";

/// Copies the guest's kernel log from the results share into `report_dir`
/// (a run that never got to the final check has none; an older one is
/// removed so that it is never taken for this run's).
pub fn keep_guest_log(results_dir: &Path, report_dir: &Path) -> Result<()> {
    let from = results_dir.join(LOG_FILE);
    let to = report_dir.join(LOG_FILE);
    let _ = fs::remove_file(&to);
    if from.is_file() {
        fs::copy(&from, &to).map_err(io_err(&from))?;
        eprintln!("xtask: guest kernel log: {}", to.display());
    }
    Ok(())
}
