//! Embedding relayd in an async-std program: build a config in code, start two backends and the
//! relay (on one worker thread of its own), send a few connections through it (round robin shows
//! in who answers), reload it with one backend fewer, inject one synthetic session on an async-std Unix socket pair, relay a UDP
//! datagram, then shut down cleanly.
//!
//!     cargo run --example embed

use std::net::SocketAddr;

use async_std::net::{TcpListener, TcpStream, UdpSocket};
use async_std::os::unix::net::UnixStream;
use async_std::prelude::*;
use relayd::{Config, Relay, RouteConfig};

/// A backend that answers every connection with its name.
async fn backend(name: &'static str) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    async_std::task::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let _ = stream.write_all(format!("hello from {name}").as_bytes()).await;
        }
    });
    Ok(addr)
}

/// A UDP backend that answers every datagram with its name and the datagram.
async fn udp_backend(name: &'static str) -> anyhow::Result<SocketAddr> {
    let socket = UdpSocket::bind("127.0.0.1:0").await?;
    let addr = socket.local_addr()?;
    async_std::task::spawn(async move {
        let mut buf = [0u8; 1500];
        while let Ok((n, peer)) = socket.recv_from(&mut buf).await {
            let answer = format!("{name} got {:?}", String::from_utf8_lossy(&buf[..n]));
            let _ = socket.send_to(answer.as_bytes(), peer).await;
        }
    });
    Ok(addr)
}

#[async_std::main]
async fn main() -> anyhow::Result<()> {
    relayd::logging::init(log::LevelFilter::Warn, relayd::logging::Format::auto())?;
    {
        let (a, b) = (backend("a").await?, backend("b").await?);
        let udp = udp_backend("udp-a").await?;
        let config = Config {
            drain_timeout: Some("5s".into()),
            workers: Some(1),
            routes: vec![
                RouteConfig {
                    connect_timeout: Some("1s".into()),
                    ..RouteConfig::tcp("web", "127.0.0.1:0", &[&a.to_string(), &b.to_string()])
                },
                RouteConfig::udp("echo", "127.0.0.1:0", &[&udp.to_string()]),
            ],
            ..Config::default()
        };
        let mut relay = Relay::start(&config)?;
        let addr = relay.local_addr("web").expect("the route exists");
        println!(
            "relay listening on {addr} with {} worker; backends a={a} b={b}",
            relay.workers()
        );

        for i in 1..=4 {
            let mut client = TcpStream::connect(addr).await?;
            let mut answer = String::new();
            client.read_to_string(&mut answer).await?;
            println!("connection {i}: {answer}");
        }

        // A reload: "web" goes to b only. The listening socket stays; each change is listed.
        let mut next = config.clone();
        next.routes[0].backends.retain(|backend| backend.addr == b.to_string());
        for change in relay.reload(next.validate()?).await? {
            println!("reload: {change}");
        }
        let mut client = TcpStream::connect(addr).await?;
        let mut answer = String::new();
        client.read_to_string(&mut answer).await?;
        drop(client);
        println!("after the reload: {answer}");

        // A synthetic session: no socket on the listener, one end of an async-std Unix pair
        // instead (its close sends the FIN a relayed session needs).
        let (mut client, relay_side) = UnixStream::pair()?;
        let session = relay.inject("web", relay_side, "192.0.2.1:5000".parse()?)?;
        let mut answer = Vec::new();
        client.read_to_end(&mut answer).await?;
        drop(client);
        let report = session.await;
        println!(
            "injected session: {} ({} bytes back from {:?}, ended {:?})",
            String::from_utf8_lossy(&answer),
            report.bytes_down,
            report.backend,
            report.end
        );

        let client = UdpSocket::bind("127.0.0.1:0").await?;
        client
            .send_to(b"ping", relay.local_addr("echo").expect("the route exists"))
            .await?;
        let mut buf = [0u8; 1500];
        let (n, from) = client.recv_from(&mut buf).await?;
        println!("udp reply from {from}: {}", String::from_utf8_lossy(&buf[..n]));

        let stop = relay.shutdown().await;
        println!("shut down: {} drained, {} forced", stop.drained, stop.forced);
        Ok(())
    }
}
