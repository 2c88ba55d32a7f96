//! `plantgate check --connect` (SPEC 2, docs/cli.md) with real parts: our
//! DeltaV simulator requiring a password, the embedded broker, real
//! mosquitto with mutual TLS. Each fault is named on its own line with its
//! fix; exit 0 when every check passes, 1 when one fails.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use common::mosquitto::{start_mosquitto, MosquittoOptions};
use common::*;
use plantgate::sim::broker::TestPki;

fn check_connect(config: &std::path::Path) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_plantgate"))
        .args(["check", "--connect", "-c"])
        .arg(config)
        .output()
        .expect("plantgate check --connect");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The line that starts with `mark` and names `what`.
fn line<'a>(out: &'a str, mark: &str, what: &str) -> &'a str {
    out.lines()
        .find(|l| l.starts_with(mark) && l.contains(what))
        .unwrap_or_else(|| panic!("no {mark} line for {what}:\n{out}"))
}

fn secret_file(dir: &std::path::Path, name: &str, text: &str) -> std::path::PathBuf {
    let path = write_file(dir, name, text);
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    path
}

/// A connection to `endpoint` as TOML.
fn connection(id: &str, endpoint: &str, extra: &str, tags: &[(&str, &str)]) -> String {
    let mut t = format!(
        "\n[[connections]]\nid = \"{id}\"\nkind = \"generic\"\nendpoint = \"{endpoint}\"\n{extra}"
    );
    for (name, node) in tags {
        t.push_str(&format!(
            "\n[[connections.tags]]\nname = \"{name}\"\nnode = \"{node}\"\n"
        ));
    }
    t
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_fault_is_named_on_its_own_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = embedded_broker().await;
    let mut opts = plantgate::sim::SimOptions::new(dir.path().join("sim-pki"));
    opts.speed = 0.0;
    opts.user = Some(("operator".into(), "the-right-one".into()));
    let sim = plantgate::sim::start_deltav(opts, Default::default())
        .await
        .expect("simulator");
    let right = secret_file(dir.path(), "right", "the-right-one\n");
    let wrong = secret_file(dir.path(), "wrong", "not-this-one\n");
    let ns = sim.namespace_uri();
    let node = |s: &str| format!("nsu={ns};s={s}");
    let none = "security_policy = \"None\"\nsecurity_mode = \"None\"\n";
    let user = |pw: &std::path::Path| format!("username = \"operator\"\npassword_file = {pw:?}\n");
    let base = agent_toml(
        &dir.path().join("agent"),
        broker.v5_addr,
        &broker.pki.ca_file,
        "v5",
        &sim.endpoint(),
        ns,
        &[],
    );
    // agent_toml's own connection, with the password: all good.
    let good = base.replace(
        "security_mode = \"None\"\n",
        &format!("security_mode = \"None\"\n{}", user(&right)),
    ) + &format!(
        "\n[[connections.tags]]\nname = \"FLOW\"\nnode = \"{}\"\n",
        node("FIC-101/PV.CV")
    );
    let toml =
        good + &connection(
            "wrongpw",
            &sim.endpoint(),
            &format!("{none}{}", user(&wrong)),
            &[("FLOW", &node("FIC-101/PV.CV"))],
        ) + &connection(
            "untrusted",
            &sim.endpoint(),
            &format!(
                "security_policy = \"Basic256Sha256\"\nsecurity_mode = \"SignAndEncrypt\"\n{}",
                user(&right)
            ),
            &[("FLOW", &node("FIC-101/PV.CV"))],
        ) + &connection(
            "missing",
            &sim.endpoint(),
            &format!("{none}{}", user(&right)),
            &[
                ("FLOW", &node("FIC-101/PV.CV")),
                ("GHOST", &node("NO/SUCH.CV")),
            ],
        );
    let config = write_file(dir.path(), "plantgate.toml", &toml);
    let (code, out, stderr) = check_connect(&config);
    assert_eq!(code, Some(1), "{out}\n{stderr}");

    line(&out, "ok", "opcua sim1: endpoint");
    line(&out, "ok", "opcua sim1: identity: user operator accepted");
    line(&out, "ok", "opcua sim1: nodes: 1 resolved and readable");

    let refused = line(&out, "FAIL", "opcua wrongpw: identity");
    assert!(
        refused.contains("BadUserAccessDenied") || refused.contains("BadIdentityTokenRejected"),
        "{refused}"
    );
    assert!(refused.contains("password of user operator"), "{refused}");
    line(&out, "ok", "opcua wrongpw: server certificate");

    let untrusted = line(&out, "FAIL", "opcua untrusted: server certificate");
    let pki = dir.path().join("agent/pki");
    assert!(
        untrusted.contains(&pki.join("rejected").display().to_string())
            && untrusted.contains(&pki.join("trusted").display().to_string()),
        "{untrusted}"
    );
    assert!(
        std::fs::read_dir(pki.join("rejected"))
            .expect("rejected dir")
            .count()
            >= 1,
        "the rejected copy is where the line says"
    );

    let ghost = line(&out, "FAIL", "opcua missing: node GHOST");
    assert!(
        ghost.contains("BadNodeIdUnknown") && ghost.contains("NO/SUCH.CV"),
        "{ghost}"
    );
    assert!(!out.contains("node FLOW"), "{out}");

    line(&out, "ok", "mqtt: TLS handshake");
    line(&out, "ok", "mqtt: authentication");
    line(
        &out,
        "ok",
        "mqtt: publish: QoS 1 to plantgate/test-site/test-gw/check acknowledged",
    );
    assert_eq!(
        out.lines().filter(|l| l.starts_with("FAIL")).count(),
        4,
        "{out}"
    );
    assert!(!out.contains("the-right-one") && !stderr.contains("the-right-one"));

    // No broker there.
    let port = plantgate::sim::broker::free_port().expect("port");
    let gone = std::fs::read_to_string(&config)
        .expect("config")
        .replace(&broker.v5_addr.port().to_string(), &port.to_string());
    let config = write_file(dir.path(), "gone.toml", &gone);
    let (code, out, _) = check_connect(&config);
    assert_eq!(code, Some(1));
    let b = line(&out, "FAIL", "mqtt: broker");
    assert!(
        b.contains(&format!("127.0.0.1:{port} cannot be reached")),
        "{b}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_good_is_exit_zero() {
    let plant = start_plant().await;
    let toml = agent_toml(
        &plant.dir.path().join("agent"),
        plant.broker.v5_addr,
        &plant.broker.pki.ca_file,
        "v5",
        &plant.sim.endpoint(),
        plant.sim.namespace_uri(),
        &[("FLOW", "FIC-101/PV.CV"), ("LEVEL", "LIC-301/PV.CV")],
    );
    let config = write_file(plant.dir.path(), "plantgate.toml", &toml);
    let (code, out, stderr) = check_connect(&config);
    assert_eq!(code, Some(0), "{out}\n{stderr}");
    assert!(out.lines().all(|l| l.starts_with("ok")), "{out}");
    line(&out, "ok", "opcua sim1: nodes: 2 resolved and readable");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs mosquitto"]
async fn a_broker_refusing_the_client_certificate_is_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = TestPki::generate().expect("pki");
    let mosq = start_mosquitto(&pki, MosquittoOptions::default());
    let plant_sim = {
        let mut o = plantgate::sim::SimOptions::new(dir.path().join("sim-pki"));
        o.speed = 0.0;
        plantgate::sim::start_deltav(o, Default::default())
            .await
            .expect("simulator")
    };
    // The mutual-TLS listener, and no client certificate configured.
    let toml = agent_toml(
        &dir.path().join("agent"),
        mosq.mtls,
        &pki.ca_file,
        "v5",
        &plant_sim.endpoint(),
        plant_sim.namespace_uri(),
        &[("FLOW", "FIC-101/PV.CV")],
    );
    let config = write_file(dir.path(), "plantgate.toml", &toml);
    let (code, out, stderr) = check_connect(&config);
    assert_eq!(code, Some(1), "{out}\n{stderr}");
    line(&out, "ok", "opcua sim1: nodes");
    let tls = line(&out, "FAIL", "mqtt: TLS handshake");
    assert!(tls.contains("client_cert_file"), "{tls}");

    // With the client certificate: all good, through real mosquitto.
    let with_cert = toml.replace(
        "[mqtt]\n",
        &format!(
            "[mqtt]\nclient_cert_file = {:?}\nclient_key_file = {:?}\n",
            pki.client_cert_file, pki.client_key_file
        ),
    );
    let config = write_file(dir.path(), "mtls.toml", &with_cert);
    let (code, out, stderr) = check_connect(&config);
    assert_eq!(code, Some(0), "{out}\n{stderr}");
    line(&out, "ok", "mqtt: publish");
}
