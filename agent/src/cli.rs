//! The command line: `meshless agent` runs the dataplane of one node; `meshless issuer` signs the
//! nodes' pods' certificates; `meshless ca …` manages the CA directory; `meshless policy …` checks
//! and explains decisions (offline against a state file, or asking a running agent);
//! `meshless uninstall` removes the pinned kernel programs. Errors end the process with one line on stderr and exit status 1.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};

use crate::config::{AgentConfig, LogFormat};
use crate::identity;

#[derive(Parser, Debug)]
#[command(name = "meshless", version, about = "Sidecar-free, eBPF-captured mTLS for pods")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run the node agent.
    Agent(Box<AgentConfig>),
    /// Run the issuer: sign node agents' CSRs for the pods of their own node.
    Issuer(crate::issuer::IssuerConfig),
    /// Manage the CA directory: root, intermediate, node credentials, rotation.
    Ca {
        #[command(subcommand)]
        cmd: CaCmd,
    },
    /// Check and explain policy decisions: offline against a state file (--state), or by asking
    /// the running agent of this node (its admin endpoint, --agent).
    Policy {
        #[command(subcommand)]
        cmd: PolicyCmd,
    },
    /// What this node's traffic says (from its agent's flow table, status and policy): mTLS
    /// coverage per namespace and identity pair, plaintext sources STRICT would refuse, denials
    /// with their rule, certificates, modes and policies. Markdown, or JSON with --json.
    Report {
        #[arg(long, env = "MESHLESS_ADMIN_ADDR", default_value = "127.0.0.1:15000")]
        agent: String,
        #[arg(long)]
        json: bool,
    },
    /// Exit 0 if this node's agent is ready (capture attached, pods synced), 1 if not: the
    /// DaemonSet's readiness probe (the admin endpoint listens on loopback only).
    Ready {
        #[arg(long, env = "MESHLESS_ADMIN_ADDR", default_value = "127.0.0.1:15000")]
        agent: String,
    },
    /// Install meshless-cni on this node: copy the plugin binary and chain it into the first CNI
    /// network configuration (idempotent; the DaemonSet's init container runs it).
    CniInstall(crate::k8s::cni::InstallArgs),
    /// Serve the CSI node plugin that gives pods the Workload API socket as an ephemeral inline
    /// volume (driver `csi.meshless.io`; a privileged container of the agent's DaemonSet runs it).
    Csi(crate::csi::CsiArgs),
    /// Print the Kubernetes manifests: `crds` (generated from meshless's types) or `all`.
    Manifests {
        #[arg(value_enum)]
        what: Manifest,
    },
    /// Detach meshless from a node: unpin its kernel programs and maps (pods then connect
    /// directly again). Stop the agent first.
    Uninstall {
        #[arg(long, env = "MESHLESS_BPF_DIR", default_value = "/sys/fs/bpf/meshless")]
        bpf_dir: PathBuf,
    },
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum Manifest {
    /// The two CRDs.
    Crds,
    /// Everything `deploy/` holds: namespace, CRDs, RBAC, issuer, agent DaemonSet.
    All,
}

#[derive(Subcommand, Debug)]
enum PolicyCmd {
    /// Print `allow` or `deny` for a connection.
    Check(PolicyQuery),
    /// Print the decision with the destination's mode and the policy and rule that decided.
    Explain(PolicyQuery),
    /// Validate a state file's workloads and policies; print what it holds.
    Validate {
        #[arg(long)]
        state: PathBuf,
    },
}

#[derive(clap::Args, Debug)]
struct PolicyQuery {
    /// The source: a SPIFFE ID (authenticated), an IP address (plaintext), or namespace/pod.
    #[arg(long)]
    from: String,
    /// The destination: a pod (namespace/pod), or a Service (svc/namespace/name: each of its
    /// meshed endpoints is decided, at the port the Service port targets).
    #[arg(long)]
    to: String,
    #[arg(long)]
    port: u16,
    /// Decide offline against this state file.
    #[arg(long, conflicts_with = "agent")]
    state: Option<PathBuf>,
    /// Ask the running agent's admin endpoint (host:port) instead.
    #[arg(long, env = "MESHLESS_ADMIN_ADDR", default_value = "127.0.0.1:15000")]
    agent: String,
    /// Print the answer as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand, Debug)]
enum CaCmd {
    /// Create a CA directory: root, intermediate (the issuer signs with it), node-credential CA,
    /// trust bundle. Keys are written mode 0600.
    Init {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value = "cluster.local")]
        trust_domain: String,
    },
    /// Create the credential a node's agent authenticates to the issuer with: node.pem and
    /// node-key.pem in --out.
    Node {
        #[arg(long)]
        ca_dir: PathBuf,
        /// The node's name, as the workload directory names it.
        #[arg(long)]
        node: String,
        #[arg(long)]
        out: PathBuf,
    },
    /// One step of a root rotation: add (trust a new root beside the old), switch (sign with the
    /// new intermediate), retire (trust only the new root).
    Rotate {
        #[arg(long)]
        ca_dir: PathBuf,
        #[arg(value_enum)]
        stage: crate::identity::ca::RotateStage,
    },
    /// Ask the issuer for a certificate as a node would (to check what it grants a node): prints
    /// the certificate's SPIFFE ID and serial, or the refusal.
    Request {
        #[arg(long)]
        issuer: String,
        /// The node's credential directory (node.pem, node-key.pem).
        #[arg(long, required_unless_present = "issuer_token", conflicts_with = "issuer_token")]
        node_credentials: Option<PathBuf>,
        /// Instead: a ServiceAccount token file (Kubernetes mode).
        #[arg(long)]
        issuer_token: Option<PathBuf>,
        #[arg(long)]
        bundle: PathBuf,
        #[arg(long, default_value = "cluster.local")]
        trust_domain: String,
        /// The SPIFFE ID to ask for.
        #[arg(long)]
        id: String,
    },
    /// Issue a workload certificate by hand (debugging, tests): writes <name>.pem and
    /// <name>-key.pem into --out.
    Issue {
        #[arg(long)]
        ca_dir: PathBuf,
        /// The SPIFFE ID, e.g. spiffe://cluster.local/ns/default/sa/web.
        #[arg(long)]
        id: String,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value = "svid")]
        name: String,
    },
}

pub fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("meshless: error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.cmd {
        Cmd::Ca { cmd } => ca(cmd),
        Cmd::Issuer(cfg) => issuer(cfg),
        Cmd::Policy { cmd: PolicyCmd::Validate { state } } => {
            let dir = crate::workloads::statefile::load(&state)?;
            let (pa, ap) = dir.policies.counts();
            println!(
                "{}: valid: {} pods, {pa} PeerAuthentications, {ap} AuthorizationPolicies{}",
                state.display(),
                dir.len(),
                if dir.policies.settings.dry_run { " (dry run)" } else { "" }
            );
            // Accepted, but not enforced as written: say what was left out and how it is treated.
            for o in dir.policies.objects().iter().filter(|o| o.enforcement != crate::policy::Enforcement::Enforced) {
                println!("{} {}: {}", o.kind, o.policy, o.enforcement.summary());
            }
            Ok(())
        }
        Cmd::Policy { cmd: PolicyCmd::Check(q) } => policy(q, false),
        Cmd::Policy { cmd: PolicyCmd::Explain(q) } => policy(q, true),
        Cmd::Uninstall { bpf_dir } => {
            if crate::capture::uninstall(&bpf_dir)? {
                println!("removed {}: meshless's kernel programs are detached", bpf_dir.display());
            } else {
                println!("nothing pinned at {}", bpf_dir.display());
            }
            Ok(())
        }
        Cmd::Agent(cfg) => agent(*cfg),
        Cmd::Report { agent, json } => {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let get = |path: &'static str| -> anyhow::Result<serde_json::Value> {
                let body = rt.block_on(crate::admin::get_path(&agent, path))?;
                serde_json::from_slice(&body).with_context(|| format!("{path} from {agent}: not JSON"))
            };
            let report = crate::report::Report::build(&get("/api/flows")?, &get("/status")?, &get("/api/policy")?);
            match json {
                true => println!("{}", serde_json::to_string_pretty(&report)?),
                false => print!("{}", report.markdown()),
            }
            Ok(())
        }
        Cmd::Ready { agent } => {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let body = rt.block_on(crate::admin::get_path(&agent, "/readyz"))?;
            print!("{}", String::from_utf8_lossy(&body));
            Ok(())
        }
        Cmd::Csi(args) => {
            init_logging(args.log_format, &args.log)?;
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(async {
                crate::csi::serve(&args)?;
                stop_signal()?.await;
                anyhow::Ok(())
            })
        }
        Cmd::CniInstall(args) => {
            let what = crate::k8s::cni::install(&args)?;
            println!("{what}");
            Ok(())
        }
        Cmd::Manifests { what: Manifest::Crds } => {
            print!("{}", crate::k8s::crd::crds_yaml());
            Ok(())
        }
        Cmd::Manifests { what: Manifest::All } => {
            print!("{}", crate::k8s::crd::all_yaml());
            Ok(())
        }
    }
}

/// `meshless ca …`: the CA directory and certificates by hand.
fn ca(cmd: CaCmd) -> anyhow::Result<()> {
    match cmd {
        CaCmd::Init { out, trust_domain } => {
            let td =
                identity::TrustDomain::new(&trust_domain).with_context(|| format!("trust domain {trust_domain:?}"))?;
            identity::ca::init(&out, &td)?;
            println!("created the CA directory {} for trust domain {td}", out.display());
            Ok(())
        }
        CaCmd::Node { ca_dir, node, out } => {
            let (cert, key) = identity::ca::node_credential(&ca_dir, &node)?;
            std::fs::create_dir_all(&out)?;
            std::fs::write(out.join("node.pem"), cert)?;
            identity::write_private(&out.join("node-key.pem"), key.as_bytes())
                .with_context(|| format!("writing node-key.pem into {}", out.display()))?;
            println!("wrote {}/node.pem and node-key.pem for node {node}", out.display());
            Ok(())
        }
        CaCmd::Rotate { ca_dir, stage } => {
            println!("{}", identity::ca::rotate(&ca_dir, stage)?);
            Ok(())
        }
        CaCmd::Issue { ca_dir, id, out, name } => {
            let signer = identity::ca::Signer::load(&ca_dir)?;
            let id = identity::SpiffeId::new(&id).with_context(|| format!("SPIFFE ID {id:?}"))?;
            let (chain, key) = signer.issue(&id, identity::SVID_TTL)?.to_pem();
            std::fs::create_dir_all(&out)?;
            std::fs::write(out.join(format!("{name}.pem")), chain)?;
            identity::write_private(&out.join(format!("{name}-key.pem")), key.as_bytes())
                .with_context(|| format!("writing {name}-key.pem into {}", out.display()))?;
            println!("wrote {}/{name}.pem and {name}-key.pem for {id}", out.display());
            Ok(())
        }
        CaCmd::Request { issuer, node_credentials, issuer_token, bundle, trust_domain, id } => {
            let td =
                identity::TrustDomain::new(&trust_domain).with_context(|| format!("trust domain {trust_domain:?}"))?;
            let id = identity::SpiffeId::new(&id).with_context(|| format!("SPIFFE ID {id:?}"))?;
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(async {
                let proof = match (node_credentials, issuer_token) {
                    (Some(dir), _) => identity::client::NodeProof::Credentials(dir),
                    (None, Some(token)) => identity::client::NodeProof::Token(token),
                    (None, None) => anyhow::bail!("give --node-credentials or --issuer-token"),
                };
                let client = identity::client::IssuerClient::new(&issuer, &proof, &bundle, &td)?;
                let (_, csr) = identity::key_and_csr(&id)?;
                let (chain, _) = identity::CertificateSource::sign(&client, &id, &csr).await?;
                let leaf = chain.first().context("the issuer sent an empty chain")?;
                println!(
                    "issued {} serial {}",
                    identity::spiffe_id_of(leaf).map_err(anyhow::Error::msg)?,
                    identity::serial_of(leaf)
                );
                Ok(())
            })
        }
    }
}

fn agent(cfg: AgentConfig) -> anyhow::Result<()> {
    init_tracing(&cfg)?;
    let nofile = crate::limits::raise_nofile().context("raising the open-files limit")?;
    tracing::info!(config = ?cfg, nofile_before = nofile.0, nofile_now = nofile.1, "meshless agent starting");
    let rt = if cfg.workers <= 1 {
        tokio::runtime::Builder::new_current_thread().enable_all().build()?
    } else {
        tokio::runtime::Builder::new_multi_thread().worker_threads(cfg.workers).enable_all().build()?
    };
    // Inside the runtime: the issuer client's channel spawns its connection task.
    let _runtime = rt.enter();
    let certs: Arc<dyn identity::CertificateSource> = match (&cfg.identity.issuer, &cfg.identity.dev_ca_dir) {
        (Some(issuer), _) => {
            // The trust domain of the node's workloads, to expect of the issuer.
            let td = match &cfg.state {
                Some(state) => crate::workloads::statefile::load(state)?.trust_domain,
                None => identity::TrustDomain::new(&cfg.kube.trust_domain).context("--trust-domain")?,
            };
            let proof = match (&cfg.identity.node_credentials, &cfg.identity.issuer_token) {
                (Some(dir), None) => identity::client::NodeProof::Credentials(dir.clone()),
                (None, Some(token)) => identity::client::NodeProof::Token(token.clone()),
                _ => anyhow::bail!("--issuer needs --node-credentials or --issuer-token"),
            };
            let bundle = cfg.identity.bundle.as_ref().context("--issuer needs --bundle")?;
            Arc::new(identity::client::IssuerClient::new(issuer, &proof, bundle, &td)?)
        }
        (None, Some(dir)) => {
            tracing::warn!(ca_dir = %dir.display(),
                "DEVELOPMENT MODE: this agent signs its pods' certificates with a CA key it can read; \
                 anyone with this node can mint any identity. Use --issuer in production.");
            let signer = identity::ca::Signer::load(dir)?;
            Arc::new(identity::ca::LocalCa { signer, ttl: cfg.identity.dev_svid_ttl })
        }
        (None, None) => anyhow::bail!("give --issuer (with --node-credentials and --bundle) or --dev-ca-dir"),
    };
    rt.block_on(async {
        // The pods' status: published by the pod lifecycle, waited on by the CNI plugin's ADD.
        let status = crate::status::Published::default();
        let settled = Arc::new(crate::status::Settled(status.clone()));
        let workloads: Box<dyn crate::workloads::WorkloadSource> = match &cfg.state {
            Some(path) => Box::new(crate::workloads::statefile::FileSource { path: path.clone() }),
            None => Box::new(kube_source(&cfg.kube, Some(settled)).await?),
        };
        let deps = crate::app::Deps { workloads, certs, status };
        crate::app::run(Arc::new(cfg), deps, stop_signal()?).await.map_err(anyhow::Error::from)
    })
}

async fn kube_source(
    k: &crate::config::KubeConfig,
    enrollment: Option<Arc<dyn crate::workloads::Enrollment>>,
) -> anyhow::Result<crate::k8s::source::KubeSource> {
    Ok(crate::k8s::source::KubeSource {
        client: crate::k8s::client(k.kubeconfig.as_deref()).await?,
        node: Some(k.node_name.clone().context("--kube needs --node-name (or NODE_NAME)")?),
        trust_domain: identity::TrustDomain::new(&k.trust_domain).context("--trust-domain")?,
        cgroup_parent: k.cgroup_parent.clone(),
        cni_dir: k.cni_dir.clone(),
        mesh: crate::policy::MeshSettings { root_namespace: k.root_namespace.clone(), ..Default::default() },
        enrollment,
    })
}

fn policy(q: PolicyQuery, explain: bool) -> anyhow::Result<()> {
    let question = crate::admin::Question { from: q.from, to: q.to, port: q.port };
    let answer = match &q.state {
        Some(state) => {
            let dir = crate::workloads::statefile::load(state)?;
            crate::admin::explain(&dir, &question)?
        }
        None => {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(crate::admin::ask(&q.agent, &question))?
        }
    };
    if q.json {
        println!("{}", serde_json::to_string_pretty(&answer)?);
    } else if explain {
        print!("{}", answer.long());
    } else {
        println!("{}", answer.short());
    }
    Ok(())
}

fn issuer(cfg: crate::issuer::IssuerConfig) -> anyhow::Result<()> {
    init_logging(cfg.log_format, &cfg.log)?;
    tracing::info!(config = ?cfg, "meshless issuer starting");
    let td = identity::ca::trust_domain(&cfg.ca_dir)?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        let client = match cfg.kube {
            true => Some(crate::k8s::client(cfg.kubeconfig.as_deref()).await?),
            false => None,
        };
        let auth: Arc<dyn crate::issuer::NodeAuthenticator> = match (cfg.node_auth, &client) {
            (crate::issuer::NodeAuth::Credentials, _) => {
                Arc::new(crate::issuer::NodeCredentials { trust_domain: td.clone() })
            }
            (crate::issuer::NodeAuth::Tokens, Some(client)) => {
                let (ns, name) = cfg
                    .agent_service_account
                    .split_once('/')
                    .context("--agent-service-account must be <namespace>/<name>")?;
                Arc::new(crate::k8s::tokens::ServiceAccountTokens::new(
                    client.clone(),
                    (ns.to_string(), name.to_string()),
                    crate::k8s::tokens::AUDIENCE.to_string(),
                ))
            }
            (crate::issuer::NodeAuth::Tokens, None) => anyhow::bail!("--node-auth tokens needs --kube"),
        };
        let workloads: Box<dyn crate::workloads::WorkloadSource> = match (&cfg.state, client) {
            (Some(path), _) => Box::new(crate::workloads::statefile::FileSource { path: path.clone() }),
            (None, None) => anyhow::bail!("give --state or --kube"),
            (None, Some(client)) => {
                // The issuer is the one writer of the policy resources' status (agents only read).
                tokio::spawn(crate::k8s::crd::report_status(client.clone()));
                Box::new(crate::k8s::source::KubeSource {
                    client,
                    node: None,
                    trust_domain: td,
                    cgroup_parent: PathBuf::new(),
                    cni_dir: PathBuf::new(),
                    mesh: crate::policy::MeshSettings::default(),
                    enrollment: None,
                })
            }
        };
        crate::issuer::run(cfg, workloads, auth, stop_signal()?).await.map_err(anyhow::Error::from)
    })
}

/// Resolves on SIGTERM or SIGINT.
fn stop_signal() -> std::io::Result<impl Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("terminated"),
            _ = int.recv() => tracing::info!("interrupted"),
        }
    })
}

fn init_tracing(cfg: &AgentConfig) -> anyhow::Result<()> {
    init_logging(cfg.log_format, &cfg.log)
}

fn init_logging(format: LogFormat, log: &str) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(log).with_context(|| format!("log filter {log:?}"))?;
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(true).try_init(),
        LogFormat::Text => builder.try_init(),
    }
    .map_err(|e| anyhow::anyhow!("initializing logging: {e}"))
}
