//! Types and constants shared by meshless's kernel programs (`meshless-ebpf`) and its agent.
//!
//! Every struct here is `#[repr(C)]`, made only of fixed-width integers and byte arrays with
//! explicit padding, and checked for size at compile time, so that the kernel and user space agree
//! on the layout of every map key and value. With the `user` feature the types implement
//! `aya::Pod`; every bit pattern of every type here is valid, which is what `Pod` requires.
#![no_std]

/// Outbound listener inside each enrolled pod's netns (127.0.0.1 and ::1).
pub const OUTBOUND_PORT: u16 = 15001;
/// Inbound plaintext capture listener (reserved; used by the sk_lookup work).
pub const INBOUND_PLAINTEXT_PORT: u16 = 15006;
/// HBONE mTLS tunnel listener on each enrolled pod's IP.
pub const TUNNEL_PORT: u16 = 15008;
/// Admin / dashboard port (reserved).
pub const ADMIN_PORT: u16 = 15000;
/// Metrics port (reserved).
pub const METRICS_PORT: u16 = 15020;

/// `SO_MARK` put on every socket the agent opens, so the capture programs never catch the agent's
/// own connections (no loops). "mesh" in ASCII.
pub const AGENT_MARK: u32 = 0x6d65_7368;

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

/// Version of the layout of the pinned maps (their keys, values and meaning). The agent pins
/// under `<bpf dir>/v<LAYOUT_VERSION>/`; a new version means a new directory, and the agent that
/// brings it removes the older ones once its own programs are attached.
pub const LAYOUT_VERSION: u32 = 1;

/// Entries of each pod's own original-destination map (the inner maps of `ORIG_DST`). Entries
/// live from `connect()` to the agent's `accept()`, so this bounds a pod's connects in flight.
pub const ORIG_DST_PER_POD: u32 = 1024;
/// Most pods one node can have enrolled or known.
pub const MAX_PODS: u32 = 4096;

/// Names of the maps in the eBPF object, so user space cannot misspell them.
pub mod maps {
    pub const ENROLLED: &str = "ENROLLED";
    pub const ORIG_DST: &str = "ORIG_DST";
    pub const SOCK_ORIG: &str = "SOCK_ORIG";
    /// Every map the agent pins (the others are the log ring buffer and globals).
    pub const PINNED: [&str; 3] = [ENROLLED, ORIG_DST, SOCK_ORIG];
}

/// Names of the programs in the eBPF object.
pub mod programs {
    pub const CONNECT4: &str = "meshless_connect4";
    pub const CONNECT6: &str = "meshless_connect6";
    pub const SOCK_OPS: &str = "meshless_sock_ops";
    pub const GETPEERNAME4: &str = "meshless_getpeername4";
    pub const GETPEERNAME6: &str = "meshless_getpeername6";
    pub const BIND4: &str = "meshless_bind4";
    pub const BIND6: &str = "meshless_bind6";
}

/// Ports of the agent's listeners inside pods, which apps in pods may not bind.
pub const AGENT_POD_PORTS: [u16; 3] = [OUTBOUND_PORT, INBOUND_PLAINTEXT_PORT, TUNNEL_PORT];

/// What the kernel programs do with a pod, by the `mode` of its `ENROLLED` entry. A netns of the
/// node's pod cgroup with no entry at all is a pod the agent does not know yet: its TCP connects
/// to anything but loopback fail with `EPERM` until the agent has learned it (never plaintext).
pub mod mode {
    /// Outbound TCP is captured and carried over the mesh.
    pub const CAPTURE: u32 = 1;
    /// A pod the agent knows and leaves alone (not in the mesh, or the node's own netns).
    pub const BYPASS: u32 = 2;
}

/// Value of the `ENROLLED` map, keyed by the pod's network-namespace cookie (`u64`).
///
/// The pod's own addresses are kept so that connections a pod makes to itself are not captured.
/// Addresses are in network byte order, as the kernel hands them to the programs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EnrolledPod {
    /// One of [`mode`]; a `u32` rather than an enum so that every bit pattern is valid.
    pub mode: u32,
    /// The pod's IPv4 address as `bpf_sock_addr.user_ip4` shows it, or 0 when it has none.
    pub ipv4: u32,
    /// The pod's IPv6 address as four `bpf_sock_addr.user_ip6` words, or all zero.
    pub ipv6: [u32; 4],
}
const _: () = assert!(core::mem::size_of::<EnrolledPod>() == 24);

/// Original destination of a captured connection, as the application asked for it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OrigDst {
    /// IPv4 address in the first word (network order) or the IPv6 address, per `family`.
    pub addr: [u32; 4],
    /// Destination port in host byte order.
    pub port: u16,
    /// `AF_INET` or `AF_INET6`: the family of the *original* destination.
    pub family: u16,
    /// Family of the rewritten connection, which is the family of the agent listener that will
    /// accept it (`AF_INET` for IPv4 and v4-mapped IPv6 destinations). Part of the lookup key.
    pub listener_family: u16,
    pub _pad: u16,
}
const _: () = assert!(core::mem::size_of::<OrigDst>() == 24);

/// Key of a pod's original-destination map (an inner map of `ORIG_DST`, which is keyed by the
/// pod's netns cookie): the full source of a captured connection, as the agent sees the peer
/// after `accept()`. Two sockets of one pod never share it while both are connected.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct OrigDstKey {
    /// Source address: the IPv4 address in the first word (network order), or the IPv6 address.
    pub addr: [u32; 4],
    /// Source port, host byte order.
    pub port: u16,
    /// `AF_INET` or `AF_INET6`: the family of the agent listener that accepts the connection.
    pub family: u16,
}
const _: () = assert!(core::mem::size_of::<OrigDstKey>() == 20);

#[cfg(feature = "user")]
mod user {
    // SAFETY: all three are #[repr(C)], contain only integers and integer arrays with explicit
    // padding fields, so every bit pattern is a valid value.
    unsafe impl aya::Pod for super::EnrolledPod {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::OrigDst {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::OrigDstKey {}
}
