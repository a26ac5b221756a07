//! Network namespaces: a worker thread lives inside each enrolled pod's
//! namespace and creates sockets there on request. A socket keeps the namespace
//! it was created in, so once made it is used from any tokio thread.
use std::{
    fs::File,
    io,
    net::{IpAddr, SocketAddr},
    os::fd::AsFd as _,
    path::{Path, PathBuf},
    sync::mpsc,
    thread,
};

use nix::sched::{CloneFlags, setns};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::sync::oneshot;

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
    #[error("the worker thread of network namespace {0} has stopped")]
    WorkerGone(PathBuf),
}

type Job = Box<dyn FnOnce() + Send>;

/// A network namespace with a worker thread inside it.
#[derive(Debug)]
pub struct Netns {
    path: PathBuf,
    cookie: u64,
    jobs: mpsc::Sender<Job>,
}

impl Netns {
    /// Opens the namespace at `path` (`/run/netns/NAME` or `/proc/PID/ns/net`)
    /// and starts its worker thread.
    pub fn open(path: &Path) -> Result<Self, NetnsError> {
        let file = File::open(path).map_err(|source| NetnsError::Open { path: path.into(), source })?;
        let (jobs, rx) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = mpsc::channel();
        let thread_path = path.to_path_buf();
        thread::Builder::new()
            .name(format!("netns:{}", path.display()))
            .spawn(move || {
                // setns affects only this thread: the rest of the process stays put.
                if let Err(source) = setns(file.as_fd(), CloneFlags::CLONE_NEWNET) {
                    let _ = ready_tx.send(Err(NetnsError::Enter { path: thread_path, source }));
                    return;
                }
                let _ = ready_tx.send(netns_cookie().map_err(|source| NetnsError::Io {
                    path: thread_path,
                    what: "reading its cookie (SO_NETNS_COOKIE needs Linux 5.14)",
                    source,
                }));
                while let Ok(job) = rx.recv() {
                    job();
                }
            })
            .map_err(|source| NetnsError::Io { path: path.into(), what: "spawning its worker", source })?;
        let cookie = ready_rx.recv().map_err(|_| NetnsError::WorkerGone(path.into()))??;
        Ok(Self { path: path.into(), cookie, jobs })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The namespace's cookie: the key of the `ENROLLED_NETNS` map.
    pub fn cookie(&self) -> u64 {
        self.cookie
    }

    /// Runs `f` inside the namespace, on its worker thread.
    pub fn run_blocking<R: Send + 'static>(&self, f: impl FnOnce() -> R + Send + 'static) -> Result<R, NetnsError> {
        let (tx, rx) = mpsc::channel();
        self.jobs
            .send(Box::new(move || {
                let _ = tx.send(f());
            }))
            .map_err(|_| NetnsError::WorkerGone(self.path.clone()))?;
        rx.recv().map_err(|_| NetnsError::WorkerGone(self.path.clone()))
    }

    /// Runs `f` inside the namespace without blocking the async runtime.
    pub async fn run<R: Send + 'static>(&self, f: impl FnOnce() -> R + Send + 'static) -> Result<R, NetnsError> {
        let (tx, rx) = oneshot::channel();
        self.jobs
            .send(Box::new(move || {
                let _ = tx.send(f());
            }))
            .map_err(|_| NetnsError::WorkerGone(self.path.clone()))?;
        rx.await.map_err(|_| NetnsError::WorkerGone(self.path.clone()))
    }

    /// A TCP socket of the namespace for `peer`'s family, carrying `mark`.
    pub async fn tcp_socket(&self, peer: SocketAddr, mark: u32) -> Result<tokio::net::TcpSocket, NetnsError> {
        let socket = self
            .run(move || -> io::Result<Socket> {
                let socket =
                    Socket::new(Domain::for_address(peer), Type::STREAM.nonblocking().cloexec(), Some(Protocol::TCP))?;
                socket.set_mark(mark)?;
                socket.set_tcp_nodelay(true)?;
                Ok(socket)
            })
            .await?
            .map_err(|source| NetnsError::Io { path: self.path.clone(), what: "creating a socket", source })?;
        let std: std::net::TcpStream = socket.into();
        Ok(tokio::net::TcpSocket::from_std_stream(std))
    }

    /// A listening TCP socket of the namespace bound to `addr`. An unspecified
    /// IPv6 address makes a dual-stack listener.
    pub fn listen(&self, addr: SocketAddr) -> Result<std::net::TcpListener, NetnsError> {
        self.run_blocking(move || -> io::Result<std::net::TcpListener> {
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
        self.run_blocking(|| -> io::Result<Vec<IpAddr>> {
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
