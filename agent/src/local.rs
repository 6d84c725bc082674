//! A pod of this node in the mesh, as the data path sees it: its netns, certificate, policy and
//! connections. The lifecycle manager (`pods`) creates and retires them; the data path (`proxy`),
//! the Workload API and the admin side read them. A leaf: it imports none of those.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::warn;

use crate::capture::PodOrig;
use crate::identity::{PodTls, SpiffeId};
use crate::netns::Netns;
use crate::policy::{Peer, PodPolicy};
use crate::workloads::{PodKey, Workload};

/// The enrolled pods, as the lifecycle manager last published them.
pub type LocalPods = Arc<ArcSwap<Vec<Arc<LocalPod>>>>;

/// A pod of this node in the mesh, as the data path sees it.
pub struct LocalPod {
    pub key: PodKey,
    workload: ArcSwap<Workload>,
    pub netns: Netns,
    /// The cookie of the pod's netns: its key in the kernel maps.
    pub cookie: u64,
    pub tls: PodTls,
    pub orig: PodOrig,
    /// Every connection this pod's listeners accepted.
    pub conns: TaskTracker,
    /// Fired when the pod leaves (or the agent hands over or stops): tunnel connections send
    /// GOAWAY so peers open new streams elsewhere.
    pub draining: CancellationToken,
    /// Fired at the drain deadline: what is still open is reset.
    pub stop: CancellationToken,
    /// The pod's mode and the authorization policies that select it (swapped per snapshot).
    policy: ArcSwap<PodPolicy>,
    /// Inbound connections being carried, for re-checking them when policy changes.
    live: Mutex<HashMap<u64, Live>>,
    next_live: AtomicU64,
}

impl LocalPod {
    pub fn new(
        w: Arc<Workload>,
        netns: Netns,
        cookie: u64,
        tls: PodTls,
        orig: PodOrig,
        policy: Arc<PodPolicy>,
    ) -> LocalPod {
        LocalPod {
            key: w.key.clone(),
            workload: ArcSwap::new(w),
            netns,
            cookie,
            tls,
            orig,
            conns: TaskTracker::new(),
            draining: CancellationToken::new(),
            stop: CancellationToken::new(),
            policy: ArcSwap::new(policy),
            live: Mutex::new(HashMap::new()),
            next_live: AtomicU64::new(0),
        }
    }

    /// Replaces the pod's workload and policy (a new snapshot of a running pod).
    pub fn update(&self, w: Arc<Workload>, policy: Arc<PodPolicy>) {
        self.workload.store(w);
        self.policy.store(policy);
    }

    /// The pod as last updated (its addresses may change while it runs).
    pub fn workload(&self) -> Arc<Workload> {
        self.workload.load_full()
    }

    /// The pod's current policy.
    pub fn policy(&self) -> Arc<PodPolicy> {
        self.policy.load_full()
    }

    /// Registers an inbound connection being carried; it is reset when the guard's token fires
    /// (drain deadline, or a policy change that denies it) and forgotten when the guard drops.
    pub fn track(self: &Arc<Self>, peer: OwnedPeer, target: SocketAddr) -> LiveGuard {
        let id = self.next_live.fetch_add(1, Ordering::Relaxed);
        let cancel = self.stop.child_token();
        self.live.lock().insert(id, Live { peer, target, cancel: cancel.clone() });
        LiveGuard { pod: self.clone(), id, cancel }
    }

    /// Resets the inbound connections `policy` denies; returns how many.
    pub fn close_denied(&self, policy: &PodPolicy) -> usize {
        let live = self.live.lock();
        let mut closed = 0;
        for conn in live.values() {
            let decision = policy.decide(&conn.peer.as_peer(), conn.target);
            if !decision.allowed && !conn.cancel.is_cancelled() {
                warn!(pod = %self.key, src = %conn.peer.as_peer(), dst_port = conn.target.port(), reason = %decision.reason,
                    "closing an established connection the new policy denies");
                conn.cancel.cancel();
                closed += 1;
            }
        }
        closed
    }
}

/// Who an established inbound connection came from (kept while it is carried).
#[derive(Debug, Clone)]
pub enum OwnedPeer {
    Authenticated { id: SpiffeId, ip: IpAddr },
    Plaintext { ip: IpAddr },
}

impl OwnedPeer {
    pub fn as_peer(&self) -> Peer<'_> {
        match self {
            OwnedPeer::Authenticated { id, ip } => Peer::Authenticated { id, ip: Some(*ip) },
            OwnedPeer::Plaintext { ip } => Peer::Plaintext { ip: *ip },
        }
    }
}

struct Live {
    peer: OwnedPeer,
    target: SocketAddr,
    cancel: CancellationToken,
}

/// An inbound connection being carried; see [`LocalPod::track`].
pub struct LiveGuard {
    pod: Arc<LocalPod>,
    id: u64,
    /// Fires when the connection must be reset.
    pub cancel: CancellationToken,
}

impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.pod.live.lock().remove(&self.id);
    }
}
