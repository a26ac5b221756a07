//! A tunnel as a byte stream (`AsyncRead + AsyncWrite`), for code that
//! speaks a protocol over it in-process (the waypoint's HTTP server and
//! clients) instead of relaying it to a socket: no pipe, no relay task, one
//! copy per write. Reads release HTTP/2 flow-control capacity as they are
//! consumed; shutdown ends the stream (END_STREAM).
use std::{
    io,
    pin::Pin,
    task::{Context, Poll, ready},
};

use bytes::{Buf as _, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::{Tunnel, other};

/// Writes are cut to at most this much per DATA frame reservation.
const MAX_WRITE: usize = 64 << 10;

pub struct TunnelIo {
    tunnel: Tunnel,
    /// Received and not yet read.
    pending: Bytes,
    /// The peer ended its side.
    eof: bool,
    /// We ended ours.
    shut: bool,
    /// The pooled connection's stream slot, held for as long as the tunnel lives.
    _slot: Option<crate::pool::StreamSlot>,
}

impl TunnelIo {
    /// `first`: bytes already taken from the tunnel (a protocol sniff), read first.
    pub fn new(tunnel: Tunnel, first: Bytes) -> TunnelIo {
        TunnelIo { tunnel, pending: first, eof: false, shut: false, _slot: None }
    }

    /// A tunnel opened on a pooled connection, holding its stream slot.
    pub fn pooled(tunnel: Tunnel, slot: crate::pool::StreamSlot) -> TunnelIo {
        TunnelIo { _slot: Some(slot), ..TunnelIo::new(tunnel, Bytes::new()) }
    }
}

impl AsyncRead for TunnelIo {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        while this.pending.is_empty() && !this.eof {
            match ready!(this.tunnel.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    let _ = this.tunnel.recv.flow_control().release_capacity(data.len());
                    this.pending = data;
                }
                Some(Err(e)) => return Poll::Ready(Err(other(e))),
                None => this.eof = true,
            }
        }
        let n = this.pending.len().min(buf.remaining());
        buf.put_slice(&this.pending[..n]);
        this.pending.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for TunnelIo {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let send = &mut self.tunnel.send;
        send.reserve_capacity(buf.len().min(MAX_WRITE));
        loop {
            // Capacity left from an earlier grant is used first: poll_capacity
            // only reports new grants.
            let available = send.capacity();
            let granted = if available > 0 { Some(Ok(available)) } else { ready!(send.poll_capacity(cx)) };
            match granted {
                Some(Ok(0)) => continue, // woken without capacity: wait again
                Some(Ok(granted)) => {
                    let n = granted.min(buf.len());
                    send.send_data(Bytes::copy_from_slice(&buf[..n]), false).map_err(other)?;
                    return Poll::Ready(Ok(n));
                }
                Some(Err(e)) => return Poll::Ready(Err(other(e))),
                None => return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(())) // h2 sends what it was given; there is nothing to flush here
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.shut {
            self.shut = true;
            self.tunnel.send.send_data(Bytes::new(), true).map_err(other)?;
        }
        Poll::Ready(Ok(()))
    }
}
