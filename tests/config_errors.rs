//! The binary's config handling as a user meets it: `plantgate check` and
//! `plantgate run` on bad files exit 78 with one line per problem naming the
//! key path; secrets never show.

use std::process::Command;

fn plantgate() -> Command {
    Command::new(env!("CARGO_BIN_EXE_plantgate"))
}

fn write(dir: &tempfile::TempDir, text: &str) -> std::path::PathBuf {
    let p = dir.path().join("plantgate.toml");
    std::fs::write(&p, text).expect("write config");
    p
}

/// `plantgate check` on a config with this text: exit code, stdout, stderr.
fn check(text: &str) -> (Option<i32>, String, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write(&dir, text);
    let out = plantgate()
        .args(["check", "-c"])
        .arg(&path)
        .output()
        .expect("runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out.status.code(), stdout, stderr)
}

#[test]
fn check_names_all_three_mistakes_and_exits_78() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write(
        &dir,
        r#"
[agent]
id = "gw 1"
site = "plant1"

[mqtt]
url = "mqtt://broker:1883"

[buffer]
max_size = "lots"
"#,
    );
    let out = plantgate()
        .args(["check", "-c"])
        .arg(&path)
        .output()
        .expect("runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "stderr: {stderr}");
    for key in ["agent.id", "mqtt.url", "buffer.max_size"] {
        assert!(
            stderr.lines().any(|l| l.trim_start().starts_with(key)),
            "{key} named in: {stderr}"
        );
    }
}

#[test]
fn run_refuses_a_bad_config_with_78() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write(
        &dir,
        r#"
[agent]
id = "gw1"
site = "plant1"
data_dir = "/tmp/x"

[mqtt]
url = "mqtts://broker:8883"
urll = "typo"
"#,
    );
    let out = plantgate()
        .args(["run", "-c"])
        .arg(&path)
        .output()
        .expect("runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "stderr: {stderr}");
    assert!(stderr.contains("mqtt.urll"), "{stderr}");
}

#[test]
fn check_prints_effective_config_with_secrets_masked() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write(
        &dir,
        r#"
[agent]
id = "gw1"
site = "plant1"
data_dir = "/tmp/x"

[mqtt]
url = "mqtts://broker:8883"
username = "gw1"
password_env = "PG_TEST_MQTT_PASSWORD"
"#,
    );
    let out = plantgate()
        .args(["check", "-c"])
        .arg(&path)
        .env("PG_TEST_MQTT_PASSWORD", "s3cr3t-value")
        .output()
        .expect("runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "stderr: {stderr}");
    assert!(stdout.contains("***"), "{stdout}");
    assert!(
        stdout.contains("max_message_bytes"),
        "defaults shown: {stdout}"
    );
    assert!(!stdout.contains("s3cr3t-value") && !stderr.contains("s3cr3t-value"));
}

#[test]
fn missing_config_file_is_a_config_error() {
    let out = plantgate()
        .args(["check", "-c", "/nonexistent/plantgate.toml"])
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(78));
}

#[test]
fn shipped_example_config_is_valid() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("mqtt-password"), "from-credential-mqtt\n").expect("cred");
    std::fs::write(
        dir.path().join("deltav-password"),
        "from-credential-deltav\n",
    )
    .expect("cred");
    let out = plantgate()
        .args(["check", "-c"])
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/systemd/plantgate.toml"
        ))
        .env("CREDENTIALS_DIRECTORY", dir.path())
        // The example's CA path does not exist here; the override is the
        // documented way to change a key without editing the file.
        .env("PLANTGATE__MQTT__CA_FILE", dir.path().join("mqtt-password"))
        .output()
        .expect("runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "stderr: {stderr}");
    assert!(stdout.contains("REACTOR_101") && stdout.contains("LINE_A_FILLER"));
    assert!(!stdout.contains("from-credential") && !stderr.contains("from-credential"));
}

#[test]
fn duration_mistakes_name_the_key_and_the_text() {
    let (code, _, stderr) = check(
        r#"
[agent]
id = "gw1"
site = "plant1"
data_dir = "/tmp/x"

[mqtt]
url = "mqtts://broker:8883"
keep_alive = "30"
heartbeat_interval = "5M"
reconnect_initial = "500us"

[buffer]
max_age = "7 parsecs"
"#,
    );
    assert_eq!(code, Some(78), "stderr: {stderr}");
    for (key, text) in [
        ("mqtt.keep_alive", "\"30\""),
        ("mqtt.heartbeat_interval", "\"5M\""),
        ("mqtt.reconnect_initial", "\"500us\""),
        ("buffer.max_age", "\"7 parsecs\""),
    ] {
        assert!(
            stderr
                .lines()
                .any(|l| l.trim_start().starts_with(key) && l.contains(text)),
            "{key} with {text} named in: {stderr}"
        );
    }
}

/// A fraction is read to the millisecond and printed back in the unit the
/// effective configuration uses, so `check`'s output loads again.
#[test]
fn fractional_durations_load_and_print_whole() {
    let (code, stdout, stderr) = check(
        r#"
[agent]
id = "gw1"
site = "plant1"
data_dir = "/tmp/x"

[mqtt]
url = "mqtts://broker:8883"
heartbeat_interval = "1.5s"
reconnect_max = "2 minutes"
"#,
    );
    assert_eq!(code, Some(0), "stderr: {stderr}");
    assert!(
        stdout.contains("heartbeat_interval = \"1500ms\""),
        "{stdout}"
    );
    assert!(stdout.contains("reconnect_max = \"2m\""), "{stdout}");
}
