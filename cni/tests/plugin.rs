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

#[test]
fn with_no_agent_add_passes_the_result_on_and_leaves_a_record_and_del_removes_it() {
    let state = scratch("noagent");
    let out = plugin("ADD", "abc123", POD, &conf(&state));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    let result: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(result["ips"][0]["address"], "10.1.2.3/24", "the previous result, unchanged");
    assert!(String::from_utf8_lossy(&out.stderr).contains("catch up from the record"));
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(state.join("pods/abc123.json")).unwrap()).unwrap();
    assert_eq!(record["namespace"], "shop");
    assert_eq!(record["name"], "web-1");
    assert_eq!(record["uid"], "u-1");
    assert_eq!(record["netns"], "/var/run/netns/cni-1234");
    assert_eq!(record["ips"][0], "10.1.2.3");
    let out = plugin("DEL", "abc123", POD, &conf(&state));
    assert!(out.status.success());
    assert!(!state.join("pods/abc123.json").exists());
    // DEL again (runtimes repeat it) is still a success.
    assert!(plugin("DEL", "abc123", POD, &conf(&state)).status.success());
    let _ = std::fs::remove_dir_all(&state);
}

#[test]
fn a_listening_agent_is_told_of_add_and_del() {
    let state = scratch("agent");
    let listener = UnixListener::bind(state.join("agent.sock")).unwrap();
    // Non-blocking, so that a plugin that never calls fails the test instead of hanging it.
    listener.set_nonblocking(true).unwrap();
    let agent = std::thread::spawn(move || {
        let mut got = Vec::new();
        for i in 0..2 {
            let deadline = Instant::now() + Duration::from_secs(10);
            let mut s = loop {
                match listener.accept() {
                    Ok((s, _)) => break s,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(10))
                    }
                    Err(e) => panic!("the plugin did not call the agent socket (call {} of 2) within 10 s: {e}", i + 1),
                }
            };
            s.set_nonblocking(false).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut line = String::new();
            BufReader::new(&s).read_line(&mut line).expect("the plugin's request line within 10 s");
            s.write_all(b"ok\n").unwrap();
            got.push(serde_json::from_str::<serde_json::Value>(&line).unwrap());
        }
        got
    });
    let add = plugin("ADD", "c-9", POD, &conf(&state));
    assert!(add.status.success() && add.stderr.is_empty(), "{}", String::from_utf8_lossy(&add.stderr));
    assert!(plugin("DEL", "c-9", POD, &conf(&state)).status.success());
    let got = agent.join().unwrap();
    assert_eq!((got[0]["op"].as_str(), got[0]["pod"]["name"].as_str()), (Some("add"), Some("web-1")));
    assert_eq!((got[1]["op"].as_str(), got[1]["containerId"].as_str()), (Some("del"), Some("c-9")));
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
