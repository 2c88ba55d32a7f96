//! A minimal OPC UA client for the simulators' own end-to-end tests: no
//! security, anonymous, one subscription that reports every change of the
//! given string-id nodes with its source timestamp. Independent of the
//! agent's source module on purpose: these tests check the simulator, not
//! the agent.

use std::sync::Arc;
use std::time::Duration;

use opcua::client::{ClientBuilder, DataChangeCallback, IdentityToken, MonitoredItem, Session};
use opcua::crypto::SecurityPolicy;
use opcua::types::{
    DataValue, Identifier, MessageSecurityMode, MonitoredItemCreateRequest, MonitoringMode,
    MonitoringParameters, NodeId, ReadValueId, StatusCode, TimestampsToReturn, UserTokenPolicy,
    Variant,
};
use tokio::sync::mpsc;

/// One reported change.
#[derive(Clone, Debug)]
pub(crate) struct Change {
    /// String identifier of the node (`REACTOR_101/BATCH_ID.CV`).
    pub node: String,
    pub value: Variant,
    pub source_ts_ms: i64,
}

impl Change {
    /// A data change as the subscription callback hands it over; the node is
    /// named by its string identifier, as the tests address it.
    fn from_notification(dv: DataValue, item: &MonitoredItem) -> Change {
        let node = match &item.item_to_monitor().node_id.identifier {
            Identifier::String(s) => s.as_ref().to_string(),
            other => other.to_string(),
        };
        let source_ts_ms = dv
            .source_timestamp
            .map(|t| t.as_chrono().timestamp_millis())
            .unwrap_or(0);
        Change {
            node,
            value: dv.value.unwrap_or(Variant::Empty),
            source_ts_ms,
        }
    }

    pub(crate) fn text(&self) -> Option<&str> {
        match &self.value {
            Variant::String(s) => s.value().as_deref(),
            _ => None,
        }
    }
}

pub(crate) struct TestClient {
    pub session: Arc<Session>,
    pub changes: mpsc::UnboundedReceiver<Change>,
    event_loop: tokio::task::JoinHandle<StatusCode>,
    _pki: tempfile::TempDir,
}

impl TestClient {
    /// Connects to `endpoint` and subscribes to `nodes` (string ids in
    /// namespace `ns`), sampling interval 0 and a deep queue so no change is
    /// merged on the way.
    pub(crate) async fn connect(endpoint: &str, ns: u16, nodes: &[String]) -> TestClient {
        let pki = tempfile::tempdir().expect("temp dir");
        let (session, event_loop) = open_session(endpoint, pki.path()).await;
        let (tx, changes) = mpsc::unbounded_channel();
        let sub = session
            .create_subscription(
                Duration::from_millis(50),
                300,
                100,
                0,
                0,
                true,
                DataChangeCallback::new(move |dv, item| {
                    let _ = tx.send(Change::from_notification(dv, item));
                }),
            )
            .await
            .expect("subscription");
        monitor(&session, sub, ns, nodes).await;
        TestClient {
            session,
            changes,
            event_loop,
            _pki: pki,
        }
    }

    /// Next change, or None after `wait`.
    pub(crate) async fn next(&mut self, wait: Duration) -> Option<Change> {
        tokio::time::timeout(wait, self.changes.recv())
            .await
            .ok()
            .flatten()
    }

    pub(crate) async fn close(self) {
        let _ = tokio::time::timeout(Duration::from_secs(5), self.session.disconnect()).await;
        self.event_loop.abort();
    }
}

/// An anonymous session without security, connected (or the test fails
/// within 20 s), its event loop running.
pub(crate) async fn open_session(
    endpoint: &str,
    pki_dir: &std::path::Path,
) -> (Arc<Session>, tokio::task::JoinHandle<StatusCode>) {
    let mut client = ClientBuilder::new()
        .application_name("plantgate sim test")
        .application_uri("urn:plantgate:sim:test")
        .pki_dir(pki_dir)
        // No security: no key pair needed (and none generated: slow).
        .create_sample_keypair(false)
        .trust_server_certs(true)
        .session_retry_limit(0)
        .client()
        .expect("client config");
    let (session, event_loop) = client
        .connect_to_matching_endpoint(
            (
                endpoint,
                SecurityPolicy::None.to_str(),
                MessageSecurityMode::None,
                UserTokenPolicy::anonymous(),
            ),
            IdentityToken::Anonymous,
        )
        .await
        .expect("session");
    let event_loop = event_loop.spawn();
    assert!(
        tokio::time::timeout(Duration::from_secs(20), session.wait_for_connection())
            .await
            .expect("connects in time"),
        "connected"
    );
    (session, event_loop)
}

/// Monitors every node of `nodes` in subscription `sub`; each must be
/// accepted.
async fn monitor(session: &Session, sub: u32, ns: u16, nodes: &[String]) {
    let items = nodes
        .iter()
        .map(|n| {
            MonitoredItemCreateRequest::new(
                ReadValueId::from(NodeId::new(ns, n.as_str())),
                MonitoringMode::Reporting,
                MonitoringParameters {
                    sampling_interval: 0.0,
                    queue_size: 10_000,
                    discard_oldest: false,
                    ..Default::default()
                },
            )
        })
        .collect();
    let created = session
        .create_monitored_items(sub, TimestampsToReturn::Both, items)
        .await
        .expect("monitored items");
    for (n, c) in nodes.iter().zip(&created) {
        assert!(
            c.result.status_code.is_good(),
            "{n}: {}",
            c.result.status_code
        );
    }
}
