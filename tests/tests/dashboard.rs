//! The node dashboard on real agents: driven in Debian's Chromium through chromedriver
//! (`dashboard_in_chromium`), and searched for key material, scripts from names, foreign hosts
//! and pods reaching it (`dashboard_security`).
//!
//! The browser runs inside node 2's network namespace (where the agent's 127.0.0.1:15000 lives,
//! and where nothing routes off the testbed); the test reaches its chromedriver through a
//! forwarded host loopback port, the way the demo forwards each node's dashboard.

mod support;

use std::path::PathBuf;
use std::time::Duration;

use fantoccini::{ClientBuilder, Locator};
use meshless_tests::forward::Forward;
use meshless_tests::mesh::{admin_get, pod_status, run_ok, wait_listening, Mesh, TRUST_DOMAIN};
use meshless_tests::{sockaddr, wait_for, Layout, Pod, Testbed};
use serde_json::json;

/// A policy whose name is markup. Names are validated, so the update that brings it is refused,
/// and the overview says so, naming it: as text.
const XSS: &str = "<img src=x onerror=alert(1)>";

/// Node 2's policy: port 9000 of its pod denied by `deny-9000`; an ALLOW policy whose rules[0]
/// admits the mesh's namespace, rules[1] the plaintext pod, rules[2] nobody. `xss`: with the
/// policy named [`XSS`] too.
fn policy(plain: &Pod, xss: bool) -> String {
    let extra = match xss {
        true => format!(
            "  - metadata: {{name: \"{XSS}\", namespace: default}}\n    spec: {{action: DENY, rules: [{{}}]}}\n"
        ),
        false => String::new(),
    };
    base_policy(plain) + &extra
}

fn base_policy(plain: &Pod) -> String {
    format!(
        r#"authorizationPolicies:
  - metadata: {{name: deny-9000, namespace: default}}
    spec:
      selector: {{matchLabels: {{app: pod1-n2}}}}
      action: DENY
      rules: [{{to: [{{operation: {{ports: ["9000"]}}}}]}}]
  - metadata: {{name: allow-known, namespace: default}}
    spec:
      selector: {{matchLabels: {{app: pod1-n2}}}}
      rules:
        - from: [{{source: {{namespaces: ["default"]}}}}]
        - from: [{{source: {{ipBlocks: ["{}/32"]}}}}]
        - from: [{{source: {{namespaces: ["nobody"]}}}}]
"#,
        plain.ipv4
    )
}

/// The testbed of both tests: node 1 has a meshed client and a pod outside the mesh, node 2 a
/// meshed server with echo servers on 7000 and 9000 and [`policy`].
fn setup(label: &str, bins: &support::Bins) -> (Testbed, Mesh) {
    let tb = Testbed::new(Layout { label, pods: &[2, 1] }).expect("testbed");
    let listed = |p: &Pod| Some(!(p.node == 1 && p.name == "pod2"));
    let mesh = Mesh::start_full(&tb, bins, &listed, &|_| vec![], &[], &policy(tb.pod(1, 2), false)).expect("agents");
    let server = tb.pod(2, 1);
    for port in ["7000", "9000"] {
        tb.spawn(server.command(&bins.testbin).unwrap().args(["echo-serve", port])).unwrap();
        wait_listening(&server.netns, port.parse().unwrap()).unwrap();
    }
    (tb, mesh)
}

/// `n` connections from `pod` to node 2's server on `port`; whether they all went through.
fn call(tb: &Testbed, bins: &support::Bins, pod: &Pod, port: u16, n: usize) -> bool {
    let to = sockaddr(tb.pod(2, 1).ipv4.into(), port);
    support::run(pod.command(&bins.testbin).unwrap().args(["crr", &to, &n.to_string()])).0
}

/// Waits until node 2's flow table has recorded `n` flows in all.
fn wait_flows(tb: &Testbed, n: u64) {
    let seen = wait_for(Duration::from_secs(10), || {
        let flows: serde_json::Value = serde_json::from_str(&admin_get(tb, 2, "/api/flows").ok()?).ok()?;
        (flows["total"].as_u64()? >= n).then_some(())
    });
    assert!(seen.is_some(), "node2's flow table never held {n} flows");
}

fn screenshots() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/dashboard");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn dashboard_in_chromium() {
    let Some(bins) = support::privileged("dashboard_in_chromium") else {
        return;
    };
    for tool in ["/usr/bin/chromium", "/usr/bin/chromedriver"] {
        assert!(
            std::path::Path::new(tool).exists(),
            "{tool} is missing: `cargo xtask setup` installs Debian's chromium and chromium-driver"
        );
    }
    let (tb, mesh) = setup("dash", &bins);
    let (client, plain, server) = (tb.pod(1, 1), tb.pod(1, 2), tb.pod(2, 1));
    let client_id = tb.spiffe_id(TRUST_DOMAIN, client);
    // Traffic before the browser comes: mTLS, plaintext, and a denial.
    assert!(call(&tb, &bins, client, 7000, 3), "mTLS calls to 7000");
    assert!(call(&tb, &bins, plain, 7000, 2), "plaintext calls to 7000");
    call(&tb, &bins, client, 9000, 1);
    wait_flows(&tb, 6);

    // chromedriver and Chromium in node 2's namespace; the test reaches chromedriver forwarded.
    let node = &tb.node(2).netns;
    tb.spawn(node.command("/usr/bin/chromedriver", None).unwrap().args(["--port=9515", "--log-level=WARNING"]))
        .unwrap();
    wait_listening(node, 9515).expect("chromedriver listens");
    let driver = Forward::start(node, 9515, "127.0.0.1:0".parse().unwrap()).expect("forwarding chromedriver");
    let profile = tb.dir.join("chromium-profile");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let dashboard = "http://127.0.0.1:15000";
    let explain_cli = run_ok(node.command(&bins.meshless, None).unwrap().args([
        "policy",
        "explain",
        "--agent",
        "127.0.0.1:15000",
        "--from",
        &client_id,
        "--to",
        "default/pod1-n2",
        "--port",
        "9000",
    ]))
    .expect("meshless policy explain");
    let not_after = pod_status(&tb, 2, "default/pod1-n2").unwrap()["certificate"]["not_after"].as_u64().unwrap();
    let not_after = humantime_rfc3339(not_after);
    let shots = screenshots();

    rt.block_on(async {
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": "/usr/bin/chromium",
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--window-size=1500,1000", format!("--user-data-dir={}", profile.display()),
                    "--no-first-run", "--disable-background-networking", "--disable-component-update",
                    "--disable-sync", "--disable-default-apps", "--dns-prefetch-disable",
                ],
            }),
        );
        let c = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps)
            .connect(&format!("http://{}", driver.addr))
            .await
            .expect("a Chromium session through chromedriver");
        let text = |sel: &'static str| {
            let c = c.clone();
            async move { c.find(Locator::Css(sel)).await.unwrap_or_else(|e| panic!("{sel}: {e}")).text().await.unwrap() }
        };
        let shot = |name: &'static str| {
            let c = c.clone();
            let path = shots.join(format!("{name}.png"));
            async move { std::fs::write(&path, c.screenshot().await.expect("a screenshot")).unwrap() }
        };

        // /workloads: the server pod's SPIFFE ID and not-after.
        c.goto(&format!("{dashboard}/workloads")).await.unwrap();
        let table = text("#workloads").await;
        assert!(table.contains(&tb.spiffe_id(TRUST_DOMAIN, server)), "/workloads lacks the pod's SPIFFE ID:\n{table}");
        assert!(table.contains(&not_after), "/workloads lacks the not-after {not_after}:\n{table}");
        shot("workloads").await;

        // /: the figures of the traffic so far.
        c.goto(dashboard).await.unwrap();
        let denied = text("[data-key=denied]").await;
        assert_eq!(denied, "1", "the overview's denials");
        let share = text("[data-key=mtls_connections_5m]").await;
        assert!(share.ends_with('%'), "the overview's mTLS share: {share}");
        c.wait().at_most(Duration::from_secs(5)).for_element(Locator::Css("#live.on")).await.expect("overview live");
        shot("overview").await;

        // /flows: live. A connection made now shows within 3 s, without a reload.
        c.goto(&format!("{dashboard}/flows")).await.unwrap();
        c.wait().at_most(Duration::from_secs(5)).for_element(Locator::Css("#live.on")).await.expect("flows live");
        c.execute("window.meshlessMarker = 42; return null;", vec![]).await.unwrap();
        let before = c.find_all(Locator::Css("#recent tbody tr")).await.unwrap().len();
        let seq = c.find(Locator::Css("#recent")).await.unwrap().attr("data-seq").await.unwrap().expect("data-seq");
        // Blocks this thread (the session's task waits, nothing else is in flight).
        assert!(call(&tb, &bins, client, 7000, 1));
        let row = format!(
            "//table[@id='recent']//tr[td[text()='{client_id}'] and td[text()='7000'] and number(@data-seq) > {seq}]"
        );
        c.wait()
            .at_most(Duration::from_secs(3))
            .for_element(Locator::XPath(&row))
            .await
            .expect("the new connection did not show on /flows within 3 s");
        let after = c.find_all(Locator::Css("#recent tbody tr")).await.unwrap().len();
        assert_eq!(after, before + 1, "one row added");
        let marker = c.execute("return window.meshlessMarker;", vec![]).await.unwrap();
        assert_eq!(marker, json!(42), "the page was reloaded");
        shot("flows").await;

        // The denied call's why-denied view says what `meshless policy explain` says.
        let why = c.find(Locator::Css("#recent tr.verdict-deny a")).await.expect("a why-denied link on the denied flow");
        why.click().await.unwrap();
        let explained = text("#explain").await;
        assert_eq!(explained.trim(), explain_cli.trim(), "why-denied differs from `meshless policy explain`");
        assert!(explained.contains("default/deny-9000 rules[0]"), "{explained}");
        shot("why-denied").await;

        // /policy: rules used and never used, the denial, the plaintext source STRICT would cut.
        c.goto(&format!("{dashboard}/policy")).await.unwrap();
        let unused = text("table.policies").await;
        let never: Vec<&str> = unused.lines().filter(|l| l.contains("never used")).collect();
        assert_eq!(never.len(), 1, "exactly rules[2] of allow-known is never used:\n{unused}");
        assert!(never[0].contains("allow-known") && never[0].contains("rules[2]"), "{never:?}");
        assert!(text("table.denied").await.contains(&client_id), "the denied attempt is listed");
        assert!(text("table.plaintext").await.contains(&plain.ipv4.to_string()), "the plaintext source");
        shot("policy").await;

        // A policy named as markup: the update is refused, and the overview names it as text;
        // no image (or script) came of it.
        mesh.set_policy(&tb, &policy(plain, true)).unwrap();
        let refused = wait_for(Duration::from_secs(10), || {
            let status: serde_json::Value = serde_json::from_str(&admin_get(&tb, 2, "/status").ok()?).ok()?;
            status["refused_update"].as_str()?.contains(XSS).then_some(())
        });
        assert!(refused.is_some(), "the update with the markup name was not refused");
        c.goto(dashboard).await.unwrap();
        let body = text("main").await;
        assert!(body.contains(XSS), "the refused name is not shown as text:\n{body}");
        assert!(c.find_all(Locator::Css("img")).await.unwrap().is_empty(), "a policy name became an element");
        c.close().await.unwrap();
    });
    drop(driver);
    drop(mesh);
}

/// `2026-12-03T19:30:00Z`, as the dashboard writes times.
fn humantime_rfc3339(unix_seconds: u64) -> String {
    let out = std::process::Command::new("date")
        .args(["-u", "-d", &format!("@{unix_seconds}"), "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

#[test]
fn dashboard_security() {
    let Some(bins) = support::privileged("dashboard_security") else {
        return;
    };
    let (tb, mut mesh) = setup("dsec", &bins);
    let (client, plain, server) = (tb.pod(1, 1), tb.pod(1, 2), tb.pod(2, 1));
    assert!(call(&tb, &bins, client, 7000, 2));
    assert!(call(&tb, &bins, plain, 7000, 1));
    call(&tb, &bins, client, 9000, 1);
    wait_flows(&tb, 4);

    // Each local pod's key, as its own Workload API hands it out.
    let mut keys = Vec::new();
    for (node, pod) in [(1, client), (2, server)] {
        let endpoint =
            format!("unix://{}", tb.dir.join(format!("run-node{node}")).join("workload-api/workload.sock").display());
        let (_, out, err) = support::run(pod.command(&bins.wlclient).unwrap().args([&endpoint, "with-key"]));
        let got: serde_json::Value = serde_json::from_str(out.trim()).unwrap_or_else(|_| panic!("wlclient: {err}"));
        keys.push((node, got["key_der_b64"].as_str().expect("the pod's key").to_string()));
    }

    // Everything both endpoints serve, live streams included (read for 3 s).
    let get = |node: usize, url: &str, stream: bool| -> String {
        let mut cmd = tb.node(node).netns.command("curl", None).unwrap();
        cmd.args(["-sS", "--max-time", if stream { "3" } else { "5" }, "-N", url]);
        let (ok, out, err) = support::run(&mut cmd);
        assert!(ok || stream, "{url}: {err}");
        assert!(!out.is_empty(), "{url} said nothing: {err}");
        out
    };
    let client_id = tb.spiffe_id(TRUST_DOMAIN, client);
    let why = format!("/why-denied?from={}&to={}&port=9000", client_id, server.ipv4);
    let explain = format!("/policy/explain?from={client_id}&to=default/pod1-n2&port=9000");
    let paths = [
        "/",
        "/workloads",
        "/flows",
        "/flows?verdict=deny",
        "/policy",
        why.as_str(),
        "/api/flows",
        "/api/policy",
        "/status",
        "/metrics",
        explain.as_str(),
        "/assets/live.js",
        "/assets/style.css",
    ];
    for node in [1, 2] {
        let mut all = String::new();
        for p in paths {
            all += &get(node, &format!("http://127.0.0.1:15000{p}"), false);
        }
        for view in ["overview", "flows"] {
            let events = get(node, &format!("http://127.0.0.1:15000/api/events?view={view}"), true);
            assert!(events.contains(&format!("event: {view}")), "node{node}'s {view} stream: {events}");
            all += &events;
        }
        for p in ["/metrics", "/stats/prometheus"] {
            all += &get(node, &format!("http://127.0.0.1:15020{p}"), false);
        }
        for (owner, key) in &keys {
            // DER in base64 whole, each PEM line of it, and in hex.
            let hex: String = base64_decode(key).iter().map(|b| format!("{b:02x}")).collect();
            assert!(!all.contains(key.as_str()), "node{node}'s output holds node{owner}'s pod key (base64)");
            for line in key.as_bytes().chunks(64).filter(|l| l.len() == 64) {
                let line = std::str::from_utf8(line).unwrap();
                assert!(!all.contains(line), "node{node}'s output holds a PEM line of node{owner}'s pod key");
            }
            assert!(!all.contains(&hex[16..]), "node{node}'s output holds node{owner}'s pod key (hex)");
        }
        assert!(all.contains("istio_tcp_connections_opened_total"), "the scan read the metrics");
    }

    // The policy named as markup (refused: names are validated) is escaped where the page
    // says so.
    mesh.set_policy(&tb, &policy(plain, true)).unwrap();
    let refused = wait_for(Duration::from_secs(10), || {
        let status: serde_json::Value = serde_json::from_str(&admin_get(&tb, 2, "/status").ok()?).ok()?;
        status["refused_update"].as_str()?.contains(XSS).then_some(())
    });
    assert!(refused.is_some(), "the update with the markup name was not refused");
    let page = get(2, "http://127.0.0.1:15000/", false);
    assert!(page.contains("&lt;img src=x onerror=alert(1)&gt;"), "/ does not show the name escaped:\n{page}");
    assert!(!page.contains(XSS), "/ holds the name as markup");
    // Bad input is a clear 400, never a crash (the agent answers after it); a filter that
    // matches nothing is an empty page.
    for (path, want) in [
        ("/why-denied?from=x&to=y&port=99999".to_string(), "400"),
        ("/why-denied?from=x&to=y&port=80".to_string(), "200"),
        ("/flows?verdict=".to_string(), "200"),
        ("/api/events?view=nope".to_string(), "400"),
        (format!("/flows?identity={}", "a".repeat(600)), "400"),
    ] {
        assert_eq!(status_of(&tb, &path, None), want, "{path}");
    }
    // A foreign Host: 403 on every page.
    for p in ["/", "/flows", "/api/events?view=flows"] {
        assert_eq!(status_of(&tb, p, Some("evil.example")), "403", "{p} answered a foreign Host");
    }
    // Few live streams: with eight held open the ninth is refused (the pages still read); once
    // they close, their places are free again.
    let stream_status = || {
        let (_, out, _) = support::run(tb.node(2).netns.command("curl", None).unwrap().args([
            "-s",
            "-D",
            "-",
            "-o",
            "/dev/null",
            "--max-time",
            "2",
            "http://127.0.0.1:15000/api/events?view=overview",
        ]));
        out.lines().next().unwrap_or_default().trim().to_string()
    };
    // Eight streams held open, each confirmed served (a stream of the scan above may still hold
    // its place until its next write finds the reader gone: a holder refused is started again).
    let mut holders = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    for n in 0.. {
        if holders.len() == 8 || std::time::Instant::now() > deadline {
            break;
        }
        let headers = tb.dir.join(format!("holder-{n}"));
        let pid = tb
            .spawn(tb.node(2).netns.command("curl", None).unwrap().args([
                "-sN",
                "-D",
                &headers.display().to_string(),
                "-o",
                "/dev/null",
                "--max-time",
                "60",
                "http://127.0.0.1:15000/api/events?view=overview",
            ]))
            .unwrap();
        let first = wait_for(Duration::from_secs(5), || {
            let text = std::fs::read_to_string(&headers).ok()?;
            text.lines().next().filter(|l| l.contains(' ')).map(str::to_string)
        });
        match first {
            Some(l) if l.starts_with("HTTP/1.1 200") => holders.push(pid),
            _ => tb.stop(pid),
        }
    }
    assert_eq!(holders.len(), 8, "eight live streams were not served");
    let ninth = stream_status();
    assert!(ninth.starts_with("HTTP/1.1 503"), "a ninth live stream was served: {ninth}");
    assert!(admin_get(&tb, 2, "/flows").is_ok(), "the pages still read");
    for pid in holders {
        tb.stop(pid);
    }
    let freed = wait_for(Duration::from_secs(10), || stream_status().starts_with("HTTP/1.1 200").then_some(()));
    assert!(freed.is_some(), "closed streams did not free their places: {}", stream_status());
    // A pod's namespace cannot reach 15000: neither its own loopback nor the node's address.
    for target in ["127.0.0.1".to_string(), meshless_tests::node_ipv4(2).to_string()] {
        let (ok, _, _) = support::run(server.command("curl").unwrap().args([
            "-sS",
            "--max-time",
            "3",
            &format!("http://{target}:15000/"),
        ]));
        assert!(!ok, "a pod reached the admin endpoint at {target}:15000");
    }
    assert!(admin_get(&tb, 2, "/healthz").is_ok(), "the agent still answers");

    // With --admin-token-file every request needs the bearer token (the successor takes the
    // admin socket over and serves it behind the token).
    // (A state file the agent refuses at start is fatal: the valid policy first.)
    mesh.set_policy(&tb, &policy(plain, false)).unwrap();
    let restored = wait_for(Duration::from_secs(10), || {
        let status: serde_json::Value = serde_json::from_str(&admin_get(&tb, 2, "/status").ok()?).ok()?;
        status["refused_update"].is_null().then_some(())
    });
    assert!(restored.is_some(), "the valid policy was not taken back");
    let token_file = tb.dir.join("admin-token");
    std::fs::write(&token_file, "dashboard-test-token-0123456789\n").unwrap();
    let args = vec!["--admin-token-file".to_string(), token_file.display().to_string()];
    mesh.restart_with(&tb, &bins, 2, args).expect("an agent with an admin token");
    assert_eq!(status_of(&tb, "/flows", None), "401", "no token");
    let with = |auth: &str| {
        run_ok(tb.node(2).netns.command("curl", None).unwrap().args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "5",
            "-H",
            auth,
            "http://127.0.0.1:15000/flows",
        ]))
        .unwrap()
    };
    assert_eq!(with("Authorization: Bearer dashboard-test-token-0123456789"), "200");
    assert_eq!(with("Authorization: Bearer dashboard-test-token-012345678"), "401", "a wrong token");
    // kubelet's probes need no token; the CLI sends the agent's own (the same variable).
    assert_eq!(status_of(&tb, "/readyz", None), "200", "readiness behind a token");
    let report = run_ok(
        tb.node(2)
            .netns
            .command(&bins.meshless, None)
            .unwrap()
            .env("MESHLESS_ADMIN_TOKEN_FILE", &token_file)
            .args(["report", "--json"]),
    )
    .expect("meshless report with the agent's token");
    assert!(report.contains("\"plaintext_sources\""), "{report}");
}

fn base64_decode(s: &str) -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.decode(s).unwrap()
}

/// The PromQL of Istio's boards, as they read ztunnel's metrics (the ztunnel board: connections
/// and bytes per proxy pod; the mesh board's TCP table: bytes per destination workload, by
/// destination reporters; the workload board: inbound connections by source workload), with the
/// pod filter naming meshless's pods instead of ztunnel's.
const BOARD_QUERIES: [(&str, &str); 5] = [
    (
        "ztunnel: connections opened",
        r#"sum by (pod) (rate(istio_tcp_connections_opened_total{pod=~"meshless-.*"}[1m]))"#,
    ),
    ("ztunnel: bytes sent", r#"sum by (pod) (rate(istio_tcp_sent_bytes_total{pod=~"meshless-.*"}[1m]))"#),
    (
        "mesh: TCP workloads, bytes sent",
        r#"sum by (destination_workload, destination_workload_namespace, destination_service) (rate(istio_tcp_sent_bytes_total{reporter=~"destination|waypoint"}[1m]))"#,
    ),
    (
        "mesh: TCP workloads, bytes received",
        r#"sum by (destination_workload, destination_workload_namespace, destination_service) (rate(istio_tcp_received_bytes_total{reporter=~"destination|waypoint"}[1m]))"#,
    ),
    (
        "workload: inbound TCP connections by source, mTLS",
        r#"sum by (source_workload, source_workload_namespace) (rate(istio_tcp_connections_opened_total{reporter="destination", destination_workload="pod1-n2", destination_workload_namespace="default", connection_security_policy="mutual_tls"}[1m]))"#,
    ),
];

#[test]
fn grafana_queries() {
    let Some(bins) = support::privileged("grafana_queries") else {
        return;
    };
    assert!(
        std::path::Path::new("/usr/bin/prometheus").exists(),
        "/usr/bin/prometheus is missing: `cargo xtask setup` installs Debian's prometheus"
    );
    let (tb, _mesh) = setup("graf", &bins);
    // Each node's metrics endpoint (15020 in its namespace) on a host loopback port; Prometheus
    // scrapes them there every second, labelled as Kubernetes discovery would label the pods.
    let forwards: Vec<Forward> = (1..=2)
        .map(|i| Forward::start(&tb.node(i).netns, 15020, "127.0.0.1:0".parse().unwrap()).expect("forward"))
        .collect();
    let dir = tb.dir.join("prometheus");
    std::fs::create_dir_all(&dir).unwrap();
    let mut config = String::from("global: {scrape_interval: 1s, evaluation_interval: 1s}\nscrape_configs:\n");
    for (i, f) in forwards.iter().enumerate() {
        config += &format!(
            "  - job_name: node{n}\n    metrics_path: /stats/prometheus\n    static_configs:\n      - targets: \
             ['{addr}']\n        labels: {{pod: meshless-node{n}, namespace: meshless-system}}\n",
            n = i + 1,
            addr = f.addr
        );
    }
    std::fs::write(dir.join("prometheus.yml"), config).unwrap();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    tb.spawn(
        std::process::Command::new("/usr/bin/prometheus")
            .arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(dir.join("log")).unwrap()),
    )
    .unwrap();
    let query = |q: &str| -> Option<Vec<serde_json::Value>> {
        let out = run_ok(std::process::Command::new("curl").args([
            "-sS",
            "--max-time",
            "5",
            "-G",
            &format!("http://127.0.0.1:{port}/api/v1/query"),
            "--data-urlencode",
            &format!("query={q}"),
        ]))
        .ok()?;
        let v: serde_json::Value = serde_json::from_str(&out).ok()?;
        (v["status"] == "success").then(|| v["data"]["result"].as_array().cloned().unwrap_or_default())
    };
    // Both targets up before the traffic, so rate() sees it start.
    let up =
        wait_for(Duration::from_secs(30), || (query("sum(up)")?.first()?["value"][1].as_str()? == "2").then_some(()));
    assert!(
        up.is_some(),
        "Prometheus never scraped both agents: {}",
        std::fs::read_to_string(dir.join("log")).unwrap()
    );
    let (client, server) = (tb.pod(1, 1), tb.pod(2, 1));
    // The pair's series first (rate() counts what a series gained after Prometheus first saw
    // it), then 20 calls more: exactly 25 for the pair, per reporter, once scraped.
    for (calls, total) in [(5, 5), (20, 25)] {
        assert!(call(&tb, &bins, client, 7000, calls), "{calls} mTLS calls");
        wait_closed(&query, total);
    }
    let server_id = tb.spiffe_id(TRUST_DOMAIN, server);
    for (board, q) in BOARD_QUERIES {
        // rate() needs two samples across the traffic: wait until the series is non-zero.
        let result = wait_for(Duration::from_secs(20), || {
            let r = query(q)?;
            r.iter()
                .any(|s| s["value"][1].as_str().and_then(|v| v.parse::<f64>().ok()).is_some_and(|v| v > 0.0))
                .then_some(r)
        });
        let result =
            result.unwrap_or_else(|| panic!("{board}: no non-zero series for the test's traffic: {:?}", query(q)));
        let has = |label: &str, value: &str| result.iter().any(|s| s["metric"][label] == value);
        match board {
            b if b.starts_with("ztunnel") => {
                assert!(has("pod", "meshless-node1") && has("pod", "meshless-node2"), "{board}: {result:?}")
            }
            b if b.starts_with("mesh") => assert!(
                has("destination_workload", "pod1-n2") && has("destination_workload_namespace", "default"),
                "{board}: {result:?}"
            ),
            _ => assert!(has("source_workload", "pod1-n1"), "{board}: {result:?}"),
        }
    }
    // Kiali's lock: the pair's principals are there under mutual_tls.
    let lock = query(&format!(
        r#"sum by (source_principal, destination_principal) (istio_tcp_connections_opened_total{{reporter="destination", connection_security_policy="mutual_tls", destination_principal="{server_id}"}})"#
    ))
    .unwrap();
    assert!(lock.iter().any(|s| s["metric"]["source_principal"] == tb.spiffe_id(TRUST_DOMAIN, client)), "{lock:?}");
    drop(forwards);
}

/// Waits until Prometheus (asked through `query`) holds `n` closed mTLS connections of the
/// test's pair, as each reporter counted them.
fn wait_closed(query: &dyn Fn(&str) -> Option<Vec<serde_json::Value>>, n: u64) {
    for reporter in ["source", "destination"] {
        let q = format!(
            r#"sum(istio_tcp_connections_closed_total{{reporter="{reporter}", source_workload="pod1-n1", destination_workload="pod1-n2", connection_security_policy="mutual_tls"}})"#
        );
        let want = n.to_string();
        let seen =
            wait_for(Duration::from_secs(20), || (query(&q)?.first()?["value"][1].as_str()? == want).then_some(()));
        assert!(
            seen.is_some(),
            "Prometheus never saw {n} closed connections reported by the {reporter}: {:?}",
            query(&q)
        );
    }
}

/// The HTTP status node 2's admin endpoint answers `path` with (with `host` as the Host header).
fn status_of(tb: &Testbed, path: &str, host: Option<&str>) -> String {
    let mut cmd = tb.node(2).netns.command("curl", None).unwrap();
    cmd.args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5"]);
    if let Some(h) = host {
        cmd.args(["-H", &format!("Host: {h}")]);
    }
    run_ok(cmd.arg(format!("http://127.0.0.1:15000{path}"))).unwrap()
}
