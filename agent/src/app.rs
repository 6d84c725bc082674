//! Builds and runs the agent: wiring of the workload source, the certificate source, the kernel
//! programs, the pod lifecycle and the data path, from start (or take-over from a running agent)
//! to drain. `run` takes its dependencies injected, so tests build the real agent in-process.

use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;

use tokio::sync::oneshot;
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
}

/// Runs the agent until `shutdown` resolves or a successor has taken over, then drains.
pub async fn run(config: Arc<AgentConfig>, deps: Deps, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
    let mut updates = deps.workloads.start().await?;
    let first = updates.borrow_and_update().clone();
    let rotation =
        Rotation { renew_fraction: config.identity.renew_fraction, bundle_refresh: config.identity.bundle_refresh };
    let identities = Identities::new(deps.certs, rotation).await?;
    if identities.trust_domain != first.trust_domain {
        return Err(crate::identity::Error::Bundle(format!(
            "the certificate source serves trust domain {}, the workload directory says {}",
            identities.trust_domain, first.trust_domain
        ))
        .into());
    }
    tokio::spawn(identities.clone().run());
    let home = Netns::current().map_err(|e| Error::Io("opening the agent's own netns".into(), e))?;
    let probe_cgroup = crate::capture::probe_cgroup(&config.probe_cgroup)?;
    let capture =
        Arc::new(Capture::load(&config.bpf_dir, &first.cgroup_parent, probe_cgroup.as_deref(), config.kernel_log)?);

    // Take over the listeners of an agent running before us, if there is one.
    let socket = handover::socket_path(&config.run_dir);
    let taken = {
        let socket = socket.clone();
        tokio::task::spawn_blocking(move || handover::receive(&socket)).await.expect("hand-over task")?
    };
    let (inherited, predecessor) = match taken {
        Some((i, p)) => (i, Some(p)),
        None => (Inherited::default(), None),
    };

    let store = Arc::new(Store::new(first.clone()));
    let proxy = Arc::new(proxy::Inputs {
        limits: config.tunnel.clone(),
        store: store.clone(),
        home,
        pool: Pool::new(config.tunnel.clone()),
        handshakes: HandshakeLimiter::new(config.tunnel.max_handshakes, config.tunnel.max_handshakes_per_source),
        decisions: Default::default(),
    });
    let trust = identities.trust.clone();
    let kernel = Node {
        capture: capture.clone(),
        home: Netns::current().map_err(|e| Error::Io("opening the agent's own netns".into(), e))?,
    };
    let deps = pods::Deps {
        kernel,
        identities,
        proxy: proxy.clone(),
        local_pods: Default::default(),
        status: Default::default(),
        drain_timeout: config.drain_timeout,
    };
    let admin_state =
        admin::State { proxy: proxy.clone(), status: deps.status.clone(), local_pods: deps.local_pods.clone() };
    // hostNetwork pods live in the node's netns: known, left alone.
    let own = netns::current_cookie().map_err(|e| Error::Io("reading the agent's netns cookie".into(), e))?;
    capture.bypass(own)?;
    // Pods first (listeners, certificates, kernel entries), then the programs: a pod is never
    // captured before the agent can serve it.
    let mut manager = Manager::new(deps, inherited);
    manager.reconcile(&first).await;
    manager.release_inherited();
    capture.attach()?;
    let ours: HashSet<u64> = manager.cookies().into_iter().chain([own]).collect();
    let stale: Vec<u64> = capture.cookies().into_iter().filter(|c| !ours.contains(c)).collect();
    for cookie in &stale {
        if let Err(e) = capture.forget(*cookie) {
            warn!(netns_cookie = cookie, error = %e, "cannot remove stale kernel state");
        }
    }
    if let Some(p) = predecessor {
        match tokio::task::spawn_blocking(move || p.adopted()).await.expect("hand-over task") {
            Ok(()) => info!("the previous agent stops accepting; it drains its connections"),
            Err(e) => warn!(error = %e, "could not tell the previous agent to stop accepting"),
        }
    }
    let mut successors = handover::serve(&socket)?;
    let workload_socket = config.workload_api_socket.clone().unwrap_or_else(|| config.run_dir.join("workload.sock"));
    crate::workload_api::serve(&workload_socket, admin_state.local_pods.clone(), trust)?;
    let admin_stop = tokio_util::sync::CancellationToken::new();
    if config.admin_addr != "none" {
        let addr: std::net::SocketAddr = config
            .admin_addr
            .parse()
            .map_err(|e| Error::Io(format!("--admin-addr {:?}", config.admin_addr), std::io::Error::other(e)))?;
        admin::serve(addr, admin_state, admin_stop.clone())
            .await
            .map_err(|e| Error::Io(format!("admin endpoint on {addr}"), e))?;
    }
    let (enrolled, known, failing) = manager.counts();
    info!(node = %first.node, enrolled, known, failing, stale_removed = stale.len(), "agent ready");

    tokio::pin!(shutdown);
    let mut adopted: Option<oneshot::Receiver<()>> = None;
    let mut memory = tokio::time::interval(std::time::Duration::from_secs(1));
    let mut trimmer = crate::limits::Trimmer::new(TRIM_AFTER_DROP);
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
            }
            Some(req) = successors.recv() => {
                let _ = req.listeners.send(manager.handover_listeners());
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
