//! A socket writer that gathers what HTTP/2 writes on a busy connection and sends it with one
//! system call.
//!
//! h2 keeps at most one DATA frame over 256 bytes queued and flushes the socket before it takes
//! the next, so every message of 1 KiB (a pub/sub event, an invocation) costs a `writev` of its
//! own, on both ends of every hop. [`Coalescing`] copies every write into a buffer, and when
//! the connection is busy (it sent less than [`BUSY_GAP`] ago) it answers h2's flush by waking
//! the connection task instead of writing: the frames of every call that gets ready meanwhile
//! (the task runs again after the runtime's other ready tasks) and of the rest of this turn
//! join the buffer, and the first flush of the task's next turn sends it all. A connection that
//! is not busy sends at once, so a lone call waits for nothing (deferring every flush added
//! about 100 µs to a sequential call through the mesh, BENCHMARKS.md).
//!
//! h2 reads the socket at the start of every turn of its connection task and flushes at the
//! end, so a read after a deferred flush marks the next turn.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Buffered bytes at most; a write beyond sends the buffer first.
const MAX_BUFFERED: usize = 64 << 10;
/// A connection that sent less than this long ago is busy: its flushes wait for the next turn.
pub const BUSY_GAP: Duration = Duration::from_micros(100);

/// Wraps a connected socket (or any byte stream).
#[derive(Debug)]
pub struct Coalescing<T> {
    inner: T,
    buffer: Vec<u8>,
    /// Bytes of `buffer` already sent.
    sent: usize,
    /// A flush was put off, and the connection task woken to come back.
    flush_deferred: bool,
    /// The connection task has read since the flush was put off: its next flush sends.
    turn_passed: bool,
    last_send: Option<Instant>,
    busy_gap: Duration,
}

impl<T> Coalescing<T> {
    pub fn new(inner: T) -> Self {
        Coalescing::with_busy_gap(inner, BUSY_GAP)
    }

    fn with_busy_gap(inner: T, busy_gap: Duration) -> Self {
        Coalescing {
            inner,
            buffer: Vec::new(),
            sent: 0,
            flush_deferred: false,
            turn_passed: false,
            last_send: None,
            busy_gap,
        }
    }

    pub fn get_ref(&self) -> &T {
        &self.inner
    }

    fn busy(&self) -> bool {
        self.last_send.is_some_and(|at| at.elapsed() < self.busy_gap)
    }
}

impl<T: AsyncWrite + Unpin> Coalescing<T> {
    /// Sends the whole buffer; `Pending` while the socket takes no more.
    fn poll_send_buffer(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.buffer.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.buffer[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        self.buffer.clear();
        self.sent = 0;
        self.flush_deferred = false;
        self.turn_passed = false;
        self.last_send = Some(Instant::now());
        Poll::Ready(Ok(()))
    }

    /// Makes room for `len` more bytes: sends the buffer when it would grow past the limit.
    fn poll_room(&mut self, cx: &mut Context<'_>, len: usize) -> Poll<io::Result<()>> {
        if !self.buffer.is_empty() && self.buffer.len() + len > MAX_BUFFERED {
            ready!(self.poll_send_buffer(cx))?;
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Coalescing<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        self.turn_passed |= self.flush_deferred;
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Coalescing<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        ready!(self.poll_room(cx, data.len()))?;
        self.buffer.extend_from_slice(data);
        Poll::Ready(Ok(data.len()))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        slices: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let len = slices.iter().map(|s| s.len()).sum();
        ready!(self.poll_room(cx, len))?;
        for slice in slices {
            self.buffer.extend_from_slice(slice);
        }
        Poll::Ready(Ok(len))
    }

    fn is_write_vectored(&self) -> bool {
        // h2 then hands over large frames as they are instead of copying them first: they are
        // copied once, here.
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.buffer.is_empty() {
            return Pin::new(&mut self.inner).poll_flush(cx);
        }
        if !self.flush_deferred && self.busy() {
            self.flush_deferred = true;
            cx.waker().wake_by_ref();
        }
        if self.flush_deferred && !self.turn_passed {
            return Poll::Ready(Ok(()));
        }
        ready!(self.poll_send_buffer(cx))?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_send_buffer(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::{Wake, Waker};

    /// A socket that records each write call.
    #[derive(Default)]
    struct Recording {
        writes: Vec<Vec<u8>>,
        shut: bool,
    }

    impl AsyncWrite for Recording {
        fn poll_write(mut self: Pin<&mut Self>, _: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
            self.writes.push(data.to_vec());
            Poll::Ready(Ok(data.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.shut = true;
            Poll::Ready(Ok(()))
        }
    }

    impl AsyncRead for Recording {
        fn poll_read(self: Pin<&mut Self>, _: &mut Context<'_>, _: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
            Poll::Pending
        }
    }

    #[derive(Default)]
    struct CountingWaker(AtomicUsize);

    impl Wake for CountingWaker {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// A waker that counts its wakes.
    fn counting_waker() -> (Arc<CountingWaker>, Waker) {
        let woken = Arc::new(CountingWaker::default());
        (woken.clone(), woken.into())
    }

    /// A socket on which every send counts as recent (no timing in the tests).
    fn socket() -> Coalescing<Recording> {
        Coalescing::with_busy_gap(Recording::default(), Duration::from_secs(3600))
    }

    fn write(socket: &mut Coalescing<Recording>, cx: &mut Context<'_>, data: &[u8]) {
        assert!(matches!(Pin::new(&mut *socket).poll_write(cx, data), Poll::Ready(Ok(n)) if n == data.len()));
    }

    fn flush(socket: &mut Coalescing<Recording>, cx: &mut Context<'_>) {
        assert!(matches!(Pin::new(&mut *socket).poll_flush(cx), Poll::Ready(Ok(()))));
    }

    fn read(socket: &mut Coalescing<Recording>, cx: &mut Context<'_>) {
        let mut bytes = [0u8; 16];
        assert!(Pin::new(&mut *socket).poll_read(cx, &mut ReadBuf::new(&mut bytes)).is_pending());
    }

    #[test]
    fn an_idle_connection_sends_at_once() {
        let (woken, waker) = counting_waker();
        let mut cx = Context::from_waker(&waker);
        let mut socket = socket();
        write(&mut socket, &mut cx, b"headers");
        write(&mut socket, &mut cx, b"data");
        assert!(socket.inner.writes.is_empty(), "nothing is sent before a flush");
        flush(&mut socket, &mut cx);
        assert_eq!(socket.inner.writes, [b"headersdata".to_vec()], "one write for what the turn buffered");
        assert_eq!(woken.0.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn a_connection_that_is_not_busy_sends_every_flush() {
        let (woken, waker) = counting_waker();
        let mut cx = Context::from_waker(&waker);
        let mut socket = Coalescing::with_busy_gap(Recording::default(), Duration::ZERO);
        for frame in [b"first", b"other"] {
            write(&mut socket, &mut cx, frame);
            flush(&mut socket, &mut cx);
        }
        assert_eq!(socket.inner.writes, [b"first".to_vec(), b"other".to_vec()]);
        assert_eq!(woken.0.load(Ordering::SeqCst), 0, "nothing put off");
    }

    #[test]
    fn a_busy_connection_sends_a_turn_with_the_next() {
        let (woken, waker) = counting_waker();
        let mut cx = Context::from_waker(&waker);
        let mut socket = socket();
        write(&mut socket, &mut cx, b"first");
        flush(&mut socket, &mut cx);
        // Sent a moment ago: busy. The flushes of this turn wait, and the task is woken once.
        write(&mut socket, &mut cx, b"second");
        flush(&mut socket, &mut cx);
        write(&mut socket, &mut cx, b"third");
        flush(&mut socket, &mut cx);
        assert_eq!(socket.inner.writes.len(), 1, "{:?}", socket.inner.writes);
        assert_eq!(woken.0.load(Ordering::SeqCst), 1, "the connection task comes back");
        // Its next turn reads first, then flushes: everything goes in one write.
        read(&mut socket, &mut cx);
        write(&mut socket, &mut cx, b"fourth");
        flush(&mut socket, &mut cx);
        assert_eq!(socket.inner.writes, [b"first".to_vec(), b"secondthirdfourth".to_vec()]);
        assert!(!socket.flush_deferred && socket.buffer.is_empty());
    }

    #[test]
    fn shutdown_sends_what_is_buffered_first() {
        let (_, waker) = counting_waker();
        let mut cx = Context::from_waker(&waker);
        let mut socket = socket();
        write(&mut socket, &mut cx, b"first");
        flush(&mut socket, &mut cx);
        write(&mut socket, &mut cx, b"goaway");
        flush(&mut socket, &mut cx);
        assert!(Pin::new(&mut socket).poll_shutdown(&mut cx).is_ready());
        assert_eq!(socket.inner.writes, [b"first".to_vec(), b"goaway".to_vec()]);
        assert!(socket.inner.shut);
    }

    #[test]
    fn a_full_buffer_is_sent_before_it_grows_further() {
        let (_, waker) = counting_waker();
        let mut cx = Context::from_waker(&waker);
        let mut socket = socket();
        write(&mut socket, &mut cx, b"x");
        flush(&mut socket, &mut cx);
        let large = vec![7u8; MAX_BUFFERED - 10];
        write(&mut socket, &mut cx, &large);
        flush(&mut socket, &mut cx);
        write(&mut socket, &mut cx, &[8u8; 20]);
        assert_eq!(socket.inner.writes.len(), 2, "the buffer went out before taking 20 more bytes");
        assert_eq!(socket.inner.writes[1], large);
        assert_eq!(socket.buffer, [8u8; 20]);
    }
}
