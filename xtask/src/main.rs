//! `cargo xtask`: developer and CI automation for the KVM selftests.

mod bisect;
mod bundle;
mod coverage;
mod debian;
mod error;
mod findings;
mod guest_init;
mod history;
mod host_share;
mod kcidb;
mod kconfig;
mod kernel;
mod kernel_log;
mod limits;
mod patch;
mod qemu;
mod recipe;
mod report;
#[cfg(test)]
mod run_sh_tests;
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
    /// Turn a results file (KVM_SELFTESTS_RESULTS) into KTAP and JUnit, or
    /// KCIDB JSON.
    Report {
        /// The JSON-lines results file (`cargo xtask vm` leaves
        /// target/kvm-selftests/report.results.jsonl).
        #[arg(value_name = "RESULTS", required_unless_present = "results_file")]
        results: Option<PathBuf>,
        /// The same, as a flag.
        #[arg(long = "results", value_name = "FILE", conflicts_with = "results")]
        results_file: Option<PathBuf>,
        /// File stem of the reports under target/kvm-selftests (default
        /// host-report; for kcidb, kcidb.json beside the results file).
        #[arg(long)]
        name: Option<String>,
        /// ktap-junit: <name>.ktap and <name>.junit.xml; kcidb:
        /// a KCIDB 5.3 JSON file, checked with kcidb-io when python3 can
        /// import it.
        #[arg(long, value_enum, default_value_t = ReportFormat::KtapJunit)]
        format: ReportFormat,
        /// (kcidb) The kernel the results are of: its checkout and build.
        #[command(flatten)]
        source: SourceArgs,
        /// (kcidb) The submitting CI system's name in every id.
        #[arg(long, default_value = kcidb::DEFAULT_ORIGIN, value_parser = parse_origin)]
        origin: String,
        /// (kcidb) Fail unless kcidb-io (pip) validates the file.
        #[arg(long)]
        validate: bool,
    },
    /// Print the config recipe, resolved for each kernel given (Debian's
    /// 6.12 by default), as a plain CONFIG_X=y fragment for
    /// merge_config.sh, vng --config and tuxmake; the header names the base
    /// it applies on. configs/kvm-private-mem.config is its output for
    /// --debian 6.12 --debian 7.3.
    KernelConfig {
        /// A kernel tree (repeatable).
        #[arg(long, value_name = "DIR")]
        tree: Vec<PathBuf>,
        /// A Debian linux-source-X.Y (repeatable).
        #[arg(long, value_name = "X.Y")]
        debian: Vec<Release>,
    },
    /// Build the relocatable bundle: static test binaries, the guest probe,
    /// run.sh, the kselftest layout and the known-failure lists, packed as
    /// kvm-private-mem-selftests-VERSION-x86_64.tar.xz; prints its path.
    Bundle {
        /// Directory to write the tarball to.
        #[arg(long, value_name = "DIR", default_value = "target/kvm-selftests")]
        out: PathBuf,
        /// Bundle the benchmarks (optimized) instead of the tests.
        #[arg(long)]
        bench: bool,
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
    /// Run this bundle (`cargo xtask bundle`'s tarball), unpacked into an
    /// empty directory of the guest, instead of building the suite.
    #[arg(long, value_name = "TARBALL", conflicts_with_all = ["test_binaries", "bench"])]
    bundle: Option<PathBuf>,
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ReportFormat {
    KtapJunit,
    Kcidb,
}

/// KCIDB origins are `[a-z0-9_]+`.
fn parse_origin(s: &str) -> std::result::Result<String, String> {
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_') {
        Ok(s.to_string())
    } else {
        Err(format!("a KCIDB origin is lowercase letters, digits and _ (got `{s}`)"))
    }
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
            bundle: self.bundle,
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
        Cmd::Report { results, results_file, name, format, source, origin, validate } => {
            let file = results.or(results_file).expect("clap requires one");
            match format {
                ReportFormat::KtapJunit if source.tree.is_some() || source.debian.is_some() || validate => {
                    Err(Error::Usage("--tree, --debian and --validate go with --format kcidb".into()))
                }
                ReportFormat::KtapJunit => report_cmd(&file, name.as_deref().unwrap_or("host-report")),
                ReportFormat::Kcidb => {
                    let out = match name {
                        Some(stem) => util::output_dir().join(format!("{stem}.kcidb.json")),
                        None => file.parent().unwrap_or(std::path::Path::new(".")).join("kcidb.json"),
                    };
                    kcidb_cmd(&file, &out, &source.source(), &origin, validate)
                }
            }
        }
        Cmd::KernelConfig { tree, debian } => {
            let sources: Vec<Source> =
                debian.into_iter().map(Source::Debian).chain(tree.into_iter().map(Source::Tree)).collect();
            kconfig::print(&sources)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Bundle { out, bench } => {
            println!("{}", bundle::run(&out, bench)?.display());
            Ok(ExitCode::SUCCESS)
        }
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

/// The KCIDB document of a results file, under target/kvm-selftests.
fn kcidb_cmd(
    file: &std::path::Path,
    out: &std::path::Path,
    source: &Source,
    origin: &str,
    validate: bool,
) -> Result<ExitCode> {
    // Bad input before any work: the results are read first.
    let text = std::fs::read_to_string(file).map_err(util::io_err(file))?;
    let results = report::read_results(file)?;
    let kernel = kcidb::Kernel::of(source)?;
    let doc = kcidb::document(&results, &kernel, origin, &kcidb::run_id(&text));
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        util::create_dir_all(dir)?;
    }
    let json = serde_json::to_string_pretty(&doc).map_err(|e| Error::Config(format!("KCIDB: {e}")))?;
    std::fs::write(out, json + "\n").map_err(util::io_err(out))?;
    eprintln!("xtask: KCIDB report: {}", out.display());
    let s = report::summarize(&results);
    eprintln!(
        "xtask: {} tests: {} PASS, {} FAIL (of them {} known failures, each with an issue and an incident), {} SKIP",
        results.len(),
        s.pass,
        s.fail + s.xfail,
        s.xfail,
        s.skip
    );
    if validate || kcidb::validator_available() {
        eprintln!("xtask: {}", kcidb::validate(out)?);
    } else {
        eprintln!("xtask: not validated: python3 cannot import kcidb_io (python3 -m pip install kcidb-io)");
    }
    Ok(ExitCode::SUCCESS)
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
            ("bundle --ot d", "'--ot'"),
            ("vm --bundle b --test-binary t", "--test-binary"),
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
