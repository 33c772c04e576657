//! Dialer actor, one per relay: holds a socket [`Factory`] per egress and hands out connected
//! upstream sockets. It builds each socket in its loop (quick, non-blocking) and spawns the
//! connect, so one slow or dead backend never holds up another session's dial.

mod socket;

use std::io;
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::time::Duration;

use socket2::{SockAddr, Socket};

use crate::balancer::{BalancerHandle, Fault};
use crate::config::{Egress, EgressId, UpstreamProxy};
use crate::error::{DialError, Gone};
use crate::http;
use crate::rt::{self, Async, TcpConn};

pub(crate) use socket::Factory;

pub(crate) enum DialerMsg {
    Tcp {
        target: SocketAddr,
        egress: EgressId,
        timeout: Duration,
        reply: flume::Sender<Result<TcpConn, DialError>>,
    },
    Udp {
        target: SocketAddr,
        egress: EgressId,
        reply: flume::Sender<Result<Async<UdpSocket>, DialError>>,
    },
    /// What a connect task learnt of its egress: it failed for the egress's fault, or it
    /// worked while the egress was down.
    Learnt { egress: EgressId, up: bool, why: String },
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
            down: vec![false; egress.len()],
            seq: 0,
            watchers,
            myself: tx.downgrade(),
        };
        (DialerHandle { tx }, rt::spawn(dialer.run(rx)))
    }

    async fn ask<T>(&self, msg: DialerMsg, answer: flume::Receiver<Result<T, DialError>>) -> Result<T, DialError> {
        self.tx.send_async(msg).await.map_err(|_| Gone("dialer"))?;
        answer.recv_async().await.map_err(|_| Gone("dialer"))?
    }

    /// A TCP connection to `target` leaving by `egress`, or why not within `timeout`.
    pub async fn tcp(&self, target: SocketAddr, egress: EgressId, timeout: Duration) -> Result<TcpConn, DialError> {
        let (reply, answer) = flume::bounded(1);
        let msg = DialerMsg::Tcp {
            target,
            egress,
            timeout,
            reply,
        };
        self.ask(msg, answer).await
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
    /// Indexed by [`EgressId`]: the relay-wide word on each egress.
    down: Vec<bool>,
    /// Numbers the news, so that a balancer can tell old from new.
    seq: u64,
    watchers: Vec<BalancerHandle>,
    /// For connect tasks to report back; weak, so that it does not keep the dialer alive.
    myself: flume::WeakSender<DialerMsg>,
}

impl Dialer {
    async fn run(mut self, rx: flume::Receiver<DialerMsg>) {
        while let Ok(msg) = rx.recv_async().await {
            match msg {
                DialerMsg::Tcp {
                    target,
                    egress,
                    timeout,
                    reply,
                } => self.tcp(target, egress, timeout, reply),
                DialerMsg::Udp { target, egress, reply } => {
                    let socket = self
                        .factory(egress)
                        .and_then(|f| f.udp(target).and_then(|s| register(s, target, f)));
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

    /// Builds the socket here and leaves the connect (and the proxy's answer, through an egress
    /// with `via_proxy`) to a task of its own, all within `limit`.
    fn tcp(
        &mut self,
        target: SocketAddr,
        egress: EgressId,
        limit: Duration,
        reply: flume::Sender<Result<TcpConn, DialError>>,
    ) {
        let built = self.factory(egress).and_then(|f| {
            let proxy = f.via_proxy().cloned();
            let hop = proxy.as_ref().map_or(target, |p| p.addr);
            Ok((f.name().to_string(), proxy, f.tcp(hop)?))
        });
        let (name, proxy, socket) = match built {
            Ok(built) => built,
            Err(e) => {
                self.learn(egress, Some(&e));
                let _ = reply.send(Err(e));
                return;
            }
        };
        let (was_down, myself) = (self.down.get(egress.0).copied().unwrap_or(false), self.myself.clone());
        rt::detach(async move {
            let opened = rt::timeout(limit, open(socket, target, proxy, &name)).await;
            let opened = opened.unwrap_or(Err(DialError::Timeout {
                egress: name,
                target,
                after: limit,
            }));
            // Only news goes back to the dialer: an egress fault, or a success while it was down.
            let news = match &opened {
                Ok(_) if was_down => Some((true, "a dial succeeded".to_string())),
                Err(e) if e.fault() == Some(Fault::Egress) => Some((false, e.to_string())),
                _ => None,
            };
            if let (Some((up, why)), Some(dialer)) = (news, myself.upgrade()) {
                let _ = dialer.send_async(DialerMsg::Learnt { egress, up, why }).await;
            }
            let _ = reply.send(opened);
        });
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

fn register(socket: UdpSocket, target: SocketAddr, factory: &Factory) -> Result<Async<UdpSocket>, DialError> {
    Async::new(socket).map_err(|source| DialError::Connect {
        egress: factory.name().to_string(),
        target,
        source,
    })
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
    let stream = Async::new(TcpStream::from(socket)).map_err(failed)?;
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
