//! Edge policies that compose: a route's allow/deny lists and caps follow a connection when an
//! `sni` route hands it on or a PROXY header names its client, a handed-on session opens and
//! ends under one route in the metrics, refused CONNECTs cannot flood the log, and the status
//! page is for loopback unless the file says otherwise.

use crate::harness;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};

use futures::AsyncWriteExt;
use harness::daemon::{Daemon, field, get};
use harness::{Harness, PATIENCE, client_hello, within};
use relayd::SessionEnd;

/// The value of the metric line that starts with `series` (0 when there is none).
fn metric(page: &str, series: &str) -> i64 {
    (page.lines())
        .find_map(|l| l.strip_prefix(series)?.trim().parse::<f64>().ok())
        .map_or(0, |v| v as i64)
}

#[async_std::test]
async fn an_sni_hand_off_is_judged_by_the_target_routes_lists_and_counted_under_one_route() {
    let (open, private) = (
        TcpListener::bind("127.0.0.1:0").unwrap(),
        TcpListener::bind("127.0.0.1:0").unwrap(),
    );
    private.set_nonblocking(true).unwrap();
    let h = Harness::start(&format!(
        r#"(status: "127.0.0.1:0", routes: [
            (name: "open", listen: "127.0.0.1:0", backends: [(addr: "{}")]),
            (name: "priv", listen: "127.0.0.1:0", deny_clients: ["{}/32"], backends: [(addr: "{}")]),
            (name: "tls", listen: "127.0.0.1:0", sni: (timeout: "2s", routes: [
                (names: ["open.example"], route: "open"), (names: ["priv.example"], route: "priv"),
            ])),
        ])"#,
        open.local_addr().unwrap(),
        harness::SYNTHETIC_PEER.split(':').next().unwrap(),
        private.local_addr().unwrap()
    ));
    // Named to the sni route, a client priv's lists refuse is refused as priv would.
    let mut refused = h.inject("tls");
    refused.client.write_all(&client_hello("priv.example")).await.unwrap();
    let report = within(refused.session).await;
    assert!(matches!(report.end, SessionEnd::ClientRefused), "{:?}", report.end);
    assert_eq!(
        &*report.route, "priv",
        "judged, and reported, by the route that was to serve it"
    );
    assert!(private.accept().is_err(), "priv's backend never heard of it");
    // The same client, to a route that lets it in: served.
    let mut served = h.inject("tls");
    served.client.write_all(&client_hello("open.example")).await.unwrap();
    served.client.close().await.unwrap();
    let (mut backend, _) = open.accept().unwrap();
    backend.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut got = Vec::new();
    backend.read_to_end(&mut got).unwrap();
    assert_eq!(got, client_hello("open.example"));
    drop(backend);
    let report = within(served.session).await;
    assert!(matches!(report.end, SessionEnd::Done), "{:?}", report.end);
    // Each route's sessions open and end under its name: nothing live is left anywhere.
    let page = get(h.relay().status_addr().unwrap(), "/metrics");
    for route in ["tls", "open", "priv"] {
        let active = format!("relayd_sessions_active{{route=\"{route}\"}}");
        assert_eq!(metric(&page, &active), 0, "{active} in\n{page}");
    }
    assert_eq!(
        metric(&page, r#"relayd_sessions_ended_total{route="tls",reason="handed_on"}"#),
        2
    );
    assert_eq!(
        metric(
            &page,
            r#"relayd_sessions_ended_total{route="priv",reason="client_refused"}"#
        ),
        1
    );
    assert_eq!(metric(&page, r#"relayd_sessions_opened_total{route="open"}"#), 1);
    assert_eq!(within(h.shutdown()).await.forced, 0);
}

#[async_std::test]
async fn max_connections_on_an_sni_route_caps_its_connections_from_their_first_byte() {
    let backend = TcpListener::bind("127.0.0.1:0").unwrap();
    let h = Harness::start(&format!(
        r#"(routes: [
            (name: "a", listen: "127.0.0.1:0", backends: [(addr: "{}")]),
            (name: "tls", listen: "127.0.0.1:0", max_connections: 1, queue_timeout: "100ms",
                sni: (timeout: "10s", default: "a")),
        ])"#,
        backend.local_addr().unwrap()
    ));
    // Two connections that send nothing: whichever has the route's one place holds it while
    // it waits for its hello, so the other waits its queue_timeout in line and is closed,
    // long before the hello's timeout ends either.
    let (first, second) = (h.inject("tls"), h.inject("tls"));
    let over = futures::future::select(first.session, second.session);
    let (report, _waiting) = match within(over).await {
        futures::future::Either::Left((report, other)) => (report, other),
        futures::future::Either::Right((report, other)) => (report, other),
    };
    assert!(matches!(report.end, SessionEnd::QueueTimeout), "{:?}", report.end);
    drop((first.client, second.client));
    assert_eq!(within(h.shutdown()).await.forced, 0);
}

#[test]
fn behind_a_proxy_the_lists_judge_the_client_its_header_names() {
    let backend = TcpListener::bind("127.0.0.1:0").unwrap();
    let h = Harness::start(&format!(
        r#"(routes: [(name: "t", listen: "127.0.0.1:0", deny_clients: ["198.51.100.0/24"],
            accept_proxy: (trusted: ["127.0.0.1/32"], timeout: "2s"), backends: [(addr: "{}")])])"#,
        backend.local_addr().unwrap()
    ));
    let relay = h.addr("t");
    let through = |client: &str, payload: &[u8]| {
        let mut proxy = TcpStream::connect(relay).unwrap();
        proxy.set_read_timeout(Some(PATIENCE)).unwrap();
        let header = relayd::proto::proxy_header(relayd::proto::ProxyVersion::V2, client.parse().unwrap(), relay);
        proxy.write_all(&[header, payload.to_vec()].concat()).unwrap();
        proxy.shutdown(std::net::Shutdown::Write).unwrap();
        proxy
    };
    // The proxy (127.0.0.1) is trusted and not denied; the client it names is denied.
    let mut denied = through("198.51.100.7:1000", b"denied");
    assert_eq!(denied.read(&mut [0u8; 8]).unwrap_or(0), 0, "closed");
    // One it names that the lists allow is served.
    let allowed = through("203.0.113.9:1000", b"allowed");
    let (mut upstream, _) = backend.accept().unwrap();
    upstream.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut got = Vec::new();
    upstream.read_to_end(&mut got).unwrap();
    assert_eq!(
        got, b"allowed",
        "the first dial is the allowed client's: the denied one got none"
    );
    drop((upstream, denied, allowed));
    let stats = h.relay().stats();
    async_std::task::block_on(within(stats.until(|s| s.active() == 0)));
    assert_eq!(async_std::task::block_on(h.shutdown()).forced, 0);
}

#[test]
fn refused_connects_are_logged_at_most_once_a_second_with_what_was_held_back() {
    let daemon = Daemon::spawn(
        &[],
        r#"(routes: [(name: "c", listen: "127.0.0.1:0", protocol: HttpConnect,
            connect: (allow_ports: [443], allow_cidrs: ["198.18.0.0/15"]))])"#,
    );
    let proxy = daemon.listening("c");
    let started = std::time::Instant::now();
    const REFUSALS: usize = 200;
    for _ in 0..REFUSALS {
        let mut c = TcpStream::connect(proxy).unwrap();
        c.set_read_timeout(Some(PATIENCE)).unwrap();
        c.write_all(b"CONNECT 198.18.0.1:22 HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut answer = String::new();
        let _ = c.read_to_string(&mut answer);
        assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
    }
    let seconds = started.elapsed().as_secs() as usize;
    let lines = daemon.stop();
    let refused: Vec<&String> = (lines.iter())
        .filter(|l| field(l, "end") == Some("refused") || l.contains("connect refused"))
        .collect();
    assert!(
        refused.len() <= seconds + 2,
        "{} refusal lines for {REFUSALS} refusals in {seconds} s",
        refused.len()
    );
    let why = field(refused[0], "why").unwrap_or_default();
    assert!(why.contains("status 403") && why.contains("198.18.0.1:22"), "{why}");
}

#[test]
fn the_status_listener_serves_at_most_64_clients_at_once() {
    let h = Harness::start(
        r#"(status: "127.0.0.1:0", routes: [(name: "r", listen: "127.0.0.1:0", backends: [(addr: "127.0.0.1:1")])])"#,
    );
    let status = h.relay().status_addr().unwrap();
    // 64 clients that connect and say nothing hold every place (until their head timeout),
    let silent: Vec<TcpStream> = (0..64).map(|_| TcpStream::connect(status).unwrap()).collect();
    // so the next is closed without an answer,
    let mut over = TcpStream::connect(status).unwrap();
    over.set_read_timeout(Some(PATIENCE)).unwrap();
    over.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    let mut answer = String::new();
    let _ = over.read_to_string(&mut answer);
    assert_eq!(answer, "", "no page past the cap");
    // and once they are gone, a client is served again.
    drop(silent);
    let started = std::time::Instant::now();
    loop {
        let page = get(status, "/");
        if page.starts_with("relayd") {
            break;
        }
        // The 64 places come back as the relay sees each silent client go.
        assert!(started.elapsed() < PATIENCE, "no page once the silent clients left");
        std::thread::yield_now();
    }
    assert_eq!(async_std::task::block_on(h.shutdown()).forced, 0);
}

/// A TCP client of `relay` from `from` (a loopback address of its own).
fn connect_from(from: &str, relay: SocketAddr) -> TcpStream {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket
        .bind(&format!("{from}:0").parse::<SocketAddr>().unwrap().into())
        .unwrap();
    socket.connect(&relay.into()).unwrap();
    let stream = TcpStream::from(socket);
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    stream
}

#[test]
fn one_client_holding_half_sent_heads_cannot_take_every_place() {
    let daemon = Daemon::spawn(
        &[],
        r#"(routes: [(name: "c", listen: "127.0.0.1:0", protocol: HttpConnect, per_client: (max_connections: 4),
            connect: (allow_ports: [443], allow_cidrs: ["198.18.0.0/15"]))])"#,
    );
    let proxy = daemon.listening("c");
    // Five half-sent heads from one address: four hold its four places (which four is the
    // workers' order), and the fifth is closed at once, its session line saying why.
    let mut held: Vec<TcpStream> = (0..5).map(|_| connect_from("127.0.0.1", proxy)).collect();
    for c in &mut held {
        c.write_all(b"CONNECT 198.18.0.1:443 HTTP/1.1\r\n").unwrap();
    }
    let line = daemon
        .wait_for(|l| field(l, "end") == Some("client_limited"))
        .expect("the refusal is logged");
    assert!(
        field(&line, "why").unwrap_or_default().contains("4 connections live"),
        "{line}"
    );
    // Its close (a reset: its head was left unread) went out before its line: exactly one of
    // the five has been ended.
    let ended = (held.iter_mut())
        .map(|c| {
            c.set_nonblocking(true).unwrap();
            match c.read(&mut [0u8; 64]) {
                Ok(0) => true,
                Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
                Ok(_) => false,
            }
        })
        .filter(|ended| *ended)
        .count();
    assert_eq!(ended, 1, "one closed, four still waiting with their heads");
    // while another address is not held up by them: its request is answered (403 here).
    let mut other = connect_from("127.0.0.2", proxy);
    other.write_all(b"CONNECT 198.18.0.1:22 HTTP/1.1\r\n\r\n").unwrap();
    let mut answer = String::new();
    let _ = other.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
    drop(held);
    daemon.stop();
}

#[async_std::test]
async fn a_client_over_its_connection_rate_is_refused_and_others_are_not() {
    // A backend that closes each connection at once, so that a served session ends.
    let backend = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = backend.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in backend.incoming().take(8) {
            drop(stream);
        }
    });
    let h = Harness::start(&format!(
        r#"(routes: [(name: "r", listen: "127.0.0.1:0", per_client: (per_second: 1, burst: 3), backends: [(addr: "{addr}")])])"#
    ));
    let session = |peer: &str| {
        let (client, relay_side) = relayd::Conn::pair().unwrap();
        let session = h.relay().inject("r", relay_side, peer.parse().unwrap()).unwrap();
        (client, session)
    };
    // Four at once: three (the burst) are taken, whichever the workers start first, and the
    // fourth within the second is not.
    let four: Vec<_> = (0..4).map(|i| session(&format!("192.0.2.7:{}", 1000 + i))).collect();
    let mut limited = 0;
    for (client, session) in four {
        drop(client);
        let report = within(session).await;
        if matches!(
            report.end,
            SessionEnd::ClientLimited(relayd::limits::OverLimit::Rate(1))
        ) {
            limited += 1;
        }
    }
    assert_eq!(limited, 1, "one over the burst");
    // Another client has a bucket of its own.
    let (_client, other) = session("192.0.2.8:1000");
    drop(_client);
    let report = within(other).await;
    assert!(!matches!(report.end, SessionEnd::ClientLimited(_)), "{:?}", report.end);
    assert_eq!(within(h.shutdown()).await.forced, 0);
}

#[async_std::test]
async fn silent_clients_behind_a_proxy_route_cannot_hold_every_place_the_descriptors_allow() {
    let echo = harness::backend::Backend::echo().await;
    // 128 descriptors: a session cap of 48, half of it for sessions still reading a header.
    let daemon = Daemon::spawn(
        &["prlimit", "--nofile=128:128"],
        &format!(
            r#"(routes: [
                (name: "p", listen: "127.0.0.1:0", accept_proxy: (trusted: ["127.0.0.1/32"], timeout: "30s"),
                    backends: [(addr: "{0}")]),
                (name: "plain", listen: "127.0.0.1:0", backends: [(addr: "{0}")]),
            ])"#,
            echo.addr
        ),
    );
    let (proxied, plain) = (daemon.listening("p"), daemon.listening("plain"));
    // More silent connections than the whole session cap, on the route that waits for headers:
    let silent: Vec<TcpStream> = (0..60).map(|_| TcpStream::connect(proxied).unwrap()).collect();
    daemon
        .wait_for(|l| field(l, "end") == Some("preludes_full"))
        .expect("the ones past half the budget are closed, and logged");
    // the other route still has places: its client is served.
    let mut client = TcpStream::connect(plain).unwrap();
    client.set_read_timeout(Some(PATIENCE)).unwrap();
    client.write_all(b"still served").unwrap();
    client.shutdown(std::net::Shutdown::Write).unwrap();
    let mut got = Vec::new();
    client.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"still served");
    drop(silent);
    daemon.stop();
}

#[test]
fn a_status_request_with_a_head_too_large_is_answered_431() {
    let h = Harness::start(
        r#"(status: "127.0.0.1:0", routes: [(name: "r", listen: "127.0.0.1:0", backends: [(addr: "127.0.0.1:1")])])"#,
    );
    let mut s = TcpStream::connect(h.relay().status_addr().unwrap()).unwrap();
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    let head = format!("GET / HTTP/1.0\r\nX-Pad: {}\r\n\r\n", "p".repeat(10_000));
    s.write_all(head.as_bytes()).unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.0 431"), "{answer:?}");
    drop(s);
    assert_eq!(async_std::task::block_on(h.shutdown()).forced, 0);
}
