//! A real mosquitto broker for interop and fault tests: TLS listener, mutual
//! TLS listener, optional persistence and ACL. Killed when dropped.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use plantgate::sim::broker::{free_port, wait_listening, TestPki};

#[derive(Default, Clone)]
pub struct MosquittoOptions {
    /// Keep sessions and queued messages across restarts (persistence file).
    pub persistence: bool,
    /// ACL file lines (anonymous clients); None = everything allowed.
    pub acl: Option<String>,
    /// `max_packet_size`: the broker disconnects a client sending a larger
    /// packet and announces the limit in its MQTT 5 CONNACK.
    pub max_packet_size: Option<u32>,
    /// Log everything (`log_type all`), e.g. each denied PUBLISH.
    pub log_all: bool,
    /// A mosquitto password file: clients that give a user name must give
    /// its password (anonymous ones are still let in).
    pub password_file: Option<PathBuf>,
}

pub struct Mosquitto {
    child: Option<Child>,
    pub tls: SocketAddr,
    pub mtls: SocketAddr,
    conf: PathBuf,
    dir: tempfile::TempDir,
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Mosquitto {
    fn spawn(&mut self) {
        let log = std::fs::File::create(self.dir.path().join("mosquitto.log")).expect("log file");
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(&self.conf)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("mosquitto binary (apt-get install mosquitto)");
        self.child = Some(child);
        for a in [self.tls, self.mtls] {
            wait_listening(a, Duration::from_secs(20)).expect("mosquitto listens");
        }
    }

    /// Stops the broker process with `signal` ("TERM" or "KILL") and waits
    /// for it to be gone.
    pub fn stop(&mut self, signal: &str) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args([format!("-{signal}"), c.id().to_string()])
                .status();
            let _ = c.wait();
        }
    }

    /// Makes the running broker read its password file (and ACL) again, as
    /// `systemctl reload mosquitto` does.
    pub fn reload(&self) {
        let c = self.child.as_ref().expect("running");
        let sent = Command::new("kill")
            .args(["-HUP".to_string(), c.id().to_string()])
            .status()
            .expect("kill");
        assert!(sent.success(), "kill -HUP mosquitto");
    }

    /// Starts the broker again on the same ports (and persistence file).
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "stop it first");
        self.spawn();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("mosquitto.log")).unwrap_or_default()
    }
}

pub fn start_mosquitto(pki: &TestPki, opts: MosquittoOptions) -> Mosquitto {
    let dir = tempfile::tempdir().expect("tempdir");
    let tls = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port().expect("port")));
    let mtls = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port().expect("port")));
    let files = format!(
        "cafile {}\ncertfile {}\nkeyfile {}\n",
        pki.ca_file.display(),
        pki.server_cert_file.display(),
        pki.server_key_file.display()
    );
    let mut conf = String::from(
        "user root\nper_listener_settings false\nallow_anonymous true\nlog_dest stderr\n\
         max_inflight_messages 0\nmax_queued_messages 1000000\nmax_queued_bytes 0\n",
    );
    if opts.persistence {
        conf.push_str(&format!(
            "persistence true\npersistence_location {}/\nautosave_interval 1\n",
            dir.path().display()
        ));
    } else {
        conf.push_str("persistence false\n");
    }
    if let Some(max) = opts.max_packet_size {
        conf.push_str(&format!("max_packet_size {max}\n"));
    }
    if let Some(file) = &opts.password_file {
        conf.push_str(&format!("password_file {}\n", file.display()));
    }
    if opts.log_all {
        conf.push_str("log_type all\n");
    }
    if let Some(acl) = &opts.acl {
        let acl_path = dir.path().join("acl");
        std::fs::write(&acl_path, acl).expect("acl file");
        conf.push_str(&format!("acl_file {}\n", acl_path.display()));
    }
    conf.push_str(&format!(
        "listener {} 127.0.0.1\n{files}listener {} 127.0.0.1\n{files}require_certificate true\n",
        tls.port(),
        mtls.port()
    ));
    let conf_path = dir.path().join("mosquitto.conf");
    std::fs::write(&conf_path, conf).expect("mosquitto.conf");
    let mut m = Mosquitto {
        child: None,
        tls,
        mtls,
        conf: conf_path,
        dir,
    };
    m.spawn();
    m
}

/// MQTT 5 client options for a test consumer over TLS (verifying with
/// `ca`), with a fresh client id starting with `role`.
pub fn mqtt5_options(
    role: &str,
    addr: SocketAddr,
    ca: &std::path::Path,
) -> rumqttc::v5::MqttOptions {
    let tls = plantgate::uplink::tls::client_config(Some(ca), None, None).expect("tls");
    let id = format!("{role}-{}", uuid::Uuid::new_v4().simple());
    let mut o = rumqttc::v5::MqttOptions::new(id, addr.ip().to_string(), addr.port());
    o.set_keep_alive(Duration::from_secs(5))
        .set_max_packet_size(Some(64 * 1024 * 1024))
        .set_transport(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(tls),
        ));
    o
}
