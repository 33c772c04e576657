//! UDP Listener actor, one per worker of each UDP route: owns its socket's receive side and the
//! table of the flows the kernel gives that socket (client address → flow), whose tasks run on
//! the same worker. Only this task touches the table: flows tell it when they end.
//! Nothing waits here on a flow: a full flow queue or a full table drops the datagram and counts
//! it, as UDP allows, so one slow flow never stalls the others.

use std::collections::HashMap;
use std::future::pending;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use crate::limits::Gate;
use crate::net::Endpoint;
use crate::rt;
use crate::session::{Flow, FlowEnded, RouteContext, SessionId};
use crate::shutdown::{DrainGuard, Signal};
use crate::stats::UdpDrop;

/// Datagrams a flow may have waiting before more are dropped.
const FLOW_QUEUE: usize = 64;

pub(crate) struct UdpListener {
    pub endpoint: Arc<Endpoint>,
    /// The context new flows get; live flows keep the one they started with.
    pub context: RouteContext,
    /// As the TCP listener's: a reload's new context, or (dropped) the route's removal.
    pub retarget: flume::Receiver<RouteContext>,
    /// The route's `max_flows`, which the listeners of its sockets share: each flow holds a
    /// pass.
    pub room: Arc<Gate>,
}

struct Entry {
    id: SessionId,
    queue: flume::Sender<Vec<u8>>,
}

enum Event {
    Datagram(io::Result<(usize, SocketAddr, Option<IpAddr>)>),
    Ended(FlowEnded),
    Control(super::Control),
    Stop,
}

/// The table and what the receive loop needs besides the socket.
struct Flows {
    table: HashMap<SocketAddr, Entry>,
    ended_tx: flume::Sender<FlowEnded>,
    guard: DrainGuard,
}

impl UdpListener {
    /// Receives until `stop` fires. Dropping the table then closes every flow's queue; the flows
    /// finish on their own (see `session::udp`).
    pub async fn run(mut self, stop: Signal, guard: DrainGuard) {
        let max = self.context.route.max_flows.get();
        // One notice per flow; the loop reads notices before datagrams, so a flow rarely waits here.
        let (ended_tx, ended) = flume::bounded(max);
        let mut flows = Flows {
            table: HashMap::new(),
            ended_tx,
            guard,
        };
        let mut buf = vec![0u8; crate::session::MAX_DATAGRAM];
        let mut backoff = super::Backoff::default();
        loop {
            match self.next(&mut buf, &ended, &stop).await {
                Event::Stop | Event::Control(super::Control::Stop) => break,
                Event::Control(super::Control::Retarget(context)) => {
                    self.room.set_max(context.route.max_flows.get() as u64);
                    self.context = context
                }
                Event::Ended(end) => {
                    if flows.table.get(&end.client).is_some_and(|e| e.id == end.id) {
                        flows.table.remove(&end.client);
                    }
                }
                Event::Datagram(Ok((n, client, local))) => {
                    backoff.reset();
                    self.deliver(&mut flows, &buf[..n], client, local)
                }
                Event::Datagram(Err(e)) => {
                    log::warn!(route = &*self.context.route_name, err:% = e, backoff_ms = backoff.next.as_millis() as u64;
                        "udp receive failed, backing off");
                    backoff.wait(&stop).await;
                }
            }
        }
        log::info!(route = &*self.context.route_name, flows = flows.table.len(); "listener stopped");
    }

    /// Stop first, then reloads and flow ends, then datagrams: a flood cannot starve the
    /// bookkeeping.
    async fn next(&self, buf: &mut [u8], ended: &flume::Receiver<FlowEnded>, stop: &Signal) -> Event {
        let stopped = async {
            stop.wait().await;
            Event::Stop
        };
        let end = async {
            match ended.recv_async().await {
                Ok(end) => Event::Ended(end),
                // The sender lives in this task's table: it cannot be gone while we wait.
                Err(_) => pending().await,
            }
        };
        let control = async { Event::Control(super::control(&self.retarget).await) };
        let datagram = async { Event::Datagram(self.endpoint.recv(buf).await) };
        rt::race(rt::race(stopped, control), rt::race(end, datagram)).await
    }

    fn deliver(&self, flows: &mut Flows, datagram: &[u8], client: SocketAddr, local: Option<IpAddr>) {
        let route = &*self.context.route_name;
        if let Some(entry) = flows.table.get(&client) {
            match entry.queue.try_send(datagram.to_vec()) {
                Ok(()) => return,
                Err(flume::TrySendError::Full(_)) => {
                    let dropped = self.context.udp_dropped(UdpDrop::FlowQueueFull);
                    if let Some(held) = self.context.refusals.admit() {
                        log::warn!(route = route, client:% = client, dropped_total = dropped, held_back = held;
                            "flow queue full, datagram dropped");
                    }
                    return;
                }
                // The flow ended a moment ago; its notice is on the way. This datagram opens a new one.
                Err(flume::TrySendError::Disconnected(_)) => drop(flows.table.remove(&client)),
            }
        }
        if !self.context.admits(client) {
            return;
        }
        let max = self.context.route.max_flows.get();
        // A new flow needs room under max_flows, the descriptor budget and max_connections;
        // a datagram does not wait in line.
        let passes = self.context.has_room().then(|| {
            let gates = std::iter::once(&self.room).chain(self.context.gates());
            gates.map(|g| g.try_enter()).collect::<Option<Vec<_>>>()
        });
        let passes = passes.flatten();
        let Some(passes) = passes else {
            let dropped = self.context.udp_dropped(UdpDrop::OverMaxFlows);
            if let Some(held) = self.context.refusals.admit() {
                let cap = self.context.budget.cap();
                log::warn!(route = route, client:% = client, max_flows = max, max_sessions = cap, dropped_total = dropped,
                    held_back = held;
                    "max_flows (or max_connections, or the relay's session cap) reached, datagram dropped");
            }
            return;
        };
        let (queue_tx, queue) = flume::bounded(FLOW_QUEUE);
        let flow = Flow {
            passes,
            client,
            local,
            reply: self.endpoint.clone(),
            queue,
            ended: flows.ended_tx.clone(),
        };
        let (id, task) = self.context.open_flow(flow, datagram.to_vec(), flows.guard.clone());
        drop(task);
        flows.table.insert(client, Entry { id, queue: queue_tx });
    }
}
