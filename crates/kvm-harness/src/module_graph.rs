//! The crate's modules can be read bottom-up: no module depends, directly
//! or through others, on itself, and `error` depends on nothing in the
//! crate. Checked here over the source text so that it stays true.
//!
//! A module depends on another when it names it (`crate::other::..`, or
//! `other` inside `use crate::{..}`), and when it calls a method that the
//! other module adds to one of its types in an `impl` block of its own
//! (such as `impl Vcpu` in `vcpu_state.rs`): that call is a dependency no
//! `use` line shows. Unit tests (`#[cfg(test)]` to the end of a file) are
//! left out, since they may use anything.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Each module's source without its unit tests and line comments.
fn sources() -> BTreeMap<String, String> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut modules = BTreeMap::new();
    for entry in std::fs::read_dir(&dir).expect("read src/") {
        let path = entry.expect("dir entry").path();
        let name = path.file_stem().and_then(|s| s.to_str()).expect("utf-8 name").to_string();
        if path.extension().is_none_or(|e| e != "rs") || name == "lib" {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("read module");
        let text = text.split("#[cfg(test)]").next().unwrap_or_default();
        let code: Vec<&str> = text.lines().map(|l| l.split("//").next().unwrap_or_default()).collect();
        modules.insert(name, code.join("\n"));
    }
    modules
}

fn ident_at(s: &str) -> &str {
    let end = s.find(|c: char| !(c.is_alphanumeric() || c == '_')).unwrap_or(s.len());
    &s[..end]
}

/// The modules `source` names through `crate::`.
fn named(source: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for (at, _) in source.match_indices("crate::") {
        let rest = &source[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let group = &group[..group.find('}').unwrap_or(group.len())];
            names.extend(group.split(',').map(|p| ident_at(p.trim()).to_string()));
        } else {
            names.insert(ident_at(rest).to_string());
        }
    }
    names
}

/// The edges: module -> the modules it depends on.
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let sources = sources();
    // Where each type is defined, and the methods other modules add to it.
    let mut defined_in = BTreeMap::new();
    for (module, source) in &sources {
        for line in source.lines() {
            for keyword in ["pub struct ", "pub(crate) struct ", "struct ", "pub enum ", "enum "] {
                if let Some(rest) = line.strip_prefix(keyword) {
                    defined_in.insert(ident_at(rest).to_string(), module.clone());
                }
            }
        }
    }
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (module, source) in &sources {
        let deps = named(source).into_iter().filter(|d| d != module && sources.contains_key(d));
        graph.entry(module.clone()).or_default().extend(deps);
    }
    for (module, source) in &sources {
        let mut lines = source.lines();
        while let Some(line) = lines.next() {
            let Some(ty) = line.strip_prefix("impl ").map(ident_at) else { continue };
            let block: Vec<&str> = lines.by_ref().take_while(|l| *l != "}").collect();
            let Some(owner) = defined_in.get(ty).filter(|owner| *owner != module) else { continue };
            for l in block {
                let Some(at) = l.find("fn ") else { continue };
                let method = ident_at(&l[at + 3..]);
                if sources[owner].contains(&format!(".{method}(")) {
                    graph.entry(owner.clone()).or_default().insert(module.clone());
                }
            }
        }
    }
    graph
}

/// The modules that reach themselves again, as the cycles found.
fn cycles(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    let mut found = Vec::new();
    for start in graph.keys() {
        // Depth-first from `start`, keeping the path, looking for `start`.
        let mut stack = vec![(start.clone(), vec![start.clone()])];
        let mut seen = BTreeSet::new();
        while let Some((at, path)) = stack.pop() {
            for next in graph.get(&at).into_iter().flatten() {
                if next == start {
                    found.push(path.clone());
                } else if seen.insert(next.clone()) {
                    stack.push((next.clone(), [path.clone(), vec![next.clone()]].concat()));
                }
            }
        }
    }
    found
}

#[test]
fn no_module_depends_on_itself_through_others() {
    let graph = graph();
    assert!(graph.len() > 20, "found only {:?}", graph.keys());
    assert_eq!(cycles(&graph), Vec::<Vec<String>>::new(), "import cycles in {graph:#?}");
}

#[test]
fn the_error_type_depends_on_nothing_in_the_crate() {
    assert_eq!(graph()["error"], BTreeSet::new());
}

#[test]
fn a_cycle_is_found() {
    let edges = [("a", "b"), ("b", "c"), ("c", "a"), ("c", "d")];
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (from, to) in edges {
        graph.entry(from.into()).or_default().insert(to.into());
    }
    assert_eq!(cycles(&graph).len(), 3, "each of a, b, c reaches itself");
    assert_eq!(named("use crate::{uapi, watchdog};\nlet d = crate::vm::dead();"), {
        ["uapi", "watchdog", "vm"].into_iter().map(String::from).collect::<BTreeSet<_>>()
    });
}
