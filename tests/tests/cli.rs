//! Bad input to the `meshless` binary ends it with one clear error line and exit status 1, never
//! a panic: malformed state file, missing CA, missing cgroup, a pin directory off the BPF file
//! system or belonging to another cgroup. (A pod that cannot be set up is not fatal: see
//! `lifecycle.rs`.)

mod support;

use std::fs;
use std::path::Path;
use std::process::{Command, Output};

use meshless_tests::mesh::run_ok;
use meshless_tests::{Layout, Testbed};

fn scratch(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("meshless-cli-{}-{name}", std::process::id()));
    let _ = fs::remove_dir_all(&d);
    fs::create_dir_all(&d).unwrap();
    d
}

/// Asserts a clean failure: status 1, no panic, one `meshless: error:` line containing `want`.
fn assert_clean_error(out: &Output, want: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "expected exit 1; stderr:\n{stderr}");
    assert!(!stderr.contains("panicked"), "the agent panicked:\n{stderr}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("meshless: error:")).collect();
    assert_eq!(errors.len(), 1, "expected exactly one error line:\n{stderr}");
    assert!(errors[0].contains(want), "error line should mention {want:?}: {}", errors[0]);
}

/// Runs `meshless agent` through `cmd` (the binary, possibly inside a namespace) to its exit.
fn agent_with(mut cmd: Command, state: &Path, ca: &Path, bpf_dir: &Path) -> Output {
    cmd.args(["agent", "--state"])
        .arg(state)
        .arg("--dev-ca-dir")
        .arg(ca)
        .arg("--bpf-dir")
        .arg(bpf_dir)
        .output()
        .unwrap()
}

fn agent(bin: &Path, state: &Path, ca: &Path) -> Output {
    agent_with(Command::new(bin), state, ca, Path::new("/nonexistent/bpf"))
}

const STATE_HEAD: &str = "trustDomain: cluster.local\nnode: node1\ncgroupParent: /nonexistent/cgroup\n";

#[test]
fn bad_state_files_and_a_missing_ca_give_one_clear_error_line() {
    let Some(bins) = support::bins() else {
        return eprintln!("SKIPPED: run through `cargo xtask test`");
    };
    let dir = scratch("state");
    let ca = dir.join("ca");
    run_ok(Command::new(&bins.meshless).args(["ca", "init", "--out"]).arg(&ca)).unwrap();
    let again = Command::new(&bins.meshless).args(["ca", "init", "--out"]).arg(&ca).output().unwrap();
    assert_clean_error(&again, "refusing to overwrite");

    let cases = [
        ("malformed.yaml", "pods: [unclosed", "malformed.yaml"),
        ("unknown.yaml", "trustDomain: cluster.local\nnode: n\ncgroupParent: /x\ntypo: 1\n", "unknown field `typo`"),
        (
            "noip.yaml",
            &format!(
                "{STATE_HEAD}pods:\n - {{name: a, namespace: d, serviceAccount: s, node: node1, ips: [], netns: /x}}\n"
            ),
            "needs at least one IP",
        ),
    ];
    for (file, text, want) in cases {
        let path = dir.join(file);
        fs::write(&path, text).unwrap();
        assert_clean_error(&agent(&bins.meshless, &path, &ca), want);
    }
    let missing = agent(&bins.meshless, &dir.join("absent.yaml"), &ca);
    assert_clean_error(&missing, "cannot read state file");

    let ok_state = dir.join("ok.yaml");
    fs::write(&ok_state, format!("{STATE_HEAD}pods:\n - {{name: a, namespace: d, serviceAccount: s, node: node1, ips: [198.19.1.11], netns: /nonexistent/netns}}\n")).unwrap();
    assert_clean_error(&agent(&bins.meshless, &ok_state, &dir.join("no-ca")), "meshless ca init --out");
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_missing_cgroup_or_a_bad_pin_directory_gives_one_clear_error_line() {
    let Some(bins) = support::privileged("bad_cgroup_or_pins") else {
        return;
    };
    let tb = Testbed::new(Layout { label: "cli", pods: &[1, 1] }).expect("building the testbed");
    let ca = tb.dir.join("ca");
    run_ok(Command::new(&bins.meshless).args(["ca", "init", "--out"]).arg(&ca)).unwrap();
    let state = tb.state_file(1, "cluster.local", &|_| true).unwrap();
    let in_node = |i: usize| tb.node(i).netns.command(&bins.meshless, None).unwrap();

    // The cgroup the programs attach to is gone.
    let text = fs::read_to_string(&state).unwrap();
    let cg = tb.node(1).cgroup.display().to_string();
    let no_cgroup = tb.dir.join("no-cgroup.yaml");
    fs::write(&no_cgroup, text.replace(&format!("cgroupParent: {cg}"), "cgroupParent: /nonexistent/cgroup")).unwrap();
    assert_clean_error(&agent_with(in_node(1), &no_cgroup, &ca, &tb.bpf_dir(1)), "cgroup /nonexistent/cgroup");

    // The root of the cgroup2 hierarchy: it holds every process of the machine, not the pods.
    let root = meshless_tests::cgroup2_mount().unwrap();
    let at_root = tb.dir.join("root-cgroup.yaml");
    fs::write(&at_root, text.replace(&format!("cgroupParent: {cg}"), &format!("cgroupParent: {}", root.display())))
        .unwrap();
    assert_clean_error(&agent_with(in_node(1), &at_root, &ca, &tb.bpf_dir(1)), "is the root of a cgroup2 hierarchy");

    // A pin directory that is not on a BPF file system.
    let not_bpf = tb.dir.join("not-bpffs");
    assert_clean_error(&agent_with(in_node(1), &state, &ca, &not_bpf), "is not on a BPF file system");

    // Node 2's agent pointed at node 1's pin directory: it belongs to another cgroup.
    let node1 = tb.spawn(
        in_node(1)
            .args(["agent", "--state"])
            .arg(&state)
            .arg("--dev-ca-dir")
            .arg(&ca)
            .arg("--bpf-dir")
            .arg(tb.bpf_dir(1))
            .arg("--run-dir")
            .arg(tb.dir.join("run1"))
            .stderr(std::process::Stdio::null()),
    );
    let node1 = node1.unwrap();
    let pinned = tb.bpf_dir(1).join(format!("v{}/CGROUP", meshless_common::LAYOUT_VERSION));
    assert!(
        meshless_tests::wait_for(std::time::Duration::from_secs(10), || pinned.exists().then_some(())).is_some(),
        "node 1's agent did not pin its state"
    );
    let state2 = tb.state_file(2, "cluster.local", &|_| true).unwrap();
    assert_clean_error(&agent_with(in_node(2), &state2, &ca, &tb.bpf_dir(1)), "belongs to another cgroup");
    tb.stop(node1);
}

#[test]
fn policy_commands_answer_offline_and_bad_questions_get_one_clear_error_line() {
    let Some(bins) = support::bins() else {
        return eprintln!("SKIPPED: run through `cargo xtask test`");
    };
    let dir = scratch("policy");
    let state = dir.join("state.yaml");
    let pods = "pods:\n  - {name: api, namespace: shop, serviceAccount: api, node: node2, ips: [198.19.2.11], labels: {app: api}}\n  - {name: web, namespace: shop, serviceAccount: web, node: node2, ips: [198.19.2.12]}\n  - {name: old, namespace: shop, serviceAccount: old, node: node2, ips: [198.19.2.13], enrolled: false}\n";
    let policy = "authorizationPolicies:\n  - metadata: {name: api, namespace: shop}\n    spec: {selector: {matchLabels: {app: api}}, rules: [{from: [{source: {principals: [\"cluster.local/ns/shop/sa/web\"]}}]}]}\n";
    let services = "services:\n  - {name: apisvc, namespace: shop, clusterIPs: [198.19.200.30], ports: [{port: 80, targetPort: 8080}], endpoints: [{pod: api}, {pod: old}]}\n";
    fs::write(&state, format!("{STATE_HEAD}{pods}{policy}{services}")).unwrap();
    let policy_cmd = |args: &[&str]| {
        Command::new(&bins.meshless).arg("policy").args(args).arg("--state").arg(&state).output().unwrap()
    };
    let out = |o: Output| String::from_utf8_lossy(&o.stdout).trim().to_string();
    assert_eq!(out(policy_cmd(&["check", "--from", "shop/web", "--to", "shop/api", "--port", "80"])), "allow");
    assert_eq!(
        out(policy_cmd(&[
            "check",
            "--from",
            "spiffe://cluster.local/ns/shop/sa/old",
            "--to",
            "shop/api",
            "--port",
            "80"
        ])),
        "deny"
    );
    // A pod outside the mesh calls in plaintext.
    let text = out(policy_cmd(&["explain", "--from", "shop/old", "--to", "shop/api", "--port", "80"]));
    assert!(text.starts_with("deny: 198.19.2.13 → shop/api port 80 (plaintext)"), "{text}");
    assert!(text.contains("no ALLOW matched"), "{text}");
    let json: serde_json::Value = serde_json::from_str(&out(policy_cmd(&[
        "explain", "--json", "--from", "shop/web", "--to", "shop/api", "--port", "80",
    ])))
    .unwrap();
    assert_eq!(
        (json["decision"].as_str(), json["policy"].as_str(), json["rule"].as_u64()),
        (Some("allow"), Some("shop/api"), Some(0))
    );
    // Through a Service: each meshed endpoint decides, at the port the Service port targets.
    let text = out(policy_cmd(&["explain", "--from", "shop/web", "--to", "svc/shop/apisvc", "--port", "80"]));
    assert!(text.starts_with("allow: spiffe://cluster.local/ns/shop/sa/web → svc/shop/apisvc port 80"), "{text}");
    assert!(text.contains("service:  shop/apisvc port 80: 1 meshed endpoint(s)"), "{text}");
    assert!(text.contains("allow: spiffe://cluster.local/ns/shop/sa/web → shop/api port 8080"), "{text}");
    let from_old =
        ["check", "--from", "spiffe://cluster.local/ns/shop/sa/old", "--to", "svc/shop/apisvc", "--port", "80"];
    assert_eq!(out(policy_cmd(&from_old)), "deny");
    assert_clean_error(
        &policy_cmd(&["check", "--from", "shop/web", "--to", "svc/shop/apisvc", "--port", "81"]),
        "no Service shop/apisvc with port 81",
    );
    assert_clean_error(
        &policy_cmd(&["check", "--from", "shop/web", "--to", "shop/nope", "--port", "80"]),
        "no pod shop/nope",
    );
    assert_clean_error(
        &policy_cmd(&["check", "--from", "not a source", "--to", "shop/api", "--port", "80"]),
        "expected namespace/pod",
    );
    assert_clean_error(
        &policy_cmd(&["check", "--from", "shop/web", "--to", "shop/old", "--port", "80"]),
        "not in the mesh",
    );
    let validate = Command::new(&bins.meshless).args(["policy", "validate", "--state"]).arg(&state).output().unwrap();
    assert!(out(validate).ends_with("valid: 3 pods, 0 PeerAuthentications, 1 AuthorizationPolicies"));
    // The same ALLOW, but its grant needs an HTTP method: accepted, named, and it allows nothing.
    fs::write(
        &state,
        format!("{STATE_HEAD}{pods}{}", policy.replace("}}]}]}", "}}], to: [{operation: {methods: [GET]}}]}]}")),
    )
    .unwrap();
    let validate =
        out(Command::new(&bins.meshless).args(["policy", "validate", "--state"]).arg(&state).output().unwrap());
    assert!(
        validate.contains(
            "AuthorizationPolicy shop/api: partially enforced; left out: spec.rules[0].to[0].operation.methods"
        ),
        "{validate}"
    );
    let text = out(policy_cmd(&["explain", "--from", "shop/web", "--to", "shop/api", "--port", "80"]));
    assert!(text.starts_with("deny:") && text.contains("caveat:   shop/api: partially enforced"), "{text}");
    fs::write(&state, format!("{STATE_HEAD}{pods}{}", policy.replace("principals", "principal"))).unwrap();
    let validate = Command::new(&bins.meshless).args(["policy", "validate", "--state"]).arg(&state).output().unwrap();
    assert_clean_error(&validate, "unknown field `principal`");
    // No agent listening: a clear line, not a hang.
    let no_agent = Command::new(&bins.meshless)
        .args(["policy", "check", "--from", "shop/web", "--to", "shop/api", "--port", "80", "--agent", "127.0.0.1:1"])
        .output()
        .unwrap();
    assert_clean_error(&no_agent, "cannot reach the agent's admin endpoint at 127.0.0.1:1");
    fs::remove_dir_all(&dir).unwrap();
}
