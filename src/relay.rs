//! The relay: starts the actors in dependency order (Dialer, then per route a Balancer and a
//! Listener), lets embedders inject sessions, and runs the stop sequence.

use std::future::Future;
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::Duration;

use std::pin::pin;

use futures::future::{self, Either};
use futures::io::{AsyncRead, AsyncWrite};

pub use crate::balancer::RouteSnapshot;
use crate::balancer::{BalancerHandle, resolve_loop};
use crate::checker;
use crate::config::{BackendAddr, Config, Egress, EgressId, Protocol, Route, Settings};
use crate::dialer::DialerHandle;
use crate::egress;
use crate::error::{InjectError, StartError};
use crate::limits;
use crate::listener::{self, Bound, Listener, UdpListener};
use crate::metrics::Metrics;
use crate::rt::{self, Async};
use crate::session::{RouteContext, RouteParts, SessionReport, SniTargets};
use crate::shutdown::{self, Drain, Signal, Trigger};
use crate::stats::Stats;
use crate::status::{Pages, RouteView, Status};

/// What every route's actors share.
struct Common {
    dialer: DialerHandle,
    egress_names: Arc<[Arc<str>]>,
    stop: Signal,
    force: Signal,
    splice: bool,
    budget: Arc<limits::Budget>,
    metrics: Arc<Metrics>,
    /// The relay-wide `max_connections`.
    gate: Option<Arc<limits::Gate>>,
    status_allow: crate::acl::ClientAcl,
}

/// How long force-closed sessions get to finish dropping their sockets.
const FORCE_GRACE: Duration = Duration::from_secs(5);

/// A running relay. Dropping it stops the listeners and closes live sessions at once, without
/// waiting for them; [`Relay::shutdown`] drains them first.
pub struct Relay {
    /// Taken last, when everything on it has ended (and dropped with the relay).
    runtime: Option<rt::Runtime>,
    routes: Vec<RouteEntry>,
    stop: Trigger,
    force: Trigger,
    drain: Drain,
    drain_timeout: Duration,
    tasks: Vec<rt::JoinHandle<()>>,
    stats: Arc<Stats>,
    status: Option<SocketAddr>,
}

struct RouteEntry {
    listen: SocketAddr,
    sessions: RouteContext,
}

impl RouteEntry {
    /// What the status page and snapshots show of the route.
    fn view(&self) -> RouteView {
        RouteView {
            name: self.sessions.route_name.clone(),
            listen: self.listen,
            balancer: self.sessions.balancer.clone(),
        }
    }
}

/// How the stop went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShutdownReport {
    /// RouteContext live when the stop began that ended by themselves before the drain deadline.
    pub drained: u64,
    /// RouteContext still live at the deadline, closed by the relay.
    pub forced: u64,
}

impl Relay {
    /// Validates `config`, binds every listener, then starts the actors.
    pub fn start(config: &Config) -> Result<Relay, StartError> {
        Relay::with_settings(config.validate()?)
    }

    /// Binds every listener (nothing starts unless all bind), then starts the actors.
    pub fn with_settings(settings: Settings) -> Result<Relay, StartError> {
        // The relay's own runtime, sized by its `workers`: everything it starts runs there.
        let runtime = rt::Runtime::new(settings.workers).map_err(StartError::Runtime)?;
        let relay = runtime.enter(|| Relay::start_on(settings));
        relay.map(|mut relay| {
            relay.runtime = Some(runtime);
            relay
        })
    }

    fn start_on(settings: Settings) -> Result<Relay, StartError> {
        // Listeners are registered with the reactor here, on the runtime entered.
        let sockets = (settings.routes.iter())
            .map(listener::bind)
            .collect::<Result<Vec<_>, _>>()?;
        let status_socket = (settings.status)
            .map(|addr| {
                let bound = listener::bind_tcp(addr, 64, None);
                bound.map_err(|source| StartError::Listen {
                    what: "status page".into(),
                    addr,
                    source,
                })
            })
            .transpose()?;
        let (stop, stop_signal) = shutdown::signal();
        let (force, force_signal) = shutdown::signal();
        let mailbox = settings.mailbox.get();
        let egress_names: Arc<[Arc<str>]> = settings.egress.iter().map(|e| e.name.as_str().into()).collect();
        let stats = Arc::<Stats>::default();
        // Balancers first: the Dialer tells them when an egress goes down or comes back.
        let balancers: Vec<_> = (settings.routes.iter())
            .map(|route| BalancerHandle::spawn(route, egress_names.clone(), stats.clone(), mailbox))
            .collect();
        let (dialer, dialer_task, news) = DialerHandle::spawn(&settings.egress, mailbox);
        // Every balancer hears the Dialer's word on each egress.
        let watchers: Vec<BalancerHandle> = balancers.iter().map(|(handle, _)| handle.clone()).collect();
        let fan_out = rt::spawn(async move {
            while let Ok(word) = news.recv_async().await {
                for balancer in &watchers {
                    let _ = balancer.egress_news(word.egress, word.down.clone(), word.seq).await;
                }
            }
        });
        // The kernel's word on every egress that names a device or a source.
        let judged: Vec<(EgressId, Egress)> = (settings.egress.iter().cloned().enumerate())
            .filter(|(_, e)| e.device.is_some() || e.source.is_some())
            .map(|(i, e)| (EgressId(i), e))
            .collect();
        let watcher =
            (!judged.is_empty()).then(|| rt::spawn(egress::watch(judged, dialer.clone(), stop_signal.clone())));
        // The descriptors there are decide how many sessions can be served at once.
        let budget = Arc::new(limits::Budget::new());
        let (soft, hard) = limits::nofile().unwrap_or_default();
        log::info!(nofile = soft, nofile_hard = hard, max_sessions = budget.cap(); "descriptor budget");
        let common = Common {
            dialer,
            egress_names,
            stop: stop_signal,
            force: force_signal,
            splice: settings.splice,
            budget,
            metrics: Arc::new(Metrics::new()),
            gate: settings.max_connections.map(|n| limits::Gate::new(n.get() as u64)),
            status_allow: settings.status_allow.clone(),
        };
        let mut relay = Relay {
            runtime: None,
            routes: Vec::new(),
            stop,
            force,
            drain: Drain::new(),
            drain_timeout: settings.drain_timeout,
            tasks: [dialer_task, fan_out].into_iter().chain(watcher).collect(),
            stats,
            status: None,
        };
        for ((route, socket), (balancer, balancer_task)) in settings.routes.into_iter().zip(sockets).zip(balancers) {
            relay.tasks.push(balancer_task);
            relay.start_route(route, socket, balancer, &common);
        }
        relay.link_sni_routes();
        if let Some(socket) = status_socket {
            relay.start_status(socket, &common);
        }
        Ok(relay)
    }

    /// Gives every route with `sni` the contexts of the routes its names pick (validation made
    /// sure they exist).
    fn link_sni_routes(&self) {
        let by_name = |name: &str| self.route(name).map(|r| r.sessions.clone());
        for entry in &self.routes {
            let Some(sni) = &entry.sessions.route.sni else { continue };
            let rules = (sni.rules.iter())
                .filter_map(|(pattern, name)| Some((pattern.clone(), by_name(name)?)))
                .collect();
            let default = sni.default.as_deref().and_then(by_name);
            let _ = entry.sessions.sni_targets.set(SniTargets { rules, default });
        }
    }

    /// The Listener of `route` (whose Balancer runs already), and its checker and resolver.
    fn start_route(&mut self, route: Route, socket: Bound, balancer: BalancerHandle, common: &Common) {
        let gates = (route
            .max_connections
            .map(|n| limits::Gate::new(n.get() as u64))
            .into_iter())
        .chain(common.gate.clone())
        .collect();
        self.start_helpers(&route, &balancer, common);
        let sessions = RouteContext::new(RouteParts {
            route_name: route.name.as_str().into(),
            route: Arc::new(route),
            egress_names: common.egress_names.clone(),
            balancer,
            dialer: common.dialer.clone(),
            stop: common.stop.clone(),
            force: common.force.clone(),
            stats: self.stats.clone(),
            splice: common.splice,
            budget: common.budget.clone(),
            metrics: common.metrics.clone(),
            gates,
            sni_targets: std::sync::OnceLock::new(),
            refusals: Default::default(),
            dial_failures: Default::default(),
        });
        let guard = self.drain.guard().expect("a new drain hands out guards");
        let stop = common.stop.clone();
        let (listen, task) = match socket {
            Bound::Tcp(socket) => {
                let listener = Listener {
                    socket,
                    sessions: sessions.clone(),
                };
                (listener.local_addr(), rt::spawn(listener.run(stop, guard)))
            }
            Bound::Udp(endpoint) => {
                let listener = UdpListener {
                    endpoint: Arc::new(endpoint),
                    sessions: sessions.clone(),
                };
                (listener.local_addr(), rt::spawn(listener.run(stop, guard)))
            }
        };
        let listen = listen.expect("a bound socket has a local address");
        log::info!(route = &*sessions.route_name, protocol:? = sessions.route.protocol, addr:% = listen; "listening");
        self.routes.push(RouteEntry { listen, sessions });
        self.tasks.push(task);
    }

    /// Health checks, when the route has them; re-resolution, when it has name backends.
    fn start_helpers(&mut self, route: &Route, balancer: &BalancerHandle, common: &Common) {
        let name: Arc<str> = route.name.as_str().into();
        if let Some(check) = route.health.check.clone() {
            let checks = checker::run(
                name.clone(),
                check,
                balancer.clone(),
                common.dialer.clone(),
                common.stop.clone(),
            );
            self.tasks.push(rt::spawn(checks));
        }
        if route
            .backends
            .iter()
            .any(|b| matches!(b.addr, BackendAddr::Name { .. }))
        {
            let sources = route.backends.clone();
            let resolver = resolve_loop(
                name,
                sources,
                route.resolve_interval,
                balancer.clone(),
                common.stop.clone(),
            );
            self.tasks.push(rt::spawn(resolver));
        }
    }

    fn start_status(&mut self, socket: Async<TcpListener>, common: &Common) {
        let status = Status {
            socket,
            pages: Arc::new(Pages {
                allow: common.status_allow.clone(),
                routes: self.routes.iter().map(|r| r.view()).collect(),
                stats: self.stats.clone(),
                metrics: common.metrics.clone(),
            }),
        };
        let addr = status
            .socket
            .get_ref()
            .local_addr()
            .expect("a bound socket has a local address");
        log::info!(addr:% = addr; "status page listening");
        self.status = Some(addr);
        self.tasks.push(rt::spawn(status.run(common.stop.clone())));
    }

    fn route(&self, name: &str) -> Option<&RouteEntry> {
        self.routes.iter().find(|r| &*r.sessions.route_name == name)
    }

    /// The address a route listens on (useful with port 0).
    pub fn local_addr(&self, route: &str) -> Option<SocketAddr> {
        self.route(route).map(|r| r.listen)
    }

    /// The address the status page listens on, if the config has one (useful with port 0).
    pub fn status_addr(&self) -> Option<SocketAddr> {
        self.status
    }

    /// Runs a session on `stream` exactly as if the route's listener had accepted it from
    /// `peer`. async-std's `TcpStream` and `UnixStream` work as they are; any other stream's
    /// `poll_close` must end its write direction (as [`crate::Conn`]'s does), or a relayed FIN
    /// is never seen by the client.
    pub fn inject<S>(
        &self,
        route: &str,
        stream: S,
        peer: SocketAddr,
    ) -> Result<rt::JoinHandle<SessionReport>, InjectError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + std::any::Any,
    {
        let entry = self
            .route(route)
            .ok_or_else(|| InjectError::UnknownRoute(route.to_string()))?;
        if entry.sessions.route.protocol == Protocol::Udp {
            return Err(InjectError::NotAStreamRoute(route.to_string()));
        }
        let guard = self.drain.guard().ok_or(InjectError::ShuttingDown)?;
        Ok(self.enter(|| entry.sessions.open(rt::Injected(stream), peer, guard)))
    }

    fn enter<T>(&self, f: impl FnOnce() -> T) -> T {
        match &self.runtime {
            Some(runtime) => runtime.enter(f),
            None => f(),
        }
    }

    /// Worker threads this relay runs on (`workers`, or one per core).
    pub fn workers(&self) -> usize {
        self.runtime.as_ref().map_or(0, rt::Runtime::workers)
    }

    /// Relay-wide counters: sessions, UDP drops; [`Stats::until`] waits for a condition.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Every route's backends as its balancer sees them now.
    pub async fn snapshot(&self) -> Vec<RouteSnapshot> {
        let mut out = Vec::with_capacity(self.routes.len());
        for r in &self.routes {
            out.push(r.view().snapshot().await);
        }
        out
    }

    /// Stops accepting, waits up to the drain timeout for live sessions, closes the rest, and
    /// returns once every actor has ended.
    pub async fn shutdown(self) -> ShutdownReport {
        self.shutdown_or(std::future::pending()).await
    }

    /// As [`Relay::shutdown`], but the drain ends early, closing live sessions at once, when
    /// `now` completes first (the daemon passes its second SIGTERM or SIGINT).
    pub async fn shutdown_or(self, now: impl Future<Output = ()>) -> ShutdownReport {
        let Relay {
            runtime,
            routes,
            stop,
            force,
            mut drain,
            drain_timeout,
            tasks,
            stats,
            status: _,
        } = self;
        let live = stats.active();
        log::info!(sessions = live, drain_ms = drain_timeout.as_millis() as u64; "stopping");
        stop.fire();
        // The actors end once the last handle is gone: ours go now, the sessions' as they end.
        drop(routes);
        let drained = match future::select(pin!(drain.wait(drain_timeout)), pin!(now)).await {
            Either::Left((drained, _)) => drained,
            Either::Right(_) => {
                log::warn!(sessions = stats.active(); "asked again to stop: closing live sessions now");
                false
            }
        };
        if !drained {
            if stats.active() > 0 {
                log::warn!(sessions = stats.active(); "closing live sessions");
            }
            force.fire();
            drain.wait(FORCE_GRACE).await;
        }
        for task in tasks {
            if rt::timeout(FORCE_GRACE, task).await.is_none() {
                log::warn!("an actor did not end in time; stopping without it");
            }
        }
        let forced = stats.forced();
        let report = ShutdownReport {
            drained: live.saturating_sub(forced),
            forced,
        };
        log::info!(drained = report.drained, forced = report.forced; "stopped");
        // Every actor has ended: the workers can go.
        drop(runtime);
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
