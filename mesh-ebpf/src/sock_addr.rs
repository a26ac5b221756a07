//! `cgroup/connect4` and `cgroup/connect6`: send TCP connects made inside an
//! enrolled network namespace to the node proxy's loopback listener, and
//! remember where they were going (by socket cookie).
use aya_ebpf::{
    EbpfContext as _,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use mesh_common::{IpKey, OrigDst, enroll_flags};

use crate::maps::{ENROLLED_NETNS, ORIG_BY_COOKIE, OUTBOUND_PORT, PROXY_MARK};

const IPPROTO_TCP: u32 = 6;
/// A cgroup sock_addr program returns 1 to let the syscall proceed.
const ALLOW: i32 = 1;

#[cgroup_sock_addr(connect4)]
pub fn mesh_connect4(ctx: SockAddrContext) -> i32 {
    redirect(&ctx, false);
    ALLOW
}

#[cgroup_sock_addr(connect6)]
pub fn mesh_connect6(ctx: SockAddrContext) -> i32 {
    redirect(&ctx, true);
    ALLOW
}

#[inline(always)]
fn redirect(ctx: &SockAddrContext, v6: bool) {
    // SAFETY: the kernel hands a valid bpf_sock_addr for the program's lifetime.
    let sa = unsafe { &mut *ctx.sock_addr };
    if sa.protocol != IPPROTO_TCP {
        return;
    }
    // SAFETY: helper valid for cgroup sock_addr programs (kernel >= 5.7).
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // SAFETY: read-only lookup; the value is copied out at once.
    let Some(flags) = (unsafe { ENROLLED_NETNS.get(&netns) }).copied() else {
        return;
    };
    if flags & enroll_flags::OUTBOUND == 0 {
        return;
    }
    // SAFETY: `sk` is always set for sock_addr programs; checked anyway.
    let sk = unsafe { sa.__bindgen_anon_1.sk };
    if sk.is_null() {
        return;
    }
    let mark = PROXY_MARK.load();
    // SAFETY: `sk` is a valid bpf_sock pointer (checked above).
    if mark != 0 && unsafe { (*sk).mark } & mark == mark {
        return; // the proxy's own socket
    }
    let dst = if v6 { IpKey::v6(sa.user_ip6).canonical() } else { IpKey::v4(sa.user_ip4) };
    if dst.is_loopback() {
        return; // never leaves the pod: not the mesh's business
    }
    let port = u32::from(u16::from_be(sa.user_port as u16));
    // SAFETY: helper valid for cgroup sock_addr programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if ORIG_BY_COOKIE.insert(&cookie, &OrigDst { ip: dst, port }, 0).is_err() {
        return; // without a record the proxy could not forward: leave it alone
    }
    let proxy_port = u32::from((OUTBOUND_PORT.load() as u16).to_be());
    if v6 {
        sa.user_ip6 = if dst.family == mesh_common::AF_INET {
            // A dual-stack socket going to an IPv4 peer: keep it IPv4 (::ffff:127.0.0.1).
            [0, 0, 0xffffu32.to_be(), u32::from_be_bytes([127, 0, 0, 1]).to_be()]
        } else {
            [0, 0, 0, 1u32.to_be()]
        };
    } else {
        sa.user_ip4 = u32::from_be_bytes([127, 0, 0, 1]).to_be();
    }
    sa.user_port = proxy_port;
}
