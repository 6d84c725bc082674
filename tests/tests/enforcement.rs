//! Enforcement, with real agents, real eBPF (sk_lookup inbound capture) and real connections:
//! the modes with and without an agent, authorization policy decided on the destination node
//! from the peer certificate, policy changes under load, health probes, bad policy.

mod support;

use std::time::{Duration, Instant};

use meshless_tests::mesh::{pod_status, wait_listening, wait_pod_state, Mesh};
use meshless_tests::{Layout, Pod, Testbed};

/// What a client saw: (reply, how the reply ended: "eof", "reset", or a connect error).
fn exchange(bins: &support::Bins, from: &Pod, to: &str, text: &str) -> (String, String) {
    let (_, out, err) = support::run(from.command(&bins.testbin).unwrap().args(["end", to, text]));
    match serde_json::from_str::<serde_json::Value>(out.trim()) {
        Ok(v) => {
            (v["reply"].as_str().unwrap_or_default().to_string(), v["end"].as_str().unwrap_or_default().to_string())
        }
        Err(_) => (String::new(), format!("connect failed: {}", err.trim())),
    }
}

/// The `inbound decision` lines of node `node`'s agent for `dst` (pod name) and port.
fn decisions(mesh: &Mesh, node: usize, dst: &str, port: u16) -> Vec<serde_json::Value> {
    mesh.log_lines(node)
        .into_iter()
        .filter(|l| {
            l["message"] == "inbound decision"
                && l["dst"].as_str().is_some_and(|d| d.ends_with(dst))
                && l["dst_port"] == port
        })
        .collect()
}

fn last_decision(mesh: &Mesh, node: usize, dst: &str, port: u16) -> serde_json::Value {
    meshless_tests::wait_for(Duration::from_secs(5), || decisions(mesh, node, dst, port).pop())
        .unwrap_or_else(|| panic!("no inbound decision logged for {dst}:{port}; log:\n{}", mesh.log_summary(node)))
}

fn peer_auth(name: &str, app: &str, mode: &str) -> String {
    format!(
        "  - metadata: {{name: {name}, namespace: default}}\n    spec: {{selector: {{matchLabels: {{app: {app}}}}}, mtls: {{mode: {mode}}}}}\n"
    )
}

/// Node 2 has three enrolled pods, STRICT, PERMISSIVE and DISABLE; node 1's pod 1 is outside
/// the mesh (a legacy client that never touches meshless).
#[test]
fn plaintext_meets_strict_permissive_and_disable_with_and_without_an_agent() {
    let Some(bins) = support::privileged("plaintext_meets_strict_permissive_and_disable_with_and_without_an_agent")
    else {
        return;
    };
    let tb = Testbed::new(Layout { label: "modes", pods: &[1, 3] }).expect("testbed");
    let policy = String::from("peerAuthentications:\n")
        + &peer_auth("strict", "pod1-n2", "STRICT")
        + &peer_auth("permissive", "pod2-n2", "PERMISSIVE")
        + &peer_auth("off", "pod3-n2", "DISABLE")
        + "authorizationPolicies:\n  - metadata: {name: no-9000, namespace: default}\n    spec:\n      selector: {matchLabels: {app: pod2-n2}}\n      action: DENY\n      rules: [{to: [{operation: {ports: [\"9000\"]}}]}]\n";
    let args = |_| vec![];
    let mut mesh = Mesh::start_full(&tb, &bins, &|p| Some(p.node == 2), &args, &[], &policy).expect("agents");
    let legacy = tb.pod(1, 1);
    let (strict, permissive, off) = (tb.pod(2, 1), tb.pod(2, 2), tb.pod(2, 3));
    for p in [strict, permissive, off] {
        for port in [8000, 9000] {
            tb.spawn(p.command(&bins.testbin).unwrap().args(["addr-serve", &port.to_string()])).unwrap();
            wait_listening(&p.netns, port).unwrap();
        }
    }
    let addr = |p: &Pod, port: u16| meshless_tests::sockaddr(p.ipv4.into(), port);
    let addr6 = |p: &Pod, port: u16| meshless_tests::sockaddr(p.ipv6.into(), port);

    // STRICT: reset at once (never a hang), logged with the source address and port, counted.
    let started = Instant::now();
    let (reply, end) = exchange(&bins, legacy, &addr(strict, 8000), "hello");
    assert!(
        reply.is_empty() && end.contains("reset"),
        "plaintext to a STRICT pod must be reset, got {end:?} {reply:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(3), "the refusal must be immediate, took {:?}", started.elapsed());
    let d = last_decision(&mesh, 2, "pod1-n2", 8000);
    assert_eq!((d["mode"].as_str(), d["decision"].as_str()), (Some("STRICT"), Some("deny")), "{d}");
    assert!(d["src_addr"].as_str().unwrap().starts_with(&legacy.ipv4.to_string()), "source address logged: {d}");
    let (_, end6) = exchange(&bins, legacy, &addr6(strict, 8000), "hello");
    assert!(end6.contains("reset"), "over IPv6 too, got {end6:?}");

    // PERMISSIVE: policy with an unauthenticated source, then delivery to the app.
    let (reply, end) = exchange(&bins, legacy, &addr(permissive, 8000), "hello");
    assert_eq!(
        (reply.as_str(), end.as_str()),
        ("127.0.0.6", "eof"),
        "PERMISSIVE delivers (the app sees 127.0.0.6); log:\n{}",
        mesh.log_summary(2)
    );
    let d = last_decision(&mesh, 2, "pod2-n2", 8000);
    assert_eq!(
        (d["mode"].as_str(), d["decision"].as_str(), d["transport"].as_str()),
        (Some("PERMISSIVE"), Some("allow"), Some("plaintext")),
        "{d}"
    );
    let (reply, end) = exchange(&bins, legacy, &addr(permissive, 9000), "hello");
    assert!(reply.is_empty() && end.contains("reset"), "the DENY on 9000 applies to plaintext: {end:?}");
    let d = last_decision(&mesh, 2, "pod2-n2", 9000);
    assert_eq!(
        (d["decision"].as_str(), d["policy"].as_str(), d["rule"].as_i64()),
        (Some("deny"), Some("default/no-9000"), Some(0)),
        "{d}"
    );

    // DISABLE: untouched, the app sees the real client.
    let (reply, end) = exchange(&bins, legacy, &addr(off, 8000), "hello");
    assert_eq!(
        (reply.as_str(), end.as_str()),
        (legacy.ipv4.to_string().as_str(), "eof"),
        "DISABLE passes plaintext through"
    );
    assert!(decisions(&mesh, 2, "pod3-n2", 8000).is_empty(), "a DISABLE pod's plaintext never reaches the agent");

    // DISABLE that a DENY selects: authorization still applies (as in Istio), so its plaintext
    // is steered to the agent and decided; without the DENY it is untouched again.
    let denying = policy.clone()
        + "  - metadata: {name: off-no-9000, namespace: default}\n    spec:\n      selector: {matchLabels: {app: pod3-n2}}\n      action: DENY\n      rules: [{to: [{operation: {ports: [\"9000\"]}}]}]\n";
    mesh.set_policy(&tb, &denying).unwrap();
    let kernel = |mode: &'static str| {
        move |l: &serde_json::Value| {
            l["message"] == "inbound mode changed" && l["pod"] == "default/pod3-n2" && l["kernel"] == mode
        }
    };
    assert!(mesh.wait_log(2, "inbound mode changed", kernel("PERMISSIVE")).is_some(), "{}", mesh.log_summary(2));
    let (reply, end) = exchange(&bins, legacy, &addr(off, 9000), "hello");
    assert!(reply.is_empty() && end.contains("reset"), "the DENY applies to DISABLE plaintext: {end:?}");
    let d = last_decision(&mesh, 2, "pod3-n2", 9000);
    assert_eq!((d["decision"].as_str(), d["policy"].as_str()), (Some("deny"), Some("default/off-no-9000")), "{d}");
    let (reply, end) = exchange(&bins, legacy, &addr(off, 8000), "hello");
    assert_eq!((reply.as_str(), end.as_str()), ("127.0.0.6", "eof"), "allowed DISABLE plaintext is delivered");
    mesh.set_policy(&tb, &policy).unwrap();
    assert!(mesh.wait_log(2, "inbound mode changed", kernel("DISABLE")).is_some(), "{}", mesh.log_summary(2));
    let (reply, _) = exchange(&bins, legacy, &addr(off, 9000), "hello");
    assert_eq!(reply, legacy.ipv4.to_string(), "without the DENY, DISABLE plaintext is untouched again");

    // No agent on node 2: STRICT still refuses (the pinned program drops what it cannot steer),
    // PERMISSIVE and DISABLE pass straight to the app.
    tb.signal(mesh.agents[1], libc::SIGKILL);
    assert!(tb.wait_exit(mesh.agents[1], Duration::from_secs(10)).is_some(), "agent killed");
    let started = Instant::now();
    let (reply, end) = exchange(&bins, legacy, &addr(strict, 8000), "hello");
    assert!(
        reply.is_empty() && !end.contains("eof"),
        "STRICT without an agent must refuse plaintext, got {end:?} {reply:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(3), "refused at once, not a hang: {:?}", started.elapsed());
    let (reply, _) = exchange(&bins, legacy, &addr(permissive, 8000), "hello");
    assert_eq!(reply, legacy.ipv4.to_string(), "PERMISSIVE without an agent passes to the app directly");
    let (reply, _) = exchange(&bins, legacy, &addr(off, 8000), "hello");
    assert_eq!(reply, legacy.ipv4.to_string());

    // A new agent steers again.
    mesh.spawn_agent(&tb, &bins, 2).expect("restarted agent");
    let (reply, end) = exchange(&bins, legacy, &addr(permissive, 8000), "hello");
    assert_eq!(
        (reply.as_str(), end.as_str()),
        ("127.0.0.6", "eof"),
        "after the restart PERMISSIVE goes through the agent again"
    );
    let (_, end) = exchange(&bins, legacy, &addr(strict, 8000), "hello");
    assert!(end.contains("reset"), "and STRICT is refused by the agent: {end:?}");
    // Decided by the restarted agent (its own log holds only what it decided).
    let d = last_decision(&mesh, 2, "pod1-n2", 8000);
    assert_eq!(
        (d["mode"].as_str(), d["decision"].as_str(), d["transport"].as_str()),
        (Some("STRICT"), Some("deny"), Some("plaintext")),
        "the restarted agent refused the plaintext as STRICT: {d}"
    );

    // Modes change live: the STRICT pod becomes PERMISSIVE and the PERMISSIVE one STRICT.
    let swapped = String::from("peerAuthentications:\n")
        + &peer_auth("strict", "pod2-n2", "STRICT")
        + &peer_auth("permissive", "pod1-n2", "PERMISSIVE")
        + &peer_auth("off", "pod3-n2", "DISABLE");
    let before = decisions(&mesh, 2, "pod2-n2", 8000).len();
    mesh.set_policy(&tb, &swapped).unwrap();
    let applied = meshless_tests::wait_for(Duration::from_secs(10), || {
        (exchange(&bins, legacy, &addr(strict, 8000), "hello").0 == "127.0.0.6").then_some(())
    });
    assert!(applied.is_some(), "the mode change never applied:\n{}", mesh.log_summary(2));
    let (reply, end) = exchange(&bins, legacy, &addr(permissive, 8000), "hello");
    assert!(reply.is_empty() && end.contains("reset"), "now STRICT: refused after the agent saw it, got {end:?}");
    let d = last_decision(&mesh, 2, "pod2-n2", 8000);
    assert!(decisions(&mesh, 2, "pod2-n2", 8000).len() > before, "the refusal was decided (and logged) by the agent");
    assert_eq!((d["mode"].as_str(), d["decision"].as_str()), (Some("STRICT"), Some("deny")), "{d}");
}

/// `portLevelMtls` per port, in the kernel and in the agent: a STRICT pod with one DISABLE port,
/// and a DISABLE pod with one STRICT port (the inbound program stays attached for it), with and
/// without an agent.
#[test]
fn port_level_mtls_is_enforced_per_port_with_and_without_an_agent() {
    let Some(bins) = support::privileged("port_level_mtls") else {
        return;
    };
    let tb = Testbed::new(Layout { label: "portmtls", pods: &[1, 2] }).expect("testbed");
    let per_port = |name: &str, app: &str, mode: &str, port_mode: &str| {
        format!(
            "  - metadata: {{name: {name}, namespace: default}}\n    spec: {{selector: {{matchLabels: {{app: {app}}}}}, \
             mtls: {{mode: {mode}}}, portLevelMtls: {{9000: {{mode: {port_mode}}}}}}}\n"
        )
    };
    let policy = String::from("peerAuthentications:\n")
        + &per_port("strict-but-9000", "pod1-n2", "STRICT", "DISABLE")
        + &per_port("off-but-9000", "pod2-n2", "DISABLE", "STRICT");
    let args = |_| vec![];
    let mut mesh = Mesh::start_full(&tb, &bins, &|p| Some(p.node == 2), &args, &[], &policy).expect("agents");
    let (legacy, strict, off) = (tb.pod(1, 1), tb.pod(2, 1), tb.pod(2, 2));
    for p in [strict, off] {
        for port in [8000, 9000] {
            tb.spawn(p.command(&bins.testbin).unwrap().args(["addr-serve", &port.to_string()])).unwrap();
            wait_listening(&p.netns, port).unwrap();
        }
    }
    let addr = |p: &Pod, port: u16| meshless_tests::sockaddr(p.ipv4.into(), port);
    let untouched = legacy.ipv4.to_string();
    let check = |with_agent: bool| {
        let (reply, end) = exchange(&bins, legacy, &addr(strict, 8000), "hello");
        // With an agent: accepted and reset; without: refused by the pinned program.
        assert!(reply.is_empty() && !end.contains("eof"), "STRICT pod, 8000 (agent {with_agent}): {end:?}");
        let (reply, _) = exchange(&bins, legacy, &addr(strict, 9000), "hello");
        assert_eq!(reply, untouched, "its DISABLE port reaches the app untouched (agent {with_agent})");
        let (reply, _) = exchange(&bins, legacy, &addr(off, 8000), "hello");
        assert_eq!(reply, untouched, "DISABLE pod, 8000 (agent {with_agent})");
        let (reply, end) = exchange(&bins, legacy, &addr(off, 9000), "hello");
        assert!(
            reply.is_empty() && !end.contains("eof"),
            "its STRICT port refuses plaintext (agent {with_agent}): {end:?}"
        );
    };
    check(true);
    let d = last_decision(&mesh, 2, "pod2-n2", 9000);
    assert_eq!((d["mode"].as_str(), d["decision"].as_str()), (Some("STRICT"), Some("deny")), "{d}");
    assert!(decisions(&mesh, 2, "pod1-n2", 9000).is_empty(), "the DISABLE port never reaches the agent");
    let view: serde_json::Value =
        serde_json::from_str(&meshless_tests::mesh::admin_get(&tb, 2, "/api/policy").unwrap()).unwrap();
    let pods = view["pods"].as_array().unwrap();
    let of = |name: &str| pods.iter().find(|p| p["pod"] == name).map(|p| p["port_modes"].clone());
    assert_eq!(of("default/pod1-n2"), Some(serde_json::json!({"9000": "DISABLE"})), "{view}");
    assert_eq!(of("default/pod2-n2"), Some(serde_json::json!({"9000": "STRICT"})), "{view}");
    // No agent: the kernel alone keeps the per-port modes.
    tb.signal(mesh.agents[1], libc::SIGKILL);
    assert!(tb.wait_exit(mesh.agents[1], Duration::from_secs(10)).is_some(), "agent killed");
    check(false);
    mesh.spawn_agent(&tb, &bins, 2).expect("restarted agent");
    check(true);
}

/// Istio's documented L4 examples that the policy engine's table test
/// (`istios_documented_l4_examples_decide_as_istio_does`) replays, replayed again through the
/// live data path: namespaces, notNamespaces and ipBlocks, the `when` keys an L4 proxy
/// evaluates, allow-nothing beside allow-all, and a mesh-wide deny-all beating an ALLOW. Each row
/// is a real connection from a pod of that identity (or a plaintext client at that address),
/// decided by the destination node's agent. (The TCP task's rows run live in the Kubernetes test.)
#[test]
fn istios_l4_examples_decide_on_the_live_data_path_as_in_the_engines_table() {
    let Some(bins) = support::privileged("istio_l4_live") else {
        return;
    };
    let mut tb = Testbed::new(Layout { label: "istiol4", pods: &[5, 2] }).expect("testbed");
    for (node, j, ns, sa, app) in [
        (1, 1, "dev", "x", "dev-x"),
        (1, 2, "qa", "x", "qa-x"),
        (1, 3, "foo", "app", "foo-app"),
        (1, 4, "foo", "guest", "foo-guest"),
        (2, 1, "foo", "api", "api"),
        (2, 2, "foo", "db", "db"),
    ] {
        let p = &mut tb.nodes[node - 1].pods[j - 1];
        (p.namespace, p.service_account, p.app) = (ns.into(), sa.into(), app.into());
    }
    let legacy = tb.pod(1, 5).clone();
    // The table's ipBlock (203.0.113.0/24 there) is the plaintext client's own address here.
    let policy = format!(
        r#"
authorizationPolicies:
  - metadata: {{name: from-dev, namespace: foo}}
    spec:
      selector: {{matchLabels: {{app: api}}}}
      rules:
        - from: [{{source: {{namespaces: ["dev"]}}}}]
        - from: [{{source: {{ipBlocks: ["{}/32"]}}}}]
  - metadata: {{name: not-prod, namespace: foo}}
    spec:
      selector: {{matchLabels: {{app: api}}}}
      action: DENY
      rules: [{{from: [{{source: {{notNamespaces: ["dev", "foo"]}}}}], when: [{{key: destination.port, values: ["9090"]}}]}}]
  - metadata: {{name: when-keys, namespace: foo}}
    spec:
      selector: {{matchLabels: {{app: db}}}}
      rules:
        - when:
            - {{key: source.namespace, values: ["foo"]}}
            - {{key: source.principal, notValues: ["cluster.local/ns/foo/sa/guest"]}}
"#,
        legacy.ipv4
    );
    let args = |_| vec![];
    let mesh = Mesh::start_full(&tb, &bins, &|p| Some(p.name != "pod5"), &args, &[], &policy).expect("agents");
    let (api, db) = (tb.pod(2, 1), tb.pod(2, 2));
    for p in [api, db] {
        for port in [8080, 9090, 5432] {
            tb.spawn(p.command(&bins.testbin).unwrap().args(["addr-serve", &port.to_string()])).unwrap();
            wait_listening(&p.netns, port).unwrap();
        }
    }
    let replay = |rows: &[(&Pod, &Pod, u16, bool)], phase: &str| {
        for (from, to, port, want) in rows {
            let (reply, end) = exchange(&bins, from, &meshless_tests::sockaddr(to.ipv4.into(), *port), "hi");
            let allowed = !reply.is_empty() && end == "eof";
            assert_eq!(
                allowed,
                *want,
                "{phase}: {}/{} → {}/{}:{port}: got {reply:?} {end:?}; log:\n{}",
                from.namespace,
                from.app,
                to.namespace,
                to.app,
                mesh.log_summary(2)
            );
            let d = last_decision(&mesh, 2, &format!("{}-n{}", to.name, to.node), *port);
            assert_eq!(d["decision"], if *want { "allow" } else { "deny" }, "{phase}: {d}");
        }
    };
    let (dev, qa, foo_app, guest) = (tb.pod(1, 1), tb.pod(1, 2), tb.pod(1, 3), tb.pod(1, 4));
    replay(
        &[
            (dev, api, 8080, true),
            (dev, api, 9090, true),
            (qa, api, 8080, false),
            (&legacy, api, 8080, true),
            (&legacy, api, 9090, false),
            (foo_app, db, 5432, true),
            (guest, db, 5432, false),
            (qa, db, 5432, false),
        ],
        "namespaces, ipBlocks and when",
    );
    // allow-nothing for the namespace, allow-all for one workload of it.
    mesh.set_policy(
        &tb,
        "authorizationPolicies:\n  - metadata: {name: allow-nothing, namespace: foo}\n    spec: {}\n  - metadata: \
         {name: allow-all, namespace: foo}\n    spec: {selector: {matchLabels: {app: db}}, rules: [{}]}\n",
    )
    .unwrap();
    let applied = meshless_tests::wait_for(Duration::from_secs(10), || {
        exchange(&bins, dev, &meshless_tests::sockaddr(api.ipv4.into(), 8080), "hi").0.is_empty().then_some(())
    });
    assert!(applied.is_some(), "allow-nothing never applied:\n{}", mesh.log_summary(2));
    replay(&[(dev, api, 8080, false), (qa, db, 5432, true), (guest, db, 9090, true)], "allow-nothing, allow-all");
    // A mesh-wide deny-all (root namespace) beats the namespace's ALLOW.
    mesh.set_policy(
        &tb,
        "authorizationPolicies:\n  - metadata: {name: deny-all, namespace: meshless-system}\n    spec: {action: DENY, \
         rules: [{}]}\n  - metadata: {name: allow-all, namespace: foo}\n    spec: {rules: [{}]}\n",
    )
    .unwrap();
    let applied = meshless_tests::wait_for(Duration::from_secs(10), || {
        exchange(&bins, qa, &meshless_tests::sockaddr(db.ipv4.into(), 5432), "hi").0.is_empty().then_some(())
    });
    assert!(applied.is_some(), "deny-all never applied:\n{}", mesh.log_summary(2));
    replay(&[(foo_app, db, 5432, false), (dev, api, 8080, false)], "deny-all");
}

/// A restart while the issuer is unreachable: the restarted agent cannot get its pods'
/// certificates, and a STRICT pod must stay closed to plaintext meanwhile (the failing pod's mode
/// is held in the kernel with no listener), then be served again once the issuer is back.
#[test]
fn a_restart_with_the_issuer_down_never_lifts_strict() {
    let Some(bins) = support::privileged("a_restart_with_the_issuer_down_never_lifts_strict") else {
        return;
    };
    let tb = Testbed::new(Layout { label: "noissuer", pods: &[1, 1] }).expect("testbed");
    let policy = String::from("peerAuthentications:\n") + &peer_auth("strict", "pod1-n2", "STRICT");
    let args = |_| vec![];
    let mut mesh = Mesh::start_full(&tb, &bins, &|p| Some(p.node == 2), &args, &[], &policy).expect("agents");
    let (legacy, strict) = (tb.pod(1, 1), tb.pod(2, 1));
    tb.spawn(strict.command(&bins.testbin).unwrap().args(["addr-serve", "8000"])).unwrap();
    wait_listening(&strict.netns, 8000).unwrap();
    let to = meshless_tests::sockaddr(strict.ipv4.into(), 8000);
    let (reply, end) = exchange(&bins, legacy, &to, "hello");
    assert!(reply.is_empty() && end.contains("reset"), "control: STRICT refuses plaintext, got {end:?} {reply:?}");

    // The issuer goes away; node 2's agent dies and comes back without it.
    tb.stop(mesh.issuer);
    tb.signal(mesh.agents[1], libc::SIGKILL);
    assert!(tb.wait_exit(mesh.agents[1], Duration::from_secs(10)).is_some(), "agent killed");
    mesh.spawn_agent(&tb, &bins, 2).expect("the agent starts without the issuer");
    let failing = wait_pod_state(&tb, 2, "default/pod1-n2", "failing", |_| true);
    assert_eq!(failing["mode"], "STRICT", "the failing pod's STRICT mode is held in the kernel: {failing}");
    assert!(failing["netns_cookie"].is_u64(), "{failing}");
    for _ in 0..3 {
        let (reply, end) = exchange(&bins, legacy, &to, "hello");
        assert!(
            reply.is_empty() && !end.contains("eof"),
            "plaintext must not reach a STRICT pod whose agent has no certificate for it, got {end:?} {reply:?}"
        );
    }
    assert_eq!(pod_status(&tb, 2, "default/pod1-n2").unwrap()["state"], "failing", "still failing: nothing healed it");

    // The issuer is back: the pod is enrolled on a retry, and the agent refuses the plaintext.
    mesh.start_issuer(&tb, &bins).unwrap();
    wait_pod_state(&tb, 2, "default/pod1-n2", "enrolled", |_| true);
    let (reply, end) = exchange(&bins, legacy, &to, "hello");
    assert!(reply.is_empty() && end.contains("reset"), "STRICT once served again, got {end:?} {reply:?}");
    let d = last_decision(&mesh, 2, "pod1-n2", 8000);
    assert_eq!((d["mode"].as_str(), d["decision"].as_str()), (Some("STRICT"), Some("deny")), "{d}");
}

/// A pod's IPv6 link-local address on its eth0, once it is usable (not tentative).
fn link_local(pod: &Pod) -> String {
    let found = meshless_tests::wait_for(Duration::from_secs(10), || {
        let out = pod
            .netns
            .command("ip", None)
            .ok()?
            .args(["-6", "-o", "addr", "show", "dev", "eth0", "scope", "link"])
            .output()
            .ok()?;
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        if text.contains("tentative") {
            return None;
        }
        let word = text.split_whitespace().skip_while(|w| *w != "inet6").nth(1)?;
        Some(word.split('/').next()?.to_string())
    });
    found.unwrap_or_else(|| panic!("{} has no usable link-local address", pod.name))
}

/// An address the agent was never told about (the pod's IPv6 link-local one, reachable from its
/// node's bridge) must not be a way around STRICT: the connection is dropped, while a DISABLE
/// pod's link-local address still reaches its app (control) and the STRICT pod's listed
/// addresses are refused by the agent as ever.
#[test]
fn an_address_meshless_does_not_know_never_reaches_a_strict_app() {
    let Some(bins) = support::privileged("an_address_meshless_does_not_know_never_reaches_a_strict_app") else {
        return;
    };
    let tb = Testbed::new(Layout { label: "linklocal", pods: &[1, 2] }).expect("testbed");
    let policy = String::from("peerAuthentications:\n")
        + &peer_auth("strict", "pod1-n2", "STRICT")
        + &peer_auth("off", "pod2-n2", "DISABLE");
    let args = |_| vec![];
    let mesh = Mesh::start_full(&tb, &bins, &|p| Some(p.node == 2), &args, &[], &policy).expect("agents");
    let (strict, off) = (tb.pod(2, 1), tb.pod(2, 2));
    for p in [strict, off] {
        tb.spawn(p.command(&bins.testbin).unwrap().args(["addr-serve", "8000"])).unwrap();
        wait_listening(&p.netns, 8000).unwrap();
    }
    // From the node itself, over the pods' bridge: a neighbour on the pods' link.
    let from_node = |to: String| -> (String, String) {
        let (_, out, err) =
            support::run(tb.node(2).netns.command(&bins.testbin, None).unwrap().args(["end", &to, "hi"]));
        match serde_json::from_str::<serde_json::Value>(out.trim()) {
            Ok(v) => (v["reply"].as_str().unwrap_or_default().into(), v["end"].as_str().unwrap_or_default().into()),
            Err(_) => (String::new(), format!("connect failed: {}", err.trim())),
        }
    };
    let (reply, end) = from_node(format!("[{}%cbr0]:8000", link_local(off)));
    assert!(!reply.is_empty() && end == "eof", "control: a DISABLE pod's link-local address reaches its app: {end:?}");
    let (reply, end) = from_node(format!("[{}%cbr0]:8000", link_local(strict)));
    assert!(
        reply.is_empty() && !end.contains("eof"),
        "plaintext to a STRICT pod's link-local address must not reach its app, got {reply:?} {end:?}"
    );
    let (reply, end) = from_node(meshless_tests::sockaddr(strict.ipv6.into(), 8000));
    assert!(reply.is_empty() && end.contains("reset"), "its listed address is refused by the agent: {end:?}");
    let d = last_decision(&mesh, 2, "pod1-n2", 8000);
    assert_eq!((d["mode"].as_str(), d["decision"].as_str()), (Some("STRICT"), Some("deny")), "{d}");
}

const MATRIX_POLICY: &str = r#"
authorizationPolicies:
  - metadata: {name: api, namespace: default}
    spec:
      selector: {matchLabels: {app: pod1-n2}}
      action: ALLOW
      rules:
        - from: [{source: {principals: ["cluster.local/ns/default/sa/sa-pod1-n1"]}}]
          to: [{operation: {ports: ["7000"]}}]
  - metadata: {name: not-over-v6, namespace: default}
    spec:
      selector: {matchLabels: {app: pod1-n2}}
      action: DENY
      rules:
        - from: [{source: {ipBlocks: ["fd6d:6c00:1::/64"]}}]
  - metadata: {name: no-pod2-n1, namespace: default}
    spec:
      selector: {matchLabels: {app: pod2-n2}}
      action: DENY
      rules:
        - from: [{source: {principals: ["spiffe://cluster.local/ns/default/sa/sa-pod2-n1"]}}]
          to: [{operation: {notPorts: ["7001"]}}]
  - metadata: {name: watch-7001, namespace: default}
    spec:
      selector: {matchLabels: {app: pod2-n2}}
      action: AUDIT
      rules: [{to: [{operation: {ports: ["7001"]}}]}]
  - metadata: {name: anyone-but-pod1-n1, namespace: default}
    spec:
      selector: {matchLabels: {app: pod2-n1}}
      rules:
        - from: [{source: {notPrincipals: ["*/sa/sa-pod1-n1"]}}]
"#;

/// Two nodes, two pods each, all in the mesh, echo servers on 7000 and 7001 everywhere, and the
/// policy above.
fn matrix_cluster(label: &str, bins: &support::Bins) -> (Testbed, Mesh) {
    let tb = Testbed::new(Layout { label, pods: &[2, 2] }).expect("testbed");
    let args = |_| vec![];
    let mesh = Mesh::start_full(&tb, bins, &|_| Some(true), &args, &[], MATRIX_POLICY).expect("agents");
    for p in tb.pods() {
        for port in ["7000", "7001"] {
            tb.spawn(p.command(&bins.testbin).unwrap().args(["echo-serve", port])).unwrap();
            wait_listening(&p.netns, port.parse().unwrap()).unwrap();
        }
    }
    (tb, mesh)
}

/// Connects from `from` to `to`'s IPv4 (or IPv6) address and port: whether the echo came back.
fn call(bins: &support::Bins, from: &Pod, to: &Pod, port: u16, v6: bool) -> (bool, String) {
    let ip = if v6 { to.ipv6.into() } else { to.ipv4.into() };
    let (reply, end) = exchange(bins, from, &meshless_tests::sockaddr(ip, port), "ping");
    (reply == "ping<4 bytes>" && end == "eof", format!("{end} {reply:?}"))
}

/// The decision node `node` logged for this source identity, destination pod, port and family.
fn decided(mesh: &Mesh, node: usize, src: &str, dst: &Pod, port: u16, v6: bool) -> serde_json::Value {
    let ip = if v6 { dst.ipv6.to_string() } else { dst.ipv4.to_string() };
    meshless_tests::wait_for(Duration::from_secs(5), || {
        mesh.log_lines(node).into_iter().rev().find(|l| {
            l["message"] == "inbound decision"
                && l["src_id"] == src
                && l["dst_port"] == port
                && l["dst_addr"].as_str().is_some_and(|a| a.contains(&ip))
        })
    })
    .unwrap_or_else(|| panic!("node{node} logged no decision for {src} → {ip}:{port}:\n{}", mesh.log_summary(node)))
}

#[test]
fn identity_pairs_are_allowed_and_denied_by_the_deciding_rule_across_nodes_and_within_one() {
    let Some(bins) = support::privileged("identity_pairs_are_allowed_and_denied") else {
        return;
    };
    let (tb, mesh) = matrix_cluster("matrix", &bins);
    let (a1, a2, b1, b2) = (tb.pod(1, 1), tb.pod(1, 2), tb.pod(2, 1), tb.pod(2, 2));
    let id = |p: &Pod| tb.spiffe_id(meshless_tests::mesh::TRUST_DOMAIN, p);
    // (from, to, port, IPv6, allowed, deciding policy, rule)
    let matrix: &[(&Pod, &Pod, u16, bool, bool, &str, i64)] = &[
        (a1, b1, 7000, false, true, "default/api", 0),
        (a1, b1, 7001, false, false, "", -1), // ALLOW selects b1, none matched
        (a2, b1, 7000, false, false, "", -1), // another identity
        (b2, b1, 7000, false, false, "", -1), // within one node
        (a1, b1, 7000, true, false, "default/not-over-v6", 0), // DENY beats a matching ALLOW
        (a2, b2, 7000, false, false, "default/no-pod2-n1", 0),
        (a2, b2, 7001, false, true, "", -1), // notPorts: the DENY does not apply, default allow
        (a1, b2, 7000, false, true, "", -1), // no ALLOW selects b2: default allow
        (a1, a2, 7000, false, false, "", -1), // within node 1: notPrincipals excludes a1
        (b1, a2, 7000, false, true, "default/anyone-but-pod1-n1", 0),
    ];
    for &(from, to, port, v6, allowed, policy, rule) in matrix {
        let what = format!(
            "{}-n{} → {}-n{}:{port}{}",
            from.name,
            from.node,
            to.name,
            to.node,
            if v6 { " (IPv6)" } else { "" }
        );
        let (ok, seen) = call(&bins, from, to, port, v6);
        assert_eq!(ok, allowed, "{what}: the app saw {seen}");
        if !allowed {
            assert!(seen.contains("reset"), "{what}: a denied connection must be reset, not closed cleanly: {seen}");
        }
        let d = decided(&mesh, to.node, &id(from), to, port, v6);
        let want = if allowed { "allow" } else { "deny" };
        assert_eq!(
            (d["decision"].as_str(), d["policy"].as_str(), d["rule"].as_i64()),
            (Some(want), Some(policy), Some(rule)),
            "{what}: {d}"
        );
        assert_eq!(d["transport"], "hbone", "{what}");
        assert!(
            d["src_addr"].as_str().unwrap().contains(&if v6 { from.ipv6.to_string() } else { from.ipv4.to_string() }),
            "{what}: the tunnel came from the source pod's own address: {d}"
        );
    }
    let d = decided(&mesh, 2, &id(a2), b2, 7001, false);
    assert_eq!(d["audited"], "default/watch-7001 rules[0]", "AUDIT marks the decision without changing it: {d}");
    let no_allow = decided(&mesh, 2, &id(a1), b1, 7001, false);
    assert!(no_allow["reason"].as_str().unwrap().contains("no ALLOW matched"), "{no_allow}");

    // The same questions, asked of the running agent (admin endpoint) and offline (state file).
    let node2 = &tb.node(2).netns;
    let ask = |args: &[&str]| {
        let (ok, out, err) = support::run(node2.command(&bins.meshless, None).unwrap().args(["policy"]).args(args));
        assert!(ok, "meshless policy {args:?}: {err}");
        out
    };
    let state = mesh.states[1].to_str().unwrap().to_string();
    for source in [["--agent", "127.0.0.1:15000"], ["--state", state.as_str()]] {
        let q = |from: &str, to: &str, port: &str| -> Vec<String> {
            vec![
                "--from".into(),
                from.into(),
                "--to".into(),
                to.into(),
                "--port".into(),
                port.into(),
                source[0].into(),
                source[1].into(),
            ]
        };
        let check = |from: &str, to: &str, port: &str| {
            let args: Vec<String> = ["check".to_string()].into_iter().chain(q(from, to, port)).collect();
            ask(&args.iter().map(String::as_str).collect::<Vec<_>>()).trim().to_string()
        };
        assert_eq!(check("default/pod1-n1", "default/pod1-n2", "7000"), "allow", "{source:?}");
        assert_eq!(check(&id(a1), "default/pod1-n2", "7001"), "deny", "{source:?}");
        assert_eq!(check("198.19.1.11", "default/pod2-n2", "7000"), "allow", "plaintext, PERMISSIVE: {source:?}");
        let args: Vec<String> =
            ["explain".to_string()].into_iter().chain(q("default/pod2-n1", "default/pod2-n2", "7000")).collect();
        let text = ask(&args.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(
            text.starts_with("deny: spiffe://cluster.local/ns/default/sa/sa-pod2-n1 → default/pod2-n2 port 7000"),
            "{text}"
        );
        assert!(text.contains("denied by DENY policy default/no-pod2-n1 rules[0]"), "{text}");
        assert!(text.contains("mode:     PERMISSIVE (default"), "{text}");
        let args: Vec<String> =
            ["explain".to_string()].into_iter().chain(q("default/pod1-n1", "default/pod1-n2", "7001")).collect();
        let text = ask(&args.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(text.contains("no ALLOW matched (ALLOW policies selecting the workload: default/api)"), "{text}");
    }
    // Counted, by deciding rule.
    let (ok, metrics, err) = support::run(node2.command("curl", None).unwrap().args([
        "-sS",
        "--max-time",
        "5",
        "http://127.0.0.1:15000/metrics",
    ]));
    assert!(ok, "{err}");
    assert!(
        metrics.contains("meshless_inbound_decisions_total{transport=\"hbone\",mode=\"PERMISSIVE\",decision=\"deny\",by=\"default/no-pod2-n1 rules[0]\"} 1"),
        "{metrics}"
    );
    // The admin endpoint is the node's alone: pods cannot reach it.
    let gateway = meshless_tests::sockaddr(tb.node(2).ipv4.into(), 15000);
    let (reply, end) = exchange(&bins, b1, &gateway, "GET /metrics HTTP/1.0\r\n\r\n");
    assert!(reply.is_empty(), "a pod reached the admin endpoint: {end} {reply}");
}

/// The matrix policy with pod1-n2's ALLOW given to pod2-n1 instead of pod1-n1, plus `mesh`.
fn changed_policy(mesh_settings: &str) -> String {
    format!(
        "mesh: {mesh_settings}\n{}",
        MATRIX_POLICY.replace(
            "sa/sa-pod1-n1\"]}}]\n          to: [{operation: {ports: [\"7000\"]",
            "sa/sa-pod2-n1\"]}}]\n          to: [{operation: {ports: [\"7000\"]"
        )
    )
}

#[test]
fn policy_changes_apply_to_new_connections_at_once_and_optionally_close_denied_ones() {
    let Some(bins) = support::privileged("policy_changes_apply") else {
        return;
    };
    let (tb, mesh) = matrix_cluster("change", &bins);
    let (a1, a2, b1) = (tb.pod(1, 1), tb.pod(1, 2), tb.pod(2, 1));
    assert!(
        changed_policy("{}").contains("sa-pod2-n1\"]}}]\n          to: [{operation: {ports: [\"7000\"]"),
        "the test's edit applies"
    );
    assert!(call(&bins, a1, b1, 7000, false).0, "allowed before the change");
    // An established connection, a round trip every 50 ms for up to 20 s.
    let to = meshless_tests::sockaddr(b1.ipv4.into(), 7000);
    let mut long = support::LongLived::start(&tb, &bins, a1, &to, 20, "policy-long");
    long.wait_rounds(2, "the long-lived connection is established before the policy change");

    // The ALLOW moves from pod1-n1 to pod2-n1: new connections follow at once, the established
    // one is left alone.
    mesh.set_policy(&tb, &changed_policy("{}")).unwrap();
    let switched = meshless_tests::wait_for(Duration::from_secs(10), || {
        (!call(&bins, a1, b1, 7000, false).0 && call(&bins, a2, b1, 7000, false).0).then_some(())
    });
    assert!(switched.is_some(), "the new policy never applied:\n{}", mesh.log_summary(2));
    long.wait_more_rounds(
        5,
        "the established connection must go on carrying data after a policy change without closeDeniedConnections",
    );

    // With closeDeniedConnections, the next change resets established connections it denies.
    let started = Instant::now();
    mesh.set_policy(&tb, &changed_policy("{closeDeniedConnections: true}")).unwrap();
    let (ok, _, out, err) = long.finish();
    assert!(!ok, "the denied established connection was not closed: {out} {err}");
    assert!(started.elapsed() < Duration::from_secs(10), "closed when the policy changed, not at the end of the run");
    let closed = mesh.wait_log(2, "closing an established connection the new policy denies", |l| {
        l["src"].as_str().is_some_and(|s| s.contains("sa-pod1-n1"))
    });
    assert!(closed.is_some(), "{}", mesh.log_summary(2));
}

#[test]
fn dry_run_logs_what_it_would_deny_and_lets_it_through() {
    let Some(bins) = support::privileged("dry_run") else {
        return;
    };
    let (tb, mesh) = matrix_cluster("dryrun", &bins);
    let (a2, b1) = (tb.pod(1, 2), tb.pod(2, 1));
    assert!(!call(&bins, a2, b1, 7000, false).0, "denied while enforcing");
    mesh.set_policy(&tb, &format!("mesh: {{dryRun: true}}\n{MATRIX_POLICY}")).unwrap();
    let through =
        meshless_tests::wait_for(Duration::from_secs(10), || call(&bins, a2, b1, 7000, false).0.then_some(()));
    assert!(through.is_some(), "dry-run must let a policy denial through:\n{}", mesh.log_summary(2));
    let d = decided(&mesh, 2, &tb.spiffe_id(meshless_tests::mesh::TRUST_DOMAIN, a2), b1, 7000, false);
    assert_eq!(d["decision"], "dry_run_deny", "{d}");
    assert!(d["reason"].as_str().unwrap().contains("no ALLOW matched"), "{d}");
}

#[test]
fn a_malformed_policy_is_rejected_naming_the_field_and_an_l7_field_fails_closed() {
    let Some(bins) = support::privileged("malformed_policy") else {
        return;
    };
    let (tb, mesh) = matrix_cluster("badpolicy", &bins);
    let (a1, a2, b1) = (tb.pod(1, 1), tb.pod(1, 2), tb.pod(2, 1));
    // Valid YAML, an invalid CIDR in the first policy, and a change to another policy that must
    // not be applied either (no half-applied update).
    let bad = changed_policy("{}").replace(
        "- from: [{source: {ipBlocks: [\"fd6d:6c00:1::/64\"]}}]",
        "- from: [{source: {ipBlocks: [\"fd6d:6c00:1::/129\"]}}]",
    );
    assert_ne!(bad, changed_policy("{}"), "the test's edit applies");
    mesh.set_policy(&tb, &bad).unwrap();
    let rejected = mesh.wait_log(2, "state file rejected; the previous state keeps serving", |l| {
        l["error"].as_str().is_some_and(|e| {
            e.contains("authorizationPolicies[1] (default/not-over-v6): spec.rules[0].from[0].source.ipBlocks[0]")
        })
    });
    assert!(rejected.is_some(), "the error must name the policy and field:\n{}", mesh.log_summary(2));
    // The node's status says the last good state serves, and why.
    let refused = meshless_tests::wait_for(Duration::from_secs(10), || {
        let s = meshless_tests::mesh::status(&tb, 2)?;
        s["refused_update"].as_str().filter(|r| r.contains("ipBlocks[0]")).map(str::to_owned)
    });
    assert!(refused.is_some(), "status: {:?}", meshless_tests::mesh::status(&tb, 2));
    assert!(call(&bins, a1, b1, 7000, false).0, "the old policy still allows pod1-n1");
    assert!(!call(&bins, a2, b1, 7000, false).0, "and still denies pod2-n1 (the bad update was not half-applied)");
    // A field meshless cannot evaluate at L4 is accepted, named, and fails closed: the ALLOW rule
    // that needs an HTTP method matches nothing, so pod1-n1 loses its only grant.
    mesh.set_policy(
        &tb,
        &MATRIX_POLICY.replace("to: [{operation: {ports: [\"7000\"]}}]", "to: [{operation: {methods: [\"GET\"]}}]"),
    )
    .unwrap();
    let l7 = mesh.wait_log(2, "policy object not enforced as written", |l| {
        l["object"] == "AuthorizationPolicy default/api"
            && l["problem"].as_str().is_some_and(|e| {
                e.contains("spec.rules[0].to[0].operation.methods: an HTTP (L7) attribute")
                    && e.contains("allows no more than Istio's would")
            })
    });
    assert!(l7.is_some(), "{}", mesh.log_summary(2));
    let denied =
        meshless_tests::wait_for(Duration::from_secs(10), || (!call(&bins, a1, b1, 7000, false).0).then_some(()));
    assert!(denied.is_some(), "an ALLOW that needs an HTTP method must allow nothing:\n{}", mesh.log_summary(2));
    let d = decided(&mesh, 2, &tb.spiffe_id(meshless_tests::mesh::TRUST_DOMAIN, a1), b1, 7000, false);
    assert_eq!(d["decision"], "deny", "{d}");
    assert!(d["caveats"].as_str().is_some_and(|c| c.contains("default/api: partially enforced")), "{d}");
}

#[test]
fn kubelet_probes_reach_strict_pods_and_other_node_traffic_does_not() {
    let Some(bins) = support::privileged("kubelet_probes") else {
        return;
    };
    let tb = Testbed::new(Layout { label: "probes", pods: &[1, 1] }).expect("testbed");
    let strict = "peerAuthentications:\n  - metadata: {name: default, namespace: meshless-system}\n    spec: {mtls: {mode: STRICT}}\n";
    let args = |_| vec![];
    let mut mesh = Mesh::start_full(&tb, &bins, &|_| Some(true), &args, &[], strict).expect("agents");
    let pod = tb.pod(2, 1);
    tb.spawn(pod.command(&bins.testbin).unwrap().args(["addr-serve", "8080"])).unwrap();
    wait_listening(&pod.netns, 8080).unwrap();
    let node = tb.node(2);
    let to = meshless_tests::sockaddr(pod.ipv4.into(), 8080);
    let to6 = meshless_tests::sockaddr(pod.ipv6.into(), 8080);
    let probe = |to: &str| support::run(node.kubelet_command(&bins.testbin).unwrap().args(["end", to, "probe"]));
    let other = |to: &str| support::run(node.netns.command(&bins.testbin, None).unwrap().args(["end", to, "probe"]));
    let check = |when: &str| {
        for to in [&to, &to6] {
            let (ok, out, err) = probe(to);
            assert!(
                ok && out.contains("\"end\":\"eof\""),
                "{when}: the kubelet's probe to {to} must reach the STRICT pod's app: {out} {err}"
            );
            let (_, out, err) = other(to);
            assert!(
                !out.contains("\"end\":\"eof\""),
                "{when}: another node process reached the STRICT pod's app: {out} {err}"
            );
        }
    };
    check("agent running");
    // A probe to a port the pod does not declare for its probes (say, one a probe of another pod
    // names with `httpGet.host`) gets no pass: the STRICT pod refuses it like any plaintext.
    tb.spawn(pod.command(&bins.testbin).unwrap().args(["addr-serve", "8081"])).unwrap();
    wait_listening(&pod.netns, 8081).unwrap();
    let (_, out, err) = probe(&meshless_tests::sockaddr(pod.ipv4.into(), 8081));
    assert!(!out.contains("\"end\":\"eof\""), "a probe reached an undeclared port of the STRICT pod: {out} {err}");
    let refused = mesh.wait_log(2, "inbound decision", |l| l["mode"] == "STRICT" && l["decision"] == "deny");
    assert!(refused.is_some(), "the other node process was refused by the agent:\n{}", mesh.log_summary(2));
    assert!(
        !mesh.log_lines(2).iter().any(|l| l["message"] == "inbound decision" && l["decision"] == "allow"),
        "probes never went through the agent"
    );
    // With no agent the pinned programs go on: probes pass, other node traffic does not.
    tb.signal(mesh.agents[1], libc::SIGKILL);
    assert!(tb.wait_exit(mesh.agents[1], Duration::from_secs(10)).is_some());
    check("no agent");
    mesh.spawn_agent(&tb, &bins, 2).expect("restart");
    check("agent restarted");
}

#[test]
fn plaintext_to_the_tunnel_port_and_a_certificate_of_another_identity_are_refused() {
    let Some(bins) = support::privileged("tunnel_port_and_identity") else {
        return;
    };
    let (tb, mesh) = matrix_cluster("impostor", &bins);
    let b1 = tb.pod(2, 1);
    let target = meshless_tests::sockaddr(b1.ipv4.into(), 7000);
    let tunnel = meshless_tests::sockaddr(b1.ipv4.into(), 15008);
    // Certificates: pod1-n1's identity (the one the policy allows) from a foreign CA; pod2-n1's
    // (denied) and pod1-n1's (control) from the mesh's own CA.
    let foreign = tb.dir.join("foreign");
    meshless_tests::mesh::run_ok(
        std::process::Command::new(&bins.meshless).args(["ca", "init", "--out"]).arg(&foreign),
    )
    .unwrap();
    let id = |p: &Pod| tb.spiffe_id(meshless_tests::mesh::TRUST_DOMAIN, p);
    let issue = |ca: &std::path::Path, who: &Pod, name: &str| {
        meshless_tests::mesh::run_ok(
            std::process::Command::new(&bins.meshless)
                .args(["ca", "issue", "--id", &id(who), "--name", name, "--ca-dir"])
                .arg(ca)
                .arg("--out")
                .arg(&tb.dir),
        )
        .unwrap();
        (tb.dir.join(format!("{name}.pem")), tb.dir.join(format!("{name}-key.pem")))
    };
    let peer = |cert: &(std::path::PathBuf, std::path::PathBuf)| {
        let (_, out, err) = support::run(
            tb.node(1)
                .netns
                .command(&bins.peer, None)
                .unwrap()
                .args(["ok", &tunnel])
                .arg(&cert.0)
                .arg(&cert.1)
                .arg(&target),
        );
        (out.trim().to_string(), err)
    };
    let (out, err) = peer(&issue(&foreign, tb.pod(1, 1), "forged"));
    assert!(out.contains("error"), "a foreign CA's certificate for an allowed identity must fail TLS: {out} {err}");
    let (out, err) = peer(&issue(&mesh.ca_dir, tb.pod(1, 2), "denied"));
    assert_eq!(out, r#"{"status":403}"#, "a genuine certificate of a denied identity is refused by policy: {err}");
    let (out, err) = peer(&issue(&mesh.ca_dir, tb.pod(1, 1), "allowed"));
    assert_eq!(out, r#"{"reply":"hello"}"#, "control: the allowed identity's genuine certificate goes through: {err}");

    // Plaintext straight to the tunnel port: no TLS, no way in; the app never sees it.
    let legacy_request = "CONNECT 198.19.2.11:7000 HTTP/1.1\r\n\r\nping";
    let (reply, end) = exchange(&bins, tb.pod(1, 1), &tunnel, legacy_request);
    assert!(!reply.contains("ping"), "plaintext through 15008 reached the app: {end} {reply:?}");
    assert!(
        mesh.wait_log(2, "inbound tunnel connection refused or failed", |l| l["error"]
            .as_str()
            .is_some_and(|e| e.contains("TLS")))
            .is_some(),
        "the agent refused the plaintext on 15008 at the TLS layer:\n{}",
        mesh.log_summary(2)
    );
}
