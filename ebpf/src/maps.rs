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

/// Hand-off from connect4/6 to sock_ops: the original destination of a socket whose connect was
/// just rewritten, before the kernel has chosen its source port.
/// Key: socket cookie. Value: [`OrigDst`].
/// Written by connect4/6; read and deleted by sock_ops at `TCP_CONNECT_CB`. LRU so that entries of
/// connects that fail before the SYN (no route, no port) age out instead of filling the map.
#[map]
pub static PENDING: LruHashMap<u64, OrigDst> = LruHashMap::with_max_entries(16384, 0);

/// Original destination of every captured connection, for the agent.
/// Key: [`OrigDstKey`] (netns cookie, source port, listener family). Value: [`OrigDst`].
/// Written by sock_ops; read and deleted by the agent after it accepts the connection. LRU so that
/// connections the agent never accepted (the app gave up) age out.
#[map]
pub static ORIG_DST: LruHashMap<OrigDstKey, OrigDst> = LruHashMap::with_max_entries(65536, 0);
