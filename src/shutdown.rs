//! Stop signals and the session drain.
//!
//! A [`Signal`] fires when its one [`Trigger`] is dropped: every cloned [`Signal::wait`] then
//! returns. Sessions hold a [`DrainGuard`] (an unused sender); when the last guard is gone,
//! [`Drain::wait`] returns, so the relay knows every session has ended without keeping a list
//! of them.

use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use event_listener::Event;
use futures::future::{self, Either};

use crate::rt;

#[derive(Debug, Default)]
struct Shared {
    fired: AtomicBool,
    event: Event,
}

/// Fires its [`Signal`]s when dropped or [`Trigger::fire`]d.
#[derive(Debug)]
pub struct Trigger(Arc<Shared>);

/// Waits for a [`Trigger`]; cheap to clone.
///
/// Every session waits on the relay's force signal for its whole life, so a wait costs little:
/// a flag to check, and a listener linked into (and out of) the signal's list in O(1), kept in
/// the waiting future itself rather than allocated.
#[derive(Debug, Clone)]
pub struct Signal(Arc<Shared>);

/// A trigger and the signal it fires.
pub fn signal() -> (Trigger, Signal) {
    let shared = Arc::new(Shared::default());
    (Trigger(shared.clone()), Signal(shared))
}

impl Trigger {
    pub fn fire(self) {}

    /// Another signal this trigger fires.
    pub fn signal(&self) -> Signal {
        Signal(self.0.clone())
    }
}

impl Drop for Trigger {
    fn drop(&mut self) {
        self.0.fired.store(true, Ordering::Release);
        self.0.event.notify(usize::MAX);
    }
}

impl Signal {
    /// Returns once the trigger has fired (at once if it already has).
    pub async fn wait(&self) {
        loop {
            if self.0.fired.load(Ordering::Acquire) {
                return;
            }
            event_listener::listener!(self.0.event => listener);
            // Fired between the check and the listening: the listener missed the news.
            if self.0.fired.load(Ordering::Acquire) {
                return;
            }
            listener.await;
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signal_reaches_waiters_from_before_and_after_it_fired() {
        let (trigger, signal) = signal();
        let waiters: Vec<_> = (0..8)
            .map(|_| {
                let signal = signal.clone();
                rt::spawn(async move { signal.wait().await })
            })
            .collect();
        // Still waiting: `unless` gives the work's output while the signal has not fired.
        assert_eq!(rt::block_on(signal.unless(async { 7 })), Some(7));
        trigger.fire();
        rt::block_on(futures::future::join_all(waiters));
        // Late waiters return at once, and work raced against a fired signal is dropped.
        rt::block_on(signal.wait());
        assert_eq!(rt::block_on(signal.unless(std::future::pending::<()>())), None);
    }
}
