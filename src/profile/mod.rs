//! Profiles (docs/profiles.md): what the agent reads from a DeltaV or OptoMES server and
//! the records it derives. Each profile is a pure, sans-IO state machine: the
//! source feeds it timestamped values, clock ticks, read answers and
//! connection changes; it returns records and, for the recipe snapshot, Read
//! requests that the source performs. No network, no clock, no threads here,
//! so every rule of docs/profiles.md is unit-tested without a server.
//!
//! # Contract with the source
//!
//! - [`Profile::nodes`] lists the nodes the profile needs, each with a cheap
//!   [`NodeKey`]. The node text is the connection's `node_template` with the
//!   placeholders substituted; it may use `ns=` or `nsu=`, which the source
//!   resolves on every connect. All of them are subscribed (`subscribe` is
//!   true for every node today, see [`NodeSpec`]).
//! - Configured `tags` are **not** part of the profile: the source keeps
//!   subscribing them and producing `tag` records itself (as for every kind).
//! - [`Profile::on_connected`] when a session is (re)established,
//!   [`Profile::on_disconnected`] when it is lost (with the time the outage
//!   began, as best known). Times are agent wall-clock milliseconds.
//! - [`Profile::on_values`] with each publish as a whole. Values carry the OPC
//!   UA source timestamp (server timestamp if absent); `good` is false for any
//!   non-Good status, and such values are ignored (an unknown value is not a
//!   change). After a reconnect the source delivers the current values as an
//!   ordinary publish; the profile emits only real changes.
//! - [`Profile::on_tick`] regularly (about every second) with the wall clock;
//!   OEE windows close on ticks.
//! - Every [`ReadRequest`] in an [`Output`] is answered by
//!   [`Profile::on_read`] with one result per key (`good` false for a Bad
//!   status). If the session is lost before the answer, the source drops the
//!   request: the profile asks again after the next `on_connected`.
//! - Persistence: store [`Profile::snapshot`] in the buffer database in the
//!   same transaction as the records of every non-empty [`Output`] (and at
//!   shutdown; more often is harmless), and hand it to [`Profile::restore`]
//!   right after [`Profile::new`] on start.

pub mod deltav;
pub mod oee;
pub mod optomes;
pub mod template;

#[cfg(test)]
mod proptests;
#[cfg(test)]
mod testutil;

use serde_json::Value;

use crate::config::{ConnectionConfig, ConnectionKind, ProfileConfig};
use crate::record::NewRecord;

pub use deltav::DeltaV;
pub use optomes::OptoMes;

/// Identifies one node a profile needs. Indices refer to the connection's
/// `units` / `work_centers` (and a unit's `recipe_parameters`) in config order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum NodeKey {
    Unit { unit: usize, param: UnitParam },
    WorkCenter { work_center: usize, param: WcParam },
}

/// A DeltaV unit's nodes (docs/profiles.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum UnitParam {
    BatchId,
    Recipe,
    Phase,
    Bstatus,
    FailIndex,
    /// Index into the unit's `recipe_parameters`.
    RecipeParameter(usize),
}

impl UnitParam {
    /// The fixed parameters, in the order [`Profile::nodes`] lists them.
    pub const FIXED: [UnitParam; 5] = [
        UnitParam::BatchId,
        UnitParam::Recipe,
        UnitParam::Phase,
        UnitParam::Bstatus,
        UnitParam::FailIndex,
    ];

    /// The `{param}` text; `None` for a recipe parameter index out of range.
    pub fn name<'a>(&self, recipe_parameters: &'a [String]) -> Option<&'a str> {
        match self {
            UnitParam::BatchId => Some("BATCH_ID"),
            UnitParam::Recipe => Some("RECIPE"),
            UnitParam::Phase => Some("PHASE"),
            UnitParam::Bstatus => Some("BSTATUS"),
            UnitParam::FailIndex => Some("FAIL_INDEX"),
            UnitParam::RecipeParameter(i) => recipe_parameters.get(*i).map(String::as_str),
        }
    }
}

/// An OptoMES work center's nodes (docs/profiles.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum WcParam {
    State,
    WorkOrder,
    Product,
    GoodCount,
    RejectCount,
    IdealCycleTime,
    DowntimeReason,
}

impl WcParam {
    pub const ALL: [WcParam; 7] = [
        WcParam::State,
        WcParam::WorkOrder,
        WcParam::Product,
        WcParam::GoodCount,
        WcParam::RejectCount,
        WcParam::IdealCycleTime,
        WcParam::DowntimeReason,
    ];

    /// The `{param}` text.
    pub fn name(self) -> &'static str {
        match self {
            WcParam::State => "STATE",
            WcParam::WorkOrder => "WORK_ORDER",
            WcParam::Product => "PRODUCT",
            WcParam::GoodCount => "GOOD_COUNT",
            WcParam::RejectCount => "REJECT_COUNT",
            WcParam::IdealCycleTime => "IDEAL_CYCLE_TIME",
            WcParam::DowntimeReason => "DOWNTIME_REASON",
        }
    }
}

/// One node the profile needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeSpec {
    pub key: NodeKey,
    /// NodeId text from `node_template` (`ns=N;..` or `nsu=URI;..`), to be
    /// resolved by the source.
    pub node: String,
    /// Create a monitored item for it. True for every node today: docs/profiles.md has
    /// a unit subscribe to its recipe parameters too. Their subscribed values
    /// are ignored, though: the `recipe` record takes its values from the
    /// Read at batch start, which is what docs/profiles.md defines as the snapshot.
    /// (Subscribing also surfaces a misconfigured parameter at connect time,
    /// not at the first batch.)
    pub subscribe: bool,
}

/// One value of a publish.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub key: NodeKey,
    pub value: Value,
    /// Status Good. Anything else is ignored by the profiles.
    pub good: bool,
    /// OPC UA source timestamp (server timestamp if absent), ms since epoch.
    pub ts_ms: i64,
}

/// A Read the profile asks its source to perform (the recipe snapshot).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadRequest {
    /// Echoed back in [`Profile::on_read`].
    pub id: u64,
    pub keys: Vec<NodeKey>,
}

/// What one input produced.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Output {
    /// To be appended to the buffer, in this order.
    pub records: Vec<NewRecord>,
    /// To be performed by the source.
    pub reads: Vec<ReadRequest>,
    /// The persisted state changed although no record came of it (a held
    /// batch end keeps values the server may overwrite before a restart):
    /// the snapshot must be saved anyway.
    pub state_changed: bool,
}

impl Output {
    pub fn is_empty(&self) -> bool {
        self.records.is_empty() && self.reads.is_empty() && !self.state_changed
    }

    pub fn append(&mut self, mut other: Output) {
        self.records.append(&mut other.records);
        self.reads.append(&mut other.reads);
        self.state_changed |= other.state_changed;
    }
}

/// Why a snapshot could not be restored. The profile is left in its fresh
/// state: at worst a batch already reported is reported again (at-least-once).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SnapshotError {
    #[error("profile snapshot is for kind {found:?}, the connection is {expected}")]
    KindMismatch {
        expected: &'static str,
        found: String,
    },
    #[error("unsupported profile snapshot version {0}")]
    Version(u64),
    #[error("unreadable profile snapshot: {0}")]
    Malformed(String),
}

/// Snapshot format version; bump on incompatible change.
pub(crate) const SNAPSHOT_VERSION: u64 = 1;

/// Checks the `v`/`kind` envelope every snapshot carries. `Ok(false)` for a
/// null snapshot (nothing stored yet).
pub(crate) fn check_envelope(
    snapshot: &Value,
    kind: ConnectionKind,
) -> Result<bool, SnapshotError> {
    if snapshot.is_null() {
        return Ok(false);
    }
    let found = snapshot.get("kind").and_then(Value::as_str).unwrap_or("");
    if found != kind.as_str() {
        return Err(SnapshotError::KindMismatch {
            expected: kind.as_str(),
            found: found.to_string(),
        });
    }
    match snapshot.get("v").and_then(Value::as_u64) {
        Some(SNAPSHOT_VERSION) => Ok(true),
        Some(v) => Err(SnapshotError::Version(v)),
        None => Err(SnapshotError::Malformed("missing version".into())),
    }
}

/// The profile of one connection.
#[derive(Debug)]
pub enum Profile {
    Deltav(DeltaV),
    Optomes(OptoMes),
}

impl Profile {
    /// The connection's profile; None for `kind = "generic"`, whose tags
    /// the source turns into records by itself (nothing to derive, nothing
    /// to persist).
    pub fn new(conn: &ConnectionConfig) -> Option<Profile> {
        match &conn.profile {
            ProfileConfig::Deltav(cfg) => Some(Profile::Deltav(DeltaV::new(conn, cfg))),
            ProfileConfig::Optomes(cfg) => Some(Profile::Optomes(OptoMes::new(conn, cfg))),
            ProfileConfig::Generic => None,
        }
    }

    pub fn kind(&self) -> ConnectionKind {
        match self {
            Profile::Deltav(_) => ConnectionKind::Deltav,
            Profile::Optomes(_) => ConnectionKind::Optomes,
        }
    }

    pub fn nodes(&self) -> Vec<NodeSpec> {
        match self {
            Profile::Deltav(p) => p.nodes(),
            Profile::Optomes(p) => p.nodes(),
        }
    }

    pub fn on_values(&mut self, values: &[Sample]) -> Output {
        match self {
            Profile::Deltav(p) => p.on_values(values),
            Profile::Optomes(p) => p.on_values(values),
        }
    }

    pub fn on_tick(&mut self, now_ms: i64) -> Output {
        match self {
            Profile::Deltav(p) => p.on_tick(now_ms),
            Profile::Optomes(p) => p.on_tick(now_ms),
        }
    }

    pub fn on_read(&mut self, request_id: u64, results: &[(NodeKey, Value, bool)]) -> Output {
        match self {
            Profile::Deltav(p) => p.on_read(request_id, results),
            Profile::Optomes(p) => p.on_read(request_id, results),
        }
    }

    pub fn on_disconnected(&mut self, at_ms: i64) -> Output {
        match self {
            Profile::Deltav(p) => p.on_disconnected(at_ms),
            Profile::Optomes(p) => p.on_disconnected(at_ms),
        }
    }

    pub fn on_connected(&mut self, at_ms: i64) -> Output {
        match self {
            Profile::Deltav(p) => p.on_connected(at_ms),
            Profile::Optomes(p) => p.on_connected(at_ms),
        }
    }

    /// The little state that must survive an agent restart (JSON, a few
    /// hundred bytes per unit / work center).
    pub fn snapshot(&self) -> Value {
        match self {
            Profile::Deltav(p) => p.snapshot(),
            Profile::Optomes(p) => p.snapshot(),
        }
    }

    /// Restores a [`Profile::snapshot`]; call right after `new`. `Value::Null`
    /// (nothing stored) is fine. Units / work centers no longer configured are
    /// dropped; new ones start fresh.
    pub fn restore(&mut self, snapshot: &Value) -> Result<(), SnapshotError> {
        match self {
            Profile::Deltav(p) => p.restore(snapshot),
            Profile::Optomes(p) => p.restore(snapshot),
        }
    }
}

/// A value as text: strings as they are, numbers and bools printed, null as
/// `None`. Servers sometimes expose a "String" parameter with another type;
/// this keeps the profile total.
pub(crate) fn as_text(v: &Value) -> Option<String> {
    match v {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        Value::Bool(_) | Value::Number(_) => Some(v.to_string()),
        // Arrays/objects cannot be a batch id or a state; keep them printable.
        other => Some(other.to_string()),
    }
}

/// A value as an integer (Int32 FAIL_INDEX; the counts): integral numbers of
/// any JSON form, or decimal text.
pub(crate) fn as_int(v: &Value) -> Option<i64> {
    match v {
        Value::Number(n) => n.as_i64().or_else(|| {
            n.as_f64()
                .filter(|f| f.is_finite() && f.fract() == 0.0 && f.abs() < 9.0e15)
                .map(|f| f as i64)
        }),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

pub(crate) fn as_f64(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64().filter(|f| f.is_finite()),
        Value::String(s) => s.trim().parse().ok().filter(|f: &f64| f.is_finite()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn value_conversions() {
        assert_eq!(as_text(&json!("A")), Some("A".into()));
        assert_eq!(as_text(&json!(12)), Some("12".into()));
        assert_eq!(as_text(&Value::Null), None);
        assert_eq!(as_int(&json!(3)), Some(3));
        assert_eq!(as_int(&json!(3.0)), Some(3));
        assert_eq!(as_int(&json!(3.5)), None);
        assert_eq!(as_int(&json!(" 7 ")), Some(7));
        assert_eq!(as_int(&json!(true)), None);
        assert_eq!(as_f64(&json!(1.5)), Some(1.5));
        assert_eq!(as_f64(&json!("2")), Some(2.0));
        assert_eq!(as_f64(&json!(null)), None);
    }

    #[test]
    fn profile_per_kind() {
        use std::time::Duration;

        let mut generic = testutil::connection(ConnectionKind::Generic);
        generic.tags.push(crate::config::TagConfig {
            name: "FIC-101.PV".into(),
            node: "ns=2;s=FIC-101/PV.CV".into(),
            sampling_interval: None,
            deadband: None,
        });
        // Tags stay with the source: a generic connection has no profile.
        assert!(Profile::new(&generic).is_none());

        let deltav = Profile::new(&testutil::deltav(&[("R1", &["A"])]));
        let mut d = deltav.expect("a DeltaV profile");
        assert_eq!(d.kind(), ConnectionKind::Deltav);
        assert_eq!(d.nodes().len(), 6);
        let out = d.on_values(&[Sample {
            key: NodeKey::Unit {
                unit: 0,
                param: UnitParam::BatchId,
            },
            value: serde_json::json!("B1"),
            good: true,
            ts_ms: 5,
        }]);
        assert_eq!(out.records.len(), 1);
        assert_eq!(out.reads.len(), 1);
        let saved = d.snapshot();
        let mut d2 = Profile::new(&testutil::deltav(&[("R1", &["A"])])).expect("profile");
        assert_eq!(d2.restore(&saved), Ok(()));
        assert_eq!(d2.snapshot(), saved);
        let o = Profile::new(&testutil::optomes(&["WC"], Duration::from_secs(60)));
        let mut o = o.expect("an OptoMES profile");
        // A snapshot of another kind is refused, the profile stays fresh.
        let fresh = o.snapshot();
        assert!(o.restore(&saved).is_err());
        assert_eq!(o.snapshot(), fresh);
        assert_eq!(o.kind(), ConnectionKind::Optomes);
        assert_eq!(o.nodes().len(), 7);
    }

    #[test]
    fn envelope_checks() {
        assert_eq!(
            check_envelope(&Value::Null, ConnectionKind::Deltav),
            Ok(false)
        );
        assert_eq!(
            check_envelope(&json!({"v":1,"kind":"deltav"}), ConnectionKind::Deltav),
            Ok(true)
        );
        assert!(matches!(
            check_envelope(&json!({"v":1,"kind":"optomes"}), ConnectionKind::Deltav),
            Err(SnapshotError::KindMismatch { .. })
        ));
        assert_eq!(
            check_envelope(&json!({"v":9,"kind":"deltav"}), ConnectionKind::Deltav),
            Err(SnapshotError::Version(9))
        );
    }
}
