//! Namespace 0 as the simulators serve it: one table of nodes (ids are the
//! OPC Foundation's numbers) and how a row becomes a node. See the parent
//! module for what is in it and why.

use super::*;

/// What a node of the table is (ids are namespace 0's numbers).
#[derive(Clone, Copy)]
pub(super) enum Kind {
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
pub(super) struct Row {
    pub(super) id: u32,
    pub(super) name: &'static str,
    pub(super) parent: u32,
    pub(super) via: u32,
    pub(super) kind: Kind,
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
pub(super) const NODES: &[Row] = &[
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
pub(super) fn insert(space: &mut AddressSpace, row: &Row) {
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
