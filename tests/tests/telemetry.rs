//! Telemetry on real agents: the connection metrics with Istio's names follow the traffic on
//! both nodes (read through the Prometheus project's own OpenMetrics parser), the certificate
//! expiry gauge is the certificate's, 1 000 connections from distinct source ports add no series,
//! the access log says each connection in JSON, within its rate limit, drops counted, the flow
//! table has them, and `meshless report` lists the plaintext source STRICT would refuse (and,
//! under STRICT, its denied attempts).

mod support;

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use meshless_tests::mesh::{admin_get, pod_status, wait_listening, Mesh, TRUST_DOMAIN};
use meshless_tests::{python, sockaddr, wait_for, Layout, Pod, Testbed};
use serde_json::Value;

/// Node 2's access log limit: a burst of 40 lines, then 5 a second.
const RATE: u64 = 5;
const BURST: u64 = 40;

/// One sample as the parser read it.
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Node `node`'s metrics (from 15020, where Prometheus scrapes), parsed by `prometheus-client`.
fn scrape(tb: &Testbed, node: usize, python: &std::path::Path) -> Vec<Sample> {
    let text = meshless_tests::mesh::run_ok(
        tb.node(node)
            .netns
            .command("curl", None)
            .unwrap()
            .args(["-sS", "--fail", "--max-time", "5"])
            .arg("http://127.0.0.1:15020/metrics"),
    )
    .expect("the metrics endpoint answers");
    let mut child = Command::new(python)
        .arg(python::script("parse_metrics.py"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running the parser");
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the OpenMetrics parser refused node{node}'s metrics: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    let parsed: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    parsed
        .into_iter()
        .map(|s| Sample {
            name: s["name"].as_str().unwrap().to_string(),
            labels: serde_json::from_value(s["labels"].clone()).unwrap(),
            value: s["value"].as_f64().unwrap(),
        })
        .collect()
}

/// The sum of the samples named `name` whose labels include every one of `with`.
fn sum(samples: &[Sample], name: &str, with: &[(&str, &str)]) -> u64 {
    samples
        .iter()
        .filter(|s| s.name == name && with.iter().all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v)))
        .map(|s| s.value as u64)
        .sum()
}

/// Connect, send 18 bytes, read the 28-byte echo, close: `n` times from `pod` to `to`.
fn connections(pod: &Pod, testbin: &std::path::Path, to: &str, n: usize) {
    let (ok, out, err) = support::run(pod.command(testbin).unwrap().args(["crr", to, &n.to_string()]));
    assert!(ok, "{n} connections from {} to {to}: {out} {err}", pod.name);
}

#[test]
fn metrics_follow_traffic_and_the_access_log_says_each_connection() {
    let Some(bins) = support::privileged("telemetry") else {
        return;
    };
    let python = python::prometheus_python().expect("a Python with prometheus-client");
    let tb = Testbed::new(Layout { label: "tel", pods: &[2, 1] }).expect("testbed");
    // pod1-n1 (client) and pod1-n2 (server) are meshed; pod2-n1 is listed, outside the mesh.
    let listed = |p: &Pod| Some(!(p.node == 1 && p.name == "pod2"));
    let args = |node: usize| match node {
        2 => ["--access-log-rate", &RATE.to_string(), "--access-log-burst", &BURST.to_string()]
            .map(String::from)
            .to_vec(),
        _ => vec![],
    };
    let mesh = Mesh::start_full(&tb, &bins, &listed, &args, &[], "").expect("agents");
    let (client, plain, server) = (tb.pod(1, 1), tb.pod(1, 2), tb.pod(2, 1));
    tb.spawn(server.command(&bins.testbin).unwrap().args(["echo-serve", "7000"])).unwrap();
    wait_listening(&server.netns, 7000).unwrap();
    let to = sockaddr(server.ipv4.into(), 7000);
    let started = Instant::now();

    // 25 connections over the mesh: opened and closed by exactly 25 on each node, for the pair.
    connections(client, &bins.testbin, &to, 25);
    let (client_id, server_id) = (tb.spiffe_id(TRUST_DOMAIN, client), tb.spiffe_id(TRUST_DOMAIN, server));
    let pair = |reporter| {
        [
            ("reporter", reporter),
            ("source_principal", client_id.as_str()),
            ("source_workload", "pod1-n1"),
            ("source_workload_namespace", "default"),
            ("destination_principal", server_id.as_str()),
            ("destination_workload", "pod1-n2"),
            ("connection_security_policy", "mutual_tls"),
            ("request_protocol", "tcp"),
            ("response_flags", "-"),
        ]
    };
    for (node, reporter) in [(1, "source"), (2, "destination")] {
        let labels = pair(reporter);
        let counted = wait_for(Duration::from_secs(10), || {
            let m = scrape(&tb, node, &python);
            let closed = sum(&m, "istio_tcp_connections_closed_total", &labels);
            (closed == 25).then_some(m)
        });
        let m = counted.unwrap_or_else(|| panic!("node{node} never counted 25 closed connections for the pair"));
        assert_eq!(sum(&m, "istio_tcp_connections_opened_total", &labels), 25, "node{node}");
        assert_eq!(sum(&m, "istio_tcp_sent_bytes_total", &labels), 25 * 18, "node{node}: bytes source → destination");
        assert_eq!(sum(&m, "istio_tcp_received_bytes_total", &labels), 25 * 28, "node{node}: bytes back");
        assert_eq!(sum(&m, "istio_build", &[("component", "meshless")]), 1);
        // No address or port is ever a label.
        for s in &m {
            for v in s.labels.values() {
                assert!(
                    !v.contains("198.19.") && !v.contains(":7000"),
                    "an address in a label: {} {:?}",
                    s.name,
                    s.labels
                );
            }
        }
    }

    // Plaintext from the pod outside the mesh: `none`, its workload known, its identity not.
    connections(plain, &bins.testbin, &to, 5);
    let none = [
        ("reporter", "destination"),
        ("source_workload", "pod2-n1"),
        ("source_principal", "unknown"),
        ("destination_principal", server_id.as_str()),
        ("connection_security_policy", "none"),
    ];
    let plaintext = wait_for(Duration::from_secs(10), || {
        (sum(&scrape(&tb, 2, &python), "istio_tcp_connections_closed_total", &none) == 5).then_some(())
    });
    assert!(plaintext.is_some(), "node2 never counted the 5 plaintext connections as `none`");
    // The flow table has them: one aggregate for the plaintext source, its decision, its bytes.
    let flows: Value = serde_json::from_str(&admin_get(&tb, 2, "/api/flows?transport=plaintext").unwrap()).unwrap();
    let aggregates = flows["aggregates"].as_array().unwrap();
    assert_eq!(aggregates.len(), 1, "{flows}");
    let a = &aggregates[0];
    assert_eq!(a["source"], plain.ipv4.to_string().as_str(), "{a}");
    assert_eq!(
        (a["verdict"].as_str(), a["connections"].as_u64(), a["bytes"].as_u64()),
        (Some("allow"), Some(5), Some(5 * 46))
    );
    assert_eq!(a["destination_workload"], "pod1-n2");
    assert_eq!(flows["recent"].as_array().unwrap().len(), 5, "{flows}");
    let mtls: Value =
        serde_json::from_str(&admin_get(&tb, 2, &format!("/api/flows?identity={client_id}")).unwrap()).unwrap();
    assert_eq!(mtls["aggregates"][0]["connections"], 25, "{mtls}");
    assert_eq!(mtls["aggregates"][0]["transport"], "hbone");
    let none: Value = serde_json::from_str(&admin_get(&tb, 2, "/api/flows?verdict=deny").unwrap()).unwrap();
    assert!(none["recent"].as_array().unwrap().is_empty(), "{none}");

    // The expiry gauge is the client's certificate's not-after.
    let not_after = pod_status(&tb, 1, "default/pod1-n1").unwrap()["certificate"]["not_after"].as_u64().unwrap();
    let m = scrape(&tb, 1, &python);
    assert_eq!(sum(&m, "istio_cert_expiry_seconds", &[("identity", client_id.as_str())]), not_after);

    // 1 000 connections from as many source ports: counted, and not one series more.
    let series = |m: &[Sample]| m.iter().filter(|s| s.name.starts_with("istio_tcp_")).count();
    let before = series(&m);
    connections(client, &bins.testbin, &to, 1000);
    let labels = pair("source");
    let counted = wait_for(Duration::from_secs(10), || {
        let m = scrape(&tb, 1, &python);
        (sum(&m, "istio_tcp_connections_closed_total", &labels) == 1025).then_some(m)
    });
    let m = counted.expect("node1 never counted the 1 000 connections");
    assert_eq!(series(&m), before, "new series after 1 000 connections from distinct source ports");

    // The access log: one JSON line per connection as it ends, ztunnel's field names.
    let lines = |node| -> Vec<Value> {
        mesh.log_lines(node).into_iter().filter(|l| l["message"] == "connection complete").collect()
    };
    let node1 = lines(1);
    let ours: Vec<&Value> = node1.iter().filter(|l| l["src.identity"] == client_id.as_str()).collect();
    assert_eq!(ours.len(), 1025, "node1 (no limit reached) says every connection");
    let one = ours[0];
    for (field, want) in [
        ("dst.identity", Value::from(server_id.as_str())),
        ("dst.workload", "pod1-n2".into()),
        ("src.namespace", "default".into()),
        ("dst.addr", to.as_str().into()),
        ("direction", "outbound".into()),
        ("transport", "hbone".into()),
        ("bytes_sent", 18.into()),
        ("bytes_recv", 28.into()),
        ("end", "FIN".into()),
    ] {
        assert_eq!(one[field], want, "{field} in {one}");
    }
    assert!(one["duration"].as_str().is_some_and(|d| d.ends_with("ms")), "{one}");
    assert!(one["src.addr"].as_str().is_some_and(|a| a.starts_with(&client.ipv4.to_string())), "{one}");
    // Node 2 ended 1 030 connections with a burst of 40 and 5 a second: the rest dropped, counted.
    let ended = 1030;
    let counted = wait_for(Duration::from_secs(10), || {
        let m = scrape(&tb, 2, &python);
        let (written, dropped) =
            (sum(&m, "meshless_access_log_lines_total", &[]), sum(&m, "meshless_access_log_dropped_total", &[]));
        (written + dropped == ended).then_some((written, dropped))
    });
    let (written, dropped) = counted.expect("node2's access log counters never added up to its connections");
    let limit = BURST + RATE * (started.elapsed().as_secs() + 1);
    assert!(written <= limit && dropped >= ended - limit, "written {written}, dropped {dropped}, limit {limit}");
    assert_eq!(lines(2).len() as u64, written, "node2's log holds as many lines as it counts");
    let inbound = lines(2);
    assert!(inbound.iter().all(|l| l["direction"] == "inbound" && l["decision"] == "allow"), "{:?}", inbound.first());
    let _ = admin_get(&tb, 1, "/metrics").expect("the admin endpoint serves the metrics too");
    // DNS rebinding: a page of another site reaching 15000 through a browser names its own host.
    let curl = |host: &str, method: &str| {
        meshless_tests::mesh::run_ok(tb.node(1).netns.command("curl", None).unwrap().args([
            "-sS",
            "-o",
            "/dev/null",
            "-D",
            "-",
            "--max-time",
            "5",
            "-X",
            method,
            "-H",
            &format!("Host: {host}"),
            "http://127.0.0.1:15000/api/flows",
        ]))
        .unwrap()
    };
    assert!(curl("evil.example:15000", "GET").starts_with("HTTP/1.1 403"), "a foreign Host was answered");
    let own = curl("127.0.0.1:15000", "GET");
    assert!(own.starts_with("HTTP/1.1 200") && own.contains("default-src 'self'"), "{own}");
    assert!(curl("127.0.0.1:15000", "POST").starts_with("HTTP/1.1 405"), "the admin endpoint is read-only");

    // `meshless report`: the plaintext source is one STRICT would refuse; under STRICT, its
    // attempts are denials with the reason.
    let report = || -> Value {
        let out = meshless_tests::mesh::run_ok(
            tb.node(2).netns.command(&bins.meshless, None).unwrap().args(["report", "--json"]),
        )
        .expect("meshless report");
        serde_json::from_str(&out).unwrap()
    };
    let r = report();
    let plain_ip = plain.ipv4.to_string();
    let source = r["plaintext_sources"].as_array().unwrap().iter().find(|p| p["source"] == plain_ip.as_str()).cloned();
    let source = source.unwrap_or_else(|| panic!("the plaintext source is not in the report: {r}"));
    assert_eq!((source["refused_under_strict"].as_bool(), source["connections"].as_u64()), (Some(true), Some(5)));
    assert_eq!(source["destination"], "default/pod1-n2");
    let ns = r["namespaces"].as_array().unwrap().iter().find(|n| n["namespace"] == "default").unwrap().clone();
    assert_eq!((ns["connections"].as_u64(), ns["mtls_connections"].as_u64()), (Some(1030), Some(1025)), "{ns}");
    let strict =
        "peerAuthentications:\n  - metadata: {name: strict, namespace: default}\n    spec: {mtls: {mode: STRICT}}\n";
    mesh.set_policy(&tb, strict).unwrap();
    let denied = wait_for(Duration::from_secs(10), || {
        let _ = support::run(plain.command(&bins.testbin).unwrap().args(["crr", &to, "1"]));
        let r = report();
        let d = r["denied"].as_array()?.iter().find(|d| d["source"] == plain_ip.as_str())?.clone();
        Some(d)
    });
    let denied = denied.expect("the plaintext source never showed as denied under STRICT");
    assert_eq!(denied["transport"], "plaintext");
    assert!(denied["reason"].as_str().is_some_and(|r| r.to_lowercase().contains("plaintext")), "{denied}");
    let markdown =
        meshless_tests::mesh::run_ok(tb.node(2).netns.command(&bins.meshless, None).unwrap().arg("report")).unwrap();
    assert!(markdown.contains("## Plaintext sources") && markdown.contains(&plain_ip), "{markdown}");
}

#[test]
fn a_connection_that_ends_in_a_reset_still_counts_what_it_carried() {
    let Some(bins) = support::privileged("reset_bytes") else {
        return;
    };
    let support::Pair { tb, mesh: _mesh, .. } = support::echo_pair("rstbytes", &bins, &[]);
    let (client, server) = (tb.pod(1, 1), tb.pod(2, 1));
    // Reads the 4 bytes, answers "ok", then resets.
    tb.spawn(server.command(&bins.testbin).unwrap().args(["reset-serve", "7100"])).unwrap();
    wait_listening(&server.netns, 7100).unwrap();
    let _ = support::run(client.command(&bins.testbin).unwrap().args([
        "send",
        &sockaddr(server.ipv4.into(), 7100),
        "abcd",
    ]));
    let flow = wait_for(Duration::from_secs(10), || {
        let flows: Value = serde_json::from_str(&admin_get(&tb, 2, "/api/flows").ok()?).ok()?;
        flows["recent"].as_array()?.iter().find(|f| f["port"] == 7100).cloned()
    });
    let flow = flow.expect("node2 never recorded the reset connection");
    assert_eq!(flow["bytes_sent"], 4, "the request reached the app before it reset: counted ({flow})");
    assert!(flow["bytes_recv"].as_u64().is_some_and(|b| b <= 2), "{flow}");
}
