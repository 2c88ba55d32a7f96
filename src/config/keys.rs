//! The keys users write, per section (docs/configuration.md), and for a
//! `[[connections]]` entry per kind. Read by the loader (unknown keys, keys of
//! another kind) and by `plantgate check` (which keys print, and in which
//! order), so a key is named once here and once in the model.

use super::model::ConnectionKind;

/// Top-level sections.
pub(super) const TOP_KEYS: &[&str] = &["agent", "health", "mqtt", "buffer", "connections"];
pub(super) const AGENT_KEYS: &[&str] = &["id", "site", "data_dir"];
pub(super) const HEALTH_KEYS: &[&str] = &["listen"];
pub(super) const MQTT_KEYS: &[&str] = &[
    "url",
    "allow_plaintext",
    "ca_file",
    "client_cert_file",
    "client_key_file",
    "username",
    "password",
    "password_env",
    "password_file",
    "password_credential",
    "protocol",
    "topic_prefix",
    "keep_alive",
    "heartbeat_interval",
    "max_message_bytes",
    "reconnect_initial",
    "reconnect_max",
    "replay_max_records",
    "format",
];
pub(super) const BUFFER_KEYS: &[&str] = &[
    "max_size",
    "max_age",
    "synchronous",
    "headroom_warning",
    "retain_delivered",
];
pub(super) const UNIT_KEYS: &[&str] = &["name", "recipe_parameters"];
pub(super) const WORK_CENTER_KEYS: &[&str] = &["name"];
pub(super) const TAG_KEYS: &[&str] = &["name", "node", "sampling_interval", "deadband"];

/// One key of a connection and the kinds that accept it.
pub(super) struct ConnectionKey {
    pub name: &'static str,
    pub kinds: &'static [ConnectionKind],
}

const ANY: &[ConnectionKind] = &ConnectionKind::ALL;
const DELTAV: &[ConnectionKind] = &[ConnectionKind::Deltav];
const OPTOMES: &[ConnectionKind] = &[ConnectionKind::Optomes];
const PROFILES: &[ConnectionKind] = &[ConnectionKind::Deltav, ConnectionKind::Optomes];

const fn key(name: &'static str, kinds: &'static [ConnectionKind]) -> ConnectionKey {
    ConnectionKey { name, kinds }
}

/// In the order of the reference table in docs/configuration.md, which is
/// also the order `plantgate check` prints them in.
pub(super) const CONNECTION_KEYS: &[ConnectionKey] = &[
    key("id", ANY),
    key("kind", ANY),
    key("endpoint", ANY),
    key("security_policy", ANY),
    key("security_mode", ANY),
    key("username", ANY),
    key("password", ANY),
    key("password_env", ANY),
    key("password_file", ANY),
    key("password_credential", ANY),
    key("trust_unknown_server_cert", ANY),
    key("publishing_interval", ANY),
    key("sampling_interval", ANY),
    key("reconnect_initial", ANY),
    key("reconnect_max", ANY),
    key("events", ANY),
    key("backfill", ANY),
    key("backfill_max", ANY),
    key("node_template", PROFILES),
    key("oee_window", OPTOMES),
    key("units", DELTAV),
    key("work_centers", OPTOMES),
    key("tags", ANY),
];

/// Every connection key of any kind: a key outside this list is unknown
/// (and gets a "did you mean"), one inside it but not for this kind is
/// reported by [`kind_mismatch`].
pub(super) fn connection_key_names() -> Vec<&'static str> {
    CONNECTION_KEYS.iter().map(|k| k.name).collect()
}

/// Where `name` stands in [`CONNECTION_KEYS`]; None for a key it lacks.
pub(super) fn position(name: &str) -> Option<usize> {
    CONNECTION_KEYS.iter().position(|k| k.name == name)
}

/// The message for `name` set on a connection of `kind` that does not accept
/// it, e.g. `only valid for kind = "deltav", this connection is kind =
/// "generic"`; None when `kind` accepts it or the key is not in the table.
pub(super) fn kind_mismatch(name: &str, kind: ConnectionKind) -> Option<String> {
    let entry = CONNECTION_KEYS.iter().find(|k| k.name == name)?;
    if entry.kinds.contains(&kind) {
        return None;
    }
    let which = entry
        .kinds
        .iter()
        .map(|k| format!("\"{}\"", k.as_str()))
        .collect::<Vec<_>>()
        .join(" or ");
    Some(format!(
        "only valid for kind = {which}, this connection is kind = \"{}\"",
        kind.as_str()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mismatch_messages_name_the_kinds_that_accept_the_key() {
        assert_eq!(
            kind_mismatch("node_template", ConnectionKind::Generic).as_deref(),
            Some("only valid for kind = \"deltav\" or \"optomes\", this connection is kind = \"generic\"")
        );
        assert_eq!(
            kind_mismatch("units", ConnectionKind::Optomes).as_deref(),
            Some("only valid for kind = \"deltav\", this connection is kind = \"optomes\"")
        );
        assert_eq!(kind_mismatch("units", ConnectionKind::Deltav), None);
        assert_eq!(kind_mismatch("tags", ConnectionKind::Generic), None);
        assert_eq!(kind_mismatch("no_such_key", ConnectionKind::Generic), None);
    }

    #[test]
    fn names_are_unique() {
        let names = connection_key_names();
        for (i, n) in names.iter().enumerate() {
            assert_eq!(position(n), Some(i), "{n} listed twice");
        }
    }
}
