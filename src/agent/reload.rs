//! Applying a reload to the running agent (SPEC 2, reload): the plan of
//! [`crate::reload`], carried out task by task. Untouched connections are
//! not disturbed; a refused reload changes nothing.
//!
//! Connections, their tag lists (in the running subscription), `[mqtt]`
//! (the uplink alone reconnects), buffer limits and `health.listen` apply
//! live.

use super::{ensure_own_certificate, start_connection, ConnTask, Running, SOURCE_STOP};
use crate::buffer::Limits;
use crate::config::Config;
use crate::record::now_ms;
use crate::reload::{plan, ConnChange};
use crate::status::{ConnState, ReloadOutcome};

impl Running {
    /// Applies `new` or refuses it; the configuration in force changes only
    /// when it is applied.
    pub(super) async fn reload(&mut self, new: Config) -> ReloadOutcome {
        // A certificate or key renewed under the same path counts as a
        // change of `[mqtt]`.
        let tls_files = crate::uplink::tls::files_fingerprint(&new.mqtt);
        let plan = match plan(&self.config, &new, tls_files != self.tls_files) {
            Ok(p) => p,
            Err(problems) => {
                return self.refused(problems.iter().map(ToString::to_string).collect())
            }
        };
        // A Sparkplug edge node declares its devices in its birth: other
        // devices take a new one, so the uplink is replaced too.
        let devices_changed = new.mqtt.format == crate::config::MqttFormat::SparkplugB
            && super::sparkplug_devices(&self.config.connections)
                != super::sparkplug_devices(&new.connections);
        // The new TLS settings are read before anything changes: a bad
        // certificate refuses the reload, the running uplink stays.
        let tls = if plan.mqtt || devices_changed {
            match super::mqtt_tls(&new) {
                Ok(tls) => Some(tls),
                Err(e) => return self.refused(vec![format!("mqtt: {e}")]),
            }
        } else {
            None
        };
        // The new address is bound before anything changes: one that is
        // taken refuses the reload, the running endpoint stays.
        let health = match plan.health_listen {
            Some(_) => {
                match super::start_health(&new, &self.board, &self.buffer, self.health.started)
                    .await
                {
                    Ok(h) => Some(h),
                    Err(e) => return self.refused(vec![format!("health.listen: {e}")]),
                }
            }
            None => None,
        };
        for change in &plan.connections {
            match change {
                ConnChange::Unchanged(_) => {}
                ConnChange::Added(c) => {
                    if self.connections.is_empty() {
                        ensure_own_certificate(&self.pki_dir, &new.agent.id).await;
                    }
                    tracing::info!(connection = %c.id, "reload: connection added");
                    self.start(c);
                }
                ConnChange::Removed(id) => {
                    tracing::info!(connection = %id, "reload: connection removed");
                    if let Some(task) = self.connections.remove(id) {
                        stop(task, "removed").await;
                    }
                    self.board.remove_connection(id);
                }
                ConnChange::Retagged { config: c, .. } => match self.connections.get(&c.id) {
                    // The running subscription changes its monitored items.
                    Some(task) => {
                        tracing::info!(connection = %c.id, "reload: tag list changed; the session stays");
                        task.config.send_replace(c.clone());
                    }
                    None => self.start(c),
                },
                ConnChange::Restarted(c) => {
                    tracing::info!(connection = %c.id, "reload: connection changed; restarting it alone");
                    if let Some(task) = self.connections.remove(&c.id) {
                        stop(task, "reloaded").await;
                    }
                    self.start(c);
                }
            }
        }
        if let Some(tls) = tls {
            if plan.mqtt {
                tracing::info!(
                    "reload: [mqtt] changed; the uplink reconnects with the new settings"
                );
            } else {
                tracing::info!(
                    "reload: the Sparkplug devices changed; the uplink reconnects for a new birth"
                );
            }
            self.tls_files = tls_files;
            let bg = &mut self.background;
            bg.uplink_now.replace();
            bg.uplink_cancel.cancel();
            let old = std::mem::replace(&mut bg.uplink, tokio::spawn(async {}));
            if tokio::time::timeout(super::UPLINK_STOP, old).await.is_err() {
                tracing::warn!("the uplink did not stop in time");
            }
            bg.uplink_cancel = bg.cancel.child_token();
            (bg.uplink, bg.uplink_now) =
                super::spawn_uplink(&new, tls, &self.buffer, &self.board, &bg.uplink_cancel);
        }
        if let Some(health) = health {
            tracing::info!(addr = %health.addr, "reload: health endpoint moved");
            self.health_moved.send_replace(health.addr);
            let old = std::mem::replace(&mut self.health, health);
            old.cancel.cancel();
            let _ = tokio::time::timeout(std::time::Duration::from_secs(1), old.task).await;
        }
        if plan.buffer_limits {
            self.board.set_buffer_budget(super::buffer_budget(&new));
            if let Err(e) = self
                .buffer
                .set_limits(Limits::from_config(&new.buffer))
                .await
            {
                tracing::error!(error = %e, "reload: the buffer did not take the new limits");
            }
        }
        let mut summary = plan.summary();
        if devices_changed && !plan.mqtt {
            summary.push_str("; the uplink reconnects (Sparkplug devices changed)");
        }
        tracing::info!(%summary, "configuration reloaded");
        self.config = new;
        ReloadOutcome {
            ts_ms: now_ms(),
            applied: true,
            summary,
            errors: Vec::new(),
        }
    }

    /// A refused reload: logged one line per problem, announced by a
    /// `system.error` event, nothing changed.
    pub(super) fn refused(&self, errors: Vec<String>) -> ReloadOutcome {
        for e in &errors {
            tracing::error!("reload refused: {e}");
        }
        let ev = crate::record::NewRecord::event(
            "",
            crate::record::EventType::SystemError,
            serde_json::json!({
                "error": "reload_refused",
                "message": "the new configuration was refused; the one in force stays",
                "problems": errors,
            }),
        );
        self.buffer.record_events(vec![ev]);
        ReloadOutcome {
            ts_ms: now_ms(),
            applied: false,
            summary: "refused; the configuration in force is unchanged".into(),
            errors,
        }
    }

    fn start(&mut self, c: &crate::config::ConnectionConfig) {
        let task = start_connection(
            c,
            &self.pki_dir,
            &self.buffer,
            &self.board,
            &self.sources_cancel,
        );
        self.connections.insert(c.id.clone(), task);
    }
}

/// Stops one connection alone; its records already accepted stay in the
/// buffer and are delivered. `why` is its offline reason.
async fn stop(task: ConnTask, why: &str) {
    task.cancel.cancel();
    if tokio::time::timeout(SOURCE_STOP, task.join).await.is_err() {
        tracing::warn!(connection = %task.config.borrow().id, "a connection did not stop in time");
    }
    task.reporter.set_state(ConnState::Offline, why).await;
}
