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

/// A C test this suite ports.
struct Ported {
    /// Its path under `tools/testing/selftests/kvm` (x86 tests moved from
    /// `x86_64/` to `x86/` in 6.16), the first one the tree has.
    paths: &'static [&'static str],
    /// The Rust binaries that port it (and add cases of their own).
    by: &'static [&'static str],
    /// The Rust tests that do what the C test does, `binary::glob` (`*`
    /// matches any run of characters), for the like-for-like comparison.
    cases: &'static [&'static str],
}

const TESTS: &[Ported] = &[
    // 6.12's C test runs its cases on default VMs with flags 0.
    Ported { paths: &["guest_memfd_test"], by: &["guest_memfd"], cases: &["guest_memfd::default_vm_*"] },
    Ported {
        paths: &["set_memory_region_test"],
        by: &["set_memory_region", "private_memslots"],
        cases: &[
            "set_memory_region::zero_memslots_*",
            "set_memory_region::all_nr_memslots_*",
            "set_memory_region::*_in_use_memslot_*",
            "private_memslots::*",
        ],
    },
    Ported {
        paths: &["x86/private_mem_kvm_exits_test", "x86_64/private_mem_kvm_exits_test"],
        by: &["private_mem_exits"],
        cases: &[
            "private_mem_exits::private_read_exits_memory_fault_when_memslot_is_deleted_under_running_vcpu",
            "private_mem_exits::private_read_exits_memory_fault_when_memslot_has_no_guest_memfd",
        ],
    },
    // Its default run: one vCPU, one memslot, both explicit phases and punch hole.
    Ported {
        paths: &["x86/private_mem_conversions_test", "x86_64/private_mem_conversions_test"],
        by: &["private_mem_conversions"],
        cases: &["private_mem_conversions::explicit_conversion_*", "private_mem_conversions::punch_hole_*"],
    },
    // The worker-free prefault of each (VM type, shared/private) combination.
    Ported {
        paths: &["pre_fault_memory_test"],
        by: &["pre_fault_memory"],
        cases: &["pre_fault_memory::*_prefault_stops_at_slot_end_then_guest_reads"],
    },
    Ported { paths: &["vm_types_test"], by: &["vm_types"], cases: &["vm_types::create_vm_*"] },
];

/// The names of every C test this suite knows, whatever the tree.
pub fn c_test_names() -> impl Iterator<Item = &'static str> {
    TESTS.iter().flat_map(|t| t.paths.iter().map(|p| p.rsplit('/').next().unwrap_or(p)))
}

/// A built C test.
#[derive(Debug, Clone)]
pub struct CTest {
    /// Its name in results: the file name, e.g. `guest_memfd_test`.
    pub name: String,
    pub path: PathBuf,
    /// The Rust binaries that port it.
    pub ported_by: &'static [&'static str],
    /// `binary::glob` patterns of the Rust tests doing what it does.
    pub cases: &'static [&'static str],
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
        .filter_map(|t| {
            let rel = t.paths.iter().find(|p| dir.join(format!("{p}.c")).is_file())?;
            let name = rel.rsplit('/').next().unwrap_or(rel).to_string();
            Some(CTest { name, path: dir.join(rel), ported_by: t.by, cases: t.cases })
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
/// the Rust binaries that port it (which run more cases), and next to the
/// summed time of the Rust tests that do what the C test does.
pub fn comparison(tests: &[CTest], results: &[TestResult], wall_ms: &BTreeMap<String, u64>) -> String {
    let mut out = String::from(
        "xtask: same boot, each C test vs the Rust binaries porting it (wall time, all their tests) \
         and vs the Rust tests matching its cases (summed test time):\n",
    );
    let secs = |ms: Option<u64>| ms.map_or("-".to_string(), |ms| format!("{:.2} s", ms as f64 / 1000.0));
    let ratio = |rust: Option<u64>, c: Option<u64>| match (rust, c) {
        (Some(r), Some(c)) if c > 0 => format!("{:.1}x", r as f64 / c as f64),
        _ => "-".into(),
    };
    for t in tests {
        let c = results.iter().find(|r| r.binary == "upstream" && r.test == t.name);
        let (c_ms, c_outcome) =
            c.map_or((None, "did not run".to_string()), |r| (Some(r.duration_ms), r.outcome.to_string()));
        let rust: Option<u64> = t.ported_by.iter().map(|b| wall_ms.get(*b).copied()).sum();
        let all = results.iter().filter(|r| t.ported_by.contains(&r.binary.as_str())).count();
        let matching: Vec<&TestResult> = results.iter().filter(|r| matches_any(t.cases, r)).collect();
        let matching_ms = (!matching.is_empty()).then(|| matching.iter().map(|r| r.duration_ms).sum::<u64>());
        out.push_str(&format!(
            "xtask:   {:<30} C {:>8} ({c_outcome})  Rust {:>8} ({}, {all} tests)  ratio {:>6}  \
             | matching: Rust {:>8} ({} tests)  ratio {}\n",
            t.name,
            secs(c_ms),
            secs(rust),
            t.ported_by.join(" + "),
            ratio(rust, c_ms),
            secs(matching_ms),
            matching.len(),
            ratio(matching_ms, c_ms),
        ));
    }
    out
}

/// Each binary's wall time, test count and summed test time (the tests of
/// one binary run on several threads, so the sum can exceed the wall time),
/// and QEMU's share of a host CPU meanwhile where it was measured.
pub fn wall_times(results: &[TestResult], wall_ms: &BTreeMap<String, u64>, share: &BTreeMap<String, u32>) -> String {
    let mut out = String::from("xtask: wall time per binary (and QEMU's share of a host CPU meanwhile):\n");
    for (binary, ms) in wall_ms {
        let own: Vec<&TestResult> = results.iter().filter(|r| &r.binary == binary).collect();
        let summed: u64 = own.iter().map(|r| r.duration_ms).sum();
        let qemu = share.get(binary).map(|s| format!("  QEMU {s:>3}%")).unwrap_or_default();
        out.push_str(&format!(
            "xtask:   {binary:<26} {:>7.2} s  {:>4} tests  summed {:>7.2} s{qemu}\n",
            *ms as f64 / 1000.0,
            own.len(),
            summed as f64 / 1000.0
        ));
    }
    out
}

/// Whether `result` is named by one of the `binary::glob` patterns.
fn matches_any(patterns: &[&str], result: &TestResult) -> bool {
    patterns
        .iter()
        .any(|p| p.split_once("::").is_some_and(|(binary, test)| binary == result.binary && glob(test, &result.test)))
}

/// `*` matches any run of characters; everything else itself.
fn glob(pattern: &str, name: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == name,
        Some((head, rest)) => {
            name.strip_prefix(head).is_some_and(|tail| (0..=tail.len()).any(|i| glob(rest, &tail[i..])))
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_harness::results::Outcome;

    fn result(binary: &str, test: &str, duration_ms: u64) -> TestResult {
        TestResult {
            binary: binary.into(),
            test: test.into(),
            outcome: Outcome::Pass,
            duration_ms,
            message: String::new(),
        }
    }

    #[test]
    fn globs_match_prefixes_suffixes_and_infixes() {
        assert!(glob("default_vm_*", "default_vm_noflags_read"));
        assert!(glob("*_in_use_memslot_*", "move_in_use_memslot_slot_zap_quirk_enabled"));
        assert!(glob("exact", "exact"));
        assert!(!glob("exact", "exactly"));
        assert!(!glob("*_then_guest_reads", "x_then_guest_reads_more"));
        assert!(glob("*", ""));
    }

    #[test]
    fn comparison_shows_c_rust_and_the_matching_cases() {
        let test = CTest { name: "t_test".into(), path: "/t".into(), ported_by: &["a"], cases: &["a::x_*"] };
        let results =
            [result("upstream", "t_test", 500), result("a", "x_1", 300), result("a", "x_2", 200), result("a", "y", 9)];
        let wall = BTreeMap::from([("a".to_string(), 2000)]);
        let table = comparison(&[test], &results, &wall);
        let line = table.lines().nth(1).unwrap();
        let words: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(
            words[1..].join(" "),
            "t_test C 0.50 s (pass) Rust 2.00 s (a, 3 tests) ratio 4.0x | matching: Rust 0.50 s (2 tests) ratio 1.0x"
        );
        let walls = wall_times(&results, &wall, &BTreeMap::from([("a".to_string(), 87)]));
        let words: Vec<&str> = walls.lines().nth(1).unwrap().split_whitespace().collect();
        assert_eq!(words[1..].join(" "), "a 2.00 s 3 tests summed 0.51 s QEMU 87%");
    }
}
