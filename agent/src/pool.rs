//! The HBONE connection pool: tunnel connections kept per (source pod, destination pod), each
//! carrying up to `--max-streams` CONNECT streams, so a new application connection costs one
//! HTTP/2 stream instead of a TCP and TLS handshake, and an idle one costs a stream's state
//! instead of a TLS session. Keyed by the source pod (its own certificate is presented) and the
//! destination pod's tunnel address and identity (the server accepts CONNECTs to its own pod
//! only). Connections idle past `--idle-timeout`, or found dead, leave the pool.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use parking_lot::Mutex;
use serde::Serialize;
use tracing::debug;

use crate::config::TunnelLimits;
use crate::identity::SpiffeId;
use crate::tunnel::{self, Activity, ActivityGuard, ClientConn, Error, H2Stream};

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    /// The source pod, by its netns cookie (unique for the pod's life).
    pub src: u64,
    /// The destination pod's tunnel address (`ip:15008`).
    pub dst: SocketAddr,
    /// The identity the destination must present.
    pub dst_id: SpiffeId,
}

type Slots = Arc<Mutex<HashMap<PoolKey, Arc<Slot>>>>;

pub struct Pool {
    limits: TunnelLimits,
    /// A slot leaves when its last connection does, so a long-lived pod's map holds the
    /// destinations it calls now, not every one it ever called.
    slots: Slots,
}

/// One destination of one source pod in the pool, for the node status.
#[derive(Debug, Clone, Serialize)]
pub struct PoolEntry {
    /// The source pod's netns cookie.
    pub source_netns_cookie: u64,
    pub destination: SocketAddr,
    pub destination_identity: String,
    pub connections: usize,
    pub streams: usize,
}

#[derive(Default)]
struct Slot {
    conns: Mutex<Vec<Arc<Pooled>>>,
    /// Held while a new connection is being made, so a burst of new streams waits for one
    /// handshake instead of starting one each.
    connecting: tokio::sync::Mutex<Attempts>,
}

/// What the last connection attempts of a slot gave, so that callers queued behind a failing
/// handshake fail with it at once instead of each waiting out a deadline of its own.
#[derive(Default)]
struct Attempts {
    count: u64,
    last_error: Option<String>,
}

struct Pooled {
    conn: ClientConn,
    activity: Activity,
    /// The generation of the source pod's certificate it was made with.
    generation: u64,
}

impl Pooled {
    /// Open, with room for a stream, made with the source's current certificate, and the peer's
    /// certificate still valid. (A renewed certificate means new connections: old ones finish
    /// their streams and leave when idle.)
    fn usable(&self, max: usize, generation: u64) -> bool {
        !*self.conn.closed.borrow()
            && self.activity.active() < max
            && self.generation == generation
            && std::time::SystemTime::now() < self.conn.peer_not_after
    }
}

/// A stream from the pool; the guard keeps its connection's slot counted until dropped (it is held
/// for that alone, never read).
pub struct PooledStream {
    pub stream: H2Stream,
    pub _guard: ActivityGuard,
}

impl Pool {
    pub fn new(limits: TunnelLimits) -> Pool {
        Pool { limits, slots: Arc::default() }
    }

    /// Opens a CONNECT stream to `target` over a pooled connection for `key` made with the source's
    /// certificate `generation`, making a new connection with `connect` when none has room. A
    /// stream refused because its connection was going away (GOAWAY, reset, dead) is retried once
    /// on a fresh connection.
    pub async fn stream<C, F>(
        &self,
        key: &PoolKey,
        target: SocketAddr,
        service: Option<&str>,
        generation: u64,
        connect: C,
    ) -> Result<PooledStream, Error>
    where
        C: Fn() -> F,
        F: Future<Output = Result<ClientConn, Error>>,
    {
        let slot = self.slot(key);
        let max = self.limits.max_streams as usize;
        let mut retried = false;
        loop {
            let (conn, guard) = match pick(&slot, max, generation) {
                Some(picked) => picked,
                None => {
                    let seen = slot.connecting.try_lock().map(|a| a.count).ok();
                    let mut attempts = slot.connecting.lock().await;
                    if let Some(picked) = pick(&slot, max, generation) {
                        picked
                    } else if let (None, Some(e)) = (seen, attempts.last_error.as_ref()) {
                        // We queued behind an attempt that failed: fail with it.
                        return Err(Error::Connect(format!("{}: {e}", key.dst)));
                    } else {
                        attempts.count += 1;
                        // Boxed: the handshake's state is large and rare; inline, every stream's
                        // task would carry room for it for its whole life.
                        let conn = match Box::pin(connect()).await {
                            Ok(c) => {
                                attempts.last_error = None;
                                c
                            }
                            Err(e) => {
                                attempts.last_error = Some(e.to_string());
                                drop(attempts);
                                // Nobody else waits on this slot and it holds nothing: it goes.
                                remove_if_unused(&self.slots, key, slot);
                                return Err(e);
                            }
                        };
                        let pooled = Arc::new(Pooled { conn, activity: Activity::default(), generation });
                        let guard = pooled.activity.enter();
                        slot.conns.lock().push(pooled.clone());
                        let evict = Eviction { slots: self.slots.clone(), key: key.clone(), slot: slot.clone() };
                        tokio::spawn(evict.when_idle_or_closed(pooled.clone(), self.limits.idle_timeout));
                        (pooled, guard)
                    }
                }
            };
            match tunnel::open(&conn.conn.send, target, service, self.limits.request_timeout).await {
                Ok(stream) => return Ok(PooledStream { stream, _guard: guard }),
                Err(e) if e.retryable() && !retried => {
                    debug!(dst = %key.dst, error = %e, "pooled tunnel connection went away; retrying on a new one");
                    slot.conns.lock().retain(|c| !Arc::ptr_eq(c, &conn));
                    retried = true;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Drops the pool's slots of a source pod (unenrolled); connections in use finish first.
    pub fn forget_source(&self, src: u64) {
        self.slots.lock().retain(|k, _| k.src != src);
    }

    /// Every (source, destination) in the pool with its connections and streams.
    pub fn entries(&self) -> Vec<PoolEntry> {
        let mut out: Vec<PoolEntry> = self
            .slots
            .lock()
            .iter()
            .map(|(k, slot)| {
                let conns = slot.conns.lock();
                PoolEntry {
                    source_netns_cookie: k.src,
                    destination: k.dst,
                    destination_identity: k.dst_id.to_string(),
                    connections: conns.len(),
                    streams: conns.iter().map(|c| c.activity.active()).sum(),
                }
            })
            .collect();
        out.sort_by_key(|e| (e.source_netns_cookie, e.destination));
        out
    }

    /// Destinations with a slot (for tests: emptied slots leave).
    #[cfg(test)]
    fn slots(&self) -> usize {
        self.slots.lock().len()
    }

    fn slot(&self, key: &PoolKey) -> Arc<Slot> {
        self.slots.lock().entry(key.clone()).or_default().clone()
    }
}

/// A connection with room for one more stream, reserved for the caller (no await in between).
fn pick(slot: &Slot, max: usize, generation: u64) -> Option<(Arc<Pooled>, ActivityGuard)> {
    let conns = slot.conns.lock();
    let c = conns.iter().find(|c| c.usable(max, generation))?;
    Some((c.clone(), c.activity.enter()))
}

/// Takes a connection out of the pool when idle or closed, and its slot when that was the last.
struct Eviction {
    slots: Slots,
    key: PoolKey,
    slot: Arc<Slot>,
}

impl Eviction {
    async fn when_idle_or_closed(self, conn: Arc<Pooled>, idle: std::time::Duration) {
        let mut closed = conn.conn.closed.clone();
        loop {
            tokio::select! {
                _ = conn.activity.idle_for(idle) => {}
                _ = closed.wait_for(|c| *c) => {}
            }
            let mut conns = self.slot.conns.lock();
            // Checked under the lock pickers reserve under: nobody took it meanwhile.
            if conn.activity.active() == 0 || *conn.conn.closed.borrow() {
                conns.retain(|c| !Arc::ptr_eq(c, &conn));
                debug!("tunnel connection left the pool");
                drop(conns);
                self.remove_slot_if_empty();
                return; // the last reference goes with this task: the connection closes
            }
        }
    }

    fn remove_slot_if_empty(self) {
        remove_if_unused(&self.slots, &self.key, self.slot);
    }
}

/// Removes `key`'s slot if `slot` is it and nobody but the map and this caller holds it: every
/// caller of `stream` and every pooled connection's eviction task holds the slot, so then it has
/// no connection and nobody is making or waiting for one. Decided under the map's lock, which
/// `slot()` hands slots out under: no caller can pick it up meanwhile.
fn remove_if_unused(slots: &Slots, key: &PoolKey, slot: Arc<Slot>) {
    let mut map = slots.lock();
    if map.get(key).is_some_and(|s| Arc::ptr_eq(s, &slot)) && Arc::strong_count(&slot) == 2 {
        map.remove(key);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use http::StatusCode;
    use tokio_util::sync::CancellationToken;

    use super::*;
    use crate::identity::{workload_id, TrustDomain};
    use crate::tunnel::Inbound;

    /// A pooled connection's slot leaves the pool with the connection: a long-lived pod's pool
    /// holds the destinations it calls now, not every one it ever called.
    #[tokio::test]
    async fn a_slot_leaves_the_pool_with_its_last_connection() {
        let td = TrustDomain::new("cluster.local").unwrap();
        let ids = crate::identity::store::test_identities("pool").await;
        let (cid, sid) = (workload_id(&td, "ns", "client").unwrap(), workload_id(&td, "ns", "server").unwrap());
        let client = ids.pod_tls(ids.issue("ns/client", &cid).await.unwrap()).unwrap();
        let server = ids.pod_tls(ids.issue("ns/server", &sid).await.unwrap()).unwrap();

        let limits = TunnelLimits { idle_timeout: Duration::from_millis(200), ..TunnelLimits::default() };
        let pool = Pool::new(limits.clone());
        let target: SocketAddr = "198.19.2.10:8080".parse().unwrap();
        let key = PoolKey { src: 7, dst: "198.19.2.10:15008".parse().unwrap(), dst_id: sid.clone() };
        let connect = || {
            let (client_io, server_io) = tokio::io::duplex(64 << 10);
            let (server_tls, server_limits) = (server.server.clone(), limits.clone());
            tokio::spawn(async move {
                let tasks = tokio_util::task::TaskTracker::new();
                let refuse = |inbound: Inbound, _| async move { inbound.refuse(StatusCode::SERVICE_UNAVAILABLE) };
                let _ = tunnel::serve(
                    server_io,
                    server_tls,
                    &server_limits,
                    || (),
                    CancellationToken::new(),
                    &tasks,
                    refuse,
                )
                .await;
            });
            let tls = client.client(&sid).unwrap();
            let limits = limits.clone();
            async move { tunnel::handshake(client_io, tls, target, &limits).await }
        };
        let stream = pool.stream(&key, target, None, 0, connect).await.unwrap();
        let entries = pool.entries();
        assert_eq!(entries.len(), 1);
        assert_eq!((entries[0].connections, entries[0].streams), (1, 1), "{entries:?}");
        assert_eq!(entries[0].destination_identity, sid.to_string());
        drop(stream);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while pool.slots() > 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the emptied slot never left the pool: {:?}",
                pool.entries()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(pool.entries().is_empty());
        // A destination that cannot be reached leaves no slot behind either.
        let refused = || async { Err::<ClientConn, _>(Error::Connect("refused".into())) };
        assert!(pool.stream(&key, target, None, 0, refused).await.is_err());
        assert_eq!(pool.slots(), 0, "a failed connect left its slot: {:?}", pool.entries());
    }
}
