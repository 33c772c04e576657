//! A worker: one thread with its own run queue and its own reactor. Its tasks are polled on it
//! and nowhere else, and their sockets are registered with its epoll, so a session's events
//! are heard, handled and answered on one thread; the queue's lock is only ever contended by
//! a spawn or a wake from another thread (the control side's word, a channel's other end).

use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use async_task::{Runnable, Task};

use super::reactor::Reactor;

pub(super) struct Worker {
    queue: Mutex<VecDeque<Runnable>>,
    /// Set (with the queue locked) when the worker stops: a task scheduled then is dropped.
    closed: AtomicBool,
    pub reactor: Arc<Reactor>,
}

impl Worker {
    pub fn new() -> io::Result<Arc<Worker>> {
        Ok(Arc::new(Worker {
            queue: Mutex::new(VecDeque::new()),
            closed: AtomicBool::new(false),
            reactor: Reactor::new()?,
        }))
    }

    /// A task on this worker. A panic in it is carried to whoever awaits its handle (and
    /// dropped with a detached one): the worker thread lives on.
    pub fn spawn<F>(self: &Arc<Self>, future: F) -> Task<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let worker = self.clone();
        let (runnable, task) = async_task::Builder::new()
            .propagate_panic(true)
            .spawn(move |_| future, move |runnable| worker.schedule(runnable));
        runnable.schedule();
        task
    }

    fn schedule(&self, runnable: Runnable) {
        let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        if self.closed.load(Ordering::Relaxed) {
            drop(queue);
            // The worker has stopped: dropping the runnable drops the task's future, but not
            // here, where the waker's caller may hold a lock the future's drop takes (a
            // channel waking its receivers does): on the blocking pool. Only ever after a stop.
            blocking::unblock(move || drop(runnable)).detach();
            return;
        }
        queue.push_back(runnable);
        drop(queue);
        // Only a sleeping loop needs the call; one that is running sees the queue itself.
        self.reactor.wake();
    }

    /// Swaps the queue for `batch` (empty): its two buffers take turns, so nothing allocates.
    fn take_into(&self, batch: &mut VecDeque<Runnable>) {
        std::mem::swap(batch, &mut *self.queue.lock().unwrap_or_else(|e| e.into_inner()));
    }

    fn has_work(&self) -> bool {
        let queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        !queue.is_empty() || self.closed.load(Ordering::Relaxed)
    }

    /// The loop, on the worker's thread, until [`Worker::close`]: runs what is queued, then
    /// waits on its epoll (not at all when more was queued meanwhile), handing each event to
    /// the task that waits for it.
    pub fn run(&self) {
        Reactor::set_local(Some(self.reactor.clone()));
        let (mut events, mut wakers) = (Vec::with_capacity(256), Vec::new());
        let mut batch = VecDeque::new();
        while !self.closed.load(Ordering::Relaxed) {
            // What was queued when the turn began; what those tasks wake runs after the next
            // look at the epoll, so a task that keeps waking itself cannot starve the sockets.
            self.take_into(&mut batch);
            for runnable in batch.drain(..) {
                runnable.run();
            }
            let idle = !self.has_work();
            self.reactor.turn(&mut events, &mut wakers, idle, &|| self.has_work());
        }
        // Whatever is left goes: queued tasks now, and those waiting on a socket or a timer
        // once woken (they are scheduled onto a closed queue, which drops them).
        self.take_into(&mut batch);
        drop(batch);
        for waker in self.reactor.take_wakers() {
            waker.wake();
        }
        Reactor::set_local(None);
    }

    /// Stops the loop (from any thread).
    pub fn close(&self) {
        let queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        self.closed.store(true, Ordering::Relaxed);
        drop(queue);
        self.reactor.wake();
    }
}
