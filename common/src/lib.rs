//! Types and constants shared by meshless's kernel programs (`meshless-ebpf`) and its agent.
//!
//! Every struct here is `#[repr(C)]`, made only of fixed-width integers and byte arrays with
//! explicit padding, and checked for size at compile time, so that the kernel and user space agree
//! on the layout of every map key and value. With the `user` feature the types implement
//! `aya::Pod`; every bit pattern of every type here is valid, which is what `Pod` requires.
#![no_std]

/// Outbound listener inside each enrolled pod's netns (127.0.0.1 and ::1).
pub const OUTBOUND_PORT: u16 = 15001;
/// Inbound plaintext listener inside each enrolled pod's netns ([::]:15006): the sk_lookup
/// program steers plaintext connections to the pod here.
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
pub const LAYOUT_VERSION: u32 = 4;

/// Entries of each pod's own original-destination map (the inner maps of `ORIG_DST`). Entries
/// live from `connect()` to the agent's `accept()`, so this bounds a pod's connects in flight.
pub const ORIG_DST_PER_POD: u32 = 1024;
/// Most pods one node can have enrolled or known.
pub const MAX_PODS: u32 = 4096;
/// Addresses of enrolled pods the inbound program knows (a pod has one IPv4 and one IPv6).
pub const MAX_POD_ADDRS: u32 = 2 * MAX_PODS;
/// Health-probe connections in flight from the probe cgroup (the kubelet's).
pub const MAX_PROBES: u32 = 4096;

/// Names of the maps in the eBPF object, so user space cannot misspell them.
pub mod maps {
    pub const ENROLLED: &str = "ENROLLED";
    pub const ORIG_DST: &str = "ORIG_DST";
    pub const SOCK_ORIG: &str = "SOCK_ORIG";
    pub const INBOUND: &str = "INBOUND";
    pub const INBOUND_LISTENERS: &str = "INBOUND_LISTENERS";
    pub const PROBES: &str = "PROBES";
    pub const AGENTS: &str = "AGENTS";
    /// Every map the agent pins (the others are the log ring buffer and globals).
    pub const PINNED: [&str; 7] = [ENROLLED, ORIG_DST, SOCK_ORIG, INBOUND, INBOUND_LISTENERS, PROBES, AGENTS];
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
    pub const SK_LOOKUP: &str = "meshless_sk_lookup";
    pub const PROBE_SOCK_OPS: &str = "meshless_probe_sock_ops";
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

/// What the inbound program (`sk_lookup`, in each enrolled pod's netns) does with a TCP connection
/// that arrives at the pod from outside it, by the `mode` of the pod's `INBOUND` entries.
pub mod inbound {
    /// Leave it alone: the app gets it directly.
    pub const DISABLE: u32 = 0;
    /// Steer it to the agent's 15006 listener (policy with an unauthenticated source); with no
    /// agent listening, let it through to the app.
    pub const PERMISSIVE: u32 = 1;
    /// Steer it to the agent's 15006 listener (which refuses plaintext); with no agent
    /// listening, drop it (the client gets a reset): never plaintext to the app.
    pub const STRICT: u32 = 2;
}

/// Key of the `INBOUND` map: one address of an enrolled pod, as the inbound program sees the
/// destination of a connection (IPv4 in the first word, network byte order, or IPv6).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PodAddr {
    pub addr: [u32; 4],
    /// `AF_INET` or `AF_INET6`.
    pub family: u32,
}
const _: () = assert!(core::mem::size_of::<PodAddr>() == 20);

/// Value of the `INBOUND` map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InboundPod {
    /// The pod's netns cookie: the key of its listener in `INBOUND_LISTENERS`.
    pub cookie: u64,
    /// One of [`inbound`].
    pub mode: u32,
    pub _pad: u32,
    /// The ports the pod's own spec declares for its kubelet probes (0: none): the only ports
    /// a probe connection passes to. Host byte order.
    pub probe_ports: [u16; MAX_PROBE_PORTS],
    /// Ports whose mode is not `mode` (PeerAuthentication `portLevelMtls`; port 0: unused).
    pub port_modes: [PortMode; MAX_PORT_MODES],
}
const _: () = assert!(core::mem::size_of::<InboundPod>() == 64);

/// One port's own inbound mode.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortMode {
    /// Host byte order; 0: an unused slot.
    pub port: u16,
    /// One of [`inbound`], as a `u16`.
    pub mode: u16,
}

/// Per-port modes kept per pod (more: the agent applies the strongest to every port).
pub const MAX_PORT_MODES: usize = 8;

impl InboundPod {
    /// The mode of connections to `port`.
    pub fn mode_for(&self, port: u16) -> u32 {
        let mut i = 0;
        while i < MAX_PORT_MODES {
            let p = self.port_modes[i];
            if p.port != 0 && p.port == port {
                return u32::from(p.mode);
            }
            i += 1;
        }
        self.mode
    }
}

/// Slots of the `AGENTS` map: the cgroup ids of the running agent and of its predecessor (during
/// a hand-over both run), then the index of the slot the next agent writes.
pub const AGENT_SLOTS: u32 = 2;

/// Probe ports kept per pod.
pub const MAX_PROBE_PORTS: usize = 8;

/// Key of the `PROBES` map: one connection from the probe cgroup (the kubelet), as the inbound
/// program will see it arrive. Addresses as in [`PodAddr`], ports in host byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ProbeKey {
    pub client: [u32; 4],
    pub server: [u32; 4],
    pub client_port: u16,
    pub server_port: u16,
    /// `AF_INET` or `AF_INET6` (an IPv4 connection from a dual-stack socket is `AF_INET`).
    pub family: u32,
}
const _: () = assert!(core::mem::size_of::<ProbeKey>() == 40);

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
    // SAFETY: all of them are #[repr(C)], contain only integers and integer arrays with explicit
    // padding fields, so every bit pattern is a valid value.
    unsafe impl aya::Pod for super::EnrolledPod {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::OrigDst {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::OrigDstKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::PodAddr {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::InboundPod {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ProbeKey {}
}
