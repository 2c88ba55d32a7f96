//! Records as Sparkplug metrics (docs/sparkplug.md): a tag record becomes a
//! metric of its tag's datatype, a derived record a String metric holding
//! its JSON `data`, an event a String metric holding the JSON event of
//! docs/mqtt.md. Every one carries the record's `epoch` and `seq` as
//! properties, so consumers still deduplicate and find gaps.

use serde::Deserialize;
use serde_json::Value;

use super::proto::{DataType, Metric, MetricValue, PropertySet, PropertyValueKind};
use crate::record::StoredRecord;

/// The `Quality` property Ignition reads (its legacy quality codes): good
/// values carry none.
pub const QUALITY_BAD: u32 = 0;
pub const QUALITY_UNCERTAIN: u32 = 64;

/// What a tag record's `data` holds (docs/mqtt.md, tag records).
#[derive(Debug, Deserialize)]
struct TagData {
    name: String,
    #[serde(default)]
    value: Value,
    #[serde(default)]
    quality: String,
    #[serde(default)]
    status: String,
    /// The OPC UA built-in type of the value, when there is one.
    #[serde(default, rename = "type")]
    opcua_type: Option<String>,
}

/// A tag record as a metric, before an alias and properties are added.
#[derive(Debug, Clone, PartialEq)]
pub struct TagMetric {
    pub name: String,
    /// None while the tag never had a value (a bad record of a tag whose
    /// type is not known yet).
    pub datatype: Option<DataType>,
    pub value: Option<MetricValue>,
    /// `Quality` property: None for good values.
    pub quality: Option<u32>,
    /// The OPC UA status name when not Good.
    pub status: Option<String>,
}

/// A tag record's data that is not the JSON plantgate writes.
#[derive(Debug, thiserror::Error)]
#[error("tag record seq {seq} is not a tag value: {reason}")]
pub struct NotATag {
    pub seq: u64,
    pub reason: String,
}

/// Reads a tag record's data.
pub fn tag_metric(record: &StoredRecord) -> Result<TagMetric, NotATag> {
    let data: TagData = serde_json::from_str(&record.data).map_err(|e| NotATag {
        seq: record.seq,
        reason: e.to_string(),
    })?;
    let quality = match data.quality.as_str() {
        "good" => None,
        "uncertain" => Some(QUALITY_UNCERTAIN),
        _ => Some(QUALITY_BAD),
    };
    let status = (data.status != "Good" && !data.status.is_empty()).then_some(data.status);
    let datatype = datatype_of(data.opcua_type.as_deref(), &data.value);
    let (datatype, value) = match datatype {
        Some(dt) => match value_of(dt, &data.value) {
            Some(v) => (Some(dt), Some(v)),
            // A value that does not fit its declared type (never from
            // plantgate's own records): kept as text rather than lost.
            None if !data.value.is_null() => (
                Some(DataType::String),
                Some(MetricValue::String(json_text(&data.value))),
            ),
            None => (Some(dt), None),
        },
        None => (None, None),
    };
    Ok(TagMetric {
        name: data.name,
        datatype,
        value,
        quality,
        status,
    })
}

/// The Sparkplug datatype for an OPC UA built-in type name; without one
/// (older records), what the JSON value itself says. None for a null value
/// of unknown type.
pub fn datatype_of(opcua_type: Option<&str>, value: &Value) -> Option<DataType> {
    if let Some(t) = opcua_type {
        return Some(match t {
            "Boolean" => DataType::Boolean,
            "SByte" => DataType::Int8,
            "Byte" => DataType::UInt8,
            "Int16" => DataType::Int16,
            "UInt16" => DataType::UInt16,
            "Int32" => DataType::Int32,
            "UInt32" => DataType::UInt32,
            "Int64" => DataType::Int64,
            "UInt64" => DataType::UInt64,
            "Float" => DataType::Float,
            "Double" => DataType::Double,
            "DateTime" => DataType::DateTime,
            // Text, ids, arrays and structures: their JSON form as text.
            _ => DataType::String,
        });
    }
    match value {
        Value::Null => None,
        Value::Bool(_) => Some(DataType::Boolean),
        Value::Number(n) if n.is_i64() => Some(DataType::Int64),
        Value::Number(n) if n.is_u64() => Some(DataType::UInt64),
        Value::Number(_) => Some(DataType::Double),
        _ => Some(DataType::String),
    }
}

/// `value` in the field `datatype` uses; None for null, or a value that
/// does not fit the type.
pub fn value_of(datatype: DataType, value: &Value) -> Option<MetricValue> {
    if value.is_null() {
        return None;
    }
    // Signed values travel in two's complement (the specification; Tahu
    // reads Int8/16/32 back through an Int32Array, Int64 through toSigned).
    let int = |lo: i64, hi: i64| {
        let n = value.as_i64().filter(|n| (lo..=hi).contains(n))?;
        Some(MetricValue::Int(n as i32 as u32))
    };
    let uint = |hi: u64| {
        let n = value.as_u64().filter(|n| *n <= hi)?;
        Some(MetricValue::Int(n as u32))
    };
    match datatype {
        DataType::Boolean => value.as_bool().map(MetricValue::Boolean),
        DataType::Int8 => int(i8::MIN.into(), i8::MAX.into()),
        DataType::Int16 => int(i16::MIN.into(), i16::MAX.into()),
        DataType::Int32 => int(i32::MIN.into(), i32::MAX.into()),
        DataType::UInt8 => uint(u8::MAX.into()),
        DataType::UInt16 => uint(u16::MAX.into()),
        DataType::UInt32 => value
            .as_u64()
            .filter(|n| *n <= u64::from(u32::MAX))
            .map(MetricValue::Long),
        DataType::Int64 => value.as_i64().map(|n| MetricValue::Long(n as u64)),
        DataType::UInt64 => value.as_u64().map(MetricValue::Long),
        DataType::Float => value.as_f64().map(|f| MetricValue::Float(f as f32)),
        DataType::Double => value.as_f64().map(MetricValue::Double),
        DataType::DateTime => value
            .as_str()
            .and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok())
            .and_then(|t| u64::try_from(t.timestamp_millis()).ok())
            .map(MetricValue::Long),
        DataType::String => Some(MetricValue::String(match value {
            Value::String(s) => s.clone(),
            other => json_text(other),
        })),
        DataType::Bytes => None,
    }
}

fn json_text(v: &Value) -> String {
    v.to_string()
}

/// The properties every record's metric carries: where it sits in its
/// stream, and whether it is sent again on request.
pub fn record_properties(epoch: &str, seq: u64, replay: bool) -> PropertySet {
    let mut p = PropertySet::default();
    p.push(
        "epoch",
        DataType::String,
        PropertyValueKind::String(epoch.to_string()),
    );
    p.push("seq", DataType::UInt64, PropertyValueKind::Long(seq));
    if replay {
        p.push(
            "replay",
            DataType::Boolean,
            PropertyValueKind::Boolean(true),
        );
    }
    p
}

/// A data message's metric: by alias, at the record's time.
pub fn data_metric(
    alias: u64,
    datatype: DataType,
    ts_ms: i64,
    value: Option<MetricValue>,
    historical: bool,
    properties: PropertySet,
) -> Metric {
    Metric {
        name: None,
        alias: Some(alias),
        timestamp: Some(ms(ts_ms)),
        // Given in data messages too: decoders (Tahu's among them) read the
        // value through it, and it costs two bytes.
        datatype: Some(datatype.code()),
        is_historical: historical.then_some(true),
        is_transient: None,
        is_null: value.is_none().then_some(true),
        properties: (!properties.keys.is_empty()).then_some(properties),
        value,
    }
}

/// A timestamp as Sparkplug carries it (ms, never negative).
pub fn ms(ts_ms: i64) -> u64 {
    u64::try_from(ts_ms).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{Kind, RecordId};
    use serde_json::json;

    fn tag(data: Value) -> StoredRecord {
        StoredRecord {
            id: RecordId { stream: 1, seq: 7 },
            connection: "c".into(),
            kind: Kind::Tag,
            seq: 7,
            ts_ms: 1_000,
            data: data.to_string(),
        }
    }

    #[test]
    fn opcua_types_map_to_sparkplug_datatypes() {
        let cases = [
            (
                "Boolean",
                json!(true),
                DataType::Boolean,
                MetricValue::Boolean(true),
            ),
            (
                "SByte",
                json!(-1),
                DataType::Int8,
                MetricValue::Int(u32::MAX),
            ),
            ("Byte", json!(255), DataType::UInt8, MetricValue::Int(255)),
            (
                "Int16",
                json!(-300),
                DataType::Int16,
                MetricValue::Int(-300i32 as u32),
            ),
            (
                "UInt16",
                json!(65535),
                DataType::UInt16,
                MetricValue::Int(65535),
            ),
            (
                "Int32",
                json!(i32::MIN),
                DataType::Int32,
                MetricValue::Int(i32::MIN as u32),
            ),
            (
                "UInt32",
                json!(u32::MAX),
                DataType::UInt32,
                MetricValue::Long(u64::from(u32::MAX)),
            ),
            (
                "Int64",
                json!(-5),
                DataType::Int64,
                MetricValue::Long(-5i64 as u64),
            ),
            (
                "UInt64",
                json!(u64::MAX),
                DataType::UInt64,
                MetricValue::Long(u64::MAX),
            ),
            (
                "Float",
                json!(1.5),
                DataType::Float,
                MetricValue::Float(1.5),
            ),
            (
                "Double",
                json!(41.76),
                DataType::Double,
                MetricValue::Double(41.76),
            ),
            (
                "String",
                json!("B-17"),
                DataType::String,
                MetricValue::String("B-17".into()),
            ),
            (
                "DateTime",
                json!("2026-11-28T10:00:00.123Z"),
                DataType::DateTime,
                MetricValue::Long(1_795_860_000_123),
            ),
            (
                "LocalizedText",
                json!("hi"),
                DataType::String,
                MetricValue::String("hi".into()),
            ),
            (
                "Double[]",
                json!([1.0, 2.5]),
                DataType::String,
                MetricValue::String("[1.0,2.5]".into()),
            ),
        ];
        for (t, v, dt, mv) in cases {
            let m = tag_metric(&tag(
                json!({"name":"T","node":"n","quality":"good","status":"Good","type":t,"value":v}),
            ))
            .expect("a tag");
            assert_eq!(m.datatype, Some(dt), "{t}");
            assert_eq!(m.value, Some(mv), "{t}");
            assert_eq!(m.quality, None);
        }
    }

    #[test]
    fn bad_values_are_null_with_a_quality() {
        let m = tag_metric(&tag(json!({"name":"T","node":"n","quality":"bad",
            "status":"BadNodeIdUnknown","value":null})))
        .expect("a tag");
        assert_eq!(m.datatype, None);
        assert_eq!(m.value, None);
        assert_eq!(m.quality, Some(QUALITY_BAD));
        assert_eq!(m.status.as_deref(), Some("BadNodeIdUnknown"));
        let m = tag_metric(&tag(json!({"name":"T","node":"n","quality":"uncertain",
            "status":"UncertainLastUsableValue","type":"Double","value":2.0})))
        .expect("a tag");
        assert_eq!(m.datatype, Some(DataType::Double));
        assert_eq!(m.value, Some(MetricValue::Double(2.0)));
        assert_eq!(m.quality, Some(QUALITY_UNCERTAIN));
    }

    #[test]
    fn values_out_of_their_type_become_text_and_untyped_values_are_inferred() {
        let m = tag_metric(&tag(
            json!({"name":"T","quality":"good","status":"Good","type":"Byte","value":300}),
        ))
        .expect("a tag");
        assert_eq!(m.datatype, Some(DataType::String));
        assert_eq!(m.value, Some(MetricValue::String("300".into())));
        let m = tag_metric(&tag(
            json!({"name":"T","quality":"good","status":"Good","value":-3}),
        ))
        .expect("a tag");
        assert_eq!(m.datatype, Some(DataType::Int64));
        let m = tag_metric(&tag(
            json!({"name":"T","quality":"good","status":"Good","value":0.5}),
        ))
        .expect("a tag");
        assert_eq!(m.datatype, Some(DataType::Double));
        assert!(tag_metric(&tag(json!({"value": 1}))).is_err(), "no name");
    }

    #[test]
    fn properties_carry_epoch_seq_and_replay() {
        let p = record_properties("e1", 42, true);
        assert_eq!(
            p.get("epoch"),
            Some(&PropertyValueKind::String("e1".into()))
        );
        assert_eq!(p.get("seq"), Some(&PropertyValueKind::Long(42)));
        assert_eq!(p.get("replay"), Some(&PropertyValueKind::Boolean(true)));
        assert!(record_properties("e1", 1, false).get("replay").is_none());
    }
}
