//! The node dashboard: read-only pages on the admin endpoint (127.0.0.1:15000), built from what
//! the endpoint's JSON gives (the node status, the directory's policy, the flow table, the
//! telemetry counters). Every page is rendered on the server, with every cluster-supplied value
//! escaped (maud), so it reads without JavaScript; `live.js` only adds live updates from
//! `/api/events` (server-sent events). Assets are compiled in: no CDN, nothing fetched.
//!
//! | page | what it shows |
//! |---|---|
//! | `/` | handshake failures, denials, the soonest certificate expiry, the mTLS share of connections and bytes (5 min, 1 h), agent restarts |
//! | `/workloads` | each local pod: SPIFFE ID, state, mode and its source, certificate serial, not-after, last rotation, live connections |
//! | `/flows` | the flow table, filtered (namespace, identity, verdict, transport), live |
//! | `/policy` | each workload's policies beside what happened: rules used, ALLOW rules never used, denied attempts, and the plaintext sources STRICT would cut |
//! | `/why-denied?from=&to=&port=` | the decision of `meshless policy explain`, in its words |
//!
//! Live streams are few ([`MAX_STREAMS`]), each event bounded ([`FLOWS_PER_EVENT`]), and a
//! reader that stops reading is dropped: the kernel cuts a connection whose zero window lasted
//! 30 s (`TCP_USER_TIMEOUT` on every admin connection), which ends its stream and frees its
//! place; a stream that could not hand over an event for [`SLOW_READER`] past its tick ends at
//! its next turn; a reader gone is noticed at the next keep-alive (5 s).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::extract::{Query, State as With};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use maud::{html, Markup, DOCTYPE};
use serde::{Deserialize, Serialize};

use crate::admin::{self, FlowQuery, Question, State};
use crate::flows::{Aggregate, Flow};
use crate::policy::{canonical, Mode};
use crate::status::PodState;

/// Live streams served at once; more get 503 (the page still reads, without updates).
pub const MAX_STREAMS: usize = 8;
/// A stream whose last event took longer than this to be taken by the reader ends.
const SLOW_READER: Duration = Duration::from_secs(10);
/// A stream ends after this long (the browser reconnects, resuming where it was).
const STREAM_LIFETIME: Duration = Duration::from_secs(15 * 60);
/// Flows per live event at most, and rows a page shows at most.
const FLOWS_PER_EVENT: usize = 100;
const ROWS: usize = 200;

const STYLE: &str = include_str!("dashboard/style.css");
const SCRIPT: &str = include_str!("dashboard/live.js");

pub fn routes() -> Router<State> {
    Router::new()
        .route("/", get(overview))
        .route("/workloads", get(workloads))
        .route("/flows", get(flows))
        .route("/policy", get(policy))
        .route("/why-denied", get(why_denied))
        .route("/api/events", get(events))
        .route("/assets/style.css", get(|| async { ([(header::CONTENT_TYPE, "text/css; charset=utf-8")], STYLE) }))
        .route(
            "/assets/live.js",
            get(|| async { ([(header::CONTENT_TYPE, "text/javascript; charset=utf-8")], SCRIPT) }),
        )
}

/// A page: the navigation, the node's name, `body`. `live` names the live view `live.js` opens.
fn page(state: &State, title: &str, live: Option<&str>, body: Markup) -> Html<String> {
    let node = state.proxy.store.load().node.clone();
    let nav = [("/", "Overview"), ("/workloads", "Workloads"), ("/flows", "Flows"), ("/policy", "Policy")];
    Html(
        html! {
            (DOCTYPE)
            html lang="en" {
                head {
                    meta charset="utf-8";
                    meta name="viewport" content="width=device-width, initial-scale=1";
                    title { (title) " · meshless · " (node) }
                    link rel="stylesheet" href="/assets/style.css";
                    script src="/assets/live.js" defer {}
                }
                body data-live=[live] {
                    header {
                        span.brand { "meshless" }
                        nav { @for (href, name) in nav { a href=(href) aria-current=[(name == title).then_some("page")] { (name) } } }
                        span.node { "node " strong { (node) } }
                        @if live.is_some() { span #live.live { "static" } }
                    }
                    main { h1 { (title) } (body) }
                }
            }
        }
        .into_string(),
    )
}

fn seconds(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or_default()
}

/// `2026-12-03T19:30:00Z`.
fn time(unix_seconds: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(unix_seconds)).to_string()
}

/// `in 23h 59m`, `2m ago`.
fn relative(unix_seconds: u64, now: u64) -> String {
    let (d, future) = match unix_seconds.checked_sub(now) {
        Some(d) => (d, true),
        None => (now - unix_seconds, false),
    };
    let text = match d {
        0..60 => format!("{d}s"),
        60..3600 => format!("{}m {}s", d / 60, d % 60),
        3600..86_400 => format!("{}h {}m", d / 3600, d % 3600 / 60),
        _ => format!("{}d {}h", d / 86_400, d % 86_400 / 3600),
    };
    if future {
        format!("in {text}")
    } else {
        format!("{text} ago")
    }
}

fn percent(part: u64, all: u64) -> String {
    match all {
        0 => "no traffic".into(),
        _ => format!("{:.1} %", part as f64 * 100.0 / all as f64),
    }
}

/// The overview's figures, by the key its elements carry (`data-key`): what the page shows and
/// what its live event sends.
fn overview_values(state: &State) -> BTreeMap<&'static str, String> {
    let now = SystemTime::now();
    let now_s = seconds(now);
    let telemetry = &state.proxy.telemetry;
    let mut v = BTreeMap::new();
    let failures: u64 = telemetry.handshake_failures().iter().map(|(_, n)| n).sum();
    v.insert("handshake_failures", failures.to_string());
    let decisions = state.proxy.decisions.snapshot();
    let count = |d: &str| decisions.iter().filter(|(k, _)| k.decision == d).map(|(_, n)| n).sum::<u64>();
    v.insert("denied", count("deny").to_string());
    v.insert("dry_run_denied", count("dry_run_deny").to_string());
    v.insert("allowed", count("allow").to_string());
    let soonest = state
        .local_pods
        .load()
        .iter()
        .filter_map(|p| p.tls.cert.issued().map(|i| (seconds(i.not_after), p.tls.id.to_string())))
        .min();
    match soonest {
        Some((at, id)) => {
            v.insert("expiry", relative(at, now_s));
            v.insert("expiry_at", time(at));
            v.insert("expiry_identity", id);
        }
        None => {
            v.insert("expiry", "no certificate".into());
            v.insert("expiry_at", "-".into());
            v.insert("expiry_identity", "-".into());
        }
    }
    let table = telemetry.flows.lock();
    let now_ms = now.duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or_default();
    let (five, hour) = (table.share(now_ms, 5), table.share(now_ms, 60));
    drop(table);
    v.insert("mtls_connections_5m", percent(five.mtls_connections, five.connections));
    v.insert("mtls_bytes_5m", percent(five.mtls_bytes, five.bytes));
    v.insert("connections_5m", five.connections.to_string());
    v.insert("mtls_connections_1h", percent(hour.mtls_connections, hour.connections));
    v.insert("mtls_bytes_1h", percent(hour.mtls_bytes, hour.bytes));
    v.insert("connections_1h", hour.connections.to_string());
    v.insert("restarts", crate::handover::takeovers().to_string());
    let started = seconds(state.started);
    v.insert("started", format!("{} ({})", time(started), relative(started, now_s)));
    v
}

/// One figure of the overview, with what explains it below.
fn card(title: &str, figure: Markup, detail: Markup) -> Markup {
    html! { div.card { h2 { (title) } p.figure { (figure) } (detail) } }
}

async fn overview(With(state): With<State>) -> Html<String> {
    let v = overview_values(&state);
    let value = |key: &str| html! { span data-key=(key) { (v.get(key).map(String::as_str).unwrap_or("-")) } };
    let status = admin::node_status(&state);
    let mut by_state: BTreeMap<&str, usize> = BTreeMap::new();
    for p in &status.pods {
        *by_state.entry(p.state.as_str()).or_default() += 1;
    }
    let failures = state.proxy.telemetry.handshake_failures();
    let body = html! {
        section.cards {
            (card("Handshake failures", value("handshake_failures"), html! {}))
            (card("Denied connections", value("denied"), html! {
                p { "dry-run denials (let through): " (value("dry_run_denied")) "; allowed: " (value("allowed")) }
            }))
            (card("Soonest certificate expiry", value("expiry"), html! {
                p { (value("expiry_at")) }
                p.id { (value("expiry_identity")) }
            }))
            @for (span, key) in [("5 min", "5m"), ("hour", "1h")] {
                (card(&format!("mTLS share, last {span}"), value(&format!("mtls_connections_{key}")), html! {
                    p {
                        "of " (value(&format!("connections_{key}"))) " connections; of bytes: "
                        (value(&format!("mtls_bytes_{key}")))
                    }
                }))
            }
            (card("Agent restarts", value("restarts"), html! {
                p { "hand-overs without a dropped connection; this agent started " (value("started")) }
            }))
        }
        h2 { "Pods" }
        table {
            thead { tr { th { "state" } th { "pods" } } }
            tbody { @for (s, n) in &by_state { tr { td { (s) } td.num { (n) } } } }
        }
        @if let Some(why) = &status.refused_update {
            p.warning { "The newest workload update was refused; the last good state serves: " (why) }
        }
        @if !status.policy_problems.is_empty() {
            h2 { "Policies not enforced as written" }
            table {
                thead { tr { th { "kind" } th { "policy" } th { "state" } th { "what" } } }
                tbody {
                    @for o in &status.policy_problems {
                        tr { td { (o.kind) } td { (o.policy) } td { (o.enforcement.state()) } td { (o.enforcement.summary()) } }
                    }
                }
            }
        }
        h2 { "Handshake failures by reason" }
        @if failures.is_empty() { p { "None." } } @else {
            table {
                thead { tr { th { "side" } th { "reason" } th { "failures" } } }
                tbody { @for ((side, reason), n) in &failures { tr { td { (side) } td { (reason) } td.num { (n) } } } }
            }
        }
    };
    page(&state, "Overview", Some("overview"), body)
}

async fn workloads(With(state): With<State>) -> Html<String> {
    let status = admin::node_status(&state);
    let dir = state.proxy.store.load();
    let now = seconds(SystemTime::now());
    let body = html! {
        p { "Every pod of this node, and what the agent holds for it. Keys never leave the agent." }
        table #workloads {
            thead { tr {
                th { "pod" } th { "SPIFFE ID" } th { "state" } th { "mode" } th { "certificate serial" }
                th { "not after" } th { "last rotation" } th.num { "live connections" }
            } }
            tbody {
                @for p in &status.pods {
                    @let mode = dir.get(&p.pod).filter(|w| w.mesh).map(|w| dir.policy_for(w).mode.to_string());
                    tr.{ "state-" (p.state.as_str()) } {
                        td { (p.pod) }
                        td.id { @if p.state == PodState::OutsideMesh { "-" } @else { (p.identity) } }
                        td {
                            (p.state.as_str())
                            @if let Some(e) = &p.last_error { br; small { (e) " (attempt " (p.attempts) ")" } }
                        }
                        td { (mode.as_deref().unwrap_or("-")) }
                        @match &p.certificate {
                            Some(c) => {
                                td.mono { (c.serial) }
                                td.not-after { (time(c.not_after)) br; small { (relative(c.not_after, now)) } }
                                td { (time(c.installed)) br; small { (relative(c.installed, now)) ", renewal " (c.generation) } }
                            }
                            None => { td { "-" } td { "-" } td { "-" } }
                        }
                        td.num { (p.connections.map(|c| c.to_string()).unwrap_or_else(|| "-".into())) }
                    }
                }
            }
        }
    };
    page(&state, "Workloads", None, body)
}

/// A flow as the tables show it, cell by cell (the page and its live event share this).
#[derive(Serialize)]
struct FlowRow {
    seq: u64,
    verdict: &'static str,
    cells: Vec<String>,
    /// The why-denied view of a denied flow.
    why: Option<String>,
}

const FLOW_COLUMNS: [&str; 11] = [
    "ended",
    "direction",
    "source",
    "source workload",
    "destination",
    "port",
    "transport",
    "verdict",
    "policy, rule",
    "bytes sent / received",
    "duration",
];

fn workload(namespace: &str, name: &str) -> String {
    match (namespace, name) {
        ("unknown", "unknown") => "-".into(),
        _ => format!("{namespace}/{name}"),
    }
}

fn rule(policy: &str, rule: i64, reason: &str) -> String {
    match (policy.is_empty(), rule) {
        (false, r) if r >= 0 => format!("{policy} rules[{r}]"),
        (false, _) => policy.to_string(),
        (true, _) if !reason.is_empty() => reason.to_string(),
        _ => "-".into(),
    }
}

/// The why-denied link of a denied inbound flow: the source, the pod's address, the port.
fn why_link(source: &str, destination: Option<std::net::IpAddr>, port: u16, verdict: &str) -> Option<String> {
    if !matches!(verdict, "deny" | "dry_run_deny") {
        return None;
    }
    let to = destination?.to_string();
    let q = serde_urlencoded::to_string([("from", source), ("to", &to), ("port", &port.to_string())]).ok()?;
    Some(format!("/why-denied?{q}"))
}

fn flow_row(seq: u64, f: &Flow) -> FlowRow {
    FlowRow {
        seq,
        verdict: f.verdict,
        cells: vec![
            time(f.at_ms / 1000),
            f.direction.to_string(),
            f.source.to_string(),
            workload(&f.source_namespace, &f.source_workload),
            workload(&f.destination_namespace, &f.destination_workload),
            f.port.to_string(),
            f.transport.to_string(),
            f.verdict.to_string(),
            rule(&f.policy, f.rule, &f.reason),
            format!("{} / {}", f.bytes_sent, f.bytes_recv),
            format!("{} ms", f.duration_ms),
        ],
        why: why_link(&f.source, f.destination_addr, f.port, f.verdict),
    }
}

fn flow_tr(row: &FlowRow) -> Markup {
    html! {
        tr.{ "verdict-" (row.verdict) } data-seq=(row.seq) {
            @for c in &row.cells { td { (c) } }
            td { @if let Some(why) = &row.why { a href=(why) { "why denied" } } }
        }
    }
}

async fn flows(With(state): With<State>, Query(q): Query<FlowQuery>) -> Response {
    if let Err(e) = q.check() {
        return (StatusCode::BAD_REQUEST, e).into_response();
    }
    let table = state.proxy.telemetry.flows.lock();
    let (capacity, total) = (table.capacity(), table.total);
    let recent = table.since(0, usize::MAX);
    let aggregates = table.aggregates_unsorted();
    drop(table);
    let rows: Vec<FlowRow> =
        recent.iter().rev().filter(|(_, f)| q.keeps(f)).take(ROWS).map(|(n, f)| flow_row(*n, f)).collect();
    let mut aggregates: Vec<Aggregate> = aggregates.into_iter().filter(|a| q.keeps_aggregate(a)).collect();
    aggregates.sort_by_key(|a| std::cmp::Reverse(a.seen.last_ms));
    aggregates.truncate(ROWS);
    let field = |name: &'static str, label: &'static str, value: &Option<String>, hint: &'static str| {
        html! { label { (label) " " input name=(name) value=(value.as_deref().unwrap_or("")) placeholder=(hint); } }
    };
    let body = html! {
        form.filters method="get" action="/flows" {
            (field("namespace", "namespace", &q.namespace, "default"))
            (field("identity", "identity", &q.identity, "spiffe://… or an address"))
            (field("verdict", "verdict", &q.verdict, "allow, deny, dry_run_deny, carried, failed, refused"))
            (field("transport", "transport", &q.transport, "hbone, plaintext, passthrough"))
            button type="submit" { "Filter" }
            @if !q.is_empty() { " " a href="/flows" { "clear" } }
        }
        @if capacity == 0 {
            p.warning { "The flow table is off (--flow-table 0)." }
        } @else {
            p { (total) " flows since the agent started; the table holds the last " (capacity) ". Newest first." }
        }
        h2 { "Recent flows" }
        table #recent data-seq=(total) {
            thead { tr { @for c in FLOW_COLUMNS { th { (c) } } th { "" } } }
            tbody { @for row in &rows { (flow_tr(row)) } }
        }
        h2 { "By source, destination, port, transport and verdict" }
        table #aggregates {
            thead { tr {
                th { "source" } th { "destination" } th { "port" } th { "transport" } th { "verdict" }
                th { "policy, rule" } th.num { "connections" } th.num { "bytes" } th { "first seen" } th { "last seen" }
            } }
            tbody {
                @for a in &aggregates {
                    tr.{ "verdict-" (a.key.verdict) } {
                        td { (a.key.source) } td { (workload(&a.key.destination_namespace, &a.key.destination_workload)) }
                        td { (a.key.port) } td { (a.key.transport) } td { (a.key.verdict) } td { (rule(&a.key.policy, a.key.rule, &a.seen.reason)) }
                        td.num { (a.seen.connections) } td.num { (a.seen.bytes) }
                        td { (time(a.seen.first_ms / 1000)) } td { (time(a.seen.last_ms / 1000)) }
                    }
                }
            }
        }
    };
    page(&state, "Flows", Some("flows"), body).into_response()
}

async fn policy(With(state): With<State>) -> Html<String> {
    let dir = state.proxy.store.load();
    let settings = &dir.policies.settings;
    let aggregates = state.proxy.telemetry.flows.lock().aggregates_unsorted();
    let mut pods: Vec<_> = dir.local_pods().filter(|w| w.mesh).cloned().collect();
    pods.sort_by_key(|a| a.key.to_string());
    let body = html! {
        p {
            "Root namespace " strong { (settings.root_namespace) } ". "
            @if settings.dry_run { strong { "Dry run: denials are logged and counted, not enforced. " } }
            "What happened comes from the flow table (the connections it still holds)."
        }
        @for w in &pods {
            @let p = dir.policy_for(w);
            @let mine: Vec<&Aggregate> = aggregates.iter().filter(|a| a.key.direction == "inbound" && is_pod(a, w)).collect();
            section.workload {
                h2 { (w.key) }
                p { span.id { (w.identity) } " · mode " strong { (p.mode.to_string()) }
                    @for (port, m) in &p.port_modes { " · port " (port) ": " (m.as_str()) } }
                @let policies = p.policies();
                @if policies.is_empty() {
                    p { "No AuthorizationPolicy selects it: every authenticated source is allowed." }
                } @else {
                    table.policies {
                        thead { tr { th { "policy" } th { "action" } th { "rule" } th.num { "connections it decided" } th { "" } } }
                        tbody {
                            @for s in &policies {
                                @let name = s.policy.to_string();
                                @for r in 0..s.rules.max(1) {
                                    @let used: u64 = mine.iter().filter(|a| *a.key.policy == *name && a.key.rule == r as i64).map(|a| a.seen.connections).sum();
                                    tr {
                                        td { (name) @if let Some(c) = &s.caveat { br; small.warning { (c) } } }
                                        td { (s.action) }
                                        td { @if s.rules == 0 { "(no rules)" } @else { "rules[" (r) "]" } }
                                        td.num { (used) }
                                        td { @if used == 0 && s.action == "ALLOW" && s.rules > 0 { span.unused { "never used" } } }
                                    }
                                }
                            }
                        }
                    }
                }
                @let denied: Vec<&&Aggregate> = mine.iter().filter(|a| matches!(a.key.verdict, "deny" | "dry_run_deny")).collect();
                h3 { "Denied attempts" }
                @if denied.is_empty() { p { "None held." } } @else {
                    table.denied {
                        thead { tr { th { "source" } th { "port" } th { "transport" } th { "decided by" } th.num { "connections" } th { "last seen" } th { "" } } }
                        tbody {
                            @for a in &denied {
                                tr {
                                    td { (a.key.source) } td { (a.key.port) } td { (a.key.transport) }
                                    td { (rule(&a.key.policy, a.key.rule, &a.seen.reason)) } td.num { (a.seen.connections) }
                                    td { (time(a.seen.last_ms / 1000)) }
                                    td { @if let Some(why) = why_link(&a.key.source, a.key.destination_addr.or(w.ips.first().copied()), a.key.port, a.key.verdict) { a href=(why) { "why denied" } } }
                                }
                            }
                        }
                    }
                }
                @if p.mode.mode == Mode::Permissive || p.port_modes.values().any(|m| *m == Mode::Permissive) {
                    @let plain: Vec<&&Aggregate> = mine.iter()
                        .filter(|a| a.key.transport == "plaintext" && a.key.verdict == "allow" && p.mode_for(a.key.port) == Mode::Permissive)
                        .collect();
                    h3 { "Plaintext sources STRICT would cut" }
                    @if plain.is_empty() { p { "None held: STRICT would refuse no source seen." } } @else {
                        table.plaintext {
                            thead { tr { th { "source" } th { "port" } th.num { "connections" } th { "last seen" } } }
                            tbody { @for a in &plain { tr { td { (a.key.source) } td { (a.key.port) } td.num { (a.seen.connections) } td { (time(a.seen.last_ms / 1000)) } } } }
                        }
                    }
                }
            }
        }
        @if pods.is_empty() { p { "No pod of this node is in the mesh." } }
    };
    page(&state, "Policy", None, body)
}

/// Whether `a` is a connection to the pod `w` (by its address; by its workload's name when the
/// flow has no address).
fn is_pod(a: &Aggregate, w: &crate::workloads::Workload) -> bool {
    match a.key.destination_addr {
        Some(ip) => w.ips.iter().any(|p| canonical(*p) == canonical(ip)),
        None => {
            let party = crate::telemetry::Party::pod(w);
            *a.key.destination_namespace == *party.namespace && *a.key.destination_workload == *party.workload
        }
    }
}

/// The why-denied view's question, as the links give it.
#[derive(Debug, Deserialize)]
struct WhyQuery {
    from: String,
    to: String,
    port: u16,
}

async fn why_denied(With(state): With<State>, Query(q): Query<WhyQuery>) -> Response {
    if q.from.len() > 512 || q.to.len() > 512 {
        return (StatusCode::BAD_REQUEST, "a parameter longer than 512 bytes\n").into_response();
    }
    let question = Question { from: q.from, to: q.to, port: q.port };
    let body = match admin::explain(&state.proxy.store.load(), &question) {
        Ok(e) => html! {
            p.{ "verdict-" (e.decision) } {
                "Asked now, against the policy in force: " strong { (e.decision) } "."
            }
            table.explain {
                tbody {
                    tr { th { "from" } td { (e.from) } }
                    tr { th { "to" } td { (e.to) } }
                    tr { th { "port" } td { (e.port) } }
                    tr { th { "transport" } td { (e.transport) } }
                    tr { th { "mode" } td { (e.mode) } }
                    tr { th { "decided" } td { (e.reason) } }
                    tr { th { "policy" } td { (e.policy.as_deref().unwrap_or("-")) } }
                    tr { th { "rule" } td { (e.rule.map(|r| format!("rules[{r}]")).unwrap_or_else(|| "-".into())) } }
                }
            }
            h2 { "As " code { "meshless policy explain" } " says it" }
            pre #explain { (e.long()) }
        },
        Err(e) => html! { p.warning { "Cannot explain it: " (e.to_string()) } },
    };
    page(&state, "Why denied", None, body).into_response()
}

/// `/api/events?view=overview|flows[&filters][&after=seq]`.
#[derive(Debug, Deserialize)]
struct EventsQuery {
    view: String,
    /// The newest flow the page shows (a string: numbers do not survive `flatten`).
    #[serde(default)]
    after: Option<String>,
    #[serde(flatten)]
    filter: FlowQuery,
}

async fn events(With(state): With<State>, headers: HeaderMap, Query(q): Query<EventsQuery>) -> Response {
    if let Err(e) = q.filter.check() {
        return (StatusCode::BAD_REQUEST, e).into_response();
    }
    let overview = match q.view.as_str() {
        "overview" => true,
        "flows" => false,
        _ => return (StatusCode::BAD_REQUEST, "view is overview or flows\n").into_response(),
    };
    let Ok(permit) = state.streams.clone().try_acquire_owned() else {
        return (StatusCode::SERVICE_UNAVAILABLE, "too many live views open; the pages still read without them\n")
            .into_response();
    };
    // A reconnecting browser says where it was.
    let resumed = headers.get("last-event-id").and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok());
    let after = resumed.or(q.after.and_then(|a| a.parse().ok())).unwrap_or(0);
    let tick = if overview { Duration::from_secs(2) } else { Duration::from_secs(1) };
    let live =
        Live { state, filter: q.filter, after, overview, tick, opened: Instant::now(), yielded: None, _permit: permit };
    // A comment every 5 s when there is nothing to say: a reader gone is noticed by then.
    let keep_alive = KeepAlive::new().interval(Duration::from_secs(5));
    Sse::new(futures_util::stream::unfold(live, Live::next)).keep_alive(keep_alive).into_response()
}

/// One live stream's state.
struct Live {
    state: State,
    filter: FlowQuery,
    /// The newest flow sent.
    after: u64,
    overview: bool,
    tick: Duration,
    opened: Instant,
    /// When the last event was handed to the writer.
    yielded: Option<Instant>,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl Live {
    async fn next(mut self) -> Option<(Result<Event, Infallible>, Live)> {
        loop {
            // Polled again only once the last event was written: a reader that stops reading
            // holds it up, and is dropped.
            if self.yielded.is_some_and(|at| at.elapsed() > self.tick + SLOW_READER)
                || self.opened.elapsed() > STREAM_LIFETIME
            {
                return None;
            }
            if self.yielded.is_some() {
                tokio::time::sleep(self.tick).await;
            }
            self.yielded = Some(Instant::now());
            let event = if self.overview {
                let values = overview_values(&self.state);
                Event::default().event("overview").json_data(values).ok()?
            } else {
                let flows = self.state.proxy.telemetry.flows.lock().since(self.after, FLOWS_PER_EVENT);
                let Some((newest, _)) = flows.last() else { continue };
                self.after = *newest;
                let rows: Vec<FlowRow> =
                    flows.iter().filter(|(_, f)| self.filter.keeps(f)).map(|(n, f)| flow_row(*n, f)).collect();
                if rows.is_empty() {
                    continue;
                }
                Event::default().event("flows").id(self.after.to_string()).json_data(rows).ok()?
            };
            return Some((Ok(event), self));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_read_as_people_say_them() {
        assert_eq!(time(0), "1970-01-01T00:00:00Z");
        assert_eq!(relative(100, 40), "in 1m 0s");
        assert_eq!(relative(40, 100), "1m 0s ago");
        assert_eq!(relative(100_000, 0), "in 1d 3h");
        assert_eq!(percent(1, 3), "33.3 %");
        assert_eq!(percent(0, 0), "no traffic");
    }

    #[test]
    fn only_denied_flows_with_a_destination_link_to_why_denied_and_the_link_is_encoded() {
        let ip = Some("10.0.0.2".parse().unwrap());
        assert_eq!(
            why_link("spiffe://td/ns/a b/sa/x&y", ip, 80, "deny").as_deref(),
            Some("/why-denied?from=spiffe%3A%2F%2Ftd%2Fns%2Fa+b%2Fsa%2Fx%26y&to=10.0.0.2&port=80")
        );
        assert_eq!(why_link("10.0.0.1", ip, 80, "allow"), None);
        assert_eq!(why_link("10.0.0.1", None, 80, "deny"), None);
        assert_eq!(rule("ns/p", 2, "x"), "ns/p rules[2]");
        assert_eq!(rule("", -1, "no ALLOW matched"), "no ALLOW matched");
    }
}
