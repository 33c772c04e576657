//! Dialer actor, one per relay: holds a socket [`Factory`] per egress and hands out connected
//! upstream sockets. It builds each socket in its loop (quick, non-blocking) and spawns the
//! connect, so one slow or dead backend never holds up another session's dial.

mod socket;

use std::io;
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::time::Duration;

use socket2::{SockAddr, Socket};

use crate::config::{Egress, EgressId};
use crate::error::{DialError, Gone};
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

    /// Builds the socket here and leaves the connect to a task of its own.
    fn tcp(
        &self,
        target: SocketAddr,
        egress: EgressId,
        timeout: Duration,
        reply: flume::Sender<Result<TcpConn, DialError>>,
    ) {
        let built = self
            .factory(egress)
            .and_then(|f| Ok((f.name().to_string(), f.tcp(target)?)));
        match built {
            Ok((name, socket)) => {
                rt::detach(async move {
                    let _ = reply.send(connect(socket, target, timeout, name).await);
                });
            }
            Err(e) => {
                let _ = reply.send(Err(e));
            }
        }
    }
}

fn register(socket: UdpSocket, target: SocketAddr, factory: &Factory) -> Result<Async<UdpSocket>, DialError> {
    Async::new(socket).map_err(|source| DialError::Connect {
        egress: factory.name().to_string(),
        target,
        source,
    })
}

/// Completes a non-blocking connect within `limit`.
async fn connect(socket: Socket, target: SocketAddr, limit: Duration, egress: String) -> Result<TcpConn, DialError> {
    let failed = |source: io::Error| DialError::Connect {
        egress: egress.clone(),
        target,
        source,
    };
    match socket.connect(&SockAddr::from(target)) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(failed(e)),
    }
    let stream = Async::new(TcpStream::from(socket)).map_err(failed)?;
    match rt::timeout(limit, stream.writable()).await {
        None => {
            return Err(DialError::Timeout {
                egress: egress.clone(),
                target,
                after: limit,
            });
        }
        Some(ready) => ready.map_err(failed)?,
    }
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
