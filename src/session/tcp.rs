//! A TCP session: the PROXY header and the TLS server name when its route reads them, the
//! connect with failover, the two-way pump, and the close that loses no byte.

use std::any::Any;
use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::pump::{Direction, End, Pump};
use super::splice::SplicePump;
use super::{Session, SessionEnd, SessionReport, Transfer};
use crate::balancer::Pick;
use crate::rt::{self, TcpConn};

/// How long a closing side is waited for (see [`deliver`]).
#[derive(Debug, Clone, Copy)]
struct Patience {
    /// Given up on after this long in which it neither sent nor acknowledged anything (nginx's
    /// `lingering_timeout`),
    quiet: Duration,
    /// or after this long in all (nginx's `lingering_time`).
    most: Duration,
}

const SETTLE: Patience = Patience {
    quiet: Duration::from_secs(5),
    most: Duration::from_secs(30),
};
/// How long apart a closing side's send queue is looked at while it sends nothing: the first
/// look soon, then ever further apart.
const SETTLE_LOOK: std::ops::Range<Duration> = Duration::from_millis(1)..Duration::from_millis(50);
/// What one read of a closing side's upload may take (and drop).
const SETTLE_READ: usize = 64 << 10;

impl Session {
    /// The session's future. Not an `async fn`: that would keep a second copy of every
    /// argument in the task for its whole life. The phases below borrow the session and the
    /// client rather than take them, so the task holds each once.
    #[allow(clippy::manual_async_fn)]
    pub(super) fn run_tcp<S>(mut self, mut client: S) -> impl Future<Output = SessionReport> + Send
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + Any,
    {
        async move {
            let end = self.tcp(&mut client).await;
            drop(client);
            self.finish(end)
        }
    }

    /// The PROXY header and the server name, when the route reads them, then the serving.
    /// Whatever route a connection ends up on, the policies of each route it passes hold: it
    /// is counted against the caps of the route that took it from its first byte (a
    /// connection still sending its header is load too), judged by the lists of the route
    /// that serves it, and counted against that route's cap as well.
    async fn tcp<S>(&mut self, client: &mut S) -> SessionEnd
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + Any,
    {
        // A client over its own limits takes no place in line. Behind a PROXY header they
        // judge the client the header names, once it is read.
        let proxied = self.ctx.route.accept_proxy.is_some();
        let mut _client_place = match proxied {
            true => None,
            false => match self.client_pass() {
                Ok(pass) => Some(pass),
                Err(end) => return end,
            },
        };
        // Under max_connections, a connection waits in line (bounded) before any work.
        let Some(_passes) = self.ctx.passes().await else {
            return SessionEnd::QueueTimeout;
        };
        // What comes before the relay (a PROXY header, a ClientHello) is read under the
        // relay-wide cap on sessions still in that phase.
        let mut prelude = None;
        if proxied || self.ctx.route.sni.is_some() {
            match self.prelude() {
                Ok(pass) => prelude = Some(pass),
                Err(end) => return end,
            }
        }
        // A proxy in front says who the client is, before anything else happens.
        let (named, early) = match self.read_proxy(client).await {
            Ok(found) => found,
            Err(why) => return SessionEnd::BadProxyHeader(why),
        };
        // The client the proxy named is the client, everywhere from here on, and the one the
        // route's lists judge (the listener judged only the proxy).
        if let Some((named, _)) = named {
            self.report.peer = named;
        }
        if proxied {
            if !self.ctx.admits_client(self.peer()) {
                return SessionEnd::ClientRefused;
            }
            match self.client_pass() {
                Ok(pass) => _client_place = Some(pass),
                Err(end) => return end,
            }
        }
        if self.ctx.route.sni.is_none() {
            drop(prelude);
            return self.serve_tcp(client, named, early).await;
        }
        // Boxed: a route without `sni` carries none of this phase's state, and one with it
        // only while it reads the name.
        Box::pin(self.by_name(client, named, early, prelude)).await
    }

    /// By TLS server name: the route the name picks serves the connection, with the
    /// ClientHello read replayed to its backend first.
    async fn by_name<S>(
        &mut self,
        client: &mut S,
        named: Option<crate::proto::Named>,
        early: Vec<u8>,
        prelude: Option<crate::limits::PreludePass>,
    ) -> SessionEnd
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + Any,
    {
        let timeout = self
            .ctx
            .route
            .sni
            .as_ref()
            .expect("a route that routes by name")
            .timeout;
        // Boxed too: reading the hello needs a buffer of 2 KiB that the session should not
        // carry once it has the name.
        let hello = rt::timeout(timeout, Box::pin(crate::proto::read_client_hello(client))).await;
        drop(prelude);
        let picked = match hello {
            Some(Ok((name, hello))) => match self.ctx.sni_targets.get().and_then(|t| t.pick(name.as_deref())) {
                Some(target) => Ok((target.clone(), hello)),
                None => Err(match name {
                    Some(name) => format!("no route for server name {name}"),
                    None => "no route for a ClientHello without a server name".to_string(),
                }),
            },
            Some(Err(why)) => Err(why),
            None => Err(format!("no ClientHello within {}", humantime::format_duration(timeout))),
        };
        let (target, hello) = match picked {
            Ok(picked) => picked,
            Err(why) => return SessionEnd::NoRouteForName(why),
        };
        self.hand_to(&target);
        if !self.ctx.admits_client(self.peer()) {
            return SessionEnd::ClientRefused;
        }
        let _client_place = match self.client_pass() {
            Ok(pass) => pass,
            Err(end) => return end,
        };
        let Some(_target_passes) = self.ctx.route_passes().await else {
            return SessionEnd::QueueTimeout;
        };
        let early = [early, hello].concat();
        self.serve_tcp(client, named, early).await
    }

    /// Everything after the PROXY header (and the name): the connect and the relay, on this
    /// route's backends.
    async fn serve_tcp<S>(&mut self, client: &mut S, named: Option<crate::proto::Named>, early: Vec<u8>) -> SessionEnd
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + Any,
    {
        let timeout = self.ctx.route.connect_timeout;
        // Boxed, and dropped once connected: the connect phase is most of a session's
        // state, and an idle session need not carry it for its whole life.
        let connect = Box::pin(async {
            let mut tried = Vec::new();
            let dial = |pick: Pick| self.ctx.dialer.tcp(pick.addr, pick.egress, timeout);
            self.reach_backend(&mut tried, true, dial).await
        });
        let (pick, mut upstream) = match self.ctx.force.unless(connect).await {
            None => return SessionEnd::Forced,
            Some(Err(end)) => return end,
            Some(Ok(connected)) => connected,
        };
        let counted = self.ctx.balancer.counted(pick.backend);
        self.report.backend = Some(pick.addr);
        self.report.egress = Some(self.ctx.egress_name(&pick));
        // The address the client reached is asked of its socket only for a header that names
        // it: a system call less per connection everywhere else.
        let header = (self.ctx.route.send_proxy).map(|version| {
            let reached = named.map_or_else(|| self.reached(client), |(_, reached)| reached);
            crate::proto::proxy_header(version, self.peer(), reached)
        });
        let first = send_first(header, &early, &mut upstream);
        self.report.bytes_up += early.len() as u64;
        let end = match first.await {
            Ok(()) => self.relay(client, &mut upstream).await,
            Err(e) => SessionEnd::Failed(Direction::Up, e),
        };
        // The backend's socket closes, then the session is counted out of the backend; the
        // client's closes as the session finishes.
        drop((upstream, counted));
        end
    }

    /// The address the client reached: its socket's local address, or (injected) the route's.
    fn reached<S: Any>(&self, client: &S) -> SocketAddr {
        ((client as &dyn Any).downcast_ref::<TcpConn>())
            .and_then(|c| c.get_ref().local_addr().ok())
            .unwrap_or(self.ctx.route.listen)
    }

    /// The client and destination a trusted proxy names in its header (none for LOCAL), and
    /// the bytes read past the header; nothing at all when the route reads no header.
    async fn read_proxy<S: AsyncRead + Unpin>(
        &self,
        client: &mut S,
    ) -> Result<(Option<crate::proto::Named>, Vec<u8>), String> {
        let Some(accept) = &self.ctx.route.accept_proxy else {
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
    /// by copying otherwise (an injected stream, for one); then closes the pair as it ended.
    pub(super) async fn relay<S>(&mut self, client: &mut S, upstream: &mut TcpConn) -> SessionEnd
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + Any,
    {
        let (ctx, report) = (&self.ctx, &mut self.report);
        if log::log_enabled!(log::Level::Debug) {
            let backend = report.backend.map(|b| b.to_string()).unwrap_or_default();
            log::debug!(route = &*ctx.route_name, session = report.id.0, client:% = report.peer,
                backend = backend.as_str(); "session relaying");
        }
        let timeouts = ctx.route.timeouts;
        let mut meter = ctx.metrics.meter(&ctx.route_name, false);
        if let Some(egress) = &report.egress {
            ctx.metrics.by_egress(&mut meter, egress);
        }
        let tcp_client = (client as &mut dyn Any)
            .downcast_mut::<TcpConn>()
            .filter(|_| ctx.splice);
        let end = if let Some(tcp_client) = tcp_client {
            let mut pump = SplicePump::new(tcp_client, upstream, timeouts, meter);
            let end = ctx.force.unless(&mut pump).await;
            (report.bytes_up, report.bytes_down) = pump.bytes();
            report.path = pump.path();
            end
        } else {
            let mut pump = Pump::new(client, upstream, timeouts, meter);
            let end = ctx.force.unless(&mut pump).await;
            (report.bytes_up, report.bytes_down) = pump.bytes();
            report.path = Transfer::Copy;
            end
        };
        match end {
            None => SessionEnd::Forced,
            // Boxed: the close's state (a wait for the last bytes to arrive) is no part of an
            // idle session's.
            Some(end) => {
                (ctx.force.unless(Box::pin(close(end, client, upstream, report))).await).unwrap_or(SessionEnd::Forced)
            }
        }
    }
}

/// Carries out how a relayed pair ended, whichever way its bytes moved: the one place that
/// decides what reaches whom at the end. Nothing already taken from one side is thrown away
/// because the other side failed: a reset is passed on, and the client of a backend that went
/// away is closed, only once the side still served has acknowledged what it was sent (see
/// [`deliver`]). The pump itself holds nothing by then: a direction reads only once it has
/// passed on all it read before (its buffer or pipe is empty), so what is in flight is in
/// the socket's send queue.
async fn close<S>(end: End, client: &mut S, upstream: &mut TcpConn, report: &mut SessionReport) -> SessionEnd
where
    S: AsyncRead + AsyncWrite + Unpin + Any,
{
    match end {
        End::Done => SessionEnd::Done,
        End::Idle => SessionEnd::IdleTimeout,
        End::Fin => SessionEnd::FinTimeout,
        End::Aborted(direction, e) => {
            // A reset is passed on as a reset, so a truncated stream does not look complete,
            // but only once what came before it has arrived: a reset throws the socket's send
            // queue away. SO_LINGER 0 is set first (it acts only at the close), so that a
            // close that comes sooner (the drain's force) resets too.
            match direction {
                Direction::Up => {
                    reset(upstream);
                    let delivered = deliver(upstream, SETTLE).await;
                    report.settle(direction, delivered, true);
                }
                Direction::Down => {
                    reset(client);
                    let delivered = deliver(client, SETTLE).await;
                    report.settle(direction, delivered, true);
                }
            }
            SessionEnd::Aborted(direction, e)
        }
        End::Failed(Direction::Up, e) => {
            // The backend is gone after its whole answer went out, and the client has its FIN.
            // A client still uploading would be reset by the close (its input unread), and the
            // reset would throw away the end of the answer: the close waits until the client
            // has it all, reading and dropping the upload meanwhile, as nginx's lingering close.
            let _ = client.close().await;
            let delivered = deliver(client, SETTLE).await;
            let resets = rt::tcp_socket(client).is_some_and(|s| crate::net::unread(&*s).unwrap_or(0) > 0);
            report.settle(Direction::Down, delivered, resets);
            SessionEnd::Failed(Direction::Up, e)
        }
        End::Failed(Direction::Down, e) => SessionEnd::Failed(Direction::Down, e),
    }
}

/// Closing `side` will reset it (SO_LINGER 0) instead of ending it with a FIN. Only a TCP
/// socket can say so; any other stream just closes.
fn reset<S: Any>(side: &S) {
    if let Some(socket) = rt::tcp_socket(side) {
        let _ = socket.set_linger(Some(Duration::ZERO));
    }
}

/// What a closing side still had to receive when its pair ended, and what of it was left
/// unacknowledged when the wait for it ended.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Delivered {
    pub in_flight: u64,
    pub left: u64,
}

/// Waits until `side` has acknowledged every byte it was sent (its socket's send queue is
/// empty, SIOCOUTQ), reading and dropping whatever it still sends meanwhile, so that a peer
/// that writes before it reads gets to its read and can take the rest. Nothing but time
/// bounds the wait: it ends early when `side` resets, and gives up after `patience.quiet`
/// without progress (nothing read, nothing acknowledged) or `patience.most` in all, as nginx's
/// `lingering_timeout` and `lingering_time`. Reading on (rather than letting the upload's
/// window close) costs a lingering session some reads, but a client that sends its whole
/// request before it reads an answer would otherwise never read it; the descriptors stay
/// bounded by the time bounds, and the session is counted live until then. A stream that is
/// no TCP socket (a Unix socket injected) delivers what it was given at once.
async fn deliver<S: AsyncRead + Unpin + Any>(side: &mut S, patience: Patience) -> Delivered {
    let queued = |side: &S| rt::tcp_socket(side).map(|s| crate::net::unacked(&*s).unwrap_or(0) as u64);
    let Some(mut left) = queued(side) else {
        return Delivered::default();
    };
    let in_flight = left;
    let started = Instant::now();
    let mut progressed = started;
    let mut look = SETTLE_LOOK.start;
    let mut reading = true;
    // Allocated at the first read: most closes have nothing in flight, or no upload left.
    let mut buf = Vec::new();
    while left > 0 {
        let now = Instant::now();
        if now - progressed >= patience.quiet || now - started >= patience.most {
            break;
        }
        // No readiness event says "all acknowledged": the queue is looked at after each
        // read, and every `look` (doubling up to a bound) while nothing comes in.
        if reading {
            if buf.is_empty() {
                buf = vec![0; SETTLE_READ];
            }
            match rt::timeout(look, side.read(&mut buf)).await {
                Some(Ok(0)) => reading = false,
                Some(Ok(_)) => progressed = Instant::now(),
                // Reset by its peer: nothing more reaches it.
                Some(Err(_)) => break,
                None => look = (look * 2).min(SETTLE_LOOK.end),
            }
        } else {
            rt::sleep(look).await;
            look = (look * 2).min(SETTLE_LOOK.end);
        }
        let now_left = queued(side).unwrap_or(0);
        if now_left < left {
            progressed = Instant::now();
        }
        left = now_left;
    }
    Delivered { in_flight, left }
}

/// What goes to the backend before the relay: the PROXY protocol header, when the route sends
/// one, then the bytes that came behind the client's own header.
async fn send_first(header: Option<Vec<u8>>, early: &[u8], upstream: &mut TcpConn) -> std::io::Result<()> {
    if let Some(header) = header {
        upstream.write_all(&header).await?;
    }
    upstream.write_all(early).await
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::time::{Duration, Instant};

    use super::{Delivered, Patience, deliver};
    use crate::rt::{self, TcpConn};

    /// The relay's end of a connection, with as much written to it as its send queue takes
    /// while the peer (whose receive buffer is small) reads nothing; and the peer.
    fn loaded() -> (TcpConn, TcpStream, usize) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        socket.set_recv_buffer_size(16 << 10).unwrap();
        socket.connect(&listener.local_addr().unwrap().into()).unwrap();
        let (mut relay_side, _) = listener.accept().unwrap();
        relay_side.set_nonblocking(true).unwrap();
        let mut written = 0;
        while let Ok(n) = relay_side.write(&[b'a'; 64 << 10]) {
            written += n;
        }
        (TcpConn::new(relay_side).unwrap(), socket.into(), written)
    }

    const LONG: Patience = Patience {
        quiet: Duration::from_secs(20),
        most: Duration::from_secs(20),
    };

    #[test]
    fn deliver_waits_until_the_peer_has_acknowledged_every_byte() {
        let (mut relay_side, mut peer, written) = loaded();
        let reader = std::thread::spawn(move || {
            let mut got = vec![0; written];
            peer.read_exact(&mut got).map(|_| peer)
        });
        let delivered = rt::block_on(deliver(&mut relay_side, LONG));
        assert!(delivered.in_flight > 0, "bytes were in flight: {delivered:?}");
        assert_eq!(delivered.left, 0, "and all of them were acknowledged");
        reader.join().unwrap().expect("the peer read every byte written");
    }

    #[test]
    fn deliver_gives_up_on_a_peer_that_takes_nothing_after_its_quiet_time() {
        let (mut relay_side, _peer, _) = loaded();
        let short = Patience {
            quiet: Duration::from_millis(50),
            most: Duration::from_secs(20),
        };
        let Delivered { in_flight, left } = rt::block_on(deliver(&mut relay_side, short));
        // (Its kernel may still take what its receive buffer has room for.)
        assert!(left > 0 && left <= in_flight, "{in_flight} in flight, {left} left");
    }

    #[test]
    fn deliver_ends_when_the_peer_resets() {
        let (mut relay_side, peer, _) = loaded();
        socket2::SockRef::from(&peer).set_linger(Some(Duration::ZERO)).unwrap();
        drop(peer);
        let started = Instant::now();
        rt::block_on(deliver(&mut relay_side, LONG));
        assert!(
            started.elapsed() < LONG.quiet,
            "ended by the reset, not by its patience"
        );
    }

    /// The size of the future a function returns, known without calling it.
    fn returned_size<A, B, R>(_: fn(A, B) -> R) -> usize {
        std::mem::size_of::<R>()
    }

    #[test]
    fn a_tcp_sessions_future_stays_small() {
        // An idle connection's memory is mostly this future (its task holds it whole), so it
        // is pinned: 1,568 B before the close waited for the last bytes, 1,600 B with that
        // wait, 1,512 B once the phases borrowed the Session instead of taking it. A change
        // that grows it should say why, and move what it adds behind a Box that only a session
        // in that phase allocates (as the connect and the close are).
        let run = super::Session::run_tcp::<TcpConn>;
        let size = returned_size(run as fn(_, _) -> _);
        assert!(size <= 1_512, "a TCP session's future grew to {size} B");
    }

    #[test]
    fn a_stream_that_is_no_tcp_socket_has_nothing_in_flight() {
        let (mut a, _b) = crate::rt::Conn::pair().unwrap();
        assert_eq!(rt::block_on(deliver(&mut a, LONG)), Delivered::default());
    }
}
