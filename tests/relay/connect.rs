//! HTTP CONNECT routes with real curl and raw clients, and TCP routes dialing through an
//! upstream CONNECT proxy (another relayd).

use crate::harness;

use std::net::SocketAddr;
use std::process::Command;

use async_std::net::TcpStream;
use async_std::prelude::*;
use async_std::task;
use harness::backend::{Backend, Blackhole, refused_addr};
use harness::{Harness, read_all, within};

/// A relay with one HttpConnect route `p` and the given `connect: (…)` section.
fn proxy(connect: &str) -> Harness {
    Harness::start(&format!(
        r#"(routes: [(name: "p", listen: "127.0.0.1:0", protocol: HttpConnect, connect_timeout: "300ms", connect: ({connect}))])"#
    ))
}

/// `connect: (…)` letting clients reach these loopback ports.
fn loopback(ports: &[u16], extra: &str) -> String {
    let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
    format!(
        r#"allow_ports: [{}], allow_cidrs: ["127.0.0.0/8", "::1/128"], {extra}"#,
        ports.join(", ")
    )
}

/// curl through `proxy` to `url` with CONNECT (-p): (exit code, body, stderr).
async fn curl(proxy: SocketAddr, url: &str, extra: &[&str]) -> (i32, String, String) {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "-p", "--max-time", "20", "-x", &format!("http://{proxy}")])
        .args(extra)
        .arg(url);
    let out = task::spawn_blocking(move || cmd.output().expect("run curl")).await;
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.code().unwrap_or(-1), text(&out.stdout), text(&out.stderr))
}

/// Sends `request` raw and returns everything the relay answers until it closes.
async fn raw(h: &Harness, request: &[u8]) -> String {
    let mut client = h.connect("p").await;
    client.write_all(request).await.unwrap();
    String::from_utf8_lossy(&read_all(&mut client).await).into_owned()
}

fn connect_to(target: &str) -> Vec<u8> {
    format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").into_bytes()
}

#[async_std::test]
async fn curl_reaches_an_allowed_backend_through_connect() {
    let web = Backend::http().await;
    let h = proxy(&loopback(&[web.addr.port()], ""));
    let (code, body, err) = curl(h.addr("p"), &format!("http://{}/hi", web.addr), &[]).await;
    assert_eq!((code, body.as_str()), (0, "hello from backend /hi"), "{err}");
    assert_eq!(h.shutdown().await.forced, 0);
}

#[async_std::test]
async fn proxy_authorization_is_required_and_checked() {
    let web = Backend::http().await;
    let h = proxy(&loopback(
        &[web.addr.port()],
        r#"auth: [(user: "alice", password: "s3cret")]"#,
    ));
    let url = format!("http://{}/private", web.addr);
    let (code, _, err) = curl(h.addr("p"), &url, &[]).await;
    assert!(code != 0 && err.contains("407"), "no credentials: {code} {err}");
    let (code, _, err) = curl(h.addr("p"), &url, &["--proxy-user", "alice:wrong"]).await;
    assert!(code != 0 && err.contains("407"), "wrong password: {code} {err}");
    let (code, body, err) = curl(h.addr("p"), &url, &["--proxy-user", "alice:s3cret"]).await;
    assert_eq!((code, body.as_str()), (0, "hello from backend /private"), "{err}");
    let answer = raw(&h, &connect_to(&web.addr.to_string())).await;
    assert!(
        answer.contains("Proxy-Authenticate: Basic realm=\"relayd\""),
        "{answer}"
    );
    assert_eq!(h.shutdown().await.forced, 0);
}

#[async_std::test]
async fn by_default_the_host_s_own_networks_and_other_ports_are_refused() {
    let web = Backend::http().await;
    // Default rules: port 443 only, and no loopback, private or link-local address.
    let h = proxy("");
    for target in [
        "127.0.0.1:443",
        "10.1.2.3:443",
        "192.168.1.1:443",
        "169.254.169.254:443",
        "[::1]:443",
        "localhost:443",
    ] {
        let answer = raw(&h, &connect_to(target)).await;
        assert!(answer.starts_with("HTTP/1.1 403 Forbidden\r\n"), "{target}: {answer}");
    }
    let answer = raw(&h, &connect_to(&web.addr.to_string())).await;
    assert!(
        answer.starts_with("HTTP/1.1 403"),
        "port {} is not 443: {answer}",
        web.addr.port()
    );
    assert_eq!(web.accepted(), 0, "nothing refused was ever dialed");
    // The refusal names an IPv6 target in its URL form.
    let mut session = h.inject("p");
    let head = "CONNECT [::1]:443 HTTP/1.1\r\nHost: [::1]:443\r\n\r\n";
    futures::AsyncWriteExt::write_all(&mut session.client, head.as_bytes())
        .await
        .unwrap();
    let report = harness::within(session.session).await;
    let why = report.end.detail().unwrap_or_default();
    // and says which range refused it, and whose range it is.
    assert!(
        why.contains("target [::1]:443: address ::1 is in ::1/128 (the built-in list)"),
        "{why}"
    );
    assert_eq!(h.shutdown().await.forced, 0);
}

#[async_std::test]
async fn host_patterns_and_cidrs_decide_after_resolution() {
    let web = Backend::http().await;
    let port = web.addr.port();
    let h = proxy(&loopback(&[port], r#"allow_hosts: ["localhost", "*.example.test"]"#));
    let (code, body, err) = curl(h.addr("p"), &format!("http://localhost:{port}/by-name"), &[]).await;
    assert_eq!((code, body.as_str()), (0, "hello from backend /by-name"), "{err}");
    let answer = raw(&h, &connect_to(&web.addr.to_string())).await;
    assert!(
        answer.starts_with("HTTP/1.1 403"),
        "127.0.0.1 is not an allowed host name: {answer}"
    );
    let h2 = proxy(&format!(r#"allow_ports: [{port}], allow_hosts: ["localhost"]"#));
    let answer = raw(&h2, &connect_to(&format!("localhost:{port}"))).await;
    assert!(
        answer.starts_with("HTTP/1.1 403"),
        "localhost resolves to a denied address: {answer}"
    );
    assert_eq!(h.shutdown().await.forced, 0);
    assert_eq!(h2.shutdown().await.forced, 0);
}

#[async_std::test]
async fn malformed_slow_and_oversized_heads_are_answered_and_cut_off() {
    let h = proxy(r#"head_max: 1024, head_timeout: "200ms""#);
    let get = raw(&h, b"GET http://example.com/ HTTP/1.1\r\nHost: example.com\r\n\r\n").await;
    assert!(
        get.starts_with("HTTP/1.1 405") && get.contains("Allow: CONNECT"),
        "{get}"
    );
    for (request, status) in [
        (&b"\x16\x03\x01 not http at all\r\n\r\n"[..], "400"),
        (b"CONNECT example.com HTTP/1.1\r\n\r\n", "400"),
        (
            b"CONNECT example.com:443 HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc",
            "400",
        ),
    ] {
        let answer = raw(&h, request).await;
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status}")),
            "{:?}: {answer}",
            String::from_utf8_lossy(request)
        );
    }
    let huge = format!(
        "CONNECT example.com:443 HTTP/1.1\r\nX-Pad: {}\r\n\r\n",
        "a".repeat(2000)
    );
    assert!(raw(&h, huge.as_bytes()).await.starts_with("HTTP/1.1 431"));
    // A head that never ends: answered 408 and closed once head_timeout passes.
    let answer = raw(&h, b"CONNECT example.com:443 HTTP/1.1\r\nX-Slow: yes\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("Connection: close"));
    assert_eq!(h.shutdown().await.forced, 0);
}

#[async_std::test]
async fn bytes_sent_right_after_the_head_reach_the_target() {
    let echo = Backend::echo().await;
    let h = proxy(&loopback(&[echo.addr.port()], ""));
    let mut client = h.connect("p").await;
    let mut request = connect_to(&echo.addr.to_string());
    request.extend_from_slice(b"early bytes, pipelined");
    client.write_all(&request).await.unwrap();
    let expected = b"HTTP/1.1 200 Connection Established\r\n\r\nearly bytes, pipelined";
    let mut got = vec![0u8; expected.len()];
    within(client.read_exact(&mut got)).await.unwrap();
    assert_eq!(String::from_utf8_lossy(&got), String::from_utf8_lossy(expected));
    drop(client);
    assert_eq!(h.shutdown().await.forced, 0);
}

#[async_std::test]
async fn a_refused_target_is_502_and_a_silent_one_504() {
    let (dead, hole) = (refused_addr(), Blackhole::new());
    let h = proxy(&loopback(&[dead.port(), hole.addr.port()], ""));
    assert!(
        raw(&h, &connect_to(&dead.to_string()))
            .await
            .starts_with("HTTP/1.1 502")
    );
    assert!(
        raw(&h, &connect_to(&hole.addr.to_string()))
            .await
            .starts_with("HTTP/1.1 504")
    );
    assert_eq!(h.shutdown().await.forced, 0);
}

/// A TCP route (or a CONNECT route) whose egress goes through another relayd's CONNECT route.
/// A relay whose egress `chain` leaves through `upstream`, on `workers` workers (0: one per core).
fn chained(upstream: SocketAddr, routes: &str, workers: usize) -> Harness {
    let workers = if workers == 0 {
        String::new()
    } else {
        format!("workers: {workers}, ")
    };
    Harness::start(&format!(
        r#"({workers}egress: {{"chain": (via_proxy: "{upstream}", via_proxy_auth: (user: "relay", password: "pw"))}}, routes: [{routes}])"#
    ))
}

#[async_std::test]
async fn a_tcp_route_reaches_its_backend_through_an_upstream_proxy_and_fails_over_on_403() {
    let (forbidden, allowed) = (Backend::greeter("forbidden").await, Backend::greeter("allowed").await);
    // The upstream proxy allows only the second backend's port, and wants credentials.
    let upstream = proxy(&loopback(
        &[allowed.addr.port()],
        r#"auth: [(user: "relay", password: "pw")]"#,
    ));
    let route = format!(
        r#"(name: "t", listen: "127.0.0.1:0", egress: "chain", backends: [(addr: "{}"), (addr: "{}")])"#,
        forbidden.addr, allowed.addr
    );
    // One worker: the order below is one shard's cursor.
    let h = chained(upstream.addr("p"), &route, 1);
    for _ in 0..2 {
        let mut client = h.connect("t").await;
        assert_eq!(
            read_all(&mut client).await,
            b"allowed",
            "the 403 fails over to the next backend"
        );
    }
    let snapshot = h.relay().snapshot().await;
    // The first session met the forbidden backend and failed over; the smooth rotation then
    // owes the allowed one its turn, so the second goes straight there.
    assert_eq!(snapshot[0].backends[0].connect_failures, 1, "{snapshot:?}");
    assert_eq!(snapshot[0].backends[1].sessions, 2, "{snapshot:?}");
    assert_eq!(forbidden.accepted(), 0, "the upstream proxy refused before dialing it");
    assert_eq!(h.shutdown().await.forced, 0);
    assert_eq!(upstream.shutdown().await.forced, 0);
}

#[async_std::test]
async fn connect_routes_chain_through_an_upstream_proxy() {
    let web = Backend::http().await;
    let upstream = proxy(&loopback(
        &[web.addr.port()],
        r#"auth: [(user: "relay", password: "pw")]"#,
    ));
    let route = format!(
        r#"(name: "p", listen: "127.0.0.1:0", protocol: HttpConnect, egress: "chain", connect: ({}))"#,
        loopback(&[web.addr.port()], "")
    );
    let h = chained(upstream.addr("p"), &route, 0);
    let (code, body, err) = curl(h.addr("p"), &format!("http://{}/chained", web.addr), &[]).await;
    assert_eq!((code, body.as_str()), (0, "hello from backend /chained"), "{err}");
    assert_eq!(h.shutdown().await.forced, 0);
    assert_eq!(upstream.shutdown().await.forced, 0);
}

#[async_std::test]
async fn a_raw_connect_with_a_tls_like_client_hello_flows_both_ways() {
    let echo = Backend::echo().await;
    let h = proxy(&loopback(&[echo.addr.port()], ""));
    let mut client: TcpStream = h.connect("p").await;
    client.write_all(&connect_to(&echo.addr.to_string())).await.unwrap();
    let mut established = vec![0u8; relayd::http::ESTABLISHED.len()];
    within(client.read_exact(&mut established)).await.unwrap();
    let hello: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
    client.write_all(&hello).await.unwrap();
    client.shutdown(std::net::Shutdown::Write).unwrap();
    assert!(read_all(&mut client).await == hello, "binary bytes came back changed");
    assert_eq!(h.shutdown().await.forced, 0);
}
