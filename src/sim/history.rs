//! The simulators' node manager: the library's simple in-memory one
//! (values, monitored items, writes; `simple.rs` of async-opcua-server,
//! without its read/write/method callbacks, which the simulators do not
//! use) plus a history of every value set through `SimNamespace`, served by
//! HistoryRead raw with continuation points (issue 19: backfill needs a
//! server that can answer for the time the agent was away).
//! [`HistoryQuirks`] make it a slow or misbehaving historian for the
//! agent's fault tests (docs/backfill.md, "What cannot be read back").

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use opcua::sync::RwLock;
use opcua::types::{
    DataValue, DateTime, HistoryData, MonitoringMode, NodeId, ReadRawModifiedDetails, StatusCode,
    TimestampsToReturn,
};
use opcua_server::address_space::{read_node_value, write_node_value, AddressSpace};
use opcua_server::diagnostics::NamespaceMetadata;
use opcua_server::node_manager::memory::{
    InMemoryNodeManagerBuilder, InMemoryNodeManagerImpl, InMemoryNodeManagerImplBuilder,
};
use opcua_server::node_manager::{
    HistoryNode, MonitoredItemRef, MonitoredItemUpdateRef, NodeManagersRef, ParsedReadValueId,
    RequestContext, ServerContext, SyncSampler, WriteNode,
};
use opcua_server::{ContinuationPoint, CreateMonitoredItem};

/// Ways the simulated history misbehaves, for tests against a hostile
/// server.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HistoryQuirks {
    /// Every HistoryRead takes this long (a slow historian).
    pub delay: Duration,
    /// numValuesPerNode is ignored: everything in the span comes at once.
    pub ignore_max: bool,
    /// Every continuation point is forgotten: going on with one answers
    /// `BadContinuationPointInvalid`.
    pub forget_continuation_points: bool,
}

/// Values kept per node; the oldest go first.
pub const KEEP_PER_NODE: usize = 100_000;
/// Values kept in all: a load simulator with thousands of tags changing
/// for an hour (the benchmarks) must not grow without bound. About 100 MB;
/// past it each node's oldest value goes as a new one comes.
pub const KEEP_TOTAL: usize = 1_000_000;

pub fn node_manager(
    namespace: NamespaceMetadata,
    name: &str,
) -> InMemoryNodeManagerBuilder<SimBuilder> {
    InMemoryNodeManagerBuilder::new(SimBuilder {
        namespace,
        name: name.to_string(),
    })
}

pub struct SimBuilder {
    namespace: NamespaceMetadata,
    name: String,
}

impl InMemoryNodeManagerImplBuilder for SimBuilder {
    type Impl = SimNodeManager;

    fn build(mut self, context: ServerContext, address_space: &mut AddressSpace) -> SimNodeManager {
        self.namespace.namespace_index = context
            .type_tree
            .write()
            .namespaces_mut()
            .add_namespace(&self.namespace.namespace_uri);
        address_space.add_namespace(
            &self.namespace.namespace_uri,
            self.namespace.namespace_index,
        );
        SimNodeManager {
            namespace: self.namespace,
            name: self.name,
            _node_managers: context.node_managers.clone(),
            samplers: SyncSampler::new(),
            history: Mutex::new(History::default()),
            not_historized: std::sync::RwLock::new(HashSet::new()),
            quirks: std::sync::RwLock::new(HistoryQuirks::default()),
        }
    }
}

pub struct SimNodeManager {
    namespace: NamespaceMetadata,
    name: String,
    _node_managers: NodeManagersRef,
    samplers: SyncSampler,
    /// Per node, its values in the order they were set.
    history: Mutex<History>,
    /// Nodes that keep no history (a server where some tags are not
    /// historized).
    not_historized: std::sync::RwLock<HashSet<NodeId>>,
    quirks: std::sync::RwLock<HistoryQuirks>,
}

#[derive(Default)]
struct History {
    by_node: HashMap<NodeId, VecDeque<DataValue>>,
    total: usize,
}

/// Where a HistoryRead goes on: the source timestamp of the next value
/// (an index would shift as old values go).
struct Resume {
    next: DateTime,
}

impl SimNodeManager {
    /// Keeps `value` of `node` for HistoryRead.
    pub fn record(&self, node: &NodeId, value: &DataValue) {
        if self
            .not_historized
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains(node)
        {
            return;
        }
        let mut history = self.history.lock().unwrap_or_else(|e| e.into_inner());
        let full = history.total >= KEEP_TOTAL;
        let values = history.by_node.entry(node.clone()).or_default();
        values.push_back(value.clone());
        let dropped = usize::from(values.len() > KEEP_PER_NODE || full);
        if dropped == 1 {
            values.pop_front();
        }
        history.total = history.total + 1 - dropped;
    }

    /// Stops (or resumes) keeping history for `node`; what it kept is
    /// forgotten.
    pub fn set_historized(&self, node: &NodeId, on: bool) {
        let mut off = self
            .not_historized
            .write()
            .unwrap_or_else(|e| e.into_inner());
        if on {
            off.remove(node);
        } else {
            off.insert(node.clone());
            let mut history = self.history.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(gone) = history.by_node.remove(node) {
                history.total -= gone.len();
            }
        }
    }

    /// Makes HistoryRead misbehave from now on (or behave again, with the
    /// default).
    pub fn set_quirks(&self, quirks: HistoryQuirks) {
        *self.quirks.write().unwrap_or_else(|e| e.into_inner()) = quirks;
    }

    /// The source timestamps (ms) of the values kept for `node`.
    pub fn history_ts(&self, node: &NodeId) -> Vec<i64> {
        let history = self.history.lock().unwrap_or_else(|e| e.into_inner());
        history
            .by_node
            .get(node)
            .map(|values| {
                values
                    .iter()
                    .map(crate::source::value::value_ts_ms)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The values of `node` with a source timestamp in `[start, end]` (a
    /// null bound is open), at most `max` (0: all); and where to go on, if
    /// there is more.
    fn raw(
        &self,
        node: &NodeId,
        start: DateTime,
        end: DateTime,
        max: usize,
    ) -> Result<(Vec<DataValue>, Option<DateTime>), StatusCode> {
        if self
            .not_historized
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains(node)
        {
            return Err(StatusCode::BadHistoryOperationUnsupported);
        }
        let history = self.history.lock().unwrap_or_else(|e| e.into_inner());
        let Some(values) = history.by_node.get(node) else {
            return Ok((Vec::new(), None));
        };
        let within =
            |ts: DateTime| (start.is_null() || ts >= start) && (end.is_null() || ts <= end);
        let mut out = Vec::new();
        for dv in values {
            let ts = dv.source_timestamp.unwrap_or_default();
            if !within(ts) {
                continue;
            }
            if max > 0 && out.len() == max {
                return Ok((out, Some(ts)));
            }
            out.push(dv.clone());
        }
        Ok((out, None))
    }
}

#[async_trait]
impl InMemoryNodeManagerImpl for SimNodeManager {
    async fn init(&self, _address_space: &mut AddressSpace, context: ServerContext) {
        let min_ms = context
            .info
            .config
            .limits
            .subscriptions
            .min_sampling_interval_ms
            .max(100.0);
        self.samplers.run(
            Duration::from_micros((min_ms * 1000.0) as u64),
            context.subscriptions.clone(),
        );
    }

    fn namespaces(&self) -> Vec<NamespaceMetadata> {
        vec![self.namespace.clone()]
    }

    fn name(&self) -> &str {
        &self.name
    }

    async fn read_values(
        &self,
        context: &RequestContext,
        address_space: &RwLock<AddressSpace>,
        nodes: &[&ParsedReadValueId],
        max_age: f64,
        timestamps_to_return: TimestampsToReturn,
    ) -> Vec<DataValue> {
        let address_space = address_space.read();
        nodes
            .iter()
            .map(|n| match address_space.validate_node_read(context, n) {
                Ok(node) => read_node_value(node, context, n, max_age, timestamps_to_return),
                Err(status) => DataValue {
                    status: Some(status),
                    ..DataValue::null()
                },
            })
            .collect()
    }

    async fn create_value_monitored_items(
        &self,
        context: &RequestContext,
        address_space: &RwLock<AddressSpace>,
        items: &mut [&mut &mut CreateMonitoredItem],
    ) {
        let to_read: Vec<_> = items.iter().map(|r| r.item_to_monitor()).collect();
        let values = self
            .read_values(
                context,
                address_space,
                &to_read,
                0.0,
                TimestampsToReturn::Both,
            )
            .await;
        for (value, node) in values.into_iter().zip(items.iter_mut()) {
            if value.status() != StatusCode::BadAttributeIdInvalid {
                node.set_initial_value(value);
            }
            node.set_status(StatusCode::Good);
        }
    }

    async fn modify_monitored_items(
        &self,
        _context: &RequestContext,
        items: &[&MonitoredItemUpdateRef],
    ) {
        for it in items {
            self.samplers.update_sampler(
                it.node_id(),
                it.attribute(),
                it.handle(),
                Duration::from_millis(it.update().revised_sampling_interval as u64),
            );
        }
    }

    async fn set_monitoring_mode(
        &self,
        _context: &RequestContext,
        mode: MonitoringMode,
        items: &[&MonitoredItemRef],
    ) {
        for it in items {
            self.samplers
                .set_sampler_mode(it.node_id(), it.attribute(), it.handle(), mode);
        }
    }

    async fn delete_monitored_items(&self, _context: &RequestContext, items: &[&MonitoredItemRef]) {
        for it in items {
            self.samplers
                .remove_sampler(it.node_id(), it.attribute(), it.handle());
        }
    }

    async fn write(
        &self,
        context: &RequestContext,
        address_space: &RwLock<AddressSpace>,
        nodes_to_write: &mut [&mut WriteNode],
    ) -> Result<(), StatusCode> {
        let mut address_space = address_space.write();
        let type_tree = context.type_tree.read();
        for write in nodes_to_write {
            let status =
                match address_space.validate_node_write(context, write.value(), &*type_tree) {
                    Ok(node) => match write_node_value(node, write.value()) {
                        Ok(()) => StatusCode::Good,
                        Err(e) => e,
                    },
                    Err(e) => e,
                };
            write.set_status(status);
        }
        Ok(())
    }

    async fn history_read_raw_modified(
        &self,
        _context: &RequestContext,
        details: &ReadRawModifiedDetails,
        nodes: &mut [&mut &mut HistoryNode],
        _timestamps_to_return: TimestampsToReturn,
    ) -> Result<(), StatusCode> {
        if details.is_read_modified {
            return Err(StatusCode::BadHistoryOperationUnsupported);
        }
        let quirks = *self.quirks.read().unwrap_or_else(|e| e.into_inner());
        if !quirks.delay.is_zero() {
            tokio::time::sleep(quirks.delay).await;
        }
        let max = match quirks.ignore_max {
            true => 0,
            false => details.num_values_per_node as usize,
        };
        for node in nodes.iter_mut() {
            // Going on from a continuation point: from the next value's
            // timestamp on (values are kept in time order).
            let start = match node.continuation_point() {
                Some(_) if quirks.forget_continuation_points => {
                    node.set_status(StatusCode::BadContinuationPointInvalid);
                    continue;
                }
                Some(cp) => match cp.get::<Resume>() {
                    Some(r) => r.next,
                    None => {
                        node.set_status(StatusCode::BadContinuationPointInvalid);
                        continue;
                    }
                },
                None => details.start_time,
            };
            match self.raw(node.node_id(), start, details.end_time, max) {
                Ok((values, next)) => {
                    node.set_result(HistoryData {
                        data_values: Some(values),
                    });
                    node.set_next_continuation_point(
                        next.map(|next| ContinuationPoint::new(Box::new(Resume { next }))),
                    );
                    node.set_status(StatusCode::Good);
                }
                Err(status) => node.set_status(status),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use opcua::client::HistoryReadAction;
    use opcua::types::{
        ByteString, ExtensionObject, HistoryData, HistoryReadValueId, ReadRawModifiedDetails,
        StatusCode, TimestampsToReturn,
    };

    use crate::sim::{SimOptions, SimValue};
    use crate::source::open::OneShot;

    fn connection(endpoint: &str) -> crate::config::ConnectionConfig {
        let toml = format!(
            "[agent]\nid = \"t\"\nsite = \"t\"\n[mqtt]\nurl = \"mqtts://localhost\"\n\
             [[connections]]\nid = \"h\"\nkind = \"generic\"\nendpoint = \"{endpoint}\"\n\
             security_policy = \"None\"\nsecurity_mode = \"None\"\n"
        );
        let loaded = crate::config::load_from(&toml, &Default::default()).expect("config");
        loaded.config.connections.into_iter().next().expect("one")
    }

    /// Reads the raw history of `node` between `start` and `end` (ms), `per`
    /// values per request, following continuation points: the values and
    /// the number of requests.
    async fn read_all(
        one: &OneShot,
        node: &opcua::types::NodeId,
        start_ms: i64,
        end_ms: i64,
        per: u32,
    ) -> Result<(Vec<f64>, usize), StatusCode> {
        let details = ReadRawModifiedDetails {
            is_read_modified: false,
            start_time: super::super::server::datetime_from_ms(start_ms),
            end_time: super::super::server::datetime_from_ms(end_ms),
            num_values_per_node: per,
            return_bounds: false,
        };
        let mut cp = ByteString::null();
        let mut values = Vec::new();
        let mut requests = 0;
        loop {
            requests += 1;
            let id = HistoryReadValueId {
                node_id: node.clone(),
                continuation_point: cp.clone(),
                ..Default::default()
            };
            let results = one
                .session()
                .history_read(
                    HistoryReadAction::ReadRawModifiedDetails(details.clone()),
                    TimestampsToReturn::Source,
                    false,
                    &[id],
                )
                .await
                .map_err(|e| e.status())?;
            let r = results.into_iter().next().expect("one result");
            if r.status_code.is_bad() {
                return Err(r.status_code);
            }
            let data: HistoryData = ExtensionObject::into_inner_as(r.history_data)
                .map(|b| *b)
                .expect("HistoryData");
            for dv in data.data_values.into_iter().flatten() {
                if let Some(opcua::types::Variant::Double(v)) = dv.value {
                    values.push(v);
                }
            }
            if r.continuation_point.is_null_or_empty() {
                return Ok((values, requests));
            }
            cp = r.continuation_point;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_simulator_answers_history_read_raw_with_continuation_points() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut opts = SimOptions::new(dir.path().join("pki"));
        opts.speed = 0.0;
        let sim = crate::sim::start_deltav(opts, Default::default())
            .await
            .expect("simulator");
        let ns = sim.namespace();
        let t0 = crate::record::now_ms() - 60_000;
        for i in 0..10 {
            ns.set_many_at(
                vec![
                    ("FIC-101/PV.CV".into(), SimValue::Double(i as f64)),
                    ("TIC-201/PV.CV".into(), SimValue::Double(100.0 + i as f64)),
                ],
                t0 + i * 1_000,
            )
            .expect("set");
        }
        ns.set_historized("TIC-201/PV.CV", false);

        let one = OneShot::open(&connection(&sim.endpoint()), &dir.path().join("client-pki"))
            .await
            .expect("session");
        let fic = ns.node_id("FIC-101/PV.CV");
        // Seconds 2..=7, three per request: two requests and a continuation.
        let (values, requests) = read_all(&one, &fic, t0 + 2_000, t0 + 7_000, 3)
            .await
            .expect("history");
        assert_eq!(values, [2.0, 3.0, 4.0, 5.0, 6.0, 7.0]);
        assert_eq!(requests, 2);
        // All of it in one.
        let (values, _) = read_all(&one, &fic, t0 - 1, t0 + 60_000, 0)
            .await
            .expect("history");
        assert_eq!(values.len(), 10);
        // A node that keeps no history says so.
        let tic = ns.node_id("TIC-201/PV.CV");
        assert_eq!(
            read_all(&one, &tic, t0, t0 + 60_000, 0).await.err(),
            Some(StatusCode::BadHistoryOperationUnsupported)
        );
        one.close().await;
        sim.shutdown().await;
    }
}
