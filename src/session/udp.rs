//! A UDP flow: one client address's datagrams to one backend and back. The Listener hands it
//! the client's datagrams on a bounded queue; replies go straight out of the route's listening
//! socket, read through a per-thread scratch buffer, so an idle flow holds no buffer at all.

use std::cell::RefCell;
use std::future::{Future, poll_fn};
use std::io;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use super::{Direction, Session, SessionEnd, SessionId, SessionReport, Transfer};
use crate::balancer::{Pick, Tried};
use crate::dialer::UdpUpstream;
use crate::error::Fault;
use crate::metrics::Meter;
use crate::net::Endpoint;
use crate::rt::{self, Timer};

/// The largest UDP payload, plus one so that a truncated read cannot pass unnoticed.
pub(crate) const MAX_DATAGRAM: usize = 65536;
/// Once the relay stops, a flow ends after this long with nothing moving (or its idle timeout,
/// if shorter): answers already on their way still get back.
const DRAIN_QUIET: Duration = Duration::from_secs(1);

thread_local! {
    static SCRATCH: RefCell<Vec<u8>> = RefCell::new(vec![0; MAX_DATAGRAM]);
}

/// A flow's end, told to the Listener so it can drop the flow from its table.
pub(crate) struct FlowEnded {
    pub client: SocketAddr,
    pub id: SessionId,
}

/// What a flow needs from its Listener.
pub(crate) struct Flow {
    /// Its places under the route's and the relay's `max_connections`: held, never read, for
    /// the flow's whole life; dropping them makes room.
    #[allow(dead_code)]
    pub passes: Vec<crate::limits::Pass>,
    pub client: SocketAddr,
    /// The address the client wrote to (wildcard listeners only): replies come from it.
    pub local: Option<IpAddr>,
    pub reply: Arc<Endpoint>,
    pub queue: flume::Receiver<Vec<u8>>,
    pub ended: flume::Sender<FlowEnded>,
}

/// How one leg of a flow (one backend by one egress) ended.
enum Leg {
    Ended(SessionEnd),
    /// An ICMP error, a failed send, or no answer in time.
    BackendFailed(io::Error),
    /// The egress went down under the live flow.
    EgressLost,
}

enum Event {
    Force,
    EgressLost,
    Stop,
    Client(Option<Vec<u8>>),
    /// A reply was read: forwarded (`Some(len)`) or dropped (`None`).
    Backend(io::Result<Option<usize>>),
    Tick,
}

/// What a flow carries from one backend (or egress) to the next: the client's latest datagram,
/// which a failover resends, and the flow's meter.
struct Carried {
    last: Vec<u8>,
    meter: Meter,
}

impl Session {
    pub(super) async fn run_udp(mut self, flow: Flow, first: Vec<u8>) -> SessionReport {
        let id = self.id();
        // `pending`: what the next leg sends first (the datagram a failed backend never took).
        let mut tried = Vec::new();
        let mut carried = Carried {
            last: first,
            meter: self.ctx.metrics.meter(&self.ctx.route_name, true),
        };
        let mut pending = true;
        let end = loop {
            let dialer = &self.ctx.dialer;
            let connect = Box::pin(self.reach_backend(&mut tried, false, |pick| dialer.udp(pick.addr, pick.egress)));
            let (pick, upstream) = match self.ctx.force.unless(connect).await {
                None => break SessionEnd::Forced,
                Some(Err(end)) => break end,
                Some(Ok(dialed)) => dialed,
            };
            let egress = self.ctx.egress_name(&pick);
            self.ctx.metrics.by_egress(&mut carried.meter, &egress);
            (self.report.backend, self.report.egress) = (Some(pick.addr), Some(egress));
            self.report.path = Transfer::Datagrams;
            let leg = self.relay_udp(&flow, &pick, &upstream, &mut carried, pending);
            match leg.await {
                Leg::Ended(end) => {
                    let _ = self.ctx.balancer.closed(pick.backend).await;
                    break end;
                }
                // The same backend by another egress, with the client's next datagram (the
                // last one may have been answered already).
                Leg::EgressLost => {
                    pending = false;
                    log::info!(route = &*self.ctx.route_name, session = id.0, client:% = flow.client, backend:% = pick.addr,
                        egress = &*self.ctx.egress_name(&pick); "udp flow moves off its egress, which went down");
                    let _ = self.ctx.balancer.closed(pick.backend).await;
                    tried.push(Tried {
                        backend: pick.backend,
                        egress: Some(pick.egress),
                    });
                }
                Leg::BackendFailed(e) => {
                    pending = true;
                    self.backend_failed(&pick, &flow, &e).await;
                    if self.report.bytes_down > 0 {
                        break SessionEnd::Aborted(Direction::Down, e);
                    }
                    // The backend never answered: its error is as good as a refused connect.
                    // The next backend gets the datagram this one could not take.
                    tried.push(Tried {
                        backend: pick.backend,
                        egress: None,
                    });
                }
            }
        };
        let _ = flow
            .ended
            .send_async(FlowEnded {
                client: flow.client,
                id,
            })
            .await;
        (carried.meter).moved((self.report.bytes_up, self.report.bytes_down), self.report.datagrams);
        self.finish(end)
    }

    /// A backend that answers with an error (ICMP port unreachable: ECONNREFUSED), or not at
    /// all within the reply timeout, is charged as a failed connect, to the balancer and in the
    /// metrics (and the flow's session on it is no longer counted).
    async fn backend_failed(&self, pick: &Pick, flow: &Flow, e: &io::Error) {
        let ctx = &self.ctx;
        if let Some(held) = ctx.dial_failures.admit() {
            log::warn!(route = &*ctx.route_name, session = self.id().0, client:% = flow.client, backend:% = pick.addr,
                egress = &*ctx.egress_name(pick), err:% = e, held_back = held; "udp backend failed");
        }
        let why = format!("udp: {e}");
        (ctx.metrics).dialed(&ctx.route_name, pick.addr, &ctx.egress_name(pick), Err(Fault::Backend));
        let _ = ctx.balancer.connected(pick, Err((Fault::Backend, why))).await;
    }

    /// Relays until the flow ends, its backend fails, or its egress goes. `carried.last` is the
    /// client's latest datagram: sent first here when `pending`, and kept so that a failover
    /// can resend it.
    async fn relay_udp(
        &mut self,
        flow: &Flow,
        pick: &Pick,
        upstream: &UdpUpstream,
        carried: &mut Carried,
        pending: bool,
    ) -> Leg {
        let Carried { last, meter } = carried;
        let ctx = &self.ctx;
        let socket = &upstream.socket;
        // With send_proxy, every datagram carries the v2 header (a backend may see any one
        // first): the flow's header, built once, then the payload.
        let header = ctx.route.send_proxy.map(|_| {
            let bound = flow.reply.local_addr().unwrap_or(ctx.route.listen);
            let local = flow.local.map_or(bound, |ip| SocketAddr::new(ip, bound.port()));
            crate::proto::datagram_header(flow.client, local)
        });
        if pending {
            if let Err(e) = socket.send(&framed(&header, last.as_slice())).await {
                return Leg::BackendFailed(e);
            }
            self.report.bytes_up += last.len() as u64;
            self.report.datagrams.0 += 1;
        }
        let (mut quiet, mut stopping, mut client_gone) = (ctx.route.timeouts.idle, false, false);
        let mut moved = Instant::now();
        // From the leg's first datagram to the backend's first answer: a UDP "connect".
        let sent = moved;
        // Until the first answer, the reply timeout (when set) is the nearer deadline.
        let mut awaiting = (self.report.bytes_down == 0)
            .then_some(ctx.route.health.reply_timeout)
            .flatten()
            .and_then(|t| moved.checked_add(t));
        let mut answered = false;
        let mut timer = Timer::after(quiet);
        if let Some(at) = awaiting {
            timer.set_at(at.min(moved + quiet));
        }
        loop {
            meter.moved((self.report.bytes_up, self.report.bytes_down), self.report.datagrams);
            match self.next_event(flow, upstream, &mut timer, stopping, client_gone).await {
                Event::Force => return Leg::Ended(SessionEnd::Forced),
                Event::EgressLost => return Leg::EgressLost,
                Event::Stop => {
                    (stopping, quiet) = (true, quiet.min(DRAIN_QUIET));
                    timer.set_at(moved + quiet);
                }
                Event::Client(None) => client_gone = true,
                Event::Client(Some(datagram)) => {
                    if let Err(e) = socket.send(&framed(&header, &datagram)).await {
                        return Leg::BackendFailed(e);
                    }
                    self.report.bytes_up += datagram.len() as u64;
                    self.report.datagrams.0 += 1;
                    *last = datagram;
                    moved = Instant::now();
                }
                Event::Backend(Ok(forwarded)) => {
                    match forwarded {
                        Some(n) => {
                            self.report.bytes_down += n as u64;
                            self.report.datagrams.1 += 1;
                        }
                        None => {
                            ctx.udp_dropped(crate::stats::UdpDrop::ClientUnreachable);
                        }
                    }
                    awaiting = None;
                    // The first answer is what proves a UDP backend, to the balancer and in the
                    // metrics alike.
                    if !std::mem::replace(&mut answered, true) {
                        let egress = ctx.egress_name(pick);
                        ctx.metrics
                            .dialed(&ctx.route_name, pick.addr, &egress, Ok(sent.elapsed()));
                        if pick.report_success {
                            let _ = ctx.balancer.connected(pick, Ok(())).await;
                        }
                    }
                    moved = Instant::now();
                }
                Event::Backend(Err(e)) => return Leg::BackendFailed(e),
                Event::Tick if awaiting.is_some_and(|at| Instant::now() >= at) => {
                    let waited = ctx.route.health.reply_timeout.unwrap_or_default();
                    let why = format!("no reply within {}", humantime::format_duration(waited));
                    return Leg::BackendFailed(io::Error::new(io::ErrorKind::TimedOut, why));
                }
                Event::Tick if Instant::now() >= moved + quiet => {
                    return Leg::Ended(if stopping {
                        SessionEnd::RelayStopped
                    } else {
                        SessionEnd::IdleTimeout
                    });
                }
                Event::Tick => timer.set_at(awaiting.map_or(moved + quiet, |at| at.min(moved + quiet))),
            }
        }
    }

    async fn next_event(
        &self,
        flow: &Flow,
        upstream: &UdpUpstream,
        timer: &mut Timer,
        stopping: bool,
        client_gone: bool,
    ) -> Event {
        let mut force = pin!(self.ctx.force.wait());
        let mut lost = pin!(upstream.lost.wait());
        let mut stop = pin!(self.ctx.stop.wait());
        let mut client = pin!(flow.queue.recv_async());
        poll_fn(|cx| {
            if force.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Event::Force);
            }
            if lost.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Event::EgressLost);
            }
            if !stopping && stop.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Event::Stop);
            }
            if !client_gone {
                if let Poll::Ready(datagram) = client.as_mut().poll(cx) {
                    return Poll::Ready(Event::Client(datagram.ok()));
                }
            }
            if let Poll::Ready(result) = rt::poll_read_with(&upstream.socket, cx, |socket| forward(socket, flow)) {
                return Poll::Ready(Event::Backend(result));
            }
            Pin::new(&mut *timer).poll(cx).map(|_| Event::Tick)
        })
        .await
    }
}

/// A datagram for the backend: `payload`, behind the flow's PROXY header when it has one.
fn framed<'a>(header: &Option<Vec<u8>>, payload: &'a [u8]) -> std::borrow::Cow<'a, [u8]> {
    match header {
        Some(header) => std::borrow::Cow::Owned([header.as_slice(), payload].concat()),
        None => std::borrow::Cow::Borrowed(payload),
    }
}

/// Reads one reply and sends it on to the client at once. `Ok(None)`: the client's side could
/// not take it and it was dropped, as UDP may. Errors are the backend's.
fn forward(upstream: &UdpSocket, flow: &Flow) -> io::Result<Option<usize>> {
    SCRATCH.with_borrow_mut(|buf| {
        let n = upstream.recv(buf)?;
        match flow.reply.try_send(&buf[..n], flow.client, flow.local) {
            Ok(true) => Ok(Some(n)),
            Ok(false) => Ok(None),
            Err(e) => {
                log::debug!(client:% = flow.client, err:% = e; "reply to client failed, dropped");
                Ok(None)
            }
        }
    })
}
