//! Moves bytes both ways between two streams in one future, with half-close and inactivity
//! timeouts. Both directions are polled from the same task, so neither stream is split or locked.
//!
//! No buffer is held while a session is idle: a direction reads into its thread's scratch
//! buffer and writes straight on; only what the writer cannot take at once is copied into a
//! pooled buffer, held until it is flushed.

use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::io::{AsyncRead, AsyncWrite};
use futures::ready;

use crate::config::Timeouts;
use crate::metrics::Meter;
use crate::rt::Timer;

/// Bytes one read may take.
pub(super) const SCRATCH: usize = 64 * 1024;
/// Reads one direction may do in a row before yielding to the other and to other tasks.
pub(super) const BUDGET: usize = 16;
/// Spare buffers a thread keeps for directions whose writer is behind.
const POOL: usize = 32;

thread_local! {
    static SCRATCH_BUF: RefCell<Vec<u8>> = RefCell::new(vec![0; SCRATCH]);
    static SPARE: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

/// A buffer for bytes a writer could not take yet: from the thread's pool when it has one.
fn spare(bytes: &[u8]) -> Vec<u8> {
    let mut buf = SPARE
        .with_borrow_mut(Vec::pop)
        .unwrap_or_else(|| Vec::with_capacity(SCRATCH));
    buf.extend_from_slice(bytes);
    buf
}

fn give_back(mut buf: Vec<u8>) {
    buf.clear();
    SPARE.with_borrow_mut(|pool| {
        if pool.len() < POOL && buf.capacity() >= SCRATCH {
            pool.push(buf);
        }
    });
}

/// Which way bytes were going.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Client to backend.
    Up,
    /// Backend to client.
    Down,
}

impl Direction {
    /// A stable word for logs.
    pub fn word(self) -> &'static str {
        match self {
            Direction::Up => "up",
            Direction::Down => "down",
        }
    }
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
    /// Reading this direction's source failed (a reset): the source aborted, and the abort is
    /// to be passed on to the other side.
    Aborted(Direction, io::Error),
    /// Writing this direction's destination failed (it is gone), after the other direction
    /// had delivered everything it read and ended.
    Failed(Direction, io::Error),
}

/// How one direction failed: reading its source, or writing its destination.
#[derive(Debug)]
pub(super) enum HalfError {
    Read(io::Error),
    Write(io::Error),
}

/// The one rule both pair drivers end by. A direction whose destination is gone has nowhere
/// to put its source's bytes: from then on it reads and drops them, so a client that uploads
/// while it waits for its answer is not stalled, while the other direction runs on until it
/// has delivered what it read and ended: a backend's complete answer reaches the client even
/// when the backend then resets the upload. A direction whose source aborted ends the pair at
/// once (the session then passes the abort on, once what was in flight has arrived).
#[derive(Default)]
struct Ending {
    /// The first direction whose destination went away, and how.
    gone: Option<(Direction, io::Error)>,
}

/// What one direction's poll means for the pair.
enum Noted {
    Running,
    /// Its destination just went away: it drops what it reads from now on.
    Gone,
    Ends(End),
}

impl Ending {
    /// Folds one direction's poll into the ending.
    pub fn note(&mut self, direction: Direction, polled: Poll<Result<(), HalfError>>) -> Noted {
        match polled {
            Poll::Ready(Err(HalfError::Read(e))) => Noted::Ends(End::Aborted(direction, e)),
            Poll::Ready(Err(HalfError::Write(e))) => {
                self.gone.get_or_insert((direction, e));
                Noted::Gone
            }
            _ => Noted::Running,
        }
    }

    /// `Some` once both directions are over: each ended, or its destination is gone.
    pub fn over(&mut self, up_over: bool, down_over: bool) -> Option<End> {
        (up_over && down_over).then(|| match self.gone.take() {
            Some((direction, e)) => End::Failed(direction, e),
            None => End::Done,
        })
    }
}

/// The thread's scratch buffer for one read; a reader that is itself a relay on this thread
/// would find it taken, and gets a buffer of its own for this read.
fn with_scratch<T>(f: impl FnOnce(&mut [u8]) -> T) -> T {
    SCRATCH_BUF.with(|scratch| match scratch.try_borrow_mut() {
        Ok(mut buf) => f(&mut buf),
        Err(_) => f(&mut vec![0; SCRATCH]),
    })
}

/// One direction by copying: read, write on, and close the writer at end of stream.
#[derive(Default)]
pub(super) struct Half {
    /// Bytes read but not yet taken by the writer, and how many of them were.
    pending: Option<(Vec<u8>, usize)>,
    eof: bool,
    pub done: bool,
    pub bytes: u64,
    /// A read filled the whole scratch buffer: bulk data is flowing.
    pub filled: bool,
    /// The other direction has ended, so this one's end ends the pair: the writer is about to
    /// be closed, and closing it sends the FIN without a shutdown of its own.
    pub last: bool,
    /// The writer is gone: what is read is dropped.
    pub dropping: bool,
    /// Bytes read and dropped.
    pub dropped: u64,
}

impl Half {
    /// Nothing read is waiting for the writer.
    pub fn is_flushed(&self) -> bool {
        self.pending.is_none()
    }

    /// Bulk data flows, nothing is held back, and it all goes somewhere: a kernel may move it.
    pub fn may_splice(&self) -> bool {
        self.filled && self.is_flushed() && !self.dropping
    }

    /// The writer is gone: from now on the reader's bytes are read and dropped (what was held
    /// for the writer too).
    pub fn drop_input(&mut self) {
        self.dropping = true;
        if let Some((buf, _)) = self.pending.take() {
            give_back(buf);
        }
    }

    /// Ready(Ok) once `r` has ended and `w` has been closed (the FIN passed on).
    pub fn poll<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut r: Pin<&mut R>,
        mut w: Pin<&mut W>,
    ) -> Poll<Result<(), HalfError>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        if self.dropping {
            return self.poll_drop(cx, r);
        }
        let write = HalfError::Write;
        for _ in 0..BUDGET {
            ready!(self.flush_pending(cx, w.as_mut())).map_err(write)?;
            if self.eof {
                if self.last {
                    ready!(w.as_mut().poll_flush(cx)).map_err(write)?;
                } else {
                    ready!(w.as_mut().poll_close(cx)).map_err(write)?;
                }
                self.done = true;
                return Poll::Ready(Ok(()));
            }
            match self.pass_on(cx, r.as_mut(), w.as_mut()) {
                Poll::Ready(result) => result?,
                Poll::Pending => {
                    // Nothing to read now: push out anything a buffering writer holds.
                    ready!(w.as_mut().poll_flush(cx)).map_err(write)?;
                    return Poll::Pending;
                }
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    fn flush_pending<W: AsyncWrite + ?Sized>(
        &mut self,
        cx: &mut Context<'_>,
        mut w: Pin<&mut W>,
    ) -> Poll<io::Result<()>> {
        let Some((buf, sent)) = &mut self.pending else {
            return Poll::Ready(Ok(()));
        };
        while *sent < buf.len() {
            let n = ready!(w.as_mut().poll_write(cx, &buf[*sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            *sent += n;
            self.bytes += n as u64;
        }
        let (buf, _) = self.pending.take().expect("checked above");
        give_back(buf);
        Poll::Ready(Ok(()))
    }

    /// One read into the thread's scratch buffer, written straight on as far as the writer
    /// takes it; the rest is kept in a pooled buffer.
    fn pass_on<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut r: Pin<&mut R>,
        mut w: Pin<&mut W>,
    ) -> Poll<Result<(), HalfError>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        with_scratch(|buf| {
            let n = ready!(r.as_mut().poll_read(cx, buf)).map_err(HalfError::Read)?;
            if n == 0 {
                self.eof = true;
                return Poll::Ready(Ok(()));
            }
            self.filled |= n == buf.len();
            let mut sent = 0;
            while sent < n {
                match w.as_mut().poll_write(cx, &buf[sent..n]).map_err(HalfError::Write)? {
                    Poll::Ready(0) => return Poll::Ready(Err(HalfError::Write(io::ErrorKind::WriteZero.into()))),
                    Poll::Ready(m) => sent += m,
                    Poll::Pending => break,
                }
            }
            self.bytes += sent as u64;
            if sent < n {
                self.pending = Some((spare(&buf[sent..n]), 0));
            }
            Poll::Ready(Ok(()))
        })
    }

    /// Reads and drops until the reader ends (Ready(Ok)) or fails.
    fn poll_drop<R: AsyncRead + ?Sized>(
        &mut self,
        cx: &mut Context<'_>,
        mut r: Pin<&mut R>,
    ) -> Poll<Result<(), HalfError>> {
        for _ in 0..BUDGET {
            let n = ready!(with_scratch(|buf| r.as_mut().poll_read(cx, buf))).map_err(HalfError::Read)?;
            if n == 0 {
                (self.eof, self.done) = (true, true);
                return Poll::Ready(Ok(()));
            }
            self.dropped += n as u64;
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

/// What has moved so far: bytes both ways, and which directions have ended.
pub(super) type Progress = (u64, bool, bool);

/// The idle and fin timeouts of a relayed pair.
struct Idle {
    timeouts: Timeouts,
    timer: Timer,
    last: Instant,
}

impl Idle {
    pub fn new(timeouts: Timeouts) -> Self {
        Idle {
            timeouts,
            timer: Timer::after(timeouts.idle),
            last: Instant::now(),
        }
    }

    fn limit(&self, after: Progress) -> (Duration, End) {
        if after.1 || after.2 {
            (self.timeouts.fin, End::Fin)
        } else {
            (self.timeouts.idle, End::Idle)
        }
    }

    /// Ready(end) once the pair has been silent too long, given what moved in this poll.
    pub fn poll(&mut self, cx: &mut Context<'_>, before: Progress, after: Progress) -> Poll<End> {
        if after != before {
            // Only note the time: the timer is re-armed when it fires, not on every read.
            self.last = Instant::now();
            if (after.1, after.2) != (before.1, before.2) {
                // A direction just ended: the fin timeout applies from now on.
                self.timer.set_at(self.last + self.limit(after).0);
            }
        }
        loop {
            ready!(Pin::new(&mut self.timer).poll(cx));
            let (limit, end) = self.limit(after);
            let deadline = self.last + limit;
            if Instant::now() >= deadline {
                return Poll::Ready(end);
            }
            self.timer.set_at(deadline);
        }
    }
}

/// What moves a pair's bytes, a direction at a time: by copying ([`Copier`]) or by splice.
pub(super) trait Halves {
    /// Polls one direction: Ready(Ok) once its reader has ended and its writer is closed.
    fn poll_half(&mut self, direction: Direction, cx: &mut Context<'_>) -> Poll<Result<(), HalfError>>;
    fn done(&self, direction: Direction) -> bool;
    /// Bytes moved so far: (client to backend, backend to client).
    fn bytes(&self) -> (u64, u64);
    /// The direction's destination is gone: it reads and drops from now on.
    fn drop_input(&mut self, direction: Direction);
    /// The direction's copying half, which does the dropping (a splicing direction copies
    /// once its destination is gone).
    fn copying(&self, direction: Direction) -> &Half;

    /// True once `direction` only reads and drops.
    fn dropping(&self, direction: Direction) -> bool {
        self.copying(direction).dropping
    }

    /// Bytes read and dropped, both ways.
    fn dropped(&self) -> u64 {
        self.copying(Direction::Up).dropped + self.copying(Direction::Down).dropped
    }
}

/// The relay of one pair: a future that ends with how the pair ended. `H` moves the bytes;
/// how the pair ends (half-close, a gone destination, an abort) and the idle and fin
/// timeouts are the same whichever way they move.
pub struct Pair<H> {
    halves: H,
    ending: Ending,
    idle: Idle,
    /// The bytes are counted as they move.
    meter: Meter,
}

impl<H: Halves> Pair<H> {
    pub(super) fn with(halves: H, timeouts: Timeouts, meter: Meter) -> Self {
        Pair {
            halves,
            ending: Ending::default(),
            idle: Idle::new(timeouts),
            meter,
        }
    }

    /// Bytes moved so far: (client to backend, backend to client).
    pub fn bytes(&self) -> (u64, u64) {
        self.halves.bytes()
    }

    pub(super) fn halves(&self) -> &H {
        &self.halves
    }

    fn progress(&self) -> Progress {
        let (up, down) = self.halves.bytes();
        let done = |d| self.halves.done(d);
        (
            up + down + self.halves.dropped(),
            done(Direction::Up),
            done(Direction::Down),
        )
    }
}

impl<H: Halves + Unpin> Future for Pair<H> {
    type Output = End;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<End> {
        let this = self.get_mut();
        let before = this.progress();
        let polled = this.poll_halves(cx, before);
        if this.progress().0 != before.0 {
            this.meter.moved(this.halves.bytes(), (0, 0));
        }
        polled
    }
}

impl<H: Halves> Pair<H> {
    fn poll_halves(&mut self, cx: &mut Context<'_>, before: Progress) -> Poll<End> {
        for direction in [Direction::Up, Direction::Down] {
            if !self.halves.done(direction) {
                let polled = self.halves.poll_half(direction, cx);
                match self.ending.note(direction, polled) {
                    Noted::Running => {}
                    Noted::Gone => {
                        self.halves.drop_input(direction);
                        // Polled again soon, now to read and drop.
                        cx.waker().wake_by_ref();
                    }
                    Noted::Ends(end) => return Poll::Ready(end),
                }
            }
        }
        let over = |d| self.halves.done(d) || self.halves.dropping(d);
        if let Some(end) = self.ending.over(over(Direction::Up), over(Direction::Down)) {
            return Poll::Ready(end);
        }
        let after = self.progress();
        self.idle.poll(cx, before, after)
    }
}

/// A pair's bytes moved by copying, between any two streams.
pub struct Copier<'a, A: ?Sized, B: ?Sized> {
    client: &'a mut A,
    backend: &'a mut B,
    up: Half,
    down: Half,
}

/// The relay of one pair by copying.
pub type Pump<'a, A, B> = Pair<Copier<'a, A, B>>;

impl<'a, A, B> Pump<'a, A, B>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    pub fn new(client: &'a mut A, backend: &'a mut B, timeouts: Timeouts, meter: Meter) -> Self {
        let halves = Copier {
            client,
            backend,
            up: Half::default(),
            down: Half::default(),
        };
        Pair::with(halves, timeouts, meter)
    }
}

impl<A, B> Halves for Copier<'_, A, B>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    fn poll_half(&mut self, direction: Direction, cx: &mut Context<'_>) -> Poll<Result<(), HalfError>> {
        let (client, backend) = (Pin::new(&mut *self.client), Pin::new(&mut *self.backend));
        match direction {
            Direction::Up => self.up.poll(cx, client, backend),
            Direction::Down => self.down.poll(cx, backend, client),
        }
    }

    fn done(&self, direction: Direction) -> bool {
        match direction {
            Direction::Up => self.up.done,
            Direction::Down => self.down.done,
        }
    }

    fn bytes(&self) -> (u64, u64) {
        (self.up.bytes, self.down.bytes)
    }

    fn drop_input(&mut self, direction: Direction) {
        match direction {
            Direction::Up => self.up.drop_input(),
            Direction::Down => self.down.drop_input(),
        }
    }

    fn copying(&self, direction: Direction) -> &Half {
        match direction {
            Direction::Up => &self.up,
            Direction::Down => &self.down,
        }
    }
}
