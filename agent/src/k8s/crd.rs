//! The policy resources: `PeerAuthentication` and `AuthorizationPolicy` in group `meshless.io`,
//! version `v1alpha1`. Their specs are the policy model's types (`meshless_policy::model`), the very
//! shapes the state file holds, so a policy moves between the two unchanged; the CRDs are
//! generated from those types (`meshless manifests crds`), and a test keeps `deploy/` equal to
//! what they generate.
//!
//! The API server checks the structure; meshless translates the meaning (principals, ports,
//! fields it cannot evaluate at L4) and reports it in `status`: `Enforced`, `PartiallyEnforced`
//! (what was left out and how it is treated) or `FailedClosed` (accepted False: the object cannot
//! be read, and a closed stand-in is enforced in its place). Never does an object meshless
//! cannot read or evaluate widen access; the rest of the policy set applies unchanged.

use kube::api::{ApiResource, DynamicObject};
use kube::CustomResourceExt as _;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::policy::model::{
    AuthorizationPolicy, AuthorizationPolicySpec, ObjectMeta, PeerAuthentication, PeerAuthenticationSpec,
};
use crate::policy::{read_object, Enforcement, PolicyObject, Unreadable};

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
    /// `True`: enforced, wholly or in part (see `reason`). `False`: it cannot be read, and a
    /// closed stand-in is enforced in its place until it is fixed (see `message`).
    pub accepted: String,
    /// `Enforced`, `PartiallyEnforced` or `FailedClosed`.
    pub reason: String,
    /// What was left out and how it is treated, or why it cannot be read and what stands in.
    pub message: String,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

impl PolicyStatus {
    pub fn of(enforcement: &Enforcement, generation: Option<i64>) -> PolicyStatus {
        let (accepted, message) = match enforcement {
            Enforcement::Enforced => ("True", "enforced by every node's agent".to_string()),
            Enforcement::PartiallyEnforced { .. } => ("True", enforcement.summary()),
            Enforcement::FailedClosed { .. } => ("False", enforcement.summary()),
        };
        PolicyStatus {
            accepted: accepted.into(),
            reason: enforcement.state().into(),
            message,
            observed_generation: generation,
        }
    }
}

/// A policy resource and the policy model's object it carries: one definition per kind, used by
/// the agents' watches and the issuer's status reporter alike. Both read the resources as
/// untyped objects and parse each one on its own ([`read`]), so one object whose spec does not
/// parse never stops a watch: it becomes a closed stand-in instead.
pub trait PolicyResource: kube::Resource<DynamicType = ()> {
    type Object: PolicyObject;
}

impl PolicyResource for PeerAuthenticationResource {
    type Object = PeerAuthentication;
}

impl PolicyResource for AuthorizationPolicyResource {
    type Object = AuthorizationPolicy;
}

/// The resource type of `K`, for untyped (`DynamicObject`) access.
pub fn api_resource<K: PolicyResource>() -> ApiResource {
    ApiResource::erase::<K>(&())
}

/// One resource as the policy model's object (what the state file would hold), or what could be
/// read of it.
pub fn read<K: PolicyResource>(o: &DynamicObject) -> Result<K::Object, Box<Unreadable>> {
    let spec = o.data.get("spec").cloned().unwrap_or_else(|| serde_json::json!({}));
    read_object::<K::Object>(meta(&o.metadata), spec)
}

fn meta(m: &kube::api::ObjectMeta) -> ObjectMeta {
    ObjectMeta {
        name: m.name.clone().unwrap_or_default(),
        namespace: m.namespace.clone().unwrap_or_default(),
        annotations: m.annotations.clone().unwrap_or_default(),
    }
}

/// What the status of resource `o` should say.
pub fn status_of<K: PolicyResource>(o: &DynamicObject) -> PolicyStatus {
    let enforcement = match read::<K>(o) {
        Ok(object) => object.enforcement(),
        Err(u) => crate::policy::Policies::compile_failing_closed(&crate::policy::PolicyInput {
            unreadable: vec![*u],
            ..Default::default()
        })
        .objects()[0]
            .enforcement
            .clone(),
    };
    PolicyStatus::of(&enforcement, o.metadata.generation)
}

/// Keeps the `status` of every policy resource current: what is enforced of it, and why. Run by
/// one process (the issuer), not by every agent: status writes then cost one per change, not one
/// per node. Agents apply the same translation themselves and never wait for this.
pub async fn report_status(client: kube::Client) {
    tokio::join!(report::<PeerAuthenticationResource>(client.clone()), report::<AuthorizationPolicyResource>(client));
}

async fn report<K: PolicyResource>(client: kube::Client) {
    use futures_util::StreamExt as _;
    use kube::runtime::{watcher, WatchStreamExt as _};
    let resource = api_resource::<K>();
    let kind = resource.kind.clone();
    let all = kube::Api::<DynamicObject>::all_with(client.clone(), &resource);
    let mut events = std::pin::pin!(watcher(all, watcher::Config::default()).default_backoff().applied_objects());
    while let Some(object) = events.next().await {
        let object = match object {
            Ok(o) => o,
            Err(e) => {
                // Retried with backoff; most often missing RBAC or an API server restart.
                tracing::warn!(kind = %kind, error = %e, "policy status watch failed; retrying");
                continue;
            }
        };
        let meta = &object.metadata;
        let (Some(ns), Some(name)) = (meta.namespace.clone(), meta.name.clone()) else { continue };
        let want = status_of::<K>(&object);
        let have = object.data.get("status").and_then(|s| serde_json::from_value::<PolicyStatus>(s.clone()).ok());
        if have.as_ref() == Some(&want) {
            continue;
        }
        let api = kube::Api::<DynamicObject>::namespaced_with(client.clone(), &ns, &resource);
        let patch = kube::api::Patch::Merge(serde_json::json!({ "status": want }));
        match api.patch_status(&name, &kube::api::PatchParams::default(), &patch).await {
            Ok(_) => tracing::info!(kind = %kind, object = %format!("{ns}/{name}"), accepted = %want.accepted,
                                    reason = %want.reason, message = %want.message, "policy status reported"),
            Err(e) => tracing::warn!(kind = %kind, object = %format!("{ns}/{name}"), error = %e,
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
const DEPLOY_FILES: [(&str, &str); 6] = [
    ("namespace.yaml", include_str!("../../../deploy/namespace.yaml")),
    ("crds.yaml", ""),
    ("rbac.yaml", include_str!("../../../deploy/rbac.yaml")),
    ("issuer.yaml", include_str!("../../../deploy/issuer.yaml")),
    ("agent.yaml", include_str!("../../../deploy/agent.yaml")),
    ("csi.yaml", include_str!("../../../deploy/csi.yaml")),
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
        // What a 1.20 API server checks at admission, so `kubectl apply` refuses the worst typos.
        assert_eq!((ports["minimum"].as_f64(), ports["maximum"].as_f64()), (Some(1.0), Some(65535.0)), "{ports}");
        assert!(ports["pattern"].is_string(), "{ports}");
        let source =
            &spec["properties"]["rules"]["items"]["properties"]["from"]["items"]["properties"]["source"]["properties"];
        assert!(source["ipBlocks"]["items"]["pattern"].is_string(), "{source}");
        assert_eq!(source["serviceAccounts"]["maxItems"], 16, "Istio's newer fields are kept, not pruned: {source}");
        assert_eq!(spec["properties"]["action"]["enum"], serde_json::json!(["ALLOW", "DENY", "AUDIT", "CUSTOM"]));
        let key = &spec["properties"]["rules"]["items"]["properties"]["when"]["items"]["properties"]["key"];
        assert!(key["pattern"].as_str().is_some_and(|p| p.contains("remote\\.ip")), "{key}");
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
        let dynamic: DynamicObject = serde_json::from_value(serde_json::to_value(&r).unwrap()).unwrap();
        assert_eq!(read::<AuthorizationPolicyResource>(&dynamic).unwrap(), from_file);
        let partial: DynamicObject = serde_yaml::from_str(
            "apiVersion: meshless.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: ns, generation: 3}\n\
             spec:\n  rules:\n  - to: [{operation: {methods: [GET]}}]\n",
        )
        .unwrap();
        let status = status_of::<AuthorizationPolicyResource>(&partial);
        assert_eq!(
            (status.accepted.as_str(), status.reason.as_str(), status.observed_generation),
            ("True", "PartiallyEnforced", Some(3))
        );
        let broken: DynamicObject = serde_yaml::from_str(
            "apiVersion: meshless.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: ns}\n\
             spec:\n  action: DENY\n  rules: [{from: [{source: {principals: 7}}]}]\n",
        )
        .unwrap();
        let failed = status_of::<AuthorizationPolicyResource>(&broken);
        assert_eq!((failed.accepted.as_str(), failed.reason.as_str()), ("False", "FailedClosed"));
        assert!(
            failed.message.contains("spec.rules[0].from[0].source.principals")
                && failed.message.contains("denies every"),
            "{}",
            failed.message
        );
        assert!(status.message.contains("methods"), "{}", status.message);
    }
}
