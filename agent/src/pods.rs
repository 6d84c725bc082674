//! The lifecycle of this node's pods: enroll, update, unenroll, retry.
//!
//! The [`Manager`] turns each new directory snapshot into a diff against the pods it runs. A new
//! pod in the mesh is enrolled: its netns is entered, the agent's listeners opened inside it (or
//! taken over from a predecessor), its certificate issued, its kernel map entry written, and only
//! then its connections are served. A pod outside the mesh is written to the kernel as known and
//! left alone. A removed pod's kernel state goes first (no new capture), then its listeners close,
//! then its connections get the drain deadline to finish. A pod that cannot be set up (no netns,
//! a port taken, no certificate) is reported and retried with exponential backoff; every other pod
//! keeps working. Until a pod is enrolled or known, the kernel refuses its TCP connects: nothing
//! it sends leaves in plaintext.
//!
//! Each snapshot also carries the pods' policy: a running pod's [`PodPolicy`] is swapped in place
//! (new connections see it at once), its inbound mode written to the kernel when it changed, and,
//! if the mesh asks for it, established inbound connections the new policy denies are reset.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::handover::{Inherited, ListenerSpec, Listeners, Role};
use crate::identity::store::Identities;
use crate::kernel::Kernel;
use crate::local::{LocalPod, LocalPods};
use crate::policy::{Mode, PodPolicy};
use crate::proxy;
use crate::status::{NodeStatus, PodState, PodStatus, Published};
use crate::workloads::{Directory, PodKey, Workload};

/// First retry delay of a pod that cannot be set up; doubled per failure up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("has no netns path")]
    NoNetns,
    #[error(transparent)]
    Kernel(#[from] crate::kernel::Error),
    #[error("identity: {0}")]
    Identity(#[from] crate::identity::Error),
    #[error("serving its listeners: {0}")]
    Serve(std::io::Error),
}

enum Slot {
    Running {
        pod: Arc<LocalPod>,
        /// Cancels the pod's accept loops (their listeners close).
        accepting: CancellationToken,
        /// Duplicates of the listening sockets, for a successor agent.
        handover: Vec<(ListenerSpec, std::net::TcpListener)>,
    },
    Known {
        workload: Arc<Workload>,
        cookie: u64,
    },
    Failing {
        workload: Arc<Workload>,
        attempt: u32,
        retry_at: Instant,
        /// Why the last attempt failed.
        error: String,
        /// The pod's netns cookie, once its netns could be opened: its kernel state is this
        /// agent's (kept from stale removal, forgotten when the pod goes).
        cookie: Option<u64>,
        /// The mode the kernel holds for the pod meanwhile, with no listener: STRICT drops
        /// plaintext, PERMISSIVE passes it.
        held: Option<Mode>,
    },
}

impl Slot {
    /// The netns cookie whose kernel state this slot owns, if known.
    fn cookie(&self) -> Option<u64> {
        match self {
            Slot::Running { pod, .. } => Some(pod.cookie),
            Slot::Known { cookie, .. } => Some(*cookie),
            Slot::Failing { cookie, .. } => *cookie,
        }
    }

    fn workload(&self) -> Arc<Workload> {
        match self {
            Slot::Running { pod, .. } => pod.workload(),
            Slot::Known { workload, .. } | Slot::Failing { workload, .. } => workload.clone(),
        }
    }
}

/// What the pod lifecycle needs, built once by the app.
pub struct Deps<K> {
    /// The node's kernel: pods' netns, the agent's sockets in them, the capture maps.
    pub kernel: K,
    pub identities: Arc<Identities>,
    /// What each pod's listeners serve with.
    pub proxy: Arc<proxy::Inputs>,
    /// Where the enrolled pods are published (Workload API, admin).
    pub local_pods: LocalPods,
    /// Where the node's status is published after each change.
    pub status: Published,
    /// How long a removed pod's connections may take to finish.
    pub drain_timeout: Duration,
}

pub struct Manager<K: Kernel> {
    deps: Deps<K>,
    slots: HashMap<PodKey, Slot>,
    /// Listeners handed over by a predecessor, not yet claimed by a pod.
    inherited: Inherited,
    /// Set once the agent stops accepting.
    draining: bool,
}

impl<K: Kernel> Manager<K> {
    pub fn new(deps: Deps<K>, inherited: Inherited) -> Manager<K> {
        Manager { deps, slots: HashMap::new(), inherited, draining: false }
    }

    /// Applies a directory snapshot: enrolls, updates and unenrolls this node's pods.
    pub async fn reconcile(&mut self, dir: &Directory) {
        let desired: HashMap<PodKey, Arc<Workload>> =
            dir.local_pods().filter(|w| !w.host_network).map(|w| (w.key.clone(), w.clone())).collect();
        let gone: Vec<PodKey> = self.slots.keys().filter(|k| !desired.contains_key(*k)).cloned().collect();
        for key in gone {
            if let Some(slot) = self.slots.remove(&key) {
                self.remove(&key, slot, "removed from the directory", true);
            }
        }
        let mut keys: Vec<&PodKey> = desired.keys().collect();
        keys.sort();
        let close_denied = dir.policies.settings.close_denied_connections && !dir.policies.settings.dry_run;
        for key in keys {
            let w = &desired[key];
            match self.slots.remove(key) {
                None => self.apply(w.clone(), dir, 0, None).await,
                Some(Slot::Running { pod, accepting, mut handover }) if w.mesh && same_pod(&pod.workload(), w) => {
                    let policy = dir.policy_for(w);
                    let (old_ips, old_mode) = (pod.workload().ips.clone(), pod.policy().mode.clone());
                    let old_kernel = pod.policy().kernel_mode();
                    let (old_ports, new_ports) = (pod.policy().kernel_port_modes(), policy.kernel_port_modes());
                    if old_ports != new_ports {
                        match self.deps.kernel.port_modes(pod.cookie, &new_ports) {
                            Ok(()) => info!(pod = %key, ports = ?new_ports, "per-port modes updated"),
                            Err(e) => warn!(pod = %key, error = %e, "cannot update the pod's per-port modes"),
                        }
                    }
                    if pod.workload().probe_ports != w.probe_ports {
                        match self.deps.kernel.probe_ports(pod.cookie, &w.probe_ports) {
                            Ok(()) => info!(pod = %key, ports = ?w.probe_ports, "probe ports updated"),
                            Err(e) => {
                                warn!(pod = %key, error = %e, "cannot update the pod's probe ports in the kernel")
                            }
                        }
                    }
                    if old_ips != w.ips {
                        match self.deps.kernel.enroll(pod.cookie, &w.ips) {
                            Ok(_) => info!(pod = %key, ips = ?w.ips, "pod addresses updated"),
                            Err(e) => warn!(pod = %key, error = %e, "cannot update the pod's addresses in the kernel"),
                        }
                    }
                    let changed = old_kernel != policy.kernel_mode() || old_ports != new_ports;
                    if old_ips != w.ips || changed || old_mode.mode != policy.mode.mode {
                        match self.deps.kernel.set_mode(pod.cookie, &pod.netns, &w.ips, policy.kernel_mode()) {
                            Ok(()) if old_mode.mode != policy.mode.mode || old_kernel != policy.kernel_mode() => {
                                info!(pod = %key, from = %old_mode.mode, mode = %policy.mode, kernel = %policy.kernel_mode(),
                                      "inbound mode changed")
                            }
                            Ok(()) => {}
                            Err(e) => {
                                // The kernel may not hold the new mode: the pod is set up again
                                // (on the very listeners), or failing and held, and retried.
                                warn!(pod = %key, error = %e, "cannot update the pod's inbound mode in the kernel");
                                let cookie = pod.cookie;
                                self.inherited.put(cookie, std::mem::take(&mut handover));
                                let old = Slot::Running { pod, accepting, handover };
                                self.remove(key, old, "its inbound mode could not be updated", false);
                                self.apply(w.clone(), dir, 0, Some(cookie)).await;
                                continue;
                            }
                        }
                    }
                    pod.update(w.clone(), policy.clone());
                    if close_denied {
                        let closed = pod.close_denied(&policy);
                        if closed > 0 {
                            info!(pod = %key, closed, "policy change: established connections it denies were reset");
                        }
                    }
                    self.slots.insert(key.clone(), Slot::Running { pod, accepting, handover });
                }
                Some(Slot::Known { workload, cookie }) if !w.mesh && same_pod(&workload, w) => {
                    self.slots.insert(key.clone(), Slot::Known { workload: w.clone(), cookie });
                }
                Some(Slot::Failing { workload, attempt, retry_at, error, cookie, held }) if *workload == **w => {
                    // The same pod, maybe under another mode or per-port modes: held anew in
                    // place (mode, per-port modes, probe ports), its backoff kept.
                    let (cookie, held) = match cookie {
                        Some(_) => self.guard(w, dir, cookie),
                        None => (cookie, held),
                    };
                    self.slots.insert(key.clone(), Slot::Failing { workload, attempt, retry_at, error, cookie, held });
                }
                Some(mut old) => {
                    let why = if old.workload().mesh != w.mesh { "mesh membership changed" } else { "pod changed" };
                    let same_netns = old.workload().netns == w.netns;
                    if let (true, Slot::Running { pod, handover, .. }) = (same_netns, &mut old) {
                        // Same netns: the new enrollment takes over the very listening sockets.
                        self.inherited.put(pod.cookie, std::mem::take(handover));
                    }
                    // Same netns: the kernel entry is overwritten below, never briefly missing.
                    let known = if same_netns { old.cookie() } else { None };
                    self.remove(key, old, why, !same_netns);
                    self.apply(w.clone(), dir, 0, known).await;
                }
            }
        }
        self.publish();
    }

    /// Publishes the enrolled pods (for the data path's readers: Workload API, admin) and the
    /// node's status.
    fn publish(&self) {
        let pods: Vec<Arc<LocalPod>> = if self.draining {
            Vec::new()
        } else {
            self.slots
                .values()
                .filter_map(|s| match s {
                    Slot::Running { pod, .. } => Some(pod.clone()),
                    _ => None,
                })
                .collect()
        };
        self.deps.local_pods.store(Arc::new(pods));
        self.deps.status.store(Arc::new(self.status()));
    }

    /// The state of every pod this agent manages, sorted by pod.
    pub fn status(&self) -> NodeStatus {
        let mut pods: Vec<PodStatus> = self
            .slots
            .iter()
            .map(|(key, slot)| {
                let w = slot.workload();
                let (state, netns_cookie, mode, error, attempts, retry_at) = match slot {
                    Slot::Running { pod, .. } => {
                        (PodState::Enrolled, Some(pod.cookie), Some(pod.policy().mode.mode), None, 0, None)
                    }
                    Slot::Known { cookie, .. } => (PodState::OutsideMesh, Some(*cookie), None, None, 0, None),
                    Slot::Failing { attempt, retry_at, error, cookie, held, .. } => {
                        (PodState::Failing, *cookie, *held, Some(error.clone()), *attempt, Some(*retry_at))
                    }
                };
                PodStatus {
                    pod: key.clone(),
                    identity: w.identity.to_string(),
                    ips: w.ips.clone(),
                    state,
                    netns_cookie,
                    mode,
                    last_error: error,
                    attempts,
                    retry_at,
                    retry_in_ms: None,
                    certificate: None,
                    connections: None,
                }
            })
            .collect();
        pods.sort_by(|a, b| a.pod.cmp(&b.pod));
        NodeStatus { draining: self.draining, pods, ..NodeStatus::default() }
    }

    /// Retries the pods whose retry time has come.
    pub async fn retry_due(&mut self, dir: &Directory) {
        self.retry_due_at(dir, Instant::now()).await
    }

    /// Retries the pods whose retry time is at or before `now`.
    async fn retry_due_at(&mut self, dir: &Directory, now: Instant) {
        let due: Vec<PodKey> = self
            .slots
            .iter()
            .filter(|(_, s)| matches!(s, Slot::Failing { retry_at, .. } if *retry_at <= now))
            .map(|(k, _)| k.clone())
            .collect();
        for key in due {
            if let Some(Slot::Failing { workload, attempt, cookie, .. }) = self.slots.remove(&key) {
                self.apply(workload, dir, attempt, cookie).await;
            }
        }
        self.publish();
    }

    /// When the next retry is due, if any pod is failing.
    pub fn next_retry(&self) -> Option<Instant> {
        self.slots
            .values()
            .filter_map(|s| match s {
                Slot::Failing { retry_at, .. } => Some(*retry_at),
                _ => None,
            })
            .min()
    }

    /// (enrolled, known and left alone, failing) pod counts.
    pub fn counts(&self) -> (usize, usize, usize) {
        let mut c = (0, 0, 0);
        for s in self.slots.values() {
            match s {
                Slot::Running { .. } => c.0 += 1,
                Slot::Known { .. } => c.1 += 1,
                Slot::Failing { .. } => c.2 += 1,
            }
        }
        c
    }

    /// Connections in progress on all pods.
    pub fn live_connections(&self) -> usize {
        self.slots
            .values()
            .map(|s| match s {
                Slot::Running { pod, .. } => pod.conns.len(),
                _ => 0,
            })
            .sum()
    }

    /// The netns cookies of every pod this agent has written to the kernel.
    pub fn cookies(&self) -> Vec<u64> {
        self.slots.values().filter_map(Slot::cookie).collect()
    }

    /// Listeners nobody claimed are closed (their pods are gone).
    pub fn release_inherited(&mut self) {
        let n = self.inherited.release();
        if n > 0 {
            info!(listeners = n, "closed inherited listeners of pods that are gone");
        }
    }

    /// Duplicates of every pod's listening sockets, for a successor.
    pub fn handover_listeners(&self) -> Vec<(ListenerSpec, std::net::TcpListener)> {
        let mut out = Vec::new();
        for slot in self.slots.values() {
            if let Slot::Running { handover, .. } = slot {
                for (spec, l) in handover {
                    match l.try_clone() {
                        Ok(dup) => out.push((spec.clone(), dup)),
                        Err(e) => warn!(pod = %spec.pod, error = %e, "cannot duplicate a listener for the successor"),
                    }
                }
            }
        }
        out
    }

    /// Stops accepting on every pod (the listeners close in this process; a successor that took
    /// them over keeps them open), and tells tunnel peers to go elsewhere. Returns the pods'
    /// connection trackers, to drain.
    pub fn stop_accepting(&mut self) -> Vec<Arc<LocalPod>> {
        self.draining = true;
        self.publish();
        let mut pods = Vec::new();
        for slot in self.slots.values_mut() {
            if let Slot::Running { pod, accepting, handover } = slot {
                accepting.cancel();
                handover.clear();
                pod.draining.cancel();
                pods.push(pod.clone());
            }
        }
        pods
    }

    /// Sets `w` up (`known`: its netns cookie, if an earlier attempt learned it); a pod that
    /// cannot be set up is failing, held in the kernel, and retried with backoff.
    async fn apply(&mut self, w: Arc<Workload>, dir: &Directory, attempt: u32, known: Option<u64>) {
        self.apply_one(w, dir, attempt, known).await;
        // The status goes out per pod, not per pass: a CNI ADD waiting on this pod is answered
        // as soon as it is set up (or held), however many pods the pass still has to do (each
        // may wait on the issuer).
        self.deps.status.store(Arc::new(self.status()));
    }

    async fn apply_one(&mut self, w: Arc<Workload>, dir: &Directory, attempt: u32, known: Option<u64>) {
        let result = if w.mesh {
            self.enroll(&w, dir.policy_for(&w)).await
        } else {
            self.know(&w).map(|cookie| Slot::Known { workload: w.clone(), cookie })
        };
        match result {
            Ok(slot) => {
                self.slots.insert(w.key.clone(), slot);
            }
            Err(e) => {
                let delay = backoff(attempt);
                warn!(pod = %w.key, error = %e, attempt = attempt + 1, retry_in_ms = delay.as_millis() as u64,
                    "pod cannot be set up; it cannot connect out until it is (retrying)");
                let (cookie, held) = self.guard(&w, dir, known);
                self.slots.insert(
                    w.key.clone(),
                    Slot::Failing {
                        workload: w,
                        attempt: attempt + 1,
                        retry_at: Instant::now() + delay,
                        error: e.to_string(),
                        cookie,
                        held,
                    },
                );
            }
        }
    }

    /// The mode the kernel must hold for `w` while it cannot be served (`None`: not in the mesh).
    fn guard_mode(&self, w: &Workload, dir: &Directory) -> Option<Mode> {
        w.mesh.then(|| dir.policy_for(w).kernel_mode())
    }

    /// Holds the inbound of a mesh pod that cannot be served as the kernel does with no agent
    /// (STRICT drops plaintext): whatever failed, steering is never lifted. Returns the pod's
    /// netns cookie (`known` if its netns cannot be opened now) and the mode held, if any.
    fn guard(&self, w: &Workload, dir: &Directory, known: Option<u64>) -> (Option<u64>, Option<Mode>) {
        let Some(Ok((netns, cookie))) = w.netns.as_ref().map(|p| self.deps.kernel.pod_netns(p)) else {
            return (known, None);
        };
        let Some(mode) = self.guard_mode(w, dir) else { return (Some(cookie), None) };
        if let Err(e) = self.deps.kernel.probe_ports(cookie, &w.probe_ports) {
            warn!(pod = %w.key, error = %e, "cannot set the failing pod's probe ports in the kernel");
        }
        if let Err(e) = self.deps.kernel.port_modes(cookie, &dir.policy_for(w).kernel_port_modes()) {
            warn!(pod = %w.key, error = %e, "cannot set the failing pod's per-port modes in the kernel");
        }
        match self.deps.kernel.guard(cookie, &netns, &w.ips, mode) {
            Ok(()) => (Some(cookie), Some(mode)),
            Err(e) => {
                warn!(pod = %w.key, error = %e, "cannot hold the failing pod's inbound mode in the kernel");
                (Some(cookie), None)
            }
        }
    }

    /// A pod outside the mesh: the kernel learns its netns, so its connects pass untouched.
    fn know(&self, w: &Workload) -> Result<u64, Error> {
        let (_, cookie) = self.deps.kernel.pod_netns(w.netns.as_ref().ok_or(Error::NoNetns)?)?;
        self.deps.kernel.bypass(cookie)?;
        info!(pod = %w.key, netns_cookie = cookie, "pod is outside the mesh; its connections pass untouched");
        Ok(cookie)
    }

    async fn enroll(&mut self, w: &Arc<Workload>, policy: Arc<PodPolicy>) -> Result<Slot, Error> {
        let deps = &self.deps;
        let (netns, cookie) = deps.kernel.pod_netns(w.netns.as_ref().ok_or(Error::NoNetns)?)?;
        let (listeners, inherited) = match self.inherited.take(&w.key, cookie) {
            Some(l) => (l, true),
            None => (Listeners(Vec::new()), false),
        };
        // Listeners not handed over (none, or a predecessor without some role) are opened here.
        let listeners = deps.kernel.listeners(&netns, &w.key, listeners)?;
        // The certificate comes before the kernel entry: the pod's first connection finds it.
        let cert = deps.identities.issue(&w.key.to_string(), &w.identity).await?;
        let serial = cert.issued().map(|i| i.serial.clone()).unwrap_or_default();
        let tls = deps.identities.pod_tls(cert)?;
        let orig = deps.kernel.enroll(cookie, &w.ips)?;
        deps.kernel.probe_ports(cookie, &w.probe_ports)?;
        deps.kernel.port_modes(cookie, &policy.kernel_port_modes())?;
        if let Some((_, l)) = listeners.0.iter().find(|(spec, _)| spec.role == Role::Inbound) {
            deps.kernel.steer(cookie, &netns, &w.ips, policy.kernel_mode(), l)?;
        }
        let handover =
            listeners.0.iter().filter_map(|(spec, l)| l.try_clone().ok().map(|dup| (spec.clone(), dup))).collect();
        let pod = Arc::new(LocalPod::new(w.clone(), netns, cookie, tls, orig, policy.clone()));
        let accepting = CancellationToken::new();
        proxy::serve_pod(&deps.proxy, &pod, listeners, &accepting).map_err(Error::Serve)?;
        info!(pod = %w.key, id = %w.identity, serial = %serial, netns_cookie = cookie, inherited_listeners = inherited,
            mode = %policy.mode, authorization_policies = policy.len(), "pod enrolled");
        Ok(Slot::Running { pod, accepting, handover })
    }

    /// Takes a pod out of service. `forget` removes its kernel state (the pod is gone); without
    /// it the caller writes the pod's new state over it.
    fn remove(&mut self, key: &PodKey, slot: Slot, why: &str, forget: bool) {
        match slot {
            Slot::Running { pod, accepting, .. } => {
                // Kernel first, so nothing new is captured; then the listeners; then the drain.
                if forget {
                    if let Err(e) = self.deps.kernel.forget(pod.cookie) {
                        warn!(pod = %key, error = %e, "cannot remove the pod's kernel state");
                    }
                }
                accepting.cancel();
                pod.draining.cancel();
                self.deps.proxy.pool.forget_source(pod.cookie);
                let deadline = self.deps.drain_timeout;
                let key = key.clone();
                let why = why.to_string();
                tokio::spawn(async move {
                    pod.conns.close();
                    let open = pod.conns.len();
                    let drained = tokio::time::timeout(deadline, pod.conns.wait()).await.is_ok();
                    if !drained {
                        pod.stop.cancel();
                        pod.conns.wait().await;
                    }
                    info!(pod = %key, why, connections_at_removal = open, drained, "pod unenrolled");
                });
            }
            Slot::Known { cookie, .. } => {
                if forget {
                    if let Err(e) = self.deps.kernel.forget(cookie) {
                        warn!(pod = %key, error = %e, "cannot remove the pod's kernel state");
                    }
                }
                info!(pod = %key, why, "pod forgotten");
            }
            Slot::Failing { cookie, .. } => {
                if let (true, Some(cookie)) = (forget, cookie) {
                    if let Err(e) = self.deps.kernel.forget(cookie) {
                        warn!(pod = %key, error = %e, "cannot remove the pod's kernel state");
                    }
                }
                info!(pod = %key, why, "pod that could not be set up was dropped")
            }
        }
    }
}

/// Whether two versions of a pod are the same running pod (same identity, same netns), so an
/// update is applied in place rather than by re-enrolling.
fn same_pod(a: &Workload, b: &Workload) -> bool {
    a.identity == b.identity && a.netns == b.netns
}

fn backoff(attempt: u32) -> Duration {
    FIRST_BACKOFF.saturating_mul(1 << attempt.min(16)).min(MAX_BACKOFF)
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashSet};
    use std::net::IpAddr;
    use std::path::{Path, PathBuf};

    use parking_lot::Mutex;
    use proptest::prelude::*;

    use super::*;
    use crate::capture::PodOrig;
    use crate::config::TunnelLimits;
    use crate::identity::{workload_id, TrustDomain};
    use crate::kernel;
    use crate::limits::HandshakeLimiter;
    use crate::netns::Netns;
    use crate::policy::{LabelMode, Mode, Policies};
    use crate::pool::Pool;
    use crate::status::{PodState, Published};
    use crate::workloads::Store;

    #[test]
    fn backoff_doubles_from_a_quarter_second_up_to_thirty() {
        let ms: Vec<u128> = (0..10).map(|a| backoff(a).as_millis()).collect();
        assert_eq!(ms, [250, 500, 1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000]);
        assert_eq!(backoff(u32::MAX), MAX_BACKOFF);
    }

    /// What the fake kernel holds for one netns cookie.
    #[derive(Debug, Clone, PartialEq, Eq)]
    enum Entry {
        /// Captured, with its addresses and inbound mode (`None`: not steered yet).
        Enrolled(Vec<IpAddr>, Option<Mode>),
        /// A failing pod's inbound held without a listener.
        Guarded(Vec<IpAddr>, Mode),
        Bypass,
    }

    /// A kernel that records what the lifecycle wrote. A netns path containing `broken` cannot be
    /// opened (a pod whose sandbox is gone); in one containing `busy` the agent's ports are taken;
    /// listeners are loopback sockets of the test's netns.
    #[derive(Default)]
    struct Fake {
        cookies: Mutex<HashMap<PathBuf, u64>>,
        entries: Mutex<HashMap<u64, Entry>>,
        /// The netns opened last: the lifecycle opens a pod's, then its listeners in it.
        opened: Mutex<PathBuf>,
    }

    impl Fake {
        fn cookie(&self, path: &Path) -> u64 {
            let mut c = self.cookies.lock();
            let next = c.len() as u64 + 1;
            *c.entry(path.into()).or_insert(next)
        }
    }

    impl kernel::Kernel for Arc<Fake> {
        fn pod_netns(&self, path: &Path) -> Result<(Netns, u64), kernel::Error> {
            if path.to_string_lossy().contains("broken") {
                return Err(kernel::Error::Netns(std::io::Error::from(std::io::ErrorKind::NotFound)));
            }
            *self.opened.lock() = path.into();
            Ok((Netns::current().map_err(kernel::Error::Netns)?, self.cookie(path)))
        }
        fn listeners(&self, _: &Netns, pod: &PodKey, have: Listeners) -> Result<Listeners, kernel::Error> {
            if self.opened.lock().to_string_lossy().contains("busy") {
                let addr = "[::]:15008".parse().unwrap();
                return Err(kernel::Error::Listen { addr, source: std::io::ErrorKind::AddrInUse.into() });
            }
            let mut out = have.0;
            for role in [Role::Outbound, Role::Inbound, Role::Tunnel] {
                if !out.iter().any(|(s, _)| s.role == role) {
                    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(kernel::Error::Netns)?;
                    let addr = l.local_addr().map_err(kernel::Error::Netns)?;
                    out.push((ListenerSpec { pod: pod.clone(), role, addr }, l));
                }
            }
            Ok(Listeners(out))
        }
        fn enroll(&self, cookie: u64, ips: &[IpAddr]) -> Result<PodOrig, kernel::Error> {
            let mut e = self.entries.lock();
            let mode = match e.get(&cookie) {
                Some(Entry::Enrolled(_, mode)) => *mode,
                _ => None,
            };
            e.insert(cookie, Entry::Enrolled(ips.to_vec(), mode));
            Ok(PodOrig::none())
        }
        fn steer(
            &self,
            cookie: u64,
            _: &Netns,
            ips: &[IpAddr],
            mode: Mode,
            _: &std::net::TcpListener,
        ) -> Result<(), kernel::Error> {
            self.set_mode(cookie, &Netns::current().map_err(kernel::Error::Netns)?, ips, mode)
        }
        fn guard(&self, cookie: u64, _: &Netns, ips: &[IpAddr], mode: Mode) -> Result<(), kernel::Error> {
            self.entries.lock().insert(cookie, Entry::Guarded(ips.to_vec(), mode));
            Ok(())
        }
        fn set_mode(&self, cookie: u64, _: &Netns, ips: &[IpAddr], mode: Mode) -> Result<(), kernel::Error> {
            self.entries.lock().insert(cookie, Entry::Enrolled(ips.to_vec(), Some(mode)));
            Ok(())
        }
        fn probe_ports(&self, _: u64, _: &[u16]) -> Result<(), kernel::Error> {
            Ok(())
        }
        fn port_modes(&self, _: u64, _: &[(u16, Mode)]) -> Result<(), kernel::Error> {
            Ok(())
        }
        fn bypass(&self, cookie: u64) -> Result<(), kernel::Error> {
            self.entries.lock().insert(cookie, Entry::Bypass);
            Ok(())
        }
        fn forget(&self, cookie: u64) -> Result<(), kernel::Error> {
            self.entries.lock().remove(&cookie);
            Ok(())
        }
    }

    fn td() -> TrustDomain {
        TrustDomain::new("cluster.local").unwrap()
    }

    async fn manager(name: &str) -> (Manager<Arc<Fake>>, Arc<Fake>, Published) {
        let identities = crate::identity::store::test_identities(&format!("pods-{name}")).await;
        let empty = Arc::new(Directory::empty(td(), "node1".into(), "/unused".into()));
        let proxy = Arc::new(proxy::Inputs {
            limits: TunnelLimits::default(),
            store: Arc::new(Store::new(empty)),
            home: Netns::current().unwrap(),
            pool: Pool::new(TunnelLimits::default()),
            handshakes: HandshakeLimiter::new(8, 8),
            decisions: Default::default(),
            telemetry: crate::telemetry::Telemetry::new(false, Default::default(), 0),
        });
        let fake = Arc::new(Fake::default());
        let status = Published::default();
        let deps = Deps {
            kernel: fake.clone(),
            identities,
            proxy,
            local_pods: Default::default(),
            status: status.clone(),
            drain_timeout: Duration::from_millis(100),
        };
        (Manager::new(deps, Inherited::default()), fake, status)
    }

    /// One pod of the generated directories: which of a few netns paths it has, whether it is in
    /// the mesh, its addresses and the mode its label asks for.
    #[derive(Debug, Clone)]
    struct Spec {
        name: usize,
        netns: usize,
        mesh: bool,
        ips: usize,
        /// 0 STRICT, 1 PERMISSIVE, 2 DISABLE.
        mode: usize,
    }

    fn workload(s: &Spec) -> Workload {
        let name = format!("p{}", s.name);
        // Netns variant 2 is a sandbox that is gone, variant 3 one where the agent's ports are
        // taken: the pod fails and is retried.
        let netns = match s.netns {
            2 => format!("/fake/{name}-broken"),
            3 => format!("/fake/{name}-busy"),
            n => format!("/fake/{name}-{n}"),
        };
        let ips = (0..=s.ips).map(|i| IpAddr::from([10, s.name as u8, 0, i as u8])).collect();
        let mode = [Mode::Strict, Mode::Permissive, Mode::Disable][s.mode];
        Workload {
            key: PodKey { namespace: "ns".into(), name: name.clone() },
            service_account: name.clone(),
            node: "node1".into(),
            ips,
            netns: Some(PathBuf::from(netns)),
            cgroup: None,
            mesh: s.mesh,
            host_network: false,
            identity: workload_id(&td(), "ns", &name).unwrap(),
            labels: BTreeMap::new(),
            label_mode: Some(LabelMode { mode, scope: "pod label" }),
            probe_ports: Vec::new(),
        }
    }

    fn directory(specs: &[Spec]) -> Directory {
        let mut seen = HashSet::new();
        let pods: Vec<Workload> = specs.iter().filter(|s| seen.insert(s.name)).map(workload).collect();
        Directory::new(td(), "node1".into(), "/unused".into(), pods, Policies::default()).unwrap()
    }

    /// The kernel state and node status a directory must leave, checked against what they are.
    fn check(dir: &Directory, fake: &Fake, status: &Published) -> Result<(), TestCaseError> {
        let mut want: HashMap<u64, Entry> = HashMap::new();
        let mut states: BTreeMap<String, PodState> = BTreeMap::new();
        for w in dir.local_pods() {
            let path = w.netns.as_ref().unwrap();
            let mode = dir.policy_for(w).mode.mode;
            let state = if path.to_string_lossy().contains("broken") {
                PodState::Failing
            } else if w.mesh && path.to_string_lossy().contains("busy") {
                // A failing pod's inbound is held: STRICT keeps dropping plaintext.
                want.insert(fake.cookie(path), Entry::Guarded(w.ips.clone(), mode));
                PodState::Failing
            } else if w.mesh {
                want.insert(fake.cookie(path), Entry::Enrolled(w.ips.clone(), Some(mode)));
                PodState::Enrolled
            } else {
                want.insert(fake.cookie(path), Entry::Bypass);
                PodState::OutsideMesh
            };
            states.insert(w.key.to_string(), state);
        }
        prop_assert_eq!(&*fake.entries.lock(), &want, "kernel state after {:?}", dir.local_pods().collect::<Vec<_>>());
        let published = status.load();
        let have: BTreeMap<String, PodState> = published.pods.iter().map(|p| (p.pod.to_string(), p.state)).collect();
        prop_assert_eq!(have, states, "published pod states");
        for p in published.pods.iter().filter(|p| p.state == PodState::Failing) {
            let why = p.last_error.as_deref().unwrap_or_default();
            prop_assert!(why.contains("network namespace") || why.contains("cannot listen"), "{:?}", p);
        }
        Ok(())
    }

    fn spec() -> impl Strategy<Value = Spec> {
        (0..4usize, 0..4usize, any::<bool>(), 0..2usize, 0..3usize).prop_map(|(name, netns, mesh, ips, mode)| Spec {
            name,
            netns,
            mesh,
            ips,
            mode,
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
        /// After any sequence of directories (pods added, removed, moved to another netns, in and
        /// out of the mesh, readdressed, their mode changed, failing), the kernel holds exactly
        /// the desired state and the published status says what each pod is.
        #[test]
        fn kernel_state_follows_any_sequence_of_directories(steps in prop::collection::vec(prop::collection::vec(spec(), 0..5), 1..6)) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                let (mut m, fake, status) = manager("prop").await;
                for step in &steps {
                    let dir = directory(step);
                    m.reconcile(&dir).await;
                    check(&dir, &fake, &status)?;
                }
                let end = directory(&[]);
                m.reconcile(&end).await;
                prop_assert!(fake.entries.lock().is_empty(), "every pod forgotten when the directory is empty");
                Ok(())
            })?;
        }
    }

    #[tokio::test]
    async fn a_failing_pod_is_retried_and_enrolled_once_its_netns_exists() {
        let (mut m, fake, status) = manager("retry").await;
        let broken = Spec { name: 1, netns: 2, mesh: true, ips: 0, mode: 0 };
        let dir = directory(std::slice::from_ref(&broken));
        m.reconcile(&dir).await;
        check(&dir, &fake, &status).unwrap();
        let failing = &status.load().pods[0];
        assert_eq!((failing.state, failing.attempts), (PodState::Failing, 1));
        assert!(m.next_retry().is_some(), "a retry is scheduled");
        // The same pod, retried while its sandbox is still gone: still failing, one more attempt.
        m.retry_due_at(&dir, Instant::now() + MAX_BACKOFF).await;
        assert_eq!(status.load().pods[0].attempts, 2);
        // Its sandbox appears: enrolled with the STRICT mode its label asks for.
        let fixed = directory(&[Spec { netns: 0, ..broken }]);
        m.reconcile(&fixed).await;
        check(&fixed, &fake, &status).unwrap();
        assert_eq!(m.counts(), (1, 0, 0));
        assert_eq!(status.load().pods[0].mode, Some(Mode::Strict));
        assert!(m.next_retry().is_none());
    }
}
