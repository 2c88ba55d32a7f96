//! Pipeline benchmark (docs/performance.md): a real agent process reads N tags changing
//! at R Hz from an OPC UA load server and publishes them over TLS to a real
//! broker; an independent subscriber counts what arrives. One row per load:
//! offered and delivered values/s, loss, duplicates, seq gaps, end-to-end
//! latency, and the CPU of the agent, the load server and the broker.
//!
//! ```text
//! cargo bench --bench pipeline -- [--server sim|node-opcua|both]
//!     [--loads 1000x1,10000x1,10000x5,10000x10] [--seconds 20] [--warmup 5] [--runs 1]
//! ```
//!
//! Parts, each its own process so its CPU is its own: the load server
//! (`plantgate simulate deltav --load-control`, or the independent node-opcua
//! server in benches/node-opcua), mosquitto over TLS (the embedded rumqttd
//! only when mosquitto is not on PATH), and `plantgate run`. The counting
//! subscriber ([`Watcher`] + [`SeqTracker`]) lives in this process.
//!
//! How loss is counted exactly: the load server starts with its tags still;
//! the agent subscribes and delivers one initial value per tag; then the load
//! starts, runs through the warm-up and the measured window, and stops; the
//! server reports how many values it changed in all (`STOPPED`). Once the
//! agent's buffer is drained and every seq seen, loss = changed − delivered
//! (beyond the initial values). Rates and CPU cover the window only.
//! Not a pass/fail test: figures vary with the machine.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use plantgate::buffer::{Store, StoreOptions};
use plantgate::demo::{SeqTracker, Watcher};
use plantgate::record::Kind;
use plantgate::sim::broker::{free_port, EmbeddedBroker, TestPki};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::mpsc;

/// The agent's connection id (the `connection` of every tag record).
const CONNECTION: &str = "load";
const DEFAULT_LOADS: &str = "1000x1,10000x1,10000x5,10000x10";
/// Load server up and listening (node-opcua builds 10 000 nodes slowly).
const SERVER_READY: Duration = Duration::from_secs(120);
/// Agent connected, subscribed, and one initial value per tag delivered.
const SUBSCRIBED: Duration = Duration::from_secs(180);
/// After the load stops: buffer drained and every seq seen.
const DRAIN: Duration = Duration::from_secs(120);
/// No new tag record for this long counts as "nothing more in flight".
const QUIET: Duration = Duration::from_secs(2);

// ---------------------------------------------------------------- arguments

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ServerKind {
    Sim,
    NodeOpcua,
}

impl ServerKind {
    fn name(self) -> &'static str {
        match self {
            ServerKind::Sim => "sim",
            ServerKind::NodeOpcua => "node-opcua",
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Load {
    tags: usize,
    rate_hz: f64,
}

impl Load {
    /// `10000x5`: 10 000 tags, each changing 5 times a second.
    fn parse(s: &str) -> Option<Load> {
        let (tags, rate) = s.trim().split_once('x')?;
        let load = Load {
            tags: tags.parse().ok()?,
            rate_hz: rate.parse().ok()?,
        };
        (load.tags > 0 && load.rate_hz > 0.0 && load.rate_hz.is_finite()).then_some(load)
    }

    fn label(&self) -> String {
        format!("{}x{}Hz", self.tags, self.rate_hz)
    }
}

struct Args {
    servers: Vec<ServerKind>,
    loads: Vec<Load>,
    seconds: u64,
    warmup: u64,
    runs: usize,
}

fn arg_value(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
}

fn arg_number<T: std::str::FromStr>(args: &[String], name: &str, default: T) -> Result<T, String> {
    match arg_value(args, name) {
        None => Ok(default),
        Some(v) => v
            .parse()
            .map_err(|_| format!("{name} {v:?}: expected a number")),
    }
}

impl Args {
    /// Unknown arguments are ignored: `cargo bench` adds `--bench`.
    fn parse() -> Result<Args, String> {
        let args: Vec<String> = std::env::args().collect();
        let servers = match arg_value(&args, "--server").as_deref() {
            None | Some("both") => vec![ServerKind::Sim, ServerKind::NodeOpcua],
            Some("sim") => vec![ServerKind::Sim],
            Some("node-opcua") => vec![ServerKind::NodeOpcua],
            Some(other) => return Err(format!("--server {other:?}: sim, node-opcua or both")),
        };
        let loads_text = arg_value(&args, "--loads").unwrap_or_else(|| DEFAULT_LOADS.into());
        let loads = loads_text
            .split(',')
            .map(|s| Load::parse(s).ok_or_else(|| format!("--loads: {s:?} is not TAGSxHZ")))
            .collect::<Result<Vec<_>, _>>()?;
        let parsed = Args {
            servers,
            loads,
            seconds: arg_number(&args, "--seconds", 20)?,
            warmup: arg_number(&args, "--warmup", 5)?,
            runs: arg_number(&args, "--runs", 1)?,
        };
        if parsed.seconds == 0 || parsed.runs == 0 {
            return Err("--seconds and --runs must be at least 1".into());
        }
        Ok(parsed)
    }
}

// ------------------------------------------------------------------ /proc

fn clock_ticks_per_s() -> f64 {
    // SAFETY: sysconf(3) reads a system constant; no memory of ours.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// utime + stime of a process (all its threads), in clock ticks.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces: count after its ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

fn status_kib(pid: u32, field: &str) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// CPU a process used since [`CpuMeter::start`], as % of one core.
struct CpuMeter {
    pid: u32,
    ticks: Option<u64>,
    at: Instant,
}

impl CpuMeter {
    fn start(pid: u32) -> CpuMeter {
        CpuMeter {
            pid,
            ticks: cpu_ticks(pid),
            at: Instant::now(),
        }
    }

    fn percent(&self) -> Option<f64> {
        let used = cpu_ticks(self.pid)?.checked_sub(self.ticks?)?;
        let wall = self.at.elapsed().as_secs_f64();
        Some(used as f64 / clock_ticks_per_s() / wall * 100.0)
    }
}

fn machine() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = info
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, m)| m.trim().to_string())
        .unwrap_or_else(|| "unknown CPU".into());
    let cpus = info.lines().filter(|l| l.starts_with("processor")).count();
    let usable = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{model}, {cpus} logical CPUs ({usable} usable by this process)")
}

// --------------------------------------------------------------- processes

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|d| d.join(program).is_file()))
}

/// First line of a command's output (stdout, else stderr), e.g. a version.
async fn first_line_of(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).output().await.ok()?;
    let text = if out.stdout.is_empty() {
        out.stderr
    } else {
        out.stdout
    };
    String::from_utf8_lossy(&text)
        .lines()
        .next()
        .map(|l| l.trim().to_string())
}

/// SIGTERM, then SIGKILL if the process has not exited `within`.
async fn terminate(child: &mut Child, within: Duration) {
    if let Some(pid) = child.id() {
        // SAFETY: kill(2) on our own child, not reaped yet (id() is Some).
        unsafe {
            libc::kill(pid as libc::pid_t, libc::SIGTERM);
        }
    }
    if tokio::time::timeout(within, child.wait()).await.is_err() {
        let _ = child.kill().await;
    }
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The text of a log line without its colour escapes.
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // ESC [ parameters final-letter
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

async fn wait_port(addr: SocketAddr, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

// ------------------------------------------------------------------ broker

/// A mosquitto process with a TLS listener.
struct Mosquitto {
    child: Child,
    addr: SocketAddr,
    pki: TestPki,
    version: String,
    /// Its config and log, removed with it.
    _dir: tempfile::TempDir,
}

/// mosquitto over TLS, or the embedded rumqttd when mosquitto is missing.
enum Broker {
    Mosquitto(Box<Mosquitto>),
    Embedded(EmbeddedBroker),
}

impl Broker {
    async fn start() -> Result<Broker, String> {
        if !on_path("mosquitto") {
            let broker = tokio::task::spawn_blocking(EmbeddedBroker::start)
                .await
                .map_err(|e| format!("embedded broker: {e}"))?
                .map_err(|e| format!("embedded broker: {e}"))?;
            return Ok(Broker::Embedded(broker));
        }
        let pki = TestPki::generate().map_err(|e| e.to_string())?;
        let dir = tempfile::tempdir().map_err(|e| format!("temp dir: {e}"))?;
        let port = free_port().map_err(|e| e.to_string())?;
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        // Started as root, mosquitto drops to user `mosquitto`, which could
        // not read the key in our 0700 temp dir: `user root` keeps it root
        // (the setting is ignored when not started as root). No limits on
        // queued or in-flight messages: a subscriber that falls behind must
        // not lose messages in the broker and make the agent look lossy.
        let conf = format!(
            "user root\nallow_anonymous true\npersistence false\nlog_dest stderr\n\
             max_inflight_messages 0\nmax_queued_messages 0\nmax_queued_bytes 0\n\
             listener {port} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\n",
            pki.ca_file.display(),
            pki.server_cert_file.display(),
            pki.server_key_file.display()
        );
        let conf_path = dir.path().join("mosquitto.conf");
        std::fs::write(&conf_path, conf).map_err(|e| format!("mosquitto.conf: {e}"))?;
        let log = std::fs::File::create(dir.path().join("mosquitto.log"))
            .map_err(|e| format!("mosquitto.log: {e}"))?;
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(&conf_path)
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("starting mosquitto: {e}"))?;
        if !wait_port(addr, Duration::from_secs(20)).await {
            let log = tail(&dir.path().join("mosquitto.log"), 10);
            return Err(format!("mosquitto does not listen on {addr}:\n{log}"));
        }
        let version = first_line_of("mosquitto", &["-h"])
            .await
            .unwrap_or_else(|| "mosquitto".into());
        Ok(Broker::Mosquitto(Box::new(Mosquitto {
            child,
            addr,
            pki,
            version,
            _dir: dir,
        })))
    }

    /// Where the agent connects (MQTT 5, its default protocol).
    fn agent_addr(&self) -> SocketAddr {
        match self {
            Broker::Mosquitto(m) => m.addr,
            Broker::Embedded(b) => b.v5_addr,
        }
    }

    /// Where the counting subscriber connects (MQTT 3.1.1).
    fn watcher_addr(&self) -> SocketAddr {
        match self {
            Broker::Mosquitto(m) => m.addr,
            Broker::Embedded(b) => b.v4_addr,
        }
    }

    fn ca_file(&self) -> &Path {
        match self {
            Broker::Mosquitto(m) => &m.pki.ca_file,
            Broker::Embedded(b) => &b.pki.ca_file,
        }
    }

    /// None for the embedded broker: it runs inside this process.
    fn pid(&self) -> Option<u32> {
        match self {
            Broker::Mosquitto(m) => m.child.id(),
            Broker::Embedded(_) => None,
        }
    }

    fn describe(&self) -> String {
        match self {
            Broker::Mosquitto(m) => {
                format!("{}, TLS on {}, its own process", m.version, m.addr)
            }
            Broker::Embedded(b) => format!(
                "EMBEDDED rumqttd (mosquitto is not on PATH), TLS on {}; it runs inside \
                 the bench process, so its CPU is in the bench% column",
                b.v5_addr
            ),
        }
    }

    async fn stop(self) {
        if let Broker::Mosquitto(mut m) = self {
            terminate(&mut m.child, Duration::from_secs(5)).await;
        }
    }
}

// ------------------------------------------------------------- load server

/// Totals a load server reports (`STATS` / `STOPPED` lines).
#[derive(Clone, Copy, Debug, Default)]
struct Totals {
    changes: u64,
    ticks: u64,
    late: u64,
    /// Data values sent in subscription notifications (node-opcua only).
    sent: Option<u64>,
}

impl Totals {
    fn parse(words: &str) -> Option<Totals> {
        let mut it = words.split_whitespace().map(|w| w.parse::<u64>().ok());
        Some(Totals {
            changes: it.next()??,
            ticks: it.next()??,
            late: it.next()??,
            sent: it.next().flatten(),
        })
    }
}

/// A load server child speaking the load-control protocol (see
/// `plantgate::sim::load`): READY, STATS every second, start/stop on stdin.
struct LoadServer {
    child: Child,
    pid: u32,
    stdin: ChildStdin,
    /// stdout lines, stamped when read.
    lines: mpsc::UnboundedReceiver<(Instant, String)>,
    endpoint: String,
    namespace: String,
    /// Every `STATS` line so far.
    stats: Vec<(Instant, Totals)>,
    log: PathBuf,
}

impl LoadServer {
    fn command(
        kind: ServerKind,
        load: Load,
        dir: &Path,
        node_dir: &Path,
    ) -> Result<Command, String> {
        let (tags, rate) = (load.tags.to_string(), load.rate_hz.to_string());
        let mut cmd = match kind {
            ServerKind::Sim => {
                let mut c = Command::new(env!("CARGO_BIN_EXE_plantgate"));
                c.args([
                    "simulate",
                    "deltav",
                    "--listen",
                    "127.0.0.1:0",
                    "--speed",
                    "0",
                ])
                .args(["--tags", &tags, "--rate", &rate, "--security", "None:None"])
                .arg("--pki-dir")
                .arg(dir.join("sim-pki"))
                .env("RUST_LOG", "warn");
                c
            }
            ServerKind::NodeOpcua => {
                let port = free_port().map_err(|e| e.to_string())?.to_string();
                let mut c = Command::new("node");
                c.current_dir(node_dir)
                    .args(["load-server.js", "--tags", &tags, "--rate", &rate])
                    .args(["--port", &port])
                    .arg("--pki")
                    .arg(dir.join("node-pki"));
                c
            }
        };
        cmd.arg("--load-control");
        Ok(cmd)
    }

    async fn start(
        kind: ServerKind,
        load: Load,
        dir: &Path,
        node_dir: &Path,
    ) -> Result<LoadServer, String> {
        let log = dir.join(format!("{}.log", kind.name()));
        let log_file = std::fs::File::create(&log).map_err(|e| format!("server log: {e}"))?;
        let mut child = Self::command(kind, load, dir, node_dir)?
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(log_file)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("starting the {} load server: {e}", kind.name()))?;
        let pid = child.id().ok_or("load server exited at once")?;
        let stdin = child.stdin.take().ok_or("load server stdin")?;
        let stdout = child.stdout.take().ok_or("load server stdout")?;
        let (tx, lines) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut reader = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                if tx.send((Instant::now(), line)).is_err() {
                    return;
                }
            }
        });
        let mut server = LoadServer {
            child,
            pid,
            stdin,
            lines,
            endpoint: String::new(),
            namespace: String::new(),
            stats: Vec::new(),
            log,
        };
        let ready = server.expect_line("READY", SERVER_READY).await?;
        let mut words = ready.split_whitespace();
        server.endpoint = words.next().unwrap_or_default().to_string();
        server.namespace = words.next().unwrap_or_default().to_string();
        if server.namespace.is_empty() {
            return Err(format!(
                "load server: READY line without endpoint and namespace: {ready:?}"
            ));
        }
        Ok(server)
    }

    /// Keeps `STATS` lines; returns the rest of a line starting with `word`.
    fn take(&mut self, at: Instant, line: &str, word: &str) -> Option<String> {
        let (head, rest) = line.split_once(' ').unwrap_or((line, ""));
        if head == "STATS" {
            if let Some(t) = Totals::parse(rest) {
                self.stats.push((at, t));
            }
        }
        (head == word).then(|| rest.to_string())
    }

    /// Reads stdout lines already there (keeping `STATS`).
    fn pump(&mut self) {
        while let Ok((at, line)) = self.lines.try_recv() {
            self.take(at, &line, "");
        }
    }

    /// Waits for a line starting with `word`; on timeout or exit, says what
    /// the server logged.
    async fn expect_line(&mut self, word: &str, within: Duration) -> Result<String, String> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match tokio::time::timeout_at(deadline, self.lines.recv()).await {
                Ok(Some((at, line))) => {
                    if let Some(rest) = self.take(at, &line, word) {
                        return Ok(rest);
                    }
                }
                Ok(None) => {
                    let status = self.child.wait().await.map(|s| s.to_string());
                    return Err(format!(
                        "load server exited ({}) before {word}:\n{}",
                        status.unwrap_or_else(|e| e.to_string()),
                        tail(&self.log, 15)
                    ));
                }
                Err(_) => {
                    return Err(format!(
                        "no {word} from the load server within {} s:\n{}",
                        within.as_secs(),
                        tail(&self.log, 15)
                    ))
                }
            }
        }
    }

    async fn send(&mut self, command: &str) -> Result<(), String> {
        self.stdin
            .write_all(format!("{command}\n").as_bytes())
            .await
            .map_err(|e| format!("load server stdin: {e}"))?;
        self.stdin
            .flush()
            .await
            .map_err(|e| format!("load server stdin: {e}"))
    }

    async fn start_load(&mut self) -> Result<(), String> {
        self.send("start").await?;
        self.expect_line("STARTED", Duration::from_secs(10))
            .await
            .map(|_| ())
    }

    /// Stills the tags; returns the totals of everything changed.
    async fn stop_load(&mut self) -> Result<Totals, String> {
        self.send("stop").await?;
        let rest = self.expect_line("STOPPED", Duration::from_secs(10)).await?;
        Totals::parse(&rest).ok_or_else(|| format!("bad STOPPED line: {rest:?}"))
    }

    /// The STATS sample read closest to `at`.
    fn sample_near(&self, at: Instant) -> Option<(Instant, Totals)> {
        let dist = |t: Instant| t.max(at).duration_since(t.min(at));
        self.stats.iter().copied().min_by_key(|(t, _)| dist(*t))
    }

    /// Values changed per second between `from` and `to` (the slope of the
    /// STATS samples read then, one a second).
    fn rate_between(&self, from: Instant, to: Instant) -> Option<f64> {
        let points: Vec<(Instant, u64)> = self
            .stats
            .iter()
            .filter(|(t, _)| (from..=to).contains(t))
            .map(|(t, totals)| (*t, totals.changes))
            .collect();
        slope(&points)
    }

    /// Ticks that came late between the STATS samples nearest to `from` and `to`.
    fn late_between(&self, from: Instant, to: Instant) -> Option<u64> {
        let (_, a) = self.sample_near(from)?;
        let (_, b) = self.sample_near(to)?;
        Some(b.late.saturating_sub(a.late))
    }

    async fn stop(mut self) {
        terminate(&mut self.child, Duration::from_secs(10)).await;
    }
}

/// Installs the node-opcua server's packages when they are missing.
async fn prepare_node(node_dir: &Path) -> Result<String, String> {
    let version = first_line_of("node", &["--version"])
        .await
        .ok_or("node is not on PATH")?;
    if !node_dir.join("node_modules").is_dir() {
        println!(
            "{}: node_modules missing, running `npm ci --no-audit --no-fund` there",
            node_dir.display()
        );
        let status = Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund"])
            .current_dir(node_dir)
            .kill_on_drop(true)
            .status();
        match tokio::time::timeout(Duration::from_secs(900), status).await {
            Ok(Ok(s)) if s.success() => {}
            Ok(Ok(s)) => return Err(format!("npm ci failed ({s})")),
            Ok(Err(e)) => return Err(format!("npm ci: {e}")),
            Err(_) => return Err("npm ci took longer than 15 min".into()),
        }
    }
    Ok(format!(
        "node {version}, node-opcua from {}",
        node_dir.display()
    ))
}

// ------------------------------------------------------------------- agent

struct Agent {
    child: Child,
    pid: u32,
    health: SocketAddr,
    data_dir: PathBuf,
    log: PathBuf,
}

fn agent_toml(
    data_dir: &Path,
    health: SocketAddr,
    broker: &Broker,
    server: &LoadServer,
    tags: usize,
) -> String {
    let mut toml = format!(
        "[agent]\nid = \"bench-gw\"\nsite = \"bench\"\ndata_dir = {:?}\n\n\
         [health]\nlisten = \"{health}\"\n\n\
         [mqtt]\nurl = \"mqtts://127.0.0.1:{}\"\nca_file = {:?}\n\
         reconnect_initial = \"200ms\"\nreconnect_max = \"1s\"\n\n\
         [[connections]]\nid = \"{CONNECTION}\"\nkind = \"generic\"\nendpoint = \"{}\"\n\
         security_policy = \"None\"\nsecurity_mode = \"None\"\n\
         publishing_interval = \"100ms\"\nsampling_interval = \"50ms\"\n",
        data_dir.display().to_string(),
        broker.agent_addr().port(),
        broker.ca_file().display().to_string(),
        server.endpoint,
    );
    for i in 0..tags {
        toml.push_str(&format!(
            "\n[[connections.tags]]\nname = \"T{i:05}\"\nnode = \"nsu={};s=LOAD/TAG{i:05}.CV\"\n",
            server.namespace
        ));
    }
    toml
}

impl Agent {
    async fn start(
        dir: &Path,
        broker: &Broker,
        server: &LoadServer,
        tags: usize,
    ) -> Result<Agent, String> {
        let data_dir = dir.join("agent");
        let health =
            SocketAddr::from((Ipv4Addr::LOCALHOST, free_port().map_err(|e| e.to_string())?));
        let config = dir.join("plantgate.toml");
        std::fs::write(&config, agent_toml(&data_dir, health, broker, server, tags))
            .map_err(|e| format!("agent config: {e}"))?;
        let log = dir.join("agent.log");
        let log_file = std::fs::File::create(&log).map_err(|e| format!("agent log: {e}"))?;
        let child = Command::new(env!("CARGO_BIN_EXE_plantgate"))
            .args(["run", "-c"])
            .arg(&config)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("starting the agent: {e}"))?;
        let pid = child.id().ok_or("agent exited at once")?;
        Ok(Agent {
            child,
            pid,
            health,
            data_dir,
            log,
        })
    }

    /// Some(reason) once the process has ended.
    fn exited(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(status)) => Some(format!("agent exited ({status}):\n{}", tail(&self.log, 15))),
            _ => None,
        }
    }

    /// Records waiting in the buffer, and the last tag seq assigned (read
    /// from buffer.db: WAL lets us read while the agent writes).
    fn buffer_state(&self) -> Option<(u64, u64)> {
        let store = Store::open(&self.data_dir.join("buffer.db"), StoreOptions::default()).ok()?;
        let st = store.stats().ok()?;
        let last = st
            .streams
            .iter()
            .find(|s| s.connection == CONNECTION && s.kind == Kind::Tag)
            .map_or(0, |s| s.next_seq - 1);
        Some((st.records, last))
    }

    async fn metrics(&self) -> Result<String, String> {
        let get = async {
            let mut s = tokio::net::TcpStream::connect(self.health).await?;
            s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                .await?;
            let mut body = String::new();
            s.read_to_string(&mut body).await?;
            Ok::<_, std::io::Error>(body)
        };
        match tokio::time::timeout(Duration::from_secs(5), get).await {
            Ok(Ok(text)) => Ok(text),
            Ok(Err(e)) => Err(format!("GET /metrics: {e}")),
            Err(_) => Err("GET /metrics: no answer within 5 s".into()),
        }
    }

    /// Log lines (RUST_LOG=warn: warnings and errors).
    fn log_lines(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(strip_ansi)
            .collect()
    }

    async fn stop(mut self) {
        terminate(&mut self.child, Duration::from_secs(15)).await;
    }
}

/// `plantgate_intake_dropped_total`: the sum, and each non-zero series.
fn intake_dropped(metrics: &str) -> (u64, Vec<String>) {
    let mut total = 0.0;
    let mut series = Vec::new();
    for line in metrics.lines() {
        let Some(rest) = line.strip_prefix("plantgate_intake_dropped_total") else {
            continue;
        };
        let Some((labels, value)) = rest.rsplit_once(' ') else {
            continue;
        };
        let v: f64 = value.parse().unwrap_or(0.0);
        if v > 0.0 {
            total += v;
            series.push(format!("{labels} {v}"));
        }
    }
    (total as u64, series)
}

// ---------------------------------------------------------------- counting

/// The independent subscriber: counts tag records, duplicates and seq gaps,
/// and measures latency (receipt − the record's source `ts`).
struct Counter {
    watcher: Watcher,
    tracker: SeqTracker,
    /// Tag records seen for the first time.
    tag_records: u64,
    last_tag_at: Instant,
    /// Latencies in ms, collected while `measuring`.
    latencies: Vec<i64>,
    /// The count of tag records every 100 ms while `measuring`.
    timeline: Vec<(Instant, u64)>,
    measuring: bool,
    /// `count` of every `source.dropped` event.
    dropped_events: u64,
    /// The last `ts` parsed (a tick stamps many values alike).
    ts_cache: (String, i64),
}

impl Counter {
    async fn connect(broker: &Broker) -> Result<Counter, String> {
        let watcher = Watcher::connect(broker.watcher_addr(), broker.ca_file(), "plantgate/#")
            .await
            .map_err(|e| format!("counting subscriber: {e}"))?;
        Ok(Counter {
            watcher,
            tracker: SeqTracker::default(),
            tag_records: 0,
            last_tag_at: Instant::now(),
            latencies: Vec::new(),
            timeline: Vec::new(),
            measuring: false,
            dropped_events: 0,
            ts_cache: (String::new(), 0),
        })
    }

    fn ts_ms(&mut self, ts: &str) -> Option<i64> {
        if self.ts_cache.0 != ts {
            let ms = chrono::DateTime::parse_from_rfc3339(ts)
                .ok()?
                .timestamp_millis();
            self.ts_cache = (ts.to_string(), ms);
        }
        Some(self.ts_cache.1)
    }

    fn handle(&mut self, topic: &str, payload: &[u8]) {
        let Ok(v) = serde_json::from_slice::<Value>(payload) else {
            return;
        };
        if topic.contains("/events/") {
            self.tracker.see_payload(&v);
            if v["type"] == "source.dropped" {
                self.dropped_events += v["details"]["count"].as_u64().unwrap_or(0);
            }
            return;
        }
        if !topic.contains("/data/") {
            return;
        }
        if v["kind"] != "tag" {
            self.tracker.see_payload(&v);
            return;
        }
        let now_ms = chrono::Utc::now().timestamp_millis();
        let connection = v["connection"].as_str().unwrap_or("");
        let epoch = v["epoch"].as_str().unwrap_or("");
        for r in v["records"].as_array().map_or(&[][..], |a| a.as_slice()) {
            let Some(seq) = r["seq"].as_u64() else {
                continue;
            };
            if !self.tracker.see(connection, "tag", epoch, seq) {
                continue;
            }
            self.tag_records += 1;
            if self.measuring {
                if let Some(ts) = r["ts"].as_str().and_then(|ts| self.ts_ms(ts)) {
                    self.latencies.push(now_ms - ts);
                }
            }
        }
        self.last_tag_at = Instant::now();
    }

    /// Counts what arrives until `deadline`.
    /// While `measuring`, also samples the count every 100 ms.
    async fn run_until(&mut self, deadline: Instant) {
        let deadline = tokio::time::Instant::from_std(deadline);
        let mut every = tokio::time::interval(Duration::from_millis(100));
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => return,
                _ = every.tick(), if self.measuring => {
                    self.timeline.push((Instant::now(), self.tag_records));
                }
                msg = self.watcher.rx.recv() => match msg {
                    Some((topic, payload)) => self.handle(&topic, &payload),
                    None => {
                        tokio::time::sleep_until(deadline).await;
                        return;
                    }
                },
            }
        }
    }

    /// Counts until `done` holds, the agent exits, or `within` passes.
    async fn wait_for(
        &mut self,
        agent: &mut Agent,
        within: Duration,
        done: impl Fn(&Counter) -> bool,
    ) -> Result<(), String> {
        let deadline = Instant::now() + within;
        while !done(self) {
            if let Some(why) = agent.exited() {
                return Err(why);
            }
            if Instant::now() >= deadline {
                return Err(format!("timed out after {} s", within.as_secs()));
            }
            self.run_until(Instant::now() + Duration::from_millis(200))
                .await;
        }
        Ok(())
    }
}

/// Least-squares slope of a cumulative count over time, per second: a rate
/// that a burst (a whole tick of values) just inside or outside either edge
/// of the window does not swing the way first-to-last differences do.
fn slope(points: &[(Instant, u64)]) -> Option<f64> {
    let (t0, _) = *points.first()?;
    let xy: Vec<(f64, f64)> = points
        .iter()
        .map(|(t, n)| (t.duration_since(t0).as_secs_f64(), *n as f64))
        .collect();
    let len = xy.len() as f64;
    let mx = xy.iter().map(|(x, _)| x).sum::<f64>() / len;
    let my = xy.iter().map(|(_, y)| y).sum::<f64>() / len;
    let sxy: f64 = xy.iter().map(|(x, y)| (x - mx) * (y - my)).sum();
    let sxx: f64 = xy.iter().map(|(x, _)| (x - mx).powi(2)).sum();
    (sxx > 0.0).then(|| sxy / sxx)
}

fn percentile(sorted: &[i64], p: f64) -> Option<i64> {
    if sorted.is_empty() {
        return None;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted.get(i).copied()
}

// -------------------------------------------------------------------- rows

#[derive(Clone, Debug, Default)]
struct Row {
    label: String,
    offered_per_s: Option<f64>,
    delivered_per_s: f64,
    late_ticks: Option<u64>,
    produced: Option<u64>,
    server_sent: Option<u64>,
    delivered: u64,
    loss: Option<i64>,
    intake_dropped: Option<u64>,
    duplicates: u64,
    gaps: u64,
    p50_ms: Option<i64>,
    p99_ms: Option<i64>,
    agent_cpu: Option<f64>,
    agent_rss_mib: Option<f64>,
    server_cpu: Option<f64>,
    broker_cpu: Option<f64>,
    bench_cpu: Option<f64>,
    notes: Vec<String>,
}

fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or_else(|| "-".into(), |v| v.to_string())
}

fn pct(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.0}"))
}

const HEADER: [&str; 19] = [
    "server / load",
    "offered/s",
    "deliv/s",
    "late",
    "changed",
    "srv sent",
    "delivered",
    "loss",
    "loss%",
    "dropped",
    "dups",
    "gaps",
    "p50 ms",
    "p99 ms",
    "agent%",
    "RSS MB",
    "server%",
    "broker%",
    "bench%",
];
const WIDTHS: [usize; 19] = [28, 9, 9, 5, 9, 9, 9, 8, 6, 8, 5, 5, 7, 7, 7, 7, 8, 8, 7];

fn print_cells(cells: &[String]) {
    let mut line = format!("{:<w$}", cells[0], w = WIDTHS[0]);
    for (c, w) in cells.iter().zip(WIDTHS).skip(1) {
        line.push_str(&format!(" {c:>w$}"));
    }
    println!("{line}");
}

impl Row {
    fn cells(&self) -> Vec<String> {
        let loss_pct = match (self.loss, self.produced) {
            (Some(l), Some(p)) if p > 0 => format!("{:.2}", l as f64 * 100.0 / p as f64),
            _ => "-".into(),
        };
        vec![
            self.label.clone(),
            self.offered_per_s.map_or("-".into(), |v| format!("{v:.0}")),
            format!("{:.0}", self.delivered_per_s),
            opt(self.late_ticks),
            opt(self.produced),
            opt(self.server_sent),
            self.delivered.to_string(),
            opt(self.loss),
            loss_pct,
            opt(self.intake_dropped),
            self.duplicates.to_string(),
            self.gaps.to_string(),
            opt(self.p50_ms),
            opt(self.p99_ms),
            pct(self.agent_cpu),
            self.agent_rss_mib.map_or("-".into(), |v| format!("{v:.1}")),
            pct(self.server_cpu),
            pct(self.broker_cpu),
            pct(self.bench_cpu),
        ]
    }
}

fn median_f(values: impl Iterator<Item = f64>) -> Option<f64> {
    let mut v: Vec<f64> = values.collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    Some(v[v.len() / 2])
}

/// The median of each column over `rows` (the upper median for even counts).
fn median_row(label: String, rows: &[Row]) -> Row {
    let f = |get: fn(&Row) -> Option<f64>| median_f(rows.iter().filter_map(get));
    let u = |get: fn(&Row) -> Option<f64>| f(get).map(|v| v as u64);
    let i = |get: fn(&Row) -> Option<f64>| f(get).map(|v| v as i64);
    Row {
        label,
        offered_per_s: f(|r| r.offered_per_s),
        delivered_per_s: f(|r| Some(r.delivered_per_s)).unwrap_or(0.0),
        late_ticks: u(|r| r.late_ticks.map(|v| v as f64)),
        produced: u(|r| r.produced.map(|v| v as f64)),
        server_sent: u(|r| r.server_sent.map(|v| v as f64)),
        delivered: u(|r| Some(r.delivered as f64)).unwrap_or(0),
        loss: i(|r| r.loss.map(|v| v as f64)),
        intake_dropped: u(|r| r.intake_dropped.map(|v| v as f64)),
        duplicates: u(|r| Some(r.duplicates as f64)).unwrap_or(0),
        gaps: u(|r| Some(r.gaps as f64)).unwrap_or(0),
        p50_ms: i(|r| r.p50_ms.map(|v| v as f64)),
        p99_ms: i(|r| r.p99_ms.map(|v| v as f64)),
        agent_cpu: f(|r| r.agent_cpu),
        agent_rss_mib: f(|r| r.agent_rss_mib),
        server_cpu: f(|r| r.server_cpu),
        broker_cpu: f(|r| r.broker_cpu),
        bench_cpu: f(|r| r.bench_cpu),
        notes: Vec::new(),
    }
}

// --------------------------------------------------------------------- run

/// CPU meters over the measured window.
struct Meters {
    agent: CpuMeter,
    server: CpuMeter,
    broker: Option<CpuMeter>,
    bench: CpuMeter,
}

impl Meters {
    fn start(agent: u32, server: u32, broker: Option<u32>) -> Meters {
        Meters {
            agent: CpuMeter::start(agent),
            server: CpuMeter::start(server),
            broker: broker.map(CpuMeter::start),
            bench: CpuMeter::start(std::process::id()),
        }
    }
}

fn progress(row: &str, what: &str) {
    eprintln!("[pipeline] {row}: {what}");
}

/// Waits until the agent's buffer is empty, every assigned tag seq has been
/// seen, and nothing new arrived for [`QUIET`].
async fn drain(counter: &mut Counter, agent: &mut Agent) -> Result<(), String> {
    let deadline = Instant::now() + DRAIN;
    loop {
        counter
            .run_until(Instant::now() + Duration::from_millis(250))
            .await;
        if let Some(why) = agent.exited() {
            return Err(why);
        }
        let (pending, last) = agent.buffer_state().unwrap_or((u64::MAX, u64::MAX));
        let seen = counter.tracker.last_seq(CONNECTION, "tag").unwrap_or(0);
        if pending == 0 && seen >= last && counter.last_tag_at.elapsed() >= QUIET {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "not drained after {} s: {pending} records pending in the buffer, \
                 tag seq {seen} of {last} seen",
                DRAIN.as_secs()
            ));
        }
    }
}

struct Setup<'a> {
    args: &'a Args,
    broker: &'a Broker,
    node_dir: &'a Path,
}

async fn run_once(setup: &Setup<'_>, kind: ServerKind, load: Load, label: &str) -> Row {
    let mut row = Row {
        label: label.to_string(),
        ..Row::default()
    };
    let dir = match tempfile::Builder::new()
        .prefix("plantgate-pipeline-")
        .tempdir()
    {
        Ok(d) => d,
        Err(e) => {
            row.notes.push(format!("temp dir: {e}"));
            return row;
        }
    };
    progress(label, "starting the load server");
    let mut server = match LoadServer::start(kind, load, dir.path(), setup.node_dir).await {
        Ok(s) => s,
        Err(e) => {
            row.notes.push(e);
            return row;
        }
    };
    if let Err(e) = measure(setup, load, label, dir.path(), &mut server, &mut row).await {
        row.notes.push(e);
    }
    server.stop().await;
    row
}

/// Subscriber, agent, initial values, warm-up, window, stop, drain.
async fn measure(
    setup: &Setup<'_>,
    load: Load,
    label: &str,
    dir: &Path,
    server: &mut LoadServer,
    row: &mut Row,
) -> Result<(), String> {
    let mut counter = Counter::connect(setup.broker).await?;
    progress(
        label,
        "starting the agent; waiting for one initial value per tag",
    );
    let mut agent = Agent::start(dir, setup.broker, server, load.tags).await?;
    let result =
        measure_with_agent(setup, load, label, server, &mut counter, &mut agent, row).await;
    counts_into(row, &counter, load.tags as u64);
    agent_report_into(row, &agent).await;
    agent.stop().await;
    result
}

/// What the subscriber counted.
fn counts_into(row: &mut Row, counter: &Counter, initial_values: u64) {
    row.delivered = counter.tag_records.saturating_sub(initial_values);
    row.duplicates = counter.tracker.duplicates;
    row.gaps = counter.tracker.gaps;
    for g in counter.tracker.gap_details.iter().take(5) {
        row.notes.push(format!("seq gap {g}"));
    }
    if counter.dropped_events > 0 {
        row.notes.push(format!(
            "source.dropped events announced {} dropped values",
            counter.dropped_events
        ));
    }
}

/// What the agent says of itself: intake drops, peak RSS, its log.
async fn agent_report_into(row: &mut Row, agent: &Agent) {
    match agent.metrics().await {
        Ok(text) => {
            let (total, series) = intake_dropped(&text);
            row.intake_dropped = Some(total);
            for s in series {
                row.notes.push(format!("plantgate_intake_dropped_total{s}"));
            }
        }
        Err(e) => row.notes.push(e),
    }
    row.agent_rss_mib = status_kib(agent.pid, "VmHWM:").map(|k| k as f64 / 1024.0);
    let lines = agent.log_lines();
    if lines.is_empty() {
        return;
    }
    row.notes.push(format!(
        "agent logged {} warning/error lines, the first distinct ones:",
        lines.len()
    ));
    let mut shown: Vec<&str> = Vec::new();
    for line in &lines {
        // The message after the timestamp.
        let message = line.split_once(' ').map_or(line.as_str(), |(_, m)| m);
        if shown.len() < 3 && !shown.contains(&message) {
            shown.push(message);
            row.notes.push(format!("  {line}"));
        }
    }
}

async fn measure_with_agent(
    setup: &Setup<'_>,
    load: Load,
    label: &str,
    server: &mut LoadServer,
    counter: &mut Counter,
    agent: &mut Agent,
    row: &mut Row,
) -> Result<(), String> {
    let tags = load.tags as u64;
    if let Err(e) = counter
        .wait_for(agent, SUBSCRIBED, |c| c.tag_records >= tags)
        .await
    {
        return Err(format!(
            "initial values: {} of {tags} arrived: {e}",
            counter.tag_records
        ));
    }
    server.start_load().await?;
    let warmup = setup.args.warmup;
    progress(label, &format!("load started; warming up {warmup} s"));
    counter
        .run_until(Instant::now() + Duration::from_secs(warmup))
        .await;
    progress(label, &format!("measuring {} s", setup.args.seconds));
    measure_window(setup, server, counter, agent, row).await;
    progress(label, "stopping the load; waiting for the agent to drain");
    stop_and_drain(server, counter, agent, tags, row).await
}

/// Rates, latency and CPU over `--seconds`.
async fn measure_window(
    setup: &Setup<'_>,
    server: &mut LoadServer,
    counter: &mut Counter,
    agent: &Agent,
    row: &mut Row,
) {
    let meters = Meters::start(agent.pid, server.pid, setup.broker.pid());
    let from = Instant::now();
    counter.measuring = true;
    counter
        .run_until(from + Duration::from_secs(setup.args.seconds))
        .await;
    counter.measuring = false;
    let to = Instant::now();
    row.agent_cpu = meters.agent.percent();
    row.server_cpu = meters.server.percent();
    row.broker_cpu = meters.broker.as_ref().and_then(CpuMeter::percent);
    row.bench_cpu = meters.bench.percent();
    row.delivered_per_s = slope(&counter.timeline).unwrap_or(0.0);
    let mut latencies = std::mem::take(&mut counter.latencies);
    latencies.sort_unstable();
    row.p50_ms = percentile(&latencies, 0.50);
    row.p99_ms = percentile(&latencies, 0.99);
    server.pump();
    row.offered_per_s = server.rate_between(from, to);
    row.late_ticks = server.late_between(from, to);
}

/// Stills the load, waits for the agent to deliver everything, and counts
/// the loss (`initial_values` delivered before the load started aside).
async fn stop_and_drain(
    server: &mut LoadServer,
    counter: &mut Counter,
    agent: &mut Agent,
    initial_values: u64,
    row: &mut Row,
) -> Result<(), String> {
    let totals = server.stop_load().await?;
    row.produced = Some(totals.changes);
    row.notes.push(format!(
        "load server: {} values in {} ticks ({} late) from start to stop",
        totals.changes, totals.ticks, totals.late
    ));
    drain(counter, agent).await?;
    let delivered = counter.tag_records.saturating_sub(initial_values);
    row.loss = Some(totals.changes as i64 - delivered as i64);
    // Drained and quiet: a STATS line printed from now on has everything
    // the server sent (the ones queued meanwhile may be older).
    server.pump();
    let after = server.expect_line("STATS", Duration::from_secs(5)).await?;
    row.server_sent = Totals::parse(&after)
        .and_then(|t| t.sent)
        .map(|sent| sent.saturating_sub(initial_values));
    Ok(())
}

/// Prints what runs where; returns the servers that can run.
async fn describe_setup(args: &Args, broker: &Broker, node_dir: &Path) -> Vec<ServerKind> {
    println!("machine: {}", machine());
    println!("broker:  {}", broker.describe());
    let mut servers = args.servers.clone();
    if servers.contains(&ServerKind::Sim) {
        println!(
            "server sim:        `plantgate simulate deltav --speed 0 --tags N --rate R` \
             (this build), own process"
        );
    }
    if servers.contains(&ServerKind::NodeOpcua) {
        match prepare_node(node_dir).await {
            Ok(v) => println!("server node-opcua: {v}, own process"),
            Err(e) => {
                println!("server node-opcua: SKIPPED: {e}");
                servers.retain(|s| *s != ServerKind::NodeOpcua);
            }
        }
    }
    println!(
        "agent:   generic connection, publishing 100ms / sampling 50ms, RUST_LOG=warn; \
         warm-up {} s, window {} s, {} run(s) per load",
        args.warmup, args.seconds, args.runs
    );
    println!();
    servers
}

async fn run_all(args: &Args) -> Result<(), String> {
    println!(
        "pipeline benchmark: OPC UA load server -> plantgate run -> TLS MQTT broker \
         -> counting subscriber"
    );
    let broker = Broker::start().await?;
    let node_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/node-opcua");
    let servers = describe_setup(args, &broker, &node_dir).await;
    let setup = Setup {
        args,
        broker: &broker,
        node_dir: &node_dir,
    };
    let mut table: Vec<Row> = Vec::new();
    for &kind in &servers {
        for &load in &args.loads {
            let mut rows = Vec::new();
            for run in 1..=args.runs {
                let mut label = format!("{} {}", kind.name(), load.label());
                if args.runs > 1 {
                    label.push_str(&format!(" #{run}"));
                }
                rows.push(run_once(&setup, kind, load, &label).await);
            }
            if rows.len() > 1 {
                let label = format!("{} {} median", kind.name(), load.label());
                rows.push(median_row(label, &rows));
            }
            table.extend(rows);
        }
    }
    broker.stop().await;
    print_table(&table);
    Ok(())
}

const LEGEND: &str = "\
offered/s  values the load server changed per second in the window: least-squares slope of its
           STATS totals (one a second), so a tick just inside or outside an edge does not count
           whole; at 1 Hz over a short window it still moves by a few %
deliv/s    new tag records the subscriber got per second in the window (slope of its count,
           sampled every 100 ms)
late       load-server ticks in the window that missed their schedule (the server fell behind)
changed    all values the load server changed from load start to stop (its STOPPED line)
srv sent   of those, the values the server sent to the agent in subscription notifications
           (node-opcua only). changed - srv sent never left the server: discarded by an
           overflowing monitored-item queue (the agent sees those and counts them in dropped),
           or never sampled (the server's sampling fell behind; nobody can see those)
delivered  all new tag records delivered for them, after the agent drained (initial values excluded)
loss       changed - delivered (negative: more delivered than changed)
dropped    what the agent itself counts as lost: its plantgate_intake_dropped_total
dups/gaps  duplicate records and seq gaps the subscriber saw (SeqTracker)
p50/p99    latency: receipt time minus the record's source ts, over the window
agent% server% broker% bench%  CPU over the window in % of one core (bench: this process, the
           counting subscriber); RSS MB: the agent's peak resident memory (VmHWM)";

fn print_table(rows: &[Row]) {
    print_cells(&HEADER.map(String::from));
    for r in rows {
        print_cells(&r.cells());
    }
    println!();
    println!("{LEGEND}");
    for r in rows.iter().filter(|r| !r.notes.is_empty()) {
        println!();
        println!("{}:", r.label);
        for n in &r.notes {
            for line in n.lines() {
                println!("  {line}");
            }
        }
    }
}

fn main() {
    let args = match Args::parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("pipeline bench: {e}");
            std::process::exit(2);
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    if let Err(e) = rt.block_on(run_all(&args)) {
        eprintln!("pipeline bench: {e}");
        std::process::exit(1);
    }
}
