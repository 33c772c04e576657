//! In-process backends on 127.0.0.1:0. Each records what it saw on a channel, so a test waits
//! on the event itself rather than on time.

use std::net::{Shutdown, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use async_std::net::{TcpListener, TcpStream};
use async_std::prelude::*;
use async_std::task;

/// What a recording backend saw on one connection.
#[derive(Debug, Clone)]
pub struct Received {
    pub peer: SocketAddr,
    pub bytes: Vec<u8>,
}

/// A backend server running on its own task until the test process ends.
pub struct Backend {
    pub addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    received: flume::Receiver<Received>,
}

type Handler = fn(TcpStream, &'static str, flume::Sender<Received>) -> futures::future::BoxFuture<'static, ()>;

impl Backend {
    async fn serve(name: &'static str, handler: Handler) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind a backend");
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let (tx, received) = flume::unbounded();
        let count = accepted.clone();
        task::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                task::spawn(handler(stream, name, tx.clone()));
            }
        });
        Backend { addr, accepted, received }
    }

    /// Echoes every byte and passes a FIN back once it sees one.
    pub async fn echo() -> Backend {
        Backend::serve("echo", |stream, _, _| {
            Box::pin(async move {
                let (mut r, mut w) = (&stream, &stream);
                let _ = async_std::io::copy(&mut r, &mut w).await;
                let _ = stream.shutdown(Shutdown::Write);
            })
        })
        .await
    }

    /// Writes its name and closes: which backend answered is what the client reads.
    pub async fn greeter(name: &'static str) -> Backend {
        Backend::serve(name, |mut stream, name, _| {
            Box::pin(async move {
                let _ = stream.write_all(name.as_bytes()).await;
            })
        })
        .await
    }

    /// Reads until the client's FIN, records the bytes and the peer address, then replies
    /// with the byte count (a request/response protocol that relies on half-close).
    pub async fn sink() -> Backend {
        Backend::serve("sink", |mut stream, _, tx| {
            Box::pin(async move {
                let mut bytes = Vec::new();
                let peer = stream.peer_addr().unwrap();
                if stream.read_to_end(&mut bytes).await.is_ok() {
                    let _ = stream.write_all(format!("got {}", bytes.len()).as_bytes()).await;
                    let _ = tx.send(Received { peer, bytes });
                }
            })
        })
        .await
    }

    /// Sends a greeting and its FIN at once, then records what the client still sends.
    pub async fn speaks_first(greeting: &'static str) -> Backend {
        Backend::serve(greeting, |mut stream, greeting, tx| {
            Box::pin(async move {
                let peer = stream.peer_addr().unwrap();
                let _ = stream.write_all(greeting.as_bytes()).await;
                let _ = stream.shutdown(Shutdown::Write);
                let mut bytes = Vec::new();
                if stream.read_to_end(&mut bytes).await.is_ok() {
                    let _ = tx.send(Received { peer, bytes });
                }
            })
        })
        .await
    }

    /// Accepts, then closes at once.
    pub async fn closing() -> Backend {
        Backend::serve("closing", |stream, _, _| Box::pin(async move { drop(stream) })).await
    }

    /// Accepts and holds the connection without reading, writing or closing it.
    pub async fn silent() -> Backend {
        Backend::serve("silent", |stream, _, _| {
            Box::pin(async move {
                futures::future::pending::<()>().await;
                drop(stream);
            })
        })
        .await
    }

    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// The next connection this backend recorded (bounded wait).
    pub async fn received(&self) -> Received {
        async_std::future::timeout(super::PATIENCE, self.received.recv_async())
            .await
            .expect("the backend recorded a connection in time")
            .expect("backend alive")
    }
}

/// An address that refuses connections: a port bound for a moment and then released.
pub fn refused_addr() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}

/// A listener that never accepts and whose queue is full, so a connect gets no answer at all:
/// the kernel drops SYNs to a listener whose accept queue (backlog 0, one filler) is full.
pub struct Blackhole {
    pub addr: SocketAddr,
    _listener: socket2::Socket,
    _filler: std::net::TcpStream,
}

impl Blackhole {
    pub fn new() -> Blackhole {
        let listener = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        listener.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into()).unwrap();
        listener.listen(0).unwrap();
        let addr = listener.local_addr().unwrap().as_socket().unwrap();
        let filler = std::net::TcpStream::connect(addr).unwrap();
        Blackhole {
            addr,
            _listener: listener,
            _filler: filler,
        }
    }
}
