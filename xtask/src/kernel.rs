//! `cargo xtask kernel`: configure and build a guest kernel for the VM runner.

use std::collections::VecDeque;
use std::fs;
use std::io::{self, BufRead, BufReader, IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::Instant;

use crate::coverage;
use crate::debian::{self, Release, Tarball};
use crate::error::{Error, Result};
use crate::patch::{self, PatchSet};
use crate::recipe::{KconfigSymbols, Recipe};
use crate::util::{self, io_err, req, Requirement};

/// Bumped whenever the configuration recipe changes, so cached images built
/// by an older recipe are not reused.
const RECIPE: &str = "allnoconfig + xtask/kernel.config, v2";

/// The `make` target the recipe is applied on (`KCONFIG_ALLCONFIG`): every
/// option the recipe does not name is off. `cargo xtask kernel-config`
/// names it in the plain fragment's header.
pub const CONFIG_BASE: &str = "allnoconfig";

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

/// Where the kernel source comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// Debian's `linux-source-X.Y` package (installed, or fetched).
    Debian(Release),
    /// Any kernel tree, built in place with its own `O=` directory.
    Tree(PathBuf),
}

#[derive(Debug, Clone)]
pub struct KernelOpts {
    pub source: Source,
    pub jobs: usize,
    /// Build KVM with gcov profiling (`cargo xtask vm --coverage`).
    pub coverage: bool,
    /// Patches applied, in order, to a copy of the source (`--patch`).
    pub patches: Vec<PathBuf>,
    /// The debug lane (`--debug-kernel`): lockdep, DEBUG_VM, KASAN, UBSAN.
    pub debug: bool,
}

impl Default for KernelOpts {
    fn default() -> Self {
        KernelOpts {
            source: Source::Debian(Release::DEFAULT),
            jobs: thread::available_parallelism().map_or(1, |n| n.get()),
            coverage: false,
            patches: Vec::new(),
            debug: false,
        }
    }
}

pub fn fragment_path() -> PathBuf {
    util::workspace_root().join("xtask/kernel.config")
}

/// The debug lane's options, added to the recipe by `--debug-kernel`.
pub fn debug_fragment_path() -> PathBuf {
    util::workspace_root().join("xtask/debug-kernel.config")
}

impl KernelOpts {
    /// The build id of source `id` with these options: a gcov or debug
    /// build has its own build directory and image.
    fn build_id(&self, id: &str) -> String {
        match (self.coverage, self.debug) {
            (true, _) => format!("{id}-coverage"),
            (false, true) => format!("{id}-debug"),
            (false, false) => id.to_string(),
        }
    }
}

/// A kernel ready to be built: its source extracted, patched and
/// instrumented as asked, or an image built before from the same inputs.
#[derive(Debug)]
pub struct Prepared {
    /// The source with the patches applied, before gcov instrumentation, as
    /// (id, directory): what `--upstream` builds the C selftests from. None
    /// when a cached image made extracting the source unnecessary.
    pub tree: Option<(String, PathBuf)>,
    plan: Plan,
}

#[derive(Debug)]
enum Plan {
    Cached(PathBuf),
    Build {
        /// The build directory's name under `build/` in the cache.
        id: String,
        src: PathBuf,
        /// A released source: its image is cached under `images/`.
        cache_image: bool,
        fragment: String,
        /// With patches: the build directory of the same source unpatched,
        /// which seeds this one.
        seed_from: Option<String>,
    },
}

/// Configure and build the kernel, returning the path of its bzImage.
pub fn build(opts: &KernelOpts) -> Result<PathBuf> {
    build_prepared(opts, prepare(opts)?)
}

/// Everything before make: read the patches (a missing or diff-less one is
/// an error before any work), find or extract the source, apply the patches
/// to a hard-link copy of it (one that does not apply is an error naming its
/// file and hunk), and link the gcov copy.
pub fn prepare(opts: &KernelOpts) -> Result<Prepared> {
    let patches = PatchSet::load(&opts.patches)?;
    let fragment_file = fragment_path();
    let mut fragment = fs::read_to_string(&fragment_file).map_err(io_err(&fragment_file))?;
    if opts.coverage {
        fragment.push_str(coverage::FRAGMENT);
    }
    if opts.debug {
        let debug = debug_fragment_path();
        fragment.push('\n');
        fragment.push_str(&fs::read_to_string(&debug).map_err(io_err(&debug))?);
    }

    let (id, src, cache_image) = match &opts.source {
        Source::Tree(tree) => {
            let (id, src) = tree_source(tree)?;
            (id, src, false)
        }
        Source::Debian(release) => {
            let tarball = debian::tarball(release)?;
            // A released source never changes, so its image is reused
            // without extracting the source or asking make; a tree can
            // change under us and is always rebuilt (incrementally, in its
            // own O= directory). Patches are part of the key.
            let key_id = opts.build_id(&patches.id(&tarball.id));
            // A gcov image is only usable with its build directory's .gcno
            // notes (a CI cache may restore the image without them).
            let notes = util::cache_dir().join("build").join(&key_id).join("virt/kvm/kvm_main.gcno");
            let cached = cached_debian_image(&key_id, &fragment).filter(|_| !opts.coverage || notes.is_file());
            if let Some(cached) = cached {
                eprintln!("xtask: using cached kernel for {key_id}");
                return Ok(Prepared { tree: None, plan: Plan::Cached(cached) });
            }
            let src = extract(&tarball)?;
            (tarball.id, src, true)
        }
    };
    let unpatched_build = opts.build_id(&id);
    let (id, src) =
        if patches.is_empty() { (id, src) } else { patch::patched_source(&id, &src, &patches, cache_image)? };
    let tree = Some((id.clone(), src.clone()));
    let src = if opts.coverage { coverage::instrumented_source(&id, &src, cache_image)? } else { src };
    let seed_from = (!patches.is_empty()).then_some(unpatched_build);
    Ok(Prepared { tree, plan: Plan::Build { id: opts.build_id(&id), src, cache_image, fragment, seed_from } })
}

/// The source tree `opts` names, with its patches applied: (id, directory).
pub fn source_tree(opts: &KernelOpts) -> Result<(String, PathBuf)> {
    let patches = PatchSet::load(&opts.patches)?;
    let (id, src, released) = match &opts.source {
        Source::Debian(release) => {
            let (id, src) = debian_source(release)?;
            (id, src, true)
        }
        Source::Tree(tree) => {
            let (id, src) = tree_source(tree)?;
            (id, src, false)
        }
    };
    if patches.is_empty() {
        return Ok((id, src));
    }
    patch::patched_source(&id, &src, &patches, released)
}

/// Build a prepared kernel, returning the path of its bzImage.
pub fn build_prepared(opts: &KernelOpts, prepared: Prepared) -> Result<PathBuf> {
    let (id, src, cache_image, fragment, seed_from) = match prepared.plan {
        Plan::Cached(image) => return Ok(image),
        Plan::Build { id, src, cache_image, fragment, seed_from } => (id, src, cache_image, fragment, seed_from),
    };
    let recipe = Recipe::resolve(&fragment, &KconfigSymbols::of_tree(&src)?)?;
    let config_hash = config_hash(&recipe);
    util::ensure_requirements(BUILD_DEPS)?;
    let out = util::cache_dir().join("build").join(&id);
    if let Some(base) = seed_from {
        patch::seed_build_dir(&util::cache_dir().join("build").join(base), &out, &src)?;
    }
    util::create_dir_all(&out)?;
    let resolved = out.join("xtask-fragment.config");
    fs::write(&resolved, &recipe.text).map_err(io_err(&resolved))?;
    configure(&src, &out, &resolved, &config_hash)?;
    recipe.verify(&out.join(".config"))?;

    let start = Instant::now();
    eprintln!("xtask: building {} (O={}, -j{})", src.display(), out.display(), opts.jobs);
    make_with_progress(&src, &out, opts.jobs)?;
    // make may re-run Kconfig (e.g. a bisected tree with new symbols).
    recipe.verify(&out.join(".config"))?;
    eprintln!("xtask: kernel built in {:.1?}", start.elapsed());

    let image = out.join("arch/x86/boot/bzImage");
    if !image.is_file() {
        return Err(Error::NoKernelImage(image));
    }
    if !cache_image {
        return Ok(image);
    }
    let cached_image = cached_image(&id, &config_hash);
    let dir = cached_image.parent().expect("image path has a parent");
    util::create_dir_all(dir)?;
    // Copy then rename so an interrupted copy is never taken for an image.
    let partial = dir.join("bzImage.partial");
    fs::copy(&image, &partial).map_err(io_err(&partial))?;
    fs::rename(&partial, &cached_image).map_err(io_err(&cached_image))?;
    let key = cache_key_file(&id, &fragment);
    util::create_dir_all(key.parent().expect("has a parent"))?;
    fs::write(&key, &config_hash).map_err(io_err(&key))?;
    Ok(cached_image)
}

/// The hash of a resolved recipe that names a build's configuration (in
/// the cached image's directory name and the KCIDB build id).
pub fn config_hash(recipe: &Recipe) -> String {
    format!("{:016x}", util::fnv1a(&[RECIPE.as_bytes(), recipe.text.as_bytes()]))
}

/// The recipe is resolved against the source's Kconfig, so the image's key
/// needs the extracted source; this file, keyed by source and unresolved
/// fragment, remembers the resolved key so a cached image is found without
/// extracting anything.
fn cache_key_file(id: &str, fragment: &str) -> PathBuf {
    let raw = util::fnv1a(&[RECIPE.as_bytes(), fragment.as_bytes()]);
    util::cache_dir().join("images").join("keys").join(format!("{id}-{raw:016x}"))
}

fn cached_debian_image(id: &str, fragment: &str) -> Option<PathBuf> {
    let hash = fs::read_to_string(cache_key_file(id, fragment)).ok()?;
    Some(cached_image(id, hash.trim())).filter(|p| p.is_file())
}

/// Identify an arbitrary tree by its location: bisection rebuilds the same
/// tree in place, and reusing its O= directory keeps each step incremental.
pub fn tree_source(tree: &Path) -> Result<(String, PathBuf)> {
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

/// A Debian source release, extracted once into the cache: its id and
/// source directory.
pub fn debian_source(release: &Release) -> Result<(String, PathBuf)> {
    let tarball = debian::tarball(release)?;
    let src = extract(&tarball)?;
    Ok((tarball.id, src))
}

fn extract(tarball: &Tarball) -> Result<PathBuf> {
    util::ensure_requirements(&[req("tar", "tar"), req("xz", "xz-utils")])?;
    let src_root = util::cache_dir().join("src");
    let src = src_root.join(&tarball.id);
    if src.join("Makefile").is_file() {
        return Ok(src);
    }

    eprintln!("xtask: extracting {} into {}", tarball.path.display(), src.display());
    let partial = src_root.join(format!(".partial-{}", tarball.id));
    if partial.exists() {
        fs::remove_dir_all(&partial).map_err(io_err(&partial))?;
    }
    util::create_dir_all(&partial)?;
    util::run(Command::new("tar").arg("-xf").arg(&tarball.path).arg("-C").arg(&partial))?;
    let top = partial.join(&tarball.top);
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
    // allnoconfig with the recipe as its preset: the recipe's options and
    // what they select, everything else off, dependencies resolved by Kconfig.
    quiet(
        Command::new("make")
            .arg("-C")
            .arg(src)
            .arg(format!("O={}", out.display()))
            .arg(format!("KCONFIG_ALLCONFIG={}", fragment.display()))
            .arg(CONFIG_BASE),
    )?;
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
