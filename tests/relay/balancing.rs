//! Round robin and failover between backends.

use crate::harness;

use std::time::{Duration, Instant};

use harness::backend::{Backend, Blackhole, refused_addr};
use harness::{Harness, config, read_all, route, within};
use relayd::SessionEnd;

#[async_std::test]
async fn round_robin_visits_three_backends_in_turn() {
    let backends = [
        Backend::greeter("a").await,
        Backend::greeter("b").await,
        Backend::greeter("c").await,
    ];
    let addrs: Vec<_> = backends.iter().map(|b| b.addr).collect();
    // One worker: the order of one shard's cursor (each worker's shard keeps its own).
    let h = Harness::start(&config(&[route("r", &addrs, "")]).replacen('(', "(workers: 1, ", 1));
    let mut answers = Vec::new();
    for _ in 0..9 {
        let mut client = h.connect("r").await;
        answers.push(String::from_utf8(read_all(&mut client).await).unwrap());
    }
    assert_eq!(answers.join(""), "abcabcabc");
    let snapshot = h.relay().snapshot().await;
    let sessions: Vec<u64> = snapshot[0].backends.iter().map(|b| b.sessions).collect();
    assert_eq!(sessions, [3, 3, 3]);
    assert_eq!(h.shutdown().await.forced, 0);
}

#[async_std::test]
async fn a_refused_connect_fails_over_to_the_next_backend() {
    let live = Backend::greeter("live").await;
    let dead = refused_addr();
    let h = Harness::start(&config(&[route("r", &[dead, live.addr], "")]));
    for _ in 0..4 {
        let mut client = h.connect("r").await;
        assert_eq!(
            read_all(&mut client).await,
            b"live",
            "every client reaches the live backend"
        );
    }
    let snapshot = h.relay().snapshot().await;
    let dead_state = &snapshot[0].backends[0];
    assert_eq!((dead_state.addr, dead_state.sessions), (dead, 0));
    assert!(dead_state.connect_failures >= 2, "{dead_state:?}");
    assert_eq!(snapshot[0].backends[1].sessions, 4);
    assert_eq!(h.shutdown().await.forced, 0);
}

#[async_std::test]
async fn with_every_backend_down_the_client_is_closed_promptly() {
    let h = Harness::start(&config(&[route("r", &[refused_addr(), refused_addr()], "")]));
    let mut s = h.inject("r");
    let started = Instant::now();
    assert_eq!(read_all(&mut s.client).await, b"");
    let report = within(s.session).await;
    assert!(
        matches!(&report.end, SessionEnd::NoBackend { tried: 2, why } if why.starts_with("every backend tried; the last failure: ") && why.contains("Connection refused")),
        "{:?}",
        report.end
    );
    assert_eq!(report.backend, None);
    // Refusals are immediate: nothing waited for a connect timeout.
    assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
    assert_eq!(h.shutdown().await.forced, 0);
}

#[async_std::test]
async fn a_blackholed_backend_is_given_up_at_the_connect_timeout() {
    let hole = Blackhole::new();
    let live = Backend::greeter("live").await;
    let extra = r#"connect_timeout: "300ms""#;
    let h = Harness::start(&config(&[route("r", &[hole.addr, live.addr], extra)]));
    let mut s = h.inject("r");
    assert_eq!(read_all(&mut s.client).await, b"live");
    drop(s.client);
    let report = within(s.session).await;
    assert_eq!(report.backend, Some(live.addr));
    assert!(
        report.duration >= Duration::from_millis(300),
        "waited for the timeout: {:?}",
        report.duration
    );
    let snapshot = h.relay().snapshot().await;
    assert_eq!(snapshot[0].backends[0].connect_failures, 1);
    assert_eq!(h.shutdown().await.forced, 0);
}

#[async_std::test]
async fn connect_attempts_bound_the_backends_tried() {
    let live = Backend::greeter("live").await;
    let backends = [refused_addr(), refused_addr(), live.addr];
    let h = Harness::start(&config(&[route("r", &backends, "connect_attempts: 2")]));
    let mut s = h.inject("r");
    assert_eq!(read_all(&mut s.client).await, b"", "two refusals use up both attempts");
    let report = within(s.session).await;
    assert!(
        matches!(&report.end, SessionEnd::NoBackend { tried: 2, why } if why.starts_with("2 connect attempts failed")),
        "{:?}",
        report.end
    );
    assert_eq!(live.accepted(), 0);
    assert_eq!(h.shutdown().await.forced, 0);
}
