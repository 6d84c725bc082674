//! Decision time against the number of policies in the cluster: 10 and 10 000.
//!
//! Both sets hold the same three policies that select the destination (a DENY, an ALLOW, an
//! AUDIT), beside others that select other workloads: in the destination's namespace (other
//! labels), in other namespaces, and mesh-wide in the root namespace (selecting other labels).
//! The agent gathers what applies to each of its pods once per snapshot, so a decision should cost
//! the same however many policies the cluster has. Measured: what the data path does per
//! connection (find the pod's policy in the snapshot, decide), for an allowed and a denied
//! source; and, for reference, compiling the whole set (once per policy change).
//!
//! `cargo bench -p meshless-agent --bench policy` (also run by `cargo xtask bench`).

use std::collections::BTreeMap;
use std::hint::black_box;
use std::path::PathBuf;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use meshless::identity::{workload_id, SpiffeId, TrustDomain};
use meshless::policy::{Peer, Policies, PolicyInput};
use meshless::workloads::{Directory, PodKey, Workload};

fn td() -> TrustDomain {
    TrustDomain::new("cluster.local").unwrap()
}

fn workload(i: usize, ns: &str, name: &str, app: &str, node: &str) -> Workload {
    Workload {
        key: PodKey { namespace: ns.into(), name: name.into() },
        service_account: name.into(),
        node: node.into(),
        ips: vec![std::net::Ipv4Addr::from(0x0a00_0000 + i as u32).into()],
        netns: Some(PathBuf::from(format!("/run/netns/{ns}-{name}"))),
        cgroup: None,
        mesh: true,
        host_network: false,
        identity: workload_id(&td(), ns, name).unwrap(),
        labels: BTreeMap::from([("app".to_string(), app.to_string())]),
        label_mode: None,
        probe_ports: Vec::new(),
    }
}

fn policy_yaml(name: &str, ns: &str, app: &str, action: &str, principal: &str, port: u16) -> String {
    format!(
        "- metadata: {{name: {name}, namespace: {ns}}}\n  spec:\n    selector: {{matchLabels: {{app: {app}}}}}\n    action: {action}\n    rules:\n      - from: [{{source: {{principals: [\"cluster.local/ns/{ns}/sa/{principal}\"]}}}}]\n        to: [{{operation: {{ports: [\"{port}\"]}}}}]\n"
    )
}

/// `n` policies, three of which select `shop/api`; the directory holds the destination pod (on
/// this node) and the workloads the others select.
fn cluster(n: usize) -> Directory {
    let mut yaml = String::new();
    yaml += &policy_yaml("api-deny", "shop", "api", "DENY", "legacy", 8080);
    yaml += &policy_yaml("api-allow", "shop", "api", "ALLOW", "frontend", 8080);
    yaml += &policy_yaml("api-audit", "shop", "api", "AUDIT", "frontend", 9090);
    let mut pods = vec![workload(0, "shop", "api", "api", "node1")];
    for i in 3..n {
        let (ns, app) = match i % 3 {
            0 => ("shop".to_string(), format!("svc-{i}")),
            1 => (format!("team-{}", i % 1000), format!("svc-{i}")),
            _ => ("meshless-system".to_string(), format!("svc-{i}")),
        };
        yaml += &policy_yaml(&format!("p-{i}"), &ns, &app, if i % 2 == 0 { "ALLOW" } else { "DENY" }, "client", 80);
        if i % 10 == 0 {
            pods.push(workload(i, &ns, &format!("w-{i}"), &app, "node2"));
        }
    }
    let input = PolicyInput {
        authorization_policies: serde_yaml::from_str(&yaml).expect("bench policies parse"),
        ..Default::default()
    };
    let policies = Policies::compile(&input).expect("bench policies compile");
    assert_eq!(policies.counts().1, n);
    Directory::new(td(), "node1".into(), "/sys/fs/cgroup/kubepods".into(), pods, policies).expect("directory")
}

fn decisions(c: &mut Criterion) {
    let frontend: SpiffeId = workload_id(&td(), "shop", "frontend").unwrap();
    let legacy: SpiffeId = workload_id(&td(), "shop", "legacy").unwrap();
    let key = PodKey { namespace: "shop".into(), name: "api".into() };
    let mut group = c.benchmark_group("decision");
    for n in [10usize, 10_000] {
        let dir = cluster(n);
        let api = dir.get(&key).unwrap().clone();
        assert_eq!(dir.policy_for(&api).len(), 3, "the same three policies select the destination");
        let allowed = Peer::Authenticated { id: &frontend, ip: Some("198.19.1.10".parse().unwrap()) };
        let denied = Peer::Authenticated { id: &legacy, ip: Some("198.19.1.11".parse().unwrap()) };
        let to = std::net::SocketAddr::new(api.ips[0], 8080);
        assert!(dir.policy_for(&api).decide(&allowed, to).allowed);
        assert!(!dir.policy_for(&api).decide(&denied, to).allowed);
        group.bench_with_input(BenchmarkId::new("allowed", n), &n, |b, _| {
            b.iter(|| black_box(dir.policy_for(black_box(&api)).decide(black_box(&allowed), to)))
        });
        group.bench_with_input(BenchmarkId::new("denied", n), &n, |b, _| {
            b.iter(|| black_box(dir.policy_for(black_box(&api)).decide(black_box(&denied), to)))
        });
    }
    group.finish();
    let mut group = c.benchmark_group("compile");
    group.sample_size(10);
    for n in [10usize, 10_000] {
        group.bench_with_input(BenchmarkId::new("snapshot", n), &n, |b, &n| b.iter(|| black_box(cluster(n))));
    }
    group.finish();
}

criterion_group!(benches, decisions);
criterion_main!(benches);
