//! Errors shared across the actors. Each carries the context an operator needs to act on it.

use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

/// An actor this one depended on has stopped (the relay is shutting down).
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("{0} actor has stopped")]
pub struct Gone(pub &'static str);

/// One problem in a config, located by its path (`routes[1].backends[0].addr`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub path: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// One problem the RON reader found, located by line and column (and by path when it is in a
/// value: `routes[0].backends[1].weight`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Misread {
    pub line: usize,
    pub col: usize,
    /// Empty when the problem is in the syntax around values.
    pub path: String,
    pub message: String,
}

impl fmt::Display for Misread {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.path.is_empty() {
            true => write!(f, "{}:{}: {}", self.line, self.col, self.message),
            false => write!(f, "{}:{}: {}: {}", self.line, self.col, self.path, self.message),
        }
    }
}

/// Why a config could not be loaded. Nothing starts while one of these exists.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// What the RON reader found, each problem on a line of its own (`FILE:LINE:COL: …`).
    #[error("{}", misread(.origin, .problems))]
    Syntax { origin: String, problems: Vec<Misread> },
    #[error("{} invalid:\n{}", .origin, list(.problems))]
    Invalid { origin: String, problems: Vec<Problem> },
}

impl ConfigError {
    /// Every problem found by validation (empty for read and syntax errors).
    pub fn problems(&self) -> &[Problem] {
        match self {
            ConfigError::Invalid { problems, .. } => problems,
            _ => &[],
        }
    }
}

fn misread(origin: &str, problems: &[Misread]) -> String {
    let lines: Vec<String> = problems.iter().map(|p| format!("{origin}:{p}")).collect();
    lines.join("\n")
}

fn list(problems: &[Problem]) -> String {
    let lines: Vec<String> = problems.iter().map(|p| format!("  {p}")).collect();
    lines.join("\n")
}

/// Why the relay could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot start the worker threads: {0}")]
    Runtime(#[source] io::Error),
    #[error("{what}: cannot listen on {addr}: {source}")]
    Listen {
        /// `route NAME` or `status page`.
        what: String,
        /// `IP:port`, or `unix:PATH`.
        addr: String,
        #[source]
        source: io::Error,
    },
}

/// What part of building an outbound socket failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BindStep {
    /// SO_BINDTODEVICE to this interface.
    Device(String),
    /// bind() to this source address.
    Source(IpAddr),
    /// A socket option (name).
    Option(&'static str),
    /// socket() itself.
    Create,
}

impl fmt::Display for BindStep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BindStep::Device(name) => write!(f, "bind to device {name}"),
            BindStep::Source(ip) => write!(f, "bind to source {ip}"),
            BindStep::Option(name) => write!(f, "set {name}"),
            BindStep::Create => f.write_str("create a socket"),
        }
    }
}

/// Why an upstream socket could not be had. The dial fails; nothing falls back to the default
/// route behind the operator's back.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("egress {egress}: cannot {step} to reach {target}: {source}")]
    Bind {
        egress: String,
        step: BindStep,
        target: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("egress {egress}: source {source_ip} cannot reach {target} (address family differs)")]
    Family {
        egress: String,
        source_ip: IpAddr,
        target: SocketAddr,
    },
    #[error("egress {egress}: connect to {target}: {source}")]
    Connect {
        egress: String,
        target: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("egress {egress}: connect to {target} timed out after {}", humantime::format_duration(*.after))]
    Timeout {
        egress: String,
        target: SocketAddr,
        after: Duration,
    },
    #[error("egress {egress}: proxy {proxy} gave no tunnel to {target}: {why}")]
    Proxy {
        egress: String,
        proxy: SocketAddr,
        target: SocketAddr,
        why: String,
    },
    #[error("egress {egress} is down ({why}): not dialing {target}")]
    EgressDown {
        egress: String,
        target: SocketAddr,
        why: std::sync::Arc<str>,
    },
    #[error("no egress with id {0} (the dialer has {1})")]
    UnknownEgress(usize, usize),
    #[error(transparent)]
    Gone(#[from] Gone),
}

/// Whose fault a failed dial was: each failure is charged to its cause, and only there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Refused, reset, timed out, host unreachable: this backend (address), on this route.
    Backend,
    /// The egress cannot build a socket whatever the target (its device or source cannot be
    /// bound), or went down during the dial: the same backend is tried by another egress.
    Egress,
    /// This target cannot be reached by this egress (no route to its network, its address
    /// family, the local ports towards it are spent): the session tries elsewhere, and nothing
    /// is marked down.
    Path,
    /// The relay itself ran short (file descriptors, memory): nobody's health is judged.
    Relay,
}

impl Fault {
    /// A stable word for logs and metrics labels.
    pub fn word(self) -> &'static str {
        match self {
            Fault::Backend => "backend",
            Fault::Egress => "egress",
            Fault::Path => "path",
            Fault::Relay => "relay",
        }
    }
}

impl DialError {
    /// Whose fault the failure was; `None` when the relay is stopping. Only what does not
    /// depend on the target (binding the device or the source, the kernel's word) is the
    /// egress's: a target nobody can route to must not take an egress down for every route.
    pub fn fault(&self) -> Option<Fault> {
        let errno = |e: &io::Error| e.raw_os_error().unwrap_or(0);
        let short = |e: &io::Error| matches!(errno(e), libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM);
        let path = |e: &io::Error| {
            matches!(
                errno(e),
                libc::ENETUNREACH
                    | libc::ENETDOWN
                    | libc::EADDRNOTAVAIL
                    | libc::EAFNOSUPPORT
                    | libc::EPERM
                    | libc::EACCES
            )
        };
        match self {
            DialError::Bind { source, .. } | DialError::Connect { source, .. } if short(source) => Some(Fault::Relay),
            DialError::Bind {
                step: BindStep::Create, ..
            } => Some(Fault::Path),
            DialError::Bind { .. } | DialError::EgressDown { .. } | DialError::UnknownEgress(..) => Some(Fault::Egress),
            DialError::Family { .. } => Some(Fault::Path),
            DialError::Connect { source, .. } if path(source) => Some(Fault::Path),
            DialError::Gone(_) => None,
            DialError::Connect { .. } | DialError::Timeout { .. } | DialError::Proxy { .. } => Some(Fault::Backend),
        }
    }
}

/// Why [`crate::Relay::inject`] could not start a session.
#[derive(Debug, thiserror::Error)]
pub enum InjectError {
    #[error("no route named {0:?}")]
    UnknownRoute(String),
    #[error("the relay is shutting down")]
    ShuttingDown,
    #[error("route {0:?} relays UDP datagrams: inject takes byte streams")]
    NotAStreamRoute(String),
}

#[cfg(test)]
mod tests {
    use super::*;
    fn connect(errno: i32) -> DialError {
        DialError::Connect {
            egress: "e".into(),
            target: "127.0.0.1:1".parse().unwrap(),
            source: io::Error::from_raw_os_error(errno),
        }
    }

    #[test]
    fn dial_errors_blame_the_right_party() {
        assert_eq!(connect(libc::ECONNREFUSED).fault(), Some(Fault::Backend));
        assert_eq!(
            connect(libc::ENETUNREACH).fault(),
            Some(Fault::Path),
            "one unreachable target is not the egress's fault"
        );
        assert_eq!(connect(libc::EADDRNOTAVAIL).fault(), Some(Fault::Path), "ports spent");
        assert_eq!(connect(libc::EHOSTUNREACH).fault(), Some(Fault::Backend));
        let family = DialError::Family {
            egress: "e".into(),
            source_ip: "198.18.0.1".parse().unwrap(),
            target: "[2001:db8::1]:443".parse().unwrap(),
        };
        assert_eq!(family.fault(), Some(Fault::Path), "the target's family is the target's");
        assert_eq!(connect(libc::EMFILE).fault(), Some(Fault::Relay));
        let device = DialError::Bind {
            egress: "e".into(),
            step: BindStep::Device("eth9".into()),
            target: "127.0.0.1:1".parse().unwrap(),
            source: io::Error::from_raw_os_error(libc::ENODEV),
        };
        assert_eq!(device.fault(), Some(Fault::Egress));
        let out_of_fds = DialError::Bind {
            egress: "e".into(),
            step: BindStep::Create,
            target: "127.0.0.1:1".parse().unwrap(),
            source: io::Error::from_raw_os_error(libc::EMFILE),
        };
        assert_eq!(
            out_of_fds.fault(),
            Some(Fault::Relay),
            "running out of fds is nobody's health"
        );
        assert_eq!(DialError::Gone(Gone("dialer")).fault(), None);
    }
}
