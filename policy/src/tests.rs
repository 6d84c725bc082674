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

fn id(s: &str) -> SpiffeId {
    SpiffeId::new(s).unwrap()
}

/// (verdict, deciding policy/rule or reason kind) for a connection.
fn verdict(p: &PodPolicy, peer: Peer<'_>, port: u16) -> (bool, String) {
    let d = p.decide(&peer, port);
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
    let d = api.decide(&Peer::Authenticated { id: &ops, ip: None }, 9090);
    assert!(d.allowed);
    assert_eq!(d.audited.iter().map(ToString::to_string).collect::<Vec<_>>(), ["shop/watch rules[0]"]);
    let d = api.decide(&Peer::Authenticated { id: &ops, ip: None }, 8080);
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
}

#[test]
fn invalid_policies_are_rejected_with_the_object_and_field_named() {
    let cases: &[(&str, &str)] = &[
        (
            "authorizationPolicies: [{metadata: {name: a, namespace: n}, spec: {rules: [{to: [{operation: {methods: [GET]}}]}]}}]",
            "authorizationPolicies[0] (n/a): spec.rules[0].to[0].operation.methods: is an HTTP (L7) attribute",
        ),
        (
            "authorizationPolicies: [{metadata: {name: a, namespace: n}, spec: {rules: [{from: [{source: {ipBlocks: [\"10.0.0.0/33\"]}}]}]}}]",
            "spec.rules[0].from[0].source.ipBlocks[0]: \"10.0.0.0/33\" is not an IP address or CIDR block",
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
        ("authorizationPolicies: [{metadata: {name: a, namespace: n}, spec: {action: CUSTOM}}]", "spec.action: CUSTOM"),
        ("authorizationPolicies: [{metadata: {name: a, namespace: n}, spec: {rules: [{when: [{key: x}]}]}}]", "spec.rules[0].when"),
        (
            "authorizationPolicies: [{metadata: {name: a, namespace: n}, spec: {rules: [{from: [{source: {requestPrincipals: [x]}}]}]}}]",
            "source.requestPrincipals",
        ),
        ("authorizationPolicies: [{metadata: {name: Bad_Name, namespace: n}}]", "metadata.name"),
        ("authorizationPolicies: [{metadata: {name: a, namespace: n}}, {metadata: {name: a, namespace: n}}]", "authorizationPolicies[1] (n/a): defined twice"),
        ("authorizationPolicies: [{kind: PeerAuthentication, metadata: {name: a, namespace: n}}]", "kind"),
        ("authorizationPolicies: [{apiVersion: v1, metadata: {name: a, namespace: n}}]", "apiVersion"),
        ("peerAuthentications: [{metadata: {name: a, namespace: n}, spec: {portLevelMtls: {8080: {mode: DISABLE}}}}]", "peerAuthentications[0] (n/a): spec.portLevelMtls"),
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
