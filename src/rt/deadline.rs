//! Deadlines for timeouts that rarely fire: a session's idle and fin timeouts, a dial's
//! connect timeout.
//!
//! async-io's timers wake the reactor on every insertion (an eventfd write, and a reactor
//! round with a `timerfd_settime`), which made two timers a quarter of the CPU a short
//! connection cost. Deadlines instead go into one ordered table, watched by one thread that
//! sleeps until the earliest of them (at most [`NAP`] at a time). Adding a deadline takes a
//! short lock and wakes that thread only when the new deadline comes before the thread's next
//! wake-up, which a minutes-long idle timeout or a seconds-long connect timeout almost never
//! does.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

/// Stands for a deadline beyond what the clock can hold.
const NEVER: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// The longest the watcher sleeps at a time; a deadline further out than this never wakes it.
const NAP: Duration = Duration::from_secs(1);

/// A place in the table: when, and a number that tells apart deadlines at the same instant.
type Key = (Instant, u64);

struct Table {
    wakers: BTreeMap<Key, Waker>,
    next_id: u64,
    /// When the watcher wakes next, if it is asleep.
    wakes_at: Option<Instant>,
}

struct Watcher {
    table: Mutex<Table>,
    bell: Condvar,
}

fn watcher() -> &'static Watcher {
    static WATCHER: OnceLock<&'static Watcher> = OnceLock::new();
    WATCHER.get_or_init(|| {
        let watcher: &'static Watcher = Box::leak(Box::new(Watcher {
            table: Mutex::new(Table {
                wakers: BTreeMap::new(),
                next_id: 0,
                wakes_at: None,
            }),
            bell: Condvar::new(),
        }));
        std::thread::Builder::new()
            .name("relayd-timer".into())
            .spawn(move || watcher.run())
            .expect("cannot start the timer thread");
        watcher
    })
}

impl Watcher {
    fn lock(&self) -> MutexGuard<'_, Table> {
        // A waker that panicked while the lock was held leaves the table itself intact.
        super::lock(&self.table)
    }

    /// Wakes every deadline as it passes; sleeps until the next one, or for [`NAP`].
    fn run(&self) {
        let mut due = Vec::new();
        let mut table = self.lock();
        loop {
            let now = Instant::now();
            while let Some(entry) = table.wakers.first_entry() {
                if entry.key().0 > now {
                    break;
                }
                due.push(entry.remove());
            }
            if !due.is_empty() {
                // Wake outside the lock: a woken task may run at once and set a new deadline.
                drop(table);
                due.drain(..).for_each(Waker::wake);
                table = self.lock();
                continue;
            }
            let next = table
                .wakers
                .first_key_value()
                .map_or(now + NAP, |(key, _)| key.0.min(now + NAP));
            table.wakes_at = Some(next);
            table = match self.bell.wait_timeout(table, next.saturating_duration_since(now)) {
                Ok((table, _)) => table,
                Err(poisoned) => poisoned.into_inner().0,
            };
            table.wakes_at = None;
        }
    }

    fn insert(&self, at: Instant, waker: Waker) -> Key {
        let mut table = self.lock();
        let key = (at, table.next_id);
        table.next_id += 1;
        table.wakers.insert(key, waker);
        if table.wakes_at.is_some_and(|wakes_at| at < wakes_at) {
            self.bell.notify_one();
        }
        key
    }

    fn remove(&self, key: Key) {
        self.lock().wakers.remove(&key);
    }
}

/// A future that is ready once its instant has passed; it can be moved to another instant.
#[derive(Debug)]
pub struct Deadline {
    at: Instant,
    /// Where it waits in the table, and with which waker.
    waiting: Option<(Key, Waker)>,
}

impl Deadline {
    pub fn at(at: Instant) -> Self {
        Deadline { at, waiting: None }
    }

    pub fn after(duration: Duration) -> Self {
        let now = Instant::now();
        // Past what the clock holds is never, as far as anyone waiting can tell.
        Self::at(now.checked_add(duration).unwrap_or(now + NEVER))
    }

    /// Moves the deadline; it takes effect when it is next polled.
    pub fn set_at(&mut self, at: Instant) {
        self.at = at;
    }

    fn leave(&mut self) {
        if let Some((key, _)) = self.waiting.take() {
            watcher().remove(key);
        }
    }
}

impl Future for Deadline {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        if Instant::now() >= this.at {
            this.leave();
            return Poll::Ready(());
        }
        match &this.waiting {
            Some((key, waker)) if key.0 == this.at && waker.will_wake(cx.waker()) => {}
            _ => {
                this.leave();
                let key = watcher().insert(this.at, cx.waker().clone());
                this.waiting = Some((key, cx.waker().clone()));
            }
        }
        Poll::Pending
    }
}

impl Drop for Deadline {
    fn drop(&mut self) {
        self.leave();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_deadline_wakes_its_task_once_it_has_passed() {
        let started = Instant::now();
        crate::rt::block_on(Deadline::after(Duration::from_millis(30)));
        assert!(started.elapsed() >= Duration::from_millis(30));
    }

    #[test]
    fn a_moved_deadline_counts_from_its_new_instant() {
        let started = Instant::now();
        let mut deadline = Deadline::after(Duration::from_secs(3600));
        crate::rt::block_on(async {
            // Registered far out first, then moved close: the watcher must be woken for it.
            let polled = futures::poll!(&mut deadline);
            assert!(polled.is_pending());
            deadline.set_at(Instant::now() + Duration::from_millis(20));
            (&mut deadline).await;
        });
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(20) && took < Duration::from_secs(60),
            "{took:?}"
        );
    }

    #[test]
    fn a_dropped_deadline_leaves_the_table() {
        let key = {
            let mut deadline = Deadline::after(Duration::from_secs(3600));
            let waker = futures::task::noop_waker();
            let polled = Pin::new(&mut deadline).poll(&mut Context::from_waker(&waker));
            assert!(polled.is_pending());
            deadline.waiting.as_ref().map(|(key, _)| *key).expect("registered")
        };
        assert!(!watcher().lock().wakers.contains_key(&key));
    }
}
