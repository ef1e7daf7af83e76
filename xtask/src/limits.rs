//! Time limits of the test binaries and C tests inside the guest, in the
//! style of kselftest's per-directory `settings` (`timeout=N`): each binary
//! and each C test has a default sized from measured times, which
//! `KVM_SELFTESTS_TEST_TIMEOUT` and then `--test-timeout` override, for
//! all of them (`SECS`) or for one (`NAME=SECS`). The binaries' defaults
//! go into the bundle (`kvm_private_mem/timeouts`); the bundle's run.sh
//! applies the settings, kills a binary's whole process group when its
//! limit runs out, records the binary as failed, and goes on with the next
//! one.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

/// Environment variable: comma-separated `SECS` or `NAME=SECS` settings,
/// applied before those of `--test-timeout`.
pub const ENV: &str = "KVM_SELFTESTS_TEST_TIMEOUT";

/// The model's exploring budget default (tests/model.rs): the `model`
/// binary's limit follows it; run.sh follows `KVM_SELFTESTS_MODEL_BUDGET`
/// where it runs.
const MODEL_BUDGET_DEFAULT: u64 = 120;

/// Defaults in seconds: the slower wall time measured in the 6.12.118 and
/// 7.3.4 guests (`--upstream`, TCG, a 2-core host busy with other builds),
/// times five, rounded up to 10 s, at least 60 s. A fivefold slowdown of one
/// binary is a hang as far as a verdict goes; a run that is slow everywhere
/// (a gcov kernel, `--binary-jobs 2`) stays inside these.
const DEFAULTS: &[(&str, u64)] = &[
    ("address_spaces", 60),          // 1.81 s (6.12) / 0.76 s (7.3)
    ("allocation_failures", 60),     // 5.12 / 5.97
    ("guest_memfd", 60),             // 4.42 / 4.67
    ("harness_guest", 60),           // 1.98 / 1.78
    ("memory_attributes", 60),       // 1.79 / 1.48
    ("pre_fault_memory", 60),        // 6.02 / 1.40 (6.12: three 2 s hang deadlines)
    ("private_mem_conversions", 70), // 12.72 / 10.68
    ("private_mem_exits", 60),       // 2.02 / 1.21
    ("private_memslots", 60),        // 2.36 / 2.39
    ("set_memory_region", 120),      // 19.26 / 22.59
    ("vcpu_state", 60),              // 2.90 / 1.30
    ("vm_types", 60),                // 2.41 / 1.14
    ("private_mem_bench", FALLBACK), // `--bench` only; not measured
    // The C tests (binary `upstream`, named by file).
    ("guest_memfd_test", 60),             // 0.51 / 0.68
    ("set_memory_region_test", 180),      // 35.25 / 31.98
    ("private_mem_kvm_exits_test", 60),   // 0.38 / 0.56
    ("private_mem_conversions_test", 60), // 3.57 / 2.73
    ("pre_fault_memory_test", 60),        // 0.54 / 0.81
    ("vm_types_test", 60),                // - / 0.32 (since 6.16)
];

/// A binary the table does not know (`--test-binary`). kselftest's KVM
/// directory sets 120 s in its `settings` for bare metal; a binary of
/// unknown size under TCG gets more.
const FALLBACK: u64 = 300;

/// One setting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Limit {
    /// Every binary and C test.
    All(u64),
    /// The binary or C test of that name.
    One(String, u64),
}

impl FromStr for Limit {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let secs = |v: &str| {
            v.parse::<u64>().ok().filter(|&n| n > 0 && v.bytes().all(|b| b.is_ascii_digit())).ok_or_else(|| {
                format!("a time limit is SECS or NAME=SECS, SECS a whole number of seconds above 0 (got `{s}`)")
            })
        };
        match s.split_once('=') {
            None => Ok(Limit::All(secs(s)?)),
            Some((name, v)) => {
                let valid =
                    !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
                if !valid {
                    return Err(format!("`{name}` in `{s}` is not the name of a test binary or C test"));
                }
                Ok(Limit::One(name.to_string(), secs(v)?))
            }
        }
    }
}

impl fmt::Display for Limit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Limit::All(secs) => write!(f, "{secs}"),
            Limit::One(name, secs) => write!(f, "{name}={secs}"),
        }
    }
}

/// The settings of `KVM_SELFTESTS_TEST_TIMEOUT`: a comma-separated list.
pub fn parse_list(value: &str) -> Result<Vec<Limit>, String> {
    value.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::parse).collect()
}

/// The limits of one run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Limits {
    all: Option<u64>,
    named: BTreeMap<String, u64>,
}

impl Limits {
    /// Apply `settings` in order: `SECS` sets every limit (dropping the
    /// per-name ones set before it), `NAME=SECS` one.
    pub fn new(settings: impl IntoIterator<Item = Limit>) -> Self {
        let mut limits = Limits::default();
        for s in settings {
            match s {
                Limit::All(secs) => {
                    limits.all = Some(secs);
                    limits.named.clear();
                }
                Limit::One(name, secs) => {
                    limits.named.insert(name, secs);
                }
            }
        }
        limits
    }

    /// The limit of the binary or C test `name`, in seconds.
    pub fn of(&self, name: &str) -> u64 {
        if let Some(&secs) = self.named.get(name) {
            return secs;
        }
        self.all.unwrap_or_else(|| self.default_of(name))
    }

    fn default_of(&self, name: &str) -> u64 {
        if name == "model" {
            // Each of two test threads runs two model tests, each exploring
            // for up to the budget; the rest covers setup, the last case and
            // a shrink under way.
            return 2 * MODEL_BUDGET_DEFAULT + 180;
        }
        DEFAULTS.iter().find(|(n, _)| *n == name).map_or(FALLBACK, |&(_, secs)| secs)
    }

    /// A per-name setting that names nothing in the run is a typo, refused
    /// before anything boots.
    pub fn check_names(&self, known: &[&str]) -> Result<(), String> {
        let unknown: Vec<String> = self
            .named
            .keys()
            .filter(|n| !known.contains(&n.as_str()))
            .map(|n| match closest(n, known) {
                Some(near) => format!("{n} (did you mean {near}?)"),
                None => n.clone(),
            })
            .collect();
        if unknown.is_empty() {
            return Ok(());
        }
        Err(format!(
            "time limit for {}: no test binary or C test of this run has that name (they are: {})",
            unknown.join(", "),
            known.join(", ")
        ))
    }
}

/// The known name within three single-character edits of `name`, nearest first.
fn closest<'a>(name: &str, known: &[&'a str]) -> Option<&'a str> {
    known.iter().map(|k| (edits(name, k), *k)).filter(|(d, _)| *d <= 3).min().map(|(_, k)| k)
}

/// Levenshtein distance.
fn edits(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diag = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let next = (diag + usize::from(ca != *cb)).min(row[j] + 1).min(row[j + 1] + 1);
            diag = row[j + 1];
            row[j + 1] = next;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_parse_as_secs_or_name_equals_secs() {
        assert_eq!("30".parse(), Ok(Limit::All(30)));
        assert_eq!("pre_fault_memory_test=5".parse(), Ok(Limit::One("pre_fault_memory_test".into(), 5)));
        for bad in ["0", "-1", "1.5", "", "x", "=5", "a=", "a=0", "a b=3", "+3"] {
            assert!(bad.parse::<Limit>().is_err(), "{bad}");
        }
        assert_eq!(parse_list("60, model=900,"), Ok(vec![Limit::All(60), Limit::One("model".into(), 900)]));
    }

    #[test]
    fn later_settings_override_earlier_ones() {
        let settings = |env: &str, args: &[Limit]| [parse_list(env).unwrap(), args.to_vec()].concat();
        let l = Limits::new(settings("model=900,vm_types=7", &[Limit::All(40)]));
        assert_eq!((l.of("model"), l.of("vm_types"), l.of("anything")), (40, 40, 40));
        let l = Limits::new(settings("45", &["vm_types=7".parse().unwrap()]));
        assert_eq!((l.of("model"), l.of("vm_types")), (45, 7));
        assert!(parse_list("60,x=0").is_err());
    }

    #[test]
    fn defaults_cover_every_binary_and_c_test() {
        let l = Limits::default();
        assert_eq!(l.of("pre_fault_memory_test"), 60);
        assert_eq!(l.of("some_new_binary"), FALLBACK);
        assert_eq!(l.of("model"), 2 * MODEL_BUDGET_DEFAULT + 180);
        // Every scenario binary of the suite has a measured default.
        let tests = std::fs::read_dir(crate::util::workspace_root().join("tests")).unwrap();
        for entry in tests {
            let name = entry.unwrap().file_name().to_string_lossy().into_owned();
            if let Some(binary) = name.strip_suffix(".rs").filter(|b| *b != "lib" && *b != "model") {
                assert!(DEFAULTS.iter().any(|(n, _)| *n == binary), "no default time limit for {binary}");
            }
        }
        for c in crate::upstream::c_test_names() {
            assert!(DEFAULTS.iter().any(|(n, _)| *n == c), "no default time limit for {c}");
        }
    }

    #[test]
    fn a_limit_for_an_unknown_name_is_refused() {
        let l = Limits::new(["vm_type=5".parse().unwrap(), "vm_types=5".parse().unwrap()]);
        let e = l.check_names(&["vm_types", "model"]).unwrap_err();
        assert!(e.starts_with("time limit for vm_type (did you mean vm_types?): no test binary"), "{e}");
        let e = Limits::new(["zzz=5".parse().unwrap()]).check_names(&["model"]).unwrap_err();
        assert!(e.starts_with("time limit for zzz: no test binary"), "{e}");
        assert!(Limits::new([Limit::All(5)]).check_names(&[]).is_ok());
    }
}
