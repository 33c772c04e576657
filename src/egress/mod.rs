//! What the kernel says of each egress: its interface gone, admin-down or without carrier, its
//! source address no longer on the host, no route leaving by it. A watcher task reads the
//! kernel's link, address and route tables over rtnetlink at start and again after every
//! change the kernel announces, and tells the Dialer each egress's verdict when it changes, so
//! an egress is failed over the moment its link goes, without waiting for dials to fail.

mod netlink;

use std::net::IpAddr;

use crate::config::{Egress, EgressId};
use crate::dialer::DialerHandle;
use crate::shutdown::Signal;

/// The parts of the kernel's tables an egress is judged by.
#[derive(Debug, Default, Clone)]
pub(crate) struct Kernel {
    pub links: Vec<Link>,
    pub addrs: Vec<Addr>,
    /// The interface index of every unicast route's way out.
    pub routes: Vec<u32>,
}

#[derive(Debug, Clone)]
pub(crate) struct Link {
    pub index: u32,
    pub name: String,
    /// Administratively up (IFF_UP).
    pub up: bool,
    /// The lower layer is up: a carrier, a peer (IFF_LOWER_UP).
    pub carrier: bool,
    /// A loopback device (IFF_LOOPBACK): the kernel holds every address of its prefixes local.
    pub loopback: bool,
}

#[derive(Debug, Clone)]
pub(crate) struct Addr {
    pub index: u32,
    pub ip: IpAddr,
    pub prefix: u8,
}

impl Addr {
    /// True when `ip` is this address, or within its prefix on a loopback device (where
    /// 127.0.0.1/8 makes 127.0.0.2 as much the host's own as 127.0.0.1).
    fn holds(&self, ip: IpAddr, kernel: &Kernel) -> bool {
        let on_loopback = || (kernel.links.iter()).any(|l| l.index == self.index && l.loopback);
        self.ip == ip || (on_loopback() && ipnet::IpNet::new(self.ip, self.prefix).is_ok_and(|net| net.contains(&ip)))
    }
}

/// Why the kernel's state leaves `egress` unusable; `None` while it is usable.
pub(crate) fn judge(egress: &Egress, kernel: &Kernel) -> Option<String> {
    let link_down = |link: &Link| match (link.up, link.carrier) {
        (false, _) => Some(format!("interface {} is admin-down", link.name)),
        (true, false) => Some(format!("carrier lost on {}", link.name)),
        (true, true) => None,
    };
    if let Some(device) = &egress.device {
        let Some(link) = kernel.links.iter().find(|l| l.name == *device) else {
            return Some(format!("interface {device} is gone"));
        };
        if let Some(why) = link_down(link) {
            return Some(why);
        }
        if !kernel.routes.contains(&link.index) {
            return Some(format!("no route leaves by {device}"));
        }
    }
    if let Some(source) = egress.source {
        let Some(addr) = kernel.addrs.iter().find(|a| a.holds(source, kernel)) else {
            return Some(format!("source {source} is no longer on the host"));
        };
        if let Some(why) = kernel.links.iter().find(|l| l.index == addr.index).and_then(link_down) {
            return Some(why);
        }
    }
    None
}

/// Watches the kernel for `egress` (those with a device or a source: the others have nothing
/// to judge) until `stop`, telling `dialer` every change of verdict. Without rtnetlink the
/// relay goes on, judging egresses by their dials alone.
pub(crate) async fn watch(egress: Vec<(EgressId, Egress)>, dialer: DialerHandle, stop: Signal) {
    let mut netlink = match netlink::Netlink::open() {
        Ok(netlink) => netlink,
        Err(e) => {
            log::warn!(err:% = e; "cannot watch the kernel's link state: egresses are judged by their dials only");
            return;
        }
    };
    let mut told: Vec<Option<String>> = vec![None; egress.len()];
    loop {
        match stop.unless(netlink.snapshot()).await {
            None => break,
            Some(Ok(kernel)) => {
                for ((id, e), told) in egress.iter().zip(&mut told) {
                    let verdict = judge(e, &kernel);
                    if verdict != *told {
                        if dialer.kernel(*id, verdict.clone()).await.is_err() {
                            return;
                        }
                        *told = verdict;
                    }
                }
            }
            Some(Err(e)) => log::warn!(err:% = e; "cannot read the kernel's link state"),
        }
        match stop.unless(netlink.changed()).await {
            None => break,
            Some(Ok(())) => {}
            Some(Err(e)) => {
                log::warn!(err:% = e; "stopped watching the kernel's link state");
                break;
            }
        }
    }
    log::debug!("egress watcher stopped");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SocketOptions;

    fn egress(device: Option<&str>, source: Option<&str>) -> Egress {
        Egress {
            name: "e".into(),
            device: device.map(str::to_string),
            source: source.map(|s| s.parse().unwrap()),
            options: SocketOptions::default(),
            via_proxy: None,
        }
    }

    fn kernel() -> Kernel {
        Kernel {
            links: vec![
                Link {
                    index: 1,
                    name: "lo".into(),
                    up: true,
                    carrier: true,
                    loopback: true,
                },
                Link {
                    index: 2,
                    name: "up1".into(),
                    up: true,
                    carrier: true,
                    loopback: false,
                },
            ],
            addrs: vec![
                Addr {
                    index: 1,
                    ip: "127.0.0.1".parse().unwrap(),
                    prefix: 8,
                },
                Addr {
                    index: 2,
                    ip: "198.18.1.1".parse().unwrap(),
                    prefix: 24,
                },
            ],
            routes: vec![2],
        }
    }

    #[test]
    fn an_egress_is_judged_by_its_link_its_routes_and_its_source() {
        let (dev, src) = (egress(Some("up1"), None), egress(None, Some("198.18.1.1")));
        let k = kernel();
        assert_eq!(judge(&dev, &k), None);
        assert_eq!(judge(&src, &k), None);
        assert_eq!(judge(&egress(None, None), &Kernel::default()), None, "nothing to judge");

        let mut no_carrier = k.clone();
        no_carrier.links[1].carrier = false;
        assert_eq!(judge(&dev, &no_carrier).as_deref(), Some("carrier lost on up1"));
        assert_eq!(
            judge(&src, &no_carrier).as_deref(),
            Some("carrier lost on up1"),
            "the source's link counts too"
        );
        let mut admin_down = k.clone();
        admin_down.links[1].up = false;
        assert_eq!(judge(&dev, &admin_down).as_deref(), Some("interface up1 is admin-down"));
        let mut gone = k.clone();
        gone.links.pop();
        assert_eq!(judge(&dev, &gone).as_deref(), Some("interface up1 is gone"));
        let mut no_route = k.clone();
        no_route.routes.clear();
        assert_eq!(judge(&dev, &no_route).as_deref(), Some("no route leaves by up1"));
        // On a loopback device the prefix is the host's; elsewhere only the address is.
        assert_eq!(judge(&egress(None, Some("127.0.0.2")), &k), None);
        assert_eq!(
            judge(&egress(None, Some("198.18.1.2")), &k).as_deref(),
            Some("source 198.18.1.2 is no longer on the host")
        );
        let mut no_addr = k.clone();
        no_addr.addrs.clear();
        assert_eq!(
            judge(&src, &no_addr).as_deref(),
            Some("source 198.18.1.1 is no longer on the host")
        );
    }
}
