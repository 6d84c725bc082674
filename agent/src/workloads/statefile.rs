//! The embedded-mode state file: the workload directory when meshless runs without Kubernetes
//! (`meshless agent --state <file>`), watched for changes.
//!
//! Parsing is strict (unknown fields are errors) so a typo cannot silently disable capture; every
//! error names the file and the offending pod. A change to the file is validated as a whole and
//! published only if valid: a bad edit is logged once and the previous state keeps serving.

use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt as _;
use inotify::{Inotify, WatchMask};
use serde::Deserialize;
use tokio::sync::watch;
use tracing::{info, warn};

use super::{Directory, PodKey, Workload, WorkloadSource};
use crate::identity::{workload_id, TrustDomain};
use crate::policy::{AuthorizationPolicy, MeshSettings, PeerAuthentication, Policies, PolicyInput};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read state file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("state file {path} is not valid: {source}")]
    Parse { path: PathBuf, source: serde_yaml::Error },
    #[error("state file {path}: {msg}")]
    Invalid { path: PathBuf, msg: String },
    #[error("watching state file {path}: {source}")]
    Watch { path: PathBuf, source: std::io::Error },
}

/// The file as written (camelCase YAML; see the README for an example).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawState {
    trust_domain: String,
    node: String,
    cgroup_parent: PathBuf,
    #[serde(default)]
    pods: Vec<RawPod>,
    /// Mesh-wide enforcement settings (root namespace, dry run, closing denied connections).
    #[serde(default)]
    mesh: MeshSettings,
    /// Istio-shaped PeerAuthentication objects (the mode of each pod).
    #[serde(default)]
    peer_authentications: Vec<PeerAuthentication>,
    /// Istio-shaped (L4) AuthorizationPolicy objects.
    #[serde(default)]
    authorization_policies: Vec<AuthorizationPolicy>,
    /// Services with a virtual IP and their endpoints (what a Service and its EndpointSlices say).
    #[serde(default)]
    services: Vec<RawService>,
    /// Each node's zone (its `topology.kubernetes.io/zone` label): node name → zone.
    #[serde(default)]
    zones: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawService {
    name: String,
    namespace: String,
    #[serde(rename = "clusterIPs")]
    cluster_ips: Vec<IpAddr>,
    ports: Vec<RawServicePort>,
    /// `None` (default) or `ClientIP`.
    #[serde(default)]
    session_affinity: Option<String>,
    #[serde(default)]
    publish_not_ready_addresses: bool,
    /// `Cluster` (default) or `Local` (this node's endpoints only).
    #[serde(default)]
    internal_traffic_policy: Option<String>,
    /// `PreferClose`: endpoints in the caller's zone first.
    #[serde(default)]
    traffic_distribution: Option<String>,
    #[serde(default)]
    endpoints: Vec<RawEndpoint>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawServicePort {
    port: u16,
    /// A number, or the name of a port the endpoints declare (`ports`); default: `port`.
    #[serde(default)]
    target_port: Option<serde_yaml::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawEndpoint {
    /// A pod of the Service's namespace (its addresses are the pod's).
    #[serde(default)]
    pod: Option<String>,
    /// Addresses of an endpoint that is not a listed pod (or to override the pod's).
    #[serde(default)]
    addresses: Vec<IpAddr>,
    #[serde(default = "yes")]
    ready: bool,
    #[serde(default)]
    serving: Option<bool>,
    #[serde(default)]
    terminating: bool,
    /// Named ports the endpoint serves: name → port.
    #[serde(default)]
    ports: BTreeMap<String, u16>,
    /// The node of an endpoint that is not a listed pod (a pod's is its own).
    #[serde(default)]
    node_name: Option<String>,
    /// The endpoint's zone (default: its node's, from `zones`).
    #[serde(default)]
    zone: Option<String>,
    /// Topology hints: the zones it should serve.
    #[serde(default)]
    for_zones: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawPod {
    name: String,
    namespace: String,
    service_account: String,
    node: String,
    ips: Vec<IpAddr>,
    #[serde(default)]
    netns: Option<PathBuf>,
    #[serde(default)]
    cgroup: Option<PathBuf>,
    #[serde(default = "yes")]
    enrolled: bool,
    #[serde(default)]
    host_network: bool,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    /// The ports the kubelet probes on the pod (a Kubernetes pod's probes, as its spec declares
    /// them): the only ones a probe passes to when plaintext is otherwise refused.
    #[serde(default)]
    probe_ports: Vec<u16>,
}

fn yes() -> bool {
    true
}

pub fn load(path: &Path) -> Result<Directory, Error> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Read { path: path.into(), source })?;
    parse(path, &text)
}

pub fn parse(path: &Path, text: &str) -> Result<Directory, Error> {
    parse_after(path, text, None)
}

/// [`parse`], for a directory that replaces one whose Services were `prev` (their endpoints'
/// load counts carry over).
fn parse_after(path: &Path, text: &str, prev: Option<&super::services::ServiceMap>) -> Result<Directory, Error> {
    let raw: RawState = serde_yaml::from_str(text).map_err(|source| Error::Parse { path: path.into(), source })?;
    let invalid = |msg: String| Error::Invalid { path: path.into(), msg };
    let trust_domain = TrustDomain::new(&raw.trust_domain).map_err(|e| invalid(format!("trustDomain: {e}")))?;
    if raw.node.is_empty() {
        return Err(invalid("node must name this node".into()));
    }
    let mut workloads = Vec::with_capacity(raw.pods.len());
    let mut names = HashSet::new();
    for (i, p) in raw.pods.into_iter().enumerate() {
        let at = format!("pods[{i}] ({}/{})", p.namespace, p.name);
        if p.name.is_empty() || p.namespace.is_empty() || p.service_account.is_empty() {
            return Err(invalid(format!("{at}: name, namespace and serviceAccount must not be empty")));
        }
        if !names.insert((p.namespace.clone(), p.name.clone())) {
            return Err(invalid(format!("{at}: listed twice")));
        }
        if p.ips.is_empty() {
            return Err(invalid(format!("{at}: needs at least one IP in `ips`")));
        }
        if p.node == raw.node && !p.host_network && p.netns.is_none() {
            return Err(invalid(format!(
                "{at}: runs on this node, so it needs `netns` (the agent must know its network \
                 namespace to carry its connections, or to leave it alone)"
            )));
        }
        let identity =
            workload_id(&trust_domain, &p.namespace, &p.service_account).map_err(|e| invalid(format!("{at}: {e}")))?;
        workloads.push(Workload {
            key: PodKey { namespace: p.namespace, name: p.name },
            service_account: p.service_account,
            node: p.node,
            ips: p.ips,
            netns: p.netns,
            cgroup: p.cgroup,
            mesh: p.enrolled && !p.host_network,
            host_network: p.host_network,
            identity,
            labels: p.labels,
            label_mode: None,
            probe_ports: p.probe_ports,
        });
    }
    let policies = Policies::compile(&PolicyInput {
        mesh: raw.mesh,
        peer_authentications: raw.peer_authentications,
        authorization_policies: raw.authorization_policies,
        unreadable: Vec::new(),
    })
    .map_err(|e| invalid(e.to_string()))?;
    let pods: std::collections::HashMap<PodKey, (Vec<IpAddr>, String)> =
        workloads.iter().map(|w| (w.key.clone(), (w.ips.clone(), w.node.clone()))).collect();
    let services = services(raw.services, &pods, &raw.zones).map_err(invalid)?;
    let here = super::services::Here { node: raw.node.clone(), zone: raw.zones.get(&raw.node).cloned() };
    let dir =
        Directory::new(trust_domain, raw.node, raw.cgroup_parent, workloads, policies).map_err(|e| invalid(e.0))?;
    Ok(dir.with_services(&services, here, prev))
}

/// The `services:` section, checked: unique names, a VIP each that is no pod's address, ports
/// 1-65535, endpoints that are listed pods of the Service's namespace or give addresses.
fn services(
    raw: Vec<RawService>,
    pods: &std::collections::HashMap<PodKey, (Vec<IpAddr>, String)>,
    zones: &BTreeMap<String, String>,
) -> Result<Vec<super::services::Service>, String> {
    use super::services::{Endpoint, Service, ServiceKey, ServicePort, TargetPort};
    let mut seen = HashSet::new();
    let pod_ips: HashSet<IpAddr> =
        pods.values().flat_map(|(ips, _)| ips).map(|ip| crate::policy::canonical(*ip)).collect();
    let mut out = Vec::with_capacity(raw.len());
    for (i, s) in raw.into_iter().enumerate() {
        let at = format!("services[{i}] ({}/{})", s.namespace, s.name);
        if s.name.is_empty() || s.namespace.is_empty() {
            return Err(format!("{at}: name and namespace must not be empty"));
        }
        if !seen.insert((s.namespace.clone(), s.name.clone())) {
            return Err(format!("{at}: listed twice"));
        }
        if s.cluster_ips.is_empty() {
            return Err(format!("{at}: needs a virtual IP in `clusterIPs` (headless Services need no entry)"));
        }
        if let Some(ip) = s.cluster_ips.iter().find(|ip| pod_ips.contains(&crate::policy::canonical(**ip))) {
            return Err(format!("{at}: clusterIP {ip} is a pod's address"));
        }
        let client_ip_affinity = match s.session_affinity.as_deref() {
            None | Some("None") => false,
            Some("ClientIP") => true,
            Some(other) => return Err(format!("{at}: sessionAffinity {other:?} is not None or ClientIP")),
        };
        let node_local = match s.internal_traffic_policy.as_deref() {
            None | Some("Cluster") => false,
            Some("Local") => true,
            Some(other) => return Err(format!("{at}: internalTrafficPolicy {other:?} is not Cluster or Local")),
        };
        let prefer_close = match s.traffic_distribution.as_deref() {
            None => false,
            Some("PreferClose") => true,
            Some(other) => return Err(format!("{at}: trafficDistribution {other:?} is not PreferClose")),
        };
        let mut ports = Vec::new();
        for (j, p) in s.ports.into_iter().enumerate() {
            let target = match p.target_port {
                None => TargetPort::Number(p.port),
                Some(serde_yaml::Value::Number(n)) => match n.as_u64().filter(|n| (1..=65535).contains(n)) {
                    Some(n) => TargetPort::Number(n as u16),
                    None => return Err(format!("{at}: ports[{j}].targetPort {n} is not a port (1-65535)")),
                },
                Some(serde_yaml::Value::String(name)) if !name.is_empty() => TargetPort::Name(name),
                Some(other) => return Err(format!("{at}: ports[{j}].targetPort {other:?} is not a port or a name")),
            };
            if p.port == 0 || ports.iter().any(|q: &ServicePort| q.port == p.port) {
                return Err(format!("{at}: ports[{j}].port {} is 0 or listed twice", p.port));
            }
            ports.push(ServicePort { port: p.port, target });
        }
        let mut endpoints = Vec::new();
        for (j, e) in s.endpoints.into_iter().enumerate() {
            let pod = e.pod.map(|name| PodKey { namespace: s.namespace.clone(), name });
            let listed = match &pod {
                Some(k) => Some(pods.get(k).ok_or_else(|| format!("{at}: endpoints[{j}]: no pod {k} is listed"))?),
                None => None,
            };
            let addresses = match (listed, e.addresses.is_empty()) {
                (Some((ips, _)), true) => ips.clone(),
                (_, false) => e.addresses,
                (None, true) => return Err(format!("{at}: endpoints[{j}] needs `pod` or `addresses`")),
            };
            let node = e.node_name.or_else(|| listed.map(|(_, node)| node.clone()));
            endpoints.push(Endpoint {
                addresses,
                pod,
                ready: e.ready,
                serving: e.serving.unwrap_or(e.ready),
                terminating: e.terminating,
                named_ports: std::sync::Arc::new(e.ports),
                zone: e.zone.or_else(|| node.as_ref().and_then(|n| zones.get(n).cloned())),
                node,
                for_zones: e.for_zones,
            });
        }
        out.push(Service {
            key: ServiceKey { namespace: s.namespace, name: s.name },
            vips: s.cluster_ips,
            ports,
            client_ip_affinity,
            publish_not_ready: s.publish_not_ready_addresses,
            node_local,
            prefer_close,
            endpoints,
        });
    }
    Ok(out)
}

/// Says which accepted policy objects are enforced only in part (the file refuses the others).
fn log_partial(dir: &Directory) {
    for o in dir.policies.objects().iter().filter(|o| o.enforcement.state() != "Enforced") {
        warn!(object = %format!("{} {}", o.kind, o.policy), problem = %o.enforcement.summary(),
              "policy object not enforced as written");
    }
}

/// The state file as a [`WorkloadSource`]: read at start, then watched (inotify on its directory
/// for files written, created, moved in or deleted — so editors that replace the file and
/// Kubernetes ConfigMap symlink swaps are seen, while appends to other open files, such as logs,
/// cost nothing — plus a slow poll as a safety net).
pub struct FileSource {
    pub path: PathBuf,
}

/// How often the file is re-read even without a change notification.
const POLL: Duration = Duration::from_secs(5);
/// Changes are applied once the file has been quiet this long (editors write in several steps).
const SETTLE: Duration = Duration::from_millis(100);

impl WorkloadSource for FileSource {
    fn start(
        self: Box<Self>,
    ) -> futures_util::future::BoxFuture<'static, Result<watch::Receiver<Arc<Directory>>, crate::Error>> {
        Box::pin(async move {
            let path = self.path;
            let text = std::fs::read_to_string(&path).map_err(|source| Error::Read { path: path.clone(), source })?;
            let first = Arc::new(parse(&path, &text)?);
            log_partial(&first);
            let (tx, rx) = watch::channel(first);
            let watch_err = |source| Error::Watch { path: path.clone(), source };
            let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
            let inotify = Inotify::init().map_err(watch_err)?;
            let mask = WatchMask::CLOSE_WRITE | WatchMask::MOVED_TO | WatchMask::CREATE | WatchMask::DELETE;
            inotify.watches().add(dir, mask).map_err(watch_err)?;
            let events = inotify.into_event_stream(vec![0u8; 4096]).map_err(watch_err)?;
            tokio::spawn(watch_file(path, text, tx, events));
            Ok(rx)
        })
    }
}

async fn watch_file(
    path: PathBuf,
    mut last: String,
    tx: watch::Sender<Arc<Directory>>,
    mut events: inotify::EventStream<Vec<u8>>,
) {
    // Events about the file itself; `..`-prefixed names are how a ConfigMap swaps its content in.
    let name = path.file_name().map(|n| n.to_os_string());
    let ours = move |e: &std::io::Result<inotify::Event<std::ffi::OsString>>| {
        e.as_ref().is_ok_and(|e| {
            e.name.as_ref().is_some_and(|n| Some(n) == name.as_ref() || n.to_string_lossy().starts_with(".."))
        })
    };
    loop {
        tokio::select! {
            e = events.next() => {
                let Some(e) = e else { return };
                if !ours(&e) {
                    continue;
                }
                // Let a burst of writes settle (for at most a second), then read once.
                let until = tokio::time::Instant::now() + Duration::from_secs(1);
                while tokio::time::Instant::now() < until
                    && tokio::time::timeout(SETTLE, events.next()).await.is_ok_and(|e| e.is_some())
                {}
            }
            _ = tokio::time::sleep(POLL) => {}
            _ = tx.closed() => return,
        }
        let text = match tokio::fs::read_to_string(&path).await {
            Ok(t) => t,
            Err(e) => {
                if last != "<unreadable>" {
                    warn!(path = %path.display(), error = %e, "state file unreadable; the previous state keeps serving");
                    last = "<unreadable>".into();
                }
                continue;
            }
        };
        if text == last {
            continue;
        }
        last = text;
        let current = tx.borrow().clone();
        match parse_after(&path, &last, Some(&current.services)).and_then(|d| same_node(&path, &current, d)) {
            Ok(dir) => {
                info!(path = %path.display(), pods = dir.len(), "state file changed; applying it");
                log_partial(&dir);
                let _ = tx.send(Arc::new(dir));
            }
            Err(e) => {
                warn!(error = %e, "state file rejected; the previous state keeps serving");
                // The last good snapshot goes on serving, saying why (status, readiness).
                let mut serving = (*current).clone();
                serving.refused_update = Some(e.to_string());
                let _ = tx.send(Arc::new(serving));
            }
        }
    }
}

/// The node, trust domain and pod cgroup are fixed for the life of an agent.
fn same_node(path: &Path, current: &Directory, new: Directory) -> Result<Directory, Error> {
    let fixed = |what: &str| Error::Invalid {
        path: path.into(),
        msg: format!("{what} cannot change while the agent runs; restart the agent to change it"),
    };
    if new.node != current.node {
        return Err(fixed("node"));
    }
    if new.trust_domain != current.trust_domain {
        return Err(fixed("trustDomain"));
    }
    if new.cgroup_parent != current.cgroup_parent {
        return Err(fixed("cgroupParent"));
    }
    Ok(new)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
trustDomain: cluster.local
node: node1
cgroupParent: /sys/fs/cgroup/kubepods
pods:
  - name: client
    namespace: default
    serviceAccount: client
    node: node1
    ips: ["198.19.1.10", "fd6d:6c00:1::10"]
    netns: /run/netns/client
  - name: server
    namespace: shop
    serviceAccount: web
    node: node2
    ips: ["198.19.2.10"]
  - name: legacy
    namespace: default
    serviceAccount: legacy
    node: node1
    ips: ["198.19.1.11"]
    netns: /run/netns/legacy
    enrolled: false
"#;

    fn parse_str(s: &str) -> Result<Directory, Error> {
        parse(Path::new("test.yaml"), s)
    }

    #[test]
    fn parses_pods_identities_and_ip_index() {
        let s = parse_str(GOOD).unwrap();
        assert_eq!(s.trust_domain.as_str(), "cluster.local");
        assert_eq!(s.local_pods().count(), 2);
        let server = s.pod_by_ip("198.19.2.10".parse().unwrap()).unwrap();
        assert_eq!(server.identity.to_string(), "spiffe://cluster.local/ns/shop/sa/web");
        let mapped: IpAddr = "::ffff:198.19.2.10".parse().unwrap();
        assert_eq!(s.pod_by_ip(mapped).unwrap().key.name, "server", "v4-mapped addresses find the IPv4 pod");
        assert!(!s.pod_by_ip("198.19.1.11".parse().unwrap()).unwrap().mesh);
        assert!(s.pod_by_ip("198.19.9.9".parse().unwrap()).is_none());
    }

    #[test]
    fn rejects_bad_input_with_a_message_naming_the_problem() {
        let cases: &[(&str, &str)] = &[
            ("not: [valid", "not valid"),
            ("trustDomain: cluster.local\nnode: n\ncgroupParent: /x\nbogus: 1\n", "unknown field `bogus`"),
            ("trustDomain: Bad_Domain!\nnode: n\ncgroupParent: /x\n", "trustDomain"),
            ("trustDomain: td\nnode: n\ncgroupParent: /x\npods:\n - {name: a, namespace: d, serviceAccount: s, node: n, ips: []}\n", "needs at least one IP"),
            ("trustDomain: td\nnode: n\ncgroupParent: /x\npods:\n - {name: a, namespace: d, serviceAccount: s, node: n, ips: [1.2.3.4]}\n", "needs `netns`"),
            ("trustDomain: td\nnode: n\ncgroupParent: /x\npods:\n - {name: a, namespace: d, serviceAccount: s, node: n, ips: [1.2.3.4], enrolled: false}\n", "needs `netns`"),
            ("trustDomain: td\nnode: n\ncgroupParent: /x\npods:\n - {name: a, namespace: d, serviceAccount: s, node: m, ips: [1.2.3.4]}\n - {name: b, namespace: d, serviceAccount: s, node: m, ips: [1.2.3.4]}\n", "already used by d/a"),
            ("trustDomain: td\nnode: n\ncgroupParent: /x\npods:\n - {name: a, namespace: d, serviceAccount: s, node: m, ips: [1.2.3.4]}\n - {name: a, namespace: d, serviceAccount: t, node: m, ips: [1.2.3.5]}\n", "listed twice"),
            ("trustDomain: td\nnode: n\ncgroupParent: /x\npods:\n - {name: a, namespace: d, serviceAccount: s, node: m, ips: [not-an-ip]}\n", "not valid"),
            ("trustDomain: td\nnode: n\ncgroupParent: /x\npods:\n - {name: a, namespace: 'd/x', serviceAccount: s, node: m, ips: [1.2.3.4]}\n", "pods[0]"),
        ];
        for (input, want) in cases {
            let err = parse_str(input).expect_err(input).to_string();
            assert!(err.contains(want), "error for {input:?} should mention {want:?}, got: {err}");
            assert!(err.contains("test.yaml"), "error should name the file: {err}");
        }
    }

    #[test]
    fn policies_and_labels_come_with_the_pods_and_a_bad_one_fails_the_whole_file() {
        let with = format!(
            "{GOOD}    labels: {{app: legacy, tier: old}}\n{}",
            "mesh: {dryRun: true}\npeerAuthentications:\n  - metadata: {name: strict, namespace: default}\n    spec: {mtls: {mode: STRICT}}\nauthorizationPolicies:\n  - metadata: {name: api, namespace: shop}\n    spec: {selector: {matchLabels: {app: api}}, rules: [{}]}\n"
        );
        let s = parse_str(&with).unwrap();
        assert_eq!(s.policies.counts(), (1, 1));
        assert!(s.policies.settings.dry_run);
        let legacy = s.get(&PodKey { namespace: "default".into(), name: "legacy".into() }).unwrap();
        assert_eq!(legacy.labels.get("tier").map(String::as_str), Some("old"));
        let client = s.get(&PodKey { namespace: "default".into(), name: "client".into() }).unwrap();
        assert_eq!(s.policy_for(client).mode.mode, crate::policy::Mode::Strict, "the namespace-wide STRICT applies");
        // A typo inside a policy, and an invalid value: the file is rejected, the error says where.
        for (bad, want) in [
            (with.replace("rules: [{}]", "rule: [{}]"), "unknown field `rule`"),
            (with.replace("mode: STRICT", "mode: STRIKT"), "unknown variant `STRIKT`"),
            (
                with.replace("rules: [{}]", "rules: [{to: [{operation: {ports: [\"0\"]}}]}]"),
                "authorizationPolicies[0] (shop/api): spec.rules[0].to[0].operation.ports[0]",
            ),
        ] {
            let err = parse_str(&bad).unwrap_err().to_string();
            assert!(err.contains(want) && err.contains("test.yaml"), "{want:?} not in: {err}");
        }
    }

    #[test]
    fn services_resolve_to_their_pods_and_a_bad_one_names_its_field() {
        let base = "trustDomain: td\nnode: n\ncgroupParent: /x\npods:\n - {name: a, namespace: d, serviceAccount: s, \
                    node: m, ips: [10.0.0.1]}\n - {name: b, namespace: d, serviceAccount: s, node: m, ips: [10.0.0.2], \
                    enrolled: false}\n";
        let svc = |rest: &str| format!("{base}services:\n - {{name: web, namespace: d, {rest}}}\n");
        let dir = parse_str(&svc("clusterIPs: [10.96.0.1], ports: [{port: 80, targetPort: web}], endpoints: [{pod: a, \
                                  ports: {web: 8080}}, {pod: b, ready: false}, {addresses: [10.0.0.9], ports: {web: 9090}}]"))
        .unwrap();
        let front = dir.services.get("10.96.0.1:80".parse().unwrap()).expect("the VIP resolves");
        let found: Vec<(String, Option<String>)> =
            front.backends.iter().map(|b| (b.addr.to_string(), b.pod.as_ref().map(|p| p.key.to_string()))).collect();
        assert_eq!(
            found,
            [("10.0.0.1:8080".into(), Some("d/a".into())), ("10.0.0.9:9090".into(), None)],
            "the ready endpoints, named port per endpoint, pods by targetRef"
        );
        // Zones: this node's from `zones`; an endpoint's from its pod's node, or its own word.
        let zoned = format!(
            "{}zones: {{n: z1, m: z2}}\n",
            svc("clusterIPs: [10.96.0.1], ports: [{port: 80}], trafficDistribution: PreferClose, endpoints: \
                 [{pod: a}, {addresses: [10.0.0.9], nodeName: o, zone: z1}]")
        );
        let front = parse_str(&zoned).unwrap().services.get("10.96.0.1:80".parse().unwrap()).unwrap().clone();
        assert_eq!((front.near, front.backends[0].addr.to_string()), (1, "10.0.0.9:80".to_string()), "this zone first");
        let local =
            svc("clusterIPs: [10.96.0.1], ports: [{port: 80}], internalTrafficPolicy: Local, endpoints: [{pod: a}]");
        let local = parse_str(&local).unwrap();
        assert!(local.services.get("10.96.0.1:80".parse().unwrap()).unwrap().backends.is_empty(), "a is on node m");
        for (rest, wanted) in [
            ("clusterIPs: [], ports: [{port: 80}]", "needs a virtual IP"),
            ("clusterIPs: [10.0.0.1], ports: [{port: 80}]", "is a pod's address"),
            ("clusterIPs: [10.96.0.1], ports: [{port: 80, targetPort: 70000}]", "targetPort 70000"),
            ("clusterIPs: [10.96.0.1], ports: [{port: 80}, {port: 80}]", "listed twice"),
            ("clusterIPs: [10.96.0.1], ports: [{port: 80}], sessionAffinity: Sticky", "sessionAffinity"),
            ("clusterIPs: [10.96.0.1], ports: [{port: 80}], internalTrafficPolicy: local", "internalTrafficPolicy"),
            ("clusterIPs: [10.96.0.1], ports: [{port: 80}], trafficDistribution: Near", "trafficDistribution"),
            ("clusterIPs: [10.96.0.1], ports: [{port: 80}], endpoints: [{pod: zz}]", "no pod d/zz"),
            ("clusterIPs: [10.96.0.1], ports: [{port: 80}], endpoints: [{ready: true}]", "needs `pod` or `addresses`"),
        ] {
            let err = parse_str(&svc(rest)).unwrap_err().to_string();
            assert!(err.contains(wanted) && err.contains("services[0] (d/web)"), "{rest}: {err}");
        }
    }

    #[test]
    fn host_network_pods_are_never_in_the_mesh_and_need_no_netns() {
        let s = parse_str("trustDomain: td\nnode: n\ncgroupParent: /x\npods:\n - {name: a, namespace: d, serviceAccount: s, node: n, ips: [1.2.3.4], hostNetwork: true}\n").unwrap();
        let a = s.pods().next().unwrap();
        assert!(!a.mesh && a.host_network);
    }

    #[test]
    fn the_node_trust_domain_and_cgroup_cannot_change_at_runtime() {
        let current = parse_str(GOOD).unwrap();
        for (from, to, what) in [
            ("\nnode: node1\n", "\nnode: node3\n", "node cannot change"),
            ("trustDomain: cluster.local", "trustDomain: other.local", "trustDomain cannot change"),
            ("cgroupParent: /sys/fs/cgroup/kubepods", "cgroupParent: /elsewhere", "cgroupParent cannot change"),
        ] {
            let changed = parse_str(&GOOD.replace(from, to)).unwrap();
            let err = same_node(Path::new("test.yaml"), &current, changed).unwrap_err().to_string();
            assert!(err.contains(what), "{err}");
        }
        let more = GOOD.replace("ips: [\"198.19.2.10\"]", "ips: [\"198.19.2.10\", \"198.19.2.99\"]");
        assert!(same_node(Path::new("test.yaml"), &current, parse_str(&more).unwrap()).is_ok());
    }

    /// The watcher publishes a valid change; an invalid one leaves the previous state serving,
    /// republished with the reason; the next valid one is published.
    #[tokio::test]
    async fn the_watched_file_publishes_valid_changes_only() {
        let dir = std::env::temp_dir().join(format!("meshless-statefile-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("state.yaml");
        std::fs::write(&path, GOOD).unwrap();
        let mut rx = Box::new(FileSource { path: path.clone() }).start().await.unwrap();
        assert_eq!(rx.borrow_and_update().len(), 3);
        // A busy file beside it (a log, rewritten here) must not keep changes from being noticed.
        let busy = dir.join("agent.log");
        let writer = std::thread::spawn(move || {
            for i in 0..300 {
                std::fs::write(&busy, format!("line {i}")).unwrap();
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        let wait = |rx: &mut watch::Receiver<Arc<Directory>>| {
            let mut rx = rx.clone();
            async move { tokio::time::timeout(Duration::from_secs(10), rx.changed()).await.is_ok() }
        };
        // An invalid edit (duplicate IP) is not applied: the last good state serves on, saying why.
        let good = rx.borrow_and_update().clone();
        std::fs::write(&path, GOOD.replace("198.19.1.11", "198.19.2.10")).unwrap();
        assert!(wait(&mut rx).await, "the refusal is published");
        let serving = rx.borrow_and_update().clone();
        assert_eq!(serving.len(), 3, "the last good pods serve");
        assert!(Arc::ptr_eq(&serving.policies, &good.policies), "and its policy");
        assert!(
            serving.refused_update.as_deref().is_some_and(|r| r.contains("198.19.2.10")),
            "the refusal names the problem: {:?}",
            serving.refused_update
        );
        // …a valid one is, also when written by rename (as editors and ConfigMaps do).
        let tmp = dir.join("state.yaml.tmp");
        std::fs::write(&tmp, GOOD.replace("  - name: legacy", "  - name: legacy2")).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        assert!(wait(&mut rx).await, "a valid change must be published");
        let d = rx.borrow_and_update().clone();
        assert!(d.get(&PodKey { namespace: "default".into(), name: "legacy2".into() }).is_some());
        assert_eq!(d.refused_update, None, "a good file clears the refusal");
        writer.join().unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
