//! Moves bytes both ways between two streams in one future, with half-close and inactivity
//! timeouts. Both directions are polled from the same task, so neither stream is split or locked.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::io::{AsyncRead, AsyncWrite};
use futures::ready;

use crate::config::Timeouts;
use crate::rt::Timer;

/// Bytes per direction held in flight.
const BUFFER: usize = 16 * 1024;
/// Reads one direction may do in a row before yielding to the other and to other tasks.
const BUDGET: usize = 16;

/// Which way bytes were going.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Client to backend.
    Up,
    /// Backend to client.
    Down,
}

/// How a relayed pair ended.
#[derive(Debug)]
pub enum End {
    /// Both directions reached end of stream and were closed in turn.
    Done,
    /// Nothing moved either way for the idle timeout.
    Idle,
    /// One direction had ended and the other was silent for the fin timeout.
    Fin,
    /// Reading or writing failed while moving bytes this way.
    Failed(Direction, io::Error),
}

/// One direction: read into the buffer, write it all out, and close the writer at end of stream.
struct Half {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    eof: bool,
    done: bool,
    bytes: u64,
}

impl Half {
    fn new() -> Self {
        Half {
            buf: vec![0; BUFFER].into_boxed_slice(),
            start: 0,
            end: 0,
            eof: false,
            done: false,
            bytes: 0,
        }
    }

    /// Ready(Ok) once `r` has ended and `w` has been closed (the FIN passed on).
    fn poll<R, W>(&mut self, cx: &mut Context<'_>, mut r: Pin<&mut R>, mut w: Pin<&mut W>) -> Poll<io::Result<()>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        for _ in 0..BUDGET {
            if self.start == self.end && !self.eof {
                match r.as_mut().poll_read(cx, &mut self.buf)? {
                    Poll::Ready(0) => self.eof = true,
                    Poll::Ready(n) => (self.start, self.end) = (0, n),
                    Poll::Pending => {
                        // Nothing to read now: push out anything a buffering writer holds.
                        ready!(w.as_mut().poll_flush(cx))?;
                        return Poll::Pending;
                    }
                }
            }
            while self.start < self.end {
                let n = ready!(w.as_mut().poll_write(cx, &self.buf[self.start..self.end]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.start += n;
                self.bytes += n as u64;
            }
            if self.eof {
                ready!(w.as_mut().poll_close(cx))?;
                self.done = true;
                return Poll::Ready(Ok(()));
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

/// The relay of one pair: a future that ends with how the pair ended.
pub struct Pump<'a, A: ?Sized, B: ?Sized> {
    client: &'a mut A,
    backend: &'a mut B,
    up: Half,
    down: Half,
    timeouts: Timeouts,
    timer: Timer,
    last: Instant,
}

impl<'a, A, B> Pump<'a, A, B>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    pub fn new(client: &'a mut A, backend: &'a mut B, timeouts: Timeouts) -> Self {
        Pump {
            client,
            backend,
            up: Half::new(),
            down: Half::new(),
            timeouts,
            timer: Timer::after(timeouts.idle),
            last: Instant::now(),
        }
    }

    /// Bytes moved so far: (client to backend, backend to client).
    pub fn bytes(&self) -> (u64, u64) {
        (self.up.bytes, self.down.bytes)
    }

    fn limit(&self) -> (Duration, End) {
        if self.up.done || self.down.done {
            (self.timeouts.fin, End::Fin)
        } else {
            (self.timeouts.idle, End::Idle)
        }
    }

    fn progress(&self) -> (u64, bool, bool) {
        (self.up.bytes + self.down.bytes, self.up.done, self.down.done)
    }

    fn poll_halves(&mut self, cx: &mut Context<'_>) -> Option<End> {
        if !self.up.done {
            if let Poll::Ready(Err(e)) = self
                .up
                .poll(cx, Pin::new(&mut *self.client), Pin::new(&mut *self.backend))
            {
                return Some(End::Failed(Direction::Up, e));
            }
        }
        if !self.down.done {
            if let Poll::Ready(Err(e)) = self
                .down
                .poll(cx, Pin::new(&mut *self.backend), Pin::new(&mut *self.client))
            {
                return Some(End::Failed(Direction::Down, e));
            }
        }
        (self.up.done && self.down.done).then_some(End::Done)
    }
}

impl<A, B> Future for Pump<'_, A, B>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    type Output = End;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<End> {
        let this = self.get_mut();
        let before = this.progress();
        if let Some(end) = this.poll_halves(cx) {
            return Poll::Ready(end);
        }
        let after = this.progress();
        if after != before {
            // Only note the time: the timer is re-armed when it fires, not on every read.
            this.last = Instant::now();
            if (after.1, after.2) != (before.1, before.2) {
                // A direction just ended: the fin timeout applies from now on.
                this.timer.set_at(this.last + this.limit().0);
            }
        }
        loop {
            ready!(Pin::new(&mut this.timer).poll(cx));
            let (limit, end) = this.limit();
            let deadline = this.last + limit;
            if Instant::now() >= deadline {
                return Poll::Ready(end);
            }
            this.timer.set_at(deadline);
        }
    }
}
