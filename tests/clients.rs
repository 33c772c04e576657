//! Who may use a route: `allow_clients` and `deny_clients`, checked at accept before any work,
//! for TCP connections and UDP flows alike. Clients come from two loopback addresses.

mod harness;

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
