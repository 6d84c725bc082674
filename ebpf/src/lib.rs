//! Host-side face of the kernel-program crate: empty on purpose. The agent lists this crate as a
//! build dependency so cargo rebuilds it when the kernel programs change; the programs themselves
//! are the `meshless` binary of this crate, built for `bpfel-unknown-none` by `agent/build.rs`.
#![no_std]
