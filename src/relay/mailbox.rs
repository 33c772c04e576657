//! How the relay hands its running actors what changed without waiting on them: one-value
//! mailboxes whose newest value wins ([`Slot`]), and the fan-out of the Dialer's egress news to
//! every balancer.

use std::collections::HashMap;

use futures::future::Either;

use crate::balancer::BalancerHandle;
use crate::config::EgressId;
use crate::dialer::EgressNews;
use crate::rt;

/// One-value mailboxes whose newest value wins, one for each actor of a kind (a UDP route has
/// a listener per worker): how the relay hands running actors their new parts without waiting
/// on them. Dropping it tells the actors there will be no more.
pub(super) struct Slot<T>(Vec<(flume::Sender<T>, flume::Receiver<T>)>);

impl<T: Clone> Slot<T> {
    pub fn new() -> Self {
        Slot(Vec::new())
    }

    /// The mailbox of one more actor.
    pub fn receiver(&mut self) -> flume::Receiver<T> {
        let (tx, rx) = flume::bounded(1);
        self.0.push((tx, rx.clone()));
        rx
    }

    /// Puts `value` in every mailbox, in place of one its actor has not taken yet (the relay
    /// is the only sender, so there is room once the stale one is out).
    pub fn put(&self, value: T) {
        for (tx, rx) in &self.0 {
            let _ = rx.try_recv();
            let _ = tx.try_send(value.clone());
        }
    }
}

/// Hands the Dialer's egress news to every balancer. Balancers a reload brings hear the newest
/// word on each egress first (balancers that had it already ignore it by its number).
pub(super) async fn egress_news(news: flume::Receiver<EgressNews>, balancers: flume::Receiver<Vec<BalancerHandle>>) {
    let mut told: Vec<BalancerHandle> = Vec::new();
    let mut latest: HashMap<EgressId, EgressNews> = HashMap::new();
    loop {
        let word = async { Either::Left(news.recv_async().await) };
        let list = async {
            match balancers.recv_async().await {
                Ok(list) => Either::Right(list),
                // The relay is stopping: news alone, until the Dialer ends.
                Err(_) => std::future::pending().await,
            }
        };
        let words: Vec<EgressNews> = match rt::race(word, list).await {
            Either::Left(Err(_)) => break,
            Either::Left(Ok(word)) => {
                latest.insert(word.egress, word.clone());
                vec![word]
            }
            Either::Right(list) => {
                told = list;
                latest.values().cloned().collect()
            }
        };
        for balancer in &told {
            for word in &words {
                let _ = balancer.egress_news(word.egress, word.down.clone(), word.seq).await;
            }
        }
    }
}
