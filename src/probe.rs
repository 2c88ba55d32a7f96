//! `plantgate check --connect` (SPEC 2, docs/cli.md): one check per line,
//! `ok` with what was found or `FAIL` with the reason and the fix. The
//! checks themselves are made where their parts live (`source::probe` for
//! the OPC UA servers, `uplink::probe` for the broker); this is what they
//! report and how it is printed.

/// One check's outcome.
#[derive(Debug, Clone, PartialEq)]
pub struct Check {
    /// What was checked, e.g. `opcua deltav-line1: server certificate`.
    pub what: String,
    pub ok: bool,
    /// For `ok`, what was found; else the reason and the fix.
    pub detail: String,
}

impl Check {
    pub fn ok(what: impl Into<String>, detail: impl Into<String>) -> Check {
        Check {
            what: what.into(),
            ok: true,
            detail: detail.into(),
        }
    }

    pub fn fail(what: impl Into<String>, detail: impl Into<String>) -> Check {
        Check {
            what: what.into(),
            ok: false,
            detail: detail.into(),
        }
    }

    /// `ok    what: detail` or `FAIL  what: detail`.
    pub fn line(&self) -> String {
        let mark = if self.ok { "ok  " } else { "FAIL" };
        format!("{mark}  {}: {}", self.what, self.detail)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_says_ok_or_fail_first() {
        assert_eq!(
            Check::ok("mqtt: TLS handshake", "broker.example:8883").line(),
            "ok    mqtt: TLS handshake: broker.example:8883"
        );
        assert_eq!(
            Check::fail("opcua a: identity", "BadUserAccessDenied").line(),
            "FAIL  opcua a: identity: BadUserAccessDenied"
        );
    }
}
