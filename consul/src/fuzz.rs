//! Property tests of the JSON decoders: random bytes and random JSON never
//! panic, nothing but a JSON array decodes to a list (so garbage never
//! empties a table), and valid generated answers round-trip.
//!
//! Bounded to [`DEFAULT_CASES`] cases per property so `cargo test` stays
//! fast; for a longer run by hand set `PROPTEST_CASES`, e.g.
//! `PROPTEST_CASES=20000 cargo test -p halo-consul --lib fuzz`.

use std::collections::BTreeMap;
use std::time::Duration;

use base64::Engine as _;
use proptest::prelude::*;
use serde_json::{json, Value};

use crate::error::{clip_text, BodyLength, MAX_ERROR_TEXT_BYTES};
use crate::health::decode_entries;
use crate::kv::decode_pair;
use crate::session::decode_sessions;
use crate::{CatalogService, CheckStatus, HealthCheck, KvPair, Node, ServiceEntry, SessionBehavior, Weights};

/// Cases per property unless `PROPTEST_CASES` says otherwise.
const DEFAULT_CASES: u32 = 256;

fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_CASES);
    ProptestConfig {
        cases,
        // Failures print their minimal input; no files in the source tree.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Any JSON value, nested a few levels.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        "\\PC{0,16}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            prop::collection::btree_map(
                prop_oneof![
                    "\\PC{0,8}",
                    // Consul's own field names, so objects sometimes almost fit.
                    prop::sample::select(vec![
                        "Node",
                        "Service",
                        "Checks",
                        "ID",
                        "Key",
                        "Value",
                        "CreateIndex",
                        "ModifyIndex",
                        "LockIndex",
                        "Session",
                        "LockDelay",
                        "Behavior",
                        "TTL",
                        "Address",
                        "Port",
                    ])
                    .prop_map(str::to_owned),
                ],
                inner,
                0..8
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn text() -> impl Strategy<Value = String> {
    "\\PC{0,12}"
}

fn meta() -> impl Strategy<Value = BTreeMap<String, String>> {
    prop::collection::btree_map(text(), text(), 0..4)
}

fn status() -> impl Strategy<Value = CheckStatus> {
    prop_oneof![
        Just(CheckStatus::Passing),
        Just(CheckStatus::Warning),
        Just(CheckStatus::Critical),
        Just(CheckStatus::Unknown),
    ]
}

fn entry() -> impl Strategy<Value = ServiceEntry> {
    let node = (text(), text(), text(), meta()).prop_map(|(node, address, datacenter, meta)| Node {
        node,
        address,
        datacenter,
        meta,
    });
    let service = (
        (text(), text(), prop::collection::vec(text(), 0..4), text()),
        (any::<u16>(), meta(), any::<u32>(), any::<u32>()),
    )
        .prop_map(
            |((id, service, tags, address), (port, meta, passing, warning))| CatalogService {
                id,
                service,
                tags,
                address,
                port,
                meta,
                weights: Weights { passing, warning },
            },
        );
    let check = (text(), text(), text(), status(), text(), text()).prop_map(
        |(node, check_id, name, status, output, service_id)| HealthCheck {
            node,
            check_id,
            name,
            status,
            output,
            service_id,
        },
    );
    (node, service, prop::collection::vec(check, 0..4)).prop_map(|(node, service, checks)| ServiceEntry {
        node,
        service,
        checks,
    })
}

/// An entry as Consul writes it, with the fields it adds that we ignore.
fn entry_json(e: &ServiceEntry) -> Value {
    json!({
        "Node": {
            "ID": "0d5b6a1c", "Node": e.node.node, "Address": e.node.address,
            "Datacenter": e.node.datacenter, "TaggedAddresses": null,
            "Meta": if e.node.meta.is_empty() { Value::Null } else { json!(e.node.meta) },
            "CreateIndex": 13, "ModifyIndex": 13
        },
        "Service": {
            "ID": e.service.id, "Service": e.service.service,
            "Tags": if e.service.tags.is_empty() { Value::Null } else { json!(e.service.tags) },
            "Address": e.service.address, "Port": e.service.port, "Meta": e.service.meta,
            "Weights": {"Passing": e.service.weights.passing, "Warning": e.service.weights.warning},
            "EnableTagOverride": false, "Proxy": {"MeshGateway": {}, "Expose": {}}, "Connect": {}
        },
        "Checks": e.checks.iter().map(|c| json!({
            "Node": c.node, "CheckID": c.check_id, "Name": c.name, "Status": c.status.as_str(),
            "Notes": "", "Output": c.output, "ServiceID": c.service_id, "ServiceName": "",
            "ServiceTags": [], "Type": "ttl", "Definition": {}, "CreateIndex": 14, "ModifyIndex": 14
        })).collect::<Vec<_>>(),
    })
}

fn pair() -> impl Strategy<Value = KvPair> {
    (
        "[a-z0-9/_-]{1,20}",
        (any::<u64>(), any::<u64>(), any::<u64>(), any::<u64>()),
        prop::option::of(prop::collection::vec(any::<u8>(), 0..64)),
        prop::option::of("[0-9a-f-]{1,36}"),
    )
        .prop_map(
            |(key, (create_index, modify_index, lock_index, flags), value, session)| KvPair {
                key,
                create_index,
                modify_index,
                lock_index,
                flags,
                value: value.map(Into::into),
                session,
            },
        )
}

fn pair_json(p: &KvPair) -> Value {
    let mut v = json!({
        "LockIndex": p.lock_index, "Key": p.key, "Flags": p.flags,
        "Value": p.value.as_ref().map(|v| base64::engine::general_purpose::STANDARD.encode(v)),
        "CreateIndex": p.create_index, "ModifyIndex": p.modify_index,
    });
    if let Some(session) = &p.session {
        v["Session"] = json!(session);
    }
    v
}

/// A session's fields as generated: id, name, node, lock delay, behavior,
/// TTL (whole seconds), service checks, create index.
type SessionParts = (
    String,
    String,
    String,
    Duration,
    SessionBehavior,
    Option<Duration>,
    Vec<String>,
    u64,
);

fn session_parts() -> impl Strategy<Value = SessionParts> {
    (
        ("[0-9a-f-]{1,36}", text(), text()),
        (0u64..=u64::MAX, any::<bool>(), prop::option::of(1u64..=86_400)),
        (prop::collection::vec(text(), 0..3), any::<u64>()),
    )
        .prop_map(|((id, name, node), (nanos, delete, ttl), (checks, index))| {
            (
                id,
                name,
                node,
                Duration::from_nanos(nanos),
                if delete {
                    SessionBehavior::Delete
                } else {
                    SessionBehavior::Release
                },
                ttl.map(Duration::from_secs),
                checks,
                index,
            )
        })
}

fn session_json(s: &SessionParts) -> Value {
    let (id, name, node, lock_delay, behavior, ttl, checks, index) = s;
    json!({
        "ID": id, "Name": name, "Node": node, "LockDelay": lock_delay.as_nanos() as u64,
        "Behavior": behavior, "TTL": ttl.map(crate::duration::format).unwrap_or_default(),
        "NodeChecks": [], "ServiceChecks": checks.iter().map(|c| json!({"ID": c, "Namespace": ""})).collect::<Vec<_>>(),
        "CreateIndex": index, "ModifyIndex": index
    })
}

/// The invariant every list decoder keeps: it succeeds only on a JSON array.
fn only_arrays_decode<T>(bytes: &[u8], result: &Result<Vec<T>, crate::Error>) -> Result<(), TestCaseError> {
    if let Ok(list) = result {
        let value: Value = serde_json::from_slice(bytes).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert!(value.is_array(), "decoded {} entries from a non-array", list.len());
        prop_assert_eq!(value.as_array().map(Vec::len), Some(list.len()));
    }
    Ok(())
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn random_bytes_never_panic_and_never_make_a_list(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        only_arrays_decode(&bytes, &decode_entries("health/service/web", &bytes))?;
        only_arrays_decode(&bytes, &decode_sessions("session/info/x", &bytes))?;
        if decode_pair("kv/k", &bytes).is_ok() {
            let value: Value = serde_json::from_slice(&bytes).unwrap();
            prop_assert_eq!(value.as_array().map(Vec::len), Some(1));
        }
    }

    #[test]
    fn random_json_never_panics_and_only_arrays_make_a_list(value in any_json()) {
        let bytes = serde_json::to_vec(&value).unwrap();
        only_arrays_decode(&bytes, &decode_entries("health/service/web", &bytes))?;
        only_arrays_decode(&bytes, &decode_sessions("session/info/x", &bytes))?;
        if decode_pair("kv/k", &bytes).is_ok() {
            prop_assert_eq!(value.as_array().map(Vec::len), Some(1));
        }
        // Errors stay short whatever the body holds.
        if let Err(e) = decode_entries("health/service/web", &bytes) {
            prop_assert!(e.to_string().len() < 1024, "{}", e);
        }
    }

    #[test]
    fn entries_in_random_json_never_panic(entries in prop::collection::vec(any_json(), 0..4)) {
        // Arrays of almost-entries: a list, but of what?
        let bytes = serde_json::to_vec(&entries).unwrap();
        only_arrays_decode(&bytes, &decode_entries("health/service/web", &bytes))?;
        only_arrays_decode(&bytes, &decode_sessions("session/info/x", &bytes))?;
        let _may_fail = decode_pair("kv/k", &bytes);
    }

    #[test]
    fn health_entries_round_trip(entries in prop::collection::vec(entry(), 0..6)) {
        let wire = Value::Array(entries.iter().map(entry_json).collect());
        let decoded = decode_entries("health/service/web", &serde_json::to_vec(&wire).unwrap()).unwrap();
        prop_assert_eq!(decoded, entries);
    }

    #[test]
    fn kv_pairs_round_trip(pair in pair()) {
        let wire = json!([pair_json(&pair)]);
        let decoded = decode_pair("kv/k", &serde_json::to_vec(&wire).unwrap()).unwrap();
        prop_assert_eq!(decoded, pair);
    }

    #[test]
    fn kv_values_that_are_not_base64_are_errors(pair in pair(), junk in "[^A-Za-z0-9+/=]{1,8}") {
        let mut wire = pair_json(&pair);
        wire["Value"] = json!(junk);
        let err = decode_pair("kv/k", &serde_json::to_vec(&json!([wire])).unwrap()).unwrap_err();
        prop_assert!(err.to_string().contains("base64"), "{}", err);
    }

    #[test]
    fn sessions_round_trip(parts in prop::collection::vec(session_parts(), 0..4)) {
        let wire = Value::Array(parts.iter().map(session_json).collect());
        let decoded = decode_sessions("session/info/x", &serde_json::to_vec(&wire).unwrap()).unwrap();
        prop_assert_eq!(decoded.len(), parts.len());
        for (info, (id, name, node, lock_delay, behavior, ttl, checks, index)) in decoded.iter().zip(&parts) {
            prop_assert_eq!(&info.id, id);
            prop_assert_eq!(&info.name, name);
            prop_assert_eq!(&info.node, node);
            prop_assert_eq!(info.lock_delay, *lock_delay);
            prop_assert_eq!(info.behavior, *behavior);
            prop_assert_eq!(info.ttl, *ttl);
            prop_assert_eq!(info.service_checks.iter().map(|c| &c.id).collect::<Vec<_>>(), checks.iter().collect::<Vec<_>>());
            prop_assert_eq!(info.create_index, *index);
        }
    }

    #[test]
    fn clipped_text_is_a_short_prefix(text in "\\PC{0,600}", extra in 0u64..1 << 40) {
        for total in [BodyLength::Exactly(text.len() as u64), BodyLength::AtLeast(text.len() as u64 + extra)] {
            let clipped = clip_text(&text, total);
            // The kept prefix, plus a marker of at most 40 bytes.
            prop_assert!(clipped.len() <= MAX_ERROR_TEXT_BYTES + 40, "{} bytes", clipped.len());
            let kept = clipped.split("… (").next().unwrap();
            prop_assert!(text.starts_with(kept));
            if text.len() <= MAX_ERROR_TEXT_BYTES && matches!(total, BodyLength::Exactly(_)) {
                prop_assert_eq!(&clipped, &text);
            }
        }
    }
}

#[test]
fn null_and_non_arrays_are_errors_not_empty_lists() {
    for body in [&b"null"[..], b"{}", b"\"\"", b"0", b"", b"[", b"[{}", b"<html>"] {
        assert!(decode_entries("health/service/web", body).is_err(), "{body:?}");
        assert!(decode_sessions("session/info/x", body).is_err(), "{body:?}");
        assert!(decode_pair("kv/k", body).is_err(), "{body:?}");
    }
    // A single-key read answered 200 with no entry is garbage, not "absent".
    assert!(decode_pair("kv/k", b"[]").is_err());
    assert!(decode_entries("health/service/web", b"[]").unwrap().is_empty());
    assert!(decode_sessions("session/info/x", b"[]").unwrap().is_empty());
}
