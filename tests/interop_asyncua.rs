//! Interop with an independent OPC UA server: python `asyncua` from PyPI
//! (`pip install asyncua`), running tests/asyncua_server.py. Our simulator
//! shares its stack with the client (async-opcua); this one does not.
//!
//! Ignored in plain `cargo test` (needs python3 with asyncua); `.ci/run`
//! installs it and runs them with `--include-ignored`. `PYTHON` selects the
//! interpreter (default `python3`).

mod common;

use std::time::Duration;

use plantgate::config::{
    Backfill, ConnectionConfig, ProfileConfig, SecurityMode, SecurityPolicy, TagConfig,
    SECURITY_PAIRS,
};
use plantgate::record::{Kind, NewRecord};
use plantgate::secret::Secret;
use plantgate::status::{ConnState, DropReason};

use common::asyncua::PyServer;
use common::conn::Conn;

const WAIT: Duration = Duration::from_secs(60);
const NS: &str = "urn:plantgate:interop";

fn tag(name: &str, id: &str) -> TagConfig {
    TagConfig {
        name: name.into(),
        node: format!("nsu={NS};s={id}"),
        sampling_interval: None,
        deadband: None,
    }
}

/// Waits until `n` distinct good values of the changing Counter arrived
/// after this call (data flowing, not just the initial value).
async fn wait_counter_values(c: &mut Conn, n: usize) {
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut values = std::collections::BTreeSet::new();
    while values.len() < n {
        let batch = tokio::time::timeout_at(deadline, c.rx.recv())
            .await
            .unwrap_or_else(|_| panic!("no data; state {:?}", c.status().state))
            .expect("sink open");
        for r in &batch.records {
            if r.kind == Kind::Tag && r.data_json()["name"] == "Counter" {
                assert_eq!(r.data_json()["quality"], "good", "{}", r.data);
                if let Some(v) = r.data_json()["value"].as_i64() {
                    values.insert(v);
                }
            }
        }
        c.seen.extend(batch);
    }
}

fn conn_config(id: &str, endpoint: &str) -> ConnectionConfig {
    let tag = |name: &str, node: &str| TagConfig {
        name: name.into(),
        node: node.into(),
        sampling_interval: None,
        deadband: None,
    };
    ConnectionConfig {
        id: id.into(),
        endpoint: endpoint.into(),
        security_policy: SecurityPolicy::None,
        security_mode: SecurityMode::None,
        username: None,
        password: None,
        trust_unknown_server_cert: false,
        publishing_interval: Duration::from_millis(200),
        sampling_interval: Duration::from_millis(100),
        reconnect_initial: Duration::from_millis(200),
        reconnect_max: Duration::from_secs(1),
        events: vec![
            plantgate::record::EventType::ConnectionStatusChanged,
            plantgate::record::EventType::ConnectionAuthRequired,
            plantgate::record::EventType::SystemError,
        ],
        backfill: Backfill::Off,
        backfill_max: Duration::from_secs(3600),
        tags: vec![
            tag("Counter", &format!("nsu={NS};s=Line1/Counter")),
            tag("Temp", &format!("nsu={NS};s=Line1/Temp")),
            tag("State", &format!("nsu={NS};s=Line1/State")),
        ],
        profile: ProfileConfig::Generic,
    }
}

/// Details of the `system.error` events whose `error` is `error`.
fn system_errors(seen: &[NewRecord], error: &str) -> Vec<serde_json::Value> {
    seen.iter()
        .filter(|r| r.kind == Kind::Event)
        .map(NewRecord::data_json)
        .filter(|d| d["type"] == "system.error")
        .map(|d| d["details"].clone())
        .filter(|d| d["error"] == error)
        .collect()
}

fn tag_data(seen: &[NewRecord], name: &str) -> Vec<serde_json::Value> {
    seen.iter()
        .filter(|r| r.kind == Kind::Tag)
        .map(NewRecord::data_json)
        .filter(|d| d["name"] == name)
        .collect()
}

/// Distinct good Counter values seen.
fn counter_values(seen: &[NewRecord]) -> usize {
    tag_data(seen, "Counter")
        .into_iter()
        .filter_map(|d| d["value"].as_i64())
        .collect::<std::collections::BTreeSet<_>>()
        .len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs python asyncua"]
async fn asyncua_every_policy_and_mode_with_password() {
    let server = PyServer::start(0, &["--user", "operator", "--password", "s3cret"]).await;
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    for (n, (policy, mode)) in SECURITY_PAIRS.into_iter().enumerate() {
        let mut conn = conn_config(&format!("py{n}"), &server.endpoint);
        conn.security_policy = policy;
        conn.security_mode = mode;
        conn.username = Some("operator".into());
        conn.password = Some(Secret::new("s3cret"));
        conn.trust_unknown_server_cert = true;
        let mut c = Conn::start(conn, pki.clone());
        c.wait_state(ConnState::Online).await;
        wait_counter_values(&mut c, 3).await;
        c.stop().await;
        eprintln!("asyncua: verified {policy:?}/{mode:?} with username/password");
    }
    // Anonymous as well (the server allows it here).
    let mut c = Conn::start(conn_config("py-anon", &server.endpoint), pki.clone());
    c.wait_state(ConnState::Online).await;
    wait_counter_values(&mut c, 3).await;
    c.stop().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs python asyncua"]
async fn asyncua_wrong_password_and_unknown_certificate() {
    let server = PyServer::start(
        0,
        &[
            "--user",
            "operator",
            "--password",
            "s3cret",
            "--no-anonymous",
        ],
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");

    let mut conn = conn_config("py-auth", &server.endpoint);
    conn.security_policy = SecurityPolicy::Basic256Sha256;
    conn.security_mode = SecurityMode::SignAndEncrypt;
    conn.trust_unknown_server_cert = true;
    conn.username = Some("operator".into());
    conn.password = Some(Secret::new("wrong"));
    let mut c = Conn::start(conn, pki.clone());
    c.wait_state(ConnState::AuthRequired).await;
    let reason = c.status().reason;
    eprintln!("asyncua: wrong password -> auth_required ({reason})");
    let deadline = tokio::time::Instant::now() + WAIT;
    while !c.seen.iter().any(|r| {
        r.kind == Kind::Event
            && r.data_json()["type"] == "connection.auth_required"
            && r.data_json()["details"]["status"] == reason.as_str()
    }) {
        let b = tokio::time::timeout_at(deadline, c.rx.recv())
            .await
            .expect("auth_required event")
            .expect("sink open");
        c.seen.extend(b);
    }
    c.stop().await;

    // A fresh PKI that does not know the server: untrusted, cert in rejected/.
    let other = dir.path().join("pki-strict");
    let mut conn = conn_config("py-untrusted", &server.endpoint);
    conn.security_policy = SecurityPolicy::Basic256Sha256;
    conn.security_mode = SecurityMode::SignAndEncrypt;
    conn.username = Some("operator".into());
    conn.password = Some(Secret::new("s3cret"));
    let mut c = Conn::start(conn, other.clone());
    c.wait_state(ConnState::Untrusted).await;
    let rejected = std::fs::read_dir(other.join("rejected")).unwrap().count();
    assert_eq!(rejected, 1);
    c.stop().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs python asyncua"]
async fn asyncua_restart_offline_then_online_and_data_resumes() {
    let server = PyServer::start(0, &[]).await;
    let port = server.port;
    let dir = tempfile::tempdir().unwrap();
    let mut conn = conn_config("py-restart", &server.endpoint);
    conn.reconnect_initial = Duration::from_secs(1);
    conn.reconnect_max = Duration::from_secs(60);
    let endpoint = server.endpoint.clone();
    let mut c = Conn::start(conn, dir.path().join("pki"));
    c.wait_state(ConnState::Online).await;
    wait_counter_values(&mut c, 2).await;

    server.stop().await;
    c.wait_state(ConnState::Offline).await;
    let server = PyServer::start(port, &[]).await;
    assert_eq!(server.endpoint, endpoint);
    let restarted = tokio::time::Instant::now();
    wait_counter_values(&mut c, 1).await;
    eprintln!(
        "asyncua: server ready -> first value {} ms",
        restarted.elapsed().as_millis()
    );
    c.wait_status_events(3).await;
    assert_eq!(c.status_events(), ["online", "offline", "online"]);
    c.stop().await;
    server.stop().await;
}

/// docs/guarantees.md against an independent server: a 70 000-byte String (over the
/// 65 535 decoder default that made the connection flap twice a second) that
/// changes every second costs its own tag a bad record each time; the other
/// tags keep delivering, the connection never leaves `online`, the loss is
/// counted and announced once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs python asyncua"]
async fn asyncua_oversized_string_costs_only_its_tag() {
    let server = PyServer::start(0, &["--big-string", "70000"]).await;
    let dir = tempfile::tempdir().unwrap();
    let mut conn = conn_config("py-big", &server.endpoint);
    conn.tags.push(tag("Big", "Line1/Big"));
    let mut c = Conn::start(conn, dir.path().join("pki"));
    c.wait_state(ConnState::Online).await;
    let too_large = |d: &serde_json::Value| {
        d["value"].is_null() && d["quality"] == "bad" && d["status"] == "BadEncodingLimitsExceeded"
    };
    c.until(
        "3 bad Big records while Counter delivers 20 values",
        |seen| {
            tag_data(seen, "Big")
                .into_iter()
                .filter(|d| too_large(d))
                .count()
                >= 3
                && counter_values(seen) >= 20
        },
    )
    .await;
    c.until("the value_too_large event", |seen| {
        !system_errors(seen, "value_too_large").is_empty()
    })
    .await;
    let big = tag_data(&c.seen, "Big");
    assert!(big.iter().all(too_large), "{big:?}");
    let events = system_errors(&c.seen, "value_too_large");
    assert_eq!(events.len(), 1, "once per tag: {events:?}");
    assert_eq!(events[0]["tag"], "Big");
    assert_eq!(events[0]["bytes"], 70_000);
    let dropped = c.dropped(DropReason::ValueTooLarge);
    assert!(dropped >= big.len() as u64, "{dropped} < {}", big.len());
    assert_eq!(c.status().state, ConnState::Online);
    assert_eq!(c.status_events(), ["online"]);
    eprintln!(
        "asyncua: {} bad Big records, {} Counter values, dropped value_too_large = {dropped}, status events {:?}",
        big.len(),
        counter_values(&c.seen),
        c.status_events()
    );
    c.stop().await;
    server.stop().await;
}

/// A String over even the raised decoder limit (16 MiB per message): the
/// python server sends it regardless of the limits the client announced, the
/// response fails alone (too many chunks), its values are counted as lost
/// and announced; the connection and the other tags carry on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs python asyncua"]
async fn asyncua_value_over_the_decoder_limit_costs_one_response() {
    let server = PyServer::start(0, &["--huge-string", "17000000"]).await;
    let dir = tempfile::tempdir().unwrap();
    let mut conn = conn_config("py-huge", &server.endpoint);
    conn.tags.push(tag("Huge", "Line1/Huge"));
    let mut c = Conn::start(conn, dir.path().join("pki"));
    c.wait_state(ConnState::Online).await;
    c.until("the response_too_large event", |seen| {
        !system_errors(seen, "response_too_large").is_empty()
    })
    .await;
    let before = counter_values(&c.seen);
    c.until("10 more Counter values", |seen| {
        counter_values(seen) >= before + 10
    })
    .await;
    let event = system_errors(&c.seen, "response_too_large")[0].clone();
    assert!(c.dropped(DropReason::ValueTooLarge) >= 1);
    assert_eq!(c.status().state, ConnState::Online);
    assert_eq!(c.status_events(), ["online"]);
    eprintln!("asyncua: over the decoder limit -> {}", event["message"]);
    c.stop().await;
    server.stop().await;
}

/// `trust_unknown_server_cert` is trust on first use: the first certificate
/// of the endpoint is pinned; another server with another certificate on the
/// same endpoint is refused (rejected/, `untrusted`, one `system.error` with
/// both thumbprints). With the flag off afterwards the operator's files
/// decide: moving the refused certificate to trusted/ accepts it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs python asyncua"]
async fn asyncua_trust_on_first_use_refuses_another_certificate() {
    let a = PyServer::start(0, &[]).await;
    let (port, endpoint, thumb_a) = (a.port, a.endpoint.clone(), a.thumbprint());
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    let mut conn = conn_config("py-tofu", &endpoint);
    conn.security_policy = SecurityPolicy::Basic256Sha256;
    conn.security_mode = SecurityMode::SignAndEncrypt;
    conn.trust_unknown_server_cert = true;
    let mut c = Conn::start(conn.clone(), pki.clone());
    c.wait_state(ConnState::Online).await;
    wait_counter_values(&mut c, 2).await;
    let count = |sub: &str| std::fs::read_dir(pki.join(sub)).map_or(0, |d| d.count());
    assert_eq!((count("trusted"), count("pinned")), (1, 1));

    a.stop().await;
    let b = PyServer::start(port, &[]).await;
    assert_eq!(b.endpoint, endpoint);
    let thumb_b = b.thumbprint();
    assert_ne!(thumb_a, thumb_b);
    c.wait_state(ConnState::Untrusted).await;
    let reason = c.status().reason;
    assert!(
        reason.contains("certificate changed")
            && reason.contains(&thumb_a)
            && reason.contains(&thumb_b),
        "{reason}"
    );
    c.until("the server_certificate_changed event", |seen| {
        !system_errors(seen, "server_certificate_changed").is_empty()
    })
    .await;
    let event = system_errors(&c.seen, "server_certificate_changed")[0].clone();
    assert_eq!(event["endpoint"], endpoint.as_str());
    assert_eq!(event["pinned_thumbprint"], thumb_a.as_str());
    assert_eq!(event["presented_thumbprint"], thumb_b.as_str());
    assert_eq!((count("trusted"), count("rejected")), (1, 1));
    c.stop().await;
    eprintln!("asyncua: impostor refused: {reason}");

    conn.trust_unknown_server_cert = false;
    let mut c = Conn::start(conn, pki.clone());
    c.wait_state(ConnState::Untrusted).await;
    let rejected = std::fs::read_dir(pki.join("rejected"))
        .unwrap()
        .next()
        .expect("the refused certificate")
        .unwrap()
        .path();
    std::fs::rename(
        &rejected,
        pki.join("trusted").join(rejected.file_name().unwrap()),
    )
    .unwrap();
    c.wait_state(ConnState::Online).await;
    wait_counter_values(&mut c, 2).await;
    c.stop().await;
    b.stop().await;
}

/// A password over a channel without security, to a server that has no
/// encrypting policy for the user token either: an error-level log line and
/// one `system.error` per connection start (not per reconnect). The same
/// connection to a server whose token policy encrypts the password: nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs python asyncua"]
async fn asyncua_cleartext_password_is_announced_once() {
    let args = ["--user", "operator", "--password", "s3cret", "--only-none"];
    let server = PyServer::start(0, &args).await;
    let port = server.port;
    let dir = tempfile::tempdir().unwrap();
    let mut conn = conn_config("py-clear", &server.endpoint);
    conn.username = Some("operator".into());
    conn.password = Some(Secret::new("s3cret"));
    let mut c = Conn::start(conn.clone(), dir.path().join("pki"));
    c.wait_state(ConnState::Online).await;
    wait_counter_values(&mut c, 2).await;
    c.until("the password_in_cleartext event", |seen| {
        !system_errors(seen, "password_in_cleartext").is_empty()
    })
    .await;
    server.stop().await;
    c.wait_state(ConnState::Offline).await;
    let server = PyServer::start(port, &args).await;
    wait_counter_values(&mut c, 2).await;
    c.wait_status_events(3).await;
    assert_eq!(c.status_events(), ["online", "offline", "online"]);
    let events = system_errors(&c.seen, "password_in_cleartext");
    assert_eq!(events.len(), 1, "{events:?}");
    assert!(!events[0].to_string().contains("s3cret"));
    c.stop().await;
    server.stop().await;

    // This server offers encrypting policies: its user token policy on the
    // None endpoint encrypts the password. The event would come before the
    // `online` status event (it is sent before connecting).
    let server = PyServer::start(0, &args[..4]).await;
    let mut conn = conn_config("py-token-encrypted", &server.endpoint);
    conn.username = Some("operator".into());
    conn.password = Some(Secret::new("s3cret"));
    let mut c = Conn::start(conn, dir.path().join("pki"));
    c.wait_state(ConnState::Online).await;
    wait_counter_values(&mut c, 2).await;
    c.wait_status_events(1).await;
    assert!(system_errors(&c.seen, "password_in_cleartext").is_empty());
    c.stop().await;
    server.stop().await;
}
