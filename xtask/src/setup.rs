//! `cargo xtask setup`: installs, idempotently, everything building and testing meshless needs on
//! a fresh Debian machine. Each step says what it does and skips itself when already done.

use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

/// Debian packages the build and the tests use.
/// - llvm-22-dev: bpf-linker links against it.
/// - iproute2: the namespace testbed (`ip netns`, veth, bridges).
/// - tcpdump: the end-to-end tests capture the node-to-node link.
/// - curl: the unmodified HTTP client of the end-to-end tests and the demo.
/// - util-linux: `nsenter`, used by the demo's printed hints.
/// - protobuf-compiler, libprotobuf-dev: protoc and the well-known types, for the gRPC code the
///   agent generates (issuer, SPIFFE Workload API).
/// - nftables: the Services test installs a kube-proxy-like DNAT rule in a node's namespace (to
///   show the mesh resolves a virtual IP before it); meshless itself never uses netfilter.
/// - chromium, chromium-driver: the dashboard test drives the node dashboard in a real browser
///   through WebDriver.
/// - prometheus: the Grafana-queries test scrapes the testbed's agents with the real Prometheus
///   and runs the PromQL of Istio's dashboards against it (started by the test, never as a
///   service).
/// - make, rsync: the kube-apiserver build (see `kube.rs`, which also fetches kubectl 1.20 into its
///   private root: a machine may already have another kubectl in /usr/bin).
const APT_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "iproute2",
    "tcpdump",
    "curl",
    "util-linux",
    // The hand-over socket's unit test plays another user's client with it (setpriv + python3);
    // the Workload API test runs PyPI's `spiffe` client in a virtualenv.
    "python3",
    "python3-venv",
    "protobuf-compiler",
    "libprotobuf-dev",
    "nftables",
    "chromium",
    "chromium-driver",
    "prometheus",
    "make",
    "rsync",
];

const LLVM_BIN: &str = "/usr/lib/llvm-22/bin";

pub fn run() -> Result<()> {
    apt_packages()?;
    rust_src()?;
    lint_tools()?;
    bpf_linker()?;
    eprintln!("setup: everything is in place");
    Ok(())
}

fn step(what: &str) {
    eprintln!("setup: {what}");
}

fn apt_packages() -> Result<()> {
    let missing: Vec<&str> = APT_PACKAGES.iter().copied().filter(|p| !dpkg_installed(p)).collect();
    if missing.is_empty() {
        step(&format!("apt packages present ({}), skipping", APT_PACKAGES.join(" ")));
        return Ok(());
    }
    if !is_root() {
        bail!(
            "missing Debian packages {}: run `sudo apt-get update && sudo apt-get install -y {}` \
             or run `cargo xtask setup` as root",
            missing.join(" "),
            missing.join(" ")
        );
    }
    step(&format!("installing apt packages: {}", missing.join(" ")));
    run_cmd(Command::new("apt-get").args(["update", "-qq"]))?;
    run_cmd(
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

fn dpkg_installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0").unwrap_or(false)
}

fn rust_src() -> Result<()> {
    let out = Command::new("rustup")
        .args(["component", "list", "--toolchain", "nightly", "--installed"])
        .output()
        .context("running rustup: is rustup installed? meshless needs rustup with a nightly toolchain")?;
    if !out.status.success() {
        bail!(
            "no nightly toolchain: the eBPF programs need one; run `rustup toolchain install nightly \
             --component rust-src` ({})",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    if String::from_utf8_lossy(&out.stdout).lines().any(|l| l.starts_with("rust-src")) {
        step("nightly rust-src present, skipping");
        return Ok(());
    }
    step("adding rust-src to the nightly toolchain (the eBPF build compiles core from source)");
    run_cmd(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
}

/// rustfmt and clippy for the default toolchain (`cargo xtask test` checks formatting and lints);
/// rustup's default profile has them, a minimal one does not.
fn lint_tools() -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let have = |sub: &str| Command::new(&cargo).args([sub, "--version"]).output().is_ok_and(|o| o.status.success());
    if have("fmt") && have("clippy") {
        step("rustfmt and clippy present, skipping");
        return Ok(());
    }
    step("adding rustfmt and clippy to the default toolchain");
    run_cmd(Command::new("rustup").args(["component", "add", "rustfmt", "clippy"]))
}

fn bpf_linker() -> Result<()> {
    let works = Command::new("bpf-linker")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if works {
        step("bpf-linker present, skipping");
        return Ok(());
    }
    step("building bpf-linker against Debian's LLVM 22 (about a minute)");
    let path = format!("{LLVM_BIN}:{}", std::env::var("PATH").unwrap_or_default());
    run_cmd(
        Command::new("cargo")
            .args(["install", "bpf-linker", "--locked", "--no-default-features", "--features", "llvm-22"])
            .env("PATH", path),
    )
}

pub fn run_cmd(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}
