//! Who a CONNECT route may tunnel to: ports, host names, and the addresses those names resolve
//! to. Deny by default: only listed ports, and never the host's own networks (loopback,
//! link-local, private ranges) unless the route allows them by CIDR. Addresses are checked
//! after resolution, on what is actually dialed, so a name pointing inside is refused too.

use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;

/// Ranges no CONNECT route reaches unless its `allow_cidrs` names them.
pub const DEFAULT_DENY: &[&str] = &[
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.168.0.0/16",
    "198.18.0.0/15",
    "224.0.0.0/4",
    "240.0.0.0/4",
    "::/128",
    "::1/128",
    "fc00::/7",
    "fe80::/10",
    "ff00::/8",
];

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

    fn matches(&self, host: &str) -> bool {
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
    Address(IpAddr),
}

impl fmt::Display for Denied {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Denied::Port(port) => write!(f, "port {port} is not in allow_ports"),
            Denied::Host(host) => write!(f, "host {host} is not in allow_hosts"),
            Denied::Address(ip) => write!(f, "address {ip} is denied (deny_cidrs, not in allow_cidrs)"),
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

    /// An address is allowed when `allow` names it or no `deny` range holds it. IPv4-mapped
    /// IPv6 addresses are judged as the IPv4 address they carry.
    pub fn check_addr(&self, ip: IpAddr) -> Result<(), Denied> {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        let within = |nets: &[IpNet]| nets.iter().any(|net| net.contains(&ip));
        if within(&self.allow) || !within(&self.deny) {
            Ok(())
        } else {
            Err(Denied::Address(ip))
        }
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
}
