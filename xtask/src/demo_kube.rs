//! `cargo xtask demo --kube`: the demo against a real Kubernetes API server (kube-apiserver 1.20
//! and etcd, built once by `cargo xtask`): `deploy/` applied with kubectl, namespaces opted in by
//! label, the issuer and one agent per node in Kubernetes mode with their ServiceAccount tokens,
//! pods created as Pod objects (this program plays the scheduler, kubelet and container runtime,
//! running the real `meshless-cni`), then a policy applied as a resource, with its status.

use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use meshless_tests::kube::{apply_deploy, run_pod, ApiServer, KubeBins, KubeMesh, ALLOW_FRONTEND};
use meshless_tests::mesh::{wait_listening, Bins};
use meshless_tests::{wait_for, Layout, Pod, Testbed};

fn curl(pod: &Pod, url: &str) -> String {
    match pod.command("curl").and_then(|mut c| Ok(c.args(["-sS", "--max-time", "5", url]).output()?)) {
        Ok(out) if out.status.success() => format!("OK: {}", String::from_utf8_lossy(&out.stdout).trim()),
        Ok(out) => format!("REFUSED: {}", String::from_utf8_lossy(&out.stderr).trim()),
        Err(e) => format!("error: {e}"),
    }
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("   | {l}\n")).collect()
}

pub fn run(bins: &Bins, kube: KubeBins, once: bool, stop: Arc<AtomicBool>) -> Result<()> {
    println!("== building the cluster: 2 nodes (network namespaces), 4 pod sandboxes");
    let tb = Testbed::new(Layout { label: "kdemo", pods: &[3, 1] })?;
    println!("== starting etcd and kube-apiserver v1.20 on the control-plane host");
    let api = ApiServer::start(&tb, kube)?;
    println!("== kubectl apply --server-side -k deploy/");
    print!("{}", indent(&apply_deploy(&tb, &api)?));
    api.create_namespace(&tb, "shop", Some("strict"))?;
    api.create_namespace(&tb, "legacy", None)?;
    println!("== namespaces: shop (label meshless.io/mode=strict), legacy (no label: left alone)");
    println!(
        "== the issuer (TokenReview node authorization) and one agent per node, each with its ServiceAccount token"
    );
    let mesh = KubeMesh::start(&tb, bins, &api)?;
    let (frontend, legacy, batch, backend) = (tb.pod(1, 1), tb.pod(1, 2), tb.pod(1, 3), tb.pod(2, 1));
    let pods = [
        (frontend, "shop", "frontend-1", "frontend"),
        (legacy, "legacy", "old-client", "default"),
        (batch, "shop", "batch-1", "batch"),
        (backend, "shop", "backend-1", "backend"),
    ];
    println!("== pods: Pod object → meshless-cni ADD → status.podIP (as kubelet and the runtime would)");
    for (pod, ns, name, sa) in pods {
        let t = Instant::now();
        run_pod(&tb, bins, &api, pod, ns, name, sa)?;
        let key = format!("{ns}/{name}");
        let line = wait_for(Duration::from_secs(15), || {
            mesh.log_lines(pod.node).into_iter().find(|l| {
                (l["message"] == "pod enrolled"
                    || l["message"] == "pod is outside the mesh; its connections pass untouched")
                    && l["pod"] == key.as_str()
            })
        });
        match line {
            Some(l) if l["message"] == "pod enrolled" => println!(
                "   {key:<20} node{}  {}  meshed in {} ms as {}, mode {}",
                pod.node,
                pod.ipv4,
                t.elapsed().as_millis(),
                l["id"].as_str().unwrap_or("?"),
                l["mode"].as_str().unwrap_or("?")
            ),
            Some(_) => {
                println!("   {key:<20} node{}  {}  outside the mesh (namespace not opted in)", pod.node, pod.ipv4)
            }
            None => println!("   {key:<20} node{}  not seen by the agent yet", pod.node),
        }
    }
    tb.spawn(
        backend
            .command(&bins.testbin)?
            .args(["http-serve", "8080", "hello from the backend pod"])
            .stderr(Stdio::null()),
    )?;
    wait_listening(&backend.netns, 8080)?;
    let url = format!("http://{}:8080/", backend.ipv4);
    println!("== calls to shop/backend-1 (STRICT, no policy yet)");
    println!("   frontend-1 → {}", curl(frontend, &url));
    println!("   batch-1    → {}", curl(batch, &url));
    println!("   old-client → {}   (plaintext from outside the mesh)", curl(legacy, &url));
    println!("== a Service in front of backend-1 (its EndpointSlice as the endpoint controller writes it)");
    api.create_service(&tb, "shop", "backend", "198.19.200.20", "backend-1", backend.ipv4.into())?;
    let service_url = "http://198.19.200.20/";
    let answered = wait_for(Duration::from_secs(15), || {
        let body = curl(frontend, service_url);
        body.contains("hello").then_some(body)
    });
    println!("   frontend-1 → {service_url} → {}", answered.unwrap_or_else(|| "no answer".into()));
    if let Some(l) =
        mesh.log_lines(1).into_iter().find(|l| l["message"] == "outbound connection to a Service over HBONE")
    {
        crate::demo::print_service_route(&l);
    }
    println!("== kubectl apply: only frontend's ServiceAccount may call backend on 8080");
    print!("{}", indent(&api.kubectl_ok(&tb, &["apply", "-f", "-"], Some(ALLOW_FRONTEND))?));
    wait_for(Duration::from_secs(15), || {
        let s = api
            .kubectl_ok(
                &tb,
                &[
                    "get",
                    "authorizationpolicy",
                    "-n",
                    "shop",
                    "backend-allow-frontend",
                    "-o",
                    "jsonpath={.status.accepted}",
                ],
                None,
            )
            .ok()?;
        (s == "True").then_some(())
    });
    print!("{}", indent(&api.kubectl_ok(&tb, &["get", "authorizationpolicies", "-A", "-o", "wide"], None)?));
    std::thread::sleep(Duration::from_millis(300));
    println!("   frontend-1 → {}", curl(frontend, &url));
    println!("   batch-1    → {}", curl(batch, &url));
    let explain = tb
        .node(2)
        .netns
        .command(&bins.meshless, None)?
        .args(["policy", "explain", "--from", "shop/batch-1", "--to", "shop/backend-1", "--port", "8080"])
        .output()?;
    println!("== meshless policy explain (node2's agent), for batch-1:");
    print!("{}", indent(&String::from_utf8_lossy(&explain.stdout)));
    if once {
        println!("== done; removing everything");
        return Ok(());
    }
    println!("== the cluster stays up until Ctrl-C. Try:");
    println!(
        "   ip netns exec {} {} --kubeconfig {} get pods -A",
        tb.fabric.name,
        api.kubectl_path().display(),
        api.admin.display()
    );
    println!("   ip netns exec {} curl -s {url}", frontend.netns.name);
    crate::demo::HOLDING.store(true, Ordering::SeqCst);
    while !stop.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(200));
    }
    println!("== stopping; removing everything");
    Ok(())
}
