//! The relay: starts the actors in dependency order (Dialer, then per route a Balancer and a
//! Listener), lets embedders inject sessions, and runs the stop sequence.

mod mailbox;
mod reload;

use std::future::Future;
use std::net::SocketAddr;
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
use crate::rt;
use crate::session::{RouteContext, RouteParts, SessionReport, SniTargets};
use crate::shutdown::{self, Drain, Signal, Trigger};
use crate::stats::Stats;
use crate::status::{Pages, RouteView, Status, StatusSocket};
use mailbox::{Slot, egress_news};

/// What every route's actors share; a reload may change the egress names, `splice`, the gate
/// and `status_allow`.
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
    stats: Arc<Stats>,
    mailbox: usize,
}

/// How long force-closed sessions get to finish dropping their sockets.
const FORCE_GRACE: Duration = Duration::from_secs(5);

/// A running relay. Dropping it stops the listeners and closes live sessions at once, without
/// waiting for them; [`Relay::shutdown`] drains them first, and [`Relay::reload`] changes
/// what it runs without closing anything that is live.
pub struct Relay {
    /// Taken last, when everything on it has ended (and dropped with the relay).
    runtime: Option<rt::Runtime>,
    routes: Vec<RouteEntry>,
    stop: Trigger,
    force: Trigger,
    drain: Drain,
    drain_timeout: Duration,
    tasks: Vec<rt::JoinHandle<()>>,
    status: Option<SocketAddr>,
    common: Common,
    /// What the relay runs, as validated: a reload's changes are counted from it.
    settings: Settings,
    /// Every egress the relay has had, by an id that stays the same across reloads.
    egresses: Vec<Egress>,
    /// The balancers the Dialer's egress news goes to.
    balancers: Slot<Vec<BalancerHandle>>,
    /// Stops the kernel watcher (a reload that changes what it judges starts another), and
    /// what it judges.
    watcher: Option<(Trigger, Vec<(EgressId, Egress)>)>,
    /// To the status listener and the admin socket: a reload's pages.
    pages: Slot<Arc<Pages>>,
    /// The listening sockets of TCP routes a reload removed, paused (bound, refusing) for a
    /// grace time, so that a reload soon after that listens there again takes one over
    /// instead of racing the old listener for the address.
    released: Vec<(Route, std::sync::Weak<listener::Held>)>,
}

/// A route as the relay keeps it across reloads: by its name.
struct RouteEntry {
    listen: SocketAddr,
    /// The context new sessions get (live ones keep theirs).
    context: RouteContext,
    /// To the route's listener: a reload's context; dropped, the listener stops.
    retarget: Slot<RouteContext>,
    /// The route's stop (its listener's and UDP flows' end) and force (its sessions' end)
    /// signals, which every context of the route shares.
    stop: Trigger,
    force: Trigger,
    /// Ends the checker and resolver of the route's current settings.
    helpers: Trigger,
    /// The route's own `max_connections`, kept across reloads,
    gate: Option<Arc<limits::Gate>>,
    /// and its table of per-client counts.
    per_client: Arc<limits::PerClient>,
    /// Its listening socket, for the route that listens on its address after a reload.
    held: Option<listener::Held>,
}

impl RouteEntry {
    /// What the status page and snapshots show of the route.
    fn view(&self) -> RouteView {
        RouteView {
            name: self.context.route_name.clone(),
            listen: self.listen,
            balancer: self.context.balancer.clone(),
        }
    }
}

/// How a route is to be served once its context is ready.
enum Serve {
    /// By its listener, which is handed the new context.
    Hand,
    /// By a new listener on this socket (a new route, or a new address).
    Listen(Bound),
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
        let status_socket = (settings.status.as_ref())
            .map(|addr| {
                StatusSocket::bind(addr).map_err(|source| StartError::Listen {
                    what: "status page".into(),
                    addr: addr.to_string(),
                    source,
                })
            })
            .transpose()?;
        let admin_socket = (settings.admin.as_ref())
            .map(|path| {
                crate::net::bind_unix(path, 0o600).map_err(|source| StartError::Listen {
                    what: "admin socket".into(),
                    addr: path.display().to_string(),
                    source,
                })
            })
            .transpose()?;
        let (stop, stop_signal) = shutdown::signal();
        let (force, force_signal) = shutdown::signal();
        let mailbox = settings.mailbox.get();
        let (dialer, dialer_shards, egress_changes) = DialerHandle::spawn(&settings.egress, mailbox);
        let mut balancers = Slot::new();
        let fan_out = rt::spawn(egress_news(egress_changes, balancers.receiver()));
        // The descriptors there are decide how many sessions can be served at once.
        let budget = Arc::new(limits::Budget::new());
        let (soft, hard) = limits::nofile().unwrap_or_default();
        log::info!(nofile = soft, nofile_hard = hard, max_sessions = budget.cap(); "descriptor budget");
        let common = Common {
            dialer,
            egress_names: settings.egress.iter().map(|e| e.name.as_str().into()).collect(),
            stop: stop_signal,
            force: force_signal,
            splice: settings.splice,
            budget,
            metrics: Arc::new(Metrics::new()),
            gate: settings.max_connections.map(|n| limits::Gate::new(n.get() as u64)),
            status_allow: settings.status_allow.clone(),
            stats: Arc::default(),
            mailbox,
        };
        let mut relay = Relay {
            runtime: None,
            routes: Vec::new(),
            stop,
            force,
            drain: Drain::new(),
            drain_timeout: settings.drain_timeout,
            tasks: dialer_shards.into_iter().chain([fan_out]).collect(),
            status: None,
            common,
            egresses: settings.egress.clone(),
            settings: settings.clone(),
            balancers,
            watcher: None,
            pages: Slot::new(),
            released: Vec::new(),
        };
        relay.watch_egresses(&settings.routes);
        let mut serve = Vec::new();
        for (route, socket) in settings.routes.into_iter().zip(sockets) {
            serve.push((relay.routes.len(), Serve::Listen(socket)));
            relay.start_route(route);
        }
        relay.link_sni_routes(|_| true);
        relay.serve(serve);
        relay.balancers.put(relay.balancer_handles());
        if let Some(socket) = status_socket {
            relay.start_status(socket);
        }
        if let Some(socket) = admin_socket {
            relay.start_admin(socket);
        }
        Ok(relay)
    }

    /// The kernel's word on every egress that `routes` leave by and that names a device or a
    /// source (the others have nothing to judge), until the relay stops or a reload changes
    /// the egresses.
    fn watch_egresses(&mut self, routes: &[Route]) {
        let used = |id: EgressId| {
            (routes.iter()).any(|r| r.egress.contains(&id) || r.backends.iter().any(|b| b.egress.contains(&id)))
        };
        let judged: Vec<(EgressId, Egress)> = (self.egresses.iter().cloned().enumerate())
            .map(|(i, e)| (EgressId(i), e))
            .filter(|(id, e)| (e.device.is_some() || e.source.is_some()) && used(*id))
            .collect();
        if self.watcher.as_ref().is_some_and(|(_, watched)| *watched == judged) {
            return;
        }
        self.watcher = None;
        if judged.is_empty() {
            return;
        }
        let (trigger, stop) = shutdown::signal();
        self.watcher = Some((trigger, judged.clone()));
        let watch = egress::watch(judged, self.common.dialer.clone(), stop);
        self.tasks.push(rt::spawn(watch));
    }

    fn balancer_handles(&self) -> Vec<BalancerHandle> {
        self.routes.iter().map(|r| r.context.balancer.clone()).collect()
    }

    /// Gives every route with `sni` that `fresh` says has a new context the contexts of the
    /// routes its names pick (validation made sure they exist).
    fn link_sni_routes(&self, fresh: impl Fn(&str) -> bool) {
        let by_name = |name: &str| self.route(name).map(|r| r.context.clone());
        for entry in self.routes.iter().filter(|r| fresh(&r.context.route_name)) {
            let Some(sni) = &entry.context.route.sni else { continue };
            let rules = (sni.rules.iter())
                .filter_map(|(pattern, name)| Some((pattern.clone(), by_name(name)?)))
                .collect();
            let default = sni.default.as_deref().and_then(by_name);
            let _ = entry.context.sni_targets.set(SniTargets { rules, default });
        }
    }

    /// A new route: its Balancer, its checker and resolver, and its context; the caller then
    /// has it served ([`Relay::serve`]).
    fn start_route(&mut self, route: Route) {
        let (balancer, shards) = BalancerHandle::spawn(
            &route,
            self.common.egress_names.clone(),
            self.common.stats.clone(),
            self.common.mailbox,
        );
        self.tasks.extend(shards);
        let (stop, stop_signal) = shutdown::signal();
        let (force, force_signal) = shutdown::signal();
        let gate = route.max_connections.map(|n| limits::Gate::new(n.get() as u64));
        let per_client = limits::PerClient::new(route.per_client);
        let helpers = self.start_helpers(&route, &balancer);
        let listen = route.listen;
        let caps = (gate.clone(), per_client.clone());
        let context = self.context(route, balancer, (stop_signal, force_signal), caps);
        self.routes.push(RouteEntry {
            listen,
            context,
            retarget: Slot::new(),
            stop,
            force,
            helpers,
            gate,
            per_client,
            held: None,
        });
    }

    /// A context for the sessions of `route`, on the relay's current shared parts.
    fn context(
        &self,
        route: Route,
        balancer: BalancerHandle,
        (stop, force): (Signal, Signal),
        (gate, per_client): (Option<Arc<limits::Gate>>, Arc<limits::PerClient>),
    ) -> RouteContext {
        let common = &self.common;
        RouteContext::new(RouteParts {
            route_name: route.name.as_str().into(),
            route: Arc::new(route),
            egress_names: common.egress_names.clone(),
            balancer,
            dialer: common.dialer.clone(),
            stop,
            force,
            stats: common.stats.clone(),
            splice: common.splice,
            budget: common.budget.clone(),
            metrics: common.metrics.clone(),
            route_gate: gate,
            relay_gate: common.gate.clone(),
            per_client,
            sni_targets: std::sync::OnceLock::new(),
            refusals: Default::default(),
            dial_failures: Default::default(),
        })
    }

    /// Has each route (by index) served with its current context, once every context is
    /// linked: by a listener on a new socket, or by the listener it has.
    fn serve(&mut self, serve: Vec<(usize, Serve)>) {
        for (i, how) in serve {
            match how {
                Serve::Hand => self.routes[i].retarget.put(self.routes[i].context.clone()),
                Serve::Listen(socket) => {
                    // A new slot; once it replaces the old one, the listeners on the old
                    // address stop.
                    let (context, mut retarget) = (self.routes[i].context.clone(), Slot::new());
                    // Without a second descriptor (none left) the route still serves; a reload
                    // that moves its address then binds anew.
                    self.routes[i].held = socket.hold().ok();
                    let listen = self.start_listener(socket, context, &mut retarget);
                    self.routes[i].retarget = retarget;
                    let name = &*self.routes[i].context.route_name;
                    log::info!(route = name, protocol:? = self.routes[i].context.route.protocol, addr:% = listen; "listening");
                    self.routes[i].listen = listen;
                }
            }
        }
    }

    /// Spawns the listeners that serve `socket` with `context` (then whatever `retarget`
    /// brings), one on each worker; a UDP route's share its `max_flows`. Returns the address
    /// they listen on.
    fn start_listener(
        &mut self,
        socket: Bound,
        context: RouteContext,
        retarget: &mut Slot<RouteContext>,
    ) -> SocketAddr {
        let guard = self
            .drain
            .guard()
            .expect("a relay that is not stopping hands out guards");
        let stop = self.common.stop.clone();
        let listen = match socket {
            Bound::Tcp(group) => {
                let listen = group[0].get_ref().local_addr();
                for (worker, socket) in group.into_iter().enumerate() {
                    let listener = Listener {
                        socket,
                        context: context.clone(),
                        retarget: retarget.receiver(),
                    };
                    // Its sessions run where it does (see RouteContext::accepted).
                    let task = rt::spawn_on(worker, listener.run(stop.clone(), guard.clone()));
                    self.tasks.push(task);
                }
                listen
            }
            Bound::Udp(group) => {
                let room = limits::Gate::new(context.route.max_flows.get() as u64);
                // A group has a socket for every worker, one at least, all on one address.
                let listen = group[0].local_addr();
                for (worker, endpoint) in group.into_iter().enumerate() {
                    let listener = UdpListener {
                        endpoint: Arc::new(endpoint),
                        context: context.clone(),
                        retarget: retarget.receiver(),
                        room: room.clone(),
                    };
                    // Its flows run where it does (see rt::spawn_here).
                    let task = rt::spawn_on(worker, listener.run(stop.clone(), guard.clone()));
                    self.tasks.push(task);
                }
                listen
            }
        };
        listen.expect("a bound socket has a local address")
    }

    /// Health checks, when the route has them; re-resolution, when it has name backends.
    /// Both run until the returned trigger goes (a reload, the route's removal, the stop).
    fn start_helpers(&mut self, route: &Route, balancer: &BalancerHandle) -> Trigger {
        let (trigger, stop) = shutdown::signal();
        let name: Arc<str> = route.name.as_str().into();
        if let Some(check) = route.health.check.clone() {
            let dialer = self.common.dialer.clone();
            let checks = checker::run(name.clone(), check, balancer.clone(), dialer, stop.clone());
            self.tasks.push(rt::spawn(checks));
        }
        if (route.backends.iter()).any(|b| matches!(b.addr, BackendAddr::Name { .. })) {
            let sources = route.backends.clone();
            let resolver = resolve_loop(name, sources, route.resolve_interval, balancer.clone(), stop);
            self.tasks.push(rt::spawn(resolver));
        }
        trigger
    }

    fn start_status(&mut self, socket: StatusSocket) {
        let status = Status {
            socket,
            pages: self.pages(),
            updates: self.pages.receiver(),
        };
        match status.socket.local_addr() {
            Some(addr) => log::info!(addr:% = addr; "status page listening"),
            None => {
                log::info!(addr:% = self.settings.status.as_ref().expect("a status address"); "status page listening")
            }
        }
        self.status = status.socket.local_addr();
        self.tasks.push(rt::spawn(status.run(self.common.stop.clone())));
    }

    fn start_admin(&mut self, socket: rt::Async<std::os::unix::net::UnixListener>) {
        let path = self.settings.admin.clone().expect("an admin path");
        log::info!(path:% = path.display(); "admin socket listening");
        let admin = crate::admin::Admin {
            socket,
            path,
            pages: self.pages(),
            updates: self.pages.receiver(),
            drained: Vec::new(),
        };
        self.tasks.push(rt::spawn(admin.run(self.common.stop.clone())));
    }

    fn pages(&self) -> Arc<Pages> {
        Arc::new(Pages {
            allow: self.common.status_allow.clone(),
            routes: self.routes.iter().map(|r| r.view()).collect(),
            stats: self.common.stats.clone(),
            metrics: self.common.metrics.clone(),
            config: self.settings.source.to_ron().into(),
            egresses: self.settings.egress.iter().map(|e| e.name.as_str().into()).collect(),
        })
    }

    fn route(&self, name: &str) -> Option<&RouteEntry> {
        self.routes.iter().find(|r| &*r.context.route_name == name)
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
        if entry.context.route.protocol == Protocol::Udp {
            return Err(InjectError::NotAStreamRoute(route.to_string()));
        }
        let guard = self.drain.guard().ok_or(InjectError::ShuttingDown)?;
        Ok(self.enter(|| entry.context.open(rt::Injected(stream), peer, guard)))
    }

    fn enter<T>(&self, f: impl FnOnce() -> T) -> T {
        match &self.runtime {
            Some(runtime) => runtime.enter(f),
            None => f(),
        }
    }

    /// The settings the relay runs, as last started or reloaded.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Worker threads this relay runs on (`workers`, or one per core).
    pub fn workers(&self) -> usize {
        self.runtime.as_ref().map_or(0, rt::Runtime::workers)
    }

    /// Relay-wide counters: sessions, UDP drops; [`Stats::until`] waits for a condition.
    pub fn stats(&self) -> &Stats {
        &self.common.stats
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
            common,
            watcher,
            pages,
            balancers,
            ..
        } = self;
        let stats = common.stats.clone();
        let live = stats.active();
        log::info!(sessions = live, drain_ms = drain_timeout.as_millis() as u64; "stopping");
        stop.fire();
        // The actors end once the last handle is gone: ours go now, the sessions' as they end.
        // Each route's listener, checker and resolver stop; its force waits for the deadline.
        let forces: Vec<Trigger> = routes.into_iter().map(|r| r.force).collect();
        drop((common, watcher, pages, balancers));
        let drained = match future::select(pin!(drain.wait(drain_timeout)), pin!(now)).await {
            Either::Left((drained, _)) => drained,
            Either::Right(_) => {
                log::warn!(sessions = stats.active(); "asked again to stop: closing live sessions now");
                false
            }
        };
        if !drained && stats.active() > 0 {
            log::warn!(sessions = stats.active(); "closing live sessions");
        }
        // Fired either way: what waits on the deadline (removed routes' drains) ends now.
        force.fire();
        drop(forces);
        if !drained {
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
