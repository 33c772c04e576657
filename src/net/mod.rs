//! Sockets below the actors: the UDP endpoint that receives with its destination address
//! (IP_PKTINFO) and replies from it, listening TCP sockets (bind, accept, back-off), the one
//! raw `setsockopt` for the flags socket2 does not wrap, and the two queue lengths a closing
//! session asks of a TCP socket. Listeners, the status page, sessions and the Dialer use them,
//! so they sit beneath all four.

mod endpoint;
mod listen;

use std::io;
use std::os::fd::AsRawFd;

pub(crate) use endpoint::Endpoint;
pub(crate) use listen::{Backoff, accept, bind_tcp, bind_unix, listen};

/// Sets an on/off socket option to on (IP_PKTINFO, IPV6_RECVPKTINFO, IP_BIND_ADDRESS_NO_PORT).
pub(crate) fn set_flag(socket: &impl AsRawFd, level: libc::c_int, name: libc::c_int) -> io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: a valid fd, a c_int option value and its exact size.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    crate::rt::check(rc).map(drop)
}

/// Bytes in a TCP socket's send queue that its peer has not acknowledged yet (SIOCOUTQ):
/// 0 once everything written has reached the peer's kernel.
pub(crate) fn unacked(socket: &impl AsRawFd) -> io::Result<usize> {
    queue_len(socket, libc::TIOCOUTQ)
}

/// Bytes received on a TCP socket and not read yet (SIOCINQ): closing the socket with any
/// makes the kernel reset the connection, which throws its send queue away.
pub(crate) fn unread(socket: &impl AsRawFd) -> io::Result<usize> {
    queue_len(socket, libc::FIONREAD)
}

fn queue_len(socket: &impl AsRawFd, request: libc::Ioctl) -> io::Result<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: a valid fd, and a request (SIOCOUTQ, SIOCINQ) that writes one int.
    let rc = unsafe { libc::ioctl(socket.as_raw_fd(), request, &mut n) };
    crate::rt::check(rc).map(|_| n.max(0) as usize)
}
