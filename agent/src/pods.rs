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
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use meshless_common::{INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT, TUNNEL_PORT};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::capture::Capture;
use crate::handover::{Inherited, ListenerSpec, Listeners, Role};
use crate::identity::store::Identities;
use crate::local::{LocalPod, LocalPods};
use crate::netns::{self, Netns};
use crate::policy::PodPolicy;
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
    #[error("{0}")]
    Netns(std::io::Error),
    #[error("cannot listen on {addr} inside its netns: {source} (is another agent or app using the port?)")]
    Listen { addr: SocketAddr, source: std::io::Error },
    #[error("identity: {0}")]
    Identity(#[from] crate::identity::Error),
    #[error("kernel maps: {0}")]
    Capture(#[from] crate::capture::Error),
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
    },
}

impl Slot {
    fn workload(&self) -> Arc<Workload> {
        match self {
            Slot::Running { pod, .. } => pod.workload(),
            Slot::Known { workload, .. } | Slot::Failing { workload, .. } => workload.clone(),
        }
    }
}

/// What the pod lifecycle needs, built once by the app.
pub struct Deps {
    pub capture: Arc<Capture>,
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

pub struct Manager {
    deps: Deps,
    slots: HashMap<PodKey, Slot>,
    /// Listeners handed over by a predecessor, not yet claimed by a pod.
    inherited: Inherited,
    /// Set once the agent stops accepting.
    draining: bool,
}

impl Manager {
    pub fn new(deps: Deps, inherited: Inherited) -> Manager {
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
                None => self.apply(w.clone(), dir, 0).await,
                Some(Slot::Running { pod, accepting, handover }) if w.mesh && same_pod(&pod.workload(), w) => {
                    let policy = dir.policy_for(w);
                    let (old_ips, old_mode) = (pod.workload().ips.clone(), pod.policy().mode.clone());
                    if old_ips != w.ips {
                        match self.deps.capture.enroll(pod.cookie, &w.ips) {
                            Ok(_) => info!(pod = %key, ips = ?w.ips, "pod addresses updated"),
                            Err(e) => warn!(pod = %key, error = %e, "cannot update the pod's addresses in the kernel"),
                        }
                    }
                    if old_ips != w.ips || old_mode.mode != policy.mode.mode {
                        match self.deps.capture.set_mode(pod.cookie, &w.ips, policy.mode.mode) {
                            Ok(()) if old_mode.mode != policy.mode.mode => {
                                info!(pod = %key, from = %old_mode.mode, mode = %policy.mode, "inbound mode changed")
                            }
                            Ok(()) => {}
                            Err(e) => {
                                warn!(pod = %key, error = %e, "cannot update the pod's inbound mode in the kernel")
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
                Some(Slot::Failing { workload, attempt, retry_at, error }) if *workload == **w => {
                    self.slots.insert(key.clone(), Slot::Failing { workload, attempt, retry_at, error });
                }
                Some(mut old) => {
                    let why = if old.workload().mesh != w.mesh { "mesh membership changed" } else { "pod changed" };
                    let same_netns = old.workload().netns == w.netns;
                    if let (true, Slot::Running { pod, handover, .. }) = (same_netns, &mut old) {
                        // Same netns: the new enrollment takes over the very listening sockets.
                        self.inherited.put(pod.cookie, std::mem::take(handover));
                    }
                    // Same netns: the kernel entry is overwritten below, never briefly missing.
                    self.remove(key, old, why, !same_netns);
                    self.apply(w.clone(), dir, 0).await;
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
        let now = Instant::now();
        let mut pods: Vec<PodStatus> = self
            .slots
            .iter()
            .map(|(key, slot)| {
                let w = slot.workload();
                let (state, netns_cookie, mode, error, attempts, retry_in_ms) = match slot {
                    Slot::Running { pod, .. } => {
                        (PodState::Enrolled, Some(pod.cookie), Some(pod.policy().mode.mode), None, 0, None)
                    }
                    Slot::Known { cookie, .. } => (PodState::OutsideMesh, Some(*cookie), None, None, 0, None),
                    Slot::Failing { attempt, retry_at, error, .. } => (
                        PodState::Failing,
                        None,
                        None,
                        Some(error.clone()),
                        *attempt,
                        Some(retry_at.saturating_duration_since(now).as_millis() as u64),
                    ),
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
                    retry_in_ms,
                    certificate: None,
                    connections: None,
                }
            })
            .collect();
        pods.sort_by(|a, b| a.pod.cmp(&b.pod));
        NodeStatus { draining: self.draining, pods, pool: Vec::new() }
    }

    /// Retries the pods whose retry time has come.
    pub async fn retry_due(&mut self, dir: &Directory) {
        let now = Instant::now();
        let due: Vec<PodKey> = self
            .slots
            .iter()
            .filter(|(_, s)| matches!(s, Slot::Failing { retry_at, .. } if *retry_at <= now))
            .map(|(k, _)| k.clone())
            .collect();
        for key in due {
            if let Some(Slot::Failing { workload, attempt, .. }) = self.slots.remove(&key) {
                self.apply(workload, dir, attempt).await;
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
        self.slots
            .values()
            .filter_map(|s| match s {
                Slot::Running { pod, .. } => Some(pod.cookie),
                Slot::Known { cookie, .. } => Some(*cookie),
                Slot::Failing { .. } => None,
            })
            .collect()
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

    async fn apply(&mut self, w: Arc<Workload>, dir: &Directory, attempt: u32) {
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
                self.slots.insert(
                    w.key.clone(),
                    Slot::Failing {
                        workload: w,
                        attempt: attempt + 1,
                        retry_at: Instant::now() + delay,
                        error: e.to_string(),
                    },
                );
            }
        }
    }

    /// A pod outside the mesh: the kernel learns its netns, so its connects pass untouched.
    fn know(&self, w: &Workload) -> Result<u64, Error> {
        let netns = Netns::open(w.netns.as_ref().ok_or(Error::NoNetns)?).map_err(Error::Netns)?;
        let cookie =
            netns.run(&self.deps.proxy.home, netns::current_cookie).map_err(Error::Netns)?.map_err(Error::Netns)?;
        self.deps.capture.bypass(cookie)?;
        info!(pod = %w.key, netns_cookie = cookie, "pod is outside the mesh; its connections pass untouched");
        Ok(cookie)
    }

    async fn enroll(&mut self, w: &Arc<Workload>, policy: Arc<PodPolicy>) -> Result<Slot, Error> {
        let deps = &self.deps;
        let home = &deps.proxy.home;
        let netns = Netns::open(w.netns.as_ref().ok_or(Error::NoNetns)?).map_err(Error::Netns)?;
        let cookie = netns.run(home, netns::current_cookie).map_err(Error::Netns)?.map_err(Error::Netns)?;
        let (listeners, inherited) = match self.inherited.take(&w.key, cookie) {
            Some(l) => (l, true),
            None => (Listeners(Vec::new()), false),
        };
        // Listeners not handed over (none, or a predecessor without some role) are opened here.
        let listeners = netns.run(home, || open_listeners(&w.key, listeners)).map_err(Error::Netns)??;
        // The certificate comes before the kernel entry: the pod's first connection finds it.
        let cert = deps.identities.issue(&w.key.to_string(), &w.identity).await?;
        let serial = cert.issued().map(|i| i.serial.clone()).unwrap_or_default();
        let tls = deps.identities.pod_tls(cert)?;
        let orig = deps.capture.enroll(cookie, &w.ips)?;
        if let Some((_, l)) = listeners.0.iter().find(|(spec, _)| spec.role == Role::Inbound) {
            deps.capture.steer(cookie, &netns, &w.ips, policy.mode.mode, l)?;
        }
        let handover =
            listeners.0.iter().filter_map(|(spec, l)| l.try_clone().ok().map(|dup| (spec.clone(), dup))).collect();
        let pod = Arc::new(LocalPod::new(w.clone(), netns, cookie, tls, orig, policy.clone()));
        let accepting = CancellationToken::new();
        proxy::serve_pod(&deps.proxy, &pod, listeners, &accepting).map_err(Error::Netns)?;
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
                    if let Err(e) = self.deps.capture.forget(pod.cookie) {
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
                    if let Err(e) = self.deps.capture.forget(cookie) {
                        warn!(pod = %key, error = %e, "cannot remove the pod's kernel state");
                    }
                }
                info!(pod = %key, why, "pod forgotten");
            }
            Slot::Failing { .. } => info!(pod = %key, why, "pod that could not be set up was dropped"),
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

/// Opens the agent's listeners inside the calling thread's netns (a pod's), but for the roles
/// `have` already holds (handed over by a predecessor): 127.0.0.1:15001 and [::1]:15001
/// (outbound capture), [::]:15006 (plaintext steered by sk_lookup) and [::]:15008 (tunnel), both
/// dual-stack. A pod without IPv6 gets the IPv4 ones only.
fn open_listeners(pod: &PodKey, have: Listeners) -> Result<Listeners, Error> {
    let listen = |role: Role, addr: SocketAddr| {
        netns::listener(addr).map(|l| (ListenerSpec { pod: pod.clone(), role, addr }, l))
    };
    let err = |addr| move |source| Error::Listen { addr, source };
    let mut out = have.0;
    let missing = |out: &Vec<(ListenerSpec, std::net::TcpListener)>, role| !out.iter().any(|(s, _)| s.role == role);
    if missing(&out, Role::Outbound) {
        let v4 = SocketAddr::from((Ipv4Addr::LOCALHOST, OUTBOUND_PORT));
        out.push(listen(Role::Outbound, v4).map_err(err(v4))?);
        let v6 = SocketAddr::from((Ipv6Addr::LOCALHOST, OUTBOUND_PORT));
        match listen(Role::Outbound, v6) {
            Ok(l) => out.push(l),
            Err(e) if netns::ipv6_unavailable(&e) => {}
            Err(e) => return Err(err(v6)(e)),
        }
    }
    for (role, port) in [(Role::Inbound, INBOUND_PLAINTEXT_PORT), (Role::Tunnel, TUNNEL_PORT)] {
        if !missing(&out, role) {
            continue;
        }
        let any6 = SocketAddr::from((Ipv6Addr::UNSPECIFIED, port));
        match listen(role, any6) {
            Ok(l) => out.push(l),
            Err(e) if netns::ipv6_unavailable(&e) => {
                let any4 = SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
                out.push(listen(role, any4).map_err(err(any4))?);
            }
            Err(e) => return Err(err(any6)(e)),
        }
    }
    Ok(Listeners(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_a_quarter_second_up_to_thirty() {
        let ms: Vec<u128> = (0..10).map(|a| backoff(a).as_millis()).collect();
        assert_eq!(ms, [250, 500, 1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000]);
        assert_eq!(backoff(u32::MAX), MAX_BACKOFF);
    }
}
