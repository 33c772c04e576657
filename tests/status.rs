//! The status page: counters, routes, egresses and backends, over plain HTTP.

mod harness;

use async_std::net::TcpStream;
use async_std::prelude::*;
use harness::backend::{Backend, refused_addr};
use harness::{Harness, read_all};

async fn fetch(addr: std::net::SocketAddr, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).await.expect("connect to the status page");
    stream.write_all(request).await.unwrap();
    String::from_utf8(read_all(&mut stream).await).unwrap()
}

#[async_std::test]
async fn the_status_page_shows_routes_backends_and_counters() {
    let live = Backend::greeter("live").await;
    let dead = refused_addr();
    let status = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let h = Harness::start(&format!(
        r#"(status: "{status}", routes: [(name: "web", listen: "127.0.0.1:0", backends: [(addr: "{dead}"), (addr: "{}")])])"#,
        live.addr
    ));
    let mut client = h.connect("web").await;
    assert_eq!(read_all(&mut client).await, b"live");
    drop(client);
    h.relay().stats().until(|s| s.active() == 0).await;
    let status = h.relay().status_addr().expect("the status page listens");

    let page = fetch(status, b"GET / HTTP/1.1\r\nHost: relayd\r\n\r\n").await;
    assert!(page.starts_with("HTTP/1.0 200 OK\r\n"), "{page}");
    for expected in [
        "sessions active=0 total=1 forced=0",
        "refused_no_backend=0",
        "tcp paths splice=0 copy=1",
        "route web listen=",
        "egress default up",
        &format!("backend {dead} ({dead}) Up weight=1 active=0 sessions=0 connect_failures=1"),
        &format!(
            "backend {} ({}) Up weight=1 active=0 sessions=1 connect_failures=0",
            live.addr, live.addr
        ),
    ] {
        assert!(page.contains(expected), "missing {expected:?} in\n{page}");
    }
    let post = fetch(status, b"POST / HTTP/1.1\r\nContent-Length: 0\r\n\r\n").await;
    assert!(post.starts_with("HTTP/1.0 405"), "{post}");
    assert_eq!(h.shutdown().await.forced, 0);
}
