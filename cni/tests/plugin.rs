//! The plugin as the container runtime runs it: environment variables and configuration on stdin
//! (CNI spec), with the agent absent, present, or answering nonsense.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("meshless-cni-plugin-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn conf(state: &Path) -> String {
    serde_json::json!({
        "cniVersion": "1.0.0", "name": "net", "type": "meshless-cni", "stateDir": state,
        "prevResult": {"cniVersion": "1.0.0", "interfaces": [{"name": "eth0"}],
                       "ips": [{"address": "10.1.2.3/24", "interface": 0}]}
    })
    .to_string()
}

fn plugin(command: &str, container: &str, args: &str, stdin: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_meshless-cni"))
        .env_clear()
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", container)
        .env("CNI_NETNS", "/var/run/netns/cni-1234")
        .env("CNI_IFNAME", "eth0")
        .env("CNI_ARGS", args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

const POD: &str = "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-1;K8S_POD_UID=u-1";
const SYSTEM_POD: &str = "IgnoreUnknown=1;K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME=dns-1;K8S_POD_UID=u-2";

fn cni_error(out: &Output) -> serde_json::Value {
    assert!(!out.status.success(), "expected a CNI error: {}", String::from_utf8_lossy(&out.stdout));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn with_no_agent_add_fails_try_again_later_and_leaves_nothing_but_excluded_namespaces_start() {
    let state = scratch("noagent");
    // A pod that may have opted in: not started without the agent (the runtime retries).
    let err = cni_error(&plugin("ADD", "abc123", POD, &conf(&state)));
    assert_eq!(err["code"], 11, "{err}");
    assert!(err["msg"].as_str().unwrap().contains("has not set up pod shop/web-1"), "{err}");
    assert!(err["details"].as_str().unwrap().contains("not reachable"), "{err}");
    assert!(!state.join("pods/abc123.json").exists(), "a refused sandbox leaves no record");
    // kube-system starts without the mesh, recorded for the agent to read when it runs.
    let out = plugin("ADD", "sys1", SYSTEM_POD, &conf(&state));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    let result: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(result["ips"][0]["address"], "10.1.2.3/24", "the previous result, unchanged");
    assert!(String::from_utf8_lossy(&out.stderr).contains("catch up from the record"));
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(state.join("pods/sys1.json")).unwrap()).unwrap();
    assert_eq!(record["namespace"], "kube-system");
    assert_eq!(record["name"], "dns-1");
    assert_eq!(record["uid"], "u-2");
    assert_eq!(record["netns"], "/var/run/netns/cni-1234");
    assert_eq!(record["ips"][0], "10.1.2.3");
    // The exclusions are the configuration's when it names them.
    let mut custom: serde_json::Value = serde_json::from_str(&conf(&state)).unwrap();
    custom["excludeNamespaces"] = serde_json::json!(["shop"]);
    assert!(plugin("ADD", "abc124", POD, &custom.to_string()).status.success());
    assert_eq!(cni_error(&plugin("ADD", "sys2", SYSTEM_POD, &custom.to_string()))["code"], 11);
    let out = plugin("DEL", "sys1", SYSTEM_POD, &conf(&state));
    assert!(out.status.success());
    assert!(!state.join("pods/sys1.json").exists());
    // DEL again (runtimes repeat it) is still a success.
    assert!(plugin("DEL", "sys1", SYSTEM_POD, &conf(&state)).status.success());
    let _ = std::fs::remove_dir_all(&state);
}

/// An agent on the plugin's socket giving `answers` in turn; returns what it was told.
fn agent(state: &Path, answers: &'static [&'static str]) -> std::thread::JoinHandle<Vec<serde_json::Value>> {
    let listener = UnixListener::bind(state.join("agent.sock")).unwrap();
    // Non-blocking, so that a plugin that never calls fails the test instead of hanging it.
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let mut got = Vec::new();
        for (i, answer) in answers.iter().enumerate() {
            let deadline = Instant::now() + Duration::from_secs(10);
            let mut s = loop {
                match listener.accept() {
                    Ok((s, _)) => break s,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(10))
                    }
                    Err(e) => panic!(
                        "the plugin did not call the agent socket (call {} of {}) within 10 s: {e}",
                        i + 1,
                        answers.len()
                    ),
                }
            };
            s.set_nonblocking(false).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut line = String::new();
            BufReader::new(&s).read_line(&mut line).expect("the plugin's request line within 10 s");
            s.write_all(answer.as_bytes()).unwrap();
            got.push(serde_json::from_str::<serde_json::Value>(&line).unwrap());
        }
        got
    })
}

#[test]
fn add_waits_for_the_agent_to_set_the_pod_up_and_fails_when_it_says_it_has_not() {
    let state = scratch("agent");
    let told = agent(
        &state,
        &["ok enrolled (Strict)\n", "error: pod shop/web-1 not set up by the agent yet: no certificate\n", "ok\n"],
    );
    let add = plugin("ADD", "c-9", POD, &conf(&state));
    assert!(add.status.success() && add.stderr.is_empty(), "{}", String::from_utf8_lossy(&add.stderr));
    let err = cni_error(&plugin("ADD", "c-10", POD, &conf(&state)));
    assert_eq!(err["code"], 11, "{err}");
    assert_eq!(err["details"], "pod shop/web-1 not set up by the agent yet: no certificate");
    assert!(!state.join("pods/c-10.json").exists());
    assert!(plugin("DEL", "c-9", POD, &conf(&state)).status.success());
    let got = told.join().unwrap();
    assert_eq!((got[0]["op"].as_str(), got[0]["pod"]["name"].as_str()), (Some("add"), Some("web-1")));
    assert_eq!(got[0]["waitMs"], 10_000, "the default wait, told to the agent");
    assert_eq!((got[2]["op"].as_str(), got[2]["containerId"].as_str()), (Some("del"), Some("c-9")));
    let _ = std::fs::remove_dir_all(&state);
}

#[test]
fn bad_input_gets_a_cni_error_object_and_a_non_pod_is_passed_through() {
    let state = scratch("bad");
    for (command, container, stdin, code) in [
        ("ADD", "abc", "{not json", 6),
        ("ADD", "../../etc", conf(&state).as_str(), 4),
        ("FROB", "abc", conf(&state).as_str(), 4),
    ] {
        let out = plugin(command, container, POD, stdin);
        assert!(!out.status.success(), "{command} {container} should fail");
        let err: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(err["code"], code, "{err}");
        assert!(err["msg"].as_str().unwrap().starts_with("meshless-cni:"), "{err}");
    }
    let out = plugin("ADD", "abc", "IgnoreUnknown=1", &conf(&state));
    assert!(out.status.success());
    assert!(!state.join("pods/abc.json").exists(), "not a Kubernetes pod: nothing recorded");
    let out = plugin("VERSION", "", "", "");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["supportedVersions"].as_array().unwrap().iter().any(|s| s == "1.0.0"));
    let _ = std::fs::remove_dir_all(&state);
}
