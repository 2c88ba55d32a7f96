//! What a reload changes (`systemctl reload plantgate`, SIGHUP; SPEC 2):
//! the difference between the configuration in force and a new one, already
//! validated, as a plan the agent applies. Pure, so every case is
//! unit-tested without a plant or a broker.
//!
//! - A connection added is started, one removed stopped, one changed
//!   restarted alone; one whose only change is its tag list keeps its
//!   session and changes its monitored items ([`ConnChange::Retagged`]).
//!   Untouched connections are not disturbed at all.
//! - `[mqtt]` changes make the uplink reconnect with the new settings (a
//!   rotated password or renewed certificate included: the caller tells
//!   whether the files behind the TLS settings changed); `[buffer]` limits
//!   change in place; `health.listen` rebinds.
//! - What cannot change in a running agent is refused with the key path,
//!   like any configuration error, and nothing is applied: the agent's id
//!   and site (its MQTT client id and topics), its data directory (where
//!   its buffer lives) and the buffer's `synchronous` mode.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;

use crate::config::{Config, ConnectionConfig, Problem};

/// One connection's part in a reload.
#[derive(Debug, Clone, PartialEq)]
pub enum ConnChange {
    Added(ConnectionConfig),
    Removed(String),
    /// Anything but the tag list changed (endpoint, security, identity,
    /// intervals, profile, events): stopped and started again, alone.
    Restarted(ConnectionConfig),
    /// Only tags changed: by name, those added, removed, or changed (node,
    /// sampling interval, deadband).
    Retagged {
        config: ConnectionConfig,
        added: Vec<String>,
        removed: Vec<String>,
        changed: Vec<String>,
    },
    Unchanged(String),
}

impl ConnChange {
    pub fn id(&self) -> &str {
        match self {
            ConnChange::Added(c) | ConnChange::Restarted(c) => &c.id,
            ConnChange::Retagged { config, .. } => &config.id,
            ConnChange::Removed(id) | ConnChange::Unchanged(id) => id,
        }
    }
}

/// What a reload does.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// In the new configuration's order, then the removed ones.
    pub connections: Vec<ConnChange>,
    /// The uplink reconnects with the new `[mqtt]` settings.
    pub mqtt: bool,
    /// The buffer's limits change in place.
    pub buffer_limits: bool,
    /// The health endpoint moves to this address.
    pub health_listen: Option<SocketAddr>,
}

impl Plan {
    /// Whether the reload changes anything at all.
    pub fn is_empty(&self) -> bool {
        !self.mqtt
            && !self.buffer_limits
            && self.health_listen.is_none()
            && self
                .connections
                .iter()
                .all(|c| matches!(c, ConnChange::Unchanged(_)))
    }

    /// One line for the log and `/status`: what changed.
    pub fn summary(&self) -> String {
        let mut parts = Vec::new();
        for c in &self.connections {
            match c {
                ConnChange::Added(c) => parts.push(format!("connection {} added", c.id)),
                ConnChange::Removed(id) => parts.push(format!("connection {id} removed")),
                ConnChange::Restarted(c) => parts.push(format!("connection {} restarted", c.id)),
                ConnChange::Retagged {
                    config,
                    added,
                    removed,
                    changed,
                } => parts.push(format!(
                    "connection {}: tags +{} -{} ~{}",
                    config.id,
                    added.len(),
                    removed.len(),
                    changed.len()
                )),
                ConnChange::Unchanged(_) => {}
            }
        }
        if self.mqtt {
            parts.push("mqtt reconnects".into());
        }
        if self.buffer_limits {
            parts.push("buffer limits changed".into());
        }
        if let Some(addr) = self.health_listen {
            parts.push(format!("health endpoint moves to {addr}"));
        }
        if parts.is_empty() {
            "nothing changed".into()
        } else {
            parts.join("; ")
        }
    }
}

/// The plan from `old` to `new` (both valid). `tls_files_changed`: whether
/// the contents of the MQTT CA, client certificate or key files changed
/// since they were last read (a renewed certificate under the same path).
pub fn plan(old: &Config, new: &Config, tls_files_changed: bool) -> Result<Plan, Vec<Problem>> {
    let mut problems = Vec::new();
    let mut fixed = |path: &str, was: String, now: String| {
        if was != now {
            problems.push(Problem {
                path: path.to_string(),
                message: format!(
                    "changed from {was} to {now}; this takes a restart \
                     (systemctl restart plantgate), not a reload"
                ),
            });
        }
    };
    fixed("agent.id", quoted(&old.agent.id), quoted(&new.agent.id));
    fixed(
        "agent.site",
        quoted(&old.agent.site),
        quoted(&new.agent.site),
    );
    fixed(
        "agent.data_dir",
        quoted(&old.agent.data_dir.display().to_string()),
        quoted(&new.agent.data_dir.display().to_string()),
    );
    fixed(
        "buffer.synchronous",
        format!("{:?}", old.buffer.synchronous).to_lowercase(),
        format!("{:?}", new.buffer.synchronous).to_lowercase(),
    );
    if !problems.is_empty() {
        return Err(problems);
    }
    Ok(Plan {
        connections: connections(&old.connections, &new.connections),
        mqtt: old.mqtt != new.mqtt || tls_files_changed,
        buffer_limits: old.buffer != new.buffer,
        health_listen: (old.health.listen != new.health.listen).then_some(new.health.listen),
    })
}

fn quoted(s: &str) -> String {
    format!("{s:?}")
}

fn connections(old: &[ConnectionConfig], new: &[ConnectionConfig]) -> Vec<ConnChange> {
    let before: HashMap<&str, &ConnectionConfig> = old.iter().map(|c| (c.id.as_str(), c)).collect();
    let mut out: Vec<ConnChange> = new
        .iter()
        .map(|c| match before.get(c.id.as_str()) {
            None => ConnChange::Added(c.clone()),
            Some(was) if *was == c => ConnChange::Unchanged(c.id.clone()),
            Some(was) => change(was, c),
        })
        .collect();
    let kept: HashSet<&str> = new.iter().map(|c| c.id.as_str()).collect();
    out.extend(
        old.iter()
            .filter(|c| !kept.contains(c.id.as_str()))
            .map(|c| ConnChange::Removed(c.id.clone())),
    );
    out
}

/// A connection that differs: retagged if the tag list is all that
/// changed, else restarted.
fn change(was: &ConnectionConfig, now: &ConnectionConfig) -> ConnChange {
    let mut same_but_tags = was.clone();
    same_but_tags.tags = now.tags.clone();
    if same_but_tags != *now {
        return ConnChange::Restarted(now.clone());
    }
    let before: HashMap<&str, _> = was.tags.iter().map(|t| (t.name.as_str(), t)).collect();
    let after: HashMap<&str, _> = now.tags.iter().map(|t| (t.name.as_str(), t)).collect();
    let names = |tags: &[crate::config::TagConfig], pick: &dyn Fn(&str) -> bool| {
        tags.iter()
            .map(|t| t.name.clone())
            .filter(|n| pick(n))
            .collect::<Vec<_>>()
    };
    ConnChange::Retagged {
        config: now.clone(),
        added: names(&now.tags, &|n| !before.contains_key(n)),
        removed: names(&was.tags, &|n| !after.contains_key(n)),
        changed: names(&now.tags, &|n| {
            before.get(n).is_some_and(|b| Some(b) != after.get(n))
        }),
    }
}

#[cfg(test)]
mod tests;
