//! The event loop's half that waits: one epoll instance per worker, its sockets and its timers.
//!
//! Every socket is registered once, edge-triggered, for both directions (EPOLLIN | EPOLLOUT |
//! EPOLLRDHUP | EPOLLET), and never touched again until it is deleted: a wait costs no
//! epoll_ctl, unlike a one-shot registration that must be re-armed before each. With edges the
//! kernel only says when something *changed*, so each socket keeps what it last heard, a
//! readiness bit per direction: set by an event, cleared by the operation that found nothing
//! (EAGAIN) or, for a stream, by a read that took less than it asked for. A task first looks
//! at the bit and calls the socket only when it is set, so a call that would find nothing is
//! not made. A tick, bumped by every event, makes a clear that races an event lose (the event
//! wins): a readiness is only cleared if nothing was heard since it was looked at.
//!
//! A socket is registered with the reactor of the thread that first waits on it: a worker's own
//! reactor, or, on any other thread (tests, an embedder's), the process's one I/O thread's.
//! Its events are then always handled where its task runs. Epoll data are keys into a slab
//! (index and generation), never pointers; a socket is deleted from the epoll before its
//! descriptor closes ([`Async`]'s drop).
//!
//! All of this is rustix's safe epoll and eventfd, the calls the `polling` crate itself is
//! built on: polling's wait re-arms its notifier and its timerfd with two more epoll_ctl, a
//! timerfd_settime and a read around every epoll_wait (five system calls a wait where one
//! does), which is the cost this loop is here to remove.

use std::collections::BTreeMap;
use std::future::Future;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use futures::io::{AsyncRead, AsyncWrite};
use rustix::event::{EventfdFlags, epoll, eventfd};

/// The epoll data of the reactor's own eventfd (a slab key is never this).
const NOTIFY: u64 = u64::MAX;

/// One of a socket's two directions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dir {
    Read = 0,
    Write = 1,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One event loop's epoll, sockets and timers.
pub(crate) struct Reactor {
    epoll: OwnedFd,
    /// Written to wake the loop when it sleeps and work comes from another thread.
    notify: OwnedFd,
    sources: Mutex<slab::Slab<Arc<Source>>>,
    /// Counts registrations: a key's generation, so that a late event of a deleted socket never
    /// reaches the one registered in its slot after it.
    generation: AtomicU64,
    timers: Mutex<BTreeMap<(Instant, u64), Waker>>,
    timer_ids: AtomicU64,
    /// The loop is in (or about to enter) epoll_wait: a wake-up must write the eventfd.
    sleeping: AtomicBool,
}

thread_local! {
    /// The reactor of the worker this thread is.
    static LOCAL: std::cell::RefCell<Option<Arc<Reactor>>> = const { std::cell::RefCell::new(None) };
}

impl Reactor {
    pub fn new() -> io::Result<Arc<Reactor>> {
        let epoll = epoll::create(epoll::CreateFlags::CLOEXEC)?;
        let notify = eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)?;
        // Edge-triggered, never read: each write is a new edge (the counter cannot fill up in
        // practice, 2^64 - 2 writes), so a wake-up costs the waker one write and the loop nothing.
        let flags = epoll::EventFlags::IN | epoll::EventFlags::ET;
        epoll::add(&epoll, &notify, epoll::EventData::new_u64(NOTIFY), flags)?;
        Ok(Arc::new(Reactor {
            epoll,
            notify,
            sources: Mutex::new(slab::Slab::new()),
            generation: AtomicU64::new(0),
            timers: Mutex::new(BTreeMap::new()),
            timer_ids: AtomicU64::new(0),
            sleeping: AtomicBool::new(false),
        }))
    }

    /// Makes `reactor` this thread's (a worker's, at its start).
    pub fn set_local(reactor: Option<Arc<Reactor>>) {
        LOCAL.set(reactor);
    }

    /// This worker's reactor; on a thread that is none, the process's I/O thread's.
    pub fn current() -> Arc<Reactor> {
        LOCAL.with_borrow(|r| r.clone()).unwrap_or_else(|| global().clone())
    }

    /// Wakes the loop if it sleeps (from another thread: a task scheduled, a timer set).
    pub fn wake(&self) {
        if self.sleeping.swap(false, Ordering::SeqCst) {
            let _ = rustix::io::write(&self.notify, &1u64.to_ne_bytes());
        }
    }

    fn register(self: &Arc<Self>, fd: impl AsFd) -> io::Result<Registration> {
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) & 0xffff_ffff;
        let mut sources = lock(&self.sources);
        let entry = sources.vacant_entry();
        let key = (generation << 32) | entry.key() as u64;
        let source = Arc::new(Source {
            key,
            state: Mutex::new(State::default()),
        });
        use epoll::EventFlags as E;
        let flags = E::IN | E::OUT | E::RDHUP | E::ET;
        epoll::add(&self.epoll, fd, epoll::EventData::new_u64(key), flags)?;
        entry.insert(source.clone());
        Ok(Registration {
            reactor: self.clone(),
            source,
        })
    }

    /// One turn of the loop: waits for events (not at all unless `block`, and never past the
    /// next timer), hands them to the sockets' tasks, fires due timers. `more` is asked once
    /// the loop has said it sleeps: work that came in meanwhile turns the wait into a look.
    pub fn turn(&self, events: &mut Vec<epoll::Event>, wakers: &mut Vec<Waker>, block: bool, more: &dyn Fn() -> bool) {
        let mut timeout = Some(Duration::ZERO);
        if block {
            self.sleeping.store(true, Ordering::SeqCst);
            if !more() {
                timeout = self.next_timer().map(|at| at.saturating_duration_since(Instant::now()));
            }
        }
        let spec = timeout.map(|t| rustix::event::Timespec {
            tv_sec: t.as_secs().min(i32::MAX as u64 / 1000) as _,
            tv_nsec: t.subsec_nanos() as _,
        });
        events.clear();
        let waited = epoll::wait(&self.epoll, rustix::buffer::spare_capacity(events), spec.as_ref());
        self.sleeping.store(false, Ordering::SeqCst);
        if let Err(e) = waited {
            if e != rustix::io::Errno::INTR {
                log::error!(err:% = e; "epoll_wait failed");
            }
        }
        if !events.is_empty() {
            let sources = lock(&self.sources);
            for event in events.iter() {
                let key = event.data.u64();
                if key == NOTIFY {
                    continue;
                }
                match sources.get((key & 0xffff_ffff) as usize) {
                    Some(source) if source.key == key => source.fire(event.flags, wakers),
                    _ => {}
                }
            }
        }
        self.fire_timers(wakers);
        // Outside every lock: a wake may drop a task (a stopped worker's), and its sockets.
        for waker in wakers.drain(..) {
            waker.wake();
        }
    }

    fn next_timer(&self) -> Option<Instant> {
        lock(&self.timers).keys().next().map(|(at, _)| *at)
    }

    fn fire_timers(&self, wakers: &mut Vec<Waker>) {
        let mut timers = lock(&self.timers);
        let Some(&(first, _)) = timers.keys().next() else {
            return;
        };
        let now = Instant::now();
        if first > now {
            return;
        }
        let later = timers.split_off(&(now, u64::MAX));
        wakers.extend(std::mem::replace(&mut *timers, later).into_values());
    }

    /// Every waker it holds, taken out: a stopping worker wakes them so that their tasks end.
    pub fn take_wakers(&self) -> Vec<Waker> {
        let mut all: Vec<Waker> = std::mem::take(&mut *lock(&self.timers)).into_values().collect();
        for (_, source) in lock(&self.sources).iter() {
            let mut state = lock(&source.state);
            all.extend(state.wakers.iter_mut().filter_map(Option::take));
        }
        all
    }
}

/// The process's I/O reactor, for sockets first waited on outside any worker (a test's or an
/// embedder's thread), turned by a thread of its own.
fn global() -> &'static Arc<Reactor> {
    static GLOBAL: OnceLock<Arc<Reactor>> = OnceLock::new();
    GLOBAL.get_or_init(|| {
        let reactor = Reactor::new().expect("cannot create the I/O thread's epoll");
        let turned = reactor.clone();
        std::thread::Builder::new()
            .name("relayd-io".into())
            .spawn(move || {
                let (mut events, mut wakers) = (Vec::with_capacity(64), Vec::new());
                loop {
                    turned.turn(&mut events, &mut wakers, true, &|| false);
                }
            })
            .expect("cannot start the I/O thread");
        reactor
    })
}

/// A socket as its reactor knows it.
struct Source {
    key: u64,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Bumped by every event.
    tick: u64,
    /// Readiness per direction, as last heard.
    ready: [bool; 2],
    /// The peer closed (or the socket failed): sticky, no clear takes it, so a read after a
    /// short one still finds the end.
    closed: [bool; 2],
    wakers: [Option<Waker>; 2],
}

impl Source {
    fn fire(&self, flags: epoll::EventFlags, wakers: &mut Vec<Waker>) {
        use epoll::EventFlags as E;
        let mut state = lock(&self.state);
        state.tick = state.tick.wrapping_add(1);
        let failed = flags.intersects(E::ERR | E::HUP);
        let sides = [
            (flags.intersects(E::IN | E::PRI), failed || flags.contains(E::RDHUP)),
            (flags.contains(E::OUT), failed),
        ];
        for (i, (ready, closed)) in sides.into_iter().enumerate() {
            if ready || closed {
                state.ready[i] = true;
                state.closed[i] |= closed;
                wakers.extend(state.wakers[i].take());
            }
        }
    }
}

/// A socket's registration with a reactor.
struct Registration {
    reactor: Arc<Reactor>,
    source: Arc<Source>,
}

impl Registration {
    /// Deletes `fd` from the epoll and the source from the slab: before `fd` closes, since
    /// epoll knows an open file, not a descriptor, and one that outlived its descriptor (a dup)
    /// would keep reporting to a dead key.
    fn deregister(&self, fd: impl AsFd) {
        let _ = epoll::delete(&self.reactor.epoll, fd);
        lock(&self.reactor.sources).remove((self.source.key & 0xffff_ffff) as usize);
    }
}

/// What a readiness was when it was looked at: a clear with it loses to any event since.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Tick(u64);

impl Registration {
    fn poll_ready(&self, dir: Dir, cx: &mut Context<'_>) -> Poll<Tick> {
        let mut state = lock(&self.source.state);
        let i = dir as usize;
        if state.ready[i] {
            return Poll::Ready(Tick(state.tick));
        }
        match &mut state.wakers[i] {
            Some(waker) if waker.will_wake(cx.waker()) => {}
            slot => *slot = Some(cx.waker().clone()),
        }
        Poll::Pending
    }

    fn clear(&self, dir: Dir, Tick(tick): Tick) {
        let mut state = lock(&self.source.state);
        let i = dir as usize;
        if state.tick == tick && !state.closed[i] {
            state.ready[i] = false;
        }
    }
}

/// A non-blocking socket (or any descriptor epoll takes) driven by a reactor: the registration
/// type. It is registered on first wait, with the reactor of the thread that waits, and
/// deleted from that epoll when dropped, before the descriptor closes.
pub struct Async<T: AsFd> {
    io: Option<T>,
    registration: OnceLock<Registration>,
}

impl<T: AsFd> Async<T> {
    /// Makes `io` non-blocking; it is registered when first waited on.
    pub fn new(io: T) -> io::Result<Async<T>> {
        rustix::io::ioctl_fionbio(&io, true)?;
        Ok(Async::new_nonblocking(io))
    }

    /// `io`, which is non-blocking already (accept4's, socket(SOCK_NONBLOCK)'s).
    pub fn new_nonblocking(io: T) -> Async<T> {
        Async {
            io: Some(io),
            registration: OnceLock::new(),
        }
    }

    pub fn get_ref(&self) -> &T {
        self.io.as_ref().expect("an Async holds its socket until dropped")
    }

    fn registration(&self) -> io::Result<&Registration> {
        if let Some(registration) = self.registration.get() {
            return Ok(registration);
        }
        let registration = Reactor::current().register(self.get_ref())?;
        if let Err(lost) = self.registration.set(registration) {
            // Another thread registered it first: keep theirs.
            lost.deregister(self.get_ref());
        }
        Ok(self.registration.get().expect("set above"))
    }

    /// Ready when the direction is (as far as the reactor has heard); the tick goes to
    /// [`Async::clear`] if the call then finds nothing.
    pub(crate) fn poll_ready(&self, dir: Dir, cx: &mut Context<'_>) -> Poll<io::Result<Tick>> {
        match self.registration() {
            Ok(registration) => registration.poll_ready(dir, cx).map(Ok),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    /// The direction found nothing at `tick`: wait for the next event.
    pub(crate) fn clear(&self, dir: Dir, tick: Tick) {
        if let Some(registration) = self.registration.get() {
            registration.clear(dir, tick);
        }
    }

    /// `op` once `dir` is ready, again after each EAGAIN once the reactor says so.
    pub(crate) fn poll_io<R>(
        &self,
        dir: Dir,
        cx: &mut Context<'_>,
        mut op: impl FnMut(&T) -> io::Result<R>,
    ) -> Poll<io::Result<R>> {
        loop {
            let tick = futures::ready!(self.poll_ready(dir, cx))?;
            match op(self.get_ref()) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.clear(dir, tick),
                result => return Poll::Ready(result),
            }
        }
    }

    /// Waits until the socket is writable (a connect has finished, one way or the other).
    pub async fn writable(&self) -> io::Result<()> {
        std::future::poll_fn(|cx| self.poll_ready(Dir::Write, cx).map_ok(drop)).await
    }

    /// `op` (a read-side system call of the caller's) once it does not find nothing.
    pub async fn read_with<R>(&self, mut op: impl FnMut(&T) -> io::Result<R>) -> io::Result<R> {
        std::future::poll_fn(|cx| self.poll_io(Dir::Read, cx, &mut op)).await
    }

    /// As [`Async::read_with`], for writing.
    pub async fn write_with<R>(&self, mut op: impl FnMut(&T) -> io::Result<R>) -> io::Result<R> {
        std::future::poll_fn(|cx| self.poll_io(Dir::Write, cx, &mut op)).await
    }
}

impl<T: AsFd> Drop for Async<T> {
    fn drop(&mut self) {
        if let (Some(registration), Some(io)) = (self.registration.take(), self.io.take()) {
            registration.deregister(&io);
        }
    }
}

impl Async<std::net::UdpSocket> {
    pub async fn recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, std::net::SocketAddr)> {
        self.read_with(|s| s.recv_from(buf)).await
    }

    /// Receives on a connected socket.
    pub async fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.read_with(|s| s.recv(buf)).await
    }

    /// Sends on a connected socket.
    pub async fn send(&self, buf: &[u8]) -> io::Result<usize> {
        self.write_with(|s| s.send(buf)).await
    }
}

impl<T: AsFd> AsyncRead for &Async<T>
where
    for<'a> &'a T: Read,
{
    /// A stream's read: a read that took less than it asked for emptied the socket, so the
    /// next one waits for the reactor's word instead of calling to find nothing (the end of
    /// the stream stays readable: its mark is sticky).
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        loop {
            let tick = futures::ready!(self.poll_ready(Dir::Read, cx))?;
            match Read::read(&mut self.get_ref(), buf) {
                Ok(n) => {
                    if n > 0 && n < buf.len() {
                        self.clear(Dir::Read, tick);
                    }
                    return Poll::Ready(Ok(n));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.clear(Dir::Read, tick),
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl<T: AsFd> AsyncWrite for &Async<T>
where
    for<'a> &'a T: Write,
{
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.poll_io(Dir::Write, cx, |mut io| io.write(buf))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl<T: AsFd + Unpin> AsyncRead for Async<T>
where
    for<'a> &'a T: Read,
{
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut &*self).poll_read(cx, buf)
    }
}

impl<T: AsFd + Unpin> AsyncWrite for Async<T>
where
    for<'a> &'a T: Write,
{
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut &*self).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// A point in time to wait for, on the reactor of the thread that waits for it. Re-aimed with
/// [`Timer::set_at`]; the reactor hears of the new time at the next wait, not before.
pub struct Timer {
    at: Instant,
    /// Where it waits now: the reactor, and its key there.
    entry: Option<(Arc<Reactor>, (Instant, u64))>,
}

impl Timer {
    pub fn after(duration: Duration) -> Timer {
        Timer::at(Instant::now().checked_add(duration).unwrap_or_else(far_future))
    }

    pub fn at(at: Instant) -> Timer {
        Timer { at, entry: None }
    }

    pub fn set_at(&mut self, at: Instant) {
        self.at = at;
    }

    fn cancel(&mut self) {
        if let Some((reactor, key)) = self.entry.take() {
            lock(&reactor.timers).remove(&key);
        }
    }
}

fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(86400 * 365 * 30)
}

impl Future for Timer {
    type Output = Instant;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Instant> {
        if Instant::now() >= self.at {
            self.cancel();
            return Poll::Ready(self.at);
        }
        let at = self.at;
        if let Some((reactor, key)) = &self.entry {
            if key.0 == at {
                let mut timers = lock(&reactor.timers);
                if let Some(waker) = timers.get_mut(key) {
                    if !waker.will_wake(cx.waker()) {
                        *waker = cx.waker().clone();
                    }
                    return Poll::Pending;
                }
                // Fired meanwhile (its waker taken) though it is not due by our clock: again.
            }
        }
        self.cancel();
        let reactor = Reactor::current();
        let key = (at, reactor.timer_ids.fetch_add(1, Ordering::Relaxed));
        lock(&reactor.timers).insert(key, cx.waker().clone());
        // A loop asleep past this time (it was set from another thread) looks again.
        reactor.wake();
        self.entry = Some((reactor, key));
        Poll::Pending
    }
}

impl Drop for Timer {
    fn drop(&mut self) {
        self.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    /// Turns `reactor` until `done`, at most `turns` times.
    fn turn_until(reactor: &Reactor, turns: usize, done: impl Fn() -> bool) -> bool {
        let (mut events, mut wakers) = (Vec::with_capacity(8), Vec::new());
        for _ in 0..turns {
            if done() {
                return true;
            }
            reactor.turn(&mut events, &mut wakers, true, &|| false);
        }
        done()
    }

    struct Flag(AtomicBool);
    impl std::task::Wake for Flag {
        fn wake(self: Arc<Self>) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    /// A reactor made this thread's, and a waker that raises a flag.
    fn local() -> (Arc<Reactor>, Arc<Flag>, Waker) {
        let reactor = Reactor::new().unwrap();
        Reactor::set_local(Some(reactor.clone()));
        let flag = Arc::new(Flag(AtomicBool::new(false)));
        (reactor, flag.clone(), Waker::from(flag))
    }

    #[test]
    fn a_socket_is_deleted_from_its_epoll_before_it_closes_and_its_slot_is_reused_safely() {
        let (reactor, flag, waker) = local();
        let mut cx = Context::from_waker(&waker);
        let (a, b) = UnixStream::pair().unwrap();
        let a = Async::new(a).unwrap();
        // Registered on first wait: nothing to read, so it waits.
        assert!(a.poll_ready(Dir::Read, &mut cx).is_pending());
        assert_eq!(lock(&reactor.sources).len(), 1);
        // The write side: the registration's first event says it is writable.
        (&b).write_all(b"x").unwrap();
        assert!(turn_until(&reactor, 10, || flag.0.load(Ordering::SeqCst)), "no event");
        assert!(a.poll_ready(Dir::Read, &mut cx).is_ready());
        let dup = a.get_ref().try_clone().unwrap();
        drop(a);
        // Gone from the slab, and deleted from the epoll although a dup keeps the file open:
        // a new socket in the same slot hears nothing of the old one.
        assert_eq!(lock(&reactor.sources).len(), 0);
        let (c, _d) = UnixStream::pair().unwrap();
        let c = Async::new(c).unwrap();
        flag.0.store(false, Ordering::SeqCst);
        assert!(c.poll_ready(Dir::Read, &mut cx).is_pending());
        (&b).write_all(b"more for the dup").unwrap();
        let (mut events, mut wakers) = (Vec::with_capacity(8), Vec::new());
        reactor.turn(&mut events, &mut wakers, false, &|| false);
        reactor.turn(&mut events, &mut wakers, false, &|| false);
        assert!(
            !flag.0.load(Ordering::SeqCst),
            "an event of the dropped socket woke the new one"
        );
        assert!(c.poll_ready(Dir::Read, &mut cx).is_pending());
        drop(dup);
        Reactor::set_local(None);
    }

    #[test]
    fn a_short_read_waits_for_an_event_but_the_end_of_the_stream_stays_readable() {
        let (reactor, flag, waker) = local();
        let mut cx = Context::from_waker(&waker);
        let (a, b) = UnixStream::pair().unwrap();
        let a = Async::new(a).unwrap();
        (&b).write_all(b"abc").unwrap();
        drop(b);
        let mut buf = [0u8; 16];
        assert!(Pin::new(&mut &a).poll_read(&mut cx, &mut buf).is_pending());
        assert!(turn_until(&reactor, 10, || flag.0.load(Ordering::SeqCst)), "no event");
        // Data and the end came in one event; the short read clears readability, the end's
        // mark keeps it: the next read finds the end at once instead of waiting forever.
        assert!(matches!(
            Pin::new(&mut &a).poll_read(&mut cx, &mut buf),
            Poll::Ready(Ok(3))
        ));
        assert!(matches!(
            Pin::new(&mut &a).poll_read(&mut cx, &mut buf),
            Poll::Ready(Ok(0))
        ));
        Reactor::set_local(None);
    }

    #[test]
    fn timers_fire_in_order_and_a_cancelled_one_never_does() {
        let reactor = Reactor::new().unwrap();
        Reactor::set_local(Some(reactor.clone()));
        let flags: Vec<_> = (0..3).map(|_| Arc::new(Flag(AtomicBool::new(false)))).collect();
        let start = Instant::now();
        let mut timers: Vec<Timer> = [30, 10, 20]
            .map(|ms| Timer::at(start + Duration::from_millis(ms)))
            .into();
        for (timer, flag) in timers.iter_mut().zip(&flags) {
            let waker = Waker::from(flag.clone());
            assert!(Pin::new(timer).poll(&mut Context::from_waker(&waker)).is_pending());
        }
        drop(timers.remove(0));
        let fired = |i: usize| flags[i].0.load(Ordering::SeqCst);
        assert!(turn_until(&reactor, 100, || fired(1) && fired(2)));
        assert!(start.elapsed() >= Duration::from_millis(20));
        assert!(!fired(0), "a dropped timer fired");
        assert!(lock(&reactor.timers).is_empty());
        Reactor::set_local(None);
    }
}
