//! Listening sockets, as the route listeners, the status page and the admin socket open and
//! serve them: TCP with a real backlog, accepted without extra system calls; Unix with its
//! file's mode set before anyone can connect; and the back-off when accepting fails.

use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd};
use std::time::Duration;

use socket2::{Domain, SockAddr, Socket, Type};

use crate::rt::{self, Async, TcpConn};
use crate::shutdown::Signal;

const BACKOFF_MIN: Duration = Duration::from_millis(10);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// A listening TCP socket with SO_REUSEADDR (a restart need not wait out TIME_WAIT) and a real
/// backlog; `shared`: with SO_REUSEPORT, one of a group on the address (one per worker). It has
/// TCP_NODELAY, which Linux hands every accepted socket (small writes, prompts and handshakes,
/// go out at once, as they came in), so an accept needs no setsockopt of its own.
pub(crate) fn bind_tcp(
    addr: SocketAddr,
    backlog: u32,
    device: Option<&str>,
    shared: bool,
) -> io::Result<Async<TcpListener>> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    if shared {
        socket.set_reuse_port(true)?;
    }
    socket.set_tcp_nodelay(true)?;
    if let Some(device) = device {
        socket.bind_device(Some(device.as_bytes()))?;
    }
    socket.bind(&addr.into())?;
    listen(socket2::SockRef::from(&socket), backlog)?;
    Async::new(TcpListener::from(socket))
}

/// A listening Unix socket at `path` whose file has `mode` before anyone can connect: the file
/// is made by bind(2), its mode set, and only then does listen(2) let connections in (a
/// connect to a socket that does not listen yet is refused). A file left by a process that is
/// gone is replaced; one a live process answers on is not.
pub(crate) fn bind_unix(path: &std::path::Path, mode: u32) -> io::Result<Async<std::os::unix::net::UnixListener>> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(io::Error::new(io::ErrorKind::AddrInUse, "a process answers on it"));
    }
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
        std::fs::remove_file(path)?;
    }
    let socket = Socket::new(Domain::UNIX, Type::STREAM, None)?;
    socket.bind(&SockAddr::unix(path)?)?;
    let listening =
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).and_then(|()| socket.listen(64));
    if let Err(e) = listening {
        let _ = std::fs::remove_file(path);
        return Err(e);
    }
    Async::new(std::os::unix::net::UnixListener::from(std::os::fd::OwnedFd::from(
        socket,
    )))
}

/// listen(2) with `backlog`: on a listening socket too, where it sets the backlog anew.
pub(crate) fn listen(socket: socket2::SockRef<'_>, backlog: u32) -> io::Result<()> {
    socket.listen(i32::try_from(backlog).unwrap_or(i32::MAX))
}

/// The one back-off of every receive loop (TCP routes, UDP routes, the status page): after a
/// failed accept or receive, a wait that doubles from 10 ms to 1 s, and starts again at the
/// next success. A loop that cannot take in more never spins the CPU, and never stops.
pub(crate) struct Backoff {
    pub next: std::time::Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff { next: BACKOFF_MIN }
    }
}

impl Backoff {
    pub fn reset(&mut self) {
        self.next = BACKOFF_MIN;
    }

    /// Waits out the back-off (or until `stop`), and doubles it for next time.
    pub async fn wait(&mut self, stop: &Signal) {
        stop.unless(rt::sleep(self.next)).await;
        self.next = (self.next * 2).min(BACKOFF_MAX);
    }
}

/// Accepts with accept4(SOCK_NONBLOCK | SOCK_CLOEXEC): the new socket goes to the reactor as it
/// is, without the mode-setting calls a plain accept would need after it.
pub(crate) async fn accept(listener: &Async<TcpListener>) -> io::Result<(TcpConn, SocketAddr)> {
    let (fd, peer) = listener
        .read_with(|l| {
            // SAFETY: accept4 writes at most `len` bytes of address into the storage try_init
            // provides, and returns a new descriptor that is owned below.
            unsafe {
                SockAddr::try_init(|storage, len| {
                    rt::check(libc::accept4(
                        l.as_raw_fd(),
                        storage.cast(),
                        len,
                        libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                    ))
                })
            }
        })
        .await?;
    // SAFETY: a fresh descriptor from accept4, owned by nothing else.
    let stream = unsafe { TcpStream::from_raw_fd(fd) };
    let peer = peer
        .as_socket()
        .ok_or_else(|| io::Error::other("accepted a non-IP peer"))?;
    Ok((TcpConn::new_nonblocking(stream), peer))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_accepted_socket_inherits_nodelay_from_its_listener() {
        let listener = bind_tcp("127.0.0.1:0".parse().unwrap(), 8, None, false).unwrap();
        let addr = listener.get_ref().local_addr().unwrap();
        let _client = TcpStream::connect(addr).unwrap();
        let (accepted, _) = rt::block_on(accept(&listener)).unwrap();
        assert!(
            accepted.get_ref().nodelay().unwrap(),
            "no setsockopt after accept needed"
        );
    }
}
