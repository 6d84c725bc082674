//! The decision on one inbound tunnel stream: may this authenticated source reach this target in
//! this pod? One pure function of (source identity, destination workload, target), called for
//! every CONNECT before anything is delivered. Today it enforces what the tunnel itself requires;
//! the policy engine fills in the identity-pair rules here, and `policy explain` and the node
//! dashboard will call the same function.

use std::net::SocketAddr;

use http::StatusCode;
use meshless_common::AGENT_POD_PORTS;

use crate::identity::SpiffeId;
use crate::workloads::{canonical, Workload};

/// One inbound stream to decide.
pub struct Request<'a> {
    /// The SPIFFE ID of the peer's verified client certificate (never anything the client claims
    /// inside the tunnel).
    pub src: &'a SpiffeId,
    /// The pod whose tunnel listener took the stream.
    pub dst: &'a Workload,
    /// The CONNECT target.
    pub target: SocketAddr,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    /// Answer the CONNECT with `status`; `reason` is logged.
    Deny {
        status: StatusCode,
        reason: &'static str,
    },
}

pub fn decide(req: &Request<'_>) -> Verdict {
    // A CONNECT to one of the agent's own ports would loop through the agent.
    if AGENT_POD_PORTS.contains(&req.target.port()) {
        return Verdict::Deny { status: StatusCode::BAD_REQUEST, reason: "target is one of the agent's ports" };
    }
    // A pod's tunnel listener delivers to that pod only.
    if !req.dst.ips.iter().any(|ip| canonical(*ip) == canonical(req.target.ip())) {
        return Verdict::Deny { status: StatusCode::MISDIRECTED_REQUEST, reason: "target is not this pod" };
    }
    Verdict::Allow
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{workload_id, TrustDomain};
    use crate::workloads::PodKey;

    #[test]
    fn inbound_targets_are_limited_to_the_pods_own_addresses_and_app_ports() {
        let td = TrustDomain::new("cluster.local").unwrap();
        let src = workload_id(&td, "default", "client").unwrap();
        let dst = Workload {
            key: PodKey { namespace: "default".into(), name: "server".into() },
            service_account: "server".into(),
            node: "node2".into(),
            ips: vec!["198.19.2.11".parse().unwrap(), "fd6d:6c00:2::11".parse().unwrap()],
            netns: None,
            cgroup: None,
            mesh: true,
            host_network: false,
            identity: workload_id(&td, "default", "server").unwrap(),
        };
        let decide = |t: &str| decide(&Request { src: &src, dst: &dst, target: t.parse().unwrap() });
        assert_eq!(decide("198.19.2.11:8080"), Verdict::Allow);
        assert_eq!(decide("[fd6d:6c00:2::11]:8080"), Verdict::Allow);
        assert_eq!(decide("[::ffff:198.19.2.11]:8080"), Verdict::Allow, "v4-mapped names the IPv4 address");
        let status = |t: &str| match decide(t) {
            Verdict::Deny { status, .. } => status,
            Verdict::Allow => panic!("{t} must be refused"),
        };
        assert_eq!(status("198.19.2.12:8080"), StatusCode::MISDIRECTED_REQUEST, "another pod");
        assert_eq!(status("127.0.0.1:8080"), StatusCode::MISDIRECTED_REQUEST, "loopback of the pod");
        for port in [15001, 15006, 15008] {
            assert_eq!(status(&format!("198.19.2.11:{port}")), StatusCode::BAD_REQUEST, "agent port {port}");
        }
    }
}
