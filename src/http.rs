//! The little HTTP that CONNECT needs, on both sides: reading and judging a client's request head
//! (bounded in size; the caller bounds it in time), relayd's answers, and asking an upstream
//! proxy for a tunnel.

use std::io;
use std::net::SocketAddr;

use futures::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Headers a head may carry; more is a malformed (or hostile) head.
const MAX_HEADERS: usize = 64;

/// Why no request head could be had.
#[derive(Debug)]
pub enum HeadError {
    /// Larger than the route's `head_max`.
    TooLarge,
    /// Not HTTP.
    Malformed(httparse::Error),
    /// The client left (or failed) before the head was complete.
    Closed(Option<io::Error>),
}

/// Reads until a whole request head is in, never holding more than `max` bytes. Returns the
/// buffer and the head's length: what follows it is early data the client already sent.
pub async fn read_request_head<S: AsyncRead + Unpin>(
    stream: &mut S,
    max: usize,
) -> Result<(Vec<u8>, usize), HeadError> {
    let mut buf = Vec::with_capacity(max.min(1024));
    let mut chunk = [0u8; 2048];
    // Empty lines before the request line, which a server ignores (RFC 9112, 2.2): dropped as
    // they come, but counted against `max`.
    let mut skipped = 0;
    loop {
        let room = max.saturating_sub(buf.len() + skipped).min(chunk.len());
        if room == 0 {
            return Err(HeadError::TooLarge);
        }
        let n = stream
            .read(&mut chunk[..room])
            .await
            .map_err(|e| HeadError::Closed(Some(e)))?;
        if n == 0 {
            return Err(HeadError::Closed(None));
        }
        let mut new = &chunk[..n];
        if buf.is_empty() {
            let blank = new.iter().take_while(|b| matches!(b, b'\r' | b'\n')).count();
            (new, skipped) = (&new[blank..], skipped + blank);
        }
        // Only the new bytes (and the three before them) can complete the head: the head is
        // parsed once, when its blank line has come, so a head trickled a byte at a time costs
        // time linear in its size (leading empty lines never reach the buffer).
        let from = buf.len().saturating_sub(3);
        buf.extend_from_slice(new);
        let tail = &buf[from..];
        let ended = tail.windows(3).any(|w| w == b"\n\r\n") || tail.windows(2).any(|w| w == b"\n\n");
        if !ended {
            continue;
        }
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        match httparse::Request::new(&mut headers).parse(&buf) {
            Ok(httparse::Status::Complete(len)) => return Ok((buf, len)),
            Ok(httparse::Status::Partial) => {}
            Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooLarge),
            Err(e) => return Err(HeadError::Malformed(e)),
        }
    }
}

/// A CONNECT request worth judging.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectRequest {
    /// Lowercase; an IPv6 literal without its brackets.
    pub host: String,
    pub port: u16,
    /// The token of `Proxy-Authorization: Basic <token>`, if sent.
    pub credentials: Option<String>,
}

/// A status relayd answers with, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reject {
    pub status: u16,
    pub why: String,
}

fn reject(status: u16, why: impl Into<String>) -> Reject {
    Reject {
        status,
        why: why.into(),
    }
}

/// Judges a complete head (as [`read_request_head`] returned it): only `CONNECT host:port`,
/// without a body, is served.
pub fn parse_connect(head: &[u8]) -> Result<ConnectRequest, Reject> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    req.parse(head)
        .map_err(|e| reject(400, format!("malformed head: {e}")))?;
    let method = req.method.unwrap_or_default();
    if method != "CONNECT" {
        return Err(reject(405, format!("method {method} (only CONNECT is served)")));
    }
    let target = req.path.unwrap_or_default();
    let (host, port) = authority(target).ok_or_else(|| reject(400, format!("target {target:?} is not host:port")))?;
    let mut credentials = None;
    for h in req.headers.iter() {
        let name = h.name.to_ascii_lowercase();
        let value = std::str::from_utf8(h.value).unwrap_or_default().trim();
        match name.as_str() {
            "content-length" if value != "0" => return Err(reject(400, "CONNECT with a body")),
            "transfer-encoding" => return Err(reject(400, "CONNECT with a body")),
            "proxy-authorization" => credentials = basic_token(value),
            _ => {}
        }
    }
    Ok(ConnectRequest {
        host: host.to_ascii_lowercase(),
        port,
        credentials,
    })
}

/// `host:port` or `[v6]:port`, with a port from 1 to 65535.
fn authority(target: &str) -> Option<(&str, u16)> {
    let (host, port) = match target.strip_prefix('[') {
        Some(rest) => {
            let (host, port) = rest.split_once("]:")?;
            host.parse::<std::net::Ipv6Addr>().ok()?;
            (host, port)
        }
        None => target.rsplit_once(':')?,
    };
    let port: u16 = port.parse().ok().filter(|p| *p != 0)?;
    let plain = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':');
    (!host.is_empty() && host.chars().all(plain)).then_some((host, port))
}

fn basic_token(value: &str) -> Option<String> {
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("basic").then(|| token.trim().to_string())
}

/// `Basic` credentials as sent on the wire: base64 of `user:password`.
pub fn basic_credentials(user: &str, password: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
}

/// True when `given` equals one of `known`, taking the same time whichever (if any) it equals.
pub fn credentials_match(known: &[String], given: &str) -> bool {
    let same = |a: &[u8], b: &[u8]| a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0;
    known
        .iter()
        .fold(false, |found, k| found | same(k.as_bytes(), given.as_bytes()))
}

/// relayd's answer to a request it does not serve. The connection closes after it.
pub fn refusal(status: u16) -> String {
    let reason = match status {
        400 => "Bad Request",
        403 => "Forbidden",
        405 => "Method Not Allowed",
        407 => "Proxy Authentication Required",
        408 => "Request Timeout",
        431 => "Request Header Fields Too Large",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Error",
    };
    let extra = match status {
        405 => "Allow: CONNECT\r\n",
        407 => "Proxy-Authenticate: Basic realm=\"relayd\"\r\n",
        _ => "",
    };
    format!("HTTP/1.1 {status} {reason}\r\n{extra}Connection: close\r\nContent-Length: 0\r\n\r\n")
}

pub const ESTABLISHED: &[u8] = b"HTTP/1.1 200 Connection Established\r\n\r\n";

/// Asks the proxy at the other end of `stream` for a tunnel to `target`. Reads the answer one
/// byte at a time so that nothing after its head (the target's first bytes) is taken from the
/// session. `Ok` carries the status and reason of an answer that is not 2xx as `Err`.
pub async fn ask_tunnel<S>(
    stream: &mut S,
    target: SocketAddr,
    credentials: Option<&str>,
) -> io::Result<Result<(), (u16, String)>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let auth = credentials
        .map(|c| format!("Proxy-Authorization: Basic {c}\r\n"))
        .unwrap_or_default();
    let request = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n{auth}\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut head = Vec::with_capacity(64);
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() >= 8192 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "proxy answer head over 8 KiB",
            ));
        }
        if stream.read(&mut byte).await? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        head.push(byte[0]);
    }
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut headers);
    response
        .parse(&head)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("proxy answer: {e}")))?;
    let status = response.code.unwrap_or_default();
    if (200..300).contains(&status) {
        Ok(Ok(()))
    } else {
        Ok(Err((status, response.reason.unwrap_or_default().to_string())))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn connect(head: &str) -> Result<ConnectRequest, Reject> {
        parse_connect(head.as_bytes())
    }

    #[test]
    fn connect_targets() {
        let ok = connect("CONNECT Example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n").unwrap();
        assert_eq!((ok.host.as_str(), ok.port, ok.credentials), ("example.com", 443, None));
        let v6 = connect("CONNECT [::1]:8443 HTTP/1.1\r\n\r\n").unwrap();
        assert_eq!((v6.host.as_str(), v6.port), ("::1", 8443));
        for bad in [
            "example.com",
            "example.com:",
            "example.com:0",
            "example.com:99999",
            ":443",
            "[::1:443",
            "a b:1",
        ] {
            let err = connect(&format!("CONNECT {bad} HTTP/1.1\r\n\r\n")).unwrap_err();
            assert_eq!(err.status, 400, "{bad}: {err:?}");
        }
    }

    #[test]
    fn other_methods_bodies_and_credentials() {
        assert_eq!(
            connect("GET http://example.com/ HTTP/1.1\r\n\r\n").unwrap_err().status,
            405
        );
        let body = "CONNECT a.test:443 HTTP/1.1\r\nContent-Length: 5\r\n\r\n";
        assert_eq!(connect(body).unwrap_err().status, 400);
        let chunked = "CONNECT a.test:443 HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(connect(chunked).unwrap_err().status, 400);
        let token = basic_credentials("alice", "s3cret");
        let authed = connect(&format!(
            "CONNECT a.test:443 HTTP/1.1\r\nProxy-Authorization: basic {token}\r\n\r\n"
        ))
        .unwrap();
        assert_eq!(authed.credentials.as_deref(), Some(token.as_str()));
        assert!(credentials_match(
            &[basic_credentials("bob", "x"), token.clone()],
            &token
        ));
        assert!(!credentials_match(
            std::slice::from_ref(&token),
            &basic_credentials("alice", "wrong")
        ));
    }

    /// Random and truncated heads: the reader never panics, never holds more than the limit,
    /// and ends every case with a head or an error.
    #[test]
    fn random_and_truncated_heads_never_panic_or_overflow() {
        let mut rng = rand::rngs::SmallRng::seed_from_u64(0x5eed);
        let good = b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\nProxy-Authorization: Basic YTpi\r\n\r\nearly";
        for case in 0..5000 {
            let mut input: Vec<u8> = match case % 3 {
                0 => (0..rng.random_range(0..600)).map(|_| rng.random()).collect(),
                1 => good[..rng.random_range(0..good.len())].to_vec(),
                _ => {
                    let mut mutated = good.to_vec();
                    for _ in 0..rng.random_range(1..6) {
                        let i = rng.random_range(0..mutated.len());
                        mutated[i] = rng.random();
                    }
                    mutated
                }
            };
            if case % 50 == 0 {
                input.extend(std::iter::repeat_n(b'x', 10_000));
            }
            let max = 512;
            let mut reader = futures::io::Cursor::new(input);
            match crate::rt::block_on(read_request_head(&mut reader, max)) {
                Ok((buf, len)) => {
                    assert!(buf.len() <= max && len <= buf.len());
                    let _ = parse_connect(&buf[..len]);
                }
                Err(HeadError::TooLarge | HeadError::Malformed(_) | HeadError::Closed(_)) => {}
            }
            assert!(reader.position() as usize <= max, "read past the limit");
        }
    }

    /// Gives its bytes one at a time, as a client trickling its head (or a header) would.
    pub(crate) struct Trickle(pub std::collections::VecDeque<u8>);

    impl futures::io::AsyncRead for Trickle {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &mut [u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            let n = usize::from(!buf.is_empty() && !self.0.is_empty());
            if n == 1 {
                buf[0] = self.0.pop_front().expect("not empty");
            }
            std::task::Poll::Ready(Ok(n))
        }
    }

    #[test]
    fn a_head_trickled_a_byte_at_a_time_is_read_whole_with_what_follows() {
        let head = format!(
            "CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\nX-Pad: {}\r\n\r\nearly",
            "p".repeat(60_000)
        );
        let mut client = Trickle(head.bytes().collect());
        let (buf, len) = crate::rt::block_on(read_request_head(&mut client, 65536)).expect("a whole head");
        assert_eq!(len, head.len() - "early".len());
        assert_eq!(
            &buf[len..],
            b"",
            "bytes after the head stay unread by the byte-wise client"
        );
        assert_eq!(parse_connect(&buf[..len]).unwrap().host, "example.com");
        let mut bare = Trickle("CONNECT a.test:443 HTTP/1.1\nHost: a.test\n\n".bytes().collect());
        assert!(
            crate::rt::block_on(read_request_head(&mut bare, 1024)).is_ok(),
            "LF-only heads end too"
        );
    }

    #[test]
    fn empty_lines_before_the_request_line_are_skipped_as_they_come_and_count_against_the_limit() {
        let request = "CONNECT a.test:443 HTTP/1.1\r\nHost: a.test\r\n\r\nearly";
        let leading = "\r\n".repeat(20_000);
        let mut client = Trickle(format!("{leading}{request}").bytes().collect());
        let (buf, len) = crate::rt::block_on(read_request_head(&mut client, 65536)).expect("a whole head");
        assert!(buf.starts_with(b"CONNECT"), "the empty lines never reached the buffer");
        assert_eq!(parse_connect(&buf[..len]).unwrap().host, "a.test");
        let mut flood = Trickle("\r\n".repeat(40_000).bytes().collect());
        assert!(matches!(
            crate::rt::block_on(read_request_head(&mut flood, 65536)),
            Err(HeadError::TooLarge)
        ));
    }
}
