//! A connection's tag table: every node it monitors (configured tags, then
//! the profile's nodes, then tags a reload added), in one order that is the
//! tag index everywhere (the OPC UA client handle is index + 1,
//! subscription `i / 2 000` holds tag `i`).
//!
//! A reload that changes only the tag list ([`TagTable::retag`]) retires
//! the removed or changed tags and appends the new ones: an index is never
//! reused within a connection task, so a late notification for a retired
//! tag's client handle is recognised and ignored, never taken for another
//! tag (docs/cli.md, reload).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use opcua::types::{NamespaceMap, NodeId, StatusCode};
use tokio::sync::{mpsc, watch};

use super::bad_tags::BadTags;
use super::feed::FeedTx;
use super::session::{self, Lookup, LoopEvent, Notices, Notifier, SharedLookup, TagPlan};
use super::value::TagIndex;
use crate::config::ConnectionConfig;
use crate::profile::{NodeKey, Profile};

/// A reload's new configuration for a running connection: only its tag
/// list may differ (anything else restarts the connection).
pub type ConfigUpdates = watch::Receiver<ConnectionConfig>;

pub(super) struct TagTable {
    pub plans: Vec<TagPlan>,
    /// Tags removed or replaced by a reload; their indexes stay taken.
    retired: HashSet<TagIndex>,
    lookup: SharedLookup,
    updates: ConfigUpdates,
    /// The sender dropped: no more updates will come.
    updates_closed: bool,
}

/// What a new tag list changed, by tag index.
#[derive(Debug, Default, PartialEq)]
pub(super) struct Retag {
    pub added: Vec<TagIndex>,
    pub retired: Vec<TagIndex>,
}

impl Retag {
    pub(super) fn is_empty(&self) -> bool {
        self.added.is_empty() && self.retired.is_empty()
    }
}

impl TagTable {
    /// The table for the configuration `updates` holds now.
    pub(super) fn new(updates: ConfigUpdates, profile: Option<&Profile>) -> TagTable {
        let mut updates = updates;
        let conn = updates.borrow_and_update().clone();
        let mut plans = session::plan_tags(&conn);
        if let Some(p) = profile {
            plans.extend(session::plan_profile_nodes(&conn, &p.nodes()));
        }
        let table = TagTable {
            plans,
            retired: HashSet::new(),
            lookup: Arc::default(),
            updates,
            updates_closed: false,
        };
        table.publish_lookup();
        table
    }

    /// The indexes of the tags in force.
    fn live(&self) -> impl Iterator<Item = TagIndex> + '_ {
        (0..self.plans.len())
            .map(TagIndex::new)
            .filter(|i| !self.retired.contains(i))
    }

    /// How many tags are monitored (retired ones not counted).
    pub(super) fn len(&self) -> usize {
        self.plans.len() - self.retired.len()
    }

    /// Whether any tag is a profile node.
    pub(super) fn has_profile(&self) -> bool {
        self.plans.iter().any(|p| p.profile.is_some())
    }

    /// Splits the tags into resolvable (with their NodeId) and bad (with
    /// status). Unparseable node ids are bad for good; unknown namespaces
    /// are retried.
    pub(super) fn resolve(&self, namespaces: &NamespaceMap) -> (Vec<(TagIndex, NodeId)>, BadTags) {
        self.resolve_indexes(self.live().collect(), namespaces)
    }

    /// [`TagTable::resolve`] for the tags of `bad` only.
    pub(super) fn resolve_some(
        &self,
        bad: &[(TagIndex, StatusCode)],
        namespaces: &NamespaceMap,
    ) -> (Vec<(TagIndex, NodeId)>, BadTags) {
        self.resolve_indexes(bad.iter().map(|(i, _)| *i).collect(), namespaces)
    }

    /// [`TagTable::resolve`] for `indexes` (retired ones left out).
    pub(super) fn resolve_indexes(
        &self,
        indexes: Vec<TagIndex>,
        namespaces: &NamespaceMap,
    ) -> (Vec<(TagIndex, NodeId)>, BadTags) {
        let mut ok = Vec::with_capacity(indexes.len());
        let mut bad = Vec::new();
        for i in indexes {
            if self.retired.contains(&i) {
                continue;
            }
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
        name_values: bool,
    ) -> Notifier {
        Notifier {
            connection: Arc::from(connection),
            tags: self.lookup.clone(),
            records: records.clone(),
            events,
            notices: notices.clone(),
            name_values,
        }
    }

    /// Waits for a reload's new tag list (forever once no more can come).
    pub(super) async fn updated(&mut self) -> ConnectionConfig {
        if !self.updates_closed && self.updates.changed().await.is_ok() {
            return self.updates.borrow_and_update().clone();
        }
        self.updates_closed = true;
        std::future::pending().await
    }

    /// A new tag list that arrived while no session was up, if any.
    pub(super) fn pending_update(&mut self) -> Option<ConnectionConfig> {
        match self.updates.has_changed() {
            Ok(true) => Some(self.updates.borrow_and_update().clone()),
            _ => None,
        }
    }

    /// Takes `conn`'s tag list: tags removed, or changed (node, sampling
    /// interval, deadband), are retired; new and changed ones appended. The
    /// callbacks see the change at once; the caller changes the monitored
    /// items.
    pub(super) fn retag(&mut self, conn: &ConnectionConfig) -> Retag {
        let mut current: HashMap<String, TagIndex> = self
            .live()
            .filter(|i| self.plans[i.get()].profile.is_none())
            .map(|i| (self.plans[i.get()].meta.name.clone(), i))
            .collect();
        let mut out = Retag::default();
        for plan in session::plan_tags(conn) {
            match current.remove(&plan.meta.name) {
                Some(i) if same_tag(&self.plans[i.get()], &plan) => {}
                was => {
                    out.retired.extend(was);
                    out.added.push(TagIndex::new(self.plans.len()));
                    self.plans.push(plan);
                }
            }
        }
        out.retired.extend(current.into_values());
        out.retired.sort();
        self.retired.extend(out.retired.iter().copied());
        if !out.is_empty() {
            self.publish_lookup();
        }
        out
    }

    fn publish_lookup(&self) {
        let lookup = Lookup {
            metas: (0..self.plans.len())
                .map(|i| {
                    let i = TagIndex::new(i);
                    (!self.retired.contains(&i)).then(|| self.plans[i.get()].meta.clone())
                })
                .collect(),
            profile: self.plans.iter().map(|p| p.profile).collect(),
        };
        *self.lookup.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(lookup);
    }
}

/// Whether two plans of the same tag name monitor the same way.
fn same_tag(a: &TagPlan, b: &TagPlan) -> bool {
    a.meta.node == b.meta.node && a.sampling == b.sampling && a.deadband == b.deadband
}
