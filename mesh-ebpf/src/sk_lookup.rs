//! `sk_lookup`, attached to each enrolled pod's network namespace: a new TCP
//! connection from outside the pod, to any port but HBONE's, goes to the
//! proxy's inbound listener. The accepted socket keeps the original local
//! address, so the proxy learns the original port from `getsockname`.
use aya_ebpf::{macros::sk_lookup, programs::SkLookupContext};
use mesh_common::{AF_INET, IpKey};

use crate::maps::{INBOUND_BYPASS_PORT, INBOUND_LISTEN};

const IPPROTO_TCP: u32 = 6;
const SK_DROP: u32 = 0;
const SK_PASS: u32 = 1;

#[sk_lookup]
pub fn mesh_sk_lookup(ctx: SkLookupContext) -> u32 {
    // SAFETY: the kernel hands a valid bpf_sk_lookup for the program's lifetime.
    let l = unsafe { &*ctx.lookup };
    if l.protocol != IPPROTO_TCP || l.local_port == INBOUND_BYPASS_PORT.load() {
        return SK_PASS;
    }
    let (local, remote) = if l.family == AF_INET {
        (IpKey::v4(l.local_ip4), IpKey::v4(l.remote_ip4))
    } else {
        (IpKey::v6(l.local_ip6).canonical(), IpKey::v6(l.remote_ip6).canonical())
    };
    // Inside the pod (loopback, or the pod calling itself, as the proxy does
    // when it delivers to the app): the normal lookup applies.
    if local.is_loopback() || local == remote {
        return SK_PASS;
    }
    match INBOUND_LISTEN.redirect_sk_lookup(&ctx, local, 0) {
        Ok(()) => SK_PASS,
        // No listener: the proxy is down or the address is not the pod's.
        // Fail closed rather than let plaintext reach the app around the proxy.
        Err(_) => SK_DROP,
    }
}
