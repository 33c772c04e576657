//! Many concurrent sessions with random sizes each way: every byte arrives, in order, on both
//! ends (SHA-256 of what was sent compared with SHA-256 of what arrived).

use crate::harness;

use std::net::{Shutdown, SocketAddr};

use async_std::net::{TcpListener, TcpStream};
use async_std::prelude::*;
use async_std::task;
use harness::{Harness, config, route, within};
use rand::rngs::SmallRng;
use rand::{Rng, RngCore, SeedableRng};
use sha2::{Digest, Sha256};

const SESSIONS: u64 = 1000;
const MAX_SIZE: usize = 1 << 20;
const CHUNK: usize = 64 * 1024;

/// The bytes one side sends: a stream determined by (session, direction), so both ends can
/// regenerate it.
struct Payload {
    rng: SmallRng,
    left: usize,
}

impl Payload {
    fn new(session: u64, down: bool, len: usize) -> Self {
        Payload {
            rng: SmallRng::seed_from_u64(session * 2 + down as u64),
            left: len,
        }
    }

    fn next_chunk(&mut self, buf: &mut [u8; CHUNK]) -> Option<usize> {
        let n = self.left.min(CHUNK);
        if n == 0 {
            return None;
        }
        self.rng.fill_bytes(&mut buf[..n]);
        self.left -= n;
        Some(n)
    }

    /// Writes the whole payload; returns its digest.
    async fn send(mut self, mut w: &TcpStream) -> [u8; 32] {
        let (mut buf, mut hash) = ([0u8; CHUNK], Sha256::new());
        while let Some(n) = self.next_chunk(&mut buf) {
            hash.update(&buf[..n]);
            w.write_all(&buf[..n]).await.expect("write payload");
        }
        hash.finalize().into()
    }

    fn digest(mut self) -> [u8; 32] {
        let (mut buf, mut hash) = ([0u8; CHUNK], Sha256::new());
        while let Some(n) = self.next_chunk(&mut buf) {
            hash.update(&buf[..n]);
        }
        hash.finalize().into()
    }
}

/// Reads to EOF; returns (length, digest).
async fn receive(mut r: &TcpStream) -> (usize, [u8; 32]) {
    let (mut buf, mut hash, mut len) = (vec![0u8; CHUNK], Sha256::new(), 0);
    loop {
        let n = r.read(&mut buf).await.expect("read payload");
        if n == 0 {
            return (len, hash.finalize().into());
        }
        hash.update(&buf[..n]);
        len += n;
    }
}

/// Reads a 16-byte header (session id, how much to send back), then sends its own payload while
/// it reads the client's, and records what it received.
async fn backend(listener: TcpListener, seen: flume::Sender<(u64, usize, [u8; 32])>) {
    while let Ok((stream, _)) = listener.accept().await {
        let seen = seen.clone();
        task::spawn(async move {
            let mut header = [0u8; 16];
            (&stream).read_exact(&mut header).await.expect("header");
            let id = u64::from_be_bytes(header[..8].try_into().unwrap());
            let down = u64::from_be_bytes(header[8..].try_into().unwrap()) as usize;
            let send = async {
                Payload::new(id, true, down).send(&stream).await;
                stream.shutdown(Shutdown::Write).expect("backend FIN");
            };
            let ((len, digest), ()) = futures::future::join(receive(&stream), send).await;
            let _ = seen.send((id, len, digest));
        });
    }
}

/// One client session; returns what it sent up (length, digest).
async fn client(relay: SocketAddr, id: u64, up: usize, down: usize) -> (usize, [u8; 32]) {
    let stream = TcpStream::connect(relay).await.expect("connect to relay");
    let send = async {
        let header = [id.to_be_bytes(), (down as u64).to_be_bytes()].concat();
        (&stream).write_all(&header).await.expect("header");
        let digest = Payload::new(id, false, up).send(&stream).await;
        stream.shutdown(Shutdown::Write).expect("client FIN");
        digest
    };
    let (sent, (got_len, got)) = futures::future::join(send, receive(&stream)).await;
    assert_eq!(got_len, down, "session {id}: bytes from the backend");
    assert_eq!(
        got,
        Payload::new(id, true, down).digest(),
        "session {id}: digest of bytes from the backend"
    );
    (up, sent)
}

#[async_std::test]
async fn a_thousand_concurrent_sessions_arrive_intact_both_ways() {
    let listener = TcpListener::from(harness::backend::listen_any(SESSIONS as i32 * 2));
    let backend_addr = listener.local_addr().unwrap();
    let (seen_tx, seen) = flume::unbounded();
    task::spawn(backend(listener, seen_tx));
    let h = Harness::start(&config(&[route("r", &[backend_addr], r#"idle_timeout: "60s""#)]));
    let relay = h.addr("r");
    let seed: u64 = rand::rng().random();
    println!("size seed {seed}");
    let mut sizes = SmallRng::seed_from_u64(seed);
    let clients: Vec<_> = (0..SESSIONS)
        .map(|id| {
            let (up, down) = (sizes.random_range(0..=MAX_SIZE), sizes.random_range(0..=MAX_SIZE));
            task::spawn(async move { (id, client(relay, id, up, down).await) })
        })
        .collect();
    let mut sent = std::collections::HashMap::new();
    for c in clients {
        let (id, what) = within(c).await;
        sent.insert(id, what);
    }
    for _ in 0..SESSIONS {
        let (id, len, digest) = within(seen.recv_async()).await.unwrap();
        assert_eq!(
            sent.remove(&id),
            Some((len, digest)),
            "session {id}: bytes the backend received"
        );
    }
    assert!(sent.is_empty());
    assert_eq!(h.relay().stats().total(), SESSIONS);
    assert_eq!(h.shutdown().await.forced, 0);
}
