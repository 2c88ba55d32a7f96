//! Parsing of the NodeId text forms users write in the config (OPC UA Part 6
//! 5.3.1.10): `ns=N;s=..`, `nsu=URI;i=..`, or no namespace part (namespace 0).
//! Pure: resolving a namespace URI to an index needs the server and happens in
//! `source`.

use std::fmt;

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Namespace {
    Index(u16),
    Uri(String),
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Identifier {
    Numeric(u32),
    String(String),
    /// Canonical GUID text, as written.
    Guid(String),
    /// Base64 text, as written.
    Opaque(String),
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct NodeRef {
    pub namespace: Namespace,
    pub identifier: Identifier,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NodeIdError {
    #[error("empty node id")]
    Empty,
    #[error("bad namespace index {0:?} (expected 0..65535)")]
    BadNamespaceIndex(String),
    #[error("empty namespace URI after nsu=")]
    EmptyNamespaceUri,
    #[error("expected an identifier i=, s=, g= or b= after the namespace, found {0:?}")]
    MissingIdentifier(String),
    #[error("bad numeric identifier {0:?}")]
    BadNumeric(String),
    #[error("bad GUID {0:?}")]
    BadGuid(String),
    #[error("empty identifier")]
    EmptyIdentifier,
}

impl NodeRef {
    pub fn parse(text: &str) -> Result<NodeRef, NodeIdError> {
        let text = text.trim();
        if text.is_empty() {
            return Err(NodeIdError::Empty);
        }
        let (namespace, rest) = if let Some(rest) = text.strip_prefix("nsu=") {
            // The URI itself may contain ';' only in theory; the identifier
            // starts after the last ";x=" boundary we recognise.
            let cut = find_identifier_start(rest)
                .ok_or_else(|| NodeIdError::MissingIdentifier(rest.to_string()))?;
            let uri = &rest[..cut];
            if uri.is_empty() {
                return Err(NodeIdError::EmptyNamespaceUri);
            }
            (Namespace::Uri(uri.to_string()), &rest[cut + 1..])
        } else if let Some(rest) = text.strip_prefix("ns=") {
            let (idx, rest) = rest
                .split_once(';')
                .ok_or_else(|| NodeIdError::MissingIdentifier(rest.to_string()))?;
            let idx: u16 = idx
                .parse()
                .map_err(|_| NodeIdError::BadNamespaceIndex(idx.to_string()))?;
            (Namespace::Index(idx), rest)
        } else {
            (Namespace::Index(0), text)
        };
        let identifier = parse_identifier(rest)?;
        Ok(NodeRef {
            namespace,
            identifier,
        })
    }
}

fn find_identifier_start(s: &str) -> Option<usize> {
    ["s=", "i=", "g=", "b="]
        .iter()
        .filter_map(|p| s.find(&format!(";{p}")))
        .min()
}

fn parse_identifier(s: &str) -> Result<Identifier, NodeIdError> {
    let (prefix, value) = s
        .split_once('=')
        .ok_or_else(|| NodeIdError::MissingIdentifier(s.to_string()))?;
    if value.is_empty() {
        return Err(NodeIdError::EmptyIdentifier);
    }
    match prefix {
        "i" => value
            .parse::<u32>()
            .map(Identifier::Numeric)
            .map_err(|_| NodeIdError::BadNumeric(value.to_string())),
        "s" => Ok(Identifier::String(value.to_string())),
        "g" => {
            let ok = value.len() == 36
                && value.chars().enumerate().all(|(i, c)| match i {
                    8 | 13 | 18 | 23 => c == '-',
                    _ => c.is_ascii_hexdigit(),
                });
            if ok {
                Ok(Identifier::Guid(value.to_string()))
            } else {
                Err(NodeIdError::BadGuid(value.to_string()))
            }
        }
        "b" => Ok(Identifier::Opaque(value.to_string())),
        _ => Err(NodeIdError::MissingIdentifier(s.to_string())),
    }
}

impl fmt::Display for NodeRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.namespace {
            Namespace::Index(0) => {}
            Namespace::Index(i) => write!(f, "ns={i};")?,
            Namespace::Uri(u) => write!(f, "nsu={u};")?,
        }
        match &self.identifier {
            Identifier::Numeric(n) => write!(f, "i={n}"),
            Identifier::String(s) => write!(f, "s={s}"),
            Identifier::Guid(g) => write!(f, "g={g}"),
            Identifier::Opaque(b) => write!(f, "b={b}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_index_and_uri_forms() {
        let n = NodeRef::parse("ns=2;s=FIC-101/PV.CV").unwrap();
        assert_eq!(n.namespace, Namespace::Index(2));
        assert_eq!(n.identifier, Identifier::String("FIC-101/PV.CV".into()));

        let n = NodeRef::parse("nsu=urn:example:deltav;s=FIC-101/PV.CV").unwrap();
        assert_eq!(n.namespace, Namespace::Uri("urn:example:deltav".into()));
        assert_eq!(n.identifier, Identifier::String("FIC-101/PV.CV".into()));

        let n = NodeRef::parse("i=2258").unwrap();
        assert_eq!(n.namespace, Namespace::Index(0));
        assert_eq!(n.identifier, Identifier::Numeric(2258));

        let n = NodeRef::parse("nsu=http://x.org/UA/;i=5").unwrap();
        assert_eq!(n.namespace, Namespace::Uri("http://x.org/UA/".into()));

        // A string identifier may itself contain ';' and '='.
        let n = NodeRef::parse("ns=3;s=a;b=c").unwrap();
        assert_eq!(n.identifier, Identifier::String("a;b=c".into()));
    }

    #[test]
    fn round_trips_display() {
        for t in [
            "ns=2;s=X.Y",
            "nsu=urn:a:b;s=X",
            "i=85",
            "ns=1;g=72962b91-fa75-4ae6-8d28-b404dc7daf63",
            "ns=1;b=aGVsbG8=",
        ] {
            assert_eq!(NodeRef::parse(t).unwrap().to_string(), t);
        }
    }

    #[test]
    fn rejects_bad_forms() {
        assert_eq!(NodeRef::parse(""), Err(NodeIdError::Empty));
        assert!(matches!(
            NodeRef::parse("ns=x;s=a"),
            Err(NodeIdError::BadNamespaceIndex(_))
        ));
        assert!(matches!(
            NodeRef::parse("ns=70000;s=a"),
            Err(NodeIdError::BadNamespaceIndex(_))
        ));
        assert!(matches!(
            NodeRef::parse("ns=2;i=abc"),
            Err(NodeIdError::BadNumeric(_))
        ));
        assert!(matches!(
            NodeRef::parse("ns=2;q=abc"),
            Err(NodeIdError::MissingIdentifier(_))
        ));
        assert!(matches!(
            NodeRef::parse("nsu=;s=a"),
            Err(NodeIdError::EmptyNamespaceUri)
        ));
        assert!(matches!(
            NodeRef::parse("ns=1;g=nope"),
            Err(NodeIdError::BadGuid(_))
        ));
        assert!(matches!(
            NodeRef::parse("ns=2;s="),
            Err(NodeIdError::EmptyIdentifier)
        ));
    }
}
