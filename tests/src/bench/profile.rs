//! Putting a profile's samples in categories by their symbols, for
//! `benches/profile.rs` and the tables of PERFORMANCE.md.

/// Categories, each with the patterns of the symbols it takes; the first
/// category with a matching pattern wins. A pattern matches anywhere in the
/// symbol, or, starting with `^`, at its start once leading underscores are
/// dropped (`^tcp_` takes `__tcp_push_pending_frames` but not
/// `rustls::...::attempt_tcp_...`). Crates come before the kernel's
/// categories: `tokio::...::scheduler` is the runtime, not the kernel's
/// scheduling. The tables list them in [`TABLE_ORDER`].
pub const CATEGORIES: &[(&str, &[&str])] = &[
    (AES, &["aes", "gcm", "ghash", "clmul"]),
    (MEMCPY, &["memmove", "memcpy", "memset"]),
    (RUSTLS, &["rustls::"]),
    (H2, &["h2::"]),
    (TOKIO, &["tokio::", "mio::"]),
    (
        KERNEL_COPIES,
        &["^copy_to_iter", "^copy_from_iter", "copy_user", "^rep_movs", "^copy_page_to_iter", "^copy_page_from_iter"],
    ),
    (SOFTIRQ, &["^raw_spin_unlock_irqrestore", "softirq", "^net_rx_action"]),
    (
        SCHEDULING,
        &[
            "^finish_task_switch",
            "^schedule",
            "futex",
            "wake",
            "epoll",
            "^ep_",
            "pthread_mutex",
            "pthread_cond",
            "^raw_spin_lock",
            "^select_task_rq",
            "^enqueue_",
            "^dequeue_",
            "^update_curr",
            "^pick_next",
            "^psi_",
        ],
    ),
    (
        KERNEL_NET,
        &[
            "^tcp_",
            "^ip_",
            "^ip6_",
            "^br_",
            "veth",
            "skb",
            "^netif",
            "^dev_",
            "^nf_",
            "^sock_",
            "^sk_",
            "^inet_",
            "splice",
            "^pipe_",
            "^napi",
            "^process_backlog",
            "^loopback",
        ],
    ),
    (SYSCALL, &["entry_SYSCALL", "syscall", "^fget", "^fdget", "^x64_sys", "^fput"]),
    (ALLOC, &["malloc", "^free", "cfree", "realloc", "^kmem_cache", "kmalloc", "^kfree", "^alloc_pages", "^alloc"]),
];

pub const AES: &str = "AES-GCM";
pub const MEMCPY: &str = "memcpy, memmove (user space, and the kernel's own)";
pub const RUSTLS: &str = "rustls (records, state)";
pub const H2: &str = "h2 (framing, flow control)";
pub const TOKIO: &str = "tokio runtime";
pub const KERNEL_COPIES: &str = "kernel copies to and from user space";
pub const SOFTIRQ: &str = "softirq network processing";
pub const SCHEDULING: &str = "scheduling, wake-ups, locks";
pub const KERNEL_NET: &str = "kernel TCP/IP, veth, bridge, splice";
pub const SYSCALL: &str = "syscall entry and exit, fd lookup";
pub const ALLOC: &str = "allocation";
pub const OTHER_KERNEL: &str = "other kernel";
pub const OTHER_USER: &str = "other user space";

/// The rows of a table, in order.
pub const TABLE_ORDER: &[&str] = &[
    KERNEL_NET,
    SOFTIRQ,
    KERNEL_COPIES,
    AES,
    MEMCPY,
    SCHEDULING,
    SYSCALL,
    ALLOC,
    RUSTLS,
    H2,
    TOKIO,
    OTHER_KERNEL,
    OTHER_USER,
];

fn matches(symbol: &str, pattern: &str) -> bool {
    match pattern.strip_prefix('^') {
        Some(prefix) => symbol.trim_start_matches('_').starts_with(prefix),
        None => symbol.contains(pattern),
    }
}

/// The category of a sample's symbol (pure).
pub fn category(symbol: &str, kernel: bool) -> &'static str {
    for (name, needles) in CATEGORIES {
        if needles.iter().any(|n| matches(symbol, n)) {
            return name;
        }
    }
    if kernel { OTHER_KERNEL } else { OTHER_USER }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symbols_fall_in_their_categories() {
        let cases = [
            ("aes_gcm_enc_update_vaes_avx2", false, "AES-GCM"),
            ("__memmove_avx_unaligned_erms", false, MEMCPY),
            ("_copy_to_iter", true, KERNEL_COPIES),
            ("_raw_spin_unlock_irqrestore", true, SOFTIRQ),
            ("finish_task_switch.isra.0", true, SCHEDULING),
            ("try_to_wake_up", true, SCHEDULING),
            ("__schedule", true, SCHEDULING),
            ("tcp_sendmsg_locked", true, KERNEL_NET),
            ("__tcp_push_pending_frames", true, KERNEL_NET),
            ("splice_to_socket", true, KERNEL_NET),
            ("task_work_run", true, OTHER_KERNEL),
            ("entry_SYSCALL_64", true, SYSCALL),
            ("_int_malloc", false, ALLOC),
            ("rustls::conn::ConnectionCommon<T>::process_new_packets", false, RUSTLS),
            ("h2::proto::streams::prioritize::Prioritize::pop_frame", false, H2),
            ("tokio::runtime::scheduler::multi_thread::worker::Context::run", false, TOKIO),
            ("tokio::runtime::park::Inner::unpark", false, TOKIO),
            ("do_idle", true, OTHER_KERNEL),
            ("mesh_node::proxy::accept_loop", false, OTHER_USER),
        ];
        for (symbol, kernel, want) in cases {
            assert_eq!(category(symbol, kernel), want, "{symbol}");
        }
    }
}
