//! `cargo xtask report --format kcidb`: a run's results as KCIDB JSON
//! (schema 5.3, what KernelCI's database takes): one checkout (the tree's
//! git HEAD or the Debian package version), one build (kernel id and the
//! hash of the resolved config recipe), one test per result under
//! `kvm_private_mem.<binary>.<test>`, and for each known failure an issue
//! and an incident tying the test to it (README, "Running in kernel CI",
//! has the table of how each outcome maps in every format).

use std::path::Path;
use std::process::Command;

use serde_json::{json, Map, Value};

use crate::debian;
use crate::error::{Error, Result};
use crate::kernel::{self, Source};
use crate::recipe::{KconfigSymbols, Recipe};
use crate::report::{Outcome, TestResult, CRASH_TEST};
use crate::util;

/// The KCIDB schema version written (kcidb-io's `schema.V5_3`).
pub const SCHEMA: (u32, u32) = (5, 3);
/// The first component of every test path: the kselftest collection name.
pub const COLLECTION: &str = "kvm_private_mem";
/// The submitting CI system's name, until KCIDB assigns one (`--origin`).
pub const DEFAULT_ORIGIN: &str = "kvm_private_mem";
/// KCIDB's limit on `log_excerpt`, in characters.
const EXCERPT_MAX: usize = 16384;

/// What was tested: the checkout and build objects' fields.
#[derive(Debug, Clone)]
pub struct Kernel {
    /// The part of the checkout id after the origin.
    pub checkout: String,
    /// Checkout fields besides id and origin (git hash, comment, ...).
    pub checkout_fields: Map<String, Value>,
    /// The cache's name of the source (`linux-source-7.3_7.3.4-1_bpo13_1`).
    pub id: String,
    /// `kernel::config_hash` of the recipe resolved for this source.
    pub config_hash: String,
}

impl Kernel {
    /// Names the kernel `source` builds: reads the Debian package's version
    /// or the tree's git HEAD, and resolves the recipe against its Kconfig.
    pub fn of(source: &Source) -> Result<Kernel> {
        let (id, src) = match source {
            Source::Debian(release) => kernel::debian_source(release)?,
            Source::Tree(tree) => kernel::tree_source(tree)?,
        };
        let fragment_file = kernel::fragment_path();
        let fragment = std::fs::read_to_string(&fragment_file).map_err(util::io_err(&fragment_file))?;
        let config_hash = kernel::config_hash(&Recipe::resolve(&fragment, &KconfigSymbols::of_tree(&src)?)?);
        let (checkout, checkout_fields) = match source {
            Source::Debian(release) => debian_checkout(&debian::tarball(release)?.package_version),
            Source::Tree(_) => git_checkout(&src, &id),
        };
        Ok(Kernel { checkout, checkout_fields, id, config_hash })
    }
}

/// `linux-source-7.3 7.3.4-1~bpo13+1`: the package and its version.
fn debian_checkout(package_version: &str) -> (String, Map<String, Value>) {
    let (package, version) = package_version.split_once(' ').unwrap_or((package_version, ""));
    let mut f = Map::new();
    f.insert("comment".into(), json!(format!("Debian {package_version}")));
    f.insert("tree_name".into(), json!(format!("debian-{package}")));
    f.insert("valid".into(), json!(true));
    f.insert("misc".into(), json!({ "debian_package": package, "debian_version": version }));
    (format!("debian-{}", util::sanitize(package_version)), f)
}

/// A tree's git HEAD (hash, `git describe`, branch, an https/git remote);
/// a tree without git is named by its cache id.
fn git_checkout(src: &Path, id: &str) -> (String, Map<String, Value>) {
    let git = |args: &[&str]| {
        Command::new("git")
            .arg("-C")
            .arg(src)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let mut f = Map::new();
    f.insert("valid".into(), json!(true));
    let Some(hash) = git(&["rev-parse", "HEAD"]).filter(|h| h.len() == 40) else {
        f.insert("comment".into(), json!(format!("tree {} (no git history)", src.display())));
        return (id.to_string(), f);
    };
    let describe = git(&["describe", "--always", "--dirty"]).unwrap_or_default();
    f.insert("git_commit_hash".into(), json!(hash));
    f.insert("git_commit_name".into(), json!(describe));
    f.insert("comment".into(), json!(format!("tree {} at {describe}", src.display())));
    if let Some(branch) = git(&["rev-parse", "--abbrev-ref", "HEAD"]).filter(|b| b != "HEAD") {
        f.insert("git_repository_branch".into(), json!(branch));
    }
    if let Some(url) =
        git(&["remote", "get-url", "origin"]).filter(|u| u.starts_with("https://") || u.starts_with("git://"))
    {
        f.insert("git_repository_url".into(), json!(url));
    }
    // Uncommitted changes are a different source than HEAD.
    let dirty = if describe.ends_with("-dirty") { "-dirty" } else { "" };
    (format!("git-{hash}{dirty}"), f)
}

/// A KCIDB path component: letters, digits, `_` and `-` only.
fn path_part(s: &str) -> String {
    let p: String = s.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' }).collect();
    if p.is_empty() {
        "_".into()
    } else {
        p
    }
}

/// A log excerpt KCIDB accepts: no NUL, at most its limit (the head kept:
/// a failure names the rule first).
fn excerpt(message: &str) -> String {
    let clean: String = message.chars().filter(|&c| c != '\0').collect();
    if clean.chars().count() <= EXCERPT_MAX {
        return clean;
    }
    const MARK: &str = "\n[truncated]";
    let mut cut: String = clean.chars().take(EXCERPT_MAX - MARK.len()).collect();
    cut.push_str(MARK);
    cut
}

/// A test's KCIDB status: see the README's mapping table. A known failure
/// is FAIL (the code is faulty) with an incident naming its issue; a binary
/// that died without reporting any result is ERROR (the tested code's state
/// is unknown).
pub fn status(r: &TestResult) -> &'static str {
    match r.outcome {
        Outcome::Pass => "PASS",
        Outcome::Skip => "SKIP",
        Outcome::Xfail => "FAIL",
        Outcome::Fail if r.test == CRASH_TEST => "ERROR",
        Outcome::Fail => "FAIL",
    }
}

/// The KCIDB document for `results` of one run of `kernel`.
pub fn document(results: &[TestResult], kernel: &Kernel, origin: &str, run: &str) -> Value {
    let checkout_id = format!("{origin}:{}", kernel.checkout);
    let mut checkout = kernel.checkout_fields.clone();
    checkout.insert("id".into(), json!(checkout_id));
    checkout.insert("origin".into(), json!(origin));
    let build_id = format!("{origin}:{}-{}", kernel.id, kernel.config_hash);
    let build = json!({
        "id": build_id,
        "origin": origin,
        "checkout_id": checkout_id,
        "architecture": "x86_64",
        "config_name": format!("kvm-private-mem.config on {}", kernel::CONFIG_BASE),
        // The tests ran, so the kernel built and booted.
        "status": if results.is_empty() { "MISS" } else { "PASS" },
        "misc": { "kernel_id": kernel.id, "config_hash": kernel.config_hash },
    });
    let (mut tests, mut issues, mut incidents) = (Vec::new(), Vec::new(), Vec::new());
    for r in results {
        let path = format!("{COLLECTION}.{}.{}", path_part(&r.binary), path_part(&r.test));
        let id = format!("{build_id}:{run}:{path}");
        let mut test = json!({
            "id": id,
            "origin": origin,
            "build_id": build_id,
            "path": path,
            "status": status(r),
            "duration": r.duration_ms as f64 / 1000.0,
            "misc": { "binary": r.binary, "test": r.test, "outcome": r.outcome.to_string() },
        });
        if r.outcome != Outcome::Pass && !r.message.is_empty() {
            test["log_excerpt"] = json!(excerpt(&r.message));
        }
        if r.outcome == Outcome::Xfail {
            let issue_id = format!("{origin}:known-failure.{}.{}", path_part(&r.binary), path_part(&r.test));
            let first = r.message.lines().next().unwrap_or_default().replace('\0', "");
            issues.push(json!({
                "id": issue_id,
                "version": 0,
                "origin": origin,
                "comment": first,
                "culprit": { "code": true },
                "misc": { "known_failure": format!("{}::{}", r.binary, r.test) },
            }));
            incidents.push(json!({
                "id": format!("{id}:known-failure"),
                "origin": origin,
                "issue_id": issue_id,
                "issue_version": 0,
                "test_id": id,
                "present": true,
                "comment": "expected: listed in the run's known failures",
            }));
        }
        tests.push(test);
    }
    json!({
        "version": { "major": SCHEMA.0, "minor": SCHEMA.1 },
        "checkouts": [Value::Object(checkout)],
        "builds": [build],
        "tests": tests,
        "issues": issues,
        "incidents": incidents,
    })
}

/// The run's id in test ids: a hash of the results file's text, so the same
/// file always gives the same ids and two runs never share them.
pub fn run_id(results_text: &str) -> String {
    format!("{:016x}", util::fnv1a(&[results_text.as_bytes()]))
}

/// Python that validates a KCIDB file with kcidb-io against exactly the
/// schema version written and prints the counts.
const VALIDATOR: &str = "import json, sys\n\
import kcidb_io\n\
data = json.load(open(sys.argv[1]))\n\
kcidb_io.schema.V5_3.validate_exactly(data)\n\
print('kcidb-io: valid KCIDB %d.%d:' % (data['version']['major'], data['version']['minor']), \
', '.join('%d %s' % (len(data.get(k, [])), k) for k in ('checkouts', 'builds', 'tests', 'issues', 'incidents')))\n";

/// Whether `python3 -c 'import kcidb_io'` works here.
pub fn validator_available() -> bool {
    Command::new("python3").args(["-c", "import kcidb_io"]).output().is_ok_and(|o| o.status.success())
}

/// Validate `file` with kcidb-io; its one line of counts, or the schema
/// error it printed.
pub fn validate(file: &Path) -> Result<String> {
    let mut cmd = Command::new("python3");
    cmd.arg("-c").arg(VALIDATOR).arg(file);
    let out = cmd.output().map_err(|source| Error::Spawn { cmd: "python3".into(), source })?;
    if out.status.success() {
        return Ok(String::from_utf8_lossy(&out.stdout).trim().to_string());
    }
    let err = String::from_utf8_lossy(&out.stderr);
    let tail: Vec<&str> = err.lines().rev().take(12).collect::<Vec<_>>().into_iter().rev().collect();
    Err(Error::Config(format!("{} is not valid KCIDB (kcidb-io):\n{}", file.display(), tail.join("\n"))))
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;

    fn r(binary: &str, test: &str, outcome: Outcome, message: &str) -> TestResult {
        TestResult { binary: binary.into(), test: test.into(), outcome, duration_ms: 1500, message: message.into() }
    }

    fn kernel() -> Kernel {
        let (checkout, checkout_fields) = debian_checkout("linux-source-7.3 7.3.4-1~bpo13+1");
        Kernel { checkout, checkout_fields, id: "linux-source-7.3_7.3.4-1_bpo13_1".into(), config_hash: "0123".into() }
    }

    fn sample() -> Vec<TestResult> {
        vec![
            r("vm_types", "create_vm_succeeds_iff_type_bit", Outcome::Pass, ""),
            r("guest_memfd", "size_rules", Outcome::Fail, "rule violated: x\nexpected EINVAL\0"),
            r("address_spaces", "smm", Outcome::Skip, "needs KVM_CAP_X86_SMM: /dev/kvm reports 0"),
            r("private_mem_exits", "stale_mmio", Outcome::Xfail, "known failure: stale MMIO SPTE: rule violated"),
            r("model", CRASH_TEST, Outcome::Fail, "model exited with status 139 without reporting a failed test"),
            r("odd name", "a::b/c", Outcome::Fail, &"long ".repeat(5000)),
        ]
    }

    #[test]
    fn every_outcome_maps_to_its_documented_status_and_path() {
        let doc = document(&sample(), &kernel(), DEFAULT_ORIGIN, "run1");
        let tests = doc["tests"].as_array().unwrap();
        let got: Vec<(&str, &str)> =
            tests.iter().map(|t| (t["path"].as_str().unwrap(), t["status"].as_str().unwrap())).collect();
        assert_eq!(
            got,
            [
                ("kvm_private_mem.vm_types.create_vm_succeeds_iff_type_bit", "PASS"),
                ("kvm_private_mem.guest_memfd.size_rules", "FAIL"),
                ("kvm_private_mem.address_spaces.smm", "SKIP"),
                ("kvm_private_mem.private_mem_exits.stale_mmio", "FAIL"),
                ("kvm_private_mem.model.exit_status", "ERROR"),
                ("kvm_private_mem.odd_name.a__b_c", "FAIL"),
            ]
        );
        assert_eq!(tests[1]["log_excerpt"], "rule violated: x\nexpected EINVAL");
        assert_eq!(tests[0]["duration"], 1.5);
        assert!(tests[0].get("log_excerpt").is_none());
        assert_eq!(tests[5]["log_excerpt"].as_str().unwrap().chars().count(), EXCERPT_MAX);
        assert_eq!(tests[3]["misc"]["outcome"], "xfail");
        // The known failure is tied to an issue by an incident.
        assert_eq!(doc["issues"].as_array().unwrap().len(), 1);
        let incident = &doc["incidents"][0];
        assert_eq!(incident["test_id"], tests[3]["id"]);
        assert_eq!(incident["issue_id"], doc["issues"][0]["id"]);
        assert_eq!(
            doc["builds"][0]["id"], "kvm_private_mem:linux-source-7.3_7.3.4-1_bpo13_1-0123",
            "build = kernel id and config hash"
        );
        assert_eq!(doc["checkouts"][0]["comment"], "Debian linux-source-7.3 7.3.4-1~bpo13+1");
    }

    #[test]
    fn test_ids_differ_between_runs_and_repeat_for_the_same_file() {
        assert_eq!(run_id("a\n"), run_id("a\n"));
        assert_ne!(run_id("a\n"), run_id("b\n"));
        let one = document(&sample(), &kernel(), DEFAULT_ORIGIN, &run_id("a\n"));
        let two = document(&sample(), &kernel(), DEFAULT_ORIGIN, &run_id("b\n"));
        assert_ne!(one["tests"][0]["id"], two["tests"][0]["id"]);
    }

    /// The document kcidb-io (the KCIDB project's own schema library)
    /// accepts. It needs `python3 -m pip install kcidb-io`, which `.ci/run`
    /// installs: there (CI set) a missing kcidb-io fails the test.
    #[test]
    fn kcidb_io_accepts_the_document() {
        if !validator_available() {
            assert!(std::env::var_os("CI").is_none(), "CI must install kcidb-io (pip) before cargo test");
            eprintln!("kcidb-io not installed (python3 -m pip install kcidb-io): schema check not run");
            return;
        }
        let dir = std::env::temp_dir().join(format!("xtask-kcidb-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let file = dir.join("kcidb.json");
        let doc = document(&sample(), &kernel(), DEFAULT_ORIGIN, "run1");
        fs::write(&file, serde_json::to_string_pretty(&doc).unwrap()).unwrap();
        let counts = validate(&file).unwrap();
        assert!(counts.contains("6 tests, 1 issues, 1 incidents"), "{counts}");
        // And a broken one is refused, naming the field.
        let mut bad = doc.clone();
        bad["tests"][0]["status"] = json!("XFAIL");
        fs::write(&file, serde_json::to_string(&bad).unwrap()).unwrap();
        let err = validate(&file).unwrap_err().to_string();
        assert!(err.contains("XFAIL"), "{err}");
        fs::remove_dir_all(&dir).unwrap();
    }
}
