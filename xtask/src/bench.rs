//! `cargo xtask bench`: plaintext vs meshless on the namespace testbed, measured in the same run.
//!
//! Two nodes, one pod each; the client pod calls the server pod. First with no agents (plaintext
//! baseline), then through meshless (eBPF capture + HBONE mTLS on both nodes):
//! - one TCP stream of bulk data for `--seconds`;
//! - `--size`-byte request/response on one connection, `--count` round trips, p50/p99;
//! - connect + one request + close, `--connections` times in sequence (p50/p99, connections/s);
//! - a storm of `--storm` simultaneous connects, one request each (completion p50/p99).
//!
//! Then, meshless only: the agents' RSS at rest, per idle connection with `--connections` held,
//! and at rest after each of `--churn` rounds of `--connections` connections opened and closed;
//! then the same agents restarted with `--telemetry false` (no connection metrics, access log or
//! flow table): the speed runs and the idle connections again, for telemetry's own cost; and the
//! policy engine's criterion benchmark (decision time with 10 and 10 000 policies).

use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use meshless_tests::mesh::{run_ok, wait_listening, Bins, Mesh};
use meshless_tests::{sockaddr, Layout, Pod, Testbed};
use serde_json::{json, Value};

#[derive(clap::Args)]
pub struct Args {
    /// Seconds of bulk transfer per run.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Request/response round trips per run (after 100 warm-up ones).
    #[arg(long, default_value_t = 10_000)]
    count: usize,
    /// Request and response size in bytes.
    #[arg(long, default_value_t = 1024)]
    size: usize,
    /// Sequential connections (connect + request + close), and connections held / churned.
    #[arg(long, default_value_t = 2000)]
    connections: usize,
    /// Simultaneous connects in the storm.
    #[arg(long, default_value_t = 200)]
    storm: usize,
    /// Rounds of churn (open and close `--connections` connections) after which RSS is read.
    #[arg(long, default_value_t = 10)]
    churn: usize,
    /// Measure memory only (idle connections and churn), skipping the speed runs.
    #[arg(long)]
    memory_only: bool,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

#[derive(Default)]
struct Figures {
    gbit: f64,
    rr_p50: f64,
    rr_p99: f64,
    crr_p50: f64,
    crr_p99: f64,
    conn_per_s: f64,
    storm_p50: f64,
    storm_p99: f64,
}

struct Ports {
    sink: String,
    echo: String,
}

pub fn run(bins: &Bins, args: Args) -> Result<()> {
    if !(0.5..=120.0).contains(&args.seconds)
        || !(1000..=1_000_000).contains(&args.count)
        || !(10..=20_000).contains(&args.connections)
        || !(1..=2000).contains(&args.storm)
        || args.churn > 50
    {
        bail!("--seconds 0.5..=120, --count 1000..=1000000, --connections 10..=20000, --storm 1..=2000, --churn ..=50");
    }
    let tb = Testbed::new(Layout { label: "bench", pods: &[1, 1] })?;
    let (client, server) = (tb.pod(1, 1), tb.pod(2, 1));
    tb.spawn(server.command(&bins.testbin)?.args(["sink", "9000"]).stderr(Stdio::null()))?;
    tb.spawn(server.command(&bins.testbin)?.args(["echo-serve", "9001"]).stderr(Stdio::null()))?;
    wait_listening(&server.netns, 9000)?;
    wait_listening(&server.netns, 9001)?;
    let ports = Ports { sink: sockaddr(server.ipv4.into(), 9000), echo: sockaddr(server.ipv4.into(), 9001) };

    let plain = if args.memory_only {
        Figures::default()
    } else {
        measure(bins, client, &ports, &args, "plaintext (no agents)")?
    };
    // The production log level: one access log line per connection and side.
    let info = |_| vec!["--log".to_string(), "info".to_string()];
    let mut mesh = Mesh::start_with(&tb, bins, &|_| Some(true), &info)?;
    std::thread::sleep(Duration::from_millis(500));
    let rss_rest = rss_all(&mesh)?;
    let meshed = if args.memory_only {
        // One call through the mesh, so that the check below means something.
        run_ok(client.command(&bins.testbin)?.args(["send", &ports.echo, "x"]))?;
        Figures::default()
    } else {
        measure(bins, client, &ports, &args, "meshless (eBPF capture + HBONE mTLS)")?
    };
    let carried =
        mesh.log_lines(2).iter().filter(|l| l["message"] == "inbound decision" && l["transport"] == "hbone").count();
    if carried < 1 {
        bail!("the meshless runs were not carried by the mesh (node2 authorized {carried} connections)");
    }
    let handshakes = if args.memory_only { Value::Null } else { handshake_rates(bins, &tb, &mesh)? };
    settle();
    let rss_before_hold = rss_all(&mesh)?;
    eprintln!("bench: holding {} idle connections", args.connections);
    let held = hold(bins, client, &ports.echo, args.connections)?;
    settle();
    let rss_held = rss_all(&mesh)?;
    release(held)?;
    let per_conn: Vec<f64> =
        rss_held.iter().zip(&rss_before_hold).map(|(h, b)| (*h as f64 - *b as f64) / args.connections as f64).collect();
    let mut churn = Vec::new();
    for round in 1..=args.churn {
        eprintln!("bench: churn round {round}/{}: {} connections opened and closed", args.churn, args.connections);
        release(hold(bins, client, &ports.echo, args.connections)?)?;
        settle();
        churn.push(rss_all(&mesh)?);
    }

    // The same agents without per-connection telemetry: its cost, measured in this run.
    for node in [1, 2] {
        let args = ["--log", "info", "--telemetry", "false"].map(String::from).to_vec();
        mesh.restart_with(&tb, bins, node, args)?;
    }
    settle();
    let rss_rest_off = rss_all(&mesh)?;
    let off = if args.memory_only {
        Figures::default()
    } else {
        measure(bins, client, &ports, &args, "meshless with --telemetry false")?
    };
    settle();
    let before_off = rss_all(&mesh)?;
    let held_off = hold(bins, client, &ports.echo, args.connections)?;
    settle();
    let per_conn_off: Vec<f64> = rss_all(&mesh)?
        .iter()
        .zip(&before_off)
        .map(|(h, b)| (*h as f64 - *b as f64) / args.connections as f64)
        .collect();
    release(held_off)?;

    let ratio = |m: f64, p: f64| m / p;
    println!();
    println!(
        "meshless bench — 2 nodes x 1 pod, namespaces on this machine; client, server and both agents share the cores"
    );
    println!("{:<44} {:>12} {:>12} {:>10}", "", "plaintext", "meshless", "ratio");
    let row = |name: String, p: f64, m: f64| {
        println!("{:<44} {:>12.2} {:>12.2} {:>9.2}x", name, p, m, ratio(m, p));
    };
    row("1 stream throughput (Gbit/s)".into(), plain.gbit, meshed.gbit);
    row(format!("{} B req/resp p50 (us)", args.size), plain.rr_p50, meshed.rr_p50);
    row(format!("{} B req/resp p99 (us)", args.size), plain.rr_p99, meshed.rr_p99);
    row("connect+request+close p50 (us)".into(), plain.crr_p50, meshed.crr_p50);
    row("connect+request+close p99 (us)".into(), plain.crr_p99, meshed.crr_p99);
    row("sequential connections per second".into(), plain.conn_per_s, meshed.conn_per_s);
    row(format!("storm of {} connects, completion p50 (us)", args.storm), plain.storm_p50, meshed.storm_p50);
    row(format!("storm of {} connects, completion p99 (us)", args.storm), plain.storm_p99, meshed.storm_p99);
    println!("{:<44} {:>12} {:>12.1}", "added req/resp p50 (us)", "", meshed.rr_p50 - plain.rr_p50);
    println!("{:<44} {:>12} {:>12.1}", "added connect+request p50 (us)", "", meshed.crr_p50 - plain.crr_p50);
    println!();
    println!("telemetry's cost: meshless as above, and again with --telemetry false");
    println!("{:<44} {:>12} {:>12} {:>10}", "", "off", "on", "on / off");
    let row = |name: &str, off: f64, on: f64| println!("{:<44} {:>12.2} {:>12.2} {:>9.3}x", name, off, on, on / off);
    row("1 stream throughput (Gbit/s)", off.gbit, meshed.gbit);
    row("connect+request+close p50 (us)", off.crr_p50, meshed.crr_p50);
    row("sequential connections per second", off.conn_per_s, meshed.conn_per_s);
    row(&format!("{} B req/resp p50 (us)", args.size), off.rr_p50, meshed.rr_p50);
    for (i, (on, off)) in per_conn.iter().zip(&per_conn_off).enumerate() {
        row(&format!("node{} per idle connection (KiB)", i + 1), *off, *on);
    }
    for (i, (on, off)) in rss_rest.iter().zip(&rss_rest_off).enumerate() {
        row(&format!("node{} RSS at rest (MiB)", i + 1), *off as f64 / 1024.0, *on as f64 / 1024.0);
    }
    if let (Some(full), Some(resumed)) = (handshakes["full_per_s"].as_f64(), handshakes["resumed_per_s"].as_f64()) {
        println!(
            "{:<44} {:>12.0} full, {:.0} resumed ({:.0} % resumed)",
            "TLS handshakes/s against a pod's tunnel port",
            full,
            resumed,
            handshakes["resumed_share"].as_f64().unwrap_or(0.0) * 100.0
        );
    }
    let mib = |v: &[u64]| v.iter().map(|k| format!("{:.1}", *k as f64 / 1024.0)).collect::<Vec<_>>().join(" / ");
    println!("agent RSS, node1 / node2 (MiB):");
    println!("  {:<42} {}", "at rest", mib(&rss_rest));
    println!("  {:<42} {}", format!("{} idle connections held", args.connections), mib(&rss_held));
    println!(
        "  {:<42} {}",
        "per idle connection (KiB)",
        per_conn.iter().map(|k| format!("{k:.2}")).collect::<Vec<_>>().join(" / ")
    );
    for (i, r) in churn.iter().enumerate() {
        println!("  {:<42} {}", format!("at rest after churn round {}", i + 1), mib(r));
    }
    if let Some(path) = args.json {
        let figs = |f: &Figures| {
            json!({"gbit_per_s": f.gbit, "rr_p50_us": f.rr_p50, "rr_p99_us": f.rr_p99, "crr_p50_us": f.crr_p50,
                   "crr_p99_us": f.crr_p99, "conn_per_s": f.conn_per_s, "storm_p50_us": f.storm_p50, "storm_p99_us": f.storm_p99})
        };
        let v = json!({
            "plaintext": figs(&plain),
            "meshless": figs(&meshed),
            "meshless_telemetry_off": figs(&off),
            "telemetry_off_rss_kib": {"rest": rss_rest_off, "per_idle_connection": per_conn_off},
            "ratio": {"throughput": meshed.gbit / plain.gbit, "rr_p50": meshed.rr_p50 / plain.rr_p50,
                      "crr_p50": meshed.crr_p50 / plain.crr_p50, "conn_per_s": meshed.conn_per_s / plain.conn_per_s},
            "agent_rss_kib": {"rest": rss_rest, "held": rss_held, "per_idle_connection": per_conn, "after_churn": churn},
            "tls_handshakes": handshakes,
        });
        std::fs::write(&path, serde_json::to_string_pretty(&v)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    directory_scale()?;
    if !args.memory_only {
        policy_decisions()?;
    }
    Ok(())
}

/// The Kubernetes source at scale: 100 000 synthetic pods on 5 000 nodes through the agent's watch
/// mirror and directory builder (`agent/benches/directory.rs`, built with the `synthetic` feature,
/// never part of the agent), each size in a fresh process: the time from the first listed object
/// to the finished directory, and the memory it keeps. At the larger size, 10 000 Services with
/// 100 000 endpoints too: their build, one EndpointSlice change applied, the longest pause of the
/// runtime meanwhile, and the memory per endpoint.
fn directory_scale() -> Result<()> {
    for (pods, nodes, services) in [(10_000, 500, 0), (100_000, 5_000, 10_000)] {
        eprintln!("xtask: the Kubernetes directory with {pods} pods on {nodes} nodes (synthetic)");
        let out = run_ok(
            super::cargo()
                .args(["bench", "-q", "-p", "meshless-agent", "--features", "synthetic", "--bench", "directory", "--"])
                .args(["--pods", &pods.to_string(), "--nodes", &nodes.to_string()])
                .args(["--services", &services.to_string(), "--endpoints", &(services * 10).to_string()])
                // The directory code only: the bench profile need not build the kernel programs.
                .env("AYA_BUILD_SKIP", "1"),
        )?;
        let v = json(&out)?;
        println!(
            "kubernetes directory, {pods} pods / {nodes} nodes: synced in {:.0} ms, each rebuild {:.0} ms, \
             RSS {:.1} → {:.1} MiB ({:.0} bytes per pod), {} in the directory, {} local",
            num(&v, "sync_ms")?,
            num(&v, "rebuild_ms")?,
            num(&v, "rss_before_kib")? / 1024.0,
            num(&v, "rss_after_kib")? / 1024.0,
            num(&v, "bytes_per_pod")?,
            v["in_directory"],
            v["local"]
        );
        if services > 0 {
            let s = &v["services"];
            println!(
                "kubernetes services, {} Services / {} endpoints: built in {:.0} ms, one EndpointSlice change \
                 applied in {:.2} ms (median; the first after the list {:.2} ms; longest timer lateness on \
                 the runtime meanwhile {:.2} ms, {:.2} ms with nothing applying), {:.0} bytes per endpoint",
                s["services"],
                s["endpoints"],
                num(s, "build_ms")?,
                num(s, "apply_ms")?,
                num(s, "first_apply_ms")?,
                num(s, "max_pause_ms")?,
                num(s, "idle_pause_ms")?,
                num(s, "bytes_per_endpoint")?
            );
        }
    }
    Ok(())
}

/// The policy engine's criterion benchmark (`agent/benches/policy.rs`): the time of one
/// decision with 10 and with 10 000 policies in the cluster, and of compiling each set.
fn policy_decisions() -> Result<()> {
    eprintln!("xtask: running the policy decision benchmark (criterion)");
    let out = super::cargo()
        .args(["bench", "-p", "meshless-agent", "--bench", "policy"])
        // The decision code only: the bench profile need not build the kernel programs.
        .env("AYA_BUILD_SKIP", "1")
        .stderr(Stdio::inherit())
        .output()
        .context("running cargo bench")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("the policy benchmark failed:\n{text}");
    }
    println!("policy decisions (criterion; [low estimate, median, high estimate]):");
    for line in text.lines().filter(|l| l.contains("time:")) {
        println!("  {}", line.split_whitespace().collect::<Vec<_>>().join(" "));
    }
    Ok(())
}

fn measure(bins: &Bins, client: &Pod, ports: &Ports, args: &Args, label: &str) -> Result<Figures> {
    let run = |what: &[&str]| -> Result<Value> { json(&run_ok(client.command(&bins.testbin)?.args(what))?) };
    eprintln!("bench: {label}: one stream for {} s", args.seconds);
    let bulk = run(&["bulk", &ports.sink, &args.seconds.to_string()])?;
    eprintln!("bench: {label}: {} round trips of {} B", args.count, args.size);
    let rr = run(&["rr", &ports.echo, &args.size.to_string(), &args.count.to_string()])?;
    eprintln!("bench: {label}: {} sequential connect + request + close", args.connections);
    let crr = run(&["crr", &ports.echo, &args.connections.to_string()])?;
    eprintln!("bench: {label}: a storm of {} simultaneous connects", args.storm);
    let storm = run(&["storm", &ports.echo, &args.storm.to_string()])?;
    if num(&storm, "failed")? > 0.0 {
        bail!("{label}: storm connections failed: {storm}");
    }
    Ok(Figures {
        gbit: num(&bulk, "gbit_per_s")?,
        rr_p50: num(&rr, "p50_us")?,
        rr_p99: num(&rr, "p99_us")?,
        crr_p50: num(&crr, "p50_us")?,
        crr_p99: num(&crr, "p99_us")?,
        conn_per_s: num(&crr, "conn_per_s")?,
        storm_p50: num(&storm, "p50_us")?,
        storm_p99: num(&storm, "p99_us")?,
    })
}

/// Full and resumed TLS 1.3 handshakes per second against the server pod's tunnel port, by a
/// client on node 1 holding a genuine certificate.
fn handshake_rates(bins: &Bins, tb: &Testbed, mesh: &Mesh) -> Result<Value> {
    eprintln!("bench: TLS handshakes against a pod's tunnel port, full and resumed");
    run_ok(
        std::process::Command::new(&bins.meshless)
            .args(["ca", "issue", "--id", "spiffe://cluster.local/ns/default/sa/bench", "--name", "bench", "--ca-dir"])
            .arg(&mesh.ca_dir)
            .arg("--out")
            .arg(&tb.dir),
    )?;
    let tunnel = sockaddr(tb.pod(2, 1).ipv4.into(), 15008);
    let out = run_ok(
        tb.node(1)
            .netns
            .command(&bins.peer, None)?
            .args(["handshakes", &tunnel])
            .arg(tb.dir.join("bench.pem"))
            .arg(tb.dir.join("bench-key.pem")),
    )?;
    json(&out)
}

/// Opens `n` connections from `client` and keeps them until [`release`].
fn hold(bins: &Bins, client: &Pod, addr: &str, n: usize) -> Result<Child> {
    let mut child = client
        .command(&bins.testbin)?
        .args(["hold", addr, &n.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().expect("piped")).read_line(&mut line)?;
    if !line.contains("\"held\"") {
        let _ = child.kill();
        bail!("holding {n} connections failed (output {line:?})");
    }
    Ok(child)
}

fn release(mut child: Child) -> Result<()> {
    drop(child.stdin.take());
    let status = child.wait()?;
    if !status.success() {
        bail!("the connection holder failed: {status}");
    }
    Ok(())
}

/// Lets closed connections and freed memory settle before RSS is read (the agents give memory
/// back within a couple of seconds of a drop in load).
fn settle() {
    std::thread::sleep(Duration::from_millis(3000));
}

fn rss_all(mesh: &Mesh) -> Result<Vec<u64>> {
    mesh.agents.iter().map(|&pid| rss_kib(pid)).collect()
}

fn json(s: &str) -> Result<Value> {
    serde_json::from_str(s.trim()).with_context(|| format!("bad result line {s:?}"))
}

fn num(v: &Value, k: &str) -> Result<f64> {
    v[k].as_f64().with_context(|| format!("result has no {k}: {v}"))
}

fn rss_kib(pid: u32) -> Result<u64> {
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).with_context(|| format!("agent {pid} is gone"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS")
}
