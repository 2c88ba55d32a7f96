//! OPC UA values -> the `tag` record of docs/mqtt.md. Total functions: any value a
//! server sends maps to some JSON, never to a panic.

use opcua::types::{DataValue, DateTime, StatusCode, Variant};
use serde_json::{json, Value};

use crate::record::{now_ms, Kind, NewRecord};

/// Limit of one string in a tag value, in UTF-8 bytes. A longer string is
/// cut at a char boundary and ends with [`TRUNCATED_MARKER`], the whole being
/// at most this long: one record must fit an MQTT message (`max_message_bytes`,
/// 128 KiB by default), and a runaway string must not stop the other tags.
/// ByteStrings count by their base64 text.
pub const MAX_STRING_BYTES: usize = 16 * 1024;

/// Limit of a whole tag value as JSON (about: escapes are not counted).
/// Arrays past it keep their first elements and end with a
/// [`TRUNCATED_MARKER`] string element.
pub const MAX_VALUE_BYTES: usize = 64 * 1024;

/// Ends every truncated string, and closes every truncated array.
pub const TRUNCATED_MARKER: &str = "…[truncated]";

/// Strings and arrays cut to the limits above, process-wide: a cut value
/// says so in the data itself, and this count (`/metrics`,
/// `plantgate_values_truncated_total`) tells an operator how often.
static TRUNCATED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Values cut so far (strings and arrays; one value may count more than once).
pub fn truncated_total() -> u64 {
    TRUNCATED.load(std::sync::atomic::Ordering::Relaxed)
}

fn count_truncation() {
    TRUNCATED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

/// A String or ByteString longer than this (bytes as the server sent them)
/// makes the whole value too large for a record: the tag gets a `bad` record
/// with status [`TOO_LARGE_STATUS`] and a null value instead, and the loss is
/// counted (docs/guarantees.md). 65 535 is the limit OPC UA stacks apply by
/// default (the one that used to take the whole connection down): a value
/// below it is read as it always was (cut to the limits above, with the
/// marker); one above it is a blob (a file, an image, a runaway buffer) that
/// no cut makes useful, and it must not reach the buffer or MQTT.
pub const MAX_STRING_VALUE_BYTES: usize = 65_535;

/// The status of the `bad` record that replaces a value over
/// [`MAX_STRING_VALUE_BYTES`].
pub const TOO_LARGE_STATUS: StatusCode = StatusCode::BadEncodingLimitsExceeded;

/// What a number, bool or null is charged against the value budget.
const SCALAR_COST: usize = 24;

/// Nesting guard for Variant-in-Variant / DataValue-in-Variant.
const MAX_DEPTH: usize = 8;

pub fn quality(status: StatusCode) -> &'static str {
    if status.is_good() {
        "good"
    } else if status.is_uncertain() {
        "uncertain"
    } else {
        "bad"
    }
}

/// `Good` or the status code's symbolic name, e.g. `BadNodeIdUnknown`
/// (info bits such as overflow are not part of the name).
pub fn status_name(status: StatusCode) -> String {
    status.sub_code().to_string()
}

fn datetime_ms(dt: &DateTime) -> Option<i64> {
    if dt.is_null() {
        return None;
    }
    Some(dt.as_chrono().timestamp_millis())
}

fn rfc3339(dt: &DateTime) -> Value {
    match datetime_ms(dt) {
        Some(ms) => Value::String(crate::record::format_ts(ms)),
        None => Value::Null,
    }
}

/// `s` within the string limit and what is left of the value budget.
fn cut(s: &str, budget: &mut usize) -> String {
    let limit = MAX_STRING_BYTES
        .min(budget.saturating_sub(2))
        .max(TRUNCATED_MARKER.len());
    let out = if s.len() <= limit {
        s.to_string()
    } else {
        let mut end = limit - TRUNCATED_MARKER.len();
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        count_truncation();
        format!("{}{TRUNCATED_MARKER}", &s[..end])
    };
    *budget = budget.saturating_sub(out.len() + 2);
    out
}

fn float(v: f64) -> Value {
    // JSON has no NaN/inf.
    serde_json::Number::from_f64(v)
        .map(Value::Number)
        .unwrap_or(Value::Null)
}

/// Any Variant as JSON, within [`MAX_VALUE_BYTES`] (see the limits above).
pub fn variant_to_json(v: &Variant) -> Value {
    let mut budget = MAX_VALUE_BYTES;
    to_json(v, 0, &mut budget)
}

fn to_json(v: &Variant, depth: usize, budget: &mut usize) -> Value {
    if depth > MAX_DEPTH {
        return Value::Null;
    }
    let scalar = |budget: &mut usize, value: Value| {
        *budget = budget.saturating_sub(SCALAR_COST);
        value
    };
    match v {
        Variant::Empty => scalar(budget, Value::Null),
        Variant::Boolean(b) => scalar(budget, Value::Bool(*b)),
        Variant::SByte(n) => scalar(budget, json!(n)),
        Variant::Byte(n) => scalar(budget, json!(n)),
        Variant::Int16(n) => scalar(budget, json!(n)),
        Variant::UInt16(n) => scalar(budget, json!(n)),
        Variant::Int32(n) => scalar(budget, json!(n)),
        Variant::UInt32(n) => scalar(budget, json!(n)),
        Variant::Int64(n) => scalar(budget, json!(n)),
        Variant::UInt64(n) => scalar(budget, json!(n)),
        Variant::Float(f) => scalar(budget, float(f64::from(*f))),
        Variant::Double(f) => scalar(budget, float(*f)),
        Variant::String(s) => match s.value() {
            Some(s) => Value::String(cut(s, budget)),
            None => scalar(budget, Value::Null),
        },
        Variant::DateTime(dt) => scalar(budget, rfc3339(dt)),
        Variant::Guid(g) => Value::String(cut(&g.to_string(), budget)),
        Variant::StatusCode(s) => Value::String(cut(&status_name(*s), budget)),
        Variant::ByteString(b) => {
            if b.is_null() {
                scalar(budget, Value::Null)
            } else {
                Value::String(cut(&b.as_base64(), budget))
            }
        }
        Variant::LocalizedText(t) => Value::String(cut(t.text.as_ref(), budget)),
        Variant::QualifiedName(q) => Value::String(cut(&q.to_string(), budget)),
        Variant::NodeId(n) => Value::String(cut(&n.to_string(), budget)),
        Variant::ExpandedNodeId(n) => Value::String(cut(&n.to_string(), budget)),
        Variant::Variant(inner) => to_json(inner, depth + 1, budget),
        Variant::DataValue(dv) => match &dv.value {
            Some(inner) => to_json(inner, depth + 1, budget),
            None => scalar(budget, Value::Null),
        },
        // Flattened (dimensions of a matrix are not kept).
        Variant::Array(a) => {
            let mut out = Vec::new();
            for v in a.values.iter() {
                // Room for at least one more element and the marker.
                if *budget < SCALAR_COST + TRUNCATED_MARKER.len() + 2 {
                    count_truncation();
                    out.push(Value::String(TRUNCATED_MARKER.to_string()));
                    break;
                }
                out.push(to_json(v, depth + 1, budget));
            }
            Value::Array(out)
        }
        // XmlElement, ExtensionObject, DiagnosticInfo: no natural JSON form.
        other => Value::String(cut(&format!("{other}"), budget)),
    }
}

/// The length of the first String or ByteString in `v` (nested variants and
/// arrays included) longer than [`MAX_STRING_VALUE_BYTES`], if any: such a
/// value is too large for a record. Cheap: no copy, stops at the first hit.
pub fn oversized(v: &Variant) -> Option<usize> {
    oversized_at(v, 0)
}

fn oversized_at(v: &Variant, depth: usize) -> Option<usize> {
    if depth > MAX_DEPTH {
        return None;
    }
    let len = match v {
        Variant::String(s) => s.value().as_ref().map_or(0, |s| s.len()),
        Variant::ByteString(b) => b.value.as_ref().map_or(0, Vec::len),
        Variant::LocalizedText(t) => t.text.value().as_ref().map_or(0, |s| s.len()),
        Variant::Variant(inner) => return oversized_at(inner, depth + 1),
        Variant::DataValue(dv) => {
            return dv.value.as_ref().and_then(|v| oversized_at(v, depth + 1))
        }
        Variant::Array(a) => return a.values.iter().find_map(|v| oversized_at(v, depth + 1)),
        _ => 0,
    };
    (len > MAX_STRING_VALUE_BYTES).then_some(len)
}

/// A tag's place in its connection's tag table: the same on every session
/// and retry, so it names the tag everywhere (its monitored item's client
/// handle, its subscription, its bad-tag bookkeeping).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct TagIndex(usize);

impl TagIndex {
    /// Tag `i` of its connection's tag table (`source::tags`).
    pub(crate) fn new(i: usize) -> TagIndex {
        TagIndex(i)
    }

    pub(crate) fn get(self) -> usize {
        self.0
    }

    /// The client handle of the tag's monitored item: index + 1, because the
    /// server echoes it in every notification and 0 reads as "unset".
    pub(crate) fn client_handle(self) -> u32 {
        u32::try_from(self.0 + 1).unwrap_or(u32::MAX)
    }

    /// The tag a notification's client handle names, if any.
    pub(crate) fn from_client_handle(handle: u32) -> Option<TagIndex> {
        (handle as usize).checked_sub(1).map(TagIndex)
    }
}

/// One tag's configuration as the record carries it.
#[derive(Clone, Debug)]
pub struct TagMeta {
    pub name: String,
    /// As configured (`nsu=` form kept), so consumers see what they wrote.
    pub node: String,
    /// `{"name":..,"node":..,"quality":"`: the part of every record of this
    /// tag that never changes, encoded once (keys in serde_json's order).
    head: Box<str>,
}

impl TagMeta {
    pub fn new(name: impl Into<String>, node: impl Into<String>) -> TagMeta {
        let (name, node) = (name.into(), node.into());
        let head = format!(
            "{{\"name\":{},\"node\":{},\"quality\":\"",
            Value::String(name.clone()),
            Value::String(node.clone())
        );
        TagMeta {
            name,
            node,
            head: head.into_boxed_str(),
        }
    }
}

/// Timestamp of a value: source, else server, else now (docs/mqtt.md).
pub fn value_ts_ms(dv: &DataValue) -> i64 {
    dv.source_timestamp
        .as_ref()
        .and_then(datetime_ms)
        .or_else(|| dv.server_timestamp.as_ref().and_then(datetime_ms))
        .unwrap_or_else(now_ms)
}

/// A value as its tag record (docs/mqtt.md). The hot path of the intake: written
/// straight into the record's text, scalars without an intermediate `Value`.
pub fn tag_record(connection: &str, tag: &TagMeta, dv: &DataValue) -> NewRecord {
    NewRecord {
        connection: connection.to_string(),
        kind: Kind::Tag,
        ts_ms: value_ts_ms(dv),
        data: tag_data(tag, dv.status(), dv.value.as_ref()),
    }
}

/// A value read back from the server's history (docs/backfill.md): the
/// tag record it would have been live, with `"backfill":true`. A value too
/// large for a record becomes the same bad record it would have been live.
pub fn backfill_record(connection: &str, tag: &TagMeta, dv: &DataValue) -> NewRecord {
    let mut record = match dv.value.as_ref().and_then(oversized) {
        Some(_) => too_large_record(connection, tag, dv),
        None => tag_record(connection, tag, dv),
    };
    // Both are a JSON object: the flag goes before its closing brace.
    if record.data.ends_with('}') {
        record.data.pop();
        record.data.push_str(",\"backfill\":true}");
    }
    record
}

/// `{"name":..,"node":..,"quality":..,"status":..,"type":..,"value":..}`,
/// the same text `json!` would give, without building the tree.
fn tag_data(tag: &TagMeta, status: StatusCode, value: Option<&Variant>) -> String {
    let mut out = Vec::with_capacity(tag.head.len() + 48);
    out.extend_from_slice(tag.head.as_bytes());
    out.extend_from_slice(quality(status).as_bytes());
    out.extend_from_slice(b"\",\"status\":");
    // Severity and sub-code all zero: plain Good (info bits aside), the
    // status of nearly every value; no formatting for it.
    if status.bits() & 0xFFFF_0000 == 0 {
        out.extend_from_slice(b"\"Good\"");
    } else {
        write_json(&mut out, &status_name(status));
    }
    // The OPC UA built-in type of the value (docs/mqtt.md): what a
    // consumer, and the Sparkplug format's datatypes, cannot tell from the
    // JSON number alone.
    if let Some(v) = value {
        write_type(&mut out, v);
    }
    out.extend_from_slice(b",\"value\":");
    match value {
        None => out.extend_from_slice(b"null"),
        Some(Variant::Double(f)) => write_json(&mut out, f),
        Some(Variant::Float(f)) => write_json(&mut out, &f64::from(*f)),
        Some(Variant::Boolean(b)) => write_json(&mut out, b),
        Some(Variant::Int16(n)) => write_json(&mut out, n),
        Some(Variant::UInt16(n)) => write_json(&mut out, n),
        Some(Variant::Int32(n)) => write_json(&mut out, n),
        Some(Variant::UInt32(n)) => write_json(&mut out, n),
        Some(Variant::Int64(n)) => write_json(&mut out, n),
        Some(Variant::UInt64(n)) => write_json(&mut out, n),
        Some(other) => write_json(&mut out, &variant_to_json(other)),
    }
    out.push(b'}');
    // Every piece above is UTF-8 (serde_json writes nothing else).
    String::from_utf8(out).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

/// `,"type":"Double"` (`"Double[]"` for an array); nothing for an empty
/// value.
fn write_type(out: &mut Vec<u8>, v: &Variant) {
    use opcua::types::VariantTypeId;
    use std::io::Write as _;
    // Writing into a Vec cannot fail.
    let _ = match v.type_id() {
        VariantTypeId::Empty => return,
        VariantTypeId::Scalar(t) => write!(out, ",\"type\":\"{t}\""),
        VariantTypeId::Array(t, _) => write!(out, ",\"type\":\"{t}[]\""),
    };
}

/// Appends `v` as JSON. Writing into a Vec cannot fail, and neither can
/// serializing numbers, strings or a `Value` (non-finite floats become null,
/// as in [`variant_to_json`]).
fn write_json<T: serde::Serialize + ?Sized>(out: &mut Vec<u8>, v: &T) {
    if serde_json::to_writer(&mut *out, v).is_err() {
        out.extend_from_slice(b"null");
    }
}

/// The `bad` record that replaces a value too large for a record
/// ([`oversized`]): null value, status [`TOO_LARGE_STATUS`], at the value's
/// own timestamp.
pub fn too_large_record(connection: &str, tag: &TagMeta, dv: &DataValue) -> NewRecord {
    NewRecord {
        connection: connection.to_string(),
        kind: Kind::Tag,
        ts_ms: value_ts_ms(dv),
        data: json!({
            "name": tag.name,
            "node": tag.node,
            "value": Value::Null,
            "quality": quality(TOO_LARGE_STATUS),
            "status": status_name(TOO_LARGE_STATUS),
        })
        .to_string(),
    }
}

/// A tag that cannot be monitored (bad node id, unknown namespace, rejected
/// by the server): reported once per (re)connect with its status.
pub fn bad_tag_record(connection: &str, tag: &TagMeta, status: StatusCode) -> NewRecord {
    NewRecord {
        connection: connection.to_string(),
        kind: Kind::Tag,
        ts_ms: now_ms(),
        data: json!({
            "name": tag.name,
            "node": tag.node,
            "value": Value::Null,
            "quality": quality(status),
            "status": status_name(status),
        })
        .to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opcua::types::{Array, ByteString, LocalizedText, UAString, VariantScalarTypeId};

    #[test]
    fn scalars_map_to_json() {
        assert_eq!(variant_to_json(&Variant::Double(1.5)), json!(1.5));
        assert_eq!(variant_to_json(&Variant::Double(f64::NAN)), Value::Null);
        assert_eq!(variant_to_json(&Variant::Float(f32::INFINITY)), Value::Null);
        assert_eq!(variant_to_json(&Variant::Int32(-3)), json!(-3));
        assert_eq!(variant_to_json(&Variant::UInt64(u64::MAX)), json!(u64::MAX));
        assert_eq!(variant_to_json(&Variant::Boolean(true)), json!(true));
        assert_eq!(variant_to_json(&Variant::Empty), Value::Null);
        assert_eq!(
            variant_to_json(&Variant::String(UAString::from("B-17"))),
            json!("B-17")
        );
        assert_eq!(
            variant_to_json(&Variant::String(UAString::null())),
            Value::Null
        );
        assert_eq!(
            variant_to_json(&Variant::LocalizedText(Box::new(LocalizedText::new(
                "en", "hi"
            )))),
            json!("hi")
        );
        assert_eq!(
            variant_to_json(&Variant::ByteString(ByteString::from(vec![1u8, 2, 3]))),
            json!("AQID")
        );
        assert_eq!(
            variant_to_json(&Variant::StatusCode(StatusCode::BadNodeIdUnknown)),
            json!("BadNodeIdUnknown")
        );
    }

    #[test]
    fn datetime_is_rfc3339() {
        let dt = chrono::DateTime::from_timestamp_millis(1_795_860_000_123).unwrap();
        let v = Variant::DateTime(Box::new(DateTime::from(dt)));
        assert_eq!(variant_to_json(&v), json!("2026-11-28T10:00:00.123Z"));
    }

    #[test]
    fn arrays_and_huge_strings() {
        let a = Array::new(
            VariantScalarTypeId::Double,
            vec![Variant::Double(1.0), Variant::Double(f64::NAN)],
        )
        .unwrap();
        assert_eq!(
            variant_to_json(&Variant::Array(Box::new(a))),
            json!([1.0, null])
        );
        let huge = "é".repeat(MAX_STRING_BYTES);
        let before = truncated_total();
        let v = variant_to_json(&Variant::String(UAString::from(huge)));
        assert!(truncated_total() > before, "a cut is counted");
        let v = v.as_str().unwrap();
        assert!(v.len() <= MAX_STRING_BYTES);
        assert!(v.ends_with(TRUNCATED_MARKER));
        assert!(v.starts_with("éé"));
        // Exactly at the limit: untouched.
        let exact = "x".repeat(MAX_STRING_BYTES);
        let v = variant_to_json(&Variant::String(UAString::from(exact.clone())));
        assert_eq!(v.as_str().unwrap(), exact);
    }

    #[test]
    fn huge_arrays_are_cut_with_a_marker() {
        let n = 100_000;
        let a = Array::new(
            VariantScalarTypeId::Double,
            (0..n)
                .map(|i| Variant::Double(i as f64))
                .collect::<Vec<_>>(),
        )
        .unwrap();
        let v = variant_to_json(&Variant::Array(Box::new(a)));
        let items = v.as_array().unwrap();
        assert!(items.len() > 100 && items.len() < n);
        assert_eq!(items.last().unwrap(), TRUNCATED_MARKER);
        assert_eq!(items[0], json!(0.0));
        assert!(serde_json::to_string(&v).unwrap().len() <= MAX_VALUE_BYTES);

        // An array of long strings: the budget covers the whole value.
        let big = "s".repeat(MAX_STRING_BYTES * 2);
        let a = Array::new(
            VariantScalarTypeId::String,
            (0..20)
                .map(|_| Variant::String(UAString::from(big.as_str())))
                .collect::<Vec<_>>(),
        )
        .unwrap();
        let v = variant_to_json(&Variant::Array(Box::new(a)));
        assert!(serde_json::to_string(&v).unwrap().len() <= MAX_VALUE_BYTES + 64);
        assert_eq!(v.as_array().unwrap().last().unwrap(), TRUNCATED_MARKER);
    }

    #[test]
    fn oversized_strings_anywhere_in_a_value() {
        let big = "x".repeat(MAX_STRING_VALUE_BYTES + 1);
        let at_limit = "x".repeat(MAX_STRING_VALUE_BYTES);
        assert_eq!(
            oversized(&Variant::String(UAString::from(at_limit.as_str()))),
            None
        );
        assert_eq!(
            oversized(&Variant::String(UAString::from(big.as_str()))),
            Some(MAX_STRING_VALUE_BYTES + 1)
        );
        assert_eq!(
            oversized(&Variant::ByteString(ByteString::from(vec![0u8; 70_000]))),
            Some(70_000)
        );
        assert_eq!(oversized(&Variant::String(UAString::null())), None);
        assert_eq!(oversized(&Variant::Double(1.0)), None);
        let nested = Variant::Variant(Box::new(Variant::String(UAString::from(big.as_str()))));
        assert!(oversized(&nested).is_some());
        let array = Array::new(
            VariantScalarTypeId::String,
            vec![
                Variant::String(UAString::from("small")),
                Variant::String(UAString::from(big.as_str())),
            ],
        )
        .unwrap();
        assert!(oversized(&Variant::Array(Box::new(array))).is_some());
        // A long array of small elements is cut, not refused.
        let doubles = Array::new(
            VariantScalarTypeId::Double,
            (0..100_000)
                .map(|i| Variant::Double(i as f64))
                .collect::<Vec<_>>(),
        )
        .unwrap();
        assert_eq!(oversized(&Variant::Array(Box::new(doubles))), None);
    }

    #[test]
    fn too_large_record_is_bad_and_null_at_the_value_time() {
        let tag = TagMeta::new("Big", "ns=2;s=Big");
        let src = chrono::DateTime::from_timestamp_millis(5_000).unwrap();
        let dv = DataValue {
            value: Some(Variant::String(UAString::from("x".repeat(70_000)))),
            status: None,
            source_timestamp: Some(DateTime::from(src)),
            source_picoseconds: None,
            server_timestamp: None,
            server_picoseconds: None,
        };
        let r = too_large_record("c1", &tag, &dv);
        assert_eq!(r.ts_ms, 5_000);
        assert_eq!(
            r.data_json(),
            json!({"name":"Big","node":"ns=2;s=Big","value":null,"quality":"bad","status":"BadEncodingLimitsExceeded"})
        );
    }

    #[test]
    fn quality_and_status_names() {
        assert_eq!(quality(StatusCode::Good), "good");
        assert_eq!(status_name(StatusCode::Good), "Good");
        assert_eq!(quality(StatusCode::UncertainLastUsableValue), "uncertain");
        assert_eq!(quality(StatusCode::BadNodeIdUnknown), "bad");
        assert_eq!(
            status_name(StatusCode::BadNodeIdUnknown),
            "BadNodeIdUnknown"
        );
        // Info bits do not change the name.
        assert_eq!(status_name(StatusCode::Good.set_overflow(true)), "Good");
    }

    /// The hand-written encoding is byte for byte what the `json!` tree
    /// gives (consumers and seq-for-seq replays see no difference).
    #[test]
    fn tag_data_is_the_json_tree_as_text() {
        let tag = TagMeta::new("T \"quoted\" \u{e9}", "nsu=urn:x;s=A\\B/PV.CV");
        let values = [
            None,
            Some(Variant::Double(1.5)),
            Some(Variant::Double(100.0)),
            Some(Variant::Double(-0.0)),
            Some(Variant::Double(f64::NAN)),
            Some(Variant::Double(1e300)),
            Some(Variant::Float(0.1)),
            Some(Variant::Float(f32::INFINITY)),
            Some(Variant::Boolean(true)),
            Some(Variant::Int16(-7)),
            Some(Variant::UInt16(7)),
            Some(Variant::Int32(i32::MIN)),
            Some(Variant::UInt32(u32::MAX)),
            Some(Variant::Int64(i64::MIN)),
            Some(Variant::UInt64(u64::MAX)),
            Some(Variant::String(UAString::from("line\nbreak"))),
            Some(Variant::Empty),
        ];
        let statuses = [
            StatusCode::Good,
            StatusCode::Good.set_overflow(true),
            StatusCode::UncertainLastUsableValue,
            StatusCode::BadSensorFailure,
        ];
        for value in &values {
            for status in statuses {
                let mut tree = json!({
                    "name": tag.name,
                    "node": tag.node,
                    "value": value.as_ref().map(variant_to_json).unwrap_or(Value::Null),
                    "quality": quality(status),
                    "status": status_name(status),
                });
                if let Some(t) = value.as_ref().and_then(Variant::scalar_type_id) {
                    tree["type"] = json!(t.to_string());
                }
                let tree = tree.to_string();
                assert_eq!(
                    tag_data(&tag, status, value.as_ref()),
                    tree,
                    "{value:?} {status}"
                );
            }
        }
    }

    #[test]
    fn arrays_name_their_element_type() {
        let tag = TagMeta::new("A", "ns=2;s=A");
        let a = Array::new(
            VariantScalarTypeId::Int32,
            vec![Variant::Int32(1), Variant::Int32(2)],
        )
        .expect("an array");
        let data = tag_data(&tag, StatusCode::Good, Some(&Variant::Array(Box::new(a))));
        let v: Value = serde_json::from_str(&data).expect("JSON");
        assert_eq!(v["type"], "Int32[]");
        assert_eq!(v["value"], json!([1, 2]));
        let data = tag_data(&tag, StatusCode::BadSensorFailure, None);
        let v: Value = serde_json::from_str(&data).expect("JSON");
        assert!(v.get("type").is_none(), "no value, no type: {data}");
    }

    #[test]
    fn a_value_read_back_says_so() {
        let tag = TagMeta::new("T", "ns=2;s=T");
        let dv = DataValue {
            value: Some(Variant::Double(1.5)),
            source_timestamp: Some(DateTime::from(
                chrono::DateTime::from_timestamp_millis(1_000).expect("ts"),
            )),
            ..Default::default()
        };
        let r = backfill_record("c", &tag, &dv);
        assert_eq!(r.ts_ms, 1_000);
        let data = r.data_json();
        assert_eq!(data["backfill"], true);
        assert_eq!(data["value"], 1.5);
        assert_eq!(data["name"], "T");
    }

    #[test]
    fn record_uses_source_then_server_timestamp() {
        let tag = TagMeta::new("FIC-101.PV", "nsu=urn:x;s=FIC-101/PV.CV");
        let src = chrono::DateTime::from_timestamp_millis(1_000).unwrap();
        let srv = chrono::DateTime::from_timestamp_millis(2_000).unwrap();
        let mut dv = DataValue {
            value: Some(Variant::Double(4.0)),
            status: None,
            source_timestamp: Some(DateTime::from(src)),
            source_picoseconds: None,
            server_timestamp: Some(DateTime::from(srv)),
            server_picoseconds: None,
        };
        let r = tag_record("c1", &tag, &dv);
        assert_eq!(r.ts_ms, 1_000);
        assert_eq!(r.kind, Kind::Tag);
        assert_eq!(
            r.data_json(),
            json!({"name":"FIC-101.PV","node":"nsu=urn:x;s=FIC-101/PV.CV","value":4.0,"quality":"good","status":"Good","type":"Double"})
        );
        dv.source_timestamp = None;
        assert_eq!(tag_record("c1", &tag, &dv).ts_ms, 2_000);
        dv.server_timestamp = None;
        assert!(tag_record("c1", &tag, &dv).ts_ms > 1_700_000_000_000);
    }
}
