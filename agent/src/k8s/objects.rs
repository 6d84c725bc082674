//! Pods and namespaces as the agent reads them from the API: only the fields it uses. The API
//! server sends whole objects; deserializing into these skips the rest as it parses, so a watch
//! event of a large pod allocates a few strings instead of a full `Pod` tree, and the binary does
//! not carry the code to build one (k8s-openapi's full `Pod` deserializer is megabytes).

use std::borrow::Cow;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::core::{ClusterResourceScope, NamespaceResourceScope};
use serde::Deserialize;

/// `v1/Pod`, reduced.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct Pod {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: Option<PodSpec>,
    #[serde(default)]
    pub status: Option<PodStatus>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodSpec {
    #[serde(default)]
    pub node_name: Option<String>,
    #[serde(default)]
    pub service_account_name: Option<String>,
    #[serde(default)]
    pub host_network: Option<bool>,
    /// Only what the probe ports need (this node's pods).
    #[serde(default)]
    pub containers: Vec<Container>,
}

/// A container, reduced to its ports and probes.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Container {
    #[serde(default)]
    pub ports: Vec<ContainerPort>,
    #[serde(default)]
    pub liveness_probe: Option<Probe>,
    #[serde(default)]
    pub readiness_probe: Option<Probe>,
    #[serde(default)]
    pub startup_probe: Option<Probe>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerPort {
    #[serde(default)]
    pub name: Option<String>,
    pub container_port: i32,
}

/// A kubelet probe: the network ones name a port (number or the name of a container port) and,
/// for HTTP, possibly another host.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Probe {
    #[serde(default)]
    pub http_get: Option<ProbeTarget>,
    #[serde(default)]
    pub tcp_socket: Option<ProbeTarget>,
    #[serde(default)]
    pub grpc: Option<ProbeTarget>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct ProbeTarget {
    #[serde(default)]
    pub port: Option<serde_json::Value>,
    #[serde(default)]
    pub host: Option<String>,
}

impl PodSpec {
    /// The ports the kubelet probes on this pod's own address: each network probe without a
    /// `host` of its own (one naming another host targets that host, not this pod), named ports
    /// resolved against the pod's containers. Sorted, unique.
    pub fn probe_ports(&self) -> Vec<u16> {
        let named = |name: &str| {
            self.containers
                .iter()
                .flat_map(|c| &c.ports)
                .find(|p| p.name.as_deref() == Some(name))
                .and_then(|p| u16::try_from(p.container_port).ok())
        };
        let mut ports: Vec<u16> = self
            .containers
            .iter()
            .flat_map(|c| [&c.liveness_probe, &c.readiness_probe, &c.startup_probe])
            .flatten()
            .flat_map(|p| [&p.http_get, &p.tcp_socket, &p.grpc])
            .flatten()
            .filter(|t| t.host.as_deref().is_none_or(str::is_empty))
            .filter_map(|t| match t.port.as_ref()? {
                serde_json::Value::Number(n) => n.as_u64().and_then(|n| u16::try_from(n).ok()),
                serde_json::Value::String(s) => s.parse().ok().or_else(|| named(s)),
                _ => None,
            })
            .filter(|p| *p != 0)
            .collect();
        ports.sort_unstable();
        ports.dedup();
        ports
    }
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodStatus {
    #[serde(default)]
    pub phase: Option<String>,
    #[serde(default, rename = "podIP")]
    pub pod_ip: Option<String>,
    #[serde(default, rename = "podIPs")]
    pub pod_ips: Option<Vec<PodIp>>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct PodIp {
    pub ip: String,
}

/// `v1/Namespace`, reduced to its metadata (the opt-in label).
#[derive(Clone, Debug, Default, Deserialize)]
pub struct Namespace {
    pub metadata: ObjectMeta,
}

/// `v1/Service`, reduced to what resolving its virtual IPs needs.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct Service {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: Option<ServiceSpec>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceSpec {
    #[serde(default, rename = "clusterIP")]
    pub cluster_ip: Option<String>,
    #[serde(default, rename = "clusterIPs")]
    pub cluster_ips: Option<Vec<String>>,
    #[serde(default)]
    pub ports: Vec<ServicePort>,
    #[serde(default)]
    pub session_affinity: Option<String>,
    #[serde(default)]
    pub publish_not_ready_addresses: Option<bool>,
    /// `Cluster` or `Local`.
    #[serde(default)]
    pub internal_traffic_policy: Option<String>,
    /// `PreferClose` (Kubernetes 1.31+).
    #[serde(default)]
    pub traffic_distribution: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServicePort {
    #[serde(default)]
    pub name: Option<String>,
    pub port: i32,
    #[serde(default)]
    pub protocol: Option<String>,
}

/// `discovery.k8s.io` EndpointSlice (`v1`, or `v1beta1` before Kubernetes 1.21: the same fields
/// here), reduced; read from an untyped object, the version being the cluster's.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointSlice {
    #[serde(default)]
    pub endpoints: Vec<SliceEndpoint>,
    /// The resolved target ports of the endpoints of this slice, by Service port name.
    #[serde(default)]
    pub ports: Option<Vec<SlicePort>>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SliceEndpoint {
    #[serde(default)]
    pub addresses: Vec<String>,
    #[serde(default)]
    pub conditions: Option<Conditions>,
    #[serde(default)]
    pub target_ref: Option<TargetRef>,
    #[serde(default)]
    pub node_name: Option<String>,
    #[serde(default)]
    pub zone: Option<String>,
    #[serde(default)]
    pub hints: Option<Hints>,
}

/// Topology hints: the zones an endpoint should serve.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Hints {
    #[serde(default)]
    pub for_zones: Vec<ForZone>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct ForZone {
    pub name: String,
}

/// `v1/Node`, reduced to its labels (the zone).
#[derive(Clone, Debug, Default, Deserialize)]
pub struct Node {
    pub metadata: ObjectMeta,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct Conditions {
    #[serde(default)]
    pub ready: Option<bool>,
    #[serde(default)]
    pub serving: Option<bool>,
    #[serde(default)]
    pub terminating: Option<bool>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct TargetRef {
    #[serde(default)]
    pub kind: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub namespace: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct SlicePort {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub port: Option<i32>,
    #[serde(default)]
    pub protocol: Option<String>,
}

/// `kube::Resource` for a reduced core (`v1`) type: its kind, plural and scope.
macro_rules! core_v1_resource {
    ($ty:ident, $kind:literal, $plural:literal, $scope:ty) => {
        impl kube::Resource for $ty {
            type DynamicType = ();
            type Scope = $scope;

            fn kind(_: &()) -> Cow<'_, str> {
                $kind.into()
            }
            fn group(_: &()) -> Cow<'_, str> {
                "".into()
            }
            fn version(_: &()) -> Cow<'_, str> {
                "v1".into()
            }
            fn plural(_: &()) -> Cow<'_, str> {
                $plural.into()
            }
            fn meta(&self) -> &ObjectMeta {
                &self.metadata
            }
            fn meta_mut(&mut self) -> &mut ObjectMeta {
                &mut self.metadata
            }
        }
    };
}

core_v1_resource!(Pod, "Pod", "pods", NamespaceResourceScope);
core_v1_resource!(Namespace, "Namespace", "namespaces", ClusterResourceScope);
core_v1_resource!(Service, "Service", "services", NamespaceResourceScope);
core_v1_resource!(Node, "Node", "nodes", ClusterResourceScope);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_ports_are_the_pods_own_with_named_ports_resolved_and_other_hosts_left_out() {
        let spec: PodSpec = serde_json::from_value(serde_json::json!({
            "containers": [
                {"ports": [{"name": "health", "containerPort": 9090}, {"containerPort": 8080}],
                 "livenessProbe": {"httpGet": {"path": "/", "port": "health"}},
                 "readinessProbe": {"tcpSocket": {"port": 8080}},
                 "startupProbe": {"exec": {"command": ["true"]}}},
                {"livenessProbe": {"httpGet": {"host": "10.0.0.9", "port": 7000}},
                 "readinessProbe": {"grpc": {"port": 5000}},
                 "startupProbe": {"httpGet": {"port": "nope"}}}
            ]
        }))
        .unwrap();
        assert_eq!(spec.probe_ports(), [5000, 8080, 9090]);
    }

    #[test]
    fn a_full_pod_from_the_api_reads_into_the_reduced_one() {
        let json = r#"{"apiVersion":"v1","kind":"Pod","metadata":{"name":"web-1","namespace":"shop","uid":"u-1",
            "labels":{"app":"web","meshless.io/mode":"strict"},"managedFields":[{"manager":"kubectl","fieldsV1":{"f:spec":{}}}]},
            "spec":{"nodeName":"node1","serviceAccountName":"web","containers":[{"name":"app","image":"x",
            "ports":[{"containerPort":8080}]}],"volumes":[{"name":"v","emptyDir":{}}]},
            "status":{"phase":"Running","podIP":"10.0.0.5","podIPs":[{"ip":"10.0.0.5"},{"ip":"fd00::5"}],
            "conditions":[{"type":"Ready","status":"True"}]}}"#;
        let pod: Pod = serde_json::from_str(json).unwrap();
        assert_eq!(pod.metadata.name.as_deref(), Some("web-1"));
        assert_eq!(pod.metadata.labels.as_ref().unwrap()["meshless.io/mode"], "strict");
        let spec = pod.spec.unwrap();
        assert_eq!((spec.node_name.as_deref(), spec.service_account_name.as_deref()), (Some("node1"), Some("web")));
        let status = pod.status.unwrap();
        assert_eq!(status.pod_ip.as_deref(), Some("10.0.0.5"));
        assert_eq!(status.pod_ips.unwrap()[1].ip, "fd00::5");
        assert_eq!(<Pod as kube::Resource>::url_path(&(), Some("shop")), "/api/v1/namespaces/shop/pods");
        assert_eq!(<Namespace as kube::Resource>::url_path(&(), None), "/api/v1/namespaces");
    }
}
