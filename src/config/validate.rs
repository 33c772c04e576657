//! [`Config`] → [`Settings`]: every check, every problem collected by its path.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroUsize;
use std::str::FromStr;
use std::time::Duration;

use ipnet::IpNet;

use super::{
    AcceptProxy, Backend, BackendAddr, BackendConfig, Check, Config, ConnectConfig, ConnectSettings, Credentials,
    DEFAULT_EGRESS, Egress, EgressConfig, EgressId, Health, HealthConfig, OneOrMany, Protocol, Route, RouteConfig,
    Settings, Sni, SniConfig, SocketOptions, StatusAddr, Timeouts, UpstreamProxy,
};
use crate::acl::{Acl, ClientAcl, DEFAULT_DENY, HostPattern, unmapped};
use crate::error::Problem;

/// Linux interface names are at most 15 bytes (IFNAMSIZ less the NUL).
const IFNAME_MAX: usize = 15;
/// Every duration lies in this range: shorter is no time at all to a socket, and longer would
/// push a deadline past what the clock can hold.
pub const DURATION_MIN: Duration = Duration::from_millis(1);
pub const DURATION_MAX: Duration = Duration::from_secs(365 * 24 * 3600);
/// Executor threads: more than this is a typo, not a machine.
pub const WORKERS_MAX: usize = 256;

/// Collects problems while the walk goes on, so one run reports all of them.
#[derive(Default)]
struct Problems(Vec<Problem>);

impl Problems {
    fn add(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(Problem {
            path: path.into(),
            message: message.into(),
        });
    }

    /// A duration such as "250ms" or "5m" within [`DURATION_MIN`]..=[`DURATION_MAX`], or
    /// `default` when absent.
    fn duration(&mut self, path: String, value: &Option<String>, default: Duration) -> Duration {
        let Some(text) = value else { return default };
        match humantime::parse_duration(text) {
            Ok(d) if d.is_zero() => self.add(path, "must be greater than zero"),
            Ok(d) if !(DURATION_MIN..=DURATION_MAX).contains(&d) => {
                self.add(path, format!("{text:?} is outside 1ms..=365days"))
            }
            Ok(d) => return d,
            Err(e) => self.add(
                path,
                format!("{text:?} is not a duration like \"250ms\", \"5s\" or \"5m\" ({e})"),
            ),
        }
        default
    }

    fn parse<T: FromStr>(&mut self, path: String, text: &str, what: &str) -> Option<T> {
        let parsed = text.parse().ok();
        if parsed.is_none() {
            self.add(path, format!("{text:?} is not {what}"));
        }
        parsed
    }
}

pub(super) fn settings(config: &Config) -> Result<Settings, Vec<Problem>> {
    let mut p = Problems::default();
    let log_level = match &config.log_level {
        None => log::LevelFilter::Info,
        Some(text) => p
            .parse("log_level".into(), text, "one of error, warn, info, debug, trace")
            .unwrap_or(log::LevelFilter::Info),
    };
    let drain_timeout = p.duration("drain_timeout".into(), &config.drain_timeout, Duration::from_secs(30));
    let status = config.status.as_deref().and_then(|s| status_addr(s, &mut p));
    let admin = config
        .admin
        .as_deref()
        .and_then(|s| admin_path(s, status.as_ref(), &mut p));
    let workers = config.workers.map(|n| {
        let ok = NonZeroUsize::new(n).filter(|n| n.get() <= WORKERS_MAX);
        ok.unwrap_or_else(|| {
            p.add(
                "workers",
                format!("{n} is outside 1..={WORKERS_MAX} (leave it out for one per core)"),
            );
            NonZeroUsize::MIN
        })
    });
    let max_connections = cap("max_connections".into(), config.max_connections, &mut p);
    let mailbox = config.mailbox.unwrap_or(1024);
    let mailbox = NonZeroUsize::new(mailbox)
        .filter(|n| n.get() <= 1 << 20)
        .unwrap_or_else(|| {
            p.add("mailbox", format!("{mailbox} is outside 1..=1048576"));
            NonZeroUsize::MIN
        });
    let egress = egresses(config, &mut p);
    let ids: HashMap<&str, EgressId> = egress
        .iter()
        .enumerate()
        .map(|(i, e)| (e.name.as_str(), EgressId(i)))
        .collect();
    if config.routes.is_empty() {
        p.add("routes", "no routes: nothing to relay");
    }
    let routes: Vec<Route> = config
        .routes
        .iter()
        .enumerate()
        .filter_map(|(i, r)| route(i, r, &ids, &mut p))
        .collect();
    unique_routes(config, &mut p);
    sni_targets(config, &mut p);
    let status_tcp = match &status {
        Some(StatusAddr::Tcp(addr)) => Some(*addr),
        _ => None,
    };
    listeners_apart(config, status_tcp, &mut p);
    no_loops(config, &routes, &mut p);
    // Loopback only unless the file says otherwise: the page, /metrics and /config describe
    // the whole relay, and a wider audience is an explicit choice.
    let status_allow = match config.status_allow.is_empty() {
        true => ClientAcl {
            allow: ["127.0.0.0/8", "::1/128"]
                .map(|net| net.parse().expect("a CIDR"))
                .to_vec(),
            deny: Vec::new(),
        },
        false => ClientAcl {
            allow: cidrs("status_allow", &config.status_allow, &mut p),
            deny: Vec::new(),
        },
    };
    if p.0.is_empty() {
        Ok(Settings {
            source: std::sync::Arc::new(config.clone()),
            log_level,
            drain_timeout,
            status,
            status_allow,
            admin,
            workers,
            max_connections,
            splice: config.splice.unwrap_or(true),
            mailbox,
            egress,
            routes,
        })
    } else {
        Err(p.0)
    }
}

/// The configured egresses, with `default` first (implicit unless the file defines it).
fn egresses(config: &Config, p: &mut Problems) -> Vec<Egress> {
    let implicit = EgressConfig::default();
    let default = config.egress.get(DEFAULT_EGRESS).unwrap_or(&implicit);
    let others = config.egress.iter().filter(|(name, _)| name.as_str() != DEFAULT_EGRESS);
    std::iter::once((DEFAULT_EGRESS, default))
        .chain(others.map(|(name, e)| (name.as_str(), e)))
        .map(|(name, e)| egress(name, e, p))
        .collect()
}

fn egress(name: &str, e: &EgressConfig, p: &mut Problems) -> Egress {
    let at = |field: &str| format!("egress.{name}.{field}");
    if name.is_empty() {
        p.add("egress", "an egress name is empty");
    }
    if name.chars().any(char::is_control) {
        p.add(
            format!("egress.{name:?}"),
            "an egress name must be printable, on one line",
        );
    }
    interface_name(at("device"), e.device.as_deref(), p);
    let source = e
        .source
        .as_ref()
        .and_then(|s| p.parse::<IpAddr>(at("source"), s, "an IP address"));
    let keepalive = e
        .keepalive
        .as_ref()
        .map(|_| p.duration(at("keepalive"), &e.keepalive, Duration::ZERO));
    if let Some(mss) = e.mss.filter(|m| !(88..=65535).contains(m)) {
        p.add(at("mss"), format!("{mss} is outside 88..=65535"));
    }
    if let Some(idle) = keepalive.filter(|k| *k < Duration::from_secs(1)) {
        p.add(
            at("keepalive"),
            format!("{idle:?} is under a second (TCP counts it in seconds)"),
        );
    }
    for (field, size) in [("send_buffer", e.send_buffer), ("recv_buffer", e.recv_buffer)] {
        if let Some(size) = size.filter(|n| !(1..=1 << 30).contains(n)) {
            p.add(at(field), format!("{size} is outside 1..=1073741824"));
        }
    }
    let via_proxy = e.via_proxy.as_ref().and_then(|addr| {
        let addr = p.parse::<SocketAddr>(at("via_proxy"), addr, "an IP:port address such as \"10.0.0.1:3128\"")?;
        let credentials = e
            .via_proxy_auth
            .as_ref()
            .map(|c| credentials(&at("via_proxy_auth"), c, p));
        Some(UpstreamProxy { addr, credentials })
    });
    if e.via_proxy.is_none() && e.via_proxy_auth.is_some() {
        p.add(at("via_proxy_auth"), "is set, but via_proxy is not");
    }
    Egress {
        name: name.to_string(),
        device: e.device.clone(),
        source,
        via_proxy,
        options: SocketOptions {
            nodelay: e.nodelay.unwrap_or(true),
            keepalive,
            mss: e.mss,
            send_buffer: e.send_buffer,
            recv_buffer: e.recv_buffer,
            mark: e.mark,
        },
    }
}

/// The egresses `names` names, or `None` when it names none (or an unknown one).
fn egress_ids(
    path: String,
    names: &Option<OneOrMany>,
    ids: &HashMap<&str, EgressId>,
    p: &mut Problems,
) -> Option<Vec<EgressId>> {
    let names = names.as_ref()?.names();
    if names.is_empty() {
        p.add(
            path.clone(),
            "an empty list: name at least one egress, or leave the field out",
        );
    }
    let mut found = Vec::new();
    for name in names {
        match ids.get(name) {
            Some(id) if !found.contains(id) => found.push(*id),
            Some(_) => p.add(path.clone(), format!("egress {name:?} is listed twice")),
            None => {
                let mut known: Vec<&str> = ids.keys().copied().collect();
                known.sort_unstable();
                p.add(
                    path.clone(),
                    format!("unknown egress {name:?} (known: {})", known.join(", ")),
                );
            }
        }
    }
    (!found.is_empty()).then_some(found)
}

fn route(i: usize, r: &RouteConfig, ids: &HashMap<&str, EgressId>, p: &mut Problems) -> Option<Route> {
    let at = |field: &str| format!("routes[{i}].{field}");
    if r.name.trim().is_empty() {
        p.add(at("name"), "missing: every route needs a name (not only spaces)");
    } else if r.name.trim() != r.name {
        p.add(at("name"), format!("{:?} starts or ends with spaces", r.name));
    }
    if r.name.chars().any(char::is_control) {
        p.add(at("name"), format!("{:?} must be printable, on one line", r.name));
    }
    match r.protocol {
        Protocol::Udp if r.backlog.is_some() => p.add(at("backlog"), "Udp routes have no listen backlog"),
        // A flow has no half-close: only its idle timeout ends it.
        Protocol::Udp if r.fin_timeout.is_some() => p.add(at("fin_timeout"), "Udp routes have no half-close"),
        Protocol::Tcp | Protocol::HttpConnect if r.max_flows.is_some() => {
            p.add(at("max_flows"), "only Udp routes have flows")
        }
        _ => {}
    }
    let accept_proxy = r.accept_proxy.as_ref().map(|a| {
        if a.trusted.is_empty() {
            p.add(
                at("accept_proxy.trusted"),
                "name the proxies in front: PROXY headers are never taken from anyone",
            );
        }
        AcceptProxy {
            trusted: ClientAcl {
                allow: cidrs(&at("accept_proxy.trusted"), &a.trusted, p),
                deny: Vec::new(),
            },
            timeout: p.duration(at("accept_proxy.timeout"), &a.timeout, Duration::from_secs(3)),
        }
    });
    if r.accept_proxy.is_some() && r.protocol != Protocol::Tcp {
        p.add(at("accept_proxy"), "only Tcp routes read a PROXY protocol header");
    }
    match (r.protocol, r.send_proxy) {
        (Protocol::HttpConnect, Some(_)) => p.add(at("send_proxy"), "HttpConnect routes send no PROXY protocol header"),
        (Protocol::Udp, Some(crate::proto::ProxyVersion::V1)) => {
            p.add(at("send_proxy"), "UDP datagrams carry only the v2 header: V2")
        }
        _ => {}
    }
    if let Some(backlog) = r.backlog.filter(|b| !(1..=65535).contains(b)) {
        p.add(at("backlog"), format!("{backlog} is outside 1..=65535"));
    }
    let listen = p.parse::<SocketAddr>(at("listen"), &r.listen, "an IP:port address such as \"127.0.0.1:8080\"");
    let egress = egress_ids(at("egress"), &r.egress, ids, p).unwrap_or_else(|| vec![EgressId(0)]);
    match (r.protocol, r.backends.is_empty()) {
        (Protocol::HttpConnect, false) => p.add(
            at("backends"),
            "an HttpConnect route takes its targets from clients: no backends",
        ),
        (Protocol::Tcp, true) if r.sni.is_some() => {}
        (Protocol::Tcp, false) if r.sni.is_some() => p.add(
            at("backends"),
            "a route with sni hands its connections to other routes: no backends",
        ),
        (Protocol::Tcp | Protocol::Udp, true) => p.add(at("backends"), "empty: a route needs at least one backend"),
        _ => {}
    }
    let connect = match (r.protocol, &r.connect) {
        (Protocol::HttpConnect, section) => Some(connect_settings(&at("connect"), section.as_ref(), p)),
        (_, Some(_)) => {
            p.add(at("connect"), "only HttpConnect routes have a connect section");
            None
        }
        (_, None) => None,
    };
    let backends: Vec<Backend> = (r.backends.iter().enumerate())
        .filter_map(|(j, b)| backend(&format!("routes[{i}].backends[{j}]"), b, &egress, ids, p))
        .collect();
    // Unset: every address of every backend once (a name's addresses are candidates each).
    let connect_attempts = r.connect_attempts.and_then(|n| {
        let n = NonZeroUsize::new(n);
        if n.is_none() {
            p.add(at("connect_attempts"), "must be at least 1");
        }
        n
    });
    let idle = match r.protocol {
        Protocol::Tcp | Protocol::HttpConnect => Duration::from_secs(600),
        Protocol::Udp => Duration::from_secs(60),
    };
    let max_flows = r.max_flows.unwrap_or(1024);
    let max_flows = NonZeroUsize::new(max_flows).filter(|n| n.get() <= 1 << 20).or_else(|| {
        p.add(at("max_flows"), format!("{max_flows} is outside 1..=1048576"));
        None
    });
    if r.protocol != Protocol::Udp && r.health.as_ref().is_some_and(|h| h.reply_timeout.is_some()) {
        p.add(at("health.reply_timeout"), "only Udp routes wait for replies");
    }
    let timeouts = Timeouts {
        idle: p.duration(at("idle_timeout"), &r.idle_timeout, idle),
        fin: p.duration(at("fin_timeout"), &r.fin_timeout, Duration::from_secs(30)),
    };
    interface_name(at("listen_device"), r.listen_device.as_deref(), p);
    let clients = ClientAcl {
        allow: cidrs(&at("allow_clients"), &r.allow_clients, p),
        deny: cidrs(&at("deny_clients"), &r.deny_clients, p),
    };
    // Everything is checked before anything is given up on, so one pass reports it all.
    let connect_timeout = p.duration(at("connect_timeout"), &r.connect_timeout, Duration::from_secs(3));
    let mut health = health(&at("health"), r.health.as_ref(), p);
    // Checks speak to the backend as sessions do: behind the header it expects.
    if let (Some(version), Some(check)) = (
        r.send_proxy.filter(|_| r.protocol == Protocol::Tcp),
        health.check.as_mut(),
    ) {
        check.preface = crate::proto::local_header(version);
    }
    let resolve_interval = p.duration(at("resolve_interval"), &r.resolve_interval, Duration::from_secs(30));
    if let Some(listen) = listen {
        for (j, b) in backends.iter().enumerate() {
            if let BackendAddr::Ip(addr) = b.addr {
                if loops_back(listen, addr) {
                    p.add(
                        format!("routes[{i}].backends[{j}].addr"),
                        format!("{addr} is this route's own listen address: every session would come back in"),
                    );
                }
            }
        }
    }
    Some(Route {
        name: r.name.clone(),
        listen: listen?,
        protocol: r.protocol,
        balance: r.balance,
        egress,
        egress_strategy: r.egress_strategy,
        backends,
        connect_timeout,
        connect_attempts,
        timeouts,
        backlog: r.backlog.unwrap_or(1024),
        max_flows: max_flows?,
        connect,
        health,
        resolve_interval,
        clients,
        listen_device: r.listen_device.clone(),
        max_connections: cap(at("max_connections"), r.max_connections, p),
        queue_timeout: p.duration(at("queue_timeout"), &r.queue_timeout, Duration::from_secs(5)),
        per_client: per_client(r, &at, p),
        send_proxy: r.send_proxy,
        accept_proxy,
        sni: r.sni.as_ref().map(|c| sni(&at("sni"), c, r.protocol, p)),
    })
}

fn sni(path: &str, c: &SniConfig, protocol: Protocol, p: &mut Problems) -> Sni {
    if protocol != Protocol::Tcp {
        p.add(path.to_string(), "only Tcp routes route by TLS server name");
    }
    let mut rules = Vec::new();
    for (i, rule) in c.routes.iter().enumerate() {
        if rule.names.is_empty() {
            p.add(
                format!("{path}.routes[{i}].names"),
                "empty: name at least one server name",
            );
        }
        for (j, name) in rule.names.iter().enumerate() {
            match HostPattern::parse(name) {
                Some(pattern) => rules.push((pattern, rule.route.clone())),
                None => p.add(
                    format!("{path}.routes[{i}].names[{j}]"),
                    format!("{name:?} is not a host name or *.suffix"),
                ),
            }
        }
    }
    Sni {
        rules,
        default: c.default.clone(),
        timeout: p.duration(format!("{path}.timeout"), &c.timeout, Duration::from_secs(5)),
    }
}

/// Every route an `sni` section names is a Tcp route without `sni` of its own.
fn sni_targets(config: &Config, p: &mut Problems) {
    for (i, r) in config.routes.iter().enumerate() {
        let Some(sni) = &r.sni else { continue };
        let named = (sni.routes.iter().enumerate())
            .map(|(j, rule)| (format!("routes[{i}].sni.routes[{j}].route"), &rule.route))
            .chain(sni.default.iter().map(|d| (format!("routes[{i}].sni.default"), d)));
        for (path, name) in named {
            match config.routes.iter().find(|t| &t.name == name) {
                None => p.add(path, format!("no route named {name:?}")),
                Some(t) if t.protocol != Protocol::Tcp || t.sni.is_some() => p.add(
                    path,
                    format!("route {name:?} must be a Tcp route without sni of its own"),
                ),
                Some(_) => {}
            }
        }
    }
}

/// A session cap in 1..=1048576, if given.
fn cap(path: String, value: Option<usize>, p: &mut Problems) -> Option<NonZeroUsize> {
    let n = value?;
    let ok = NonZeroUsize::new(n).filter(|n| n.get() <= 1 << 20);
    if ok.is_none() {
        p.add(path, format!("{n} is outside 1..=1048576"));
    }
    ok
}

/// A route's `per_client` limits: each count in 1..=1048576, `burst` only with `per_second`.
fn per_client(r: &RouteConfig, at: &dyn Fn(&str) -> String, p: &mut Problems) -> Option<crate::limits::ClientLimits> {
    let c = r.per_client.as_ref()?;
    if r.protocol == Protocol::Udp {
        p.add(
            at("per_client"),
            "only Tcp and HttpConnect routes have per-client limits",
        );
    }
    let mut count = |field: &str, value: Option<u32>| {
        let n = value?;
        let ok = std::num::NonZeroU32::new(n).filter(|n| n.get() <= 1 << 20);
        if ok.is_none() {
            p.add(
                at(&format!("per_client.{field}")),
                format!("{n} is outside 1..=1048576"),
            );
        }
        ok
    };
    let max_connections = count("max_connections", c.max_connections);
    let per_second = count("per_second", c.per_second);
    let burst = count("burst", c.burst);
    if c.burst.is_some() && c.per_second.is_none() {
        p.add(at("per_client.burst"), "a burst needs a per_second rate");
    }
    if c.max_connections.is_none() && c.per_second.is_none() {
        p.add(
            at("per_client"),
            "names no limit: give max_connections, per_second or both",
        );
    }
    Some(crate::limits::ClientLimits {
        max_connections,
        per_second,
        burst: burst.or(per_second).map_or(0, |n| n.get()),
    })
}

/// An interface name as Linux takes it, if given.
fn interface_name(path: String, device: Option<&str>, p: &mut Problems) {
    if let Some(device) = device {
        if device.is_empty() || device.len() > IFNAME_MAX || device.contains(['/', ' ', '\0']) {
            p.add(
                path,
                format!("{device:?} is not an interface name (1 to {IFNAME_MAX} bytes)"),
            );
        }
    }
}

/// A list of CIDR ranges, each problem by its index.
fn cidrs(path: &str, list: &[String], p: &mut Problems) -> Vec<IpNet> {
    (list.iter().enumerate())
        .filter_map(|(i, n)| p.parse::<IpNet>(format!("{path}[{i}]"), n, "a CIDR range such as \"10.0.0.0/8\""))
        .collect()
}

/// A backend at `addr` is the listener at `listen` itself.
fn loops_back(listen: SocketAddr, addr: SocketAddr) -> bool {
    let (listen, addr) = (unmapped(listen), unmapped(addr));
    listen.port() == addr.port()
        && (listen.ip() == addr.ip()
            || (listen.ip().is_unspecified() && (addr.ip().is_loopback() || addr.ip().is_unspecified())))
}

/// The admin socket's path: absolute, and not the status page's.
fn admin_path(text: &str, status: Option<&StatusAddr>, p: &mut Problems) -> Option<std::path::PathBuf> {
    let path = std::path::Path::new(text);
    if !path.is_absolute() || path.file_name().is_none() {
        let e = format!("{text:?}: the admin socket needs an absolute path, as in \"/run/relayd/admin.sock\"");
        p.add("admin", e);
        return None;
    }
    if status.is_some_and(|s| *s == StatusAddr::Unix(path.to_path_buf())) {
        p.add("admin", format!("{text:?} is the status page's socket too"));
        return None;
    }
    Some(path.to_path_buf())
}

/// `IP:port`, or `unix:PATH` (an absolute path) for a Unix socket.
fn status_addr(text: &str, p: &mut Problems) -> Option<StatusAddr> {
    if let Some(path) = text.strip_prefix("unix:") {
        let path = std::path::Path::new(path);
        if !path.is_absolute() || path.file_name().is_none() {
            p.add(
                "status",
                format!("{text:?}: a Unix socket needs an absolute path, as in \"unix:/run/relayd.sock\""),
            );
            return None;
        }
        return Some(StatusAddr::Unix(path.to_path_buf()));
    }
    let what = "an IP:port address such as \"127.0.0.1:9901\", or unix:PATH";
    p.parse::<SocketAddr>("status".into(), text, what).map(StatusAddr::Tcp)
}

/// Two listeners of one transport (Tcp and HttpConnect routes and the status page share TCP's)
/// on one port where one address covers the other: the second cannot bind.
fn listeners_apart(config: &Config, status: Option<SocketAddr>, p: &mut Problems) {
    let tcp = |protocol: Protocol| protocol != Protocol::Udp;
    let mut seen: Vec<(String, bool, SocketAddr)> = Vec::new();
    let routes = (config.routes.iter().enumerate())
        .filter_map(|(i, r)| Some((format!("routes[{i}].listen"), tcp(r.protocol), r.listen.parse().ok()?)));
    for (path, is_tcp, addr) in routes.chain(status.map(|a| ("status".to_string(), true, a))) {
        let addr = unmapped(addr);
        if addr.port() == 0 {
            continue;
        }
        let covers = |a: IpAddr, b: IpAddr| a == b || a.is_unspecified() && (a.is_ipv6() || b.is_ipv4());
        let clash = seen.iter().find(|(_, t, other)| {
            *t == is_tcp
                && other.port() == addr.port()
                && (covers(other.ip(), addr.ip()) || covers(addr.ip(), other.ip()))
        });
        if let Some((first, _, other)) = clash {
            let first = first.trim_end_matches(".listen");
            p.add(
                path.clone(),
                format!("{addr} clashes with {first}, which listens on {other}"),
            );
        }
        seen.push((path, is_tcp, addr));
    }
}

/// Routes whose backends lead, through other routes' listeners, back to themselves: every
/// session picked there would be relayed round the loop until the session cap is full. A
/// route that hands on to another (a chain) is fine; a cycle is refused, once, at the
/// backend that closes it. A listener on an unspecified address is taken to be reached by a
/// backend on loopback or on that address.
fn no_loops(config: &Config, routes: &[Route], p: &mut Problems) {
    let reaches = |b: SocketAddr, r: &Route| {
        let (b, l) = (unmapped(b), unmapped(r.listen));
        l.port() != 0
            && b.port() == l.port()
            && (b.ip() == l.ip() || l.ip().is_unspecified() && (b.ip().is_loopback() || b.ip().is_unspecified()))
    };
    let same_kind = |a: &Route, b: &Route| (a.protocol == Protocol::Udp) == (b.protocol == Protocol::Udp);
    // Edges: route i's backend k reaches route j.
    let edges: Vec<Vec<(usize, usize)>> = (routes.iter())
        .map(|from| {
            let ips = from.backends.iter().enumerate().filter_map(|(k, b)| match b.addr {
                BackendAddr::Ip(addr) => Some((k, addr)),
                BackendAddr::Name { .. } => None,
            });
            ips.flat_map(|(k, addr)| {
                // A route that is its own backend is refused on its own (its own listen address).
                (routes.iter().enumerate())
                    .filter(move |(_, to)| !std::ptr::eq(*to, from) && same_kind(from, to) && reaches(addr, to))
                    .map(move |(j, _)| (k, j))
            })
            .collect()
        })
        .collect();
    let mut reported = vec![false; routes.len()];
    for start in 0..routes.len() {
        // Depth-first from `start`, looking for the way back to it.
        let mut stack = vec![(start, 0usize)];
        let mut seen = vec![false; routes.len()];
        let mut path: Vec<(usize, usize)> = Vec::new();
        while let Some((at, next)) = stack.pop() {
            let Some(&(k, to)) = edges[at].get(next) else {
                path.pop();
                continue;
            };
            stack.push((at, next + 1));
            if to == start && !reported[start] {
                let trail: Vec<&str> = (path.iter().map(|(r, _)| routes[*r].name.as_str()))
                    .chain([routes[at].name.as_str(), routes[start].name.as_str()])
                    .collect();
                let i = config
                    .routes
                    .iter()
                    .position(|c| c.name == routes[at].name)
                    .unwrap_or(at);
                let addr = &routes[at].backends[k].addr;
                p.add(
                    format!("routes[{i}].backends[{k}].addr"),
                    format!(
                        "{addr} is route {}'s listener, and the routes lead round in a loop ({}): every session would go round until the session cap is full",
                        routes[to].name,
                        trail.join(" → ")
                    ),
                );
                trail.iter().for_each(|name| {
                    if let Some(r) = routes.iter().position(|r| r.name == *name) {
                        reported[r] = true;
                    }
                });
            } else if !seen[to] && to != start {
                seen[to] = true;
                path.push((at, k));
                stack.push((to, 0));
            }
        }
    }
}

fn backend(
    path: &str,
    b: &BackendConfig,
    route_egress: &[EgressId],
    ids: &HashMap<&str, EgressId>,
    p: &mut Problems,
) -> Option<Backend> {
    let at = |field: &str| format!("{path}.{field}");
    let egress = egress_ids(at("egress"), &b.egress, ids, p).unwrap_or_else(|| route_egress.to_vec());
    let addr = match b.addr.parse::<SocketAddr>() {
        Ok(addr) if addr.port() == 0 => {
            p.add(at("addr"), format!("{addr} has port 0"));
            return None;
        }
        Ok(addr) => BackendAddr::Ip(addr),
        Err(_) => {
            let named = b.addr.rsplit_once(':').and_then(|(host, port)| {
                let port = port.parse::<u16>().ok().filter(|p| *p != 0)?;
                let plain = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_');
                (!host.is_empty() && host.chars().all(plain)).then(|| BackendAddr::Name {
                    host: host.to_string(),
                    port,
                })
            });
            if named.is_none() {
                p.add(
                    at("addr"),
                    format!(
                        "{:?} is not IP:port or host:port, such as \"10.0.0.1:80\" or \"db.internal:5432\"",
                        b.addr
                    ),
                );
            }
            named?
        }
    };
    Some(Backend {
        addr,
        egress,
        weight: b.weight.unwrap_or(1),
    })
}

fn health(path: &str, h: Option<&HealthConfig>, p: &mut Problems) -> Health {
    let default = HealthConfig::default();
    let h = h.unwrap_or(&default);
    let at = |field: &str| format!("{path}.{field}");
    let count = |p: &mut Problems, field: &str, value: Option<u32>, default: u32| match value {
        Some(0) => {
            p.add(at(field), "must be at least 1");
            default
        }
        other => other.unwrap_or(default),
    };
    let check = h.check.as_ref().map(|c| {
        let at = |field: &str| format!("{path}.check.{field}");
        let bytes = |text: &Option<String>| text.as_ref().map(|t| unescape(t));
        Check {
            preface: Vec::new(),
            interval: p.duration(at("interval"), &c.interval, Duration::from_secs(5)),
            timeout: p.duration(at("timeout"), &c.timeout, Duration::from_secs(2)),
            rise: count(p, "check.rise", c.rise, 2),
            send: bytes(&c.send),
            expect: bytes(&c.expect).filter(|e| !e.is_empty()),
        }
    });
    let cooldown = p.duration(at("cooldown"), &h.cooldown, Duration::from_secs(10));
    let cooldown_max = p.duration(at("cooldown_max"), &h.cooldown_max, Duration::from_secs(300));
    if cooldown_max < cooldown {
        p.add(at("cooldown_max"), "is shorter than cooldown");
    }
    let reply_timeout = h
        .reply_timeout
        .as_ref()
        .map(|_| p.duration(at("reply_timeout"), &h.reply_timeout, Duration::ZERO));
    Health {
        fall: count(p, "fall", h.fall, 3),
        cooldown,
        cooldown_max,
        check,
        reply_timeout,
    }
}

/// `\r`, `\n`, `\t`, `\\` and `\0` in check strings.
fn unescape(text: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        let c = match (c, c == '\\') {
            (_, true) => match chars.next() {
                Some('r') => '\r',
                Some('n') => '\n',
                Some('t') => '\t',
                Some('0') => '\0',
                Some(other) => other,
                None => '\\',
            },
            (c, false) => c,
        };
        let mut buf = [0u8; 4];
        out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
    }
    out
}

/// Basic credentials as sent on the wire.
fn credentials(path: &str, c: &Credentials, p: &mut Problems) -> String {
    if c.user.is_empty() || c.user.contains(':') {
        p.add(format!("{path}.user"), "must be non-empty and hold no ':'");
    }
    crate::http::basic_credentials(&c.user, &c.password)
}

fn connect_settings(path: &str, c: Option<&ConnectConfig>, p: &mut Problems) -> ConnectSettings {
    let default = ConnectConfig::default();
    let c = c.unwrap_or(&default);
    let at = |field: &str| format!("{path}.{field}");
    let ports = c.allow_ports.clone().unwrap_or_else(|| vec![443]);
    if ports.is_empty() || ports.contains(&0) {
        p.add(at("allow_ports"), "needs at least one port, and port 0 is none");
    }
    let hosts = (c.allow_hosts.iter().enumerate())
        .filter_map(|(i, h)| {
            let pattern = HostPattern::parse(h);
            if pattern.is_none() {
                p.add(
                    format!("{}[{i}]", at("allow_hosts")),
                    format!("{h:?} is not a host name or *.suffix"),
                );
            }
            pattern
        })
        .collect();
    let allow = cidrs(&at("allow_cidrs"), &c.allow_cidrs, p);
    let mut deny = cidrs(&at("deny_cidrs"), &c.deny_cidrs, p);
    deny.extend(
        DEFAULT_DENY
            .iter()
            .map(|n| n.parse::<IpNet>().expect("the built-in ranges parse")),
    );
    let head_max = c.head_max.unwrap_or(8192);
    if !(1024..=65536).contains(&head_max) {
        p.add(at("head_max"), format!("{head_max} is outside 1024..=65536"));
    }
    let credentials = (c.auth.iter().enumerate())
        .map(|(i, cred)| credentials(&format!("{}[{i}]", at("auth")), cred, p))
        .collect();
    ConnectSettings {
        acl: Acl {
            ports,
            hosts,
            allow,
            deny,
        },
        credentials,
        head_max,
        head_timeout: p.duration(at("head_timeout"), &c.head_timeout, Duration::from_secs(10)),
    }
}

/// Two routes may share neither a name nor a listening address and protocol (port 0 excepted;
/// a TCP and a UDP route may share an address, as DNS does).
fn unique_routes(config: &Config, p: &mut Problems) {
    let mut names: HashMap<&str, usize> = HashMap::new();
    for (i, r) in config.routes.iter().enumerate() {
        if let Some(first) = names.insert(r.name.as_str(), i).filter(|_| !r.name.is_empty()) {
            p.add(
                format!("routes[{i}].name"),
                format!("{:?} is also the name of routes[{first}]", r.name),
            );
        }
    }
}

/// Every problem validation finds in `text` (none for a valid config), for the tests.
#[cfg(test)]
fn problems(text: &str) -> Vec<String> {
    let config = Config::parse(text, "test").expect("parses");
    match config.validate() {
        Ok(_) => vec![],
        Err(e) => e.problems().iter().map(|p| p.to_string()).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"(routes: [(name: "a", listen: "127.0.0.1:0", backends: [(addr: "127.0.0.1:1")])])"#;

    #[test]
    fn a_minimal_route_takes_the_defaults() {
        let settings = Config::parse(GOOD, "test").unwrap().validate().unwrap();
        let route = &settings.routes[0];
        assert_eq!(route.connect_timeout, Duration::from_secs(3));
        assert_eq!(route.connect_attempts, None, "every address once");
        assert_eq!(route.timeouts.idle, Duration::from_secs(600));
        assert_eq!(settings.egress[0].name, DEFAULT_EGRESS);
        assert_eq!(route.backends[0].egress, [EgressId(0)]);
        assert_eq!(route.backends[0].weight, 1);
        assert_eq!(route.health.fall, 3);
        assert_eq!(route.health.check, None);
    }

    #[test]
    fn backend_egress_overrides_the_route_egress() {
        let text = r#"(egress: {"a": (source: "127.0.0.2"), "b": (device: "lo")},
            routes: [(name: "r", listen: "127.0.0.1:0", egress: "a",
                backends: [(addr: "127.0.0.1:1"), (addr: "127.0.0.1:2", egress: "b")])])"#;
        let settings = Config::parse(text, "test").unwrap().validate().unwrap();
        let names: Vec<&str> = settings.routes[0]
            .backends
            .iter()
            .map(|b| settings.egress[b.egress[0].0].name.as_str())
            .collect();
        assert_eq!(names, ["a", "b"]);
    }

    #[test]
    fn every_problem_is_reported_with_its_path() {
        let text = r#"(egress: {"up": (source: "nope", mss: 5)},
            routes: [
                (name: "a", listen: "127.0.0.1:80", egress: "missing", backends: []),
                (name: "a", listen: "localhost", backends: [(addr: "10.0.0.1")], idle_timeout: "0s"),
                (name: "c", listen: "127.0.0.1:80", backends: [(addr: "10.0.0.1:80")], connect_timeout: "soon"),
            ])"#;
        let found = problems(text);
        for expected in [
            "egress.up.source: \"nope\" is not an IP address",
            "egress.up.mss: 5 is outside 88..=65535",
            "routes[0].egress: unknown egress \"missing\"",
            "routes[0].backends: empty",
            "routes[1].name: \"a\" is also the name of routes[0]",
            "routes[1].listen: \"localhost\" is not an IP:port",
            "routes[1].backends[0].addr: \"10.0.0.1\" is not IP:port or host:port",
            "routes[1].idle_timeout: must be greater than zero",
            "routes[2].listen: 127.0.0.1:80 clashes with routes[0]",
            "routes[2].connect_timeout: \"soon\" is not a duration",
        ] {
            assert!(
                found.iter().any(|f| f.starts_with(expected)),
                "missing {expected:?} in {found:#?}"
            );
        }
        assert_eq!(found.len(), 10, "{found:#?}");
    }

    #[test]
    fn syntax_errors_give_line_and_column() {
        let err = Config::parse("(\n  routes: [\n    (name: 5)\n  ]\n)", "f.ron").unwrap_err();
        let text = err.to_string();
        assert!(text.starts_with("f.ron:3:"), "{text}");
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let err = Config::parse(r#"(routes: [(name: "a", lisen: "x")])"#, "f.ron").unwrap_err();
        assert!(err.to_string().contains("lisen"), "{err}");
    }

    #[test]
    fn connect_routes_take_no_backends_and_check_their_rules() {
        let text = r#"(egress: {"chain": (via_proxy: "nowhere", via_proxy_auth: (user: "a:b", password: "x"))},
            routes: [
                (name: "p", listen: "127.0.0.1:0", protocol: HttpConnect, backends: [(addr: "127.0.0.1:1")],
                 connect: (allow_ports: [0], allow_hosts: ["ok.test", "bad*"], allow_cidrs: ["10.0.0.0/33"], head_max: 10)),
                (name: "t", listen: "127.0.0.1:0", backends: [(addr: "127.0.0.1:1")], connect: ()),
            ])"#;
        let found = problems(text);
        for expected in [
            "egress.chain.via_proxy: \"nowhere\" is not an IP:port",
            "routes[0].backends: an HttpConnect route takes its targets from clients",
            "routes[0].connect.allow_ports: needs at least one port",
            "routes[0].connect.allow_hosts[1]: \"bad*\" is not a host name",
            "routes[0].connect.allow_cidrs[0]: \"10.0.0.0/33\" is not a CIDR range",
            "routes[0].connect.head_max: 10 is outside",
            "routes[1].connect: only HttpConnect routes have a connect section",
        ] {
            assert!(
                found.iter().any(|f| f.starts_with(expected)),
                "missing {expected:?} in {found:#?}"
            );
        }
    }

    #[test]
    fn a_connect_route_defaults_to_port_443_and_public_addresses() {
        let text = r#"(routes: [(name: "p", listen: "127.0.0.1:0", protocol: HttpConnect)])"#;
        let settings = Config::parse(text, "test").unwrap().validate().unwrap();
        let connect = settings.routes[0].connect.as_ref().unwrap();
        assert_eq!(connect.acl.ports, [443]);
        assert!(connect.acl.check_addr("127.0.0.1".parse().unwrap()).is_err());
        assert_eq!(
            (connect.head_max, connect.head_timeout),
            (8192, Duration::from_secs(10))
        );
        assert!(connect.credentials.is_empty());
    }

    #[test]
    fn egress_lists_names_weights_and_health() {
        let text = r#"(egress: {"a": (), "b": ()}, routes: [(name: "r", listen: "127.0.0.1:0",
            balance: WeightedRoundRobin, egress: ["a", "b"], egress_strategy: Failover,
            backends: [(addr: "db.internal:5432", weight: 5), (addr: "127.0.0.1:2", weight: 0, egress: "b")],
            health: (fall: 2, cooldown: "1s", check: (interval: "100ms", send: "PING\\r\\n", expect: "+PONG")))])"#;
        let settings = Config::parse(text, "test").unwrap().validate().unwrap();
        let r = &settings.routes[0];
        let names = |ids: &[EgressId]| {
            ids.iter()
                .map(|g| settings.egress[g.0].name.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(names(&r.egress), ["a", "b"]);
        assert_eq!(
            r.backends[0].addr,
            BackendAddr::Name {
                host: "db.internal".into(),
                port: 5432
            }
        );
        assert_eq!(
            (names(&r.backends[0].egress), r.backends[0].weight),
            (vec!["a".to_string(), "b".into()], 5)
        );
        assert_eq!(
            (names(&r.backends[1].egress), r.backends[1].weight),
            (vec!["b".to_string()], 0)
        );
        let check = r.health.check.as_ref().unwrap();
        assert_eq!(check.send.as_deref(), Some(&b"PING\r\n"[..]));
        assert_eq!((check.interval, check.rise), (Duration::from_millis(100), 2));
        let bad = r#"(routes: [(name: "r", listen: "127.0.0.1:0", egress: ["default", "default", "nope"],
            backends: [(addr: "no port")], health: (fall: 0, cooldown: "1m", cooldown_max: "1s"))])"#;
        let found = problems(bad);
        for expected in [
            "routes[0].egress: egress \"default\" is listed twice",
            "routes[0].egress: unknown egress \"nope\"",
            "routes[0].backends[0].addr: \"no port\" is not IP:port or host:port",
            "routes[0].health.fall: must be at least 1",
            "routes[0].health.cooldown_max: is shorter than cooldown",
        ] {
            assert!(
                found.iter().any(|f| f.starts_with(expected)),
                "missing {expected:?} in {found:#?}"
            );
        }
    }

    #[test]
    fn zero_attempts_and_bad_device_names_are_rejected() {
        let text = r#"(egress: {"x": (device: "a-name-far-too-long")},
            routes: [(name: "a", listen: "127.0.0.1:0", connect_attempts: 0, backends: [(addr: "127.0.0.1:1")])])"#;
        let found = problems(text);
        assert!(found.iter().any(|f| f.starts_with("egress.x.device:")), "{found:?}");
        assert!(
            found
                .iter()
                .any(|f| f.starts_with("routes[0].connect_attempts: must be at least 1")),
            "{found:?}"
        );
    }
}

#[cfg(test)]
mod edge_tests {
    use super::*;

    fn has(found: &[String], want: &str) -> bool {
        found.iter().any(|f| f.contains(want))
    }

    #[test]
    fn routes_that_lead_round_in_a_loop_are_refused_and_a_chain_is_not() {
        let found = problems(
            r#"(routes: [
                (name: "a", listen: "127.0.0.1:9101", backends: [(addr: "127.0.0.1:9102")]),
                (name: "b", listen: "0.0.0.0:9102", backends: [(addr: "127.0.0.1:1"), (addr: "127.0.0.1:9103")]),
                (name: "c", listen: "127.0.0.1:9103", backends: [(addr: "127.0.0.1:9101")]),
                (name: "self", listen: "127.0.0.1:9104", backends: [(addr: "127.0.0.1:9104")]),
                (name: "udp", listen: "127.0.0.1:9101", protocol: Udp, backends: [(addr: "127.0.0.1:9105")]),
            ])"#,
        );
        let loops: Vec<_> = found.iter().filter(|f| f.contains("in a loop")).collect();
        assert_eq!(loops.len(), 1, "one line a loop: {found:?}");
        assert!(
            loops[0].starts_with("routes[2].backends[0].addr") && loops[0].contains("a → b → c → a"),
            "{loops:?}"
        );
        // A route that is its own backend has a line of its own, not a second one.
        let own: Vec<_> = found
            .iter()
            .filter(|f| f.starts_with("routes[3].backends[0]"))
            .collect();
        assert!(own.len() == 1 && own[0].contains("own listen address"), "{own:?}");
        // A chain that ends at a real backend (a TCP route to a UDP one's port is none either).
        let chain = problems(
            r#"(routes: [
                (name: "front", listen: "127.0.0.1:9201", backends: [(addr: "127.0.0.1:9202")]),
                (name: "back", listen: "127.0.0.1:9202", backends: [(addr: "127.0.0.1:9203")]),
                (name: "u", listen: "127.0.0.1:9203", protocol: Udp, backends: [(addr: "127.0.0.1:9201")]),
            ])"#,
        );
        assert!(chain.is_empty(), "{chain:?}");
    }

    #[test]
    fn what_start_up_would_trip_on_is_found_in_one_pass() {
        let found = problems(
            r#"(status: "127.0.0.1:9000", workers: 2000, drain_timeout: "1000000000years", routes: [
                (name: "a", listen: "127.0.0.1:9000", backends: [(addr: "127.0.0.1:1")]),
                (name: "b", listen: "0.0.0.0:9001", backends: [(addr: "127.0.0.1:9001")]),
                (name: "c", listen: "[::ffff:127.0.0.1]:9002", protocol: HttpConnect),
                (name: "d", listen: "127.0.0.1:9002", backends: [(addr: "127.0.0.1:1")], max_flows: 5),
                (name: "e\nforged", listen: "127.0.0.1:9003", protocol: Udp, backlog: 5,
                    idle_timeout: "1ns", backends: [(addr: "127.0.0.1:1")]),
                (name: "f", listen: "not an address", connect_timeout: "0s", health: (cooldown: "1000years"),
                    backends: [(addr: "127.0.0.1:1")]),
            ])"#,
        );
        for want in [
            "status: 127.0.0.1:9000 clashes with routes[0], which listens on 127.0.0.1:9000",
            "workers: 2000 is outside 1..=256",
            "drain_timeout: \"1000000000years\" is outside 1ms..=365days",
            "routes[1].backends[0].addr: 127.0.0.1:9001 is this route's own listen address",
            "routes[3].listen: 127.0.0.1:9002 clashes with routes[2], which listens on 127.0.0.1:9002",
            "routes[3].max_flows: only Udp routes have flows",
            "routes[4].name: \"e\\nforged\" must be printable, on one line",
            "routes[4].backlog: Udp routes have no listen backlog",
            "routes[4].idle_timeout: \"1ns\" is outside 1ms..=365days",
            "routes[5].listen: \"not an address\" is not",
            "routes[5].connect_timeout: must be greater than zero",
            "routes[5].health.cooldown: \"1000years\" is outside",
        ] {
            assert!(has(&found, want), "missing {want:?} in {found:#?}");
        }
    }

    #[test]
    fn the_largest_accepted_durations_run_without_overflow() {
        let text = r#"(drain_timeout: "365days", routes: [(name: "a", listen: "127.0.0.1:0",
            idle_timeout: "365days", fin_timeout: "365days", connect_timeout: "365days",
            health: (cooldown: "365days", cooldown_max: "365days"), backends: [(addr: "127.0.0.1:1")])])"#;
        let settings = Config::parse(text, "test").unwrap().validate().unwrap();
        let now = std::time::Instant::now();
        for d in [
            settings.drain_timeout,
            settings.routes[0].timeouts.idle,
            settings.routes[0].health.cooldown,
        ] {
            assert!(
                now.checked_add(d.saturating_mul(1 << 10)).is_some(),
                "{d:?} and its doublings fit the clock"
            );
        }
    }

    #[test]
    fn an_sni_route_names_tcp_routes_that_exist_and_has_no_backends_of_its_own() {
        let found = problems(
            r#"(routes: [
                (name: "u", listen: "127.0.0.1:0", protocol: Udp, backends: [(addr: "127.0.0.1:1")]),
                (name: "tls", listen: "127.0.0.1:0", backends: [(addr: "127.0.0.1:1")], sni: (default: "nowhere",
                    routes: [(names: ["ok.test", "bad*name"], route: "u")])),
            ])"#,
        );
        for want in [
            "routes[1].backends: a route with sni hands its connections to other routes",
            "routes[1].sni.routes[0].names[1]: \"bad*name\" is not a host name",
            "routes[1].sni.routes[0].route: route \"u\" must be a Tcp route without sni",
            "routes[1].sni.default: no route named \"nowhere\"",
        ] {
            assert!(has(&found, want), "missing {want:?} in {found:#?}");
        }
    }

    #[test]
    fn per_client_limits_name_a_limit_in_range_on_a_stream_route() {
        let found = problems(
            r#"(routes: [
                (name: "u", listen: "127.0.0.1:0", protocol: Udp, backends: [(addr: "127.0.0.1:1")], per_client: (max_connections: 5)),
                (name: "t", listen: "127.0.0.1:0", backends: [(addr: "127.0.0.1:1")], per_client: (max_connections: 0, burst: 9)),
                (name: "e", listen: "127.0.0.1:0", backends: [(addr: "127.0.0.1:1")], per_client: ()),
            ])"#,
        );
        for want in [
            "routes[0].per_client: only Tcp and HttpConnect routes have per-client limits",
            "routes[1].per_client.max_connections: 0 is outside 1..=1048576",
            "routes[1].per_client.burst: a burst needs a per_second rate",
            "routes[2].per_client: names no limit",
        ] {
            assert!(has(&found, want), "missing {want:?} in {found:#?}");
        }
        let ok = r#"(routes: [(name: "t", listen: "127.0.0.1:0", backends: [(addr: "127.0.0.1:1")], per_client: (max_connections: 10, per_second: 5))])"#;
        let route = &Config::parse(ok, "test").unwrap().validate().unwrap().routes[0];
        let limits = route.per_client.expect("limits");
        assert_eq!(
            (
                limits.max_connections.map(|n| n.get()),
                limits.per_second.map(|n| n.get()),
                limits.burst
            ),
            (Some(10), Some(5), 5)
        );
    }

    #[test]
    fn a_blank_route_name_and_a_fin_timeout_on_a_udp_route_are_refused() {
        let found = problems(
            r#"(routes: [
                (name: " ", listen: "127.0.0.1:0", backends: [(addr: "127.0.0.1:1")]),
                (name: " web", listen: "127.0.0.1:0", backends: [(addr: "127.0.0.1:1")]),
                (name: "u", listen: "127.0.0.1:0", protocol: Udp, fin_timeout: "5s", backends: [(addr: "127.0.0.1:1")]),
            ])"#,
        );
        for want in [
            "routes[0].name: missing",
            "routes[1].name: \" web\" starts or ends with spaces",
            "routes[2].fin_timeout: Udp routes have no half-close",
        ] {
            assert!(has(&found, want), "missing {want:?} in {found:#?}");
        }
    }
}
