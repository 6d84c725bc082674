//! Every map of the kernel programs, in one place. All of them are pinned by the agent under
//! `<bpf dir>/v<LAYOUT_VERSION>/maps/`, so they outlive any one agent process: programs attached
//! by an earlier agent and by its successor share them.

use aya_ebpf::{
    btf_maps::{Array, HashMap, HashOfMaps, LruHashMap, SkStorage, SockHash},
    macros::btf_map,
};
use meshless_common::{
    EnrolledPod, InboundPod, OrigDst, OrigDstKey, PodAddr, ProbeKey, AGENT_SLOTS, MAX_PODS, MAX_POD_ADDRS, MAX_PROBES,
    ORIG_DST_PER_POD,
};

/// The pods of this node the agent knows, by the cookie of their network namespace.
/// Key: netns cookie. Value: [`EnrolledPod`] (`mode` CAPTURE or BYPASS, the pod's addresses).
/// Written by the agent (enroll, unenroll, forget); read by connect4/6 and bind4/6. A netns with
/// no entry is a pod the agent has not learned yet (see `meshless_common::mode`).
#[btf_map]
pub static ENROLLED: HashMap<u64, EnrolledPod, { MAX_PODS as usize }> = HashMap::new();

/// Original destination of each captured socket, stored on the socket itself (freed with it).
/// Written by connect4/6; read by sock_ops at `TCP_CONNECT_CB` (to file it for the agent under the
/// connection's source) and by getpeername4/6 (to show the application the peer it asked for).
#[btf_map]
pub static SOCK_ORIG: SkStorage<OrigDst> = SkStorage::new();

/// One LRU map per enrolled pod, holding the original destination of each captured connection
/// until the agent has accepted it. Outer key: netns cookie. Inner key: [`OrigDstKey`] (the
/// connection's source address and port), value: [`OrigDst`].
/// The agent creates a pod's inner map when it enrolls the pod and removes it when it unenrolls
/// it; sock_ops writes entries; the agent reads and deletes them after `accept()`. Per-pod maps
/// mean a pod flooding connects can only evict its own entries, never another pod's.
#[btf_map]
pub static ORIG_DST: HashOfMaps<
    u64,
    LruHashMap<OrigDstKey, OrigDst, { ORIG_DST_PER_POD as usize }>,
    { MAX_PODS as usize },
> = HashOfMaps::new();

/// Every address of every enrolled pod, with the pod's inbound mode and netns cookie.
/// Written by the agent (enroll, mode change, unenroll); read by sk_lookup, which runs in each
/// enrolled pod's netns and finds the pod by the destination address of the connection.
#[btf_map]
pub static INBOUND: HashMap<PodAddr, InboundPod, { MAX_POD_ADDRS as usize }> = HashMap::new();

/// Each enrolled pod's plaintext listener ([::]:15006 in its netns), by netns cookie. The agent
/// inserts it at enrollment; the kernel removes it when the socket closes (the agent is gone),
/// which is how sk_lookup knows that no agent listens.
#[btf_map]
pub static INBOUND_LISTENERS: SockHash<u64, { MAX_PODS as usize }> = SockHash::new();

/// Connections the probe cgroup (the kubelet's) is opening, by 4-tuple: written by
/// `meshless_probe_sock_ops` before the SYN leaves, taken by sk_lookup when it arrives, so health
/// probes reach the app even in STRICT mode and no other node process gets the same pass.
#[btf_map]
pub static PROBES: LruHashMap<ProbeKey, u8, { MAX_PROBES as usize }> = LruHashMap::new();

/// The cgroup ids of the agent processes (the running one and, during a hand-over, its
/// predecessor; slot `AGENT_SLOTS` holds the index the next agent writes). A socket marked
/// `AGENT_MARK` is the agent's own only when the process opening it is in one of these cgroups:
/// a pod with `NET_ADMIN` can set the mark, but cannot move into the agent's cgroup.
#[btf_map]
pub static AGENTS: Array<u64, { AGENT_SLOTS as usize + 1 }> = Array::new();
