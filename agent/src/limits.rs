//! Protection against overload and hostile peers: a cap on TLS handshakes in progress, node-wide
//! and per source address (over the cap a connection is closed at once rather than queued, so a
//! flood or a slow peer never delays the others), and the open-files limit raised at start.
//!
//! Sources split in two: peers that completed a handshake recently (the other nodes' agents) and
//! everyone else. Everyone else shares at most half of the node's places, a quarter of a known
//! peer's share each, so a few hostile sources can never hold the places the mesh's own peers
//! need.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

pub struct HandshakeLimiter {
    max_node: usize,
    max_per_source: usize,
    in_progress: Mutex<InProgress>,
    refused: AtomicU64,
}

#[derive(Default)]
struct InProgress {
    total: usize,
    /// Of `total`, from sources not known.
    unknown: usize,
    per_source: HashMap<IpAddr, usize>,
    /// Sources that completed a handshake, and when they last did.
    known: HashMap<IpAddr, Instant>,
}

/// A source stays known this long after its last completed handshake.
const KNOWN_FOR: Duration = Duration::from_secs(600);
/// Known sources remembered at most (the oldest are forgotten first).
const MAX_KNOWN: usize = 4096;

/// One handshake in progress; dropping it frees its place.
pub struct HandshakePermit {
    limiter: Arc<HandshakeLimiter>,
    source: IpAddr,
    /// Counted as a known source's.
    known: bool,
}

impl HandshakeLimiter {
    pub fn new(max_node: usize, max_per_source: usize) -> Arc<HandshakeLimiter> {
        Arc::new(HandshakeLimiter {
            max_node,
            max_per_source,
            in_progress: Mutex::new(InProgress::default()),
            refused: AtomicU64::new(0),
        })
    }

    /// A place for one more handshake from `source`, or `None` when the node or the source is at
    /// its cap (the smaller caps of unknown sources, see the module's notes).
    pub fn try_acquire(self: &Arc<Self>, source: IpAddr) -> Option<HandshakePermit> {
        let mut g = self.in_progress.lock();
        let known = g.known.get(&source).is_some_and(|at| at.elapsed() < KNOWN_FOR);
        let mine = g.per_source.get(&source).copied().unwrap_or(0);
        let (source_cap, unknown_full) = match known {
            true => (self.max_per_source, false),
            false => ((self.max_per_source / 4).max(1), g.unknown >= (self.max_node / 2).max(1)),
        };
        if g.total >= self.max_node || mine >= source_cap || unknown_full {
            self.refused.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        g.total += 1;
        if !known {
            g.unknown += 1;
        }
        g.per_source.insert(source, mine + 1);
        Some(HandshakePermit { limiter: self.clone(), source, known })
    }

    /// Handshakes refused so far.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Sources with a handshake in flight (none is remembered once it has none).
    #[cfg(test)]
    pub fn sources_in_flight(&self) -> usize {
        self.in_progress.lock().per_source.len()
    }
}

impl HandshakePermit {
    /// The handshake completed with a valid peer: its source is known from now on (and the
    /// place is freed when the permit drops).
    pub fn established(&self) {
        let mut g = self.limiter.in_progress.lock();
        if g.known.len() >= MAX_KNOWN && !g.known.contains_key(&self.source) {
            g.known.retain(|_, at| at.elapsed() < KNOWN_FOR);
            if g.known.len() >= MAX_KNOWN {
                if let Some(oldest) = g.known.iter().min_by_key(|(_, at)| **at).map(|(ip, _)| *ip) {
                    g.known.remove(&oldest);
                }
            }
        }
        g.known.insert(self.source, Instant::now());
    }
}

impl Drop for HandshakePermit {
    fn drop(&mut self) {
        let mut g = self.limiter.in_progress.lock();
        g.total -= 1;
        if !self.known {
            g.unknown -= 1;
        }
        if let Some(n) = g.per_source.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                g.per_source.remove(&self.source);
            }
        }
    }
}

/// The process's resident memory (bytes) and open file descriptors, from `/proc/self`
/// (0 when unreadable).
pub fn process_usage() -> (i64, i64) {
    let rss = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<i64>().ok())
        .map(|pages| pages * 4096)
        .unwrap_or(0);
    let fds = std::fs::read_dir("/proc/self/fd").map(|d| d.count() as i64).unwrap_or(0);
    (rss, fds)
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
        let (a, b, c): (IpAddr, IpAddr, IpAddr) =
            ("198.19.1.11".parse().unwrap(), "198.19.1.12".parse().unwrap(), "198.19.1.13".parse().unwrap());
        for ip in [a, b, c] {
            l.try_acquire(ip).unwrap().established();
        }
        let a1 = l.try_acquire(a).unwrap();
        let _a2 = l.try_acquire(a).unwrap();
        assert!(l.try_acquire(a).is_none(), "a third from one source is over its cap");
        let _b1 = l.try_acquire(b).unwrap();
        assert!(l.try_acquire(c).is_none(), "the node is at its cap");
        assert_eq!(l.refused(), 2);
        drop(a1);
        assert!(l.try_acquire(c).is_some(), "a finished handshake frees its place");
    }

    #[test]
    fn sources_never_seen_cannot_take_the_places_of_the_meshs_own_peers() {
        let l = HandshakeLimiter::new(512, 64);
        let peer: IpAddr = "198.18.0.2".parse().unwrap();
        l.try_acquire(peer).unwrap().established();
        // Eight hostile sources, each as many handshakes as it can hold.
        let mut held = Vec::new();
        for i in 0..8u8 {
            let src = IpAddr::from([203, 0, 113, i]);
            while let Some(p) = l.try_acquire(src) {
                held.push(p);
            }
        }
        assert_eq!(held.len(), 8 * 16, "each unknown source gets a quarter of a known peer's share");
        // Enough of them fill the half unknown sources share; then no unknown source gets more…
        for i in 8..40u8 {
            let src = IpAddr::from([203, 0, 113, i]);
            while let Some(p) = l.try_acquire(src) {
                held.push(p);
            }
        }
        assert_eq!(held.len(), 256, "unknown sources share at most half the node");
        assert!(l.try_acquire([203, 0, 113, 200].into()).is_none());
        // …while the mesh's own peer still has its full share.
        let ours: Vec<_> = (0..64).map_while(|_| l.try_acquire(peer)).collect();
        assert_eq!(ours.len(), 64, "a known peer is never starved by unknown sources");
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
