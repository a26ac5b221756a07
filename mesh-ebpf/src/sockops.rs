//! `sockops`: when a redirected connect completes its handshake, re-key its
//! original destination by the client's (netns, address, port), which is what
//! the proxy sees on accept. This runs before the client's final ACK is sent,
//! so the entry exists before the proxy can accept: no race.
use aya_ebpf::{
    EbpfContext as _,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::sock_ops,
    programs::SockOpsContext,
};
use mesh_common::{AF_INET, IpKey, PeerKey};

use crate::maps::{ORIG_BY_COOKIE, ORIG_BY_PEER};

const BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB: u32 = 4;

#[sock_ops]
pub fn mesh_sockops(ctx: SockOpsContext) -> u32 {
    if ctx.op() == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        record_peer(&ctx);
    }
    1
}

#[inline(always)]
fn record_peer(ctx: &SockOpsContext) {
    // SAFETY: helper valid for sock_ops programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: read-only lookup; the value is copied out at once.
    let Some(orig) = (unsafe { ORIG_BY_COOKIE.get(&cookie) }).copied() else {
        return; // not a redirected socket: the common case, one lookup
    };
    // SAFETY: helper valid for sock_ops programs (kernel >= 5.15).
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let ip = if ctx.family() == AF_INET { IpKey::v4(ctx.local_ip4()) } else { IpKey::v6(ctx.local_ip6()).canonical() };
    let key = PeerKey { netns_cookie: netns, ip, port: ctx.local_port() };
    let _ = ORIG_BY_PEER.insert(&key, &orig, 0);
    let _ = ORIG_BY_COOKIE.remove(&cookie);
}
