//! A real DNS client (`dig`) through the relayd daemon to a real DNS server (`dnsmasq`) on
//! loopback. `.ci/run` installs both; elsewhere the test skips, saying why, if either is missing.

use crate::harness;

use std::process::{Command, Stdio};

use harness::daemon::{Daemon, lines};

const ANSWER: &str = "198.18.0.10";

/// Kills the DNS server when the test ends, however it ends.
struct Server(std::process::Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A port free for both TCP and UDP (dnsmasq takes both).
fn free_port() -> u16 {
    loop {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = tcp.local_addr().unwrap().port();
        if std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// dnsmasq answering `relayd.test` on a free port; `None` if it could not bind (another
/// process took the port in between).
fn start_dnsmasq() -> Option<(Server, u16)> {
    let port = free_port();
    let mut child = Command::new("dnsmasq")
        .args([
            "--keep-in-foreground",
            "--log-facility=-",
            "--bind-interfaces",
            "--listen-address=127.0.0.1",
        ])
        .args([
            "--no-resolv",
            "--no-hosts",
            &format!("--port={port}"),
            &format!("--address=/relayd.test/{ANSWER}"),
        ])
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start dnsmasq");
    let log = lines(child.stderr.take().unwrap(), "dnsmasq");
    let server = Server(child);
    loop {
        match log.recv_timeout(harness::PATIENCE) {
            Ok(line) if line.contains("started") => return Some((server, port)),
            Ok(_) => continue,
            Err(flume::RecvTimeoutError::Disconnected) => return None,
            Err(flume::RecvTimeoutError::Timeout) => panic!("dnsmasq said nothing within {:?}", harness::PATIENCE),
        }
    }
}

#[test]
fn dig_gets_its_answer_through_relayd_even_with_a_dead_first_backend() {
    if !harness::have(&["dig", "dnsmasq"], "dnsutils dnsmasq-base") {
        return;
    }
    let (_server, port) = (0..5)
        .find_map(|_| start_dnsmasq())
        .expect("dnsmasq starts on a free port within five tries");
    let dead = harness::udp::unreachable_addr();
    let config = format!(
        r#"(routes: [(name: "dns", listen: "127.0.0.1:0", protocol: Udp, backends: [(addr: "{dead}"), (addr: "127.0.0.1:{port}")])])"#
    );
    let daemon = Daemon::spawn(&[], &config);
    let relay = daemon.listening("dns");
    for _ in 0..3 {
        let out = Command::new("dig")
            .args([
                &format!("@{}", relay.ip()),
                "-p",
                &relay.port().to_string(),
                "relayd.test",
                "+short",
                "+tries=1",
                "+time=10",
            ])
            .output()
            .expect("run dig");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            ANSWER,
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    daemon.signal(libc::SIGTERM);
    let stopped = daemon
        .wait_for(|l| l.contains(r#""msg":"stopped""#))
        .expect("relayd stops");
    assert!(stopped.contains(r#""forced":0"#), "{stopped}");
    assert_eq!(daemon.wait().code(), Some(0));
}
