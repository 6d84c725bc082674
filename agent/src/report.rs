//! `meshless report`: what this node's traffic says, from its agent's flow table, status and
//! policy view — mTLS coverage per namespace and identity pair, the plaintext sources STRICT
//! would cut, the denials with their rule, the certificates, modes and policies. Markdown for
//! people, JSON for tools. Built from the admin endpoint's JSON alone (`/api/flows`, `/status`,
//! `/policy`), so it reads any agent of the same version, and tests feed it documents.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::Value;

#[derive(Debug, Serialize)]
pub struct Report {
    pub window: Window,
    pub namespaces: Vec<Namespace>,
    pub pairs: Vec<Pair>,
    pub plaintext_sources: Vec<PlaintextSource>,
    pub denied: Vec<Denied>,
    pub certificates: Vec<Certificate>,
    pub policies: Policies,
}

/// What the figures cover: the flow table's aggregates, from the first one seen to the last.
#[derive(Debug, Serialize)]
pub struct Window {
    pub from_ms: u64,
    pub to_ms: u64,
    /// Flows recorded since the agent started, and how many aggregates the table keeps at most
    /// (older ones are evicted: the window is what the table still holds).
    pub flows_total: u64,
    pub capacity: u64,
}

#[derive(Debug, Serialize)]
pub struct Namespace {
    pub namespace: String,
    pub connections: u64,
    pub mtls_connections: u64,
    pub mtls_share: f64,
}

#[derive(Debug, Serialize)]
pub struct Pair {
    pub source: String,
    pub destination: String,
    pub port: u64,
    pub transport: String,
    pub verdict: String,
    pub connections: u64,
}

#[derive(Debug, Serialize)]
pub struct PlaintextSource {
    pub source: String,
    pub destination: String,
    pub port: u64,
    pub connections: u64,
    /// Whether STRICT on the destination would refuse it (it was let in as plaintext).
    pub refused_under_strict: bool,
}

#[derive(Debug, Serialize)]
pub struct Denied {
    pub source: String,
    pub destination: String,
    pub port: u64,
    pub transport: String,
    pub connections: u64,
    pub policy: String,
    pub rule: i64,
    pub reason: String,
}

#[derive(Debug, Serialize)]
pub struct Certificate {
    pub pod: String,
    pub identity: String,
    pub serial: String,
    pub not_after: u64,
}

#[derive(Debug, Serialize)]
pub struct Policies {
    /// Each local pod: its mode and where it comes from, and how many policies select it.
    pub pods: Vec<Value>,
    /// Every policy object and how much of it is enforced.
    pub objects: Vec<Value>,
}

impl Report {
    /// The report of one node from its agent's `/api/flows`, `/status` and `/policy` documents.
    pub fn build(flows: &Value, status: &Value, policy: &Value) -> Report {
        let s = |v: &Value| v.as_str().unwrap_or("").to_string();
        let n = |v: &Value| v.as_u64().unwrap_or(0);
        let aggregates: Vec<&Value> = flows["aggregates"]
            .as_array()
            .map(|a| a.iter().filter(|a| a["direction"] == "inbound").collect())
            .unwrap_or_default();
        let destination = |a: &Value| format!("{}/{}", s(&a["destination_namespace"]), s(&a["destination_workload"]));
        let mut namespaces: BTreeMap<String, (u64, u64)> = BTreeMap::new();
        let mut pairs = Vec::new();
        let mut plaintext_sources = Vec::new();
        let mut denied = Vec::new();
        for a in &aggregates {
            let (transport, verdict, count) = (s(&a["transport"]), s(&a["verdict"]), n(&a["connections"]));
            let admitted = verdict == "allow" || verdict == "dry_run_deny";
            if admitted {
                let ns = namespaces.entry(s(&a["destination_namespace"])).or_default();
                ns.0 += count;
                if transport == "hbone" {
                    ns.1 += count;
                }
            }
            pairs.push(Pair {
                source: s(&a["source"]),
                destination: destination(a),
                port: n(&a["port"]),
                transport: transport.clone(),
                verdict: verdict.clone(),
                connections: count,
            });
            if transport == "plaintext" && admitted {
                plaintext_sources.push(PlaintextSource {
                    source: s(&a["source"]),
                    destination: destination(a),
                    port: n(&a["port"]),
                    connections: count,
                    refused_under_strict: true,
                });
            }
            if !admitted || verdict == "dry_run_deny" {
                denied.push(Denied {
                    source: s(&a["source"]),
                    destination: destination(a),
                    port: n(&a["port"]),
                    transport,
                    connections: count,
                    policy: s(&a["policy"]),
                    rule: a["rule"].as_i64().unwrap_or(-1),
                    reason: s(&a["reason"]),
                });
            }
        }
        let namespaces = namespaces
            .into_iter()
            .map(|(namespace, (connections, mtls))| Namespace {
                namespace,
                connections,
                mtls_connections: mtls,
                mtls_share: if connections == 0 { 0.0 } else { mtls as f64 / connections as f64 },
            })
            .collect();
        let certificates = status["pods"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| p["certificate"].is_object())
            .map(|p| Certificate {
                pod: format!("{}/{}", s(&p["pod"]["namespace"]), s(&p["pod"]["name"])),
                identity: s(&p["identity"]),
                serial: s(&p["certificate"]["serial"]),
                not_after: n(&p["certificate"]["not_after"]),
            })
            .collect();
        let times = aggregates.iter().flat_map(|a| [n(&a["first_ms"]), n(&a["last_ms"])]);
        let window = Window {
            from_ms: times.clone().min().unwrap_or(0),
            to_ms: times.max().unwrap_or(0),
            flows_total: n(&flows["total"]),
            capacity: n(&flows["capacity"]),
        };
        let list = |v: &Value| v.as_array().cloned().unwrap_or_default();
        Report {
            window,
            namespaces,
            pairs,
            plaintext_sources,
            denied,
            certificates,
            policies: Policies { pods: list(&policy["pods"]), objects: list(&policy["objects"]) },
        }
    }

    /// The report in Markdown.
    pub fn markdown(&self) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        let w = &self.window;
        let _ = writeln!(
            out,
            "# meshless report\n\nWindow: the flow table's inbound aggregates, {} → {} (Unix ms); {} flows recorded since \
             the agent started, at most {} aggregates kept.",
            w.from_ms, w.to_ms, w.flows_total, w.capacity
        );
        let s = |v: &dyn std::fmt::Display| v.to_string();
        table(
            &mut out,
            "mTLS coverage by namespace",
            &["namespace", "connections", "mTLS", "share"],
            self.namespaces.iter().map(|n| {
                vec![
                    s(&n.namespace),
                    s(&n.connections),
                    s(&n.mtls_connections),
                    format!("{:.0} %", n.mtls_share * 100.0),
                ]
            }),
        );
        table(
            &mut out,
            "Identity pairs",
            &["source", "destination", "port", "transport", "verdict", "connections"],
            self.pairs.iter().map(|p| {
                vec![s(&p.source), s(&p.destination), s(&p.port), s(&p.transport), s(&p.verdict), s(&p.connections)]
            }),
        );
        table(
            &mut out,
            "Plaintext sources (what STRICT would refuse)",
            &["source", "destination", "port", "connections", "refused under STRICT"],
            self.plaintext_sources.iter().map(|p| {
                let refused = if p.refused_under_strict { "yes" } else { "no" };
                vec![s(&p.source), s(&p.destination), s(&p.port), s(&p.connections), s(&refused)]
            }),
        );
        table(
            &mut out,
            "Denied",
            &["source", "destination", "port", "transport", "connections", "policy", "rule", "reason"],
            self.denied.iter().map(|d| {
                let (port, connections, rule) = (s(&d.port), s(&d.connections), s(&d.rule));
                vec![
                    s(&d.source),
                    s(&d.destination),
                    port,
                    s(&d.transport),
                    connections,
                    s(&d.policy),
                    rule,
                    s(&d.reason),
                ]
            }),
        );
        table(
            &mut out,
            "Certificates",
            &["pod", "identity", "serial", "not after (Unix s)"],
            self.certificates.iter().map(|c| vec![s(&c.pod), s(&c.identity), s(&c.serial), s(&c.not_after)]),
        );
        table(
            &mut out,
            "Modes",
            &["pod", "mode", "from", "policies"],
            self.policies.pods.iter().map(|p| {
                let f = |k: &str| p[k].as_str().unwrap_or("").to_string();
                vec![f("pod"), f("mode"), f("mode_source"), p["authorization_policies"].to_string()]
            }),
        );
        out
    }
}

/// A Markdown section: its title, then a table of `headers` and `rows` (each cell escaped).
fn table(out: &mut String, title: &str, headers: &[&str], rows: impl Iterator<Item = Vec<String>>) {
    use std::fmt::Write as _;
    let line = |cells: &mut dyn Iterator<Item = String>| format!("| {} |", cells.collect::<Vec<_>>().join(" | "));
    let _ = writeln!(out, "\n## {title}\n");
    let _ = writeln!(out, "{}", line(&mut headers.iter().map(|h| h.to_string())));
    let _ = writeln!(out, "|{}", "---|".repeat(headers.len()));
    for row in rows {
        let _ = writeln!(out, "{}", line(&mut row.iter().map(|c| cell(c))));
    }
}

/// A Markdown table cell: `|` and line breaks cannot end it.
fn cell(s: &str) -> String {
    s.replace('|', "\\|").replace(['\n', '\r'], " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plaintext_sources_denials_and_coverage_come_from_the_inbound_aggregates() {
        let agg = |source: &str, transport: &str, verdict: &str, connections: u64, reason: &str| {
            serde_json::json!({"direction": "inbound", "source": source, "destination_namespace": "shop",
                "destination_workload": "api", "port": 8080, "transport": transport, "verdict": verdict,
                "connections": connections, "first_ms": 10, "last_ms": 20, "policy": "", "rule": -1, "reason": reason})
        };
        let flows = serde_json::json!({"total": 42, "capacity": 1024, "aggregates": [
            agg("spiffe://td/ns/shop/sa/web", "hbone", "allow", 30, "ALLOW rule matched"),
            agg("198.19.1.3", "plaintext", "allow", 10, "PERMISSIVE"),
            agg("198.19.1.4", "plaintext", "deny", 2, "plaintext refused (STRICT)"),
            {"direction": "outbound", "source": "x", "verdict": "carried", "connections": 99, "transport": "hbone"},
        ]});
        let status = serde_json::json!({"pods": [{"pod": {"namespace": "shop", "name": "api-1"},
            "identity": "spiffe://td/ns/shop/sa/api", "certificate": {"serial": "0a", "not_after": 1900000000}}]});
        let policy = serde_json::json!({"pods": [{"pod": "shop/api-1", "mode": "PERMISSIVE", "mode_source": "default",
            "authorization_policies": 0}], "objects": []});
        let r = Report::build(&flows, &status, &policy);
        assert_eq!(r.namespaces.len(), 1);
        let ns = &r.namespaces[0];
        assert_eq!((ns.connections, ns.mtls_connections), (40, 30), "outbound flows are the source node's to count");
        assert!((ns.mtls_share - 0.75).abs() < 1e-9);
        assert_eq!(r.plaintext_sources.len(), 1);
        assert!(r.plaintext_sources[0].refused_under_strict && r.plaintext_sources[0].source == "198.19.1.3");
        assert_eq!(r.denied.len(), 1);
        assert_eq!(r.denied[0].reason, "plaintext refused (STRICT)");
        assert_eq!((r.window.from_ms, r.window.to_ms, r.window.flows_total), (10, 20, 42));
        assert_eq!(r.certificates[0].serial, "0a");
        let md = r.markdown();
        assert!(md.contains("| shop | 40 | 30 | 75 % |"), "{md}");
        assert!(md.contains("| 198.19.1.3 | shop/api | 8080 | 10 | yes |"), "{md}");
        let json = serde_json::to_value(&r).unwrap();
        for key in ["window", "namespaces", "pairs", "plaintext_sources", "denied", "certificates", "policies"] {
            assert!(json.get(key).is_some(), "{key}");
        }
        // Empty documents: an empty report, no panic.
        let empty = Report::build(&Value::Null, &Value::Null, &Value::Null);
        assert!(empty.pairs.is_empty() && empty.markdown().contains("# meshless report"));
    }
}
