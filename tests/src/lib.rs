//! Namespace testbed: a small cluster built out of Linux network namespaces on one machine.
//!
//! A [`Testbed`] has N nodes and M pods per node. Each node is a netns joined by a veth to a
//! bridge in a "fabric" netns; each pod is a netns with a veth to a bridge in its node, and its own
//! cgroup v2 below a per-node parent cgroup (the one meshless attaches its programs to). Nodes
//! route the other nodes' pod subnets through the fabric, so pods on different nodes reach each
//! other through their nodes, as in a cluster.
//!
//! Addresses live only inside these namespaces: nodes in 198.18.0.0/24 and fd6d:6c00::/64 (the
//! fabric itself, the control-plane host where the issuer runs, is 198.18.0.1), pods of node `i`
//! in 198.19.i.0/24 and fd6d:6c00:i::/64. No namespace has a route anywhere else, so no
//! traffic can leave the testbed or loopback.
//!
//! Names carry the creating process id (`ml-<pid>-<label>-…`); everything is removed on drop (and
//! so on panic), [`Testbed::new`] first removes leftovers of earlier runs whose process died, and
//! a long-running command interrupted (SIGINT, SIGTERM) removes its own with
//! [`clean_up_on_interrupt`].

use std::fmt::Write as _;
use std::fs::{self, File};
use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

pub mod bpf;
pub mod forward;
pub mod kube;
pub mod mesh;
pub mod pcap;
pub mod python;

const NETNS_DIR: &str = "/run/netns";
/// The port every testbed pod declares for its kubelet probes (the state file's `probePorts`).
pub const PROBE_PORT: u16 = 8080;
const PREFIX: &str = "ml-";
/// Where the testbed mounts cgroup2 when the machine has no cgroup2 mount.
const OWN_CGROUP2_MOUNT: &str = "/run/meshless-testbed/cgroup2";
/// The BPF file system; the testbed mounts it when the machine has none, and says so here.
const BPFFS: &str = "/sys/fs/bpf";
const OWN_BPFFS_MARKER: &str = "/run/meshless-testbed/bpffs-mounted";
/// Directory below the BPF file system that holds every testbed's pinned programs and maps.
const BPF_DIR: &str = "meshless-test";
/// Directory below the cgroup2 root that holds every testbed's cgroups.
const CGROUP_DIR: &str = "meshless-testbed";

/// A network namespace created with `ip netns add`, entered by path.
#[derive(Debug, Clone)]
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn path(&self) -> PathBuf {
        Path::new(NETNS_DIR).join(&self.name)
    }

    /// A command that will run inside this namespace (and, if given, inside `cgroup`).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>, cgroup: Option<&Path>) -> Result<Command> {
        let ns = File::open(self.path()).with_context(|| format!("opening netns {}", self.name))?;
        let procs = match cgroup {
            Some(cg) => Some(
                fs::OpenOptions::new()
                    .write(true)
                    .open(cg.join("cgroup.procs"))
                    .with_context(|| format!("opening {}/cgroup.procs", cg.display()))?,
            ),
            None => None,
        };
        let mut cmd = Command::new(program);
        // SAFETY: the closure runs in the child between fork and exec and only calls the
        // async-signal-safe syscalls write(2) and setns(2) on descriptors opened before the fork,
        // which the closure owns (moved in) and which stay open until exec.
        unsafe {
            cmd.pre_exec(move || {
                if let Some(procs) = &procs {
                    // Writing "0" to cgroup.procs moves the writing process (cgroup v2).
                    if libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Ok(cmd)
    }

    /// Runs a shell snippet inside the namespace and fails with its stderr if it fails.
    pub fn sh(&self, script: &str) -> Result<Output> {
        let out = self.command("sh", None)?.arg("-c").arg(script).output()?;
        if !out.status.success() {
            bail!("in netns {}: `{script}` failed: {}", self.name, String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(out)
    }

    /// `ip -n <ns> <args>`.
    pub fn ip(&self, args: &str) -> Result<()> {
        ip(&format!("-n {} {args}", self.name))
    }
}

#[derive(Debug, Clone)]
pub struct Pod {
    pub name: String,
    /// Index of the node the pod runs on (1-based).
    pub node: usize,
    pub netns: Netns,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
    pub cgroup: PathBuf,
    /// What the state files say of it (a test may change these before the agents start):
    /// namespace `default`, ServiceAccount `sa-<name>-n<node>` and label `app: <name>-n<node>`.
    pub namespace: String,
    pub service_account: String,
    pub app: String,
}

impl Pod {
    /// A command that runs inside the pod: its netns and its cgroup, as a container would.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Result<Command> {
        self.netns.command(program, Some(&self.cgroup))
    }
}

#[derive(Debug, Clone)]
pub struct Node {
    pub name: String,
    /// 1-based.
    pub index: usize,
    pub netns: Netns,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
    /// The parent cgroup of this node's pods: what the node agent attaches its programs to.
    pub cgroup: PathBuf,
    /// The node's "kubelet" cgroup (beside the pods' one): its connections are health probes.
    pub kubelet_cgroup: PathBuf,
    pub pods: Vec<Pod>,
}

impl Node {
    /// A command run by the node's kubelet: in the node's netns and its kubelet cgroup.
    pub fn kubelet_command(&self, program: impl AsRef<std::ffi::OsStr>) -> Result<Command> {
        self.netns.command(program, Some(&self.kubelet_cgroup))
    }
}

/// Processes started through the testbed, killed on drop.
#[derive(Default)]
struct Children(Mutex<Vec<Child>>);

pub struct Testbed {
    pub id: String,
    pub fabric: Netns,
    pub nodes: Vec<Node>,
    pub cgroup_root: PathBuf,
    /// Where this testbed's agents pin their programs and maps (one subdirectory per node).
    pub bpf_root: PathBuf,
    /// A scratch directory for state files, keys and logs; removed on drop unless `KEEP`.
    pub dir: PathBuf,
    children: Children,
}

/// Names and counts of what to build.
pub struct Layout<'a> {
    /// Short label in every name (the test's name); letters, digits and '-'.
    pub label: &'a str,
    /// Number of pods on each node; its length is the number of nodes.
    pub pods: &'a [usize],
}

/// The control-plane host's address, on the fabric's bridge: every node reaches it directly.
/// The agents' admin port (on 127.0.0.1 in each node's netns).
pub const ADMIN_PORT: u16 = 15000;
pub const CONTROL_IPV4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
pub const CONTROL_IPV6: Ipv6Addr = Ipv6Addr::new(0xfd6d, 0x6c00, 0, 0, 0, 0, 0, 1);

pub fn node_ipv4(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 0, 10 + i as u8)
}
pub fn node_ipv6(i: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd6d, 0x6c00, 0, 0, 0, 0, 0, 0x10 + i as u16)
}
pub fn pod_ipv4(node: usize, j: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 19, node as u8, 10 + j as u8)
}
pub fn pod_ipv6(node: usize, j: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd6d, 0x6c00, node as u16, 0, 0, 0, 0, 0x10 + j as u16)
}
fn gw_ipv4(node: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 19, node as u8, 1)
}
fn gw_ipv6(node: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd6d, 0x6c00, node as u16, 0, 0, 0, 0, 1)
}

impl Testbed {
    /// Builds the cluster. Requires root (CAP_NET_ADMIN, CAP_SYS_ADMIN).
    pub fn new(layout: Layout<'_>) -> Result<Testbed> {
        assert!(!layout.pods.is_empty() && layout.pods.len() < 200 && layout.pods.iter().all(|&p| p < 200));
        require_root()?;
        cleanup_leftovers();
        let cgroup2 = cgroup2_mount()?;
        bpffs_mount()?;
        let id = format!("{PREFIX}{}-{}", std::process::id(), layout.label);
        let cgroup_root = cgroup2.join(CGROUP_DIR).join(&id[PREFIX.len()..]);
        let dir = std::env::temp_dir().join(&id);
        let mut tb = Testbed {
            fabric: Netns { name: format!("{id}-fab") },
            id: id.clone(),
            nodes: Vec::new(),
            cgroup_root: cgroup_root.clone(),
            bpf_root: Path::new(BPFFS).join(BPF_DIR).join(&id[PREFIX.len()..]),
            dir: dir.clone(),
            children: Children::default(),
        };
        // From here on, Drop cleans up whatever was made, also when a step fails.
        fs::create_dir_all(&dir)?;
        fs::create_dir_all(&cgroup_root).with_context(|| format!("creating cgroup {}", cgroup_root.display()))?;
        add_netns(&tb.fabric)?;
        tb.fabric.ip("link add br0 type bridge")?;
        // The fabric is also the cluster's control-plane host (the issuer runs there).
        tb.fabric.ip(&format!("addr add {CONTROL_IPV4}/24 dev br0"))?;
        tb.fabric.ip(&format!("addr add {CONTROL_IPV6}/64 dev br0 nodad"))?;
        tb.fabric.ip("link set br0 up")?;
        for (i, &pods) in (1..).zip(layout.pods) {
            let node = tb.add_node(i, pods)?;
            tb.nodes.push(node);
        }
        // Every node routes every other node's pod subnets through the fabric.
        for node in &tb.nodes {
            for other in tb.nodes.iter().filter(|o| o.index != node.index) {
                let k = other.index;
                node.netns.ip(&format!("route add 198.19.{k}.0/24 via {}", node_ipv4(k)))?;
                node.netns.ip(&format!("-6 route add fd6d:6c00:{k:x}::/64 via {}", node_ipv6(k)))?;
            }
        }
        Ok(tb)
    }

    fn add_node(&self, i: usize, pods: usize) -> Result<Node> {
        let netns = Netns { name: format!("{}-n{i}", self.id) };
        add_netns(&netns)?;
        netns.sh("echo 1 > /proc/sys/net/ipv4/ip_forward && \
             echo 1 > /proc/sys/net/ipv6/conf/all/forwarding")?;
        netns.ip(&format!("link add eth0 type veth peer name n{i} netns {}", self.fabric.name))?;
        self.fabric.ip(&format!("link set n{i} master br0 up"))?;
        netns.ip(&format!("addr add {}/24 dev eth0", node_ipv4(i)))?;
        netns.ip(&format!("addr add {}/64 dev eth0 nodad", node_ipv6(i)))?;
        netns.ip("link set eth0 up")?;
        netns.ip("link add cbr0 type bridge")?;
        netns.ip(&format!("addr add {}/24 dev cbr0", gw_ipv4(i)))?;
        netns.ip(&format!("addr add {}/64 dev cbr0 nodad", gw_ipv6(i)))?;
        netns.ip("link set cbr0 up")?;
        let cgroup = self.cgroup_root.join(format!("node{i}"));
        fs::create_dir_all(&cgroup)?;
        let kubelet_cgroup = self.cgroup_root.join(format!("node{i}-kubelet"));
        fs::create_dir_all(&kubelet_cgroup)?;
        let mut node = Node {
            name: format!("node{i}"),
            index: i,
            netns,
            ipv4: node_ipv4(i),
            ipv6: node_ipv6(i),
            cgroup,
            kubelet_cgroup,
            pods: Vec::new(),
        };
        for j in 1..=pods {
            let pod = self.add_pod(&node, j)?;
            node.pods.push(pod);
        }
        Ok(node)
    }

    fn add_pod(&self, node: &Node, j: usize) -> Result<Pod> {
        let i = node.index;
        let netns = Netns { name: format!("{}-n{i}p{j}", self.id) };
        add_netns(&netns)?;
        node.netns.ip(&format!("link add p{j} type veth peer name eth0 netns {}", netns.name))?;
        node.netns.ip(&format!("link set p{j} master cbr0 up"))?;
        let (ipv4, ipv6) = (pod_ipv4(i, j), pod_ipv6(i, j));
        netns.ip(&format!("addr add {ipv4}/24 dev eth0"))?;
        netns.ip(&format!("addr add {ipv6}/64 dev eth0 nodad"))?;
        netns.ip("link set eth0 up")?;
        netns.ip(&format!("route add default via {}", gw_ipv4(i)))?;
        netns.ip(&format!("-6 route add default via {}", gw_ipv6(i)))?;
        let cgroup = node.cgroup.join(format!("pod{j}"));
        fs::create_dir_all(&cgroup)?;
        Ok(Pod {
            name: format!("pod{j}"),
            node: i,
            netns,
            ipv4,
            ipv6,
            cgroup,
            namespace: "default".into(),
            service_account: format!("sa-pod{j}-n{i}"),
            app: format!("pod{j}-n{i}"),
        })
    }

    pub fn node(&self, i: usize) -> &Node {
        &self.nodes[i - 1]
    }

    /// Where node `i`'s agent pins its kernel programs and maps.
    pub fn bpf_dir(&self, i: usize) -> PathBuf {
        self.bpf_root.join(format!("node{i}"))
    }

    pub fn pod(&self, node: usize, j: usize) -> &Pod {
        &self.nodes[node - 1].pods[j - 1]
    }

    pub fn pods(&self) -> impl Iterator<Item = &Pod> {
        self.nodes.iter().flat_map(|n| n.pods.iter())
    }

    /// Starts `cmd` and keeps it, to be killed when the testbed drops. Returns its pid.
    pub fn spawn(&self, cmd: &mut Command) -> Result<u32> {
        let child = cmd.spawn().with_context(|| format!("starting {cmd:?}"))?;
        let pid = child.id();
        self.children.0.lock().unwrap().push(child);
        Ok(pid)
    }

    /// Sends `signal` to a process started with [`Testbed::spawn`], without waiting.
    pub fn signal(&self, pid: u32, signal: i32) {
        if self.children.0.lock().unwrap().iter().any(|c| c.id() == pid) {
            // SAFETY: kill(2) on a child we started and have not reaped (it is still listed).
            unsafe {
                libc::kill(pid as i32, signal);
            }
        }
    }

    /// Waits up to `timeout` for a process started with [`Testbed::spawn`] to exit; its status.
    pub fn wait_exit(&self, pid: u32, timeout: Duration) -> Option<std::process::ExitStatus> {
        wait_for(timeout, || {
            let mut children = self.children.0.lock().unwrap();
            let pos = children.iter().position(|c| c.id() == pid)?;
            let status = children[pos].try_wait().ok()??;
            // Reaped by try_wait; the testbed no longer needs to stop it.
            drop(children.remove(pos));
            Some(status)
        })
    }

    /// Sends SIGTERM to a process started with [`Testbed::spawn`] and waits (bounded) for it.
    pub fn stop(&self, pid: u32) {
        let mut children = self.children.0.lock().unwrap();
        if let Some(pos) = children.iter().position(|c| c.id() == pid) {
            let mut child = children.remove(pos);
            terminate(&mut child);
        }
    }

    /// Writes the embedded-mode state file for `node` (see the README for the format).
    /// `enrolled` says which pods are in the mesh (all others are listed as not enrolled).
    pub fn state_file(&self, node: usize, trust_domain: &str, enrolled: &dyn Fn(&Pod) -> bool) -> Result<PathBuf> {
        let pods: Vec<(&Pod, bool)> = self.pods().map(|p| (p, enrolled(p))).collect();
        let path = self.dir.join(format!("state-node{node}.yaml"));
        fs::write(&path, self.state_yaml(node, trust_domain, &pods)?)?;
        Ok(path)
    }

    /// The state file for `node` listing `pods` (each with whether it is in the mesh).
    pub fn state_yaml(&self, node: usize, trust_domain: &str, pods: &[(&Pod, bool)]) -> Result<String> {
        let mut y = String::new();
        writeln!(y, "trustDomain: {trust_domain}")?;
        writeln!(y, "node: node{node}")?;
        writeln!(y, "cgroupParent: {}", self.node(node).cgroup.display())?;
        writeln!(y, "pods:")?;
        for (pod, enrolled) in pods {
            writeln!(y, "  - name: {}-n{}", pod.name, pod.node)?;
            writeln!(y, "    namespace: {}", pod.namespace)?;
            writeln!(y, "    serviceAccount: {}", pod.service_account)?;
            writeln!(y, "    node: node{}", pod.node)?;
            writeln!(y, "    ips: [\"{}\", \"{}\"]", pod.ipv4, pod.ipv6)?;
            writeln!(y, "    netns: {}", pod.netns.path().display())?;
            writeln!(y, "    cgroup: {}", pod.cgroup.display())?;
            writeln!(y, "    enrolled: {enrolled}")?;
            writeln!(y, "    labels: {{app: {}}}", pod.app)?;
            // Every testbed pod declares its health on 8080, as a pod spec's probes would.
            writeln!(y, "    probePorts: [{PROBE_PORT}]")?;
        }
        Ok(y)
    }

    /// The SPIFFE ID the state file gives `pod`.
    pub fn spiffe_id(&self, trust_domain: &str, pod: &Pod) -> String {
        format!("spiffe://{trust_domain}/ns/{}/sa/{}", pod.namespace, pod.service_account)
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        for mut child in self.children.0.lock().map(|mut c| std::mem::take(&mut *c)).unwrap_or_default() {
            terminate(&mut child);
        }
        for node in &self.nodes {
            for pod in &node.pods {
                del_netns(&pod.netns);
            }
            del_netns(&node.netns);
        }
        del_netns(&self.fabric);
        // Unpinning detaches the programs the agents left attached (as they must, by design).
        let _ = fs::remove_dir_all(&self.bpf_root);
        release_bpffs();
        remove_cgroup_tree(&self.cgroup_root);
        // The shared parent goes too once the last testbed has left it (fails harmlessly if not).
        if let Some(parent) = self.cgroup_root.parent() {
            let last = fs::remove_dir(parent).is_ok();
            // …and so does the cgroup2 mount the testbed made on a machine that had none.
            if last && parent.starts_with(OWN_CGROUP2_MOUNT) {
                let _ = Command::new("umount").arg(OWN_CGROUP2_MOUNT).status();
            }
        }
        if std::env::var_os("MESHLESS_TESTBED_KEEP_DIR").is_none() {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

fn terminate(child: &mut Child) {
    // SAFETY: kill(2) with a pid we started and have not reaped yet (it is still our child).
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

pub fn ip(args: &str) -> Result<()> {
    let out = Command::new("ip")
        .args(args.split_whitespace())
        .stdin(Stdio::null())
        .output()
        .context("running `ip` (is iproute2 installed? `cargo xtask setup` installs it)")?;
    if !out.status.success() {
        bail!("`ip {args}` failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

fn add_netns(ns: &Netns) -> Result<()> {
    ip(&format!("netns add {}", ns.name))?;
    // No duplicate address detection: addresses are usable at once (we own the whole link).
    ns.sh("echo 0 > /proc/sys/net/ipv6/conf/default/accept_dad && \
         echo 0 > /proc/sys/net/ipv6/conf/all/accept_dad && ip link set lo up")?;
    Ok(())
}

/// Kills every process still inside the namespace, then deletes it.
fn del_netns(ns: &Netns) {
    if let Ok(out) = Command::new("ip").args(["netns", "pids", &ns.name]).output() {
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            if let Ok(pid) = pid.parse::<i32>() {
                // SAFETY: plain kill(2) on a pid that `ip netns pids` reported inside our namespace.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
        }
    }
    let _ = Command::new("ip").args(["netns", "del", &ns.name]).stderr(Stdio::null()).status();
}

/// Removes a cgroup directory tree, killing whatever still runs in it.
fn remove_cgroup_tree(path: &Path) {
    if !path.exists() {
        return;
    }
    let _ = fs::write(path.join("cgroup.kill"), "1");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut dirs = Vec::new();
        collect_dirs(path, &mut dirs);
        // Deepest first.
        dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
        let all_gone = dirs.iter().all(|d| fs::remove_dir(d).is_ok() || !d.exists());
        if all_gone || Instant::now() > deadline {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn collect_dirs(path: &Path, out: &mut Vec<PathBuf>) {
    out.push(path.to_path_buf());
    if let Ok(rd) = fs::read_dir(path) {
        for e in rd.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                collect_dirs(&e.path(), out);
            }
        }
    }
}

/// Removes namespaces and cgroups of earlier testbeds whose creating process is gone.
fn cleanup_leftovers() {
    remove_testbeds(&|pid| !Path::new(&format!("/proc/{pid}")).exists());
}

/// Makes SIGINT and SIGTERM end this process cleanly, as a long-running command (the bench) must:
/// every process it started (agents, apps, capture) is killed, every testbed it made is removed
/// (namespaces, cgroups, pinned programs, files), then it exits with status 130.
pub fn clean_up_on_interrupt() -> Result<()> {
    ctrlc::set_handler(|| abandon()).context("installing the SIGINT/SIGTERM handler")
}

/// Ends this process at once, leaving nothing behind: kills every process it started, removes
/// every testbed it made, exits with status 130 (what [`clean_up_on_interrupt`] does on a signal).
pub fn abandon() -> ! {
    eprintln!("interrupted: stopping what this run started and removing its testbeds");
    let me = std::process::id();
    kill_descendants(me);
    remove_testbeds(&|pid| pid == me);
    std::process::exit(130);
}

/// Kills every process below `root` (children first found, then theirs) and waits (5 s at most)
/// until they are gone, so their cgroups can be removed.
fn kill_descendants(root: u32) {
    let parent_of = |pid: u32| -> Option<u32> {
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // `pid (comm) state ppid …`: comm may hold spaces and parentheses; the last ')' ends it.
        stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse().ok()
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let all: Vec<u32> = fs::read_dir("/proc")
            .map(|rd| rd.flatten().filter_map(|e| e.file_name().to_str()?.parse().ok()).collect())
            .unwrap_or_default();
        let mut below = vec![root];
        let mut grew = true;
        while grew {
            grew = false;
            for &pid in &all {
                if !below.contains(&pid) && parent_of(pid).is_some_and(|p| below.contains(&p)) {
                    below.push(pid);
                    grew = true;
                }
            }
        }
        below.retain(|&p| {
            p != root
                && !fs::read_to_string(format!("/proc/{p}/stat"))
                    .is_ok_and(|s| s.rsplit_once(')').is_some_and(|(_, r)| r.trim_start().starts_with('Z')))
        });
        if below.is_empty() || Instant::now() > deadline {
            return;
        }
        for &pid in &below {
            // SAFETY: kill(2) on a process below this one; at worst it is already gone (ESRCH).
            unsafe {
                libc::kill(pid as i32, libc::SIGKILL);
            }
        }
        // Reap the direct children (zombies hold no cgroup, but keep the table tidy).
        // SAFETY: waitpid(2) with WNOHANG on any child of this process; never blocks.
        while unsafe { libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) } > 0 {}
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Removes the namespaces, cgroups, pinned programs and files of the testbeds whose creating
/// process `pick` chooses.
fn remove_testbeds(pick: &dyn Fn(u32) -> bool) {
    let dead = |name: &str| -> bool {
        let pid = name.strip_prefix(PREFIX).and_then(|r| r.split('-').next()).and_then(|p| p.parse::<u32>().ok());
        pid.is_some_and(pick)
    };
    if let Ok(rd) = fs::read_dir(NETNS_DIR) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(PREFIX) && dead(&name) {
                del_netns(&Netns { name });
            }
        }
    }
    if let Ok(root) = cgroup2_mount() {
        if let Ok(rd) = fs::read_dir(root.join(CGROUP_DIR)) {
            for e in rd.flatten() {
                let name = format!("{PREFIX}{}", e.file_name().to_string_lossy());
                if dead(&name) {
                    remove_cgroup_tree(&e.path());
                }
            }
        }
    }
    if let Ok(rd) = fs::read_dir(Path::new(BPFFS).join(BPF_DIR)) {
        for e in rd.flatten() {
            let name = format!("{PREFIX}{}", e.file_name().to_string_lossy());
            if dead(&name) {
                let _ = fs::remove_dir_all(e.path());
            }
        }
    }
    if let Ok(rd) = fs::read_dir(std::env::temp_dir()) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(PREFIX) && dead(&name) {
                let _ = fs::remove_dir_all(e.path());
            }
        }
    }
}

/// The cgroup2 mount point, mounting cgroup2 if the machine has none.
pub fn cgroup2_mount() -> Result<PathBuf> {
    let mounts = fs::read_to_string("/proc/self/mounts")?;
    if let Some(p) = mounts
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.len() > 2 && f[2] == "cgroup2")
        .map(|f| PathBuf::from(f[1]))
    {
        return Ok(p);
    }
    fs::create_dir_all(OWN_CGROUP2_MOUNT)?;
    let out = Command::new("mount").args(["-t", "cgroup2", "none", OWN_CGROUP2_MOUNT]).output()?;
    if !out.status.success() {
        bail!("mounting cgroup2 at {OWN_CGROUP2_MOUNT} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(PathBuf::from(OWN_CGROUP2_MOUNT))
}

/// Mounts the BPF file system at /sys/fs/bpf if the machine has none there (and leaves a marker
/// so that the last testbed unmounts it again).
fn bpffs_mount() -> Result<()> {
    let mounts = fs::read_to_string("/proc/self/mounts")?;
    if mounts.lines().any(|l| l.split_whitespace().nth(1) == Some(BPFFS)) {
        return Ok(());
    }
    let out = Command::new("mount").args(["-t", "bpf", "bpf", BPFFS]).output()?;
    if !out.status.success() {
        bail!("mounting a BPF file system at {BPFFS} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    fs::create_dir_all(Path::new(OWN_BPFFS_MARKER).parent().expect("marker has a parent"))?;
    fs::write(OWN_BPFFS_MARKER, "")?;
    Ok(())
}

/// Removes the testbeds' BPF directory once empty, and unmounts the BPF file system if a testbed
/// mounted it and nothing else lives in it.
fn release_bpffs() {
    let dir = Path::new(BPFFS).join(BPF_DIR);
    if fs::remove_dir(&dir).is_err() && dir.exists() {
        return; // another testbed still uses it
    }
    let empty = fs::read_dir(BPFFS).map(|mut d| d.next().is_none()).unwrap_or(false);
    if empty && Path::new(OWN_BPFFS_MARKER).exists() {
        let _ = Command::new("umount").arg(BPFFS).status();
        let _ = fs::remove_file(OWN_BPFFS_MARKER);
    }
}

fn require_root() -> Result<()> {
    // SAFETY: geteuid(2) has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(anyhow!("the namespace testbed needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN, CAP_BPF): run as root"));
    }
    Ok(())
}

/// Whether privileged tests must run: under `CI=true` a missing capability is a failure.
pub fn ci() -> bool {
    std::env::var("CI").map(|v| v == "true" || v == "1").unwrap_or(false)
}

/// Polls `f` until it returns `Some` or `timeout` passes.
pub fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// Formats `ip:port` with brackets for IPv6.
pub fn sockaddr(ip: IpAddr, port: u16) -> String {
    std::net::SocketAddr::new(ip, port).to_string()
}

/// Appends a line to a file (used to collect logs of processes).
pub fn append(path: &Path, line: &str) -> Result<()> {
    let mut f = fs::OpenOptions::new().create(true).append(true).open(path)?;
    writeln!(f, "{line}")?;
    Ok(())
}
