//! Small helpers shared by the commands: paths, hashing, running programs.

use std::env;
use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::{Error, Result};

/// The workspace root, fixed at compile time so that commands work from any
/// cwd (`git bisect run` executes us inside the kernel tree).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the workspace root")
        .to_path_buf()
}

pub fn target_dir() -> PathBuf {
    match env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => workspace_root().join(dir),
        None => workspace_root().join("target"),
    }
}

/// Where reports and per-run scratch space live.
pub fn output_dir() -> PathBuf {
    target_dir().join("kvm-selftests")
}

/// Kernel sources and builds are cached outside the repository so that fresh
/// clones on the same machine (CI) reuse them.
pub fn cache_dir() -> PathBuf {
    let base = env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/var/tmp"));
    base.join("kvm-selftests-rs")
}

/// FNV-1a: a stable hash for cache keys (std's hasher may change between
/// Rust releases, which would silently invalidate the cache).
pub fn fnv1a(chunks: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for chunk in chunks {
        for &b in *chunk {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        // Separator so that ["ab", "c"] and ["a", "bc"] differ.
        h ^= 0xff;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Reduce a string to characters safe in a single path component.
pub fn sanitize(s: &str) -> String {
    s.chars().map(|c| if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') { c } else { '_' }).collect()
}

pub fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        s.push(' ');
        s.push_str(&arg.to_string_lossy());
    }
    s
}

/// Run a command with inherited stdio and fail unless it succeeds.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().map_err(|source| Error::Spawn { cmd: describe(cmd), source })?;
    if status.success() {
        Ok(())
    } else {
        Err(Error::CommandFailed { cmd: describe(cmd), status })
    }
}

/// Run a command and return its stdout, failing unless it succeeds.
pub fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().map_err(|source| Error::Spawn { cmd: describe(cmd), source })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(Error::CommandFailed { cmd: describe(cmd), status: out.status })
    }
}

pub fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io { path: path.to_path_buf(), source }
}

pub fn create_dir_all(path: &Path) -> Result<()> {
    fs::create_dir_all(path).map_err(io_err(path))
}

pub fn find_in_path(program: impl AsRef<OsStr>) -> Option<PathBuf> {
    let program = program.as_ref();
    env::split_paths(&env::var_os("PATH")?).map(|dir| dir.join(program)).find(|p| p.is_file())
}

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// A host prerequisite: a program looked up in PATH, or an absolute path to
/// a file, provided by the Debian package `package`.
#[derive(Debug, Clone, Copy)]
pub struct Requirement {
    pub what: &'static str,
    pub package: &'static str,
}

pub const fn req(what: &'static str, package: &'static str) -> Requirement {
    Requirement { what, package }
}

fn satisfied(req: &Requirement) -> bool {
    if req.what.starts_with('/') {
        Path::new(req.what).exists()
    } else {
        find_in_path(req.what).is_some()
    }
}

/// Make sure every requirement is met, installing the missing Debian packages
/// with apt-get when running as root; otherwise name exactly what to install.
pub fn ensure_requirements(reqs: &[Requirement]) -> Result<()> {
    let missing: Vec<&Requirement> = reqs.iter().filter(|r| !satisfied(r)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    if is_root() && find_in_path("apt-get").is_some() {
        let packages = packages_of(&missing);
        eprintln!("xtask: installing {packages}");
        // A stale package index is the usual reason installs fail on fresh
        // CI machines; refreshing it is cheap.
        run(Command::new("apt-get").args(["update", "-qq"]))?;
        run(Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(packages.split(' '))
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
        let still: Vec<&Requirement> = reqs.iter().filter(|r| !satisfied(r)).collect();
        if still.is_empty() {
            return Ok(());
        }
        return Err(missing_tools(&still));
    }
    Err(missing_tools(&missing))
}

fn packages_of(reqs: &[&Requirement]) -> String {
    let mut packages: Vec<&str> = reqs.iter().map(|r| r.package).collect();
    packages.sort_unstable();
    packages.dedup();
    packages.join(" ")
}

fn missing_tools(missing: &[&Requirement]) -> Error {
    Error::MissingTools {
        missing: missing.iter().map(|r| r.what).collect::<Vec<_>>().join(", "),
        packages: packages_of(missing),
    }
}

/// Quote for a POSIX shell.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}
