//! The Kubernetes source at scale, without a cluster: synthetic objects through the very code the
//! live watches run. Built only with the `synthetic` feature, for `agent/benches/directory.rs`.

use super::*;

/// `pods` synthetic pods spread over
/// `nodes` nodes (and 100 namespaces, half of them opted in) go through the code the live
/// watches run — the watch mirror (one list: `Init`, `InitApply`…, `InitDone`) and the directory
/// builder — as the agent of `node-0`.
pub async fn run(pods: usize, nodes: usize) -> Scale {
    use crate::k8s::objects::{PodIp, PodSpec, PodStatus};
    use kube::api::ObjectMeta;
    let config = kube::Config::new("http://127.0.0.1:1".parse().expect("a URI"));
    let source = KubeSource {
        client: Client::try_from(config).expect("a client needs no server to exist"),
        node: Some("node-0".into()),
        trust_domain: TrustDomain::new("cluster.local").expect("valid"),
        cgroup_parent: PathBuf::from("/nonexistent"),
        cni_dir: PathBuf::new(),
        mesh: MeshSettings::default(),
        enrollment: None,
    };
    let started = Instant::now();
    let state = Arc::new(Mutex::new(Cluster::default()));
    let changed = Arc::new(Notify::new());
    let namespaces = (0..100).map(|n| {
        let mut ns = Namespace::default();
        ns.metadata.name = Some(format!("ns-{n}"));
        if n % 2 == 0 {
            ns.metadata.labels = Some(BTreeMap::from([(MODE_LABEL.to_string(), "strict".to_string())]));
        }
        Ok(watcher::Event::InitApply(ns))
    });
    let events = std::iter::once(Ok(watcher::Event::Init)).chain(namespaces).chain([Ok(watcher::Event::InitDone)]);
    mirror(
        2,
        futures_util::stream::iter(events),
        state.clone(),
        changed.clone(),
        |c| &mut c.namespaces,
        |n: Namespace| Some(n.labels().get(MODE_LABEL).cloned()),
    )
    .await;
    let pod = |i: usize| {
        let ip = std::net::Ipv4Addr::from(0x0a00_0000u32 + i as u32);
        Pod {
            metadata: ObjectMeta {
                name: Some(format!("pod-{i}")),
                namespace: Some(format!("ns-{}", i % 100)),
                uid: Some(format!("00000000-0000-0000-0000-{i:012}")),
                labels: Some(BTreeMap::from([("app".to_string(), format!("app-{}", i % 1000))])),
                ..Default::default()
            },
            spec: Some(PodSpec {
                node_name: Some(format!("node-{}", i % nodes)),
                service_account_name: Some(format!("sa-{}", i % 1000)),
                ..Default::default()
            }),
            status: Some(PodStatus {
                phase: Some("Running".into()),
                pod_ip: Some(ip.to_string()),
                pod_ips: Some(vec![PodIp { ip: ip.to_string() }]),
            }),
        }
    };
    let all = std::iter::once(Ok(watcher::Event::Init))
        .chain((0..pods).map(|i| Ok(watcher::Event::InitApply(pod(i)))))
        .chain([Ok(watcher::Event::InitDone)]);
    mirror(
        1,
        futures_util::stream::iter(all),
        state.clone(),
        changed.clone(),
        |c| &mut c.all,
        |p| Some(pod_info(&p, false)),
    )
    .await;
    let local = std::iter::once(Ok(watcher::Event::Init))
        .chain((0..pods).filter(|i| i % nodes == 0).map(|i| Ok(watcher::Event::InitApply(pod(i)))))
        .chain([Ok(watcher::Event::InitDone)]);
    mirror(
        0,
        futures_util::stream::iter(local),
        state.clone(),
        changed,
        |c| &mut c.local,
        |p| Some(pod_info(&p, true)),
    )
    .await;
    let mut builder = Builder::new(source, None);
    let dir = builder.build(&mut state.lock());
    let rebuild = Instant::now();
    // A second build, as after any change: what every later event burst costs.
    drop(builder.build(&mut state.lock()));
    let rebuild = rebuild.elapsed();
    Scale { sync: started.elapsed() - rebuild, rebuild, dir, state, builder: Some(builder), pods, nodes }
}

/// The synthetic cluster after [`run`]: its timings and directory, and the state to go on from.
pub struct Scale {
    /// From the first listed object to the finished directory.
    pub sync: Duration,
    /// One full rebuild (what a pod or policy change costs).
    pub rebuild: Duration,
    pub dir: Arc<Directory>,
    state: Arc<Mutex<Cluster>>,
    builder: Option<Builder>,
    pods: usize,
    nodes: usize,
}

/// EndpointSlice changes applied one after another.
const CHANGES: usize = 9;

/// What Services cost at scale.
pub struct ServiceScale {
    /// The build with every Service (a re-list).
    pub build: Duration,
    /// Applying one EndpointSlice change (the incremental build, as the agent runs it): the
    /// first after the re-list, and the median of the next ones.
    pub first: Duration,
    pub apply: Duration,
    /// The longest a task on the runtime (the data path) waited for its timer while the
    /// change applied.
    pub max_pause: Duration,
    /// The same with nothing applying (the timer's own lateness).
    pub idle_pause: Duration,
    pub dir: Arc<Directory>,
}

impl Scale {
    /// `services` Services of `endpoints / services` endpoints each (the synthetic pods, by
    /// `targetRef`; one EndpointSlice per Service) through the Service and EndpointSlice watch
    /// mirrors and a build; then EndpointSlice changes (an endpoint turns not ready), each applied
    /// by the agent's own build off the runtime, while a timer task measures the runtime's pauses.
    pub async fn services(&mut self, services: usize, endpoints: usize) -> ServiceScale {
        let per = (endpoints / services.max(1)).max(1);
        let changed = Arc::new(Notify::new());
        let service = |i: usize| -> super::super::objects::Service {
            let vip = std::net::Ipv4Addr::from(0x0a60_0000u32 + i as u32);
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": format!("svc-{i}"), "namespace": format!("ns-{}", i % 100)},
                "spec": {"clusterIP": vip.to_string(), "clusterIPs": [vip.to_string()],
                         "ports": [{"name": "http", "port": 80}]}}))
            .expect("a Service")
        };
        let slice = |i: usize, ready_first: bool| -> DynamicObject {
            let eps: Vec<serde_json::Value> = (0..per)
                .map(|j| {
                    // Distinct pods of the Service's namespace (pod k is in ns-(k % 100)).
                    let n = (i / 100) * per + j;
                    let k = i % 100 + 100 * (n % (self.pods / 100).max(1));
                    let ip = std::net::Ipv4Addr::from(0x0a00_0000u32 + k as u32);
                    serde_json::json!({"addresses": [ip.to_string()],
                        "conditions": {"ready": j != 0 || ready_first},
                        "nodeName": format!("node-{}", k % self.nodes), "zone": format!("zone-{}", k % 3),
                        "targetRef": {"kind": "Pod", "name": format!("pod-{k}"), "namespace": format!("ns-{}", i % 100)}})
                })
                .collect();
            serde_json::from_value(serde_json::json!({
                "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"name": format!("svc-{i}-abcde"), "namespace": format!("ns-{}", i % 100),
                             "labels": {"kubernetes.io/service-name": format!("svc-{i}")}},
                "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
                "endpoints": eps}))
            .expect("an EndpointSlice")
        };
        fn listed<K>(
            items: impl Iterator<Item = K>,
        ) -> impl Iterator<Item = Result<watcher::Event<K>, watcher::Error>> {
            let items = items.map(|o| Ok(watcher::Event::InitApply(o)));
            std::iter::once(Ok(watcher::Event::Init)).chain(items).chain([Ok(watcher::Event::InitDone)])
        }
        let svcs = listed((0..services).map(service));
        let started = Instant::now();
        mirror(
            3,
            futures_util::stream::iter(svcs),
            self.state.clone(),
            changed.clone(),
            |c| &mut c.services,
            |s| service_info(&s),
        )
        .await;
        let slices = listed((0..services).map(|i| slice(i, true)));
        mirror(
            4,
            futures_util::stream::iter(slices),
            self.state.clone(),
            changed.clone(),
            |c| &mut c.slices,
            |o| slice_info(&o),
        )
        .await;
        let builder = self.builder.take().expect("a builder");
        let (builder, _, _) = build_off_runtime(builder, self.state.clone()).await.expect("a build");
        let build = started.elapsed();
        // EndpointSlice changes, one at a time, as their watch delivers them, each applied by
        // the agent's own build; a timer task on the runtime measures its pauses meanwhile.
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let ticker = || {
            tokio::spawn({
                let stop = stop.clone();
                async move {
                    let mut worst = Duration::ZERO;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let t = Instant::now();
                        tokio::time::sleep(Duration::from_micros(200)).await;
                        worst = worst.max(t.elapsed().saturating_sub(Duration::from_micros(200)));
                    }
                    worst
                }
            })
        };
        // The same timer with nothing applying, first: the runtime's own lateness.
        let idle = ticker();
        tokio::time::sleep(Duration::from_millis(2 * CHANGES as u64 + 2)).await;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let idle_pause = idle.await.expect("the timer task");
        stop.store(false, std::sync::atomic::Ordering::Relaxed);
        let busy = ticker();
        let (mut builder, mut applied, mut dir) = (builder, Vec::new(), None);
        for k in 0..CHANGES {
            tokio::time::sleep(Duration::from_millis(2)).await;
            let one = [Ok(watcher::Event::Apply(slice(services / 2 + k, false)))];
            let (state, changed) = (self.state.clone(), changed.clone());
            mirror(4, futures_util::stream::iter(one), state, changed, |c| &mut c.slices, |o| slice_info(&o)).await;
            let (back, d, took) = build_off_runtime(builder, self.state.clone()).await.expect("a build");
            (builder, dir) = (back, Some(d));
            applied.push(took);
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let max_pause = busy.await.expect("the timer task");
        self.builder = Some(builder);
        let first = applied[0];
        applied.sort();
        ServiceScale {
            build,
            first,
            apply: applied[CHANGES / 2],
            max_pause,
            idle_pause,
            dir: dir.expect("a directory"),
        }
    }
}
