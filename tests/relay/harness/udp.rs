//! In-process UDP backends on 127.0.0.1:0 and a client helper.

use std::net::SocketAddr;

use async_std::net::UdpSocket;
use async_std::task;

use super::within;

/// A UDP backend that reports every datagram it gets (sender and bytes) on a channel.
pub struct UdpBackend {
    pub addr: SocketAddr,
    seen: flume::Receiver<(SocketAddr, Vec<u8>)>,
}

impl UdpBackend {
    /// Answers every datagram with `replies` copies of it, each behind its index (one byte).
    async fn serve(replies: u8) -> UdpBackend {
        let socket = UdpSocket::bind("127.0.0.1:0").await.expect("bind a UDP backend");
        let addr = socket.local_addr().unwrap();
        let (tx, seen) = flume::unbounded();
        task::spawn(async move {
            let mut buf = vec![0u8; 65536];
            while let Ok((n, peer)) = socket.recv_from(&mut buf).await {
                // Sent back to back: they wait together in the relay's socket.
                for i in 0..replies {
                    let reply = if replies == 1 {
                        buf[..n].to_vec()
                    } else {
                        [&[i], &buf[..n]].concat()
                    };
                    let _ = socket.send_to(&reply, peer).await;
                }
                let _ = tx.send((peer, buf[..n].to_vec()));
            }
        });
        UdpBackend { addr, seen }
    }

    /// Sends every datagram back to its sender.
    pub async fn echo() -> UdpBackend {
        UdpBackend::serve(1).await
    }

    /// Answers every datagram with `n` datagrams at once: the index (one byte), then the request.
    pub async fn burst(n: u8) -> UdpBackend {
        UdpBackend::serve(n).await
    }

    /// Takes datagrams and never answers.
    pub async fn sink() -> UdpBackend {
        UdpBackend::serve(0).await
    }

    /// The next datagram this backend got (bounded wait).
    pub async fn next(&self) -> (SocketAddr, Vec<u8>) {
        within(self.seen.recv_async()).await.expect("backend alive")
    }

    /// Everything it has got so far, without waiting.
    pub fn drain(&self) -> Vec<(SocketAddr, Vec<u8>)> {
        self.seen.drain().collect()
    }
}

/// An address where nothing listens for UDP: datagrams sent there draw ICMP port unreachable.
pub fn unreachable_addr() -> SocketAddr {
    std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

/// A client socket connected to `relay`: it only hears datagrams from that exact address.
pub async fn client(relay: SocketAddr) -> UdpSocket {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    socket.connect(relay).await.unwrap();
    socket
}

/// Sends `request` and returns the next datagram back (bounded wait).
pub async fn round_trip(socket: &UdpSocket, request: &[u8]) -> Vec<u8> {
    socket.send(request).await.expect("send to the relay");
    let mut buf = vec![0u8; 65536];
    let n = within(socket.recv(&mut buf)).await.expect("receive from the relay");
    buf.truncate(n);
    buf
}

/// The sockets bound to `port` on 127.0.0.1 for UDP, as the kernel lists them (a descriptor
/// the relay holds a second time is still one socket).
pub fn udp_sockets_on(port: u16) -> usize {
    let table = std::fs::read_to_string("/proc/net/udp").expect("/proc/net/udp");
    let local = format!("0100007F:{port:04X}");
    (table.lines().skip(1))
        .filter(|l| l.split_whitespace().nth(1) == Some(local.as_str()))
        .count()
}
