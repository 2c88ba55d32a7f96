//! The `plantgate` binary: parses the command line and calls into the library.
//! Every subcommand is a function here; the behaviour lives in the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use tokio_util::sync::CancellationToken;

use plantgate::config::{self, EXIT_CONFIG};

#[derive(Parser)]
#[command(
    name = "plantgate",
    version,
    about = "Edge gateway: DeltaV / OptoMES over OPC UA → SQLite buffer → TLS MQTT"
)]
struct Cli {
    /// Log line format on stderr (levels from RUST_LOG, default info).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the service.
    Run {
        /// Config file (else $PLANTGATE_CONFIG, else /etc/plantgate/plantgate.toml).
        #[arg(short, long)]
        config: Option<PathBuf>,
    },
    /// Simulated DeltaV and OptoMES servers + embedded TLS broker + the agent, printing what arrives.
    Demo {
        /// Stop by itself after this many seconds.
        #[arg(long)]
        duration: Option<u64>,
        /// Cut the broker for this many seconds mid-run to show buffering and replay.
        #[arg(long)]
        outage: Option<u64>,
        /// Stop the agent for this many seconds mid-run; the gap is read back from the simulator's history.
        #[arg(long)]
        restart: Option<u64>,
        /// What goes over MQTT: plantgate's JSON or Sparkplug B (decoded and shown as a host application sees it).
        #[arg(long, value_parser = ["json", "sparkplug_b"], default_value = "json")]
        format: String,
    },
    /// A standalone simulator OPC UA server.
    Simulate {
        #[arg(value_parser = ["deltav", "optomes"])]
        kind: String,
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:4840")]
        listen: std::net::SocketAddr,
        /// Time acceleration.
        #[arg(long, default_value_t = 1.0)]
        speed: f64,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Extra changing Double tags for load tests.
        #[arg(long, default_value_t = 0)]
        tags: usize,
        /// Change rate of each extra tag, in Hz.
        #[arg(long, default_value_t = 1.0)]
        rate: f64,
        /// Require this username (with --password).
        #[arg(long, requires = "password")]
        user: Option<String>,
        #[arg(long, requires = "user")]
        password: Option<String>,
        /// Directory for the simulator's PKI (default: a temporary one).
        #[arg(long)]
        pki_dir: Option<PathBuf>,
        /// Offer only these endpoints, as POLICY:MODE (repeatable), e.g.
        /// `--security None:None --security Basic256Sha256:SignAndEncrypt`.
        /// Default: every pair of docs/configuration.md.
        #[arg(long = "security", value_name = "POLICY:MODE", value_parser = parse_sim_security)]
        security: Vec<(
            opcua::crypto::SecurityPolicy,
            opcua::types::MessageSecurityMode,
        )>,
        /// For benchmarks: the load tags wait for a `start` line on stdin
        /// (`stop` pauses them); prints `READY <endpoint> <namespace>`, then
        /// `STATS <changes> <ticks> <late ticks>` every second.
        #[arg(long)]
        load_control: bool,
    },
    /// Validate the config and print the effective config (secrets as ***);
    /// with --connect, try every connection and the broker instead.
    Check {
        #[arg(short, long)]
        config: Option<PathBuf>,
        /// Connect as the service would: each OPC UA server (endpoint,
        /// security, certificate, identity, every node) and the broker
        /// (TLS, authentication, a QoS 1 publish), one line per check.
        /// Writes nothing to the plant.
        #[arg(long)]
        connect: bool,
    },
    /// Browse a server's address space: one line per node, or with --toml
    /// `[[connections.tags]]` blocks for the readable variables. Writes
    /// nothing to the plant.
    Browse {
        /// The config whose connection (--connection) to browse with: its
        /// endpoint, security, identity and PKI.
        #[arg(short, long, requires = "connection")]
        config: Option<PathBuf>,
        #[arg(long, requires = "config")]
        connection: Option<String>,
        /// A bare endpoint instead (no security, anonymous).
        #[arg(long, conflicts_with_all = ["config", "connection"], required_unless_present = "connection")]
        endpoint: Option<String>,
        /// Start node (default: the Objects folder), e.g. "nsu=urn:x;s=Area1".
        #[arg(long)]
        from: Option<String>,
        /// Levels below the start node.
        #[arg(long, default_value_t = 3)]
        depth: u32,
        /// Print ready-to-paste tag blocks for the readable variables.
        #[arg(long)]
        toml: bool,
    },
    /// Ask the running agent to reload its configuration (the unit's
    /// ExecReload) and wait for the outcome: exit 0 when applied, 1 when
    /// refused (the reasons printed), 78 when the file is invalid.
    Reload {
        #[arg(short, long)]
        config: Option<PathBuf>,
        /// The agent's process id (systemd: $MAINPID); default: the one
        /// that writes the report in agent.data_dir.
        #[arg(long)]
        pid: Option<u32>,
        /// Seconds to wait for the outcome.
        #[arg(long, default_value_t = 90)]
        timeout: u64,
    },
    /// Ask the running agent, through the broker, to send a seq range of a
    /// stream again (as a consumer would; prints the agent's result).
    Replay {
        #[arg(short, long)]
        config: Option<PathBuf>,
        /// The connection id; omit for the agent's own events.
        #[arg(long)]
        connection: Option<String>,
        /// tag, batch, recipe, oee, downtime or event.
        #[arg(long)]
        kind: String,
        #[arg(long)]
        from: u64,
        #[arg(long)]
        to: u64,
        /// The buffer's epoch (default: read from the buffer of the config).
        #[arg(long)]
        epoch: Option<String>,
        /// Seconds to wait for the result.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
    },
    /// Man pages or shell completions (bash, zsh, fish) into DIR: what the
    /// Debian packages install (packaging/deb.sh).
    #[command(hide = true)]
    Generate {
        #[arg(value_parser = ["man", "completions"])]
        what: String,
        dir: PathBuf,
    },
    /// Inspect the buffer database of a config.
    Buffer {
        #[command(subcommand)]
        action: BufferAction,
    },
}

#[derive(Subcommand)]
enum BufferAction {
    /// Records, bytes, oldest record and evictions per stream.
    Stats {
        #[arg(short, long)]
        config: Option<PathBuf>,
    },
    /// Records the broker rejected repeatedly (or too large to send).
    DeadLetters {
        #[arg(short, long)]
        config: Option<PathBuf>,
    },
    /// Re-queue every dead letter for delivery (with its original seq).
    Retry {
        #[arg(short, long)]
        config: Option<PathBuf>,
    },
}

fn parse_sim_security(
    s: &str,
) -> Result<
    (
        opcua::crypto::SecurityPolicy,
        opcua::types::MessageSecurityMode,
    ),
    String,
> {
    use opcua::crypto::SecurityPolicy as P;
    use opcua::types::MessageSecurityMode as M;
    let (p, m) = s
        .split_once(':')
        .ok_or("expected POLICY:MODE, e.g. Basic256Sha256:SignAndEncrypt")?;
    let policy = match p {
        "None" => P::None,
        "Basic256Sha256" => P::Basic256Sha256,
        "Aes128Sha256RsaOaep" => P::Aes128Sha256RsaOaep,
        "Aes256Sha256RsaPss" => P::Aes256Sha256RsaPss,
        other => return Err(format!("unknown security policy {other:?}")),
    };
    let mode = match m {
        "None" => M::None,
        "Sign" => M::Sign,
        "SignAndEncrypt" => M::SignAndEncrypt,
        other => return Err(format!("unknown security mode {other:?}")),
    };
    Ok((policy, mode))
}

fn config_path(arg: Option<PathBuf>) -> PathBuf {
    arg.or_else(|| std::env::var_os("PLANTGATE_CONFIG").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("/etc/plantgate/plantgate.toml"))
}

/// Default log levels when RUST_LOG is unset. The OPC UA client's
/// subscription service logs every publish request a closing session
/// fails (`BadSessionClosed`), a burst at each clean stop; every failure
/// there also reaches plantgate, which reports it with its context, so
/// that module is silenced. The demo's embedded broker reports every cut
/// connection as an error, which is the point of the demo, not news.
fn default_filter(command: &Command) -> &'static str {
    match command {
        // One-shot commands: what goes wrong is said in their own words;
        // the libraries' chatter about sessions closing is not.
        Command::Browse { .. } | Command::Check { connect: true, .. } => {
            "warn,opcua_client=off,opcua_core=off,opcua_crypto=error,rumqttc=off"
        }
        Command::Demo { .. } => {
            "info,rumqttd=off,opcua_client=error,opcua_client::session::services::subscriptions=off,\
             opcua_server=warn,opcua_core=warn"
        }
        _ => {
            "info,rumqttd=warn,opcua_client=warn,opcua_client::session::services::subscriptions=off,\
             opcua_server=warn,opcua_core=warn"
        }
    }
}

/// Logs to stderr, or to `file` (the demo, whose live view is stdout and
/// must not be interleaved with log lines).
fn init_logging(format: LogFormat, default: &str, file: Option<&std::path::Path>) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    let opened = file.map(std::fs::File::create);
    match (format, opened) {
        (LogFormat::Text, Some(Ok(f))) => builder
            .with_ansi(false)
            .with_writer(std::sync::Mutex::new(f))
            .init(),
        (LogFormat::Json, Some(Ok(f))) => builder
            .json()
            .flatten_event(true)
            .with_writer(std::sync::Mutex::new(f))
            .init(),
        (format, opened) => {
            if let Some(Err(e)) = opened {
                eprintln!("plantgate: cannot write the log file ({e}); logging to stderr");
            }
            let builder = builder.with_writer(std::io::stderr);
            match format {
                LogFormat::Text => builder.init(),
                LogFormat::Json => builder.json().flatten_event(true).init(),
            }
        }
    }
}

/// Where the demo logs: a file of its own in the temporary directory,
/// named at the top of its live view.
fn demo_log_file() -> PathBuf {
    std::env::temp_dir().join(format!("plantgate-demo-{}.log", std::process::id()))
}

/// Loads the config or prints one line per problem and returns exit 78.
fn load_config(path: &std::path::Path) -> Result<config::Config, ExitCode> {
    match config::load(path) {
        Ok(loaded) => {
            for w in &loaded.warnings {
                tracing::warn!("{w}");
            }
            Ok(loaded.config)
        }
        Err(e) => Err(config_error(path, &e)),
    }
}

/// For the `buffer` commands: they read only `agent.data_dir` and
/// `[buffer]`, so they neither need nor resolve the secrets, which outside
/// the service (no `$CREDENTIALS_DIRECTORY`, another user) may not be at
/// hand. Warnings are the service's business and not repeated here.
fn load_config_without_secrets(path: &std::path::Path) -> Result<config::Config, ExitCode> {
    config::load_without_secrets(path)
        .map(|loaded| loaded.config)
        .map_err(|e| config_error(path, &e))
}

fn config_error(path: &std::path::Path, e: &config::ConfigError) -> ExitCode {
    eprintln!("plantgate: invalid configuration ({}):", path.display());
    for p in &e.problems {
        eprintln!("  {}: {}", p.path, p.message);
    }
    ExitCode::from(EXIT_CONFIG as u8)
}

/// Files and directories the process creates are its own only: buffer.db
/// (SQLite gives its -wal and -shm the database's mode), the data and PKI
/// directories, a quarantined database. The systemd unit sets `UMask=0077`
/// too; this covers every other way of starting the binary.
fn restrict_umask() {
    // SAFETY: umask(2) only swaps the process's file mode creation mask; it
    // cannot fail and touches no memory of ours.
    #[cfg(unix)]
    unsafe {
        libc::umask(0o077);
    }
}

/// A buffer left readable by others (created by an older version, or
/// copied in) is set to 0600, as the OPC UA key is: it holds every record
/// waiting for delivery.
fn restrict_buffer_files(data_dir: &std::path::Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let db = plantgate::buffer::DB_FILE_NAME;
        for name in [db.to_string(), format!("{db}-wal"), format!("{db}-shm")] {
            let file = data_dir.join(name);
            let Some(mode) = plantgate::secret::exposed_mode(&file) else {
                continue;
            };
            match std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)) {
                Ok(()) => tracing::warn!(
                    file = %file.display(),
                    was = format!("{mode:04o}"),
                    "buffer file was accessible by group or others; set to 0600"
                ),
                Err(e) => tracing::warn!(
                    file = %file.display(),
                    mode = format!("{mode:04o}"),
                    error = %e,
                    "buffer file is accessible by group or others and could not be restricted"
                ),
            }
        }
    }
}

/// Cancels on SIGTERM or SIGINT.
/// SIGTERM and SIGINT stop; SIGHUP is a reload in `run`
/// ([`reload_on_hangup`]) and ignored elsewhere (`hangup_ignored`).
fn cancel_on_signals(cancel: CancellationToken, hangup_ignored: bool) {
    if hangup_ignored {
        ignore_hangup();
    }
    tokio::spawn(async move {
        let term = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = term => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        cancel.cancel();
    });
}

/// `systemctl reload plantgate` and SIGHUP: read the configuration file
/// and environment again, validate them as at start, and hand the result
/// to the agent, which applies it or refuses it (docs/cli.md).
fn reload_on_hangup(
    mut hup: tokio::signal::unix::Signal,
    agent: std::sync::Arc<plantgate::agent::Agent>,
    path: PathBuf,
    cancel: CancellationToken,
) {
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                got = hup.recv() => if got.is_none() { return },
            }
            plantgate::systemd::notify_reloading();
            tracing::info!(path = %path.display(), "reloading the configuration");
            let loaded = config::load(&path)
                .map(|l| {
                    for w in &l.warnings {
                        tracing::warn!("{w}");
                    }
                    l.config
                })
                .map_err(|e| e.problems.iter().map(ToString::to_string).collect());
            let outcome = agent.reload(loaded).await;
            if outcome.applied {
                tracing::info!(summary = %outcome.summary, "reload applied");
            }
            plantgate::systemd::notify_ready();
        }
    });
}

/// SIGHUP's default action ends the process at once: no clean stop, the
/// broker publishes the Last Will. Outside `run` (demo, simulators) there
/// is nothing to reload, so a hang-up is logged and otherwise ignored.
fn ignore_hangup() {
    let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot handle SIGHUP; it would end the process");
            return;
        }
    };
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            tracing::warn!("SIGHUP ignored: only `plantgate run` reloads its configuration");
        }
    });
}

fn main() -> ExitCode {
    plantgate::heap::limit_arenas();
    restrict_umask();
    let cli = Cli::parse();
    let log_file = matches!(cli.command, Command::Demo { .. }).then(demo_log_file);
    init_logging(
        cli.log_format,
        default_filter(&cli.command),
        log_file.as_deref(),
    );
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("plantgate: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(dispatch(cli.command))
}

/// `plantgate run`: the agent under systemd (READY, watchdog, STOPPING)
/// until SIGTERM or Ctrl-C.
async fn run_agent(config: config::Config, path: PathBuf) -> ExitCode {
    restrict_buffer_files(&config.agent.data_dir);
    let cancel = CancellationToken::new();
    cancel_on_signals(cancel.clone(), false);
    // Before the agent starts: from here on a SIGHUP is a reload (one sent
    // while starting waits for it), never the default action, which would
    // end the process.
    let hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup());
    let (agent, join) = match plantgate::agent::start(config, cancel.clone()).await {
        Ok(started) => started,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::FAILURE;
        }
    };
    plantgate::systemd::notify_ready();
    plantgate::systemd::spawn_watchdog(agent.board.clone(), agent.buffer.clone(), cancel.clone());
    let agent = std::sync::Arc::new(agent);
    match hangups {
        Ok(hangups) => reload_on_hangup(hangups, agent.clone(), path, cancel.clone()),
        Err(e) => tracing::warn!(error = %e, "cannot handle SIGHUP: reload is not available"),
    }
    tokio::spawn({
        let cancel = cancel.clone();
        async move {
            cancel.cancelled().await;
            plantgate::systemd::notify_stopping();
        }
    });
    if let Err(e) = join.await {
        tracing::error!(error = %e, "shutdown failed");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

/// `plantgate check --connect`: every connection, then the broker, one
/// line per check as it completes; exit 0 when all pass, else 1.
async fn check_connect(config: &config::Config) -> ExitCode {
    let pki_dir = config.agent.data_dir.join("pki");
    let mut failed = 0;
    let mut report = |checks: Vec<plantgate::probe::Check>| {
        for c in checks {
            failed += usize::from(!c.ok);
            println!("{}", c.line());
        }
    };
    for conn in &config.connections {
        report(plantgate::source::probe::connection(conn, &pki_dir).await);
    }
    report(plantgate::uplink::probe::broker(config).await);
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        eprintln!("plantgate: {failed} check(s) failed");
        ExitCode::FAILURE
    }
}

/// `plantgate generate man|completions DIR`: from the clap definition of
/// this very binary.
fn generate(what: &str, dir: &std::path::Path) -> ExitCode {
    use clap::CommandFactory;
    let written = std::fs::create_dir_all(dir).and_then(|()| match what {
        "man" => clap_mangen::generate_to(Cli::command(), dir),
        _ => [
            clap_complete::Shell::Bash,
            clap_complete::Shell::Zsh,
            clap_complete::Shell::Fish,
        ]
        .into_iter()
        .try_for_each(|shell| {
            clap_complete::generate_to(shell, &mut Cli::command(), "plantgate", dir).map(drop)
        }),
    });
    match written {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("plantgate: generate {what} into {}: {e}", dir.display());
            ExitCode::FAILURE
        }
    }
}

/// What `plantgate browse` connects with.
enum BrowseTarget {
    Endpoint(String),
    Connection(PathBuf, String),
}

/// `plantgate browse`: exit 0 with the nodes, 1 when the server cannot be
/// browsed, 78 for a bad config or connection id.
async fn run_browse(target: BrowseTarget, from: Option<&str>, depth: u32, toml: bool) -> ExitCode {
    // A bare endpoint gets a throw-away PKI: no security, nothing to trust.
    let scratch;
    let (conn, pki_dir) = match target {
        BrowseTarget::Connection(path, id) => {
            let config = match load_config(&path) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let Some(conn) = config.connections.iter().find(|c| c.id == id).cloned() else {
                let ids: Vec<&str> = config.connections.iter().map(|c| c.id.as_str()).collect();
                eprintln!(
                    "plantgate: --connection {id}: not in {} (it has: {})",
                    path.display(),
                    ids.join(", ")
                );
                return ExitCode::from(EXIT_CONFIG as u8);
            };
            (conn, config.agent.data_dir.join("pki"))
        }
        BrowseTarget::Endpoint(url) => {
            scratch = match tempfile::tempdir() {
                Ok(d) => d,
                Err(e) => {
                    eprintln!("plantgate: browse: a temporary directory: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let text = format!(
                "[agent]\nid = \"browse\"\nsite = \"browse\"\n[mqtt]\nurl = \"mqtts://localhost\"\n\
                 [[connections]]\nid = \"browse\"\nkind = \"generic\"\nendpoint = {}\n\
                 security_policy = \"None\"\nsecurity_mode = \"None\"\n",
                config::toml_string(&url)
            );
            match config::load_from(&text, &Default::default()) {
                Ok(l) => match l.config.connections.into_iter().next() {
                    Some(c) => (c, scratch.path().join("pki")),
                    None => return ExitCode::FAILURE,
                },
                Err(e) => {
                    for p in &e.problems {
                        let key = p.path.replace("connections[0].endpoint", "--endpoint");
                        eprintln!("plantgate: {key}: {}", p.message);
                    }
                    return ExitCode::from(EXIT_CONFIG as u8);
                }
            }
        }
    };
    let one = match plantgate::source::open::OneShot::open(&conn, &pki_dir).await {
        Ok(one) => one,
        Err(e) => {
            eprintln!("plantgate: browse {}: {e}", conn.endpoint);
            return ExitCode::FAILURE;
        }
    };
    let result = match plantgate::browse::start(&one, from) {
        Ok(start) => plantgate::browse::walk(&one, &start, depth).await,
        Err(e) => Err(e),
    };
    one.close().await;
    let walk = match result {
        Ok(w) => w,
        Err(e) => {
            eprintln!("plantgate: browse {}: {e}", conn.endpoint);
            return ExitCode::FAILURE;
        }
    };
    if toml {
        let readable = walk.found.iter().filter(|f| f.readable()).count();
        println!(
            "# {readable} readable variables of {} under {} (depth {depth})\n",
            conn.endpoint,
            from.unwrap_or("the Objects folder")
        );
        print!("{}", plantgate::browse::tags_toml(&walk.found));
    } else {
        for f in &walk.found {
            println!("{}", plantgate::browse::line(f));
        }
    }
    for (node, status) in &walk.failed {
        eprintln!("plantgate: browse: {node} could not be browsed: {status}");
    }
    if walk.truncated {
        eprintln!(
            "plantgate: browse: stopped at {} nodes; use --from and --depth for less",
            plantgate::browse::MAX_NODES
        );
    }
    eprintln!("{} nodes", walk.found.len());
    ExitCode::SUCCESS
}

/// `plantgate reload`: signals the agent and reports what it did with
/// the file (docs/cli.md). An invalid file is refused here with the same
/// errors as `check` (secrets aside); the agent, still signalled when its pid is known,
/// refuses it too and says so in its log, event and `/status`.
async fn request_reload(path: PathBuf, pid: Option<u32>, timeout: u64) -> ExitCode {
    // Only agent.data_dir is needed here; the agent resolves the secrets
    // (it has $CREDENTIALS_DIRECTORY) and reports any problem with them.
    let config = match load_config_without_secrets(&path) {
        Ok(c) => c,
        Err(code) => {
            if let Some(pid) = pid {
                let _ = plantgate::reload_report::hang_up(pid);
            }
            return code;
        }
    };
    let waited = std::time::Duration::from_secs(timeout);
    match plantgate::reload_report::request(&config.agent.data_dir, pid, waited).await {
        Ok(last) if last.applied => {
            println!("reload applied: {}", last.summary);
            ExitCode::SUCCESS
        }
        Ok(last) => {
            eprintln!("plantgate: reload refused; the configuration in force stays:");
            for e in &last.errors {
                eprintln!("  {e}");
            }
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("plantgate: reload: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `plantgate demo`: fails when the consumer saw a gap in any stream.
async fn run_demo(
    duration: Option<u64>,
    outage: Option<u64>,
    restart: Option<u64>,
    format: &str,
) -> ExitCode {
    let cancel = CancellationToken::new();
    cancel_on_signals(cancel.clone(), true);
    let opts = plantgate::demo::DemoOptions {
        duration: duration.map(std::time::Duration::from_secs),
        outage: outage.map(std::time::Duration::from_secs),
        restart: restart.map(std::time::Duration::from_secs),
        log_file: Some(demo_log_file()),
        format: match format {
            "sparkplug_b" => plantgate::config::MqttFormat::SparkplugB,
            _ => plantgate::config::MqttFormat::Json,
        },
    };
    match plantgate::demo::run(opts, cancel).await {
        Ok(summary) if summary.gaps == 0 && summary.sparkplug_seq_errors == 0 => ExitCode::SUCCESS,
        Ok(_) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("plantgate demo: {e:#}");
            eprintln!("  the log: {}", demo_log_file().display());
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(command: Command) -> ExitCode {
    match command {
        Command::Run { config } => {
            let path = config_path(config);
            match load_config(&path) {
                Ok(config) => run_agent(config, path).await,
                Err(code) => code,
            }
        }
        Command::Check { config, connect } => {
            let path = config_path(config);
            match load_config(&path) {
                Ok(c) if connect => check_connect(&c).await,
                Ok(c) => {
                    print!("{}", config::render(&c));
                    ExitCode::SUCCESS
                }
                Err(code) => code,
            }
        }
        Command::Browse {
            config,
            connection,
            endpoint,
            from,
            depth,
            toml,
        } => {
            let target = match (endpoint, config, connection) {
                (Some(url), _, _) => BrowseTarget::Endpoint(url),
                (None, config, Some(id)) => BrowseTarget::Connection(config_path(config), id),
                (None, _, None) => BrowseTarget::Endpoint(String::new()),
            };
            run_browse(target, from.as_deref(), depth, toml).await
        }
        Command::Reload {
            config,
            pid,
            timeout,
        } => request_reload(config_path(config), pid, timeout).await,
        Command::Generate { what, dir } => generate(&what, &dir),
        Command::Demo {
            duration,
            outage,
            restart,
            format,
        } => run_demo(duration, outage, restart, &format).await,
        Command::Simulate {
            kind,
            listen,
            speed,
            seed,
            tags,
            rate,
            user,
            password,
            pki_dir,
            security,
            load_control,
        } => {
            let cancel = CancellationToken::new();
            cancel_on_signals(cancel.clone(), true);
            let tmp;
            let pki_dir = match pki_dir {
                Some(p) => p,
                None => match tempfile::tempdir() {
                    Ok(t) => {
                        tmp = t;
                        tmp.path().to_path_buf()
                    }
                    Err(e) => {
                        eprintln!("plantgate simulate: {e}");
                        return ExitCode::FAILURE;
                    }
                },
            };
            let opts = plantgate::sim::SimOptions {
                listen,
                seed,
                speed,
                tags,
                rate_hz: rate,
                user: user.zip(password),
                pki_dir,
            };
            let extras = plantgate::sim::SimExtras {
                endpoints: (!security.is_empty()).then_some(security),
                load_control,
                ..Default::default()
            };
            match plantgate::sim::run_simulator(&kind, opts, extras, cancel).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("plantgate simulate: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Replay {
            config,
            connection,
            kind,
            from,
            to,
            epoch,
            timeout,
        } => {
            let Some(kind) = plantgate::record::Kind::parse(&kind) else {
                eprintln!("plantgate replay: --kind {kind:?} is not tag, batch, recipe, oee, downtime or event");
                return ExitCode::from(2);
            };
            let config = match load_config(&config_path(config)) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let epoch = match epoch {
                Some(e) => e,
                None => match open_buffer(&config) {
                    Ok(store) => store.epoch().to_string(),
                    Err(code) => return code,
                },
            };
            let ask = plantgate::replay_client::Ask {
                connection,
                kind,
                from_seq: from,
                to_seq: to,
                epoch,
                timeout: std::time::Duration::from_secs(timeout),
            };
            match plantgate::replay_client::ask(&config, &ask).await {
                Ok(result) => {
                    println!("{result}");
                    if result["error"].is_null() {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::FAILURE
                    }
                }
                Err(e) => {
                    eprintln!("plantgate replay: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Buffer { action } => {
            let (config, run): (_, fn(&config::Config) -> ExitCode) = match action {
                BufferAction::Stats { config } => (config, buffer_stats),
                BufferAction::DeadLetters { config } => (config, buffer_dead_letters),
                BufferAction::Retry { config } => (config, buffer_retry),
            };
            match load_config_without_secrets(&config_path(config)) {
                Ok(c) => run(&c),
                Err(code) => code,
            }
        }
    }
}

fn seq(v: Option<u64>) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| "-".into())
}

/// Opens the buffer of a config for inspection (alongside a running
/// service: WAL mode lets both work on the file).
fn open_buffer(config: &config::Config) -> Result<plantgate::buffer::Store, ExitCode> {
    let path = config.agent.data_dir.join(plantgate::buffer::DB_FILE_NAME);
    if !path.exists() {
        eprintln!("plantgate buffer: no buffer at {}", path.display());
        return Err(ExitCode::FAILURE);
    }
    let options = plantgate::buffer::StoreOptions {
        synchronous: config.buffer.synchronous,
        // Only what decides how a re-queue treats kept history; the size
        // limits are the service's to enforce.
        limits: plantgate::buffer::Limits {
            retain_delivered: config.buffer.retain_delivered,
            ..plantgate::buffer::Limits::NONE
        },
        ..Default::default()
    };
    plantgate::buffer::Store::open(&path, options).map_err(|e| {
        eprintln!("plantgate buffer: {e}");
        ExitCode::FAILURE
    })
}

fn buffer_dead_letters(config: &config::Config) -> ExitCode {
    let store = match open_buffer(config) {
        Ok(s) => s,
        Err(code) => return code,
    };
    match store.dead_letters() {
        Ok(list) => {
            println!("{} dead letters", list.len());
            if !list.is_empty() {
                println!(
                    "{:<24} {:<9} {:>21} {:>7} {:<24} reason",
                    "connection", "kind", "seq", "count", "dead since"
                );
            }
            for d in &list {
                let conn = if d.connection.is_empty() {
                    "(agent)"
                } else {
                    &d.connection
                };
                println!(
                    "{:<24} {:<9} {:>21} {:>7} {:<24} {}",
                    conn,
                    d.kind,
                    format!("{}..{}", d.first_seq, d.last_seq),
                    d.count,
                    plantgate::record::format_ts(d.dead_at_ms),
                    d.reason
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("plantgate buffer: {e}");
            ExitCode::FAILURE
        }
    }
}

fn buffer_retry(config: &config::Config) -> ExitCode {
    let mut store = match open_buffer(config) {
        Ok(s) => s,
        Err(code) => return code,
    };
    match store.retry_dead_letters() {
        Ok(n) => {
            println!("{n} dead letters re-queued for delivery");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("plantgate buffer: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Bytes per record and how long the free buffer lasts at the running
/// agent's intake rate (its `/status`, docs/health.md); the rate is only
/// known while an agent runs with this config.
fn headroom_line(config: &config::Config, st: &plantgate::buffer::Stats) -> String {
    let max = config.buffer.max_size;
    let free = max.saturating_sub(st.bytes);
    let per_record = match st.records {
        0 => "-".to_string(),
        n => format!("{}", st.bytes / n),
    };
    let space = format!(
        "bytes per record: {per_record}; free: {} of {} MiB",
        free / (1 << 20),
        max / (1 << 20)
    );
    match running_agent_status(config) {
        Some(status) => match (
            status["intake"]["records_per_s"].as_u64(),
            status["buffer"]["headroom_s"].as_u64(),
        ) {
            (Some(rate), Some(headroom)) => format!(
                "{space}; at {rate} records/s the free buffer holds {}",
                human_span(headroom)
            ),
            _ => format!("{space}; the running agent takes in nothing now"),
        },
        None => format!(
            "{space}; intake rate unknown (no agent answering on {})",
            config.health.listen
        ),
    }
}

/// `3h 12min`, `12 min`, `45 s`.
fn human_span(seconds: u64) -> String {
    match seconds {
        s if s >= 3_600 => format!("{} h {} min", s / 3_600, s % 3_600 / 60),
        s if s >= 60 => format!("{} min", s / 60),
        s => format!("{s} s"),
    }
}

/// The running agent's `/status`, read from its health endpoint (loopback
/// when it listens on every address); None when nothing answers in 2 s.
fn running_agent_status(config: &config::Config) -> Option<serde_json::Value> {
    use std::io::{Read, Write};
    let mut addr = config.health.listen;
    if addr.port() == 0 {
        return None;
    }
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let timeout = std::time::Duration::from_secs(2);
    let mut stream = std::net::TcpStream::connect_timeout(&addr, timeout).ok()?;
    stream.set_read_timeout(Some(timeout)).ok()?;
    stream.set_write_timeout(Some(timeout)).ok()?;
    stream
        .write_all(format!("GET /status HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        return None;
    }
    serde_json::from_str(body).ok()
}

/// What the buffer keeps for replay (docs/mqtt.md, replay).
fn kept_line(config: &config::Config, st: &plantgate::buffer::Stats) -> String {
    let retain = config.buffer.retain_delivered;
    if retain.is_zero() {
        return "kept for replay: nothing (buffer.retain_delivered = 0s)".into();
    }
    let from = st.retained_from_ms.map_or_else(
        || "-".to_string(),
        |t| {
            let age = (plantgate::record::now_ms() - t).max(0) / 1000;
            format!("{} ({age} s ago)", plantgate::record::format_ts(t))
        },
    );
    format!(
        "kept for replay: {} records, {} bytes, from {from} (retain_delivered {}), {} let go so far",
        st.retained_records,
        st.retained_bytes,
        config::human_duration::format(retain),
        st.retained_released_total
    )
}

fn buffer_stats(config: &config::Config) -> ExitCode {
    let store = match open_buffer(config) {
        Ok(s) => s,
        Err(code) => return code,
    };
    match store.stats() {
        Ok(st) => {
            println!("buffer {}  epoch {}", store.path().display(), store.epoch());
            let oldest = st.oldest_ts_ms.map(|t| {
                let age = (plantgate::record::now_ms() - t).max(0) / 1000;
                format!("{} ({age} s ago)", plantgate::record::format_ts(t))
            });
            println!(
                "total: {} records, {} bytes, oldest {}, {} evicted, {} dead letters",
                st.records,
                st.bytes,
                oldest.unwrap_or_else(|| "-".into()),
                st.evicted_total,
                st.dead_letters
            );
            println!("{}", headroom_line(config, &st));
            println!("{}", kept_line(config, &st));
            println!(
                "{:<24} {:<9} {:>10} {:>12} {:>10} {:>10} {:>10} {:>10} {:>10}",
                "connection",
                "kind",
                "records",
                "bytes",
                "first_seq",
                "last_seq",
                "evicted",
                "kept",
                "kept_from"
            );
            for s in &st.streams {
                let conn = if s.connection.is_empty() {
                    "(agent)"
                } else {
                    &s.connection
                };
                println!(
                    "{:<24} {:<9} {:>10} {:>12} {:>10} {:>10} {:>10} {:>10} {:>10}",
                    conn,
                    s.kind,
                    s.records,
                    s.bytes,
                    seq(s.first_seq),
                    seq(s.last_seq),
                    s.evicted_total,
                    s.retained_records,
                    seq(s.retained_first_seq)
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("plantgate buffer: {e}");
            ExitCode::FAILURE
        }
    }
}
