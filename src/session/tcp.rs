//! A TCP session: connect with failover, then the two-way pump.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Instant;

use futures::io::{AsyncRead, AsyncWrite};

use std::any::Any;

use super::pump::{End, Pump};
use super::splice::SplicePump;
use super::{Path, SessionEnd, SessionId, SessionReport, Sessions};
use crate::balancer::Pick;
use crate::config::Protocol;
use crate::rt::{JoinHandle, TcpConn};
use crate::shutdown::DrainGuard;

impl Sessions {
    /// Starts a session for `client`; the handle yields its report.
    pub fn open<S>(&self, client: S, peer: SocketAddr, guard: DrainGuard) -> JoinHandle<SessionReport>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + Any,
    {
        let ctx = self.clone();
        match self.route.protocol {
            Protocol::HttpConnect => self.spawn(guard, move |id| ctx.run_connect(id, client, peer)).1,
            Protocol::Tcp | Protocol::Udp => self.spawn(guard, move |id| ctx.run_tcp(id, client, peer)).1,
        }
    }

    /// The session's future. Not an `async fn`: that would keep a second copy of every
    /// argument in the task for its whole life.
    #[allow(clippy::manual_async_fn)]
    fn run_tcp<S>(self, id: SessionId, mut client: S, peer: SocketAddr) -> impl Future<Output = SessionReport> + Send
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + Any,
    {
        async move {
            let started = Instant::now();
            let timeout = self.route.connect_timeout;
            // Boxed, and dropped once connected: the connect phase is most of a session's
            // state, and an idle session need not carry it for its whole life.
            let connect = Box::pin(async {
                let mut tried = Vec::new();
                let dial = |pick: Pick| self.dialer.tcp(pick.addr, pick.egress, timeout);
                self.connect(id, peer, &mut tried, true, dial).await
            });
            let connected = self.force.unless(connect).await;
            let mut report = SessionReport::new(id, self.route_name.clone(), peer);
            match connected {
                None => report.end = SessionEnd::Forced,
                Some(Err(end)) => report.end = end,
                Some(Ok((pick, mut upstream))) => {
                    report.backend = Some(pick.addr);
                    report.egress = Some(self.egress_name(&pick));
                    report.end = self.relay(&mut client, &mut upstream, &mut report).await;
                    // Closed now: a pair that ended both ways left its last FIN to the close.
                    drop((upstream, client));
                    let _ = self.balancer.closed(pick.backend).await;
                }
            }
            report.duration = started.elapsed();
            report
        }
    }

    /// Relays until the pair ends: by splice when both ends are TCP sockets (and splice is on),
    /// by copying otherwise (an injected stream, for one).
    pub(super) async fn relay<S>(
        &self,
        client: &mut S,
        upstream: &mut TcpConn,
        report: &mut SessionReport,
    ) -> SessionEnd
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + Any,
    {
        log::debug!(route = &*self.route_name, session = report.id.0, client:% = report.peer,
            backend:? = report.backend; "session relaying");
        let timeouts = self.route.timeouts;
        let tcp_client = (client as &mut dyn Any)
            .downcast_mut::<TcpConn>()
            .filter(|_| self.splice);
        let end = if let Some(tcp_client) = tcp_client {
            let mut pump = SplicePump::new(tcp_client, upstream, timeouts);
            let end = self.force.unless(&mut pump).await;
            (report.bytes_up, report.bytes_down) = pump.bytes();
            report.path = pump.path();
            end
        } else {
            let mut pump = Pump::new(client, upstream, timeouts);
            let end = self.force.unless(&mut pump).await;
            (report.bytes_up, report.bytes_down) = pump.bytes();
            report.path = Path::Copy;
            end
        };
        match end {
            None => SessionEnd::Forced,
            Some(End::Done) => SessionEnd::Done,
            Some(End::Idle) => SessionEnd::IdleTimeout,
            Some(End::Fin) => SessionEnd::FinTimeout,
            Some(End::Failed(direction, e)) => SessionEnd::Failed(direction, e),
        }
    }
}
