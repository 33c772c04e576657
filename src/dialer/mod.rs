//! Dialer actors, one on each worker (its shards): each holds a socket [`Factory`] per egress
//! and hands the sessions of its worker upstream sockets, built and bound as the egress says.
//! It builds each socket in its loop (quick, non-blocking); the connect runs in the asking
//! task, so one slow or dead backend never holds up another session's dial, and no dial wakes
//! another thread.
//!
//! Shard 0 also keeps the relay-wide word on each egress, from what does not depend on any one
//! target: the kernel's verdict (the egress watcher's), a device or source that cannot be
//! bound, and dials that time out towards several targets while another egress connects. Each
//! change goes out as [`EgressNews`] (the relay hands it to every balancer); dials in flight by
//! an egress that goes down are cut short, so their sessions go again by another egress at once.

mod socket;
mod standing;

use std::io;
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

use socket2::{SockAddr, Socket};

use crate::config::{Egress, EgressId, UpstreamProxy};
use crate::error::{DialError, Fault, Gone};
use crate::http;
use crate::rt::{self, Async, TcpConn};
use crate::shutdown::Signal;

pub(crate) use socket::Factory;
use standing::Standing;

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
        reply: flume::Sender<Result<UdpUpstream, DialError>>,
    },
    /// How a connect by `egress` to `target` went, where that can say something of the egress:
    /// every timeout, and successes while timeouts are being weighed.
    Dialed {
        egress: EgressId,
        target: SocketAddr,
        timed_out: bool,
    },
    /// The kernel's verdict on an egress: `Some(why)` it is unusable, `None` usable.
    Kernel { egress: EgressId, down: Option<String> },
    /// A reload's egresses, by the same ids (new ones at the end): a changed one is built
    /// anew for the dials to come and judged afresh; sockets it made already are untouched.
    Egresses(Vec<Egress>),
    /// To shard 0, from another: a socket could not be built for the egress's own fault.
    Evidence { egress: EgressId, why: String },
    /// From shard 0 to the others: its word on an egress (`Some(why)`: down; their dials in
    /// flight by it are cut short), and whether successes are worth hearing of now.
    Told {
        egress: EgressId,
        down: Option<Arc<str>>,
        weighing: bool,
    },
}

/// A TCP socket ready for its connect, and what the connect needs to know.
pub(crate) struct Prepared {
    socket: Socket,
    egress_name: Arc<str>,
    proxy: Option<UpstreamProxy>,
    /// Fires when the egress goes down: the connect is cut short.
    lost: Signal,
    /// The dialer is weighing timeouts: tell it how this connect went, success included.
    report_success: bool,
}

/// A connected UDP socket and the signal that fires when its egress goes down (a live flow
/// then moves to another egress).
pub struct UdpUpstream {
    pub socket: Async<UdpSocket>,
    pub lost: Signal,
}

/// The Dialer's word on an egress: `down` with the reason, or up; numbered, so that a late
/// word changes nothing.
#[derive(Debug, Clone)]
pub struct EgressNews {
    pub egress: EgressId,
    pub down: Option<Arc<str>>,
    pub seq: u64,
}

/// Asks the relay's dialer shards for upstream sockets. Cheap to clone.
#[derive(Clone)]
pub struct DialerHandle {
    /// One mailbox per worker, by the worker's number; shard 0 judges the egresses.
    shards: Arc<[flume::Sender<DialerMsg>]>,
}

impl DialerHandle {
    /// Starts a dialer with one factory per egress ([`crate::Settings::egress`]; an
    /// [`EgressId`] is an index into it). The receiver hears when an egress goes down or comes
    /// back. The dialer ends when the last handle is dropped.
    ///
    /// A shard runs on each worker of the current runtime. Shard 0 judges each egress for the
    /// relay (the kernel's word, what dials showed) and tells the others; theirs hand it what
    /// their dials show.
    pub fn spawn(egress: &[Egress], mailbox: usize) -> (Self, Vec<rt::JoinHandle<()>>, flume::Receiver<EgressNews>) {
        let (news, heard) = flume::bounded(mailbox);
        let (shards, mailboxes): (Vec<_>, Vec<_>) =
            (0..rt::worker_count().max(1)).map(|_| flume::bounded(mailbox)).unzip();
        let tasks = (mailboxes.into_iter().enumerate())
            .map(|(i, rx)| {
                let role = match i {
                    0 => Role::Judge {
                        news: news.clone(),
                        others: shards[1..].iter().map(flume::Sender::downgrade).collect(),
                        weighing: false,
                    },
                    _ => Role::Shard {
                        judge: shards[0].downgrade(),
                        weighing: false,
                    },
                };
                let dialer = Dialer {
                    factories: egress.iter().cloned().map(Factory::new).collect(),
                    names: egress.iter().map(|e| e.name.as_str().into()).collect(),
                    standing: egress.iter().map(|_| Standing::new()).collect(),
                    seq: 0,
                    role,
                };
                rt::spawn_on(i, dialer.run(rx))
            })
            .collect();
        (DialerHandle { shards: shards.into() }, tasks, heard)
    }

    /// The shard of the worker this runs on (shard 0 off the workers).
    fn local(&self) -> &flume::Sender<DialerMsg> {
        let i = rt::worker_index().map_or(0, usize::from) % self.shards.len();
        &self.shards[i]
    }

    async fn ask<T>(&self, msg: DialerMsg, answer: flume::Receiver<Result<T, DialError>>) -> Result<T, DialError> {
        self.local().send_async(msg).await.map_err(|_| Gone("dialer"))?;
        answer.recv_async().await.map_err(|_| Gone("dialer"))?
    }

    /// Sends `msg` to every shard.
    async fn broadcast(&self, msg: impl Fn() -> DialerMsg) -> Result<(), Gone> {
        for shard in self.shards.iter() {
            shard.send_async(msg()).await.map_err(|_| Gone("dialer"))?;
        }
        Ok(())
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
        let connect = rt::timeout(timeout, open(prepared.socket, target, prepared.proxy, &name));
        let opened = match prepared.lost.unless(connect).await {
            None => Err(DialError::EgressDown {
                egress: name.to_string(),
                target,
                why: "it went down during the connect".into(),
            }),
            Some(None) => Err(DialError::Timeout {
                egress: name.to_string(),
                target,
                after: timeout,
            }),
            Some(Some(opened)) => opened,
        };
        let timed_out = matches!(opened, Err(DialError::Timeout { .. }));
        if timed_out || (opened.is_ok() && prepared.report_success) {
            let msg = DialerMsg::Dialed {
                egress,
                target,
                timed_out,
            };
            // Straight to the judge: timeouts are rare, and successes are asked for only while
            // it weighs some.
            let _ = self.shards[0].send_async(msg).await;
        }
        opened
    }

    /// A UDP socket bound as `egress` says and connected to `target`.
    pub async fn udp(&self, target: SocketAddr, egress: EgressId) -> Result<UdpUpstream, DialError> {
        let (reply, answer) = flume::bounded(1);
        self.ask(DialerMsg::Udp { target, egress, reply }, answer).await
    }

    /// A reload's egresses: ids as before, new ones after them.
    pub(crate) async fn reconfigure(&self, egress: Vec<Egress>) -> Result<(), Gone> {
        self.broadcast(|| DialerMsg::Egresses(egress.clone())).await
    }

    /// The kernel's verdict on `egress` changed: the judge's to weigh.
    pub(crate) async fn kernel(&self, egress: EgressId, down: Option<String>) -> Result<(), Gone> {
        let msg = DialerMsg::Kernel { egress, down };
        self.shards[0].send_async(msg).await.map_err(|_| Gone("dialer"))
    }
}

struct Dialer {
    /// Indexed by [`EgressId`].
    factories: Vec<Factory>,
    /// Indexed by [`EgressId`]: the factories' names, shared with every dial's errors.
    names: Vec<Arc<str>>,
    /// Indexed by [`EgressId`]: the relay-wide word on each egress.
    standing: Vec<Standing>,
    /// Numbers the news, so that a balancer can tell old from new.
    seq: u64,
    role: Role,
}

/// A dialer shard's part in judging the egresses.
enum Role {
    /// Shard 0: weighs the evidence, tells the balancers (`news`) and the other shards.
    ///
    /// The shards hold each other weakly: they end, as any actor, once the relay's handles
    /// are gone.
    Judge {
        news: flume::Sender<EgressNews>,
        others: Vec<flume::WeakSender<DialerMsg>>,
        /// What the others were last told of it.
        weighing: bool,
    },
    /// Any other: hands its evidence to the judge, and keeps the judge's word (in each
    /// standing's kernel verdict).
    Shard {
        judge: flume::WeakSender<DialerMsg>,
        weighing: bool,
    },
}

/// Sends without waiting in an actor's loop: a full mailbox hands the word to a task.
fn tell<T: Send + 'static>(tx: &flume::Sender<T>, msg: T) {
    if let Err(flume::TrySendError::Full(msg)) = tx.try_send(msg) {
        let tx = tx.clone();
        rt::detach(async move {
            let _ = tx.send_async(msg).await;
        });
    }
}

impl Dialer {
    async fn run(mut self, rx: flume::Receiver<DialerMsg>) {
        loop {
            // A trial of an egress taken out by its dials is due: it is let back in then.
            let next_trial = self.standing.iter().filter_map(Standing::trial_at).min();
            let msg = match next_trial {
                None => rx.recv_async().await.ok(),
                Some(at) => match rt::timeout(at.saturating_duration_since(Instant::now()), rx.recv_async()).await {
                    Some(msg) => msg.ok(),
                    None => {
                        self.trials(Instant::now());
                        continue;
                    }
                },
            };
            let Some(msg) = msg else { break };
            match msg {
                DialerMsg::Tcp { target, egress, reply } => self.tcp(target, egress, reply),
                DialerMsg::Udp { target, egress, reply } => {
                    let _ = reply.send(self.udp(target, egress));
                }
                DialerMsg::Dialed {
                    egress,
                    target,
                    timed_out,
                } => self.dialed(egress, target, timed_out),
                DialerMsg::Egresses(egress) => self.reconfigure(egress),
                DialerMsg::Kernel { egress, down } => {
                    if let Some(standing) = self.standing.get_mut(egress.0) {
                        standing.kernel = down.map(Into::into);
                        self.announce(egress);
                    }
                }
                DialerMsg::Evidence { egress, why } => {
                    if let Some(standing) = self.standing.get_mut(egress.0) {
                        standing.failed(why, Instant::now());
                        self.announce(egress);
                    }
                }
                DialerMsg::Told { egress, down, weighing } => {
                    if let Role::Shard { weighing: w, .. } = &mut self.role {
                        *w = weighing;
                    }
                    if let Some(standing) = self.standing.get_mut(egress.0) {
                        standing.kernel = down;
                        // Going down fires its lost signal: this shard's dials by it end.
                        let _ = standing.change();
                    }
                }
            }
            self.tell_weighing();
        }
        log::debug!(actor = "dialer"; "stopped, no handles left");
    }

    fn reconfigure(&mut self, egress: Vec<Egress>) {
        for (i, egress) in egress.into_iter().enumerate() {
            if i == self.factories.len() {
                self.names.push(egress.name.as_str().into());
                self.factories.push(Factory::new(egress));
                self.standing.push(Standing::new());
            } else if *self.factories[i].egress() != egress {
                self.factories[i] = Factory::new(egress);
                // Judged afresh: the watcher, restarted with the reload, gives the kernel's word.
                self.standing[i].forget();
                self.announce(EgressId(i));
            }
        }
    }

    /// Validated settings only hold ids in range; an embedder's own ids might not.
    fn factory(&self, egress: EgressId, target: SocketAddr) -> Result<&Factory, DialError> {
        let factory = (self.factories.get(egress.0)).ok_or(DialError::UnknownEgress(egress.0, self.factories.len()))?;
        match self.standing[egress.0].down() {
            Some(why) => Err(DialError::EgressDown {
                egress: factory.name().to_string(),
                target,
                why: why.clone(),
            }),
            None => Ok(factory),
        }
    }

    /// Builds the socket: quick, and never blocking. The caller connects it.
    fn tcp(&mut self, target: SocketAddr, egress: EgressId, reply: flume::Sender<Result<Prepared, DialError>>) {
        let built = self.factory(egress, target).and_then(|f| {
            let proxy = f.via_proxy().cloned();
            let hop = proxy.as_ref().map_or(target, |p| p.addr);
            Ok((proxy, f.tcp(hop)?))
        });
        let prepared = built.map(|(proxy, socket)| Prepared {
            socket,
            egress_name: self.names[egress.0].clone(),
            proxy,
            lost: self.standing[egress.0].lost(),
            report_success: self.weighing(),
        });
        self.learn(egress, prepared.as_ref().err());
        let _ = reply.send(prepared);
    }

    fn udp(&mut self, target: SocketAddr, egress: EgressId) -> Result<UdpUpstream, DialError> {
        let socket = self.factory(egress, target).and_then(|f| f.udp(target));
        self.learn(egress, socket.as_ref().err());
        let socket = socket?;
        Ok(UdpUpstream {
            socket: Async::new_nonblocking(socket),
            lost: self.standing[egress.0].lost(),
        })
    }

    /// A socket that could not be built for the egress's own fault (its device or source)
    /// takes it out until a trial.
    fn learn(&mut self, egress: EgressId, failed: Option<&DialError>) {
        let Some(e) = failed else { return };
        if e.fault() != Some(Fault::Egress) || matches!(e, DialError::EgressDown { .. }) {
            return;
        }
        if let Role::Shard { judge, .. } = &self.role {
            let why = e.to_string();
            if let Some(judge) = judge.upgrade() {
                tell(&judge, DialerMsg::Evidence { egress, why });
            }
            return;
        }
        if let Some(standing) = self.standing.get_mut(egress.0) {
            standing.failed(e.to_string(), Instant::now());
            self.announce(egress);
        }
    }

    fn dialed(&mut self, egress: EgressId, target: SocketAddr, timed_out: bool) {
        let now = Instant::now();
        let Some(standing) = self.standing.get_mut(egress.0) else {
            return;
        };
        if !timed_out {
            standing.connected(now);
            return;
        }
        // Timeouts towards several targets by one egress while another egress connects
        // point at the egress, not at each of those backends.
        let targets = standing.timed_out(target, now);
        let since = standing.timeouts_since();
        let other = (self.standing.iter().enumerate()).find(|(i, s)| {
            *i != egress.0 && s.down().is_none() && s.last_success.zip(since).is_some_and(|(ok, t)| ok >= t)
        });
        if let Some((other, _)) = other.filter(|_| targets >= standing::SUSPECT_AFTER) {
            let why = format!(
                "connects to {targets} targets timed out while egress {} connected",
                self.names[other]
            );
            self.standing[egress.0].failed(why, now);
            self.announce(egress);
        }
    }

    /// Successes are worth hearing of: the judge weighs timeouts or has a trial on.
    fn weighing(&self) -> bool {
        match &self.role {
            Role::Judge { .. } => self.standing.iter().any(Standing::weighing),
            Role::Shard { weighing, .. } => *weighing,
        }
    }

    /// The judge tells the other shards when that changed.
    fn tell_weighing(&mut self) {
        let now = self.standing.iter().any(Standing::weighing);
        if let Role::Judge { others, weighing, .. } = &mut self.role {
            if *weighing != now {
                *weighing = now;
                for (i, standing) in self.standing.iter().enumerate() {
                    let (egress, down) = (EgressId(i), standing.down().cloned());
                    for other in others.iter().filter_map(flume::WeakSender::upgrade) {
                        let down = down.clone();
                        tell(
                            &other,
                            DialerMsg::Told {
                                egress,
                                down,
                                weighing: now,
                            },
                        );
                    }
                }
            }
        }
    }

    fn trials(&mut self, now: Instant) {
        for i in 0..self.standing.len() {
            if self.standing[i].trial(now) {
                self.announce(EgressId(i));
            }
        }
    }

    /// Tells every balancer and every other shard the egress's standing when it changed, and
    /// logs it once (the judge; another shard has nothing to announce).
    fn announce(&mut self, egress: EgressId) {
        let Role::Judge { news, others, weighing } = &mut self.role else {
            return;
        };
        let name = self.names[egress.0].clone();
        let Some(change) = self.standing[egress.0].change() else {
            return;
        };
        self.seq += 1;
        match &change {
            Some(why) => log::warn!(egress = &*name, why = &**why; "egress down"),
            None => log::info!(egress = &*name; "egress up"),
        }
        *weighing = self.standing.iter().any(Standing::weighing);
        for other in others.iter().filter_map(flume::WeakSender::upgrade) {
            let (down, weighing) = (change.clone(), *weighing);
            tell(&other, DialerMsg::Told { egress, down, weighing });
        }
        let news_of = EgressNews {
            egress,
            down: change,
            seq: self.seq,
        };
        tell(news, news_of);
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
        return complete_connect(socket, target, egress).await;
    };
    let mut conn = complete_connect(socket, proxy.addr, egress).await?;
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
async fn complete_connect(socket: Socket, target: SocketAddr, egress: &str) -> Result<TcpConn, DialError> {
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

    fn egress(name: &str, device: Option<&str>) -> Egress {
        Egress {
            name: name.into(),
            device: device.map(str::to_string),
            source: None,
            options: SocketOptions::default(),
            via_proxy: None,
        }
    }

    #[test]
    fn the_judges_word_on_an_egress_reaches_every_shard_and_cuts_its_flows_and_dials() {
        let runtime = crate::rt::Runtime::new(std::num::NonZeroUsize::new(2)).unwrap();
        let (dialer, shards, news) = runtime.enter(|| DialerHandle::spawn(&[egress("default", None)], 4));
        assert_eq!(shards.len(), 2, "a shard on each worker");
        let target: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let on_one = |dialer: DialerHandle| {
            runtime.enter(|| crate::rt::spawn_on(1, async move { dialer.udp(target, EgressId(0)).await }))
        };
        // A flow's socket from worker 1's shard, and its lost signal.
        let flow = crate::rt::block_on(on_one(dialer.clone())).expect("a socket while the egress is up");
        // The kernel's word goes to the judge (shard 0), which tells worker 1's shard.
        crate::rt::block_on(dialer.kernel(EgressId(0), Some("carrier lost on eth9".into()))).unwrap();
        let told = crate::rt::block_on(crate::rt::timeout(Duration::from_secs(10), flow.lost.wait()));
        assert!(told.is_some(), "worker 1's flow never heard that its egress went down");
        let refused = crate::rt::block_on(on_one(dialer.clone()))
            .err()
            .expect("refused by worker 1's shard");
        assert!(matches!(refused, DialError::EgressDown { .. }), "{refused}");
        // The balancers hear it once, from the judge.
        let heard = news.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(heard.down.as_deref(), Some("carrier lost on eth9"));
        assert!(news.try_recv().is_err());
        drop(dialer);
        for shard in shards {
            crate::rt::block_on(crate::rt::timeout(Duration::from_secs(10), shard))
                .expect("shards end with their handles");
        }
    }

    #[test]
    fn an_unknown_egress_is_an_error_not_a_crash() {
        let (dialer, _task, _news) = DialerHandle::spawn(&[egress("default", None)], 4);
        let target: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let err = rt::block_on(dialer.udp(target, EgressId(7))).err().unwrap();
        assert_eq!(err.to_string(), "no egress with id 7 (the dialer has 1)");
        // The dialer is still there for good requests.
        let upstream = rt::block_on(dialer.udp(target, EgressId(0))).unwrap();
        assert_eq!(upstream.socket.get_ref().peer_addr().unwrap(), target);
    }

    #[test]
    fn the_kernels_word_takes_an_egress_out_and_cuts_its_dials_short() {
        let (dialer, _task, _news) = DialerHandle::spawn(&[egress("default", None), egress("up1", None)], 4);
        // A UDP dial by up1 holds the signal that fires when up1 goes.
        let target: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let live = rt::block_on(dialer.udp(target, EgressId(1))).unwrap();
        rt::block_on(dialer.kernel(EgressId(1), Some("carrier lost on up1".into()))).unwrap();
        let cut = rt::block_on(rt::timeout(Duration::from_secs(5), live.lost.wait()));
        assert!(cut.is_some(), "the live flow hears that its egress went");
        let refused = rt::block_on(dialer.udp(target, EgressId(1))).err().unwrap();
        assert!(
            refused.to_string().contains("carrier lost on up1") && refused.fault() == Some(Fault::Egress),
            "{refused}"
        );
        assert!(
            rt::block_on(dialer.udp(target, EgressId(0))).is_ok(),
            "the other egress serves on"
        );
        rt::block_on(dialer.kernel(EgressId(1), None)).unwrap();
        assert!(
            rt::block_on(dialer.udp(target, EgressId(1))).is_ok(),
            "back once the kernel says so"
        );
    }

    #[test]
    fn timeouts_towards_several_targets_while_another_egress_connects_take_an_egress_out() {
        let egress = [egress("default", None), egress("up1", None), egress("up2", None)];
        let mut d = Dialer {
            factories: egress.iter().cloned().map(Factory::new).collect(),
            names: egress.iter().map(|e| e.name.as_str().into()).collect(),
            standing: egress.iter().map(|_| Standing::new()).collect(),
            seq: 0,
            role: Role::Judge {
                news: flume::bounded(8).0,
                others: Vec::new(),
                weighing: false,
            },
        };
        let (a, b): (SocketAddr, SocketAddr) = ("198.18.9.1:80".parse().unwrap(), "198.18.9.2:80".parse().unwrap());
        d.dialed(EgressId(1), a, true);
        d.dialed(EgressId(1), a, true);
        assert!(
            d.standing[1].down().is_none(),
            "one target timing out is that backend's business"
        );
        d.dialed(EgressId(1), b, true);
        assert!(
            d.standing[1].down().is_none(),
            "nobody else connected: maybe the backends are down"
        );
        // up2 reaches a target up1 timed out on: the next timeout by up1 tips it.
        d.dialed(EgressId(2), a, false);
        d.dialed(EgressId(1), b, true);
        let why = d.standing[1].down().expect("suspect: out until a trial").to_string();
        assert_eq!(why, "connects to 2 targets timed out while egress up2 connected");
        assert!(d.standing[2].down().is_none());
    }
}
