//! The node's status as operators and tests read it (`GET /status` on the admin endpoint): every
//! pod the agent manages with its state (enrolled, outside the mesh, failing with the last error
//! and the next retry), its mode and certificate, its live connections, the pooled tunnel
//! connections per destination, whether the agent is draining, and how much of each policy object
//! is enforced.
//!
//! The pod lifecycle manager publishes a [`NodeStatus`] after each change (one pointer swap);
//! [`NodeStatus::with_live`] adds what moves between changes (connections, the certificate after a
//! rotation, the pool) when it is read. Tests assert this state instead of log wording.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Instant, UNIX_EPOCH};

use arc_swap::ArcSwap;
use serde::Serialize;

use crate::local::LocalPod;
use crate::policy::{Mode, ObjectReport};
use crate::pool::{Pool, PoolEntry};
use crate::workloads::PodKey;

/// Where the manager publishes the status and the admin side reads it.
pub type Published = Arc<ArcSwap<NodeStatus>>;

#[derive(Debug, Clone, Default, Serialize)]
pub struct NodeStatus {
    /// The agent stopped accepting (a successor took over, or it was told to stop).
    pub draining: bool,
    pub pods: Vec<PodStatus>,
    /// Pooled tunnel connections, per (source pod, destination).
    pub pool: Vec<PoolEntry>,
    /// Why the workload source's newest update was refused while the last good one serves.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refused_update: Option<String>,
    /// How many policy objects are enforced, partially enforced, or failed closed.
    pub policy_objects: BTreeMap<&'static str, usize>,
    /// The objects not enforced as written: what was left out, or what stands in for them.
    pub policy_problems: Vec<ObjectReport>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PodState {
    /// In the mesh and served: listeners, certificate and kernel entries in place.
    Enrolled,
    /// Not in the mesh: the kernel knows its netns and lets its connections pass.
    OutsideMesh,
    /// Cannot be set up (no netns, a port taken, no certificate); retried with backoff. Its
    /// outbound connects are refused by the kernel meanwhile.
    Failing,
}

#[derive(Debug, Clone, Serialize)]
pub struct PodStatus {
    pub pod: PodKey,
    pub identity: String,
    pub ips: Vec<IpAddr>,
    pub state: PodState,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub netns_cookie: Option<u64>,
    /// The inbound mode in force (enrolled pods).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<Mode>,
    /// Why the last attempt to set the pod up failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Failed attempts so far (failing pods).
    pub attempts: u32,
    /// When the next attempt is due (failing pods); `retry_in_ms` counts down to it when read.
    #[serde(skip)]
    pub retry_at: Option<Instant>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_in_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub certificate: Option<CertificateStatus>,
    /// Connections being carried for the pod (enrolled pods, when read live).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connections: Option<usize>,
}

/// The pod's current certificate: never the key.
#[derive(Debug, Clone, Serialize)]
pub struct CertificateStatus {
    pub serial: String,
    /// Seconds since the Unix epoch.
    pub not_after: u64,
    /// Bumped on every renewal.
    pub generation: u64,
}

impl NodeStatus {
    /// The published status with the live parts filled in: each enrolled pod's connections and
    /// current certificate, and the pool.
    pub fn with_live(&self, pods: &[Arc<LocalPod>], pool: &Pool) -> NodeStatus {
        let mut out = self.clone();
        let now = Instant::now();
        for p in &mut out.pods {
            p.retry_in_ms = p.retry_at.map(|at| at.saturating_duration_since(now).as_millis() as u64);
        }
        let local: HashMap<&PodKey, &Arc<LocalPod>> = pods.iter().map(|l| (&l.key, l)).collect();
        for p in out.pods.iter_mut().filter(|p| p.state == PodState::Enrolled) {
            let Some(local) = local.get(&p.pod) else { continue };
            p.connections = Some(local.conns.len());
            p.certificate = local.tls.cert.issued().map(|i| CertificateStatus {
                serial: i.serial.clone(),
                not_after: i.not_after.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or_default(),
                generation: local.tls.cert.generation(),
            });
        }
        out.pool = pool.entries();
        out
    }
}
