//! The machine-readable results file: one JSON [`Record`] per line, appended
//! by every test binary (and the benchmark) when [`RESULTS_ENV`] names a
//! file, read back by `cargo xtask vm` for its KTAP and JUnit reports.
//! This type is the one definition of the format.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

/// Environment variable: a file each binary appends one JSON line per test to.
pub const RESULTS_ENV: &str = "KVM_SELFTESTS_RESULTS";

/// How a test ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// Every check held.
    Pass,
    /// A check failed (or, in strict mode, a capability was missing).
    Fail,
    /// A capability the test needs is missing.
    Skip,
    /// Failed as an entry of the known-failures list says it does.
    Xfail,
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Pass => "pass",
            Self::Fail => "fail",
            Self::Skip => "skip",
            Self::Xfail => "xfail",
        })
    }
}

/// One line of the results file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// The test binary, e.g. `vm_types`.
    pub binary: String,
    /// The test's name within the binary.
    pub test: String,
    /// How it ended.
    pub outcome: Outcome,
    /// Wall-clock time of the test body.
    #[serde(default)]
    pub duration_ms: u64,
    /// The failure, skip reason or benchmark figure; empty for a pass.
    #[serde(default)]
    pub message: String,
}

/// Why a results file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// Reading the file failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// A line is not a [`Record`].
    #[error("line {line}: {source}")]
    Parse {
        /// 1-based line number.
        line: usize,
        /// What serde_json made of it.
        source: serde_json::Error,
    },
}

/// Reads a results file; a missing file means no test reported anything.
pub fn read(path: &Path) -> Result<Vec<Record>, ReadError> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e.into()),
    };
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| serde_json::from_str(l).map_err(|source| ReadError::Parse { line: i + 1, source }))
        .collect()
}

/// Appends `record` as one line to `path`.
pub fn append(path: &Path, record: &Record) -> std::io::Result<()> {
    let mut line = serde_json::to_string(record).map_err(std::io::Error::other)?;
    line.push('\n');
    append_line(path, &line)
}

/// The files this process appends to, each opened once: in the VM runner
/// they are on a 9p share, where opening and closing a file for each of a
/// run's 600 records cost about 1 s per file under TCG, and writing to an
/// open one a third of that.
static APPENDING: Mutex<Vec<(PathBuf, File)>> = Mutex::new(Vec::new());

/// Opens `path` for appending (creating it) and keeps it open for
/// [`append_line`]. A runner calls it before its first test: an fd opened
/// later, by the first record, would change the fd table underneath a
/// test that compares it.
pub fn keep_open(path: &Path) -> std::io::Result<()> {
    let mut open = APPENDING.lock().unwrap_or_else(|p| p.into_inner());
    if !open.iter().any(|(p, _)| p == path) {
        open.push((path.to_path_buf(), OpenOptions::new().create(true).append(true).open(path)?));
    }
    Ok(())
}

/// Appends `line` to `path` with one `write()` (O_APPEND: whole lines,
/// whichever processes share the file), through the file [`keep_open`]
/// keeps open, else opening it for this line only.
pub fn append_line(path: &Path, line: &str) -> std::io::Result<()> {
    let mut open = APPENDING.lock().unwrap_or_else(|p| p.into_inner());
    match open.iter_mut().find(|(p, _)| p == path) {
        Some((_, file)) => file.write_all(line.as_bytes()),
        None => {
            drop(open);
            OpenOptions::new().create(true).append(true).open(path)?.write_all(line.as_bytes())
        }
    }
}

/// The results file a binary was told to append to, if any.
#[derive(Debug, Clone, Default)]
pub struct ResultsFile(Option<PathBuf>);

impl ResultsFile {
    /// The file [`RESULTS_ENV`] names (none when unset or empty).
    pub fn from_env() -> Self {
        Self(std::env::var_os(RESULTS_ENV).filter(|v| !v.is_empty()).map(PathBuf::from))
    }

    /// The file, if there is one.
    pub fn path(&self) -> Option<&Path> {
        self.0.as_deref()
    }

    /// Appends `record`, if there is a file. Losing a verdict silently would
    /// hide a failure from the VM runner, so a failed write ends the process
    /// with status 2.
    pub fn record(&self, record: &Record) {
        let Some(path) = &self.0 else { return };
        if let Err(e) = append(path, record) {
            eprintln!("{}: cannot append to {RESULTS_ENV}={}: {e}", record.binary, path.display());
            std::process::exit(2);
        }
    }
}
