//! The node crate's modules depend on each other one way: no module reaches, through
//! any chain of `crate::` paths, back to itself. Read from the sources, so a new `use`
//! that closes a loop fails here with the loop named.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Every `.rs` file under `dir`.
fn sources(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).expect("read node/src") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            out.extend(sources(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    out
}

/// The top-level module a file of node/src belongs to (`net` for net.rs or net/x.rs);
/// `None` for the crate roots.
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).ok()?;
    let first = rel
        .components()
        .next()?
        .as_os_str()
        .to_string_lossy()
        .to_string();
    let name = first.trim_end_matches(".rs").to_string();
    (name != "lib" && name != "main").then_some(name)
}

/// The top-level modules `text` names through `crate::` (in `use` lists too).
fn uses(text: &str, modules: &BTreeSet<String>) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let code: String = text
        .lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n");
    for (at, _) in code.match_indices("crate::") {
        let rest = &code[at + "crate::".len()..];
        let mut names = Vec::new();
        if let Some(list) = rest.strip_prefix('{') {
            // `use crate::{a::{X, Y}, b}`: the first segment of each item at depth 0.
            let (mut depth, mut item) = (0, String::new());
            for c in list.chars() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        names.push(std::mem::take(&mut item).trim().to_string());
                        continue;
                    }
                    _ => {}
                }
                item.push(c);
            }
            names.push(item.trim().to_string());
        } else {
            names.push(rest.to_string());
        }
        for n in names {
            let name: String = n
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if modules.contains(&name) {
                found.insert(name);
            }
        }
    }
    found
}

#[test]
fn node_modules_form_no_cycle() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let files = sources(&src);
    let modules: BTreeSet<String> = files.iter().filter_map(|f| module_of(&src, f)).collect();
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in &files {
        let Some(m) = module_of(&src, f) else {
            continue;
        };
        let text = std::fs::read_to_string(f).expect("read source");
        let mut to = uses(&text, &modules);
        to.remove(&m);
        edges.entry(m).or_default().extend(to);
    }
    assert!(
        edges.values().any(|e| !e.is_empty()),
        "no crate:: edges found: the scan is broken"
    );
    // Depth-first search for a back edge; the path is the loop.
    fn visit(
        m: &str,
        edges: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|p| p == m) {
            let mut cycle = path[at..].to_vec();
            cycle.push(m.to_string());
            return Some(cycle);
        }
        if done.contains(m) {
            return None;
        }
        path.push(m.to_string());
        for next in edges.get(m).into_iter().flatten() {
            if let Some(c) = visit(next, edges, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(m.to_string());
        None
    }
    let mut done = BTreeSet::new();
    for m in edges.keys() {
        if let Some(cycle) = visit(m, &edges, &mut Vec::new(), &mut done) {
            panic!("node modules form a cycle: {}", cycle.join(" -> "));
        }
    }
}

/// The layers as node/src/lib.rs lists them: one `//! - ` item per layer, lowest first,
/// naming its modules as [`links`]; each module with its layer's index.
fn layers(lib_rs: &str, modules: &BTreeSet<String>) -> BTreeMap<String, usize> {
    let mut layer = BTreeMap::new();
    let mut index = None;
    for line in lib_rs.lines() {
        let Some(doc) = line.strip_prefix("//!") else {
            continue;
        };
        if doc.starts_with(" - ") {
            index = Some(index.map_or(0, |i| i + 1));
        } else if !doc.starts_with("   ") {
            index = None;
        }
        let Some(i) = index else { continue };
        for (at, _) in doc.match_indices("[`") {
            let name: String = doc[at + 2..]
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if modules.contains(&name) {
                layer.entry(name).or_insert(i);
            }
        }
    }
    layer
}

/// Every module sits in one layer of lib.rs's list and uses only modules of its own
/// layer or lower ones: the doc a newcomer reads first stays true.
#[test]
fn node_modules_keep_to_their_layers() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let files = sources(&src);
    let modules: BTreeSet<String> = files.iter().filter_map(|f| module_of(&src, f)).collect();
    let lib = std::fs::read_to_string(src.join("lib.rs")).expect("read lib.rs");
    let layer = layers(&lib, &modules);
    let unplaced: Vec<&String> = modules.iter().filter(|m| !layer.contains_key(*m)).collect();
    assert!(
        unplaced.is_empty(),
        "modules missing from lib.rs's list of layers: {unplaced:?}"
    );
    let mut wrong = Vec::new();
    for f in &files {
        let Some(m) = module_of(&src, f) else {
            continue;
        };
        let text = std::fs::read_to_string(f).expect("read source");
        for to in uses(&text, &modules) {
            if layer[&to] > layer[&m] {
                wrong.push(format!("{} ({m}) uses {to}", f.display()));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "a layer uses one above it:\n{}",
        wrong.join("\n")
    );
}

/// The list is read as written: one index per item, continuation lines included.
#[test]
fn the_layers_are_read_from_the_list() {
    let modules: BTreeSet<String> = ["a", "b", "c", "d"].iter().map(|s| s.to_string()).collect();
    let doc = "//! Intro naming [`d`].\n//!\n//! - [`a`], [`b`]: low.\n//! - [`c`] above,\n//!   not [`a`] again.\n//!\n//! Later [`d`].";
    let got = layers(doc, &modules);
    let want: BTreeMap<String, usize> = [("a", 0), ("b", 0), ("c", 1)]
        .iter()
        .map(|(m, i)| (m.to_string(), *i))
        .collect();
    assert_eq!(got, want);
}

/// The scan sees the paths it must: a `use` list, a nested path, a full path in code.
#[test]
fn the_scan_reads_crate_paths() {
    let modules: BTreeSet<String> = ["a", "b", "c", "d"].iter().map(|s| s.to_string()).collect();
    let text = "use crate::{a::{X, Y}, b};\n// crate::d in a comment\nfn f() { crate::c::g(); }";
    let found = uses(text, &modules);
    assert_eq!(
        found,
        ["a", "b", "c"].iter().map(|s| s.to_string()).collect()
    );
}
