//! Session actor, one per TCP connection or UDP flow: asks the Balancer for a backend, the Dialer
//! for the upstream (the next backend when a dial fails), relays both ways, and reports how it
//! ended. Nobody sends a session messages; the relay's stop and force signals are its inputs,
//! and a UDP flow's datagrams arrive on its own bounded queue (see `udp`).
//!
//! Here: the [`Session`] type, its report and how it is spawned. Beside it: `context` (what a
//! route's sessions share), `connect` (pick and dial, with failover), the three kinds of session
//! (`tcp`, `tunnel`, `udp`), and how a TCP pair's bytes move (`pump`, `splice`).

mod connect;
mod context;
mod pump;
mod splice;
mod tcp;
mod tunnel;
mod udp;

use std::any::Any;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::io::{AsyncRead, AsyncWrite};

pub(crate) use context::{RouteContext, RouteParts, SniTargets};
pub use pump::Direction;
pub(crate) use udp::{Flow, FlowEnded, MAX_DATAGRAM};

use crate::config::Protocol;
use crate::rt::{self, JoinHandle, TcpConn};
use crate::shutdown::DrainGuard;
use crate::stats::Stats;
pub use crate::stats::Transfer;

/// Relay-wide number of a session, as it appears in logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(pub u64);

/// How a session ended.
#[derive(Debug)]
pub enum SessionEnd {
    /// Both directions ended with a FIN, in either order.
    Done,
    /// No traffic either way for the route's idle timeout (for UDP flows: the normal end).
    IdleTimeout,
    /// One direction had ended and the other stayed silent for the fin timeout.
    FinTimeout,
    /// The side this direction reads from reset the connection, and the reset was passed on to
    /// the other side as a reset (for a UDP flow: its backend answered with an ICMP error).
    Aborted(Direction, std::io::Error),
    /// Writing this direction's destination failed: it went away while the other side was
    /// still sending. What the other direction carried was delivered first.
    Failed(Direction, std::io::Error),
    /// No backend could be reached; `tried` of them were attempted, and `why` there was none
    /// left (`no healthy backend`, `egress up1 down: carrier lost on up1`, ...).
    NoBackend { tried: usize, why: String },
    /// A CONNECT request was answered with this status and not served (0: the client left
    /// before its request was complete), and why (the target it named, what was wrong).
    Refused { status: u16, why: String },
    /// The route (or the relay) was at `max_connections` for the whole `queue_timeout`.
    QueueTimeout,
    /// The route routes by TLS server name, and this connection's ClientHello named none it
    /// has a route for (or was no ClientHello, or not in time).
    NoRouteForName(String),
    /// The route reads PROXY protocol headers, and this connection sent none that was valid
    /// in time.
    BadProxyHeader(String),
    /// The client a PROXY header named, or the one an `sni` route handed on, is refused by the
    /// allow/deny lists of the route that was to serve it.
    ClientRefused,
    /// The client is over the route's `per_client` limits.
    ClientLimited(crate::limits::OverLimit),
    /// Half the relay's session budget (this many) was already reading what comes before the
    /// relay (PROXY headers, ClientHellos, CONNECT heads).
    PreludesFull(u64),
    /// The relay's drain deadline passed while the session was still live.
    Forced,
    /// The relay stopped under the session (for UDP flows: the relay's stop, after a quiet spell).
    RelayStopped,
    /// The session hit a bug (a panic, with its message) and was closed.
    Panicked(String),
}

/// Everything worth knowing about a finished session.
#[derive(Debug)]
pub struct SessionReport {
    pub id: SessionId,
    pub route: Arc<str>,
    pub peer: SocketAddr,
    pub backend: Option<SocketAddr>,
    pub egress: Option<Arc<str>>,
    /// Client to backend.
    pub bytes_up: u64,
    /// Backend to client.
    pub bytes_down: u64,
    /// UDP datagrams, up and down (0 for TCP).
    pub datagrams: (u64, u64),
    pub duration: Duration,
    pub end: SessionEnd,
    pub path: Transfer,
    /// Bytes the relay had passed to one side that it had not acknowledged yet when the other
    /// side reset or went away (0 when nothing was in flight, or no reset came). They were
    /// delivered before the close, unless the bounded wait for them ran out: what was then
    /// thrown away is not counted in `bytes_up`/`bytes_down`.
    pub in_flight: u64,
    /// The worker (its number) whose listener accepted the session, and the one that ran it
    /// to its end; `None` off the relay's workers (an embedder's injected session is
    /// accepted on its own thread). A TCP session is accepted and run on one worker.
    pub accepted_on: Option<u16>,
    pub worker: Option<u16>,
}

impl SessionReport {
    fn new(id: SessionId, route: Arc<str>, peer: SocketAddr) -> Self {
        SessionReport {
            id,
            route,
            peer,
            backend: None,
            egress: None,
            bytes_up: 0,
            bytes_down: 0,
            datagrams: (0, 0),
            duration: Duration::ZERO,
            end: SessionEnd::Forced,
            path: Transfer::NotRelayed,
            in_flight: 0,
            accepted_on: None,
            worker: None,
        }
    }

    /// Notes what was in flight towards the side `direction` writes to when the pair ended,
    /// and takes out of its count what the close throws away (`discards`: it resets).
    fn settle(&mut self, direction: Direction, delivered: tcp::Delivered, discards: bool) {
        self.in_flight = delivered.in_flight;
        if !discards || delivered.left == 0 {
            return;
        }
        let bytes = match direction {
            Direction::Up => &mut self.bytes_up,
            Direction::Down => &mut self.bytes_down,
        };
        *bytes = bytes.saturating_sub(delivered.left);
        log::warn!(route = &*self.route, session = self.id.0, client:% = self.peer, direction = direction.word(),
            undelivered = delivered.left, in_flight = delivered.in_flight;
            "session closed with bytes its peer never acknowledged");
    }
}

/// Counts a session as live for as long as it runs, however it ends.
struct Live {
    stats: Arc<Stats>,
    forced: bool,
}

impl Drop for Live {
    fn drop(&mut self) {
        self.stats.closed(self.forced);
    }
}

/// One session, from its accept (or first datagram) to its report: a TCP connection, a CONNECT
/// tunnel or a UDP flow. It holds the context of the route that serves it and gathers what it
/// learns (the client a PROXY header names, the backend, the bytes) in its report, which
/// [`Session::finish`] completes; the three kinds are its methods (`tcp`, `tunnel`, `udp`).
pub(crate) struct Session {
    /// The route that serves it (an `sni` route hands it on to the route a name picks).
    ctx: RouteContext,
    started: Instant,
    /// What it has learnt so far.
    report: SessionReport,
}

impl Session {
    fn new(ctx: RouteContext, id: SessionId, peer: SocketAddr) -> Session {
        let report = SessionReport::new(id, ctx.route_name.clone(), peer);
        Session {
            ctx,
            started: Instant::now(),
            report,
        }
    }

    fn id(&self) -> SessionId {
        self.report.id
    }

    /// The client: the one a PROXY header named, once it is read.
    fn peer(&self) -> SocketAddr {
        self.report.peer
    }

    /// From here on the session is `target`'s (an `sni` route handing it on): counted as
    /// handed on by the route that took it, and as opened by `target`, so that each route's
    /// sessions open and end under its own name.
    fn hand_to(&mut self, target: &RouteContext) {
        self.ctx
            .metrics
            .session_handed(&self.ctx.route_name, &target.route_name);
        self.ctx = target.clone();
        self.report.route = target.route_name.clone();
    }

    /// The client's place under the route's `per_client` limits, held for the session's life.
    fn client_pass(&self) -> Result<crate::limits::ClientPass, SessionEnd> {
        if self.ctx.route.per_client.is_none() {
            // No lock taken on a route without limits: most routes, every connection.
            return Ok(crate::limits::ClientPass::unlimited());
        }
        let admitted = self.ctx.per_client.admit(self.peer().ip());
        admitted.map_err(SessionEnd::ClientLimited)
    }

    /// A place among the sessions still reading what comes before their relay.
    fn prelude(&self) -> Result<crate::limits::PreludePass, SessionEnd> {
        let budget = &self.ctx.budget;
        budget
            .enter_prelude()
            .ok_or_else(|| SessionEnd::PreludesFull(budget.prelude_cap()))
    }

    /// The session's report, ended by `end`: the one place a report is completed. The task
    /// around the session counts and logs it ([`spawned`]).
    fn finish(self, end: SessionEnd) -> SessionReport {
        let mut report = self.report;
        (report.end, report.duration) = (end, self.started.elapsed());
        report
    }
}

impl RouteContext {
    /// Starts a session for an accepted (or injected) `client`; the handle yields its report.
    pub fn open<S>(&self, client: S, peer: SocketAddr, guard: DrainGuard) -> JoinHandle<SessionReport>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + Any,
    {
        match self.route.protocol {
            Protocol::HttpConnect => rt::spawn(spawned(self, peer, guard, |s| s.run_tunnel(client)).1),
            Protocol::Tcp | Protocol::Udp => rt::spawn(spawned(self, peer, guard, |s| s.run_tcp(client)).1),
        }
    }

    /// Starts a session for a connection a listener accepted, on the listener's worker: its
    /// sockets' events, its pick and its dial never wake another thread.
    pub(crate) fn accepted(&self, client: TcpConn, peer: SocketAddr, guard: DrainGuard) -> JoinHandle<SessionReport> {
        match self.route.protocol {
            Protocol::HttpConnect => rt::spawn_here(spawned(self, peer, guard, |s| s.run_tunnel(client)).1),
            Protocol::Tcp | Protocol::Udp => rt::spawn_here(spawned(self, peer, guard, |s| s.run_tcp(client)).1),
        }
    }

    /// Starts a UDP flow whose first datagram is `first`, on this worker: the datagrams it is
    /// handed, and the replies it sends out of the listener's socket, never wake another thread.
    pub fn open_flow(&self, flow: Flow, first: Vec<u8>, guard: DrainGuard) -> (SessionId, JoinHandle<SessionReport>) {
        let (id, task) = spawned(self, flow.client, guard, |s| s.run_udp(flow, first));
        (id, rt::spawn_here(task))
    }
}

/// A session of `ctx` for `peer` as a task's future, counted live until it ends, which yields
/// its report (counted and logged); the caller spawns it where it should run.
fn spawned<F>(
    ctx: &RouteContext,
    peer: SocketAddr,
    guard: DrainGuard,
    run: impl FnOnce(Session) -> F,
) -> (SessionId, impl Future<Output = SessionReport> + Send + 'static)
where
    F: Future<Output = SessionReport> + Send + 'static,
{
    let (id, opened) = (SessionId(ctx.stats.opened()), Instant::now());
    // Called where the session is accepted (a listener's task); the report's end is written
    // where it ran.
    let accepted_on = rt::worker_index();
    let mut live = Live {
        stats: ctx.stats.clone(),
        forced: false,
    };
    let session = run(Session::new(ctx.clone(), id, peer));
    ctx.metrics.session_opened(&ctx.route_name);
    let context = ctx.clone();
    // A combinator, not an async block: a block would hold the session future twice, once
    // as it was captured and once as it is awaited, for the session's whole life.
    //
    // A panic is a bug, but it ends this session only: its sockets close as it unwinds,
    // its counts are released by their guards, and it is logged.
    let finished = futures::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(session));
    let finished = futures::FutureExt::map(finished, move |ended| {
        let mut report = match ended {
            Ok(report) => report,
            Err(panic) => {
                let what = (panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "a panic".into());
                log::error!(route = &*context.route_name, session = id.0, client:% = peer, panic = what.as_str();
                    "session panicked: a bug");
                let mut report = Session::new(context.clone(), id, peer).finish(SessionEnd::Panicked(what));
                report.duration = opened.elapsed();
                report
            }
        };
        (report.accepted_on, report.worker) = (accepted_on, rt::worker_index());
        if accepted_on.is_some() && accepted_on != report.worker {
            // A session spawned off its listener's worker: its events cross threads (a bug).
            log::warn!(route = &*report.route, session = id.0, accepted_on:? = accepted_on, worker:? = report.worker;
                "session ran on another worker than the one that accepted it");
        }
        live.forced = matches!(report.end, SessionEnd::Forced);
        live.stats.relayed_by(report.path);
        (context.metrics).session_ended(crate::metrics::Ended {
            route: &report.route,
            reason: report.end.word(),
            refused: match report.end {
                SessionEnd::Refused { status, .. } => Some(status),
                _ => None,
            },
            lasted: report.duration,
        });
        log_end(&report, &context);
        drop((live, guard));
        report
    });
    (id, finished)
}

impl SessionEnd {
    /// A stable word for logs and counters.
    pub fn word(&self) -> &'static str {
        match self {
            SessionEnd::Done => "done",
            SessionEnd::IdleTimeout => "idle_timeout",
            SessionEnd::FinTimeout => "fin_timeout",
            SessionEnd::Aborted(Direction::Up, _) => "reset_by_client",
            SessionEnd::Aborted(Direction::Down, _) => "reset_by_backend",
            SessionEnd::Failed(Direction::Up, _) => "backend_went_away",
            SessionEnd::Failed(Direction::Down, _) => "client_went_away",
            SessionEnd::NoBackend { .. } => "no_backend",
            SessionEnd::Refused { .. } => "refused",
            SessionEnd::QueueTimeout => "queue_timeout",
            SessionEnd::BadProxyHeader(_) => "bad_proxy_header",
            SessionEnd::ClientRefused => "client_refused",
            SessionEnd::ClientLimited(_) => "client_limited",
            SessionEnd::PreludesFull(_) => "preludes_full",
            SessionEnd::NoRouteForName(_) => "no_route_for_name",
            SessionEnd::Forced => "forced",
            SessionEnd::RelayStopped => "relay_stopped",
            SessionEnd::Panicked(_) => "internal_error",
        }
    }

    /// The details behind the word, where there are any.
    pub fn detail(&self) -> Option<String> {
        match self {
            SessionEnd::Aborted(_, e) | SessionEnd::Failed(_, e) => Some(match errno_name(e) {
                Some(name) => format!("{name}: {e}"),
                None => e.to_string(),
            }),
            SessionEnd::NoBackend { tried, why } => Some(format!("{why} ({tried} tried)")),
            SessionEnd::ClientLimited(over) => Some(over.to_string()),
            SessionEnd::PreludesFull(cap) => Some(format!("{cap} sessions already reading their headers")),
            SessionEnd::Refused { status, why } => Some(format!("status {status}: {why}")),
            SessionEnd::Panicked(what) | SessionEnd::BadProxyHeader(what) | SessionEnd::NoRouteForName(what) => {
                Some(what.clone())
            }
            _ => None,
        }
    }
}

/// The errno's name (`ECONNRESET`), for the errors a session ends by.
pub(crate) fn errno_name(e: &std::io::Error) -> Option<&'static str> {
    Some(match e.raw_os_error()? {
        libc::ECONNRESET => "ECONNRESET",
        libc::EPIPE => "EPIPE",
        libc::ECONNREFUSED => "ECONNREFUSED",
        libc::ETIMEDOUT => "ETIMEDOUT",
        libc::EHOSTUNREACH => "EHOSTUNREACH",
        libc::ENETUNREACH => "ENETUNREACH",
        libc::ENETDOWN => "ENETDOWN",
        libc::EADDRNOTAVAIL => "EADDRNOTAVAIL",
        libc::ECONNABORTED => "ECONNABORTED",
        libc::EMFILE => "EMFILE",
        libc::ENFILE => "ENFILE",
        libc::ENOBUFS => "ENOBUFS",
        libc::ENOMEM => "ENOMEM",
        _ => return None,
    })
}

/// One summary line per session; a session that reached no backend, or was refused, is a
/// warning.
fn log_end(r: &SessionReport, route: &RouteContext) {
    let level = match r.end {
        SessionEnd::NoBackend { .. }
        | SessionEnd::Refused { .. }
        | SessionEnd::QueueTimeout
        | SessionEnd::BadProxyHeader(_)
        | SessionEnd::ClientRefused
        | SessionEnd::ClientLimited(_)
        | SessionEnd::PreludesFull(_)
        | SessionEnd::NoRouteForName(_) => log::Level::Warn,
        _ => log::Level::Info,
    };
    if !log::log_enabled!(level) {
        return;
    }
    // Refusals are what a client (or a dead backend) can cause in any number: one a second.
    let held = match level {
        log::Level::Warn => match route.refusals.admit() {
            Some(held) => held,
            None => return,
        },
        _ => 0,
    };
    let detail = r.end.detail();
    let why = detail.as_deref().unwrap_or("-");
    let backend = r.backend.map(|b| b.to_string()).unwrap_or_else(|| "-".into());
    let egress = r.egress.as_deref().unwrap_or("-");
    let worker = r.worker.map_or_else(|| "-".into(), |w| w.to_string());
    log::log!(level, route = &*r.route, session = r.id.0, client:% = r.peer, backend = backend.as_str(),
        egress = egress, bytes_up = r.bytes_up, bytes_down = r.bytes_down, in_flight = r.in_flight,
        duration_ms = r.duration.as_millis() as u64, end = r.end.word(), why = why, worker = worker.as_str(), held_back = held;
        "session closed");
}
