//! Balancer actor, one per route: picks a backend for each new session and owns every piece of
//! balancing state (cursor, counts, failures). Nothing else reads or writes that state; Sessions
//! ask with [`BalancerHandle::pick`] and tell it how their connects and sessions ended.

use std::net::SocketAddr;

use crate::config::{Backend, EgressId};
use crate::error::Gone;
use crate::rt;

/// Index of a backend in its route's list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BackendId(pub usize);

/// The balancer's answer: where a session should go and how it should leave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pick {
    pub backend: BackendId,
    pub addr: SocketAddr,
    pub egress: EgressId,
}

/// One backend as the balancer sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendSnapshot {
    pub addr: SocketAddr,
    pub active: u64,
    pub sessions: u64,
    pub connect_failures: u64,
    /// Failed connects since the last successful one.
    pub failing: u64,
}

pub(crate) enum BalancerMsg {
    /// Next backend, skipping those already tried by this session.
    Pick {
        tried: Vec<BackendId>,
        reply: flume::Sender<Option<Pick>>,
    },
    /// A connect to `backend` succeeded (a session is now open on it) or failed.
    Connected {
        backend: BackendId,
        ok: bool,
    },
    /// A session on `backend` has ended.
    Closed {
        backend: BackendId,
    },
    Snapshot {
        reply: flume::Sender<Vec<BackendSnapshot>>,
    },
    /// How to leave for a target the client named (CONNECT routes).
    Egress {
        reply: flume::Sender<EgressId>,
    },
}

/// Talks to one route's balancer. Cheap to clone.
#[derive(Clone)]
pub struct BalancerHandle {
    tx: flume::Sender<BalancerMsg>,
}

impl BalancerHandle {
    /// A balancer over `backends`; `egress` is the route's own, for targets clients name.
    pub(crate) fn spawn(backends: &[Backend], egress: EgressId, mailbox: usize) -> (Self, rt::JoinHandle<()>) {
        let (tx, rx) = flume::bounded(mailbox);
        (
            BalancerHandle { tx },
            rt::spawn(Balancer::new(backends, egress).run(rx)),
        )
    }

    async fn send(&self, msg: BalancerMsg) -> Result<(), Gone> {
        self.tx.send_async(msg).await.map_err(|_| Gone("balancer"))
    }

    /// The next backend for a session that has already tried `tried`; `None` when none is left.
    pub async fn pick(&self, tried: &[BackendId]) -> Result<Option<Pick>, Gone> {
        let (reply, answer) = flume::bounded(1);
        let tried = tried.to_vec();
        self.send(BalancerMsg::Pick { tried, reply }).await?;
        answer.recv_async().await.map_err(|_| Gone("balancer"))
    }

    pub async fn connected(&self, backend: BackendId, ok: bool) -> Result<(), Gone> {
        self.send(BalancerMsg::Connected { backend, ok }).await
    }

    pub async fn closed(&self, backend: BackendId) -> Result<(), Gone> {
        self.send(BalancerMsg::Closed { backend }).await
    }

    /// The egress for a target the client named.
    pub async fn egress(&self) -> Result<EgressId, Gone> {
        let (reply, answer) = flume::bounded(1);
        self.send(BalancerMsg::Egress { reply }).await?;
        answer.recv_async().await.map_err(|_| Gone("balancer"))
    }

    pub async fn snapshot(&self) -> Result<Vec<BackendSnapshot>, Gone> {
        let (reply, answer) = flume::bounded(1);
        self.send(BalancerMsg::Snapshot { reply }).await?;
        answer.recv_async().await.map_err(|_| Gone("balancer"))
    }
}

struct Entry {
    backend: Backend,
    active: u64,
    sessions: u64,
    connect_failures: u64,
    failing: u64,
}

struct Balancer {
    entries: Vec<Entry>,
    /// Round robin: the backend the next pick starts from.
    cursor: usize,
    egress: EgressId,
}

impl Balancer {
    fn new(backends: &[Backend], egress: EgressId) -> Self {
        let entries = backends
            .iter()
            .map(|b| Entry {
                backend: b.clone(),
                active: 0,
                sessions: 0,
                connect_failures: 0,
                failing: 0,
            })
            .collect();
        Balancer {
            entries,
            cursor: 0,
            egress,
        }
    }

    async fn run(mut self, rx: flume::Receiver<BalancerMsg>) {
        while let Ok(msg) = rx.recv_async().await {
            match msg {
                BalancerMsg::Pick { tried, reply } => {
                    let _ = reply.send(self.pick(&tried));
                }
                BalancerMsg::Connected { backend, ok } => self.connected(backend, ok),
                BalancerMsg::Closed { backend } => self.closed(backend),
                BalancerMsg::Snapshot { reply } => {
                    let _ = reply.send(self.snapshot());
                }
                BalancerMsg::Egress { reply } => {
                    let _ = reply.send(self.egress);
                }
            }
        }
        log::debug!(actor = "balancer"; "stopped, no handles left");
    }

    /// Round robin: the first backend at or after the cursor that this session has not tried.
    fn pick(&mut self, tried: &[BackendId]) -> Option<Pick> {
        let n = self.entries.len();
        let index = (0..n)
            .map(|step| (self.cursor + step) % n)
            .find(|i| !tried.contains(&BackendId(*i)))?;
        self.cursor = (index + 1) % n;
        let backend = &self.entries[index].backend;
        Some(Pick {
            backend: BackendId(index),
            addr: backend.addr,
            egress: backend.egress,
        })
    }

    fn connected(&mut self, id: BackendId, ok: bool) {
        let Some(entry) = self.entries.get_mut(id.0) else {
            return;
        };
        if ok {
            entry.active += 1;
            entry.sessions += 1;
            entry.failing = 0;
        } else {
            entry.connect_failures += 1;
            entry.failing += 1;
        }
    }

    fn closed(&mut self, id: BackendId) {
        if let Some(entry) = self.entries.get_mut(id.0) {
            entry.active = entry.active.saturating_sub(1);
        }
    }

    fn snapshot(&self) -> Vec<BackendSnapshot> {
        self.entries
            .iter()
            .map(|e| BackendSnapshot {
                addr: e.backend.addr,
                active: e.active,
                sessions: e.sessions,
                connect_failures: e.connect_failures,
                failing: e.failing,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backends(n: usize) -> Vec<Backend> {
        (0..n)
            .map(|i| Backend {
                addr: SocketAddr::from(([127, 0, 0, 1], 1000 + i as u16)),
                egress: EgressId(0),
            })
            .collect()
    }

    #[test]
    fn round_robin_visits_backends_in_order() {
        let mut b = Balancer::new(&backends(3), EgressId(0));
        let order: Vec<usize> = (0..7).map(|_| b.pick(&[]).unwrap().backend.0).collect();
        assert_eq!(order, [0, 1, 2, 0, 1, 2, 0]);
    }

    #[test]
    fn a_retry_skips_what_the_session_tried_and_ends_when_all_were() {
        let mut b = Balancer::new(&backends(3), EgressId(0));
        assert_eq!(b.pick(&[]).unwrap().backend, BackendId(0));
        // Another session moved the cursor on to 2; our retry must not land on 0 again.
        assert_eq!(b.pick(&[]).unwrap().backend, BackendId(1));
        let tried = [BackendId(0), BackendId(2)];
        assert_eq!(b.pick(&tried).unwrap().backend, BackendId(1));
        let all = [BackendId(0), BackendId(1), BackendId(2)];
        assert_eq!(b.pick(&all), None);
    }

    #[test]
    fn the_actor_counts_outcomes_and_answers_snapshots() {
        let (handle, task) = BalancerHandle::spawn(&backends(2), EgressId(0), 8);
        let snapshot = rt::block_on(async move {
            let first = handle.pick(&[]).await.unwrap().unwrap();
            handle.connected(first.backend, false).await.unwrap();
            let second = handle.pick(&[first.backend]).await.unwrap().unwrap();
            handle.connected(second.backend, true).await.unwrap();
            let open = handle.snapshot().await.unwrap();
            handle.closed(second.backend).await.unwrap();
            let after = handle.snapshot().await.unwrap();
            drop(handle);
            task.await;
            (open, after)
        });
        let (open, after) = snapshot;
        assert_eq!((open[0].connect_failures, open[0].failing, open[0].active), (1, 1, 0));
        assert_eq!((open[1].active, open[1].sessions), (1, 1));
        assert_eq!((after[1].active, after[1].sessions), (0, 1));
    }
}
