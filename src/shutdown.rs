//! Stop signals and the session drain.
//!
//! A signal is a flume channel nobody ever sends on: dropping its one [`Trigger`] makes every
//! cloned [`Signal::wait`] return. Sessions hold a [`DrainGuard`] (an unused sender); when the
//! last guard is gone, [`Drain::wait`] returns, so the relay knows every session has ended
//! without keeping a list of them.

use std::future::Future;
use std::pin::pin;
use std::time::Duration;

use futures::future::{self, Either};

use crate::rt;

/// Fires its [`Signal`]s when dropped or [`Trigger::fire`]d.
#[derive(Debug)]
pub struct Trigger(#[allow(dead_code)] flume::Sender<()>);

/// Waits for a [`Trigger`]; cheap to clone.
#[derive(Debug, Clone)]
pub struct Signal(flume::Receiver<()>);

/// A trigger and the signal it fires.
pub fn signal() -> (Trigger, Signal) {
    let (tx, rx) = flume::bounded(1);
    (Trigger(tx), Signal(rx))
}

impl Trigger {
    pub fn fire(self) {}
}

impl Signal {
    /// Returns once the trigger has fired (at once if it already has).
    pub async fn wait(&self) {
        // Nothing is ever sent: the only way out is the sender being dropped.
        let _ = self.0.recv_async().await;
    }

    /// `work`'s output, or `None` when this signal fires first (`work` is then dropped).
    pub async fn unless<F: Future>(&self, work: F) -> Option<F::Output> {
        match future::select(pin!(work), pin!(self.wait())).await {
            Either::Left((output, _)) => Some(output),
            Either::Right(_) => None,
        }
    }
}

/// Held by every live session; dropped when the session ends.
#[derive(Debug, Clone)]
pub struct DrainGuard(#[allow(dead_code)] flume::Sender<()>);

/// Learns when every [`DrainGuard`] is gone.
#[derive(Debug)]
pub struct Drain {
    guard: Option<DrainGuard>,
    done: flume::Receiver<()>,
}

impl Drain {
    pub fn new() -> Self {
        let (tx, done) = flume::bounded(1);
        Drain {
            guard: Some(DrainGuard(tx)),
            done,
        }
    }

    /// A guard for a new session, or `None` once draining has begun.
    pub fn guard(&self) -> Option<DrainGuard> {
        self.guard.clone()
    }

    /// Stops handing out guards and waits up to `limit` for the live ones to go.
    /// True when they all went in time.
    pub async fn wait(&mut self, limit: Duration) -> bool {
        self.guard = None;
        let done = self.done.clone();
        rt::timeout(limit, async move {
            let _ = done.recv_async().await;
        })
        .await
        .is_some()
    }
}

impl Default for Drain {
    fn default() -> Self {
        Self::new()
    }
}
