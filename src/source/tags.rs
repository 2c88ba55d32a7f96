//! A connection's tag table: every node it monitors (configured tags, then
//! the profile's nodes), in one order that is the tag index everywhere (the
//! OPC UA client handle is index + 1, subscription `i / 2 000` holds tag
//! `i`).

use std::collections::HashMap;
use std::sync::Arc;

use opcua::types::{NamespaceMap, NodeId, StatusCode};
use tokio::sync::mpsc;

use super::bad_tags::BadTags;
use super::feed::FeedTx;
use super::session::{self, LoopEvent, Notices, Notifier, TagPlan};
use super::value::{TagIndex, TagMeta};
use crate::config::ConnectionConfig;
use crate::profile::{NodeKey, Profile};

pub(super) struct TagTable {
    pub plans: Vec<TagPlan>,
    /// The plans' metadata, shared with the subscription callbacks.
    metas: Arc<Vec<Arc<TagMeta>>>,
    /// Per tag, the profile node it is, if any; shared with the callbacks.
    profile_keys: Arc<Vec<Option<NodeKey>>>,
}

impl TagTable {
    pub(super) fn new(conn: &ConnectionConfig, profile: Option<&Profile>) -> TagTable {
        let mut plans = session::plan_tags(conn);
        if let Some(p) = profile {
            plans.extend(session::plan_profile_nodes(conn, &p.nodes()));
        }
        TagTable {
            metas: Arc::new(plans.iter().map(|p| p.meta.clone()).collect()),
            profile_keys: Arc::new(plans.iter().map(|p| p.profile).collect()),
            plans,
        }
    }

    pub(super) fn len(&self) -> usize {
        self.plans.len()
    }

    /// Whether any tag is a profile node.
    pub(super) fn has_profile(&self) -> bool {
        self.profile_keys.iter().any(Option::is_some)
    }

    /// Splits the tags into resolvable (with their NodeId) and bad (with
    /// status). Unparseable node ids are bad for good; unknown namespaces
    /// are retried.
    pub(super) fn resolve(&self, namespaces: &NamespaceMap) -> (Vec<(TagIndex, NodeId)>, BadTags) {
        let all: Vec<TagIndex> = (0..self.plans.len()).map(TagIndex::new).collect();
        self.resolve_indexes(all, namespaces)
    }

    /// [`TagTable::resolve`] for the tags of `bad` only.
    pub(super) fn resolve_some(
        &self,
        bad: &[(TagIndex, StatusCode)],
        namespaces: &NamespaceMap,
    ) -> (Vec<(TagIndex, NodeId)>, BadTags) {
        self.resolve_indexes(bad.iter().map(|(i, _)| *i).collect(), namespaces)
    }

    fn resolve_indexes(
        &self,
        indexes: Vec<TagIndex>,
        namespaces: &NamespaceMap,
    ) -> (Vec<(TagIndex, NodeId)>, BadTags) {
        let mut ok = Vec::with_capacity(indexes.len());
        let mut bad = Vec::new();
        for i in indexes {
            match &self.plans[i.get()].node {
                None => bad.push((i, StatusCode::BadNodeIdInvalid)),
                Some(node) => match session::resolve(node, namespaces) {
                    Ok(id) => ok.push((i, id)),
                    Err(status) => bad.push((i, status)),
                },
            }
        }
        (ok, bad)
    }

    /// The profile's nodes among `resolved`, for its reads.
    pub(super) fn profile_nodes(
        &self,
        resolved: &[(TagIndex, NodeId)],
    ) -> HashMap<NodeKey, NodeId> {
        resolved
            .iter()
            .filter_map(|(i, id)| self.plans[i.get()].profile.map(|k| (k, id.clone())))
            .collect()
    }

    /// The subscription callback for these tags.
    pub(super) fn notifier(
        &self,
        connection: &str,
        records: &FeedTx,
        events: mpsc::UnboundedSender<LoopEvent>,
        notices: &Arc<Notices>,
    ) -> Notifier {
        Notifier {
            connection: Arc::from(connection),
            tags: self.metas.clone(),
            profile: self.profile_keys.clone(),
            records: records.clone(),
            events,
            notices: notices.clone(),
        }
    }
}
