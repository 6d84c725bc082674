//! The agent's module graph: which top-level module uses which (`crate::<module>` paths, outside
//! comments and unit tests). It must have no cycle, nothing but the CLI may use `app` (which only
//! wires), and ARCHITECTURE.md must show the graph as it is: this test computes it and fails with
//! the text to paste when the document differs.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

const BEGIN: &str = "<!-- module-graph:begin (checked by agent/tests/modules.rs) -->";
const END: &str = "<!-- module-graph:end -->";

type Graph = BTreeMap<String, BTreeSet<String>>;

fn modules(src: &Path) -> BTreeSet<String> {
    std::fs::read_dir(src)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter_map(|p| {
            let stem = p.file_stem()?.to_str()?.to_string();
            (p.extension().is_some_and(|e| e == "rs") && stem != "lib" && stem != "main").then_some(stem)
        })
        .collect()
}

fn files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            files(&p, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
}

/// The code of a file without comments and without its unit tests.
fn code(text: &str) -> String {
    let text = text.split("#[cfg(test)]\nmod tests").next().unwrap_or_default();
    text.lines().filter(|l| !l.trim_start().starts_with("//")).collect::<Vec<_>>().join("\n")
}

/// The modules a piece of code names: `crate::a::…` and `crate::{a, b::…}`.
fn uses(code: &str, known: &BTreeSet<String>) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (i, _) in code.match_indices("crate::") {
        let rest = &code[i + "crate::".len()..];
        let names: Vec<&str> = match rest.strip_prefix('{') {
            Some(group) => {
                top_level_items(group).into_iter().map(|s| s.trim().split("::").next().unwrap_or_default()).collect()
            }
            None => vec![rest.split(|c: char| !(c.is_alphanumeric() || c == '_')).next().unwrap_or_default()],
        };
        out.extend(names.into_iter().filter(|n| known.contains(*n)).map(str::to_string));
    }
    out
}

/// The comma-separated items of a `{…}` group up to its closing brace, nested groups kept whole.
fn top_level_items(group: &str) -> Vec<&str> {
    let (mut depth, mut start, mut items) = (0usize, 0, Vec::new());
    for (i, c) in group.char_indices() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => {
                items.push(&group[start..i]);
                return items;
            }
            '}' => depth -= 1,
            ',' if depth == 0 => {
                items.push(&group[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    items.push(&group[start..]);
    items
}

fn graph() -> Graph {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let known = modules(&src);
    let mut all = Vec::new();
    files(&src, &mut all);
    let mut g: Graph = known.iter().map(|m| (m.clone(), BTreeSet::new())).collect();
    for path in all {
        let rel = path.strip_prefix(&src).unwrap();
        let first = rel.components().next().unwrap().as_os_str().to_str().unwrap();
        let module = first.trim_end_matches(".rs");
        if !known.contains(module) || rel.file_name().is_some_and(|f| f == "tests.rs") {
            continue;
        }
        let used = uses(&code(&std::fs::read_to_string(&path).unwrap()), &known);
        g.get_mut(module).unwrap().extend(used.into_iter().filter(|u| u != module));
    }
    g
}

/// A cycle through `at`, if there is one.
fn cycle(g: &Graph, at: &str, path: &mut Vec<String>, done: &mut BTreeSet<String>) -> Option<Vec<String>> {
    if let Some(i) = path.iter().position(|m| m == at) {
        let mut c = path[i..].to_vec();
        c.push(at.to_string());
        return Some(c);
    }
    if done.contains(at) {
        return None;
    }
    path.push(at.to_string());
    for next in &g[at] {
        if let Some(c) = cycle(g, next, path, done) {
            return Some(c);
        }
    }
    path.pop();
    done.insert(at.to_string());
    None
}

fn render(g: &Graph) -> String {
    let width = g.keys().map(String::len).max().unwrap_or(0);
    let mut out = String::from("```text\n");
    for (m, deps) in g {
        let deps: Vec<&str> = deps.iter().map(String::as_str).collect();
        let deps = if deps.is_empty() { "(leaf)".to_string() } else { deps.join(" ") };
        out.push_str(&format!("{m:<width$} → {deps}\n"));
    }
    out.push_str("```\n");
    out
}

#[test]
fn the_module_graph_has_no_cycle() {
    let g = graph();
    let mut done = BTreeSet::new();
    for m in g.keys() {
        if let Some(c) = cycle(&g, m, &mut Vec::new(), &mut done) {
            panic!("module cycle: {}", c.join(" → "));
        }
    }
}

#[test]
fn only_the_cli_uses_app() {
    let users: Vec<String> = graph().into_iter().filter(|(_, d)| d.contains("app")).map(|(m, _)| m).collect();
    assert_eq!(users, ["cli"], "app only wires the agent together; nothing below it may use it");
}

#[test]
fn the_cycle_check_finds_a_cycle() {
    let mut g = Graph::new();
    g.insert("a".into(), ["b".to_string()].into());
    g.insert("b".into(), ["c".to_string()].into());
    g.insert("c".into(), ["a".to_string()].into());
    let c = cycle(&g, "a", &mut Vec::new(), &mut BTreeSet::new());
    assert_eq!(c.unwrap(), ["a", "b", "c", "a"]);
    let known: BTreeSet<String> = ["pods", "proxy", "app"].map(String::from).into();
    let used = uses("use crate::{pods, proxy::Inputs, Error};\nlet x = crate::app::run;", &known);
    assert_eq!(used, known);
    let nested = uses("use crate::{proxy::{Inputs, Other}, pods};", &known);
    assert_eq!(nested, ["pods", "proxy"].map(String::from).into(), "a nested group hides no module");
}

#[test]
fn architecture_md_shows_the_module_graph_as_it_is() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../ARCHITECTURE.md");
    let doc = std::fs::read_to_string(&path).unwrap();
    let want = render(&graph());
    let (Some(b), Some(e)) = (doc.find(BEGIN), doc.find(END)) else {
        panic!("ARCHITECTURE.md lacks the module graph block; add:\n{BEGIN}\n{want}{END}");
    };
    let have = doc[b + BEGIN.len()..e].trim_start_matches('\n');
    assert!(have == want, "ARCHITECTURE.md's module graph is stale; replace the block with:\n{BEGIN}\n{want}{END}");
}
