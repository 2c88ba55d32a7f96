//! The embedded MQTT broker of `plantgate demo` and of the tests: rumqttd
//! with TLS, behind certificates made fresh at start by rcgen (a private CA,
//! a server certificate for localhost/127.0.0.1 and a client certificate for
//! mutual-TLS tests). Nothing is read from or left in the user's files: the
//! PEM files live in a temporary directory that goes away with the broker.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("generating test certificates: {0}")]
    Certs(#[from] rcgen::Error),
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no free port: {0}")]
    Port(std::io::Error),
    #[error("the embedded broker did not start listening on {0}")]
    NotListening(SocketAddr),
    #[error("starting the embedded broker: {0}")]
    Start(String),
}

/// A private CA and the certificates it signed, as PEM files in `dir`.
pub struct TestPki {
    _dir: tempfile::TempDir,
    pub ca_file: PathBuf,
    pub server_cert_file: PathBuf,
    pub server_key_file: PathBuf,
    pub client_cert_file: PathBuf,
    pub client_key_file: PathBuf,
}

fn write(path: &Path, text: &str) -> Result<(), BrokerError> {
    std::fs::write(path, text).map_err(|source| BrokerError::Write {
        path: path.into(),
        source,
    })
}

impl TestPki {
    pub fn generate() -> Result<TestPki, BrokerError> {
        let dir = tempfile::Builder::new()
            .prefix("plantgate-pki-")
            .tempdir()
            .map_err(|source| BrokerError::Write {
                path: std::env::temp_dir(),
                source,
            })?;
        let ca_key = KeyPair::generate()?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "plantgate demo CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_cert = ca_params.self_signed(&ca_key)?;

        let server_key = KeyPair::generate()?;
        let mut server_params = CertificateParams::new(vec!["localhost".to_string()])?;
        server_params
            .subject_alt_names
            .push(SanType::IpAddress(Ipv4Addr::LOCALHOST.into()));
        server_params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        server_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let server_cert = server_params.signed_by(&server_key, &ca_cert, &ca_key)?;

        let client_key = KeyPair::generate()?;
        let mut client_params = CertificateParams::new(vec!["plantgate-client".to_string()])?;
        client_params
            .distinguished_name
            .push(DnType::CommonName, "plantgate-client");
        client_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let client_cert = client_params.signed_by(&client_key, &ca_cert, &ca_key)?;

        let p = |name: &str| dir.path().join(name);
        let pki = TestPki {
            ca_file: p("ca.pem"),
            server_cert_file: p("server.pem"),
            server_key_file: p("server.key"),
            client_cert_file: p("client.pem"),
            client_key_file: p("client.key"),
            _dir: dir,
        };
        write(&pki.ca_file, &ca_cert.pem())?;
        write(&pki.server_cert_file, &server_cert.pem())?;
        write(&pki.server_key_file, &server_key.serialize_pem())?;
        write(&pki.client_cert_file, &client_cert.pem())?;
        write(&pki.client_key_file, &client_key.serialize_pem())?;
        Ok(pki)
    }
}

/// A free loopback port. rumqttd cannot report the port it bound, so we pick
/// one first; the tiny race with other processes is acceptable for tests.
pub fn free_port() -> Result<u16, BrokerError> {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(BrokerError::Port)?;
    l.local_addr().map(|a| a.port()).map_err(BrokerError::Port)
}

/// A running rumqttd. rumqttd has no stop: its threads live as long as the
/// process. Outages are made with [`super::proxy::CutProxy`] in front of it.
pub struct EmbeddedBroker {
    /// TLS listener, MQTT 3.1.1.
    pub v4_addr: SocketAddr,
    /// TLS listener, MQTT 5.
    pub v5_addr: SocketAddr,
    pub pki: TestPki,
}

fn server_settings(name: &str, listen: SocketAddr, pki: &TestPki) -> rumqttd::ServerSettings {
    rumqttd::ServerSettings {
        name: name.to_string(),
        listen,
        tls: Some(rumqttd::TlsConfig::Rustls {
            capath: None,
            certpath: pki.server_cert_file.display().to_string(),
            keypath: pki.server_key_file.display().to_string(),
        }),
        next_connection_delay_ms: 1,
        connections: rumqttd::ConnectionSettings {
            connection_timeout_ms: 60_000,
            max_payload_size: 16 * 1024 * 1024,
            max_inflight_count: 500,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        },
    }
}

impl EmbeddedBroker {
    pub fn start() -> Result<EmbeddedBroker, BrokerError> {
        let pki = TestPki::generate()?;
        let v4_addr = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?));
        let v5_addr = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?));
        let config = rumqttd::Config {
            id: 0,
            router: rumqttd::RouterConfig {
                max_connections: 1000,
                max_outgoing_packet_count: 1000,
                max_segment_size: 64 * 1024 * 1024,
                max_segment_count: 10,
                custom_segment: None,
                initialized_filters: None,
                shared_subscriptions_strategy: Default::default(),
            },
            v4: Some(HashMap::from([(
                "tls".to_string(),
                server_settings("v4-tls", v4_addr, &pki),
            )])),
            v5: Some(HashMap::from([(
                "tls".to_string(),
                server_settings("v5-tls", v5_addr, &pki),
            )])),
            ws: None,
            cluster: None,
            console: None,
            bridge: None,
            prometheus: None,
            metrics: None,
        };
        let mut broker = rumqttd::Broker::new(config);
        std::thread::Builder::new()
            .name("embedded-broker".into())
            .spawn(move || {
                if let Err(e) = broker.start() {
                    tracing::error!(error = %e, "embedded broker stopped");
                }
            })
            .map_err(|e| BrokerError::Start(e.to_string()))?;
        for addr in [v4_addr, v5_addr] {
            wait_listening(addr, Duration::from_secs(10))?;
        }
        Ok(EmbeddedBroker {
            v4_addr,
            v5_addr,
            pki,
        })
    }
}

/// Waits until something accepts TCP connections on `addr`.
pub fn wait_listening(addr: SocketAddr, within: Duration) -> Result<(), BrokerError> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(BrokerError::NotListening(addr))
}
