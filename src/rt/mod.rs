//! The one place that names the async runtime.
//!
//! Tasks run on async-executor (the executor under async-std), one per worker thread; each
//! worker waits for its own sockets in an epoll of its own ([`Async`], in `reactor`); rarely
//! firing timeouts use [`Deadline`]. `block_on` (main, tests) is async-io's.
//! Everything else in the crate goes through these few items, so a change of runtime touches
//! this module only.

use std::future::Future;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::io::{AsyncRead, AsyncWrite};

mod deadline;
mod reactor;

pub use deadline::Deadline;
pub use reactor::Async;

/// One executor per worker thread: a task runs on the thread it was given for its whole life,
/// so its sockets, buffers and state stay in that core's cache. New tasks go to the workers in
/// turn. (A work-stealing pool moved every woken task to whichever thread was free; on two
/// cores this pool gave about 12% more new connections per second and 8% more ping-pong
/// round trips.)
struct Pool {
    executors: &'static [async_executor::Executor<'static>],
    next: std::sync::atomic::AtomicUsize,
}

static POOL: std::sync::OnceLock<Pool> = std::sync::OnceLock::new();

fn pool() -> &'static Pool {
    POOL.get_or_init(|| start_workers(None))
}

/// Sets the executor's thread count (default: one per core) and starts the workers. Only the
/// first call counts, and only before the first task is spawned (which starts the default).
pub fn init(workers: Option<std::num::NonZeroUsize>) {
    POOL.get_or_init(|| start_workers(workers));
}

fn start_workers(workers: Option<std::num::NonZeroUsize>) -> Pool {
    let threads = workers.map_or_else(
        || std::thread::available_parallelism().map_or(1, |n| n.get()),
        |n| n.get(),
    );
    // glibc gives each thread that contends its own arena (up to 8 per core), and an arena
    // keeps its partly used pages: with 9,000 idle sessions that was 3.8-4.6 KiB per
    // session against 3.4-3.8 with one arena per worker. The hot path allocates next to
    // nothing, so there is little contention to lose.
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets a tuning value; it is called before the workers start.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, threads.max(2) as libc::c_int);
    }
    let executors: &'static [async_executor::Executor<'static>] =
        Box::leak((0..threads).map(|_| async_executor::Executor::new()).collect());
    for executor in executors {
        std::thread::Builder::new()
            .name("relayd-worker".into())
            // An idle worker waits in its own reactor.
            .spawn(move || reactor::run_worker(executor.run(std::future::pending::<()>())))
            .expect("cannot start a worker thread");
    }
    Pool {
        executors,
        next: std::sync::atomic::AtomicUsize::new(0),
    }
}

/// A handle to a spawned task; awaiting it yields the task's output. Dropping it lets the
/// task run on.
pub struct JoinHandle<T>(Option<async_executor::Task<T>>);

impl<T> std::fmt::Debug for JoinHandle<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JoinHandle")
            .field("finished", &self.0.as_ref().map(|t| t.is_finished()))
            .finish()
    }
}

impl<T> Future for JoinHandle<T> {
    type Output = T;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        Pin::new(self.0.as_mut().expect("a task's output is taken once")).poll(cx)
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

/// Locks `mutex`. rt's locks guard tables that no panic leaves half-changed, so a poisoned
/// one still holds sound data.
pub(crate) fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Runs `future` as a task of its own, on the next worker in turn.
pub fn spawn<F>(future: F) -> JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    use std::sync::atomic::Ordering;
    let pool = pool();
    let i = pool.next.fetch_add(1, Ordering::Relaxed) % pool.executors.len();
    JoinHandle(Some(pool.executors[i].spawn(future)))
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
    // async-io's own: async-std's would also start async-std's executor threads, idle here.
    async_io::block_on(future)
}

/// Waits `duration`. For back-off only: code never sleeps to wait for an event.
pub async fn sleep(duration: Duration) {
    Deadline::after(duration).await;
}

/// `future`'s output, or `None` when `limit` passed first.
///
/// A future of its own rather than an `async fn`: an `async fn` holds its argument twice (as
/// given and as awaited), and every dial wraps its whole connect in this.
pub fn timeout<F: Future>(limit: Duration, future: F) -> Timeout<F> {
    Timeout {
        future,
        deadline: Deadline::after(limit),
    }
}

pin_project_lite::pin_project! {
    /// See [`timeout`].
    pub struct Timeout<F> {
        #[pin]
        future: F,
        deadline: Deadline,
    }
}

impl<F: Future> Future for Timeout<F> {
    type Output = Option<F::Output>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(output) = this.future.poll(cx) {
            return Poll::Ready(Some(output));
        }
        Pin::new(this.deadline).poll(cx).map(|()| None)
    }
}

/// The addresses `host` resolves to (the system resolver, off the executor's threads).
pub async fn resolve(host: &str, port: u16) -> std::io::Result<Vec<std::net::SocketAddr>> {
    use async_std::net::ToSocketAddrs;
    Ok((host, port).to_socket_addrs().await?.collect())
}

/// The output of whichever of `a` and `b` finishes first (`a` when both are ready); the other is
/// dropped.
pub async fn race<T>(a: impl Future<Output = T>, b: impl Future<Output = T>) -> T {
    futures::future::select(std::pin::pin!(a), std::pin::pin!(b))
        .await
        .factor_first()
        .0
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
/// async-io's and async-std's own stream types only flush on close; a session needs the FIN.
pub struct Conn<S>(Async<S>);

impl<S: std::os::fd::AsFd> Conn<S> {
    /// Registers a connected socket with the reactor (it is made non-blocking).
    pub fn new(socket: S) -> io::Result<Self> {
        Async::new(socket).map(Conn)
    }

    pub(crate) fn from_async(socket: Async<S>) -> Self {
        Conn(socket)
    }

    /// The underlying socket.
    pub fn get_ref(&self) -> &S {
        self.0.get_ref()
    }

    /// The socket as the reactor knows it, for readiness-driven system calls (splice).
    pub(crate) fn as_async(&self) -> &Async<S> {
        &self.0
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

impl<S> AsyncRead for Conn<S>
where
    S: Unpin,
    for<'a> &'a S: Read,
{
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut &*self).poll_read(cx, buf)
    }
}

impl<S> AsyncWrite for Conn<S>
where
    S: HalfClose + Unpin,
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

impl<S> AsyncRead for &Conn<S>
where
    S: Unpin,
    for<'a> &'a S: Read,
{
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut &self.0).poll_read(cx, buf)
    }
}

impl<S> AsyncWrite for &Conn<S>
where
    S: HalfClose + Unpin,
    for<'a> &'a S: Write,
{
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut &self.0).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut &self.0).poll_flush(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        futures::ready!(Pin::new(&mut &self.0).poll_flush(cx))?;
        match self.0.get_ref().shutdown_write() {
            // The peer already went away: nothing is left to close.
            Err(e) if e.kind() == io::ErrorKind::NotConnected => Poll::Ready(Ok(())),
            other => Poll::Ready(other),
        }
    }
}

/// A relayed TCP connection, accepted or dialed.
pub type TcpConn = Conn<TcpStream>;

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
    fn a_task_runs_on_a_worker_and_stays_on_it() {
        // Each task notes its thread before and after a wait in the reactor.
        let tasks: Vec<_> = (0..16)
            .map(|_| {
                spawn(async {
                    let before = std::thread::current();
                    Deadline::after(Duration::from_millis(1)).await;
                    (
                        before.id(),
                        before.name().map(str::to_string),
                        std::thread::current().id(),
                    )
                })
            })
            .collect();
        for (before, name, after) in block_on(futures::future::join_all(tasks)) {
            assert_eq!(name.as_deref(), Some("relayd-worker"));
            assert_eq!(before, after, "a task moved to another thread");
        }
    }
}
