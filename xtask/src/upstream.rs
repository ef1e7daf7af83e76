//! `cargo xtask vm --upstream`: the kernel tree's own private-memory C
//! selftests, built from that tree and run in the same boot after the Rust
//! suite, so the two can be compared on one kernel.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::{Error, Result};
use crate::report::TestResult;
use crate::util::{self, io_err};

/// The C tests this suite ports, by path under `tools/testing/selftests/kvm`
/// (x86 tests moved from `x86_64/` to `x86/` in 6.16), and the Rust binaries
/// that port them.
const TESTS: &[(&[&str], &[&str])] = &[
    (&["guest_memfd_test"], &["guest_memfd"]),
    (&["set_memory_region_test"], &["set_memory_region", "private_memslots"]),
    (&["x86/private_mem_kvm_exits_test", "x86_64/private_mem_kvm_exits_test"], &["private_mem_exits"]),
    (&["x86/private_mem_conversions_test", "x86_64/private_mem_conversions_test"], &["private_mem_conversions"]),
    (&["pre_fault_memory_test"], &["pre_fault_memory"]),
    (&["vm_types_test"], &["vm_types"]),
];

/// A built C test.
#[derive(Debug, Clone)]
pub struct CTest {
    /// Its name in results: the file name, e.g. `guest_memfd_test`.
    pub name: String,
    pub path: PathBuf,
    /// The Rust binaries that port it.
    pub ported_by: &'static [&'static str],
}

/// Build the C tests of `src` in a scratch copy (`make headers` dirties a
/// tree, and kbuild then refuses its out-of-tree kernel builds).
pub fn build(id: &str, src: &Path) -> Result<Vec<CTest>> {
    let copy = util::cache_dir().join("upstream").join(id);
    if !copy.join("Makefile").is_file() {
        eprintln!("xtask: copying {} for its C selftests", src.display());
        let partial = copy.with_file_name(format!(".partial-{id}"));
        if partial.exists() {
            fs::remove_dir_all(&partial).map_err(io_err(&partial))?;
        }
        util::create_dir_all(&partial)?;
        util::run(Command::new("cp").arg("-a").arg(format!("{}/.", src.display())).arg(&partial))?;
        fs::rename(&partial, &copy).map_err(io_err(&copy))?;
    } else {
        // A tree under bisection changes: bring the copy up to date.
        util::run(Command::new("cp").arg("-a").arg("-u").arg(format!("{}/.", src.display())).arg(&copy))?;
    }
    let dir = copy.join("tools/testing/selftests/kvm");
    let tests: Vec<CTest> = TESTS
        .iter()
        .filter_map(|(paths, ported_by)| {
            let rel = paths.iter().find(|p| dir.join(format!("{p}.c")).is_file())?;
            let name = rel.rsplit('/').next().unwrap_or(rel).to_string();
            Some(CTest { name, path: dir.join(rel), ported_by })
        })
        .collect();
    if tests.is_empty() {
        return Err(Error::Upstream(format!("{} has none of the private-memory selftests", dir.display())));
    }
    eprintln!("xtask: building the tree's C selftests in {}", dir.display());
    util::output(Command::new("make").arg("-C").arg(&copy).arg("headers"))
        .map_err(|e| Error::Upstream(format!("make headers: {e}")))?;
    let mut make = Command::new("make");
    make.arg("-C").arg(&dir).arg(format!("-j{}", std::thread::available_parallelism().map_or(1, |n| n.get())));
    make.args(tests.iter().map(|t| &t.path));
    util::output(&mut make).map_err(|e| Error::Upstream(format!("building the C selftests: {e}")))?;
    Ok(tests)
}

/// The same-boot comparison: each C test's time next to the wall time of
/// the Rust binaries that port it.
pub fn comparison(tests: &[CTest], results: &[TestResult], wall_ms: &BTreeMap<String, u64>) -> String {
    let mut out = String::from("xtask: same boot, C test vs the Rust binaries porting it (wall time):\n");
    for t in tests {
        let c = results.iter().find(|r| r.binary == "upstream" && r.test == t.name);
        let rust: Option<u64> = t.ported_by.iter().map(|b| wall_ms.get(*b).copied()).sum();
        let (c_ms, c_outcome) =
            c.map_or((None, "did not run".to_string()), |r| (Some(r.duration_ms), r.outcome.to_string()));
        let ratio = match (c_ms, rust) {
            (Some(c), Some(r)) if c > 0 => format!("{:.1}x", r as f64 / c as f64),
            _ => "-".into(),
        };
        out.push_str(&format!(
            "xtask:   {:<32} C {:>8} ({c_outcome})  Rust {:>8} ({})  ratio {ratio}\n",
            t.name,
            c_ms.map_or("-".into(), |ms| format!("{:.2} s", ms as f64 / 1000.0)),
            rust.map_or("-".into(), |ms| format!("{:.2} s", ms as f64 / 1000.0)),
            t.ported_by.join(" + "),
        ));
    }
    out
}

/// `name centiseconds` lines the guest's init wrote for each binary.
pub fn read_wall_times(path: &Path) -> BTreeMap<String, u64> {
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let (name, cs) = l.rsplit_once(' ')?;
            Some((name.to_string(), cs.trim().parse::<u64>().ok()? * 10))
        })
        .collect()
}
