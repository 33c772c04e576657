//! What a route's sessions share: its settings, the handles of the actors they talk to, its
//! counters and caps. One [`RouteContext`] per route and reload; every session of the route
//! holds a clone (one reference count), and a reload's new context serves only new sessions.

use std::net::SocketAddr;
use std::sync::Arc;

use crate::balancer::{BalancerHandle, Pick};
use crate::config::Route;
use crate::dialer::DialerHandle;
use crate::limits::{Gate, Pass};
use crate::shutdown::Signal;
use crate::stats::Stats;

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
    /// The route's own `max_connections`,
    pub route_gate: Option<Arc<Gate>>,
    /// and the relay's.
    pub relay_gate: Option<Arc<Gate>>,
    /// The route's counts of each client's connections, against its `per_client` limits.
    pub per_client: Arc<crate::limits::PerClient>,
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
    /// True when a connection from `peer` may be taken: the route's allow/deny lists judge
    /// it, except behind a PROXY header, where only the proxy is judged here (it must be
    /// `trusted`) and the lists judge the client its header names ([`Self::admits_client`]).
    /// A refusal is counted, and logged at most once a second for the route.
    pub fn admits(&self, peer: SocketAddr) -> bool {
        let admitted = match &self.route.accept_proxy {
            Some(accept) => accept.trusted.admits(peer.ip()),
            None => self.route.clients.admits(peer.ip()),
        };
        if admitted {
            return true;
        }
        self.metrics.client_refused(&self.route_name);
        if let Some(held) = self.refusals.admit() {
            log::warn!(route = &*self.route_name, client:% = peer, held_back = held;
                "client refused by the route's allow/deny lists");
        }
        false
    }

    /// True when the route's allow/deny lists let `client` in, once a session knows who it is:
    /// the client a PROXY header named, or one another route (`sni`) hands on. A refusal is
    /// counted; the session's own line (`end=client_refused`) says it.
    pub fn admits_client(&self, client: SocketAddr) -> bool {
        let admitted = self.route.clients.admits(client.ip());
        if !admitted {
            self.metrics.client_refused(&self.route_name);
        }
        admitted
    }

    /// The route's session caps, its own then the relay's.
    pub fn gates(&self) -> impl Iterator<Item = &Arc<Gate>> {
        self.route_gate.iter().chain(&self.relay_gate)
    }

    /// Passes through the route's and the relay's session caps, waiting up to the route's
    /// `queue_timeout` for room; `None` when there was none.
    pub async fn passes(&self) -> Option<Vec<Pass>> {
        self.enter(self.gates()).await
    }

    /// A pass through the route's own cap only: for a session another route accepted (and
    /// counted against the relay's cap) and hands on to this one.
    pub async fn route_passes(&self) -> Option<Vec<Pass>> {
        self.enter(self.route_gate.iter()).await
    }

    async fn enter(&self, gates: impl Iterator<Item = &Arc<Gate>>) -> Option<Vec<Pass>> {
        let mut passes = Vec::with_capacity(2);
        for gate in gates {
            passes.push(gate.enter(self.route.queue_timeout).await?);
        }
        Some(passes)
    }

    /// Counts a dropped datagram of this route in the relay's counters and its metrics alike,
    /// the one place a drop is counted; returns the relay's total of its kind.
    pub fn udp_dropped(&self, why: crate::stats::UdpDrop) -> u64 {
        self.metrics.udp_dropped(&self.route_name, why.word());
        self.stats.udp_drop(why)
    }

    /// True while the relay has room for one more session.
    pub fn has_room(&self) -> bool {
        self.stats.active() < self.budget.cap()
    }

    pub fn new(context: RouteParts) -> Self {
        RouteContext(Arc::new(context))
    }

    /// The name of the picked egress. A session that began before a reload added egresses
    /// can be offered one its context does not list: it is named by its number then.
    pub fn egress_name(&self, pick: &Pick) -> Arc<str> {
        self.egress_named(pick.egress)
    }

    pub fn egress_named(&self, egress: crate::config::EgressId) -> Arc<str> {
        match self.egress_names.get(egress.0) {
            Some(name) => name.clone(),
            None => format!("#{}", egress.0).into(),
        }
    }
}

impl std::ops::Deref for RouteContext {
    type Target = RouteParts;

    fn deref(&self) -> &RouteParts {
        &self.0
    }
}
