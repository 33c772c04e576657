//! Relay-wide counters for observation: plain atomics (counts, not balancing state) plus an
//! event, so a test or an embedder can wait for a count to reach a value instead of polling.

use std::sync::atomic::{AtomicU64, Ordering};

use event_listener::Event;

#[derive(Debug, Default)]
pub struct Stats {
    opened: AtomicU64,
    active: AtomicU64,
    forced: AtomicU64,
    udp_over_limit: AtomicU64,
    udp_dropped: AtomicU64,
    no_backend: AtomicU64,
    health_changes: AtomicU64,
    spliced: AtomicU64,
    copied: AtomicU64,
    splice_fallbacks: AtomicU64,
    changed: Event,
}

impl Stats {
    /// Sessions (TCP connections and UDP flows) opened so far; also the next session's id.
    pub fn total(&self) -> u64 {
        self.opened.load(Ordering::Relaxed)
    }

    /// Sessions live now.
    pub fn active(&self) -> u64 {
        self.active.load(Ordering::Relaxed)
    }

    /// Sessions closed by the relay because they outlived the drain deadline.
    pub fn forced(&self) -> u64 {
        self.forced.load(Ordering::Relaxed)
    }

    /// UDP datagrams dropped because they would have opened a flow beyond `max_flows`.
    pub fn udp_over_limit(&self) -> u64 {
        self.udp_over_limit.load(Ordering::Relaxed)
    }

    /// UDP datagrams dropped because a flow's queue or the client's socket buffer was full.
    pub fn udp_dropped(&self) -> u64 {
        self.udp_dropped.load(Ordering::Relaxed)
    }

    /// Sessions closed at once because no backend (or no egress) was up or reachable.
    pub fn no_backend(&self) -> u64 {
        self.no_backend.load(Ordering::Relaxed)
    }

    /// Changes of standing of a backend or an egress, in any route's eyes.
    pub fn health_changes(&self) -> u64 {
        self.health_changes.load(Ordering::Relaxed)
    }

    /// Sessions whose bytes moved by splice(2) only.
    pub fn spliced(&self) -> u64 {
        self.spliced.load(Ordering::Relaxed)
    }

    /// Sessions whose bytes moved through userspace buffers.
    pub fn copied(&self) -> u64 {
        self.copied.load(Ordering::Relaxed)
    }

    /// Sessions that started by splice and had to copy for want of a pipe.
    pub fn splice_fallbacks(&self) -> u64 {
        self.splice_fallbacks.load(Ordering::Relaxed)
    }

    /// Returns once `holds` is true of these counters (at once if it already is).
    pub async fn until(&self, holds: impl Fn(&Stats) -> bool) {
        loop {
            if holds(self) {
                return;
            }
            let changed = self.changed.listen();
            // A change between the check and the listen would otherwise be missed.
            if holds(self) {
                return;
            }
            changed.await;
        }
    }

    fn bump(&self, counter: &AtomicU64, up: bool) -> u64 {
        let before = if up {
            counter.fetch_add(1, Ordering::Relaxed)
        } else {
            counter.fetch_sub(1, Ordering::Relaxed)
        };
        self.changed.notify(usize::MAX);
        before
    }

    /// Counts a new live session; returns its number.
    pub(crate) fn opened(&self) -> u64 {
        self.bump(&self.active, true);
        self.bump(&self.opened, true)
    }

    pub(crate) fn closed(&self, forced: bool) {
        if forced {
            self.bump(&self.forced, true);
        }
        self.bump(&self.active, false);
    }

    pub(crate) fn relayed_by(&self, path: Transfer) {
        match path {
            Transfer::Splice => drop(self.bump(&self.spliced, true)),
            Transfer::Copy => drop(self.bump(&self.copied, true)),
            Transfer::SpliceThenCopy => drop(self.bump(&self.splice_fallbacks, true)),
            Transfer::NotRelayed | Transfer::Datagrams => {}
        }
    }

    pub(crate) fn refused_no_backend(&self) {
        self.bump(&self.no_backend, true);
    }

    pub(crate) fn health_changed(&self) {
        self.bump(&self.health_changes, true);
    }

    /// Counts a dropped UDP datagram; returns the relay's total of its kind
    /// ([`Stats::udp_over_limit`] or [`Stats::udp_dropped`]).
    pub(crate) fn udp_drop(&self, why: UdpDrop) -> u64 {
        let counter = match why {
            UdpDrop::OverMaxFlows => &self.udp_over_limit,
            UdpDrop::FlowQueueFull | UdpDrop::ClientUnreachable => &self.udp_dropped,
        };
        self.bump(counter, true) + 1
    }
}

/// Why a UDP datagram was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UdpDrop {
    /// It would have opened a flow beyond `max_flows` (or the relay's session cap).
    OverMaxFlows,
    /// Its flow's queue was full.
    FlowQueueFull,
    /// A reply the client's side could not take.
    ClientUnreachable,
}

impl UdpDrop {
    /// A stable word for logs and metrics labels.
    pub fn word(self) -> &'static str {
        match self {
            UdpDrop::OverMaxFlows => "over_max_flows",
            UdpDrop::FlowQueueFull => "flow_queue_full",
            UdpDrop::ClientUnreachable => "client_unreachable",
        }
    }
}

/// How a session's bytes moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transfer {
    /// Not relayed: no backend was reached.
    NotRelayed,
    /// A UDP flow: datagram by datagram.
    Datagrams,
    /// Through a userspace buffer (injected streams; splice turned off).
    Copy,
    /// splice(2) through pipes, never touching userspace.
    Splice,
    /// splice(2) until no pipe could be had, then copying.
    SpliceThenCopy,
}
