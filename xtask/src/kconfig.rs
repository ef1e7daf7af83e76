//! `cargo xtask kernel-config`: the recipe (`xtask/kernel.config`) as a
//! plain `CONFIG_X=y` fragment, the form every other tool takes
//! (`merge_config.sh`, `vng --config`, tuxmake `--kconfig-add`, KernelCI
//! fragments), resolved against one or more kernel trees. The checked-in
//! `configs/kvm-private-mem.config` is its output for the default kernels.

use crate::debian::Release;
use crate::error::{Error, Result};
use crate::kernel::{self, Source};
use crate::recipe::{KconfigSymbols, Recipe};

/// How a source is named on the command line, for the header.
fn flag(source: &Source) -> String {
    match source {
        Source::Debian(release) => format!("--debian {release}"),
        Source::Tree(tree) => format!("--tree {}", tree.display()),
    }
}

/// Resolve the recipe for each source and print the plain fragment.
pub fn print(sources: &[Source]) -> Result<()> {
    let default = [Source::Debian(Release::DEFAULT)];
    let sources = if sources.is_empty() { &default[..] } else { sources };
    let fragment_file = kernel::fragment_path();
    let fragment = std::fs::read_to_string(&fragment_file).map_err(crate::util::io_err(&fragment_file))?;
    let mut recipes = Vec::new();
    for source in sources {
        let (_, src) = match source {
            Source::Debian(release) => kernel::debian_source(release)?,
            Source::Tree(tree) => kernel::tree_source(tree)?,
        };
        recipes.push(Recipe::resolve(&fragment, &KconfigSymbols::of_tree(&src)?)?);
    }
    let flags: Vec<String> = sources.iter().map(flag).collect();
    print!("{}", plain(&flags, &recipes)?);
    Ok(())
}

/// The lines of a resolved recipe that set an option, and the marker of
/// its best-effort section, in order; the recipe's comments are about
/// xtask's syntax and stay behind.
fn option_lines(recipe: &Recipe) -> Vec<&str> {
    recipe
        .text
        .lines()
        .map(str::trim)
        .filter(|l| {
            l.starts_with("CONFIG_") || (l.starts_with("# CONFIG_") && l.ends_with(" is not set")) || *l == BEST_EFFORT
        })
        .collect()
}

const BEST_EFFORT: &str = "# xtask: best-effort";

/// The fragment for all `recipes` at once (resolutions of one recipe for
/// different trees): where the trees name an option differently (upstream
/// renamed it), every name any of them chose, in the recipe's order; a
/// tree's Kconfig ignores the names it does not define.
pub fn plain(flags: &[String], recipes: &[Recipe]) -> Result<String> {
    let per_tree: Vec<Vec<&str>> = recipes.iter().map(option_lines).collect();
    let Some(first) = per_tree.first() else {
        return Err(Error::Usage("kernel-config: no kernel to resolve the recipe for".into()));
    };
    // One resolution yields one line per recipe line, so the lists align.
    if let Some(other) = per_tree.iter().find(|lines| lines.len() != first.len()) {
        return Err(Error::Config(format!(
            "kernel-config: resolutions of one recipe differ in length ({} and {} lines)",
            first.len(),
            other.len()
        )));
    }
    let mut out = header(flags);
    out.push_str("# Required: `cargo xtask kernel` fails when one does not stick.\n");
    // Each line once: a renamed option's old name may also be a line of
    // its own (MIGRATION, before NUMA_MIGRATION | MIGRATION).
    let mut seen: Vec<&str> = Vec::new();
    for i in 0..first.len() {
        for lines in &per_tree {
            let line = lines[i];
            if seen.contains(&line) {
                continue;
            }
            seen.push(line);
            if line == BEST_EFFORT {
                out.push_str("# Best effort: wanted, not checked.\n");
            } else {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    Ok(out)
}

fn header(flags: &[String]) -> String {
    let base = kernel::CONFIG_BASE;
    format!(
        "# Kernel config fragment for kvm-private-mem-selftests, generated from\n\
         # xtask/kernel.config by `cargo xtask kernel-config {}`.\n\
         #\n\
         # Base: {base}. This is what `cargo xtask kernel` builds:\n\
         #   make {base} KCONFIG_ALLCONFIG=<this file>\n\
         #   scripts/kconfig/merge_config.sh -n <this file>   (the same, {base} base)\n\
         # On x86_64_defconfig (merge_config.sh without -n, vng --config,\n\
         # tuxmake --kconfig-add) it only adds options.\n\
         #\n\
         # Where upstream renamed an option, every name the kernels above use is\n\
         # listed; Kconfig ignores a name its tree does not define.\n\
         # Upstream's tools/testing/selftests/kvm/config lacks\n\
         # CONFIG_KVM_SW_PROTECTED_VM: a kernel built from it alone cannot\n\
         # create the protected VMs these tests need.\n\
         #\n",
        flags.join(" ")
    )
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::path::PathBuf;

    use super::*;

    /// The checked-in fragment for the default kernels.
    fn checked_in_path() -> PathBuf {
        crate::util::workspace_root().join("configs/kvm-private-mem.config")
    }

    /// The kernels `configs/kvm-private-mem.config` is resolved for, as the
    /// flags that name them (`.ci/run` diffs it against that output).
    const DEFAULT_KERNELS: &[&str] = &["--debian 6.12", "--debian 7.3"];

    const FRAG: &str = "# about xtask\nCONFIG_A=y\n# xtask: required\nCONFIG_B=y\n# CONFIG_C is not set\n\
                        CONFIG_NEW=y | CONFIG_OLD=y\n# comment\n# xtask: best-effort\nCONFIG_D=y\n";

    fn resolve(symbols: &[&str]) -> Recipe {
        Recipe::resolve(FRAG, &symbols.iter().copied().collect()).unwrap()
    }

    fn options(text: &str) -> Vec<&str> {
        text.lines().filter(|l| !l.starts_with('#') || l.ends_with(" is not set")).collect()
    }

    #[test]
    fn one_tree_gets_its_own_names_and_no_xtask_syntax() {
        let text = plain(&["--tree /t".into()], &[resolve(&["A", "B", "C", "D", "NEW"])]).unwrap();
        assert_eq!(options(&text), ["CONFIG_A=y", "CONFIG_B=y", "# CONFIG_C is not set", "CONFIG_NEW=y", "CONFIG_D=y"]);
        assert!(!text.contains(" | ") && !text.contains("xtask: "), "{text}");
        assert!(
            text.contains("cargo xtask kernel-config --tree /t`") && text.contains("# Base: allnoconfig."),
            "{text}"
        );
    }

    #[test]
    fn renamed_options_list_every_name_the_trees_chose_in_recipe_order() {
        let new = resolve(&["A", "B", "C", "D", "NEW", "OLD"]);
        let old = resolve(&["A", "B", "C", "D", "OLD"]);
        let text = plain(&["--debian 6.12".into(), "--debian 7.3".into()], &[old, new]).unwrap();
        assert_eq!(
            options(&text),
            ["CONFIG_A=y", "CONFIG_B=y", "# CONFIG_C is not set", "CONFIG_OLD=y", "CONFIG_NEW=y", "CONFIG_D=y"]
        );
        // The best-effort section is still marked, in plain words.
        let best = text.find("# Best effort").unwrap();
        assert!(best > text.find("CONFIG_NEW=y").unwrap() && best < text.find("CONFIG_D=y").unwrap());
    }

    #[test]
    fn an_option_named_twice_is_printed_once() {
        let frag = "# xtask: required\nCONFIG_M=y\nCONFIG_NM=y | CONFIG_M=y\n";
        let old = Recipe::resolve(frag, &["M"].into_iter().collect()).unwrap();
        let new = Recipe::resolve(frag, &["M", "NM"].into_iter().collect()).unwrap();
        let text = plain(&["--debian 6.12".into(), "--debian 7.3".into()], &[old, new]).unwrap();
        assert_eq!(options(&text), ["CONFIG_M=y", "CONFIG_NM=y"]);
    }

    /// The names of options a fragment line sets: `A=y | B=y` gives both.
    fn names(line: &str) -> Vec<String> {
        line.split(" | ")
            .filter_map(|l| {
                let l = l.trim();
                let l = l.strip_prefix("# ").and_then(|l| l.strip_suffix(" is not set")).unwrap_or(l);
                l.starts_with("CONFIG_").then(|| l.split('=').next().unwrap_or(l).to_string())
            })
            .collect()
    }

    /// Cheap drift check (the exact one, which needs both Debian trees, is
    /// `.ci/run`'s diff against `kernel-config --debian 6.12 --debian 7.3`):
    /// every option line of the recipe has at least one of its names in the
    /// checked-in fragment, and the fragment names nothing the recipe does not.
    #[test]
    fn checked_in_fragment_covers_every_option_of_the_recipe() {
        let recipe = fs::read_to_string(kernel::fragment_path()).unwrap();
        let checked_in = fs::read_to_string(checked_in_path()).unwrap();
        let ours: Vec<String> = checked_in.lines().flat_map(names).collect();
        let mut all = Vec::new();
        for line in recipe.lines() {
            let alternatives = names(line);
            if !alternatives.is_empty() && !alternatives.iter().any(|n| ours.contains(n)) {
                panic!("{} lacks `{line}`: regenerate it with cargo xtask kernel-config", checked_in_path().display());
            }
            all.extend(alternatives);
        }
        let extra: Vec<&String> = ours.iter().filter(|n| !all.contains(n)).collect();
        assert!(extra.is_empty(), "not in the recipe: {extra:?}");
        let flags = DEFAULT_KERNELS.join(" ");
        assert!(checked_in.contains(&format!("kernel-config {flags}`")), "made for {flags}");
    }
}
