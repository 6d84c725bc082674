//! The decision on one inbound connection — a stream from the tunnel (source authenticated by
//! its certificate) or plaintext captured by sk_lookup (source known only by address): may it
//! reach this port of this pod? First what the data path itself requires (the target is this pod,
//! not one of the agent's ports), then the pod's policy ([`crate::policy`]). Every decision is
//! logged as one structured line and counted; `meshless policy explain` and the admin endpoint
//! call the same [`PodPolicy::decide`].

use std::collections::HashMap;
use std::net::SocketAddr;

use http::StatusCode;
use meshless_common::AGENT_POD_PORTS;
use parking_lot::Mutex;
use tracing::{info, warn};

use crate::policy::{Decision, Mode, Peer, PodPolicy};
use crate::workloads::{canonical, Workload};

/// One inbound connection to decide.
pub struct Request<'a> {
    /// Who connects: the verified certificate's SPIFFE ID (never anything the client claims
    /// inside the tunnel), or only an address for plaintext.
    pub peer: Peer<'a>,
    /// The pod whose listener took the connection.
    pub dst: &'a Workload,
    /// The destination: the CONNECT target, or the original destination of plaintext.
    pub target: SocketAddr,
    /// Where the connection came from (the tunnel's or the plaintext client's address).
    pub from: SocketAddr,
    /// The Service the caller says the call went through (`ns/name`; logged, never decided on).
    pub service: Option<&'a str>,
}

/// The outcome, as the data path acts on it.
#[derive(Debug, PartialEq, Eq)]
pub struct Outcome {
    /// Let it through (an allowed decision, or a denial in dry-run mode).
    pub admit: bool,
    /// The answer to a refused CONNECT.
    pub status: StatusCode,
    /// The policy decision, unless the connection was refused before policy (bad target).
    pub decision: Option<Decision>,
    /// Why, in words (for the log and for `explain`).
    pub why: String,
    /// A denial that dry-run let through.
    pub dry_run: bool,
}

/// Decides `req` against the pod's policy; `dry_run` lets policy denials through (logged as
/// such). A plaintext refusal of a STRICT pod is the mode, not a policy, and dry-run does not
/// change it.
pub fn decide(req: &Request<'_>, policy: &PodPolicy, dry_run: bool) -> Outcome {
    let refuse = |status, why: &str| Outcome { admit: false, status, decision: None, why: why.into(), dry_run: false };
    // A connection to one of the agent's own ports would loop through the agent.
    if AGENT_POD_PORTS.contains(&req.target.port()) {
        return refuse(StatusCode::BAD_REQUEST, "target is one of the agent's ports");
    }
    // A pod's listeners deliver to that pod only.
    if !req.dst.ips.iter().any(|ip| canonical(*ip) == canonical(req.target.ip())) {
        return refuse(StatusCode::MISDIRECTED_REQUEST, "target is not this pod");
    }
    let decision = policy.decide(&req.peer, req.target);
    let why = decision.reason.to_string();
    let denied_by_policy = !decision.allowed && !matches!(decision.reason, crate::policy::Reason::PlaintextRefused);
    let dry = dry_run && denied_by_policy;
    Outcome {
        admit: decision.allowed || dry,
        status: StatusCode::FORBIDDEN,
        decision: Some(decision),
        why,
        dry_run: dry,
    }
}

/// Counters of decisions, by (mode, verdict, deciding policy and rule or reason).
#[derive(Default)]
pub struct Stats(Mutex<HashMap<DecisionKey, u64>>);

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct DecisionKey {
    /// `hbone` or `plaintext`.
    pub transport: &'static str,
    pub mode: &'static str,
    /// `allow`, `deny`, or `dry_run_deny` (denied, let through).
    pub decision: &'static str,
    /// `namespace/name rules[i]`, or the reason when no rule decided.
    pub by: String,
}

impl Stats {
    pub fn count(&self, key: DecisionKey) {
        *self.0.lock().entry(key).or_default() += 1;
    }

    pub fn snapshot(&self) -> Vec<(DecisionKey, u64)> {
        let mut all: Vec<(DecisionKey, u64)> = self.0.lock().iter().map(|(k, v)| (k.clone(), *v)).collect();
        all.sort();
        all
    }
}

/// Logs `outcome` as one structured line and counts it.
/// What [`record`] logged of a decision, for the connection's access log line.
pub struct Verdict {
    /// `allow`, `deny`, or `dry_run_deny`.
    pub decision: &'static str,
    /// The deciding policy (`namespace/name`), empty when no rule decided.
    pub policy: String,
    /// The deciding rule's index, -1 when no rule decided.
    pub rule: i64,
}

pub fn record(stats: &Stats, req: &Request<'_>, mode: Mode, outcome: &Outcome) -> Verdict {
    let (transport, src_id) = match &req.peer {
        Peer::Authenticated { id, .. } => ("hbone", id.to_string()),
        Peer::Plaintext { .. } => ("plaintext", String::new()),
    };
    let decision = match (outcome.admit, outcome.dry_run) {
        (true, false) => "allow",
        (true, true) => "dry_run_deny",
        (false, _) => "deny",
    };
    let rule = outcome.decision.as_ref().and_then(Decision::rule);
    let policy = rule.map(|r| r.policy.to_string()).unwrap_or_default();
    let rule_index = rule.map(|r| r.rule as i64).unwrap_or(-1);
    let by = match rule {
        Some(r) => r.to_string(),
        None => outcome.decision.as_ref().map(|d| reason_kind(d)).unwrap_or("target").to_string(),
    };
    let audited: Vec<String> =
        outcome.decision.as_ref().map(|d| d.audited.iter().map(ToString::to_string).collect()).unwrap_or_default();
    let dst = req.dst.key.to_string();
    let dst_id = req.dst.identity.to_string();
    let (src_addr, dst_addr, dst_port) = (req.from, req.target, req.target.port());
    let audited = audited.join(",");
    // Policies that took part and are not enforced as written (partially, or failed closed).
    let caveats = outcome.decision.as_ref().map(|d| d.caveats.join("; ")).unwrap_or_default();
    let service = req.service.unwrap_or_default();
    if outcome.admit && !outcome.dry_run {
        info!(transport, src_id, %src_addr, dst, dst_id, %dst_addr, dst_port, service, mode = mode.as_str(), decision,
            policy, rule = rule_index, reason = %outcome.why, audited, caveats, "inbound decision");
    } else {
        warn!(transport, src_id, %src_addr, dst, dst_id, %dst_addr, dst_port, service, mode = mode.as_str(), decision,
            policy, rule = rule_index, reason = %outcome.why, audited, caveats, "inbound decision");
    }
    stats.count(DecisionKey { transport, mode: mode.as_str(), decision, by });
    Verdict { decision, policy, rule: rule_index }
}

fn reason_kind(d: &Decision) -> &'static str {
    use crate::policy::Reason;
    match d.reason {
        Reason::Denied { .. } | Reason::Allowed { .. } => "rule",
        Reason::NoAllowMatched { .. } => "no_allow_matched",
        Reason::DefaultAllow => "default_allow",
        Reason::PlaintextRefused => "plaintext_refused",
        Reason::NotCaptured => "not_captured",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{workload_id, TrustDomain};
    use crate::policy::{Policies, PolicyInput};
    use crate::workloads::PodKey;

    fn server() -> Workload {
        let td = TrustDomain::new("cluster.local").unwrap();
        Workload {
            key: PodKey { namespace: "default".into(), name: "server".into() },
            service_account: "server".into(),
            node: "node2".into(),
            ips: vec!["198.19.2.11".parse().unwrap(), "fd6d:6c00:2::11".parse().unwrap()],
            netns: None,
            cgroup: None,
            mesh: true,
            host_network: false,
            identity: workload_id(&td, "default", "server").unwrap(),
            labels: Default::default(),
            label_mode: None,
            probe_ports: Vec::new(),
        }
    }

    #[test]
    fn inbound_targets_are_limited_to_the_pods_own_addresses_and_app_ports() {
        let td = TrustDomain::new("cluster.local").unwrap();
        let src = workload_id(&td, "default", "client").unwrap();
        let dst = server();
        let open = PodPolicy::open();
        let decide = |t: &str| {
            let req = Request {
                peer: Peer::Authenticated { id: &src, ip: None },
                dst: &dst,
                target: t.parse().unwrap(),
                from: "198.19.1.10:40000".parse().unwrap(),
                service: None,
            };
            decide(&req, &open, false)
        };
        assert!(decide("198.19.2.11:8080").admit);
        assert!(decide("[fd6d:6c00:2::11]:8080").admit);
        assert!(decide("[::ffff:198.19.2.11]:8080").admit, "v4-mapped names the IPv4 address");
        let status = |t: &str| {
            let o = decide(t);
            assert!(!o.admit, "{t} must be refused");
            o.status
        };
        assert_eq!(status("198.19.2.12:8080"), StatusCode::MISDIRECTED_REQUEST, "another pod");
        assert_eq!(status("127.0.0.1:8080"), StatusCode::MISDIRECTED_REQUEST, "loopback of the pod");
        for port in [15001, 15006, 15008] {
            assert_eq!(status(&format!("198.19.2.11:{port}")), StatusCode::BAD_REQUEST, "agent port {port}");
        }
    }

    #[test]
    fn dry_run_lets_policy_denials_through_but_not_a_strict_plaintext_refusal() {
        let input = PolicyInput {
            authorization_policies: serde_yaml::from_str("[{metadata: {name: nothing, namespace: default}}]").unwrap(),
            peer_authentications: serde_yaml::from_str(
                "[{metadata: {name: s, namespace: default}, spec: {mtls: {mode: STRICT}}}]",
            )
            .unwrap(),
            ..Default::default()
        };
        let dst = server();
        let policy = Policies::compile(&input).unwrap().for_workload(&dst.policy_target());
        let td = TrustDomain::new("cluster.local").unwrap();
        let src = workload_id(&td, "default", "client").unwrap();
        let from = "198.19.1.10:40000".parse().unwrap();
        let target = "198.19.2.11:8080".parse().unwrap();
        let tls = Request { peer: Peer::Authenticated { id: &src, ip: None }, dst: &dst, target, from, service: None };
        let enforced = decide(&tls, &policy, false);
        assert_eq!((enforced.admit, enforced.dry_run, enforced.status), (false, false, StatusCode::FORBIDDEN));
        let dry = decide(&tls, &policy, true);
        assert_eq!((dry.admit, dry.dry_run), (true, true), "dry-run admits what policy denies");
        assert!(!dry.decision.as_ref().unwrap().allowed, "and still says what policy decided");
        let plain = Request {
            peer: Peer::Plaintext { ip: "198.19.1.10".parse().unwrap() },
            dst: &dst,
            target,
            from,
            service: None,
        };
        let o = decide(&plain, &policy, true);
        assert_eq!((o.admit, o.dry_run), (false, false), "STRICT refuses plaintext even in dry-run");

        let stats = Stats::default();
        record(&stats, &tls, Mode::Strict, &enforced);
        record(&stats, &tls, Mode::Strict, &enforced);
        record(&stats, &tls, Mode::Strict, &dry);
        let counted: Vec<(String, u64)> = stats
            .snapshot()
            .into_iter()
            .map(|(k, n)| (format!("{} {} {}", k.transport, k.decision, k.by), n))
            .collect();
        assert_eq!(
            counted,
            [("hbone deny no_allow_matched".to_string(), 2), ("hbone dry_run_deny no_allow_matched".to_string(), 1)]
        );
    }
}
