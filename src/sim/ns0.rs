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

/// What a node of the table is (ids are namespace 0's numbers).
#[derive(Clone, Copy)]
enum Kind {
    /// An object of this object type.
    Object(u32),
    /// A variable: data type, value rank (-1 scalar, 1 array), variable type.
    Variable(u32, i32, u32),
    /// An object type: abstract or not.
    ObjectType(bool),
    /// A variable type: data type, value rank, abstract or not.
    VariableType(u32, i32, bool),
    /// A data type: abstract or not.
    DataType(bool),
    /// A reference type: inverse name (empty: symmetric), abstract or not.
    ReferenceType(&'static str, bool),
}

/// One node: its id, browse (and display) name, the node it hangs under
/// (its supertype for a type; 0 for none) and the reference from there.
#[derive(Clone, Copy)]
struct Row {
    id: u32,
    name: &'static str,
    parent: u32,
    via: u32,
    kind: Kind,
}

const ORGANIZES: u32 = ReferenceTypeId::Organizes as u32;
const HAS_COMPONENT: u32 = ReferenceTypeId::HasComponent as u32;
const HAS_PROPERTY: u32 = ReferenceTypeId::HasProperty as u32;
const HAS_SUBTYPE: u32 = ReferenceTypeId::HasSubtype as u32;

const fn row(id: u32, name: &'static str, parent: u32, via: u32, kind: Kind) -> Row {
    Row {
        id,
        name,
        parent,
        via,
        kind,
    }
}

/// An object organized by `parent`, of type `type_definition`.
const fn organized(id: u32, name: &'static str, parent: u32, type_definition: u32) -> Row {
    row(id, name, parent, ORGANIZES, Kind::Object(type_definition))
}

const fn folder(id: u32, name: &'static str, parent: u32) -> Row {
    organized(id, name, parent, FOLDER_TYPE)
}

const fn object(id: u32, name: &'static str, parent: u32, type_definition: u32) -> Row {
    row(
        id,
        name,
        parent,
        HAS_COMPONENT,
        Kind::Object(type_definition),
    )
}

const fn property(id: u32, name: &'static str, parent: u32, data_type: u32, rank: i32) -> Row {
    let kind = Kind::Variable(data_type, rank, PROPERTY_TYPE);
    row(id, name, parent, HAS_PROPERTY, kind)
}

/// A scalar variable component of variable type `type_definition`.
const fn component(id: u32, name: &'static str, parent: u32, dt: u32, type_def: u32) -> Row {
    row(
        id,
        name,
        parent,
        HAS_COMPONENT,
        Kind::Variable(dt, SCALAR, type_def),
    )
}

/// A type node, subtype of `supertype`.
const fn subtype(id: u32, name: &'static str, supertype: u32, kind: Kind) -> Row {
    row(id, name, supertype, HAS_SUBTYPE, kind)
}

const fn reference(id: u32, name: &'static str, supertype: u32, inverse: &'static str) -> Row {
    subtype(id, name, supertype, Kind::ReferenceType(inverse, false))
}

const fn abstract_reference(id: u32, name: &'static str, sup: u32, inverse: &'static str) -> Row {
    subtype(id, name, sup, Kind::ReferenceType(inverse, true))
}

const fn data_type(id: u32, name: &'static str, supertype: u32) -> Row {
    subtype(id, name, supertype, Kind::DataType(false))
}

const fn abstract_data_type(id: u32, name: &'static str, supertype: u32) -> Row {
    subtype(id, name, supertype, Kind::DataType(true))
}

const fn object_type(id: u32, name: &'static str, supertype: u32) -> Row {
    subtype(id, name, supertype, Kind::ObjectType(false))
}

/// A variable type for scalars of `data_type`.
const fn variable_type(id: u32, name: &'static str, supertype: u32, data_type: u32) -> Row {
    subtype(
        id,
        name,
        supertype,
        Kind::VariableType(data_type, SCALAR, false),
    )
}

impl Row {
    /// The root of a type hierarchy has no supertype: it hangs in its
    /// folder under Types.
    const fn organized_under(mut self, folder: u32) -> Row {
        self.parent = folder;
        self.via = ORGANIZES;
        self
    }
}

const SCALAR: i32 = -1;
const ARRAY: i32 = 1;
/// ValueRank "scalar or array of any dimensions" of the base variable types.
const ANY_RANK: i32 = -2;

// Ids the table refers to more than once.
const BASE_DATA_TYPE: u32 = 24;
const FOLDER_TYPE: u32 = 61;
const BASE_DATA_VARIABLE_TYPE: u32 = 63;
const PROPERTY_TYPE: u32 = 68;
const BOOLEAN: u32 = 1;
const BYTE: u32 = 3;
const UINT16: u32 = 5;
const UINT32: u32 = 7;
const STRING: u32 = 12;
const LOCALIZED_TEXT: u32 = 21;
const DURATION: u32 = 290;
const UTC_TIME: u32 = 294;
const LOCALE_ID: u32 = 295;
const BUILD_INFO: u32 = 338;
const SERVER_STATE: u32 = 852;
const SERVER_STATUS_DATA_TYPE: u32 = 862;
const LIMITS: u32 = 11704;

/// The nodes. Numbers and names are the OPC UA specification's (Part 5,
/// and Part 6's NodeIds.csv); a unit test checks them against async-opcua's
/// generated id enums, and that every node a row points at is a row.
#[rustfmt::skip]
const NODES: &[Row] = &[
    // The folders.
    folder(84, "Root", 0),
    folder(85, "Objects", 84),
    folder(86, "Types", 84),
    folder(87, "Views", 84),
    folder(88, "ObjectTypes", 86),
    folder(89, "VariableTypes", 86),
    folder(90, "DataTypes", 86),
    folder(91, "ReferenceTypes", 86),
    // Reference types: the hierarchy a browse filters on.
    abstract_reference(31, "References", 0, "").organized_under(91),
    abstract_reference(32, "NonHierarchicalReferences", 31, ""),
    abstract_reference(33, "HierarchicalReferences", 31, "InverseHierarchicalReferences"),
    abstract_reference(34, "HasChild", 33, "ChildOf"),
    reference(35, "Organizes", 33, "OrganizedBy"),
    reference(36, "HasEventSource", 33, "EventSourceOf"),
    reference(37, "HasModellingRule", 32, "ModellingRuleOf"),
    reference(38, "HasEncoding", 32, "EncodingOf"),
    reference(39, "HasDescription", 32, "DescriptionOf"),
    reference(40, "HasTypeDefinition", 32, "TypeDefinitionOf"),
    reference(41, "GeneratesEvent", 32, "GeneratedBy"),
    abstract_reference(44, "Aggregates", 34, "AggregatedBy"),
    reference(45, "HasSubtype", 34, "SubtypeOf"),
    reference(46, "HasProperty", 44, "PropertyOf"),
    reference(47, "HasComponent", 44, "ComponentOf"),
    reference(48, "HasNotifier", 36, "NotifierOf"),
    reference(49, "HasOrderedComponent", 47, "OrderedComponentOf"),
    // Data types: the built-in ones (a simulator value can be any of them)
    // and those of the Server object's variables.
    abstract_data_type(BASE_DATA_TYPE, "BaseDataType", 0).organized_under(90),
    abstract_data_type(26, "Number", 24),
    abstract_data_type(27, "Integer", 26),
    abstract_data_type(28, "UInteger", 26),
    data_type(BOOLEAN, "Boolean", 24),
    data_type(2, "SByte", 27),
    data_type(BYTE, "Byte", 28),
    data_type(4, "Int16", 27),
    data_type(UINT16, "UInt16", 28),
    data_type(6, "Int32", 27),
    data_type(UINT32, "UInt32", 28),
    data_type(8, "Int64", 27),
    data_type(9, "UInt64", 28),
    data_type(10, "Float", 26),
    data_type(11, "Double", 26),
    data_type(STRING, "String", 24),
    data_type(13, "DateTime", 24),
    data_type(14, "Guid", 24),
    data_type(15, "ByteString", 24),
    data_type(16, "XmlElement", 24),
    data_type(17, "NodeId", 24),
    data_type(18, "ExpandedNodeId", 24),
    data_type(19, "StatusCode", 24),
    data_type(20, "QualifiedName", 24),
    data_type(LOCALIZED_TEXT, "LocalizedText", 24),
    abstract_data_type(22, "Structure", 24),
    data_type(23, "DataValue", 24),
    data_type(25, "DiagnosticInfo", 24),
    abstract_data_type(29, "Enumeration", 24),
    data_type(DURATION, "Duration", 11),
    data_type(UTC_TIME, "UtcTime", 13),
    data_type(LOCALE_ID, "LocaleId", STRING),
    data_type(BUILD_INFO, "BuildInfo", 22),
    data_type(SERVER_STATE, "ServerState", 29),
    data_type(SERVER_STATUS_DATA_TYPE, "ServerStatusDataType", 22),
    // Object and variable types of the nodes here and of the simulators'
    // folders and variables.
    object_type(58, "BaseObjectType", 0).organized_under(88),
    object_type(FOLDER_TYPE, "FolderType", 58),
    object_type(2004, "ServerType", 58),
    object_type(2013, "ServerCapabilitiesType", 58),
    object_type(11564, "OperationLimitsType", FOLDER_TYPE),
    subtype(62, "BaseVariableType", 0, Kind::VariableType(BASE_DATA_TYPE, ANY_RANK, true))
        .organized_under(89),
    subtype(
        BASE_DATA_VARIABLE_TYPE,
        "BaseDataVariableType",
        62,
        Kind::VariableType(BASE_DATA_TYPE, ANY_RANK, false),
    ),
    subtype(PROPERTY_TYPE, "PropertyType", 62, Kind::VariableType(BASE_DATA_TYPE, ANY_RANK, false)),
    variable_type(2138, "ServerStatusType", 63, SERVER_STATUS_DATA_TYPE),
    variable_type(3051, "BuildInfoType", 63, BUILD_INFO),
    // The Server object.
    organized(2253, "Server", 85, 2004),
    property(2254, "ServerArray", 2253, STRING, ARRAY),
    property(2255, "NamespaceArray", 2253, STRING, ARRAY),
    component(2256, "ServerStatus", 2253, SERVER_STATUS_DATA_TYPE, 2138),
    component(2257, "StartTime", 2256, UTC_TIME, BASE_DATA_VARIABLE_TYPE),
    component(2258, "CurrentTime", 2256, UTC_TIME, BASE_DATA_VARIABLE_TYPE),
    component(2259, "State", 2256, SERVER_STATE, BASE_DATA_VARIABLE_TYPE),
    component(2260, "BuildInfo", 2256, BUILD_INFO, 3051),
    component(2261, "ProductName", 2260, STRING, BASE_DATA_VARIABLE_TYPE),
    component(2262, "ProductUri", 2260, STRING, BASE_DATA_VARIABLE_TYPE),
    component(2263, "ManufacturerName", 2260, STRING, BASE_DATA_VARIABLE_TYPE),
    component(2264, "SoftwareVersion", 2260, STRING, BASE_DATA_VARIABLE_TYPE),
    component(2265, "BuildNumber", 2260, STRING, BASE_DATA_VARIABLE_TYPE),
    component(2266, "BuildDate", 2260, UTC_TIME, BASE_DATA_VARIABLE_TYPE),
    component(2992, "SecondsTillShutdown", 2256, UINT32, BASE_DATA_VARIABLE_TYPE),
    component(2993, "ShutdownReason", 2256, LOCALIZED_TEXT, BASE_DATA_VARIABLE_TYPE),
    property(2267, "ServiceLevel", 2253, BYTE, SCALAR),
    property(2994, "Auditing", 2253, BOOLEAN, SCALAR),
    object(2268, "ServerCapabilities", 2253, 2013),
    property(2269, "ServerProfileArray", 2268, STRING, ARRAY),
    property(2271, "LocaleIdArray", 2268, LOCALE_ID, ARRAY),
    property(2272, "MinSupportedSampleRate", 2268, DURATION, SCALAR),
    property(2735, "MaxBrowseContinuationPoints", 2268, UINT16, SCALAR),
    property(2736, "MaxQueryContinuationPoints", 2268, UINT16, SCALAR),
    property(2737, "MaxHistoryContinuationPoints", 2268, UINT16, SCALAR),
    property(11702, "MaxArrayLength", 2268, UINT32, SCALAR),
    property(11703, "MaxStringLength", 2268, UINT32, SCALAR),
    property(12911, "MaxByteStringLength", 2268, UINT32, SCALAR),
    object(LIMITS, "OperationLimits", 2268, 11564),
    property(11705, "MaxNodesPerRead", LIMITS, UINT32, SCALAR),
    property(12165, "MaxNodesPerHistoryReadData", LIMITS, UINT32, SCALAR),
    property(12166, "MaxNodesPerHistoryReadEvents", LIMITS, UINT32, SCALAR),
    property(11707, "MaxNodesPerWrite", LIMITS, UINT32, SCALAR),
    property(12167, "MaxNodesPerHistoryUpdateData", LIMITS, UINT32, SCALAR),
    property(12168, "MaxNodesPerHistoryUpdateEvents", LIMITS, UINT32, SCALAR),
    property(11709, "MaxNodesPerMethodCall", LIMITS, UINT32, SCALAR),
    property(11710, "MaxNodesPerBrowse", LIMITS, UINT32, SCALAR),
    property(11711, "MaxNodesPerRegisterNodes", LIMITS, UINT32, SCALAR),
    property(11712, "MaxNodesPerTranslateBrowsePathsToNodeIds", LIMITS, UINT32, SCALAR),
    property(11713, "MaxNodesPerNodeManagement", LIMITS, UINT32, SCALAR),
    property(11714, "MaxMonitoredItemsPerCall", LIMITS, UINT32, SCALAR),
];

/// Adds `row`'s node with its reference from its parent and, for objects
/// and variables, its HasTypeDefinition.
fn insert(space: &mut AddressSpace, row: &Row) {
    let id = NodeId::new(0, row.id);
    let name = row.name;
    let n = |i: u32| NodeId::new(0, i);
    let (node, type_definition): (NodeType, Option<u32>) = match row.kind {
        Kind::Object(type_def) => {
            let node = Object::new(&id, name, name, EventNotifier::empty());
            (node.into(), Some(type_def))
        }
        Kind::Variable(data_type, rank, type_def) => {
            let node = Variable::new_data_value(
                &id,
                name,
                name,
                n(data_type),
                Some(rank),
                None,
                Variant::Empty,
            );
            (node.into(), Some(type_def))
        }
        Kind::ObjectType(is_abstract) => {
            (ObjectType::new(&id, name, name, is_abstract).into(), None)
        }
        Kind::VariableType(data_type, rank, is_abstract) => {
            let node = VariableType::new(&id, name, name, n(data_type), is_abstract, rank);
            (node.into(), None)
        }
        Kind::DataType(is_abstract) => (DataType::new(&id, name, name, is_abstract).into(), None),
        Kind::ReferenceType(inverse, is_abstract) => {
            let inverse_name = (!inverse.is_empty()).then(|| LocalizedText::from(inverse));
            let symmetric = inverse_name.is_none();
            let node = ReferenceType::new(&id, name, name, inverse_name, symmetric, is_abstract);
            (node.into(), None)
        }
    };
    let (parent, via) = (n(row.parent), n(row.via));
    let has_type_definition = n(ReferenceTypeId::HasTypeDefinition as u32);
    let type_node = type_definition.map(n);
    let mut references = Vec::with_capacity(2);
    if row.parent != 0 {
        references.push((&parent, &via, ReferenceDirection::Inverse));
    }
    if let Some(t) = &type_node {
        references.push((t, &has_type_definition, ReferenceDirection::Forward));
    }
    space.insert(node, Some(references.as_slice()));
}

#[cfg(test)]
mod tests {
    use std::collections::{HashMap, HashSet, VecDeque};
    use std::sync::Arc;

    use opcua::client::{DataChangeCallback, Session};
    use opcua::types::{
        BrowseDescription, BrowseDirection, BrowseResultMask, DataTypeId,
        MonitoredItemCreateRequest, MonitoringParameters, NodeClass, ObjectId, ObjectTypeId,
        QualifiedName, ReadValueId, ServerState, VariableId, VariableTypeId,
    };

    use super::*;
    use crate::sim::test_client::open_session;
    use crate::sim::{batch, deltav, optomes, SimExtras, SimOptions, SimServer};

    /// The name async-opcua's generated enums give `row`'s id.
    fn generated_name(row: &Row) -> Option<String> {
        let id = row.id;
        let name = |x: &dyn std::fmt::Debug| format!("{x:?}");
        match row.kind {
            Kind::Object(_) => ObjectId::try_from(id).ok().map(|x| name(&x)),
            Kind::Variable(..) => VariableId::try_from(id).ok().map(|x| name(&x)),
            Kind::ObjectType(_) => ObjectTypeId::try_from(id).ok().map(|x| name(&x)),
            Kind::VariableType(..) => VariableTypeId::try_from(id).ok().map(|x| name(&x)),
            Kind::DataType(_) => DataTypeId::try_from(id).ok().map(|x| name(&x)),
            Kind::ReferenceType(..) => ReferenceTypeId::try_from(id).ok().map(|x| name(&x)),
        }
    }

    #[test]
    fn table_ids_are_the_specifications_and_every_target_is_in_it() {
        let ids: HashSet<u32> = NODES.iter().map(|r| r.id).collect();
        assert_eq!(ids.len(), NODES.len(), "an id twice");
        for row in NODES {
            let generated = generated_name(row)
                .unwrap_or_else(|| panic!("{} ({}) is no such node", row.name, row.id));
            // The generated names of objects are paths ("Server_ServerStatus")
            // and folders are named "...Folder".
            assert!(
                generated.trim_end_matches("Folder").ends_with(row.name),
                "{} is i={}, which is {generated}",
                row.name,
                row.id
            );
            let mut targets = vec![row.via];
            if row.parent != 0 {
                targets.push(row.parent);
            }
            match row.kind {
                Kind::Object(type_def) => targets.push(type_def),
                Kind::Variable(data_type, _, type_def) => targets.extend([data_type, type_def]),
                Kind::VariableType(data_type, ..) => targets.push(data_type),
                _ => {}
            }
            for t in targets {
                assert!(ids.contains(&t), "{} points at i={t}, not served", row.name);
            }
        }
    }

    /// Every node reached from Objects over forward hierarchical references
    /// (subtypes included), as a `plantgate browse` walks it: at most
    /// `max_refs` references per result (0: the server's choice),
    /// continuation points followed.
    async fn walk_objects(session: &Session, max_refs: u32) -> HashMap<NodeId, NodeClass> {
        let mut seen = HashMap::new();
        let mut queue = VecDeque::from([NodeId::objects_folder_id()]);
        while let Some(node) = queue.pop_front() {
            let browse = BrowseDescription {
                node_id: node.clone(),
                browse_direction: BrowseDirection::Forward,
                reference_type_id: ReferenceTypeId::HierarchicalReferences.into(),
                include_subtypes: true,
                node_class_mask: 0,
                result_mask: BrowseResultMask::All as u32,
            };
            let mut results = session.browse(&[browse], max_refs, None).await;
            loop {
                let mut result = results.expect("browse").pop().expect("a result per node");
                assert!(
                    result.status_code.is_good(),
                    "{node}: {}",
                    result.status_code
                );
                for r in result.references.take().unwrap_or_default() {
                    let target = r.node_id.node_id;
                    if seen.insert(target.clone(), r.node_class).is_none() {
                        queue.push_back(target);
                    }
                }
                if result.continuation_point.is_null_or_empty() {
                    break;
                }
                let point = [result.continuation_point];
                results = session.browse_next(false, &point).await;
            }
        }
        seen
    }

    /// The string ids of the variables a simulator creates (its own
    /// construction, from the same public pieces), with `tags` load tags.
    fn simulator_variables(kind: &str, seed: u64, tags: usize) -> HashSet<String> {
        let mut want: HashSet<String> = (0..tags).map(deltav::load_tag).collect();
        if kind == "deltav" {
            want.extend(deltav::continuous_tags());
            for unit in batch::UNITS {
                let params = batch::UnitValues::idle().variables();
                want.extend(params.iter().map(|(p, _)| batch::node_id(unit, p)));
            }
        } else {
            let cycles = optomes::work_center_cycles(seed);
            for (wc, cycle) in optomes::WORK_CENTERS.iter().zip(&cycles) {
                let params = cycle.initial_values().variables();
                want.extend(params.iter().map(|(p, _)| optomes::node_id(wc, p)));
            }
        }
        want
    }

    async fn start(kind: &str, dir: &std::path::Path, tags: usize) -> SimServer {
        let mut opts = SimOptions::new(dir.join(kind));
        opts.tags = tags;
        // Frozen: browsing does not need changing values.
        opts.speed = 0.0;
        let started = match kind {
            "deltav" => deltav::start_deltav(opts, SimExtras::default()).await,
            _ => optomes::start_optomes(opts, SimExtras::default()).await,
        };
        started.expect("simulator starts")
    }

    async fn close(session: Arc<Session>, event_loop: tokio::task::JoinHandle<StatusCode>) {
        let _ = tokio::time::timeout(Duration::from_secs(5), session.disconnect()).await;
        event_loop.abort();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn browse_from_objects_reaches_every_simulator_variable() {
        let dir = tempfile::tempdir().expect("temp dir");
        for kind in ["deltav", "optomes"] {
            let server = start(kind, dir.path(), 3).await;
            let (session, event_loop) =
                open_session(&server.endpoint(), &dir.path().join("client")).await;
            let found = walk_objects(&session, 0).await;
            let variables: HashSet<String> = found
                .iter()
                .filter(|(id, class)| {
                    **class == NodeClass::Variable && id.namespace == server.namespace_index()
                })
                .map(|(id, _)| match &id.identifier {
                    Identifier::String(s) => s.as_ref().to_string(),
                    other => other.to_string(),
                })
                .collect();
            assert_eq!(variables, simulator_variables(kind, 1, 3), "{kind}");
            // The Server object is there too, down to its limits.
            for id in [2253, 2256, 2258, 2268, 11704, 11714] {
                assert!(found.contains_key(&NodeId::new(0, id)), "{kind}: i={id}");
            }
            // One reference per result: the same nodes through continuation
            // points, across node managers (ns0's Server, then the
            // simulator's folders under Objects).
            assert_eq!(walk_objects(&session, 1).await, found, "{kind}");
            close(session, event_loop).await;
            server.shutdown().await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn server_object_answers_namespace_array_and_server_status() {
        let dir = tempfile::tempdir().expect("temp dir");
        let server = start("deltav", dir.path(), 0).await;
        let (session, event_loop) =
            open_session(&server.endpoint(), &dir.path().join("client")).await;

        // Every variable of the table reads Good with a value.
        let variables: Vec<u32> = NODES
            .iter()
            .filter(|r| matches!(r.kind, Kind::Variable(..)))
            .map(|r| r.id)
            .collect();
        let reads: Vec<ReadValueId> = variables
            .iter()
            .map(|id| ReadValueId::from(NodeId::new(0, *id)))
            .collect();
        let values = session
            .read(&reads, TimestampsToReturn::Both, 0.0)
            .await
            .expect("read");
        let mut by_id = HashMap::new();
        for (id, dv) in variables.iter().zip(values) {
            assert_eq!(dv.status(), StatusCode::Good, "i={id}");
            let value = dv.value.unwrap_or(Variant::Empty);
            assert!(!value.is_empty(), "i={id} has no value");
            by_id.insert(*id, value);
        }

        // NamespaceArray: UA, the server's own, then the simulator's at 2.
        let namespaces = session
            .read_namespace_array()
            .await
            .expect("NamespaceArray");
        assert_eq!(namespaces.get_index(UA_NAMESPACE), Some(0));
        assert_eq!(
            namespaces.get_index("urn:plantgate:sim:deltav:server"),
            Some(1)
        );
        assert_eq!(namespaces.get_index(deltav::NAMESPACE_URI), Some(2));
        assert_eq!(server.namespace_index(), 2);

        // ServerStatus as a structure and in parts.
        let Some(Variant::ExtensionObject(status)) = by_id.get(&2256) else {
            panic!("ServerStatus: {:?}", by_id.get(&2256));
        };
        let status = status
            .inner_as::<ServerStatusDataType>()
            .expect("a ServerStatusDataType");
        assert_eq!(status.state, ServerState::Running);
        assert!(status.start_time <= status.current_time);
        assert_eq!(
            status.build_info.product_name.as_ref(),
            "plantgate deltav simulator"
        );
        assert_eq!(by_id.get(&2259), Some(&Variant::Int32(0)), "State");
        assert!(matches!(by_id.get(&2258), Some(Variant::DateTime(_))));
        assert_eq!(
            by_id.get(&11714),
            Some(&Variant::UInt32(100_000)),
            "MaxMonitoredItemsPerCall (the simulators' limit)"
        );

        // A simulator variable's DataType is a node the server serves.
        let tag = NodeId::new(2, deltav::continuous_tags()[0].as_str());
        let data_type = session
            .read(
                &[ReadValueId {
                    node_id: tag,
                    attribute_id: AttributeId::DataType as u32,
                    ..Default::default()
                }],
                TimestampsToReturn::Neither,
                0.0,
            )
            .await
            .expect("read DataType");
        let Some(Variant::NodeId(data_type)) = data_type[0].value.clone() else {
            panic!("DataType: {:?}", data_type[0]);
        };
        let name = session
            .read(
                &[ReadValueId {
                    node_id: *data_type,
                    attribute_id: AttributeId::BrowseName as u32,
                    ..Default::default()
                }],
                TimestampsToReturn::Neither,
                0.0,
            )
            .await
            .expect("read BrowseName");
        assert_eq!(
            name[0].value,
            Some(Variant::from(QualifiedName::new(0, "Double")))
        );

        close(session, event_loop).await;
        server.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn current_time_is_sampled_for_subscribers() {
        let dir = tempfile::tempdir().expect("temp dir");
        let server = start("deltav", dir.path(), 0).await;
        let (session, event_loop) =
            open_session(&server.endpoint(), &dir.path().join("client")).await;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let sub = session
            .create_subscription(
                Duration::from_millis(50),
                300,
                100,
                0,
                0,
                true,
                DataChangeCallback::new(move |dv, _| {
                    let _ = tx.send(dv);
                }),
            )
            .await
            .expect("subscription");
        let item = |id: u32| {
            MonitoredItemCreateRequest::new(
                ReadValueId::from(NodeId::new(0, id)),
                MonitoringMode::Reporting,
                MonitoringParameters {
                    sampling_interval: 50.0,
                    queue_size: 10,
                    ..Default::default()
                },
            )
        };
        let created = session
            .create_monitored_items(
                sub,
                TimestampsToReturn::Both,
                vec![item(2258), item(99_999)],
            )
            .await
            .expect("monitored items");
        assert_eq!(created[0].result.status_code, StatusCode::Good);
        assert_eq!(created[1].result.status_code, StatusCode::BadNodeIdUnknown);
        let mut times = HashSet::new();
        while times.len() < 3 {
            let dv = tokio::time::timeout(Duration::from_secs(10), rx.recv())
                .await
                .expect("CurrentTime keeps changing")
                .expect("subscription open");
            if let Some(Variant::DateTime(t)) = dv.value {
                times.insert(t.ticks());
            }
        }
        close(session, event_loop).await;
        server.shutdown().await;
    }
}
