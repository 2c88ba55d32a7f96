use std::collections::HashMap;

use super::*;

const BASE: &str = r#"
[agent]
id = "gw1"
site = "plant1"
data_dir = "/var/lib/plantgate"

[mqtt]
url = "mqtts://broker.example.com"

[[connections]]
id = "dv"
kind = "deltav"
endpoint = "opc.tcp://10.0.0.1:4840"
security_policy = "None"
security_mode = "None"
[[connections.units]]
name = "R1"
[[connections.tags]]
name = "A"
node = "ns=2;s=A"
[[connections.tags]]
name = "B"
node = "ns=2;s=B"

[[connections]]
id = "mes"
kind = "optomes"
endpoint = "opc.tcp://10.0.0.2:4840"
security_policy = "None"
security_mode = "None"
[[connections.work_centers]]
name = "LINE_A"
"#;

fn config(text: &str) -> Config {
    crate::config::load_from(text, &HashMap::new())
        .unwrap_or_else(|e| panic!("{e}\n{text}"))
        .config
}

fn plan_of(old: &str, new: &str) -> Plan {
    plan(&config(old), &config(new), false).expect("a plan")
}

fn kinds(p: &Plan) -> Vec<String> {
    p.connections
        .iter()
        .map(|c| {
            let what = match c {
                ConnChange::Added(_) => "added",
                ConnChange::Removed(_) => "removed",
                ConnChange::Restarted(_) => "restarted",
                ConnChange::Retagged { .. } => "retagged",
                ConnChange::Unchanged(_) => "unchanged",
            };
            format!("{} {what}", c.id())
        })
        .collect()
}

#[test]
fn the_same_config_changes_nothing() {
    let p = plan_of(BASE, BASE);
    assert!(p.is_empty(), "{p:?}");
    assert_eq!(kinds(&p), ["dv unchanged", "mes unchanged"]);
    assert_eq!(p.summary(), "nothing changed");
}

#[test]
fn connections_added_removed_and_changed() {
    let new = BASE
        .replace("opc.tcp://10.0.0.2:4840", "opc.tcp://10.0.0.3:4840")
        .replace("id = \"dv\"", "id = \"dv2\"");
    let p = plan_of(BASE, &new);
    assert_eq!(
        kinds(&p),
        ["dv2 added", "mes restarted", "dv removed"],
        "a renamed connection is a new one"
    );
    assert!(!p.mqtt && !p.buffer_limits && p.health_listen.is_none());
    assert_eq!(
        p.summary(),
        "connection dv2 added; connection mes restarted; connection dv removed"
    );
}

#[test]
fn a_tag_list_change_alone_keeps_the_session() {
    let new = BASE
        .replace(
            "name = \"B\"\nnode = \"ns=2;s=B\"",
            "name = \"C\"\nnode = \"ns=2;s=C\"",
        )
        .replace("node = \"ns=2;s=A\"", "node = \"ns=2;s=A2\"");
    let p = plan_of(BASE, &new);
    assert_eq!(kinds(&p), ["dv retagged", "mes unchanged"]);
    let ConnChange::Retagged {
        added,
        removed,
        changed,
        ..
    } = &p.connections[0]
    else {
        panic!("{p:?}");
    };
    assert_eq!(added, &["C"]);
    assert_eq!(removed, &["B"]);
    assert_eq!(changed, &["A"]);
    assert_eq!(p.summary(), "connection dv: tags +1 -1 ~1");

    // A tag change together with anything else restarts the connection.
    let both = new.replace("opc.tcp://10.0.0.1:4840", "opc.tcp://10.0.0.9:4840");
    assert_eq!(
        kinds(&plan_of(BASE, &both)),
        ["dv restarted", "mes unchanged"]
    );
}

#[test]
fn a_rotated_password_restarts_its_connection_and_reconnects_mqtt() {
    let with = |opc: &str, mqtt: &str| {
        BASE.replace(
            "url = \"mqtts://broker.example.com\"",
            &format!(
                "url = \"mqtts://broker.example.com\"\nusername = \"gw\"\npassword = \"{mqtt}\""
            ),
        )
        .replace(
            "endpoint = \"opc.tcp://10.0.0.1:4840\"",
            &format!(
                "endpoint = \"opc.tcp://10.0.0.1:4840\"\nusername = \"pg\"\npassword = \"{opc}\""
            ),
        )
    };
    let p = plan_of(&with("one", "one"), &with("two", "one"));
    assert_eq!(kinds(&p), ["dv restarted", "mes unchanged"]);
    assert!(!p.mqtt);
    let p = plan_of(&with("one", "one"), &with("one", "two"));
    assert_eq!(kinds(&p), ["dv unchanged", "mes unchanged"]);
    assert!(p.mqtt, "a rotated MQTT password reconnects the uplink");
    assert!(
        !format!("{p:?} {}", p.summary()).contains("two"),
        "no secret in a plan's text"
    );

    // The same paths with renewed files behind them.
    let p = plan(&config(BASE), &config(BASE), true).expect("a plan");
    assert!(p.mqtt && !p.is_empty());
}

#[test]
fn mqtt_buffer_and_health_changes() {
    let new = BASE.replace(
        "url = \"mqtts://broker.example.com\"",
        "url = \"mqtts://broker.example.com\"\nkeep_alive = \"10s\"\n\
         [buffer]\nmax_size = \"2GiB\"\n[health]\nlisten = \"127.0.0.1:9999\"",
    );
    let p = plan_of(BASE, &new);
    assert!(p.mqtt && p.buffer_limits);
    assert_eq!(
        p.health_listen,
        Some("127.0.0.1:9999".parse().expect("addr"))
    );
    assert_eq!(
        p.summary(),
        "mqtt reconnects; buffer limits changed; health endpoint moves to 127.0.0.1:9999"
    );
}

#[test]
fn what_needs_a_restart_is_refused_with_its_key() {
    let new = BASE
        .replace("id = \"gw1\"", "id = \"gw2\"")
        .replace(
            "data_dir = \"/var/lib/plantgate\"",
            "data_dir = \"/srv/pg\"",
        )
        .replace(
            "url = \"mqtts://broker.example.com\"",
            "url = \"mqtts://broker.example.com\"\n[buffer]\nsynchronous = \"full\"",
        );
    let problems = plan(&config(BASE), &config(&new), false).expect_err("refused");
    let paths: Vec<&str> = problems.iter().map(|p| p.path.as_str()).collect();
    assert_eq!(paths, ["agent.id", "agent.data_dir", "buffer.synchronous"]);
    assert!(
        problems[0].message.contains("\"gw1\" to \"gw2\"")
            && problems[0].message.contains("restart"),
        "{}",
        problems[0]
    );
}
