//! `cargo xtask`: developer and CI automation for the KVM selftests.

mod bisect;
mod coverage;
mod debian;
mod error;
mod findings;
mod guest_init;
mod history;
mod kernel;
mod kernel_log;
mod limits;
mod patch;
mod probe;
mod qemu;
mod recipe;
mod report;
mod test_binaries;
mod upstream;
mod util;
mod vm;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};

use debian::Release;
use error::{Error, Result};
use kernel::{KernelOpts, Source};
use vm::{Accel, VmOpts};

/// Developer and CI automation for the KVM private-memory selftests.
#[derive(Debug, Parser)]
#[command(name = "cargo xtask", disable_help_subcommand = false)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Build the guest kernel with xtask/kernel.config into
    /// ~/.cache/kvm-selftests-rs; prints the bzImage.
    Kernel {
        #[command(flatten)]
        source: SourceArgs,
        #[command(flatten)]
        build: BuildArgs,
        #[command(flatten)]
        patch: PatchArgs,
    },
    /// Boot the kernel in QEMU and run the test binaries inside, strictly.
    ///
    /// Exit status: 0 all passed, 1 a test failed, skipped or ran out of its
    /// time limit, or the kernel panicked or hung once the tests started, 2
    /// nothing was tested (no boot, no /dev/kvm, no protected VMs).
    Vm(VmArgs),
    /// One `git bisect run` step: incremental build of --tree, then `vm`.
    ///
    /// Exit 0 pass, 1 fail, 125 when the tree does not build, boot or offer
    /// the features (git bisect skip), 128 on host problems (aborts git
    /// bisect run). From a kernel tree:
    ///   git bisect run <workspace>/target/debug/xtask bisect-step --tree . -- FILTER
    BisectStep(VmArgs),
    /// Build a throwaway git history from a Debian source with one breaking
    /// commit and check that `git bisect run` finds it.
    BisectDemo {
        /// Debian kernel source release to start from.
        #[arg(long, value_name = "X.Y", default_value_t = Release::DEFAULT)]
        debian: Release,
        #[command(flatten)]
        build: BuildArgs,
        #[command(flatten)]
        guest: GuestArgs,
    },
    /// Check that the patches under findings/ still apply to the current
    /// Debian sources (each finding's `series` file) and that the kernel's
    /// checkpatch.pl --strict finds them clean; builds no kernel.
    FindingsCheck,
    /// Turn a results file (KVM_SELFTESTS_RESULTS) into KTAP and JUnit.
    Report {
        /// The JSON-lines results file.
        results: PathBuf,
        /// File stem of the reports under target/kvm-selftests.
        #[arg(long, default_value = "host-report")]
        name: String,
    },
    /// (inside the guest) check that protected VMs are offered and work,
    /// and that the capability and the behaviour agree.
    GuestProbe {
        /// Append the probe's verdict to this results file.
        #[arg(long, value_name = "FILE")]
        results: Option<PathBuf>,
    },
    /// (inside the guest, after the tests) write the whole kernel log to
    /// --log and add a failure to --results for each kernel report no
    /// test's window saw (boot, the probe, between binaries).
    GuestKernelLog {
        /// The run's results file (the binaries' verdicts sit next to it).
        #[arg(long, value_name = "FILE")]
        results: PathBuf,
        /// Where to write the kernel log.
        #[arg(long, value_name = "FILE")]
        log: PathBuf,
    },
}

/// Which kernel: at most one of these; Debian's 6.12 by default.
#[derive(Debug, Args)]
#[group(multiple = false)]
struct SourceArgs {
    /// Build this kernel tree (in place, out-of-tree objects in the cache).
    #[arg(long, value_name = "DIR")]
    tree: Option<PathBuf>,
    /// Debian's linux-source-X.Y package (default 6.12), fetched with a
    /// private apt configuration when it is not installed.
    #[arg(long, value_name = "X.Y")]
    debian: Option<Release>,
}

#[derive(Debug, Args)]
struct PatchArgs {
    /// Apply this patch (a diff or a `git format-patch` mail; repeatable,
    /// applied in order) to a scratch copy of the source, never the source
    /// itself, and build that incrementally.
    #[arg(long = "patch", value_name = "FILE")]
    patches: Vec<PathBuf>,
}

#[derive(Debug, Args)]
struct BuildArgs {
    /// Parallel make jobs (default: the number of CPUs).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    jobs: Option<u32>,
}

#[derive(Debug, Args)]
struct GuestArgs {
    /// QEMU accelerator; auto uses KVM only when the host can nest.
    #[arg(long, value_enum, default_value_t = AccelArg::Auto)]
    accel: AccelArg,
    /// Seconds for the whole guest run.
    #[arg(long, value_name = "SECS", default_value_t = DEFAULT_TIMEOUT, value_parser = clap::value_parser!(u64).range(1..))]
    timeout: u64,
    /// Seconds for the guest to reach init.
    #[arg(long, value_name = "SECS", default_value_t = DEFAULT_BOOT_TIMEOUT, value_parser = clap::value_parser!(u64).range(1..))]
    boot_timeout: u64,
}

/// `--timeout`'s default.
const DEFAULT_TIMEOUT: u64 = 600;
/// `--boot-timeout`'s default.
const DEFAULT_BOOT_TIMEOUT: u64 = 60;

#[derive(Debug, Args)]
struct VmArgs {
    /// A prebuilt bzImage instead of building one.
    #[arg(long, value_name = "PATH", conflicts_with_all = ["tree", "debian", "patches"])]
    kernel: Option<PathBuf>,
    #[command(flatten)]
    source: SourceArgs,
    #[command(flatten)]
    patch: PatchArgs,
    #[command(flatten)]
    build: BuildArgs,
    #[command(flatten)]
    guest: GuestArgs,
    /// Run these test executables instead of building the suite's.
    #[arg(long = "test-binary", value_name = "PATH")]
    test_binaries: Vec<PathBuf>,
    /// Known bugs of the guest kernel (see KVM_SELFTESTS_KNOWN_FAILURES in
    /// the README): they are reported as xfail.
    #[arg(long, value_name = "FILE")]
    known_failures: Option<PathBuf>,
    /// Run the benchmarks (optimized) instead of the tests.
    #[arg(long)]
    bench: bool,
    /// Also build the kernel tree's own private-memory C selftests and run
    /// them in the same boot, after the Rust suite, timing both.
    #[arg(long, conflicts_with_all = ["kernel", "bench"])]
    upstream: bool,
    /// Build KVM with gcov profiling and report its line and branch coverage
    /// (per suite with --upstream); HTML under target/kvm-selftests/coverage.
    #[arg(long, conflicts_with_all = ["kernel", "bench"])]
    coverage: bool,
    /// The debug lane: build the kernel with lockdep, DEBUG_VM, KASAN and
    /// UBSAN (xtask/debug-kernel.config, a build and image of its own) and
    /// run the suite under the kernel-log oracle. Unless given, the run's
    /// limit becomes 5400 s, the boot's 300 s and each binary's 1200 s.
    #[arg(long, conflicts_with_all = ["kernel", "bench", "coverage"])]
    debug_kernel: bool,
    /// Test binaries to run at once in the guest (default 1, one after the
    /// other). In the 6.12 guest, 2 took the suite (without `model`) from
    /// 31.1, 28.5, 32.9 s to 24.7, 25.5, 30.4 s, but puts the deadline-bound
    /// tests (watchdog, prefault hang detection, memslot move/delete
    /// reports) next to another binary.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=16))]
    binary_jobs: u32,
    /// Time limit in seconds of every test binary and C test in the guest
    /// (SECS), or of one (NAME=SECS); repeatable, applied in order after
    /// KVM_SELFTESTS_TEST_TIMEOUT. One out of time is killed and fails.
    #[arg(long, value_name = "[NAME=]SECS")]
    test_timeout: Vec<limits::Limit>,
    /// Passed to every test binary, after `--` only: filters, --exact, ...
    /// (so a misspelled flag is an error, never a test filter).
    #[arg(value_name = "TEST ARGS", last = true)]
    test_args: Vec<String>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum AccelArg {
    Auto,
    Tcg,
    Kvm,
}

impl SourceArgs {
    fn source(&self) -> Source {
        match (&self.tree, &self.debian) {
            (Some(tree), _) => Source::Tree(tree.clone()),
            (None, Some(release)) => Source::Debian(release.clone()),
            (None, None) => Source::Debian(Release::DEFAULT),
        }
    }
}

impl BuildArgs {
    fn kernel_opts(&self, source: Source) -> KernelOpts {
        let mut opts = KernelOpts { source, ..KernelOpts::default() };
        if let Some(jobs) = self.jobs {
            opts.jobs = jobs as usize;
        }
        opts
    }
}

impl GuestArgs {
    fn apply(&self, opts: &mut VmOpts) {
        opts.accel = match self.accel {
            AccelArg::Auto => Accel::Auto,
            AccelArg::Tcg => Accel::Tcg,
            AccelArg::Kvm => Accel::Kvm,
        };
        opts.timeout = self.timeout;
        opts.boot_timeout = self.boot_timeout;
    }
}

impl VmArgs {
    fn opts(self) -> VmOpts {
        let mut opts = VmOpts {
            kernel: self.kernel,
            kernel_opts: KernelOpts {
                coverage: self.coverage,
                debug: self.debug_kernel,
                patches: self.patch.patches,
                ..self.build.kernel_opts(self.source.source())
            },
            binaries: self.test_binaries,
            test_args: self.test_args,
            known_failures: self.known_failures,
            bench: self.bench,
            upstream: self.upstream,
            binary_jobs: self.binary_jobs as usize,
            test_timeouts: self.test_timeout,
            ..VmOpts::default()
        };
        self.guest.apply(&mut opts);
        if self.debug_kernel {
            // KASAN and lockdep slow boot and every test several times
            // over under TCG; the defaults are sized for the plain kernel.
            // Settings given on the command line still win.
            if opts.timeout == DEFAULT_TIMEOUT {
                opts.timeout = 5400;
            }
            if opts.boot_timeout == DEFAULT_BOOT_TIMEOUT {
                opts.boot_timeout = 300;
            }
            opts.test_timeouts.insert(0, limits::Limit::All(1200));
        }
        opts
    }
}

/// `bisect-step`'s status for bad usage: 128 makes `git bisect run` stop
/// rather than judge a revision by a typo.
const BISECT_ABORT: u8 = 128;

fn main() -> ExitCode {
    let bisecting = std::env::args().nth(1).as_deref() == Some("bisect-step");
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // Help and version go to stdout with status 0; bad usage names
            // the offending argument (and the closest valid one) and exits
            // 2, like every xtask error, before anything builds or boots.
            let _ = e.print();
            return match (e.use_stderr(), bisecting) {
                (false, _) => ExitCode::SUCCESS,
                (true, true) => ExitCode::from(BISECT_ABORT),
                (true, false) => ExitCode::from(2),
            };
        }
    };
    match dispatch(cli.command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("xtask: error: {e}");
            ExitCode::from(2)
        }
    }
}

fn dispatch(cmd: Cmd) -> Result<ExitCode> {
    match cmd {
        Cmd::Kernel { source, build, patch } => {
            let opts = KernelOpts { patches: patch.patches, ..build.kernel_opts(source.source()) };
            let image = kernel::build(&opts)?;
            println!("{}", image.display());
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Vm(args) => {
            let outcome = vm::run(&args.opts())?;
            Ok(print_verdict(&outcome))
        }
        Cmd::BisectStep(args) => {
            if args.source.tree.is_none() {
                // Bad usage must stop `git bisect run`, not skip a revision.
                eprintln!("xtask: error: {}", Error::Usage("bisect-step needs --tree DIR".into()));
                return Ok(ExitCode::from(BISECT_ABORT));
            }
            Ok(bisect::step(&args.opts()))
        }
        Cmd::BisectDemo { debian, build, guest } => {
            let mut opts =
                VmOpts { kernel_opts: build.kernel_opts(Source::Debian(debian.clone())), ..VmOpts::default() };
            guest.apply(&mut opts);
            bisect::demo(&debian, &opts)
        }
        Cmd::FindingsCheck => findings::check(&util::workspace_root().join("findings")),
        Cmd::Report { results, name } => report_cmd(&results, &name),
        Cmd::GuestProbe { results } => probe::run(results.as_deref()),
        Cmd::GuestKernelLog { results, log } => kernel_log::guest_check(&results, &log),
    }
}

pub fn print_verdict(outcome: &vm::RunOutcome) -> ExitCode {
    let s = outcome.summary;
    eprintln!(
        "xtask: {}: {} passed, {} failed, {} skipped (a skip inside the VM is a failure), {} known failures",
        outcome.kernel, s.pass, s.fail, s.skip, s.xfail
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

fn report_cmd(file: &std::path::Path, stem: &str) -> Result<ExitCode> {
    if !file.is_file() {
        return Err(Error::Io { path: file.to_path_buf(), source: std::io::ErrorKind::NotFound.into() });
    }
    let results = report::read_results(file)?;
    report::write_reports(&results, stem)?;
    let s = report::summarize(&results);
    eprintln!("xtask: {} passed, {} failed, {} skipped, {} known failures", s.pass, s.fail, s.skip, s.xfail);
    Ok(if s.fail == 0 { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> std::result::Result<Cmd, clap::Error> {
        Cli::try_parse_from(std::iter::once("xtask").chain(s.split_whitespace())).map(|c| c.command)
    }

    fn vm_opts(s: &str) -> VmOpts {
        match parse(s).unwrap() {
            Cmd::Vm(a) | Cmd::BisectStep(a) => a.opts(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn vm_flags_and_test_args_separate() {
        let o = vm_opts("vm --timeout=30 --debian 7.3 -- address_space --exact --jobs");
        assert_eq!(o.timeout, 30);
        assert_eq!(o.kernel_opts.source, Source::Debian("7.3".parse().unwrap()));
        assert_eq!(o.test_args, ["address_space", "--exact", "--jobs"]);
        let o = vm_opts("vm -- --exact x");
        assert_eq!(o.test_args, ["--exact", "x"]);
        assert_eq!(o.kernel_opts.source, Source::Debian(Release::DEFAULT));
    }

    #[test]
    fn bad_values_are_named() {
        for (args, needle) in [
            ("vm --jobs 0", "--jobs"),
            ("vm --test-timeout model=0", "--test-timeout"),
            ("vm --accel xen", "--accel"),
            ("vm --kernel", "--kernel"),
            ("vm --debian 7", "got `7`"),
            ("vm --tree /x --debian 7.3", "--debian"),
            ("vm --kernel /k --tree /x", "--tree"),
            ("kernel foo", "foo"),
            // A misspelled flag is refused with the closest valid one, never
            // passed on to the test binaries.
            ("vm --debain 7.3", "similar argument exists: '--debian'"),
            ("bisect-step --tree /t --debain 7.3", "similar argument exists: '--debian'"),
            ("vm --upstrem", "similar argument exists: '--upstream'"),
            ("vm --known-failure f", "similar argument exists: '--known-failures'"),
            ("kernel --debain 7.3", "similar argument exists: '--debian'"),
            ("bisect-demo --debain 7.3", "similar argument exists: '--debian'"),
            ("report r --nmae x", "similar argument exists: '--name'"),
            ("guest-probe --result f", "similar argument exists: '--results'"),
            // Test filters go after `--` only.
            ("vm address_space", "address_space"),
            ("vm --debian 7.3 model::", "model::"),
            ("vm --patch", "--patch"),
            ("vm --kernel /k --patch p.diff", "--patch"),
        ] {
            let e = parse(args).unwrap_err().to_string();
            assert!(e.contains(needle), "{args}: {e}");
        }
    }

    #[test]
    fn patches_are_repeatable_and_kept_in_order_for_every_kernel_command() {
        for cmd in ["vm --debian 7.3 --upstream", "vm --coverage", "bisect-step --tree /t"] {
            let o = vm_opts(&format!("{cmd} --patch b.patch --patch a.patch -- filter"));
            assert_eq!(o.kernel_opts.patches, [PathBuf::from("b.patch"), PathBuf::from("a.patch")], "{cmd}");
            assert_eq!(o.test_args, ["filter"], "{cmd}");
        }
        assert!(vm_opts("vm --coverage --patch x").kernel_opts.coverage);
        match parse("kernel --tree /t --patch x.patch").unwrap() {
            Cmd::Kernel { patch, .. } => assert_eq!(patch.patches, [PathBuf::from("x.patch")]),
            other => panic!("{other:?}"),
        }
        assert!(vm_opts("vm").kernel_opts.patches.is_empty());
    }

    #[test]
    fn a_missing_patch_file_is_an_error_before_any_work() {
        let opts = KernelOpts { patches: vec!["/nonexistent/0001-x.patch".into()], ..KernelOpts::default() };
        let e = kernel::prepare(&opts).unwrap_err().to_string();
        assert!(e.contains("/nonexistent/0001-x.patch"), "{e}");
        assert!(!kernel::prepare(&opts).unwrap_err().is_kernel_fault());
    }
}
