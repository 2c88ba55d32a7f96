//! A secret value (password) that never prints: Debug, Display and Serialize
//! all show `***`, so it cannot leak through logs, `check` output or `/status`.
//! Plus the two checks around secrets kept elsewhere: URLs that may carry
//! one, and files others may read.

use std::path::Path;

use serde::{Serialize, Serializer};

#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The only way to get at the value: call sites are easy to audit.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

impl std::fmt::Display for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("***")
    }
}

/// `url` fit to show: the user info (`user:password@`) becomes `***@` and
/// everything from a query or fragment on becomes `?***` / `#***`, the two
/// places a URL carries credentials. Everything up to the last `@` counts as
/// user info, so a password holding `/`, `?` or `#` is masked too (at worst
/// more is masked than needed). Anything else stays, so the operator still
/// recognises the URL.
pub fn redact_url(url: &str) -> String {
    let (scheme, rest) = match url.split_once("://") {
        Some((scheme, rest)) => (Some(scheme), rest),
        None => (None, url),
    };
    let mut out = String::with_capacity(url.len());
    if let Some(scheme) = scheme {
        out.push_str(scheme);
        out.push_str("://");
    }
    let rest = match rest.rfind('@') {
        Some(at) => {
            out.push_str("***");
            &rest[at..]
        }
        None => rest,
    };
    match rest.find(['?', '#']) {
        Some(q) => {
            out.push_str(&rest[..=q]);
            out.push_str("***");
        }
        None => out.push_str(rest),
    }
    out
}

/// The permission bits of `path` when group or others have any access to it
/// (ssh's rule for private keys), `None` when only the owner has, or when the
/// mode cannot be read (the read that follows reports that).
#[cfg(unix)]
pub fn exposed_mode(path: &Path) -> Option<u32> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path).ok()?.permissions().mode() & 0o7777;
    (mode & 0o077 != 0).then_some(mode)
}

#[cfg(not(unix))]
pub fn exposed_mode(_path: &Path) -> Option<u32> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_lose_user_info_and_query() {
        let cases = [
            (
                "opc.tcp://user:pw@10.1.2.3:4840",
                "opc.tcp://***@10.1.2.3:4840",
            ),
            (
                "opc.tcp://user:p@ss@host/UA/Server",
                "opc.tcp://***@host/UA/Server",
            ),
            (
                "mqtts://broker:8883/?password=pw",
                "mqtts://broker:8883/?***",
            ),
            ("mqtts://broker:8883?pw=x#frag", "mqtts://broker:8883?***"),
            ("mqtts://broker#pw", "mqtts://broker#***"),
            ("user:pw@host:1", "***@host:1"),
            ("opc.tcp://user:p/w@host", "opc.tcp://***@host"),
            ("opc.tcp://user:p?w@host", "opc.tcp://***@host"),
            (
                "opc.tcp://user:p#w@host:4840/x?y",
                "opc.tcp://***@host:4840/x?***",
            ),
            ("opc.tcp://host:4840/path", "opc.tcp://host:4840/path"),
            ("mqtts://[::1]:8883", "mqtts://[::1]:8883"),
            ("", ""),
        ];
        for (url, want) in cases {
            assert_eq!(redact_url(url), want, "{url}");
            assert!(!redact_url(url).contains("pw"), "{url}");
        }
    }

    #[cfg(unix)]
    #[test]
    fn exposed_mode_follows_ssh() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("key");
        std::fs::write(&f, "x").unwrap();
        for (mode, exposed) in [
            (0o600, false),
            (0o400, false),
            (0o640, true),
            (0o604, true),
            (0o620, true),
        ] {
            std::fs::set_permissions(&f, std::fs::Permissions::from_mode(mode)).unwrap();
            assert_eq!(exposed_mode(&f), exposed.then_some(mode), "{mode:o}");
        }
        assert_eq!(exposed_mode(&dir.path().join("missing")), None);
    }

    #[test]
    fn never_prints_the_value() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s}"), "***");
        assert_eq!(format!("{s:?}"), "***");
        assert_eq!(serde_json::to_string(&s).unwrap(), "\"***\"");
        assert!(!format!("{:?}", Some(&s)).contains("hunter2"));
        assert_eq!(s.expose(), "hunter2");
    }
}
