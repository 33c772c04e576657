//! The `relayd` binary end to end: config checks, relaying, signals and exit codes.

use crate::harness;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};

use harness::PATIENCE;
use harness::backend::Backend;
use harness::daemon::{Daemon, TempFile, field, get, run};
use harness::route;

fn fetch(addr: std::net::SocketAddr) -> String {
    let mut stream = TcpStream::connect(addr).expect("connect to relayd");
    stream.set_read_timeout(Some(harness::PATIENCE)).unwrap();
    let mut got = String::new();
    stream.read_to_string(&mut got).expect("read the backend's answer");
    got
}

#[async_std::test]
async fn the_daemon_relays_round_robin_and_exits_zero_on_sigterm() {
    let (a, b) = (Backend::greeter("a").await, Backend::greeter("b").await);
    // One worker: the rotation of one shard's cursor.
    let daemon = Daemon::spawn(
        &[],
        &format!("(workers: 1, routes: [{}])", route("web", &[a.addr, b.addr], "")),
    );
    let addr = daemon.listening("web");
    let answers: Vec<String> = (0..4).map(|_| fetch(addr)).collect();
    assert_eq!(answers, ["a", "b", "a", "b"]);
    daemon.signal(libc::SIGTERM);
    daemon
        .wait_for(|l| l.contains(r#""msg":"stopped""#))
        .expect("relayd logs its stop");
    let status = daemon.wait();
    assert_eq!(status.code(), Some(0), "{status:?}");
}

#[async_std::test]
async fn sigint_drains_a_live_session_before_exit() {
    let sink = Backend::sink().await;
    let daemon = Daemon::spawn(&[], &format!("(routes: [{}])", route("web", &[sink.addr], "")));
    let mut client = TcpStream::connect(daemon.listening("web")).unwrap();
    client.write_all(b"half").unwrap();
    sink.next_accept().await;
    daemon.signal(libc::SIGINT);
    daemon
        .wait_for(|l| l.contains(r#""msg":"stopping""#))
        .expect("relayd begins its stop");
    // The stop has begun; the live session still completes.
    client.write_all(b" done").unwrap();
    client.shutdown(std::net::Shutdown::Write).unwrap();
    let mut reply = String::new();
    client.read_to_string(&mut reply).unwrap();
    assert_eq!(reply, "got 9");
    let stopped = daemon.wait_for(|l| l.contains(r#""msg":"stopped""#)).unwrap();
    assert!(stopped.contains(r#""drained":1,"forced":0"#), "{stopped}");
    assert_eq!(daemon.wait().code(), Some(0));
}

#[test]
fn check_accepts_the_shipped_config() {
    let (code, stderr) = run(&[
        "--check",
        "--config",
        concat!(env!("CARGO_MANIFEST_DIR"), "/config/relayd.ron"),
    ]);
    assert_eq!(code, 0, "{stderr}");
}

#[test]
fn check_names_every_problem_and_exits_non_zero() {
    let bad = TempFile::new(
        "bad.ron",
        r#"(routes: [
            (name: "a", listen: "127.0.0.1:8080", egress: "nope", backends: []),
            (name: "a", listen: "127.0.0.1:8081", backends: [(addr: "nowhere")], connect_timeout: "0s"),
        ])"#,
    );
    let (code, stderr) = run(&["--check", "--config", bad.0.to_str().unwrap()]);
    assert_eq!(code, 2, "{stderr}");
    for expected in [
        "routes[0].egress: unknown egress \"nope\"",
        "routes[0].backends: empty",
        "routes[1].name: \"a\" is also the name of routes[0]",
        "routes[1].backends[0].addr: \"nowhere\" is not IP:port or host:port",
        "routes[1].connect_timeout: must be greater than zero",
    ] {
        assert!(stderr.contains(expected), "missing {expected:?} in:\n{stderr}");
    }
}

#[test]
fn a_syntax_error_gives_file_line_and_column() {
    let bad = TempFile::new(
        "syntax.ron",
        "(\n  routes: [\n    (name: \"a\" listen: \"x\"),\n  ],\n)\n",
    );
    let (code, stderr) = run(&["--check", "--config", bad.0.to_str().unwrap()]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains(&format!("{}:3:", bad.0.display())), "{stderr}");
}

#[test]
fn check_names_a_misspelt_and_a_mistyped_field_by_their_paths_at_once() {
    let bad = TempFile::new(
        "typed.ron",
        "(\n  routes: [\n    (name: \"a\", lisen: \"127.0.0.1:0\",\n     backends: [(addr: \"127.0.0.1:1\", weight: \"3\")]),\n  ],\n)\n",
    );
    let (code, stderr) = run(&["--check", "--config", bad.0.to_str().unwrap()]);
    assert_eq!(code, 2, "{stderr}");
    let file = bad.0.display();
    for expected in [
        format!("{file}:3:17: routes[0].lisen: no field named `lisen`; did you mean `listen`?"),
        format!("{file}:4:47: routes[0].backends[0].weight: expected an integer, found a string"),
    ] {
        assert!(stderr.contains(&expected), "missing {expected:?} in:\n{stderr}");
    }
}

#[test]
fn a_missing_config_file_is_named() {
    let (code, stderr) = run(&["--config", "/nonexistent/relayd.ron"]);
    assert_eq!(code, 2);
    assert!(
        stderr.contains("cannot read config /nonexistent/relayd.ron"),
        "{stderr}"
    );
}

#[test]
fn a_listen_address_in_use_is_named_and_nothing_starts() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let config = format!(r#"(routes: [(name: "web", listen: "{addr}", backends: [(addr: "127.0.0.1:9")])])"#);
    let daemon = Daemon::spawn(&[], &config);
    let line = daemon
        .wait_for(|l| l.contains(r#""level":"error""#))
        .expect("an error line");
    assert!(line.contains(&format!("route web: cannot listen on {addr}")), "{line}");
    assert_eq!(daemon.wait().code(), Some(1));
}

#[test]
fn unknown_arguments_are_refused() {
    let (code, stderr) = run(&["--frobnicate"]);
    assert_eq!(code, 2);
    assert!(stderr.contains("unknown argument \"--frobnicate\""), "{stderr}");
}

/// Sets relayd's RLIMIT_NOFILE so that it cannot open one more descriptor than it has now:
/// a new descriptor takes the lowest free number, so the limit is that number.
fn exhaust_fds(pid: u32) {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap();
    let open: std::collections::HashSet<u64> = fds.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect();
    let lowest_free = (0..).find(|n| !open.contains(n)).unwrap();
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: prlimit on our own child with valid rlimit structs (read, then lower the soft limit).
    let rc = unsafe {
        libc::prlimit(pid as libc::pid_t, libc::RLIMIT_NOFILE, std::ptr::null(), &mut limit);
        limit.rlim_cur = lowest_free;
        libc::prlimit(pid as libc::pid_t, libc::RLIMIT_NOFILE, &limit, std::ptr::null_mut())
    };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
}

fn echo_through(addr: std::net::SocketAddr) -> TcpStream {
    let mut client = TcpStream::connect(addr).expect("connect to relayd");
    client.set_read_timeout(Some(harness::PATIENCE)).unwrap();
    client.write_all(b"ping").unwrap();
    let mut echoed = [0u8; 4];
    client.read_exact(&mut echoed).expect("echo through relayd");
    assert_eq!(&echoed, b"ping");
    client
}

#[async_std::test]
async fn the_listener_survives_running_out_of_file_descriptors() {
    let echo = Backend::echo().await;
    let daemon = Daemon::spawn(&[], &format!("(routes: [{}])", route("web", &[echo.addr], "")));
    let addr = daemon.listening("web");
    let live: Vec<TcpStream> = (0..2).map(|_| echo_through(addr)).collect();
    exhaust_fds(daemon.pid());
    // These wait in the backlog, or get closed when the dial finds no descriptor left.
    let waiting: Vec<TcpStream> = (0..4).map(|_| TcpStream::connect(addr).unwrap()).collect();
    let warned = daemon
        .wait_for(|l| l.contains("os error 24"))
        .expect("relayd reports the exhaustion");
    assert!(warned.contains(r#""level":"warn""#), "{warned}");
    drop((live, waiting));
    // Descriptors are free again: the same listener serves new clients.
    drop(echo_through(addr));
    daemon.signal(libc::SIGTERM);
    assert_eq!(daemon.wait().code(), Some(0));
}

/// GET `path` from the status listener at `addr`: the body.
/// The first line a greeter behind `addr` writes.
fn greeted(addr: SocketAddr) -> String {
    let mut stream = std::net::TcpStream::connect(addr).expect("connect through relayd");
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut name = String::new();
    stream.read_to_string(&mut name).unwrap();
    name
}

#[async_std::test]
async fn sighup_reloads_the_file_an_invalid_one_changes_nothing_and_check_says_what_would_change() {
    let (a, b) = (Backend::greeter("a").await, Backend::greeter("b").await);
    let with = |backend: SocketAddr, more: &str| {
        format!(
            r#"(status: "127.0.0.1:0", routes: [(name: "web", listen: "127.0.0.1:0", backends: [(addr: "{backend}")]){more}])"#
        )
    };
    let daemon = Daemon::spawn(&[], &with(a.addr, ""));
    let web = daemon.listening("web");
    let status_line = daemon.wait_for(|l| l.contains("status page listening")).unwrap();
    let status: SocketAddr = field(&status_line, "addr").unwrap().parse().unwrap();
    assert_eq!(greeted(web), "a");

    // An invalid file: every problem logged, the old config serves on.
    daemon.rewrite(r#"(workers: 0, routes: [(name: "web", listen: "127.0.0.1:0", backends: [(addr: "nowhere")])])"#);
    daemon.signal(libc::SIGHUP);
    let failed = daemon.wait_for(|l| l.contains("reload failed")).unwrap();
    assert!(failed.contains("workers") && failed.contains("nowhere"), "{failed}");
    assert_eq!(greeted(web), "a");
    let metrics = get(status, "/metrics");
    assert!(
        metrics.contains("relayd_config_reloads_total{result=\"failed\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("relayd_config_last_reload_successful 0"), "{metrics}");

    // --check on the next file says what a reload would change, from the running config.
    let next = with(
        b.addr,
        r#", (name: "more", listen: "127.0.0.1:0", backends: [(addr: "127.0.0.1:9")])"#,
    );
    let next = next.replacen("127.0.0.1:0\"", &format!("{status}\""), 1);
    daemon.rewrite(&next);
    let (code, out) = run(&["--check", "--config", daemon.config_path().to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(&format!("route web: backend {} added", b.addr)), "{out}");
    assert!(out.contains(&format!("route web: backend {} removed", a.addr)), "{out}");
    assert!(out.contains("route more: added (Tcp on 127.0.0.1:0)"), "{out}");

    // The reload: the same socket, the new backend, the new route; each change logged.
    daemon.signal(libc::SIGHUP);
    let more = daemon.listening("more");
    daemon.wait_for(|l| l.contains("config reloaded")).unwrap();
    let added = daemon.logged(|l| l.contains("reload") && l.contains("backend") && l.contains("added"));
    assert!(added.iter().any(|l| l.contains(&b.addr.to_string())), "{added:?}");
    assert_ne!(more, web);
    assert_eq!(greeted(web), "b");
    let metrics = get(status, "/metrics");
    assert!(
        metrics.contains("relayd_config_reloads_total{result=\"ok\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("relayd_config_last_reload_successful 1"), "{metrics}");
    assert!(get(status, "/config").contains(&b.addr.to_string()));
    let (_, out) = run(&["--check", "--config", daemon.config_path().to_str().unwrap()]);
    assert!(out.contains("would change nothing"), "{out}");

    daemon.signal(libc::SIGUSR1);
    daemon.wait_for(|l| l.contains("SIGUSR1 ignored")).unwrap();
    assert_eq!(greeted(web), "b");
    daemon.signal(libc::SIGTERM);
    assert_eq!(daemon.wait().code(), Some(0));
}

#[async_std::test]
async fn a_second_sigterm_ends_the_drain_at_once() {
    let sink = Backend::sink().await;
    let config = format!(r#"(drain_timeout: "1h", routes: [{}])"#, route("web", &[sink.addr], ""));
    let daemon = Daemon::spawn(&[], &config);
    let mut client = TcpStream::connect(daemon.listening("web")).unwrap();
    client.write_all(b"live").unwrap();
    sink.next_accept().await;
    daemon.signal(libc::SIGTERM);
    daemon
        .wait_for(|l| l.contains(r#""msg":"stopping""#))
        .expect("the drain begins");
    daemon.signal(libc::SIGTERM);
    daemon
        .wait_for(|l| l.contains("asked again to stop"))
        .expect("the second signal is heard");
    let stopped = daemon.wait_for(|l| l.contains(r#""msg":"stopped""#)).unwrap();
    assert!(stopped.contains(r#""forced":1"#), "{stopped}");
    assert_eq!(daemon.wait().code(), Some(0));
}

#[async_std::test]
async fn at_the_descriptor_limit_clients_wait_in_the_backlog_and_all_are_served() {
    const CLIENTS: usize = 60;
    let echo = Backend::echo().await;
    let config = format!(
        r#"(status: "127.0.0.1:0", routes: [{}])"#,
        route("web", &[echo.addr], "")
    );
    // A soft limit below the hard one: the daemon raises it to the hard limit first.
    let daemon = Daemon::spawn(&["prlimit", "--nofile=40:64"], &config);
    let budget = daemon.wait_for(|l| l.contains("descriptor budget")).unwrap();
    assert_eq!(harness::daemon::field(&budget, "nofile"), Some("64"), "{budget}");
    let cap: usize = harness::daemon::field(&budget, "max_sessions")
        .unwrap()
        .parse()
        .unwrap();
    assert!(cap < CLIENTS, "{budget}");
    let addr = daemon.listening("web");
    let status = daemon.wait_for(|l| l.contains("status page listening")).unwrap();
    let status: std::net::SocketAddr = harness::daemon::field(&status, "addr").unwrap().parse().unwrap();
    // Every client holds its session until released; more of them than the cap.
    let (release_tx, release) = flume::bounded::<()>(0);
    let (served_tx, served) = flume::unbounded();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (release, served_tx) = (release.clone(), served_tx.clone());
            std::thread::spawn(move || {
                let mut client = TcpStream::connect(addr).expect("the kernel takes the connection");
                client.set_read_timeout(Some(harness::PATIENCE)).unwrap();
                client.write_all(b"ping").unwrap();
                let mut echoed = [0u8; 4];
                let ok = client.read_exact(&mut echoed).is_ok() && &echoed == b"ping";
                served_tx.send(ok).unwrap();
                let _ = release.recv();
            })
        })
        .collect();
    let first: Vec<bool> = (0..cap)
        .map(|_| served.recv_timeout(harness::PATIENCE).unwrap())
        .collect();
    assert!(first.iter().all(|ok| *ok), "{first:?}");
    daemon
        .wait_for(|l| l.contains("session cap reached"))
        .expect("relayd stops accepting at its cap");
    // The reserve keeps the status page up while the sessions are at the cap.
    let mut page = TcpStream::connect(status).expect("the status page accepts");
    page.set_read_timeout(Some(harness::PATIENCE)).unwrap();
    page.write_all(b"GET / HTTP/1.1\r\nHost: relayd\r\n\r\n").unwrap();
    let mut text = String::new();
    page.read_to_string(&mut text).expect("the status page answers");
    assert!(text.contains("route web"), "{text}");
    drop(release_tx);
    let rest: Vec<bool> = (cap..CLIENTS)
        .map(|_| served.recv_timeout(harness::PATIENCE).unwrap())
        .collect();
    assert!(rest.iter().all(|ok| *ok), "every waiting client is served: {rest:?}");
    clients.into_iter().for_each(|c| c.join().unwrap());
    let log = daemon.stop();
    assert!(
        !log.iter().any(|l| l.contains("no_backend")),
        "nobody was accepted only to be dropped"
    );
}

#[test]
fn no_client_can_flood_the_log_with_refusals() {
    let dead = [harness::backend::refused_addr(), harness::backend::refused_addr()];
    let daemon = Daemon::spawn(&[], &format!("(routes: [{}])", route("web", &dead, "")));
    let addr = daemon.listening("web");
    let started = std::time::Instant::now();
    for _ in 0..300 {
        let mut client = TcpStream::connect(addr).unwrap();
        client.set_read_timeout(Some(harness::PATIENCE)).unwrap();
        let _ = client.read_to_end(&mut Vec::new());
    }
    let seconds = started.elapsed().as_secs() + 1;
    let log = daemon.stop();
    for msg in ["session closed", "connect failed"] {
        let lines = log.iter().filter(|l| l.contains(&format!(r#""msg":"{msg}""#))).count();
        assert!(
            (1..=seconds as usize + 1).contains(&lines),
            "{lines} {msg:?} lines for 300 refused clients in {seconds}s"
        );
    }
    let last = log
        .iter()
        .rev()
        .find(|l| l.contains(r#""msg":"session closed""#))
        .unwrap();
    assert!(
        last.contains(r#""end":"no_backend""#) && last.contains("held_back"),
        "{last}"
    );
}

#[test]
fn version_names_the_revision_and_help_names_every_flag() {
    let (code, out) = harness::daemon::run(&["--version"]);
    assert_eq!(code, 0, "{out}");
    let revision = out
        .trim()
        .rsplit_once('(')
        .map(|(_, r)| r.trim_end_matches(')'))
        .unwrap_or_default();
    assert!(
        revision == "unknown" || (revision.len() >= 12 && revision.bytes().all(|b| b.is_ascii_hexdigit())),
        "{out}"
    );
    let (code, help) = harness::daemon::run(&["--help"]);
    assert_eq!(code, 0, "{help}");
    for flag in [
        "-c, --config",
        "--check",
        "--log-level",
        "--log-format",
        "-V, --version",
        "-h, --help",
    ] {
        assert!(help.contains(flag), "{flag} missing from\n{help}");
    }
}

#[test]
fn each_worker_runs_one_event_loop_and_a_session_stays_on_the_worker_that_accepted_it() {
    let echo = async_std::task::block_on(Backend::echo());
    for workers in [1, 2] {
        let config = format!("(workers: {workers}, routes: [{}])", route("web", &[echo.addr], ""));
        let daemon = Daemon::spawn(&[], &config);
        let addr = daemon.listening("web");
        assert_eq!(
            harness::event_loops(&daemon.pid().to_string(), workers),
            workers,
            "workers: {workers} → that many event loops"
        );
        const CLIENTS: usize = 40;
        for i in 0..CLIENTS {
            let mut client = TcpStream::connect(addr).unwrap();
            client.set_read_timeout(Some(PATIENCE)).unwrap();
            let ping = format!("ping {i}");
            client.write_all(ping.as_bytes()).unwrap();
            let mut echoed = vec![0u8; ping.len()];
            client.read_exact(&mut echoed).unwrap();
            assert_eq!(echoed, ping.as_bytes());
        }
        let ended = |l: &str| l.contains("session closed");
        let lines = (0..CLIENTS)
            .map(|_| daemon.wait_for(ended).expect("a session line for each client"))
            .collect::<Vec<_>>();
        let mut seen = std::collections::BTreeMap::<String, usize>::new();
        for line in &lines {
            *seen
                .entry(
                    field(line, "worker")
                        .expect("the session line names its worker")
                        .to_string(),
                )
                .or_default() += 1;
        }
        let want: Vec<String> = (0..workers).map(|w| w.to_string()).collect();
        // The kernel spreads connections over the workers' sockets by their addresses (40
        // source ports: all on one of two sockets is a chance of 2^-39), and each session ran
        // on the worker that accepted it: a listener spawns its sessions on its own thread,
        // where their sockets are then registered and their events heard.
        assert_eq!(seen.keys().cloned().collect::<Vec<_>>(), want, "{seen:?}");
        let log = daemon.stop();
        let moved: Vec<_> = log.iter().filter(|l| l.contains("another worker")).collect();
        assert!(moved.is_empty(), "{moved:?}");
    }
}
