//! The library as an embedder uses it: a relay's `workers` are its own threads, as many as asked,
//! gone when it stops; async-std's streams are injected as they are. One test in this binary,
//! so that no other relay's threads are counted.

#[path = "relay/harness/mod.rs"]
mod harness;

use async_std::os::unix::net::UnixStream;
use async_std::prelude::*;
use harness::backend::Backend;
use harness::{config, event_loops, route, within};
use relayd::{Config, Relay};

#[async_std::test]
async fn a_relay_runs_on_the_workers_it_is_given_and_takes_them_when_it_stops() {
    let greeter = Backend::greeter("hello").await;
    assert_eq!(event_loops("self", 0), 0);
    let text = config(&[route("r", &[greeter.addr], "")]).replacen('(', "(workers: 1, ", 1);
    let relay = Relay::start(&Config::parse(&text, "test").unwrap()).unwrap();
    assert_eq!(
        (relay.workers(), event_loops("self", 1)),
        (1, 1),
        "one worker asked, one thread"
    );
    for _ in 0..3 {
        // async-std's own Unix stream, as it is: its close sends the FIN.
        let (mut client, relay_side) = UnixStream::pair().unwrap();
        let session = relay.inject("r", relay_side, "192.0.2.1:1".parse().unwrap()).unwrap();
        let mut got = Vec::new();
        within(client.read_to_end(&mut got)).await.unwrap();
        assert_eq!(got, b"hello");
        drop(client);
        assert!(matches!(within(session).await.end, relayd::SessionEnd::Done));
    }
    assert_eq!(within(relay.shutdown()).await.forced, 0);
    assert_eq!(event_loops("self", 0), 0, "the relay's threads end with it");
}
