//! What a tunnel's `CONNECT` says about its source, as Istio's proxies say
//! it, so a stock peer (ztunnel, an Istio waypoint) attributes telemetry to
//! the right workload and service, and mesh does for theirs:
//! - `baggage` (W3C Baggage): the source workload's cluster, namespace,
//!   workload name and canonical service and revision, with the keys
//!   Istio's proxies use (`k8s.namespace.name`, `service.name`, ...);
//! - `forwarded` (RFC 7239): `for=` the client's address and, when the
//!   client addressed a service, `host=` the service's hostname;
//! - `x-mesh-connection-id`: mesh's own, the id the source node's access log
//!   gives the connection, so the destination's log line and a waypoint's
//!   spans and log lines can be joined with it (other peers ignore it).
//!
//! Pure: making and reading the values; `hbone` sends and receives them.
use std::net::{IpAddr, SocketAddr};

use http::HeaderValue;

/// A tunnel to open: the `CONNECT` authority and the headers about its source.
#[derive(Clone, Debug)]
pub struct Connect {
    pub authority: SocketAddr,
    pub baggage: Option<HeaderValue>,
    pub forwarded: Option<HeaderValue>,
    pub connection_id: Option<HeaderValue>,
}

impl From<SocketAddr> for Connect {
    fn from(authority: SocketAddr) -> Connect {
        Connect { authority, baggage: None, forwarded: None, connection_id: None }
    }
}

pub const CONNECTION_ID_HEADER: &str = "x-mesh-connection-id";

/// A new connection's id: 16 lowercase hex digits.
pub fn new_connection_id() -> String {
    format!("{:016x}", fastrand::u64(..))
}

/// A peer's connection id, if it is one (1 to 32 hex digits).
pub fn connection_id(value: &str) -> Option<String> {
    let ok = (1..=32).contains(&value.len()) && value.bytes().all(|b| b.is_ascii_hexdigit());
    ok.then(|| value.to_ascii_lowercase())
}

/// Istio's cluster name when none is configured.
pub const DEFAULT_CLUSTER: &str = "Kubernetes";

/// The source workload, as `baggage` carries it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Baggage {
    pub cluster: Option<String>,
    pub namespace: Option<String>,
    /// `k8s.<kind>.name`: the workload (a Deployment's, a Pod's, ... name).
    pub workload: Option<String>,
    pub service: Option<String>,
    pub revision: Option<String>,
}

impl Baggage {
    /// The header's value; characters baggage does not allow in a value
    /// (none are expected in Kubernetes names) are dropped.
    pub fn to_header(&self) -> Option<HeaderValue> {
        let clean = |v: &str| v.chars().filter(|c| c.is_ascii_graphic() && !",;=\\\"".contains(*c)).collect::<String>();
        let mut parts = Vec::new();
        let fields = [
            ("k8s.cluster.name", &self.cluster),
            ("k8s.namespace.name", &self.namespace),
            ("k8s.pod.name", &self.workload),
            ("service.name", &self.service),
            ("service.version", &self.revision),
        ];
        for (key, value) in fields {
            if let Some(v) = value.as_deref().map(clean).filter(|v| !v.is_empty()) {
                parts.push(format!("{key}={v}"));
            }
        }
        (!parts.is_empty()).then(|| HeaderValue::from_str(&parts.join(",")).ok()).flatten()
    }

    /// Reads a peer's `baggage`: the keys Istio's proxies send (any
    /// `k8s.<kind>.name` as the workload), others ignored; properties after
    /// `;` and percent-encoding as W3C Baggage allows.
    pub fn parse(header: &str) -> Baggage {
        let mut b = Baggage::default();
        for member in header.split(',') {
            let member = member.split(';').next().unwrap_or_default();
            let Some((key, value)) = member.split_once('=') else { continue };
            let (key, value) = (key.trim(), percent_decode(value.trim()));
            if value.is_empty() {
                continue;
            }
            match key {
                "k8s.cluster.name" => b.cluster = Some(value),
                "k8s.namespace.name" => b.namespace = Some(value),
                "service.name" => b.service = Some(value),
                "service.version" => b.revision = Some(value),
                k if k.starts_with("k8s.") && k.ends_with(".name") && k != "k8s.node.name" => {
                    b.workload = Some(value);
                }
                _ => {}
            }
        }
        b
    }
}

fn percent_decode(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (bytes[i], bytes.get(i + 1).copied().and_then(hex), bytes.get(i + 2).copied().and_then(hex)) {
            (b'%', Some(hi), Some(lo)) => {
                out.push((hi * 16 + lo) as u8);
                i += 3;
            }
            (b, ..) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `forwarded: for=<client>;host=<service>` (an IPv6 client quoted in brackets).
pub fn forwarded(client: IpAddr, host: Option<&str>) -> Option<HeaderValue> {
    let client = client.to_canonical();
    let mut value = match client {
        IpAddr::V4(v4) => format!("for={v4}"),
        IpAddr::V6(v6) => format!("for=\"[{v6}]\""),
    };
    if let Some(host) = host.filter(|h| !h.is_empty()) {
        value.push_str(&format!(";host={host}"));
    }
    HeaderValue::from_str(&value).ok()
}

/// The `host=` of a peer's `forwarded` (its first element), unquoted.
pub fn forwarded_host(header: &str) -> Option<String> {
    let first = header.split(',').next()?;
    first.split(';').find_map(|pair| {
        let (key, value) = pair.trim().split_once('=')?;
        key.eq_ignore_ascii_case("host").then(|| value.trim_matches('"').to_owned()).filter(|h| !h.is_empty())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn baggage_is_written_as_istio_writes_it_and_read_from_any_istio_proxy() {
        let ours = Baggage {
            cluster: Some(DEFAULT_CLUSTER.into()),
            namespace: Some("shop".into()),
            workload: Some("web-1".into()),
            service: Some("web".into()),
            revision: Some("v1".into()),
        };
        let header = ours.to_header().unwrap();
        assert_eq!(
            header.to_str().unwrap(),
            "k8s.cluster.name=Kubernetes,k8s.namespace.name=shop,k8s.pod.name=web-1,service.name=web,service.version=v1"
        );
        assert_eq!(Baggage::parse(header.to_str().unwrap()), ours);
        assert_eq!(Baggage::default().to_header(), None);

        // As ztunnel and Istio's waypoints send it: a Deployment's name, spaces, properties, encoding.
        let theirs = Baggage::parse(
            "k8s.cluster.name=c1, k8s.namespace.name=default,k8s.deployment.name=reviews-v2;prop=1,\
             service.name=reviews,service.version=v%32,k8s.node.name=n1,other=x",
        );
        assert_eq!(theirs.workload.as_deref(), Some("reviews-v2"));
        assert_eq!(theirs.revision.as_deref(), Some("v2"));
        assert_eq!(theirs.cluster.as_deref(), Some("c1"));
        assert_eq!(Baggage::parse("garbage,,=x,k="), Baggage::default());
    }

    #[test]
    fn forwarded_names_the_client_and_the_service_host() {
        let cases = [
            ("10.0.0.1", Some("web.shop.svc.cluster.local"), "for=10.0.0.1;host=web.shop.svc.cluster.local"),
            ("fd00::1", None, "for=\"[fd00::1]\""),
            ("::ffff:10.0.0.2", Some(""), "for=10.0.0.2"),
        ];
        for (ip, host, want) in cases {
            assert_eq!(forwarded(ip.parse().unwrap(), host).unwrap().to_str().unwrap(), want);
        }
        assert_eq!(
            forwarded_host("for=10.0.0.1;host=web.shop.svc.cluster.local").as_deref(),
            Some("web.shop.svc.cluster.local")
        );
        assert_eq!(forwarded_host("for=1.2.3.4;Host=\"a.b\", for=5.6.7.8;host=c").as_deref(), Some("a.b"));
        assert_eq!(forwarded_host("for=1.2.3.4"), None);
    }
}
