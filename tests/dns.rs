//! A real DNS client (`dig`) through the relayd daemon to a real DNS server (`dnsmasq`) on
//! loopback. `.ci/run` installs both; elsewhere the test skips, saying why, if either is missing.

mod harness;

use std::process::{Command, Stdio};

use harness::daemon::{Daemon, lines};

const ANSWER: &str = "198.18.0.10";

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Kills the DNS server when the test ends, however it ends.
struct Server(std::process::Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn dig_gets_its_answer_through_relayd_even_with_a_dead_first_backend() {
    if !(have("dig") && have("dnsmasq")) {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI=true, yet dig or dnsmasq is missing (.ci/run installs them)"
        );
        eprintln!("SKIPPED: dig and dnsmasq are needed (apt-get install dnsutils dnsmasq-base)");
        return;
    }
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
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
    let _server = Server(child);
    loop {
        let line = log.recv_timeout(harness::PATIENCE).expect("dnsmasq says it started");
        if line.contains("started") {
            break;
        }
    }
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
