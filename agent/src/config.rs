//! The agent's configuration: parsed once (flags or `MESHLESS_*` environment variables), logged at
//! start, and shared read-only as `Arc<AgentConfig>`.

use std::path::PathBuf;
use std::time::Duration;

use clap::ValueEnum;

#[derive(clap::Args, Debug, Clone)]
pub struct AgentConfig {
    /// Cluster state file (embedded mode; see README). Watched: changes apply live.
    #[arg(long, env = "MESHLESS_STATE", required_unless_present = "kube", conflicts_with = "kube")]
    pub state: Option<PathBuf>,
    #[command(flatten)]
    pub kube: KubeConfig,
    #[command(flatten)]
    pub identity: IdentityConfig,
    /// Where the kernel programs' links and maps are pinned (on a BPF file system; one directory
    /// per node agent). They outlive the agent, so pods never talk plaintext while it is away.
    #[arg(long, env = "MESHLESS_BPF_DIR", default_value = "/sys/fs/bpf/meshless")]
    pub bpf_dir: PathBuf,
    /// Directory of the agent's unix sockets (the upgrade hand-over socket; 0700). Pods mount
    /// only its `workload-api` subdirectory, which holds the Workload API socket alone.
    #[arg(long, env = "MESHLESS_RUN_DIR", default_value = "/run/meshless")]
    pub run_dir: PathBuf,
    /// The SPIFFE Workload API socket for the node's pods (default:
    /// `<run-dir>/workload-api/workload.sock`, alone in its directory so pods can mount it).
    #[arg(long, env = "MESHLESS_WORKLOAD_API_SOCKET")]
    pub workload_api_socket: Option<PathBuf>,
    #[arg(long, env = "MESHLESS_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Log filter, tracing-subscriber syntax (e.g. `info`, `meshless=debug`).
    #[arg(long, env = "MESHLESS_LOG", default_value = "info")]
    pub log: String,
    /// Forward the kernel programs' aya-log records into the agent's log (off by default: the
    /// programs then skip their log statements entirely).
    #[arg(long, env = "MESHLESS_KERNEL_LOG")]
    pub kernel_log: bool,
    /// Tokio worker threads. 1 keeps each connection's work on one core (no cross-core wake-ups).
    #[arg(long, env = "MESHLESS_WORKERS", default_value_t = 1)]
    pub workers: usize,
    /// How long established connections may finish after the agent is told to stop, hands its
    /// listeners to a successor, or a pod is removed; then they are reset.
    #[arg(long, env = "MESHLESS_DRAIN_TIMEOUT", value_parser = humantime::parse_duration, default_value = "30s")]
    pub drain_timeout: Duration,
    /// The cgroup whose TCP connections to pods are health probes, which reach the app in every
    /// mode (also STRICT, also with no agent running): `auto` (the cgroup of the process named
    /// `kubelet`, if one runs), `none`, or a cgroup2 directory. Only connections opened by
    /// processes in it pass; other node traffic does not.
    #[arg(long, env = "MESHLESS_PROBE_CGROUP", default_value = "auto")]
    pub probe_cgroup: String,
    /// The admin endpoint (policy explain, metrics), in the agent's own network namespace (the
    /// node's): loopback by default, so pods cannot reach it. `none` turns it off.
    #[arg(long, env = "MESHLESS_ADMIN_ADDR", default_value = "127.0.0.1:15000")]
    pub admin_addr: String,
    /// A file holding a bearer token (16 characters at least): every request to the admin
    /// endpoint must then carry `Authorization: Bearer <token>`. Required for an admin address
    /// beyond loopback; without it the agent refuses to start there.
    #[arg(long, env = "MESHLESS_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<std::path::PathBuf>,
    /// Where Prometheus scrapes the metrics (`/metrics`, `/stats/prometheus`; ztunnel's port),
    /// also served on the admin endpoint. `none` turns it off. In a cluster, an address
    /// Prometheus reaches (the DaemonSet sets `0.0.0.0:15020`).
    #[arg(long, env = "MESHLESS_METRICS_ADDR", default_value = "127.0.0.1:15020")]
    pub metrics_addr: String,
    /// Per-connection telemetry: connection metrics and the access log (`false`: neither).
    #[arg(long, env = "MESHLESS_TELEMETRY", default_value_t = true, action = clap::ArgAction::Set)]
    pub telemetry: bool,
    /// Access log lines per second (one per connection as it ends; 0: no access log) and the
    /// burst allowed above that; lines beyond are dropped and counted.
    #[arg(long, env = "MESHLESS_ACCESS_LOG_RATE", default_value_t = 1000)]
    pub access_log_rate: u32,
    #[arg(long, env = "MESHLESS_ACCESS_LOG_BURST", default_value_t = 10_000)]
    pub access_log_burst: u32,
    /// The flow table's capacity: this many recent flows, and as many aggregates (0: off).
    #[arg(long, env = "MESHLESS_FLOW_TABLE", default_value_t = crate::flows::DEFAULT_CAPACITY as u32,
          value_parser = clap::value_parser!(u32).range(0..=100_000))]
    pub flow_table: u32,
    #[command(flatten)]
    pub tunnel: TunnelLimits,
}

/// Kubernetes mode: pods, namespaces and policies come from the API server.
#[derive(clap::Args, Debug, Clone)]
pub struct KubeConfig {
    /// Learn pods and policies from the Kubernetes API (instead of --state).
    #[arg(long, env = "MESHLESS_KUBE")]
    pub kube: bool,
    /// kubeconfig file; default: the pod's service account (in-cluster), then $KUBECONFIG.
    #[arg(long, env = "MESHLESS_KUBECONFIG", requires = "kube")]
    pub kubeconfig: Option<PathBuf>,
    /// This node's name, as pods' `spec.nodeName` says it (the DaemonSet passes it from the
    /// downward API).
    #[arg(long, env = "NODE_NAME", required_if_eq("kube", "true"))]
    pub node_name: Option<String>,
    /// The mesh's trust domain (SPIFFE IDs spiffe://<trust domain>/ns/<ns>/sa/<sa>).
    #[arg(long, env = "MESHLESS_TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,
    /// The cgroup holding this node's pods (kubelet's: kubepods.slice with the systemd driver,
    /// kubepods with cgroupfs).
    #[arg(long, env = "MESHLESS_CGROUP_PARENT", default_value = "/sys/fs/cgroup/kubepods.slice")]
    pub cgroup_parent: PathBuf,
    /// meshless-cni's state directory (records of the pods' network namespaces, agent.sock).
    #[arg(long, env = "MESHLESS_CNI_DIR", default_value = "/var/run/meshless/cni")]
    pub cni_dir: PathBuf,
    /// Policies in this namespace apply mesh-wide.
    #[arg(long, env = "MESHLESS_ROOT_NAMESPACE", default_value = "meshless-system")]
    pub root_namespace: String,
}

/// Where the pods' certificates come from, and how they are kept fresh.
#[derive(clap::Args, Debug, Clone)]
#[group(id = "certificates", required = true, multiple = true)]
pub struct IdentityConfig {
    /// The issuer (`meshless issuer`), host:port. The agent holds no CA key: it sends CSRs.
    #[arg(long, env = "MESHLESS_ISSUER", group = "certificates", requires = "bundle", conflicts_with = "dev_ca_dir")]
    pub issuer: Option<String>,
    /// This node's credential for the issuer: node.pem and node-key.pem (`meshless ca node`).
    #[arg(long, env = "MESHLESS_NODE_CREDENTIALS", conflicts_with = "issuer_token")]
    pub node_credentials: Option<PathBuf>,
    /// Instead of a node credential: a projected ServiceAccount token file (audience
    /// `meshless-issuer`), which the issuer reviews with the API server (Kubernetes mode).
    #[arg(long, env = "MESHLESS_ISSUER_TOKEN")]
    pub issuer_token: Option<PathBuf>,
    /// The trust bundle to start with (the CA directory's bundle.pem); the issuer keeps it current.
    #[arg(long, env = "MESHLESS_BUNDLE")]
    pub bundle: Option<PathBuf>,
    /// DEVELOPMENT ONLY: sign the pods' certificates with this CA directory's intermediate key,
    /// in the agent itself. Any node that can read it can mint any identity.
    #[arg(long, env = "MESHLESS_DEV_CA_DIR", group = "certificates")]
    pub dev_ca_dir: Option<PathBuf>,
    /// Lifetime of the certificates the development CA signs.
    #[arg(long, env = "MESHLESS_DEV_SVID_TTL", value_parser = humantime::parse_duration, default_value = "24h")]
    pub dev_svid_ttl: Duration,
    /// Renew a certificate at this fraction of its lifetime (±10 % jitter).
    #[arg(long, env = "MESHLESS_RENEW_FRACTION", default_value_t = 0.5)]
    pub renew_fraction: f64,
    /// How often the trust bundle is fetched again (to follow a root rotation).
    #[arg(long, env = "MESHLESS_BUNDLE_REFRESH", value_parser = humantime::parse_duration, default_value = "30s")]
    pub bundle_refresh: Duration,
}

/// Limits of the HBONE tunnel (port 15008) and of the connection pool towards it.
#[derive(clap::Args, Debug, Clone)]
pub struct TunnelLimits {
    /// TLS handshakes in progress at once on all of this node's tunnel listeners; more are
    /// refused at once (they retry) instead of queueing behind slow peers.
    #[arg(long, env = "MESHLESS_MAX_HANDSHAKES", default_value_t = 512)]
    pub max_handshakes: usize,
    /// TLS handshakes in progress at once from one source address.
    #[arg(long, env = "MESHLESS_MAX_HANDSHAKES_PER_SOURCE", default_value_t = 64)]
    pub max_handshakes_per_source: usize,
    /// Deadline for TCP accept to a finished TLS handshake and HTTP/2 preface, on either side.
    #[arg(long, env = "MESHLESS_HANDSHAKE_TIMEOUT", value_parser = humantime::parse_duration, default_value = "10s")]
    pub handshake_timeout: Duration,
    /// Deadline for the first CONNECT on a new tunnel connection, and for a CONNECT's answer.
    #[arg(long, env = "MESHLESS_REQUEST_TIMEOUT", value_parser = humantime::parse_duration, default_value = "10s")]
    pub request_timeout: Duration,
    /// A tunnel connection with no stream for this long is closed (pooled ones by the client).
    #[arg(long, env = "MESHLESS_IDLE_TIMEOUT", value_parser = humantime::parse_duration, default_value = "5m")]
    pub idle_timeout: Duration,
    /// HTTP/2 PING interval on tunnel connections; a peer that does not answer within
    /// `--keepalive-timeout` is dropped (half-open connections die).
    #[arg(long, env = "MESHLESS_KEEPALIVE_INTERVAL", value_parser = humantime::parse_duration, default_value = "10s")]
    pub keepalive_interval: Duration,
    #[arg(long, env = "MESHLESS_KEEPALIVE_TIMEOUT", value_parser = humantime::parse_duration, default_value = "20s")]
    pub keepalive_timeout: Duration,
    /// Concurrent CONNECT streams per tunnel connection (the server's limit, and the pool's).
    #[arg(long, env = "MESHLESS_MAX_STREAMS", default_value_t = 100)]
    pub max_streams: u32,
    /// Connections the agent carries for one pod at once (its outbound and plaintext
    /// connections, tunnel connections and their streams); more are refused at once.
    #[arg(long, env = "MESHLESS_MAX_POD_CONNECTIONS", default_value_t = 16384)]
    pub max_pod_connections: usize,
}

impl Default for TunnelLimits {
    fn default() -> Self {
        TunnelLimits {
            max_handshakes: 512,
            max_handshakes_per_source: 64,
            handshake_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            keepalive_interval: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(20),
            max_streams: 100,
            max_pod_connections: 16384,
        }
    }
}

/// Largest header list a tunnel peer may send (ztunnel's bound; h2's default is 16 MiB).
pub const MAX_HEADER_LIST: u32 = 64 << 10;

#[derive(ValueEnum, Clone, Copy, Debug)]
pub enum LogFormat {
    Text,
    Json,
}
