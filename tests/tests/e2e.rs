//! End to end, as root, on the namespace testbed with real agents and real eBPF capture:
//! two nodes, two pods each.

mod support;

use std::fs;
use std::net::IpAddr;
use std::time::Duration;

use meshless_tests::mesh::{wait_listening, Mesh, TRUST_DOMAIN};
use meshless_tests::pcap::{self, seen, Dump};
use meshless_tests::{sockaddr, wait_for, Layout, Pod, Testbed};

/// Pod 2 of node 1 stays out of the mesh in every test here.
fn enrolled(p: &Pod) -> bool {
    !(p.node == 1 && p.name == "pod2")
}

fn cluster(label: &str, bins: &support::Bins) -> (Testbed, Mesh) {
    let tb = Testbed::new(Layout { label, pods: &[2, 2] }).expect("building the testbed");
    let mesh = Mesh::start(&tb, bins, &enrolled, &[]).expect("starting the agents");
    (tb, mesh)
}

fn curl(pod: &Pod, url: &str, marker: &str) -> std::process::Output {
    pod.command("curl")
        .unwrap()
        .args(["-sS", "--max-time", "10", "-H", &format!("X-Marker: {marker}"), url])
        .output()
        .expect("running curl")
}

#[test]
fn curl_across_nodes_is_carried_over_mtls_with_the_source_pods_identity() {
    let Some(bins) = support::privileged("curl_across_nodes") else {
        return;
    };
    let (tb, mesh) = cluster("curl", &bins);
    let (client, outsider, server) = (tb.pod(1, 1), tb.pod(1, 2), tb.pod(2, 1));
    let body = "response-body-marker-7d1e";
    tb.spawn(server.command(&bins.testbin).unwrap().args(["http-serve", "8080", body])).unwrap();
    wait_listening(&server.netns, 8080).unwrap();

    // Capture everything on node 1's link to the other nodes.
    let dump = Dump::start(&tb, 1, "node1-eth0").unwrap();

    let secret = "request-marker-a91f";
    let url = format!("http://{}:8080/{secret}", server.ipv4);
    let out = curl(client, &url, secret);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        body,
        "curl through the mesh: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Control: the pod outside the mesh talks plaintext, and the capture must see it.
    let plain = "plaintext-control-marker-44c2";
    let out = curl(outsider, &format!("http://{}:8080/{plain}", server.ipv4), plain);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        body,
        "non-enrolled pod connects directly: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let segs = dump.finish(&tb).expect("reading the capture");
    assert!(seen(&segs, plain), "control failed: the capture should show the non-enrolled pod's plaintext");
    assert!(!seen(&segs, secret), "the meshed request's marker crossed the wire in plaintext");
    assert!(
        segs.iter()
            .filter(|s| s.dst_port == 15008 && s.payload.len() > 5)
            .all(|s| s.payload[0] == 0x16 || s.payload[0] == 0x17 || s.payload[0] == 0x14),
        "every segment to the tunnel port starts a TLS record"
    );
    let tunneled = segs.iter().filter(|s| s.dst_port == 15008 || s.src_port == 15008);
    let records: Vec<&pcap::Segment> = tunneled.filter(|s| s.payload.starts_with(&[0x17, 0x03, 0x03])).collect();
    assert!(!records.is_empty(), "no TLS application-data records on port 15008 in the capture");
    // Whatever it carried: no segment at all went from the meshed client to port 8080 directly,
    // while the outsider's direct connection to it is in the capture (so the check can see one).
    let to_8080 = |pod: &Pod| segs.iter().filter(|s| s.src == IpAddr::from(pod.ipv4) && s.dst_port == 8080).count();
    assert!(to_8080(outsider) > 0, "control failed: the capture should show the outsider's segments to port 8080");
    assert_eq!(to_8080(client), 0, "the meshed client's connection went to port 8080 directly");

    // The server-side agent authorized the connection with the client pod's identity.
    let want_src = tb.spiffe_id(TRUST_DOMAIN, client);
    let want_dst = tb.spiffe_id(TRUST_DOMAIN, server);
    let line = mesh.wait_log(2, "inbound decision", |l| l["src_id"] == want_src.as_str() && l["decision"] == "allow");
    let line = line.unwrap_or_else(|| {
        panic!("node2's agent never logged {want_src} as an authorized source; log: {}", mesh.log_summary(2))
    });
    assert_eq!(line["dst_id"], want_dst.as_str());
    assert_eq!(line["dst_addr"], format!("{}:8080", server.ipv4).as_str());
    // And the client-side agent used the client's identity, towards the server's.
    assert!(
        mesh.wait_log(1, "outbound connection over HBONE", |l| l["src_id"] == want_src.as_str()
            && l["dst_id"] == want_dst.as_str())
            .is_some(),
        "node1's agent did not log the outbound HBONE connection"
    );
}

#[test]
fn ipv4_and_ipv6_work_and_half_close_is_honoured() {
    let Some(bins) = support::privileged("ipv4_and_ipv6") else {
        return;
    };
    let (tb, mesh) = cluster("v6", &bins);
    let (client, server) = (tb.pod(1, 1), tb.pod(2, 2));
    tb.spawn(server.command(&bins.testbin).unwrap().args(["echo-serve", "7000"])).unwrap();
    wait_listening(&server.netns, 7000).unwrap();
    let mapped = format!("[::ffff:{}]:7000", server.ipv4);
    let mut carried: Vec<String> = Vec::new();
    // IPv4, IPv6, and IPv4 through a dual-stack IPv6 socket (v4-mapped, connect6's other branch).
    for (addr, carried_as) in [
        (sockaddr(server.ipv4.into(), 7000), sockaddr(server.ipv4.into(), 7000)),
        (sockaddr(server.ipv6.into(), 7000), sockaddr(server.ipv6.into(), 7000)),
        (mapped.clone(), sockaddr(server.ipv4.into(), 7000)),
    ] {
        // `peer` prints getpeername(), writes, half-closes its side, and reads until EOF; the echo
        // server writes its byte count *after* seeing EOF, which only arrives if the half-close
        // crossed the tunnel while the other direction stayed open.
        let out = client.command(&bins.testbin).unwrap().args(["peer", &addr, "half-close-probe"]).output().unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            format!("{addr}\nhalf-close-probe<16 bytes>"),
            "echo through the mesh to {addr}, and getpeername() must show the pod dialed, not the agent: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let want_src = tb.spiffe_id(TRUST_DOMAIN, client);
        // One more authorization for this target than before: this very connection was carried.
        carried.push(carried_as.clone());
        let want = carried.iter().filter(|c| **c == carried_as).count();
        let seen = wait_for(Duration::from_secs(10), || {
            let n = mesh
                .log_lines(2)
                .iter()
                .filter(|l| {
                    l["message"] == "inbound decision"
                        && l["decision"] == "allow"
                        && l["src_id"] == want_src.as_str()
                        && l["dst_addr"] == carried_as.as_str()
                })
                .count();
            (n >= want).then_some(())
        });
        assert!(seen.is_some(), "{addr} was not carried by the mesh (no new inbound authorization on node2)");
    }
    // Two pods on the same node: still over the mesh, through the node's one agent.
    let neighbour = tb.pod(2, 1);
    let addr = sockaddr(server.ipv4.into(), 7000);
    let out = neighbour.command(&bins.testbin).unwrap().args(["send", &addr, "same-node"]).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "same-node<9 bytes>", "{}", String::from_utf8_lossy(&out.stderr));
    let want_src = tb.spiffe_id(TRUST_DOMAIN, neighbour);
    assert!(
        mesh.wait_log(2, "inbound decision", |l| l["src_id"] == want_src.as_str() && l["decision"] == "allow")
            .is_some(),
        "a same-node call was not carried by the mesh"
    );
}

#[test]
fn kernel_program_logs_reach_the_agent_log_only_when_asked_for() {
    let Some(bins) = support::privileged("kernel_log") else {
        return;
    };
    let tb = Testbed::new(Layout { label: "klog", pods: &[1, 1] }).expect("building the testbed");
    // Node 1's agent forwards the kernel programs' aya-log records; node 2's does not.
    let mesh = Mesh::start(&tb, &bins, &|_| true, &["--kernel-log"]).expect("starting the agents");
    let (client, server) = (tb.pod(1, 1), tb.pod(2, 1));
    tb.spawn(server.command(&bins.testbin).unwrap().args(["echo-serve", "7000"])).unwrap();
    wait_listening(&server.netns, 7000).unwrap();
    let out = client
        .command(&bins.testbin)
        .unwrap()
        .args(["send", &sockaddr(server.ipv4.into(), 7000), "x"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "x<1 bytes>");
    let want = format!("captured connect to {}:7000", server.ipv4);
    assert!(
        mesh.wait_log(1, &want, |_| true).is_some(),
        "the kernel program's log record {want:?} did not reach node1's agent log: {}",
        mesh.log_summary(1)
    );
    // Node 2's agent, without the flag, captures a connect of its own but logs nothing of it.
    tb.spawn(client.command(&bins.testbin).unwrap().args(["echo-serve", "7001"])).unwrap();
    wait_listening(&client.netns, 7001).unwrap();
    let out = server
        .command(&bins.testbin)
        .unwrap()
        .args(["send", &sockaddr(client.ipv4.into(), 7001), "y"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "y<1 bytes>");
    assert!(mesh.wait_log(2, "outbound connection over HBONE", |_| true).is_some(), "node2 should have captured it");
    let leaked = mesh
        .log_lines(2)
        .into_iter()
        .find(|l| l["message"].as_str().is_some_and(|m| m.starts_with("captured connect")));
    assert!(leaked.is_none(), "kernel log records reached node2's log without --kernel-log: {leaked:?}");
}

#[test]
fn destinations_outside_the_mesh_are_passed_through_from_the_pods_own_address() {
    let Some(bins) = support::privileged("passthrough") else {
        return;
    };
    let (tb, mesh) = cluster("pass", &bins);
    let (client, outsider) = (tb.pod(1, 1), tb.pod(1, 2));
    let server_log = tb.dir.join("outsider-http.log");
    tb.spawn(
        outsider
            .command(&bins.testbin)
            .unwrap()
            .args(["http-serve", "8081", "outside-the-mesh"])
            .stderr(fs::File::create(&server_log).unwrap()),
    )
    .unwrap();
    wait_listening(&outsider.netns, 8081).unwrap();
    let url = format!("http://{}:8081/pass", outsider.ipv4);
    let out = curl(client, &url, "passthrough");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "outside-the-mesh", "{}", String::from_utf8_lossy(&out.stderr));
    // The enrolled client's connect was captured, and the agent passed it through…
    let dst = format!("{}:8081", outsider.ipv4);
    assert!(
        mesh.wait_log(1, "passthrough (destination is not in the mesh)", |l| l["dst_addr"] == dst.as_str()).is_some(),
        "node1's agent did not pass the connection through: {}",
        mesh.log_summary(1)
    );
    // …from inside the client pod's netns, so the server sees the client pod's own address.
    let seen = fs::read_to_string(&server_log).unwrap();
    assert!(
        seen.lines().any(|l| l.starts_with(&format!("[::ffff:{}]:", client.ipv4)) && l.contains("GET /pass")),
        "server should see the client pod's address, saw: {seen}"
    );
}

#[test]
fn tunnel_port_refuses_clients_without_a_certificate_from_the_trust_bundle() {
    let Some(bins) = support::privileged("tunnel_refuses") else {
        return;
    };
    let (tb, mesh) = cluster("auth", &bins);
    let server = tb.pod(2, 1);
    let node1 = &tb.node(1).netns;
    let url = format!("https://{}:15008/", server.ipv4);
    let https = |extra: &[&str]| {
        node1
            .command("curl", None)
            .unwrap()
            .args(["-sS", "-k", "--http2", "--max-time", "10", "-o", "/dev/null", "-w", "%{http_code}"])
            .args(extra)
            .arg(&url)
            .output()
            .unwrap()
    };
    // A foreign CA issuing the very same SPIFFE ID, and a genuine certificate as the control.
    let foreign = tb.dir.join("foreign");
    let id = tb.spiffe_id(TRUST_DOMAIN, tb.pod(1, 1));
    for (ca, out) in [(&foreign, "foreign"), (&mesh.ca_dir, "genuine")] {
        if !ca.join("trust-domain").exists() {
            meshless_tests::mesh::run_ok(
                std::process::Command::new(&bins.meshless).args(["ca", "init", "--out"]).arg(ca),
            )
            .unwrap();
        }
        meshless_tests::mesh::run_ok(
            std::process::Command::new(&bins.meshless)
                .args(["ca", "issue", "--id", &id, "--name", out, "--ca-dir"])
                .arg(ca)
                .arg("--out")
                .arg(&tb.dir),
        )
        .unwrap();
    }
    let cert = |n: &str| [tb.dir.join(format!("{n}.pem")), tb.dir.join(format!("{n}-key.pem"))];

    let none = https(&[]);
    assert!(!none.status.success(), "a client without a certificate got through: {:?}", none);
    let [c, k] = cert("foreign");
    let bad = https(&["--cert", c.to_str().unwrap(), "--key", k.to_str().unwrap()]);
    assert!(!bad.status.success(), "a client with a foreign-CA certificate got through: {:?}", bad);
    // Control: the genuine certificate passes TLS and reaches HTTP/2, where a GET (not CONNECT)
    // is answered 400 — so the two refusals above were the certificate's doing.
    let [c, k] = cert("genuine");
    let good = https(&["--cert", c.to_str().unwrap(), "--key", k.to_str().unwrap()]);
    assert_eq!(String::from_utf8_lossy(&good.stdout), "400", "genuine certificate should reach HBONE: {:?}", good);

    // Garbage on the tunnel port: a complete TLS handshake record (261 bytes long) that is not a
    // ClientHello. The agent closes that connection at once (nothing but TLS comes back: at most an
    // alert), logs why, and keeps serving.
    let tls_failures = || {
        mesh.log_lines(2)
            .iter()
            .filter(|l| l["error"].as_str().is_some_and(|e| e.starts_with("TLS with the peer failed")))
            .count()
    };
    let before = tls_failures();
    let garbage = format!("\x16\x03\x01\x01\x05{}", "h".repeat(0x105));
    let out = node1
        .command(&bins.testbin, None)
        .unwrap()
        .args(["end", &sockaddr(server.ipv4.into(), 15008), &garbage])
        .output()
        .unwrap();
    let ended: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("garbage client: {}", String::from_utf8_lossy(&out.stderr)));
    let reply = ended["reply"].as_str().unwrap_or_default();
    assert!(reply.is_empty() || reply.starts_with("\u{15}\u{3}"), "garbage got more than a TLS alert: {ended}");
    assert!(matches!(ended["end"].as_str(), Some("eof" | "reset")), "the agent must close the connection: {ended}");
    assert!(
        wait_for(Duration::from_secs(10), || (tls_failures() > before).then_some(())).is_some(),
        "the agent should log the garbage connection's TLS failure"
    );
    tb.spawn(server.command(&bins.testbin).unwrap().args(["echo-serve", "7001"])).unwrap();
    wait_listening(&server.netns, 7001).unwrap();
    let out = tb
        .pod(1, 1)
        .command(&bins.testbin)
        .unwrap()
        .args(["send", &sockaddr(server.ipv4.into(), 7001), "still-alive"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "still-alive<11 bytes>", "agent should survive bad input");
}

#[test]
fn a_failure_or_reset_on_one_side_reaches_the_other_app_as_a_reset_and_a_clean_close_as_a_fin() {
    let Some(bins) = support::privileged("rst_fin") else {
        return;
    };
    let (tb, _mesh) = cluster("rstfin", &bins);
    let (client, server) = (tb.pod(1, 1), tb.pod(2, 1));
    tb.spawn(server.command(&bins.testbin).unwrap().args(["echo-serve", "7000"])).unwrap();
    tb.spawn(server.command(&bins.testbin).unwrap().args(["reset-serve", "7200"])).unwrap();
    let watch_log = tb.dir.join("watch.log");
    tb.spawn(
        server
            .command(&bins.testbin)
            .unwrap()
            .args(["watch-serve", "7300"])
            .stdout(fs::File::create(&watch_log).unwrap()),
    )
    .unwrap();
    for port in [7000, 7200, 7300] {
        wait_listening(&server.netns, port).unwrap();
    }
    let end = |port: u16| -> serde_json::Value {
        let out = client
            .command(&bins.testbin)
            .unwrap()
            .args(["end", &sockaddr(server.ipv4.into(), port), "ping"])
            .output()
            .unwrap();
        serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("{}", String::from_utf8_lossy(&out.stderr)))
    };
    // A clean close is a clean close: all the data, then EOF.
    let clean = end(7000);
    assert_eq!((clean["end"].as_str(), clean["reply"].as_str()), (Some("eof"), Some("ping<4 bytes>")), "{clean}");
    // The server app resets after answering: the client app gets the answer, then a reset.
    let reset = end(7200);
    assert_eq!((reset["end"].as_str(), reset["reply"].as_str()), (Some("reset"), Some("ok")), "{reset}");
    // Nothing listens on the target port: the delivery fails, and the client app sees a reset,
    // not a clean (empty) end.
    let refused = end(7999);
    assert_eq!(refused["end"], "reset", "{refused}");
    // The other direction: the client app resets; the server app sees the reset.
    let out = client
        .command(&bins.testbin)
        .unwrap()
        .args(["send-rst", &sockaddr(server.ipv4.into(), 7300), "bye"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let seen = wait_for(Duration::from_secs(10), || {
        let line = fs::read_to_string(&watch_log).ok()?;
        serde_json::from_str::<serde_json::Value>(line.lines().next()?).ok()
    })
    .expect("the server app saw the connection end");
    assert_eq!((seen["end"].as_str(), seen["got"].as_str()), (Some("reset"), Some("bye")), "{seen}");
}
