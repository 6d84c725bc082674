//! `cgroup/connect4` and `cgroup/connect6`: redirect an enrolled pod's outbound TCP connects to
//! the agent's outbound listener inside the same pod netns. `cgroup/getpeername4` and
//! `cgroup/getpeername6`: show the application the peer it asked for, not the agent.

use core::ffi::c_void;
use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};

use aya_ebpf::{
    bindings::bpf_sock_addr,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use aya_log_ebpf::debug;
use meshless_common::{mode, EnrolledPod, OrigDst, AF_INET, AF_INET6, AGENT_MARK, OUTBOUND_PORT, TUNNEL_PORT};

use crate::maps::{ENROLLED, SOCK_ORIG};

const SOCK_STREAM: u32 = 1;
/// Verdict that lets the connect proceed (rewritten or not). 0 would fail it with EPERM.
const ALLOW: i32 = 1;

/// 127.0.0.1 as `user_ip4` holds it (network byte order in a native u32).
const LOOPBACK4: u32 = u32::from_ne_bytes([127, 0, 0, 1]);
/// The last word of ::1 and the third word of a v4-mapped address, as `user_ip6` holds them.
const LOOPBACK6_LAST: u32 = u32::from_ne_bytes([0, 0, 0, 1]);
const V4_MAPPED_PREFIX: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

#[cgroup_sock_addr(connect4)]
pub fn meshless_connect4(ctx: SockAddrContext) -> i32 {
    // Fail open: a missing map entry or a full map leaves the connect as the app asked.
    let _ = try_connect4(&ctx);
    ALLOW
}

#[cgroup_sock_addr(connect6)]
pub fn meshless_connect6(ctx: SockAddrContext) -> i32 {
    let _ = try_connect6(&ctx);
    ALLOW
}

/// The enrolled pod the connecting socket belongs to, if it is to be captured: TCP, from an
/// enrolled netns, and not one of the agent's own sockets.
fn capturing_pod(ctx: &SockAddrContext) -> Option<EnrolledPod> {
    let sa = ctx.sock_addr;
    // SAFETY: `sa` is the program's context pointer, valid for the whole invocation; the verifier
    // checks each field access against bpf_sock_addr's layout (full-width u32 reads).
    let sock_type = unsafe { read_volatile(addr_of!((*sa).type_)) };
    if sock_type != SOCK_STREAM {
        return None;
    }
    // SAFETY: bpf_get_netns_cookie accepts the sock_addr context (kernel ≥ 5.7).
    let netns = unsafe { bpf_get_netns_cookie(sa as *mut c_void) };
    // SAFETY: the value is copied out before any other map operation could invalidate it.
    let pod = unsafe { *ENROLLED.get(&netns)? };
    if pod.mode != mode::CAPTURE {
        return None;
    }
    // SAFETY: `sk` of bpf_sock_addr is a valid, non-NULL `struct bpf_sock *` for connect hooks
    // (it is the connecting socket); reading `mark` is allowed for cgroup sock_addr programs.
    let mark = unsafe {
        let sk = (*sa).__bindgen_anon_1.sk;
        if sk.is_null() {
            return None;
        }
        read_volatile(addr_of!((*sk).mark))
    };
    if mark == AGENT_MARK {
        return None;
    }
    Some(pod)
}

/// Destination port of the connect, host byte order. `user_port` is read as a full u32 (narrow
/// reads of it are rejected by newer kernels) and holds the port in network order.
fn dst_port(sa: *mut bpf_sock_addr) -> u16 {
    // SAFETY: context pointer, see `capturing_pod`.
    let raw = unsafe { read_volatile(addr_of!((*sa).user_port)) };
    u16::from_be(raw as u16)
}

fn redirect_port(sa: *mut bpf_sock_addr) {
    // SAFETY: writing user_port is allowed for connect hooks; network order in the low 16 bits.
    unsafe { write_volatile(addr_of_mut!((*sa).user_port), u32::from(OUTBOUND_PORT.to_be())) };
}

fn remember(ctx: &SockAddrContext, orig: &OrigDst) -> Result<(), i32> {
    // SAFETY: bpf_get_socket_cookie accepts the sock_addr context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr as *mut c_void) };
    SOCK_ORIG.insert(&cookie, orig, 0)
}

fn try_connect4(ctx: &SockAddrContext) -> Result<(), i32> {
    let Some(pod) = capturing_pod(ctx) else {
        return Ok(());
    };
    let sa = ctx.sock_addr;
    // SAFETY: context pointer, see `capturing_pod`.
    let ip = unsafe { read_volatile(addr_of!((*sa).user_ip4)) };
    let port = dst_port(sa);
    if !capture_ipv4(ip, &pod, port) {
        return Ok(());
    }
    remember(ctx, &OrigDst { addr: [ip, 0, 0, 0], port, family: AF_INET, listener_family: AF_INET, _pad: 0 })?;
    // SAFETY: writing user_ip4 is allowed for connect4.
    unsafe { write_volatile(addr_of_mut!((*sa).user_ip4), LOOPBACK4) };
    redirect_port(sa);
    debug!(ctx, "captured connect to {:i}:{}", u32::from_be(ip), port);
    Ok(())
}

/// Whether a connect to this IPv4 destination (network order) is carried by the mesh: not
/// loopback, not unspecified, not the pod itself, not the tunnel port (already mTLS).
fn capture_ipv4(ip: u32, pod: &EnrolledPod, port: u16) -> bool {
    let first_octet = ip.to_ne_bytes()[0];
    ip != 0 && first_octet != 127 && ip != pod.ipv4 && port != TUNNEL_PORT && port != 0
}

fn try_connect6(ctx: &SockAddrContext) -> Result<(), i32> {
    let Some(pod) = capturing_pod(ctx) else {
        return Ok(());
    };
    let sa = ctx.sock_addr;
    // SAFETY: context pointer; user_ip6 is read one u32 word at a time, as the verifier requires.
    let ip = unsafe {
        [
            read_volatile(addr_of!((*sa).user_ip6[0])),
            read_volatile(addr_of!((*sa).user_ip6[1])),
            read_volatile(addr_of!((*sa).user_ip6[2])),
            read_volatile(addr_of!((*sa).user_ip6[3])),
        ]
    };
    let port = dst_port(sa);
    if ip[0] == 0 && ip[1] == 0 && ip[2] == V4_MAPPED_PREFIX {
        // A dual-stack socket connecting to an IPv4 destination: the connect goes out as IPv4 and
        // is accepted by the agent's 127.0.0.1 listener.
        if !capture_ipv4(ip[3], &pod, port) {
            return Ok(());
        }
        remember(ctx, &OrigDst { addr: [ip[3], 0, 0, 0], port, family: AF_INET, listener_family: AF_INET, _pad: 0 })?;
        // SAFETY: writing user_ip6 words is allowed for connect6.
        unsafe { write_volatile(addr_of_mut!((*sa).user_ip6[3]), LOOPBACK4) };
    } else {
        let unspecified = ip == [0, 0, 0, 0];
        let loopback = ip == [0, 0, 0, LOOPBACK6_LAST];
        if unspecified || loopback || ip == pod.ipv6 || port == TUNNEL_PORT || port == 0 {
            return Ok(());
        }
        remember(ctx, &OrigDst { addr: ip, port, family: AF_INET6, listener_family: AF_INET6, _pad: 0 })?;
        // SAFETY: writing user_ip6 words is allowed for connect6.
        unsafe {
            write_volatile(addr_of_mut!((*sa).user_ip6[0]), 0);
            write_volatile(addr_of_mut!((*sa).user_ip6[1]), 0);
            write_volatile(addr_of_mut!((*sa).user_ip6[2]), 0);
            write_volatile(addr_of_mut!((*sa).user_ip6[3]), LOOPBACK6_LAST);
        }
    }
    redirect_port(sa);
    debug!(ctx, "captured connect6 to port {}", port);
    Ok(())
}

#[cgroup_sock_addr(getpeername4)]
pub fn meshless_getpeername4(ctx: SockAddrContext) -> i32 {
    // SAFETY: bpf_get_socket_cookie accepts the sock_addr context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr as *mut c_void) };
    // SAFETY: copied out at once.
    if let Some(orig) = unsafe { SOCK_ORIG.get(&cookie).copied() } {
        if orig.family == AF_INET {
            // SAFETY: getpeername4 may write user_ip4 and user_port (kernel ≥ 5.8).
            unsafe {
                write_volatile(addr_of_mut!((*ctx.sock_addr).user_ip4), orig.addr[0]);
                write_volatile(addr_of_mut!((*ctx.sock_addr).user_port), u32::from(orig.port.to_be()));
            }
        }
    }
    ALLOW
}

#[cgroup_sock_addr(getpeername6)]
pub fn meshless_getpeername6(ctx: SockAddrContext) -> i32 {
    // SAFETY: bpf_get_socket_cookie accepts the sock_addr context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr as *mut c_void) };
    // SAFETY: copied out at once.
    if let Some(orig) = unsafe { SOCK_ORIG.get(&cookie).copied() } {
        // An IPv4 destination reached through a dual-stack socket is shown v4-mapped.
        let ip = if orig.family == AF_INET { [0, 0, V4_MAPPED_PREFIX, orig.addr[0]] } else { orig.addr };
        // SAFETY: getpeername6 may write user_ip6 (one u32 word at a time) and user_port.
        unsafe {
            let sa = ctx.sock_addr;
            write_volatile(addr_of_mut!((*sa).user_ip6[0]), ip[0]);
            write_volatile(addr_of_mut!((*sa).user_ip6[1]), ip[1]);
            write_volatile(addr_of_mut!((*sa).user_ip6[2]), ip[2]);
            write_volatile(addr_of_mut!((*sa).user_ip6[3]), ip[3]);
            write_volatile(addr_of_mut!((*sa).user_port), u32::from(orig.port.to_be()));
        }
    }
    ALLOW
}
