//! The configuration reference (`docs/reference/*.md`) held against the
//! schema the program really reads, so the two cannot drift.
//!
//! The schema side comes from serde itself: a table given one key it does
//! not know fails with ``unknown field `…`, expected one of `a`, `b`, …``,
//! listing every key the table accepts ([`accepted_keys`]). The reference
//! side is the Markdown's shape ([`documented_keys`]): one heading per table
//! naming it in backticks (`` ## `[consul]` ``, `` ## `[[vip]]` ``), or
//! `## Top level`, each followed by a table whose first column is the key
//! in backticks. [`compare`] puts the two together.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// The heading of the file's top-level keys.
pub const TOP_LEVEL: &str = "Top level";

/// The key a probe adds to a table; no table accepts it.
pub const PROBE_KEY: &str = "__not_a_key__";

/// The keys serde lists in an unknown-field error (`error` is its text):
/// every key the table accepts. `None` if the text is not such an error.
pub fn accepted_keys(error: &str) -> Option<BTreeSet<String>> {
    let line = error
        .lines()
        .find(|l| l.contains(&format!("unknown field `{PROBE_KEY}`")))?;
    if line.contains("there are no fields") {
        return Some(BTreeSet::new());
    }
    let (_, expected) = line.split_once("expected ")?;
    Some(expected.split('`').skip(1).step_by(2).map(str::to_owned).collect())
}

/// The keys each table of a reference page documents: heading (the
/// table's name as written in backticks, e.g. `[consul]`, or
/// [`TOP_LEVEL`]) → the keys in the first column of the tables under it.
pub fn documented_keys(markdown: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut tables = BTreeMap::new();
    let mut current: Option<String> = None;
    let mut in_code = false;
    for line in markdown.lines() {
        // A `#` inside a fenced block is a comment (TOML, shell), not a heading.
        if line.trim_start().starts_with("```") {
            in_code = !in_code;
            continue;
        }
        if in_code {
            continue;
        }
        if let Some(heading) = line.strip_prefix('#') {
            let heading = heading.trim_start_matches('#').trim();
            current = if heading == TOP_LEVEL {
                Some(TOP_LEVEL.to_owned())
            } else {
                heading
                    .split('`')
                    .nth(1)
                    .filter(|name| name.starts_with('['))
                    .map(str::to_owned)
            };
            if let Some(name) = &current {
                tables.entry(name.clone()).or_insert_with(BTreeSet::new);
            }
            continue;
        }
        let (Some(name), Some(row)) = (&current, line.trim().strip_prefix('|')) else {
            continue;
        };
        let first = row.split('|').next().unwrap_or("").trim();
        if let Some(key) = first.strip_prefix('`').and_then(|k| k.strip_suffix('`')) {
            tables
                .get_mut(name)
                .expect("inserted at its heading")
                .insert(key.to_owned());
        }
    }
    tables
}

/// The schema of a config file: for each table (its name as the reference
/// writes it, and the file text that opens it), the keys `parse` (the
/// program's deserializer, its error as text) lists when the table is given
/// [`PROBE_KEY`].
pub fn schema(
    tables: &[(&str, &str)],
    parse: impl Fn(&str) -> Result<(), String>,
) -> BTreeMap<String, BTreeSet<String>> {
    tables
        .iter()
        .map(|(name, opening)| {
            let error = match parse(&format!("{opening}{PROBE_KEY} = 1\n")) {
                Ok(()) => panic!("{name}: {PROBE_KEY} was accepted"),
                Err(e) => e,
            };
            let keys = accepted_keys(&error).unwrap_or_else(|| panic!("{name}: not an unknown-field error: {error}"));
            assert!(!keys.is_empty(), "{name}: no keys");
            (name.to_string(), keys)
        })
        .collect()
}

/// Every way the reference and the schema disagree, in words; empty when
/// they agree. `schema` maps each table's name (as the reference writes it)
/// to the keys it accepts. A key that names a sub-table with a heading of
/// its own (`passive` of `[[vip]]`, documented under `[vip.passive]`) need
/// not be in its parent's list.
pub fn compare(page: &Path, schema: &BTreeMap<String, BTreeSet<String>>) -> Vec<String> {
    let text = std::fs::read_to_string(page).unwrap_or_else(|e| panic!("{}: {e}", page.display()));
    let documented = documented_keys(&text);
    let mut problems = Vec::new();
    for (table, keys) in schema {
        let Some(written) = documented.get(table) else {
            problems.push(format!("{}: no heading for `{table}`", page.display()));
            continue;
        };
        let prefix = if table == TOP_LEVEL {
            String::new()
        } else {
            format!("{}.", table.trim_matches(|c| c == '[' || c == ']'))
        };
        for key in keys {
            let sub = format!("{prefix}{key}");
            let has_heading = schema.contains_key(&format!("[{sub}]")) || schema.contains_key(&format!("[[{sub}]]"));
            if !written.contains(key) && !has_heading {
                problems.push(format!("{}: `{table}` does not document `{key}`", page.display()));
            }
        }
        for key in written.difference(keys) {
            problems.push(format!(
                "{}: `{table}` documents `{key}`, which the program does not accept",
                page.display()
            ));
        }
    }
    for table in documented.keys().filter(|t| !schema.contains_key(*t)) {
        problems.push(format!("{}: `{table}` is not a table of the schema", page.display()));
    }
    problems
}

/// The whole config files the book shows for `program`: every code block
/// opened with ```` ```toml <program> ```` in the Markdown under `docs`, as
/// (`page:line`, text). Such a block is a file a reader may copy, so a test
/// runs each through the program's own validation.
pub fn config_blocks(docs: &Path, program: &str) -> Vec<(String, String)> {
    fn pages(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.unwrap().path();
            if path.is_dir() {
                pages(&path, out);
            } else if path.extension().is_some_and(|e| e == "md") {
                out.push(path);
            }
        }
    }
    let mut files = Vec::new();
    pages(docs, &mut files);
    files.sort();
    let opening = format!("```toml {program}");
    let mut blocks = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        let mut lines = text.lines().enumerate();
        while let Some((at, line)) = lines.next() {
            if line.trim_end() != opening {
                continue;
            }
            let body: Vec<&str> = lines
                .by_ref()
                .map(|(_, l)| l)
                .take_while(|l| !l.starts_with("```"))
                .collect();
            blocks.push((format!("{}:{}", file.display(), at + 1), body.join("\n")));
        }
    }
    blocks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serde_lists_are_read() {
        let e = format!("TOML parse error\nunknown field `{PROBE_KEY}`, expected one of `a`, `b_c`, `d`\n");
        assert_eq!(accepted_keys(&e).unwrap(), ["a", "b_c", "d"].map(String::from).into());
        let e = format!("unknown field `{PROBE_KEY}`, expected `only`");
        assert_eq!(accepted_keys(&e).unwrap(), ["only"].map(String::from).into());
        let e = format!("unknown field `{PROBE_KEY}`, there are no fields");
        assert!(accepted_keys(&e).unwrap().is_empty());
        assert_eq!(accepted_keys("missing field `name`"), None);
    }

    #[test]
    fn headings_and_first_columns_are_read() {
        let md = "# Ref\n\n## Top level\n\n| key | default |\n|---|---|\n| `workers` | cores |\n\n\
                  Some text with | `pipes` | in it.\n\n## The `[consul]` table\n\n| `address` | x |\n\
                  ```toml\n# `[ha]` in a comment\n| `in_code` |\n```\n| `tls_server_name` | z |\n\
                  ### Notes\n| `not_a_key` | y |\n";
        let tables = documented_keys(md);
        assert_eq!(tables[TOP_LEVEL], ["workers"].map(String::from).into());
        assert_eq!(
            tables["[consul]"],
            ["address", "tls_server_name"].map(String::from).into()
        );
        assert_eq!(tables.len(), 2);
    }
}
