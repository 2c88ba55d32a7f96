//! The part of OPC UA namespace 0 the simulators serve.
//!
//! async-opcua's generated namespace 0 (its `generated-address-space`
//! feature) holds several thousand nodes and was 30 % of the code of the
//! release binary, although only the simulators run a server (Cargo.toml).
//! Clients of a simulator need far less of it, and this node manager gives
//! them that, from one table of nodes:
//!
//! - the Root/Objects/Types/Views folders, so that a browse from Objects
//!   reaches the simulator's folders and variables (other node managers
//!   hang their folders under Objects);
//! - the reference types of the hierarchy, registered in the server's type
//!   tree (the server drops browse results whose reference type it does not
//!   know, and a browse filtered on HierarchicalReferences with subtypes
//!   needs their HasSubtype chain);
//! - the data types of the simulator's values and of the Server object's
//!   variables, with their supertypes (data-type checks, and a client that
//!   reads a variable's DataType can resolve it), and the object and
//!   variable types the nodes here point at;
//! - the Server object: NamespaceArray (every client reads it to resolve
//!   `nsu=` node ids), ServerStatus with State (async-opcua's client reads
//!   it as its keep-alive) and CurrentTime, ServerArray, ServiceLevel, and
//!   ServerCapabilities with OperationLimits (what a client reads to size its
//!   requests).
//!
//! Left out on purpose: events and event types (no simulator raises events),
//! methods, diagnostics, redundancy, and the type-system metadata
//! (encodings, DataTypeDefinition, EnumStrings).
//!
//! Values of the Server object's variables are not stored: they are
//! computed on each read from the server's state and configuration, as the
//! library's own core node manager does.

use std::sync::atomic::Ordering;
use std::time::Duration;

use async_trait::async_trait;
use opcua::sync::RwLock;
use opcua::types::{
    AttributeId, DataValue, DateTime, ExtensionObject, Identifier, LocalizedText, MonitoringMode,
    NodeId, NumericRange, ReferenceTypeId, ServerStatusDataType, StatusCode, TimestampsToReturn,
    UAString, Variant,
};
use opcua_server::address_space::{
    read_node_value, AddressSpace, DataType, EventNotifier, NodeType, Object, ObjectType,
    ReferenceDirection, ReferenceType, Variable, VariableType,
};
use opcua_server::diagnostics::NamespaceMetadata;
use opcua_server::node_manager::memory::{
    InMemoryNodeManagerBuilder, InMemoryNodeManagerImpl, InMemoryNodeManagerImplBuilder,
};
use opcua_server::node_manager::{
    MonitoredItemRef, MonitoredItemUpdateRef, NodeManagersRef, ParsedReadValueId, RequestContext,
    ServerContext, SyncSampler,
};
use opcua_server::{CreateMonitoredItem, ServerStatusWrapper};

/// Namespace 0, the OPC Foundation's.
const UA_NAMESPACE: &str = "http://opcfoundation.org/UA/";

/// The node manager to register first on a simulator's `ServerBuilder`:
/// namespace 0, then the server's own namespace 1 (its application URI,
/// which OPC UA puts at index 1 of the NamespaceArray), so the simulators'
/// namespaces follow from index 2 on.
pub fn node_manager() -> InMemoryNodeManagerBuilder<Ns0Builder> {
    InMemoryNodeManagerBuilder::new(Ns0Builder)
}

/// Builds [`Ns0`]: fills the address space from [`NODES`].
pub struct Ns0Builder;

impl InMemoryNodeManagerImplBuilder for Ns0Builder {
    type Impl = Ns0;

    fn build(self, context: ServerContext, address_space: &mut AddressSpace) -> Ns0 {
        address_space.add_namespace(UA_NAMESPACE, 0);
        let application_uri = context.info.application_uri.as_ref().to_string();
        // Index 0 is already the UA namespace in a new type tree; this one
        // becomes index 1 (no node lives in it: nobody owns it).
        let server_namespace = context
            .type_tree
            .write()
            .namespaces_mut()
            .add_namespace(&application_uri);
        for row in NODES {
            insert(address_space, row);
        }
        Ns0 {
            sampler: SyncSampler::new(),
            node_managers: context.node_managers.clone(),
            status: context.status.clone(),
            application_uri,
            server_namespace,
        }
    }
}

/// Namespace 0's node manager. The address space holds the nodes; the
/// Server object's values come from [`status_value`] and [`server_value`].
pub struct Ns0 {
    /// Samples the ServerStatus values that change while the server runs
    /// (CurrentTime, ...) for monitored items on them.
    sampler: SyncSampler,
    node_managers: NodeManagersRef,
    status: std::sync::Arc<ServerStatusWrapper>,
    application_uri: String,
    server_namespace: u16,
}

#[async_trait]
impl InMemoryNodeManagerImpl for Ns0 {
    async fn init(&self, _address_space: &mut AddressSpace, context: ServerContext) {
        // The sampler's tick: the server's fastest sampling interval.
        let ms = context
            .info
            .config
            .limits
            .subscriptions
            .min_sampling_interval_ms;
        let tick = if ms >= 1.0 { ms as u64 } else { 100 };
        self.sampler
            .run(Duration::from_millis(tick), context.subscriptions.clone());
    }

    fn name(&self) -> &str {
        "ns0"
    }

    fn namespaces(&self) -> Vec<NamespaceMetadata> {
        vec![
            NamespaceMetadata {
                namespace_uri: UA_NAMESPACE.to_string(),
                namespace_index: 0,
                ..Default::default()
            },
            NamespaceMetadata {
                namespace_uri: self.application_uri.clone(),
                namespace_index: self.server_namespace,
                ..Default::default()
            },
        ]
    }

    async fn read_values(
        &self,
        context: &RequestContext,
        address_space: &RwLock<AddressSpace>,
        nodes: &[&ParsedReadValueId],
        max_age: f64,
        timestamps_to_return: TimestampsToReturn,
    ) -> Vec<DataValue> {
        let space = address_space.read();
        nodes
            .iter()
            .map(|n| self.read_value(context, &space, n, max_age, timestamps_to_return))
            .collect()
    }

    async fn create_value_monitored_items(
        &self,
        context: &RequestContext,
        address_space: &RwLock<AddressSpace>,
        items: &mut [&mut &mut CreateMonitoredItem],
    ) {
        let space = address_space.read();
        for item in items.iter_mut() {
            let node = item.item_to_monitor();
            if let Err(status) = space.validate_node_read(context, node) {
                item.set_status(status);
                continue;
            }
            let initial = self.read_value(context, &space, node, 0.0, item.timestamps_to_return());
            let sampled =
                ns0_number(&node.node_id).filter(|id| status_value(&self.status, *id).is_some());
            item.set_initial_value(initial);
            item.set_status(StatusCode::Good);
            if let Some(id) = sampled {
                let status = self.status.clone();
                self.sampler.add_sampler(
                    item.item_to_monitor().node_id.clone(),
                    AttributeId::Value,
                    move || status_value(&status, id).map(DataValue::new_now),
                    item.monitoring_mode(),
                    item.handle(),
                    interval(item.sampling_interval()),
                );
            }
        }
    }

    // The sampler ignores items it does not sample, so these pass all on.

    async fn set_monitoring_mode(
        &self,
        _context: &RequestContext,
        mode: MonitoringMode,
        items: &[&MonitoredItemRef],
    ) {
        for item in items {
            self.sampler
                .set_sampler_mode(item.node_id(), item.attribute(), item.handle(), mode);
        }
    }

    async fn modify_monitored_items(
        &self,
        _context: &RequestContext,
        items: &[&MonitoredItemUpdateRef],
    ) {
        for item in items {
            self.sampler.update_sampler(
                item.node_id(),
                item.attribute(),
                item.handle(),
                interval(item.update().revised_sampling_interval),
            );
        }
    }

    async fn delete_monitored_items(&self, _context: &RequestContext, items: &[&MonitoredItemRef]) {
        for item in items {
            self.sampler
                .remove_sampler(item.node_id(), item.attribute(), item.handle());
        }
    }
}

impl Ns0 {
    /// The Value attribute of `node`: computed for the Server object's
    /// variables, from the address space for anything else.
    fn read_value(
        &self,
        context: &RequestContext,
        space: &AddressSpace,
        node: &ParsedReadValueId,
        max_age: f64,
        timestamps_to_return: TimestampsToReturn,
    ) -> DataValue {
        let found = match space.validate_node_read(context, node) {
            Ok(found) => found,
            Err(status) => return bad(status),
        };
        let computed = ns0_number(&node.node_id).and_then(|id| {
            status_value(&self.status, id).or_else(|| self.server_value(context, id))
        });
        let Some(value) = computed else {
            return read_node_value(found, context, node, max_age, timestamps_to_return);
        };
        let value = match &node.index_range {
            NumericRange::None => value,
            range => match value.range_of(range) {
                Ok(part) => part,
                Err(status) => return bad(status),
            },
        };
        let now = DateTime::now();
        let (source, server) = match timestamps_to_return {
            TimestampsToReturn::Source => (Some(now), None),
            TimestampsToReturn::Server => (None, Some(now)),
            TimestampsToReturn::Both => (Some(now), Some(now)),
            _ => (None, None),
        };
        DataValue {
            value: Some(value),
            status: Some(StatusCode::Good),
            source_timestamp: source,
            server_timestamp: server,
            ..Default::default()
        }
    }

    /// The Server object's values that are fixed while the server runs:
    /// its namespaces, configuration and limits.
    fn server_value(&self, context: &RequestContext, id: u32) -> Option<Variant> {
        let info = &context.info;
        let limits = &info.config.limits;
        let ops = &limits.operational;
        let value = match id {
            // ServerArray
            2254 => Variant::from(info.servers.clone()),
            // NamespaceArray
            2255 => Variant::from(self.namespace_array(context)),
            // ServiceLevel
            2267 => Variant::from(info.service_level.load(Ordering::Relaxed)),
            // Auditing
            2994 => Variant::from(false),
            // ServerCapabilities: ServerProfileArray, ...
            2269 => Variant::from(info.capabilities.profiles.clone()),
            // LocaleIdArray: none
            2271 => Variant::from(Vec::<UAString>::new()),
            // MinSupportedSampleRate, the continuation points, the lengths.
            2272 => Variant::from(limits.subscriptions.min_sampling_interval_ms),
            2735 => Variant::from(u16_of(limits.max_browse_continuation_points)),
            2736 => Variant::from(u16_of(limits.max_query_continuation_points)),
            2737 => Variant::from(u16_of(limits.max_history_continuation_points)),
            11702 => Variant::from(u32_of(limits.max_array_length)),
            11703 => Variant::from(u32_of(limits.max_string_length)),
            // ServerCapabilities/OperationLimits, in the order of the table.
            12911 => Variant::from(u32_of(limits.max_byte_string_length)),
            11705 => Variant::from(u32_of(ops.max_nodes_per_read)),
            11707 => Variant::from(u32_of(ops.max_nodes_per_write)),
            11709 => Variant::from(u32_of(ops.max_nodes_per_method_call)),
            11710 => Variant::from(u32_of(ops.max_nodes_per_browse)),
            11711 => Variant::from(u32_of(ops.max_nodes_per_register_nodes)),
            11712 => Variant::from(u32_of(ops.max_nodes_per_translate_browse_paths_to_node_ids)),
            11713 => Variant::from(u32_of(ops.max_nodes_per_node_management)),
            11714 => Variant::from(u32_of(ops.max_monitored_items_per_call)),
            12165 => Variant::from(u32_of(ops.max_nodes_per_history_read_data)),
            12166 => Variant::from(u32_of(ops.max_nodes_per_history_read_events)),
            12167 | 12168 => Variant::from(u32_of(ops.max_nodes_per_history_update)),
            _ => return None,
        };
        Some(value)
    }

    /// Every node manager's namespaces by index (the simulators' come from
    /// their node managers, so this is asked at read time), holes filled
    /// with empty strings so that positions stay indexes.
    fn namespace_array(&self, context: &RequestContext) -> Vec<String> {
        let mut uris: Vec<String> = Vec::new();
        for ns in self
            .node_managers
            .iter()
            .flat_map(|m| m.namespaces_for_user(context))
        {
            let index = usize::from(ns.namespace_index);
            if uris.len() <= index {
                uris.resize(index + 1, String::new());
            }
            uris[index] = ns.namespace_uri;
        }
        uris
    }
}

/// The ServerStatus variable and its parts, which change while the server
/// runs (so monitored items on them are sampled). None for other nodes.
fn status_value(status: &ServerStatusWrapper, id: u32) -> Option<Variant> {
    let build = || status.build_info();
    let value = match id {
        // ServerStatus, the whole structure
        2256 => Variant::from(ExtensionObject::from_message(ServerStatusDataType {
            start_time: status.start_time(),
            current_time: DateTime::now(),
            state: status.state(),
            build_info: build(),
            seconds_till_shutdown: status.seconds_till_shutdown().unwrap_or(0),
            shutdown_reason: status.shutdown_reason().unwrap_or_default(),
        })),
        // StartTime
        2257 => Variant::from(status.start_time()),
        // CurrentTime
        2258 => Variant::from(DateTime::now()),
        // State
        2259 => Variant::from(status.state() as i32),
        // BuildInfo
        2260 => Variant::from(ExtensionObject::from_message(build())),
        // BuildInfo's parts
        2261 => Variant::from(build().product_name),
        2262 => Variant::from(build().product_uri),
        2263 => Variant::from(build().manufacturer_name),
        2264 => Variant::from(build().software_version),
        2265 => Variant::from(build().build_number),
        2266 => Variant::from(build().build_date),
        // SecondsTillShutdown
        2992 => Variant::from(status.seconds_till_shutdown().unwrap_or(0)),
        // ShutdownReason
        2993 => Variant::from(status.shutdown_reason().unwrap_or_else(LocalizedText::null)),
        _ => return None,
    };
    Some(value)
}

/// A value-less result with a Bad `status`.
fn bad(status: StatusCode) -> DataValue {
    DataValue {
        status: Some(status),
        ..DataValue::null()
    }
}

/// The numeric identifier of a namespace-0 node id.
fn ns0_number(id: &NodeId) -> Option<u32> {
    match id.identifier {
        Identifier::Numeric(n) if id.namespace == 0 => Some(n),
        _ => None,
    }
}

/// A revised sampling interval in ms (negative: the publishing interval,
/// which the sampler's own tick then stands for) as a Duration.
fn interval(ms: f64) -> Duration {
    Duration::from_millis(ms.max(0.0) as u64)
}

fn u32_of(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

fn u16_of(n: usize) -> u16 {
    u16::try_from(n).unwrap_or(u16::MAX)
}

mod nodes;
use nodes::{insert, NODES};

#[cfg(test)]
mod tests;
