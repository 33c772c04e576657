//! Sockets below the actors: the UDP endpoint that receives with its destination address
//! (IP_PKTINFO) and replies from it, and the one raw `setsockopt` for the flags socket2 does
//! not wrap. Listeners, sessions and the Dialer use them, so they sit beneath all three.

mod endpoint;

use std::io;
use std::os::fd::AsRawFd;

pub(crate) use endpoint::Endpoint;

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
