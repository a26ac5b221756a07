//! Bodies as the waypoint streams them: a request body that keeps a copy of
//! what it forwarded (up to a bound) so a retry can replay it, and a
//! response body that counts its bytes and reports once it has ended.
use std::{
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt as _, Full, combinators::BoxBody};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body type every request and response is carried in.
pub type HttpBody = BoxBody<Bytes, BoxError>;

pub fn full(bytes: impl Into<Bytes>) -> HttpBody {
    Full::new(bytes.into()).map_err(|e| match e {}).boxed()
}

pub fn empty() -> HttpBody {
    full(Bytes::new())
}

/// Request bodies up to this size are kept for a retry; beyond it, a failed
/// attempt is not retried (the body cannot be sent again).
pub const REPLAY_LIMIT: usize = 64 * 1024;

#[derive(Default)]
struct Copy {
    data: BytesMut,
    /// The body ended within the limit: `data` is all of it.
    complete: bool,
    /// Past the limit, or had trailers: cannot be replayed.
    spoiled: bool,
    /// Bytes forwarded, for `istio_request_bytes`.
    bytes: u64,
}

/// A handle on what a [`Recording`] body forwarded.
#[derive(Clone, Default)]
pub struct Recorded(Arc<Mutex<Copy>>);

impl Recorded {
    /// The whole body again, if it ended within the limit.
    pub fn replay(&self) -> Option<HttpBody> {
        let c = self.lock();
        (c.complete && !c.spoiled).then(|| full(c.data.clone().freeze()))
    }

    pub fn bytes(&self) -> u64 {
        self.lock().bytes
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Copy> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Streams `inner` through unchanged, keeping a copy for [`Recorded::replay`].
/// Generic over the body it wraps, so the client's body is boxed once, here.
pub struct Recording<B = HttpBody> {
    inner: B,
    copy: Recorded,
}

impl<B: Body> Recording<B> {
    pub fn new(inner: B) -> (Recording<B>, Recorded) {
        let copy = Recorded::default();
        copy.lock().complete = inner.is_end_stream(); // no body at all (a GET)
        (Recording { inner, copy: copy.clone() }, copy)
    }
}

impl<B> Body for Recording<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx).map_err(Into::into);
        let mut c = self.copy.lock();
        match &polled {
            Poll::Ready(Some(Ok(frame))) => match frame.data_ref() {
                Some(data) => {
                    c.bytes += data.len() as u64;
                    if !c.spoiled && c.data.len() + data.len() <= REPLAY_LIMIT {
                        c.data.extend_from_slice(data);
                    } else {
                        c.spoiled = true;
                        c.data = BytesMut::new();
                    }
                }
                None => c.spoiled = true, // trailers are not kept
            },
            Poll::Ready(None) => c.complete = true,
            Poll::Ready(Some(Err(_))) => c.spoiled = true,
            Poll::Pending => {}
        }
        // hyper stops polling a body once it says it has ended (its
        // content-length is sent): that is its end too.
        if self.inner.is_end_stream() {
            c.complete = true;
        }
        drop(c);
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// How a response body ended, as far as the metrics care.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ended {
    pub bytes: u64,
    /// `grpc-status` from the trailers, when it came there.
    pub grpc_status: Option<String>,
    /// Ended before its end of stream (the upstream failed, or the client left).
    pub cut: bool,
}

/// Forwards a response body, counting its bytes, and calls `done` once
/// when it ends, fails, or is dropped (the client went away).
pub struct Counting<F: FnOnce(Ended) + Send + 'static> {
    inner: HttpBody,
    ended: Ended,
    done: Option<F>,
}

impl<F: FnOnce(Ended) + Send + 'static> Counting<F> {
    pub fn new(inner: HttpBody, done: F) -> Counting<F> {
        Counting { inner, ended: Ended { cut: true, ..Ended::default() }, done: Some(done) }
    }

    fn finish(&mut self) {
        // A body whose length is known is not polled past its last byte.
        if self.inner.is_end_stream() {
            self.ended.cut = false;
        }
        if let Some(done) = self.done.take() {
            done(std::mem::take(&mut self.ended));
        }
    }
}

impl<F: FnOnce(Ended) + Send + 'static> Unpin for Counting<F> {}

impl<F: FnOnce(Ended) + Send + 'static> Body for Counting<F> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    self.ended.bytes += d.len() as u64;
                }
                if let Some(t) = frame.trailers_ref() {
                    self.ended.grpc_status = t.get("grpc-status").and_then(|v| v.to_str().ok()).map(String::from);
                }
            }
            Poll::Ready(None) => {
                self.ended.cut = false;
                self.finish();
            }
            Poll::Ready(Some(Err(_))) => self.finish(),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<F: FnOnce(Ended) + Send + 'static> Drop for Counting<F> {
    fn drop(&mut self) {
        self.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_small_body_replays_a_large_one_does_not() {
        let (rec, copy) = Recording::new(full("hello"));
        assert!(copy.replay().is_none(), "not replayable before it has ended");
        let sent = rec.collect().await.unwrap().to_bytes();
        assert_eq!(&sent[..], b"hello");
        let again = copy.replay().unwrap().collect().await.unwrap().to_bytes();
        assert_eq!((&again[..], copy.bytes()), (&b"hello"[..], 5));

        let (rec, copy) = Recording::new(full(vec![7u8; REPLAY_LIMIT + 1]));
        assert_eq!(rec.collect().await.unwrap().to_bytes().len(), REPLAY_LIMIT + 1, "forwarded whole");
        assert!(copy.replay().is_none(), "too large to keep");
        assert_eq!(copy.bytes(), REPLAY_LIMIT as u64 + 1);
    }

    #[tokio::test]
    async fn counting_reports_once_at_the_end_or_on_drop() {
        let (tx, rx) = std::sync::mpsc::channel();
        let tx2 = tx.clone();
        let body = Counting::new(full("abcd"), move |e| tx.send(e).unwrap());
        body.collect().await.unwrap();
        drop(Counting::new(full("xyz"), move |e| tx2.send(e).unwrap()));
        let ended: Vec<(u64, bool)> = rx.try_iter().map(|e| (e.bytes, e.cut)).collect();
        assert_eq!(ended, [(4, false), (0, true)], "once each; unread when dropped, and cut");
    }
}
