//! `cargo xtask demo`: two nodes and four pods in network namespaces, real agents, real eBPF
//! capture. Shows pod-to-pod calls with their SPIFFE identities and what crossed the wire; then
//! turns on a policy (the backend STRICT, and only the frontend may call it) and shows an allowed
//! and two denied calls with the agent's explanation of each.

use std::fs;
use std::net::IpAddr;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use meshless_tests::forward::Forward;
use meshless_tests::mesh::{run_ok, wait_listening, Bins, Mesh, TRUST_DOMAIN};
use meshless_tests::{pcap, sockaddr, wait_for, Layout, Pod, Testbed};

#[derive(clap::Args)]
pub struct Args {
    /// Exit (and clean up) after the show instead of staying up until Ctrl-C.
    #[arg(long)]
    once: bool,
    /// Run against a real Kubernetes API server (kube-apiserver 1.20 + etcd, built once and
    /// cached): `deploy/` applied, pods as Pod objects, policy as a resource.
    #[arg(long)]
    kube: bool,
}

/// node1: pod1 "frontend" (in the mesh), pod2 "legacy" (not enrolled), pod3 "batch" (in the mesh);
/// node2: pod1 "backend".
fn enrolled(p: &Pod) -> bool {
    !(p.node == 1 && p.name == "pod2")
}

/// What the demo turns on after the first calls: the backend pod STRICT, and an ALLOW policy that
/// lets only the frontend's identity call its port 8080.
/// The backend behind a Service (no kube-proxy anywhere: the agent resolves the virtual IP).
/// The address is inside the testbed's own block and held by no host.
const SERVICES: &str = r#"
services:
  - name: backend
    namespace: default
    clusterIPs: ["198.19.200.10"]
    ports: [{port: 80, targetPort: 8080}]
    endpoints: [{pod: pod1-n2}]
"#;

const POLICY: &str = r#"
peerAuthentications:
  - metadata: {name: backend-strict, namespace: default}
    spec:
      selector: {matchLabels: {app: pod1-n2}}
      mtls: {mode: STRICT}
authorizationPolicies:
  - metadata: {name: backend-from-frontend, namespace: default}
    spec:
      selector: {matchLabels: {app: pod1-n2}}
      action: ALLOW
      rules:
        - from: [{source: {principals: ["cluster.local/ns/default/sa/sa-pod1-n1"]}}]
          to: [{operation: {ports: ["8080"]}}]
"#;

/// Prints the client-side agent's line for a call through a Service: which endpoint, which identity.
pub fn print_service_route(l: &serde_json::Value) {
    println!(
        "   node1 agent: service {} ({}) -> endpoint {} as {}",
        l["service"].as_str().unwrap_or("?"),
        l["vip"].as_str().unwrap_or("?"),
        l["dst_addr"].as_str().unwrap_or("?"),
        l["dst_id"].as_str().unwrap_or("?")
    );
}

/// Set once the cluster is held open for the user (Ctrl-C then ends the wait, not the process).
pub static HOLDING: AtomicBool = AtomicBool::new(false);

pub fn run(bins: &Bins, args: Args) -> Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        // While the cluster is held open, Ctrl-C (or SIGTERM) ends the wait and the demo cleans up
        // as it returns; before that (the show), it stops at once and removes what it made.
        ctrlc::set_handler(move || {
            if HOLDING.load(Ordering::SeqCst) {
                stop.store(true, Ordering::SeqCst)
            } else {
                meshless_tests::abandon()
            }
        })
        .context("installing the Ctrl-C handler")?;
    }
    if args.kube {
        let kube = crate::kube::ensure()?;
        let kube = meshless_tests::kube::KubeBins { apiserver: kube.apiserver, etcd: kube.etcd, kubectl: kube.kubectl };
        return crate::demo_kube::run(bins, kube, args.once, stop);
    }
    println!("== building the cluster: 2 nodes (network namespaces), 4 pods (each its own netns and cgroup)");
    let tb = Testbed::new(Layout { label: "demo", pods: &[3, 1] })?;
    let (frontend, legacy, batch, backend) = (tb.pod(1, 1), tb.pod(1, 2), tb.pod(1, 3), tb.pod(2, 1));
    for (role, pod) in [("frontend", frontend), ("legacy  ", legacy), ("batch   ", batch), ("backend ", backend)] {
        println!(
            "   {role} {}  node{}  {} / {}  {}",
            pod.name,
            pod.node,
            pod.ipv4,
            pod.ipv6,
            if enrolled(pod) { tb.spiffe_id(TRUST_DOMAIN, pod) } else { "(not in the mesh)".into() }
        );
    }
    println!("== starting the issuer on the control-plane host and one meshless agent per node");
    println!("   (agents get the trust bundle and a node credential, never a CA key; eBPF capture on each node's pod cgroup)");
    let listed = |p: &Pod| Some(enrolled(p));
    let mesh = Mesh::start_full(&tb, bins, &listed, &|_| Vec::new(), &[], SERVICES)?;
    tb.spawn(
        backend
            .command(&bins.testbin)?
            .args(["http-serve", "8080", "hello from the backend pod\n"])
            .stderr(Stdio::null()),
    )?;
    wait_listening(&backend.netns, 8080)?;

    let pcap_path = tb.dir.join("node1-eth0.pcap");
    let dump_log = tb.dir.join("tcpdump.log");
    let dump = tb.spawn(
        tb.node(1)
            .netns
            .command("tcpdump", None)?
            .args(["-i", "eth0", "-n", "-s", "0", "-U", "--immediate-mode", "-Z", "root", "-w"])
            .arg(&pcap_path)
            .stderr(fs::File::create(&dump_log)?),
    )?;
    wait_for(Duration::from_secs(10), || fs::read_to_string(&dump_log).ok()?.contains("listening on").then_some(()))
        .context("tcpdump did not start")?;

    let calls: [(&Pod, IpAddr, &str); 3] = [
        (frontend, backend.ipv4.into(), "marker-frontend-v4"),
        (frontend, backend.ipv6.into(), "marker-frontend-v6"),
        (legacy, backend.ipv4.into(), "marker-legacy-v4"),
    ];
    println!("== unmodified curl in one pod calls the backend pod by its IP");
    for (from, ip, marker) in calls {
        let url = format!("http://{}/{marker}", sockaddr(ip, 8080));
        let body = run_ok(from.command("curl")?.args(["-sS", "--max-time", "10", &url]))?;
        println!("   {} $ curl {url}\n     -> {}", from.name, body.trim());
    }
    println!("== and through a Service: its ClusterIP is resolved by the frontend's agent (no kube-proxy)");
    let url = "http://198.19.200.10/marker-service";
    let body = run_ok(frontend.command("curl")?.args(["-sS", "--max-time", "10", url]))?;
    println!("   {} $ curl {url}\n     -> {}", frontend.name, body.trim());
    let routed = wait_for(Duration::from_secs(5), || {
        mesh.log_lines(1).into_iter().find(|l| l["message"] == "outbound connection to a Service over HBONE")
    })
    .context("node1's agent logged no call through the Service")?;
    print_service_route(&routed);
    std::thread::sleep(Duration::from_millis(300));
    tb.stop(dump);

    println!("== what the issuer signed (each node only its own pods' identities)");
    for l in mesh.issuer_lines().iter().filter(|l| l["message"] == "issued a certificate") {
        println!("   issuer: {} for node {}", l["id"].as_str().unwrap_or("?"), l["node"].as_str().unwrap_or("?"));
    }
    println!("== what the agents saw (identities from the mTLS handshakes)");
    for l in mesh.log_lines(2).iter().filter(|l| l["message"] == "inbound decision" && l["transport"] == "hbone") {
        println!(
            "   node2 agent: {} -> {}  ({})",
            l["src_id"].as_str().unwrap_or("?"),
            l["dst_id"].as_str().unwrap_or("?"),
            l["dst_addr"].as_str().unwrap_or("?")
        );
    }
    println!("== what crossed the wire between node1 and node2 (tcpdump on node1's eth0)");
    let segs = pcap::tcp_segments(&fs::read(&pcap_path)?)?;
    let records = segs
        .iter()
        .filter(|s| (s.dst_port == 15008 || s.src_port == 15008) && s.payload.starts_with(&[0x17, 3, 3]))
        .count();
    println!("   TLS 1.3 application-data records on port 15008: {records}");
    for (from, _, marker) in calls.into_iter().chain([(frontend, backend.ipv4.into(), "marker-service")]) {
        let seen = segs.iter().any(|s| pcap::contains(&s.payload, marker.as_bytes()));
        println!(
            "   request marker {marker:<20} from {:<8} seen in plaintext on the wire: {}",
            from.name,
            if seen { "YES (not in the mesh)" } else { "no (encrypted)" }
        );
    }

    println!("== policy: the backend pod STRICT, and only the frontend's identity may call its port 8080");
    println!("   (PeerAuthentication + AuthorizationPolicy, Istio's shape, written into the live state files)");
    mesh.set_policy(&tb, &(POLICY.to_string() + SERVICES))?;
    let applied = wait_for(Duration::from_secs(10), || {
        mesh.log_lines(2).iter().any(|l| l["message"] == "inbound mode changed").then_some(())
    });
    applied.context("node2's agent did not apply the policy")?;
    let node2 = &tb.node(2).netns;
    for (who, from) in [("frontend", frontend), ("batch", batch), ("legacy", legacy)] {
        let url = format!("http://{}/", sockaddr(backend.ipv4.into(), 8080));
        let out = from.command("curl")?.args(["-sS", "--max-time", "5", &url]).output()?;
        let result = if out.status.success() {
            String::from_utf8_lossy(&out.stdout).trim().to_string()
        } else {
            format!("refused ({})", String::from_utf8_lossy(&out.stderr).trim())
        };
        println!(
            "   {who:<8} $ curl {url}
     -> {result}"
        );
        let src = format!("default/{}-n{}", from.name, from.node);
        let explained = run_ok(node2.command(&bins.meshless, None)?.args([
            "policy",
            "explain",
            "--from",
            &src,
            "--to",
            "default/pod1-n2",
            "--port",
            "8080",
        ]))?;
        for line in explained.lines() {
            println!("     node2 $ meshless policy explain: {line}");
        }
    }
    // Each node's dashboard (127.0.0.1:15000 in the node's namespace) on a host loopback port,
    // as `kubectl port-forward` opens it in a cluster.
    let mut forwards = Vec::new();
    for i in 1..=tb.nodes.len() {
        let preferred = format!("127.0.0.1:{}", 15000 + 100 + i).parse()?;
        let f = Forward::start(&tb.node(i).netns, 15000, preferred)
            .or_else(|_| Forward::start(&tb.node(i).netns, 15000, "127.0.0.1:0".parse()?))?;
        println!("dashboard node{i}: http://{}/", f.addr);
        forwards.push(f);
    }
    if args.once {
        println!("== done (--once); cleaning up");
        return Ok(());
    }
    println!("== the cluster stays up, with traffic every 2 s: the frontend's call (allowed), batch's");
    println!("   (denied by policy) and legacy's plaintext (refused under STRICT), for the dashboards.");
    println!("   Try it yourself, then press Ctrl-C to clean up:");
    // The shell must join the pod's cgroup too: capture is attached to the pods' cgroups.
    println!(
        "   sh -c 'echo $$ > {}/cgroup.procs && exec nsenter --net={} curl -sS http://{}:8080/'",
        frontend.cgroup.display(),
        frontend.netns.path().display(),
        backend.ipv4
    );
    println!(
        "   ip netns exec {} {} policy explain --from default/pod3-n1 --to default/pod1-n2 --port 8080",
        node2.name,
        bins.meshless.display()
    );
    println!("   agent logs: {} {}", mesh.logs[0].display(), mesh.logs[1].display());
    println!(
        "   the state files are live: edit {} (or {}) and the agent applies the change at once",
        mesh.states[0].display(),
        mesh.states[1].display()
    );
    // Bounded: one round every 2 s for an hour at most (each call 2 s at most), then quiet.
    let url = format!("http://{}/", sockaddr(backend.ipv4.into(), 8080));
    let mut last = std::time::Instant::now() - Duration::from_secs(2);
    let mut rounds = 0;
    HOLDING.store(true, Ordering::SeqCst);
    while !stop.load(Ordering::SeqCst) {
        if rounds < 1800 && last.elapsed() >= Duration::from_secs(2) {
            last = std::time::Instant::now();
            rounds += 1;
            for from in [frontend, batch, legacy] {
                let _ = from.command("curl")?.args(["-s", "-o", "/dev/null", "--max-time", "2", &url]).status();
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(forwards);
    println!("\n== cleaning up");
    Ok(())
}
