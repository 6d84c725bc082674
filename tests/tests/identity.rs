//! Workload identity without a CA key on any node, as root on the namespace testbed with the real
//! issuer (on the control-plane host) and real agents: certificates rotate under traffic with no
//! failure; an issuer outage shorter than a lifetime is invisible, a longer one fails closed and
//! recovers by itself; the issuer signs a node only its own pods' identities; no file an agent
//! reads holds a CA key; a full root rollover under traffic loses nothing; the Workload API gives
//! a pod its own SVID and nobody else's.

mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use meshless_tests::mesh::{
    inbound_decisions, node_credentials, run_ok, wait_listening, Mesh, ISSUER_PORT, TRUST_DOMAIN,
};
use meshless_tests::{sockaddr, wait_for, Layout, Testbed, CONTROL_IPV4};
use rcgen::PublicKeyData as _;
use support::{background, finish, run};

/// Two nodes, one pod each; the issuer signs `ttl` certificates, renewed at half their life;
/// agents look for a new bundle every second. An echo server listens in node 2's pod.
fn cluster(label: &str, bins: &support::Bins, ttl: &str) -> (Testbed, Mesh, String) {
    let tb = Testbed::new(Layout { label, pods: &[1, 1] }).expect("building the testbed");
    let args = |_| vec!["--renew-fraction".into(), "0.5".into(), "--bundle-refresh".into(), "1s".into()];
    let mesh = Mesh::start_full(&tb, bins, &|_| Some(true), &args, &["--svid-ttl", ttl], "").expect("starting");
    let server = tb.pod(2, 1);
    tb.spawn(server.command(&bins.testbin).unwrap().args(["echo-serve", "7000"]).stderr(std::process::Stdio::null()))
        .unwrap();
    wait_listening(&server.netns, 7000).unwrap();
    let to = sockaddr(server.ipv4.into(), 7000);
    (tb, mesh, to)
}

/// Serials of the client certificates node 2's agent saw in TLS handshakes.
fn serials_seen(mesh: &Mesh) -> BTreeSet<String> {
    mesh.log_lines(2)
        .iter()
        .filter(|l| l["message"] == "TLS handshake with a tunnel client")
        .filter_map(|l| l["peer_serial"].as_str().map(String::from))
        .collect()
}

fn count(lines: &[serde_json::Value], message: &str, pod: &str) -> usize {
    lines.iter().filter(|l| l["message"] == message && (pod.is_empty() || l["pod"] == pod)).count()
}

#[test]
fn certificates_rotate_under_a_continuous_stream_without_a_failed_request() {
    let Some(bins) = support::privileged("rotation") else {
        return;
    };
    let (tb, mesh, to) = cluster("rotate", &bins, "20s");
    let client = tb.pod(1, 1);
    // A new connection every 30 ms for 45 s: several renewals of both pods' certificates.
    let stream = background(client.command(&bins.testbin).unwrap().args(["stream", &to, "45", "30"]));
    let (ok, result, _, err) = finish(stream);
    assert!(ok, "{err}");
    assert_eq!(result["failed"], 0, "requests failed while certificates rotated: {err}");
    assert!(result["ok"].as_u64().unwrap_or(0) > 600, "{result}");
    let renewed = count(&mesh.log_lines(1), "certificate renewed", "default/pod1-n1");
    assert!(renewed >= 3, "node 1 should renew its pod's 20 s certificate at least 3 times in 45 s, did {renewed}");
    // Node 2 saw the client pod present several different certificates over the run.
    let serials = serials_seen(&mesh);
    assert!(serials.len() >= 3, "the certificate serials seen on the wire did not change: {serials:?}");
    eprintln!("rotation: {result}, renewals {renewed}, client serials seen {}", serials.len());
}

#[test]
fn an_issuer_outage_shorter_than_a_lifetime_is_invisible_and_a_longer_one_fails_closed_then_recovers() {
    let Some(bins) = support::privileged("issuer_outage") else {
        return;
    };
    let (tb, mut mesh, to) = cluster("outage", &bins, "8s");
    let client = tb.pod(1, 1);
    let call = |marker: &str| run(client.command(&bins.testbin).unwrap().args(["send", &to, marker]));

    // Down for longer than a renewal period (4 s), shorter than a lifetime (8 s): nothing fails.
    tb.stop(mesh.issuer);
    let stream = background(client.command(&bins.testbin).unwrap().args(["stream", &to, "5", "50"]));
    let (ok, result, _, err) = finish(stream);
    assert!(ok && result["failed"] == 0, "traffic must go on while the issuer is down briefly: {result} {err}");
    assert!(
        mesh.log_lines(1)
            .iter()
            .any(|l| l["message"] == "certificate renewal failed; the current certificate keeps serving"),
        "the outage should have been felt (a renewal failed and was retried)"
    );
    mesh.start_issuer(&tb, &bins).unwrap();
    assert!(
        wait_for(Duration::from_secs(10), || (count(&mesh.log_lines(1), "certificate renewed", "default/pod1-n1") > 0)
            .then_some(()))
        .is_some(),
        "renewal resumes once the issuer is back"
    );

    // Down past the end of every certificate: new connections fail closed, with a clear line.
    tb.stop(mesh.issuer);
    let expired = wait_for(Duration::from_secs(20), || {
        mesh.log_lines(1).into_iter().find(|l| {
            l["message"].as_str().is_some_and(|m| m.starts_with("certificate expired and could not be renewed"))
        })
    });
    assert!(expired.is_some(), "no expiry reported: {}", mesh.log_summary(1));
    let (ok, out, err) = call("after-expiry");
    assert!(!ok || out.is_empty(), "a connection after expiry must fail, got {out:?} {err}");

    // The issuer is back: the agents recover on their own.
    mesh.start_issuer(&tb, &bins).unwrap();
    let recovered = wait_for(Duration::from_secs(20), || {
        let (ok, out, _) = call("recovered");
        (ok && out == "recovered<9 bytes>").then_some(())
    });
    assert!(recovered.is_some(), "traffic did not recover after the issuer came back: {}", mesh.log_summary(1));
}

/// `meshless ca request` as a node: what the issuer grants it.
fn request(bins: &support::Bins, tb: &Testbed, mesh: &Mesh, credentials: &Path, id: &str) -> (bool, String) {
    let out = tb
        .node(1)
        .netns
        .command(&bins.meshless, None)
        .unwrap()
        .args(["ca", "request", "--issuer", &format!("{CONTROL_IPV4}:{ISSUER_PORT}"), "--id", id, "--node-credentials"])
        .arg(credentials)
        .arg("--bundle")
        .arg(&mesh.bundle)
        .output()
        .unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn the_issuer_signs_a_node_only_its_own_pods_identities() {
    let Some(bins) = support::privileged("node_authorization") else {
        return;
    };
    let (tb, mesh, _) = cluster("authz", &bins, "1h");
    let node1 = node_credentials(&tb, 1);
    let own = tb.spiffe_id(TRUST_DOMAIN, tb.pod(1, 1));
    let (ok, out) = request(&bins, &tb, &mesh, &node1, &own);
    assert!(ok && out.contains(&format!("issued {own}")), "control: a node gets its own pod's identity: {out}");

    let elsewhere = tb.spiffe_id(TRUST_DOMAIN, tb.pod(2, 1));
    let (ok, out) = request(&bins, &tb, &mesh, &node1, &elsewhere);
    assert!(!ok && out.contains("is scheduled on node node1"), "another node's pod must be refused: {out}");
    let nobody = format!("spiffe://{TRUST_DOMAIN}/ns/default/sa/nobody");
    let (ok, out) = request(&bins, &tb, &mesh, &node1, &nobody);
    assert!(!ok && out.contains("no pod has identity"), "an identity of no pod must be refused: {out}");

    // A credential from a node CA the issuer does not trust gets nothing.
    let rogue_ca = tb.dir.join("rogue-ca");
    run_ok(Command::new(&bins.meshless).args(["ca", "init", "--out"]).arg(&rogue_ca)).unwrap();
    let rogue = tb.dir.join("rogue-node1");
    run_ok(
        Command::new(&bins.meshless)
            .args(["ca", "node", "--node", "node1", "--ca-dir"])
            .arg(&rogue_ca)
            .arg("--out")
            .arg(&rogue),
    )
    .unwrap();
    let (ok, out) = request(&bins, &tb, &mesh, &rogue, &own);
    assert!(!ok && !out.contains("issued"), "a forged node credential must get nothing: {out}");
    // A workload certificate is not a node credential either.
    let as_workload = tb.dir.join("workload-as-node");
    std::fs::create_dir_all(&as_workload).unwrap();
    run_ok(
        Command::new(&bins.meshless)
            .args(["ca", "issue", "--id", &own, "--name", "node", "--ca-dir"])
            .arg(&mesh.ca_dir)
            .arg("--out")
            .arg(&as_workload),
    )
    .unwrap();
    let (ok, out) = request(&bins, &tb, &mesh, &as_workload, &own);
    assert!(!ok && !out.contains("issued"), "a workload certificate must not pass as a node credential: {out}");

    let refusals: Vec<_> =
        mesh.issuer_lines().into_iter().filter(|l| l["message"] == "refused a certificate request").collect();
    assert!(
        refusals.iter().any(|l| l["why"].as_str().is_some_and(|w| w.contains("scheduled on node node1"))),
        "{refusals:?}"
    );
    assert!(
        refusals.iter().any(|l| l["why"].as_str().is_some_and(|w| w.contains("no pod has identity"))),
        "{refusals:?}"
    );
}

/// Every PEM private key in `path` (a file, or the files of a directory).
fn private_keys(path: &Path) -> Vec<(PathBuf, rcgen::KeyPair)> {
    let files: Vec<PathBuf> = if path.is_dir() {
        std::fs::read_dir(path).unwrap().flatten().map(|e| e.path()).filter(|p| p.is_file()).collect()
    } else {
        vec![path.to_path_buf()]
    };
    files
        .into_iter()
        .filter_map(|f| {
            let text = std::fs::read_to_string(&f).ok()?;
            text.contains("PRIVATE KEY").then(|| rcgen::KeyPair::from_pem(&text).ok().map(|k| (f, k)))?
        })
        .collect()
}

/// The subject public key of every certificate of a PEM file.
fn public_keys(pem: &Path) -> Vec<Vec<u8>> {
    let text = std::fs::read(pem).unwrap();
    let mut out = Vec::new();
    for block in x509_parser::pem::Pem::iter_from_buffer(&text).flatten() {
        if let Ok(cert) = block.parse_x509() {
            out.push(cert.public_key().raw.to_vec());
        }
    }
    out
}

#[test]
fn no_file_an_agent_reads_holds_a_ca_private_key() {
    let Some(bins) = support::privileged("no_ca_key_on_nodes") else {
        return;
    };
    let (_tb, mesh, _) = cluster("nokey", &bins, "1h");
    let ca_certs: Vec<Vec<u8>> = ["root.pem", "intermediate.pem", "node-ca.pem"]
        .iter()
        .flat_map(|f| public_keys(&mesh.ca_dir.join(f)))
        .collect();
    // Control: the comparison does recognise a CA key when it sees one.
    let (_, intermediate_key) = private_keys(&mesh.ca_dir.join("intermediate-key.pem")).pop().unwrap();
    assert!(
        ca_certs.contains(&intermediate_key.subject_public_key_info()),
        "control: the CA's own key matches its certificate"
    );
    for (i, pid) in mesh.agents.iter().enumerate() {
        // What the agent was told to read…
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
        let args: Vec<PathBuf> =
            cmdline.split(|b| *b == 0).map(|a| PathBuf::from(String::from_utf8_lossy(a).into_owned())).collect();
        let mut read: Vec<PathBuf> = args.into_iter().filter(|p| p.is_absolute() && p.exists()).collect();
        // …and every file it holds open.
        for fd in std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().flatten() {
            if let Ok(target) = std::fs::read_link(fd.path()) {
                if target.is_file() {
                    read.push(target);
                }
            }
        }
        assert!(
            !read.iter().any(|p| p.starts_with(&mesh.ca_dir)),
            "node{}'s agent reads the CA directory: {read:?}",
            i + 1
        );
        let keys: Vec<(PathBuf, rcgen::KeyPair)> = read.iter().flat_map(|p| private_keys(p)).collect();
        assert!(!keys.is_empty(), "node{}'s agent reads its node credential's key (so the check saw keys)", i + 1);
        for (file, key) in keys {
            assert!(!ca_certs.contains(&key.subject_public_key_info()), "{} holds a CA private key", file.display());
        }
    }
}

#[test]
fn a_root_rollover_under_traffic_loses_no_request() {
    let Some(bins) = support::privileged("root_rollover") else {
        return;
    };
    let (tb, mesh, to) = cluster("rollover", &bins, "1h");
    let client = tb.pod(1, 1);
    let stream = background(client.command(&bins.testbin).unwrap().args(["stream", &to, "40", "30"]));
    let rotate = |stage: &str| {
        run_ok(Command::new(&bins.meshless).args(["ca", "rotate", stage, "--ca-dir"]).arg(&mesh.ca_dir)).unwrap();
    };
    let both_agents = |what: &str, pred: &dyn Fn(&serde_json::Value) -> bool| {
        for node in [1, 2] {
            assert!(
                wait_for(Duration::from_secs(15), || mesh.log_lines(node).iter().any(pred).then_some(())).is_some(),
                "node{node}'s agent never {what}: {}",
                mesh.log_summary(node)
            );
        }
    };
    // The rollover starts once node 2's agent is carrying the stream's requests.
    let allowed = || inbound_decisions(&tb, 2, "allow").unwrap_or(0);
    let before = allowed();
    let carried = wait_for(Duration::from_secs(10), || (allowed() >= before + 5).then_some(()));
    assert!(
        carried.is_some(),
        "node2's agent allowed {} requests of the stream within 10 s",
        allowed().saturating_sub(before)
    );
    rotate("add");
    both_agents("trusted the new root", &|l| l["message"] == "trust bundle updated" && l["roots"] == 2);
    rotate("switch");
    both_agents("re-issued its certificates", &|l| {
        l["message"] == "the signing CA changed; re-issuing every certificate"
    });
    for node in [1, 2] {
        let pod = format!("default/pod1-n{node}");
        assert!(
            wait_for(Duration::from_secs(15), || (count(&mesh.log_lines(node), "certificate renewed", &pod) > 0)
                .then_some(()))
            .is_some(),
            "node{node}'s pod was not re-issued under the new intermediate"
        );
    }
    rotate("retire");
    both_agents("dropped the old root", &|l| l["message"] == "trust bundle updated" && l["roots"] == 1);
    let (ok, result, _, err) = finish(stream);
    assert!(ok, "{err}");
    assert_eq!(result["failed"], 0, "requests failed during the root rollover: {err}");
    // After the rollover, new connections still work end to end.
    let (ok, out, err) = run(client.command(&bins.testbin).unwrap().args(["send", &to, "after-rollover"]));
    assert!(ok && out == "after-rollover<14 bytes>", "{err}");
}

#[test]
fn the_workload_api_gives_a_pod_its_own_svid_and_nobody_else_anything() {
    let Some(bins) = support::privileged("workload_api") else {
        return;
    };
    let tb = Testbed::new(Layout { label: "wlapi", pods: &[2, 1] }).expect("building the testbed");
    let mut mesh = Mesh::start(&tb, &bins, &|_| true, &[]).expect("starting the agents");
    let endpoint = format!("unix://{}", tb.dir.join("run-node1").join("workload-api").join("workload.sock").display());
    let fetch = |cmd: &mut Command| -> serde_json::Value {
        let (_, out, err) = run(cmd.arg(&endpoint));
        serde_json::from_str(out.trim()).unwrap_or_else(|_| panic!("wlclient: {out} {err}"))
    };
    for pod in [tb.pod(1, 1), tb.pod(1, 2)] {
        let got = fetch(&mut pod.command(&bins.wlclient).unwrap());
        assert_eq!(got["spiffe_id"], tb.spiffe_id(TRUST_DOMAIN, pod), "{} must get its own SVID: {got}", pod.name);
        assert_eq!(got["chain"], 2, "leaf and intermediate: {got}");
        assert_eq!(got["roots"], 1, "the trust domain's bundle: {got}");
        // The same certificate the agent presents for this pod.
        let pod_key = format!("default/{}-n1", pod.name);
        let enrolled = mesh
            .log_lines(1)
            .into_iter()
            .find(|l| l["message"] == "pod enrolled" && l["pod"] == pod_key.as_str())
            .unwrap();
        assert_eq!(got["serial"], enrolled["serial"], "the Workload API hands out the pod's current certificate");
    }
    // The standard Python client (PyPI's `spiffe`, grpcio: it sends the socket path as
    // `:authority`), default settings: its own ID, and a chain that verifies against the bundle.
    let python = meshless_tests::python::spiffe_python().expect("the Python SPIFFE client");
    let script = meshless_tests::python::script("spiffe_client.py");
    let ask_python = |cmd: &mut Command| -> serde_json::Value {
        let (_, out, err) = run(cmd.arg(&script).arg(&endpoint));
        serde_json::from_str(out.trim()).unwrap_or_else(|_| panic!("python spiffe client: {out} {err}"))
    };
    for pod in [tb.pod(1, 1), tb.pod(1, 2)] {
        let got = ask_python(&mut pod.command(&python).unwrap());
        assert_eq!(got["spiffe_id"], tb.spiffe_id(TRUST_DOMAIN, pod), "python client in {}: {got}", pod.name);
        assert_eq!(
            (got["chain"].as_u64(), got["roots"].as_u64(), got["verified"].as_bool()),
            (Some(2), Some(1), Some(true)),
            "{got}"
        );
    }
    let outsider = ask_python(&mut tb.node(1).netns.command(&python, None).unwrap());
    assert_eq!(outsider["code"], "StatusCode.PERMISSION_DENIED", "not a stream reset: {outsider}");
    // JWT-SVIDs, with the same client: a token for the audience asked for, that the package's own
    // validator accepts against the JWT bundle the API gives (signature, kid, audience, expiry),
    // and that ValidateJWTSVID accepts for that audience only, and not tampered with.
    let ask_jwt = |cmd: &mut Command| -> serde_json::Value {
        let (_, out, err) = run(cmd.arg(&script).arg(&endpoint).args(["jwt", "orders-db"]));
        serde_json::from_str(out.trim()).unwrap_or_else(|_| panic!("python spiffe client (jwt): {out} {err}"))
    };
    for pod in [tb.pod(1, 1), tb.pod(1, 2)] {
        let got = ask_jwt(&mut pod.command(&python).unwrap());
        let id = tb.spiffe_id(TRUST_DOMAIN, pod);
        assert_eq!((&got["spiffe_id"], &got["validated_id"]), (&id.clone().into(), &id.into()), "{got}");
        assert_eq!(got["audience"], serde_json::json!(["orders-db"]), "{got}");
        assert_eq!(got["bundle_keys"], 1, "the trust domain's one JWT authority: {got}");
        assert_eq!(got["server_valid"], "valid", "{got}");
        assert_eq!(got["server_other_audience"], "StatusCode.INVALID_ARGUMENT", "{got}");
        assert_eq!(got["server_tampered"], "StatusCode.INVALID_ARGUMENT", "{got}");
    }
    let outsider = ask_jwt(&mut tb.node(1).netns.command(&python, None).unwrap());
    assert_eq!(outsider["code"], "StatusCode.PERMISSION_DENIED", "no JWT-SVID outside the pods: {outsider}");
    let issued = mesh.issuer_lines().into_iter().filter(|l| l["message"] == "issued a JWT-SVID").count();
    assert_eq!(issued, 2, "one token per pod, signed by the issuer under the node's authorization");
    // A process in no pod of the mesh (node 1's own netns and cgroup) gets nothing.
    let outsider = fetch(&mut tb.node(1).netns.command(&bins.wlclient, None).unwrap());
    assert!(outsider.get("spiffe_id").is_none(), "a caller outside the mesh's pods got an SVID: {outsider}");
    assert!(
        wait_for(Duration::from_secs(5), || mesh
            .log_lines(1)
            .iter()
            .any(|l| l["message"] == "Workload API: the caller is not in an enrolled pod")
            .then_some(()))
        .is_some(),
        "the refusal should be logged"
    );
    // As a DaemonSet's container runs the agent: in a cgroup below the pods' and a cgroup
    // namespace of its own, where `/proc/<pid>/cgroup` shows every pod as `/../…`. Each pod
    // still gets its own SVID, and a process outside the pods still nothing.
    let (pid, _) = mesh.respawn_contained(&tb, &bins, 1).expect("the contained agent takes over");
    let ns = |pid: &str| std::fs::read_link(format!("/proc/{pid}/ns/cgroup")).unwrap();
    assert_ne!(ns(&pid.to_string()), ns("self"), "the agent should run in a cgroup namespace of its own");
    for pod in [tb.pod(1, 1), tb.pod(1, 2)] {
        let got = fetch(&mut pod.command(&bins.wlclient).unwrap());
        assert_eq!(got["spiffe_id"], tb.spiffe_id(TRUST_DOMAIN, pod), "contained agent, {}: {got}", pod.name);
    }
    let outsider = fetch(&mut tb.node(1).netns.command(&bins.wlclient, None).unwrap());
    assert!(outsider.get("spiffe_id").is_none(), "contained agent gave an outsider an SVID: {outsider}");
}

#[test]
fn a_workload_api_connection_is_answered_only_while_the_process_that_opened_it_runs() {
    let Some(bins) = support::privileged("workload_api_pid_reuse") else {
        return;
    };
    let tb = Testbed::new(Layout { label: "wlpid", pods: &[2, 1] }).expect("building the testbed");
    let _mesh = Mesh::start(&tb, &bins, &|_| true, &[]).expect("starting the agents");
    let socket = tb.dir.join("run-node1").join("workload-api").join("workload.sock");
    let (a, b) = (tb.pod(1, 1), tb.pod(1, 2));
    let (out, go) = (tb.dir.join("orphan.out"), tb.dir.join("orphan.go"));
    // Pod a's process connects, hands the connection to its child and exits.
    let status = a
        .command(&bins.wlclient)
        .unwrap()
        .arg("orphan")
        .arg(&socket)
        .arg(&go)
        .stdout(std::fs::File::create(&out).unwrap())
        .status()
        .unwrap();
    assert!(status.success());
    let line = |i: usize| -> Option<serde_json::Value> {
        let text = std::fs::read_to_string(&out).ok()?;
        text.lines().nth(i).and_then(|l| serde_json::from_str(l).ok())
    };
    let parent = line(0).and_then(|l| l["parent"].as_i64()).expect("the parent's pid") as i32;
    // Its pid goes to a process of pod b (another identity), as the kernel may reuse it.
    let mut reused = None;
    for _ in 0..500 {
        std::fs::write("/proc/sys/kernel/ns_last_pid", (parent - 1).to_string()).unwrap();
        let mut sleeper = b.command("/bin/sleep").unwrap().arg("30").spawn().unwrap();
        if sleeper.id() as i32 == parent {
            reused = Some(sleeper);
            break;
        }
        let _ = sleeper.kill();
        let _ = sleeper.wait();
    }
    let mut sleeper = reused.expect("the parent's pid could not be given to pod b's process (a busy machine?)");
    std::fs::write(&go, "").unwrap();
    let answer = wait_for(Duration::from_secs(20), || line(1));
    let _ = sleeper.kill();
    let _ = sleeper.wait();
    let answer = answer.expect("the child never answered");
    assert!(answer.get("spiffe_id").is_none(), "pod b's SVID went to a connection pod a opened: {answer}");
    assert_eq!(answer["grpc_status"], "7", "PermissionDenied: {answer}");
}
