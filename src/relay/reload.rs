//! Reload: a running relay takes a new config's settings without closing anything live.
//!
//! A route is known by its name. One whose listen address (and transport and device) stays
//! keeps its listening socket, so no client meets a refused connection; its Balancer keeps the
//! health and counts of the backends that stay. New sessions get the new settings, live ones
//! run on with what they started with. A removed route stops accepting and its sessions drain
//! under the drain deadline. Egresses keep their ids by name: a redefined one applies to new
//! dials. Nothing changes unless every new listening socket could be bound.

use std::path::Path;

use super::{Relay, RouteEntry, Serve};
use crate::config::{self, Change, Config, EgressId, Protocol, Route, Settings};
use crate::error::StartError;
use crate::limits::Gate;
use crate::listener;
use crate::rt;

impl Relay {
    /// Applies `new` in place of the running settings and returns what changed (each change
    /// is logged, with a summary line). On an error (a listen address that cannot be bound)
    /// nothing changed. Changes only a restart applies (`workers`, `mailbox`, the status
    /// address) are listed and logged as such, and left as they run.
    pub async fn reload(&mut self, new: Settings) -> Result<Vec<Change>, StartError> {
        let applied = self.apply(new).await;
        self.common.metrics.reloaded(applied.is_ok());
        match &applied {
            Ok(changes) => {
                for change in changes {
                    match change.restart {
                        false => log::info!(change:% = change; "reload"),
                        true => log::warn!(change:% = change; "reload"),
                    }
                }
                let routes = self.routes.len();
                log::info!(changes = changes.len(), routes = routes; "config reloaded");
            }
            Err(e) => log::error!(err:% = e; "reload failed: the running config is unchanged"),
        }
        applied
    }

    /// Reads, validates and applies the config file at `path` (the daemon's SIGHUP). An
    /// invalid file changes nothing; every problem is logged.
    pub async fn reload_file(&mut self, path: &Path) -> Result<Vec<Change>, StartError> {
        match Config::load(path) {
            Ok(settings) => self.reload(settings).await,
            Err(e) => {
                self.common.metrics.reloaded(false);
                log::error!(err:% = e; "reload failed: the running config is unchanged");
                Err(e.into())
            }
        }
    }

    async fn apply(&mut self, new: Settings) -> Result<Vec<Change>, StartError> {
        let changes = config::diff(&self.settings, &new);
        if changes.is_empty() {
            return Ok(changes);
        }
        // Egress ids as the relay knows them: a name keeps its id, a new name takes the next.
        let mut egresses = self.egresses.clone();
        let ids: Vec<EgressId> = (new.egress.iter())
            .map(|e| match egresses.iter().position(|o| o.name == e.name) {
                Some(i) => {
                    egresses[i] = e.clone();
                    EgressId(i)
                }
                None => {
                    egresses.push(e.clone());
                    EgressId(egresses.len() - 1)
                }
            })
            .collect();
        let routes: Vec<Route> = new.routes.iter().cloned().map(|r| remap(r, &ids)).collect();
        // Every new socket first: one that cannot be bound fails the reload untouched. A
        // route on an address another route leaves (a rename, a move) takes that socket.
        let mut sockets = Vec::with_capacity(routes.len());
        for route in &routes {
            let kept = self
                .route(&route.name)
                .is_some_and(|e| same_socket(&e.context.route, route));
            let inherited = || {
                let leaves = |e: &&RouteEntry| {
                    let stays =
                        (routes.iter()).any(|r| r.name == e.context.route.name && same_socket(&e.context.route, r));
                    route.listen.port() != 0 && same_socket(&e.context.route, route) && !stays
                };
                let donor = self.routes.iter().find(leaves).and_then(|e| e.held.as_ref());
                let paused = || {
                    let (_, held) = (self.released.iter()).find(|(old, _)| same_socket(old, route))?;
                    held.upgrade()
                };
                match donor {
                    Some(held) => self.enter(|| held.bound(route).ok()),
                    None => self.enter(|| paused()?.bound(route).ok()),
                }
            };
            sockets.push(match kept {
                true => None,
                false => match inherited() {
                    Some(socket) => Some(socket),
                    None => Some(self.enter(|| listener::bind(route))?),
                },
            });
        }
        if egresses != self.egresses {
            self.egresses = egresses;
            self.common.egress_names = self.egresses.iter().map(|e| e.name.as_str().into()).collect();
            // Before any session of the new settings can ask for a new egress.
            let _ = self.common.dialer.reconfigure(self.egresses.clone()).await;
        }
        let shared_changed = self.share(&new);
        self.enter_mut(|relay| relay.watch_egresses(&routes));
        let mut old: Vec<RouteEntry> = std::mem::take(&mut self.routes);
        let (kept, removed): (Vec<_>, Vec<_>) =
            (old.drain(..)).partition(|e| routes.iter().any(|r| r.name == *e.context.route_name));
        for entry in removed {
            // A route that now listens on its address has its socket already (a rename, a
            // move): that one must not be paused.
            let old = &entry.context.route;
            let handed = old.listen.port() != 0 && routes.iter().any(|r| same_socket(old, r));
            self.enter_mut(|relay| relay.retire(entry, handed));
        }
        let mut kept: Vec<Option<RouteEntry>> = kept.into_iter().map(Some).collect();
        let (mut serve, mut fresh) = (Vec::new(), Vec::new());
        for (route, socket) in routes.into_iter().zip(sockets) {
            let at = self.routes.len();
            let entry = (kept.iter_mut()).find(|e| e.as_ref().is_some_and(|e| *e.context.route_name == *route.name));
            let Some(mut entry) = entry.and_then(Option::take) else {
                fresh.push(route.name.clone());
                self.enter_mut(|relay| relay.start_route(route));
                serve.push((at, Serve::Listen(socket.expect("a new route's socket is bound"))));
                continue;
            };
            let route_changed = *entry.context.route != route;
            if !route_changed && !shared_changed {
                self.routes.push(entry);
                continue;
            }
            if route_changed {
                let names = self.common.egress_names.clone();
                let _ = entry.context.balancer.reconfigure(route.clone(), names).await;
                entry.gate = gate(entry.gate.take(), route.max_connections.map(|n| n.get() as u64));
                entry.per_client.set_limits(route.per_client);
                // The old checker and resolver end as their trigger goes.
                entry.helpers = self.enter_mut(|relay| relay.start_helpers(&route, &entry.context.balancer));
            }
            fresh.push(route.name.clone());
            let signals = (entry.stop.signal(), entry.force.signal());
            let caps = (entry.gate.clone(), entry.per_client.clone());
            entry.context = self.context(route, entry.context.balancer.clone(), signals, caps);
            serve.push((at, socket.map_or(Serve::Hand, Serve::Listen)));
            self.routes.push(entry);
        }
        // A route that routes by name to a route with a new context needs one too.
        if !fresh.is_empty() {
            for at in 0..self.routes.len() {
                let entry = &self.routes[at];
                if entry.context.route.sni.is_none() || fresh.contains(&entry.context.route.name) {
                    continue;
                }
                let (route, balancer) = ((*entry.context.route).clone(), entry.context.balancer.clone());
                let signals = (entry.stop.signal(), entry.force.signal());
                let caps = (entry.gate.clone(), entry.per_client.clone());
                let context = self.context(route, balancer, signals, caps);
                fresh.push(context.route.name.clone());
                self.routes[at].context = context;
                serve.push((at, Serve::Hand));
            }
        }
        self.link_sni_routes(|name| fresh.iter().any(|f| f == name));
        self.enter_mut(|relay| relay.serve(serve));
        self.balancers.put(self.balancer_handles());
        self.settings = new;
        self.pages.put(self.pages());
        // Ended helpers and listeners need not be joined at the stop.
        self.tasks.retain(|task| !task.is_finished());
        Ok(changes)
    }

    /// Takes the relay-wide settings a reload can change; true when contexts must be made
    /// anew for them (`splice`, the relay's `max_connections` gate appearing or going).
    fn share(&mut self, new: &Settings) -> bool {
        self.drain_timeout = new.drain_timeout;
        self.common.status_allow = new.status_allow.clone();
        let had_gate = self.common.gate.is_some();
        self.common.gate = gate(self.common.gate.take(), new.max_connections.map(|n| n.get() as u64));
        let splice_changed = std::mem::replace(&mut self.common.splice, new.splice) != new.splice;
        splice_changed || had_gate != self.common.gate.is_some()
    }

    /// A removed route: its listener, checker and resolver stop now and its UDP flows wind
    /// down (the triggers dropped with the entry); its live sessions have the drain deadline.
    /// A TCP route's listening socket, unless `handed` to a route of the new config, is paused
    /// (it refuses new connections at once) and kept for [`RELEASE_GRACE`], for a route that
    /// a reload soon after puts on its address.
    fn retire(&mut self, entry: RouteEntry, handed: bool) {
        let RouteEntry {
            force, held, context, ..
        } = entry;
        let (relay_force, deadline) = (self.common.force.clone(), self.drain_timeout);
        self.tasks.push(rt::spawn(async move {
            relay_force.unless(rt::sleep(deadline)).await;
            drop(force);
        }));
        self.released.retain(|(_, held)| held.strong_count() > 0);
        // (A route on port 0 has no address another could ask for again.)
        let keep = !handed && context.route.listen.port() != 0;
        if let Some(held) = held.filter(|h| keep && matches!(h, listener::Held::Tcp(_))) {
            if let Err(e) = held.pause() {
                log::debug!(route = &*context.route_name, err:% = e; "a removed route's socket could not be paused");
                return;
            }
            let held = std::sync::Arc::new(held);
            self.released
                .push(((*context.route).clone(), std::sync::Arc::downgrade(&held)));
            let relay_force = self.common.force.clone();
            rt::detach(async move {
                relay_force.unless(rt::sleep(RELEASE_GRACE)).await;
                drop(held);
            });
        }
    }

    fn enter_mut<T>(&mut self, f: impl FnOnce(&mut Self) -> T) -> T {
        let runtime = self.runtime.take();
        let out = match &runtime {
            Some(runtime) => runtime.enter(|| f(self)),
            None => f(self),
        };
        self.runtime = runtime;
        out
    }
}

/// How long a removed route's paused socket is kept for a route that listens there again.
const RELEASE_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// A route's gate after a reload: the same one with its new max (live passes stay valid), a
/// new one, or none.
fn gate(old: Option<std::sync::Arc<Gate>>, max: Option<u64>) -> Option<std::sync::Arc<Gate>> {
    match (old, max) {
        (Some(gate), Some(max)) => {
            gate.set_max(max);
            Some(gate)
        }
        (None, Some(max)) => Some(Gate::new(max)),
        (_, None) => None,
    }
}

/// The route's egress ids as the relay numbers them (`ids[i]`: the relay's id of the new
/// settings' egress `i`).
fn remap(mut route: Route, ids: &[EgressId]) -> Route {
    let map = |list: &mut Vec<EgressId>| list.iter_mut().for_each(|id| *id = ids[id.0]);
    map(&mut route.egress);
    route.backends.iter_mut().for_each(|b| map(&mut b.egress));
    route
}

/// The new route can go on with the old one's listening socket.
fn same_socket(old: &Route, new: &Route) -> bool {
    let udp = |r: &Route| r.protocol == Protocol::Udp;
    old.listen == new.listen && udp(old) == udp(new) && old.listen_device == new.listen_device
}
