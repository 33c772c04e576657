//! One egress's standing as the Dialer keeps it: the kernel's verdict, and what dials showed
//! (a device or source that cannot be bound, connects that time out towards several targets
//! while another egress connects). Dial evidence takes the egress out until a trial, later
//! each time it is found wanting again; the kernel's verdict lasts until the kernel changes it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::shutdown::{self, Signal, Trigger};

/// Timeouts towards this many distinct targets make an egress suspect.
pub(super) const SUSPECT_AFTER: usize = 2;
/// The first trial after dial evidence; each later one waits twice as long, up to the cap.
const TRIAL_FIRST: Duration = Duration::from_secs(1);
const TRIAL_MAX: Duration = Duration::from_secs(60);
/// Distinct timed-out targets remembered while weighing an egress.
const TIMEOUTS_KEPT: usize = 16;

pub(super) struct Standing {
    /// The kernel's reason it is unusable.
    pub kernel: Option<Arc<str>>,
    /// What dials showed, and when it is tried again.
    evidence: Option<(Arc<str>, Instant)>,
    /// Takings-out by dial evidence in a row, for the growing wait before a trial.
    ejections: u32,
    /// Distinct targets whose connects timed out since the last success, and since when.
    timeouts: Vec<SocketAddr>,
    timeouts_since: Option<Instant>,
    pub last_success: Option<Instant>,
    /// Fired (and replaced) when the egress goes down: its dials in flight and its live UDP
    /// flows hold the signal.
    lost: (Trigger, Signal),
    /// What the balancers were last told: `Some(why)` down.
    told: Option<Arc<str>>,
}

impl Standing {
    pub fn new() -> Self {
        Standing {
            kernel: None,
            evidence: None,
            ejections: 0,
            timeouts: Vec::new(),
            timeouts_since: None,
            last_success: None,
            lost: shutdown::signal(),
            told: None,
        }
    }

    /// Drops every verdict and all evidence (the egress was redefined). The lost signal stays:
    /// what the old definition made is not cut by the change.
    pub fn forget(&mut self) {
        let lost = std::mem::replace(&mut self.lost, shutdown::signal());
        let told = self.told.take();
        *self = Standing {
            lost,
            told,
            ..Standing::new()
        };
    }

    /// Why the egress is unusable now, if it is.
    pub fn down(&self) -> Option<&Arc<str>> {
        self.kernel.as_ref().or(self.evidence.as_ref().map(|(why, _)| why))
    }

    pub fn lost(&self) -> Signal {
        self.lost.1.clone()
    }

    pub fn trial_at(&self) -> Option<Instant> {
        self.evidence.as_ref().map(|(_, at)| *at)
    }

    /// Successes are worth hearing of: timeouts are being weighed, or a trial is on.
    pub fn weighing(&self) -> bool {
        !self.timeouts.is_empty() || self.ejections > 0
    }

    /// Dials showed the egress unusable: out until a trial.
    pub fn failed(&mut self, why: String, now: Instant) {
        self.ejections += 1;
        let wait = TRIAL_FIRST.saturating_mul(2u32.saturating_pow(self.ejections - 1).min(1 << 10));
        self.evidence = Some((why.into(), now + wait.min(TRIAL_MAX)));
        self.timeouts.clear();
        self.timeouts_since = None;
    }

    pub fn connected(&mut self, now: Instant) {
        self.last_success = Some(now);
        self.timeouts.clear();
        self.timeouts_since = None;
        if self.evidence.is_none() {
            self.ejections = 0;
        }
    }

    /// A connect to `target` timed out; returns how many distinct targets have since the last
    /// success.
    pub fn timed_out(&mut self, target: SocketAddr, now: Instant) -> usize {
        if !self.timeouts.contains(&target) && self.timeouts.len() < TIMEOUTS_KEPT {
            self.timeouts.push(target);
        }
        self.timeouts_since.get_or_insert(now);
        self.timeouts.len()
    }

    pub fn timeouts_since(&self) -> Option<Instant> {
        self.timeouts_since
    }

    /// Lets the egress back in on trial once its wait is over; true when it was let in.
    pub fn trial(&mut self, now: Instant) -> bool {
        let due = self.trial_at().is_some_and(|at| at <= now);
        if due {
            self.evidence = None;
        }
        due
    }

    /// The news for the balancers when the egress went down or came back: `Some(Some(why))`
    /// down, `Some(None)` up, `None` no change. Going down fires the lost signal.
    pub fn change(&mut self) -> Option<Option<Arc<str>>> {
        let down = self.down().cloned();
        if down.is_some() == self.told.is_some() {
            return None;
        }
        if down.is_some() {
            // Dropping the old trigger fires every signal handed out with it.
            drop(std::mem::replace(&mut self.lost, shutdown::signal()));
        }
        self.told = down.clone();
        Some(down)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dial_evidence_takes_an_egress_out_until_a_trial_that_waits_longer_each_time() {
        let (mut s, t0) = (Standing::new(), Instant::now());
        let lost = s.lost();
        s.failed("cannot bind to device up1".into(), t0);
        assert_eq!(s.change(), Some(Some("cannot bind to device up1".into())));
        assert!(
            crate::rt::block_on(lost.unless(std::future::pending::<()>())).is_none(),
            "fired"
        );
        assert_eq!(s.trial_at(), Some(t0 + TRIAL_FIRST));
        assert!(!s.trial(t0) && s.trial(t0 + TRIAL_FIRST));
        assert_eq!(s.change(), Some(None), "back on trial");
        s.failed("again".into(), t0);
        assert_eq!(s.trial_at(), Some(t0 + 2 * TRIAL_FIRST), "twice as long");
        s.kernel = Some("carrier lost on up1".into());
        assert!(s.trial(t0 + TRIAL_MAX));
        assert_eq!(
            s.down().map(|w| &**w),
            Some("carrier lost on up1"),
            "the kernel's word stays"
        );
    }

    #[test]
    fn timeouts_count_distinct_targets_until_a_success() {
        let (mut s, t0) = (Standing::new(), Instant::now());
        let a: SocketAddr = "198.18.9.1:80".parse().unwrap();
        assert_eq!(s.timed_out(a, t0), 1);
        assert_eq!(s.timed_out(a, t0), 1, "the same target again");
        assert_eq!(s.timed_out("198.18.9.2:80".parse().unwrap(), t0), 2);
        assert!(s.weighing());
        s.connected(t0);
        assert!(!s.weighing() && s.timeouts_since().is_none());
    }
}
