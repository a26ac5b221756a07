//! Hitless upgrade: a new agent of the same instance, started beside the
//! running one, takes its pods' listening sockets over a Unix socket
//! (`<state-dir>/<instance>/handoff.sock`, SOCK_SEQPACKET, SCM_RIGHTS), so
//! the sockets the kernel steers connections to never close: no connection
//! is refused while agents change, and nothing waits in a closed backlog.
//!
//! The exchange, one message each:
//! 1. new → old `take`; old → new one message per pod (its spec as JSON and
//!    its listeners' descriptors: outbound v4[, v6], inbound, HBONE), then `end`.
//!    From then on the old agent changes nothing (its pods' task refuses
//!    every command), so the two never both enrol or release a pod.
//! 2. new → old `accepting` once its accept loops run; the old agent stops
//!    accepting, closes its admin, readiness and metrics ports, answers
//!    `released`, and drains its open connections as on SIGTERM.
//! 3. The new agent binds those ports and serves.
use std::{
    io::{IoSlice, IoSliceMut},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
    path::Path,
    time::Duration,
};

use mesh_common::admin::PodSpec;
use nix::sys::socket::{
    self, AddressFamily, Backlog, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType, UnixAddr,
};
use serde::{Deserialize, Serialize};

pub const SOCKET: &str = "handoff.sock";
/// Descriptors per pod: outbound v4 and v6, inbound, HBONE.
const MAX_FDS: usize = 4;
const MAX_MESSAGE: usize = 64 * 1024;

/// A pod's listeners, as descriptors, and how many of them are outbound.
pub struct HandedPod {
    pub spec: PodSpec,
    pub outbound: usize,
    pub fds: Vec<OwnedFd>,
}

#[derive(Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum Message {
    Take,
    Pod { spec: PodSpec, outbound: usize },
    End,
    Accepting,
    Released,
}

fn io(e: nix::Error) -> std::io::Error {
    std::io::Error::from(e)
}

fn seqpacket() -> std::io::Result<OwnedFd> {
    socket::socket(AddressFamily::Unix, SockType::SeqPacket, SockFlag::SOCK_CLOEXEC, None).map_err(io)
}

fn send(fd: RawFd, message: &Message, fds: &[RawFd]) -> std::io::Result<()> {
    let bytes = serde_json::to_vec(message).map_err(std::io::Error::other)?;
    let rights = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &rights };
    socket::sendmsg::<UnixAddr>(fd, &[IoSlice::new(&bytes)], cmsgs, MsgFlags::empty(), None).map_err(io)?;
    Ok(())
}

fn receive(fd: RawFd) -> std::io::Result<(Message, Vec<OwnedFd>)> {
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut space = nix::cmsg_space!([RawFd; MAX_FDS]);
    let (len, fds) = {
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg =
            socket::recvmsg::<UnixAddr>(fd, &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC).map_err(io)?;
        let mut fds = Vec::new();
        for cmsg in msg.cmsgs().map_err(io)? {
            if let ControlMessageOwned::ScmRights(raw) = cmsg {
                // SAFETY: the kernel just installed these descriptors in this
                // process for us; nothing else owns them.
                fds.extend(raw.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
            }
        }
        (msg.bytes, fds)
    };
    if len == 0 {
        return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "the other agent went away"));
    }
    let message = serde_json::from_slice(&buf[..len]).map_err(std::io::Error::other)?;
    Ok((message, fds))
}

fn unexpected(what: &str) -> std::io::Error {
    std::io::Error::other(format!("handoff: unexpected message ({what})"))
}

/// The new agent's side, connected to the running one.
pub struct Takeover {
    conn: OwnedFd,
    pub pods: Vec<HandedPod>,
}

/// Asks the agent running in `state_dir` for its listeners. `None` when no
/// agent answers there (none runs, or it predates handoff): a plain start.
pub fn take_over(state_dir: &Path) -> std::io::Result<Option<Takeover>> {
    let path = state_dir.join(SOCKET);
    if !path.exists() {
        return Ok(None);
    }
    let conn = seqpacket()?;
    match socket::connect(conn.as_raw_fd(), &UnixAddr::new(&path).map_err(io)?) {
        Ok(()) => {}
        Err(nix::Error::ECONNREFUSED | nix::Error::ENOENT) => return Ok(None),
        Err(e) => return Err(io(e)),
    }
    let timeout = socket::sockopt::ReceiveTimeout;
    socket::setsockopt(&conn, timeout, &nix::sys::time::TimeVal::new(10, 0)).map_err(io)?;
    send(conn.as_raw_fd(), &Message::Take, &[])?;
    let mut pods = Vec::new();
    loop {
        match receive(conn.as_raw_fd())? {
            (Message::Pod { spec, outbound }, fds) if fds.len() == outbound + 2 => {
                pods.push(HandedPod { spec, outbound, fds })
            }
            (Message::End, _) => break,
            _ => return Err(unexpected("a pod's listeners")),
        }
    }
    Ok(Some(Takeover { conn, pods }))
}

impl Takeover {
    /// Tells the old agent this one accepts; returns once it has released
    /// its ports (or after `wait`, when it does not say).
    pub fn accepting(self, wait: Duration) -> std::io::Result<()> {
        let secs = wait.as_secs().max(1) as i64;
        socket::setsockopt(&self.conn, socket::sockopt::ReceiveTimeout, &nix::sys::time::TimeVal::new(secs, 0))
            .map_err(io)?;
        send(self.conn.as_raw_fd(), &Message::Accepting, &[])?;
        match receive(self.conn.as_raw_fd())? {
            (Message::Released, _) => Ok(()),
            _ => Err(unexpected("released")),
        }
    }
}

/// The running agent's side: a listening socket in its state directory.
pub struct Offer {
    listener: OwnedFd,
}

/// One takeover in progress, on the running agent's side.
pub struct Request {
    conn: OwnedFd,
}

impl Offer {
    /// Listens at `state_dir/handoff.sock` (mode 0600: root's only).
    pub fn listen(state_dir: &Path) -> std::io::Result<Offer> {
        let path = state_dir.join(SOCKET);
        let _ = std::fs::remove_file(&path);
        let listener = seqpacket()?;
        socket::bind(listener.as_raw_fd(), &UnixAddr::new(&path).map_err(io)?).map_err(io)?;
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
        socket::listen(&listener, Backlog::new(4).map_err(io)?).map_err(io)?;
        Ok(Offer { listener })
    }

    /// Waits (blocking) for a new agent asking to take over.
    pub fn next(&self) -> std::io::Result<Request> {
        loop {
            let fd = socket::accept(self.listener.as_raw_fd()).map_err(io)?;
            // SAFETY: accept just returned this descriptor; we own it.
            let conn = unsafe { OwnedFd::from_raw_fd(fd) };
            match receive(conn.as_raw_fd()) {
                Ok((Message::Take, _)) => return Ok(Request { conn }),
                _ => continue,
            }
        }
    }
}

impl Request {
    /// Sends every pod's listeners, then waits (blocking) until the new
    /// agent accepts on them.
    pub fn hand_over(&self, pods: &[HandedPod]) -> std::io::Result<()> {
        for pod in pods {
            let raw: Vec<RawFd> = pod.fds.iter().map(|f| f.as_raw_fd()).collect();
            send(self.conn.as_raw_fd(), &Message::Pod { spec: pod.spec.clone(), outbound: pod.outbound }, &raw)?;
        }
        send(self.conn.as_raw_fd(), &Message::End, &[])?;
        match receive(self.conn.as_raw_fd())? {
            (Message::Accepting, _) => Ok(()),
            _ => Err(unexpected("accepting")),
        }
    }

    /// Tells the new agent the ports are free.
    pub fn released(&self) -> std::io::Result<()> {
        send(self.conn.as_raw_fd(), &Message::Released, &[])
    }
}

/// Offers this agent's listeners at `state_dir/handoff.sock`: each new agent
/// asking arrives on the returned channel. Without the socket (it could not
/// be created) no upgrade is offered, and the agent says so.
pub fn offer(state_dir: &Path) -> tokio::sync::mpsc::Receiver<Request> {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    match Offer::listen(state_dir) {
        Ok(offer) => {
            std::thread::Builder::new()
                .name("handoff".into())
                .spawn(move || {
                    while let Ok(request) = offer.next() {
                        if tx.blocking_send(request).is_err() {
                            break;
                        }
                    }
                })
                .map_err(|e| tracing::warn!(error = %e, "no handoff thread: upgrades restart"))
                .ok();
        }
        Err(e) => tracing::warn!(error = %e, "cannot offer a handoff: an upgrade will be a restart"),
    }
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A listener handed over is the same socket: a client connected before
    /// the handoff is accepted on the other side.
    #[test]
    fn listeners_cross_with_their_backlog() {
        let dir = std::env::temp_dir().join(format!("mesh-handoff-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert!(take_over(&dir).unwrap().is_none(), "no agent: a plain start");
        let offer = Offer::listen(&dir).unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let waiting = std::net::TcpStream::connect(addr).unwrap();
        let spec = PodSpec { name: "shop/a".into(), netns: "/run/netns/a".into() };
        let handed = HandedPod {
            spec: spec.clone(),
            outbound: 1,
            fds: (0..3).map(|_| OwnedFd::from(listener.try_clone().unwrap())).collect(),
        };
        let old = std::thread::spawn(move || {
            let request = offer.next().unwrap();
            request.hand_over(&[handed]).unwrap();
            request.released().unwrap();
        });
        let takeover = take_over(&dir).unwrap().expect("the running agent answers");
        assert_eq!(takeover.pods.len(), 1);
        assert_eq!(takeover.pods[0].spec, spec);
        let fd = takeover.pods[0].fds.first().unwrap().try_clone().unwrap();
        let taken = std::net::TcpListener::from(fd);
        assert_eq!(taken.local_addr().unwrap(), addr);
        let (accepted, _) = taken.accept().unwrap();
        assert_eq!(accepted.peer_addr().unwrap(), waiting.local_addr().unwrap());
        takeover.accepting(Duration::from_secs(5)).unwrap();
        old.join().unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
