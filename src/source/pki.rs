//! The agent's own OPC UA application instance certificate (docs/configuration.md).
//!
//! Layout under the PKI directory (`{data_dir}/pki`):
//! - `own/cert.der`: the application certificate (DER), `own/private.pem`:
//!   its RSA key (PKCS#8 PEM, mode 0600). Created on first start when both
//!   are missing: RSA 2048, self-signed, valid [`VALIDITY_DAYS`] days, subject
//!   alternative names = the application URI + this host's DNS names.
//! - `trusted/`: server certificates the agent accepts; `rejected/`: unknown
//!   server certificates, saved there by the client library (move one to
//!   `trusted/` to accept it; it is picked up on the next connection attempt).
//! - `pinned/`: with `trust_unknown_server_cert = true`, one small JSON file
//!   per endpoint naming the certificate trusted on first use there
//!   ([`check_pin`]). Only the first certificate an endpoint presents is
//!   trusted without an operator: a different one later is saved to
//!   `rejected/` and refused, until an operator moves it to `trusted/` (the
//!   pin then follows it) or deletes the pin file (the next certificate is
//!   trusted on first use again). Switching the flag off leaves `trusted/`
//!   as it is: what was trusted stays trusted, nothing new is.
//!
//! Application URI: `urn:plantgate:{name}` where `name` is the agent id when
//! the agent prepares the PKI itself ([`ensure_own_certificate`] with
//! `Some(agent_id)`), else the host name. Whatever is in an existing
//! certificate wins: the URI the client announces is always read back from
//! the certificate's SAN, so an operator-supplied (e.g. CA-signed)
//! certificate works as is and servers never see a URI mismatch
//! (`BadCertificateUriInvalid`).
//!
//! The certificate is never renewed automatically: servers trust exactly this
//! certificate, and a silently new one would lock the agent out of every
//! plant server at once. Instead a `system.error` event warns
//! [`EXPIRY_WARNING_DAYS`] days ahead (at start and daily); to renew, delete
//! `own/cert.der` and `own/private.pem`, restart, and trust the new
//! certificate on the servers.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use opcua::crypto::{CertificateStore, X509Data};

/// Own certificate, relative to the PKI directory (how async-opcua wants it).
pub const OWN_CERT: &str = "own/cert.der";
/// Own private key, relative to the PKI directory.
pub const OWN_KEY: &str = "own/private.pem";
/// Where async-opcua's default layout (and plantgate before 0.1) kept the key;
/// moved to [`OWN_KEY`] on start so an already trusted certificate stays valid.
const LEGACY_KEY: &str = "private/private.pem";
/// Validity of a created certificate: ten years. Plant servers trust a client
/// certificate by hand; rotating it often costs more than it protects.
/// (async-opcua takes days as u32 and writes UTCTime, fine until 2049.)
pub const VALIDITY_DAYS: u32 = 3650;
/// A `system.error` event is emitted when the certificate expires within this.
pub const EXPIRY_WARNING_DAYS: i64 = 30;
/// Between two expiry warnings for the same certificate (all connections of
/// the process share it; only one of them speaks per day).
const EXPIRY_WARNING_EVERY: Duration = Duration::from_secs(23 * 3600);
/// Key size: accepted by every policy of docs/configuration.md (2048..4096 bits).
const KEY_BITS: u32 = 2048;

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create the OPC UA application certificate in {path}: {reason}")]
    Create { path: PathBuf, reason: String },
    #[error("cannot read the OPC UA application certificate or key {path}: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error("{path} has no URI subject alternative name (the OPC UA application URI)")]
    NoUri { path: PathBuf },
    #[error("server certificate pin {path} is unusable ({reason}); delete it to trust the endpoint's next certificate on first use")]
    Pin { path: PathBuf, reason: String },
    #[error("the server certificate of {endpoint} cannot be read: {reason}")]
    ServerCertificate { endpoint: String, reason: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |source| PkiError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The certificate in use, as read back from disk.
#[derive(Clone, Debug)]
pub struct OwnCertificate {
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
    /// First URI SAN of the certificate: the client's application URI.
    pub application_uri: String,
    pub not_after: DateTime<Utc>,
}

/// Serialises creation: all connections start together and share the PKI.
static PKI_LOCK: Mutex<()> = Mutex::new(());

/// `urn:plantgate:{name}`, with characters outside `[A-Za-z0-9._-]` replaced.
pub fn application_uri(name: &str) -> String {
    let clean: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '-'
            }
        })
        .collect();
    let clean = if clean.is_empty() {
        "localhost".to_string()
    } else {
        clean
    };
    format!("urn:plantgate:{clean}")
}

fn host_name() -> String {
    X509Data::computer_hostnames()
        .into_iter()
        .next()
        .unwrap_or_else(|| "localhost".to_string())
}

/// Makes sure the own certificate and key exist (creating them on first
/// start, see the module doc) and returns what is in use. Blocking: RSA key
/// generation takes a moment; call it from `spawn_blocking` in async code.
pub fn ensure_own_certificate(
    pki_dir: &Path,
    name: Option<&str>,
) -> Result<OwnCertificate, PkiError> {
    let _guard = PKI_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let cert_path = pki_dir.join(OWN_CERT);
    let key_path = pki_dir.join(OWN_KEY);
    let own_dir = pki_dir.join("own");
    if !own_dir.exists() {
        private_dir(&own_dir)?;
    }
    for sub in ["trusted", "rejected"] {
        let dir = pki_dir.join(sub);
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    }

    let legacy_key = pki_dir.join(LEGACY_KEY);
    if cert_path.exists() && !key_path.exists() && legacy_key.exists() {
        std::fs::rename(&legacy_key, &key_path).map_err(io(&key_path))?;
        tracing::info!(from = %legacy_key.display(), to = %key_path.display(), "moved the OPC UA private key");
    }

    match (cert_path.exists(), key_path.exists()) {
        (true, true) => {}
        (false, false) => {
            let name = name.map(str::to_string).unwrap_or_else(host_name);
            create(pki_dir, &application_uri(&name), VALIDITY_DAYS, None)?;
        }
        // Half a PKI needs an operator: regenerating would replace an
        // identity the servers may already trust.
        (true, false) => {
            return Err(PkiError::Read {
                path: key_path,
                reason: "the private key is missing (the certificate exists)".into(),
            })
        }
        (false, true) => {
            return Err(PkiError::Read {
                path: cert_path,
                reason: "the certificate is missing (the private key exists)".into(),
            })
        }
    }
    restrict_key(&key_path)?;
    CertificateStore::read_pkey(&key_path).map_err(|reason| PkiError::Read {
        path: key_path.clone(),
        reason,
    })?;
    read_own(pki_dir)
}

/// Reads the own certificate (no creation).
pub fn read_own(pki_dir: &Path) -> Result<OwnCertificate, PkiError> {
    let cert_path = pki_dir.join(OWN_CERT);
    let cert = CertificateStore::read_cert(&cert_path).map_err(|reason| PkiError::Read {
        path: cert_path.clone(),
        reason,
    })?;
    let der = cert.to_der().map_err(|e| PkiError::Read {
        path: cert_path.clone(),
        reason: e.to_string(),
    })?;
    let application_uri = san_uri(&der).ok_or_else(|| PkiError::NoUri {
        path: cert_path.clone(),
    })?;
    let not_after = cert.not_after().map_err(|e| PkiError::Read {
        path: cert_path.clone(),
        reason: format!("no validity end: {e}"),
    })?;
    Ok(OwnCertificate {
        key_path: pki_dir.join(OWN_KEY),
        cert_path,
        application_uri,
        not_after,
    })
}

/// Creates a certificate and key in a private temporary directory and moves
/// them into `own/`: the key is never readable by others, and a crash
/// mid-way never leaves a certificate without its key. `key` reuses an
/// existing key (tests make short-lived certificates that way).
pub(crate) fn create(
    pki_dir: &Path,
    uri: &str,
    days: u32,
    key: Option<&opcua::crypto::PrivateKey>,
) -> Result<(), PkiError> {
    let own_dir = pki_dir.join("own");
    let failed = |reason: String| PkiError::Create {
        path: own_dir.clone(),
        reason,
    };
    // The application URI first (OPC UA wants it there), then DNS names.
    let alt_host_names = X509Data::alt_host_names(uri, None, true, true, false);
    let data = X509Data {
        key_size: KEY_BITS,
        common_name: format!("plantgate@{}", host_name()),
        organization: "plantgate".into(),
        organizational_unit: String::new(),
        country: String::new(),
        state: String::new(),
        alt_host_names,
        certificate_duration_days: days,
    };
    // tempfile creates the directory with mode 0700.
    let tmp = tempfile::Builder::new()
        .prefix(".new-")
        .tempdir_in(&own_dir)
        .map_err(io(&own_dir))?;
    let (tmp_cert, tmp_key) = (tmp.path().join("cert.der"), tmp.path().join("private.pem"));
    match key {
        None => {
            CertificateStore::create_certificate_and_key(&data, true, &tmp_cert, &tmp_key)
                .map_err(failed)?;
        }
        Some(key) => {
            let cert = opcua::crypto::X509::from_pkey(key, &data).map_err(failed)?;
            let der = cert.to_der().map_err(|e| failed(e.to_string()))?;
            std::fs::write(&tmp_cert, der).map_err(io(&tmp_cert))?;
            std::fs::copy(pki_dir.join(OWN_KEY), &tmp_key).map_err(io(&tmp_key))?;
        }
    }
    // Ours, just made: private without a word (the library writes it with
    // the default mode).
    set_private(&tmp_key)?;
    // Key first: a certificate present implies its key is there.
    let key_path = pki_dir.join(OWN_KEY);
    let cert_path = pki_dir.join(OWN_CERT);
    std::fs::rename(&tmp_key, &key_path).map_err(io(&key_path))?;
    std::fs::rename(&tmp_cert, &cert_path).map_err(io(&cert_path))?;
    tracing::info!(certificate = %cert_path.display(), application_uri = uri, days, "created the OPC UA application certificate");
    Ok(())
}

#[cfg(unix)]
fn private_dir(dir: &Path) -> Result<(), PkiError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io(dir))
}

#[cfg(not(unix))]
fn private_dir(dir: &Path) -> Result<(), PkiError> {
    std::fs::create_dir_all(dir).map_err(io(dir))
}

/// Mode 0600 on the key (repairs a key copied in with looser permissions).
#[cfg(unix)]
fn restrict_key(path: &Path) -> Result<(), PkiError> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path)
        .map_err(io(path))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        set_private(path)?;
        tracing::warn!(key = %path.display(), "OPC UA private key was readable by others; set to 0600");
    }
    Ok(())
}

#[cfg(unix)]
fn set_private(path: &Path) -> Result<(), PkiError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io(path))
}

#[cfg(not(unix))]
fn set_private(_path: &Path) -> Result<(), PkiError> {
    Ok(())
}

#[cfg(not(unix))]
fn restrict_key(_path: &Path) -> Result<(), PkiError> {
    Ok(())
}

/// The details of the `system.error` event when `own` expires within
/// [`EXPIRY_WARNING_DAYS`] of `now` (or has expired), else None.
pub fn expiry_warning(own: &OwnCertificate, now: DateTime<Utc>) -> Option<serde_json::Value> {
    let left = own.not_after - now;
    if left > chrono::Duration::days(EXPIRY_WARNING_DAYS) {
        return None;
    }
    let days_left = left.num_days();
    let not_after = crate::record::format_ts(own.not_after.timestamp_millis());
    let message = if left <= chrono::Duration::zero() {
        format!("the OPC UA application certificate {} expired at {not_after}: secured connections will fail; delete own/cert.der and own/private.pem, restart and trust the new certificate on the servers", own.cert_path.display())
    } else {
        format!("the OPC UA application certificate {} expires at {not_after} (in {days_left} days): renew it and trust the new one on the servers before then", own.cert_path.display())
    };
    Some(serde_json::json!({
        "error": "opcua_certificate_expiring",
        "certificate": own.cert_path.display().to_string(),
        "application_uri": own.application_uri,
        "not_after": not_after,
        "days_left": days_left,
        "message": message,
    }))
}

/// Whether this caller should emit today's expiry warning for `cert`: true
/// for the first caller in [`EXPIRY_WARNING_EVERY`] (process-wide).
pub(crate) fn claim_expiry_warning(cert: &Path) -> bool {
    static LAST: Mutex<Option<HashMap<PathBuf, Instant>>> = Mutex::new(None);
    let mut last = LAST.lock().unwrap_or_else(|e| e.into_inner());
    let map = last.get_or_insert_with(HashMap::new);
    match map.get(cert) {
        Some(t) if t.elapsed() < EXPIRY_WARNING_EVERY => false,
        _ => {
            map.insert(cert.to_path_buf(), Instant::now());
            true
        }
    }
}

/// Where the trust-on-first-use pins live, relative to the PKI directory.
pub const PINNED_DIR: &str = "pinned";

/// What [`check_pin`] found for the certificate an endpoint presents.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PinCheck {
    /// No pin yet: the certificate was saved to `trusted/` and pinned.
    FirstUse {
        thumbprint: String,
        trusted_file: PathBuf,
        pin_file: PathBuf,
    },
    /// The certificate is the pinned one (whether it is still in `trusted/`
    /// is the client library's check: an operator may have revoked it).
    Matches,
    /// Another certificate than the pinned one, which an operator put into
    /// `trusted/`: the pin now names it.
    Repinned {
        previous: String,
        thumbprint: String,
    },
    /// Another certificate than the pinned one, not trusted: saved to
    /// `rejected/` (an impostor, or a renewal nobody confirmed yet).
    /// `rejected_file` is None when the certificate is in `trusted/` for
    /// another endpoint that pinned it: a copy in `rejected/` would make the
    /// library refuse it there too.
    Changed {
        pinned: String,
        presented: String,
        rejected_file: Option<PathBuf>,
        pin_file: PathBuf,
    },
}

/// The content of a pin file.
#[derive(serde::Serialize, serde::Deserialize)]
struct Pin {
    /// As configured, for the operator reading the file.
    endpoint: String,
    /// SHA-1 thumbprint, hex as in the certificate's file name.
    thumbprint: String,
    /// The certificate's file name in `trusted/`.
    certificate: String,
    pinned_at: String,
}

/// Trust on first use for `endpoint` (`trust_unknown_server_cert = true`):
/// see [`PinCheck`] and the module doc. Blocking (small files).
pub fn check_pin(
    pki_dir: &Path,
    endpoint: &str,
    cert: &opcua::crypto::X509,
) -> Result<PinCheck, PkiError> {
    let _guard = PKI_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    // As in the library's file names (`CN=... [thumbprint].der`).
    let thumbprint = cert.thumbprint().as_hex_string();
    let file_name = CertificateStore::cert_file_name(cert);
    let trusted = pki_dir.join("trusted").join(&file_name);
    let rejected = pki_dir.join("rejected").join(&file_name);
    let pin_dir = pki_dir.join(PINNED_DIR);
    let pin_file = pin_dir.join(pin_file_name(endpoint));
    let der = cert.to_der().map_err(|e| PkiError::ServerCertificate {
        endpoint: endpoint.to_string(),
        reason: e.to_string(),
    })?;
    let pin = Pin {
        endpoint: endpoint.to_string(),
        thumbprint: thumbprint.clone(),
        certificate: file_name,
        pinned_at: crate::record::format_ts(crate::record::now_ms()),
    };
    let pinned = match std::fs::read(&pin_file) {
        Ok(bytes) => serde_json::from_slice::<Pin>(&bytes).map_err(|e| PkiError::Pin {
            path: pin_file.clone(),
            reason: e.to_string(),
        })?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if !trusted.exists() {
                write_atomically(&trusted, &der)?;
            }
            // A copy left in rejected/ by an earlier strict run would make
            // the library refuse the certificate just trusted.
            if rejected.exists() {
                std::fs::remove_file(&rejected).map_err(io(&rejected))?;
            }
            std::fs::create_dir_all(&pin_dir).map_err(io(&pin_dir))?;
            write_pin(&pin_file, &pin)?;
            return Ok(PinCheck::FirstUse {
                thumbprint,
                trusted_file: trusted,
                pin_file,
            });
        }
        Err(e) => return Err(io(&pin_file)(e)),
    };
    if pinned.thumbprint.eq_ignore_ascii_case(&thumbprint) {
        return Ok(PinCheck::Matches);
    }
    // In trusted/ because an operator put it there, not because another
    // endpoint trusted it on first use (that would let an impostor pinned
    // elsewhere in).
    if trusted.exists() && !pinned_elsewhere(&pin_dir, &pin_file, &thumbprint) {
        write_pin(&pin_file, &pin)?;
        return Ok(PinCheck::Repinned {
            previous: pinned.thumbprint,
            thumbprint,
        });
    }
    let rejected_file = if trusted.exists() {
        None
    } else {
        write_atomically(&rejected, &der)?;
        Some(rejected)
    };
    Ok(PinCheck::Changed {
        pinned: pinned.thumbprint,
        presented: thumbprint,
        rejected_file,
        pin_file,
    })
}

/// Whether a pin file other than `own` names `thumbprint`. Unreadable pins
/// count as naming it (fail closed).
fn pinned_elsewhere(pin_dir: &Path, own: &Path, thumbprint: &str) -> bool {
    let Ok(entries) = std::fs::read_dir(pin_dir) else {
        return false;
    };
    entries.flatten().any(|e| {
        let path = e.path();
        path != own
            && std::fs::read(&path)
                .ok()
                .and_then(|b| serde_json::from_slice::<Pin>(&b).ok())
                .map_or(true, |p| p.thumbprint.eq_ignore_ascii_case(thumbprint))
    })
}

fn write_pin(path: &Path, pin: &Pin) -> Result<(), PkiError> {
    let text = serde_json::to_vec_pretty(pin).map_err(|e| PkiError::Pin {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    write_atomically(path, &text)
}

/// Temporary file and rename: a crash never leaves half a certificate or pin.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), PkiError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(io(dir))?;
    std::io::Write::write_all(&mut tmp, bytes).map_err(io(path))?;
    tmp.persist(path).map_err(|e| io(path)(e.error))?;
    Ok(())
}

/// `opc.tcp___10.1.2.3_4840-<hash>.json`: readable, one per endpoint. The
/// endpoint is compared without case and trailing `/` (the same server);
/// the hash keeps endpoints apart that differ only in replaced characters.
fn pin_file_name(endpoint: &str) -> String {
    let key = endpoint.trim().trim_end_matches('/').to_ascii_lowercase();
    let readable: String = key
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-') {
                c
            } else {
                '_'
            }
        })
        .take(100)
        .collect();
    // FNV-1a: stable across builds and platforms (unlike std's hasher).
    let hash = key.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    format!("{readable}-{:08x}.json", hash as u32)
}

/// One DER TLV: (tag, content, rest). Single-byte tags only (all that an
/// X.509 certificate's path to the SAN uses).
fn tlv(buf: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = buf.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (first as usize, rest)
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | *b as usize);
        (len, &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

/// The first URI of the certificate's subjectAltName extension: the OPC UA
/// application URI (OPC 10000-6 6.2.2). async-opcua does not expose it.
fn san_uri(der: &[u8]) -> Option<String> {
    const SEQUENCE: u8 = 0x30;
    const EXTENSIONS: u8 = 0xa3; // [3] EXPLICIT in TBSCertificate
    const OID: u8 = 0x06;
    const BOOLEAN: u8 = 0x01;
    const OCTET_STRING: u8 = 0x04;
    const URI: u8 = 0x86; // GeneralName uniformResourceIdentifier [6] IA5String
    const SAN: &[u8] = &[0x55, 0x1d, 0x11]; // 2.5.29.17

    let (SEQUENCE, cert, _) = tlv(der)? else {
        return None;
    };
    let (SEQUENCE, mut tbs, _) = tlv(cert)? else {
        return None;
    };
    while let Some((tag, content, rest)) = tlv(tbs) {
        tbs = rest;
        if tag != EXTENSIONS {
            continue;
        }
        let (SEQUENCE, mut exts, _) = tlv(content)? else {
            return None;
        };
        while let Some((SEQUENCE, ext, rest)) = tlv(exts) {
            exts = rest;
            let (OID, oid, mut ext) = tlv(ext)? else {
                continue;
            };
            if oid != SAN {
                continue;
            }
            if let Some((BOOLEAN, _, rest)) = tlv(ext) {
                ext = rest;
            }
            let (OCTET_STRING, value, _) = tlv(ext)? else {
                return None;
            };
            let (SEQUENCE, mut names, _) = tlv(value)? else {
                return None;
            };
            while let Some((tag, name, rest)) = tlv(names) {
                names = rest;
                if tag == URI {
                    return String::from_utf8(name.to_vec()).ok();
                }
            }
            return None;
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uri_from_name() {
        assert_eq!(application_uri("plant1-gw1"), "urn:plantgate:plant1-gw1");
        assert_eq!(application_uri("gw 1/x"), "urn:plantgate:gw-1-x");
        assert_eq!(application_uri(""), "urn:plantgate:localhost");
    }

    #[test]
    fn der_walker_rejects_garbage() {
        assert_eq!(san_uri(&[]), None);
        assert_eq!(san_uri(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]), None);
        assert_eq!(san_uri(&[0x30, 0x03, 0x30, 0x01, 0x00]), None);
        assert!(tlv(&[0x04, 0x81, 0x02, 1, 2]).is_some());
    }

    #[test]
    fn expiry_warning_window() {
        let now = Utc::now();
        let mut own = OwnCertificate {
            cert_path: "/x/own/cert.der".into(),
            key_path: "/x/own/private.pem".into(),
            application_uri: "urn:plantgate:t".into(),
            not_after: now + chrono::Duration::days(365),
        };
        assert!(expiry_warning(&own, now).is_none());
        own.not_after = now + chrono::Duration::days(10) + chrono::Duration::hours(1);
        let w = expiry_warning(&own, now).expect("warning");
        assert_eq!(w["days_left"], 10);
        own.not_after = now - chrono::Duration::days(1);
        let w = expiry_warning(&own, now).expect("warning");
        assert!(w["message"].as_str().unwrap().contains("expired"));
    }

    /// Two different certificates (one key, two subjects: key generation is
    /// the slow part).
    fn two_certificates() -> (opcua::crypto::X509, opcua::crypto::X509) {
        let key = opcua::crypto::PrivateKey::new(KEY_BITS).expect("RSA key");
        let cert = |name: &str| {
            let data = X509Data {
                key_size: KEY_BITS,
                common_name: name.into(),
                organization: "plantgate tests".into(),
                organizational_unit: String::new(),
                country: String::new(),
                state: String::new(),
                alt_host_names: X509Data::alt_host_names(
                    "urn:test:server",
                    None,
                    false,
                    true,
                    false,
                ),
                certificate_duration_days: 30,
            };
            opcua::crypto::X509::from_pkey(&key, &data).expect("certificate")
        };
        (cert("server A"), cert("server B"))
    }

    #[test]
    fn pin_trusts_the_first_certificate_only() {
        let dir = tempfile::tempdir().unwrap();
        let pki = dir.path();
        for sub in ["trusted", "rejected"] {
            std::fs::create_dir_all(pki.join(sub)).unwrap();
        }
        let (a, b) = two_certificates();
        let thumb = |c: &opcua::crypto::X509| c.thumbprint().as_hex_string();
        let count = |sub: &str| std::fs::read_dir(pki.join(sub)).unwrap().count();
        let endpoint = "opc.tcp://10.1.2.3:4840/";

        // A copy in rejected/ from an earlier strict run does not block it.
        std::fs::write(
            pki.join("rejected")
                .join(CertificateStore::cert_file_name(&a)),
            a.to_der().unwrap(),
        )
        .unwrap();
        let first = check_pin(pki, endpoint, &a).unwrap();
        let PinCheck::FirstUse {
            thumbprint,
            trusted_file,
            pin_file,
        } = first
        else {
            panic!("{first:?}");
        };
        assert_eq!(thumbprint, thumb(&a));
        assert_eq!(std::fs::read(&trusted_file).unwrap(), a.to_der().unwrap());
        assert_eq!((count("trusted"), count("rejected")), (1, 0));
        let pin: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&pin_file).unwrap()).unwrap();
        assert_eq!(pin["thumbprint"], thumb(&a).as_str());
        assert_eq!(pin["endpoint"], endpoint);

        // The same endpoint (without the trailing slash, other case): pinned.
        assert_eq!(
            check_pin(pki, "OPC.TCP://10.1.2.3:4840", &a).unwrap(),
            PinCheck::Matches
        );

        // Another certificate: refused, saved to rejected/, nothing trusted.
        let changed = check_pin(pki, endpoint, &b).unwrap();
        let PinCheck::Changed {
            pinned,
            presented,
            rejected_file,
            ..
        } = changed
        else {
            panic!("{changed:?}");
        };
        assert_eq!((pinned, presented), (thumb(&a), thumb(&b)));
        let rejected_file = rejected_file.expect("saved to rejected/");
        assert_eq!(std::fs::read(&rejected_file).unwrap(), b.to_der().unwrap());
        assert_eq!((count("trusted"), count("rejected")), (1, 1));
        // Still refused on the next attempt.
        assert!(matches!(
            check_pin(pki, endpoint, &b).unwrap(),
            PinCheck::Changed { .. }
        ));

        // The operator moves B to trusted/: the pin follows it.
        let b_name = CertificateStore::cert_file_name(&b);
        std::fs::rename(&rejected_file, pki.join("trusted").join(&b_name)).unwrap();
        assert_eq!(
            check_pin(pki, endpoint, &b).unwrap(),
            PinCheck::Repinned {
                previous: thumb(&a),
                thumbprint: thumb(&b)
            }
        );
        assert_eq!(check_pin(pki, endpoint, &b).unwrap(), PinCheck::Matches);
        assert!(matches!(
            check_pin(pki, endpoint, &a).unwrap(),
            PinCheck::Repinned { .. }
        ));

        // A damaged pin fails closed, naming the file.
        std::fs::write(&pin_file, b"{not json").unwrap();
        let err = check_pin(pki, endpoint, &a).unwrap_err();
        assert!(
            err.to_string().contains(&pin_file.display().to_string()),
            "{err}"
        );

        // Each endpoint has its own pin. A certificate trusted on first use
        // at another endpoint is no operator's decision for this one: still
        // refused, and not copied to rejected/ (the library would then
        // refuse it at the other endpoint too).
        let fresh = tempfile::tempdir().unwrap();
        let pki = fresh.path();
        for sub in ["trusted", "rejected"] {
            std::fs::create_dir_all(pki.join(sub)).unwrap();
        }
        let count = |sub: &str| std::fs::read_dir(pki.join(sub)).unwrap().count();
        let other = "opc.tcp://10.1.2.4:4840/";
        assert!(matches!(
            check_pin(pki, endpoint, &a).unwrap(),
            PinCheck::FirstUse { .. }
        ));
        assert!(matches!(
            check_pin(pki, other, &b).unwrap(),
            PinCheck::FirstUse { .. }
        ));
        assert!(matches!(
            check_pin(pki, endpoint, &b).unwrap(),
            PinCheck::Changed {
                rejected_file: None,
                ..
            }
        ));
        assert_eq!((count("trusted"), count("rejected")), (2, 0));
        assert_eq!(check_pin(pki, other, &b).unwrap(), PinCheck::Matches);
    }

    #[test]
    fn pin_file_names_are_stable_and_readable() {
        let name = pin_file_name("opc.tcp://10.1.2.3:4840/");
        assert_eq!(name, pin_file_name("opc.tcp://10.1.2.3:4840"));
        assert!(name.starts_with("opc.tcp___10.1.2.3_4840-"), "{name}");
        assert!(name.ends_with(".json"));
        // Endpoints that differ only in replaced characters stay apart.
        assert_ne!(
            pin_file_name("opc.tcp://a:1/x"),
            pin_file_name("opc.tcp://a:1_x")
        );
    }

    #[test]
    fn one_warning_per_day_per_certificate() {
        let a = Path::new("/claim/a/own/cert.der");
        let b = Path::new("/claim/b/own/cert.der");
        assert!(claim_expiry_warning(a));
        assert!(!claim_expiry_warning(a));
        assert!(claim_expiry_warning(b));
    }
}
