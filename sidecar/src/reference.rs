//! `docs/reference/halo-sidecar.md` documents exactly the keys the config
//! file accepts: each table's keys come from serde's own unknown-field error
//! (see [`halo_testkit::reference`]). `meta` of `[service]` is free-form
//! (any key, string values): a row of `[service]`, with no key list.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use halo_testkit::reference::{accepted_keys, compare, config_blocks, PROBE_KEY, TOP_LEVEL};

/// Each table as the reference names it, and the file text that opens it.
const TABLES: &[(&str, &str)] = &[
    (TOP_LEVEL, ""),
    ("[consul]", "[consul]\n"),
    ("[service]", "[service]\n"),
    ("[service.weights]", "[service]\n[service.weights]\n"),
    ("[[check]]", "[[check]]\n"),
    ("[admin]", "[admin]\n"),
    ("[drain]", "[drain]\n"),
];

#[test]
fn the_reference_documents_every_key_and_no_other() {
    let schema: BTreeMap<String, BTreeSet<String>> = TABLES
        .iter()
        .map(|(name, opening)| {
            let text = format!("{opening}{PROBE_KEY} = 1\n");
            let error = match toml::from_str::<crate::config::Config>(&text) {
                Ok(_) => panic!("{name}: {PROBE_KEY} was accepted"),
                Err(e) => e.to_string(),
            };
            let keys = accepted_keys(&error).unwrap_or_else(|| panic!("{name}: not an unknown-field error: {error}"));
            assert!(!keys.is_empty(), "{name}: no keys");
            (name.to_string(), keys)
        })
        .collect();
    let page = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/reference/halo-sidecar.md");
    let problems = compare(&page, &schema);
    assert!(
        problems.is_empty(),
        "the reference and the schema disagree:\n{}",
        problems.join("\n")
    );
}

#[test]
fn the_books_halo_sidecar_files_pass_check() {
    let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs");
    let blocks = config_blocks(&docs, "halo-sidecar");
    assert!(!blocks.is_empty(), "the tutorial shows a halo-sidecar file");
    for (at, text) in blocks {
        // No HALO_* variables: the file alone.
        if let Err(e) = crate::config::load_str(&at, Some(&text), []) {
            panic!("{e}");
        }
    }
}
