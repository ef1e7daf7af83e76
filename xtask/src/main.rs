//! `cargo xtask`: developer and CI automation for the KVM selftests.

mod bisect;
mod error;
mod kernel;
mod probe;
mod report;
mod util;
mod vm;

use std::path::PathBuf;
use std::process::ExitCode;
use std::str::FromStr;

use error::{Error, Result};
use vm::{Accel, VmOpts};

const USAGE: &str = "\
usage: cargo xtask <command> [options]

commands:
  kernel [--tree DIR] [--jobs N]
      Build the guest kernel (Debian linux-source-6.12 unless --tree) with
      xtask/kernel.config into ~/.cache/kvm-selftests-rs; prints the bzImage.
  vm [--kernel PATH] [--tree DIR] [--jobs N] [--accel auto|tcg|kvm]
     [--timeout SECS] [--boot-timeout SECS] [--test-binary PATH]...
     [--known-failures FILE] [--bench]
     [-- ] [test args...]
      Boot the kernel in QEMU and run the test binaries inside in strict mode.
      Test args (filters, --exact, ...) go to every test binary. Exit status:
      0 all passed, 1 a test failed or skipped, 2 the run itself failed.
      --known-failures FILE lists known bugs of the guest kernel (see
      KVM_SELFTESTS_KNOWN_FAILURES in the README): they fail as xfail.
      --bench runs the benchmarks (cargo bench targets, optimized) instead.
  bisect-step --tree DIR [vm options] [test args...]
      Incremental build of DIR, then `vm`. Exit 0 pass, 1 fail, 125 when the
      tree does not build, boot or offer the features (git bisect skip),
      128 on host problems (aborts git bisect run). From a kernel tree:
        git bisect run <workspace>/target/debug/xtask bisect-step --tree . FILTER
      (cargo's `xtask` alias only exists inside the workspace).
  bisect-demo [--jobs N]
      Build a throwaway git history from the Debian 6.12 source with one
      breaking commit and check that `git bisect run` finds it.
  report RESULTS.jsonl [--name STEM]
      Turn a results file (KVM_SELFTESTS_RESULTS) into KTAP and JUnit.
  guest-probe
      (inside the guest) check that a protected VM can be created.
";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match dispatch(&args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("xtask: error: {e}");
            ExitCode::from(2)
        }
    }
}

fn dispatch(args: &[String]) -> Result<ExitCode> {
    let Some((cmd, rest)) = args.split_first() else {
        return Err(Error::Usage("no command given".into()));
    };
    match cmd.as_str() {
        "kernel" => {
            let opts = parse_vm_args(rest, &["--tree", "--jobs"])?;
            if !opts.test_args.is_empty() {
                return Err(Error::Usage(format!(
                    "`kernel` takes no positional arguments (got `{}`)",
                    opts.test_args.join(" ")
                )));
            }
            let image = kernel::build(&opts.kernel_opts)?;
            println!("{}", image.display());
            Ok(ExitCode::SUCCESS)
        }
        "vm" => {
            let opts = parse_vm_args(rest, VM_FLAGS)?;
            let outcome = vm::run(&opts)?;
            Ok(print_verdict(&outcome))
        }
        "bisect-step" => {
            let opts = parse_vm_args(rest, VM_FLAGS)?;
            if opts.kernel_opts.tree.is_none() {
                return Err(Error::Usage("bisect-step needs --tree DIR".into()));
            }
            Ok(bisect::step(&opts))
        }
        "bisect-demo" => {
            let opts = parse_vm_args(rest, &["--jobs", "--timeout", "--boot-timeout", "--accel"])?;
            bisect::demo(&opts)
        }
        "report" => report_cmd(rest),
        "guest-probe" => {
            println!("{}", probe::probe()?);
            Ok(ExitCode::SUCCESS)
        }
        "help" | "--help" | "-h" => {
            print!("{USAGE}");
            Ok(ExitCode::SUCCESS)
        }
        other => Err(Error::Usage(format!("unknown command `{other}`"))),
    }
}

const VM_FLAGS: &[&str] =
    &["--kernel", "--tree", "--jobs", "--accel", "--timeout", "--boot-timeout", "--test-binary", "--known-failures"];

pub fn print_verdict(outcome: &vm::RunOutcome) -> ExitCode {
    let s = outcome.summary;
    eprintln!(
        "xtask: {} passed, {} failed, {} skipped (a skip inside the VM is a failure), {} known failures",
        s.pass, s.fail, s.skip, s.xfail
    );
    for r in outcome.results.iter().filter(|r| r.outcome != report::Outcome::Pass) {
        eprintln!("xtask:   {:?} {}::{}: {}", r.outcome, r.binary, r.test, r.message.lines().next().unwrap_or(""));
    }
    if outcome.passed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// Parse the options shared by the VM-running commands; anything that is
/// not one of `allowed` is passed to the test binaries, as is everything
/// after `--`.
fn parse_vm_args(args: &[String], allowed: &[&str]) -> Result<VmOpts> {
    let mut opts = VmOpts::default();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        if arg == "--" {
            opts.test_args.extend(it.by_ref().cloned());
            break;
        }
        if arg == "--bench" {
            opts.bench = true;
            continue;
        }
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f, Some(v.to_string())),
            _ => (arg.as_str(), None),
        };
        if !allowed.contains(&flag) {
            opts.test_args.push(arg.clone());
            continue;
        }
        let value = match inline {
            Some(v) => v,
            None => it.next().cloned().ok_or_else(|| Error::Usage(format!("{flag} needs a value")))?,
        };
        match flag {
            "--kernel" => opts.kernel = Some(PathBuf::from(value)),
            "--tree" => opts.kernel_opts.tree = Some(PathBuf::from(value)),
            "--test-binary" => opts.binaries.push(PathBuf::from(value)),
            "--known-failures" => opts.known_failures = Some(PathBuf::from(value)),
            "--jobs" => opts.kernel_opts.jobs = positive(flag, &value)?,
            "--timeout" => opts.timeout = positive(flag, &value)?,
            "--boot-timeout" => opts.boot_timeout = positive(flag, &value)?,
            "--accel" => {
                opts.accel = match value.as_str() {
                    "auto" => Accel::Auto,
                    "tcg" => Accel::Tcg,
                    "kvm" => Accel::Kvm,
                    _ => return Err(Error::Usage(format!("--accel must be auto, tcg or kvm (got `{value}`)"))),
                }
            }
            _ => unreachable!("{flag} is in the allowed list but not handled"),
        }
    }
    if opts.kernel.is_some() && opts.kernel_opts.tree.is_some() {
        return Err(Error::Usage("--kernel and --tree are mutually exclusive".into()));
    }
    Ok(opts)
}

fn positive<T: FromStr + PartialOrd + Default>(flag: &str, value: &str) -> Result<T> {
    match value.parse::<T>() {
        Ok(v) if v > T::default() => Ok(v),
        _ => Err(Error::Usage(format!("{flag} needs a positive integer (got `{value}`)"))),
    }
}

fn report_cmd(args: &[String]) -> Result<ExitCode> {
    let mut file = None;
    let mut stem = "host-report".to_string();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--name" => {
                stem = it.next().cloned().ok_or_else(|| Error::Usage("--name needs a value".into()))?;
            }
            a if a.starts_with('-') => return Err(Error::Usage(format!("unknown option `{a}`"))),
            a if file.is_none() => file = Some(PathBuf::from(a)),
            a => return Err(Error::Usage(format!("unexpected argument `{a}`"))),
        }
    }
    let file = file.ok_or_else(|| Error::Usage("report needs a results file".into()))?;
    if !file.is_file() {
        return Err(Error::Io { path: file, source: std::io::ErrorKind::NotFound.into() });
    }
    let results = report::read_results(&file)?;
    report::write_reports(&results, &stem)?;
    let s = report::summarize(&results);
    eprintln!("xtask: {} passed, {} failed, {} skipped, {} known failures", s.pass, s.fail, s.skip, s.xfail);
    Ok(if s.fail == 0 { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn vm_flags_and_test_args_separate() {
        let o = parse_vm_args(&args("--timeout=30 address_space --exact -- --jobs"), VM_FLAGS).unwrap();
        assert_eq!(o.timeout, 30);
        assert_eq!(o.test_args, args("address_space --exact --jobs"));
    }

    #[test]
    fn bad_values_are_named() {
        let e = parse_vm_args(&args("--jobs 0"), VM_FLAGS).unwrap_err().to_string();
        assert!(e.contains("--jobs needs a positive integer (got `0`)"), "{e}");
        let e = parse_vm_args(&args("--accel xen"), VM_FLAGS).unwrap_err().to_string();
        assert!(e.contains("--accel must be"), "{e}");
        let e = parse_vm_args(&args("--kernel"), VM_FLAGS).unwrap_err().to_string();
        assert!(e.contains("--kernel needs a value"), "{e}");
    }
}
