//! UDP routes: flows per client, datagram boundaries, idle expiry, limits, failures, shutdown.
//! Clients are real sockets on loopback: a datagram's sender address is what makes a flow.

use crate::harness;

use std::collections::HashSet;
use std::time::Duration;

use async_std::task;
use harness::udp::{UdpBackend, client, round_trip, udp_sockets_on, unreachable_addr};
use harness::{Harness, config, route, within};
use rand::{Rng, SeedableRng};

fn udp(name: &str, backends: &[std::net::SocketAddr], extra: &str) -> String {
    route(name, backends, &format!("protocol: Udp, {extra}"))
}

#[async_std::test]
async fn two_hundred_clients_each_get_their_own_replies_in_order() {
    let backends = [
        UdpBackend::echo().await,
        UdpBackend::echo().await,
        UdpBackend::echo().await,
    ];
    let addrs: Vec<_> = backends.iter().map(|b| b.addr).collect();
    let h = Harness::start(&config(&[udp("dns", &addrs, "")]));
    let relay = h.addr("dns");
    let clients: Vec<_> = (0..200u32)
        .map(|id| {
            task::spawn(async move {
                let socket = client(relay).await;
                let mut rng = rand::rngs::SmallRng::seed_from_u64(id as u64);
                for seq in 0..50u32 {
                    let mut request = [id.to_be_bytes(), seq.to_be_bytes()].concat();
                    request.extend((0..rng.random_range(0..200)).map(|_| rng.random::<u8>()));
                    assert_eq!(
                        round_trip(&socket, &request).await,
                        request,
                        "client {id}, datagram {seq}"
                    );
                }
            })
        })
        .collect();
    for c in clients {
        within(c).await;
    }
    assert_eq!(h.relay().stats().total(), 200, "one flow per client");
    let flows: Vec<usize> = backends
        .iter()
        .map(|b| {
            b.drain()
                .into_iter()
                .map(|(peer, _)| peer)
                .collect::<HashSet<_>>()
                .len()
        })
        .collect();
    // Round robin on each worker's shard, each over the flows the kernel gave its socket:
    // within one of a third on each.
    assert_eq!(flows.iter().sum::<usize>(), 200);
    assert!(
        flows.iter().all(|n| (64..=69).contains(n)),
        "flows are spread round robin: {flows:?}"
    );
    assert_eq!(h.shutdown().await.forced, 0);
}

#[async_std::test]
async fn a_burst_of_replies_to_one_request_arrives_whole_and_in_order() {
    // 32 replies at once wait together in the flow's backend socket; every one must come out,
    // whichever way the flow learns that its socket has something to read.
    let burst = UdpBackend::burst(32).await;
    let h = Harness::start(&config(&[udp("u", &[burst.addr], "")]));
    let socket = client(h.addr("u")).await;
    let mut buf = vec![0u8; 65536];
    for request in 0..20u8 {
        socket.send(&[request]).await.unwrap();
        for i in 0..32u8 {
            let n = within(socket.recv(&mut buf)).await.expect("receive from the relay");
            assert_eq!(&buf[..n], [i, request], "request {request}, reply {i}");
        }
    }
    assert_eq!(h.relay().stats().total(), 1, "one flow");
    assert_eq!(h.shutdown().await.forced, 0);
}

#[async_std::test]
async fn datagrams_of_every_size_pass_whole() {
    let echo = UdpBackend::echo().await;
    let h = Harness::start(&config(&[udp("u", &[echo.addr], "")]));
    let socket = client(h.addr("u")).await;
    let mut rng = rand::rngs::SmallRng::seed_from_u64(7);
    for size in [1, 1472, 1500, 9000, 65507] {
        let datagram: Vec<u8> = (0..size).map(|_| rng.random()).collect();
        let back = round_trip(&socket, &datagram).await;
        assert_eq!(back.len(), size);
        assert!(back == datagram, "a {size}-byte datagram came back changed");
    }
    assert_eq!(h.shutdown().await.forced, 0);
}

#[async_std::test]
async fn a_one_way_stream_keeps_one_flow() {
    let sink = UdpBackend::sink().await;
    let h = Harness::start(&config(&[udp("syslog", &[sink.addr], r#"idle_timeout: "400ms""#)]));
    let socket = client(h.addr("syslog")).await;
    let mut sources = HashSet::new();
    // Ten datagrams 100 ms apart: a second in all, never 400 ms without traffic.
    for i in 0..10u8 {
        socket.send(&[i]).await.unwrap();
        let (source, bytes) = sink.next().await;
        assert_eq!(bytes, [i]);
        sources.insert(source);
        task::sleep(Duration::from_millis(100)).await; // allowed: pacing the stream, not waiting for an event
    }
    assert_eq!(sources.len(), 1, "one upstream socket for the whole stream");
    assert_eq!(h.relay().stats().total(), 1, "one flow");
    assert_eq!(h.shutdown().await.forced, 0);
}

#[async_std::test]
async fn an_idle_flow_is_freed_and_the_next_datagram_opens_a_new_one() {
    let echo = UdpBackend::echo().await;
    let h = Harness::start(&config(&[udp("u", &[echo.addr], r#"idle_timeout: "200ms""#)]));
    let socket = client(h.addr("u")).await;
    assert_eq!(round_trip(&socket, b"one").await, b"one");
    let stats = h.relay().stats();
    assert_eq!(stats.active(), 1);
    within(stats.until(|s| s.active() == 0)).await;
    assert_eq!(round_trip(&socket, b"two").await, b"two");
    assert_eq!((stats.total(), stats.active()), (2, 1));
    assert_eq!(h.shutdown().await.forced, 0);
}

#[async_std::test]
async fn a_datagram_beyond_max_flows_is_dropped_and_counted() {
    let echo = UdpBackend::echo().await;
    let h = Harness::start(&config(&[udp("u", &[echo.addr], "max_flows: 2")]));
    let (a, b, c) = (
        client(h.addr("u")).await,
        client(h.addr("u")).await,
        client(h.addr("u")).await,
    );
    assert_eq!(round_trip(&a, b"a").await, b"a");
    assert_eq!(round_trip(&b, b"b").await, b"b");
    c.send(b"c").await.unwrap();
    let stats = h.relay().stats();
    within(stats.until(|s| s.udp_over_limit() == 1)).await;
    assert_eq!(
        round_trip(&a, b"a again").await,
        b"a again",
        "the flows within the limit go on"
    );
    assert_eq!((stats.total(), stats.active()), (2, 2));
    assert_eq!(h.shutdown().await.forced, 0);
}

#[async_std::test]
async fn each_worker_listens_on_its_own_socket_and_max_flows_holds_across_them() {
    let echo = UdpBackend::echo().await;
    let text = config(&[udp("u", &[echo.addr], "max_flows: 3")]).replacen('(', "(workers: 2, ", 1);
    let h = Harness::start(&text);
    let relay = h.addr("u");
    assert_eq!(
        udp_sockets_on(relay.port()),
        2,
        "one socket for each of the two workers"
    );
    // Twelve clients, which the kernel shares between the two sockets by their address: the
    // two listeners admit three flows between them, no more.
    let clients: Vec<_> = futures::future::join_all((0..12).map(|_| client(relay))).await;
    for c in &clients {
        c.send(b"hello").await.unwrap();
    }
    let stats = h.relay().stats();
    within(stats.until(|s| s.udp_over_limit() == 9)).await;
    assert_eq!(
        (stats.total(), stats.active()),
        (3, 3),
        "max_flows counts every socket's flows"
    );
    assert_eq!(h.shutdown().await.forced, 0);
}

#[async_std::test]
async fn a_udp_address_someone_else_has_fails_the_start_with_its_name() {
    // SO_REUSEPORT lets the relay's own sockets share the address, never with a stranger:
    // neither a plain socket's nor another relay's.
    let stranger = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let taken = stranger.local_addr().unwrap();
    let start = |addr: std::net::SocketAddr| {
        let text = format!(
            r#"(workers: 2, routes: [(name: "dns", listen: "{addr}", protocol: Udp, backends: [(addr: "127.0.0.1:9")])])"#
        );
        relayd::Relay::start(&relayd::Config::parse(&text, "test").unwrap())
    };
    let err = start(taken).err().expect("the address is taken").to_string();
    assert!(err.contains("route dns") && err.contains(&taken.to_string()), "{err}");
    drop(stranger);

    let first = start(taken).expect("the address is free now");
    let err = start(taken).err().expect("the first relay has the address").to_string();
    assert!(err.contains("route dns") && err.contains(&taken.to_string()), "{err}");
    assert_eq!(
        udp_sockets_on(taken.port()),
        2,
        "the first relay's two sockets, no third"
    );
    drop(first);
}

#[async_std::test]
async fn a_flow_sent_to_a_dead_backend_fails_over_and_others_go_on() {
    let echo = UdpBackend::echo().await;
    let dead = unreachable_addr();
    // One worker: one shard's cursor sends the second flow to the second backend.
    let h = Harness::start(&config(&[udp("u", &[echo.addr, dead], "")]).replacen('(', "(workers: 1, ", 1));
    let (live, moved) = (client(h.addr("u")).await, client(h.addr("u")).await);
    assert_eq!(round_trip(&live, b"first").await, b"first");
    // Round robin sends the second flow to the dead port. Its ICMP error comes back before any
    // answer did, so the flow resends the datagram to the next backend: one send, one answer.
    assert_eq!(round_trip(&moved, b"to the dead one").await, b"to the dead one");
    assert_eq!(round_trip(&live, b"still here").await, b"still here");
    let snapshot = h.relay().snapshot().await;
    assert_eq!(snapshot[0].backends[1].connect_failures, 1, "{snapshot:?}");
    assert_eq!(
        snapshot[0].backends[0].active, 2,
        "both flows now live on the echo backend"
    );
    assert_eq!(h.relay().stats().total(), 2);
    assert_eq!(h.shutdown().await.forced, 0);
}

#[async_std::test]
async fn a_flow_whose_only_backend_is_dead_ends_without_harm() {
    let h = Harness::start(&config(&[udp("u", &[unreachable_addr()], "")]));
    let doomed = client(h.addr("u")).await;
    doomed.send(b"anyone?").await.unwrap();
    let stats = h.relay().stats();
    within(stats.until(|s| s.total() == 1 && s.active() == 0)).await;
    // The listener is still there: the next datagram opens a new flow.
    doomed.send(b"again").await.unwrap();
    within(stats.until(|s| s.total() == 2 && s.active() == 0)).await;
    assert_eq!(h.shutdown().await.forced, 0);
}

#[async_std::test]
async fn a_wildcard_route_answers_from_the_address_the_client_wrote_to() {
    let echo = UdpBackend::echo().await;
    let h = Harness::start(&format!(
        r#"(routes: [(name: "u", listen: "0.0.0.0:0", protocol: Udp, backends: [(addr: "{}")])])"#,
        echo.addr
    ));
    let port = h.addr("u").port();
    // The client only hears 127.0.0.2; a reply from the host's other address would be lost.
    let socket = client(([127, 0, 0, 2], port).into()).await;
    assert_eq!(round_trip(&socket, b"hello").await, b"hello");
    assert_eq!(h.shutdown().await.forced, 0);
}

#[async_std::test]
async fn shutdown_ends_every_flow_without_forcing() {
    let echo = UdpBackend::echo().await;
    let h = Harness::start(&config(&[udp("u", &[echo.addr], r#"idle_timeout: "1h""#)]));
    let sockets = [client(h.addr("u")).await, client(h.addr("u")).await];
    for s in &sockets {
        assert_eq!(round_trip(s, b"hi").await, b"hi");
    }
    let report = h.shutdown().await;
    assert_eq!((report.drained, report.forced), (2, 0));
}

/// Fresh flows (one new client socket each) through route `u`, every one answered.
async fn flows(h: &Harness, n: usize) {
    for i in 0..n {
        let c = client(h.addr("u")).await;
        let msg = format!("flow {i}");
        assert_eq!(round_trip(&c, msg.as_bytes()).await, msg.as_bytes());
    }
}

#[async_std::test]
async fn a_dead_udp_backend_is_ejected_after_fall_failures_and_stays_out() {
    let echo = UdpBackend::echo().await;
    let dead = unreachable_addr();
    let extra = r#"health: (fall: 2, cooldown: "1m")"#;
    let h = Harness::start(&config(&[udp("u", &[dead, echo.addr], extra)]));
    // Round robin offers the dead port every other flow until it is out; each of those flows
    // fails over to the echo backend within the same datagram.
    flows(&h, 4).await;
    let state = |s: &[relayd::RouteSnapshot]| s[0].backends[0].clone();
    let before = state(&h.relay().snapshot().await);
    assert_eq!(before.state, relayd::HealthState::Down, "{before:?}");
    assert_eq!(before.connect_failures, 2);
    // Out for its cool-down: no new flow goes near it, so no datagram waits on it.
    flows(&h, 6).await;
    let after = state(&h.relay().snapshot().await);
    assert_eq!(
        (after.state, after.connect_failures),
        (relayd::HealthState::Down, 2),
        "{after:?}"
    );
    assert_eq!(h.shutdown().await.forced, 0);
}

#[async_std::test]
async fn a_silent_udp_backend_counts_as_failed_once_the_reply_timeout_passes() {
    let (sink, echo) = (UdpBackend::sink().await, UdpBackend::echo().await);
    let extra = r#"health: (fall: 1, cooldown: "1m", reply_timeout: "200ms")"#;
    let h = Harness::start(&config(&[udp("u", &[sink.addr, echo.addr], extra)]));
    let c = client(h.addr("u")).await;
    // The sink takes the datagram and says nothing; after the reply timeout the flow sends
    // it on to the next backend, which answers.
    assert_eq!(round_trip(&c, b"hello?").await, b"hello?");
    assert_eq!(sink.next().await.1, b"hello?");
    let snapshot = h.relay().snapshot().await;
    assert_eq!(snapshot[0].backends[0].state, relayd::HealthState::Down, "{snapshot:?}");
    // A backend that answers is proven: a success of its own, not a socket's creation.
    assert_eq!(snapshot[0].backends[1].state, relayd::HealthState::Up);
    flows(&h, 3).await;
    assert!(sink.drain().is_empty(), "the ejected backend gets no new flow");
    assert_eq!(h.shutdown().await.forced, 0);
}
