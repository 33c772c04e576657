//! The zero-copy path really runs on TCP sessions, and moves the same bytes as the copy path.
//! (A fast path that silently falls back is a known failure in peers.)

use crate::harness;

use async_std::prelude::*;
use harness::backend::Backend;
use harness::{Harness, close_write, config, read_all, route, within};
use rand::{RngCore, SeedableRng};
use relayd::Transfer;

fn random(len: usize, seed: u64) -> Vec<u8> {
    let mut bytes = vec![0u8; len];
    rand::rngs::SmallRng::seed_from_u64(seed).fill_bytes(&mut bytes);
    bytes
}

/// Sends `payload` through a real TCP connection to the route, to an echo backend, and
/// returns what came back.
async fn echo_through(h: &Harness, payload: &[u8]) -> Vec<u8> {
    let client = h.connect("r").await;
    let (mut reader, mut writer) = (&client, &client);
    let send = async {
        writer.write_all(payload).await.unwrap();
        client.shutdown(std::net::Shutdown::Write).unwrap();
    };
    let (_, back) = futures::future::join(send, read_all(&mut reader)).await;
    back
}

#[async_std::test]
async fn a_tcp_session_moves_its_bytes_by_splice_and_they_arrive_intact() {
    let echo = Backend::echo().await;
    let h = Harness::start(&config(&[route("r", &[echo.addr], "")]));
    let payload = random(8 << 20, 1);
    let back = echo_through(&h, &payload).await;
    assert!(back == payload, "8 MiB came back changed ({} bytes)", back.len());
    let stats = h.relay().stats();
    within(stats.until(|s| s.active() == 0)).await;
    assert_eq!((stats.spliced(), stats.copied(), stats.splice_fallbacks()), (1, 0, 0));
    assert_eq!(h.shutdown().await.forced, 0);
}

#[async_std::test]
async fn an_injected_stream_is_copied_and_splice_can_be_turned_off() {
    let echo = Backend::echo().await;
    let h = Harness::start(&config(&[route("r", &[echo.addr], "")]));
    let mut s = h.inject("r");
    s.client.write_all(b"through userspace").await.unwrap();
    close_write(&mut s.client).await;
    assert_eq!(read_all(&mut s.client).await, b"through userspace");
    assert_eq!(within(s.session).await.path, Transfer::Copy);
    assert_eq!(h.shutdown().await.forced, 0);

    let off = Harness::start(&format!("(splice: false, routes: [{}])", route("r", &[echo.addr], "")));
    let payload = random(1 << 20, 2);
    assert!(echo_through(&off, &payload).await == payload);
    let stats = off.relay().stats();
    within(stats.until(|s| s.active() == 0)).await;
    assert_eq!((stats.spliced(), stats.copied()), (0, 1));
    assert_eq!(off.shutdown().await.forced, 0);
}
