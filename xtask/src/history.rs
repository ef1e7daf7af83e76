//! What the kernel under test is and which upstream changes it carries:
//! the evidence the versioned rules are decided by in the guest
//! (`KVM_SELFTESTS_KERNEL_HISTORY`). A Debian source brings its changelog,
//! which lists every stable update's subjects; a git tree its log, searched
//! for the commits the rules name.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use kvm_harness::kernel_rules::{self, Commit};

use crate::debian;
use crate::error::{Error, Result};
use crate::kernel::Source;
use crate::util::{self, io_err};

/// The kernel under test, named exactly, and its history file's text.
#[derive(Debug)]
pub struct Kernel {
    /// `Debian linux-source-6.12 6.12.118-1~deb12u1`, or a tree and its
    /// `git describe`.
    pub name: String,
    /// The history in the `KVM_SELFTESTS_KERNEL_HISTORY` format, if any.
    pub history: Option<String>,
}

/// The kernel `source` builds.
pub fn of(source: &Source) -> Result<Kernel> {
    match source {
        Source::Debian(release) => {
            let tarball = debian::tarball(release)?;
            let name = format!("Debian {}", tarball.package_version);
            let text = gunzip(&tarball.changelog)?;
            let source = format!("the Debian changelog of {}", tarball.package_version);
            // A Debian changelog names every stable update's subjects.
            Ok(Kernel { name, history: Some(kernel_rules::format_history(&source, true, &text)) })
        }
        Source::Tree(tree) => git(tree),
    }
}

/// A prebuilt image: nothing is known of its history.
pub fn prebuilt(image: &Path) -> Kernel {
    Kernel { name: format!("prebuilt {}", image.display()), history: None }
}

fn gunzip(path: &Path) -> Result<String> {
    if !path.is_file() {
        return Err(Error::Debian(format!("the package's changelog {} is missing", path.display())));
    }
    util::output(Command::new("gzip").arg("-dc").arg(path))
}

/// A git tree's log lines that name any commit the rules look for (by
/// subject, or a backport's `commit <sha> upstream`), plus the SHAs that
/// are ancestors of HEAD; complete unless the clone is shallow.
fn git(tree: &Path) -> Result<Kernel> {
    let git = |args: &[&str]| Command::new("git").arg("-C").arg(tree).args(args).output();
    let describe = match git(&["describe", "--always", "--dirty"]) {
        Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout).trim().to_string(),
        _ => return Ok(Kernel { name: format!("tree {} (no git history)", tree.display()), history: None }),
    };
    let name = format!("tree {} at {describe}", tree.display());
    let shallow = git(&["rev-parse", "--is-shallow-repository"])
        .map_err(|source| Error::Spawn { cmd: "git rev-parse".into(), source })?;
    let complete = String::from_utf8_lossy(&shallow.stdout).trim() == "false";
    let commits = kernel_rules::evidence();
    let mut log = Command::new("git");
    log.arg("-C").arg(tree).args(["log", "--fixed-strings", "--format=%H %s%n%b", "HEAD"]);
    for c in &commits {
        log.arg(format!("--grep={}", c.subject));
        if !c.sha.is_empty() {
            log.arg(format!("--grep={}", c.sha));
        }
    }
    let mut text = util::output(&mut log)?;
    for c in commits.iter().filter(|c| !c.sha.is_empty()) {
        if git(&["merge-base", "--is-ancestor", c.sha, "HEAD"]).is_ok_and(|o| o.status.success()) {
            text.push_str(&ancestor_line(c));
        }
    }
    let source = format!("the git history of {name}");
    Ok(Kernel { name, history: Some(kernel_rules::format_history(&source, complete, &text)) })
}

fn ancestor_line(c: &Commit) -> String {
    format!("{} {} (an ancestor of HEAD)\n", c.sha, c.subject)
}

/// Writes the history into the run directory; returns its path.
pub fn write(kernel: &Kernel, run_dir: &Path) -> Result<Option<PathBuf>> {
    let Some(text) = &kernel.history else {
        return Ok(None);
    };
    let path = run_dir.join("kernel-history.txt");
    fs::write(&path, text).map_err(io_err(&path))?;
    Ok(Some(path))
}
