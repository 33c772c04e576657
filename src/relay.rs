//! The relay: starts the actors in dependency order (Dialer, then per route a Balancer and a
//! Listener), lets embedders inject sessions, and runs the stop sequence.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::io::{AsyncRead, AsyncWrite};

use crate::balancer::{BackendSnapshot, BalancerHandle};
use crate::config::{Config, Settings};
use crate::dialer::DialerHandle;
use crate::error::{InjectError, StartError};
use crate::listener::{self, Listener};
use crate::rt;
use crate::session::{SessionReport, SessionStats, Sessions};
use crate::shutdown::{self, Drain, Trigger};

/// How long force-closed sessions get to finish dropping their sockets.
const FORCE_GRACE: Duration = Duration::from_secs(5);

/// A running relay. Dropping it stops the listeners and closes live sessions at once, without
/// waiting for them; [`Relay::shutdown`] drains them first.
pub struct Relay {
    routes: Vec<RouteEntry>,
    stop: Trigger,
    force: Trigger,
    drain: Drain,
    drain_timeout: Duration,
    tasks: Vec<rt::JoinHandle<()>>,
    stats: Arc<SessionStats>,
}

struct RouteEntry {
    listen: SocketAddr,
    sessions: Sessions,
}

/// One route as its balancer sees it.
#[derive(Debug, Clone)]
pub struct RouteSnapshot {
    pub name: String,
    pub listen: SocketAddr,
    pub backends: Vec<BackendSnapshot>,
}

/// How the stop went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Sessions live when the stop began that ended by themselves before the drain deadline.
    pub drained: u64,
    /// Sessions still live at the deadline, closed by the relay.
    pub forced: u64,
}

impl Relay {
    /// Validates `config`, binds every listener, then starts the actors.
    pub fn start(config: &Config) -> Result<Relay, StartError> {
        Relay::with_settings(config.validate()?)
    }

    /// Binds every listener (nothing starts unless all bind), then starts the actors.
    pub fn with_settings(settings: Settings) -> Result<Relay, StartError> {
        let sockets = (settings.routes.iter())
            .map(listener::bind)
            .collect::<Result<Vec<_>, _>>()?;
        let mailbox = settings.mailbox.get();
        let (dialer, dialer_task) = DialerHandle::spawn(&settings.egress, mailbox);
        let egress_names: Arc<[String]> = settings.egress.iter().map(|e| e.name.clone()).collect();
        let (stop, stop_signal) = shutdown::signal();
        let (force, force_signal) = shutdown::signal();
        let drain = Drain::new();
        let stats = Arc::new(SessionStats::default());
        let mut tasks = vec![dialer_task];
        let mut routes = Vec::new();
        for (route, socket) in settings.routes.into_iter().zip(sockets) {
            let (balancer, balancer_task) = BalancerHandle::spawn(&route.backends, mailbox);
            tasks.push(balancer_task);
            let sessions = Sessions {
                route_name: route.name.as_str().into(),
                route: Arc::new(route),
                egress_names: egress_names.clone(),
                balancer,
                dialer: dialer.clone(),
                force: force_signal.clone(),
                stats: stats.clone(),
            };
            let listener = Listener { socket, sessions };
            let listen = listener.local_addr().expect("a bound socket has a local address");
            log::info!(route = &*listener.sessions.route_name, addr:% = listen; "listening");
            routes.push(RouteEntry {
                listen,
                sessions: listener.sessions.clone(),
            });
            let guard = drain.guard().expect("a new drain hands out guards");
            tasks.push(rt::spawn(listener.run(stop_signal.clone(), guard)));
        }
        Ok(Relay {
            routes,
            stop,
            force,
            drain,
            drain_timeout: settings.drain_timeout,
            tasks,
            stats,
        })
    }

    fn route(&self, name: &str) -> Option<&RouteEntry> {
        self.routes.iter().find(|r| &*r.sessions.route_name == name)
    }

    /// The address a route listens on (useful with port 0).
    pub fn local_addr(&self, route: &str) -> Option<SocketAddr> {
        self.route(route).map(|r| r.listen)
    }

    /// Runs a session on `stream` exactly as if the route's listener had accepted it from
    /// `peer`. `stream`'s `poll_close` must end its write direction (as [`crate::Conn`]'s does),
    /// or a relayed FIN is never seen by the client.
    pub fn inject<S>(&self, route: &str, stream: S, peer: SocketAddr) -> Result<rt::JoinHandle<SessionReport>, InjectError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let entry = self.route(route).ok_or_else(|| InjectError::UnknownRoute(route.to_string()))?;
        let guard = self.drain.guard().ok_or(InjectError::ShuttingDown)?;
        Ok(entry.sessions.open(stream, peer, guard))
    }

    /// Relay-wide session counters.
    pub fn stats(&self) -> &SessionStats {
        &self.stats
    }

    /// Every route's backends as its balancer sees them now.
    pub async fn snapshot(&self) -> Vec<RouteSnapshot> {
        let mut out = Vec::with_capacity(self.routes.len());
        for r in &self.routes {
            out.push(RouteSnapshot {
                name: r.sessions.route_name.to_string(),
                listen: r.listen,
                backends: r.sessions.balancer.snapshot().await.unwrap_or_default(),
            });
        }
        out
    }

    /// Stops accepting, waits up to the drain timeout for live sessions, closes the rest, and
    /// returns once every actor has ended.
    pub async fn shutdown(self) -> ShutdownReport {
        let Relay {
            routes,
            stop,
            force,
            mut drain,
            drain_timeout,
            tasks,
            stats,
        } = self;
        let live = stats.active();
        log::info!(sessions = live, drain_ms = drain_timeout.as_millis() as u64; "stopping");
        stop.fire();
        // The actors end once the last handle is gone: ours go now, the sessions' as they end.
        drop(routes);
        if !drain.wait(drain_timeout).await {
            log::warn!(sessions = stats.active(); "drain deadline passed, closing live sessions");
            force.fire();
            drain.wait(FORCE_GRACE).await;
        }
        for task in tasks {
            task.await;
        }
        let forced = stats.forced();
        let report = ShutdownReport {
            drained: live.saturating_sub(forced),
            forced,
        };
        log::info!(drained = report.drained, forced = report.forced; "stopped");
        report
    }
}

/// Starts a relay on `settings`, runs it until `stop` completes, then shuts it down.
/// The daemon passes its signal handler; tests and embedders pass any future.
pub async fn run(settings: Settings, stop: impl Future<Output = ()>) -> Result<ShutdownReport, StartError> {
    let relay = Relay::with_settings(settings)?;
    stop.await;
    Ok(relay.shutdown().await)
}
