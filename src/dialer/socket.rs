//! Socket factories: one per egress, building TCP and UDP sockets that leave by the egress's
//! device and source address with its options set. Building a socket is quick and never blocks;
//! the connect itself is the Dialer's business.

use std::io;
use std::net::{IpAddr, SocketAddr, UdpSocket};

use socket2::{Domain, Protocol, SockAddr, Socket, TcpKeepalive, Type};

use crate::config::{Egress, UpstreamProxy};
use crate::error::{BindStep, DialError};

/// Builds the outbound sockets of one egress.
#[derive(Debug, Clone)]
pub(crate) struct Factory {
    egress: Egress,
}

impl Factory {
    pub fn new(egress: Egress) -> Self {
        Factory { egress }
    }

    pub fn egress(&self) -> &Egress {
        &self.egress
    }

    pub fn name(&self) -> &str {
        &self.egress.name
    }

    /// The upstream proxy this egress goes through, if any.
    pub fn via_proxy(&self) -> Option<&UpstreamProxy> {
        self.egress.via_proxy.as_ref()
    }

    /// A non-blocking TCP socket, bound as the egress says, ready for `connect(target)`.
    pub fn tcp(&self, target: SocketAddr) -> Result<Socket, DialError> {
        let socket = self.socket(target, Type::STREAM, Protocol::TCP)?;
        self.tcp_options(&socket, target)?;
        self.bind(&socket, target, true)?;
        Ok(socket)
    }

    /// A UDP socket, bound as the egress says and connected to `target`.
    pub fn udp(&self, target: SocketAddr) -> Result<UdpSocket, DialError> {
        let socket = self.socket(target, Type::DGRAM, Protocol::UDP)?;
        self.shared_options(&socket, target)?;
        self.bind(&socket, target, false)?;
        socket
            .connect(&SockAddr::from(target))
            .map_err(|source| DialError::Connect {
                egress: self.egress.name.clone(),
                target,
                source,
            })?;
        Ok(socket.into())
    }

    fn socket(&self, target: SocketAddr, kind: Type, proto: Protocol) -> Result<Socket, DialError> {
        if let Some(source) = self.egress.source.filter(|s| s.is_ipv4() != target.is_ipv4()) {
            return Err(DialError::Family {
                egress: self.egress.name.clone(),
                source_ip: source,
                target,
            });
        }
        // Non-blocking from birth: no fcntl round trips per connection.
        let socket = Socket::new(Domain::for_address(target), kind.nonblocking(), Some(proto));
        socket.map_err(|source| self.failed(BindStep::Create, target, source))
    }

    fn tcp_options(&self, socket: &Socket, target: SocketAddr) -> Result<(), DialError> {
        let o = &self.egress.options;
        let keepalive = o
            .keepalive
            .map(|idle| socket.set_tcp_keepalive(&TcpKeepalive::new().with_time(idle)));
        let steps = [
            ("TCP_NODELAY", Some(socket.set_tcp_nodelay(o.nodelay))),
            ("SO_KEEPALIVE", keepalive),
            ("TCP_MAXSEG", o.mss.map(|mss| socket.set_tcp_mss(mss))),
        ];
        for (name, result) in steps {
            self.check(result, BindStep::Option(name), target)?;
        }
        self.shared_options(socket, target)
    }

    /// The options TCP and UDP sockets share: buffer sizes and the firewall mark.
    fn shared_options(&self, socket: &Socket, target: SocketAddr) -> Result<(), DialError> {
        let o = &self.egress.options;
        let steps = [
            ("SO_SNDBUF", o.send_buffer.map(|n| socket.set_send_buffer_size(n))),
            ("SO_RCVBUF", o.recv_buffer.map(|n| socket.set_recv_buffer_size(n))),
            ("SO_MARK", o.mark.map(|mark| socket.set_mark(mark))),
        ];
        for (name, result) in steps {
            self.check(result, BindStep::Option(name), target)?;
        }
        Ok(())
    }

    /// Device first, then source address. A failure fails the dial: traffic never leaves by
    /// the default route instead of the one asked for.
    fn bind(&self, socket: &Socket, target: SocketAddr, tcp: bool) -> Result<(), DialError> {
        if let Some(device) = &self.egress.device {
            if is_local(target.ip()) {
                log::debug!(egress = self.name(), device = device.as_str(), target:% = target;
                    "loopback or link-local target, not binding to device");
            } else {
                let bound = socket.bind_device(Some(device.as_bytes()));
                self.check(Some(bound), BindStep::Device(device.clone()), target)?;
            }
        }
        if let Some(source) = self.egress.source {
            if tcp {
                // Let connect() choose the port, so one source address serves more than the
                // ~28k ports bind() alone would reserve.
                self.check(
                    Some(bind_address_no_port(socket)),
                    BindStep::Option("IP_BIND_ADDRESS_NO_PORT"),
                    target,
                )?;
            }
            let bound = socket.bind(&SockAddr::from(SocketAddr::new(source, 0)));
            self.check(Some(bound), BindStep::Source(source), target)?;
        }
        Ok(())
    }

    fn check(&self, result: Option<io::Result<()>>, step: BindStep, target: SocketAddr) -> Result<(), DialError> {
        match result {
            Some(Err(source)) => Err(self.failed(step, target, source)),
            _ => Ok(()),
        }
    }

    fn failed(&self, step: BindStep, target: SocketAddr, source: io::Error) -> DialError {
        DialError::Bind {
            egress: self.egress.name.clone(),
            step,
            target,
            source,
        }
    }
}

/// Loopback and link-local targets are reached without device binding: binding them to a NIC
/// would send them where they cannot be answered.
fn is_local(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback() || v4.is_link_local(),
        IpAddr::V6(v6) => v6.is_loopback() || v6.is_unicast_link_local(),
    }
}

fn bind_address_no_port(socket: &Socket) -> io::Result<()> {
    crate::net::set_flag(socket, libc::IPPROTO_IP, libc::IP_BIND_ADDRESS_NO_PORT)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SocketOptions;

    fn factory(device: Option<&str>, source: Option<&str>) -> Factory {
        Factory::new(Egress {
            name: "test".into(),
            device: device.map(str::to_string),
            source: source.map(|s| s.parse().unwrap()),
            options: SocketOptions::default(),
            via_proxy: None,
        })
    }

    #[test]
    fn a_source_address_is_bound_before_connect() {
        let udp = factory(None, Some("127.0.0.2"))
            .udp("127.0.0.1:9".parse().unwrap())
            .unwrap();
        assert_eq!(udp.local_addr().unwrap().ip(), "127.0.0.2".parse::<IpAddr>().unwrap());
        assert_eq!(udp.peer_addr().unwrap(), "127.0.0.1:9".parse().unwrap());
    }

    #[test]
    fn a_source_not_on_the_host_names_egress_source_and_target() {
        let err = factory(None, Some("192.0.2.77"))
            .tcp("127.0.0.1:9".parse().unwrap())
            .unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("egress test")
                && text.contains("cannot bind to source 192.0.2.77")
                && text.contains("127.0.0.1:9"),
            "{text}"
        );
    }

    #[test]
    fn a_family_mismatch_is_refused() {
        let err = factory(None, Some("127.0.0.1"))
            .tcp("[::1]:9".parse().unwrap())
            .unwrap_err();
        assert!(matches!(err, DialError::Family { .. }), "{err}");
    }

    #[test]
    fn a_device_is_skipped_for_loopback_targets() {
        // No such interface exists, yet a loopback target is dialed without binding to it.
        let tcp = factory(Some("nosuchif0"), None).tcp("127.0.0.1:9".parse().unwrap());
        assert!(tcp.is_ok(), "{:?}", tcp.err());
    }

    #[test]
    fn a_missing_device_names_itself() {
        let err = factory(Some("nosuchif0"), None)
            .udp("198.18.0.1:9".parse().unwrap())
            .unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("device nosuchif0") && text.contains("198.18.0.1:9"),
            "{text}"
        );
    }
}
