//! Listener actors, one per route: the TCP one (here) accepts connections and opens a Session
//! for each; the UDP one (`udp`) keeps the flow table. Both stop on the relay's stop signal.
//! Running out of file descriptors or memory is logged and backed off, never fatal, and never a
//! busy loop.

mod udp;

pub(crate) use udp::UdpListener;

use std::io;
use std::net::{SocketAddr, TcpListener};

use crate::config::{Protocol, Route};
use crate::error::StartError;
use crate::net::{Backoff, Endpoint, accept, bind_tcp, listen};
use crate::rt::{self, Async};
use crate::session::RouteContext;
use crate::shutdown::{DrainGuard, Signal};

/// A route's bound listening sockets, one per worker (see [`group`]).
pub(crate) enum Bound {
    Tcp(Vec<Async<TcpListener>>),
    Udp(Vec<Endpoint>),
}

/// A second descriptor of a route's listening socket, which the relay keeps: a reload hands
/// the socket to whichever route listens on its address next (a route renamed, or moved
/// there), so the socket never closes and no client is refused.
pub(crate) enum Held {
    Tcp(Vec<TcpListener>),
    Udp(Vec<(std::net::UdpSocket, bool)>),
}

impl Bound {
    pub fn hold(&self) -> io::Result<Held> {
        match self {
            Bound::Tcp(group) => (group.iter())
                .map(|socket| socket.get_ref().try_clone())
                .collect::<io::Result<_>>()
                .map(Held::Tcp),
            Bound::Udp(group) => group
                .iter()
                .map(Endpoint::duplicate)
                .collect::<io::Result<_>>()
                .map(Held::Udp),
        }
    }
}

impl Held {
    /// Stops a TCP socket listening while keeping its address (shutdown(SHUT_RD) on a listening
    /// socket, as HAProxy pauses a listener): new connections are refused at once, and
    /// [`Held::bound`] makes it listen again. A UDP socket cannot pause: an error.
    pub fn pause(&self) -> io::Result<()> {
        match self {
            Held::Tcp(group) => {
                (group.iter()).try_for_each(|socket| socket2::SockRef::from(socket).shutdown(std::net::Shutdown::Read))
            }
            Held::Udp(_) => Err(io::ErrorKind::Unsupported.into()),
        }
    }

    /// The held socket, ready for `route`'s listener (a TCP socket takes its backlog).
    pub fn bound(&self, route: &Route) -> io::Result<Bound> {
        match self {
            Held::Tcp(group) => (group.iter())
                .map(|socket| {
                    let socket = socket.try_clone()?;
                    listen(socket2::SockRef::from(&socket), route.backlog)?;
                    Async::new(socket)
                })
                .collect::<io::Result<_>>()
                .map(Bound::Tcp),
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
        Protocol::Tcp | Protocol::HttpConnect => {
            let bind = |addr, shared| bind_tcp(addr, route.backlog, device, shared);
            group(addr, bind, |s| s.get_ref().local_addr()).map(Bound::Tcp)
        }
        Protocol::Udp => {
            let bind = |addr, shared| Endpoint::bind(addr, device, shared);
            group(addr, bind, Endpoint::local_addr).map(Bound::Udp)
        }
    };
    bound.map_err(|source| StartError::Listen {
        what: format!("route {}", route.name),
        addr: route.listen.to_string(),
        source,
    })
}

/// A route's sockets on `addr`, one for each worker. The kernel shares the clients between
/// them (SO_REUSEPORT, as nginx's `listen … reuseport`) by their addresses, so each worker
/// accepts its own connections (and keeps its own UDP clients' flows) and serves them on its
/// own thread: a session is accepted, picked, dialed and relayed without waking another. A
/// member closes only with its route (its stop, its removal), when the route refuses anyway.
///
/// The address is first bound by a probe without SO_REUSEPORT, which fails if anyone else has
/// it (another relayd too), and which picks the port when `addr` asks for port 0; the group
/// binds it once the probe has let go.
fn group<S>(
    addr: SocketAddr,
    bind: impl Fn(SocketAddr, bool) -> io::Result<S>,
    local: impl Fn(&S) -> io::Result<SocketAddr>,
) -> io::Result<Vec<S>> {
    let count = rt::worker_count();
    if count <= 1 {
        return Ok(vec![bind(addr, false)?]);
    }
    let addr = local(&bind(addr, false)?)?;
    (0..count).map(|_| bind(addr, true)).collect()
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
                    // TCP_NODELAY came with it from the listening socket (see bind_tcp).
                    drop(self.context.accepted(stream, peer, guard.clone()));
                }
                Err(e) if is_transient(&e) => {
                    log::debug!(route = &*route, err:% = e; "accept: connection gone before it was taken");
                }
                // The relay paused the socket: its route was removed, and its stop is on the way.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => break,
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

/// The client gave up between SYN and accept: nothing is wrong with the listener.
fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ECONNABORTED | libc::EPROTO | libc::ECONNRESET)
    )
}
