//! Config: the RON file ([`Config`]) and the checked, typed [`Settings`] the relay runs on.

mod diff;
mod file;
mod read;
mod validate;

use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroUsize;
use std::path::Path;
use std::time::Duration;

pub use diff::{Change, diff};
pub use file::{
    AcceptProxyConfig, BackendConfig, Balance, CheckConfig, Config, ConnectConfig, Credentials, EgressConfig,
    EgressStrategy, HealthConfig, OneOrMany, Protocol, RouteConfig, SniConfig, SniRule,
};

use crate::acl::{Acl, ClientAcl};
use crate::error::ConfigError;

/// Name of the egress used by routes and backends that name none.
pub const DEFAULT_EGRESS: &str = "default";

/// A validated config. Only [`Config::validate`] makes one, so every field is usable as it is.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The config these settings were validated from (the status listener's `GET /config`
    /// shows it, secrets hidden).
    pub source: std::sync::Arc<Config>,
    pub log_level: log::LevelFilter,
    pub drain_timeout: Duration,
    pub status: Option<StatusAddr>,
    /// Who may read the status listener.
    pub status_allow: ClientAcl,
    /// The admin socket's path.
    pub admin: Option<std::path::PathBuf>,
    /// Executor threads; `None`: one per core.
    pub workers: Option<NonZeroUsize>,
    /// Live sessions the whole relay serves at once.
    pub max_connections: Option<NonZeroUsize>,
    pub splice: bool,
    pub mailbox: NonZeroUsize,
    /// Index 0 is always the `default` egress.
    pub egress: Vec<Egress>,
    pub routes: Vec<Route>,
}

/// Where the status listener listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StatusAddr {
    Tcp(SocketAddr),
    /// A Unix socket, readable by the owner and group only.
    Unix(std::path::PathBuf),
}

impl std::fmt::Display for StatusAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StatusAddr::Tcp(addr) => write!(f, "{addr}"),
            StatusAddr::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// Index into [`Settings::egress`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct EgressId(pub usize);

#[derive(Debug, Clone, PartialEq)]
pub struct Egress {
    pub name: String,
    pub device: Option<String>,
    pub source: Option<IpAddr>,
    pub options: SocketOptions,
    pub via_proxy: Option<UpstreamProxy>,
}

/// An HTTP CONNECT proxy an egress goes through.
#[derive(Clone, PartialEq, Eq)]
pub struct UpstreamProxy {
    pub addr: SocketAddr,
    /// Basic credentials as sent (base64 of `user:password`).
    pub credentials: Option<String>,
}

impl std::fmt::Debug for UpstreamProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let auth = self.credentials.as_ref().map(|_| "***");
        f.debug_struct("UpstreamProxy")
            .field("addr", &self.addr)
            .field("credentials", &auth)
            .finish()
    }
}

/// A checked `connect` section of an HttpConnect route.
#[derive(Clone, PartialEq)]
pub struct ConnectSettings {
    pub acl: Acl,
    /// Accepted `Proxy-Authorization: Basic` tokens; empty: no auth asked.
    pub credentials: Vec<String>,
    pub head_max: usize,
    pub head_timeout: Duration,
}

impl std::fmt::Debug for ConnectSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectSettings")
            .field("acl", &self.acl)
            .field("credentials", &format_args!("{} masked", self.credentials.len()))
            .field("head_max", &self.head_max)
            .field("head_timeout", &self.head_timeout)
            .finish()
    }
}

/// Options set on every upstream socket of an egress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketOptions {
    pub nodelay: bool,
    pub keepalive: Option<Duration>,
    pub mss: Option<u32>,
    pub send_buffer: Option<usize>,
    pub recv_buffer: Option<usize>,
    /// SO_MARK.
    pub mark: Option<u32>,
}

impl Default for SocketOptions {
    fn default() -> Self {
        SocketOptions {
            nodelay: true,
            keepalive: None,
            mss: None,
            send_buffer: None,
            recv_buffer: None,
            mark: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    pub name: String,
    pub listen: SocketAddr,
    pub protocol: Protocol,
    pub balance: Balance,
    /// The route's egresses (never empty; backends may name their own); CONNECT routes leave by
    /// them.
    pub egress: Vec<EgressId>,
    pub egress_strategy: EgressStrategy,
    pub backends: Vec<Backend>,
    pub connect_timeout: Duration,
    /// Backend addresses tried per session; `None`: each once.
    pub connect_attempts: Option<NonZeroUsize>,
    pub timeouts: Timeouts,
    pub backlog: u32,
    pub max_flows: NonZeroUsize,
    /// HttpConnect routes only.
    pub connect: Option<ConnectSettings>,
    pub health: Health,
    pub resolve_interval: Duration,
    /// Who may use the route.
    pub clients: ClientAcl,
    /// The interface the route listens on only.
    pub listen_device: Option<String>,
    /// Live sessions the route serves at once, and how long a connection waits for room.
    pub max_connections: Option<NonZeroUsize>,
    pub queue_timeout: Duration,
    /// Limits on each client address.
    pub per_client: Option<crate::limits::ClientLimits>,
    /// The PROXY protocol header sent to backends first.
    pub send_proxy: Option<crate::proto::ProxyVersion>,
    /// The PROXY protocol header read from trusted proxies first.
    pub accept_proxy: Option<AcceptProxy>,
    /// Routing by TLS server name to other routes.
    pub sni: Option<Sni>,
}

/// A checked `sni` section: patterns to route names, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sni {
    pub rules: Vec<(crate::acl::HostPattern, String)>,
    pub default: Option<String>,
    pub timeout: Duration,
}

/// Who may send a route PROXY protocol headers, and how long they may take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcceptProxy {
    pub trusted: ClientAcl,
    pub timeout: Duration,
}

/// How a route judges its backends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    pub fall: u32,
    pub cooldown: Duration,
    pub cooldown_max: Duration,
    pub check: Option<Check>,
    /// UDP: no answer within this long is a failed connect.
    pub reply_timeout: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    /// Sent before `send`: the PROXY protocol LOCAL header on routes with `send_proxy`.
    pub preface: Vec<u8>,
    pub interval: Duration,
    pub timeout: Duration,
    pub rise: u32,
    pub send: Option<Vec<u8>>,
    pub expect: Option<Vec<u8>>,
}

/// When a relayed pair is closed for want of traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// No traffic in either direction.
    pub idle: Duration,
    /// One direction has ended and the other carried nothing.
    pub fin: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Backend {
    pub addr: BackendAddr,
    /// The backend's own egresses, else its route's (never empty).
    pub egress: Vec<EgressId>,
    pub weight: u32,
}

/// Where a backend is: an address, or a name resolved at start and again and again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendAddr {
    Ip(SocketAddr),
    Name { host: String, port: u16 },
}

impl std::fmt::Display for BackendAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BackendAddr::Ip(addr) => write!(f, "{addr}"),
            BackendAddr::Name { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

/// What `GET /config` and `relayd --check` show in place of a password.
pub const HIDDEN: &str = "<hidden>";

impl Config {
    /// The config with every password replaced by [`HIDDEN`], and every health check's
    /// `send` too (a Redis-style check sends `AUTH <password>`).
    pub fn masked(&self) -> Config {
        let mut config = self.clone();
        let hide = |c: &mut Credentials| c.password = HIDDEN.into();
        for route in &mut config.routes {
            route.connect.iter_mut().flat_map(|c| &mut c.auth).for_each(hide);
            let checks = route.health.iter_mut().flat_map(|h| &mut h.check);
            checks
                .filter_map(|c| c.send.as_mut())
                .for_each(|send| *send = HIDDEN.into());
        }
        config
            .egress
            .values_mut()
            .filter_map(|e| e.via_proxy_auth.as_mut())
            .for_each(hide);
        config
    }

    /// The config as RON text, secrets hidden.
    pub fn to_ron(&self) -> String {
        let pretty = ron::ser::PrettyConfig::new().struct_names(false);
        ron::ser::to_string_pretty(&self.masked(), pretty).unwrap_or_else(|e| format!("/* {e} */"))
    }

    /// Reads and validates a RON config file.
    pub fn load(path: &Path) -> Result<Settings, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::parse(&text, &path.display().to_string())?.validate_as(&path.display().to_string())
    }

    /// Parses RON text; `origin` names it in errors (a path, or `<inline>`): every value of
    /// the wrong type and every unknown field at once, each by its path, up to the first
    /// syntax error.
    ///
    /// `Some(..)` may be left out around optional values (RON's `implicit_some`).
    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        read::read(text).map_err(|problems| ConfigError::Syntax {
            origin: origin.to_string(),
            problems,
        })
    }

    /// Checks everything and returns typed settings, or every problem found.
    pub fn validate(&self) -> Result<Settings, ConfigError> {
        self.validate_as("config")
    }

    fn validate_as(&self, origin: &str) -> Result<Settings, ConfigError> {
        validate::settings(self).map_err(|problems| ConfigError::Invalid {
            origin: origin.to_string(),
            problems,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_shown_hides_passwords_and_health_check_payloads() {
        let text = r#"(routes: [(name: "r", listen: "127.0.0.1:0", backends: [(addr: "127.0.0.1:6379")],
            health: (check: (send: "AUTH s3cret\r\nPING\r\n", expect: "+PONG"))),
            (name: "c", listen: "127.0.0.1:0", protocol: HttpConnect,
            connect: (auth: [(user: "u", password: "p4ss")], allow_ports: [443]))])"#;
        let shown = Config::parse(text, "test").unwrap().to_ron();
        assert!(!shown.contains("s3cret") && !shown.contains("p4ss"), "{shown}");
        assert!(shown.contains(HIDDEN) && shown.contains("+PONG"), "{shown}");
    }

    #[test]
    fn a_misspelt_field_or_variant_is_named_with_what_was_meant() {
        let error = |text: &str| Config::parse(text, "test").unwrap_err().to_string();
        let field = error(r#"(routes: [(name: "r", lisen: "127.0.0.1:0")])"#);
        assert!(field.contains("did you mean `listen`?"), "{field}");
        let variant = error(r#"(routes: [(name: "r", listen: "127.0.0.1:0", protocol: Tpc)])"#);
        assert!(variant.contains("did you mean `Tcp`?"), "{variant}");
        let far = error(r#"(routes: [(name: "r", frobnicate: 1)])"#);
        assert!(!far.contains("did you mean"), "nothing near: {far}");
    }

    #[test]
    fn the_status_page_is_for_loopback_unless_the_file_says_otherwise() {
        let route = r#"routes: [(name: "r", listen: "127.0.0.1:0", backends: [(addr: "127.0.0.1:1")])]"#;
        let settings = |extra: &str| {
            Config::parse(&format!("({extra} {route})"), "test")
                .unwrap()
                .validate()
                .unwrap()
        };
        let default = settings("");
        for (client, admitted) in [
            ("127.0.0.1", true),
            ("::1", true),
            ("::ffff:127.0.0.5", true),
            ("198.18.0.1", false),
        ] {
            assert_eq!(
                default.status_allow.admits(client.parse().unwrap()),
                admitted,
                "{client}"
            );
        }
        let open = settings(r#"status_allow: ["0.0.0.0/0", "::/0"],"#);
        assert!(open.status_allow.admits("198.18.0.1".parse().unwrap()));
    }
}
