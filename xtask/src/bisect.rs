//! `bisect-step` and `bisect-demo`.

use std::process::ExitCode;

use crate::error::Result;
use crate::vm::{self, VmOpts};

/// One `git bisect run` step: 0 good, 1 bad, 125 untestable, 128 abort.
pub fn step(opts: &VmOpts) -> ExitCode {
    match vm::run(opts) {
        Ok(outcome) => crate::print_verdict(&outcome),
        Err(e) if e.is_kernel_fault() => {
            eprintln!("xtask: bisect-step: cannot test this revision: {e}");
            ExitCode::from(125)
        }
        Err(e) => {
            eprintln!("xtask: bisect-step: aborting: {e}");
            ExitCode::from(128)
        }
    }
}

pub fn demo(_opts: &VmOpts) -> Result<ExitCode> {
    Err(crate::error::Error::Demo("not implemented yet".into()))
}
