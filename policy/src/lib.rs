//! Enforcement policy: which inbound connections a pod accepts, and why.
//!
//! Two kinds of objects, with Istio's meaning ([`model`]): `PeerAuthentication` sets a pod's mTLS
//! mode (STRICT, PERMISSIVE, DISABLE; the most specific of workload, namespace and mesh wins), and
//! `AuthorizationPolicy` decides connections by (source identity or address, destination
//! workload, destination port): any matching DENY denies; otherwise, if any ALLOW policy selects
//! the workload, one of them must match; otherwise the connection is allowed. AUDIT policies only
//! mark what they match.
//!
//! [`Policies::compile`] translates every object (one translation for every source: what it
//! cannot evaluate never widens access, see [`Enforcement`]) and indexes them by namespace;
//! [`Policies::for_workload`] gathers what applies to one pod into a [`PodPolicy`] (the agent
//! does this once per pod and snapshot), so a decision only looks at the policies that select
//! that pod — not at every policy of the cluster — and exact principals are hash lookups.
//! [`PodPolicy::decide`] is the one pure function the data path, `meshless policy explain` and
//! the admin endpoint all call; its [`Decision`] says which policy and rule decided, and what of
//! them is not enforced as written.

pub mod model;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
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
    /// Objects whose spec could not be parsed at all (from the API server; a state file that
    /// does not parse is refused as a whole instead).
    #[serde(skip)]
    pub unreadable: Vec<Unreadable>,
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
    /// Plaintext to a DISABLE pod no ALLOW or DENY policy selects: not captured, so not decided
    /// by the agent at all.
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
    /// Policies that took part and are not enforced as written: what was left out, or what
    /// stands in for an object that cannot be read.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub caveats: Vec<String>,
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

/// How much of one policy object meshless enforces: the one translation every source (the
/// Kubernetes resources, the state file, the offline CLI) goes through. Nothing meshless cannot
/// read or evaluate ever widens access: what it cannot evaluate in a DENY is treated as matching,
/// in an ALLOW as matching nothing, and an object it cannot read at all is replaced by a closed
/// stand-in until it is fixed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state")]
pub enum Enforcement {
    /// Every field, with Istio's meaning.
    Enforced,
    /// Accepted, but the fields named are not evaluated; each says how it is treated instead.
    PartiallyEnforced { left_out: Vec<FieldError> },
    /// Not readable (the error names the field); `effect` is what is enforced in its place.
    FailedClosed { error: FieldError, effect: String },
}

impl Enforcement {
    /// `Enforced`, `PartiallyEnforced` or `FailedClosed` (the status reason, the metric label).
    pub fn state(&self) -> &'static str {
        match self {
            Enforcement::Enforced => "Enforced",
            Enforcement::PartiallyEnforced { .. } => "PartiallyEnforced",
            Enforcement::FailedClosed { .. } => "FailedClosed",
        }
    }

    /// One line for the status message, the log and decisions: what was left out or refused.
    pub fn summary(&self) -> String {
        match self {
            Enforcement::Enforced => "enforced".into(),
            Enforcement::PartiallyEnforced { left_out } => {
                let fields: Vec<String> = left_out.iter().map(ToString::to_string).collect();
                format!("partially enforced; left out: {}", fields.join("; "))
            }
            Enforcement::FailedClosed { error, effect } => format!("cannot be read ({error}); fails closed: {effect}"),
        }
    }
}

/// What became of one object of a policy set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ObjectReport {
    /// `PeerAuthentication` or `AuthorizationPolicy`.
    pub kind: &'static str,
    pub policy: PolicyRef,
    #[serde(flatten)]
    pub enforcement: Enforcement,
}

/// A policy object that could not be parsed into its kind's type at all (a resource from the API
/// whose `spec` has the wrong shape): what could be read of it, for its closed stand-in.
#[derive(Debug, Clone, PartialEq)]
pub struct Unreadable {
    /// `PeerAuthentication` or `AuthorizationPolicy`.
    pub kind: &'static str,
    pub metadata: model::ObjectMeta,
    /// `spec.action`, when it is one meshless knows.
    pub action: Option<Action>,
    /// `spec.selector.matchLabels` when readable; `None`: every workload of the namespace (of the
    /// mesh, in the root namespace).
    pub selector: Option<BTreeMap<String, String>>,
    pub error: FieldError,
}

/// Reads a policy object of kind `T` from its metadata and its `spec` as a generic value (what
/// the API server sent). A spec that does not parse is returned as [`Unreadable`], with the
/// path of the field that failed and whatever of its action and selector could be read.
pub fn read_object<T: PolicyObject>(
    metadata: model::ObjectMeta,
    spec: serde_json::Value,
) -> Result<T, Box<Unreadable>> {
    let action = spec.get("action").and_then(|a| serde_json::from_value::<Action>(a.clone()).ok());
    let selector = match spec.get("selector") {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(s) => serde_json::from_value::<model::WorkloadSelector>(s.clone())
            .map(|s| Some(s.match_labels).filter(|l| !l.is_empty())),
    };
    match serde_path_to_error::deserialize::<_, T::Spec>(spec) {
        Ok(spec) => Ok(T::assemble(metadata, spec)),
        Err(e) => {
            let path = e.path().to_string();
            let field = if path == "." { "spec".to_string() } else { format!("spec.{path}") };
            let error = FieldError::new(field, e.into_inner().to_string());
            Err(Box::new(Unreadable { kind: T::KIND, metadata, action, selector: selector.unwrap_or(None), error }))
        }
    }
}

/// All policy of one snapshot, translated and indexed.
#[derive(Debug, Default)]
pub struct Policies {
    pub settings: MeshSettings,
    /// PeerAuthentications by namespace, sorted by name.
    peer: HashMap<String, Vec<Arc<CompiledPeer>>>,
    /// AuthorizationPolicies by namespace, sorted by name.
    authz: HashMap<String, Vec<Arc<CompiledPolicy>>>,
    counts: (usize, usize),
    /// What became of each object, in input order.
    objects: Vec<ObjectReport>,
}

#[derive(Debug)]
struct CompiledPeer {
    reference: PolicyRef,
    /// `None`: the whole namespace (or mesh, in the root namespace).
    selector: Option<BTreeMap<String, String>>,
    mode: MtlsMode,
    /// The strongest mode of a `portLevelMtls` that cannot apply per port (no workload selector,
    /// as Istio requires, or more ports than the kernel keeps): the selected workloads get at
    /// least this one on every port.
    floor: Option<Mode>,
    /// `portLevelMtls` applied per port (UNSET ports left out: they keep the workload's mode).
    ports: BTreeMap<u16, Mode>,
}

/// Per-port modes one workload may have (what the kernel keeps per pod).
pub const MAX_PORT_MODES: usize = 8;

#[derive(Debug)]
struct CompiledPolicy {
    reference: PolicyRef,
    action: Action,
    selector: Option<BTreeMap<String, String>>,
    rules: Vec<CompiledRule>,
    /// For decisions: why the policy is not enforced as written (`None`: it is).
    caveat: Option<String>,
}

/// OR of `from` (empty: any source) AND OR of `to` (empty: any port) AND every condition.
#[derive(Debug, Default)]
struct CompiledRule {
    from: Vec<SourceMatch>,
    to: Vec<PortMatch>,
    when: Vec<Condition>,
    /// An ALLOW rule with a condition meshless cannot evaluate: matches nothing.
    never: bool,
}

/// AND of the fields present.
#[derive(Debug, Default)]
struct SourceMatch {
    principals: Option<Names>,
    not_principals: Option<Names>,
    namespaces: Option<Names>,
    not_namespaces: Option<Names>,
    service_accounts: Option<HashSet<(String, String)>>,
    not_service_accounts: Option<HashSet<(String, String)>>,
    ip_blocks: Option<Vec<IpNet>>,
    not_ip_blocks: Option<Vec<IpNet>>,
    /// An ALLOW clause with an attribute meshless cannot evaluate: matches nothing.
    never: bool,
}

#[derive(Debug, Default)]
struct PortMatch {
    ports: Option<Vec<u16>>,
    not_ports: Option<Vec<u16>>,
    never: bool,
}

/// A `when` condition on an L4 attribute.
#[derive(Debug)]
struct Condition {
    attribute: Attribute,
    values: Option<Values>,
    not_values: Option<Values>,
}

#[derive(Debug, Clone, Copy)]
enum Attribute {
    SourceIp,
    SourceNamespace,
    SourcePrincipal,
    DestinationIp,
    DestinationPort,
}

#[derive(Debug)]
enum Values {
    Blocks(Vec<IpNet>),
    Names(Names),
    Ports(Vec<u16>),
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
/// One authorization policy selecting a pod, as the dashboard lists it.
#[derive(Debug, Clone, Serialize)]
pub struct PolicySummary {
    pub policy: PolicyRef,
    /// `DENY`, `ALLOW` or `AUDIT`.
    pub action: &'static str,
    /// How many rules it has (`rules[0]` … in decisions).
    pub rules: usize,
    /// Why it is not enforced as written (`None`: it is).
    pub caveat: Option<String>,
}

#[derive(Debug)]
pub struct PodPolicy {
    pub mode: ModeChoice,
    /// Ports whose mode is their own (`portLevelMtls` of the workload's PeerAuthentication).
    pub port_modes: BTreeMap<u16, Mode>,
    deny: Vec<Arc<CompiledPolicy>>,
    allow: Vec<Arc<CompiledPolicy>>,
    audit: Vec<Arc<CompiledPolicy>>,
}

impl PodPolicy {
    /// The pod's policy when nothing applies (PERMISSIVE, default allow).
    pub fn open() -> PodPolicy {
        PodPolicy {
            mode: ModeChoice { mode: Mode::Permissive, policy: None, scope: "default" },
            port_modes: BTreeMap::new(),
            deny: Vec::new(),
            allow: Vec::new(),
            audit: Vec::new(),
        }
    }

    /// Decides a connection from `peer` to `to` (this pod's address and port).
    pub fn decide(&self, peer: &Peer<'_>, to: SocketAddr) -> Decision {
        let decision = |allowed, reason, audited, caveats| Decision { allowed, reason, audited, caveats };
        if let Peer::Plaintext { .. } = peer {
            match self.mode_for(to.port()) {
                Mode::Strict => return decision(false, Reason::PlaintextRefused, vec![], vec![]),
                Mode::Disable if !self.authorizes() => return decision(true, Reason::NotCaptured, vec![], vec![]),
                // DISABLE with ALLOW or DENY policies: plaintext is decided as in PERMISSIVE.
                Mode::Disable | Mode::Permissive => {}
            }
        }
        let facts = Facts::of(peer, to);
        let audited = self.audit.iter().filter_map(|p| p.first_match(&facts)).collect();
        if let Some((p, by)) = self.deny.iter().find_map(|p| p.first_match(&facts).map(|by| (p, by))) {
            return decision(false, Reason::Denied { by }, audited, p.caveats());
        }
        if self.allow.is_empty() {
            return decision(true, Reason::DefaultAllow, audited, vec![]);
        }
        match self.allow.iter().find_map(|p| p.first_match(&facts).map(|by| (p, by))) {
            Some((p, by)) => decision(true, Reason::Allowed { by }, audited, p.caveats()),
            None => decision(
                false,
                Reason::NoAllowMatched { policies: self.allow.iter().map(|p| p.reference.clone()).collect() },
                audited,
                self.allow.iter().flat_map(|p| p.caveats()).collect(),
            ),
        }
    }

    /// Whether ALLOW or DENY policies select the pod (AUDIT ones only mark).
    fn authorizes(&self) -> bool {
        !(self.deny.is_empty() && self.allow.is_empty())
    }

    /// What the kernel applies to the pod's inbound plaintext: its mode, except that a DISABLE
    /// pod that ALLOW or DENY policies select has its plaintext steered to the agent as a
    /// PERMISSIVE one's, so that those policies decide it (Istio enforces authorization in
    /// DISABLE too); without such policies DISABLE plaintext reaches the app untouched.
    pub fn kernel_mode(&self) -> Mode {
        self.for_kernel(self.mode.mode)
    }

    /// The mode of connections to `port`: its own (`portLevelMtls`), else the workload's.
    pub fn mode_for(&self, port: u16) -> Mode {
        self.port_modes.get(&port).copied().unwrap_or(self.mode.mode)
    }

    /// The ports the kernel treats apart from [`PodPolicy::kernel_mode`], with their modes (as
    /// `kernel_mode` turns them); at most [`MAX_PORT_MODES`].
    pub fn kernel_port_modes(&self) -> Vec<(u16, Mode)> {
        let default = self.kernel_mode();
        self.port_modes
            .iter()
            .map(|(port, mode)| (*port, self.for_kernel(*mode)))
            .filter(|(_, m)| *m != default)
            .take(MAX_PORT_MODES)
            .collect()
    }

    fn for_kernel(&self, mode: Mode) -> Mode {
        match mode {
            Mode::Disable if self.authorizes() => Mode::Permissive,
            m => m,
        }
    }

    /// The authorization policies that select the pod: DENY, then ALLOW, then AUDIT, as they are
    /// evaluated.
    pub fn policies(&self) -> Vec<PolicySummary> {
        let each = |ps: &[Arc<CompiledPolicy>], action: &'static str| {
            ps.iter()
                .map(|p| PolicySummary {
                    policy: p.reference.clone(),
                    action,
                    rules: p.rules.len(),
                    caveat: p.caveat.clone(),
                })
                .collect::<Vec<_>>()
        };
        let mut out = each(&self.deny, "DENY");
        out.extend(each(&self.allow, "ALLOW"));
        out.extend(each(&self.audit, "AUDIT"));
        out
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
    /// (namespace, service account) of a `/ns/<ns>/sa/<sa>` SPIFFE ID.
    service_account: Option<(&'a str, &'a str)>,
    ip: Option<IpAddr>,
    destination: IpAddr,
    port: u16,
}

impl<'a> Facts<'a> {
    fn of(peer: &'a Peer<'a>, to: SocketAddr) -> Facts<'a> {
        let (principal, namespace, service_account) = match peer {
            Peer::Authenticated { id, .. } => (
                Some(format!("{}{}", id.trust_domain_name(), id.path())),
                namespace_of(id.path()),
                service_account_of(id.path()),
            ),
            Peer::Plaintext { .. } => (None, None, None),
        };
        Facts { principal, namespace, service_account, ip: peer.ip(), destination: canonical(to.ip()), port: to.port() }
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

/// (namespace, service account) of exactly `/ns/<namespace>/sa/<sa>`.
fn service_account_of(path: &str) -> Option<(&str, &str)> {
    let mut parts = path.strip_prefix('/')?.split('/');
    match (parts.next(), parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some("ns"), Some(ns), Some("sa"), Some(sa), None) if !ns.is_empty() && !sa.is_empty() => Some((ns, sa)),
        _ => None,
    }
}

impl CompiledPolicy {
    fn first_match(&self, facts: &Facts<'_>) -> Option<RuleRef> {
        self.rules.iter().position(|r| r.matches(facts)).map(|rule| RuleRef { policy: self.reference.clone(), rule })
    }

    fn caveats(&self) -> Vec<String> {
        self.caveat.iter().map(|c| format!("{}: {c}", self.reference)).collect()
    }
}

impl CompiledRule {
    /// The rule that matches every connection (a failed-closed DENY's).
    fn any() -> CompiledRule {
        CompiledRule::default()
    }

    fn matches(&self, f: &Facts<'_>) -> bool {
        !self.never
            && (self.from.is_empty() || self.from.iter().any(|s| s.matches(f)))
            && (self.to.is_empty() || self.to.iter().any(|p| p.matches(f.port)))
            && self.when.iter().all(|c| c.holds(f))
    }
}

impl SourceMatch {
    fn matches(&self, f: &Facts<'_>) -> bool {
        let in_blocks = |blocks: &Vec<IpNet>| f.ip.is_some_and(|ip| blocks.iter().any(|b| b.contains(&ip)));
        let principal = f.principal.as_deref();
        let account = |set: &HashSet<(String, String)>| {
            f.service_account.is_some_and(|(ns, sa)| set.contains(&(ns.to_string(), sa.to_string())))
        };
        !self.never
            && self.principals.as_ref().is_none_or(|n| n.matches(principal))
            && self.not_principals.as_ref().is_none_or(|n| !n.matches(principal))
            && self.namespaces.as_ref().is_none_or(|n| n.matches(f.namespace))
            && self.not_namespaces.as_ref().is_none_or(|n| !n.matches(f.namespace))
            && self.service_accounts.as_ref().is_none_or(account)
            && self.not_service_accounts.as_ref().is_none_or(|s| !account(s))
            && self.ip_blocks.as_ref().is_none_or(in_blocks)
            && self.not_ip_blocks.as_ref().is_none_or(|b| !in_blocks(b))
    }
}

impl PortMatch {
    fn matches(&self, port: u16) -> bool {
        !self.never
            && self.ports.as_ref().is_none_or(|p| p.contains(&port))
            && self.not_ports.as_ref().is_none_or(|p| !p.contains(&port))
    }
}

impl Condition {
    fn holds(&self, f: &Facts<'_>) -> bool {
        let has = |v: &Values| match (self.attribute, v) {
            (Attribute::SourceIp, Values::Blocks(b)) => f.ip.is_some_and(|ip| b.iter().any(|n| n.contains(&ip))),
            (Attribute::DestinationIp, Values::Blocks(b)) => b.iter().any(|n| n.contains(&f.destination)),
            (Attribute::SourceNamespace, Values::Names(n)) => n.matches(f.namespace),
            (Attribute::SourcePrincipal, Values::Names(n)) => n.matches(f.principal.as_deref()),
            (Attribute::DestinationPort, Values::Ports(p)) => p.contains(&f.port),
            // Compiled together; never reached.
            _ => false,
        };
        self.values.as_ref().is_none_or(has) && self.not_values.as_ref().is_none_or(|v| !has(v))
    }
}

fn selects(selector: &Option<BTreeMap<String, String>>, labels: &BTreeMap<String, String>) -> bool {
    selector.as_ref().is_none_or(|s| s.iter().all(|(k, v)| labels.get(k) == Some(v)))
}

impl Policies {
    /// Translates and indexes `input`, refusing the set as a whole if any object cannot be read
    /// (or is defined twice): the state file's rule, under which a bad file never replaces a good
    /// one. Objects that are only partially enforceable are accepted, with the same meaning as in
    /// Kubernetes ([`Policies::objects`] says what was left out).
    pub fn compile(input: &PolicyInput) -> Result<Policies, Invalid> {
        let (policies, mut problems) = Policies::translate(input);
        match problems.is_empty() {
            true => Ok(policies),
            false => Err(problems.swap_remove(0)),
        }
    }

    /// Translates and indexes `input`, never refusing it: an object that cannot be read is
    /// replaced by its closed stand-in (a DENY that denies everything it could select, an ALLOW
    /// that allows nothing, a STRICT PeerAuthentication), so one bad object cannot remove the
    /// others, and cannot widen access either. For sources of many independent objects (the
    /// Kubernetes resources).
    pub fn compile_failing_closed(input: &PolicyInput) -> Policies {
        Policies::translate(input).0
    }

    fn translate(input: &PolicyInput) -> (Policies, Vec<Invalid>) {
        let mut problems = Vec::new();
        if let Err(e) = check_name(&input.mesh.root_namespace) {
            problems.push(Invalid { object: String::new(), error: e.within("mesh.rootNamespace") });
        }
        let mut p = Policies { settings: input.mesh.clone(), ..Policies::default() };
        let mut seen = HashSet::new();
        let mut note = |p: &mut Policies, object: String, reference: PolicyRef, kind, enforcement: Enforcement| {
            if let Enforcement::FailedClosed { error, .. } = &enforcement {
                problems.push(Invalid { object: object.clone(), error: error.clone() });
            }
            if !seen.insert((kind, reference.clone())) {
                problems.push(Invalid { object, error: FieldError::new("", "defined twice") });
            }
            p.objects.push(ObjectReport { kind, policy: reference, enforcement });
        };
        for (i, pa) in input.peer_authentications.iter().enumerate() {
            let object = format!("peerAuthentications[{i}] ({})", pa.reference());
            let (c, enforcement) = compile_peer(pa);
            note(&mut p, object, c.reference.clone(), PeerAuthentication::KIND, enforcement);
            p.peer.entry(c.reference.namespace.clone()).or_default().push(Arc::new(c));
        }
        for (i, ap) in input.authorization_policies.iter().enumerate() {
            let object = format!("authorizationPolicies[{i}] ({})", ap.reference());
            let (c, enforcement) = compile_authz(ap);
            note(&mut p, object, c.reference.clone(), AuthorizationPolicy::KIND, enforcement);
            p.authz.entry(c.reference.namespace.clone()).or_default().push(Arc::new(c));
        }
        for u in &input.unreadable {
            let reference = PolicyRef { namespace: u.metadata.namespace.clone(), name: u.metadata.name.clone() };
            let object = format!("{} {reference}", u.kind);
            if u.kind == PeerAuthentication::KIND {
                let (c, enforcement) = peer_stand_in(reference.clone(), u.selector.clone(), u.error.clone());
                note(&mut p, object, reference, PeerAuthentication::KIND, enforcement);
                p.peer.entry(c.reference.namespace.clone()).or_default().push(Arc::new(c));
            } else {
                let (c, enforcement) = authz_stand_in(reference.clone(), u.action, u.selector.clone(), u.error.clone());
                note(&mut p, object, reference, AuthorizationPolicy::KIND, enforcement);
                p.authz.entry(c.reference.namespace.clone()).or_default().push(Arc::new(c));
            }
        }
        for list in p.peer.values_mut() {
            list.sort_by(|a, b| a.reference.cmp(&b.reference));
        }
        for list in p.authz.values_mut() {
            list.sort_by(|a, b| a.reference.cmp(&b.reference));
        }
        p.counts = (p.peer.values().map(Vec::len).sum(), p.authz.values().map(Vec::len).sum());
        (p, problems)
    }

    /// (PeerAuthentications, AuthorizationPolicies).
    pub fn counts(&self) -> (usize, usize) {
        self.counts
    }

    /// What became of each object: enforced, partially enforced (and what was left out), or
    /// failed closed (and what stands in for it).
    pub fn objects(&self) -> &[ObjectReport] {
        &self.objects
    }

    /// How many objects are in each state (`Enforced`, `PartiallyEnforced`, `FailedClosed`).
    pub fn states(&self) -> BTreeMap<&'static str, usize> {
        let mut out = BTreeMap::from([("Enforced", 0), ("PartiallyEnforced", 0), ("FailedClosed", 0)]);
        for o in &self.objects {
            *out.entry(o.enforcement.state()).or_default() += 1;
        }
        out
    }

    /// Gathers what applies to `w`: its mode (workload, then namespace, then mesh, then the
    /// PERMISSIVE default; UNSET inherits; of two at one level the stronger) and the
    /// authorization policies selecting it (those of its namespace, and those of the root
    /// namespace, which apply mesh-wide).
    pub fn for_workload(&self, w: &Target<'_>) -> PodPolicy {
        let ns = w.namespace;
        let root = self.settings.root_namespace.as_str();
        let set = |p: &&Arc<CompiledPeer>| p.mode != MtlsMode::Unset;
        let strongest = |p: &&Arc<CompiledPeer>| mode_of(p.mode).map_or(0, Mode::strength);
        let local = self.peer.get(ns).map(Vec::as_slice).unwrap_or_default();
        let mesh_wide = self.peer.get(root).map(Vec::as_slice).unwrap_or_default();
        let for_workload = |p: &&Arc<CompiledPeer>| p.selector.is_some() && selects(&p.selector, w.labels);
        let whole = |p: &&Arc<CompiledPeer>| p.selector.is_none();
        // `rev` so that of equally strong ones the first by name wins.
        let workload = local.iter().rev().filter(set).filter(for_workload).max_by_key(strongest);
        let namespace = local.iter().rev().filter(set).filter(whole).max_by_key(strongest);
        let mesh = mesh_wide.iter().rev().filter(set).filter(whole).max_by_key(strongest);
        // The mode label opts a workload in; it may raise the mesh-wide mode an administrator set
        // (PERMISSIVE → STRICT), never lower it (STRICT → PERMISSIVE or DISABLE).
        let mut mode = match (workload, namespace, w.label_mode, mesh) {
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
        // Per-port modes are not enforced per port: the strongest one named by a
        // PeerAuthentication that applies raises the whole workload's mode.
        let applies = local.iter().filter(|p| for_workload(p) || whole(p)).chain(mesh_wide.iter().filter(whole));
        if let Some(p) = applies.filter(|p| p.floor.is_some()).max_by_key(|p| p.floor.map(Mode::strength)) {
            if let Some(floor) = p.floor.filter(|f| f.strength() > mode.mode.strength()) {
                mode = ModeChoice { mode: floor, policy: Some(p.reference.clone()), scope: "portLevelMtls" };
            }
        }
        // Per-port modes: those of the workload's own PeerAuthentication (the one that set its
        // mode, else the first by name that selects it and names ports), as in Istio.
        let ports_from = workload
            .filter(|p| !p.ports.is_empty())
            .or_else(|| local.iter().filter(for_workload).find(|p| !p.ports.is_empty()));
        let port_modes = ports_from.map(|p| p.ports.clone()).unwrap_or_default();
        let mut pod = PodPolicy { mode, port_modes, deny: Vec::new(), allow: Vec::new(), audit: Vec::new() };
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
                    // Replaced by a DENY stand-in when compiled.
                    Action::Custom => pod.deny.push(p.clone()),
                }
            }
        }
        pod
    }
}

fn mode_of(m: MtlsMode) -> Option<Mode> {
    match m {
        MtlsMode::Strict => Some(Mode::Strict),
        MtlsMode::Permissive => Some(Mode::Permissive),
        MtlsMode::Disable => Some(Mode::Disable),
        MtlsMode::Unset => None,
    }
}

fn choice(p: &CompiledPeer, scope: &'static str) -> ModeChoice {
    ModeChoice { mode: mode_of(p.mode).unwrap_or(Mode::Permissive), policy: Some(p.reference.clone()), scope }
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

/// The two kinds of policy object, as one: their kind, metadata and translation. The state file,
/// the Kubernetes source, the CRD status and the CLI go through this trait rather than a copy of
/// their code per kind.
pub trait PolicyObject: Sized {
    /// `PeerAuthentication` or `AuthorizationPolicy`.
    const KIND: &'static str;
    /// The kind's `spec`.
    type Spec: serde::de::DeserializeOwned;
    fn metadata(&self) -> &model::ObjectMeta;
    /// The object of `metadata` and `spec` (as the API server holds it).
    fn assemble(metadata: model::ObjectMeta, spec: Self::Spec) -> Self;
    /// What meshless enforces of the object on its own (what a Kubernetes object's status
    /// reports); problems name the field.
    fn enforcement(&self) -> Enforcement;
    /// `namespace/name`.
    fn reference(&self) -> PolicyRef {
        PolicyRef { namespace: self.metadata().namespace.clone(), name: self.metadata().name.clone() }
    }
}

impl PolicyObject for PeerAuthentication {
    const KIND: &'static str = "PeerAuthentication";
    type Spec = model::PeerAuthenticationSpec;
    fn metadata(&self) -> &model::ObjectMeta {
        &self.metadata
    }
    fn assemble(metadata: model::ObjectMeta, spec: Self::Spec) -> Self {
        PeerAuthentication {
            api_version: Some("meshless.io/v1alpha1".into()),
            kind: Some(Self::KIND.into()),
            metadata,
            spec,
        }
    }
    fn enforcement(&self) -> Enforcement {
        compile_peer(self).1
    }
}

impl PolicyObject for AuthorizationPolicy {
    const KIND: &'static str = "AuthorizationPolicy";
    type Spec = model::AuthorizationPolicySpec;
    fn metadata(&self) -> &model::ObjectMeta {
        &self.metadata
    }
    fn assemble(metadata: model::ObjectMeta, spec: Self::Spec) -> Self {
        AuthorizationPolicy {
            api_version: Some("meshless.io/v1alpha1".into()),
            kind: Some(Self::KIND.into()),
            metadata,
            spec,
        }
    }
    fn enforcement(&self) -> Enforcement {
        compile_authz(self).1
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

fn compile_peer(pa: &PeerAuthentication) -> (CompiledPeer, Enforcement) {
    let reference = pa.reference();
    let attempt = || -> Result<(CompiledPeer, Vec<FieldError>), FieldError> {
        let reference = check_object(PeerAuthentication::KIND, &pa.api_version, &pa.kind, &pa.metadata)?;
        let selector = selector(&pa.spec.selector)?;
        let mode = pa.spec.mtls.as_ref().map(|m| m.mode).unwrap_or_default();
        let mut left_out = Vec::new();
        let (mut floor, mut ports) = (None, BTreeMap::new());
        if let Some(value) = &pa.spec.port_level_mtls {
            let named: BTreeMap<u16, Mode> =
                port_modes(value)?.into_iter().filter_map(|(port, m)| mode_of(m).map(|m| (port, m))).collect();
            let why = if selector.is_none() {
                Some("portLevelMtls applies per port only with a workload selector (as in Istio)".to_string())
            } else if named.len() > MAX_PORT_MODES {
                Some(format!("more than {MAX_PORT_MODES} ports have a mode of their own"))
            } else {
                None
            };
            match why {
                None => ports = named,
                Some(why) => {
                    floor = named.values().copied().max_by_key(|m| m.strength());
                    let effect = match floor {
                        Some(f) => format!("{why}: {f}, the strongest mode named, is the least every port gets"),
                        None => format!("{why}; every port named is UNSET"),
                    };
                    left_out.push(FieldError::new("spec.portLevelMtls", effect));
                }
            }
        }
        Ok((CompiledPeer { reference, selector, mode, floor, ports }, left_out))
    };
    match attempt() {
        Ok((c, left_out)) if left_out.is_empty() => (c, Enforcement::Enforced),
        Ok((c, left_out)) => (c, Enforcement::PartiallyEnforced { left_out }),
        Err(error) => peer_stand_in(reference, selector(&pa.spec.selector).unwrap_or(None), error),
    }
}

/// `portLevelMtls`: port (1-65535) → `{mode}`.
fn port_modes(ports: &serde_yaml::Value) -> Result<Vec<(u16, MtlsMode)>, FieldError> {
    let map =
        ports.as_mapping().ok_or_else(|| FieldError::new("spec.portLevelMtls", "must be a map of port to {mode}"))?;
    let mut modes = Vec::with_capacity(map.len());
    for (k, v) in map {
        let port = match k {
            serde_yaml::Value::Number(n) => n.as_u64(),
            serde_yaml::Value::String(s) => s.parse::<u64>().ok(),
            _ => None,
        };
        let key = serde_yaml::to_string(k).unwrap_or_default().trim().to_string();
        let Some(port) = port.filter(|p| (1..=65535).contains(p)) else {
            return Err(FieldError::new(format!("spec.portLevelMtls.{key}"), "is not a port (1-65535)"));
        };
        let m: model::MutualTls = serde_yaml::from_value(v.clone())
            .map_err(|e| FieldError::new(format!("spec.portLevelMtls.{key}"), e.to_string()))?;
        modes.push((port as u16, m.mode));
    }
    Ok(modes)
}

/// A PeerAuthentication that cannot be read: the workloads it would select (all of its
/// namespace when even that is unknown) are STRICT.
fn peer_stand_in(
    reference: PolicyRef,
    selector: Option<BTreeMap<String, String>>,
    error: FieldError,
) -> (CompiledPeer, Enforcement) {
    let effect = "the workloads it would select are STRICT until it is fixed".to_string();
    (
        CompiledPeer { reference, selector, mode: MtlsMode::Strict, floor: None, ports: BTreeMap::new() },
        Enforcement::FailedClosed { error, effect },
    )
}

/// An AuthorizationPolicy that cannot be read, for the workloads it would select (all of its
/// namespace, mesh-wide in the root namespace, when even that is unknown): a DENY, or an action
/// meshless does not know, denies everything; an ALLOW allows nothing; an AUDIT marks nothing.
fn authz_stand_in(
    reference: PolicyRef,
    action: Option<Action>,
    selector: Option<BTreeMap<String, String>>,
    error: FieldError,
) -> (CompiledPolicy, Enforcement) {
    let (action, rules, effect) = match action {
        Some(Action::Allow) => (
            Action::Allow,
            vec![],
            "allows nothing: the workloads it would select accept only what another ALLOW allows",
        ),
        Some(Action::Audit) => (Action::Audit, vec![], "marks nothing"),
        Some(Action::Deny) => {
            (Action::Deny, vec![CompiledRule::any()], "denies every connection to the workloads it would select")
        }
        Some(Action::Custom) | None => (
            Action::Deny,
            vec![CompiledRule::any()],
            "an action meshless cannot evaluate is a DENY of every connection to the workloads it would select",
        ),
    };
    let enforcement = Enforcement::FailedClosed { error, effect: effect.into() };
    let caveat = Some(enforcement.summary());
    (CompiledPolicy { reference, action, selector, rules, caveat }, enforcement)
}

/// Translation state of one AuthorizationPolicy: its action, namespace (for service accounts
/// written without one) and what was left out.
struct Translation<'a> {
    action: Action,
    namespace: &'a str,
    left_out: Vec<FieldError>,
}

impl Translation<'_> {
    /// Records an attribute meshless cannot evaluate, at `field`. Returns whether the clause
    /// holding it may still match on its other fields: yes in a DENY or AUDIT (the attribute is
    /// treated as matching), no in an ALLOW (the clause — `unit` — matches nothing).
    fn cannot_evaluate(&mut self, field: String, what: &str, unit: &str) -> bool {
        let (treated, matching) = match self.action {
            Action::Allow => {
                (format!("its {unit} matches nothing, so the ALLOW allows no more than Istio's would"), false)
            }
            Action::Audit => ("treated as matching, so the AUDIT marks at least what Istio's would".into(), true),
            _ => ("treated as matching, so the DENY denies at least what Istio's would".into(), true),
        };
        self.left_out.push(FieldError::new(field, format!("{what}: {treated}")));
        matching
    }
}

fn compile_authz(ap: &AuthorizationPolicy) -> (CompiledPolicy, Enforcement) {
    let reference = ap.reference();
    let mut t = Translation { action: ap.spec.action, namespace: &ap.metadata.namespace, left_out: Vec::new() };
    match translate_authz(ap, &mut t) {
        Ok(mut c) if t.left_out.is_empty() => {
            c.caveat = None;
            (c, Enforcement::Enforced)
        }
        Ok(mut c) => {
            let enforcement = Enforcement::PartiallyEnforced { left_out: t.left_out };
            c.caveat = Some(enforcement.summary());
            (c, enforcement)
        }
        Err(error) => {
            authz_stand_in(reference, Some(ap.spec.action), selector(&ap.spec.selector).unwrap_or(None), error)
        }
    }
}

fn translate_authz(ap: &AuthorizationPolicy, t: &mut Translation<'_>) -> Result<CompiledPolicy, FieldError> {
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
        return Err(FieldError::new("spec.action", "CUSTOM (external authorization) is not supported"));
    }
    let selector = selector(&spec.selector)?;
    let mut rules = Vec::with_capacity(spec.rules.len());
    for (r, rule) in spec.rules.iter().enumerate() {
        let at = format!("spec.rules[{r}]");
        let mut compiled = CompiledRule::default();
        for (i, f) in rule.from.iter().enumerate() {
            compiled.from.push(compile_source(&f.source, &format!("{at}.from[{i}].source"), t)?);
        }
        for (i, o) in rule.to.iter().enumerate() {
            compiled.to.push(compile_operation(&o.operation, &format!("{at}.to[{i}].operation"), t)?);
        }
        for (i, c) in rule.when.iter().flatten().enumerate() {
            let field = format!("{at}.when[{i}]");
            match compile_condition(c, &field)? {
                Some(c) => compiled.when.push(c),
                None => {
                    compiled.never |= !t.cannot_evaluate(field, &format!("key {:?} is {}", c.key, model::L7), "rule")
                }
            }
        }
        rules.push(compiled);
    }
    Ok(CompiledPolicy { reference, action: spec.action, selector, rules, caveat: None })
}

fn compile_source(s: &model::Source, at: &str, t: &mut Translation<'_>) -> Result<SourceMatch, FieldError> {
    let names = |field: &str, v: &Option<Vec<String>>, principal: bool| -> Result<Option<Names>, FieldError> {
        v.as_ref().map(|list| compile_names(list, principal, &format!("{at}.{field}"))).transpose()
    };
    let blocks = |field: &str, v: &Option<Vec<String>>| -> Result<Option<Vec<IpNet>>, FieldError> {
        v.as_ref().map(|list| compile_blocks(list, &format!("{at}.{field}"))).transpose()
    };
    let accounts = |field: &str, v: &Option<Vec<String>>| -> Result<Option<HashSet<(String, String)>>, FieldError> {
        v.as_ref().map(|list| compile_accounts(list, t.namespace, &format!("{at}.{field}"))).transpose()
    };
    let merge = |a: Option<Vec<IpNet>>, b: Option<Vec<IpNet>>| match (a, b) {
        (Some(mut a), Some(b)) => Some({
            a.extend(b);
            a
        }),
        (a, b) => a.or(b),
    };
    let mut m = SourceMatch {
        principals: names("principals", &s.principals, true)?,
        not_principals: names("notPrincipals", &s.not_principals, true)?,
        namespaces: names("namespaces", &s.namespaces, false)?,
        not_namespaces: names("notNamespaces", &s.not_namespaces, false)?,
        service_accounts: accounts("serviceAccounts", &s.service_accounts)?,
        not_service_accounts: accounts("notServiceAccounts", &s.not_service_accounts)?,
        ip_blocks: merge(blocks("ipBlocks", &s.ip_blocks)?, blocks("remoteIpBlocks", &s.remote_ip_blocks)?),
        not_ip_blocks: merge(
            blocks("notIpBlocks", &s.not_ip_blocks)?,
            blocks("notRemoteIpBlocks", &s.not_remote_ip_blocks)?,
        ),
        never: false,
    };
    let l7 = [("requestPrincipals", &s.request_principals), ("notRequestPrincipals", &s.not_request_principals)];
    let l7: Vec<&str> = l7.iter().filter(|(_, v)| v.is_some()).map(|(f, _)| *f).collect();
    let l4_empty = m.principals.is_none()
        && m.not_principals.is_none()
        && m.namespaces.is_none()
        && m.not_namespaces.is_none()
        && m.service_accounts.is_none()
        && m.not_service_accounts.is_none()
        && m.ip_blocks.is_none()
        && m.not_ip_blocks.is_none();
    if l4_empty && l7.is_empty() {
        return Err(FieldError::new(at, "must not be empty (leave `from` out to match any source)"));
    }
    for field in l7 {
        m.never |= !t.cannot_evaluate(format!("{at}.{field}"), model::L7, "source");
    }
    Ok(m)
}

fn compile_names(list: &[String], principal: bool, at: &str) -> Result<Names, FieldError> {
    if list.is_empty() {
        return Err(FieldError::new(at, "must not be an empty list"));
    }
    let mut n = Names::default();
    for (i, raw) in list.iter().enumerate() {
        // Principals may be written as SPIFFE IDs or in Istio's form without the scheme.
        let v = if principal { raw.strip_prefix("spiffe://").unwrap_or(raw) } else { raw.as_str() };
        let stars = v.matches('*').count();
        match (v, stars) {
            ("", _) => return Err(FieldError::new(format!("{at}[{i}]"), "must not be empty")),
            ("*", 1) => n.any = true,
            (v, 0) => {
                n.exact.insert(v.to_string());
            }
            (v, 1) if v.ends_with('*') => n.prefixes.push(v.trim_end_matches('*').to_string()),
            (v, 1) if v.starts_with('*') => n.suffixes.push(v.trim_start_matches('*').to_string()),
            _ => {
                return Err(FieldError::new(
                    format!("{at}[{i}]"),
                    format!("{raw:?}: '*' is allowed only alone, at the start or at the end"),
                ))
            }
        }
    }
    Ok(n)
}

/// `serviceAccounts`: `<namespace>/<name>` or `<name>` (in the policy's namespace), no
/// wildcards, at most 16 (Istio's limits).
fn compile_accounts(list: &[String], namespace: &str, at: &str) -> Result<HashSet<(String, String)>, FieldError> {
    if list.is_empty() || list.len() > 16 {
        return Err(FieldError::new(at, "must hold 1 to 16 service accounts"));
    }
    list.iter()
        .enumerate()
        .map(|(i, raw)| {
            let (ns, sa) = raw.split_once('/').unwrap_or((namespace, raw));
            let bad = |why: &str| FieldError::new(format!("{at}[{i}]"), format!("{raw:?} {why}"));
            if raw.contains('*') {
                return Err(bad("must not hold a wildcard"));
            }
            check_name(ns).map_err(|_| bad("must be <namespace>/<serviceaccount> or <serviceaccount>"))?;
            check_name(sa).map_err(|_| bad("must be <namespace>/<serviceaccount> or <serviceaccount>"))?;
            Ok((ns.to_string(), sa.to_string()))
        })
        .collect()
}

fn compile_blocks(list: &[String], at: &str) -> Result<Vec<IpNet>, FieldError> {
    if list.is_empty() {
        return Err(FieldError::new(at, "must not be an empty list"));
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
                        .map_err(|_| FieldError::new(format!("{at}[{i}]"), "prefix too long")),
                    None => Ok(IpNet::V6(v6)),
                },
                Ok(n) => Ok(n),
                Err(_) => {
                    Err(FieldError::new(format!("{at}[{i}]"), format!("{s:?} is not an IP address or CIDR block")))
                }
            }
        })
        .collect()
}

fn compile_ports(list: &[model::PortValue], at: &str) -> Result<Vec<u16>, FieldError> {
    if list.is_empty() {
        return Err(FieldError::new(at, "must not be an empty list"));
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
                .ok_or_else(|| FieldError::new(format!("{at}[{i}]"), format!("{p:?} is not a port (1-65535)")))
        })
        .collect()
}

fn compile_operation(o: &model::Operation, at: &str, t: &mut Translation<'_>) -> Result<PortMatch, FieldError> {
    let mut m = PortMatch {
        ports: o.ports.as_deref().map(|l| compile_ports(l, &format!("{at}.ports"))).transpose()?,
        not_ports: o.not_ports.as_deref().map(|l| compile_ports(l, &format!("{at}.notPorts"))).transpose()?,
        never: false,
    };
    let l7 = [
        ("hosts", &o.hosts),
        ("notHosts", &o.not_hosts),
        ("methods", &o.methods),
        ("notMethods", &o.not_methods),
        ("paths", &o.paths),
        ("notPaths", &o.not_paths),
    ];
    let l7: Vec<&str> = l7.iter().filter(|(_, v)| v.is_some()).map(|(f, _)| *f).collect();
    if m.ports.is_none() && m.not_ports.is_none() && l7.is_empty() {
        return Err(FieldError::new(at, "must not be empty (leave `to` out to match any port)"));
    }
    for field in l7 {
        m.never |= !t.cannot_evaluate(format!("{at}.{field}"), model::L7, "operation");
    }
    Ok(m)
}

/// A `when` condition: `Some` for the L4 keys, `None` for the HTTP keys meshless cannot
/// evaluate; an error for keys Istio does not define and for malformed values.
fn compile_condition(c: &model::Condition, at: &str) -> Result<Option<Condition>, FieldError> {
    let attribute = match c.key.as_str() {
        "source.ip" | "remote.ip" => Attribute::SourceIp,
        "source.namespace" => Attribute::SourceNamespace,
        "source.principal" => Attribute::SourcePrincipal,
        "destination.ip" => Attribute::DestinationIp,
        "destination.port" => Attribute::DestinationPort,
        k if k.starts_with("request.") || k.starts_with("experimental.") || k == "connection.sni" => {
            return Ok(None)
        }
        k => {
            return Err(FieldError::new(
                format!("{at}.key"),
                format!("{k:?} is not a condition key Istio defines (source.ip, remote.ip, source.namespace, source.principal, destination.ip, destination.port, connection.sni, request.*)"),
            ))
        }
    };
    if c.values.is_none() && c.not_values.is_none() {
        return Err(FieldError::new(at, "needs values or notValues"));
    }
    let values = |field: &str, list: &Option<Vec<String>>| -> Result<Option<Values>, FieldError> {
        let Some(list) = list else { return Ok(None) };
        let at = format!("{at}.{field}");
        Ok(Some(match attribute {
            Attribute::SourceIp | Attribute::DestinationIp => Values::Blocks(compile_blocks(list, &at)?),
            Attribute::SourceNamespace => Values::Names(compile_names(list, false, &at)?),
            Attribute::SourcePrincipal => Values::Names(compile_names(list, true, &at)?),
            Attribute::DestinationPort => {
                let ports: Vec<model::PortValue> = list.iter().cloned().map(model::PortValue::Text).collect();
                Values::Ports(compile_ports(&ports, &at)?)
            }
        }))
    };
    Ok(Some(Condition {
        attribute,
        values: values("values", &c.values)?,
        not_values: values("notValues", &c.not_values)?,
    }))
}

#[cfg(test)]
mod properties;
#[cfg(test)]
mod tests;
