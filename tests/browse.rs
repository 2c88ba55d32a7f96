//! `plantgate browse` (SPEC 2, docs/cli.md) against real servers: our
//! DeltaV simulator and the independent python `asyncua` server. What
//! `--toml` prints, pasted into a configuration, gives data from every tag;
//! a folder of thousands of tags comes out whole (BrowseNext with
//! continuation points).

mod common;

use std::collections::BTreeSet;
use std::process::Command;

use common::asyncua::PyServer;
use common::load::start_load_sim;
use common::*;

/// Runs the binary's `browse` with `args`: (exit code, stdout, stderr).
fn browse(args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_plantgate"))
        .arg("browse")
        .args(args)
        .output()
        .expect("plantgate browse");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The tag names in `--toml` output.
fn names(toml: &str) -> BTreeSet<String> {
    toml.lines()
        .filter_map(|l| l.strip_prefix("name = "))
        .map(|n| n.trim_matches('"').to_string())
        .collect()
}

/// Pastes `tags` (the `--toml` output) under one connection to `endpoint`,
/// runs the agent, and waits until every tag has sent a value.
async fn every_tag_gives_data(endpoint: &str, tags: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = embedded_broker().await;
    let toml = agent_toml(
        &dir.path().join("agent"),
        broker.v4_addr,
        &broker.pki.ca_file,
        "v311",
        endpoint,
        "unused",
        &[],
    ) + "\n"
        + tags;
    let wanted = names(tags);
    assert!(!wanted.is_empty(), "no tags in:\n{tags}");
    let mut seen = watch(broker.v4_addr, &broker.pki.ca_file).await;
    let agent = run_agent(&toml).await;
    seen.until("a value of every browsed tag", |s| {
        let got: BTreeSet<String> = s
            .messages
            .iter()
            .filter(|m| m.topic.ends_with("/data/sim1/tag"))
            .flat_map(|m| m.payload["records"].as_array().cloned().unwrap_or_default())
            .filter(|r| r["data"]["quality"] == "good")
            .filter_map(|r| r["data"]["name"].as_str().map(str::to_string))
            .collect();
        wanted.is_subset(&got)
    })
    .await;
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browsing_the_deltav_simulator_gives_tags_that_all_deliver() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sim = start_load_sim(dir.path(), 3, 5.0).await;
    let endpoint = sim.endpoint();
    let from = format!("nsu={};s=DeltaV", sim.namespace_uri());

    // The tree: objects and variables with type and access.
    let (code, lines, stderr) = browse(&["--endpoint", &endpoint, "--from", &from, "--depth", "2"]);
    assert_eq!(code, Some(0), "{stderr}");
    let ns = sim.namespace_uri();
    assert!(
        lines.contains(&format!(
            "nsu={ns};s=FIC-101/PV.CV  FIC-101/PV.CV  Variable  Double  r"
        )),
        "{lines}"
    );
    assert!(
        lines.contains(&format!("nsu={ns};s=REACTOR_101  REACTOR_101  Object")),
        "{lines}"
    );
    assert!(
        lines.contains(&format!(
            "\n  nsu={ns};s=REACTOR_101/FAIL_INDEX.CV  REACTOR_101/FAIL_INDEX.CV  Variable  Int32  r"
        )),
        "{lines}"
    );
    assert!(
        !stderr.contains("WARN") && !stderr.contains("ERROR"),
        "{stderr}"
    );

    // --toml, pasted into a configuration: every tag delivers.
    let (code, toml, stderr) = browse(&[
        "--endpoint",
        &endpoint,
        "--from",
        &from,
        "--depth",
        "2",
        "--toml",
    ]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        names(&toml).contains("REACTOR_101.REACTOR_101/BSTATUS.CV"),
        "{toml}"
    );
    every_tag_gives_data(&endpoint, &toml).await;
}

/// Through a configured connection: its endpoint and settings, and the
/// agent's own certificate in `agent.data_dir/pki`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browsing_through_a_configured_connection_uses_its_settings() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sim = start_load_sim(dir.path(), 1, 1.0).await;
    let data_dir = dir.path().join("agent");
    write_file(dir.path(), "ca.pem", "not needed to browse");
    let config = write_file(
        dir.path(),
        "plantgate.toml",
        &agent_toml(
            &data_dir,
            "127.0.0.1:1".parse().expect("addr"),
            &dir.path().join("ca.pem"),
            "v5",
            &sim.endpoint(),
            sim.namespace_uri(),
            &[],
        ),
    );
    let from = format!("nsu={};s=LOAD", sim.namespace_uri());
    let (code, lines, stderr) = browse(&[
        "-c",
        config.to_str().expect("utf-8"),
        "--connection",
        "sim1",
        "--from",
        &from,
        "--depth",
        "1",
    ]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        lines.contains(";s=LOAD/TAG00000.CV  LOAD/TAG00000.CV  Variable  Double  r"),
        "{lines}"
    );
    assert!(
        data_dir.join("pki/own/cert.der").exists(),
        "the agent's own certificate, made where the service keeps it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_folder_of_thousands_of_tags_comes_out_whole() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sim = start_load_sim(dir.path(), 2_500, 0.1).await;
    let from = format!("nsu={};s=LOAD", sim.namespace_uri());
    let (code, lines, stderr) = browse(&[
        "--endpoint",
        &sim.endpoint(),
        "--from",
        &from,
        "--depth",
        "1",
    ]);
    assert_eq!(code, Some(0), "{stderr}");
    let tags: BTreeSet<&str> = lines
        .lines()
        .filter(|l| l.contains(";s=LOAD/TAG"))
        .collect();
    assert_eq!(tags.len(), 2_500, "{stderr}");
    assert!(stderr.contains("2500 nodes"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_a_clear_error() {
    let (code, _, stderr) = browse(&["--endpoint", "http://nowhere"]);
    assert_eq!(code, Some(78), "{stderr}");
    assert!(stderr.contains("--endpoint"), "{stderr}");
    let port = plantgate::sim::broker::free_port().expect("port");
    let (code, _, stderr) = browse(&["--endpoint", &format!("opc.tcp://127.0.0.1:{port}")]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("browse opc.tcp://127.0.0.1:{port}")),
        "{stderr}"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    write_file(dir.path(), "ca.pem", "not needed to browse");
    let config = write_file(
        dir.path(),
        "plantgate.toml",
        &agent_toml(
            &dir.path().join("agent"),
            "127.0.0.1:1".parse().expect("addr"),
            &dir.path().join("ca.pem"),
            "v5",
            "opc.tcp://127.0.0.1:4840",
            "urn:x",
            &[],
        ),
    );
    let (code, _, stderr) = browse(&[
        "-c",
        config.to_str().expect("utf-8"),
        "--connection",
        "nope",
    ]);
    assert_eq!(code, Some(78), "{stderr}");
    assert!(
        stderr.contains("--connection nope") && stderr.contains("sim1"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs python3 with asyncua"]
async fn browsing_an_asyncua_server_gives_tags_that_all_deliver() {
    let server = PyServer::start(0, &[]).await;
    let (code, toml, stderr) = browse(&["--endpoint", &server.endpoint, "--depth", "2", "--toml"]);
    assert_eq!(code, Some(0), "{stderr}");
    let names = names(&toml);
    for n in ["Line1.Counter", "Line1.Temp", "Line1.State"] {
        assert!(names.contains(n), "{n} in:\n{toml}");
    }
    // The server's own object is browsed too (namespace 0); only the
    // plant's folder is pasted, as an engineer would.
    let line1: String = toml
        .split("\n\n")
        .filter(|b| b.contains("name = \"Line1."))
        .map(|b| format!("{b}\n\n"))
        .collect();
    every_tag_gives_data(&server.endpoint, &line1).await;
    server.stop().await;
}
