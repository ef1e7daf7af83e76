//! QEMU: the command line, and supervising a run to its end (streaming the
//! console, catching markers and panics, enforcing deadlines).

use std::fs::{self, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::guest_init::MARKER;
use crate::host_share::HostShare;
use crate::util;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Auto,
    Tcg,
    Kvm,
}

/// Nested virtualization is only used when the host KVM says it supports it;
/// otherwise QEMU emulates SVM in TCG.
pub fn host_can_nest() -> bool {
    let nested = ["/sys/module/kvm_amd/parameters/nested", "/sys/module/kvm_intel/parameters/nested"]
        .iter()
        .any(|p| fs::read_to_string(p).is_ok_and(|s| matches!(s.trim(), "1" | "Y" | "y")));
    nested && OpenOptions::new().read(true).write(true).open("/dev/kvm").is_ok()
}

pub fn qemu_command(kernel: &Path, init: &Path, results: &Path, accel: Accel) -> Command {
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
        "2,sockets=2",
    ]);
    // Two NUMA nodes, one vCPU and half the memory each, so guest_memfd's
    // mbind()/allocation-placement tests run instead of skipping. One
    // socket per vCPU: two vCPUs of one socket share its last-level cache,
    // and a cache shared across nodes makes the guest kernel WARN at boot
    // (topology_sane(), "llc-sibling CPU #0 is not on the same node"),
    // which the kernel-log oracle rightly fails the run for.
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
    // cache=loose on the root: run.sh execs the host's sh, setsid, sleep and
    // grep from it around every binary, and without a page cache each exec
    // read them over 9p again (54 ms for /bin/true, 118 ms for a grep, under
    // TCG; 34 and 61 ms cached). Nothing the guest reads there changes
    // during a run: the bundle is copied to tmpfs and the files xtask
    // prepares (history, known failures, C tests) are written before boot.
    // The results share, which the host reads live, stays uncached.
    // no_timer_check: under TCG on a loaded host the guest's IO-APIC timer
    // check can miss its window and panic the boot ("IO-APIC + timer doesn't
    // work!", seen once in ten runs at load 10); KVM guests skip the check
    // for the same reason.
    cmd.arg("-append").arg(format!(
        "console=ttyS0 no_timer_check root=hostroot rootfstype=9p \
         rootflags=trans=virtio,version=9p2000.L,msize=262144,cache=loose ro \
         init={} panic=-1 oops=panic quiet",
        init.display()
    ));
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::inherit());
    cmd
}

#[derive(Debug)]
enum Event {
    Marker(String),
    /// A line of a kernel oops or panic report (timestamp stripped).
    Crash(String),
    Panic(String),
    Eof,
}

/// How QEMU's run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// QEMU exited (a guest's poweroff, or a panic with `-no-reboot`).
    Exited(ExitStatus),
    /// The guest did not reach init in this many seconds; QEMU was killed.
    BootTimeout(u64),
    /// The whole run took longer than this many seconds; QEMU was killed.
    RunTimeout(u64),
    /// The console closed but QEMU did not exit; it was killed.
    Lingered,
}

/// What was seen of the guest on its console; explains a run that did not
/// finish, and names what was running when it stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Guest {
    pub booted: bool,
    /// Since QEMU started: the first test binary began.
    pub first_test: Option<Duration>,
    /// Since QEMU started: the init reported every binary done.
    pub done: Option<Duration>,
    /// Binaries and C tests started and not yet ended, in start order.
    pub running: Vec<String>,
    /// Binaries and C tests whose time limit ran out: (name, seconds).
    pub limits_hit: Vec<(String, u64)>,
    /// The first lines of a kernel oops report, if one was printed.
    pub oops: Vec<String>,
    /// The `Kernel panic - not syncing: ...` line, if the kernel panicked.
    pub panic: Option<String>,
    /// The init's no-kvm / probe-failed / setup-failed marker.
    pub failure: Option<String>,
    pub end: End,
    /// QEMU's share of a host CPU while each binary ran (`host_share`).
    pub host_share: std::collections::BTreeMap<String, u32>,
}

/// Oops lines kept for the failure record: the cause, then where it was.
const OOPS_LINES: usize = 4;

impl Guest {
    pub(crate) fn new() -> Self {
        Guest {
            booted: false,
            first_test: None,
            done: None,
            running: Vec::new(),
            limits_hit: Vec::new(),
            oops: Vec::new(),
            panic: None,
            failure: None,
            end: End::RunTimeout(0),
            host_share: std::collections::BTreeMap::new(),
        }
    }

    fn see(&mut self, event: Event, since_start: Duration) {
        match event {
            Event::Marker(m) => self.marker(&m, since_start),
            // The panic repeats the oops's RIP in its own stack dump.
            Event::Crash(line) if self.oops.len() < OOPS_LINES && !self.oops.contains(&line) => self.oops.push(line),
            Event::Panic(line) => {
                self.panic.get_or_insert(line);
            }
            Event::Crash(_) | Event::Eof => {}
        }
    }

    fn marker(&mut self, m: &str, since_start: Duration) {
        let (kind, rest) = m.split_once(' ').unwrap_or((m, ""));
        match kind {
            "init" => self.booted = true,
            "run" => {
                self.first_test.get_or_insert(since_start);
                self.running.push(rest.to_string());
            }
            "end" => {
                let name = ended_binary(rest);
                if let Some(at) = self.running.iter().position(|r| r == name) {
                    self.running.remove(at);
                }
            }
            "timeout" => {
                if let Some((name, secs)) = rest.rsplit_once(' ') {
                    self.limits_hit.push((name.to_string(), secs.parse().unwrap_or(0)));
                }
            }
            "done" => self.done = Some(since_start),
            // The first one says why; run.sh's caller may add its own after it.
            "no-kvm" | "probe-failed" | "setup-failed" => {
                self.failure.get_or_insert_with(|| m.to_string());
            }
            _ => {}
        }
    }

    /// Why a guest that never reached the tests gave no verdict.
    pub fn failure(&self) -> Error {
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
        if self.panic.is_some() {
            return Error::KernelPanic { during_tests: self.first_test.is_some() };
        }
        match self.end {
            End::BootTimeout(secs) => Error::BootTimeout(secs),
            End::RunTimeout(secs) => Error::RunTimeout(secs),
            End::Exited(status) => Error::QemuExited { status, booted: self.booted },
            End::Lingered => Error::GuestSetup("the guest stopped without a verdict".into()),
        }
    }

    /// What stopped a guest after its tests had started: the kernel's own
    /// words where it printed any.
    pub fn death(&self) -> String {
        let what = match (&self.panic, self.end) {
            (Some(panic), _) => {
                let mut lines: Vec<&str> = self.oops.iter().map(String::as_str).collect();
                lines.push(panic);
                format!("the guest kernel panicked: {}", lines.join(" | "))
            }
            (None, End::RunTimeout(secs)) => {
                format!("the guest stopped responding: the run exceeded its limit of {secs} s and QEMU was killed")
            }
            (None, End::BootTimeout(secs)) => format!("the guest did not boot within {secs} s"),
            (None, End::Exited(status)) => format!("QEMU exited ({status}) before the guest finished its tests"),
            (None, End::Lingered) => "the guest's console closed before it finished its tests".to_string(),
        };
        let what = if self.panic.is_none() && !self.oops.is_empty() {
            format!("{what}; the kernel reported: {}", self.oops.join(" | "))
        } else {
            what
        };
        let hit: Vec<String> = self
            .limits_hit
            .iter()
            .filter(|(name, _)| self.running.contains(name))
            .map(|(name, secs)| format!("{name} had run out of its time limit of {secs} s and did not die when killed"))
            .collect();
        if hit.is_empty() {
            what
        } else {
            format!("{what} ({})", hit.join("; "))
        }
    }
}

/// Run QEMU to completion, streaming its console and enforcing the boot and
/// overall deadlines; QEMU is killed rather than waited on forever.
/// The console is also written, as it arrives, to `console`.
pub fn supervise(cmd: &mut Command, boot_timeout: u64, timeout: u64, console: &Path) -> Result<Guest> {
    let start = Instant::now();
    let log = fs::File::create(console).map_err(util::io_err(console))?;
    let mut child = cmd.spawn().map_err(|source| Error::Spawn { cmd: util::describe(cmd), source })?;
    let stdout = Tee { inner: child.stdout.take().expect("stdout is piped"), log };
    let (tx, rx) = mpsc::channel();
    let reader = thread::spawn(move || stream_console(stdout, &tx));

    let mut guest = Guest::new();
    let mut share = HostShare::new(child.id());
    let boot_deadline = start + Duration::from_secs(boot_timeout);
    let run_deadline = start + Duration::from_secs(timeout);
    loop {
        let deadline = if guest.booted { run_deadline } else { boot_deadline.min(run_deadline) };
        let wait = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(wait) {
            Ok(Event::Eof) | Err(RecvTimeoutError::Disconnected) => break,
            Ok(event) => {
                share.see(&event);
                guest.see(event, start.elapsed());
            }
            Err(RecvTimeoutError::Timeout) => {
                kill(&mut child);
                reader.join().ok();
                guest.host_share = share.per_binary;
                guest.end =
                    if guest.booted { End::RunTimeout(timeout) } else { End::BootTimeout(boot_timeout.min(timeout)) };
                return Ok(guest);
            }
        }
    }
    reader.join().ok();
    guest.host_share = std::mem::take(&mut share.per_binary);
    // The console closed, so QEMU is exiting; still bound the wait.
    let grace = Instant::now() + Duration::from_secs(10);
    loop {
        match child.try_wait() {
            Ok(Some(status)) => {
                guest.end = End::Exited(status);
                break;
            }
            Ok(None) if Instant::now() < grace => thread::sleep(Duration::from_millis(50)),
            _ => {
                kill(&mut child);
                guest.end = End::Lingered;
                break;
            }
        }
    }
    Ok(guest)
}

/// A reader that copies what it reads into a file: the run's console log.
struct Tee<R> {
    inner: R,
    log: fs::File,
}

impl<R: Read> Read for Tee<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        // A full disk must not stop the run; the terminal still has it all.
        let _ = self.log.write_all(&buf[..n]);
        Ok(n)
    }
}

/// The binary an `end NAME RC` marker names, from what follows `end `.
fn ended_binary(rest: &str) -> &str {
    rest.rsplit_once(' ').map_or(rest, |(name, _rc)| name)
}

impl HostShare {
    /// Starts or ends a binary's measurement at its `run`/`end` marker.
    fn see(&mut self, event: &Event) {
        let Event::Marker(m) = event else { return };
        match m.split_once(' ') {
            Some(("run", name)) => self.start(name),
            Some(("end", rest)) => self.end(ended_binary(rest)),
            _ => {}
        }
    }
}

fn kill(child: &mut Child) {
    child.kill().ok();
    child.wait().ok();
}

/// How the lines of a kernel oops report that say what and where begin.
/// Only the kernel's RIP (`0010`, its code segment): the user one, `0033`,
/// says nothing about the bug.
const OOPS_STARTS: &[&str] =
    &["kernel BUG at", "BUG: ", "Oops: ", "general protection fault", "Unable to handle", "RIP: 0010:"];

/// A kernel message without its `[   12.345678] ` timestamp.
fn without_timestamp(line: &str) -> &str {
    match line.trim_start().strip_prefix('[').and_then(|rest| rest.split_once("] ")) {
        Some((stamp, msg)) if stamp.trim().bytes().all(|b| b.is_ascii_digit() || b == b'.') => msg,
        _ => line,
    }
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
            } else {
                let msg = without_timestamp(text);
                if msg.starts_with("Kernel panic - not syncing") {
                    tx.send(Event::Panic(msg.to_string())).ok();
                } else if OOPS_STARTS.iter().any(|s| msg.starts_with(s)) {
                    tx.send(Event::Crash(msg.to_string())).ok();
                }
            }
            line.clear();
        }
        reader.consume(n);
    }
    tx.send(Event::Eof).ok();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The guest as the supervisor sees it after this console output and end.
    fn seen(console: &str, end: End) -> Guest {
        let (tx, rx) = mpsc::channel();
        stream_console(console.as_bytes(), &tx);
        let mut guest = Guest::new();
        for (n, event) in rx.try_iter().enumerate() {
            guest.see(event, Duration::from_secs(n as u64));
        }
        guest.end = end;
        guest
    }

    #[test]
    fn markers_and_panics_are_seen() {
        let console = "noise\r\n@@KVM-SELFTESTS@@ init\r\n[    3.250000] Kernel panic - not syncing: x\r\n";
        let (tx, rx) = mpsc::channel();
        stream_console(console.as_bytes(), &tx);
        let events: Vec<_> = rx.try_iter().map(|e| format!("{e:?}")).collect();
        assert_eq!(events, ["Marker(\"init\")", "Panic(\"Kernel panic - not syncing: x\")", "Eof"]);
    }

    #[test]
    fn the_first_failure_marker_says_why_the_guest_stopped() {
        let console = "@@KVM-SELFTESTS@@ init\n@@KVM-SELFTESTS@@ probe-failed no protected VMs\n\
                       @@KVM-SELFTESTS@@ setup-failed run.sh stopped before the tests (exit status 2)\n";
        let guest = seen(console, End::Exited(ExitStatus::default()));
        assert!(matches!(guest.failure(), Error::GuestMissingFeature(m) if m == "no protected VMs"));
    }

    #[test]
    fn a_panic_names_the_binary_that_was_running_and_the_kernels_words() {
        let console = "@@KVM-SELFTESTS@@ init\n@@KVM-SELFTESTS@@ run vm_types\n@@KVM-SELFTESTS@@ end vm_types 0\n\
                       @@KVM-SELFTESTS@@ run pre_fault_memory\n\
                       [   40.1] kernel BUG at arch/x86/kvm/mmu/mmu.c:4777!\n\
                       [   40.1] Oops: invalid opcode: 0000 [#1] SMP\n[   40.1] CPU: 1 PID: 77\n\
                       [   40.1] RIP: 0010:kvm_tdp_map_page+0x1/0x2\n[   40.1] RIP: 0033:0x7f\n[   40.1] RSP: 0\n\
                       [   40.1] RIP: 0010:kvm_tdp_map_page+0x1/0x2\n[   40.2] Kernel panic - not syncing: Fatal exception\n";
        let guest = seen(console, End::Exited(ExitStatus::default()));
        assert_eq!(guest.first_test, Some(Duration::from_secs(1)));
        assert_eq!(guest.running, ["pre_fault_memory"]);
        assert_eq!(
            guest.death(),
            "the guest kernel panicked: kernel BUG at arch/x86/kvm/mmu/mmu.c:4777! | Oops: invalid opcode: 0000 \
             [#1] SMP | RIP: 0010:kvm_tdp_map_page+0x1/0x2 | Kernel panic - not syncing: Fatal exception"
        );
        assert!(matches!(guest.failure(), Error::KernelPanic { during_tests: true }));
    }

    #[test]
    fn a_hang_past_the_time_limit_says_the_kill_did_not_end_it() {
        let console = "@@KVM-SELFTESTS@@ init\n@@KVM-SELFTESTS@@ run a b\n@@KVM-SELFTESTS@@ run c\n\
                       @@KVM-SELFTESTS@@ end c 1\n@@KVM-SELFTESTS@@ timeout c 9\n@@KVM-SELFTESTS@@ timeout a b 60\n";
        let guest = seen(console, End::RunTimeout(600));
        assert_eq!(guest.running, ["a b"]);
        assert_eq!(guest.limits_hit, [("c".to_string(), 9), ("a b".to_string(), 60)]);
        assert_eq!(
            guest.death(),
            "the guest stopped responding: the run exceeded its limit of 600 s and QEMU was killed (a b had run \
             out of its time limit of 60 s and did not die when killed)"
        );
    }
}
