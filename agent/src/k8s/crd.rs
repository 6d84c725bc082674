//! The policy resources: `PeerAuthentication` and `AuthorizationPolicy` in group `meshless.io`,
//! version `v1alpha1`. Their specs are the policy model's types (`meshless_policy::model`), the very
//! shapes the state file holds, so a policy moves between the two unchanged; the CRDs are
//! generated from those types (`meshless manifests crds`), and a test keeps `deploy/` equal to
//! what they generate.
//!
//! The API server checks the structure; meshless checks the meaning (principals, ports, fields it
//! cannot honour at L4) and reports it in `status`: `accepted` True or False, with the reason.
//! An object that is not accepted is not applied; the rest of the policy set still is.

use kube::CustomResourceExt as _;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::policy::model::{
    AuthorizationPolicy, AuthorizationPolicySpec, ObjectMeta, PeerAuthentication, PeerAuthenticationSpec,
};
use crate::policy::{FieldError, PolicyObject};

/// The mTLS mode of the selected workloads' inbound plaintext (Istio's PeerAuthentication).
/// (The policy model's spec, unchanged on the wire and in the schema; this wrapper only carries
/// the resource's definition.)
#[derive(kube::CustomResource, Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "meshless.io",
    version = "v1alpha1",
    kind = "PeerAuthentication",
    root = "PeerAuthenticationResource",
    namespaced,
    status = "PolicyStatus",
    category = "meshless",
    printcolumn = r#"{"name":"Mode","type":"string","jsonPath":".spec.mtls.mode"}"#,
    printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.accepted"}"#,
    printcolumn = r#"{"name":"Message","type":"string","jsonPath":".status.message","priority":1}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(transparent)]
pub struct PeerAuthenticationResourceSpec(pub PeerAuthenticationSpec);

/// Which connections the selected workloads accept (Istio's AuthorizationPolicy, L4).
/// (The policy model's spec, unchanged.)
#[derive(kube::CustomResource, Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "meshless.io",
    version = "v1alpha1",
    kind = "AuthorizationPolicy",
    root = "AuthorizationPolicyResource",
    namespaced,
    status = "PolicyStatus",
    category = "meshless",
    printcolumn = r#"{"name":"Action","type":"string","jsonPath":".spec.action"}"#,
    printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.accepted"}"#,
    printcolumn = r#"{"name":"Message","type":"string","jsonPath":".status.message","priority":1}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(transparent)]
pub struct AuthorizationPolicyResourceSpec(pub AuthorizationPolicySpec);

/// What meshless made of a policy object.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyStatus {
    /// `True`: enforced. `False`: refused, see `message`; the object changes nothing.
    pub accepted: String,
    /// `Valid` or `Invalid`.
    pub reason: String,
    /// Why it was refused (the field and what is wrong with it), or what it does.
    pub message: String,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

impl PolicyStatus {
    pub fn of(check: &Result<(), FieldError>, generation: Option<i64>) -> PolicyStatus {
        match check {
            Ok(()) => PolicyStatus {
                accepted: "True".into(),
                reason: "Valid".into(),
                message: "enforced by every node's agent".into(),
                observed_generation: generation,
            },
            Err(e) => PolicyStatus {
                accepted: "False".into(),
                reason: "Invalid".into(),
                message: e.to_string(),
                observed_generation: generation,
            },
        }
    }
}

/// A policy resource and the policy model's object it carries: one definition per kind, used by
/// the agents' watches and the issuer's status reporter alike.
pub trait PolicyResource:
    kube::Resource<Scope = kube::core::NamespaceResourceScope, DynamicType = ()>
    + Clone
    + serde::de::DeserializeOwned
    + std::fmt::Debug
    + Send
    + Sync
    + 'static
{
    type Object: PolicyObject;
    /// The resource as the policy model's object (what the state file would hold).
    fn object(&self) -> Self::Object;
    fn status(&self) -> Option<&PolicyStatus>;
}

fn meta(m: &kube::api::ObjectMeta) -> ObjectMeta {
    ObjectMeta {
        name: m.name.clone().unwrap_or_default(),
        namespace: m.namespace.clone().unwrap_or_default(),
        annotations: m.annotations.clone().unwrap_or_default(),
    }
}

impl PolicyResource for PeerAuthenticationResource {
    type Object = PeerAuthentication;
    fn object(&self) -> PeerAuthentication {
        PeerAuthentication {
            api_version: Some("meshless.io/v1alpha1".into()),
            kind: Some(PeerAuthentication::KIND.into()),
            metadata: meta(&self.metadata),
            spec: self.spec.0.clone(),
        }
    }
    fn status(&self) -> Option<&PolicyStatus> {
        self.status.as_ref()
    }
}

impl PolicyResource for AuthorizationPolicyResource {
    type Object = AuthorizationPolicy;
    fn object(&self) -> AuthorizationPolicy {
        AuthorizationPolicy {
            api_version: Some("meshless.io/v1alpha1".into()),
            kind: Some(AuthorizationPolicy::KIND.into()),
            metadata: meta(&self.metadata),
            spec: self.spec.0.clone(),
        }
    }
    fn status(&self) -> Option<&PolicyStatus> {
        self.status.as_ref()
    }
}

/// Keeps the `status` of every policy resource current: accepted or not, and why. Run by one
/// process (the issuer), not by every agent: status writes then cost one per change, not one per
/// node. Agents apply the same checks themselves and never wait for this.
pub async fn report_status(client: kube::Client) {
    tokio::join!(report::<PeerAuthenticationResource>(client.clone()), report::<AuthorizationPolicyResource>(client));
}

async fn report<K: PolicyResource>(client: kube::Client) {
    use futures_util::StreamExt as _;
    use kube::runtime::{watcher, WatchStreamExt as _};
    let all = kube::Api::<K>::all(client.clone());
    let mut events = std::pin::pin!(watcher(all, watcher::Config::default()).default_backoff().applied_objects());
    while let Some(object) = events.next().await {
        let object = match object {
            Ok(o) => o,
            Err(e) => {
                // Retried with backoff; most often missing RBAC or an API server restart.
                tracing::warn!(kind = %K::kind(&()), error = %e, "policy status watch failed; retrying");
                continue;
            }
        };
        let meta = object.meta();
        let (Some(ns), Some(name)) = (meta.namespace.clone(), meta.name.clone()) else { continue };
        let want = PolicyStatus::of(&object.object().check(), meta.generation);
        if object.status() == Some(&want) {
            continue;
        }
        let api = kube::Api::<K>::namespaced(client.clone(), &ns);
        let patch = kube::api::Patch::Merge(serde_json::json!({ "status": want }));
        match api.patch_status(&name, &kube::api::PatchParams::default(), &patch).await {
            Ok(_) => tracing::info!(kind = %K::kind(&()), object = %format!("{ns}/{name}"), accepted = %want.accepted,
                                    message = %want.message, "policy status reported"),
            Err(e) => tracing::warn!(kind = %K::kind(&()), object = %format!("{ns}/{name}"), error = %e,
                                     "cannot report policy status"),
        }
    }
}

/// Everything `deploy/` holds, as one multi-document YAML in the kustomization's order, with the
/// CRDs generated from the types (so a user with only the binary can
/// `meshless manifests all | kubectl apply --server-side -f -`).
pub fn all_yaml() -> String {
    let mut out = String::new();
    for (name, text) in DEPLOY_FILES {
        out.push_str(&format!("# deploy/{name}\n"));
        if name == "crds.yaml" {
            out.push_str(&crds_yaml());
        } else {
            out.push_str("---\n");
            out.push_str(text);
        }
    }
    out
}

/// The manifests of `deploy/`, in the kustomization's order.
const DEPLOY_FILES: [(&str, &str); 5] = [
    ("namespace.yaml", include_str!("../../../deploy/namespace.yaml")),
    ("crds.yaml", ""),
    ("rbac.yaml", include_str!("../../../deploy/rbac.yaml")),
    ("issuer.yaml", include_str!("../../../deploy/issuer.yaml")),
    ("agent.yaml", include_str!("../../../deploy/agent.yaml")),
];

/// Both CRDs, as one multi-document YAML (what `deploy/crds.yaml` holds).
pub fn crds_yaml() -> String {
    let mut out =
        String::from("# Generated by `meshless manifests crds` from the policy model's Rust types; do not edit.\n");
    for crd in [PeerAuthenticationResource::crd(), AuthorizationPolicyResource::crd()] {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&crd).expect("a CRD serializes"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_crds_in_deploy_are_what_the_types_generate() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/crds.yaml");
        let on_disk = std::fs::read_to_string(path).expect("deploy/crds.yaml exists");
        assert!(
            on_disk == crds_yaml(),
            "deploy/crds.yaml differs from what the policy types generate; run \
             `cargo run -p meshless-agent -- manifests crds > deploy/crds.yaml`"
        );
    }

    #[test]
    fn manifests_all_holds_every_file_the_kustomization_lists_in_its_order() {
        let k = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/kustomization.yaml")).unwrap();
        let listed: Vec<&str> = k.lines().filter_map(|l| l.strip_prefix("- ")).collect();
        let ours: Vec<&str> = DEPLOY_FILES.iter().map(|(n, _)| *n).collect();
        assert_eq!(listed, ours, "deploy/kustomization.yaml and `meshless manifests all` list different files");
        let all = all_yaml();
        for kind in [
            "kind: Namespace",
            "kind: CustomResourceDefinition",
            "kind: ClusterRole",
            "kind: Deployment",
            "kind: DaemonSet",
        ] {
            assert!(all.contains(kind), "{kind} missing");
        }
        // Every document parses.
        for doc in serde_yaml::Deserializer::from_str(&all) {
            serde_yaml::Value::deserialize(doc).expect("a YAML document");
        }
    }

    #[test]
    fn the_generated_schema_is_structural_where_kubernetes_1_20_requires_it() {
        let crd = serde_json::to_value(AuthorizationPolicyResource::crd()).unwrap();
        let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
        assert_eq!(spec["type"], "object");
        let ports = &spec["properties"]["rules"]["items"]["properties"]["to"]["items"]["properties"]["operation"]
            ["properties"]["ports"]["items"];
        assert_eq!(ports["x-kubernetes-int-or-string"], true, "{ports}");
        let methods = &spec["properties"]["rules"]["items"]["properties"]["to"]["items"]["properties"]["operation"]
            ["properties"]["methods"];
        assert_eq!(methods["x-kubernetes-preserve-unknown-fields"], true, "{methods}");
        let columns = crd["spec"]["versions"][0]["additionalPrinterColumns"].as_array().unwrap();
        let names: Vec<_> = columns.iter().map(|c| c["name"].as_str().unwrap()).collect();
        assert_eq!(names, ["Action", "Accepted", "Message", "Age"]);
    }

    #[test]
    fn a_resource_becomes_the_same_object_the_state_file_holds() {
        let r: AuthorizationPolicyResource = serde_yaml::from_str(
            "apiVersion: meshless.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: ns}\n\
             spec:\n  action: ALLOW\n  rules:\n  - from: [{source: {principals: [cluster.local/ns/a/sa/b]}}]\n    \
             to: [{operation: {ports: [\"8080\", 9090]}}]\n",
        )
        .unwrap();
        let from_file: AuthorizationPolicy = serde_yaml::from_str(
            "apiVersion: meshless.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: ns}\n\
             spec:\n  action: ALLOW\n  rules:\n  - from: [{source: {principals: [cluster.local/ns/a/sa/b]}}]\n    \
             to: [{operation: {ports: [\"8080\", 9090]}}]\n",
        )
        .unwrap();
        assert_eq!(r.object(), from_file);
        let bad: AuthorizationPolicyResource = serde_yaml::from_str(
            "apiVersion: meshless.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: ns}\n\
             spec:\n  rules:\n  - to: [{operation: {methods: [GET]}}]\n",
        )
        .unwrap();
        let status = PolicyStatus::of(&bad.object().check(), Some(3));
        assert_eq!((status.accepted.as_str(), status.observed_generation), ("False", Some(3)));
        assert!(status.message.contains("methods"), "{}", status.message);
    }
}
