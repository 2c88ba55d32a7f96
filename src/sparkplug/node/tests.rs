use prost::Message as _;
use serde_json::json;

use super::*;
use crate::record::RecordId;

fn node() -> EdgeNode {
    EdgeNode::new(
        "plant1",
        "gw1",
        &[
            DeviceSpec {
                id: "dv".into(),
                derived: vec![Kind::Batch, Kind::Recipe],
            },
            DeviceSpec {
                id: "mes".into(),
                derived: vec![Kind::Oee, Kind::Downtime],
            },
        ],
    )
}

fn tag(seq: u64, name: &str, t: &str, v: serde_json::Value) -> StoredRecord {
    StoredRecord {
        id: RecordId {
            stream: 1,
            seq: seq as i64,
        },
        connection: "dv".into(),
        kind: Kind::Tag,
        seq,
        ts_ms: 1_000 + seq as i64,
        data: json!({"name":name,"node":"n","quality":"good","status":"Good","type":t,"value":v})
            .to_string(),
    }
}

fn decode(bytes: &[u8]) -> Payload {
    Payload::decode(bytes).expect("a Sparkplug payload")
}

fn by_name<'a>(p: &'a Payload, name: &str) -> &'a Metric {
    p.metrics
        .iter()
        .find(|m| m.name.as_deref() == Some(name))
        .unwrap_or_else(|| panic!("no metric {name} in {p:?}"))
}

#[test]
fn nbirth_carries_bdseq_and_rebirth_and_starts_seq_at_zero() {
    let mut n = node();
    n.start_session(7);
    let (topic, will) = n.ndeath(7, 5);
    assert_eq!(topic, "spBv1.0/plant1/NDEATH/gw1");
    let will = decode(&will);
    assert_eq!(will.seq, None);
    assert_eq!(by_name(&will, BD_SEQ).value, Some(MetricValue::Long(7)));

    let status = NodeStatus {
        ts_ms: 10,
        version: "0.1.0".into(),
        connections: vec![("dv".into(), "online".into())],
        ..Default::default()
    };
    let (topic, body, qos0) = n.seal(n.nbirth(&status));
    assert_eq!(topic, "spBv1.0/plant1/NBIRTH/gw1");
    assert!(qos0);
    let birth = decode(&body);
    assert_eq!(birth.seq, Some(0));
    assert_eq!(by_name(&birth, BD_SEQ).value, Some(MetricValue::Long(7)));
    assert_eq!(
        by_name(&birth, REBIRTH).value,
        Some(MetricValue::Boolean(false))
    );
    assert_eq!(
        by_name(&birth, "Status/connections/dv").value,
        Some(MetricValue::String("online".into()))
    );
    assert_eq!(
        by_name(&birth, "Status/connections/mes").value,
        Some(MetricValue::String("unknown".into()))
    );
    assert_eq!(by_name(&birth, EVENT).is_null, Some(true));
    // Every alias in the birth is distinct.
    let mut aliases: Vec<u64> = birth.metrics.iter().filter_map(|m| m.alias).collect();
    let n_aliases = aliases.len();
    aliases.sort_unstable();
    aliases.dedup();
    assert_eq!(aliases.len(), n_aliases);
}

#[test]
fn seq_counts_every_sealed_message_and_wraps_after_255() {
    let mut n = node();
    n.start_session(0);
    let status = NodeStatus::default();
    let (_, b, _) = n.seal(n.nbirth(&status));
    assert_eq!(decode(&b).seq, Some(0));
    let mut last = 0;
    for _ in 0..300 {
        let (_, b, qos0) = n.seal(n.status(&status));
        assert!(qos0, "the status NDATA goes at QoS 0");
        let seq = decode(&b).seq.expect("a seq");
        assert_eq!(seq, (last + 1) % 256);
        last = seq;
    }
    // A new NBIRTH (a rebirth) starts again at 0.
    let (_, b, _) = n.seal(n.nbirth(&status));
    assert_eq!(decode(&b).seq, Some(0));
}

#[test]
fn a_new_tag_is_declared_in_a_dbirth_before_its_ddata() {
    let mut n = node();
    n.start_session(1);
    assert!(n.needs_birth("dv"));
    let b = n.dbirth("dv", 50).expect("a device");
    assert!(!n.needs_birth("dv"));
    // Before any data: the derived metrics only, as null Strings.
    let names: Vec<_> = b
        .payload
        .metrics
        .iter()
        .filter_map(|m| m.name.clone())
        .collect();
    assert_eq!(names, ["batch", "recipe"]);
    assert!(b.payload.metrics.iter().all(|m| m.is_null == Some(true)));

    let recs = [
        tag(1, "FIC-101.PV", "Double", json!(41.5)),
        tag(2, "FIC-101.PV", "Double", json!(42.0)),
    ];
    let d = n.ddata("dv", &recs, "ep", 0, false, 60);
    assert!(n.needs_birth("dv"), "a new tag makes the birth stale");
    let b = n.dbirth("dv", 61).expect("a device");
    let declared = by_name(&b.payload, "FIC-101.PV");
    assert_eq!(declared.datatype, Some(DataType::Double.code()));
    assert_eq!(
        declared.value,
        Some(MetricValue::Double(42.0)),
        "the last value"
    );
    assert_eq!(
        declared.properties, None,
        "a good tag's BIRTH metric stays small"
    );
    let alias = declared.alias.expect("an alias");
    for (m, r) in d.payload.metrics.iter().zip(&recs) {
        assert_eq!(m.name, None, "data messages use the alias alone");
        assert_eq!(m.alias, Some(alias));
        assert_eq!(m.timestamp, Some(r.ts_ms as u64));
        let p = m.properties.as_ref().expect("properties");
        assert_eq!(p.get("seq"), Some(&PropertyValueKind::Long(r.seq)));
        assert_eq!(
            p.get("epoch"),
            Some(&PropertyValueKind::String("ep".into()))
        );
    }
    // The same tag again: nothing new to declare.
    n.ddata(
        "dv",
        &[tag(3, "FIC-101.PV", "Double", json!(1.0))],
        "ep",
        0,
        false,
        70,
    );
    assert!(!n.needs_birth("dv"));
    // A changed type: declared again.
    n.ddata(
        "dv",
        &[tag(4, "FIC-101.PV", "Int32", json!(1))],
        "ep",
        0,
        false,
        80,
    );
    assert!(n.needs_birth("dv"));
    let b = n.dbirth("dv", 81).expect("a device");
    let declared = by_name(&b.payload, "FIC-101.PV");
    assert_eq!(declared.datatype, Some(DataType::Int32.code()));
    assert_eq!(declared.alias, Some(alias), "the alias stays");
}

#[test]
fn derived_records_are_string_metrics_and_history_is_flagged() {
    let mut n = node();
    n.start_session(1);
    let r = StoredRecord {
        id: RecordId { stream: 2, seq: 9 },
        connection: "dv".into(),
        kind: Kind::Batch,
        seq: 9,
        ts_ms: 5,
        data: r#"{"unit":"R1","event":"batch_started"}"#.into(),
    };
    let d = n.ddata("dv", std::slice::from_ref(&r), "ep", u64::MAX, true, 6);
    let m = &d.payload.metrics[0];
    assert_eq!(m.datatype, Some(DataType::String.code()));
    assert_eq!(m.value, Some(MetricValue::String(r.data.clone())));
    assert_eq!(m.is_historical, Some(true));
    let p = m.properties.as_ref().expect("properties");
    assert_eq!(p.get("replay"), Some(&PropertyValueKind::Boolean(true)));
    let b = n.dbirth("dv", 7).expect("a device");
    assert_eq!(
        by_name(&b.payload, "batch").is_null,
        Some(true),
        "a replayed value is not the current one"
    );
    // A live one is, and its BIRTH metric keeps the record's epoch/seq.
    n.ddata("dv", std::slice::from_ref(&r), "ep", 0, false, 8);
    let b = n.dbirth("dv", 9).expect("a device");
    let batch = by_name(&b.payload, "batch");
    assert_eq!(batch.value, Some(MetricValue::String(r.data.clone())));
    let p = batch.properties.as_ref().expect("properties");
    assert_eq!(p.get("seq"), Some(&PropertyValueKind::Long(9)));
    assert_eq!(
        p.get("epoch"),
        Some(&PropertyValueKind::String("ep".into()))
    );
}

#[test]
fn bad_values_are_null_with_quality_and_keep_the_known_type() {
    let mut n = node();
    n.start_session(1);
    n.ddata("dv", &[tag(1, "T", "Float", json!(1.0))], "ep", 0, false, 1);
    n.dbirth("dv", 2);
    let bad = StoredRecord {
        data:
            json!({"name":"T","node":"n","quality":"bad","status":"BadNodeIdUnknown","value":null})
                .to_string(),
        ..tag(2, "T", "Float", json!(0))
    };
    let d = n.ddata("dv", &[bad], "ep", 0, false, 3);
    assert!(!n.needs_birth("dv"), "a null keeps the declared type");
    let m = &d.payload.metrics[0];
    assert_eq!(m.is_null, Some(true));
    assert_eq!(m.value, None);
    assert_eq!(m.datatype, Some(DataType::Float.code()));
    let p = m.properties.as_ref().expect("properties");
    assert_eq!(
        p.get("Quality"),
        Some(&PropertyValueKind::Int(metric::QUALITY_BAD))
    );
    assert_eq!(
        p.get("status"),
        Some(&PropertyValueKind::String("BadNodeIdUnknown".into()))
    );
}

#[test]
fn aliases_are_unique_across_devices_and_deaths_follow_births() {
    let mut n = node();
    n.start_session(1);
    n.ddata(
        "dv",
        &[tag(1, "A", "Double", json!(1.0))],
        "ep",
        0,
        false,
        1,
    );
    n.ddata(
        "mes",
        &[tag(1, "A", "Double", json!(1.0))],
        "ep",
        0,
        false,
        1,
    );
    let mut aliases = Vec::new();
    for dev in ["dv", "mes"] {
        let b = n.dbirth(dev, 2).expect("a device");
        aliases.extend(b.payload.metrics.iter().filter_map(|m| m.alias));
    }
    let nb = n.nbirth(&NodeStatus::default());
    aliases.extend(nb.payload.metrics.iter().filter_map(|m| m.alias));
    let total = aliases.len();
    aliases.sort_unstable();
    aliases.dedup();
    assert_eq!(
        aliases.len(),
        total,
        "aliases are unique within the edge node"
    );

    assert_eq!(n.born(), ["dv", "mes"]);
    assert!(n.ddeath("dv", 3).is_some());
    assert!(n.ddeath("dv", 4).is_none(), "one death per birth");
    assert!(!n.is_born("dv"));
    n.start_session(2);
    assert!(
        n.born().is_empty(),
        "a new session starts with nothing born"
    );
    assert!(n.dbirth("nope", 1).is_none());
}

#[test]
fn commands_rebirth_or_refused() {
    let n = node();
    let ncmd = |metrics: Vec<Metric>| {
        Payload {
            metrics,
            ..Default::default()
        }
        .encode_to_vec()
    };
    let rebirth = Metric {
        name: Some(REBIRTH.into()),
        datatype: Some(DataType::Boolean.code()),
        value: Some(MetricValue::Boolean(true)),
        ..Default::default()
    };
    assert_eq!(
        n.command("spBv1.0/plant1/NCMD/gw1", &ncmd(vec![rebirth.clone()])),
        Command::Rebirth
    );
    let write = Metric {
        name: Some("FIC-101.SP".into()),
        value: Some(MetricValue::Double(1.0)),
        ..Default::default()
    };
    let Command::Refused { what } = n.command(
        "spBv1.0/plant1/NCMD/gw1",
        &ncmd(vec![rebirth.clone(), write]),
    ) else {
        panic!("a write is refused");
    };
    assert!(what.contains("FIC-101.SP"), "{what}");
    assert!(matches!(
        n.command("spBv1.0/plant1/DCMD/gw1/dv", &ncmd(vec![rebirth])),
        Command::Refused { .. }
    ));
    assert!(matches!(
        n.command("spBv1.0/plant1/NCMD/gw1", b"\xff\xff not protobuf"),
        Command::Refused { .. }
    ));
    assert!(matches!(
        n.command("spBv1.0/plant1/NCMD/gw1", &ncmd(vec![])),
        Command::Refused { .. }
    ));
}

#[test]
fn sizes_per_metric_stay_small() {
    // What docs/sparkplug.md ("Sizes") says: a DBIRTH takes about 20 bytes
    // per tag plus its name (31 with these 12-character names), a DDATA
    // metric about 76.
    let mut n = node();
    n.start_session(1);
    let epoch = "5b0e8f6c2d1a4e7f9c3b8a6d2e1f0c47";
    let recs: Vec<StoredRecord> = (0..100)
        .map(|i| {
            tag(
                i + 1,
                &format!("TAG-{i:05}.PV"),
                "Double",
                json!(41.5 + i as f64),
            )
        })
        .collect();
    let d = n.ddata("dv", &recs, epoch, 0, false, 1);
    let per_data = d.sealed_len() / recs.len();
    let b = n.dbirth("dv", 2).expect("a device");
    let per_birth = b.sealed_len() / b.payload.metrics.len();
    assert!(per_data <= 80, "{per_data} bytes per DDATA metric");
    assert!(per_birth <= 34, "{per_birth} bytes per DBIRTH metric");
    println!("DDATA {per_data} B/metric, DBIRTH {per_birth} B/metric");
}
