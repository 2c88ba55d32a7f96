//! `node_template` expansion (docs/profiles.md). The config loader has already checked
//! the template (known placeholders only, `{param}` and the subject present,
//! and the result parses as a NodeId), so expansion is plain substitution.
//! The namespace part (`ns=N` or `nsu=URI`) is left as written: the source
//! resolves it against the server's namespace array on every connect.

/// DeltaV default (docs/profiles.md).
pub const DELTAV_DEFAULT: &str = "ns=2;s={unit}/{param}.CV";
/// OptoMES default (docs/profiles.md).
pub const OPTOMES_DEFAULT: &str = "ns=2;s={work_center}.{param}";

/// Substitutes `{placeholder}` (`unit` or `work_center`) by `subject` and
/// `{param}` by `param`.
pub fn expand(template: &str, placeholder: &str, subject: &str, param: &str) -> String {
    // `{param}` first: a subject name cannot contain braces (config checks
    // names against [A-Za-z0-9_-]+), so the order does not matter, but a
    // parameter name must never be re-expanded.
    template
        .replace(&format!("{{{placeholder}}}"), subject)
        .replace("{param}", param)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nodeid::{Identifier, Namespace, NodeRef};

    #[test]
    fn expands_defaults() {
        assert_eq!(
            expand(DELTAV_DEFAULT, "unit", "REACTOR_101", "BATCH_ID"),
            "ns=2;s=REACTOR_101/BATCH_ID.CV"
        );
        assert_eq!(
            expand(
                OPTOMES_DEFAULT,
                "work_center",
                "LINE_A_FILLER",
                "GOOD_COUNT"
            ),
            "ns=2;s=LINE_A_FILLER.GOOD_COUNT"
        );
    }

    #[test]
    fn keeps_nsu_namespace_for_the_source() {
        let node = expand(
            "nsu=urn:plantgate:sim:deltav;s={unit}/{param}.CV",
            "unit",
            "R1",
            "PHASE",
        );
        let parsed = NodeRef::parse(&node).unwrap();
        assert_eq!(
            parsed.namespace,
            Namespace::Uri("urn:plantgate:sim:deltav".into())
        );
        assert_eq!(parsed.identifier, Identifier::String("R1/PHASE.CV".into()));
    }

    #[test]
    fn repeated_placeholders() {
        assert_eq!(
            expand("ns=3;s={unit}.{param}.{unit}", "unit", "U", "P"),
            "ns=3;s=U.P.U"
        );
    }
}
