//! The admin socket: an operator's runtime switch per backend and per egress, HAProxy's
//! runtime API in small. A Unix socket only its owner may use (mode 0600; never TCP), one
//! command a connection, a line each way and more lines of answer, then the close:
//!
//! ```text
//! show                                       the status page: routes, backends, state, sessions
//! backend ROUTE ADDR drain|disable|enable    a backend by its address, or as configured
//! egress NAME drain|enable
//! help
//! ```
//!
//! An answer that starts with `error: ` refused the command and changed nothing. The orders
//! live in the Balancers (each shard keeps them beside its health); the egress orders, which
//! are relay-wide, are also kept here and told again to the routes a reload brings.

use std::io;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::future::Either;
use futures::io::{AsyncReadExt, AsyncWriteExt};

use crate::balancer::AdminState;
use crate::rt::{self, Async};
use crate::shutdown::Signal;
use crate::status::Pages;

/// A command longer than this, or slower than [`READ_TIMEOUT`], is refused.
const LINE_MAX: usize = 1024;
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// An answer not taken by then is given up.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

const HELP: &str = "commands:
  show                                       routes, backends, their state and sessions
  backend ROUTE ADDR drain|disable|enable    drain: no new sessions, live ones go on;
                                             disable: as drain, and its checks stop;
                                             enable: back to its health
  egress NAME drain|enable                   drain: no new session leaves by it
  help                                       this text
";

/// One command, as read from a line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Show,
    Help,
    /// An order on a route's backend: by an address it has (`10.0.0.1:80`, `[::1]:80`) or as
    /// configured (`db.internal:5432`, every address it resolves to).
    Backend {
        route: String,
        backend: String,
        state: AdminState,
    },
    /// Drain an egress (`true`) or enable it again.
    Egress {
        name: String,
        drain: bool,
    },
}

impl Command {
    /// The command a line says, or what is wrong with it.
    pub fn parse(line: &str) -> Result<Command, String> {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["show"] => Ok(Command::Show),
            ["help"] => Ok(Command::Help),
            ["backend", route, backend, state] => match AdminState::from_command(state) {
                Some(state) => Ok(Command::Backend {
                    route: route.to_string(),
                    backend: backend.to_string(),
                    state,
                }),
                None => Err(format!("backend: {state:?} is not drain, disable or enable")),
            },
            ["backend", ..] => Err("usage: backend ROUTE ADDR drain|disable|enable".into()),
            ["egress", name, "drain"] => Ok(Command::Egress {
                name: name.to_string(),
                drain: true,
            }),
            ["egress", name, "enable"] => Ok(Command::Egress {
                name: name.to_string(),
                drain: false,
            }),
            ["egress", ..] => Err("usage: egress NAME drain|enable".into()),
            [] => Err("an empty command (try help)".into()),
            [other, ..] => Err(format!("unknown command {other:?} (try help)")),
        }
    }
}

/// The admin socket's actor: serves one connection at a time (a command is quick, and bounded
/// in time), and follows the relay's reloads.
pub(crate) struct Admin {
    pub socket: Async<UnixListener>,
    pub path: PathBuf,
    pub pages: Arc<Pages>,
    /// A reload's pages: its routes and egress names.
    pub updates: flume::Receiver<Arc<Pages>>,
    /// The egresses the operator drained, by name.
    pub drained: Vec<Arc<str>>,
}

impl Admin {
    pub async fn run(mut self, stop: Signal) {
        let mut backoff = crate::net::Backoff::default();
        loop {
            let accepted = async { Either::Left(self.socket.read_with(|l| l.accept()).await) };
            let reloaded = async {
                match self.updates.recv_async().await {
                    Ok(pages) => Either::Right(pages),
                    Err(_) => std::future::pending().await,
                }
            };
            match stop.unless(rt::race(accepted, reloaded)).await {
                None => break,
                Some(Either::Right(pages)) => {
                    self.pages = pages;
                    self.retell().await;
                }
                Some(Either::Left(Ok((stream, _)))) => {
                    backoff.reset();
                    if let Ok(stream) = Async::new(stream) {
                        self.serve(stream).await;
                    }
                }
                Some(Either::Left(Err(e))) => {
                    log::warn!(err:% = e; "admin socket: accept failed, backing off");
                    backoff.wait(&stop).await;
                }
            }
        }
        let _ = std::fs::remove_file(&self.path);
        log::debug!("admin socket stopped");
    }

    /// Reads one command, carries it out, answers and closes.
    async fn serve(&mut self, mut stream: Async<UnixStream>) {
        let line = rt::timeout(READ_TIMEOUT, read_line(&mut stream)).await;
        let answer = match line {
            None => "error: no command within 5s\n".to_string(),
            Some(Err(e)) => format!("error: {e}\n"),
            Some(Ok(line)) => match Command::parse(&line) {
                Ok(command) => self
                    .carry_out(command)
                    .await
                    .unwrap_or_else(|e| format!("error: {e}\n")),
                Err(e) => format!("error: {e}\n"),
            },
        };
        let answered = rt::timeout(WRITE_TIMEOUT, async {
            let _ = stream.write_all(answer.as_bytes()).await;
            let _ = stream.close().await;
        });
        if answered.await.is_none() {
            log::debug!("admin socket: the answer was not taken in time, closed");
        }
    }

    async fn carry_out(&mut self, command: Command) -> Result<String, String> {
        match command {
            Command::Show => Ok(self.pages.render().await),
            Command::Help => Ok(HELP.into()),
            Command::Backend { route, backend, state } => {
                let Some(view) = self.pages.routes.iter().find(|r| *r.name == *route) else {
                    let names: Vec<&str> = self.pages.routes.iter().map(|r| &*r.name).collect();
                    return Err(format!("no route {route:?} (routes: {})", names.join(", ")));
                };
                let addrs = (view.balancer.admin_backend(&backend, state).await).map_err(|e| e.to_string())??;
                let addrs: Vec<String> = addrs.iter().map(ToString::to_string).collect();
                log::info!(route = route.as_str(), backend = backend.as_str(), state = state.word(),
                    addresses = addrs.join(" ").as_str(); "admin: backend state set");
                let now = match addrs.is_empty() {
                    true => "no address yet".into(),
                    false => addrs.join(", "),
                };
                Ok(format!("route {route}: backend {backend} {} ({now})\n", state.word()))
            }
            Command::Egress { name, drain } => {
                if !self.pages.egresses.iter().any(|e| **e == *name) {
                    let names: Vec<&str> = self.pages.egresses.iter().map(|e| &**e).collect();
                    return Err(format!("no egress {name:?} (egresses: {})", names.join(", ")));
                }
                self.drained.retain(|e| **e != *name);
                if drain {
                    self.drained.push(name.as_str().into());
                }
                self.retell().await;
                let state = if drain { "drain" } else { "enabled" };
                log::info!(egress = name.as_str(), state = state; "admin: egress state set");
                Ok(format!("egress {name}: {state}\n"))
            }
        }
    }

    /// Tells every route which egresses are drained: after an order, and after a reload (new
    /// routes hear it; an egress the config no longer has is forgotten).
    async fn retell(&mut self) {
        let egresses = &self.pages.egresses;
        self.drained.retain(|d| egresses.contains(d));
        let drained: Arc<[Arc<str>]> = self.drained.clone().into();
        for route in &self.pages.routes {
            let _ = route.balancer.admin_egresses(drained.clone()).await;
        }
    }
}

/// The first line a client sends (without its end), at most [`LINE_MAX`] bytes.
async fn read_line(stream: &mut Async<UnixStream>) -> io::Result<String> {
    let mut line = Vec::with_capacity(128);
    let mut buf = [0u8; 256];
    loop {
        if let Some(end) = line.iter().position(|b| *b == b'\n') {
            line.truncate(end);
            break;
        }
        if line.len() > LINE_MAX {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("a command over {LINE_MAX} bytes"),
            ));
        }
        match stream.read(&mut buf).await? {
            0 => break,
            n => line.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8(line).map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "a command that is not UTF-8"))
}

/// Sends `command` to the admin socket at `path` and returns its answer: what `relayd ctl`
/// does. `Err` when the socket cannot be reached or refused the command (its answer's line).
pub fn send(path: &std::path::Path, command: &str) -> Result<String, String> {
    use std::io::{Read, Write};
    let patience = Duration::from_secs(15);
    let mut stream = UnixStream::connect(path).map_err(|e| format!("cannot reach {}: {e}", path.display()))?;
    stream.set_read_timeout(Some(patience)).map_err(|e| e.to_string())?;
    stream
        .write_all(format!("{command}\n").as_bytes())
        .map_err(|e| e.to_string())?;
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let mut answer = String::new();
    stream.read_to_string(&mut answer).map_err(|e| e.to_string())?;
    match answer.strip_prefix("error: ") {
        Some(why) => Err(why.trim_end().to_string()),
        None => Ok(answer),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_are_read_from_their_words_and_a_wrong_one_says_what_is_wrong() {
        assert_eq!(Command::parse("show\n"), Ok(Command::Show));
        assert_eq!(
            Command::parse("  backend web 10.0.0.1:80   disable"),
            Ok(Command::Backend {
                route: "web".into(),
                backend: "10.0.0.1:80".into(),
                state: AdminState::Disabled
            })
        );
        assert_eq!(
            Command::parse("egress up1 drain"),
            Ok(Command::Egress {
                name: "up1".into(),
                drain: true
            })
        );
        assert_eq!(
            Command::parse("backend web 10.0.0.1:80 maint"),
            Err(r#"backend: "maint" is not drain, disable or enable"#.into())
        );
        assert_eq!(
            Command::parse("egress up1 disable"),
            Err("usage: egress NAME drain|enable".into())
        );
        assert_eq!(
            Command::parse("set server x"),
            Err(r#"unknown command "set" (try help)"#.into())
        );
        assert!(Command::parse("").is_err());
    }
}
