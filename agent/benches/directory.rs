//! The Kubernetes source at scale: `--pods` synthetic pods on `--nodes` nodes through the agent's
//! watch mirror and directory builder, in a process of their own; prints one JSON line: the time
//! from the first listed object to the finished directory, one rebuild, and the memory kept.
//! With `--services N --endpoints M`: then N Services with M endpoints in all (one EndpointSlice
//! each) through the same code, and one EndpointSlice change applied as the agent applies it.
//!
//! `cargo bench -p meshless-agent --features synthetic --bench directory -- --pods N --nodes M`
//! (run by `cargo xtask bench`).

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str, default: usize| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .map(|v| v.parse::<usize>().unwrap_or_else(|e| panic!("{name} {v}: {e}")))
            .unwrap_or(default)
    };
    let (pods, nodes) = (arg("--pods", 100_000), arg("--nodes", 5_000));
    let (services, endpoints) = (arg("--services", 0), arg("--endpoints", 0));
    let rss = || {
        std::fs::read_to_string("/proc/self/statm")
            .ok()
            .and_then(|s| s.split_whitespace().nth(1).and_then(|p| p.parse::<u64>().ok()))
            .map(|pages| pages * 4)
            .unwrap_or(0)
    };
    // Two workers, as the agent has: the builds run on a blocking thread beside them.
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("a runtime");
    let before = rss();
    let mut scale = rt.block_on(meshless::k8s::source::synthetic::run(pods, nodes));
    meshless::limits::release_free_memory();
    let after = rss();
    let dir = &scale.dir;
    let mut out = serde_json::json!({
        "pods": pods, "nodes": nodes, "in_directory": dir.len(),
        "local": dir.local_pods().count(), "sync_ms": scale.sync.as_secs_f64() * 1e3,
        "rebuild_ms": scale.rebuild.as_secs_f64() * 1e3,
        "rss_before_kib": before, "rss_after_kib": after,
        "bytes_per_pod": (after.saturating_sub(before) * 1024) as f64 / pods.max(1) as f64,
    });
    if services > 0 {
        let s = rt.block_on(scale.services(services, endpoints));
        meshless::limits::release_free_memory();
        let with = rss();
        out["services"] = serde_json::json!({
            "services": s.dir.services.services(), "endpoints": s.dir.services.endpoints,
            "build_ms": s.build.as_secs_f64() * 1e3, "apply_ms": s.apply.as_secs_f64() * 1e3,
            "first_apply_ms": s.first.as_secs_f64() * 1e3,
            "max_pause_ms": s.max_pause.as_secs_f64() * 1e3,
            "idle_pause_ms": s.idle_pause.as_secs_f64() * 1e3, "rss_kib": with,
            "bytes_per_endpoint": (with.saturating_sub(after) * 1024) as f64 / endpoints.max(1) as f64,
        });
    }
    println!("{out}");
}
