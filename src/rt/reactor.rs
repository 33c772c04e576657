//! The reactor: one edge-triggered epoll instance per worker thread, and [`Async`], a socket
//! registered with one of them.
//!
//! A socket joins the epoll of the worker whose task first waits on it, and stays there: the
//! worker that runs a session also waits for its sockets, and a readiness event wakes a task
//! on the same thread without a hand-over. Edge-triggered, a socket is added once and removed
//! once; async-io's one-shot registrations were re-armed before every wait, ten `epoll_ctl`
//! calls for a short relayed connection against four here. Threads that are not workers
//! (`main`, tests, embedders' threads) share one more epoll, watched by a thread of its own.
//!
//! A readiness event counts up a tick per direction, and a direction is ready while its tick
//! differs from the tick its last failed attempt (`EAGAIN`) started at; an edge that comes
//! during the attempt keeps the direction ready. An attempt is only made while the direction
//! is ready (or before the first wait), so a task woken for one socket does not try every
//! other socket it polls. A short read from a stream socket clears readiness too, as HAProxy
//! treats it: the kernel gave all it had, and bytes that come later bring an edge of their
//! own. The exception is a peer that hung up: one edge can bring the last bytes and the FIN
//! together, and no edge follows for the FIN that the next read returns, so once the
//! reactor has seen `EPOLLRDHUP` (or a hang-up or error) only `EAGAIN` clears readiness.

use std::cell::Cell;
use std::future::Future;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::pin::{Pin, pin};
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll, Wake, Waker};

use futures::io::{AsyncRead, AsyncWrite};

use super::{check, lock};

/// The epoll data of the reactor's own eventfd; a source's data is its address, never 0.
const NOTIFY: u64 = 0;
/// Events taken from the kernel per `epoll_wait`.
const BATCH: usize = 256;

const READ: usize = 0;
const WRITE: usize = 1;

pub(crate) struct Reactor {
    epoll: OwnedFd,
    /// An eventfd in the epoll: written to wake the thread out of `epoll_wait`.
    bell: OwnedFd,
    /// Sources dropped on other threads: their descriptors have left the epoll, and the
    /// reference the epoll held is let go here, between two waits, where no event for them
    /// can still be in hand.
    released: Mutex<Vec<SourcePtr>>,
    any_released: AtomicBool,
}

/// A source's address, as the epoll holds it.
struct SourcePtr(*const Source);

// SAFETY: the pointer stands for a strong reference to a `Source`, which is Send and Sync; it
// is only turned back into that reference, once, by the reactor it was given to.
unsafe impl Send for SourcePtr {}

impl Reactor {
    fn new() -> io::Result<Reactor> {
        // SAFETY: plain system calls; the descriptors they return are owned at once.
        let (epoll, bell) = unsafe {
            let epoll = OwnedFd::from_raw_fd(check(libc::epoll_create1(libc::EPOLL_CLOEXEC))?);
            let bell = OwnedFd::from_raw_fd(check(libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK))?);
            (epoll, bell)
        };
        let reactor = Reactor {
            epoll,
            bell,
            released: Mutex::new(Vec::new()),
            any_released: AtomicBool::new(false),
        };
        reactor.ctl(libc::EPOLL_CTL_ADD, reactor.bell.as_raw_fd(), NOTIFY)?;
        Ok(reactor)
    }

    fn ctl(&self, op: libc::c_int, fd: RawFd, data: u64) -> io::Result<()> {
        let mut event = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLRDHUP | libc::EPOLLET) as u32,
            u64: data,
        };
        // SAFETY: `event` outlives the call; epoll_ctl checks both descriptors.
        check(unsafe { libc::epoll_ctl(self.epoll.as_raw_fd(), op, fd, &mut event) }).map(drop)
    }

    /// Wakes the thread if it waits in `epoll_wait`.
    fn ring(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64. Failure means the counter is already far from
        // zero, so the epoll is already woken.
        unsafe { libc::write(self.bell.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    fn is_current(&'static self) -> bool {
        CURRENT
            .try_with(|c| c.get().is_some_and(|r| std::ptr::eq(r, self)))
            .unwrap_or(false)
    }

    /// Lets go of the sources other threads dropped since the last call.
    fn release(&self) {
        if !self.any_released.swap(false, SeqCst) {
            return;
        }
        let released = std::mem::take(&mut *lock(&self.released));
        for SourcePtr(source) in released {
            // SAFETY: the strong reference `register` gave the epoll; the descriptor left the
            // epoll before the pointer was queued, and this thread holds no event for it now.
            drop(unsafe { Arc::from_raw(source) });
        }
    }

    fn defer_release(&self, source: SourcePtr) {
        lock(&self.released).push(source);
        if !self.any_released.swap(true, SeqCst) {
            // The thread may sleep for long (the shared reactor's does): let it free them.
            self.ring();
        }
    }

    /// Waits at most `timeout_ms` (-1: until an event) and fills `events`.
    fn wait(&self, events: &mut Vec<libc::epoll_event>, timeout_ms: libc::c_int) {
        events.clear();
        // SAFETY: the kernel writes at most `capacity` events into the vector's spare room.
        let n = unsafe {
            libc::epoll_wait(
                self.epoll.as_raw_fd(),
                events.as_mut_ptr(),
                events.capacity() as libc::c_int,
                timeout_ms,
            )
        };
        if n > 0 {
            // SAFETY: the kernel initialised the first n.
            unsafe { events.set_len(n as usize) };
        } else if n < 0 {
            let e = io::Error::last_os_error();
            assert!(e.kind() == io::ErrorKind::Interrupted, "epoll_wait failed: {e}");
        }
    }

    /// Marks what `events` say is ready and wakes whoever waits on it.
    fn dispatch(&self, events: &[libc::epoll_event], wakers: &mut Vec<Waker>) {
        for event in events {
            let data = event.u64;
            if data == NOTIFY {
                let mut count = 0u64;
                // SAFETY: reads 8 bytes into a live u64 (resets the eventfd).
                unsafe { libc::read(self.bell.as_raw_fd(), (&mut count as *mut u64).cast(), 8) };
                continue;
            }
            // SAFETY: the epoll holds a strong reference to every source it reports (see
            // `release`), and sources are only let go on this thread, outside this loop.
            let source = unsafe { &*(data as *const Source) };
            source.ready(event.events, wakers);
        }
        // Wake after every source was looked at: a woken task may drop its sockets.
        wakers.drain(..).for_each(Waker::wake);
    }
}

thread_local! {
    /// The reactor of the worker this thread is, if it is one.
    static CURRENT: Cell<Option<&'static Reactor>> = const { Cell::new(None) };
}

/// The reactor a source waited on from this thread joins.
fn current() -> &'static Reactor {
    CURRENT.try_with(Cell::get).ok().flatten().unwrap_or_else(shared)
}

/// The reactor for threads that are not workers, with a thread of its own.
fn shared() -> &'static Reactor {
    static SHARED: OnceLock<&'static Reactor> = OnceLock::new();
    SHARED.get_or_init(|| {
        let reactor: &'static Reactor = Box::leak(Box::new(Reactor::new().expect("cannot create an epoll")));
        std::thread::Builder::new()
            .name("relayd-io".into())
            .spawn(move || {
                CURRENT.set(Some(reactor));
                let (mut events, mut wakers) = (Vec::with_capacity(BATCH), Vec::new());
                loop {
                    reactor.release();
                    reactor.wait(&mut events, -1);
                    reactor.dispatch(&events, &mut wakers);
                }
            })
            .expect("cannot start the relayd-io thread");
        reactor
    })
}

/// What wakes a worker: a flag, and the reactor's bell when the worker sleeps in epoll.
struct WorkerWaker {
    woken: AtomicBool,
    sleeping: AtomicBool,
    reactor: &'static Reactor,
}

impl Wake for WorkerWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        // Both flags are SeqCst: either the worker sees `woken` before it sleeps, or this
        // sees `sleeping` and rings.
        if !self.woken.swap(true, SeqCst) && self.sleeping.load(SeqCst) {
            self.reactor.ring();
        }
    }
}

/// Runs `future` (a worker's executor) on this thread, with a reactor of the thread's own:
/// between two polls of the future the thread waits for its sockets in epoll, without a wait
/// while the future has more to do.
pub(crate) fn run_worker<F: Future>(future: F) -> F::Output {
    let reactor: &'static Reactor = Box::leak(Box::new(Reactor::new().expect("cannot create an epoll")));
    CURRENT.set(Some(reactor));
    let signal = Arc::new(WorkerWaker {
        woken: AtomicBool::new(true),
        sleeping: AtomicBool::new(false),
        reactor,
    });
    let waker = Waker::from(signal.clone());
    let mut cx = Context::from_waker(&waker);
    let mut future = pin!(future);
    let (mut events, mut wakers) = (Vec::with_capacity(BATCH), Vec::new());
    loop {
        if signal.woken.swap(false, SeqCst) {
            if let Poll::Ready(output) = future.as_mut().poll(&mut cx) {
                return output;
            }
        }
        reactor.release();
        signal.sleeping.store(true, SeqCst);
        let timeout = if signal.woken.load(SeqCst) { 0 } else { -1 };
        reactor.wait(&mut events, timeout);
        // Tasks woken from here on are this thread's own: no bell needed.
        signal.sleeping.store(false, SeqCst);
        reactor.dispatch(&events, &mut wakers);
    }
}

/// One direction of a source.
#[derive(Default)]
struct Direction {
    /// Readiness events seen.
    tick: u32,
    /// `tick` when the last attempt that would have blocked began: ready while they differ.
    cleared: u32,
    waker: Option<Waker>,
}

#[derive(Default)]
struct State {
    /// The reactor whose epoll holds the descriptor, once a task waited on it.
    reactor: Option<&'static Reactor>,
    directions: [Direction; 2],
    /// The peer hung up, or the socket failed: a short read no longer means "drained".
    hung_up: bool,
}

impl State {
    /// The tick an attempt in `direction` starts at, or None while that attempt would only
    /// block: registered, and no edge since the last attempt that would have.
    fn attempt(&self, direction: usize) -> Option<u32> {
        let direction = &self.directions[direction];
        (self.reactor.is_none() || direction.tick != direction.cleared).then_some(direction.tick)
    }
}

struct Source {
    fd: RawFd,
    state: Mutex<State>,
}

impl Source {
    fn ready(&self, events: u32, wakers: &mut Vec<Waker>) {
        const READABLE: u32 = (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLHUP | libc::EPOLLERR) as u32;
        const WRITABLE: u32 = (libc::EPOLLOUT | libc::EPOLLHUP | libc::EPOLLERR) as u32;
        const HUNG_UP: u32 = (libc::EPOLLRDHUP | libc::EPOLLHUP | libc::EPOLLERR) as u32;
        let mut state = lock(&self.state);
        state.hung_up |= events & HUNG_UP != 0;
        for (direction, mask) in [(READ, READABLE), (WRITE, WRITABLE)] {
            if events & mask != 0 {
                let direction = &mut state.directions[direction];
                direction.tick = direction.tick.wrapping_add(1);
                wakers.extend(direction.waker.take());
            }
        }
    }
}

/// A non-blocking socket (or other descriptor) whose readiness comes from the reactor.
pub struct Async<T> {
    source: Arc<Source>,
    io: T,
}

impl<T: AsFd> Async<T> {
    /// Makes `io` non-blocking and wraps it.
    pub fn new(io: T) -> io::Result<Self> {
        let on: libc::c_int = 1;
        // SAFETY: FIONBIO reads one int from a live local.
        check(unsafe { libc::ioctl(io.as_fd().as_raw_fd(), libc::FIONBIO, &on) })?;
        Ok(Self::new_nonblocking(io))
    }

    /// Wraps `io`, which is already non-blocking.
    pub fn new_nonblocking(io: T) -> Self {
        Async {
            source: Arc::new(Source {
                fd: io.as_fd().as_raw_fd(),
                state: Mutex::default(),
            }),
            io,
        }
    }
}

impl<T: std::fmt::Debug> std::fmt::Debug for Async<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Async").field(&self.io).finish()
    }
}

impl<T> Async<T> {
    pub fn get_ref(&self) -> &T {
        &self.io
    }

    /// Ready while `direction` is ready (see the module's docs). The first wait puts the
    /// descriptor in the current thread's reactor, which then reports what is ready already.
    fn poll_ready(&self, direction: usize, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_ready_after(direction, None, cx)
    }

    /// As [`Async::poll_ready`]; `failed_at`: an attempt that began at that tick would have
    /// blocked.
    fn poll_ready_after(&self, direction: usize, failed_at: Option<u32>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut state = lock(&self.source.state);
        if state.reactor.is_none() {
            let reactor = current();
            let data = Arc::into_raw(self.source.clone());
            if let Err(e) = reactor.ctl(libc::EPOLL_CTL_ADD, self.source.fd, data as u64) {
                // SAFETY: the reference just made, which the epoll did not take.
                drop(unsafe { Arc::from_raw(data) });
                return Poll::Ready(Err(e));
            }
            state.reactor = Some(reactor);
        }
        let direction = &mut state.directions[direction];
        if let Some(tick) = failed_at {
            direction.cleared = tick;
        }
        if direction.tick != direction.cleared {
            return Poll::Ready(Ok(()));
        }
        match &direction.waker {
            Some(waker) if waker.will_wake(cx.waker()) => {}
            _ => {
                // One waiter per direction; one put aside still gets its turn to look again.
                let previous = direction.waker.replace(cx.waker().clone());
                drop(state);
                if let Some(previous) = previous {
                    previous.wake();
                }
            }
        }
        Poll::Pending
    }

    pub fn poll_readable(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_ready(READ, cx)
    }

    pub fn poll_writable(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_ready(WRITE, cx)
    }

    /// Waits until writable; a non-blocking connect is complete once this is ready.
    pub async fn writable(&self) -> io::Result<()> {
        std::future::poll_fn(|cx| self.poll_writable(cx)).await
    }

    /// Attempts `op` until it does not fail with `WouldBlock`, waiting for readability between.
    pub async fn read_with<R>(&self, mut op: impl FnMut(&T) -> io::Result<R>) -> io::Result<R> {
        std::future::poll_fn(|cx| self.poll_with(READ, cx, &mut op)).await
    }

    /// As [`Async::read_with`], waiting for writability.
    pub async fn write_with<R>(&self, mut op: impl FnMut(&T) -> io::Result<R>) -> io::Result<R> {
        std::future::poll_fn(|cx| self.poll_with(WRITE, cx, &mut op)).await
    }

    /// `op` once the socket is readable; Pending (and a wake-up when it is) while `op` would
    /// block. For system calls of the caller's own, such as splice.
    pub fn poll_read_with<R>(
        &self,
        cx: &mut Context<'_>,
        mut op: impl FnMut(&T) -> io::Result<R>,
    ) -> Poll<io::Result<R>> {
        self.poll_with(READ, cx, &mut op)
    }

    /// As [`Async::poll_read_with`], for writing.
    pub fn poll_write_with<R>(
        &self,
        cx: &mut Context<'_>,
        mut op: impl FnMut(&T) -> io::Result<R>,
    ) -> Poll<io::Result<R>> {
        self.poll_with(WRITE, cx, &mut op)
    }

    /// Tries `op` while the direction is ready, without a trip through the reactor first;
    /// waits while it is not.
    fn poll_with<R>(
        &self,
        direction: usize,
        cx: &mut Context<'_>,
        op: &mut impl FnMut(&T) -> io::Result<R>,
    ) -> Poll<io::Result<R>> {
        self.poll_attempt(direction, cx, op)
            .map(|attempt| attempt.map(|(result, _)| result))
    }

    /// As [`Async::poll_with`], with the tick the successful attempt started at.
    fn poll_attempt<R>(
        &self,
        direction: usize,
        cx: &mut Context<'_>,
        op: &mut impl FnMut(&T) -> io::Result<R>,
    ) -> Poll<io::Result<(R, u32)>> {
        loop {
            let attempt = lock(&self.source.state).attempt(direction);
            let Some(tick) = attempt else {
                futures::ready!(self.poll_ready_after(direction, None, cx))?;
                continue;
            };
            match op(&self.io) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                result => return Poll::Ready(result.map(|r| (r, tick))),
            }
            futures::ready!(self.poll_ready_after(direction, Some(tick), cx))?;
        }
    }

    /// After a read that started at `tick` returned fewer bytes than asked for: the stream
    /// socket is drained, unless its peer hung up (see the module's docs).
    fn drained(&self, tick: u32) {
        let mut state = lock(&self.source.state);
        if !state.hung_up && state.reactor.is_some() {
            state.directions[READ].cleared = tick;
        }
    }
}

impl Async<UdpSocket> {
    pub async fn recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        self.read_with(|s| s.recv_from(buf)).await
    }

    pub async fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.read_with(|s| s.recv(buf)).await
    }

    pub async fn send(&self, buf: &[u8]) -> io::Result<usize> {
        self.write_with(|s| s.send(buf)).await
    }
}

impl<T> Drop for Async<T> {
    fn drop(&mut self) {
        let Some(reactor) = lock(&self.source.state).reactor else {
            return;
        };
        // Out of the epoll before the descriptor closes (after this, with `io`): a number
        // that is reused at once must not find this source there.
        let _ = reactor.ctl(libc::EPOLL_CTL_DEL, self.source.fd, 0);
        let source = SourcePtr(Arc::as_ptr(&self.source));
        if reactor.is_current() {
            // SAFETY: the epoll's reference (see `poll_ready`); this thread is the reactor's,
            // and it is not inside `dispatch`, which holds no reference across a wake.
            unsafe { Arc::decrement_strong_count(source.0) };
        } else {
            reactor.defer_release(source);
        }
    }
}

/// Reads from a stream socket (TCP, Unix stream): a short read counts as drained.
impl<T> AsyncRead for &Async<T>
where
    for<'a> &'a T: Read,
{
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        let len = buf.len();
        let (n, tick) = futures::ready!(self.poll_attempt(READ, cx, &mut |mut io: &T| io.read(buf)))?;
        if n > 0 && n < len {
            self.drained(tick);
        }
        Poll::Ready(Ok(n))
    }
}

impl<T> AsyncWrite for &Async<T>
where
    for<'a> &'a T: Write,
{
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.poll_with(WRITE, cx, &mut |mut io: &T| io.write(buf))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_with(WRITE, cx, &mut |mut io: &T| io.flush())
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_flush(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::os::unix::net::UnixStream;
    use std::time::Duration;

    use futures::{AsyncReadExt, FutureExt};

    use super::*;
    use crate::rt::{block_on, timeout};

    fn readable(socket: &Async<UnixStream>) -> impl Future<Output = io::Result<()>> + '_ {
        std::future::poll_fn(|cx| socket.poll_readable(cx))
    }

    /// Bytes the peer sends now reach a reader that waits for them.
    fn new_bytes_wake_the_reader(peer: &mut UnixStream, socket: &Async<UnixStream>) {
        peer.write_all(b"two").unwrap();
        let mut buf = [0u8; 64];
        let mut reader = socket;
        let n = block_on(timeout(Duration::from_secs(10), reader.read(&mut buf)));
        assert_eq!(n.expect("woken by the new bytes").unwrap(), 3);
        assert_eq!(&buf[..3], b"two");
    }

    #[test]
    fn a_short_read_leaves_the_socket_ready_for_the_fin_that_came_with_it() {
        let (mut peer, socket) = UnixStream::pair().unwrap();
        let socket = Async::new(socket).unwrap();
        peer.write_all(b"last").unwrap();
        peer.shutdown(std::net::Shutdown::Write).unwrap();
        // One edge brings both the bytes and the FIN.
        block_on(timeout(Duration::from_secs(10), readable(&socket)))
            .expect("readable")
            .unwrap();
        let mut buf = [0u8; 64];
        assert_eq!(block_on((&socket).read(&mut buf)).unwrap(), 4, "a short read");
        // No edge follows for the FIN: the socket must still count as readable.
        let still = readable(&socket).now_or_never();
        assert!(matches!(still, Some(Ok(()))), "readiness was cleared by a short read");
        assert_eq!(block_on((&socket).read(&mut buf)).unwrap(), 0);
    }

    #[test]
    fn an_attempt_that_would_block_clears_readiness_until_the_next_edge() {
        let (mut peer, socket) = UnixStream::pair().unwrap();
        let socket = Async::new(socket).unwrap();
        peer.write_all(b"one").unwrap();
        let mut buf = [0u8; 64];
        assert_eq!(block_on((&socket).read(&mut buf)).unwrap(), 3);
        // Nothing left: the next read would block, and waits.
        assert!((&socket).read(&mut buf).now_or_never().is_none());
        assert!(readable(&socket).now_or_never().is_none());
        new_bytes_wake_the_reader(&mut peer, &socket);
    }

    #[test]
    fn a_short_read_counts_as_drained_until_new_bytes_bring_an_edge() {
        let (mut peer, socket) = UnixStream::pair().unwrap();
        let socket = Async::new(socket).unwrap();
        peer.write_all(b"one").unwrap();
        block_on(timeout(Duration::from_secs(10), readable(&socket)))
            .expect("readable")
            .unwrap();
        let mut buf = [0u8; 64];
        assert_eq!(block_on((&socket).read(&mut buf)).unwrap(), 3, "a short read");
        // The kernel gave all it had: no longer ready, and no attempt (which would only say
        // EAGAIN) is made until an edge comes.
        let state = lock(&socket.source.state);
        assert!(!state.hung_up);
        assert_eq!(state.attempt(READ), None, "a short read left the socket ready");
        drop(state);
        assert!(readable(&socket).now_or_never().is_none());
        new_bytes_wake_the_reader(&mut peer, &socket);
    }

    #[test]
    fn a_task_waits_in_its_own_workers_reactor_and_a_drop_elsewhere_is_released_there() {
        let (mut peer, socket) = UnixStream::pair().unwrap();
        let socket = Async::new(socket).unwrap();
        let task = crate::rt::spawn(async move {
            // The first wait puts the socket in a reactor: this worker's.
            readable(&socket).await.unwrap();
            let mut buf = [0u8; 8];
            let n = (&socket).read(&mut buf).await.unwrap();
            let joined = lock(&socket.source.state).reactor.is_some_and(Reactor::is_current);
            (n, joined, socket)
        });
        peer.write_all(b"hi").unwrap();
        let (n, joined, socket) = block_on(timeout(Duration::from_secs(10), task)).expect("the task ends");
        assert_eq!(n, 2);
        assert!(joined, "the socket joined another thread's reactor");
        let reactor = lock(&socket.source.state).reactor.expect("registered");
        let source = Arc::downgrade(&socket.source);
        // Dropped here, on the test's thread: the worker lets go of it at its next turn.
        drop(socket);
        reactor.ring();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while source.strong_count() > 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "the worker never let go of the source"
            );
            std::thread::yield_now();
        }
    }
}
