//! The crate's shape, checked: `lb/src` is five planes, each importing only
//! the planes below it, and no two modules import each other (directly or
//! round a longer loop). A parent module and its own children may use each
//! other's items (a trait in `sources/mod.rs`, its impls in
//! `sources/consul.rs`); that is one module split over files, not a circle.
//! Unit tests are not counted: a test may build its fixtures from anything.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The planes, bottom first: a file in one may import from it and those
/// before it.
const PLANES: [&str; 5] = ["settings", "balance", "sources", "dataplane", "control"];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `settings/file.rs` → `settings::file`; `control/ha/mod.rs` → `control::ha`.
fn module_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).unwrap().with_extension("");
    let mut parts: Vec<String> = rel.iter().map(|p| p.to_string_lossy().into_owned()).collect();
    if parts.last().is_some_and(|p| p == "mod") {
        parts.pop();
    }
    parts.join("::")
}

/// The modules a file (of module `module`) names with `crate::…` and
/// `super::…` paths, outside comments: the longest prefix of each path that
/// is a module of the crate.
fn imports(module: &str, text: &str, modules: &BTreeSet<String>) -> BTreeSet<String> {
    let parent = module.rsplit_once("::").map_or("", |(p, _)| p);
    let mut found = BTreeSet::new();
    // Unit tests (a file's `#[cfg(test)]` modules, at its end) may reach
    // for whatever builds their fixtures.
    for line in text.lines().take_while(|l| l.trim() != "#[cfg(test)]") {
        let code = line.trim_start();
        if code.starts_with("//") {
            continue;
        }
        let crate_paths = code.match_indices("crate::").map(|(at, k)| (at + k.len(), ""));
        let super_paths = code
            .match_indices("super::")
            .filter(|(at, _)| !code[..*at].ends_with("super::"))
            .map(|(at, k)| (at + k.len(), parent));
        for (start, base) in crate_paths.chain(super_paths) {
            let rest: String = code[start..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == ':')
                .collect();
            let path = if base.is_empty() {
                rest
            } else {
                format!("{base}::{rest}")
            };
            let segments: Vec<&str> = path.split("::").filter(|s| !s.is_empty()).collect();
            if let Some(module) = (1..=segments.len())
                .rev()
                .map(|n| segments[..n].join("::"))
                .find(|m| modules.contains(m))
            {
                found.insert(module);
            }
        }
    }
    found
}

fn related(a: &str, b: &str) -> bool {
    a.starts_with(&format!("{b}::")) || b.starts_with(&format!("{a}::"))
}

#[test]
fn planes_import_downwards_only_and_modules_form_no_circle() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let modules: BTreeSet<String> = files.iter().map(|f| module_of(&src, f)).collect();
    for plane in PLANES {
        assert!(modules.contains(plane), "lb/src/{plane}/ is missing");
    }

    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut wrong_way = Vec::new();
    for file in &files {
        let module = module_of(&src, file);
        let Some(rank) = PLANES
            .iter()
            .position(|p| module == *p || module.starts_with(&format!("{p}::")))
        else {
            continue; // lib.rs and main.rs sit above every plane.
        };
        let text = std::fs::read_to_string(file).unwrap();
        for imported in imports(&module, &text, &modules) {
            let plane = imported.split("::").next().unwrap();
            let to = PLANES.iter().position(|p| *p == plane).expect("a plane");
            if to > rank {
                wrong_way.push(format!("{module} imports {imported}, a plane above it"));
            }
            if imported != module && !related(&module, &imported) {
                graph.entry(module.clone()).or_default().insert(imported);
            }
        }
    }
    assert!(
        wrong_way.is_empty(),
        "imports against the planes' order:\n{}",
        wrong_way.join("\n")
    );

    if let Some(circle) = find_circle(&graph) {
        panic!("modules import each other: {}", circle.join(" → "));
    }
}

/// A circle of imports in `graph`, if any (depth-first search for a back
/// edge).
fn find_circle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        m: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        match state.get(m) {
            Some(1) => {
                let from = path.iter().position(|p| p == m).unwrap();
                let mut circle = path[from..].to_vec();
                circle.push(m.to_owned());
                return Some(circle);
            }
            Some(_) => return None,
            None => {}
        }
        state.insert(m.to_owned(), 1);
        path.push(m.to_owned());
        for next in graph.get(m).into_iter().flatten() {
            if let Some(circle) = visit(next, graph, state, path) {
                return Some(circle);
            }
        }
        path.pop();
        state.insert(m.to_owned(), 2);
        None
    }
    let mut state = BTreeMap::new();
    graph
        .keys()
        .find_map(|module| visit(module, graph, &mut state, &mut Vec::new()))
}

/// The workspace's other crates form no import circle either (issue 21).
#[test]
fn no_crate_of_the_workspace_has_an_import_circle() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    for krate in ["consul", "sidecar", "health", "testkit"] {
        let src = root.join(krate).join("src");
        let mut files = Vec::new();
        rust_files(&src, &mut files);
        let modules: BTreeSet<String> = files.iter().map(|f| module_of(&src, f)).collect();
        let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for file in &files {
            let module = module_of(&src, file);
            let text = std::fs::read_to_string(file).unwrap();
            for imported in imports(&module, &text, &modules) {
                if imported != module && !related(&module, &imported) {
                    graph.entry(module.clone()).or_default().insert(imported);
                }
            }
        }
        if let Some(circle) = find_circle(&graph) {
            panic!("{krate}: modules import each other: {}", circle.join(" → "));
        }
    }
}

/// The longest a source file may run before its unit tests (issue 21): a
/// file past it holds more than one concern, and is split by concern.
const MAX_LINES_BEFORE_TESTS: usize = 900;

/// No Rust file of the workspace (sources, tests, benches, the testkit)
/// runs over [`MAX_LINES_BEFORE_TESTS`] lines before its `#[cfg(test)]`
/// module (the whole file, if it has none).
#[test]
fn no_source_file_is_over_900_lines_before_its_tests() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let mut files = Vec::new();
    for dir in [
        "lb/src",
        "lb/tests",
        "sidecar/src",
        "sidecar/tests",
        "consul/src",
        "consul/tests",
        "health/src",
        "testkit/src",
        "benches/src",
    ] {
        let dir = root.join(dir);
        if dir.is_dir() {
            rust_files(&dir, &mut files);
        }
    }
    assert!(
        files.len() > 50,
        "found only {} files under {}",
        files.len(),
        root.display()
    );
    let long: Vec<String> = files
        .iter()
        .filter_map(|file| {
            let text = std::fs::read_to_string(file).unwrap();
            let before = text.lines().take_while(|l| l.trim() != "#[cfg(test)]").count();
            (before > MAX_LINES_BEFORE_TESTS)
                .then(|| format!("{} ({before} lines)", file.strip_prefix(root).unwrap().display()))
        })
        .collect();
    assert!(
        long.is_empty(),
        "over {MAX_LINES_BEFORE_TESTS} lines before the unit tests: {long:?}"
    );
}
