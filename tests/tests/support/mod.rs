//! Helpers shared by the privileged tests.
#![allow(dead_code)]

use meshless_tests::ci;
pub use meshless_tests::mesh::Bins;

/// Returns the binaries when this test can run (root, binaries built). When it cannot: under
/// `CI=true` the test fails with the reason; elsewhere it says why and skips.
pub fn privileged(test: &str) -> Option<Bins> {
    // SAFETY: geteuid(2) has no preconditions.
    let reason = if unsafe { libc::geteuid() } != 0 {
        "needs root (network namespaces, cgroups, eBPF)".to_string()
    } else {
        match bins() {
            Some(b) => return Some(b),
            None => {
                "MESHLESS_BIN/MESHLESS_TESTBIN/MESHLESS_PEER/MESHLESS_WLCLIENT/MESHLESS_CNI not set: run it through `cargo xtask test`".to_string()
            }
        }
    };
    if ci() {
        panic!("{test}: privileged test cannot run under CI=true: {reason}");
    }
    eprintln!("SKIPPED {test}: {reason}");
    record_skip(test);
    None
}

/// Tells `cargo xtask test` (through the file it names in `MESHLESS_SKIPS`) that a test skipped,
/// so that it is counted as skipped rather than passed.
fn record_skip(test: &str) {
    if let Some(path) = std::env::var_os("MESHLESS_SKIPS") {
        let _ = meshless_tests::append(std::path::Path::new(&path), test);
    }
}

/// The binaries built by `cargo xtask test`; under `CI=true` their absence is a failure.
pub fn bins() -> Option<Bins> {
    let var = |name: &str| std::env::var_os(name);
    match (
        var("MESHLESS_BIN"),
        var("MESHLESS_TESTBIN"),
        var("MESHLESS_PEER"),
        var("MESHLESS_WLCLIENT"),
        var("MESHLESS_CNI"),
    ) {
        (Some(m), Some(t), Some(p), Some(w), Some(c)) => {
            Some(Bins { meshless: m.into(), testbin: t.into(), peer: p.into(), wlclient: w.into(), cni: c.into() })
        }
        _ if ci() => {
            panic!("MESHLESS_BIN/MESHLESS_TESTBIN/MESHLESS_PEER/MESHLESS_WLCLIENT/MESHLESS_CNI not set under CI=true: run `cargo xtask test`")
        }
        _ => {
            record_skip("(a test needing the built binaries)");
            None
        }
    }
}

/// The Kubernetes control plane's binaries, when this test can run; under `CI=true` their
/// absence is a failure.
pub fn kube_bins(test: &str) -> Option<meshless_tests::kube::KubeBins> {
    match meshless_tests::kube::KubeBins::from_env() {
        Some(b) => Some(b),
        None if ci() => panic!("{test}: MESHLESS_KUBE_APISERVER/MESHLESS_ETCD/MESHLESS_KUBECTL not set under CI=true: run `cargo xtask test`"),
        None => {
            eprintln!("SKIPPED {test}: no kube-apiserver (run it through `cargo xtask test`, which builds one)");
            record_skip(test);
            None
        }
    }
}

/// A client started in the background; [`finish`] collects its result.
pub fn background(cmd: &mut std::process::Command) -> std::process::Child {
    cmd.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().expect("starting a client")
}

/// Waits for a background client and returns (success, its last stdout line as JSON (or Null),
/// stdout, stderr).
pub fn finish(child: std::process::Child) -> (bool, serde_json::Value, String, String) {
    let out = child.wait_with_output().expect("waiting for a client");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let json = stdout.lines().last().and_then(|l| serde_json::from_str(l).ok()).unwrap_or(serde_json::Value::Null);
    (out.status.success(), json, stdout, stderr)
}

/// Runs a client to its end: (success, stdout, stderr).
pub fn run(cmd: &mut std::process::Command) -> (bool, String, String) {
    let out = cmd.output().expect("running a client");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Two nodes with one pod each, both agents running (node 2's with `node2_args`), and an echo
/// server on the second pod's port 7000 (`to`).
pub struct Pair {
    pub tb: meshless_tests::Testbed,
    pub mesh: meshless_tests::mesh::Mesh,
    pub to: String,
}

pub fn echo_pair(label: &str, bins: &Bins, node2_args: &[&str]) -> Pair {
    let tb =
        meshless_tests::Testbed::new(meshless_tests::Layout { label, pods: &[1, 1] }).expect("building the testbed");
    let args = |i: usize| if i == 2 { node2_args.iter().map(|a| a.to_string()).collect() } else { vec![] };
    let mesh = meshless_tests::mesh::Mesh::start_with(&tb, bins, &|_| Some(true), &args).expect("starting the agents");
    let server = tb.pod(2, 1);
    tb.spawn(server.command(&bins.testbin).unwrap().args(["echo-serve", "7000"])).unwrap();
    meshless_tests::mesh::wait_listening(&server.netns, 7000).unwrap();
    let to = meshless_tests::sockaddr(server.ipv4.into(), 7000);
    Pair { tb, mesh, to }
}

/// A `longlived` client (one connection, a round trip every 50 ms) whose completed round trips the
/// test can watch while it runs: proof that the connection is up and still carries data.
pub struct LongLived {
    child: std::process::Child,
    progress: std::path::PathBuf,
}

impl LongLived {
    /// Starts `longlived` from `from` to `to` for `seconds`; `name` names its progress file.
    pub fn start(
        tb: &meshless_tests::Testbed,
        bins: &Bins,
        from: &meshless_tests::Pod,
        to: &str,
        seconds: u64,
        name: &str,
    ) -> LongLived {
        let progress = tb.dir.join(format!("{name}.rounds"));
        let mut cmd = from.command(&bins.testbin).unwrap();
        cmd.args(["longlived", to, &seconds.to_string()]).arg(&progress);
        LongLived { child: background(&mut cmd), progress }
    }

    /// Round trips completed so far.
    pub fn rounds(&self) -> u64 {
        std::fs::read_to_string(&self.progress).ok().and_then(|t| t.trim().parse().ok()).unwrap_or(0)
    }

    /// Waits (at most 10 s) until at least `n` round trips have completed and returns the count;
    /// panics, saying `what` was expected, if they do not or the client ends first.
    pub fn wait_rounds(&mut self, n: u64, what: &str) -> u64 {
        let done = meshless_tests::wait_for(std::time::Duration::from_secs(10), || {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("{what}: the long-lived client ended ({status}) after {} round trips", self.rounds());
            }
            Some(self.rounds()).filter(|r| *r >= n)
        });
        done.unwrap_or_else(|| panic!("{what}: {} of {n} round trips within 10 s", self.rounds()))
    }

    /// Waits (at most 10 s) for `n` more round trips than now: the connection still carries data.
    pub fn wait_more_rounds(&mut self, n: u64, what: &str) -> u64 {
        let now = self.rounds();
        self.wait_rounds(now + n, what)
    }

    /// The client's pid.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the client's end, as [`finish`].
    pub fn finish(self) -> (bool, serde_json::Value, String, String) {
        finish(self.child)
    }
}
