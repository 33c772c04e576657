//! Prometheus metrics, built with the Prometheus project's own client (`prometheus-client`),
//! served as OpenMetrics text at `GET /metrics` on the status listener.
//!
//! Counters and histograms are counted where things happen (a session's end, a dial); the
//! state of backends and egresses is read from the balancers when the page is asked for, so no
//! actor keeps a second copy of its state. Label sets stay bounded: routes, backends and
//! egresses come from the config (and what its names resolve to), reasons from a fixed list.
//! Client addresses are never labels.

use std::fmt::Write as _;
use std::time::{Duration, SystemTime};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

use crate::balancer::{HealthState, RouteSnapshot};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndLabels {
    route: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BytesLabels {
    route: String,
    direction: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendLabels {
    route: String,
    backend: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    route: String,
    backend: String,
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DialLabels {
    route: String,
    backend: String,
    egress: String,
    fault: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EgressLabels {
    route: String,
    egress: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: String,
}

type Seconds = Family<RouteLabels, Histogram, fn() -> Histogram>;
type BackendSeconds = Family<BackendLabels, Histogram, fn() -> Histogram>;

/// Sessions last from milliseconds to hours.
fn session_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 4.0, 12))
}

/// Connects take from tens of microseconds to the connect timeout.
fn connect_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 2.0, 16))
}

fn epoch_seconds() -> i64 {
    let since = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH);
    since.unwrap_or_default().as_secs() as i64
}

/// The relay's metrics. Cheap to share (`Arc`); every family is lock-free to count into once
/// its label set exists.
pub struct Metrics {
    registry: Registry,
    sessions_opened: Family<RouteLabels, Counter>,
    sessions_ended: Family<EndLabels, Counter>,
    bytes: Family<BytesLabels, Counter>,
    session_seconds: Seconds,
    connect_seconds: BackendSeconds,
    connect_failures: Family<DialLabels, Counter>,
    sessions_active: Family<RouteLabels, Gauge>,
    backend_state: Family<StateLabels, Gauge>,
    backend_active: Family<BackendLabels, Gauge>,
    backend_sessions: Family<BackendLabels, Gauge>,
    backend_failures: Family<BackendLabels, Gauge>,
    egress_up: Family<EgressLabels, Gauge>,
    udp_dropped: Family<EndLabels, Counter>,
    clients_refused: Family<RouteLabels, Counter>,
    open_fds: Gauge,
    resident_bytes: Gauge,
    reloads: Family<ResultLabels, Counter>,
    reload_ok: Gauge,
    reload_ok_at: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("relayd");
        let m = Metrics {
            registry: Registry::default(),
            sessions_opened: Family::default(),
            sessions_ended: Family::default(),
            bytes: Family::default(),
            session_seconds: Family::new_with_constructor(session_buckets),
            connect_seconds: Family::new_with_constructor(connect_buckets),
            connect_failures: Family::default(),
            sessions_active: Family::default(),
            backend_state: Family::default(),
            backend_active: Family::default(),
            backend_sessions: Family::default(),
            backend_failures: Family::default(),
            egress_up: Family::default(),
            udp_dropped: Family::default(),
            clients_refused: Family::default(),
            open_fds: Gauge::default(),
            resident_bytes: Gauge::default(),
            reloads: Family::default(),
            reload_ok: Gauge::default(),
            reload_ok_at: Gauge::default(),
        };
        let r = &mut registry;
        r.register(
            "sessions_opened",
            "Sessions (TCP connections, UDP flows) opened",
            m.sessions_opened.clone(),
        );
        r.register(
            "sessions_ended",
            "Sessions ended, by how they ended",
            m.sessions_ended.clone(),
        );
        r.register("sessions_active", "Sessions live now", m.sessions_active.clone());
        r.register_with_unit(
            "relayed",
            "Bytes relayed, by direction (up: client to backend)",
            Unit::Bytes,
            m.bytes.clone(),
        );
        r.register_with_unit(
            "session_duration",
            "How long sessions lasted",
            Unit::Seconds,
            m.session_seconds.clone(),
        );
        r.register_with_unit(
            "connect_duration",
            "How long successful connects to a backend took",
            Unit::Seconds,
            m.connect_seconds.clone(),
        );
        r.register(
            "connect_failures",
            "Failed dials, by whose fault they were",
            m.connect_failures.clone(),
        );
        r.register(
            "backend_state",
            "1 for the state each backend is in (up, down, draining, retired)",
            m.backend_state.clone(),
        );
        r.register(
            "backend_active_sessions",
            "Live sessions per backend",
            m.backend_active.clone(),
        );
        r.register(
            "backend_picked_sessions",
            "Sessions each backend was picked for",
            m.backend_sessions.clone(),
        );
        r.register(
            "backend_connect_failures",
            "Failed connects charged to each backend",
            m.backend_failures.clone(),
        );
        r.register(
            "egress_up",
            "1 while an egress of the route is usable",
            m.egress_up.clone(),
        );
        r.register(
            "udp_datagrams_dropped",
            "UDP datagrams dropped, by reason",
            m.udp_dropped.clone(),
        );
        r.register(
            "clients_refused",
            "Clients (connections, UDP datagrams) refused by the route's allow/deny lists",
            m.clients_refused.clone(),
        );
        r.register("open_fds", "Open file descriptors of the process", m.open_fds.clone());
        r.register_with_unit(
            "resident_memory",
            "Resident memory of the process",
            Unit::Bytes,
            m.resident_bytes.clone(),
        );
        r.register(
            "config_reloads",
            "Config reloads, by result (ok, failed: the running config was kept)",
            m.reloads.clone(),
        );
        r.register(
            "config_last_reload_successful",
            "1 when the last reload applied (or none was asked for), 0 when it failed",
            m.reload_ok.clone(),
        );
        r.register_with_unit(
            "config_last_reload_success_time",
            "When the running config was applied, in seconds since the epoch",
            Unit::Seconds,
            m.reload_ok_at.clone(),
        );
        m.reload_ok.set(1);
        m.reload_ok_at.set(epoch_seconds());
        let started = Gauge::<i64>::default();
        started.set(epoch_seconds());
        r.register_with_unit(
            "start_time",
            "When the relay started, in seconds since the epoch",
            Unit::Seconds,
            started,
        );
        let build = Family::<BuildLabels, Gauge>::default();
        build
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION").into(),
            })
            .set(1);
        r.register("build_info", "The relayd build: 1, labelled with its version", build);
        Metrics { registry, ..m }
    }

    /// A reload applied (`ok`) or refused.
    pub(crate) fn reloaded(&self, ok: bool) {
        let result = if ok { "ok" } else { "failed" };
        self.reloads
            .get_or_create(&ResultLabels { result: result.into() })
            .inc();
        self.reload_ok.set(i64::from(ok));
        if ok {
            self.reload_ok_at.set(epoch_seconds());
        }
    }

    pub(crate) fn session_opened(&self, route: &str) {
        let labels = RouteLabels { route: route.into() };
        self.sessions_opened.get_or_create(&labels).inc();
        self.sessions_active.get_or_create(&labels).inc();
    }

    /// A UDP datagram dropped, and why (`over_max_flows`, `flow_queue_full`, `client_unreachable`).
    pub(crate) fn udp_dropped(&self, route: &str, reason: &'static str) {
        let labels = EndLabels {
            route: route.into(),
            reason: reason.into(),
        };
        self.udp_dropped.get_or_create(&labels).inc();
    }

    /// A session's end: how (its word), how many bytes each way, how long.
    pub(crate) fn session_ended(&self, route: &str, reason: &str, bytes: (u64, u64), lasted: Duration) {
        let route = route.to_string();
        let ended = EndLabels {
            route: route.clone(),
            reason: reason.into(),
        };
        self.sessions_ended.get_or_create(&ended).inc();
        for (direction, n) in [("up", bytes.0), ("down", bytes.1)] {
            if n > 0 {
                let labels = BytesLabels {
                    route: route.clone(),
                    direction: direction.into(),
                };
                self.bytes.get_or_create(&labels).inc_by(n);
            }
        }
        let labels = RouteLabels { route };
        self.sessions_active.get_or_create(&labels).dec();
        self.session_seconds
            .get_or_create(&labels)
            .observe(lasted.as_secs_f64());
    }

    pub(crate) fn client_refused(&self, route: &str) {
        self.clients_refused
            .get_or_create(&RouteLabels { route: route.into() })
            .inc();
    }

    pub(crate) fn connected(&self, route: &str, backend: std::net::SocketAddr, took: Duration) {
        let labels = BackendLabels {
            route: route.into(),
            backend: backend.to_string(),
        };
        self.connect_seconds.get_or_create(&labels).observe(took.as_secs_f64());
    }

    pub(crate) fn dial_failed(
        &self,
        route: &str,
        backend: std::net::SocketAddr,
        egress: &str,
        fault: crate::error::Fault,
    ) {
        let fault = format!("{fault:?}").to_ascii_lowercase();
        let labels = DialLabels {
            route: route.into(),
            backend: backend.to_string(),
            egress: egress.into(),
            fault,
        };
        self.connect_failures.get_or_create(&labels).inc();
    }

    /// The page: the state of every route (read from its balancer just now) and of the process,
    /// then everything counted, in the OpenMetrics text format.
    pub(crate) fn render(&self, routes: &[RouteSnapshot]) -> String {
        for family in [&self.backend_active, &self.backend_sessions, &self.backend_failures] {
            family.clear();
        }
        self.backend_state.clear();
        self.egress_up.clear();
        for route in routes {
            let name = route.name.clone();
            for b in &route.backends {
                let labels = BackendLabels {
                    route: name.clone(),
                    backend: b.addr.to_string(),
                };
                self.backend_active.get_or_create(&labels).set(b.active as i64);
                self.backend_sessions.get_or_create(&labels).set(b.sessions as i64);
                self.backend_failures
                    .get_or_create(&labels)
                    .set(b.connect_failures as i64);
                let state = match b.state {
                    HealthState::Up => "up",
                    HealthState::Down => "down",
                    HealthState::Draining => "draining",
                    HealthState::Retired => "retired",
                };
                let labels = StateLabels {
                    route: name.clone(),
                    backend: labels.backend,
                    state: state.into(),
                };
                self.backend_state.get_or_create(&labels).set(1);
            }
            for e in &route.egresses {
                let labels = EgressLabels {
                    route: name.clone(),
                    egress: e.name.clone(),
                };
                self.egress_up.get_or_create(&labels).set(i64::from(e.up));
            }
        }
        if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
            self.open_fds.set(fds.count() as i64);
        }
        if let Some(rss) = resident_bytes() {
            self.resident_bytes.set(rss);
        }
        let mut page = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut page, &self.registry);
        if page.is_empty() {
            let _ = writeln!(page, "# EOF");
        }
        page
    }
}

/// The process's resident set, from /proc/self/statm (pages).
fn resident_bytes() -> Option<i64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: i64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf only reads a system constant.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * page as i64)
}
