//! The Balancer's helpers: the health checker and the resolver. Each is a task that only sends
//! the Balancer what it learnt; neither holds balancing state.

use super::{BackendId, Balancer, Entry};
use crate::balancer::health::BackendHealth;

use std::net::SocketAddr;
use std::sync::Arc;

use futures::io::{AsyncReadExt, AsyncWriteExt};

use super::{BalancerHandle, Pick};
use crate::config::{Backend, BackendAddr, Check};
use crate::dialer::DialerHandle;
use crate::error::Fault;
use crate::rt;
use crate::shutdown::Signal;

/// Most bytes of a check's answer read while looking for `expect`.
const EXPECT_WINDOW: usize = 4096;

/// Checks every backend each `check.interval` until `stop`, by the Dialer, so that a check
/// leaves by the same egress as the traffic.
pub(crate) async fn check_loop(
    route: Arc<str>,
    check: Check,
    balancer: BalancerHandle,
    dialer: DialerHandle,
    stop: Signal,
) {
    loop {
        let Ok(targets) = balancer.targets().await else { break };
        for target in targets {
            let (check, balancer, dialer) = (check.clone(), balancer.clone(), dialer.clone());
            rt::detach(async move {
                if let Some(verdict) = probe(&check, &dialer, target).await {
                    let _ = balancer.checked(target.backend, verdict).await;
                }
            });
        }
        if stop.unless(rt::sleep(check.interval)).await.is_none() {
            break;
        }
    }
    log::debug!(route = &*route; "health checks stopped");
}

/// One check: `Some(Ok)` passed, `Some(Err(why))` failed, or `None` when it says nothing of
/// the backend (the egress or the path was at fault, or the relay is stopping).
async fn probe(check: &Check, dialer: &DialerHandle, target: Pick) -> Option<Result<(), String>> {
    let verdict = rt::timeout(check.timeout, async {
        let mut conn = match dialer.tcp(target.addr, target.egress, check.timeout).await {
            Ok(conn) => conn,
            Err(e) if e.fault() != Some(Fault::Backend) => return None,
            Err(e) => return Some(Err(e.to_string())),
        };
        if let Some(send) = &check.send {
            if let Err(e) = conn.write_all(send).await {
                return Some(Err(format!("sending the check: {e}")));
            }
        }
        let Some(expect) = &check.expect else {
            return Some(Ok(()));
        };
        let mut seen = Vec::new();
        let mut buf = [0u8; 512];
        let mut ended = "the backend closed";
        while seen.len() < EXPECT_WINDOW {
            match conn.read(&mut buf).await {
                Ok(0) => break,
                Err(_) => {
                    ended = "reading failed";
                    break;
                }
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
            if seen.windows(expect.len()).any(|w| w == expect.as_slice()) {
                return Some(Ok(()));
            }
        }
        Some(Err(format!(
            "expected {:?}, got {:?} ({ended})",
            String::from_utf8_lossy(expect),
            String::from_utf8_lossy(&seen[..seen.len().min(64)])
        )))
    });
    let timed_out = || {
        Err(format!(
            "no verdict within {}",
            humantime::format_duration(check.timeout)
        ))
    };
    verdict.await.unwrap_or_else(|| Some(timed_out()))
}

/// Resolves the route's name backends every `interval` until `stop`; a failed lookup keeps the
/// addresses the backend had.
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
    while stop.unless(rt::sleep(interval)).await.is_some() {
        for (source, host, port) in &names {
            match rt::resolve(host, *port).await {
                Ok(addrs) if !addrs.is_empty() => {
                    let addrs: Vec<SocketAddr> = addrs;
                    if balancer.resolved(*source, addrs).await.is_err() {
                        return;
                    }
                }
                Ok(_) => {
                    log::warn!(route = &*route, backend = host.as_str(); "backend name resolves to nothing, keeping its addresses")
                }
                Err(e) => {
                    log::warn!(route = &*route, backend = host.as_str(), err:% = e; "cannot resolve backend, keeping its addresses")
                }
            }
        }
    }
}

/// What the resolver and the checker need from the balancer.
impl Balancer {
    /// Brings a name backend's addresses up to date: new ones join, vanished ones retire
    /// (their live sessions go on; the entry goes when the last one ends).
    pub(super) fn resolved(&mut self, source: usize, mut addrs: Vec<SocketAddr>) {
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
                    news: false,
                })
            })
            .collect()
    }
}
