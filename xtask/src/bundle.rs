//! `cargo xtask bundle`: the suite as a relocatable tarball that runs on
//! any x86_64 kernel with KVM, with or without this repository, and the
//! same directory `cargo xtask vm` runs in its guest (one runner: `run.sh`).
//!
//! ```text
//! kvm-private-mem-selftests-VERSION-x86_64/
//!   run.sh                    the runner (xtask/bundle/run.sh)
//!   kselftest-list.txt        kvm_private_mem:BINARY, one per test binary
//!   kvm_private_mem/          the kselftest collection
//!     settings                timeout=SECS (the longest binary's limit)
//!     BINARY                  kselftest entry: BINARY in TAP 13 mode
//!     bin/BINARY, bin/guest_probe   the static executables
//!     binaries                the test binaries, in run order
//!     timeouts                NAME SECS: each binary's time limit
//!   known-failures/*.txt      the known bugs of the kernels CI runs
//!   VERSION
//! ```

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::Result;
use crate::guest_init::set_executable;
use crate::limits::Limits;
use crate::test_binaries::{Built, PROBE};
use crate::util::{self, io_err};

/// The runner, shipped as is.
pub const RUN_SH: &str = include_str!("../bundle/run.sh");

/// The kselftest collection's name (`run_kselftest.sh -c kvm_private_mem`).
pub const COLLECTION: &str = "kvm_private_mem";

/// The bundle's name: `kvm-private-mem-selftests-VERSION-x86_64`, VERSION
/// the package version and, in a git checkout, the commit.
pub fn name() -> String {
    let mut version = env!("CARGO_PKG_VERSION").to_string();
    let describe = Command::new("git")
        .arg("-C")
        .arg(util::workspace_root())
        .args(["describe", "--always", "--dirty", "--abbrev=12"])
        .output();
    if let Some(out) = describe.ok().filter(|o| o.status.success()) {
        let commit = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if !commit.is_empty() {
            let _ = write!(version, "-g{commit}");
        }
    }
    format!("kvm-private-mem-selftests-{}-x86_64", util::sanitize(&version))
}

/// Lay out the bundle in `dir/NAME` (replacing what was there); returns
/// that directory.
pub fn stage(built: &Built, limits: &Limits, dir: &Path, name: &str) -> Result<PathBuf> {
    let root = dir.join(name);
    if root.exists() {
        fs::remove_dir_all(&root).map_err(io_err(&root))?;
    }
    let collection = root.join(COLLECTION);
    let bin = collection.join("bin");
    util::create_dir_all(&bin)?;
    let write = |path: PathBuf, text: &str| fs::write(&path, text).map_err(io_err(&path));

    write(root.join("run.sh"), RUN_SH)?;
    set_executable(&root.join("run.sh"))?;
    write(root.join("VERSION"), &format!("{name}\n"))?;
    copy_executable(&built.probe, &bin.join(PROBE))?;
    let mut list = String::new();
    let mut order = String::new();
    let mut timeouts = String::new();
    let mut longest = 0;
    for b in &built.tests {
        copy_executable(&b.path, &bin.join(&b.name))?;
        let entry = collection.join(&b.name);
        write(entry.clone(), &kselftest_entry(&b.name))?;
        set_executable(&entry)?;
        let _ = writeln!(list, "{COLLECTION}:{}", b.name);
        let _ = writeln!(order, "{}", b.name);
        let secs = limits.of(&b.name);
        longest = longest.max(secs);
        let _ = writeln!(timeouts, "{} {secs}", b.name);
    }
    write(root.join("kselftest-list.txt"), &list)?;
    write(collection.join("binaries"), &order)?;
    write(collection.join("timeouts"), &timeouts)?;
    // kselftest's runner gives every program of a collection the one
    // timeout of its settings file: the longest binary's limit.
    write(collection.join("settings"), &format!("timeout={longest}\n"))?;

    let known = util::workspace_root().join(".ci/known-failures");
    let known_out = root.join("known-failures");
    util::create_dir_all(&known_out)?;
    for entry in fs::read_dir(&known).map_err(io_err(&known))? {
        let path = entry.map_err(io_err(&known))?.path();
        if path.extension().is_some_and(|e| e == "txt") {
            let to = known_out.join(path.file_name().expect("a file"));
            fs::copy(&path, &to).map_err(io_err(&path))?;
        }
    }
    Ok(root)
}

/// A kselftest program: the binary in TAP 13 mode (kselftest's runner
/// runs `./BINARY` from the collection directory, with no arguments but
/// those of `KSELFTEST_BINARY_ARGS`).
fn kselftest_entry(binary: &str) -> String {
    format!(
        "#!/bin/sh\n# kselftest entry of the bundle: {binary}'s tests, in TAP 13.\n\
         KVM_SELFTESTS_FORMAT=tap exec \"$(dirname \"$0\")/bin/{binary}\" \"$@\"\n"
    )
}

fn copy_executable(from: &Path, to: &Path) -> Result<()> {
    fs::copy(from, to).map_err(io_err(from))?;
    set_executable(to)
}

/// Pack `root` (a staged bundle) into `out/NAME.tar.xz`.
pub fn pack(root: &Path, out: &Path) -> Result<PathBuf> {
    util::create_dir_all(out)?;
    let name = root.file_name().expect("a staged bundle").to_string_lossy().into_owned();
    let tarball = out.canonicalize().map_err(io_err(out))?.join(format!("{name}.tar.xz"));
    let parent = root.parent().expect("staged under a directory");
    util::run(
        Command::new("tar")
            .arg("-C")
            .arg(parent)
            .args(["--owner=0", "--group=0", "--numeric-owner", "--sort=name", "-cJf"])
            .arg(&tarball)
            .arg(&name)
            // Both cores: xz alone takes most of the bundle's time.
            .env("XZ_OPT", "-T0"),
    )?;
    Ok(tarball)
}

/// `cargo xtask bundle`: build, stage under target/kvm-selftests/bundle,
/// pack into `out`.
pub fn run(out: &Path, bench: bool) -> Result<PathBuf> {
    util::ensure_requirements(&[util::req("tar", "tar"), util::req("xz", "xz-utils")])?;
    let built = crate::test_binaries::build(bench)?;
    // The measured defaults; run.sh applies KVM_SELFTESTS_TEST_TIMEOUT and
    // --timeout where it runs.
    let limits = Limits::default();
    // Only the newest staged bundle is kept.
    let dir = util::output_dir().join("bundle");
    if dir.exists() {
        fs::remove_dir_all(&dir).map_err(io_err(&dir))?;
    }
    let staged = stage(&built, &limits, &dir, &name())?;
    let tarball = pack(&staged, out)?;
    let size = fs::metadata(&tarball).map_err(io_err(&tarball))?.len();
    eprintln!("xtask: bundle {} ({:.1} MiB)", tarball.display(), size as f64 / (1 << 20) as f64);
    Ok(tarball)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_binaries::TestBinary;

    #[test]
    fn a_staged_bundle_has_the_runner_the_kselftest_layout_and_the_limits() {
        let dir = std::env::temp_dir().join(format!("xtask-bundle-{}", std::process::id()));
        let built = Built {
            tests: vec![
                TestBinary { name: "vm_types".into(), path: "/bin/true".into() },
                TestBinary { name: "model".into(), path: "/bin/false".into() },
            ],
            probe: "/bin/true".into(),
        };
        let root = stage(&built, &Limits::default(), &dir, "b-1").unwrap();
        let read = |p: &str| fs::read_to_string(root.join(p)).unwrap();
        assert_eq!(read("kselftest-list.txt"), "kvm_private_mem:vm_types\nkvm_private_mem:model\n");
        assert_eq!(read("kvm_private_mem/timeouts"), "vm_types 60\nmodel 420\n");
        assert_eq!(read("kvm_private_mem/settings"), "timeout=420\n");
        assert!(read("kvm_private_mem/vm_types")
            .contains("KVM_SELFTESTS_FORMAT=tap exec \"$(dirname \"$0\")/bin/vm_types\""));
        assert!(root.join("kvm_private_mem/bin/guest_probe").is_file());
        assert!(root.join("known-failures/debian-linux-7.3.txt").is_file());
        assert!(read("run.sh").starts_with("#!/bin/sh\n"));
        fs::remove_dir_all(&dir).unwrap();
    }
}
