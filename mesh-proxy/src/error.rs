//! What can go wrong with one proxied connection, classified once: the
//! response flag Istio's metrics and access log carry, which side failed, and
//! whether another attempt (the next endpoint, a fresh pooled connection, a
//! retry at a waypoint) could succeed.
use std::{io, net::SocketAddr};

use mesh_common::identity::SpiffeId;

use crate::hbone::TunnelError;

/// Why a connection failed, as Envoy's response flags name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flag {
    /// Refused by an AuthorizationPolicy or PeerAuthentication.
    Denied,
    /// The upstream could not be connected, or failed while relaying.
    UpstreamFailure,
    /// No endpoint (a service without endpoints, or without the port).
    NoHealthyUpstream,
    /// No way to carry it (no certificate for the source yet, no original destination).
    NoRoute,
    /// The proxy stopped carrying it before either end closed (shutdown, a
    /// cancelled task): Envoy's "downstream connection termination".
    Cancelled,
}

impl Flag {
    pub fn as_str(self) -> &'static str {
        match self {
            Flag::Denied => "RBAC",
            Flag::UpstreamFailure => "UF",
            Flag::NoHealthyUpstream => "UH",
            Flag::NoRoute => "NR",
            Flag::Cancelled => "DC",
        }
    }
}

/// Which end of the proxy a failure is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// The client, or what the proxy knows about it (no original destination, no certificate).
    Downstream,
    /// The destination: its address, its proxy's decision, the app behind it.
    Upstream,
}

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("no original destination recorded for this client")]
    NoOriginalDestination,
    #[error("no local address: {0}")]
    NoLocalAddress(io::Error),
    #[error("pod {0} has no workload in the mesh configuration")]
    UnknownSource(String),
    #[error("no certificate for {0} yet: not sending in plaintext")]
    NoCertificate(SpiffeId),
    #[error("service {service} has no port {port}")]
    NoServicePort { service: String, port: u16 },
    #[error("service {0} has no endpoints")]
    NoEndpoints(String),
    /// The service is bound to a waypoint that has no instance running:
    /// refused, never sent around the waypoint.
    #[error("service {service} is bound to waypoint {waypoint}, which has no instance")]
    NoWaypoint { service: String, waypoint: String },
    #[error("tunnel target {target} is not an address of pod {pod}")]
    WrongTarget { target: SocketAddr, pod: String },
    /// Policy (PeerAuthentication or AuthorizationPolicy) refused it here.
    #[error("denied: {reason}")]
    Denied { policy: Option<String>, reason: String },
    #[error("connect {addr}: {source}")]
    Connect { addr: SocketAddr, source: io::Error },
    #[error("HBONE to {peer} ({identity}): {source}")]
    Tunnel { peer: SocketAddr, identity: Box<SpiffeId>, source: Box<TunnelError> },
    #[error("relay: {0}")]
    Relay(io::Error),
}

impl ProxyError {
    pub fn flag(&self) -> Flag {
        match self {
            ProxyError::Denied { .. } => Flag::Denied,
            ProxyError::Tunnel { source, .. } if source.is_policy_refusal() => Flag::Denied,
            ProxyError::NoServicePort { .. } | ProxyError::NoEndpoints(_) | ProxyError::NoWaypoint { .. } => {
                Flag::NoHealthyUpstream
            }
            ProxyError::NoOriginalDestination
            | ProxyError::NoLocalAddress(_)
            | ProxyError::UnknownSource(_)
            | ProxyError::NoCertificate(_)
            | ProxyError::WrongTarget { .. } => Flag::NoRoute,
            ProxyError::Connect { .. } | ProxyError::Tunnel { .. } | ProxyError::Relay(_) => Flag::UpstreamFailure,
        }
    }

    /// Whether trying another endpoint (or connection) could succeed. A
    /// decision (policy, a missing certificate) is final; so is a failure
    /// after bytes moved, which cannot be replayed.
    pub fn retryable(&self) -> bool {
        match self {
            ProxyError::Connect { .. } => true,
            ProxyError::Tunnel { source, .. } => !source.is_policy_refusal(),
            _ => false,
        }
    }

    pub fn side(&self) -> Side {
        match self {
            ProxyError::NoOriginalDestination
            | ProxyError::NoLocalAddress(_)
            | ProxyError::UnknownSource(_)
            | ProxyError::NoCertificate(_) => Side::Downstream,
            _ => Side::Upstream,
        }
    }
}

#[cfg(test)]
mod tests {
    use http::StatusCode;

    use super::*;

    #[test]
    fn classification() {
        let id: SpiffeId = "spiffe://cluster.local/ns/shop/sa/b".parse().unwrap();
        let addr: SocketAddr = "10.0.0.2:15008".parse().unwrap();
        let refused = |code| ProxyError::Tunnel {
            peer: addr,
            identity: Box::new(id.clone()),
            source: Box::new(TunnelError::Refused { authority: "10.0.0.2:80".parse().unwrap(), code }),
        };
        let io = || io::Error::from(io::ErrorKind::ConnectionRefused);
        // (error, flag, retryable, side)
        let cases: Vec<(ProxyError, &str, bool, Side)> = vec![
            (ProxyError::NoOriginalDestination, "NR", false, Side::Downstream),
            (ProxyError::UnknownSource("shop/a".into()), "NR", false, Side::Downstream),
            (ProxyError::NoCertificate(id.clone()), "NR", false, Side::Downstream),
            (ProxyError::NoServicePort { service: "shop/b".into(), port: 81 }, "UH", false, Side::Upstream),
            (ProxyError::NoEndpoints("shop/b".into()), "UH", false, Side::Upstream),
            (
                ProxyError::NoWaypoint { service: "shop/b".into(), waypoint: "shop/wp".into() },
                "UH",
                false,
                Side::Upstream,
            ),
            (ProxyError::WrongTarget { target: addr, pod: "shop/b".into() }, "NR", false, Side::Upstream),
            (ProxyError::Denied { policy: None, reason: "STRICT".into() }, "RBAC", false, Side::Upstream),
            (ProxyError::Connect { addr, source: io() }, "UF", true, Side::Upstream),
            (refused(StatusCode::UNAUTHORIZED), "RBAC", false, Side::Upstream),
            (refused(StatusCode::FORBIDDEN), "RBAC", false, Side::Upstream),
            (refused(StatusCode::SERVICE_UNAVAILABLE), "UF", true, Side::Upstream),
            (
                ProxyError::Tunnel {
                    peer: addr,
                    identity: Box::new(id.clone()),
                    source: Box::new(TunnelError::Broken(io())),
                },
                "UF",
                true,
                Side::Upstream,
            ),
            (ProxyError::Relay(io()), "UF", false, Side::Upstream),
        ];
        for (e, flag, retryable, side) in cases {
            assert_eq!((e.flag().as_str(), e.retryable(), e.side()), (flag, retryable, side), "{e}");
        }
    }
}
