//! The ABI between mesh's eBPF programs (`mesh-ebpf`) and its agent (`mesh-node`).
//!
//! Every type here crosses the kernel/user boundary through a BPF map, so each is
//! `#[repr(C)]`, `Copy`, and laid out without implicit padding (`u32` where a
//! `bool` or `u16` would leave holes). Addresses are stored as the kernel hands
//! them to the programs: network byte order, IPv4 in the first word.
#![cfg_attr(not(feature = "std"), no_std)]

#[cfg(feature = "api")]
pub mod admin;
#[cfg(feature = "authz")]
pub mod authz;
#[cfg(feature = "cel")]
pub mod cel;
#[cfg(feature = "std")]
mod duration;
#[cfg(feature = "std")]
pub mod files;
#[cfg(feature = "graph")]
pub mod graph;
#[cfg(feature = "heap")]
pub mod heap;
#[cfg(feature = "std")]
pub mod identity;
#[cfg(feature = "kube")]
pub mod kube_client;
#[cfg(feature = "routing")]
pub mod routing;
#[cfg(feature = "std")]
pub use duration::parse_duration;

/// Port of the node proxy's outbound listener, bound to loopback inside each enrolled pod.
pub const OUTBOUND_PORT: u16 = 15001;
/// Port of the node proxy's inbound plaintext listener inside each enrolled pod.
pub const INBOUND_PORT: u16 = 15006;
/// Port of the node proxy's HBONE (mTLS) listener inside each enrolled pod.
pub const HBONE_PORT: u16 = 15008;
/// Socket mark the proxy sets on its own sockets so the redirect skips them
/// (the value Istio uses, so operators recognise it).
pub const DEFAULT_PROXY_MARK: u32 = 0x539;

/// `AF_INET`, as stored in [`IpKey::family`].
pub const AF_INET: u32 = 2;
/// `AF_INET6`, as stored in [`IpKey::family`].
pub const AF_INET6: u32 = 10;

/// Bits of the `ENROLLED_NETNS` map value.
pub mod enroll_flags {
    /// Redirect the namespace's outbound TCP connects to the node proxy.
    pub const OUTBOUND: u32 = 1;
}

/// Names shared by the loader and the programs (maps and programs are found by name).
pub mod names {
    /// netns cookie (`u64`) -> `enroll_flags` (`u32`).
    pub const ENROLLED_NETNS: &str = "ENROLLED_NETNS";
    /// socket cookie (`u64`) -> [`super::OrigDst`], written at connect, moved at establishment.
    pub const ORIG_BY_COOKIE: &str = "ORIG_BY_COOKIE";
    /// [`super::PeerKey`] -> [`super::OrigDst`], read by the proxy when it accepts.
    pub const ORIG_BY_PEER: &str = "ORIG_BY_PEER";
    /// [`super::IpKey`] (pod address) -> the proxy's inbound listener socket.
    pub const INBOUND_LISTENERS: &str = "INBOUND_LISTEN";
    pub const PROG_CONNECT4: &str = "mesh_connect4";
    pub const PROG_CONNECT6: &str = "mesh_connect6";
    pub const PROG_SOCKOPS: &str = "mesh_sockops";
    pub const PROG_SK_LOOKUP: &str = "mesh_sk_lookup";
    /// Load-time globals (see `aya::EbpfLoader::override_global`).
    pub const GLOBAL_PROXY_MARK: &str = "PROXY_MARK";
    pub const GLOBAL_OUTBOUND_PORT: &str = "OUTBOUND_PORT";
    pub const GLOBAL_INBOUND_BYPASS_PORT: &str = "INBOUND_BYPASS_PORT";
}

/// An IPv4 or IPv6 address as the kernel presents it to BPF programs.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct IpKey {
    /// [`AF_INET`] or [`AF_INET6`].
    pub family: u32,
    /// Network byte order; IPv4 uses `addr[0]` and leaves the rest zero.
    pub addr: [u32; 4],
}

impl IpKey {
    pub const fn v4(addr_be: u32) -> Self {
        Self { family: AF_INET, addr: [addr_be, 0, 0, 0] }
    }

    pub const fn v6(addr_be: [u32; 4]) -> Self {
        Self { family: AF_INET6, addr: addr_be }
    }

    /// An IPv4-mapped IPv6 address (`::ffff:a.b.c.d`) as the IPv4 address it
    /// stands for, so a dual-stack socket and an IPv4 one produce the same key.
    pub const fn canonical(self) -> Self {
        if self.family == AF_INET6 && self.addr[0] == 0 && self.addr[1] == 0 && self.addr[2] == 0xffffu32.to_be() {
            Self::v4(self.addr[3])
        } else {
            self
        }
    }

    /// Whether this is a loopback address (127.0.0.0/8 or ::1). Traffic to
    /// loopback never leaves the pod, so it is never redirected or steered.
    pub const fn is_loopback(&self) -> bool {
        if self.family == AF_INET {
            // First byte in memory is the first octet (network order).
            (self.addr[0].to_ne_bytes()[0]) == 127
        } else {
            self.addr[0] == 0 && self.addr[1] == 0 && self.addr[2] == 0 && self.addr[3] == 1u32.to_be()
        }
    }
}

/// Where a redirected connection was originally going.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OrigDst {
    pub ip: IpKey,
    /// Host byte order (a `u32` to keep the layout free of padding).
    pub port: u32,
}

/// The client end of a redirected connection, as the proxy sees it on accept.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PeerKey {
    /// Network namespace of the client (the enrolled pod).
    pub netns_cookie: u64,
    pub ip: IpKey,
    /// Host byte order.
    pub port: u32,
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: the types are #[repr(C)], Copy, made only of integers, with no padding
    // (checked by the size assertions below), so any bit pattern is valid.
    unsafe impl aya::Pod for super::IpKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::OrigDst {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::PeerKey {}
}

// No implicit padding: the kernel compares keys byte by byte.
const _: () = assert!(core::mem::size_of::<IpKey>() == 20);
const _: () = assert!(core::mem::size_of::<OrigDst>() == 24);
const _: () = assert!(core::mem::size_of::<PeerKey>() == 32);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v4_mapped_addresses_become_v4() {
        let ten = u32::from_be_bytes([10, 1, 2, 3]).to_be();
        assert_eq!(IpKey::v6([0, 0, 0xffffu32.to_be(), ten]).canonical(), IpKey::v4(ten));
        let v6 = IpKey::v6([0xfd00u32.to_be(), 0, 0xffffu32.to_be(), ten]);
        assert_eq!(v6.canonical(), v6);
    }

    #[test]
    fn loopback_detection() {
        let cases = [
            (IpKey::v4(u32::from_be_bytes([127, 0, 0, 1]).to_be()), true),
            (IpKey::v4(u32::from_be_bytes([127, 9, 8, 7]).to_be()), true),
            (IpKey::v4(u32::from_be_bytes([10, 0, 0, 127]).to_be()), false),
            (IpKey::v6([0, 0, 0, 1u32.to_be()]), true),
            (IpKey::v6([0, 0, 0, 1]), false),
            (IpKey::v6([0xfd00u32.to_be(), 0, 0, 1u32.to_be()]), false),
            (IpKey::v6([0, 0, 0xffffu32.to_be(), u32::from_be_bytes([127, 0, 0, 1]).to_be()]).canonical(), true),
        ];
        for (ip, want) in cases {
            assert_eq!(ip.is_loopback(), want, "{ip:?}");
        }
    }
}

/// The controller/node API (`proto/mesh/v1/node.proto`).
#[cfg(feature = "api")]
pub mod api {
    #![allow(clippy::all, missing_docs)]
    include!(concat!(env!("OUT_DIR"), "/mesh.v1.rs"));

    mod keys;
    pub use keys::ResourceKey;
}

/// Istio's certificate service (`proto/istio/v1/auth/ca.proto`), which the
/// controller serves for Istio's own agents.
#[cfg(feature = "api")]
pub mod istio_ca {
    #![allow(clippy::all, missing_docs)]
    include!(concat!(env!("OUT_DIR"), "/istio.v1.auth.rs"));
}

/// Envoy's ext_authz gRPC API (`proto/envoy/service/auth/v3`), as the
/// waypoint calls external authorizers.
#[cfg(feature = "api")]
pub mod ext_authz {
    #![allow(clippy::all, missing_docs)]
    include!(concat!(env!("OUT_DIR"), "/envoy.service.auth.v3.rs"));
}
