//! Wire formats relayd writes besides HTTP CONNECT's: the PROXY protocol header of HAProxy's
//! specification, built with the `ppp` crate, so that a backend learns the real client.

use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};

/// Which PROXY protocol header a route sends its backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ProxyVersion {
    /// The text header: `PROXY TCP4 198.51.100.7 192.0.2.1 40000 443\r\n`.
    V1,
    /// The binary header.
    V2,
}

/// The header that tells a backend a TCP connection came from `client` to `local`. Addresses
/// of two families (after IPv4-mapped ones are read as IPv4) are sent as unknown, as the
/// specification says.
pub fn proxy_header(version: ProxyVersion, client: SocketAddr, local: SocketAddr) -> Vec<u8> {
    let pair = (unmapped(client), unmapped(local));
    match version {
        ProxyVersion::V1 => ppp::v1::Addresses::from(pair).to_string().into_bytes(),
        ProxyVersion::V2 => {
            let command = ppp::v2::Version::Two | ppp::v2::Command::Proxy;
            let header = ppp::v2::Builder::with_addresses(command, ppp::v2::Protocol::Stream, pair);
            header.build().expect("a header with two addresses and no TLVs fits")
        }
    }
}

fn unmapped(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map_or(addr, |v4| SocketAddr::new(IpAddr::V4(v4), addr.port())),
        IpAddr::V4(_) => addr,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
