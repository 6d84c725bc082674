//! Builds the kernel programs (crate `meshless-ebpf`) for the BPF target with aya-build, so the
//! agent binary embeds them. Needs the nightly toolchain with rust-src and bpf-linker:
//! `cargo xtask setup` installs both. `AYA_BUILD_SKIP=1` skips this for quick host-only checks
//! (the resulting binary then cannot load its programs).
use std::path::Path;

use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    // gRPC services: the issuer's (meshless's own), the SPIFFE Workload API and the CSI node
    // plugin (a subset of the CSI spec's proto).
    // protoc comes from Debian's protobuf-compiler (`cargo xtask setup` installs it).
    let proto = Path::new(env!("CARGO_MANIFEST_DIR")).join("proto");
    println!("cargo:rerun-if-changed={}", proto.display());
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_protos(
            &[proto.join("issuer.proto"), proto.join("workload.proto"), proto.join("csi.proto")],
            std::slice::from_ref(&proto),
        )
        .context("generating the gRPC code from agent/proto (is protoc installed? run `cargo xtask setup`)")?;

    let ebpf_dir =
        Path::new(env!("CARGO_MANIFEST_DIR")).parent().context("agent crate has a parent directory")?.join("ebpf");
    let ebpf_dir = ebpf_dir.to_str().context("workspace path is not UTF-8")?;
    let skip = std::env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    aya_build::build_ebpf(
        [aya_build::Package { name: "meshless-ebpf", root_dir: ebpf_dir, ..Default::default() }],
        aya_build::Toolchain::default(),
    )
    .context("building the eBPF programs failed; run `cargo xtask setup` (nightly rust-src, bpf-linker)")?;
    if skip {
        // Give include_bytes_aligned! something to include; loading it fails with a clear error.
        let out = Path::new(&std::env::var("OUT_DIR")?).join("meshless-ebpf");
        if !out.exists() {
            std::fs::write(out, b"")?;
        }
    }
    Ok(())
}
