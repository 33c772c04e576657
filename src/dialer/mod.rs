//! Dialer actor, one per relay: holds a socket [`Factory`] per egress and hands out connected
//! upstream sockets. It builds each socket in its loop (quick, non-blocking) and spawns the
//! connect, so one slow or dead backend never holds up another session's dial.

mod socket;

use std::io;
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::time::Duration;

use socket2::{SockAddr, Socket};

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
}

/// Asks the relay's dialer for upstream sockets. Cheap to clone.
#[derive(Clone)]
pub struct DialerHandle {
    tx: flume::Sender<DialerMsg>,
}

impl DialerHandle {
    /// Starts a dialer with one factory per egress ([`crate::Settings::egress`]; an
    /// [`EgressId`] is an index into it). The dialer ends when the last handle is dropped.
    pub fn spawn(egress: &[Egress], mailbox: usize) -> (Self, rt::JoinHandle<()>) {
        let (tx, rx) = flume::bounded(mailbox);
        let dialer = Dialer {
            factories: egress.iter().cloned().map(Factory::new).collect(),
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
}

impl Dialer {
    async fn run(self, rx: flume::Receiver<DialerMsg>) {
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
                    let _ = reply.send(socket);
                }
            }
        }
        log::debug!(actor = "dialer"; "stopped, no handles left");
    }

    /// Validated settings only hold ids in range; an embedder's own ids might not.
    fn factory(&self, egress: EgressId) -> Result<&Factory, DialError> {
        (self.factories.get(egress.0)).ok_or(DialError::UnknownEgress(egress.0, self.factories.len()))
    }

    /// Builds the socket here and leaves the connect (and the proxy's answer, through an egress
    /// with `via_proxy`) to a task of its own, all within `limit`.
    fn tcp(
        &self,
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
                let _ = reply.send(Err(e));
                return;
            }
        };
        rt::detach(async move {
            let opened = rt::timeout(limit, open(socket, target, proxy, &name)).await;
            let _ = reply.send(opened.unwrap_or(Err(DialError::Timeout {
                egress: name,
                target,
                after: limit,
            })));
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
        let (dialer, _task) = DialerHandle::spawn(&egress, 4);
        let target: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let err = rt::block_on(dialer.udp(target, EgressId(7))).unwrap_err();
        assert_eq!(err.to_string(), "no egress with id 7 (the dialer has 1)");
        // The dialer is still there for good requests.
        let socket = rt::block_on(dialer.udp(target, EgressId(0))).unwrap();
        assert_eq!(socket.get_ref().peer_addr().unwrap(), target);
    }
}
