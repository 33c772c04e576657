//! Routing by TLS server name, without terminating TLS: the ClientHello is read (however it is
//! split), its server name picks the route, and the bytes are replayed to that route's backend
//! unchanged.

use crate::harness;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};

use harness::{Harness, PATIENCE, client_hello};

fn listener() -> TcpListener {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.set_nonblocking(true).unwrap();
    l
}

/// What `backend` got on its next connection (bounded wait), once the client has closed.
fn received(backend: &TcpListener) -> Vec<u8> {
    let started = std::time::Instant::now();
    let mut stream = loop {
        match backend.accept() {
            Ok((s, _)) => break s,
            Err(_) => {
                assert!(started.elapsed() < PATIENCE, "the backend got no connection");
                std::thread::yield_now();
            }
        }
    };
    stream.set_nonblocking(false).unwrap();
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut got = Vec::new();
    let _ = stream.read_to_end(&mut got);
    got
}

#[test]
fn a_clienthello_is_routed_by_its_server_name_and_replayed_unchanged() {
    let (a, b, rest) = (listener(), listener(), listener());
    let h = Harness::start(&format!(
        r#"(routes: [
            (name: "a", listen: "127.0.0.1:0", backends: [(addr: "{}")]),
            (name: "b", listen: "127.0.0.1:0", backends: [(addr: "{}")]),
            (name: "rest", listen: "127.0.0.1:0", backends: [(addr: "{}")]),
            (name: "tls", listen: "127.0.0.1:0", sni: (timeout: "300ms", default: "rest", routes: [
                (names: ["a.test"], route: "a"),
                (names: ["*.b.test"], route: "b"),
            ])),
        ])"#,
        a.local_addr().unwrap(),
        b.local_addr().unwrap(),
        rest.local_addr().unwrap()
    ));
    let tls = h.addr("tls");
    for (name, backend) in [("a.test", &a), ("www.b.test", &b), ("unknown.test", &rest)] {
        let hello = client_hello(name);
        let mut client = TcpStream::connect(tls).unwrap();
        // Split across segments: the name is in the second part.
        client.write_all(&hello[..9]).unwrap();
        client.flush().unwrap();
        client.write_all(&hello[9..]).unwrap();
        client.shutdown(std::net::Shutdown::Write).unwrap();
        assert_eq!(
            received(backend),
            hello,
            "{name}: the ClientHello reaches its route's backend unchanged"
        );
    }
    // Not TLS: closed within the timeout, and no backend hears of it.
    let mut plain = TcpStream::connect(tls).unwrap();
    plain.set_read_timeout(Some(PATIENCE)).unwrap();
    plain.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    assert_eq!(plain.read(&mut [0u8; 8]).unwrap_or(0), 0);
    for backend in [&a, &b, &rest] {
        assert!(backend.accept().is_err(), "no dial for a client that is not TLS");
    }
    assert_eq!(async_std::task::block_on(h.shutdown()).forced, 0);
}

/// Kills the TLS servers when the test ends, however it ends.
struct Servers(Vec<std::process::Child>);

impl Drop for Servers {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn run(cmd: &mut std::process::Command) -> String {
    let out = cmd.stdin(std::process::Stdio::null()).output().expect("run openssl");
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

#[test]
fn openssl_clients_reach_the_tls_server_their_name_picks() {
    if !harness::have(&["openssl"], "openssl") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("relayd-sni-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut servers = Servers(Vec::new());
    let mut ports = Vec::new();
    for cn in ["a.test", "www.b.test", "default.test"] {
        let (key, cert) = (dir.join(format!("{cn}.key")), dir.join(format!("{cn}.crt")));
        run(std::process::Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-days",
                "1",
                "-subj",
            ])
            .arg(format!("/CN={cn}"))
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert));
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = std::process::Command::new("openssl")
            .args(["s_server", "-quiet", "-www", "-accept"])
            .arg(format!("127.0.0.1:{port}"))
            .arg("-cert")
            .arg(&cert)
            .arg("-key")
            .arg(&key)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start openssl s_server");
        servers.0.push(child);
        let started = std::time::Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(started.elapsed() < PATIENCE, "s_server never listened");
            std::thread::yield_now();
        }
        ports.push(port);
    }
    let h = Harness::start(&format!(
        r#"(routes: [
            (name: "a", listen: "127.0.0.1:0", backends: [(addr: "127.0.0.1:{}")]),
            (name: "b", listen: "127.0.0.1:0", backends: [(addr: "127.0.0.1:{}")]),
            (name: "rest", listen: "127.0.0.1:0", backends: [(addr: "127.0.0.1:{}")]),
            (name: "tls", listen: "127.0.0.1:0", sni: (default: "rest", routes: [
                (names: ["a.test"], route: "a"), (names: ["*.b.test"], route: "b")])),
        ])"#,
        ports[0], ports[1], ports[2]
    ));
    // Hellos of several shapes, as a client library makes them: TLS 1.2 only, TLS 1.3 only,
    // key shares for several groups (a larger hello), every cipher and no ticket.
    let shapes: [&[&str]; 5] = [
        &[],
        &["-tls1_2"],
        &["-tls1_3"],
        &["-groups", "P-521:X448:P-384:X25519"],
        &["-cipher", "ALL", "-no_ticket"],
    ];
    for (name, cn) in [
        ("a.test", "a.test"),
        ("www.b.test", "www.b.test"),
        ("elsewhere.test", "default.test"),
    ] {
        for shape in shapes {
            let out = run(std::process::Command::new("timeout")
                .args(["20", "openssl", "s_client", "-connect"])
                .arg(h.addr("tls").to_string())
                .args(["-servername", name])
                .args(shape));
            assert!(
                out.contains(&format!("CN = {cn}")),
                "{name} {shape:?}: expected the {cn} server:\n{out}"
            );
        }
    }
    drop(servers);
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(async_std::task::block_on(h.shutdown()).forced, 0);
}
