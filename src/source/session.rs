//! The OPC UA building blocks a session is made of (`live` puts them
//! together): the client and its endpoint checks, identity, namespaces,
//! subscriptions and monitored items, the subscription callback that turns
//! data changes into records (`Notifier`), and what it announces
//! (`Notices`). Each call is a single attempt; retrying is the caller's job.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use opcua::client::{
    Client, ClientBuilder, IdentityToken, MonitoredItemMap, OnSubscriptionNotificationCore,
    Session, SessionPollResult, SubscriptionActivity,
};
use opcua::crypto::SecurityPolicy as UaPolicy;
use opcua::types::{
    ByteString, DataChangeFilter, DataChangeNotification, DataChangeTrigger, DeadbandType,
    EndpointDescription, ExtensionObject, Guid, MessageSecurityMode, MonitoredItemCreateRequest,
    MonitoringMode, MonitoringParameters, NamespaceMap, NodeId, NotificationMessage, ReadValueId,
    StatusChangeNotification, StatusCode, SubStatusCode, TimestampsToReturn, UserTokenType,
};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::feed::Feed;
use super::pki::{OwnCertificate, PinCheck};
use super::reporter::{ConnectionReporter, IntakeLoss};
use super::value::{
    bad_tag_record, oversized, tag_record, too_large_record, value_ts_ms, variant_to_json,
    TagIndex, TagMeta, MAX_STRING_VALUE_BYTES,
};
use crate::config::{ConnectionConfig, SecurityMode, SecurityPolicy, TagConfig};
use crate::nodeid::{Identifier, Namespace, NodeRef};
use crate::profile::{NodeKey, Sample};
use crate::record::NewRecord;
use crate::status::DropReason;

/// Per-request timeout; also bounds endpoint discovery and connecting.
pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Servers reject CreateMonitoredItems calls above their per-call limit
/// (1000 is a common default).
const MONITORED_ITEMS_CHUNK: usize = 1000;
/// Publishing intervals without data after which the server sends a keep-alive.
pub(crate) const KEEP_ALIVE_COUNT: u32 = 10;
/// Tags per subscription. The client library keeps two publish requests in
/// flight per subscription, and a server answers each with one notification
/// message (node-opcua: at most 1 000 values): one subscription over 10 000
/// tags tops out near 20 000 values/s against such a server however idle
/// both sides are. Subscriptions of this size keep enough requests in flight
/// for the round trip (node-opcua's own client keeps five): 10 000 tags make
/// five subscriptions and ten requests. See docs/performance.md.
pub(crate) const TAGS_PER_SUBSCRIPTION: usize = 2_000;

/// Decoder limits (docs/guarantees.md). The largest message the client accepts, also
/// announced to the server in Hello (a compliant server answers
/// BadResponseTooLarge instead of sending more). It bounds what one response
/// may cost in RAM: the chunks, their merged body and the decoded values, a
/// few times this at the peak, which a 512 MiB gateway can afford. A publish
/// response of 100 000 notifications takes about 4 MiB, so real traffic never
/// comes near it. (256 MiB before: one response could take a small box down.)
pub(crate) const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;
/// The chunk size we announce as receive buffer (the common 64 KiB).
const MAX_CHUNK_BYTES: usize = 65_535;
/// The library bounds an incoming message by its chunk count, not its bytes:
/// with chunks of [`MAX_CHUNK_BYTES`] this keeps it within
/// [`MAX_MESSAGE_BYTES`]. A message with more chunks fails the one request it
/// answers (BadEncodingLimitsExceeded), not the connection.
const MAX_CHUNK_COUNT: usize = MAX_MESSAGE_BYTES / MAX_CHUNK_BYTES;
const _: () = assert!(MAX_CHUNK_COUNT * MAX_CHUNK_BYTES <= MAX_MESSAGE_BYTES);
/// Strings and ByteStrings: whatever fits in a message decodes. Too large for
/// a record is decided per value afterwards (`value::oversized`), so a big
/// value costs its own tag a `bad` record, never the connection: a decoder
/// limit below the message size would fail the whole response and close the
/// transport, the reconnect loop docs/guarantees.md rules out.
const MAX_DECODED_STRING_BYTES: usize = MAX_MESSAGE_BYTES;
/// Array elements (notifications in one publish response, elements of an
/// array value). The default of 1000 drops the connection on a large publish
/// response; a million covers the ceiling measured (100 000 values/s).
const MAX_ARRAY_LENGTH: usize = 1_000_000;

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("cannot create the OPC UA client: {0}")]
    Client(String),
    #[error("{}: {context}", super::value::status_name(*status))]
    Ua { status: StatusCode, context: String },
    #[error("{0}")]
    Pki(#[from] super::pki::PkiError),
    #[error(
        "server offers no endpoint with security policy {policy:?} and mode {mode:?} (it offers {offered})"
    )]
    NoEndpoint {
        policy: SecurityPolicy,
        mode: SecurityMode,
        /// `Policy/Mode` pairs the server advertises, for the operator.
        offered: String,
    },
    #[error("subscription silent for {0:?} (no publish response or keep-alive)")]
    Silent(Duration),
    #[error(
        "the server certificate of {endpoint} changed since it was trusted on first use: pinned {pinned}, presented {presented}"
    )]
    CertificateChanged {
        endpoint: String,
        pinned: String,
        presented: String,
    },
}

impl SourceError {
    pub(crate) fn ua(status: StatusCode, context: impl Into<String>) -> Self {
        SourceError::Ua {
            status,
            context: context.into(),
        }
    }

    fn from_ua(e: opcua::types::Error, context: &str) -> Self {
        SourceError::ua(e.status(), format!("{context}: {e}"))
    }

    pub fn status(&self) -> Option<StatusCode> {
        match self {
            SourceError::Ua { status, .. } => Some(*status),
            SourceError::NoEndpoint { .. } => Some(StatusCode::BadSecurityPolicyRejected),
            // Refused like any untrusted certificate: state `untrusted`.
            SourceError::CertificateChanged { .. } => Some(StatusCode::BadCertificateUntrusted),
            _ => None,
        }
    }

    /// What the status board and the retained status message show: the
    /// status code name where there is one, else the message.
    pub fn reason(&self) -> String {
        match self {
            SourceError::Ua { status, .. } => {
                let name = super::value::status_name(*status);
                match size_limit_note(*status) {
                    Some(note) => format!("{name} ({note})"),
                    None => name,
                }
            }
            // Stable text: a changing duration would make every retry a
            // "new" reason.
            SourceError::Silent(_) => "subscription silent".to_string(),
            SourceError::CertificateChanged {
                pinned, presented, ..
            } => format!(
                "server certificate changed since first use: pinned {pinned}, presented {presented}"
            ),
            other => other.to_string(),
        }
    }
}

/// For statuses that mean a server message hit the decoder limits: what the
/// limits are, so the operator sees why the transport closed.
fn size_limit_note(status: StatusCode) -> Option<String> {
    let limits = format!(
        "{} MiB per message and string, {MAX_ARRAY_LENGTH} array elements",
        MAX_MESSAGE_BYTES / (1024 * 1024)
    );
    match status.sub_code() {
        SubStatusCode::BadDecodingError => Some(format!(
            "a server message could not be decoded: malformed or over the client's decoder limits of {limits}"
        )),
        _ if response_too_large(status) => Some(format!(
            "a server message exceeded the client's decoder limits of {limits}"
        )),
        _ => None,
    }
}

/// Whether a failed publish means the response was too large to take in:
/// its values are lost (the transport survives).
fn response_too_large(status: StatusCode) -> bool {
    matches!(
        status.sub_code(),
        SubStatusCode::BadEncodingLimitsExceeded
            | SubStatusCode::BadTcpMessageTooLarge
            | SubStatusCode::BadResponseTooLarge
    )
}

/// Builds the client of one connection. Blocking (may create the
/// application certificate, see `pki`): call it from `spawn_blocking`.
pub(crate) fn build_client(
    conn: &ConnectionConfig,
    pki_dir: &std::path::Path,
) -> Result<(Client, OwnCertificate), SourceError> {
    let own = super::pki::ensure_own_certificate(pki_dir, None)?;
    let client = ClientBuilder::new()
        .application_name("plantgate")
        // Must equal the certificate's URI SAN or servers reject the session.
        .application_uri(own.application_uri.as_str())
        .product_uri("urn:plantgate")
        .create_sample_keypair(false)
        .certificate_path(super::pki::OWN_CERT)
        .private_key_path(super::pki::OWN_KEY)
        .pki_dir(pki_dir)
        // Never the library's "trust every unknown certificate": with
        // `trust_unknown_server_cert` only the first certificate of an
        // endpoint is trusted, by `vet_endpoint` before connecting.
        .trust_server_certs(false)
        .verify_server_certs(true)
        // The library's own retry loop would reconnect forever even on
        // rejected credentials; we retry ourselves with our backoff.
        .session_retry_limit(0)
        .session_name(format!("plantgate {}", conn.id))
        .session_timeout(60_000)
        .request_timeout(REQUEST_TIMEOUT)
        .keep_alive_interval(Duration::from_secs(5))
        // Decoder limits, on purpose: see MAX_MESSAGE_BYTES and below.
        .max_message_size(MAX_MESSAGE_BYTES)
        .max_incoming_chunk_size(MAX_CHUNK_BYTES)
        .max_chunk_count(MAX_CHUNK_COUNT)
        .max_string_length(MAX_DECODED_STRING_BYTES)
        .max_byte_string_length(MAX_DECODED_STRING_BYTES)
        .max_array_length(MAX_ARRAY_LENGTH)
        .client()
        .map_err(|errs| SourceError::Client(errs.join("; ")))?;
    Ok((client, own))
}

fn ua_policy(p: SecurityPolicy) -> UaPolicy {
    match p {
        SecurityPolicy::None => UaPolicy::None,
        SecurityPolicy::Basic256Sha256 => UaPolicy::Basic256Sha256,
        SecurityPolicy::Aes128Sha256RsaOaep => UaPolicy::Aes128Sha256RsaOaep,
        SecurityPolicy::Aes256Sha256RsaPss => UaPolicy::Aes256Sha256RsaPss,
    }
}

fn ua_mode(m: SecurityMode) -> MessageSecurityMode {
    match m {
        SecurityMode::None => MessageSecurityMode::None,
        SecurityMode::Sign => MessageSecurityMode::Sign,
        SecurityMode::SignAndEncrypt => MessageSecurityMode::SignAndEncrypt,
    }
}

pub(crate) fn identity(conn: &ConnectionConfig) -> IdentityToken {
    match (&conn.username, &conn.password) {
        (Some(user), Some(pass)) => IdentityToken::new_user_name(user.clone(), pass.expose()),
        (Some(user), None) => IdentityToken::new_user_name(user.clone(), ""),
        _ => IdentityToken::Anonymous,
    }
}

/// Asks the server for its endpoints and picks the one with the configured
/// policy and mode. The URL is replaced by the configured one: servers often
/// advertise a hostname or port the gateway cannot reach (NAT, port forward).
pub(crate) async fn discover_endpoint(
    client: &Client,
    conn: &ConnectionConfig,
    identity: &IdentityToken,
) -> Result<EndpointDescription, SourceError> {
    let endpoints = tokio::time::timeout(
        REQUEST_TIMEOUT,
        client.get_server_endpoints_from_url(conn.endpoint.as_str()),
    )
    .await
    .map_err(|_| SourceError::ua(StatusCode::BadTimeout, "GetEndpoints timed out"))?
    .map_err(|e| SourceError::from_ua(e, "GetEndpoints"))?;

    let policy = ua_policy(conn.security_policy);
    let mode = ua_mode(conn.security_mode);
    let token_type = match identity {
        IdentityToken::Anonymous => UserTokenType::Anonymous,
        IdentityToken::UserName(..) => UserTokenType::UserName,
        IdentityToken::X509(..) => UserTokenType::Certificate,
        IdentityToken::IssuedToken(..) => UserTokenType::IssuedToken,
    };
    let matching: Vec<&EndpointDescription> = endpoints
        .iter()
        .filter(|e| {
            e.security_mode == mode && UaPolicy::from_uri(e.security_policy_uri.as_ref()) == policy
        })
        .collect();
    // Prefer an endpoint that accepts our kind of identity; if none does, take
    // any match and let the server's answer tell the operator why.
    let chosen = matching
        .iter()
        .find(|e| {
            e.user_identity_tokens
                .as_ref()
                .is_some_and(|ts| ts.iter().any(|t| t.token_type == token_type))
        })
        .or(matching.first())
        .copied()
        .ok_or_else(|| SourceError::NoEndpoint {
            policy: conn.security_policy,
            mode: conn.security_mode,
            offered: offered(&endpoints),
        })?;
    let mut chosen = chosen.clone();
    chosen.endpoint_url = conn.endpoint.as_str().into();
    Ok(chosen)
}

/// `None/None, Basic256Sha256/Sign, ...`: what a server advertises.
fn offered(endpoints: &[EndpointDescription]) -> String {
    let mut pairs: Vec<String> = Vec::new();
    for e in endpoints {
        let uri = e.security_policy_uri.as_ref();
        // Policy URIs end in `#Name` (http://opcfoundation.org/UA/SecurityPolicy#None).
        let policy = uri.rsplit('#').next().unwrap_or(uri);
        let pair = format!("{policy}/{:?}", e.security_mode);
        if !pairs.contains(&pair) {
            pairs.push(pair);
        }
    }
    if pairs.is_empty() {
        "no endpoints".to_string()
    } else {
        pairs.join(", ")
    }
}

/// Statuses in a data change that mean the node itself is gone (deleted,
/// renamed by a configuration download): the tag is dropped from the
/// subscription and retried like a tag that failed at subscribe time.
pub(crate) fn node_gone(status: StatusCode) -> bool {
    matches!(
        status.sub_code(),
        SubStatusCode::BadNodeIdUnknown | SubStatusCode::BadNodeIdInvalid
    )
}

/// What the session's event loop reports to the connection task.
#[derive(Debug)]
pub(crate) enum LoopEvent {
    Connected,
    ConnectFailed(StatusCode),
    Lost(StatusCode),
    /// The server ended our subscription (StatusChangeNotification).
    SubscriptionStatus(StatusCode),
    /// A monitored node reported that it no longer exists: (tag index, why).
    NodeGone(TagIndex, StatusCode),
}

/// Drives the session event loop on its own task. It stops at the first
/// failure to connect or loss of connection: reconnecting is ours to do (a
/// fresh session re-resolves namespaces and re-creates everything).
pub(crate) fn spawn_event_loop(
    event_loop: opcua::client::SessionEventLoop<opcua::client::transport::TcpConnector>,
    events: mpsc::UnboundedSender<LoopEvent>,
    last_publish: Arc<PublishClock>,
    notices: Arc<Notices>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let stream = event_loop.enter();
        futures::pin_mut!(stream);
        while let Some(item) = stream.next().await {
            let event = match item {
                Ok(SessionPollResult::Reconnected(_)) => LoopEvent::Connected,
                Ok(SessionPollResult::ReconnectFailed(code)) => LoopEvent::ConnectFailed(code),
                Ok(SessionPollResult::ConnectionLost(code)) => LoopEvent::Lost(code),
                Ok(SessionPollResult::Subscription(SubscriptionActivity::Publish)) => {
                    last_publish.touch();
                    continue;
                }
                // A response over the decoder limits fails its request only
                // (the transport survives, the client publishes again): the
                // values it carried are lost and must not be lost silently.
                Ok(SessionPollResult::Subscription(SubscriptionActivity::PublishFailed(code)))
                    if response_too_large(code) =>
                {
                    notices.response_too_large(code);
                    continue;
                }
                Ok(_) => continue,
                Err(code) => LoopEvent::ConnectFailed(code),
            };
            let stop = !matches!(event, LoopEvent::Connected);
            let _ = events.send(event);
            if stop {
                return;
            }
        }
        let _ = events.send(LoopEvent::Lost(StatusCode::BadConnectionClosed));
    })
}

/// Time of the last publish response (data or keep-alive), for the
/// silent-subscription watchdog.
pub(crate) struct PublishClock {
    base: Instant,
    last_ms: AtomicU64,
}

impl PublishClock {
    pub(crate) fn new() -> Self {
        PublishClock {
            base: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    pub(crate) fn touch(&self) {
        let ms = self.base.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    pub(crate) fn silent_for(&self) -> Duration {
        let last = self.last_ms.load(Ordering::Relaxed);
        self.base
            .elapsed()
            .saturating_sub(Duration::from_millis(last))
    }
}

/// A configured tag, or a node the profile needs, with its parsed node
/// reference (None: unparseable). Both kinds share resolution, monitoring,
/// and the bad-node retry; only where their values go differs.
pub(crate) struct TagPlan {
    pub meta: Arc<TagMeta>,
    pub node: Option<NodeRef>,
    pub sampling: Duration,
    pub deadband: Option<f64>,
    /// Set for a profile node: its values go to the profile as samples, not
    /// into `tag` records.
    pub profile: Option<NodeKey>,
}

/// Plans for the profile's nodes, to be appended after the tags' plans.
/// Named by their node text in logs and `system.error` events.
pub(crate) fn plan_profile_nodes(
    conn: &ConnectionConfig,
    nodes: &[crate::profile::NodeSpec],
) -> Vec<TagPlan> {
    nodes
        .iter()
        .filter(|n| n.subscribe)
        .map(|n| TagPlan {
            meta: Arc::new(TagMeta::new(n.node.clone(), n.node.clone())),
            node: NodeRef::parse(&n.node).ok(),
            sampling: conn.sampling_interval,
            deadband: None,
            profile: Some(n.key),
        })
        .collect()
}

pub(crate) fn plan_tags(conn: &ConnectionConfig) -> Vec<TagPlan> {
    conn.tags
        .iter()
        .map(|t: &TagConfig| TagPlan {
            meta: Arc::new(TagMeta::new(t.name.clone(), t.node.clone())),
            node: NodeRef::parse(&t.node).ok(),
            sampling: t.sampling_interval.unwrap_or(conn.sampling_interval),
            deadband: t.deadband,
            profile: None,
        })
        .collect()
}

/// Turns a configured node reference into a NodeId of this server session.
pub(crate) fn resolve(node: &NodeRef, namespaces: &NamespaceMap) -> Result<NodeId, StatusCode> {
    let ns = match &node.namespace {
        Namespace::Index(i) => *i,
        Namespace::Uri(uri) => namespaces
            .get_index(uri)
            .ok_or(StatusCode::BadNodeIdUnknown)?,
    };
    Ok(match &node.identifier {
        Identifier::Numeric(n) => NodeId::new(ns, *n),
        Identifier::String(s) => NodeId::new(ns, s.as_str()),
        Identifier::Guid(g) => NodeId::new(
            ns,
            Guid::from_str(g).map_err(|_| StatusCode::BadNodeIdInvalid)?,
        ),
        Identifier::Opaque(b) => NodeId::new(
            ns,
            ByteString::from_base64(b).ok_or(StatusCode::BadNodeIdInvalid)?,
        ),
    })
}

/// What the subscription callbacks look tags up in, by tag index: the
/// tag's metadata (None once retired) and the profile node it is, if any.
#[derive(Default)]
pub(crate) struct Lookup {
    pub metas: Vec<Option<Arc<TagMeta>>>,
    pub profile: Vec<Option<NodeKey>>,
}

impl Lookup {
    /// The live tag at `index`, with the profile node it is.
    pub(crate) fn get(&self, index: TagIndex) -> Option<(&Arc<TagMeta>, Option<NodeKey>)> {
        let meta = self.metas.get(index.get())?.as_ref()?;
        Some((meta, self.profile.get(index.get()).copied().flatten()))
    }
}

/// The lookup shared with the callbacks; a retag swaps in a new one.
pub(crate) type SharedLookup = Arc<std::sync::RwLock<Arc<Lookup>>>;

/// The subscription callback. Runs on the OPC UA event loop, so it only
/// converts and hands over: one message per publish response into the
/// intake queue, which never blocks the loop and counts what it cannot take.
#[derive(Clone)]
pub(crate) struct Notifier {
    pub connection: Arc<str>,
    /// The tags by index; a reload may swap in a new table meanwhile.
    pub tags: SharedLookup,
    pub records: super::feed::FeedTx,
    pub events: mpsc::UnboundedSender<LoopEvent>,
    /// Counts and announces values too large for a record.
    pub notices: Arc<Notices>,
    /// Whether each record goes with its tag ([`Feed::Publish`]'s `tags`):
    /// backfill keeps marks per tag (docs/backfill.md).
    pub name_values: bool,
}

impl OnSubscriptionNotificationCore for Notifier {
    fn on_subscription_notification(
        &mut self,
        notification: NotificationMessage,
        _items: MonitoredItemMap<'_>,
    ) {
        let Some(data) = notification.notification_data else {
            return;
        };
        let mut out = Vec::new();
        let mut samples = Vec::new();
        let mut named = Vec::new();
        let tags = self.tags.read().unwrap_or_else(|e| e.into_inner()).clone();
        for obj in data {
            if obj.inner_is::<DataChangeNotification>() {
                let Some(change) = obj.into_inner_as::<DataChangeNotification>() else {
                    continue;
                };
                for item in change.monitored_items.into_iter().flatten() {
                    // A retired tag's late values are not taken for another's.
                    let Some((index, (tag, profile))) =
                        TagIndex::from_client_handle(item.client_handle)
                            .and_then(|i| tags.get(i).map(|t| (i, t)))
                    else {
                        continue;
                    };
                    let status = item.value.status();
                    if status.overflow() {
                        self.records.server_overflow(&tag.name);
                    }
                    let too_large = item.value.value.as_ref().and_then(oversized);
                    if let Some(bytes) = too_large {
                        // Costs this tag a bad record (a profile node: a
                        // sample the profile ignores), never the others.
                        self.notices.value_too_large(index, tag, bytes);
                    }
                    match (profile, too_large) {
                        (Some(key), _) => samples.push(Sample {
                            key,
                            value: match too_large {
                                Some(_) => serde_json::Value::Null,
                                None => item
                                    .value
                                    .value
                                    .as_ref()
                                    .map(variant_to_json)
                                    .unwrap_or(serde_json::Value::Null),
                            },
                            good: status.is_good() && too_large.is_none(),
                            ts_ms: value_ts_ms(&item.value),
                        }),
                        (None, too_large) => {
                            out.push(match too_large {
                                Some(_) => too_large_record(&self.connection, tag, &item.value),
                                None => tag_record(&self.connection, tag, &item.value),
                            });
                            if self.name_values {
                                named.push(tag.clone());
                            }
                        }
                    }
                    if node_gone(status) {
                        let _ = self.events.send(LoopEvent::NodeGone(index, status));
                    }
                }
            } else if let Some(status) = obj.into_inner_as::<StatusChangeNotification>() {
                let _ = self
                    .events
                    .send(LoopEvent::SubscriptionStatus(status.status));
            }
        }
        if !out.is_empty() || !samples.is_empty() {
            let _ = self.records.send(Feed::Publish {
                records: out,
                samples,
                tags: named,
            });
        }
    }
}

/// Aborts a session's task (its event loop, its backfill reader) however
/// the session ends: dropping the event loop closes the TCP connection.
pub(crate) struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl AbortOnDrop {
    pub(crate) fn new(task: tokio::task::JoinHandle<()>) -> Self {
        AbortOnDrop(task)
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// How often the same oversized tag (or too large response) is announced
/// again by a `system.error` while it keeps happening; every value is
/// counted regardless (`source.dropped`, reason `value_too_large`).
const REANNOUNCE_EVERY: Duration = Duration::from_secs(3600);

/// A connection's announcements that are due once per connection start or
/// once per tag, not once per session or value: created by the connection
/// task, shared by its sessions.
pub(crate) struct Notices {
    reporter: ConnectionReporter,
    loss: IntakeLoss,
    pki_dir: PathBuf,
    /// Tag index -> when its last oversized value was announced.
    oversized: Mutex<HashMap<TagIndex, Instant>>,
    response_too_large: Mutex<Option<Instant>>,
    /// When a server's refusal of more subscriptions was last announced.
    subscriptions_refused: Mutex<Option<Instant>>,
    cleartext_password: AtomicBool,
    /// Thumbprints already announced as a changed server certificate.
    changed_certificates: Mutex<HashSet<String>>,
}

impl Notices {
    pub(crate) fn new(reporter: &ConnectionReporter, pki_dir: &Path) -> Self {
        Notices {
            reporter: reporter.clone(),
            loss: reporter.intake_loss(),
            pki_dir: pki_dir.to_path_buf(),
            oversized: Mutex::new(HashMap::new()),
            response_too_large: Mutex::new(None),
            subscriptions_refused: Mutex::new(None),
            cleartext_password: AtomicBool::new(false),
            changed_certificates: Mutex::new(HashSet::new()),
        }
    }

    /// A value of tag `index` had a string of `bytes` bytes (over
    /// [`MAX_STRING_VALUE_BYTES`]): counted as intake loss, announced by a
    /// `system.error` at most once per [`REANNOUNCE_EVERY`] and tag. Sync:
    /// called from the subscription callback.
    pub(crate) fn value_too_large(&self, index: TagIndex, tag: &TagMeta, bytes: usize) {
        self.loss
            .record(DropReason::ValueTooLarge, 1, Some(tag.name.as_str()));
        let due = {
            let mut last = self.oversized.lock().unwrap_or_else(|e| e.into_inner());
            let due = due_again(last.get(&index).copied());
            if due {
                last.insert(index, Instant::now());
            }
            due
        };
        if !due {
            tracing::debug!(connection = %self.reporter.id(), tag = %tag.name, bytes, "value too large for a record (again)");
            return;
        }
        tracing::error!(
            connection = %self.reporter.id(),
            tag = %tag.name,
            node = %tag.node,
            bytes,
            limit = MAX_STRING_VALUE_BYTES,
            "value too large for a record: the tag got a bad record (BadEncodingLimitsExceeded), the other tags are not affected"
        );
        self.spawn_system_error(serde_json::json!({
            "error": "value_too_large",
            "tag": tag.name,
            "node": tag.node,
            "bytes": bytes,
            "limit_bytes": MAX_STRING_VALUE_BYTES,
            "status": super::value::status_name(super::value::TOO_LARGE_STATUS),
            "message": format!(
                "tag {} (node {}) sent a value holding a string of {bytes} bytes, over the agent's limit of {MAX_STRING_VALUE_BYTES}: recorded as a bad value (BadEncodingLimitsExceeded) and counted as dropped (value_too_large); the other tags are not affected. Repeats are counted, and announced again after an hour",
                tag.name, tag.node
            ),
        }));
    }

    /// A publish response failed with `status` because it was too large to
    /// take in: at least one value lost, counted; announced at most once per
    /// [`REANNOUNCE_EVERY`].
    fn response_too_large(&self, status: StatusCode) {
        // How many values the response held is unknown: at least one.
        self.loss.record(DropReason::ValueTooLarge, 1, None);
        let status = super::value::status_name(status);
        let due = claim_due(&self.response_too_large);
        if !due {
            tracing::warn!(connection = %self.reporter.id(), %status, "publish response too large for the decoder limits (again); its values are lost");
            return;
        }
        let note = size_limit_note(StatusCode::BadEncodingLimitsExceeded).unwrap_or_default();
        tracing::error!(connection = %self.reporter.id(), %status, limit_bytes = MAX_MESSAGE_BYTES, "publish response too large: {note}; its values are lost, the connection stays up");
        self.spawn_system_error(serde_json::json!({
            "error": "response_too_large",
            "status": status,
            "limit_bytes": MAX_MESSAGE_BYTES,
            "message": format!(
                "a publish response from the server was refused ({status}: {note}); the values it carried are lost (counted as dropped, reason value_too_large) and the connection stays up. A server value of this size cannot be read: shrink it on the server or stop monitoring that node"
            ),
        }));
    }

    /// The server allowed `created` of the `wanted` subscriptions: nothing
    /// is lost (the tags share those it allowed), but fewer publish requests
    /// are in flight, so a fast connection may deliver fewer values per
    /// second and lose some in the server's queues (counted as
    /// `opcua_queue_overflow`). Announced at most once per
    /// [`REANNOUNCE_EVERY`].
    fn subscriptions_refused(&self, wanted: usize, created: usize, error: &SourceError) {
        let due = claim_due(&self.subscriptions_refused);
        tracing::warn!(connection = %self.reporter.id(), %error, wanted, created,
            "the server refused another subscription; the tags share the ones it allowed (fewer publish requests in flight)");
        if !due {
            return;
        }
        self.spawn_system_error(serde_json::json!({
            "error": "subscriptions_limited",
            "wanted": wanted,
            "created": created,
            "status": error.reason(),
            "message": format!(
                "the server allowed {created} of the {wanted} subscriptions the agent asked for ({}): every tag is still monitored, sharing the subscriptions allowed, but fewer publish requests are in flight, so at high rates the server may drop values (counted as opcua_queue_overflow). Raise the server's subscriptions-per-session limit",
                error.reason()
            ),
        }));
    }

    /// From a sync context (the subscription callback, the event loop's
    /// stream): the event is handed over by a task of its own.
    fn spawn_system_error(&self, details: serde_json::Value) {
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                let reporter = self.reporter.clone();
                runtime.spawn(async move { reporter.system_error(details).await });
            }
            Err(_) => {
                tracing::warn!(connection = %self.reporter.id(), %details, "system.error not sent: no runtime")
            }
        }
    }
}

/// Whether an announcement last made at `slot` is due again; if so, marks
/// it made now.
fn claim_due(slot: &Mutex<Option<Instant>>) -> bool {
    let mut last = slot.lock().unwrap_or_else(|e| e.into_inner());
    let due = due_again(*last);
    if due {
        *last = Some(Instant::now());
    }
    due
}

fn due_again(last: Option<Instant>) -> bool {
    match last {
        None => true,
        Some(t) => t.elapsed() >= REANNOUNCE_EVERY,
    }
}

/// Checks on the chosen endpoint before connecting to it: the server
/// certificate against the pin of this endpoint when unknown certificates are
/// trusted on first use, and a password that would travel in cleartext.
pub(crate) async fn vet_endpoint(
    endpoint: &EndpointDescription,
    conn: &ConnectionConfig,
    identity: &IdentityToken,
    notices: &Notices,
) -> Result<(), SourceError> {
    if conn.trust_unknown_server_cert && ua_policy(conn.security_policy) != UaPolicy::None {
        check_certificate_pin(endpoint, conn, notices).await?;
    }
    if matches!(identity, IdentityToken::UserName(..))
        && conn.password.is_some()
        && password_in_cleartext(endpoint)
        && !notices.cleartext_password.swap(true, Ordering::Relaxed)
    {
        tracing::error!(
            connection = %conn.id,
            endpoint = %conn.endpoint,
            "the OPC UA password is sent in CLEARTEXT: security_policy None and the server's user token policy does not encrypt it; anyone on the network path can read it. Use a secured security_policy (e.g. Basic256Sha256 + SignAndEncrypt)"
        );
        let policy = endpoint
            .find_policy(UserTokenType::UserName)
            .map(|p| p.policy_id.to_string())
            .unwrap_or_default();
        notices
            .reporter
            .system_error(serde_json::json!({
                "error": "password_in_cleartext",
                "endpoint": conn.endpoint,
                "security_policy": format!("{:?}", conn.security_policy),
                "security_mode": format!("{:?}", conn.security_mode),
                "user_token_policy": policy,
                "message": "the OPC UA password is sent in cleartext: the channel has security None and the server's user token policy does not encrypt the password, so anyone on the network path can read it; configure a secured security_policy (e.g. Basic256Sha256 with SignAndEncrypt)",
            }))
            .await;
    }
    Ok(())
}

/// Whether a UserName token for `endpoint` would carry the password in
/// cleartext: neither the channel (security mode None) nor the token's own
/// security policy (none, or an empty URI, which means the channel's) encrypts
/// it (OPC 10000-4 7.41; async-opcua's `legacy_encrypt_secret`).
pub(crate) fn password_in_cleartext(endpoint: &EndpointDescription) -> bool {
    if endpoint.security_mode != MessageSecurityMode::None {
        return false;
    }
    match endpoint.find_policy(UserTokenType::UserName) {
        // The client cannot log in with a password at all: nothing is sent.
        None => false,
        Some(p) => {
            p.security_policy_uri.is_empty()
                || UaPolicy::from_uri(p.security_policy_uri.as_ref()) == UaPolicy::None
        }
    }
}

/// Trust on first use: pins the first certificate of the endpoint, refuses
/// another one (saved to rejected/, state `untrusted`, one `system.error` per
/// certificate and connection start).
async fn check_certificate_pin(
    endpoint: &EndpointDescription,
    conn: &ConnectionConfig,
    notices: &Notices,
) -> Result<(), SourceError> {
    let cert =
        opcua::crypto::X509::from_byte_string(&endpoint.server_certificate).map_err(|e| {
            SourceError::from(super::pki::PkiError::ServerCertificate {
                endpoint: conn.endpoint.clone(),
                reason: e.to_string(),
            })
        })?;
    match super::pki::check_pin(&notices.pki_dir, &conn.endpoint, &cert)? {
        PinCheck::Matches => Ok(()),
        PinCheck::FirstUse {
            thumbprint,
            trusted_file,
            pin_file,
        } => {
            tracing::warn!(
                connection = %conn.id,
                endpoint = %conn.endpoint,
                %thumbprint,
                trusted = %trusted_file.display(),
                pin = %pin_file.display(),
                "server certificate trusted on first use and pinned: another certificate on this endpoint will be refused"
            );
            Ok(())
        }
        PinCheck::Repinned {
            previous,
            thumbprint,
        } => {
            tracing::info!(connection = %conn.id, endpoint = %conn.endpoint, %previous, %thumbprint, "server certificate changed and was trusted by an operator (in trusted/): pin updated");
            Ok(())
        }
        PinCheck::Changed {
            pinned,
            presented,
            rejected_file,
            pin_file,
        } => {
            let changed = ChangedCertificate {
                pinned: &pinned,
                presented: &presented,
                rejected_file: rejected_file.as_deref(),
                pin_file: &pin_file,
            };
            announce_changed_certificate(conn, notices, changed).await;
            Err(SourceError::CertificateChanged {
                endpoint: conn.endpoint.clone(),
                pinned,
                presented,
            })
        }
    }
}

/// A server certificate other than the pinned one, as found by `check_pin`.
struct ChangedCertificate<'a> {
    pinned: &'a str,
    presented: &'a str,
    rejected_file: Option<&'a std::path::Path>,
    pin_file: &'a std::path::Path,
}

/// Logs and announces (one `system.error` per certificate and connection
/// start) a refused server certificate, with what the operator can do.
async fn announce_changed_certificate(
    conn: &ConnectionConfig,
    notices: &Notices,
    c: ChangedCertificate<'_>,
) {
    let new = notices
        .changed_certificates
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(c.presented.to_string());
    if !new {
        return;
    }
    let (pinned, presented, pin_file) = (c.pinned, c.presented, c.pin_file);
    let (file, fix) = match c.rejected_file {
        Some(f) => (
            f.display().to_string(),
            format!("move {} to trusted/ (the pin follows)", f.display()),
        ),
        None => (
            String::new(),
            format!(
                "it is trusted for another endpoint already: delete {} to trust it on first use here",
                pin_file.display()
            ),
        ),
    };
    tracing::error!(
        connection = %conn.id,
        endpoint = %conn.endpoint,
        %pinned,
        %presented,
        rejected = %file,
        "server certificate changed since it was trusted on first use: refused"
    );
    notices
        .reporter
        .system_error(serde_json::json!({
            "error": "server_certificate_changed",
            "endpoint": conn.endpoint,
            "pinned_thumbprint": pinned,
            "presented_thumbprint": presented,
            "rejected_file": c.rejected_file.map(|f| f.display().to_string()),
            "pin_file": pin_file.display().to_string(),
            "message": format!(
                "{} presents certificate {presented}, not {pinned} trusted there on first use: refused (connection untrusted). If the server's certificate was renewed on purpose, {fix}; otherwise another machine may be answering on this endpoint",
                conn.endpoint
            ),
        }))
        .await;
}

pub(crate) async fn create_subscription(
    session: &Session,
    publishing_interval: Duration,
    notifier: Notifier,
) -> Result<u32, SourceError> {
    session
        .create_subscription(
            publishing_interval,
            KEEP_ALIVE_COUNT * 3,
            KEEP_ALIVE_COUNT,
            0,
            0,
            true,
            notifier,
        )
        .await
        .map_err(|e| SourceError::from_ua(e, "CreateSubscription"))
}

/// The subscriptions of one session. Tag `i` belongs to subscription
/// `i / TAGS_PER_SUBSCRIPTION` (wrapped round when the server allowed fewer),
/// on every session and retry alike.
pub(crate) struct Subscriptions {
    ids: Vec<u32>,
}

impl Subscriptions {
    /// The subscription tag `index` belongs to.
    pub(crate) fn of_tag(&self, index: TagIndex) -> u32 {
        // Never empty: `create_subscriptions` fails without a first one.
        let slot = (index.get() / TAGS_PER_SUBSCRIPTION) % self.ids.len().max(1);
        self.ids.get(slot).copied().unwrap_or_default()
    }

    /// The first subscription: its revised parameters stand for all (they
    /// were all asked for the same).
    pub(crate) fn first(&self) -> u32 {
        self.ids.first().copied().unwrap_or_default()
    }

    pub(crate) fn len(&self) -> usize {
        self.ids.len()
    }
}

/// One subscription per [`TAGS_PER_SUBSCRIPTION`] of the `tags` tags. A
/// server that refuses more subscriptions than it allows gets its fewer
/// ones shared out; only the first is required.
pub(crate) async fn create_subscriptions(
    session: &Session,
    publishing_interval: Duration,
    tags: usize,
    notifier: Notifier,
) -> Result<Subscriptions, SourceError> {
    let wanted = tags.div_ceil(TAGS_PER_SUBSCRIPTION).max(1);
    let mut ids = Vec::with_capacity(wanted);
    for _ in 0..wanted {
        match create_subscription(session, publishing_interval, notifier.clone()).await {
            Ok(id) => ids.push(id),
            Err(e) if !ids.is_empty() => {
                notifier
                    .notices
                    .subscriptions_refused(wanted, ids.len(), &e);
                break;
            }
            Err(e) => return Err(e),
        }
    }
    notifier
        .notices
        .reporter
        .set_subscriptions(wanted, ids.len());
    Ok(Subscriptions { ids })
}

fn item_request(
    index: TagIndex,
    node: NodeId,
    plan: &TagPlan,
    publishing_interval: Duration,
) -> MonitoredItemCreateRequest {
    let sampling_ms = plan.sampling.as_secs_f64() * 1000.0;
    // With publishing slower than sampling, the server must keep every sample
    // of the interval or values are discarded (the Overflow bit). Twice the
    // ratio: a publish cycle that comes late (a busy server, a slow round
    // trip) must not cost values either.
    let ratio = publishing_interval.as_secs_f64() * 1000.0 / sampling_ms.max(1.0);
    let queue_size = (ratio.ceil() as u32).clamp(1, 5_000) * 2 + 1;
    let filter = match plan.deadband {
        Some(d) if d > 0.0 => ExtensionObject::from_message(DataChangeFilter {
            trigger: DataChangeTrigger::StatusValue,
            deadband_type: DeadbandType::Absolute as u32,
            deadband_value: d,
        }),
        _ => ExtensionObject::null(),
    };
    MonitoredItemCreateRequest {
        item_to_monitor: ReadValueId::from(node),
        monitoring_mode: MonitoringMode::Reporting,
        requested_parameters: MonitoringParameters {
            client_handle: index.client_handle(),
            sampling_interval: sampling_ms,
            filter,
            queue_size,
            discard_oldest: true,
        },
    }
}

/// A monitored item: its subscription and its server-assigned id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Item {
    pub subscription: u32,
    pub id: u32,
}

/// Result of `monitor_tags`: the monitored items created and the tags the
/// server refused, with its status (for bad records and retry).
#[derive(Default)]
pub(crate) struct Monitored {
    pub created: Vec<(TagIndex, Item)>,
    pub refused: Vec<(TagIndex, StatusCode)>,
}

/// Creates monitored items for `which` (indexes into `plans`), each in the
/// subscription its tag belongs to.
pub(crate) async fn monitor_tags(
    session: &Session,
    subscriptions: &Subscriptions,
    plans: &[TagPlan],
    which: &[(TagIndex, NodeId)],
    publishing_interval: Duration,
) -> Result<Monitored, SourceError> {
    let mut groups: std::collections::BTreeMap<u32, Vec<(TagIndex, NodeId)>> = Default::default();
    for (i, node) in which {
        groups
            .entry(subscriptions.of_tag(*i))
            .or_default()
            .push((*i, node.clone()));
    }
    let mut out = Monitored::default();
    for (subscription_id, which) in groups {
        monitor_in(
            session,
            subscription_id,
            plans,
            &which,
            publishing_interval,
            &mut out,
        )
        .await?;
    }
    Ok(out)
}

async fn monitor_in(
    session: &Session,
    subscription_id: u32,
    plans: &[TagPlan],
    which: &[(TagIndex, NodeId)],
    publishing_interval: Duration,
    out: &mut Monitored,
) -> Result<(), SourceError> {
    for chunk in which.chunks(MONITORED_ITEMS_CHUNK) {
        let requests = chunk
            .iter()
            .map(|(i, node)| item_request(*i, node.clone(), &plans[i.get()], publishing_interval))
            .collect();
        let results = session
            .create_monitored_items(subscription_id, TimestampsToReturn::Both, requests)
            .await
            .map_err(|e| SourceError::from_ua(e, "CreateMonitoredItems"))?;
        for ((i, _), created) in chunk.iter().zip(results.iter()) {
            let status = created.result.status_code;
            if status.is_bad() {
                out.refused.push((*i, status));
            } else {
                let id = created.result.monitored_item_id;
                out.created.push((
                    *i,
                    Item {
                        subscription: subscription_id,
                        id,
                    },
                ));
            }
        }
        if results.len() < chunk.len() {
            for (i, _) in &chunk[results.len()..] {
                out.refused.push((*i, StatusCode::BadUnexpectedError));
            }
        }
    }
    Ok(())
}

/// Removes the monitored items of tags whose node went away. Best effort:
/// the server may already have dropped them.
pub(crate) async fn unmonitor(session: &Session, item: Item) {
    match tokio::time::timeout(
        REQUEST_TIMEOUT,
        session.delete_monitored_items(item.subscription, &[item.id]),
    )
    .await
    {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => tracing::debug!(error = %e, "DeleteMonitoredItems failed"),
        Err(_) => tracing::debug!("DeleteMonitoredItems timed out"),
    }
}

/// Removes the monitored items `ids` of one subscription (tags a reload
/// retired). Best effort: a failure leaves items whose values the
/// callback ignores.
pub(crate) async fn unmonitor_all(session: &Session, subscription: u32, ids: &[u32]) {
    for chunk in ids.chunks(MONITORED_ITEMS_CHUNK) {
        match tokio::time::timeout(
            REQUEST_TIMEOUT,
            session.delete_monitored_items(subscription, chunk),
        )
        .await
        {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "DeleteMonitoredItems failed; the retired tags' values are ignored")
            }
            Err(_) => tracing::warn!(
                "DeleteMonitoredItems timed out; the retired tags' values are ignored"
            ),
        }
    }
}

pub(crate) async fn read_namespaces(session: &Session) -> Result<NamespaceMap, SourceError> {
    tokio::time::timeout(REQUEST_TIMEOUT, session.read_namespace_array())
        .await
        .map_err(|_| SourceError::ua(StatusCode::BadTimeout, "reading NamespaceArray timed out"))?
        .map_err(|e| SourceError::from_ua(e, "reading NamespaceArray"))
}

pub(crate) fn bad_records(
    connection: &str,
    plans: &[TagPlan],
    bad: &[(TagIndex, StatusCode)],
) -> Vec<NewRecord> {
    // A profile node is not a tag: its outage shows in the system.error
    // event and in the profile's own records, not as a `tag` record.
    bad.iter()
        .filter(|(i, _)| plans[i.get()].profile.is_none())
        .map(|(i, status)| bad_tag_record(connection, &plans[i.get()].meta, *status))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use opcua::types::UserTokenPolicy;

    fn endpoint(mode: MessageSecurityMode, token_policy: Option<&str>) -> EndpointDescription {
        EndpointDescription {
            security_mode: mode,
            user_identity_tokens: token_policy.map(|uri| {
                vec![UserTokenPolicy {
                    policy_id: "username".into(),
                    token_type: UserTokenType::UserName,
                    security_policy_uri: uri.into(),
                    ..Default::default()
                }]
            }),
            ..Default::default()
        }
    }

    #[test]
    fn cleartext_only_without_channel_or_token_encryption() {
        let none = UaPolicy::None.to_uri();
        let rsa = UaPolicy::Basic256Sha256.to_uri();
        let m = MessageSecurityMode::None;
        // Empty URI: the channel's policy, here None.
        assert!(password_in_cleartext(&endpoint(m, Some(""))));
        assert!(password_in_cleartext(&endpoint(m, Some(none))));
        // The token policy encrypts the password on a None channel.
        assert!(!password_in_cleartext(&endpoint(m, Some(rsa))));
        // The channel encrypts (or the token is encrypted for the channel's policy).
        assert!(!password_in_cleartext(&endpoint(
            MessageSecurityMode::SignAndEncrypt,
            Some(none)
        )));
        assert!(!password_in_cleartext(&endpoint(
            MessageSecurityMode::Sign,
            Some("")
        )));
        // No UserName policy: no password is ever sent.
        assert!(!password_in_cleartext(&endpoint(m, None)));
    }

    #[test]
    fn size_failures_name_the_decoder_limits() {
        for status in [
            StatusCode::BadDecodingError,
            StatusCode::BadEncodingLimitsExceeded,
            StatusCode::BadTcpMessageTooLarge,
        ] {
            let reason = SourceError::ua(status, "connection lost").reason();
            assert!(reason.starts_with(&value_status(status)), "{reason}");
            assert!(reason.contains("16 MiB per message"), "{reason}");
        }
        assert_eq!(
            SourceError::ua(StatusCode::BadConnectionClosed, "x").reason(),
            "BadConnectionClosed"
        );
        assert!(response_too_large(StatusCode::BadResponseTooLarge));
        assert!(!response_too_large(StatusCode::BadTimeout));
    }

    fn value_status(status: StatusCode) -> String {
        super::super::value::status_name(status)
    }

    #[test]
    fn changed_certificate_is_untrusted_with_both_thumbprints() {
        let e = SourceError::CertificateChanged {
            endpoint: "opc.tcp://h:4840/".into(),
            pinned: "aa11".into(),
            presented: "bb22".into(),
        };
        assert_eq!(e.status(), Some(StatusCode::BadCertificateUntrusted));
        let reason = e.reason();
        assert!(
            reason.contains("aa11") && reason.contains("bb22"),
            "{reason}"
        );
    }
}
