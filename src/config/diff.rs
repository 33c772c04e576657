//! What a reload changes: the running [`Settings`] against a new file's, in the words the
//! reload logs and `relayd --check` prints (`route web: backend 10.0.0.3:80 added`).

use std::fmt::Debug;

use super::{Backend, Egress, Route, Settings};

/// One difference between two configs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub line: String,
    /// Only a restart applies it (`workers`, the status address); a reload leaves it as it runs.
    pub restart: bool,
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.restart {
            false => f.write_str(&self.line),
            true => write!(f, "{} (takes effect after a restart)", self.line),
        }
    }
}

/// Values longer than this are said to have "changed", not shown.
const SHOWN_MAX: usize = 48;

/// Every difference from `old` to `new`, relay-wide first, then egresses, then routes in the
/// new file's order (removed routes last).
pub fn diff(old: &Settings, new: &Settings) -> Vec<Change> {
    let mut out = Changes::default();
    let level = |s: &Settings| s.log_level.to_string().to_ascii_lowercase();
    out.field("", "log_level", &Text(level(old)), &Text(level(new)));
    out.field("", "drain_timeout", &old.drain_timeout, &new.drain_timeout);
    clients(&mut out, "", "status_allow", &old.status_allow, &new.status_allow);
    out.field("", "max_connections", &old.max_connections, &new.max_connections);
    out.field("", "splice", &old.splice, &new.splice);
    out.restart = true;
    let status = |s: &Settings| Text(s.status.as_ref().map_or("none".into(), |a| a.to_string()));
    out.field("", "status", &status(old), &status(new));
    let admin = |s: &Settings| Text(s.admin.as_ref().map_or("none".into(), |a| a.display().to_string()));
    out.field("", "admin", &admin(old), &admin(new));
    out.field("", "workers", &old.workers, &new.workers);
    out.field("", "mailbox", &old.mailbox, &new.mailbox);
    out.restart = false;
    for e in &new.egress {
        match old.egress.iter().find(|o| o.name == e.name) {
            None => out.say(format!("egress {}: added", e.name)),
            Some(o) => out.within(&format!("egress {}: ", e.name), o != e, |out| egress(out, o, e)),
        }
    }
    for o in old
        .egress
        .iter()
        .filter(|o| new.egress.iter().all(|e| e.name != o.name))
    {
        out.say(format!("egress {}: removed", o.name));
    }
    for r in &new.routes {
        match old.routes.iter().find(|o| o.name == r.name) {
            None => out.say(format!("route {}: added ({:?} on {})", r.name, r.protocol, r.listen)),
            Some(o) => out.within(&format!("route {}: ", r.name), o != r, |out| {
                route(out, (old, o), (new, r))
            }),
        }
    }
    for o in old
        .routes
        .iter()
        .filter(|o| new.routes.iter().all(|r| r.name != o.name))
    {
        out.say(format!("route {}: removed (its live sessions drain)", o.name));
    }
    out.list
}

/// The changes found so far; `restart` marks those found while it is set.
#[derive(Default)]
struct Changes {
    list: Vec<Change>,
    restart: bool,
}

impl Changes {
    fn say(&mut self, line: String) {
        self.list.push(Change {
            line,
            restart: self.restart,
        });
    }

    /// The changes `find` finds in one egress or route; when it finds none although the two
    /// differ (a setting this file does not name yet), `changed` still says so, so that a
    /// reload never skips what it cannot name.
    fn within(&mut self, prefix: &str, differ: bool, find: impl FnOnce(&mut Self)) {
        let before = self.list.len();
        find(self);
        if differ && self.list.len() == before {
            self.say(format!("{prefix}changed"));
        }
    }

    /// `prefix` `name`: `old → new` (or `changed`, for long values), when they differ.
    fn field<T: PartialEq + Debug>(&mut self, prefix: &str, name: &str, old: &T, new: &T) {
        if old == new {
            return;
        }
        let (a, b) = (shown(old), shown(new));
        let line = match a.len().max(b.len()) <= SHOWN_MAX {
            true => format!("{prefix}{name} {a} → {b}"),
            false => format!("{prefix}{name} changed"),
        };
        self.say(line);
    }
}

/// A value as the diff shows it: `Option`s without their `Some(..)`.
fn shown<T: Debug>(value: &T) -> String {
    let text = format!("{value:?}");
    match text.strip_prefix("Some(").and_then(|t| t.strip_suffix(')')) {
        Some(inner) => inner.to_string(),
        None if text == "None" => "none".into(),
        None => text,
    }
}

fn egress(out: &mut Changes, old: &Egress, new: &Egress) {
    let at = format!("egress {}: ", old.name);
    out.field(&at, "device", &old.device, &new.device);
    out.field(&at, "source", &old.source, &new.source);
    let (o, n) = (&old.options, &new.options);
    out.field(&at, "nodelay", &o.nodelay, &n.nodelay);
    out.field(&at, "keepalive", &o.keepalive, &n.keepalive);
    out.field(&at, "mss", &o.mss, &n.mss);
    out.field(&at, "send_buffer", &o.send_buffer, &n.send_buffer);
    out.field(&at, "recv_buffer", &o.recv_buffer, &n.recv_buffer);
    out.field(&at, "mark", &o.mark, &n.mark);
    out.field(&at, "via_proxy", &old.via_proxy, &new.via_proxy);
}

/// The names of a backend's or route's egresses, as its own settings list them.
fn egress_names(settings: &Settings, ids: &[super::EgressId]) -> Vec<String> {
    (ids.iter())
        .map(|id| {
            settings
                .egress
                .get(id.0)
                .map_or_else(|| format!("#{}", id.0), |e| e.name.clone())
        })
        .collect()
}

fn route(out: &mut Changes, (old_cfg, old): (&Settings, &Route), (new_cfg, new): (&Settings, &Route)) {
    let at = format!("route {}: ", old.name);
    out.field(&at, "listen", &old.listen, &new.listen);
    out.field(&at, "protocol", &old.protocol, &new.protocol);
    out.field(&at, "listen_device", &old.listen_device, &new.listen_device);
    out.field(&at, "backlog", &old.backlog, &new.backlog);
    out.field(&at, "balance", &old.balance, &new.balance);
    let (og, ng) = (egress_names(old_cfg, &old.egress), egress_names(new_cfg, &new.egress));
    out.field(&at, "egress", &og, &ng);
    out.field(&at, "egress_strategy", &old.egress_strategy, &new.egress_strategy);
    out.field(&at, "connect_timeout", &old.connect_timeout, &new.connect_timeout);
    out.field(&at, "connect_attempts", &old.connect_attempts, &new.connect_attempts);
    out.field(&at, "idle_timeout", &old.timeouts.idle, &new.timeouts.idle);
    out.field(&at, "fin_timeout", &old.timeouts.fin, &new.timeouts.fin);
    out.field(&at, "max_flows", &old.max_flows, &new.max_flows);
    out.field(&at, "connect", &old.connect, &new.connect);
    let (oh, nh) = (&old.health, &new.health);
    out.field(&at, "health.fall", &oh.fall, &nh.fall);
    out.field(&at, "health.cooldown", &oh.cooldown, &nh.cooldown);
    out.field(&at, "health.cooldown_max", &oh.cooldown_max, &nh.cooldown_max);
    out.field(&at, "health.reply_timeout", &oh.reply_timeout, &nh.reply_timeout);
    // A check's payload may carry a password (`AUTH …`): said to have changed, not shown.
    if oh.check != nh.check {
        out.say(format!("{at}health.check changed"));
    }
    out.field(&at, "resolve_interval", &old.resolve_interval, &new.resolve_interval);
    clients(out, &at, "clients", &old.clients, &new.clients);
    out.field(&at, "max_connections", &old.max_connections, &new.max_connections);
    out.field(&at, "queue_timeout", &old.queue_timeout, &new.queue_timeout);
    out.field(&at, "per_client", &old.per_client, &new.per_client);
    out.field(&at, "send_proxy", &old.send_proxy, &new.send_proxy);
    out.field(&at, "accept_proxy", &old.accept_proxy, &new.accept_proxy);
    out.field(&at, "sni", &old.sni, &new.sni);
    for b in &new.backends {
        match old.backends.iter().find(|o| o.addr == b.addr) {
            None => out.say(format!("{at}backend {} added", b.addr)),
            Some(o) => backend(out, &at, (old_cfg, o), (new_cfg, b)),
        }
    }
    for o in old
        .backends
        .iter()
        .filter(|o| new.backends.iter().all(|b| b.addr != o.addr))
    {
        out.say(format!("{at}backend {} removed", o.addr));
    }
    let order = |r: &Route| r.backends.iter().map(|b| b.addr.to_string()).collect::<Vec<_>>();
    let (mut was, mut is) = (order(old), order(new));
    if was != is {
        was.sort();
        is.sort();
        if was == is {
            out.say(format!("{at}backends reordered"));
        }
    }
}

/// A client list's two halves, each as the list of ranges it is.
fn clients(out: &mut Changes, at: &str, name: &str, old: &crate::acl::ClientAcl, new: &crate::acl::ClientAcl) {
    let list = |nets: &[ipnet::IpNet]| {
        Text(format!(
            "[{}]",
            nets.iter().map(|n| n.to_string()).collect::<Vec<_>>().join(", ")
        ))
    };
    out.field(at, &format!("{name}.allow"), &list(&old.allow), &list(&new.allow));
    out.field(at, &format!("{name}.deny"), &list(&old.deny), &list(&new.deny));
}

/// A value the diff shows as this text, not through Debug.
#[derive(PartialEq)]
struct Text(String);

impl Debug for Text {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn backend(out: &mut Changes, at: &str, (old_cfg, old): (&Settings, &Backend), (new_cfg, new): (&Settings, &Backend)) {
    let at = format!("{at}backend {} ", old.addr);
    out.field(&at, "weight", &old.weight, &new.weight);
    let (og, ng) = (egress_names(old_cfg, &old.egress), egress_names(new_cfg, &new.egress));
    out.field(&at, "egress", &og, &ng);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Config;

    fn settings(text: &str) -> Settings {
        Config::parse(text, "test").unwrap().validate().unwrap()
    }

    fn lines(old: &str, new: &str) -> Vec<String> {
        diff(&settings(old), &settings(new))
            .iter()
            .map(Change::to_string)
            .collect()
    }

    /// A reload applies nothing when the diff finds no change, so a relay-wide setting the
    /// diff does not compare would be silently left as it runs. Each field of `Settings` is
    /// changed in turn, and the diff must name it.
    #[test]
    fn the_diff_sees_a_change_to_every_relay_wide_setting() {
        let base = settings(r#"(routes: [(name: "a", listen: "127.0.0.1:0", backends: [(addr: "127.0.0.1:1")])])"#);
        // Every field, named so that a new one fails to compile here until it has its case
        // below (and its place in `diff`).
        let Settings {
            source: _,
            log_level: _,
            drain_timeout: _,
            status: _,
            status_allow: _,
            admin: _,
            workers: _,
            max_connections: _,
            splice: _,
            mailbox: _,
            egress: _,
            routes: _,
        } = &base;
        type Edit = (&'static str, fn(&mut Settings));
        let changes: [Edit; 11] = [
            ("log_level", |s| s.log_level = log::LevelFilter::Trace),
            ("drain_timeout", |s| {
                s.drain_timeout += std::time::Duration::from_secs(1)
            }),
            ("status", |s| {
                s.status = Some(super::super::StatusAddr::Unix("/run/x".into()))
            }),
            ("status_allow", |s| {
                s.status_allow.deny.push("10.0.0.0/8".parse().unwrap())
            }),
            ("admin", |s| s.admin = Some("/run/a.sock".into())),
            ("workers", |s| s.workers = Some(std::num::NonZeroUsize::new(7).unwrap())),
            ("max_connections", |s| {
                s.max_connections = Some(std::num::NonZeroUsize::new(7).unwrap())
            }),
            ("splice", |s| s.splice = !s.splice),
            ("mailbox", |s| s.mailbox = s.mailbox.saturating_add(1)),
            ("egress", |s| s.egress[0].options.mark = Some(7)),
            ("routes", |s| s.routes[0].name = "b".into()),
        ];
        for (field, change) in changes {
            let mut new = base.clone();
            change(&mut new);
            assert!(
                !diff(&base, &new).is_empty(),
                "a change to {field} is not seen by the diff"
            );
        }
    }

    #[test]
    fn a_diff_names_each_change_in_words() {
        let old = r#"(workers: 2, egress: {"up1": (device: "eth1")}, routes: [
            (name: "web", listen: "127.0.0.1:8080", backends: [(addr: "10.0.0.1:80"), (addr: "10.0.0.2:80")]),
            (name: "gone", listen: "127.0.0.1:8081", backends: [(addr: "10.0.0.1:81")])])"#;
        let new = r#"(workers: 3, drain_timeout: "10s", egress: {"up1": (device: "eth2")}, routes: [
            (name: "web", listen: "127.0.0.1:8080", balance: LeastConnections,
                backends: [(addr: "10.0.0.1:80", weight: 5), (addr: "10.0.0.3:80", egress: "up1")]),
            (name: "new", listen: "127.0.0.1:8082", backends: [(addr: "10.0.0.1:82")])])"#;
        assert_eq!(
            lines(old, new),
            [
                "drain_timeout 30s → 10s",
                "workers 2 → 3 (takes effect after a restart)",
                "egress up1: device \"eth1\" → \"eth2\"",
                "route web: balance RoundRobin → LeastConnections",
                "route web: backend 10.0.0.1:80 weight 1 → 5",
                "route web: backend 10.0.0.3:80 added",
                "route web: backend 10.0.0.2:80 removed",
                "route new: added (Tcp on 127.0.0.1:8082)",
                "route gone: removed (its live sessions drain)",
            ]
        );
        assert!(lines(old, old).is_empty(), "the same file changes nothing");
    }

    #[test]
    fn a_difference_no_field_names_is_still_a_change() {
        let mut out = Changes::default();
        out.within("route web: ", true, |_| {});
        out.within("route api: ", false, |_| {});
        out.within("route db: ", true, |out| out.say("route db: backlog 1 → 2".into()));
        let said: Vec<String> = out.list.iter().map(Change::to_string).collect();
        assert_eq!(said, ["route web: changed", "route db: backlog 1 → 2"]);
    }

    #[test]
    fn a_changed_password_is_a_change_that_shows_no_secret() {
        let with = |password: &str| {
            format!(
                r#"(routes: [(name: "p", listen: "127.0.0.1:3128", protocol: HttpConnect,
                    connect: (auth: [(user: "u", password: "{password}")]))])"#
            )
        };
        let changed = lines(&with("old-secret"), &with("new-secret"));
        assert_eq!(changed.len(), 1, "{changed:?}");
        assert!(!changed[0].contains("secret"), "{changed:?}");
    }

    #[test]
    fn a_diff_line_names_the_field_and_shows_values_as_the_file_writes_them() {
        let old = r#"(log_level: "info", status: "127.0.0.1:9901", egress: {"up": (device: "eth1")}, routes: [
            (name: "t", listen: "127.0.0.1:8080", health: (fall: 3),
                backends: [(addr: "10.0.0.1:80"), (addr: "10.0.0.2:80")])])"#;
        let new = r#"(log_level: "debug", status: "127.0.0.1:9902", egress: {"up": (device: "eth1", nodelay: false)}, routes: [
            (name: "t", listen: "127.0.0.1:8080", health: (fall: 5), allow_clients: ["10.0.0.0/8"],
                backends: [(addr: "10.0.0.2:80"), (addr: "10.0.0.1:80")])])"#;
        let got = lines(old, new);
        for want in [
            "log_level info → debug",
            "status 127.0.0.1:9901 → 127.0.0.1:9902 (takes effect after a restart)",
            "egress up: nodelay true → false",
            "route t: health.fall 3 → 5",
            "route t: clients.allow [] → [10.0.0.0/8]",
            "route t: backends reordered",
        ] {
            assert!(got.iter().any(|l| l == want), "missing {want:?} in {got:#?}");
        }
        assert!(
            !got.iter()
                .any(|l| l.contains("Some(") || l.contains("ClientAcl") || l.contains("Tcp(")),
            "{got:#?}"
        );
    }
}
