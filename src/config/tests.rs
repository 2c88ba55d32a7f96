//! Loader tests: everything through `load_from`, so no process environment
//! is touched and the tests can run in parallel.

use std::collections::HashMap;
use std::io::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use super::*;

const MINIMAL: &str = r#"
[agent]
id = "plant1-gw1"
site = "plant1"

[mqtt]
url = "mqtts://broker.example.com"
"#;

fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn ok(text: &str) -> Loaded {
    match load_from(text, &HashMap::new()) {
        Ok(l) => l,
        Err(e) => panic!("expected a valid config, got:\n{e}"),
    }
}

fn problems(text: &str, env: &HashMap<String, String>) -> Vec<Problem> {
    match load_from(text, env) {
        Ok(_) => panic!("expected problems for:\n{text}"),
        Err(e) => e.problems,
    }
}

/// Asserts exactly one problem, at `path`, whose message contains `needle`.
fn one_problem(text: &str, path: &str, needle: &str) {
    one_problem_env(text, &HashMap::new(), path, needle);
}

fn one_problem_env(text: &str, env: &HashMap<String, String>, path: &str, needle: &str) {
    let ps = problems(text, env);
    assert_eq!(ps.len(), 1, "expected one problem at {path}, got {ps:#?}");
    assert_eq!(ps[0].path, path, "{ps:#?}");
    assert!(
        ps[0].message.contains(needle),
        "message {:?} lacks {needle:?}",
        ps[0].message
    );
}

fn with_connection(conn: &str) -> String {
    format!("{MINIMAL}\n[[connections]]\n{conn}")
}

const DELTAV: &str = r#"
id = "deltav-line1"
kind = "deltav"
endpoint = "opc.tcp://10.1.2.3:4840"
"#;

#[test]
fn minimal_config_gets_spec_defaults() {
    let l = ok(MINIMAL);
    assert!(l.warnings.is_empty(), "{:?}", l.warnings);
    let c = l.config;
    assert_eq!(c.agent.id, "plant1-gw1");
    assert_eq!(c.agent.site, "plant1");
    assert_eq!(
        c.agent.data_dir,
        std::path::PathBuf::from("/var/lib/plantgate")
    );
    assert_eq!(
        c.health.listen,
        "127.0.0.1:9870".parse::<SocketAddr>().unwrap()
    );
    let m = &c.mqtt;
    assert_eq!(m.host, "broker.example.com");
    assert_eq!(m.port, 8883);
    assert!(m.tls);
    assert!(!m.allow_plaintext);
    assert!(m.ca_file.is_none() && m.client_cert_file.is_none() && m.client_key_file.is_none());
    assert!(m.username.is_none() && m.password.is_none());
    assert_eq!(m.protocol, MqttProtocol::V5);
    assert_eq!(m.topic_prefix, "plantgate");
    assert_eq!(m.keep_alive, Duration::from_secs(30));
    assert_eq!(m.heartbeat_interval, Duration::from_secs(30));
    assert_eq!(m.max_message_bytes, 128 * 1024);
    assert_eq!(m.reconnect_initial, Duration::from_secs(1));
    assert_eq!(m.reconnect_max, Duration::from_secs(60));
    assert_eq!(c.buffer.max_size, 1 << 30);
    assert_eq!(c.buffer.max_age, Duration::from_secs(7 * 86_400));
    assert_eq!(c.buffer.synchronous, Synchronous::Normal);
    assert_eq!(c.buffer.headroom_warning, Duration::from_secs(3_600));
    assert!(c.connections.is_empty());
}

#[test]
fn replay_keys_have_documented_defaults() {
    let c = ok(MINIMAL).config;
    assert_eq!(c.buffer.retain_delivered, Duration::from_secs(24 * 3_600));
    assert_eq!(c.mqtt.replay_max_records, 100_000);
}

#[test]
fn replay_keys_take_explicit_values() {
    let c = ok(&format!(
        "{MINIMAL}replay_max_records = 500\n[buffer]\nretain_delivered = \"2h\""
    ))
    .config;
    assert_eq!(c.buffer.retain_delivered, Duration::from_secs(2 * 3_600));
    assert_eq!(c.mqtt.replay_max_records, 500);

    // Zero keeps nothing: acknowledged records go on PUBACK.
    let c = ok(&format!("{MINIMAL}\n[buffer]\nretain_delivered = \"0s\"")).config;
    assert_eq!(c.buffer.retain_delivered, Duration::ZERO);
    // One record per request is the smallest useful limit.
    assert_eq!(
        ok(&format!("{MINIMAL}replay_max_records = 1"))
            .config
            .mqtt
            .replay_max_records,
        1
    );
}

#[test]
fn replay_key_errors_name_the_key() {
    one_problem(
        &format!("{MINIMAL}\n[buffer]\nretain_delivered = \"soon\""),
        "buffer.retain_delivered",
        "soon",
    );
    one_problem(
        &format!("{MINIMAL}\n[buffer]\nretain_delivered = 86400"),
        "buffer.retain_delivered",
        "expected a duration",
    );
    one_problem(
        &format!("{MINIMAL}replay_max_records = 0"),
        "mqtt.replay_max_records",
        "at least 1",
    );
    one_problem(
        &format!("{MINIMAL}replay_max_records = -5"),
        "mqtt.replay_max_records",
        "negative",
    );
    one_problem(
        &format!("{MINIMAL}replay_max_records = \"500\""),
        "mqtt.replay_max_records",
        "expected a whole number, found a string",
    );
    one_problem(
        &format!("{MINIMAL}replay_max_records = 1.5"),
        "mqtt.replay_max_records",
        "found a float",
    );
    // A typo is caught like any other key's.
    one_problem(
        &format!("{MINIMAL}\n[buffer]\nretain_deliverd = \"1h\""),
        "buffer.retain_deliverd",
        "did you mean \"retain_delivered\"",
    );
}

#[test]
fn replay_keys_from_the_environment() {
    let e = env(&[
        ("PLANTGATE__BUFFER__RETAIN_DELIVERED", "0s"),
        ("PLANTGATE__MQTT__REPLAY_MAX_RECORDS", "250"),
    ]);
    let c = load_from(
        &format!("{MINIMAL}\n[buffer]\nretain_delivered = \"48h\""),
        &e,
    )
    .unwrap_or_else(|e| panic!("{e}"))
    .config;
    assert_eq!(c.buffer.retain_delivered, Duration::ZERO);
    assert_eq!(c.mqtt.replay_max_records, 250);
    one_problem_env(
        MINIMAL,
        &env(&[("PLANTGATE__BUFFER__RETAIN_DELIVERED", "later")]),
        "buffer.retain_delivered",
        "later",
    );
    one_problem_env(
        MINIMAL,
        &env(&[("PLANTGATE__MQTT__REPLAY_MAX_RECORDS", "many")]),
        "mqtt.replay_max_records",
        "\"many\"",
    );
    one_problem_env(
        MINIMAL,
        &env(&[("PLANTGATE__MQTT__REPLAY_MAX_RECORDS", "0")]),
        "mqtt.replay_max_records",
        "at least 1",
    );
}

#[test]
fn render_shows_the_replay_keys_and_loads_back() {
    let out = render(&ok(MINIMAL).config);
    assert!(out.contains("retain_delivered = \"1d\""), "{out}");
    assert!(out.contains("replay_max_records = 100000"), "{out}");

    let text = format!("{MINIMAL}replay_max_records = 7\n[buffer]\nretain_delivered = \"0s\"");
    let out = render(&ok(&text).config);
    assert!(out.contains("replay_max_records = 7"), "{out}");
    let again = ok(&out).config;
    assert_eq!(again.buffer.retain_delivered, Duration::ZERO);
    assert_eq!(again.mqtt.replay_max_records, 7);
    assert_eq!(render(&again), out);
}

#[test]
fn backfill_keys_name_their_problems() {
    let c = ok(&with_connection(
        "id = \"g\"\nkind = \"generic\"\nendpoint = \"opc.tcp://h:1\"\nbackfill = \"history\"\nbackfill_max = \"10m\"",
    ))
    .config;
    assert_eq!(c.connections[0].backfill, Backfill::History);
    assert_eq!(c.connections[0].backfill_max, Duration::from_secs(600));
    one_problem(
        &with_connection(
            "id = \"g\"\nkind = \"generic\"\nendpoint = \"opc.tcp://h:1\"\nbackfill = \"yes\"",
        ),
        "connections[0].backfill",
        "is not \"off\" or \"history\"",
    );
    one_problem(
        &with_connection(
            "id = \"g\"\nkind = \"generic\"\nendpoint = \"opc.tcp://h:1\"\nbackfill_max = \"0s\"",
        ),
        "connections[0].backfill_max",
        "must be greater than zero",
    );
}

#[test]
fn connection_defaults_are_secure() {
    let c = ok(&with_connection(DELTAV)).config;
    let conn = &c.connections[0];
    assert_eq!(conn.id, "deltav-line1");
    assert_eq!(conn.kind(), ConnectionKind::Deltav);
    assert_eq!(conn.security_policy, SecurityPolicy::Basic256Sha256);
    assert_eq!(conn.security_mode, SecurityMode::SignAndEncrypt);
    assert!(!conn.trust_unknown_server_cert);
    assert_eq!(conn.publishing_interval, Duration::from_millis(500));
    assert_eq!(conn.sampling_interval, Duration::from_millis(250));
    assert_eq!(conn.reconnect_initial, Duration::from_secs(1));
    assert_eq!(conn.reconnect_max, Duration::from_secs(60));
    assert_eq!(
        conn.events,
        [
            "connection.status_changed",
            "connection.auth_required",
            "sync.completed",
            "system.error",
            "source.dropped",
            "backfill.completed"
        ]
    );
    assert_eq!(conn.backfill, Backfill::Off);
    assert_eq!(conn.backfill_max, Duration::from_secs(3600));
    let ProfileConfig::Deltav(dv) = &conn.profile else {
        panic!("not a DeltaV profile: {:?}", conn.profile)
    };
    assert!(dv.node_template.is_none() && dv.units.is_empty() && conn.tags.is_empty());

    let c = ok(&with_connection(
        "id = \"m\"\nkind = \"optomes\"\nendpoint = \"opc.tcp://h:1\"",
    ))
    .config;
    let ProfileConfig::Optomes(mes) = &c.connections[0].profile else {
        panic!("not an OptoMES profile: {:?}", c.connections[0].profile)
    };
    assert_eq!(mes.oee_window, Duration::from_secs(60));
    assert!(mes.node_template.is_none() && mes.work_centers.is_empty());
    assert!(matches!(
        ok(&with_connection(
            "id = \"g\"\nkind = \"Generic\"\nendpoint = \"opc.tcp://h:1\""
        ))
        .config
        .connections[0]
            .profile,
        ProfileConfig::Generic
    ));
}

#[test]
fn full_spec_example_loads() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    let crt = dir.path().join("gw1.crt");
    let key = dir.path().join("gw1.key");
    for f in [&ca, &crt, &key] {
        std::fs::write(f, "pem").unwrap();
    }
    let text = format!(
        r#"
[agent]
id = "plant1-gw1"
site = "plant1"
data_dir = "/tmp/pg"

[health]
listen = "0.0.0.0:9999"

[mqtt]
url = "mqtts://broker.example.com:8884"
allow_plaintext = false
ca_file = "{ca}"
client_cert_file = "{crt}"
client_key_file = "{key}"
username = "gw1"
password_env = "MQTT_PASSWORD"
protocol = "v311"
topic_prefix = "acme/plantgate"
keep_alive = "45s"
heartbeat_interval = "10s"
max_message_bytes = "256KiB"
reconnect_initial = "2s"
reconnect_max = "2m"

[buffer]
max_size = "512MiB"
max_age = "2d"
synchronous = "full"
headroom_warning = "0s"

[[connections]]
id = "deltav-line1"
kind = "deltav"
endpoint = "opc.tcp://10.1.2.3:4840"
security_policy = "Aes256Sha256RsaPss"
security_mode = "Sign"
username = "plantgate"
password_env = "DELTAV_PASSWORD"
publishing_interval = "1s"
sampling_interval = "100ms"
events = ["connection.status_changed", "buffer.evicted"]
node_template = "ns=2;s={{unit}}/{{param}}.CV"

[[connections.units]]
name = "REACTOR_101"
recipe_parameters = ["CHARGE_AMT", "REACT_TEMP_SP", "REACT_TIME"]

[[connections.tags]]
name = "FIC-101.PV"
node = "nsu=urn:example:deltav;s=FIC-101/PV.CV"
sampling_interval = "1s"
deadband = 0.5

[[connections]]
id = "optomes-1"
kind = "optomes"
endpoint = "opc.tcp://mes:4840"
oee_window = "5m"

[[connections.work_centers]]
name = "LINE_A_FILLER"

[[connections.tags]]
name = "T1"
node = "ns=3;i=1001"
deadband = 2

[[connections]]
id = "gen"
kind = "generic"
endpoint = "opc.tcp://gen:4840"
security_policy = "None"

[[connections.tags]]
name = "T1"
node = "i=2258"
"#,
        ca = ca.display(),
        crt = crt.display(),
        key = key.display()
    );
    let l = load_from(
        &text,
        &env(&[
            ("MQTT_PASSWORD", "mq-secret"),
            ("DELTAV_PASSWORD", "dv-secret"),
        ]),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let c = &l.config;
    assert_eq!(c.health.listen.port(), 9999);
    assert_eq!(c.mqtt.port, 8884);
    assert_eq!(c.mqtt.protocol, MqttProtocol::V311);
    assert_eq!(c.mqtt.password.as_ref().unwrap().expose(), "mq-secret");
    assert_eq!(c.mqtt.reconnect_max, Duration::from_secs(120));
    assert_eq!(c.mqtt.max_message_bytes, 256 * 1024);
    assert_eq!(c.buffer.synchronous, Synchronous::Full);
    assert_eq!(c.buffer.headroom_warning, Duration::ZERO, "0s turns it off");
    let dv = &c.connections[0];
    assert_eq!(dv.password.as_ref().unwrap().expose(), "dv-secret");
    assert_eq!(dv.security_policy, SecurityPolicy::Aes256Sha256RsaPss);
    assert_eq!(dv.security_mode, SecurityMode::Sign);
    let ProfileConfig::Deltav(dv_profile) = &dv.profile else {
        panic!("not a DeltaV profile: {:?}", dv.profile)
    };
    assert_eq!(dv_profile.units[0].recipe_parameters.len(), 3);
    assert_eq!(dv.tags[0].sampling_interval, Some(Duration::from_secs(1)));
    assert_eq!(dv.tags[0].deadband, Some(0.5));
    assert_eq!(dv.events, ["connection.status_changed", "buffer.evicted"]);
    let mes = &c.connections[1];
    let ProfileConfig::Optomes(mes_profile) = &mes.profile else {
        panic!("not an OptoMES profile: {:?}", mes.profile)
    };
    assert_eq!(mes_profile.oee_window, Duration::from_secs(300));
    assert_eq!(mes_profile.work_centers[0].name, "LINE_A_FILLER");
    assert_eq!(mes.tags[0].deadband, Some(2.0));
    // Tag names are unique per connection, not globally.
    let gen = &c.connections[2];
    assert_eq!(gen.security_policy, SecurityPolicy::None);
    assert_eq!(
        gen.security_mode,
        SecurityMode::None,
        "None policy implies None mode"
    );
    assert!(l
        .warnings
        .iter()
        .any(|w| w.starts_with("connections[2].security_policy")));

    let rendered = render(c);
    assert!(!rendered.contains("mq-secret") && !rendered.contains("dv-secret"));
    assert!(
        rendered.contains("[[connections.units]]\nname = \"REACTOR_101\""),
        "{rendered}"
    );
    assert!(rendered.contains("deadband = 0.5"), "{rendered}");
    // `check` output is itself a loadable config (the masked password loads
    // as an inline one).
    let again = load_from(&rendered, &HashMap::new()).unwrap_or_else(|e| panic!("{e}\n{rendered}"));
    assert_eq!(render(&again.config), rendered);
    assert!(
        !rendered.contains("oee_window = \"1m\"\nunits"),
        "{rendered}"
    );
}

#[test]
fn missing_required_keys_are_named() {
    let ps = problems("", &HashMap::new());
    let paths: Vec<&str> = ps.iter().map(|p| p.path.as_str()).collect();
    assert_eq!(paths, ["agent.id", "agent.site", "mqtt.url"]);
    assert!(ps.iter().all(|p| p.message.starts_with("required")));
}

#[test]
fn bad_identifiers() {
    one_problem(
        &MINIMAL.replace("plant1-gw1", "plant 1"),
        "agent.id",
        "letters, digits",
    );
    one_problem(
        &MINIMAL.replace("\"plant1\"", "\"a/b\""),
        "agent.site",
        "\"a/b\"",
    );
    one_problem(
        &MINIMAL.replace("\"plant1\"", "\"\""),
        "agent.site",
        "empty",
    );
}

#[test]
fn unknown_keys_with_suggestions() {
    one_problem(
        &MINIMAL.replace("url =", "urll ="),
        "mqtt.urll",
        "did you mean \"url\"?",
    );
    // The missing url is reported too.
    let ps = problems(&MINIMAL.replace("url =", "urll ="), &HashMap::new());
    assert_eq!(
        ps.len(),
        1,
        "a typo'd url is reported once, as unknown: {ps:#?}"
    );
    one_problem(
        &format!("{MINIMAL}\n[bufer]\nmax_size = \"1GiB\""),
        "bufer",
        "did you mean \"buffer\"?",
    );
    one_problem(
        &format!("{MINIMAL}\n[buffer]\ncolour = 1"),
        "buffer.colour",
        "unknown key",
    );
    one_problem(
        &MINIMAL.replace("[agent]", "[agnet]"),
        "agnet",
        "did you mean \"agent\"?",
    );
    let ps = problems(&format!("{MINIMAL}\n[buffer]\ncolour = 1"), &HashMap::new());
    assert!(!ps[0].message.contains("did you mean"), "{ps:?}");
    one_problem(
        &with_connection(&format!(
            "{DELTAV}\n[[connections.tags]]\nname = \"a\"\nnode = \"i=1\"\ndeadbnd = 1"
        )),
        "connections[0].tags[0].deadbnd",
        "did you mean \"deadband\"?",
    );
}

#[test]
fn mqtt_url_rules() {
    one_problem(
        &MINIMAL.replace("mqtts://", "mqtt://"),
        "mqtt.url",
        "allow_plaintext",
    );
    let l = ok(&format!(
        "{}\nallow_plaintext = true",
        MINIMAL.replace("mqtts://", "mqtt://")
    ));
    assert_eq!(l.config.mqtt.port, 1883);
    assert!(!l.config.mqtt.tls);
    assert!(l.warnings.iter().any(|w| w.contains("plaintext")));
    one_problem(
        &MINIMAL.replace("mqtts://", "http://"),
        "mqtt.url",
        "unsupported scheme",
    );
    one_problem(
        &MINIMAL.replace("broker.example.com", "broker:99999"),
        "mqtt.url",
        "invalid port",
    );
    one_problem(
        &MINIMAL.replace("broker.example.com", ""),
        "mqtt.url",
        "no host",
    );
    let ps = problems(
        &MINIMAL.replace("mqtts://", "mqtts://user:hunter2@"),
        &HashMap::new(),
    );
    assert_eq!(ps[0].path, "mqtt.url");
    assert!(!ps[0].message.contains("hunter2"));
    let l = ok(&MINIMAL.replace("broker.example.com", "[::1]:8884"));
    assert_eq!(
        (l.config.mqtt.host.as_str(), l.config.mqtt.port),
        ("::1", 8884)
    );
}

#[test]
fn wrong_types_say_what_was_expected() {
    one_problem(
        &format!("{MINIMAL}allow_plaintext = \"yes\""),
        "mqtt.allow_plaintext",
        "expected true or false, found a string",
    );
    one_problem(
        &format!("{MINIMAL}keep_alive = 30"),
        "mqtt.keep_alive",
        "expected a duration string",
    );
    one_problem(
        &MINIMAL.replace("id = \"plant1-gw1\"", "id = 7"),
        "agent.id",
        "expected a string, found an integer",
    );
    one_problem(
        &format!("buffer = 3\n{MINIMAL}"),
        "buffer",
        "expected a table",
    );
    one_problem(
        &format!("connections = 3\n{MINIMAL}"),
        "connections",
        "expected an array of tables",
    );
    one_problem(
        &with_connection(&format!("{DELTAV}events = \"sync.completed\"")),
        "connections[0].events",
        "expected an array of strings",
    );
    one_problem(
        &with_connection(&format!("{DELTAV}events = [\"sync.completed\", 3]")),
        "connections[0].events[1]",
        "expected a string",
    );
}

#[test]
fn durations_and_sizes_name_the_bad_text() {
    one_problem(
        &format!("{MINIMAL}\n[buffer]\nmax_size = \"12 parsecs\""),
        "buffer.max_size",
        "12 parsecs",
    );
    one_problem(
        &format!("{MINIMAL}\n[buffer]\nmax_age = \"forever\""),
        "buffer.max_age",
        "forever",
    );
    one_problem(
        &format!("{MINIMAL}max_message_bytes = \"512B\""),
        "mqtt.max_message_bytes",
        "1KiB..256MiB",
    );
    one_problem(
        &format!("{MINIMAL}max_message_bytes = \"1GiB\""),
        "mqtt.max_message_bytes",
        "1KiB..256MiB",
    );
    assert_eq!(
        ok(&format!("{MINIMAL}max_message_bytes = 4096"))
            .config
            .mqtt
            .max_message_bytes,
        4096
    );
    one_problem(
        &format!("{MINIMAL}reconnect_initial = \"10s\"\nreconnect_max = \"5s\""),
        "mqtt.reconnect_max",
        "at least reconnect_initial (10s)",
    );
    one_problem(
        &format!("{MINIMAL}reconnect_initial = \"2m\""),
        "mqtt.reconnect_initial",
        "must not exceed reconnect_max (1m)",
    );
    one_problem(
        &format!("{MINIMAL}heartbeat_interval = \"0s\""),
        "mqtt.heartbeat_interval",
        "greater than zero",
    );
    one_problem(
        &format!("{MINIMAL}keep_alive = \"100ms\""),
        "mqtt.keep_alive",
        "between 1s",
    );
}

#[test]
fn other_mqtt_values() {
    one_problem(
        &format!("{MINIMAL}protocol = \"v4\""),
        "mqtt.protocol",
        "\"v4\"",
    );
    one_problem(
        &format!("{MINIMAL}topic_prefix = \"a/+/b\""),
        "mqtt.topic_prefix",
        "wildcards",
    );
    one_problem(
        &format!("{MINIMAL}topic_prefix = \"a#\""),
        "mqtt.topic_prefix",
        "wildcards",
    );
    one_problem(
        &format!("{MINIMAL}topic_prefix = \"\""),
        "mqtt.topic_prefix",
        "empty",
    );
    one_problem(
        &format!("{MINIMAL}\n[health]\nlisten = \"localhost\""),
        "health.listen",
        "IP:port",
    );
    one_problem(
        &format!("{MINIMAL}\n[buffer]\nsynchronous = \"off\""),
        "buffer.synchronous",
        "\"off\"",
    );
    one_problem(
        &format!("{MINIMAL}\n[buffer]\nheadroom_warning = \"soon\""),
        "buffer.headroom_warning",
        "soon",
    );
}

#[test]
fn tls_files_must_exist_and_pair_up() {
    let dir = tempfile::tempdir().unwrap();
    let crt = dir.path().join("c.crt");
    std::fs::write(&crt, "x").unwrap();
    let missing = dir.path().join("nope.pem");
    one_problem(
        &format!("{MINIMAL}ca_file = \"{}\"", missing.display()),
        "mqtt.ca_file",
        "nope.pem",
    );
    one_problem(
        &format!("{MINIMAL}client_cert_file = \"{}\"", crt.display()),
        "mqtt.client_key_file",
        "client_cert_file",
    );
    one_problem(
        &format!("{MINIMAL}ca_file = \"{}\"", dir.path().display()),
        "mqtt.ca_file",
        "directory",
    );
}

#[test]
fn three_mistakes_three_problems() {
    let text = r#"
[agent]
id = "gw1"
site = "plant1"

[mqtt]
url = "mqtts://broker:8883"
urll = "oops"

[buffer]
max_size = "lots"

[[connections]]
id = "a"
kind = "generic"
endpoint = "tcp://10.0.0.1:4840"
"#;
    let ps = problems(text, &HashMap::new());
    let paths: Vec<&str> = ps.iter().map(|p| p.path.as_str()).collect();
    assert_eq!(
        paths,
        ["mqtt.urll", "buffer.max_size", "connections[0].endpoint"]
    );
    let shown = ConfigError { problems: ps }.to_string();
    assert_eq!(shown.lines().count(), 3);
    assert!(shown
        .lines()
        .next()
        .unwrap()
        .starts_with("mqtt.urll: unknown key"));
    assert!(shown
        .contains("connections[0].endpoint: \"tcp://10.0.0.1:4840\" must start with opc.tcp://"));
}

#[test]
fn connection_rules() {
    one_problem(
        &with_connection("kind = \"generic\"\nendpoint = \"opc.tcp://h:1\""),
        "connections[0].id",
        "required",
    );
    one_problem(
        &with_connection("id = \"a\"\nkind = \"modbus\"\nendpoint = \"opc.tcp://h:1\""),
        "connections[0].kind",
        "\"modbus\"",
    );
    one_problem(
        &with_connection("id = \"a\"\nkind = \"generic\""),
        "connections[0].endpoint",
        "required",
    );
    one_problem(
        &with_connection("id = \"a\"\nkind = \"generic\"\nendpoint = \"opc.tcp://\""),
        "connections[0].endpoint",
        "no host",
    );
    // Duplicate ids are reported at the second one.
    let text = format!(
        "{MINIMAL}\n[[connections]]\n{DELTAV}\n[[connections]]\nid = \"x\"\nkind = \"generic\"\nendpoint = \"opc.tcp://h:1\"\n[[connections]]\n{DELTAV}"
    );
    let ps = problems(&text, &HashMap::new());
    assert_eq!(ps.len(), 1, "{ps:#?}");
    assert_eq!(ps[0].path, "connections[2].id");
    assert!(ps[0].message.contains("connections[0]"));
}

#[test]
fn security_policy_and_mode_must_agree() {
    one_problem(
        &with_connection(&format!(
            "{DELTAV}security_policy = \"None\"\nsecurity_mode = \"Sign\""
        )),
        "connections[0].security_mode",
        "requires security_mode = \"None\"",
    );
    one_problem(
        &with_connection(&format!(
            "{DELTAV}security_policy = \"Basic256Sha256\"\nsecurity_mode = \"None\""
        )),
        "connections[0].security_mode",
        "requires security_policy = \"None\"",
    );
    one_problem(
        &with_connection(&format!("{DELTAV}security_policy = \"Basic128\"")),
        "connections[0].security_policy",
        "\"Basic128\"",
    );
    one_problem(
        &with_connection(&format!("{DELTAV}security_mode = \"Encrypt\"")),
        "connections[0].security_mode",
        "\"Encrypt\"",
    );
    let c = ok(&with_connection(&format!(
        "{DELTAV}security_mode = \"None\""
    )))
    .config;
    assert_eq!(c.connections[0].security_policy, SecurityPolicy::None);
}

#[test]
fn keys_of_another_kind_are_errors() {
    one_problem(
        &with_connection("id = \"m\"\nkind = \"optomes\"\nendpoint = \"opc.tcp://h:1\"\n[[connections.units]]\nname = \"R1\""),
        "connections[0].units",
        "only valid for kind = \"deltav\"",
    );
    one_problem(
        &with_connection(&format!("{DELTAV}oee_window = \"60s\"")),
        "connections[0].oee_window",
        "only valid for kind = \"optomes\"",
    );
    one_problem(
        &with_connection(&format!(
            "{DELTAV}\n[[connections.work_centers]]\nname = \"L\""
        )),
        "connections[0].work_centers",
        "optomes",
    );
    one_problem(
        &with_connection("id = \"g\"\nkind = \"generic\"\nendpoint = \"opc.tcp://h:1\"\nnode_template = \"ns=2;s={unit}.{param}\""),
        "connections[0].node_template",
        "only valid for",
    );
}

#[test]
fn node_templates_and_events() {
    one_problem(
        &with_connection(&format!("{DELTAV}node_template = \"ns=2;s={{unit}}\"")),
        "connections[0].node_template",
        "{param}",
    );
    one_problem(
        &with_connection(&format!(
            "{DELTAV}node_template = \"ns=2;s={{work_center}}.{{param}}\""
        )),
        "connections[0].node_template",
        "unknown placeholder {work_center}",
    );
    one_problem(
        &with_connection(&format!(
            "{DELTAV}node_template = \"ns=x;s={{unit}}.{{param}}\""
        )),
        "connections[0].node_template",
        "bad namespace index",
    );
    one_problem(
        &with_connection(&format!(
            "{DELTAV}events = [\"sync.completed\", \"sync.started\"]"
        )),
        "connections[0].events[1]",
        "unknown event type \"sync.started\"",
    );
}

#[test]
fn tag_rules() {
    let tag = |body: &str| with_connection(&format!("{DELTAV}\n[[connections.tags]]\n{body}"));
    one_problem(
        &tag("node = \"i=1\""),
        "connections[0].tags[0].name",
        "required",
    );
    one_problem(
        &tag("name = \"a\""),
        "connections[0].tags[0].node",
        "required",
    );
    one_problem(
        &tag("name = \"a\"\nnode = \"ns=2;i=abc\""),
        "connections[0].tags[0].node",
        "bad numeric identifier",
    );
    one_problem(
        &tag("name = \"a\"\nnode = \"i=1\"\ndeadband = -1.0"),
        "connections[0].tags[0].deadband",
        ">= 0",
    );
    one_problem(
        &tag("name = \"a\"\nnode = \"i=1\"\ndeadband = \"big\""),
        "connections[0].tags[0].deadband",
        "expected a number",
    );
    one_problem(
        &tag("name = \"a\"\nnode = \"i=1\"\nsampling_interval = \"fast\""),
        "connections[0].tags[0].sampling_interval",
        "\"fast\"",
    );
    let text = format!(
        "{}\n[[connections.tags]]\nname = \"a\"\nnode = \"i=1\"\n[[connections.tags]]\nname = \"b\"\nnode = \"i=2\"\n[[connections.tags]]\nname = \"a\"\nnode = \"i=3\"",
        with_connection(DELTAV)
    );
    one_problem(
        &text,
        "connections[0].tags[2].name",
        "duplicate tag name \"a\"",
    );
    one_problem(
        &with_connection(&format!("{DELTAV}tags = [1]")),
        "connections[0].tags[0]",
        "expected a table",
    );
}

#[test]
fn units_and_work_centers() {
    one_problem(
        &with_connection(&format!(
            "{DELTAV}\n[[connections.units]]\nname = \"R1\"\nrecipe_parameters = [\"A\", \"A\"]"
        )),
        "connections[0].units[0].recipe_parameters[1]",
        "duplicate",
    );
    one_problem(
        &with_connection(&format!(
            "{DELTAV}\n[[connections.units]]\nname = \"R1\"\n[[connections.units]]\nname = \"R1\""
        )),
        "connections[0].units[1].name",
        "duplicate unit",
    );
    one_problem(
        &with_connection("id = \"m\"\nkind = \"optomes\"\nendpoint = \"opc.tcp://h:1\"\n[[connections.work_centers]]\nnme = \"L\""),
        "connections[0].work_centers[0].nme",
        "did you mean \"name\"?",
    );
}

#[test]
fn env_overrides_win_over_the_file() {
    let e = env(&[
        ("PLANTGATE__MQTT__URL", "mqtt://other:1884"),
        ("PLANTGATE__MQTT__ALLOW_PLAINTEXT", "true"),
        ("PLANTGATE__BUFFER__MAX_SIZE", "512MiB"),
        ("PLANTGATE__AGENT__ID", "007"),
        ("PLANTGATE__MQTT__KEEP_ALIVE", "1m"),
        ("PLANTGATE_CONFIG", "/ignored.toml"),
        ("UNRELATED", "x"),
    ]);
    let text = format!("{MINIMAL}\n[buffer]\nmax_size = \"1GiB\"");
    let c = load_from(&text, &e)
        .unwrap_or_else(|e| panic!("{e}"))
        .config;
    assert_eq!(c.mqtt.url, "mqtt://other:1884");
    assert_eq!(
        (c.mqtt.host.as_str(), c.mqtt.port, c.mqtt.tls),
        ("other", 1884, false)
    );
    assert!(c.mqtt.allow_plaintext);
    assert_eq!(c.buffer.max_size, 512 << 20);
    assert_eq!(c.agent.id, "007", "env values stay text");
    assert_eq!(c.mqtt.keep_alive, Duration::from_secs(60));

    // An override can supply a required key the file lacks.
    let c = load_from(
        "[agent]\nid = \"a\"\nsite = \"b\"",
        &env(&[("PLANTGATE__MQTT__URL", "mqtts://b")]),
    )
    .unwrap_or_else(|e| panic!("{e}"))
    .config;
    assert_eq!(c.mqtt.host, "b");

    // Empty variables count as unset.
    let c = load_from(MINIMAL, &env(&[("PLANTGATE__MQTT__URL", "")]))
        .unwrap()
        .config;
    assert_eq!(c.mqtt.host, "broker.example.com");
}

#[test]
fn env_overrides_reach_into_arrays() {
    let text = with_connection(&format!(
        "{DELTAV}\n[[connections.tags]]\nname = \"t\"\nnode = \"i=1\""
    ));
    let e = env(&[
        (
            "PLANTGATE__CONNECTIONS__0__ENDPOINT",
            "opc.tcp://env-host:4840",
        ),
        ("PLANTGATE__CONNECTIONS__0__TAGS__0__NODE", "ns=2;s=FromEnv"),
        (
            "PLANTGATE__CONNECTIONS__0__EVENTS",
            "sync.completed, system.error",
        ),
    ]);
    let c = load_from(&text, &e)
        .unwrap_or_else(|e| panic!("{e}"))
        .config;
    let conn = &c.connections[0];
    assert_eq!(conn.endpoint, "opc.tcp://env-host:4840");
    assert_eq!(conn.tags[0].node, "ns=2;s=FromEnv");
    assert_eq!(conn.events, ["sync.completed", "system.error"]);
    one_problem_env(
        &text,
        &env(&[("PLANTGATE__CONNECTIONS__0__TAGS__0__NODX", "i=2")]),
        "connections[0].tags[0].nodx",
        "PLANTGATE__CONNECTIONS__0__TAGS__0__NODX",
    );
}

#[test]
fn env_override_problems_are_named() {
    one_problem_env(
        MINIMAL,
        &env(&[("PLANTGATE__MQTT__ALLOW_PLAINTEXT", "maybe")]),
        "mqtt.allow_plaintext",
        "\"maybe\"",
    );
    one_problem_env(
        MINIMAL,
        &env(&[("PLANTGATE__MQTT__URLL", "mqtts://x")]),
        "mqtt.urll",
        "PLANTGATE__MQTT__URLL",
    );
    one_problem_env(
        MINIMAL,
        &env(&[("PLANTGATE__BUFFER__MAX_SIZE", "huge")]),
        "buffer.max_size",
        "huge",
    );
}

#[test]
fn password_env() {
    let text = format!("{MINIMAL}username = \"gw1\"\npassword_env = \"MQTT_PASSWORD\"");
    let l = load_from(&text, &env(&[("MQTT_PASSWORD", "s3cret-value")])).unwrap();
    assert_eq!(
        l.config.mqtt.password.as_ref().unwrap().expose(),
        "s3cret-value"
    );
    assert!(l.warnings.is_empty());
    assert!(!format!("{:?}", l.config).contains("s3cret-value"));

    one_problem_env(
        &text,
        &HashMap::new(),
        "mqtt.password_env",
        "MQTT_PASSWORD is not set",
    );
    one_problem_env(
        &text,
        &env(&[("MQTT_PASSWORD", "")]),
        "mqtt.password_env",
        "empty",
    );
}

#[test]
fn password_file_trims_the_final_newline() {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(b"file-secret\n").unwrap();
    let text = format!(
        "{MINIMAL}username = \"gw1\"\npassword_file = \"{}\"",
        f.path().display()
    );
    let c = ok(&text).config;
    assert_eq!(c.mqtt.password.unwrap().expose(), "file-secret");

    let ps = problems(
        &format!("{MINIMAL}password_file = \"/nonexistent/pw\""),
        &HashMap::new(),
    );
    assert_eq!(ps.len(), 1);
    assert_eq!(ps[0].path, "mqtt.password_file");
    assert!(ps[0].message.contains("/nonexistent/pw"));
}

#[test]
fn password_credential() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("mqtt-password"), "cred-secret\r\n").unwrap();
    let text = format!("{MINIMAL}username = \"gw1\"\npassword_credential = \"mqtt-password\"");
    let e = env(&[("CREDENTIALS_DIRECTORY", dir.path().to_str().unwrap())]);
    let c = load_from(&text, &e)
        .unwrap_or_else(|e| panic!("{e}"))
        .config;
    assert_eq!(c.mqtt.password.unwrap().expose(), "cred-secret");

    one_problem_env(
        &text,
        &HashMap::new(),
        "mqtt.password_credential",
        "CREDENTIALS_DIRECTORY is not set",
    );
    let other = tempfile::tempdir().unwrap();
    one_problem_env(
        &text,
        &env(&[("CREDENTIALS_DIRECTORY", other.path().to_str().unwrap())]),
        "mqtt.password_credential",
        "mqtt-password",
    );
    one_problem(
        &format!("{MINIMAL}password_credential = \"../etc/shadow\""),
        "mqtt.password_credential",
        "not a path",
    );
}

#[test]
fn inline_password_warns_and_never_leaks() {
    let text = with_connection(&format!(
        "{DELTAV}username = \"op\"\npassword = \"inline-opc-secret\""
    ));
    let text = text.replace(
        "url = \"mqtts://broker.example.com\"",
        "url = \"mqtts://broker.example.com\"\nusername = \"gw1\"\npassword = \"inline-mqtt-secret\"",
    );
    let l = ok(&text);
    assert_eq!(
        l.warnings,
        [
            "mqtt.password: inline secret in the config file; use password_env, password_file or password_credential",
            "connections[0].password: inline secret in the config file; use password_env, password_file or password_credential",
        ]
    );
    let rendered = render(&l.config);
    assert!(rendered.contains("password = \"***\""), "{rendered}");
    for leak in [rendered, format!("{:?}", l.config), l.warnings.join("\n")] {
        assert!(!leak.contains("inline-mqtt-secret") && !leak.contains("inline-opc-secret"));
    }
}

#[test]
fn one_password_source_only() {
    let text = format!("{MINIMAL}username = \"u\"\npassword = \"inline-x\"\npassword_env = \"P\"");
    let ps = problems(&text, &env(&[("P", "env-x")]));
    assert_eq!(ps.len(), 1, "{ps:#?}");
    assert_eq!(ps[0].path, "mqtt.password_env");
    assert!(ps[0].message.contains("only one"));
    assert!(!ps[0].message.contains("inline-x") && !ps[0].message.contains("env-x"));
}

#[test]
fn opc_password_needs_a_username() {
    one_problem_env(
        &with_connection(&format!("{DELTAV}password_env = \"P\"")),
        &env(&[("P", "x")]),
        "connections[0].username",
        "required with password_env",
    );
}

#[test]
fn secrets_never_appear_in_problems() {
    let text = format!("{MINIMAL}password = 12345\nunknown_key = \"hunter2\"");
    let ps = problems(&text, &HashMap::new());
    let shown = ConfigError { problems: ps }.to_string();
    assert!(
        !shown.contains("12345") && !shown.contains("hunter2"),
        "{shown}"
    );
    // A TOML error quoting the broken line is scrubbed of the source text.
    let err = load_from(&format!("{MINIMAL}password = \"hunter2"), &HashMap::new()).unwrap_err();
    assert_eq!(err.problems.len(), 1);
    assert_eq!(err.problems[0].path, "config");
    assert!(!err.to_string().contains("hunter2"), "{err}");
}

#[test]
fn toml_syntax_and_missing_file() {
    let err = load_from("[agent\nid = 1", &HashMap::new()).unwrap_err();
    assert_eq!(err.problems.len(), 1);
    assert_eq!(err.problems[0].path, "config");
    assert!(err.problems[0].message.contains("invalid TOML"), "{err}");
    assert!(err.problems[0].message.contains("line 1"), "{err}");

    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("plantgate.toml");
    let err = load(&missing).unwrap_err();
    assert_eq!(err.problems.len(), 1);
    assert_eq!(err.problems[0].path, missing.display().to_string());
    assert!(err.problems[0].message.contains("not found"));

    std::fs::write(&missing, MINIMAL).unwrap();
    // Only process-env-independent assertions: the real environment may hold
    // PLANTGATE__ variables on a developer machine.
    if std::env::vars().all(|(k, _)| !k.starts_with("PLANTGATE__")) {
        assert_eq!(load(&missing).unwrap().config.agent.id, "plant1-gw1");
    }
}

#[test]
fn render_is_toml_with_masked_secrets() {
    let text = format!("{MINIMAL}username = \"gw1\"\npassword_env = \"P\"");
    let l = load_from(&text, &env(&[("P", "render-secret")])).unwrap();
    let out = render(&l.config);
    assert!(out.contains("***"));
    assert!(!out.contains("render-secret"));
    assert!(
        out.starts_with("[agent]\nid = \"plant1-gw1\"\nsite = \"plant1\""),
        "{out}"
    );
    assert!(out.contains("keep_alive = \"30s\""));
    assert!(out.contains("max_age = \"7d\""));
    assert!(out.contains("max_size = \"1GiB\""));
    assert!(out.contains("max_message_bytes = \"128KiB\""));
    assert!(
        !out.contains("host =") && !out.contains("tls ="),
        "derived values stay out: {out}"
    );
    assert!(out.contains("listen = \"127.0.0.1:9870\""));
}

/// `plantgate check` prints a connection's keys in the order of the key
/// table (docs/configuration.md), `kind` second, whatever order the model
/// serializes them in; keys of other kinds never show.
#[test]
fn render_keeps_the_documented_key_order_per_kind() {
    let text = format!(
        "{MINIMAL}\n[[connections]]\nid = \"m\"\nkind = \"optomes\"\nendpoint = \"opc.tcp://h:1\"\n\
         node_template = \"ns=2;s={{work_center}}.{{param}}\"\n\
         [[connections.work_centers]]\nname = \"L\"\n\
         [[connections]]\nid = \"g\"\nkind = \"generic\"\nendpoint = \"opc.tcp://h:2\"\n"
    );
    let out = render(&ok(&text).config);
    assert!(
        out.contains(
            "[[connections]]\nid = \"m\"\nkind = \"optomes\"\nendpoint = \"opc.tcp://h:1\"\n"
        ),
        "{out}"
    );
    assert!(
        out.contains("\nnode_template = \"ns=2;s={work_center}.{param}\"\noee_window = \"1m\"\ntags = []\n\n[[connections.work_centers]]\nname = \"L\"\n"),
        "{out}"
    );
    let generic = &out[out.find("id = \"g\"").unwrap_or(0)..];
    assert!(
        generic.starts_with("id = \"g\"\nkind = \"generic\"\n"),
        "{out}"
    );
    for other in ["node_template", "oee_window", "units", "work_centers"] {
        assert!(!generic.contains(other), "{out}");
    }
}

#[test]
fn exit_code_is_ex_config() {
    assert_eq!(EXIT_CONFIG, 78);
}

#[test]
fn format_selects_json_or_sparkplug() {
    assert_eq!(ok(MINIMAL).config.mqtt.format, MqttFormat::Json);
    let c = ok(&format!("{MINIMAL}format = \"sparkplug_b\"")).config;
    assert_eq!(c.mqtt.format, MqttFormat::SparkplugB);
    let out = render(&c);
    assert!(out.contains("format = \"sparkplug_b\""), "{out}");
    assert_eq!(ok(&out).config.mqtt.format, MqttFormat::SparkplugB);
    let c = load_from(MINIMAL, &env(&[("PLANTGATE__MQTT__FORMAT", "sparkplug_b")]))
        .expect("valid")
        .config;
    assert_eq!(c.mqtt.format, MqttFormat::SparkplugB);
    one_problem(
        &format!("{MINIMAL}format = \"protobuf\""),
        "mqtt.format",
        "\"protobuf\" is not \"json\" or \"sparkplug_b\"",
    );
}

#[test]
fn sparkplug_reserves_the_derived_metric_names() {
    let conn = format!(
        "{DELTAV}[[connections.tags]]\nname = \"FIC-101.PV\"\nnode = \"ns=2;s=a\"\n\
         [[connections.tags]]\nname = \"batch\"\nnode = \"ns=2;s=b\"\n"
    );
    let text = with_connection(&conn);
    // Fine in JSON, where a tag and a batch record never share a name space.
    ok(&text);
    let text = text.replacen(
        "url = \"mqtts://broker.example.com\"",
        "url = \"mqtts://broker.example.com\"\nformat = \"sparkplug_b\"",
        1,
    );
    one_problem(&text, "connections[0].tags[1].name", "derived record");
}
