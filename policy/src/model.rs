//! The policy objects as users write them: Istio's `PeerAuthentication` and (L4)
//! `AuthorizationPolicy`, field for field, in the shape the Kubernetes CRDs will have — so a policy
//! moves between the state file, `kubectl apply` and an Istio cluster unchanged.
//!
//! Parsing is strict where a typo would weaken enforcement (every `spec` is
//! `deny_unknown_fields`), lenient where Kubernetes adds bookkeeping (`metadata` ignores `uid`,
//! `resourceVersion` and the like). Fields Istio has and meshless cannot evaluate at L4 (HTTP
//! methods, paths, hosts, request principals, HTTP `when` keys, per-port mTLS) are kept as
//! written, so that the translation (`crate::Enforcement`) can name them and fail closed on them.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// API versions accepted on policy objects (meshless's own, and Istio's, so manifests written
/// for Istio apply unchanged).
pub const API_VERSIONS: [&str; 3] = ["meshless.io/v1alpha1", "security.istio.io/v1", "security.istio.io/v1beta1"];

/// `metadata` of a policy object. Fields Kubernetes adds (uid, resourceVersion, …) are ignored.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ObjectMeta {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub namespace: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// `spec.selector`: which workloads of the policy's namespace (or, in the root namespace, of
/// every namespace, for authorization policies) the policy applies to. Absent or empty: all.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadSelector {
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

/// A `PeerAuthentication`: the mTLS mode of the selected workloads' inbound plaintext.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PeerAuthentication {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: PeerAuthenticationSpec,
}

/// The `spec` of the object (and of the Kubernetes resource, whose CRD is generated from this type
/// in the agent's `k8s::crd`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PeerAuthenticationSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtls: Option<MutualTls>,
    /// Istio's per-port modes (port → `{mode}`). Not yet enforced per port: the strongest mode
    /// named applies to every port of the selected workloads (never weaker than Istio).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crate::model::preserved")]
    pub port_level_mtls: Option<serde_yaml::Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MutualTls {
    #[serde(default)]
    pub mode: MtlsMode,
}

/// `spec.mtls.mode`. UNSET inherits from the namespace, then the mesh.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum MtlsMode {
    #[default]
    Unset,
    Disable,
    Permissive,
    Strict,
}

/// An `AuthorizationPolicy` (L4 subset of Istio's).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationPolicy {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: AuthorizationPolicySpec,
}

/// The `spec` of the object (and of the Kubernetes resource, whose CRD is generated from this type
/// in the agent's `k8s::crd`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationPolicySpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    #[serde(default)]
    pub action: Action,
    /// Absent or empty: the policy matches nothing (an ALLOW policy then allows nothing).
    #[serde(default)]
    pub rules: Vec<Rule>,
    /// Istio's Gateway API attachment and external authorizers: not supported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crate::model::preserved")]
    pub target_ref: Option<serde_yaml::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crate::model::preserved")]
    pub target_refs: Option<serde_yaml::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crate::model::preserved")]
    pub provider: Option<serde_yaml::Value>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Action {
    #[default]
    Allow,
    Deny,
    Audit,
    /// Istio's external authorization: rejected by validation.
    Custom,
}

/// A rule matches when one of `from` matches (or `from` is empty) and one of `to` matches (or
/// `to` is empty).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Rule {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from: Vec<FromClause>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to: Vec<ToClause>,
    /// Istio's conditions, all of which must hold. The L4 keys are evaluated (`source.ip`,
    /// `remote.ip`, `source.namespace`, `source.principal`, `destination.ip`,
    /// `destination.port`); HTTP keys (`request.*`, `connection.sni`, …) cannot be, and are
    /// treated so that the policy never allows more, nor denies less, than Istio would.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub when: Option<Vec<Condition>>,
}

/// One `when` condition: the attribute `key` has one of `values` (if given) and none of
/// `notValues` (if given).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Condition {
    /// The L4 keys, or the HTTP ones Istio defines (`request.*`, `connection.sni`,
    /// `experimental.*`), which meshless names as left out.
    #[schemars(regex(
        pattern = r"^(source\.(ip|namespace|principal)|remote\.ip|destination\.(ip|port)|connection\.sni|request\..+|experimental\..+)$"
    ))]
    pub key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub values: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_values: Option<Vec<String>>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FromClause {
    #[serde(default)]
    pub source: Source,
}

/// Every field present must match (AND); within a field, any value may (OR).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Source {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(inner(length(min = 1)))]
    pub principals: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(inner(length(min = 1)))]
    pub not_principals: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(inner(regex(pattern = r"^[*a-z0-9.-]+$")))]
    pub namespaces: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(inner(regex(pattern = r"^[*a-z0-9.-]+$")))]
    pub not_namespaces: Option<Vec<String>>,
    /// `<namespace>/<serviceaccount>` (or `<serviceaccount>` in the policy's namespace): the
    /// peer certificate's `/ns/<namespace>/sa/<serviceaccount>`, in any trust domain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(max = 16),
        inner(regex(pattern = r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"))
    )]
    pub service_accounts: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(max = 16),
        inner(regex(pattern = r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"))
    )]
    pub not_service_accounts: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(inner(regex(pattern = r"^[0-9a-fA-F:.]+(/[0-9]{1,3})?$")))]
    pub ip_blocks: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(inner(regex(pattern = r"^[0-9a-fA-F:.]+(/[0-9]{1,3})?$")))]
    pub not_ip_blocks: Option<Vec<String>>,
    /// At L4 there is no X-Forwarded-For: the same as `ipBlocks`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(inner(regex(pattern = r"^[0-9a-fA-F:.]+(/[0-9]{1,3})?$")))]
    pub remote_ip_blocks: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(inner(regex(pattern = r"^[0-9a-fA-F:.]+(/[0-9]{1,3})?$")))]
    pub not_remote_ip_blocks: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crate::model::preserved")]
    pub request_principals: Option<serde_yaml::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crate::model::preserved")]
    pub not_request_principals: Option<serde_yaml::Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ToClause {
    #[serde(default)]
    pub operation: Operation,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Operation {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<Vec<PortValue>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_ports: Option<Vec<PortValue>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crate::model::preserved")]
    pub hosts: Option<serde_yaml::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crate::model::preserved")]
    pub not_hosts: Option<serde_yaml::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crate::model::preserved")]
    pub methods: Option<serde_yaml::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crate::model::preserved")]
    pub not_methods: Option<serde_yaml::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crate::model::preserved")]
    pub paths: Option<serde_yaml::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crate::model::preserved")]
    pub not_paths: Option<serde_yaml::Value>,
}

/// Istio writes ports as strings (`"8080"`); a bare number is accepted too.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PortValue {
    Number(i64),
    Text(String),
}

impl JsonSchema for PortValue {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "PortValue".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        // A number 1-65535 or its decimal string: the API server refuses anything else.
        schemars::json_schema!({
            "x-kubernetes-int-or-string": true,
            "minimum": 1,
            "maximum": 65535,
            "pattern": "^([1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])$"
        })
    }
}

/// Mesh-wide settings of enforcement (the state file's `mesh:`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MeshSettings {
    /// Policies in this namespace apply mesh-wide (Istio's `istio-system`).
    #[serde(default = "default_root_namespace")]
    pub root_namespace: String,
    /// Evaluate and log every decision, but enforce none of the denials.
    #[serde(default)]
    pub dry_run: bool,
    /// When policies change, reset established connections the new policy denies (otherwise
    /// changes apply to new connections only).
    #[serde(default)]
    pub close_denied_connections: bool,
}

pub fn default_root_namespace() -> String {
    "meshless-system".into()
}

impl Default for MeshSettings {
    fn default() -> Self {
        MeshSettings { root_namespace: default_root_namespace(), dry_run: false, close_denied_connections: false }
    }
}

/// Schema of a field meshless parses only to refuse with a reason (L7 attributes and the like):
/// kept as written, so the refusal can name it instead of the API server silently pruning it.
pub fn preserved(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({ "x-kubernetes-preserve-unknown-fields": true })
}

/// Why an L7-only field cannot be evaluated, for the status and the log.
pub(crate) const L7: &str = "an HTTP (L7) attribute; meshless authorizes connections (L4)";
