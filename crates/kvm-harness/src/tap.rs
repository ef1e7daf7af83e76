//! kselftest's output: TAP 13 as `tools/testing/selftests/kselftest.h`
//! prints it, so that kselftest's `run_kselftest.sh` and the parsers of
//! KernelCI and LKFT read a binary's tests as they read a C selftest's.
//!
//! ```text
//! TAP version 13
//! 1..3
//! ok 1 sw_protected_vm_has_one_address_space
//! # rule violated: ...
//! not ok 2 default_vm_has_two_address_spaces
//! ok 3 smm_slot_rejected # SKIP needs KVM_CAP_X86_SMM: /dev/kvm reports 0
//! # Totals: pass:1 fail:1 xfail:0 xpass:0 skip:1 error:0
//! ```
//!
//! A known failure is `ok N name # XFAIL reason` (kselftest's
//! `ksft_test_result_xfail()`). Tests are numbered in the order they end.
//! The exit status is kselftest's: 0 (`KSFT_PASS`) when none failed, 1
//! (`KSFT_FAIL`) when one did, 4 (`KSFT_SKIP`) when every test skipped or
//! none was selected.

use std::collections::VecDeque;
use std::process::ExitCode;
use std::sync::{mpsc, Mutex};

use crate::error::{Error, Result};
use crate::results::Outcome;

/// Environment variable: `tap` selects this output (as `--format tap` does);
/// `libtest` (or unset) keeps libtest's.
pub const FORMAT_ENV: &str = "KVM_SELFTESTS_FORMAT";

/// kselftest's exit statuses (`kselftest.h`).
const KSFT_PASS: u8 = 0;
const KSFT_FAIL: u8 = 1;
const KSFT_SKIP: u8 = 4;

/// A test body that records its result and returns its outcome and message.
pub(crate) type Body = Box<dyn FnOnce() -> (Outcome, String) + Send>;

/// Whether TAP was asked for: `--format tap` or `--format=tap` (taken out of
/// `args`, since libtest's `--format` knows no `tap`), or [`FORMAT_ENV`].
pub(crate) fn selected(args: &mut Vec<String>) -> Result<bool> {
    let mut tap = false;
    let mut i = 0;
    while i < args.len() {
        if args[i] == "--format=tap" {
            args.remove(i);
            tap = true;
        } else if args[i] == "--format" && args.get(i + 1).is_some_and(|v| v == "tap") {
            args.drain(i..i + 2);
            tap = true;
        } else {
            i += 1;
        }
    }
    match std::env::var(FORMAT_ENV) {
        Ok(v) if v == "tap" => Ok(true),
        Ok(v) if v.is_empty() || v == "libtest" => Ok(tap),
        Ok(v) => Err(Error::Config(format!("{FORMAT_ENV}={v:?}: expected tap or libtest"))),
        Err(_) => Ok(tap),
    }
}

/// One result line (with its diagnostics before it, for a failure).
fn line(number: usize, name: &str, outcome: Outcome, message: &str) -> String {
    // A `#` in a name would start a directive.
    let name = name.replace('#', "_");
    let reason = message.split_whitespace().collect::<Vec<_>>().join(" ");
    match outcome {
        Outcome::Pass => format!("ok {number} {name}"),
        Outcome::Skip => format!("ok {number} {name} # SKIP {reason}"),
        Outcome::Xfail => format!("ok {number} {name} # XFAIL {reason}"),
        Outcome::Fail => {
            let mut out: String = message.lines().map(|l| format!("# {l}\n")).collect();
            out.push_str(&format!("not ok {number} {name}"));
            out
        }
    }
}

/// Run `cases` on `threads` threads, printing each result as it ends;
/// returns kselftest's exit status.
pub(crate) fn run(cases: Vec<(String, Body)>, threads: usize) -> ExitCode {
    println!("TAP version 13");
    if cases.is_empty() {
        println!("1..0 # SKIP no test selected");
        return ExitCode::from(KSFT_SKIP);
    }
    let total = cases.len();
    println!("1..{total}");
    let queue = Mutex::new(cases.into_iter().collect::<VecDeque<_>>());
    let (tx, rx) = mpsc::channel();
    let mut counts = [0usize; 4];
    std::thread::scope(|scope| {
        for _ in 0..threads.clamp(1, total) {
            let tx = tx.clone();
            let queue = &queue;
            scope.spawn(move || loop {
                let next = queue.lock().unwrap_or_else(|p| p.into_inner()).pop_front();
                let Some((name, body)) = next else { break };
                let (outcome, message) = body();
                if tx.send((name, outcome, message)).is_err() {
                    break;
                }
            });
        }
        drop(tx);
        for (number, (name, outcome, message)) in rx.iter().enumerate() {
            counts[outcome as usize] += 1;
            println!("{}", line(number + 1, &name, outcome, &message));
        }
    });
    let count = |o: Outcome| counts[o as usize];
    println!(
        "# Totals: pass:{} fail:{} xfail:{} xpass:0 skip:{} error:0",
        count(Outcome::Pass),
        count(Outcome::Fail),
        count(Outcome::Xfail),
        count(Outcome::Skip)
    );
    ExitCode::from(if count(Outcome::Fail) > 0 {
        KSFT_FAIL
    } else if count(Outcome::Skip) == total {
        KSFT_SKIP
    } else {
        KSFT_PASS
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_kselftests() {
        assert_eq!(line(1, "a", Outcome::Pass, ""), "ok 1 a");
        assert_eq!(line(2, "b", Outcome::Skip, "needs X:\n 0"), "ok 2 b # SKIP needs X: 0");
        assert_eq!(line(3, "c#d", Outcome::Xfail, "known failure: bug"), "ok 3 c_d # XFAIL known failure: bug");
        assert_eq!(line(4, "e", Outcome::Fail, "rule violated\nat x"), "# rule violated\n# at x\nnot ok 4 e");
    }

    #[test]
    fn the_format_flag_is_taken_out_of_the_arguments() {
        let mut args: Vec<String> = ["bin", "--format", "tap", "filter"].map(String::from).into();
        assert!(selected(&mut args).unwrap());
        assert_eq!(args, ["bin", "filter"]);
        let mut args: Vec<String> = ["bin", "--format=tap"].map(String::from).into();
        assert!(selected(&mut args).unwrap());
        assert_eq!(args, ["bin"]);
        let mut args: Vec<String> = ["bin", "--format", "json"].map(String::from).into();
        assert!(!selected(&mut args).unwrap());
        assert_eq!(args.len(), 3, "libtest's own formats stay");
    }
}
