//! `plantgate replay`: asks the running agent for a range again, through
//! the broker, exactly as a cloud consumer would (docs/mqtt.md, replay),
//! and waits for its answer. The agent does the work; this side only
//! publishes the request and reads the result.

use std::time::Duration;

use serde_json::{json, Value};

use crate::config::Config;
use crate::record::Kind;
use crate::uplink::mqtt::{MqttEvent, Session, SessionError, SessionOptions};
use crate::uplink::topics::Topics;

/// What to ask for.
#[derive(Clone, Debug)]
pub struct Ask {
    /// None: the agent's own events.
    pub connection: Option<String>,
    pub kind: Kind,
    pub from_seq: u64,
    pub to_seq: u64,
    pub epoch: String,
    /// How long to wait for the result.
    pub timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum AskError {
    #[error("mqtt: {0}")]
    Mqtt(#[from] SessionError),
    #[error("TLS setup: {0}")]
    Tls(#[from] crate::uplink::tls::TlsError),
    #[error("the broker refused the subscription to {topic}: {why}")]
    NotSubscribed { topic: String, why: String },
    #[error("no result within {0:?} (is the agent running and connected?)")]
    Timeout(Duration),
}

/// Sends the request and returns the agent's result (its JSON).
pub async fn ask(config: &Config, ask: &Ask) -> Result<Value, AskError> {
    let m = &config.mqtt;
    let tls = match m.tls {
        true => Some(crate::uplink::tls::client_config(
            m.ca_file.as_deref(),
            m.client_cert_file.as_deref(),
            m.client_key_file.as_deref(),
        )?),
        false => None,
    };
    let topics = Topics::new(&m.topic_prefix, &config.agent.site, &config.agent.id);
    let request_id = format!("cli-{}", uuid::Uuid::new_v4().simple());
    let options = SessionOptions::for_command(config, "replay", tls);
    let body = json!({
        "request_id": request_id,
        "connection": ask.connection,
        "kind": ask.kind.as_str(),
        "epoch": ask.epoch,
        "from_seq": ask.from_seq,
        "to_seq": ask.to_seq,
    });
    let result_topic = topics.replay_results();
    let exchange = async {
        let mut session = Session::start(&options);
        match session.next().await? {
            MqttEvent::Connected { .. } => {}
            other => {
                return Err(AskError::Mqtt(SessionError::Connection(format!(
                    "unexpected first event {other:?}"
                ))))
            }
        }
        session.subscribe(vec![result_topic.clone()]).await?;
        loop {
            if let MqttEvent::Subscribed { refused } = session.next().await? {
                if let Some(why) = refused {
                    return Err(AskError::NotSubscribed {
                        topic: result_topic.clone(),
                        why,
                    });
                }
                break;
            }
        }
        session
            .publish(
                topics.replay_commands(),
                false,
                false,
                body.to_string().into_bytes(),
            )
            .await?;
        loop {
            if let MqttEvent::Command { topic, payload, .. } = session.next().await? {
                let Ok(v) = serde_json::from_slice::<Value>(&payload) else {
                    continue;
                };
                if topic == result_topic && v["request_id"] == request_id.as_str() {
                    session.disconnect().await;
                    return Ok(v);
                }
            }
        }
    };
    tokio::time::timeout(ask.timeout, exchange)
        .await
        .map_err(|_| AskError::Timeout(ask.timeout))?
}
