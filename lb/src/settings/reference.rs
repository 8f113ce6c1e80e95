//! `docs/reference/halo-lb.md` documents exactly the keys the config file
//! accepts: each table's keys come from serde's own unknown-field error
//! (see [`halo_testkit::reference`]).

use std::path::Path;

use halo_testkit::reference::{compare, config_blocks, schema, TOP_LEVEL};

/// Each table as the reference names it, and the file text that opens it.
const TABLES: &[(&str, &str)] = &[
    (TOP_LEVEL, ""),
    ("[admin]", "[admin]\n"),
    ("[consul]", "[consul]\n"),
    ("[ha]", "[ha]\n"),
    ("[[vip]]", "[[vip]]\n"),
    ("[[vip.backends]]", "[[vip]]\n[[vip.backends]]\n"),
    ("[vip.passive]", "[[vip]]\n[vip.passive]\n"),
    ("[vip.dns]", "[[vip]]\n[vip.dns]\n"),
    ("[vip.check]", "[[vip]]\n[vip.check]\n"),
];

#[test]
fn the_reference_documents_every_key_and_no_other() {
    let schema = schema(TABLES, |text| {
        toml::from_str::<super::file::Config>(text)
            .map(|_| ())
            .map_err(|e| e.to_string())
    });
    let page = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/reference/halo-lb.md");
    let problems = compare(&page, &schema);
    assert!(
        problems.is_empty(),
        "the reference and the schema disagree:\n{}",
        problems.join("\n")
    );
}

#[test]
fn the_books_halo_lb_files_pass_check() {
    let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs");
    let blocks = config_blocks(&docs, "halo-lb");
    assert!(!blocks.is_empty(), "the tutorial shows a halo-lb file");
    for (at, text) in blocks {
        if let Err(e) = super::Config::parse(&text, &at) {
            panic!("{e}");
        }
    }
}
