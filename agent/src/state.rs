//! The embedded-mode cluster state file: trust domain, this node, and the pods of the cluster.
//!
//! This is the workload directory when meshless runs without Kubernetes (`meshless agent
//! --state <file>`). Parsing is strict (unknown fields are errors) so a typo cannot silently
//! disable capture; every error names the file and the offending pod.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::identity::{SpiffeId, TrustDomain};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read state file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("state file {path} is not valid: {source}")]
    Parse { path: PathBuf, source: serde_yaml::Error },
    #[error("state file {path}: {msg}")]
    Invalid { path: PathBuf, msg: String },
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
}

fn yes() -> bool {
    true
}

/// A pod of the cluster, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pod {
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    pub node: String,
    pub ips: Vec<IpAddr>,
    /// Path of the pod's network namespace (required for pods on this node).
    pub netns: Option<PathBuf>,
    pub cgroup: Option<PathBuf>,
    /// Whether the pod is in the mesh. hostNetwork pods never are.
    pub enrolled: bool,
    pub identity: SpiffeId,
}

impl Pod {
    /// `namespace/name`, for logs.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

#[derive(Debug, Clone)]
pub struct State {
    pub trust_domain: TrustDomain,
    pub node: String,
    pub cgroup_parent: PathBuf,
    pub pods: Vec<Pod>,
    by_ip: HashMap<IpAddr, usize>,
}

impl State {
    pub fn load(path: &Path) -> Result<State, Error> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Read { path: path.into(), source })?;
        State::parse(path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<State, Error> {
        let raw: RawState = serde_yaml::from_str(text).map_err(|source| Error::Parse { path: path.into(), source })?;
        let invalid = |msg: String| Error::Invalid { path: path.into(), msg };
        let trust_domain = TrustDomain::new(&raw.trust_domain).map_err(|e| invalid(format!("trustDomain: {e}")))?;
        if raw.node.is_empty() {
            return Err(invalid("node must name this node".into()));
        }
        let mut pods = Vec::with_capacity(raw.pods.len());
        let mut by_ip = HashMap::new();
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
            let enrolled = p.enrolled && !p.host_network;
            if p.node == raw.node && enrolled && p.netns.is_none() {
                return Err(invalid(format!("{at}: runs on this node and is enrolled, so it needs `netns`")));
            }
            let identity = crate::identity::workload_id(&trust_domain, &p.namespace, &p.service_account)
                .map_err(|e| invalid(format!("{at}: {e}")))?;
            for ip in &p.ips {
                if let Some(other) = by_ip.insert(*ip, pods.len()) {
                    let other: &Pod = &pods[other];
                    return Err(invalid(format!("{at}: IP {ip} is already used by {}", other.key())));
                }
            }
            pods.push(Pod {
                name: p.name,
                namespace: p.namespace,
                service_account: p.service_account,
                node: p.node,
                ips: p.ips,
                netns: p.netns,
                cgroup: p.cgroup,
                enrolled,
                identity,
            });
        }
        Ok(State { trust_domain, node: raw.node, cgroup_parent: raw.cgroup_parent, pods, by_ip })
    }

    /// Pods scheduled on this node.
    pub fn local_pods(&self) -> impl Iterator<Item = &Pod> {
        self.pods.iter().filter(|p| p.node == self.node)
    }

    /// The pod that owns `ip`, on any node.
    pub fn pod_by_ip(&self, ip: IpAddr) -> Option<&Pod> {
        self.by_ip.get(&canonical(ip)).map(|&i| &self.pods[i])
    }
}

/// IPv4-mapped IPv6 addresses name the IPv4 pod.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
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
    enrolled: false
"#;

    fn parse(s: &str) -> Result<State, Error> {
        State::parse(Path::new("test.yaml"), s)
    }

    #[test]
    fn parses_pods_identities_and_ip_index() {
        let s = parse(GOOD).unwrap();
        assert_eq!(s.trust_domain.as_str(), "cluster.local");
        assert_eq!(s.local_pods().count(), 2);
        let server = s.pod_by_ip("198.19.2.10".parse().unwrap()).unwrap();
        assert_eq!(server.identity.to_string(), "spiffe://cluster.local/ns/shop/sa/web");
        let mapped: IpAddr = "::ffff:198.19.2.10".parse().unwrap();
        assert_eq!(s.pod_by_ip(mapped).unwrap().name, "server", "v4-mapped addresses find the IPv4 pod");
        assert!(!s.pod_by_ip("198.19.1.11".parse().unwrap()).unwrap().enrolled);
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
            ("trustDomain: td\nnode: n\ncgroupParent: /x\npods:\n - {name: a, namespace: d, serviceAccount: s, node: m, ips: [1.2.3.4]}\n - {name: b, namespace: d, serviceAccount: s, node: m, ips: [1.2.3.4]}\n", "already used by d/a"),
            ("trustDomain: td\nnode: n\ncgroupParent: /x\npods:\n - {name: a, namespace: d, serviceAccount: s, node: m, ips: [not-an-ip]}\n", "not valid"),
            ("trustDomain: td\nnode: n\ncgroupParent: /x\npods:\n - {name: a, namespace: 'd/x', serviceAccount: s, node: m, ips: [1.2.3.4]}\n", "pods[0]"),
        ];
        for (input, want) in cases {
            let err = parse(input).expect_err(input).to_string();
            assert!(err.contains(want), "error for {input:?} should mention {want:?}, got: {err}");
            assert!(err.contains("test.yaml"), "error should name the file: {err}");
        }
    }

    #[test]
    fn host_network_pods_are_never_enrolled() {
        let s = parse("trustDomain: td\nnode: n\ncgroupParent: /x\npods:\n - {name: a, namespace: d, serviceAccount: s, node: n, ips: [1.2.3.4], hostNetwork: true}\n").unwrap();
        assert!(!s.pods[0].enrolled);
    }
}
