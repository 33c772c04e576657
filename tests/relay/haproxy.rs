//! The PROXY protocol against a real peer: HAProxy in front of relayd (`send-proxy-v2` into
//! `accept_proxy`), and behind it (relayd's `send_proxy` into `accept-proxy`). `.ci/run`
//! installs haproxy; elsewhere the test skips, saying why, if it is missing.

use crate::harness;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};

use harness::daemon::{TempFile, lines};
use harness::{Harness, PATIENCE, free_port};

/// Kills HAProxy when the test ends, however it ends.
struct Haproxy(std::process::Child);

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// HAProxy with `frontends` (listen port, server address, server options), started and
/// listening (bounded wait for each port to answer).
fn haproxy(config: &str, ports: &[u16]) -> (Haproxy, TempFile) {
    let file = TempFile::new("haproxy.cfg", config);
    let mut child = Command::new("haproxy")
        .args(["-db", "-f"])
        .arg(&file.0)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start haproxy");
    let _log = lines(child.stderr.take().unwrap(), "haproxy");
    let started = std::time::Instant::now();
    for port in ports {
        while TcpStream::connect(("127.0.0.1", *port)).is_err() {
            assert!(started.elapsed() < PATIENCE, "haproxy never listened on {port}");
            std::thread::yield_now();
        }
    }
    (Haproxy(child), file)
}

/// What the backend read on the connection that carried `payload` (the probes made while
/// waiting for HAProxy to listen may reach it first, with a header and nothing behind it).
fn carrying(backend: &TcpListener, payload: &str, connect: impl FnOnce()) -> String {
    connect();
    loop {
        let (mut stream, _) = backend.accept().unwrap();
        stream.set_read_timeout(Some(PATIENCE)).unwrap();
        let mut got = Vec::new();
        let _ = stream.read_to_end(&mut got);
        let got = String::from_utf8_lossy(&got).into_owned();
        if got.ends_with(payload) {
            return got;
        }
    }
}

#[test]
fn proxy_headers_pass_between_haproxy_and_relayd_both_ways() {
    if !harness::have(&["haproxy"], "haproxy") {
        return;
    }
    let backend = TcpListener::bind("127.0.0.1:0").unwrap();
    let (front, behind) = (free_port(), free_port());
    // relayd in the middle: reads HAProxy's v2 header on one route, sends a v2 header to
    // HAProxy on the other.
    let h = Harness::start(&format!(
        r#"(routes: [
            (name: "behind-haproxy", listen: "127.0.0.1:0", accept_proxy: (trusted: ["127.0.0.1/32"]), send_proxy: V1,
                backends: [(addr: "{}")]),
            (name: "before-haproxy", listen: "127.0.0.1:0", send_proxy: V2, backends: [(addr: "127.0.0.1:{behind}")]),
        ])"#,
        backend.local_addr().unwrap()
    ));
    let config = format!(
        "defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 20s\n    timeout server 20s\n\
         listen front\n    bind 127.0.0.1:{front}\n    server relayd {} send-proxy-v2\n\
         listen behind\n    bind 127.0.0.1:{behind} accept-proxy\n    server backend {} send-proxy\n",
        h.addr("behind-haproxy"),
        backend.local_addr().unwrap()
    );
    let (_haproxy, _file) = haproxy(&config, &[front, behind]);

    // Client -> HAProxy (send-proxy-v2) -> relayd (accept_proxy, send_proxy V1) -> backend.
    let mut me = None;
    let got = carrying(&backend, "one", || {
        let mut client = TcpStream::connect(("127.0.0.1", front)).unwrap();
        me = Some(client.local_addr().unwrap());
        client.write_all(b"one").unwrap();
        client.shutdown(std::net::Shutdown::Write).unwrap();
        std::mem::forget(client);
    });
    let me = me.unwrap();
    assert!(
        got.starts_with(&format!("PROXY TCP4 127.0.0.1 127.0.0.1 {} {front}\r\n", me.port())),
        "{got}"
    );

    // Client -> relayd (send_proxy V2) -> HAProxy (accept-proxy, send-proxy) -> backend.
    let mut me: Option<SocketAddr> = None;
    let relayd = h.addr("before-haproxy");
    let got = carrying(&backend, "two", || {
        let mut client = TcpStream::connect(relayd).unwrap();
        me = Some(client.local_addr().unwrap());
        client.write_all(b"two").unwrap();
        client.shutdown(std::net::Shutdown::Write).unwrap();
        std::mem::forget(client);
    });
    let me = me.unwrap();
    assert!(
        got.starts_with(&format!(
            "PROXY TCP4 127.0.0.1 127.0.0.1 {} {}\r\n",
            me.port(),
            relayd.port()
        )),
        "{got}"
    );
}
