//! The stop sequence: stop accepting, drain live sessions, close what outlives the deadline.

use crate::harness;

use std::net::Shutdown;

use async_std::net::TcpStream;
use async_std::prelude::*;
use harness::backend::Backend;
use harness::{Harness, config, read_all, route, within};
use relayd::SessionEnd;

#[async_std::test]
async fn shutdown_waits_for_live_sessions_then_ends() {
    let sink = Backend::sink().await;
    let h = Harness::start(&format!(
        "(drain_timeout: \"1h\", routes: [{}])",
        route("r", &[sink.addr], "")
    ));
    let addr = h.addr("r");
    let mut client = h.connect("r").await;
    client.write_all(b"in flight").await.unwrap();
    // The session is live (it has dialed the backend) before the stop begins.
    sink.next_accept().await;
    assert_eq!(h.relay().stats().active(), 1);
    let finish = async {
        // Once the stop has begun, the session still completes its exchange.
        client.shutdown(Shutdown::Write).unwrap();
        let reply = read_all(&mut client).await;
        // And the listener is gone: new connections are refused.
        let refused = within(async {
            loop {
                match TcpStream::connect(addr).await {
                    Err(_) => break,
                    Ok(extra) => drop(extra),
                }
            }
        });
        refused.await;
        reply
    };
    // join polls the shutdown first, so the stop has begun before the client finishes.
    let (report, reply) = within(futures::future::join(h.shutdown(), finish)).await;
    assert_eq!(reply, b"got 9");
    assert_eq!((report.drained, report.forced), (1, 0));
}

#[async_std::test]
async fn sessions_outliving_the_drain_deadline_are_closed() {
    let silent = Backend::silent().await;
    let h = Harness::start(&format!(
        "(drain_timeout: \"200ms\", routes: [{}])",
        route("r", &[silent.addr], "")
    ));
    let mut s = h.inject("r");
    let (report, (eof, session)) = within(futures::future::join(h.shutdown(), async {
        (read_all(&mut s.client).await, within(s.session).await)
    }))
    .await;
    assert_eq!(eof, b"", "the forced session's client sees the close");
    assert!(matches!(session.end, SessionEnd::Forced), "{:?}", session.end);
    assert_eq!((report.drained, report.forced), (0, 1));
}

#[async_std::test]
async fn nothing_is_injected_into_an_unknown_or_udp_route() {
    let echo = Backend::echo().await;
    let h = Harness::start(&config(&[
        route("r", &[echo.addr], ""),
        route("u", &[echo.addr], "protocol: Udp"),
    ]));
    let peer = harness::SYNTHETIC_PEER.parse().unwrap();
    let (_, relay_side) = relayd::Conn::pair().unwrap();
    let err = h.relay().inject("nope", relay_side, peer).unwrap_err();
    assert_eq!(err.to_string(), "no route named \"nope\"");
    let (_, relay_side) = relayd::Conn::pair().unwrap();
    let err = h.relay().inject("u", relay_side, peer).unwrap_err();
    assert_eq!(
        err.to_string(),
        "route \"u\" relays UDP datagrams: inject takes byte streams"
    );
    assert_eq!(h.shutdown().await.forced, 0);
}
