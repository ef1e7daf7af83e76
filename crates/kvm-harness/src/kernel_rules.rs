//! Rules whose outcome changed upstream, and upstream fixes a failure may
//! point at.
//!
//! A test never accepts "either errno" by itself: it asks
//! [`ForRunningKernel::expected`] for the running kernel's outcome, decided
//! from evidence that the kernel carries the change (an explicit setting in
//! [`RULES_VAR`], the kernel's history, then its release; see
//! [`kvm_model::decide`]), and names that evidence in its failure message.
//! Where nothing decides, [`Expectation::check`] accepts either documented
//! outcome as long as every check of the rule in the run sees the same one.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};

// The version-rule data lives in kvm-model, the one place both the model
// and the named tests read it from.
pub use kvm_model::decide::{Basis, Decision, History, KernelFacts};
pub use kvm_model::versioned::{
    Commit, Hex, KernelVersion, Rule, Versioned, GMEM_BINDING_OVERLAP, GMEM_FLAGS_WITHOUT_PRIVATE_MEM,
    GMEM_FLAGS_WITH_PRIVATE_MEM, HYPERCALL_EXIT_ZEROES_RET,
};

use crate::error::{errno_name, Error, Result, SysResult};
use crate::results::RESULTS_ENV;

/// Overrides the release read from `uname -r`, as `MAJOR.MINOR[.PATCH]`.
/// Rarely needed: a backport is found in the kernel's history.
pub const VERSION_VAR: &str = "KVM_SELFTESTS_KERNEL_VERSION";
/// Explicit outcomes, `rule=outcome[,rule=outcome...]` (an outcome is
/// `before`, `after` or one of the rule's values as printed): first in the
/// order of evidence.
pub const RULES_VAR: &str = "KVM_SELFTESTS_RULES";
/// A file with the kernel's history (written by `cargo xtask vm`): a
/// `source:` line, a `complete: yes|no` line, a `---` line, then the text
/// (a changelog, or `git log` lines).
pub const HISTORY_VAR: &str = "KVM_SELFTESTS_KERNEL_HISTORY";

/// The running kernel's facts, read once per process.
pub fn running_kernel() -> Result<&'static KernelFacts> {
    static FACTS: OnceLock<std::result::Result<KernelFacts, String>> = OnceLock::new();
    FACTS
        .get_or_init(|| {
            detect().map_err(|e| match e {
                Error::Config(message) => message,
                other => other.to_string(),
            })
        })
        .as_ref()
        .map_err(|message| Error::Config(message.clone()))
}

fn detect() -> Result<KernelFacts> {
    let uname = nix::sys::utsname::uname().sys(|| "uname() for the kernel release".into())?;
    let uname_release = uname.release().to_string_lossy().into_owned();
    let (release, release_source) = match std::env::var(VERSION_VAR) {
        Ok(value) => {
            let version = KernelVersion::parse(value.trim()).ok_or_else(|| {
                Error::Config(format!("{VERSION_VAR} must be a kernel release like 7.2 or 6.12.117 (got `{value}`)"))
            })?;
            (version, format!("{VERSION_VAR} = {}", value.trim()))
        }
        Err(_) => {
            let version = KernelVersion::parse(&uname_release).ok_or_else(|| {
                Error::Config(format!("uname -r = `{uname_release}` is no kernel release; set {VERSION_VAR}"))
            })?;
            (version, format!("uname -r = {uname_release}"))
        }
    };
    Ok(KernelFacts {
        release,
        release_source,
        history: history(&uname_release)?,
        settings: settings()?,
        settings_source: RULES_VAR.to_string(),
    })
}

/// [`RULES_VAR`], each entry checked: it must name a rule and one of its
/// outcomes, so a typo is an error now, not a silently ignored override.
pub fn settings() -> Result<BTreeMap<String, String>> {
    let Ok(text) = std::env::var(RULES_VAR) else {
        return Ok(BTreeMap::new());
    };
    let ids: Vec<&str> = kvm_model::versioned::ALL.iter().map(|r| r.id()).collect();
    let mut settings = BTreeMap::new();
    for item in text.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let (id, value) =
            item.split_once('=').ok_or_else(|| Error::Config(format!("{RULES_VAR}: `{item}` is not RULE=OUTCOME")))?;
        let id = id.trim();
        let Some(rule) = kvm_model::versioned::ALL.iter().find(|r| r.id() == id) else {
            return Err(Error::Config(format!("{RULES_VAR}: no rule `{id}`; the rules are {}", ids.join(", "))));
        };
        let value = value.trim();
        if !rule.accepts(value) {
            return Err(Error::Config(format!(
                "{RULES_VAR}: `{value}` is not an outcome of {id}: use before, after, or the outcome as the decision \
                 table prints it"
            )));
        }
        settings.insert(id.to_string(), value.to_string());
    }
    Ok(settings)
}

/// The history [`HISTORY_VAR`] names, else the changelog Debian installs
/// with the running kernel's image package, else none.
fn history(uname_release: &str) -> Result<Option<History>> {
    if let Some(path) = std::env::var_os(HISTORY_VAR).filter(|v| !v.is_empty()).map(PathBuf::from) {
        let text = std::fs::read_to_string(&path)
            .map_err(|e| Error::Config(format!("{HISTORY_VAR}={}: {e}", path.display())))?;
        return parse_history(text)
            .map(Some)
            .map_err(|e| Error::Config(format!("{HISTORY_VAR}={}: {e}", path.display())));
    }
    let changelog = PathBuf::from(format!("/usr/share/doc/linux-image-{uname_release}/changelog.Debian.gz"));
    if !changelog.is_file() {
        return Ok(None);
    }
    let out = std::process::Command::new("gzip")
        .arg("-dc")
        .arg(&changelog)
        .output()
        .map_err(|e| Error::Config(format!("gzip -dc {}: {e}", changelog.display())))?;
    if !out.status.success() {
        return Err(Error::Config(format!("gzip -dc {} failed: {}", changelog.display(), out.status)));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    // A Debian changelog lists every stable update's subjects.
    Ok(Some(History::new(format!("the Debian changelog {}", changelog.display()), text, true)))
}

/// Reads the [`HISTORY_VAR`] file format. Takes the text by value: a
/// changelog is megabytes, and the history keeps its body in place of a
/// copy (17 ms of every binary's start under TCG).
pub fn parse_history(mut text: String) -> std::result::Result<History, String> {
    let body = text.find("\n---\n").ok_or("no `---` line after the header")?;
    let head = &text[..body];
    let field =
        |name: &str| head.lines().find_map(|l| l.strip_prefix(name).map(str::trim)).ok_or(format!("no `{name}` line"));
    let source = field("source:")?.to_string();
    let complete = match field("complete:")? {
        "yes" => true,
        "no" => false,
        other => return Err(format!("`complete: {other}`: expected yes or no")),
    };
    text.replace_range(..body + "\n---\n".len(), "");
    Ok(History::new(source, text, complete))
}

/// Writes the [`HISTORY_VAR`] file format.
pub fn format_history(source: &str, complete: bool, text: &str) -> String {
    format!("source: {source}\ncomplete: {}\n---\n{text}", if complete { "yes" } else { "no" })
}

/// A `kvm` module parameter as `/sys/module/kvm/parameters` shows it;
/// `None` where this kernel has no such parameter.
pub fn kvm_param(name: &str) -> Option<String> {
    std::fs::read_to_string(format!("/sys/module/kvm/parameters/{name}")).ok().map(|v| v.trim().to_string())
}

/// The modes that select rules without any version: read from the running
/// kernel, printed with the decision table.
pub const MODES: &[&str] = &["gmem_in_place_conversion", "mmio_caching"];

/// `kvm.gmem_in_place_conversion` (7.4): private state kept per
/// guest_memfd (`KVM_SET_MEMORY_ATTRIBUTES2` on its fd) instead of per VM.
pub fn gmem_in_place_conversion() -> bool {
    kvm_param("gmem_in_place_conversion").is_some_and(|v| v == "Y")
}

/// The rules a process consulted, for [`consulted_table`].
static CONSULTED: Mutex<BTreeSet<&'static str>> = Mutex::new(BTreeSet::new());

/// One line per versioned rule (`ids`, or all): rule, outcome, what
/// decided it.
pub fn decision_table(ids: Option<&BTreeSet<&'static str>>) -> Result<String> {
    let facts = running_kernel()?;
    let mut out = String::new();
    for rule in kvm_model::versioned::ALL.iter().filter(|r| ids.is_none_or(|ids| ids.contains(r.id()))) {
        let (outcome, why) = rule.describe(facts).map_err(Error::Config)?;
        out.push_str(&format!("  {:<32} {outcome:<10} {why}\n", rule.id()));
    }
    if ids.is_none() {
        for mode in MODES {
            let value = kvm_param(mode).unwrap_or_else(|| "absent".into());
            out.push_str(&format!("  {:<32} {value:<10} /sys/module/kvm/parameters/{mode}\n", format!("kvm.{mode}")));
        }
    }
    Ok(out)
}

/// The table of the rules this process consulted; empty if none.
pub(crate) fn consulted_table() -> String {
    let ids = CONSULTED.lock().unwrap_or_else(|p| p.into_inner()).clone();
    if ids.is_empty() {
        return String::new();
    }
    decision_table(Some(&ids)).unwrap_or_else(|e| format!("  {e}\n"))
}

/// The expectation of a rule on the running kernel.
#[derive(Debug, Clone)]
pub struct Expectation<T: 'static> {
    /// The outcome; `None` when nothing decides (see [`Self::check`]).
    pub outcome: Option<T>,
    /// Which outcome and why, for failure messages.
    pub why: String,
    rule: &'static Versioned<T>,
}

/// A rule's outcome for the running kernel.
pub trait ForRunningKernel<T: 'static> {
    /// The outcome for the running kernel, with the reason.
    fn expected(&'static self) -> Result<Expectation<T>>;
}

impl<T: Copy + fmt::Debug + PartialEq + Send + Sync> ForRunningKernel<T> for Versioned<T> {
    fn expected(&'static self) -> Result<Expectation<T>> {
        // Deciding searches the kernel's history (megabytes of changelog):
        // once per rule and process, however often a test asks.
        type Decided = Box<dyn std::any::Any + Send + Sync>;
        static DECIDED: Mutex<BTreeMap<&'static str, Decided>> = Mutex::new(BTreeMap::new());
        CONSULTED.lock().unwrap_or_else(|p| p.into_inner()).insert(self.id);
        let mut decided = DECIDED.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = decided.get(self.id).and_then(|d| d.downcast_ref::<Expectation<T>>()) {
            return Ok(e.clone());
        }
        let e = self.expectation(running_kernel()?).map_err(Error::Config)?;
        let e = Expectation { outcome: e.outcome, why: e.why, rule: self };
        decided.insert(self.id, Box::new(e.clone()));
        Ok(e)
    }
}

impl<T: Copy + fmt::Debug + PartialEq> Expectation<T> {
    /// Whether `observed` is the outcome. An undecided rule accepts either
    /// of its outcomes, provided every check of it in this run (this
    /// process, and the other binaries writing [`RESULTS_ENV`]) saw the
    /// same one; the message of a mismatch says which it expected and why.
    pub fn check(&self, observed: T) -> std::result::Result<(), String> {
        match self.outcome {
            Some(outcome) if outcome == observed => Ok(()),
            Some(outcome) => Err(format!("expected {outcome:?}, got {observed:?}; {}", self.why)),
            None if observed != self.rule.before && observed != self.rule.after => {
                Err(format!("expected {:?} or {:?}, got {observed:?}; {}", self.rule.before, self.rule.after, self.why))
            }
            None => observe(self.rule.id, &format!("{observed:?}")).map_err(|first| {
                format!("got {observed:?}, but an earlier check of this run got {first}; {}", self.why)
            }),
        }
    }
}

impl Expectation<kvm_model::Errno> {
    /// Runs `op`, which must fail with the rule's errno (see [`Self::check`]).
    pub fn expect_errno<V: fmt::Debug>(&self, rule: &str, op: impl FnOnce() -> Result<V>) -> Result<()> {
        match op() {
            Ok(value) => Err(Error::rule(rule, format!("{}, but the call succeeded ({value:?})", self.describe()))),
            Err(e) => match e.errno().and_then(|n| kvm_model::Errno::ALL.iter().copied().find(|m| m.raw() == n as i32))
            {
                Some(got) => self.check(got).map_err(|detail| Error::rule(rule, format!("{detail} (from {e})"))),
                None => Err(Error::rule(
                    rule,
                    format!("{}, got {} from {e}", self.describe(), e.errno().map_or("no errno".into(), errno_name)),
                )),
            },
        }
    }

    fn describe(&self) -> String {
        match self.outcome {
            Some(o) => format!("expected {o:?}"),
            None => format!("expected {:?} or {:?}", self.rule.before, self.rule.after),
        }
    }
}

/// Holds an undecided rule to the first outcome this run observed: returns
/// that outcome (and where) when `observed` differs.
fn observe(id: &'static str, observed: &str) -> std::result::Result<(), String> {
    static SEEN: Mutex<BTreeMap<&'static str, String>> = Mutex::new(BTreeMap::new());
    let mut seen = SEEN.lock().unwrap_or_else(|p| p.into_inner());
    let file = std::env::var_os(RESULTS_ENV).filter(|v| !v.is_empty()).map(|v| {
        let mut p = PathBuf::from(v).into_os_string();
        p.push(".rules");
        PathBuf::from(p)
    });
    if !seen.contains_key(id) {
        // Another binary of the run may have seen it first.
        let earlier = file.as_ref().and_then(|f| std::fs::read_to_string(f).ok()).and_then(|text| {
            text.lines().find_map(|l| l.strip_prefix(id).and_then(|v| v.strip_prefix(' ')).map(str::to_string))
        });
        if let Some(value) = earlier {
            seen.insert(id, value);
        }
    }
    match seen.get(id) {
        Some(first) if first != observed => Err(first.clone()),
        Some(_) => Ok(()),
        None => {
            seen.insert(id, observed.to_string());
            if let Some(f) = file {
                let line = format!("{id} {observed}\n");
                let _ = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(f)
                    .and_then(|mut w| w.write_all(line.as_bytes()));
            }
            Ok(())
        }
    }
}

/// An upstream fix whose absence explains a known failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fix {
    /// The fixing commit.
    pub commit: Commit,
    /// The first mainline release that has it.
    pub mainline: KernelVersion,
}

/// The fixes that make `KVM_PRE_FAULT_MEMORY` return instead of spinning
/// while its memslot is deleted or moved. Both reached mainline through the
/// kvm-x86 pulls for 6.15 and 6.18; neither is in Debian's 6.12.118.
pub const PREFAULT_VS_MEMSLOT_DELETION: &[Fix] = &[
    Fix {
        commit: kvm_model::versioned::PREFAULT_FREES_OBSOLETE_ROOTS.change,
        mainline: kvm_model::versioned::PREFAULT_FREES_OBSOLETE_ROOTS.since,
    },
    Fix {
        commit: Commit {
            sha: "3ccbf6f47098",
            subject: "KVM: x86/mmu: Return -EAGAIN if userspace deletes/moves memslot during prefault",
        },
        mainline: KernelVersion::new(6, 18),
    },
];

/// The fix for bindings whose guest_memfd offset plus size crosses 2^63:
/// compared as signed file offsets, the sum went negative and passed the
/// "ends inside the file" check, so KVM accepted a binding far past the end
/// of the guest_memfd (seen on 6.18). 6.12 compared them unsigned.
pub const GMEM_BINDING_OFFSET_SIGNEDNESS: &[Fix] = &[Fix {
    commit: Commit {
        sha: "eba85fee7fc6",
        subject: "KVM: guest_memfd: Treat memslot binding offset+size as unsigned values",
    },
    mainline: KernelVersion::new(7, 2),
}];

/// The series that makes KVM report event delivery it cannot emulate (the
/// IDT or another descriptor table in emulated MMIO) as
/// `KVM_EXIT_INTERNAL_ERROR` / `KVM_INTERNAL_ERROR_DELIVERY_EV`. Before it,
/// SVM emulated the faulting instruction again and re-injected the
/// exception, forever.
pub const EVENT_VECTORING_MMIO: &[Fix] = &[
    Fix {
        commit: Commit {
            sha: "5c9cfc486636",
            subject: "KVM: x86: Add emulation status for unhandleable exception vectoring",
        },
        mainline: KernelVersion::new(6, 14),
    },
    Fix {
        commit: Commit {
            sha: "7bd7ff99110a",
            subject: "KVM: SVM: Handle event vectoring error in check_emulate_instruction()",
        },
        mainline: KernelVersion::new(6, 14),
    },
];

/// Every fix list a failure may be hinted with.
const FIXES: &[&[Fix]] = &[PREFAULT_VS_MEMSLOT_DELETION, GMEM_BINDING_OFFSET_SIGNEDNESS, EVENT_VECTORING_MMIO];

/// Every upstream commit whose presence in a kernel's history decides a
/// rule or silences a fix hint: what `cargo xtask vm` looks up in a git
/// tree's log.
pub fn evidence() -> Vec<Commit> {
    let rules = kvm_model::versioned::ALL.iter().flat_map(|r| r.evidence());
    let fixes = FIXES.iter().flat_map(|list| list.iter().map(|f| f.commit));
    let mut all: Vec<Commit> = rules.chain(fixes).collect();
    all.dedup_by_key(|c| c.subject);
    all
}

/// Run a test body; if it fails on a kernel that may lack a fix, append
/// "this kernel lacks / may lack upstream fix ..." for each such fix (LTP's
/// `linux-git` tags): a fix the kernel's history names, or whose mainline
/// release the kernel has reached, is not hinted. A pass is never touched.
pub fn with_fix_hints(fixes: &[Fix], body: impl FnOnce() -> Result<()>) -> Result<()> {
    let result = body();
    let Err(err) = result else {
        return result;
    };
    let hints = hints_for(fixes, running_kernel().ok());
    if hints.is_empty() {
        return Err(err);
    }
    Err(Error::Hinted { error: Box::new(err), hints })
}

/// The hint lines for a failure on `kernel` (all of them when nothing is
/// known of it).
fn hints_for(fixes: &[Fix], kernel: Option<&KernelFacts>) -> Vec<String> {
    fixes
        .iter()
        .filter_map(|f| {
            let mainline = format!("{} (mainline {}.{})", f.commit, f.mainline.major, f.mainline.minor);
            let Some(k) = kernel else {
                return Some(format!("this kernel may lack upstream fix {mainline}"));
            };
            let history = k.history.as_ref();
            if k.release >= f.mainline || history.is_some_and(|h| h.names(&f.commit).is_some()) {
                return None;
            }
            Some(match history {
                Some(h) if h.complete() => {
                    format!("this kernel lacks upstream fix {mainline}: {} does not list it", h.source())
                }
                _ => format!("this kernel may lack upstream fix {mainline}"),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kernel(release: &str, history: Option<History>) -> KernelFacts {
        KernelFacts {
            release_source: format!("uname -r = {release}"),
            history,
            ..KernelFacts::release(KernelVersion::parse(release).unwrap())
        }
    }

    #[test]
    fn releases_parse_from_uname_strings() {
        assert_eq!(KernelVersion::parse("6.12.117-amd64"), Some(KernelVersion { major: 6, minor: 12, patch: 117 }));
        assert_eq!(KernelVersion::parse("7.3.4"), Some(KernelVersion { major: 7, minor: 3, patch: 4 }));
        assert_eq!(KernelVersion::parse("6.18.0-rc2+"), Some(KernelVersion::new(6, 18)));
        assert_eq!(KernelVersion::parse("7.2"), Some(KernelVersion::new(7, 2)));
        assert_eq!(KernelVersion::parse("6.18.44-fc-v595"), Some(KernelVersion { major: 6, minor: 18, patch: 44 }));
        for bad in ["", "7", "x7.2", "-7.2", "7..2"] {
            assert_eq!(KernelVersion::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn fix_hints_name_only_fixes_the_kernel_may_lack() {
        let old = hints_for(PREFAULT_VS_MEMSLOT_DELETION, Some(&kernel("6.12.117-amd64", None)));
        assert_eq!(old.len(), 2);
        assert_eq!(
            old[1],
            "this kernel may lack upstream fix 3ccbf6f47098 (\"KVM: x86/mmu: Return -EAGAIN if userspace \
             deletes/moves memslot during prefault\") (mainline 6.18)"
        );
        assert!(hints_for(PREFAULT_VS_MEMSLOT_DELETION, Some(&kernel("7.3.4", None))).is_empty());
        assert_eq!(hints_for(PREFAULT_VS_MEMSLOT_DELETION, None).len(), 2);
        let changelog = History::new(
            "the Debian changelog",
            "- KVM: x86/mmu: Return -EAGAIN if userspace deletes/moves memslot during\n  prefault",
            true,
        );
        let backported = hints_for(PREFAULT_VS_MEMSLOT_DELETION, Some(&kernel("6.12.200", Some(changelog))));
        assert_eq!(backported.len(), 1, "{backported:?}");
        assert!(backported[0].starts_with("this kernel lacks upstream fix 20a6cff3b283"), "{backported:?}");
        assert!(backported[0].ends_with(": the Debian changelog does not list it"), "{backported:?}");
    }

    #[test]
    fn history_files_round_trip_and_bad_ones_are_named() {
        let text = format_history("git log of /src/linux (v7.3-12-gabc)", true, "abc KVM: x\n");
        let h = parse_history(text).unwrap();
        assert_eq!((h.source(), h.complete()), ("git log of /src/linux (v7.3-12-gabc)", true));
        // The body is searched, the header is not.
        assert!(h.names(&Commit { sha: "", subject: "KVM: x" }).is_some());
        assert!(h.names(&Commit { sha: "", subject: "complete: yes" }).is_none());
        assert!(parse_history("source: x\ncomplete: maybe\n---\n".into()).unwrap_err().contains("complete: maybe"));
        assert!(parse_history("source: x\n".into()).unwrap_err().contains("---"));
    }
}
