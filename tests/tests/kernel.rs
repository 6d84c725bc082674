//! The kernel programs' guarantees, as root on the namespace testbed with real agents and eBPF:
//! original destinations keyed by the full source (two sockets of one pod sharing a port never
//! collide), per-pod maps (one pod's connect flood cannot evict another pod's pending entry),
//! the agent's ports closed to apps, and MPTCP refused where it would leave a meshed pod in
//! plaintext.
//!
//! To hold entries pending, the node's agent is paused (SIGSTOP): connects then complete into the
//! listener's queue, with their original destination filed, until the agent resumes and accepts.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use meshless_tests::mesh::{wait_listening, Mesh};
use meshless_tests::pcap::{seen, Dump};
use meshless_tests::{bpf, sockaddr, wait_for, Layout, Testbed};
use support::{background, finish, run};

#[test]
fn two_sockets_of_one_pod_sharing_a_source_port_reach_their_own_destinations() {
    let Some(bins) = support::privileged("same_port") else {
        return;
    };
    let tb = Testbed::new(Layout { label: "sameport", pods: &[1, 1] }).expect("building the testbed");
    let (client, server) = (tb.pod(1, 1), tb.pod(2, 1));
    let mesh = Mesh::start(&tb, &bins, &|_| true, &[]).expect("starting the agents");
    for (port, tag) in [("7100", "to-7100"), ("7101", "to-7101")] {
        tb.spawn(server.command(&bins.testbin).unwrap().args(["tag-serve", port, tag])).unwrap();
        wait_listening(&server.netns, port.parse().unwrap()).unwrap();
    }
    // A second address on the client pod: two sockets may then share a source port.
    client.netns.ip("addr add 198.19.1.201/24 dev eth0").unwrap();
    let agent = mesh.agents[0];
    tb.signal(agent, libc::SIGSTOP);
    let both = background(client.command(&bins.testbin).unwrap().args([
        "same-port",
        "41000",
        &client.ipv4.to_string(),
        &sockaddr(server.ipv4.into(), 7100),
        "198.19.1.201",
        &sockaddr(server.ipv4.into(), 7101),
    ]));
    // Both connects are filed, side by side, each with its own destination, before the agent
    // resumes and accepts them (the collision would be one overwriting the other here).
    let at = |ip: &str, port: u16| -> SocketAddr { SocketAddr::new(ip.parse().unwrap(), port) };
    let server_ip = server.ipv4.to_string();
    let want = [
        (at(&client.ipv4.to_string(), 41000), at(&server_ip, 7100)),
        (at("198.19.1.201", 41000), at(&server_ip, 7101)),
    ];
    let mut filed = Vec::new();
    let both_filed = wait_for(Duration::from_secs(10), || {
        filed = bpf::pending_connections(&tb.bpf_dir(1)).expect("reading node1's ORIG_DST maps");
        filed.retain(|p| p.src.port() == 41000);
        let pairs: Vec<(SocketAddr, SocketAddr)> = filed.iter().map(|p| (p.src, p.orig_dst)).collect();
        let one_pod = filed.iter().all(|p| p.pod_map == filed[0].pod_map);
        (want.iter().all(|w| pairs.contains(w)) && one_pod).then_some(())
    });
    assert!(
        both_filed.is_some(),
        "within 10 s the client pod's map did not hold both sockets of port 41000 with their own destinations: {filed:?}"
    );
    tb.signal(agent, libc::SIGCONT);
    let (ok, _, out, err) = finish(both);
    assert!(ok, "{err}");
    assert_eq!(out, "to-7100\nto-7101\n", "each socket must reach the destination it dialed");
}

#[test]
fn one_pods_connect_flood_cannot_evict_another_pods_pending_connection() {
    let Some(bins) = support::privileged("flood") else {
        return;
    };
    let tb = Testbed::new(Layout { label: "flood", pods: &[2, 1] }).expect("building the testbed");
    let (victim, flooder, server) = (tb.pod(1, 1), tb.pod(1, 2), tb.pod(2, 1));
    let mesh = Mesh::start(&tb, &bins, &|_| true, &[]).expect("starting the agents");
    // Its stderr is left out: the flood's own connections end in resets there.
    tb.spawn(
        server
            .command(&bins.testbin)
            .unwrap()
            .args(["tag-serve", "7100", "served"])
            .stderr(std::process::Stdio::null()),
    )
    .unwrap();
    wait_listening(&server.netns, 7100).unwrap();
    let to = sockaddr(server.ipv4.into(), 7100);
    let agent = mesh.agents[0];
    tb.signal(agent, libc::SIGSTOP);
    // The victim's connection waits in the listener's queue, its destination filed.
    let victim_call = background(victim.command(&bins.testbin).unwrap().args(["send", &to, "v"]));
    let from = |pod: &meshless_tests::Pod, filed: &[bpf::Pending]| -> Vec<bpf::Pending> {
        filed.iter().filter(|p| p.pod == Some(pod.ipv4)).cloned().collect()
    };
    let pending = || bpf::pending_connections(&tb.bpf_dir(1)).expect("reading node1's ORIG_DST maps");
    let victims = wait_for(Duration::from_secs(10), || Some(from(victim, &pending())).filter(|v| v.len() == 1));
    let victims =
        victims.unwrap_or_else(|| panic!("within 10 s the victim's connect was not filed in its map: {:?}", pending()));
    // Far more connects than the flooder's own map holds (ORIG_DST_PER_POD): each files an entry.
    let (ok, out, err) = run(flooder.command(&bins.testbin).unwrap().args(["flood", &to, "70000"]));
    assert!(ok, "{err}");
    let attempts: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    // What the kernel filed, read while the agent (which takes entries out) is still paused: the
    // flood filled the flooder's own map, and the victim's entry is still there, in another map.
    let filed = pending();
    let (flood, after) = (from(flooder, &filed), from(victim, &filed));
    tb.signal(agent, libc::SIGCONT);
    let per_pod = meshless_common::ORIG_DST_PER_POD as usize;
    assert!(
        flood.len() >= per_pod * 3 / 4 && flood.len() <= per_pod,
        "the flood must fill the flooder's map ({per_pod} entries) to mean anything: {} entries filed; {attempts}",
        flood.len()
    );
    assert!(flood.iter().all(|p| p.pod_map != victims[0].pod_map), "the flood's entries went to the victim's map");
    assert_eq!(after, victims, "the flood evicted the victim's pending entry");
    let (ok, _, out, err) = finish(victim_call);
    assert!(ok && out == "served", "the victim's pending connection was lost to the flood: {out} {err}");
    // The flood's connections, reset while queued, cost no upstream stream.
    let skipped = |mesh: &Mesh| {
        mesh.log_lines(1).iter().filter(|l| l["message"] == "the app's connection ended before it was accepted").count()
    };
    assert!(
        wait_for(Duration::from_secs(10), || (skipped(&mesh) > 100).then_some(())).is_some(),
        "queued connections the flood reset were carried upstream anyway ({} skipped)",
        skipped(&mesh)
    );
    // Both pods go on working: the victim at once; the flooder, whose own map its flood filled
    // while the agent still drains the flood's queued connections, within a few tries.
    for (pod, tries) in [(victim, 1), (flooder, 5)] {
        let mut last = (false, String::new(), String::new());
        for _ in 0..tries {
            last = run(pod.command(&bins.testbin).unwrap().args(["send", &to, "after"]));
            if last.0 && last.1 == "served" {
                break;
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        let (ok, out, err) = last;
        assert!(
            ok && out == "served",
            "{} after the flood: {err}\nnode1:\n{}\nnode2:\n{}",
            pod.name,
            mesh.log_summary(1),
            mesh.log_summary(2)
        );
    }
}

#[test]
fn apps_in_enrolled_pods_cannot_bind_the_agents_ports_and_neither_mptcp_nor_the_agents_mark_gets_around_the_capture() {
    let Some(bins) = support::privileged("bind_and_mptcp") else {
        return;
    };
    let tb = Testbed::new(Layout { label: "bindmptcp", pods: &[3, 1] }).expect("building the testbed");
    let (enrolled, outsider, unknown, server) = (tb.pod(1, 1), tb.pod(1, 2), tb.pod(1, 3), tb.pod(2, 1));
    // Pod 3 of node 1 is in no state file: a pod the agent has not learned yet.
    let listed = |p: &meshless_tests::Pod| match (p.node, p.name.as_str()) {
        (1, "pod2") => Some(false),
        (1, "pod3") => None,
        _ => Some(true),
    };
    let mesh = Mesh::start_with(&tb, &bins, &listed, &|_| vec![]).expect("starting the agents");
    for port in ["15001", "15006", "15008"] {
        let (ok, _, err) = run(enrolled.command(&bins.testbin).unwrap().args(["echo-serve", port]));
        assert!(!ok && err.contains("Operation not permitted"), "an enrolled pod's app bound port {port}: {err}");
    }
    // A pod outside the mesh is left alone: it may bind what it likes.
    let squat = tb.spawn(outsider.command(&bins.testbin).unwrap().args(["echo-serve", "15006"])).unwrap();
    wait_listening(&outsider.netns, 15006).expect("a pod outside the mesh may bind 15006");
    tb.stop(squat);

    // MPTCP is carried by no one: from an enrolled pod it is refused (never plaintext), from a pod
    // not learned yet too (like its TCP); a pod the mesh leaves alone may use it.
    tb.spawn(server.command(&bins.testbin).unwrap().args(["echo-serve", "7000"])).unwrap();
    wait_listening(&server.netns, 7000).unwrap();
    let to = sockaddr(server.ipv4.into(), 7000);
    let dump = Dump::start(&tb, 1, "mptcp").unwrap();
    for (pod, what) in [(enrolled, "an enrolled pod"), (unknown, "a pod not learned yet")] {
        let (ok, _, err) = run(pod.command(&bins.testbin).unwrap().args(["send-mptcp", &to, "mptcp-marker-7f3"]));
        assert!(!ok && err.contains("Operation not permitted"), "MPTCP from {what} must be refused: {err}");
    }
    let (ok, _, err) = run(unknown.command(&bins.testbin).unwrap().args(["send", &to, "tcp-marker-unknown"]));
    assert!(!ok && err.contains("Operation not permitted"), "control: TCP from a pod not learned yet: {err}");
    let (ok, out, err) = run(outsider.command(&bins.testbin).unwrap().args(["send-mptcp", &to, "mptcp-outside-5c1"]));
    assert!(ok && out == "mptcp-outside-5c1<17 bytes>", "a pod outside the mesh may use MPTCP: {err}");
    let (ok, out, err) = run(enrolled.command(&bins.testbin).unwrap().args(["send", &to, "tcp-marker-2a9"]));
    assert!(ok && out == "tcp-marker-2a9<14 bytes>", "{err}");
    // A pod that marks its socket with the agent's mark (any pod with NET_ADMIN can) is still a
    // pod: the agent is known by its cgroup, so the connection is captured all the same.
    let mark = meshless_common::AGENT_MARK.to_string();
    let (ok, out, err) =
        run(enrolled.command(&bins.testbin).unwrap().args(["send-marked", &to, "marked-marker-4d2", &mark]));
    assert!(ok && out == "marked-marker-4d2<17 bytes>", "{err}");
    let segs = dump.finish(&tb).unwrap();
    assert!(!seen(&segs, "marked-marker-4d2"), "a socket with the agent's mark skipped the capture");
    assert!(!seen(&segs, "mptcp-marker-7f3"), "an enrolled pod's MPTCP left in plaintext");
    assert!(seen(&segs, "mptcp-outside-5c1"), "control: the capture sees plaintext");
    assert!(!seen(&segs, "tcp-marker-2a9"), "control: the TCP connection is captured and encrypted");
    let carried = mesh
        .log_lines(2)
        .into_iter()
        .filter(|l| l["message"] == "inbound decision" && l["transport"] == "hbone")
        .count();
    assert_eq!(carried, 2, "the TCP connections (the marked one too) went through the mesh");
}
