//! Telemetry of the data path: connection metrics with Istio's names and labels (ztunnel's TCP
//! metrics, so Istio's ztunnel and mesh dashboards and Kiali read them unchanged), meshless's own
//! metrics, and the access log (one JSON line per connection when it ends, rate limited).
//!
//! A connection holds a [`Conn`]: a pointer to the counters of its label set (interned: one set
//! per distinct label values, shared by every connection that has them) and what its access log
//! line needs. Opening counts `istio_tcp_connections_opened`; the end counts the closed
//! connection and its bytes, writes the line and records the flow ([`crate::flows`]). No address
//! or port is ever a label; label sets whose pods are gone are dropped once no connection holds
//! them.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;

use crate::flows::{Flow, FlowTable};
use crate::workloads::{Directory, Workload};

/// The value of a label meshless does not know.
const UNKNOWN: &str = "unknown";

/// Connection label sets a node keeps at most (each is four series).
const MAX_LABEL_SETS: usize = 20_000;

/// Which side of a connection reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reporter {
    /// The caller's node.
    Source,
    /// The callee's node.
    Destination,
}

impl Reporter {
    fn as_str(self) -> &'static str {
        match self {
            Reporter::Source => "source",
            Reporter::Destination => "destination",
        }
    }

    fn direction(self) -> &'static str {
        match self {
            Reporter::Source => "outbound",
            Reporter::Destination => "inbound",
        }
    }
}

/// One end of a connection, as labels: the workload, its namespace and SPIFFE ID.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Party {
    pub workload: Arc<str>,
    pub namespace: Arc<str>,
    pub principal: Arc<str>,
}

impl Party {
    /// A pod: its workload name (Istio's canonical name label, else `app.kubernetes.io/name`,
    /// else `app`, else the pod's name), namespace and SPIFFE ID (`unknown` outside the mesh).
    pub fn pod(w: &Workload) -> Party {
        let name = ["service.istio.io/canonical-name", "app.kubernetes.io/name", "app"]
            .iter()
            .find_map(|l| w.labels.get(*l))
            .unwrap_or(&w.key.name);
        let principal: Arc<str> = if w.mesh { w.identity.to_string().into() } else { UNKNOWN.into() };
        Party { workload: name.as_str().into(), namespace: w.key.namespace.as_str().into(), principal }
    }

    /// A peer meshless knows nothing of (a plaintext source outside the cluster's pods).
    pub fn unknown() -> Party {
        Party { workload: UNKNOWN.into(), namespace: UNKNOWN.into(), principal: UNKNOWN.into() }
    }

    /// An authenticated peer: the pod if the directory has it, its SPIFFE ID in any case.
    pub fn peer(pod: Option<&Workload>, principal: &str) -> Party {
        let mut p = pod.map(Party::pod).unwrap_or_else(Party::unknown);
        p.principal = principal.into();
        p
    }
}

/// How a connection was carried, for `connection_security_policy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Security {
    MutualTls,
    None,
}

impl Security {
    fn as_str(self) -> &'static str {
        match self {
            Security::MutualTls => "mutual_tls",
            Security::None => "none",
        }
    }
}

/// Istio's `response_flags` for TCP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Flags {
    /// Carried.
    None,
    /// Refused by policy (or the mode).
    Deny,
    /// The upstream could not be reached.
    Connect,
    /// TLS with the peer failed.
    TlsFailure,
}

impl Flags {
    fn as_str(self) -> &'static str {
        match self {
            Flags::None => "-",
            Flags::Deny => "DENY",
            Flags::Connect => "CONNECT",
            Flags::TlsFailure => "TLS_FAILURE",
        }
    }
}

/// A connection's label set.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ConnLabels {
    pub reporter: Reporter,
    pub source: Party,
    pub destination: Party,
    /// `<name>.<namespace>.svc.cluster.local` of the Service called, when one was.
    pub service: Option<Arc<str>>,
    pub flags: Flags,
    pub security: Security,
}

impl ConnLabels {
    fn encode(&self) -> [(&'static str, &str); 13] {
        let security = self.security.as_str();
        [
            ("reporter", self.reporter.as_str()),
            ("source_workload", &self.source.workload),
            ("source_workload_namespace", &self.source.namespace),
            ("source_principal", &self.source.principal),
            ("source_canonical_service", &self.source.workload),
            ("destination_workload", &self.destination.workload),
            ("destination_workload_namespace", &self.destination.namespace),
            ("destination_principal", &self.destination.principal),
            ("destination_canonical_service", &self.destination.workload),
            ("destination_service", self.service.as_deref().unwrap_or(UNKNOWN)),
            ("request_protocol", "tcp"),
            ("response_flags", self.flags.as_str()),
            ("connection_security_policy", security),
        ]
    }
}

#[derive(Debug, Default)]
struct ConnCounters {
    opened: AtomicU64,
    closed: AtomicU64,
    /// Bytes from the source to the destination, and back.
    sent: AtomicU64,
    received: AtomicU64,
}

/// What an access log line says beyond the labels.
#[derive(Debug, Default)]
pub struct Detail {
    pub src_addr: Option<SocketAddr>,
    pub dst_addr: Option<SocketAddr>,
    /// `hbone`, `plaintext` (steered to the destination's agent) or `passthrough`.
    pub transport: &'static str,
    /// The destination's mode for the port (inbound).
    pub mode: Option<&'static str>,
    /// `allow`, `deny` or `dry_run_deny` (inbound).
    pub decision: Option<&'static str>,
    pub policy: Option<String>,
    pub rule: Option<i64>,
    pub reason: Option<String>,
}

/// How a connection ended, for the access log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Both directions finished with FIN.
    Fin,
    /// Reset (by a side, or at the drain deadline).
    Rst,
    /// Never carried: refused, or its upstream failed.
    Error,
}

impl End {
    fn as_str(self) -> &'static str {
        match self {
            End::Fin => "FIN",
            End::Rst => "RST",
            End::Error => "error",
        }
    }
}

/// One connection being carried: counted opened when made, closed (with its bytes) by
/// [`Conn::close`] or, if dropped unclosed, as an error.
pub struct Conn {
    telemetry: Arc<Telemetry>,
    labels: Arc<ConnLabels>,
    counters: Arc<ConnCounters>,
    detail: Detail,
    started: Instant,
    closed: bool,
}

impl Conn {
    /// Ends it: `sent` bytes from source to destination, `received` back.
    pub fn close(mut self, sent: u64, received: u64, end: End) {
        self.finish(sent, received, end);
    }

    /// Ends it as refused by the peer (its CONNECT answered with an error status).
    pub fn refused_by_peer(mut self, why: String) {
        self.detail.decision = Some("refused");
        self.detail.reason = Some(why);
        self.finish(0, 0, End::Rst);
    }

    fn finish(&mut self, sent: u64, received: u64, end: End) {
        if std::mem::replace(&mut self.closed, true) {
            return;
        }
        let c = &self.counters;
        c.closed.fetch_add(1, Ordering::Relaxed);
        c.sent.fetch_add(sent, Ordering::Relaxed);
        c.received.fetch_add(received, Ordering::Relaxed);
        let took = self.started.elapsed();
        self.telemetry.access.log(&self.labels, &self.detail, sent, received, took, end);
        self.telemetry.flows.lock().record(self.flow(sent, received, took, end));
    }

    fn flow(&self, sent: u64, received: u64, took: Duration, end: End) -> Flow {
        let (l, d) = (&*self.labels, &self.detail);
        // A plaintext source is its address; any other end, its SPIFFE ID (or its address when
        // it has none).
        let name = |p: &Party, addr: Option<SocketAddr>, plain: bool| -> Arc<str> {
            match addr {
                Some(a) if plain || &*p.principal == UNKNOWN => a.ip().to_string().into(),
                _ => p.principal.clone(),
            }
        };
        let plain_source = l.security == Security::None && l.reporter == Reporter::Destination;
        let empty: Arc<str> = Arc::from("");
        Flow {
            at_ms: unix_seconds_ms(SystemTime::now()),
            direction: l.reporter.direction(),
            source: name(&l.source, d.src_addr, plain_source),
            source_workload: l.source.workload.clone(),
            source_namespace: l.source.namespace.clone(),
            destination: name(&l.destination, d.dst_addr, false),
            destination_workload: l.destination.workload.clone(),
            destination_namespace: l.destination.namespace.clone(),
            destination_addr: d.dst_addr.map(|a| a.ip()),
            port: d.dst_addr.map(|a| a.port()).unwrap_or(0),
            transport: d.transport,
            verdict: d.decision.unwrap_or(if end == End::Error { "failed" } else { "carried" }),
            policy: d.policy.as_deref().map(Arc::from).unwrap_or_else(|| empty.clone()),
            rule: d.rule.unwrap_or(-1),
            reason: d.reason.as_deref().map(Arc::from).unwrap_or(empty),
            bytes_sent: sent,
            bytes_recv: received,
            duration_ms: took.as_millis() as u64,
        }
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.finish(0, 0, End::Error);
    }
}

/// The access log's rate limit: a token bucket.
#[derive(Debug, Clone, Copy)]
pub struct AccessLogLimits {
    /// Lines per second (0: no access log).
    pub rate: u32,
    pub burst: u32,
}

impl Default for AccessLogLimits {
    fn default() -> Self {
        AccessLogLimits { rate: 1_000, burst: 10_000 }
    }
}

struct AccessLog {
    limits: AccessLogLimits,
    bucket: Mutex<(f64, Instant)>,
    written: AtomicU64,
    dropped: AtomicU64,
}

impl AccessLog {
    fn new(limits: AccessLogLimits) -> AccessLog {
        AccessLog {
            limits,
            bucket: Mutex::new((f64::from(limits.burst), Instant::now())),
            written: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        }
    }

    /// Takes a token; `false` (and the drop counted) when the bucket is empty.
    fn admit(&self) -> bool {
        if self.limits.rate == 0 {
            return false;
        }
        let mut b = self.bucket.lock();
        let now = Instant::now();
        let refill = now.duration_since(b.1).as_secs_f64() * f64::from(self.limits.rate);
        *b = ((b.0 + refill).min(f64::from(self.limits.burst)), now);
        if b.0 >= 1.0 {
            b.0 -= 1.0;
            true
        } else {
            false
        }
    }

    fn log(&self, l: &ConnLabels, d: &Detail, sent: u64, received: u64, took: Duration, end: End) {
        // A log filter that leaves the access log out: nothing written, nothing counted.
        if !tracing::enabled!(target: "access", tracing::Level::INFO) {
            return;
        }
        if !self.admit() {
            if self.limits.rate > 0 {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
            return;
        }
        self.written.fetch_add(1, Ordering::Relaxed);
        let addr = |a: Option<SocketAddr>| a.map(|a| a.to_string()).unwrap_or_default();
        let (src_addr, dst_addr) = (addr(d.src_addr), addr(d.dst_addr));
        let (src, dst) = (&l.source, &l.destination);
        let service = l.service.as_deref().unwrap_or("");
        let security = l.security.as_str();
        let duration = format!("{}ms", took.as_millis());
        let (mode, decision) = (d.mode.unwrap_or(""), d.decision.unwrap_or(""));
        let (policy, rule, reason) =
            (d.policy.as_deref().unwrap_or(""), d.rule.unwrap_or(-1), d.reason.as_deref().unwrap_or(""));
        // ztunnel's field names; bytes sent from the source to the destination, and back.
        tracing::event!(
            target: "access",
            tracing::Level::INFO,
            src.addr = src_addr,
            src.identity = &*src.principal,
            src.workload = &*src.workload,
            src.namespace = &*src.namespace,
            dst.addr = dst_addr,
            dst.identity = &*dst.principal,
            dst.workload = &*dst.workload,
            dst.namespace = &*dst.namespace,
            dst.service = service,
            direction = l.reporter.direction(),
            bytes_sent = sent,
            bytes_recv = received,
            duration,
            transport = d.transport,
            security,
            mode,
            decision,
            policy,
            rule,
            reason,
            response_flags = l.flags.as_str(),
            end = end.as_str(),
            "connection complete"
        );
    }
}

/// Handshakes by side, with their failures by reason.
#[derive(Default)]
struct Handshakes {
    /// (side, reason) → failures.
    failures: Mutex<HashMap<(&'static str, &'static str), u64>>,
    /// side → (count, total seconds, bucket counts).
    durations: Mutex<HashMap<&'static str, Histogram>>,
}

/// Handshake duration buckets, in seconds.
const BUCKETS: [f64; 10] = [0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 1.0];

#[derive(Default, Clone)]
struct Histogram {
    count: u64,
    sum: f64,
    buckets: [u64; BUCKETS.len()],
}

/// The agent's telemetry: one per agent, shared by the data path.
pub struct Telemetry {
    conns: Mutex<HashMap<Arc<ConnLabels>, Arc<ConnCounters>>>,
    /// Connections whose new label set was not kept (the cap was reached).
    overflow: AtomicU64,
    access: AccessLog,
    /// The last flows and their aggregates.
    pub flows: Mutex<FlowTable>,
    handshakes: Handshakes,
    /// Whether connection metrics and the access log are kept at all.
    enabled: bool,
}

impl Telemetry {
    pub fn new(enabled: bool, access: AccessLogLimits, flows: usize) -> Arc<Telemetry> {
        let access = if enabled { access } else { AccessLogLimits { rate: 0, burst: 0 } };
        Arc::new(Telemetry {
            conns: Mutex::default(),
            overflow: AtomicU64::new(0),
            access: AccessLog::new(access),
            flows: Mutex::new(FlowTable::new(if enabled { flows } else { 0 })),
            handshakes: Handshakes::default(),
            enabled,
        })
    }

    /// A connection opened with `labels`; `None` when telemetry is off.
    pub fn open(self: &Arc<Self>, labels: ConnLabels, detail: Detail) -> Option<Conn> {
        if !self.enabled {
            return None;
        }
        let counters = {
            let mut conns = self.conns.lock();
            match conns.get_key_value(&labels) {
                Some((l, c)) => (l.clone(), c.clone()),
                None => {
                    let (l, c) = (Arc::new(labels), Arc::new(ConnCounters::default()));
                    // Beyond the cap a new label set is not kept (its connection is still logged
                    // and in the flow table): counted, so the cap is visible.
                    if conns.len() < MAX_LABEL_SETS {
                        conns.insert(l.clone(), c.clone());
                    } else {
                        self.overflow.fetch_add(1, Ordering::Relaxed);
                    }
                    (l, c)
                }
            }
        };
        counters.1.opened.fetch_add(1, Ordering::Relaxed);
        Some(Conn {
            telemetry: self.clone(),
            labels: counters.0,
            counters: counters.1,
            detail,
            started: Instant::now(),
            closed: false,
        })
    }

    /// A connection that was never carried (refused, or its upstream failed): opened and closed.
    pub fn refused(self: &Arc<Self>, labels: ConnLabels, detail: Detail) {
        if let Some(c) = self.open(labels, detail) {
            c.close(0, 0, End::Error);
        }
    }

    /// A TLS handshake on `side` (`client`, `server`) that took `took`, or failed for `reason`.
    /// Handshake failures so far, by (side, reason).
    pub fn handshake_failures(&self) -> Vec<((&'static str, &'static str), u64)> {
        let mut out: Vec<_> = self.handshakes.failures.lock().iter().map(|(k, n)| (*k, *n)).collect();
        out.sort();
        out
    }

    pub fn handshake(&self, side: &'static str, result: Result<Duration, &'static str>) {
        match result {
            Ok(took) => {
                let mut d = self.handshakes.durations.lock();
                let h = d.entry(side).or_default();
                let s = took.as_secs_f64();
                h.count += 1;
                h.sum += s;
                if let Some(i) = BUCKETS.iter().position(|b| s <= *b) {
                    h.buckets[i] += 1;
                }
            }
            Err(reason) => *self.handshakes.failures.lock().entry((side, reason)).or_default() += 1,
        }
    }

    /// Drops label sets of pods no longer in `dir` that no connection holds.
    pub fn forget_gone(&self, dir: &Directory) {
        if self.conns.lock().is_empty() {
            return;
        }
        // Built before the lock is taken: connections open meanwhile.
        let known: HashSet<(Arc<str>, Arc<str>)> = dir
            .pods()
            .map(|w| {
                let p = Party::pod(w);
                (p.namespace, p.workload)
            })
            .collect();
        let services: HashSet<Arc<str>> = dir.services.keys().map(|k| service_host(&k.namespace, &k.name)).collect();
        let here = |p: &Party| &*p.workload == UNKNOWN || known.contains(&(p.namespace.clone(), p.workload.clone()));
        let service = |s: &Option<Arc<str>>| s.as_ref().is_none_or(|s| services.contains(s));
        self.conns.lock().retain(|l, c| {
            Arc::strong_count(c) > 1 || (here(&l.source) && here(&l.destination) && service(&l.service))
        });
    }

    /// The metrics, in the OpenMetrics text format, with the node's `extra` families.
    pub fn render(&self, extra: Vec<Family>) -> String {
        let mut families = Vec::new();
        families.push(Family::gauge(
            "istio_build",
            "Build of the component.",
            vec![(vec![("component", "meshless".into()), ("tag", env!("CARGO_PKG_VERSION").into())], 1)],
        ));
        let conns: Vec<(Arc<ConnLabels>, Arc<ConnCounters>)> =
            self.conns.lock().iter().map(|(l, c)| (l.clone(), c.clone())).collect();
        type Pick = fn(&ConnCounters) -> u64;
        let tcp: [(&str, &str, Pick); 4] = [
            ("istio_tcp_connections_opened", "TCP connections opened.", |c| c.opened.load(Ordering::Relaxed)),
            ("istio_tcp_connections_closed", "TCP connections closed.", |c| c.closed.load(Ordering::Relaxed)),
            ("istio_tcp_sent_bytes", "Bytes sent from source to destination.", |c| c.sent.load(Ordering::Relaxed)),
            ("istio_tcp_received_bytes", "Bytes sent from destination to source.", |c| {
                c.received.load(Ordering::Relaxed)
            }),
        ];
        for (name, help, pick) in tcp {
            let samples = conns
                .iter()
                .map(|(l, c)| (l.encode().iter().map(|(k, v)| (*k, String::from(*v))).collect(), pick(c)))
                .collect();
            families.push(Family::counter(name, help, samples));
        }
        let failures: Vec<_> = self
            .handshakes
            .failures
            .lock()
            .iter()
            .map(|((side, reason), n)| (vec![("side", side.to_string()), ("reason", reason.to_string())], *n))
            .collect();
        families.push(Family::counter(
            "meshless_tls_handshake_failures",
            "TLS handshakes of the tunnel that failed, by side and reason.",
            failures,
        ));
        let durations = self.handshakes.durations.lock().clone();
        let access = &self.access;
        families.push(Family::counter(
            "meshless_metric_label_sets_overflow",
            "Connections whose label set was not kept: the node holds as many as it may.",
            vec![(vec![], self.overflow.load(Ordering::Relaxed))],
        ));
        families.push(Family::counter(
            "meshless_access_log_lines",
            "Access log lines written.",
            vec![(vec![], access.written.load(Ordering::Relaxed))],
        ));
        families.push(Family::counter(
            "meshless_access_log_dropped",
            "Access log lines dropped by the rate limit.",
            vec![(vec![], access.dropped.load(Ordering::Relaxed))],
        ));
        families.extend(extra);
        let mut out = String::new();
        let collector = Snapshot { families, durations };
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register_collector(Box::new(collector));
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
        out
    }
}

/// Labels of one sample.
pub type Labels = Vec<(&'static str, String)>;

/// One metric family of a scrape.
#[derive(Debug)]
pub struct Family {
    name: &'static str,
    help: &'static str,
    kind: MetricType,
    samples: Vec<(Labels, i64)>,
}

impl Family {
    pub fn counter(name: &'static str, help: &'static str, samples: Vec<(Labels, u64)>) -> Family {
        let samples = samples.into_iter().map(|(l, v)| (l, i64::try_from(v).unwrap_or(i64::MAX))).collect();
        Family { name, help, kind: MetricType::Counter, samples }
    }

    pub fn gauge(name: &'static str, help: &'static str, samples: Vec<(Labels, i64)>) -> Family {
        Family { name, help, kind: MetricType::Gauge, samples }
    }
}

/// What one scrape encodes.
#[derive(Debug)]
struct Snapshot {
    families: Vec<Family>,
    durations: HashMap<&'static str, Histogram>,
}

impl std::fmt::Debug for Histogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Histogram({} samples)", self.count)
    }
}

impl prometheus_client::collector::Collector for Snapshot {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for f in &self.families {
            let mut family = encoder.encode_descriptor(f.name, f.help, None, f.kind)?;
            if let [(labels, value)] = &f.samples[..] {
                if labels.is_empty() {
                    match f.kind {
                        MetricType::Counter => ConstCounter::new(*value as u64).encode(family)?,
                        _ => ConstGauge::new(*value).encode(family)?,
                    }
                    continue;
                }
            }
            for (labels, value) in &f.samples {
                // prometheus-client writes label values as given: escaped here, so no value
                // (a name from the cluster) can end its label or add a line.
                let escaped: Vec<(&str, std::borrow::Cow<str>)> = labels.iter().map(|(k, v)| (*k, escape(v))).collect();
                let labels: Vec<(&str, &str)> = escaped.iter().map(|(k, v)| (*k, v.as_ref())).collect();
                let metric = family.encode_family(&labels)?;
                match f.kind {
                    MetricType::Counter => ConstCounter::new(*value as u64).encode(metric)?,
                    _ => ConstGauge::new(*value).encode(metric)?,
                }
            }
        }
        let mut family = encoder.encode_descriptor(
            "meshless_tls_handshake_duration_seconds",
            "Durations of the tunnel's successful TLS handshakes, by side.",
            None,
            MetricType::Histogram,
        )?;
        let mut sides: Vec<_> = self.durations.iter().collect();
        sides.sort_by_key(|(s, _)| **s);
        for (side, h) in sides {
            let labels = [("side", *side)];
            let mut metric = family.encode_family(&labels)?;
            // Counts per bucket (the encoder sums them up), then what is above the last one.
            let above = h.count - h.buckets.iter().sum::<u64>();
            let buckets: Vec<(f64, u64)> = BUCKETS.iter().copied().zip(h.buckets).chain([(f64::MAX, above)]).collect();
            metric.encode_histogram::<prometheus_client::encoding::NoLabelSet>(h.sum, h.count, &buckets, None)?;
        }
        Ok(())
    }
}

/// A label value in the text format: `\\`, `\"` and newlines escaped.
fn escape(v: &str) -> std::borrow::Cow<'_, str> {
    if v.contains(['\\', '"', '\n']) {
        v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n").into()
    } else {
        v.into()
    }
}

/// A Service's host name, as Istio's `destination_service` label has it.
pub fn service_host(namespace: &str, name: &str) -> Arc<str> {
    format!("{name}.{namespace}.svc.cluster.local").into()
}

/// Milliseconds since the Unix epoch of `t` (0 before it).
fn unix_seconds_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Seconds since the Unix epoch of `t` (0 before it).
pub fn unix_seconds(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{workload_id, TrustDomain};
    use crate::workloads::PodKey;

    fn pod(name: &str, app: &str) -> Workload {
        let td = TrustDomain::new("cluster.local").unwrap();
        Workload {
            key: PodKey { namespace: "shop".into(), name: name.into() },
            service_account: name.into(),
            node: "node1".into(),
            ips: vec![if app == "web" { "198.19.1.2" } else { "198.19.1.3" }.parse().unwrap()],
            netns: None,
            cgroup: None,
            mesh: true,
            host_network: false,
            identity: workload_id(&td, "shop", name).unwrap(),
            labels: [("app".to_string(), app.to_string())].into(),
            label_mode: None,
            probe_ports: Vec::new(),
        }
    }

    /// A directory with both pods of [`labels`].
    fn both_pods() -> Directory {
        let td = TrustDomain::new("cluster.local").unwrap();
        let pods = [pod("web-1", "web"), pod("db-1", "db")];
        Directory::new(td, "node1".into(), "/x".into(), pods, crate::policy::Policies::default()).unwrap()
    }

    fn labels(flags: Flags) -> ConnLabels {
        ConnLabels {
            reporter: Reporter::Source,
            source: Party::pod(&pod("web-1", "web")),
            destination: Party::pod(&pod("db-1", "db")),
            service: None,
            flags,
            security: Security::MutualTls,
        }
    }

    /// The value of the sample of `name` whose line has every one of `with`.
    fn sample(text: &str, name: &str, with: &[&str]) -> Option<u64> {
        text.lines()
            .filter(|l| l.starts_with(&format!("{name}{{")) && with.iter().all(|w| l.contains(w)))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
            .reduce(|a, b| a + b)
    }

    #[test]
    fn connections_count_by_label_set_with_istio_names_and_bytes_at_the_end() {
        let t = Telemetry::new(true, AccessLogLimits::default(), crate::flows::DEFAULT_CAPACITY);
        let conns: Vec<Conn> = (0..5).map(|_| t.open(labels(Flags::None), Detail::default()).unwrap()).collect();
        t.refused(labels(Flags::Deny), Detail::default());
        let text = t.render(Vec::new());
        let pair = [
            "reporter=\"source\"",
            "source_workload=\"web\"",
            "destination_principal=\"spiffe://cluster.local/ns/shop/sa/db-1\"",
        ];
        assert_eq!(sample(&text, "istio_tcp_connections_opened_total", &pair), Some(6), "{text}");
        assert_eq!(
            sample(&text, "istio_tcp_connections_closed_total", &[&pair[..], &["response_flags=\"DENY\""]].concat()),
            Some(1)
        );
        assert_eq!(sample(&text, "istio_tcp_connections_closed_total", &["response_flags=\"-\""]), Some(0));
        for (i, c) in conns.into_iter().enumerate() {
            c.close(100, 10 * i as u64, End::Fin);
        }
        let text = t.render(Vec::new());
        assert_eq!(sample(&text, "istio_tcp_connections_closed_total", &["response_flags=\"-\""]), Some(5));
        assert_eq!(
            sample(&text, "istio_tcp_sent_bytes_total", &["connection_security_policy=\"mutual_tls\""]),
            Some(500)
        );
        assert_eq!(sample(&text, "istio_tcp_received_bytes_total", &["response_flags=\"-\""]), Some(100));
        assert!(text.contains("istio_build{component=\"meshless\",tag=\""), "{text}");
        assert!(!text.contains("198.19.1.2"), "an address became a label: {text}");
        // One label set per distinct values, however many connections.
        assert_eq!(t.conns.lock().len(), 2);
    }

    #[test]
    fn label_values_are_escaped_and_series_of_pods_gone_are_dropped_once_unused() {
        let t = Telemetry::new(true, AccessLogLimits::default(), crate::flows::DEFAULT_CAPACITY);
        let mut odd = labels(Flags::None);
        odd.destination.workload = "a\"b\\c\nd".into();
        t.refused(odd, Detail::default());
        let text = t.render(vec![Family::gauge("x", "y", vec![(vec![("policy", "<p\"x>".to_string())], 1)])]);
        assert!(text.contains("destination_workload=\"a\\\"b\\\\c\\nd\""), "{text}");
        assert!(text.contains("x{policy=\"<p\\\"x>\"} 1"), "{text}");
        // Neither pod is in the directory: the unused set goes, the held one stays until closed.
        let held = t.open(labels(Flags::None), Detail::default()).unwrap();
        let dir = Directory::empty(TrustDomain::new("cluster.local").unwrap(), "node1".into(), "/x".into());
        t.forget_gone(&dir);
        assert_eq!(t.conns.lock().len(), 1);
        held.close(0, 0, End::Fin);
        t.forget_gone(&dir);
        assert!(t.conns.lock().is_empty());
        let dir = both_pods();
        t.refused(labels(Flags::None), Detail::default());
        t.forget_gone(&dir);
        assert_eq!(t.conns.lock().len(), 1, "both pods are here: kept");
    }

    #[test]
    fn label_sets_are_capped_and_service_labels_of_services_gone_are_dropped() {
        let t = Telemetry::new(true, AccessLogLimits::default(), 0);
        for i in 0..MAX_LABEL_SETS + 10 {
            let mut l = labels(Flags::None);
            l.service = Some(service_host("shop", &format!("svc-{i}")));
            t.refused(l, Detail::default());
        }
        assert_eq!(t.conns.lock().len(), MAX_LABEL_SETS);
        assert!(t.render(Vec::new()).contains("meshless_metric_label_sets_overflow_total 10"));
        // The pods are here, the Services are not: every set goes.
        let dir = both_pods();
        t.forget_gone(&dir);
        assert!(t.conns.lock().is_empty());
    }

    #[test]
    fn the_access_log_keeps_to_its_rate_and_counts_what_it_drops() {
        // A subscriber that takes the access log (to nowhere): without one, nothing is logged.
        // The process-wide default, not this thread's: tracing caches a callsite's interest
        // across threads, and other tests' threads (with no subscriber) would cache it as never.
        let subscriber = tracing_subscriber::fmt().with_writer(std::io::sink).finish();
        let _ = tracing::subscriber::set_global_default(subscriber);
        tracing::callsite::rebuild_interest_cache();
        let t = Telemetry::new(true, AccessLogLimits { rate: 10, burst: 20 }, crate::flows::DEFAULT_CAPACITY);
        for _ in 0..200 {
            t.refused(labels(Flags::None), Detail::default());
        }
        let (written, dropped) = (t.access.written.load(Ordering::Relaxed), t.access.dropped.load(Ordering::Relaxed));
        assert!((20..=25).contains(&written), "the burst, and what the rate refilled meanwhile: {written}");
        assert_eq!(written + dropped, 200);
        let text = t.render(Vec::new());
        assert!(text.contains(&format!("meshless_access_log_dropped_total {dropped}")), "{text}");
        // Off: nothing counted, nothing logged.
        let off = Telemetry::new(false, AccessLogLimits::default(), crate::flows::DEFAULT_CAPACITY);
        assert!(off.open(labels(Flags::None), Detail::default()).is_none());
    }

    #[test]
    fn handshakes_are_timed_and_failures_counted_by_reason() {
        let t = Telemetry::new(true, AccessLogLimits::default(), crate::flows::DEFAULT_CAPACITY);
        t.handshake("client", Ok(Duration::from_micros(1500)));
        t.handshake("client", Ok(Duration::from_secs(3)));
        t.handshake("server", Err("tls"));
        let text = t.render(Vec::new());
        assert!(
            text.contains("meshless_tls_handshake_duration_seconds_bucket{le=\"0.002\",side=\"client\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("meshless_tls_handshake_duration_seconds_bucket{le=\"+Inf\",side=\"client\"} 2"),
            "{text}"
        );
        assert!(text.contains("meshless_tls_handshake_failures_total{side=\"server\",reason=\"tls\"} 1"), "{text}");
    }
}
