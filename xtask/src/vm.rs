//! `cargo xtask vm`: run the test binaries inside a guest kernel under QEMU.
//!
//! The guest's root filesystem is the host's `/`, shared read-only over
//! virtio-9p, so host-built binaries run unchanged; a second, writable share
//! carries results back. Guest progress is signalled by marker lines on the
//! serial console, which is streamed to the terminal as it arrives.

use std::env;
use std::fmt::Write as _;
use std::fs::{self, OpenOptions};
use std::io::{self, BufRead, BufReader, IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::error::{Error, Result};
use crate::kernel::{self, KernelOpts};
use crate::report::{self, Outcome, Summary, TestResult};
use crate::util::{self, io_err, req, shell_quote};

/// Prefix of the lines the generated init prints to report progress.
const MARKER: &str = "@@KVM-SELFTESTS@@";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Auto,
    Tcg,
    Kvm,
}

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
        }
    }
}

#[derive(Debug)]
pub struct TestBinary {
    pub name: String,
    pub path: PathBuf,
}

#[derive(Debug)]
pub struct RunOutcome {
    pub results: Vec<TestResult>,
    pub summary: Summary,
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

/// Build the `kvm-selftests` integration-test executables (or, with
/// `bench`, its benchmarks, optimized) and return them.
pub fn build_tests(bench: bool) -> Result<Vec<TestBinary>> {
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let (subcommand, kind) = if bench { ("bench", "bench") } else { ("test", "test") };
    let mut cmd = Command::new(cargo);
    cmd.args([subcommand, "--no-run", "--message-format=json-render-diagnostics"])
        .args(["-p", "kvm-selftests", "--manifest-path"])
        .arg(util::workspace_root().join("Cargo.toml"))
        .stdin(Stdio::null())
        .stderr(Stdio::inherit());
    eprintln!("xtask: building test binaries");
    let stdout = util::output(&mut cmd)?;
    let mut binaries = Vec::new();
    for line in stdout.lines() {
        let Ok(msg) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        let is_test_artifact = msg["reason"] == "compiler-artifact"
            && msg["profile"]["test"] == true
            // Only the libtest-mimic integration tests speak the results
            // contract; the library's unit-test harness does not.
            && msg["target"]["kind"]
                .as_array()
                .is_some_and(|k| k.iter().any(|k| k == kind));
        if let (true, Some(exe), Some(name)) =
            (is_test_artifact, msg["executable"].as_str(), msg["target"]["name"].as_str())
        {
            binaries.push(TestBinary { name: name.to_string(), path: PathBuf::from(exe) });
        }
    }
    if binaries.is_empty() {
        return Err(Error::NoTestBinaries);
    }
    binaries.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(binaries)
}

/// The suite name of a cargo test executable: `vm_types-0123456789abcdef` is
/// `vm_types`, the name its results carry.
fn suite_name(file: &str) -> &str {
    match file.rsplit_once('-') {
        Some((name, hash)) if hash.len() == 16 && hash.bytes().all(|b| b.is_ascii_hexdigit()) => name,
        _ => file,
    }
}

/// Nested virtualization is only used when the host KVM says it supports it;
/// otherwise QEMU emulates SVM in TCG.
pub fn host_can_nest() -> bool {
    let nested = ["/sys/module/kvm_amd/parameters/nested", "/sys/module/kvm_intel/parameters/nested"]
        .iter()
        .any(|p| fs::read_to_string(p).is_ok_and(|s| matches!(s.trim(), "1" | "Y" | "y")));
    nested && OpenOptions::new().read(true).write(true).open("/dev/kvm").is_ok()
}

/// Build (or reuse) everything, boot the guest and run the tests in it.
pub fn run(opts: &VmOpts) -> Result<RunOutcome> {
    util::ensure_requirements(&[req("qemu-system-x86_64", "qemu-system-x86"), req("busybox", "busybox-static")])?;
    let busybox = util::find_in_path("busybox").expect("just ensured");
    if let Some(k) = opts.kernel.as_ref().filter(|k| !k.is_file()) {
        return Err(Error::NoKernelImage(k.clone()));
    }
    // Built first: a broken test build is the host's problem and should stop
    // a bisection before any kernel work.
    let binaries = if opts.binaries.is_empty() {
        build_tests(opts.bench)?
    } else {
        opts.binaries
            .iter()
            .map(|p| {
                let path = p.canonicalize().map_err(|_| Error::NoSuchTestBinary(p.clone()))?;
                let file = path.file_name().map_or(String::new(), |n| n.to_string_lossy().into_owned());
                Ok(TestBinary { name: suite_name(&file).to_string(), path })
            })
            .collect::<Result<_>>()?
    };
    let known_failures = match &opts.known_failures {
        Some(list) => Some(list.canonicalize().map_err(io_err(list))?),
        None => None,
    };
    let kernel = match &opts.kernel {
        Some(k) => k.canonicalize().map_err(io_err(k))?,
        None => kernel::build(&opts.kernel_opts)?,
    };

    // Per process, so concurrent runs (a bisection next to an interactive
    // run) cannot clobber each other's init or results.
    let mut scratch = Scratch { dir: util::output_dir().join(format!("vm-{}", std::process::id())), keep: true };
    let run_dir = scratch.dir.clone();
    if run_dir.exists() {
        fs::remove_dir_all(&run_dir).map_err(io_err(&run_dir))?;
    }
    let results_dir = run_dir.join("results");
    util::create_dir_all(&results_dir)?;
    let init = run_dir.join("init");
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
    fs::write(&init, init_script(&busybox, &xtask, &binaries, &test_args, known_failures.as_deref()))
        .map_err(io_err(&init))?;
    set_executable(&init)?;

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
    let results = report::read_results(&results_dir.join("results.jsonl")).and_then(|mut r| {
        add_crashed_binaries(&mut r, &results_dir.join("exit-codes"))?;
        Ok(r)
    });
    let (guest, results) = match (guest, results) {
        (Ok(guest), results) => (guest, results?),
        (Err(e), Ok(mut partial)) if !partial.is_empty() => {
            // Tests ran before the guest died or hung: keep what they
            // reported, plus the reason, for CI artifacts.
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
    scratch.keep = false;
    Ok(RunOutcome { results, summary })
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

fn set_executable(path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(0o755)).map_err(io_err(path))
}

fn init_script(
    busybox: &Path,
    xtask: &Path,
    binaries: &[TestBinary],
    args: &[String],
    known_failures: Option<&Path>,
) -> String {
    let bb = busybox.display();
    let q = |p: &Path| shell_quote(&p.to_string_lossy());
    let mut s = format!(
        r#"#!{bb} sh
# Generated by `cargo xtask vm`; runs as PID 1 inside the guest.
bb={bb}
M={MARKER}
R=/run/results
die() {{ echo "$M $1"; $bb poweroff -f; }}
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
$bb mount -t proc proc /proc || die "setup-failed mounting /proc"
$bb mount -t sysfs sysfs /sys || die "setup-failed mounting /sys"
[ -c /dev/null ] || $bb mount -t devtmpfs devtmpfs /dev || die "setup-failed mounting /dev"
$bb mkdir -p /dev/shm && $bb mount -t tmpfs tmpfs /dev/shm
$bb mount -t tmpfs tmpfs /run || die "setup-failed mounting tmpfs on /run"
$bb mkdir -p $R /run/tmp
$bb mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 results $R \
    || die "setup-failed mounting the results share"
echo "$M init"
# 2 MiB huge pages for the hugetlb-backed conversion scenarios (128 MiB).
echo 64 > /proc/sys/vm/nr_hugepages
[ -c /dev/kvm ] || die "no-kvm"
probe=$({xtask} guest-probe --results $R/results.jsonl 2>&1)
rc=$?
# 126/127: the probe could not even be executed, which is not the kernel's fault.
[ $rc -ge 126 ] && die "setup-failed cannot run the guest probe: $probe"
[ $rc = 0 ] || die "probe-failed $probe"
echo "$M probe $probe"
export HOME=/run TMPDIR=/run/tmp RUST_BACKTRACE=1
export KVM_SELFTESTS_STRICT=1 KVM_SELFTESTS_RESULTS=$R/results.jsonl
"#,
        xtask = q(xtask),
    );
    // The host's suite settings (watchdog, seeds, budgets, ...) apply in the
    // guest too; the runner's own variables are set above.
    for (name, value) in forwarded_settings(env::vars()) {
        let _ = writeln!(s, "export {name}={}", shell_quote(&value));
    }
    if let Some(list) = known_failures {
        // The host's / is the guest's root, so the host path works as is.
        let _ = writeln!(s, "export KVM_SELFTESTS_KNOWN_FAILURES={}", q(list));
    }
    // cargo runs integration tests from the package directory; do the same.
    let _ = writeln!(s, "cd {} || die \"setup-failed cd\"", q(&util::workspace_root().join("tests")));
    let args: Vec<String> = args.iter().map(|a| shell_quote(a)).collect();
    for b in binaries {
        let name = shell_quote(&b.name);
        let _ =
            writeln!(s, "echo \"$M run \"{name}\n{} {}\necho {name} $? >> $R/exit-codes", q(&b.path), args.join(" "));
    }
    s.push_str("echo done > $R/status\n$bb sync\necho \"$M done\"\n$bb poweroff -f\n");
    s
}

/// The `KVM_SELFTESTS_*` variables to pass on to the guest: all but those
/// the runner sets itself.
fn forwarded_settings(vars: impl Iterator<Item = (String, String)>) -> Vec<(String, String)> {
    const OWN: [&str; 3] = ["KVM_SELFTESTS_STRICT", "KVM_SELFTESTS_RESULTS", "KVM_SELFTESTS_KNOWN_FAILURES"];
    let mut settings: Vec<(String, String)> = vars
        .filter(|(name, _)| {
            name.starts_with("KVM_SELFTESTS_")
                && !OWN.contains(&name.as_str())
                && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        })
        .collect();
    settings.sort();
    settings
}

fn qemu_command(kernel: &Path, init: &Path, results: &Path, accel: Accel) -> Command {
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-nodefaults", "-no-user-config", "-display", "none"]).args([
        "-serial",
        "stdio",
        "-no-reboot",
        "-M",
        "q35",
        "-m",
        "2G",
        "-smp",
        "2",
    ]);
    // Two NUMA nodes, one vCPU and half the memory each, so guest_memfd's
    // mbind()/allocation-placement tests run instead of skipping.
    for node in 0..2 {
        cmd.arg("-object").arg(format!("memory-backend-ram,id=mem{node},size=1G"));
        cmd.arg("-numa").arg(format!("node,nodeid={node},cpus={node},memdev=mem{node}"));
    }
    match accel {
        Accel::Kvm => cmd.args(["-accel", "kvm", "-cpu", "host"]),
        // Multi-threaded TCG oopsed the guest in 4 of 9 runs; single never.
        _ => cmd.args(["-accel", "tcg,thread=single", "-cpu", "max"]),
    };
    cmd.arg("-kernel").arg(kernel);
    // multidevs=remap: / spans several host filesystems; without it inode
    // numbers could collide in the guest.
    cmd.arg("-virtfs").arg("local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap");
    cmd.arg("-virtfs").arg(format!("local,path={},mount_tag=results,security_model=none", results.display()));
    cmd.arg("-append").arg(format!(
        "console=ttyS0 root=hostroot rootfstype=9p \
         rootflags=trans=virtio,version=9p2000.L,msize=262144 ro \
         init={} panic=-1 oops=panic quiet",
        init.display()
    ));
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::inherit());
    cmd
}

#[derive(Debug)]
enum Event {
    Marker(String),
    Panic,
    Eof,
}

/// What was seen of the guest; explains a run that did not finish.
#[derive(Debug, Default)]
struct Guest {
    booted: bool,
    first_test: Option<Duration>,
    done: Option<Duration>,
    panicked: bool,
    failure: Option<String>,
    exit: Option<std::process::ExitStatus>,
}

impl Guest {
    fn failure(&self) -> Error {
        if let Some(f) = &self.failure {
            if f == "no-kvm" {
                return Error::GuestNoKvm;
            }
            if let Some(m) = f.strip_prefix("probe-failed ") {
                return Error::GuestMissingFeature(m.to_string());
            }
            if let Some(m) = f.strip_prefix("setup-failed ") {
                return Error::GuestSetup(m.to_string());
            }
        }
        if self.panicked {
            return Error::KernelPanic { during_tests: self.first_test.is_some() };
        }
        match self.exit {
            Some(status) => Error::QemuExited { status, booted: self.booted },
            None => Error::GuestSetup("the guest stopped without a verdict".into()),
        }
    }
}

/// Run QEMU to completion, streaming its console and enforcing the boot and
/// overall deadlines; QEMU is killed rather than waited on forever.
fn supervise(cmd: &mut Command, boot_timeout: u64, timeout: u64) -> Result<Guest> {
    let start = Instant::now();
    let mut child = cmd.spawn().map_err(|source| Error::Spawn { cmd: util::describe(cmd), source })?;
    let stdout = child.stdout.take().expect("stdout is piped");
    let (tx, rx) = mpsc::channel();
    let reader = thread::spawn(move || stream_console(stdout, &tx));

    let mut guest = Guest::default();
    let boot_deadline = start + Duration::from_secs(boot_timeout);
    let run_deadline = start + Duration::from_secs(timeout);
    loop {
        let deadline = if guest.booted { run_deadline } else { boot_deadline.min(run_deadline) };
        let wait = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(wait) {
            Ok(Event::Marker(m)) => {
                let (kind, _) = m.split_once(' ').unwrap_or((&m, ""));
                match kind {
                    "init" => guest.booted = true,
                    "run" if guest.first_test.is_none() => guest.first_test = Some(start.elapsed()),
                    "done" => guest.done = Some(start.elapsed()),
                    "no-kvm" | "probe-failed" | "setup-failed" => guest.failure = Some(m),
                    _ => {}
                }
            }
            Ok(Event::Panic) => guest.panicked = true,
            Ok(Event::Eof) | Err(RecvTimeoutError::Disconnected) => break,
            Err(RecvTimeoutError::Timeout) => {
                kill(&mut child);
                reader.join().ok();
                return Err(if guest.booted {
                    Error::RunTimeout(timeout)
                } else {
                    Error::BootTimeout(boot_timeout.min(timeout))
                });
            }
        }
    }
    reader.join().ok();
    // The console closed, so QEMU is exiting; still bound the wait.
    let grace = Instant::now() + Duration::from_secs(10);
    loop {
        match child.try_wait() {
            Ok(Some(status)) => {
                guest.exit = Some(status);
                break;
            }
            Ok(None) if Instant::now() < grace => thread::sleep(Duration::from_millis(50)),
            _ => {
                kill(&mut child);
                break;
            }
        }
    }
    Ok(guest)
}

fn kill(child: &mut Child) {
    child.kill().ok();
    child.wait().ok();
}

/// Copy the console to stdout byte for byte while picking out marker and
/// panic lines.
fn stream_console(stdout: impl Read, tx: &mpsc::Sender<Event>) {
    let mut reader = BufReader::new(stdout);
    let mut line = Vec::new();
    let out = io::stdout();
    loop {
        let buf = match reader.fill_buf() {
            Ok([]) | Err(_) => break,
            Ok(buf) => buf,
        };
        let n = buf.len();
        let mut lock = out.lock();
        lock.write_all(buf).ok();
        lock.flush().ok();
        drop(lock);
        for &b in buf {
            if b != b'\n' {
                line.push(b);
                continue;
            }
            let text = String::from_utf8_lossy(&line);
            let text = text.trim_end_matches('\r');
            if let Some(m) = text.strip_prefix(MARKER) {
                tx.send(Event::Marker(m.trim().to_string())).ok();
            } else if text.contains("Kernel panic - not syncing") {
                tx.send(Event::Panic).ok();
            }
            line.clear();
        }
        reader.consume(n);
    }
    tx.send(Event::Eof).ok();
}

/// A binary that died (signal, abort, harness bug) may not have recorded any
/// failure; make its exit status visible as one.
fn add_crashed_binaries(results: &mut Vec<TestResult>, exit_codes: &Path) -> Result<()> {
    let text = match fs::read_to_string(exit_codes) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err(exit_codes)(e)),
    };
    for line in text.lines() {
        let Some((name, code)) = line.rsplit_once(' ') else {
            continue;
        };
        let recorded_failure = results.iter().any(|r| r.binary == name && r.outcome == Outcome::Fail);
        if code != "0" && !recorded_failure {
            results.push(TestResult {
                binary: name.to_string(),
                test: "exit_status".to_string(),
                outcome: Outcome::Fail,
                duration_ms: 0,
                message: format!("{name} exited with status {code} without reporting a failed test"),
            });
        }
    }
    Ok(())
}

/// Read lines from the init script's view: used by tests.
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_quotes_arguments() {
        let s = init_script(
            Path::new("/bin/busybox"),
            Path::new("/x/xtask"),
            &[TestBinary { name: "vm_types".into(), path: "/t/vm types-1".into() }],
            &["it's".into(), "--exact".into()],
            Some(Path::new("/k/known failures.txt")),
        );
        assert!(s.starts_with("#!/bin/busybox sh\n"));
        assert!(s.contains("export KVM_SELFTESTS_KNOWN_FAILURES='/k/known failures.txt'\n"));
        assert!(s.contains("'/t/vm types-1' 'it'\\''s' '--exact'\n"));
        assert!(s.contains("echo 'vm_types' $? >> $R/exit-codes"));
    }

    #[test]
    fn suite_settings_reach_the_guest_but_not_the_runners_own() {
        let vars = [
            ("KVM_SELFTESTS_SEED", "0x5"),
            ("KVM_SELFTESTS_STRICT", "0"),
            ("KVM_SELFTESTS_RESULTS", "/x"),
            ("HOME", "/root"),
            ("KVM_SELFTESTS_TIMEOUT", "30"),
        ]
        .map(|(n, v)| (n.to_string(), v.to_string()));
        let names: Vec<String> = forwarded_settings(vars.into_iter()).into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["KVM_SELFTESTS_SEED", "KVM_SELFTESTS_TIMEOUT"]);
    }

    #[test]
    fn suite_names_drop_cargo_hashes_only() {
        assert_eq!(suite_name("vm_types-0123456789abcdef"), "vm_types");
        assert_eq!(suite_name("pre_fault_memory-89abcdef01234567"), "pre_fault_memory");
        assert_eq!(suite_name("my-test"), "my-test");
        assert_eq!(suite_name("plain"), "plain");
    }

    #[test]
    fn crashed_binary_becomes_failure() {
        let dir = env::temp_dir().join(format!("xtask-vm-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let f = dir.join("exit-codes");
        fs::write(&f, "a 0\nb 139\n").unwrap();
        let mut results = Vec::new();
        add_crashed_binaries(&mut results, &f).unwrap();
        assert_eq!(results.len(), 1);
        assert_eq!(results[0].binary, "b");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn markers_and_panics_are_seen() {
        let console = b"noise\r\n@@KVM-SELFTESTS@@ init\r\nKernel panic - not syncing: x\r\n";
        let (tx, rx) = mpsc::channel();
        stream_console(&console[..], &tx);
        let events: Vec<_> = rx.try_iter().map(|e| format!("{e:?}")).collect();
        assert_eq!(events, ["Marker(\"init\")", "Panic", "Eof"]);
    }
}
