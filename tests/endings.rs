//! How a relayed pair ends when one side stops early: no byte of a complete answer is lost, and
//! a reset reaches the other side as a reset, by splice and by copying alike.

mod harness;

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
