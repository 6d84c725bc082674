//! `cargo xtask bench`: plaintext vs meshless on the namespace testbed, measured in the same run.
//!
//! Two nodes, one pod each. (a) one TCP stream of bulk data for `--seconds`; (b) `--size`-byte
//! request/response on one connection, `--count` round trips, p50/p99. First with no agents
//! (plaintext baseline), then through meshless (eBPF capture + HBONE mTLS on both nodes). Reports
//! absolute figures, the ratio meshless/plaintext, and the agents' resident memory at rest.

use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use meshless_tests::mesh::{run_ok, wait_listening, Bins, Mesh};
use meshless_tests::{sockaddr, Layout, Testbed};
use serde_json::Value;

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
    /// Also write the results as JSON to this file.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

struct Figures {
    gbit: f64,
    p50: f64,
    p99: f64,
}

pub fn run(bins: &Bins, args: Args) -> Result<()> {
    if !(0.5..=120.0).contains(&args.seconds) || !(1000..=1_000_000).contains(&args.count) {
        bail!("--seconds must be in 0.5..=120 and --count in 1000..=1000000");
    }
    let tb = Testbed::new(Layout { label: "bench", pods: &[1, 1] })?;
    let (client, server) = (tb.pod(1, 1), tb.pod(2, 1));
    tb.spawn(server.command(&bins.testbin)?.args(["sink", "9000"]).stderr(Stdio::null()))?;
    tb.spawn(server.command(&bins.testbin)?.args(["echo-serve", "9001"]).stderr(Stdio::null()))?;
    wait_listening(&server.netns, 9000)?;
    wait_listening(&server.netns, 9001)?;

    let measure = |label: &str| -> Result<Figures> {
        eprintln!("bench: {label}: one stream for {} s", args.seconds);
        let bulk = json(&run_ok(client.command(&bins.testbin)?.args([
            "bulk",
            &sockaddr(server.ipv4.into(), 9000),
            &args.seconds.to_string(),
        ]))?)?;
        eprintln!("bench: {label}: {} round trips of {} B", args.count, args.size);
        let rr = json(&run_ok(client.command(&bins.testbin)?.args([
            "rr",
            &sockaddr(server.ipv4.into(), 9001),
            &args.size.to_string(),
            &args.count.to_string(),
        ]))?)?;
        Ok(Figures { gbit: num(&bulk, "gbit_per_s")?, p50: num(&rr, "p50_us")?, p99: num(&rr, "p99_us")? })
    };

    let plain = measure("plaintext (no agents)")?;
    let mesh = Mesh::start(&tb, bins, &|_| true, &[])?;
    std::thread::sleep(Duration::from_millis(500));
    let rss_rest: Vec<u64> = mesh.agents.iter().map(|&pid| rss_kib(pid)).collect::<Result<_>>()?;
    let meshed = measure("meshless (eBPF capture + HBONE mTLS)")?;
    let rss_after: Vec<u64> = mesh.agents.iter().map(|&pid| rss_kib(pid)).collect::<Result<_>>()?;
    let carried = mesh.log_lines(2).iter().filter(|l| l["message"] == "inbound connection authorized").count();
    if carried < 2 {
        bail!("the meshless runs were not carried by the mesh (node2 authorized {carried} connections)");
    }

    println!();
    println!(
        "meshless bench — 2 nodes x 1 pod, namespaces on this machine; client, server and both agents share the cores"
    );
    println!("{:<34} {:>12} {:>12} {:>10}", "", "plaintext", "meshless", "ratio");
    println!(
        "{:<34} {:>12.2} {:>12.2} {:>9.2}x",
        "1 stream throughput (Gbit/s)",
        plain.gbit,
        meshed.gbit,
        meshed.gbit / plain.gbit
    );
    println!(
        "{:<34} {:>12.1} {:>12.1} {:>9.2}x",
        format!("{} B req/resp p50 (us)", args.size),
        plain.p50,
        meshed.p50,
        meshed.p50 / plain.p50
    );
    println!(
        "{:<34} {:>12.1} {:>12.1} {:>9.2}x",
        format!("{} B req/resp p99 (us)", args.size),
        plain.p99,
        meshed.p99,
        meshed.p99 / plain.p99
    );
    println!("{:<34} {:>12} {:>12.1}", "added p50 latency (us)", "", meshed.p50 - plain.p50);
    println!(
        "{:<34} {:>12} {:>12}",
        "agent RSS at rest / after (MiB)",
        "",
        rss_rest
            .iter()
            .zip(&rss_after)
            .map(|(a, b)| format!("{:.1}/{:.1}", *a as f64 / 1024.0, *b as f64 / 1024.0))
            .collect::<Vec<_>>()
            .join(" ")
    );
    if let Some(path) = args.json {
        let v = serde_json::json!({
            "plaintext": {"gbit_per_s": plain.gbit, "p50_us": plain.p50, "p99_us": plain.p99},
            "meshless": {"gbit_per_s": meshed.gbit, "p50_us": meshed.p50, "p99_us": meshed.p99},
            "ratio": {"throughput": meshed.gbit / plain.gbit, "p50": meshed.p50 / plain.p50, "p99": meshed.p99 / plain.p99},
            "agent_rss_kib": {"rest": rss_rest, "after": rss_after},
        });
        std::fs::write(&path, serde_json::to_string_pretty(&v)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
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
