//! The source tree's imports run one way: no module of `src/` uses, directly or through
//! others, a module that uses it, between files and between the top-level components. A
//! circle makes a newcomer read everything to change anything, and it is how a read side
//! starts to know its consumers' tables; this test names the circle when one appears.
//!
//! It reads the source text: every `crate::a::b` and `super::b` path outside `#[cfg(test)]`
//! code, resolved to the deepest module file it names. A file using its own ancestors (a
//! component's shared types, declared in `query.rs` and used by `query/tables.rs`) is how
//! Rust modules are built and is not counted.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// A module path: `["query", "tables"]` for `src/query/tables.rs`.
type Module = Vec<String>;

fn modules(src: &Path) -> BTreeMap<Module, PathBuf> {
    let mut found = BTreeMap::new();
    let mut dirs = vec![src.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let relative = path.strip_prefix(src).unwrap().with_extension("");
                let module: Module = relative
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
                    .collect();
                if module != ["main"] && module != ["lib"] {
                    found.insert(module, path);
                }
            }
        }
    }
    found
}

/// The text of a file without its `#[cfg(test)]` module and without comments.
fn code(text: &str) -> String {
    let text = match text.find("#[cfg(test)]\nmod tests") {
        Some(at) => &text[..at],
        None => text,
    };
    text.lines()
        .filter(|line| !line.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Every module path the code names: `crate::a::b…`, `super::b…`, and the members of
/// `use super::{b, c::d}` groups, as absolute paths (possibly going past a module into an
/// item, which resolution cuts off).
fn named_paths(module: &Module, code: &str) -> Vec<Module> {
    let parent: Module = module[..module.len() - 1].to_vec();
    let mut paths = Vec::new();
    for (prefix, base) in [("crate::", Vec::new()), ("super::", parent)] {
        let mut rest = code;
        while let Some(at) = rest.find(prefix) {
            let preceded = rest[..at]
                .chars()
                .next_back()
                .is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':');
            rest = &rest[at + prefix.len()..];
            if preceded {
                continue;
            }
            if let Some(group) = rest.strip_prefix('{') {
                let end = group.find('}').unwrap_or(group.len());
                for member in group[..end].split(',') {
                    let mut path = base.clone();
                    path.extend(segments(member.trim()));
                    paths.push(path);
                }
            } else {
                let mut path = base.clone();
                path.extend(segments(rest));
                paths.push(path);
            }
        }
    }
    paths
}

fn segments(text: &str) -> Vec<String> {
    let end = text
        .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
        .unwrap_or(text.len());
    text[..end]
        .split("::")
        .filter(|s| !s.is_empty() && *s != "self")
        .map(str::to_string)
        .collect()
}

/// The deepest module of `known` that `path` starts with.
fn resolve(path: &[String], known: &BTreeMap<Module, PathBuf>) -> Option<Module> {
    (1..=path.len())
        .rev()
        .map(|n| path[..n].to_vec())
        .find(|candidate| known.contains_key(candidate))
}

fn file_graph() -> BTreeMap<Module, BTreeSet<Module>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let known = modules(&src);
    let mut graph = BTreeMap::new();
    for (module, path) in &known {
        let text = code(&std::fs::read_to_string(path).unwrap());
        let uses: BTreeSet<Module> = named_paths(module, &text)
            .iter()
            .filter_map(|path| resolve(path, &known))
            .filter(|used| used != module && !module.starts_with(used))
            .collect();
        graph.insert(module.clone(), uses);
    }
    graph
}

/// A circle of `graph`, if it has one, as the nodes along it.
fn circle<N: Ord + Clone>(graph: &BTreeMap<N, BTreeSet<N>>) -> Option<Vec<N>> {
    fn visit<N: Ord + Clone>(
        node: &N,
        graph: &BTreeMap<N, BTreeSet<N>>,
        path: &mut Vec<N>,
        done: &mut BTreeSet<N>,
    ) -> Option<Vec<N>> {
        if let Some(at) = path.iter().position(|n| n == node) {
            let mut found = path[at..].to_vec();
            found.push(node.clone());
            return Some(found);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.clone());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(found) = visit(next, graph, path, done) {
                return Some(found);
            }
        }
        path.pop();
        done.insert(node.clone());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|node| visit(node, graph, &mut Vec::new(), &mut done))
}

fn show(circle: &[Module]) -> String {
    circle
        .iter()
        .map(|m| m.join("::"))
        .collect::<Vec<_>>()
        .join(" -> ")
}

#[test]
fn no_file_imports_itself_through_others() {
    let graph = file_graph();
    assert!(graph.len() > 50, "the source tree was not read");
    if let Some(found) = circle(&graph) {
        panic!("an import circle between files: {}", show(&found));
    }
}

#[test]
fn the_components_depend_one_way() {
    let mut components: BTreeMap<Module, BTreeSet<Module>> = BTreeMap::new();
    for (module, uses) in file_graph() {
        let top = vec![module[0].clone()];
        let entry = components.entry(top.clone()).or_default();
        entry.extend(
            uses.into_iter()
                .map(|used| vec![used[0].clone()])
                .filter(|used| *used != top),
        );
    }
    if let Some(found) = circle(&components) {
        panic!("an import circle between components: {}", show(&found));
    }
}

/// The reader itself: a circle planted in text is found, and a use of an ancestor is not one.
#[test]
fn the_reader_finds_a_planted_circle() {
    let module = |path: &str| -> Module { path.split("::").map(str::to_string).collect() };
    let named = named_paths(
        &module("query::tables"),
        "use super::{answer, bounds::Refusal};\nlet x = crate::activation::store::Store::open();",
    );
    assert_eq!(
        named,
        vec![
            module("activation::store::Store::open"),
            module("query::answer"),
            module("query::bounds::Refusal"),
        ]
    );
    let graph: BTreeMap<Module, BTreeSet<Module>> = [
        (module("a"), BTreeSet::from([module("b")])),
        (module("b"), BTreeSet::from([module("c")])),
        (module("c"), BTreeSet::from([module("a")])),
    ]
    .into();
    assert_eq!(show(&circle(&graph).unwrap()), "a -> b -> c -> a");
}
