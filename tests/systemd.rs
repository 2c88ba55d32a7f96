//! systemd notify protocol with a real `NOTIFY_SOCKET` datagram socket:
//! `plantgate run` says READY=1, pings WATCHDOG=1 while alive, and says
//! STOPPING=1 on SIGTERM. A write lock another process holds on the buffer
//! (a `plantgate buffer retry`, an operator's sqlite3 shell) is ridden out,
//! not a reason for systemd to restart the service (docs/guarantees.md): the pings go
//! on, `/readyz` says why it is not ready, and the records held meanwhile
//! arrive afterwards. (The watchdog gate itself, `health::pipeline_fault`,
//! fails on a dead task or a buffer thread that does not answer: unit
//! tests in `health`.)

mod common;

use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// Receives notify messages until one contains `want` or `within` elapses.
fn wait_msg(sock: &UnixDatagram, want: &str, within: Duration) -> Option<Instant> {
    let deadline = Instant::now() + within;
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        sock.set_read_timeout(Some(left)).expect("timeout");
        if let Ok(n) = sock.recv(&mut buf) {
            let msg = String::from_utf8_lossy(&buf[..n]);
            if msg.lines().any(|l| l == want) {
                return Some(Instant::now());
            }
        }
    }
    None
}

fn drain(sock: &UnixDatagram) {
    let mut buf = [0u8; 4096];
    sock.set_nonblocking(true).expect("nonblocking");
    while sock.recv(&mut buf).is_ok() {}
    sock.set_nonblocking(false).expect("blocking");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ready_watchdog_and_a_locked_buffer() {
    let plant = start_plant().await;
    let data_dir = plant.dir.path().join("agent");
    let health_port = plantgate::sim::broker::free_port().expect("free port");
    let health: std::net::SocketAddr = ([127, 0, 0, 1], health_port).into();
    let toml = agent_toml(
        &data_dir,
        plant.broker.v5_addr,
        &plant.broker.pki.ca_file,
        "v5",
        &plant.sim.endpoint(),
        plant.sim.namespace_uri(),
        &[("FLOW", "FIC-101/PV.CV")],
    )
    .replace(
        r#"listen = "127.0.0.1:0""#,
        &format!(r#"listen = "{health}""#),
    );
    let config = write_file(plant.dir.path(), "plantgate.toml", &toml);
    let sock_path = plant.dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).expect("bind notify socket");
    let mut child = Command::new(env!("CARGO_BIN_EXE_plantgate"))
        .args(["run", "-c"])
        .arg(&config)
        .env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", "2000000")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let sock = tokio::task::spawn_blocking(move || {
        assert!(wait_msg(&sock, "READY=1", PATIENCE).is_some(), "no READY=1");
        for i in 0..3 {
            assert!(
                wait_msg(&sock, "WATCHDOG=1", Duration::from_secs(5)).is_some(),
                "watchdog ping {i} missing"
            );
        }
        sock
    })
    .await
    .expect("thread");

    // Another process holds the database's write lock, so the agent's
    // commits fail while values keep coming.
    let db = data_dir.join("buffer.db");
    let locker = rusqlite::Connection::open(&db).expect("open db");
    locker.busy_timeout(PATIENCE).expect("busy timeout");
    locker
        .execute_batch("BEGIN IMMEDIATE")
        .expect("take the write lock");
    let driving = tokio_util::sync::CancellationToken::new();
    let driver = {
        let driving = driving.clone();
        let sim = &plant.sim;
        let mut v = 0.0;
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        async move {
            while !driving.is_cancelled() {
                tick.tick().await;
                v += 1.0;
                sim.set_value("FIC-101/PV.CV", v);
            }
        }
    };
    let check = async {
        // Not ready while the buffer refuses records, and it says why...
        let deadline = Instant::now() + PATIENCE;
        loop {
            let (code, body) = http_get(health, "/readyz").await;
            if code == 503 && body.contains("buffer not accepting records") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "agent never reported the locked buffer: {code} {body}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // ...but alive: the pipeline holds the records, systemd has
        // nothing to restart.
        let (code, body) = http_get(health, "/healthz").await;
        assert_eq!(code, 200, "{body}");
        tokio::task::spawn_blocking(move || {
            drain(&sock);
            for i in 0..2 {
                assert!(
                    wait_msg(&sock, "WATCHDOG=1", Duration::from_secs(5)).is_some(),
                    "watchdog ping {i} missing while the buffer was locked"
                );
            }
            sock
        })
        .await
        .expect("thread")
    };
    let (sock, ()) = tokio::join!(
        async {
            let r = check.await;
            driving.cancel();
            r
        },
        driver
    );
    locker.execute_batch("COMMIT").expect("commit");
    drop(locker);
    // Ready again once the held records are in.
    let deadline = Instant::now() + PATIENCE;
    while http_get(health, "/readyz").await.0 != 200 {
        assert!(Instant::now() < deadline, "not ready after the lock");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let pid = child.id().to_string();
    Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    let stopping = tokio::task::spawn_blocking(move || wait_msg(&sock, "STOPPING=1", PATIENCE))
        .await
        .expect("thread");
    assert!(stopping.is_some(), "no STOPPING=1");
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .expect("thread")
        .expect("wait");
    assert!(status.success(), "{status:?}");
    plant.sim.shutdown().await;
}
