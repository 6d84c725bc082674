//! Properties of the engine over generated policy sets (proptest): a DENY that matches always
//! wins, the order objects arrive in never changes a decision, and the rule a decision names
//! decides the connection on its own.

use proptest::prelude::*;
use serde_json::{json, Value};

use super::*;

const NAMESPACES: [&str; 3] = ["shop", "ops", "legacy"];
const ACCOUNTS: [&str; 2] = ["web", "batch"];
const PORTS: [u16; 3] = [80, 8080, 9090];
const SOURCES: [[u8; 4]; 3] = [[10, 1, 0, 5], [10, 1, 7, 9], [192, 168, 3, 4]];
const BLOCKS: [&str; 4] = ["10.1.0.0/16", "10.1.0.5", "192.168.0.0/16", "10.9.0.0/24"];

fn principal() -> impl Strategy<Value = String> {
    prop_oneof![
        (0..3usize, 0..2usize).prop_map(|(n, a)| format!("cluster.local/ns/{}/sa/{}", NAMESPACES[n], ACCOUNTS[a])),
        (0..3usize).prop_map(|n| format!("cluster.local/ns/{}/*", NAMESPACES[n])),
        Just("*".to_string()),
    ]
}

fn some<T: std::fmt::Debug + Clone + 'static>(s: impl Strategy<Value = T> + 'static) -> BoxedStrategy<Option<Vec<T>>> {
    prop::option::weighted(0.3, prop::collection::vec(s, 1..3)).boxed()
}

fn source() -> impl Strategy<Value = Value> {
    let ns = (0..3usize).prop_map(|n| NAMESPACES[n].to_string());
    let block = (0..4usize).prop_map(|b| BLOCKS[b].to_string());
    (some(principal()), some(principal()), some(ns.clone()), some(ns), some(block.clone()), some(block))
        .prop_map(|(p, np, n, nn, b, nb)| {
            let mut s = serde_json::Map::new();
            for (k, v) in [
                ("principals", p),
                ("notPrincipals", np),
                ("namespaces", n),
                ("notNamespaces", nn),
                ("ipBlocks", b),
                ("notIpBlocks", nb),
            ] {
                if let Some(v) = v {
                    s.insert(k.into(), json!(v));
                }
            }
            Value::Object(s)
        })
        .prop_filter("a source names something", |s| s.as_object().is_some_and(|s| !s.is_empty()))
}

fn operation() -> impl Strategy<Value = Value> {
    let port = (0..3usize).prop_map(|p| PORTS[p].to_string());
    (some(port.clone()), some(port))
        .prop_map(|(p, np)| {
            let mut o = serde_json::Map::new();
            if let Some(p) = p {
                o.insert("ports".into(), json!(p));
            }
            if let Some(np) = np {
                o.insert("notPorts".into(), json!(np));
            }
            Value::Object(o)
        })
        .prop_filter("an operation names something", |o| o.as_object().is_some_and(|o| !o.is_empty()))
}

fn rule() -> impl Strategy<Value = Value> {
    (prop::collection::vec(source(), 0..3), prop::collection::vec(operation(), 0..2)).prop_map(|(from, to)| {
        let mut r = serde_json::Map::new();
        if !from.is_empty() {
            r.insert("from".into(), Value::Array(from.into_iter().map(|s| json!({ "source": s })).collect()));
        }
        if !to.is_empty() {
            r.insert("to".into(), Value::Array(to.into_iter().map(|o| json!({ "operation": o })).collect()));
        }
        Value::Object(r)
    })
}

/// A policy in the destination's namespace or the root namespace, selecting the destination
/// (`app: api`), another workload, or all.
fn policy() -> impl Strategy<Value = (String, Value)> {
    let action = prop_oneof![Just("ALLOW"), Just("DENY"), Just("AUDIT")];
    let namespace = prop_oneof![3 => Just("shop"), 1 => Just("meshless-system")];
    let selector = prop_oneof![Just(None), Just(Some("api")), Just(Some("db"))];
    (action, namespace, selector, prop::collection::vec(rule(), 0..3)).prop_map(|(action, ns, app, rules)| {
        let mut spec = json!({ "action": action, "rules": rules });
        if let Some(app) = app {
            spec["selector"] = json!({ "matchLabels": { "app": app } });
        }
        (ns.to_string(), spec)
    })
}

fn mode() -> impl Strategy<Value = Option<&'static str>> {
    prop_oneof![Just(None), Just(Some("PERMISSIVE")), Just(Some("STRICT")), Just(Some("DISABLE"))]
}

/// Who connects: an identity over the tunnel (with or without its address) or a plaintext source.
#[derive(Debug, Clone)]
enum Who {
    Id(SpiffeId, Option<IpAddr>),
    Plain(IpAddr),
}

impl Who {
    fn peer(&self) -> Peer<'_> {
        match self {
            Who::Id(id, ip) => Peer::Authenticated { id, ip: *ip },
            Who::Plain(ip) => Peer::Plaintext { ip: *ip },
        }
    }
}

fn who() -> impl Strategy<Value = Who> {
    let ip = (0..3usize).prop_map(|i| IpAddr::from(SOURCES[i]));
    prop_oneof![
        3 => (0..3usize, 0..2usize, prop::option::of(ip.clone())).prop_map(|(n, a, ip)| {
            Who::Id(SpiffeId::new(format!("spiffe://cluster.local/ns/{}/sa/{}", NAMESPACES[n], ACCOUNTS[a])).unwrap(), ip)
        }),
        1 => ip.prop_map(Who::Plain),
    ]
}

fn input(policies: &[(String, Value)], mode: Option<&str>) -> PolicyInput {
    let authorization_policies = policies
        .iter()
        .enumerate()
        .map(|(i, (ns, spec))| {
            serde_json::from_value(json!({ "metadata": { "name": format!("p{i}"), "namespace": ns }, "spec": spec }))
                .expect("generated policies are well-formed")
        })
        .collect();
    let peer_authentications = mode
        .map(|m| {
            vec![serde_json::from_value(
                json!({ "metadata": { "name": "mode", "namespace": "shop" }, "spec": { "mtls": { "mode": m } } }),
            )
            .expect("generated modes are well-formed")]
        })
        .unwrap_or_default();
    PolicyInput { authorization_policies, peer_authentications, ..PolicyInput::default() }
}

fn decide(input: &PolicyInput, who: &Who, port: u16) -> Decision {
    let labels = BTreeMap::from([("app".to_string(), "api".to_string())]);
    let policies = Policies::compile(input).expect("generated policies compile");
    let pod = policies.for_workload(&Target { namespace: "shop", labels: &labels, label_mode: None });
    pod.decide(&who.peer(), SocketAddr::new([10, 0, 0, 1].into(), port))
}

/// A DENY policy selecting the destination whose one rule matches exactly `who` on `port`.
fn deny_exactly(who: &Who, port: u16) -> (String, Value) {
    let source = match who {
        Who::Id(id, _) => json!({ "principals": [id.to_string().trim_start_matches("spiffe://")] }),
        Who::Plain(ip) => json!({ "ipBlocks": [ip.to_string()] }),
    };
    let rule = json!({ "from": [{ "source": source }], "to": [{ "operation": { "ports": [port.to_string()] } }] });
    ("shop".into(), json!({ "action": "DENY", "rules": [rule] }))
}

/// The rule `by` names, alone in a policy of `action` that selects the destination.
fn alone(input: &PolicyInput, by: &RuleRef, action: &str) -> PolicyInput {
    let object = input
        .authorization_policies
        .iter()
        .find(|p| p.metadata.name == by.policy.name && p.metadata.namespace == by.policy.namespace)
        .expect("the deciding policy is one of the input's");
    let rule = serde_json::to_value(&object.spec.rules[by.rule]).unwrap();
    let mut only = input.clone();
    only.authorization_policies = vec![serde_json::from_value(json!({
        "metadata": { "name": "alone", "namespace": "shop" },
        "spec": { "action": action, "rules": [rule] },
    }))
    .unwrap()];
    only
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    /// Whatever else is there, a DENY that matches the connection denies it; and adding a DENY
    /// never turns a denied connection into an allowed one.
    #[test]
    fn a_matching_deny_overrides_every_allow(
        policies in prop::collection::vec(policy(), 0..6), mode in mode(), who in who(), port in 0..3usize,
    ) {
        let port = PORTS[port];
        let before = decide(&input(&policies, mode), &who, port);
        let mut with = policies.clone();
        with.push(deny_exactly(&who, port));
        let after = decide(&input(&with, mode), &who, port);
        prop_assert!(!after.allowed, "{after:?}");
        let plaintext_refused = matches!(after.reason, Reason::PlaintextRefused);
        prop_assert!(plaintext_refused || matches!(after.reason, Reason::Denied { .. }), "{after:?}");
        prop_assert!(before.allowed || !after.allowed);
    }

    /// The order policies arrive in (watch events, file order) changes nothing in a decision.
    #[test]
    fn the_order_of_policies_never_changes_a_decision(
        policies in prop::collection::vec(policy(), 0..6), mode in mode(), who in who(), port in 0..3usize,
        seed in any::<u64>(),
    ) {
        let port = PORTS[port];
        let given = input(&policies, mode);
        let mut shuffled = given.clone();
        let mut rng = seed;
        for i in (1..shuffled.authorization_policies.len()).rev() {
            rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            shuffled.authorization_policies.swap(i, (rng >> 33) as usize % (i + 1));
        }
        prop_assert_eq!(decide(&given, &who, port), decide(&shuffled, &who, port));
    }

    /// What explain prints is the cause: the rule a decision names decides the connection the
    /// same way alone; and when no ALLOW matched, no ALLOW rule alone would have allowed it.
    #[test]
    fn the_rule_a_decision_names_decides_alone(
        policies in prop::collection::vec(policy(), 0..6), mode in mode(), who in who(), port in 0..3usize,
    ) {
        let port = PORTS[port];
        let given = input(&policies, mode);
        let d = decide(&given, &who, port);
        match &d.reason {
            Reason::Denied { by } => {
                let alone = decide(&alone(&given, by, "DENY"), &who, port);
                prop_assert!(!alone.allowed && matches!(alone.reason, Reason::Denied { .. }), "{d:?} vs {alone:?}");
            }
            Reason::Allowed { by } => {
                let alone = decide(&alone(&given, by, "ALLOW"), &who, port);
                prop_assert!(alone.allowed && matches!(alone.reason, Reason::Allowed { .. }), "{d:?} vs {alone:?}");
            }
            Reason::NoAllowMatched { policies: named } => {
                prop_assert!(!d.allowed);
                prop_assert!(!named.is_empty(), "{d:?}");
                for p in given.authorization_policies.iter().filter(|p| named.iter().any(|n| n.name == p.metadata.name)) {
                    for rule in 0..p.spec.rules.len() {
                        let by = RuleRef { policy: PolicyRef { namespace: p.metadata.namespace.clone(), name: p.metadata.name.clone() }, rule };
                        let alone = decide(&alone(&given, &by, "ALLOW"), &who, port);
                        prop_assert!(!alone.allowed, "{by} alone allows what the decision says no ALLOW matched: {d:?}");
                    }
                }
            }
            Reason::DefaultAllow | Reason::NotCaptured => prop_assert!(d.allowed),
            Reason::PlaintextRefused => {
                prop_assert!(!d.allowed);
                prop_assert!(matches!(who, Who::Plain(_)));
            }
        }
    }
}
