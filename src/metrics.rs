//! Prometheus metrics, built with the Prometheus project's own client (`prometheus-client`),
//! served as OpenMetrics text at `GET /metrics` on the status listener.
//!
//! Counters and histograms are counted where things happen (a session's end, a dial); the
//! state of backends and egresses is read from the balancers when the page is asked for, so no
//! actor keeps a second copy of its state. Label sets stay bounded: routes, backends and
//! egresses come from the config (and what its names resolve to), reasons from a fixed list.
//! Client addresses are never labels.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::TypedMetric;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Metric, Registry, Unit};

use crate::balancer::{ADMIN_STATES, BackendSnapshot, RouteSnapshot};

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
struct StatusLabels {
    route: String,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabels {
    route: String,
    direction: &'static str,
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
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CheckLabels {
    route: String,
    backend: String,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DialLabels {
    route: String,
    backend: String,
    egress: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FaultLabels {
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
struct EgressStateLabels {
    route: String,
    egress: String,
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EgressBytesLabels {
    egress: String,
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
    revision: &'static str,
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

/// A session's end as the metrics count it.
pub(crate) struct Ended<'a> {
    pub route: &'a str,
    /// How it ended (`done`, `idle_timeout`...).
    pub reason: &'static str,
    /// The status an HTTP CONNECT was refused with.
    pub refused: Option<u16>,
    pub lasted: Duration,
}

/// A session's hold on the byte and datagram counters of its route and egress, counted as
/// they move: a session of hours shows on the page while it runs, not only once it ends. The
/// counters are looked up once, when the session starts; each count is then an atomic add.
pub(crate) struct Meter {
    /// Bytes up and down.
    bytes: [Counter; 2],
    /// Datagrams up and down (UDP flows only).
    datagrams: Option<[Counter; 2]>,
    /// The egress's bytes out and in, once the session has one.
    egress: Option<[Counter; 2]>,
    /// What was counted so far: bytes up, down, datagrams up, down.
    counted: [u64; 4],
}

impl Meter {
    /// The session's totals so far: what is new since the last call is counted.
    pub fn moved(&mut self, bytes: (u64, u64), datagrams: (u64, u64)) {
        let totals = [bytes.0, bytes.1, datagrams.0, datagrams.1];
        let mut new = [0u64; 4];
        for (i, total) in totals.into_iter().enumerate() {
            new[i] = total.saturating_sub(self.counted[i]);
            self.counted[i] = self.counted[i].max(total);
        }
        for (i, n) in new[..2].iter().enumerate().filter(|(_, n)| **n > 0) {
            self.bytes[i].inc_by(*n);
            if let Some(egress) = &self.egress {
                egress[i].inc_by(*n);
            }
        }
        if let Some(datagrams) = &self.datagrams {
            for (i, n) in new[2..].iter().enumerate().filter(|(_, n)| **n > 0) {
                datagrams[i].inc_by(*n);
            }
        }
    }
}

/// The relay's metrics. Cheap to share (`Arc`); every family is lock-free to count into once
/// its label set exists.
pub struct Metrics {
    registry: Registry,
    sessions_opened: Family<RouteLabels, Counter>,
    sessions_ended: Family<EndLabels, Counter>,
    sessions_active: Family<RouteLabels, Gauge>,
    connect_refusals: Family<StatusLabels, Counter>,
    bytes: Family<DirectionLabels, Counter>,
    datagrams: Family<DirectionLabels, Counter>,
    session_seconds: Seconds,
    connect_seconds: BackendSeconds,
    connect_attempts: Family<DialLabels, Counter>,
    connect_failures: Family<FaultLabels, Counter>,
    backend_sessions: Family<BackendLabels, Counter>,
    egress_bytes: Family<EgressBytesLabels, Counter>,
    udp_dropped: Family<EndLabels, Counter>,
    clients_refused: Family<RouteLabels, Counter>,
    /// What the balancers said when the page was asked for.
    standing: Arc<Standing>,
    open_fds: Gauge,
    resident_bytes: Gauge,
    reloads: Family<ResultLabels, Counter>,
    reload_ok: Gauge,
    reload_ok_at: Gauge,
    /// One page at a time: a page's standing is the one its own snapshots gave.
    rendering: Mutex<()>,
}

/// relayd's own metrics, a row each: name, help, unit (`None`: a count), metric.
#[rustfmt::skip]
fn register_relayd(r: &mut Registry, m: &Metrics) {
    let sessions = "Sessions (a UDP route's: its flows)";
    let (bytes, seconds) = (Some(Unit::Bytes), Some(Unit::Seconds));
    add(r, "sessions_opened", &format!("{sessions} opened"), None, &m.sessions_opened);
    add(r, "sessions_ended", &format!("{sessions} ended, by how they ended"), None, &m.sessions_ended);
    add(r, "sessions_active", &format!("{sessions} live now"), None, &m.sessions_active);
    add(r, "connect_refusals", "HTTP CONNECT requests refused, by the status answered", None, &m.connect_refusals);
    add(r, "relayed", "Bytes relayed, by direction (up: client to backend)", bytes.clone(), &m.bytes);
    add(r, "udp_datagrams", "UDP datagrams relayed, by direction (up: client to backend)", None, &m.datagrams);
    add(r, "session_duration", "How long sessions lasted", seconds.clone(), &m.session_seconds);
    add(r, "connect_duration", "How long successful connects to a backend took", seconds.clone(), &m.connect_seconds);
    add(r, "connect_attempts", "Dials of a backend by an egress", None, &m.connect_attempts);
    add(r, "connect_failures", "Failed dials, by whose fault they were (backend, egress, path, relay)", None, &m.connect_failures);
    add(r, "backend_sessions", "Sessions each backend was connected for", None, &m.backend_sessions);
    add(r, "egress", "Bytes through each egress (out: to backends)", bytes, &m.egress_bytes);
    add(r, "udp_datagrams_dropped", "UDP datagrams dropped, by reason", None, &m.udp_dropped);
    add(r, "clients_refused", "Clients (connections, UDP datagrams) refused by the route's allow/deny lists", None, &m.clients_refused);
    r.register_collector(Box::new(m.standing.clone()));
    add(r, "config_reloads", "Config reloads, by result (ok, failed: the running config was kept)", None, &m.reloads);
    add(r, "config_last_reload_successful", "1 when the last reload applied (or none was asked for), 0 when it failed", None, &m.reload_ok);
    add(r, "config_last_reload_success_time", "When the running config was applied, in seconds since the epoch", seconds, &m.reload_ok_at);
}

/// Registers one metric: a row of [`register_relayd`]'s table.
fn add<M: Metric + Clone>(r: &mut Registry, name: &str, help: &str, unit: Option<Unit>, metric: &M) {
    match unit {
        Some(unit) => r.register_with_unit(name, help, unit, metric.clone()),
        None => r.register(name, help, metric.clone()),
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        // relayd's own metrics under `relayd_`; the process's under the names every
        // Prometheus client gives them (`process_open_fds`...), which dashboards expect.
        let mut registry = Registry::default();
        let m = Metrics {
            registry: Registry::default(),
            sessions_opened: Family::default(),
            sessions_ended: Family::default(),
            sessions_active: Family::default(),
            connect_refusals: Family::default(),
            bytes: Family::default(),
            datagrams: Family::default(),
            session_seconds: Family::new_with_constructor(session_buckets),
            connect_seconds: Family::new_with_constructor(connect_buckets),
            connect_attempts: Family::default(),
            connect_failures: Family::default(),
            backend_sessions: Family::default(),
            egress_bytes: Family::default(),
            udp_dropped: Family::default(),
            clients_refused: Family::default(),
            standing: Arc::default(),
            open_fds: Gauge::default(),
            resident_bytes: Gauge::default(),
            reloads: Family::default(),
            reload_ok: Gauge::default(),
            reload_ok_at: Gauge::default(),
            rendering: Mutex::new(()),
        };
        let r = registry.sub_registry_with_prefix("relayd");
        register_relayd(r, &m);
        m.reload_ok.set(1);
        m.reload_ok_at.set(epoch_seconds());
        let build = Family::<BuildLabels, Gauge>::default();
        let labels = BuildLabels {
            version: env!("CARGO_PKG_VERSION"),
            revision: env!("RELAYD_REVISION"),
        };
        build.get_or_create(&labels).set(1);
        r.register(
            "build_info",
            "The relayd build: 1, labelled with its version and git revision",
            build,
        );
        let process = registry.sub_registry_with_prefix("process");
        process.register("open_fds", "Open file descriptors", m.open_fds.clone());
        let resident = m.resident_bytes.clone();
        process.register_with_unit("resident_memory", "Resident memory", Unit::Bytes, resident);
        let started = Gauge::<i64>::default();
        started.set(epoch_seconds());
        let start = "When the process started, in seconds since the epoch";
        process.register_with_unit("start_time", start, Unit::Seconds, started);
        Metrics { registry, ..m }
    }

    /// A reload applied (`ok`) or refused.
    pub(crate) fn reloaded(&self, ok: bool) {
        let result = if ok { "ok" } else { "failed" };
        self.reloads.get_or_create(&ResultLabels { result }).inc();
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

    /// A UDP datagram dropped, and why (the word of its `UdpDrop`); a session context counts
    /// it here and in the relay's counters at once.
    pub(crate) fn udp_dropped(&self, route: &str, reason: &'static str) {
        let labels = EndLabels {
            route: route.into(),
            reason: reason.into(),
        };
        self.udp_dropped.get_or_create(&labels).inc();
    }

    pub(crate) fn session_ended(&self, report: Ended) {
        let route = report.route.to_string();
        let ended = EndLabels {
            route: route.clone(),
            reason: report.reason.into(),
        };
        self.sessions_ended.get_or_create(&ended).inc();
        if let Some(status) = report.refused {
            let labels = StatusLabels {
                route: route.clone(),
                status,
            };
            self.connect_refusals.get_or_create(&labels).inc();
        }
        let labels = RouteLabels { route };
        self.sessions_active.get_or_create(&labels).dec();
        self.session_seconds
            .get_or_create(&labels)
            .observe(report.lasted.as_secs_f64());
    }

    /// A session `from` took (an `sni` route) goes on as `to`'s: it ends for `from` as
    /// `handed_on`, and opens for `to`, which counts its end.
    pub(crate) fn session_handed(&self, from: &str, to: &str) {
        let ended = EndLabels {
            route: from.into(),
            reason: "handed_on".into(),
        };
        self.sessions_ended.get_or_create(&ended).inc();
        let from = RouteLabels { route: from.into() };
        self.sessions_active.get_or_create(&from).dec();
        self.session_opened(to);
    }

    /// A meter for a session of `route` (a UDP flow's counts datagrams too).
    pub(crate) fn meter(&self, route: &str, udp: bool) -> Meter {
        let counters = |family: &Family<DirectionLabels, Counter>| {
            ["up", "down"].map(|direction| {
                let labels = DirectionLabels {
                    route: route.into(),
                    direction,
                };
                family.get_or_create(&labels).clone()
            })
        };
        Meter {
            bytes: counters(&self.bytes),
            datagrams: udp.then(|| counters(&self.datagrams)),
            egress: None,
            counted: [0; 4],
        }
    }

    /// From now on `meter` counts its bytes for `egress` too (a flow that moves off an
    /// egress counts for the next).
    pub(crate) fn by_egress(&self, meter: &mut Meter, egress: &str) {
        meter.egress = Some(["out", "in"].map(|direction| {
            let labels = EgressBytesLabels {
                egress: egress.into(),
                direction,
            };
            self.egress_bytes.get_or_create(&labels).clone()
        }));
    }

    pub(crate) fn client_refused(&self, route: &str) {
        self.clients_refused
            .get_or_create(&RouteLabels { route: route.into() })
            .inc();
    }

    /// A dial of `backend` by `egress`: connected after so long, or failed through whose fault.
    pub(crate) fn dialed(
        &self,
        route: &str,
        backend: std::net::SocketAddr,
        egress: &str,
        outcome: Result<Duration, crate::error::Fault>,
    ) {
        let dial = DialLabels {
            route: route.into(),
            backend: backend.to_string(),
            egress: egress.into(),
        };
        self.connect_attempts.get_or_create(&dial).inc();
        match outcome {
            Ok(took) => {
                let labels = BackendLabels {
                    route: dial.route,
                    backend: dial.backend,
                };
                self.backend_sessions.get_or_create(&labels).inc();
                self.connect_seconds.get_or_create(&labels).observe(took.as_secs_f64());
            }
            Err(fault) => {
                let labels = FaultLabels {
                    route: dial.route,
                    backend: dial.backend,
                    egress: dial.egress,
                    fault: fault.word().to_string(),
                };
                self.connect_failures.get_or_create(&labels).inc();
            }
        }
    }

    /// The page: the standing of every route (read from its balancer just now) and of the
    /// process, then everything counted, in the OpenMetrics text format (`openmetrics`) or
    /// the Prometheus text format 0.0.4.
    pub(crate) fn render(&self, routes: Vec<RouteSnapshot>, openmetrics: bool) -> String {
        let _one = self.rendering.lock().unwrap_or_else(|e| e.into_inner());
        *self.standing.0.lock().unwrap_or_else(|e| e.into_inner()) = routes;
        if let Some(fds) = open_fds() {
            self.open_fds.set(fds as i64);
        }
        if let Some(rss) = resident_bytes() {
            self.resident_bytes.set(rss);
        }
        let mut page = String::new();
        let _ = match openmetrics {
            true => prometheus_client::encoding::text::encode(&mut page, &self.registry),
            false => prometheus_client::encoding::prometheus_text::encode(&mut page, &self.registry),
        };
        page
    }
}

/// Every state a backend can be in, each a series of `backend_state`.
const STATES: [&str; 5] = ["up", "down", "trial", "draining", "retired"];

/// The balancers' word on their backends and egresses: gauges of what is, and the counters
/// they keep (ejections, checks), encoded from the newest snapshots at each scrape.
#[derive(Debug, Default)]
struct Standing(Mutex<Vec<RouteSnapshot>>);

impl Collector for Standing {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let routes = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let backends =
            || (routes.iter()).flat_map(|r| r.backends.iter().map(move |b| (r.name.clone(), b.addr.to_string(), b)));
        let now = |b: &BackendSnapshot| b.state.word();
        encode(
            &mut encoder,
            "backend_state",
            "1 for the state each backend is in, 0 for the others (up, down, trial, draining, retired)",
            backends().flat_map(|(route, backend, b)| {
                STATES.map(|state| {
                    let labels = StateLabels {
                        route: route.clone(),
                        backend: backend.clone(),
                        state,
                    };
                    (labels, ConstGauge::new(i64::from(state == now(b))))
                })
            }),
        )?;
        encode(
            &mut encoder,
            "backend_admin_state",
            "1 for the operator's word on each backend (the admin socket's), 0 for the others (enabled, drain, disabled)",
            backends().flat_map(|(route, backend, b)| {
                ADMIN_STATES.map(|state| {
                    let labels = StateLabels {
                        route: route.clone(),
                        backend: backend.clone(),
                        state: state.word(),
                    };
                    (labels, ConstGauge::new(i64::from(state == b.admin)))
                })
            }),
        )?;
        encode(
            &mut encoder,
            "backend_active_sessions",
            "Live sessions per backend",
            backends().map(|(route, backend, b)| (BackendLabels { route, backend }, ConstGauge::new(b.active as i64))),
        )?;
        encode(
            &mut encoder,
            "backend_ejections",
            "Times each backend was taken out, by failed connects or checks",
            backends().map(|(route, backend, b)| (BackendLabels { route, backend }, ConstCounter::new(b.ejections))),
        )?;
        encode(
            &mut encoder,
            "backend_checks",
            "Active health checks of each backend, by result",
            backends().flat_map(|(route, backend, b)| {
                [("pass", b.checks[0]), ("fail", b.checks[1])].map(|(result, n)| {
                    let labels = CheckLabels {
                        route: route.clone(),
                        backend: backend.clone(),
                        result,
                    };
                    (labels, ConstCounter::new(n))
                })
            }),
        )?;
        let egresses = || (routes.iter()).flat_map(|r| r.egresses.iter().map(move |e| (r.name.clone(), e)));
        encode(
            &mut encoder,
            "egress_up",
            "1 while an egress of the route is usable",
            egresses().map(|(route, e)| {
                let labels = EgressLabels {
                    route,
                    egress: e.name.clone(),
                };
                (labels, ConstGauge::new(i64::from(e.up)))
            }),
        )?;
        encode(
            &mut encoder,
            "egress_admin_state",
            "1 for the operator's word on each egress of the route (the admin socket's), 0 for the other (enabled, drain)",
            egresses().flat_map(|(route, e)| {
                [("enabled", !e.drained), ("drain", e.drained)].map(|(state, now)| {
                    let labels = EgressStateLabels {
                        route: route.clone(),
                        egress: e.name.clone(),
                        state,
                    };
                    (labels, ConstGauge::new(i64::from(now)))
                })
            }),
        )
    }
}

/// One family of values read at the scrape.
fn encode<L: EncodeLabelSet, M: EncodeMetric + TypedMetric>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: impl Iterator<Item = (L, M)>,
) -> std::fmt::Result {
    let mut family = encoder.encode_descriptor(name, help, None, M::TYPE)?;
    for (labels, value) in samples {
        value.encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

/// The process's open descriptors. Linux 6.2 and later give their count as the size of
/// /proc/self/fd, in one stat whatever the count; older kernels give 0 there, and the
/// directory is listed instead (a scrape then costs a read per descriptor).
fn open_fds() -> Option<u64> {
    match std::fs::metadata("/proc/self/fd").map(|m| m.len()) {
        Ok(n) if n > 0 => Some(n),
        _ => std::fs::read_dir("/proc/self/fd").ok().map(|fds| fds.count() as u64),
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

#[cfg(test)]
mod tests {
    #[test]
    fn the_open_descriptor_count_matches_a_listing() {
        let files: Vec<std::fs::File> = (0..50)
            .map(|_| std::fs::File::open("/proc/self/stat").unwrap())
            .collect();
        let counted = super::open_fds().expect("a count");
        // The listing opens a descriptor of its own; other tests open and close theirs meanwhile.
        let listed = std::fs::read_dir("/proc/self/fd").unwrap().count() as u64;
        assert!(
            counted >= 50 && counted.abs_diff(listed) <= 32,
            "{counted} counted, {listed} listed"
        );
        drop(files);
    }
}
