//! Client against the in-process DeltaV simulator: real sockets, real
//! sessions. No fixed sleeps: every wait is on a condition with a timeout.

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::*;
use crate::config::{ConnectionKind, SecurityMode, SecurityPolicy, TagConfig};
use crate::record::Kind;
use crate::secret::Secret;
use crate::sim::{start_deltav, SimOptions, SimServer};
use crate::status::StatusBoard;

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
        kind: ConnectionKind::Generic,
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
            "connection.status_changed".into(),
            "connection.auth_required".into(),
        ],
        node_template: None,
        oee_window: Duration::from_secs(60),
        units: vec![],
        work_centers: vec![],
        tags,
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
        start_deltav(SimOptions::new(dir.path().join("server")))
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
    for sub in ["own", "private"] {
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
    start_deltav(opts).await.expect("simulator starts")
}

struct Harness {
    id: String,
    board: Arc<StatusBoard>,
    rx: mpsc::Receiver<Vec<NewRecord>>,
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Harness {
    fn start(conn: ConnectionConfig, pki: std::path::PathBuf) -> Harness {
        let board = StatusBoard::new();
        let (tx, rx) = mpsc::channel(1024);
        let reporter = ConnectionReporter::new(&conn.id, board.clone(), tx, conn.events.clone());
        let cancel = CancellationToken::new();
        let id = conn.id.clone();
        let task = tokio::spawn(run_connection(conn, pki, reporter, cancel.clone()));
        Harness {
            id,
            board,
            rx,
            cancel,
            task,
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
        if let Some(r) = seen.iter().find(|r| r.kind == Kind::Tag && pred(&r.data)) {
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
                .iter()
                .find(|r| r.kind == Kind::Tag && pred(&r.data))
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
        assert_eq!(r.data["node"], node.as_str());
        assert_eq!(r.data["quality"], "good");
        assert_eq!(r.data["status"], "Good");
        // Source timestamp of the simulator: recent wall-clock time.
        assert!((crate::record::now_ms() - r.ts_ms).abs() < 60_000);
    }
    // The state change was also emitted as an event record.
    assert!(seen.iter().any(|r| r.kind == Kind::Event
        && r.data["type"] == "connection.status_changed"
        && r.data["details"]["state"] == "online"));
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
        assert_eq!(r.data["quality"], "bad");
        assert_eq!(r.data["status"], "BadNodeIdUnknown");
        assert_eq!(r.data["value"], Value::Null);
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

async fn secure_round_trip(policy: SecurityPolicy, mode: SecurityMode) {
    let dir = tempfile::tempdir().unwrap();
    let server = sim(dir.path(), |_| {}).await;
    let mut conn = conn_config(
        "dv5",
        &server.endpoint(),
        vec![tag("FIC-101.PV", &format!("nsu={NS};s=FIC-101/PV.CV"))],
    );
    conn.security_policy = policy;
    conn.security_mode = mode;
    conn.trust_unknown_server_cert = true;
    let mut h = Harness::start(conn, client_pki(dir.path()).await);
    let mut seen = Vec::new();
    h.wait_state(ConnState::Online, &mut seen).await;
    server.set_value("FIC-101/PV.CV", 5.5);
    h.wait_tag(&mut seen, "secure value", is_value("FIC-101.PV", 5.5))
        .await;
    h.stop().await;
    server.shutdown().await;
    // Trust on first use stored the server certificate.
    let trusted = std::fs::read_dir(dir.path().join("pki/trusted"))
        .unwrap()
        .count();
    assert_eq!(trusted, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic256sha256_sign_and_encrypt() {
    secure_round_trip(SecurityPolicy::Basic256Sha256, SecurityMode::SignAndEncrypt).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aes256_sha256_rsapss_sign() {
    secure_round_trip(SecurityPolicy::Aes256Sha256RsaPss, SecurityMode::Sign).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aes128_sha256_rsaoaep_sign_and_encrypt() {
    secure_round_trip(
        SecurityPolicy::Aes128Sha256RsaOaep,
        SecurityMode::SignAndEncrypt,
    )
    .await;
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
    let mut h = Harness::start(conn, client_pki(dir.path()).await);
    let mut seen = Vec::new();
    h.wait_state(ConnState::Untrusted, &mut seen).await;
    let rejected = std::fs::read_dir(dir.path().join("pki/rejected"))
        .unwrap()
        .count();
    assert_eq!(rejected, 1);
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
            .data["value"]
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
fn backoff_grows_with_jitter_and_resets() {
    let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
    let d: Vec<Duration> = (0..6).map(|_| b.next_delay()).collect();
    assert!(d[0] >= Duration::from_millis(100) && d[0] <= Duration::from_millis(120));
    assert!(d[2] >= Duration::from_millis(320) && d[2] <= Duration::from_millis(480));
    assert!(d[5] <= Duration::from_secs(1) && d[5] >= Duration::from_millis(800));
    b.reset();
    assert!(b.next_delay() <= Duration::from_millis(120));
    assert!(b.slow() >= Duration::from_millis(800));
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
            count += batch.iter().filter(|r| r.kind == Kind::Tag).count();
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
