//! The independent OPC UA server for interop tests: python `asyncua`
//! running tests/asyncua_server.py (`PYTHON` selects the interpreter).

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};

const WAIT: Duration = Duration::from_secs(60);

/// The python server; killed when dropped (stdin closing stops it too).
pub struct PyServer {
    child: tokio::process::Child,
    pub endpoint: String,
    pub port: u16,
    pub pki_dir: tempfile::TempDir,
}

impl PyServer {
    pub async fn start(port: u16, extra: &[&str]) -> PyServer {
        let pki = tempfile::tempdir().expect("temp dir");
        let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/asyncua_server.py");
        let mut child = tokio::process::Command::new(python)
            .arg(script)
            .arg("--pki")
            .arg(pki.path())
            .arg("--port")
            .arg(port.to_string())
            .args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("python3 starts (is asyncua installed? pip install asyncua)");
        let stdout = child.stdout.take().expect("stdout piped");
        let mut lines = BufReader::new(stdout).lines();
        let ready = tokio::time::timeout(WAIT, async {
            while let Some(line) = lines.next_line().await.expect("read server stdout") {
                if let Some(rest) = line.strip_prefix("READY ") {
                    return rest.to_string();
                }
            }
            panic!("asyncua server exited before READY");
        })
        .await
        .expect("asyncua server ready in time");
        let endpoint = ready
            .split_whitespace()
            .next()
            .expect("endpoint")
            .to_string();
        let port = endpoint
            .trim_end_matches('/')
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("port in endpoint");
        PyServer {
            child,
            endpoint,
            port,
            pki_dir: pki,
        }
    }

    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
    }

    /// The thumbprint of the server's certificate, as the agent reports it.
    pub fn thumbprint(&self) -> String {
        let der = std::fs::read(self.pki_dir.path().join("server_cert.der")).expect("server cert");
        opcua::crypto::X509::from_der(&der)
            .expect("DER certificate")
            .thumbprint()
            .as_hex_string()
    }
}
