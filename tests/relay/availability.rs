//! High availability through the relay: backends killed and restarted, failing fast, the
//! balancing strategies end to end, and backends given by name.

use crate::harness;

use std::collections::HashMap;
use std::net::SocketAddr;

use async_std::prelude::*;
use harness::backend::{Backend, refused_addr};
use harness::{Harness, config, read_all, route, within};
use relayd::{HealthState, SessionEnd};

/// `n` clients one after another; how many each backend answered, and how many clients failed.
async fn round(h: &Harness, n: usize) -> (HashMap<String, usize>, usize) {
    let (mut answered, mut failed) = (HashMap::new(), 0);
    for _ in 0..n {
        let mut client = h.connect("r").await;
        let answer = String::from_utf8(read_all(&mut client).await).unwrap();
        drop(client);
        match answer {
            name if name.is_empty() => failed += 1,
            name => *answered.entry(name).or_default() += 1,
        }
    }
    (answered, failed)
}

async fn state_of(h: &Harness, addr: SocketAddr) -> HealthState {
    let snapshot = h.relay().snapshot().await;
    snapshot[0]
        .backends
        .iter()
        .find(|b| b.addr == addr)
        .expect("a backend of the route")
        .state
}

#[async_std::test]
async fn a_killed_backend_is_taken_out_without_failing_clients_and_comes_back_after_rise_checks() {
    let mut backends = [
        Backend::greeter("a").await,
        Backend::greeter("b").await,
        Backend::greeter("c").await,
    ];
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    let health = r#"health: (fall: 2, cooldown: "1m", check: (interval: "50ms", timeout: "1s", rise: 2))"#;
    let h = Harness::start(&config(&[route("r", &addrs, health)]));
    let stats = h.relay().stats();

    let (answered, failed) = round(&h, 30).await;
    assert_eq!((answered.len(), failed), (3, 0), "{answered:?}");

    backends[1].kill().await;
    let changes = stats.health_changes();
    let (answered, failed) = round(&h, 30).await;
    assert_eq!(
        failed, 0,
        "every client failed over within its own connection: {answered:?}"
    );
    assert_eq!(answered.get("b"), None);
    // RouteContext and checks both notice; either way b is out after `fall` failures at most.
    within(stats.until(|s| s.health_changes() > changes)).await;
    assert_eq!(state_of(&h, addrs[1]).await, HealthState::Down);
    let b_failures = h.relay().snapshot().await[0].backends[1].connect_failures;
    assert!(
        b_failures <= 2,
        "no session went to b after it was out: {b_failures} failed dials"
    );
    let (answered, _) = round(&h, 10).await;
    assert_eq!(
        h.relay().snapshot().await[0].backends[1].connect_failures,
        b_failures,
        "{answered:?}"
    );

    backends[1].restart();
    let changes = stats.health_changes();
    within(stats.until(|s| s.health_changes() > changes)).await;
    assert_eq!(
        state_of(&h, addrs[1]).await,
        HealthState::Up,
        "two passed checks bring it back"
    );
    let (answered, failed) = round(&h, 30).await;
    // Its share again: a third of each worker's sessions, by that worker's own cursor (within
    // one of a third on each of the two).
    let b = answered.get("b").copied().unwrap_or(0);
    assert!((8..=12).contains(&b) && failed == 0, "{answered:?}");
    assert_eq!(h.shutdown().await.forced, 0);
}

#[async_std::test]
async fn with_every_backend_out_sessions_fail_fast_without_dialing() {
    let backends = [refused_addr(), refused_addr()];
    let h = Harness::start(&config(&[route(
        "r",
        &backends,
        r#"health: (fall: 1, cooldown: "1m")"#,
    )]));
    let first = within(h.inject("r").session).await;
    assert!(
        matches!(first.end, SessionEnd::NoBackend { tried: 2, .. }),
        "{:?}",
        first.end
    );
    // Both are out now: the next session is refused at once, and dials nothing.
    let second = within(h.inject("r").session).await;
    assert!(
        matches!(&second.end, SessionEnd::NoBackend { tried: 0, why } if why == "no healthy backend"),
        "{:?}",
        second.end
    );
    let snapshot = h.relay().snapshot().await;
    assert!(
        snapshot[0]
            .backends
            .iter()
            .all(|b| b.connect_failures == 1 && b.state == HealthState::Down)
    );
    assert_eq!(h.relay().stats().no_backend(), 2);
    assert_eq!(h.shutdown().await.forced, 0);
}

#[async_std::test]
async fn least_connections_sends_new_sessions_to_the_least_busy_backend() {
    let (a, b) = (Backend::echo().await, Backend::echo().await);
    // One worker: the order of one shard's counts (each worker's shard keeps its own).
    let h = Harness::start(
        &config(&[route("r", &[a.addr, b.addr], "balance: LeastConnections")]).replacen('(', "(workers: 1, ", 1),
    );
    let mut open = Vec::new();
    for _ in 0..3 {
        let mut s = h.inject("r");
        s.client.write_all(b"x").await.unwrap();
        let mut echoed = [0u8];
        within(s.client.read_exact(&mut echoed)).await.unwrap();
        open.push(s);
    }
    let active = |snapshot: &[relayd::RouteSnapshot]| snapshot[0].backends.iter().map(|b| b.active).collect::<Vec<_>>();
    assert_eq!(active(&h.relay().snapshot().await), [2, 1]);
    // Close both sessions on a: it now has none, b has one, so the next two go to a.
    for s in [open.remove(2), open.remove(0)] {
        drop(s.client);
        within(s.session).await;
    }
    for _ in 0..2 {
        let s = h.inject("r");
        s.client.get_ref().shutdown(std::net::Shutdown::Write).unwrap();
        let mut done = s.client;
        read_all(&mut done).await;
        assert_eq!(within(s.session).await.backend, Some(a.addr));
    }
    drop(open);
    assert_eq!(h.shutdown().await.forced, 0);
}

#[async_std::test]
async fn source_hash_keeps_each_client_on_its_backend() {
    let backends = [
        Backend::greeter("a").await,
        Backend::greeter("b").await,
        Backend::greeter("c").await,
    ];
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    let h = Harness::start(&config(&[route("r", &addrs, "balance: SourceHash")]));
    let mut seen: HashMap<SocketAddr, Option<SocketAddr>> = HashMap::new();
    for round in 0..3u16 {
        for n in 1..=20u8 {
            let peer: SocketAddr = ([198, 51, 100, n], 40000 + round).into();
            let (mut client, relay_side) = relayd::Conn::pair().unwrap();
            let session = h.relay().inject("r", relay_side, peer).unwrap();
            read_all(&mut client).await;
            drop(client);
            let backend = within(session).await.backend;
            let ip_only: SocketAddr = (peer.ip(), 0).into();
            let first = *seen.entry(ip_only).or_insert(backend);
            assert_eq!(
                backend,
                first,
                "client {} moved (port {} this time)",
                peer.ip(),
                peer.port()
            );
        }
    }
    let used: std::collections::HashSet<_> = seen.values().collect();
    assert_eq!(used.len(), 3, "20 clients spread over all three backends");
    assert_eq!(h.shutdown().await.forced, 0);
}

#[async_std::test]
async fn weighted_round_robin_interleaves_by_weight_and_weight_zero_drains() {
    let (a, b, c) = (
        Backend::greeter("a").await,
        Backend::greeter("b").await,
        Backend::greeter("c").await,
    );
    let route = format!(
        r#"(name: "r", listen: "127.0.0.1:0", balance: WeightedRoundRobin, backends: [(addr: "{}", weight: 3), (addr: "{}"), (addr: "{}", weight: 0)])"#,
        a.addr, b.addr, c.addr
    );
    // One worker: the order of one shard's cursor (each worker's shard keeps its own).
    let h = Harness::start(&config(&[route]).replacen('(', "(workers: 1, ", 1));
    let mut order = String::new();
    for _ in 0..8 {
        let mut client = h.connect("r").await;
        order.push_str(&String::from_utf8(read_all(&mut client).await).unwrap());
        drop(client);
    }
    assert_eq!(order, "aabaaaba", "smooth 3:1, and c (weight 0) gets nothing");
    assert_eq!(c.accepted(), 0);
    assert_eq!(h.shutdown().await.forced, 0);
}

#[async_std::test]
async fn a_backend_given_by_name_is_resolved() {
    let web = Backend::greeter("by-name").await;
    let route = format!(
        r#"(name: "r", listen: "127.0.0.1:0", resolve_interval: "50ms", backends: [(addr: "localhost:{}")])"#,
        web.addr.port()
    );
    let h = Harness::start(&config(&[route]));
    let mut client = h.connect("r").await;
    assert_eq!(read_all(&mut client).await, b"by-name");
    drop(client);
    let snapshot = h.relay().snapshot().await;
    assert!(
        snapshot[0]
            .backends
            .iter()
            .all(|b| b.source == format!("localhost:{}", web.addr.port()))
    );
    assert!(snapshot[0].backends.iter().any(|b| b.addr == web.addr), "{snapshot:?}");
    assert_eq!(h.shutdown().await.forced, 0);
}

#[async_std::test]
async fn a_check_with_send_and_expect_takes_out_a_backend_that_answers_wrongly() {
    // The echo backend answers PING with PING; the greeter answers anything with its name.
    let (echo, wrong) = (Backend::echo().await, Backend::greeter("HELLO").await);
    let check =
        r#"health: (fall: 2, check: (interval: "50ms", timeout: "1s", rise: 1, send: "PING\r\n", expect: "PING"))"#;
    let h = Harness::start(&config(&[route("r", &[echo.addr, wrong.addr], check)]));
    within(h.relay().stats().until(|s| s.health_changes() >= 1)).await;
    assert_eq!(state_of(&h, wrong.addr).await, HealthState::Down);
    assert_eq!(state_of(&h, echo.addr).await, HealthState::Up);
    // RouteContext now only go to the backend that passes.
    for _ in 0..4 {
        let s = h.inject("r");
        drop(s.client);
        assert_eq!(within(s.session).await.backend, Some(echo.addr));
    }
    assert_eq!(h.shutdown().await.forced, 0);
}
