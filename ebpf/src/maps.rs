//! Every map of the kernel programs, in one place.

use aya_ebpf::{
    macros::map,
    maps::{HashMap, LruHashMap},
};
use meshless_common::{EnrolledPod, OrigDst, OrigDstKey};

/// Pods whose outbound TCP is captured.
/// Key: network-namespace cookie of the pod. Value: [`EnrolledPod`].
/// Written by the agent when it enrolls / removes a pod; read by connect4/connect6.
#[map]
pub static ENROLLED: HashMap<u64, EnrolledPod> = HashMap::with_max_entries(4096, 0);

/// Original destination of each captured socket, by socket cookie (unique for the life of the
/// system, never reused). Key: socket cookie. Value: [`OrigDst`].
/// Written by connect4/6; read by sock_ops at `TCP_CONNECT_CB` (to file it under the source port for
/// the agent) and by getpeername4/6 (to show the application the peer it asked for). LRU: there is
/// no hook at close, so entries of closed sockets age out; a live socket evicted after 65536 newer
/// captures shows the agent's address to getpeername, nothing worse.
#[map]
pub static SOCK_ORIG: LruHashMap<u64, OrigDst> = LruHashMap::with_max_entries(65536, 0);

/// Original destination of every captured connection, for the agent.
/// Key: [`OrigDstKey`] (netns cookie, source port, listener family). Value: [`OrigDst`].
/// Written by sock_ops; read and deleted by the agent after it accepts the connection. LRU so that
/// connections the agent never accepted (the app gave up) age out.
#[map]
pub static ORIG_DST: LruHashMap<OrigDstKey, OrigDst> = LruHashMap::with_max_entries(65536, 0);
