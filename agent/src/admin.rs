//! The agent's admin endpoint: HTTP on the node's loopback (127.0.0.1:15000 in the agent's own
//! network namespace — pods live in their own namespaces and cannot reach it; hostNetwork pods
//! share the node's and are trusted like any node process). What `meshless policy check|explain
//! --agent` asks, and what the node dashboard will build on:
//!
//! | path | answer |
//! |---|---|
//! | `GET /policy/explain?from=<spiffe-id, ip or ns/pod>&to=<ns/pod>&port=<n>` | the decision, its mode, policy and rule (JSON) |
//! | `GET /policy` | mesh settings and each local pod's mode and policy count (JSON) |
//! | `GET /status` | the node status: every pod's state (enrolled, outside the mesh, failing and why), mode, certificate serial and expiry, live connections; the pool per destination; draining (JSON, [`crate::status`]) |
//! | `GET /metrics` | decision counters, Prometheus text format |
//! | `GET /healthz` | `ok` |
//! | `GET /readyz` | `ready`: served only from the moment the capture is attached and the first pod set (with Kubernetes: every watch listed) is enrolled, until the agent stops accepting |
//!
//! [`explain`] is also what the CLI runs offline against a state file: one function, two callers.

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::extract::{Query, State as With};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::authorize::{self, Request};
use crate::identity::SpiffeId;
use crate::local::LocalPods;
use crate::policy::{Mode, Peer};
use crate::proxy;
use crate::status::Published;
use crate::workloads::{Directory, PodKey};

/// A question: may `from` reach `to` on `port`?
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Question {
    /// A SPIFFE ID (an authenticated source), an IP address (plaintext), or `namespace/pod` (that
    /// pod: its identity and address if it is in the mesh, its address in plaintext if not).
    pub from: String,
    /// `namespace/pod`, or a pod's address.
    pub to: String,
    pub port: u16,
}

/// The answer, with everything that went into it.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
pub struct Explanation {
    /// The source as decided on: its SPIFFE ID, or its address for plaintext.
    pub from: String,
    pub to: String,
    pub port: u16,
    /// `hbone` (mTLS through the tunnel) or `plaintext`.
    pub transport: String,
    /// `allow` or `deny`: what happens to the connection.
    pub decision: String,
    /// The destination's mode and where it comes from.
    pub mode: String,
    /// The policy verdict in words: the deciding policy and rule, "default allow", "no ALLOW
    /// matched", a plaintext refusal, or a refused target.
    pub reason: String,
    pub policy: Option<String>,
    pub rule: Option<usize>,
    /// AUDIT rules that matched.
    pub audited: Vec<String>,
    /// Policy denied, but the mesh is in dry-run: the connection goes through.
    pub dry_run: bool,
    /// Policies that took part and are not enforced as written: what was left out, or what
    /// stands in for an object that cannot be read.
    #[serde(default)]
    pub caveats: Vec<String>,
    /// Asked about a Service (`svc/<ns>/<name>`): the Service and port, and the decision at each
    /// of its meshed endpoints (a connection to the Service reaches one of them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<Explanation>,
}

impl Explanation {
    /// `allow` or `deny` (what `policy check` prints).
    pub fn short(&self) -> &str {
        &self.decision
    }

    /// The multi-line form `policy explain` prints.
    pub fn long(&self) -> String {
        let mut s = format!("{}: {} → {} port {} ({})\n", self.decision, self.from, self.to, self.port, self.transport);
        let _ = writeln!(s, "  mode:     {}", self.mode);
        let _ = writeln!(s, "  decided:  {}", self.reason);
        if self.dry_run {
            let _ = writeln!(s, "  dry run:  the mesh is in dry-run mode, so this denial is logged, not enforced");
        }
        for a in &self.audited {
            let _ = writeln!(s, "  audited:  {a}");
        }
        for c in &self.caveats {
            let _ = writeln!(s, "  caveat:   {c}");
        }
        if let Some(service) = &self.service {
            let _ = writeln!(
                s,
                "  service:  {service}: {} meshed endpoint(s), each decided on its own:",
                self.endpoints.len()
            );
            for e in &self.endpoints {
                for line in e.long().lines() {
                    let _ = writeln!(s, "    {line}");
                }
            }
        }
        s
    }
}

/// Why a question cannot be answered.
#[derive(Debug, thiserror::Error)]
pub enum ExplainError {
    /// The question is malformed (HTTP 400).
    #[error("{0}")]
    BadQuestion(String),
    /// A pod it names is not in the directory, or has no address (HTTP 404).
    #[error("{0}")]
    NotFound(String),
    /// The destination is not in the mesh: nothing is enforced for it (HTTP 422).
    #[error("{0} is not in the mesh: nothing is enforced for it")]
    NotMeshed(String),
}

impl ExplainError {
    fn status(&self) -> StatusCode {
        match self {
            ExplainError::BadQuestion(_) => StatusCode::BAD_REQUEST,
            ExplainError::NotFound(_) => StatusCode::NOT_FOUND,
            ExplainError::NotMeshed(_) => StatusCode::UNPROCESSABLE_ENTITY,
        }
    }
}

/// What asking the admin endpoint can fail with.
#[derive(Debug, thiserror::Error)]
pub enum AskError {
    #[error("cannot reach the agent's admin endpoint at {addr}: {source} (is the agent running on this node?)")]
    Unreachable { addr: String, source: std::io::Error },
    #[error("admin endpoint {addr}: {detail}")]
    Protocol { addr: String, detail: String },
    /// The endpoint answered with an error status; its message.
    #[error("{message}")]
    Refused { status: StatusCode, message: String },
}

/// Answers `q` against the snapshot `dir`, with the code the data path runs.
pub fn explain(dir: &Directory, q: &Question) -> Result<Explanation, ExplainError> {
    if let Some(service) = q.to.strip_prefix("svc/") {
        return explain_service(dir, q, service);
    }
    let missing = |what: &str| ExplainError::NotFound(format!("no pod {what} in the workload directory"));
    let dst = match q.to.parse::<IpAddr>() {
        Ok(ip) => dir.pod_by_ip(ip).ok_or_else(|| missing(&format!("with address {ip}")))?,
        Err(_) => dir.get(&pod_key(&q.to)?).ok_or_else(|| missing(&q.to))?,
    };
    if !dst.mesh {
        return Err(ExplainError::NotMeshed(q.to.clone()));
    }
    if q.port == 0 {
        return Err(ExplainError::BadQuestion("port must be 1-65535".into()));
    }
    let id;
    let peer = if let Ok(ip) = q.from.parse::<IpAddr>() {
        Peer::Plaintext { ip }
    } else if q.from.starts_with("spiffe://") {
        id = SpiffeId::new(&q.from).map_err(|e| ExplainError::BadQuestion(format!("--from {:?}: {e}", q.from)))?;
        Peer::Authenticated { id: &id, ip: None }
    } else {
        let src = dir.get(&pod_key(&q.from)?).ok_or_else(|| missing(&q.from))?;
        let ip = *src.ips.first().ok_or_else(|| ExplainError::NotFound(format!("{} has no address", q.from)))?;
        if src.mesh {
            id = src.identity.clone();
            Peer::Authenticated { id: &id, ip: Some(ip) }
        } else {
            Peer::Plaintext { ip }
        }
    };
    let target_ip = *dst.ips.first().ok_or_else(|| ExplainError::NotFound(format!("{} has no address", q.to)))?;
    let from_addr = match peer {
        Peer::Plaintext { ip } | Peer::Authenticated { ip: Some(ip), .. } => SocketAddr::new(ip, 0),
        Peer::Authenticated { ip: None, .. } => SocketAddr::from(([0, 0, 0, 0], 0)),
    };
    let policy = dir.policy_for(dst);
    let req = Request { peer, dst, target: SocketAddr::new(target_ip, q.port), from: from_addr, service: None };
    let outcome = authorize::decide(&req, &policy, dir.policies.settings.dry_run);
    let rule = outcome.decision.as_ref().and_then(|d| d.rule());
    let (transport, from) = match peer {
        Peer::Authenticated { id, .. } => ("hbone", id.to_string()),
        Peer::Plaintext { ip } => ("plaintext", ip.to_string()),
    };
    Ok(Explanation {
        from,
        to: dst.key.to_string(),
        port: q.port,
        transport: transport.into(),
        decision: if outcome.admit { "allow" } else { "deny" }.into(),
        mode: match policy.port_modes.get(&q.port) {
            Some(m) => format!("{m} (portLevelMtls, port {}; the workload's: {})", q.port, policy.mode),
            None => policy.mode.to_string(),
        },
        reason: outcome.why.clone(),
        policy: rule.map(|r| r.policy.to_string()),
        rule: rule.map(|r| r.rule),
        audited: outcome
            .decision
            .as_ref()
            .map(|d| d.audited.iter().map(ToString::to_string).collect())
            .unwrap_or_default(),
        dry_run: outcome.dry_run,
        caveats: outcome.decision.map(|d| d.caveats).unwrap_or_default(),
        service: None,
        endpoints: Vec::new(),
    })
}

/// `--to svc/<ns>/<name>`: the decision at each meshed endpoint of the Service's port `q.port`
/// (at the endpoint's target port); the answer is `allow` only if every endpoint allows.
fn explain_service(dir: &Directory, q: &Question, service: &str) -> Result<Explanation, ExplainError> {
    let key = pod_key(service)?;
    let key = crate::workloads::services::ServiceKey { namespace: key.namespace, name: key.name };
    let endpoints = dir
        .services
        .endpoints_of(&key, q.port)
        .ok_or_else(|| ExplainError::NotFound(format!("no Service {key} with port {} in the directory", q.port)))?;
    let mut each = Vec::new();
    for b in &endpoints {
        let Some(pod) = b.pod.as_ref().filter(|p| p.mesh) else { continue };
        let one = Question { from: q.from.clone(), to: pod.key.to_string(), port: b.addr.port() };
        each.push(explain(dir, &one)?);
    }
    let first = each.first().ok_or_else(|| {
        ExplainError::NotMeshed(format!("every endpoint of Service {key} port {} ({} in all)", q.port, endpoints.len()))
    })?;
    let all_allow = each.iter().all(|e| e.decision == "allow");
    Ok(Explanation {
        from: first.from.clone(),
        to: format!("svc/{key}"),
        port: q.port,
        transport: first.transport.clone(),
        decision: if all_allow { "allow" } else { "deny" }.into(),
        mode: first.mode.clone(),
        reason: if all_allow {
            "every meshed endpoint allows".into()
        } else {
            format!("{} of {} meshed endpoints deny", each.iter().filter(|e| e.decision != "allow").count(), each.len())
        },
        policy: None,
        rule: None,
        audited: Vec::new(),
        dry_run: each.iter().any(|e| e.dry_run),
        caveats: Vec::new(),
        service: Some(format!("{key} port {}", q.port)),
        endpoints: each,
    })
}

fn pod_key(s: &str) -> Result<PodKey, ExplainError> {
    match s.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
            Ok(PodKey { namespace: ns.into(), name: name.into() })
        }
        _ => Err(ExplainError::BadQuestion(format!("{s:?}: expected namespace/pod"))),
    }
}

/// What the admin endpoint reads (and nothing else of the agent).
#[derive(Clone)]
pub struct State {
    /// The directory, the decision counters and the pool.
    pub proxy: Arc<proxy::Inputs>,
    pub status: Published,
    pub local_pods: LocalPods,
    /// The pods' certificates (for their counters).
    pub identities: Arc<crate::identity::store::Identities>,
    /// When this agent started.
    pub started: std::time::SystemTime,
    /// The dashboard's live streams (few: each holds a permit).
    pub streams: Arc<tokio::sync::Semaphore>,
}

/// The admin (or metrics) endpoint's listening socket on `addr`. Not shared (no SO_REUSEPORT):
/// a successor agent takes this very socket over (`handover`), so while an agent runs nothing
/// else can bind the port and answer for it.
pub fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let sock = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None)?;
    sock.set_reuse_address(true)?;
    sock.bind(&addr.into())?;
    sock.listen(128)?;
    Ok(sock.into())
}

/// Serves the admin endpoint on `listener` (bound by [`bind`], or handed over by the previous
/// agent, which stops accepting on it once this one serves) until `stop` fires, with `pages`
/// (the dashboard, which reads this module's state) beside its own routes.
pub async fn serve(
    listener: std::net::TcpListener,
    state: State,
    pages: Router<State>,
    token: Option<Arc<Token>>,
    stop: tokio_util::sync::CancellationToken,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        // The endpoint itself starts only once the agent is ready and stops when it drains, so
        // answering at all is the honest readiness signal.
        .route("/readyz", get(readyz_handler))
        .route("/policy/explain", get(explain_handler))
        .route("/api/policy", get(policy_handler))
        .route("/metrics", get(metrics_handler))
        .route("/status", get(status_handler))
        .route("/api/flows", get(flows_handler))
        .merge(pages)
        .with_state(state);
    let own = listener.local_addr()?;
    // A page on another site must not read the node's policy through the user's browser (DNS
    // rebinding): a Host that is not this endpoint's address or a loopback name is refused.
    let app = app.layer(axum::middleware::from_fn(move |req: axum::extract::Request, next: axum::middleware::Next| {
        // Behind a token on a wildcard address, any Host: a browser led there by another site
        // (DNS rebinding) has no token to send.
        let allowed = (token.is_some() && own.ip().is_unspecified())
            || req.headers().get(http::header::HOST).and_then(|h| h.to_str().ok()).is_some_and(|h| local_host(h, own));
        // Health and readiness answer without the token: kubelet's probes (`meshless ready`).
        let open = matches!(req.uri().path(), "/healthz" | "/readyz");
        let authorized =
            open || token.as_ref().is_none_or(|t| t.admits(req.headers().get(http::header::AUTHORIZATION)));
        async move {
            if !allowed {
                return (StatusCode::FORBIDDEN, "the admin endpoint answers to its own address only\n").into_response();
            }
            if !authorized {
                return (
                    StatusCode::UNAUTHORIZED,
                    [(http::header::WWW_AUTHENTICATE, "Bearer")],
                    "this admin endpoint needs Authorization: Bearer <the token of --admin-token-file>\n",
                )
                    .into_response();
            }
            let mut resp = next.run(req).await;
            let h = resp.headers_mut();
            h.insert(http::header::CONTENT_SECURITY_POLICY, http::HeaderValue::from_static("default-src 'self'"));
            h.insert(http::header::X_CONTENT_TYPE_OPTIONS, http::HeaderValue::from_static("nosniff"));
            resp
        }
    }));
    spawn_router(listener, app, "admin", stop)
}

/// The admin endpoint's bearer token (`--admin-token-file`); never logged or shown.
pub struct Token(zeroize::Zeroizing<Vec<u8>>);

impl Token {
    /// Whether `header` is `Bearer <this token>` (compared in constant time).
    fn admits(&self, header: Option<&http::HeaderValue>) -> bool {
        let Some((scheme, given)) = header.and_then(|h| h.as_bytes().split_at_checked(7)) else {
            return false;
        };
        if !scheme.eq_ignore_ascii_case(b"bearer ") {
            return false;
        }
        let want = &self.0;
        given.len() == want.len() && given.iter().zip(want.iter()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
    }
}

/// The admin endpoint serves beyond loopback only behind a token: the node's policy, flows and
/// identities are not for whoever reaches the node.
pub fn check_exposure(addr: SocketAddr, token: bool) -> std::io::Result<()> {
    match addr.ip().is_loopback() || token {
        true => Ok(()),
        false => Err(std::io::Error::other(
            "the admin endpoint listens beyond loopback only with --admin-token-file (a bearer token every request \
             must carry)",
        )),
    }
}

/// Reads the admin token from `path`: one line, 16 characters at least, no spaces.
pub fn read_token(path: &std::path::Path) -> std::io::Result<Arc<Token>> {
    let text = zeroize::Zeroizing::new(std::fs::read_to_string(path)?);
    let token = text.trim();
    if token.len() < 16 || token.bytes().any(|b| b.is_ascii_whitespace() || b.is_ascii_control()) {
        return Err(std::io::Error::other("the token must be one line of 16 characters at least, without spaces"));
    }
    Ok(Arc::new(Token(zeroize::Zeroizing::new(token.as_bytes().to_vec()))))
}

/// Whether `host` (a Host header) names this endpoint: its own address, or a loopback name or
/// address, with any port.
fn local_host(host: &str, own: SocketAddr) -> bool {
    let name = match host.rsplit_once(':') {
        // `[::1]:15000`, `127.0.0.1:15000`, `localhost:15000`; not `::1` alone (no brackets).
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) && !name.ends_with(':') => name,
        _ => host,
    };
    let name = name.trim_start_matches('[').trim_end_matches(']');
    if name.eq_ignore_ascii_case("localhost") {
        return true;
    }
    name.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback() || ip == own.ip())
}

/// Serves `app` on `listener` in a task of its own until `stop` fires.
fn spawn_router(
    listener: std::net::TcpListener,
    app: Router,
    what: &'static str,
    stop: tokio_util::sync::CancellationToken,
) -> std::io::Result<()> {
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    // A reader that stops reading (a live dashboard stream, a scrape) holds at most the kernel's
    // socket buffers, and is cut once its zero window has lasted 30 s.
    let listener = axum::serve::ListenerExt::tap_io(tokio::net::TcpListener::from_std(listener)?, |tcp| {
        let _ = socket2::SockRef::from(&*tcp).set_tcp_user_timeout(Some(std::time::Duration::from_secs(30)));
    });
    info!(%addr, endpoint = what, "endpoint serving");
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(async move { stop.cancelled().await }).await {
            warn!(endpoint = what, error = %e, "endpoint stopped");
        }
    });
    Ok(())
}

async fn explain_handler(With(state): With<State>, Query(q): Query<Question>) -> Response {
    match explain(&state.proxy.store.load(), &q) {
        Ok(e) => Json(e).into_response(),
        Err(e) => (e.status(), format!("{e}\n")).into_response(),
    }
}

#[derive(Serialize)]
struct PolicyView {
    node: String,
    root_namespace: String,
    dry_run: bool,
    close_denied_connections: bool,
    peer_authentications: usize,
    authorization_policies: usize,
    /// Every policy object and how much of it is enforced.
    objects: Vec<crate::policy::ObjectReport>,
    pods: Vec<PodView>,
}

#[derive(Serialize)]
struct PodView {
    pod: String,
    mode: Mode,
    mode_source: String,
    /// Ports with a mode of their own (`portLevelMtls`).
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    port_modes: std::collections::BTreeMap<u16, Mode>,
    authorization_policies: usize,
}

/// Ready (the endpoint serves only once the agent is ready); a refused update is said, as the
/// last good state serves in its place.
async fn readyz_handler(With(state): With<State>) -> String {
    match &state.proxy.store.load().refused_update {
        None => "ready\n".into(),
        Some(why) => format!("ready; the last good state serves, the newest update was refused: {why}\n"),
    }
}

async fn status_handler(With(state): With<State>) -> Json<crate::status::NodeStatus> {
    Json(node_status(&state))
}

/// The node status with its live parts and the policy objects' states.
pub fn node_status(state: &State) -> crate::status::NodeStatus {
    let mut status = state.status.load().with_live(&state.local_pods.load(), &state.proxy.pool);
    let dir = state.proxy.store.load();
    let policies = &dir.policies;
    status.refused_update = dir.refused_update.clone();
    status.policy_objects = policies.states();
    status.policy_problems =
        policies.objects().iter().filter(|o| o.enforcement != crate::policy::Enforcement::Enforced).cloned().collect();
    status
}

async fn policy_handler(With(state): With<State>) -> Json<PolicyView> {
    let dir = state.proxy.store.load();
    let s = &dir.policies.settings;
    let (pa, ap) = dir.policies.counts();
    let mut pods: Vec<PodView> = dir
        .local_pods()
        .filter(|w| w.mesh)
        .map(|w| {
            let p = dir.policy_for(w);
            PodView {
                pod: w.key.to_string(),
                mode: p.mode.mode,
                mode_source: p.mode.to_string(),
                port_modes: p.port_modes.clone(),
                authorization_policies: p.len(),
            }
        })
        .collect();
    pods.sort_by(|a, b| a.pod.cmp(&b.pod));
    Json(PolicyView {
        node: dir.node.clone(),
        root_namespace: s.root_namespace.clone(),
        dry_run: s.dry_run,
        close_denied_connections: s.close_denied_connections,
        peer_authentications: pa,
        authorization_policies: ap,
        objects: dir.policies.objects().to_vec(),
        pods,
    })
}

/// `/api/flows` (and the dashboard's `/flows`) filters: each, when given, must match.
#[derive(Debug, Default, Clone, Deserialize)]
pub struct FlowQuery {
    /// The source's or the destination's namespace.
    pub namespace: Option<String>,
    /// The source's or the destination's SPIFFE ID (or a plaintext source's address).
    pub identity: Option<String>,
    /// `allow`, `deny`, `dry_run_deny`, `carried`, `failed`, `refused`.
    pub verdict: Option<String>,
    /// `hbone`, `plaintext`, `passthrough`.
    pub transport: Option<String>,
}

impl FlowQuery {
    /// Refuses a filter longer than 512 bytes.
    pub fn check(&self) -> Result<(), &'static str> {
        let fields = [&self.namespace, &self.identity, &self.verdict, &self.transport];
        match fields.iter().any(|f| f.as_ref().is_some_and(|v| v.len() > 512)) {
            true => Err("a filter longer than 512 bytes\n"),
            false => Ok(()),
        }
    }

    pub fn keeps(&self, f: &crate::flows::Flow) -> bool {
        either(&self.namespace, &f.source_namespace, &f.destination_namespace)
            && either(&self.identity, &f.source, &f.destination)
            && is(&self.verdict, f.verdict)
            && is(&self.transport, f.transport)
    }

    pub fn keeps_aggregate(&self, a: &crate::flows::Aggregate) -> bool {
        either(&self.namespace, &a.seen.source_namespace, &a.key.destination_namespace)
            && is(&self.identity, &a.key.source)
            && is(&self.verdict, a.key.verdict)
            && is(&self.transport, a.key.transport)
    }

    /// Whether no filter is set.
    pub fn is_empty(&self) -> bool {
        [&self.namespace, &self.identity, &self.verdict, &self.transport].iter().all(|f| f.is_none())
    }
}

fn is(want: &Option<String>, v: &str) -> bool {
    want.as_deref().is_none_or(|w| w == v)
}

fn either(want: &Option<String>, a: &str, b: &str) -> bool {
    want.as_deref().is_none_or(|w| w == a || w == b)
}

#[derive(Serialize)]
struct FlowsView {
    capacity: usize,
    /// Flows recorded since the agent started (the table keeps the last `capacity`).
    total: u64,
    /// Recent flows and aggregates held, and (an upper bound of) the memory they take.
    held: (usize, usize),
    bytes: usize,
    recent: Vec<crate::flows::Flow>,
    aggregates: Vec<crate::flows::Aggregate>,
}

/// The flow table, filtered: the recent flows (newest first) and the aggregates.
async fn flows_handler(With(state): With<State>, Query(q): Query<FlowQuery>) -> Response {
    if let Err(e) = q.check() {
        return (StatusCode::BAD_REQUEST, e).into_response();
    }
    // Copied under the lock (every connection's end takes it), filtered and sorted after.
    let table = state.proxy.telemetry.flows.lock();
    let (capacity, total, held, bytes) = (table.capacity(), table.total, table.len(), table.bytes());
    let (recent, aggregates) = (table.recent(|_| true), table.aggregates_unsorted());
    drop(table);
    let recent = recent.into_iter().filter(|f| q.keeps(f)).collect();
    let mut aggregates: Vec<crate::flows::Aggregate> =
        aggregates.into_iter().filter(|a| q.keeps_aggregate(a)).collect();
    aggregates.sort_by_key(|a| std::cmp::Reverse(a.seen.last_ms));
    let view = FlowsView { capacity, total, held, bytes, recent, aggregates };
    Json(view).into_response()
}

async fn metrics_handler(With(state): With<State>) -> impl IntoResponse {
    (
        [(axum::http::header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
        metrics_text(&state),
    )
}

/// Serves the metrics alone (`/metrics`, and `/stats/prometheus` as ztunnel and Envoy name it) on
/// `listener` until `stop` fires: what Prometheus scrapes, apart from the admin endpoint.
pub async fn serve_metrics(
    listener: std::net::TcpListener,
    state: State,
    stop: tokio_util::sync::CancellationToken,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/stats/prometheus", get(metrics_handler))
        .with_state(state);
    spawn_router(listener, app, "metrics", stop)
}

/// Every metric of the node: the connection metrics and the access log's (`telemetry`), the
/// inbound decisions, policy objects, certificates, pods, handshakes refused, the process.
fn metrics_text(state: &State) -> String {
    use crate::telemetry::{unix_seconds, Family};
    let decisions = state
        .proxy
        .decisions
        .snapshot()
        .into_iter()
        .map(|(k, n)| {
            let labels = vec![
                ("transport", k.transport.to_string()),
                ("mode", k.mode.to_string()),
                ("decision", k.decision.to_string()),
                ("by", k.by),
            ];
            (labels, n)
        })
        .collect();
    let dir = state.proxy.store.load();
    let objects = dir.policies.states().into_iter().map(|(s, n)| (vec![("state", s.to_string())], n as i64)).collect();
    let pods = state.local_pods.load();
    // One sample per identity (replicas share one): the soonest expiry.
    let mut soonest: std::collections::BTreeMap<String, i64> = Default::default();
    for p in pods.iter() {
        let Some(issued) = p.tls.cert.issued() else { continue };
        let at = unix_seconds(issued.not_after);
        soonest.entry(p.tls.id.to_string()).and_modify(|t| *t = (*t).min(at)).or_insert(at);
    }
    let expiry = soonest.into_iter().map(|(id, at)| (vec![("identity", id)], at)).collect();
    let mut by_state: std::collections::BTreeMap<&str, i64> = Default::default();
    for p in &state.status.load().pods {
        *by_state.entry(p.state.as_str()).or_default() += 1;
    }
    let (rss, fds) = crate::limits::process_usage();
    state.proxy.telemetry.render(vec![
        Family::counter(
            "meshless_inbound_decisions",
            "Inbound connections decided, by transport, mode, decision and what decided.",
            decisions,
        ),
        Family::gauge(
            "meshless_policy_objects",
            "Policy objects by how much of them is enforced (Enforced, PartiallyEnforced, FailedClosed).",
            objects,
        ),
        Family::gauge(
            "istio_cert_expiry_seconds",
            "When each local workload's certificate expires (not-after, Unix seconds).",
            expiry,
        ),
        Family::gauge(
            "meshless_pods",
            "This node's pods by state (enrolled, outside_mesh, failing).",
            by_state.into_iter().map(|(s, n)| (vec![("state", s.to_string())], n)).collect(),
        ),
        Family::counter(
            "meshless_tls_handshakes_refused",
            "Inbound TLS handshakes refused by the handshake caps (node-wide and per source).",
            vec![(vec![], state.proxy.handshakes.refused())],
        ),
        Family::gauge(
            "meshless_hbone_streams",
            "Streams open on pooled HBONE connections (outbound).",
            vec![(vec![], state.proxy.pool.entries().iter().map(|e| e.streams as i64).sum())],
        ),
        Family::counter(
            "meshless_certificates_signed",
            "Workload certificates signed for this node's pods (first ones and renewals).",
            vec![(vec![], state.identities.counts.signed.load(std::sync::atomic::Ordering::Relaxed))],
        ),
        Family::counter(
            "meshless_certificate_rotations",
            "Workload certificates renewed before they expired.",
            vec![(vec![], state.identities.counts.rotations.load(std::sync::atomic::Ordering::Relaxed))],
        ),
        Family::counter(
            "meshless_certificate_issuance_errors",
            "Certificate requests that failed (the issuer unreachable, or its answer refused).",
            vec![(vec![], state.identities.counts.errors.load(std::sync::atomic::Ordering::Relaxed))],
        ),
        Family::gauge(
            "meshless_agent_takeovers",
            "Agents on this node that took over from a running one, up to this agent (restarts without a dropped connection).",
            vec![(vec![], crate::handover::takeovers() as i64)],
        ),
        Family::gauge("process_resident_memory_bytes", "Resident memory of the agent.", vec![(vec![], rss)]),
        Family::gauge("process_open_fds", "Open file descriptors of the agent.", vec![(vec![], fds)]),
    ])
}

/// Asks the admin endpoint at `addr` (host:port) to explain `q` (`meshless policy … --agent`).
pub async fn ask(addr: &str, q: &Question) -> Result<Explanation, AskError> {
    let protocol = |detail: String| AskError::Protocol { addr: addr.into(), detail };
    let query = serde_urlencoded::to_string(q).map_err(|e| protocol(e.to_string()))?;
    let body = get_path(addr, &format!("/policy/explain?{query}")).await?;
    serde_json::from_slice(&body).map_err(|e| protocol(format!("unexpected answer: {e}")))
}

/// `GET path` on the admin endpoint; the body, or the error the endpoint answered.
pub async fn get_path(addr: &str, path: &str) -> Result<bytes::Bytes, AskError> {
    use http_body_util::BodyExt as _;
    let protocol = |detail: String| AskError::Protocol { addr: addr.into(), detail };
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|source| AskError::Unreachable { addr: addr.into(), source })?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
        .await
        .map_err(|e| protocol(e.to_string()))?;
    tokio::spawn(conn);
    let mut req = http::Request::get(path).header(http::header::HOST, addr);
    // The agent's own token, when its admin endpoint wants one (the same variable the agent reads).
    if let Some(file) = std::env::var_os("MESHLESS_ADMIN_TOKEN_FILE") {
        let token = read_token(std::path::Path::new(&file))
            .map_err(|e| protocol(format!("MESHLESS_ADMIN_TOKEN_FILE {}: {e}", file.to_string_lossy())))?;
        let mut value = zeroize::Zeroizing::new(b"Bearer ".to_vec());
        value.extend_from_slice(&token.0);
        let mut value = http::HeaderValue::from_bytes(&value).map_err(|e| protocol(e.to_string()))?;
        value.set_sensitive(true);
        req = req.header(http::header::AUTHORIZATION, value);
    }
    let req = req.body(http_body_util::Empty::<bytes::Bytes>::new()).map_err(|e| protocol(e.to_string()))?;
    let resp = sender.send_request(req).await.map_err(|e| protocol(e.to_string()))?;
    let status = resp.status();
    let body = resp.into_body().collect().await.map_err(|e| protocol(e.to_string()))?.to_bytes();
    if !status.is_success() {
        return Err(AskError::Refused { status, message: String::from_utf8_lossy(&body).trim().to_string() });
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_admits_only_its_own_bearer_header() {
        let dir = std::env::temp_dir().join(format!("meshless-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("token");
        std::fs::write(&path, "short\n").unwrap();
        assert!(read_token(&path).is_err(), "a short token");
        std::fs::write(&path, "0123456789abcdef-token\n").unwrap();
        let t = read_token(&path).unwrap();
        let h = |v: &str| http::HeaderValue::from_str(v).unwrap();
        assert!(t.admits(Some(&h("Bearer 0123456789abcdef-token"))));
        assert!(t.admits(Some(&h("bearer 0123456789abcdef-token"))), "the scheme is case-insensitive");
        for bad in [
            "Bearer 0123456789abcdef-tokeN",
            "Bearer 0123456789abcdef-token2",
            "Basic! 0123456789abcdef-token",
            "0123456789abcdef-token",
            "Bearer ",
            "Bear",
        ] {
            assert!(!t.admits(Some(&h(bad))), "{bad}");
        }
        assert!(!t.admits(None));
        let (lo, node): (SocketAddr, SocketAddr) =
            ("127.0.0.1:15000".parse().unwrap(), "10.0.0.1:15000".parse().unwrap());
        assert!(check_exposure(lo, false).is_ok() && check_exposure(node, true).is_ok());
        assert!(check_exposure(node, false).is_err(), "beyond loopback without a token");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn only_this_endpoints_own_address_or_loopback_names_it() {
        let own: SocketAddr = "127.0.0.1:15000".parse().unwrap();
        for ok in ["127.0.0.1:15000", "127.0.0.1", "localhost:15000", "LOCALHOST", "[::1]:15000", "127.0.0.2:80"] {
            assert!(local_host(ok, own), "{ok}");
        }
        for bad in ["evil.example", "evil.example:15000", "10.0.0.5:15000", "127.0.0.1.evil.example", "", "[::1]x"] {
            assert!(!local_host(bad, own), "{bad}");
        }
        let node: SocketAddr = "10.0.0.5:15000".parse().unwrap();
        assert!(local_host("10.0.0.5:15000", node), "its own (non-loopback) address");
    }
}
