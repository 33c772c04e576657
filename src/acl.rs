//! Who a CONNECT route may tunnel to: ports, host names, and the addresses those names resolve
//! to. Deny by default: only listed ports, and never the host's own networks (loopback,
//! link-local, private ranges) unless the route allows them by CIDR. Addresses are checked
//! after resolution, on what is actually dialed, so a name pointing inside is refused too.

use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;

/// Ranges no CONNECT route reaches unless its `allow_cidrs` names them: every entry of the
/// IANA IPv4 and IPv6 special-purpose registries that is not globally reachable. IPv6 forms
/// that carry an IPv4 address are also judged as that address (see [`embedded_v4`]).
pub const DEFAULT_DENY: &[&str] = &[
    // IPv4
    "0.0.0.0/8",       // this network
    "10.0.0.0/8",      // private
    "100.64.0.0/10",   // shared (CGNAT)
    "127.0.0.0/8",     // loopback
    "169.254.0.0/16",  // link-local (cloud metadata)
    "172.16.0.0/12",   // private
    "192.0.0.0/24",    // IETF protocol assignments
    "192.0.2.0/24",    // documentation (TEST-NET-1)
    "192.88.99.0/24",  // 6to4 relay anycast (deprecated)
    "192.168.0.0/16",  // private
    "198.18.0.0/15",   // benchmarking
    "198.51.100.0/24", // documentation (TEST-NET-2)
    "203.0.113.0/24",  // documentation (TEST-NET-3)
    "224.0.0.0/4",     // multicast
    "240.0.0.0/4",     // reserved, and the limited broadcast
    // IPv6
    "::/128",         // unspecified
    "::1/128",        // loopback
    "64:ff9b:1::/48", // local-use NAT64
    "100::/64",       // discard-only
    "2001::/32",      // Teredo (carries an obfuscated IPv4 address)
    "2001:2::/48",    // benchmarking
    "2001:10::/28",   // ORCHID (deprecated)
    "2001:db8::/32",  // documentation
    "3fff::/20",      // documentation
    "5f00::/16",      // segment routing SIDs
    "fc00::/7",       // unique local
    "fe80::/10",      // link-local
    "fec0::/10",      // site-local (deprecated)
    "ff00::/8",       // multicast
];

/// The IPv4 address an IPv6 one carries and is delivered to: IPv4-mapped (`::ffff:a.b.c.d`),
/// IPv4-translated (`::ffff:0:a.b.c.d`), IPv4-compatible (`::a.b.c.d`), NAT64's well-known
/// prefix (`64:ff9b::a.b.c.d`), and 6to4 (`2002:AABB:CCDD::/48`).
pub fn embedded_v4(ip: std::net::Ipv6Addr) -> Option<std::net::Ipv4Addr> {
    let o = ip.octets();
    let last = std::net::Ipv4Addr::new(o[12], o[13], o[14], o[15]);
    let head = |n: usize| &o[..n];
    match () {
        _ if head(10).iter().all(|b| *b == 0) && o[10..12] == [0xff, 0xff] => Some(last),
        // IPv4-translated (SIIT): ::ffff:0:a.b.c.d
        _ if head(8).iter().all(|b| *b == 0) && o[8..12] == [0xff, 0xff, 0, 0] => Some(last),
        _ if head(12).iter().all(|b| *b == 0) => Some(last),
        _ if o[..4] == [0x00, 0x64, 0xff, 0x9b] && o[4..12].iter().all(|b| *b == 0) => Some(last),
        _ if o[..2] == [0x20, 0x02] => Some(std::net::Ipv4Addr::new(o[2], o[3], o[4], o[5])),
        _ => None,
    }
}

/// A host name rule: exact (`example.com`) or any subdomain (`*.example.com`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostPattern {
    Exact(String),
    /// Holds the suffix with its leading dot: `.example.com`.
    Subdomains(String),
}

impl HostPattern {
    pub fn parse(text: &str) -> Option<HostPattern> {
        let text = text.trim().to_ascii_lowercase();
        let valid = |s: &str| !s.is_empty() && !s.contains(['*', '/', ' ', ':']) || s.parse::<IpAddr>().is_ok();
        match text.strip_prefix("*.") {
            Some(suffix) if valid(suffix) => Some(HostPattern::Subdomains(format!(".{suffix}"))),
            None if valid(&text) => Some(HostPattern::Exact(text)),
            _ => None,
        }
    }

    pub fn matches(&self, host: &str) -> bool {
        match self {
            HostPattern::Exact(name) => host == name,
            HostPattern::Subdomains(suffix) => host.ends_with(suffix.as_str()),
        }
    }
}

/// Why a target was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denied {
    Port(u16),
    Host(String),
    /// The address asked for, the form of it that matched (an IPv4 address an IPv6 one
    /// carries, or itself), the range it matched, and whether that range is a built-in one.
    Address {
        asked: IpAddr,
        matched: IpAddr,
        range: IpNet,
        built_in: bool,
    },
}

impl fmt::Display for Denied {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Denied::Port(port) => write!(f, "port {port} is not in allow_ports"),
            Denied::Host(host) => write!(f, "host {host} is not in allow_hosts"),
            Denied::Address {
                asked,
                matched,
                range,
                built_in,
            } => {
                let origin = if *built_in { "the built-in list" } else { "deny_cidrs" };
                write!(f, "address {asked}")?;
                if matched != asked {
                    write!(f, " (as {matched})")?;
                }
                write!(f, " is in {range} ({origin}) and not in allow_cidrs")
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acl {
    pub ports: Vec<u16>,
    /// Empty: any host name.
    pub hosts: Vec<HostPattern>,
    /// Allowed even inside a denied range.
    pub allow: Vec<IpNet>,
    /// The built-in [`DEFAULT_DENY`] ranges plus the route's own.
    pub deny: Vec<IpNet>,
}

impl Acl {
    /// `host` is lowercase, as the CONNECT parser gives it.
    pub fn check_target(&self, host: &str, port: u16) -> Result<(), Denied> {
        if !self.ports.contains(&port) {
            return Err(Denied::Port(port));
        }
        if !self.hosts.is_empty() && !self.hosts.iter().any(|p| p.matches(host)) {
            return Err(Denied::Host(host.to_string()));
        }
        Ok(())
    }

    /// An address is allowed when `allow` names it or no `deny` range holds it. An IPv6
    /// address that carries an IPv4 one ([`embedded_v4`]) is judged as both: denied when either
    /// is, unless `allow` names either.
    pub fn check_addr(&self, ip: IpAddr) -> Result<(), Denied> {
        let carried = match ip {
            IpAddr::V6(v6) => embedded_v4(v6).map(IpAddr::V4),
            IpAddr::V4(_) => None,
        };
        let forms = [Some(ip), carried];
        let hit = |nets: &[IpNet]| {
            (forms.iter().flatten())
                .find_map(|form| nets.iter().find(|net| net.contains(form)).map(|net| (*form, *net)))
        };
        if hit(&self.allow).is_some() {
            return Ok(());
        }
        match hit(&self.deny) {
            None => Ok(()),
            Some((matched, range)) => Err(Denied::Address {
                asked: ip,
                matched,
                range,
                built_in: DEFAULT_DENY
                    .iter()
                    .any(|net| net.parse::<IpNet>().is_ok_and(|n| n == range)),
            }),
        }
    }
}

/// `[::ffff:a.b.c.d]:p` as `a.b.c.d:p`: the same socket to the kernel, and the same client.
pub fn unmapped(addr: std::net::SocketAddr) -> std::net::SocketAddr {
    match addr.ip() {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map_or(addr, |v4| std::net::SocketAddr::new(IpAddr::V4(v4), addr.port())),
        IpAddr::V4(_) => addr,
    }
}

/// Who may use a route: client ranges allowed (empty: anyone) and refused (refused wins).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientAcl {
    pub allow: Vec<IpNet>,
    pub deny: Vec<IpNet>,
}

impl ClientAcl {
    /// True when `client` may use the route. An IPv4-mapped IPv6 address is judged as IPv4.
    pub fn admits(&self, client: IpAddr) -> bool {
        let ip = match client {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(client, IpAddr::V4),
            v4 => v4,
        };
        let within = |nets: &[IpNet]| nets.iter().any(|n| n.contains(&ip));
        !within(&self.deny) && (self.allow.is_empty() || within(&self.allow))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acl(hosts: &[&str], allow: &[&str]) -> Acl {
        Acl {
            ports: vec![443],
            hosts: hosts.iter().map(|h| HostPattern::parse(h).unwrap()).collect(),
            allow: allow.iter().map(|n| n.parse().unwrap()).collect(),
            deny: DEFAULT_DENY.iter().map(|n| n.parse().unwrap()).collect(),
        }
    }

    #[test]
    fn ports_and_host_patterns() {
        let a = acl(&["example.com", "*.example.org"], &[]);
        assert_eq!(a.check_target("example.com", 443), Ok(()));
        assert_eq!(a.check_target("example.com", 80), Err(Denied::Port(80)));
        assert_eq!(a.check_target("www.example.org", 443), Ok(()));
        assert_eq!(a.check_target("a.b.example.org", 443), Ok(()));
        assert!(
            a.check_target("example.org", 443).is_err(),
            "*.suffix is for subdomains only"
        );
        assert!(a.check_target("badexample.org", 443).is_err());
        assert!(a.check_target("www.example.com", 443).is_err());
        assert_eq!(acl(&[], &[]).check_target("anything.test", 443), Ok(()));
    }

    #[test]
    fn the_host_s_own_networks_are_denied_unless_allowed() {
        let a = acl(&[], &[]);
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "192.168.0.1",
            "169.254.169.254",
            "::1",
            "fd00::1",
            "::ffff:127.0.0.1",
        ] {
            assert!(a.check_addr(ip.parse().unwrap()).is_err(), "{ip} must be denied");
        }
        assert_eq!(a.check_addr("93.184.216.34".parse().unwrap()), Ok(()));
        assert_eq!(
            a.check_addr("2606:2800:220:1::1".parse().unwrap()),
            Ok(()),
            "a public IPv6"
        );
        let opened = acl(&[], &["127.0.0.0/8"]);
        assert_eq!(opened.check_addr("127.0.0.1".parse().unwrap()), Ok(()));
        assert!(opened.check_addr("10.0.0.1".parse().unwrap()).is_err());
    }

    #[test]
    fn patterns_are_checked() {
        assert_eq!(
            HostPattern::parse("*.Example.COM"),
            Some(HostPattern::Subdomains(".example.com".into()))
        );
        assert_eq!(HostPattern::parse("*"), None);
        assert_eq!(HostPattern::parse("a*b"), None);
        assert_eq!(HostPattern::parse(""), None);
    }

    #[test]
    fn every_special_purpose_range_and_every_ipv4_in_ipv6_form_is_denied() {
        let a = acl(&[], &[]);
        for ip in [
            // IPv4 addresses inside IPv6 ones: compatible, mapped, NAT64, 6to4.
            "::169.254.169.254",
            "::ffff:169.254.169.254",
            "::ffff:0:a9fe:a9fe",
            "64:ff9b::a9fe:a9fe",
            "64:ff9b::10.0.0.1",
            "2002:a9fe:a9fe::1",
            "2002:7f00:1::",
            // Not globally reachable in IPv6.
            "64:ff9b:1::8.8.8.8",
            "100::1",
            "2001::1",
            "2001:2::1",
            "2001:db8::1",
            "3fff::1",
            "fec0::1",
            "5f00::1",
            // Documentation and relay ranges in IPv4.
            "192.0.2.1",
            "198.51.100.1",
            "203.0.113.1",
            "192.88.99.1",
            "255.255.255.255",
        ] {
            assert!(a.check_addr(ip.parse().unwrap()).is_err(), "{ip} must be denied");
        }
        // Public IPv4 addresses in the same forms are public.
        for ip in ["64:ff9b::93.184.216.34", "2002:5db8:d822::1", "::ffff:93.184.216.34"] {
            assert_eq!(a.check_addr(ip.parse().unwrap()), Ok(()), "{ip}");
        }
        let opened = acl(&[], &["169.254.0.0/16"]);
        assert_eq!(
            opened.check_addr("64:ff9b::a9fe:a9fe".parse().unwrap()),
            Ok(()),
            "allowing the IPv4 range allows its IPv6 forms"
        );
    }

    #[test]
    fn client_lists_allow_deny_and_judge_mapped_addresses_as_ipv4() {
        let nets = |l: &[&str]| l.iter().map(|n| n.parse().unwrap()).collect();
        let open = ClientAcl::default();
        assert!(open.admits("203.0.113.9".parse().unwrap()), "no lists: anyone");
        let acl = ClientAcl {
            allow: nets(&["10.0.0.0/8", "2001:db8::/32"]),
            deny: nets(&["10.9.0.0/16"]),
        };
        assert!(acl.admits("10.1.2.3".parse().unwrap()));
        assert!(
            acl.admits("::ffff:10.1.2.3".parse().unwrap()),
            "mapped is judged as IPv4"
        );
        assert!(!acl.admits("10.9.0.1".parse().unwrap()), "deny wins inside allow");
        assert!(!acl.admits("::ffff:10.9.0.1".parse().unwrap()));
        assert!(!acl.admits("192.0.2.1".parse().unwrap()), "outside allow");
        assert!(acl.admits("2001:db8::7".parse().unwrap()));
    }
}
