//! `docs/reference/halo-sidecar.md` documents exactly the keys the config
//! file accepts: each table's keys come from serde's own unknown-field error
//! (see [`halo_testkit::reference`]). `meta` of `[service]` is free-form
//! (any key, string values): a row of `[service]`, with no key list.

use std::path::Path;

use halo_testkit::reference::{compare, config_blocks, schema, TOP_LEVEL};

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
    let schema = schema(TABLES, |text| {
        toml::from_str::<crate::config::Config>(text)
            .map(|_| ())
            .map_err(|e| e.to_string())
    });
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
