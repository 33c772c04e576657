//! The config as written: RON file structs, also built in code by embedders.
//!
//! Everything is a plain string or number here; [`Config::validate`] turns it into typed
//! [`super::Settings`] and reports every problem by its path.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The whole config file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// `error`, `warn`, `info` (default), `debug` or `trace`.
    pub log_level: Option<String>,
    /// How long shutdown waits for live sessions before closing them (default `30s`).
    pub drain_timeout: Option<String>,
    /// `IP:port` of the status listener (the page and `/metrics`), or `unix:/path` for a Unix
    /// socket only the owner and group may use (default: none).
    pub status: Option<String>,
    /// Client ranges that may read the status page and the metrics (default: loopback only).
    pub status_allow: Vec<String>,
    /// Path of the admin socket (a Unix socket, mode 0600), where `relayd ctl` drains,
    /// disables and enables backends and egresses at run time (default: none).
    pub admin: Option<String>,
    /// Executor threads (default: one per core).
    pub workers: Option<usize>,
    /// Live sessions (TCP connections and UDP flows) the whole relay serves at once; past it,
    /// new connections wait up to their route's `queue_timeout` (default: no cap).
    pub max_connections: Option<usize>,
    /// Move TCP-to-TCP bytes with splice(2), never through userspace (default true).
    pub splice: Option<bool>,
    /// Capacity of each actor's mailbox (default 1024).
    pub mailbox: Option<usize>,
    /// Named ways out of the host. The name `default` is used by routes that name none.
    pub egress: BTreeMap<String, EgressConfig>,
    pub routes: Vec<RouteConfig>,
}

/// A way out of the host: an interface, a source address, and socket options.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EgressConfig {
    /// Interface to bind outbound sockets to (SO_BINDTODEVICE; unprivileged on Linux 5.7+,
    /// CAP_NET_RAW before).
    pub device: Option<String>,
    /// Source IP address for outbound sockets.
    pub source: Option<String>,
    /// TCP_NODELAY on upstream connections (default true).
    pub nodelay: Option<bool>,
    /// TCP keepalive idle time, e.g. `"60s"` (default: off).
    pub keepalive: Option<String>,
    /// TCP_MAXSEG in bytes.
    pub mss: Option<u32>,
    /// SO_SNDBUF in bytes.
    pub send_buffer: Option<usize>,
    /// SO_RCVBUF in bytes.
    pub recv_buffer: Option<usize>,
    /// `IP:port` of an HTTP CONNECT proxy every connection of this egress goes through (the
    /// proxy is dialed with this egress's device and source).
    pub via_proxy: Option<String>,
    /// Basic credentials for `via_proxy`.
    pub via_proxy_auth: Option<Credentials>,
    /// SO_MARK on every outbound socket (needs CAP_NET_ADMIN), so that policy routing
    /// (`ip rule add fwmark 0x1 lookup 100`) can steer this egress's traffic.
    pub mark: Option<u32>,
}

/// A user name and password (Basic auth). `Debug` masks the password.
#[derive(Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Credentials {
    pub user: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .field("password", &"***")
            .finish()
    }
}

/// What an `HttpConnect` route lets clients tunnel to, and how it reads their requests.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConnectConfig {
    /// Target ports clients may ask for (default `[443]`).
    pub allow_ports: Option<Vec<u16>>,
    /// Host names clients may ask for: `"example.com"` or `"*.example.com"` (default: any).
    pub allow_hosts: Vec<String>,
    /// Address ranges allowed even where `deny_cidrs` or the built-in list denies them.
    pub allow_cidrs: Vec<String>,
    /// Address ranges denied, on top of the built-in ones (loopback, link-local, private...).
    pub deny_cidrs: Vec<String>,
    /// When not empty, clients must send one of these with `Proxy-Authorization: Basic`.
    pub auth: Vec<Credentials>,
    /// Largest request head in bytes (default 8192).
    pub head_max: Option<usize>,
    /// How long a client may take to send its request head (default `10s`).
    pub head_timeout: Option<String>,
}

/// How a route's traffic is carried.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Protocol {
    #[default]
    Tcp,
    /// Datagrams, tracked as flows per client address.
    Udp,
    /// An HTTP CONNECT proxy: each client names its own target.
    HttpConnect,
}

/// How a route picks a backend for a new session (or UDP flow).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Balance {
    /// Each healthy backend in turn, as often as its weight: nginx's smooth weighted round
    /// robin (5:1:1 interleave, they do not burst); with equal weights, a plain rotation.
    #[default]
    RoundRobin,
    /// The same as `RoundRobin`, which honours weights; kept so that older files still load.
    WeightedRoundRobin,
    /// The healthy backend with the fewest live sessions per unit of weight.
    LeastConnections,
    /// Rendezvous hashing of the client IP: a client keeps its backend, and removing one of N
    /// backends moves only the clients it had (about 1/N).
    SourceHash,
    /// Power of two choices: of two random healthy backends, the one with fewer live sessions.
    Random,
}

/// How a route with several egresses picks one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum EgressStrategy {
    /// Each healthy egress in turn.
    #[default]
    RoundRobin,
    /// The first healthy egress in list order; traffic returns to it once it is back.
    Failover,
}

/// One name or a list of names (`egress: "a"` or `egress: ["a", "b"]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    pub fn names(&self) -> Vec<&str> {
        match self {
            OneOrMany::One(name) => vec![name.as_str()],
            OneOrMany::Many(names) => names.iter().map(String::as_str).collect(),
        }
    }
}

impl From<&str> for OneOrMany {
    fn from(name: &str) -> Self {
        OneOrMany::One(name.to_string())
    }
}

/// How a route judges its backends' health.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    /// Consecutive failed connects (or checks) that take a backend out (default 3).
    pub fall: Option<u32>,
    /// How long a backend taken out by failed connects stays out the first time (default `10s`);
    /// each further ejection doubles it.
    pub cooldown: Option<String>,
    /// The most a cool-down grows to (default `5m`).
    pub cooldown_max: Option<String>,
    /// Active checks; without them, only failed connects judge a backend.
    pub check: Option<CheckConfig>,
    /// UDP routes only: a flow whose backend sends nothing back within this long counts as a
    /// failed connect, and the flow tries the next backend (default: off, since one-way
    /// protocols such as syslog never answer; ICMP errors always count).
    pub reply_timeout: Option<String>,
}

/// An active health check: a TCP connect by the backend's egress, optionally a greeting.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CheckConfig {
    /// Time between checks of a backend (default `5s`).
    pub interval: Option<String>,
    /// How long one check may take (default `2s`).
    pub timeout: Option<String>,
    /// Consecutive passed checks that bring a backend back (default 2).
    pub rise: Option<u32>,
    /// Bytes to send once connected (escapes: `\r`, `\n`).
    pub send: Option<String>,
    /// Bytes the answer must contain for the check to pass.
    pub expect: Option<String>,
}

/// One listening address and the backends behind it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RouteConfig {
    pub name: String,
    /// `IP:port` to listen on; port 0 picks a free port.
    pub listen: String,
    pub protocol: Protocol,
    pub balance: Balance,
    /// Egress, or list of egresses, for this route's backends (default: the `default` egress).
    pub egress: Option<OneOrMany>,
    /// With several egresses: `RoundRobin` (default) or `Failover`.
    pub egress_strategy: EgressStrategy,
    pub backends: Vec<BackendConfig>,
    /// Per connect attempt (default `3s`).
    pub connect_timeout: Option<String>,
    /// Backend addresses tried per session before giving up (default: each once; a name that
    /// resolves to three addresses is three candidates). A try by another egress after an
    /// egress or path failure does not count.
    pub connect_attempts: Option<usize>,
    /// A session with no traffic either way for this long is closed (default `10m` for TCP,
    /// `60s` for UDP flows).
    pub idle_timeout: Option<String>,
    /// After one direction ends, the other is closed after this long without traffic (default `30s`).
    pub fin_timeout: Option<String>,
    /// Listen backlog (default 1024; TCP only).
    pub backlog: Option<u32>,
    /// UDP only: client flows tracked at once; a datagram that would open one more is dropped
    /// and counted (default 1024).
    pub max_flows: Option<usize>,
    /// HttpConnect only: the access rules and request limits.
    pub connect: Option<ConnectConfig>,
    /// Client ranges allowed to use the route (default: any). Checked at accept, before any
    /// work; an IPv4-mapped IPv6 client is judged as IPv4.
    pub allow_clients: Vec<String>,
    /// Client ranges refused, even inside `allow_clients`.
    pub deny_clients: Vec<String>,
    /// Listen on this interface only (SO_BINDTODEVICE on the listening socket).
    pub listen_device: Option<String>,
    /// Live sessions this route serves at once (default: no cap); past it, a new connection
    /// waits up to `queue_timeout` for room, then is closed; a new UDP flow is dropped.
    pub max_connections: Option<usize>,
    /// How long a connection waits for room under `max_connections` (default `5s`).
    pub queue_timeout: Option<String>,
    /// Tcp and HttpConnect routes: limits on each client address.
    pub per_client: Option<PerClientConfig>,
    /// Tcp routes: send each backend a PROXY protocol header (`V1` or `V2`) with the real
    /// client and destination addresses, before any payload.
    pub send_proxy: Option<crate::proto::ProxyVersion>,
    /// Tcp routes: every connection starts with a PROXY protocol header (v1 or v2) from a
    /// proxy in front; the address it carries is the client's everywhere.
    pub accept_proxy: Option<AcceptProxyConfig>,
    /// Tcp routes: route TLS connections by the server name their ClientHello asks for (no
    /// termination) to other Tcp routes; such a route has no backends of its own.
    pub sni: Option<SniConfig>,
    /// Passive and active health of the backends.
    pub health: Option<HealthConfig>,
    /// How often backends given by host name are resolved again (default `30s`).
    pub resolve_interval: Option<String>,
}

/// Limits on each client address of a route (HAProxy's stick-table `conn_cur`/`conn_rate`,
/// nginx's `limit_conn`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PerClientConfig {
    /// Connections one client address may have live at once, header phase included.
    pub max_connections: Option<u32>,
    /// New connections one client address may open a second, on average,
    pub per_second: Option<u32>,
    /// and at once after a quiet spell (default: `per_second`).
    pub burst: Option<u32>,
}

/// Routing by TLS server name.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SniConfig {
    /// In order; the first whose names match (`"a.example"`, `"*.example"`) wins.
    pub routes: Vec<SniRule>,
    /// The route for names that match nothing, and ClientHellos without a name (default: none:
    /// such connections are closed).
    pub default: Option<String>,
    /// How long the ClientHello may take (default `5s`).
    pub timeout: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SniRule {
    pub names: Vec<String>,
    /// The name of the Tcp route these names go to.
    pub route: String,
}

/// Who may send PROXY protocol headers, and how long they may take.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AcceptProxyConfig {
    /// Ranges of the proxies in front (required): a connection from anywhere else is closed.
    pub trusted: Vec<String>,
    /// How long the header may take (default `3s`); slower connections are closed.
    pub timeout: Option<String>,
}

/// One backend of a route.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BackendConfig {
    /// `IP:port`, or `host:port` (resolved at once and every `resolve_interval`; each address
    /// is a backend of its own).
    pub addr: String,
    /// Egress (or list) for this backend only, overriding the route's.
    pub egress: Option<OneOrMany>,
    /// Share of new sessions under `WeightedRoundRobin`, `LeastConnections` and `SourceHash`
    /// (default 1); 0 drains the backend: no new sessions, live ones go on.
    pub weight: Option<u32>,
}

impl RouteConfig {
    /// A TCP route with default settings: the usual start when building a config in code.
    pub fn tcp(name: &str, listen: &str, backends: &[&str]) -> Self {
        RouteConfig {
            name: name.to_string(),
            listen: listen.to_string(),
            backends: backends.iter().map(|addr| BackendConfig::new(addr)).collect(),
            ..Default::default()
        }
    }

    /// An HTTP CONNECT route with default settings (port 443 only, public addresses only).
    pub fn http_connect(name: &str, listen: &str) -> Self {
        RouteConfig {
            protocol: Protocol::HttpConnect,
            ..RouteConfig::tcp(name, listen, &[])
        }
    }

    /// A UDP route with default settings.
    pub fn udp(name: &str, listen: &str, backends: &[&str]) -> Self {
        RouteConfig {
            protocol: Protocol::Udp,
            ..RouteConfig::tcp(name, listen, backends)
        }
    }
}

impl BackendConfig {
    pub fn new(addr: &str) -> Self {
        BackendConfig {
            addr: addr.to_string(),
            ..Default::default()
        }
    }
}
