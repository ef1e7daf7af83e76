//! `cargo xtask vm`: run the test binaries inside a guest kernel under QEMU.
//!
//! The guest's root filesystem is the host's `/`, shared read-only over
//! virtio-9p, so host-built binaries run unchanged; a second, writable share
//! carries results back. Guest progress is signalled by marker lines on the
//! serial console, which is streamed to the terminal as it arrives.

use std::fs;
use std::io::{self, IsTerminal};
use std::path::{Path, PathBuf};

use crate::coverage;
use crate::error::{Error, Result};
use crate::guest_init::{init_script, set_executable, Files, Shape};
use crate::kernel::{self, KernelOpts, Source};
pub use crate::qemu::Accel;
use crate::qemu::{host_can_nest, qemu_command, supervise, Guest};
use crate::report::{self, Outcome, Summary, TestResult};
use crate::test_binaries::{self, TestBinary};
use crate::upstream::{self, CTest};
use crate::util::{self, io_err, req};
use crate::{history, probe};

#[derive(Debug, Clone)]
pub struct VmOpts {
    pub kernel: Option<PathBuf>,
    pub kernel_opts: KernelOpts,
    pub accel: Accel,
    pub boot_timeout: u64,
    pub timeout: u64,
    /// Prebuilt test executables; empty means build `kvm-selftests`.
    pub binaries: Vec<PathBuf>,
    /// Passed to every test binary (libtest filters, `--exact`, ...).
    pub test_args: Vec<String>,
    /// Known bugs of the guest kernel (`KVM_SELFTESTS_KNOWN_FAILURES`).
    pub known_failures: Option<PathBuf>,
    /// Run the benchmarks instead of the tests.
    pub bench: bool,
    /// Also run the kernel tree's C selftests in the same boot.
    pub upstream: bool,
    /// Test binaries run at once in the guest (1: one after the other).
    pub binary_jobs: usize,
}

impl VmOpts {
    /// gcov coverage of KVM (`--coverage`), a property of the kernel build.
    fn coverage(&self) -> bool {
        self.kernel_opts.coverage
    }
}

impl Default for VmOpts {
    fn default() -> Self {
        VmOpts {
            kernel: None,
            kernel_opts: KernelOpts::default(),
            accel: Accel::Auto,
            boot_timeout: 60,
            timeout: 600,
            binaries: Vec::new(),
            test_args: Vec::new(),
            known_failures: None,
            bench: false,
            upstream: false,
            binary_jobs: 1,
        }
    }
}

#[derive(Debug)]
pub struct RunOutcome {
    pub results: Vec<TestResult>,
    pub summary: Summary,
    /// The kernel under test, named exactly (package version, git describe).
    pub kernel: String,
}

impl RunOutcome {
    /// Inside the VM every capability is present, so a skip is as bad as a
    /// failure (the binaries already turn skips into failures in strict mode;
    /// this also catches a binary that ignores the variable). A known
    /// failure (`--known-failures`) is neither.
    pub fn passed(&self) -> bool {
        self.summary.fail == 0 && self.summary.skip == 0
    }
}

/// Build (or reuse) everything, boot the guest and run the tests in it.
pub fn run(opts: &VmOpts) -> Result<RunOutcome> {
    util::ensure_requirements(&[req("qemu-system-x86_64", "qemu-system-x86"), req("busybox", "busybox-static")])?;
    if opts.coverage() {
        util::ensure_requirements(coverage::TOOLS)?;
    }
    if let Some(k) = opts.kernel.as_ref().filter(|k| !k.is_file()) {
        return Err(Error::NoKernelImage(k.clone()));
    }
    // Built first: a broken test build is the host's problem and should stop
    // a bisection before any kernel work.
    let binaries = if opts.binaries.is_empty() {
        test_binaries::build(opts.bench)?
    } else {
        test_binaries::given(&opts.binaries)?
    };
    let kernel = match &opts.kernel {
        Some(k) => k.canonicalize().map_err(io_err(k))?,
        None => kernel::build(&opts.kernel_opts)?,
    };
    let c_tests = if opts.upstream { upstream_tests(&opts.kernel_opts.source)? } else { Vec::new() };
    let under_test = match &opts.kernel {
        Some(image) => history::prebuilt(image),
        None => history::of(&opts.kernel_opts.source)?,
    };
    eprintln!("xtask: kernel under test: {}", under_test.name);

    // Per process, so concurrent runs (a bisection next to an interactive
    // run) cannot clobber each other's init or results.
    let mut scratch = Scratch { dir: util::output_dir().join(format!("vm-{}", std::process::id())), keep: true };
    let init = write_init(&scratch.dir, opts, &binaries, &c_tests, &under_test)?;
    let results_dir = scratch.dir.join("results");
    let accel = match opts.accel {
        Accel::Auto if host_can_nest() => Accel::Kvm,
        Accel::Auto => Accel::Tcg,
        a => a,
    };
    let mut qemu = qemu_command(&kernel, &init, &results_dir, accel);
    eprintln!("xtask: booting {} ({accel:?})", kernel.display());
    let guest = supervise(&mut qemu, opts.boot_timeout, opts.timeout).and_then(|guest| {
        let status = fs::read_to_string(results_dir.join("status")).unwrap_or_default();
        if status.trim() == "done" {
            Ok(guest)
        } else {
            Err(guest.failure())
        }
    });
    let mut outcome = collect(guest, &results_dir)?;
    outcome.kernel = under_test.name;
    if let Ok(table) = fs::read_to_string(results_dir.join(probe::RULES_FILE)) {
        eprint!("xtask: versioned rules on {} (rule, outcome applied, what decided it):\n{table}", outcome.kernel);
    }
    let wall = upstream::read_wall_times(&results_dir.join("wall-times"));
    eprint!("{}", upstream::wall_times(&outcome.results, &wall));
    if !c_tests.is_empty() {
        eprint!("{}", upstream::comparison(&c_tests, &outcome.results, &wall));
    }
    if opts.coverage() {
        let sets: &[coverage::Set] =
            if c_tests.is_empty() { &[coverage::RUST] } else { &[coverage::RUST, coverage::UPSTREAM] };
        let kernel = match &opts.kernel_opts.source {
            Source::Debian(release) => format!("debian-{release}"),
            Source::Tree(tree) => kernel::tree_source(tree)?.0,
        };
        eprint!("{}", coverage::report(&results_dir, &kernel, sets)?);
    }
    scratch.keep = false;
    Ok(outcome)
}

/// The C selftests of the kernel's source tree.
fn upstream_tests(source: &Source) -> Result<Vec<CTest>> {
    let (id, src) = match source {
        Source::Debian(release) => kernel::debian_source(release)?,
        Source::Tree(tree) => kernel::tree_source(tree)?,
    };
    upstream::build(&id, &src)
}

/// Lay out the run directory (results share, a private copy of xtask for
/// the guest probe) and write the guest's init; returns the init's path.
fn write_init(
    run_dir: &Path,
    opts: &VmOpts,
    binaries: &[TestBinary],
    c_tests: &[CTest],
    under_test: &history::Kernel,
) -> Result<PathBuf> {
    if run_dir.exists() {
        fs::remove_dir_all(run_dir).map_err(io_err(run_dir))?;
    }
    util::create_dir_all(&run_dir.join("results"))?;
    let history = history::write(under_test, run_dir)?;
    let known_failures = match &opts.known_failures {
        Some(list) => Some(list.canonicalize().map_err(io_err(list))?),
        None => None,
    };
    // A private copy for the guest probe: cargo may rebuild (replace) our
    // own binary while the guest runs, e.g. during a bisection.
    let xtask = run_dir.join("xtask");
    let self_exe = Path::new("/proc/self/exe");
    fs::copy(self_exe, &xtask).map_err(io_err(self_exe))?;
    // Guest output is copied to our stdout as is: colour codes only where
    // that is a terminal, never into logs and CI artifacts.
    let mut test_args = opts.test_args.clone();
    if !io::stdout().is_terminal() {
        test_args.insert(0, "--color=never".into());
    }
    let busybox = util::find_in_path("busybox").expect("ensured before the run");
    let init = run_dir.join("init");
    let shape = Shape { coverage: opts.coverage(), binary_jobs: opts.binary_jobs };
    let script = init_script(
        &busybox,
        &xtask,
        binaries,
        c_tests,
        &test_args,
        Files { known_failures: known_failures.as_deref(), history: history.as_deref() },
        shape,
    );
    fs::write(&init, script).map_err(io_err(&init))?;
    set_executable(&init)?;
    Ok(init)
}

/// The verdict of a finished guest: its results (plus binaries that died
/// without reporting), written as KTAP and JUnit. A guest that failed keeps
/// whatever its tests reported, for CI artifacts, and the run fails.
fn collect(guest: Result<Guest>, results_dir: &Path) -> Result<RunOutcome> {
    let results = report::read_results(&results_dir.join("results.jsonl")).and_then(|mut r| {
        report::add_crashed_binaries(&mut r, &results_dir.join("exit-codes"))?;
        Ok(r)
    });
    let (guest, results) = match (guest, results) {
        (Ok(guest), results) => (guest, results?),
        (Err(e), Ok(mut partial)) if !partial.is_empty() => {
            partial.push(TestResult {
                binary: "vm".into(),
                test: "guest".into(),
                outcome: Outcome::Fail,
                duration_ms: 0,
                message: e.to_string(),
            });
            report::write_reports(&partial, "report").ok();
            return Err(e);
        }
        (Err(e), _) => return Err(e),
    };
    if results.is_empty() {
        return Err(Error::NoTestsRan);
    }
    report::write_reports(&results, "report")?;
    let summary = report::summarize(&results);
    if let (Some(first), Some(done)) = (guest.first_test, guest.done) {
        eprintln!(
            "xtask: boot to first test {:.2} s, tests {:.2} s, total {:.2} s",
            first.as_secs_f64(),
            (done - first).as_secs_f64(),
            done.as_secs_f64()
        );
    }
    Ok(RunOutcome { results, summary, kernel: String::new() })
}

/// The run's scratch directory: removed after a run that produced a
/// verdict, kept (and named) after one that did not, for debugging.
#[derive(Debug)]
struct Scratch {
    dir: PathBuf,
    keep: bool,
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if self.keep {
            eprintln!("xtask: guest init and raw results kept in {}", self.dir.display());
        } else {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}
