//! Test results (the JSON lines the test binaries append) and the KTAP and
//! JUnit reports made from them.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};

pub use kvm_harness::results::{Outcome, Record as TestResult};

use crate::error::{Error, Result};
use crate::util::{self, io_err};

/// Read a results file (see `kvm_harness::results`); a missing file means
/// no test reported anything.
pub fn read_results(path: &Path) -> Result<Vec<TestResult>> {
    kvm_harness::results::read(path).map_err(|e| match e {
        kvm_harness::results::ReadError::Io(e) => io_err(path)(e),
        kvm_harness::results::ReadError::Parse { line, source } => {
            Error::BadResult { path: path.to_path_buf(), line, source }
        }
    })
}

#[derive(Debug, Default, Clone, Copy)]
pub struct Summary {
    pub pass: usize,
    pub fail: usize,
    pub skip: usize,
    pub xfail: usize,
}

pub fn summarize(results: &[TestResult]) -> Summary {
    results.iter().fold(Summary::default(), |mut s, r| {
        match r.outcome {
            Outcome::Pass => s.pass += 1,
            Outcome::Fail => s.fail += 1,
            Outcome::Skip => s.skip += 1,
            Outcome::Xfail => s.xfail += 1,
        }
        s
    })
}

/// Results grouped by binary, in order of first appearance.
fn by_binary(results: &[TestResult]) -> Vec<(&str, Vec<&TestResult>)> {
    let mut groups: Vec<(&str, Vec<&TestResult>)> = Vec::new();
    for r in results {
        match groups.iter_mut().find(|(b, _)| *b == r.binary) {
            Some((_, v)) => v.push(r),
            None => groups.push((&r.binary, vec![r])),
        }
    }
    groups
}

/// The report as kselftest's `run_kselftest.sh` prints a run (TAP 13):
/// one program per binary, `ok N selftests: kvm_private_mem: BINARY`,
/// after the binary's own TAP (its `--format tap` output) prefixed with
/// `# `, which is what the kselftest parsers of KernelCI and LKFT read; the
/// tree's C tests (binary `upstream`) are programs of collection `kvm`.
pub fn ktap(results: &[TestResult]) -> String {
    let groups = by_binary(results);
    let programs: usize = groups.iter().map(|(b, tests)| if *b == UPSTREAM { tests.len() } else { 1 }).sum();
    let mut out = format!("TAP version 13\n1..{programs}\n");
    let mut n = 0;
    for (binary, tests) in &groups {
        if *binary == UPSTREAM {
            for t in tests {
                n += 1;
                let header = format!("selftests: kvm: {}", ktap_name(&t.test));
                let _ = writeln!(out, "# {header}");
                let _ = writeln!(out, "{}", program_line(n, &header, t.outcome, &t.message));
            }
            continue;
        }
        n += 1;
        let header = format!("selftests: {}: {}", crate::bundle::COLLECTION, ktap_name(binary));
        let _ = writeln!(out, "# {header}\n# TAP version 13\n# 1..{}", tests.len());
        for (i, t) in tests.iter().enumerate() {
            let name = ktap_name(&t.test);
            let reason = one_line(&t.message);
            match t.outcome {
                Outcome::Pass => {
                    let _ = writeln!(out, "# ok {} {name}", i + 1);
                }
                Outcome::Skip => {
                    let _ = writeln!(out, "# ok {} {name} # SKIP {reason}", i + 1);
                }
                Outcome::Xfail => {
                    let _ = writeln!(out, "# ok {} {name} # XFAIL {reason}", i + 1);
                }
                Outcome::Fail => {
                    for line in t.message.lines() {
                        let _ = writeln!(out, "# # {line}");
                    }
                    let _ = writeln!(out, "# not ok {} {name}", i + 1);
                }
            }
        }
        let owned: Vec<TestResult> = tests.iter().map(|t| (*t).clone()).collect();
        let s = summarize(&owned);
        let _ = writeln!(
            out,
            "# # Totals: pass:{} fail:{} xfail:{} xpass:0 skip:{} error:0",
            s.pass, s.fail, s.xfail, s.skip
        );
        let outcome = if s.fail > 0 {
            Outcome::Fail
        } else if s.skip == tests.len() {
            Outcome::Skip
        } else {
            Outcome::Pass
        };
        let _ = writeln!(out, "{}", program_line(n, &header, outcome, "all tests skipped"));
    }
    out
}

/// The binary of the tree's C tests' results.
const UPSTREAM: &str = "upstream";

/// A program's result line as kselftest's runner prints it.
fn program_line(n: usize, header: &str, outcome: Outcome, reason: &str) -> String {
    match outcome {
        Outcome::Pass => format!("ok {n} {header}"),
        Outcome::Skip => format!("ok {n} {header} # SKIP {}", one_line(reason)),
        Outcome::Xfail => format!("ok {n} {header} # XFAIL {}", one_line(reason)),
        Outcome::Fail => format!("not ok {n} {header} # exit=1"),
    }
}

/// KTAP names end at `#`, which would turn the rest into a directive.
fn ktap_name(name: &str) -> String {
    one_line(name).replace('#', "_")
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

pub fn junit(results: &[TestResult]) -> String {
    let s = summarize(results);
    let secs = |ms: u64| format!("{:.3}", ms as f64 / 1000.0);
    let total_ms: u64 = results.iter().map(|r| r.duration_ms).sum();
    let mut out = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    let _ = writeln!(
        out,
        "<testsuites name=\"kvm-selftests\" tests=\"{}\" failures=\"{}\" skipped=\"{}\" time=\"{}\">",
        results.len(),
        s.fail,
        s.skip + s.xfail,
        secs(total_ms)
    );
    for (binary, tests) in by_binary(results) {
        let owned: Vec<TestResult> = tests.iter().map(|t| (*t).clone()).collect();
        let gs = summarize(&owned);
        let _ = writeln!(
            out,
            "  <testsuite name=\"{}\" tests=\"{}\" failures=\"{}\" skipped=\"{}\" time=\"{}\">",
            xml(binary),
            tests.len(),
            gs.fail,
            gs.skip + gs.xfail,
            secs(tests.iter().map(|t| t.duration_ms).sum())
        );
        for t in tests {
            let _ = write!(
                out,
                "    <testcase classname=\"{}\" name=\"{}\" time=\"{}\"",
                xml(binary),
                xml(&t.test),
                secs(t.duration_ms)
            );
            match t.outcome {
                Outcome::Pass => out.push_str("/>\n"),
                Outcome::Skip | Outcome::Xfail => {
                    let _ = writeln!(out, ">\n      <skipped message=\"{}\"/>\n    </testcase>", xml(&t.message));
                }
                Outcome::Fail => {
                    let first = t.message.lines().next().unwrap_or("failed");
                    let _ = writeln!(
                        out,
                        ">\n      <failure message=\"{}\">{}</failure>\n    </testcase>",
                        xml(first),
                        xml(&t.message)
                    );
                }
            }
        }
        out.push_str("  </testsuite>\n");
    }
    out.push_str("</testsuites>\n");
    out
}

/// Escape for XML text and attributes, dropping characters XML 1.0 forbids.
fn xml(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\n' | '\t' | '\r' => out.push(c),
            c if (c as u32) < 0x20 => {}
            c => out.push(c),
        }
    }
    out
}

/// Write `<stem>.ktap` and `<stem>.junit.xml` under target/kvm-selftests and
/// print their paths.
pub fn write_reports(results: &[TestResult], stem: &str) -> Result<(PathBuf, PathBuf)> {
    let dir = util::output_dir();
    util::create_dir_all(&dir)?;
    let ktap_path = dir.join(format!("{stem}.ktap"));
    let junit_path = dir.join(format!("{stem}.junit.xml"));
    fs::write(&ktap_path, ktap(results)).map_err(io_err(&ktap_path))?;
    fs::write(&junit_path, junit(results)).map_err(io_err(&junit_path))?;
    eprintln!("xtask: KTAP report:  {}", ktap_path.display());
    eprintln!("xtask: JUnit report: {}", junit_path.display());
    Ok((ktap_path, junit_path))
}

/// Write one run's reports into `dir` (target/kvm-selftests/RUN, RUN
/// naming the kernel and the mode, so that each run of a CI job keeps its
/// own): `report.ktap`, `report.junit.xml` and the `results.jsonl` they
/// were made from; print their paths.
pub fn write_run_reports(results: &[TestResult], dir: &Path) -> Result<()> {
    util::create_dir_all(dir)?;
    let write = |name: &str, text: String| {
        let path = dir.join(name);
        fs::write(&path, text).map_err(io_err(&path))
    };
    write("report.ktap", ktap(results))?;
    write("report.junit.xml", junit(results))?;
    let mut jsonl = String::new();
    for r in results {
        jsonl.push_str(&serde_json::to_string(r).expect("a record serializes"));
        jsonl.push('\n');
    }
    write("results.jsonl", jsonl)?;
    eprintln!("xtask: reports (KTAP, JUnit, results.jsonl): {}/report.{{ktap,junit.xml}}", dir.display());
    Ok(())
}

/// The test name of the failure a binary gets when its time limit ran out.
pub const TIMEOUT_TEST: &str = "time_limit";

/// Tests named in a timeout's failure, before "and N more".
const UNREPORTED_SHOWN: usize = 8;

/// A binary whose time limit ran out in the guest (a `name secs` line of
/// `timeouts` in the results directory) becomes one failure naming it, the
/// limit, and the tests that never reported: those running when it was
/// killed and those not started, in the binary's order (from `NAME.tests`,
/// its `--list` output, which the guest saves after the kill).
pub fn add_timeouts(results: &mut Vec<TestResult>, dir: &Path) -> Result<()> {
    let path = dir.join("timeouts");
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err(&path)(e)),
    };
    for line in text.lines() {
        let Some((name, secs)) = line.rsplit_once(' ') else {
            continue;
        };
        // run.sh records the failure itself; older runners did not.
        if results.iter().any(|r| r.binary == name && r.test == TIMEOUT_TEST) {
            continue;
        }
        let listed = fs::read_to_string(dir.join(format!("{name}.tests"))).unwrap_or_default();
        let unreported: Vec<&str> = listed
            .lines()
            .filter_map(|l| l.strip_suffix(": test"))
            .filter(|test| !results.iter().any(|r| r.binary == name && r.test == *test))
            .collect();
        let reported = results.iter().filter(|r| r.binary == name).count();
        let mut message = format!(
            "{name} did not finish within its time limit of {secs} s: its process group was killed after \
             {reported} of its tests had reported"
        );
        if !unreported.is_empty() {
            let shown = unreported.iter().take(UNREPORTED_SHOWN).copied().collect::<Vec<_>>().join(", ");
            let more = unreported.len().saturating_sub(UNREPORTED_SHOWN);
            let more = if more > 0 { format!(" and {more} more") } else { String::new() };
            message.push_str(&format!("; without a result (running or not started, in order): {shown}{more}"));
        }
        message.push_str(&format!(". The limit is set with --test-timeout {name}=SECS or {}.", crate::limits::ENV));
        results.push(TestResult {
            binary: name.to_string(),
            test: TIMEOUT_TEST.to_string(),
            outcome: Outcome::Fail,
            duration_ms: secs.parse::<u64>().unwrap_or(0) * 1000,
            message,
        });
    }
    Ok(())
}

/// The test name of the failure a binary gets when it exited non-zero
/// without reporting any failed test (it crashed or was killed).
pub const CRASH_TEST: &str = "exit_status";

/// A binary that died (signal, abort, harness bug) may not have recorded any
/// failure; make its exit status visible as one.
pub fn add_crashed_binaries(results: &mut Vec<TestResult>, exit_codes: &Path) -> Result<()> {
    let text = match fs::read_to_string(exit_codes) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
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
                test: CRASH_TEST.to_string(),
                outcome: Outcome::Fail,
                duration_ms: 0,
                message: format!("{name} exited with status {code} without reporting a failed test"),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crashed_binary_becomes_failure() {
        let dir = std::env::temp_dir().join(format!("xtask-vm-{}", std::process::id()));
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
    fn a_binary_out_of_time_fails_naming_its_limit_and_unreported_tests() {
        let dir = std::env::temp_dir().join(format!("xtask-timeouts-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("timeouts"), "pre_fault_memory 90\n").unwrap();
        fs::write(dir.join("pre_fault_memory.tests"), "a: test\nb_hangs: test\nc: test\n\n3 tests, 0 benchmarks\n")
            .unwrap();
        fs::write(dir.join("exit-codes"), "vm_types 0\npre_fault_memory 143\n").unwrap();
        let mut results = vec![r("vm_types", "x", Outcome::Pass, ""), r("pre_fault_memory", "a", Outcome::Pass, "")];
        add_timeouts(&mut results, &dir).unwrap();
        add_crashed_binaries(&mut results, &dir.join("exit-codes")).unwrap();
        assert_eq!(results.len(), 3, "the timeout is the binary's one failure: {results:?}");
        let t = &results[2];
        assert_eq!((t.binary.as_str(), t.test.as_str(), t.outcome), ("pre_fault_memory", TIMEOUT_TEST, Outcome::Fail));
        assert_eq!(
            t.message,
            "pre_fault_memory did not finish within its time limit of 90 s: its process group was killed after 1 \
             of its tests had reported; without a result (running or not started, in order): b_hangs, c. The \
             limit is set with --test-timeout pre_fault_memory=SECS or KVM_SELFTESTS_TEST_TIMEOUT."
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    fn r(binary: &str, test: &str, outcome: Outcome, message: &str) -> TestResult {
        TestResult { binary: binary.into(), test: test.into(), outcome, duration_ms: 5, message: message.into() }
    }

    #[test]
    fn ktap_is_what_run_kselftest_prints() {
        let results = [
            r("a", "one", Outcome::Pass, ""),
            r("b", "two", Outcome::Fail, "boom\nline 2"),
            r("a", "three", Outcome::Skip, "no cap"),
            r("upstream", "x_test", Outcome::Pass, "exit status 0"),
            r("c", "four", Outcome::Xfail, "known failure: bug: boom"),
        ];
        let k = ktap(&results);
        assert_eq!(
            k,
            "TAP version 13\n1..4\n\
             # selftests: kvm_private_mem: a\n# TAP version 13\n# 1..2\n# ok 1 one\n# ok 2 three # SKIP no cap\n\
             # # Totals: pass:1 fail:0 xfail:0 xpass:0 skip:1 error:0\nok 1 selftests: kvm_private_mem: a\n\
             # selftests: kvm_private_mem: b\n# TAP version 13\n# 1..1\n# # boom\n# # line 2\n# not ok 1 two\n\
             # # Totals: pass:0 fail:1 xfail:0 xpass:0 skip:0 error:0\nnot ok 2 selftests: kvm_private_mem: b # exit=1\n\
             # selftests: kvm: x_test\nok 3 selftests: kvm: x_test\n\
             # selftests: kvm_private_mem: c\n# TAP version 13\n# 1..1\n# ok 1 four # XFAIL known failure: bug: boom\n\
             # # Totals: pass:0 fail:0 xfail:1 xpass:0 skip:0 error:0\nok 4 selftests: kvm_private_mem: c\n"
        );
    }

    #[test]
    fn junit_escapes() {
        let j = junit(&[r("a", "x<y", Outcome::Fail, "\"&\u{1}")]);
        assert!(j.contains("name=\"x&lt;y\""));
        assert!(j.contains("<failure message=\"&quot;&amp;\">&quot;&amp;</failure>"));
        assert!(j.contains("failures=\"1\""));
    }

    #[test]
    fn parses_contract_records() {
        let dir = std::env::temp_dir().join(format!("xtask-report-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let f = dir.join("r.jsonl");
        fs::write(
            &f,
            "{\"binary\":\"vm_types\",\"test\":\"t\",\"outcome\":\"skip\",\"duration_ms\":12,\"message\":\"m\"}\n\nnot json\n",
        )
        .unwrap();
        let err = read_results(&f).unwrap_err();
        assert!(matches!(err, Error::BadResult { line: 3, .. }), "{err}");
        fs::write(&f, "{\"binary\":\"v\",\"test\":\"t\",\"outcome\":\"pass\"}\n").unwrap();
        assert_eq!(read_results(&f).unwrap()[0].outcome, Outcome::Pass);
        fs::remove_dir_all(&dir).unwrap();
    }
}
