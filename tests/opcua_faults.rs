//! Faults a plant OPC UA server can produce, against our simulator (real
//! sockets, real sessions, real PKI files): a value too large for a record or
//! for the decoder, a server certificate that changes on an endpoint trusted
//! on first use, a password that would travel in cleartext. The same faults
//! against the independent python server are in tests/interop_asyncua.rs.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use plantgate::config::{
    Backfill, ConnectionConfig, DeltavConfig, ProfileConfig, SecurityMode, SecurityPolicy,
    TagConfig, UnitConfig,
};
use plantgate::record::{Kind, NewRecord};
use plantgate::secret::Secret;
use plantgate::sim::{start_deltav, SimOptions, SimServer, SimValue};
use plantgate::status::{ConnState, DropReason};
use serde_json::Value;

use common::conn::Conn;

const NS: &str = "urn:plantgate:sim:deltav";

fn tag(name: &str, node: &str) -> TagConfig {
    TagConfig {
        name: name.into(),
        node: format!("nsu={NS};s={node}"),
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
        reconnect_initial: Duration::from_millis(200),
        reconnect_max: Duration::from_secs(1),
        events: vec![
            plantgate::record::EventType::ConnectionStatusChanged,
            plantgate::record::EventType::ConnectionAuthRequired,
            plantgate::record::EventType::SystemError,
        ],
        backfill: Backfill::Off,
        backfill_max: Duration::from_secs(3600),
        tags,
        profile: ProfileConfig::Generic,
    }
}

async fn sim(pki: &Path, port: u16, user: bool) -> SimServer {
    common::init_tracing();
    let mut opts = SimOptions::new(pki);
    // Frozen process: only the test changes values.
    opts.speed = 0.0;
    opts.listen.set_port(port);
    if user {
        opts.user = Some(("operator".into(), "s3cret".into()));
    }
    start_deltav(opts, plantgate::sim::SimExtras::default())
        .await
        .expect("simulator starts")
}

/// The server certificate's thumbprint as the agent reports it.
fn thumbprint(server_pki: &Path) -> String {
    let der = std::fs::read(server_pki.join("own/cert.der")).expect("server certificate");
    opcua::crypto::X509::from_der(&der)
        .expect("DER certificate")
        .thumbprint()
        .as_hex_string()
}

fn files(dir: &Path) -> Vec<PathBuf> {
    match std::fs::read_dir(dir) {
        Ok(entries) => entries.map(|e| e.expect("dir entry").path()).collect(),
        Err(_) => Vec::new(),
    }
}

fn tag_records<'a>(seen: &'a [NewRecord], name: &'a str) -> impl Iterator<Item = Value> + 'a {
    seen.iter()
        .filter(|r| r.kind == Kind::Tag)
        .map(NewRecord::data_json)
        .filter(move |d| d["name"] == name)
}

fn has_value(seen: &[NewRecord], name: &str, v: f64) -> bool {
    tag_records(seen, name).any(|d| d["value"].as_f64() == Some(v))
}

/// Details of the `system.error` events whose `error` is `error`.
fn system_errors(seen: &[NewRecord], error: &str) -> Vec<Value> {
    seen.iter()
        .filter(|r| r.kind == Kind::Event)
        .map(NewRecord::data_json)
        .filter(|d| d["type"] == "system.error")
        .map(|d| d["details"].clone())
        .filter(|d| d["error"] == error)
        .collect()
}

fn status_events(seen: &[NewRecord]) -> Vec<String> {
    seen.iter()
        .filter(|r| r.kind == Kind::Event && r.data_json()["type"] == "connection.status_changed")
        .filter_map(|r| {
            r.data_json()["details"]["state"]
                .as_str()
                .map(str::to_string)
        })
        .collect()
}

fn is_too_large_record(d: &Value) -> bool {
    d["value"].is_null() && d["quality"] == "bad" && d["status"] == "BadEncodingLimitsExceeded"
}

/// docs/guarantees.md: a 70 000-byte string (over the 65 535 limit OPC UA stacks use
/// by default, which used to close the transport in a loop) costs its tag a
/// bad record; a value over even the raised decoder limit costs the one
/// publish response that carried it. Neither touches the connection or the
/// other tag, and both are counted and announced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_values_cost_their_tag_not_the_connection() {
    let dir = tempfile::tempdir().unwrap();
    let server = sim(&dir.path().join("server-pki"), 0, false).await;
    let conn = conn_config(
        "big",
        &server.endpoint(),
        vec![tag("Big", "FIC-101/PV.CV"), tag("Other", "TIC-201/PV.CV")],
    );
    let mut c = Conn::start(conn, dir.path().join("pki"));
    c.wait_state(ConnState::Online).await;

    // Two oversized values in a row (a string, then a ByteString), each
    // followed by a normal value of the other tag.
    server.set_value("FIC-101/PV.CV", SimValue::String("x".repeat(70_000)));
    server.set_value("TIC-201/PV.CV", 1.5);
    c.until("a bad Big record and Other = 1.5", |seen| {
        tag_records(seen, "Big").any(|d| is_too_large_record(&d)) && has_value(seen, "Other", 1.5)
    })
    .await;
    server.set_value("FIC-101/PV.CV", SimValue::Bytes(vec![7; 100_000]));
    server.set_value("TIC-201/PV.CV", 2.5);
    c.until("two bad Big records and Other = 2.5", |seen| {
        tag_records(seen, "Big").filter(is_too_large_record).count() == 2
            && has_value(seen, "Other", 2.5)
    })
    .await;
    // Back to a normal value: a good record again.
    server.set_value("FIC-101/PV.CV", 3.5);
    c.until("Big = 3.5", |seen| has_value(seen, "Big", 3.5))
        .await;
    c.until("the value_too_large event", |seen| {
        !system_errors(seen, "value_too_large").is_empty()
    })
    .await;
    assert_eq!(c.dropped(DropReason::ValueTooLarge), 2);
    // Once per tag, not once per value.
    let events = system_errors(&c.seen, "value_too_large");
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["tag"], "Big");
    assert_eq!(events[0]["bytes"], 70_000);
    eprintln!("oversized value: {}", events[0]["message"]);

    // 17 MB: over the decoder's 16 MiB message limit. The server refuses to
    // send the response (BadResponseTooLarge); its values are lost, counted.
    server.set_value("FIC-101/PV.CV", SimValue::String("y".repeat(17_000_000)));
    c.until("the response_too_large event", |seen| {
        !system_errors(seen, "response_too_large").is_empty()
    })
    .await;
    assert!(c.dropped(DropReason::ValueTooLarge) >= 3);
    server.set_value("TIC-201/PV.CV", 4.5);
    c.until("Other = 4.5 after the refused response", |seen| {
        has_value(seen, "Other", 4.5)
    })
    .await;
    let event = &system_errors(&c.seen, "response_too_large")[0];
    eprintln!("response too large: {}", event["message"]);

    // No reconnect at any point: online once, nothing after.
    assert_eq!(c.status().state, ConnState::Online);
    assert_eq!(status_events(&c.seen), ["online"]);
    c.stop().await;
    server.shutdown().await;
}

/// A node the DeltaV profile reads (BATCH_ID) with an oversized value: the
/// profile ignores that value (it is not a tag: no tag record), the loss is
/// counted and announced, and the next normal value starts the batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_profile_value_is_ignored_by_the_profile_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let server = sim(&dir.path().join("server-pki"), 0, false).await;
    let mut conn = conn_config("deltav-big", &server.endpoint(), vec![]);
    conn.profile = ProfileConfig::Deltav(DeltavConfig {
        node_template: Some(format!("nsu={NS};s={{unit}}/{{param}}.CV")),
        units: vec![UnitConfig {
            name: "REACTOR_101".into(),
            recipe_parameters: vec![],
        }],
    });
    let mut c = Conn::start(conn, dir.path().join("pki"));
    c.wait_state(ConnState::Online).await;

    server.set_value(
        "REACTOR_101/BATCH_ID.CV",
        SimValue::String("B".repeat(70_000)),
    );
    c.until("the value_too_large event", |seen| {
        !system_errors(seen, "value_too_large").is_empty()
    })
    .await;
    let event = system_errors(&c.seen, "value_too_large")[0].clone();
    assert!(
        event["node"]
            .as_str()
            .unwrap()
            .contains("REACTOR_101/BATCH_ID.CV"),
        "{event}"
    );
    assert_eq!(c.dropped(DropReason::ValueTooLarge), 1);

    server.set_value("REACTOR_101/BATCH_ID.CV", "B-17");
    c.until("batch_started for B-17", |seen| {
        seen.iter().any(|r| {
            r.kind == Kind::Batch
                && r.data_json()["event"] == "batch_started"
                && r.data_json()["batch_id"] == "B-17"
        })
    })
    .await;
    // The oversized value started no batch and made no tag record.
    let batches: Vec<Value> = c
        .seen
        .iter()
        .filter(|r| r.kind == Kind::Batch)
        .map(NewRecord::data_json)
        .collect();
    assert_eq!(batches.len(), 1, "{batches:?}");
    assert!(c.seen.iter().all(|r| r.kind != Kind::Tag));
    assert_eq!(status_events(&c.seen), ["online"]);
    c.stop().await;
    server.shutdown().await;
}

/// `trust_unknown_server_cert`: the first certificate of an endpoint is
/// pinned; another one on the same endpoint later is refused (rejected/,
/// state `untrusted`, one `system.error` with both thumbprints). With the
/// flag off the operator's files decide, as documented: moving the refused
/// certificate from rejected/ to trusted/ accepts it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trust_on_first_use_pins_the_first_certificate_only() {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    let (pki_a, pki_b) = (dir.path().join("server-a"), dir.path().join("server-b"));
    let a = sim(&pki_a, 0, false).await;
    let endpoint = a.endpoint();
    let port: u16 = endpoint
        .trim_end_matches('/')
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("port");
    let mut conn = conn_config("tofu", &endpoint, vec![tag("PV", "FIC-101/PV.CV")]);
    conn.security_policy = SecurityPolicy::Basic256Sha256;
    conn.security_mode = SecurityMode::SignAndEncrypt;
    conn.trust_unknown_server_cert = true;

    let mut c = Conn::start(conn.clone(), pki.clone());
    c.wait_state(ConnState::Online).await;
    a.set_value("FIC-101/PV.CV", 1.0);
    c.until("a value from server A", |seen| has_value(seen, "PV", 1.0))
        .await;
    let (thumb_a, trusted_a) = (thumbprint(&pki_a), files(&pki.join("trusted")));
    assert_eq!(trusted_a.len(), 1, "{trusted_a:?}");
    let pins = files(&pki.join("pinned"));
    assert_eq!(pins.len(), 1, "{pins:?}");
    let pin: Value = serde_json::from_slice(&std::fs::read(&pins[0]).unwrap()).unwrap();
    assert_eq!(pin["thumbprint"], thumb_a.as_str());
    assert_eq!(pin["endpoint"], endpoint.as_str());

    // Another server (another key, another certificate) on the same endpoint.
    a.shutdown().await;
    let b = sim(&pki_b, port, false).await;
    assert_eq!(b.endpoint(), endpoint);
    let thumb_b = thumbprint(&pki_b);
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
    eprintln!("changed certificate: {}", event["message"]);
    let rejected = files(&pki.join("rejected"));
    assert_eq!(rejected.len(), 1, "{rejected:?}");
    assert_eq!(files(&pki.join("trusted")), trusted_a, "B was not trusted");
    c.stop().await;

    // The flag off: the agent trusts nothing new, B stays refused...
    conn.trust_unknown_server_cert = false;
    let mut c = Conn::start(conn.clone(), pki.clone());
    c.wait_state(ConnState::Untrusted).await;
    // ...until the operator moves it from rejected/ to trusted/.
    let moved = pki.join("trusted").join(rejected[0].file_name().unwrap());
    std::fs::rename(&rejected[0], &moved).unwrap();
    c.wait_state(ConnState::Online).await;
    b.set_value("FIC-101/PV.CV", 3.0);
    c.until("a value from server B once trusted", |seen| {
        has_value(seen, "PV", 3.0)
    })
    .await;
    c.stop().await;
    b.shutdown().await;
}

/// A password on a channel without security, where the server's user token
/// policy does not encrypt it either (async-opcua servers advertise none):
/// an error-level log line and one `system.error` per connection start, not
/// one per reconnect. The same identity on an encrypted channel: nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleartext_password_is_announced_once_per_connection_start() {
    let dir = tempfile::tempdir().unwrap();
    let server_pki = dir.path().join("server-pki");
    let server = sim(&server_pki, 0, true).await;
    let endpoint = server.endpoint();
    let port = endpoint
        .trim_end_matches('/')
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("port");
    let mut conn = conn_config("clear", &endpoint, vec![tag("PV", "FIC-101/PV.CV")]);
    conn.username = Some("operator".into());
    conn.password = Some(Secret::new("s3cret"));
    let mut c = Conn::start(conn.clone(), dir.path().join("pki"));
    c.wait_state(ConnState::Online).await;
    c.until("the password_in_cleartext event", |seen| {
        !system_errors(seen, "password_in_cleartext").is_empty()
    })
    .await;
    let event = system_errors(&c.seen, "password_in_cleartext")[0].clone();
    assert_eq!(event["endpoint"], endpoint.as_str());
    assert!(
        !event.to_string().contains("s3cret"),
        "no secret in {event}"
    );

    // A server restart: the connection reconnects, and does not repeat it.
    server.shutdown().await;
    c.wait_state(ConnState::Offline).await;
    let server = sim(&server_pki, port, true).await;
    c.wait_state(ConnState::Online).await;
    server.set_value("FIC-101/PV.CV", 5.0);
    c.until("a value after the reconnect", |seen| {
        has_value(seen, "PV", 5.0)
    })
    .await;
    assert_eq!(status_events(&c.seen), ["online", "offline", "online"]);
    assert_eq!(system_errors(&c.seen, "password_in_cleartext").len(), 1);
    c.stop().await;

    // Encrypted channel: the password is protected, no warning. The event
    // would precede the `online` status event (it is sent before connecting).
    let mut secure = conn.clone();
    secure.id = "secure".into();
    secure.security_policy = SecurityPolicy::Basic256Sha256;
    secure.security_mode = SecurityMode::SignAndEncrypt;
    secure.trust_unknown_server_cert = true;
    let mut c = Conn::start(secure, dir.path().join("pki"));
    c.wait_state(ConnState::Online).await;
    c.until("the online status event", |seen| {
        status_events(seen).iter().any(|s| s == "online")
    })
    .await;
    assert!(system_errors(&c.seen, "password_in_cleartext").is_empty());
    c.stop().await;
    server.shutdown().await;
}
