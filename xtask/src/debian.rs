//! Debian's kernel sources by version (`--debian 7.3`): the installed
//! `linux-source-X.Y` package when there is one, otherwise the package
//! fetched with `apt-get download` under a private apt configuration kept in
//! the cache. The system's apt sources are never touched.

use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::str::FromStr;

use crate::error::{Error, Result};
use crate::util::{self, io_err, req};

/// Suites searched by the private configuration, oldest first; apt picks the
/// newest version of the requested package among them.
const SUITES: &[&str] =
    &["bookworm", "bookworm-updates", "bookworm-backports", "trixie", "trixie-updates", "trixie-backports", "sid"];
/// The security suites, on the security archive: stable kernel updates
/// (6.12.118 among them) arrive there first, so without them two machines
/// could test different "6.12"s under one name.
const SECURITY_SUITES: &[&str] = &["bookworm-security", "trixie-security"];
const KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";
/// Overrides the mirror taken from the system's apt configuration.
pub const MIRROR_VAR: &str = "KVM_SELFTESTS_DEBIAN_MIRROR";
/// Overrides the security archive (else the system's, else the mirror's
/// `-security` sibling).
pub const SECURITY_MIRROR_VAR: &str = "KVM_SELFTESTS_DEBIAN_SECURITY_MIRROR";

/// A Debian kernel source release, `MAJOR.MINOR` as in `linux-source-7.3`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Release {
    major: u32,
    minor: u32,
}

impl Release {
    /// The suite's default guest kernel.
    pub const DEFAULT: Release = Release { major: 6, minor: 12 };

    pub fn package(&self) -> String {
        format!("linux-source-{self}")
    }

    fn installed_tarball(&self) -> PathBuf {
        PathBuf::from(format!("/usr/src/{}.tar.xz", self.package()))
    }
}

impl fmt::Display for Release {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

impl FromStr for Release {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let bad = || format!("a Debian kernel release is MAJOR.MINOR, like 6.12 or 7.3 (got `{s}`)");
        let (major, minor) = s.split_once('.').ok_or_else(bad)?;
        let num = |v: &str| v.parse::<u32>().ok().filter(|_| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()));
        Ok(Release { major: num(major).ok_or_else(bad)?, minor: num(minor).ok_or_else(bad)? })
    }
}

/// The source tarball of a release and the identity of its package version
/// (`linux-source-7.3_7.3.4-1_bpo13_1`), which keys the cache.
#[derive(Debug)]
pub struct Tarball {
    pub id: String,
    pub path: PathBuf,
    /// The top directory inside the tarball.
    pub top: String,
    /// `linux-source-6.12 6.12.118-1~deb12u1`: what a report names.
    pub package_version: String,
    /// The package's Debian changelog, which lists every stable update's
    /// subjects: the evidence of which upstream changes the source carries.
    pub changelog: PathBuf,
}

/// Find the release's tarball: installed by dpkg, or fetched into the cache.
pub fn tarball(release: &Release) -> Result<Tarball> {
    let package = release.package();
    let top = package.clone();
    let installed = release.installed_tarball();
    if installed.is_file() {
        if let Some(version) = installed_version(&package) {
            return Ok(Tarball {
                id: util::sanitize(&format!("{package}_{version}")),
                path: installed,
                top,
                package_version: format!("{package} {version}"),
                changelog: PathBuf::from(format!("/usr/share/doc/{package}/changelog.Debian.gz")),
            });
        }
    }
    util::ensure_requirements(&[req("apt-get", "apt"), req("dpkg-deb", "dpkg")])?;
    let apt = PrivateApt::new(util::cache_dir().join("apt"))?;
    let version = apt.candidate(&package)?;
    let id = util::sanitize(&format!("{package}_{version}"));
    let unpacked = util::cache_dir().join("debs").join(&id);
    let path = unpacked.join("usr/src").join(format!("{package}.tar.xz"));
    if !path.is_file() {
        let deb = apt.download(&package, &version)?;
        unpack(&deb, &unpacked)?;
        fs::remove_file(&deb).map_err(io_err(&deb))?;
        if !path.is_file() {
            return Err(Error::Debian(format!("{} did not contain {}", deb.display(), path.display())));
        }
    }
    let changelog = unpacked.join(format!("usr/share/doc/{package}/changelog.Debian.gz"));
    Ok(Tarball { id, path, top, package_version: format!("{package} {version}"), changelog })
}

fn installed_version(package: &str) -> Option<String> {
    let out = Command::new("dpkg-query").args(["-W", "-f=${Status} ${Version}", package]).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.strip_prefix("install ok installed ").map(|v| v.trim().to_string()).filter(|v| !v.is_empty())
}

/// `dpkg -x` into a temporary directory, renamed into place when complete.
fn unpack(deb: &Path, into: &Path) -> Result<()> {
    let name = into.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let partial = into.with_file_name(format!(".partial-{name}"));
    util::create_dir_all(into.parent().expect("unpacked into a cache subdirectory"))?;
    if partial.exists() {
        fs::remove_dir_all(&partial).map_err(io_err(&partial))?;
    }
    util::run(Command::new("dpkg").arg("-x").arg(deb).arg(&partial))?;
    if into.exists() {
        fs::remove_dir_all(into).map_err(io_err(into))?;
    }
    fs::rename(&partial, into).map_err(io_err(into))
}

/// apt with its own sources list, lists and cache directories.
struct PrivateApt {
    dir: PathBuf,
}

impl PrivateApt {
    fn new(dir: PathBuf) -> Result<Self> {
        for sub in ["etc/preferences.d", "lists/partial", "cache/archives/partial", "download"] {
            util::create_dir_all(&dir.join(sub))?;
        }
        let mirror = mirror()?;
        let security = security_mirror(&mirror);
        let sources: String = SUITES
            .iter()
            .map(|s| (&mirror, s))
            .chain(SECURITY_SUITES.iter().map(|s| (&security, s)))
            .map(|(m, s)| format!("deb [signed-by={KEYRING}] {m} {s} main\n"))
            .collect();
        let list = dir.join("etc/sources.list");
        if fs::read_to_string(&list).ok().as_deref() != Some(sources.as_str()) {
            fs::write(&list, sources).map_err(io_err(&list))?;
            // New sources make old lists meaningless.
            let stamp = dir.join("lists/.updated");
            let _ = fs::remove_file(stamp);
        }
        Ok(PrivateApt { dir })
    }

    fn command(&self, program: &str) -> Command {
        let d = |sub: &str| self.dir.join(sub).display().to_string();
        let mut cmd = Command::new(program);
        for (key, value) in [
            ("Dir::Etc::SourceList", d("etc/sources.list")),
            ("Dir::Etc::SourceParts", "/dev/null".into()),
            ("Dir::Etc::Preferences", "/dev/null".into()),
            ("Dir::Etc::PreferencesParts", d("etc/preferences.d")),
            ("Dir::State::Lists", d("lists")),
            ("Dir::Cache", d("cache")),
            ("Acquire::Languages", "none".into()),
            ("APT::Get::List-Cleanup", "false".into()),
        ] {
            cmd.arg("-o").arg(format!("{key}={value}"));
        }
        if util::is_root() {
            // apt drops to _apt for downloads, which cannot write our cache.
            cmd.args(["-o", "APT::Sandbox::User=root"]);
        }
        cmd
    }

    /// Refresh the lists unless that happened in the last day.
    fn update(&self, force: bool) -> Result<()> {
        let stamp = self.dir.join("lists/.updated");
        let fresh = fs::metadata(&stamp)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age.as_secs() < 24 * 3600);
        if fresh && !force {
            return Ok(());
        }
        eprintln!("xtask: updating the private apt lists in {}", self.dir.display());
        util::output(self.command("apt-get").args(["-qq", "update"]))
            .map_err(|e| Error::Debian(format!("apt-get update with the private sources failed: {e}")))?;
        fs::write(&stamp, b"").map_err(io_err(&stamp))
    }

    /// The version apt would download, refreshing stale lists once.
    fn candidate(&self, package: &str) -> Result<String> {
        self.update(false)?;
        if let Some(v) = self.policy_candidate(package)? {
            return Ok(v);
        }
        self.update(true)?;
        self.policy_candidate(package)?.ok_or_else(|| {
            Error::Debian(format!(
                "no suite of {} ({}) has the package {package}; `apt-cache policy` there shows no candidate",
                mirror().unwrap_or_default(),
                SUITES.iter().chain(SECURITY_SUITES).copied().collect::<Vec<_>>().join(", ")
            ))
        })
    }

    fn policy_candidate(&self, package: &str) -> Result<Option<String>> {
        let text = util::output(self.command("apt-cache").args(["policy", package]))?;
        Ok(text
            .lines()
            .find_map(|l| l.trim().strip_prefix("Candidate:"))
            .map(str::trim)
            .filter(|v| *v != "(none)" && !v.is_empty())
            .map(String::from))
    }

    fn download(&self, package: &str, version: &str) -> Result<PathBuf> {
        let dir = self.dir.join("download");
        eprintln!("xtask: downloading {package} {version}");
        util::run(
            self.command("apt-get").current_dir(&dir).args(["-qq", "download"]).arg(format!("{package}={version}")),
        )
        .map_err(|e| Error::Debian(format!("apt-get download {package}={version} failed: {e}")))?;
        let prefix = format!("{package}_");
        let found = fs::read_dir(&dir).map_err(io_err(&dir))?.filter_map(|e| e.ok().map(|e| e.path())).find(|p| {
            p.file_name().is_some_and(|n| {
                let n = n.to_string_lossy();
                n.starts_with(&prefix) && n.ends_with(".deb")
            })
        });
        found.ok_or_else(|| Error::Debian(format!("apt-get download left no {package}_*.deb in {}", dir.display())))
    }
}

/// The Debian mirror: `KVM_SELFTESTS_DEBIAN_MIRROR`, else the one the
/// system's apt already uses for Debian's main archive.
fn mirror() -> Result<String> {
    if let Some(m) = std::env::var(MIRROR_VAR).ok().filter(|m| !m.trim().is_empty()) {
        return Ok(m.trim().to_string());
    }
    system_archive("Debian").ok_or_else(|| {
        Error::Debian(format!(
            "the system's apt sources name no Debian main archive (after `apt-get update`); set {MIRROR_VAR} to a \
                 Debian mirror URL"
        ))
    })
}

/// The security archive: `KVM_SELFTESTS_DEBIAN_SECURITY_MIRROR`, else the
/// system's, else the main mirror's sibling (`.../debian-security`).
fn security_mirror(mirror: &str) -> String {
    if let Some(m) = std::env::var(SECURITY_MIRROR_VAR).ok().filter(|m| !m.trim().is_empty()) {
        return m.trim().to_string();
    }
    system_archive("Debian-Security").unwrap_or_else(|| format!("{mirror}-security"))
}

/// The URI the system's apt uses for the archive labelled `label`.
fn system_archive(label: &str) -> Option<String> {
    let text =
        util::output(Command::new("apt-get").args(["indextargets", "--format", "$(REPO_URI) $(LABEL) $(IDENTIFIER)"]))
            .unwrap_or_default();
    text.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let (uri, found, id) = (f.next()?, f.next()?, f.next()?);
        (found == label && id == "Packages").then(|| uri.trim_end_matches('/').to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn releases_parse_and_bad_ones_are_named() {
        assert_eq!("7.3".parse::<Release>().unwrap().package(), "linux-source-7.3");
        assert_eq!("6.12".parse::<Release>().unwrap(), Release::DEFAULT);
        for bad in ["7", "7.", ".3", "7.3.4", "v7.3", "7.x", "+7.3"] {
            let e = bad.parse::<Release>().unwrap_err();
            assert!(e.contains(&format!("(got `{bad}`)")), "{e}");
        }
    }
}
