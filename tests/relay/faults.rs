//! Real faults in network namespaces (the topology of `harness::netns`), each charged to its
//! cause: carrier loss, an address removed, a route deleted, an unreachable target, spent
//! local ports, a client's hostile CONNECT, a name with one dead address.
//! Needs root and iproute2: under `CI=true` they must run; elsewhere they skip, saying why.

use crate::harness;

use std::collections::BTreeMap;
use std::io::{BufRead, Read, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::time::Instant;

use harness::PATIENCE;
use harness::daemon::{Daemon, field};
use harness::netns::{BACKEND, BACKENDS, DEAD, Helper, Topology};

const TCP_PORT: u16 = 7000;
const UDP_PORT: u16 = 7001;
/// Accepts and holds connections until their client closes.
const HOLD_PORT: u16 = 7002;

fn ip_of(answer: &str) -> &str {
    answer.split(':').next().unwrap_or_default()
}

fn start(t: &Topology, config: &str) -> Daemon {
    Daemon::spawn(&["ip", "netns", "exec", &t.relay], config)
}

/// One TCP client through relayd at `addr`: the source address the backend saw ("" if none).
fn source(t: &Topology, addr: &str) -> String {
    let client = t.helper(&t.relay, "client", &[("RELAYD_NETNS_TARGET", addr)]);
    ip_of(&client.line("got")).to_string()
}

/// Waits (bounded) for a log line with `msg` that contains `text`.
fn logged(daemon: &Daemon, msg: &str, text: &str) -> String {
    let msg = format!(r#""msg":"{msg}""#);
    daemon
        .wait_for(|l| l.contains(&msg) && l.contains(text))
        .unwrap_or_else(|| panic!("relayd ended before logging {msg} with {text}"))
}

/// The milliseconds between a moment and a log line's own timestamp.
fn ms_after(at: std::time::SystemTime, line: &str) -> i64 {
    let stamp = field(line, "time").expect("a timestamp");
    let logged = humantime::parse_rfc3339(stamp).expect("an RFC 3339 timestamp");
    match logged.duration_since(at) {
        Ok(d) => d.as_millis() as i64,
        Err(e) => -(e.duration().as_millis() as i64),
    }
}

const UPLINKS: &str = r#"{"one": (device: "up1"), "two": (device: "up2")}"#;

#[test]
fn carrier_loss_moves_new_and_live_traffic_to_the_other_uplink_and_back() {
    let Some(t) = Topology::build_or_skip() else { return };
    let _backend = t.helper(&t.backend, "backend", &[]);
    let both = r#"egress: ["one", "two"], egress_strategy: Failover"#;
    let config = format!(
        r#"(egress: {UPLINKS}, routes: [
            (name: "t", listen: "127.0.0.1:0", {both}, connect_timeout: "2s", backends: [(addr: "{BACKEND}:{TCP_PORT}")]),
            (name: "u", listen: "127.0.0.1:0", protocol: Udp, {both}, backends: [(addr: "{BACKEND}:{UDP_PORT}")]),
            (name: "c", listen: "127.0.0.1:0", protocol: HttpConnect, {both},
                connect: (allow_ports: [{TCP_PORT}], allow_cidrs: ["{BACKENDS}"])),
        ])"#
    );
    let daemon = start(&t, &config);
    let (tcp, udp, proxy) = (
        daemon.listening("t").to_string(),
        daemon.listening("u"),
        daemon.listening("c"),
    );
    let target = format!("{BACKEND}:{TCP_PORT}");
    let tunnel = |expect: &str| {
        let c = t.helper(
            &t.relay,
            "connect",
            &[
                ("RELAYD_NETNS_TARGET", &proxy.to_string()),
                ("RELAYD_NETNS_TUNNEL", &target),
            ],
        );
        let got = c.line("got");
        assert!(got.starts_with(&format!("200 {expect}:")), "CONNECT: {got}");
    };
    let mut flow = t.helper(&t.relay, "udp-flow", &[("RELAYD_NETNS_TARGET", &udp.to_string())]);
    let datagram = |flow: &mut Helper| {
        flow.say("who am i");
        ip_of(&flow.line("got")).to_string()
    };
    let mut stream = t.helper(&t.relay, "clients", &[("RELAYD_NETNS_TARGET", &tcp)]);
    assert_eq!(source(&t, &tcp), "198.18.1.1", "the first uplink while it is up");
    assert_eq!(datagram(&mut flow), "198.18.1.1");
    tunnel("198.18.1.1");

    // Clients keep coming (four at a time) while the far end of uplink 1 goes away: the
    // interface stays admin-up, only its carrier is lost.
    stream.say("400");
    let mut sources: Vec<String> = (0..20).map(|_| stream.line("got")).collect();
    let cut = std::time::SystemTime::now();
    t.ip(&t.backend, &["link", "set", "dn1", "down"]);
    let down = logged(&daemon, "egress down", "carrier lost on up1");
    eprintln!(
        "MEASURED: egress down {} ms after the carrier loss",
        ms_after(cut, &down)
    );
    while sources.iter().filter(|s| ip_of(s) == "198.18.2.1").count() < 20 {
        sources.push(stream.line("got"));
    }
    assert_eq!(datagram(&mut flow), "198.18.2.1", "the live flow moved to uplink 2");
    tunnel("198.18.2.1");
    assert_eq!(source(&t, &tcp), "198.18.2.1");

    t.ip(&t.backend, &["link", "set", "dn1", "up"]);
    logged(&daemon, "egress up", r#""egress":"one""#);
    while sources.len() < 400 {
        sources.push(stream.line("got"));
    }
    let failed = sources.iter().filter(|s| ip_of(s).is_empty()).count();
    assert_eq!(failed, 0, "no client failed: {sources:?}");
    assert_eq!(source(&t, &tcp), "198.18.1.1", "back on uplink 1");
    tunnel("198.18.1.1");
    let mut fresh = t.helper(&t.relay, "udp-flow", &[("RELAYD_NETNS_TARGET", &udp.to_string())]);
    assert_eq!(
        datagram(&mut fresh),
        "198.18.1.1",
        "new flows follow the strategy again"
    );
    assert_eq!(datagram(&mut flow), "198.18.2.1", "the moved flow stays where it is");
    daemon.stop();
}

#[test]
fn a_removed_address_or_deleted_route_moves_traffic_and_one_lost_route_marks_nothing() {
    let Some(t) = Topology::build_or_skip() else { return };
    let _backend = t.helper(&t.backend, "backend", &[]);
    let config = format!(
        r#"(egress: {{"src1": (source: "198.18.1.3"), "src2": (source: "198.18.2.3"), "one": (device: "up1"), "two": (device: "up2")}},
            routes: [
            (name: "s", listen: "127.0.0.1:0", egress: ["src1", "src2"], egress_strategy: Failover, backends: [(addr: "{BACKEND}:{TCP_PORT}")]),
            (name: "d", listen: "127.0.0.1:0", egress: ["one", "two"], egress_strategy: Failover, backends: [(addr: "{BACKEND}:{TCP_PORT}")]),
        ])"#
    );
    let daemon = start(&t, &config);
    let (s, d) = (daemon.listening("s").to_string(), daemon.listening("d").to_string());
    assert_eq!(source(&t, &s), "198.18.1.3");
    t.ip(&t.relay, &["addr", "del", "198.18.1.3/24", "dev", "up1"]);
    logged(&daemon, "egress down", "source 198.18.1.3 is no longer on the host");
    assert_eq!(source(&t, &s), "198.18.2.3");
    t.ip(&t.relay, &["addr", "add", "198.18.1.3/24", "dev", "up1"]);
    logged(&daemon, "egress up", r#""egress":"src1""#);
    assert_eq!(source(&t, &s), "198.18.1.3");

    // Every route leaving by up1 goes (a device-bound socket would still try the target as
    // on-link): the egress is down, and back when a route is.
    assert_eq!(source(&t, &d), "198.18.1.1");
    t.ip(&t.relay, &["route", "flush", "dev", "up1"]);
    logged(&daemon, "egress down", "no route leaves by up1");
    assert_eq!(source(&t, &d), "198.18.2.1");
    t.ip(
        &t.relay,
        &[
            "route",
            "add",
            BACKENDS,
            "via",
            "198.18.1.2",
            "dev",
            "up1",
            "metric",
            "10",
            "onlink",
        ],
    );
    logged(&daemon, "egress up", r#""egress":"one""#);
    assert_eq!(source(&t, &d), "198.18.1.1");
    let log = daemon.stop();
    let downs = log.iter().filter(|l| l.contains(r#""msg":"egress down""#)).count();
    assert_eq!(downs, 2, "src1 once, one once: nothing else");
}

#[test]
fn an_unreachable_target_spent_ports_or_a_hostile_connect_take_nothing_down() {
    let Some(t) = Topology::build_or_skip() else { return };
    let backend = t.helper(&t.backend, "backend", &[]);
    // Three routes on one egress: one to a network nothing routes to, one whose backend will
    // have every local port towards it in use, and one that must serve throughout.
    let config = format!(
        r#"(egress: {{"one": (device: "up1"), "v4": (source: "198.18.1.1")}}, routes: [
            (name: "good", listen: "127.0.0.1:0", egress: "v4", backends: [(addr: "{BACKEND}:{TCP_PORT}")]),
            (name: "nowhere", listen: "127.0.0.1:0", egress: "v4", backends: [(addr: "198.18.50.1:80")]),
            (name: "busy", listen: "0.0.0.0:0", egress: "v4", backends: [(addr: "{BACKEND}:{HOLD_PORT}")]),
            (name: "proxy", listen: "127.0.0.1:0", protocol: HttpConnect, egress: ["one", "v4"],
                connect: (allow_ports: [443, {TCP_PORT}], allow_cidrs: ["2001:db8::/32", "{BACKENDS}"])),
        ])"#
    );
    let daemon = start(&t, &config);
    let listen = |route: &str| daemon.listening(route).to_string();
    let (good, nowhere, busy, proxy) = (listen("good"), listen("nowhere"), listen("busy"), listen("proxy"));
    // Four local ports (the listeners have theirs): four held connections to one backend
    // spend them for that backend only.
    let sysctl = [
        "netns",
        "exec",
        &t.relay,
        "sysctl",
        "-qw",
        "net.ipv4.ip_local_port_range=40000 40003",
    ];
    let out = std::process::Command::new("ip").args(sysctl).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let nothing = t.helper(&t.relay, "client", &[("RELAYD_NETNS_TARGET", &nowhere)]);
    assert_eq!(nothing.line("got"), "", "no route to 198.18.50.1");
    let refused = logged(&daemon, "session closed", r#""route":"nowhere""#);
    assert!(
        refused.contains("Network is unreachable"),
        "the cause is logged: {refused}"
    );
    assert_eq!(source(&t, &good), "198.18.1.1", "the other route on the egress serves");

    let held = busy.replace("0.0.0.0", "127.0.0.1");
    let holder = t.helper(
        &t.relay,
        "hold",
        &[("RELAYD_NETNS_TARGET", &held), ("RELAYD_NETNS_COUNT", "4")],
    );
    for _ in 0..4 {
        backend.line("accepted");
    }
    // By another address of the listener: the client's own ports towards it are free.
    let other = busy.replace("0.0.0.0", "127.0.0.2");
    let spent = t.helper(&t.relay, "client", &[("RELAYD_NETNS_TARGET", &other)]);
    assert_eq!(spent.line("got"), "");
    let closed = logged(&daemon, "session closed", r#""route":"busy""#);
    assert!(closed.contains("Cannot assign requested address"), "{closed}");
    assert_eq!(source(&t, &good), "198.18.1.1", "ports to another backend are free");

    // A thousand CONNECTs to a target no egress can reach: by "one", no IPv6 route; by "v4",
    // the other address family. Each is a 502 to its client and nothing else.
    let flood = t.helper(
        &t.relay,
        "connect",
        &[
            ("RELAYD_NETNS_TARGET", &proxy),
            ("RELAYD_NETNS_TUNNEL", "[2001:db8::1]:443"),
            ("RELAYD_NETNS_COUNT", "1000"),
        ],
    );
    assert_eq!(flood.line("summary"), "502=1000");
    let tunnel = t.helper(
        &t.relay,
        "connect",
        &[
            ("RELAYD_NETNS_TARGET", &proxy),
            ("RELAYD_NETNS_TUNNEL", &format!("{BACKEND}:{TCP_PORT}")),
        ],
    );
    assert!(tunnel.line("got").starts_with("200 198.18.1.1:"));
    assert_eq!(source(&t, &good), "198.18.1.1");
    drop(holder);
    let log = daemon.stop();
    let down: Vec<&String> = (log.iter())
        .filter(|l| l.contains(r#""msg":"egress down""#) || l.contains(r#""msg":"backend down""#))
        .collect();
    assert!(down.is_empty(), "nothing was marked down: {down:?}");
}

#[test]
fn a_name_with_one_dead_address_serves_every_client_by_default() {
    let Some(t) = Topology::build_or_skip() else { return };
    let _backend = t.helper(&t.backend, "backend", &[]);
    t.hosts(&format!("{DEAD} svc.test\n{BACKEND} svc.test\n"));
    let config =
        format!(r#"(routes: [(name: "n", listen: "127.0.0.1:0", backends: [(addr: "svc.test:{TCP_PORT}")])])"#);
    let daemon = start(&t, &config);
    let addr = daemon.listening("n").to_string();
    let mut clients = t.helper(&t.relay, "clients", &[("RELAYD_NETNS_TARGET", &addr)]);
    clients.say("20");
    let got: Vec<String> = (0..20).map(|_| clients.line("got")).collect();
    assert!(got.iter().all(|g| ip_of(g) == "198.18.1.1"), "{got:?}");
    daemon.stop();
}

/// Not a test of its own: the processes the tests above start inside a namespace.
#[test]
#[ignore = "run by the namespace tests inside a namespace"]
fn helper() {
    let target = || std::env::var("RELAYD_NETNS_TARGET").unwrap();
    let count = || std::env::var("RELAYD_NETNS_COUNT").map_or(1, |n| n.parse::<usize>().unwrap());
    match std::env::var("RELAYD_NETNS_ROLE").as_deref() {
        Ok("backend") => backend(),
        Ok("client") => {
            println!("@@ready");
            println!("@@got {}", client(&target()));
        }
        Ok("clients") => clients(&target()),
        Ok("udp-flow") => udp_flow(&target()),
        Ok("hold") => hold(&target(), count()),
        Ok("connect") => connect(&target(), &std::env::var("RELAYD_NETNS_TUNNEL").unwrap(), count()),
        other => panic!("no RELAYD_NETNS_ROLE ({other:?}): this helper is run by the namespace tests"),
    }
}

/// Answers each TCP connection and UDP datagram with the peer address it saw; holds the
/// connections to the hold port open, saying when it accepts one.
fn backend() {
    let tcp = TcpListener::bind(("0.0.0.0", TCP_PORT)).unwrap();
    let hold = TcpListener::bind(("0.0.0.0", HOLD_PORT)).unwrap();
    let udp = UdpSocket::bind((BACKEND, UDP_PORT)).unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        while let Ok((_, peer)) = udp.recv_from(&mut buf) {
            let _ = udp.send_to(peer.to_string().as_bytes(), peer);
        }
    });
    std::thread::spawn(move || {
        for mut stream in hold.incoming().map_while(Result::ok) {
            println!("@@accepted");
            std::thread::spawn(move || std::io::copy(&mut stream, &mut std::io::sink()));
        }
    });
    println!("@@ready");
    for mut stream in tcp.incoming().map_while(Result::ok) {
        let peer = stream.peer_addr().unwrap();
        let _ = stream.write_all(peer.to_string().as_bytes());
    }
}

/// One client: what the backend answered through relayd, "" if nothing.
fn client(target: &str) -> String {
    let Ok(mut stream) = TcpStream::connect(target) else {
        return String::new();
    };
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut got = String::new();
    let _ = stream.read_to_string(&mut got);
    got
}

/// For each line N on stdin, N clients, four at a time, each printing its answer.
fn clients(target: &str) {
    println!("@@ready");
    for line in std::io::stdin().lock().lines().map_while(Result::ok) {
        let n: usize = line.trim().parse().unwrap();
        let next = std::sync::atomic::AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < n {
                        println!("@@got {}", client(target));
                    }
                });
            }
        });
    }
}

/// One UDP flow: each line on stdin is sent as a datagram, and the answer printed.
fn udp_flow(target: &str) {
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    socket.connect(target).unwrap();
    socket.set_read_timeout(Some(PATIENCE)).unwrap();
    println!("@@ready");
    for line in std::io::stdin().lock().lines().map_while(Result::ok) {
        socket.send(line.as_bytes()).unwrap();
        let mut buf = [0u8; 64];
        let n = socket.recv(&mut buf).unwrap_or(0);
        println!("@@got {}", String::from_utf8_lossy(&buf[..n]));
    }
}

/// Opens `count` connections and holds them until stdin closes.
fn hold(target: &str, count: usize) {
    let held: Vec<TcpStream> = (0..count).map(|_| TcpStream::connect(target).unwrap()).collect();
    println!("@@ready");
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
    drop(held);
}

/// `count` CONNECT requests for `tunnel` through the proxy at `target`. One: prints the
/// status and what the tunnel then carried; more: a count of each status.
fn connect(target: &str, tunnel: &str, count: usize) {
    println!("@@ready");
    let mut statuses = BTreeMap::<String, usize>::new();
    let started = Instant::now();
    for _ in 0..count {
        let mut stream = TcpStream::connect(target).unwrap();
        stream.set_read_timeout(Some(PATIENCE)).unwrap();
        write!(stream, "CONNECT {tunnel} HTTP/1.1\r\nHost: {tunnel}\r\n\r\n").unwrap();
        let mut got = String::new();
        let _ = stream.read_to_string(&mut got);
        let status = got.split(' ').nth(1).unwrap_or("none").to_string();
        if count == 1 {
            let body = got.split_once("\r\n\r\n").map_or("", |(_, b)| b);
            println!("@@got {status} {body}");
        }
        *statuses.entry(status).or_default() += 1;
    }
    if count > 1 {
        eprintln!("MEASURED: {count} CONNECTs in {:?}", started.elapsed());
        let summary: Vec<String> = statuses.iter().map(|(s, n)| format!("{s}={n}")).collect();
        println!("@@summary {}", summary.join(","));
    }
}

#[test]
fn a_listener_bound_to_a_device_and_a_marked_egress_follow_the_interfaces() {
    let Some(t) = Topology::build_or_skip() else { return };
    let _backend = t.helper(&t.backend, "backend", &[]);
    // Policy routing: marked traffic to the backends leaves by up2.
    t.ip(&t.relay, &["rule", "add", "fwmark", "0x1", "lookup", "100"]);
    t.ip(
        &t.relay,
        &[
            "route",
            "add",
            BACKENDS,
            "via",
            "198.18.2.2",
            "dev",
            "up2",
            "table",
            "100",
        ],
    );
    let config = format!(
        r#"(egress: {{"marked": (mark: 0x1)}}, routes: [
            (name: "up1-only", listen: "0.0.0.0:7100", listen_device: "up1", backends: [(addr: "{BACKEND}:{TCP_PORT}")]),
            (name: "marked", listen: "127.0.0.1:0", egress: "marked", backends: [(addr: "{BACKEND}:{TCP_PORT}")]),
            (name: "plain", listen: "127.0.0.1:0", backends: [(addr: "{BACKEND}:{TCP_PORT}")]),
        ])"#
    );
    let daemon = start(&t, &config);
    let (marked, plain) = (
        daemon.listening("marked").to_string(),
        daemon.listening("plain").to_string(),
    );
    assert_eq!(source(&t, &plain), "198.18.1.1", "unmarked: the main table's way");
    assert_eq!(source(&t, &marked), "198.18.2.1", "marked: the rule's table, by up2");
    // From the far side: the listener answers on up1's address, and nothing on up2's.
    let by = |addr: &str| {
        let c = t.helper(&t.backend, "client", &[("RELAYD_NETNS_TARGET", addr)]);
        c.line("got")
    };
    assert_eq!(ip_of(&by("198.18.1.1:7100")), "198.18.1.1", "arrived on up1: served");
    assert_eq!(by("198.18.2.1:7100"), "", "arrived on up2: no listener there");
    daemon.stop();
}
