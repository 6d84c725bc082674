//! Tables of connections and the verdict, mode and deciding rule each must get.

use super::*;

/// A pod as the policy sees it: namespace, labels and the mode label.
struct Pod {
    namespace: String,
    labels: BTreeMap<String, String>,
    label_mode: Option<LabelMode>,
}

impl Policies {
    fn for_pod(&self, p: &Pod) -> PodPolicy {
        self.for_workload(&Target { namespace: &p.namespace, labels: &p.labels, label_mode: p.label_mode })
    }
}

fn input(yaml: &str) -> PolicyInput {
    serde_yaml::from_str(yaml).expect("test YAML parses")
}

fn compile(yaml: &str) -> Policies {
    Policies::compile(&input(yaml)).unwrap_or_else(|e| panic!("policies must compile: {e}"))
}

fn pod(ns: &str, _name: &str, labels: &[(&str, &str)]) -> Pod {
    Pod {
        namespace: ns.into(),
        labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        label_mode: None,
    }
}

/// The destination pod's address (10.0.0.1) at `port`.
fn at(port: u16) -> SocketAddr {
    SocketAddr::new([10, 0, 0, 1].into(), port)
}

fn id(s: &str) -> SpiffeId {
    SpiffeId::new(s).unwrap()
}

/// (verdict, deciding policy/rule or reason kind) for a connection.
fn verdict(p: &PodPolicy, peer: Peer<'_>, port: u16) -> (bool, String) {
    let d = p.decide(&peer, at(port));
    let why = match &d.reason {
        Reason::Denied { by } | Reason::Allowed { by } => by.to_string(),
        Reason::NoAllowMatched { .. } => "no-allow-matched".into(),
        Reason::DefaultAllow => "default-allow".into(),
        Reason::PlaintextRefused => "plaintext-refused".into(),
        Reason::NotCaptured => "not-captured".into(),
    };
    (d.allowed, why)
}

const SHOP: &str = r#"
authorizationPolicies:
  - metadata: {name: api-allow, namespace: shop}
    spec:
      selector: {matchLabels: {app: api}}
      action: ALLOW
      rules:
        - from: [{source: {principals: ["cluster.local/ns/shop/sa/frontend"]}}]
          to: [{operation: {ports: ["8080"]}}]
        - from: [{source: {namespaces: ["ops"]}}]
          to: [{operation: {ports: ["9090"]}}]
  - metadata: {name: no-legacy, namespace: shop}
    spec:
      action: DENY
      rules:
        - from: [{source: {principals: ["spiffe://cluster.local/ns/legacy/*"]}}]
  - metadata: {name: watch, namespace: shop}
    spec:
      action: AUDIT
      rules:
        - to: [{operation: {ports: ["9090"]}}]
"#;

#[test]
fn deny_first_then_a_matching_allow_is_required_once_an_allow_policy_selects_the_workload() {
    let p = compile(SHOP);
    let api = p.for_pod(&pod("shop", "api", &[("app", "api")]));
    let frontend = id("spiffe://cluster.local/ns/shop/sa/frontend");
    let other = id("spiffe://cluster.local/ns/shop/sa/other");
    let ops = id("spiffe://cluster.local/ns/ops/sa/prometheus");
    let legacy = id("spiffe://cluster.local/ns/legacy/sa/frontend");
    let auth = |id| Peer::Authenticated { id, ip: None };
    let table: Vec<(Peer<'_>, u16, bool, &str)> = vec![
        (auth(&frontend), 8080, true, "shop/api-allow rules[0]"),
        (auth(&frontend), 9090, false, "no-allow-matched"),
        (auth(&other), 8080, false, "no-allow-matched"),
        (auth(&ops), 9090, true, "shop/api-allow rules[1]"),
        (auth(&ops), 8080, false, "no-allow-matched"),
        (auth(&legacy), 8080, false, "shop/no-legacy rules[0]"),
        (Peer::Plaintext { ip: "198.19.9.9".parse().unwrap() }, 8080, false, "no-allow-matched"),
    ];
    for (peer, port, allowed, why) in table {
        assert_eq!(verdict(&api, peer, port), (allowed, why.to_string()), "{peer} → shop/api:{port}");
    }
    // A workload no ALLOW policy selects: default allow, but the namespace-wide DENY still applies.
    let cart = p.for_pod(&pod("shop", "cart", &[("app", "cart")]));
    assert_eq!(verdict(&cart, auth(&other), 8080), (true, "default-allow".into()));
    assert_eq!(verdict(&cart, auth(&legacy), 8080), (false, "shop/no-legacy rules[0]".into()));
    // Policies of another namespace do not apply.
    let elsewhere = p.for_pod(&pod("other", "api", &[("app", "api")]));
    assert_eq!(verdict(&elsewhere, auth(&legacy), 8080), (true, "default-allow".into()));
}

#[test]
fn audit_marks_without_changing_the_outcome() {
    let p = compile(SHOP);
    let api = p.for_pod(&pod("shop", "api", &[("app", "api")]));
    let ops = id("spiffe://cluster.local/ns/ops/sa/prometheus");
    let d = api.decide(&Peer::Authenticated { id: &ops, ip: None }, at(9090));
    assert!(d.allowed);
    assert_eq!(d.audited.iter().map(ToString::to_string).collect::<Vec<_>>(), ["shop/watch rules[0]"]);
    let d = api.decide(&Peer::Authenticated { id: &ops, ip: None }, at(8080));
    assert!(!d.allowed && d.audited.is_empty());
}

#[test]
fn the_not_forms_ip_blocks_and_wildcards() {
    let p = compile(
        r#"
authorizationPolicies:
  - metadata: {name: deny-plaintext, namespace: db}
    spec:
      action: DENY
      rules: [{from: [{source: {notPrincipals: ["*"]}}]}]
  - metadata: {name: only-shop, namespace: db}
    spec:
      action: DENY
      rules: [{from: [{source: {notNamespaces: ["shop", "ops-*"]}}], to: [{operation: {notPorts: [9999]}}]}]
  - metadata: {name: lan, namespace: web}
    spec:
      action: ALLOW
      rules:
        - from: [{source: {ipBlocks: ["198.19.1.0/24", "fd6d:6c00:1::/64"], notIpBlocks: ["198.19.1.66"]}}]
        - from: [{source: {principals: ["*/sa/admin"]}}]
"#,
    );
    let db = p.for_pod(&pod("db", "db", &[]));
    let shop = id("spiffe://cluster.local/ns/shop/sa/api");
    let ops = id("spiffe://cluster.local/ns/ops-eu/sa/x");
    let web = id("spiffe://cluster.local/ns/web/sa/x");
    let plain = Peer::Plaintext { ip: "198.19.1.5".parse().unwrap() };
    assert_eq!(verdict(&db, plain, 5432), (false, "db/deny-plaintext rules[0]".into()), "notPrincipals * = no mTLS");
    assert_eq!(verdict(&db, Peer::Authenticated { id: &shop, ip: None }, 5432), (true, "default-allow".into()));
    assert_eq!(
        verdict(&db, Peer::Authenticated { id: &ops, ip: None }, 5432),
        (true, "default-allow".into()),
        "prefix"
    );
    assert_eq!(verdict(&db, Peer::Authenticated { id: &web, ip: None }, 5432), (false, "db/only-shop rules[0]".into()));
    assert_eq!(
        verdict(&db, Peer::Authenticated { id: &web, ip: None }, 9999),
        (true, "default-allow".into()),
        "notPorts"
    );

    let w = p.for_pod(&pod("web", "web", &[]));
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    let plain = |s: &str| Peer::Plaintext { ip: ip(s) };
    assert_eq!(verdict(&w, plain("198.19.1.5"), 80), (true, "web/lan rules[0]".into()));
    assert_eq!(verdict(&w, plain("::ffff:198.19.1.5"), 80), (true, "web/lan rules[0]".into()), "v4-mapped source");
    assert_eq!(verdict(&w, plain("fd6d:6c00:1::5"), 80), (true, "web/lan rules[0]".into()));
    assert_eq!(verdict(&w, plain("198.19.1.66"), 80), (false, "no-allow-matched".into()), "notIpBlocks");
    assert_eq!(verdict(&w, plain("198.19.2.5"), 80), (false, "no-allow-matched".into()));
    let admin = id("spiffe://cluster.local/ns/any/sa/admin");
    assert_eq!(
        verdict(&w, Peer::Authenticated { id: &admin, ip: Some(ip("198.19.2.5")) }, 80),
        (true, "web/lan rules[1]".into()),
        "suffix"
    );
}

#[test]
fn empty_rules_allow_nothing_and_an_empty_rule_allows_everything() {
    let p = compile(
        r#"
authorizationPolicies:
  - metadata: {name: allow-nothing, namespace: a}
    spec: {}
  - metadata: {name: allow-all, namespace: b}
    spec: {rules: [{}]}
  - metadata: {name: deny-nothing, namespace: c}
    spec: {action: DENY}
"#,
    );
    let peer_id = id("spiffe://cluster.local/ns/x/sa/y");
    let peer = Peer::Authenticated { id: &peer_id, ip: None };
    assert_eq!(verdict(&p.for_pod(&pod("a", "p", &[])), peer, 80), (false, "no-allow-matched".into()));
    assert_eq!(verdict(&p.for_pod(&pod("b", "p", &[])), peer, 80), (true, "b/allow-all rules[0]".into()));
    assert_eq!(verdict(&p.for_pod(&pod("c", "p", &[])), peer, 80), (true, "default-allow".into()));
}

#[test]
fn root_namespace_policies_apply_mesh_wide_and_selectors_narrow_them() {
    let p = compile(
        r#"
mesh: {rootNamespace: mesh-root}
authorizationPolicies:
  - metadata: {name: deny-legacy-everywhere, namespace: mesh-root}
    spec:
      action: DENY
      rules: [{from: [{source: {namespaces: ["legacy"]}}]}]
  - metadata: {name: dbs-only-from-shop, namespace: mesh-root}
    spec:
      selector: {matchLabels: {tier: db}}
      rules: [{from: [{source: {namespaces: ["shop"]}}]}]
"#,
    );
    let legacy = id("spiffe://cluster.local/ns/legacy/sa/x");
    let shop = id("spiffe://cluster.local/ns/shop/sa/x");
    let web = p.for_pod(&pod("web", "web", &[]));
    let db = p.for_pod(&pod("data", "pg", &[("tier", "db")]));
    let auth = |id| Peer::Authenticated { id, ip: None };
    assert_eq!(verdict(&web, auth(&legacy), 80), (false, "mesh-root/deny-legacy-everywhere rules[0]".into()));
    assert_eq!(verdict(&web, auth(&shop), 80), (true, "default-allow".into()));
    assert_eq!(verdict(&db, auth(&shop), 5432), (true, "mesh-root/dbs-only-from-shop rules[0]".into()));
    let other = id("spiffe://cluster.local/ns/web/sa/x");
    assert_eq!(verdict(&db, auth(&other), 5432), (false, "no-allow-matched".into()));
}

#[test]
fn the_most_specific_peer_authentication_sets_the_mode_and_unset_inherits() {
    let p = compile(
        r#"
peerAuthentications:
  - metadata: {name: default, namespace: meshless-system}
    spec: {mtls: {mode: STRICT}}
  - metadata: {name: relaxed, namespace: legacy}
    spec: {mtls: {mode: PERMISSIVE}}
  - metadata: {name: metrics-plain, namespace: legacy}
    spec: {selector: {matchLabels: {app: exporter}}, mtls: {mode: DISABLE}}
  - metadata: {name: inherit, namespace: legacy}
    spec: {selector: {matchLabels: {app: inherit}}, mtls: {mode: UNSET}}
"#,
    );
    let mode = |w: Pod| {
        let c = p.for_pod(&w).mode;
        (c.mode, c.scope, c.policy.map(|r| r.to_string()).unwrap_or_default())
    };
    assert_eq!(mode(pod("shop", "a", &[])), (Mode::Strict, "mesh", "meshless-system/default".into()));
    assert_eq!(mode(pod("legacy", "a", &[])), (Mode::Permissive, "namespace", "legacy/relaxed".into()));
    assert_eq!(
        mode(pod("legacy", "e", &[("app", "exporter")])),
        (Mode::Disable, "workload", "legacy/metrics-plain".into())
    );
    assert_eq!(
        mode(pod("legacy", "i", &[("app", "inherit")])),
        (Mode::Permissive, "namespace", "legacy/relaxed".into())
    );
    // A label may raise the mesh-wide STRICT? It is the top already; it may not lower it.
    let labelled_pod =
        |ns: &str, mode| Pod { label_mode: Some(LabelMode { mode, scope: "pod label" }), ..pod(ns, "l", &[]) };
    for lower in [Mode::Permissive, Mode::Disable] {
        assert_eq!(
            mode(labelled_pod("shop", lower)),
            (Mode::Strict, "mesh", "meshless-system/default".into()),
            "a {lower} label must not lower the mesh-wide STRICT"
        );
    }
    // A PeerAuthentication of the namespace wins over the mode label.
    let labelled =
        |ns: &str, mode| Pod { label_mode: Some(LabelMode { mode, scope: "namespace label" }), ..pod(ns, "l", &[]) };
    assert_eq!(mode(labelled("legacy", Mode::Strict)), (Mode::Permissive, "namespace", "legacy/relaxed".into()));
    let none = Policies::compile(&PolicyInput::default()).unwrap();
    // Where no PeerAuthentication applies, the label does.
    let c = none.for_pod(&labelled("x", Mode::Strict)).mode;
    assert_eq!((c.mode, c.scope, c.policy), (Mode::Strict, "namespace label", None));
    let c = none.for_pod(&pod("x", "y", &[])).mode;
    assert_eq!((c.mode, c.scope, c.policy), (Mode::Permissive, "default", None));
}

#[test]
fn plaintext_meets_the_mode_before_any_policy() {
    let p = compile(
        r#"
peerAuthentications:
  - metadata: {name: strict, namespace: s}
    spec: {mtls: {mode: STRICT}}
  - metadata: {name: off, namespace: d}
    spec: {mtls: {mode: DISABLE}}
authorizationPolicies:
  - metadata: {name: allow-all, namespace: s}
    spec: {rules: [{}]}
"#,
    );
    let plain = Peer::Plaintext { ip: "198.19.1.5".parse().unwrap() };
    assert_eq!(verdict(&p.for_pod(&pod("s", "a", &[])), plain, 80), (false, "plaintext-refused".into()));
    assert_eq!(verdict(&p.for_pod(&pod("d", "a", &[])), plain, 80), (true, "not-captured".into()));
    let peer_id = id("spiffe://cluster.local/ns/x/sa/y");
    let tls = Peer::Authenticated { id: &peer_id, ip: None };
    assert_eq!(verdict(&p.for_pod(&pod("s", "a", &[])), tls, 80), (true, "s/allow-all rules[0]".into()));
    assert_eq!(p.for_pod(&pod("d", "a", &[])).kernel_mode(), Mode::Disable);
}

#[test]
fn a_disable_workload_that_policies_select_still_has_its_plaintext_authorized() {
    let p = compile(
        r#"
peerAuthentications:
  - metadata: {name: off, namespace: d}
    spec: {mtls: {mode: DISABLE}}
authorizationPolicies:
  - metadata: {name: no-9000, namespace: d}
    spec:
      selector: {matchLabels: {app: guarded}}
      action: DENY
      rules: [{to: [{operation: {ports: ["9000"]}}]}]
  - metadata: {name: watch, namespace: d}
    spec: {selector: {matchLabels: {app: watched}}, action: AUDIT, rules: [{}]}
"#,
    );
    let plain = Peer::Plaintext { ip: "198.19.1.5".parse().unwrap() };
    let guarded = p.for_pod(&pod("d", "g", &[("app", "guarded")]));
    assert_eq!((guarded.mode.mode, guarded.kernel_mode()), (Mode::Disable, Mode::Permissive));
    assert_eq!(verdict(&guarded, plain, 9000), (false, "d/no-9000 rules[0]".into()));
    assert_eq!(verdict(&guarded, plain, 8000), (true, "default-allow".into()));
    let watched = p.for_pod(&pod("d", "w", &[("app", "watched")]));
    assert_eq!(watched.kernel_mode(), Mode::Disable, "AUDIT alone does not capture");
    assert_eq!(verdict(&watched, plain, 9000), (true, "not-captured".into()));
}

#[test]
fn unreadable_policies_fail_the_state_file_with_the_object_and_field_named() {
    let cases: &[(&str, &str)] = &[
        (
            "authorizationPolicies: [{metadata: {name: a, namespace: n}, spec: {rules: [{from: [{source: {ipBlocks: [\"10.0.0.0/33\"]}}]}]}}]",
            "authorizationPolicies[0] (n/a): spec.rules[0].from[0].source.ipBlocks[0]: \"10.0.0.0/33\" is not an IP address or CIDR block",
        ),
        (
            "authorizationPolicies: [{metadata: {name: a, namespace: n}, spec: {rules: [{to: [{operation: {ports: [\"http\"]}}]}]}}]",
            "spec.rules[0].to[0].operation.ports[0]",
        ),
        (
            "authorizationPolicies: [{metadata: {name: a, namespace: n}, spec: {rules: [{to: [{operation: {ports: [70000]}}]}]}}]",
            "is not a port",
        ),
        (
            "authorizationPolicies: [{metadata: {name: a, namespace: n}, spec: {rules: [{from: [{source: {principals: [\"a*b*\"]}}]}]}}]",
            "spec.rules[0].from[0].source.principals[0]",
        ),
        (
            "authorizationPolicies: [{metadata: {name: a, namespace: n}, spec: {rules: [{from: [{source: {}}]}]}}]",
            "spec.rules[0].from[0].source: must not be empty",
        ),
        (
            "authorizationPolicies: [{metadata: {name: a, namespace: n}, spec: {rules: [{from: [{source: {serviceAccounts: [\"a/b/c\"]}}]}]}}]",
            "spec.rules[0].from[0].source.serviceAccounts[0]",
        ),
        ("authorizationPolicies: [{metadata: {name: a, namespace: n}, spec: {action: CUSTOM}}]", "spec.action: CUSTOM"),
        ("authorizationPolicies: [{metadata: {name: a, namespace: n}, spec: {rules: [{when: [{key: x, values: [y]}]}]}}]", "spec.rules[0].when[0].key: \"x\" is not a condition key"),
        ("authorizationPolicies: [{metadata: {name: a, namespace: n}, spec: {rules: [{when: [{key: source.ip}]}]}}]", "spec.rules[0].when[0]: needs values"),
        ("authorizationPolicies: [{metadata: {name: a, namespace: n}, spec: {rules: [{when: [{key: destination.port, values: [x]}]}]}}]", "spec.rules[0].when[0].values[0]"),
        ("authorizationPolicies: [{metadata: {name: Bad_Name, namespace: n}}]", "metadata.name"),
        ("authorizationPolicies: [{metadata: {name: a, namespace: n}}, {metadata: {name: a, namespace: n}}]", "authorizationPolicies[1] (n/a): defined twice"),
        ("authorizationPolicies: [{kind: PeerAuthentication, metadata: {name: a, namespace: n}}]", "kind"),
        ("authorizationPolicies: [{apiVersion: v1, metadata: {name: a, namespace: n}}]", "apiVersion"),
        ("peerAuthentications: [{metadata: {name: a, namespace: n}, spec: {portLevelMtls: {http: {mode: DISABLE}}}}]", "peerAuthentications[0] (n/a): spec.portLevelMtls.http: is not a port"),
        ("mesh: {rootNamespace: \"\"}", "mesh.rootNamespace"),
    ];
    for (yaml, want) in cases {
        let err = Policies::compile(&input(yaml)).expect_err(yaml).to_string();
        assert!(err.contains(want), "error for {yaml}\nshould contain {want:?}\ngot: {err}");
    }
}

#[test]
fn istio_manifests_are_accepted_as_they_are() {
    let p = compile(
        r#"
authorizationPolicies:
  - apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata:
      name: httpbin
      namespace: foo
      uid: 9b5c1c1e-0000-0000-0000-000000000000
      resourceVersion: "123"
    spec:
      selector: {matchLabels: {app: httpbin, version: v1}}
      action: ALLOW
      rules:
        - from:
            - source: {principals: ["cluster.local/ns/default/sa/sleep"]}
            - source: {namespaces: ["dev"]}
          to:
            - operation: {ports: ["8000"]}
peerAuthentications:
  - apiVersion: security.istio.io/v1
    kind: PeerAuthentication
    metadata: {name: default, namespace: foo}
    spec: {mtls: {mode: STRICT}}
"#,
    );
    assert_eq!(p.counts(), (1, 1));
    let w = p.for_pod(&pod("foo", "httpbin", &[("app", "httpbin"), ("version", "v1")]));
    assert_eq!(w.mode.mode, Mode::Strict);
    let dev = id("spiffe://cluster.local/ns/dev/sa/anything");
    assert_eq!(verdict(&w, Peer::Authenticated { id: &dev, ip: None }, 8000), (true, "foo/httpbin rules[0]".into()));
}

const FRONTEND: &str = "spiffe://cluster.local/ns/shop/sa/frontend";
const BATCH: &str = "spiffe://cluster.local/ns/shop/sa/batch";

fn verdicts(p: &PodPolicy, port: u16) -> (bool, bool) {
    let (f, b) = (id(FRONTEND), id(BATCH));
    (
        verdict(p, Peer::Authenticated { id: &f, ip: None }, port).0,
        verdict(p, Peer::Authenticated { id: &b, ip: None }, port).0,
    )
}

fn states(p: &Policies) -> Vec<(String, &'static str)> {
    p.objects().iter().map(|o| (o.policy.to_string(), o.enforcement.state())).collect()
}

#[test]
fn a_deny_with_attributes_meshless_cannot_evaluate_denies_at_least_what_istio_would() {
    let p = compile(
        r#"
authorizationPolicies:
  - metadata: {name: deny-frontend-get, namespace: shop}
    spec:
      action: DENY
      rules:
        - from: [{source: {principals: ["cluster.local/ns/shop/sa/frontend"]}}]
          to: [{operation: {methods: [GET], paths: ["/admin*"]}}]
  - metadata: {name: deny-batch-header, namespace: shop}
    spec:
      selector: {matchLabels: {app: api}}
      action: DENY
      rules:
        - from: [{source: {principals: ["cluster.local/ns/shop/sa/batch"]}}]
          to: [{operation: {ports: ["9090"], methods: [POST]}}]
          when: [{key: "request.headers[x-debug]", values: ["1"]}]
"#,
    );
    let web = p.for_pod(&pod("shop", "web", &[]));
    assert_eq!(verdicts(&web, 8080), (false, true), "frontend denied on every port, whatever the method");
    let d = web.decide(&Peer::Authenticated { id: &id(FRONTEND), ip: None }, at(8080));
    assert!(
        d.caveats[0].contains("shop/deny-frontend-get: partially enforced") && d.caveats[0].contains("methods"),
        "{d:?}"
    );
    let api = p.for_pod(&pod("shop", "api", &[("app", "api")]));
    assert_eq!(verdicts(&api, 9090), (false, false), "batch denied on 9090 (the header condition treated as matching)");
    assert_eq!(verdicts(&api, 8080), (false, true), "the port, which meshless can evaluate, still narrows the DENY");
    assert_eq!(
        states(&p),
        [
            ("shop/deny-frontend-get".into(), "PartiallyEnforced"),
            ("shop/deny-batch-header".into(), "PartiallyEnforced")
        ]
    );
    let Enforcement::PartiallyEnforced { left_out } = &p.objects()[1].enforcement else { panic!() };
    let fields: Vec<&str> = left_out.iter().map(|e| e.field.as_str()).collect();
    assert_eq!(fields, ["spec.rules[0].to[0].operation.methods", "spec.rules[0].when[0]"]);
    assert!(left_out[1].reason.contains("treated as matching"), "{left_out:?}");
}

#[test]
fn an_allow_with_attributes_meshless_cannot_evaluate_allows_no_more_than_istio_would() {
    let p = compile(
        r#"
authorizationPolicies:
  - metadata: {name: api, namespace: shop}
    spec:
      action: ALLOW
      rules:
        - from: [{source: {principals: ["cluster.local/ns/shop/sa/frontend"]}}]
          to: [{operation: {methods: [GET]}}, {operation: {ports: ["9090"]}}]
        - from: [{source: {principals: ["cluster.local/ns/shop/sa/batch"]}}]
          to: [{operation: {ports: ["8080"]}}]
        - from: [{source: {principals: ["cluster.local/ns/shop/sa/batch"]}}]
          when: [{key: "request.auth.claims[iss]", values: ["https://accounts.example"]}]
        - from: [{source: {requestPrincipals: ["*"]}}]
"#,
    );
    let w = p.for_pod(&pod("shop", "api", &[]));
    assert_eq!(verdicts(&w, 8080), (false, true), "frontend's GET-only clause allows nothing; batch's port rule holds");
    assert_eq!(verdicts(&w, 9090), (true, false), "frontend's port clause still allows; batch's claim rule does not");
    let d = w.decide(&Peer::Authenticated { id: &id(FRONTEND), ip: None }, at(8080));
    assert!(matches!(d.reason, Reason::NoAllowMatched { .. }) && d.caveats[0].contains("methods"), "{d:?}");
    assert_eq!(states(&p), [("shop/api".into(), "PartiallyEnforced")]);
}

#[test]
fn an_object_that_cannot_be_read_fails_closed_for_what_it_would_select() {
    let yaml = r#"
authorizationPolicies:
  - metadata: {name: allow-frontend, namespace: shop}
    spec:
      action: ALLOW
      rules: [{from: [{source: {principals: ["cluster.local/ns/shop/sa/frontend"]}}]}]
  - metadata: {name: deny-bad-cidr, namespace: shop}
    spec:
      selector: {matchLabels: {app: api}}
      action: DENY
      rules: [{from: [{source: {ipBlocks: ["10.0.0.0/33"]}}]}]
  - metadata: {name: allow-bad-port, namespace: shop}
    spec:
      selector: {matchLabels: {app: web}}
      action: ALLOW
      rules: [{to: [{operation: {ports: ["http"]}}]}]
"#;
    assert!(Policies::compile(&input(yaml)).is_err(), "the state file refuses the set as a whole");
    let p = Policies::compile_failing_closed(&input(yaml));
    assert_eq!(
        states(&p),
        [
            ("shop/allow-frontend".into(), "Enforced"),
            ("shop/deny-bad-cidr".into(), "FailedClosed"),
            ("shop/allow-bad-port".into(), "FailedClosed")
        ]
    );
    assert_eq!(p.states(), BTreeMap::from([("Enforced", 1), ("FailedClosed", 2), ("PartiallyEnforced", 0)]));
    let api = p.for_pod(&pod("shop", "api", &[("app", "api")]));
    assert_eq!(verdicts(&api, 8080), (false, false), "an unreadable DENY denies everything it selects");
    let d = api.decide(&Peer::Authenticated { id: &id(FRONTEND), ip: None }, at(8080));
    assert!(d.caveats[0].contains("ipBlocks[0]") && d.caveats[0].contains("fails closed"), "{d:?}");
    let web = p.for_pod(&pod("shop", "web", &[("app", "web")]));
    assert_eq!(verdicts(&web, 8080), (true, false), "an unreadable ALLOW allows nothing; other ALLOWs still do");
    let other = p.for_pod(&pod("shop", "other", &[]));
    assert_eq!(verdicts(&other, 8080), (true, false), "workloads the broken objects do not select are unaffected");

    // Objects from the API server whose spec does not even parse: their action and selector, when
    // readable, decide the stand-in; otherwise the whole namespace (mesh, in the root) is covered.
    let read = |ns: &str, spec: serde_json::Value| {
        let meta = model::ObjectMeta { name: "broken".into(), namespace: ns.into(), ..Default::default() };
        read_object::<AuthorizationPolicy>(meta, spec).expect_err("must not parse")
    };
    let typo = read("shop", serde_json::json!({"action": "ALOW", "selector": {"matchLabels": {"app": "api"}}}));
    assert_eq!(typo.error.field, "spec.action");
    let shape = read(
        "shop",
        serde_json::json!({"action": "DENY", "selector": {"matchLabels": "app"}, "rules": [{"from": [{"source": {"principals": "x"}}]}]}),
    );
    assert_eq!(shape.error.field, "spec.rules[0].from[0].source.principals", "{shape:?}");
    let root = read("meshless-system", serde_json::json!({"action": "ALLOW", "rules": 3}));
    for (unreadable, pods, want) in [
        (*typo, vec![("shop", "api", true), ("shop", "web", false)], "unknown action: DENY of what it selects"),
        (
            *shape,
            vec![("shop", "api", true), ("shop", "web", true), ("bank", "x", false)],
            "no selector: the namespace",
        ),
    ] {
        let p = Policies::compile_failing_closed(&PolicyInput { unreadable: vec![unreadable], ..Default::default() });
        for (ns, app, denied) in pods {
            let w = p.for_pod(&pod(ns, app, &[("app", app)]));
            assert_eq!(verdicts(&w, 80) == (false, false), denied, "{want}: {ns}/{app}");
        }
    }
    let p = Policies::compile_failing_closed(&PolicyInput { unreadable: vec![*root], ..Default::default() });
    assert_eq!(verdicts(&p.for_pod(&pod("bank", "x", &[])), 80), (false, false), "a root-namespace ALLOW: mesh-wide");

    let meta = model::ObjectMeta { name: "broken".into(), namespace: "shop".into(), ..Default::default() };
    let pa = read_object::<PeerAuthentication>(meta, serde_json::json!({"mtls": {"mode": "STRIKT"}})).unwrap_err();
    let p = Policies::compile_failing_closed(&PolicyInput { unreadable: vec![*pa], ..Default::default() });
    assert_eq!(p.for_pod(&pod("shop", "x", &[])).mode.mode, Mode::Strict, "an unreadable PeerAuthentication: STRICT");
    assert_eq!(p.for_pod(&pod("bank", "x", &[])).mode.mode, Mode::Permissive);
    let good = read_object::<AuthorizationPolicy>(model::ObjectMeta::default(), serde_json::json!({"action": "DENY"}));
    assert_eq!(good.unwrap().spec.action, Action::Deny);
}

#[test]
fn istio_l4_conditions_and_service_accounts_decide_at_l4() {
    let p = compile(
        r#"
authorizationPolicies:
  - metadata: {name: conditions, namespace: shop}
    spec:
      action: DENY
      rules:
        - when: [{key: source.principal, values: ["cluster.local/ns/shop/sa/frontend"]}, {key: destination.port, values: ["8080"]}]
        - when: [{key: source.namespace, notValues: [shop]}]
        - when: [{key: remote.ip, values: ["192.0.2.0/24"]}]
        - when: [{key: destination.ip, values: ["10.0.0.2"]}, {key: source.principal, notValues: ["*/sa/frontend"]}]
  - metadata: {name: accounts, namespace: bank}
    spec:
      action: ALLOW
      rules:
        - from: [{source: {serviceAccounts: ["shop/frontend", teller]}}]
        - from: [{source: {notServiceAccounts: ["shop/frontend", "shop/batch", teller]}}]
          to: [{operation: {ports: ["9090"]}}]
"#,
    );
    assert_eq!(states(&p).iter().filter(|(_, s)| *s == "Enforced").count(), 2);
    let shop = p.for_pod(&pod("shop", "api", &[]));
    assert_eq!(verdicts(&shop, 8080), (false, true), "source.principal AND destination.port");
    assert_eq!(verdicts(&shop, 9090), (true, true));
    let other = id("spiffe://cluster.local/ns/bank/sa/x");
    let (allowed, why) = verdict(&shop, Peer::Authenticated { id: &other, ip: None }, 9090);
    assert_eq!((allowed, why.as_str()), (false, "shop/conditions rules[1]"), "source.namespace notValues");
    let (allowed, why) = verdict(&shop, Peer::Plaintext { ip: "192.0.2.7".parse().unwrap() }, 9090);
    assert_eq!((allowed, why.as_str()), (false, "shop/conditions rules[1]"), "plaintext has no namespace");
    let b = id(BATCH);
    let second = SocketAddr::new([10, 0, 0, 2].into(), 9090);
    let d = shop.decide(&Peer::Authenticated { id: &b, ip: Some("198.51.100.1".parse().unwrap()) }, second);
    assert_eq!(d.rule().map(|r| r.rule), Some(3), "destination.ip: {d:?}");
    let f = id(FRONTEND);
    let d = shop.decide(&Peer::Authenticated { id: &f, ip: Some("192.0.2.9".parse().unwrap()) }, second);
    assert_eq!(d.rule().map(|r| r.rule), Some(2), "remote.ip: {d:?}");

    let bank = p.for_pod(&pod("bank", "vault", &[]));
    let teller = id("spiffe://other.domain/ns/bank/sa/teller");
    let stranger = id("spiffe://cluster.local/ns/web/sa/x");
    let allowed = |who: &SpiffeId, port| verdict(&bank, Peer::Authenticated { id: who, ip: None }, port).0;
    assert!(allowed(&f, 8080) && allowed(&teller, 8080), "ns/sa and sa (the policy's namespace), any trust domain");
    assert!(!allowed(&b, 8080) && !allowed(&b, 9090), "batch: neither rule");
    assert!(!allowed(&stranger, 8080) && allowed(&stranger, 9090), "notServiceAccounts");
}

#[test]
fn port_level_mtls_applies_per_port_with_a_selector_and_as_a_floor_without_one() {
    let p = compile(
        r#"
peerAuthentications:
  - metadata: {name: a-permissive, namespace: shop}
    spec: {mtls: {mode: PERMISSIVE}}
  - metadata: {name: api, namespace: shop}
    spec: {selector: {matchLabels: {app: api}}, portLevelMtls: {8080: {mode: STRICT}, 9090: {mode: UNSET}}}
  - metadata: {name: db, namespace: bank}
    spec: {selector: {matchLabels: {app: db}}, mtls: {mode: STRICT}, portLevelMtls: {"5432": {mode: DISABLE}}}
  - metadata: {name: a-permissive, namespace: bank}
    spec: {mtls: {mode: PERMISSIVE}}
  - metadata: {name: b-strict, namespace: bank}
    spec: {mtls: {mode: STRICT}}
  - metadata: {name: wide, namespace: ops}
    spec: {mtls: {mode: PERMISSIVE}, portLevelMtls: {22: {mode: STRICT}}}
"#,
    );
    let plain = Peer::Plaintext { ip: "10.0.0.9".parse().unwrap() };
    let to = |port| SocketAddr::new("10.0.0.1".parse().unwrap(), port);
    // api: PERMISSIVE from the namespace, STRICT on 8080 alone; UNSET keeps the workload's.
    let api = p.for_pod(&pod("shop", "api", &[("app", "api")]));
    assert_eq!(
        (api.mode.mode, api.mode_for(8080), api.mode_for(9090)),
        (Mode::Permissive, Mode::Strict, Mode::Permissive)
    );
    assert!(!api.decide(&plain, to(8080)).allowed && api.decide(&plain, to(8081)).allowed);
    assert_eq!(api.kernel_port_modes(), [(8080, Mode::Strict)]);
    assert_eq!(p.for_pod(&pod("shop", "web", &[])).mode_for(8080), Mode::Permissive, "selects api only");
    // db: STRICT but for 5432, whose plaintext reaches the app untouched (no policy selects it).
    let db = p.for_pod(&pod("bank", "db", &[("app", "db")]));
    assert_eq!((db.kernel_mode(), db.kernel_port_modes()), (Mode::Strict, vec![(5432, Mode::Disable)]));
    assert!(db.decide(&plain, to(5432)).allowed && !db.decide(&plain, to(5433)).allowed);
    let bank = p.for_pod(&pod("bank", "x", &[]));
    assert_eq!(
        bank.mode.policy.as_ref().map(|r| r.name.as_str()),
        Some("b-strict"),
        "two namespace-wide: the stronger"
    );
    // Without a selector Istio applies no per-port mode; meshless never weakens: a floor.
    let ops = p.for_pod(&pod("ops", "x", &[]));
    assert_eq!((ops.mode.mode, ops.mode.scope, ops.kernel_port_modes()), (Mode::Strict, "portLevelMtls", vec![]));
    assert_eq!(
        states(&p).into_iter().filter(|(_, s)| *s == "PartiallyEnforced").map(|(n, _)| n).collect::<Vec<_>>(),
        ["ops/wide"]
    );
}

#[test]
fn more_per_port_modes_than_the_kernel_keeps_fall_back_to_the_strongest_on_every_port() {
    let ports: Vec<String> = (1..=9).map(|i| format!("{}: {{mode: PERMISSIVE}}", 8000 + i)).collect();
    let p = compile(&format!(
        "peerAuthentications:\n  - metadata: {{name: many, namespace: shop}}\n    spec: {{selector: {{matchLabels: \
         {{app: api}}}}, mtls: {{mode: DISABLE}}, portLevelMtls: {{{}}}}}\n",
        ports.join(", ")
    ));
    let api = p.for_pod(&pod("shop", "api", &[("app", "api")]));
    assert_eq!((api.mode.mode, api.kernel_port_modes()), (Mode::Permissive, vec![]));
    assert_eq!(states(&p), [("shop/many".to_string(), "PartiallyEnforced")]);
}

/// Istio's documented L4 behaviour, replayed: the TCP authorization task (an ALLOW for ports, an
/// ALLOW that needs an HTTP method matching nothing, a DENY that names one denying the port), the
/// policy reference's allow-nothing, deny-all and allow-all, namespace and IP conditions, and the
/// `when` keys an L4 proxy evaluates. Each row: (source, destination pod, port, allowed).
#[test]
fn istios_documented_l4_examples_decide_as_istio_does() {
    type Row = (&'static str, (&'static str, &'static str), u16, bool);
    // The TCP task's tcp-echo in foo, with `action` and one `to` operation.
    let tcp = |action: &str, operation: &str| {
        format!(
            "authorizationPolicies:\n  - metadata: {{name: tcp-policy, namespace: foo}}\n    spec:\n      \
             selector: {{matchLabels: {{app: tcp-echo}}}}\n      action: {action}\n      \
             rules: [{{to: [{{operation: {operation}}}]}}]\n"
        )
    };
    const SLEEP: &str = "spiffe://cluster.local/ns/foo/sa/sleep";
    let tcp_task = [
        // Sleep of foo may reach 9000 and 9001.
        tcp("ALLOW", r#"{ports: ["9000", "9001"]}"#),
        // The same with an HTTP method added to the ALLOW: for TCP it matches nothing.
        tcp("ALLOW", r#"{methods: ["GET"], ports: ["9000"]}"#),
        // And as a DENY: the HTTP-only field is set aside, the port still denied.
        tcp("DENY", r#"{methods: ["GET"], ports: ["9000"]}"#),
    ];
    let tables: &[(&str, &[Row])] = &[
        (
            &tcp_task[0],
            &[
                (SLEEP, ("foo", "tcp-echo"), 9000, true),
                (SLEEP, ("foo", "tcp-echo"), 9001, true),
                (SLEEP, ("foo", "tcp-echo"), 9002, false),
            ],
        ),
        (&tcp_task[1], &[(SLEEP, ("foo", "tcp-echo"), 9000, false)]),
        (&tcp_task[2], &[(SLEEP, ("foo", "tcp-echo"), 9000, false), (SLEEP, ("foo", "tcp-echo"), 9001, true)]),
        (
            // allow-nothing in a namespace; allow-all for one workload of it.
            r#"
authorizationPolicies:
  - metadata: {name: allow-nothing, namespace: foo}
    spec: {}
  - metadata: {name: allow-all, namespace: foo}
    spec: {selector: {matchLabels: {app: open}}, rules: [{}]}
"#,
            &[
                ("spiffe://cluster.local/ns/bar/sa/x", ("foo", "closed"), 80, false),
                ("spiffe://cluster.local/ns/bar/sa/x", ("foo", "open"), 80, true),
                ("spiffe://cluster.local/ns/bar/sa/x", ("bar", "any"), 80, true),
            ],
        ),
        (
            // deny-all from the root namespace beats any ALLOW.
            r#"
authorizationPolicies:
  - metadata: {name: deny-all, namespace: meshless-system}
    spec: {action: DENY, rules: [{}]}
  - metadata: {name: allow-all, namespace: foo}
    spec: {rules: [{}]}
"#,
            &[("spiffe://cluster.local/ns/foo/sa/x", ("foo", "any"), 80, false)],
        ),
        (
            // Namespaces, not-namespaces and IP blocks; `when` on the source's namespace and
            // principal and the destination port.
            r#"
authorizationPolicies:
  - metadata: {name: from-dev, namespace: foo}
    spec:
      selector: {matchLabels: {app: api}}
      rules:
        - from: [{source: {namespaces: ["dev"]}}]
        - from: [{source: {ipBlocks: ["203.0.113.0/24"]}}]
  - metadata: {name: not-prod, namespace: foo}
    spec:
      selector: {matchLabels: {app: api}}
      action: DENY
      rules: [{from: [{source: {notNamespaces: ["dev", "foo"]}}], when: [{key: destination.port, values: ["9090"]}]}]
  - metadata: {name: when-keys, namespace: foo}
    spec:
      selector: {matchLabels: {app: db}}
      rules:
        - when:
            - {key: source.namespace, values: ["foo"]}
            - {key: source.principal, notValues: ["cluster.local/ns/foo/sa/guest"]}
"#,
            &[
                ("spiffe://cluster.local/ns/dev/sa/x", ("foo", "api"), 8080, true),
                ("spiffe://cluster.local/ns/dev/sa/x", ("foo", "api"), 9090, true),
                ("spiffe://cluster.local/ns/qa/sa/x", ("foo", "api"), 8080, false),
                ("203.0.113.9", ("foo", "api"), 8080, true),
                ("203.0.113.9", ("foo", "api"), 9090, false),
                ("spiffe://cluster.local/ns/foo/sa/app", ("foo", "db"), 5432, true),
                ("spiffe://cluster.local/ns/foo/sa/guest", ("foo", "db"), 5432, false),
                ("spiffe://cluster.local/ns/bar/sa/app", ("foo", "db"), 5432, false),
            ],
        ),
    ];
    for (yaml, rows) in tables {
        let p = compile(yaml);
        for (from, (ns, app), port, want) in *rows {
            let w = p.for_pod(&pod(ns, app, &[("app", app)]));
            let id;
            let peer = match from.parse::<IpAddr>() {
                Ok(ip) => Peer::Plaintext { ip },
                Err(_) => {
                    id = SpiffeId::new(from).unwrap();
                    Peer::Authenticated { id: &id, ip: None }
                }
            };
            let d = w.decide(&peer, at(*port));
            assert_eq!(d.allowed, *want, "{from} → {ns}/{app}:{port} under\n{yaml}\ngot {d:?}");
        }
    }
}
