//! MQTT payloads: record batches, events, status and heartbeat messages
//! (docs/mqtt.md). Pure: no I/O, so every byte the cloud sees is
//! unit-tested here.

use serde_json::{json, Value};

use crate::record::{format_ts, Kind, StoredRecord};

/// Bytes a batch payload costs besides its records' data: the envelope plus
/// a per-record wrapper. Kept pessimistic so `fit` never overshoots.
const ENVELOPE_OVERHEAD: usize = 160;
const RECORD_OVERHEAD: usize = 64;

/// The encoded size of a record inside a batch, an upper bound.
pub fn record_cost(record: &StoredRecord) -> usize {
    record.data.len() + RECORD_OVERHEAD
}

/// How many of `records` (a prefix) fit in one message of `max_bytes`,
/// given the envelope's strings. Always at least 1 when records is non-empty:
/// a single oversized record is sent alone rather than blocking its stream.
pub fn fit(records: &[StoredRecord], max_bytes: usize, envelope_strings: usize) -> usize {
    let mut total = ENVELOPE_OVERHEAD + envelope_strings;
    let mut n = 0;
    for r in records {
        total += record_cost(r);
        if total > max_bytes && n > 0 {
            break;
        }
        n += 1;
    }
    n
}

/// Encodes a record batch (records of one stream, in seq order):
/// `{"agent","connection","kind","epoch","records":[{"seq","ts","data"}]}`.
/// `data` is spliced in as stored: it is already compact JSON.
pub fn encode_batch(agent: &str, epoch: &str, records: &[StoredRecord]) -> Vec<u8> {
    batch(agent, epoch, records, false)
}

/// A batch sent again on request: the same as [`encode_batch`] with
/// `"replay":true` after `epoch`, so consumers can tell it from live data.
pub fn encode_replay_batch(agent: &str, epoch: &str, records: &[StoredRecord]) -> Vec<u8> {
    batch(agent, epoch, records, true)
}

fn batch(agent: &str, epoch: &str, records: &[StoredRecord], replay: bool) -> Vec<u8> {
    let (connection, kind) = match records.first() {
        Some(r) => (r.connection.as_str(), r.kind),
        None => ("", Kind::Tag),
    };
    let size: usize = records.iter().map(record_cost).sum::<usize>() + ENVELOPE_OVERHEAD;
    let mut out = String::with_capacity(size);
    out.push_str("{\"agent\":");
    push_json_str(&mut out, agent);
    out.push_str(",\"connection\":");
    push_json_str(&mut out, connection);
    out.push_str(",\"kind\":\"");
    out.push_str(kind.as_str());
    out.push_str("\",\"epoch\":");
    push_json_str(&mut out, epoch);
    if replay {
        out.push_str(",\"replay\":true");
    }
    out.push_str(",\"records\":[");
    for (i, r) in records.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str("{\"seq\":");
        out.push_str(&r.seq.to_string());
        out.push_str(",\"ts\":\"");
        out.push_str(&format_ts(r.ts_ms));
        out.push_str("\",\"data\":");
        out.push_str(&r.data);
        out.push('}');
    }
    out.push_str("]}");
    out.into_bytes()
}

fn push_json_str(out: &mut String, s: &str) {
    // serde_json's string escaping cannot fail for a &str.
    out.push_str(&Value::String(s.to_string()).to_string());
}

/// An event record's topic type and payload:
/// `{"type","ts","agent","connection":<id or null>,"epoch","seq","details"}`.
pub fn encode_event(agent: &str, epoch: &str, record: &StoredRecord) -> (String, Vec<u8>) {
    event(agent, epoch, record, false)
}

/// An event sent again on request: [`encode_event`] plus `"replay":true`.
pub fn encode_replay_event(agent: &str, epoch: &str, record: &StoredRecord) -> (String, Vec<u8>) {
    event(agent, epoch, record, true)
}

fn event(agent: &str, epoch: &str, record: &StoredRecord, replay: bool) -> (String, Vec<u8>) {
    let stored: Value = serde_json::from_str(&record.data).unwrap_or(Value::Null);
    let event_type = stored
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or("system.error")
        .to_string();
    let details = stored.get("details").cloned().unwrap_or_else(|| json!({}));
    let connection = if record.connection.is_empty() {
        Value::Null
    } else {
        Value::String(record.connection.clone())
    };
    let mut payload = json!({
        "type": event_type,
        "ts": format_ts(record.ts_ms),
        "agent": agent,
        "connection": connection,
        "epoch": epoch,
        "seq": record.seq,
        "details": details,
    });
    if replay {
        payload["replay"] = Value::Bool(true);
    }
    (event_type, payload.to_string().into_bytes())
}

pub fn agent_online(ts_ms: i64, version: &str, boot_id: &str) -> Vec<u8> {
    json!({"state": "online", "ts": format_ts(ts_ms), "version": version, "boot_id": boot_id})
        .to_string()
        .into_bytes()
}

/// The Last Will (`connection_lost`) and the clean-shutdown message.
pub fn agent_offline(ts_ms: i64, version: &str, boot_id: &str, reason: &str) -> Vec<u8> {
    json!({"state": "offline", "reason": reason, "ts": format_ts(ts_ms), "version": version, "boot_id": boot_id})
        .to_string()
        .into_bytes()
}

pub fn connection_status(state: &str, since_ms: i64, reason: &str) -> Vec<u8> {
    json!({"state": state, "since": format_ts(since_ms), "reason": reason})
        .to_string()
        .into_bytes()
}

/// Marks a string cut to fit a message.
pub const TRUNCATED_MARKER: &str = "…[truncated]";

/// A connection status payload within `limit` bytes: a reason too long for
/// it (an OPC UA server can put anything in an error message) is cut at a
/// char boundary and ends with [`TRUNCATED_MARKER`].
pub fn connection_status_within(state: &str, since_ms: i64, reason: &str, limit: usize) -> Vec<u8> {
    let full = connection_status(state, since_ms, reason);
    if full.len() <= limit {
        return full;
    }
    let encode = |keep: usize| {
        let cut = format!("{}{TRUNCATED_MARKER}", &reason[..keep]);
        connection_status(state, since_ms, &cut)
    };
    // JSON escapes make the encoded length no simple function of the cut:
    // bisect for the longest prefix that fits.
    let (mut lo, mut hi) = (0usize, reason.len());
    while lo < hi {
        let mid = floor_char_boundary(reason, (lo + hi).div_ceil(2));
        if mid <= lo {
            break;
        }
        if encode(mid).len() <= limit {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    encode(lo)
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    if i >= s.len() {
        return s.len();
    }
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// What a heartbeat reports (docs/mqtt.md).
pub struct Heartbeat<'a> {
    pub ts_ms: i64,
    pub uptime_s: u64,
    pub records: u64,
    pub bytes: u64,
    pub oldest_ts_ms: Option<i64>,
    /// (connection id, state), in a stable order.
    pub connections: &'a [(String, &'static str)],
    pub published_records_total: u64,
}

/// The heartbeat payload within `limit` bytes, and how many connections it
/// had to leave out. With very many connections (or very long ids) the
/// `connections` map keeps the first ones that fit and the payload says
/// `"connections_omitted": N`; the full list is in `/status` and in each
/// connection's retained status.
pub fn heartbeat(h: &Heartbeat, limit: usize) -> (Vec<u8>, usize) {
    let encode = |n: usize| {
        let connections: serde_json::Map<String, Value> = h.connections[..n]
            .iter()
            .map(|(id, st)| (id.clone(), Value::from(*st)))
            .collect();
        let mut v = json!({
            "ts": format_ts(h.ts_ms),
            "uptime_s": h.uptime_s,
            "buffer": {"records": h.records, "bytes": h.bytes, "oldest_ts": h.oldest_ts_ms.map(format_ts)},
            "connections": connections,
            "published_records_total": h.published_records_total,
        });
        if n < h.connections.len() {
            v["connections_omitted"] = Value::from(h.connections.len() - n);
        }
        v.to_string().into_bytes()
    };
    let all = h.connections.len();
    let full = encode(all);
    if full.len() <= limit {
        return (full, 0);
    }
    // The size grows with n: the largest n that fits, by bisection.
    let (mut lo, mut hi) = (0usize, all);
    while lo < hi {
        let mid = (lo + hi).div_ceil(2);
        if encode(mid).len() <= limit {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    (encode(lo), all - lo)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::uplink::topics::PayloadLimit;

    fn rec(seq: u64, data: &str) -> StoredRecord {
        StoredRecord {
            id: crate::record::RecordId {
                stream: 1,
                seq: seq as i64,
            },
            connection: "deltav-line1".into(),
            kind: Kind::Tag,
            seq,
            ts_ms: 1_795_860_000_123,
            data: data.into(),
        }
    }

    #[test]
    fn batch_payload_is_valid_json_in_seq_order() {
        let records = vec![
            rec(41, r#"{"name":"a","value":1.5}"#),
            rec(42, r#"{"name":"b\"q","value":null}"#),
        ];
        let bytes = encode_batch("gw\"1", "ep", &records);
        let v: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v["agent"], "gw\"1");
        assert_eq!(v["connection"], "deltav-line1");
        assert_eq!(v["kind"], "tag");
        assert_eq!(v["epoch"], "ep");
        assert_eq!(v["records"][0]["seq"], 41);
        assert_eq!(v["records"][0]["ts"], "2026-11-28T10:00:00.123Z");
        assert_eq!(v["records"][0]["data"]["value"], 1.5);
        assert_eq!(v["records"][1]["seq"], 42);
        assert_eq!(v["records"][1]["data"]["name"], "b\"q");
    }

    #[test]
    fn a_replayed_batch_is_the_same_batch_flagged() {
        let records = vec![rec(7, r#"{"name":"a","value":2}"#)];
        let live: Value = serde_json::from_slice(&encode_batch("gw1", "ep", &records)).unwrap();
        let again: Value =
            serde_json::from_slice(&encode_replay_batch("gw1", "ep", &records)).unwrap();
        assert_eq!(again["replay"], true);
        assert!(live.get("replay").is_none(), "live batches carry no flag");
        let mut unflagged = again.clone();
        unflagged.as_object_mut().unwrap().remove("replay");
        assert_eq!(unflagged, live);
    }

    #[test]
    fn fit_never_exceeds_the_limit() {
        let data = format!(r#"{{"name":"x","value":"{}"}}"#, "v".repeat(200));
        let records: Vec<_> = (1..=100).map(|s| rec(s, &data)).collect();
        for max in [1024usize, 4096, 10_000, 131_072] {
            let n = fit(&records, max, 40);
            assert!(n >= 1);
            let bytes = encode_batch("gw1", "0123456789abcdef", &records[..n]);
            assert!(
                bytes.len() <= max,
                "max {max}: {} bytes for {n}",
                bytes.len()
            );
            if n < records.len() {
                // The bound is useful, not just safe: messages come out at least half full.
                assert!(
                    bytes.len() * 2 >= max,
                    "max {max}: only {} bytes",
                    bytes.len()
                );
            }
        }
        // An oversized single record still goes (alone), never blocks its stream.
        let big = vec![rec(1, &format!("\"{}\"", "x".repeat(5000))), rec(2, "1")];
        assert_eq!(fit(&big, 1024, 10), 1);
    }

    #[test]
    fn event_payload_carries_seq_and_null_connection_for_agent() {
        let mut r = rec(
            7,
            r#"{"type":"sync.completed","details":{"records":10,"duration_ms":5}}"#,
        );
        r.connection = String::new();
        r.kind = Kind::Event;
        let (ty, bytes) = encode_event("gw1", "ep", &r);
        assert_eq!(ty, "sync.completed");
        let v: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v["type"], "sync.completed");
        assert_eq!(v["connection"], Value::Null);
        assert_eq!(v["seq"], 7);
        assert_eq!(v["epoch"], "ep");
        assert_eq!(v["details"]["records"], 10);
    }

    #[test]
    fn batches_split_to_the_broker_limit() {
        // 2 000 records of ~250 bytes under a 20 000-byte broker limit:
        // every message fits, and none is needlessly small.
        let l = PayloadLimit::new(131_072, Some(20_000));
        let topic = "plantgate/test-site/test-gw/data/sim1/tag";
        let max = l.for_topic(topic);
        let data = format!(r#"{{"name":"x","value":"{}"}}"#, "v".repeat(200));
        let records: Vec<_> = (1..=2000).map(|s| rec(s, &data)).collect();
        let mut rest = &records[..];
        let mut messages = 0;
        while !rest.is_empty() {
            let n = fit(rest, max, 40);
            let bytes = encode_batch("test-gw", "0123456789abcdef", &rest[..n]);
            assert!(bytes.len() <= max, "{} > {max}", bytes.len());
            rest = &rest[n..];
            messages += 1;
            if !rest.is_empty() {
                assert!(bytes.len() * 2 >= max, "only {} bytes", bytes.len());
            }
        }
        assert!((25..=60).contains(&messages), "{messages} messages");
    }

    #[test]
    fn connection_status_reason_is_cut_to_fit() {
        let reason = format!("BadDecodingError: \"{}\" ü", "é\"\\x".repeat(2000));
        let full = connection_status("offline", 0, &reason);
        assert!(full.len() > 4096);
        for limit in [1024usize, 2000, 4096] {
            let bytes = connection_status_within("offline", 0, &reason, limit);
            assert!(bytes.len() <= limit, "{limit}: {}", bytes.len());
            let v: Value = serde_json::from_slice(&bytes).unwrap();
            assert_eq!(v["state"], "offline");
            let r = v["reason"].as_str().unwrap();
            assert!(
                r.starts_with("BadDecodingError") && r.ends_with(TRUNCATED_MARKER),
                "{r}"
            );
            // Not cut more than needed.
            assert!(bytes.len() + 64 >= limit, "{limit}: {}", bytes.len());
        }
        // A short one is untouched.
        assert_eq!(
            connection_status_within("online", 0, "", 1024),
            connection_status("online", 0, "")
        );
    }

    #[test]
    fn heartbeat_leaves_out_connections_that_do_not_fit() {
        let conns: Vec<(String, &'static str)> = (0..5000)
            .map(|i| (format!("connection-{i:05}"), "online"))
            .collect();
        let h = Heartbeat {
            ts_ms: 0,
            uptime_s: 5,
            records: 10,
            bytes: 2000,
            oldest_ts_ms: Some(0),
            connections: &conns,
            published_records_total: 7,
        };
        let (all, omitted) = heartbeat(&h, 1 << 20);
        assert_eq!(omitted, 0);
        let v: Value = serde_json::from_slice(&all).unwrap();
        assert_eq!(v["connections"].as_object().unwrap().len(), 5000);
        assert!(v.get("connections_omitted").is_none());
        assert_eq!(v["buffer"]["records"], 10);
        assert_eq!(v["published_records_total"], 7);

        let (trimmed, omitted) = heartbeat(&h, 4096);
        assert!(trimmed.len() <= 4096, "{}", trimmed.len());
        let v: Value = serde_json::from_slice(&trimmed).unwrap();
        let kept = v["connections"].as_object().unwrap().len();
        assert!(kept > 50, "{kept}");
        assert_eq!(kept + omitted, 5000);
        assert_eq!(v["connections_omitted"], omitted);
        assert_eq!(v["uptime_s"], 5);
        // As many as fit: one more entry (~26 bytes) would not.
        assert!(trimmed.len() + 30 > 4096, "{}", trimmed.len());
    }

    #[test]
    fn status_payloads() {
        let v: Value =
            serde_json::from_slice(&agent_offline(0, "0.1.0", "b", "connection_lost")).unwrap();
        assert_eq!(v["state"], "offline");
        assert_eq!(v["reason"], "connection_lost");
        assert_eq!(v["boot_id"], "b");
        let v: Value = serde_json::from_slice(&connection_status("online", 0, "")).unwrap();
        assert_eq!(v["state"], "online");
        assert_eq!(v["since"], "1970-01-01T00:00:00.000Z");
    }
}
