//! The agent's side of `meshless-cni`: which network namespace each of this node's pods has.
//!
//! The plugin writes a record per pod sandbox under `<dir>/pods/<container id>.json`, then tells
//! the agent on `<dir>/agent.sock`. The agent binds the socket *before* it reads the records, so a
//! pod started while the agent starts is seen one way or the other; a record written while no
//! agent runs is read at the next start. Pods that existed before meshless was installed have no
//! record: [`discover`] finds their namespace from their cgroup (kubelet names pod cgroups after
//! the pod UID) and a process in it.
//!
//! Both are the node's root's alone: the directories are 0700, the socket 0600 and each peer's
//! credentials must be the agent's user, and a record owned by anyone else, or writable by group
//! or others, is ignored — a forged record would move a pod's identity into another netns.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use serde::Deserialize;
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _};
use tokio::net::UnixListener;
use tokio::sync::Notify;
use tracing::{debug, info, warn};

use super::Error;
use crate::workloads::{Enrollment, PodKey};

/// One pod sandbox, as the plugin recorded it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CniPod {
    pub container_id: String,
    pub namespace: String,
    pub name: String,
    #[serde(default)]
    pub uid: String,
    pub netns: PathBuf,
    #[serde(default)]
    pub if_name: String,
    #[serde(default)]
    pub ips: Vec<String>,
}

#[derive(Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
enum Message {
    Add {
        pod: CniPod,
        /// How long the plugin waits for the pod to be set up (absent: it does not wait).
        #[serde(default, rename = "waitMs")]
        wait_ms: Option<u64>,
    },
    Del {
        #[serde(rename = "containerId")]
        container_id: String,
    },
}

/// The records, kept current.
pub struct Registry {
    pub dir: PathBuf,
    pods: Mutex<HashMap<String, CniPod>>,
    changed: Arc<Notify>,
    /// What an ADD that waits is answered from.
    enrollment: Option<Arc<dyn Enrollment>>,
}

/// A message larger than this is not a CNI record.
const MAX_MESSAGE: u64 = 64 << 10;
/// The longest an ADD is held, whatever the plugin asks.
const MAX_WAIT: Duration = Duration::from_secs(60);

impl Registry {
    /// Binds `<dir>/agent.sock`, reads the records, and serves the socket in the background;
    /// `changed` is notified on every change. An ADD that asks to wait is answered once
    /// `enrollment` says the pod is set up (or why not, when the wait ends).
    pub fn start(
        dir: &Path,
        changed: Arc<Notify>,
        enrollment: Option<Arc<dyn Enrollment>>,
    ) -> Result<Arc<Registry>, Error> {
        use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
        let err = |source| Error::Cni { path: dir.into(), source };
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir.join("pods")).map_err(err)?;
        for d in [dir.to_path_buf(), dir.join("pods")] {
            std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700)).map_err(err)?;
        }
        let socket = dir.join("agent.sock");
        // A previous agent's socket file; a running predecessor keeps its own open socket.
        let _ = std::fs::remove_file(&socket);
        let listener = UnixListener::bind(&socket).map_err(err)?;
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
        let registry = Arc::new(Registry { dir: dir.into(), pods: Mutex::default(), changed, enrollment });
        registry.rescan();
        tokio::spawn(registry.clone().serve(listener));
        Ok(registry)
    }

    /// Reads every record on disk (at start, and as a safety net).
    pub fn rescan(&self) {
        let mut found = HashMap::new();
        let entries = match std::fs::read_dir(self.dir.join("pods")) {
            Ok(e) => e,
            Err(e) => {
                warn!(dir = %self.dir.display(), error = %e, "cannot read the CNI records");
                return;
            }
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            if let Err(why) = trusted(&path) {
                warn!(record = %path.display(), why, "ignoring a CNI record the runtime did not write");
                continue;
            }
            match std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice::<CniPod>(&b).map_err(|e| e.to_string()))
            {
                Ok(pod) => {
                    found.insert(pod.container_id.clone(), pod);
                }
                Err(e) => warn!(record = %path.display(), error = %e, "ignoring an unreadable CNI record"),
            }
        }
        let mut pods = self.pods.lock();
        if *pods != found {
            *pods = found;
            self.changed.notify_one();
        }
    }

    async fn serve(self: Arc<Self>, listener: UnixListener) {
        loop {
            let stream = match listener.accept().await {
                Ok((s, _)) => s,
                Err(e) => {
                    warn!(error = %e, "CNI socket accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let me = self.clone();
            // SAFETY: geteuid(2) has no arguments and cannot fail.
            let ours = unsafe { libc::geteuid() };
            match stream.peer_cred() {
                Ok(c) if c.uid() == ours => {}
                other => {
                    let peer = other.map(|c| format!("pid {:?}, uid {}", c.pid(), c.uid())).unwrap_or_default();
                    warn!(peer, "CNI socket: a peer that is not the runtime's user (the agent's); refused");
                    continue;
                }
            }
            tokio::spawn(async move {
                let (read, mut write) = stream.into_split();
                let mut line = String::new();
                let mut reader = tokio::io::BufReader::new(tokio::io::AsyncReadExt::take(read, MAX_MESSAGE));
                let answer = match tokio::time::timeout(Duration::from_secs(2), reader.read_line(&mut line)).await {
                    Ok(Ok(_)) => match serde_json::from_str::<Message>(&line) {
                        Ok(m) => match me.apply(m) {
                            Some((pod, wait)) => me.settled(pod, wait).await,
                            None => "ok\n".to_string(),
                        },
                        Err(e) => {
                            warn!(error = %e, "malformed message on the CNI socket");
                            format!("error: {e}\n")
                        }
                    },
                    Ok(Err(e)) => format!("error: {e}\n"),
                    Err(_) => "error: timed out\n".to_string(),
                };
                let _ = write.write_all(answer.as_bytes()).await;
            });
        }
    }

    /// Takes the message in; an ADD that waits returns its pod and how long it may wait.
    fn apply(&self, m: Message) -> Option<(CniPod, Duration)> {
        let mut pods = self.pods.lock();
        let waits = match m {
            Message::Add { pod, wait_ms } => {
                info!(pod = %format!("{}/{}", pod.namespace, pod.name), netns = %pod.netns.display(),
                      container_id = %pod.container_id, "CNI: pod network namespace announced");
                pods.insert(pod.container_id.clone(), pod.clone());
                wait_ms.map(|ms| (pod, Duration::from_millis(ms).min(MAX_WAIT)))
            }
            Message::Del { container_id } => {
                if let Some(pod) = pods.remove(&container_id) {
                    info!(pod = %format!("{}/{}", pod.namespace, pod.name), container_id = %container_id,
                          "CNI: pod sandbox removed");
                }
                None
            }
        };
        self.changed.notify_one();
        waits
    }

    /// The answer to an ADD that waits: `ok <what the pod became>` once the agent has set the pod
    /// up in its network namespace, else `error: <why>` (the plugin then fails the ADD and the
    /// runtime tries again: a pod the agent does not cover does not start).
    async fn settled(&self, pod: CniPod, wait: Duration) -> String {
        let Some(enrollment) = &self.enrollment else { return "ok\n".into() };
        let key = PodKey { namespace: pod.namespace.clone(), name: pod.name.clone() };
        match enrollment.wait(key.clone(), pod.netns.clone(), wait).await {
            Ok(what) => {
                debug!(pod = %key, what, "CNI: pod set up; ADD answered");
                format!("ok {what}\n")
            }
            Err(why) => {
                warn!(pod = %key, why, "CNI: pod not set up in time; ADD refused (the runtime retries)");
                // The plugin removes the record of a refused sandbox; so does the agent (the
                // runtime's DEL will find nothing to tell).
                if self.pods.lock().remove(&pod.container_id).is_some() {
                    self.changed.notify_one();
                }
                format!("error: {why}\n")
            }
        }
    }
    /// The network namespace of pod `namespace/name` (with `uid`, when both sides know it): the
    /// newest live sandbox's (a runtime that recreated a sandbox without a DEL leaves two records;
    /// the later one, by its record's time, is the pod's).
    pub fn netns(&self, namespace: &str, name: &str, uid: &str) -> Option<PathBuf> {
        self.sandbox(namespace, name, uid).map(|p| p.netns)
    }

    /// The pod's addresses as its network plugin gave them (before the kubelet reports them).
    pub fn ips(&self, namespace: &str, name: &str, uid: &str) -> Vec<std::net::IpAddr> {
        self.sandbox(namespace, name, uid)
            .map(|p| p.ips.iter().filter_map(|ip| ip.parse().ok()).collect())
            .unwrap_or_default()
    }

    fn sandbox(&self, namespace: &str, name: &str, uid: &str) -> Option<CniPod> {
        let pods = self.pods.lock();
        let written = |p: &CniPod| {
            std::fs::metadata(self.dir.join("pods").join(format!("{}.json", p.container_id)))
                .and_then(|m| m.modified())
                .ok()
        };
        pods.values()
            .filter(|p| {
                p.namespace == namespace && p.name == name && (p.uid.is_empty() || uid.is_empty() || p.uid == uid)
            })
            .filter(|p| p.netns.exists())
            .max_by_key(|p| written(p))
            .cloned()
    }
}

/// A record is trusted when the agent's user owns it and no one else may write it.
fn trusted(path: &Path) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt as _;
    let m = std::fs::symlink_metadata(path).map_err(|e| e.to_string())?;
    // SAFETY: geteuid(2) has no arguments and cannot fail.
    let ours = unsafe { libc::geteuid() };
    if !m.file_type().is_file() {
        return Err("not a regular file".into());
    }
    if m.uid() != ours {
        return Err(format!("owned by uid {}, not the agent's {ours}", m.uid()));
    }
    if m.mode() & 0o022 != 0 {
        return Err(format!("mode {:o}: writable by group or others", m.mode() & 0o777));
    }
    Ok(())
}

/// A pod's cgroup under `parent`, found by its UID (kubelet's cgroupfs driver names it
/// `pod<uid>`, the systemd driver `kubepods-…-pod<uid with _>.slice`), at most three levels deep.
pub fn pod_cgroup(parent: &Path, uid: &str) -> Option<PathBuf> {
    if uid.is_empty() {
        return None;
    }
    let underscored = uid.replace('-', "_");
    let mut level = vec![parent.to_path_buf()];
    for _ in 0..3 {
        let mut next = Vec::new();
        for dir in &level {
            for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                    continue;
                }
                let name = entry.file_name();
                let name = name.to_string_lossy();
                if name.contains(uid) || name.contains(&underscored) {
                    return Some(entry.path());
                }
                next.push(entry.path());
            }
        }
        level = next;
    }
    None
}

/// Whether a CNI record's netns is the one the pod's own processes run in.
#[derive(Debug, PartialEq, Eq)]
pub enum Check {
    /// The same namespace (or nothing to check against yet: no process in the pod's cgroup).
    Consistent,
    /// The pod's processes run in another namespace: the record is not the pod's.
    Differs { record: PathBuf, processes: PathBuf },
}

/// Checks `netns` (a record's) against a process in the pod's `cgroup`: a record that names
/// another namespace than the pod's processes are in would give the pod's identity to
/// whatever runs there.
pub fn check(netns: &Path, cgroup: &Path) -> Check {
    use std::os::unix::fs::MetadataExt as _;
    let id = |p: &Path| std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino()));
    let Some(processes) = discover(cgroup) else { return Check::Consistent };
    match (id(netns), id(&processes)) {
        (Some(a), Some(b)) if a != b => Check::Differs { record: netns.into(), processes },
        _ => Check::Consistent,
    }
}

/// The network namespace of the processes in `cgroup` (or its children: the containers), as a
/// `/proc/<pid>/ns/net` path. For pods that started before meshless was installed.
pub fn discover(cgroup: &Path) -> Option<PathBuf> {
    let mut dirs = vec![cgroup.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        if let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) {
            if let Some(pid) = procs.lines().find_map(|l| l.trim().parse::<u32>().ok()) {
                let netns = PathBuf::from(format!("/proc/{pid}/ns/net"));
                debug!(cgroup = %cgroup.display(), pid, "found a pod's network namespace from its cgroup");
                return Some(netns);
            }
        }
        dirs.extend(
            std::fs::read_dir(&dir)
                .into_iter()
                .flatten()
                .flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.path()),
        );
    }
    None
}

/// `meshless cni-install`: what the DaemonSet's init container does on every node.
#[derive(clap::Args, Debug, Clone)]
pub struct InstallArgs {
    /// The plugin binary to copy (shipped in the agent's image).
    #[arg(long, default_value = "/usr/local/bin/meshless-cni")]
    pub plugin: PathBuf,
    /// The host's CNI binary directory, as mounted.
    #[arg(long, default_value = "/host/opt/cni/bin")]
    pub bin_dir: PathBuf,
    /// The host's CNI configuration directory, as mounted.
    #[arg(long, default_value = "/host/etc/cni/net.d")]
    pub conf_dir: PathBuf,
    /// The plugin's state directory on the host (the agent's --cni-dir).
    #[arg(long, default_value = "/var/run/meshless/cni")]
    pub state_dir: PathBuf,
}

/// The plugin's entry in a configuration list.
const PLUGIN_TYPE: &str = "meshless-cni";

/// Copies the plugin and chains it, last, into the network configuration the runtime uses (the
/// lexically first file of the configuration directory, as libcni picks it). A single-plugin
/// `.conf` becomes a `.conflist`. Running it again changes nothing. Returns what it did.
pub fn install(a: &InstallArgs) -> anyhow::Result<String> {
    use anyhow::Context as _;
    let target = a.bin_dir.join(PLUGIN_TYPE);
    let tmp = a.bin_dir.join(format!(".{PLUGIN_TYPE}.tmp"));
    std::fs::copy(&a.plugin, &tmp).with_context(|| format!("copying {} to {}", a.plugin.display(), tmp.display()))?;
    std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    std::fs::rename(&tmp, &target)?;
    let mut files: Vec<PathBuf> = std::fs::read_dir(&a.conf_dir)
        .with_context(|| format!("reading {}", a.conf_dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "conf" || e == "conflist" || e == "json"))
        .collect();
    files.sort();
    let first = files.first().with_context(|| {
        format!(
            "no CNI network configuration in {} yet: the cluster's network plugin installs one first",
            a.conf_dir.display()
        )
    })?;
    let text = std::fs::read_to_string(first).with_context(|| format!("reading {}", first.display()))?;
    let mut conf: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", first.display()))?;
    let obj = conf.as_object_mut().with_context(|| format!("{} is not a JSON object", first.display()))?;
    let entry = serde_json::json!({ "type": PLUGIN_TYPE, "stateDir": a.state_dir });
    let (list, out) = if obj.contains_key("plugins") {
        (conf, first.clone())
    } else {
        // A single plugin: the same network as a list of one, then ours.
        let cni_version = obj.get("cniVersion").cloned().unwrap_or_else(|| "0.3.1".into());
        let name = obj.get("name").cloned().unwrap_or_else(|| "k8s-pod-network".into());
        let mut plugin = obj.clone();
        plugin.remove("cniVersion");
        plugin.remove("name");
        let list = serde_json::json!({ "cniVersion": cni_version, "name": name, "plugins": [plugin] });
        (list, first.with_extension("conflist"))
    };
    let mut list = list;
    let plugins =
        list["plugins"].as_array_mut().with_context(|| format!("{}: `plugins` is not a list", first.display()))?;
    let what = match plugins.iter_mut().find(|p| p["type"] == PLUGIN_TYPE) {
        Some(p) if *p == entry => format!("{} already chains {PLUGIN_TYPE}; nothing to do", out.display()),
        Some(p) => {
            *p = entry;
            format!("updated {PLUGIN_TYPE} in {}", out.display())
        }
        None => {
            plugins.push(entry);
            format!("chained {PLUGIN_TYPE} into {}", out.display())
        }
    };
    let tmp = out.with_extension("meshless-tmp");
    std::fs::write(&tmp, serde_json::to_string_pretty(&list)? + "\n")?;
    std::fs::rename(&tmp, &out)?;
    if out != *first {
        std::fs::remove_file(first)?;
    }
    Ok(what)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(dir: &Path) -> InstallArgs {
        std::fs::create_dir_all(dir.join("bin")).unwrap();
        std::fs::create_dir_all(dir.join("net.d")).unwrap();
        std::fs::write(dir.join("plugin"), b"#!/bin/true\n").unwrap();
        InstallArgs {
            plugin: dir.join("plugin"),
            bin_dir: dir.join("bin"),
            conf_dir: dir.join("net.d"),
            state_dir: "/var/run/meshless/cni".into(),
        }
    }

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("meshless-cni-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[tokio::test]
    async fn records_on_disk_are_read_at_start_and_the_newest_sandbox_of_a_pod_wins() {
        let d = scratch("records");
        std::fs::create_dir_all(d.join("pods")).unwrap();
        let record = |id: &str, netns: &str, uid: &str| {
            format!(r#"{{"containerId":"{id}","namespace":"shop","name":"web-1","uid":"{uid}","netns":"{netns}"}}"#)
        };
        std::fs::write(d.join("pods/old.json"), record("old", "/proc/1/ns/net", "u-1")).unwrap();
        std::fs::write(d.join("pods/gone.json"), record("gone", "/nonexistent/netns", "u-1")).unwrap();
        std::fs::write(d.join("pods/junk.json"), "{not a record").unwrap();
        std::fs::write(d.join("pods/other.json"), record("other", "/proc/self/ns/net", "u-2")).unwrap();
        let earlier = std::time::SystemTime::now() - Duration::from_secs(60);
        std::fs::File::options().write(true).open(d.join("pods/old.json")).unwrap().set_modified(earlier).unwrap();
        std::fs::write(d.join("pods/new.json"), record("new", "/proc/self/ns/net", "u-1")).unwrap();
        let registry = Registry::start(&d, Arc::new(Notify::new()), None).unwrap();
        assert_eq!(registry.netns("shop", "web-1", "u-1"), Some(PathBuf::from("/proc/self/ns/net")));
        // Another pod of the same name (a new UID) is not this one; an unknown UID matches any.
        assert_eq!(registry.netns("shop", "web-1", "u-3"), None);
        assert!(registry.netns("shop", "web-1", "").is_some());
        assert!(d.join("agent.sock").exists());
        let _ = std::fs::remove_dir_all(&d);
    }

    #[tokio::test]
    async fn the_records_and_the_socket_are_roots_alone_and_a_record_anyone_else_could_write_is_ignored() {
        use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
        let d = scratch("trust");
        std::fs::create_dir_all(d.join("pods")).unwrap();
        let record = |name: &str| {
            format!(
                r#"{{"containerId":"{name}","namespace":"shop","name":"{name}","uid":"","netns":"/proc/self/ns/net"}}"#
            )
        };
        for name in ["good", "world-writable", "foreign"] {
            std::fs::write(d.join(format!("pods/{name}.json")), record(name)).unwrap();
        }
        let path = d.join("pods/world-writable.json");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
        // SAFETY: geteuid(2) has no arguments and cannot fail.
        let root = unsafe { libc::geteuid() } == 0;
        if root {
            std::os::unix::fs::chown(d.join("pods/foreign.json"), Some(65534), Some(65534)).unwrap();
        }
        let registry = Registry::start(&d, Arc::new(Notify::new()), None).unwrap();
        assert!(registry.netns("shop", "good", "").is_some());
        assert_eq!(registry.netns("shop", "world-writable", ""), None, "a record others may write is ignored");
        assert_eq!(registry.netns("shop", "foreign", "").is_some(), !root, "a record another user owns is ignored");
        for (p, mode) in [(d.clone(), 0o700), (d.join("pods"), 0o700), (d.join("agent.sock"), 0o600)] {
            assert_eq!(std::fs::metadata(&p).unwrap().mode() & 0o777, mode, "{}", p.display());
        }
        let _ = std::fs::remove_dir_all(&d);
    }

    /// Sets pods up when told to; says why not otherwise.
    struct Fake(tokio::sync::watch::Sender<Vec<String>>);

    impl Enrollment for Fake {
        fn wait(
            &self,
            pod: PodKey,
            netns: PathBuf,
            timeout: Duration,
        ) -> futures_util::future::BoxFuture<'static, Result<String, String>> {
            let mut rx = self.0.subscribe();
            Box::pin(async move {
                let wanted = format!("{pod} {}", netns.display());
                match tokio::time::timeout(timeout, rx.wait_for(|set_up| set_up.contains(&wanted))).await {
                    Ok(Ok(_)) => Ok("enrolled (Strict)".into()),
                    _ => Err(format!("pod {pod} not set up by the agent yet: no certificate")),
                }
            })
        }
    }

    async fn ask(socket: &Path, line: &str) -> String {
        let mut s = tokio::net::UnixStream::connect(socket).await.unwrap();
        s.write_all(format!("{line}\n").as_bytes()).await.unwrap();
        let mut answer = String::new();
        tokio::io::AsyncReadExt::read_to_string(&mut s, &mut answer).await.unwrap();
        answer
    }

    #[tokio::test]
    async fn an_add_that_waits_is_answered_once_the_pod_is_set_up_and_refused_when_it_is_not() {
        let d = scratch("wait");
        let (set_up, _) = tokio::sync::watch::channel(Vec::new());
        let fake = Arc::new(Fake(set_up.clone()));
        let registry = Registry::start(&d, Arc::new(Notify::new()), Some(fake)).unwrap();
        let add = |name: &str, wait_ms: u64| {
            format!(
                r#"{{"op":"add","waitMs":{wait_ms},"pod":{{"containerId":"c-{name}","namespace":"shop","name":"{name}","netns":"/proc/self/ns/net","ips":["10.1.2.3"]}}}}"#
            )
        };
        let socket = d.join("agent.sock");
        let pending = tokio::spawn({
            let (socket, line) = (socket.clone(), add("web-1", 10_000));
            async move { ask(&socket, &line).await }
        });
        // The answer waits for the pod to be set up, whose record is already taken in.
        let known = async {
            while registry.netns("shop", "web-1", "").is_none() {
                tokio::task::yield_now().await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), known).await.expect("the record taken in");
        assert!(!pending.is_finished(), "answered before the pod was set up");
        set_up.send_modify(|v| v.push("shop/web-1 /proc/self/ns/net".into()));
        assert_eq!(pending.await.unwrap(), "ok enrolled (Strict)\n");
        assert_eq!(registry.ips("shop", "web-1", ""), ["10.1.2.3".parse::<std::net::IpAddr>().unwrap()]);
        // Never set up: refused when the wait the plugin asked for ends, with the reason.
        let refused = ask(&socket, &add("web-2", 50)).await;
        assert_eq!(refused, "error: pod shop/web-2 not set up by the agent yet: no certificate\n");
        assert_eq!(registry.netns("shop", "web-2", ""), None, "a refused sandbox's record is dropped");
        // Without a wait (an older plugin, an excluded namespace): acknowledged at once.
        let plain = ask(&socket, &add("web-3", 0).replace(r#""waitMs":0,"#, "")).await;
        assert_eq!(plain, "ok\n");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_record_is_checked_against_the_netns_of_the_pods_processes() {
        let d = scratch("check");
        // A pod cgroup (as a directory tree) holding this very process: its netns is ours.
        std::fs::create_dir_all(d.join("pod-u1/ctr")).unwrap();
        std::fs::write(d.join("pod-u1/ctr/cgroup.procs"), format!("{}\n", std::process::id())).unwrap();
        let ours = PathBuf::from(format!("/proc/{}/ns/net", std::process::id()));
        assert_eq!(check(Path::new("/proc/self/ns/net"), &d.join("pod-u1")), Check::Consistent);
        // A record naming another namespace (here: any other namespace file) is not the pod's.
        let other = Path::new("/proc/self/ns/uts");
        assert_eq!(check(other, &d.join("pod-u1")), Check::Differs { record: other.into(), processes: ours });
        // No process to check against yet (the sandbox is being made): nothing to refuse.
        std::fs::create_dir_all(d.join("pod-u2")).unwrap();
        assert_eq!(check(other, &d.join("pod-u2")), Check::Consistent);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn install_chains_the_plugin_last_into_the_first_list_once() {
        let d = scratch("list");
        let a = args(&d);
        std::fs::write(
            a.conf_dir.join("10-net.conflist"),
            r#"{"cniVersion":"1.0.0","name":"net","plugins":[{"type":"bridge"},{"type":"portmap"}]}"#,
        )
        .unwrap();
        std::fs::write(
            a.conf_dir.join("20-other.conflist"),
            r#"{"cniVersion":"1.0.0","name":"other","plugins":[{"type":"x"}]}"#,
        )
        .unwrap();
        assert!(install(&a).unwrap().starts_with("chained"));
        let again = install(&a).unwrap();
        assert!(again.contains("nothing to do"), "{again}");
        let conf: serde_json::Value =
            serde_json::from_slice(&std::fs::read(a.conf_dir.join("10-net.conflist")).unwrap()).unwrap();
        let types: Vec<_> = conf["plugins"].as_array().unwrap().iter().map(|p| p["type"].as_str().unwrap()).collect();
        assert_eq!(types, ["bridge", "portmap", "meshless-cni"]);
        let other = std::fs::read_to_string(a.conf_dir.join("20-other.conflist")).unwrap();
        assert!(!other.contains("meshless"), "only the configuration in use is changed");
        assert_eq!(std::fs::read(a.bin_dir.join("meshless-cni")).unwrap(), b"#!/bin/true\n");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn install_turns_a_single_plugin_conf_into_a_list_and_refuses_an_empty_directory() {
        let d = scratch("single");
        let a = args(&d);
        let err = install(&a).unwrap_err().to_string();
        assert!(err.contains("no CNI network configuration"), "{err}");
        std::fs::write(
            a.conf_dir.join("10-net.conf"),
            r#"{"cniVersion":"0.4.0","name":"net","type":"bridge","bridge":"cni0"}"#,
        )
        .unwrap();
        install(&a).unwrap();
        assert!(!a.conf_dir.join("10-net.conf").exists());
        let conf: serde_json::Value =
            serde_json::from_slice(&std::fs::read(a.conf_dir.join("10-net.conflist")).unwrap()).unwrap();
        assert_eq!(conf["cniVersion"], "0.4.0");
        assert_eq!(conf["plugins"][0]["bridge"], "cni0");
        assert_eq!(conf["plugins"][1]["type"], "meshless-cni");
        std::fs::write(a.conf_dir.join("10-net.conflist"), "not json").unwrap();
        assert!(install(&a).unwrap_err().to_string().contains("is not JSON"));
        let _ = std::fs::remove_dir_all(&d);
    }
}
