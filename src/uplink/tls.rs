//! rustls client configuration for the uplink: certificate verification is
//! always on (CA file or the system roots), optional client certificate for
//! mutual TLS. Built with the `ring` provider explicitly (CRATES.md pitfall 9).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("mqtt.ca_file {path}: {message}")]
    CaFile { path: PathBuf, message: String },
    #[error("no system root certificates could be loaded ({0}); set mqtt.ca_file")]
    SystemRoots(String),
    #[error("mqtt.client_cert_file {path}: {message}")]
    ClientCert { path: PathBuf, message: String },
    #[error("mqtt.client_key_file {path}: {message}")]
    ClientKey { path: PathBuf, message: String },
    #[error("TLS setup: {0}")]
    Rustls(#[from] rustls::Error),
}

/// A fingerprint of what the files behind `[mqtt]`'s TLS settings hold
/// (CA, client certificate, key): a reload compares it with the last one
/// to tell a certificate renewed under the same path (docs/cli.md). An
/// unreadable file counts as its error, so it differs from any content.
pub fn files_fingerprint(mqtt: &crate::config::MqttConfig) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::hash::DefaultHasher::new();
    mqtt.tls.hash(&mut h);
    for path in [&mqtt.ca_file, &mqtt.client_cert_file, &mqtt.client_key_file] {
        match path.as_deref().map(std::fs::read) {
            None => 0u8.hash(&mut h),
            Some(Ok(bytes)) => (1u8, bytes).hash(&mut h),
            Some(Err(e)) => (2u8, e.kind().to_string()).hash(&mut h),
        }
    }
    h.finish()
}

pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| e.to_string())?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    if certs.is_empty() {
        return Err("no PEM certificate found".into());
    }
    Ok(certs)
}

pub fn client_config(
    ca_file: Option<&Path>,
    client_cert_file: Option<&Path>,
    client_key_file: Option<&Path>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let mut roots = RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let certs = load_certs(path).map_err(|message| TlsError::CaFile {
                path: path.into(),
                message,
            })?;
            for c in certs {
                roots.add(c).map_err(|e| TlsError::CaFile {
                    path: path.into(),
                    message: e.to_string(),
                })?;
            }
        }
        None => {
            let native = rustls_native_certs::load_native_certs();
            for c in native.certs {
                // Individual unparsable system certs are skipped, as browsers do.
                let _ = roots.add(c);
            }
            if roots.is_empty() {
                let why = native
                    .errors
                    .first()
                    .map(|e| e.to_string())
                    .unwrap_or_else(|| "none found".into());
                return Err(TlsError::SystemRoots(why));
            }
        }
    }
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    let config = match (client_cert_file, client_key_file) {
        (Some(cert), Some(key)) => {
            let chain = load_certs(cert).map_err(|message| TlsError::ClientCert {
                path: cert.into(),
                message,
            })?;
            let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::ClientKey {
                path: key.into(),
                message: e.to_string(),
            })?;
            builder.with_client_auth_cert(chain, key_der)?
        }
        _ => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A certificate renewed under the same path changes the fingerprint;
    /// reading it again unchanged does not.
    #[test]
    fn the_fingerprint_follows_the_files_contents() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, "first").expect("write");
        let toml = format!(
            "[agent]\nid = \"gw\"\nsite = \"s\"\n[mqtt]\nurl = \"mqtts://broker\"\nca_file = {ca:?}\n"
        );
        let config = crate::config::load_from(&toml, &Default::default())
            .expect("config")
            .config;
        let before = files_fingerprint(&config.mqtt);
        assert_eq!(files_fingerprint(&config.mqtt), before);
        std::fs::write(&ca, "renewed").expect("write");
        assert_ne!(files_fingerprint(&config.mqtt), before);
        std::fs::remove_file(&ca).expect("remove");
        assert_ne!(files_fingerprint(&config.mqtt), before);
    }
}
