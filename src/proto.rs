//! Wire formats relayd reads or speaks besides HTTP CONNECT's: the PROXY protocol header of
//! HAProxy's specification, parsed and built with the `ppp` crate, read from a trusted proxy in
//! front (`accept_proxy`) and written to backends (`send_proxy`); and the TLS ClientHello, read
//! with `tls-parser` for the server name an `sni` route picks its target route by.

use std::net::SocketAddr;

use futures::io::{AsyncRead, AsyncReadExt};
use serde::{Deserialize, Serialize};

use crate::acl::unmapped;

/// Which PROXY protocol header a route sends its backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ProxyVersion {
    /// The text header: `PROXY TCP4 198.51.100.7 192.0.2.1 40000 443\r\n`.
    V1,
    /// The binary header.
    V2,
}

/// The largest header read: v2's 16 bytes, IPv6 addresses and TLVs of a few KiB.
const HEADER_MAX: usize = 8 << 10;
/// A v1 line is 107 bytes at most, its CRLF included.
const V1_MAX: usize = 107;

/// The client a PROXY header names, and the address that client reached.
pub type Named = (SocketAddr, SocketAddr);

/// Reads one PROXY protocol header (v1 or v2; no guessing: anything else is an error), byte by
/// byte if it comes so, and returns the client and destination it names (`None` for a LOCAL
/// or UNKNOWN header: the connection's own addresses stand) and the bytes read past it
/// (payload, kept).
pub async fn read_proxy_header<S: AsyncRead + Unpin>(stream: &mut S) -> Result<(Option<Named>, Vec<u8>), String> {
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 512];
    loop {
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(|e| format!("reading the PROXY header: {e}"))?;
        if n == 0 {
            return Err("closed before its PROXY header was complete".into());
        }
        buf.extend_from_slice(&chunk[..n]);
        // A v1 line is whole at its CRLF (107 bytes at most): parse it then, not before.
        let v1 = b"PROXY ".starts_with(&buf[..buf.len().min(6)]);
        let line_end = buf.windows(2).position(|w| w == b"\r\n");
        if v1 && line_end.is_none() && buf.len() < V1_MAX {
            continue;
        }
        // `PROXY UNKNOWN` may carry anything up to its CRLF, which the receiver ignores (the
        // specification, 2.1); ppp takes only the bare form.
        if let Some(end) = line_end.filter(|end| *end < V1_MAX && buf.starts_with(b"PROXY UNKNOWN")) {
            let rest = &buf[b"PROXY UNKNOWN".len()..end];
            if rest.is_empty() || rest.starts_with(b" ") {
                return Ok((None, buf.split_off(end + 2)));
            }
        }
        let (client, len) = match ppp::HeaderResult::parse(&buf) {
            ppp::HeaderResult::V1(Ok(h)) => (v1_client(&h.addresses), h.header.len()),
            ppp::HeaderResult::V2(Ok(h)) => {
                let client = (h.command == ppp::v2::Command::Proxy)
                    .then(|| v2_client(&h.addresses))
                    .flatten();
                (client, h.len())
            }
            result if ppp::PartialResult::is_incomplete(&result) && buf.len() < HEADER_MAX => continue,
            _ => return Err("no valid PROXY protocol header".into()),
        };
        return Ok((client, buf.split_off(len)));
    }
}

/// A TLS record's body is 2^14 bytes at most (RFC 8446, 5.1).
const RECORD_MAX: usize = 1 << 14;
/// The longest ClientHello read while looking for its server name. TLS allows 2^24 bytes; real
/// ones take a few KiB (post-quantum key shares included), over one or a few records. The bound
/// is on the work, not on what the specification allows.
const HELLO_MAX: usize = 64 << 10;

/// Reads a TLS ClientHello (however it is split across segments and records, bounded in size)
/// and returns the server name it asks for (SNI; `None` when it names none) and every byte read,
/// to be replayed to the backend unchanged. Anything that is not a TLS handshake starting with
/// a ClientHello is an error. Each byte is looked at once, whatever the split.
pub async fn read_client_hello<S: AsyncRead + Unpin>(stream: &mut S) -> Result<(Option<String>, Vec<u8>), String> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    // The handshake bytes of the records read whole so far, and where the next record starts.
    let (mut handshake, mut next) = (Vec::new(), 0);
    loop {
        while let Some(header) = buf.get(next..next + 5) {
            if header[0] != 0x16 {
                return Err("not a TLS handshake".into());
            }
            // The record's version is ignored, as RFC 8446 (5.1) says.
            let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
            if len > RECORD_MAX {
                return Err(format!("a TLS record of {len} bytes (2^14 at most)"));
            }
            if len == 0 {
                return Err("an empty handshake record".into());
            }
            let Some(body) = buf.get(next + 5..next + 5 + len) else {
                break;
            };
            handshake.extend_from_slice(body);
            next += 5 + len;
        }
        if let Some(header) = handshake.get(..4) {
            if header[0] != 1 {
                return Err("the first handshake message is no ClientHello".into());
            }
            let whole = 4 + (usize::from(header[1]) << 16 | usize::from(header[2]) << 8 | usize::from(header[3]));
            if whole > HELLO_MAX {
                return Err(format!("a ClientHello of {whole} bytes (more than {HELLO_MAX} read)"));
            }
            if handshake.len() >= whole {
                return Ok((server_name(&handshake[..whole])?, buf));
            }
        }
        if buf.first().is_some_and(|b| *b != 0x16) {
            return Err("not a TLS handshake".into());
        }
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(|e| format!("reading the ClientHello: {e}"))?;
        if n == 0 {
            return Err("closed before its ClientHello was complete".into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// The host name a ClientHello (one whole handshake message) asks for, lowercase. The hello's
/// own fields are read by tls-parser; its extensions are walked by their framing only, since
/// an extension relayd does not read is to be ignored whatever it holds (RFC 8446, 4.2), and
/// only server_name's own form is checked (RFC 6066, 3).
fn server_name(message: &[u8]) -> Result<Option<String>, String> {
    use tls_parser::{TlsMessage, TlsMessageHandshake};
    let Ok((_, TlsMessage::Handshake(TlsMessageHandshake::ClientHello(hello)))) =
        tls_parser::parse_tls_message_handshake(message)
    else {
        return Err("malformed ClientHello".into());
    };
    let mut ext = hello.ext.unwrap_or_default();
    while !ext.is_empty() {
        let (kind, data, rest) = framed(ext, 2).ok_or("malformed ClientHello extensions")?;
        if kind == [0, 0] {
            return host_name(data).map(Some).or_else(|e| match data.is_empty() {
                // An empty server_name is a server's answer, not a client's question.
                true => Ok(None),
                false => Err(e),
            });
        }
        ext = rest;
    }
    Ok(None)
}

/// `bytes` as a `tag`-byte tag, a 2-byte length and that many bytes: (tag, body, what follows).
fn framed(bytes: &[u8], tag: usize) -> Option<(&[u8], &[u8], &[u8])> {
    let len = usize::from(u16::from_be_bytes(bytes.get(tag..tag + 2)?.try_into().ok()?));
    let body = bytes.get(tag + 2..tag + 2 + len)?;
    Some((&bytes[..tag], body, &bytes[tag + 2 + len..]))
}

/// The host_name in a server_name extension's body: its list must fill the body exactly, and
/// the name must be a host name in ASCII (no trailing dot, RFC 6066).
fn host_name(data: &[u8]) -> Result<String, String> {
    let (_, mut list, rest) = framed(data, 0).ok_or("malformed server_name extension")?;
    if !rest.is_empty() {
        return Err("malformed server_name extension".into());
    }
    while !list.is_empty() {
        let (kind, name, more) = framed(list, 1).ok_or("malformed server_name list")?;
        if kind == [0] {
            let printable = |b: &u8| b.is_ascii_graphic();
            if name.is_empty() || !name.iter().all(printable) || name.ends_with(b".") {
                return Err("the server name is not a host name".into());
            }
            return Ok(String::from_utf8_lossy(name).to_ascii_lowercase());
        }
        list = more;
    }
    Err("a server_name extension without a host_name".into())
}

/// The header a health check sends where the backend expects one: v2 LOCAL (a connection of
/// the relay's own, no client behind it), or v1 `UNKNOWN`.
pub fn local_header(version: ProxyVersion) -> Vec<u8> {
    match version {
        ProxyVersion::V1 => ppp::v1::Addresses::Unknown.to_string().into_bytes(),
        ProxyVersion::V2 => v2(
            ppp::v2::Command::Local,
            ppp::v2::Protocol::Stream,
            ppp::v2::Addresses::Unspecified,
        ),
    }
}

/// The v2 header for a UDP datagram from `client` to `local`: the specification's only form for
/// datagrams, sent in front of every one.
pub fn datagram_header(client: SocketAddr, local: SocketAddr) -> Vec<u8> {
    let pair = (unmapped(client), unmapped(local));
    v2(ppp::v2::Command::Proxy, ppp::v2::Protocol::Datagram, pair.into())
}

/// The header that tells a backend a TCP connection came from `client` to `local`. Addresses
/// of two families (after IPv4-mapped ones are read as IPv4) are sent as unknown, as the
/// specification says.
pub fn proxy_header(version: ProxyVersion, client: SocketAddr, local: SocketAddr) -> Vec<u8> {
    let pair = (unmapped(client), unmapped(local));
    match version {
        ProxyVersion::V1 => ppp::v1::Addresses::from(pair).to_string().into_bytes(),
        ProxyVersion::V2 => v2(ppp::v2::Command::Proxy, ppp::v2::Protocol::Stream, pair.into()),
    }
}

/// A v2 header without TLVs.
fn v2(command: ppp::v2::Command, protocol: ppp::v2::Protocol, addresses: ppp::v2::Addresses) -> Vec<u8> {
    let header = ppp::v2::Builder::with_addresses(ppp::v2::Version::Two | command, protocol, addresses);
    header.build().expect("a header of addresses only fits")
}

/// What a v1 header names (v1 and v2 share their address types).
fn v1_client(addresses: &ppp::v1::Addresses) -> Option<Named> {
    match addresses {
        ppp::v1::Addresses::Tcp4(a) => Some(named_v4(a)),
        ppp::v1::Addresses::Tcp6(a) => Some(named_v6(a)),
        ppp::v1::Addresses::Unknown => None,
    }
}

fn v2_client(addresses: &ppp::v2::Addresses) -> Option<Named> {
    match addresses {
        ppp::v2::Addresses::IPv4(a) => Some(named_v4(a)),
        ppp::v2::Addresses::IPv6(a) => Some(named_v6(a)),
        _ => None,
    }
}

fn named_v4(a: &ppp::v2::IPv4) -> Named {
    (
        (a.source_address, a.source_port).into(),
        (a.destination_address, a.destination_port).into(),
    )
}

fn named_v6(a: &ppp::v2::IPv6) -> Named {
    (
        (a.source_address, a.source_port).into(),
        (a.destination_address, a.destination_port).into(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::http::tests::Trickle;

    fn read(bytes: Vec<u8>) -> Result<(Option<Named>, Vec<u8>), String> {
        crate::rt::block_on(read_proxy_header(&mut Trickle(bytes.into())))
    }

    #[test]
    fn a_header_split_byte_by_byte_is_read_whole_and_the_payload_kept() {
        let (client, local): (SocketAddr, SocketAddr) = (
            "[2001:db8::7]:40000".parse().unwrap(),
            "[2001:db8::1]:443".parse().unwrap(),
        );
        for version in [ProxyVersion::V1, ProxyVersion::V2] {
            let mut bytes = proxy_header(version, client, local);
            bytes.extend_from_slice(b"GET / HTTP/1.1");
            // Byte by byte: the header whole, and nothing read past it.
            let mut trickle = Trickle(bytes.clone().into());
            let got = crate::rt::block_on(read_proxy_header(&mut trickle));
            assert_eq!(got, Ok((Some((client, local)), Vec::new())), "{version:?}");
            assert_eq!(trickle.0.len(), 14, "{version:?}: the payload waits in the stream");
            // In one segment with the payload: the payload is kept.
            let mut segment = futures::io::Cursor::new(bytes);
            let got = crate::rt::block_on(read_proxy_header(&mut segment));
            assert_eq!(
                got,
                Ok((Some((client, local)), b"GET / HTTP/1.1".to_vec())),
                "{version:?}"
            );
        }
        let local_cmd = ppp::v2::Builder::with_addresses(
            ppp::v2::Version::Two | ppp::v2::Command::Local,
            ppp::v2::Protocol::Stream,
            ppp::v2::Addresses::Unspecified,
        );
        assert_eq!(
            read(local_cmd.build().unwrap()),
            Ok((None, Vec::new())),
            "LOCAL: the peer stands"
        );
        let tlvs = ppp::v2::Builder::with_addresses(
            ppp::v2::Version::Two | ppp::v2::Command::Proxy,
            ppp::v2::Protocol::Stream,
            (client, local),
        )
        .write_tlv(0xE0, &[7u8; 300])
        .unwrap();
        assert_eq!(
            read(tlvs.build().unwrap()).unwrap().0,
            Some((client, local)),
            "TLVs over 256 bytes"
        );
        assert!(
            read(b"GET / HTTP/1.1\r\n\r\n".to_vec()).is_err(),
            "no header: refused, no guessing"
        );
        assert!(read(b"PROXY TCP4 1.2.3.4".to_vec()).is_err(), "truncated: refused");
    }

    #[test]
    fn headers_carry_the_real_addresses_and_parse_back() {
        let (client, local) = ("198.51.100.7:40000".parse().unwrap(), "192.0.2.1:443".parse().unwrap());
        let v1 = proxy_header(ProxyVersion::V1, client, local);
        assert_eq!(v1, b"PROXY TCP4 198.51.100.7 192.0.2.1 40000 443\r\n");
        let v2 = proxy_header(ProxyVersion::V2, client, local);
        let parsed = ppp::v2::Header::try_from(v2.as_slice()).expect("a valid v2 header");
        assert_eq!(parsed.addresses, ppp::v2::Addresses::from((client, local)));
        let mapped: SocketAddr = "[::ffff:198.51.100.7]:40000".parse().unwrap();
        assert_eq!(proxy_header(ProxyVersion::V1, mapped, local), v1, "IPv4-mapped is IPv4");
        let mixed = proxy_header(ProxyVersion::V1, "[2001:db8::1]:1".parse().unwrap(), local);
        assert_eq!(mixed, b"PROXY UNKNOWN\r\n");
    }

    /// Gives its segments one per read (a segment larger than the read's buffer in parts).
    struct Segments(std::collections::VecDeque<Vec<u8>>);

    impl futures::io::AsyncRead for Segments {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &mut [u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            let Some(mut segment) = self.0.pop_front() else {
                return std::task::Poll::Ready(Ok(0));
            };
            let n = segment.len().min(buf.len());
            buf[..n].copy_from_slice(&segment[..n]);
            if n < segment.len() {
                self.0.push_front(segment.split_off(n));
            }
            std::task::Poll::Ready(Ok(n))
        }
    }

    #[test]
    fn a_header_and_its_payload_split_at_every_offset_give_the_same_client_and_bytes() {
        let (v4, v6): (Named, Named) = (
            ("198.51.100.7:40000".parse().unwrap(), "192.0.2.1:443".parse().unwrap()),
            (
                "[2001:db8::7]:40000".parse().unwrap(),
                "[2001:db8::1]:443".parse().unwrap(),
            ),
        );
        let with_tlvs = ppp::v2::Builder::with_addresses(
            ppp::v2::Version::Two | ppp::v2::Command::Proxy,
            ppp::v2::Protocol::Stream,
            v4,
        )
        .write_tlv(0x01, b"h2")
        .unwrap()
        .write_tlv(0xE0, &[9u8; 600])
        .unwrap()
        .build()
        .unwrap();
        let cases: Vec<(Vec<u8>, Option<Named>)> = vec![
            (proxy_header(ProxyVersion::V1, v4.0, v4.1), Some(v4)),
            (proxy_header(ProxyVersion::V1, v6.0, v6.1), Some(v6)),
            (proxy_header(ProxyVersion::V2, v6.0, v6.1), Some(v6)),
            (with_tlvs, Some(v4)),
            (local_header(ProxyVersion::V2), None),
            (b"PROXY UNKNOWN\r\n".to_vec(), None),
            // What follows UNKNOWN up to the CRLF is ignored, however many fields it has.
            (
                b"PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535 and more\r\n".to_vec(),
                None,
            ),
        ];
        let payload: Vec<u8> = (0..=255u8).cycle().take(700).collect();
        for (header, named) in cases {
            let bytes = [header.clone(), payload.clone()].concat();
            for split in 1..bytes.len() {
                let mut stream = Segments([bytes[..split].to_vec(), bytes[split..].to_vec()].into());
                let got = crate::rt::block_on(read_proxy_header(&mut stream));
                let (client, mut rest) = got.unwrap_or_else(|e| panic!("split at {split}: {e}"));
                assert_eq!(
                    client,
                    named,
                    "split at {split} of {:?}",
                    String::from_utf8_lossy(&header)
                );
                rest.extend(stream.0.into_iter().flatten());
                assert_eq!(rest, payload, "split at {split}: the payload, byte for byte");
            }
            let mut trickle = crate::http::tests::Trickle(bytes.into());
            let (client, mut rest) = crate::rt::block_on(read_proxy_header(&mut trickle)).unwrap();
            rest.extend(trickle.0);
            assert_eq!((client, rest), (named, payload.clone()), "byte by byte");
        }
        assert!(
            read(b"PROXY UNKNOWNX\r\n".to_vec()).is_err(),
            "UNKNOWN is a word of its own"
        );
    }

    /// A ClientHello handshake message with `extensions` ((type, body) each, in order).
    fn hello_message(extensions: &[(u16, Vec<u8>)]) -> Vec<u8> {
        let mut ext = Vec::new();
        for (kind, body) in extensions {
            ext.extend_from_slice(&kind.to_be_bytes());
            ext.extend_from_slice(&(body.len() as u16).to_be_bytes());
            ext.extend_from_slice(body);
        }
        let mut body = vec![0x03, 0x03];
        body.extend_from_slice(&[7u8; 32]);
        body.push(0);
        body.extend_from_slice(&[0x00, 0x02, 0x13, 0x01, 0x01, 0x00]);
        body.extend_from_slice(&(ext.len() as u16).to_be_bytes());
        body.extend_from_slice(&ext);
        let len = body.len() as u32;
        let mut message = vec![0x01, (len >> 16) as u8, (len >> 8) as u8, len as u8];
        message.extend_from_slice(&body);
        message
    }

    fn sni(name: &[u8]) -> (u16, Vec<u8>) {
        let mut entry = vec![0u8];
        entry.extend_from_slice(&(name.len() as u16).to_be_bytes());
        entry.extend_from_slice(name);
        let mut body = (entry.len() as u16).to_be_bytes().to_vec();
        body.extend_from_slice(&entry);
        (0, body)
    }

    /// `message` in records of at most `per` bytes each, with `version` on every record.
    fn records(message: &[u8], per: usize, version: [u8; 2]) -> Vec<u8> {
        let mut out = Vec::new();
        for part in message.chunks(per) {
            out.extend_from_slice(&[0x16, version[0], version[1]]);
            out.extend_from_slice(&(part.len() as u16).to_be_bytes());
            out.extend_from_slice(part);
        }
        out
    }

    fn hello(bytes: &[u8]) -> Result<Option<String>, String> {
        let mut trickle = futures::io::Cursor::new(bytes.to_vec());
        crate::rt::block_on(read_client_hello(&mut trickle)).map(|(name, read)| {
            assert_eq!(read, bytes, "every byte read is kept for the backend");
            name
        })
    }

    #[test]
    fn a_clienthello_is_read_up_to_the_largest_record_and_across_records() {
        let name = sni(b"A.Example");
        // One record with a body of exactly 2^14 bytes (a padding extension fills it).
        let bare = hello_message(std::slice::from_ref(&name)).len();
        let padding = (21u16, vec![0u8; RECORD_MAX - bare - 4]);
        let full = hello_message(&[name.clone(), padding]);
        assert_eq!(full.len(), RECORD_MAX);
        assert_eq!(hello(&records(&full, RECORD_MAX, [3, 1])), Ok(Some("a.example".into())));
        // Split over several records, and under a record version nobody uses (ignored).
        let message = hello_message(&[(0x1234, vec![1, 2, 3]), name.clone()]);
        assert_eq!(hello(&records(&message, 7, [0xfe, 0xff])), Ok(Some("a.example".into())));
        let mut trickle = crate::http::tests::Trickle(records(&message, 7, [3, 3]).into());
        let got = crate::rt::block_on(read_client_hello(&mut trickle)).map(|(n, _)| n);
        assert_eq!(got, Ok(Some("a.example".into())), "byte by byte, across records");
        // An extension relayd does not read is ignored whatever it holds.
        let odd = hello_message(&[(0xfe0d, vec![0xff; 5]), (43, vec![9]), name.clone()]);
        assert_eq!(hello(&records(&odd, 512, [3, 1])), Ok(Some("a.example".into())));
        // No server_name: no name.
        assert_eq!(hello(&records(&hello_message(&[]), 512, [3, 1])), Ok(None));
    }

    #[test]
    fn what_is_no_clienthello_is_refused_by_what_it_is() {
        let good = hello_message(&[sni(b"a.example")]);
        let mut big = records(&good, 512, [3, 1]);
        big[3..5].copy_from_slice(&((RECORD_MAX + 1) as u16).to_be_bytes());
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (b"GET / HTTP/1.1\r\n\r\n".to_vec(), "not a TLS handshake"),
            (big, "2^14 at most"),
            (
                records(&[&[2u8][..], &good[1..]].concat(), 512, [3, 1]),
                "no ClientHello",
            ),
            (
                records(&hello_message(&[sni(b"a.example.")]), 512, [3, 1]),
                "not a host name",
            ),
            (records(&hello_message(&[sni(b"a b")]), 512, [3, 1]), "not a host name"),
            (
                records(&hello_message(&[(0, vec![0, 9, 0])]), 512, [3, 1]),
                "malformed server_name",
            ),
        ];
        for (bytes, want) in cases {
            let got = hello(&bytes);
            assert!(got.as_ref().is_err_and(|e| e.contains(want)), "{want}: {got:?}");
        }
        let mut truncated = records(&good, 512, [3, 1]);
        truncated.truncate(truncated.len() - 3);
        let mut cursor = futures::io::Cursor::new(truncated);
        let got = crate::rt::block_on(read_client_hello(&mut cursor));
        assert!(got.is_err_and(|e| e.contains("closed before")));
    }
}
