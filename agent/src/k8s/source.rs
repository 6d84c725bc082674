//! The workload directory from the Kubernetes API.
//!
//! What each agent watches, and why (the watch load of a large cluster is kept to this):
//! - **this node's pods**, full objects, with a field selector on `spec.nodeName`: the API server
//!   sends an agent only its own node's pod events (labels for policy selectors, UID for the
//!   pod's cgroup);
//! - **all pods**, reduced at once to what a destination check needs (namespace/name, service
//!   account, node, IPs, the mode label): the map of IP → identity for outbound connections;
//! - **namespaces** (the `meshless.io/mode` opt-in label);
//! - **Services** and **EndpointSlices**, reduced to virtual IPs, ports and endpoints (calls to a
//!   Service are resolved by the agent);
//! - the two **policy resources** (small, cluster-wide, rarely changing).
//!
//! Watches list once and then follow changes from the last resource version; after a disconnect
//! or an API server restart they resume (re-listing only if the version has expired), and a
//! re-list replaces the map it feeds atomically, so enrollments are neither lost nor repeated:
//! the per-pod lifecycle (`pods`) acts on differences between directories, never on events.
//!
//! Opt-in: a pod is in the mesh when its namespace has the label `meshless.io/mode` set to
//! `strict`, `permissive` or `disable`, or the pod itself has it (`off` on a pod opts it out); a
//! value it cannot read is STRICT. The label's mode applies where no PeerAuthentication of the
//! workload or its namespace does.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt::Debug;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::objects::{Namespace, Node, Pod};
use futures_util::{Stream, StreamExt as _};
use kube::api::{ApiResource, DynamicObject};
use kube::runtime::watcher::{self, watcher};
use kube::runtime::WatchStreamExt as _;
use kube::{Api, Client, Resource, ResourceExt as _};
use parking_lot::Mutex;
use serde::de::DeserializeOwned;
use tokio::sync::{watch, Notify};
use tracing::{debug, info, warn};

use super::cni::{self, Registry};
use super::crd::{self, AuthorizationPolicyResource, PeerAuthenticationResource};
use crate::identity::{workload_id, TrustDomain};
use crate::policy::{
    AuthorizationPolicy, Enforcement, LabelMode, MeshSettings, Mode, PeerAuthentication, Policies, PolicyInput,
    Unreadable,
};
use crate::workloads::{canonical, Directory, Enrollment, PodKey, Workload, WorkloadSource};

/// Bounds of the pause between a change and the directory rebuilt for it.
const SETTLE_MIN: Duration = Duration::from_millis(20);
const SETTLE_MAX: Duration = Duration::from_secs(2);

/// The opt-in label, on namespaces and pods.
pub const MODE_LABEL: &str = "meshless.io/mode";

/// The Kubernetes API as a workload source.
pub struct KubeSource {
    pub client: Client,
    /// This node's name (`spec.nodeName` of its pods). `None`: no node of its own (the issuer,
    /// which needs every pod's node and identity, and no network namespaces).
    pub node: Option<String>,
    pub trust_domain: TrustDomain,
    /// The cgroup holding this node's pods (kubelet's `kubepods`).
    pub cgroup_parent: PathBuf,
    /// `meshless-cni`'s state directory.
    pub cni_dir: PathBuf,
    pub mesh: MeshSettings,
    /// Answers the CNI plugin's ADD once the pod is set up (the agent's pod lifecycle).
    pub enrollment: Option<Arc<dyn Enrollment>>,
}

/// A pod, reduced to what the directory needs. Labels are kept for this node's pods only.
#[derive(Debug, Clone, PartialEq)]
struct PodInfo {
    uid: String,
    service_account: String,
    node: String,
    ips: Vec<IpAddr>,
    host_network: bool,
    /// Succeeded or Failed: its IP may already belong to another pod.
    finished: bool,
    mode_label: Option<String>,
    labels: BTreeMap<String, String>,
    /// A static pod's mirror (`kubernetes.io/config.mirror`): its object is the node's word only.
    mirror: bool,
    /// `metadata.creationTimestamp`, seconds: on an IP claimed twice, the older pod keeps it.
    created: Option<i64>,
    /// Ports its own spec declares for kubelet probes (kept for this node's pods only).
    probe_ports: Vec<u16>,
}

type Key = (String, String);

/// A policy resource as the policy model's object, or what could be read of it.
type Read<T> = Result<T, Box<Unreadable>>;

/// What the watches have seen.
#[derive(Default)]
struct Cluster {
    local: HashMap<Key, PodInfo>,
    all: HashMap<Key, PodInfo>,
    namespaces: HashMap<String, Option<String>>,
    /// Services with a virtual IP, and EndpointSlices (by their own key).
    services: HashMap<Key, ServiceInfo>,
    slices: HashMap<Key, SliceInfo>,
    /// Policy resources, each read on its own (an unreadable one becomes a closed stand-in).
    peer: HashMap<Key, Read<PeerAuthentication>>,
    authz: HashMap<Key, Read<AuthorizationPolicy>>,
    /// Watches that have listed once.
    synced: [bool; WATCHES],
    /// Bumped on every change of a policy resource, so a rebuild recompiles policy only then.
    policy_changes: u64,
    /// This node's zone (its Node's `topology.kubernetes.io/zone` label), when it can be read.
    zone: Option<String>,
    /// What changed since the last build.
    pending: Pending,
}

/// What changed since the last build: which watches, and which Services and EndpointSlices (a
/// change to those alone rebuilds only the Services it touches).
#[derive(Default)]
struct Pending {
    watches: [bool; WATCHES],
    /// A watch re-listed, or this node's zone changed: everything is rebuilt.
    full: bool,
    services: HashSet<Key>,
    slices: HashSet<Key>,
}

impl Pending {
    /// A change seen by watch `index`: of the object `touched`, or of the whole map (a re-list).
    fn note(&mut self, index: usize, touched: Option<Key>) {
        self.watches[index] = true;
        match (index, touched) {
            (_, None) => self.full = true,
            (SERVICES_WATCH, Some(k)) => drop(self.services.insert(k)),
            (SLICES_WATCH, Some(k)) => drop(self.slices.insert(k)),
            _ => {}
        }
    }

    /// Whether only Services and EndpointSlices changed, object by object.
    fn services_only(&self) -> bool {
        let others = self.watches.iter().enumerate().any(|(i, w)| *w && i != SERVICES_WATCH && i != SLICES_WATCH);
        !self.full && !others && (self.watches[SERVICES_WATCH] || self.watches[SLICES_WATCH])
    }
}

const WATCHES: usize = 7;
const NAMES: [&str; WATCHES] =
    ["node pods", "pods", "namespaces", "Services", "EndpointSlices", "PeerAuthentications", "AuthorizationPolicies"];
/// Watches at this index and above feed policy.
const FIRST_POLICY_WATCH: usize = 5;
const SERVICES_WATCH: usize = 3;
const SLICES_WATCH: usize = 4;
/// The Node label naming its zone.
const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

/// A Service with a virtual IP, reduced: its VIPs and TCP ports (named, for the slices' ports).
#[derive(Debug, Clone, PartialEq)]
struct ServiceInfo {
    vips: Vec<IpAddr>,
    /// (Service port, its name: the key of the endpoints' resolved port in the slices).
    ports: Vec<(u16, String)>,
    client_ip_affinity: bool,
    publish_not_ready: bool,
    node_local: bool,
    prefer_close: bool,
}

/// An EndpointSlice, reduced: the Service it serves and its endpoints.
#[derive(Debug, Clone, PartialEq)]
struct SliceInfo {
    service: String,
    endpoints: Vec<crate::workloads::services::Endpoint>,
}

/// The label naming an EndpointSlice's Service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

fn service_info(s: &super::objects::Service) -> Option<ServiceInfo> {
    let spec = s.spec.as_ref()?;
    let ips = spec.cluster_ips.clone().unwrap_or_default().into_iter().chain(spec.cluster_ip.clone());
    let mut vips: Vec<IpAddr> = ips.filter_map(|ip| ip.parse().ok()).collect();
    vips.sort();
    vips.dedup();
    // Headless ("None") and ExternalName Services have no virtual IP: DNS answers for them.
    if vips.is_empty() {
        return None;
    }
    let ports = spec
        .ports
        .iter()
        .filter(|p| p.protocol.as_deref().is_none_or(|p| p == "TCP"))
        .filter_map(|p| Some((u16::try_from(p.port).ok().filter(|p| *p != 0)?, p.name.clone().unwrap_or_default())))
        .collect();
    Some(ServiceInfo {
        vips,
        ports,
        client_ip_affinity: spec.session_affinity.as_deref() == Some("ClientIP"),
        publish_not_ready: spec.publish_not_ready_addresses.unwrap_or(false),
        node_local: spec.internal_traffic_policy.as_deref() == Some("Local"),
        prefer_close: spec.traffic_distribution.as_deref() == Some("PreferClose"),
    })
}

fn slice_info(o: &DynamicObject) -> Option<SliceInfo> {
    let service = o.labels().get(SERVICE_NAME_LABEL)?.clone();
    let namespace = o.namespace().unwrap_or_default();
    let slice: super::objects::EndpointSlice = serde_json::from_value(o.data.clone()).ok()?;
    let named_ports: Arc<BTreeMap<String, u16>> = slice
        .ports
        .unwrap_or_default()
        .into_iter()
        .filter(|p| p.protocol.as_deref().is_none_or(|p| p == "TCP"))
        .filter_map(|p| Some((p.name.unwrap_or_default(), u16::try_from(p.port?).ok()?)))
        .collect::<BTreeMap<_, _>>()
        .into();
    let endpoints = slice
        .endpoints
        .into_iter()
        .map(|e| {
            let c = e.conditions.unwrap_or_default();
            // Unset conditions: ready and serving are true, terminating false (the API's
            // documented interpretation of nil).
            let ready = c.ready.unwrap_or(true);
            crate::workloads::services::Endpoint {
                addresses: e.addresses.iter().filter_map(|a| a.parse().ok()).collect(),
                pod: e.target_ref.filter(|t| t.kind.as_deref() == Some("Pod")).and_then(|t| {
                    Some(PodKey { namespace: t.namespace.unwrap_or_else(|| namespace.clone()), name: t.name? })
                }),
                ready,
                serving: c.serving.unwrap_or(true),
                terminating: c.terminating.unwrap_or(false),
                named_ports: named_ports.clone(),
                node: e.node_name,
                zone: e.zone,
                for_zones: e.hints.map(|h| h.for_zones.into_iter().map(|z| z.name).collect()).unwrap_or_default(),
            }
        })
        .collect();
    Some(SliceInfo { service, endpoints })
}

fn pod_info(pod: &Pod, keep_labels: bool) -> PodInfo {
    let spec = pod.spec.as_ref();
    let status = pod.status.as_ref();
    let mut ips: Vec<IpAddr> = status
        .and_then(|s| s.pod_ips.as_ref())
        .map(|ips| ips.iter().filter_map(|ip| ip.ip.parse().ok()).collect())
        .unwrap_or_default();
    if ips.is_empty() {
        ips.extend(status.and_then(|s| s.pod_ip.as_ref()).and_then(|ip| ip.parse::<IpAddr>().ok()));
    }
    let labels = pod.labels();
    PodInfo {
        uid: pod.metadata.uid.clone().unwrap_or_default(),
        service_account: spec
            .and_then(|s| s.service_account_name.clone())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "default".into()),
        node: spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
        ips,
        host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
        finished: matches!(status.and_then(|s| s.phase.as_deref()), Some("Succeeded" | "Failed")),
        mode_label: labels.get(MODE_LABEL).cloned(),
        labels: if keep_labels { labels.clone() } else { BTreeMap::new() },
        mirror: pod.annotations().contains_key(MIRROR_ANNOTATION),
        created: pod.metadata.creation_timestamp.as_ref().map(|t| t.0.as_second()),
        probe_ports: if keep_labels { spec.map(|s| s.probe_ports()).unwrap_or_default() } else { Vec::new() },
    }
}

/// Marks a static pod's mirror object.
const MIRROR_ANNOTATION: &str = "kubernetes.io/config.mirror";

fn key<K: Resource>(o: &K) -> Key {
    (o.meta().namespace.clone().unwrap_or_default(), o.meta().name.clone().unwrap_or_default())
}

impl WorkloadSource for KubeSource {
    fn start(
        self: Box<Self>,
    ) -> futures_util::future::BoxFuture<'static, Result<watch::Receiver<Arc<Directory>>, crate::Error>> {
        Box::pin(async move {
            // Bad mesh settings stop the agent here, rather than ever serving without policy.
            Policies::compile(&PolicyInput { mesh: self.mesh.clone(), ..Default::default() })
                .map_err(super::Error::from)?;
            let changed = Arc::new(Notify::new());
            let state = Arc::new(Mutex::new(Cluster::default()));
            let cni = self.watch(&state, &changed)?;
            // The first directory waits for every watch to have listed: an agent that started
            // with a partial view would unenroll pods it has simply not heard of yet.
            let started = Instant::now();
            wait_listed(&state, &changed).await;
            let mut builder = Builder::new(*self, cni);
            let first = builder.build(&mut state.lock());
            info!(
                pods = first.len(),
                local = first.local_pods().count(),
                ms = started.elapsed().as_millis() as u64,
                "Kubernetes watches synced"
            );
            let (tx, rx) = watch::channel(first);
            tokio::spawn(rebuild(builder, state, changed, tx));
            Ok(rx)
        })
    }
}

impl KubeSource {
    /// Starts the five watches, each mirrored into its map of `state`; with a node, also the CNI
    /// registry of this node's pods' network namespaces.
    fn watch(&self, state: &Arc<Mutex<Cluster>>, changed: &Arc<Notify>) -> Result<Option<Arc<Registry>>, crate::Error> {
        let client = self.client.clone();
        let s = (state.clone(), changed.clone());
        let cni = match &self.node {
            Some(node) => {
                let node_pods = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
                spawn_mirror(
                    0,
                    Api::<Pod>::all(client.clone()),
                    node_pods,
                    s.clone(),
                    |c| &mut c.local,
                    |p| Some(pod_info(&p, true)),
                );
                Some(Registry::start(&self.cni_dir, changed.clone(), self.enrollment.clone())?)
            }
            None => {
                state.lock().synced[0] = true;
                None
            }
        };
        let all = watcher::Config::default;
        spawn_mirror(
            1,
            Api::<Pod>::all(client.clone()),
            all(),
            s.clone(),
            |c| &mut c.all,
            |p| Some(pod_info(&p, false)),
        );
        spawn_mirror(
            2,
            Api::<Namespace>::all(client.clone()),
            all(),
            s.clone(),
            |c| &mut c.namespaces,
            |n| Some(n.labels().get(MODE_LABEL).cloned()),
        );
        match &self.node {
            // Services and their EndpointSlices (an agent resolves VIPs; the issuer needs none),
            // and this node's zone (for locality).
            Some(node) => {
                spawn_zone(client.clone(), node.clone(), s.clone());
                spawn_mirror(
                    3,
                    Api::<super::objects::Service>::all(client.clone()),
                    all(),
                    s.clone(),
                    |c| &mut c.services,
                    |svc| service_info(&svc),
                );
                let (client, s) = (client.clone(), s.clone());
                tokio::spawn(async move {
                    // discovery.k8s.io/v1 from Kubernetes 1.21; v1beta1 (the same fields) before.
                    // Only a 404 means the older version: other errors are retried.
                    let mut backoff = Duration::from_millis(200);
                    let version = loop {
                        match client.list_api_group_resources("discovery.k8s.io/v1").await {
                            Ok(_) => break "v1",
                            Err(kube::Error::Api(e)) if e.code == 404 => break "v1beta1",
                            Err(e) => {
                                warn!(error = %e, "cannot tell which EndpointSlice version the API serves; retrying");
                                tokio::time::sleep(backoff).await;
                                backoff = (backoff * 2).min(Duration::from_secs(10));
                            }
                        }
                    };
                    let resource = ApiResource {
                        group: "discovery.k8s.io".into(),
                        version: version.into(),
                        api_version: format!("discovery.k8s.io/{version}"),
                        kind: "EndpointSlice".into(),
                        plural: "endpointslices".into(),
                    };
                    let api = Api::<DynamicObject>::all_with(client, &resource);
                    let stream = watcher(api, watcher::Config::default()).default_backoff();
                    mirror(4, stream, s.0, s.1, |c| &mut c.slices, |o| slice_info(&o)).await;
                });
            }
            None => {
                let mut c = state.lock();
                c.synced[3] = true;
                c.synced[4] = true;
            }
        }
        // Policy resources are read untyped, one object at a time (see `crd::read`).
        let policies = |r: ApiResource| Api::<DynamicObject>::all_with(client.clone(), &r);
        spawn_mirror(
            5,
            policies(crd::api_resource::<PeerAuthenticationResource>()),
            all(),
            s.clone(),
            |c| &mut c.peer,
            |o| Some(crd::read::<PeerAuthenticationResource>(&o)),
        );
        spawn_mirror(
            6,
            policies(crd::api_resource::<AuthorizationPolicyResource>()),
            all(),
            s,
            |c| &mut c.authz,
            |o| Some(crd::read::<AuthorizationPolicyResource>(&o)),
        );
        Ok(cni)
    }
}

/// Waits until every watch has listed, saying which ones it still waits for every 10 s.
async fn wait_listed(state: &Mutex<Cluster>, changed: &Notify) {
    let started = Instant::now();
    loop {
        let waiting: Vec<&str> = {
            let c = state.lock();
            (0..WATCHES).filter(|&i| !c.synced[i]).map(|i| NAMES[i]).collect()
        };
        if waiting.is_empty() {
            return;
        }
        if tokio::time::timeout(Duration::from_secs(10), changed.notified()).await.is_err() {
            warn!(waiting = ?waiting, waited_s = started.elapsed().as_secs(), "still waiting for the API server to list");
        }
    }
}

/// Rebuilds the directory after each burst of changes, until nobody listens.
async fn rebuild(
    mut builder: Builder,
    state: Arc<Mutex<Cluster>>,
    changed: Arc<Notify>,
    tx: watch::Sender<Arc<Directory>>,
) {
    // A rebuild costs time proportional to the cluster (about 4 µs per pod here); waiting a few
    // times as long as the last one took before the next bounds the CPU spent on rebuilds at
    // about 20 % of a core, however fast pods churn, while a small cluster still applies changes
    // within 20 ms.
    let mut settle = SETTLE_MIN;
    loop {
        tokio::select! {
            _ = changed.notified() => {}
            _ = tx.closed() => return,
            // Pods without a network namespace yet may get one without an event (an old pod
            // found through its cgroup).
            _ = tokio::time::sleep(Duration::from_secs(30)) => {
                if let Some(cni) = &builder.cni {
                    cni.rescan();
                }
            }
        }
        // Let a burst of events settle into one directory.
        tokio::time::sleep(settle).await;
        let Some((back, dir, took)) = build_off_runtime(builder, state.clone()).await else { return };
        builder = back;
        settle = (took * 4).clamp(SETTLE_MIN, SETTLE_MAX);
        tx.send_replace(dir);
    }
}

/// One build, on a blocking thread: the runtime's tasks (the data path) never wait for it.
/// Returns the builder, the directory and the time the build took; `None` if the build panicked
/// (a bug: the last directory keeps serving, and no update follows; the error says so).
async fn build_off_runtime(
    mut builder: Builder,
    state: Arc<Mutex<Cluster>>,
) -> Option<(Builder, Arc<Directory>, Duration)> {
    let built = tokio::task::spawn_blocking(move || {
        let t = Instant::now();
        let dir = builder.build(&mut state.lock());
        (builder, dir, t.elapsed())
    })
    .await;
    match built {
        Ok(b) => Some(b),
        Err(e) => {
            tracing::error!(error = %e, "the directory build failed; the last directory keeps serving, without updates");
            None
        }
    }
}

/// Follows this node's zone label. Not a watch the first directory waits for: without it (an
/// older RBAC that cannot read nodes, a node without the label) Services are balanced without
/// locality, which narrows nothing and widens nothing.
fn spawn_zone(client: Client, node: String, (state, changed): (Arc<Mutex<Cluster>>, Arc<Notify>)) {
    tokio::spawn(async move {
        let config = watcher::Config::default().fields(&format!("metadata.name={node}"));
        let stream = watcher(Api::<Node>::all(client), config).default_backoff();
        let mut stream = std::pin::pin!(stream);
        let mut failing = false;
        while let Some(event) = stream.next().await {
            let node = match event {
                Ok(watcher::Event::Apply(n) | watcher::Event::InitApply(n)) => n,
                Ok(_) => continue,
                Err(e) => {
                    if !std::mem::replace(&mut failing, true) {
                        warn!(error = %e, "cannot read this node's zone; Services are balanced without locality");
                    }
                    continue;
                }
            };
            failing = false;
            let zone = node.labels().get(ZONE_LABEL).cloned();
            let mut c = state.lock();
            if c.zone != zone {
                info!(zone = zone.as_deref().unwrap_or("none"), "this node's zone");
                c.zone = zone;
                c.pending.full = true;
                changed.notify_one();
            }
        }
    });
}

/// Maps an object to the key its map uses.
trait MapKey {
    fn map_key(k: Key) -> Self;
}
impl MapKey for Key {
    fn map_key(k: Key) -> Self {
        k
    }
}
/// Cluster-scoped objects (namespaces) are keyed by name alone.
impl MapKey for String {
    fn map_key(k: Key) -> Self {
        k.1
    }
}

/// Follows one watch into one map of `Cluster`. A re-list (`Init` … `InitDone`) is collected
/// aside and swapped in whole, so objects deleted while the watch was down disappear and the
/// others stay without a gap.
fn spawn_mirror<K, MK, V>(
    index: usize,
    api: Api<K>,
    config: watcher::Config,
    (state, changed): (Arc<Mutex<Cluster>>, Arc<Notify>),
    map: fn(&mut Cluster) -> &mut HashMap<MK, V>,
    convert: fn(K) -> Option<V>,
) where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
    MK: MapKey + std::hash::Hash + Eq + Send + 'static,
    V: Send + 'static,
{
    let stream = watcher(api, config).default_backoff();
    tokio::spawn(mirror(index, stream, state, changed, map, convert));
}

async fn mirror<K, MK, V>(
    index: usize,
    stream: impl Stream<Item = Result<watcher::Event<K>, watcher::Error>>,
    state: Arc<Mutex<Cluster>>,
    changed: Arc<Notify>,
    map: fn(&mut Cluster) -> &mut HashMap<MK, V>,
    convert: fn(K) -> Option<V>,
) where
    K: Resource,
    MK: MapKey + std::hash::Hash + Eq,
{
    let mut stream = std::pin::pin!(stream);
    let mut buffer: Option<HashMap<MK, V>> = None;
    let mut failing_since: Option<Instant> = None;
    while let Some(event) = stream.next().await {
        let event = match event {
            Ok(e) => e,
            Err(e) => {
                if failing_since.is_none() {
                    warn!(watch = NAMES[index], error = %e, "watch failed; retrying with backoff");
                    failing_since = Some(Instant::now());
                }
                continue;
            }
        };
        if let Some(since) = failing_since.take() {
            info!(watch = NAMES[index], down_ms = since.elapsed().as_millis() as u64, "watch resumed");
        }
        let mut c = state.lock();
        let mut touched = None;
        // Init and InitApply only fill the buffer; the maps change at InitDone, Apply, Delete.
        let event_kind = match event {
            watcher::Event::Init | watcher::Event::InitApply(_) => Kind::Listing,
            _ => Kind::Change,
        };
        match event {
            watcher::Event::Init => buffer = Some(HashMap::new()),
            watcher::Event::InitApply(o) => {
                let k = MK::map_key(key(&o));
                if let (Some(b), Some(v)) = (buffer.as_mut(), convert(o)) {
                    b.insert(k, v);
                }
            }
            watcher::Event::InitDone => {
                if let Some(b) = buffer.take() {
                    *map(&mut c) = b;
                }
                if !c.synced[index] {
                    debug!(watch = NAMES[index], "listed");
                }
                c.synced[index] = true;
            }
            watcher::Event::Apply(o) => {
                touched = Some(key(&o));
                let k = MK::map_key(key(&o));
                match convert(o) {
                    Some(v) => map(&mut c).insert(k, v),
                    None => map(&mut c).remove(&k),
                };
            }
            watcher::Event::Delete(o) => {
                touched = Some(key(&o));
                map(&mut c).remove(&MK::map_key(key(&o)));
            }
        }
        if !matches!(event_kind, Kind::Listing) {
            if index >= FIRST_POLICY_WATCH {
                c.policy_changes += 1;
            }
            c.pending.note(index, touched);
            changed.notify_one();
        }
    }
}

enum Kind {
    Listing,
    Change,
}

/// Turns what the watches have seen into a directory.
struct Builder {
    source: KubeSource,
    cni: Option<Arc<Registry>>,
    /// Pod UID → its cgroup, once found.
    cgroups: HashMap<String, PathBuf>,
    /// What was last reported about an object, so a problem is logged once, not per rebuild.
    problems: HashMap<String, String>,
    /// The policy compiled for `Cluster::policy_changes` = `.0`: pod events reuse it.
    policies: Option<(u64, Arc<Policies>)>,
    /// The last directory built, served again should a new one be inconsistent.
    last: Option<Arc<Directory>>,
    /// Which EndpointSlices serve which Service.
    slices: SliceIndex,
}

/// Service → its EndpointSlices, and back, as of the last build: what an EndpointSlice change
/// touches (the Service it served before and the one it serves now).
#[derive(Default)]
struct SliceIndex {
    owner: HashMap<Key, Key>,
    of: HashMap<Key, BTreeSet<Key>>,
}

impl SliceIndex {
    /// Every Service with a virtual IP, each with the endpoints of its EndpointSlices.
    fn all(&mut self, c: &Cluster) -> Vec<crate::workloads::services::Service> {
        self.owner.clear();
        self.of.clear();
        for (k, slice) in &c.slices {
            self.link(k, (k.0.clone(), slice.service.clone()));
        }
        let mut keys: Vec<&Key> = c.services.keys().collect();
        keys.sort();
        keys.into_iter().filter_map(|k| self.service(c, k)).collect()
    }

    /// The Services `p` touched, as they are now (`None`: gone or without a virtual IP).
    fn changed(
        &mut self,
        c: &Cluster,
        p: &Pending,
    ) -> Vec<(crate::workloads::services::ServiceKey, Option<crate::workloads::services::Service>)> {
        let mut keys: BTreeSet<Key> = p.services.iter().cloned().collect();
        for k in &p.slices {
            if let Some(before) = self.owner.remove(k) {
                if let Some(set) = self.of.get_mut(&before) {
                    set.remove(k);
                    if set.is_empty() {
                        self.of.remove(&before);
                    }
                }
                keys.insert(before);
            }
            if let Some(slice) = c.slices.get(k) {
                let now = (k.0.clone(), slice.service.clone());
                self.link(k, now.clone());
                keys.insert(now);
            }
        }
        keys.into_iter()
            .map(|k| {
                let service = self.service(c, &k);
                (crate::workloads::services::ServiceKey { namespace: k.0, name: k.1 }, service)
            })
            .collect()
    }

    fn link(&mut self, slice: &Key, service: Key) {
        self.owner.insert(slice.clone(), service.clone());
        self.of.entry(service).or_default().insert(slice.clone());
    }

    fn service(&self, c: &Cluster, k: &Key) -> Option<crate::workloads::services::Service> {
        use crate::workloads::services::{Service, ServiceKey, ServicePort, TargetPort};
        let info = c.services.get(k)?;
        Some(Service {
            key: ServiceKey { namespace: k.0.clone(), name: k.1.clone() },
            vips: info.vips.clone(),
            // The slices carry each endpoint's resolved target port under the Service port's name.
            ports: info
                .ports
                .iter()
                .map(|(port, n)| ServicePort { port: *port, target: TargetPort::Name(n.clone()) })
                .collect(),
            client_ip_affinity: info.client_ip_affinity,
            publish_not_ready: info.publish_not_ready,
            node_local: info.node_local,
            prefer_close: info.prefer_close,
            endpoints: self
                .of
                .get(k)
                .into_iter()
                .flatten()
                .filter_map(|s| c.slices.get(s))
                .flat_map(|s| s.endpoints.iter().cloned())
                .collect(),
        })
    }
}

/// The label's mode; a value meshless cannot read is STRICT, with what is wrong with it.
fn label_mode_or_strict(value: Option<&str>) -> (Option<Option<Mode>>, Option<String>) {
    match label_mode(value) {
        Ok(m) => (m, None),
        Err(problem) => (Some(Some(Mode::Strict)), Some(problem)),
    }
}

fn label_mode(value: Option<&str>) -> Result<Option<Option<Mode>>, String> {
    // None: no label. Some(None): `off`. Some(Some(m)): a mode.
    match value {
        None => Ok(None),
        Some("strict") => Ok(Some(Some(Mode::Strict))),
        Some("permissive") => Ok(Some(Some(Mode::Permissive))),
        Some("disable") => Ok(Some(Some(Mode::Disable))),
        Some("off") => Ok(Some(None)),
        Some(other) => Err(format!("label {MODE_LABEL}={other:?} is not one of strict, permissive, disable, off")),
    }
}

/// What the builder says about an object it cannot take as written.
#[derive(Clone, Copy)]
enum Problem {
    LeftOut,
    UnreadableLabel,
    PolicyNotAsWritten,
    CniRecord,
}

impl Builder {
    fn new(source: KubeSource, cni: Option<Arc<Registry>>) -> Builder {
        Builder {
            source,
            cni,
            cgroups: HashMap::new(),
            problems: HashMap::new(),
            policies: None,
            last: None,
            slices: SliceIndex::default(),
        }
    }

    /// Says once (and again when it changes) what is wrong with `object`; forgets it once fixed.
    fn report_as(&mut self, kind: Problem, object: String, problem: Option<String>) {
        let key = match kind {
            Problem::UnreadableLabel => format!("label of {object}"),
            Problem::CniRecord => format!("CNI record of {object}"),
            _ => object.clone(),
        };
        let Some(p) = problem else {
            self.problems.remove(&key);
            return;
        };
        if self.problems.get(&key) == Some(&p) {
            return;
        }
        match kind {
            Problem::LeftOut => warn!(object = %object, problem = %p, "left out of the mesh directory"),
            Problem::UnreadableLabel => {
                warn!(object = %object, problem = %p, "mode label unreadable; the pod is meshed as STRICT")
            }
            Problem::PolicyNotAsWritten => {
                warn!(object = %object, problem = %p, "policy object not enforced as written")
            }
            Problem::CniRecord => warn!(object = %object, problem = %p, "CNI record does not match the pod"),
        }
        self.problems.insert(key, p);
    }

    fn report(&mut self, what: String, problem: Option<String>) {
        self.report_as(Problem::LeftOut, what, problem)
    }

    fn build(&mut self, c: &mut Cluster) -> Arc<Directory> {
        let pending = std::mem::take(&mut c.pending);
        if let (true, Some(last)) = (pending.services_only(), &self.last) {
            // Services alone changed: pods and policy are shared with the last directory, and
            // only the Services touched are rebuilt.
            let dir = Arc::new(last.with_changed_services(&self.slices.changed(c, &pending)));
            self.last = Some(dir.clone());
            return dir;
        }
        let (node, cgroup_parent, td) = (
            self.source.node.clone().unwrap_or_default(),
            self.source.cgroup_parent.clone(),
            self.source.trust_domain.clone(),
        );
        let mut workloads = Vec::with_capacity(c.all.len());
        let mut owners: HashMap<IpAddr, Key> = HashMap::new();
        // This node's pods first: on an IP conflict (an IP reused before the old pod's delete
        // arrived), the pod the node actually runs wins. This node's pods come from the node
        // watch only (with labels and UID), never half-known from the cluster-wide one.
        let local = c.local.iter().map(|(k, p)| (k, p, true));
        // A pod this node's watch has is this node's, whatever the cluster-wide watch still says
        // (a StatefulSet pod that moved here before the other watch caught up): one entry per key.
        let remote =
            c.all.iter().filter(|(k, p)| p.node != node && !c.local.contains_key(*k)).map(|(k, p)| (k, p, false));
        let mut entries: Vec<_> = local.chain(remote).collect();
        // Then the older pod first: of two pods claiming one IP, the one that had it first keeps
        // it (never merely the lexically first name).
        let age = |p: &PodInfo| p.created.unwrap_or(i64::MAX);
        entries.sort_by(|a, b| b.2.cmp(&a.2).then_with(|| age(a.1).cmp(&age(b.1))).then_with(|| a.0.cmp(b.0)));
        for (k, p, is_local) in entries {
            // A pod of this node is known by its addresses as soon as its network plugin has run
            // (the CNI record), before the kubelet reports them: it is set up before its
            // address is published and anyone can call it.
            let cni_ips = match (&self.cni, is_local && p.ips.is_empty()) {
                (Some(cni), true) => cni.ips(&k.0, &k.1, &p.uid),
                _ => Vec::new(),
            };
            let ips = if p.ips.is_empty() { &cni_ips } else { &p.ips };
            // The issuer (no node of its own) knows pods before they have addresses: a node asks
            // for its pod's certificate as the pod is set up, before the kubelet reports them.
            let issuer = self.source.node.is_none();
            if p.finished || p.host_network || (ips.is_empty() && !issuer) {
                continue;
            }
            let what = format!("pod {}/{}", k.0, k.1);
            let w = match self.workload(c, k, p, ips, is_local) {
                Ok(w) => w,
                Err(problem) => {
                    self.report(what, Some(problem));
                    continue;
                }
            };
            if let Some(ip) = ips.iter().find(|ip| owners.contains_key(&canonical(**ip))) {
                let other = &owners[&canonical(*ip)];
                self.report(what, Some(format!("IP {ip} is also {}/{}'s", other.0, other.1)));
                continue;
            }
            self.report(what, None);
            for ip in ips {
                owners.insert(canonical(*ip), k.clone());
            }
            workloads.push(w);
        }
        self.cgroups.retain(|uid, _| c.local.values().any(|p| &p.uid == uid));
        let policies = self.policies(c);
        let dir = match Directory::new(td.clone(), node.clone(), cgroup_parent.clone(), workloads, policies) {
            Ok(dir) => Arc::new(dir),
            Err(e) => {
                // Conflicts were resolved above, so this is a bug. One inconsistent object must
                // never empty the directory (that would unenroll every pod of the node): the last
                // good one keeps serving.
                warn!(error = %e, "inconsistent directory; the previous one keeps serving");
                return self.last.clone().unwrap_or_else(|| Arc::new(Directory::empty(td, node, cgroup_parent)));
            }
        };
        let here = crate::workloads::services::Here { node: node.clone(), zone: c.zone.clone() };
        let prev = self.last.as_ref().map(|d| d.services.clone());
        let dir = Arc::new(Arc::unwrap_or_clone(dir).with_services(&self.slices.all(c), here, prev.as_deref()));
        self.last = Some(dir.clone());
        dir
    }

    /// One pod as a workload of the directory, or why it is left out: its mode from the labels
    /// (a typo leaves it out rather than quietly taking it out of or into the mesh), its identity,
    /// and for this node's pods the cgroup and network namespace (unknown: left out, so the kernel
    /// keeps refusing its connections and an unknown pod never talks plaintext).
    fn workload(
        &mut self,
        c: &Cluster,
        k: &Key,
        p: &PodInfo,
        ips: &[IpAddr],
        is_local: bool,
    ) -> Result<Workload, String> {
        if p.mirror {
            // A static pod is declared by a node alone: a compromised node could name any
            // namespace's account for it. It gets no identity.
            return Err("a static (mirror) pod: its identity is the node's word only; left out of the mesh".into());
        }
        let ns_label = c.namespaces.get(&k.0).cloned().flatten();
        // A label meshless cannot read opts the pod in as STRICT (the strongest mode): a typo
        // must neither take a pod out of the mesh nor leave its inbound open.
        let (pod_mode, pod_typo) = label_mode_or_strict(p.mode_label.as_deref());
        let (ns_mode, ns_typo) = label_mode_or_strict(ns_label.as_deref());
        let (label, typo) = match (pod_mode, ns_mode) {
            (Some(m), _) => {
                let scope = if pod_typo.is_some() { "unreadable pod label" } else { "pod label" };
                (m.map(|mode| LabelMode { mode, scope }), pod_typo)
            }
            (None, Some(m)) => {
                let scope = if ns_typo.is_some() { "unreadable namespace label" } else { "namespace label" };
                (m.map(|mode| LabelMode { mode, scope }), ns_typo)
            }
            (None, None) => (None, None),
        };
        self.report_as(Problem::UnreadableLabel, format!("pod {}/{}", k.0, k.1), typo);
        let identity = workload_id(&self.source.trust_domain, &k.0, &p.service_account).map_err(|e| e.to_string())?;
        let (mut netns, mut cgroup) = (None, None);
        if is_local {
            cgroup = self.cgroups.get(&p.uid).cloned().or_else(|| {
                let found = cni::pod_cgroup(&self.source.cgroup_parent, &p.uid)?;
                self.cgroups.insert(p.uid.clone(), found.clone());
                Some(found)
            });
            let mut recorded = self.cni.as_ref().and_then(|r| r.netns(&k.0, &k.1, &p.uid));
            // A record is checked against the pod's own processes where they can be found: one
            // naming another netns is not the pod's, and the processes' netns is used instead.
            let mut mismatch = None;
            if let (Some(record), Some(cg)) = (&recorded, &cgroup) {
                if let cni::Check::Differs { record, processes } = cni::check(record, cg) {
                    mismatch = Some(format!(
                        "its CNI record names netns {} but its processes run in {}: the record is ignored",
                        record.display(),
                        processes.display()
                    ));
                    recorded = Some(processes);
                }
            }
            self.report_as(Problem::CniRecord, format!("pod {}/{}", k.0, k.1), mismatch);
            netns = recorded.or_else(|| cgroup.as_deref().and_then(cni::discover));
            if netns.is_none() {
                return Err("no network namespace known yet (waiting for meshless-cni)".into());
            }
        }
        Ok(Workload {
            key: PodKey { namespace: k.0.clone(), name: k.1.clone() },
            service_account: p.service_account.clone(),
            node: p.node.clone(),
            ips: ips.to_vec(),
            netns,
            cgroup,
            mesh: label.is_some(),
            host_network: false,
            identity,
            labels: p.labels.clone(),
            label_mode: label,
            probe_ports: p.probe_ports.clone(),
        })
    }

    /// The compiled policy set, compiled again only when a policy resource changed. Objects
    /// are translated one by one and never refused as a set: one that cannot be read is a closed
    /// stand-in (`Policies::compile_failing_closed`), so a bad object can neither remove the
    /// others nor widen access.
    fn policies(&mut self, c: &Cluster) -> Arc<Policies> {
        if let Some((seen, p)) = &self.policies {
            if *seen == c.policy_changes {
                return p.clone();
            }
        }
        let input = PolicyInput {
            mesh: self.source.mesh.clone(),
            peer_authentications: c.peer.values().filter_map(|r| r.as_ref().ok().cloned()).collect(),
            authorization_policies: c.authz.values().filter_map(|r| r.as_ref().ok().cloned()).collect(),
            unreadable: (c.peer.values().filter_map(|r| r.as_ref().err()))
                .chain(c.authz.values().filter_map(|r| r.as_ref().err()))
                .map(|u| (**u).clone())
                .collect(),
        };
        let p = Arc::new(Policies::compile_failing_closed(&input));
        for o in p.objects() {
            let what = format!("{} {}", o.kind, o.policy);
            let problem = (o.enforcement != Enforcement::Enforced).then(|| o.enforcement.summary());
            self.report_as(Problem::PolicyNotAsWritten, what, problem);
        }
        self.policies = Some((c.policy_changes, p.clone()));
        p
    }
}

/// The scale benchmark's entry (`agent/benches/directory.rs`), built only with the `synthetic`
/// feature: not part of the agent.
#[cfg(feature = "synthetic")]
pub mod synthetic;

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn builder(cgroup_parent: PathBuf) -> Builder {
        let config = kube::Config::new("http://127.0.0.1:1".parse().unwrap());
        let source = KubeSource {
            client: Client::try_from(config).unwrap(),
            node: Some("node-0".into()),
            trust_domain: TrustDomain::new("cluster.local").unwrap(),
            cgroup_parent,
            cni_dir: PathBuf::new(),
            mesh: MeshSettings::default(),
            enrollment: None,
        };
        Builder::new(source, None)
    }

    fn info(node: &str, ip: &str, mode: Option<&str>) -> PodInfo {
        PodInfo {
            uid: format!("uid-{ip}"),
            service_account: "sa".into(),
            node: node.into(),
            ips: vec![ip.parse().unwrap()],
            host_network: false,
            finished: false,
            mode_label: mode.map(str::to_owned),
            labels: BTreeMap::new(),
            mirror: false,
            created: None,
            probe_ports: Vec::new(),
        }
    }

    fn key(ns: &str, name: &str) -> Key {
        (ns.into(), name.into())
    }

    #[tokio::test]
    async fn services_and_their_endpoint_slices_resolve_virtual_ips_to_the_slices_ports() {
        let svc: super::super::objects::Service = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10", "fd00::10"],
                     "ports": [{"name": "http", "port": 80, "targetPort": "web"}, {"port": 53, "protocol": "UDP"}],
                     "sessionAffinity": "ClientIP"}}))
        .unwrap();
        let headless: super::super::objects::Service = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "db", "namespace": "shop"}, "spec": {"clusterIP": "None", "ports": [{"port": 5432}]}}))
        .unwrap();
        assert!(service_info(&headless).is_none(), "no virtual IP, nothing to resolve");
        let slice = |name: &str, endpoints: serde_json::Value| {
            let o: DynamicObject = serde_json::from_value(serde_json::json!({
                "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"name": name, "namespace": "shop", "labels": {"kubernetes.io/service-name": "web"}},
                "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
                "endpoints": endpoints}))
            .unwrap();
            slice_info(&o).unwrap()
        };
        let mut c = Cluster::default();
        c.namespaces.insert("shop".into(), Some("strict".into()));
        c.all.insert(key("shop", "web-1"), info("node-9", "10.0.0.1", None));
        c.services.insert(key("shop", "web"), service_info(&svc).unwrap());
        c.slices.insert(
            key("shop", "web-a"),
            slice("web-a", serde_json::json!([
                {"addresses": ["10.0.0.1"], "conditions": {"ready": true}, "targetRef": {"kind": "Pod", "name": "web-1"}},
                {"addresses": ["10.0.0.2"], "conditions": {"ready": false, "serving": true, "terminating": true}}])),
        );
        let zoned = serde_json::json!([{"addresses": ["10.0.0.3"], "nodeName": "node-3", "zone": "z1",
                                        "hints": {"forZones": [{"name": "z1"}, {"name": "z2"}]}}]);
        c.slices.insert(key("shop", "web-b"), slice("web-b", zoned));
        let e = &c.slices[&key("shop", "web-b")].endpoints[0];
        assert_eq!(
            (e.node.as_deref(), e.zone.as_deref(), &e.for_zones[..]),
            (Some("node-3"), Some("z1"), &["z1".to_string(), "z2".to_string()][..])
        );
        let mut b = builder(PathBuf::from("/nonexistent"));
        let dir = b.build(&mut c);
        let front = dir.services.get("10.96.0.10:80".parse().unwrap()).expect("the VIP resolves");
        assert!(front.client_ip_affinity);
        let mut got: Vec<(String, Option<String>)> =
            front.backends.iter().map(|b| (b.addr.to_string(), b.pod.as_ref().map(|p| p.key.to_string()))).collect();
        got.sort();
        assert_eq!(
            got,
            [("10.0.0.1:8080".into(), Some("shop/web-1".into())), ("10.0.0.3:8080".into(), None)],
            "ready endpoints of both slices, at the slices' resolved port; the pod by targetRef"
        );
        assert!(dir.services.get("10.96.0.10:53".parse().unwrap()).is_none(), "UDP ports are not carried");

        // A slice moves to another Service (relabelled), as its watch reports it: both Services
        // are rebuilt and nothing else; pods and policy are the last directory's own.
        let mut other = svc.clone();
        other.metadata.name = Some("api".into());
        other.spec.as_mut().unwrap().cluster_ips = Some(vec!["10.96.0.11".into()]);
        other.spec.as_mut().unwrap().cluster_ip = None;
        c.services.insert(key("shop", "api"), service_info(&other).unwrap());
        c.pending.note(SERVICES_WATCH, Some(key("shop", "api")));
        let mut moved = c.slices[&key("shop", "web-b")].clone();
        moved.service = "api".into();
        c.slices.insert(key("shop", "web-b"), moved);
        c.pending.note(SLICES_WATCH, Some(key("shop", "web-b")));
        assert!(c.pending.services_only());
        let next = b.build(&mut c);
        assert!(Arc::ptr_eq(&dir.policies, &next.policies), "an incremental update shares the policy");
        let addrs = |d: &Directory, vip: &str| -> Vec<String> {
            let mut v: Vec<String> =
                d.services.get(vip.parse().unwrap()).unwrap().backends.iter().map(|b| b.addr.to_string()).collect();
            v.sort();
            v
        };
        assert_eq!(addrs(&next, "10.96.0.10:80"), ["10.0.0.1:8080"], "web lost the moved slice");
        assert_eq!(addrs(&next, "10.96.0.11:80"), ["10.0.0.3:8080"], "api gained it");
        assert_eq!(next.services.services(), 2);
        // The same cluster built whole gives the same map.
        c.pending.full = true;
        let whole = b.build(&mut c);
        for vip in ["10.96.0.10:80", "10.96.0.11:80"] {
            assert_eq!(addrs(&whole, vip), addrs(&next, vip), "{vip}");
        }
        // A pod change alone is no Service change: everything is rebuilt.
        c.pending.note(1, Some(key("shop", "web-1")));
        assert!(!c.pending.services_only());
    }

    #[tokio::test]
    async fn the_issuer_knows_a_pod_before_its_addresses_and_an_agent_only_with_them() {
        let mut c = Cluster::default();
        c.namespaces.insert("a".into(), Some("strict".into()));
        let mut pending = info("node-9", "10.0.0.1", None);
        pending.ips.clear();
        c.all.insert(key("a", "starting"), pending);
        let pod = PodKey { namespace: "a".into(), name: "starting".into() };
        let mut issuer = builder(PathBuf::from("/nonexistent"));
        issuer.source.node = None;
        let known = issuer.build(&mut c);
        assert!(known.get(&pod).is_some_and(|w| w.ips.is_empty() && w.mesh), "the issuer authorizes it by node");
        assert!(
            builder(PathBuf::from("/nonexistent")).build(&mut c).get(&pod).is_none(),
            "an agent cannot route to it"
        );
    }

    #[tokio::test]
    async fn the_mode_label_opts_in_by_namespace_or_pod_and_a_typo_makes_the_pod_strict() {
        let mut c = Cluster::default();
        c.namespaces.insert("a".into(), Some("strict".into()));
        c.namespaces.insert("b".into(), None);
        c.namespaces.insert("c".into(), Some("strcit".into()));
        for (k, ip, mode) in [
            (key("a", "inherits"), "10.0.0.1", None),
            (key("a", "opted-out"), "10.0.0.2", Some("off")),
            (key("b", "pod-opt-in"), "10.0.0.3", Some("permissive")),
            (key("b", "untouched"), "10.0.0.4", None),
            (key("c", "ns-typo"), "10.0.0.5", None),
            (key("a", "pod-typo"), "10.0.0.6", Some("bogus")),
        ] {
            c.all.insert(k, info("node-9", ip, mode));
        }
        let mut b = builder(PathBuf::from("/nonexistent"));
        let dir = b.build(&mut c);
        let get = |ns: &str, name: &str| dir.get(&PodKey { namespace: ns.into(), name: name.into() }).cloned();
        let inherits = get("a", "inherits").unwrap();
        assert!(inherits.mesh);
        assert_eq!(inherits.label_mode, Some(LabelMode { mode: Mode::Strict, scope: "namespace label" }));
        assert!(!get("a", "opted-out").unwrap().mesh);
        let opt_in = get("b", "pod-opt-in").unwrap();
        assert_eq!(opt_in.label_mode, Some(LabelMode { mode: Mode::Permissive, scope: "pod label" }));
        assert!(!get("b", "untouched").unwrap().mesh);
        // A typo never takes a pod out of the mesh nor weakens it: the pod is STRICT, and said so.
        let (ns_typo, pod_typo) = (get("c", "ns-typo").unwrap(), get("a", "pod-typo").unwrap());
        assert!(ns_typo.mesh && pod_typo.mesh);
        assert_eq!(ns_typo.label_mode, Some(LabelMode { mode: Mode::Strict, scope: "unreadable namespace label" }));
        assert_eq!(pod_typo.label_mode, Some(LabelMode { mode: Mode::Strict, scope: "unreadable pod label" }));
        assert_eq!(dir.policy_for(&ns_typo).mode.mode, Mode::Strict);
        assert!(b.problems["label of pod c/ns-typo"].contains("strcit"));
        assert!(b.problems["label of pod a/pod-typo"].contains("bogus"));
        // The mode the label gives is the pod's mode unless a PeerAuthentication says otherwise.
        assert_eq!(dir.policy_for(&inherits).mode.mode, Mode::Strict);
        // Pod events reuse the compiled policy; a policy event recompiles it.
        let again = b.build(&mut c);
        assert!(Arc::ptr_eq(&dir.policies, &again.policies));
        c.policy_changes += 1;
        assert!(!Arc::ptr_eq(&dir.policies, &b.build(&mut c).policies));
    }

    #[tokio::test]
    async fn this_nodes_pod_wins_an_ip_conflict_and_finished_host_network_and_unplaced_pods_are_left_out() {
        // A pod cgroup named after the UID, holding this very process: its netns is "found".
        let parent = std::env::temp_dir().join(format!("meshless-cgroups-{}", std::process::id()));
        let pod_dir = parent.join("kubepods-besteffort-poduid_10_0_0_1.slice");
        std::fs::create_dir_all(&pod_dir).unwrap();
        std::fs::write(pod_dir.join("cgroup.procs"), format!("{}\n", std::process::id())).unwrap();
        let mut c = Cluster::default();
        c.namespaces.insert("a".into(), Some("permissive".into()));
        let mut local = info("node-0", "10.0.0.1", None);
        local.uid = "uid-10-0-0-1".into();
        c.local.insert(key("a", "here"), local);
        // The cluster-wide watch still has it on the node it left, with its old address (a
        // StatefulSet pod that moved here): one entry per key, this node's; never an empty
        // directory for it.
        c.all.insert(key("a", "here"), info("node-7", "10.0.0.9", None));
        // A pod elsewhere still listed with the same IP (its delete not seen yet).
        c.all.insert(key("a", "stale"), info("node-7", "10.0.0.1", None));
        // Two remote pods claiming one IP: the older keeps it, whatever the names.
        let mut old = info("node-7", "10.0.0.5", None);
        old.created = Some(100);
        let mut new = info("node-8", "10.0.0.5", None);
        new.created = Some(200);
        c.all.insert(key("a", "zz-older"), old);
        c.all.insert(key("a", "aa-newer"), new);
        // A static pod's mirror gets no identity.
        let mut mirror = info("node-7", "10.0.0.6", None);
        mirror.mirror = true;
        c.all.insert(key("kube-system", "etcd-node-7"), mirror);
        let mut done = info("node-7", "10.0.0.2", None);
        done.finished = true;
        c.all.insert(key("a", "done"), done);
        let mut host = info("node-7", "10.0.0.3", None);
        host.host_network = true;
        c.all.insert(key("a", "host"), host);
        // On this node, but neither a CNI record nor a cgroup: not placed yet.
        c.local.insert(key("a", "unplaced"), info("node-0", "10.0.0.4", None));
        let mut b = builder(parent.clone());
        let dir = b.build(&mut c);
        let here = dir.pod_by_ip("10.0.0.1".parse().unwrap()).unwrap();
        assert_eq!(here.key.name, "here");
        assert_eq!(here.netns.as_deref(), Some(Path::new(&format!("/proc/{}/ns/net", std::process::id()))));
        assert_eq!(here.cgroup.as_deref(), Some(pod_dir.as_path()));
        assert_eq!(dir.local_pods().count(), 1);
        assert!(dir.pod_by_ip("10.0.0.9".parse().unwrap()).is_none(), "the stale view of the moved pod is not used");
        assert!(b.problems["pod a/stale"].contains("10.0.0.1"));
        assert_eq!(dir.pod_by_ip("10.0.0.5".parse().unwrap()).unwrap().key.name, "zz-older");
        assert!(b.problems["pod a/aa-newer"].contains("10.0.0.5"));
        assert!(dir.pod_by_ip("10.0.0.6".parse().unwrap()).is_none(), "a mirror pod is left out");
        assert!(b.problems["pod kube-system/etcd-node-7"].contains("mirror"));
        assert!(b.problems["pod a/unplaced"].contains("network namespace"));
        for gone in ["done", "host", "unplaced"] {
            assert!(dir.get(&PodKey { namespace: "a".into(), name: gone.into() }).is_none(), "{gone}");
        }
        let _ = std::fs::remove_dir_all(&parent);
    }
}
