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
use std::time::{Duration, Instant, UNIX_EPOCH};

use serde::Serialize;
use tokio::sync::watch;

use crate::local::LocalPod;
use crate::policy::{Mode, ObjectReport};
use crate::pool::{Pool, PoolEntry};
use crate::workloads::{Enrollment, PodKey};
use futures_util::future::BoxFuture;
use std::path::PathBuf;

/// Where the manager publishes the status and the admin side reads it.
pub type Published = Arc<StatusCell>;

/// The latest [`NodeStatus`], and a way to wait for the next one (the CNI plugin's ADD waits
/// until its pod is set up).
pub struct StatusCell(watch::Sender<Arc<NodeStatus>>);

impl Default for StatusCell {
    fn default() -> Self {
        StatusCell(watch::Sender::new(Arc::default()))
    }
}

impl StatusCell {
    pub fn load(&self) -> Arc<NodeStatus> {
        self.0.borrow().clone()
    }

    pub fn store(&self, status: Arc<NodeStatus>) {
        self.0.send_replace(status);
    }

    /// Waits until `check` finds what it looks for in a published status, or `timeout` passes
    /// (then the last `check` result, `None`).
    pub async fn wait_for<T>(&self, timeout: Duration, mut check: impl FnMut(&NodeStatus) -> Option<T>) -> Option<T> {
        let mut rx = self.0.subscribe();
        let wait = async {
            loop {
                if let Some(found) = check(&rx.borrow_and_update()) {
                    return Some(found);
                }
                if rx.changed().await.is_err() {
                    return None;
                }
            }
        };
        tokio::time::timeout(timeout, wait).await.ok().flatten()
    }
}

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

impl PodState {
    pub fn as_str(self) -> &'static str {
        match self {
            PodState::Enrolled => "enrolled",
            PodState::OutsideMesh => "outside_mesh",
            PodState::Failing => "failing",
        }
    }
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
    /// When this agent installed it (the last rotation), seconds since the Unix epoch.
    pub installed: u64,
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
                installed: i.installed.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or_default(),
                generation: local.tls.cert.generation(),
            });
        }
        out.pool = pool.entries();
        out
    }
}

/// [`Enrollment`] read from the published status: a pod is set up once the manager publishes it,
/// in the network namespace the runtime named, enrolled, outside the mesh, or failing with its
/// inbound held in the kernel.
pub struct Settled(pub Published);

impl Enrollment for Settled {
    fn wait(&self, pod: PodKey, netns: PathBuf, timeout: Duration) -> BoxFuture<'static, Result<String, String>> {
        let cell = self.0.clone();
        Box::pin(async move {
            let path = netns.clone();
            let cookie = tokio::task::spawn_blocking(move || crate::netns::cookie_of(&path))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| format!("network namespace {}: {e}", netns.display()))?;
            let mut last = None;
            let found = cell
                .wait_for(timeout, |s| {
                    let p = s.pods.iter().find(|p| p.pod == pod)?;
                    last = Some(match (&p.last_error, p.netns_cookie == Some(cookie)) {
                        (_, false) => "set up in another network namespace (an older sandbox)".to_string(),
                        (Some(e), true) => e.clone(),
                        (None, true) => format!("{:?}", p.state),
                    });
                    if p.netns_cookie != Some(cookie) {
                        return None;
                    }
                    match (p.state, p.mode) {
                        (PodState::Enrolled, Some(m)) => Some(format!("enrolled ({m:?})")),
                        (PodState::Enrolled, None) => Some("enrolled".to_string()),
                        (PodState::OutsideMesh, _) => Some("outside the mesh".to_string()),
                        (PodState::Failing, Some(m)) => Some(format!("failing, its inbound held ({m:?})")),
                        (PodState::Failing, None) => None,
                    }
                })
                .await;
            found.ok_or_else(|| match last {
                Some(why) => format!("pod {pod} not set up by the agent yet: {why}"),
                None => format!("pod {pod} not known to the agent yet"),
            })
        })
    }
}
