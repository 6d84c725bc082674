//! Code generated from `agent/proto` by `build.rs` (tonic + prost).
#![allow(clippy::all, missing_docs, unreachable_pub)]

/// meshless's issuer: node agents ask it to sign their pods' certificates.
pub mod issuer {
    tonic::include_proto!("meshless.issuer.v1");
}

/// The SPIFFE Workload API (its proto has no package).
pub mod workload {
    include!(concat!(env!("OUT_DIR"), "/_.rs"));
}

/// The CSI node plugin's services (a subset of the CSI spec, package `csi.v1`).
pub mod csi {
    tonic::include_proto!("csi.v1");
}
