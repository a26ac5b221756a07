//! Network namespaces. Sockets are created inside an enrolled pod's namespace
//! by the calling thread itself: it enters the namespace (`setns`), creates
//! the socket and returns to the process's own namespace, as ztunnel does. A
//! socket keeps the namespace it was created in, so once made it is used from
//! any tokio thread. Entering and leaving costs ~3.4 us here; the hop to a
//! worker thread living in the namespace, which this replaced, cost a thread
//! wake-up each way on every new connection.
use std::{
    fs::File,
    io,
    net::{IpAddr, SocketAddr},
    os::fd::AsFd as _,
    path::{Path, PathBuf},
    sync::OnceLock,
};

use nix::sched::{CloneFlags, setns};
use socket2::{Domain, Protocol, Socket, Type};

/// `SO_NETNS_COOKIE` (Linux 5.14): the namespace's cookie, as BPF programs see it.
const SO_NETNS_COOKIE: libc::c_int = 71;

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("cannot open network namespace {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("cannot enter network namespace {path}: {source}")]
    Enter { path: PathBuf, source: nix::Error },
    #[error("network namespace {path}: {what}: {source}")]
    Io { path: PathBuf, what: &'static str, source: io::Error },
}

/// An open network namespace.
#[derive(Debug)]
pub struct Netns {
    path: PathBuf,
    cookie: u64,
    file: File,
}

/// The process's own namespace, which every thread returns to.
fn home() -> Result<&'static File, NetnsError> {
    static HOME: OnceLock<File> = OnceLock::new();
    if let Some(f) = HOME.get() {
        return Ok(f);
    }
    // Opened by a thread that is at home: no thread is ever elsewhere
    // outside `Netns::run`, which does not nest.
    let path = Path::new("/proc/thread-self/ns/net");
    let file = File::open(path).map_err(|source| NetnsError::Open { path: path.into(), source })?;
    Ok(HOME.get_or_init(|| file))
}

/// Brings the thread home when dropped, even if the work inside panicked.
struct Visit;

impl Drop for Visit {
    fn drop(&mut self) {
        let home = home().expect("the home namespace was opened before leaving it");
        if let Err(e) = setns(home.as_fd(), CloneFlags::CLONE_NEWNET) {
            // A runtime thread stranded in a pod's namespace would open
            // every later socket there: stopping is the only safe answer.
            eprintln!("mesh-node: cannot return to the node's network namespace ({e}); aborting");
            std::process::abort();
        }
    }
}

impl Netns {
    /// Opens the namespace at `path` (`/run/netns/NAME` or `/proc/PID/ns/net`).
    pub fn open(path: &Path) -> Result<Self, NetnsError> {
        let file = File::open(path).map_err(|source| NetnsError::Open { path: path.into(), source })?;
        let mut netns = Self { path: path.into(), cookie: 0, file };
        netns.cookie = netns.run(netns_cookie)?.map_err(|source| NetnsError::Io {
            path: path.into(),
            what: "reading its cookie (SO_NETNS_COOKIE needs Linux 5.14)",
            source,
        })?;
        Ok(netns)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The namespace's cookie: the key of the `ENROLLED_NETNS` map.
    pub fn cookie(&self) -> u64 {
        self.cookie
    }

    /// Runs `f` inside the namespace, on the calling thread. `f` must not
    /// block or await: the thread is away from home until it returns.
    pub fn run<R>(&self, f: impl FnOnce() -> R) -> Result<R, NetnsError> {
        home()?;
        setns(self.file.as_fd(), CloneFlags::CLONE_NEWNET)
            .map_err(|source| NetnsError::Enter { path: self.path.clone(), source })?;
        let _back = Visit;
        Ok(f())
    }

    /// A TCP socket of the namespace for `peer`'s family, carrying `mark`.
    pub fn tcp_socket(&self, peer: SocketAddr, mark: u32) -> Result<tokio::net::TcpSocket, NetnsError> {
        let socket = self
            .run(move || -> io::Result<Socket> {
                let socket =
                    Socket::new(Domain::for_address(peer), Type::STREAM.nonblocking().cloexec(), Some(Protocol::TCP))?;
                socket.set_mark(mark)?;
                socket.set_tcp_nodelay(true)?;
                Ok(socket)
            })?
            .map_err(|source| NetnsError::Io { path: self.path.clone(), what: "creating a socket", source })?;
        let std: std::net::TcpStream = socket.into();
        Ok(tokio::net::TcpSocket::from_std_stream(std))
    }

    /// A listening TCP socket of the namespace bound to `addr`. An unspecified
    /// IPv6 address makes a dual-stack listener.
    pub fn listen(&self, addr: SocketAddr) -> Result<std::net::TcpListener, NetnsError> {
        self.run(move || -> io::Result<std::net::TcpListener> {
            let socket = Socket::new(Domain::for_address(addr), Type::STREAM.cloexec(), Some(Protocol::TCP))?;
            socket.set_reuse_address(true)?;
            if addr.is_ipv6() {
                socket.set_only_v6(!addr.ip().is_unspecified())?;
            }
            socket.bind(&addr.into())?;
            socket.listen(1024)?;
            socket.set_nonblocking(true)?;
            Ok(socket.into())
        })?
        .map_err(|source| NetnsError::Io { path: self.path.clone(), what: "binding a listener", source })
    }

    /// The namespace's own addresses: every address on an interface that is up,
    /// except loopback and IPv6 link-local.
    pub fn addresses(&self) -> Result<Vec<IpAddr>, NetnsError> {
        self.run(|| -> io::Result<Vec<IpAddr>> {
            let mut out = Vec::new();
            for ifa in nix::ifaddrs::getifaddrs().map_err(io::Error::from)? {
                let Some(addr) = ifa.address else { continue };
                let ip = if let Some(v4) = addr.as_sockaddr_in() {
                    IpAddr::V4(v4.ip())
                } else if let Some(v6) = addr.as_sockaddr_in6() {
                    IpAddr::V6(v6.ip())
                } else {
                    continue;
                };
                let link_local = matches!(ip, IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80);
                if !ip.is_loopback() && !link_local && !out.contains(&ip) {
                    out.push(ip);
                }
            }
            Ok(out)
        })?
        .map_err(|source| NetnsError::Io { path: self.path.clone(), what: "listing addresses", source })
    }
}

/// The cookie of the calling thread's network namespace.
fn netns_cookie() -> io::Result<u64> {
    let socket = Socket::new(Domain::IPV4, Type::DGRAM.cloexec(), None)?;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: the buffer is a valid u64 with its length passed alongside.
    let rc = unsafe {
        libc::getsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&socket),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}
