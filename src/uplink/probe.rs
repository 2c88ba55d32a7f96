//! The MQTT half of `plantgate check --connect`: the broker reached with
//! the uplink's own session options (`mqtt::Session`), the TLS handshake,
//! the authentication, and one QoS 1 publish to `{root}/check`
//! acknowledged. Each failure on its own line, with its fix.

use std::time::Duration;

use super::mqtt::{MqttEvent, Session, SessionError, SessionOptions};
use super::topics::Topics;
use crate::config::Config;
use crate::probe::Check;

/// How long the broker has to answer CONNECT, then the PUBLISH.
const ANSWER: Duration = Duration::from_secs(15);

pub async fn broker(config: &Config) -> Vec<Check> {
    let m = &config.mqtt;
    let what = |step: &str| format!("mqtt: {step}");
    let at = format!("{}:{}", m.host, m.port);
    let tls = if m.tls {
        match super::tls::client_config(
            m.ca_file.as_deref(),
            m.client_cert_file.as_deref(),
            m.client_key_file.as_deref(),
        ) {
            Ok(t) => Some(t),
            Err(e) => return vec![Check::fail(what("TLS files"), e.to_string())],
        }
    } else {
        None
    };
    let options = SessionOptions::for_command(config, "check", tls);
    let mut session = Session::start(&options);
    let mut out = Vec::new();
    let first = tokio::time::timeout(ANSWER, session.next()).await;
    let who = match &m.username {
        Some(user) => format!("user {user}"),
        None => "anonymous".to_string(),
    };
    match first {
        Ok(Ok(MqttEvent::Connected { .. })) => {
            out.push(Check::ok(what("broker"), format!("{at} answers")));
            if m.tls {
                out.push(Check::ok(
                    what("TLS handshake"),
                    "server certificate verified",
                ));
            }
            out.push(Check::ok(what("authentication"), format!("{who} accepted")));
        }
        Ok(Err(SessionError::Refused(code))) => {
            out.push(Check::ok(what("broker"), format!("{at} answers")));
            if m.tls {
                out.push(Check::ok(
                    what("TLS handshake"),
                    "server certificate verified",
                ));
            }
            out.push(Check::fail(
                what("authentication"),
                format!("{who} refused ({code}): check mqtt.username and its password, and the broker's ACL"),
            ));
            return out;
        }
        Ok(Err(e)) => {
            out.extend(connection_failed(&at, m.tls, &e.to_string()));
            return out;
        }
        Ok(Ok(other)) => {
            out.push(Check::fail(
                what("broker"),
                format!("{at} answered CONNECT with {other:?}, not a CONNACK"),
            ));
            return out;
        }
        Err(_) => {
            out.push(Check::fail(
                what("broker"),
                format!(
                    "{at} gave no answer within {}s: check mqtt.url and the firewall",
                    ANSWER.as_secs()
                ),
            ));
            return out;
        }
    }
    let topic = Topics::new(&m.topic_prefix, &config.agent.site, &config.agent.id).check();
    let body = serde_json::json!({
        "agent": config.agent.id,
        "ts": crate::record::format_ts(crate::record::now_ms()),
        "check": true,
    });
    out.push(publish(&mut session, &topic, body.to_string().into_bytes()).await);
    session.disconnect().await;
    out
}

/// A CONNECT that failed below MQTT: the TLS handshake or the network.
fn connection_failed(at: &str, tls: bool, error: &str) -> Vec<Check> {
    let what = |step: &str| format!("mqtt: {step}");
    let lower = error.to_lowercase();
    let handshake = ["tls", "certificate", "handshake", "alert", "close_notify"]
        .iter()
        .any(|w| lower.contains(w));
    if tls && handshake {
        return vec![
            Check::ok(what("broker"), format!("{at} answers")),
            Check::fail(
                what("TLS handshake"),
                format!(
                    "{error}: check mqtt.ca_file (the CA of the broker's certificate) and, when the broker requires one, client_cert_file and client_key_file"
                ),
            ),
        ];
    }
    vec![Check::fail(
        what("broker"),
        format!("{at} cannot be reached ({error}): check mqtt.url and the firewall"),
    )]
}

/// One QoS 1 publish, acknowledged.
async fn publish(session: &mut Session, topic: &str, body: Vec<u8>) -> Check {
    let what = "mqtt: publish".to_string();
    if let Err(e) = session.publish(topic.to_string(), false, false, body).await {
        return Check::fail(what, e.to_string());
    }
    let acked = tokio::time::timeout(ANSWER, async {
        loop {
            match session.next().await {
                Ok(MqttEvent::Acked { rejected, .. }) => return Ok(rejected),
                Ok(_) => {}
                Err(e) => return Err(e),
            }
        }
    })
    .await;
    match acked {
        Ok(Ok(None)) => Check::ok(what, format!("QoS 1 to {topic} acknowledged")),
        Ok(Ok(Some(reason))) => Check::fail(
            what,
            format!("the broker refused a QoS 1 publish to {topic} ({reason}): allow the agent to publish under its topic root (ACL)"),
        ),
        Ok(Err(e)) => Check::fail(what, format!("{e} while publishing to {topic}")),
        Err(_) => Check::fail(
            what,
            format!("no acknowledgement for a QoS 1 publish to {topic} within {}s", ANSWER.as_secs()),
        ),
    }
}
