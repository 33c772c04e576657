//! The one place that names the async runtime. Each worker thread runs its own event loop
//! ([`worker`]): a run queue of async-task tasks and a reactor of its own ([`reactor`]: an
//! epoll, edge-triggered, and its timers), so a session's sockets are waited on, their events
//! handled and its tasks polled all on the thread it started on, and no event is handed from
//! one thread to another. Blocking work (name lookups) goes to the `blocking` pool; `block_on`
//! (for `main`, examples, tests) is async-io's, and an embedder's async-std streams go through
//! async-io's reactor as they always did. Everything else in the crate goes through these few
//! items, so a change of runtime touches this module only.
//!
//! A [`Runtime`] belongs to whoever starts it (each [`crate::Relay`] has its own, sized by its
//! `workers`). [`spawn`] puts a task on the runtime of the thread it is called from: a
//! runtime's worker, or a thread inside [`Runtime::enter`]. Called from anywhere else (unit
//! tests, an embedder using an actor alone), it uses a default runtime started on first use.

mod reactor;
mod worker;

use std::cell::RefCell;
use std::future::Future;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::io::{AsyncRead, AsyncWrite};

pub use reactor::{Async, Timer};
use worker::Worker;

/// A runtime's workers: a task runs on the one it was given for its whole life, so its
/// sockets, buffers and state stay in that core's cache. New tasks go to the workers in turn,
/// unless they are placed ([`spawn_on`], [`spawn_here`]).
struct Pool {
    /// Tells this pool's workers from another relay's.
    id: u64,
    workers: Vec<Arc<Worker>>,
    next: AtomicUsize,
}

/// A set of worker threads and the tasks on them. Dropping it stops the workers (tasks still
/// on them are dropped) and waits for them, unless it is dropped on one of them.
pub struct Runtime {
    pool: Arc<Pool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

thread_local! {
    /// The runtime whose worker this thread is, or that it has entered.
    static CURRENT: RefCell<Option<Arc<Pool>>> = const { RefCell::new(None) };
    /// The worker this thread is: its pool's id and its number there.
    static HERE: std::cell::Cell<Option<(u64, usize)>> = const { std::cell::Cell::new(None) };
}

impl Runtime {
    /// Starts `workers` threads (default: one per core), named `relayd-worker-N`.
    pub fn new(workers: Option<std::num::NonZeroUsize>) -> io::Result<Runtime> {
        let count = workers.map_or_else(
            || std::thread::available_parallelism().map_or(1, |n| n.get()),
            |n| n.get(),
        );
        static IDS: AtomicU64 = AtomicU64::new(0);
        let pool = Arc::new(Pool {
            id: IDS.fetch_add(1, Ordering::Relaxed),
            workers: (0..count).map(|_| Worker::new()).collect::<io::Result<_>>()?,
            next: AtomicUsize::new(0),
        });
        let mut runtime = Runtime {
            pool: pool.clone(),
            threads: Vec::with_capacity(count),
        };
        for (i, worker) in pool.workers.iter().cloned().enumerate() {
            let pool = pool.clone();
            let thread = std::thread::Builder::new()
                .name(format!("relayd-worker-{i}"))
                .spawn(move || {
                    HERE.set(Some((pool.id, i)));
                    CURRENT.set(Some(pool));
                    worker.run();
                    CURRENT.set(None);
                })?;
            runtime.threads.push(thread);
        }
        Ok(runtime)
    }

    /// Runs `f` with this runtime current on this thread: what it spawns goes to the runtime.
    pub fn enter<T>(&self, f: impl FnOnce() -> T) -> T {
        let previous = CURRENT.replace(Some(self.pool.clone()));
        let out = f();
        CURRENT.set(previous);
        out
    }

    /// Worker threads.
    pub fn workers(&self) -> usize {
        self.pool.workers.len()
    }

    /// Runs `future` as a task on this runtime.
    pub fn spawn<F>(&self, future: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.pool.spawn(future)
    }
}

impl Pool {
    fn spawn<F>(&self, future: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        self.spawn_on(i, future)
    }

    fn spawn_on<F>(&self, i: usize, future: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        JoinHandle(Some(self.workers[i % self.workers.len()].spawn(future)))
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        for worker in &self.pool.workers {
            worker.close();
        }
        let me = std::thread::current().id();
        for thread in self.threads.drain(..) {
            if thread.thread().id() != me {
                let _ = thread.join();
            }
        }
    }
}

/// The default runtime, for spawns outside any runtime.
fn fallback() -> Arc<Pool> {
    static DEFAULT: std::sync::OnceLock<Runtime> = std::sync::OnceLock::new();
    let runtime = DEFAULT.get_or_init(|| Runtime::new(None).expect("cannot start the default runtime's threads"));
    runtime.pool.clone()
}

/// A handle to a spawned task; awaiting it yields the task's output. Dropping it lets the
/// task run on.
pub struct JoinHandle<T>(Option<async_task::Task<T>>);

impl<T> std::fmt::Debug for JoinHandle<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JoinHandle")
    }
}

impl<T> JoinHandle<T> {
    /// True once the task has ended.
    pub fn is_finished(&self) -> bool {
        self.0.as_ref().is_none_or(async_task::Task::is_finished)
    }
}

impl<T> Future for JoinHandle<T> {
    type Output = T;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        Pin::new(self.0.as_mut().expect("polled after completion")).poll(cx)
    }
}

impl<T> Drop for JoinHandle<T> {
    fn drop(&mut self) {
        if let Some(task) = self.0.take() {
            task.detach();
        }
    }
}

/// A system call's return value, or the `errno` it set when it returned a negative one.
pub(crate) fn check<T: Default + PartialOrd>(result: T) -> io::Result<T> {
    if result < T::default() {
        Err(io::Error::last_os_error())
    } else {
        Ok(result)
    }
}

/// Runs `future` as a task of its own, on the current runtime (see the module's docs).
pub fn spawn<F>(future: F) -> JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    current().spawn(future)
}

/// The runtime this thread is a worker of or has entered; the default one elsewhere.
fn current() -> Arc<Pool> {
    CURRENT.with_borrow(|c| c.clone()).unwrap_or_else(fallback)
}

/// The current runtime's worker threads: how many sockets a route listens on.
pub fn worker_count() -> usize {
    current().workers.len()
}

/// The number of the worker this thread is, in the current runtime; `None` on any other thread.
pub fn worker_index() -> Option<u16> {
    let current = CURRENT.with_borrow(|c| c.as_ref().map(|p| p.id));
    match HERE.get() {
        Some((pool, i)) if Some(pool) == current => u16::try_from(i).ok(),
        _ => None,
    }
}

/// Runs `future` on worker `i` (modulo their count) of the current runtime.
pub fn spawn_on<F>(i: usize, future: F) -> JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    current().spawn_on(i, future)
}

/// Runs `future` on the worker thread this is (on a thread that is none, as [`spawn`]): for a
/// task that trades with the one spawning it at every step.
pub fn spawn_here<F>(future: F) -> JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    let current = current();
    match HERE.get() {
        // A worker that has entered another relay's runtime spawns there as anyone would.
        Some((pool, i)) if pool == current.id => current.spawn_on(i, future),
        _ => current.spawn(future),
    }
}

/// Runs `future` as a task nobody waits for (it answers through a channel of its own).
pub fn detach<F>(future: F)
where
    F: Future<Output = ()> + Send + 'static,
{
    drop(spawn(future));
}

/// Runs `future` to completion on the current thread (for `main`, examples and tests).
pub fn block_on<F: Future>(future: F) -> F::Output {
    async_io::block_on(future)
}

/// Waits `duration`. For back-off only: code never sleeps to wait for an event.
pub async fn sleep(duration: Duration) {
    Timer::after(duration).await;
}

/// `future`'s output, or `None` when `limit` passed first.
pub fn timeout<F: Future>(limit: Duration, future: F) -> Timeout<F> {
    Timeout {
        future,
        timer: Timer::after(limit),
    }
}

pin_project_lite::pin_project! {
    /// [`timeout`]'s future. A combinator rather than an `async fn`: that would hold `future`
    /// twice, as its argument and inside the race it awaits, for as long as it runs (a whole
    /// session, for some callers).
    pub struct Timeout<F> {
        #[pin]
        future: F,
        timer: Timer,
    }
}

impl<F: Future> Future for Timeout<F> {
    type Output = Option<F::Output>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(output) = this.future.poll(cx) {
            return Poll::Ready(Some(output));
        }
        Pin::new(this.timer).poll(cx).map(|_| None)
    }
}

/// The addresses `host` resolves to, by the system resolver on the blocking pool.
pub async fn resolve(host: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
    use std::net::ToSocketAddrs;
    let host = host.to_string();
    blocking::unblock(move || Ok((host.as_str(), port).to_socket_addrs()?.collect())).await
}

/// The output of whichever of `a` and `b` finishes first (`a` when both are ready); the other is
/// dropped.
pub async fn race<T>(a: impl Future<Output = T>, b: impl Future<Output = T>) -> T {
    futures::future::select(std::pin::pin!(a), std::pin::pin!(b))
        .await
        .factor_first()
        .0
}

/// `op` on `socket` once it is readable, for system calls of the caller's own (splice, accept4,
/// recvmsg): called only while the reactor's last word is that the socket is readable, so a
/// call that would find nothing is not made; Pending, with a wake-up at the next event, once
/// `op` finds nothing.
pub fn poll_read_with<T: std::os::fd::AsFd, R>(
    socket: &Async<T>,
    cx: &mut Context<'_>,
    op: impl FnMut(&T) -> io::Result<R>,
) -> Poll<io::Result<R>> {
    socket.poll_io(reactor::Dir::Read, cx, op)
}

/// As [`poll_read_with`], for writing.
pub fn poll_write_with<T: std::os::fd::AsFd, R>(
    socket: &Async<T>,
    cx: &mut Context<'_>,
    op: impl FnMut(&T) -> io::Result<R>,
) -> Poll<io::Result<R>> {
    socket.poll_io(reactor::Dir::Write, cx, op)
}

/// A socket whose write side can be shut down on its own (TCP FIN, or its Unix equivalent).
pub trait HalfClose {
    /// Ends the write direction; the read direction stays open.
    fn shutdown_write(&self) -> io::Result<()>;
}

impl HalfClose for TcpStream {
    fn shutdown_write(&self) -> io::Result<()> {
        self.shutdown(Shutdown::Write)
    }
}

impl HalfClose for UnixStream {
    fn shutdown_write(&self) -> io::Result<()> {
        self.shutdown(Shutdown::Write)
    }
}

/// An async stream socket whose `poll_close` half-closes (shutdown(Write)) instead of only
/// flushing, so a relayed FIN reaches the peer while the other direction keeps flowing.
///
/// async-io's `Async` only flushes on close; a session needs the FIN. (async-std's own
/// `TcpStream` and `UnixStream` do shut down on close, so they can be injected as they are.)
pub struct Conn<S: std::os::fd::AsFd> {
    socket: Async<S>,
}

impl<S: std::os::fd::AsFd> Conn<S> {
    /// A connected socket, made non-blocking; the reactor of the thread that first waits on
    /// it takes it.
    pub fn new(socket: S) -> io::Result<Self> {
        Async::new(socket).map(Conn::from_async)
    }

    /// A socket that is non-blocking already.
    pub(crate) fn new_nonblocking(socket: S) -> Self {
        Conn::from_async(Async::new_nonblocking(socket))
    }

    /// The underlying socket.
    pub fn get_ref(&self) -> &S {
        self.socket.get_ref()
    }

    /// The socket as the reactor knows it, for readiness-driven system calls (splice).
    pub(crate) fn as_async(&self) -> &Async<S> {
        &self.socket
    }
}

impl<S: std::os::fd::AsFd> Conn<S> {
    pub(crate) fn from_async(socket: Async<S>) -> Self {
        Conn { socket }
    }
}

impl Conn<UnixStream> {
    /// A connected pair of Unix stream sockets: one end for a synthetic client, the other for
    /// [`crate::Relay::inject`].
    pub fn pair() -> io::Result<(Self, Self)> {
        let (a, b) = UnixStream::pair()?;
        Ok((Conn::new(a)?, Conn::new(b)?))
    }
}

impl<S: std::os::fd::AsFd> AsyncRead for Conn<S>
where
    for<'a> &'a S: Read,
{
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut &*self).poll_read(cx, buf)
    }
}

impl<S: std::os::fd::AsFd> AsyncWrite for Conn<S>
where
    S: HalfClose,
    for<'a> &'a S: Write,
{
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut &*self).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut &*self).poll_flush(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut &*self).poll_close(cx)
    }
}

impl<S: std::os::fd::AsFd> AsyncRead for &Conn<S>
where
    for<'a> &'a S: Read,
{
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut &self.socket).poll_read(cx, buf)
    }
}

impl<S: std::os::fd::AsFd> AsyncWrite for &Conn<S>
where
    S: HalfClose,
    for<'a> &'a S: Write,
{
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut &self.socket).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut &self.socket).poll_flush(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        futures::ready!(Pin::new(&mut &self.socket).poll_flush(cx))?;
        match self.socket.get_ref().shutdown_write() {
            // The peer already went away: nothing is left to close.
            Err(e) if e.kind() == io::ErrorKind::NotConnected => Poll::Ready(Ok(())),
            other => Poll::Ready(other),
        }
    }
}

/// A relayed TCP connection, accepted or dialed.
pub type TcpConn = Conn<TcpStream>;

/// The TCP socket under a session's stream, when it is one: accepted or dialed by the relay,
/// or an embedder's async-std `TcpStream` handed to [`crate::Relay::inject`]. Other streams
/// (Unix sockets) have no send queue to wait for and no reset to pass on.
pub(crate) fn tcp_socket(stream: &dyn std::any::Any) -> Option<socket2::SockRef<'_>> {
    if let Some(conn) = stream.downcast_ref::<TcpConn>() {
        return Some(socket2::SockRef::from(conn.get_ref()));
    }
    let injected = stream.downcast_ref::<Injected<async_std::net::TcpStream>>()?;
    Some(socket2::SockRef::from(&injected.0))
}

/// An injected stream, whose `poll_close` also ends its write direction when it is one of
/// async-std's sockets: theirs only flush on close, and a relayed FIN must reach the peer.
/// Other streams close as they close.
pub struct Injected<S>(pub S);

impl<S: std::any::Any> Injected<S> {
    fn shutdown_write(&self) -> io::Result<()> {
        let any = &self.0 as &dyn std::any::Any;
        let ended = if let Some(tcp) = any.downcast_ref::<async_std::net::TcpStream>() {
            tcp.shutdown(Shutdown::Write)
        } else if let Some(unix) = any.downcast_ref::<async_std::os::unix::net::UnixStream>() {
            unix.shutdown(Shutdown::Write)
        } else {
            Ok(())
        };
        match ended {
            Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(()),
            other => other,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Injected<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin + std::any::Any> AsyncWrite for Injected<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        futures::ready!(Pin::new(&mut self.0).poll_close(cx))?;
        Poll::Ready(self.shutdown_write())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dropped_handle_lets_its_task_run_on() {
        let (tx, rx) = flume::bounded(1);
        let (go, wait) = flume::bounded::<()>(1);
        drop(spawn(async move {
            let _ = wait.recv_async().await;
            let _ = tx.send_async(42).await;
        }));
        go.send(()).unwrap();
        assert_eq!(rx.recv_timeout(Duration::from_secs(10)), Ok(42));
    }

    #[test]
    fn spawn_here_stays_on_the_worker_unless_another_runtime_is_entered() {
        let (a, b) = (
            Runtime::new(std::num::NonZeroUsize::new(4)),
            Runtime::new(std::num::NonZeroUsize::new(1)),
        );
        let (a, b) = (Arc::new(a.unwrap()), Arc::new(b.unwrap()));
        let b_thread = block_on(b.spawn(async { std::thread::current().id() }));
        for worker in 0..4 {
            let b = b.clone();
            let (here, placed, there) = block_on(a.enter(|| {
                spawn_on(worker, async move {
                    let here = std::thread::current().id();
                    let placed = spawn_here(async { std::thread::current().id() }).await;
                    // An embedder's call into relay b from a's worker: b's runtime, not a's.
                    let there = b.enter(|| spawn_here(async { std::thread::current().id() }));
                    (here, placed, there.await)
                })
            }));
            assert_eq!(placed, here, "worker {worker}: spawned on its own thread");
            assert_eq!(there, b_thread, "worker {worker}: the entered runtime's thread");
        }
    }

    #[test]
    fn a_runtime_runs_its_tasks_on_its_own_threads_and_they_stay_there() {
        let runtime = Runtime::new(std::num::NonZeroUsize::new(1)).unwrap();
        assert_eq!(runtime.workers(), 1);
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                runtime.enter(|| {
                    spawn(async {
                        let before = std::thread::current().id();
                        Timer::after(Duration::from_millis(1)).await;
                        // What a task spawns goes to its own runtime too.
                        let inner = spawn(async { std::thread::current().id() }).await;
                        (before, std::thread::current().id(), inner)
                    })
                })
            })
            .collect();
        let seen = block_on(futures::future::join_all(tasks));
        let (first, ..) = seen[0];
        for (before, after, inner) in seen {
            assert_eq!(before, after, "a task moved to another thread");
            assert_eq!((before, inner), (first, first), "one worker: one thread for everything");
        }
        drop(runtime);
    }

    #[test]
    fn a_timeout_gives_the_output_in_time_none_after_and_holds_its_future_once() {
        assert_eq!(block_on(timeout(Duration::from_secs(10), async { 7 })), Some(7));
        let never = std::future::pending::<()>();
        assert_eq!(block_on(timeout(Duration::from_millis(1), never)), None);
        // A future of 4 KiB: the timeout around it is that and a timer, not twice that.
        let big = async {
            let buf = [1u8; 4096];
            std::future::ready(()).await;
            buf[4095]
        };
        let size = std::mem::size_of_val(&big);
        let wrapped = timeout(Duration::from_secs(1), big);
        assert!(
            std::mem::size_of_val(&wrapped) < size + 256,
            "{} for {size}",
            std::mem::size_of_val(&wrapped)
        );
        assert_eq!(block_on(wrapped), Some(1));
    }

    #[test]
    fn a_conn_tries_the_socket_after_a_full_read_and_waits_for_the_reactor_after_a_short_one() {
        // A reactor of this thread's, turned by hand: nothing is heard unless the test turns it.
        let reactor = reactor::Reactor::new().unwrap();
        reactor::Reactor::set_local(Some(reactor.clone()));
        let turn = || reactor.turn(&mut Vec::with_capacity(8), &mut Vec::new(), false, &|| false);
        let (near, mut far) = UnixStream::pair().unwrap();
        let near = Conn::new(near).unwrap();
        let mut cx = Context::from_waker(futures::task::noop_waker_ref());
        let mut read = |buf: &mut [u8]| Pin::new(&mut &near).poll_read(&mut cx, buf);
        let mut buf = [0u8; 4];
        far.write_all(b"0123456789").unwrap();
        // First wait: registered, and ready once the reactor has heard so.
        assert!(read(&mut buf).is_pending());
        turn();
        // A full read: the socket may hold more, so the next read tries it at once.
        assert!(matches!(read(&mut buf), Poll::Ready(Ok(4))));
        assert!(matches!(read(&mut buf), Poll::Ready(Ok(4))));
        // A short read drains it: the next read does not try the socket (that would almost
        // always fail) but waits for the reactor, even with bytes there it has not heard of.
        let mut big = [0u8; 64];
        assert!(matches!(read(&mut big), Poll::Ready(Ok(2))));
        far.write_all(b"later").unwrap();
        let waits = read(&mut big);
        assert!(
            waits.is_pending(),
            "tried the socket before the reactor's word: {waits:?}"
        );
        turn();
        assert!(matches!(read(&mut big), Poll::Ready(Ok(5))));
        assert_eq!(&big[..5], b"later");
        // The end of the stream reads as 0 once drained too, and again after that.
        drop(far);
        turn();
        assert!(matches!(read(&mut big), Poll::Ready(Ok(0))));
        assert!(matches!(read(&mut big), Poll::Ready(Ok(0))));
        reactor::Reactor::set_local(None);
    }

    #[test]
    fn a_worker_polls_its_tasks_and_waits_on_its_sockets_on_its_own_thread() {
        let runtime = Runtime::new(std::num::NonZeroUsize::new(2)).unwrap();
        let (tx, rx) = flume::bounded(16);
        let task = runtime.enter(|| {
            spawn_on(1, async move {
                let (a, b) = UnixStream::pair().unwrap();
                let (a, b) = (Conn::new(a).unwrap(), Conn::new(b).unwrap());
                let name = || std::thread::current().name().map(str::to_string);
                let _ = tx.send(name());
                let reader = spawn_here(async move {
                    let mut buf = [0u8; 8];
                    use futures::AsyncReadExt;
                    let n = (&b).read(&mut buf).await.unwrap();
                    (n, std::thread::current().name().map(str::to_string))
                });
                Timer::after(Duration::from_millis(5)).await;
                let _ = tx.send(name());
                use futures::AsyncWriteExt;
                (&a).write_all(b"hi").await.unwrap();
                reader.await
            })
        });
        let (n, reader) = block_on(timeout(Duration::from_secs(10), task)).expect("in time");
        assert_eq!(n, 2);
        let seen: Vec<_> = rx.try_iter().collect();
        assert_eq!(seen.len(), 2);
        for name in seen.iter().chain([&reader]) {
            assert_eq!(name.as_deref(), Some("relayd-worker-1"));
        }
    }

    #[test]
    fn a_dropped_runtime_drops_the_tasks_still_waiting_on_it() {
        let runtime = Runtime::new(std::num::NonZeroUsize::new(1)).unwrap();
        let (held, gone) = flume::bounded::<()>(1);
        let (a, _b) = UnixStream::pair().unwrap();
        drop(runtime.spawn(async move {
            let _held = held;
            let a = Conn::new(a).unwrap();
            let mut buf = [0u8; 1];
            use futures::AsyncReadExt;
            let _ = (&a).read(&mut buf).await;
        }));
        // It waits on a socket that never gets anything; dropping the runtime drops it.
        drop(runtime);
        assert_eq!(
            gone.recv_timeout(Duration::from_secs(10)),
            Err(flume::RecvTimeoutError::Disconnected)
        );
    }
}
