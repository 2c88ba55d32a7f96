//! Client against the in-process DeltaV simulator: real sockets, real
//! sessions. No fixed sleeps: every wait is on a condition with a timeout.

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::*;
use crate::config::{
    Backfill, ProfileConfig, SecurityMode, SecurityPolicy, TagConfig, SECURITY_PAIRS,
};
use crate::record::{Kind, NewRecord};
use crate::secret::Secret;
use crate::sim::{start_deltav, SimOptions, SimServer};
use crate::status::StatusBoard;
use live::{keep_alive_window, MAX_KEEP_ALIVE};

const NS: &str = "urn:plantgate:sim:deltav";
const WAIT: Duration = Duration::from_secs(30);

fn tag(name: &str, node: &str) -> TagConfig {
    TagConfig {
        name: name.into(),
        node: node.into(),
        sampling_interval: None,
        deadband: None,
    }
}

fn conn_config(id: &str, endpoint: &str, tags: Vec<TagConfig>) -> ConnectionConfig {
    ConnectionConfig {
        id: id.into(),
        endpoint: endpoint.into(),
        security_policy: SecurityPolicy::None,
        security_mode: SecurityMode::None,
        username: None,
        password: None,
        trust_unknown_server_cert: false,
        publishing_interval: Duration::from_millis(100),
        sampling_interval: Duration::from_millis(50),
        reconnect_initial: Duration::from_millis(100),
        reconnect_max: Duration::from_millis(500),
        events: vec![
            crate::record::EventType::ConnectionStatusChanged,
            crate::record::EventType::ConnectionAuthRequired,
            crate::record::EventType::SystemError,
        ],
        backfill: Backfill::Off,
        backfill_max: Duration::from_secs(3600),
        tags,
        profile: ProfileConfig::Generic,
    }
}

/// `RUST_LOG=debug cargo test ...` shows the library's and our logs.
fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// RSA key generation takes seconds in a debug build: make one server and
/// one client key pair per test run and copy them into each test's PKI.
static KEYS: tokio::sync::OnceCell<tempfile::TempDir> = tokio::sync::OnceCell::const_new();

async fn keys() -> &'static std::path::Path {
    KEYS.get_or_init(|| async {
        let dir = tempfile::tempdir().unwrap();
        start_deltav(
            SimOptions::new(dir.path().join("server")),
            crate::sim::SimExtras::default(),
        )
        .await
        .unwrap()
        .shutdown()
        .await;
        let conn = conn_config("keys", "opc.tcp://127.0.0.1:1/", vec![]);
        session::build_client(&conn, &dir.path().join("client")).unwrap();
        dir
    })
    .await
    .path()
}

async fn copy_keys(which: &str, to: &std::path::Path) {
    let from = keys().await.join(which);
    // The client keeps its key in own/, the simulator (library default) in
    // private/.
    for sub in ["own", "private"] {
        if !from.join(sub).exists() {
            continue;
        }
        std::fs::create_dir_all(to.join(sub)).unwrap();
        for entry in std::fs::read_dir(from.join(sub)).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), to.join(sub).join(entry.file_name())).unwrap();
        }
    }
}

/// A fresh client PKI directory holding the shared client key pair.
async fn client_pki(dir: &std::path::Path) -> std::path::PathBuf {
    let pki = dir.join("pki");
    copy_keys("client", &pki).await;
    pki
}

async fn sim(dir: &std::path::Path, f: impl FnOnce(&mut SimOptions)) -> SimServer {
    init_tracing();
    copy_keys("server", &dir.join("server-pki")).await;
    let mut opts = SimOptions::new(dir.join("server-pki"));
    // Frozen process: only the test changes values.
    opts.speed = 0.0;
    f(&mut opts);
    start_deltav(opts, crate::sim::SimExtras::default())
        .await
        .expect("simulator starts")
}

/// Records a test's own queue holds: the test reads it as it waits, so
/// this only bounds memory.
const TEST_QUEUE: usize = 1_000_000;

struct Harness {
    id: String,
    board: Arc<StatusBoard>,
    rx: mpsc::UnboundedReceiver<crate::buffer::Submission>,
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    /// What a reload sends the running connection.
    config: tokio::sync::watch::Sender<ConnectionConfig>,
}

impl Harness {
    fn start(conn: ConnectionConfig, pki: std::path::PathBuf) -> Harness {
        let board = StatusBoard::new();
        let (tx, rx) = crate::buffer::Outlet::queue(TEST_QUEUE);
        let reporter = ConnectionReporter::new(&conn.id, board.clone(), tx, conn.events.clone());
        let cancel = CancellationToken::new();
        let id = conn.id.clone();
        let (config, updates) = tokio::sync::watch::channel(conn);
        let task = tokio::spawn(run_connection(
            updates,
            pki,
            reporter,
            Default::default(),
            cancel.clone(),
        ));
        Harness {
            id,
            board,
            rx,
            cancel,
            task,
            config,
        }
    }

    fn state(&self) -> (ConnState, String) {
        self.board
            .connections()
            .into_iter()
            .find(|(id, _)| *id == self.id)
            .map(|(_, s)| (s.state, s.reason))
            .expect("connection registered")
    }

    /// Waits for a state; records arriving meanwhile are kept in `seen`.
    async fn wait_state(&mut self, want: ConnState, seen: &mut Vec<NewRecord>) {
        let deadline = tokio::time::Instant::now() + WAIT;
        let mut changes = self.board.subscribe();
        loop {
            if self.state().0 == want {
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => {
                    panic!("timed out waiting for {want:?}; state is {:?}", self.state())
                }
                _ = changes.changed() => {}
                Some(batch) = self.rx.recv() => seen.extend(batch),
            }
        }
    }

    /// Waits for a tag record matching `pred` (checking `seen` first).
    async fn wait_tag(
        &mut self,
        seen: &mut Vec<NewRecord>,
        what: &str,
        pred: impl Fn(&Value) -> bool,
    ) -> NewRecord {
        self.wait_record(seen, what, Kind::Tag, pred).await
    }

    /// Waits for an event record of `event_type` whose details match `pred`.
    async fn wait_event(
        &mut self,
        seen: &mut Vec<NewRecord>,
        event_type: &str,
        pred: impl Fn(&Value) -> bool,
    ) -> NewRecord {
        self.wait_record(seen, event_type, Kind::Event, |d| {
            d["type"] == event_type && pred(&d["details"])
        })
        .await
    }

    async fn wait_record(
        &mut self,
        seen: &mut Vec<NewRecord>,
        what: &str,
        kind: Kind,
        pred: impl Fn(&Value) -> bool,
    ) -> NewRecord {
        if let Some(r) = seen.iter().find(|r| r.kind == kind && pred(&r.data_json())) {
            return r.clone();
        }
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let batch = tokio::time::timeout_at(deadline, self.rx.recv())
                .await
                .unwrap_or_else(|_| {
                    panic!("timed out waiting for {what}; state {:?}", self.state())
                })
                .expect("record channel open");
            let hit = batch
                .records
                .iter()
                .find(|r| r.kind == kind && pred(&r.data_json()))
                .cloned();
            seen.extend(batch);
            if let Some(r) = hit {
                return r;
            }
        }
    }

    async fn stop(self) {
        self.cancel.cancel();
        tokio::time::timeout(WAIT, self.task)
            .await
            .expect("connection task stops")
            .expect("connection task does not panic");
    }
}

fn is_value(name: &str, v: f64) -> impl Fn(&Value) -> bool + '_ {
    move |d: &Value| d["name"] == name && d["value"].as_f64() == Some(v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribes_with_nsu_and_ns_forms() {
    let dir = tempfile::tempdir().unwrap();
    let server = sim(dir.path(), |_| {}).await;
    let ns = server.namespace_index();
    let conn = conn_config(
        "dv1",
        &server.endpoint(),
        vec![
            tag("FIC-101.PV", &format!("nsu={NS};s=FIC-101/PV.CV")),
            tag("FIC-101.SP", &format!("nsu={NS};s=FIC-101/SP.CV")),
            tag("TIC-201.PV", &format!("nsu={NS};s=TIC-201/PV.CV")),
            tag("LIC-301.PV", &format!("ns={ns};s=LIC-301/PV.CV")),
        ],
    );
    let mut h = Harness::start(conn, client_pki(dir.path()).await);
    let mut seen = Vec::new();
    h.wait_state(ConnState::Online, &mut seen).await;

    server.set_value("FIC-101/PV.CV", 11.5);
    server.set_value("FIC-101/SP.CV", 22.5);
    server.set_value("TIC-201/PV.CV", 33.5);
    server.set_value("LIC-301/PV.CV", 44.5);
    for (name, node, v) in [
        ("FIC-101.PV", format!("nsu={NS};s=FIC-101/PV.CV"), 11.5),
        ("FIC-101.SP", format!("nsu={NS};s=FIC-101/SP.CV"), 22.5),
        ("TIC-201.PV", format!("nsu={NS};s=TIC-201/PV.CV"), 33.5),
        ("LIC-301.PV", format!("ns={ns};s=LIC-301/PV.CV"), 44.5),
    ] {
        let r = h.wait_tag(&mut seen, name, is_value(name, v)).await;
        assert_eq!(r.connection, "dv1");
        assert_eq!(r.data_json()["node"], node.as_str());
        assert_eq!(r.data_json()["quality"], "good");
        assert_eq!(r.data_json()["status"], "Good");
        // Source timestamp of the simulator: recent wall-clock time.
        assert!((crate::record::now_ms() - r.ts_ms).abs() < 60_000);
    }
    // The state change was also emitted as an event record.
    assert!(seen.iter().any(|r| r.kind == Kind::Event
        && r.data_json()["type"] == "connection.status_changed"
        && r.data_json()["details"]["state"] == "online"));
    h.stop().await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_node_is_bad_and_others_flow() {
    let dir = tempfile::tempdir().unwrap();
    let server = sim(dir.path(), |_| {}).await;
    let conn = conn_config(
        "dv2",
        &server.endpoint(),
        vec![
            tag("MISSING", &format!("nsu={NS};s=NOPE/PV.CV")),
            tag("BADNS", "nsu=urn:nowhere;s=X"),
            tag("FIC-101.PV", &format!("nsu={NS};s=FIC-101/PV.CV")),
        ],
    );
    let mut h = Harness::start(conn, client_pki(dir.path()).await);
    let mut seen = Vec::new();
    h.wait_state(ConnState::Online, &mut seen).await;
    for name in ["MISSING", "BADNS"] {
        let r = h.wait_tag(&mut seen, name, |d| d["name"] == name).await;
        assert_eq!(r.data_json()["quality"], "bad");
        assert_eq!(r.data_json()["status"], "BadNodeIdUnknown");
        assert_eq!(r.data_json()["value"], Value::Null);
    }
    server.set_value("FIC-101/PV.CV", 7.25);
    h.wait_tag(&mut seen, "FIC-101.PV", is_value("FIC-101.PV", 7.25))
        .await;
    assert_eq!(h.state().0, ConnState::Online);
    h.stop().await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnects_after_server_restart() {
    let dir = tempfile::tempdir().unwrap();
    let server = sim(dir.path(), |_| {}).await;
    let listen: std::net::SocketAddr = server
        .endpoint()
        .trim_start_matches("opc.tcp://")
        .trim_end_matches('/')
        .parse()
        .unwrap();
    let conn = conn_config(
        "dv3",
        &server.endpoint(),
        vec![tag("FIC-101.PV", &format!("nsu={NS};s=FIC-101/PV.CV"))],
    );
    let mut h = Harness::start(conn, client_pki(dir.path()).await);
    let mut seen = Vec::new();
    h.wait_state(ConnState::Online, &mut seen).await;
    server.set_value("FIC-101/PV.CV", 1.25);
    h.wait_tag(&mut seen, "first value", is_value("FIC-101.PV", 1.25))
        .await;

    server.shutdown().await;
    h.wait_state(ConnState::Offline, &mut seen).await;

    let server = sim(dir.path(), |o| o.listen = listen).await;
    h.wait_state(ConnState::Online, &mut seen).await;
    server.set_value("FIC-101/PV.CV", 2.5);
    h.wait_tag(
        &mut seen,
        "value after restart",
        is_value("FIC-101.PV", 2.5),
    )
    .await;
    h.stop().await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_is_auth_required_right_one_works() {
    let dir = tempfile::tempdir().unwrap();
    let server = sim(dir.path(), |o| {
        o.user = Some(("operator".into(), "s3cret".into()))
    })
    .await;
    let tags = vec![tag("FIC-101.PV", &format!("nsu={NS};s=FIC-101/PV.CV"))];

    let mut conn = conn_config("dv4", &server.endpoint(), tags.clone());
    conn.username = Some("operator".into());
    conn.password = Some(Secret::new("wrong"));
    let mut h = Harness::start(conn, client_pki(dir.path()).await);
    let mut seen = Vec::new();
    h.wait_state(ConnState::AuthRequired, &mut seen).await;
    let (_, reason) = h.state();
    assert!(
        reason == "BadIdentityTokenRejected" || reason == "BadUserAccessDenied",
        "{reason}"
    );
    h.stop().await;

    let mut conn = conn_config("dv4ok", &server.endpoint(), tags);
    conn.username = Some("operator".into());
    conn.password = Some(Secret::new("s3cret"));
    let mut h = Harness::start(conn, client_pki(dir.path()).await);
    let mut seen = Vec::new();
    h.wait_state(ConnState::Online, &mut seen).await;
    server.set_value("FIC-101/PV.CV", 3.0);
    h.wait_tag(&mut seen, "value", is_value("FIC-101.PV", 3.0))
        .await;
    h.stop().await;
    server.shutdown().await;
}

/// Every policy/mode pair of docs/configuration.md against the simulator, with a
/// username/password identity (the token travels inside the secured channel).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_policy_and_mode_pair_with_password() {
    let dir = tempfile::tempdir().unwrap();
    let server = sim(dir.path(), |o| {
        o.user = Some(("operator".into(), "s3cret".into()))
    })
    .await;
    let pki = client_pki(dir.path()).await;
    for (n, (policy, mode)) in SECURITY_PAIRS.into_iter().enumerate() {
        let mut conn = conn_config(
            &format!("pair{n}"),
            &server.endpoint(),
            vec![tag("FIC-101.PV", &format!("nsu={NS};s=FIC-101/PV.CV"))],
        );
        conn.security_policy = policy;
        conn.security_mode = mode;
        conn.username = Some("operator".into());
        conn.password = Some(Secret::new("s3cret"));
        // Trust on first use: the first secured pair stores the certificate.
        conn.trust_unknown_server_cert = true;
        let mut h = Harness::start(conn, pki.clone());
        let mut seen = Vec::new();
        h.wait_state(ConnState::Online, &mut seen).await;
        let v = 100.0 + n as f64;
        server.set_value("FIC-101/PV.CV", v);
        h.wait_tag(
            &mut seen,
            &format!("{policy:?}/{mode:?}"),
            is_value("FIC-101.PV", v),
        )
        .await;
        h.stop().await;
        eprintln!("verified {policy:?}/{mode:?} with username/password");
    }
    server.shutdown().await;
    let trusted = std::fs::read_dir(pki.join("trusted")).unwrap().count();
    assert_eq!(trusted, 1, "the server certificate was trusted once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_endpoint_names_policy_mode_and_offer() {
    use opcua::crypto::SecurityPolicy as P;
    use opcua::types::MessageSecurityMode as M;
    let dir = tempfile::tempdir().unwrap();
    copy_keys("server", &dir.path().join("server-pki")).await;
    let mut opts = SimOptions::new(dir.path().join("server-pki"));
    opts.speed = 0.0;
    let extras = crate::sim::SimExtras {
        endpoints: Some(vec![(P::None, M::None), (P::Basic256Sha256, M::Sign)]),
        ..Default::default()
    };
    let server = crate::sim::start_deltav(opts, extras).await.unwrap();
    let mut conn = conn_config(
        "noep",
        &server.endpoint(),
        vec![tag("FIC-101.PV", &format!("nsu={NS};s=FIC-101/PV.CV"))],
    );
    conn.security_policy = SecurityPolicy::Aes256Sha256RsaPss;
    conn.security_mode = SecurityMode::SignAndEncrypt;
    let mut h = Harness::start(conn, client_pki(dir.path()).await);
    let mut seen = Vec::new();
    h.wait_state(ConnState::Offline, &mut seen).await;
    let (_, reason) = h.state();
    assert!(
        reason.contains("Aes256Sha256RsaPss")
            && reason.contains("SignAndEncrypt")
            && reason.contains("None/None")
            && reason.contains("Basic256Sha256/Sign"),
        "{reason}"
    );
    let ev = h
        .wait_event(&mut seen, "connection.status_changed", |d| {
            d["state"] == "offline"
        })
        .await;
    assert_eq!(ev.data_json()["details"]["reason"], reason.as_str());
    h.stop().await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_server_cert_is_untrusted_and_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let server = sim(dir.path(), |_| {}).await;
    let mut conn = conn_config(
        "dv6",
        &server.endpoint(),
        vec![tag("FIC-101.PV", &format!("nsu={NS};s=FIC-101/PV.CV"))],
    );
    conn.security_policy = SecurityPolicy::Basic256Sha256;
    conn.security_mode = SecurityMode::SignAndEncrypt;
    let pki = client_pki(dir.path()).await;
    let mut h = Harness::start(conn, pki.clone());
    let mut seen = Vec::new();
    h.wait_state(ConnState::Untrusted, &mut seen).await;
    h.wait_event(&mut seen, "connection.status_changed", |d| {
        d["state"] == "untrusted" && d["previous"] == "connecting"
    })
    .await;
    let rejected: Vec<_> = std::fs::read_dir(pki.join("rejected"))
        .unwrap()
        .map(|e| e.unwrap())
        .collect();
    assert_eq!(rejected.len(), 1);

    // The operator's fix: move the certificate to trusted/. The running
    // connection picks it up at its next attempt.
    let file = &rejected[0];
    std::fs::rename(file.path(), pki.join("trusted").join(file.file_name())).unwrap();
    h.wait_state(ConnState::Online, &mut seen).await;
    server.set_value("FIC-101/PV.CV", 8.5);
    h.wait_tag(&mut seen, "value once trusted", is_value("FIC-101.PV", 8.5))
        .await;
    h.stop().await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulated_process_values_change() {
    let dir = tempfile::tempdir().unwrap();
    let server = sim(dir.path(), |o| {
        o.speed = 20.0;
        o.tags = 50;
        o.rate_hz = 10.0;
    })
    .await;
    let conn = conn_config(
        "dv7",
        &server.endpoint(),
        vec![
            tag("FIC-101.PV", &format!("nsu={NS};s=FIC-101/PV.CV")),
            tag("LOAD7", &format!("nsu={NS};s=LOAD/TAG00007.CV")),
        ],
    );
    let mut h = Harness::start(conn, client_pki(dir.path()).await);
    let mut seen = Vec::new();
    h.wait_state(ConnState::Online, &mut seen).await;
    for name in ["FIC-101.PV", "LOAD7"] {
        let first = h
            .wait_tag(&mut seen, name, |d| d["name"] == name)
            .await
            .data_json()["value"]
            .clone();
        h.wait_tag(&mut seen, "a changed value", |d| {
            d["name"] == name && d["value"] != first
        })
        .await;
    }
    h.stop().await;
    server.shutdown().await;
}

#[test]
fn failures_map_to_states() {
    assert_eq!(
        classify_status(StatusCode::BadIdentityTokenRejected),
        ConnState::AuthRequired
    );
    assert_eq!(
        classify_status(StatusCode::BadUserAccessDenied),
        ConnState::AuthRequired
    );
    assert_eq!(
        classify_status(StatusCode::BadCertificateUntrusted),
        ConnState::Untrusted
    );
    assert_eq!(
        classify_status(StatusCode::BadConnectionClosed),
        ConnState::Offline
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_subscription_stays_online() {
    // Keep-alives (every 10 publishing intervals = 1 s here) must satisfy the
    // silent-subscription watchdog (limit 3 keep-alives + 1 s).
    let dir = tempfile::tempdir().unwrap();
    let server = sim(dir.path(), |_| {}).await;
    let conn = conn_config(
        "dv8",
        &server.endpoint(),
        vec![tag("FIC-101.PV", &format!("nsu={NS};s=FIC-101/PV.CV"))],
    );
    let mut h = Harness::start(conn, client_pki(dir.path()).await);
    let mut seen = Vec::new();
    h.wait_state(ConnState::Online, &mut seen).await;
    let mut changes = h.board.subscribe();
    changes.borrow_and_update();
    // Observing an absence needs a window: 6 s > the 4 s watchdog limit.
    let idle = tokio::time::timeout(Duration::from_secs(6), async {
        loop {
            if changes.changed().await.is_err() {
                return;
            }
            if h.state().0 != ConnState::Online {
                return;
            }
        }
    })
    .await;
    assert!(idle.is_err(), "state changed while idle: {:?}", h.state());
    server.set_value("FIC-101/PV.CV", 9.75);
    h.wait_tag(&mut seen, "value after idle", is_value("FIC-101.PV", 9.75))
        .await;
    h.stop().await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_tags_at_ten_hz() {
    let dir = tempfile::tempdir().unwrap();
    let server = sim(dir.path(), |o| {
        o.tags = 1000;
        o.rate_hz = 10.0;
    })
    .await;
    let tags = (0..1000)
        .map(|i| {
            tag(
                &format!("L{i}"),
                &format!("nsu={NS};s={}", crate::sim::deltav::load_tag(i)),
            )
        })
        .collect();
    let mut conn = conn_config("dv9", &server.endpoint(), tags);
    conn.publishing_interval = Duration::from_millis(500);
    conn.sampling_interval = Duration::from_millis(100);
    let mut h = Harness::start(conn, client_pki(dir.path()).await);
    let mut seen = Vec::new();
    h.wait_state(ConnState::Online, &mut seen).await;
    // Skip the initial values, then count a 3 s window.
    h.wait_tag(&mut seen, "first load value", |d| d["name"] == "L999")
        .await;
    let start = tokio::time::Instant::now();
    let mut count = 0usize;
    while start.elapsed() < Duration::from_secs(3) {
        if let Ok(Some(batch)) = tokio::time::timeout(Duration::from_millis(200), h.rx.recv()).await
        {
            count += batch.records.iter().filter(|r| r.kind == Kind::Tag).count();
        }
    }
    let rate = count as f64 / start.elapsed().as_secs_f64();
    eprintln!("load: {count} tag records in 3 s = {rate:.0}/s");
    assert!(rate > 7_000.0, "{rate}/s");
    assert_eq!(h.state().0, ConnState::Online);
    h.stop().await;
    server.shutdown().await;
}

/// A TCP relay whose server->client direction can be black-holed: bytes are
/// swallowed but the connection stays open, the way a wedged server or a
/// half-dead network path looks to the client.
async fn black_hole_relay(
    target: std::net::SocketAddr,
    pass: Arc<std::sync::atomic::AtomicBool>,
) -> std::net::SocketAddr {
    use std::sync::atomic::Ordering;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = tokio::net::TcpStream::connect(target).await else {
                continue;
            };
            let (mut cr, mut cw) = client.into_split();
            let (mut sr, mut sw) = server.into_split();
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut cr, &mut sw).await;
            });
            let pass = pass.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    let n = match sr.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    if pass.load(Ordering::SeqCst) && cw.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_subscription_is_rebuilt() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let dir = tempfile::tempdir().unwrap();
    let server = sim(dir.path(), |_| {}).await;
    let target = server
        .endpoint()
        .trim_start_matches("opc.tcp://")
        .trim_end_matches('/')
        .parse()
        .unwrap();
    let pass = Arc::new(AtomicBool::new(true));
    let relay = black_hole_relay(target, pass.clone()).await;
    let conn = conn_config(
        "dv10",
        &format!("opc.tcp://{relay}/"),
        vec![tag("FIC-101.PV", &format!("nsu={NS};s=FIC-101/PV.CV"))],
    );
    let mut h = Harness::start(conn, client_pki(dir.path()).await);
    let mut seen = Vec::new();
    h.wait_state(ConnState::Online, &mut seen).await;

    pass.store(false, Ordering::SeqCst);
    h.wait_state(ConnState::Offline, &mut seen).await;
    assert_eq!(h.state().1, "subscription silent");

    pass.store(true, Ordering::SeqCst);
    h.wait_state(ConnState::Online, &mut seen).await;
    server.set_value("FIC-101/PV.CV", 6.5);
    h.wait_tag(
        &mut seen,
        "value after rebuild",
        is_value("FIC-101.PV", 6.5),
    )
    .await;
    h.stop().await;
    server.shutdown().await;
}

// ---------------------------------------------------------------- PKI

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_certificate_created_on_first_start() {
    // `keys()` started a client on an empty PKI directory: that is a first
    // start. Check what it left behind.
    let pki = keys().await.join("client");
    let own = pki::read_own(&pki).unwrap();
    assert_eq!(own.cert_path, pki.join("own/cert.der"));
    assert!(pki.join("own/private.pem").is_file());
    assert!(!pki.join("private").exists(), "key lives in own/");
    assert!(pki.join("trusted").is_dir() && pki.join("rejected").is_dir());
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(pki.join("own/private.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "key mode {mode:o}");
    }
    let host = opcua::crypto::X509Data::computer_hostnames()
        .into_iter()
        .next()
        .unwrap_or_else(|| "localhost".into());
    assert_eq!(own.application_uri, pki::application_uri(&host));
    let days = (own.not_after - chrono::Utc::now()).num_days();
    assert!((3640..=3650).contains(&days), "valid {days} days");

    // Second start: same certificate, nothing regenerated.
    let again = pki::ensure_own_certificate(&pki, Some("other-name")).unwrap();
    assert_eq!(again.application_uri, own.application_uri);
    assert_eq!(again.not_after, own.not_after);
}

#[test]
fn legacy_key_location_is_migrated_and_loose_mode_fixed() {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let client = rt.block_on(keys()).join("client");
    let pki = dir.path().join("pki");
    std::fs::create_dir_all(pki.join("own")).unwrap();
    std::fs::create_dir_all(pki.join("private")).unwrap();
    std::fs::copy(client.join("own/cert.der"), pki.join("own/cert.der")).unwrap();
    let legacy = pki.join("private/private.pem");
    std::fs::copy(client.join("own/private.pem"), &legacy).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&legacy, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let own = pki::ensure_own_certificate(&pki, None).unwrap();
    assert!(!legacy.exists());
    assert!(own.key_path.is_file());
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&own.key_path)
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    // Half a PKI is an error for the operator, not silently regenerated.
    std::fs::remove_file(&own.key_path).unwrap();
    let err = pki::ensure_own_certificate(&pki, None).unwrap_err();
    assert!(err.to_string().contains("private key is missing"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiring_own_certificate_raises_one_system_error() {
    let dir = tempfile::tempdir().unwrap();
    let server = sim(dir.path(), |_| {}).await;
    let pki = client_pki(dir.path()).await;
    // Same key, a new certificate valid for 10 days only.
    let key = opcua::crypto::CertificateStore::read_pkey(&pki.join(pki::OWN_KEY)).unwrap();
    std::fs::remove_file(pki.join(pki::OWN_CERT)).unwrap();
    pki::create(&pki, "urn:plantgate:short-lived", 10, Some(&key)).unwrap();

    // Two connections share the certificate: one warning between them.
    let tags = vec![tag("FIC-101.PV", &format!("nsu={NS};s=FIC-101/PV.CV"))];
    let mut h = Harness::start(
        conn_config("exp1", &server.endpoint(), tags.clone()),
        pki.clone(),
    );
    let mut h2 = Harness::start(conn_config("exp2", &server.endpoint(), tags), pki.clone());
    let mut seen = Vec::new();
    let mut seen2 = Vec::new();
    h.wait_state(ConnState::Online, &mut seen).await;
    h2.wait_state(ConnState::Online, &mut seen2).await;
    let is_expiry = |r: &NewRecord| {
        r.kind == Kind::Event
            && r.data_json()["type"] == "system.error"
            && r.data_json()["details"]["error"] == "opcua_certificate_expiring"
    };
    // Both are online, so both expiry watchers have run their first check.
    let deadline = tokio::time::Instant::now() + WAIT;
    while !seen.iter().chain(seen2.iter()).any(is_expiry) {
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => panic!("no expiry warning"),
            Some(b) = h.rx.recv() => seen.extend(b),
            Some(b) = h2.rx.recv() => seen2.extend(b),
        }
    }
    let warnings: Vec<&NewRecord> = seen
        .iter()
        .chain(seen2.iter())
        .filter(|r| is_expiry(r))
        .collect();
    assert_eq!(warnings.len(), 1);
    let ev = warnings[0];
    assert_eq!(ev.connection, "", "agent-level event");
    assert_eq!(
        ev.data_json()["details"]["application_uri"],
        "urn:plantgate:short-lived"
    );
    let days = ev.data_json()["details"]["days_left"].as_i64().unwrap();
    assert!((9..=10).contains(&days), "{days}");
    h.stop().await;
    h2.stop().await;
    server.shutdown().await;
}

// ------------------------------------------------------- identity, backoff

/// A TCP relay that counts the connections it accepts.
async fn counting_relay(
    target: std::net::SocketAddr,
    count: Arc<std::sync::atomic::AtomicUsize>,
) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                if let Ok(mut server) = tokio::net::TcpStream::connect(target).await {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                }
            });
        }
    });
    addr
}

fn sim_addr(server: &SimServer) -> std::net::SocketAddr {
    server
        .endpoint()
        .trim_start_matches("opc.tcp://")
        .trim_end_matches('/')
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_password_backs_off_slowly_with_one_event() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let dir = tempfile::tempdir().unwrap();
    let server = sim(dir.path(), |o| {
        o.user = Some(("operator".into(), "s3cret".into()))
    })
    .await;
    let count = Arc::new(AtomicUsize::new(0));
    let relay = counting_relay(sim_addr(&server), count.clone()).await;
    let mut conn = conn_config(
        "auth",
        &format!("opc.tcp://{relay}/"),
        vec![tag("FIC-101.PV", &format!("nsu={NS};s=FIC-101/PV.CV"))],
    );
    conn.username = Some("operator".into());
    conn.password = Some(Secret::new("rotated-away"));
    // A fast initial backoff: only the slow path keeps attempts rare.
    conn.reconnect_initial = Duration::from_millis(50);
    conn.reconnect_max = Duration::from_secs(2);
    let mut h = Harness::start(conn, client_pki(dir.path()).await);
    let mut seen = Vec::new();
    h.wait_state(ConnState::AuthRequired, &mut seen).await;
    let ev = h
        .wait_event(&mut seen, "connection.auth_required", |_| true)
        .await;
    let status = ev.data_json()["details"]["status"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        status == "BadIdentityTokenRejected" || status == "BadUserAccessDenied",
        "{status}"
    );

    // Each attempt is two TCP connections (GetEndpoints, session). Over 8 s
    // with 1.6..2 s between attempts: at most 6 attempts; the initial 50 ms
    // backoff would make ~100.
    let before = count.load(Ordering::SeqCst);
    let window = Duration::from_secs(8);
    let start = tokio::time::Instant::now();
    while start.elapsed() < window {
        if let Ok(Some(b)) = tokio::time::timeout(Duration::from_millis(200), h.rx.recv()).await {
            seen.extend(b);
        }
    }
    let attempts = (count.load(Ordering::SeqCst) - before) as f64 / 2.0;
    eprintln!("auth retries: {attempts} attempts in {window:?}");
    assert!((2.0..=6.0).contains(&attempts), "{attempts} attempts");
    assert_eq!(h.state().0, ConnState::AuthRequired);
    let auth_events = seen
        .iter()
        .filter(|r| r.kind == Kind::Event && r.data_json()["type"] == "connection.auth_required")
        .count();
    assert_eq!(auth_events, 1, "one event per outage, not per retry");
    h.stop().await;
    server.shutdown().await;
}

// ------------------------------------------------------------ self-healing

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_with_moved_namespace_re_resolves_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let server = sim(dir.path(), |_| {}).await;
    let listen = sim_addr(&server);
    let old_ns = server.namespace_index();
    let mut conn = conn_config(
        "restart",
        &server.endpoint(),
        vec![
            tag("FIC-101.PV", &format!("nsu={NS};s=FIC-101/PV.CV")),
            tag("TIC-201.PV", &format!("nsu={NS};s=TIC-201/PV.CV")),
        ],
    );
    // The product defaults: what an operator would see.
    conn.reconnect_initial = Duration::from_secs(1);
    conn.reconnect_max = Duration::from_secs(60);
    let mut h = Harness::start(conn, client_pki(dir.path()).await);
    let mut seen = Vec::new();
    h.wait_state(ConnState::Online, &mut seen).await;
    server.set_value("FIC-101/PV.CV", 1.5);
    h.wait_tag(&mut seen, "before restart", is_value("FIC-101.PV", 1.5))
        .await;

    server.shutdown().await;
    h.wait_state(ConnState::Offline, &mut seen).await;

    copy_keys("server", &dir.path().join("server-pki")).await;
    let mut opts = SimOptions::new(dir.path().join("server-pki"));
    opts.speed = 0.0;
    opts.listen = listen;
    let extras = crate::sim::SimExtras {
        namespaces_before: vec!["urn:plantgate:test:inserted".into()],
        ..Default::default()
    };
    let server = crate::sim::start_deltav(opts, extras).await.unwrap();
    let restarted = tokio::time::Instant::now();
    assert_eq!(server.namespace_index(), old_ns + 1);
    // Initial values of the new subscription are the first data.
    let mut after = Vec::new();
    h.wait_tag(&mut after, "first value after restart", |d| {
        d["name"] == "FIC-101.PV" && d["quality"] == "good"
    })
    .await;
    let to_data = restarted.elapsed();
    eprintln!("server restart -> first value: {} ms", to_data.as_millis());
    assert_eq!(h.state().0, ConnState::Online);
    server.set_value("TIC-201/PV.CV", 2.5);
    h.wait_tag(
        &mut after,
        "value after restart",
        is_value("TIC-201.PV", 2.5),
    )
    .await;
    seen.extend(after);
    // offline, then online again: both as events.
    let states: Vec<String> = seen
        .iter()
        .filter(|r| r.kind == Kind::Event && r.data_json()["type"] == "connection.status_changed")
        .filter_map(|r| r.data_json()["details"]["state"].as_str().map(String::from))
        .collect();
    assert_eq!(states, ["online", "offline", "online"]);
    // No tag went bad on the way (the nsu= ids were re-resolved).
    assert!(!seen
        .iter()
        .any(|r| r.kind == Kind::Tag && r.data_json()["quality"] == "bad"));
    h.stop().await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_node_goes_bad_others_flow_and_it_comes_back() {
    let dir = tempfile::tempdir().unwrap();
    let server = sim(dir.path(), |_| {}).await;
    let conn = conn_config(
        "del",
        &server.endpoint(),
        vec![
            tag("FIC-101.PV", &format!("nsu={NS};s=FIC-101/PV.CV")),
            tag("TIC-201.PV", &format!("nsu={NS};s=TIC-201/PV.CV")),
        ],
    );
    let mut h = Harness::start(conn, client_pki(dir.path()).await);
    let mut seen = Vec::new();
    h.wait_state(ConnState::Online, &mut seen).await;
    server.set_value("TIC-201/PV.CV", 70.5);
    h.wait_tag(&mut seen, "TIC before", is_value("TIC-201.PV", 70.5))
        .await;

    assert!(server.delete_variable("TIC-201/PV.CV"));
    let bad = h
        .wait_tag(&mut seen, "TIC bad", |d| {
            d["name"] == "TIC-201.PV" && d["quality"] == "bad"
        })
        .await;
    assert_eq!(bad.data_json()["status"], "BadNodeIdUnknown");
    let ev = h
        .wait_event(&mut seen, "system.error", |d| d["tag"] == "TIC-201.PV")
        .await;
    assert_eq!(ev.connection, "del");
    assert_eq!(
        ev.data_json()["details"]["node"],
        format!("nsu={NS};s=TIC-201/PV.CV")
    );
    assert_eq!(ev.data_json()["details"]["status"], "BadNodeIdUnknown");

    // The others keep flowing, the connection stays up.
    server.set_value("FIC-101/PV.CV", 3.25);
    h.wait_tag(
        &mut seen,
        "FIC while TIC is gone",
        is_value("FIC-101.PV", 3.25),
    )
    .await;
    assert_eq!(h.state().0, ConnState::Online);

    // The node is back (configuration download finished): retried, good again.
    server.namespace().add_variables(
        "DeltaV",
        vec![(
            "TIC-201/PV.CV".into(),
            "TIC-201/PV.CV".into(),
            crate::sim::SimValue::Double(71.5),
        )],
    );
    server.set_value("TIC-201/PV.CV", 72.5);
    h.wait_tag(&mut seen, "TIC back", |d| {
        d["name"] == "TIC-201.PV" && d["quality"] == "good"
    })
    .await;
    let errors = seen
        .iter()
        .filter(|r| r.kind == Kind::Event && r.data_json()["type"] == "system.error")
        .count();
    assert_eq!(errors, 1, "one system.error for the outage of one node");
    assert_eq!(h.state().0, ConnState::Online);
    h.stop().await;
    server.shutdown().await;
}

/// A reload's new tag list changes the monitored items of the running
/// subscription: a tag kept flows on, one removed stops, one whose node
/// changed follows the new node, one added flows, one the server lacks is
/// bad and announced; the session is never rebuilt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_tag_list_changes_the_running_subscription() {
    let dir = tempfile::tempdir().unwrap();
    let server = sim(dir.path(), |_| {}).await;
    let node = |s: &str| format!("nsu={NS};s={s}");
    let conn = conn_config(
        "retag",
        &server.endpoint(),
        vec![
            tag("KEPT", &node("FIC-101/PV.CV")),
            tag("MOVED", &node("TIC-201/PV.CV")),
            tag("GONE", &node("LIC-301/PV.CV")),
        ],
    );
    let mut h = Harness::start(conn.clone(), client_pki(dir.path()).await);
    let mut seen = Vec::new();
    h.wait_state(ConnState::Online, &mut seen).await;
    server.set_value("LIC-301/PV.CV", 1.5);
    h.wait_tag(&mut seen, "GONE before", is_value("GONE", 1.5))
        .await;

    let mut retagged = conn.clone();
    retagged.tags = vec![
        tag("KEPT", &node("FIC-101/PV.CV")),
        tag("MOVED", &node("FIC-101/SP.CV")),
        tag("NEW", &node("TIC-201/PV.CV")),
        tag("MISSING", &node("NOPE/PV.CV")),
    ];
    h.config.send_replace(retagged);
    let bad = h
        .wait_tag(&mut seen, "MISSING bad", |d| d["name"] == "MISSING")
        .await;
    assert_eq!(bad.data_json()["status"], "BadNodeIdUnknown");
    h.wait_event(&mut seen, "system.error", |d| d["tag"] == "MISSING")
        .await;

    server.set_value("LIC-301/PV.CV", 99.5);
    server.set_value("FIC-101/SP.CV", 5.5);
    server.set_value("TIC-201/PV.CV", 6.5);
    let moved = h
        .wait_tag(&mut seen, "MOVED on its new node", is_value("MOVED", 5.5))
        .await;
    assert_eq!(moved.data_json()["node"], node("FIC-101/SP.CV"));
    h.wait_tag(&mut seen, "NEW", is_value("NEW", 6.5)).await;
    // Two more values of the kept tag, each a publish cycle after the
    // removed tag's change: had GONE still been monitored, its value would
    // have come first.
    for v in [7.25, 8.25] {
        server.set_value("FIC-101/PV.CV", v);
        h.wait_tag(&mut seen, "KEPT", is_value("KEPT", v)).await;
    }
    assert!(
        !seen.iter().any(|r| r.kind == Kind::Tag
            && r.data_json()["name"] == "GONE"
            && r.data_json()["value"] == 99.5),
        "a removed tag's value was recorded"
    );
    // One session throughout: online once, never left.
    let states: Vec<Value> = seen
        .iter()
        .filter(|r| r.kind == Kind::Event && r.data_json()["type"] == "connection.status_changed")
        .map(|r| r.data_json()["details"]["state"].clone())
        .collect();
    assert_eq!(states.last(), Some(&Value::from("online")), "{states:?}");
    assert_eq!(
        states.iter().filter(|s| *s == "online").count(),
        1,
        "{states:?}"
    );
    assert_eq!(h.state().0, ConnState::Online);
    h.stop().await;
    server.shutdown().await;
}

// ------------------------------------------------------------------ values

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_values_statuses_and_types_become_records() {
    use crate::sim::SimValue as V;
    use opcua::types::{LocalizedText, Variant};
    let dir = tempfile::tempdir().unwrap();
    let server = sim(dir.path(), |_| {}).await;
    let node = format!("nsu={NS};s=FIC-101/PV.CV");
    let conn = conn_config("odd", &server.endpoint(), vec![tag("X", &node)]);
    let mut h = Harness::start(conn, client_pki(dir.path()).await);
    let mut seen = Vec::new();
    h.wait_state(ConnState::Online, &mut seen).await;
    let ns = server.namespace();

    ns.set_with_status(
        "FIC-101/PV.CV",
        Some(V::Double(1.25)),
        StatusCode::UncertainLastUsableValue,
    )
    .unwrap();
    let r = h
        .wait_tag(&mut seen, "uncertain", |d| d["quality"] == "uncertain")
        .await;
    assert_eq!(r.data_json()["status"], "UncertainLastUsableValue");
    assert_eq!(r.data_json()["value"], 1.25);
    ns.set_with_status("FIC-101/PV.CV", None, StatusCode::BadSensorFailure)
        .unwrap();
    let r = h
        .wait_tag(&mut seen, "bad", |d| d["quality"] == "bad")
        .await;
    assert_eq!(r.data_json()["status"], "BadSensorFailure");
    assert_eq!(r.data_json()["value"], Value::Null);

    let long = "ä".repeat(value::MAX_STRING_BYTES);
    type Check = Box<dyn Fn(&Value) -> bool>;
    let cases: Vec<(V, Check)> = vec![
        (
            V::String("text instead of a number".into()),
            Box::new(|v| v == "text instead of a number"),
        ),
        (
            V::String(long),
            Box::new(|v| {
                v.as_str().is_some_and(|s| {
                    s.ends_with(value::TRUNCATED_MARKER) && s.len() <= value::MAX_STRING_BYTES
                })
            }),
        ),
        (
            V::DoubleArray(vec![1.0, f64::NAN, 3.0]),
            Box::new(|v| *v == serde_json::json!([1.0, null, 3.0])),
        ),
        (
            V::StringArray(vec!["a".into(), "b".into()]),
            Box::new(|v| *v == serde_json::json!(["a", "b"])),
        ),
        (
            V::DoubleArray((0..20_000).map(f64::from).collect()),
            Box::new(|v| {
                v.as_array()
                    .is_some_and(|a| a.last().is_some_and(|l| l == value::TRUNCATED_MARKER))
            }),
        ),
        (V::Bytes(vec![0, 255, 7]), Box::new(|v| v == "AP8H")),
        (
            V::DateTime(1_795_860_000_123),
            Box::new(|v| v == "2026-11-28T10:00:00.123Z"),
        ),
        (
            V::Int64(i64::MIN),
            Box::new(|v| v.as_i64() == Some(i64::MIN)),
        ),
        (V::Float(f32::INFINITY), Box::new(|v| v.is_null())),
        (V::Bool(true), Box::new(|v| *v == Value::Bool(true))),
        (
            V::Raw(Variant::LocalizedText(Box::new(LocalizedText::new(
                "de", "Störung",
            )))),
            Box::new(|v| v == "Störung"),
        ),
        (
            V::Raw(Variant::Variant(Box::new(Variant::Int32(-7)))),
            Box::new(|v| v.as_i64() == Some(-7)),
        ),
        (
            V::Raw(Variant::StatusCode(StatusCode::BadOutOfService)),
            Box::new(|v| v == "BadOutOfService"),
        ),
        (V::Empty, Box::new(|v| v.is_null())),
        (V::Double(4.5), Box::new(|v| v.as_f64() == Some(4.5))),
    ];
    for (i, (value, check)) in cases.into_iter().enumerate() {
        let shown = format!("{value:?}").chars().take(60).collect::<String>();
        ns.set("FIC-101/PV.CV", value).unwrap();
        // Only records after this set count.
        seen.clear();
        let r = h
            .wait_tag(&mut seen, &format!("case {i}: {shown}"), |d| {
                check(&d["value"])
            })
            .await;
        assert_eq!(r.data_json()["quality"], "good", "case {i}");
        assert_eq!(h.state().0, ConnState::Online, "case {i}");
    }
    h.stop().await;
    server.shutdown().await;
}

// ------------------------------------------------------- many connections

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_connections_in_one_process() {
    let dir = tempfile::tempdir().unwrap();
    let a = sim(&dir.path().join("a"), |_| {}).await;
    let b = sim(&dir.path().join("b"), |_| {}).await;
    let c = sim(&dir.path().join("c"), |o| {
        o.user = Some(("operator".into(), "s3cret".into()))
    })
    .await;
    // One PKI for all, as in the agent.
    let pki = client_pki(dir.path()).await;
    let board = StatusBoard::new();
    let (tx, mut rx) = crate::buffer::Outlet::queue(TEST_QUEUE);
    let cancel = CancellationToken::new();
    let mut tasks = Vec::new();
    let mut expected: Vec<(String, &SimServer)> = Vec::new();
    for i in 0..20 {
        let (server, name) = match i % 3 {
            0 => (&a, "a"),
            1 => (&b, "b"),
            _ => (&c, "c"),
        };
        let id = format!("conn{i:02}-{name}");
        let mut conn = conn_config(
            &id,
            &server.endpoint(),
            vec![tag("FIC-101.PV", &format!("nsu={NS};s=FIC-101/PV.CV"))],
        );
        if i % 2 == 1 {
            conn.security_policy = SecurityPolicy::Basic256Sha256;
            conn.security_mode = SecurityMode::SignAndEncrypt;
            conn.trust_unknown_server_cert = true;
        }
        if name == "c" {
            conn.username = Some("operator".into());
            conn.password = Some(Secret::new(if i == 2 { "wrong" } else { "s3cret" }));
        }
        if i != 2 {
            expected.push((id.clone(), server));
        }
        let reporter = ConnectionReporter::new(&id, board.clone(), tx.clone(), conn.events.clone());
        tasks.push(tokio::spawn(run_connection(
            tokio::sync::watch::channel(conn).1,
            pki.clone(),
            reporter,
            Default::default(),
            cancel.clone(),
        )));
    }
    drop(tx);

    let state_of = |id: &str| {
        board
            .connections()
            .into_iter()
            .find(|(c, _)| c == id)
            .map(|(_, s)| s.state)
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut changes = board.subscribe();
    loop {
        let online = expected
            .iter()
            .filter(|(id, _)| state_of(id) == Some(ConnState::Online))
            .count();
        if online == expected.len() && state_of("conn02-c") == Some(ConnState::AuthRequired) {
            break;
        }
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => panic!("{online}/19 online: {:?}", board.connections()),
            _ = changes.changed() => {}
            _ = rx.recv() => {}
        }
    }
    for (v, server) in [(11.0, &a), (22.0, &b), (33.0, &c)] {
        server.set_value("FIC-101/PV.CV", v);
    }
    let mut waiting: std::collections::HashSet<String> =
        expected.iter().map(|(id, _)| id.clone()).collect();
    let want = |id: &str| {
        if id.ends_with("-a") {
            11.0
        } else if id.ends_with("-b") {
            22.0
        } else {
            33.0
        }
    };
    while !waiting.is_empty() {
        let batch = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .unwrap_or_else(|_| panic!("no value for {waiting:?}"))
            .expect("sink open");
        for r in batch {
            if r.kind == Kind::Tag && r.data_json()["value"].as_f64() == Some(want(&r.connection)) {
                waiting.remove(&r.connection);
            }
        }
    }
    assert_eq!(state_of("conn02-c"), Some(ConnState::AuthRequired));
    cancel.cancel();
    for t in tasks {
        tokio::time::timeout(WAIT, t)
            .await
            .expect("task stops")
            .expect("no panic");
    }
    for s in [a, b, c] {
        s.shutdown().await;
    }
}

#[path = "tests/profiles.rs"]
mod profiles;

#[test]
fn absurd_server_revisions_do_not_overflow_the_keep_alive() {
    // What a misbehaving server may revise to: no panic, a sane bound.
    assert_eq!(
        keep_alive_window(Duration::from_millis(u64::MAX), u32::MAX),
        MAX_KEEP_ALIVE
    );
    assert_eq!(
        keep_alive_window(Duration::from_secs(u64::MAX / 2), 3),
        MAX_KEEP_ALIVE
    );
    assert_eq!(
        keep_alive_window(Duration::ZERO, 0),
        Duration::from_millis(1)
    );
    assert_eq!(
        keep_alive_window(Duration::from_millis(500), 10),
        Duration::from_secs(5)
    );
}
