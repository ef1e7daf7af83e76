//! run.sh's own tests: a staged bundle whose binaries are small scripts,
//! run with dash (the plainest POSIX shell here) and busybox, as a user
//! would run it (`--no-setup`) on a host without protected VMs
//! (`KVM_DEVICE=/dev/null`, a probe script that reports them offered).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use crate::bundle;
use crate::guest_init::set_executable;
use crate::limits::Limits;
use crate::report::{read_results, Outcome};
use crate::test_binaries::{Built, TestBinary};

fn scratch(what: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("xtask-runsh-{what}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
    let path = dir.join(name);
    fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
    set_executable(&path).unwrap();
    path
}

/// A test binary that records `outcome` for test `t` of `name` and exits
/// with `rc`.
fn binary(dir: &Path, name: &str, outcome: &str, rc: u8) -> TestBinary {
    let body = format!(
        "[ \"$1\" = --list ] && {{ echo 't: test'; exit 0; }}\n\
         echo '{{\"binary\":\"{name}\",\"test\":\"t\",\"outcome\":\"{outcome}\",\"duration_ms\":1,\"message\":\"m\"}}' \
         >> \"$KVM_SELFTESTS_RESULTS\"\nexit {rc}"
    );
    TestBinary { name: name.into(), path: script(dir, &format!("{name}.sh"), &body) }
}

fn stage(dir: &Path, tests: Vec<TestBinary>) -> PathBuf {
    let probe = script(
        dir,
        "probe.sh",
        "[ \"$1\" = --kernel-log ] && { : > \"$2\"; exit 0; }\n\
         echo 'KVM_CAP_VM_TYPES = 0x3, KVM_X86_SW_PROTECTED_VM created'; : > \"$4\"\n\
         echo '{\"binary\":\"guest_probe\",\"test\":\"protected_vm_capability_matches_creation\",\"outcome\":\"pass\"}' >> \"$2\"",
    );
    bundle::stage(&Built { tests, probe }, &Limits::default(), &dir.join("staged"), "b").unwrap()
}

fn run(shell: &str, root: &Path, out: &Path, args: &[&str]) -> Output {
    Command::new(shell.split(' ').next().unwrap())
        .args(shell.split(' ').skip(1))
        .arg(root.join("run.sh"))
        .args(["--no-setup", "-o"])
        .arg(out)
        .args(args)
        .env("KVM_DEVICE", "/dev/null")
        .env_remove("KVM_SELFTESTS_TEST_TIMEOUT")
        .env_remove("KVM_SELFTESTS_MODEL_BUDGET")
        .output()
        .unwrap()
}

fn outcomes(out: &Path) -> Vec<(String, String, Outcome)> {
    read_results(&out.join("results.jsonl")).unwrap().into_iter().map(|r| (r.binary, r.test, r.outcome)).collect()
}

#[test]
fn run_sh_exit_status_is_the_verdict_of_the_results() {
    for shell in ["dash", "busybox sh"] {
        let dir = scratch("verdict");
        let passing = stage(&dir, vec![binary(&dir, "a", "pass", 0), binary(&dir, "b", "xfail", 0)]);
        let out = dir.join("out");
        let o = run(shell, &passing, &out, &[]);
        assert_eq!(o.status.code(), Some(0), "{shell}: {}", String::from_utf8_lossy(&o.stdout));
        assert_eq!(outcomes(&out).len(), 3, "the probe's check and two tests");
        assert_eq!(fs::read_to_string(out.join("status")).unwrap(), "done\n");

        let skipping = stage(&dir, vec![binary(&dir, "a", "skip", 0)]);
        assert_eq!(run(shell, &skipping, &out, &[]).status.code(), Some(4), "{shell}: every test skipped");

        // A binary that fails without saying which test: a failure of its own.
        let crashing = stage(&dir, vec![binary(&dir, "a", "pass", 0), binary(&dir, "c", "pass", 139)]);
        let o = run(shell, &crashing, &out, &[]);
        assert_eq!(o.status.code(), Some(1), "{shell}");
        assert!(outcomes(&out).contains(&("c".into(), "exit_status".into(), Outcome::Fail)), "{shell}");
        let printed = String::from_utf8_lossy(&o.stdout);
        assert!(printed.contains("run.sh:   fail c::exit_status: c exited with status 139"), "{printed}");

        // Bad input: refused before anything runs.
        let o = run(shell, &passing, &out, &["--timeout", "nosuch=5"]);
        assert_eq!(o.status.code(), Some(2), "{shell}");
        assert!(String::from_utf8_lossy(&o.stderr).contains("no test binary or C test is named nosuch"), "{shell}");
        fs::remove_dir_all(&dir).unwrap();
    }
}

#[test]
fn run_sh_kills_a_binary_or_c_test_out_of_time_with_its_children_and_runs_the_rest() {
    let dir = scratch("limits");
    // Lists two tests and, run, reports the first, leaves a child and hangs.
    let hang = script(
        &dir,
        "hang",
        &format!(
            "[ \"$1\" = --list ] && {{ echo 'a: test'; echo 'b: test'; exit 0; }}\n\
             echo '{{\"binary\":\"hangs\",\"test\":\"a\",\"outcome\":\"pass\"}}' >> \"$KVM_SELFTESTS_RESULTS\"\n\
             sleep 100 & echo $! > {0}/child.$$\nsleep 100",
            dir.display()
        ),
    );
    let root =
        stage(&dir, vec![TestBinary { name: "hangs".into(), path: hang.clone() }, binary(&dir, "after", "pass", 0)]);
    let c_tests = [
        script(&dir, "hanging_test", "sleep 100"),
        script(&dir, "passing_test", "exit 0"),
        script(&dir, "skipping_test", "exit 4"),
    ];
    let out = dir.join("out");
    let start = Instant::now();
    let mut args = vec!["--timeout".to_string(), "1".into(), "--timeout".into(), "hanging_test=2".into()];
    for t in &c_tests {
        args.extend(["--c-test".into(), t.to_string_lossy().into_owned()]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = run("dash", &root, &out, &args);
    assert!(start.elapsed() < Duration::from_secs(30), "{:?}", start.elapsed());
    let printed = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(1), "{printed}{}", String::from_utf8_lossy(&o.stderr));
    assert!(printed.contains("@@KVM-SELFTESTS@@ timeout hangs 1\n"), "{printed}");
    assert!(printed.contains("@@KVM-SELFTESTS@@ end after 0\n"), "{printed}");
    assert_eq!(fs::read_to_string(out.join("timeouts")).unwrap(), "hangs 1\n");
    assert_eq!(fs::read_to_string(out.join("hangs.tests")).unwrap(), "a: test\nb: test\n");
    // The process group went: no child of a killed run survives it.
    for entry in fs::read_dir(&dir).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        if name.starts_with("child.") {
            let pid = fs::read_to_string(dir.join(&name)).unwrap();
            let stat = fs::read_to_string(format!("/proc/{}/stat", pid.trim())).unwrap_or_default();
            let state = stat.rsplit_once(") ").map_or("", |(_, rest)| &rest[..1]);
            assert!(matches!(state, "" | "Z"), "{name} ({pid}) survived: {stat}");
        }
    }
    let results = read_results(&out.join("results.jsonl")).unwrap();
    let verdicts: Vec<(&str, &str, Outcome)> =
        results.iter().map(|r| (r.binary.as_str(), r.test.as_str(), r.outcome)).collect();
    assert_eq!(
        verdicts,
        [
            ("guest_probe", "protected_vm_capability_matches_creation", Outcome::Pass),
            ("hangs", "a", Outcome::Pass),
            ("hangs", "time_limit", Outcome::Fail),
            ("after", "t", Outcome::Pass),
            ("upstream", "hanging_test", Outcome::Fail),
            ("upstream", "passing_test", Outcome::Pass),
            ("upstream", "skipping_test", Outcome::Skip),
        ]
    );
    assert_eq!(
        results[2].message,
        "hangs did not finish within its time limit of 1 s: its process group was killed after 1 of its tests had \
         reported; without a result (running or not started, in order): b. The limit is set with --timeout \
         hangs=SECS or KVM_SELFTESTS_TEST_TIMEOUT."
    );
    assert!(results[4].message.starts_with("did not finish within its time limit of 2 s"), "{}", results[4].message);
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn run_sh_runs_binaries_at_once_and_records_each_status_and_whole_output() {
    let dir = scratch("jobs");
    let root =
        stage(&dir, vec![binary(&dir, "a", "pass", 0), binary(&dir, "b", "fail", 1), binary(&dir, "c", "pass", 0)]);
    let out = dir.join("out");
    let o = run("busybox sh", &root, &out, &["--jobs", "2"]);
    let printed = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(1), "{printed}{}", String::from_utf8_lossy(&o.stderr));
    let mut codes: Vec<String> =
        fs::read_to_string(out.join("exit-codes")).unwrap().lines().map(String::from).collect();
    codes.sort();
    assert_eq!(codes, ["a 0", "b 1", "c 0"]);
    assert_eq!(fs::read_to_string(out.join("wall-times")).unwrap().lines().count(), 3);
    for b in ["a", "b", "c"] {
        assert!(printed.contains(&format!("@@KVM-SELFTESTS@@ end {b} ")), "{printed}");
    }
    assert_eq!(outcomes(&out).len(), 4, "the probe's check and one per binary");
    let o = run("dash", &root, &out, &["--jobs", "2"]);
    assert_eq!(o.status.code(), Some(2), "dash has no `wait -n`: refused, not run one at a time");
    assert!(String::from_utf8_lossy(&o.stderr).contains("needs a shell with `wait -n'"));
    fs::remove_dir_all(&dir).unwrap();
}
