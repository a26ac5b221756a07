//! The kernel side of the agent: loads mesh's eBPF programs, pins their maps and
//! links under `<bpffs>/mesh/<instance>/`, and edits the maps as pods come and go.
//!
//! Pinning is what lets an agent restart without opening a gap: the programs
//! stay attached while no agent runs (so enrolled pods fail closed), and a new
//! agent attaches its programs *before* it removes the old links, so at no
//! moment is an enrolled pod unredirected and no link is left duplicated.
use std::{
    collections::{BTreeMap, HashSet},
    fs::{self, File},
    io,
    net::{IpAddr, SocketAddr},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    sync::Mutex,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap as BpfHashMap, MapData, MapError, SockHash},
    programs::{
        CgroupAttachMode, CgroupSockAddr, ProgramError, SkLookup, SockOps,
        links::{FdLink, LinkError, PinnedLink},
    },
};
use mesh_common::{IpKey, OrigDst, PeerKey, enroll_flags, names};
use tracing::{debug, info, warn};

static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/mesh-ebpf"));

/// Linux's bpffs magic number (`BPF_FS_MAGIC`).
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("this kernel lacks {feature} (needs {needs}): {detail}")]
    Unsupported { feature: &'static str, needs: &'static str, detail: String },
    #[error("bpffs at {path}: {source}")]
    Bpffs { path: PathBuf, source: io::Error },
    #[error("cgroup v2 at {path}: {source} (set --cgroup-path to where cgroup2 is mounted)")]
    Cgroup { path: PathBuf, source: io::Error },
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("{what}: {source}")]
    Program { what: String, source: ProgramError },
    #[error("{what}: {source}")]
    Link { what: String, source: LinkError },
    #[error("{what}: {source}")]
    Map { what: String, source: MapError },
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
}

/// Where the agent's kernel objects live and how they behave.
#[derive(Clone, Debug)]
pub struct DataplaneConfig {
    /// `<bpffs>/mesh/<instance>`.
    pub pin_dir: PathBuf,
    /// The cgroup v2 directory whose sockets are seen (the root, to see every pod).
    pub cgroup: PathBuf,
    pub proxy_mark: u32,
    pub outbound_port: u16,
    pub inbound_bypass_port: u16,
}

/// The proxy's read side of the original-destination map.
pub struct OrigDstTable(Mutex<BpfHashMap<MapData, PeerKey, OrigDst>>);

impl OrigDstTable {
    /// Takes (reads and deletes) the original destination recorded for a
    /// client at `client` in the network namespace `netns_cookie`.
    pub fn take(&self, netns_cookie: u64, client: SocketAddr) -> Option<SocketAddr> {
        let key = PeerKey { netns_cookie, ip: ip_key(client.ip()), port: u32::from(client.port()) };
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let found = map.get(&key, 0).ok()?;
        let _ = map.remove(&key);
        Some(SocketAddr::new(ip_from_key(&found.ip), found.port as u16))
    }
}

pub use mesh_common::admin::DataplaneStatus;

pub struct Dataplane {
    config: DataplaneConfig,
    ebpf: Ebpf,
    enrolled: BpfHashMap<MapData, u64, u32>,
    inbound: SockHash<MapData, IpKey>,
    orig_dst: std::sync::Arc<OrigDstTable>,
    links: BTreeMap<String, PinnedLink>,
    status: DataplaneStatus,
}

impl Dataplane {
    /// Loads the programs, reusing this instance's pinned maps if an earlier
    /// agent left them, and attaches the cgroup programs.
    pub fn start(config: DataplaneConfig) -> Result<Self, DataplaneError> {
        let bpffs = config.pin_dir.parent().and_then(Path::parent).unwrap_or(Path::new("/sys/fs/bpf"));
        ensure_bpffs(bpffs)?;
        let maps_dir = config.pin_dir.join("maps");
        let links_dir = config.pin_dir.join("links");
        for dir in [&maps_dir, &links_dir] {
            fs::create_dir_all(dir).map_err(|source| DataplaneError::Bpffs { path: dir.clone(), source })?;
        }
        let cgroup = File::open(&config.cgroup)
            .map_err(|source| DataplaneError::Cgroup { path: config.cgroup.clone(), source })?;

        let map_names = [names::ENROLLED_NETNS, names::ORIG_BY_COOKIE, names::ORIG_BY_PEER, names::INBOUND_LISTENERS];
        let map_paths: Vec<PathBuf> = map_names.iter().map(|n| maps_dir.join(n)).collect();
        let mut loader = EbpfLoader::new();
        for (name, path) in map_names.iter().zip(&map_paths) {
            loader.map_pin_path(name, path.as_path());
        }
        let outbound_port = u32::from(config.outbound_port);
        let bypass_port = u32::from(config.inbound_bypass_port);
        loader
            .override_global(names::GLOBAL_PROXY_MARK, &config.proxy_mark, true)
            .override_global(names::GLOBAL_OUTBOUND_PORT, &outbound_port, true)
            .override_global(names::GLOBAL_INBOUND_BYPASS_PORT, &bypass_port, true);
        let mut ebpf = loader.load(EBPF_OBJECT)?;

        let mut status =
            DataplaneStatus { pin_dir: config.pin_dir.clone(), cgroup: config.cgroup.clone(), ..Default::default() };
        let mut links = BTreeMap::new();
        for (prog, feature, needs) in [
            (names::PROG_CONNECT4, "cgroup/connect4 programs with bpf_get_netns_cookie", "Linux 5.7"),
            (names::PROG_CONNECT6, "cgroup/connect6 programs with bpf_get_netns_cookie", "Linux 5.7"),
        ] {
            let program: &mut CgroupSockAddr = program_mut(&mut ebpf, prog)?;
            program.load().map_err(|e| unsupported(feature, needs, e))?;
            let id = program.attach(&cgroup, CgroupAttachMode::Single).map_err(|e| unsupported(feature, needs, e))?;
            let link = FdLink::try_from(program.take_link(id).map_err(|source| prog_err(prog, source))?)
                .map_err(|source| DataplaneError::Link { what: format!("{prog}: not a bpf link"), source })?;
            links.insert(prog.to_string(), pin_link(&mut status, &links_dir, prog, link)?);
        }
        {
            let (feature, needs) = ("sock_ops programs with bpf_get_netns_cookie", "Linux 5.15");
            let program: &mut SockOps = program_mut(&mut ebpf, names::PROG_SOCKOPS)?;
            program.load().map_err(|e| unsupported(feature, needs, e))?;
            let id = program.attach(&cgroup, CgroupAttachMode::Single).map_err(|e| unsupported(feature, needs, e))?;
            let link = FdLink::try_from(program.take_link(id).map_err(|s| prog_err(names::PROG_SOCKOPS, s))?)
                .map_err(|source| DataplaneError::Link { what: "sockops: not a bpf link".into(), source })?;
            links
                .insert(names::PROG_SOCKOPS.to_string(), pin_link(&mut status, &links_dir, names::PROG_SOCKOPS, link)?);
        }
        {
            let program: &mut SkLookup = program_mut(&mut ebpf, names::PROG_SK_LOOKUP)?;
            program.load().map_err(|e| unsupported("sk_lookup programs", "Linux 5.9", e))?;
        }

        let enrolled = BpfHashMap::try_from(take_map(&mut ebpf, names::ENROLLED_NETNS)?)
            .map_err(|source| DataplaneError::Map { what: names::ENROLLED_NETNS.into(), source })?;
        let inbound = SockHash::try_from(take_map(&mut ebpf, names::INBOUND_LISTENERS)?)
            .map_err(|source| DataplaneError::Map { what: names::INBOUND_LISTENERS.into(), source })?;
        let orig = BpfHashMap::try_from(take_map(&mut ebpf, names::ORIG_BY_PEER)?)
            .map_err(|source| DataplaneError::Map { what: names::ORIG_BY_PEER.into(), source })?;
        let mut dataplane = Self {
            config,
            ebpf,
            enrolled,
            inbound,
            orig_dst: std::sync::Arc::new(OrigDstTable(Mutex::new(orig))),
            links,
            status,
        };
        dataplane.probe_enrolment()?;
        info!(pin_dir = %dataplane.config.pin_dir.display(), cgroup = %dataplane.config.cgroup.display(), "eBPF programs attached");
        Ok(dataplane)
    }

    /// What enrolment needs beyond what `start` attached: an `sk_lookup` link
    /// on a network namespace and a listening socket in the sockhash. Tried
    /// at start, in a namespace of its own that no packet ever enters, so a
    /// kernel without them is named now and not at the first pod.
    fn probe_enrolment(&mut self) -> Result<(), DataplaneError> {
        let io = |what: &str| {
            let what = format!("probing enrolment in a scratch network namespace: {what}");
            move |source: io::Error| DataplaneError::Io { what, source }
        };
        // unshare moves only the calling thread; the namespace lives while
        // its file and its socket are open.
        let (netns, listener) = std::thread::spawn(|| -> io::Result<(File, std::net::TcpListener)> {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
            let netns = File::open("/proc/thread-self/ns/net")?;
            Ok((netns, std::net::TcpListener::bind(("0.0.0.0", 0))?))
        })
        .join()
        .map_err(|_| io("its thread panicked")(io::Error::other("panic")))?
        .map_err(io("creating it"))?;
        let program: &mut SkLookup = program_mut(&mut self.ebpf, names::PROG_SK_LOOKUP)?;
        let id =
            program.attach(&netns).map_err(|e| unsupported("sk_lookup links on network namespaces", "Linux 5.9", e))?;
        drop(program.take_link(id).map_err(|s| prog_err(names::PROG_SK_LOOKUP, s))?); // detached
        // No packet is addressed to 0.0.0.0, so this key steers nothing
        // while it exists; the kernel drops it anyway when the socket closes.
        let key = ip_key(IpAddr::from([0, 0, 0, 0]));
        self.inbound.insert(key, listener.as_raw_fd(), 0).map_err(|e| match e {
            MapError::SyscallError(s) if s.io_error.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                unsupported("listening sockets in SOCKHASH maps", "Linux 5.10", s)
            }
            source => DataplaneError::Map { what: "probing the inbound sockhash".into(), source },
        })?;
        let _ = self.inbound.remove(&key);
        Ok(())
    }

    pub fn orig_dst_table(&self) -> std::sync::Arc<OrigDstTable> {
        self.orig_dst.clone()
    }

    pub fn status(&self) -> DataplaneStatus {
        self.status.clone()
    }

    /// Starts steering and redirecting one pod's traffic to `inbound_listener`
    /// (its addresses first, then inbound steering, then outbound redirect, so
    /// every step finds what the one before it set up).
    pub fn enroll(
        &mut self,
        netns_path: &Path,
        netns_cookie: u64,
        addresses: &[IpAddr],
        inbound_listener: &impl AsRawFd,
    ) -> Result<(), DataplaneError> {
        for ip in addresses {
            self.inbound.insert(ip_key(*ip), inbound_listener.as_raw_fd(), 0).map_err(|e| match e {
                MapError::SyscallError(s) if s.io_error.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                    unsupported("listening sockets in SOCKHASH maps", "Linux 5.10", s)
                }
                source => DataplaneError::Map { what: format!("adding the inbound listener for {ip}"), source },
            })?;
        }
        let netns = File::open(netns_path)
            .map_err(|source| DataplaneError::Io { what: format!("opening {}", netns_path.display()), source })?;
        let program: &mut SkLookup = program_mut(&mut self.ebpf, names::PROG_SK_LOOKUP)?;
        let id = program.attach(&netns).map_err(|e| unsupported("sk_lookup programs", "Linux 5.9", e))?;
        let link = FdLink::from(program.take_link(id).map_err(|s| prog_err(names::PROG_SK_LOOKUP, s))?);
        let pin = sk_lookup_pin(netns_cookie);
        let pinned = pin_link(&mut self.status, &self.config.pin_dir.join("links"), &pin, link)?;
        self.links.insert(pin, pinned);
        self.enrolled
            .insert(netns_cookie, enroll_flags::OUTBOUND, 0)
            .map_err(|source| DataplaneError::Map { what: format!("enrolling netns cookie {netns_cookie}"), source })?;
        debug!(netns = %netns_path.display(), netns_cookie, "netns enrolled");
        Ok(())
    }

    /// Undoes [`Self::enroll`], outbound first.
    pub fn unenroll(&mut self, netns_cookie: u64, addresses: &[IpAddr]) -> Result<(), DataplaneError> {
        match self.enrolled.remove(&netns_cookie) {
            Ok(()) | Err(MapError::KeyNotFound) => {}
            Err(source) => {
                return Err(DataplaneError::Map { what: format!("unenrolling netns cookie {netns_cookie}"), source });
            }
        }
        let pin = sk_lookup_pin(netns_cookie);
        self.remove_link(&pin);
        for ip in addresses {
            let _ = self.inbound.remove(&ip_key(*ip));
        }
        Ok(())
    }

    /// Forgets every enrolled namespace not in `keep`: what a previous agent
    /// enrolled and this one did not restore (the pod went away meanwhile).
    pub fn retain(&mut self, keep: &HashSet<u64>) {
        let stale: Vec<u64> = self.enrolled.keys().filter_map(Result::ok).filter(|c| !keep.contains(c)).collect();
        for cookie in stale {
            warn!(netns_cookie = cookie, "removing a namespace enrolled by an earlier agent that was not restored");
            let _ = self.enrolled.remove(&cookie);
        }
        let links_dir = self.config.pin_dir.join("links");
        if let Ok(entries) = fs::read_dir(&links_dir) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let Some(cookie) = name.strip_prefix("sk_lookup-").and_then(|c| c.parse::<u64>().ok()) else {
                    continue;
                };
                if !keep.contains(&cookie)
                    && !self.links.contains_key(&name)
                    && let Ok(old) = PinnedLink::from_pin(entry.path())
                {
                    let _ = old.unpin();
                }
            }
        }
    }

    /// Detaches everything and removes every pin: nothing of this agent stays in the kernel.
    /// The maps' pins go too; the maps themselves live until the agent exits.
    pub fn cleanup(&mut self) -> Result<(), DataplaneError> {
        for name in self.links.keys().cloned().collect::<Vec<String>>() {
            self.remove_link(&name);
        }
        let dir = self.config.pin_dir.clone();
        fs::remove_dir_all(&dir)
            .or_else(|e| if e.kind() == io::ErrorKind::NotFound { Ok(()) } else { Err(e) })
            .map_err(|source| DataplaneError::Io { what: format!("removing {}", dir.display()), source })?;
        if let Some(parent) = dir.parent() {
            let _ = fs::remove_dir(parent); // only if no other instance is left
        }
        info!(pin_dir = %dir.display(), "eBPF programs detached and pins removed");
        Ok(())
    }

    fn remove_link(&mut self, name: &str) {
        self.status.links.remove(name);
        if let Some(link) = self.links.remove(name)
            && let Err(e) = link.unpin()
        {
            warn!(link = name, error = %e, "could not unpin link");
        }
    }
}

fn ensure_bpffs(path: &Path) -> Result<(), DataplaneError> {
    let is_bpffs = nix::sys::statfs::statfs(path).map(|s| s.filesystem_type().0 == BPF_FS_MAGIC).unwrap_or(false);
    if is_bpffs {
        return Ok(());
    }
    fs::create_dir_all(path).map_err(|source| DataplaneError::Bpffs { path: path.into(), source })?;
    nix::mount::mount(Some("bpf"), path, Some("bpf"), nix::mount::MsFlags::empty(), None::<&str>)
        .map_err(|e| DataplaneError::Bpffs { path: path.into(), source: io::Error::from(e) })?;
    info!(path = %path.display(), "mounted bpffs");
    Ok(())
}

/// Pins `link` at `dir/name`, replacing (and so detaching) whatever an earlier
/// agent pinned there. The new link is attached before the old one goes.
fn replace_pinned(dir: &Path, name: &str, link: FdLink) -> Result<PinnedLink, DataplaneError> {
    let path = dir.join(name);
    if path.exists() {
        match PinnedLink::from_pin(&path) {
            Ok(old) => {
                debug!(link = name, "replacing the link pinned by an earlier agent");
                let _ = old.unpin();
            }
            Err(_) => {
                let _ = fs::remove_file(&path);
            }
        }
    }
    link.pin(&path).map_err(|e| DataplaneError::Io {
        what: format!("pinning {}", path.display()),
        source: io::Error::other(e.to_string()),
    })
}

/// Pins `link` (see [`replace_pinned`]) and records its ids for the status dump.
fn pin_link(status: &mut DataplaneStatus, dir: &Path, name: &str, link: FdLink) -> Result<PinnedLink, DataplaneError> {
    if let Ok(info) = link.info() {
        status.links.insert(name.to_string(), info.id());
        let program = name.split('-').next().unwrap_or(name);
        let program = if program == "sk_lookup" { names::PROG_SK_LOOKUP } else { program };
        status.programs.insert(program.to_string(), info.program_id());
    }
    replace_pinned(dir, name, link)
}

fn sk_lookup_pin(netns_cookie: u64) -> String {
    format!("sk_lookup-{netns_cookie}")
}

fn ip_key(ip: IpAddr) -> IpKey {
    match ip {
        IpAddr::V4(v4) => IpKey::v4(u32::from_ne_bytes(v4.octets())),
        IpAddr::V6(v6) => {
            let o = v6.octets();
            let word = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            IpKey::v6([word(0), word(4), word(8), word(12)]).canonical()
        }
    }
}

fn ip_from_key(key: &IpKey) -> IpAddr {
    if key.family == mesh_common::AF_INET {
        IpAddr::from(key.addr[0].to_ne_bytes())
    } else {
        let mut o = [0u8; 16];
        for (i, w) in key.addr.iter().enumerate() {
            o[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
        }
        IpAddr::from(o)
    }
}

fn program_mut<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut T, DataplaneError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    let program = ebpf.program_mut(name).ok_or_else(|| DataplaneError::Program {
        what: format!("program {name} missing from the eBPF object"),
        source: ProgramError::UnexpectedProgramType,
    })?;
    program.try_into().map_err(|source| prog_err(name, source))
}

fn take_map(ebpf: &mut Ebpf, name: &str) -> Result<aya::maps::Map, DataplaneError> {
    ebpf.take_map(name).ok_or_else(|| DataplaneError::Map {
        what: format!("map {name} missing from the eBPF object"),
        source: MapError::InvalidName { name: name.into() },
    })
}

fn prog_err(name: &str, source: ProgramError) -> DataplaneError {
    DataplaneError::Program { what: name.to_string(), source }
}

/// A failure to load or attach a program: the kernel lacks the feature, unless
/// the error says the agent lacks the privilege.
fn unsupported(feature: &'static str, needs: &'static str, e: impl std::fmt::Display) -> DataplaneError {
    let detail = e.to_string();
    if detail.contains("Operation not permitted") || detail.contains("Permission denied") {
        return DataplaneError::Io {
            what: format!("loading {feature}: run mesh-node as root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN)"),
            source: io::Error::from(io::ErrorKind::PermissionDenied),
        };
    }
    DataplaneError::Unsupported { feature, needs, detail }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_failures_name_the_missing_feature_or_the_missing_privilege() {
        let cases = [
            ("the BPF_PROG_LOAD syscall failed. Verifier output: unknown func bpf_get_netns_cookie#122", true),
            ("`bpf_link_create` failed: Invalid argument (os error 22)", true),
            ("the BPF_PROG_LOAD syscall failed: Operation not permitted (os error 1)", false),
            ("open: Permission denied (os error 13)", false),
        ];
        for (detail, is_unsupported) in cases {
            let e = unsupported("sk_lookup programs", "Linux 5.9", detail);
            assert_eq!(matches!(e, DataplaneError::Unsupported { .. }), is_unsupported, "{detail}");
            let text = e.to_string();
            if is_unsupported {
                assert!(text.contains("lacks sk_lookup programs (needs Linux 5.9)") && text.contains(detail), "{text}");
            } else {
                assert!(text.contains("run mesh-node as root"), "{text}");
            }
        }
    }

    #[test]
    fn ip_keys_round_trip_and_match_the_kernel_layout() {
        for ip in ["10.1.2.3", "fd00::7", "::1", "127.0.0.1"] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(ip_from_key(&ip_key(ip)), ip);
        }
        // The kernel stores 10.1.2.3 as bytes 0a 01 02 03 in memory.
        assert_eq!(ip_key("10.1.2.3".parse().unwrap()).addr[0].to_ne_bytes(), [10, 1, 2, 3]);
        // A v4-mapped address keys the same as the IPv4 address.
        assert_eq!(ip_key("::ffff:10.1.2.3".parse().unwrap()), ip_key("10.1.2.3".parse().unwrap()));
    }
}
