//! relayd's load generator for `bench/`: small, bounded, and the same for every relay measured.
//!
//!     cargo run --release --example loadgen -- udp-echo 127.0.0.1:9000
//!     cargo run --release --example loadgen -- udp-pingpong 127.0.0.1:9000 [clients=16] [secs=5] [size=64]
//!
//! `udp-pingpong` runs `clients` threads, each with its own socket, sending one datagram and
//! waiting for its answer before the next, for `secs` seconds; it prints round trips per second
//! and the p50/p99 round-trip time. Every loop stops by itself.

use std::net::{SocketAddr, UdpSocket};
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
        _ => eprintln!("usage: loadgen udp-echo ADDR | udp-pingpong ADDR [clients] [secs] [size]"),
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
        "target={target} clients={clients} size={size} round_trips_per_s={:.0} p50_us={} p99_us={} lost={lost}",
        rtts.len() as f64 / length.as_secs_f64(),
        pct(0.50).as_micros(),
        pct(0.99).as_micros(),
    );
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
