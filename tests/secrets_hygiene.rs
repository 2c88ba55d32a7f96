//! Secrets around the edges (docs/guarantees.md, docs/configuration.md): credentials written into URLs are
//! refused without being echoed, secret files others can read are warned
//! about, the buffer can be inspected without the service's secrets, and
//! what the agent writes to disk is its own only. All through the real
//! binary, as an operator meets it.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn plantgate() -> Command {
    Command::new(env!("CARGO_BIN_EXE_plantgate"))
}

fn run(cmd: &mut Command) -> (Option<i32>, String, String) {
    let Output {
        status,
        stdout,
        stderr,
    } = cmd.output().expect("runs");
    (
        status.code(),
        String::from_utf8_lossy(&stdout).into_owned(),
        String::from_utf8_lossy(&stderr).into_owned(),
    )
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

fn mode_of(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o7777
}

const BASE: &str = r#"
[agent]
id = "gw1"
site = "plant1"
data_dir = "/tmp/plantgate-secrets-hygiene"

[health]
listen = "127.0.0.1:9870"
"#;

#[test]
fn credentials_in_urls_are_refused_and_never_echoed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_file(
        dir.path(),
        "plantgate.toml",
        &format!(
            r#"{BASE}
[mqtt]
url = "mqtts://broker:8883/?password=hunter2-query"

[[connections]]
id = "a"
kind = "generic"
endpoint = "opc.tcp://operator:hunter2-userinfo@10.1.2.3:4840"

[[connections]]
id = "b"
kind = "generic"
endpoint = "opc.tcp://10.1.2.4:4840/UA/Server?pw=hunter2-endpoint-query"

[[connections]]
id = "c"
kind = "generic"
endpoint = "opcua://operator:hunter2-scheme@10.1.2.5:4840"

[[connections]]
id = "d"
kind = "generic"
endpoint = "opc.tcp://operator:hunter2/slash@10.1.2.6:4840"
"#
        ),
    );
    for command in ["check", "run"] {
        let (code, stdout, stderr) = run(plantgate().args([command, "-c"]).arg(&config));
        assert_eq!(code, Some(78), "{command}: {stderr}");
        assert!(
            !stdout.contains("hunter2") && !stderr.contains("hunter2"),
            "{command} echoed a secret:\n{stdout}\n{stderr}"
        );
        for key in [
            "mqtt.url",
            "connections[0].endpoint",
            "connections[1].endpoint",
            "connections[2].endpoint",
            "connections[3].endpoint",
        ] {
            let line = stderr
                .lines()
                .find(|l| l.trim_start().starts_with(key))
                .unwrap_or_else(|| panic!("{command}: {key} not named in:\n{stderr}"));
            // Every refusal says where credentials belong instead, except
            // the wrong scheme, which is the mistake to fix first.
            if key != "connections[2].endpoint" {
                assert!(line.contains("password_env"), "{line}");
            }
        }
        eprintln!("{command}:\n{stderr}");
    }

    // The same through an environment override, and in the user info.
    let plain = write_file(
        dir.path(),
        "plain.toml",
        &format!("{BASE}\n[mqtt]\nurl = \"mqtts://broker:8883\"\n"),
    );
    let (code, stdout, stderr) = run(plantgate().args(["check", "-c"]).arg(&plain).env(
        "PLANTGATE__MQTT__URL",
        "mqtts://gw1:hunter2-env@broker:8883",
    ));
    assert_eq!(code, Some(78), "{stderr}");
    assert!(stderr.contains("mqtt.url"), "{stderr}");
    assert!(!stdout.contains("hunter2") && !stderr.contains("hunter2"));
    // Without credentials the same config is fine.
    let (code, _, stderr) = run(plantgate().args(["check", "-c"]).arg(&plain));
    assert_eq!(code, Some(0), "{stderr}");
}

#[test]
fn secret_files_others_can_read_are_warned_about_by_name() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pw = write_file(dir.path(), "mqtt-password", "pw-content-7c1e\n");
    let key = write_file(
        dir.path(),
        "gw1.key",
        "-----BEGIN PRIVATE KEY-----\nkey-content-9d2f\n-----END PRIVATE KEY-----\n",
    );
    let cert = write_file(dir.path(), "gw1.crt", "certificate\n");
    let opc_pw = write_file(dir.path(), "opc-password", "opc-content-3b8a\n");
    let config = write_file(
        dir.path(),
        "plantgate.toml",
        &format!(
            r#"{BASE}
[mqtt]
url = "mqtts://broker:8883"
client_cert_file = {cert:?}
client_key_file = {key:?}
username = "gw1"
password_file = {pw:?}

[[connections]]
id = "a"
kind = "generic"
endpoint = "opc.tcp://10.1.2.3:4840"
username = "operator"
password_file = {opc_pw:?}
"#
        ),
    );
    chmod(&pw, 0o644);
    chmod(&key, 0o640);
    chmod(&opc_pw, 0o604);
    let (code, stdout, stderr) = run(plantgate().args(["check", "-c"]).arg(&config));
    assert_eq!(code, Some(0), "{stderr}");
    for (key_path, file, mode) in [
        ("mqtt.password_file", &pw, "0644"),
        ("mqtt.client_key_file", &key, "0640"),
        ("connections[0].password_file", &opc_pw, "0604"),
    ] {
        let line = stderr
            .lines()
            .find(|l| l.contains(key_path) && l.contains("group or others"))
            .unwrap_or_else(|| panic!("no warning for {key_path}:\n{stderr}"));
        assert!(
            line.contains(&file.display().to_string())
                && line.contains(mode)
                && line.contains("chmod 600"),
            "{line}"
        );
    }
    for content in ["pw-content", "key-content", "opc-content"] {
        assert!(
            !stdout.contains(content) && !stderr.contains(content),
            "{content} shown:\n{stdout}\n{stderr}"
        );
    }
    eprintln!("{stderr}");

    for f in [&pw, &key, &opc_pw] {
        chmod(f, 0o600);
    }
    let (code, _, stderr) = run(plantgate().args(["check", "-c"]).arg(&config));
    assert_eq!(code, Some(0), "{stderr}");
    assert!(!stderr.contains("group or others"), "{stderr}");
}

#[test]
fn a_health_endpoint_off_loopback_is_warned_about() {
    let dir = tempfile::tempdir().expect("tempdir");
    let text = format!("{BASE}\n[mqtt]\nurl = \"mqtts://broker:8883\"\n");
    let open = write_file(
        dir.path(),
        "open.toml",
        &text.replace("127.0.0.1:9870", "0.0.0.0:9870"),
    );
    let (code, _, stderr) = run(plantgate().args(["check", "-c"]).arg(&open));
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stderr
            .lines()
            .any(|l| l.contains("health.listen") && l.contains("not a loopback address")),
        "{stderr}"
    );
    let local = write_file(dir.path(), "local.toml", &text);
    let (code, _, stderr) = run(plantgate().args(["check", "-c"]).arg(&local));
    assert_eq!(code, Some(0), "{stderr}");
    assert!(!stderr.contains("loopback"), "{stderr}");
}

#[test]
fn buffer_commands_need_no_secrets() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data_dir = dir.path().join("data");
    std::fs::create_dir_all(&data_dir).expect("data dir");
    // A real buffer, as a service run leaves it.
    drop(
        plantgate::buffer::Store::open(
            &data_dir.join(plantgate::buffer::DB_FILE_NAME),
            plantgate::buffer::StoreOptions::default(),
        )
        .expect("buffer"),
    );
    // Secrets and key files of the service, none of them at hand here.
    let config = write_file(
        dir.path(),
        "plantgate.toml",
        &format!(
            r#"
[agent]
id = "gw1"
site = "plant1"
data_dir = {data_dir:?}

[mqtt]
url = "mqtts://broker:8883"
client_cert_file = "/nonexistent/gw1.crt"
client_key_file = "/nonexistent/gw1.key"
username = "gw1"
password_credential = "mqtt-password"

[[connections]]
id = "a"
kind = "generic"
endpoint = "opc.tcp://10.1.2.3:4840"
username = "operator"
password_file = "/nonexistent/opc-password"
"#
        ),
    );
    let outside_systemd = |args: &[&str]| {
        run(plantgate()
            .args(args)
            .arg("-c")
            .arg(&config)
            .env_remove("CREDENTIALS_DIRECTORY"))
    };
    let (code, stdout, stderr) = outside_systemd(&["buffer", "stats"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("total: 0 records"), "{stdout}");
    let (code, stdout, stderr) = outside_systemd(&["buffer", "dead-letters"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("0 dead letters"), "{stdout}");
    let (code, stdout, stderr) = outside_systemd(&["buffer", "retry"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("0 dead letters re-queued"), "{stdout}");

    // The service itself does need them, and says which.
    let (code, _, stderr) = outside_systemd(&["check"]);
    assert_eq!(code, Some(78), "{stderr}");
    for key in [
        "mqtt.password_credential",
        "mqtt.client_key_file",
        "connections[0].password_file",
    ] {
        assert!(stderr.contains(key), "{key} in:\n{stderr}");
    }

    // Inspection still validates the rest of the config.
    let broken = write_file(
        dir.path(),
        "broken.toml",
        &std::fs::read_to_string(&config)
            .expect("config")
            .replace("[agent]", "[agent]\ndata_dri = \"/x\""),
    );
    let (code, _, stderr) = run(plantgate()
        .args(["buffer", "stats", "-c"])
        .arg(&broken)
        .env_remove("CREDENTIALS_DIRECTORY"));
    assert_eq!(code, Some(78), "{stderr}");
    assert!(stderr.contains("agent.data_dri"), "{stderr}");
}

/// The health address from the agent's JSON log.
async fn health_addr_from_log(log: &Path) -> std::net::SocketAddr {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let addr = text
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["message"] == "health endpoint listening")
            .find_map(|v| v["addr"].as_str().and_then(|a| a.parse().ok()));
        if let Some(addr) = addr {
            return addr;
        }
        assert!(Instant::now() < deadline, "agent never listened:\n{text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `plantgate run` started the way an operator would outside the unit,
/// with a permissive umask (022); waits until it is ready, stops it with
/// SIGTERM and returns its log.
async fn run_once_outside_systemd(config: &Path, log: &Path, data_dir: &Path) -> String {
    let mut child = Command::new("sh")
        .arg("-c")
        .arg("umask 022 && exec \"$0\" \"$@\"")
        .arg(env!("CARGO_BIN_EXE_plantgate"))
        .args(["--log-format", "json", "run", "-c"])
        .arg(config)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).expect("log"))
        .spawn()
        .expect("spawn");
    let addr = health_addr_from_log(log).await;
    let deadline = Instant::now() + PATIENCE;
    // Ready, and the OPC UA key made (the connection's PKI comes first).
    while http_get(addr, "/readyz").await.0 != 200
        || !data_dir
            .join("pki")
            .join(plantgate::source::pki::OWN_KEY)
            .exists()
    {
        assert!(Instant::now() < deadline, "agent never got ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let modes = private_tree(data_dir);
    eprintln!("while running: {modes:?}");
    let db = plantgate::buffer::DB_FILE_NAME;
    for name in [db.to_string(), format!("{db}-wal"), format!("{db}-shm")] {
        let file = data_dir.join(&name);
        assert!(
            modes.iter().any(|(p, m)| *p == file && *m == 0o600),
            "{name} is there with mode 0600"
        );
    }
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .expect("thread")
        .expect("wait");
    assert!(status.success(), "{status:?}");
    std::fs::read_to_string(log).expect("log")
}

/// Every file and directory under `root` (and `root`), with its mode; panics
/// on any that group or others may access.
fn private_tree(root: &Path) -> Vec<(PathBuf, u32)> {
    let mut out = Vec::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(p) = todo.pop() {
        let mode = mode_of(&p);
        assert_eq!(mode & 0o077, 0, "{} is {mode:04o}", p.display());
        if p.is_dir() {
            for e in std::fs::read_dir(&p).expect("read_dir") {
                todo.push(e.expect("entry").path());
            }
        }
        out.push((p, mode));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn what_the_agent_writes_is_its_own_only() {
    let plant = start_plant().await;
    let data_dir = plant.dir.path().join("agent");
    let toml = agent_toml(
        &data_dir,
        plant.broker.v5_addr,
        &plant.broker.pki.ca_file,
        "v5",
        &plant.sim.endpoint(),
        plant.sim.namespace_uri(),
        &[("FLOW", "FIC-101/PV.CV")],
    );
    let config = write_file(plant.dir.path(), "plantgate.toml", &toml);
    let log = plant.dir.path().join("agent.log");

    // First start: the agent creates the data directory, the buffer (with
    // its WAL and shared-memory files) and the PKI; `private_tree` checked
    // all of it while the agent ran.
    run_once_outside_systemd(&config, &log, &data_dir).await;
    assert_eq!(mode_of(&data_dir), 0o700);
    let db = data_dir.join(plantgate::buffer::DB_FILE_NAME);
    assert_eq!(mode_of(&db), 0o600);
    assert_eq!(
        mode_of(&data_dir.join("pki").join(plantgate::source::pki::OWN_KEY)),
        0o600
    );

    // A buffer left readable by others (an older version, a copy) is
    // restricted on the next start, with a warning naming it.
    chmod(&db, 0o644);
    let text = run_once_outside_systemd(&config, &log, &data_dir).await;
    assert_eq!(mode_of(&db), 0o600);
    assert!(
        text.lines().any(
            |l| l.contains("buffer file was accessible by group or others")
                && l.contains("buffer.db")
        ),
        "{text}"
    );
}
