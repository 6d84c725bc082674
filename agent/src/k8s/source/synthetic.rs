//! The Kubernetes source at scale, without a cluster: synthetic objects through the very code the
//! live watches run. Built only with the `synthetic` feature, for `agent/benches/directory.rs`.

use super::*;

/// `pods` synthetic pods spread over
/// `nodes` nodes (and 100 namespaces, half of them opted in) go through the code the live
/// watches run — the watch mirror (one list: `Init`, `InitApply`…, `InitDone`) and the directory
/// builder — as the agent of `node-0`. Returns the time from the first object to the finished
/// directory, the time of one rebuild (what every later burst of changes costs), and the directory.
pub async fn run(pods: usize, nodes: usize) -> (Duration, Duration, Arc<Directory>) {
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
    let mut builder =
        Builder { source, cni: None, cgroups: HashMap::new(), problems: HashMap::new(), policies: None, last: None };
    let dir = builder.build(&state.lock());
    let rebuild = Instant::now();
    // A second build, as after any change: what every later event burst costs.
    drop(builder.build(&state.lock()));
    (started.elapsed() - rebuild.elapsed(), rebuild.elapsed(), dir)
}
