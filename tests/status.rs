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

/// The value of the sample `name{labels}` in a metrics page (labels as printed, in order).
fn sample(page: &str, name_and_labels: &str) -> Option<f64> {
    page.lines()
        .find_map(|l| l.strip_prefix(name_and_labels)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

#[async_std::test]
async fn metrics_count_sessions_bytes_failovers_and_backend_state() {
    let live = Backend::echo().await;
    let dead = refused_addr();
    let h = Harness::start(&format!(
        r#"(status: "127.0.0.1:0", routes: [(name: "web", listen: "127.0.0.1:0", health: (fall: 1, cooldown: "1m"),
            backends: [(addr: "{dead}"), (addr: "{}")])])"#,
        live.addr
    ));
    // Three sessions of 5 bytes each way; the first also fails over from the dead backend.
    for _ in 0..3 {
        let mut client = h.connect("web").await;
        client.write_all(b"hello").await.unwrap();
        let mut echoed = [0u8; 5];
        client.read_exact(&mut echoed).await.unwrap();
        drop(client);
    }
    h.relay().stats().until(|s| s.active() == 0).await;
    let status = h.relay().status_addr().unwrap();
    let page = fetch(status, b"GET /metrics HTTP/1.1\r\nHost: relayd\r\n\r\n").await;
    assert!(page.contains("Content-Type: application/openmetrics-text"), "{page}");
    let (web, backend_dead, backend_live) = (
        r#"{route="web"}"#,
        format!(r#"{{route="web",backend="{dead}"}}"#),
        format!(r#"{{route="web",backend="{}"}}"#, live.addr),
    );
    let want = [
        (format!("relayd_sessions_opened_total{web}"), 3.0),
        (format!("relayd_sessions_active{web}"), 0.0),
        (
            r#"relayd_sessions_ended_total{route="web",reason="done"}"#.to_string(),
            3.0,
        ),
        (
            r#"relayd_relayed_bytes_total{route="web",direction="up"}"#.to_string(),
            15.0,
        ),
        (
            r#"relayd_relayed_bytes_total{route="web",direction="down"}"#.to_string(),
            15.0,
        ),
        (
            format!(
                r#"relayd_connect_failures_total{{route="web",backend="{dead}",egress="default",fault="backend"}}"#
            ),
            1.0,
        ),
        (format!("relayd_connect_duration_seconds_count{backend_live}"), 3.0),
        (
            format!(r#"relayd_backend_state{{route="web",backend="{dead}",state="down"}}"#),
            1.0,
        ),
        (
            format!(
                r#"relayd_backend_state{{route="web",backend="{}",state="up"}}"#,
                live.addr
            ),
            1.0,
        ),
        (format!("relayd_backend_connect_failures{backend_dead}"), 1.0),
        (r#"relayd_egress_up{route="web",egress="default"}"#.to_string(), 1.0),
        (format!("relayd_session_duration_seconds_count{web}"), 3.0),
    ];
    for (name, value) in want {
        assert_eq!(sample(&page, &name), Some(value), "{name} in\n{page}");
    }
    assert!(sample(&page, "relayd_open_fds").is_some_and(|n| n > 0.0), "{page}");
    assert!(
        page.trim_end().ends_with("# EOF"),
        "an OpenMetrics page ends with # EOF"
    );
    assert_eq!(h.shutdown().await.forced, 0);
}

/// A GET from `from` to `to`: the answer, or "" when the connection was closed or reset.
fn get_from(from: &str, to: std::net::SocketAddr) -> String {
    use std::io::{Read, Write};
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket
        .bind(&format!("{from}:0").parse::<std::net::SocketAddr>().unwrap().into())
        .unwrap();
    socket.connect(&to.into()).unwrap();
    let mut stream = std::net::TcpStream::from(socket);
    stream.set_read_timeout(Some(harness::PATIENCE)).unwrap();
    let _ = stream.write_all(b"GET / HTTP/1.1\r\n\r\n");
    let mut page = String::new();
    let _ = stream.read_to_string(&mut page);
    page
}

#[async_std::test]
async fn the_status_listener_answers_only_clients_in_status_allow() {
    let live = Backend::greeter("live").await;
    let h = Harness::start(&format!(
        r#"(status: "127.0.0.1:0", status_allow: ["127.0.0.2/32"], routes: [(name: "web", listen: "127.0.0.1:0", backends: [(addr: "{}")])])"#,
        live.addr
    ));
    let status = h.relay().status_addr().unwrap();
    assert_eq!(get_from("127.0.0.1", status), "", "127.0.0.1 is not allowed: no page");
    let page = get_from("127.0.0.2", status);
    assert!(page.starts_with("HTTP/1.0 200 OK"), "{page}");
    assert_eq!(h.shutdown().await.forced, 0);
}
