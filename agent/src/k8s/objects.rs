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

impl kube::Resource for Pod {
    type DynamicType = ();
    type Scope = NamespaceResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        "Pod".into()
    }
    fn group(_: &()) -> Cow<'_, str> {
        "".into()
    }
    fn version(_: &()) -> Cow<'_, str> {
        "v1".into()
    }
    fn plural(_: &()) -> Cow<'_, str> {
        "pods".into()
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

impl kube::Resource for Namespace {
    type DynamicType = ();
    type Scope = ClusterResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        "Namespace".into()
    }
    fn group(_: &()) -> Cow<'_, str> {
        "".into()
    }
    fn version(_: &()) -> Cow<'_, str> {
        "v1".into()
    }
    fn plural(_: &()) -> Cow<'_, str> {
        "namespaces".into()
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
