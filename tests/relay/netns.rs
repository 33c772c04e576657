//! Interface and source-address binding for real, in the two-namespace topology of
//! `harness::netns` (a host with two NICs and two routes of different metric to the backend).
//!
//! The backend answers every TCP connection and UDP datagram with the source address it saw.
//! The helper processes are this test binary run again inside a namespace (see `helper`).
//! Needs root and iproute2: under `CI=true` they must run; elsewhere they skip, saying why.

use crate::harness;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::time::Duration;

use harness::PATIENCE;
use harness::daemon::Daemon;
use harness::netns::{BACKEND, Topology, ip};

const TCP_PORT: u16 = 7000;
const UDP_PORT: u16 = 7001;

const EGRESS: &str = r#"{
    "dev": (device: "up2"),
    "src": (source: "198.18.1.3"),
    "both": (device: "up2", source: "198.18.2.3"),
    "missing": (device: "nosuch0"),
}"#;

/// The source address the backend sees for each egress: `plain` names none, so the metric-10
/// route (up1) applies; SO_BINDTODEVICE up2 takes the metric-20 route.
const SOURCES: [(&str, &str); 4] = [
    ("plain", "198.18.1.1"),
    ("dev", "198.18.2.1"),
    ("src", "198.18.1.3"),
    ("both", "198.18.2.3"),
];

fn ip_of(answer: &str) -> String {
    answer.split(':').next().unwrap_or_default().to_string()
}

/// Starts relayd in the relay namespace with one route per egress in `routes` (`plain`: none)
/// to the backend's `port`, sends one `role` client through each, and returns the daemon and,
/// per route, the source IP the backend reported ("" when nothing came back).
fn sources_via_relayd(
    t: &Topology,
    protocol: &str,
    port: u16,
    role: &str,
    routes: &[&str],
) -> (Daemon, Vec<(String, String)>) {
    let route = |name: &&str| {
        let egress = if *name == "plain" {
            "None".to_string()
        } else {
            format!("\"{name}\"")
        };
        format!(
            r#"(name: "{name}", listen: "127.0.0.1:0", protocol: {protocol}, egress: {egress}, connect_timeout: "2s", backends: [(addr: "{BACKEND}:{port}")])"#
        )
    };
    let routes_ron: Vec<String> = routes.iter().map(route).collect();
    let config = format!("(egress: {EGRESS}, routes: [{}])", routes_ron.join(", "));
    let daemon = Daemon::spawn(&["ip", "netns", "exec", &t.relay], &config);
    let seen = (routes.iter())
        .map(|name| {
            let addr = daemon.listening(name).to_string();
            let client = t.helper(&t.relay, role, &[("RELAYD_NETNS_TARGET", &addr)]);
            (name.to_string(), ip_of(&client.line("got")))
        })
        .collect();
    (daemon, seen)
}

fn expected(extra: &[(&str, &str)]) -> Vec<(String, String)> {
    SOURCES
        .iter()
        .chain(extra)
        .map(|(n, ip)| (n.to_string(), ip.to_string()))
        .collect()
}

#[test]
fn tcp_through_relayd_leaves_by_the_named_device_and_source() {
    let Some(topology) = Topology::build_or_skip() else {
        return;
    };
    let _backend = topology.helper(&topology.backend, "backend", &[]);
    let routes = ["plain", "dev", "src", "both", "missing"];
    let (daemon, seen) = sources_via_relayd(&topology, "Tcp", TCP_PORT, "client", &routes);
    // No such device: the dial fails and nothing leaves by another way.
    assert_eq!(seen, expected(&[("missing", "")]));
    // The kernel says the device is gone, so the egress is down before the client comes (or,
    // had the client been first, its bind fails): either way the session's end names it.
    let failure = daemon
        .wait_for(|l| l.contains(r#""msg":"session closed""#) && l.contains(r#""route":"missing""#))
        .expect("the refused session is logged");
    assert!(failure.contains("nosuch0"), "{failure}");
    daemon.signal(libc::SIGTERM);
    assert_eq!(daemon.wait().code(), Some(0));
}

#[test]
fn udp_dials_leave_by_the_named_device_and_source() {
    let Some(topology) = Topology::build_or_skip() else {
        return;
    };
    let _backend = topology.helper(&topology.backend, "backend", &[]);
    let dialer = topology.helper(&topology.relay, "udp-dial", &[]);
    let answers: Vec<(String, String)> = ["default", "dev", "src", "both", "missing"]
        .iter()
        .map(|name| (name.to_string(), dialer.line(&format!("{name}="))))
        .collect();
    for ((_, answer), (name, source)) in answers.iter().zip(SOURCES) {
        assert_eq!(ip_of(answer), source, "egress {name}: {answers:?}");
    }
    let missing = &answers[4].1;
    assert!(
        missing.starts_with("error: egress missing: cannot bind to device nosuch0"),
        "{missing}"
    );
}

#[test]
fn udp_through_relayd_leaves_by_the_named_device_and_source() {
    let Some(topology) = Topology::build_or_skip() else {
        return;
    };
    let _backend = topology.helper(&topology.backend, "backend", &[]);
    let routes = ["plain", "dev", "src", "both"];
    let (daemon, seen) = sources_via_relayd(&topology, "Udp", UDP_PORT, "udp-client", &routes);
    assert_eq!(seen, expected(&[]));
    daemon.signal(libc::SIGTERM);
    assert_eq!(daemon.wait().code(), Some(0));
}

/// One client through relayd at `addr` in the relay namespace: the source the backend saw.
fn source_via(t: &Topology, addr: &str) -> String {
    ip_of(
        &t.helper(&t.relay, "client", &[("RELAYD_NETNS_TARGET", addr)])
            .line("got"),
    )
}

#[test]
fn when_a_link_goes_down_new_sessions_leave_by_the_other_and_come_back_after() {
    let Some(topology) = Topology::build_or_skip() else {
        return;
    };
    let _backend = topology.helper(&topology.backend, "backend", &[]);
    let config = format!(
        r#"(egress: {{"one": (device: "up1"), "two": (device: "up2")}}, routes: [(name: "r", listen: "127.0.0.1:0",
            egress: ["one", "two"], egress_strategy: Failover, health: (cooldown: "200ms", cooldown_max: "200ms"),
            connect_timeout: "2s", backends: [(addr: "{BACKEND}:{TCP_PORT}")])])"#
    );
    let daemon = Daemon::spawn(&["ip", "netns", "exec", &topology.relay], &config);
    let addr = daemon.listening("r").to_string();
    assert_eq!(
        source_via(&topology, &addr),
        "198.18.1.1",
        "failover: the first egress while it is up"
    );

    let r = topology.relay.as_str();
    ip(&["-n", r, "link", "set", "up1", "down"]).unwrap();
    // The first client after the link went: its dial by up1 fails (no route), and the same
    // session goes again by up2. No client sees the failure.
    for _ in 0..3 {
        assert_eq!(
            source_via(&topology, &addr),
            "198.18.2.1",
            "up1 is down: up2 carries the traffic"
        );
    }
    let down = daemon
        .wait_for(|l| l.contains(r#""msg":"egress down""#))
        .expect("the egress is reported down");
    assert!(down.contains(r#""egress":"one""#), "{down}");

    ip(&["-n", r, "link", "set", "up1", "up"]).unwrap();
    ip(&[
        "-n",
        r,
        "route",
        "add",
        harness::netns::BACKENDS,
        "via",
        "198.18.1.2",
        "dev",
        "up1",
        "metric",
        "10",
    ])
    .unwrap();
    // Once its cool-down is over, a session tries up1 again, finds it back, and failover
    // returns every later session to it. Each try is a real client; the loop is bounded.
    let started = std::time::Instant::now();
    let mut sources = Vec::new();
    while sources.last().map(String::as_str) != Some("198.18.1.1") {
        assert!(
            started.elapsed() < PATIENCE,
            "traffic never came back to up1: {sources:?}"
        );
        sources.push(source_via(&topology, &addr));
    }
    daemon
        .wait_for(|l| l.contains(r#""msg":"egress up""#))
        .expect("the egress is reported up");
    for _ in 0..3 {
        assert_eq!(source_via(&topology, &addr), "198.18.1.1", "back on the first egress");
    }
    daemon.signal(libc::SIGTERM);
    assert_eq!(daemon.wait().code(), Some(0));
}

/// Not a test of its own: the processes the tests above start inside a namespace.
#[test]
#[ignore = "run by the netns tests inside a namespace"]
fn helper() {
    match std::env::var("RELAYD_NETNS_ROLE").as_deref() {
        Ok("backend") => backend(),
        Ok("client") => client(&std::env::var("RELAYD_NETNS_TARGET").unwrap()),
        Ok("udp-dial") => udp_dial(),
        Ok("udp-client") => udp_client(&std::env::var("RELAYD_NETNS_TARGET").unwrap()),
        other => panic!("no RELAYD_NETNS_ROLE ({other:?}): this helper is run by the netns tests"),
    }
}

/// Answers each TCP connection and UDP datagram with the peer address it saw.
fn backend() {
    let tcp = TcpListener::bind(("0.0.0.0", TCP_PORT)).unwrap();
    // Bound to the service address, so replies come from it (a connected client drops others).
    let udp = UdpSocket::bind((BACKEND, UDP_PORT)).unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        while let Ok((_, peer)) = udp.recv_from(&mut buf) {
            let _ = udp.send_to(peer.to_string().as_bytes(), peer);
        }
    });
    println!("@@ready");
    for mut stream in tcp.incoming().map_while(Result::ok) {
        let peer = stream.peer_addr().unwrap();
        let _ = stream.write_all(peer.to_string().as_bytes());
    }
}

fn client(target: &str) {
    println!("@@ready");
    let mut stream = TcpStream::connect(target).unwrap();
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut got = String::new();
    let _ = stream.read_to_string(&mut got);
    println!("@@got {got}");
}

/// One datagram through relayd's UDP route; prints the answer (the source the backend saw).
fn udp_client(target: &str) {
    println!("@@ready");
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    socket.connect(target).unwrap();
    socket.set_read_timeout(Some(PATIENCE)).unwrap();
    socket.send(b"who am i").unwrap();
    let mut buf = [0u8; 64];
    let n = socket.recv(&mut buf).unwrap_or(0);
    println!("@@got {}", String::from_utf8_lossy(&buf[..n]));
}

/// Dials the backend over UDP through each egress with the library's Dialer.
fn udp_dial() {
    println!("@@ready");
    let config = format!(
        r#"(egress: {EGRESS}, routes: [(name: "x", listen: "127.0.0.1:0", backends: [(addr: "127.0.0.1:9")])])"#
    );
    let settings = relayd::Config::parse(&config, "helper").unwrap().validate().unwrap();
    let (dialer, _task, _news) = relayd::dialer::DialerHandle::spawn(&settings.egress, 8);
    let target = format!("{BACKEND}:{UDP_PORT}").parse().unwrap();
    for name in ["default", "dev", "src", "both", "missing"] {
        let id = settings.egress.iter().position(|e| e.name == name).unwrap();
        let answer = relayd::rt::block_on(async {
            let socket = dialer
                .udp(target, relayd::config::EgressId(id))
                .await
                .map_err(|e| e.to_string())?
                .socket;
            socket.send(b"who am i").await.map_err(|e| e.to_string())?;
            let mut buf = [0u8; 64];
            let n = relayd::rt::timeout(Duration::from_secs(5), socket.recv(&mut buf)).await;
            let n = n.ok_or("no answer")?.map_err(|e| e.to_string())?;
            Ok::<String, String>(String::from_utf8_lossy(&buf[..n]).into_owned())
        });
        println!("@@{name}={}", answer.unwrap_or_else(|e| format!("error: {e}")));
    }
}
