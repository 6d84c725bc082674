//! A real Kubernetes control plane on the testbed: etcd and kube-apiserver v1.20 (built by
//! `cargo xtask`, see `xtask/src/kube.rs`) on the control-plane host (the fabric netns, where every
//! node reaches it at 198.18.0.1), with its own CA and ServiceAccount signing key. There is no
//! kubelet, scheduler or controller: the test plays them — it creates Pod objects with
//! `spec.nodeName`, runs the real `meshless-cni` binary as the container runtime would, and
//! reports `status.podIP` — and it runs the issuer and one agent per node in Kubernetes mode, each
//! with its own ServiceAccount token from the TokenRequest API.

use std::fs;
use std::io::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::mesh::{is_zombie, json_lines, run_ok, Bins, ISSUER_PORT, TRUST_DOMAIN};
use crate::{wait_for, Pod, Testbed, CONTROL_IPV4};

const APISERVER_PORT: u16 = 6443;
/// The agents' namespace and ServiceAccounts, as `deploy/` creates them.
pub const SYSTEM_NS: &str = "meshless-system";

/// The policy of the Kubernetes tests and `demo --kube`: only shop's frontend ServiceAccount may
/// call shop's backend pods, on 8080.
pub const ALLOW_FRONTEND: &str = "apiVersion: meshless.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: backend-allow-frontend, namespace: shop}
spec:
  selector: {matchLabels: {app: backend}}
  action: ALLOW
  rules:
  - from: [{source: {principals: [cluster.local/ns/shop/sa/frontend]}}]
    to: [{operation: {ports: [\"8080\"]}}]
";

/// The control plane's binaries (`cargo xtask test` passes them in the environment).
#[derive(Clone)]
pub struct KubeBins {
    pub apiserver: PathBuf,
    pub etcd: PathBuf,
    pub kubectl: PathBuf,
}

impl KubeBins {
    pub fn from_env() -> Option<KubeBins> {
        let var = |n: &str| std::env::var_os(n).map(PathBuf::from);
        Some(KubeBins {
            apiserver: var("MESHLESS_KUBE_APISERVER")?,
            etcd: var("MESHLESS_ETCD")?,
            kubectl: var("MESHLESS_KUBECTL")?,
        })
    }
}

pub struct ApiServer {
    pub dir: PathBuf,
    pub url: String,
    /// The CA of the API server's serving certificate.
    pub ca: PathBuf,
    /// kubeconfig of the cluster admin (system:masters).
    pub admin: PathBuf,
    admin_token: String,
    bins: KubeBins,
    args: Vec<String>,
    pub pid: u32,
    log: PathBuf,
    starts: usize,
}

impl ApiServer {
    /// Starts etcd and the API server in the fabric netns and waits until `/readyz` says ok.
    pub fn start(tb: &Testbed, bins: KubeBins) -> Result<ApiServer> {
        let dir = tb.dir.join("kube");
        fs::create_dir_all(&dir)?;
        // The serving certificate (for the control-plane address) and the ServiceAccount key.
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(rcgen::DnType::CommonName, "meshless-test-kube-ca");
        let ca_key = rcgen::KeyPair::generate()?;
        let ca_cert = ca_params.self_signed(&ca_key)?;
        let mut srv =
            rcgen::CertificateParams::new(vec!["kubernetes.default.svc".to_string(), "localhost".to_string()])?;
        srv.subject_alt_names.push(rcgen::SanType::IpAddress(CONTROL_IPV4.into()));
        let srv_key = rcgen::KeyPair::generate()?;
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let srv_cert = srv.signed_by(&srv_key, &issuer)?;
        let ca = dir.join("ca.pem");
        fs::write(&ca, ca_cert.pem())?;
        fs::write(dir.join("serving.pem"), srv_cert.pem())?;
        fs::write(dir.join("serving-key.pem"), srv_key.serialize_pem())?;
        let sa_key = rcgen::KeyPair::generate()?;
        fs::write(dir.join("sa-key.pem"), sa_key.serialize_pem())?;
        fs::write(dir.join("sa.pem"), sa_key.public_key_pem())?;
        let admin_token = format!("admin-{}", std::process::id());
        fs::write(dir.join("tokens.csv"), format!("{admin_token},admin,admin-uid,\"system:masters\"\n"))?;

        let etcd_log = fs::File::create(dir.join("etcd.log"))?;
        let mut etcd = tb.fabric.command(&bins.etcd, None)?;
        etcd.arg("--data-dir")
            .arg(dir.join("etcd"))
            .args(["--name", "default", "--listen-client-urls", "http://127.0.0.1:2379"])
            .args(["--advertise-client-urls", "http://127.0.0.1:2379", "--listen-peer-urls", "http://127.0.0.1:2380"])
            .args(["--initial-advertise-peer-urls", "http://127.0.0.1:2380"])
            .args(["--initial-cluster", "default=http://127.0.0.1:2380", "--log-level", "warn"])
            .stdout(Stdio::null())
            .stderr(etcd_log);
        tb.spawn(&mut etcd)?;
        let p = |f: &str| dir.join(f).display().to_string();
        let args = vec![
            "--etcd-servers=http://127.0.0.1:2379".to_string(),
            format!("--bind-address={CONTROL_IPV4}"),
            format!("--advertise-address={CONTROL_IPV4}"),
            format!("--secure-port={APISERVER_PORT}"),
            "--insecure-port=0".into(),
            format!("--cert-dir={}", p("certs")),
            format!("--tls-cert-file={}", p("serving.pem")),
            format!("--tls-private-key-file={}", p("serving-key.pem")),
            format!("--token-auth-file={}", p("tokens.csv")),
            "--authorization-mode=RBAC".into(),
            "--service-account-issuer=https://kubernetes.default.svc".into(),
            format!("--service-account-key-file={}", p("sa.pem")),
            format!("--service-account-signing-key-file={}", p("sa-key.pem")),
            // Inside the testbed's own block, held by no host: a Service's virtual IP is never
            // an address beyond the testbed.
            "--service-cluster-ip-range=198.19.200.0/24".into(),
            "--allow-privileged=true".into(),
            "--disable-admission-plugins=ServiceAccount".into(),
            "--endpoint-reconciler-type=none".into(),
        ];
        let mut api = ApiServer {
            url: format!("https://{CONTROL_IPV4}:{APISERVER_PORT}"),
            admin: dir.join("admin.kubeconfig"),
            log: dir.join("apiserver.log"),
            ca,
            dir,
            admin_token,
            bins,
            args,
            pid: 0,
            starts: 0,
        };
        api.admin = api.kubeconfig("admin", &api.admin_token.clone())?;
        api.launch(tb)?;
        Ok(api)
    }

    fn launch(&mut self, tb: &Testbed) -> Result<()> {
        self.starts += 1;
        let log = fs::OpenOptions::new().create(true).append(true).open(&self.log)?;
        let mut cmd = tb.fabric.command(&self.bins.apiserver, None)?;
        cmd.args(&self.args).stdout(Stdio::null()).stderr(log);
        self.pid = tb.spawn(&mut cmd)?;
        let pid = self.pid;
        let ready = wait_for(Duration::from_secs(60), || {
            if !Path::new(&format!("/proc/{pid}")).exists() || is_zombie(pid) {
                return Some(false);
            }
            let out = self.curl(tb, "GET", "/readyz", None).ok()?;
            (out.trim() == "ok").then_some(true)
        });
        if ready != Some(true) {
            let log = fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            bail!(
                "kube-apiserver did not become ready; its log ends:\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        Ok(())
    }

    /// Stops the API server (etcd keeps the data) and starts it again; returns how long it was away.
    pub fn restart(&mut self, tb: &Testbed, down_for: Duration) -> Result<Duration> {
        let t = Instant::now();
        tb.stop(self.pid);
        std::thread::sleep(down_for);
        self.launch(tb)?;
        Ok(t.elapsed())
    }

    /// A kubeconfig for `token`, written under the cluster's directory.
    pub fn kubeconfig(&self, name: &str, token: &str) -> Result<PathBuf> {
        use base64::Engine as _;
        let ca = fs::read(&self.ca)?;
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {}\n    \
             certificate-authority-data: {}\nusers:\n- name: {name}\n  user:\n    token: {token}\n\
             contexts:\n- name: test\n  context: {{cluster: test, user: {name}}}\ncurrent-context: test\n",
            self.url,
            base64::engine::general_purpose::STANDARD.encode(&ca)
        );
        let path = self.dir.join(format!("{name}.kubeconfig"));
        fs::write(&path, text)?;
        Ok(path)
    }

    /// `curl` against the API server from the control-plane host, as the admin.
    fn curl(&self, tb: &Testbed, method: &str, path: &str, body: Option<&str>) -> Result<String> {
        let mut cmd = tb.fabric.command("curl", None)?;
        cmd.args(["-sS", "--max-time", "10", "-X", method, "--cacert"])
            .arg(&self.ca)
            .args(["-H", &format!("Authorization: Bearer {}", self.admin_token)]);
        if let Some(b) = body {
            let ctype = if method == "PATCH" { "application/merge-patch+json" } else { "application/json" };
            cmd.args(["-H", &format!("Content-Type: {ctype}"), "--data-binary", b]);
        }
        cmd.arg(format!("{}{path}", self.url));
        let out = cmd.output()?;
        if !out.status.success() {
            bail!("curl {method} {path}: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// An API call as the admin; fails on a Status of failure.
    pub fn api(&self, tb: &Testbed, method: &str, path: &str, body: Option<Value>) -> Result<Value> {
        let text = self.curl(tb, method, path, body.map(|b| b.to_string()).as_deref())?;
        let v: Value = serde_json::from_str(&text).with_context(|| format!("{method} {path}: not JSON: {text}"))?;
        if v["kind"] == "Status" && v["status"] == "Failure" {
            bail!("{method} {path}: {}", v["message"]);
        }
        Ok(v)
    }

    pub fn kubectl_path(&self) -> &Path {
        &self.bins.kubectl
    }

    /// kubectl 1.20 on the control-plane host with `kubeconfig` (the admin's when `None`).
    pub fn kubectl(
        &self,
        tb: &Testbed,
        kubeconfig: Option<&Path>,
        args: &[&str],
        stdin: Option<&str>,
    ) -> Result<Output> {
        let mut cmd = tb.fabric.command(&self.bins.kubectl, None)?;
        cmd.arg("--kubeconfig").arg(kubeconfig.unwrap_or(&self.admin)).args(args);
        cmd.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn()?;
        if let Some(s) = stdin {
            child.stdin.take().expect("piped").write_all(s.as_bytes())?;
        }
        Ok(child.wait_with_output()?)
    }

    /// As [`ApiServer::kubectl`] as the admin, failing with kubectl's stderr.
    pub fn kubectl_ok(&self, tb: &Testbed, args: &[&str], stdin: Option<&str>) -> Result<String> {
        let out = self.kubectl(tb, None, args, stdin)?;
        if !out.status.success() {
            bail!("kubectl {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    pub fn create_namespace(&self, tb: &Testbed, name: &str, mode: Option<&str>) -> Result<()> {
        let labels = match mode {
            Some(m) => json!({ "meshless.io/mode": m }),
            None => json!({}),
        };
        self.api(
            tb,
            "POST",
            "/api/v1/namespaces",
            Some(json!({"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name, "labels": labels}})),
        )?;
        Ok(())
    }

    pub fn create_service_account(&self, tb: &Testbed, ns: &str, name: &str) -> Result<()> {
        let path = format!("/api/v1/namespaces/{ns}/serviceaccounts");
        match self.api(
            tb,
            "POST",
            &path,
            Some(json!({"apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": {"name": name, "namespace": ns}})),
        ) {
            Err(e) if e.to_string().contains("already exists") => Ok(()),
            r => r.map(drop),
        }
    }

    /// Creates a Pod object scheduled on `node` (what the scheduler would leave for the kubelet);
    /// returns its UID.
    pub fn create_pod(
        &self,
        tb: &Testbed,
        ns: &str,
        name: &str,
        sa: &str,
        node: &str,
        labels: Value,
    ) -> Result<String> {
        self.create_service_account(tb, ns, sa)?;
        let pod = self.api(
            tb,
            "POST",
            &format!("/api/v1/namespaces/{ns}/pods"),
            Some(json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "namespace": ns, "labels": labels},
                "spec": {"nodeName": node, "serviceAccountName": sa,
                         "containers": [{"name": "app", "image": "meshless-test/none"}]}
            })),
        )?;
        Ok(pod["metadata"]["uid"].as_str().context("pod without uid")?.to_string())
    }

    /// What the kubelet reports once the sandbox is up: Running, with the pod's IPs.
    pub fn set_pod_ips(&self, tb: &Testbed, ns: &str, name: &str, ips: &[IpAddr]) -> Result<()> {
        let ips: Vec<Value> = ips.iter().map(|ip| json!({"ip": ip.to_string()})).collect();
        self.api(
            tb,
            "PATCH",
            &format!("/api/v1/namespaces/{ns}/pods/{name}/status"),
            Some(json!({
                "status": {"phase": "Running", "podIP": ips[0]["ip"], "podIPs": ips}
            })),
        )?;
        Ok(())
    }

    /// Service `name` in `ns` with virtual IP `vip` and port 80 (`http`) → 8080, and its
    /// EndpointSlice (discovery.k8s.io/v1beta1, as the endpoint controller of 1.20 writes it)
    /// naming `pod` at `ip`. No controller runs here: the test plays it.
    pub fn create_service(&self, tb: &Testbed, ns: &str, name: &str, vip: &str, pod: &str, ip: IpAddr) -> Result<()> {
        let service = json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
            "spec": {"clusterIP": vip, "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}});
        self.api(tb, "POST", &format!("/api/v1/namespaces/{ns}/services"), Some(service))?;
        let slice = json!({"apiVersion": "discovery.k8s.io/v1beta1", "kind": "EndpointSlice",
            "metadata": {"name": format!("{name}-abc12"), "labels": {"kubernetes.io/service-name": name}},
            "addressType": if ip.is_ipv4() { "IPv4" } else { "IPv6" },
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": [ip.to_string()], "conditions": {"ready": true},
                           "targetRef": {"kind": "Pod", "namespace": ns, "name": pod}}]});
        self.api(tb, "POST", &format!("/apis/discovery.k8s.io/v1beta1/namespaces/{ns}/endpointslices"), Some(slice))?;
        Ok(())
    }

    pub fn delete_pod(&self, tb: &Testbed, ns: &str, name: &str) -> Result<()> {
        self.api(tb, "DELETE", &format!("/api/v1/namespaces/{ns}/pods/{name}?gracePeriodSeconds=0"), None)?;
        Ok(())
    }

    /// A ServiceAccount token from the TokenRequest API (what the kubelet projects into a pod),
    /// bound to pod `bound` (name, uid) when given.
    pub fn token(
        &self,
        tb: &Testbed,
        ns: &str,
        sa: &str,
        audience: Option<&str>,
        bound: Option<(&str, &str)>,
    ) -> Result<String> {
        let mut spec = json!({"expirationSeconds": 3600});
        if let Some(a) = audience {
            spec["audiences"] = json!([a]);
        }
        if let Some((name, uid)) = bound {
            spec["boundObjectRef"] = json!({"apiVersion": "v1", "kind": "Pod", "name": name, "uid": uid});
        }
        let v = self.api(
            tb,
            "POST",
            &format!("/api/v1/namespaces/{ns}/serviceaccounts/{sa}/token"),
            Some(json!({
                "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec
            })),
        )?;
        Ok(v["status"]["token"].as_str().context("TokenRequest without a token")?.to_string())
    }
}

/// Plays the container runtime: runs the real `meshless-cni` binary as the CNI spec says
/// (environment + network configuration with `prevResult` on stdin).
pub fn run_cni(
    cni: &Path,
    command: &str,
    state_dir: &Path,
    pod: &Pod,
    ns: &str,
    name: &str,
    uid: &str,
) -> Result<Output> {
    let container_id = format!("sandbox-{ns}-{name}");
    let conf = json!({
        "cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "meshless-cni",
        "stateDir": state_dir,
        "prevResult": {"cniVersion": "1.0.0",
            "interfaces": [{"name": "eth0", "sandbox": pod.netns.path()}],
            "ips": [{"address": format!("{}/24", pod.ipv4), "interface": 0},
                    {"address": format!("{}/64", pod.ipv6), "interface": 0}]}
    });
    let mut child = Command::new(cni)
        .env_clear()
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", &container_id)
        .env("CNI_NETNS", pod.netns.path())
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/opt/cni/bin")
        .env("CNI_ARGS", format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={ns};K8S_POD_NAME={name};K8S_POD_INFRA_CONTAINER_ID={container_id};K8S_POD_UID={uid}"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    child.stdin.take().expect("piped").write_all(conf.to_string().as_bytes())?;
    Ok(child.wait_with_output()?)
}

/// The issuer and the agents in Kubernetes mode, each with its own ServiceAccount token.
pub struct KubeMesh {
    pub ca_dir: PathBuf,
    pub bundle: PathBuf,
    pub issuer: u32,
    pub issuer_log: PathBuf,
    pub agents: Vec<u32>,
    pub logs: Vec<PathBuf>,
    /// Agent pod UIDs (the tokens are bound to them).
    pub agent_pods: Vec<String>,
    starts: Vec<usize>,
}

impl KubeMesh {
    /// Assumes `deploy/` is applied (namespace, ServiceAccounts, RBAC, CRDs). Creates the CA,
    /// the agent pods' objects, and starts the issuer, then one agent per node.
    pub fn start(tb: &Testbed, bins: &Bins, api: &ApiServer) -> Result<KubeMesh> {
        let ca_dir = tb.dir.join("ca");
        run_ok(
            Command::new(&bins.meshless).args(["ca", "init", "--trust-domain", TRUST_DOMAIN, "--out"]).arg(&ca_dir),
        )?;
        let bundle = tb.dir.join("bundle.pem");
        fs::copy(ca_dir.join("bundle.pem"), &bundle)?;
        let issuer_token = api.token(tb, SYSTEM_NS, "meshless-issuer", None, None)?;
        let issuer_kc = api.kubeconfig("issuer", &issuer_token)?;
        let issuer_log = tb.dir.join("issuer.log");
        let mut cmd = tb.fabric.command(&bins.meshless, None)?;
        cmd.args(["issuer", "--kube", "--node-auth", "tokens", "--log-format", "json", "--listen"])
            .arg(format!("{CONTROL_IPV4}:{ISSUER_PORT}"))
            .arg("--ca-dir")
            .arg(&ca_dir)
            .arg("--kubeconfig")
            .arg(&issuer_kc)
            .stdout(Stdio::null())
            .stderr(fs::File::create(&issuer_log)?);
        let issuer = tb.spawn(&mut cmd)?;
        wait_line(issuer, &issuer_log, "issuer ready", Duration::from_secs(30))?;
        let mut mesh = KubeMesh {
            ca_dir,
            bundle,
            issuer,
            issuer_log,
            agents: Vec::new(),
            logs: Vec::new(),
            agent_pods: Vec::new(),
            starts: vec![0; tb.nodes.len()],
        };
        for node in &tb.nodes {
            // The DaemonSet's pod on this node, as the kubelet would run it.
            let name = format!("meshless-agent-{}", node.name);
            let uid =
                api.create_pod(tb, SYSTEM_NS, &name, "meshless-agent", &node.name, json!({"app": "meshless-agent"}))?;
            // It runs (host network: the node's address); the issuer accepts only a running agent pod's token.
            api.set_pod_ips(tb, SYSTEM_NS, &name, &[node.ipv4.into()])?;
            mesh.agent_pods.push(uid);
            mesh.agents.push(0);
            mesh.logs.push(PathBuf::new());
        }
        for node in &tb.nodes {
            mesh.spawn_agent(tb, bins, api, node.index)?;
        }
        Ok(mesh)
    }

    /// `meshless-cni`'s state directory of node `i`.
    pub fn cni_dir(tb: &Testbed, i: usize) -> PathBuf {
        tb.dir.join(format!("cni-node{i}"))
    }

    /// Starts node `i`'s agent (again) and waits until it is ready.
    pub fn spawn_agent(&mut self, tb: &Testbed, bins: &Bins, api: &ApiServer, i: usize) -> Result<u32> {
        let node = tb.node(i);
        let name = format!("meshless-agent-{}", node.name);
        let api_token = api.token(tb, SYSTEM_NS, "meshless-agent", None, Some((&name, &self.agent_pods[i - 1])))?;
        let kubeconfig = api.kubeconfig(&format!("agent-{}", node.name), &api_token)?;
        let issuer_token = api.token(
            tb,
            SYSTEM_NS,
            "meshless-agent",
            Some("meshless-issuer"),
            Some((&name, &self.agent_pods[i - 1])),
        )?;
        let token_file = tb.dir.join(format!("issuer-token-node{i}"));
        fs::write(&token_file, issuer_token)?;
        self.starts[i - 1] += 1;
        let log = tb.dir.join(format!("agent-node{i}-{}.log", self.starts[i - 1]));
        let mut cmd = node.netns.command(&bins.meshless, None)?;
        cmd.args([
            "agent",
            "--kube",
            "--log-format",
            "json",
            "--log",
            "info,meshless=debug",
            "--node-name",
            &node.name,
        ])
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .arg("--cgroup-parent")
        .arg(&node.cgroup)
        .arg("--cni-dir")
        .arg(KubeMesh::cni_dir(tb, i))
        .arg("--issuer")
        .arg(format!("{CONTROL_IPV4}:{ISSUER_PORT}"))
        .arg("--issuer-token")
        .arg(&token_file)
        .arg("--bundle")
        .arg(&self.bundle)
        .arg("--bpf-dir")
        .arg(tb.bpf_dir(i))
        .arg("--run-dir")
        .arg(tb.dir.join(format!("run-node{i}")))
        .arg("--probe-cgroup")
        .arg(&node.kubelet_cgroup)
        .env("GLIBC_TUNABLES", "glibc.cpu.x86_rep_movsb_threshold=4294967295")
        .stdout(Stdio::null())
        .stderr(fs::File::create(&log)?);
        let pid = tb.spawn(&mut cmd)?;
        self.agents[i - 1] = pid;
        self.logs[i - 1] = log.clone();
        wait_line(pid, &log, "agent ready", Duration::from_secs(60))?;
        Ok(pid)
    }

    pub fn log_lines(&self, node: usize) -> Vec<Value> {
        json_lines(&self.logs[node - 1])
    }

    pub fn issuer_lines(&self) -> Vec<Value> {
        json_lines(&self.issuer_log)
    }

    /// Waits (bounded) for a line of node `node`'s agent with `message` that satisfies `pred`.
    pub fn wait_log(
        &self,
        node: usize,
        message: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Option<Value> {
        wait_for(timeout, || self.log_lines(node).into_iter().find(|l| l["message"] == message && pred(l)))
    }

    /// The last lines of node `node`'s agent log, for failure messages.
    pub fn log_tail(&self, node: usize) -> String {
        tail(&self.logs[node - 1])
    }

    pub fn issuer_tail(&self) -> String {
        tail(&self.issuer_log)
    }
}

fn tail(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// Waits until process `pid` logs a line containing `"<message>"`, failing if it exits first.
fn wait_line(pid: u32, log: &Path, message: &str, timeout: Duration) -> Result<()> {
    let needle = format!("\"{message}\"");
    let ok = wait_for(timeout, || {
        if !Path::new(&format!("/proc/{pid}")).exists() || is_zombie(pid) {
            return Some(false);
        }
        fs::read_to_string(log).ok()?.contains(&needle).then_some(true)
    });
    if ok != Some(true) {
        bail!("{} never logged {message:?}; its log ends:\n{}", log.display(), tail(log));
    }
    Ok(())
}

/// Plays scheduler, container runtime and kubelet for one pod of the testbed: the Pod object
/// (scheduled on the pod's node, labelled `app=<sa>`), the CNI ADD, then `status.podIPs`.
/// Returns the pod's UID.
pub fn run_pod(
    tb: &Testbed,
    bins: &Bins,
    api: &ApiServer,
    pod: &Pod,
    ns: &str,
    name: &str,
    sa: &str,
) -> Result<String> {
    let node = format!("node{}", pod.node);
    let uid = api.create_pod(tb, ns, name, sa, &node, json!({ "app": sa }))?;
    sandbox(tb, bins, pod, ns, name, &uid)?;
    api.set_pod_ips(tb, ns, name, &[IpAddr::V4(pod.ipv4), IpAddr::V6(pod.ipv6)])?;
    Ok(uid)
}

/// The runtime's CNI ADD for a pod, tried again as the kubelet does while the plugin answers
/// "try again later" (the agent has not set the pod up yet, e.g. its watches are resyncing), for
/// at most a minute.
pub fn sandbox(tb: &Testbed, bins: &Bins, pod: &Pod, ns: &str, name: &str, uid: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = run_cni(&bins.cni, "ADD", &KubeMesh::cni_dir(tb, pod.node), pod, ns, name, uid)?;
        if out.status.success() {
            return Ok(());
        }
        let retry = serde_json::from_slice::<Value>(&out.stdout).is_ok_and(|e| e["code"] == 11);
        if !retry || Instant::now() > deadline {
            bail!("meshless-cni ADD failed: {}", String::from_utf8_lossy(&out.stdout));
        }
        // The kubelet's backoff between sandbox attempts (bounded by the deadline above).
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The other end: the Pod object deleted, then the runtime's CNI DEL.
pub fn remove_pod(tb: &Testbed, bins: &Bins, api: &ApiServer, pod: &Pod, ns: &str, name: &str) -> Result<()> {
    api.delete_pod(tb, ns, name)?;
    let out = run_cni(&bins.cni, "DEL", &KubeMesh::cni_dir(tb, pod.node), pod, ns, name, "")?;
    if !out.status.success() {
        bail!("meshless-cni DEL failed: {}", String::from_utf8_lossy(&out.stdout));
    }
    Ok(())
}

/// The directory holding `deploy/` (the manifests `kubectl apply -k` takes).
pub fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// Applies `deploy/` as a user does (server-side) and waits until the CRDs are served.
pub fn apply_deploy(tb: &Testbed, api: &ApiServer) -> Result<String> {
    let dir = deploy_dir();
    let out = api.kubectl(tb, None, &["apply", "--server-side", "-k", dir.to_str().context("path")?], None)?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        bail!("kubectl apply -k deploy/: {text}");
    }
    api.kubectl_ok(
        tb,
        &[
            "wait",
            "--for",
            "condition=established",
            "--timeout",
            "30s",
            "crd/authorizationpolicies.meshless.io",
            "crd/peerauthentications.meshless.io",
        ],
        None,
    )?;
    Ok(text)
}
