//! Services: a meshed pod's call to a Service's virtual IP goes to one of its endpoints over the
//! mesh (no kube-proxy in the testbed: the mesh alone makes the VIP work), load balanced,
//! authorized at each endpoint with the caller's identity, skipping endpoints that are not ready
//! or fail; endpoints outside the mesh get plaintext as a call to their address would. With a
//! kube-proxy-like DNAT rule on the nodes the result is the same: the agent resolves the VIP in
//! the pod, before the packet could reach the node's rule. Locality (`PreferClose`) and
//! `internalTrafficPolicy: Local` choose as kube-proxy would.

mod support;

use std::time::Duration;

use meshless_tests::mesh::{wait_listening, Mesh, TRUST_DOMAIN};
use meshless_tests::pcap::{seen, Dump};
use meshless_tests::{wait_for, Layout, Pod, Testbed};

/// The testbed's Service addresses: inside its own blocks (198.19.0.0/16, fd6d:6c00::/32), held
/// by no host; nothing outside the testbed's namespaces is ever addressed.
const WEB_VIP: &str = "198.19.200.10";
const WEB_VIP6: &str = "fd6d:6c00:c8::10";
const LEGACY_VIP: &str = "198.19.200.11";
const STICKY_VIP: &str = "198.19.200.12";
const DRAINING_VIP: &str = "198.19.200.13";
const NEAR_VIP: &str = "198.19.200.14";
const LOCAL_VIP: &str = "198.19.200.15";
const ELSEWHERE_VIP: &str = "198.19.200.16";

/// The `services:` section: `web` (backends A on node 2, port 8080, and B on node 1, port 8081,
/// both by the named port `http`; B ready or not), `legacy` (one endpoint outside the mesh),
/// `sticky` (A and B with ClientIP affinity), `draining` (neither ready; B still serving),
/// A is STRICT (a PeerAuthentication selecting it), B PERMISSIVE,
/// `near` (A and B, PreferClose: node 1 is in zone z1 with B, node 2 in z2), `local` (A and B,
/// internalTrafficPolicy Local) and `elsewhere` (A only, Local).
fn services(b_ready: bool) -> String {
    format!(
        r#"
zones: {{node1: z1, node2: z2}}
peerAuthentications:
  - metadata: {{name: a-strict, namespace: default}}
    spec: {{selector: {{matchLabels: {{app: pod1-n2}}}}, mtls: {{mode: STRICT}}}}
services:
  - name: web
    namespace: default
    clusterIPs: ["{WEB_VIP}", "{WEB_VIP6}"]
    ports: [{{port: 80, targetPort: http}}]
    endpoints:
      - {{pod: pod1-n2, ports: {{http: 8080}}}}
      - {{pod: pod2-n1, ready: {b_ready}, ports: {{http: 8081}}}}
  - name: legacy
    namespace: default
    clusterIPs: ["{LEGACY_VIP}"]
    ports: [{{port: 80, targetPort: 8080}}]
    endpoints: [{{pod: pod2-n2}}]
  - name: sticky
    namespace: default
    clusterIPs: ["{STICKY_VIP}"]
    ports: [{{port: 80, targetPort: http}}]
    sessionAffinity: ClientIP
    endpoints:
      - {{pod: pod1-n2, ports: {{http: 8080}}}}
      - {{pod: pod2-n1, ports: {{http: 8081}}}}
  - name: draining
    namespace: default
    clusterIPs: ["{DRAINING_VIP}"]
    ports: [{{port: 80, targetPort: http}}]
    endpoints:
      - {{pod: pod1-n2, ready: false, serving: false, terminating: true, ports: {{http: 8080}}}}
      - {{pod: pod2-n1, ready: false, serving: true, terminating: true, ports: {{http: 8081}}}}
  - name: near
    namespace: default
    clusterIPs: ["{NEAR_VIP}"]
    ports: [{{port: 80, targetPort: http}}]
    trafficDistribution: PreferClose
    endpoints:
      - {{pod: pod1-n2, ports: {{http: 8080}}}}
      - {{pod: pod2-n1, ports: {{http: 8081}}}}
  - name: local
    namespace: default
    clusterIPs: ["{LOCAL_VIP}"]
    ports: [{{port: 80, targetPort: http}}]
    internalTrafficPolicy: Local
    endpoints:
      - {{pod: pod1-n2, ports: {{http: 8080}}}}
      - {{pod: pod2-n1, ports: {{http: 8081}}}}
  - name: elsewhere
    namespace: default
    clusterIPs: ["{ELSEWHERE_VIP}"]
    ports: [{{port: 80, targetPort: http}}]
    internalTrafficPolicy: Local
    endpoints: [{{pod: pod1-n2, ports: {{http: 8080}}}}]
"#
    )
}

fn curl(pod: &Pod, url: &str) -> Result<String, String> {
    let out = pod.command("curl").unwrap().args(["-sS", "--max-time", "10", url]).output().expect("running curl");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// Calls the `web` Service `n` times; how many answers came from A and from B, or the first
/// call that failed.
fn try_spread(client: &Pod, n: usize, path: &str) -> Result<(usize, usize), String> {
    let (mut a, mut b) = (0, 0);
    for i in 0..n {
        match curl(client, &format!("http://{WEB_VIP}/{path}-{i}")) {
            Ok(body) if body == "backend-a" => a += 1,
            Ok(body) if body == "backend-b" => b += 1,
            other => return Err(format!("call {i} to the Service: {other:?}")),
        }
    }
    Ok((a, b))
}

fn spread(client: &Pod, n: usize, path: &str) -> (usize, usize) {
    try_spread(client, n, path).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn calls_to_a_service_go_over_the_mesh_to_ready_endpoints_balanced_and_authorized() {
    let Some(bins) = support::privileged("services") else {
        return;
    };
    let tb = Testbed::new(Layout { label: "svc", pods: &[2, 2] }).expect("testbed");
    // Meshed: the client (pod1-n1) and backends A (pod1-n2) and B (pod2-n1); pod2-n2 is not.
    let meshed = |p: &Pod| !(p.node == 2 && p.name == "pod2");
    let args = |_| vec![];
    let mesh = Mesh::start_full(&tb, &bins, &|p| Some(meshed(p)), &args, &[], &services(true)).expect("agents");
    let (client, a, b, legacy) = (tb.pod(1, 1), tb.pod(2, 1), tb.pod(1, 2), tb.pod(2, 2));
    let a_pid = tb.spawn(a.command(&bins.testbin).unwrap().args(["http-serve", "8080", "backend-a"])).unwrap();
    tb.spawn(b.command(&bins.testbin).unwrap().args(["http-serve", "8081", "backend-b"])).unwrap();
    tb.spawn(legacy.command(&bins.testbin).unwrap().args(["http-serve", "8080", "backend-legacy"])).unwrap();
    for (p, port) in [(a, 8080), (b, 8081), (legacy, 8080)] {
        wait_listening(&p.netns, port).unwrap();
    }

    // kube-proxy's part, played by one DNAT rule on each node: the VIP to B alone.
    let dnat = format!(
        "nft add table ip kubeproxy && \
         nft add chain ip kubeproxy services '{{ type nat hook prerouting priority -100; }}' && \
         nft add rule ip kubeproxy services ip daddr {WEB_VIP} tcp dport 80 dnat to {}:8081",
        b.ipv4
    );
    for node in [1, 2] {
        tb.node(node).netns.sh(&dnat).expect("a DNAT rule in the node's namespace (nftables)");
    }

    // 200 calls: all answered, by both endpoints (the node's DNAT rule, which knows B alone,
    // never saw them: the agent resolved the VIP first), nothing in clear between the nodes.
    let dump = Dump::start(&tb, 1, "node1-eth0").unwrap();
    let (from_a, from_b) = spread(client, 200, "svc-marker-5be1");
    assert!(from_a > 20 && from_b > 20, "both endpoints serve: A {from_a}, B {from_b}");
    // Control: the rule is live. A pod outside the mesh reaches the VIP through it, B alone.
    let through_rule: Vec<_> = (0..5).map(|i| curl(legacy, &format!("http://{WEB_VIP}/dnat-{i}"))).collect();
    assert!(through_rule.iter().all(|r| r.as_deref() == Ok("backend-b")), "the DNAT rule: {through_rule:?}");
    // A is STRICT: plaintext to it is refused, so the calls it answered came over the mesh.
    assert!(curl(legacy, &format!("http://{}:8080/plain-to-strict", a.ipv4)).is_err(), "STRICT A took plaintext");
    // The app's getpeername() shows the VIP it dialed, not the endpoint or the agent.
    let vip = format!("{WEB_VIP}:80");
    let (_, out, err) =
        support::run(client.command(&bins.testbin).unwrap().args(["peer", &vip, "GET /peer HTTP/1.1\n"]));
    assert_eq!(out.lines().next(), Some(vip.as_str()), "getpeername(): {out} {err}");
    let v6 = curl(client, &format!("http://[{WEB_VIP6}]/v6"));
    assert!(matches!(v6.as_deref(), Ok("backend-a") | Ok("backend-b")), "over the IPv6 VIP: {v6:?}");
    // An endpoint outside the mesh: plaintext, as a call to its own address.
    assert_eq!(curl(client, &format!("http://{LEGACY_VIP}/plain-marker-0c3d")).as_deref(), Ok("backend-legacy"));
    let segs = dump.finish(&tb).unwrap();
    assert!(seen(&segs, "plain-marker-0c3d"), "control: the plaintext call to the legacy endpoint is seen");
    assert!(!seen(&segs, "svc-marker-5be1"), "a call to the Service crossed the wire in clear");
    assert!(segs.iter().any(|s| s.dst_port == 15008 && s.payload.starts_with(&[0x17, 0x03, 0x03])), "no TLS to 15008");

    // Each endpoint's agent authorized the caller's own identity, and its decision log names the
    // Service the call came through (the caller's baggage: telemetry, never a decision input).
    let caller = tb.spiffe_id(TRUST_DOMAIN, client);
    for (node, dst) in [(2, "pod1-n2"), (1, "pod2-n1")] {
        let decided = mesh.wait_log(node, "inbound decision", |l| {
            l["src_id"] == caller.as_str()
                && l["decision"] == "allow"
                && l["service"] == "default/web"
                && l["dst"].as_str().is_some_and(|d| d.ends_with(dst))
        });
        assert!(decided.is_some(), "node{node} never authorized {caller} for {dst}: {}", mesh.log_summary(node));
    }

    // Session affinity ClientIP: one client, one endpoint. No ready endpoint left: the serving
    // terminating one serves (as kube-proxy does), the one that no longer serves does not.
    let bodies = |vip: &str, n: usize| -> Vec<String> {
        (0..n).map(|i| curl(client, &format!("http://{vip}/{i}")).unwrap_or_else(|e| e)).collect()
    };
    let sticky = bodies(STICKY_VIP, 20);
    assert!(sticky.iter().all(|b| b == &sticky[0]) && sticky[0].starts_with("backend-"), "{sticky:?}");
    assert!(bodies(DRAINING_VIP, 20).iter().all(|b| b == "backend-b"), "only the serving terminating endpoint");
    // PreferClose: B, in the client's zone. internalTrafficPolicy Local: B, on the client's node;
    // none when only another node has endpoints (refused, as kube-proxy drops it).
    assert!(bodies(NEAR_VIP, 20).iter().all(|b| b == "backend-b"), "PreferClose: the endpoint in this zone");
    assert!(bodies(LOCAL_VIP, 20).iter().all(|b| b == "backend-b"), "Local: the endpoint on this node");
    assert!(curl(client, &format!("http://{ELSEWHERE_VIP}/")).is_err(), "Local, no endpoint here: refused");

    // A DENY on the caller's principal stops calls through the Service too.
    let deny = r#"
authorizationPolicies:
  - metadata: {name: no-client, namespace: default}
    spec:
      action: DENY
      rules: [{from: [{source: {principals: ["cluster.local/ns/default/sa/sa-pod1-n1"]}}]}]
"#;
    mesh.set_policy(&tb, &(services(true) + deny)).unwrap();
    let denied = wait_for(Duration::from_secs(10), || curl(client, &format!("http://{WEB_VIP}/after-deny")).err());
    assert!(denied.is_some(), "the DENY never stopped calls through the Service");
    for i in 0..5 {
        assert!(curl(client, &format!("http://{WEB_VIP}/denied-{i}")).is_err(), "call {i} got through the DENY");
    }

    // B not ready: not chosen once the update is in.
    mesh.set_policy(&tb, &services(false)).unwrap();
    let only_a =
        wait_for(Duration::from_secs(10), || (try_spread(client, 20, "not-ready") == Ok((20, 0))).then_some(()));
    assert!(only_a.is_some(), "the endpoint that is not ready was still chosen");

    // A killed mid-run, B ready again: every call is answered, by B (A's refusal is retried).
    mesh.set_policy(&tb, &services(true)).unwrap();
    let both = wait_for(Duration::from_secs(10), || {
        let (a, b) = try_spread(client, 20, "ready-again").ok()?;
        (a > 0 && b > 0).then_some(())
    });
    assert!(both.is_some(), "B never came back");
    tb.signal(a_pid, libc::SIGKILL);
    assert!(tb.wait_exit(a_pid, Duration::from_secs(10)).is_some());
    assert_eq!(spread(client, 40, "a-killed"), (0, 40), "no call fails beyond the bounded retry");
}
