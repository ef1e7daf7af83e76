//! The test executables the VM runner runs: built by cargo, or given.

use std::env;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use serde_json::Value;

use crate::error::{Error, Result};
use crate::util;

#[derive(Debug)]
pub struct TestBinary {
    pub name: String,
    pub path: PathBuf,
}

/// What a build of the suite made: the test (or benchmark) executables and
/// the guest probe.
#[derive(Debug)]
pub struct Built {
    pub tests: Vec<TestBinary>,
    pub probe: PathBuf,
}

/// The target the bundle's binaries are built for. Naming it keeps
/// `RUSTFLAGS` off build scripts and proc macros (which run on the host)
/// and puts the static artifacts under target/TRIPLE, apart from the
/// host's dynamically linked ones.
pub const TARGET: &str = "x86_64-unknown-linux-gnu";

/// Build the `kvm-selftests` integration-test executables (or, with
/// `bench`, its benchmarks, optimized) and the guest probe, statically
/// linked (glibc's `crt-static`: they run on any x86_64 root filesystem,
/// or none but the bundle's), without debug info (symbols stay, for
/// backtraces), and return them.
pub fn build(bench: bool) -> Result<Built> {
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let (subcommand, kind, profile) = if bench { ("bench", "bench", "BENCH") } else { ("test", "test", "TEST") };
    let mut rustflags = env::var("RUSTFLAGS").unwrap_or_default();
    rustflags.push_str(" -C target-feature=+crt-static");
    let mut cmd = Command::new(cargo);
    cmd.args([subcommand, "--no-run", "--message-format=json-render-diagnostics", "--target", TARGET])
        .args(["-p", "kvm-selftests", "--manifest-path"])
        .arg(util::workspace_root().join("Cargo.toml"))
        .env("RUSTFLAGS", rustflags.trim())
        .env(format!("CARGO_PROFILE_{profile}_DEBUG"), "false")
        .env(format!("CARGO_PROFILE_{profile}_STRIP"), "debuginfo")
        .stdin(Stdio::null())
        .stderr(Stdio::inherit());
    eprintln!("xtask: building test binaries (static, {TARGET})");
    let stdout = util::output(&mut cmd)?;
    let mut tests = Vec::new();
    let mut probe = None;
    for line in stdout.lines() {
        let Ok(msg) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        if msg["reason"] != "compiler-artifact" {
            continue;
        }
        let kinds = msg["target"]["kind"].as_array().cloned().unwrap_or_default();
        let (Some(exe), Some(name)) = (msg["executable"].as_str(), msg["target"]["name"].as_str()) else {
            continue;
        };
        // Only the libtest-mimic integration tests speak the results
        // contract; the library's unit-test harness does not.
        if msg["profile"]["test"] == true && kinds.iter().any(|k| k == kind) {
            tests.push(TestBinary { name: name.to_string(), path: PathBuf::from(exe) });
        } else if msg["profile"]["test"] == false && name == PROBE && kinds.iter().any(|k| k == "bin") {
            probe = Some(PathBuf::from(exe));
        }
    }
    if tests.is_empty() {
        return Err(Error::NoTestBinaries);
    }
    let probe = probe.ok_or(Error::NoTestBinaries)?;
    tests.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(Built { tests, probe })
}

/// The guest probe's binary (tests/bin/guest_probe.rs).
pub const PROBE: &str = "guest_probe";

/// The suite name of a cargo test executable: `vm_types-0123456789abcdef` is
/// `vm_types`, the name its results carry.
fn suite_name(file: &str) -> &str {
    match file.rsplit_once('-') {
        Some((name, hash)) if hash.len() == 16 && hash.bytes().all(|b| b.is_ascii_hexdigit()) => name,
        _ => file,
    }
}

/// Prebuilt executables (`--test-binary`), named as their results will be.
pub fn given(paths: &[PathBuf]) -> Result<Vec<TestBinary>> {
    paths
        .iter()
        .map(|p| {
            let path = p.canonicalize().map_err(|_| Error::NoSuchTestBinary(p.clone()))?;
            let file = path.file_name().map_or(String::new(), |n| n.to_string_lossy().into_owned());
            Ok(TestBinary { name: suite_name(&file).to_string(), path })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suite_names_drop_cargo_hashes_only() {
        assert_eq!(suite_name("vm_types-0123456789abcdef"), "vm_types");
        assert_eq!(suite_name("pre_fault_memory-89abcdef01234567"), "pre_fault_memory");
        assert_eq!(suite_name("my-test"), "my-test");
        assert_eq!(suite_name("plain"), "plain");
    }
}
