//! Who may use a route: `allow_clients` and `deny_clients`, checked at accept before any work,
//! for TCP connections and UDP flows alike. Clients come from two loopback addresses.

use crate::harness;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};

use harness::backend::Backend;
use harness::udp::UdpBackend;
use harness::{Harness, PATIENCE, within};

/// A TCP client from `from` through relayd at `to`: what it read before the close.
fn tcp_from(from: &str, to: SocketAddr) -> Vec<u8> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket
        .bind(&format!("{from}:0").parse::<SocketAddr>().unwrap().into())
        .unwrap();
    socket.connect(&to.into()).unwrap();
    let mut stream = TcpStream::from(socket);
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    let _ = stream.write_all(b"hi");
    let mut got = Vec::new();
    let _ = stream.read_to_end(&mut got);
    got
}

#[async_std::test]
async fn a_denied_client_is_closed_before_any_dial_and_an_allowed_one_is_served() {
    let greeter = Backend::greeter("served").await;
    let echo = UdpBackend::echo().await;
    let lists = r#"allow_clients: ["127.0.0.0/8"], deny_clients: ["127.0.0.2/32"]"#;
    let h = Harness::start(&format!(
        r#"(routes: [
            (name: "t", listen: "0.0.0.0:0", backends: [(addr: "{}")], {lists}),
            (name: "u", listen: "0.0.0.0:0", protocol: Udp, backends: [(addr: "{}")], {lists}),
        ])"#,
        greeter.addr, echo.addr
    ));
    let t = SocketAddr::from(([127, 0, 0, 1], h.addr("t").port()));
    assert_eq!(tcp_from("127.0.0.2", t), b"", "denied: closed");
    assert_eq!(greeter.accepted(), 0, "no dial for a denied client");
    assert_eq!(tcp_from("127.0.0.1", t), b"served");
    assert_eq!(greeter.accepted(), 1);

    let u = SocketAddr::from(([127, 0, 0, 1], h.addr("u").port()));
    let denied = UdpSocket::bind("127.0.0.2:0").unwrap();
    denied.send_to(b"let me in", u).unwrap();
    let allowed = UdpSocket::bind("127.0.0.1:0").unwrap();
    allowed.set_read_timeout(Some(PATIENCE)).unwrap();
    allowed.send_to(b"hello", u).unwrap();
    let mut buf = [0u8; 64];
    let (n, _) = allowed.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"hello");
    // The allowed datagram came after the denied one: had that one opened a flow, the echo
    // backend would have seen it first.
    assert_eq!(
        echo.next().await.1,
        b"hello",
        "the denied datagram never reached a backend"
    );
    assert_eq!(
        h.relay().stats().total(),
        2,
        "one TCP session and one flow, nothing for the denied"
    );
    assert_eq!(within(async { h.shutdown().await }).await.forced, 0);
}

#[async_std::test]
async fn past_max_connections_a_client_waits_in_line_then_is_served_or_closed() {
    let sink = Backend::sink().await;
    let h = Harness::start(&format!(
        r#"(routes: [(name: "t", listen: "127.0.0.1:0", max_connections: 2, queue_timeout: "300ms", backends: [(addr: "{}")])])"#,
        sink.addr
    ));
    let addr = h.addr("t");
    let held: Vec<TcpStream> = (0..2).map(|_| TcpStream::connect(addr).unwrap()).collect();
    for _ in 0..2 {
        sink.next_accept().await;
    }
    // The third waits its queue_timeout without a dial, then is closed.
    let started = std::time::Instant::now();
    let mut third = TcpStream::connect(addr).unwrap();
    third.set_read_timeout(Some(PATIENCE)).unwrap();
    assert_eq!(third.read(&mut [0u8; 8]).unwrap_or(0), 0, "closed after the wait");
    assert!(
        started.elapsed() >= std::time::Duration::from_millis(300),
        "it waited its queue_timeout"
    );
    assert_eq!(sink.accepted(), 2, "no dial for the one that waited in vain");
    // A fourth waits while a place frees up, and gets it.
    let fourth = TcpStream::connect(addr).unwrap();
    drop(held);
    within(sink.next_accept()).await;
    assert_eq!(sink.accepted(), 3);
    drop(fourth);
    assert_eq!(within(async { h.shutdown().await }).await.forced, 0);
}

#[async_std::test]
async fn the_relay_wide_cap_counts_udp_flows() {
    let echo = UdpBackend::echo().await;
    let h = Harness::start(&format!(
        r#"(max_connections: 1, routes: [(name: "u", listen: "127.0.0.1:0", protocol: Udp, backends: [(addr: "{}")])])"#,
        echo.addr
    ));
    let u = h.addr("u");
    let first = UdpSocket::bind("127.0.0.1:0").unwrap();
    first.set_read_timeout(Some(PATIENCE)).unwrap();
    first.send_to(b"one", u).unwrap();
    let mut buf = [0u8; 16];
    assert_eq!(first.recv(&mut buf).unwrap(), 3, "the first flow is served");
    let second = UdpSocket::bind("127.0.0.1:0").unwrap();
    second.send_to(b"two", u).unwrap();
    within(h.relay().stats().until(|s| s.udp_over_limit() == 1)).await;
    assert_eq!(
        h.relay().stats().total(),
        1,
        "no second flow while the first holds the place"
    );
    assert_eq!(within(async { h.shutdown().await }).await.forced, 0);
}

#[test]
fn a_backend_reads_one_proxy_header_with_the_real_addresses_before_the_payload() {
    for version in ["V1", "V2"] {
        let backend = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let h = Harness::start(&format!(
            r#"(routes: [(name: "t", listen: "127.0.0.1:0", send_proxy: {version}, backends: [(addr: "{}")])])"#,
            backend.local_addr().unwrap()
        ));
        let mut client = TcpStream::connect(h.addr("t")).unwrap();
        client.write_all(b"payload").unwrap();
        client.shutdown(std::net::Shutdown::Write).unwrap();
        let (mut upstream, _) = backend.accept().unwrap();
        upstream.set_read_timeout(Some(PATIENCE)).unwrap();
        let mut got = Vec::new();
        upstream.read_to_end(&mut got).unwrap();
        let (me, relay) = (client.local_addr().unwrap(), h.addr("t"));
        let header = match ppp::HeaderResult::parse(&got) {
            ppp::HeaderResult::V1(Ok(h)) => {
                assert_eq!(h.addresses, ppp::v1::Addresses::from((me, relay)));
                h.header.len()
            }
            ppp::HeaderResult::V2(Ok(h)) => {
                assert_eq!(h.addresses, ppp::v2::Addresses::from((me, relay)));
                h.len()
            }
            other => panic!("{version}: no valid header: {other:?}"),
        };
        assert_eq!(
            &got[header..],
            b"payload",
            "{version}: exactly one header, then the payload"
        );
        drop((client, upstream));
        assert_eq!(async_std::task::block_on(h.shutdown()).forced, 0);
    }
}

#[test]
fn a_trusted_proxys_header_names_the_client_and_nothing_else_gets_a_dial() {
    let backend = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    backend.set_nonblocking(true).unwrap();
    let h = Harness::start(&format!(
        r#"(routes: [(name: "t", listen: "0.0.0.0:0", send_proxy: V1,
            accept_proxy: (trusted: ["127.0.0.1/32"], timeout: "300ms"), backends: [(addr: "{}")])])"#,
        backend.local_addr().unwrap()
    ));
    let relay = SocketAddr::from(([127, 0, 0, 1], h.addr("t").port()));
    let closed = |mut s: TcpStream| {
        s.set_read_timeout(Some(PATIENCE)).unwrap();
        s.read(&mut [0u8; 8]).unwrap_or(0) == 0
    };
    // No header (just a request), a garbage header, and silence: each closed, no dial.
    let mut plain = TcpStream::connect(relay).unwrap();
    plain.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    assert!(closed(plain));
    let mut garbage = TcpStream::connect(relay).unwrap();
    garbage.write_all(b"PROXY TCP9 nonsense\r\n").unwrap();
    assert!(closed(garbage));
    assert!(
        closed(TcpStream::connect(relay).unwrap()),
        "silent past the header timeout"
    );
    // From an untrusted address: closed at accept.
    let untrusted = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    untrusted
        .bind(&"127.0.0.2:0".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    untrusted.connect(&relay.into()).unwrap();
    let mut untrusted = TcpStream::from(untrusted);
    let header = relayd::proto::proxy_header(
        relayd::proto::ProxyVersion::V2,
        "203.0.113.5:4444".parse().unwrap(),
        relay,
    );
    let _ = untrusted.write_all(&header);
    assert!(closed(untrusted));
    assert!(backend.accept().is_err(), "the backend saw no connection at all");

    // A trusted proxy's v2 header with payload in the same segment: the backend hears of the
    // client it names (in its own PROXY header) and gets the payload.
    backend.set_nonblocking(false).unwrap();
    let mut proxy = TcpStream::connect(relay).unwrap();
    let mut first = header.clone();
    first.extend_from_slice(b"payload");
    proxy.write_all(&first).unwrap();
    proxy.shutdown(std::net::Shutdown::Write).unwrap();
    let (mut upstream, _) = backend.accept().unwrap();
    upstream.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut got = Vec::new();
    upstream.read_to_end(&mut got).unwrap();
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("PROXY TCP4 203.0.113.5 127.0.0.1 4444 "), "{text}");
    assert!(text.ends_with("\r\npayload"), "{text}");
    drop((proxy, upstream));
    assert_eq!(async_std::task::block_on(h.shutdown()).forced, 0);
}

#[async_std::test]
async fn every_udp_datagram_carries_the_v2_header_naming_its_client() {
    let sink = UdpBackend::sink().await;
    let h = Harness::start(&format!(
        r#"(routes: [(name: "u", listen: "127.0.0.1:0", protocol: Udp, send_proxy: V2, backends: [(addr: "{}")])])"#,
        sink.addr
    ));
    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    for payload in [&b"first"[..], b"second"] {
        client.send_to(payload, h.addr("u")).unwrap();
        let (_, got) = sink.next().await;
        let header = ppp::v2::Header::try_from(got.as_slice()).expect("a v2 header in front");
        assert_eq!(
            header.addresses,
            ppp::v2::Addresses::from((client.local_addr().unwrap(), h.addr("u")))
        );
        assert_eq!(header.protocol, ppp::v2::Protocol::Datagram);
        assert_eq!(&got[header.len()..], payload, "the payload whole behind it");
    }
    assert_eq!(within(async { h.shutdown().await }).await.forced, 0);
}

#[test]
fn health_checks_send_a_local_header_where_the_backend_expects_one() {
    let backend = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let h = Harness::start(&format!(
        r#"(routes: [(name: "t", listen: "127.0.0.1:0", send_proxy: V2,
            health: (check: (interval: "50ms", timeout: "2s", send: "PING\r\n")), backends: [(addr: "{}")])])"#,
        backend.local_addr().unwrap()
    ));
    let (mut check, _) = backend.accept().unwrap();
    check.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut got = vec![0u8; 16];
    check.read_exact(&mut got).unwrap();
    let header = ppp::v2::Header::try_from(got.as_slice()).expect("a v2 header first");
    assert_eq!(
        header.command,
        ppp::v2::Command::Local,
        "a check has no client behind it"
    );
    let mut ping = [0u8; 6];
    check.read_exact(&mut ping).unwrap();
    assert_eq!(&ping, b"PING\r\n", "then the check's own bytes");
    drop(check);
    drop(backend);
    assert_eq!(async_std::task::block_on(h.shutdown()).forced, 0);
}
