//! `cargo xtask vm`: run the suite's bundle inside a guest kernel under QEMU.
//!
//! The guest's root filesystem is the host's `/`, shared read-only over
//! virtio-9p; the init copies the bundle (`cargo xtask bundle`'s layout,
//! staged for this run, or a given tarball) into the guest's tmpfs and runs
//! its `run.sh`, the runner every other engine uses too; a second, writable
//! share carries results back. Guest progress is signalled by marker lines
//! on the serial console, which is streamed to the terminal as it arrives.

use std::env;
use std::fs;
use std::io::{self, IsTerminal};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::guest_init::{init_script, set_executable, Bundle, Files, Shape};
use crate::history;
use crate::kernel::{self, KernelOpts, Source};
use crate::limits::{self, Limit, Limits};
use crate::patch::{self, PatchSet};
pub use crate::qemu::Accel;
use crate::qemu::{host_can_nest, qemu_command, supervise, End, Guest};
use crate::report::{self, Outcome, Summary, TestResult};
use crate::test_binaries::{self, Built};
use crate::upstream::{self, CTest};
use crate::util::{self, io_err, req};
use crate::{bundle, coverage, host_share, kernel_log};

/// Where the guest probe leaves the decision table, next to the results.
pub const RULES_FILE: &str = "rules.txt";

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
    /// Time limits of the binaries and C tests (`--test-timeout`), applied
    /// after those of `KVM_SELFTESTS_TEST_TIMEOUT`.
    pub test_timeouts: Vec<Limit>,
    /// Run this bundle tarball (`cargo xtask bundle`), unpacked into an
    /// empty directory of the guest, instead of building the suite.
    pub bundle: Option<PathBuf>,
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
            test_timeouts: Vec::new(),
            bundle: None,
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
    let limits = time_limits(opts)?;
    if let Some(b) = opts.bundle.as_ref().filter(|b| !b.is_file()) {
        return Err(Error::Usage(format!("--bundle {}: no such file", b.display())));
    }
    // Patches are applied first: one that does not apply is an error before
    // anything builds.
    let prepared = match &opts.kernel {
        Some(_) => None,
        None => Some(kernel::prepare(&opts.kernel_opts)?),
    };
    let patched_tree = prepared.as_ref().and_then(|p| p.tree.clone());
    // Built before the kernel: a broken test build is the host's problem and
    // should stop a bisection before any kernel work.
    let built = match &opts.bundle {
        Some(_) => None,
        None => {
            let mut built = test_binaries::build(opts.bench)?;
            if !opts.binaries.is_empty() {
                built.tests = test_binaries::given(&opts.binaries)?;
            }
            Some(built)
        }
    };
    if let Some(built) = &built {
        check_test_args(&built.tests, &opts.test_args)?;
    }
    let kernel = match (&opts.kernel, prepared) {
        (Some(k), _) => k.canonicalize().map_err(io_err(k))?,
        (None, Some(prepared)) => kernel::build_prepared(&opts.kernel_opts, prepared)?,
        (None, None) => unreachable!("prepared whenever no --kernel is given"),
    };
    let c_tests = if opts.upstream { upstream_tests(&opts.kernel_opts, patched_tree)? } else { Vec::new() };
    let under_test = match &opts.kernel {
        Some(image) => history::prebuilt(image),
        None => patch::annotate(history::of(&opts.kernel_opts.source)?, &PatchSet::load(&opts.kernel_opts.patches)?),
    };
    eprintln!("xtask: kernel under test: {}", under_test.name);

    // Per process, so concurrent runs (a bisection next to an interactive
    // run) cannot clobber each other's init or results.
    let mut scratch = Scratch { dir: util::output_dir().join(format!("vm-{}", std::process::id())), keep: true };
    let init = write_init(&scratch.dir, opts, built.as_ref(), &c_tests, &under_test, limits)?;
    let results_dir = scratch.dir.join("results");
    let accel = match opts.accel {
        Accel::Auto if host_can_nest() => Accel::Kvm,
        Accel::Auto => Accel::Tcg,
        a => a,
    };
    let mut qemu = qemu_command(&kernel, &init, &results_dir, accel);
    eprintln!("xtask: booting {} ({accel:?})", kernel.display());
    // The console and the guest's kernel log are kept with the run's reports.
    let report_dir = util::output_dir().join(run_name(opts)?);
    util::create_dir_all(&report_dir)?;
    let console = report_dir.join(kernel_log::CONSOLE_FILE);
    let guest = supervise(&mut qemu, opts.boot_timeout, opts.timeout, &console)?;
    eprintln!("xtask: console log: {}", console.display());
    kernel_log::keep_guest_log(&results_dir, &report_dir)?;
    let finished = fs::read_to_string(results_dir.join("status")).is_ok_and(|s| s.trim() == "done");
    let mut outcome = collect(&guest, finished, &c_tests, &results_dir, &report_dir)?;
    outcome.kernel = under_test.name;
    if !opts.test_args.is_empty() && finished && !selected_any(&outcome.results) {
        // A green verdict on a run that tested nothing would mislead a
        // bisection as much as a red one.
        return Err(Error::Usage(format!(
            "the test arguments `{}` selected no test in any binary (filters match test names such as \
             sw_protected_vm_random_sequences_match_the_model, not binary::test)",
            opts.test_args.join(" ")
        )));
    }
    if let Ok(table) = fs::read_to_string(results_dir.join(RULES_FILE)) {
        eprint!("xtask: versioned rules on {} (rule, outcome applied, what decided it):\n{table}", outcome.kernel);
    }
    let wall = upstream::read_wall_times(&results_dir.join("wall-times"));
    eprint!("{}", upstream::wall_times(&outcome.results, &wall, &guest.host_share));
    let mut failed: Vec<&str> =
        outcome.results.iter().filter(|r| r.outcome == Outcome::Fail).map(|r| r.binary.as_str()).collect();
    failed.sort_unstable();
    failed.dedup();
    eprint!("{}", host_share::starvation_notes(&failed, &guest.host_share));
    if !c_tests.is_empty() {
        eprint!("{}", upstream::comparison(&c_tests, &outcome.results, &wall));
    }
    if opts.coverage() {
        let sets: &[coverage::Set] =
            if c_tests.is_empty() { &[coverage::RUST] } else { &[coverage::RUST, coverage::UPSTREAM] };
        eprint!("{}", coverage::report(&results_dir, &kernel_id(opts)?, sets)?);
    }
    scratch.keep = false;
    Ok(outcome)
}

/// Whether a run's results hold any test of the suite or the C tests
/// (the guest probe's own check is not one the arguments select).
fn selected_any(results: &[TestResult]) -> bool {
    results.iter().any(|r| r.binary != "guest_probe")
}

/// The kernel's name in paths: `debian-X.Y`, a tree's id, or a prebuilt
/// image's directory; a patched kernel apart from the unpatched one.
fn kernel_id(opts: &VmOpts) -> Result<String> {
    if let Some(image) = &opts.kernel {
        let dir = image.canonicalize().ok().and_then(|p| Some(p.parent()?.file_name()?.to_string_lossy().into_owned()));
        return Ok(format!("image-{}", util::sanitize(&dir.unwrap_or_default())));
    }
    let kernel = match &opts.kernel_opts.source {
        Source::Debian(release) => format!("debian-{release}"),
        Source::Tree(tree) => kernel::tree_source(tree)?.0,
    };
    Ok(PatchSet::load(&opts.kernel_opts.patches)?.id(&kernel))
}

/// The run's name, the directory of its reports under target/kvm-selftests:
/// the kernel, then the mode (coverage, bench), so that the runs of one CI
/// job (each kernel, each mode) keep a report each.
pub fn run_name(opts: &VmOpts) -> Result<String> {
    let mut name = kernel_id(opts)?;
    if opts.coverage() {
        name.push_str("-coverage");
    }
    if opts.kernel_opts.debug {
        name.push_str("-debug");
    }
    if opts.bench {
        name.push_str("-bench");
    }
    Ok(util::sanitize(&name))
}

/// Test arguments every binary would refuse (libtest's usage error, exit
/// 2) are bad input, refused here before any kernel builds or boots: in the
/// guest each binary would exit 2 and the run would read as a failing kernel.
/// One binary on the host, listing only, says so.
fn check_test_args(binaries: &[test_binaries::TestBinary], args: &[String]) -> Result<()> {
    let Some(first) = binaries.first().filter(|_| !args.is_empty()) else {
        return Ok(());
    };
    let out = std::process::Command::new(&first.path).arg("--list").args(args).output().map_err(io_err(&first.path))?;
    if out.status.code() == Some(2) {
        let why = String::from_utf8_lossy(&out.stderr);
        return Err(Error::Usage(format!(
            "the test arguments `{}` are refused by the test binaries ({}): {}",
            args.join(" "),
            first.name,
            why.lines().find(|l| !l.trim().is_empty()).unwrap_or("exit status 2").trim()
        )));
    }
    Ok(())
}

/// The time-limit settings of this run, in order (the environment's, then
/// --test-timeout's); a bad setting, or a per-name one that names no binary
/// or C test the run can have, is refused before anything builds.
fn time_limits(opts: &VmOpts) -> Result<Vec<Limit>> {
    let mut settings = match env::var(limits::ENV) {
        Ok(v) => limits::parse_list(&v).map_err(|e| Error::Config(format!("{}={v}: {e}", limits::ENV)))?,
        Err(_) => Vec::new(),
    };
    settings.extend(opts.test_timeouts.iter().cloned());
    let limits = Limits::new(settings.iter().cloned());
    let given = test_binaries::given(&opts.binaries)?;
    let suite = suite_binary_names();
    let mut known: Vec<&str> = if given.is_empty() {
        suite.iter().map(String::as_str).collect()
    } else {
        given.iter().map(|b| b.name.as_str()).collect()
    };
    if opts.upstream {
        for name in upstream::c_test_names() {
            known.push(name);
        }
    }
    if opts.bundle.is_none() {
        limits.check_names(&known).map_err(Error::Config)?;
    }
    Ok(settings)
}

/// The suite's test and benchmark binaries: one per file in tests/ but the
/// shared library.
fn suite_binary_names() -> Vec<String> {
    let dir = util::workspace_root().join("tests");
    let mut names: Vec<String> = fs::read_dir(&dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok()?.file_name().to_str()?.strip_suffix(".rs").map(String::from))
                .filter(|name| name != "lib")
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// The C selftests of the kernel's source tree, patched as the kernel was
/// (`tree`: that source, when preparing the kernel already made it).
fn upstream_tests(opts: &KernelOpts, tree: Option<(String, PathBuf)>) -> Result<Vec<CTest>> {
    let (id, src) = match tree {
        Some(tree) => tree,
        None => kernel::source_tree(opts)?,
    };
    upstream::build(&id, &src)
}

/// Lay out the run directory (results share, the staged bundle, the
/// kernel's history, the coverage hook) and write the guest's init; returns
/// the init's path.
fn write_init(
    run_dir: &Path,
    opts: &VmOpts,
    built: Option<&Built>,
    c_tests: &[CTest],
    under_test: &history::Kernel,
    limits: Vec<Limit>,
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
    // The bundle as `cargo xtask bundle` lays it out (its own copies of the
    // binaries: cargo may rebuild them while the guest runs, e.g. during a
    // bisection), or the tarball given.
    let staged;
    let tarball;
    let bundle = match (built, &opts.bundle) {
        (Some(built), _) => {
            staged = bundle::stage(built, &Limits::default(), run_dir, "bundle")?;
            Bundle::Dir(&staged)
        }
        (None, Some(file)) => {
            tarball = file.canonicalize().map_err(io_err(file))?;
            Bundle::Tarball(&tarball)
        }
        (None, None) => unreachable!("built unless a bundle is given"),
    };
    let hook = run_dir.join("coverage-hook");
    if opts.coverage() {
        fs::write(&hook, coverage::hook_script()).map_err(io_err(&hook))?;
        set_executable(&hook)?;
    }
    // Guest output is copied to our stdout as is: colour codes only where
    // that is a terminal, never into logs and CI artifacts.
    let mut test_args = opts.test_args.clone();
    if !io::stdout().is_terminal() {
        test_args.insert(0, "--color=never".into());
    }
    let busybox = util::find_in_path("busybox").expect("ensured before the run");
    let init = run_dir.join("init");
    let shape = Shape { binary_jobs: opts.binary_jobs, limits };
    let files = Files {
        known_failures: known_failures.as_deref(),
        history: history.as_deref(),
        coverage_hook: opts.coverage().then_some(hook.as_path()),
    };
    let script = init_script(&busybox, bundle, c_tests, &test_args, files, &shape);
    fs::write(&init, script).map_err(io_err(&init))?;
    set_executable(&init)?;
    Ok(init)
}

/// What a guest run amounts to.
#[derive(Debug)]
enum Judged {
    /// The init reported every test done.
    Finished,
    /// The kernel panicked, hung or stopped after the first test started:
    /// a bad kernel. These failures, naming what was running, join the
    /// results the tests had already reported.
    Died(Vec<TestResult>),
    /// It never got to the first test (no boot, no /dev/kvm, no protected
    /// VMs, a panic or hang before the tests): the error says why, and
    /// whether that makes the kernel untestable.
    NoTests(Error),
}

/// The verdict rule: once a test has started, whatever stops the guest is
/// the kernel failing a test; before that, nothing was tested.
fn judge(guest: &Guest, finished: bool, c_tests: &[CTest]) -> Judged {
    if finished {
        return Judged::Finished;
    }
    if guest.first_test.is_none() {
        return Judged::NoTests(guest.failure());
    }
    let death = guest.death();
    let test = match (&guest.panic, guest.end) {
        (Some(_), _) => "kernel_panic",
        (None, End::RunTimeout(_)) => "guest_timeout",
        _ => "guest_stopped",
    };
    let failure = |binary: &str, test: &str, message: String| TestResult {
        binary: binary.into(),
        test: test.into(),
        outcome: Outcome::Fail,
        duration_ms: 0,
        message,
    };
    if guest.running.is_empty() {
        return Judged::Died(vec![failure("vm", test, format!("between tests, {death}"))]);
    }
    Judged::Died(
        guest
            .running
            .iter()
            .map(|name| {
                let message = format!("{name} was running when {death}");
                if c_tests.iter().any(|c| &c.name == name) {
                    failure("upstream", name, message)
                } else {
                    failure(name, test, message)
                }
            })
            .collect(),
    )
}

/// The verdict of a guest: its results (plus binaries that ran out of
/// time or died without reporting, and what stopped a guest that died
/// during the tests), written as KTAP and JUnit. A guest that never reached
/// its tests keeps whatever it reported (the probe), for CI artifacts, and
/// the run fails with the reason.
fn collect(
    guest: &Guest,
    finished: bool,
    c_tests: &[CTest],
    results_dir: &Path,
    report_dir: &Path,
) -> Result<RunOutcome> {
    let results = verdict_results(guest, finished, c_tests, results_dir, report_dir)?;
    report::write_run_reports(&results, report_dir)?;
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

/// The results a verdict is made of, or why there is none.
fn verdict_results(
    guest: &Guest,
    finished: bool,
    c_tests: &[CTest],
    results_dir: &Path,
    report_dir: &Path,
) -> Result<Vec<TestResult>> {
    let results = report::read_results(&results_dir.join("results.jsonl")).and_then(|mut r| {
        report::add_timeouts(&mut r, results_dir)?;
        report::add_crashed_binaries(&mut r, &results_dir.join("exit-codes"))?;
        Ok(r)
    });
    let results = match (judge(guest, finished, c_tests), results) {
        (Judged::NoTests(e), Ok(mut partial)) if !partial.is_empty() => {
            partial.push(TestResult {
                binary: "vm".into(),
                test: "guest".into(),
                outcome: Outcome::Fail,
                duration_ms: 0,
                message: e.to_string(),
            });
            report::write_run_reports(&partial, report_dir).ok();
            return Err(e);
        }
        (Judged::NoTests(e), _) => return Err(e),
        (Judged::Died(failures), Ok(mut results)) => {
            eprintln!("xtask: the guest died during the tests: {}", failures[0].message);
            results.extend(failures);
            results
        }
        (Judged::Finished, results) => results?,
        (Judged::Died(_), Err(e)) => return Err(e),
    };
    if results.is_empty() {
        return Err(Error::NoTestsRan);
    }
    Ok(results)
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

#[cfg(test)]
mod tests {
    use std::os::unix::process::ExitStatusExt;
    use std::process::ExitStatus;
    use std::time::Duration;

    use super::*;
    use crate::bisect;

    #[test]
    fn test_arguments_a_binary_refuses_are_bad_input_before_any_build() {
        use std::os::unix::fs::PermissionsExt;
        let dir = env::temp_dir().join(format!("xtask-args-{}", std::process::id()));
        util::create_dir_all(&dir).unwrap();
        // Stands in for a libtest binary: one filter is fine, a second is a usage error.
        let path = dir.join("fake_suite");
        fs::write(
            &path,
            "#!/bin/sh
[ $# -gt 2 ] && { echo \"error: unexpected argument '$3' found\" >&2; exit 2; }
exit 0
",
        )
        .unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
        let bin = [test_binaries::TestBinary { name: "fake_suite".into(), path }];
        let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(check_test_args(&bin, &args(&["prefault"])).is_ok());
        assert!(check_test_args(&bin, &[]).is_ok());
        let err = check_test_args(&bin, &args(&["prefault", "watchdog"])).unwrap_err().to_string();
        assert!(
            err.contains("`prefault watchdog` are refused") && err.contains("unexpected argument 'watchdog'"),
            "{err}"
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    /// A guest run as the supervisor saw it, with the files its init left.
    struct Run {
        guest: Guest,
        finished: bool,
        files: Vec<(&'static str, &'static str)>,
    }

    const PASSED: &str = "{\"binary\":\"vm_types\",\"test\":\"a\",\"outcome\":\"pass\"}\n";

    #[test]
    fn only_the_probe_is_no_selected_test() {
        let record = |binary: &str| TestResult {
            binary: binary.into(),
            test: "t".into(),
            outcome: Outcome::Pass,
            duration_ms: 0,
            message: String::new(),
        };
        assert!(!selected_any(&[]));
        assert!(!selected_any(&[record("guest_probe")]));
        assert!(selected_any(&[record("guest_probe"), record("model")]));
        assert!(selected_any(&[record("upstream")]));
    }

    fn booted() -> Guest {
        Guest { booted: true, ..Guest::new() }
    }

    fn testing(running: &[&str]) -> Guest {
        Guest {
            first_test: Some(Duration::from_secs(2)),
            running: running.iter().map(|s| s.to_string()).collect(),
            ..booted()
        }
    }

    fn exited() -> End {
        End::Exited(ExitStatus::from_raw(0))
    }

    /// `cargo xtask vm`'s exit status (main.rs: an error is 2, else the
    /// verdict), `bisect-step`'s, and the results.
    fn statuses(run: Run) -> (u8, u8, Vec<TestResult>) {
        let dir =
            env::temp_dir().join(format!("xtask-verdict-{}-{:?}", std::process::id(), std::thread::current().id()));
        fs::create_dir_all(&dir).unwrap();
        for (name, text) in &run.files {
            fs::write(dir.join(name), text).unwrap();
        }
        let c_tests = [CTest { name: "pre_fault_memory_test".into(), path: "/c".into(), ported_by: &[], cases: &[] }];
        let result = verdict_results(&run.guest, run.finished, &c_tests, &dir, &dir.join("report"))
            .map(|results| RunOutcome { summary: report::summarize(&results), results, kernel: String::new() });
        fs::remove_dir_all(&dir).unwrap();
        let vm = match &result {
            Ok(outcome) if outcome.passed() => 0,
            Ok(_) => 1,
            Err(_) => 2,
        };
        let results = result.as_ref().map(|o| o.results.clone()).unwrap_or_default();
        (vm, bisect::code(&result), results)
    }

    #[test]
    fn a_finished_run_is_judged_by_its_results() {
        let run = Run {
            guest: Guest { end: exited(), ..testing(&[]) },
            finished: true,
            files: vec![("results.jsonl", PASSED)],
        };
        assert_eq!(statuses(run).0, 0);
        let (vm, bisect, results) = statuses(Run {
            guest: Guest { end: exited(), ..testing(&[]) },
            finished: true,
            files: vec![("results.jsonl", PASSED), ("timeouts", "pre_fault_memory 90\n")],
        });
        assert_eq!((vm, bisect), (1, 1), "a binary out of time fails the run");
        assert_eq!(results[1].binary, "pre_fault_memory");
        assert_eq!(results[1].test, report::TIMEOUT_TEST);
    }

    #[test]
    fn a_kernel_that_dies_during_the_tests_is_bad_and_keeps_the_results() {
        let panicked = Guest {
            panic: Some("Kernel panic - not syncing: Fatal exception".into()),
            oops: vec!["kernel BUG at arch/x86/kvm/mmu/mmu.c:4777!".into()],
            end: exited(),
            ..testing(&["pre_fault_memory"])
        };
        let (vm, bisect, results) =
            statuses(Run { guest: panicked, finished: false, files: vec![("results.jsonl", PASSED)] });
        assert_eq!((vm, bisect), (1, 1));
        assert_eq!(results.len(), 2, "{results:?}");
        assert_eq!((results[0].binary.as_str(), results[0].outcome), ("vm_types", Outcome::Pass));
        assert_eq!((results[1].binary.as_str(), results[1].test.as_str()), ("pre_fault_memory", "kernel_panic"));
        assert_eq!(
            results[1].message,
            "pre_fault_memory was running when the guest kernel panicked: kernel BUG at \
             arch/x86/kvm/mmu/mmu.c:4777! | Kernel panic - not syncing: Fatal exception"
        );

        // A C test hanging past its limit, unkillable, until the run's limit.
        let hung = Guest {
            limits_hit: vec![("pre_fault_memory_test".into(), 60)],
            end: End::RunTimeout(600),
            ..testing(&["pre_fault_memory_test"])
        };
        let (vm, bisect, results) = statuses(Run { guest: hung, finished: false, files: vec![] });
        assert_eq!((vm, bisect), (1, 1));
        assert_eq!((results[0].binary.as_str(), results[0].test.as_str()), ("upstream", "pre_fault_memory_test"));
        assert!(results[0].message.contains("did not die when killed"), "{}", results[0].message);

        // Stopped between two binaries (no panic line): still after the first test.
        let (vm, bisect, results) =
            statuses(Run { guest: Guest { end: exited(), ..testing(&[]) }, finished: false, files: vec![] });
        assert_eq!((vm, bisect, results[0].test.as_str()), (1, 1, "guest_stopped"));
    }

    #[test]
    fn a_kernel_that_never_reaches_the_first_test_is_untestable() {
        let panic = Some("Kernel panic - not syncing: VFS".to_string());
        for guest in [
            Guest { end: End::BootTimeout(60), ..Guest::new() },
            Guest { panic: panic.clone(), end: exited(), ..Guest::new() },
            Guest { panic, end: exited(), ..booted() },
            Guest { end: End::Exited(ExitStatus::from_raw(0)), ..Guest::new() },
            Guest { end: End::RunTimeout(600), ..booted() },
            Guest { failure: Some("no-kvm".into()), end: exited(), ..booted() },
            Guest { failure: Some("probe-failed no protected VMs".into()), end: exited(), ..booted() },
        ] {
            let what = format!("{guest:?}");
            let files = vec![("results.jsonl", PASSED)];
            let (vm, bisect, _) = statuses(Run { guest, finished: false, files });
            assert_eq!((vm, bisect), (2, 125), "{what}");
        }
        // The guest's own setup is no fault of the kernel's: abort.
        let setup = Guest { failure: Some("setup-failed mounting /proc".into()), end: exited(), ..booted() };
        assert_eq!(statuses(Run { guest: setup, finished: false, files: vec![] }).1, 128);
    }
}
