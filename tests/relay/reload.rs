//! Hot reload: the listening socket stays, live sessions run on, new sessions follow the new
//! config, a removed route drains, and a reload that cannot apply changes nothing.

use crate::harness;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use async_std::net::TcpStream;
use async_std::prelude::*;
use harness::backend::Backend;
use harness::udp::{UdpBackend, client, round_trip, udp_sockets_on};
use harness::{Harness, free_port, within};

/// A config with a `web` route to `backends` (`addr` or `addr, weight`), and more routes.
fn config(backends: &[(SocketAddr, u32)], more: &str) -> String {
    let list: Vec<String> = (backends.iter())
        .map(|(addr, weight)| format!(r#"(addr: "{addr}", weight: {weight})"#))
        .collect();
    format!(
        r#"(drain_timeout: "2s", routes: [
            (name: "web", listen: "127.0.0.1:0", balance: WeightedRoundRobin, backends: [{}]),
            {more}])"#,
        list.join(", ")
    )
}

/// One exchange through `addr`: the backend's name, then `payload` echoed whole.
async fn exchange(addr: SocketAddr, payload: &[u8]) -> Result<String, String> {
    let mut stream = TcpStream::connect(addr).await.map_err(|e| format!("connect: {e}"))?;
    let writer = {
        let (mut w, payload) = (stream.clone(), payload.to_vec());
        async_std::task::spawn(async move {
            w.write_all(&payload).await?;
            w.shutdown(std::net::Shutdown::Write)
        })
    };
    let mut got = Vec::new();
    stream.read_to_end(&mut got).await.map_err(|e| format!("read: {e}"))?;
    writer.await.map_err(|e| format!("write: {e}"))?;
    let newline = got.iter().position(|b| *b == b'\n').ok_or("no name line")?;
    if got[newline + 1..] != *payload {
        return Err(format!("{} bytes back of {}", got.len() - newline - 1, payload.len()));
    }
    Ok(String::from_utf8_lossy(&got[..newline]).into_owned())
}

/// Which backends `n` new sessions reach, in order.
async fn reached(addr: SocketAddr, n: usize) -> Vec<String> {
    let mut names = Vec::new();
    for _ in 0..n {
        names.push(within(exchange(addr, b"which")).await.expect("served"));
    }
    names
}

#[async_std::test]
async fn ten_reloads_under_load_refuse_and_cut_nothing_and_new_sessions_follow_each() {
    let (a, b, c) = (
        Backend::named_echo("a").await,
        Backend::named_echo("b").await,
        Backend::named_echo("c").await,
    );
    let (a, b, c) = (a.addr, b.addr, c.addr);
    let extra = Backend::named_echo("x").await;
    let extra_route = format!(
        r#"(name: "extra", listen: "127.0.0.1:0", backends: [(addr: "{}")])"#,
        extra.addr
    );
    let web2 = format!(r#"(name: "web2", listen: "127.0.0.1:0", backends: [(addr: "{a}")])"#);
    let mut h = Harness::start(&config(&[(a, 1), (b, 1)], ""));
    let web = h.addr("web");

    // A session that lives through every reload, and clients streaming all along.
    let long = TcpStream::connect(web).await.unwrap();
    let (stop, served, failed) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
    );
    let clients: Vec<_> = (0..4)
        .map(|i| {
            let (stop, served, failed) = (stop.clone(), served.clone(), failed.clone());
            async_std::task::spawn(async move {
                let payload: Vec<u8> = (0..64 * 1024).map(|n| (n * 7 + i) as u8).collect();
                // Bounded by count as well as by the stop flag.
                for _ in 0..5_000 {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    match exchange(web, &payload).await {
                        Ok(_) => served.fetch_add(1, Ordering::SeqCst),
                        Err(e) => {
                            eprintln!("client {i}: {e}");
                            failed.fetch_add(1, Ordering::SeqCst)
                        }
                    };
                }
            })
        })
        .collect();
    let mut long_reader = long.clone();
    let mut name = [0u8; 2];
    within(long_reader.read_exact(&mut name)).await.unwrap();
    let mut sent = Vec::new();

    // Each step: a config, what it must say, and where new sessions must go then.
    let steps: Vec<(String, &str, Option<BTreeSet<&str>>)> = vec![
        (
            config(&[(a, 1), (b, 1), (c, 1)], ""),
            "backend",
            Some(["a", "b", "c"].into()),
        ),
        (config(&[(b, 1), (c, 1)], ""), "removed", Some(["b", "c"].into())),
        (config(&[(b, 1), (c, 3)], ""), "weight", Some(["b", "c"].into())),
        (
            config(&[(b, 1), (c, 3)], &extra_route),
            "added",
            Some(["b", "c"].into()),
        ),
        (config(&[(c, 1)], &extra_route), "removed", Some(["c"].into())),
        (config(&[(c, 1)], ""), "route extra: removed", Some(["c"].into())),
        (config(&[(a, 1), (c, 1)], &web2), "route web2: added", None),
        (config(&[(a, 1)], ""), "removed", Some(["a"].into())),
        (config(&[(a, 2), (b, 1)], ""), "weight", Some(["a", "b"].into())),
        (config(&[(a, 1), (b, 1)], ""), "weight", Some(["a", "b"].into())),
    ];
    for (i, (text, says, follows)) in steps.iter().enumerate() {
        let changes = h.reload(text).await.expect("the reload applies");
        assert!(
            changes.iter().any(|c| c.line.contains(says)),
            "step {i}: {says:?} in {changes:?}"
        );
        assert_eq!(h.addr("web"), web, "step {i}: the same listening socket");
        if text.contains("extra") {
            assert_eq!(
                reached(h.addr("extra"), 1).await,
                ["x"],
                "step {i}: the added route serves"
            );
        }
        if let Some(follows) = follows {
            // The streaming clients take picks between these; 48 make missing a backend of
            // weight 1 in 4 as likely as (3/4)^48, about 1e-6.
            let seen: BTreeSet<String> = reached(web, 48).await.into_iter().collect();
            let want: BTreeSet<String> = follows.iter().map(|s| s.to_string()).collect();
            assert_eq!(seen, want, "step {i}: new sessions follow the new backends");
        }
        // The long session carries a chunk across every reload.
        let chunk = format!("chunk {i};").into_bytes();
        within((&long).write_all(&chunk)).await.unwrap();
        sent.extend_from_slice(&chunk);
    }
    assert!(h.relay().local_addr("extra").is_none(), "the removed route is gone");
    stop.store(true, Ordering::SeqCst);
    for client in clients {
        within(client).await;
    }
    long.shutdown(std::net::Shutdown::Write).unwrap();
    let mut echoed = Vec::new();
    within(long_reader.read_to_end(&mut echoed)).await.unwrap();
    assert_eq!(echoed, sent, "the session from before the first reload is whole");
    assert_eq!(failed.load(Ordering::SeqCst), 0, "no client was refused or cut");
    assert!(served.load(Ordering::SeqCst) > 0, "clients were served throughout");
    eprintln!(
        "{} exchanges of 64 KiB during ten reloads",
        served.load(Ordering::SeqCst)
    );
    h.shutdown().await;
}

#[async_std::test]
async fn a_removed_route_stops_accepting_and_its_live_session_drains_to_the_deadline() {
    let echo = Backend::named_echo("e").await;
    let keep = Backend::named_echo("k").await;
    let route = |name: &str, addr: SocketAddr| {
        format!(r#"(name: "{name}", listen: "127.0.0.1:0", backends: [(addr: "{addr}")])"#)
    };
    let both = format!(
        r#"(drain_timeout: "300ms", routes: [{}, {}])"#,
        route("old", echo.addr),
        route("kept", keep.addr)
    );
    let mut h = Harness::start(&both);
    let old = h.addr("old");
    let mut live = TcpStream::connect(old).await.unwrap();
    let mut name = [0u8; 2];
    within(live.read_exact(&mut name)).await.unwrap();

    let started = std::time::Instant::now();
    let changes = h
        .reload(&format!(
            r#"(drain_timeout: "300ms", routes: [{}])"#,
            route("kept", keep.addr)
        ))
        .await
        .unwrap();
    assert_eq!(
        changes.iter().map(|c| c.to_string()).collect::<Vec<_>>(),
        ["route old: removed (its live sessions drain)"]
    );
    // The live session still relays after the reload...
    within(live.write_all(b"still here")).await.unwrap();
    let mut back = [0u8; 10];
    within(live.read_exact(&mut back)).await.unwrap();
    assert_eq!(&back, b"still here");
    // ...until the drain deadline closes it.
    let mut rest = Vec::new();
    let _ = within(live.read_to_end(&mut rest)).await;
    assert!(
        started.elapsed() >= std::time::Duration::from_millis(300),
        "not before the deadline"
    );
    // Its listener is closed; the other route's is untouched.
    let refused = within(async {
        loop {
            match TcpStream::connect(old).await {
                Err(e) => return e.kind(),
                Ok(_) => async_std::task::yield_now().await,
            }
        }
    })
    .await;
    assert_eq!(refused, std::io::ErrorKind::ConnectionRefused);
    assert_eq!(reached(h.addr("kept"), 1).await, ["k"]);
    h.shutdown().await;
}

#[async_std::test]
async fn a_reload_that_cannot_bind_changes_nothing_and_one_that_changes_nothing_says_so() {
    let a = Backend::named_echo("a").await;
    let b = Backend::named_echo("b").await;
    let mut h = Harness::start(&config(&[(a.addr, 1)], ""));
    let web = h.addr("web");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let clash = format!(
        r#"(name: "clash", listen: "{}", backends: [(addr: "{}")])"#,
        taken.local_addr().unwrap(),
        a.addr
    );
    let err = h.reload(&config(&[(b.addr, 1)], &clash)).await.unwrap_err();
    assert!(err.to_string().contains("route clash: cannot listen on"), "{err}");
    assert_eq!(reached(web, 3).await, ["a", "a", "a"], "still the old backends");
    assert!(h.relay().local_addr("clash").is_none());
    let same = h.reload(&config(&[(a.addr, 1)], "")).await.unwrap();
    assert!(same.is_empty(), "{same:?}");
    h.shutdown().await;
}

#[async_std::test]
async fn a_changed_egress_applies_to_new_dials_and_a_live_session_keeps_its_socket() {
    let echo = Backend::echo().await;
    let with = |egress: &str, route_egress: &str| {
        format!(
            r#"(egress: {{{egress}}}, routes: [(name: "web", listen: "127.0.0.1:0", egress: "{route_egress}", backends: [(addr: "{}")])])"#,
            echo.addr
        )
    };
    let mut h = Harness::start(&with(r#""out": (source: "127.0.0.2")"#, "out"));
    let round_trip = |stream: &mut TcpStream, payload: &'static [u8]| {
        let mut stream = stream.clone();
        async move {
            stream.write_all(payload).await.unwrap();
            let mut back = vec![0u8; payload.len()];
            within(stream.read_exact(&mut back)).await.unwrap();
            assert_eq!(back, payload);
        }
    };
    let mut live = h.connect("web").await;
    round_trip(&mut live, b"one").await;
    assert_eq!(echo.next_accept().await.ip().to_string(), "127.0.0.2");

    let changes = h.reload(&with(r#""out": (source: "127.0.0.3")"#, "out")).await.unwrap();
    let said: Vec<String> = changes.iter().map(ToString::to_string).collect();
    assert!(said.iter().any(|c| c.starts_with("egress out: source")), "{said:?}");
    let mut next = h.connect("web").await;
    round_trip(&mut next, b"two").await;
    assert_eq!(
        echo.next_accept().await.ip().to_string(),
        "127.0.0.3",
        "a new dial, the new source"
    );

    // A new egress, and the route moved to it.
    let both = r#""out": (source: "127.0.0.3"), "alt": (source: "127.0.0.4")"#;
    let changes = h.reload(&with(both, "alt")).await.unwrap();
    let said: Vec<String> = changes.iter().map(ToString::to_string).collect();
    assert!(said.iter().any(|c| c == "egress alt: added"), "{said:?}");
    let mut third = h.connect("web").await;
    round_trip(&mut third, b"three").await;
    assert_eq!(echo.next_accept().await.ip().to_string(), "127.0.0.4");

    // The first session, from before both reloads, still runs on its own socket.
    round_trip(&mut live, b"still here").await;
    drop((live, next, third));
    assert_eq!(h.shutdown().await.forced, 0);
}

#[async_std::test]
async fn a_renamed_route_and_two_routes_that_swap_addresses_keep_their_sockets() {
    let (a, b) = (Backend::named_echo("a").await, Backend::named_echo("b").await);
    let (p, q) = (free_port(), free_port());
    let two = |first: &str, at_p: SocketAddr, second: &str, at_q: SocketAddr| {
        format!(
            r#"(drain_timeout: "2s", routes: [(name: "{first}", listen: "127.0.0.1:{p}", backends: [(addr: "{at_p}")]),
                (name: "{second}", listen: "127.0.0.1:{q}", backends: [(addr: "{at_q}")])])"#
        )
    };
    let (on_p, on_q): (SocketAddr, SocketAddr) = (
        format!("127.0.0.1:{p}").parse().unwrap(),
        format!("127.0.0.1:{q}").parse().unwrap(),
    );
    let mut h = Harness::start(&two("web", a.addr, "api", b.addr));
    assert_eq!(reached(on_p, 1).await, ["a"]);
    // A session on "web", known to be (its backend has greeted it) before the rename.
    let mut live = TcpStream::connect(on_p).await.unwrap();
    let mut greeting = [0u8; 2];
    within(live.read_exact(&mut greeting)).await.unwrap();
    assert_eq!(&greeting, b"a\n");

    // "web" becomes "www" on the same address: the socket stays open, and new clients get the
    // new route (here: its backend b).
    let changes = h.reload(&two("www", b.addr, "api", b.addr)).await.unwrap();
    let said: Vec<String> = changes.iter().map(ToString::to_string).collect();
    assert!(said.iter().any(|c| c.starts_with("route www: added")), "{said:?}");
    assert_eq!(reached(on_p, 2).await, ["b", "b"]);
    assert_eq!(h.relay().local_addr("www"), Some(on_p));

    // The two routes swap addresses in one reload: each takes the other's socket.
    h.reload(&format!(
        r#"(drain_timeout: "2s", routes: [(name: "www", listen: "127.0.0.1:{q}", backends: [(addr: "{}")]),
            (name: "api", listen: "127.0.0.1:{p}", backends: [(addr: "{}")])])"#,
        b.addr, a.addr
    ))
    .await
    .expect("a swap binds nothing new");
    assert_eq!(
        reached(on_p, 2).await,
        ["a", "a"],
        "api's backend, on web's old address"
    );
    assert_eq!(reached(on_q, 1).await, ["b"]);

    // The session from before the rename ran on through both reloads, with its old route.
    live.write_all(b"before").await.unwrap();
    live.shutdown(std::net::Shutdown::Write).unwrap();
    let mut got = Vec::new();
    within(live.read_to_end(&mut got)).await.unwrap();
    assert_eq!(got, b"before");
    assert_eq!(h.shutdown().await.forced, 0);
}

#[async_std::test]
async fn a_udp_route_keeps_its_worker_sockets_and_takes_a_new_max_flows_on_every_one() {
    let echo = UdpBackend::echo().await;
    let port = free_port();
    let cfg = |name: &str, max: u32| {
        format!(
            r#"(workers: 2, routes: [(name: "{name}", listen: "127.0.0.1:{port}", protocol: Udp, max_flows: {max},
                backends: [(addr: "{}")])])"#,
            echo.addr
        )
    };
    let mut h = Harness::start(&cfg("dns", 1));
    let relay: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    assert_eq!(udp_sockets_on(port), 2);
    let (a, b) = (client(relay).await, client(relay).await);
    assert_eq!(round_trip(&a, b"a").await, b"a");
    b.send(b"b").await.unwrap();
    let stats = h.relay().stats();
    within(stats.until(|s| s.udp_over_limit() == 1)).await;

    // A raised max_flows reaches the listeners of both sockets, wherever b's datagrams land.
    h.reload(&cfg("dns", 2)).await.unwrap();
    assert_eq!(round_trip(&b, b"b").await, b"b", "room for a second flow");
    assert_eq!(round_trip(&a, b"a").await, b"a");

    // Renamed, the route takes the sockets over: none is bound anew, none is left behind.
    let changes = h.reload(&cfg("dns2", 2)).await.unwrap();
    assert!(
        changes.iter().any(|c| c.to_string().starts_with("route dns2: added")),
        "{changes:?}"
    );
    assert_eq!(udp_sockets_on(port), 2, "the same two sockets");
    assert_eq!(round_trip(&a, b"a once more").await, b"a once more");
    assert_eq!(round_trip(&b, b"b once more").await, b"b once more");
    assert_eq!(h.relay().local_addr("dns2"), Some(relay));

    // A new backend reaches the listeners of both sockets: twelve new clients, which the
    // kernel shares between them, all get it.
    let other = UdpBackend::echo().await;
    h.reload(&cfg("dns2", 20).replace(&echo.addr.to_string(), &other.addr.to_string()))
        .await
        .unwrap();
    // (Each client is kept open, so that none gets the port of one before it: a reused port
    // would be the earlier client's flow.)
    let mut clients = Vec::new();
    for i in 0..12u8 {
        let c = client(relay).await;
        assert_eq!(round_trip(&c, &[i]).await, [i]);
        clients.push(c);
    }
    let seen: BTreeSet<SocketAddr> = other.drain().into_iter().map(|(from, _)| from).collect();
    assert_eq!(seen.len(), 12, "every new flow on the new backend");
    assert_eq!(h.shutdown().await.forced, 0);
}

#[async_std::test]
async fn a_route_removed_and_put_back_at_once_refuses_in_between_and_serves_after() {
    let (a, b) = (Backend::named_echo("a").await, Backend::named_echo("b").await);
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let with =
        |backend: SocketAddr| format!(r#"(routes: [(name: "r", listen: "{addr}", backends: [(addr: "{backend}")])])"#);
    let empty = format!(
        r#"(routes: [(name: "other", listen: "127.0.0.1:0", backends: [(addr: "{}")])])"#,
        a.addr
    );
    let mut h = Harness::start(&with(a.addr));
    assert_eq!(reached(addr, 1).await, ["a"]);
    for _ in 0..10 {
        // Removed: a client is refused at once (the socket is paused, not left to a backlog).
        h.reload(&empty).await.unwrap();
        let refused = TcpStream::connect(addr).await.map(drop).map_err(|e| e.kind());
        assert_eq!(refused, Err(std::io::ErrorKind::ConnectionRefused));
        // Put back at once: the reload takes the address again, and serves on it.
        h.reload(&with(b.addr)).await.expect("the address is taken again");
        assert_eq!(reached(addr, 1).await, ["b"]);
        h.reload(&with(a.addr)).await.unwrap();
    }
    assert_eq!(h.shutdown().await.forced, 0);
}
