//! Test harness: starts a relay from RON text, injects synthetic sessions, connects real
//! clients, and shuts the relay down with a report. Every wait is on an event, bounded by
//! [`PATIENCE`] only so that a hung test fails instead of hanging.
#![allow(dead_code)] // each test file uses a different part of the harness

pub mod backend;
pub mod daemon;
pub mod netns;
pub mod udp;

use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use async_std::net::TcpStream;
use async_std::prelude::*;
use relayd::rt::JoinHandle;
use relayd::{Config, Conn, Relay, SessionReport, ShutdownReport};

/// The longest any single wait may take before the test fails.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// A test that cannot run here for want of `what` skips, saying so, unless `CI` is set: CI
/// installs and sets up everything the tests need (.ci/run), so there the want is a failure.
pub fn skip(what: &str, why: impl std::fmt::Display) {
    assert!(std::env::var_os("CI").is_none(), "CI=true, yet {what}: {why}");
    eprintln!("SKIPPED: {what}: {why}");
}

/// True when every one of `tools` can be run; otherwise the test [`skip`]s, naming the
/// Debian packages that bring them.
pub fn have(tools: &[&str], packages: &str) -> bool {
    let found = |tool: &&str| {
        std::process::Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    let missing: Vec<&str> = tools.iter().filter(|t| !found(t)).copied().collect();
    if missing.is_empty() {
        return true;
    }
    skip(
        &format!("{} missing", missing.join(" and ")),
        format!("apt-get install {packages}"),
    );
    false
}

/// A loopback port free for TCP (bound, then let go) for tools that need a fixed one.
/// Threads of `process` (`"self"` or a PID) named as relayd names its event loops, once `n`
/// of them run or [`PATIENCE`] has passed (a new thread names itself once it runs).
pub fn event_loops(process: &str, n: usize) -> usize {
    let count = || {
        let tasks = std::fs::read_dir(format!("/proc/{process}/task")).unwrap();
        (tasks.filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok()))
            .filter(|name| name.starts_with("relayd-worker-"))
            .count()
    };
    let started = std::time::Instant::now();
    while count() != n && started.elapsed() < PATIENCE {
        std::thread::yield_now();
    }
    count()
}

pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    listener.local_addr().unwrap().port()
}

/// A synthetic client's address, as reported in logs and session reports.
pub const SYNTHETIC_PEER: &str = "192.0.2.1:40000";

pub struct Harness {
    relay: Relay,
}

/// A client injected through [`Relay::inject`] and the session serving it.
pub struct Injected {
    pub client: Conn<UnixStream>,
    pub session: JoinHandle<SessionReport>,
}

impl Harness {
    /// Starts a relay from RON text; returns once every listener is bound.
    pub fn start(ron: &str) -> Harness {
        raise_fd_limit();
        if let Ok(level) = std::env::var("RELAYD_TEST_LOG") {
            // Set RELAYD_TEST_LOG=debug to see the relay's log lines while debugging a test.
            let _ = relayd::logging::init(
                level.parse().unwrap_or(log::LevelFilter::Debug),
                relayd::logging::Format::Pretty,
            );
        }
        let config = Config::parse(ron, "test").expect("test config parses");
        let relay = Relay::start(&config).expect("relay starts");
        Harness { relay }
    }

    pub fn relay(&self) -> &Relay {
        &self.relay
    }

    /// Reloads the relay with RON text (which must be valid); the changes, or why none.
    pub async fn reload(&mut self, ron: &str) -> Result<Vec<relayd::config::Change>, relayd::StartError> {
        let settings = Config::parse(ron, "test").expect("test config parses").validate();
        within(self.relay.reload(settings.expect("test config is valid"))).await
    }

    pub fn addr(&self, route: &str) -> SocketAddr {
        self.relay.local_addr(route).expect("route exists")
    }

    /// A real TCP client connected to the route's listener.
    pub async fn connect(&self, route: &str) -> TcpStream {
        TcpStream::connect(self.addr(route))
            .await
            .expect("connect to the relay")
    }

    /// A synthetic session on a Unix socket pair, run exactly like an accepted one.
    pub fn inject(&self, route: &str) -> Injected {
        let (client, relay_side) = Conn::pair().expect("socket pair");
        let session = self
            .relay
            .inject(route, relay_side, SYNTHETIC_PEER.parse().unwrap())
            .expect("inject");
        Injected { client, session }
    }

    pub async fn shutdown(self) -> ShutdownReport {
        within(self.relay.shutdown()).await
    }
}

/// `future`'s output; fails the test if it takes longer than [`PATIENCE`].
pub async fn within<F: Future>(future: F) -> F::Output {
    async_std::future::timeout(PATIENCE, future)
        .await
        .expect("finished within the test's patience")
}

/// Everything the peer sends until its FIN.
pub async fn read_all<R: async_std::io::Read + Unpin>(reader: &mut R) -> Vec<u8> {
    let mut bytes = Vec::new();
    within(reader.read_to_end(&mut bytes)).await.expect("read to end");
    bytes
}

/// Many sessions hold two sockets each, plus the clients' and backends'.
pub fn raise_fd_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid rlimit struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

/// A TCP route `name` on 127.0.0.1:0 to `backends`, with extra route fields in RON.
pub fn route(name: &str, backends: &[SocketAddr], extra: &str) -> String {
    let list: Vec<String> = backends.iter().map(|b| format!("(addr: \"{b}\")")).collect();
    format!(
        "(name: \"{name}\", listen: \"127.0.0.1:0\", backends: [{}], {extra})",
        list.join(", ")
    )
}

/// A whole config with these routes.
pub fn config(routes: &[String]) -> String {
    format!("(routes: [{}])", routes.join(", "))
}

/// Sends our FIN: ends the write direction, keeps reading possible.
pub async fn close_write<W: futures::io::AsyncWrite + Unpin>(writer: &mut W) {
    futures::io::AsyncWriteExt::close(writer).await.expect("half-close");
}

/// A minimal TLS 1.2 ClientHello asking for `name` (one cipher suite, no compression, only the
/// server_name extension).
pub fn client_hello(name: &str) -> Vec<u8> {
    let n = name.as_bytes();
    let mut sni = vec![0x00, 0x00]; // extension type: server_name
    let list_len = 3 + n.len();
    sni.extend_from_slice(&((list_len + 2) as u16).to_be_bytes());
    sni.extend_from_slice(&(list_len as u16).to_be_bytes());
    sni.push(0x00); // host_name
    sni.extend_from_slice(&(n.len() as u16).to_be_bytes());
    sni.extend_from_slice(n);
    let mut body = vec![0x03, 0x03];
    body.extend_from_slice(&[7u8; 32]); // random
    body.push(0); // no session id
    body.extend_from_slice(&[0x00, 0x02, 0x00, 0x2f]); // one cipher suite
    body.extend_from_slice(&[0x01, 0x00]); // no compression
    body.extend_from_slice(&(sni.len() as u16).to_be_bytes());
    body.extend_from_slice(&sni);
    let mut handshake = vec![0x01, 0x00];
    handshake.extend_from_slice(&(body.len() as u16).to_be_bytes());
    handshake.extend_from_slice(&body);
    let mut record = vec![0x16, 0x03, 0x01];
    record.extend_from_slice(&(handshake.len() as u16).to_be_bytes());
    record.extend_from_slice(&handshake);
    record
}
