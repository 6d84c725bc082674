//! Enforcement policy: which inbound connections a pod accepts, and why.
//!
//! Two kinds of objects, with Istio's meaning ([`model`]): `PeerAuthentication` sets a pod's mTLS
//! mode (STRICT, PERMISSIVE, DISABLE; the most specific of workload, namespace and mesh wins), and
//! `AuthorizationPolicy` decides connections by (source identity or address, destination
//! workload, destination port): any matching DENY denies; otherwise, if any ALLOW policy selects
//! the workload, one of them must match; otherwise the connection is allowed. AUDIT policies only
//! mark what they match.
//!
//! [`Policies::compile`] validates every object (errors name the object and the field) and indexes
//! them by namespace; [`Policies::for_workload`] gathers what applies to one pod into a
//! [`PodPolicy`] (the agent does this once per pod and snapshot), so a decision only looks at the
//! policies that select that pod — not at every policy of the cluster — and exact principals are
//! hash lookups. [`PodPolicy::decide`] is the one pure function the data path, `meshless policy
//! explain` and the admin endpoint all call; its [`Decision`] says which policy and rule decided.

pub mod model;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use serde::Serialize;

pub use model::{Action, AuthorizationPolicy, MeshSettings, MtlsMode, PeerAuthentication};

pub use spiffe::SpiffeId;

/// Why a field of a policy object cannot be enforced: the field's path in the object
/// (`spec.rules[0].from[0].source.ipBlocks[0]`) and what is wrong with it. The CRD status, the
/// CLI and the agent's log all show this one value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
#[error("{}", join(&[&self.field, &self.reason]))]
pub struct FieldError {
    /// Path of the field within the object; empty for the object as a whole.
    pub field: String,
    pub reason: String,
}

impl FieldError {
    fn new(field: impl Into<String>, reason: impl Into<String>) -> FieldError {
        FieldError { field: field.into(), reason: reason.into() }
    }

    /// The same error, its path below `parent` (`parent` + `.field` or `[i]`).
    fn within(mut self, parent: &str) -> FieldError {
        self.field.insert_str(0, parent);
        self
    }
}

/// An object of a policy set that cannot be enforced: which object (`authorizationPolicies[3]
/// (shop/api-allow)`, or `mesh`) and the field.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
#[error("{}", join(&[&self.object, &self.error.to_string()]))]
pub struct Invalid {
    pub object: String,
    pub error: FieldError,
}

/// `a: b`, leaving out empty parts.
fn join(parts: &[&str]) -> String {
    parts.iter().filter(|p| !p.is_empty()).copied().collect::<Vec<_>>().join(": ")
}

/// IPv4-mapped IPv6 addresses name the IPv4 pod.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

/// The workload a pod's policy is gathered for: what selectors and modes look at.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    pub namespace: &'a str,
    pub labels: &'a BTreeMap<String, String>,
    /// The mode the `meshless.io/mode` label asks for, if any.
    pub label_mode: Option<LabelMode>,
}

/// The policy objects of one snapshot, as written (the state file's `mesh`,
/// `peerAuthentications` and `authorizationPolicies`).
#[derive(Debug, Clone, Default, PartialEq, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct PolicyInput {
    pub mesh: MeshSettings,
    pub peer_authentications: Vec<PeerAuthentication>,
    pub authorization_policies: Vec<AuthorizationPolicy>,
}

/// A pod's inbound mode, as the kernel and the agent apply it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Mode {
    /// Plaintext from outside the pod is refused (also while no agent runs).
    Strict,
    /// Plaintext is accepted, subject to authorization with an unauthenticated source.
    Permissive,
    /// Plaintext reaches the app untouched.
    Disable,
}

impl Mode {
    /// How much the mode protects: DISABLE < PERMISSIVE < STRICT.
    fn strength(self) -> u8 {
        match self {
            Mode::Disable => 0,
            Mode::Permissive => 1,
            Mode::Strict => 2,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Strict => "STRICT",
            Mode::Permissive => "PERMISSIVE",
            Mode::Disable => "DISABLE",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `namespace/name` of a policy object.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct PolicyRef {
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for PolicyRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// One rule of one policy: `rules[rule]` of `policy`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct RuleRef {
    pub policy: PolicyRef,
    pub rule: usize,
}

impl fmt::Display for RuleRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} rules[{}]", self.policy, self.rule)
    }
}

/// A mode set by the `meshless.io/mode` label, and where the label is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LabelMode {
    pub mode: Mode,
    /// `pod label` or `namespace label`.
    pub scope: &'static str,
}

/// Where a pod's mode comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ModeChoice {
    pub mode: Mode,
    /// The PeerAuthentication that set it; `None`: the default (PERMISSIVE).
    pub policy: Option<PolicyRef>,
    /// `workload`, `namespace`, `pod label`, `namespace label`, `mesh` or `default`.
    pub scope: &'static str,
}

impl fmt::Display for ModeChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.policy {
            Some(p) => {
                let scope = if self.scope == "workload" { "workload-specific" } else { self.scope };
                let wide = if self.scope == "workload" { "" } else { "-wide" };
                write!(f, "{} (PeerAuthentication {p}, {scope}{wide})", self.mode)
            }
            None if self.scope == "default" => write!(f, "{} (default: no PeerAuthentication applies)", self.mode),
            None => write!(
                f,
                "{} ({} meshless.io/mode; no PeerAuthentication of the workload or namespace)",
                self.mode, self.scope
            ),
        }
    }
}

/// Who is connecting, as far as the destination node knows it.
#[derive(Debug, Clone, Copy)]
pub enum Peer<'a> {
    /// Over the tunnel: the SPIFFE ID of the verified client certificate, and the address the
    /// tunnel connection came from (unknown when explaining offline for an identity alone).
    Authenticated { id: &'a SpiffeId, ip: Option<IpAddr> },
    /// Plaintext: only the source address is known.
    Plaintext { ip: IpAddr },
}

impl Peer<'_> {
    fn ip(&self) -> Option<IpAddr> {
        match self {
            Peer::Authenticated { ip, .. } => ip.map(canonical),
            Peer::Plaintext { ip } => Some(canonical(*ip)),
        }
    }
}

impl fmt::Display for Peer<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Peer::Authenticated { id, ip: Some(ip) } => write!(f, "{id} ({ip})"),
            Peer::Authenticated { id, ip: None } => write!(f, "{id}"),
            Peer::Plaintext { ip } => write!(f, "{ip} (plaintext, unauthenticated)"),
        }
    }
}

/// What decided a connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Reason {
    /// A DENY rule matched.
    Denied { by: RuleRef },
    /// An ALLOW rule matched.
    Allowed { by: RuleRef },
    /// ALLOW policies select the workload and none matched.
    NoAllowMatched { policies: Vec<PolicyRef> },
    /// No DENY matched and no ALLOW policy selects the workload.
    DefaultAllow,
    /// Plaintext to a STRICT pod.
    PlaintextRefused,
    /// Plaintext to a DISABLE pod: not captured, so not decided by the agent at all.
    NotCaptured,
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::Denied { by } => write!(f, "denied by DENY policy {by}"),
            Reason::Allowed { by } => write!(f, "allowed by ALLOW policy {by}"),
            Reason::NoAllowMatched { policies } => {
                let names: Vec<String> = policies.iter().map(ToString::to_string).collect();
                write!(f, "no ALLOW matched (ALLOW policies selecting the workload: {})", names.join(", "))
            }
            Reason::DefaultAllow => {
                f.write_str("default allow (no DENY matched, no ALLOW policy selects the workload)")
            }
            Reason::PlaintextRefused => f.write_str("plaintext refused: the workload is STRICT"),
            Reason::NotCaptured => f.write_str("not captured: the workload is DISABLE, plaintext reaches the app"),
        }
    }
}

/// The outcome of one decision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Decision {
    /// What the policies say (before dry-run).
    pub allowed: bool,
    pub reason: Reason,
    /// AUDIT rules that matched (logged, never change the outcome).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub audited: Vec<RuleRef>,
}

impl Decision {
    /// The policy that decided, if one did.
    pub fn rule(&self) -> Option<&RuleRef> {
        match &self.reason {
            Reason::Denied { by } | Reason::Allowed { by } => Some(by),
            _ => None,
        }
    }

    pub fn verdict(&self) -> &'static str {
        if self.allowed {
            "allow"
        } else {
            "deny"
        }
    }
}

/// All policy of one snapshot, validated and indexed.
#[derive(Debug, Default)]
pub struct Policies {
    pub settings: MeshSettings,
    /// PeerAuthentications by namespace, sorted by name.
    peer: HashMap<String, Vec<Arc<CompiledPeer>>>,
    /// AuthorizationPolicies by namespace, sorted by name.
    authz: HashMap<String, Vec<Arc<CompiledPolicy>>>,
    counts: (usize, usize),
}

#[derive(Debug)]
struct CompiledPeer {
    reference: PolicyRef,
    /// `None`: the whole namespace (or mesh, in the root namespace).
    selector: Option<BTreeMap<String, String>>,
    mode: MtlsMode,
}

#[derive(Debug)]
struct CompiledPolicy {
    reference: PolicyRef,
    action: Action,
    selector: Option<BTreeMap<String, String>>,
    rules: Vec<CompiledRule>,
}

/// OR of `from` (empty: any source) AND OR of `to` (empty: any port).
#[derive(Debug)]
struct CompiledRule {
    from: Vec<SourceMatch>,
    to: Vec<PortMatch>,
}

/// AND of the fields present.
#[derive(Debug, Default)]
struct SourceMatch {
    principals: Option<Names>,
    not_principals: Option<Names>,
    namespaces: Option<Names>,
    not_namespaces: Option<Names>,
    ip_blocks: Option<Vec<IpNet>>,
    not_ip_blocks: Option<Vec<IpNet>>,
}

#[derive(Debug, Default)]
struct PortMatch {
    ports: Option<Vec<u16>>,
    not_ports: Option<Vec<u16>>,
}

/// Istio's string match: exact, `prefix*`, `*suffix`, or `*` (any non-empty value).
#[derive(Debug, Default)]
struct Names {
    exact: HashSet<String>,
    prefixes: Vec<String>,
    suffixes: Vec<String>,
    any: bool,
}

impl Names {
    fn matches(&self, value: Option<&str>) -> bool {
        let Some(v) = value.filter(|v| !v.is_empty()) else { return false };
        self.any
            || self.exact.contains(v)
            || self.prefixes.iter().any(|p| v.starts_with(p.as_str()))
            || self.suffixes.iter().any(|s| v.ends_with(s.as_str()))
    }
}

/// What applies to one pod: its mode and the authorization policies that select it.
#[derive(Debug)]
pub struct PodPolicy {
    pub mode: ModeChoice,
    deny: Vec<Arc<CompiledPolicy>>,
    allow: Vec<Arc<CompiledPolicy>>,
    audit: Vec<Arc<CompiledPolicy>>,
}

impl PodPolicy {
    /// The pod's policy when nothing applies (PERMISSIVE, default allow).
    pub fn open() -> PodPolicy {
        PodPolicy {
            mode: ModeChoice { mode: Mode::Permissive, policy: None, scope: "default" },
            deny: Vec::new(),
            allow: Vec::new(),
            audit: Vec::new(),
        }
    }

    /// Decides a connection from `peer` to this pod's `port`.
    pub fn decide(&self, peer: &Peer<'_>, port: u16) -> Decision {
        if let Peer::Plaintext { .. } = peer {
            match self.mode.mode {
                Mode::Strict => return Decision { allowed: false, reason: Reason::PlaintextRefused, audited: vec![] },
                Mode::Disable => return Decision { allowed: true, reason: Reason::NotCaptured, audited: vec![] },
                Mode::Permissive => {}
            }
        }
        let facts = Facts::of(peer, port);
        let audited = self.audit.iter().filter_map(|p| p.first_match(&facts)).collect();
        if let Some(by) = self.deny.iter().find_map(|p| p.first_match(&facts)) {
            return Decision { allowed: false, reason: Reason::Denied { by }, audited };
        }
        if self.allow.is_empty() {
            return Decision { allowed: true, reason: Reason::DefaultAllow, audited };
        }
        match self.allow.iter().find_map(|p| p.first_match(&facts)) {
            Some(by) => Decision { allowed: true, reason: Reason::Allowed { by }, audited },
            None => Decision {
                allowed: false,
                reason: Reason::NoAllowMatched { policies: self.allow.iter().map(|p| p.reference.clone()).collect() },
                audited,
            },
        }
    }

    /// How many authorization policies select the pod.
    pub fn len(&self) -> usize {
        self.deny.len() + self.allow.len() + self.audit.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The attributes of a connection the rules look at, computed once per decision.
struct Facts<'a> {
    /// The SPIFFE ID without `spiffe://` (Istio's principal form).
    principal: Option<String>,
    namespace: Option<&'a str>,
    ip: Option<IpAddr>,
    port: u16,
}

impl<'a> Facts<'a> {
    fn of(peer: &'a Peer<'a>, port: u16) -> Facts<'a> {
        let (principal, namespace) = match peer {
            Peer::Authenticated { id, .. } => {
                (Some(format!("{}{}", id.trust_domain_name(), id.path())), namespace_of(id.path()))
            }
            Peer::Plaintext { .. } => (None, None),
        };
        Facts { principal, namespace, ip: peer.ip(), port }
    }
}

/// The namespace in a `/ns/<namespace>/sa/<sa>` SPIFFE ID path.
fn namespace_of(path: &str) -> Option<&str> {
    let mut parts = path.trim_start_matches('/').split('/');
    match (parts.next(), parts.next()) {
        (Some("ns"), Some(ns)) if !ns.is_empty() => Some(ns),
        _ => None,
    }
}

impl CompiledPolicy {
    fn first_match(&self, facts: &Facts<'_>) -> Option<RuleRef> {
        self.rules.iter().position(|r| r.matches(facts)).map(|rule| RuleRef { policy: self.reference.clone(), rule })
    }
}

impl CompiledRule {
    fn matches(&self, f: &Facts<'_>) -> bool {
        (self.from.is_empty() || self.from.iter().any(|s| s.matches(f)))
            && (self.to.is_empty() || self.to.iter().any(|p| p.matches(f.port)))
    }
}

impl SourceMatch {
    fn matches(&self, f: &Facts<'_>) -> bool {
        let in_blocks = |blocks: &Vec<IpNet>| f.ip.is_some_and(|ip| blocks.iter().any(|b| b.contains(&ip)));
        let principal = f.principal.as_deref();
        self.principals.as_ref().is_none_or(|n| n.matches(principal))
            && self.not_principals.as_ref().is_none_or(|n| !n.matches(principal))
            && self.namespaces.as_ref().is_none_or(|n| n.matches(f.namespace))
            && self.not_namespaces.as_ref().is_none_or(|n| !n.matches(f.namespace))
            && self.ip_blocks.as_ref().is_none_or(in_blocks)
            && self.not_ip_blocks.as_ref().is_none_or(|b| !in_blocks(b))
    }
}

impl PortMatch {
    fn matches(&self, port: u16) -> bool {
        self.ports.as_ref().is_none_or(|p| p.contains(&port))
            && self.not_ports.as_ref().is_none_or(|p| !p.contains(&port))
    }
}

fn selects(selector: &Option<BTreeMap<String, String>>, labels: &BTreeMap<String, String>) -> bool {
    selector.as_ref().is_none_or(|s| s.iter().all(|(k, v)| labels.get(k) == Some(v)))
}

impl Policies {
    /// Validates and indexes `input`. Any invalid object fails the whole set (a bad update is
    /// never half-applied); the error names the object and the field.
    pub fn compile(input: &PolicyInput) -> Result<Policies, Invalid> {
        let settings = input.mesh.clone();
        check_name(&settings.root_namespace)
            .map_err(|e| Invalid { object: String::new(), error: e.within("mesh.rootNamespace") })?;
        let mut peer: HashMap<String, Vec<Arc<CompiledPeer>>> = HashMap::new();
        let mut seen = HashSet::new();
        for (i, pa) in input.peer_authentications.iter().enumerate() {
            let object = format!("peerAuthentications[{i}] ({}/{})", pa.metadata.namespace, pa.metadata.name);
            let c = compile_peer(pa).map_err(|error| Invalid { object: object.clone(), error })?;
            if !seen.insert(c.reference.clone()) {
                return Err(Invalid { object, error: FieldError::new("", "defined twice") });
            }
            peer.entry(c.reference.namespace.clone()).or_default().push(Arc::new(c));
        }
        let mut authz: HashMap<String, Vec<Arc<CompiledPolicy>>> = HashMap::new();
        let mut seen = HashSet::new();
        for (i, ap) in input.authorization_policies.iter().enumerate() {
            let object = format!("authorizationPolicies[{i}] ({}/{})", ap.metadata.namespace, ap.metadata.name);
            let c = compile_authz(ap).map_err(|error| Invalid { object: object.clone(), error })?;
            if !seen.insert(c.reference.clone()) {
                return Err(Invalid { object, error: FieldError::new("", "defined twice") });
            }
            authz.entry(c.reference.namespace.clone()).or_default().push(Arc::new(c));
        }
        for list in peer.values_mut() {
            list.sort_by(|a, b| a.reference.cmp(&b.reference));
        }
        for list in authz.values_mut() {
            list.sort_by(|a, b| a.reference.cmp(&b.reference));
        }
        let counts = (input.peer_authentications.len(), input.authorization_policies.len());
        Ok(Policies { settings, peer, authz, counts })
    }

    /// (PeerAuthentications, AuthorizationPolicies).
    pub fn counts(&self) -> (usize, usize) {
        self.counts
    }

    /// Gathers what applies to `w`: its mode (workload, then namespace, then mesh, then the
    /// PERMISSIVE default; UNSET inherits) and the authorization policies selecting it (those of
    /// its namespace, and those of the root namespace, which apply mesh-wide).
    pub fn for_workload(&self, w: &Target<'_>) -> PodPolicy {
        let ns = w.namespace;
        let root = self.settings.root_namespace.as_str();
        let set = |p: &&Arc<CompiledPeer>| p.mode != MtlsMode::Unset;
        let local = self.peer.get(ns).map(Vec::as_slice).unwrap_or_default();
        let workload = local.iter().filter(set).find(|p| p.selector.is_some() && selects(&p.selector, w.labels));
        let namespace = local.iter().filter(set).find(|p| p.selector.is_none());
        let mesh = self.peer.get(root).and_then(|l| l.iter().filter(set).find(|p| p.selector.is_none()));
        // The mode label opts a workload in; it may raise the mesh-wide mode an administrator set
        // (PERMISSIVE → STRICT), never lower it (STRICT → PERMISSIVE or DISABLE).
        let mode = match (workload, namespace, w.label_mode, mesh) {
            (Some(p), _, _, _) => choice(p, "workload"),
            (None, Some(p), _, _) if ns != root => choice(p, "namespace"),
            (None, Some(p), _, _) => choice(p, "mesh"),
            (None, None, Some(l), Some(p)) if l.mode.strength() < choice(p, "mesh").mode.strength() => {
                choice(p, "mesh")
            }
            (None, None, Some(l), _) => ModeChoice { mode: l.mode, policy: None, scope: l.scope },
            (None, None, None, Some(p)) => choice(p, "mesh"),
            (None, None, None, None) => ModeChoice { mode: Mode::Permissive, policy: None, scope: "default" },
        };
        let mut pod = PodPolicy { mode, deny: Vec::new(), allow: Vec::new(), audit: Vec::new() };
        let namespaces: &[&str] = if ns == root { &[ns] } else { &[root, ns] };
        for n in namespaces {
            for p in self.authz.get(*n).into_iter().flatten() {
                if !selects(&p.selector, w.labels) {
                    continue;
                }
                match p.action {
                    Action::Allow => pod.allow.push(p.clone()),
                    Action::Deny => pod.deny.push(p.clone()),
                    Action::Audit => pod.audit.push(p.clone()),
                    Action::Custom => {} // refused by validation
                }
            }
        }
        pod
    }
}

fn choice(p: &CompiledPeer, scope: &'static str) -> ModeChoice {
    let mode = match p.mode {
        MtlsMode::Strict => Mode::Strict,
        MtlsMode::Disable => Mode::Disable,
        MtlsMode::Permissive | MtlsMode::Unset => Mode::Permissive,
    };
    ModeChoice { mode, policy: Some(p.reference.clone()), scope }
}

/// A Kubernetes object name or namespace: DNS labels, 1–253 characters.
fn check_name(s: &str) -> Result<(), FieldError> {
    let ok = !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        });
    if ok {
        Ok(())
    } else {
        Err(FieldError::new(
            "",
            format!("{s:?} is not a valid Kubernetes name (lowercase letters, digits, '-' and '.')"),
        ))
    }
}

/// The two kinds of policy object, as one: their kind, metadata and validation. The state file,
/// the Kubernetes source, the CRD status and the CLI go through this trait rather than a copy of
/// their code per kind.
pub trait PolicyObject {
    /// `PeerAuthentication` or `AuthorizationPolicy`.
    const KIND: &'static str;
    fn metadata(&self) -> &model::ObjectMeta;
    /// Validates the object on its own (what a Kubernetes object's status reports); the error
    /// names the field.
    fn check(&self) -> Result<(), FieldError>;
    /// `namespace/name`.
    fn reference(&self) -> PolicyRef {
        PolicyRef { namespace: self.metadata().namespace.clone(), name: self.metadata().name.clone() }
    }
}

impl PolicyObject for PeerAuthentication {
    const KIND: &'static str = "PeerAuthentication";
    fn metadata(&self) -> &model::ObjectMeta {
        &self.metadata
    }
    fn check(&self) -> Result<(), FieldError> {
        compile_peer(self).map(drop)
    }
}

impl PolicyObject for AuthorizationPolicy {
    const KIND: &'static str = "AuthorizationPolicy";
    fn metadata(&self) -> &model::ObjectMeta {
        &self.metadata
    }
    fn check(&self) -> Result<(), FieldError> {
        compile_authz(self).map(drop)
    }
}

fn check_object(
    kind: &str,
    api_version: &Option<String>,
    k: &Option<String>,
    meta: &model::ObjectMeta,
) -> Result<PolicyRef, FieldError> {
    if let Some(v) = api_version {
        if !model::API_VERSIONS.contains(&v.as_str()) {
            return Err(FieldError::new(
                "apiVersion",
                format!("{v:?} is not one of {}", model::API_VERSIONS.join(", ")),
            ));
        }
    }
    if let Some(k) = k {
        if k != kind {
            return Err(FieldError::new("kind", format!("{k:?} where {kind} belongs")));
        }
    }
    check_name(&meta.name).map_err(|e| e.within("metadata.name"))?;
    check_name(&meta.namespace).map_err(|e| e.within("metadata.namespace"))?;
    Ok(PolicyRef { namespace: meta.namespace.clone(), name: meta.name.clone() })
}

fn selector(s: &Option<model::WorkloadSelector>) -> Result<Option<BTreeMap<String, String>>, FieldError> {
    let Some(s) = s else { return Ok(None) };
    if s.match_labels.keys().any(String::is_empty) {
        return Err(FieldError::new("spec.selector.matchLabels", "a label key is empty"));
    }
    // An empty selector selects every workload, as no selector does.
    Ok(Some(s.match_labels.clone()).filter(|l| !l.is_empty()))
}

fn compile_peer(pa: &PeerAuthentication) -> Result<CompiledPeer, FieldError> {
    let reference = check_object(PeerAuthentication::KIND, &pa.api_version, &pa.kind, &pa.metadata)?;
    if pa.spec.port_level_mtls.is_some() {
        return Err(FieldError::new(
            "spec.portLevelMtls",
            "per-port modes are not supported (a pod has one mode, which the kernel enforces even while no \
             agent runs); use a workload selector instead",
        ));
    }
    Ok(CompiledPeer {
        reference,
        selector: selector(&pa.spec.selector)?,
        mode: pa.spec.mtls.as_ref().map(|m| m.mode).unwrap_or_default(),
    })
}

fn compile_authz(ap: &AuthorizationPolicy) -> Result<CompiledPolicy, FieldError> {
    let reference = check_object(AuthorizationPolicy::KIND, &ap.api_version, &ap.kind, &ap.metadata)?;
    let spec = &ap.spec;
    for (field, v) in [("targetRef", &spec.target_ref), ("targetRefs", &spec.target_refs), ("provider", &spec.provider)]
    {
        if v.is_some() {
            return Err(FieldError::new(
                format!("spec.{field}"),
                "not supported (meshless policies select workloads by labels)",
            ));
        }
    }
    if spec.action == Action::Custom {
        return Err(FieldError::new(
            "spec.action",
            "CUSTOM (external authorization) is not supported; use ALLOW, DENY or AUDIT",
        ));
    }
    let mut rules = Vec::with_capacity(spec.rules.len());
    for (r, rule) in spec.rules.iter().enumerate() {
        let at = format!("spec.rules[{r}]");
        if rule.when.is_some() {
            return Err(FieldError::new(
                format!("{at}.when"),
                "conditions are HTTP (L7) attributes; meshless authorizes connections (L4)",
            ));
        }
        let mut from = Vec::with_capacity(rule.from.len());
        for (i, f) in rule.from.iter().enumerate() {
            from.push(compile_source(&f.source).map_err(|e| e.within(&format!("{at}.from[{i}].source")))?);
        }
        let mut to = Vec::with_capacity(rule.to.len());
        for (i, t) in rule.to.iter().enumerate() {
            to.push(compile_operation(&t.operation).map_err(|e| e.within(&format!("{at}.to[{i}].operation")))?);
        }
        rules.push(CompiledRule { from, to });
    }
    Ok(CompiledPolicy { reference, action: spec.action, selector: selector(&spec.selector)?, rules })
}

/// Error paths start with `.field` (the caller puts its own path in front).
fn compile_source(s: &model::Source) -> Result<SourceMatch, FieldError> {
    if s.request_principals.is_some() {
        return Err(FieldError::new(".requestPrincipals", model::L7));
    }
    if s.not_request_principals.is_some() {
        return Err(FieldError::new(".notRequestPrincipals", model::L7));
    }
    let names = |field: &str, v: &Option<Vec<String>>, principal: bool| -> Result<Option<Names>, FieldError> {
        v.as_ref().map(|list| compile_names(list, principal).map_err(|e| e.within(&format!(".{field}")))).transpose()
    };
    let blocks = |field: &str, v: &Option<Vec<String>>| -> Result<Option<Vec<IpNet>>, FieldError> {
        v.as_ref().map(|list| compile_blocks(list).map_err(|e| e.within(&format!(".{field}")))).transpose()
    };
    let merge = |a: Option<Vec<IpNet>>, b: Option<Vec<IpNet>>| match (a, b) {
        (Some(mut a), Some(b)) => Some({
            a.extend(b);
            a
        }),
        (a, b) => a.or(b),
    };
    let m = SourceMatch {
        principals: names("principals", &s.principals, true)?,
        not_principals: names("notPrincipals", &s.not_principals, true)?,
        namespaces: names("namespaces", &s.namespaces, false)?,
        not_namespaces: names("notNamespaces", &s.not_namespaces, false)?,
        ip_blocks: merge(blocks("ipBlocks", &s.ip_blocks)?, blocks("remoteIpBlocks", &s.remote_ip_blocks)?),
        not_ip_blocks: merge(
            blocks("notIpBlocks", &s.not_ip_blocks)?,
            blocks("notRemoteIpBlocks", &s.not_remote_ip_blocks)?,
        ),
    };
    let empty = m.principals.is_none()
        && m.not_principals.is_none()
        && m.namespaces.is_none()
        && m.not_namespaces.is_none()
        && m.ip_blocks.is_none()
        && m.not_ip_blocks.is_none();
    if empty {
        return Err(FieldError::new("", "must not be empty (leave `from` out to match any source)"));
    }
    Ok(m)
}

fn compile_names(list: &[String], principal: bool) -> Result<Names, FieldError> {
    if list.is_empty() {
        return Err(FieldError::new("", "must not be an empty list"));
    }
    let mut n = Names::default();
    for (i, raw) in list.iter().enumerate() {
        // Principals may be written as SPIFFE IDs or in Istio's form without the scheme.
        let v = if principal { raw.strip_prefix("spiffe://").unwrap_or(raw) } else { raw.as_str() };
        let stars = v.matches('*').count();
        match (v, stars) {
            ("", _) => return Err(FieldError::new(format!("[{i}]"), "must not be empty")),
            ("*", 1) => n.any = true,
            (v, 0) => {
                n.exact.insert(v.to_string());
            }
            (v, 1) if v.ends_with('*') => n.prefixes.push(v.trim_end_matches('*').to_string()),
            (v, 1) if v.starts_with('*') => n.suffixes.push(v.trim_start_matches('*').to_string()),
            _ => {
                return Err(FieldError::new(
                    format!("[{i}]"),
                    format!("{raw:?}: '*' is allowed only alone, at the start or at the end"),
                ))
            }
        }
    }
    Ok(n)
}

fn compile_blocks(list: &[String]) -> Result<Vec<IpNet>, FieldError> {
    if list.is_empty() {
        return Err(FieldError::new("", "must not be an empty list"));
    }
    list.iter()
        .enumerate()
        .map(|(i, s)| {
            let net = s.parse::<IpNet>().map(|n| n.trunc()).or_else(|_| s.parse::<IpAddr>().map(IpNet::from));
            match net {
                // A v4-mapped block names IPv4 sources.
                Ok(IpNet::V6(v6)) if v6.prefix_len() >= 96 => match v6.addr().to_ipv4_mapped() {
                    Some(v4) => ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96)
                        .map(IpNet::V4)
                        .map_err(|_| FieldError::new(format!("[{i}]"), "prefix too long")),
                    None => Ok(IpNet::V6(v6)),
                },
                Ok(n) => Ok(n),
                Err(_) => Err(FieldError::new(format!("[{i}]"), format!("{s:?} is not an IP address or CIDR block"))),
            }
        })
        .collect()
}

fn compile_operation(o: &model::Operation) -> Result<PortMatch, FieldError> {
    for (field, v) in [
        ("hosts", &o.hosts),
        ("notHosts", &o.not_hosts),
        ("methods", &o.methods),
        ("notMethods", &o.not_methods),
        ("paths", &o.paths),
        ("notPaths", &o.not_paths),
    ] {
        if v.is_some() {
            return Err(FieldError::new(format!(".{field}"), model::L7));
        }
    }
    let ports = |field: &str, v: &Option<Vec<model::PortValue>>| -> Result<Option<Vec<u16>>, FieldError> {
        let Some(list) = v else { return Ok(None) };
        if list.is_empty() {
            return Err(FieldError::new(format!(".{field}"), "must not be an empty list"));
        }
        list.iter()
            .enumerate()
            .map(|(i, p)| {
                let n = match p {
                    model::PortValue::Number(n) => Some(*n),
                    model::PortValue::Text(t) => t.parse::<i64>().ok(),
                };
                n.and_then(|n| u16::try_from(n).ok())
                    .filter(|n| *n != 0)
                    .ok_or_else(|| FieldError::new(format!(".{field}[{i}]"), format!("{p:?} is not a port (1-65535)")))
            })
            .collect::<Result<Vec<u16>, FieldError>>()
            .map(Some)
    };
    let m = PortMatch { ports: ports("ports", &o.ports)?, not_ports: ports("notPorts", &o.not_ports)? };
    if m.ports.is_none() && m.not_ports.is_none() {
        return Err(FieldError::new("", "must not be empty (leave `to` out to match any port)"));
    }
    Ok(m)
}

#[cfg(test)]
mod tests;
