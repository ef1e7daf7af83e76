//! The kernel-log oracle: a test fails when the kernel printed a warning,
//! BUG, lockdep, KASAN, UBSAN, RCU-stall or hung-task report while it ran.
//!
//! A test's window is its own reader of `/dev/kmsg`, opened and moved to
//! the end of the log just before the body runs and read to its end just
//! after (an open, an `lseek` and a few `read`s: microseconds). Tests run
//! in parallel threads of one binary, and a report printed while several
//! windows were open cannot be pinned to one of them: every test whose
//! window holds it fails with it, and the message names the tests that ran
//! at the same time (`--test-threads=1` pins it). Each window's verdict is
//! also written, with the sequence numbers of the reports it saw, next to
//! the results file ([`seen_path`]), so that the final check of a run
//! ([`check_run`], `guest_probe --kernel-log` in the guest) can fail the run
//! for each report no test saw: boot, the probe, between binaries, or a
//! test binary's own start and end, each placed by the `kvm-selftests:`
//! lines every binary writes to the log when it starts and ends.
//!
//! Where `/dev/kmsg` cannot be read (a host `cargo test` without
//! `CAP_SYSLOG`, a kernel without `CONFIG_PRINTK`) or
//! [`KERNEL_LOG_ENV`]`=off`, the oracle is off: each binary says so once,
//! tests are not failed, and no test is recorded as checked.

use std::collections::{BTreeSet, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::results::{self, Outcome, Record};

/// The kernel log device.
pub const KMSG_PATH: &str = "/dev/kmsg";
/// Environment variable: `off` turns the oracle off (`on`, the default,
/// checks wherever [`KMSG_PATH`] can be read).
pub const KERNEL_LOG_ENV: &str = "KVM_SELFTESTS_KERNEL_LOG";
/// Lines of a report quoted in a failure.
pub const QUOTED_LINES: usize = 15;
/// What a message of the kernel must contain to start a report. Matched
/// in kernel records only (facility 0), so that nothing user space writes
/// to the log counts.
pub const REPORT_MARKERS: &[&str] = &[
    // WARN(), WARN_ON(), KVM_BUG_ON() and lockdep's headers ("WARNING:
    // possible circular locking dependency detected", "WARNING: suspicious
    // RCU usage", "WARNING: inconsistent lock state").
    "WARNING:",
    // BUG(), KASAN ("BUG: KASAN: slab-use-after-free"), sleeping in atomic
    // context, page faults, soft lockups, lockdep running out of room.
    "BUG:",
    "kernel BUG at",
    "KVM_BUG_ON",
    "UBSAN:",
    "possible circular locking",
    "possible recursive locking",
    "suspicious RCU usage",
    "inconsistent lock state",
    "self-detected stall",
    "detected stalls on CPUs",
    "RCU Stall",
    // The hung-task detector: "INFO: task X:12 blocked for more than 120 seconds."
    "blocked for more than",
    "Oops",
    "general protection fault",
    "Kernel panic",
    // CONFIG_BUG_ON_DATA_CORRUPTION's list checks, before their BUG().
    "list_add corruption",
    "list_del corruption",
];
/// How every binary's start and end lines in the log begin.
const BINARY_MARK: &str = "kvm-selftests: binary ";

/// One record of the kernel log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogRecord {
    /// Its sequence number, unique for the boot.
    pub seq: u64,
    /// 0 for the kernel, 1 (user) for lines user space wrote.
    pub facility: u8,
    /// Its level (0 emergency .. 7 debug).
    pub level: u8,
    /// Microseconds since boot.
    pub usec: u64,
    /// The message, with the kernel's `\x0a` escapes turned back into lines.
    pub text: String,
}

impl LogRecord {
    /// Parses one `/dev/kmsg` read: `prio,seq,usec,flags[,..];text\n`
    /// followed by ` KEY=value` lines, which are dropped.
    pub fn parse(raw: &[u8]) -> Option<LogRecord> {
        let raw = String::from_utf8_lossy(raw);
        let (header, rest) = raw.split_once(';')?;
        let mut fields = header.split(',');
        let prio: u32 = fields.next()?.parse().ok()?;
        let seq = fields.next()?.parse().ok()?;
        let usec = fields.next()?.parse().ok()?;
        let text = rest.split('\n').next().unwrap_or("").replace("\\x0a", "\n").replace("\\x5c", "\\");
        Some(LogRecord { seq, facility: (prio >> 3) as u8, level: (prio & 7) as u8, usec, text })
    }

    /// Whether this is a kernel message that starts a report.
    pub fn starts_report(&self) -> bool {
        self.facility == 0 && REPORT_MARKERS.iter().any(|m| self.text.contains(m))
    }

    /// The record as `dmesg` shows it, with its sequence number.
    pub fn line(&self) -> String {
        format!("[{:5}.{:06}] #{} {}", self.usec / 1_000_000, self.usec % 1_000_000, self.seq, self.text)
    }
}

/// A report found in the log: where it starts and its first lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// The sequence number of its first record.
    pub seq: u64,
    /// Its first [`QUOTED_LINES`] lines, timestamps dropped.
    pub lines: Vec<String>,
}

impl Report {
    /// The report's lines, indented, for a failure message.
    pub fn quote(&self) -> String {
        self.lines.iter().map(|l| format!("    {l}")).collect::<Vec<_>>().join("\n")
    }
}

/// The reports in `records`: each starts at a record a marker matches and
/// takes the kernel lines after it, up to [`QUOTED_LINES`], the next
/// report's start (or the `[ cut here ]` line before it) or the
/// `---[ end trace` line that closes a WARN or an oops, without its
/// register and code dump.
pub fn reports(records: &[LogRecord]) -> Vec<Report> {
    let mut found = Vec::new();
    for (i, record) in records.iter().enumerate().filter(|(_, r)| r.starts_report()) {
        let mut lines: Vec<String> = record.text.lines().map(String::from).collect();
        for r in records[i + 1..].iter().filter(|r| r.facility == 0) {
            // A WARN's first line, "[ cut here ]", comes before its marker.
            if r.starts_report() || r.text.contains("[ cut here ]") || lines.len() >= QUOTED_LINES {
                break;
            }
            lines.extend(r.text.lines().filter(|l| !is_register_dump(l)).map(String::from));
            if r.text.contains("---[ end trace") {
                break;
            }
        }
        lines.truncate(QUOTED_LINES);
        found.push(Report { seq: record.seq, lines });
    }
    found
}

/// The lines of an x86 oops or WARN that dump machine state (code bytes,
/// registers): left out of the quote so that its 15 lines reach the call
/// trace; the whole report is in the kept kernel log.
fn is_register_dump(line: &str) -> bool {
    const DUMPS: &[&str] =
        &["Code: ", "RSP: ", "RAX: ", "RDX: ", "RBP: ", "R10: ", "R13: ", "FS: ", "CS: ", "CR2: ", "DR0: ", "DR3: "];
    let line = line.trim_start();
    DUMPS.iter().any(|d| line.starts_with(d)) || line.starts_with("PKRU: ")
}

/// A reader of the kernel log from some position on.
#[derive(Debug)]
pub struct Reader {
    file: File,
    /// Records overwritten before this reader got to them.
    pub lost: u64,
}

impl Reader {
    /// A reader at the oldest record the kernel still holds.
    pub fn from_start() -> io::Result<Reader> {
        // Non-blocking: a read past the newest record fails with EAGAIN
        // instead of waiting for the next message.
        let file = OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(KMSG_PATH)?;
        Ok(Reader { file, lost: 0 })
    }

    /// A reader that sees only records logged from now on.
    pub fn from_now() -> io::Result<Reader> {
        let mut reader = Reader::from_start()?;
        // /dev/kmsg's SEEK_END moves to the record after the newest.
        reader.file.seek(SeekFrom::End(0))?;
        Ok(reader)
    }

    /// Every record logged since the last read (or the position the reader
    /// started at).
    pub fn read_new(&mut self) -> io::Result<Vec<LogRecord>> {
        // One read returns one record; the kernel's longest is 8 KiB of
        // text plus its header and dictionary.
        let mut buf = vec![0u8; 16 * 1024];
        let mut records = Vec::new();
        loop {
            match self.file.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => records.extend(LogRecord::parse(&buf[..n])),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                // The ring buffer overwrote records before we read them;
                // the next read returns the oldest one left.
                Err(e) if e.raw_os_error() == Some(libc::EPIPE) => self.lost += 1,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(records)
    }
}

/// Whether this process checks the kernel log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Oracle {
    /// Each test's window is read.
    On,
    /// Not checked, and why.
    Off(String),
}

/// The oracle of this process, decided once: [`KERNEL_LOG_ENV`], then
/// whether [`KMSG_PATH`] opens.
pub fn oracle() -> &'static Oracle {
    static ORACLE: OnceLock<Oracle> = OnceLock::new();
    ORACLE.get_or_init(|| match std::env::var(KERNEL_LOG_ENV).as_deref().map(str::trim) {
        Ok("off" | "0" | "no" | "false") => Oracle::Off(format!("turned off by {KERNEL_LOG_ENV}")),
        _ => match Reader::from_now() {
            Ok(_) => Oracle::On,
            Err(e) => Oracle::Off(format!("cannot read {KMSG_PATH}: {e}")),
        },
    })
}

/// Checks [`KERNEL_LOG_ENV`]'s value: a typo must not silently leave the
/// oracle on or off.
pub fn check_setting() -> Result<()> {
    match std::env::var(KERNEL_LOG_ENV) {
        Err(std::env::VarError::NotPresent) => Ok(()),
        Ok(v) if matches!(v.trim(), "" | "on" | "1" | "yes" | "true" | "off" | "0" | "no" | "false") => Ok(()),
        Ok(v) => Err(Error::Config(format!("{KERNEL_LOG_ENV}={v:?}: expected on or off"))),
        Err(e) => Err(Error::Config(format!("{KERNEL_LOG_ENV}: {e}"))),
    }
}

/// Writes a user-space line into the kernel log (best effort: a kernel
/// that refuses it still gets checked, its reports placed less exactly).
fn mark(line: &str) {
    if let Ok(mut f) = OpenOptions::new().write(true).open(KMSG_PATH) {
        // <14>: facility user, level info.
        let _ = f.write_all(format!("<14>{line}\n").as_bytes());
    }
}

/// Marks a binary's start in the log (see [`check_run`]).
pub fn mark_binary_start(binary: &str) {
    if *oracle() == Oracle::On {
        mark(&format!("{BINARY_MARK}{binary} start"));
    }
}

/// Marks a binary's end in the log.
pub fn mark_binary_end(binary: &str) {
    if *oracle() == Oracle::On {
        mark(&format!("{BINARY_MARK}{binary} end"));
    }
}

/// The tests of this process whose windows are open, each with the set of
/// tests its window overlapped.
type Open = Vec<(u64, String, Arc<Mutex<BTreeSet<String>>>)>;

fn open_windows() -> &'static Mutex<Open> {
    static OPEN: OnceLock<Mutex<Open>> = OnceLock::new();
    OPEN.get_or_init(|| Mutex::new(Vec::new()))
}

/// Takes window `id` off the list of open ones.
fn forget_window(id: u64) {
    open_windows().lock().unwrap_or_else(|p| p.into_inner()).retain(|(open, _, _)| *open != id);
}

/// One test's view of the kernel log, from just before its body ran.
#[derive(Debug)]
pub struct Window {
    reader: Reader,
    id: u64,
    overlapped: Arc<Mutex<BTreeSet<String>>>,
}

/// What a test's window held.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Seen {
    /// The reports logged while the test ran.
    pub reports: Vec<Report>,
    /// Other tests of this binary that ran during some of that time.
    pub overlapped: Vec<String>,
    /// Records overwritten before they could be read.
    pub lost: u64,
}

impl Window {
    /// Opens `test`'s window; `Err` names why the log cannot be read (the
    /// test is then not checked).
    pub fn open(test: &str) -> std::result::Result<Window, String> {
        if let Oracle::Off(why) = oracle() {
            return Err(why.clone());
        }
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let id = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let overlapped = Arc::new(Mutex::new(BTreeSet::new()));
        {
            let mut open = open_windows().lock().unwrap_or_else(|p| p.into_inner());
            for (_, name, theirs) in open.iter() {
                theirs.lock().unwrap_or_else(|p| p.into_inner()).insert(test.to_string());
                overlapped.lock().unwrap_or_else(|p| p.into_inner()).insert(name.clone());
            }
            open.push((id, test.to_string(), overlapped.clone()));
        }
        // Opened after registering, so a report of a test that overlapped
        // ours is never in our window without its name in our list.
        match Reader::from_now() {
            Ok(reader) => Ok(Window { reader, id, overlapped }),
            Err(e) => {
                // No window: later tests must not count this one as open.
                forget_window(id);
                Err(format!("cannot read {KMSG_PATH}: {e}"))
            }
        }
    }

    /// Closes the window: the reports logged since it opened.
    pub fn close(mut self) -> std::result::Result<Seen, String> {
        let records = self.reader.read_new().map_err(|e| format!("reading {KMSG_PATH}: {e}"));
        forget_window(self.id);
        let overlapped = self.overlapped.lock().unwrap_or_else(|p| p.into_inner()).iter().cloned().collect();
        Ok(Seen { reports: reports(&records?), overlapped, lost: self.reader.lost })
    }
}

impl Seen {
    /// The failure these reports make of a test, `None` when there are none.
    pub fn failure(&self) -> Option<String> {
        let first = self.reports.first()?;
        let seqs: Vec<String> = self.reports.iter().map(|r| r.seq.to_string()).collect();
        let shared = match self.overlapped.len() {
            0 => String::new(),
            n => format!(
                "; {n} other test{} of this binary ran during part of this window ({}): the report may be theirs; \
                 every test whose window holds it fails with it (--test-threads=1 pins it)",
                if n == 1 { "" } else { "s" },
                self.overlapped.join(", ")
            ),
        };
        Some(format!(
            "rule violated: the kernel logs no warning, BUG, lockdep, KASAN, UBSAN, RCU-stall or hung-task report \
             while a test runs: {} report{} (log record {}) while this test ran{shared}; the first:\n{}",
            self.reports.len(),
            if self.reports.len() == 1 { "" } else { "s" },
            seqs.join(", "),
            first.quote()
        ))
    }
}

/// A window's verdict as the final check reads it: one JSON line per test.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checked {
    /// The test binary.
    pub binary: String,
    /// The test; empty for a line about the whole binary.
    pub test: String,
    /// Whether its window was read; else `why` says why not.
    pub checked: bool,
    /// Why not.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub why: String,
    /// Sequence numbers of the reports' first records.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reports: Vec<u64>,
}

/// Where the binaries write their [`Checked`] lines: next to the results
/// file, as `<results>.kernel-log`.
pub fn seen_path(results: &Path) -> PathBuf {
    let mut name = results.as_os_str().to_owned();
    name.push(".kernel-log");
    PathBuf::from(name)
}

/// Appends one [`Checked`] line next to the results file (when there is one).
pub fn record_checked(results: Option<&Path>, checked: &Checked) {
    let Some(results) = results else { return };
    let path = seen_path(results);
    let line = serde_json::to_string(checked).expect("plain strings and numbers serialize");
    let written = results::append_line(&path, &format!("{line}\n"));
    if let Err(e) = written {
        // Losing it would make the final check fail the run for reports a
        // test already failed with, or claim checks that never ran.
        eprintln!("{}: cannot append to {}: {e}", checked.binary, path.display());
        std::process::exit(2);
    }
}

/// What the final check of a run found.
#[derive(Debug, Default)]
pub struct RunCheck {
    /// Tests whose window was read.
    pub checked: usize,
    /// Tests (or binaries) run with the oracle off, with why.
    pub unchecked: Vec<(String, String)>,
    /// Reports in the log; those no test saw are also in `outside`.
    pub reports: usize,
    /// Reports no test saw, each with where it was.
    pub outside: Vec<(Report, String)>,
    /// Records lost before the final check read them.
    pub lost: u64,
}

/// The name the results file gives a report outside any test.
pub const OUTSIDE_BINARY: &str = "kernel_log";
/// Its test name (the rule it breaks).
pub const OUTSIDE_TEST: &str = "no_kernel_report_outside_a_test";

/// The final check of a run: reads the whole kernel log, writes it to
/// `log` (one record a line, as [`LogRecord::line`]), and appends to
/// `results` one failure for the reports no test's window saw, placed by
/// the binaries' marks. `Err` when the log cannot be read: the run is then
/// not checked, and the caller says so.
pub fn check_run(results: &Path, log: &Path) -> std::result::Result<RunCheck, String> {
    let mut reader = Reader::from_start().map_err(|e| format!("cannot read {KMSG_PATH}: {e}"))?;
    let records = reader.read_new().map_err(|e| format!("reading {KMSG_PATH}: {e}"))?;
    let text: String = records.iter().map(|r| r.line() + "\n").collect();
    std::fs::write(log, text).map_err(|e| format!("writing {}: {e}", log.display()))?;
    let seen_file = seen_path(results);
    let seen_text = match std::fs::read_to_string(&seen_file) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(format!("reading {}: {e}", seen_file.display())),
    };
    let mut check = RunCheck { lost: reader.lost + records.first().map_or(0, |r| r.seq), ..RunCheck::default() };
    let mut seen = HashSet::new();
    for line in seen_text.lines().filter(|l| !l.trim().is_empty()) {
        let c: Checked = serde_json::from_str(line).map_err(|e| format!("{}: {e}: {line}", seen_file.display()))?;
        if c.checked {
            check.checked += 1;
            seen.extend(c.reports);
        } else {
            let who = if c.test.is_empty() { c.binary } else { format!("{}::{}", c.binary, c.test) };
            check.unchecked.push((who, c.why));
        }
    }
    let found = reports(&records);
    check.reports = found.len();
    for report in found {
        if seen.contains(&report.seq) {
            continue;
        }
        let place = place(&records, report.seq);
        check.outside.push((report, place));
    }
    if let Some(failure) = outside_failure(&check.outside) {
        results::append(results, &failure).map_err(|e| format!("appending to {}: {e}", results.display()))?;
    }
    Ok(check)
}

/// Where in the run a record was logged, from the binaries' marks before it.
fn place(records: &[LogRecord], seq: u64) -> String {
    let last_mark = records
        .iter()
        .take_while(|r| r.seq < seq)
        .filter(|r| r.facility != 0)
        .filter_map(|r| r.text.strip_prefix(BINARY_MARK))
        .last();
    match last_mark.and_then(|m| m.rsplit_once(' ')) {
        None => "before the first test binary (boot, the guest's setup or the probe)".into(),
        Some((binary, "start")) => format!("while {binary} ran, outside its tests' windows (its setup or teardown)"),
        Some((binary, _)) => format!("after {binary} ended, before the next binary started"),
    }
}

/// One failed record for every report outside the tests, `None` when
/// there is none.
fn outside_failure(outside: &[(Report, String)]) -> Option<Record> {
    let (first, place) = outside.first()?;
    let others: Vec<String> = outside[1..].iter().map(|(r, p)| format!("record {} {p}", r.seq)).collect();
    let others = if others.is_empty() { String::new() } else { format!("; also: {}", others.join("; ")) };
    Some(Record {
        binary: OUTSIDE_BINARY.into(),
        test: OUTSIDE_TEST.into(),
        outcome: Outcome::Fail,
        duration_ms: 0,
        message: format!(
            "rule violated: the kernel logs no warning, BUG, lockdep, KASAN, UBSAN, RCU-stall or hung-task report \
             during a run: {} report{} outside every test's window, the first (log record {}) {place}{others}:\n{}",
            outside.len(),
            if outside.len() == 1 { "" } else { "s" },
            first.seq,
            first.quote()
        ),
    })
}

#[cfg(test)]
mod tests;
