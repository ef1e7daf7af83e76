//! Which outcome of a [`Versioned`] rule a kernel gets, from evidence that
//! it carries the change, in this order:
//!
//! 1. an explicit setting naming the rule and its outcome;
//! 2. the kernel's history (a distribution changelog, a git tree's log)
//!    naming the change or a commit that carries it: stable kernels
//!    backport, so a release number alone never says a change is absent;
//! 3. the release: at or after the change's mainline release it is there;
//! 4. a complete history that names none of those commits: it is absent;
//! 5. nothing decides: either documented outcome is accepted, provided
//!    every check of the rule in the run observes the same one.

use std::collections::BTreeMap;
use std::fmt;

use crate::versioned::{Commit, KernelVersion, Versioned};

/// What a kernel's history says about the changes it carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct History {
    source: String,
    /// The text as read. It is searched with every run of white space
    /// matching every other ([`contains_folded`]), so a subject a changelog
    /// wrapped over two lines still matches; folding the whole text up
    /// front cost each test binary 0.17 s of its start under TCG (2.7 MB of
    /// 6.12's changelog), and most binaries consult one rule or none.
    text: String,
    complete: bool,
}

impl History {
    /// `source` names the history (`Debian changelog of linux-source-6.12
    /// 6.12.118-1~deb12u1`); `complete` says whether it lists every change
    /// the kernel carries (a full git log, a distribution changelog of
    /// stable updates), so that a change it does not name is absent.
    pub fn new(source: impl Into<String>, text: impl Into<String>, complete: bool) -> Self {
        History { source: source.into(), text: text.into(), complete }
    }

    /// Where the history was read.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Whether a change it does not name is absent.
    pub fn complete(&self) -> bool {
        self.complete
    }

    /// How the history names `commit`, if it does: by subject, or by SHA
    /// (a stable backport's `commit <sha> upstream`).
    pub fn names(&self, commit: &Commit) -> Option<String> {
        let words: Vec<&str> = commit.subject.split_whitespace().collect();
        if contains_folded(&self.text, &words) {
            return Some(format!("\"{}\"", commit.subject));
        }
        let sha = commit.sha;
        (sha.len() >= 12 && self.text.contains(sha)).then(|| format!("{sha} (\"{}\")", commit.subject))
    }
}

/// Whether `text`, with every run of white space folded to one space,
/// contains `words` joined by single spaces: a substring match, so the first
/// word may end another and the last begin one, as in the folded text.
pub(crate) fn contains_folded(text: &str, words: &[&str]) -> bool {
    let Some((first, rest)) = words.split_first() else {
        return false;
    };
    'occurrence: for (at, _) in text.match_indices(first) {
        let mut tail = &text[at + first.len()..];
        for word in rest {
            // White space before each further word, then the word.
            let trimmed = tail.trim_start();
            if trimmed.len() == tail.len() || !trimmed.starts_with(word) {
                continue 'occurrence;
            }
            tail = &trimmed[word.len()..];
        }
        return true;
    }
    false
}

/// What is known of the running kernel: its release, its history and the
/// explicit settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelFacts {
    /// The release.
    pub release: KernelVersion,
    /// Where the release was read (`uname -r = 6.12.118`).
    pub release_source: String,
    /// The history, where one was found.
    pub history: Option<History>,
    /// Explicit outcomes by rule id.
    pub settings: BTreeMap<String, String>,
    /// Where the settings came from (a variable's name), for the reasons.
    pub settings_source: String,
}

impl KernelFacts {
    /// Facts with a release only (unit tests, the model's profiles).
    pub fn release(release: KernelVersion) -> Self {
        KernelFacts {
            release,
            release_source: format!("release {release}"),
            history: None,
            settings: BTreeMap::new(),
            settings_source: String::new(),
        }
    }

    /// The decision for `rule`; an invalid setting is an error naming it.
    pub fn decide<T: Copy + fmt::Debug + PartialEq>(&self, rule: &Versioned<T>) -> Result<Decision<T>, String> {
        if let Some(value) = self.settings.get(rule.id) {
            let outcome = rule.parse_setting(value).ok_or_else(|| {
                format!(
                    "{}: {}={value} is not an outcome of that rule: use before, after, {:?} or {:?}",
                    self.settings_source, rule.id, rule.before, rule.after
                )
            })?;
            let why = format!("{} sets {}={value}", self.settings_source, rule.id);
            return Ok(Decision { outcome: Some(outcome), basis: Basis::Setting, why });
        }
        if let Some(history) = &self.history {
            if let Some(named) = rule.commits().find_map(|c| history.names(c)) {
                let why = format!("{} lists {named}", history.source);
                return Ok(Decision { outcome: Some(rule.after), basis: Basis::Carries, why });
            }
        }
        if rule.since == KernelVersion::UNRELEASED {
            // No release has it: absent unless the history names it.
            let what = match &self.history {
                Some(h) => format!("{} does not list it", h.source),
                None => "no kernel history was found to name it".to_string(),
            };
            let why = format!("no mainline release carries {} yet, and {what}", rule.change);
            return Ok(Decision { outcome: Some(rule.before), basis: Basis::Lacks, why });
        }
        if self.release >= rule.since {
            let why = format!(
                "{} is at or after {}.{}, the mainline release of {}",
                self.release_source, rule.since.major, rule.since.minor, rule.change
            );
            return Ok(Decision { outcome: Some(rule.after), basis: Basis::Release, why });
        }
        let commits: Vec<String> = rule.commits().map(ToString::to_string).collect();
        match &self.history {
            Some(history) if history.complete => {
                let why = format!(
                    "{} lists none of {} and {} predates {}.{}",
                    history.source,
                    commits.join(", "),
                    self.release_source,
                    rule.since.major,
                    rule.since.minor
                );
                Ok(Decision { outcome: Some(rule.before), basis: Basis::Lacks, why })
            }
            history => {
                let what = match history {
                    Some(h) => format!("{} (incomplete) names none of them", h.source),
                    None => "no kernel history was found".to_string(),
                };
                let why = format!(
                    "{} predates {}.{} and {what}, so nothing says whether it carries {}; either {:?} or {:?} is \
                     accepted if every check in the run observes the same",
                    self.release_source, rule.since.major, rule.since.minor, rule.change, rule.before, rule.after
                );
                Ok(Decision { outcome: None, basis: Basis::Undecided, why })
            }
        }
    }
}

/// What decided a rule's outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Basis {
    /// An explicit setting.
    Setting,
    /// The history names the change or a commit that carries it.
    Carries,
    /// The release is at or after the change's mainline release.
    Release,
    /// A complete history names none of them, and the release predates it.
    Lacks,
    /// Nothing: either outcome, the same in every check.
    Undecided,
}

/// A rule's outcome on one kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision<T> {
    /// The outcome; `None` when undecided.
    pub outcome: Option<T>,
    /// What decided it.
    pub basis: Basis,
    /// The reason in words.
    pub why: String,
}

/// A decided outcome as the model applies it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decided<T> {
    /// The outcome.
    Is(T),
    /// Nothing decided: `before` or `after`, the same in every check.
    Either(T, T),
}

impl<T: Copy + fmt::Debug + PartialEq> Decided<T> {
    /// The decision of `rule` on the kernel `facts` describes.
    pub fn of(rule: &Versioned<T>, facts: &KernelFacts) -> Result<Self, String> {
        Ok(match rule.decide(facts)?.outcome {
            Some(t) => Decided::Is(t),
            None => Decided::Either(rule.before, rule.after),
        })
    }

    /// Whether the outcome is decided to be `value`.
    pub fn is(&self, value: T) -> bool {
        *self == Decided::Is(value)
    }
}
