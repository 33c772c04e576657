//! The kernel's link, address and route tables over rtnetlink: one socket that hears every
//! change, one that asks for the tables. Parsing is netlink-packet-route's.

use std::io;
use std::net::IpAddr;

use netlink_packet_core::{NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteMessage, RouteType};
use netlink_sys::protocols::NETLINK_ROUTE;
use netlink_sys::{Socket, SocketAddr};

use super::{Addr, Kernel, Link};
use crate::rt::Async;

/// Large enough for any one datagram of a dump (the kernel fills up to a page or 32 KiB).
const DATAGRAM: usize = 64 * 1024;

/// Routes in this table are the host's own addresses, not ways out.
const LOCAL_TABLE: u32 = 255;

pub(super) struct Netlink {
    events: Async<Socket>,
    requests: Async<Socket>,
    seq: u32,
    buf: Vec<u8>,
}

impl Netlink {
    pub fn open() -> io::Result<Self> {
        let groups = libc::RTMGRP_LINK
            | libc::RTMGRP_IPV4_IFADDR
            | libc::RTMGRP_IPV6_IFADDR
            | libc::RTMGRP_IPV4_ROUTE
            | libc::RTMGRP_IPV6_ROUTE;
        let mut events = Socket::new(NETLINK_ROUTE)?;
        events.bind(&SocketAddr::new(0, groups as u32))?;
        events.set_non_blocking(true)?;
        let mut requests = Socket::new(NETLINK_ROUTE)?;
        requests.bind_auto()?;
        requests.connect(&SocketAddr::new(0, 0))?;
        requests.set_non_blocking(true)?;
        Ok(Netlink {
            events: Async::new_nonblocking(events),
            requests: Async::new_nonblocking(requests),
            seq: 0,
            buf: vec![0; DATAGRAM],
        })
    }

    /// Returns once the kernel has announced a change, with every announcement queued so far
    /// read: one snapshot answers them all. A lost announcement (the queue overflowed) is a
    /// change too.
    pub async fn changed(&mut self) -> io::Result<()> {
        let buf = &mut self.buf;
        let overflow = |e: &io::Error| e.raw_os_error() == Some(libc::ENOBUFS);
        match self.events.read_with(|s| s.recv(&mut &mut buf[..], 0)).await {
            Err(e) if !overflow(&e) => return Err(e),
            _ => {}
        }
        loop {
            match self.events.get_ref().recv(&mut &mut buf[..], libc::MSG_DONTWAIT) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if overflow(&e) => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// The links, addresses and routes as they are now.
    pub async fn snapshot(&mut self) -> io::Result<Kernel> {
        let mut kernel = Kernel::default();
        for message in self.dump(RouteNetlinkMessage::GetLink(LinkMessage::default())).await? {
            if let RouteNetlinkMessage::NewLink(link) = message {
                kernel.links.push(link_of(&link));
            }
        }
        for message in self
            .dump(RouteNetlinkMessage::GetAddress(AddressMessage::default()))
            .await?
        {
            if let RouteNetlinkMessage::NewAddress(addr) = message {
                kernel.addrs.extend(addr_of(&addr));
            }
        }
        for message in self
            .dump(RouteNetlinkMessage::GetRoute(RouteMessage::default()))
            .await?
        {
            if let RouteNetlinkMessage::NewRoute(route) = message {
                kernel.routes.extend(route_interfaces(&route));
            }
        }
        Ok(kernel)
    }

    async fn dump(&mut self, request: RouteNetlinkMessage) -> io::Result<Vec<RouteNetlinkMessage>> {
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_DUMP;
        header.sequence_number = self.seq;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::from(request));
        packet.finalize();
        let mut out = vec![0; packet.buffer_len()];
        packet.serialize(&mut out);
        self.requests.write_with(|s| s.send(&out, 0)).await?;
        let mut messages = Vec::new();
        loop {
            let buf = &mut self.buf;
            let n = self.requests.read_with(|s| s.recv(&mut &mut buf[..], 0)).await?;
            let mut at = 0;
            while at < n {
                let message = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&buf[at..n])
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
                let len = message.header.length as usize;
                if len == 0 {
                    break;
                }
                at += len.next_multiple_of(4);
                if message.header.sequence_number != self.seq {
                    continue;
                }
                match message.payload {
                    NetlinkPayload::Done(_) => return Ok(messages),
                    NetlinkPayload::Error(e) => {
                        let code = e.code.map_or(0, |c| -c.get());
                        return Err(io::Error::from_raw_os_error(code));
                    }
                    NetlinkPayload::InnerMessage(inner) => messages.push(inner),
                    _ => {}
                }
            }
        }
    }
}

fn link_of(link: &LinkMessage) -> Link {
    let name = (link.attributes.iter())
        .find_map(|a| match a {
            LinkAttribute::IfName(name) => Some(name.clone()),
            _ => None,
        })
        .unwrap_or_default();
    let flags = link.header.flags;
    Link {
        index: link.header.index,
        name,
        up: flags.contains(LinkFlags::Up),
        carrier: flags.contains(LinkFlags::LowerUp),
        loopback: flags.contains(LinkFlags::Loopback),
    }
}

fn addr_of(addr: &AddressMessage) -> Option<Addr> {
    // IFA_LOCAL is the host's own address on point-to-point links; IFA_ADDRESS elsewhere.
    let mut found = None;
    for attribute in &addr.attributes {
        match attribute {
            AddressAttribute::Local(ip) => found = Some(*ip),
            AddressAttribute::Address(ip) if found.is_none() => found = Some(*ip),
            _ => {}
        }
    }
    found.map(|ip: IpAddr| Addr {
        index: addr.header.index,
        ip,
        prefix: addr.header.prefix_len,
    })
}

/// The interfaces a unicast route leaves by (several for a multipath route). The host's own
/// addresses and IPv6 link-local prefixes (every interface has one) are no way out.
fn route_interfaces(route: &RouteMessage) -> Vec<u32> {
    let mut table = u32::from(route.header.table);
    let mut link_local = false;
    let mut out = Vec::new();
    for attribute in &route.attributes {
        match attribute {
            RouteAttribute::Table(t) => table = *t,
            RouteAttribute::Oif(index) => out.push(*index),
            RouteAttribute::MultiPath(hops) => out.extend(hops.iter().map(|h| h.interface_index)),
            RouteAttribute::Destination(RouteAddress::Inet6(ip)) => link_local = ip.is_unicast_link_local(),
            _ => {}
        }
    }
    if table == LOCAL_TABLE || link_local || route.header.kind != RouteType::Unicast {
        out.clear();
    }
    out
}
