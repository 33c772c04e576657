//! Health as one Balancer sees it: of its backends (failed connects and active checks) and of
//! the egresses they leave by (the Dialer's word, relay-wide: no route judges an egress alone).

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{BackendId, Balancer};
use crate::config::EgressId;
use crate::error::Fault;

use crate::config::Health;

/// A backend's or an egress's standing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Up,
    /// Out. `until`: back on trial after it (a cool-down); `None`: only passed checks bring it back.
    Down {
        until: Option<Instant>,
    },
}

/// A change worth one log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Change {
    Down { why: String, cooldown: Option<Duration> },
    Up { why: &'static str },
}

/// The cool-down after the `ejections`-th ejection in a row: doubling, up to the cap.
fn cooldown(h: &Health, ejections: u32) -> Duration {
    let doublings = ejections.saturating_sub(1).min(20);
    h.cooldown.saturating_mul(2u32.pow(doublings)).min(h.cooldown_max)
}

#[derive(Debug, Clone)]
pub(super) struct BackendHealth {
    state: State,
    /// Failed connects or checks in a row.
    failing: u32,
    /// Passed checks in a row.
    passing: u32,
    /// Ejections in a row, for the growing cool-down.
    ejections: u32,
    /// Times it was taken out (by connects or checks), ever: a counter for the metrics.
    downs: u64,
}

impl BackendHealth {
    pub fn new() -> Self {
        BackendHealth {
            state: State::Up,
            failing: 0,
            passing: 0,
            ejections: 0,
            downs: 0,
        }
    }

    /// Up, or out but with its cool-down over (on trial: the next outcome decides).
    pub fn usable(&self, now: Instant) -> bool {
        match self.state {
            State::Up => true,
            State::Down { until } => until.is_some_and(|t| now >= t),
        }
    }

    pub fn is_up(&self) -> bool {
        self.state == State::Up
    }

    /// Out, its cool-down over: the next outcome decides.
    pub fn on_trial(&self, now: Instant) -> bool {
        !self.is_up() && self.usable(now)
    }

    pub fn downs(&self) -> u64 {
        self.downs
    }

    pub fn failing(&self) -> u32 {
        self.failing
    }

    /// A connect that succeeds would change something: failures in a row to forget, a
    /// cool-down to end, or a trial to pass.
    pub fn success_is_news(&self) -> bool {
        self.failing > 0 || self.ejections > 0 || self.state != State::Up
    }

    /// A session's connect to this backend (or a UDP flow's first answer) succeeded, or
    /// failed through the backend's fault and why.
    pub fn connected(&mut self, outcome: Result<(), &str>, now: Instant, h: &Health) -> Option<Change> {
        let Err(last) = outcome else {
            self.failing = 0;
            self.ejections = 0;
            return self.up("a connect succeeded");
        };
        self.failing = self.failing.saturating_add(1);
        self.passing = 0;
        // Up and over the limit, or on trial after a cool-down: out (again, for longer).
        (self.failing >= h.fall && self.usable(now)).then(|| self.eject(now, h, last))
    }

    /// An active check passed, or failed and why.
    pub fn checked(&mut self, verdict: Result<(), &str>, h: &Health) -> Option<Change> {
        let rise = h.check.as_ref().map_or(1, |c| c.rise);
        if verdict.is_ok() {
            self.failing = 0;
            self.passing += 1;
            if self.passing >= rise {
                self.ejections = 0;
                return self.up("checks passed");
            }
            return None;
        }
        self.passing = 0;
        self.failing = self.failing.saturating_add(1);
        if self.failing >= h.fall && self.state == State::Up {
            self.state = State::Down { until: None };
            self.downs += 1;
            let last = verdict.err().unwrap_or_default();
            return Some(Change::Down {
                why: format!("{} checks failed, the last: {last}", self.failing),
                cooldown: None,
            });
        }
        None
    }

    /// The route no longer checks: a backend only checks could bring back comes back now.
    pub fn checks_ended(&mut self) -> Option<Change> {
        match self.state {
            State::Down { until: None } => {
                self.failing = 0;
                self.up("the route no longer checks it")
            }
            _ => None,
        }
    }

    fn eject(&mut self, now: Instant, h: &Health, last: &str) -> Change {
        self.ejections = self.ejections.saturating_add(1);
        self.downs += 1;
        let cooldown = cooldown(h, self.ejections);
        self.state = State::Down {
            until: now.checked_add(cooldown),
        };
        Change::Down {
            why: format!("{} connects failed, the last: {last}", self.failing),
            cooldown: Some(cooldown),
        }
    }

    fn up(&mut self, why: &'static str) -> Option<Change> {
        let was_down = self.state != State::Up;
        self.state = State::Up;
        was_down.then_some(Change::Up { why })
    }
}

/// An egress's standing in this balancer: the Dialer's newest word.
#[derive(Debug, Clone, Default)]
pub(super) struct EgressHealth {
    /// Why it is down, if it is.
    pub down: Option<Arc<str>>,
    /// The newest word's number, so that an older one arriving late changes nothing.
    seq: u64,
}

impl EgressHealth {
    /// The Dialer's word on this egress, numbered; true when it changed something.
    pub fn heard(&mut self, down: Option<Arc<str>>, seq: u64) -> bool {
        if seq <= self.seq {
            return false;
        }
        self.seq = seq;
        let changed = self.down.is_some() != down.is_some();
        self.down = down;
        changed
    }
}

/// What sessions, checks and the Dialer tell the balancer about health.
impl Balancer {
    /// How a picked pair's dial ended. The pick counted the session already; a failure takes
    /// it back. Only the backend's own faults and successes judge the backend; the Dialer
    /// judges egresses, and a path fault is nobody's.
    pub(super) fn connected(&mut self, id: BackendId, outcome: Result<(), (Fault, String)>) {
        if outcome.is_err() {
            self.unpicked(id);
        }
        self.judged(id, outcome);
    }

    /// This shard's backend `id`, or the one at `addr` when another shard's word names a
    /// backend by an id this one gave another (resolution and reloads met in another order).
    pub(super) fn known(&self, id: BackendId, addr: std::net::SocketAddr) -> Option<BackendId> {
        let by_id = self.entries.iter().find(|e| e.id == id && e.addr == addr);
        let by_addr = || (self.entries.iter().filter(|e| e.addr == addr)).min_by_key(|e| e.retired);
        by_id.or_else(by_addr).map(|e| e.id)
    }

    /// What a dial's outcome says of the backend's health (another shard's session's too).
    pub(super) fn judged(&mut self, id: BackendId, outcome: Result<(), (Fault, String)>) {
        let now = Instant::now();
        let outcome = match &outcome {
            Ok(()) => Ok(()),
            Err((Fault::Backend, why)) => Err(why.as_str()),
            Err(_) => return,
        };
        // Disjoint borrows of entries and health: nothing is cloned per connection.
        let Some(entry) = self.entries.iter_mut().find(|e| e.id == id) else {
            return;
        };
        if outcome.is_err() {
            entry.connect_failures += 1;
        }
        let change = entry.health.connected(outcome, now, &self.health);
        self.report(id, change);
    }

    /// Takes back what a pick counted for a session that never opened.
    fn unpicked(&mut self, id: BackendId) {
        if let Some(entry) = self.entries.iter_mut().find(|e| e.id == id) {
            entry.sessions = entry.sessions.saturating_sub(1);
        }
        self.closed(id);
    }

    pub(super) fn closed(&mut self, id: BackendId) {
        let Some(entry) = self.entries.iter_mut().find(|e| e.id == id) else {
            return;
        };
        entry.active = entry.active.saturating_sub(1);
        if entry.retired && entry.active == 0 {
            self.entries.retain(|e| e.id != id);
        }
    }

    pub(super) fn checked(&mut self, id: BackendId, verdict: Result<(), String>) {
        let Some(entry) = self.entries.iter_mut().find(|e| e.id == id) else {
            return;
        };
        entry.checks[usize::from(verdict.is_err())] += 1;
        let change = entry
            .health
            .checked(verdict.as_ref().map(drop).map_err(String::as_str), &self.health);
        self.report(id, change);
    }

    /// One log line per change of a backend's standing.
    pub(super) fn report(&self, id: BackendId, change: Option<Change>) {
        let Some(change) = change.filter(|_| self.voice) else {
            return;
        };
        let Some(entry) = self.entries.iter().find(|e| e.id == id) else {
            return;
        };
        match change {
            Change::Down { why, cooldown } => {
                let cooldown_ms = cooldown.map_or(0, |c| c.as_millis() as u64);
                log::warn!(route = &*self.route, backend:% = entry.addr, why = why.as_str(), cooldown_ms = cooldown_ms; "backend down");
            }
            Change::Up { why } => log::info!(route = &*self.route, backend:% = entry.addr, why = why; "backend up"),
        }
        self.stats.health_changed();
    }

    pub(super) fn egress_news(&mut self, egress: EgressId, down: Option<Arc<str>>, seq: u64) {
        let up = down.is_none();
        let changed = self.egresses.get_mut(egress.0).is_some_and(|e| e.heard(down, seq));
        self.egress_report(egress, changed, up);
    }

    /// The Dialer logs egress changes once for the relay; each route notes them at debug.
    pub(super) fn egress_report(&self, egress: EgressId, changed: bool, up: bool) {
        if changed && self.voice {
            let name = self.egress_names.get(egress.0).map_or("?", |n| &**n);
            log::debug!(route = &*self.route, egress = name, up = up; "egress standing changed");
            self.stats.health_changed();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Check;

    fn health(check: bool) -> Health {
        Health {
            fall: 2,
            cooldown: Duration::from_secs(1),
            cooldown_max: Duration::from_secs(3),
            check: check.then(|| Check {
                preface: Vec::new(),
                interval: Duration::from_secs(1),
                timeout: Duration::from_secs(1),
                rise: 2,
                send: None,
                expect: None,
            }),
            reply_timeout: None,
        }
    }

    #[test]
    fn failed_connects_eject_for_a_growing_cooldown_and_a_success_restores() {
        let (h, t0) = (health(false), Instant::now());
        let mut b = BackendHealth::new();
        assert_eq!(b.connected(Err("refused"), t0, &h), None, "one failure is not enough");
        let down = b.connected(Err("refused"), t0, &h);
        assert_eq!(
            down,
            Some(Change::Down {
                why: "2 connects failed, the last: refused".into(),
                cooldown: Some(Duration::from_secs(1))
            })
        );
        assert!(!b.usable(t0) && b.usable(t0 + Duration::from_secs(1)));
        // On trial after the cool-down, another failure ejects it for twice as long, then the cap.
        let later = t0 + Duration::from_secs(1);
        assert!(
            matches!(b.connected(Err("refused"), later, &h), Some(Change::Down { cooldown: Some(d), .. }) if d == Duration::from_secs(2))
        );
        let later = later + Duration::from_secs(2);
        assert!(
            matches!(b.connected(Err("refused"), later, &h), Some(Change::Down { cooldown: Some(d), .. }) if d == Duration::from_secs(3))
        );
        assert_eq!(
            b.connected(Ok(()), later + Duration::from_secs(3), &h),
            Some(Change::Up {
                why: "a connect succeeded"
            })
        );
        assert!(b.is_up() && b.failing() == 0);
    }

    #[test]
    fn checks_take_a_backend_out_after_fall_and_back_after_rise() {
        let h = health(true);
        let mut b = BackendHealth::new();
        assert_eq!(b.checked(Err("timed out"), &h), None);
        assert_eq!(
            b.checked(Err(r#"expected "+PONG", got "-ERR""#), &h),
            Some(Change::Down {
                why: r#"2 checks failed, the last: expected "+PONG", got "-ERR""#.into(),
                cooldown: None
            })
        );
        assert!(
            !b.usable(Instant::now() + Duration::from_secs(3600)),
            "only checks bring it back"
        );
        assert_eq!(b.checked(Ok(()), &h), None);
        assert_eq!(b.checked(Ok(()), &h), Some(Change::Up { why: "checks passed" }));
    }

    #[test]
    fn an_egress_follows_the_newest_word_only() {
        let mut e = EgressHealth::default();
        assert!(e.heard(Some("carrier lost on up1".into()), 2));
        assert!(e.down.is_some());
        assert!(!e.heard(None, 1), "older news changes nothing");
        assert!(e.heard(None, 3));
        assert!(e.down.is_none());
    }

    #[test]
    fn a_cooldown_at_the_edge_of_the_clock_does_not_panic() {
        let h = Health {
            cooldown: Duration::MAX,
            cooldown_max: Duration::MAX,
            fall: 1,
            check: None,
            reply_timeout: None,
        };
        let mut b = BackendHealth::new();
        assert!(b.connected(Err("refused"), Instant::now(), &h).is_some());
        assert!(!b.usable(Instant::now()), "out for good, not a panic");
    }
}
