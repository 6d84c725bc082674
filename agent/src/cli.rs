//! The command line: `meshless agent` runs the dataplane of one node; `meshless ca …` manages the
//! local CA of the embedded mode; `meshless uninstall` removes the pinned kernel programs. Errors
//! end the process with one line on stderr and exit status 1.

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
    Agent(AgentConfig),
    /// Manage the local certificate authority of the embedded mode.
    Ca {
        #[command(subcommand)]
        cmd: CaCmd,
    },
    /// Detach meshless from a node: unpin its kernel programs and maps (pods then connect
    /// directly again). Stop the agent first.
    Uninstall {
        #[arg(long, env = "MESHLESS_BPF_DIR", default_value = "/sys/fs/bpf/meshless")]
        bpf_dir: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
enum CaCmd {
    /// Create a root CA (ECDSA P-256): writes ca.pem and ca-key.pem (mode 0600) into --out.
    Init {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value = "cluster.local")]
        trust_domain: String,
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
        Cmd::Ca { cmd: CaCmd::Init { out, trust_domain } } => {
            let td =
                identity::TrustDomain::new(&trust_domain).with_context(|| format!("trust domain {trust_domain:?}"))?;
            identity::Ca::init(&out, &td)?;
            println!("wrote {}/ca.pem and {}/ca-key.pem", out.display(), out.display());
            Ok(())
        }
        Cmd::Ca { cmd: CaCmd::Issue { ca_dir, id, out, name } } => {
            let ca = identity::Ca::load(&ca_dir)?;
            let id = identity::SpiffeId::new(&id).with_context(|| format!("SPIFFE ID {id:?}"))?;
            let (chain, key) = ca.issue(&id, identity::SVID_TTL)?.to_pem();
            std::fs::create_dir_all(&out)?;
            std::fs::write(out.join(format!("{name}.pem")), chain)?;
            identity::write_private(&out.join(format!("{name}-key.pem")), key.as_bytes())
                .with_context(|| format!("writing {name}-key.pem into {}", out.display()))?;
            println!("wrote {}/{name}.pem and {name}-key.pem for {id}", out.display());
            Ok(())
        }
        Cmd::Uninstall { bpf_dir } => {
            if crate::capture::uninstall(&bpf_dir)? {
                println!("removed {}: meshless's kernel programs are detached", bpf_dir.display());
            } else {
                println!("nothing pinned at {}", bpf_dir.display());
            }
            Ok(())
        }
        Cmd::Agent(cfg) => agent(cfg),
    }
}

fn agent(cfg: AgentConfig) -> anyhow::Result<()> {
    init_tracing(&cfg)?;
    let nofile = crate::limits::raise_nofile().context("raising the open-files limit")?;
    tracing::info!(config = ?cfg, nofile_before = nofile.0, nofile_now = nofile.1, "meshless agent starting");
    let ca = identity::Ca::load(&cfg.ca_dir)?;
    let deps = crate::app::Deps {
        workloads: Box::new(crate::workloads::statefile::FileSource { path: cfg.state.clone() }),
        certs: Arc::new(identity::LocalCa { ca, ttl: identity::SVID_TTL }),
    };
    let rt = if cfg.workers <= 1 {
        tokio::runtime::Builder::new_current_thread().enable_all().build()?
    } else {
        tokio::runtime::Builder::new_multi_thread().worker_threads(cfg.workers).enable_all().build()?
    };
    let cfg = Arc::new(cfg);
    rt.block_on(async { crate::app::run(cfg, deps, stop_signal()?).await.map_err(anyhow::Error::from) })
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
    let filter =
        tracing_subscriber::EnvFilter::try_new(&cfg.log).with_context(|| format!("log filter {:?}", cfg.log))?;
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match cfg.log_format {
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(true).try_init(),
        LogFormat::Text => builder.try_init(),
    }
    .map_err(|e| anyhow::anyhow!("initializing logging: {e}"))
}
