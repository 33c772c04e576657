//! Zero-copy relaying between two TCP sockets: splice(2) from the source into a pipe and from
//! the pipe into the destination, driven by the reactor's readiness. Like HAProxy's
//! splice-auto, a direction copies while messages are small (two syscalls, no pipe) and
//! splices once bulk data flows. Pipes come from a bounded per-thread pool and are held only
//! while bytes are in them, so an idle session holds none. When no pipe can be had, that
//! direction copies instead (counted), and nothing is lost.

use std::cell::RefCell;
use std::io;
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use futures::ready;

use super::Transfer;
use super::pump::{BUDGET, Direction, Half, HalfError, Halves, Pair};
use crate::config::Timeouts;
use crate::metrics::Meter;
use crate::rt::{self, Async, TcpConn};

/// Pipes alive at once in the whole process (in use and kept); two descriptors each.
const MAX_PIPES: usize = 1024;
/// Pipes a thread keeps for reuse.
const KEEP: usize = 64;
/// Bytes a pipe holds, and the most one splice moves.
const PIPE_SIZE: usize = 1 << 20;

static PIPES: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static KEPT: RefCell<Vec<Pipe>> = const { RefCell::new(Vec::new()) };
}

/// A pipe's two ends.
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    /// A pipe from this thread's pool, or a new one while under the cap.
    fn take() -> Option<Pipe> {
        if let Some(pipe) = KEPT.with_borrow_mut(Vec::pop) {
            return Some(pipe);
        }
        if PIPES.fetch_add(1, Ordering::Relaxed) >= MAX_PIPES {
            PIPES.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        let mut fds = [0 as RawFd; 2];
        // SAFETY: pipe2 fills both descriptors, which are then owned here.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
            PIPES.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        // SAFETY: fresh descriptors from pipe2, owned by nothing else.
        let pipe = unsafe {
            Pipe {
                read: OwnedFd::from_raw_fd(fds[0]),
                write: OwnedFd::from_raw_fd(fds[1]),
            }
        };
        // A larger pipe moves more per splice. Failing to grow it (pipe-max-size, pipe-user-
        // pages-soft) only costs speed: the default 64 KiB pipe still works.
        // SAFETY: fcntl on a descriptor owned here.
        unsafe { libc::fcntl(pipe.write.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_SIZE as libc::c_int) };
        Some(pipe)
    }

    /// Back to the pool: only empty pipes are given back.
    fn give_back(self) {
        KEPT.with_borrow_mut(|kept| {
            if kept.len() < KEEP {
                kept.push(self);
            } else {
                PIPES.fetch_sub(1, Ordering::Relaxed);
            }
        });
    }
}

fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    let flags = libc::SPLICE_F_NONBLOCK | libc::SPLICE_F_MOVE;
    // SAFETY: both descriptors are open for the duration of the call; null offsets mean
    // "the current position", as sockets and pipes require.
    let n = unsafe { libc::splice(from, std::ptr::null_mut(), to, std::ptr::null_mut(), len, flags) };
    rt::check(n).map(|n| n as usize)
}

/// One direction: by copying while messages are small, by splice once bulk data flows (a read
/// filled the whole buffer), and by copying again whenever no pipe can be had.
#[derive(Default)]
struct SpliceHalf {
    copy: Half,
    splicing: bool,
    pipe: Option<Pipe>,
    /// Bytes in the pipe, not yet passed on.
    in_pipe: usize,
    eof: bool,
    done: bool,
    /// Bytes moved by splice (the copy half counts its own).
    spliced: u64,
    /// Splicing stopped at least once for want of a pipe.
    fell_back: bool,
}

impl SpliceHalf {
    fn bytes(&self) -> u64 {
        self.spliced + self.copy.bytes
    }

    fn done(&self) -> bool {
        self.done || self.copy.done
    }

    fn poll(&mut self, cx: &mut Context<'_>, src: &TcpConn, dst: &TcpConn) -> Poll<Result<(), HalfError>> {
        if !self.splicing {
            let (mut r, mut w) = (src, dst);
            let polled = self.copy.poll(cx, Pin::new(&mut r), Pin::new(&mut w));
            if polled.is_pending() && self.copy.may_splice() {
                // Bulk data, and nothing held back: from here on the kernel moves it.
                (self.splicing, self.copy.filled) = (true, false);
                cx.waker().wake_by_ref();
            }
            return polled;
        }
        let (src, dst) = (src.as_async(), dst.as_async());
        for _ in 0..BUDGET {
            if self.in_pipe > 0 {
                ready!(self.drain(cx, dst)).map_err(HalfError::Write)?;
                continue;
            }
            if self.eof {
                // shutdown(Write) passes the FIN on while the other direction keeps flowing;
                // when that one has ended too, closing the socket sends it.
                if !self.copy.last {
                    match dst.get_ref().shutdown(Shutdown::Write) {
                        Err(e) if e.kind() != io::ErrorKind::NotConnected => {
                            return Poll::Ready(Err(HalfError::Write(e)));
                        }
                        _ => {}
                    }
                }
                self.done = true;
                return Poll::Ready(Ok(()));
            }
            // Try first, wait only on EAGAIN: waiting first would cost a trip through the
            // reactor for every chunk. A pipe is only held while bytes are in it.
            let Some(pipe) = self.pipe.take().or_else(Pipe::take) else {
                log::debug!("no pipe to be had: this direction copies for now");
                (self.splicing, self.fell_back) = (false, true);
                cx.waker().wake_by_ref();
                return Poll::Pending;
            };
            match rt::poll_read_with(src, cx, |src| {
                splice(src.as_raw_fd(), pipe.write.as_raw_fd(), PIPE_SIZE)
            }) {
                Poll::Ready(Ok(0)) => {
                    self.eof = true;
                    pipe.give_back();
                }
                Poll::Ready(Ok(n)) => {
                    self.in_pipe = n;
                    self.pipe = Some(pipe);
                }
                Poll::Ready(Err(e)) => {
                    pipe.give_back();
                    return Poll::Ready(Err(HalfError::Read(e)));
                }
                Poll::Pending => {
                    pipe.give_back();
                    return Poll::Pending;
                }
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// Passes what is in the pipe on to `dst`; the pipe goes back once it is empty.
    fn drain(&mut self, cx: &mut Context<'_>, dst: &Async<TcpStream>) -> Poll<io::Result<()>> {
        let pipe = self.pipe.as_ref().expect("bytes in the pipe mean a pipe");
        let (from, len) = (pipe.read.as_raw_fd(), self.in_pipe);
        let n = ready!(rt::poll_write_with(dst, cx, |dst| splice(from, dst.as_raw_fd(), len)))?;
        self.in_pipe -= n;
        self.spliced += n as u64;
        if self.in_pipe == 0 {
            self.pipe.take().expect("checked above").give_back();
        }
        Poll::Ready(Ok(()))
    }
}

impl SpliceHalf {
    /// The destination is gone: what is in the pipe has nowhere to go, and what the source
    /// still sends is read and dropped, by copying.
    fn drop_input(&mut self) {
        self.close_pipe();
        (self.in_pipe, self.splicing) = (0, false);
        self.copy.drop_input();
    }

    /// A pipe with bytes still in it cannot be reused: it is closed, and its place freed.
    fn close_pipe(&mut self) {
        if self.pipe.take().is_some() {
            PIPES.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Drop for SpliceHalf {
    fn drop(&mut self) {
        self.close_pipe();
    }
}

/// A TCP pair's bytes moved by splice (by copying where there is no pipe to be had).
pub struct Splicer<'a> {
    client: &'a TcpConn,
    backend: &'a TcpConn,
    up: SpliceHalf,
    down: SpliceHalf,
}

/// The relay of a TCP pair by splice.
pub type SplicePump<'a> = Pair<Splicer<'a>>;

impl<'a> SplicePump<'a> {
    pub fn new(client: &'a TcpConn, backend: &'a TcpConn, timeouts: Timeouts, meter: Meter) -> Self {
        let halves = Splicer {
            client,
            backend,
            up: SpliceHalf::default(),
            down: SpliceHalf::default(),
        };
        Pair::with(halves, timeouts, meter)
    }

    /// How the bytes moved: by splice at all, and with a fallback for want of a pipe.
    pub fn path(&self) -> Transfer {
        let Splicer { up, down, .. } = self.halves();
        let spliced = up.spliced + down.spliced > 0;
        match (spliced, up.fell_back || down.fell_back) {
            (_, true) => Transfer::SpliceThenCopy,
            (true, false) => Transfer::Splice,
            (false, false) => Transfer::Copy,
        }
    }
}

impl Halves for Splicer<'_> {
    fn poll_half(&mut self, direction: Direction, cx: &mut Context<'_>) -> Poll<Result<(), HalfError>> {
        // A direction that ends after the other one has ends the pair: the sockets are closed
        // next, and the close sends its FIN.
        match direction {
            Direction::Up => {
                self.up.copy.last = self.down.done();
                self.up.poll(cx, self.client, self.backend)
            }
            Direction::Down => {
                self.down.copy.last = self.up.done();
                self.down.poll(cx, self.backend, self.client)
            }
        }
    }

    fn done(&self, direction: Direction) -> bool {
        match direction {
            Direction::Up => self.up.done(),
            Direction::Down => self.down.done(),
        }
    }

    fn bytes(&self) -> (u64, u64) {
        (self.up.bytes(), self.down.bytes())
    }

    fn drop_input(&mut self, direction: Direction) {
        match direction {
            Direction::Up => self.up.drop_input(),
            Direction::Down => self.down.drop_input(),
        }
    }

    fn copying(&self, direction: Direction) -> &Half {
        match direction {
            Direction::Up => &self.up.copy,
            Direction::Down => &self.down.copy,
        }
    }
}
