//! Builds and runs the agent: wiring of the workload source, the certificate source, the kernel
//! programs, the pod lifecycle and the data path, from start (or take-over from a running agent)
//! to drain. `run` takes its dependencies injected, so tests build the real agent in-process.

use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;

use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::capture::Capture;
use crate::config::AgentConfig;
use crate::handover::{self, Inherited};
use crate::identity::store::{Identities, Rotation};
use crate::identity::CertificateSource;
use crate::kernel::Node;
use crate::limits::HandshakeLimiter;
use crate::local::LocalPod;
use crate::netns::{self, Netns};
use crate::pods::Manager;
use crate::pool::Pool;
use crate::workloads::{Store, WorkloadSource};
use crate::{admin, pods, proxy, Error};

/// Free memory goes back to the kernel once at least this many connections have closed since
/// the peak (and half of them).
const TRIM_AFTER_DROP: usize = 256;

/// The injected parts of an agent.
pub struct Deps {
    pub workloads: Box<dyn WorkloadSource>,
    pub certs: Arc<dyn CertificateSource>,
    /// Where the pod lifecycle publishes the node's status.
    pub status: crate::status::Published,
}

/// Runs the agent until `shutdown` resolves or a successor has taken over, then drains.
pub async fn run(config: Arc<AgentConfig>, deps: Deps, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
    let agent = start(config.clone(), deps).await?;
    let (why, mut manager, admin_stop) = agent.serve(shutdown).await;
    admin_stop.cancel();
    let pods = manager.stop_accepting();
    info!(
        why,
        pods = pods.len(),
        deadline_s = config.drain_timeout.as_secs_f64(),
        "stopped accepting; draining connections"
    );
    drain(&pods, config.drain_timeout).await;
    Ok(())
}

/// An agent that has taken over (or started) and serves its pods.
struct Running {
    manager: Manager<Node>,
    store: Arc<Store>,
    updates: tokio::sync::watch::Receiver<Arc<crate::workloads::Directory>>,
    successors: tokio::sync::mpsc::Receiver<handover::Request>,
    admin_stop: CancellationToken,
    /// The admin endpoint's listener, handed over to a successor with the pods' listeners.
    admin: Vec<(handover::ListenerSpec, std::net::TcpListener)>,
    telemetry: Arc<crate::telemetry::Telemetry>,
}

/// Start-up: the first directory, the certificates, the kernel programs, the predecessor's
/// listeners, this node's pods, then the programs attached, stale kernel state removed, and the
/// side endpoints (hand-over, Workload API, admin) serving.
async fn start(config: Arc<AgentConfig>, deps: Deps) -> Result<Running, Error> {
    let mut updates = deps.workloads.start().await?;
    let first = updates.borrow_and_update().clone();
    let identities = identities(&config, deps.certs, &first).await?;
    // Where the agent is in the cgroup hierarchy (also from inside a cgroup namespace).
    let cgroups = crate::cgroup::Cgroups::detect(&first.cgroup_parent)
        .map_err(|e| Error::Io(format!("the cgroup hierarchy of {}", first.cgroup_parent.display()), e))?;
    let probe_cgroup = crate::capture::probe_cgroup(&config.probe_cgroup, &first.cgroup_parent)?;
    let capture = Arc::new(Capture::load(
        &config.bpf_dir,
        &first.cgroup_parent,
        &cgroups,
        probe_cgroup.as_deref(),
        config.kernel_log,
    )?);
    // Take over the listeners of an agent running before us, if there is one.
    let socket = handover::socket_path(&config.run_dir);
    let taken = {
        let socket = socket.clone();
        tokio::task::spawn_blocking(move || handover::receive(&socket)).await.map_err(join_error)??
    };
    let (mut inherited, predecessor) = match taken {
        Some((i, p)) => (i, Some(p)),
        None => (Inherited::default(), None),
    };
    let own = netns::current_cookie().map_err(|e| Error::Io("reading the agent's netns cookie".into(), e))?;
    let inherited_admin: Vec<_> = inherited
        .take(&handover::node_key(), own)
        .map(|handover::Listeners(ls)| ls.into_iter().map(|(spec, l)| (spec.role, l)).collect())
        .unwrap_or_default();

    let store = Arc::new(Store::new(first.clone()));
    let proxy = Arc::new(proxy::Inputs {
        limits: config.tunnel.clone(),
        store: store.clone(),
        home: own_netns()?,
        pool: Pool::new(config.tunnel.clone()),
        handshakes: HandshakeLimiter::new(config.tunnel.max_handshakes, config.tunnel.max_handshakes_per_source),
        decisions: Default::default(),
        telemetry: crate::telemetry::Telemetry::new(
            config.telemetry,
            crate::telemetry::AccessLogLimits { rate: config.access_log_rate, burst: config.access_log_burst },
            config.flow_table as usize,
        ),
    });
    let workload_identities = identities.clone();
    let deps = pods::Deps {
        kernel: Node { capture: capture.clone(), home: own_netns()? },
        identities,
        proxy: proxy.clone(),
        local_pods: Default::default(),
        status: deps.status,
        drain_timeout: config.drain_timeout,
    };
    let admin_state = admin::State {
        proxy: proxy.clone(),
        status: deps.status.clone(),
        local_pods: deps.local_pods.clone(),
        identities: workload_identities.clone(),
        started: std::time::SystemTime::now(),
        streams: Arc::new(tokio::sync::Semaphore::new(crate::dashboard::MAX_STREAMS)),
    };
    // hostNetwork pods live in the node's netns: known, left alone.
    capture.bypass(own)?;
    // Pods first (listeners, certificates, kernel entries), then the programs: a pod is never
    // captured before the agent can serve it.
    let mut manager = Manager::new(deps, inherited);
    manager.reconcile(&first).await;
    manager.release_inherited();
    capture.attach()?;
    let stale = remove_stale(&capture, manager.cookies().into_iter().chain([own]).collect());
    if let Some(p) = predecessor {
        match tokio::task::spawn_blocking(move || p.adopted()).await.map_err(join_error)? {
            Ok(()) => info!("the previous agent stops accepting; it drains its connections"),
            Err(e) => warn!(error = %e, "could not tell the previous agent to stop accepting"),
        }
    }
    let successors = handover::serve(&socket)?;
    let workload_socket =
        config.workload_api_socket.clone().unwrap_or_else(|| crate::workload_api::default_socket(&config.run_dir));
    crate::workload_api::serve(&workload_socket, admin_state.local_pods.clone(), workload_identities, cgroups)?;
    let admin_stop = CancellationToken::new();
    let admin = serve_admin(&config, inherited_admin, admin_state, admin_stop.clone()).await?;
    let (enrolled, known, failing) = manager.counts();
    info!(node = %first.node, enrolled, known, failing, stale_removed = stale, "agent ready");
    let telemetry = proxy.telemetry.clone();
    Ok(Running { manager, store, updates, successors, admin_stop, admin, telemetry })
}

/// The pods' certificate store, checked to serve the directory's trust domain, renewing.
async fn identities(
    config: &AgentConfig,
    certs: Arc<dyn CertificateSource>,
    first: &crate::workloads::Directory,
) -> Result<Arc<Identities>, Error> {
    let rotation =
        Rotation { renew_fraction: config.identity.renew_fraction, bundle_refresh: config.identity.bundle_refresh };
    let identities = Identities::new(certs, rotation).await?;
    if identities.trust_domain != first.trust_domain {
        return Err(crate::identity::Error::Bundle(format!(
            "the certificate source serves trust domain {}, the workload directory says {}",
            identities.trust_domain, first.trust_domain
        ))
        .into());
    }
    tokio::spawn(identities.clone().run());
    Ok(identities)
}

fn own_netns() -> Result<Netns, Error> {
    Netns::current().map_err(|e| Error::Io("opening the agent's own netns".into(), e))
}

fn join_error(e: tokio::task::JoinError) -> Error {
    Error::Io("a blocking hand-over task".into(), std::io::Error::other(e))
}

/// Removes kernel state of netns this agent does not manage (pods gone while no agent ran).
fn remove_stale(capture: &Capture, ours: HashSet<u64>) -> usize {
    let stale: Vec<u64> = capture.cookies().into_iter().filter(|c| !ours.contains(c)).collect();
    for cookie in &stale {
        if let Err(e) = capture.forget(*cookie) {
            warn!(netns_cookie = cookie, error = %e, "cannot remove stale kernel state");
        }
    }
    stale.len()
}

/// Serves the admin endpoint and the metrics endpoint, each on the listener the previous agent
/// handed over (if it listened on the same address) or a new one; returns the listeners,
/// described for the next hand-over.
async fn serve_admin(
    config: &AgentConfig,
    mut inherited: Vec<(handover::Role, std::net::TcpListener)>,
    state: admin::State,
    stop: CancellationToken,
) -> Result<Vec<(handover::ListenerSpec, std::net::TcpListener)>, Error> {
    let token = match &config.admin_token_file {
        None => None,
        Some(path) => {
            Some(admin::read_token(path).map_err(|e| Error::Io(format!("--admin-token-file {}", path.display()), e))?)
        }
    };
    let mut kept = Vec::new();
    for (role, flag, value) in [
        (handover::Role::Admin, "--admin-addr", &config.admin_addr),
        (handover::Role::Metrics, "--metrics-addr", &config.metrics_addr),
    ] {
        if value == "none" {
            continue;
        }
        let addr: std::net::SocketAddr =
            value.parse().map_err(|e| Error::Io(format!("{flag} {value:?}"), std::io::Error::other(e)))?;
        let io = |e| Error::Io(format!("{flag} {addr}"), e);
        if role == handover::Role::Admin {
            admin::check_exposure(addr, token.is_some()).map_err(|e| Error::Io(format!("{flag} {addr}"), e))?;
        }
        let handed = inherited.iter().position(|(r, l)| *r == role && l.local_addr().is_ok_and(|a| a == addr));
        let listener = match (handed, role) {
            (Some(i), _) => inherited.swap_remove(i).1,
            (None, handover::Role::Admin) => bind_admin(addr).await.map_err(io)?,
            // The metrics port is no reason not to serve: without it, the admin endpoint's
            // /metrics still answers.
            (None, _) => match bind_admin(addr).await {
                Ok(l) => l,
                Err(e) => {
                    warn!(%addr, error = %e, "cannot listen for metrics; they are on the admin endpoint only");
                    continue;
                }
            },
        };
        kept.push((
            handover::ListenerSpec { pod: handover::node_key(), role, addr },
            listener.try_clone().map_err(io)?,
        ));
        match role {
            handover::Role::Admin => {
                admin::serve(listener, state.clone(), crate::dashboard::routes(), token.clone(), stop.clone()).await
            }
            _ => admin::serve_metrics(listener, state.clone(), stop.clone()).await,
        }
        .map_err(io)?;
    }
    Ok(kept)
}

/// How long a starting agent waits for the admin port to be free: a predecessor that did not
/// hand its admin socket over (an older release, or another `--admin-addr`) closes it when it
/// stops accepting, which it does once this agent has taken over.
const ADMIN_PORT_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

async fn bind_admin(addr: std::net::SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let deadline = std::time::Instant::now() + ADMIN_PORT_WAIT;
    let mut said = false;
    loop {
        match admin::bind(addr) {
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && std::time::Instant::now() < deadline => {
                if !std::mem::replace(&mut said, true) {
                    info!(%addr, "the admin port is still held (by the agent taken over from?); waiting for it");
                }
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            other => return other,
        }
    }
}

/// Every this many seconds, metric series of pods gone are dropped.
const FORGET_EVERY: u64 = 30;

impl Running {
    /// Serves until told to stop or a successor took over: applies directory changes, retries
    /// failing pods, gives memory back after bursts, answers a successor. Returns why it stopped.
    async fn serve(self, shutdown: impl Future<Output = ()>) -> (&'static str, Manager<Node>, CancellationToken) {
        let Running { mut manager, store, mut updates, mut successors, admin_stop, admin, telemetry } = self;
        tokio::pin!(shutdown);
        let mut adopted: Option<oneshot::Receiver<()>> = None;
        let mut memory = tokio::time::interval(std::time::Duration::from_secs(1));
        let mut trimmer = crate::limits::Trimmer::new(TRIM_AFTER_DROP);
        let mut ticks = 0u64;
        let why = loop {
            let retry = manager.next_retry();
            tokio::select! {
                changed = updates.changed() => {
                    if changed.is_err() {
                        warn!("the workload source stopped; serving the last state");
                        updates = tokio::sync::watch::channel(store.load()).1;
                        continue;
                    }
                    let dir = updates.borrow_and_update().clone();
                    store.store(dir.clone());
                    manager.reconcile(&dir).await;
                }
                _ = sleep_until(retry), if retry.is_some() => manager.retry_due(&store.load()).await,
                _ = memory.tick() => {
                    if trimmer.observe(manager.live_connections()) {
                        crate::limits::release_free_memory();
                    }
                    ticks += 1;
                    if ticks.is_multiple_of(FORGET_EVERY) {
                        telemetry.forget_gone(&store.load());
                    }
                }
                Some(req) = successors.recv() => {
                    let mut listeners = manager.handover_listeners();
                    for (spec, l) in &admin {
                        match l.try_clone() {
                            Ok(l) => listeners.push((spec.clone(), l)),
                            Err(e) => warn!(error = %e, "cannot duplicate the admin listener for the successor"),
                        }
                    }
                    let _ = req.listeners.send(listeners);
                    adopted = Some(req.adopted);
                }
                r = async { adopted.as_mut().expect("guarded").await }, if adopted.is_some() => {
                    adopted = None;
                    if r.is_ok() {
                        break "a successor took over";
                    }
                    warn!("the successor went away before taking over; serving on");
                }
                _ = &mut shutdown => break "told to stop",
            }
        };
        (why, manager, admin_stop)
    }
}

async fn sleep_until(at: Option<std::time::Instant>) {
    if let Some(at) = at {
        tokio::time::sleep_until(at.into()).await;
    }
}

/// Waits for every pod's connections to end, up to `deadline`; then resets the rest.
async fn drain(pods: &[Arc<LocalPod>], deadline: std::time::Duration) {
    let open: usize = pods.iter().map(|p| p.conns.len()).sum();
    let all = async {
        for p in pods {
            p.conns.close();
            p.conns.wait().await;
        }
    };
    let drained = tokio::time::timeout(deadline, all).await.is_ok();
    if !drained {
        for p in pods {
            p.stop.cancel();
        }
        for p in pods {
            p.conns.wait().await;
        }
    }
    info!(connections_at_stop = open, drained, "agent stopped");
}
