//! The validated, effective configuration (docs/configuration.md). Built only by
//! `config::load`, so every value here has been checked and every secret
//! resolved. Serialize is for `plantgate check` (secrets print as `***`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

use crate::secret::Secret;

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Config {
    pub agent: AgentConfig,
    pub health: HealthConfig,
    pub mqtt: MqttConfig,
    pub buffer: BufferConfig,
    pub connections: Vec<ConnectionConfig>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct AgentConfig {
    pub id: String,
    pub site: String,
    pub data_dir: PathBuf,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct HealthConfig {
    pub listen: SocketAddr,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MqttProtocol {
    V5,
    V311,
}

/// What the records look like on the wire (docs/mqtt.md, docs/sparkplug.md).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MqttFormat {
    /// plantgate's JSON topics and payloads.
    #[default]
    Json,
    /// Sparkplug B 3.0: the agent as edge node, connections as devices.
    SparkplugB,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MqttConfig {
    /// As configured, e.g. `mqtts://broker.example.com:8883`.
    pub url: String,
    /// Parsed from `url`.
    pub host: String,
    /// Parsed from `url`; default 8883 for mqtts, 1883 for mqtt.
    pub port: u16,
    /// true for `mqtts://`.
    pub tls: bool,
    pub allow_plaintext: bool,
    pub ca_file: Option<PathBuf>,
    pub client_cert_file: Option<PathBuf>,
    pub client_key_file: Option<PathBuf>,
    pub username: Option<String>,
    pub password: Option<Secret>,
    pub protocol: MqttProtocol,
    pub topic_prefix: String,
    #[serde(with = "human_duration")]
    pub keep_alive: Duration,
    #[serde(with = "human_duration")]
    pub heartbeat_interval: Duration,
    pub max_message_bytes: usize,
    #[serde(with = "human_duration")]
    pub reconnect_initial: Duration,
    #[serde(with = "human_duration")]
    pub reconnect_max: Duration,
    /// The largest range one replay request may ask for
    /// (docs/configuration.md, "[mqtt]"): a request is answered from the
    /// buffer while live data flows, so one request must not be able to ask
    /// for the whole buffer at once.
    pub replay_max_records: u64,
    pub format: MqttFormat,
}

/// `backfill` of a connection (docs/backfill.md).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Backfill {
    /// What happens while no subscription exists is not read back.
    #[default]
    Off,
    /// After a gap, the missed values are read with HistoryRead.
    History,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Synchronous {
    Normal,
    Full,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BufferConfig {
    pub max_size: u64,
    #[serde(with = "human_duration")]
    pub max_age: Duration,
    pub synchronous: Synchronous,
    /// A `system.error` (`buffer_headroom_low`) when the free buffer would
    /// last less than this at the current intake rate; zero turns it off.
    #[serde(with = "human_duration")]
    pub headroom_warning: Duration,
    /// How long acknowledged records stay for replay; zero deletes them on
    /// PUBACK. Kept records are evicted before anything undelivered and
    /// counted apart, so they never stand in for a backlog.
    #[serde(with = "human_duration")]
    pub retain_delivered: Duration,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ConnectionKind {
    Deltav,
    Optomes,
    Generic,
}

impl ConnectionKind {
    /// In the order docs/configuration.md lists them (and messages name them).
    pub const ALL: [ConnectionKind; 3] = [
        ConnectionKind::Deltav,
        ConnectionKind::Optomes,
        ConnectionKind::Generic,
    ];

    /// The `kind = "..."` value, case-insensitive as users may write it.
    pub fn parse(s: &str) -> Option<ConnectionKind> {
        let s = s.trim();
        Self::ALL
            .into_iter()
            .find(|k| k.as_str().eq_ignore_ascii_case(s))
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ConnectionKind::Deltav => "deltav",
            ConnectionKind::Optomes => "optomes",
            ConnectionKind::Generic => "generic",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum SecurityPolicy {
    None,
    Basic256Sha256,
    Aes128Sha256RsaOaep,
    Aes256Sha256RsaPss,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum SecurityMode {
    None,
    Sign,
    SignAndEncrypt,
}

/// Every policy/mode combination a connection may use (docs/configuration.md): None only
/// with None, each real policy with Sign or SignAndEncrypt.
pub const SECURITY_PAIRS: [(SecurityPolicy, SecurityMode); 7] = [
    (SecurityPolicy::None, SecurityMode::None),
    (SecurityPolicy::Basic256Sha256, SecurityMode::Sign),
    (SecurityPolicy::Basic256Sha256, SecurityMode::SignAndEncrypt),
    (SecurityPolicy::Aes128Sha256RsaOaep, SecurityMode::Sign),
    (
        SecurityPolicy::Aes128Sha256RsaOaep,
        SecurityMode::SignAndEncrypt,
    ),
    (SecurityPolicy::Aes256Sha256RsaPss, SecurityMode::Sign),
    (
        SecurityPolicy::Aes256Sha256RsaPss,
        SecurityMode::SignAndEncrypt,
    ),
];

/// One `[[connections]]` entry: what every kind shares, the plain tags, and
/// what only its kind has (docs/configuration.md, "Connections"). Which keys a
/// kind accepts in the file is the table in `config/keys.rs`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ConnectionConfig {
    pub id: String,
    pub endpoint: String,
    pub security_policy: SecurityPolicy,
    pub security_mode: SecurityMode,
    pub username: Option<String>,
    pub password: Option<Secret>,
    pub trust_unknown_server_cert: bool,
    #[serde(with = "human_duration")]
    pub publishing_interval: Duration,
    #[serde(with = "human_duration")]
    pub sampling_interval: Duration,
    #[serde(with = "human_duration")]
    pub reconnect_initial: Duration,
    #[serde(with = "human_duration")]
    pub reconnect_max: Duration,
    pub events: Vec<crate::record::EventType>,
    /// Whether a gap is read back from the server's history (docs/backfill.md).
    pub backfill: Backfill,
    /// The longest gap read back; the older part is reported, not read.
    #[serde(with = "human_duration")]
    pub backfill_max: Duration,
    pub tags: Vec<TagConfig>,
    /// Serialized as `kind = "..."` plus the kind's own keys; `plantgate
    /// check` puts them back in the order users write them.
    #[serde(flatten)]
    pub profile: ProfileConfig,
}

impl ConnectionConfig {
    pub fn kind(&self) -> ConnectionKind {
        self.profile.kind()
    }
}

/// The keys only one kind of connection has (docs/configuration.md).
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum ProfileConfig {
    Deltav(DeltavConfig),
    Optomes(OptomesConfig),
    /// Tags only.
    Generic,
}

impl ProfileConfig {
    pub fn kind(&self) -> ConnectionKind {
        match self {
            ProfileConfig::Deltav(_) => ConnectionKind::Deltav,
            ProfileConfig::Optomes(_) => ConnectionKind::Optomes,
            ProfileConfig::Generic => ConnectionKind::Generic,
        }
    }
}

/// A DeltaV connection's batch units (docs/profiles.md).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct DeltavConfig {
    /// None means the profile's default template.
    pub node_template: Option<String>,
    pub units: Vec<UnitConfig>,
}

/// An OptoMES connection's work centers and OEE window (docs/profiles.md).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct OptomesConfig {
    /// None means the profile's default template.
    pub node_template: Option<String>,
    #[serde(with = "human_duration")]
    pub oee_window: Duration,
    pub work_centers: Vec<WorkCenterConfig>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct UnitConfig {
    pub name: String,
    pub recipe_parameters: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct WorkCenterConfig {
    pub name: String,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TagConfig {
    pub name: String,
    /// `ns=N;s=..` or `nsu=URI;s=..` (also i=, g=, b= identifiers).
    pub node: String,
    #[serde(with = "human_duration::option")]
    pub sampling_interval: Option<Duration>,
    pub deadband: Option<f64>,
}

/// Durations print back the way users write them (`500ms`, `30s`, `7d`).
pub mod human_duration {
    use serde::Serializer;
    use std::time::Duration;

    pub fn format(d: Duration) -> String {
        let ms = d.as_millis();
        const UNITS: [(u128, &str); 4] = [
            (86_400_000, "d"),
            (3_600_000, "h"),
            (60_000, "m"),
            (1_000, "s"),
        ];
        for (unit, suffix) in UNITS {
            if ms >= unit && ms % unit == 0 {
                return format!("{}{}", ms / unit, suffix);
            }
        }
        format!("{ms}ms")
    }

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format(*d))
    }

    pub mod option {
        use serde::Serializer;
        use std::time::Duration;

        pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
            match d {
                Some(d) => s.serialize_str(&super::format(*d)),
                None => s.serialize_none(),
            }
        }
    }
}
