//! Dialer actor, one per relay: holds a socket [`Factory`] per egress and hands out upstream
//! sockets, built and bound as the egress says. It builds each socket in its loop (quick,
//! non-blocking); the connect runs in the asking task, so one slow or dead backend never holds
//! up another session's dial. It also keeps the relay-wide word on each egress's health.

mod socket;

use std::io;
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::sync::Arc;
use std::time::Duration;

use socket2::{SockAddr, Socket};

use crate::balancer::{BalancerHandle, Fault};
use crate::config::{Egress, EgressId, UpstreamProxy};
use crate::error::{DialError, Gone};
use crate::http;
use crate::rt::{self, Async, TcpConn};

pub(crate) use socket::Factory;

pub(crate) enum DialerMsg {
    /// A socket for `target`, built and bound as the egress says; the caller connects it.
    Tcp {
        target: SocketAddr,
        egress: EgressId,
        reply: flume::Sender<Result<Prepared, DialError>>,
    },
    Udp {
        target: SocketAddr,
        egress: EgressId,
        reply: flume::Sender<Result<Async<UdpSocket>, DialError>>,
    },
    /// What a connect learnt of its egress: it failed for the egress's fault, or it worked
    /// while the egress was down.
    Learnt { egress: EgressId, up: bool, why: String },
}

/// A TCP socket ready for its connect, and what the connect needs to know.
pub(crate) struct Prepared {
    socket: Socket,
    egress_name: Arc<str>,
    proxy: Option<UpstreamProxy>,
    /// The egress was down when the socket was built: a success is news.
    was_down: bool,
}

/// Asks the relay's dialer for upstream sockets. Cheap to clone.
#[derive(Clone)]
pub struct DialerHandle {
    tx: flume::Sender<DialerMsg>,
}

impl DialerHandle {
    /// Starts a dialer with one factory per egress ([`crate::Settings::egress`]; an
    /// [`EgressId`] is an index into it). `watchers` hear when an egress goes down or comes
    /// back. The dialer ends when the last handle is dropped.
    pub fn spawn(egress: &[Egress], watchers: Vec<BalancerHandle>, mailbox: usize) -> (Self, rt::JoinHandle<()>) {
        let (tx, rx) = flume::bounded(mailbox);
        let dialer = Dialer {
            factories: egress.iter().cloned().map(Factory::new).collect(),
            names: egress.iter().map(|e| e.name.as_str().into()).collect(),
            down: vec![false; egress.len()],
            seq: 0,
            watchers,
        };
        (DialerHandle { tx }, rt::spawn(dialer.run(rx)))
    }

    async fn ask<T>(&self, msg: DialerMsg, answer: flume::Receiver<Result<T, DialError>>) -> Result<T, DialError> {
        self.tx.send_async(msg).await.map_err(|_| Gone("dialer"))?;
        answer.recv_async().await.map_err(|_| Gone("dialer"))?
    }

    /// A TCP connection to `target` leaving by `egress`, or why not within `timeout`.
    ///
    /// The dialer builds the socket; the connect (and the proxy's answer, through an egress
    /// with `via_proxy`) runs here, in the caller's task, so that a slow connect holds up
    /// nobody else and costs no task of its own.
    pub async fn tcp(&self, target: SocketAddr, egress: EgressId, timeout: Duration) -> Result<TcpConn, DialError> {
        let (reply, answer) = flume::bounded(1);
        let prepared = self.ask(DialerMsg::Tcp { target, egress, reply }, answer).await?;
        let name = prepared.egress_name.clone();
        let opened = rt::timeout(timeout, open(prepared.socket, target, prepared.proxy, &name)).await;
        let opened = opened.unwrap_or(Err(DialError::Timeout {
            egress: name.to_string(),
            target,
            after: timeout,
        }));
        // Only news goes back to the dialer: an egress fault, or a success while it was down.
        let news = match &opened {
            Ok(_) if prepared.was_down => Some((true, "a dial succeeded".to_string())),
            Err(e) if e.fault() == Some(Fault::Egress) => Some((false, e.to_string())),
            _ => None,
        };
        if let Some((up, why)) = news {
            let _ = self.tx.send_async(DialerMsg::Learnt { egress, up, why }).await;
        }
        opened
    }

    /// A UDP socket bound as `egress` says and connected to `target`.
    pub async fn udp(&self, target: SocketAddr, egress: EgressId) -> Result<Async<UdpSocket>, DialError> {
        let (reply, answer) = flume::bounded(1);
        self.ask(DialerMsg::Udp { target, egress, reply }, answer).await
    }
}

struct Dialer {
    /// Indexed by [`EgressId`].
    factories: Vec<Factory>,
    /// Indexed by [`EgressId`]: the factories' names, shared with every dial's errors.
    names: Vec<Arc<str>>,
    /// Indexed by [`EgressId`]: the relay-wide word on each egress.
    down: Vec<bool>,
    /// Numbers the news, so that a balancer can tell old from new.
    seq: u64,
    watchers: Vec<BalancerHandle>,
}

impl Dialer {
    async fn run(mut self, rx: flume::Receiver<DialerMsg>) {
        while let Ok(msg) = rx.recv_async().await {
            match msg {
                DialerMsg::Tcp { target, egress, reply } => self.tcp(target, egress, reply),
                DialerMsg::Udp { target, egress, reply } => {
                    let socket = self
                        .factory(egress)
                        .and_then(|f| f.udp(target).map(Async::new_nonblocking));
                    self.learn(egress, socket.as_ref().err());
                    let _ = reply.send(socket);
                }
                DialerMsg::Learnt { egress, up, why } => self.tell(egress, up, &why),
            }
        }
        log::debug!(actor = "dialer"; "stopped, no handles left");
    }

    /// Notes what a finished dial says of its egress.
    fn learn(&mut self, egress: EgressId, failed: Option<&DialError>) {
        match failed {
            None => self.tell(egress, true, "a dial succeeded"),
            Some(e) if e.fault() == Some(Fault::Egress) => self.tell(egress, false, &e.to_string()),
            Some(_) => {}
        }
    }

    /// Records the egress's standing and, when it changed, logs it once for the relay and tells
    /// every balancer.
    fn tell(&mut self, egress: EgressId, up: bool, why: &str) {
        let Some(down) = self.down.get_mut(egress.0) else {
            return;
        };
        if *down != up {
            return;
        }
        *down = !up;
        self.seq += 1;
        let name = self.factories[egress.0].name();
        if up {
            log::info!(egress = name, why = why; "egress up");
        } else {
            log::warn!(egress = name, why = why; "egress down");
        }
        for watcher in &self.watchers {
            let (watcher, seq) = (watcher.clone(), self.seq);
            rt::detach(async move {
                let _ = watcher.egress_news(egress, up, seq).await;
            });
        }
    }

    /// Validated settings only hold ids in range; an embedder's own ids might not.
    fn factory(&self, egress: EgressId) -> Result<&Factory, DialError> {
        (self.factories.get(egress.0)).ok_or(DialError::UnknownEgress(egress.0, self.factories.len()))
    }

    /// Builds the socket: quick, and never blocking. The caller connects it.
    fn tcp(&mut self, target: SocketAddr, egress: EgressId, reply: flume::Sender<Result<Prepared, DialError>>) {
        let built = self.factory(egress).and_then(|f| {
            let proxy = f.via_proxy().cloned();
            let hop = proxy.as_ref().map_or(target, |p| p.addr);
            Ok((self.names[egress.0].clone(), proxy, f.tcp(hop)?))
        });
        let prepared = match built {
            Ok((egress_name, proxy, socket)) => Ok(Prepared {
                socket,
                egress_name,
                proxy,
                was_down: self.down.get(egress.0).copied().unwrap_or(false),
            }),
            Err(e) => {
                self.learn(egress, Some(&e));
                Err(e)
            }
        };
        let _ = reply.send(prepared);
    }
}

/// Connects `socket` to `target`, or to the proxy and through it to `target`.
async fn open(
    socket: Socket,
    target: SocketAddr,
    proxy: Option<UpstreamProxy>,
    egress: &str,
) -> Result<TcpConn, DialError> {
    let Some(proxy) = proxy else {
        return connect(socket, target, egress).await;
    };
    let mut conn = connect(socket, proxy.addr, egress).await?;
    let failed = |why: String| DialError::Proxy {
        egress: egress.to_string(),
        proxy: proxy.addr,
        target,
        why,
    };
    match http::ask_tunnel(&mut conn, target, proxy.credentials.as_deref()).await {
        Ok(Ok(())) => Ok(conn),
        Ok(Err((status, reason))) => Err(failed(format!("{status} {reason}"))),
        Err(e) => Err(failed(e.to_string())),
    }
}

/// Completes a non-blocking connect (the caller bounds it in time).
async fn connect(socket: Socket, target: SocketAddr, egress: &str) -> Result<TcpConn, DialError> {
    let failed = |source: io::Error| DialError::Connect {
        egress: egress.to_string(),
        target,
        source,
    };
    match socket.connect(&SockAddr::from(target)) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(failed(e)),
    }
    let stream = Async::new_nonblocking(TcpStream::from(socket));
    stream.writable().await.map_err(failed)?;
    if let Some(e) = stream.get_ref().take_error().map_err(failed)? {
        return Err(failed(e));
    }
    Ok(TcpConn::from_async(stream))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SocketOptions;

    #[test]
    fn an_unknown_egress_is_an_error_not_a_crash() {
        let egress = [Egress {
            name: "default".into(),
            device: None,
            source: None,
            options: SocketOptions::default(),
            via_proxy: None,
        }];
        let (dialer, _task) = DialerHandle::spawn(&egress, Vec::new(), 4);
        let target: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let err = rt::block_on(dialer.udp(target, EgressId(7))).unwrap_err();
        assert_eq!(err.to_string(), "no egress with id 7 (the dialer has 1)");
        // The dialer is still there for good requests.
        let socket = rt::block_on(dialer.udp(target, EgressId(0))).unwrap();
        assert_eq!(socket.get_ref().peer_addr().unwrap(), target);
    }
}
