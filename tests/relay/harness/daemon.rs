//! Runs the real `relayd` binary on a temporary config, optionally under a prefix such as
//! `ip netns exec NS`, and follows its ndjson log to learn when it listens and how it ends.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

use super::PATIENCE;

/// The relayd binary cargo built for these tests.
pub const RELAYD: &str = env!("CARGO_BIN_EXE_relayd");

/// A file in the system temp dir, removed when dropped.
pub struct TempFile(pub PathBuf);

impl TempFile {
    pub fn new(name: &str, contents: &str) -> TempFile {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("relayd-test-{}-{n}-{name}", std::process::id()));
        std::fs::write(&path, contents).expect("write temp file");
        TempFile(path)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The value of `"key":"value"` or `"key":number` in an ndjson log line.
pub fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let start = line.find(&format!("\"{key}\":"))? + key.len() + 3;
    let rest = &line[start..];
    match rest.strip_prefix('"') {
        Some(quoted) => quoted.split('"').next(),
        None => rest.split([',', '}']).next(),
    }
}

pub struct Daemon {
    /// Taken by [`Daemon::wait`]; killed on drop if still here.
    child: Option<Child>,
    lines: flume::Receiver<String>,
    /// Every line received so far, waited for or not.
    seen: std::cell::RefCell<Vec<String>>,
    _config: TempFile,
}

impl Daemon {
    /// Starts `prefix… relayd --config <temp> --log-format json`.
    pub fn spawn(prefix: &[&str], config: &str) -> Daemon {
        let config = TempFile::new("relayd.ron", config);
        let mut argv: Vec<String> = prefix.iter().map(|s| s.to_string()).collect();
        argv.push(RELAYD.to_string());
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..])
            .arg("--config")
            .arg(&config.0)
            .args(["--log-format", "json"]);
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn relayd");
        let lines = lines(child.stderr.take().unwrap(), "relayd");
        Daemon {
            child: Some(child),
            lines,
            seen: Default::default(),
            _config: config,
        }
    }

    /// Writes `config` over the file the daemon was started on (a SIGHUP then reloads it).
    pub fn rewrite(&self, config: &str) {
        std::fs::write(&self._config.0, config).expect("rewrite the config");
    }

    /// The config file's path.
    pub fn config_path(&self) -> &std::path::Path {
        &self._config.0
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// The next log line that satisfies `want` (bounded wait); `None` if the log ended first.
    pub fn wait_for(&self, want: impl Fn(&str) -> bool) -> Option<String> {
        loop {
            let line = self.lines.recv_timeout(PATIENCE);
            if let Ok(line) = &line {
                self.seen.borrow_mut().push(line.clone());
            }
            match line {
                Ok(line) if want(&line) => return Some(line),
                Ok(_) => continue,
                Err(flume::RecvTimeoutError::Timeout) => panic!("relayd logged nothing wanted within {PATIENCE:?}"),
                Err(flume::RecvTimeoutError::Disconnected) => return None,
            }
        }
    }

    /// The lines already logged (and read by `wait_for`) that satisfy `want`, oldest first.
    pub fn logged(&self, want: impl Fn(&str) -> bool) -> Vec<String> {
        self.seen.borrow().iter().filter(|l| want(l)).cloned().collect()
    }

    /// The address `route` listens on, from its "listening" log line.
    pub fn listening(&self, route: &str) -> SocketAddr {
        let line = self
            .wait_for(|l| field(l, "msg") == Some("listening") && field(l, "route") == Some(route))
            .unwrap_or_else(|| panic!("relayd ended before route {route} listened"));
        field(&line, "addr").unwrap().parse().unwrap()
    }

    /// Stops relayd with SIGTERM and returns every line it logged, from its start to its
    /// exit (which must be a clean one).
    pub fn stop(self) -> Vec<String> {
        self.signal(libc::SIGTERM);
        let (lines, mut seen) = (self.lines.clone(), self.seen.take());
        assert_eq!(self.wait().code(), Some(0), "relayd exits cleanly");
        seen.extend(lines.try_iter());
        seen
    }

    pub fn signal(&self, signal: libc::c_int) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.pid() as libc::pid_t, signal) };
    }

    /// Waits for the process to exit (bounded).
    pub fn wait(mut self) -> ExitStatus {
        let (tx, rx) = flume::bounded(1);
        let mut child = self.child.take().expect("running");
        std::thread::spawn(move || {
            let _ = tx.send(child.wait());
        });
        rx.recv_timeout(PATIENCE)
            .expect("relayd exited in time")
            .expect("wait for relayd")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // A test that failed midway must not leave relayd running.
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A child's output, line by line, on a channel (and echoed to the test's output, tagged).
pub fn lines(output: impl std::io::Read + Send + 'static, tag: &'static str) -> flume::Receiver<String> {
    let (tx, lines) = flume::unbounded();
    std::thread::spawn(move || {
        for line in BufReader::new(output).lines().map_while(Result::ok) {
            eprintln!("{tag}| {line}");
            let _ = tx.send(line);
        }
    });
    lines
}

/// Runs `relayd ARGS…` to completion: (exit code, stdout and stderr).
pub fn run(args: &[&str]) -> (i32, String) {
    let out = Command::new(RELAYD)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run relayd");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&[out.stdout, out.stderr].concat()).into_owned(),
    )
}

/// `GET path` from the status listener at `addr`, blocking (bounded): the body.
pub fn get(addr: SocketAddr, path: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).expect("status listener");
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    write!(stream, "GET {path} HTTP/1.0\r\n\r\n").unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    (answer.split_once("\r\n\r\n"))
        .map(|(_, body)| body.to_string())
        .unwrap_or_default()
}
