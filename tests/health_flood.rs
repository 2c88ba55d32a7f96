//! docs/health.md: the health server holds a bounded number of connections with a
//! header-read timeout; a flood of idle clients never takes it, nor the
//! agent's file descriptors, down. Real sockets against a real agent: the
//! `plantgate run` binary under a 1024-descriptor limit, and an in-process
//! agent for the shed counters.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use plantgate::health::{connection_stats, HealthLimits};
use plantgate::sim::proxy::CutProxy;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The idle sockets of the flood: more than the agent's descriptor limit.
const FLOOD: usize = 1100;
/// The agent's RLIMIT_NOFILE, the usual default soft limit.
const AGENT_NOFILE: u64 = 1024;

/// Lets this test process hold the flood (and a margin) open.
fn raise_own_nofile(want: u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a local struct.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        if lim.rlim_cur >= want as libc::rlim_t {
            return;
        }
        assert!(
            lim.rlim_max >= want as libc::rlim_t,
            "this test needs {want} descriptors, the hard limit is {}",
            lim.rlim_max
        );
        lim.rlim_cur = want as libc::rlim_t;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0);
    }
}

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// The agent binary, killed when dropped.
struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `plantgate --log-format json run` with RLIMIT_NOFILE set to
/// [`AGENT_NOFILE`] (the shell execs, so the pid is the agent's).
fn start_limited_agent(config: &Path, log: &Path) -> Agent {
    let log = std::fs::File::create(log).expect("log");
    let child = Command::new("sh")
        .arg("-c")
        .arg(format!("ulimit -n {AGENT_NOFILE} && exec \"$0\" \"$@\""))
        .arg(env!("CARGO_BIN_EXE_plantgate"))
        .args(["--log-format", "json", "run", "-c"])
        .arg(config)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn plantgate");
    Agent(child)
}

/// The health address from the agent's JSON log.
async fn health_addr_from_log(log: &Path) -> SocketAddr {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        for line in text.lines() {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
                continue;
            };
            if v["message"] == "health endpoint listening" {
                if let Some(addr) = v["addr"].as_str().and_then(|a| a.parse().ok()) {
                    return addr;
                }
            }
        }
        assert!(Instant::now() < deadline, "agent never listened:\n{text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_code(addr: SocketAddr, path: &str, want: u16) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let code = match tokio::time::timeout(Duration::from_secs(5), http_get(addr, path)).await {
            Ok((code, _)) => code,
            Err(_) => 0,
        };
        if code == want {
            return;
        }
        assert!(Instant::now() < deadline, "{path} stayed {code}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// GET `path` on a fresh connection within `within`; (status, latency).
async fn timed_get(addr: SocketAddr, path: &str, within: Duration) -> (u16, Duration) {
    let t = Instant::now();
    let (code, _) = tokio::time::timeout(within, http_get(addr, path))
        .await
        .unwrap_or_else(|_| panic!("{path} did not answer within {within:?}"));
    (code, t.elapsed())
}

async fn open_idle(addr: SocketAddr, n: usize) -> Vec<TcpStream> {
    let mut held = Vec::with_capacity(n);
    for i in 0..n {
        let s = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(addr))
            .await
            .unwrap_or_else(|_| panic!("connect {i} hung"))
            .unwrap_or_else(|e| panic!("connect {i}: {e}"));
        held.push(s);
    }
    held
}

/// True once the peer closed `s` (EOF or reset); false if it is still open
/// after `wait`.
async fn closed_within(s: &mut TcpStream, wait: Duration) -> bool {
    let mut buf = [0u8; 256];
    match tokio::time::timeout(wait, s.read(&mut buf)).await {
        Ok(Ok(0)) | Ok(Err(_)) => true,
        Ok(Ok(_)) => panic!("an idle connection received data"),
        Err(_) => false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idle_socket_flood_neither_silences_healthz_nor_exhausts_descriptors() {
    raise_own_nofile(2 * FLOOD as u64 + 512);
    let plant = start_plant().await;
    let proxy = CutProxy::start(plant.broker.v5_addr).await.expect("proxy");
    let toml = agent_toml(
        &plant.dir.path().join("agent"),
        proxy.addr(),
        &plant.broker.pki.ca_file,
        "v5",
        &plant.sim.endpoint(),
        plant.sim.namespace_uri(),
        &[("FLOW", "FIC-101/PV.CV")],
    );
    let config = write_file(plant.dir.path(), "plantgate.toml", &toml);
    let log = plant.dir.path().join("agent.log");
    let agent = start_limited_agent(&config, &log);
    let pid = agent.0.id();
    let addr = health_addr_from_log(&log).await;
    wait_code(addr, "/readyz", 200).await;
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
    let nofile = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("nofile line");
    assert!(
        nofile.split_whitespace().nth(3) == Some("1024"),
        "agent runs under the 1024 limit: {nofile}"
    );
    let baseline = fd_count(pid);
    eprintln!("agent descriptors before the flood: {baseline}");

    let t = Instant::now();
    let mut held = open_idle(addr, FLOOD).await;
    eprintln!("{FLOOD} idle connections opened in {:?}", t.elapsed());

    // While they are held: /healthz answers at once, every time, and the
    // agent's descriptors stay far from its limit.
    let bound = baseline + 3 * HealthLimits::default().max_connections + 16;
    let mut worst = Duration::ZERO;
    let mut max_fds = fd_count(pid);
    for _ in 0..10 {
        let (code, took) = timed_get(addr, "/healthz", Duration::from_secs(5)).await;
        assert_eq!(code, 200);
        worst = worst.max(took);
        max_fds = max_fds.max(fd_count(pid));
    }
    eprintln!("under the flood: /healthz worst {worst:?}, agent descriptors at most {max_fds} (bound {bound})");
    assert!(max_fds <= bound, "agent holds {max_fds} descriptors");

    // MQTT must still be able to open a connection: cut the broker and
    // watch the agent reconnect while the flood is held.
    proxy.cut();
    wait_code(addr, "/readyz", 503).await;
    proxy.restore();
    wait_code(addr, "/readyz", 200).await;
    max_fds = max_fds.max(fd_count(pid));
    assert!(max_fds <= bound, "agent holds {max_fds} descriptors");

    // A second wave on top of the first: still answered, still bounded.
    held.extend(open_idle(addr, FLOOD).await);
    let (code, took) = timed_get(addr, "/healthz", Duration::from_secs(5)).await;
    assert_eq!(code, 200);
    let fds = fd_count(pid);
    eprintln!(
        "second wave ({} held): /healthz {took:?}, agent descriptors {fds}",
        held.len()
    );
    assert!(fds <= bound, "agent holds {fds} descriptors");

    // The idle ones the server kept are shed by the header-read timeout:
    // every held socket ends up closed by the agent, and its descriptors
    // come back to where they were.
    let deadline = Instant::now() + HealthLimits::default().header_read_timeout + PATIENCE;
    for (i, s) in held.iter_mut().enumerate() {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            closed_within(s, left).await,
            "held connection {i} was never closed by the agent"
        );
    }
    let deadline = Instant::now() + PATIENCE;
    while fd_count(pid) > baseline + 8 {
        assert!(
            Instant::now() < deadline,
            "agent descriptors stay at {} (baseline {baseline})",
            fd_count(pid)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(held);
    let (code, _) = timed_get(addr, "/healthz", Duration::from_secs(5)).await;
    assert_eq!(code, 200);

    let text = std::fs::read_to_string(&log).expect("log");
    assert!(
        !text.contains("Too many open files"),
        "descriptors ran out:\n{text}"
    );
    assert!(
        text.contains("health endpoint is shedding connections"),
        "shedding announced:\n{text}"
    );
    let status = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let mut agent = agent;
    let exit = tokio::task::spawn_blocking(move || agent.0.wait())
        .await
        .expect("thread")
        .expect("wait");
    assert!(exit.success(), "clean stop: {exit:?}");
}

/// A keep-alive GET: sends it, reads exactly one response, leaves the
/// connection open.
async fn keep_alive_get(s: &mut TcpStream, addr: SocketAddr, path: &str) -> u16 {
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n");
    s.write_all(req.as_bytes()).await.expect("send");
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(PATIENCE, s.read(&mut chunk))
            .await
            .expect("response in time")
            .expect("read");
        assert!(n > 0, "closed before the response ended");
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf);
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len: usize = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().ok())?
                })
                .expect("content-length");
            if body.len() >= len {
                return head
                    .split_whitespace()
                    .nth(1)
                    .and_then(|c| c.parse().ok())
                    .unwrap_or(0);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn over_the_limit_the_oldest_goes_and_idle_ones_time_out_counted() {
    raise_own_nofile(1024);
    let plant = start_plant().await;
    let toml = agent_toml(
        &plant.dir.path().join("agent"),
        plant.broker.v5_addr,
        &plant.broker.pki.ca_file,
        "v5",
        &plant.sim.endpoint(),
        plant.sim.namespace_uri(),
        &[("FLOW", "FIC-101/PV.CV")],
    );
    let agent = run_agent(&toml).await;
    let addr = agent.health_addr();
    let limits = HealthLimits::default();
    let max = limits.max_connections;
    // Counters are process-wide; this is the only health server in this
    // test binary's process.
    let before = connection_stats();

    // Fill every slot with idle sockets, then go over by 10: the 10 oldest
    // are closed at once, the rest stay.
    let mut first = open_idle(addr, max).await;
    let mut extra = open_idle(addr, 10).await;
    for (i, s) in first.iter_mut().take(10).enumerate() {
        assert!(
            closed_within(s, Duration::from_secs(3)).await,
            "oldest connection {i} kept over the limit"
        );
    }
    for s in first.iter_mut().skip(10).chain(extra.iter_mut()).take(5) {
        assert!(
            !closed_within(s, Duration::from_millis(200)).await,
            "a connection within the limit was closed"
        );
    }
    let mid = connection_stats();
    assert!(
        mid.shed_over_limit_total - before.shed_over_limit_total >= 10,
        "{before:?} -> {mid:?}"
    );
    assert!(mid.open as usize <= max + 1, "{mid:?}");

    // A client that sends its request is answered while the slots are full.
    let (code, took) = timed_get(addr, "/healthz", Duration::from_secs(5)).await;
    assert_eq!(code, 200);
    eprintln!("/healthz with every slot held by idle sockets: {took:?}");

    // A slow sender (half a header) and the idle ones are closed by the
    // header-read timeout.
    let mut slow = TcpStream::connect(addr).await.expect("connect");
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .expect("half a header");
    let t = Instant::now();
    assert!(
        closed_within(
            &mut slow,
            limits.header_read_timeout + Duration::from_secs(5)
        )
        .await,
        "slow sender kept"
    );
    let waited = t.elapsed();
    assert!(
        waited >= limits.header_read_timeout - Duration::from_millis(500),
        "closed after {waited:?}, before the header timeout"
    );
    let deadline = limits.header_read_timeout + Duration::from_secs(5);
    for s in first.iter_mut().skip(10).chain(extra.iter_mut()) {
        assert!(closed_within(s, deadline).await, "idle connection kept");
    }
    let after = connection_stats();
    eprintln!("health connection counters: {before:?} -> {after:?}");
    // 74 idle sockets, 12 of them closed for newcomers (10 idle ones, the
    // /healthz client, the slow sender): the other 62 and the slow sender
    // timed out.
    assert!(
        after.shed_header_timeout_total - before.shed_header_timeout_total
            >= (max + 10 - 12) as u64,
        "{after:?}"
    );

    // A keep-alive client that got its answers and then went quiet is
    // closed too, but is not counted as shed.
    let settle = Instant::now() + PATIENCE;
    while connection_stats().open != 0 {
        assert!(Instant::now() < settle, "{:?}", connection_stats());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let quiet = connection_stats();
    let mut ka = TcpStream::connect(addr).await.expect("connect");
    assert_eq!(keep_alive_get(&mut ka, addr, "/healthz").await, 200);
    assert_eq!(keep_alive_get(&mut ka, addr, "/healthz").await, 200);
    assert!(
        closed_within(&mut ka, limits.header_read_timeout + Duration::from_secs(5)).await,
        "quiet keep-alive connection kept"
    );
    let end = connection_stats();
    assert_eq!(
        end.shed_header_timeout_total, quiet.shed_header_timeout_total,
        "a served keep-alive connection counted as shed"
    );
    assert_eq!(end.accepted_total, quiet.accepted_total + 1);
    agent.stop().await;
}
