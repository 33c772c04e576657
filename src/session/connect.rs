//! The pick-and-dial loop every session that reaches a backend goes through, with failover:
//! the Balancer offers (backend, egress) pairs, the dial's failure is charged to its cause,
//! and the next pair is tried until one connects or the route's attempts run out.

use std::future::Future;

use super::{Session, SessionEnd};
use crate::balancer::{BackendId, Pick, Tried};
use crate::error::{DialError, Fault};

impl Session {
    /// Tries the balancer's pairs until `dial` succeeds or the route's attempts run out. Each
    /// failure is charged to its cause: a backend at fault is not offered again (and counts
    /// as an attempt); an egress or path at fault rules out only that backend by that egress,
    /// so the same backend is tried by the next egress before the client sees anything.
    /// `proves`: a dial that succeeds proves the backend (TCP); a UDP socket proves nothing.
    pub(super) async fn reach_backend<T, F, Fut>(
        &self,
        tried: &mut Vec<Tried>,
        proves: bool,
        dial: F,
    ) -> Result<(Pick, T), SessionEnd>
    where
        F: Fn(Pick) -> Fut,
        Fut: Future<Output = Result<T, DialError>>,
    {
        let (ctx, id, peer) = (&self.ctx, self.id(), self.peer());
        let mut last: Option<String> = None;
        let why = loop {
            let failed = tried.iter().filter(|t| t.egress.is_none()).count();
            if failed >= ctx.route.connect_attempts.map_or(usize::MAX, |n| n.get()) {
                break format!("{failed} connect attempts failed");
            }
            let pick = match ctx.balancer.pick(peer.ip(), tried).await {
                Ok(Ok(pick)) => pick,
                Ok(Err(none)) => break none.to_string(),
                Err(_) => return Err(SessionEnd::RelayStopped),
            };
            let started = std::time::Instant::now();
            let e = match dial(pick).await {
                Ok(upstream) => {
                    // A UDP socket proves nothing: a flow counts as connected (and as a session
                    // of its backend) once the backend answers, and as failed on its ICMP error
                    // or silence, where the balancer hears of it too (see `udp`).
                    if proves {
                        let (egress, took) = (ctx.egress_name(&pick), Ok(started.elapsed()));
                        (ctx.metrics).dialed(&ctx.route_name, pick.addr, &egress, took);
                        if pick.report_success {
                            let _ = ctx.balancer.connected(&pick, Ok(())).await;
                        }
                    }
                    return Ok((pick, upstream));
                }
                Err(DialError::Gone(_)) => return Err(SessionEnd::RelayStopped),
                Err(e) => e,
            };
            let fault = e.fault().unwrap_or(Fault::Backend);
            (ctx.metrics).dialed(&ctx.route_name, pick.addr, &ctx.egress_name(&pick), Err(fault));
            let _ = ctx.balancer.connected(&pick, Err((fault, e.to_string()))).await;
            if let Some(held) = ctx.dial_failures.admit() {
                log::warn!(route = &*ctx.route_name, session = id.0, client:% = peer, backend:% = pick.addr,
                    egress = &*ctx.egress_name(&pick), fault = fault.word(), err:% = e, held_back = held; "connect failed");
            }
            last = Some(e.to_string());
            match fault {
                Fault::Relay => {
                    ctx.budget.refresh();
                    break "the relay is short of resources".to_string();
                }
                Fault::Backend => tried.push(Tried {
                    backend: pick.backend,
                    egress: None,
                }),
                Fault::Egress | Fault::Path => tried.push(Tried {
                    backend: pick.backend,
                    egress: Some(pick.egress),
                }),
            }
        };
        ctx.stats.refused_no_backend();
        let mut backends: Vec<BackendId> = tried.iter().map(|t| t.backend).collect();
        backends.sort_unstable_by_key(|b| b.0);
        backends.dedup();
        let why = match last {
            Some(last) => format!("{why}; the last failure: {last}"),
            None => why,
        };
        Err(SessionEnd::NoBackend {
            tried: backends.len(),
            why,
        })
    }
}
