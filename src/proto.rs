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
        if v1 && !buf.windows(2).any(|w| w == b"\r\n") && buf.len() < 108 {
            continue;
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

/// The largest ClientHello record read while looking for the server name.
const HELLO_MAX: usize = 16 << 10;

/// Reads a TLS ClientHello (its first record, bounded in size, however it is split across
/// segments) and returns the server name it asks for (SNI; `None` when it names none) and every
/// byte read, to be replayed to the backend unchanged. Anything that is not a TLS handshake is
/// an error.
pub async fn read_client_hello<S: AsyncRead + Unpin>(stream: &mut S) -> Result<(Option<String>, Vec<u8>), String> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    loop {
        if buf.first().is_some_and(|b| *b != 0x16) {
            return Err("not a TLS handshake".into());
        }
        if buf.len() >= 5 {
            let whole = 5 + usize::from(u16::from_be_bytes([buf[3], buf[4]]));
            if whole > HELLO_MAX {
                return Err("ClientHello record too large".into());
            }
            if buf.len() >= whole {
                return Ok((server_name(&buf[..whole])?, buf));
            }
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

/// The host name in a ClientHello record's server_name extension, lowercase.
fn server_name(record: &[u8]) -> Result<Option<String>, String> {
    use tls_parser::{SNIType, TlsExtension, TlsMessage, TlsMessageHandshake};
    let (_, plain) = tls_parser::parse_tls_plaintext(record).map_err(|_| "malformed TLS record")?;
    for message in &plain.msg {
        let TlsMessage::Handshake(TlsMessageHandshake::ClientHello(hello)) = message else {
            continue;
        };
        let Some(ext) = hello.ext else { return Ok(None) };
        let (_, extensions) = tls_parser::parse_tls_extensions(ext).map_err(|_| "malformed ClientHello extensions")?;
        for extension in extensions {
            if let TlsExtension::SNI(names) = extension {
                let name = names.iter().find(|(kind, _)| *kind == SNIType::HostName);
                return Ok(name.map(|(_, n)| String::from_utf8_lossy(n).to_ascii_lowercase()));
            }
        }
        return Ok(None);
    }
    Err("the first TLS record holds no ClientHello".into())
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
}
