//! Session actor, one per TCP connection or UDP flow: asks the Balancer for a backend, the Dialer
//! for the upstream (the next backend when a dial fails), relays both ways, and reports how it
//! ended. Nobody sends a session messages; the relay's stop and force signals are its inputs,
//! and a UDP flow's datagrams arrive on its own bounded queue (see `udp`).

mod pump;
mod splice;
mod tcp;
mod tunnel;
mod udp;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

pub use pump::Direction;
pub(crate) use udp::{Flow, FlowEnded, MAX_DATAGRAM};

use crate::balancer::{BackendId, BalancerHandle, Pick, Tried};
use crate::config::Route;
use crate::dialer::DialerHandle;
use crate::error::{DialError, Fault};
use crate::shutdown::{DrainGuard, Signal};
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
    /// before its request was complete).
    Refused(u16),
    /// The route (or the relay) was at `max_connections` for the whole `queue_timeout`.
    QueueTimeout,
    /// The route routes by TLS server name, and this connection's ClientHello named none it
    /// has a route for (or was no ClientHello, or not in time).
    NoRouteForName(String),
    /// The route reads PROXY protocol headers, and this connection sent none that was valid
    /// in time.
    BadProxyHeader(String),
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

/// What a route's sessions share; the Listeners and [`crate::Relay::inject`] open sessions here.
/// Every session holds a clone, so it is one reference count, not one per field.
#[derive(Clone)]
pub(crate) struct RouteContext(Arc<RouteParts>);

/// The route's settings and the handles of the actors its sessions talk to.
pub(crate) struct RouteParts {
    pub route: Arc<Route>,
    pub route_name: Arc<str>,
    pub egress_names: Arc<[Arc<str>]>,
    pub balancer: BalancerHandle,
    pub dialer: DialerHandle,
    pub stop: Signal,
    pub force: Signal,
    pub stats: Arc<Stats>,
    /// TCP pairs move bytes by splice(2).
    pub splice: bool,
    /// Live sessions the relay's descriptors can serve: listeners wait for room before they
    /// accept more.
    pub budget: Arc<crate::limits::Budget>,
    /// Warnings that any client (or one dead backend) can cause in any number: refused
    /// sessions and failed dials, each at most one line a second for the route.
    pub refusals: crate::logging::Squelch,
    pub dial_failures: crate::logging::Squelch,
    /// The relay's Prometheus metrics.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// The route's `max_connections`, and the relay's.
    pub gates: Vec<Arc<crate::limits::Gate>>,
    /// With `sni`: the routes its names pick, set once every route exists.
    pub sni_targets: std::sync::OnceLock<SniTargets>,
}

/// The routes an `sni` section names, resolved to their contexts.
pub(crate) struct SniTargets {
    pub rules: Vec<(crate::acl::HostPattern, RouteContext)>,
    pub default: Option<RouteContext>,
}

impl SniTargets {
    /// The route for `name`: the first rule that matches, else the default.
    pub fn pick(&self, name: Option<&str>) -> Option<&RouteContext> {
        let matched = name.and_then(|n| self.rules.iter().find(|(pattern, _)| pattern.matches(n)));
        matched.map(|(_, route)| route).or(self.default.as_ref())
    }
}

impl RouteContext {
    /// True when the route's allow/deny lists let `client` in. A refusal is counted, and
    /// logged at most once a second for the route.
    pub fn admits(&self, client: SocketAddr) -> bool {
        let trusted = (self.route.accept_proxy.as_ref()).is_none_or(|a| a.trusted.admits(client.ip()));
        if trusted && self.route.clients.admits(client.ip()) {
            return true;
        }
        self.metrics.client_refused(&self.route_name);
        if let Some(held) = self.refusals.admit() {
            log::warn!(route = &*self.route_name, client:% = client, held_back = held;
                "client refused by the route's allow/deny lists");
        }
        false
    }

    /// Passes through the route's and the relay's session caps, waiting up to the route's
    /// `queue_timeout` for room (`wait`), or at once; `None` when there was none.
    pub async fn passes(&self, wait: bool) -> Option<Vec<crate::limits::Pass>> {
        let mut passes = Vec::with_capacity(self.gates.len());
        for gate in &self.gates {
            let pass = match wait {
                true => gate.enter(self.route.queue_timeout).await,
                false => gate.try_enter(),
            };
            passes.push(pass?);
        }
        Some(passes)
    }

    /// True while the relay has room for one more session.
    pub fn has_room(&self) -> bool {
        self.stats.active() < self.budget.cap()
    }

    pub fn new(context: RouteParts) -> Self {
        RouteContext(Arc::new(context))
    }
}

impl std::ops::Deref for RouteContext {
    type Target = RouteParts;

    fn deref(&self) -> &RouteParts {
        &self.0
    }
}

impl RouteContext {
    /// `session` as a task's future, counted live until it ends, which yields its report; the
    /// caller spawns it where it should run.
    fn session_task<F>(
        &self,
        guard: DrainGuard,
        session: impl FnOnce(SessionId) -> F,
    ) -> (SessionId, impl Future<Output = SessionReport> + Send + 'static)
    where
        F: Future<Output = SessionReport> + Send + 'static,
    {
        let id = SessionId(self.stats.opened());
        let mut live = Live {
            stats: self.stats.clone(),
            forced: false,
        };
        let session = session(id);
        self.metrics.session_opened(&self.route_name);
        let context = self.clone();
        // A combinator, not an async block: a block would hold the session future twice, once
        // as it was captured and once as it is awaited, for the session's whole life.
        //
        // A panic is a bug, but it ends this session only: its sockets close as it unwinds,
        // its counts are released by their guards, and it is logged.
        let finished = futures::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(session));
        let finished = futures::FutureExt::map(finished, move |ended| {
            let report = match ended {
                Ok(report) => report,
                Err(panic) => {
                    let what = (panic.downcast_ref::<&str>().map(|s| s.to_string()))
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "a panic".into());
                    let route = context.route_name.clone();
                    log::error!(route = &*route, session = id.0, panic = what.as_str(); "session panicked: a bug");
                    let mut report = SessionReport::new(id, route, SocketAddr::from(([0, 0, 0, 0], 0)));
                    report.end = SessionEnd::Panicked(what);
                    report
                }
            };
            live.forced = matches!(report.end, SessionEnd::Forced);
            live.stats.relayed_by(report.path);
            (context.metrics).session_ended(crate::metrics::Ended {
                route: &report.route,
                reason: report.end.word(),
                refused: match report.end {
                    SessionEnd::Refused(status) => Some(status),
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

    /// The name of the picked egress. A session that began before a reload added egresses
    /// can be offered one its context does not list: it is named by its number then.
    fn egress_name(&self, pick: &Pick) -> Arc<str> {
        self.egress_named(pick.egress)
    }

    fn egress_named(&self, egress: crate::config::EgressId) -> Arc<str> {
        match self.egress_names.get(egress.0) {
            Some(name) => name.clone(),
            None => format!("#{}", egress.0).into(),
        }
    }

    /// Tries the balancer's pairs until `dial` succeeds or the route's attempts run out. Each
    /// failure is charged to its cause: a backend at fault is not offered again (and counts
    /// as an attempt); an egress or path at fault rules out only that backend by that egress,
    /// so the same backend is tried by the next egress before the client sees anything.
    /// `proves`: a dial that succeeds proves the backend (TCP); a UDP socket proves nothing.
    async fn reach_backend<T, F, Fut>(
        &self,
        id: SessionId,
        peer: SocketAddr,
        tried: &mut Vec<Tried>,
        proves: bool,
        dial: F,
    ) -> Result<(Pick, T), SessionEnd>
    where
        F: Fn(Pick) -> Fut,
        Fut: Future<Output = Result<T, DialError>>,
    {
        let mut last: Option<String> = None;
        let why = loop {
            let failed = tried.iter().filter(|t| t.egress.is_none()).count();
            if failed >= self.route.connect_attempts.map_or(usize::MAX, |n| n.get()) {
                break format!("{failed} connect attempts failed");
            }
            let pick = match self.balancer.pick(peer.ip(), tried).await {
                Ok(Ok(pick)) => pick,
                Ok(Err(why)) => break why,
                Err(_) => return Err(SessionEnd::RelayStopped),
            };
            let started = std::time::Instant::now();
            let e = match dial(pick).await {
                Ok(upstream) => {
                    (self.metrics).dialed(
                        &self.route_name,
                        pick.addr,
                        &self.egress_name(&pick),
                        Ok(started.elapsed()),
                    );
                    if proves && pick.report_success {
                        let _ = self.balancer.connected(pick.backend, Ok(())).await;
                    }
                    return Ok((pick, upstream));
                }
                Err(DialError::Gone(_)) => return Err(SessionEnd::RelayStopped),
                Err(e) => e,
            };
            let fault = e.fault().unwrap_or(Fault::Backend);
            (self.metrics).dialed(&self.route_name, pick.addr, &self.egress_name(&pick), Err(fault));
            let _ = self.balancer.connected(pick.backend, Err((fault, e.to_string()))).await;
            if let Some(held) = self.dial_failures.admit() {
                log::warn!(route = &*self.route_name, session = id.0, client:% = peer, backend:% = pick.addr,
                    egress = &*self.egress_name(&pick), fault:? = fault, err:% = e, held_back = held; "connect failed");
            }
            last = Some(e.to_string());
            match fault {
                Fault::Relay => {
                    self.budget.refresh();
                    break "the relay is short of resources".to_string();
                }
                Fault::Backend => tried.push(Tried {
                    backend: pick.backend,
                    egress: None,
                }),
                Fault::Egress | Fault::Path => tried.push(Tried {
                    backend: pick.backend,
                    egress: Some(pick.egress),
                }),
            }
        };
        self.stats.refused_no_backend();
        let mut backends: Vec<BackendId> = tried.iter().map(|t| t.backend).collect();
        backends.sort_unstable_by_key(|b| b.0);
        backends.dedup();
        let why = match last {
            Some(last) => format!("{why}; the last failure: {last}"),
            None => why,
        };
        Err(SessionEnd::NoBackend {
            tried: backends.len(),
            why,
        })
    }
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
            SessionEnd::Refused(_) => "refused",
            SessionEnd::QueueTimeout => "queue_timeout",
            SessionEnd::BadProxyHeader(_) => "bad_proxy_header",
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
            SessionEnd::Refused(status) => Some(format!("status {status}")),
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
        | SessionEnd::Refused(_)
        | SessionEnd::QueueTimeout
        | SessionEnd::BadProxyHeader(_)
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
    log::log!(level, route = &*r.route, session = r.id.0, client:% = r.peer, backend = backend.as_str(),
        egress = egress, bytes_up = r.bytes_up, bytes_down = r.bytes_down, in_flight = r.in_flight,
        duration_ms = r.duration.as_millis() as u64, end = r.end.word(), why = why, held_back = held;
        "session closed");
}
