//! Two network namespaces joined by two veth links, like a host with two NICs and two routes
//! of different metric to the same backend network. Used by the namespace tests.
//!
//! ```text
//!  ns R (relayd, clients)                         ns B (backends 198.18.9.1, .2 on lo)
//!  up1 198.18.1.1/24 (+198.18.1.3) ───────────── dn1 198.18.1.2/24
//!  up2 198.18.2.1/24 (+198.18.2.3) ───────────── dn2 198.18.2.2/24
//!  198.18.9.0/24 via 198.18.1.2 dev up1 metric 10  (the default way)
//!  198.18.9.0/24 via 198.18.2.2 dev up2 metric 20
//! ```
//!
//! Helper processes are the test binary run again inside a namespace: each test module that uses
//! them has an ignored `helper` test that dispatches on `RELAYD_NETNS_ROLE`, and the topology
//! runs the one of the module that built it.

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

use super::PATIENCE;

/// The backend every test reaches (on B's loopback).
pub const BACKEND: &str = "198.18.9.1";
/// On B's loopback with nothing listening: connects to it are refused.
pub const DEAD: &str = "198.18.9.2";

pub fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip").args(args).output().map_err(|e| format!("ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// The backends' network, routed both ways (metric 10 by up1, 20 by up2).
pub const BACKENDS: &str = "198.18.9.0/24";

/// Two namespaces, removed (with their veths and files) when dropped.
pub struct Topology {
    pub relay: String,
    pub backend: String,
    /// The helper test its helpers run (`netns::helper`).
    helper: String,
}

impl Topology {
    pub fn build() -> Result<Topology, String> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let id = format!("{}-{n}", std::process::id());
        let t = Topology {
            relay: format!("relayd-r-{id}"),
            backend: format!("relayd-b-{id}"),
            helper: "helper".into(),
        };
        ip(&["netns", "add", &t.relay])?;
        ip(&["netns", "add", &t.backend])?;
        let (r, b) = (t.relay.as_str(), t.backend.as_str());
        for (up, dn, net) in [("up1", "dn1", 1), ("up2", "dn2", 2)] {
            ip(&[
                "-n", r, "link", "add", up, "type", "veth", "peer", "name", dn, "netns", b,
            ])?;
            ip(&["-n", r, "addr", "add", &format!("198.18.{net}.1/24"), "dev", up])?;
            ip(&["-n", r, "addr", "add", &format!("198.18.{net}.3/24"), "dev", up])?;
            ip(&["-n", b, "addr", "add", &format!("198.18.{net}.2/24"), "dev", dn])?;
            ip(&["-n", r, "link", "set", up, "up"])?;
            ip(&["-n", b, "link", "set", dn, "up"])?;
        }
        for ns in [r, b] {
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        for addr in [BACKEND, DEAD] {
            ip(&["-n", b, "addr", "add", &format!("{addr}/32"), "dev", "lo"])?;
        }
        for (via, dev, metric) in [("198.18.1.2", "up1", "10"), ("198.18.2.2", "up2", "20")] {
            ip(&[
                "-n", r, "route", "add", BACKENDS, "via", via, "dev", dev, "metric", metric,
            ])?;
        }
        Ok(t)
    }

    /// The topology, or `None` when it cannot be built outside CI (the reason is printed). Its
    /// helpers run the `helper` test of the module that calls this.
    #[track_caller]
    pub fn build_or_skip() -> Option<Topology> {
        let module = std::path::Path::new(std::panic::Location::caller().file()).file_stem();
        let helper = format!("{}::helper", module.and_then(|m| m.to_str()).expect("a test module"));
        match Topology::build() {
            Ok(mut t) => {
                t.helper = helper;
                Some(t)
            }
            Err(e) => {
                super::skip("network namespaces are unavailable (they need root and iproute2)", e);
                None
            }
        }
    }

    /// Runs this test binary's helper in `ns` with `role`, and waits for its "ready" line.
    pub fn helper(&self, ns: &str, role: &str, env: &[(&str, &str)]) -> Helper {
        let exe = std::env::current_exe().unwrap();
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns]).arg(exe).arg(&self.helper).args([
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ]);
        cmd.env("RELAYD_NETNS_ROLE", role).envs(env.iter().copied());
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let lines = super::daemon::lines(child.stdout.take().unwrap(), "helper");
        let stdin = child.stdin.take();
        let helper = Helper { child, lines, stdin };
        helper.line("ready");
        helper
    }
}

impl Topology {
    /// A hosts file for the relay namespace (`ip netns exec` puts it over /etc/hosts).
    pub fn hosts(&self, text: &str) {
        let dir = format!("/etc/netns/{}", self.relay);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(format!("{dir}/hosts"), text).unwrap();
    }

    /// `ip -n NS args...`, which must succeed.
    pub fn ip(&self, ns: &str, args: &[&str]) {
        let mut all = vec!["-n", ns];
        all.extend_from_slice(args);
        ip(&all).unwrap();
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for ns in [&self.relay, &self.backend] {
            let _ = ip(&["netns", "del", ns]);
            let _ = std::fs::remove_dir_all(format!("/etc/netns/{ns}"));
        }
    }
}

/// A helper process; killed when dropped.
pub struct Helper {
    child: Child,
    lines: flume::Receiver<String>,
    stdin: Option<std::process::ChildStdin>,
}

impl Helper {
    /// What follows `@@prefix` on the helper's next such line (bounded wait). The marker finds
    /// it even where libtest's own "test helper ... " shares the line.
    pub fn line(&self, prefix: &str) -> String {
        let marker = format!("@@{prefix}");
        loop {
            let line = self
                .lines
                .recv_timeout(PATIENCE)
                .unwrap_or_else(|e| panic!("helper said no {prefix:?}: {e}"));
            if let Some((_, rest)) = line.split_once(&marker) {
                return rest.trim().to_string();
            }
        }
    }
}

impl Helper {
    /// Sends the helper one line on its standard input.
    pub fn say(&mut self, line: &str) {
        use std::io::Write;
        let stdin = self.stdin.as_mut().expect("the helper's stdin");
        writeln!(stdin, "{line}")
            .and_then(|()| stdin.flush())
            .expect("tell the helper");
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
