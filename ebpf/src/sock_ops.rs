//! `sock_ops` on the pods' cgroup: at `TCP_CONNECT_CB` (source address and port chosen, SYN not yet sent) copy the
//! original destination a connect hook stored on this socket into the pod's own map, keyed by the
//! connection's full source, so the agent can look it up after `accept()`.

use core::ffi::c_void;
use core::ptr::{addr_of, read_volatile};

use aya_ebpf::{
    bindings::BPF_SOCK_OPS_TCP_CONNECT_CB,
    helpers::{bpf_get_netns_cookie, bpf_sk_storage_get},
    macros::sock_ops,
    programs::SockOpsContext,
};
use meshless_common::{OrigDst, OrigDstKey, ProbeKey, AF_INET};

use crate::maps::{ORIG_DST, PROBES, SOCK_ORIG};

#[sock_ops]
pub fn meshless_sock_ops(ctx: SockOpsContext) -> u32 {
    // Without the entry the agent refuses the one connection (it cannot place it); the socket and
    // every other connection are unharmed.
    let _ = try_sock_ops(&ctx);
    1
}

fn try_sock_ops(ctx: &SockOpsContext) -> Result<(), i32> {
    if ctx.op() != BPF_SOCK_OPS_TCP_CONNECT_CB {
        return Ok(());
    }
    let ops = ctx.ops;
    // SAFETY: `ops` is the context pointer, valid for the invocation; `sk` is a full-width read
    // of a field sock_ops programs may read (NULL checked below).
    let sk = unsafe { read_volatile(addr_of!((*ops).__bindgen_anon_2.sk)) };
    if sk.is_null() {
        return Ok(());
    }
    // SAFETY: SOCK_ORIG is a socket-storage map (its address is what the helper expects as map
    // pointer, as aya's own SkStorage passes it); `sk` is this program's socket, non-NULL; without
    // the create flag the helper only looks up.
    let slot = unsafe {
        bpf_sk_storage_get(core::ptr::addr_of!(SOCK_ORIG) as *mut c_void, sk as *mut c_void, core::ptr::null_mut(), 0)
    } as *const OrigDst;
    if slot.is_null() {
        return Ok(()); // not a captured connection
    }
    // SAFETY: non-NULL pointers from bpf_sk_storage_get point at this socket's value; copied out.
    let orig = unsafe { *slot };
    // SAFETY: bpf_get_netns_cookie accepts the sock_ops context (kernel ≥ 5.15).
    let netns = unsafe { bpf_get_netns_cookie(ops as *mut c_void) };
    // SAFETY: the inner map reference is used at once, for one update.
    let Some(pod_map) = (unsafe { ORIG_DST.get(&netns) }) else {
        return Ok(()); // the pod is being unenrolled
    };
    // Local addresses are in network order, as the agent reads them off the accepted peer; a
    // dual-stack socket reaching an IPv4 destination has its IPv4 source in local_ip4. Every
    // field is read at its own constant offset (the verifier refuses a computed context pointer,
    // which is what choosing between them first would compile to).
    // SAFETY: context pointer; full-width reads of fields sock_ops programs may read.
    let (ip4, ip6, port) = unsafe {
        (
            read_volatile(addr_of!((*ops).local_ip4)),
            [
                read_volatile(addr_of!((*ops).local_ip6[0])),
                read_volatile(addr_of!((*ops).local_ip6[1])),
                read_volatile(addr_of!((*ops).local_ip6[2])),
                read_volatile(addr_of!((*ops).local_ip6[3])),
            ],
            // local_port is in host byte order in bpf_sock_ops.
            read_volatile(addr_of!((*ops).local_port)),
        )
    };
    let addr = if orig.listener_family == AF_INET { [ip4, 0, 0, 0] } else { ip6 };
    let key = OrigDstKey { addr, port: port as u16, family: orig.listener_family };
    pod_map.insert(&key, &orig, 0)
}

/// `sock_ops` on the probe cgroup (the kubelet's): at `TCP_CONNECT_CB`, announce the connection
/// to the inbound program, which lets exactly this 4-tuple reach the pod's app.
#[sock_ops]
pub fn meshless_probe_sock_ops(ctx: SockOpsContext) -> u32 {
    if ctx.op() == BPF_SOCK_OPS_TCP_CONNECT_CB {
        let _ = announce_probe(&ctx);
    }
    1
}

fn announce_probe(ctx: &SockOpsContext) -> Result<(), i32> {
    let ops = ctx.ops;
    // SAFETY: context pointer; full-width reads of fields sock_ops programs may read. Addresses
    // are in network order; local_port is in host order, remote_port in network order in the
    // upper half of its word (hence the u32 byte swap).
    let (family, local_ip4, remote_ip4, local_ip6, remote_ip6, local_port, remote_port) = unsafe {
        (
            read_volatile(addr_of!((*ops).family)),
            read_volatile(addr_of!((*ops).local_ip4)),
            read_volatile(addr_of!((*ops).remote_ip4)),
            [
                read_volatile(addr_of!((*ops).local_ip6[0])),
                read_volatile(addr_of!((*ops).local_ip6[1])),
                read_volatile(addr_of!((*ops).local_ip6[2])),
                read_volatile(addr_of!((*ops).local_ip6[3])),
            ],
            [
                read_volatile(addr_of!((*ops).remote_ip6[0])),
                read_volatile(addr_of!((*ops).remote_ip6[1])),
                read_volatile(addr_of!((*ops).remote_ip6[2])),
                read_volatile(addr_of!((*ops).remote_ip6[3])),
            ],
            read_volatile(addr_of!((*ops).local_port)),
            read_volatile(addr_of!((*ops).remote_port)),
        )
    };
    let v4_mapped = remote_ip6[0] == 0 && remote_ip6[1] == 0 && remote_ip6[2] == V4_MAPPED_PREFIX;
    let (client, server, family) = if family == u32::from(AF_INET) {
        ([local_ip4, 0, 0, 0], [remote_ip4, 0, 0, 0], u32::from(AF_INET))
    } else if v4_mapped {
        // A dual-stack socket dialing IPv4: the SYN goes out (and arrives) as IPv4.
        ([local_ip6[3], 0, 0, 0], [remote_ip6[3], 0, 0, 0], u32::from(AF_INET))
    } else {
        (local_ip6, remote_ip6, family)
    };
    let key = ProbeKey {
        client,
        server,
        client_port: local_port as u16,
        server_port: u32::from_be(remote_port) as u16,
        family,
    };
    PROBES.insert(&key, &1, 0)
}

const V4_MAPPED_PREFIX: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);
