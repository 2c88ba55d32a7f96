//! A session's Sparkplug B side (docs/sparkplug.md): the certificates and
//! node metrics that replace the JSON status, heartbeat and connection
//! status messages, and the commands of host applications. Records go
//! through [`super::wire`] like in the JSON format.
//!
//! Device life: a connection's DBIRTH goes out when it is online (or when
//! records of it are to be sent while it is not: its backlog), its DDEATH
//! once it is no longer online and nothing of it is left to send, so a
//! host application never sees data of a dead device.

use std::collections::HashSet;

use super::super::delivery::Message;
use super::super::mqtt::SessionError;
use super::Link;
use crate::record::{now_ms, EventType, NewRecord};
use crate::sparkplug::{Command, Draft, NodeStatus};
use crate::status::ConnState;

impl Link<'_> {
    /// The node metrics' values now.
    async fn node_status(&self) -> NodeStatus {
        let up = self.up;
        let (records, bytes, oldest_ts_ms) = match up.buffer.stats().await {
            Ok(st) => (st.records, st.bytes, st.oldest_ts_ms),
            Err(_) => (0, 0, None),
        };
        NodeStatus {
            ts_ms: now_ms(),
            version: up.settings.version.clone(),
            boot_id: up.settings.boot_id.clone(),
            uptime_s: up.started.elapsed().as_secs(),
            records,
            bytes,
            oldest_ts_ms,
            published_records_total: up.board.mqtt().published_records_total,
            connections: up
                .board
                .current_connections()
                .into_iter()
                .map(|(id, st)| (id, st.state.as_str().to_string()))
                .collect(),
        }
    }

    /// The session's start, and a rebirth: NBIRTH, then the DBIRTH of every
    /// device online (and, for a rebirth, every device born).
    pub(super) async fn sp_birth(&mut self, rebirth: bool) -> Result<(), SessionError> {
        let status = self.node_status().await;
        let now = now_ms();
        let mut drafts = Vec::new();
        if let Some(node) = self.node.as_deref_mut() {
            drafts.push(node.nbirth(&status));
            let born: HashSet<String> = node.born().into_iter().collect();
            for (id, st) in self.up.board.current_connections() {
                let due = st.state == ConnState::Online || (rebirth && born.contains(&id));
                if due && node.is_device(&id) {
                    drafts.extend(node.dbirth(&id, now));
                }
            }
            self.published_states = status_keys(&self.up.board.current_connections());
        }
        for d in drafts {
            self.publish_draft(d).await?;
        }
        Ok(())
    }

    /// A connection's state changed: a DBIRTH for one now online, and the
    /// node's status metrics (its `Status/connections/{id}`). Deaths wait
    /// for [`Self::sp_deaths`].
    pub(super) async fn sp_states(&mut self) -> Result<(), SessionError> {
        let conns = self.up.board.current_connections();
        let keys = status_keys(&conns);
        if keys == self.published_states {
            return Ok(());
        }
        let status = self.node_status().await;
        let now = now_ms();
        let mut drafts = Vec::new();
        if let Some(node) = self.node.as_deref_mut() {
            for (id, st) in &conns {
                if st.state == ConnState::Online && node.is_device(id) && !node.is_born(id) {
                    drafts.extend(node.dbirth(id, now));
                }
            }
            drafts.push(node.status(&status));
        }
        self.published_states = keys;
        for d in drafts {
            self.publish_draft(d).await?;
        }
        Ok(())
    }

    /// After a read of every stream: the DDEATH of each device born but no
    /// longer online, unless records of it were just read (`busy`).
    pub(super) async fn sp_deaths(&mut self, busy: &HashSet<String>) -> Result<(), SessionError> {
        let now = now_ms();
        let online: HashSet<String> = self
            .up
            .board
            .current_connections()
            .into_iter()
            .filter(|(_, st)| st.state == ConnState::Online)
            .map(|(id, _)| id)
            .collect();
        let mut drafts = Vec::new();
        if let Some(node) = self.node.as_deref_mut() {
            for id in node.born() {
                if !online.contains(&id) && !busy.contains(&id) {
                    drafts.extend(node.ddeath(&id, now));
                }
            }
        }
        for d in drafts {
            self.publish_draft(d).await?;
        }
        Ok(())
    }

    /// The Sparkplug heartbeat: NDATA with the status metrics.
    pub(super) async fn sp_heartbeat(&mut self) -> Result<(), SessionError> {
        let status = self.node_status().await;
        let draft = match self.node.as_deref() {
            Some(node) => node.status(&status),
            None => return Ok(()),
        };
        self.publish_draft(draft).await
    }

    /// A clean shutdown: DDEATH of every device born, then the NDEATH the
    /// Will would have sent (the broker discards the Will on DISCONNECT).
    pub(super) async fn sp_farewell(&mut self) {
        let now = now_ms();
        let mut drafts = Vec::new();
        let mut ndeath = None;
        if let Some(node) = self.node.as_deref_mut() {
            for id in node.born() {
                drafts.extend(node.ddeath(&id, now));
            }
            ndeath = Some(node.ndeath(node.bd_seq(), now));
        }
        for d in drafts {
            let _ = self.publish_draft(d).await;
        }
        if let Some((topic, body)) = ndeath {
            let _ = self.publish_control(topic, false, body, false).await;
        }
    }

    /// A message on the node's or a device's command topic.
    pub(super) async fn sp_command(
        &mut self,
        topic: &str,
        body: &[u8],
    ) -> Result<(), SessionError> {
        let Some(node) = self.node.as_deref() else {
            return Ok(());
        };
        match node.command(topic, body) {
            Command::Rebirth => {
                tracing::info!("a host application asked for a rebirth; sending every BIRTH again");
                self.up.board.sparkplug(|sp| sp.rebirths_total += 1);
                self.sp_birth(true).await
            }
            Command::Refused { what } => {
                self.up.board.sparkplug(|sp| sp.commands_refused_total += 1);
                if let Some(repeats) = self.quiet.check("sparkplug command refused") {
                    tracing::warn!(%topic, %what, repeats, "Sparkplug command refused: the agent never writes to the plant");
                    let ev = NewRecord::event(
                        "",
                        EventType::SystemError,
                        serde_json::json!({
                            "message": "a Sparkplug command was refused: the agent is read-only towards the plant \
                                        (only NCMD Node Control/Rebirth is served)",
                            "topic": topic,
                            "command": what,
                        }),
                    );
                    self.up.buffer.record_events(vec![ev]);
                }
                Ok(())
            }
        }
    }

    /// Numbers and publishes a certificate or node status message.
    pub(super) async fn publish_draft(&mut self, draft: Draft) -> Result<(), SessionError> {
        let Some(node) = self.node.as_deref_mut() else {
            return Ok(());
        };
        let sealed = node.seal(draft);
        self.publish_sealed(sealed).await
    }

    /// Publishes a numbered certificate or status message. One too large
    /// for the broker is not sent (the broker would drop the connection):
    /// counted and said, since a host application then lacks its metrics.
    pub(super) async fn publish_sealed(
        &mut self,
        (topic, body, qos0): (String, Vec<u8>, bool),
    ) -> Result<(), SessionError> {
        if let Some(why) = self.limit.exceeded(&topic, body.len()) {
            self.up.board.sparkplug(|sp| sp.births_not_sent_total += 1);
            if let Some(repeats) = self.quiet.check(&topic) {
                tracing::error!(%topic, %why, repeats, "Sparkplug certificate too large for one message; not sent (raise mqtt.max_message_bytes)");
                let ev = NewRecord::event(
                    "",
                    EventType::SystemError,
                    serde_json::json!({
                        "error": "sparkplug_birth_not_sent",
                        "message": "a Sparkplug certificate is too large for one message and was not sent; \
                                    host applications cannot resolve its metrics (raise mqtt.max_message_bytes)",
                        "topic": topic,
                        "reason": why,
                    }),
                );
                self.up.buffer.record_events(vec![ev]);
            }
            return Ok(());
        }
        self.session
            .publish(topic.clone(), qos0, false, body)
            .await?;
        self.delivery.submitted(Message::Control { topic });
        Ok(())
    }
}

/// Each connection's (state, reason): what a change is measured against.
fn status_keys(
    conns: &[(String, crate::status::ConnStatus)],
) -> std::collections::HashMap<String, (ConnState, String)> {
    conns
        .iter()
        .map(|(id, st)| (id.clone(), (st.state, st.reason.clone())))
        .collect()
}
