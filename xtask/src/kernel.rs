//! `cargo xtask kernel`: configure and build a guest kernel for the VM runner.

use std::collections::{HashMap, VecDeque};
use std::fs;
use std::io::{self, BufRead, BufReader, IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::Instant;

use crate::error::{Error, Result};
use crate::util::{self, io_err, req, Requirement};

const DEBIAN_PACKAGE: &str = "linux-source-6.12";
const DEBIAN_TARBALL: &str = "/usr/src/linux-source-6.12.tar.xz";
/// Bumped whenever the configuration recipe changes, so cached images built
/// by an older recipe are not reused.
const RECIPE: &str = "x86_64_defconfig + kvm_guest.config + xtask/kernel.config, v1";

const BUILD_DEPS: &[Requirement] = &[
    req("make", "make"),
    req("gcc", "gcc"),
    req("flex", "flex"),
    req("bison", "bison"),
    req("bc", "bc"),
    req("perl", "perl"),
    req("xz", "xz-utils"),
    req("/usr/include/libelf.h", "libelf-dev"),
    req("/usr/include/openssl/ssl.h", "libssl-dev"),
];

#[derive(Debug, Clone)]
pub struct KernelOpts {
    /// Any kernel tree; `None` means Debian's linux-source-6.12.
    pub tree: Option<PathBuf>,
    pub jobs: usize,
}

impl Default for KernelOpts {
    fn default() -> Self {
        KernelOpts { tree: None, jobs: thread::available_parallelism().map_or(1, |n| n.get()) }
    }
}

pub fn fragment_path() -> PathBuf {
    util::workspace_root().join("xtask/kernel.config")
}

/// Configure and build the kernel, returning the path of its bzImage.
pub fn build(opts: &KernelOpts) -> Result<PathBuf> {
    let fragment_file = fragment_path();
    let fragment = fs::read_to_string(&fragment_file).map_err(io_err(&fragment_file))?;
    let config_hash = format!("{:016x}", util::fnv1a(&[RECIPE.as_bytes(), fragment.as_bytes()]));

    let cache = util::cache_dir();
    let (id, src) = match &opts.tree {
        Some(tree) => tree_source(tree)?,
        None => {
            // A released source never changes, so its image is reused
            // without extracting the source or asking make; a tree can
            // change under us and is always rebuilt (incrementally, in its
            // own O= directory).
            let id = debian_source_id()?;
            let cached = cached_image(&id, &config_hash);
            if cached.is_file() {
                eprintln!("xtask: using cached kernel for {id}");
                return Ok(cached);
            }
            (id.clone(), extract_debian_source(&id)?)
        }
    };
    util::ensure_requirements(BUILD_DEPS)?;
    let out = cache.join("build").join(&id);
    util::create_dir_all(&out)?;
    configure(&src, &out, &fragment_file, &config_hash)?;
    verify_config(&out.join(".config"), &fragment)?;

    let start = Instant::now();
    eprintln!("xtask: building {} (O={}, -j{})", src.display(), out.display(), opts.jobs);
    make_with_progress(&src, &out, opts.jobs)?;
    // make may re-run Kconfig (e.g. a bisected tree with new symbols).
    verify_config(&out.join(".config"), &fragment)?;
    eprintln!("xtask: kernel built in {:.0?}", start.elapsed());

    let image = out.join("arch/x86/boot/bzImage");
    if !image.is_file() {
        return Err(Error::NoKernelImage(image));
    }
    if opts.tree.is_some() {
        return Ok(image);
    }
    let cached_image = cached_image(&id, &config_hash);
    let dir = cached_image.parent().expect("image path has a parent");
    util::create_dir_all(dir)?;
    // Copy then rename so an interrupted copy is never taken for an image.
    let partial = dir.join("bzImage.partial");
    fs::copy(&image, &partial).map_err(io_err(&partial))?;
    fs::rename(&partial, &cached_image).map_err(io_err(&cached_image))?;
    Ok(cached_image)
}

/// Identify an arbitrary tree by its location: bisection rebuilds the same
/// tree in place, and reusing its O= directory keeps each step incremental.
fn tree_source(tree: &Path) -> Result<(String, PathBuf)> {
    let src = tree.canonicalize().map_err(io_err(tree))?;
    if !src.join("Makefile").is_file() || !src.join("Kconfig").is_file() {
        return Err(Error::NotAKernelTree(src));
    }
    let name = src.file_name().map_or("root".into(), |n| n.to_string_lossy());
    let hash = util::fnv1a(&[src.as_os_str().as_encoded_bytes()]);
    Ok((format!("tree-{}-{:08x}", util::sanitize(&name), hash as u32), src))
}

fn cached_image(id: &str, config_hash: &str) -> PathBuf {
    util::cache_dir().join("images").join(format!("{id}-{config_hash}")).join("bzImage")
}

/// Debian's linux-source-6.12, extracted once into the cache: its id and
/// source directory.
pub fn debian_source() -> Result<(String, PathBuf)> {
    let id = debian_source_id()?;
    let src = extract_debian_source(&id)?;
    Ok((id, src))
}

/// Identify Debian's source by its package version (installing the package
/// if needed and allowed).
fn debian_source_id() -> Result<String> {
    util::ensure_requirements(&[req(DEBIAN_TARBALL, DEBIAN_PACKAGE)])?;
    let tarball = Path::new(DEBIAN_TARBALL);
    let version = util::output(Command::new("dpkg-query").args(["-W", "-f=${Version}", DEBIAN_PACKAGE]))
        .ok()
        .filter(|v| !v.trim().is_empty())
        .map_or_else(
            // Not installed through dpkg (copied in by hand): size and mtime
            // are a good enough identity for a release tarball.
            || {
                let meta = fs::metadata(tarball).ok();
                let size = meta.as_ref().map_or(0, |m| m.len());
                let mtime = meta
                    .and_then(|m| m.modified().ok())
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map_or(0, |d| d.as_secs());
                format!("{:016x}", util::fnv1a(&[&size.to_le_bytes(), &mtime.to_le_bytes()]))
            },
            |v| v.trim().to_string(),
        );
    Ok(util::sanitize(&format!("{DEBIAN_PACKAGE}_{version}")))
}

fn extract_debian_source(id: &str) -> Result<PathBuf> {
    util::ensure_requirements(&[req("tar", "tar"), req("xz", "xz-utils")])?;
    let tarball = Path::new(DEBIAN_TARBALL);
    let src_root = util::cache_dir().join("src");
    let src = src_root.join(id);
    if src.join("Makefile").is_file() {
        return Ok(src);
    }

    eprintln!("xtask: extracting {DEBIAN_TARBALL} into {}", src.display());
    let partial = src_root.join(format!(".partial-{id}"));
    if partial.exists() {
        fs::remove_dir_all(&partial).map_err(io_err(&partial))?;
    }
    util::create_dir_all(&partial)?;
    util::run(Command::new("tar").arg("-xf").arg(tarball).arg("-C").arg(&partial))?;
    let top = partial.join(DEBIAN_PACKAGE);
    if !top.join("Makefile").is_file() {
        return Err(Error::NotAKernelTree(top));
    }
    // Rename last so an interrupted extraction is redone, not half-used.
    fs::rename(&top, &src).map_err(io_err(&src))?;
    fs::remove_dir_all(&partial).map_err(io_err(&partial))?;
    Ok(src)
}

/// Write `.config` from the recipe unless the build directory already holds
/// one made from this exact recipe (re-running it would be wasted time).
fn configure(src: &Path, out: &Path, fragment: &Path, hash: &str) -> Result<()> {
    let stamp = out.join(".xtask-config");
    if out.join(".config").is_file() && fs::read_to_string(&stamp).ok().as_deref() == Some(hash) {
        return Ok(());
    }
    eprintln!("xtask: configuring {}", out.display());
    let _ = fs::remove_file(&stamp);
    let o = format!("O={}", out.display());
    quiet(Command::new("make").arg("-C").arg(src).arg(&o).arg("x86_64_defconfig"))?;
    quiet(
        Command::new(src.join("scripts/kconfig/merge_config.sh"))
            .current_dir(src)
            .arg("-m")
            .arg("-O")
            .arg(out)
            .arg(out.join(".config"))
            .arg(src.join("kernel/configs/kvm_guest.config"))
            .arg(fragment),
    )?;
    quiet(Command::new("make").arg("-C").arg(src).arg(&o).arg("olddefconfig"))?;
    fs::write(&stamp, hash).map_err(io_err(&stamp))
}

/// Run a command, showing its output only if it fails.
fn quiet(cmd: &mut Command) -> Result<()> {
    let out = cmd.output().map_err(|source| Error::Spawn { cmd: util::describe(cmd), source })?;
    if out.status.success() {
        return Ok(());
    }
    io::stderr().write_all(&out.stdout).ok();
    io::stderr().write_all(&out.stderr).ok();
    Err(Error::CommandFailed { cmd: util::describe(cmd), status: out.status })
}

/// The options between the `# xtask: required` and `# xtask: best-effort`
/// markers: name and value, `None` meaning "is not set".
pub fn required_options(fragment: &str) -> Vec<(String, Option<String>)> {
    let mut required = false;
    let mut options = Vec::new();
    for line in fragment.lines().map(str::trim) {
        match line {
            "# xtask: required" => required = true,
            "# xtask: best-effort" => required = false,
            _ if !required => {}
            _ => {
                if let Some(name) = line.strip_prefix("# ").and_then(|l| l.strip_suffix(" is not set")) {
                    options.push((name.to_string(), None));
                } else if let Some((name, value)) = line.split_once('=').filter(|(n, _)| n.starts_with("CONFIG_")) {
                    options.push((name.to_string(), Some(value.to_string())));
                }
            }
        }
    }
    options
}

fn verify_config(config: &Path, fragment: &str) -> Result<()> {
    let text = fs::read_to_string(config).map_err(io_err(config))?;
    let actual: HashMap<&str, &str> =
        text.lines().filter_map(|l| l.split_once('=')).filter(|(n, _)| n.starts_with("CONFIG_")).collect();
    let missing: Vec<String> = required_options(fragment)
        .into_iter()
        .filter(|(name, want)| actual.get(name.as_str()).copied() != want.as_deref())
        .map(|(name, want)| match (want, actual.get(name.as_str())) {
            (Some(w), Some(a)) => format!("{name}={w} (got {a})"),
            (Some(w), None) => format!("{name}={w} (not set)"),
            (None, Some(a)) => format!("{name} unset (got {a})"),
            (None, None) => unreachable!("filtered out above"),
        })
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(Error::ConfigNotApplied { config: config.to_path_buf(), options: missing })
    }
}

/// Run make, condensing its thousands of lines into a progress line on a
/// terminal (or a line every few hundred steps in logs) while showing every
/// warning and error in full.
fn make_with_progress(src: &Path, out: &Path, jobs: usize) -> Result<()> {
    let mut cmd = Command::new("make");
    cmd.arg("-C")
        .arg(src)
        .arg(format!("O={}", out.display()))
        .arg(format!("-j{jobs}"))
        .arg("bzImage")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|source| Error::Spawn { cmd: util::describe(&cmd), source })?;
    let (tx, rx) = mpsc::channel();
    let readers: Vec<_> = [
        child.stdout.take().map(|s| Box::new(s) as Box<dyn Read + Send>),
        child.stderr.take().map(|s| Box::new(s) as Box<dyn Read + Send>),
    ]
    .into_iter()
    .flatten()
    .map(|pipe| {
        let tx = tx.clone();
        thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        })
    })
    .collect();
    drop(tx);

    let tty = io::stderr().is_terminal();
    let mut tail = VecDeque::with_capacity(40);
    let mut steps = 0usize;
    let mut err = io::stderr().lock();
    for line in rx {
        if tail.len() == 40 {
            tail.pop_front();
        }
        tail.push_back(line.clone());
        // Match diagnostics, not object names like str_error_r.o.
        let important = line.contains("error:")
            || line.contains("warning:")
            || (line.starts_with("make") && line.contains("Error"));
        if important {
            if tty {
                write!(err, "\r\x1b[K").ok();
            }
            writeln!(err, "{line}").ok();
            continue;
        }
        steps += 1;
        if tty {
            let shown: String = line.trim().chars().take(70).collect();
            write!(err, "\r\x1b[K[kernel] {steps:>5} {shown}").ok();
            err.flush().ok();
        } else if steps % 500 == 0 {
            writeln!(err, "[kernel] {steps} steps, at: {}", line.trim()).ok();
        }
    }
    if tty {
        writeln!(err).ok();
    }
    drop(err);
    for reader in readers {
        reader.join().ok();
    }
    let status = child.wait().map_err(|source| Error::Spawn { cmd: util::describe(&cmd), source })?;
    if status.success() {
        Ok(())
    } else {
        Err(Error::KernelBuild { status, tail: Vec::from(tail).join("\n") })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_required_section_only() {
        let frag = "CONFIG_A=y\n# xtask: required\nCONFIG_B=y\n# CONFIG_C is not set\n\
                    # comment\n# xtask: best-effort\nCONFIG_D=y\n";
        assert_eq!(required_options(frag), vec![("CONFIG_B".into(), Some("y".into())), ("CONFIG_C".into(), None)]);
    }

    #[test]
    fn verify_names_options_that_did_not_stick() {
        let dir = std::env::temp_dir().join(format!("xtask-kcfg-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let config = dir.join(".config");
        fs::write(&config, "CONFIG_A=y\nCONFIG_B=m\nCONFIG_D=y\n").unwrap();
        let frag = "# xtask: required\nCONFIG_A=y\nCONFIG_B=y\nCONFIG_C=y\n# CONFIG_D is not set\n";
        let err = verify_config(&config, frag).unwrap_err().to_string();
        assert!(err.ends_with("CONFIG_B=y (got m), CONFIG_C=y (not set), CONFIG_D unset (got y)"), "{err}");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn shipped_fragment_requires_protected_vms() {
        let frag = fs::read_to_string(fragment_path()).unwrap();
        let opts = required_options(&frag);
        assert!(opts.contains(&("CONFIG_KVM_SW_PROTECTED_VM".into(), Some("y".into()))));
    }
}
