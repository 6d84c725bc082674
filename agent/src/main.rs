//! `meshless`: the node agent and its command-line tools.
//!
//! `meshless agent` runs the dataplane of one node; `meshless ca init` creates the local CA of
//! the embedded mode. Errors end the process with one line on stderr and exit status 1.

mod capture;
mod identity;
mod netns;
mod proxy;
mod state;
mod tunnel;

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};

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

#[derive(clap::Args, Debug)]
struct AgentConfig {
    /// Cluster state file (embedded mode; see README).
    #[arg(long, env = "MESHLESS_STATE")]
    state: PathBuf,
    /// Directory holding the CA (ca.pem, ca-key.pem), as written by `meshless ca init`.
    #[arg(long, env = "MESHLESS_CA_DIR")]
    ca_dir: PathBuf,
    #[arg(long, env = "MESHLESS_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Log filter, tracing-subscriber syntax (e.g. `info`, `meshless=debug`).
    #[arg(long, env = "MESHLESS_LOG", default_value = "info")]
    log: String,
    /// Forward the kernel programs' aya-log records into the agent's log (off by default: the
    /// programs then skip their log statements entirely).
    #[arg(long, env = "MESHLESS_KERNEL_LOG")]
    kernel_log: bool,
    /// Tokio worker threads. 1 keeps each connection's work on one core (no cross-core wake-ups).
    #[arg(long, env = "MESHLESS_WORKERS", default_value_t = 1)]
    workers: usize,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum LogFormat {
    Text,
    Json,
}

fn main() {
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
        Cmd::Agent(cfg) => agent(cfg),
    }
}

fn agent(cfg: AgentConfig) -> anyhow::Result<()> {
    init_tracing(&cfg)?;
    tracing::info!(config = ?cfg, "meshless agent starting");
    let state = state::State::load(&cfg.state)?;
    let ca = identity::Ca::load(&cfg.ca_dir)?;
    let rt = if cfg.workers <= 1 {
        tokio::runtime::Builder::new_current_thread().enable_all().build()?
    } else {
        tokio::runtime::Builder::new_multi_thread().worker_threads(cfg.workers).enable_all().build()?
    };
    rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            r = proxy::Proxy::run(state, ca, cfg.kernel_log) => r.map_err(anyhow::Error::from),
            _ = tokio::signal::ctrl_c() => { tracing::info!("interrupted; detaching and exiting"); Ok(()) }
            _ = term.recv() => { tracing::info!("terminated; detaching and exiting"); Ok(()) }
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
