//! relayd's load generator for `bench/`: small, bounded, and the same for every relay measured.
//!
//!     cargo run --release --example loadgen -- udp-echo 127.0.0.1:9000
//!     cargo run --release --example loadgen -- udp-pingpong 127.0.0.1:9000 [clients=16] [secs=5] [size=64]
//!     cargo run --release --example loadgen -- udp-pingpong-loop 127.0.0.1:9000 [sockets=16] [secs=5] [size=64]
//!     cargo run --release --example loadgen -- tcp-echo 127.0.0.1:9100
//!     cargo run --release --example loadgen -- tcp-conns 127.0.0.1:9100 [workers=64] [secs=5]
//!     cargo run --release --example loadgen -- tcp-pingpong 127.0.0.1:9100 [clients=32] [secs=5] [size=64]
//!     cargo run --release --example loadgen -- tcp-hold 127.0.0.1:9103
//!     cargo run --release --example loadgen -- tcp-idle 127.0.0.1:9103 [count=9000] [secs=10]
//!
//! `udp-pingpong` runs `clients` threads, each with its own socket, sending one datagram and
//! waiting for its answer before the next, for `secs` seconds; it prints how many round trips
//! it made, round trips per second and the p50/p99 round-trip time; `udp-pingpong-loop` does
//! the same with `sockets` sockets driven by one event loop on one thread (the shape of a
//! single-threaded client). `tcp-conns` runs `workers` threads, each opening a new connection,
//! sending 64 bytes, reading them back and closing, again and again; it prints connections per
//! second, how many succeeded (`ok`) and how many failed. `tcp-pingpong` is `udp-pingpong`
//! over one long-lived TCP connection per client. `tcp-hold` accepts connections and keeps them open,
//! on one thread; `tcp-idle` opens `count` connections, prints `idle N` once they are all open,
//! holds them for `secs` and exits. Every loop stops by itself.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize, default: u64| args.get(i).map(|a| a.parse().expect("a number")).unwrap_or(default);
    match args.first().map(String::as_str) {
        Some("udp-echo") => udp_echo(args[1].parse().expect("an address")),
        Some("udp-pingpong") => {
            let target = args[1].parse().expect("an address");
            udp_pingpong(
                target,
                arg(2, 16) as usize,
                Duration::from_secs(arg(3, 5)),
                arg(4, 64) as usize,
            )
        }
        Some("udp-pingpong-loop") => {
            let target = args[1].parse().expect("an address");
            udp_pingpong_loop(
                target,
                arg(2, 16) as usize,
                Duration::from_secs(arg(3, 5)),
                arg(4, 64) as usize,
            )
        }
        Some("tcp-echo") => tcp_echo(args[1].parse().expect("an address")),
        Some("tcp-pingpong") => {
            let target = args[1].parse().expect("an address");
            tcp_pingpong(
                target,
                arg(2, 32) as usize,
                Duration::from_secs(arg(3, 5)),
                arg(4, 64) as usize,
            )
        }
        Some("tcp-hold") => tcp_hold(args[1].parse().expect("an address")),
        Some("tcp-idle") => tcp_idle(
            args[1].parse().expect("an address"),
            arg(2, 9000) as usize,
            Duration::from_secs(arg(3, 10)),
        ),
        Some("tcp-conns") => {
            let target = args[1].parse().expect("an address");
            tcp_conns(target, arg(2, 64) as usize, Duration::from_secs(arg(3, 5)))
        }
        _ => eprintln!(
            "usage: loadgen udp-echo ADDR | udp-pingpong ADDR [clients] [secs] [size] | tcp-echo ADDR | tcp-conns ADDR [workers] [secs]"
        ),
    }
}

/// Answers every datagram with itself, on one thread per core.
fn udp_echo(addr: SocketAddr) {
    let socket = UdpSocket::bind(addr).expect("bind the echo server");
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            let socket = socket.try_clone().unwrap();
            std::thread::spawn(move || {
                let mut buf = [0u8; 65536];
                while let Ok((n, peer)) = socket.recv_from(&mut buf) {
                    let _ = socket.send_to(&buf[..n], peer);
                }
            })
        })
        .collect();
    println!("udp-echo listening on {}", socket.local_addr().unwrap());
    for w in workers {
        let _ = w.join();
    }
}

fn udp_pingpong(target: SocketAddr, clients: usize, length: Duration, size: usize) {
    let deadline = Instant::now() + length;
    let threads: Vec<_> = (0..clients)
        .map(|_| std::thread::spawn(move || client(target, deadline, size)))
        .collect();
    report(target, clients, size, length, threads);
}

/// The other client shape: one thread, one event loop (async-io's), driving `sockets` sockets
/// that each keep one datagram in flight. A lost datagram is counted after a second and sent
/// again.
fn udp_pingpong_loop(target: SocketAddr, sockets: usize, length: Duration, size: usize) {
    let deadline = Instant::now() + length;
    let one = |_| async move {
        let socket = async_io::Async::<UdpSocket>::bind(([127, 0, 0, 1], 0)).expect("bind a client socket");
        socket.get_ref().connect(target).expect("connect the client socket");
        let (payload, mut buf) = (vec![7u8; size], vec![0u8; 65536]);
        let (mut rtts, mut lost) = (Vec::new(), 0u64);
        while Instant::now() < deadline {
            let sent = Instant::now();
            socket.send(&payload).await.expect("send");
            let (recv, timer) = (socket.recv(&mut buf), async_io::Timer::after(Duration::from_secs(1)));
            match futures::future::select(std::pin::pin!(recv), std::pin::pin!(timer)).await {
                futures::future::Either::Left((Ok(_), _)) => rtts.push(sent.elapsed()),
                _ => lost += 1,
            }
        }
        (rtts, lost)
    };
    let all = async_io::block_on(futures::future::join_all((0..sockets).map(one)));
    let threads = all
        .into_iter()
        .map(|result| std::thread::spawn(move || result))
        .collect();
    report(target, sockets, size, length, threads);
}

/// Prints round trips per second and p50/p99 from the clients' round-trip times.
fn report(target: SocketAddr, clients: usize, size: usize, length: Duration, threads: Vec<Rtts>) {
    let (mut rtts, mut lost) = (Vec::new(), 0u64);
    for t in threads {
        let (r, l) = t.join().unwrap();
        rtts.extend(r);
        lost += l;
    }
    rtts.sort_unstable();
    let pct = |p: f64| {
        rtts.get(((rtts.len() as f64 * p) as usize).min(rtts.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    println!(
        "target={target} clients={clients} size={size} round_trips={} round_trips_per_s={:.0} p50_us={} p99_us={} lost={lost}",
        rtts.len(),
        rtts.len() as f64 / length.as_secs_f64(),
        pct(0.50).as_micros(),
        pct(0.99).as_micros(),
    );
}

/// A client thread's round-trip times and failures.
type Rtts = std::thread::JoinHandle<(Vec<Duration>, u64)>;

fn tcp_pingpong(target: SocketAddr, clients: usize, length: Duration, size: usize) {
    let deadline = Instant::now() + length;
    let threads: Vec<_> = (0..clients)
        .map(|_| std::thread::spawn(move || tcp_client(target, deadline, size)))
        .collect();
    report(target, clients, size, length, threads);
}

/// One long-lived connection's round trips until `deadline`.
fn tcp_client(target: SocketAddr, deadline: Instant, size: usize) -> (Vec<Duration>, u64) {
    let mut rtts = Vec::new();
    let Ok(mut stream) = TcpStream::connect_timeout(&target, Duration::from_secs(2)) else {
        return (rtts, 1);
    };
    let _ = stream.set_nodelay(true);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let (request, mut back) = (vec![0x5a; size], vec![0u8; size]);
    while Instant::now() < deadline {
        let sent = Instant::now();
        if stream
            .write_all(&request)
            .and_then(|_| stream.read_exact(&mut back))
            .is_err()
        {
            return (rtts, 1);
        }
        rtts.push(sent.elapsed());
    }
    (rtts, 0)
}

/// Accepts and keeps every connection, reading nothing, on this one thread.
fn tcp_hold(addr: SocketAddr) {
    let listener = TcpListener::bind(addr).expect("bind the holder");
    println!("tcp-hold listening on {}", listener.local_addr().unwrap());
    let held: Vec<TcpStream> = listener.incoming().map_while(Result::ok).collect();
    drop(held);
}

/// Opens `count` connections, says so, holds them for `length`.
fn tcp_idle(target: SocketAddr, count: usize, length: Duration) {
    let mut held = Vec::with_capacity(count);
    let mut failed = 0;
    for _ in 0..count {
        match TcpStream::connect_timeout(&target, Duration::from_secs(2)) {
            Ok(stream) => held.push(stream),
            Err(_) => failed += 1,
        }
    }
    println!("idle {} failed={failed}", held.len());
    std::thread::sleep(length);
}

/// One client's round trips until `deadline`; a datagram unanswered within 1 s counts as lost.
fn client(target: SocketAddr, deadline: Instant, size: usize) -> (Vec<Duration>, u64) {
    let socket = UdpSocket::bind(if target.is_ipv4() { "127.0.0.1:0" } else { "[::1]:0" }).unwrap();
    socket.connect(target).unwrap();
    socket.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let (request, mut buf) = (vec![0x5a; size], vec![0u8; 65536]);
    let (mut rtts, mut lost) = (Vec::new(), 0);
    while Instant::now() < deadline {
        let sent = Instant::now();
        if socket.send(&request).is_err() {
            lost += 1;
            continue;
        }
        match socket.recv(&mut buf) {
            Ok(_) => rtts.push(sent.elapsed()),
            Err(_) => lost += 1,
        }
    }
    (rtts, lost)
}

/// Echoes every connection until its FIN, a thread per connection.
fn tcp_echo(addr: SocketAddr) {
    let listener = TcpListener::bind(addr).expect("bind the echo server");
    println!("tcp-echo listening on {}", listener.local_addr().unwrap());
    for mut stream in listener.incoming().map_while(Result::ok) {
        std::thread::spawn(move || {
            let mut buf = [0u8; 16384];
            while let Ok(n) = stream.read(&mut buf) {
                if n == 0 || stream.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        });
    }
}

fn tcp_conns(target: SocketAddr, workers: usize, length: Duration) {
    let deadline = Instant::now() + length;
    let threads: Vec<_> = (0..workers)
        .map(|_| std::thread::spawn(move || connections(target, deadline)))
        .collect();
    let (mut ok, mut failed) = (0u64, 0u64);
    for t in threads {
        let (o, f) = t.join().unwrap();
        ok += o;
        failed += f;
    }
    println!(
        "target={target} workers={workers} connections_per_s={:.0} ok={ok} failed={failed} failed_share={:.4}",
        ok as f64 / length.as_secs_f64(),
        failed as f64 / (ok + failed).max(1) as f64,
    );
}

/// One worker's short connections until `deadline`: (succeeded, failed).
fn connections(target: SocketAddr, deadline: Instant) -> (u64, u64) {
    let (mut ok, mut failed) = (0, 0);
    let request = [0x42u8; 64];
    while Instant::now() < deadline {
        let exchange = || -> std::io::Result<()> {
            let mut stream = TcpStream::connect_timeout(&target, Duration::from_secs(2))?;
            stream.set_read_timeout(Some(Duration::from_secs(2)))?;
            stream.write_all(&request)?;
            let mut back = [0u8; 64];
            stream.read_exact(&mut back)?;
            if back != request {
                return Err(std::io::Error::other("wrong bytes back"));
            }
            Ok(())
        };
        match exchange() {
            Ok(()) => ok += 1,
            Err(_) => failed += 1,
        }
    }
    (ok, failed)
}
