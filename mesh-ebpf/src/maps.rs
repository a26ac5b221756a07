//! Maps and load-time settings shared by the programs. The agent pins the maps
//! under its own bpffs directory, so a restarted agent finds them again.
use aya_ebpf::{
    Global,
    macros::map,
    maps::{HashMap, LruHashMap, SockHash},
};
use mesh_common::{DEFAULT_PROXY_MARK, HBONE_PORT, IpKey, OUTBOUND_PORT as DEFAULT_OUTBOUND, OrigDst, PeerKey};

/// netns cookie -> `enroll_flags`: which namespaces belong to this agent.
#[map]
pub static ENROLLED_NETNS: HashMap<u64, u32> = HashMap::with_max_entries(16_384, 0);

/// socket cookie -> original destination, from connect() until the handshake
/// completes. LRU: a connect that never completes cannot leak an entry.
#[map]
pub static ORIG_BY_COOKIE: LruHashMap<u64, OrigDst> = LruHashMap::with_max_entries(65_536, 0);

/// client (netns, address, port) -> original destination, for the proxy's accept.
/// The proxy deletes what it reads; LRU bounds what is never read.
#[map]
pub static ORIG_BY_PEER: LruHashMap<PeerKey, OrigDst> = LruHashMap::with_max_entries(65_536, 0);

/// pod address -> the proxy's inbound listener in that pod. The kernel drops an
/// entry when its socket closes, which is what makes inbound fail closed.
#[map]
pub static INBOUND_LISTEN: SockHash<IpKey> = SockHash::with_max_entries(16_384, 0);

/// Mark on the proxy's own sockets; those are never redirected.
#[unsafe(no_mangle)]
pub static PROXY_MARK: Global<u32> = Global::new(DEFAULT_PROXY_MARK);

/// Port of the proxy's outbound listener on loopback.
#[unsafe(no_mangle)]
pub static OUTBOUND_PORT: Global<u32> = Global::new(DEFAULT_OUTBOUND as u32);

/// Inbound port that is not steered (HBONE arrives there directly).
#[unsafe(no_mangle)]
pub static INBOUND_BYPASS_PORT: Global<u32> = Global::new(HBONE_PORT as u32);
