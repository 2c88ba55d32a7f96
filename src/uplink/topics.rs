//! MQTT topic names, and how large a payload may be on each (the configured
//! `mqtt.max_message_bytes` and the broker's Maximum Packet Size;
//! docs/mqtt.md, docs/guarantees.md#message-size). Pure: no I/O.

use crate::record::Kind;

/// `{topic_prefix}/{site}/{agent}` and everything below it.
#[derive(Clone, Debug)]
pub struct Topics {
    root: String,
}

impl Topics {
    pub fn new(prefix: &str, site: &str, agent: &str) -> Self {
        Topics {
            root: format!("{prefix}/{site}/{agent}"),
        }
    }

    pub fn root(&self) -> &str {
        &self.root
    }

    pub fn status(&self) -> String {
        format!("{}/status", self.root)
    }

    /// Where `plantgate check --connect` publishes its one test message.
    pub fn check(&self) -> String {
        format!("{}/check", self.root)
    }

    pub fn heartbeat(&self) -> String {
        format!("{}/heartbeat", self.root)
    }

    pub fn connection_status(&self, connection: &str) -> String {
        format!("{}/connections/{connection}/status", self.root)
    }

    pub fn event(&self, event_type: &str) -> String {
        format!("{}/events/{event_type}", self.root)
    }

    pub fn data(&self, connection: &str, kind: Kind) -> String {
        format!("{}/data/{connection}/{}", self.root, kind.as_str())
    }

    /// The one topic the agent subscribes to (docs/mqtt.md, replay).
    pub fn replay_commands(&self) -> String {
        format!("{}/commands/replay", self.root)
    }

    /// Where replay results go when the request named no response topic.
    pub fn replay_results(&self) -> String {
        format!("{}/commands/replay/result", self.root)
    }
}

/// Bytes a QoS 1 PUBLISH packet adds around its payload besides the topic
/// itself: fixed header (1), remaining length (at most 4), topic length (2),
/// packet id (2) and, in MQTT 5, the property length (1: we send no
/// properties).
pub const PUBLISH_HEADER_BYTES: usize = 10;

/// The smallest payload limit the uplink works with: every control message
/// and every dead-letter announcement fits in it. The same floor as
/// `mqtt.max_message_bytes` in the config; a broker whose Maximum Packet Size
/// leaves less is unusable (docs/guarantees.md: better a clear error than items
/// dead-lettered or refused one after another).
pub const MIN_PAYLOAD_BYTES: usize = 1024;

/// The largest payload one message may carry (docs/mqtt.md, docs/guarantees.md): the configured
/// `max_message_bytes`, and when the broker announced a Maximum Packet Size
/// (MQTT 5 CONNACK), what that leaves after the PUBLISH header and topic.
/// The broker closes the connection on a larger packet, so a message over it
/// must never be sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PayloadLimit {
    pub max_message_bytes: usize,
    pub broker_max_packet: Option<u32>,
}

impl PayloadLimit {
    pub fn new(max_message_bytes: usize, broker_max_packet: Option<u32>) -> Self {
        PayloadLimit {
            max_message_bytes,
            broker_max_packet,
        }
    }

    /// What the broker's limit leaves for a payload on `topic`.
    fn broker_room(&self, topic: &str) -> Option<usize> {
        self.broker_max_packet.map(|p| {
            usize::try_from(p)
                .unwrap_or(usize::MAX)
                .saturating_sub(topic.len() + PUBLISH_HEADER_BYTES)
        })
    }

    /// The largest payload allowed on `topic`.
    pub fn for_topic(&self, topic: &str) -> usize {
        match self.broker_room(topic) {
            Some(room) => room.min(self.max_message_bytes),
            None => self.max_message_bytes,
        }
    }

    /// Why a payload of `size` bytes cannot go out on `topic`, naming every
    /// limit it exceeds; None when it fits.
    pub fn exceeded(&self, topic: &str, size: usize) -> Option<String> {
        if size <= self.for_topic(topic) {
            return None;
        }
        let mut why = Vec::new();
        if size > self.max_message_bytes {
            why.push(format!(
                "mqtt.max_message_bytes ({})",
                self.max_message_bytes
            ));
        }
        if let (Some(packet), Some(room)) = (self.broker_max_packet, self.broker_room(topic)) {
            if size > room {
                why.push(format!(
                    "the broker's Maximum Packet Size ({packet} bytes, {room} for a payload on this topic)"
                ));
            }
        }
        Some(format!("{size} bytes exceed {}", why.join(" and ")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_follow_the_spec() {
        let t = Topics::new("plantgate", "plant1", "gw1");
        assert_eq!(t.status(), "plantgate/plant1/gw1/status");
        assert_eq!(t.heartbeat(), "plantgate/plant1/gw1/heartbeat");
        assert_eq!(
            t.connection_status("deltav-line1"),
            "plantgate/plant1/gw1/connections/deltav-line1/status"
        );
        assert_eq!(
            t.event("buffer.evicted"),
            "plantgate/plant1/gw1/events/buffer.evicted"
        );
        assert_eq!(
            t.data("deltav-line1", Kind::Batch),
            "plantgate/plant1/gw1/data/deltav-line1/batch"
        );
    }

    #[test]
    fn payload_limit_without_broker_is_the_config() {
        let l = PayloadLimit::new(131_072, None);
        assert_eq!(l.for_topic("plantgate/s/a/data/c/tag"), 131_072);
        assert_eq!(l.exceeded("t", 131_072), None);
        let why = l.exceeded("t", 131_073).unwrap();
        assert!(why.contains("mqtt.max_message_bytes (131072)"), "{why}");
        assert!(!why.contains("broker"), "{why}");
    }

    /// The limit is checked against rumqttc's own packet size computation,
    /// the one its encoder compares with the broker's maximum.
    #[test]
    fn payload_limit_keeps_whole_packets_within_the_broker_maximum() {
        use rumqttc::v5::mqttbytes::v5::Publish as Publish5;
        use rumqttc::v5::mqttbytes::QoS as QoS5;
        for broker in [1_100u32, 20_000, 70_000, 3_000_000] {
            let l = PayloadLimit::new(usize::MAX / 2, Some(broker));
            for topic in [
                "plantgate/s/a/status".to_string(),
                format!("plantgate/site/agent/data/{}/tag", "c".repeat(300)),
            ] {
                let room = l.for_topic(&topic);
                let mut p5 =
                    Publish5::new(topic.clone(), QoS5::AtLeastOnce, vec![b'x'; room], None);
                p5.pkid = 1;
                let mut p4 = rumqttc::Publish::new(
                    topic.clone(),
                    rumqttc::QoS::AtLeastOnce,
                    vec![b'x'; room],
                );
                p4.pkid = 1;
                let broker = broker as usize;
                assert!(p5.size() <= broker, "v5 {broker} {topic}: {}", p5.size());
                assert!(p4.size() <= broker, "v4 {broker} {topic}: {}", p4.size());
                // Tight: at most the spare bytes of a shorter remaining length.
                assert!(p5.size() + 4 >= broker, "v5 {broker}: {}", p5.size());
                assert_eq!(l.exceeded(&topic, room), None);
                let why = l.exceeded(&topic, room + 1).unwrap();
                assert!(
                    why.contains(&format!("Maximum Packet Size ({broker} bytes, {room} for")),
                    "{why}"
                );
            }
        }
    }

    #[test]
    fn payload_limit_takes_the_smaller_and_names_what_binds() {
        let l = PayloadLimit::new(1024, Some(20_000));
        assert_eq!(l.for_topic("a/b"), 1024);
        let why = l.exceeded("a/b", 5000).unwrap();
        assert!(
            why.starts_with("5000 bytes exceed mqtt.max_message_bytes (1024)"),
            "{why}"
        );
        assert!(!why.contains("broker"), "{why}");
        let why = l.exceeded("a/b", 30_000).unwrap();
        assert!(
            why.contains("max_message_bytes") && why.contains("broker"),
            "{why}"
        );

        let l = PayloadLimit::new(131_072, Some(20_000));
        assert_eq!(l.for_topic("a/b"), 20_000 - 3 - PUBLISH_HEADER_BYTES);
        let why = l.exceeded("a/b", 25_000).unwrap();
        assert!(!why.contains("max_message_bytes"), "{why}");
        assert!(
            why.contains("the broker's Maximum Packet Size (20000 bytes"),
            "{why}"
        );
        // A broker limit below the header leaves nothing, without underflow.
        assert_eq!(PayloadLimit::new(1024, Some(5)).for_topic("a/b"), 0);
    }
}
