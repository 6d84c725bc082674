//! The workload directory: which pods exist, where they run, their addresses and identities.
//!
//! A [`Directory`] is an immutable snapshot; the agent keeps the current one in a [`Store`] and
//! swaps it atomically when its source reports a change, so the data path reads it without locks.
//! Where snapshots come from is a [`WorkloadSource`]: the state file of the embedded mode
//! ([`statefile`]) today, the Kubernetes API later. Both feed the same store and the same
//! per-pod lifecycle (`pods`), so their semantics cannot drift apart.

pub mod services;
pub mod statefile;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::sync::watch;

use crate::identity::{SpiffeId, TrustDomain};
use crate::policy::{PodPolicy, Policies};

/// A pod's name within its namespace: how the agent tells pods apart across snapshots.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct PodKey {
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for PodKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// One pod of the cluster, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    pub key: PodKey,
    pub service_account: String,
    /// The node the pod is scheduled on.
    pub node: String,
    pub ips: Vec<IpAddr>,
    /// Path of the pod's network namespace (known for pods of this node).
    pub netns: Option<PathBuf>,
    pub cgroup: Option<PathBuf>,
    /// Whether the pod is in the mesh. hostNetwork pods never are.
    pub mesh: bool,
    /// Runs in its node's network namespace.
    pub host_network: bool,
    pub identity: SpiffeId,
    /// The pod's labels, which policy selectors match.
    pub labels: BTreeMap<String, String>,
    /// The ports its own spec declares for kubelet probes (this node's pods): the only ones a
    /// probe passes to when plaintext is otherwise refused.
    pub probe_ports: Vec<u16>,
    /// The mode asked for by the `meshless.io/mode` label (Kubernetes: on the pod or its
    /// namespace). Explicit PeerAuthentications of the workload or its namespace take precedence.
    pub label_mode: Option<crate::policy::LabelMode>,
}

impl Workload {
    /// What the policy engine looks at to gather this pod's policy.
    pub fn policy_target(&self) -> crate::policy::Target<'_> {
        crate::policy::Target { namespace: &self.key.namespace, labels: &self.labels, label_mode: self.label_mode }
    }
}

/// A snapshot of the cluster as one node's agent needs it.
#[derive(Debug, Clone)]
pub struct Directory {
    pub trust_domain: TrustDomain,
    /// The node this agent runs on.
    pub node: String,
    /// cgroup v2 directory holding this node's pods: where the kernel programs attach.
    pub cgroup_parent: PathBuf,
    // The maps are shared between snapshots that differ in their Services only.
    pods: Arc<HashMap<PodKey, Arc<Workload>>>,
    by_ip: Arc<HashMap<IpAddr, Arc<Workload>>>,
    /// Enforcement policy, validated and indexed; part of the snapshot, so a pod set and the
    /// policy that goes with it change together.
    pub policies: Arc<Policies>,
    /// What applies to each pod of this node, gathered once per snapshot (the data path's view).
    pod_policies: Arc<HashMap<PodKey, Arc<PodPolicy>>>,
    /// Why the source's newest update was refused, while this (the last good) snapshot serves in
    /// its place; `None` when the snapshot is the source's newest.
    pub refused_update: Option<String>,
    /// Services: (VIP, port) → endpoints.
    pub services: Arc<services::ServiceMap>,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Invalid(pub String);

impl Directory {
    /// Builds a directory, checking that pod keys and IPs are unique.
    pub fn new(
        trust_domain: TrustDomain,
        node: String,
        cgroup_parent: PathBuf,
        workloads: impl IntoIterator<Item = Workload>,
        policies: impl Into<Arc<Policies>>,
    ) -> Result<Directory, Invalid> {
        let policies = policies.into();
        let mut pods = HashMap::new();
        let mut by_ip: HashMap<IpAddr, Arc<Workload>> = HashMap::new();
        for w in workloads {
            let w = Arc::new(w);
            for ip in &w.ips {
                if let Some(other) = by_ip.insert(canonical(*ip), w.clone()) {
                    return Err(Invalid(format!("{}: IP {ip} is already used by {}", w.key, other.key)));
                }
            }
            if pods.insert(w.key.clone(), w.clone()).is_some() {
                return Err(Invalid(format!("{}: listed twice", w.key)));
            }
        }
        let pod_policies = pods
            .values()
            .filter(|w| w.node == node)
            .map(|w| (w.key.clone(), Arc::new(policies.for_workload(&w.policy_target()))))
            .collect();
        Ok(Directory {
            trust_domain,
            node,
            cgroup_parent,
            pods: Arc::new(pods),
            by_ip: Arc::new(by_ip),
            policies,
            pod_policies: Arc::new(pod_policies),
            refused_update: None,
            services: Arc::default(),
        })
    }

    /// An empty directory (before the first snapshot; in tests).
    pub fn empty(trust_domain: TrustDomain, node: String, cgroup_parent: PathBuf) -> Directory {
        Directory {
            trust_domain,
            node,
            cgroup_parent,
            pods: Arc::default(),
            by_ip: Arc::default(),
            policies: Arc::default(),
            pod_policies: Arc::default(),
            refused_update: None,
            services: Arc::default(),
        }
    }

    /// The directory with `services` resolved against its pods (an endpoint is its pod by
    /// `targetRef`, else by address), from `here` (this node and its zone); `prev`, the Services
    /// of the directory this one replaces, lends its endpoints' load counts.
    pub fn with_services(
        mut self,
        services: &[services::Service],
        here: services::Here,
        prev: Option<&services::ServiceMap>,
    ) -> Directory {
        let map = services::ServiceMap::new(services, here, prev, |key, ip| self.endpoint_pod(key, ip));
        self.services = Arc::new(map);
        self
    }

    /// This directory with the `changed` Services replaced (`None`: gone): pods and policy are
    /// shared, and of the Services only the changed ones are rebuilt.
    pub fn with_changed_services(&self, changed: &[(services::ServiceKey, Option<services::Service>)]) -> Directory {
        let map = self.services.update(changed, |key, ip| self.endpoint_pod(key, ip));
        Directory { services: Arc::new(map), ..self.clone() }
    }

    fn endpoint_pod(&self, key: Option<&PodKey>, ip: IpAddr) -> Option<Arc<Workload>> {
        key.and_then(|k| self.pods.get(k)).or_else(|| self.by_ip.get(&ip)).cloned()
    }

    pub fn pods(&self) -> impl Iterator<Item = &Arc<Workload>> {
        self.pods.values()
    }

    /// Pods scheduled on this node.
    pub fn local_pods(&self) -> impl Iterator<Item = &Arc<Workload>> {
        self.pods.values().filter(|p| p.node == self.node)
    }

    pub fn get(&self, key: &PodKey) -> Option<&Arc<Workload>> {
        self.pods.get(key)
    }

    /// The pod that owns `ip`, on any node (IPv4-mapped addresses find the IPv4 pod).
    pub fn pod_by_ip(&self, ip: IpAddr) -> Option<&Arc<Workload>> {
        self.by_ip.get(&canonical(ip))
    }

    /// The policy that applies to `w` (gathered at snapshot time for this node's pods, on demand
    /// for others, as `policy explain` may ask about any pod).
    pub fn policy_for(&self, w: &Workload) -> Arc<PodPolicy> {
        match self.pod_policies.get(&w.key) {
            Some(p) => p.clone(),
            None => Arc::new(self.policies.for_workload(&w.policy_target())),
        }
    }

    pub fn len(&self) -> usize {
        self.pods.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pods.is_empty()
    }
}

/// The current directory, shared by the whole agent; readers never block.
pub struct Store(ArcSwap<Directory>);

impl Store {
    pub fn new(dir: Arc<Directory>) -> Store {
        Store(ArcSwap::new(dir))
    }

    /// The current snapshot.
    pub fn load(&self) -> Arc<Directory> {
        self.0.load_full()
    }

    pub fn store(&self, dir: Arc<Directory>) {
        self.0.store(dir)
    }
}

/// Where the agent learns the cluster from.
pub trait WorkloadSource: Send + 'static {
    /// Reads the first snapshot (an error here stops the agent: it has nothing to serve), then
    /// keeps watching in the background and publishes every later *valid* snapshot on the
    /// returned channel. An invalid update is reported and skipped; the previous one stays.
    /// (For Kubernetes, the first snapshot is the one after every watch has listed its objects.)
    fn start(
        self: Box<Self>,
    ) -> futures_util::future::BoxFuture<'static, Result<watch::Receiver<Arc<Directory>>, crate::Error>>;
}

/// Whether this node's agent has set up a pod the container runtime announces: its kernel
/// entries written (enrolled, held under its mode while failing, or known to be outside the mesh)
/// for the network namespace at `netns`. The CNI plugin's ADD waits on it, so an opted-in pod is
/// covered from its first packet.
pub trait Enrollment: Send + Sync + 'static {
    /// `Ok(what the pod became)` once set up, or why not when `timeout` passed.
    fn wait(
        &self,
        pod: PodKey,
        netns: PathBuf,
        timeout: std::time::Duration,
    ) -> futures_util::future::BoxFuture<'static, Result<String, String>>;
}

pub use crate::policy::canonical;
