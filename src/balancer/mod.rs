//! Balancer actors, one per route on each worker (its shards): each picks a (backend, egress)
//! pair for the sessions of its worker and owns its balancing state without locks: its
//! cursors, its sessions' counts, and its copy of backend and egress health. Sessions ask the
//! shard of their own worker with [`BalancerHandle::pick`] and tell it how their connects and
//! sessions ended, so a pick never wakes another thread.
//!
//! Health stays relay-wide: what judges a backend (a connect's outcome, an active check) and
//! what the resolver, the Dialer and a reload say reaches every shard, in the same order from
//! each sender, so every shard counts every failure and takes a backend out at the same
//! `fall`; only shard 0 speaks of it (its log lines and counters), and shard 0 answers the
//! checker. A shard's counts are its own sessions': least-connections weighs the connections
//! of its worker (as nginx's least_conn without a shared zone), and a snapshot adds the
//! shards up. A backend's trial after its cool-down is one session per shard.

mod admin;
mod health;
mod pick;
mod tasks;

pub use admin::{ADMIN_STATES, AdminState};
use health::{BackendHealth, EgressHealth};
use pick::Weighed;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
pub(crate) use tasks::resolve_loop;

use crate::config::{Backend, BackendAddr, Balance, EgressId, EgressStrategy, Health, Route};
use crate::error::{Fault, Gone};
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
    /// A success would change the backend's health (failures to forget, a trial to pass), so
    /// the session reports it. Otherwise only failures are reported: the pick itself counted
    /// the session.
    pub report_success: bool,
}

/// Why the Balancer had no pair to offer a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoPick {
    /// No backend in service: none resolved, or all draining (weight 0) or drained or
    /// disabled by the operator.
    NoneInService,
    /// The session has tried every backend.
    EveryBackendTried,
    /// Every backend it has not tried is out (ejected by its failures or checks).
    NoneHealthy,
    /// The egresses of the backends left are down: the first of them, and why.
    EgressDown { egress: Arc<str>, why: Arc<str> },
    /// The session has tried every egress that is up.
    EveryEgressTried,
}

impl std::fmt::Display for NoPick {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NoPick::NoneInService => f.write_str("no backend in service (none resolved, or all drained)"),
            NoPick::EveryBackendTried => f.write_str("every backend tried"),
            NoPick::NoneHealthy => f.write_str("no healthy backend"),
            NoPick::EgressDown { egress, why } => write!(f, "egress {egress} down: {why}"),
            NoPick::EveryEgressTried => f.write_str("every egress tried"),
        }
    }
}

/// What a session has tried and must not be offered again: a backend by one egress (that way
/// failed), or a backend by any egress (the backend itself failed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tried {
    pub backend: BackendId,
    pub egress: Option<EgressId>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HealthState {
    Up,
    Down,
    /// Out, its cool-down over: the next session is its trial.
    Trial,
    /// Weight 0: no new sessions, live ones go on.
    Draining,
    /// Its name no longer resolves to it: no new sessions, gone once its live ones end.
    Retired,
}

impl HealthState {
    /// A stable word for the status page, metrics labels and logs.
    pub fn word(self) -> &'static str {
        match self {
            HealthState::Up => "up",
            HealthState::Down => "down",
            HealthState::Trial => "trial",
            HealthState::Draining => "draining",
            HealthState::Retired => "retired",
        }
    }
}

/// One backend as the balancer sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendSnapshot {
    pub addr: SocketAddr,
    /// As configured (`10.0.0.1:80` or `db.internal:5432`).
    pub source: String,
    pub weight: u32,
    pub state: HealthState,
    /// The operator's word on it (the admin socket's).
    pub admin: AdminState,
    pub active: u64,
    pub sessions: u64,
    pub connect_failures: u64,
    /// Failed connects or checks in a row.
    pub failing: u32,
    /// Times it was taken out, by failed connects or checks.
    pub ejections: u64,
    /// Active checks passed and failed.
    pub checks: [u64; 2],
}

/// One route as its balancer sees it.
#[derive(Debug, Clone)]
pub struct RouteSnapshot {
    pub name: String,
    pub listen: SocketAddr,
    pub backends: Vec<BackendSnapshot>,
    pub egresses: Vec<EgressSnapshot>,
}

/// One of the route's egresses as the balancer sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressSnapshot {
    pub name: String,
    pub up: bool,
    /// Why it is down (`carrier lost on up1`), when it is.
    pub why: Option<String>,
    /// The operator drained it: no new session leaves by it.
    pub drained: bool,
}

pub(crate) enum BalancerMsg {
    /// Next pair for `client`, skipping what this session tried; or why there is none.
    Pick {
        client: IpAddr,
        tried: Vec<Tried>,
        reply: flume::Sender<Result<Pick, NoPick>>,
    },
    /// A session's dial (or a UDP flow's first answer) failed, with whose fault and why, or
    /// succeeded where that is news ([`Pick::report_success`]). `counted`: this shard's pick
    /// counted the session (a failure takes it back); the other shards hear it by address.
    Connected {
        backend: BackendId,
        addr: SocketAddr,
        outcome: Result<(), (Fault, String)>,
        counted: bool,
    },
    /// A session on `backend` has ended.
    Closed { backend: BackendId },
    /// An active check passed, or failed and why.
    Checked {
        backend: BackendId,
        addr: SocketAddr,
        verdict: Result<(), String>,
    },
    /// The egress for a target the client named (CONNECT routes), other than `avoid`; or why
    /// there is none.
    Egress {
        avoid: Vec<EgressId>,
        reply: flume::Sender<Result<EgressId, NoPick>>,
    },
    /// The Dialer's word on an egress (`Some(why)`: down), numbered so that late news changes
    /// nothing.
    EgressNews {
        egress: EgressId,
        down: Option<Arc<str>>,
        seq: u64,
    },
    /// A name backend (`source`, its index in the route's list) now resolves to `addrs`.
    Resolved { source: usize, addrs: Vec<SocketAddr> },
    /// A reload changed the route: the settings new sessions are balanced by, and the relay's
    /// egress names (a reload may add some).
    Reconfigure {
        route: Box<Route>,
        egress_names: Arc<[Arc<str>]>,
    },
    /// An operator's order on the route's backend `named` (an address, or a backend as
    /// configured): the addresses it applies to, or why it applies to none.
    AdminBackend {
        named: String,
        state: AdminState,
        reply: flume::Sender<Result<Vec<SocketAddr>, String>>,
    },
    /// The egresses the operator has drained, relay-wide: the whole set.
    AdminEgresses { drained: Arc<[Arc<str>]> },
    /// What the checker should check now, and by which egress.
    Targets { reply: flume::Sender<Vec<Pick>> },
    Snapshot {
        reply: flume::Sender<(Vec<BackendSnapshot>, Vec<EgressSnapshot>)>,
    },
}

/// Talks to one route's balancer shards. Cheap to clone.
#[derive(Clone)]
pub struct BalancerHandle {
    /// One mailbox per worker, by the worker's number.
    shards: Arc<[flume::Sender<BalancerMsg>]>,
}

impl BalancerHandle {
    /// A balancer for `route`, a shard on each worker of the current runtime; `egress_names`
    /// are the relay's, indexed by [`EgressId`].
    pub(crate) fn spawn(
        route: &Route,
        egress_names: Arc<[Arc<str>]>,
        stats: Arc<Stats>,
        mailbox: usize,
    ) -> (Self, Vec<rt::JoinHandle<()>>) {
        let (shards, tasks) = (0..rt::worker_count().max(1))
            .map(|i| {
                let (tx, rx) = flume::bounded(mailbox);
                let shard = Balancer::new(route, egress_names.clone(), stats.clone(), i == 0);
                (tx, rt::spawn_on(i, shard.run(rx)))
            })
            .unzip::<_, _, Vec<_>, Vec<_>>();
        (BalancerHandle { shards: shards.into() }, tasks)
    }

    /// The shard of the worker this runs on (shard 0 off the workers).
    fn local(&self) -> usize {
        rt::worker_index().map_or(0, usize::from) % self.shards.len()
    }

    async fn send_to(&self, shard: usize, msg: BalancerMsg) -> Result<(), Gone> {
        self.shards[shard].send_async(msg).await.map_err(|_| Gone("balancer"))
    }

    /// Sends `msg(shard)` to every shard, in turn.
    async fn broadcast(&self, msg: impl Fn(usize) -> BalancerMsg) -> Result<(), Gone> {
        for shard in 0..self.shards.len() {
            self.send_to(shard, msg(shard)).await?;
        }
        Ok(())
    }

    async fn ask<T>(&self, shard: usize, msg: impl FnOnce(flume::Sender<T>) -> BalancerMsg) -> Result<T, Gone> {
        let (reply, answer) = flume::bounded(1);
        self.send_to(shard, msg(reply)).await?;
        answer.recv_async().await.map_err(|_| Gone("balancer"))
    }

    /// The next pair for a session from `client` that has `tried` these; `Err(why)` when no
    /// usable pair is left (every backend or egress is down: fail fast).
    pub async fn pick(&self, client: IpAddr, tried: &[Tried]) -> Result<Result<Pick, NoPick>, Gone> {
        let tried = tried.to_vec();
        self.ask(self.local(), |reply| BalancerMsg::Pick { client, tried, reply })
            .await
    }

    /// How the dial of `pick` (made on this worker) went: told to this worker's shard, which
    /// counted it, and to the others, whose health it judges too.
    pub async fn connected(&self, pick: &Pick, outcome: Result<(), (Fault, String)>) -> Result<(), Gone> {
        let (local, backend, addr) = (self.local(), pick.backend, pick.addr);
        self.broadcast(|shard| BalancerMsg::Connected {
            backend,
            addr,
            outcome: outcome.clone(),
            counted: shard == local,
        })
        .await
    }

    pub async fn closed(&self, backend: BackendId) -> Result<(), Gone> {
        self.send_to(self.local(), BalancerMsg::Closed { backend }).await
    }

    /// What a pick counted for a session on `backend`, released when the guard drops: at the
    /// session's end, however it ends (a panic included), on the shard that counted it.
    pub(crate) fn counted(&self, backend: BackendId) -> Counted {
        Counted {
            balancer: self.clone(),
            shard: self.local(),
            backend,
        }
    }

    /// An active check of `target` (one of [`BalancerHandle::targets`]) passed, or failed.
    pub async fn checked(&self, target: &Pick, verdict: Result<(), String>) -> Result<(), Gone> {
        let (backend, addr) = (target.backend, target.addr);
        self.broadcast(|_| BalancerMsg::Checked {
            backend,
            addr,
            verdict: verdict.clone(),
        })
        .await
    }

    /// An egress for a client-chosen target, other than `avoid`.
    pub async fn egress(&self, avoid: &[EgressId]) -> Result<Result<EgressId, NoPick>, Gone> {
        let avoid = avoid.to_vec();
        self.ask(self.local(), |reply| BalancerMsg::Egress { avoid, reply })
            .await
    }

    pub(crate) async fn egress_news(&self, egress: EgressId, down: Option<Arc<str>>, seq: u64) -> Result<(), Gone> {
        self.broadcast(|_| BalancerMsg::EgressNews {
            egress,
            down: down.clone(),
            seq,
        })
        .await
    }

    pub(crate) async fn resolved(&self, source: usize, addrs: Vec<SocketAddr>) -> Result<(), Gone> {
        self.broadcast(|_| BalancerMsg::Resolved {
            source,
            addrs: addrs.clone(),
        })
        .await
    }

    pub(crate) async fn reconfigure(&self, route: Route, egress_names: Arc<[Arc<str>]>) -> Result<(), Gone> {
        self.broadcast(|_| BalancerMsg::Reconfigure {
            route: Box::new(route.clone()),
            egress_names: egress_names.clone(),
        })
        .await
    }

    /// An operator's order on a backend, given to every shard: the addresses it applies to
    /// (shard 0's answer), or why it applies to none.
    pub(crate) async fn admin_backend(
        &self,
        named: &str,
        state: AdminState,
    ) -> Result<Result<Vec<SocketAddr>, String>, Gone> {
        let mut answer = None;
        for shard in 0..self.shards.len() {
            let named = named.to_string();
            let said = (self.ask(shard, |reply| BalancerMsg::AdminBackend { named, state, reply })).await?;
            answer.get_or_insert(said);
        }
        Ok(answer.expect("a balancer has a shard"))
    }

    /// The egresses the operator has drained, relay-wide.
    pub(crate) async fn admin_egresses(&self, drained: Arc<[Arc<str>]>) -> Result<(), Gone> {
        self.broadcast(|_| BalancerMsg::AdminEgresses {
            drained: drained.clone(),
        })
        .await
    }

    /// What the checker should check now: shard 0's word.
    pub(crate) async fn targets(&self) -> Result<Vec<Pick>, Gone> {
        self.ask(0, |reply| BalancerMsg::Targets { reply }).await
    }

    /// The route's backends and egresses: shard 0's view of their health, with every shard's
    /// counts added up (a retired backend one shard still serves is listed too).
    pub async fn snapshot(&self) -> Result<(Vec<BackendSnapshot>, Vec<EgressSnapshot>), Gone> {
        let (mut backends, egresses) = self.ask(0, |reply| BalancerMsg::Snapshot { reply }).await?;
        for shard in 1..self.shards.len() {
            let (theirs, _) = self.ask(shard, |reply| BalancerMsg::Snapshot { reply }).await?;
            for b in theirs {
                match backends.iter_mut().find(|o| o.addr == b.addr && o.source == b.source) {
                    Some(o) => (o.active, o.sessions) = (o.active + b.active, o.sessions + b.sessions),
                    None => backends.push(b),
                }
            }
        }
        Ok((backends, egresses))
    }
}

/// Tells the balancer a session on its backend has ended when dropped.
pub(crate) struct Counted {
    balancer: BalancerHandle,
    shard: usize,
    backend: BackendId,
}

impl Drop for Counted {
    fn drop(&mut self) {
        let msg = BalancerMsg::Closed { backend: self.backend };
        let tx = &self.balancer.shards[self.shard];
        // A full mailbox is no reason to block a drop: the word goes from a task instead.
        if let Err(flume::TrySendError::Full(msg)) = tx.try_send(msg) {
            let tx = tx.clone();
            rt::detach(async move {
                let _ = tx.send_async(msg).await;
            });
        }
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
    /// Active checks passed, failed.
    checks: [u64; 2],
    /// Smooth weighted round robin's running score.
    current: i64,
    /// The operator's word on it.
    admin: AdminState,
}

impl Entry {
    /// New sessions may come to it, health permitting: not retired, not weighed 0, not
    /// drained or disabled by the operator.
    fn in_service(&self) -> bool {
        !self.retired && self.weight > 0 && self.admin == AdminState::Enabled
    }
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
    /// The route's backends as configured, then those that only retired entries still name.
    sources: Vec<Backend>,
    /// How many of `sources` the route's config has.
    configured: usize,
    entries: Vec<Entry>,
    next_id: u64,
    cursor: usize,
    egress_cursor: usize,
    /// Indexed by [`EgressId`]: every egress of the relay.
    egresses: Vec<EgressHealth>,
    egress_names: Arc<[Arc<str>]>,
    rng: fastrand::Rng,
    stats: Arc<Stats>,
    /// Name backends the resolver has not answered for yet, and the picks waiting for it.
    unresolved: Vec<usize>,
    held: Vec<HeldPick>,
    /// Shard 0: the one whose health changes are logged and counted.
    voice: bool,
    /// The operator's orders.
    orders: admin::Orders,
}

/// A pick waiting for the first lookup of the route's names: who asked, what they tried, and
/// where the answer goes.
type HeldPick = (IpAddr, Vec<Tried>, flume::Sender<Result<Pick, NoPick>>);

/// Picks held at most while names are first resolved; past it, they are answered at once.
const HELD_MAX: usize = 1024;

impl Balancer {
    fn new(route: &Route, egress_names: Arc<[Arc<str>]>, stats: Arc<Stats>, voice: bool) -> Self {
        if voice && route.balance == Balance::WeightedRoundRobin {
            log::info!(route = route.name.as_str();
                "balance WeightedRoundRobin is RoundRobin now: round robin honours weights");
        }
        let mut balancer = Balancer {
            route: route.name.as_str().into(),
            strategy: route.balance,
            egress_strategy: route.egress_strategy,
            health: route.health.clone(),
            route_egress: route.egress.clone(),
            sources: route.backends.clone(),
            configured: route.backends.len(),
            entries: Vec::new(),
            next_id: 0,
            cursor: 0,
            egress_cursor: 0,
            egresses: vec![EgressHealth::default(); egress_names.len()],
            egress_names,
            rng: fastrand::Rng::new(),
            stats,
            unresolved: Vec::new(),
            held: Vec::new(),
            voice,
            orders: admin::Orders::default(),
        };
        // Addresses now; names once the resolver has looked them up (its first pass runs at
        // once): picks that come before it are held until then.
        for source in 0..balancer.sources.len() {
            match &balancer.sources[source].addr {
                BackendAddr::Ip(addr) => balancer.add(source, *addr),
                BackendAddr::Name { .. } => balancer.unresolved.push(source),
            }
        }
        balancer
    }

    async fn run(mut self, rx: flume::Receiver<BalancerMsg>) {
        while let Ok(msg) = rx.recv_async().await {
            match msg {
                BalancerMsg::Pick { client, tried, reply } => {
                    if self.unresolved.is_empty() || self.held.len() >= HELD_MAX {
                        let _ = reply.send(self.pick(client, &tried));
                    } else {
                        self.held.push((client, tried, reply));
                    }
                }
                BalancerMsg::Connected {
                    backend,
                    outcome,
                    counted: true,
                    ..
                } => self.connected(backend, outcome),
                BalancerMsg::Connected {
                    backend, addr, outcome, ..
                } => {
                    if let Some(backend) = self.known(backend, addr) {
                        self.judged(backend, outcome);
                    }
                }
                BalancerMsg::Closed { backend } => self.closed(backend),
                BalancerMsg::Checked { backend, addr, verdict } => {
                    if let Some(backend) = self.known(backend, addr) {
                        self.checked(backend, verdict);
                    }
                }
                BalancerMsg::Egress { avoid, reply } => {
                    let _ = reply.send(self.client_egress(&avoid));
                }
                BalancerMsg::EgressNews { egress, down, seq } => self.egress_news(egress, down, seq),
                BalancerMsg::Resolved { source, addrs } => {
                    self.resolved(source, addrs);
                    self.release_held();
                }
                BalancerMsg::Reconfigure { route, egress_names } => self.reconfigure(&route, egress_names),
                BalancerMsg::AdminBackend { named, state, reply } => {
                    let _ = reply.send(self.admin_backend(&named, state));
                }
                BalancerMsg::AdminEgresses { drained } => self.admin_egresses(drained),
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

    fn snapshot(&self) -> (Vec<BackendSnapshot>, Vec<EgressSnapshot>) {
        let now = std::time::Instant::now();
        let backends = (self.entries.iter())
            .map(|e| BackendSnapshot {
                addr: e.addr,
                source: self.sources[e.source].addr.to_string(),
                weight: e.weight,
                admin: e.admin,
                state: match (e.retired, e.weight, e.health.is_up()) {
                    (true, _, _) => HealthState::Retired,
                    (_, _, false) if e.health.on_trial(now) => HealthState::Trial,
                    (_, _, false) => HealthState::Down,
                    (_, 0, _) => HealthState::Draining,
                    _ => HealthState::Up,
                },
                active: e.active,
                sessions: e.sessions,
                connect_failures: e.connect_failures,
                failing: e.health.failing(),
                ejections: e.health.downs(),
                checks: e.checks,
            })
            .collect();
        let mut names: Vec<EgressId> = self.route_egress.clone();
        for g in self.sources.iter().flat_map(|s| &s.egress) {
            if !names.contains(g) {
                names.push(*g);
            }
        }
        let egresses = (names.iter())
            .map(|g| {
                let down = self.egresses.get(g.0).and_then(|e| e.down.as_deref());
                EgressSnapshot {
                    name: self.egress_names.get(g.0).map(|n| n.to_string()).unwrap_or_default(),
                    up: down.is_none(),
                    why: down.map(str::to_string),
                    drained: self.egress_drained(*g),
                }
            })
            .collect();
        (backends, egresses)
    }
}

#[cfg(test)]
mod tests;
