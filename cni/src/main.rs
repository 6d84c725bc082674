//! `meshless-cni`: a chained CNI plugin (CNI spec 1.0/1.1, and 0.3.x/0.4.0 configurations) that
//! tells the node agent where each new pod's network namespace is.
//!
//! The container runtime runs it after the network plugin proper, with `CNI_COMMAND` and friends in
//! the environment and the network configuration (with `prevResult`) on stdin. On ADD it writes a
//! record of the pod (namespace, name, UID, netns path, container ID, IPs) under
//! `<stateDir>/pods/`, then tells the agent on `<stateDir>/agent.sock` and waits (at most
//! `agentWaitSeconds`, 10 by default) until the agent has set the pod up: enrolled with its
//! kernel entries, held under its mode while it cannot be served yet, or known to be outside the
//! mesh. If the agent does not say so in time (not running, not yet started after a reboot, the
//! pod unknown to it), ADD fails with CNI error 11 ("try again later") and the runtime retries:
//! a pod is never started without the protection it may have opted into. On DEL it removes the
//! record and tells the agent, best effort.
//!
//! Pods of `excludeNamespaces` (`kube-system` by default: the cluster's own components, which
//! must start before and without the mesh) do not wait; their record is read whenever the agent
//! runs. The plugin fails on input that is not CNI with a CNI error object, too.
//!
//! Hand-written rather than built on a CNI crate: the crates on crates.io either pin old spec
//! versions or pull in an async runtime for what is one JSON document in and one out; the plugin
//! must stay small and start fast, as the runtime runs it for every pod.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

const DEFAULT_STATE_DIR: &str = "/var/run/meshless/cni";
const SUPPORTED: [&str; 6] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0", "1.1"];
/// How long ADD waits for the agent to set a pod up, unless the configuration says otherwise.
const DEFAULT_AGENT_WAIT_SECONDS: u64 = 10;
/// The longest anyone may ask for (the runtime's own deadline for a sandbox is minutes).
const MAX_AGENT_WAIT_SECONDS: u64 = 60;
/// How long a best-effort message (DEL, excluded namespaces) waits for the agent's receipt.
const NOTIFY_TIMEOUT: Duration = Duration::from_secs(2);
/// CNI's "try again later" error code.
const TRY_AGAIN_LATER: u32 = 11;

/// The plugin's part of the network configuration.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct NetConf {
    #[serde(default)]
    cni_version: String,
    #[serde(default)]
    state_dir: Option<PathBuf>,
    #[serde(default)]
    prev_result: Option<Value>,
    /// How long ADD waits for the agent (seconds).
    #[serde(default)]
    agent_wait_seconds: Option<u64>,
    /// Namespaces whose pods start without waiting for the agent.
    #[serde(default)]
    exclude_namespaces: Option<Vec<String>>,
}

/// What the agent learns of a pod (shared with the agent's `cni` module by shape, as JSON).
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Record {
    container_id: String,
    namespace: String,
    name: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    uid: String,
    netns: String,
    if_name: String,
    ips: Vec<String>,
}

/// A CNI error: printed as the spec's error object on stdout, exit status 1.
struct CniError {
    code: u32,
    msg: String,
    details: String,
}

fn err(code: u32, msg: &str, details: impl Into<String>) -> CniError {
    CniError { code, msg: msg.into(), details: details.into() }
}

fn main() {
    let command = std::env::var("CNI_COMMAND").unwrap_or_default();
    let mut stdin = String::new();
    // VERSION may come without a configuration; everything else has one.
    let _ = std::io::stdin().read_to_string(&mut stdin);
    let version = serde_json::from_str::<Value>(&stdin)
        .ok()
        .and_then(|v| v.get("cniVersion").and_then(Value::as_str).map(str::to_owned))
        .unwrap_or_else(|| "1.0.0".into());
    match run(&command, &stdin) {
        Ok(Some(out)) => {
            println!("{out}");
        }
        Ok(None) => {}
        Err(e) => {
            println!("{}", json!({ "cniVersion": version, "code": e.code, "msg": e.msg, "details": e.details }));
            std::process::exit(1);
        }
    }
}

fn run(command: &str, stdin: &str) -> Result<Option<String>, CniError> {
    match command {
        "VERSION" => Ok(Some(json!({ "cniVersion": "1.1.0", "supportedVersions": SUPPORTED }).to_string())),
        "ADD" | "DEL" | "CHECK" | "GC" | "STATUS" => {
            let conf: NetConf = serde_json::from_str(stdin).map_err(|e| {
                err(6, "meshless-cni: the network configuration on stdin is not valid JSON", e.to_string())
            })?;
            if !conf.cni_version.is_empty() && !SUPPORTED.contains(&conf.cni_version.as_str()) {
                return Err(err(1, "meshless-cni: unsupported cniVersion", conf.cni_version));
            }
            let state_dir = conf.state_dir.clone().unwrap_or_else(|| DEFAULT_STATE_DIR.into());
            match command {
                "ADD" => add(&conf, &state_dir),
                "DEL" => del(&state_dir).map(|()| None),
                _ => Ok(None),
            }
        }
        "" => Err(err(
            4,
            "meshless-cni: CNI_COMMAND is not set",
            "this program is a CNI plugin, run by the container runtime",
        )),
        other => Err(err(4, "meshless-cni: unknown CNI_COMMAND", other)),
    }
}

fn env(name: &str) -> Result<String, CniError> {
    std::env::var(name).map_err(|_| err(4, "meshless-cni: a required CNI variable is missing", name))
}

/// Container IDs name the record file: keep them to the characters the spec allows.
fn container_id() -> Result<String, CniError> {
    let id = env("CNI_CONTAINERID")?;
    if id.is_empty() || !id.chars().all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c)) || id.starts_with('.') {
        return Err(err(4, "meshless-cni: CNI_CONTAINERID must be alphanumeric (plus _ . -)", id));
    }
    Ok(id)
}

/// `CNI_ARGS`: `K=V;K=V`, with the Kubernetes pod's coordinates from the runtime.
fn cni_args() -> BTreeMap<String, String> {
    std::env::var("CNI_ARGS")
        .unwrap_or_default()
        .split(';')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

fn add(conf: &NetConf, state_dir: &Path) -> Result<Option<String>, CniError> {
    let container_id = container_id()?;
    let netns = env("CNI_NETNS")?;
    let args = cni_args();
    // The chained result is what came before, unchanged: this plugin adds no interface.
    let result = match &conf.prev_result {
        Some(prev) => {
            let mut prev = prev.clone();
            if let Some(obj) = prev.as_object_mut() {
                obj.insert("cniVersion".into(), json!(conf.cni_version));
            }
            prev
        }
        None => json!({ "cniVersion": conf.cni_version }),
    };
    let (Some(namespace), Some(name)) = (args.get("K8S_POD_NAMESPACE"), args.get("K8S_POD_NAME")) else {
        // Not a Kubernetes pod (or a runtime that does not say which): nothing for the mesh.
        return Ok(Some(result.to_string()));
    };
    let ips = conf
        .prev_result
        .as_ref()
        .and_then(|p| p.get("ips"))
        .and_then(Value::as_array)
        .map(|ips| {
            ips.iter()
                .filter_map(|ip| ip.get("address").and_then(Value::as_str))
                .map(|a| a.split('/').next().unwrap_or(a).to_owned())
                .collect()
        })
        .unwrap_or_default();
    let record = Record {
        container_id: container_id.clone(),
        namespace: namespace.clone(),
        name: name.clone(),
        uid: args.get("K8S_POD_UID").cloned().unwrap_or_default(),
        netns,
        if_name: std::env::var("CNI_IFNAME").unwrap_or_default(),
        ips,
    };
    let line = serde_json::to_string(&record).expect("a record serializes");
    let pods = state_dir.join("pods");
    if let Err(e) = write_record(&pods, &container_id, &line) {
        // The agent's answer below is what counts; the record lets it catch up after a restart.
        eprintln!("meshless-cni: cannot record pod {namespace}/{name} in {}: {e}", pods.display());
    }
    let excluded = match &conf.exclude_namespaces {
        Some(list) => list.iter().any(|n| n == namespace),
        None => namespace == "kube-system",
    };
    if excluded {
        notify(state_dir, &format!("{{\"op\":\"add\",\"pod\":{line}}}"), NOTIFY_TIMEOUT);
        return Ok(Some(result.to_string()));
    }
    let wait = conf.agent_wait_seconds.unwrap_or(DEFAULT_AGENT_WAIT_SECONDS).min(MAX_AGENT_WAIT_SECONDS);
    let message = format!("{{\"op\":\"add\",\"waitMs\":{},\"pod\":{line}}}", wait * 1000);
    // The agent answers within `wait`; a little more for the message itself.
    match ask(state_dir, &message, Duration::from_secs(wait) + NOTIFY_TIMEOUT) {
        // Only an answer naming what the pod became counts: a bare "ok" is an agent that did not
        // wait (an older release during a rollout), and says nothing about the pod.
        Ok(answer) if answer.starts_with("ok ") && answer.trim().len() > 2 => Ok(Some(result.to_string())),
        outcome => {
            // The runtime tears the sandbox down and tries again; the record would be stale.
            let _ = std::fs::remove_file(pods.join(format!("{container_id}.json")));
            let details = match outcome {
                Ok(answer) => answer.trim().trim_start_matches("error: ").to_owned(),
                Err(e) => format!("the agent is not reachable on {}: {e}", state_dir.join("agent.sock").display()),
            };
            Err(err(
                TRY_AGAIN_LATER,
                &format!("meshless-cni: the node's meshless agent has not set up pod {namespace}/{name} yet"),
                details,
            ))
        }
    }
}

fn del(state_dir: &Path) -> Result<(), CniError> {
    let container_id = container_id()?;
    match std::fs::remove_file(state_dir.join("pods").join(format!("{container_id}.json"))) {
        Ok(()) => notify(state_dir, &json!({ "op": "del", "containerId": container_id }).to_string(), NOTIFY_TIMEOUT),
        // DEL must be idempotent: the runtime repeats it, also for sandboxes never added.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => eprintln!("meshless-cni: cannot remove the record of {container_id}: {e}"),
    }
    Ok(())
}

/// Written to a temporary name and renamed, so the agent never reads half a record; the
/// directories and the record are the runtime's user's alone (the agent ignores records anyone
/// else could have written).
fn write_record(dir: &Path, container_id: &str, line: &str) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    let tmp = dir.join(format!(".{container_id}.tmp"));
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
    f.write_all(format!("{line}\n").as_bytes())?;
    drop(f);
    std::fs::rename(&tmp, dir.join(format!("{container_id}.json")))
}

/// Sends one message to the agent and reads its answer.
fn ask(state_dir: &Path, message: &str, timeout: Duration) -> std::io::Result<String> {
    let mut s = UnixStream::connect(state_dir.join("agent.sock"))?;
    s.set_write_timeout(Some(timeout))?;
    s.set_read_timeout(Some(timeout))?;
    s.write_all(message.as_bytes())?;
    s.write_all(b"\n")?;
    s.shutdown(std::net::Shutdown::Write)?;
    let mut answer = String::new();
    s.read_to_string(&mut answer)?;
    Ok(answer)
}

/// Tells the agent, best effort: an agent that is not there catches up from the records.
fn notify(state_dir: &Path, message: &str, timeout: Duration) {
    match ask(state_dir, message, timeout) {
        Ok(a) if a.trim() == "ok" || a.starts_with("ok ") => {}
        Ok(a) => eprintln!("meshless-cni: the agent answered {:?}; it will catch up from the record", a.trim()),
        Err(e) => eprintln!(
            "meshless-cni: agent not reachable on {} ({e}); it will catch up from the record",
            state_dir.join("agent.sock").display()
        ),
    }
}
