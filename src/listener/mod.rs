//! Listener actors, one per route: the TCP one (here) accepts connections and opens a Session
//! for each; the UDP one (`udp`) keeps the flow table. Both stop on the relay's stop signal.
//! Running out of file descriptors or memory is logged and backed off, never fatal, and never a
//! busy loop.

mod udp;

pub(crate) use udp::UdpListener;

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

use std::net::TcpStream;
use std::os::fd::{AsRawFd, FromRawFd};

use socket2::{Domain, SockAddr, Socket, Type};

use crate::config::{Protocol, Route};
use crate::error::StartError;
use crate::net::Endpoint;
use crate::rt::{self, Async, TcpConn};
use crate::session::RouteContext;
use crate::shutdown::{DrainGuard, Signal};

const BACKOFF_MIN: Duration = Duration::from_millis(10);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// A route's bound listening socket: for UDP, one per worker (see [`udp_group`]).
pub(crate) enum Bound {
    Tcp(Async<TcpListener>),
    Udp(Vec<Endpoint>),
}

/// A second descriptor of a route's listening socket, which the relay keeps: a reload hands
/// the socket to whichever route listens on its address next (a route renamed, or moved
/// there), so the socket never closes and no client is refused.
pub(crate) enum Held {
    Tcp(TcpListener),
    Udp(Vec<(std::net::UdpSocket, bool)>),
}

impl Bound {
    pub fn hold(&self) -> io::Result<Held> {
        match self {
            Bound::Tcp(socket) => Ok(Held::Tcp(socket.get_ref().try_clone()?)),
            Bound::Udp(group) => group
                .iter()
                .map(Endpoint::duplicate)
                .collect::<io::Result<_>>()
                .map(Held::Udp),
        }
    }
}

impl Held {
    /// The held socket, ready for `route`'s listener (a TCP socket takes its backlog).
    pub fn bound(&self, route: &Route) -> io::Result<Bound> {
        match self {
            Held::Tcp(socket) => {
                let socket = socket.try_clone()?;
                listen(socket2::SockRef::from(&socket), route.backlog)?;
                Ok(Bound::Tcp(Async::new(socket)?))
            }
            Held::Udp(group) => (group.iter())
                .map(|(socket, pktinfo)| Endpoint::from_socket(socket.try_clone()?, *pktinfo))
                .collect::<io::Result<_>>()
                .map(Bound::Udp),
        }
    }
}

/// Binds a route's listening socket, as its protocol needs.
pub(crate) fn bind(route: &Route) -> Result<Bound, StartError> {
    let (addr, device) = (route.listen, route.listen_device.as_deref());
    let bound = match route.protocol {
        Protocol::Tcp | Protocol::HttpConnect => bind_tcp(addr, route.backlog, device).map(Bound::Tcp),
        Protocol::Udp => udp_group(addr, device).map(Bound::Udp),
    };
    bound.map_err(|source| StartError::Listen {
        what: format!("route {}", route.name),
        addr: route.listen.to_string(),
        source,
    })
}

/// A UDP route's sockets on `addr`, one for each worker. The kernel shares the clients between
/// them (SO_REUSEPORT, as nginx's `listen … udp reuseport`) by their address, so a client
/// always lands on the same socket: each worker keeps its own clients' flows and serves them on
/// its own thread, and a datagram is handed to its flow without waking another. (TCP routes
/// keep one socket: a group gave no more connections per second there, and a closing member
/// resets the connections waiting in its queue.)
///
/// The address is first bound by a probe without SO_REUSEPORT, which fails if anyone else has
/// it (another relayd too), and which picks the port when `addr` asks for port 0; the group
/// binds it once the probe has let go.
fn udp_group(addr: SocketAddr, device: Option<&str>) -> io::Result<Vec<Endpoint>> {
    let count = rt::worker_count();
    if count <= 1 {
        return Ok(vec![Endpoint::bind(addr, device, false)?]);
    }
    let addr = Endpoint::bind(addr, device, false)?.local_addr()?;
    (0..count).map(|_| Endpoint::bind(addr, device, true)).collect()
}

/// A listening TCP socket with SO_REUSEADDR (a restart need not wait out TIME_WAIT) and a real
/// backlog.
pub(crate) fn bind_tcp(addr: SocketAddr, backlog: u32, device: Option<&str>) -> io::Result<Async<TcpListener>> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    if let Some(device) = device {
        socket.bind_device(Some(device.as_bytes()))?;
    }
    socket.bind(&addr.into())?;
    listen(socket2::SockRef::from(&socket), backlog)?;
    Async::new(TcpListener::from(socket))
}

/// listen(2) with `backlog`: on a listening socket too, where it sets the backlog anew.
fn listen(socket: socket2::SockRef<'_>, backlog: u32) -> io::Result<()> {
    socket.listen(i32::try_from(backlog).unwrap_or(i32::MAX))
}

/// The one back-off of every receive loop (TCP routes, UDP routes, the status page): after a
/// failed accept or receive, a wait that doubles from 10 ms to 1 s, and starts again at the
/// next success. A loop that cannot take in more never spins the CPU, and never stops.
pub(crate) struct Backoff {
    pub next: std::time::Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff { next: BACKOFF_MIN }
    }
}

impl Backoff {
    pub fn reset(&mut self) {
        self.next = BACKOFF_MIN;
    }

    /// Waits out the back-off (or until `stop`), and doubles it for next time.
    pub async fn wait(&mut self, stop: &Signal) {
        stop.unless(rt::sleep(self.next)).await;
        self.next = (self.next * 2).min(BACKOFF_MAX);
    }
}

pub(crate) struct Listener {
    pub socket: Async<TcpListener>,
    pub context: RouteContext,
    /// A reload's new context for the route: the sessions accepted from then on get it. The
    /// listener stops when the sender is dropped (the route was removed).
    pub retarget: flume::Receiver<RouteContext>,
}

/// What a listener waits for besides its socket.
pub(crate) enum Control {
    Retarget(RouteContext),
    Stop,
}

/// The next word on `retarget`; `Stop` once its sender is gone.
pub(crate) async fn control(retarget: &flume::Receiver<RouteContext>) -> Control {
    match retarget.recv_async().await {
        Ok(context) => Control::Retarget(context),
        Err(_) => Control::Stop,
    }
}

impl Listener {
    /// Accepts until `stop` fires or the route is removed; each session gets a clone of `guard`.
    pub async fn run(mut self, stop: Signal, guard: DrainGuard) {
        let route = self.context.route_name.clone();
        let mut backoff = Backoff::default();
        let at_cap = crate::logging::Squelch::default();
        loop {
            if !self.context.has_room() {
                // At the descriptor budget: what is not accepted waits in the kernel's backlog,
                // rather than being accepted only to be dropped for want of a socket.
                if let Some(held) = at_cap.admit() {
                    log::warn!(route = &*route, max_sessions = self.context.budget.cap(), held_back = held;
                        "session cap reached, accepting again once sessions end");
                }
                let stats = self.context.stats.clone();
                if stop.unless(stats.until(|_| self.context.has_room())).await.is_none() {
                    break;
                }
            }
            // A reload's context first: a client that comes after the reload gets it.
            let accepted = async { Ok(accept(&self.socket).await) };
            let accepted = match stop
                .unless(rt::race(async { Err(control(&self.retarget).await) }, accepted))
                .await
            {
                Some(Ok(accepted)) => accepted,
                Some(Err(Control::Retarget(context))) => {
                    let backlog = context.route.backlog;
                    if backlog != self.context.route.backlog {
                        if let Err(e) = listen(socket2::SockRef::from(self.socket.get_ref()), backlog) {
                            log::warn!(route = &*route, err:% = e; "cannot change the backlog");
                        }
                    }
                    self.context = context;
                    continue;
                }
                Some(Err(Control::Stop)) | None => break,
            };
            match accepted {
                Ok((stream, peer)) => {
                    backoff.reset();
                    if !self.context.admits(peer) {
                        // Closed before any work: no session, no dial.
                        drop(stream);
                        continue;
                    }
                    // Small writes (prompts, handshakes) go out at once, as they came in.
                    let _ = stream.get_ref().set_nodelay(true);
                    drop(self.context.open(stream, peer, guard.clone()));
                }
                Err(e) if is_transient(&e) => {
                    log::debug!(route = &*route, err:% = e; "accept: connection gone before it was taken");
                }
                Err(e) => {
                    if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) {
                        self.context.budget.refresh();
                    }
                    log::warn!(route = &*route, err:% = e, backoff_ms = backoff.next.as_millis() as u64; "accept failed, backing off");
                    backoff.wait(&stop).await;
                }
            }
        }
        log::info!(route = &*route; "listener stopped");
    }
}

/// Accepts with accept4(SOCK_NONBLOCK | SOCK_CLOEXEC): the new socket goes to the reactor as it
/// is, without the mode-setting calls a plain accept would need after it.
pub(crate) async fn accept(listener: &Async<TcpListener>) -> io::Result<(TcpConn, SocketAddr)> {
    let (fd, peer) = listener
        .read_with(|l| {
            // SAFETY: accept4 writes at most `len` bytes of address into the storage try_init
            // provides, and returns a new descriptor that is owned below.
            unsafe {
                SockAddr::try_init(|storage, len| {
                    rt::check(libc::accept4(
                        l.as_raw_fd(),
                        storage.cast(),
                        len,
                        libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                    ))
                })
            }
        })
        .await?;
    // SAFETY: a fresh descriptor from accept4, owned by nothing else.
    let stream = unsafe { TcpStream::from_raw_fd(fd) };
    let peer = peer
        .as_socket()
        .ok_or_else(|| io::Error::other("accepted a non-IP peer"))?;
    Ok((TcpConn::new_nonblocking(stream)?, peer))
}

/// The client gave up between SYN and accept: nothing is wrong with the listener.
fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ECONNABORTED | libc::EPROTO | libc::ECONNRESET)
    )
}
