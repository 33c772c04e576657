//! The TCP data path: bytes, half-close in both directions, idle and fin timeouts.

use crate::harness;

use std::net::Shutdown;
use std::time::Duration;

use async_std::prelude::*;
use harness::backend::Backend;
use harness::{Harness, close_write, config, read_all, route, within};
use relayd::SessionEnd;

#[async_std::test]
async fn an_injected_session_relays_both_ways_and_reports_its_bytes() {
    let echo = Backend::echo().await;
    let h = Harness::start(&config(&[route("r", &[echo.addr], "")]));
    let mut s = h.inject("r");
    s.client.write_all(b"hello relay").await.unwrap();
    close_write(&mut s.client).await;
    assert_eq!(read_all(&mut s.client).await, b"hello relay");
    let report = within(s.session).await;
    assert!(matches!(report.end, SessionEnd::Done), "{:?}", report.end);
    assert_eq!((report.bytes_up, report.bytes_down), (11, 11));
    assert_eq!(report.backend, Some(echo.addr));
    assert_eq!(report.egress.as_deref(), Some("default"));
    assert_eq!(h.shutdown().await.forced, 0);
}

#[async_std::test]
async fn a_client_fin_reaches_the_backend_and_the_reply_still_comes_back() {
    let sink = Backend::sink().await;
    let h = Harness::start(&config(&[route("r", &[sink.addr], "")]));
    let mut client = h.connect("r").await;
    client.write_all(b"request body").await.unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    // The backend only answers after it has seen our FIN through the relay.
    assert_eq!(read_all(&mut client).await, b"got 12");
    let got = sink.received().await;
    assert_eq!(got.bytes, b"request body");
    assert_eq!(
        got.peer.ip(),
        h.addr("r").ip(),
        "the backend sees the relay, not the client"
    );
    assert_eq!(h.shutdown().await.forced, 0);
}

#[async_std::test]
async fn a_backend_fin_reaches_the_client_and_the_client_can_still_send() {
    let backend = Backend::speaks_first("hello, then FIN").await;
    let h = Harness::start(&config(&[route("r", &[backend.addr], "")]));
    let mut s = h.inject("r");
    // EOF here means the backend's FIN was passed on while our direction is still open.
    assert_eq!(read_all(&mut s.client).await, b"hello, then FIN");
    s.client.write_all(b"late words").await.unwrap();
    close_write(&mut s.client).await;
    assert_eq!(backend.received().await.bytes, b"late words");
    let report = within(s.session).await;
    assert!(matches!(report.end, SessionEnd::Done), "{:?}", report.end);
    assert_eq!((report.bytes_up, report.bytes_down), (10, 15));
    assert_eq!(h.shutdown().await.forced, 0);
}

#[async_std::test]
async fn an_idle_pair_is_closed_after_the_idle_timeout() {
    let silent = Backend::silent().await;
    let h = Harness::start(&config(&[route("r", &[silent.addr], r#"idle_timeout: "150ms""#)]));
    let mut s = h.inject("r");
    assert_eq!(read_all(&mut s.client).await, b"", "the relay closes the silent pair");
    let report = within(s.session).await;
    assert!(matches!(report.end, SessionEnd::IdleTimeout), "{:?}", report.end);
    assert!(report.duration >= Duration::from_millis(150), "{:?}", report.duration);
    assert_eq!(h.shutdown().await.forced, 0);
}

#[async_std::test]
async fn traffic_in_either_direction_keeps_a_pair_alive() {
    let echo = Backend::echo().await;
    let h = Harness::start(&config(&[route("r", &[echo.addr], r#"idle_timeout: "400ms""#)]));
    let mut s = h.inject("r");
    // Ten bytes a tenth of a second apart: well over the idle timeout in all, never idle for it.
    for i in 0..10u8 {
        s.client.write_all(&[i]).await.unwrap();
        let mut echoed = [0u8];
        within(s.client.read_exact(&mut echoed)).await.unwrap();
        assert_eq!(echoed, [i]);
        async_std::task::sleep(Duration::from_millis(100)).await; // allowed: pacing the trickle, not waiting for an event
    }
    let report = within(s.session).await;
    assert!(matches!(report.end, SessionEnd::IdleTimeout), "{:?}", report.end);
    assert_eq!((report.bytes_up, report.bytes_down), (10, 10));
    assert!(report.duration >= Duration::from_millis(1000), "{:?}", report.duration);
    assert_eq!(h.shutdown().await.forced, 0);
}

#[async_std::test]
async fn a_half_closed_pair_is_reaped_after_the_fin_timeout() {
    let silent = Backend::silent().await;
    let extra = r#"idle_timeout: "1h", fin_timeout: "150ms""#;
    let h = Harness::start(&config(&[route("r", &[silent.addr], extra)]));
    let mut s = h.inject("r");
    s.client.write_all(b"bye").await.unwrap();
    close_write(&mut s.client).await;
    // The backend never answers nor closes: without the fin timeout this would last an hour.
    assert_eq!(read_all(&mut s.client).await, b"");
    let report = within(s.session).await;
    assert!(matches!(report.end, SessionEnd::FinTimeout), "{:?}", report.end);
    assert_eq!(report.bytes_up, 3);
    assert_eq!(h.shutdown().await.forced, 0);
}

#[async_std::test]
async fn a_backend_that_closes_at_once_ends_the_session_cleanly() {
    let closing = Backend::closing().await;
    let h = Harness::start(&config(&[route("r", &[closing.addr], "")]));
    let mut s = h.inject("r");
    assert_eq!(
        read_all(&mut s.client).await,
        b"",
        "the backend's FIN reaches the client"
    );
    // The client's own direction stays open until it closes too, as with any half-close.
    drop(s.client);
    let report = within(s.session).await;
    assert!(matches!(report.end, SessionEnd::Done), "{:?}", report.end);
    assert_eq!(closing.accepted(), 1);
    assert_eq!(h.shutdown().await.forced, 0);
}
