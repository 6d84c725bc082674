//! Orchestration for meshless: `setup` (toolchain), `test` (whole suite), `bench`, `demo`.
//!
//! The eBPF object itself is built by `agent/build.rs`; this crate only installs what that build
//! needs and runs the binaries on the namespace testbed from `meshless-tests`.

mod bench;
mod demo;
mod demo_kube;
mod kube;
mod setup;

use std::path::{Path, PathBuf};
use std::process::Command;

use std::io::{BufRead, BufReader};
use std::process::Stdio;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use meshless_tests::mesh::Bins;

#[derive(Parser)]
#[command(name = "xtask", about = "meshless build, test, bench and demo tasks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install the toolchain pieces (apt packages, rust-src, bpf-linker). Idempotent.
    Setup,
    /// Build (once, cached outside the clone) the kube-apiserver and etcd the Kubernetes tests use.
    KubeApiserver,
    /// Build the agent (with its embedded eBPF object) and the test tools, release profile.
    Build,
    /// Run the whole test suite: unit, in-process and privileged end-to-end tests.
    Test {
        /// Extra arguments passed to the test binaries (after `--`), e.g. a test name filter.
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Benchmark plaintext vs meshless on the namespace testbed.
    Bench(bench::Args),
    /// Start a two-node cluster in network namespaces, run real agents and show encrypted calls.
    Demo(demo::Args),
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Setup => setup::run(),
        Cmd::KubeApiserver => {
            setup::run()?;
            let bins = kube::ensure()?;
            println!("{}\n{}\n{}", bins.apiserver.display(), bins.etcd.display(), bins.kubectl.display());
            Ok(())
        }
        Cmd::Build => {
            setup::run()?;
            build().map(|_| ())
        }
        Cmd::Test { args } => {
            setup::run()?;
            test(&args)
        }
        Cmd::Bench(args) => {
            // Interrupted, it leaves nothing behind: its processes, namespaces, cgroups, pins.
            meshless_tests::clean_up_on_interrupt()?;
            setup::run()?;
            let bins = build()?;
            bench::run(&bins, args)
        }
        Cmd::Demo(args) => {
            setup::run()?;
            let bins = build()?;
            demo::run(&bins, args)
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the workspace root")
        .to_path_buf()
}

fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(workspace_root());
    cmd
}

fn build() -> Result<Bins> {
    eprintln!("xtask: building meshless (release, with the embedded eBPF object) and the test tools");
    setup::run_cmd(cargo().args([
        "build",
        "--release",
        "-p",
        "meshless-agent",
        "-p",
        "meshless-cni",
        "-p",
        "meshless-tests",
        "--bins",
    ]))?;
    let target = workspace_root().join("target/release");
    Ok(Bins {
        meshless: target.join("meshless"),
        testbin: target.join("meshless-testbin"),
        peer: target.join("meshless-peer"),
        wlclient: target.join("meshless-wlclient"),
        cni: target.join("meshless-cni"),
    })
}

/// `cargo fmt --check` and `cargo clippy --all-targets -D warnings`: the README's test command
/// (and so CI) fails on unformatted code and on any lint, before the long tests start.
fn lint() -> Result<()> {
    eprintln!("xtask: checking formatting and lints (cargo fmt --check, cargo clippy -D warnings)");
    setup::run_cmd(cargo().args(["fmt", "--all", "--check"]))
        .context("the code is not formatted as rustfmt.toml says: run `cargo fmt --all`")?;
    setup::run_cmd(cargo().args(["clippy", "--all-targets", "--all-features", "--release", "--", "-D", "warnings"]))
        .context("clippy found problems (above)")
}

fn test(extra: &[String]) -> Result<()> {
    lint()?;
    let bins = build()?;
    // The Kubernetes tests' control plane (built once per machine, then cached).
    let kube = kube::ensure()?;
    eprintln!("xtask: running the whole test suite (unit, in-process, privileged end-to-end)");
    // Tests that could not run (not root, outside CI) name themselves here, so the summary
    // counts them as skipped, not passed.
    let skips = std::env::temp_dir().join(format!("meshless-skips-{}", std::process::id()));
    let _ = std::fs::remove_file(&skips);
    let mut cmd = cargo();
    // Every test binary runs even when an earlier one failed: one failure must not hide others.
    cmd.args(["test", "--release", "--no-fail-fast"])
        .env("MESHLESS_SKIPS", &skips)
        .env("MESHLESS_BIN", &bins.meshless)
        .env("MESHLESS_TESTBIN", &bins.testbin)
        .env("MESHLESS_PEER", &bins.peer)
        .env("MESHLESS_WLCLIENT", &bins.wlclient)
        .env("MESHLESS_CNI", &bins.cni)
        .env("MESHLESS_KUBE_APISERVER", &kube.apiserver)
        .env("MESHLESS_ETCD", &kube.etcd)
        .env("MESHLESS_KUBECTL", &kube.kubectl)
        .arg("--")
        // The end-to-end tests each build a cluster of namespaces and run several processes; on two
        // cores they are more reliable one at a time.
        .arg("--test-threads=1")
        .args(extra);
    // Forward the output as it comes and total the per-binary results, so that the run ends with
    // one plain summary line (cargo's own last lines are per-binary, often a binary with no test).
    cmd.stdout(Stdio::piped());
    let mut child = cmd.spawn().context("starting cargo test")?;
    let (mut passed, mut failed, mut ignored) = (0u64, 0u64, 0u64);
    let mut ignored_names = Vec::new();
    for line in BufReader::new(child.stdout.take().expect("piped stdout")).lines() {
        let line = line?;
        println!("{line}");
        if let Some(name) = line.strip_prefix("test ").and_then(|l| l.strip_suffix(" ... ignored")) {
            ignored_names.push(name.to_string());
        }
        if let Some(rest) = line.strip_prefix("test result: ") {
            for part in rest.split(['.', ';']) {
                let mut words = part.split_whitespace();
                if let (Some(n), Some(what)) = (words.next().and_then(|n| n.parse::<u64>().ok()), words.next()) {
                    match what {
                        "passed" => passed += n,
                        "failed" => failed += n,
                        "ignored" => ignored += n,
                        _ => {}
                    }
                }
            }
        }
    }
    let status = child.wait()?;
    let skipped: Vec<String> =
        std::fs::read_to_string(&skips).map(|s| s.lines().map(str::to_string).collect()).unwrap_or_default();
    let _ = std::fs::remove_file(&skips);
    let passed = passed.saturating_sub(skipped.len() as u64);
    for name in &skipped {
        println!("meshless: skipped {name}");
    }
    if !ignored_names.is_empty() {
        println!("meshless: ignored {}", ignored_names.join(", "));
    }
    println!("meshless: {passed} passed, {failed} failed, {} skipped", ignored + skipped.len() as u64);
    if !status.success() {
        bail!("the test suite failed ({status})");
    }
    if passed == 0 {
        bail!("the test suite ran no test");
    }
    if ci() && (ignored > 0 || !skipped.is_empty()) {
        bail!(
            "under CI=true every test must run; skipped or ignored: {}",
            [ignored_names, skipped].concat().join(", ")
        );
    }
    Ok(())
}

/// `CI=true` (as `.ci/run` sets it): nothing may skip.
fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}
