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

/// A backend server running on its own task until the test process ends (or [`Backend::kill`]).
pub struct Backend {
    pub addr: SocketAddr,
    name: &'static str,
    handler: Handler,
    accepted: Arc<AtomicUsize>,
    accept_tx: flume::Sender<SocketAddr>,
    accepts: flume::Receiver<SocketAddr>,
    received_tx: flume::Sender<Received>,
    received: flume::Receiver<Received>,
    /// Dropping the sender ends the accept loop; the handle says when it has.
    running: Option<(flume::Sender<()>, task::JoinHandle<()>)>,
}

type Handler = fn(TcpStream, &'static str, flume::Sender<Received>) -> futures::future::BoxFuture<'static, ()>;

impl Backend {
    async fn serve(name: &'static str, handler: Handler) -> Backend {
        let listener = listen_on(SocketAddr::from(([127, 0, 0, 1], 0)), 1024);
        let (received_tx, received) = flume::unbounded();
        let (accept_tx, accepts) = flume::unbounded();
        let mut backend = Backend {
            addr: listener.local_addr().unwrap(),
            name,
            handler,
            accepted: Arc::new(AtomicUsize::new(0)),
            accept_tx,
            accepts,
            received_tx,
            received,
            running: None,
        };
        backend.run(listener);
        backend
    }

    fn run(&mut self, listener: std::net::TcpListener) {
        let listener = TcpListener::from(listener);
        let (stop, stopped) = flume::bounded::<()>(1);
        let (count, accepts, received) = (self.accepted.clone(), self.accept_tx.clone(), self.received_tx.clone());
        let (name, handler) = (self.name, self.handler);
        let task = task::spawn(async move {
            loop {
                let accepted = futures::future::select(Box::pin(listener.accept()), stopped.recv_async()).await;
                let futures::future::Either::Left((Ok((stream, peer)), _)) = accepted else {
                    break;
                };
                count.fetch_add(1, Ordering::SeqCst);
                let _ = accepts.send(peer);
                task::spawn(handler(stream, name, received.clone()));
            }
        });
        self.running = Some((stop, task));
    }

    /// Stops listening: from when this returns, connects to `addr` are refused.
    pub async fn kill(&mut self) {
        if let Some((stop, task)) = self.running.take() {
            drop(stop);
            task.await;
        }
    }

    /// Listens on the same address again.
    pub fn restart(&mut self) {
        let listener = listen_on(self.addr, 1024);
        self.run(listener);
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

    /// Writes its name and a newline, then echoes as [`Backend::echo`] does: a client learns
    /// which backend it reached and checks its bytes came back whole.
    pub async fn named_echo(name: &'static str) -> Backend {
        Backend::serve(name, |stream, name, _| {
            Box::pin(async move {
                let (mut r, mut w) = (&stream, &stream);
                if w.write_all(format!("{name}\n").as_bytes()).await.is_ok() {
                    let _ = async_std::io::copy(&mut r, &mut w).await;
                }
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

    /// A minimal HTTP/1.1 server: answers any request with `hello from backend <path>`.
    pub async fn http() -> Backend {
        Backend::serve("http", |mut stream, _, _| {
            Box::pin(async move {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if stream.read(&mut byte).await.unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(byte[0]);
                }
                let text = String::from_utf8_lossy(&head);
                let path = text.split(' ').nth(1).unwrap_or("?");
                let body = format!("hello from backend {path}");
                let answer = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(answer.as_bytes()).await;
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

    /// The peer address of the next connection this backend accepts (bounded wait).
    pub async fn next_accept(&self) -> SocketAddr {
        async_std::future::timeout(super::PATIENCE, self.accepts.recv_async())
            .await
            .expect("the backend accepted a connection in time")
            .expect("backend alive")
    }

    /// The next connection this backend recorded (bounded wait).
    pub async fn received(&self) -> Received {
        async_std::future::timeout(super::PATIENCE, self.received.recv_async())
            .await
            .expect("the backend recorded a connection in time")
            .expect("backend alive")
    }
}

/// A std listener on 127.0.0.1:0 with a real backlog (std's own is 128: too few for floods).
pub fn listen_any(backlog: i32) -> std::net::TcpListener {
    listen_on(SocketAddr::from(([127, 0, 0, 1], 0)), backlog)
}

/// A std listener on `addr` (SO_REUSEADDR: a restart need not wait out TIME_WAIT).
pub fn listen_on(addr: SocketAddr, backlog: i32) -> std::net::TcpListener {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_reuse_address(true).unwrap();
    socket.bind(&addr.into()).expect("bind a backend");
    socket.listen(backlog).unwrap();
    socket.into()
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
    _listener: std::net::TcpListener,
    _filler: std::net::TcpStream,
}

impl Blackhole {
    pub fn new() -> Blackhole {
        let listener = listen_any(0);
        let addr = listener.local_addr().unwrap();
        let filler = std::net::TcpStream::connect(addr).unwrap();
        Blackhole {
            addr,
            _listener: listener,
            _filler: filler,
        }
    }
}
