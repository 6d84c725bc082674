//! Kubernetes Services as the outbound path needs them: a map (virtual IP, port) → the ready
//! endpoints behind it, resolved when a meshed pod connects (the captured original destination is
//! the VIP; the agent picks an endpoint and carries the connection to it — over HBONE, requiring
//! the endpoint pod's identity, when the endpoint is in the mesh).
//!
//! The semantics are kube-proxy's: ready endpoints are used; when none is left, the serving ones
//! that are terminating; `publishNotReadyAddresses` makes every endpoint ready;
//! `internalTrafficPolicy: Local` keeps only this node's endpoints (none: the call is refused).
//! Named target ports are resolved per endpoint (endpoints of one Service may serve a name on
//! different ports). Locality: when every endpoint carries topology hints (`hints.forZones`,
//! what the EndpointSlice controller writes for topology-aware routing and `trafficDistribution:
//! PreferClose`) and some are for this node's zone, those are preferred; without hints,
//! `PreferClose` prefers the endpoints in this node's zone. Preferred endpoints are tried first;
//! the others only when every preferred one failed this connection.
//!
//! The choice is the less loaded of two picked at random (connections the agent is opening or
//! carrying to each endpoint; the counts live across updates of the map), or, with
//! `sessionAffinity: ClientIP`, the same endpoint for the same client while the endpoint set is
//! unchanged. A connect that fails is tried on another endpoint, a bounded number of times.
//!
//! The map is rebuilt per Service: a change to one Service or its EndpointSlices rebuilds that
//! Service's entries and shares every other one with the previous map ([`ServiceMap::update`]).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use super::{PodKey, Workload};
use crate::policy::canonical;

/// A Service's namespace and name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
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
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Endpoint {
    pub addresses: Vec<IpAddr>,
    /// The pod it is (`targetRef`), when it is one.
    pub pod: Option<PodKey>,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    /// The endpoint's named ports (EndpointSlice `ports`): name → port; shared by the endpoints
    /// of one slice.
    pub named_ports: Arc<BTreeMap<String, u16>>,
    /// The node it runs on (`nodeName`) and that node's zone (`zone`), when known.
    pub node: Option<String>,
    pub zone: Option<String>,
    /// The zones it should serve (`hints.forZones`), when topology hints are set.
    pub for_zones: Vec<String>,
}

/// A Service with a virtual IP.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Service {
    pub key: ServiceKey,
    /// The ClusterIPs (IPv4 and/or IPv6).
    pub vips: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
    pub client_ip_affinity: bool,
    pub publish_not_ready: bool,
    /// `internalTrafficPolicy: Local`: this node's endpoints only.
    pub node_local: bool,
    /// `trafficDistribution: PreferClose`: endpoints in this node's zone first.
    pub prefer_close: bool,
    pub endpoints: Vec<Endpoint>,
}

/// Where the agent runs: what `internalTrafficPolicy` and locality are decided against.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Here {
    pub node: String,
    /// The node's `topology.kubernetes.io/zone` label, when it has one.
    pub zone: Option<String>,
}

/// One endpoint of one (VIP, port), resolved: its address and port, and the pod when known.
#[derive(Debug)]
pub struct Backend {
    pub addr: SocketAddr,
    pub pod: Option<Arc<Workload>>,
    /// Connections the agent is opening or carrying to it (for the choice); shared with the same
    /// endpoint in the maps before and after this one, so an update does not forget the load.
    load: Arc<AtomicUsize>,
}

impl Backend {
    pub fn load(&self) -> usize {
        self.load.load(Ordering::Relaxed)
    }
}

/// What one (VIP, port) resolves to.
#[derive(Debug)]
pub struct Frontend {
    pub service: ServiceKey,
    pub client_ip_affinity: bool,
    /// The endpoints used: the ready ones, or when none is, the serving terminating ones; the
    /// preferred ones (locality) first.
    pub backends: Vec<Arc<Backend>>,
    /// How many of `backends` (from the start) are preferred; 0 when there is no preference.
    pub near: usize,
}

/// One Service's entries: each (VIP, port) with what it resolves to.
#[derive(Debug, Default)]
struct Entries {
    fronts: Vec<((IpAddr, u16), Arc<Frontend>)>,
    endpoints: usize,
}

/// The (VIP, port) → endpoints map of a directory.
#[derive(Debug, Default)]
pub struct ServiceMap {
    frontends: HashMap<(IpAddr, u16), Arc<Frontend>>,
    /// Keys behind an `Arc`: an update copies this index, pointers only.
    by_service: HashMap<Arc<ServiceKey>, Arc<Entries>>,
    here: Here,
    pub endpoints: usize,
}

impl ServiceMap {
    /// Builds the map; `pod` finds the directory's pod of an endpoint (by key, else by address).
    /// `prev`, the map this one replaces, lends its endpoints' load counts.
    pub fn new(
        services: &[Service],
        here: Here,
        prev: Option<&ServiceMap>,
        pod: impl Fn(Option<&PodKey>, IpAddr) -> Option<Arc<Workload>>,
    ) -> ServiceMap {
        let mut map = ServiceMap { here, ..ServiceMap::default() };
        for s in services {
            let before = prev.and_then(|p| p.by_service.get(&s.key));
            map.insert(s, before.map(|e| &**e), &pod);
        }
        map
    }

    /// This map with the `changed` Services replaced (`None`: gone); every other Service's
    /// entries are shared with `self`, so the cost is that of the changed Services (and of
    /// copying the index of pointers).
    pub fn update(
        &self,
        changed: &[(ServiceKey, Option<Service>)],
        pod: impl Fn(Option<&PodKey>, IpAddr) -> Option<Arc<Workload>>,
    ) -> ServiceMap {
        let mut map = ServiceMap {
            frontends: self.frontends.clone(),
            by_service: self.by_service.clone(),
            here: self.here.clone(),
            endpoints: self.endpoints,
        };
        for (key, service) in changed {
            let before = map.remove(key);
            if let Some(s) = service {
                map.insert(s, before.as_deref(), &pod);
            }
        }
        map
    }

    fn remove(&mut self, key: &ServiceKey) -> Option<Arc<Entries>> {
        let old = self.by_service.remove(key)?;
        for (k, f) in &old.fronts {
            if self.frontends.get(k).is_some_and(|now| Arc::ptr_eq(now, f)) {
                self.frontends.remove(k);
            }
        }
        self.endpoints -= old.endpoints;
        Some(old)
    }

    fn insert(
        &mut self,
        s: &Service,
        before: Option<&Entries>,
        pod: &impl Fn(Option<&PodKey>, IpAddr) -> Option<Arc<Workload>>,
    ) {
        let entries = Arc::new(entries(s, &self.here, before, pod));
        for (k, f) in &entries.fronts {
            self.frontends.insert(*k, f.clone());
        }
        self.endpoints += entries.endpoints;
        if let Some(old) = self.by_service.insert(Arc::new(s.key.clone()), entries) {
            self.endpoints -= old.endpoints;
        }
    }

    /// The Services the map holds.
    pub fn keys(&self) -> impl Iterator<Item = &ServiceKey> {
        self.by_service.keys().map(|k| &**k)
    }

    /// Whether `pod` is one of `service`'s endpoints.
    pub fn selects(&self, service: &ServiceKey, pod: &PodKey) -> bool {
        self.by_service.get(service).is_some_and(|e| {
            e.fronts.iter().flat_map(|(_, f)| &f.backends).any(|b| b.pod.as_ref().is_some_and(|p| &p.key == pod))
        })
    }

    /// How many Services the map holds.
    pub fn services(&self) -> usize {
        self.by_service.len()
    }

    /// The endpoints of `service`'s `port`, over all its VIPs (each endpoint address once).
    pub fn endpoints_of(&self, service: &ServiceKey, port: u16) -> Option<Vec<Arc<Backend>>> {
        let entries = self.by_service.get(service)?;
        let mut fronts = entries.fronts.iter().filter(|((_, p), _)| *p == port).peekable();
        fronts.peek()?;
        let mut out: Vec<Arc<Backend>> = Vec::new();
        for b in fronts.flat_map(|(_, f)| &f.backends) {
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

/// One Service's entries; `before` (its entries in the previous map) lends the load counts.
fn entries(
    s: &Service,
    here: &Here,
    before: Option<&Entries>,
    pod: &impl Fn(Option<&PodKey>, IpAddr) -> Option<Arc<Workload>>,
) -> Entries {
    let loads: HashMap<SocketAddr, &Arc<AtomicUsize>> =
        before.into_iter().flat_map(|e| &e.fronts).flat_map(|(_, f)| &f.backends).map(|b| (b.addr, &b.load)).collect();
    // Each endpoint with its pod (by targetRef, else by its first address) and node.
    let resolved: Vec<(&Endpoint, Option<Arc<Workload>>)> = s
        .endpoints
        .iter()
        .map(|e| (e, e.addresses.first().and_then(|ip| pod(e.pod.as_ref(), canonical(*ip)))))
        .collect();
    let node_of = |(e, p): &(&Endpoint, Option<Arc<Workload>>)| -> Option<String> {
        e.node.clone().or_else(|| p.as_ref().map(|p| p.node.clone()))
    };
    // internalTrafficPolicy: Local keeps this node's endpoints, then the usual choice.
    let candidates: Vec<&(&Endpoint, Option<Arc<Workload>>)> =
        resolved.iter().filter(|r| !s.node_local || node_of(r).as_deref() == Some(here.node.as_str())).collect();
    let ready: Vec<_> = candidates.iter().copied().filter(|(e, _)| s.publish_not_ready || e.ready).collect();
    // kube-proxy: with no ready endpoint left, the serving terminating ones still serve.
    let chosen: Vec<_> = if ready.is_empty() {
        candidates.iter().copied().filter(|(e, _)| e.serving && e.terminating).collect()
    } else {
        ready
    };
    let near = near_of(s, here, chosen.iter().map(|(e, _)| *e));
    let mut fronts = Vec::new();
    for vip in &s.vips {
        let vip = canonical(*vip);
        for sp in &s.ports {
            let mut seen = HashSet::new();
            let mut backends: Vec<(bool, Arc<Backend>)> = chosen
                .iter()
                .filter_map(|(e, p)| {
                    let port = match &sp.target {
                        TargetPort::Number(n) => *n,
                        TargetPort::Name(name) => *e.named_ports.get(name)?,
                    };
                    // The endpoint's address of the VIP's family.
                    let ip = e.addresses.iter().map(|a| canonical(*a)).find(|a| a.is_ipv4() == vip.is_ipv4())?;
                    let addr = SocketAddr::new(ip, port);
                    // An endpoint listed twice (in two slices) counts once.
                    if !seen.insert(addr) {
                        return None;
                    }
                    let pod = if e.addresses.first().map(|a| canonical(*a)) == Some(ip) {
                        p.clone()
                    } else {
                        pod(e.pod.as_ref(), ip)
                    };
                    let load = loads.get(&addr).map(|l| (*l).clone()).unwrap_or_default();
                    Some((near(e), Arc::new(Backend { addr, pod, load })))
                })
                .collect();
            // The preferred endpoints first (a stable sort keeps the slices' order otherwise).
            backends.sort_by_key(|(near, _)| !near);
            let near = backends.iter().filter(|(n, _)| *n).count();
            let backends = backends.into_iter().map(|(_, b)| b).collect();
            let f = Frontend { service: s.key.clone(), client_ip_affinity: s.client_ip_affinity, backends, near };
            fronts.push(((vip, sp.port), Arc::new(f)));
        }
    }
    Entries { fronts, endpoints: s.endpoints.len() }
}

/// Which of the chosen endpoints are preferred from this node: by topology hints when every
/// endpoint has them and some are for this zone (kube-proxy's rule); else, for `PreferClose`,
/// those in this node's zone. None preferred (all alike) without a zone or a match.
fn near_of<'a>(
    s: &Service,
    here: &Here,
    chosen: impl Iterator<Item = &'a Endpoint> + Clone,
) -> impl Fn(&Endpoint) -> bool {
    let zone = if s.node_local { None } else { here.zone.clone() };
    let hinted = zone.as_ref().is_some_and(|z| {
        chosen.clone().all(|e| !e.for_zones.is_empty()) && chosen.clone().any(|e| e.for_zones.contains(z))
    });
    let in_zone = zone.as_ref().is_some_and(|z| s.prefer_close && chosen.clone().any(|e| e.zone.as_ref() == Some(z)));
    move |e: &Endpoint| match &zone {
        Some(z) if hinted => e.for_zones.contains(z),
        Some(z) if in_zone => e.zone.as_ref() == Some(z),
        _ => false,
    }
}

impl Frontend {
    /// An endpoint for a connection from `client`, not one of `tried` (endpoints that failed
    /// this connection already): a preferred one while any is left, then any; `None` when none
    /// is left.
    pub fn pick(&self, client: IpAddr, tried: &[SocketAddr]) -> Option<Arc<Backend>> {
        let untried = |b: &&Arc<Backend>| !tried.contains(&b.addr);
        let mut left: Vec<&Arc<Backend>> = self.backends[..self.near].iter().filter(untried).collect();
        if left.is_empty() {
            left = self.backends.iter().filter(untried).collect();
        }
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
        let pick = if b.load() < a.load() { b } else { a };
        Some(pick.clone())
    }
}

/// Counts a connection against its endpoint while it lives.
pub struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    pub fn new(b: &Backend) -> InFlight {
        b.load.fetch_add(1, Ordering::Relaxed);
        InFlight(b.load.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(ip: &str, ready: bool, serving: bool, terminating: bool) -> Endpoint {
        Endpoint {
            addresses: vec![ip.parse().unwrap()],
            ready,
            serving,
            terminating,
            named_ports: Arc::new(BTreeMap::from([("http".to_string(), if ip.ends_with('1') { 8080 } else { 9090 })])),
            ..Endpoint::default()
        }
    }

    fn service(endpoints: Vec<Endpoint>, target: TargetPort) -> Service {
        Service {
            key: ServiceKey { namespace: "shop".into(), name: "web".into() },
            vips: vec!["10.96.0.10".parse().unwrap(), "fd00::10".parse().unwrap()],
            ports: vec![ServicePort { port: 80, target }],
            endpoints,
            ..Service::default()
        }
    }

    fn here(zone: Option<&str>) -> Here {
        Here { node: "node-a".into(), zone: zone.map(String::from) }
    }

    fn map(services: &[Service]) -> ServiceMap {
        ServiceMap::new(services, here(None), None, |_, _| None)
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
        let m = map(std::slice::from_ref(&s));
        assert_eq!(addrs(&m, "10.96.0.10:80"), ["10.0.0.1:8080"], "the ready one only");
        assert!(m.get("10.96.0.10:81".parse().unwrap()).is_none() && m.get("10.0.0.1:80".parse().unwrap()).is_none());
        assert!(addrs(&m, "[fd00::10]:80").is_empty(), "no IPv6 endpoint address");
        let mut draining = s.clone();
        draining.endpoints[0].ready = false;
        let m = map(std::slice::from_ref(&draining));
        assert_eq!(addrs(&m, "10.96.0.10:80"), ["10.0.0.2:9090"], "no ready one: the serving terminating one");
        draining.publish_not_ready = true;
        let m = map(&[draining]);
        assert_eq!(addrs(&m, "10.96.0.10:80").len(), 3, "publishNotReadyAddresses: all");
    }

    #[test]
    fn the_choice_skips_what_failed_spreads_load_and_keeps_a_client_with_affinity() {
        let eps = (1..=4).map(|i| ep(&format!("10.0.0.{i}"), true, true, false)).collect();
        let mut s = service(eps, TargetPort::Number(8080));
        let m = map(std::slice::from_ref(&s));
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
        let m = map(&[s]);
        let f = m.get("10.96.0.10:80".parse().unwrap()).unwrap();
        let first = f.pick(client, &[]).unwrap().addr;
        assert!((0..50).all(|_| f.pick(client, &[]).unwrap().addr == first), "ClientIP: the same endpoint");
    }

    #[test]
    fn an_update_rebuilds_the_changed_service_only_and_keeps_the_load_counts() {
        let mut web = service(vec![ep("10.0.0.1", true, true, false)], TargetPort::Number(8080));
        let mut db = service(vec![ep("10.0.1.1", true, true, false)], TargetPort::Number(5432));
        db.key.name = "db".into();
        db.vips = vec!["10.96.0.20".parse().unwrap()];
        let m = map(&[web.clone(), db.clone()]);
        let vip: SocketAddr = "10.96.0.10:80".parse().unwrap();
        let held = InFlight::new(&m.get(vip).unwrap().backends[0]);
        // One endpoint more for web: db's entry is the very same; web's first endpoint still
        // counts the connection opened before the update, and its end is counted too.
        web.endpoints.push(ep("10.0.0.2", true, true, false));
        let next = m.update(&[(web.key.clone(), Some(web.clone()))], |_, _| None);
        let db_vip: SocketAddr = "10.96.0.20:80".parse().unwrap();
        assert!(Arc::ptr_eq(m.get(db_vip).unwrap(), next.get(db_vip).unwrap()), "db was rebuilt");
        let f = next.get(vip).unwrap();
        assert_eq!(f.backends.len(), 2);
        assert_eq!(f.backends.iter().map(|b| b.load()).collect::<Vec<_>>(), [1, 0], "the load survived the update");
        drop(held);
        assert_eq!(f.backends[0].load(), 0, "the end of a connection opened before the update is counted");
        assert_eq!((next.services(), next.endpoints), (2, 3));
        // Gone: its VIPs resolve no more; a full rebuild from the same input gives the same map.
        let gone = next.update(&[(db.key.clone(), None)], |_, _| None);
        assert!(gone.get(db_vip).is_none() && gone.get(vip).is_some());
        assert_eq!((gone.services(), gone.endpoints), (1, 2));
        let full = ServiceMap::new(&[web], here(None), Some(&gone), |_, _| None);
        assert_eq!(addrs(&full, "10.96.0.10:80"), addrs(&gone, "10.96.0.10:80"));
    }

    #[test]
    fn node_local_services_use_this_nodes_endpoints_and_locality_prefers_this_zone() {
        let at = |ip: &str, node: &str, zone: &str| Endpoint {
            node: Some(node.into()),
            zone: Some(zone.into()),
            ..ep(ip, true, true, false)
        };
        let eps = vec![at("10.0.0.1", "node-b", "z2"), at("10.0.0.2", "node-a", "z1"), at("10.0.0.3", "node-c", "z1")];
        let mut s = service(eps, TargetPort::Number(8080));
        let vip: SocketAddr = "10.96.0.10:80".parse().unwrap();
        let client: IpAddr = "10.1.0.9".parse().unwrap();
        let build = |s: &Service, zone| ServiceMap::new(std::slice::from_ref(s), here(zone), None, |_, _| None);
        // No preference asked: all alike.
        assert_eq!(build(&s, Some("z1")).get(vip).unwrap().near, 0);
        // PreferClose: the zone's endpoints first; the others once those failed.
        s.prefer_close = true;
        let m = build(&s, Some("z1"));
        let f = m.get(vip).unwrap();
        assert_eq!(f.near, 2);
        let mut tried = vec![];
        while let Some(b) = f.pick(client, &tried) {
            tried.push(b.addr);
        }
        assert_eq!(tried.last().unwrap().to_string(), "10.0.0.1:8080", "the other zone last: {tried:?}");
        assert_eq!(build(&s, Some("z9")).get(vip).unwrap().near, 0, "no endpoint in this zone: all alike");
        assert_eq!(build(&s, None).get(vip).unwrap().near, 0, "no zone known: all alike");
        // Hints on every endpoint decide over zones (kube-proxy's rule).
        let mut hinted = s.clone();
        hinted.prefer_close = false;
        for (e, z) in hinted.endpoints.iter_mut().zip(["z1", "z2", "z2"]) {
            e.for_zones = vec![z.to_string()];
        }
        let m = build(&hinted, Some("z1"));
        assert_eq!(addrs(&m, "10.96.0.10:80")[0], "10.0.0.1:8080");
        assert_eq!(m.get(vip).unwrap().near, 1);
        hinted.endpoints[2].for_zones.clear();
        assert_eq!(build(&hinted, Some("z1")).get(vip).unwrap().near, 0, "hints on some endpoints only: ignored");
        // internalTrafficPolicy: Local: this node's endpoint only, and none when it has none.
        s.node_local = true;
        assert_eq!(addrs(&build(&s, Some("z1")), "10.96.0.10:80"), ["10.0.0.2:8080"]);
        s.endpoints.remove(1);
        assert!(addrs(&build(&s, Some("z1")), "10.96.0.10:80").is_empty(), "no endpoint here: none at all");
    }
}
