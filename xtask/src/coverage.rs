//! `cargo xtask vm --coverage`: gcov line and branch coverage of the KVM code
//! the suite exercises, for the Rust suite and (with `--upstream`) for the
//! tree's C selftests separately, from one boot.
//!
//! Only KVM is profiled: the kernel is built from a hard-link copy of the
//! tree whose `arch/x86/kvm/Makefile` adds `GCOV_PROFILE := y` (that Makefile
//! also compiles `virt/kvm/`), so the rest of the kernel stays unprofiled
//! and the tree itself is never modified. The guest copies the gcov data
//! out of debugfs after each suite; lcov turns it into tables and HTML.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::{Error, Result};
use crate::util::{self, io_err, req, Requirement};

/// Appended to the recipe: the gcov data in debugfs. A required section of
/// its own, so a tree where they do not stick fails naming them.
pub const FRAGMENT: &str = "\n# xtask: required\n# --coverage: gcov data of the KVM objects in debugfs.\n\
                            CONFIG_DEBUG_FS=y\nCONFIG_GCOV_KERNEL=y\n";

/// Host tools the report needs.
pub const TOOLS: &[Requirement] = &[req("lcov", "lcov"), req("genhtml", "lcov"), req("gcov", "gcc")];

const MAKEFILE: &str = "arch/x86/kvm/Makefile";
const PROFILE_LINE: &str =
    "\n# Added by `cargo xtask vm --coverage` (a hard-link copy of the tree).\nGCOV_PROFILE := y\n";

/// The files the report covers, and in each the functions that implement
/// the rules this suite checks (all of guest_memfd.c). Names from 6.12 and
/// from 7.3 are both listed; a name a tree lacks is simply absent.
pub const RULE_FUNCTIONS: &[(&str, Option<&[&str]>)] = &[
    ("virt/kvm/guest_memfd.c", None),
    (
        "virt/kvm/kvm_main.c",
        Some(&[
            "check_memory_region_flags",
            "kvm_check_memslot_overlap",
            "__kvm_set_memory_region",
            "kvm_set_memory_region",
            "kvm_vm_ioctl_set_memory_region",
            "kvm_set_memslot",
            "kvm_prepare_memory_region",
            "kvm_commit_memory_region",
            "kvm_create_memslot",
            "kvm_delete_memslot",
            "kvm_move_memslot",
            "kvm_update_flags_memslot",
            "kvm_supported_mem_attributes",
            "kvm_range_has_memory_attributes",
            "kvm_pre_set_memory_attributes",
            "kvm_vm_set_mem_attributes",
            "kvm_vm_ioctl_set_mem_attributes",
            "kvm_vcpu_pre_fault_memory",
            "kvm_vm_ioctl_check_extension_generic",
            "kvm_dev_ioctl_create_vm",
        ]),
    ),
    (
        "arch/x86/kvm/mmu/mmu.c",
        Some(&[
            "kvm_faultin_pfn_private",
            "kvm_mmu_faultin_pfn_gmem",
            "__kvm_faultin_pfn",
            "__kvm_mmu_faultin_pfn",
            "kvm_faultin_pfn",
            "kvm_mmu_faultin_pfn",
            "kvm_max_private_mapping_level",
            "kvm_gmem_max_mapping_level",
            "kvm_arch_vcpu_pre_fault_memory",
            "kvm_tdp_map_page",
            "kvm_mmu_page_fault",
            "kvm_arch_pre_set_memory_attributes",
            "kvm_arch_post_set_memory_attributes",
            "kvm_mmu_init_memslot_memory_attributes",
            "hugepage_has_attrs",
        ]),
    ),
    (
        "arch/x86/kvm/x86.c",
        Some(&[
            "kvm_is_vm_type_supported",
            "kvm_arch_init_vm",
            "complete_hypercall_exit",
            "__kvm_emulate_hypercall",
            "____kvm_emulate_hypercall",
            "kvm_emulate_hypercall",
            "kvm_arch_prepare_memory_region",
        ]),
    ),
];

/// Functions of the listed files that no test of a default or software-
/// protected VM can reach, with the reason. The report leaves them out of
/// the "reachable" figure and lists them instead of their lines.
pub const UNREACHABLE: &[(&str, &str, &str)] = &[
    ("virt/kvm/guest_memfd.c", "kvm_gmem_populate", "only SEV-SNP and TDX launch ioctls call it"),
    (
        "virt/kvm/guest_memfd.c",
        "kvm_gmem_error_folio",
        "memory failure of a guest_memfd page; CONFIG_MEMORY_FAILURE is off in the guest kernel",
    ),
    ("virt/kvm/guest_memfd.c", "kvm_gmem_migrate_folio", "guest_memfd folios are unmovable: migration never asks"),
    ("virt/kvm/guest_memfd.c", "kvm_gmem_init", "runs at boot, before the counters are reset"),
    ("virt/kvm/guest_memfd.c", "kvm_gmem_init_mount", "runs at boot (7.x), before the counters are reset"),
    ("virt/kvm/guest_memfd.c", "kvm_gmem_init_fs_context", "runs at boot (7.x), before the counters are reset"),
    ("virt/kvm/guest_memfd.c", "kvm_gmem_exit", "module unload (7.x); KVM is built in"),
    ("virt/kvm/guest_memfd.c", "kvm_arch_supports_gmem_init_shared", "the __weak default (7.x); x86 links its own"),
];

fn unreachable_reason(file: &str, function: &str) -> Option<&'static str> {
    UNREACHABLE.iter().find(|(f, name, _)| *f == file && *name == function).map(|(_, _, why)| *why)
}

/// A hard-link copy of `src` whose KVM objects are built with gcov.
/// Re-linked on every call for a tree (it may have changed since), once
/// for a released source.
pub fn instrumented_source(id: &str, src: &Path, released: bool) -> Result<PathBuf> {
    let copy = util::cache_dir().join("coverage-src").join(id);
    if !released || !copy.join("Makefile").is_file() {
        if copy.exists() {
            fs::remove_dir_all(&copy).map_err(io_err(&copy))?;
        }
        util::create_dir_all(copy.parent().expect("has a parent"))?;
        eprintln!("xtask: linking {} into {} for a gcov build", src.display(), copy.display());
        // Hard links keep every file's mtime, so the O= build stays incremental.
        util::run(Command::new("cp").arg("-al").arg(src).arg(&copy))?;
    }
    let original = src.join(MAKEFILE);
    let text = fs::read_to_string(&original).map_err(io_err(&original))?;
    let makefile = copy.join(MAKEFILE);
    // Replace the link, never write through it: that would edit the tree.
    fs::remove_file(&makefile).map_err(io_err(&makefile))?;
    fs::write(&makefile, text + PROFILE_LINE).map_err(io_err(&makefile))?;
    Ok(copy)
}

/// One profiled suite: the name used for its report directory and the
/// directory (under the results share) the guest copied its gcov data into.
#[derive(Debug, Clone, Copy)]
pub struct Set {
    pub name: &'static str,
    pub title: &'static str,
}

pub const RUST: Set = Set { name: "rust", title: "Rust suite" };
pub const UPSTREAM: Set = Set { name: "upstream", title: "the tree's C selftests" };

/// The hook run.sh calls around each suite in the guest (`--hook`):
/// `begin SUITE` resets the counters (coverage counts the suites only: not
/// boot, not the probe), `end SUITE` saves them from debugfs into the
/// results share under `gcov/SUITE/`, at their absolute build paths.
pub fn hook_script() -> &'static str {
    r#"#!/bin/sh
G=/sys/kernel/debug/gcov
R=/run/results
if [ ! -d $G ]; then
    echo "@@KVM-SELFTESTS@@ setup-failed no $G (CONFIG_GCOV_KERNEL and CONFIG_DEBUG_FS)"
    exit 1
fi
case $1 in
begin) echo 1 > $G/reset ;;
end)
    (cd $G && find . -name '*.gcda') | while read -r f; do
        mkdir -p "$R/gcov/$2/${f%/*}" && cat "$G/$f" > "$R/gcov/$2/$f"
    done ;;
esac
"#
}

/// Turn the guest's gcov data into lcov tracefiles, HTML and the printed
/// tables under `target/kvm-selftests/coverage/KERNEL/`; returns the
/// summary text (also written next to the HTML).
pub fn report(results: &Path, kernel: &str, sets: &[Set]) -> Result<String> {
    let out_root = util::output_dir().join("coverage").join(util::sanitize(kernel));
    let mut summary = String::new();
    let mut per_set = Vec::new();
    for set in sets {
        let data = results.join("gcov").join(set.name);
        if !data.is_dir() {
            return Err(Error::Coverage(format!("the guest saved no gcov data for the {}", set.title)));
        }
        let out = out_root.join(set.name);
        let info = capture(&data, &out, set)?;
        let files = parse_tracefile(&fs::read_to_string(&info).map_err(io_err(&info))?);
        let text = tables(set, &files, &out);
        fs::write(out.join("summary.txt"), &text).map_err(io_err(&out))?;
        summary.push_str(&text);
        per_set.push((set, files));
    }
    if let [(a, fa), (b, fb)] = per_set.as_slice() {
        summary.push_str(&comparison(a, fa, b, fb));
    }
    Ok(summary)
}

/// gcov needs each `.gcda` next to its `.gcno`, which stayed in the build
/// directory: the guest saved the data under its absolute build path.
fn link_notes(data: &Path) -> Result<usize> {
    let mut found = 0;
    let mut dirs = vec![data.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in fs::read_dir(&dir).map_err(io_err(&dir))? {
            let path = entry.map_err(io_err(&dir))?.path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "gcda") {
                let rel = path.strip_prefix(data).expect("walked from data");
                let note = Path::new("/").join(rel).with_extension("gcno");
                if !note.is_file() {
                    return Err(Error::Coverage(format!("no {} for the guest's {}", note.display(), rel.display())));
                }
                let link = path.with_extension("gcno");
                let _ = fs::remove_file(&link);
                std::os::unix::fs::symlink(&note, &link).map_err(io_err(&link))?;
                found += 1;
            }
        }
    }
    Ok(found)
}

fn capture(data: &Path, out: &Path, set: &Set) -> Result<PathBuf> {
    if link_notes(data)? == 0 {
        return Err(Error::Coverage(format!("the guest's gcov data for the {} holds no .gcda file", set.title)));
    }
    if out.exists() {
        fs::remove_dir_all(out).map_err(io_err(out))?;
    }
    util::create_dir_all(out)?;
    let raw = out.join("all.info");
    let info = out.join("kvm.info");
    let branches = ["--rc", "lcov_branch_coverage=1"];
    util::output(
        Command::new("lcov")
            .args(["--quiet", "--capture"])
            .args(branches)
            .arg("--directory")
            .arg(data)
            .arg("-o")
            .arg(&raw),
    )?;
    util::output(
        Command::new("lcov")
            .args(["--quiet", "--extract"])
            .arg(&raw)
            .args(["*/virt/kvm/*", "*/arch/x86/kvm/*"])
            .args(branches)
            .arg("-o")
            .arg(&info),
    )?;
    util::output(
        Command::new("genhtml")
            .args(["--quiet", "--branch-coverage", "--title", set.title, "--output-directory"])
            .arg(out.join("html"))
            .arg(&info),
    )?;
    Ok(info)
}

/// The coverage of one source file, from an lcov tracefile.
#[derive(Debug, Default, Clone)]
pub struct FileCoverage {
    pub path: String,
    /// Line number to execution count.
    pub lines: BTreeMap<u32, u64>,
    /// Line number to the taken count of each branch (`None`: never reached).
    pub branches: BTreeMap<u32, Vec<Option<u64>>>,
    /// Start line, name and call count of each function.
    pub functions: Vec<(u32, String, u64)>,
}

pub fn parse_tracefile(text: &str) -> Vec<FileCoverage> {
    let mut files = Vec::new();
    let mut cur = FileCoverage::default();
    let mut calls: BTreeMap<String, u64> = BTreeMap::new();
    for line in text.lines() {
        let (tag, rest) = line.split_once(':').unwrap_or((line, ""));
        let mut f = rest.split(',');
        let mut num = || f.next().and_then(|v| v.parse::<u64>().ok());
        match tag {
            "SF" => cur.path = rest.to_string(),
            "FN" => {
                if let Some((l, name)) = rest.split_once(',') {
                    cur.functions.push((l.parse().unwrap_or(0), name.to_string(), 0));
                }
            }
            "FNDA" => {
                if let Some((n, name)) = rest.split_once(',') {
                    calls.insert(name.to_string(), n.parse().unwrap_or(0));
                }
            }
            "DA" => {
                if let (Some(l), Some(n)) = (num(), num()) {
                    cur.lines.insert(l as u32, n);
                }
            }
            "BRDA" => {
                let parts: Vec<&str> = rest.split(',').collect();
                if let (Some(l), Some(taken)) = (parts.first().and_then(|l| l.parse().ok()), parts.get(3)) {
                    cur.branches.entry(l).or_default().push(taken.parse().ok());
                }
            }
            "end_of_record" => {
                for (_, name, n) in &mut cur.functions {
                    *n = calls.get(name).copied().unwrap_or(0);
                }
                cur.functions.sort();
                calls.clear();
                files.push(std::mem::take(&mut cur));
            }
            _ => {}
        }
    }
    files
}

/// Hit and total counts, printed as `hit/total pct%`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Ratio {
    pub hit: usize,
    pub total: usize,
}

impl Ratio {
    fn add(&mut self, hit: bool) {
        self.total += 1;
        self.hit += usize::from(hit);
    }

    /// `None` when there is nothing to cover (e.g. no branches).
    pub fn percent(self) -> Option<f64> {
        (self.total > 0).then(|| 100.0 * self.hit as f64 / self.total as f64)
    }
}

impl std::fmt::Display for Ratio {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.percent() {
            Some(p) => write!(f, "{:>5}/{:<5} {p:>5.1}%", self.hit, self.total),
            None => write!(f, "{:>5}/{:<5}     -", self.hit, self.total),
        }
    }
}

impl FileCoverage {
    /// Line and branch counts over the lines `range` (all lines if `None`).
    pub fn counts(&self, range: Option<(u32, u32)>) -> (Ratio, Ratio) {
        let inside = |l: &u32| range.is_none_or(|(a, b)| (a..=b).contains(l));
        let mut lines = Ratio::default();
        for (_, n) in self.lines.iter().filter(|(l, _)| inside(l)) {
            lines.add(*n > 0);
        }
        let mut branches = Ratio::default();
        for (_, taken) in self.branches.iter().filter(|(l, _)| inside(l)) {
            for t in taken {
                branches.add(t.is_some_and(|n| n > 0));
            }
        }
        (lines, branches)
    }

    /// The lines of function `index`: from its start to its closing brace,
    /// which kernel style puts in column 0 (lcov 1.x records no end line);
    /// without the source, up to the line before the next function's start.
    pub fn function_range(&self, index: usize, source: &[&str]) -> (u32, u32) {
        let start = self.functions[index].0;
        let next = self.functions.get(index + 1).map_or(u32::MAX, |f| f.0.saturating_sub(1));
        let from = (start as usize).saturating_sub(1);
        let body = source.iter().enumerate().skip(from).take_while(|(i, _)| (*i as u32) < next);
        let mut opened = false;
        for (i, line) in body {
            opened |= line.starts_with('{');
            if opened && line.starts_with('}') {
                return (start, i as u32 + 1);
            }
        }
        (start, next)
    }

    /// Lines never executed, and lines with a branch never taken, in `range`.
    pub fn uncovered(&self, range: (u32, u32)) -> Vec<(u32, &'static str)> {
        let mut out: Vec<(u32, &'static str)> = Vec::new();
        for l in range.0..=range.1.min(self.last_line()) {
            if self.lines.get(&l) == Some(&0) {
                out.push((l, "line"));
            } else if self.branches.get(&l).is_some_and(|b| b.iter().any(|t| !t.is_some_and(|n| n > 0))) {
                out.push((l, "branch"));
            }
        }
        out
    }

    fn last_line(&self) -> u32 {
        self.lines.keys().chain(self.branches.keys()).max().copied().unwrap_or(0)
    }
}

fn find<'a>(files: &'a [FileCoverage], suffix: &str) -> Option<&'a FileCoverage> {
    files.iter().find(|f| f.path.ends_with(&format!("/{suffix}")))
}

/// The printed report of one suite: per file, per rule function, and the
/// uncovered lines of the rule functions with their source text.
fn tables(set: &Set, files: &[FileCoverage], out: &Path) -> String {
    let mut s = format!("xtask: coverage of the {} (HTML: {}):\n", set.title, out.join("html/index.html").display());
    let _ = writeln!(s, "xtask:   {:<26} {:<19} {:<19} functions", "file", "lines", "branches");
    for (name, _) in RULE_FUNCTIONS {
        match find(files, name) {
            Some(f) => {
                let (lines, branches) = f.counts(None);
                let mut fns = Ratio::default();
                f.functions.iter().for_each(|(_, _, n)| fns.add(*n > 0));
                let _ = writeln!(s, "xtask:   {name:<26} {lines} {branches} {fns}");
            }
            None => {
                let _ = writeln!(s, "xtask:   {name:<26} not run");
            }
        }
    }
    // Each listed file's source, read once for both tables below.
    let listed: Vec<Listed<'_>> = RULE_FUNCTIONS
        .iter()
        .filter_map(|&(name, wanted)| {
            let file = find(files, name)?;
            Some(Listed { name, wanted, file, source: fs::read_to_string(&file.path).unwrap_or_default() })
        })
        .collect();
    s.push_str(&reachable_table(&listed));
    s.push_str(&rule_function_table(&listed));
    s
}

/// A listed file that the suite ran, with its rule functions and its source.
struct Listed<'a> {
    name: &'static str,
    wanted: Option<&'static [&'static str]>,
    file: &'a FileCoverage,
    source: String,
}

/// Line coverage of each file without the functions in [`UNREACHABLE`].
fn reachable_table(listed: &[Listed<'_>]) -> String {
    let mut s = String::new();
    for &Listed { name, file: f, ref source, .. } in listed {
        let text: Vec<&str> = source.lines().collect();
        let excluded: Vec<(u32, u32)> = (0..f.functions.len())
            .filter(|&i| unreachable_reason(name, &f.functions[i].1).is_some())
            .map(|i| f.function_range(i, &text))
            .collect();
        if excluded.is_empty() {
            continue;
        }
        let mut lines = Ratio::default();
        for (l, n) in &f.lines {
            if !excluded.iter().any(|(a, b)| (a..=b).contains(&l)) {
                lines.add(*n > 0);
            }
        }
        let _ = writeln!(
            s,
            "xtask:   {name:<26} {lines} reachable: without the {} functions no test can reach (below)",
            excluded.len()
        );
    }
    s
}

fn rule_function_table(listed: &[Listed<'_>]) -> String {
    let mut s = String::from("xtask: rule functions (lines, branches, calls):\n");
    let mut uncovered = String::new();
    for &Listed { name, wanted, file: f, ref source } in listed {
        let text: Vec<&str> = source.lines().collect();
        for (i, (_, func, calls)) in f.functions.iter().enumerate() {
            if wanted.is_some_and(|w| !w.contains(&func.as_str())) {
                continue;
            }
            let range = f.function_range(i, &text);
            let (lines, branches) = f.counts(Some(range));
            let _ = writeln!(s, "xtask:   {:<44} {lines} {branches} {calls:>9}", format!("{func}()"));
            if let Some(why) = unreachable_reason(name, func) {
                let _ = writeln!(uncovered, "xtask:   {name} {func}(): unreachable: {why}");
                continue;
            }
            for (l, what) in f.uncovered(range) {
                let code = text.get(l as usize - 1).map_or("", |t| t.trim());
                let _ = writeln!(uncovered, "xtask:   {name}:{l} {func}() [{what}] {code}");
            }
        }
    }
    s.push_str("xtask: uncovered lines and branches of the rule functions:\n");
    s.push_str(if uncovered.is_empty() { "xtask:   none\n" } else { &uncovered });
    s
}

/// Line coverage of both suites side by side, per listed file.
fn comparison(a: &Set, fa: &[FileCoverage], b: &Set, fb: &[FileCoverage]) -> String {
    let mut s = format!("xtask: line (branch) coverage, {} vs {}:\n", a.title, b.title);
    for (name, _) in RULE_FUNCTIONS {
        let show = |f: Option<&FileCoverage>| {
            f.map_or("not run".to_string(), |f| {
                let (l, b) = f.counts(None);
                let pct = |r: Ratio| r.percent().map_or("    -".into(), |p| format!("{p:5.1}%"));
                format!("{} ({})", pct(l), pct(b))
            })
        };
        let _ = writeln!(s, "xtask:   {name:<26} {}  vs  {}", show(find(fa, name)), show(find(fb, name)));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    const INFO: &str = "SF:/k/virt/kvm/guest_memfd.c\nFN:10,kvm_gmem_a\nFN:20,kvm_gmem_b\nFNDA:3,kvm_gmem_a\n\
                        FNDA:0,kvm_gmem_b\nDA:11,3\nDA:12,0\nDA:21,0\nBRDA:11,0,0,2\nBRDA:11,0,1,-\n\
                        BRDA:21,0,0,0\nend_of_record\n";

    #[test]
    fn tracefile_counts_lines_branches_and_calls_per_function() {
        let files = parse_tracefile(INFO);
        let f = find(&files, "virt/kvm/guest_memfd.c").unwrap();
        assert_eq!(f.functions, [(10, "kvm_gmem_a".into(), 3), (20, "kvm_gmem_b".into(), 0)]);
        let (lines, branches) = f.counts(None);
        assert_eq!((lines, branches), (Ratio { hit: 1, total: 3 }, Ratio { hit: 1, total: 3 }));
        assert_eq!(f.function_range(0, &[]), (10, 19));
        assert_eq!(f.counts(Some(f.function_range(0, &[]))).0, Ratio { hit: 1, total: 2 });
        // Line 11 ran but one of its branches never did; 12 never ran.
        assert_eq!(f.uncovered(f.function_range(0, &[])), [(11, "branch"), (12, "line")]);
        assert_eq!(f.uncovered(f.function_range(1, &[])), [(21, "line")]);
    }

    #[test]
    fn a_function_ends_at_its_column_0_brace_not_at_the_next_function() {
        let mut source = vec![""; 30];
        source[9] = "static int kvm_gmem_a(int x,";
        source[10] = "                       int y)";
        source[11] = "{";
        source[12] = "\tif (x) {";
        source[13] = "\t}";
        source[14] = "}";
        let f = &parse_tracefile(INFO)[0];
        assert_eq!(f.function_range(0, &source), (10, 15));
        // No closing brace before the next function: fall back to it.
        assert_eq!(f.function_range(1, &source), (20, u32::MAX));
    }

    #[test]
    fn nothing_to_cover_has_no_percentage() {
        assert_eq!(Ratio::default().percent(), None);
        assert_eq!(Ratio::default().to_string(), "    0/0         -");
    }
}
