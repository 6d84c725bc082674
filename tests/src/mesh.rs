//! A meshless cluster on the testbed: a CA, one state file and one real `meshless agent` process
//! per node (inside the node's netns), with their JSON logs collected in files.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::{wait_for, Pod, Testbed};

pub const TRUST_DOMAIN: &str = "cluster.local";

pub struct Bins {
    pub meshless: PathBuf,
    pub testbin: PathBuf,
}

pub struct Mesh {
    pub ca_dir: PathBuf,
    /// Agent log file of node i at index i-1.
    pub logs: Vec<PathBuf>,
    pub agents: Vec<u32>,
}

impl Mesh {
    /// Creates the CA, writes the state files and starts one agent per node, waiting until every
    /// agent reports ready. `enrolled` chooses the pods in the mesh.
    /// `node1_args` are extra agent arguments for node 1's agent only (e.g. to compare two settings).
    pub fn start(tb: &Testbed, bins: &Bins, enrolled: &dyn Fn(&Pod) -> bool, node1_args: &[&str]) -> Result<Mesh> {
        let ca_dir = tb.dir.join("ca");
        run_ok(
            Command::new(&bins.meshless).args(["ca", "init", "--trust-domain", TRUST_DOMAIN, "--out"]).arg(&ca_dir),
        )?;
        let mut mesh = Mesh { ca_dir, logs: Vec::new(), agents: Vec::new() };
        for node in &tb.nodes {
            let state = tb.state_file(node.index, TRUST_DOMAIN, enrolled)?;
            let log = tb.dir.join(format!("agent-node{}.log", node.index));
            let mut cmd = node.netns.command(&bins.meshless, None)?;
            cmd.args(["agent", "--log-format", "json", "--log", "info,meshless=debug", "--state"])
                .arg(&state)
                .arg("--ca-dir")
                .arg(&mesh.ca_dir)
                .arg("--bpf-dir")
                .arg(tb.bpf_dir(node.index))
                .arg("--run-dir")
                .arg(tb.dir.join(format!("run-node{}", node.index)))
                .args(if node.index == 1 { node1_args } else { &[] })
                // The glibc memcpy trap of this machine kind (shared/PERFORMANCE.md): rustls'
                // receive path is much faster without `rep movsb`.
                .env("GLIBC_TUNABLES", "glibc.cpu.x86_rep_movsb_threshold=4294967295")
                .stdout(Stdio::null())
                .stderr(fs::File::create(&log)?);
            mesh.agents.push(tb.spawn(&mut cmd)?);
            mesh.logs.push(log);
        }
        for (i, log) in mesh.logs.iter().enumerate() {
            let pid = mesh.agents[i];
            let ready = wait_for(Duration::from_secs(20), || {
                if !Path::new(&format!("/proc/{pid}")).exists() || is_zombie(pid) {
                    return Some(false);
                }
                fs::read_to_string(log).ok()?.contains("\"agent ready\"").then_some(true)
            });
            if ready != Some(true) {
                bail!(
                    "agent of node{} did not become ready; its log:\n{}",
                    i + 1,
                    fs::read_to_string(log).unwrap_or_default()
                );
            }
        }
        Ok(mesh)
    }

    /// The JSON log lines of node `i`'s agent.
    pub fn log_lines(&self, node: usize) -> Vec<serde_json::Value> {
        fs::read_to_string(&self.logs[node - 1])
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
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

fn is_zombie(pid: u32) -> bool {
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

/// Waits until something listens on `port` inside `pod` (reads /proc/net/tcp{,6} from inside).
pub fn wait_listening(ns: &crate::Netns, port: u16) -> Result<()> {
    let needle = format!("{port:04X}");
    let ok = wait_for(Duration::from_secs(10), || {
        let out = ns.sh("cat /proc/net/tcp /proc/net/tcp6").ok()?;
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .any(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                // local_address is ADDR:PORT in hex; state 0A is LISTEN.
                f.len() > 3 && f[1].rsplit(':').next() == Some(needle.as_str()) && f[3] == "0A"
            })
            .then_some(())
    });
    if ok.is_none() {
        bail!("nothing listened on port {port} in {} within 10 s", ns.name);
    }
    Ok(())
}
