//! `cargo xtask findings-check`: the patches under `findings/` still apply to
//! the current Debian sources, and the kernel's `checkpatch.pl` still finds
//! them clean; no kernel is built.
//!
//! Each finding directory lists its patch series per Debian release in a
//! `series` file: `RELEASE PATCH...`, paths relative to the directory,
//! applied in order; `#` starts a comment.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use crate::debian::Release;
use crate::error::{Error, Result};
use crate::kernel;
use crate::patch::{self, PatchSet};
use crate::util::{self, io_err, req};

/// checkpatch.pl warns "Unknown commit id" for every `Fixes:` tag when it
/// runs outside a git clone that has the commit, as in a Debian source; the
/// tags' commits are checked against the public history in each finding's
/// README instead.
const CHECKPATCH_IGNORE: &str = "UNKNOWN_COMMIT_ID";

/// One line of a `series` file.
#[derive(Debug, PartialEq, Eq)]
struct Series {
    release: Release,
    patches: Vec<PathBuf>,
}

fn parse_series(dir: &Path, text: &str) -> std::result::Result<Vec<Series>, String> {
    let mut all = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let mut words = line.split_whitespace();
        let release = words.next().unwrap_or_default();
        let release: Release = release.parse().map_err(|e| format!("line {}: {e}", n + 1))?;
        let patches: Vec<PathBuf> = words.map(|w| dir.join(w)).collect();
        if patches.is_empty() {
            return Err(format!("line {}: no patches for {release}", n + 1));
        }
        all.push(Series { release, patches });
    }
    Ok(all)
}

/// Check every finding under `root`; exit 0 when all apply and are clean.
pub fn check(root: &Path) -> Result<ExitCode> {
    util::ensure_requirements(&[req("git", "git"), req("perl", "perl")])?;
    let mut dirs: Vec<PathBuf> = fs::read_dir(root)
        .map_err(io_err(root))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("series").is_file())
        .collect();
    dirs.sort();
    if dirs.is_empty() {
        return Err(Error::Findings(format!("no finding under {} has a `series` file", root.display())));
    }
    let mut problems = Vec::new();
    let mut checked = 0;
    for dir in &dirs {
        let file = dir.join("series");
        let text = fs::read_to_string(&file).map_err(io_err(&file))?;
        let series = parse_series(dir, &text).map_err(|e| Error::Findings(format!("{}: {e}", file.display())))?;
        for Series { release, patches } in series {
            let shown: Vec<PathBuf> = patches.iter().map(|p| p.strip_prefix(root).unwrap_or(p).to_path_buf()).collect();
            let set = PatchSet::load(&patches)?;
            let (id, src) = kernel::debian_source(&release)?;
            eprintln!("xtask: findings: {}: {} patch(es) on {id}", dir.display(), patches.len());
            match patch::patched_source(&id, &src, &set, true) {
                Ok(_) => {}
                Err(e @ Error::PatchDoesNotApply { .. }) => problems.push(e.to_string()),
                Err(e) => return Err(e),
            }
            for (patch, shown) in patches.iter().zip(&shown) {
                let mut cmd = Command::new("perl");
                cmd.arg(src.join("scripts/checkpatch.pl"))
                    .args(["--strict", "--no-summary", "--ignore", CHECKPATCH_IGNORE])
                    .arg(patch)
                    // Its spelling and constant lists are found from the tree's root.
                    .current_dir(&src);
                let out = cmd.output().map_err(|source| Error::Spawn { cmd: util::describe(&cmd), source })?;
                let report = String::from_utf8_lossy(&out.stdout);
                if out.status.success() {
                    eprintln!("xtask: findings:   {}: checkpatch.pl --strict ({id}): clean", shown.display());
                } else {
                    problems.push(format!(
                        "{}: checkpatch.pl --strict ({id}) is not clean:\n{}",
                        shown.display(),
                        report.trim_end()
                    ));
                }
            }
            checked += 1;
        }
    }
    for p in &problems {
        eprintln!("xtask: findings: {p}");
    }
    eprintln!(
        "xtask: findings: {checked} series in {} finding(s): {}",
        dirs.len(),
        if problems.is_empty() {
            "all apply and are checkpatch-clean".to_string()
        } else {
            format!("{} problem(s)", problems.len())
        }
    );
    Ok(if problems.is_empty() { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_lines_name_a_release_and_its_patches_in_order() {
        let dir = Path::new("/f/x");
        let text =
            "# release patches\n7.3 0001-a.patch 0002-b.patch  # newest\n\n6.12 6.12/0001-a.patch 0002-b.patch\n";
        let series = parse_series(dir, text).unwrap();
        assert_eq!(series.len(), 2);
        assert_eq!(series[0].release, "7.3".parse().unwrap());
        assert_eq!(series[0].patches, [dir.join("0001-a.patch"), dir.join("0002-b.patch")]);
        assert_eq!(series[1].patches[0], dir.join("6.12/0001-a.patch"));
        assert!(parse_series(dir, "7.3\n").unwrap_err().contains("line 1: no patches"));
        assert!(parse_series(dir, "\nseven 0001.patch\n").unwrap_err().starts_with("line 2:"));
    }
}
