//! `--patch FILE`: build and test a kernel with patches applied, without
//! touching the source tree.
//!
//! The patches (plain diffs or `git format-patch` mails, in the order given)
//! are applied with `git apply` to a hard-link copy of the source. `git apply`
//! rather than `patch -p1`: it applies a patch whole or not at all, refuses
//! fuzz (GNU patch applies a stale hunk "with fuzz 2" somewhere nearby), and
//! names the failing file and the line of the failing hunk, which
//! [`PatchSet::apply`] turns into the hunk's number and header.
//!
//! The copy shares every unchanged file with the source (same inode, same
//! mtime); the files a patch changes get inodes of their own. The build
//! directory is keyed by the source id plus a hash of the patches' contents
//! and is seeded from a copy of the unpatched build directory, so make
//! rebuilds only what the patches touch.

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Instant, SystemTime};

use crate::error::{Error, Result};
use crate::history;
use crate::util::{self, io_err};

/// Bumped when the way patches are applied changes, so copies made by an
/// older xtask are not reused.
const APPLY_VERSION: &str = "git apply -p1, v1";

/// The patches of one run, read and parsed before any work starts.
#[derive(Debug, Default)]
pub struct PatchSet {
    patches: Vec<Patch>,
}

/// One patch file.
#[derive(Debug)]
struct Patch {
    /// As the user gave it, for messages.
    shown: PathBuf,
    /// Absolute, for `git apply` (which runs in the copy).
    path: PathBuf,
    text: String,
    files: Vec<FileDiff>,
}

/// One file's part of a patch, with `-p1` paths.
#[derive(Debug, Default, PartialEq, Eq)]
struct FileDiff {
    /// None for a created file.
    old: Option<String>,
    /// None for a deleted file.
    new: Option<String>,
    hunks: Vec<Hunk>,
    /// Started by `diff --git` and not yet given its `---`/`+++` lines.
    git_header_only: bool,
}

#[derive(Debug, PartialEq, Eq)]
struct Hunk {
    /// The line the hunk starts at in the old file: what `git apply` names.
    old_start: u64,
    /// The whole `@@ ... @@ context` line.
    header: String,
}

impl PatchSet {
    /// Read and parse `paths`: a missing, unreadable or diff-less file is an
    /// error naming it, before anything is extracted or built.
    pub fn load(paths: &[PathBuf]) -> Result<PatchSet> {
        let mut patches = Vec::new();
        for shown in paths {
            let bad = |reason: String| Error::BadPatch { path: shown.clone(), reason };
            let path = shown.canonicalize().map_err(|e| bad(e.to_string()))?;
            if !path.is_file() {
                return Err(bad("not a regular file".into()));
            }
            let bytes = fs::read(&path).map_err(|e| bad(e.to_string()))?;
            let text = String::from_utf8(bytes).map_err(|_| bad("not UTF-8 text".into()))?;
            let files = parse(&text);
            if !files.iter().any(|f| !f.hunks.is_empty() || f.old != f.new) {
                return Err(bad("contains no diff (expected a unified diff or a `git format-patch` mail)".into()));
            }
            patches.push(Patch { shown: shown.clone(), path, text, files });
        }
        Ok(PatchSet { patches })
    }

    pub fn is_empty(&self) -> bool {
        self.patches.is_empty()
    }

    /// The id of `base` with these patches: the same contents in the same
    /// order give the same id, whatever the files are called.
    pub fn id(&self, base: &str) -> String {
        if self.is_empty() {
            return base.to_string();
        }
        let mut chunks: Vec<&[u8]> = vec![APPLY_VERSION.as_bytes()];
        chunks.extend(self.patches.iter().map(|p| p.text.as_bytes()));
        format!("{base}-patch-{:016x}", util::fnv1a(&chunks))
    }

    /// Every path (relative to the tree) a patch of the set creates, changes,
    /// renames or deletes.
    fn touched(&self) -> BTreeSet<String> {
        self.patches.iter().flat_map(|p| &p.files).flat_map(|f| f.old.iter().chain(f.new.iter())).cloned().collect()
    }

    /// Apply the patches in order to `dir`; the first that does not apply is
    /// an error naming it and its failing files and hunks. `tree` names the
    /// source in that message.
    pub fn apply(&self, dir: &Path, tree: &str) -> Result<()> {
        for (n, patch) in self.patches.iter().enumerate() {
            let mut cmd = Command::new("git");
            cmd.arg("apply").arg(&patch.path).current_dir(dir);
            // Never consult a repository above the copy: its settings (say,
            // apply.whitespace=error) would change what applies.
            if let Some(parent) = dir.parent() {
                cmd.env("GIT_CEILING_DIRECTORIES", parent);
            }
            let out = cmd.output().map_err(|source| Error::Spawn { cmd: util::describe(&cmd), source })?;
            if !out.status.success() {
                let stderr = String::from_utf8_lossy(&out.stderr);
                return Err(Error::PatchDoesNotApply {
                    patch: patch.shown.clone(),
                    tree: tree.to_string(),
                    applied_before: n,
                    failures: patch.explain(&stderr),
                });
            }
        }
        Ok(())
    }
}

impl Patch {
    /// The subject of a `git format-patch` mail, without its `[PATCH n/m]`
    /// tag and unfolded; None for a bare diff.
    fn subject(&self) -> Option<String> {
        let header = self.text.split("\n\n").next()?;
        let mut lines = header.lines().skip_while(|l| !l.starts_with("Subject:"));
        let first = lines.next()?.strip_prefix("Subject:")?;
        let folded = lines.take_while(|l| l.starts_with([' ', '\t']));
        let mut subject = std::iter::once(first).chain(folded).map(str::trim).collect::<Vec<_>>().join(" ");
        while let Some(rest) = subject.strip_prefix('[').and_then(|s| s.split_once(']')).map(|(_, rest)| rest) {
            subject = rest.trim_start().to_string();
        }
        (!subject.is_empty()).then_some(subject)
    }

    /// `git apply`'s complaints, each failing hunk named by its number in
    /// its file and its header; other complaints (a missing file, a file
    /// that already exists) as git words them.
    fn explain(&self, stderr: &str) -> Vec<String> {
        let mut failures = Vec::new();
        for line in stderr.lines() {
            let Some(msg) = line.strip_prefix("error: ") else { continue };
            if let Some(at) = msg.strip_prefix("patch failed: ") {
                let described = at.rsplit_once(':').and_then(|(file, line)| {
                    let line: u64 = line.parse().ok()?;
                    let diff = self.files.iter().find(|f| f.old.as_deref() == Some(file))?;
                    let (i, hunk) = diff.hunks.iter().enumerate().find(|(_, h)| h.old_start == line)?;
                    Some(format!(
                        "{file}: hunk #{} of {} does not match the source at line {line}: {}",
                        i + 1,
                        diff.hunks.len(),
                        hunk.header
                    ))
                });
                failures.push(described.unwrap_or_else(|| format!("patch failed at {at}")));
            } else if msg.ends_with(": patch does not apply") {
                // Follows each "patch failed" line: already said.
            } else {
                failures.push(msg.to_string());
            }
        }
        if failures.is_empty() {
            failures.push(format!("git apply failed: {}", stderr.trim()));
        }
        failures
    }
}

/// The kernel under test as patched: its name lists the patches, and its
/// history (what the versioned rules are decided by) gains each patch's
/// subject, so that a rule whose fix a patch carries is decided by the fixed
/// behaviour. A bare diff has no subject and adds nothing to the history.
pub fn annotate(kernel: history::Kernel, set: &PatchSet) -> history::Kernel {
    if set.is_empty() {
        return kernel;
    }
    let shown: Vec<String> = set.patches.iter().map(|p| p.shown.display().to_string()).collect();
    let name = format!("{} with --patch {}", kernel.name, shown.join(", "));
    let lines: String = set
        .patches
        .iter()
        .filter_map(|p| Some(format!("{} (--patch {})\n", p.subject()?, p.shown.display())))
        .collect();
    let history = match kernel.history {
        // The decision table quotes the source: it names the mails too.
        Some(text) if !lines.is_empty() => {
            let text = match text.split_once('\n') {
                Some((first, rest)) if first.starts_with("source:") => {
                    format!("{first} and the subjects of the --patch mails\n{rest}")
                }
                _ => text,
            };
            Some(format!("{}{}{lines}", text, if text.ends_with('\n') { "" } else { "\n" }))
        }
        Some(text) => Some(text),
        None if lines.is_empty() => None,
        // Only the patches are known: a change they do not name may still be there.
        None => Some(kvm_harness::kernel_rules::format_history("the subjects of the --patch mails", false, &lines)),
    };
    history::Kernel { name, history }
}

/// Parse the file sections and hunks of a unified diff, plain or git-style,
/// bare or inside a mail. Hunk bodies are skipped by their line counts, so a
/// removed line that reads `-- foo` is not taken for a file header.
fn parse(text: &str) -> Vec<FileDiff> {
    let mut files: Vec<FileDiff> = Vec::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        if let Some(rest) = line.strip_prefix("diff --git ") {
            let (old, new) = match rest.split_once(" b/") {
                Some((a, b)) => (strip_component(a), Some(b.to_string())),
                None => (None, None),
            };
            files.push(FileDiff { old, new, hunks: Vec::new(), git_header_only: true });
        } else if let (Some(old), Some(next)) = (line.strip_prefix("--- "), lines.peek()) {
            let Some(new) = next.strip_prefix("+++ ") else { continue };
            let (old, new) = (diff_path(old), diff_path(new));
            lines.next();
            match files.last_mut() {
                Some(f) if f.git_header_only => {
                    (f.old, f.new, f.git_header_only) = (old, new, false);
                }
                _ => files.push(FileDiff { old, new, hunks: Vec::new(), git_header_only: false }),
            }
        } else if let Some(hunk) = line.strip_prefix("@@ -") {
            let Some((old_start, old_len, new_len)) = hunk_ranges(hunk) else { continue };
            let Some(file) = files.last_mut() else { continue };
            file.git_header_only = false;
            file.hunks.push(Hunk { old_start, header: line.to_string() });
            let (mut old_left, mut new_left) = (old_len, new_len);
            while old_left > 0 || new_left > 0 {
                let Some(body) = lines.peek() else { break };
                match body.as_bytes().first() {
                    // Some mailers strip the space of an empty context line.
                    Some(b' ') | None => {
                        (old_left, new_left) = (old_left.saturating_sub(1), new_left.saturating_sub(1))
                    }
                    Some(b'-') => old_left = old_left.saturating_sub(1),
                    Some(b'+') => new_left = new_left.saturating_sub(1),
                    Some(b'\\') => {}
                    Some(_) => break,
                }
                lines.next();
            }
        } else if let Some(path) = line.strip_prefix("rename from ").or_else(|| line.strip_prefix("copy from ")) {
            if let Some(f) = files.last_mut() {
                f.old = Some(path.to_string());
            }
        } else if let Some(path) = line.strip_prefix("rename to ").or_else(|| line.strip_prefix("copy to ")) {
            if let Some(f) = files.last_mut() {
                f.new = Some(path.to_string());
            }
        }
    }
    files
}

/// A `---`/`+++` path with `-p1` applied; None for `/dev/null`.
fn diff_path(field: &str) -> Option<String> {
    // diff -u appends a tab and a timestamp.
    let path = field.split('\t').next().unwrap_or(field).trim_end();
    if path == "/dev/null" {
        return None;
    }
    strip_component(path)
}

fn strip_component(path: &str) -> Option<String> {
    path.split_once('/').map(|(_, rest)| rest.to_string())
}

/// `A[,B] +C[,D] @@ ...` → (A, B, D); a missing length is 1.
fn hunk_ranges(s: &str) -> Option<(u64, u64, u64)> {
    let (ranges, _) = s.split_once(" @@")?;
    let (old, new) = ranges.split_once(" +")?;
    let range = |r: &str| -> Option<(u64, u64)> {
        match r.split_once(',') {
            Some((start, len)) => Some((start.parse().ok()?, len.parse().ok()?)),
            None => Some((r.parse().ok()?, 1)),
        }
    };
    let ((old_start, old_len), (_, new_len)) = (range(old)?, range(new)?);
    Some((old_start, old_len, new_len))
}

/// The patched source of `base_id` (directory `src`): a hard-link copy of
/// `src` with the patches applied, under `patched-src/` in the cache; returns
/// its id and directory. A released source (`released`) never changes, so
/// its patched copy is made once per patch set; a tree is copied again on
/// every call (it may have changed), keeping the mtime of each patched file
/// whose contents came out as in the previous copy, so that the build stays
/// incremental across `bisect-step`s.
pub fn patched_source(base_id: &str, src: &Path, set: &PatchSet, released: bool) -> Result<(String, PathBuf)> {
    let id = set.id(base_id);
    let root = util::cache_dir().join("patched-src");
    let copy = root.join(&id);
    if released && copy.join("Makefile").is_file() {
        return Ok((id, copy));
    }
    util::ensure_requirements(&[util::req("git", "git"), util::req("cp", "coreutils")])?;
    let start = Instant::now();
    let partial = root.join(format!(".partial-{id}"));
    if partial.exists() {
        fs::remove_dir_all(&partial).map_err(io_err(&partial))?;
    }
    util::create_dir_all(&root)?;
    eprintln!("xtask: linking {} into {} to apply {} patch(es)", src.display(), copy.display(), set.patches.len());
    util::run(Command::new("cp").arg("-al").arg(src).arg(&partial))?;
    let touched = set.touched();
    if let Err(e) = break_links(&partial, &touched).and_then(|()| set.apply(&partial, base_id)) {
        // Nothing half-patched stays behind.
        fs::remove_dir_all(&partial).map_err(io_err(&partial))?;
        return Err(e);
    }
    let previous = if copy.exists() { Some(copy.as_path()) } else { None };
    let kept = previous.map(|old| keep_unchanged_mtimes(old, &partial, &touched)).transpose()?.unwrap_or(0);
    if copy.exists() {
        fs::remove_dir_all(&copy).map_err(io_err(&copy))?;
    }
    fs::rename(&partial, &copy).map_err(io_err(&copy))?;
    eprintln!(
        "xtask: {} patch(es) applied to {id} in {:.1?} ({} file(s) touched{})",
        set.patches.len(),
        start.elapsed(),
        touched.len(),
        if kept > 0 { format!(", {kept} unchanged since the last copy") } else { String::new() }
    );
    Ok((id, copy))
}

/// Give each file the patches will touch an inode of its own before any
/// patch tool runs: the copy's other files are the source's own, and the
/// source must never change, whatever the tool does with a file in place.
fn break_links(copy: &Path, touched: &BTreeSet<String>) -> Result<()> {
    for rel in touched {
        let path = copy.join(rel);
        let Ok(meta) = fs::symlink_metadata(&path) else { continue };
        if !meta.is_file() || meta.nlink() < 2 {
            continue;
        }
        let tmp = path.with_file_name(format!(".xtask-unlink-{}", std::process::id()));
        fs::copy(&path, &tmp).map_err(io_err(&path))?;
        File::open(&tmp).and_then(|f| f.set_modified(meta.modified()?)).map_err(io_err(&tmp))?;
        fs::rename(&tmp, &path).map_err(io_err(&path))?;
    }
    Ok(())
}

/// For each touched file whose patched contents equal those in the previous
/// copy, take the previous copy's mtime, so make does not rebuild it.
/// Returns how many were kept.
fn keep_unchanged_mtimes(old: &Path, new: &Path, touched: &BTreeSet<String>) -> Result<usize> {
    let mut kept = 0;
    for rel in touched {
        let (old_path, new_path) = (old.join(rel), new.join(rel));
        let (Ok(old_meta), Ok(new_meta)) = (fs::metadata(&old_path), fs::metadata(&new_path)) else { continue };
        if !old_meta.is_file() || !new_meta.is_file() || old_meta.len() != new_meta.len() {
            continue;
        }
        if fs::read(&old_path).ok() != fs::read(&new_path).ok() {
            continue;
        }
        let mtime: SystemTime = old_meta.modified().map_err(io_err(&old_path))?;
        File::open(&new_path).and_then(|f| f.set_modified(mtime)).map_err(io_err(&new_path))?;
        kept += 1;
    }
    Ok(kept)
}

/// Seed the build directory `out` of a patched source `src` from `base`,
/// the build directory of the same source unpatched, when `out` has never
/// been configured and `base` has: `cp -a` keeps every object's mtime, so
/// make rebuilds only what the patches changed. Kbuild records the source
/// directory's absolute path in every command it saves (`.*.cmd`) and in its
/// dependency files (`.*.d`), and the tools build (objtool, which every
/// object depends on) records the build directory's; a command that differs
/// is rebuilt, so those paths are rewritten from the unpatched source (where
/// base's `source` link points) to `src`, and from `base` to `out`. Returns
/// whether it seeded.
pub fn seed_build_dir(base: &Path, out: &Path, src: &Path) -> Result<bool> {
    if out.join(".config").is_file() || !base.join(".config").is_file() {
        return Ok(false);
    }
    let Ok(old_src) = fs::read_link(base.join("source")) else { return Ok(false) };
    // Kbuild and the tools build name both directories by their real paths.
    let (Some(parent), Some(name)) = (out.parent(), out.file_name()) else { return Ok(false) };
    util::create_dir_all(parent)?;
    let new_out = parent.canonicalize().map_err(io_err(parent))?.join(name);
    let old_out = base.canonicalize().map_err(io_err(base))?;
    let new_src = src.canonicalize().map_err(io_err(src))?;
    let start = Instant::now();
    let partial = parent.join(format!(".partial-{}", name.to_string_lossy()));
    if partial.exists() {
        fs::remove_dir_all(&partial).map_err(io_err(&partial))?;
    }
    util::run(Command::new("cp").arg("-a").arg(base).arg(&partial))?;
    let bytes = |p: &Path| p.as_os_str().as_encoded_bytes().to_vec();
    let renames = [(bytes(&old_src), bytes(&new_src)), (bytes(&old_out), bytes(&new_out))];
    let mut rewritten = 0;
    let mut dirs = vec![partial.clone()];
    while let Some(dir) = dirs.pop() {
        for entry in fs::read_dir(&dir).map_err(io_err(&dir))? {
            let entry = entry.map_err(io_err(&dir))?;
            let kind = entry.file_type().map_err(io_err(&entry.path()))?;
            let path = entry.path();
            if kind.is_dir() {
                dirs.push(path);
                continue;
            }
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if !kind.is_file() || !(name.ends_with(".cmd") || name.ends_with(".d")) {
                continue;
            }
            let text = fs::read(&path).map_err(io_err(&path))?;
            let mut changed = None;
            for (old, new) in &renames {
                if let Some(replaced) = replace_path(changed.as_deref().unwrap_or(&text), old, new) {
                    changed = Some(replaced);
                }
            }
            if let Some(changed) = changed {
                let mtime = fs::metadata(&path).and_then(|m| m.modified()).map_err(io_err(&path))?;
                fs::write(&path, changed).map_err(io_err(&path))?;
                File::open(&path).and_then(|f| f.set_modified(mtime)).map_err(io_err(&path))?;
                rewritten += 1;
            }
        }
    }
    // Kbuild re-creates it for the new source; a stale one would mislead.
    let link = partial.join("source");
    fs::remove_file(&link).map_err(io_err(&link))?;
    // Left by a build that stopped before configuring: nothing to keep.
    if out.exists() {
        fs::remove_dir_all(out).map_err(io_err(out))?;
    }
    fs::rename(&partial, out).map_err(io_err(out))?;
    eprintln!(
        "xtask: seeded {} from the unpatched build {} in {:.1?} ({rewritten} kbuild files now name it and {})",
        out.display(),
        base.display(),
        start.elapsed(),
        new_src.display()
    );
    Ok(true)
}

/// `text` with every occurrence of the path `old` (followed by `/` or
/// anything that cannot continue a file name) replaced by `new`; None when
/// there is none.
fn replace_path(text: &[u8], old: &[u8], new: &[u8]) -> Option<Vec<u8>> {
    let continues = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'+' | b'~');
    let mut out = Vec::with_capacity(text.len());
    let mut i = 0;
    let mut found = false;
    while i < text.len() {
        if text[i..].starts_with(old) && !text.get(i + old.len()).is_some_and(|&b| continues(b)) {
            out.extend_from_slice(new);
            i += old.len();
            found = true;
        } else {
            out.push(text[i]);
            i += 1;
        }
    }
    found.then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scratch directory, removed when dropped.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(name: &str) -> Scratch {
            let dir = std::env::temp_dir().join(format!("xtask-patch-{name}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).unwrap();
            Scratch(dir)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    const MAIL: &str = "From 1234 Mon Sep 17 00:00:00 2001\n\
        From: A Developer <dev@example.org>\n\
        Subject: [PATCH] KVM: x86/mmu: change things\n\
        \n\
        --- a line in the message that is no header\n\
        ---\n \
        arch/x86/kvm/mmu/mmu.c | 2 +-\n\
        \n\
        diff --git a/arch/x86/kvm/mmu/mmu.c b/arch/x86/kvm/mmu/mmu.c\n\
        index 1111111..2222222 100644\n\
        --- a/arch/x86/kvm/mmu/mmu.c\n\
        +++ b/arch/x86/kvm/mmu/mmu.c\n\
        @@ -10,3 +10,3 @@ int noinline kvm_mmu_page_fault(struct kvm_vcpu *vcpu)\n \
        a\n\
        --- b\n\
        +++ c\n \
        d\n\
        @@ -40 +40 @@\n\
        -x\n\
        +y\n\
        diff --git a/old.c b/new.c\n\
        similarity index 100%\n\
        rename from old.c\n\
        rename to new.c\n\
        diff --git a/gone.c b/gone.c\n\
        deleted file mode 100644\n\
        --- a/gone.c\n\
        +++ /dev/null\n\
        @@ -1 +0,0 @@\n\
        -bye\n\
        -- \n\
        2.47.3\n";

    #[test]
    fn mails_and_git_diffs_parse_into_files_and_hunks() {
        let files = parse(MAIL);
        assert_eq!(files.len(), 3, "{files:#?}");
        assert_eq!(files[0].old.as_deref(), Some("arch/x86/kvm/mmu/mmu.c"));
        assert_eq!(files[0].new.as_deref(), Some("arch/x86/kvm/mmu/mmu.c"));
        // The hunk body's "--- b" / "+++ c" is content, not a new file.
        let starts: Vec<u64> = files[0].hunks.iter().map(|h| h.old_start).collect();
        assert_eq!(starts, [10, 40]);
        assert_eq!(
            files[0].hunks[0].header,
            "@@ -10,3 +10,3 @@ int noinline kvm_mmu_page_fault(struct kvm_vcpu *vcpu)"
        );
        assert_eq!((files[1].old.as_deref(), files[1].new.as_deref()), (Some("old.c"), Some("new.c")));
        assert_eq!((files[2].old.as_deref(), files[2].new.as_deref()), (Some("gone.c"), None));
    }

    #[test]
    fn the_subject_of_a_mail_is_unfolded_and_untagged() {
        let patch = |text: &str| Patch { shown: "p".into(), path: "p".into(), text: text.into(), files: Vec::new() };
        assert_eq!(patch(MAIL).subject().as_deref(), Some("KVM: x86/mmu: change things"));
        let folded = "From: x\nSubject: [PATCH v2 2/2] [RFC] KVM: x86/mmu: Don't treat private faults on\n stale MMIO SPTEs as shared\nDate: now\n\nbody\nSubject: not this\n";
        assert_eq!(
            patch(folded).subject().as_deref(),
            Some("KVM: x86/mmu: Don't treat private faults on stale MMIO SPTEs as shared")
        );
        assert_eq!(patch("--- a/x\n+++ b/x\n@@ -1 +1 @@\n-a\n+b\n").subject(), None);
    }

    #[test]
    fn the_history_of_a_patched_kernel_names_its_patches() {
        let dir = Scratch::new("annotate");
        let (mail, bare) = (dir.0.join("0001-fix.patch"), dir.0.join("bare.diff"));
        fs::write(&mail, MAIL).unwrap();
        fs::write(&bare, "--- a/x\n+++ b/x\n@@ -1 +1 @@\n-a\n+b\n").unwrap();
        let set = PatchSet::load(&[mail.clone(), bare.clone()]).unwrap();
        let debian =
            history::Kernel { name: "Debian 7.3.4".into(), history: Some("source: s\ncomplete: yes\n---\nx".into()) };
        let k = annotate(debian, &set);
        assert_eq!(k.name, format!("Debian 7.3.4 with --patch {}, {}", mail.display(), bare.display()));
        let history = k.history.unwrap();
        assert_eq!(
            history,
            format!(
                "source: s and the subjects of the --patch mails\ncomplete: yes\n---\nx\n\
                 KVM: x86/mmu: change things (--patch {})\n",
                mail.display()
            )
        );
        let parsed = kvm_harness::kernel_rules::parse_history(history.clone()).unwrap();
        assert!(parsed.complete());
        // Without a history of its own, the patches' subjects are one, incomplete.
        let tree = annotate(history::Kernel { name: "tree".into(), history: None }, &set);
        assert!(!kvm_harness::kernel_rules::parse_history(tree.history.unwrap()).unwrap().complete());
        let bare_only =
            annotate(history::Kernel { name: "tree".into(), history: None }, &PatchSet::load(&[bare]).unwrap());
        assert_eq!(bare_only.history, None);
    }

    #[test]
    fn plain_diffs_with_timestamps_parse() {
        let diff = "--- a/f.c\t2024-01-01 00:00:00\n+++ b/f.c\t2024-01-02 00:00:00\n@@ -1,2 +1,2 @@\n-x\n+y\n z\n";
        let files = parse(diff);
        assert_eq!(files.len(), 1);
        assert_eq!(files[0].old.as_deref(), Some("f.c"));
        assert_eq!(files[0].hunks.len(), 1);
    }

    #[test]
    fn a_patch_file_must_exist_and_hold_a_diff() {
        let dir = Scratch::new("load");
        let missing = dir.0.join("missing.patch");
        let e = PatchSet::load(std::slice::from_ref(&missing)).unwrap_err().to_string();
        assert!(e.contains("missing.patch") && e.contains("No such file"), "{e}");
        let prose = dir.0.join("notes.patch");
        fs::write(&prose, "just some words\n").unwrap();
        let e = PatchSet::load(std::slice::from_ref(&prose)).unwrap_err().to_string();
        assert!(e.contains("notes.patch") && e.contains("contains no diff"), "{e}");
    }

    #[test]
    fn the_id_follows_the_contents_and_their_order() {
        let dir = Scratch::new("id");
        let (a, b) = (dir.0.join("a.patch"), dir.0.join("b.patch"));
        fs::write(&a, "--- a/x\n+++ b/x\n@@ -1 +1 @@\n-1\n+2\n").unwrap();
        fs::write(&b, "--- a/y\n+++ b/y\n@@ -1 +1 @@\n-1\n+2\n").unwrap();
        let ab = PatchSet::load(&[a.clone(), b.clone()]).unwrap().id("src");
        let ba = PatchSet::load(&[b.clone(), a.clone()]).unwrap().id("src");
        assert!(ab.starts_with("src-patch-") && ab != ba, "{ab} {ba}");
        let renamed = dir.0.join("renamed.patch");
        fs::copy(&a, &renamed).unwrap();
        assert_eq!(PatchSet::load(&[renamed, b]).unwrap().id("src"), ab);
        assert_eq!(PatchSet::default().id("src"), "src");
    }

    fn tree(dir: &Path) -> PathBuf {
        let src = dir.join("src");
        fs::create_dir_all(src.join("sub")).unwrap();
        fs::write(src.join("sub/f.c"), "one\ntwo\nthree\nfour\nfive\nsix\nseven\neight\nnine\n").unwrap();
        fs::write(src.join("g.c"), "g\n").unwrap();
        src
    }

    #[test]
    fn patches_apply_in_order_to_a_copy_never_to_the_source() {
        let dir = Scratch::new("apply");
        let src = tree(&dir.0);
        let first = dir.0.join("0001.patch");
        fs::write(&first, "--- a/sub/f.c\n+++ b/sub/f.c\n@@ -2,3 +2,4 @@\n two\n three\n+three and a half\n four\n")
            .unwrap();
        // Applies only on top of the first.
        let second = dir.0.join("0002.patch");
        fs::write(&second, "--- a/sub/f.c\n+++ b/sub/f.c\n@@ -3,3 +3,3 @@\n three\n-three and a half\n+3.5\n four\n")
            .unwrap();
        let set = PatchSet::load(&[first, second]).unwrap();
        // Inside another repository, git apply still patches the copy alone.
        util::run(Command::new("git").args(["init", "-q"]).arg(&dir.0)).unwrap();
        let copy = dir.0.join("copy");
        util::run(Command::new("cp").arg("-al").arg(&src).arg(&copy)).unwrap();
        break_links(&copy, &set.touched()).unwrap();
        set.apply(&copy, "test-tree").unwrap();
        assert_eq!(fs::read_to_string(copy.join("sub/f.c")).unwrap().lines().nth(3), Some("3.5"));
        assert_eq!(fs::read_to_string(src.join("sub/f.c")).unwrap().lines().nth(3), Some("four"));
        // The untouched file is still the source's own.
        let ino = |p: &Path| fs::metadata(p).unwrap().ino();
        assert_eq!(ino(&copy.join("g.c")), ino(&src.join("g.c")));
        assert_ne!(ino(&copy.join("sub/f.c")), ino(&src.join("sub/f.c")));
    }

    #[test]
    fn a_patch_that_does_not_apply_names_itself_its_file_and_hunk() {
        let dir = Scratch::new("fail");
        let src = tree(&dir.0);
        let good = dir.0.join("0001-good.patch");
        fs::write(&good, "--- a/g.c\n+++ b/g.c\n@@ -1 +1 @@\n-g\n+G\n").unwrap();
        let bad = dir.0.join("0002-stale.patch");
        fs::write(
            &bad,
            "Subject: [PATCH] stale\n\n---\ndiff --git a/sub/f.c b/sub/f.c\n--- a/sub/f.c\n+++ b/sub/f.c\n\
             @@ -1,3 +1,3 @@ int main(void)\n one\n-two\n+2\n three\n\
             @@ -6,3 +6,3 @@ static int helper(void)\n six\n-SEVEN\n+7\n eight\n-- \n2.47.3\n",
        )
        .unwrap();
        let set = PatchSet::load(&[good, bad.clone()]).unwrap();
        let e = set.apply(&src, "linux-test").unwrap_err();
        assert!(!e.is_kernel_fault(), "a patch that does not apply aborts a bisection");
        let msg = e.to_string();
        assert!(msg.contains(&bad.display().to_string()), "{msg}");
        assert!(msg.contains("linux-test") && msg.contains("after 1 patch that applied"), "{msg}");
        assert!(
            msg.contains(
                "sub/f.c: hunk #2 of 2 does not match the source at line 6: @@ -6,3 +6,3 @@ static int helper(void)"
            ),
            "{msg}"
        );
        // git apply is all or nothing: the first hunk was not applied either.
        assert_eq!(fs::read_to_string(src.join("sub/f.c")).unwrap().lines().nth(1), Some("two"));
    }

    #[test]
    fn a_patch_for_a_missing_file_says_so() {
        let dir = Scratch::new("missing");
        let src = tree(&dir.0);
        let patch = dir.0.join("other.patch");
        fs::write(&patch, "--- a/nowhere.c\n+++ b/nowhere.c\n@@ -1 +1 @@\n-a\n+b\n").unwrap();
        let msg = PatchSet::load(&[patch]).unwrap().apply(&src, "t").unwrap_err().to_string();
        assert!(msg.contains("nowhere.c: No such file or directory"), "{msg}");
    }

    #[test]
    fn source_paths_are_rewritten_only_where_they_end() {
        let text = b"cmd := gcc -I/s/linux/include -c /s/linux/a.c /s/linux-2/b.c /s/linux\n";
        let out = replace_path(text, b"/s/linux", b"/p/linux-patch-1").unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "cmd := gcc -I/p/linux-patch-1/include -c /p/linux-patch-1/a.c /s/linux-2/b.c /p/linux-patch-1\n"
        );
        assert_eq!(replace_path(b"nothing here", b"/s/linux", b"/p"), None);
    }

    #[test]
    fn a_seeded_build_directory_names_the_patched_source() {
        let dir = Scratch::new("seed");
        let (old_src, new_src) = (dir.0.join("linux"), dir.0.join("linux-patch-1"));
        fs::create_dir_all(&old_src).unwrap();
        fs::create_dir_all(&new_src).unwrap();
        let base = dir.0.join("build-base");
        fs::create_dir_all(base.join("arch/x86")).unwrap();
        fs::create_dir_all(base.join("tools/objtool")).unwrap();
        fs::write(base.join(".config"), "CONFIG_KVM=y\n").unwrap();
        std::os::unix::fs::symlink(&old_src, base.join("source")).unwrap();
        let (s, b) = (old_src.display(), base.display());
        fs::write(base.join("arch/x86/.mmu.o.cmd"), format!("savedcmd_mmu.o := gcc -c {s}/arch/x86/mmu.c\n")).unwrap();
        fs::write(base.join("tools/objtool/.check.o.d"), format!("{b}/tools/objtool/check.o: {s}/tools/check.c\n"))
            .unwrap();
        fs::write(base.join("arch/x86/mmu.o"), format!("{s} binary")).unwrap();
        let out = dir.0.join("build-patched");
        // A build directory that never got configured is replaced.
        fs::create_dir_all(out.join("scripts")).unwrap();
        assert!(seed_build_dir(&base, &out, &new_src).unwrap());
        let (s2, o2) = (new_src.display(), out.display());
        let cmd = fs::read_to_string(out.join("arch/x86/.mmu.o.cmd")).unwrap();
        assert_eq!(cmd, format!("savedcmd_mmu.o := gcc -c {s2}/arch/x86/mmu.c\n"));
        let deps = fs::read_to_string(out.join("tools/objtool/.check.o.d")).unwrap();
        assert_eq!(deps, format!("{o2}/tools/objtool/check.o: {s2}/tools/check.c\n"));
        // Objects are copied as they are.
        assert_eq!(fs::read_to_string(out.join("arch/x86/mmu.o")).unwrap(), format!("{s} binary"));
        assert!(fs::symlink_metadata(out.join("source")).is_err());
        // Once configured, a build directory is never seeded again.
        assert!(!seed_build_dir(&base, &out, &new_src).unwrap());
    }
}
