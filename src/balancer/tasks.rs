//! The Balancer's resolver: a task that only sends the Balancer what it learnt, and what the
//! resolver and the checker need from the Balancer.

use super::{BackendId, Balancer, Entry};
use crate::balancer::health::{BackendHealth, EgressHealth};

use std::net::SocketAddr;
use std::sync::Arc;

use super::{BalancerHandle, Pick};
use crate::config::{Backend, BackendAddr, Route};
use crate::rt;
use crate::shutdown::Signal;

/// Resolves the route's name backends at once, then every `interval` until `stop`, on the
/// blocking pool (never on the caller's thread); a failed lookup keeps the addresses the
/// backend had. The first pass answers for every name, resolved or not: sessions that came
/// before it wait for it.
pub(crate) async fn resolve_loop(
    route: Arc<str>,
    sources: Vec<Backend>,
    interval: std::time::Duration,
    balancer: BalancerHandle,
    stop: Signal,
) {
    let names: Vec<(usize, String, u16)> = (sources.into_iter().enumerate())
        .filter_map(|(i, b)| match b.addr {
            BackendAddr::Name { host, port } => Some((i, host, port)),
            BackendAddr::Ip(_) => None,
        })
        .collect();
    let mut first = true;
    loop {
        for (source, host, port) in &names {
            let addrs = match stop.unless(rt::resolve(host, *port)).await {
                None => return,
                Some(Ok(addrs)) if !addrs.is_empty() => Some(addrs),
                Some(Ok(_)) => {
                    log::warn!(route = &*route, backend = host.as_str(); "backend name resolves to nothing, keeping its addresses");
                    None
                }
                Some(Err(e)) => {
                    log::warn!(route = &*route, backend = host.as_str(), err:% = e; "cannot resolve backend, keeping its addresses");
                    None
                }
            };
            // The first answer for a name, even "nothing yet", releases the sessions waiting.
            if let Some(addrs) = addrs.or_else(|| first.then(Vec::new)) {
                if balancer.resolved(*source, addrs).await.is_err() {
                    return;
                }
            }
        }
        first = false;
        if stop.unless(rt::sleep(interval)).await.is_none() {
            return;
        }
    }
}

/// What the resolver and the checker need from the balancer.
impl Balancer {
    /// Brings a name backend's addresses up to date: new ones join, vanished ones retire
    /// (their live sessions go on; the entry goes when the last one ends).
    pub(super) fn resolved(&mut self, source: usize, mut addrs: Vec<SocketAddr>) {
        self.unresolved.retain(|s| *s != source);
        addrs.sort_unstable();
        addrs.dedup();
        let (mut added, mut retired) = (Vec::new(), Vec::new());
        for entry in self.entries.iter_mut().filter(|e| e.source == source && !e.retired) {
            if !addrs.contains(&entry.addr) {
                entry.retired = true;
                retired.push(entry.addr);
            }
        }
        self.entries.retain(|e| !(e.retired && e.active == 0));
        for addr in addrs {
            if !self
                .entries
                .iter()
                .any(|e| e.source == source && e.addr == addr && !e.retired)
            {
                self.add(source, addr);
                added.push(addr);
            }
        }
        self.apply_orders();
        if let BackendAddr::Name { host, .. } = &self.sources[source].addr {
            if self.voice && (!added.is_empty() || !retired.is_empty()) {
                log::info!(route = &*self.route, backend = host.as_str(), added:? = added, retired:? = retired;
                    "backend addresses changed");
            }
        }
    }

    /// Takes a reloaded route's settings for the sessions to come. A backend the new list
    /// still has (by its address or name) keeps its health, counts and live sessions, with its
    /// new weight and egresses; one it no longer has retires (no new sessions; gone once its
    /// live ones end); a new one joins (a name once its resolver, restarted with the reload,
    /// first answers).
    pub(super) fn reconfigure(&mut self, route: &Route, egress_names: Arc<[Arc<str>]>) {
        self.strategy = route.balance;
        self.egress_strategy = route.egress_strategy;
        let checks_ended = self.health.check.is_some() && route.health.check.is_none();
        self.health = route.health.clone();
        self.route_egress = route.egress.clone();
        self.egresses.resize(egress_names.len(), EgressHealth::default());
        self.egress_names = egress_names;
        // The new list first (the resolver's indices), then the old sources that retired
        // entries still point to, until their sessions end.
        let mut sources = route.backends.clone();
        let moved: Vec<Option<usize>> = (self.sources.iter())
            .map(|old| sources.iter().position(|s| s.addr == old.addr))
            .collect();
        let mut ghosts: Vec<usize> = Vec::new();
        for entry in &mut self.entries {
            if let Some(source) = moved[entry.source] {
                entry.source = source;
                entry.weight = sources[source].weight;
                // An address removed by an earlier reload and listed again is back.
                entry.retired &= !matches!(sources[source].addr, BackendAddr::Ip(_));
                continue;
            }
            entry.retired = true;
            let ghost = ghosts.iter().position(|g| *g == entry.source).unwrap_or_else(|| {
                ghosts.push(entry.source);
                ghosts.len() - 1
            });
            entry.source = route.backends.len() + ghost;
        }
        sources.extend(ghosts.iter().map(|g| self.sources[*g].clone()));
        self.sources = sources;
        self.configured = route.backends.len();
        self.entries.retain(|e| !(e.retired && e.active == 0));
        // A source without entries is new (a name is looked up again by the new resolver).
        let fresh: Vec<usize> = (0..route.backends.len())
            .filter(|s| !self.entries.iter().any(|e| e.source == *s && !e.retired))
            .collect();
        self.unresolved.clear();
        for source in fresh {
            match self.sources[source].addr {
                BackendAddr::Ip(addr) => self.add(source, addr),
                BackendAddr::Name { .. } => self.unresolved.push(source),
            }
        }
        if checks_ended {
            for i in 0..self.entries.len() {
                let change = self.entries[i].health.checks_ended();
                self.report(self.entries[i].id, change);
            }
        }
        self.apply_orders();
        self.cursor = 0;
        self.release_held();
    }

    /// Answers the picks held for the first lookups, once no name waits for one.
    pub(super) fn release_held(&mut self) {
        if self.unresolved.is_empty() {
            for (client, tried, reply) in std::mem::take(&mut self.held) {
                let _ = reply.send(self.pick(client, &tried));
            }
        }
    }

    pub(super) fn add(&mut self, source: usize, addr: SocketAddr) {
        self.entries.push(Entry {
            id: BackendId(self.next_id),
            source,
            addr,
            weight: self.sources[source].weight,
            retired: false,
            health: BackendHealth::new(),
            active: 0,
            sessions: 0,
            connect_failures: 0,
            checks: [0; 2],
            current: 0,
            admin: super::AdminState::Enabled,
        });
        self.next_id += 1;
    }

    /// Every live backend not disabled by the operator, by its first usable egress; by its
    /// first egress when none is usable, so that a check through it can find the egress back.
    pub(super) fn targets(&self) -> Vec<Pick> {
        let checked = |e: &&Entry| !e.retired && e.admin != super::AdminState::Disabled;
        (self.entries.iter().filter(checked))
            .filter_map(|e| {
                let list = self.egress_list(e);
                let egress = list
                    .iter()
                    .copied()
                    .find(|g| self.egress_usable(*g))
                    .or(list.first().copied())?;
                Some(Pick {
                    backend: e.id,
                    addr: e.addr,
                    egress,
                    report_success: false,
                })
            })
            .collect()
    }
}
