//! A CONNECT session: read and judge the client's request head, dial the target it names by the
//! route's egress, answer, then relay like any TCP session. Every refusal is one HTTP answer,
//! one log line, and a closed connection.

use std::net::SocketAddr;
use std::sync::Arc;

use futures::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use super::{Session, SessionEnd, SessionReport};
use crate::config::ConnectSettings;
use crate::error::{DialError, Fault};
use crate::http::{self, HeadError};
use crate::rt::{self, TcpConn};

/// Why a CONNECT was not served: the status to answer (none when the client is gone) and why.
struct Refused {
    status: Option<u16>,
    target: String,
    why: String,
}

fn refused(status: u16, target: &str, why: impl Into<String>) -> Refused {
    Refused {
        status: Some(status),
        target: target.to_string(),
        why: why.into(),
    }
}

/// An open tunnel: the target dialed, the upstream, and bytes the client sent after its head.
struct Tunnel {
    target: SocketAddr,
    egress: Arc<str>,
    upstream: TcpConn,
    early: Vec<u8>,
}

impl Session {
    pub(super) async fn run_tunnel<S>(mut self, mut client: S) -> SessionReport
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + std::any::Any,
    {
        let _client_place = match self.client_pass() {
            Ok(pass) => pass,
            Err(end) => return self.finish(end),
        };
        let Some(_passes) = self.ctx.passes().await else {
            return self.finish(SessionEnd::QueueTimeout);
        };
        let prelude = match self.prelude() {
            Ok(pass) => pass,
            Err(end) => return self.finish(end),
        };
        let settings = (self.ctx.route.connect.as_ref()).expect("validation gives HttpConnect routes their settings");
        // Boxed, as for TCP sessions, and bound before the match (a scrutinee would live on
        // through the relay): an open tunnel need not carry the request phase's state.
        let opened = (self.ctx.force)
            .unless(Box::pin(self.open_tunnel(&mut client, settings)))
            .await;
        drop(prelude);
        let end = match opened {
            None => SessionEnd::Forced,
            // Said once, by the session's line, which a flood of refusals cannot turn into a
            // flood of lines (at most one a second for the route, the rest counted as held back).
            Some(Err(refused)) => {
                if let Some(status) = refused.status {
                    let _ = client.write_all(http::refusal(status).as_bytes()).await;
                    let _ = client.close().await;
                }
                SessionEnd::Refused {
                    status: refused.status.unwrap_or(0),
                    why: format!("target {}: {}", refused.target, refused.why),
                }
            }
            Some(Ok(mut tunnel)) => {
                self.report.backend = Some(tunnel.target);
                self.report.egress = Some(tunnel.egress);
                let end = match answer(&mut client, &mut tunnel.upstream, &tunnel.early).await {
                    Ok(()) => self.relay(&mut client, &mut tunnel.upstream).await,
                    Err(end) => end,
                };
                self.report.bytes_up += tunnel.early.len() as u64;
                end
            }
        };
        self.finish(end)
    }

    /// Everything before the 200.
    async fn open_tunnel<S>(&self, client: &mut S, settings: &ConnectSettings) -> Result<Tunnel, Refused>
    where
        S: AsyncRead + Unpin,
    {
        let head = rt::timeout(
            settings.head_timeout,
            http::read_request_head(client, settings.head_max),
        )
        .await;
        let (buf, len) = match head {
            None => return Err(refused(408, "-", "no complete request head in time")),
            Some(Ok(head)) => head,
            Some(Err(HeadError::TooLarge)) => return Err(refused(431, "-", "request head too large")),
            Some(Err(HeadError::Malformed(e))) => return Err(refused(400, "-", format!("malformed head: {e}"))),
            Some(Err(HeadError::Closed(e))) => {
                let why = e.map_or("client left before its head was complete".into(), |e| e.to_string());
                return Err(Refused {
                    status: None,
                    target: "-".into(),
                    why,
                });
            }
        };
        let request = http::parse_connect(&buf[..len]).map_err(|r| refused(r.status, "-", r.why))?;
        // In its URL form: an IPv6 literal in brackets (`[::1]:443`).
        let target = match request.host.contains(':') {
            true => format!("[{}]:{}", request.host, request.port),
            false => format!("{}:{}", request.host, request.port),
        };
        let sent = request.credentials.as_deref().unwrap_or_default();
        if !settings.credentials.is_empty() && !http::credentials_match(&settings.credentials, sent) {
            return Err(refused(407, &target, "missing or wrong Proxy-Authorization"));
        }
        settings
            .acl
            .check_target(&request.host, request.port)
            .map_err(|d| refused(403, &target, d.to_string()))?;
        let addrs = rt::resolve(&request.host, request.port)
            .await
            .map_err(|e| refused(502, &target, format!("resolve: {e}")))?;
        if addrs.is_empty() {
            return Err(refused(502, &target, "the name resolves to no address"));
        }
        // Every address the name has must be allowed: a name that points inside is refused.
        for addr in &addrs {
            settings
                .acl
                .check_addr(addr.ip())
                .map_err(|d| refused(403, &target, d.to_string()))?;
        }
        let (upstream, dialed, egress) = self.dial_any(&addrs, &target).await?;
        Ok(Tunnel {
            target: dialed,
            egress,
            upstream,
            early: buf[len..].to_vec(),
        })
    }

    /// The first of `addrs` that connects, by the route's egresses: 504 if the last failure
    /// was a timeout, 502 otherwise. The target is the client's choice, so no failure here
    /// charges anything: an address one egress cannot reach is tried by the next, then the
    /// next address. (A device or source that cannot be bound is the Dialer's to judge.)
    async fn dial_any(&self, addrs: &[SocketAddr], target: &str) -> Result<(TcpConn, SocketAddr, Arc<str>), Refused> {
        let mut last = refused(502, target, "no address tried");
        for addr in addrs {
            let mut avoid = Vec::new();
            loop {
                let egress = match self.ctx.balancer.egress(&avoid).await {
                    Ok(Ok(egress)) => egress,
                    Ok(Err(none)) if avoid.is_empty() => return Err(refused(502, target, none.to_string())),
                    Ok(Err(_)) => break,
                    Err(e) => return Err(refused(502, target, e.to_string())),
                };
                match self.ctx.dialer.tcp(*addr, egress, self.ctx.route.connect_timeout).await {
                    Ok(upstream) => return Ok((upstream, *addr, self.ctx.egress_named(egress))),
                    Err(e) => {
                        let status = if matches!(e, DialError::Timeout { .. }) {
                            504
                        } else {
                            502
                        };
                        last = refused(status, target, e.to_string());
                        match e.fault() {
                            Some(Fault::Egress | Fault::Path) => avoid.push(egress),
                            Some(Fault::Relay) => return Err(refused(503, target, e.to_string())),
                            _ => break,
                        }
                    }
                }
            }
        }
        Err(last)
    }
}

/// Tells the client its tunnel is open and hands the target what the client already sent.
async fn answer<S>(client: &mut S, upstream: &mut TcpConn, early: &[u8]) -> Result<(), SessionEnd>
where
    S: AsyncWrite + Unpin,
{
    let fail = |direction| move |e| SessionEnd::Failed(direction, e);
    client
        .write_all(http::ESTABLISHED)
        .await
        .map_err(fail(super::Direction::Down))?;
    upstream.write_all(early).await.map_err(fail(super::Direction::Up))
}
