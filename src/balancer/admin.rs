//! An operator's word on a backend or an egress (the admin socket's, HAProxy's `set server
//! … state`): orders each shard keeps beside its health, never mixed into it. A backend
//! drained takes no new sessions while its live ones go on; disabled, its checks stop too;
//! enabled, it is back to whatever its health says. An egress drained is left by no new
//! session (its checks go on). Orders outlive a reload while what they name stays in the
//! route.

use std::net::SocketAddr;
use std::sync::Arc;

use super::Balancer;
use crate::config::{BackendAddr, EgressId};

/// What an operator said of a backend.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum AdminState {
    /// Its health alone decides.
    #[default]
    Enabled,
    /// No new sessions; live ones go on, and so do its checks.
    Drain,
    /// As drained, and its health checks stop.
    Disabled,
}

/// Every admin state, each a series of `relayd_backend_admin_state`.
pub const ADMIN_STATES: [AdminState; 3] = [AdminState::Enabled, AdminState::Drain, AdminState::Disabled];

impl AdminState {
    /// The word the admin socket takes and the status page, metrics and logs show.
    pub fn word(self) -> &'static str {
        match self {
            AdminState::Enabled => "enabled",
            AdminState::Drain => "drain",
            AdminState::Disabled => "disabled",
        }
    }

    /// The state an admin command names (`enable`, `drain`, `disable`; the state words too).
    pub fn from_command(word: &str) -> Option<AdminState> {
        match word {
            "enable" | "enabled" => Some(AdminState::Enabled),
            "drain" => Some(AdminState::Drain),
            "disable" | "disabled" => Some(AdminState::Disabled),
            _ => None,
        }
    }
}

/// What a backend order names: one address, or a configured backend (an address, or a name
/// with every address it resolves to).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Named {
    Addr(SocketAddr),
    Source(String),
}

impl Named {
    fn parse(text: &str) -> Named {
        match text.parse::<SocketAddr>() {
            Ok(addr) => Named::Addr(addr),
            Err(_) => Named::Source(text.to_string()),
        }
    }

    /// A backend as configured that this names: its address, or its name.
    fn names_source(&self, source: &BackendAddr) -> bool {
        match (self, source) {
            (Named::Addr(a), BackendAddr::Ip(b)) => a == b,
            (Named::Source(s), BackendAddr::Name { .. }) => *s == source.to_string(),
            _ => false,
        }
    }

    /// An address of the backend configured as `source` that this names.
    fn names(&self, addr: SocketAddr, source: &BackendAddr) -> bool {
        matches!(self, Named::Addr(a) if *a == addr) || self.names_source(source)
    }
}

/// The orders of one shard.
#[derive(Debug, Default)]
pub(super) struct Orders {
    /// On backends, oldest first; a later order on the same name replaces an earlier one, and
    /// of two that name one address (its own and its name's) the later one holds.
    backends: Vec<(Named, AdminState)>,
    /// The egresses drained, by name (ids are the relay's, names the operator's).
    drained: Arc<[Arc<str>]>,
    /// `drained` by [`EgressId`], for the picks.
    drained_ids: Vec<bool>,
}

impl Balancer {
    /// An order on the route's backend `named` (an address, or a backend as configured):
    /// the addresses it now applies to, or why it applies to none.
    pub(super) fn admin_backend(&mut self, named: &str, state: AdminState) -> Result<Vec<SocketAddr>, String> {
        let named = Named::parse(named.trim());
        if !self.has(&named) {
            return Err(match named {
                Named::Addr(addr) => format!("route {} has no backend {addr}", self.route),
                Named::Source(s) => format!(
                    "route {} has no backend {s:?} (name one by its address, IP:port, or as configured)",
                    self.route
                ),
            });
        }
        let matched = (self.entries.iter())
            .filter(|e| !e.retired && named.names(e.addr, &self.sources[e.source].addr))
            .map(|e| e.addr)
            .collect();
        self.orders.backends.retain(|(n, _)| *n != named);
        self.orders.backends.push((named, state));
        self.apply_orders();
        Ok(matched)
    }

    /// The route has what `named` names: a backend as configured, or an address one of its
    /// names resolves to now.
    fn has(&self, named: &Named) -> bool {
        let configured = &self.sources[..self.configured];
        (configured.iter()).any(|s| named.names_source(&s.addr))
            || (self.entries.iter()).any(|e| !e.retired && named.names(e.addr, &self.sources[e.source].addr))
    }

    /// The egresses drained relay-wide, by name: the whole set, which replaces the one before.
    pub(super) fn admin_egresses(&mut self, drained: Arc<[Arc<str>]>) {
        self.orders.drained = drained;
        self.apply_orders();
    }

    /// Brings every entry's admin state and the drained egress ids up to date with the
    /// orders, after an order, a resolution or a reload. Orders on backends the route no
    /// longer has (a reload took them out) are forgotten.
    pub(super) fn apply_orders(&mut self) {
        let mut orders = std::mem::take(&mut self.orders.backends);
        orders.retain(|(n, _)| self.has(n));
        for e in &mut self.entries {
            let source = &self.sources[e.source].addr;
            let order = orders.iter().rev().find(|(n, _)| n.names(e.addr, source));
            e.admin = order.map_or(AdminState::Enabled, |(_, state)| *state);
        }
        self.orders.backends = orders;
        let drained = &self.orders.drained;
        self.orders.drained_ids = (self.egress_names.iter())
            .map(|name| drained.iter().any(|d| d == name))
            .collect();
    }

    /// The operator drained `egress`.
    pub(super) fn egress_drained(&self, egress: EgressId) -> bool {
        self.orders.drained_ids.get(egress.0).copied().unwrap_or(false)
    }
}
