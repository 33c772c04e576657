//! The status page: counters, routes, egresses and backends, over plain HTTP.

use crate::harness;

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
        &format!("backend {dead} ({dead}) up weight=1 active=0 sessions=0 connect_failures=1"),
        &format!(
            "backend {} ({}) up weight=1 active=0 sessions=1 connect_failures=0",
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

/// `promtool check metrics` on a page: its complaints, or `None` when promtool is not
/// installed and this is not CI (which installs it: the check may not skip there).
fn promtool(page: &str) -> Option<String> {
    use std::io::Write;
    let child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(child) => child,
        Err(e) => {
            harness::skip("promtool is not runnable (apt-get install prometheus)", e);
            return None;
        }
    };
    child.stdin.take().unwrap().write_all(page.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let said = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    Some(if out.status.success() {
        said
    } else {
        format!("promtool failed: {said}")
    })
}

#[async_std::test]
async fn metrics_count_a_known_workload_and_promtool_finds_nothing_to_fix() {
    let live = Backend::echo().await;
    let dead = refused_addr();
    let udp = harness::udp::UdpBackend::echo().await;
    let h = Harness::start(&format!(
        r#"(status: "127.0.0.1:0", routes: [
            (name: "web", listen: "127.0.0.1:0", health: (fall: 1, cooldown: "1m"), backends: [(addr: "{dead}"), (addr: "{}")]),
            (name: "dns", listen: "127.0.0.1:0", protocol: Udp, idle_timeout: "100ms", backends: [(addr: "{}")]),
            (name: "p", listen: "127.0.0.1:0", protocol: HttpConnect)])"#,
        live.addr, udp.addr
    ));
    // Three sessions of 5 bytes each way; the first fails over from the dead backend.
    for _ in 0..3 {
        let mut client = h.connect("web").await;
        client.write_all(b"hello").await.unwrap();
        let mut echoed = [0u8; 5];
        client.read_exact(&mut echoed).await.unwrap();
    }
    // One UDP flow of two round trips, and one CONNECT to a loopback target (denied: 403).
    let socket = harness::udp::client(h.addr("dns")).await;
    for request in [&b"one"[..], b"two"] {
        assert_eq!(harness::udp::round_trip(&socket, request).await, request);
    }
    let mut proxy = h.connect("p").await;
    proxy
        .write_all(b"CONNECT 127.0.0.1:22 HTTP/1.1\r\nHost: 127.0.0.1:22\r\n\r\n")
        .await
        .unwrap();
    let answer = String::from_utf8(read_all(&mut proxy).await).unwrap();
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
    // The flow ends after 100 ms without datagrams; its datagrams are counted then.
    h.relay().stats().until(|s| s.active() == 0).await;
    let status = h.relay().status_addr().unwrap();
    let page = fetch(status, b"GET /metrics HTTP/1.1\r\nHost: relayd\r\n\r\n").await;
    assert!(page.contains("Content-Type: text/plain; version=0.0.4"), "{page}");
    let body = &page[page.find("\r\n\r\n").unwrap() + 4..];
    let (dead_b, live_b) = (
        format!(r#"route="web",backend="{dead}""#),
        format!(r#"route="web",backend="{}""#, live.addr),
    );
    let want = [
        (r#"relayd_sessions_opened_total{route="web"}"#.to_string(), 3.0),
        (r#"relayd_sessions_active{route="web"}"#.into(), 0.0),
        (r#"relayd_sessions_ended_total{route="web",reason="done"}"#.into(), 3.0),
        (r#"relayd_relayed_bytes_total{route="web",direction="up"}"#.into(), 15.0),
        (
            r#"relayd_relayed_bytes_total{route="web",direction="down"}"#.into(),
            15.0,
        ),
        (
            r#"relayd_egress_bytes_total{egress="default",direction="out"}"#.into(),
            21.0,
        ),
        (
            format!(r#"relayd_connect_attempts_total{{{dead_b},egress="default"}}"#),
            1.0,
        ),
        (
            format!(r#"relayd_connect_attempts_total{{{live_b},egress="default"}}"#),
            3.0,
        ),
        (
            format!(r#"relayd_connect_failures_total{{{dead_b},egress="default",fault="backend"}}"#),
            1.0,
        ),
        (format!("relayd_backend_sessions_total{{{live_b}}}"), 3.0),
        (format!("relayd_connect_duration_seconds_count{{{live_b}}}"), 3.0),
        (format!(r#"relayd_backend_state{{{dead_b},state="down"}}"#), 1.0),
        (format!(r#"relayd_backend_state{{{live_b},state="up"}}"#), 1.0),
        (format!(r#"relayd_backend_state{{{live_b},state="down"}}"#), 0.0),
        (format!(r#"relayd_backend_state{{{dead_b},state="up"}}"#), 0.0),
        (format!("relayd_backend_ejections_total{{{dead_b}}}"), 1.0),
        (format!("relayd_backend_ejections_total{{{live_b}}}"), 0.0),
        (format!(r#"relayd_backend_checks_total{{{live_b},result="fail"}}"#), 0.0),
        (format!("relayd_backend_active_sessions{{{live_b}}}"), 0.0),
        (r#"relayd_egress_up{route="web",egress="default"}"#.into(), 1.0),
        (r#"relayd_session_duration_seconds_count{route="web"}"#.into(), 3.0),
        (
            r#"relayd_sessions_ended_total{route="dns",reason="idle_timeout"}"#.into(),
            1.0,
        ),
        (r#"relayd_udp_datagrams_total{route="dns",direction="up"}"#.into(), 2.0),
        (
            r#"relayd_udp_datagrams_total{route="dns",direction="down"}"#.into(),
            2.0,
        ),
        (r#"relayd_relayed_bytes_total{route="dns",direction="up"}"#.into(), 6.0),
        (r#"relayd_connect_refusals_total{route="p",status="403"}"#.into(), 1.0),
        (r#"relayd_sessions_ended_total{route="p",reason="refused"}"#.into(), 1.0),
    ];
    for (name, value) in &want {
        assert_eq!(sample(body, name), Some(*value), "{name} in\n{body}");
    }
    let started = sample(body, "process_start_time_seconds").expect("the start time");
    assert!(started > 1.6e9, "seconds since the epoch: {started}");
    assert!(sample(body, "process_open_fds").is_some_and(|n| n > 0.0), "{body}");
    assert!(
        sample(body, "process_resident_memory_bytes").is_some_and(|n| n > 0.0),
        "{body}"
    );
    let build = body
        .lines()
        .find(|l| l.starts_with("relayd_build_info{"))
        .expect("build info");
    assert!(
        build.contains(r#"version=""#) && build.contains(r#"revision=""#),
        "{build}"
    );
    if let Some(said) = promtool(body) {
        assert!(
            !said.starts_with("promtool failed") && said.trim().is_empty(),
            "{said}\n{body}"
        );
    }

    // Prometheus asks for OpenMetrics and gets it: the same samples, typed, ending in # EOF.
    let accept = "Accept: application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5\r\n";
    let request = format!("GET /metrics HTTP/1.1\r\nHost: relayd\r\n{accept}\r\n");
    let page = fetch(status, request.as_bytes()).await;
    assert!(
        page.contains("Content-Type: application/openmetrics-text; version=1.0.0"),
        "{page}"
    );
    assert!(page.contains("# TYPE relayd_backend_ejections counter"), "{page}");
    assert_eq!(
        sample(&page, &format!("relayd_backend_ejections_total{{{dead_b}}}")),
        Some(1.0)
    );
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

/// A GET over a Unix socket.
fn get_unix(path: &std::path::Path, target: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::os::unix::net::UnixStream::connect(path).expect("connect to the status socket");
    stream.set_read_timeout(Some(harness::PATIENCE)).unwrap();
    write!(stream, "GET {target} HTTP/1.1\r\n\r\n").unwrap();
    let mut page = String::new();
    stream.read_to_string(&mut page).unwrap();
    page
}

#[async_std::test]
async fn the_status_page_serves_on_a_unix_socket_and_its_config_page_hides_secrets() {
    use std::os::unix::fs::PermissionsExt;
    let live = Backend::greeter("live").await;
    let path = std::env::temp_dir().join(format!("relayd-status-{}.sock", std::process::id()));
    // A stale socket file (its process gone) is replaced.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    let config = format!(
        r#"(status: "unix:{}", egress: {{"up": (via_proxy: "127.0.0.1:9", via_proxy_auth: (user: "u", password: "egress-secret"))}},
            routes: [(name: "web", listen: "127.0.0.1:0", backends: [(addr: "{}")]),
                     (name: "p", listen: "127.0.0.1:0", protocol: HttpConnect, connect: (auth: [(user: "alice", password: "s3cret")]))])"#,
        path.display(),
        live.addr
    );
    let h = Harness::start(&config);
    assert_eq!(h.relay().status_addr(), None, "no TCP status address");
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660, "owner and group may connect, no one else");

    let page = get_unix(&path, "/");
    assert!(
        page.starts_with("HTTP/1.0 200 OK") && page.contains("route web listen="),
        "{page}"
    );
    let running = get_unix(&path, "/config");
    assert!(running.starts_with("HTTP/1.0 200 OK"), "{running}");
    assert!(running.contains("alice") && running.contains("<hidden>"), "{running}");
    assert!(
        !running.contains("s3cret") && !running.contains("egress-secret"),
        "{running}"
    );
    // The page is the running config: it parses back to the same routes.
    let body = &running[running.find("\r\n\r\n").unwrap() + 4..];
    let parsed = relayd::config::Config::parse(body, "GET /config").expect("the page is RON");
    assert_eq!(parsed.routes.len(), 2);

    // A second relay on the same path is refused, naming it; the first serves on.
    let second = relayd::Relay::start(
        &relayd::config::Config::parse(&config.replace("[(name: \"web\"", "[(name: \"web2\""), "t").unwrap(),
    );
    let err = second.err().expect("the path is taken").to_string();
    assert!(
        err.contains("status page") && err.contains(&path.display().to_string()),
        "{err}"
    );
    assert!(get_unix(&path, "/").starts_with("HTTP/1.0 200 OK"));

    assert_eq!(h.shutdown().await.forced, 0);
    assert!(!path.exists(), "the socket file goes with the relay");
}

#[async_std::test]
async fn bytes_and_datagrams_are_counted_while_a_session_lives() {
    let echo = Backend::echo().await;
    let udp = harness::udp::UdpBackend::echo().await;
    let h = Harness::start(&format!(
        r#"(status: "127.0.0.1:0", routes: [(name: "web", listen: "127.0.0.1:0", backends: [(addr: "{}")]),
            (name: "dns", listen: "127.0.0.1:0", protocol: Udp, backends: [(addr: "{}")])])"#,
        echo.addr, udp.addr
    ));
    let status = h.relay().status_addr().unwrap();
    let mut live = h.connect("web").await;
    let socket = harness::udp::client(h.addr("dns")).await;
    let get = || fetch(status, b"GET /metrics HTTP/1.1\r\n\r\n");
    for round in 1..=3u32 {
        live.write_all(b"0123456789").await.unwrap();
        let mut echoed = [0u8; 10];
        harness::within(live.read_exact(&mut echoed)).await.unwrap();
        assert_eq!(harness::udp::round_trip(&socket, b"ping").await, b"ping");
        // Counted just after they are sent on: wait for the counts (bounded), not for a time.
        let (tcp, datagrams, out) = (f64::from(10 * round), f64::from(round), f64::from(14 * round));
        let want = [
            (r#"relayd_relayed_bytes_total{route="web",direction="up"}"#, tcp),
            (r#"relayd_relayed_bytes_total{route="web",direction="down"}"#, tcp),
            (r#"relayd_sessions_active{route="web"}"#, 1.0),
            (r#"relayd_udp_datagrams_total{route="dns",direction="up"}"#, datagrams),
            (r#"relayd_udp_datagrams_total{route="dns",direction="down"}"#, datagrams),
            (r#"relayd_egress_bytes_total{egress="default",direction="out"}"#, out),
        ];
        let began = std::time::Instant::now();
        loop {
            let page = get().await;
            if want.iter().all(|(name, value)| sample(&page, name) == Some(*value)) {
                break;
            }
            assert!(
                began.elapsed() < harness::PATIENCE,
                "round {round}: {want:?} in\n{page}"
            );
            async_std::task::yield_now().await;
        }
    }
    drop(live);
    assert_eq!(h.shutdown().await.forced, 0);
}

#[async_std::test]
async fn a_dead_udp_backend_is_a_connect_failure_in_the_metrics_as_on_the_status_page() {
    // A UDP port nobody listens on: the kernel answers each datagram with ICMP port unreachable.
    let dead = std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let live = harness::udp::UdpBackend::echo().await;
    let h = Harness::start(&format!(
        r#"(status: "127.0.0.1:0", routes: [
            (name: "u", listen: "127.0.0.1:0", protocol: Udp, health: (fall: 5), backends: [(addr: "{dead}")]),
            (name: "ok", listen: "127.0.0.1:0", protocol: Udp, idle_timeout: "100ms", backends: [(addr: "{}")]),
        ])"#,
        live.addr
    ));
    // Two flows to the dead backend, each failing on its ICMP error; one to the live one.
    for _ in 0..2 {
        let socket = harness::udp::client(h.addr("u")).await;
        socket.send(b"ping").await.unwrap();
    }
    let socket = harness::udp::client(h.addr("ok")).await;
    assert_eq!(harness::udp::round_trip(&socket, b"one").await, b"one");
    let stats = h.relay().stats();
    harness::within(stats.until(|s| s.active() == 0)).await;
    let status = h.relay().status_addr().unwrap();
    let page = fetch(status, b"GET / HTTP/1.1\r\n\r\n").await;
    assert!(
        page.contains(&format!(
            "backend {dead} ({dead}) up weight=1 active=0 sessions=0 connect_failures=2"
        )),
        "{page}"
    );
    let metrics = fetch(status, b"GET /metrics HTTP/1.1\r\n\r\n").await;
    let dead_b = format!(r#"route="u",backend="{dead}""#);
    let live_b = format!(r#"route="ok",backend="{}""#, live.addr);
    for (name, want) in [
        (
            format!(r#"relayd_connect_failures_total{{{dead_b},egress="default",fault="backend"}}"#),
            Some(2.0),
        ),
        (format!("relayd_backend_sessions_total{{{dead_b}}}"), None),
        (format!("relayd_backend_sessions_total{{{live_b}}}"), Some(1.0)),
        (format!("relayd_connect_duration_seconds_count{{{live_b}}}"), Some(1.0)),
    ] {
        assert_eq!(sample(&metrics, &name), want, "{name} in\n{metrics}");
    }
    assert_eq!(h.shutdown().await.forced, 0);
}
