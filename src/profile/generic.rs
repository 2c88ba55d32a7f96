//! `kind = "generic"` (docs/profiles.md): only `tags`, which the source turns into
//! `tag` records itself. The profile needs no node and derives nothing; it
//! exists so that every connection has a profile and the source has one code
//! path.

use serde_json::{json, Value};

use super::{check_envelope, NodeKey, NodeSpec, Output, Sample, SnapshotError, SNAPSHOT_VERSION};
use crate::config::{ConnectionConfig, ConnectionKind};

#[derive(Debug, Default)]
pub struct Generic;

impl Generic {
    pub fn new(_conn: &ConnectionConfig) -> Generic {
        Generic
    }

    pub fn nodes(&self) -> Vec<NodeSpec> {
        Vec::new()
    }

    pub fn on_values(&mut self, _values: &[Sample]) -> Output {
        Output::default()
    }

    pub fn on_tick(&mut self, _now_ms: i64) -> Output {
        Output::default()
    }

    pub fn on_read(&mut self, _request_id: u64, _results: &[(NodeKey, Value, bool)]) -> Output {
        Output::default()
    }

    pub fn on_disconnected(&mut self, _at_ms: i64) -> Output {
        Output::default()
    }

    pub fn on_connected(&mut self, _at_ms: i64) -> Output {
        Output::default()
    }

    pub fn snapshot(&self) -> Value {
        json!({"v": SNAPSHOT_VERSION, "kind": ConnectionKind::Generic.as_str()})
    }

    pub fn restore(&mut self, snapshot: &Value) -> Result<(), SnapshotError> {
        check_envelope(snapshot, ConnectionKind::Generic).map(|_| ())
    }
}
