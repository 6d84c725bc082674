//! Restarts and upgrades, as root on the namespace testbed with real agents and eBPF: an upgrade
//! (a second agent started while the first runs, then the first told to stop) loses no connection,
//! new or established; after kill -9 nothing leaves an enrolled pod in plaintext, the connections
//! that agent carried end, and a restarted agent adopts the pinned state and serves again; the
//! apps on both sides of a connection whose agent was killed see it reset, never a clean end.

mod support;

use std::time::Duration;

use meshless_tests::mesh::{json_lines, wait_listening, TRUST_DOMAIN};
use meshless_tests::pcap::{seen, Dump};
use meshless_tests::wait_for;
use support::{background, echo_pair, finish, run, LongLived, Pair};

#[test]
fn an_upgrade_under_load_loses_no_new_connection_and_keeps_the_established_ones() {
    let Some(bins) = support::privileged("upgrade") else {
        return;
    };
    let Pair { tb, mut mesh, to } = echo_pair("upgrade", &bins, &[]);
    let client = tb.pod(1, 1);
    let stream = background(client.command(&bins.testbin).unwrap().args(["stream", &to, "9", "10"]));
    let mut long = LongLived::start(&tb, &bins, client, &to, 9, "upgrade-long");
    long.wait_rounds(2, "the long-lived connection is established before the upgrade");

    // Upgrade the server side's agent, then the client side's, each while the other runs.
    let mut old = Vec::new();
    for node in [2, 1] {
        let (old_pid, old_log) = (mesh.agents[node - 1], mesh.logs[node - 1].clone());
        let (_, new_log) = mesh.spawn_agent(&tb, &bins, node).expect("the successor becomes ready");
        let took =
            json_lines(&new_log).into_iter().find(|l| l["message"] == "took over the listeners of the running agent");
        assert_eq!(
            took.as_ref().map(|l| l["listeners"].as_u64()),
            Some(Some(6)),
            "the successor takes the pod's four listeners (15001 on 127.0.0.1 and ::1, 15006, 15008), the \
             admin endpoint's and the metrics endpoint's: {took:?}"
        );
        // The admin and metrics ports are the agents' alone: not shared, so another process of
        // the node's user cannot bind beside them and answer /readyz or /metrics.
        for port in [meshless_tests::ADMIN_PORT, 15020] {
            let squat = tb
                .node(node)
                .netns
                .command("python3", None)
                .unwrap()
                .args([
                    "-c",
                    &format!(
                        "import socket\ns = socket.socket()\ns.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)\n\
                     s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\ns.bind(('127.0.0.1', {port}))"
                    ),
                ])
                .output()
                .unwrap();
            assert!(
                !squat.status.success() && String::from_utf8_lossy(&squat.stderr).contains("Address already in use"),
                "a process bound port {port} beside the agents: {}",
                String::from_utf8_lossy(&squat.stderr)
            );
        }
        tb.signal(old_pid, libc::SIGTERM);
        // The old agent has handed over (it no longer accepts: only the successor can serve
        // what comes next), and the established connection it carries still carries data.
        let handed_over = wait_for(Duration::from_secs(10), || {
            json_lines(&old_log).into_iter().find(|l| l["message"] == "stopped accepting; draining connections")
        });
        assert!(handed_over.is_some(), "node{node}'s old agent did not stop accepting within 10 s after SIGTERM");
        // The successor serves the new connections of the load meanwhile.
        let serves = if node == 2 { "inbound decision" } else { "outbound connection over HBONE" };
        let served =
            wait_for(Duration::from_secs(10), || json_lines(&new_log).into_iter().find(|l| l["message"] == serves));
        assert!(served.is_some(), "node{node}'s successor logged no {serves:?} within 10 s: {new_log:?}");
        long.wait_more_rounds(3, &format!("the long-lived connection carries data after node{node}'s upgrade"));
        old.push((node, old_pid, old_log));
    }

    let (ok, result, _, err) = long.finish();
    assert!(ok, "the long-lived connection did not survive the upgrade: {err}");
    assert!(result["rounds"].as_u64().unwrap_or(0) > 50, "{result}");
    let (ok, result, _, err) = finish(stream);
    assert!(ok, "{err}");
    assert_eq!(result["failed"], 0, "new connections failed during the upgrade: {err}");
    assert!(result["ok"].as_u64().unwrap_or(0) > 200, "{result}");

    // The old agents drained their connections and left on their own.
    for (node, pid, log) in old {
        let status = tb.wait_exit(pid, Duration::from_secs(40));
        assert!(status.is_some_and(|s| s.success()), "node{node}'s old agent did not exit cleanly: {status:?}");
        let lines = json_lines(&log);
        assert!(
            lines
                .iter()
                .any(|l| l["message"] == "stopped accepting; draining connections"
                    && l["why"] == "a successor took over"),
            "node{node}'s old agent did not hand over: {lines:?}"
        );
        let stopped = lines.iter().find(|l| l["message"] == "agent stopped").expect("the old agent logs its stop");
        assert_eq!(stopped["drained"], true, "node{node}'s old agent had to reset connections: {stopped}");
    }
    // The new agents serve on their own, the admin endpoint included (on the handed-over socket).
    for node in [1, 2] {
        let status = meshless_tests::mesh::status(&tb, node).expect("the successor answers on the admin port");
        assert_eq!(status["draining"], false, "node{node}: {status}");
    }
    let (ok, out, err) = run(client.command(&bins.testbin).unwrap().args(["send", &to, "after-upgrade"]));
    assert!(ok && out == "after-upgrade<13 bytes>", "{err}");
    let id = tb.spiffe_id(TRUST_DOMAIN, client);
    assert!(mesh.wait_log(2, "inbound decision", |l| l["src_id"] == id.as_str() && l["decision"] == "allow").is_some());
}

#[test]
fn after_kill_9_nothing_leaves_in_plaintext_and_a_restarted_agent_serves_again() {
    let Some(bins) = support::privileged("kill9") else {
        return;
    };
    let Pair { tb, mut mesh, to } = echo_pair("kill9", &bins, &[]);
    let client = tb.pod(1, 1);
    let dump = Dump::start(&tb, 1, "kill9").unwrap();
    let mut long = LongLived::start(&tb, &bins, client, &to, 20, "kill9-long");
    long.wait_rounds(2, "the long-lived connection is established before the kill");

    let killed = mesh.agents[0];
    tb.signal(killed, libc::SIGKILL);
    assert!(tb.wait_exit(killed, Duration::from_secs(10)).is_some(), "the agent did not die");
    // The connection that agent carried ends (it held its sockets).
    let (ok, _, _, err) = long.finish();
    assert!(!ok, "a connection carried by a killed agent cannot go on");
    assert!(err.contains("Connection reset by peer"), "it ends with a reset, never a clean end: {err}");
    // While no agent runs, the pinned programs still capture: the connect is refused, nothing
    // leaves the pod in plaintext.
    for marker in ["gap-marker-a4e", "gap-marker-b71"] {
        let (ok, _, err) = run(client.command(&bins.testbin).unwrap().args(["send", &to, marker]));
        assert!(!ok && err.contains("Connection refused"), "a connect while no agent runs must be refused: {err}");
    }

    let (_, log) = mesh.spawn_agent(&tb, &bins, 1).expect("a restarted agent becomes ready");
    let attached = json_lines(&log)
        .into_iter()
        .find(|l| l["message"].as_str().is_some_and(|m| m.starts_with("eBPF capture attached")));
    let attached = attached.expect("the restarted agent attaches its programs");
    // 7 programs on the pods' cgroup, 1 on the kubelet's.
    assert_eq!(attached["replaced_links"], 8, "the restarted agent replaces the 8 pinned cgroup links: {attached}");
    // And the sk_lookup link of node 1's one pod is replaced, not doubled.
    let netns_links = tb.bpf_dir(1).join(format!("v{}/links/netns", meshless_common::LAYOUT_VERSION));
    assert_eq!(std::fs::read_dir(&netns_links).unwrap().count(), 1, "one sk_lookup link per enrolled pod");
    let (ok, out, err) = run(client.command(&bins.testbin).unwrap().args(["send", &to, "after-restart-marker"]));
    assert!(ok && out == "after-restart-marker<20 bytes>", "{err}");
    let id = tb.spiffe_id(TRUST_DOMAIN, client);
    assert!(mesh.wait_log(2, "inbound decision", |l| l["src_id"] == id.as_str() && l["decision"] == "allow").is_some());
    let segs = dump.finish(&tb).unwrap();
    for marker in ["gap-marker-a4e", "gap-marker-b71", "after-restart-marker", "round-0000"] {
        assert!(!seen(&segs, marker), "{marker} crossed the node link in plaintext");
    }
    assert!(
        segs.iter().any(|s| (s.dst_port == 15008 || s.src_port == 15008) && s.payload.starts_with(&[0x17, 3, 3])),
        "control: the capture holds the tunnel's TLS records"
    );
}

/// How many established TCP connections to `port` the pod's netns holds (the app's side).
fn established(pod: &meshless_tests::Pod, port: u16) -> usize {
    let (_, out, _) = run(pod
        .netns
        .command("ss", None)
        .unwrap()
        .args(["-Htn", "state", "established"])
        .arg(format!("( sport = :{port} )")));
    out.lines().filter(|l| !l.trim().is_empty()).count()
}

#[test]
fn a_killed_agent_resets_the_apps_connections_on_either_side_never_a_clean_end() {
    let Some(bins) = support::privileged("kill9_reset") else {
        return;
    };
    let Pair { tb, mut mesh, .. } = echo_pair("kill9rst", &bins, &[]);
    let (client, server) = (tb.pod(1, 1), tb.pod(2, 1));
    // The server app says how each connection ended.
    let ends = tb.dir.join("watch-serve.out");
    tb.spawn(
        server
            .command(&bins.testbin)
            .unwrap()
            .args(["watch-serve", "7300"])
            .stdout(std::fs::File::create(&ends).unwrap()),
    )
    .unwrap();
    wait_listening(&server.netns, 7300).unwrap();
    let to = meshless_tests::sockaddr(server.ipv4.into(), 7300);
    for (round, node) in [1, 2].into_iter().enumerate() {
        // A request sent, no answer yet: the client app reads to end-of-stream.
        let waiting = background(client.command(&bins.testbin).unwrap().args(["wait-end", &to, "half-a-request"]));
        let up = wait_for(Duration::from_secs(10), || (established(server, 7300) == 1).then_some(()));
        assert!(up.is_some(), "round {round}: the connection never reached the server app");
        let killed = mesh.agents[node - 1];
        tb.signal(killed, libc::SIGKILL);
        assert!(tb.wait_exit(killed, Duration::from_secs(10)).is_some(), "node{node}'s agent did not die");
        let (_, client_end, out, err) = finish(waiting);
        assert_eq!(
            client_end["end"], "reset",
            "node{node}'s agent killed: the client app must see a reset, not a clean end: {out} {err}"
        );
        let server_end = wait_for(Duration::from_secs(10), || json_lines(&ends).get(round).cloned());
        let server_end =
            server_end.unwrap_or_else(|| panic!("round {round}: the server app never saw its connection end"));
        assert_eq!(
            (server_end["end"].as_str(), server_end["got"].as_str()),
            (Some("reset"), Some("half-a-request")),
            "node{node}'s agent killed: the server app must see a reset after the request"
        );
        if node == 1 {
            mesh.spawn_agent(&tb, &bins, 1).expect("node1's agent restarted");
        }
    }
}
