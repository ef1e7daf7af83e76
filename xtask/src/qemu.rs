//! QEMU: the command line, and supervising a run to its end (streaming the
//! console, catching markers and panics, enforcing deadlines).

use std::fs::{self, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::guest_init::MARKER;
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
pub struct Guest {
    booted: bool,
    /// Since QEMU started: the first test binary began.
    pub first_test: Option<Duration>,
    /// Since QEMU started: the init reported every binary done.
    pub done: Option<Duration>,
    panicked: bool,
    failure: Option<String>,
    exit: Option<std::process::ExitStatus>,
}

impl Guest {
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
pub fn supervise(cmd: &mut Command, boot_timeout: u64, timeout: u64) -> Result<Guest> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_and_panics_are_seen() {
        let console = b"noise\r\n@@KVM-SELFTESTS@@ init\r\nKernel panic - not syncing: x\r\n";
        let (tx, rx) = mpsc::channel();
        stream_console(&console[..], &tx);
        let events: Vec<_> = rx.try_iter().map(|e| format!("{e:?}")).collect();
        assert_eq!(events, ["Marker(\"init\")", "Panic", "Eof"]);
    }
}
