//! The kernel configuration recipe (`xtask/kernel.config`), resolved against
//! the symbols a tree's Kconfig defines.
//!
//! A required line may name alternatives for an option upstream renamed,
//! `CONFIG_KVM_GUEST_MEMFD=y | CONFIG_KVM_PRIVATE_MEM=y`: the first one the
//! tree defines is the one required. The choice comes from the tree, never
//! from a version string, so the recipe holds across renames and backports.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::util::io_err;

/// The `config`/`menuconfig` symbols of a tree.
#[derive(Debug, Default)]
pub struct KconfigSymbols(HashSet<String>);

impl KconfigSymbols {
    pub fn of_tree(src: &Path) -> Result<Self> {
        let mut symbols = KconfigSymbols::default();
        let mut dirs = vec![src.to_path_buf()];
        while let Some(dir) = dirs.pop() {
            for entry in fs::read_dir(&dir).map_err(io_err(&dir))? {
                let entry = entry.map_err(io_err(&dir))?;
                let name = entry.file_name();
                let name = name.to_string_lossy();
                let kind = entry.file_type().map_err(io_err(&entry.path()))?;
                if kind.is_dir() && !name.starts_with('.') {
                    dirs.push(entry.path());
                } else if kind.is_file() && (name == "Kconfig" || name.starts_with("Kconfig.")) {
                    let path = entry.path();
                    // Kconfig files are ASCII in practice; tolerate stray bytes.
                    let bytes = fs::read(&path).map_err(io_err(&path))?;
                    symbols.add_from(&String::from_utf8_lossy(&bytes));
                }
            }
        }
        Ok(symbols)
    }

    fn add_from(&mut self, kconfig: &str) {
        for line in kconfig.lines() {
            let mut words = line.split_whitespace();
            if let (Some("config" | "menuconfig"), Some(name)) = (words.next(), words.next()) {
                self.0.insert(name.to_string());
            }
        }
    }

    fn defines(&self, option: &str) -> bool {
        self.0.contains(option.strip_prefix("CONFIG_").unwrap_or(option))
    }
}

#[cfg(test)]
impl<'a> FromIterator<&'a str> for KconfigSymbols {
    fn from_iter<I: IntoIterator<Item = &'a str>>(iter: I) -> Self {
        KconfigSymbols(iter.into_iter().map(String::from).collect())
    }
}

/// One required option: its name and value, `None` meaning "is not set".
#[derive(Debug, Clone, PartialEq, Eq)]
struct Required {
    name: String,
    value: Option<String>,
}

impl Required {
    fn parse(text: &str) -> Option<Required> {
        let text = text.trim();
        if let Some(name) = text.strip_prefix("# ").and_then(|l| l.strip_suffix(" is not set")) {
            return Some(Required { name: name.to_string(), value: None });
        }
        let (name, value) = text.split_once('=')?;
        name.starts_with("CONFIG_").then(|| Required { name: name.to_string(), value: Some(value.to_string()) })
    }

    fn line(&self) -> String {
        match &self.value {
            Some(v) => format!("{}={v}", self.name),
            None => format!("# {} is not set", self.name),
        }
    }
}

/// The fragment as it applies to one tree.
#[derive(Debug)]
pub struct Recipe {
    /// The fragment handed to `merge_config.sh`, alternatives resolved.
    pub text: String,
    required: Vec<Required>,
}

impl Recipe {
    /// Resolve the fragment's alternatives against `symbols`. A required
    /// option the tree does not define at all makes the tree untestable.
    pub fn resolve(fragment: &str, symbols: &KconfigSymbols) -> Result<Recipe> {
        let mut in_required = false;
        let mut text = String::new();
        let mut required = Vec::new();
        let mut absent = Vec::new();
        for line in fragment.lines() {
            match line.trim() {
                "# xtask: required" => in_required = true,
                "# xtask: best-effort" => in_required = false,
                _ => {}
            }
            let alternatives: Vec<Required> =
                if in_required { line.split(" | ").filter_map(Required::parse).collect() } else { Vec::new() };
            if alternatives.is_empty() {
                text.push_str(line);
                text.push('\n');
                continue;
            }
            match alternatives.iter().find(|a| symbols.defines(&a.name)) {
                Some(chosen) => {
                    text.push_str(&chosen.line());
                    text.push('\n');
                    required.push(chosen.clone());
                }
                None => absent.push(alternatives.iter().map(|a| a.name.as_str()).collect::<Vec<_>>().join(" or ")),
            }
        }
        if absent.is_empty() {
            Ok(Recipe { text, required })
        } else {
            Err(Error::TreeLacksOptions(absent))
        }
    }

    /// Check that every required option made it into `.config`.
    pub fn verify(&self, config: &Path) -> Result<()> {
        let text = fs::read_to_string(config).map_err(io_err(config))?;
        self.verify_text(&text).map_err(|options| Error::ConfigNotApplied { config: PathBuf::from(config), options })
    }

    fn verify_text(&self, config: &str) -> std::result::Result<(), Vec<String>> {
        let actual: HashMap<&str, &str> =
            config.lines().filter_map(|l| l.split_once('=')).filter(|(n, _)| n.starts_with("CONFIG_")).collect();
        let missing: Vec<String> = self
            .required
            .iter()
            .filter(|r| actual.get(r.name.as_str()).copied() != r.value.as_deref())
            .map(|r| match (&r.value, actual.get(r.name.as_str())) {
                (Some(w), Some(a)) => format!("{}={w} (got {a})", r.name),
                (Some(w), None) => format!("{}={w} (not set)", r.name),
                (None, Some(a)) => format!("{} unset (got {a})", r.name),
                (None, None) => unreachable!("filtered out above"),
            })
            .collect();
        if missing.is_empty() {
            Ok(())
        } else {
            Err(missing)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::fragment_path;

    const FRAG: &str = "CONFIG_A=y\n# xtask: required\nCONFIG_B=y\n# CONFIG_C is not set\n\
                        CONFIG_NEW=y | CONFIG_OLD=y\n# comment\n# xtask: best-effort\nCONFIG_D=y\n";

    #[test]
    fn alternatives_resolve_to_the_symbol_the_tree_defines() {
        let new_tree: KconfigSymbols = ["A", "B", "C", "D", "NEW"].into_iter().collect();
        let recipe = Recipe::resolve(FRAG, &new_tree).unwrap();
        assert!(recipe.text.contains("\nCONFIG_NEW=y\n# comment\n"), "{}", recipe.text);
        let old_tree: KconfigSymbols = ["A", "B", "C", "D", "OLD"].into_iter().collect();
        let recipe = Recipe::resolve(FRAG, &old_tree).unwrap();
        assert!(recipe.text.contains("\nCONFIG_OLD=y\n"), "{}", recipe.text);
        assert!(!recipe.text.contains("NEW"), "{}", recipe.text);
        // Only the required section is checked afterwards.
        assert_eq!(recipe.required.len(), 3);
    }

    #[test]
    fn a_tree_without_a_required_symbol_is_named_untestable() {
        let tree: KconfigSymbols = ["A", "C"].into_iter().collect();
        let err = Recipe::resolve(FRAG, &tree).unwrap_err();
        assert!(err.is_kernel_fault(), "{err}");
        assert!(err.to_string().contains("CONFIG_B, CONFIG_NEW or CONFIG_OLD"), "{err}");
    }

    #[test]
    fn verify_names_options_that_did_not_stick() {
        let tree: KconfigSymbols = ["A", "B", "C", "D", "NEW"].into_iter().collect();
        let recipe = Recipe::resolve(FRAG, &tree).unwrap();
        let missing = recipe.verify_text("CONFIG_B=m\nCONFIG_C=y\n").unwrap_err();
        assert_eq!(missing, ["CONFIG_B=y (got m)", "CONFIG_C unset (got y)", "CONFIG_NEW=y (not set)"]);
        assert!(recipe.verify_text("CONFIG_B=y\nCONFIG_NEW=y\n").is_ok());
    }

    #[test]
    fn kconfig_parsing_finds_config_and_menuconfig() {
        let mut s = KconfigSymbols::default();
        s.add_from("config KVM\n\tbool\nmenuconfig VIRTUALIZATION\n  config   KVM_SMM\n# config NOPE x\n");
        assert!(s.defines("CONFIG_KVM") && s.defines("VIRTUALIZATION") && s.defines("KVM_SMM"));
        assert!(!s.defines("NOPE"));
    }

    /// Every symbol the fragment names but `absent`: a tree that defines
    /// the others (one name of a renamed option missing).
    fn fragment_symbols_except<'a>(frag: &'a str, absent: &str) -> Vec<&'a str> {
        frag.lines()
            .flat_map(|l| l.split(" | "))
            .filter_map(|l| l.trim().trim_start_matches("# ").split(['=', ' ']).next())
            .filter_map(|n| n.strip_prefix("CONFIG_"))
            .filter(|n| *n != absent)
            .collect()
    }

    #[test]
    fn shipped_fragment_requires_protected_vms_and_guest_memfd_under_either_name() {
        let frag = fs::read_to_string(fragment_path()).unwrap();
        for (guest_memfd, absent) in [("KVM_GUEST_MEMFD", "KVM_PRIVATE_MEM"), ("KVM_PRIVATE_MEM", "KVM_GUEST_MEMFD")] {
            let mut names = fragment_symbols_except(&frag, absent);
            names.push(guest_memfd);
            let recipe = Recipe::resolve(&frag, &names.into_iter().collect()).unwrap();
            let sw = Required { name: "CONFIG_KVM_SW_PROTECTED_VM".into(), value: Some("y".into()) };
            assert!(recipe.required.contains(&sw));
            assert!(recipe.text.contains(&format!("\nCONFIG_{guest_memfd}=y\n")));
        }
    }

    #[test]
    fn shipped_fragment_requires_memory_attributes_under_either_name() {
        // 7.4 renamed KVM_GENERIC_MEMORY_ATTRIBUTES to KVM_VM_MEMORY_ATTRIBUTES
        // (no alias): a tree with either name is testable, one with the new
        // name requires the new one.
        let frag = fs::read_to_string(fragment_path()).unwrap();
        for (attributes, absent) in [
            ("KVM_VM_MEMORY_ATTRIBUTES", "KVM_GENERIC_MEMORY_ATTRIBUTES"),
            ("KVM_GENERIC_MEMORY_ATTRIBUTES", "KVM_VM_MEMORY_ATTRIBUTES"),
        ] {
            let names = fragment_symbols_except(&frag, absent);
            let recipe = Recipe::resolve(&frag, &names.into_iter().collect()).unwrap();
            let required = Required { name: format!("CONFIG_{attributes}"), value: Some("y".into()) };
            assert!(recipe.required.contains(&required), "{attributes}");
            assert!(!recipe.text.contains(&format!("CONFIG_{absent}=")), "{absent}");
        }
    }
}
