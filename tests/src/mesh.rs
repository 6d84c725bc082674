//! A meshless cluster on the testbed: a CA directory, the issuer on the control-plane host (the
//! fabric netns), one state file, node credential and real `meshless agent` process per node
//! (inside the node's netns), with their JSON logs collected in files. Agents get the trust bundle
//! and their node credential, never a CA key.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::{wait_for, Pod, Testbed};

pub const TRUST_DOMAIN: &str = "cluster.local";
/// The issuer's port on the control-plane host.
pub const ISSUER_PORT: u16 = 15012;

/// Where node `i`'s credential for the issuer lives.
pub fn node_credentials(tb: &Testbed, i: usize) -> PathBuf {
    tb.dir.join(format!("node{i}-credentials"))
}

pub struct Bins {
    pub meshless: PathBuf,
    pub testbin: PathBuf,
    /// The misbehaving tunnel client of the hostile-peer tests.
    pub peer: PathBuf,
    /// A Workload API client (the spiffe crate's X509Source).
    pub wlclient: PathBuf,
    /// The CNI plugin.
    pub cni: PathBuf,
}

pub struct Mesh {
    pub ca_dir: PathBuf,
    /// The issuer's pid and log file.
    pub issuer: u32,
    pub issuer_log: PathBuf,
    issuer_args: Vec<String>,
    /// What agents get to trust at start (a copy of the CA directory's bundle).
    pub bundle: PathBuf,
    /// Log file of node i's current agent at index i-1.
    pub logs: Vec<PathBuf>,
    /// Pid of node i's current agent at index i-1.
    pub agents: Vec<u32>,
    /// State file of node i at index i-1.
    pub states: Vec<PathBuf>,
    /// Extra arguments of node i's agents at index i-1.
    args: Vec<Vec<String>>,
    starts: Vec<usize>,
    /// The pods the state files list (and whether each is in the mesh), for rewriting them.
    listed: Vec<(Pod, bool)>,
}

impl Mesh {
    /// Creates the CA, writes the state files and starts one agent per node, waiting until every
    /// agent reports ready. `enrolled` chooses the pods in the mesh.
    /// `node1_args` are extra agent arguments for node 1's agent only (e.g. to compare two settings).
    pub fn start(tb: &Testbed, bins: &Bins, enrolled: &dyn Fn(&Pod) -> bool, node1_args: &[&str]) -> Result<Mesh> {
        let args = |i: usize| if i == 1 { node1_args.iter().map(|a| a.to_string()).collect() } else { vec![] };
        Mesh::start_with(tb, bins, &|p| Some(enrolled(p)), &args)
    }

    /// As [`Mesh::start`], with `listed(pod)` saying whether a pod is in the state files (`None`)
    /// and then whether it is in the mesh, and `args(i)` extra agent arguments for node i.
    pub fn start_with(
        tb: &Testbed,
        bins: &Bins,
        listed: &dyn Fn(&Pod) -> Option<bool>,
        args: &dyn Fn(usize) -> Vec<String>,
    ) -> Result<Mesh> {
        Mesh::start_full(tb, bins, listed, args, &[], "")
    }

    /// As [`Mesh::start_with`], with extra arguments for the issuer (e.g. `--svid-ttl`) and
    /// policy YAML (`mesh:`, `peerAuthentications:`, `authorizationPolicies:`) for the state files.
    pub fn start_full(
        tb: &Testbed,
        bins: &Bins,
        listed: &dyn Fn(&Pod) -> Option<bool>,
        args: &dyn Fn(usize) -> Vec<String>,
        issuer_args: &[&str],
        policy: &str,
    ) -> Result<Mesh> {
        let ca_dir = tb.dir.join("ca");
        run_ok(
            Command::new(&bins.meshless).args(["ca", "init", "--trust-domain", TRUST_DOMAIN, "--out"]).arg(&ca_dir),
        )?;
        let trust = tb.dir.join("trust");
        fs::create_dir_all(&trust)?;
        let bundle = trust.join("bundle.pem");
        fs::copy(ca_dir.join("bundle.pem"), &bundle)?;
        for node in &tb.nodes {
            run_ok(
                Command::new(&bins.meshless)
                    .args(["ca", "node", "--node", &node.name, "--ca-dir"])
                    .arg(&ca_dir)
                    .arg("--out")
                    .arg(node_credentials(tb, node.index)),
            )?;
        }
        let n = tb.nodes.len();
        let mut mesh = Mesh {
            ca_dir,
            issuer: 0,
            issuer_log: tb.dir.join("issuer.log"),
            issuer_args: issuer_args.iter().map(|a| a.to_string()).collect(),
            bundle,
            logs: vec![PathBuf::new(); n],
            agents: vec![0; n],
            states: Vec::new(),
            args: (1..=n).map(args).collect(),
            starts: vec![0; n],
            listed: tb.pods().filter_map(|p| listed(p).map(|m| (p.clone(), m))).collect(),
        };
        let pods: Vec<(&Pod, bool)> = mesh.listed.iter().map(|(p, m)| (p, *m)).collect();
        for node in &tb.nodes {
            let path = tb.dir.join(format!("state-node{}.yaml", node.index));
            fs::write(&path, tb.state_yaml(node.index, TRUST_DOMAIN, &pods)? + policy)?;
            mesh.states.push(path);
        }
        mesh.start_issuer(tb, bins)?;
        let mut started = Vec::new();
        for node in &tb.nodes {
            started.push(mesh.launch(tb, bins, node.index)?);
        }
        for (i, (pid, log)) in started.into_iter().enumerate() {
            wait_ready(i + 1, pid, &log)?;
        }
        Ok(mesh)
    }

    /// Starts the issuer on the control-plane host, watching node 1's state file (every state file
    /// lists every pod), and waits until it is ready. Also used to bring it back after a stop.
    pub fn start_issuer(&mut self, tb: &Testbed, bins: &Bins) -> Result<u32> {
        let readies =
            || fs::read_to_string(&self.issuer_log).map(|t| t.matches("\"issuer ready\"").count()).unwrap_or(0);
        let before = readies();
        let mut cmd = tb.fabric.command(&bins.meshless, None)?;
        cmd.args(["issuer", "--log-format", "json", "--listen"])
            .arg(format!("{}:{ISSUER_PORT}", crate::CONTROL_IPV4))
            .arg("--ca-dir")
            .arg(&self.ca_dir)
            .arg("--state")
            .arg(&self.states[0])
            .args(&self.issuer_args)
            .stdout(Stdio::null())
            .stderr(fs::OpenOptions::new().create(true).append(true).open(&self.issuer_log)?);
        let pid = tb.spawn(&mut cmd)?;
        let ready = wait_for(Duration::from_secs(20), || {
            if !Path::new(&format!("/proc/{pid}")).exists() || is_zombie(pid) {
                return Some(false);
            }
            (readies() > before).then_some(true)
        });
        if ready != Some(true) {
            bail!(
                "the issuer did not become ready; its log:\n{}",
                fs::read_to_string(&self.issuer_log).unwrap_or_default()
            );
        }
        self.issuer = pid;
        Ok(pid)
    }

    /// The issuer's JSON log lines.
    pub fn issuer_lines(&self) -> Vec<serde_json::Value> {
        json_lines(&self.issuer_log)
    }

    /// Starts another agent on `node` (an upgrade while the current one runs, or a restart after
    /// it is gone), with the same arguments, and waits until it is ready. It becomes the node's
    /// current agent; returns its pid and log file.
    pub fn spawn_agent(&mut self, tb: &Testbed, bins: &Bins, node: usize) -> Result<(u32, PathBuf)> {
        let (pid, log) = self.launch(tb, bins, node)?;
        wait_ready(node, pid, &log)?;
        Ok((pid, log))
    }

    /// Starts a successor of node `node`'s agent as a DaemonSet's container runs it — in a cgroup
    /// below the node's pods' cgroup, in a cgroup namespace of its own (it sees its own cgroup as
    /// `/` and every pod's as `/../…`) — waits until it is ready, and stops the agent it took
    /// over from.
    pub fn respawn_contained(&mut self, tb: &Testbed, bins: &Bins, node: usize) -> Result<(u32, PathBuf)> {
        let old = self.agents[node - 1];
        let cgroup = tb.node(node).cgroup.join("meshless-agent");
        fs::create_dir_all(&cgroup)?;
        let (pid, log) = self.launch_in(tb, bins, node, Some(&cgroup))?;
        wait_ready(node, pid, &log)?;
        tb.signal(old, libc::SIGTERM);
        if tb.wait_exit(old, Duration::from_secs(40)).is_none() {
            bail!("node{node}'s previous agent (pid {old}) did not exit after the hand-over");
        }
        Ok((pid, log))
    }

    /// Replaces node `node`'s agent with one started with `args` (a hand-over, as an upgrade
    /// does): waits until it is ready, then stops the one it took over from.
    pub fn restart_with(&mut self, tb: &Testbed, bins: &Bins, node: usize, args: Vec<String>) -> Result<u32> {
        let old = self.agents[node - 1];
        self.args[node - 1] = args;
        let (pid, _) = self.spawn_agent(tb, bins, node)?;
        tb.signal(old, libc::SIGTERM);
        if tb.wait_exit(old, Duration::from_secs(40)).is_none() {
            bail!("node{node}'s previous agent (pid {old}) did not exit after the hand-over");
        }
        Ok(pid)
    }

    fn launch(&mut self, tb: &Testbed, bins: &Bins, node: usize) -> Result<(u32, PathBuf)> {
        self.launch_in(tb, bins, node, None)
    }

    /// Launches node `node`'s agent; with `contained`, in that cgroup and a new cgroup namespace.
    fn launch_in(
        &mut self,
        tb: &Testbed,
        bins: &Bins,
        node: usize,
        contained: Option<&Path>,
    ) -> Result<(u32, PathBuf)> {
        let i = node - 1;
        self.starts[i] += 1;
        let log = match self.starts[i] {
            1 => tb.dir.join(format!("agent-node{node}.log")),
            n => tb.dir.join(format!("agent-node{node}-{n}.log")),
        };
        let mut cmd = tb.node(node).netns.command(&bins.meshless, contained)?;
        if contained.is_some() {
            // SAFETY: runs in the child between fork and exec, after the cgroup was joined (the
            // earlier pre_exec), and only calls unshare(2), which is async-signal-safe.
            unsafe {
                std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                    if libc::unshare(libc::CLONE_NEWCGROUP) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        cmd.args(["agent", "--log-format", "json"]);
        // Debug logs unless the caller chose a level (the bench runs at the production level).
        if !self.args[i].iter().any(|a| a == "--log") {
            cmd.args(["--log", "info,meshless=debug"]);
        }
        cmd.arg("--state")
            .arg(&self.states[i])
            .arg("--issuer")
            .arg(format!("{}:{ISSUER_PORT}", crate::CONTROL_IPV4))
            .arg("--node-credentials")
            .arg(node_credentials(tb, node))
            .arg("--bundle")
            .arg(&self.bundle)
            .arg("--bpf-dir")
            .arg(tb.bpf_dir(node))
            .arg("--run-dir")
            .arg(tb.dir.join(format!("run-node{node}")))
            .args(&self.args[i]);
        // The node's kubelet cgroup holds the health probes, unless the test chose otherwise.
        if !self.args[i].iter().any(|a| a == "--probe-cgroup") {
            cmd.arg("--probe-cgroup").arg(&tb.node(node).kubelet_cgroup);
        }
        cmd
            // The glibc memcpy trap of this machine kind (shared/PERFORMANCE.md): rustls'
            // receive path is much faster without `rep movsb`.
            .env("GLIBC_TUNABLES", "glibc.cpu.x86_rep_movsb_threshold=4294967295")
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log)?);
        let pid = tb.spawn(&mut cmd)?;
        self.agents[i] = pid;
        self.logs[i] = log.clone();
        Ok((pid, log))
    }

    /// Rewrites node `node`'s state file (atomically, as a ConfigMap update would) with
    /// `pods` (each: the pod, whether it is in the mesh) and `extra` raw YAML pod entries.
    pub fn write_state(&self, tb: &Testbed, node: usize, pods: &[(&Pod, bool)], extra: &str) -> Result<()> {
        let text = tb.state_yaml(node, TRUST_DOMAIN, pods)? + extra;
        let path = &self.states[node - 1];
        let tmp = path.with_extension("tmp");
        fs::write(&tmp, text)?;
        fs::rename(&tmp, path)?;
        Ok(())
    }

    /// Rewrites every node's state file (atomically) with the pods listed at start and `policy`
    /// (YAML with `mesh:`, `peerAuthentications:`, `authorizationPolicies:`); agents apply it live.
    pub fn set_policy(&self, tb: &Testbed, policy: &str) -> Result<()> {
        let pods: Vec<(&Pod, bool)> = self.listed.iter().map(|(p, m)| (p, *m)).collect();
        for node in &tb.nodes {
            let path = &self.states[node.index - 1];
            let tmp = path.with_extension("tmp");
            fs::write(&tmp, tb.state_yaml(node.index, TRUST_DOMAIN, &pods)? + policy)?;
            fs::rename(&tmp, path)?;
        }
        Ok(())
    }

    /// The last lines of node `i`'s agent log, shortened, for failure messages.
    pub fn log_summary(&self, node: usize) -> String {
        let lines = self.log_lines(node);
        let skip = lines.len().saturating_sub(40);
        lines
            .iter()
            .skip(skip)
            .map(|l| {
                let mut f = l.as_object().cloned().unwrap_or_default();
                for noise in ["timestamp", "target", "span", "spans", "config"] {
                    f.remove(noise);
                }
                serde_json::Value::Object(f).to_string()
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The JSON log lines of node `i`'s agent.
    pub fn log_lines(&self, node: usize) -> Vec<serde_json::Value> {
        json_lines(&self.logs[node - 1])
    }

    /// Waits (bounded) for a log line of node `i` with the given message matching `pred`.
    pub fn wait_log(
        &self,
        node: usize,
        message: &str,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> Option<serde_json::Value> {
        wait_for(Duration::from_secs(10), || {
            self.log_lines(node).into_iter().find(|l| l["message"] == message && pred(l))
        })
    }
}

/// Waits until the agent `pid` logs "agent ready", failing if it exits first.
fn wait_ready(node: usize, pid: u32, log: &Path) -> Result<()> {
    let ready = wait_for(Duration::from_secs(20), || {
        if !Path::new(&format!("/proc/{pid}")).exists() || is_zombie(pid) {
            return Some(false);
        }
        fs::read_to_string(log).ok()?.contains("\"agent ready\"").then_some(true)
    });
    if ready != Some(true) {
        bail!("agent of node{node} did not become ready; its log:\n{}", fs::read_to_string(log).unwrap_or_default());
    }
    Ok(())
}

/// The JSON lines of a log file.
pub fn json_lines(path: &Path) -> Vec<serde_json::Value> {
    fs::read_to_string(path).unwrap_or_default().lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
}

pub fn is_zombie(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| s.rsplit(')').next().map(|r| r.trim_start().starts_with('Z')).unwrap_or(false))
        .unwrap_or(true)
}

pub fn run_ok(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Whether something listens on `port` inside `ns` (reads /proc/net/tcp{,6} from inside).
pub fn is_listening(ns: &crate::Netns, port: u16) -> bool {
    let needle = format!("{port:04X}");
    let Ok(out) = ns.sh("cat /proc/net/tcp /proc/net/tcp6") else { return false };
    String::from_utf8_lossy(&out.stdout).lines().any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        // local_address is ADDR:PORT in hex; state 0A is LISTEN.
        f.len() > 3 && f[1].rsplit(':').next() == Some(needle.as_str()) && f[3] == "0A"
    })
}

/// Waits until something listens on `port` inside `ns`.
pub fn wait_listening(ns: &crate::Netns, port: u16) -> Result<()> {
    let ok = wait_for(Duration::from_secs(10), || is_listening(ns, port).then_some(()));
    if ok.is_none() {
        bail!("nothing listened on port {port} in {} within 10 s", ns.name);
    }
    Ok(())
}

/// GETs `path` from node `node`'s agent's admin endpoint (127.0.0.1:15000 in the node's netns).
pub fn admin_get(tb: &Testbed, node: usize, path: &str) -> Result<String> {
    run_ok(
        tb.node(node)
            .netns
            .command("curl", None)?
            .args(["-sS", "--fail", "--max-time", "5"])
            .arg(format!("http://127.0.0.1:{}{path}", crate::ADMIN_PORT)),
    )
}

/// Node `node`'s agent's status (`GET /status`: every pod it manages with its state, mode,
/// certificate, last error), or `None` if the endpoint does not answer.
pub fn status(tb: &Testbed, node: usize) -> Option<serde_json::Value> {
    serde_json::from_str(&admin_get(tb, node, "/status").ok()?).ok()
}

/// The status entry of `pod` (`namespace/name`) on node `node`, if the agent manages it.
pub fn pod_status(tb: &Testbed, node: usize, pod: &str) -> Option<serde_json::Value> {
    let status = status(tb, node)?;
    status["pods"]
        .as_array()?
        .iter()
        .find(|p| {
            format!("{}/{}", p["pod"]["namespace"].as_str().unwrap_or(""), p["pod"]["name"].as_str().unwrap_or(""))
                == pod
        })
        .cloned()
}

/// Waits up to 40 s until node `node`'s status shows `pod` in `state` (`enrolled`,
/// `outside_mesh`, `failing`) with `f` true of its entry; panics with the last status otherwise.
pub fn wait_pod_state(
    tb: &Testbed,
    node: usize,
    pod: &str,
    state: &str,
    f: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    crate::wait_for(std::time::Duration::from_secs(40), || {
        pod_status(tb, node, pod).filter(|p| p["state"] == state && f(p))
    })
    .unwrap_or_else(|| panic!("node{node}'s status never showed {pod} {state}: {:?}", status(tb, node)))
}

/// Waits up to 40 s until node `node`'s agent no longer manages `pod`.
pub fn wait_pod_gone(tb: &Testbed, node: usize, pod: &str) {
    let gone = crate::wait_for(std::time::Duration::from_secs(40), || {
        status(tb, node).filter(|_| pod_status(tb, node, pod).is_none())
    });
    assert!(gone.is_some(), "node{node}'s agent still manages {pod}: {:?}", status(tb, node));
}

/// The inbound connections node `node`'s agent has decided with `decision` ("allow", "deny", …),
/// summed over its `meshless_inbound_decisions_total` counters; `None` if the endpoint does not
/// answer.
pub fn inbound_decisions(tb: &Testbed, node: usize, decision: &str) -> Option<u64> {
    let metrics = admin_get(tb, node, "/metrics").ok()?;
    let label = format!("decision=\"{decision}\"");
    Some(
        metrics
            .lines()
            .filter(|l| l.starts_with("meshless_inbound_decisions_total{") && l.contains(&label))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum(),
    )
}
