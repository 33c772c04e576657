//! Active health checks: every backend of a route, each `interval`, by the Dialer (so a check
//! leaves by the same egress as the traffic), each verdict told to the route's Balancer. A task
//! that holds no balancing state.

use std::sync::Arc;

use futures::io::{AsyncReadExt, AsyncWriteExt};

use crate::balancer::{BalancerHandle, Pick};
use crate::config::Check;
use crate::dialer::DialerHandle;
use crate::error::Fault;
use crate::rt;
use crate::shutdown::Signal;

/// Most bytes of a check's answer read while looking for `expect`.
const EXPECT_WINDOW: usize = 4096;

/// Checks every backend each `check.interval` until `stop`, by the Dialer, so that a check
/// leaves by the same egress as the traffic.
pub(crate) async fn run(route: Arc<str>, check: Check, balancer: BalancerHandle, dialer: DialerHandle, stop: Signal) {
    loop {
        let Ok(targets) = balancer.targets().await else { break };
        for target in targets {
            let (check, balancer, dialer) = (check.clone(), balancer.clone(), dialer.clone());
            rt::detach(async move {
                if let Some(verdict) = probe(&check, &dialer, target).await {
                    let _ = balancer.checked(&target, verdict).await;
                }
            });
        }
        if stop.unless(rt::sleep(check.interval)).await.is_none() {
            break;
        }
    }
    log::debug!(route = &*route; "health checks stopped");
}

/// One check: `Some(Ok)` passed, `Some(Err(why))` failed, or `None` when it says nothing of
/// the backend (the egress or the path was at fault, or the relay is stopping).
async fn probe(check: &Check, dialer: &DialerHandle, target: Pick) -> Option<Result<(), String>> {
    let verdict = rt::timeout(check.timeout, async {
        let mut conn = match dialer.tcp(target.addr, target.egress, check.timeout).await {
            Ok(conn) => conn,
            Err(e) if e.fault() != Some(Fault::Backend) => return None,
            Err(e) => return Some(Err(e.to_string())),
        };
        let send = [check.preface.as_slice(), check.send.as_deref().unwrap_or_default()].concat();
        if !send.is_empty() {
            if let Err(e) = conn.write_all(&send).await {
                return Some(Err(format!("sending the check: {e}")));
            }
        }
        let Some(expect) = &check.expect else {
            return Some(Ok(()));
        };
        let mut seen = Vec::new();
        let mut buf = [0u8; 512];
        let mut ended = "the backend closed";
        while seen.len() < EXPECT_WINDOW {
            match conn.read(&mut buf).await {
                Ok(0) => break,
                Err(_) => {
                    ended = "reading failed";
                    break;
                }
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
            if seen.windows(expect.len()).any(|w| w == expect.as_slice()) {
                return Some(Ok(()));
            }
        }
        Some(Err(format!(
            "expected {:?}, got {:?} ({ended})",
            String::from_utf8_lossy(expect),
            String::from_utf8_lossy(&seen[..seen.len().min(64)])
        )))
    });
    let timed_out = || {
        Err(format!(
            "no verdict within {}",
            humantime::format_duration(check.timeout)
        ))
    };
    verdict.await.unwrap_or_else(|| Some(timed_out()))
}
