//! The admin socket through the real daemon and `relayd ctl`: a backend drained, disabled and
//! enabled at run time (new sessions kept off it while a live one goes on), an egress drained,
//! the state on the status page and in /metrics, kept across a reload, and refusals that say
//! what is wrong.

use crate::harness;

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use harness::PATIENCE;
use harness::backend::Backend;
use harness::daemon::{Daemon, field, get, run};

/// A path for an admin socket in the temp dir, unique to this process and call.
fn socket_path() -> PathBuf {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    std::env::temp_dir().join(format!("relayd-test-{}-{n}-admin.sock", std::process::id()))
}

/// `relayd ctl --admin PATH WORDS…`: (exit code, what it printed).
fn ctl(path: &std::path::Path, words: &str) -> (i32, String) {
    let mut args = vec!["ctl", "--admin", path.to_str().unwrap()];
    args.extend(words.split(' '));
    run(&args)
}

/// A connection through `addr` to a named echo backend, and the name it greeted with.
fn session(addr: SocketAddr) -> (BufReader<TcpStream>, String) {
    let stream = TcpStream::connect(addr).expect("connect through relayd");
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut reader = BufReader::new(stream);
    let mut name = String::new();
    reader.read_line(&mut name).expect("the backend's greeting");
    (reader, name.trim_end().to_string())
}

#[async_std::test]
async fn ctl_disables_a_backend_while_its_live_session_goes_on_and_enables_it_again() {
    let (a, b) = (Backend::named_echo("a").await, Backend::named_echo("b").await);
    let admin = socket_path();
    let config = |level: &str| {
        format!(
            r#"(log_level: "{level}", status: "127.0.0.1:0", admin: "{}", routes: [(name: "web", listen: "127.0.0.1:0",
                backends: [(addr: "{}"), (addr: "{}")])])"#,
            admin.display(),
            a.addr,
            b.addr
        )
    };
    let daemon = Daemon::spawn(&[], &config("info"));
    let web = daemon.listening("web");
    let status_line = daemon.wait_for(|l| l.contains("status page listening")).unwrap();
    let status: SocketAddr = field(&status_line, "addr").unwrap().parse().unwrap();
    daemon.wait_for(|l| l.contains("admin socket listening")).unwrap();
    let mode = std::fs::metadata(&admin).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the admin socket is its owner's alone");

    // A live session on a (round robin reaches it within a few connects).
    let mut live = (0..4)
        .map(|_| session(web))
        .find(|(_, name)| name == "a")
        .expect("a session on a");
    let (code, out) = ctl(&admin, &format!("backend web {} disable", a.addr));
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        out.trim_end(),
        format!("route web: backend {} disabled ({})", a.addr, a.addr)
    );
    let names: Vec<String> = (0..10).map(|_| session(web).1).collect();
    assert!(
        names.iter().all(|n| n == "b"),
        "new sessions stay off the disabled backend: {names:?}"
    );
    live.0.get_mut().write_all(b"still here\n").unwrap();
    let mut echoed = String::new();
    live.0.read_line(&mut echoed).unwrap();
    assert_eq!(echoed, "still here\n", "the live session on it goes on");

    // The state as the status page, /metrics and `show` tell it.
    let backend_line = |page: &str| {
        page.lines()
            .find(|l| l.contains(&format!("backend {} ", a.addr)))
            .map(str::to_string)
    };
    let page = get(status, "/");
    assert!(backend_line(&page).unwrap().ends_with("admin=disabled"), "{page}");
    let (_, shown) = ctl(&admin, "show");
    assert_eq!(backend_line(&shown), backend_line(&page), "show is the status page");
    let metrics = get(status, "/metrics");
    let series = |state: &str| {
        format!(
            r#"relayd_backend_admin_state{{route="web",backend="{}",state="{state}"}}"#,
            a.addr
        )
    };
    assert!(metrics.contains(&format!("{} 1", series("disabled"))), "{metrics}");
    assert!(metrics.contains(&format!("{} 0", series("enabled"))), "{metrics}");

    // A reload that keeps the backend keeps the order.
    daemon.rewrite(&config("debug"));
    daemon.signal(libc::SIGHUP);
    daemon.wait_for(|l| l.contains("config reloaded")).unwrap();
    let names: Vec<String> = (0..4).map(|_| session(web).1).collect();
    assert!(
        names.iter().all(|n| n == "b"),
        "still disabled after the reload: {names:?}"
    );

    // Enabled: back in the rotation.
    let (code, out) = ctl(&admin, &format!("backend web {} enable", a.addr));
    assert_eq!(code, 0, "{out}");
    let names: Vec<String> = (0..4).map(|_| session(web).1).collect();
    assert!(
        names.iter().any(|n| n == "a"),
        "enabled, it takes sessions again: {names:?}"
    );
    let logged = daemon
        .wait_for(|l| l.contains("admin: backend state set") && l.contains("enabled"))
        .unwrap();
    assert_eq!(field(&logged, "route"), Some("web"));

    // Refusals name what is wrong and change nothing.
    for (words, says) in [
        (
            "backend nope 127.0.0.1:1 drain".to_string(),
            r#"no route "nope" (routes: web)"#.to_string(),
        ),
        (
            "backend web 127.0.0.1:1 drain".into(),
            "route web has no backend 127.0.0.1:1".into(),
        ),
        (
            format!("backend web {} maint", a.addr),
            r#""maint" is not drain, disable or enable"#.into(),
        ),
        (
            "egress nope drain".into(),
            r#"no egress "nope" (egresses: default)"#.into(),
        ),
        ("frob".into(), r#"unknown command "frob""#.into()),
    ] {
        let (code, out) = ctl(&admin, &words);
        assert_eq!(code, 1, "{words}: {out}");
        assert!(out.contains(&says), "{words}: {out}");
    }
    drop(live);
    daemon.stop();
    assert!(!admin.exists(), "the socket file goes with the relay");
}

#[async_std::test]
async fn a_drained_backend_keeps_its_live_sessions_and_a_drained_egress_is_left_by_no_new_session() {
    let (a, b) = (Backend::named_echo("a").await, Backend::named_echo("b").await);
    let admin = socket_path();
    let config = format!(
        r#"(admin: "{}", egress: {{"one": (), "two": ()}}, routes: [(name: "web", listen: "127.0.0.1:0",
            egress: ["one", "two"], egress_strategy: Failover, backends: [(addr: "{}"), (addr: "{}")])])"#,
        admin.display(),
        a.addr,
        b.addr
    );
    let daemon = Daemon::spawn(&[], &config);
    let web = daemon.listening("web");
    daemon.wait_for(|l| l.contains("admin socket listening")).unwrap();
    let mut live = (0..4)
        .map(|_| session(web))
        .find(|(_, name)| name == "b")
        .expect("a session on b");
    let (code, out) = ctl(&admin, &format!("backend web {} drain", b.addr));
    assert_eq!(
        (code, out.trim_end()),
        (0, &*format!("route web: backend {} drain ({})", b.addr, b.addr))
    );
    assert!(
        (0..6).all(|_| session(web).1 == "a"),
        "no new session on the drained backend"
    );
    live.0.get_mut().write_all(b"on\n").unwrap();
    let mut echoed = String::new();
    live.0.read_line(&mut echoed).unwrap();
    assert_eq!(echoed, "on\n");

    // Egress one drained: the failover route leaves by two.
    let left_by = |daemon: &Daemon| {
        let (reader, _) = session(web);
        let client = reader.get_ref().local_addr().unwrap().to_string();
        drop(reader);
        let closed = daemon.wait_for(|l| l.contains("session closed") && field(l, "client") == Some(&client));
        field(&closed.expect("its session line"), "egress").unwrap().to_string()
    };
    let (code, out) = ctl(&admin, "egress one drain");
    assert_eq!((code, out.trim_end()), (0, "egress one: drain"));
    assert_eq!(left_by(&daemon), "two", "a new session leaves by the other egress");
    let (code, _) = ctl(&admin, "egress one enable");
    assert_eq!(code, 0);
    assert_eq!(left_by(&daemon), "one", "enabled, by the first egress again");
    drop(live);
    daemon.stop();
}
