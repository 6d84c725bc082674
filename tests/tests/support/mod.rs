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
            None => "MESHLESS_BIN/MESHLESS_TESTBIN not set: run it through `cargo xtask test`".to_string(),
        }
    };
    if ci() {
        panic!("{test}: privileged test cannot run under CI=true: {reason}");
    }
    eprintln!("SKIPPED {test}: {reason}");
    None
}

/// The binaries built by `cargo xtask test`; under `CI=true` their absence is a failure.
pub fn bins() -> Option<Bins> {
    match (std::env::var_os("MESHLESS_BIN"), std::env::var_os("MESHLESS_TESTBIN")) {
        (Some(m), Some(t)) => Some(Bins { meshless: m.into(), testbin: t.into() }),
        _ if ci() => {
            panic!("MESHLESS_BIN/MESHLESS_TESTBIN not set under CI=true: run `cargo xtask test`")
        }
        _ => None,
    }
}
