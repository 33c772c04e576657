//! The process's file-descriptor budget: raised to the hard limit at start, as HAProxy and
//! nginx do, and turned into a cap on live sessions so that relayd only accepts what it can
//! serve. Past the cap, listeners stop accepting (the kernel's backlog holds the clients) until
//! sessions end; a reserve stays free for the status page, health checks and the runtime.

use std::io;

/// Descriptors kept out of the session budget (a quarter of the limit, within these bounds):
/// listeners, the status page and its clients, health checks, DNS, rtnetlink, the runtime's.
pub const RESERVE_MIN: u64 = 24;
pub const RESERVE_MAX: u64 = 64;
/// Descriptors each worker past the first adds to the reserve: its epoll and eventfd, and its
/// member of each listening group with the copy the relay holds (two routes' worth), which a
/// quarter of a small limit would not cover.
pub const RESERVE_PER_WORKER: u64 = 6;
/// Descriptors one session may hold: its client and its upstream (splice pipes are extra, and
/// fall back to copying when none can be had).
pub const PER_SESSION: u64 = 2;

/// The soft and hard RLIMIT_NOFILE.
pub fn nofile() -> io::Result<(u64, u64)> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit fills the struct it is given.
    crate::rt::check(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) })?;
    Ok((limit.rlim_cur, limit.rlim_max))
}

/// Raises the soft limit to the hard one; returns the limit now in force.
pub fn raise_nofile() -> io::Result<u64> {
    let (soft, hard) = nofile()?;
    if soft < hard {
        let limit = libc::rlimit {
            rlim_cur: hard,
            rlim_max: hard,
        };
        // SAFETY: setrlimit reads the struct it is given.
        crate::rt::check(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) })?;
    }
    Ok(nofile()?.0)
}

/// Live sessions (TCP connections and UDP flows) the descriptor limit `soft` can serve, with
/// `workers` event loops.
pub fn session_cap(soft: u64, workers: usize) -> u64 {
    let extra = RESERVE_PER_WORKER.saturating_mul(workers.saturating_sub(1) as u64);
    let reserve = (soft / 4).clamp(RESERVE_MIN, RESERVE_MAX).saturating_add(extra);
    (soft.saturating_sub(reserve) / PER_SESSION).max(1)
}

/// The relay's session cap, read again whenever the process runs short of descriptors (the
/// limit may have been lowered under it, with prlimit).
#[derive(Debug)]
pub struct Budget {
    cap: std::sync::atomic::AtomicU64,
    /// Sessions still reading what comes before their relay (a PROXY header, a ClientHello, a
    /// CONNECT head): at most half the cap, so that slow or silent clients cannot hold every
    /// place the descriptors allow.
    preludes: std::sync::atomic::AtomicU64,
}

/// A session's place among those still in their prelude; dropping it gives it back.
pub struct PreludePass(std::sync::Arc<Budget>);

impl Drop for PreludePass {
    fn drop(&mut self) {
        self.0.preludes.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

impl Budget {
    pub fn new() -> Self {
        let budget = Budget {
            cap: std::sync::atomic::AtomicU64::new(0),
            preludes: std::sync::atomic::AtomicU64::new(0),
        };
        budget.refresh();
        budget
    }

    /// The most sessions that may be in their prelude at once.
    pub fn prelude_cap(&self) -> u64 {
        (self.cap() / 2).max(1)
    }

    /// A place for one more session in its prelude, while fewer than half the cap are.
    pub fn enter_prelude(self: &std::sync::Arc<Self>) -> Option<PreludePass> {
        use std::sync::atomic::Ordering::AcqRel;
        let cap = self.prelude_cap();
        (self.preludes)
            .fetch_update(AcqRel, std::sync::atomic::Ordering::Acquire, |n| {
                (n < cap).then_some(n + 1)
            })
            .ok()
            .map(|_| PreludePass(self.clone()))
    }

    pub fn cap(&self) -> u64 {
        self.cap.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Reads the limit again; returns the cap it sets.
    pub fn refresh(&self) -> u64 {
        let cap = session_cap(nofile().map_or(1024, |(soft, _)| soft), crate::rt::worker_count());
        self.cap.store(cap, std::sync::atomic::Ordering::Relaxed);
        cap
    }
}

impl Default for Budget {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_most_half_the_session_budget_reads_its_prelude_at_once() {
        let budget = std::sync::Arc::new(Budget {
            cap: std::sync::atomic::AtomicU64::new(8),
            preludes: Default::default(),
        });
        let passes: Vec<PreludePass> = (0..4).map(|_| budget.enter_prelude().expect("room")).collect();
        assert!(budget.enter_prelude().is_none(), "half of 8 are in their prelude");
        drop(passes);
        assert!(budget.enter_prelude().is_some(), "their places come back");
        budget.cap.store(1, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(budget.prelude_cap(), 1, "never none at all");
    }

    #[test]
    fn the_cap_leaves_the_reserve_and_never_reaches_zero() {
        assert_eq!(session_cap(1024, 1), (1024 - 64) / 2);
        assert_eq!(session_cap(64, 1), (64 - 24) / 2);
        assert_eq!(session_cap(64, 2), (64 - 24 - 6) / 2);
        assert_eq!(session_cap(0, 1), 1);
        assert_eq!(session_cap(u64::MAX, 1), (u64::MAX - 64) / 2);
        assert_eq!(session_cap(u64::MAX, usize::MAX), 1);
    }
}

/// A cap on live sessions (a route's `max_connections`, or the relay's), with a bounded wait
/// for room: HAProxy's maxconn and `timeout queue`. At most `max` sessions hold a pass; up to
/// `max` more may wait for one, each for at most its wait, and the rest are turned away.
#[derive(Debug)]
pub struct Gate {
    /// Set anew by a reload: passes held beyond a lowered max stay valid until they go.
    max: std::sync::atomic::AtomicU64,
    live: std::sync::atomic::AtomicU64,
    waiting: std::sync::atomic::AtomicU64,
    freed: event_listener::Event,
}

/// Held by a session while it counts against a [`Gate`]; dropping it makes room.
#[derive(Debug)]
pub struct Pass(std::sync::Arc<Gate>);

impl Drop for Pass {
    fn drop(&mut self) {
        self.0.live.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
        self.0.freed.notify(1);
    }
}

impl Gate {
    pub fn new(max: u64) -> std::sync::Arc<Gate> {
        std::sync::Arc::new(Gate {
            max: max.into(),
            live: Default::default(),
            waiting: Default::default(),
            freed: event_listener::Event::new(),
        })
    }

    pub fn max(&self) -> u64 {
        self.max.load(std::sync::atomic::Ordering::Acquire)
    }

    /// A reload's new max; a raised one lets waiters in at once.
    pub fn set_max(&self, max: u64) {
        self.max.store(max, std::sync::atomic::Ordering::Release);
        self.freed.notify(usize::MAX);
    }

    /// A pass now, if there is room.
    pub fn try_enter(self: &std::sync::Arc<Self>) -> Option<Pass> {
        use std::sync::atomic::Ordering::AcqRel;
        let taken = self
            .live
            .fetch_update(AcqRel, std::sync::atomic::Ordering::Acquire, |n| {
                (n < self.max()).then_some(n + 1)
            });
        taken.ok().map(|_| Pass(self.clone()))
    }

    /// A pass, waiting up to `wait` for room; `None` when the wait ran out or the queue was
    /// full.
    pub async fn enter(self: &std::sync::Arc<Self>, wait: std::time::Duration) -> Option<Pass> {
        use std::sync::atomic::Ordering::AcqRel;
        if let Some(pass) = self.try_enter() {
            return Some(pass);
        }
        if self.waiting.fetch_add(1, AcqRel) >= self.max() {
            self.waiting.fetch_sub(1, AcqRel);
            return None;
        }
        let pass = crate::rt::timeout(wait, async {
            loop {
                event_listener::listener!(self.freed => freed);
                if let Some(pass) = self.try_enter() {
                    return pass;
                }
                freed.await;
            }
        })
        .await;
        self.waiting.fetch_sub(1, AcqRel);
        pass
    }
}

#[cfg(test)]
mod gate_tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_gate_lets_max_in_queues_max_more_and_wakes_a_waiter_when_a_pass_goes() {
        let gate = Gate::new(2);
        let (a, b) = (gate.try_enter().unwrap(), gate.try_enter().unwrap());
        assert!(gate.try_enter().is_none(), "full");
        let timed_out = crate::rt::block_on(gate.enter(Duration::from_millis(20)));
        assert!(timed_out.is_none(), "no room within the wait");
        let waiter = {
            let gate = gate.clone();
            crate::rt::spawn(async move { gate.enter(Duration::from_secs(20)).await.is_some() })
        };
        drop(a);
        assert!(crate::rt::block_on(waiter), "a freed pass goes to the waiter");
        drop(b);
    }
}

/// A route's limits on each client address (HAProxy's stick-table `conn_cur` and `conn_rate`,
/// nginx's `limit_conn`): connections live at once, and new connections a second as a token
/// bucket that holds `burst` and refills `per_second`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientLimits {
    pub max_connections: Option<std::num::NonZeroU32>,
    pub per_second: Option<std::num::NonZeroU32>,
    pub burst: u32,
}

/// Why a client was refused by its route's [`ClientLimits`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OverLimit {
    /// It has this many connections live, the most it may.
    Connections(u32),
    /// It opened connections faster than this many a second (past its burst).
    Rate(u32),
}

impl std::fmt::Display for OverLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OverLimit::Connections(n) => write!(f, "{n} connections live, the most per_client allows"),
            OverLimit::Rate(n) => write!(f, "more than {n} new connections a second (per_client)"),
        }
    }
}

/// One client's standing under [`PerClient`].
struct Standing {
    live: u32,
    tokens: f64,
    at: std::time::Instant,
}

impl Standing {
    /// The bucket refilled up to now.
    fn refill(&mut self, limits: &ClientLimits, now: std::time::Instant) {
        if let Some(rate) = limits.per_second {
            let gained = now.saturating_duration_since(self.at).as_secs_f64() * f64::from(rate.get());
            self.tokens = (self.tokens + gained).min(f64::from(limits.burst));
        }
        self.at = now;
    }

    /// Nothing live and a full bucket: the same as no entry at all.
    fn idle(&self, limits: &ClientLimits) -> bool {
        self.live == 0 && (limits.per_second.is_none() || self.tokens >= f64::from(limits.burst))
    }
}

/// Entries past this many are swept of idle ones before another is added: the table stays
/// bounded by the clients that are live or were busy within a bucket's refill time.
const SWEEP_PAST: usize = 1 << 16;

/// The per-client table of a route, kept across reloads (a reload changes its limits; the
/// connections live under it stay counted). One lock, taken once as a connection starts and
/// once as it ends.
pub struct PerClient {
    state: std::sync::Mutex<(
        Option<ClientLimits>,
        std::collections::HashMap<std::net::IpAddr, Standing>,
    )>,
}

/// A connection's place in its client's count; dropping it gives the place back.
pub struct ClientPass(Option<Box<(std::sync::Arc<PerClient>, std::net::IpAddr)>>);

impl ClientPass {
    /// The place of a connection on a route without per-client limits: nothing to count.
    pub fn unlimited() -> ClientPass {
        ClientPass(None)
    }
}

impl PerClient {
    pub fn new(limits: Option<ClientLimits>) -> std::sync::Arc<PerClient> {
        std::sync::Arc::new(PerClient {
            state: std::sync::Mutex::new((limits, Default::default())),
        })
    }

    pub fn set_limits(&self, limits: Option<ClientLimits>) {
        self.lock().0 = limits;
    }

    fn lock(
        &self,
    ) -> std::sync::MutexGuard<
        '_,
        (
            Option<ClientLimits>,
            std::collections::HashMap<std::net::IpAddr, Standing>,
        ),
    > {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A place for a new connection of `client` (an IPv4-mapped address counts as IPv4), or
    /// why there is none.
    pub fn admit(self: &std::sync::Arc<Self>, client: std::net::IpAddr) -> Result<ClientPass, OverLimit> {
        let client = client.to_canonical();
        let mut state = self.lock();
        let (Some(limits), clients) = &mut *state else {
            return Ok(ClientPass(None));
        };
        let now = std::time::Instant::now();
        if clients.len() >= SWEEP_PAST && !clients.contains_key(&client) {
            clients.retain(|_, s| {
                s.refill(limits, now);
                !s.idle(limits)
            });
        }
        let standing = clients.entry(client).or_insert(Standing {
            live: 0,
            tokens: f64::from(limits.burst),
            at: now,
        });
        standing.refill(limits, now);
        if let Some(max) = limits.max_connections {
            if standing.live >= max.get() {
                return Err(OverLimit::Connections(standing.live));
            }
        }
        if let Some(rate) = limits.per_second {
            if standing.tokens < 1.0 {
                return Err(OverLimit::Rate(rate.get()));
            }
            standing.tokens -= 1.0;
        }
        standing.live += 1;
        Ok(ClientPass(Some(Box::new((self.clone(), client)))))
    }
}

impl Drop for ClientPass {
    fn drop(&mut self) {
        let Some(held) = self.0.take() else { return };
        let (table, client) = *held;
        let mut state = table.lock();
        let (limits, clients) = &mut *state;
        if let Some(standing) = clients.get_mut(&client) {
            standing.live = standing.live.saturating_sub(1);
            let gone = limits.as_ref().is_none_or(|l| {
                standing.refill(l, std::time::Instant::now());
                standing.idle(l)
            });
            if gone {
                clients.remove(&client);
            }
        }
    }
}

#[cfg(test)]
mod per_client_tests {
    use super::*;
    use std::num::NonZeroU32;

    #[test]
    fn a_client_gets_its_max_connections_and_its_burst_and_no_more() {
        let limits = ClientLimits {
            max_connections: NonZeroU32::new(2),
            per_second: None,
            burst: 0,
        };
        let table = PerClient::new(Some(limits));
        let (a, b) = ("192.0.2.1".parse().unwrap(), "192.0.2.2".parse().unwrap());
        let first = table.admit(a).unwrap();
        let _second = table.admit(a).unwrap();
        assert_eq!(table.admit(a).err(), Some(OverLimit::Connections(2)));
        assert!(table.admit(b).is_ok(), "another client has its own count");
        let mapped: std::net::IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        assert!(
            table.admit(mapped).is_err(),
            "an IPv4-mapped address is the same client"
        );
        drop(first);
        assert!(table.admit(a).is_ok(), "a place given back is taken again");

        let rate = ClientLimits {
            max_connections: None,
            per_second: NonZeroU32::new(1),
            burst: 3,
        };
        let table = PerClient::new(Some(rate));
        for _ in 0..3 {
            drop(table.admit(a).unwrap());
        }
        assert_eq!(
            table.admit(a).err(),
            Some(OverLimit::Rate(1)),
            "past the burst, within the second"
        );
        assert!(table.admit(b).is_ok());
        table.set_limits(None);
        assert!(
            table.admit(a).is_ok(),
            "a reload that lifts the limits lifts them at once"
        );
    }

    #[test]
    fn the_table_forgets_a_client_with_nothing_live_and_a_full_bucket() {
        let limits = ClientLimits {
            max_connections: NonZeroU32::new(5),
            per_second: None,
            burst: 0,
        };
        let table = PerClient::new(Some(limits));
        let pass = table.admit("192.0.2.1".parse().unwrap()).unwrap();
        assert_eq!(table.lock().1.len(), 1);
        drop(pass);
        assert_eq!(table.lock().1.len(), 0, "no entry left behind");
    }
}
