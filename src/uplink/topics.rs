//! MQTT topic names and payload encoding (SPEC 4). Pure: no I/O, so every
//! byte the cloud sees is unit-tested here.

use serde_json::{json, Value};

use crate::record::{format_ts, Kind, StoredRecord};

/// `{topic_prefix}/{site}/{agent}` and everything below it.
#[derive(Clone, Debug)]
pub struct Topics {
    root: String,
}

impl Topics {
    pub fn new(prefix: &str, site: &str, agent: &str) -> Self {
        Topics {
            root: format!("{prefix}/{site}/{agent}"),
        }
    }

    pub fn root(&self) -> &str {
        &self.root
    }

    pub fn status(&self) -> String {
        format!("{}/status", self.root)
    }

    pub fn heartbeat(&self) -> String {
        format!("{}/heartbeat", self.root)
    }

    pub fn connection_status(&self, connection: &str) -> String {
        format!("{}/connections/{connection}/status", self.root)
    }

    pub fn event(&self, event_type: &str) -> String {
        format!("{}/events/{event_type}", self.root)
    }

    pub fn data(&self, connection: &str, kind: Kind) -> String {
        format!("{}/data/{connection}/{}", self.root, kind.as_str())
    }
}

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
    let payload = json!({
        "type": event_type,
        "ts": format_ts(record.ts_ms),
        "agent": agent,
        "connection": connection,
        "epoch": epoch,
        "seq": record.seq,
        "details": details,
    });
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

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(seq: u64, data: &str) -> StoredRecord {
        StoredRecord {
            id: seq as i64,
            connection: "deltav-line1".into(),
            kind: Kind::Tag,
            seq,
            ts_ms: 1_795_860_000_123,
            data: data.into(),
        }
    }

    #[test]
    fn topics_follow_the_spec() {
        let t = Topics::new("plantgate", "plant1", "gw1");
        assert_eq!(t.status(), "plantgate/plant1/gw1/status");
        assert_eq!(t.heartbeat(), "plantgate/plant1/gw1/heartbeat");
        assert_eq!(
            t.connection_status("deltav-line1"),
            "plantgate/plant1/gw1/connections/deltav-line1/status"
        );
        assert_eq!(
            t.event("buffer.evicted"),
            "plantgate/plant1/gw1/events/buffer.evicted"
        );
        assert_eq!(
            t.data("deltav-line1", Kind::Batch),
            "plantgate/plant1/gw1/data/deltav-line1/batch"
        );
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
