//! Relaying between two sockets of this process without copying the bytes
//! through user space: `splice(2)` moves them from one socket into a pipe
//! and from the pipe into the other, page references instead of copies (on
//! the same-node path both sockets are local, so the pages the app wrote are
//! the pages the other app reads). Profiled, the same-node path spent a
//! third of its time in the two copies a `read` and a `write` make.
//!
//! A pipe is held only while a chunk is in it: taken from a shared stock
//! when the source is readable, given back once the destination has taken
//! every byte. An idle connection holds none, so the descriptors a
//! connection may use stay within the limits' budget (two per connection).
//! Where no pipe can be had (the process is out of descriptors), the chunk
//! goes through a buffer instead.
use std::{
    io,
    net::Shutdown,
    os::fd::{AsRawFd, FromRawFd as _, OwnedFd, RawFd},
    sync::Mutex,
};

use mesh_proxy::{relay::MAX_READ, telemetry::Counted};
use tokio::{io::Interest, net::TcpStream};

/// The most bytes one chunk carries (the pipe's capacity).
const PIPE_SIZE: usize = 256 << 10;
/// Empty pipes kept for reuse; more are made when needed and closed after.
const STOCK: usize = 64;

static PIPES: Mutex<Vec<Pipe>> = Mutex::new(Vec::new());

/// An empty pipe (both ends non-blocking) while not in use.
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    fn take() -> io::Result<Pipe> {
        if let Some(p) = PIPES.lock().unwrap_or_else(|e| e.into_inner()).pop() {
            return Ok(p);
        }
        let mut fds = [0 as RawFd; 2];
        // SAFETY: `fds` is a valid array of two descriptors for pipe2 to fill.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded: both are open descriptors owned by nobody else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // Larger than the default 64 KiB, so a bulk chunk is one splice each
        // way; where the system refuses, the default does.
        // SAFETY: F_SETPIPE_SZ takes an int and touches no memory of ours.
        unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_SIZE as libc::c_int) };
        Ok(Pipe { read, write })
    }

    /// Gives back a drained pipe.
    fn give_back(self) {
        let mut stock = PIPES.lock().unwrap_or_else(|e| e.into_inner());
        if stock.len() < STOCK {
            stock.push(self);
        }
    }
}

fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    let flags = libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK;
    // SAFETY: no offsets (both are pipes or sockets); the kernel checks the descriptors.
    let n = unsafe { libc::splice(from, std::ptr::null_mut(), to, std::ptr::null_mut(), len, flags) };
    if n < 0 { Err(io::Error::last_os_error()) } else { Ok(n as usize) }
}

/// Relays both ways between `a` and `b` until both directions have ended,
/// counting as the streams' own reads and writes would; returns the bytes
/// (a → b, b → a).
pub async fn both_ways(a: &Counted<TcpStream>, b: &Counted<TcpStream>) -> io::Result<(u64, u64)> {
    tokio::try_join!(one_way(a, b), one_way(b, a))
}

/// Moves `from`'s bytes to `to` until `from` ends, then half-closes `to`.
async fn one_way(from: &Counted<TcpStream>, to: &Counted<TcpStream>) -> io::Result<u64> {
    let (src, dst) = (from.get_ref(), to.get_ref());
    let mut total = 0u64;
    loop {
        src.readable().await?;
        let Ok(pipe) = Pipe::take() else {
            // Out of descriptors: this chunk through a buffer.
            match copy_chunk(src, dst).await? {
                0 => break,
                n => {
                    from.count_read(n);
                    to.count_written(n);
                    total += n as u64;
                    continue;
                }
            }
        };
        let n = match src.try_io(Interest::READABLE, || splice(src.as_raw_fd(), pipe.write.as_raw_fd(), PIPE_SIZE)) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                pipe.give_back();
                continue;
            }
            Err(e) => return Err(e),
        };
        if n == 0 {
            pipe.give_back();
            break;
        }
        from.count_read(n);
        let mut left = n;
        while left > 0 {
            dst.writable().await?;
            match dst.try_io(Interest::WRITABLE, || splice(pipe.read.as_raw_fd(), dst.as_raw_fd(), left)) {
                Ok(m) => {
                    left -= m;
                    to.count_written(m);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // The pipe may hold bytes nobody will take: it is closed, not reused.
                Err(e) => return Err(e),
            }
        }
        pipe.give_back();
        total += n as u64;
    }
    socket2::SockRef::from(dst).shutdown(Shutdown::Write).or_else(not_connected_is_done)?;
    Ok(total)
}

/// One read's worth from `src` written whole to `dst`; 0 at the end.
async fn copy_chunk(src: &TcpStream, dst: &TcpStream) -> io::Result<usize> {
    let mut buf = vec![0u8; MAX_READ];
    let n = loop {
        match src.try_read(&mut buf) {
            Ok(n) => break n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => src.readable().await?,
            Err(e) => return Err(e),
        }
    };
    let mut sent = 0;
    while sent < n {
        match dst.try_write(&buf[sent..n]) {
            Ok(m) => sent += m,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => dst.writable().await?,
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// A peer that already closed both ways has nothing to half-close.
fn not_connected_is_done(e: io::Error) -> io::Result<()> {
    if e.kind() == io::ErrorKind::NotConnected { Ok(()) } else { Err(e) }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, atomic::Ordering};

    use mesh_proxy::telemetry::Bytes;
    use tokio::{
        io::{AsyncReadExt as _, AsyncWriteExt as _},
        net::TcpListener,
    };

    use super::*;

    /// Two connected loopback sockets.
    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (a, b) = tokio::join!(TcpStream::connect(l.local_addr().unwrap()), l.accept());
        (a.unwrap(), b.unwrap().0)
    }

    /// Bulk one way with a half-close, an answer the other way after it:
    /// every byte arrives, in order, and both records count them as the
    /// copying relay would.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn splices_both_ways_counts_and_half_closes() {
        let ((mut client, proxy_a), (proxy_b, mut server)) = (pair().await, pair().await);
        let (src_record, dst_record) = (Arc::new(Bytes::default()), Arc::new(Bytes::default()));
        let a = Counted::client(proxy_a, src_record.clone());
        let b = Counted::server(proxy_b, dst_record.clone());
        let relay = tokio::spawn(async move { both_ways(&a, &b).await });
        let up: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let sent = up.clone();
        let sending = tokio::spawn(async move {
            client.write_all(&sent).await.unwrap();
            client.shutdown().await.unwrap();
            let mut back = Vec::new();
            client.read_to_end(&mut back).await.unwrap();
            back
        });
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert!(got == up, "all {} bytes in order, then the half-close (got {})", up.len(), got.len());
        server.write_all(&[9u8; 1000]).await.unwrap();
        server.shutdown().await.unwrap();
        assert_eq!(sending.await.unwrap(), vec![9u8; 1000]);
        assert_eq!(relay.await.unwrap().unwrap(), (3_000_000, 1000));
        for (what, r) in [("source", &src_record), ("destination", &dst_record)] {
            let counts = (r.received.load(Ordering::Relaxed), r.sent.load(Ordering::Relaxed));
            assert_eq!(counts, (3_000_000, 1000), "{what}'s record: (received, sent)");
        }
        assert!(!PIPES.lock().unwrap().is_empty(), "drained pipes went back to the stock");
    }
}
