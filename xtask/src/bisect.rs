//! `bisect-step` (one `git bisect run` step) and `bisect-demo` (a throwaway
//! history with a known bad commit, to show that bisection finds it).

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, ExitCode, Stdio};
use std::time::Instant;

use crate::debian::Release;
use crate::error::{Error, Result};
use crate::util::{self, io_err};
use crate::vm::{self, VmOpts};
use crate::{kernel, print_verdict};

/// One `git bisect run` step: 0 good, 1 bad, 125 untestable, 128 abort.
pub fn step(opts: &VmOpts) -> ExitCode {
    let result = vm::run(opts);
    let code = code(&result);
    match &result {
        Ok(outcome) => {
            print_verdict(outcome);
        }
        Err(e) if code == SKIP => eprintln!("xtask: bisect-step: cannot test this revision (skip): {e}"),
        Err(e) => eprintln!("xtask: bisect-step: aborting the bisection: {e}"),
    }
    ExitCode::from(code)
}

/// `git bisect run`'s status for an untestable revision.
const SKIP: u8 = 125;

/// The status of a run for `git bisect run`: a run that got to its tests is
/// good or bad by its results, whatever stopped it (a kernel that panics or
/// hangs during the tests is bad: `vm::run` turns that into a failed test);
/// a kernel that never got there is skipped; anything else (host, user,
/// recipe) aborts.
pub fn code(result: &Result<vm::RunOutcome>) -> u8 {
    match result {
        Ok(outcome) if outcome.passed() => 0,
        Ok(_) => 1,
        Err(e) if e.is_kernel_fault() => SKIP,
        Err(_) => 128,
    }
}

/// An identity for the demo commits, and no automatic gc: the base commit
/// leaves ~80k loose objects, and a background gc would hold HEAD.lock while
/// the demo goes on committing.
const GIT_CONFIG: &[&str] = &[
    "-c",
    "user.name=xtask bisect-demo",
    "-c",
    "user.email=xtask@localhost",
    "-c",
    "gc.auto=0",
    "-c",
    "maintenance.auto=false",
];
const BASE_TAG: &str = "xtask-demo-base";
const BREAK_FILE: &str = "arch/x86/include/asm/kvm_host.h";
const BREAK_NEEDLE: &str = "define kvm_arch_nr_memslot_as_ids(kvm)";

/// Harmless commits: comments in compiled KVM files (so each bisection step
/// really rebuilds something) and documentation.
const HARMLESS: &[(&str, &str)] = &[
    ("Documentation/virt/kvm/api.rst", "docs: mention the bisect demo"),
    ("arch/x86/kvm/x86.c", "KVM: x86: comment-only change"),
    ("virt/kvm/kvm_main.c", "KVM: comment-only change in kvm_main"),
];
const HARMLESS_AFTER: &[(&str, &str)] = &[
    ("arch/x86/kvm/mmu/mmu.c", "KVM: x86/mmu: comment-only change"),
    ("virt/kvm/guest_memfd.c", "KVM: guest_memfd: comment-only change"),
    ("Documentation/virt/kvm/api.rst", "docs: another harmless note"),
];

pub fn demo(release: &Release, opts: &VmOpts) -> Result<ExitCode> {
    let start = Instant::now();
    let (id, src) = kernel::debian_source(release)?;
    let tree = util::cache_dir().join("bisect-demo").join(&id);
    prepare_tree(&src, &tree, &id)?;

    let git = |args: &[&str]| -> Command {
        let mut c = Command::new("git");
        c.arg("-C").arg(&tree).args(GIT_CONFIG).args(args);
        c
    };
    util::run(&mut git(&["config", "gc.auto", "0"]))?;
    // Start from the base every time so the demo is repeatable.
    let _ = git(&["bisect", "reset"]).output();
    util::run(&mut git(&["checkout", "-q", "-f", "-B", "demo", BASE_TAG]))?;
    util::run(&mut git(&["clean", "-q", "-fdx"]))?;

    for (n, (file, msg)) in HARMLESS.iter().enumerate() {
        harmless_commit(&tree, file, msg, n, &git)?;
    }
    let bad = breaking_commit(&tree, &git)?;
    for (n, (file, msg)) in HARMLESS_AFTER.iter().enumerate() {
        harmless_commit(&tree, file, msg, n + HARMLESS.len(), &git)?;
    }
    eprintln!("xtask: demo history ready in {}:", tree.display());
    util::run(&mut git(&["log", "--oneline", "demo"]))?;

    let exe = std::env::current_exe().map_err(io_err(Path::new("/proc/self/exe")))?;
    util::run(&mut git(&["bisect", "start", "demo", BASE_TAG]))?;
    let bisect_start = Instant::now();
    let mut run = git(&["bisect", "run"]);
    run.arg(&exe)
        .arg("bisect-step")
        .arg("--tree")
        .arg(&tree)
        .arg(format!("--jobs={}", opts.kernel_opts.jobs))
        .arg(format!("--timeout={}", opts.timeout))
        .arg(format!("--boot-timeout={}", opts.boot_timeout))
        .args(["--", "address_space"])
        .current_dir(&tree)
        .stdout(Stdio::piped());
    let mut child = run.spawn().map_err(|source| Error::Spawn { cmd: util::describe(&run), source })?;
    // Tee git's output, counting steps and catching its conclusion.
    let mut steps = 0;
    let mut found = None;
    let stdout = child.stdout.take().expect("stdout is piped");
    for line in BufReader::new(stdout).lines().map_while(|l| l.ok()) {
        println!("{line}");
        std::io::stdout().flush().ok();
        // git's "running '<cmd>'", not libtest's "running 12 tests".
        if line.starts_with("running '") {
            steps += 1;
        }
        if let Some(sha) = line.strip_suffix(" is the first bad commit") {
            found = Some(sha.trim().to_string());
        }
    }
    let status = child.wait().map_err(|source| Error::Spawn { cmd: util::describe(&run), source })?;
    let bisect_time = bisect_start.elapsed();
    let _ = git(&["bisect", "reset"]).output();

    eprintln!(
        "xtask: bisection: {steps} steps in {:.0?} (whole demo {:.0?}), git bisect run {status}",
        bisect_time,
        start.elapsed()
    );
    match found {
        Some(sha) if sha == bad => {
            eprintln!("xtask: bisection named the breaking commit {bad}");
            Ok(ExitCode::SUCCESS)
        }
        Some(sha) => Err(Error::Demo(format!("bisection named {sha}, but the breaking commit is {bad}"))),
        None => Err(Error::Demo(format!(
            "git bisect run ended ({status}) without naming a commit; the breaking commit is {bad}"
        ))),
    }
}

/// Copy the pristine source once and commit it as the base.
fn prepare_tree(src: &Path, tree: &Path, id: &str) -> Result<()> {
    if tree.join(".git").is_dir() {
        return Ok(());
    }
    eprintln!("xtask: creating the demo repository {}", tree.display());
    let partial = tree.with_file_name(".partial-demo");
    if partial.exists() {
        fs::remove_dir_all(&partial).map_err(io_err(&partial))?;
    }
    util::create_dir_all(partial.parent().expect("has a parent"))?;
    util::run(Command::new("cp").arg("-a").arg(src).arg(&partial))?;
    let git = |args: &[&str]| {
        let mut c = Command::new("git");
        c.arg("-C").arg(&partial).args(GIT_CONFIG).args(args).stdout(Stdio::null());
        c
    };
    util::run(&mut git(&["init", "-q", "-b", "demo"]))?;
    // -f: Debian's top-level .gitignore ignores everything but debian/.
    util::run(&mut git(&["add", "-A", "-f"]))?;
    util::run(&mut git(&["commit", "-q", "-m", &format!("base: Debian {id}")]))?;
    util::run(&mut git(&["tag", BASE_TAG]))?;
    fs::rename(&partial, tree).map_err(io_err(tree))
}

fn harmless_commit(tree: &Path, file: &str, msg: &str, n: usize, git: &dyn Fn(&[&str]) -> Command) -> Result<()> {
    let path = tree.join(file);
    let mut text = fs::read_to_string(&path).map_err(io_err(&path))?;
    let comment = if file.ends_with(".rst") {
        format!("\n.. bisect-demo: harmless change {n}\n")
    } else {
        format!("\n/* bisect-demo: harmless change {n} */\n")
    };
    text.push_str(&comment);
    fs::write(&path, text).map_err(io_err(&path))?;
    util::run(git(&["commit", "-q", "-a", "-m", msg]).stdout(Stdio::null()))
}

/// The bad commit: protected VMs get the SMM address space too, which the
/// suite's address_spaces tests must catch. Returns its full hash.
fn breaking_commit(tree: &Path, git: &dyn Fn(&[&str]) -> Command) -> Result<String> {
    let path = tree.join(BREAK_FILE);
    let text = fs::read_to_string(&path).map_err(io_err(&path))?;
    let mut replaced = false;
    let new: Vec<String> = text
        .lines()
        .map(|line| match line.find(BREAK_NEEDLE) {
            Some(at) if !replaced => {
                replaced = true;
                format!("{}{BREAK_NEEDLE} 2", &line[..at])
            }
            _ => line.to_string(),
        })
        .collect();
    if !replaced {
        return Err(Error::Demo(format!("`{BREAK_NEEDLE}` not found in {BREAK_FILE}")));
    }
    fs::write(&path, new.join("\n") + "\n").map_err(io_err(&path))?;
    util::run(
        git(&[
            "commit",
            "-q",
            "-a",
            "-m",
            "KVM: x86: give every VM the SMM memslot address space (breaks protected VMs)",
        ])
        .stdout(Stdio::null()),
    )?;
    let sha = util::output(&mut git(&["rev-parse", "HEAD"]))?;
    Ok(sha.trim().to_string())
}
