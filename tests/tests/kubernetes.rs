//! Kubernetes mode, as root, against a real kube-apiserver v1.20 (built by `cargo xtask`) on the
//! namespace testbed: `deploy/` applied with kubectl's kustomize, the issuer and one agent per node
//! with their own ServiceAccount tokens, the test playing the scheduler, the kubelet and the
//! container runtime (Pod objects with `spec.nodeName`, the real `meshless-cni` binary run per
//! the CNI spec, `status.podIP` reported).

mod support;

use std::process::Output;
use std::time::{Duration, Instant};

use meshless_tests::kube::{apply_deploy, remove_pod, run_cni, run_pod, sandbox, ApiServer, KubeMesh, ALLOW_FRONTEND};
use meshless_tests::mesh::{is_listening, wait_listening, Bins};
use meshless_tests::pcap::{seen, Dump};
use meshless_tests::{wait_for, Layout, Pod, Testbed};

struct Cluster {
    // Field order is drop order: the agents and the API server stop before the testbed goes.
    mesh: KubeMesh,
    api: ApiServer,
    tb: Testbed,
}

/// A two-node testbed (four pod sandboxes on node 1, two on node 2), the control plane with `deploy/` applied, namespaces
/// `shop` (opted in, STRICT) and `legacy` (no label), and `before` pods created (and announced
/// by the CNI plugin) before the agents start.
fn cluster(label: &str, bins: &Bins, before: &[(usize, usize, &str, &str, &str)]) -> Cluster {
    cluster_with(label, bins, before, &|_, _| {})
}

/// As [`cluster`], with `setup` run before the agents start too.
fn cluster_with(
    label: &str,
    bins: &Bins,
    before: &[(usize, usize, &str, &str, &str)],
    setup: &dyn Fn(&Testbed, &ApiServer),
) -> Cluster {
    let kbins = support::kube_bins(label).expect("checked by the caller");
    let tb = Testbed::new(Layout { label, pods: &[4, 2] }).expect("building the testbed");
    let api = ApiServer::start(&tb, kbins).expect("starting the API server");
    // The manifests as a user applies them, validated by the server.
    let applied = apply_deploy(&tb, &api).unwrap();
    assert!(applied.contains("daemonset.apps/meshless-agent serverside-applied"), "{applied}");
    api.create_namespace(&tb, "shop", Some("strict")).unwrap();
    api.create_namespace(&tb, "legacy", None).unwrap();
    // Created while no agent runs: the runtime's CNI ADD fails with "try again later" (a pod is
    // never started without the protection it may have opted into) and leaves no record.
    let mut waiting = Vec::new();
    for &(node, j, ns, name, sa) in before {
        let pod = tb.pod(node, j);
        let uid = api.create_pod(&tb, ns, name, sa, &format!("node{node}"), serde_json::json!({ "app": sa })).unwrap();
        let out = run_cni(&bins.cni, "ADD", &KubeMesh::cni_dir(&tb, node), pod, ns, name, &uid).unwrap();
        let err: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        assert!(!out.status.success() && err["code"] == 11, "ADD with no agent running: {err}");
        assert!(err["details"].as_str().unwrap_or_default().contains("not reachable"), "{err}");
        // Their addresses are in the API before the agents start (so every agent's first
        // directory has them; the sandbox, and so the pod, is only set up below).
        api.set_pod_ips(&tb, ns, name, &[pod.ipv4.into(), pod.ipv6.into()]).unwrap();
        waiting.push((pod, ns, name, uid));
    }
    setup(&tb, &api);
    let mesh = KubeMesh::start(&tb, bins, &api).expect("starting the issuer and the agents");
    // The runtime's next attempt, with the agents up, sets the pods up.
    for (pod, ns, name, uid) in waiting {
        sandbox(&tb, bins, pod, ns, name, &uid).unwrap();
    }
    Cluster { mesh, api, tb }
}

/// Plays scheduler, runtime and kubelet for one pod (see `kube::run_pod`; the plugin's result
/// itself is checked in `cni/tests/plugin.rs`). Returns the pod's UID.
fn start_pod(tb: &Testbed, bins: &Bins, api: &ApiServer, pod: &Pod, ns: &str, name: &str, sa: &str) -> String {
    run_pod(tb, bins, api, pod, ns, name, sa).unwrap()
}

fn curl(pod: &Pod, url: &str, marker: &str) -> Output {
    pod.command("curl")
        .unwrap()
        .args(["-sS", "--max-time", "5", "-H", &format!("X-Marker: {marker}"), url])
        .output()
        .expect("running curl")
}

fn enrolled(mesh: &KubeMesh, node: usize, pod: &str) -> Option<serde_json::Value> {
    mesh.wait_log(node, "pod enrolled", Duration::from_secs(15), |l| l["pod"] == pod)
}

#[test]
fn pods_in_opted_in_namespaces_are_meshed_from_the_api_and_the_cni_plugin_and_others_are_left_alone() {
    let test = "kube_pods_meshed";
    let Some(bins) = support::privileged(test) else { return };
    if support::kube_bins(test).is_none() {
        return;
    }
    // The client and a legacy pod exist before the agents start (their CNI records wait on disk).
    let c = cluster_with(
        "kpods",
        &bins,
        &[
            (1, 1, "shop", "frontend-1", "frontend"),
            (1, 2, "legacy", "old-client", "default"),
            (2, 2, "legacy", "old-server", "default"),
        ],
        &|tb, api| {
            // A pod that was running before meshless was installed: no CNI record, only its
            // cgroup (named after its UID, as kubelet names it) with a process in its netns.
            let pod = tb.pod(1, 3);
            let uid =
                api.create_pod(tb, "shop", "early-1", "early", "node1", serde_json::json!({"app": "early"})).unwrap();
            let cgroup = tb.node(1).cgroup.join(format!("pod{uid}"));
            std::fs::create_dir_all(&cgroup).unwrap();
            tb.spawn(pod.netns.command("sleep", Some(&cgroup)).unwrap().arg("600")).unwrap();
            api.set_pod_ips(tb, "shop", "early-1", &[pod.ipv4.into(), pod.ipv6.into()]).unwrap();
        },
    );
    let (tb, api, mesh) = (&c.tb, &c.api, &c.mesh);
    assert!(
        mesh.log_lines(1).iter().any(|l| l["message"] == "pod enrolled" && l["pod"] == "shop/early-1"),
        "a pod running before meshless was installed (no CNI record) was not found from its cgroup: {}",
        mesh.log_tail(1)
    );
    assert!(
        enrolled(mesh, 1, "shop/frontend-1").is_some(),
        "a pod announced before the agent started was not enrolled: {}",
        mesh.log_tail(1)
    );
    // A CNI record that names another netns for early-1 (a forged or stale sandbox) is checked
    // against the pod's own processes: the pod stays where it runs, and that ADD is refused.
    let cookie = |pod: &str| meshless_tests::mesh::pod_status(tb, 1, pod).map(|s| s["netns_cookie"].clone());
    let before = cookie("shop/early-1");
    let early_uid = api.api(tb, "GET", "/api/v1/namespaces/shop/pods/early-1", None).unwrap()["metadata"]["uid"]
        .as_str()
        .unwrap()
        .to_string();
    let forged = run_cni(&bins.cni, "ADD", &KubeMesh::cni_dir(tb, 1), tb.pod(1, 4), "shop", "early-1", &early_uid);
    let err: serde_json::Value = serde_json::from_slice(&forged.unwrap().stdout).unwrap_or_default();
    assert!(err["details"].as_str().unwrap_or_default().contains("another network namespace"), "{err}");
    assert_eq!(cookie("shop/early-1"), before, "early-1 stays in its own netns");
    let del = run_cni(&bins.cni, "DEL", &KubeMesh::cni_dir(tb, 1), tb.pod(1, 4), "shop", "early-1", "").unwrap();
    assert!(del.status.success());
    assert!(
        mesh.wait_log(1, "pod is outside the mesh; its connections pass untouched", Duration::from_secs(5), |l| l
            ["pod"]
            == "legacy/old-client")
            .is_some(),
        "the pod of an unlabelled namespace should be known and left alone: {}",
        mesh.log_tail(1)
    );

    // A pod created now, on node 2, in the opted-in namespace: meshed within seconds.
    let t = Instant::now();
    start_pod(tb, &bins, api, tb.pod(2, 1), "shop", "backend-1", "backend");
    let line = enrolled(mesh, 2, "shop/backend-1")
        .unwrap_or_else(|| panic!("backend-1 was never enrolled: {}", mesh.log_tail(2)));
    wait_listening(&tb.pod(2, 1).netns, 15008).unwrap();
    eprintln!(
        "kube: time to mesh a new pod (Pod created → CNI ADD → podIP → enrolled, 15008 listening): {} ms",
        t.elapsed().as_millis()
    );
    assert_eq!(line["id"], "spiffe://cluster.local/ns/shop/sa/backend");
    assert!(
        line["mode"].as_str().unwrap_or_default().starts_with("STRICT (namespace label"),
        "the namespace label sets the mode: {line}"
    );

    let (client, legacy_client, server, legacy_server) = (tb.pod(1, 1), tb.pod(1, 2), tb.pod(2, 1), tb.pod(2, 2));
    let body = "kube-response-body-5c1e";
    for p in [server, legacy_server] {
        tb.spawn(p.command(&bins.testbin).unwrap().args(["http-serve", "8080", body])).unwrap();
        wait_listening(&p.netns, 8080).unwrap();
    }
    let dump = Dump::start(tb, 1, "node1-eth0").unwrap();
    let secret = "kube-meshed-marker-9d3b";
    let out = curl(client, &format!("http://{}:8080/{secret}", server.ipv4), secret);
    assert_eq!(String::from_utf8_lossy(&out.stdout), body, "meshed call: {}", String::from_utf8_lossy(&out.stderr));
    // A Service in front of backend-1, with its EndpointSlice as the endpoint controller writes
    // it (no controller runs here, no kube-proxy either): the frontend's call to the ClusterIP is
    // carried over the mesh to backend-1, resolved by the agent from the watched objects.
    api.create_service(tb, "shop", "backend", "198.19.200.20", "backend-1", server.ipv4.into()).unwrap();
    let via_service = "kube-service-marker-2f6a";
    let reached = wait_for(Duration::from_secs(10), || {
        let out = curl(client, &format!("http://198.19.200.20/{via_service}"), via_service);
        (String::from_utf8_lossy(&out.stdout) == body).then_some(())
    });
    assert!(reached.is_some(), "the ClusterIP never answered through the mesh: {}", mesh.log_tail(1));
    // Control: a meshed client to a pod outside the mesh goes in plaintext, and the capture sees it.
    let plain = "kube-plaintext-control-3e8a";
    let out = curl(client, &format!("http://{}:8080/{plain}", legacy_server.ipv4), plain);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        body,
        "call to a legacy pod: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A client outside the mesh cannot reach the STRICT pod in plaintext.
    let out = curl(legacy_client, &format!("http://{}:8080/strict-probe", server.ipv4), "x");
    assert!(!out.status.success(), "plaintext reached a STRICT pod: {}", String::from_utf8_lossy(&out.stdout));
    // A pod the agent cannot place yet (its object and IP are known, the runtime has not called
    // the CNI plugin): its connections are refused by the kernel, never sent in plaintext.
    let late = tb.pod(1, 4);
    let uid = api.create_pod(tb, "shop", "late-1", "late", "node1", serde_json::json!({"app": "late"})).unwrap();
    api.set_pod_ips(tb, "shop", "late-1", &[late.ipv4.into(), late.ipv6.into()]).unwrap();
    let early = "kube-unplaced-pod-marker-51aa";
    let out = curl(late, &format!("http://{}:8080/{early}", server.ipv4), early);
    assert!(!out.status.success(), "a pod unknown to the agent got through: {}", String::from_utf8_lossy(&out.stdout));
    // curl's exit status 7: the connect itself failed (the kernel's EPERM), at once.
    assert_eq!(out.status.code(), Some(7), "{}", String::from_utf8_lossy(&out.stderr));
    let added = run_cni(&bins.cni, "ADD", &KubeMesh::cni_dir(tb, 1), late, "shop", "late-1", &uid).unwrap();
    assert!(added.status.success(), "{}", String::from_utf8_lossy(&added.stdout));
    // ADD returned only once the agent had set the pod up: no waiting after it.
    let state = meshless_tests::mesh::pod_status(tb, 1, "shop/late-1");
    assert_eq!(state.as_ref().map(|s| s["state"].clone()), Some("enrolled".into()), "right after ADD: {state:?}");
    // A sandbox of a pod the agent never hears of (no Pod object): refused once the wait ends.
    let ghost = tb.pod(1, 2);
    let refused = run_cni(&bins.cni, "ADD", &KubeMesh::cni_dir(tb, 1), ghost, "shop", "ghost-1", "u-ghost").unwrap();
    let err: serde_json::Value = serde_json::from_slice(&refused.stdout).unwrap_or_default();
    assert!(!refused.status.success() && err["code"] == 11, "{err}");
    assert!(err["details"].as_str().unwrap_or_default().contains("not known to the agent"), "{err}");
    // The runtime tears the failed sandbox down.
    assert!(run_cni(&bins.cni, "DEL", &KubeMesh::cni_dir(tb, 1), ghost, "shop", "ghost-1", "")
        .unwrap()
        .status
        .success());
    let out = curl(late, &format!("http://{}:8080/{secret}", server.ipv4), secret);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        body,
        "once placed, the pod is meshed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let segs = dump.finish(tb).unwrap();
    assert!(!seen(&segs, early), "the unplaced pod's request crossed the wire");
    assert!(seen(&segs, plain), "control failed: the capture should show the legacy call's plaintext");
    assert!(!seen(&segs, secret), "the meshed request crossed the wire in plaintext");
    assert!(!seen(&segs, via_service), "the call through the Service crossed the wire in plaintext");
    assert!(
        segs.iter().any(|s| s.dst_port == 15008 && s.payload.starts_with(&[0x17, 0x03, 0x03])),
        "no TLS records to 15008"
    );
    let decision = mesh.wait_log(2, "inbound decision", Duration::from_secs(5), |l| {
        l["src_id"] == "spiffe://cluster.local/ns/shop/sa/frontend" && l["decision"] == "allow"
    });
    assert!(decision.is_some(), "node2 never authorized frontend's identity: {}", mesh.log_tail(2));
    // The issuer signed node 1 frontend's identity (and only node 1 asked for it).
    let issued: Vec<_> = mesh
        .issuer_lines()
        .into_iter()
        .filter(|l| l["message"] == "issued a certificate" && l["id"] == "spiffe://cluster.local/ns/shop/sa/frontend")
        .collect();
    assert!(!issued.is_empty() && issued.iter().all(|l| l["node"] == "node1"), "issuer log: {}", mesh.issuer_tail());

    // Deleted: unenrolled, its listeners gone.
    remove_pod(tb, &bins, api, server, "shop", "backend-1").unwrap();
    let gone = mesh.wait_log(2, "pod unenrolled", Duration::from_secs(15), |l| l["pod"] == "shop/backend-1");
    assert!(gone.is_some(), "a deleted pod was not unenrolled: {}", mesh.log_tail(2));
    assert!(wait_for(Duration::from_secs(10), || (!is_listening(&server.netns, 15008)).then_some(())).is_some());
    // The legacy pods were never enrolled.
    for node in [1, 2] {
        assert!(
            !mesh
                .log_lines(node)
                .iter()
                .any(|l| l["message"] == "pod enrolled" && l["pod"].as_str().is_some_and(|p| p.starts_with("legacy/"))),
            "a pod of an unlabelled namespace was enrolled on node{node}"
        );
    }
    // The readiness probe: ready while the agent serves, not once it is gone.
    let ready = |node: usize| tb.node(node).netns.command(&bins.meshless, None).unwrap().arg("ready").output().unwrap();
    for node in [1, 2] {
        let out = ready(node);
        assert!(
            out.status.success() && out.stdout.starts_with(b"ready"),
            "node{node}'s serving agent is not ready: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    tb.stop(mesh.agents[1]);
    let out = ready(2);
    assert!(!out.status.success(), "`meshless ready` succeeded with no agent on node2");
}

/// The state file that describes what the API holds for node 2 (same pods, same policy), for
/// comparing decisions.
fn state_file_like(tb: &Testbed, pods: &[(&Pod, &str, &str)], policy: &str) -> std::path::PathBuf {
    let mut y =
        format!("trustDomain: cluster.local\nnode: node2\ncgroupParent: {}\npods:\n", tb.node(2).cgroup.display());
    for (pod, name, sa) in pods {
        y += &format!(
            "  - {{name: {name}, namespace: shop, serviceAccount: {sa}, node: node{}, ips: [\"{}\", \"{}\"], netns: {}, labels: {{app: {sa}}}}}\n",
            pod.node,
            pod.ipv4,
            pod.ipv6,
            pod.netns.path().display()
        );
    }
    y += "authorizationPolicies:\n";
    for line in policy.lines() {
        y += &format!("  {line}\n");
    }
    let path = tb.dir.join("equivalent-state.yaml");
    std::fs::write(&path, y).unwrap();
    path
}

fn policy_check(bins: &Bins, tb: &Testbed, source: &str, from: &str) -> String {
    let mut cmd = tb.node(2).netns.command(&bins.meshless, None).unwrap();
    cmd.args(["policy", "check", "--from", from, "--to", "shop/backend-1", "--port", "8080"]);
    if source != "agent" {
        cmd.args(["--state", source]);
    }
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "policy check: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn policy_resources_decide_as_the_state_file_does_and_an_invalid_one_gets_a_status_and_changes_nothing() {
    let test = "kube_policy_resources";
    let Some(bins) = support::privileged(test) else { return };
    if support::kube_bins(test).is_none() {
        return;
    }
    let c = cluster(
        "kpolicy",
        &bins,
        &[
            (1, 1, "shop", "frontend-1", "frontend"),
            (1, 2, "shop", "batch-1", "batch"),
            (2, 1, "shop", "backend-1", "backend"),
        ],
    );
    let (tb, api, mesh) = (&c.tb, &c.api, &c.mesh);
    let (frontend, batch, backend) = (tb.pod(1, 1), tb.pod(1, 2), tb.pod(2, 1));
    assert!(enrolled(mesh, 2, "shop/backend-1").is_some(), "{}", mesh.log_tail(2));
    tb.spawn(backend.command(&bins.testbin).unwrap().args(["http-serve", "8080", "ok"])).unwrap();
    wait_listening(&backend.netns, 8080).unwrap();
    let url = format!("http://{}:8080/", backend.ipv4);
    let works = |p: &Pod| curl(p, &url, "p").status.success();
    assert!(works(frontend) && works(batch), "no policy yet: both meshed clients get through");

    // The policy, as a user applies it.
    let object = ALLOW_FRONTEND;
    api.kubectl_ok(tb, &["apply", "-f", "-"], Some(object)).unwrap();
    let accepted = |name: &str| {
        api.kubectl_ok(
            tb,
            &[
                "get",
                "authorizationpolicy",
                "-n",
                "shop",
                name,
                "-o",
                "jsonpath={.status.accepted}|{.status.reason}|{.status.observedGeneration}|{.status.message}",
            ],
            None,
        )
        .unwrap_or_default()
    };
    let status = wait_for(Duration::from_secs(15), || {
        Some(accepted("backend-allow-frontend")).filter(|s| s.starts_with("True|Enforced|1|"))
    });
    assert!(
        status.is_some(),
        "the issuer never reported the policy accepted: {:?}; issuer log: {}",
        accepted("backend-allow-frontend"),
        mesh.issuer_tail()
    );
    let table = api.kubectl_ok(tb, &["get", "authorizationpolicies", "-n", "shop"], None).unwrap();
    assert!(
        table.contains("ACTION") && table.contains("ACCEPTED") && table.contains("ALLOW") && table.contains("True"),
        "kubectl get columns: {table}"
    );
    let denied = wait_for(Duration::from_secs(10), || (!works(batch)).then_some(()));
    assert!(denied.is_some(), "batch still reaches backend under an ALLOW-only-frontend policy: {}", mesh.log_tail(2));
    assert!(works(frontend), "frontend is the allowed caller");
    let line = mesh.wait_log(2, "inbound decision", Duration::from_secs(5), |l| {
        l["src_id"] == "spiffe://cluster.local/ns/shop/sa/batch" && l["decision"] == "deny"
    });
    assert!(line.is_some(), "node2 logged no deny for batch: {}", mesh.log_tail(2));

    // The same objects in a state file decide the same way (one set of semantics).
    let state = state_file_like(
        tb,
        &[(frontend, "frontend-1", "frontend"), (batch, "batch-1", "batch"), (backend, "backend-1", "backend")],
        // The same object as an item of the state file's list.
        &format!("- {}", ALLOW_FRONTEND.trim_end().replace('\n', "\n  ")),
    );
    for (from, want) in
        [("spiffe://cluster.local/ns/shop/sa/frontend", "allow"), ("spiffe://cluster.local/ns/shop/sa/batch", "deny")]
    {
        let live = policy_check(&bins, tb, "agent", from);
        let offline = policy_check(&bins, tb, state.to_str().unwrap(), from);
        assert_eq!(
            (live.as_str(), offline.as_str()),
            (want, want),
            "{from}: the API-fed agent and the state file disagree"
        );
    }

    // An ALLOW for batch that needs an HTTP method (L7): accepted, the field named, and it allows
    // nothing (meshless cannot check the method, so it must not let batch in on its behalf).
    let policy = |name: &str, spec: &str| {
        format!(
            "apiVersion: meshless.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: shop}}\n\
             spec:\n  selector: {{matchLabels: {{app: backend}}}}\n{spec}"
        )
    };
    let status_is = |name: &str, prefix: &str| {
        wait_for(Duration::from_secs(15), || Some(accepted(name)).filter(|s| s.starts_with(prefix))).unwrap_or_else(
            || panic!("{name}: want {prefix}, got {:?}; issuer log: {}", accepted(name), mesh.issuer_tail()),
        )
    };
    let agent_saw = |name: &str| {
        mesh.wait_log(2, "policy object not enforced as written", Duration::from_secs(15), |l| {
            l["object"] == format!("AuthorizationPolicy shop/{name}")
        })
        .unwrap_or_else(|| panic!("node 2's agent never named {name}: {}", mesh.log_tail(2)))
    };
    let allow_l7 = policy(
        "allow-batch-get",
        "  action: ALLOW\n  rules:\n  - from: [{source: {principals: [cluster.local/ns/shop/sa/batch]}}]\n    \
         to: [{operation: {methods: [GET]}}]\n",
    );
    api.kubectl_ok(tb, &["apply", "-f", "-"], Some(&allow_l7)).unwrap();
    let status = status_is("allow-batch-get", "True|PartiallyEnforced|1|");
    assert!(
        status.contains("methods") && status.contains("allows no more"),
        "the status names the field and how: {status}"
    );
    let table = api.kubectl_ok(tb, &["get", "authorizationpolicies", "-n", "shop", "-o", "wide"], None).unwrap();
    assert!(table.contains("allow-batch-get") && table.contains("MESSAGE") && table.contains("left out"), "{table}");
    agent_saw("allow-batch-get");
    assert!(!works(batch), "an ALLOW whose method meshless cannot check let batch in");
    assert!(works(frontend));

    // Each DENY below names what meshless can evaluate only in part, or cannot read at all: each
    // must stop the frontend (the policy's author wanted at least that), and lifting it restores it.
    let denies = [
        (
            "deny-frontend-get",
            "  action: DENY\n  rules:\n  - from: [{source: {principals: [cluster.local/ns/shop/sa/frontend]}}]\n    \
             to: [{operation: {methods: [GET]}}]\n",
            "True|PartiallyEnforced|1|",
        ),
        (
            "deny-frontend-when",
            "  action: DENY\n  rules:\n  - when: [{key: source.principal, values: [cluster.local/ns/shop/sa/frontend]}]\n",
            "True|Enforced|1|",
        ),
        (
            // A wildcard in the middle of a principal: admitted by the API server, unreadable for
            // meshless (and Istio): the DENY stands in for everything it selects.
            "deny-typo",
            "  action: DENY\n  rules:\n  - from: [{source: {principals: [\"cluster.local/ns/*/sa/nobody\"]}}]\n",
            "False|FailedClosed|1|",
        ),
    ];
    for (name, spec, want) in denies {
        api.kubectl_ok(tb, &["apply", "-f", "-"], Some(&policy(name, spec))).unwrap();
        let status = status_is(name, want);
        let stopped = wait_for(Duration::from_secs(10), || (!works(frontend)).then_some(()));
        assert!(stopped.is_some(), "{name} ({status}) left the frontend through: {}", mesh.log_tail(2));
        if want.starts_with("False") {
            assert!(status.contains("principals[0]") && status.contains("denies every"), "{status}");
            let d = mesh.wait_log(2, "inbound decision", Duration::from_secs(5), |l| {
                l["src_id"] == "spiffe://cluster.local/ns/shop/sa/frontend" && l["policy"] == "shop/deny-typo"
            });
            let caveats = d.as_ref().map(|d| d["caveats"].to_string()).unwrap_or_default();
            assert!(caveats.contains("fails closed"), "the decision log names the stand-in: {d:?}");
        } else if want.contains("Partially") {
            agent_saw(name);
        }
        api.kubectl_ok(tb, &["delete", "authorizationpolicy", "-n", "shop", name], None).unwrap();
        let back = wait_for(Duration::from_secs(10), || works(frontend).then_some(()));
        assert!(back.is_some(), "removing {name} did not restore the frontend: {}", mesh.log_tail(2));
    }
    let status = meshless_tests::mesh::status(tb, 2).expect("node 2 status");
    assert_eq!(status["policy_objects"]["PartiallyEnforced"], 1, "allow-batch-get: {status}");

    // The API server itself refuses the worst typos (the CRDs' schema), before any agent sees them.
    let refused = [
        policy("typo", "  action: ALOW\n"),
        policy("typo", "  rules: [{to: [{operation: {ports: [http]}}]}]\n"),
        policy("typo", "  rules: [{to: [{operation: {ports: [70000]}}]}]\n"),
        policy("typo", "  rules: [{from: [{source: {ipBlocks: [ten.0.0.0/8]}}]}]\n"),
        policy("typo", "  rules: [{from: [{source: {serviceAccounts: [a/b/c]}}]}]\n"),
        policy("typo", "  rules: [{when: [{key: source.principle, values: [x]}]}]\n"),
        "apiVersion: meshless.io/v1alpha1\nkind: PeerAuthentication\nmetadata: {name: typo, namespace: shop}\n\
         spec: {mtls: {mode: STRIKT}}\n"
            .to_string(),
    ];
    for object in &refused {
        let out = api.kubectl(tb, None, &["apply", "--dry-run=server", "-f", "-"], Some(object)).unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains("is invalid"), "admitted:\n{object}\n{err}");
    }
    let fine = policy("fine", "  rules: [{to: [{operation: {ports: [\"8080\", 9090]}}]}]\n");
    api.kubectl_ok(tb, &["apply", "--dry-run=server", "-f", "-"], Some(&fine)).unwrap();

    // A PeerAuthentication resource overrides the namespace label's mode.
    let pa = "apiVersion: meshless.io/v1alpha1\nkind: PeerAuthentication\nmetadata: {name: shop-permissive, namespace: shop}\n\
              spec:\n  mtls: {mode: PERMISSIVE}\n";
    api.kubectl_ok(tb, &["apply", "-f", "-"], Some(pa)).unwrap();
    let changed = mesh.wait_log(2, "inbound mode changed", Duration::from_secs(10), |l| {
        l["pod"] == "shop/backend-1"
            && l["mode"].as_str().is_some_and(|m| m.starts_with("PERMISSIVE (PeerAuthentication shop/shop-permissive"))
    });
    assert!(changed.is_some(), "the PeerAuthentication resource did not change backend's mode: {}", mesh.log_tail(2));
}

#[test]
fn the_issuer_signs_a_node_only_its_own_pods_identities_and_the_agent_may_only_read() {
    let test = "kube_node_authorization";
    let Some(bins) = support::privileged(test) else { return };
    if support::kube_bins(test).is_none() {
        return;
    }
    let c =
        cluster("kauthz", &bins, &[(1, 1, "shop", "frontend-1", "frontend"), (2, 1, "shop", "backend-1", "backend")]);
    let (tb, api, mesh) = (&c.tb, &c.api, &c.mesh);
    let request = |token: &std::path::Path, id: &str| {
        let mut cmd = tb.node(1).netns.command(&bins.meshless, None).unwrap();
        cmd.args(["ca", "request", "--issuer", &format!("{}:15012", meshless_tests::CONTROL_IPV4), "--issuer-token"])
            .arg(token)
            .arg("--bundle")
            .arg(&mesh.bundle)
            .args(["--id", id]);
        let out = cmd.output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let write_token = |name: &str, token: String| {
        let path = tb.dir.join(name);
        std::fs::write(&path, token).unwrap();
        path
    };
    let node1_token = tb.dir.join("issuer-token-node1");
    let (ok, out) = request(&node1_token, "spiffe://cluster.local/ns/shop/sa/frontend");
    assert!(ok && out.contains("issued spiffe://cluster.local/ns/shop/sa/frontend"), "control: node1's own pod: {out}");
    let (ok, out) = request(&node1_token, "spiffe://cluster.local/ns/shop/sa/backend");
    assert!(!ok && out.contains("is scheduled on node node1"), "node1's agent got node2's pod's identity: {out}");
    // Another ServiceAccount's token, bound to a pod on node 1, audience right: not an agent.
    let uid = api.api(tb, "GET", "/api/v1/namespaces/shop/pods/frontend-1", None).unwrap()["metadata"]["uid"]
        .as_str()
        .unwrap()
        .to_string();
    let other = write_token(
        "other-sa",
        api.token(tb, "shop", "frontend", Some("meshless-issuer"), Some(("frontend-1", &uid))).unwrap(),
    );
    let (ok, out) = request(&other, "spiffe://cluster.local/ns/shop/sa/frontend");
    assert!(!ok && out.contains("not the node agent's"), "{out}");
    // The agent's ServiceAccount, but not bound to an agent pod; and one for the wrong audience.
    let unbound = write_token(
        "unbound",
        api.token(tb, "meshless-system", "meshless-agent", Some("meshless-issuer"), None).unwrap(),
    );
    let (ok, out) = request(&unbound, "spiffe://cluster.local/ns/shop/sa/frontend");
    assert!(!ok && out.contains("not bound to a pod"), "{out}");
    let uid1 = &mesh.agent_pods[0];
    let api_aud = write_token(
        "api-audience",
        api.token(tb, "meshless-system", "meshless-agent", None, Some(("meshless-agent-node1", uid1))).unwrap(),
    );
    let (ok, out) = request(&api_aud, "spiffe://cluster.local/ns/shop/sa/frontend");
    assert!(!ok && out.contains("does not accept the token"), "{out}");
    let refusals = mesh
        .issuer_lines()
        .iter()
        .filter(|l| l["message"].as_str().is_some_and(|m| m.starts_with("refused a certificate request")))
        .count();
    assert!(refusals >= 4, "the issuer logs every refusal: {}", mesh.issuer_tail());

    // `meshless manifests all` is what `deploy/` holds: the server accepts it as it is.
    let all = std::process::Command::new(&bins.meshless).args(["manifests", "all"]).output().unwrap();
    let all = String::from_utf8(all.stdout).unwrap();
    let out = api.kubectl(tb, None, &["apply", "--server-side", "--dry-run=server", "-f", "-"], Some(&all)).unwrap();
    assert!(out.status.success(), "meshless manifests all: {}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("daemonset.apps/meshless-agent serverside-applied"));

    // RBAC: the agent reads what it needs and can write nothing.
    let agent_kc = api.dir.join("agent-node1.kubeconfig");
    let can = |kc: &std::path::Path, args: &[&str]| {
        let mut all = vec!["auth", "can-i"];
        all.extend_from_slice(args);
        let out = api.kubectl(tb, Some(kc), &all, None).unwrap();
        String::from_utf8_lossy(&out.stdout).trim() == "yes"
    };
    for read in [
        &["watch", "pods", "--all-namespaces"][..],
        &["list", "namespaces"],
        &["watch", "authorizationpolicies.meshless.io", "-A"],
    ] {
        assert!(can(&agent_kc, read), "the agent needs {read:?}");
    }
    for write in [
        &["create", "pods", "-n", "shop"][..],
        &["delete", "pods", "-n", "shop"],
        &["patch", "authorizationpolicies.meshless.io", "--subresource=status", "-n", "shop"],
        &["create", "tokenreviews.authentication.k8s.io"],
        &["get", "secrets", "-n", "meshless-system"],
    ] {
        assert!(!can(&agent_kc, write), "the agent must not be allowed to {write:?}");
    }
    let out = api.kubectl(tb, Some(&agent_kc), &["delete", "pod", "-n", "shop", "frontend-1"], None).unwrap();
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("forbidden"),
        "a forbidden write went through"
    );
    let issuer_kc = api.dir.join("issuer.kubeconfig");
    assert!(can(&issuer_kc, &["create", "tokenreviews.authentication.k8s.io"]));
    assert!(
        !can(&issuer_kc, &["get", "secrets", "-n", "meshless-system"]),
        "the issuer reads its CA from a mount, not the API"
    );
}

#[test]
fn an_api_server_restart_loses_no_traffic_and_no_enrollment_and_the_watches_resume() {
    let test = "kube_apiserver_restart";
    let Some(bins) = support::privileged(test) else { return };
    if support::kube_bins(test).is_none() {
        return;
    }
    let mut c =
        cluster("krestart", &bins, &[(1, 1, "shop", "frontend-1", "frontend"), (2, 1, "shop", "backend-1", "backend")]);
    let (client, server) = (c.tb.pod(1, 1).clone(), c.tb.pod(2, 1).clone());
    c.tb.spawn(server.command(&bins.testbin).unwrap().args(["http-serve", "8080", "ok"])).unwrap();
    wait_listening(&server.netns, 8080).unwrap();
    // Traffic throughout: 120 requests, 100 ms apart (bounded in count and time).
    let script = format!(
        "fails=0; for i in $(seq 1 120); do curl -sS --max-time 3 -o /dev/null http://{}:8080/loop-$i || fails=$((fails+1)); sleep 0.1; done; echo fails=$fails",
        server.ipv4
    );
    let mut load = client.command("sh").unwrap();
    load.args(["-c", &script]);
    let allowed = |tb: &Testbed| meshless_tests::mesh::inbound_decisions(tb, 2, "allow").unwrap_or(0);
    let before = allowed(&c.tb);
    let load = support::background(&mut load);
    // The restart comes once node 2's agent is carrying the load's requests.
    let carried = wait_for(Duration::from_secs(10), || (allowed(&c.tb) >= before + 5).then_some(()));
    assert!(
        carried.is_some(),
        "node2's agent allowed {} requests of the load within 10 s",
        allowed(&c.tb).saturating_sub(before)
    );
    let count =
        |mesh: &KubeMesh, n: usize, message: &str| mesh.log_lines(n).iter().filter(|l| l["message"] == message).count();
    let away = c.api.restart(&c.tb, Duration::from_secs(3)).expect("restarting the API server");
    let back = Instant::now();
    // Both agents noticed the outage…
    for node in [1, 2] {
        assert!(
            count(&c.mesh, node, "watch failed; retrying with backoff") > 0,
            "node{node} never noticed: {}",
            c.mesh.log_tail(node)
        );
    }
    // …and a pod created right after the restart is meshed: the watches follow changes again.
    start_pod(&c.tb, &bins, &c.api, c.tb.pod(1, 2), "shop", "batch-1", "batch");
    let meshed = c.mesh.wait_log(1, "pod enrolled", Duration::from_secs(60), |l| l["pod"] == "shop/batch-1");
    assert!(meshed.is_some(), "no enrollment after the restart: {}", c.mesh.log_tail(1));
    eprintln!(
        "kube: API server away {} ms; a pod created once it was back was enrolled {} ms later (watch resync)",
        away.as_millis(),
        back.elapsed().as_millis()
    );
    for node in [1, 2] {
        let resumed = wait_for(Duration::from_secs(10), || (count(&c.mesh, node, "watch resumed") > 0).then_some(()));
        assert!(resumed.is_some(), "node{node} never logged its pod watch resuming: {}", c.mesh.log_tail(node));
    }
    let (ok, _, stdout, stderr) = support::finish(load);
    assert!(ok && stdout.trim() == "fails=0", "requests failed across the API server restart: {stdout} {stderr}");
    // Nothing was enrolled twice or dropped by the resync.
    for (node, pod) in [(1, "shop/frontend-1"), (2, "shop/backend-1"), (1, "shop/batch-1")] {
        let lines = c.mesh.log_lines(node);
        let enrolled = lines.iter().filter(|l| l["message"] == "pod enrolled" && l["pod"] == pod).count();
        let dropped = lines.iter().filter(|l| l["message"] == "pod unenrolled" && l["pod"] == pod).count();
        assert_eq!((enrolled, dropped), (1, 0), "{pod} on node{node}: enrolled {enrolled}×, unenrolled {dropped}×");
    }
}
