//! Workload identities: SPIFFE IDs of the form
//! `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
use std::{fmt, str::FromStr};

/// A parsed, validated SPIFFE ID. Past the edges of the system identities are
/// always this type, never a bare string.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    trust_domain: String,
    namespace: String,
    service_account: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpiffeIdError(pub String);

impl fmt::Display for SpiffeIdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for SpiffeIdError {}

impl SpiffeId {
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> Result<Self, SpiffeIdError> {
        if !valid_trust_domain(trust_domain) {
            return Err(SpiffeIdError(format!(
                "trust domain {trust_domain:?}: expected lowercase letters, digits, '.', '-', '_'"
            )));
        }
        for (what, v) in [("namespace", namespace), ("service account", service_account)] {
            if !valid_segment(v) {
                return Err(SpiffeIdError(format!("{what} {v:?}: expected a DNS-1123 name")));
            }
        }
        Ok(Self {
            trust_domain: trust_domain.into(),
            namespace: namespace.into(),
            service_account: service_account.into(),
        })
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn service_account(&self) -> &str {
        &self.service_account
    }

    /// The form Istio's AuthorizationPolicy uses: `<trust-domain>/ns/<ns>/sa/<sa>`.
    pub fn principal(&self) -> String {
        format!("{}/ns/{}/sa/{}", self.trust_domain, self.namespace, self.service_account)
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "spiffe://{}", self.principal())
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let rest = s
            .strip_prefix("spiffe://")
            .ok_or_else(|| SpiffeIdError(format!("{s:?}: a SPIFFE ID starts with spiffe://")))?;
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            [td, "ns", ns, "sa", sa] => Self::new(td, ns, sa),
            _ => Err(SpiffeIdError(format!(
                "{s:?}: expected spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>"
            ))),
        }
    }
}

fn valid_trust_domain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 255
        && s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | '_'))
}

/// A DNS-1123 label: what Kubernetes allows for namespaces and service accounts.
pub fn valid_segment(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// A certificate's serial number (its DER INTEGER content bytes) as the
/// mesh names certificates on the wire: lowercase hex, no separators. The
/// controller issues and revokes by it; nodes match peers against it.
pub fn serial_hex(raw: &[u8]) -> String {
    raw.iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether `s` is a serial as [`serial_hex`] writes it.
pub fn is_serial_hex(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serials_are_lowercase_hex() {
        assert_eq!(serial_hex(&[0x00, 0x7a, 0xff]), "007aff");
        for (s, ok) in [("007aff", true), ("7A", false), ("7a:01", false), ("", false)] {
            assert_eq!(is_serial_hex(s), ok, "{s}");
        }
    }

    #[test]
    fn parse_and_print() {
        let cases = [
            ("spiffe://cluster.local/ns/default/sa/web", Ok("cluster.local/ns/default/sa/web")),
            ("spiffe://td/ns/a-b/sa/c1", Ok("td/ns/a-b/sa/c1")),
            ("cluster.local/ns/default/sa/web", Err("starts with spiffe://")),
            ("spiffe://cluster.local/ns/default/web", Err("expected spiffe://")),
            ("spiffe://cluster.local/ns/Default/sa/web", Err("namespace \"Default\"")),
            ("spiffe://Cluster/ns/default/sa/web", Err("trust domain")),
            ("spiffe://td/ns/default/sa/", Err("service account \"\"")),
        ];
        for (input, want) in cases {
            match (input.parse::<SpiffeId>(), want) {
                (Ok(id), Ok(principal)) => {
                    assert_eq!(id.principal(), principal);
                    assert_eq!(id.to_string(), format!("spiffe://{principal}"));
                }
                (Err(e), Err(part)) => assert!(e.0.contains(part), "{input}: {e}"),
                (got, want) => panic!("{input}: got {got:?}, want {want:?}"),
            }
        }
    }
}
