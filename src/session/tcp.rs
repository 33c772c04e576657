//! A TCP session: connect with failover, then the two-way pump.

use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use std::any::Any;

use super::pump::{Direction, End, Pump};
use super::splice::SplicePump;
use super::{RouteContext, SessionEnd, SessionId, SessionReport, Transfer};
use crate::balancer::Pick;
use crate::config::Protocol;
use crate::rt::{self, JoinHandle, TcpConn};
use crate::shutdown::DrainGuard;

/// A lingering close ends when the peer has been silent this long,
const LINGER_QUIET: Duration = Duration::from_secs(5);
/// or after this long in all,
const LINGER_MAX: Duration = Duration::from_secs(30);
/// or once this much has been read and dropped.
const LINGER_BYTES: usize = 64 << 20;
const LINGER_READ: usize = 16 << 10;

impl RouteContext {
    /// Starts a session for `client`; the handle yields its report.
    pub fn open<S>(&self, client: S, peer: SocketAddr, guard: DrainGuard) -> JoinHandle<SessionReport>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + Any,
    {
        let ctx = self.clone();
        match self.route.protocol {
            Protocol::HttpConnect => rt::spawn(self.session_task(guard, move |id| ctx.run_tunnel(id, client, peer)).1),
            Protocol::Tcp | Protocol::Udp => {
                rt::spawn(self.session_task(guard, move |id| ctx.run_tcp(id, client, peer)).1)
            }
        }
    }

    /// The session's future. Not an `async fn`: that would keep a second copy of every
    /// argument in the task for its whole life.
    #[allow(clippy::manual_async_fn)]
    fn run_tcp<S>(self, id: SessionId, mut client: S, peer: SocketAddr) -> impl Future<Output = SessionReport> + Send
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + Any,
    {
        async move {
            let started = Instant::now();
            // A proxy in front says who the client is, before anything else happens.
            let (named, early) = match self.read_proxy(&mut client).await {
                Ok(found) => found,
                Err(why) => {
                    let mut report = SessionReport::new(id, self.route_name.clone(), peer);
                    (report.end, report.duration) = (SessionEnd::BadProxyHeader(why), started.elapsed());
                    return report;
                }
            };
            // The client the proxy named is the client, everywhere from here on.
            let peer = named.map_or(peer, |(client, _)| client);
            let Some(sni) = &self.route.sni else {
                return self.serve_tcp(id, client, peer, named, early, started).await;
            };
            // By TLS server name: the route the name picks serves the connection, with the
            // ClientHello read replayed to its backend first.
            // Boxed: reading the hello needs a buffer of 2 KiB that no session should carry
            // for its whole life (and a route without `sni` never allocates it).
            let hello = Box::pin(crate::proto::read_client_hello(&mut client));
            let hello = rt::timeout(sni.timeout, hello).await;
            let picked = match hello {
                Some(Ok((name, hello))) => match self.sni_targets.get().and_then(|t| t.pick(name.as_deref())) {
                    Some(target) => Ok((target.clone(), hello)),
                    None => Err(format!("no route for server name {name:?}")),
                },
                Some(Err(why)) => Err(why),
                None => Err(format!(
                    "no ClientHello within {}",
                    humantime::format_duration(sni.timeout)
                )),
            };
            match picked {
                Ok((target, hello)) => {
                    let early = [early, hello].concat();
                    Box::pin(target.serve_tcp(id, client, peer, named, early, started)).await
                }
                Err(why) => {
                    let mut report = SessionReport::new(id, self.route_name.clone(), peer);
                    (report.end, report.duration) = (SessionEnd::NoRouteForName(why), started.elapsed());
                    report
                }
            }
        }
    }

    /// Everything after the PROXY header (and the name): a place in line, the connect, the
    /// relay, on this route's backends. Not an `async fn`, for the reason `run_tcp` is not.
    #[allow(clippy::manual_async_fn)]
    fn serve_tcp<S>(
        self,
        id: SessionId,
        mut client: S,
        peer: SocketAddr,
        named: Option<crate::proto::Named>,
        early: Vec<u8>,
        started: Instant,
    ) -> impl Future<Output = SessionReport> + Send
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + Any,
    {
        async move {
            // Under max_connections, a connection waits in line (bounded) before any work.
            let Some(_passes) = self.passes(true).await else {
                let mut report = SessionReport::new(id, self.route_name.clone(), peer);
                (report.end, report.duration) = (SessionEnd::QueueTimeout, started.elapsed());
                return report;
            };
            let timeout = self.route.connect_timeout;
            // Boxed, and dropped once connected: the connect phase is most of a session's
            // state, and an idle session need not carry it for its whole life.
            let connect = Box::pin(async {
                let mut tried = Vec::new();
                let dial = |pick: Pick| self.dialer.tcp(pick.addr, pick.egress, timeout);
                self.reach_backend(id, peer, &mut tried, true, dial).await
            });
            let connected = self.force.unless(connect).await;
            let mut report = SessionReport::new(id, self.route_name.clone(), peer);
            match connected {
                None => report.end = SessionEnd::Forced,
                Some(Err(end)) => report.end = end,
                Some(Ok((pick, mut upstream))) => {
                    let counted = self.balancer.counted(pick.backend);
                    report.backend = Some(pick.addr);
                    report.egress = Some(self.egress_name(&pick));
                    // The address the client reached is asked of its socket only for a header
                    // that names it: a system call less per connection everywhere else.
                    let header = (self.route.send_proxy).map(|version| {
                        let reached = named.map_or_else(|| self.reached(&client), |(_, reached)| reached);
                        crate::proto::proxy_header(version, peer, reached)
                    });
                    let first = send_first(header, &early, &mut upstream);
                    report.bytes_up += early.len() as u64;
                    report.end = match first.await {
                        Ok(()) => self.relay(&mut client, &mut upstream, &mut report).await,
                        Err(e) => SessionEnd::Failed(Direction::Up, e),
                    };
                    // Closed now, then counted out: a pair that ended both ways left its last
                    // FIN to the close.
                    drop((upstream, client, counted));
                }
            }
            report.duration = started.elapsed();
            report
        }
    }

    /// The address the client reached: its socket's local address, or (injected) the route's.
    fn reached<S: Any>(&self, client: &S) -> SocketAddr {
        ((client as &dyn Any).downcast_ref::<TcpConn>())
            .and_then(|c| c.get_ref().local_addr().ok())
            .unwrap_or(self.route.listen)
    }

    /// The client and destination a trusted proxy names in its header (none for LOCAL), and
    /// the bytes read past the header; nothing at all when the route reads no header.
    async fn read_proxy<S: AsyncRead + Unpin>(
        &self,
        client: &mut S,
    ) -> Result<(Option<crate::proto::Named>, Vec<u8>), String> {
        let Some(accept) = &self.route.accept_proxy else {
            return Ok((None, Vec::new()));
        };
        let header = rt::timeout(accept.timeout, crate::proto::read_proxy_header(client));
        match header.await {
            Some(Ok(read)) => Ok(read),
            Some(Err(why)) => Err(why),
            None => Err(format!(
                "no PROXY header within {}",
                humantime::format_duration(accept.timeout)
            )),
        }
    }

    /// Relays until the pair ends: by splice when both ends are TCP sockets (and splice is on),
    /// by copying otherwise (an injected stream, for one).
    pub(super) async fn relay<S>(
        &self,
        client: &mut S,
        upstream: &mut TcpConn,
        report: &mut SessionReport,
    ) -> SessionEnd
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + Any,
    {
        log::debug!(route = &*self.route_name, session = report.id.0, client:% = report.peer,
            backend:? = report.backend; "session relaying");
        let timeouts = self.route.timeouts;
        let mut meter = self.metrics.meter(&self.route_name, false);
        if let Some(egress) = &report.egress {
            self.metrics.by_egress(&mut meter, egress);
        }
        let tcp_client = (client as &mut dyn Any)
            .downcast_mut::<TcpConn>()
            .filter(|_| self.splice);
        let end = if let Some(tcp_client) = tcp_client {
            let mut pump = SplicePump::new(tcp_client, upstream, timeouts, meter);
            let end = self.force.unless(&mut pump).await;
            (report.bytes_up, report.bytes_down) = pump.bytes();
            report.path = pump.path();
            end
        } else {
            let mut pump = Pump::new(client, upstream, timeouts, meter);
            let end = self.force.unless(&mut pump).await;
            (report.bytes_up, report.bytes_down) = pump.bytes();
            report.path = Transfer::Copy;
            end
        };
        match end {
            None => SessionEnd::Forced,
            Some(End::Done) => SessionEnd::Done,
            Some(End::Idle) => SessionEnd::IdleTimeout,
            Some(End::Fin) => SessionEnd::FinTimeout,
            Some(End::Aborted(direction, e)) => {
                // A reset is passed on as a reset: a truncated stream must not look complete.
                match direction {
                    Direction::Up => reset(upstream),
                    Direction::Down => reset(client),
                }
                SessionEnd::Aborted(direction, e)
            }
            Some(End::Failed(direction, e)) => {
                // The backend is gone after its whole answer went out: the client has its FIN,
                // and reading what it still uploads lets the answer reach it before the close.
                if direction == Direction::Up {
                    Box::pin(linger(client)).await;
                }
                SessionEnd::Failed(direction, e)
            }
        }
    }
}

/// Closing `side` will reset it (SO_LINGER 0) instead of ending it with a FIN. Only a TCP
/// socket can say so; any other stream just closes.
fn reset<S: Any>(side: &mut S) {
    if let Some(conn) = (side as &mut dyn Any).downcast_mut::<TcpConn>() {
        let _ = socket2::SockRef::from(conn.get_ref()).set_linger(Some(Duration::ZERO));
    }
}

/// A lingering close, as HAProxy and nginx do: `side`'s write direction is shut down (its FIN
/// is out), then what it still sends is read and dropped until it closes too, goes quiet, or
/// the bounds pass. Closing a socket with unread input resets it, and a reset drops whatever
/// the peer had not read yet: the end of the answer.
async fn linger<S: AsyncRead + AsyncWrite + Unpin>(side: &mut S) {
    let _ = side.close().await;
    let mut buf = vec![0u8; LINGER_READ];
    let drained = rt::timeout(LINGER_MAX, async {
        let mut total = 0;
        while total < LINGER_BYTES {
            match rt::timeout(LINGER_QUIET, side.read(&mut buf)).await {
                Some(Ok(n)) if n > 0 => total += n,
                _ => break,
            }
        }
    });
    drained.await;
}

/// What goes to the backend before the relay: the PROXY protocol header, when the route sends
/// one, then the bytes that came behind the client's own header.
async fn send_first(header: Option<Vec<u8>>, early: &[u8], upstream: &mut TcpConn) -> std::io::Result<()> {
    if let Some(header) = header {
        upstream.write_all(&header).await?;
    }
    upstream.write_all(early).await
}
