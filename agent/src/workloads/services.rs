//! Kubernetes Services as the outbound path needs them: a map (virtual IP, port) → the ready
//! endpoints behind it, resolved when a meshed pod connects (the captured original destination is
//! the VIP; the agent picks an endpoint and carries the connection to it — over HBONE, requiring
//! the endpoint pod's identity, when the endpoint is in the mesh).
//!
//! The semantics are kube-proxy's: ready endpoints are used; when none is left, the serving ones
//! that are terminating; `publishNotReadyAddresses` makes every endpoint ready. Named target ports
//! are resolved per endpoint (endpoints of one Service may serve a name on different ports). The
//! choice is the less loaded of two picked at random (connections the agent is opening or carrying
//! to each endpoint), or, with `sessionAffinity: ClientIP`, the same endpoint for the same client
//! while the endpoint set is unchanged. A connect that fails is tried on another endpoint, a
//! bounded number of times.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use super::{PodKey, Workload};
use crate::policy::canonical;

/// A Service's namespace and name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A Service port's target: a number, or the name of a port the endpoints declare.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetPort {
    Number(u16),
    Name(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePort {
    pub port: u16,
    pub target: TargetPort,
}

/// One endpoint, as an EndpointSlice says it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub addresses: Vec<IpAddr>,
    /// The pod it is (`targetRef`), when it is one.
    pub pod: Option<PodKey>,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    /// The endpoint's named ports (EndpointSlice `ports`): name → port.
    pub named_ports: BTreeMap<String, u16>,
}

/// A Service with a virtual IP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub key: ServiceKey,
    /// The ClusterIPs (IPv4 and/or IPv6).
    pub vips: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
    pub client_ip_affinity: bool,
    pub publish_not_ready: bool,
    pub endpoints: Vec<Endpoint>,
}

/// One endpoint of one (VIP, port), resolved: its address and port, and the pod when known.
#[derive(Debug)]
pub struct Backend {
    pub addr: SocketAddr,
    pub pod: Option<Arc<Workload>>,
    /// Connections the agent is opening or carrying to it (for the choice).
    pub load: AtomicUsize,
}

/// What one (VIP, port) resolves to.
#[derive(Debug)]
pub struct Frontend {
    pub service: ServiceKey,
    pub client_ip_affinity: bool,
    /// The endpoints used: the ready ones, or when none is, the serving terminating ones.
    pub backends: Vec<Arc<Backend>>,
}

/// The (VIP, port) → endpoints map of a directory.
#[derive(Debug, Default)]
pub struct ServiceMap {
    frontends: HashMap<(IpAddr, u16), Arc<Frontend>>,
    /// (Service, port) → its frontends (one per VIP), for `policy explain --to svc/…`.
    by_service: HashMap<(ServiceKey, u16), Vec<Arc<Frontend>>>,
    pub services: usize,
    pub endpoints: usize,
}

impl ServiceMap {
    /// Builds the map; `pod` finds the directory's pod of an endpoint (by key, else by address).
    pub fn new(services: &[Service], pod: impl Fn(Option<&PodKey>, IpAddr) -> Option<Arc<Workload>>) -> ServiceMap {
        let mut frontends = HashMap::new();
        let mut by_service: HashMap<(ServiceKey, u16), Vec<Arc<Frontend>>> = HashMap::new();
        let mut endpoints = 0;
        for s in services {
            endpoints += s.endpoints.len();
            let usable = |e: &&Endpoint| s.publish_not_ready || e.ready;
            let ready: Vec<&Endpoint> = s.endpoints.iter().filter(usable).collect();
            // kube-proxy: with no ready endpoint left, the serving terminating ones still serve.
            let chosen: Vec<&Endpoint> = if ready.is_empty() {
                s.endpoints.iter().filter(|e| e.serving && e.terminating).collect()
            } else {
                ready
            };
            for vip in &s.vips {
                let vip = canonical(*vip);
                for sp in &s.ports {
                    let mut backends: Vec<Arc<Backend>> = chosen
                        .iter()
                        .filter_map(|e| {
                            let port = match &sp.target {
                                TargetPort::Number(n) => *n,
                                TargetPort::Name(name) => *e.named_ports.get(name)?,
                            };
                            // The endpoint's address of the VIP's family.
                            let ip =
                                e.addresses.iter().map(|a| canonical(*a)).find(|a| a.is_ipv4() == vip.is_ipv4())?;
                            Some(Arc::new(Backend {
                                addr: SocketAddr::new(ip, port),
                                pod: pod(e.pod.as_ref(), ip),
                                load: AtomicUsize::new(0),
                            }))
                        })
                        .collect();
                    // An endpoint listed twice (in two slices) counts once.
                    let mut seen = std::collections::HashSet::new();
                    backends.retain(|b| seen.insert(b.addr));
                    let f = Frontend { service: s.key.clone(), client_ip_affinity: s.client_ip_affinity, backends };
                    let f = Arc::new(f);
                    by_service.entry((s.key.clone(), sp.port)).or_default().push(f.clone());
                    frontends.insert((vip, sp.port), f);
                }
            }
        }
        ServiceMap { frontends, by_service, services: services.len(), endpoints }
    }

    /// The endpoints of `service`'s `port`, over all its VIPs (each endpoint address once).
    pub fn endpoints_of(&self, service: &ServiceKey, port: u16) -> Option<Vec<Arc<Backend>>> {
        let fronts = self.by_service.get(&(service.clone(), port))?;
        let mut out: Vec<Arc<Backend>> = Vec::new();
        for b in fronts.iter().flat_map(|f| &f.backends) {
            if !out.iter().any(|o| o.addr == b.addr) {
                out.push(b.clone());
            }
        }
        Some(out)
    }

    /// The Service behind `dst`, if `dst` is a Service's VIP and port.
    pub fn get(&self, dst: SocketAddr) -> Option<&Arc<Frontend>> {
        self.frontends.get(&(canonical(dst.ip()), dst.port()))
    }
}

impl Frontend {
    /// An endpoint for a connection from `client`, not one of `tried` (endpoints that failed
    /// this connection already); `None` when none is left.
    pub fn pick(&self, client: IpAddr, tried: &[SocketAddr]) -> Option<Arc<Backend>> {
        let left: Vec<&Arc<Backend>> = self.backends.iter().filter(|b| !tried.contains(&b.addr)).collect();
        if left.is_empty() {
            return None;
        }
        if self.client_ip_affinity {
            // The same client, the same endpoint, while the endpoint set is the same.
            let mut h = std::collections::hash_map::DefaultHasher::new();
            std::hash::Hash::hash(&canonical(client), &mut h);
            let i = (std::hash::Hasher::finish(&h) % left.len() as u64) as usize;
            return Some(left[i].clone());
        }
        let a = left[fastrand::usize(..left.len())];
        let b = left[fastrand::usize(..left.len())];
        let pick = if b.load.load(Ordering::Relaxed) < a.load.load(Ordering::Relaxed) { b } else { a };
        Some(pick.clone())
    }
}

/// Counts a connection against its endpoint while it lives.
pub struct InFlight(Arc<Backend>);

impl InFlight {
    pub fn new(b: &Arc<Backend>) -> InFlight {
        b.load.fetch_add(1, Ordering::Relaxed);
        InFlight(b.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.load.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(ip: &str, ready: bool, serving: bool, terminating: bool) -> Endpoint {
        Endpoint {
            addresses: vec![ip.parse().unwrap()],
            pod: None,
            ready,
            serving,
            terminating,
            named_ports: BTreeMap::from([("http".to_string(), if ip.ends_with('1') { 8080 } else { 9090 })]),
        }
    }

    fn service(endpoints: Vec<Endpoint>, target: TargetPort) -> Service {
        Service {
            key: ServiceKey { namespace: "shop".into(), name: "web".into() },
            vips: vec!["10.96.0.10".parse().unwrap(), "fd00::10".parse().unwrap()],
            ports: vec![ServicePort { port: 80, target }],
            client_ip_affinity: false,
            publish_not_ready: false,
            endpoints,
        }
    }

    fn addrs(m: &ServiceMap, dst: &str) -> Vec<String> {
        let f = m.get(dst.parse().unwrap()).unwrap();
        f.backends.iter().map(|b| b.addr.to_string()).collect()
    }

    #[test]
    fn ready_endpoints_serve_then_terminating_ones_and_named_ports_resolve_per_endpoint() {
        let s = service(
            vec![
                ep("10.0.0.1", true, true, false),
                ep("10.0.0.2", false, true, true),
                ep("10.0.0.3", false, false, false),
            ],
            TargetPort::Name("http".into()),
        );
        let m = ServiceMap::new(std::slice::from_ref(&s), |_, _| None);
        assert_eq!(addrs(&m, "10.96.0.10:80"), ["10.0.0.1:8080"], "the ready one only");
        assert!(m.get("10.96.0.10:81".parse().unwrap()).is_none() && m.get("10.0.0.1:80".parse().unwrap()).is_none());
        assert!(addrs(&m, "[fd00::10]:80").is_empty(), "no IPv6 endpoint address");
        let mut draining = s.clone();
        draining.endpoints[0].ready = false;
        let m = ServiceMap::new(&[draining.clone()], |_, _| None);
        assert_eq!(addrs(&m, "10.96.0.10:80"), ["10.0.0.2:9090"], "no ready one: the serving terminating one");
        draining.publish_not_ready = true;
        let m = ServiceMap::new(&[draining], |_, _| None);
        assert_eq!(addrs(&m, "10.96.0.10:80").len(), 3, "publishNotReadyAddresses: all");
    }

    #[test]
    fn the_choice_skips_what_failed_spreads_load_and_keeps_a_client_with_affinity() {
        let eps = (1..=4).map(|i| ep(&format!("10.0.0.{i}"), true, true, false)).collect();
        let mut s = service(eps, TargetPort::Number(8080));
        let m = ServiceMap::new(std::slice::from_ref(&s), |_, _| None);
        let f = m.get("10.96.0.10:80".parse().unwrap()).unwrap();
        let client: IpAddr = "10.1.0.9".parse().unwrap();
        let mut tried = Vec::new();
        while let Some(b) = f.pick(client, &tried) {
            assert!(!tried.contains(&b.addr));
            tried.push(b.addr);
        }
        assert_eq!(tried.len(), 4, "every endpoint once, then none");
        // Least loaded of two: a busy endpoint is chosen less often than the idle ones.
        let _busy: Vec<InFlight> = (0..100).map(|_| InFlight::new(&f.backends[0])).collect();
        let chosen = (0..400).filter(|_| f.pick(client, &[]).unwrap().addr == f.backends[0].addr).count();
        assert!(chosen < 50, "the loaded endpoint was chosen {chosen} times of 400 (both picks: 1 in 16)");
        s.client_ip_affinity = true;
        let m = ServiceMap::new(&[s], |_, _| None);
        let f = m.get("10.96.0.10:80".parse().unwrap()).unwrap();
        let first = f.pick(client, &[]).unwrap().addr;
        assert!((0..50).all(|_| f.pick(client, &[]).unwrap().addr == first), "ClientIP: the same endpoint");
    }
}
