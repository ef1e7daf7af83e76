//! The test runner every scenario binary uses (libtest-mimic underneath).
//!
//! Capabilities are only known when the binary runs, so requirements are
//! checked then: a test whose capability the kernel lacks is reported as
//! ignored with the reason and the value the kernel reported. Strict mode
//! turns every such skip into a failure.

use std::panic::AssertUnwindSafe;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use libtest_mimic::{Arguments, Completion, Failed, Trial};

use crate::error::{Error, Result};
use crate::kmsg;
use crate::known_failures::{self, KnownFailure, KnownFailures, KNOWN_FAILURES_ENV};
use crate::kvm::{Cap, Kvm, VmType, KVM_PATH};
use crate::liveness::Liveness;
use crate::results::{Outcome, Record, ResultsFile};
use crate::vm::Vm;
use crate::watchdog;

/// Environment variable: `1` makes every skip a failure (also `--strict`).
pub const STRICT_ENV: &str = "KVM_SELFTESTS_STRICT";
/// A custom requirement: `Err(reason)` when unmet.
pub type CheckFn = dyn Fn(&Arc<Kvm>) -> Result<(), String> + Send + Sync;

/// A precondition on the running kernel; unmet means "skip" (or fail in strict mode).
pub enum Need {
    /// `KVM_CAP_VM_TYPES` advertises the type.
    VmType(VmType),
    /// The capability is non-zero on the system fd.
    Cap(Cap),
    /// The capability is non-zero on the fd of a fresh VM of the type.
    VmCap(VmType, Cap),
    /// Anything else: `Err(reason)` to skip; the reason must name the
    /// capability and the value the kernel reported.
    Check(Box<CheckFn>),
}

impl std::fmt::Debug for Need {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::VmType(t) => write!(f, "VmType({t})"),
            Self::Cap(c) => write!(f, "Cap({c})"),
            Self::VmCap(t, c) => write!(f, "VmCap({t}, {c})"),
            Self::Check(_) => f.write_str("Check(..)"),
        }
    }
}

impl Need {
    /// `Ok` when met, else the skip reason.
    pub fn check(&self, kvm: &Arc<Kvm>) -> Result<(), String> {
        match self {
            Self::VmType(t) if kvm.supports(*t) => Ok(()),
            Self::VmType(t) => Err(format!("needs {t}: {} = {:#x}", Cap::VmTypes, kvm.vm_types())),
            Self::Cap(c) => match kvm.cap(*c) {
                0 => Err(format!("needs {c}: /dev/kvm reports 0")),
                _ => Ok(()),
            },
            Self::VmCap(t, c) => {
                Self::VmType(*t).check(kvm)?;
                let vm = Vm::bare(kvm, *t).map_err(|e| format!("needs a {t} VM to probe {c}: {e}"))?;
                match vm.cap(*c) {
                    0 => Err(format!("needs {c} on a {t} VM: the VM fd reports 0")),
                    _ => Ok(()),
                }
            }
            Self::Check(f) => f(kvm),
        }
    }
}

/// A test body, boxed: for a binary that builds its variants as a list
/// of rules and bodies before registering them.
pub type Body = Box<dyn FnOnce(&Arc<Kvm>) -> Result<()> + Send>;

/// Parses a [`STRICT_ENV`] value.
pub(crate) fn parse_strict(value: &str) -> Result<bool> {
    match value.trim() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "" | "0" | "false" | "no" | "off" => Ok(false),
        other => Err(Error::Config(format!("{STRICT_ENV}={other:?}: expected 1/0, true/false, yes/no, on/off"))),
    }
}

/// A registered test: its name, whether libtest should list it as ignored,
/// and its body, which records its result and returns its verdict.
struct Case {
    name: String,
    ignored: bool,
    body: Box<dyn FnOnce() -> Verdict + Send>,
}

/// One test binary's tests.
pub struct Suite {
    binary: String,
    args: Arguments,
    strict: bool,
    /// kselftest's TAP 13 instead of libtest's output ([`crate::tap`]).
    tap: bool,
    results: ResultsFile,
    kvm: Result<Arc<Kvm>, String>,
    known_failures: KnownFailures,
    cases: Vec<Case>,
}

impl std::fmt::Debug for Suite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Suite").field("binary", &self.binary).field("strict", &self.strict).finish_non_exhaustive()
    }
}

/// Strict mode from the command line or [`STRICT_ENV`]; validates the
/// watchdog setting once, up front, rather than in every test.
fn strict_from_env(args: &mut Vec<String>) -> Result<bool> {
    let flag = args.iter().any(|a| a == "--strict");
    args.retain(|a| a != "--strict");
    let strict = match std::env::var(STRICT_ENV) {
        Ok(v) => parse_strict(&v)?,
        Err(std::env::VarError::NotPresent) => false,
        Err(e) => return Err(Error::Config(format!("{STRICT_ENV}: {e}"))),
    };
    watchdog::configured_timeout()?;
    Ok(strict || flag)
}

impl Suite {
    /// Reads the command line and environment and opens `/dev/kvm`. A bad
    /// setting ends the process with status 2 and a message naming it.
    pub fn new(binary: &str) -> Self {
        let mut raw: Vec<String> = std::env::args().collect();
        let config = strict_from_env(&mut raw).and_then(|strict| {
            let tap = crate::tap::selected(&mut raw)?;
            // The versioned rules' evidence and settings: a bad setting or
            // an unreadable history fails now, before any test.
            crate::kernel_rules::running_kernel()?;
            kmsg::check_setting()?;
            Ok((strict, tap, known_failures::from_env()?))
        });
        let (strict, tap, known_failures) = config.unwrap_or_else(|e| {
            eprintln!("{binary}: {e}");
            std::process::exit(2);
        });
        let kvm = Kvm::open().map(Arc::new).map_err(|e| format!("needs {KVM_PATH}: {e}"));
        let results = ResultsFile::from_env();
        // Both files the tests' verdicts go to are opened before any test
        // runs (see results::keep_open).
        for path in results.path().map(|p| [p.to_path_buf(), kmsg::seen_path(p)]).into_iter().flatten() {
            if let Err(e) = crate::results::keep_open(&path) {
                eprintln!("{binary}: cannot open {} for appending: {e}", path.display());
                std::process::exit(2);
            }
        }
        // Said once per binary, and recorded so that the run's final check
        // does not count this binary's tests as checked.
        if let kmsg::Oracle::Off(why) = kmsg::oracle() {
            eprintln!("{binary}: kernel-log oracle off ({why}): no test of this binary is checked for kernel warnings");
            let line = kmsg::Checked {
                binary: binary.to_string(),
                test: String::new(),
                checked: false,
                why: why.clone(),
                reports: Vec::new(),
            };
            kmsg::record_checked(results.path(), &line);
        }
        kmsg::mark_binary_start(binary);
        Self {
            binary: binary.to_string(),
            args: Arguments::from_iter(raw),
            strict,
            tap,
            results,
            kvm,
            known_failures,
            cases: Vec::new(),
        }
    }

    /// `/dev/kvm`, when it could be opened: lets a binary generate one test
    /// per supported VM type or flag.
    pub fn kvm(&self) -> Option<&Arc<Kvm>> {
        self.kvm.as_ref().ok()
    }

    /// Runs the tests one after the other, whatever `--test-threads` says:
    /// for a binary whose tests compare process-wide state (its fd table),
    /// which another test, or the runner recording its result, would change
    /// underneath them.
    pub fn one_test_at_a_time(&mut self) {
        self.args.test_threads = Some(1);
    }

    /// Runs up to `n` tests at once unless `--test-threads` says otherwise:
    /// for a binary whose tests may each wait out a wall-clock deadline on
    /// a kernel with a bug, so that those waits overlap instead of adding
    /// up (libtest's default is one thread per CPU).
    pub fn test_threads_at_least(&mut self, n: usize) {
        if self.args.test_threads.is_none() {
            let cpus = std::thread::available_parallelism().map_or(1, usize::from);
            self.args.test_threads = Some(n.max(cpus));
        }
    }

    /// Whether strict mode is on.
    pub fn strict(&self) -> bool {
        self.strict
    }

    /// Adds a test that needs KVM and `needs`; `body` gets the system fd.
    pub fn test<F>(&mut self, name: impl Into<String>, needs: Vec<Need>, body: F)
    where
        F: FnOnce(&Arc<Kvm>) -> Result<()> + Send + 'static,
    {
        let name = name.into();
        let skip = match &self.kvm {
            Err(reason) => Some(reason.clone()),
            Ok(kvm) => needs.iter().find_map(|n| n.check(kvm).err()),
        };
        let body: Option<(Arc<Kvm>, Body)> = match (&self.kvm, &skip) {
            (Ok(kvm), None) => Some((kvm.clone(), Box::new(body))),
            _ => None,
        };
        let mut case = self.wrap(name, skip.clone(), move || match body {
            Some((kvm, body)) => body(&kvm),
            None => Ok(()),
        });
        // Listed as ignored so that nextest, which judges a test by its exit
        // status alone, reports a skip or a known failure instead of a pass.
        let known = self.known_failures.contains_key(&(self.binary.clone(), case.name.clone()));
        case.ignored = (skip.is_some() && !self.strict || known) && (self.args.list || self.args.ignored);
        self.cases.push(case);
    }

    /// Adds `{type}_vm_{rule}` for every VM type ([`VmType::ALL`]): the one
    /// way to register a per-type variant. Each needs its type and
    /// `needs(type)`; `body` gets the system fd and the type.
    pub fn per_vm_type<F>(&mut self, rule: &str, needs: impl Fn(VmType) -> Vec<Need>, body: F)
    where
        F: Fn(&Arc<Kvm>, VmType) -> Result<()> + Clone + Send + 'static,
    {
        for vm_type in VmType::ALL {
            self.for_vm_type(vm_type, rule, needs(vm_type), body.clone());
        }
    }

    /// Adds `{type}_vm_{rule}` for one VM type, for the variants that exist
    /// for some types only (a flag only some types advertise): named and
    /// needing its type as [`Self::per_vm_type`] does.
    pub fn for_vm_type<F>(&mut self, vm_type: VmType, rule: &str, needs: Vec<Need>, body: F)
    where
        F: FnOnce(&Arc<Kvm>, VmType) -> Result<()> + Send + 'static,
    {
        let mut all = vec![Need::VmType(vm_type)];
        all.extend(needs);
        self.test(format!("{}_vm_{rule}", vm_type.short()), all, move |kvm| body(kvm, vm_type));
    }

    /// Adds a test that does not touch KVM (harness self-tests).
    pub fn host_test<F>(&mut self, name: impl Into<String>, body: F)
    where
        F: FnOnce() -> Result<()> + Send + 'static,
    {
        let case = self.wrap(name.into(), None, body);
        self.cases.push(case);
    }

    fn wrap<F>(&self, name: String, skip: Option<String>, body: F) -> Case
    where
        F: FnOnce() -> Result<()> + Send + 'static,
    {
        let binary = self.binary.clone();
        let results = self.results.clone();
        let strict = self.strict;
        let known_failure = self.known_failures.get(&(binary.clone(), name.clone())).cloned();
        let test_name = name.clone();
        let body = Box::new(move || {
            let start = Instant::now();
            let verdict = match skip {
                Some(reason) if strict => {
                    Verdict::Fail(format!("strict mode ({STRICT_ENV}=1): skip is a failure: {reason}"))
                }
                Some(reason) => Verdict::Skip(reason),
                None => {
                    let liveness = Arc::new(Liveness::default());
                    let window = kmsg::Window::open(&test_name);
                    let ran = liveness.around(|| match std::panic::catch_unwind(AssertUnwindSafe(body)) {
                        Ok(Ok(())) => Ok(()),
                        Ok(Err(e)) => Err(e.to_string()),
                        Err(panic) => Err(panic_message(&*panic)),
                    });
                    let ran = kernel_log(window, liveness.judge(ran), &binary, &test_name, &results);
                    judge(ran, known_failure.as_ref())
                }
            };
            results.record(&Record {
                binary,
                test: test_name,
                outcome: verdict.outcome(),
                duration_ms: start.elapsed().as_millis() as u64,
                message: verdict.message().to_string(),
            });
            verdict
        });
        Case { name, ignored: false, body }
    }

    /// Runs the selected tests and returns the exit status: libtest's
    /// (non-zero on any failure), or with TAP kselftest's (0 pass, 1 a
    /// failure, 4 every test skipped).
    pub fn run(self) -> ExitCode {
        let binary = self.binary.clone();
        let code = if self.tap && !self.args.list {
            let threads =
                self.args.test_threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
            let selected: Vec<(String, crate::tap::Body)> = self
                .cases
                .into_iter()
                // libtest's filters (a name, --exact, --skip) select here too.
                .filter(|c| !self.args.is_filtered_out(&Trial::test(c.name.clone(), || Ok(()))))
                .map(|c| {
                    let body = c.body;
                    let run: crate::tap::Body = Box::new(move || {
                        let verdict = body();
                        (verdict.outcome(), verdict.message().to_string())
                    });
                    (c.name, run)
                })
                .collect();
            crate::tap::run(selected, threads)
        } else {
            let trials = self
                .cases
                .into_iter()
                .map(|c| {
                    let body = c.body;
                    Trial::ignorable_test(c.name, move || body().into_libtest()).with_ignored_flag(c.ignored)
                })
                .collect();
            libtest_mimic::run(&self.args, trials).exit_code()
        };
        kmsg::mark_binary_end(&binary);
        // What the run expected of the versioned rules it checked, and why.
        let table = crate::kernel_rules::consulted_table();
        if !table.is_empty() {
            eprintln!("{}: versioned rules (rule, outcome applied, what decided it):\n{table}", self.binary);
        }
        code
    }
}

/// Registers each scenario function as a test named after it (the name is
/// the rule it checks), all with the same needs:
/// `register!(suite, vec![Need::Cap(Cap::X86Smm)] => fn_a, fn_b);`
#[macro_export]
macro_rules! register {
    ($suite:expr, $needs:expr => $($scenario:ident),+ $(,)?) => {
        $( $suite.test(stringify!($scenario), $needs, $scenario); )+
    };
}

/// The outcome of a test body with the kernel-log oracle's verdict on its
/// window added, and that verdict recorded for the run's final check. A
/// window that could not be opened or read leaves the test unchecked (and
/// recorded so), never failed.
fn kernel_log(
    window: Result<kmsg::Window, String>,
    ran: Result<(), String>,
    binary: &str,
    test: &str,
    results: &ResultsFile,
) -> Result<(), String> {
    let seen = window.and_then(kmsg::Window::close);
    let checked = kmsg::Checked {
        binary: binary.to_string(),
        test: test.to_string(),
        checked: seen.is_ok(),
        why: seen.as_ref().err().cloned().unwrap_or_default(),
        reports: seen.as_ref().map(|s| s.reports.iter().map(|r| r.seq).collect()).unwrap_or_default(),
    };
    kmsg::record_checked(results.path(), &checked);
    let failure = match &seen {
        Ok(seen) => seen.failure(),
        // The binary already said the oracle is off; a window that failed
        // on its own is worth its own line.
        Err(why) if *kmsg::oracle() == kmsg::Oracle::On => {
            eprintln!("{binary}::{test}: kernel log not checked: {why}");
            None
        }
        Err(_) => None,
    };
    match (ran, failure) {
        (ran, None) => ran,
        (Ok(()), Some(what)) => Err(what),
        (Err(message), Some(what)) => Err(format!("{message}\nalso: {what}")),
    }
}

/// How a test ended.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Pass,
    /// A capability is missing (outside strict mode).
    Skip(String),
    /// Failed as its [`KNOWN_FAILURES_ENV`] entry says it does.
    KnownFailure(String),
    Fail(String),
}

impl Verdict {
    /// The `outcome` of the results file.
    fn outcome(&self) -> Outcome {
        match self {
            Self::Pass => Outcome::Pass,
            Self::Skip(_) => Outcome::Skip,
            Self::KnownFailure(_) => Outcome::Xfail,
            Self::Fail(_) => Outcome::Fail,
        }
    }

    fn message(&self) -> &str {
        match self {
            Self::Pass => "",
            Self::Skip(m) | Self::KnownFailure(m) | Self::Fail(m) => m,
        }
    }

    fn into_libtest(self) -> Result<Completion, Failed> {
        match self {
            Self::Pass => Ok(Completion::Completed),
            Self::Skip(reason) | Self::KnownFailure(reason) => Ok(Completion::ignored_with(reason)),
            Self::Fail(message) => Err(Failed::from(message)),
        }
    }
}

/// The verdict of a test that ran, given its known-failure entry. A listed
/// failure is accepted even in strict mode: the list is explicit and
/// reviewed, and a listed test that passes fails.
fn judge(ran: Result<(), String>, known_failure: Option<&KnownFailure>) -> Verdict {
    match (ran, known_failure) {
        (Ok(()), None) => Verdict::Pass,
        (Err(message), None) => Verdict::Fail(message),
        (Ok(()), Some(known)) if known.intermittent => Verdict::Pass,
        (Ok(()), Some(known)) => {
            Verdict::Fail(format!("listed in {KNOWN_FAILURES_ENV} ({}) but passed: remove the entry", known.reason))
        }
        (Err(message), Some(known)) => Verdict::KnownFailure(format!("known failure: {}: {message}", known.reason)),
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    format!("panicked: {}", crate::threads::panic_text(panic))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strict_values_are_validated() {
        assert!(parse_strict("1").unwrap());
        assert!(parse_strict("yes").unwrap());
        assert!(!parse_strict("0").unwrap());
        assert!(!parse_strict("").unwrap());
        let err = parse_strict("maybe").unwrap_err().to_string();
        assert!(err.contains(STRICT_ENV) && err.contains("maybe"), "{err}");
    }

    #[test]
    fn known_failures_parse_and_reject_malformed_lines() {
        let known = known_failures::parse("# host bugs\n\ngmem::some_test  PVM bug: reads MMIO\npf::race?  livelock\n")
            .unwrap();
        let entry = |b: &str, t: &str| known[&(b.to_string(), t.to_string())].clone();
        assert_eq!(
            entry("gmem", "some_test"),
            KnownFailure { reason: "PVM bug: reads MMIO".into(), intermittent: false }
        );
        assert_eq!(entry("pf", "race"), KnownFailure { reason: "livelock".into(), intermittent: true });
        for bad in ["no_separator reason", "bin::test", "::test reason", "bin:: reason", "bin::? reason"] {
            let err = known_failures::parse(bad).unwrap_err().to_string();
            assert!(err.contains(KNOWN_FAILURES_ENV) && err.contains("line 1"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn known_failures_hide_only_failures_and_never_a_pass() {
        let bug = KnownFailure { reason: "bug".into(), intermittent: false };
        let race = KnownFailure { reason: "race".into(), intermittent: true };
        assert_eq!(judge(Ok(()), None), Verdict::Pass);
        assert_eq!(judge(Err("boom".into()), None), Verdict::Fail("boom".into()));
        match judge(Ok(()), Some(&bug)) {
            Verdict::Fail(m) => assert!(m.contains("but passed"), "{m}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(judge(Err("boom".into()), Some(&bug)), Verdict::KnownFailure("known failure: bug: boom".into()));
        assert_eq!(judge(Ok(()), Some(&race)), Verdict::Pass);
        assert_eq!(judge(Err("boom".into()), Some(&race)), Verdict::KnownFailure("known failure: race: boom".into()));
        assert_eq!(Verdict::KnownFailure(String::new()).outcome().to_string(), "xfail");
    }

    #[test]
    fn panic_payloads_become_messages() {
        let payload: Box<dyn std::any::Any + Send> = Box::new("boom");
        assert_eq!(panic_message(&*payload), "panicked: boom");
    }
}
