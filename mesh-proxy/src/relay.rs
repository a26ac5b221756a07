//! Moving bytes between two sockets, with read buffers sized by what the
//! stream does: a connection that waits holds a small buffer, and only a
//! bulk stream (reads that fill their buffers) gets large ones. tokio's
//! `copy_bidirectional` keeps one fixed buffer per direction for the
//! connection's life: 64 KiB each (what a two-hop iperf3 stream needs: 8 KiB
//! held it to half the throughput), resident from the first bulk transfer on
//! even while the connection then sits idle for hours.
use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, ReadBuf};

/// The buffer of a read that is likely to wait, and where bulk streams start.
pub const MIN_READ: usize = 4 << 10;
/// The largest read buffer, reached by doubling while reads fill theirs.
pub const MAX_READ: usize = 64 << 10;

/// The size of each read's buffer (pure). A read that fills its buffer says
/// more is waiting: the next read gets the stream's bulk size, which doubles
/// (to [`MAX_READ`]) each time a read of that size fills too. A read that
/// does not fill its buffer drained the socket, so the next one will likely
/// wait for data: it gets [`MIN_READ`], which is all an idle connection holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadSizer {
    bulk: usize,
    next: usize,
}

impl Default for ReadSizer {
    fn default() -> Self {
        ReadSizer { bulk: MIN_READ, next: MIN_READ }
    }
}

impl ReadSizer {
    /// The buffer size for the next read.
    pub fn next(&self) -> usize {
        self.next
    }

    /// Records that the last read (of a buffer of [`Self::next`]) got `n` bytes.
    pub fn read(&mut self, n: usize) {
        if n < self.next {
            self.next = MIN_READ;
            return;
        }
        if self.next == self.bulk {
            self.bulk = (self.bulk * 2).min(MAX_READ);
        }
        self.next = self.bulk;
    }
}

/// A stream that can wait until it has something to read before a buffer
/// is offered, so that an idle connection holds no read buffer (4 KiB a
/// direction, the largest part of what an idle connection cost).
pub trait ReadReady {
    /// Whether [`Self::poll_read_ready`] can pend: false for a stream that
    /// cannot tell, which then reads into a buffer at once.
    const TELLS: bool = true;
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
}

impl ReadReady for tokio::net::TcpStream {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        tokio::net::TcpStream::poll_read_ready(self, cx)
    }
}

impl<S: ReadReady + ?Sized> ReadReady for &mut S {
    const TELLS: bool = S::TELLS;
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        (**self).poll_read_ready(cx)
    }
}

/// In-memory pipes cannot tell: they read at once.
impl ReadReady for tokio::io::DuplexStream {
    const TELLS: bool = false;
    fn poll_read_ready(&self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// One stream used by both directions of a relay running in one task: each
/// poll takes it for its own length only, so the lock is never contended.
/// It lets a relay wait for the stream to be readable (see [`ReadReady`])
/// while the other direction writes to it.
pub struct Shared<S>(std::sync::Mutex<S>);

impl<S> Shared<S> {
    pub fn new(stream: S) -> Self {
        Shared(std::sync::Mutex::new(stream))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, S> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl<S: ReadReady> Shared<S> {
    /// Resolves once the stream has something to read.
    pub async fn readable(&self) -> io::Result<()> {
        std::future::poll_fn(|cx| self.lock().poll_read_ready(cx)).await
    }
}

impl<S: ReadReady + AsyncRead + Unpin> Shared<S> {
    /// [`read_chunk`] that holds no buffer while the stream has nothing to
    /// read. Readiness can be stale (tokio reports a socket readable until a
    /// read has seen it empty, and a fresh socket can start so): a buffer
    /// taken then would be held by the pending read for as long as the
    /// connection idles, which was 4 KiB on most of a thousand idle
    /// connections. So the read is tried once, and if it would wait, the
    /// buffer goes and the wait is for readiness again.
    pub async fn read_chunk(&self, sizer: &mut ReadSizer) -> io::Result<Option<BytesMut>> {
        loop {
            self.readable().await?;
            let mut buf = BytesMut::with_capacity(sizer.next());
            let mut reader = self;
            let n = {
                let mut read = std::pin::pin!(reader.read_buf(&mut buf));
                match std::future::poll_fn(|cx| Poll::Ready(read.as_mut().poll(cx))).await {
                    Poll::Ready(n) => n?,
                    Poll::Pending if S::TELLS => continue,
                    Poll::Pending => read.await?,
                }
            };
            if n == 0 {
                return Ok(None);
            }
            sizer.read(n);
            return Ok(Some(buf));
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for &Shared<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.lock()).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for &Shared<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.lock()).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.lock()).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.lock()).poll_shutdown(cx)
    }
}

/// Reads from `reader` into a fresh buffer sized by `sizer`; `None` at the end.
pub async fn read_chunk<R: AsyncRead + Unpin>(reader: &mut R, sizer: &mut ReadSizer) -> io::Result<Option<BytesMut>> {
    let mut buf = BytesMut::with_capacity(sizer.next());
    let n = reader.read_buf(&mut buf).await?;
    if n == 0 {
        return Ok(None);
    }
    sizer.read(n);
    Ok(Some(buf))
}

/// Where one direction of a relay gets its chunks: any reader
/// ([`read_chunk`]), or a shared stream that waits for data without a
/// buffer ([`Shared::read_chunk`]).
trait Chunks {
    async fn next_chunk(&mut self, sizer: &mut ReadSizer) -> io::Result<Option<BytesMut>>;
}

impl<R: AsyncRead + Unpin> Chunks for tokio::io::ReadHalf<R> {
    async fn next_chunk(&mut self, sizer: &mut ReadSizer) -> io::Result<Option<BytesMut>> {
        read_chunk(self, sizer).await
    }
}

impl<S: ReadReady + AsyncRead + Unpin> Chunks for &Shared<S> {
    async fn next_chunk(&mut self, sizer: &mut ReadSizer) -> io::Result<Option<BytesMut>> {
        self.read_chunk(sizer).await
    }
}

/// Copies `reader`'s chunks to `writer` until the reader ends, then shuts
/// the writer down (half-close, as TCP carries it); returns the bytes copied.
async fn one_way<R, W>(mut reader: R, mut writer: W) -> io::Result<u64>
where
    R: Chunks,
    W: AsyncWrite + Unpin,
{
    let mut sizer = ReadSizer::default();
    let mut total = 0u64;
    while let Some(chunk) = reader.next_chunk(&mut sizer).await? {
        writer.write_all(&chunk).await?;
        total += chunk.len() as u64;
    }
    writer.shutdown().await?;
    Ok(total)
}

/// [`both_ways`] for streams that can wait for data without a buffer
/// ([`ReadReady`]): both directions run in one task on the shared streams,
/// and an idle connection holds no read buffer (8 KiB with `both_ways`).
pub async fn both_ways_when_ready<A, B>(a: A, b: B) -> io::Result<(u64, u64)>
where
    A: ReadReady + AsyncRead + AsyncWrite + Unpin,
    B: ReadReady + AsyncRead + AsyncWrite + Unpin,
{
    let (a, b) = (Shared::new(a), Shared::new(b));
    tokio::try_join!(one_way(&a, &b), one_way(&b, &a))
}

/// Relays both ways between `a` and `b` until both directions have ended;
/// returns the bytes (a → b, b → a).
pub async fn both_ways<A, B>(a: &mut A, b: &mut B) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let (ar, aw) = tokio::io::split(a);
    let (br, bw) = tokio::io::split(b);
    tokio::try_join!(one_way(ar, bw), one_way(br, aw))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each case: reads as (buffer offered, bytes got), the buffer offered next.
    #[test]
    fn buffers_grow_for_bulk_and_stay_small_while_waiting() {
        const K: usize = 1 << 10;
        let cases: &[(&str, &[usize], usize)] = &[
            ("fresh", &[], 4 * K),
            ("a small request", &[100], 4 * K),
            ("bulk doubles", &[4 * K, 8 * K, 16 * K], 32 * K),
            ("to 64 KiB and no further", &[4 * K, 8 * K, 16 * K, 32 * K, 64 * K, 64 * K], 64 * K),
            ("a drained socket: the waiting read is small", &[4 * K, 8 * K, 16 * K, 5 * K], 4 * K),
            ("bulk again: back to its size at once", &[4 * K, 8 * K, 16 * K, 5 * K, 4 * K], 32 * K),
        ];
        for (what, reads, want) in cases {
            let mut s = ReadSizer::default();
            for &n in *reads {
                assert!(n <= s.next(), "{what}: a read of {n} from a buffer of {}", s.next());
                s.read(n);
            }
            assert_eq!(s.next(), *want, "{what}");
        }
    }

    #[tokio::test]
    async fn both_ways_half_closes_and_counts() {
        let (client, mut proxy_a) = tokio::io::duplex(1 << 16);
        let (mut proxy_b, server) = tokio::io::duplex(1 << 16);
        let relay = tokio::spawn(async move { both_ways(&mut proxy_a, &mut proxy_b).await });
        half_closes_and_counts(client, server, relay).await;
    }

    /// The same over real sockets, which wait for data without a buffer.
    #[tokio::test]
    async fn both_ways_when_ready_half_closes_and_counts() {
        use tokio::net::{TcpListener, TcpStream};
        let pair = || async {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let dial = TcpStream::connect(l.local_addr().unwrap());
            let (dialed, accepted) = tokio::join!(dial, l.accept());
            (dialed.unwrap(), accepted.unwrap().0)
        };
        let ((client, mut proxy_a), (mut proxy_b, server)) = (pair().await, pair().await);
        let relay = tokio::spawn(async move { both_ways_when_ready(&mut proxy_a, &mut proxy_b).await });
        half_closes_and_counts(client, server, relay).await;
    }

    /// 300 000 bytes up and a half-close, then 1000 back and a close.
    async fn half_closes_and_counts<S>(
        mut client: S,
        mut server: S,
        relay: tokio::task::JoinHandle<io::Result<(u64, u64)>>,
    ) where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let up = vec![7u8; 300_000];
        let sending = tokio::spawn(async move {
            client.write_all(&up).await.unwrap();
            client.shutdown().await.unwrap();
            let mut back = Vec::new();
            client.read_to_end(&mut back).await.unwrap();
            back.len()
        });
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got.len(), 300_000, "all of it, then the half-close");
        server.write_all(&[1u8; 1000]).await.unwrap();
        server.shutdown().await.unwrap();
        assert_eq!(sending.await.unwrap(), 1000);
        assert_eq!(relay.await.unwrap().unwrap(), (300_000, 1000));
    }
}
