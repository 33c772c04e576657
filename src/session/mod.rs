//! Session actor, one per client connection: asks the Balancer for a backend, the Dialer for
//! the upstream (the next backend on a failed connect), relays both ways, and reports how it
//! ended. Nobody sends a session messages; the relay's force signal is its only input.

mod pump;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::io::{AsyncRead, AsyncWrite};

pub use pump::Direction;
use pump::{End, Pump};

use crate::balancer::{BackendId, BalancerHandle, Pick};
use crate::config::Route;
use crate::dialer::DialerHandle;
use crate::error::DialError;
use crate::rt::{self, TcpConn};
use crate::shutdown::{DrainGuard, Signal};

/// Relay-wide number of a session, as it appears in logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(pub u64);

/// How a session ended.
#[derive(Debug)]
pub enum SessionEnd {
    /// Both directions ended with a FIN, in either order.
    Done,
    /// No traffic either way for the route's idle timeout.
    IdleTimeout,
    /// One direction had ended and the other stayed silent for the fin timeout.
    FinTimeout,
    /// Reading or writing failed (e.g. a reset) while moving bytes this way.
    Failed(Direction, std::io::Error),
    /// No backend could be reached; `tried` of them were attempted.
    NoBackend { tried: usize },
    /// The relay's drain deadline passed while the session was still live.
    Forced,
    /// The relay stopped under the session.
    RelayStopped,
}

/// Everything worth knowing about a finished session.
#[derive(Debug)]
pub struct SessionReport {
    pub id: SessionId,
    pub route: Arc<str>,
    pub peer: SocketAddr,
    pub backend: Option<SocketAddr>,
    pub egress: Option<String>,
    /// Client to backend.
    pub bytes_up: u64,
    /// Backend to client.
    pub bytes_down: u64,
    pub duration: Duration,
    pub end: SessionEnd,
}

/// Relay-wide session counters (plain atomics: counts, not balancing state).
#[derive(Debug, Default)]
pub struct SessionStats {
    next_id: AtomicU64,
    active: AtomicU64,
    forced: AtomicU64,
}

impl SessionStats {
    pub fn active(&self) -> u64 {
        self.active.load(Ordering::Relaxed)
    }

    pub fn total(&self) -> u64 {
        self.next_id.load(Ordering::Relaxed)
    }

    pub fn forced(&self) -> u64 {
        self.forced.load(Ordering::Relaxed)
    }
}

/// Counts a session as active for as long as it lives, however it ends.
struct Live(Arc<SessionStats>);

impl Drop for Live {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What a route's sessions share; the Listener and [`crate::Relay::inject`] open sessions here.
#[derive(Clone)]
pub(crate) struct Sessions {
    pub route: Arc<Route>,
    pub route_name: Arc<str>,
    pub egress_names: Arc<[String]>,
    pub balancer: BalancerHandle,
    pub dialer: DialerHandle,
    pub force: Signal,
    pub stats: Arc<SessionStats>,
}

impl Sessions {
    /// Starts a session for `client`; the handle yields its report.
    pub fn open<S>(&self, client: S, peer: SocketAddr, guard: DrainGuard) -> rt::JoinHandle<SessionReport>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let id = SessionId(self.stats.next_id.fetch_add(1, Ordering::Relaxed));
        self.stats.active.fetch_add(1, Ordering::Relaxed);
        let live = Live(self.stats.clone());
        let session = Session {
            id,
            peer,
            ctx: self.clone(),
        };
        rt::spawn(async move {
            let report = session.run(client).await;
            drop((live, guard));
            report
        })
    }
}

struct Session {
    id: SessionId,
    peer: SocketAddr,
    ctx: Sessions,
}

impl Session {
    async fn run<S>(self, mut client: S) -> SessionReport
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let started = Instant::now();
        let mut report = SessionReport {
            id: self.id,
            route: self.ctx.route_name.clone(),
            peer: self.peer,
            backend: None,
            egress: None,
            bytes_up: 0,
            bytes_down: 0,
            duration: Duration::ZERO,
            end: SessionEnd::Forced,
        };
        let force = self.ctx.force.clone();
        match force.unless(self.connect()).await {
            None => {}
            Some(Err(end)) => report.end = end,
            Some(Ok((pick, mut upstream))) => {
                report.backend = Some(pick.addr);
                report.egress = Some(self.ctx.egress_names[pick.egress.0].clone());
                report.end = self.relay(&mut client, &mut upstream, &mut report).await;
                let _ = self.ctx.balancer.closed(pick.backend).await;
            }
        }
        if matches!(report.end, SessionEnd::Forced) {
            self.ctx.stats.forced.fetch_add(1, Ordering::Relaxed);
        }
        report.duration = started.elapsed();
        log_end(&report);
        report
    }

    /// Tries backends in the balancer's order until one connects or the attempts run out.
    async fn connect(&self) -> Result<(Pick, TcpConn), SessionEnd> {
        let route = &self.ctx.route;
        let mut tried: Vec<BackendId> = Vec::new();
        while tried.len() < route.connect_attempts.get() {
            let pick = match self.ctx.balancer.pick(&tried).await {
                Ok(Some(pick)) => pick,
                Ok(None) => break,
                Err(_) => return Err(SessionEnd::RelayStopped),
            };
            tried.push(pick.backend);
            let dialed = self.ctx.dialer.tcp(pick.addr, pick.egress, route.connect_timeout).await;
            let ok = dialed.is_ok();
            let _ = self.ctx.balancer.connected(pick.backend, ok).await;
            match dialed {
                Ok(upstream) => return Ok((pick, upstream)),
                Err(DialError::Gone(_)) => return Err(SessionEnd::RelayStopped),
                Err(e) => log::warn!(route = &*self.ctx.route_name, session = self.id.0, client:% = self.peer,
                    backend:% = pick.addr, egress = &*self.ctx.egress_names[pick.egress.0], err:% = e; "connect failed"),
            }
        }
        Err(SessionEnd::NoBackend { tried: tried.len() })
    }

    async fn relay<S>(&self, client: &mut S, upstream: &mut TcpConn, report: &mut SessionReport) -> SessionEnd
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        log::debug!(route = &*self.ctx.route_name, session = self.id.0, client:% = self.peer,
            backend:? = report.backend; "session relaying");
        let mut pump = Pump::new(client, upstream, self.ctx.route.timeouts);
        let end = self.ctx.force.unless(&mut pump).await;
        (report.bytes_up, report.bytes_down) = pump.bytes();
        match end {
            None => SessionEnd::Forced,
            Some(End::Done) => SessionEnd::Done,
            Some(End::Idle) => SessionEnd::IdleTimeout,
            Some(End::Fin) => SessionEnd::FinTimeout,
            Some(End::Failed(direction, e)) => SessionEnd::Failed(direction, e),
        }
    }
}

/// One summary line per session; a session that reached no backend is a warning.
fn log_end(r: &SessionReport) {
    let end = format!("{:?}", r.end);
    let backend = r.backend.map(|b| b.to_string()).unwrap_or_else(|| "-".into());
    let egress = r.egress.as_deref().unwrap_or("-");
    let level = match r.end {
        SessionEnd::NoBackend { .. } => log::Level::Warn,
        _ => log::Level::Info,
    };
    log::log!(level, route = &*r.route, session = r.id.0, client:% = r.peer, backend = backend.as_str(),
        egress = egress, bytes_up = r.bytes_up, bytes_down = r.bytes_down,
        duration_ms = r.duration.as_millis() as u64, end = end.as_str(); "session closed");
}
