//! The Balancer's resolver: a task that only sends the Balancer what it learnt, and what the
//! resolver and the checker need from the Balancer.

use super::{BackendId, Balancer, Entry};
use crate::balancer::health::BackendHealth;

use std::net::SocketAddr;
use std::sync::Arc;

use super::{BalancerHandle, Pick};
use crate::config::{Backend, BackendAddr};
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
        if let BackendAddr::Name { host, .. } = &self.sources[source].addr {
            if !added.is_empty() || !retired.is_empty() {
                log::info!(route = &*self.route, backend = host.as_str(), added:? = added, retired:? = retired;
                    "backend addresses changed");
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
            current: 0,
        });
        self.next_id += 1;
    }

    /// Every live backend, by its first usable egress; by its first egress when none is usable,
    /// so that a check through it can find the egress back.
    pub(super) fn targets(&self) -> Vec<Pick> {
        (self.entries.iter().filter(|e| !e.retired))
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
