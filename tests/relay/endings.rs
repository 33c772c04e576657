//! How a relayed pair ends when one side stops early: no byte of a complete answer is lost, and
//! a reset reaches the other side as a reset, by splice and by copying alike.

use crate::harness;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::thread;

use harness::{Harness, PATIENCE, config, route};

const ANSWER: usize = 4_000_000;

fn relay(backend: SocketAddr, splice: bool) -> Harness {
    let text = config(&[route("r", &[backend], "")]).replacen('(', &format!("(splice: {splice}, "), 1);
    Harness::start(&text)
}

/// Bytes still in a socket's send queue, not yet acknowledged by the peer.
fn unacked(stream: &TcpStream) -> i32 {
    let mut n: libc::c_int = 0;
    // SAFETY: TIOCOUTQ writes one int for a valid socket descriptor.
    unsafe { libc::ioctl(stream.as_raw_fd(), libc::TIOCOUTQ, &mut n) };
    n
}

/// The "answer early, then close" backend (an HTTP 413 and close): reads 1,000 bytes, sends
/// the whole answer, shuts down its write side, waits until every byte is acknowledged, then
/// closes with the client's upload unread, which makes its kernel send a reset.
fn early_answer() -> (SocketAddr, thread::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let task = thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let mut head = [0u8; 1000];
        stream.read_exact(&mut head).unwrap();
        stream.write_all(&vec![b'a'; ANSWER]).unwrap();
        stream.shutdown(Shutdown::Write).unwrap();
        let started = std::time::Instant::now();
        while unacked(&stream) > 0 {
            assert!(started.elapsed() < PATIENCE, "the answer was never acknowledged");
            thread::yield_now();
        }
        drop(stream);
    });
    (addr, task)
}

fn early_answer_arrives_whole(splice: bool) {
    let (backend, served) = early_answer();
    let h = relay(backend, splice);
    let mut client = TcpStream::connect(h.addr("r")).unwrap();
    client.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut upload = client.try_clone().unwrap();
    // Uploads more than the backend will ever read, while the answer comes back.
    let uploader = thread::spawn(move || {
        let chunk = vec![b'u'; 64 * 1024];
        for _ in 0..128 {
            if upload.write_all(&chunk).is_err() {
                break;
            }
        }
    });
    // The client reads only once the backend has reset the connection: the answer is then
    // all in the relay's hands (its buffers and the sockets'), and must still arrive whole.
    served.join().unwrap();
    let mut answer = Vec::new();
    let read = client.read_to_end(&mut answer);
    assert!(read.is_ok(), "the answer ends with a FIN, not a reset: {read:?}");
    assert_eq!(answer.len(), ANSWER, "every byte of the answer arrived");
    drop(client);
    uploader.join().unwrap();
    let stats = h.relay().stats();
    async_std::task::block_on(harness::within(stats.until(|s| s.active() == 0)));
    assert_eq!(async_std::task::block_on(h.shutdown()).forced, 0);
}

#[test]
fn an_early_answer_then_a_reset_reaches_the_client_whole_by_splice() {
    for _ in 0..3 {
        early_answer_arrives_whole(true);
    }
}

#[test]
fn an_early_answer_then_a_reset_reaches_the_client_whole_by_copying() {
    for _ in 0..3 {
        early_answer_arrives_whole(false);
    }
}

/// Closes `stream` with a reset (SO_LINGER 0).
fn reset(stream: TcpStream) {
    socket2::SockRef::from(&stream)
        .set_linger(Some(std::time::Duration::ZERO))
        .unwrap();
    drop(stream);
}

fn resets_pass_both_ways(splice: bool) {
    // The backend resets mid-answer: the client must see a reset, not a clean end.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let h = relay(listener.local_addr().unwrap(), splice);
    let mut client = TcpStream::connect(h.addr("r")).unwrap();
    client.set_read_timeout(Some(PATIENCE)).unwrap();
    let (mut backend, _) = listener.accept().unwrap();
    backend.write_all(b"partial answer").unwrap();
    let mut got = [0u8; 14];
    client.read_exact(&mut got).unwrap();
    reset(backend);
    let mut rest = Vec::new();
    let end = client.read_to_end(&mut rest).map_err(|e| e.kind());
    assert_eq!(
        end,
        Err(ErrorKind::ConnectionReset),
        "the backend's reset reaches the client"
    );

    // The client resets mid-upload: the backend must see a reset too.
    let mut client = TcpStream::connect(h.addr("r")).unwrap();
    let (mut backend, _) = listener.accept().unwrap();
    backend.set_read_timeout(Some(PATIENCE)).unwrap();
    client.write_all(b"partial upload").unwrap();
    let mut got = [0u8; 14];
    backend.read_exact(&mut got).unwrap();
    reset(client);
    let end = backend.read_to_end(&mut Vec::new()).map_err(|e| e.kind());
    assert_eq!(
        end,
        Err(ErrorKind::ConnectionReset),
        "the client's reset reaches the backend"
    );
    let stats = h.relay().stats();
    async_std::task::block_on(harness::within(stats.until(|s| s.active() == 0)));
    assert_eq!(async_std::task::block_on(h.shutdown()).forced, 0);
}

#[test]
fn resets_pass_both_ways_by_splice() {
    resets_pass_both_ways(true);
}

#[test]
fn resets_pass_both_ways_by_copying() {
    resets_pass_both_ways(false);
}

/// Answers that a backend ends abruptly, through the real daemon: whatever relayd took from
/// the backend reaches the client whole, even when the backend resets at once or the client
/// never stops uploading.
mod close {
    use super::*;
    use harness::daemon::{Daemon, field};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    /// How the backend ends its answer, once relayd has acknowledged every byte of it.
    #[derive(Clone, Copy)]
    enum BackendEnd {
        /// Closes at once with the upload unread: its kernel sends a reset after the data.
        Reset,
        /// Shuts down its write side first (the FIN), then closes with the upload unread (an
        /// HTTP 413 and close).
        FinThenReset,
    }

    /// The client's receive buffer: small, so that most of the answer waits in relayd's hands
    /// (its socket buffers, pipe and send queue) when the backend goes.
    const CLIENT_RCVBUF: usize = 64 * 1024;
    /// What the client uploads after the backend has gone, before it starts to read: more than
    /// any byte count a lingering close might stop at.
    const UPLOAD_BEFORE_READING: u64 = 80 << 20;
    /// The uploader's bound, in bytes (it stops sooner when a write fails).
    const UPLOAD_MAX: u64 = 4 << 30;

    /// A backend that serves `trials` connections in turn: reads 1,000 bytes of the upload,
    /// sends `answer` bytes, waits until relayd has acknowledged all of them (SIOCOUTQ 0, so
    /// any byte lost is relayd's), and ends as `end` says. Each connection's end is sent on
    /// the channel.
    fn backend(answer: usize, end: BackendEnd, trials: usize) -> (SocketAddr, flume::Receiver<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let (ended, ends) = flume::bounded(trials);
        thread::spawn(move || {
            for _ in 0..trials {
                let (mut stream, _) = listener.accept().unwrap();
                let mut head = [0u8; 1000];
                stream.read_exact(&mut head).unwrap();
                stream.write_all(&vec![b'a'; answer]).unwrap();
                if let BackendEnd::FinThenReset = end {
                    stream.shutdown(Shutdown::Write).unwrap();
                }
                let started = std::time::Instant::now();
                while unacked(&stream) > 0 {
                    assert!(started.elapsed() < PATIENCE, "relayd never acknowledged the answer");
                    thread::yield_now();
                }
                drop(stream);
                let _ = ended.send(());
            }
        });
        (addr, ends)
    }

    /// How a client uploads.
    #[derive(Clone, Copy)]
    enum Upload {
        /// Without pause from the start, and it reads nothing until the backend has gone and
        /// it has uploaded [`UPLOAD_BEFORE_READING`] more (or its upload failed).
        Endless,
        /// 2,000 bytes (half of them left unread by the backend), then nothing, the socket
        /// left open: the relay is reading, not writing, the upload when the reset comes, and
        /// the client reads once the backend has gone.
        Head,
    }

    /// One client, uploading as `upload` says, then reading to the end. Its address and the
    /// bytes it got.
    fn trial(relay: SocketAddr, backend_ended: &flume::Receiver<()>, upload: Upload) -> (SocketAddr, usize) {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        socket.set_recv_buffer_size(CLIENT_RCVBUF).unwrap();
        socket.connect(&relay.into()).unwrap();
        let mut client: TcpStream = socket.into();
        client.set_read_timeout(Some(PATIENCE)).unwrap();
        let me = client.local_addr().unwrap();
        if let Upload::Head = upload {
            client.write_all(&[b'u'; 2000]).unwrap();
            backend_ended
                .recv_timeout(PATIENCE)
                .expect("the backend ended its answer");
            return (me, read_answer(&mut client));
        }
        let mut upload = client.try_clone().unwrap();
        upload.set_write_timeout(Some(PATIENCE)).unwrap();
        let (sent, target) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(u64::MAX)));
        let (passed, reached) = flume::bounded(1);
        let uploader = {
            let (sent, target) = (sent.clone(), target.clone());
            thread::spawn(move || {
                let chunk = vec![b'u'; 64 * 1024];
                let started = std::time::Instant::now();
                let mut total = 0u64;
                while total < UPLOAD_MAX && started.elapsed() < PATIENCE {
                    if upload.write_all(&chunk).is_err() {
                        break;
                    }
                    total += chunk.len() as u64;
                    sent.store(total, Ordering::Relaxed);
                    if total >= target.load(Ordering::Relaxed) {
                        let _ = passed.try_send(());
                    }
                }
                // Stopped (a failed write, or the bound): the reader need not wait any more.
                let _ = passed.try_send(());
            })
        };
        backend_ended
            .recv_timeout(PATIENCE)
            .expect("the backend ended its answer");
        target.store(sent.load(Ordering::Relaxed) + UPLOAD_BEFORE_READING, Ordering::Relaxed);
        reached.recv_timeout(PATIENCE).expect("the uploader went on or stopped");
        let got = read_answer(&mut client);
        drop(client);
        uploader.join().unwrap();
        (me, got)
    }

    /// The bytes read until the end of the stream, or a reset: after the whole answer, that
    /// is how a backend's reset is passed on.
    fn read_answer(client: &mut TcpStream) -> usize {
        let mut got = 0;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match client.read(&mut buf) {
                Ok(0) => return got,
                Ok(n) => got += n,
                Err(e) if e.kind() == ErrorKind::ConnectionReset => return got,
                Err(e) => panic!("reading the answer: {e}"),
            }
        }
    }

    /// `trials` clients in turn through one daemon; every one gets the whole answer, and never
    /// fewer bytes than its session line's `bytes_down`.
    fn answers_arrive_whole(splice: bool, answer: usize, end: BackendEnd, upload: Upload, trials: usize) {
        let (backend, ends) = backend(answer, end, trials);
        let daemon = Daemon::spawn(
            &[],
            &format!(
                r#"(splice: {splice}, routes: [(name: "r", listen: "127.0.0.1:0", backends: [(addr: "{backend}")])])"#
            ),
        );
        let relay = daemon.listening("r");
        for n in 0..trials {
            let (me, got) = trial(relay, &ends, upload);
            let me = me.to_string();
            let line = daemon
                .wait_for(|l| field(l, "msg") == Some("session closed") && field(l, "client") == Some(me.as_str()))
                .expect("relayd logs the session");
            let bytes_down: usize = field(&line, "bytes_down").unwrap().parse().unwrap();
            assert!(
                got >= bytes_down,
                "trial {n}: the client got {got} B, the session line says {line}"
            );
            assert_eq!(got, answer, "trial {n}: the whole answer arrived ({line})");
        }
        daemon.stop();
    }

    // An answer, then an immediate reset: relayd may learn of the reset by writing the
    // upload (an endless uploader) or by reading the answer's end (a client that sent only
    // its head), and either way the answer must arrive whole before anything is passed on.

    #[test]
    fn an_answer_then_an_immediate_reset_arrives_whole_by_splice() {
        answers_arrive_whole(true, 2_000_000, BackendEnd::Reset, Upload::Endless, 30);
        answers_arrive_whole(true, 2_000_000, BackendEnd::Reset, Upload::Head, 30);
    }

    #[test]
    fn an_answer_then_an_immediate_reset_arrives_whole_by_copying() {
        answers_arrive_whole(false, 2_000_000, BackendEnd::Reset, Upload::Endless, 30);
        answers_arrive_whole(false, 2_000_000, BackendEnd::Reset, Upload::Head, 30);
    }

    #[test]
    fn an_answer_reaches_a_client_that_never_stops_uploading_by_splice() {
        answers_arrive_whole(true, 4_000_000, BackendEnd::FinThenReset, Upload::Endless, 6);
    }

    #[test]
    fn an_answer_reaches_a_client_that_never_stops_uploading_by_copying() {
        answers_arrive_whole(false, 4_000_000, BackendEnd::FinThenReset, Upload::Endless, 6);
    }
}
