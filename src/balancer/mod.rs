//! Balancer actor, one per route: picks a (backend, egress) pair for each new session and owns
//! every piece of balancing state: cursors, counts, backend health, and its view of egress
//! health. Sessions ask with [`BalancerHandle::pick`] and report how their connects and
//! sessions ended; the health checker, the resolver and the Dialer send it what they learn.

mod health;
mod pick;
mod tasks;

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::time::Instant;

use health::{BackendHealth, Change, EgressHealth};
use pick::Weighed;
pub(crate) use tasks::{check_loop, resolve_loop};

use crate::config::{Backend, BackendAddr, Balance, EgressId, EgressStrategy, Health, Route};
use crate::error::Gone;
use crate::rt;
use crate::stats::Stats;

/// A backend of a route: one address (a name that resolves to three gives three backends).
/// Stable for the backend's life, whatever resolution adds or retires around it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BackendId(pub u64);

/// The balancer's answer: where a session should go and how it should leave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pick {
    pub backend: BackendId,
    pub addr: SocketAddr,
    pub egress: EgressId,
}

/// Whose fault a failed dial was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Refused, timed out, reset: try another backend.
    Backend,
    /// The interface, its address or its route is gone: try another egress.
    Egress,
    /// The relay itself ran short (file descriptors, memory): nobody's health is judged.
    Relay,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HealthState {
    Up,
    Down,
    /// Weight 0: no new sessions, live ones go on.
    Draining,
    /// Its name no longer resolves to it: no new sessions, gone once its live ones end.
    Retired,
}

/// One backend as the balancer sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendSnapshot {
    pub addr: SocketAddr,
    /// As configured (`10.0.0.1:80` or `db.internal:5432`).
    pub source: String,
    pub weight: u32,
    pub state: HealthState,
    pub active: u64,
    pub sessions: u64,
    pub connect_failures: u64,
    /// Failed connects or checks in a row.
    pub failing: u32,
}

/// One of the route's egresses as the balancer sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressSnapshot {
    pub name: String,
    pub up: bool,
}

pub(crate) enum BalancerMsg {
    /// Next pair for `client`, skipping backends this session found at fault.
    Pick {
        client: IpAddr,
        tried: Vec<BackendId>,
        reply: flume::Sender<Option<Pick>>,
    },
    /// A session's dial ended: `Ok` means a session is now open on the backend.
    Connected {
        backend: BackendId,
        egress: EgressId,
        outcome: Result<(), Fault>,
    },
    /// A session on `backend` has ended.
    Closed {
        backend: BackendId,
    },
    Checked {
        backend: BackendId,
        ok: bool,
    },
    /// The egress for a target the client named (CONNECT routes); `None`: every egress is down.
    Egress {
        reply: flume::Sender<Option<EgressId>>,
    },
    /// A dial by `egress` failed for the egress's fault (CONNECT routes).
    EgressFailed {
        egress: EgressId,
    },
    /// The Dialer's word on an egress, numbered so that late news changes nothing.
    EgressNews {
        egress: EgressId,
        up: bool,
        seq: u64,
    },
    /// A name backend (`source`, its index in the route's list) now resolves to `addrs`.
    Resolved {
        source: usize,
        addrs: Vec<SocketAddr>,
    },
    /// What the checker should check now, and by which egress.
    Targets {
        reply: flume::Sender<Vec<Pick>>,
    },
    Snapshot {
        reply: flume::Sender<(Vec<BackendSnapshot>, Vec<EgressSnapshot>)>,
    },
}

/// Talks to one route's balancer. Cheap to clone.
#[derive(Clone)]
pub struct BalancerHandle {
    tx: flume::Sender<BalancerMsg>,
}

impl BalancerHandle {
    /// A balancer for `route`; `egress_names` are the relay's, indexed by [`EgressId`].
    pub(crate) fn spawn(
        route: &Route,
        egress_names: Arc<[String]>,
        stats: Arc<Stats>,
        mailbox: usize,
    ) -> (Self, rt::JoinHandle<()>) {
        let (tx, rx) = flume::bounded(mailbox);
        (
            BalancerHandle { tx },
            rt::spawn(Balancer::new(route, egress_names, stats).run(rx)),
        )
    }

    async fn send(&self, msg: BalancerMsg) -> Result<(), Gone> {
        self.tx.send_async(msg).await.map_err(|_| Gone("balancer"))
    }

    async fn ask<T>(&self, msg: impl FnOnce(flume::Sender<T>) -> BalancerMsg) -> Result<T, Gone> {
        let (reply, answer) = flume::bounded(1);
        self.send(msg(reply)).await?;
        answer.recv_async().await.map_err(|_| Gone("balancer"))
    }

    /// The next pair for a session from `client` that found `tried` at fault; `None` when no
    /// usable pair is left (every backend or egress is down: fail fast).
    pub async fn pick(&self, client: IpAddr, tried: &[BackendId]) -> Result<Option<Pick>, Gone> {
        let tried = tried.to_vec();
        self.ask(|reply| BalancerMsg::Pick { client, tried, reply }).await
    }

    pub async fn connected(
        &self,
        backend: BackendId,
        egress: EgressId,
        outcome: Result<(), Fault>,
    ) -> Result<(), Gone> {
        self.send(BalancerMsg::Connected {
            backend,
            egress,
            outcome,
        })
        .await
    }

    pub async fn closed(&self, backend: BackendId) -> Result<(), Gone> {
        self.send(BalancerMsg::Closed { backend }).await
    }

    pub async fn checked(&self, backend: BackendId, ok: bool) -> Result<(), Gone> {
        self.send(BalancerMsg::Checked { backend, ok }).await
    }

    pub async fn egress(&self) -> Result<Option<EgressId>, Gone> {
        self.ask(|reply| BalancerMsg::Egress { reply }).await
    }

    pub async fn egress_failed(&self, egress: EgressId) -> Result<(), Gone> {
        self.send(BalancerMsg::EgressFailed { egress }).await
    }

    pub(crate) async fn egress_news(&self, egress: EgressId, up: bool, seq: u64) -> Result<(), Gone> {
        self.send(BalancerMsg::EgressNews { egress, up, seq }).await
    }

    pub(crate) async fn resolved(&self, source: usize, addrs: Vec<SocketAddr>) -> Result<(), Gone> {
        self.send(BalancerMsg::Resolved { source, addrs }).await
    }

    pub(crate) async fn targets(&self) -> Result<Vec<Pick>, Gone> {
        self.ask(|reply| BalancerMsg::Targets { reply }).await
    }

    pub async fn snapshot(&self) -> Result<(Vec<BackendSnapshot>, Vec<EgressSnapshot>), Gone> {
        self.ask(|reply| BalancerMsg::Snapshot { reply }).await
    }
}

struct Entry {
    id: BackendId,
    /// Index of the configured backend this address came from.
    source: usize,
    addr: SocketAddr,
    weight: u32,
    retired: bool,
    health: BackendHealth,
    active: u64,
    sessions: u64,
    connect_failures: u64,
    /// Smooth weighted round robin's running score.
    current: i64,
}

impl Weighed for Entry {
    fn weight(&self) -> u32 {
        self.weight
    }
    fn active(&self) -> u64 {
        self.active
    }
    fn addr(&self) -> SocketAddr {
        self.addr
    }
    fn current(&mut self) -> &mut i64 {
        &mut self.current
    }
}

struct Balancer {
    route: Arc<str>,
    strategy: Balance,
    egress_strategy: EgressStrategy,
    health: Health,
    route_egress: Vec<EgressId>,
    sources: Vec<Backend>,
    entries: Vec<Entry>,
    next_id: u64,
    cursor: usize,
    egress_cursor: usize,
    /// Indexed by [`EgressId`]: every egress of the relay.
    egresses: Vec<EgressHealth>,
    egress_names: Arc<[String]>,
    rng: fastrand::Rng,
    stats: Arc<Stats>,
}

impl Balancer {
    fn new(route: &Route, egress_names: Arc<[String]>, stats: Arc<Stats>) -> Self {
        let mut balancer = Balancer {
            route: route.name.as_str().into(),
            strategy: route.balance,
            egress_strategy: route.egress_strategy,
            health: route.health.clone(),
            route_egress: route.egress.clone(),
            sources: route.backends.clone(),
            entries: Vec::new(),
            next_id: 0,
            cursor: 0,
            egress_cursor: 0,
            egresses: vec![EgressHealth::new(); egress_names.len()],
            egress_names,
            rng: fastrand::Rng::new(),
            stats,
        };
        for source in 0..balancer.sources.len() {
            let addrs = balancer.first_addresses(source);
            balancer.resolved(source, addrs);
        }
        balancer
    }

    /// A name is resolved once at start (blocking: before any session exists); a failure is
    /// logged and the resolver keeps trying.
    fn first_addresses(&self, source: usize) -> Vec<SocketAddr> {
        match &self.sources[source].addr {
            BackendAddr::Ip(addr) => vec![*addr],
            BackendAddr::Name { host, port } => match (host.as_str(), *port).to_socket_addrs() {
                Ok(addrs) => addrs.collect(),
                Err(e) => {
                    log::warn!(route = &*self.route, backend = host.as_str(), err:% = e; "cannot resolve backend yet");
                    Vec::new()
                }
            },
        }
    }

    async fn run(mut self, rx: flume::Receiver<BalancerMsg>) {
        while let Ok(msg) = rx.recv_async().await {
            match msg {
                BalancerMsg::Pick { client, tried, reply } => {
                    let _ = reply.send(self.pick(client, &tried));
                }
                BalancerMsg::Connected {
                    backend,
                    egress,
                    outcome,
                } => self.connected(backend, egress, outcome),
                BalancerMsg::Closed { backend } => self.closed(backend),
                BalancerMsg::Checked { backend, ok } => self.checked(backend, ok),
                BalancerMsg::Egress { reply } => {
                    let list = self.route_egress.clone();
                    let _ = reply.send(self.next_egress(&list, Instant::now()));
                }
                BalancerMsg::EgressFailed { egress } => self.egress_failed(egress),
                BalancerMsg::EgressNews { egress, up, seq } => self.egress_news(egress, up, seq),
                BalancerMsg::Resolved { source, addrs } => self.resolved(source, addrs),
                BalancerMsg::Targets { reply } => {
                    let _ = reply.send(self.targets());
                }
                BalancerMsg::Snapshot { reply } => {
                    let _ = reply.send(self.snapshot());
                }
            }
        }
        log::debug!(actor = "balancer", route = &*self.route; "stopped, no handles left");
    }

    fn egress_list(&self, entry: &Entry) -> &[EgressId] {
        &self.sources[entry.source].egress
    }

    fn egress_usable(&self, egress: EgressId, now: Instant) -> bool {
        self.egresses.get(egress.0).is_some_and(|e| e.usable(now))
    }

    /// The next egress of `list` by the route's egress strategy.
    fn next_egress(&mut self, list: &[EgressId], now: Instant) -> Option<EgressId> {
        let usable: Vec<EgressId> = list.iter().copied().filter(|e| self.egress_usable(*e, now)).collect();
        let egress = match self.egress_strategy {
            EgressStrategy::Failover => usable.first().copied(),
            EgressStrategy::RoundRobin => usable.get(self.egress_cursor % usable.len().max(1)).copied(),
        };
        self.egress_cursor = self.egress_cursor.wrapping_add(1);
        egress
    }

    fn pick(&mut self, client: IpAddr, tried: &[BackendId]) -> Option<Pick> {
        let now = Instant::now();
        let usable: Vec<usize> = (self.entries.iter().enumerate())
            .filter(|(_, e)| !e.retired && e.weight > 0 && !tried.contains(&e.id) && e.health.usable(now))
            .filter(|(_, e)| self.egress_list(e).iter().any(|g| self.egress_usable(*g, now)))
            .map(|(i, _)| i)
            .collect();
        if usable.is_empty() {
            return None;
        }
        let len = self.entries.len();
        let i = match self.strategy {
            Balance::RoundRobin => pick::round_robin(&usable, len, &mut self.cursor),
            Balance::WeightedRoundRobin => pick::smooth_weighted(&mut self.entries, &usable),
            Balance::LeastConnections => pick::least_connections(&self.entries, &usable, &mut self.cursor),
            Balance::SourceHash => pick::source_hash(&self.entries, &usable, client),
            Balance::Random => pick::two_choices(&self.entries, &usable, &mut self.rng),
        };
        let list = self.egress_list(&self.entries[i]).to_vec();
        let egress = self.next_egress(&list, now)?;
        let entry = &self.entries[i];
        Some(Pick {
            backend: entry.id,
            addr: entry.addr,
            egress,
        })
    }

    fn entry(&mut self, id: BackendId) -> Option<&mut Entry> {
        self.entries.iter_mut().find(|e| e.id == id)
    }

    fn connected(&mut self, id: BackendId, egress: EgressId, outcome: Result<(), Fault>) {
        let now = Instant::now();
        match outcome {
            Err(Fault::Egress) => return self.egress_failed(egress),
            Err(Fault::Relay) => return,
            _ => {}
        }
        if outcome.is_ok() {
            self.egress_recovered(egress);
        }
        let health = self.health.clone();
        let Some(entry) = self.entry(id) else { return };
        if outcome.is_ok() {
            entry.active += 1;
            entry.sessions += 1;
        } else {
            entry.connect_failures += 1;
        }
        let change = entry.health.connected(outcome.is_ok(), now, &health);
        self.report(id, change);
    }

    fn closed(&mut self, id: BackendId) {
        let Some(entry) = self.entry(id) else { return };
        entry.active = entry.active.saturating_sub(1);
        if entry.retired && entry.active == 0 {
            self.entries.retain(|e| e.id != id);
        }
    }

    fn checked(&mut self, id: BackendId, ok: bool) {
        let health = self.health.clone();
        let Some(entry) = self.entry(id) else { return };
        let change = entry.health.checked(ok, &health);
        self.report(id, change);
    }

    /// One log line per change of a backend's standing.
    fn report(&self, id: BackendId, change: Option<Change>) {
        let Some(change) = change else { return };
        let Some(entry) = self.entries.iter().find(|e| e.id == id) else {
            return;
        };
        match change {
            Change::Down { why, cooldown } => {
                let cooldown_ms = cooldown.map_or(0, |c| c.as_millis() as u64);
                log::warn!(route = &*self.route, backend:% = entry.addr, why = why, cooldown_ms = cooldown_ms; "backend down");
            }
            Change::Up { why } => log::info!(route = &*self.route, backend:% = entry.addr, why = why; "backend up"),
        }
        self.stats.health_changed();
    }

    fn egress_failed(&mut self, egress: EgressId) {
        let health = self.health.clone();
        let changed = self
            .egresses
            .get_mut(egress.0)
            .is_some_and(|e| e.failed(Instant::now(), &health));
        self.egress_report(egress, changed, false);
    }

    fn egress_recovered(&mut self, egress: EgressId) {
        let changed = self.egresses.get_mut(egress.0).is_some_and(|e| e.recovered());
        self.egress_report(egress, changed, true);
    }

    fn egress_news(&mut self, egress: EgressId, up: bool, seq: u64) {
        let health = self.health.clone();
        let changed = self
            .egresses
            .get_mut(egress.0)
            .is_some_and(|e| e.told(up, seq, Instant::now(), &health));
        self.egress_report(egress, changed, up);
    }

    /// The Dialer logs egress changes once for the relay; each route notes them at debug.
    fn egress_report(&self, egress: EgressId, changed: bool, up: bool) {
        if changed {
            let name = self.egress_names.get(egress.0).map_or("?", String::as_str);
            log::debug!(route = &*self.route, egress = name, up = up; "egress standing changed");
            self.stats.health_changed();
        }
    }

    /// Brings a name backend's addresses up to date: new ones join, vanished ones retire
    /// (their live sessions go on; the entry goes when the last one ends).
    fn resolved(&mut self, source: usize, mut addrs: Vec<SocketAddr>) {
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

    fn add(&mut self, source: usize, addr: SocketAddr) {
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
    fn targets(&self) -> Vec<Pick> {
        let now = Instant::now();
        (self.entries.iter().filter(|e| !e.retired))
            .filter_map(|e| {
                let list = self.egress_list(e);
                let egress = list
                    .iter()
                    .copied()
                    .find(|g| self.egress_usable(*g, now))
                    .or(list.first().copied())?;
                Some(Pick {
                    backend: e.id,
                    addr: e.addr,
                    egress,
                })
            })
            .collect()
    }

    fn snapshot(&self) -> (Vec<BackendSnapshot>, Vec<EgressSnapshot>) {
        let backends = (self.entries.iter())
            .map(|e| BackendSnapshot {
                addr: e.addr,
                source: self.sources[e.source].addr.to_string(),
                weight: e.weight,
                state: match (e.retired, e.weight, e.health.is_up()) {
                    (true, _, _) => HealthState::Retired,
                    (_, _, false) => HealthState::Down,
                    (_, 0, _) => HealthState::Draining,
                    _ => HealthState::Up,
                },
                active: e.active,
                sessions: e.sessions,
                connect_failures: e.connect_failures,
                failing: e.health.failing(),
            })
            .collect();
        let mut names: Vec<EgressId> = self.route_egress.clone();
        for g in self.sources.iter().flat_map(|s| &s.egress) {
            if !names.contains(g) {
                names.push(*g);
            }
        }
        let egresses = (names.iter())
            .map(|g| EgressSnapshot {
                name: self.egress_names.get(g.0).cloned().unwrap_or_default(),
                up: self.egresses.get(g.0).is_some_and(EgressHealth::is_up),
            })
            .collect();
        (backends, egresses)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, Settings};

    const CLIENT: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 7));

    fn settings(route: &str) -> Settings {
        let text = format!(r#"(egress: {{"a": (), "b": ()}}, routes: [(name: "r", listen: "127.0.0.1:0", {route})])"#);
        Config::parse(&text, "test").unwrap().validate().unwrap()
    }

    fn balancer(route: &str) -> Balancer {
        let s = settings(route);
        let names: Arc<[String]> = s.egress.iter().map(|e| e.name.clone()).collect();
        Balancer::new(&s.routes[0], names, Arc::default())
    }

    fn ports(b: &mut Balancer, n: usize) -> Vec<u16> {
        (0..n)
            .map(|_| b.pick(CLIENT, &[]).map_or(0, |p| p.addr.port()))
            .collect()
    }

    const THREE: &str = r#"backends: [(addr: "127.0.0.1:1"), (addr: "127.0.0.1:2"), (addr: "127.0.0.1:3")]"#;

    #[test]
    fn failed_connects_take_a_backend_out_and_sessions_only_get_healthy_ones() {
        let mut b = balancer(&format!(r#"{THREE}, health: (fall: 2, cooldown: "1m")"#));
        let second = b.entries[1].id;
        for _ in 0..2 {
            b.connected(second, EgressId(0), Err(Fault::Backend));
        }
        assert_eq!(ports(&mut b, 4), [1, 3, 1, 3]);
        assert_eq!(b.snapshot().0[1].state, HealthState::Down);
        assert_eq!(b.stats.health_changes(), 1);
        // All down: the pick fails at once rather than waiting on connects.
        for entry in [b.entries[0].id, b.entries[2].id] {
            b.connected(entry, EgressId(0), Err(Fault::Backend));
            b.connected(entry, EgressId(0), Err(Fault::Backend));
        }
        assert_eq!(b.pick(CLIENT, &[]), None);
    }

    #[test]
    fn weight_zero_drains_and_weights_interleave() {
        let mut b = balancer(
            r#"balance: WeightedRoundRobin, backends: [(addr: "127.0.0.1:1", weight: 5), (addr: "127.0.0.1:2"), (addr: "127.0.0.1:3"), (addr: "127.0.0.1:4", weight: 0)]"#,
        );
        assert_eq!(ports(&mut b, 7), [1, 1, 2, 1, 3, 1, 1]);
        assert_eq!(b.snapshot().0[3].state, HealthState::Draining);
    }

    #[test]
    fn a_failed_egress_is_avoided_until_it_recovers() {
        let mut b = balancer(&format!(r#"egress: ["a", "b"], egress_strategy: Failover, {THREE}"#));
        let (a, e_b) = (EgressId(1), EgressId(2));
        assert_eq!(b.pick(CLIENT, &[]).unwrap().egress, a);
        let id = b.entries[0].id;
        b.connected(id, a, Err(Fault::Egress));
        assert_eq!(
            b.pick(CLIENT, &[]).unwrap().egress,
            e_b,
            "traffic leaves by the other egress"
        );
        assert_eq!(b.entries[0].connect_failures, 0, "an egress fault is not the backend's");
        assert_eq!(
            b.snapshot().1,
            [
                EgressSnapshot {
                    name: "a".into(),
                    up: false
                },
                EgressSnapshot {
                    name: "b".into(),
                    up: true
                }
            ]
        );
        b.egress_news(a, true, 1);
        assert_eq!(
            b.pick(CLIENT, &[]).unwrap().egress,
            a,
            "failover returns to the first once it is back"
        );
        b.egress_news(e_b, false, 2);
        b.egress_news(a, false, 3);
        assert_eq!(b.pick(CLIENT, &[]), None, "no egress up: fail fast");
    }

    #[test]
    fn a_vanished_address_retires_and_goes_when_its_sessions_end() {
        let mut b = balancer(r#"backends: [(addr: "127.0.0.1:1")]"#);
        let old = b.pick(CLIENT, &[]).unwrap();
        b.connected(old.backend, old.egress, Ok(()));
        let new_addr: SocketAddr = "127.0.0.1:9".parse().unwrap();
        b.resolved(0, vec![new_addr]);
        assert_eq!(
            b.pick(CLIENT, &[]).unwrap().addr,
            new_addr,
            "new sessions go to the new address"
        );
        assert_eq!(
            b.snapshot().0[0].state,
            HealthState::Retired,
            "the old one keeps its live session"
        );
        b.closed(old.backend);
        assert_eq!(b.snapshot().0.len(), 1);
    }

    #[test]
    fn the_actor_serves_its_handle() {
        let s = settings(THREE);
        let names: Arc<[String]> = s.egress.iter().map(|e| e.name.clone()).collect();
        let (handle, task) = BalancerHandle::spawn(&s.routes[0], names, Arc::default(), 8);
        let (first, snapshot) = rt::block_on(async {
            let first = handle.pick(CLIENT, &[]).await.unwrap().unwrap();
            handle.connected(first.backend, first.egress, Ok(())).await.unwrap();
            (first, handle.snapshot().await.unwrap())
        });
        assert_eq!(first.addr.port(), 1);
        assert_eq!((snapshot.0[0].active, snapshot.0[0].sessions), (1, 1));
        drop(handle);
        rt::block_on(task);
    }
}
