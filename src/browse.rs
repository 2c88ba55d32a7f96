//! `plantgate browse` (SPEC 2, docs/cli.md): a server's address space as
//! one line per node, or as `[[connections.tags]]` blocks ready to paste,
//! read through the same session a connection of the service would open
//! (`source::open`). Read-only: Browse, BrowseNext and Read, never a Write.
//!
//! The walk (`walk`) is I/O; what is printed (`line`, `tags_toml`) is pure
//! and unit-tested.

use std::collections::{HashMap, HashSet};

use opcua::types::{
    AttributeId, BrowseDescription, BrowseDirection, BrowseResult, BrowseResultMask, ByteString,
    DataTypeId, Identifier as UaIdentifier, NodeClass, NodeId, ReadValueId, ReferenceTypeId,
    StatusCode, TimestampsToReturn, Variant,
};

use crate::nodeid::{Identifier, Namespace, NodeRef};
use crate::source::open::OneShot;

/// References asked for per node and request. Servers may return fewer and
/// a continuation point; a folder of thousands of tags takes several
/// BrowseNext rounds.
const MAX_REFERENCES_PER_NODE: u32 = 1_000;
/// Nodes per Browse or Read request.
const NODES_PER_REQUEST: usize = 100;
/// A walk stops here, and says so: a whole server at depth 10 can be
/// millions of nodes.
pub const MAX_NODES: usize = 200_000;
/// AccessLevel bits (OPC UA Part 3, 8.57).
const CURRENT_READ: u8 = 0x01;
const CURRENT_WRITE: u8 = 0x02;

/// One node found.
#[derive(Debug, Clone, PartialEq)]
pub struct Found {
    /// In `nsu=` form, as a tag's `node` is written.
    pub node: NodeRef,
    /// Browse names from the start node (not included) to this one.
    pub path: Vec<String>,
    pub class: String,
    /// Variables only: the data type's name (ns 0) or NodeId.
    pub data_type: Option<String>,
    /// Variables only: the AccessLevel attribute.
    pub access: Option<u8>,
}

impl Found {
    pub fn readable(&self) -> bool {
        self.class == "Variable" && self.access.is_some_and(|a| a & CURRENT_READ != 0)
    }
}

/// What a walk found, and what it could not do.
#[derive(Debug, Default)]
pub struct Walk {
    pub found: Vec<Found>,
    /// Nodes whose Browse failed, with the status (the others go on).
    pub failed: Vec<(String, StatusCode)>,
    /// The walk stopped at [`MAX_NODES`].
    pub truncated: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum BrowseError {
    #[error("--from {0}: {1}")]
    From(String, String),
    #[error("{0}: {1}")]
    Service(&'static str, String),
}

/// Browses from `from` down `depth` levels of hierarchical references,
/// then reads the data type and access level of every variable found.
pub async fn walk(one: &OneShot, from: &NodeId, depth: u32) -> Result<Walk, BrowseError> {
    let mut walk = Walk::default();
    let mut seen: HashSet<NodeId> = HashSet::from([from.clone()]);
    let mut level: Vec<(NodeId, Vec<String>)> = vec![(from.clone(), Vec::new())];
    let mut ids: Vec<NodeId> = Vec::new();
    for _ in 0..depth {
        let mut next = Vec::new();
        for chunk in level.chunks(NODES_PER_REQUEST) {
            let results = browse_all(one, chunk).await?;
            for ((parent, path), result) in chunk.iter().zip(results) {
                if result.status_code.is_bad() {
                    walk.failed
                        .push((node_text(one, parent).to_string(), result.status_code));
                    continue;
                }
                for r in result.references.into_iter().flatten() {
                    if r.node_id.server_index != 0 {
                        continue;
                    }
                    let Some(id) = local_id(one, &r.node_id) else {
                        continue;
                    };
                    if !seen.insert(id.clone()) {
                        continue;
                    }
                    if walk.found.len() >= MAX_NODES {
                        walk.truncated = true;
                        break;
                    }
                    let mut p = path.clone();
                    p.push(r.browse_name.name.as_ref().to_string());
                    walk.found.push(Found {
                        node: node_text(one, &id),
                        path: p.clone(),
                        class: format!("{:?}", r.node_class),
                        data_type: None,
                        access: None,
                    });
                    ids.push(id.clone());
                    if r.node_class == NodeClass::Object || r.node_class == NodeClass::Variable {
                        next.push((id, p));
                    }
                }
            }
        }
        if next.is_empty() || walk.truncated {
            break;
        }
        level = next;
    }
    read_variables(one, &mut walk.found, &ids).await?;
    walk.found.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(walk)
}

/// One Browse of `nodes`, then BrowseNext until every node has all its
/// references.
async fn browse_all(
    one: &OneShot,
    nodes: &[(NodeId, Vec<String>)],
) -> Result<Vec<BrowseResult>, BrowseError> {
    let descriptions: Vec<BrowseDescription> = nodes
        .iter()
        .map(|(id, _)| BrowseDescription {
            node_id: id.clone(),
            browse_direction: BrowseDirection::Forward,
            reference_type_id: ReferenceTypeId::HierarchicalReferences.into(),
            include_subtypes: true,
            node_class_mask: 0,
            result_mask: BrowseResultMask::All as u32,
        })
        .collect();
    let mut results = one
        .session()
        .browse(&descriptions, MAX_REFERENCES_PER_NODE, None)
        .await
        .map_err(|e| BrowseError::Service("Browse", e.to_string()))?;
    results.resize_with(nodes.len(), || BrowseResult {
        status_code: StatusCode::BadUnexpectedError,
        ..Default::default()
    });
    loop {
        let pending: Vec<(usize, ByteString)> = results
            .iter()
            .enumerate()
            .filter(|(_, r)| !r.continuation_point.is_null_or_empty())
            .map(|(i, r)| (i, r.continuation_point.clone()))
            .collect();
        if pending.is_empty() {
            return Ok(results);
        }
        let points: Vec<ByteString> = pending.iter().map(|(_, p)| p.clone()).collect();
        let more = one
            .session()
            .browse_next(false, &points)
            .await
            .map_err(|e| BrowseError::Service("BrowseNext", e.to_string()))?;
        for ((i, _), next) in pending
            .iter()
            .zip(more.into_iter().chain(std::iter::repeat_with(
                // A server that answers fewer results than continuation points:
                // those nodes end here, marked.
                || BrowseResult {
                    status_code: StatusCode::BadContinuationPointInvalid,
                    ..Default::default()
                },
            )))
        {
            let r = &mut results[*i];
            r.continuation_point = next.continuation_point;
            if next.status_code.is_bad() {
                r.status_code = next.status_code;
                r.continuation_point = ByteString::null();
            }
            r.references
                .get_or_insert_with(Vec::new)
                .extend(next.references.into_iter().flatten());
        }
    }
}

/// Reads DataType and AccessLevel of the variables among `found`.
async fn read_variables(
    one: &OneShot,
    found: &mut [Found],
    ids: &[NodeId],
) -> Result<(), BrowseError> {
    let variables: Vec<usize> = (0..found.len())
        .filter(|i| found[*i].class == "Variable")
        .collect();
    for chunk in variables.chunks(NODES_PER_REQUEST / 2) {
        let reads: Vec<ReadValueId> = chunk
            .iter()
            .flat_map(|i| {
                [AttributeId::DataType, AttributeId::AccessLevel].map(|a| ReadValueId {
                    node_id: ids[*i].clone(),
                    attribute_id: a as u32,
                    ..Default::default()
                })
            })
            .collect();
        let values = one
            .session()
            .read(&reads, TimestampsToReturn::Neither, 0.0)
            .await
            .map_err(|e| BrowseError::Service("Read", e.to_string()))?;
        for (n, i) in chunk.iter().enumerate() {
            let f = &mut found[*i];
            if let Some(Variant::NodeId(t)) = values.get(2 * n).and_then(|v| v.value.as_ref()) {
                f.data_type = Some(type_name(one, t));
            }
            if let Some(Variant::Byte(a)) = values.get(2 * n + 1).and_then(|v| v.value.as_ref()) {
                f.access = Some(*a);
            }
        }
    }
    Ok(())
}

/// A built-in type's name (Double, String, ...), else the type's NodeId.
fn type_name(one: &OneShot, t: &NodeId) -> String {
    match (&t.identifier, t.namespace) {
        (UaIdentifier::Numeric(n), 0) => DataTypeId::try_from(*n)
            .map(|d| format!("{d:?}"))
            .unwrap_or_else(|_| format!("i={n}")),
        _ => node_text(one, t).to_string(),
    }
}

/// A reference's target as a NodeId of this server.
fn local_id(one: &OneShot, id: &opcua::types::ExpandedNodeId) -> Option<NodeId> {
    if id.namespace_uri.is_null() || id.namespace_uri.as_ref().is_empty() {
        return Some(id.node_id.clone());
    }
    let ns = one.namespaces().get_index(id.namespace_uri.as_ref())?;
    Some(NodeId {
        namespace: ns,
        identifier: id.node_id.identifier.clone(),
    })
}

/// A NodeId in the form a tag's `node` is written: `nsu=` (the namespace
/// URI, stable across server restarts) except namespace 0.
fn node_text(one: &OneShot, id: &NodeId) -> NodeRef {
    let uris: HashMap<u16, &String> = one
        .namespaces()
        .known_namespaces()
        .iter()
        .map(|(u, i)| (*i, u))
        .collect();
    to_node_ref(id, |ns| uris.get(&ns).map(|u| u.to_string()))
}

fn to_node_ref(id: &NodeId, uri: impl Fn(u16) -> Option<String>) -> NodeRef {
    let namespace = match (id.namespace, uri(id.namespace)) {
        (0, _) => Namespace::Index(0),
        (_, Some(u)) => Namespace::Uri(u),
        (i, None) => Namespace::Index(i),
    };
    let identifier = match &id.identifier {
        UaIdentifier::Numeric(n) => Identifier::Numeric(*n),
        UaIdentifier::String(s) => Identifier::String(s.as_ref().to_string()),
        UaIdentifier::Guid(g) => Identifier::Guid(g.to_string()),
        UaIdentifier::ByteString(b) => Identifier::Opaque(b.as_base64()),
    };
    NodeRef {
        namespace,
        identifier,
    }
}

/// The start node: `--from` (resolved against this server's namespaces) or
/// the Objects folder.
pub fn start(one: &OneShot, from: Option<&str>) -> Result<NodeId, BrowseError> {
    let Some(text) = from else {
        return Ok(opcua::types::ObjectId::ObjectsFolder.into());
    };
    let node = NodeRef::parse(text).map_err(|e| BrowseError::From(text.into(), e.to_string()))?;
    one.resolve(&node).map_err(|status| {
        BrowseError::From(
            text.into(),
            format!("{status}: the server has no such namespace"),
        )
    })
}

/// One line per node: indented by depth, then the NodeId, browse name,
/// node class, data type and access level (`r`, `w`, `rw`, `-`).
pub fn line(f: &Found) -> String {
    let indent = "  ".repeat(f.path.len().saturating_sub(1));
    let name = f.path.last().map_or("", String::as_str);
    let mut out = format!("{indent}{}  {name}  {}", f.node, f.class);
    if f.class == "Variable" {
        let access = match f.access {
            Some(a) => match (a & CURRENT_READ != 0, a & CURRENT_WRITE != 0) {
                (true, true) => "rw",
                (true, false) => "r",
                (false, true) => "w",
                (false, false) => "-",
            },
            None => "?",
        };
        out.push_str(&format!(
            "  {}  {access}",
            f.data_type.as_deref().unwrap_or("?")
        ));
    }
    out
}

/// `[[connections.tags]]` blocks for the readable variables: names from
/// the browse paths (joined by `.`), made unique with `~2`, `~3`, ...
pub fn tags_toml(found: &[Found]) -> String {
    let mut used: HashSet<String> = HashSet::new();
    let mut out = String::new();
    for f in found.iter().filter(|f| f.readable()) {
        let base = f.path.join(".");
        let mut name = base.clone();
        let mut n = 2;
        while !used.insert(name.clone()) {
            name = format!("{base}~{n}");
            n += 1;
        }
        out.push_str(&format!(
            "[[connections.tags]]\nname = {}\nnode = {}\n\n",
            crate::config::toml_string(&name),
            crate::config::toml_string(&f.node.to_string())
        ));
    }
    out
}

#[cfg(test)]
mod tests;
