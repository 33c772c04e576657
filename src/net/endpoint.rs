//! A route's listening UDP socket. Bound to a wildcard address (`0.0.0.0`, `[::]`), it learns
//! each datagram's destination (IP_PKTINFO / IPV6_PKTINFO) and sends the reply from that same
//! address, so a client on a multi-homed host hears back from the address it wrote to; the
//! kernel's own choice of source could be another of the host's addresses, which a connected
//! client would drop.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;

use socket2::{Domain, SockAddr, Socket, Type};

use crate::rt::{self, Async};

/// What a UDP listener asks for as its receive buffer.
const RECV_BUFFER: usize = 4 << 20;

/// Room for one IPv4 or IPv6 pktinfo control message.
const CONTROL: usize = 64;

pub(crate) struct Endpoint {
    socket: Async<UdpSocket>,
    /// Bound to a wildcard address: destinations are read and replies sent from them.
    pktinfo: bool,
}

/// Control-message buffer with the alignment cmsghdr needs.
#[repr(C, align(8))]
struct Control([u8; CONTROL]);

impl Endpoint {
    /// A listening UDP socket; `shared`: one of a route's group (SO_REUSEPORT).
    pub fn bind(addr: SocketAddr, device: Option<&str>, shared: bool) -> io::Result<Endpoint> {
        let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, None)?;
        socket.set_reuse_port(shared)?;
        if let Some(device) = device {
            socket.bind_device(Some(device.as_bytes()))?;
        }
        let pktinfo = addr.ip().is_unspecified();
        if pktinfo {
            let (level, name) = match addr {
                SocketAddr::V4(_) => (libc::IPPROTO_IP, libc::IP_PKTINFO),
                SocketAddr::V6(_) => (libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO),
            };
            super::set_flag(&socket, level, name)?;
        }
        // Every client of the route sends into this one socket: a burst while the listener
        // waits for a core would overflow the default buffer (about 200 small datagrams) and
        // lose datagrams. The kernel caps the size at net.core.rmem_max; less is no error.
        let _ = socket.set_recv_buffer_size(RECV_BUFFER);
        socket.bind(&addr.into())?;
        Ok(Endpoint {
            socket: Async::new(UdpSocket::from(socket))?,
            pktinfo,
        })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket.get_ref().local_addr()
    }

    /// A second descriptor of the same socket, and whether it reads destinations: what
    /// [`Endpoint::from_socket`] makes an endpoint of again.
    pub fn duplicate(&self) -> io::Result<(UdpSocket, bool)> {
        Ok((self.socket.get_ref().try_clone()?, self.pktinfo))
    }

    pub fn from_socket(socket: UdpSocket, pktinfo: bool) -> io::Result<Endpoint> {
        Ok(Endpoint {
            socket: Async::new(socket)?,
            pktinfo,
        })
    }

    /// The next datagram: its length, sender and (on a wildcard socket) destination address.
    pub async fn recv(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr, Option<IpAddr>)> {
        if self.pktinfo {
            self.socket.read_with(|s| recv_pktinfo(s, buf)).await
        } else {
            let (n, peer) = self.socket.recv_from(buf).await?;
            Ok((n, peer, None))
        }
    }

    /// Sends `buf` to `to` from `from` (as [`Endpoint::recv`] reported it) without waiting:
    /// `Ok(false)` when the socket buffer is full and the datagram was dropped, as UDP may.
    pub fn try_send(&self, buf: &[u8], to: SocketAddr, from: Option<IpAddr>) -> io::Result<bool> {
        let sent = match from {
            Some(from) if self.pktinfo => send_pktinfo(self.socket.get_ref(), buf, to, from),
            _ => self.socket.get_ref().send_to(buf, to),
        };
        match sent {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(false),
            Err(e) => Err(e),
        }
    }
}

fn recv_pktinfo(socket: &UdpSocket, buf: &mut [u8]) -> io::Result<(usize, SocketAddr, Option<IpAddr>)> {
    let mut control = Control([0; CONTROL]);
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain data; every pointer set in it outlives the recvmsg call, and
    // recvmsg writes at most `len` bytes of address into the storage try_init provides.
    let ((n, local), peer) = unsafe {
        SockAddr::try_init(|storage, len| {
            let mut msg: libc::msghdr = zeroed();
            msg.msg_name = storage.cast();
            msg.msg_namelen = *len;
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = control.0.as_mut_ptr().cast();
            msg.msg_controllen = CONTROL as _;
            let n = rt::check(libc::recvmsg(socket.as_raw_fd(), &mut msg, 0))?;
            *len = msg.msg_namelen;
            Ok((n as usize, destination(&msg)))
        })?
    };
    let peer = peer
        .as_socket()
        .ok_or_else(|| io::Error::other("datagram from a non-IP address"))?;
    Ok((n, peer, local))
}

/// The destination address in a received message's pktinfo, if any.
fn destination(msg: &libc::msghdr) -> Option<IpAddr> {
    // SAFETY: walking the control messages recvmsg wrote, with the libc macros, reading each
    // payload unaligned at its own length.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(msg);
        while !cmsg.is_null() {
            let data = libc::CMSG_DATA(cmsg);
            match ((*cmsg).cmsg_level, (*cmsg).cmsg_type) {
                (libc::IPPROTO_IP, libc::IP_PKTINFO) => {
                    let info = std::ptr::read_unaligned(data as *const libc::in_pktinfo);
                    return Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(info.ipi_addr.s_addr))));
                }
                (libc::IPPROTO_IPV6, libc::IPV6_PKTINFO) => {
                    let info = std::ptr::read_unaligned(data as *const libc::in6_pktinfo);
                    return Some(IpAddr::V6(Ipv6Addr::from(info.ipi6_addr.s6_addr)));
                }
                _ => cmsg = libc::CMSG_NXTHDR(msg, cmsg),
            }
        }
    }
    None
}

fn send_pktinfo(socket: &UdpSocket, buf: &[u8], to: SocketAddr, from: IpAddr) -> io::Result<usize> {
    let to = SockAddr::from(to);
    let mut control = Control([0; CONTROL]);
    let mut iov = libc::iovec {
        iov_base: buf.as_ptr() as *mut _,
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain data; every pointer set below outlives the sendmsg call.
    let mut msg: libc::msghdr = unsafe { zeroed() };
    msg.msg_name = to.as_ptr() as *mut _;
    msg.msg_namelen = to.len();
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.0.as_mut_ptr().cast();
    // SAFETY: one control message, sized by CMSG_SPACE/CMSG_LEN for its payload, written
    // unaligned into a buffer CONTROL bytes long (larger than either CMSG_SPACE).
    unsafe {
        let (level, kind, len) = match from {
            IpAddr::V4(_) => (libc::IPPROTO_IP, libc::IP_PKTINFO, size_of::<libc::in_pktinfo>()),
            IpAddr::V6(_) => (libc::IPPROTO_IPV6, libc::IPV6_PKTINFO, size_of::<libc::in6_pktinfo>()),
        };
        msg.msg_controllen = libc::CMSG_SPACE(len as u32) as _;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = level;
        (*cmsg).cmsg_type = kind;
        (*cmsg).cmsg_len = libc::CMSG_LEN(len as u32) as _;
        let data = libc::CMSG_DATA(cmsg);
        match from {
            IpAddr::V4(ip) => {
                let info = libc::in_pktinfo {
                    ipi_ifindex: 0,
                    ipi_spec_dst: libc::in_addr {
                        s_addr: u32::from(ip).to_be(),
                    },
                    ipi_addr: libc::in_addr { s_addr: 0 },
                };
                std::ptr::write_unaligned(data as *mut libc::in_pktinfo, info);
            }
            IpAddr::V6(ip) => {
                let info = libc::in6_pktinfo {
                    ipi6_addr: libc::in6_addr { s6_addr: ip.octets() },
                    ipi6_ifindex: 0,
                };
                std::ptr::write_unaligned(data as *mut libc::in6_pktinfo, info);
            }
        }
    }
    // SAFETY: a valid fd and a msghdr whose buffers are all live and sized as declared.
    let n = unsafe { libc::sendmsg(socket.as_raw_fd(), &msg, libc::MSG_DONTWAIT) };
    rt::check(n).map(|n| n as usize)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rt;

    /// A client connected to `to` sends `ping`; the endpoint answers as a flow would. The
    /// client's socket only takes datagrams from `to`, so the reply proves its source.
    /// Returns what the endpoint learnt: (sender, destination).
    fn exchange(endpoint: &Endpoint, client_bind: &str, to: SocketAddr) -> (SocketAddr, Option<IpAddr>) {
        let client = UdpSocket::bind(client_bind).unwrap();
        client.connect(to).unwrap();
        client
            .set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        client.send(b"ping").unwrap();
        let mut buf = [0u8; 16];
        let (n, peer, local) = rt::block_on(endpoint.recv(&mut buf)).unwrap();
        assert_eq!(&buf[..n], b"ping");
        assert_eq!(peer.port(), client.local_addr().unwrap().port());
        assert!(endpoint.try_send(b"pong", peer, local).unwrap());
        let n = client
            .recv(&mut buf)
            .expect("the reply comes from the address we wrote to");
        assert_eq!(&buf[..n], b"pong");
        (peer, local)
    }

    #[test]
    fn a_wildcard_endpoint_answers_from_the_address_the_client_wrote_to() {
        let endpoint = Endpoint::bind("0.0.0.0:0".parse().unwrap(), None, false).unwrap();
        let port = endpoint.local_addr().unwrap().port();
        // 127.0.0.2 is ours too, but the kernel would answer a wildcard socket from 127.0.0.1.
        let to = SocketAddr::new("127.0.0.2".parse().unwrap(), port);
        let (_, local) = exchange(&endpoint, "127.0.0.1:0", to);
        assert_eq!(local, Some(to.ip()));
    }

    #[test]
    fn a_dual_stack_wildcard_endpoint_answers_v6_and_v4_clients_from_their_destination() {
        let endpoint = match Endpoint::bind("[::]:0".parse().unwrap(), None, false) {
            Ok(endpoint) => endpoint,
            Err(e) => return eprintln!("SKIPPED: no IPv6 on this host: {e}"),
        };
        let port = endpoint.local_addr().unwrap().port();
        exchange(&endpoint, "[::1]:0", SocketAddr::new("::1".parse().unwrap(), port));
        // A v4 client reaches the dual-stack socket as ::ffff:127.0.0.2.
        let (_, local) = exchange(
            &endpoint,
            "127.0.0.1:0",
            SocketAddr::new("127.0.0.2".parse().unwrap(), port),
        );
        assert_eq!(local, Some("::ffff:127.0.0.2".parse().unwrap()));
    }

    #[test]
    fn a_specific_endpoint_needs_no_pktinfo() {
        let endpoint = Endpoint::bind("127.0.0.1:0".parse().unwrap(), None, false).unwrap();
        let (_, local) = exchange(&endpoint, "127.0.0.1:0", endpoint.local_addr().unwrap());
        assert_eq!(local, None);
    }
}
