//! The unit of data that flows through plantgate: produced by a source or a
//! profile, made durable by the buffer (which assigns its `seq`), carried to
//! the broker by the uplink.

use serde::{Deserialize, Serialize};

/// What a record is about. One stream per (connection, kind).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Tag,
    Batch,
    Recipe,
    Oee,
    Downtime,
    Event,
}

impl Kind {
    pub const ALL: [Kind; 6] = [
        Kind::Tag,
        Kind::Batch,
        Kind::Recipe,
        Kind::Oee,
        Kind::Downtime,
        Kind::Event,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Tag => "tag",
            Kind::Batch => "batch",
            Kind::Recipe => "recipe",
            Kind::Oee => "oee",
            Kind::Downtime => "downtime",
            Kind::Event => "event",
        }
    }

    pub fn parse(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The stream a record belongs to. `connection` is empty for the agent's own
/// events (they concern no connection).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StreamKey {
    pub connection: String,
    pub kind: Kind,
}

impl StreamKey {
    pub fn new(connection: impl Into<String>, kind: Kind) -> Self {
        StreamKey {
            connection: connection.into(),
            kind,
        }
    }
}

/// A record before it is accepted: no seq yet.
#[derive(Clone, Debug, PartialEq)]
pub struct NewRecord {
    /// Connection id, or "" for agent-level events.
    pub connection: String,
    pub kind: Kind,
    /// Milliseconds since the Unix epoch, UTC (OPC UA source timestamp where known).
    pub ts_ms: i64,
    /// The kind-specific `data` object of docs/mqtt.md as compact JSON text, as it
    /// will be stored and published. For events: `{"type":..,"details":{..}}`.
    /// Text, not a `serde_json::Value`: tag values arrive by the hundred
    /// thousand per second and are encoded once, where they are read
    /// (`source::value::tag_record`); a `Value` tree costs a dozen
    /// allocations and about 1 KiB per record while it waits in a queue.
    pub data: String,
}

impl NewRecord {
    /// An event record (docs/mqtt.md, "Events") stamped now. `connection`
    /// is "" for the agent's own events. Every event is built here, so its
    /// shape is the same whoever raises it.
    pub fn event(connection: &str, event: EventType, details: serde_json::Value) -> NewRecord {
        NewRecord::event_at(connection, event, now_ms(), details)
    }

    /// An event record with a given time (the buffer stamps its own events
    /// with the time of the transaction that raises them).
    pub fn event_at(
        connection: &str,
        event: EventType,
        ts_ms: i64,
        details: serde_json::Value,
    ) -> NewRecord {
        NewRecord {
            connection: connection.to_string(),
            kind: Kind::Event,
            ts_ms,
            data: serde_json::json!({ "type": event.as_str(), "details": details }).to_string(),
        }
    }

    /// `data` parsed (for tests and diagnostics; Null if it is not JSON,
    /// which no constructor here produces).
    pub fn data_json(&self) -> serde_json::Value {
        serde_json::from_str(&self.data).unwrap_or(serde_json::Value::Null)
    }

    /// The `name` of a tag record, for the sample tags of loss reports.
    pub fn tag_name(&self) -> Option<String> {
        match self.data_json() {
            serde_json::Value::Object(mut m) => match m.remove("name") {
                Some(serde_json::Value::String(s)) => Some(s),
                _ => None,
            },
            _ => None,
        }
    }
}

/// The event types of docs/mqtt.md ("Events"): the `type` of an event
/// record, the last level of its topic, and what a connection's `events`
/// list names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum EventType {
    #[serde(rename = "connection.status_changed")]
    ConnectionStatusChanged,
    #[serde(rename = "connection.auth_required")]
    ConnectionAuthRequired,
    #[serde(rename = "sync.completed")]
    SyncCompleted,
    #[serde(rename = "system.error")]
    SystemError,
    #[serde(rename = "buffer.evicted")]
    BufferEvicted,
    #[serde(rename = "source.dropped")]
    SourceDropped,
    #[serde(rename = "backfill.completed")]
    BackfillCompleted,
}

impl EventType {
    pub const ALL: [EventType; 7] = [
        EventType::ConnectionStatusChanged,
        EventType::ConnectionAuthRequired,
        EventType::SyncCompleted,
        EventType::SystemError,
        EventType::BufferEvicted,
        EventType::SourceDropped,
        EventType::BackfillCompleted,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventType::ConnectionStatusChanged => "connection.status_changed",
            EventType::ConnectionAuthRequired => "connection.auth_required",
            EventType::SyncCompleted => "sync.completed",
            EventType::SystemError => "system.error",
            EventType::BufferEvicted => "buffer.evicted",
            EventType::SourceDropped => "source.dropped",
            EventType::BackfillCompleted => "backfill.completed",
        }
    }

    pub fn parse(s: &str) -> Option<EventType> {
        EventType::ALL.into_iter().find(|e| e.as_str() == s)
    }
}

impl std::fmt::Display for EventType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// So a list of event types reads against the names users write.
impl PartialEq<&str> for EventType {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

/// A record as the buffer holds it: accepted, with its row id and seq.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredRecord {
    /// What the uplink acks.
    pub id: RecordId,
    pub connection: String,
    pub kind: Kind,
    pub seq: u64,
    pub ts_ms: i64,
    /// `data` as compact JSON text, exactly as it will be published.
    pub data: String,
}

/// A stored record's identity in the buffer: its stream's row and its seq,
/// neither ever reused (an ack arriving late cannot remove another record).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RecordId {
    pub stream: i64,
    pub seq: i64,
}

impl StoredRecord {
    pub fn stream(&self) -> StreamKey {
        StreamKey::new(self.connection.clone(), self.kind)
    }
}

/// Formats milliseconds since the epoch as RFC 3339 UTC with milliseconds.
pub fn format_ts(ts_ms: i64) -> String {
    match chrono::DateTime::from_timestamp_millis(ts_ms) {
        Some(dt) => dt.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string(),
        None => "1970-01-01T00:00:00.000Z".to_string(),
    }
}

/// Wall-clock now in milliseconds since the epoch.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_rfc3339_millis() {
        assert_eq!(format_ts(1_795_860_000_123), "2026-11-28T10:00:00.123Z");
        assert_eq!(format_ts(0), "1970-01-01T00:00:00.000Z");
    }

    #[test]
    fn kind_round_trips() {
        for k in Kind::ALL {
            assert_eq!(Kind::parse(k.as_str()), Some(k));
        }
        assert_eq!(Kind::parse("nope"), None);
    }

    #[test]
    fn event_types_have_one_name_in_serde_and_topics() {
        for e in EventType::ALL {
            assert_eq!(EventType::parse(e.as_str()), Some(e));
            assert_eq!(serde_json::json!(e), e.as_str());
        }
        let ev = NewRecord::event(
            "c1",
            EventType::SystemError,
            serde_json::json!({"error": "x"}),
        );
        assert_eq!(ev.kind, Kind::Event);
        assert_eq!(
            ev.data_json(),
            serde_json::json!({"type": "system.error", "details": {"error": "x"}})
        );
    }
}
