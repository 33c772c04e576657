//! The status listener: a read-only HTTP view of every route's backends and the session
//! counters, taken from the Balancers' own snapshots. `GET /` is a page for people
//! (`curl http://ADDR/`), `GET /metrics` the same and more for Prometheus (OpenMetrics text),
//! `GET /config` the running config (passwords hidden).
//! Anything but GET gets 405.

use std::fmt::Write as _;
use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::config::StatusAddr;

use crate::balancer::{BalancerHandle, RouteSnapshot};
use crate::metrics::Metrics;
use crate::rt::{self, Async, TcpConn};
use crate::shutdown::Signal;
use crate::stats::Stats;

/// A request head larger than this, or slower than [`HEAD_TIMEOUT`], gets no page.
const HEAD_MAX: usize = 4096;
const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// An answer not taken whole by then is given up, and its connection closed: a reader that
/// never reads holds a page and a descriptor this long at most.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections the status listener serves at once; more are closed as they come.
const MAX_CLIENTS: u64 = 64;

/// What the page shows of one route.
#[derive(Clone)]
pub(crate) struct RouteView {
    pub name: Arc<str>,
    pub listen: SocketAddr,
    pub balancer: BalancerHandle,
}

impl RouteView {
    pub async fn snapshot(&self) -> RouteSnapshot {
        let (backends, egresses) = self.balancer.snapshot().await.unwrap_or_default();
        RouteSnapshot {
            name: self.name.to_string(),
            listen: self.listen,
            backends,
            egresses,
        }
    }
}

pub(crate) struct Status {
    pub socket: StatusSocket,
    pub pages: Arc<Pages>,
    /// A reload's pages (its routes, its `status_allow`).
    pub updates: flume::Receiver<Arc<Pages>>,
}

/// The status listener's socket: TCP, or a Unix socket whose file goes with it.
pub(crate) enum StatusSocket {
    Tcp(Async<TcpListener>),
    Unix(Async<UnixListener>, PathBuf),
}

impl StatusSocket {
    /// Binds `addr`. A Unix socket's file is made for the owner and group only; a file left by
    /// a relayd that is gone is replaced, one that a live process answers on is not.
    pub fn bind(addr: &StatusAddr) -> io::Result<StatusSocket> {
        match addr {
            StatusAddr::Tcp(addr) => crate::net::bind_tcp(*addr, 64, None, false).map(StatusSocket::Tcp),
            StatusAddr::Unix(path) => {
                let listener = crate::net::bind_unix(path, 0o660)?;
                Ok(StatusSocket::Unix(listener, path.clone()))
            }
        }
    }

    /// The TCP address it listens on.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        match self {
            StatusSocket::Tcp(socket) => socket.get_ref().local_addr().ok(),
            StatusSocket::Unix(..) => None,
        }
    }

    fn path(&self) -> Option<&Path> {
        match self {
            StatusSocket::Tcp(_) => None,
            StatusSocket::Unix(_, path) => Some(path),
        }
    }
}

/// A status client's connection.
enum Client {
    Tcp(TcpConn, SocketAddr),
    Unix(Async<std::os::unix::net::UnixStream>),
}

/// What the pages are made of.
pub(crate) struct Pages {
    /// Who may read them.
    pub allow: crate::acl::ClientAcl,
    pub routes: Vec<RouteView>,
    pub stats: Arc<Stats>,
    pub metrics: Arc<Metrics>,
    /// The running config as RON, secrets hidden (`GET /config`, which `relayd --check` reads
    /// to say what a reload would change).
    pub config: Arc<str>,
    /// The config's egress names (the admin socket's `egress NAME`).
    pub egresses: Arc<[Arc<str>]>,
}

impl Status {
    pub async fn run(mut self, stop: Signal) {
        let mut backoff = crate::net::Backoff::default();
        // Its cap on connections served at once: a pass each.
        let clients = crate::limits::Gate::new(MAX_CLIENTS);
        while let Some(accepted) = stop.unless(self.accept()).await {
            // A reload's pages, taken when a client comes to read them.
            if let Some(pages) = self.updates.try_iter().last() {
                self.pages = pages;
            }
            match accepted {
                Ok(Client::Tcp(stream, peer)) => {
                    backoff.reset();
                    if !self.pages.allow.admits(peer.ip()) {
                        log::debug!(client:% = peer; "status page: client not in status_allow, closed");
                    } else if let Some(pass) = clients.try_enter() {
                        rt::detach(serve(stream, self.pages.clone(), pass));
                    } else {
                        log::debug!(client:% = peer, max = MAX_CLIENTS; "status page: at its cap, closed");
                    }
                }
                // The socket file's mode says who may connect.
                Ok(Client::Unix(stream)) => {
                    backoff.reset();
                    if let Some(pass) = clients.try_enter() {
                        rt::detach(serve(stream, self.pages.clone(), pass));
                    }
                }
                Err(e) => {
                    log::warn!(err:% = e; "status page: accept failed, backing off");
                    backoff.wait(&stop).await;
                }
            }
        }
        if let Some(path) = self.socket.path() {
            let _ = std::fs::remove_file(path);
        }
        log::debug!("status page stopped");
    }

    async fn accept(&self) -> io::Result<Client> {
        match &self.socket {
            StatusSocket::Tcp(socket) => {
                let (stream, peer) = crate::net::accept(socket).await?;
                Ok(Client::Tcp(stream, peer))
            }
            StatusSocket::Unix(socket, _) => Ok(Client::Unix(Async::new(socket.read_with(|l| l.accept()).await?.0)?)),
        }
    }
}

impl Pages {
    async fn snapshots(&self) -> Vec<RouteSnapshot> {
        let mut out = Vec::with_capacity(self.routes.len());
        for route in &self.routes {
            out.push(route.snapshot().await);
        }
        out
    }

    /// The page for people (`GET /`, and the admin socket's `show`).
    pub async fn render(&self) -> String {
        let s = &self.stats;
        let mut page = format!("relayd {}\n", env!("CARGO_PKG_VERSION"));
        let _ = writeln!(
            page,
            "sessions active={} total={} forced={}",
            s.active(),
            s.total(),
            s.forced()
        );
        let _ = writeln!(
            page,
            "refused_no_backend={} health_changes={}",
            s.no_backend(),
            s.health_changes()
        );
        let _ = writeln!(
            page,
            "udp dropped_over_max_flows={} dropped_queue_full={}",
            s.udp_over_limit(),
            s.udp_dropped()
        );
        let _ = writeln!(
            page,
            "tcp paths splice={} copy={} splice_then_copy={}",
            s.spliced(),
            s.copied(),
            s.splice_fallbacks()
        );
        for snapshot in self.snapshots().await {
            let _ = writeln!(page, "\nroute {} listen={}", snapshot.name, snapshot.listen);
            for e in snapshot.egresses {
                let admin = if e.drained { " admin=drain" } else { "" };
                let _ = match &e.why {
                    None => writeln!(page, "  egress {} up{admin}", e.name),
                    Some(why) => writeln!(page, "  egress {} down ({why}){admin}", e.name),
                };
            }
            for b in snapshot.backends {
                let _ = writeln!(
                    page,
                    "  backend {} ({}) {} weight={} active={} sessions={} connect_failures={} failing={} admin={}",
                    b.addr,
                    b.source,
                    b.state.word(),
                    b.weight,
                    b.active,
                    b.sessions,
                    b.connect_failures,
                    b.failing,
                    b.admin.word()
                );
            }
        }
        page
    }
}

/// Reads the request head (bounded in size and time), then answers and closes.
/// One request, one answer; `_pass` holds the connection's place under [`MAX_CLIENTS`].
async fn serve(mut stream: impl AsyncRead + AsyncWrite + Unpin, pages: Arc<Pages>, _pass: crate::limits::Pass) {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 512];
    let complete = rt::timeout(HEAD_TIMEOUT, async {
        loop {
            if head.windows(4).any(|w| w == b"\r\n\r\n") {
                return true;
            }
            if head.len() >= HEAD_MAX {
                return false;
            }
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
    });
    match complete.await {
        Some(true) => {}
        // Too large: said so, then what the client still sends is read (briefly) so that the
        // close does not reset the answer away.
        Some(false) if head.len() >= HEAD_MAX => {
            let answer =
                "HTTP/1.0 431 Request Header Fields Too Large\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
            let answered = rt::timeout(WRITE_TIMEOUT, async {
                stream.write_all(answer.as_bytes()).await?;
                stream.close().await?;
                while stream.read(&mut buf).await? > 0 {}
                std::io::Result::Ok(())
            });
            let _ = answered.await;
            return;
        }
        _ => return,
    }
    let head = String::from_utf8_lossy(&head);
    let mut request = head.split("\r\n");
    let mut line = request.next().unwrap_or_default().split(' ');
    let (method, target) = (line.next().unwrap_or_default(), line.next().unwrap_or_default());
    let path = target.split('?').next().unwrap_or_default();
    // What Prometheus asks for; promtool, curl and older scrapers get the classic format.
    let openmetrics = request
        .filter_map(|h| h.split_once(':'))
        .any(|(name, value)| name.eq_ignore_ascii_case("accept") && value.contains("application/openmetrics-text"));
    let (status, kind, page) = match (method, path) {
        ("GET", "/metrics") if openmetrics => (
            "200 OK",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            pages.metrics.render(pages.snapshots().await, true),
        ),
        ("GET", "/metrics") => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            pages.metrics.render(pages.snapshots().await, false),
        ),
        ("GET", "/config") => ("200 OK", "text/plain; charset=utf-8", pages.config.to_string()),
        ("GET", "/") => ("200 OK", "text/plain; charset=utf-8", pages.render().await),
        ("GET", _) => (
            "404 Not Found",
            "text/plain; charset=utf-8",
            "GET /, /metrics or /config\n".into(),
        ),
        _ => (
            "405 Method Not Allowed",
            "text/plain; charset=utf-8",
            "only GET\n".into(),
        ),
    };
    let response = format!(
        "HTTP/1.0 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nAllow: GET\r\nConnection: close\r\n\r\n{page}",
        page.len()
    );
    let answered = rt::timeout(WRITE_TIMEOUT, async {
        let _ = stream.write_all(response.as_bytes()).await;
        let _ = stream.close().await;
    });
    if answered.await.is_none() {
        log::debug!(path = path; "status page: the answer was not taken in time, closed");
    }
}
