//! Tags that cannot be monitored (a node id that does not parse, a
//! namespace or node the server does not have, an item the server refused),
//! and what has been announced about them.

use std::collections::HashMap;
use std::time::Duration;

use opcua::types::StatusCode;

use super::reporter::ConnectionReporter;
use super::session::{Item, TagPlan};
use super::value::{self, TagIndex};

/// Tags that cannot be monitored now: (index into the plans, why), sorted
/// by index.
pub(super) type BadTags = Vec<(TagIndex, StatusCode)>;

/// What has been announced, across the sessions of one connection: one
/// `system.error` per tag that became bad (or bad with another status), so
/// an outage of a node is one event, not one per reconnect or retry.
#[derive(Default)]
pub(super) struct BadTagReports {
    reported: HashMap<TagIndex, StatusCode>,
}

impl BadTagReports {
    /// Announces tags newly bad in `bad` and forgets tags monitored again.
    pub(super) async fn report(
        &mut self,
        reporter: &ConnectionReporter,
        plans: &[TagPlan],
        bad: &[(TagIndex, StatusCode)],
        monitored: &HashMap<TagIndex, Item>,
        retry_every: Duration,
    ) {
        for (i, status) in bad {
            if self.reported.get(i) == Some(status) {
                continue;
            }
            self.reported.insert(*i, *status);
            let tag = &plans[i.get()].meta;
            let status = value::status_name(*status);
            tracing::warn!(connection = %reporter.id(), tag = %tag.name, node = %tag.node, %status, "tag unavailable");
            reporter
                .system_error(serde_json::json!({
                    "error": "tag_unavailable",
                    "tag": tag.name,
                    "node": tag.node,
                    "status": status,
                    "message": format!(
                        "tag {} (node {}) is unavailable: {status}; retried every {}s, the other tags are not affected",
                        tag.name, tag.node, retry_every.as_secs()
                    ),
                }))
                .await;
        }
        for i in monitored.keys() {
            if self.reported.remove(i).is_some() {
                let tag = &plans[i.get()].meta;
                tracing::info!(connection = %reporter.id(), tag = %tag.name, node = %tag.node, "tag available again");
            }
        }
    }
}

impl BadTagReports {
    /// Forgets tags a reload retired: nothing more is said about them.
    pub(super) fn forget(&mut self, retired: &[TagIndex]) {
        for i in retired {
            self.reported.remove(i);
        }
    }
}

/// Merges `more` into `bad`, keeping it sorted by tag index.
pub(super) fn merge(bad: &mut BadTags, more: impl IntoIterator<Item = (TagIndex, StatusCode)>) {
    bad.extend(more);
    bad.sort_by_key(|(i, _)| *i);
}
