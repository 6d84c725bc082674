//! `sock_ops`: at `TCP_CONNECT_CB` (source port chosen, SYN not yet sent) move the original
//! destination a connect hook saved for this socket into `ORIG_DST`, keyed the way the agent can
//! look it up after `accept()`: (netns cookie, source port, listener family).

use core::ffi::c_void;

use aya_ebpf::{
    bindings::BPF_SOCK_OPS_TCP_CONNECT_CB,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::sock_ops,
    programs::SockOpsContext,
};
use meshless_common::OrigDstKey;

use crate::maps::{ORIG_DST, SOCK_ORIG};

#[sock_ops]
pub fn meshless_sock_ops(ctx: SockOpsContext) -> u32 {
    // Fail open: without the entry the agent refuses the one connection; the socket is unharmed.
    let _ = try_sock_ops(&ctx);
    1
}

fn try_sock_ops(ctx: &SockOpsContext) -> Result<(), i32> {
    if ctx.op() != BPF_SOCK_OPS_TCP_CONNECT_CB {
        return Ok(());
    }
    // SAFETY: bpf_get_socket_cookie accepts the sock_ops context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.ops as *mut c_void) };
    // SAFETY: copied out at once; the entry stays for getpeername.
    let Some(orig) = (unsafe { SOCK_ORIG.get(&cookie).copied() }) else {
        return Ok(());
    };
    let key = OrigDstKey {
        // SAFETY: bpf_get_netns_cookie accepts the sock_ops context (kernel ≥ 5.15).
        netns_cookie: unsafe { bpf_get_netns_cookie(ctx.ops as *mut c_void) },
        // local_port is in host byte order in bpf_sock_ops.
        src_port: ctx.local_port() as u16,
        family: orig.listener_family,
        _pad: 0,
    };
    ORIG_DST.insert(&key, &orig, 0)
}
