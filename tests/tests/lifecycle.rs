//! Live workloads, as root on the namespace testbed with real agents and eBPF: pods added to,
//! changed in and removed from the state file while traffic between other pods goes on; a pod
//! the agent does not know yet never sends plaintext; a bad state file and a pod that cannot be
//! set up leave everything else serving.

mod support;

use std::time::Duration;

use meshless_tests::mesh::{is_listening, wait_listening, wait_pod_gone, wait_pod_state, Mesh, TRUST_DOMAIN};
use meshless_tests::pcap::{seen, Dump};
use meshless_tests::{sockaddr, wait_for, Layout, Pod, Testbed};
use support::{background, finish, run};

fn send(bins: &support::Bins, from: &Pod, to: &str, text: &str) -> (bool, String, String) {
    run(from.command(&bins.testbin).unwrap().args(["send", to, text]))
}

#[test]
fn pods_come_and_go_at_runtime_while_traffic_between_others_never_fails() {
    let Some(bins) = support::privileged("pods_come_and_go") else {
        return;
    };
    let tb = Testbed::new(Layout { label: "live", pods: &[3, 1] }).expect("building the testbed");
    let (client, newcomer, leaver, server) = (tb.pod(1, 1), tb.pod(1, 2), tb.pod(1, 3), tb.pod(2, 1));
    // The newcomer is in no state file yet: the agent does not know it.
    let listed = |p: &Pod| (p.name != newcomer.name || p.node != 1).then_some(true);
    let mesh = Mesh::start_with(&tb, &bins, &listed, &|_| vec![]).expect("starting the agents");
    tb.spawn(server.command(&bins.testbin).unwrap().args(["echo-serve", "7000"])).unwrap();
    wait_listening(&server.netns, 7000).unwrap();
    let to = sockaddr(server.ipv4.into(), 7000);
    let dump = Dump::start(&tb, 1, "live").unwrap();
    // A new connection every 20 ms between two pods that stay, for the whole test.
    let stream = background(client.command(&bins.testbin).unwrap().args(["stream", &to, "14", "20"]));

    // 1. A pod the agent does not know cannot connect out: refused at connect(), no plaintext.
    let (ok, _, err) = send(&bins, newcomer, &to, "unknown-pod-marker-1c7");
    assert!(!ok && err.contains("Operation not permitted"), "an unknown pod's connect must fail with EPERM: {err}");

    // 2. Added to the state files: enrolled, and its calls go over the mesh with its identity.
    let all = [(client, true), (newcomer, true), (leaver, true), (server, true)];
    for node in [1, 2] {
        mesh.write_state(&tb, node, &all, "").unwrap();
    }
    let enrolled = wait_pod_state(&tb, 1, "default/pod2-n1", "enrolled", |_| true);
    assert!(enrolled["certificate"]["serial"].is_string(), "an enrolled pod has its certificate: {enrolled}");
    assert!(mesh.wait_log(2, "state file changed; applying it", |_| true).is_some(), "node2 did not reload");
    let (ok, out, err) = send(&bins, newcomer, &to, "newcomer-marker-5d2");
    assert!(ok && out == "newcomer-marker-5d2<19 bytes>", "the enrolled newcomer's call: {out} {err}");
    let newcomer_id = tb.spiffe_id(TRUST_DOMAIN, newcomer);
    assert!(
        mesh.wait_log(2, "inbound decision", |l| l["src_id"] == newcomer_id.as_str() && l["decision"] == "allow")
            .is_some(),
        "the newcomer's call was not carried by the mesh"
    );

    // 3. Removed: unenrolled, its listeners closed, unknown to the kernel again.
    let (ok, _, err) = send(&bins, leaver, &to, "leaver-meshed");
    assert!(ok, "the leaver is meshed before it leaves: {err}");
    let without_leaver = [(client, true), (newcomer, true), (server, true)];
    for node in [1, 2] {
        mesh.write_state(&tb, node, &without_leaver, "").unwrap();
    }
    wait_pod_gone(&tb, 1, "default/pod3-n1");
    for port in [15001, 15008] {
        let closed = wait_for(Duration::from_secs(10), || (!is_listening(&leaver.netns, port)).then_some(()));
        assert!(closed.is_some(), "the removed pod still has the agent's listener on {port}");
    }
    let (ok, _, err) = send(&bins, leaver, &to, "leaver-marker-9e0");
    assert!(!ok && err.contains("Operation not permitted"), "a removed pod must not connect out: {err}");

    // 4. Taken out of the mesh but still running: known, its connections pass untouched.
    let newcomer_out = [(client, true), (newcomer, false), (server, true)];
    for node in [1, 2] {
        mesh.write_state(&tb, node, &newcomer_out, "").unwrap();
    }
    wait_pod_state(&tb, 1, "default/pod2-n1", "outside_mesh", |_| true);
    let (ok, out, err) = send(&bins, newcomer, &to, "plaintext-control-3b8");
    assert!(ok && out.starts_with("plaintext-control-3b8"), "a pod outside the mesh connects directly: {err}");

    let (ok, result, _, err) = finish(stream);
    assert!(ok, "the request stream failed: {err}");
    assert_eq!(result["failed"], 0, "requests between pods that stayed failed while others came and went: {err}");
    assert!(result["ok"].as_u64().unwrap_or(0) >= 100, "too few requests: {result}");
    let segs = dump.finish(&tb).unwrap();
    assert!(
        seen(&segs, "plaintext-control-3b8"),
        "control: the capture must see plaintext from the pod outside the mesh"
    );
    for marker in ["unknown-pod-marker-1c7", "newcomer-marker-5d2", "leaver-marker-9e0"] {
        assert!(!seen(&segs, marker), "{marker} crossed the node link in plaintext");
    }
}

#[test]
fn a_bad_state_file_keeps_the_old_state_and_a_pod_that_cannot_be_set_up_does_not_stop_the_others() {
    let Some(bins) = support::privileged("bad_state_and_broken_pod") else {
        return;
    };
    let tb = Testbed::new(Layout { label: "broken", pods: &[2, 1] }).expect("building the testbed");
    let (client, squatter, server) = (tb.pod(1, 1), tb.pod(1, 2), tb.pod(2, 1));
    // An app of the squatter pod holds the tunnel port before any agent runs: its enrollment fails.
    let squatting = tb.spawn(squatter.command(&bins.testbin).unwrap().args(["echo-serve", "15008"])).unwrap();
    wait_listening(&squatter.netns, 15008).unwrap();
    let mesh = Mesh::start(&tb, &bins, &|_| true, &[]).expect("the agent starts despite a pod it cannot set up");
    let failing = wait_pod_state(&tb, 1, "default/pod2-n1", "failing", |_| true);
    assert!(failing["last_error"].as_str().unwrap_or("").contains("cannot listen on [::]:15008"), "{failing}");
    tb.spawn(server.command(&bins.testbin).unwrap().args(["echo-serve", "7000"])).unwrap();
    wait_listening(&server.netns, 7000).unwrap();
    let to = sockaddr(server.ipv4.into(), 7000);
    let (ok, out, err) = send(&bins, client, &to, "others-work");
    assert!(ok && out == "others-work<11 bytes>", "the other pods keep working: {err}");
    let (ok, _, err) = send(&bins, squatter, &to, "squatter-early");
    assert!(!ok && err.contains("Operation not permitted"), "a pod that is not set up cannot connect out: {err}");
    // The port is freed: a later retry enrolls the pod (checked at the end).
    tb.stop(squatting);

    // A pod whose netns does not exist is reported and retried with backoff.
    let ghost = format!(
        "  - name: ghost\n    namespace: default\n    serviceAccount: ghost\n    node: node1\n    ips: [\"198.19.1.99\"]\n    netns: /run/netns/{}-ghost\n",
        tb.id
    );
    let pods = [(client, true), (squatter, true), (server, true)];
    mesh.write_state(&tb, 1, &pods, &ghost).unwrap();
    let retried = wait_pod_state(&tb, 1, "default/ghost", "failing", |p| p["attempts"].as_u64() >= Some(3));
    assert!(retried["retry_in_ms"].is_u64(), "a failing pod has its next retry: {retried}");

    // An invalid state file is rejected in one line; the previous state keeps serving.
    std::fs::write(&mesh.states[0], "pods: [this is not\n").unwrap();
    assert!(
        mesh.wait_log(1, "state file rejected; the previous state keeps serving", |_| true).is_some(),
        "the invalid file was not reported: {}",
        mesh.log_summary(1)
    );
    let (ok, out, err) = send(&bins, client, &to, "still-serving");
    assert!(ok && out == "still-serving<13 bytes>", "the previous state must keep serving: {err}");
    let rejected = mesh
        .log_lines(1)
        .iter()
        .filter(|l| l["message"] == "state file rejected; the previous state keeps serving")
        .count();
    assert_eq!(rejected, 1, "one log line for one bad file");

    // The squatter pod was enrolled on a retry, and is meshed; the ghost leaves with the file.
    mesh.write_state(&tb, 1, &pods, "").unwrap();
    wait_pod_state(&tb, 1, "default/pod2-n1", "enrolled", |_| true);
    wait_pod_gone(&tb, 1, "default/ghost");
    let (ok, out, err) = send(&bins, squatter, &to, "squatter-meshed");
    assert!(ok && out == "squatter-meshed<15 bytes>", "{err}");
    let id = tb.spiffe_id(TRUST_DOMAIN, squatter);
    assert!(mesh.wait_log(2, "inbound decision", |l| l["src_id"] == id.as_str() && l["decision"] == "allow").is_some());
}
