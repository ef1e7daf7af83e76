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

/// Build the `kvm-selftests` integration-test executables (or, with
/// `bench`, its benchmarks, optimized) and return them.
pub fn build(bench: bool) -> Result<Vec<TestBinary>> {
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
