//! meshless: the node agent of a sidecar-free, eBPF-captured mTLS mesh, as a library.
//!
//! The `meshless` binary is a thin `main` over [`cli`]; `app::run` builds the agent from
//! injected parts (`app::Deps`: where workloads and certificates come from). Only what the binary
//! and the benchmarks use is public (`cli`, `identity`, `workloads`, `k8s`, `limits`, `policy`);
//! every other module is the crate's own. One module per concern; which uses which is in
//! ARCHITECTURE.md (checked by `tests/modules.rs`: no cycle):
//!
//! | module | concern |
//! |---|---|
//! | `workloads` | the workload directory (snapshots, lock-free store) and its sources (state file) |
//! | `k8s` | Kubernetes: the workload source (watches), the CNI hand-off, the policy CRDs |
//! | `identity` | SPIFFE IDs, the CA directory, certificate sources, the certificate store and rotation, verifiers |
//! | `issuer` | `meshless issuer`: the CA service that signs a node only its own pods' identities |
//! | `capture` | the kernel programs: load, pin, attach, enrollment maps, original destinations |
//! | `kernel` | what the pod lifecycle asks of the kernel (pods' netns, the agent's sockets there, capture maps): a trait, real and faked |
//! | `pods` | the lifecycle of this node's pods: enroll, update, unenroll, retry; publishes the node status |
//! | `local` | a pod of this node in the mesh as the data path sees it (leaf) |
//! | `status` | the node status read model: pods with state and last error, certificates, pool, draining |
//! | `proxy` | the data path: outbound, tunnel server, delivery |
//! | `policy` | PeerAuthentication and AuthorizationPolicy: validation, the per-pod index, decisions |
//! | `authorize` | the decision on an inbound connection: target checks, then [`policy`]; logged and counted |
//! | `tunnel` | HBONE: HTTP/2 CONNECT over mTLS, limits, splice with RST/FIN semantics |
//! | `pool` | pooled tunnel connections per (source pod, destination pod) |
//! | `handover` | upgrades: listening sockets passed to a successor agent |
//! | `admin` | the node-local admin endpoint: policy explain, per-pod modes, node status, decision metrics |
//! | `workload_api` | the SPIFFE Workload API for the pods of this node (unix socket) |
//! | `telemetry` | connection metrics with Istio's names, the agent's own metrics, the access log |
//! | `dashboard` | the node dashboard: server-rendered pages and live updates on the admin endpoint |
//! | `flows` | the flow table: recent flows and aggregates, bounded (leaf) |
//! | `limits` | handshake caps, open-files limit |
//! | `report` | `meshless report`: coverage, plaintext sources, denials, certificates, from the admin endpoint's JSON (leaf) |
//! | `netns` | network namespaces and the agent's sockets in them (the `unsafe` lives here) |

pub(crate) mod admin;
pub(crate) mod app;
pub(crate) mod authorize;
pub(crate) mod capture;
pub(crate) mod cgroup;
pub mod cli;
pub(crate) mod config;
pub(crate) mod csi;
pub(crate) mod dashboard;
pub(crate) mod flows;
pub(crate) mod handover;
pub mod identity;
pub(crate) mod issuer;
pub mod k8s;
pub(crate) mod kernel;
pub mod limits;
pub(crate) mod local;
pub(crate) mod netns;
pub(crate) mod pods;
pub(crate) mod pool;
pub(crate) mod proto;
pub(crate) mod proxy;
pub(crate) mod report;
pub(crate) mod status;
pub(crate) mod telemetry;
pub(crate) mod tunnel;
pub(crate) mod workload_api;
pub mod workloads;

/// The policy engine, its own crate (no Kubernetes client, no kernel): see `meshless-policy`.
pub use meshless_policy as policy;

/// Errors that stop the agent (at start: a pod that cannot be set up is retried, not fatal).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    StateFile(#[from] workloads::statefile::Error),
    #[error(transparent)]
    Kubernetes(#[from] k8s::Error),
    #[error(transparent)]
    Identity(#[from] identity::Error),
    #[error(transparent)]
    Capture(#[from] capture::Error),
    #[error(transparent)]
    Handover(#[from] handover::Error),
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
}
