//! The process's file-descriptor budget: raised to the hard limit at start, as HAProxy and
//! nginx do, and turned into a cap on live sessions so that relayd only accepts what it can
//! serve. Past the cap, listeners stop accepting (the kernel's backlog holds the clients) until
//! sessions end; a reserve stays free for the status page, health checks and the runtime.

use std::io;

/// Descriptors kept out of the session budget (a quarter of the limit, within these bounds):
/// listeners, the status page and its clients, health checks, DNS, rtnetlink, the runtime's.
pub const RESERVE_MIN: u64 = 24;
pub const RESERVE_MAX: u64 = 64;
/// Descriptors one session may hold: its client and its upstream (splice pipes are extra, and
/// fall back to copying when none can be had).
pub const PER_SESSION: u64 = 2;

/// The soft and hard RLIMIT_NOFILE.
pub fn nofile() -> io::Result<(u64, u64)> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit fills the struct it is given.
    crate::rt::check(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) })?;
    Ok((limit.rlim_cur, limit.rlim_max))
}

/// Raises the soft limit to the hard one; returns the limit now in force.
pub fn raise_nofile() -> io::Result<u64> {
    let (soft, hard) = nofile()?;
    if soft < hard {
        let limit = libc::rlimit {
            rlim_cur: hard,
            rlim_max: hard,
        };
        // SAFETY: setrlimit reads the struct it is given.
        crate::rt::check(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) })?;
    }
    Ok(nofile()?.0)
}

/// Live sessions (TCP connections and UDP flows) the descriptor limit `soft` can serve.
pub fn session_cap(soft: u64) -> u64 {
    let reserve = (soft / 4).clamp(RESERVE_MIN, RESERVE_MAX);
    (soft.saturating_sub(reserve) / PER_SESSION).max(1)
}

/// The relay's session cap, read again whenever the process runs short of descriptors (the
/// limit may have been lowered under it, with prlimit).
#[derive(Debug)]
pub struct Budget {
    cap: std::sync::atomic::AtomicU64,
}

impl Budget {
    pub fn new() -> Self {
        let budget = Budget {
            cap: std::sync::atomic::AtomicU64::new(0),
        };
        budget.refresh();
        budget
    }

    pub fn cap(&self) -> u64 {
        self.cap.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Reads the limit again; returns the cap it sets.
    pub fn refresh(&self) -> u64 {
        let cap = session_cap(nofile().map_or(1024, |(soft, _)| soft));
        self.cap.store(cap, std::sync::atomic::Ordering::Relaxed);
        cap
    }
}

impl Default for Budget {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_leaves_the_reserve_and_never_reaches_zero() {
        assert_eq!(session_cap(1024), (1024 - 64) / 2);
        assert_eq!(session_cap(64), (64 - 24) / 2);
        assert_eq!(session_cap(0), 1);
        assert_eq!(session_cap(u64::MAX), (u64::MAX - 64) / 2);
    }
}
