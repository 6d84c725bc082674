//! Protection against overload and hostile peers: a cap on TLS handshakes in progress, node-wide
//! and per source address (over the cap a connection is closed at once rather than queued, so a
//! flood or a slow peer never delays the others), and the open-files limit raised at start.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

pub struct HandshakeLimiter {
    max_node: usize,
    max_per_source: usize,
    in_progress: Mutex<(usize, HashMap<IpAddr, usize>)>,
    refused: AtomicU64,
}

/// One handshake in progress; dropping it frees its place.
pub struct HandshakePermit {
    limiter: Arc<HandshakeLimiter>,
    source: IpAddr,
}

impl HandshakeLimiter {
    pub fn new(max_node: usize, max_per_source: usize) -> Arc<HandshakeLimiter> {
        Arc::new(HandshakeLimiter {
            max_node,
            max_per_source,
            in_progress: Mutex::new((0, HashMap::new())),
            refused: AtomicU64::new(0),
        })
    }

    /// A place for one more handshake from `source`, or `None` when the node or the source is at
    /// its cap.
    pub fn try_acquire(self: &Arc<Self>, source: IpAddr) -> Option<HandshakePermit> {
        let mut guard = self.in_progress.lock();
        let (total, per_source) = &mut *guard;
        let mine = per_source.get(&source).copied().unwrap_or(0);
        if *total >= self.max_node || mine >= self.max_per_source {
            self.refused.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        *total += 1;
        per_source.insert(source, mine + 1);
        Some(HandshakePermit { limiter: self.clone(), source })
    }

    /// Handshakes refused so far.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }
}

impl Drop for HandshakePermit {
    fn drop(&mut self) {
        let mut guard = self.limiter.in_progress.lock();
        let (total, per_source) = &mut *guard;
        *total -= 1;
        if let Some(n) = per_source.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                per_source.remove(&self.source);
            }
        }
    }
}

/// Gives memory that is free inside the allocator back to the kernel (glibc keeps freed heap
/// pages mapped; after a burst of connections that can be tens of MiB). Called when the number of
/// live connections has fallen well below its peak; it walks the free lists, well under a
/// millisecond for the agent's heap.
pub fn release_free_memory() {
    // SAFETY: malloc_trim(3) only operates on the allocator's own free lists; it is thread-safe
    // and has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Decides when to give memory back: after the live connection count has dropped to half of
/// its peak since the last release (and by at least `min_drop`).
pub struct Trimmer {
    peak: usize,
    min_drop: usize,
}

impl Trimmer {
    pub fn new(min_drop: usize) -> Trimmer {
        Trimmer { peak: 0, min_drop }
    }

    /// Notes the current count; true when it is time to release.
    pub fn observe(&mut self, live: usize) -> bool {
        if live > self.peak {
            self.peak = live;
            return false;
        }
        let dropped = self.peak - live;
        if dropped >= self.min_drop && live <= self.peak / 2 {
            self.peak = live;
            return true;
        }
        false
    }
}

/// Raises the soft open-files limit to the hard limit (every proxied connection holds sockets).
/// Returns (before, after).
pub fn raise_nofile() -> std::io::Result<(u64, u64)> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    Ok((soft, hard))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handshakes_are_capped_per_source_and_per_node_and_freed_on_drop() {
        let l = HandshakeLimiter::new(3, 2);
        let (a, b): (IpAddr, IpAddr) = ("198.19.1.11".parse().unwrap(), "198.19.1.12".parse().unwrap());
        let a1 = l.try_acquire(a).unwrap();
        let _a2 = l.try_acquire(a).unwrap();
        assert!(l.try_acquire(a).is_none(), "a third from one source is over its cap");
        let _b1 = l.try_acquire(b).unwrap();
        assert!(l.try_acquire(b).is_none(), "the node is at its cap");
        assert_eq!(l.refused(), 2);
        drop(a1);
        assert!(l.try_acquire(b).is_some(), "a finished handshake frees its place");
    }

    #[test]
    fn memory_is_released_once_the_load_has_halved_from_its_peak() {
        let mut t = Trimmer::new(100);
        assert!(!t.observe(50), "rising");
        assert!(!t.observe(2000));
        assert!(!t.observe(1500), "not yet half");
        assert!(t.observe(900), "below half the peak");
        assert!(!t.observe(800), "released already; the peak is now 900");
        assert!(t.observe(0));
        let mut small = Trimmer::new(100);
        assert!(!small.observe(60));
        assert!(!small.observe(0), "a drop smaller than the minimum is not worth a release");
    }

    #[test]
    fn the_open_files_limit_is_raised_to_the_hard_limit() {
        let (_, hard) = raise_nofile().unwrap();
        let (soft, _) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
        assert_eq!(soft, hard);
    }
}
