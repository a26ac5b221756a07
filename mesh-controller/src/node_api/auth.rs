//! Who is calling: the join token (compared in constant time), the node
//! named by a verified client certificate, and CA refusals as gRPC statuses.
use tonic::Status;

use crate::ca;

pub(super) fn uri_san(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|n| match n {
        x509_parser::extensions::GeneralName::URI(u) => Some((*u).to_owned()),
        _ => None,
    })
}

/// A Kubernetes node name: a DNS-1123 subdomain.
pub fn valid_node_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        && !name.starts_with(['-', '.'])
        && !name.ends_with(['-', '.'])
}

/// Compares without an early exit, so timing does not reveal the token.
pub(super) fn same_token(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

pub(super) fn ca_status(e: ca::CaError) -> Status {
    match e {
        ca::CaError::BadCsr(_) => Status::invalid_argument(e.to_string()),
        ca::CaError::NotOnNode { .. } => Status::permission_denied(e.to_string()),
        _ => Status::internal(e.to_string()),
    }
}

/// The join token in `path`, created (32 random bytes, hex, mode 0600) when missing.
pub fn join_token(path: &std::path::Path) -> std::io::Result<String> {
    match std::fs::read_to_string(path) {
        Ok(text) if !text.trim().is_empty() => return Ok(text.trim().to_owned()),
        Ok(_) => return Err(std::io::Error::other("the file is empty")),
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        Err(_) => {}
    }
    let token: String = ca::random_bytes::<32>()?.iter().map(|b| format!("{b:02x}")).collect();
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    ca::write_private(path, format!("{token}\n").as_bytes())?;
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names() {
        for (name, ok) in [
            ("node1", true),
            ("ip-10-0-0-1.eu-west-1.compute.internal", true),
            ("", false),
            ("Node1", false),
            ("-node", false),
            ("node/evil", false),
            ("node.", false),
        ] {
            assert_eq!(valid_node_name(name), ok, "{name:?}");
        }
    }

    #[test]
    fn tokens() {
        assert!(same_token("abc123", "abc123"));
        assert!(!same_token("abc123", "abc124"));
        assert!(!same_token("abc123", "abc1234"));
        assert!(!same_token("", "x"));
    }
}
