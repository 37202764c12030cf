//! The layering in docs/ARCHITECTURE.md, checked against the code: every path into
//! another top-level module (`use crate::…`, grouped imports, `super::` climbing out
//! of a module, a path written inline) must be one the layer table allows.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const START: &str = "<!-- layers:start -->";
const END: &str = "<!-- layers:end -->";

/// Module → the modules it may import (`*`: any), from the table between the markers.
fn layer_table(doc: &str) -> BTreeMap<String, BTreeSet<String>> {
    let from = doc
        .find(START)
        .expect("docs/ARCHITECTURE.md has no layer table")
        + START.len();
    let to = doc[from..]
        .find(END)
        .expect("the layer table is not closed")
        + from;
    let mut rules = BTreeMap::new();
    for line in doc[from..to].lines() {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        // | `module` | what it is | `a`, `b` |
        if cells.len() < 4 || !cells[1].starts_with('`') {
            continue;
        }
        let name = cells[1].trim_matches('`').to_owned();
        let allowed = cells[3]
            .split(',')
            .map(|c| c.trim().trim_matches('`').to_owned())
            .filter(|c| !c.is_empty() && c != "—")
            .collect();
        rules.insert(name, allowed);
    }
    rules
}

/// The code of a Rust file with comments, strings and character literals blanked
/// out (newlines kept, so line numbers stay).
fn code_only(src: &str) -> String {
    let b = src.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    let blank = |out: &mut Vec<u8>, s: &[u8]| {
        out.extend(s.iter().map(|&c| if c == b'\n' { b'\n' } else { b' ' }))
    };
    while i < b.len() {
        let rest = &b[i..];
        if rest.starts_with(b"//") {
            let end = rest.iter().position(|&c| c == b'\n').unwrap_or(rest.len());
            blank(&mut out, &rest[..end]);
            i += end;
        } else if rest.starts_with(b"/*") {
            let (mut depth, mut j) = (0, 0);
            while j < rest.len() {
                if rest[j..].starts_with(b"/*") {
                    depth += 1;
                    j += 2;
                } else if rest[j..].starts_with(b"*/") {
                    depth -= 1;
                    j += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    j += 1;
                }
            }
            blank(&mut out, &rest[..j]);
            i += j;
        } else if let Some(len) = raw_string(rest) {
            blank(&mut out, &rest[..len]);
            i += len;
        } else if rest[0] == b'"' || rest.starts_with(b"b\"") {
            let mut j = if rest[0] == b'"' { 1 } else { 2 };
            while j < rest.len() && rest[j] != b'"' {
                j += if rest[j] == b'\\' { 2 } else { 1 };
            }
            let len = (j + 1).min(rest.len());
            blank(&mut out, &rest[..len]);
            i += len;
        } else if rest[0] == b'\'' {
            // A character literal ('x', '\n', '\u{..}'), or a lifetime (kept).
            let len = if rest.get(1) == Some(&b'\\') {
                rest[2..].iter().position(|&c| c == b'\'').map(|p| p + 3)
            } else {
                let ch = std::str::from_utf8(&rest[1..rest.len().min(5)])
                    .ok()
                    .or_else(|| std::str::from_utf8(&rest[1..rest.len().min(2)]).ok())
                    .and_then(|s| s.chars().next());
                ch.map(char::len_utf8)
                    .filter(|&n| rest.get(1 + n) == Some(&b'\''))
                    .map(|n| n + 2)
            };
            match len {
                Some(len) => {
                    blank(&mut out, &rest[..len]);
                    i += len;
                }
                None => {
                    out.push(b'\'');
                    i += 1;
                }
            }
        } else {
            out.push(rest[0]);
            i += 1;
        }
    }
    String::from_utf8(out).expect("blanking keeps UTF-8 of the code it keeps")
}

/// `r"…"`, `r#"…"#`, `br#"…"#`: its length.
fn raw_string(rest: &[u8]) -> Option<usize> {
    let start = if rest.starts_with(b"br") {
        2
    } else if rest.starts_with(b"r") {
        1
    } else {
        return None;
    };
    let hashes = rest[start..].iter().take_while(|&&c| c == b'#').count();
    if rest.get(start + hashes) != Some(&b'"') {
        return None;
    }
    let close: Vec<u8> = std::iter::once(b'"')
        .chain(std::iter::repeat_n(b'#', hashes))
        .collect();
    let body = start + hashes + 1;
    rest[body..]
        .windows(close.len())
        .position(|w| w == close.as_slice())
        .map(|p| body + p + close.len())
}

fn is_ident(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_'
}

/// One path into another top-level module: the module, and the line it is on.
#[derive(Debug, PartialEq, Eq)]
struct Edge {
    to: String,
    line: usize,
}

/// The top-level modules the code at module path `module` (e.g. `["vmm", "block"]`)
/// reaches by `crate::` paths and by `super::` chains that climb to the crate root.
fn edges(module: &[&str], src: &str) -> Vec<Edge> {
    let code = code_only(src);
    let b = code.as_bytes();
    let line_of = |at: usize| code[..at].matches('\n').count() + 1;
    let mut out = Vec::new();
    // Inline modules (`mod tests { … }`) deepen the path `super::` climbs from.
    let mut inline: Vec<usize> = Vec::new();
    let mut braces = 0usize;
    let mut i = 0;
    while i < b.len() {
        let boundary = i == 0 || !is_ident(b[i - 1]);
        if b[i] == b'{' {
            braces += 1;
        } else if b[i] == b'}' {
            braces = braces.saturating_sub(1);
            if inline.last() == Some(&braces) {
                inline.pop();
            }
        } else if boundary && code[i..].starts_with("mod ") {
            let name_end = i + 4 + b[i + 4..].iter().take_while(|&&c| is_ident(c)).count();
            let after = code[name_end..].trim_start();
            if after.starts_with('{') {
                inline.push(braces);
            }
        } else if boundary && code[i..].starts_with("crate") && !is_ident_at(b, i + 5) {
            if let Some((targets, end)) = after_colons(&code, i + 5) {
                let line = line_of(i);
                out.extend(targets.into_iter().map(|to| Edge { to, line }));
                i = end;
                continue;
            }
        } else if boundary && code[i..].starts_with("super") && !is_ident_at(b, i + 5) {
            // `super::super::…`: how far it climbs, and where its last `super` ends.
            let (mut j, mut climbs, mut last) = (i, 0, i);
            while code[j..].starts_with("super") && !is_ident_at(b, j + 5) {
                let Some(next) = skip_colons(&code, j + 5) else {
                    break;
                };
                climbs += 1;
                last = j + 5;
                j = next;
            }
            if climbs > 0
                && climbs >= module.len() + inline.len()
                && let Some((targets, end)) = after_colons(&code, last)
            {
                let line = line_of(i);
                out.extend(targets.into_iter().map(|to| Edge { to, line }));
                i = end;
                continue;
            }
            i = j.max(i + 1);
            continue;
        }
        i += 1;
    }
    out
}

fn is_ident_at(b: &[u8], at: usize) -> bool {
    b.get(at).is_some_and(|&c| is_ident(c))
}

/// Past `::` (whitespace allowed around it) at `at`.
fn skip_colons(code: &str, at: usize) -> Option<usize> {
    let rest = &code[at..];
    let trimmed = rest.trim_start();
    let skipped = rest.len() - trimmed.len();
    trimmed
        .starts_with("::")
        .then(|| at + skipped + 2 + (trimmed[2..].len() - trimmed[2..].trim_start().len()))
}

/// After a path root at `at` (`crate`, or the last `super`): `::name` or
/// `::{a, b::c, …}` — the first segment(s), and where the path's root part ends.
fn after_colons(code: &str, at: usize) -> Option<(Vec<String>, usize)> {
    let start = skip_colons(code, at)?;
    let b = code.as_bytes();
    if b.get(start) == Some(&b'{') {
        let mut depth = 0;
        let mut names = Vec::new();
        let mut expect_name = true;
        let mut j = start;
        while j < b.len() {
            match b[j] {
                b'{' => {
                    depth += 1;
                    expect_name = depth == 1;
                }
                b'}' => {
                    depth -= 1;
                    if depth == 0 {
                        return Some((names, j + 1));
                    }
                }
                b',' if depth == 1 => expect_name = true,
                c if is_ident(c) && expect_name && depth == 1 => {
                    let len = b[j..].iter().take_while(|&&c| is_ident(c)).count();
                    let name = &code[j..j + len];
                    if name != "self" {
                        names.push(name.to_owned());
                    }
                    expect_name = false;
                    j += len;
                    continue;
                }
                _ => {}
            }
            j += 1;
        }
        None
    } else {
        let len = b[start..].iter().take_while(|&&c| is_ident(c)).count();
        (len > 0).then(|| (vec![code[start..start + len].to_owned()], start + len))
    }
}

/// Every .rs file under `dir`, sorted.
fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("read src").flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// `vmm/block.rs` → `["vmm", "block"]`; `vmm/mod.rs` → `["vmm"]`; `lib.rs` → `[]`.
fn module_path(rel: &Path) -> Vec<String> {
    let mut parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    let last = parts.pop().unwrap_or_default();
    let stem = last.trim_end_matches(".rs");
    if !matches!(stem, "mod" | "lib" | "main") {
        parts.push(stem.to_owned());
    }
    parts
}

#[test]
fn every_import_is_one_the_layer_table_allows() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let doc = std::fs::read_to_string(root.join("../docs/ARCHITECTURE.md"))
        .expect("read docs/ARCHITECTURE.md");
    let rules = layer_table(&doc);
    assert!(rules.len() >= 5, "the layer table is too short: {rules:?}");
    let src = root.join("src");
    let mut problems = Vec::new();
    let mut seen = BTreeSet::new();
    for file in rust_files(&src) {
        let rel = file.strip_prefix(&src).expect("under src");
        let module = module_path(rel);
        let Some(top) = module.first() else {
            // lib.rs and main.rs wire every module together.
            continue;
        };
        seen.insert(top.clone());
        let Some(allowed) = rules.get(top) else {
            problems.push(format!(
                "src/{}: module `{top}` is not in the layer table of docs/ARCHITECTURE.md",
                rel.display()
            ));
            continue;
        };
        let text = std::fs::read_to_string(&file).expect("read source");
        let path: Vec<&str> = module.iter().map(String::as_str).collect();
        for e in edges(&path, &text) {
            if &e.to != top && !allowed.contains(&e.to) && !allowed.contains("*") {
                problems.push(format!(
                    "src/{}:{}: `{top}` may not import `{}` (docs/ARCHITECTURE.md allows: {})",
                    rel.display(),
                    e.line,
                    e.to,
                    if allowed.is_empty() {
                        "nothing".to_owned()
                    } else {
                        allowed.iter().cloned().collect::<Vec<_>>().join(", ")
                    }
                ));
            }
        }
    }
    for name in rules.keys() {
        if !seen.contains(name) {
            problems.push(format!(
                "the layer table names `{name}`, which is no module in src/"
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn the_checker_sees_grouped_climbing_and_inline_paths_and_nothing_in_comments() {
    let src = r#"
use crate::{vmm::machine::Machine, self, policy};
use super::super::migration::source;
// use crate::cli::nothing;
/* crate::cli */
fn f() { let s = "crate::cli"; let c = '"'; crate::probes::start(); }
mod tests {
    use super::super::clock;
    use super::super::super::control::request;
}
"#;
    let found: Vec<(String, usize)> = edges(&["vmm", "block"], src)
        .into_iter()
        .map(|e| (e.to, e.line))
        .collect();
    let want = [
        ("vmm", 2),
        ("policy", 2),
        ("migration", 3),
        ("probes", 6),
        ("control", 9),
    ];
    assert_eq!(
        found,
        want.iter()
            .map(|(m, l)| (m.to_string(), *l))
            .collect::<Vec<_>>()
    );
}

#[test]
fn a_table_row_names_a_module_and_what_it_may_import() {
    let doc = format!(
        "{START}\n| module | what | may import |\n|---|---|---|\n| `policy` | pure | — |\n\
         | `vmm` | the VM | `clock`, `guest` |\n| `cli` | commands | `*` |\n{END}"
    );
    let t = layer_table(&doc);
    assert!(t["policy"].is_empty());
    assert_eq!(
        t["vmm"],
        ["clock", "guest"].iter().map(|s| s.to_string()).collect()
    );
    assert!(t["cli"].contains("*"));
}
