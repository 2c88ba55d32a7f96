//! One OPC UA session of a connection, from endpoint discovery to a running
//! subscription. Everything here is a single attempt; retrying is the
//! caller's job (`source::run_connection`).

use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
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
    StatusChangeNotification, StatusCode, TimestampsToReturn, UserTokenType,
};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::pki::OwnCertificate;
use super::value::{bad_tag_record, tag_record, value_ts_ms, variant_to_json, TagMeta};
use crate::config::{ConnectionConfig, SecurityMode, SecurityPolicy, TagConfig};
use crate::nodeid::{Identifier, Namespace, NodeRef};
use crate::profile::{NodeKey, Sample};
use crate::record::NewRecord;

/// Per-request timeout; also bounds endpoint discovery and connecting.
pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Servers reject CreateMonitoredItems calls above their per-call limit
/// (1000 is a common default).
const MONITORED_ITEMS_CHUNK: usize = 1000;
/// Publishing intervals without data after which the server sends a keep-alive.
pub(crate) const KEEP_ALIVE_COUNT: u32 = 10;

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
            _ => None,
        }
    }

    /// What the status board and the retained status message show: the
    /// status code name where there is one, else the message.
    pub fn reason(&self) -> String {
        match self {
            SourceError::Ua { status, .. } => super::value::status_name(*status),
            // Stable text: a changing duration would make every retry a
            // "new" reason.
            SourceError::Silent(_) => "subscription silent".to_string(),
            other => other.to_string(),
        }
    }
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
        .trust_server_certs(conn.trust_unknown_server_cert)
        .verify_server_certs(true)
        // The library's own retry loop would reconnect forever even on
        // rejected credentials; we retry ourselves with our backoff.
        .session_retry_limit(0)
        .session_name(format!("plantgate {}", conn.id))
        .session_timeout(60_000)
        .request_timeout(REQUEST_TIMEOUT)
        .keep_alive_interval(Duration::from_secs(5))
        // Defaults (1000 array elements) drop the connection on a large
        // publish response.
        .max_array_length(1_000_000)
        .max_message_size(256 * 1024 * 1024)
        .max_chunk_count(4096)
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
    status.is_bad()
        && matches!(
            super::value::status_name(status).as_str(),
            "BadNodeIdUnknown" | "BadNodeIdInvalid"
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
    NodeGone(usize, StatusCode),
}

/// Drives the session event loop on its own task. It stops at the first
/// failure to connect or loss of connection: reconnecting is ours to do (a
/// fresh session re-resolves namespaces and re-creates everything).
pub(crate) fn spawn_event_loop(
    event_loop: opcua::client::SessionEventLoop<opcua::client::transport::TcpConnector>,
    events: mpsc::UnboundedSender<LoopEvent>,
    last_publish: Arc<PublishClock>,
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
    pub meta: TagMeta,
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
            meta: TagMeta {
                name: n.node.clone(),
                node: n.node.clone(),
            },
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
            meta: TagMeta {
                name: t.name.clone(),
                node: t.node.clone(),
            },
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

/// What the session side hands to the connection's driver task, in order.
pub(crate) enum Feed {
    /// One publish response: tag records and the profile's samples.
    Publish {
        records: Vec<NewRecord>,
        samples: Vec<Sample>,
    },
    /// A session is up; reads for the profile go to it. Sent before any
    /// monitored item exists, so it precedes the session's first publish.
    Connected {
        session: Arc<Session>,
        /// The profile's nodes as resolved on this session.
        nodes: std::collections::HashMap<NodeKey, NodeId>,
        at_ms: i64,
    },
    /// Profile nodes that resolved on a later retry of this session.
    Resolved(Vec<(NodeKey, NodeId)>),
    /// The session was lost (not sent on shutdown).
    Disconnected { at_ms: i64 },
    /// The connection task is stopping: the driver saves and ends. Needed
    /// because the driver may hold the session, whose subscription holds a
    /// sender of this very channel, so the channel alone never closes.
    Stop,
}

impl Feed {
    pub(crate) fn records(records: Vec<NewRecord>) -> Feed {
        Feed::Publish {
            records,
            samples: Vec::new(),
        }
    }
}

/// The subscription callback. Runs on the OPC UA event loop, so it only
/// converts and hands over: one message per publish response into the
/// intake queue, which never blocks the loop and counts what it cannot take.
pub(crate) struct Notifier {
    pub connection: Arc<str>,
    pub tags: Arc<Vec<TagMeta>>,
    /// Per plan index: the profile node it is, if any.
    pub profile: Arc<Vec<Option<NodeKey>>>,
    pub records: super::intake::FeedTx,
    pub events: mpsc::UnboundedSender<LoopEvent>,
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
        for obj in data {
            if obj.inner_is::<DataChangeNotification>() {
                let Some(change) = obj.into_inner_as::<DataChangeNotification>() else {
                    continue;
                };
                for item in change.monitored_items.into_iter().flatten() {
                    // Client handles are tag index + 1 (see `monitor_tags`).
                    let Some((index, tag)) = (item.client_handle as usize)
                        .checked_sub(1)
                        .and_then(|i| self.tags.get(i).map(|t| (i, t)))
                    else {
                        continue;
                    };
                    let status = item.value.status();
                    if status.overflow() {
                        self.records.server_overflow(&tag.name);
                    }
                    match self.profile.get(index).copied().flatten() {
                        Some(key) => samples.push(Sample {
                            key,
                            value: item
                                .value
                                .value
                                .as_ref()
                                .map(variant_to_json)
                                .unwrap_or(serde_json::Value::Null),
                            good: status.is_good(),
                            ts_ms: value_ts_ms(&item.value),
                        }),
                        None => out.push(tag_record(&self.connection, tag, &item.value)),
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
            });
        }
    }
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

fn item_request(
    index: usize,
    node: NodeId,
    plan: &TagPlan,
    publishing_interval: Duration,
) -> MonitoredItemCreateRequest {
    let sampling_ms = plan.sampling.as_secs_f64() * 1000.0;
    // With publishing slower than sampling, the server must keep every sample
    // of the interval or values are silently discarded.
    let ratio = publishing_interval.as_secs_f64() * 1000.0 / sampling_ms.max(1.0);
    let queue_size = (ratio.ceil() as u32).clamp(1, 10_000) + 1;
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
            client_handle: (index + 1) as u32,
            sampling_interval: sampling_ms,
            filter,
            queue_size,
            discard_oldest: true,
        },
    }
}

/// Result of `monitor_tags`: the monitored item ids of the created items and
/// the tags the server refused, with its status (for bad records and retry).
#[derive(Default)]
pub(crate) struct Monitored {
    pub created: Vec<(usize, u32)>,
    pub refused: Vec<(usize, StatusCode)>,
}

/// Creates monitored items for `which` (indexes into `plans`).
pub(crate) async fn monitor_tags(
    session: &Session,
    subscription_id: u32,
    plans: &[TagPlan],
    which: &[(usize, NodeId)],
    publishing_interval: Duration,
) -> Result<Monitored, SourceError> {
    let mut out = Monitored::default();
    for chunk in which.chunks(MONITORED_ITEMS_CHUNK) {
        let requests = chunk
            .iter()
            .map(|(i, node)| item_request(*i, node.clone(), &plans[*i], publishing_interval))
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
                out.created.push((*i, created.result.monitored_item_id));
            }
        }
        if results.len() < chunk.len() {
            for (i, _) in &chunk[results.len()..] {
                out.refused.push((*i, StatusCode::BadUnexpectedError));
            }
        }
    }
    Ok(out)
}

/// Removes the monitored items of tags whose node went away. Best effort:
/// the server may already have dropped them.
pub(crate) async fn unmonitor(session: &Session, subscription_id: u32, item_ids: &[u32]) {
    if item_ids.is_empty() {
        return;
    }
    match tokio::time::timeout(
        REQUEST_TIMEOUT,
        session.delete_monitored_items(subscription_id, item_ids),
    )
    .await
    {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => tracing::debug!(error = %e, "DeleteMonitoredItems failed"),
        Err(_) => tracing::debug!("DeleteMonitoredItems timed out"),
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
    bad: &[(usize, StatusCode)],
) -> Vec<NewRecord> {
    // A profile node is not a tag: its outage shows in the system.error
    // event and in the profile's own records, not as a `tag` record.
    bad.iter()
        .filter(|(i, _)| plans[*i].profile.is_none())
        .map(|(i, status)| bad_tag_record(connection, &plans[*i].meta, *status))
        .collect()
}
