//! `cgroup/connect4` and `cgroup/connect6`: redirect an enrolled pod's outbound TCP connects to
//! the agent's outbound listener inside the same pod netns; refuse them for a pod the agent does
//! not know yet. `cgroup/getpeername4` and `cgroup/getpeername6`: show the application the peer it
//! asked for, not the agent. `cgroup/bind4` and `cgroup/bind6`: keep apps off the agent's ports.

use core::ffi::c_void;
use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};

use aya_ebpf::{
    bindings::bpf_sock_addr,
    helpers::{bpf_get_current_cgroup_id, bpf_get_netns_cookie, bpf_skc_to_mptcp_sock},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use aya_log_ebpf::debug;
use meshless_common::{
    mode, EnrolledPod, OrigDst, AF_INET, AF_INET6, AGENT_MARK, AGENT_POD_PORTS, OUTBOUND_PORT, TUNNEL_PORT,
};

use crate::maps::{AGENTS, ENROLLED, SOCK_ORIG};

const SOCK_STREAM: u32 = 1;
const IPPROTO_TCP: u32 = 6;
/// Verdict that lets the call proceed (rewritten or not).
const ALLOW: i32 = 1;
/// Verdict that fails the call with `EPERM`.
const DENY: i32 = 0;

/// 127.0.0.1 as `user_ip4` holds it (network byte order in a native u32).
const LOOPBACK4: u32 = u32::from_ne_bytes([127, 0, 0, 1]);
/// The last word of ::1 and the third word of a v4-mapped address, as `user_ip6` holds them.
const LOOPBACK6_LAST: u32 = u32::from_ne_bytes([0, 0, 0, 1]);
const V4_MAPPED_PREFIX: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

#[cgroup_sock_addr(connect4)]
pub fn meshless_connect4(ctx: SockAddrContext) -> i32 {
    match pod_of(&ctx) {
        Pod::Unknown => {
            // SAFETY: context pointer, see `pod_of`.
            let ip = unsafe { read_volatile(addr_of!((*ctx.sock_addr).user_ip4)) };
            if is_loopback4(ip) {
                ALLOW
            } else {
                DENY
            }
        }
        // Fail closed: a connect that should be captured but cannot be is refused, never sent
        // out unchanged in plaintext.
        Pod::Capture(pod) => match try_connect4(&ctx, &pod) {
            Ok(()) => ALLOW,
            Err(_) => DENY,
        },
        Pod::Uncarried => DENY,
        Pod::Other => ALLOW,
    }
}

#[cgroup_sock_addr(connect6)]
pub fn meshless_connect6(ctx: SockAddrContext) -> i32 {
    match pod_of(&ctx) {
        Pod::Unknown => {
            let ip = user_ip6(ctx.sock_addr);
            let v4_loopback = ip[0] == 0 && ip[1] == 0 && ip[2] == V4_MAPPED_PREFIX && is_loopback4(ip[3]);
            if ip == [0, 0, 0, LOOPBACK6_LAST] || v4_loopback {
                ALLOW
            } else {
                DENY
            }
        }
        Pod::Capture(pod) => match try_connect6(&ctx, &pod) {
            Ok(()) => ALLOW,
            Err(_) => DENY,
        },
        Pod::Uncarried => DENY,
        Pod::Other => ALLOW,
    }
}

/// `cgroup/bind4`: apps in a captured or not yet known pod may not bind the agent's ports.
#[cgroup_sock_addr(bind4)]
pub fn meshless_bind4(ctx: SockAddrContext) -> i32 {
    bind_verdict(&ctx)
}

/// `cgroup/bind6`: as `bind4`.
#[cgroup_sock_addr(bind6)]
pub fn meshless_bind6(ctx: SockAddrContext) -> i32 {
    bind_verdict(&ctx)
}

fn bind_verdict(ctx: &SockAddrContext) -> i32 {
    let port = dst_port(ctx.sock_addr);
    if !AGENT_POD_PORTS.contains(&port) {
        return ALLOW;
    }
    match pod_of(ctx) {
        Pod::Capture(_) | Pod::Unknown | Pod::Uncarried => DENY,
        Pod::Other => ALLOW,
    }
}

/// Who a TCP socket of the node's pod cgroup belongs to, for the capture programs.
enum Pod {
    /// An enrolled pod: its TCP is carried by the mesh.
    Capture(EnrolledPod),
    /// A netns the agent has not learned yet: no TCP leaves it until it has.
    Unknown,
    /// An enrolled pod's MPTCP socket: the mesh cannot carry it, and it must not leave in
    /// plaintext, so it is refused (`EPERM`; applications fall back to plain TCP or fail).
    Uncarried,
    /// Not ours to touch: not TCP, the agent's own socket, or a pod the agent leaves alone
    /// (whose MPTCP passes too).
    Other,
}

fn pod_of(ctx: &SockAddrContext) -> Pod {
    let sa = ctx.sock_addr;
    // SAFETY: `sa` is the program's context pointer, valid for the whole invocation; the verifier
    // checks each field access against bpf_sock_addr's layout (full-width u32 reads).
    let (sock_type, protocol) =
        unsafe { (read_volatile(addr_of!((*sa).type_)), read_volatile(addr_of!((*sa).protocol))) };
    // Only TCP (MPTCP subflows included, see below): SCTP stream sockets are SOCK_STREAM too,
    // but not ours to carry.
    if sock_type != SOCK_STREAM || protocol != IPPROTO_TCP {
        return Pod::Other;
    }
    // SAFETY: `sk` of bpf_sock_addr is a valid, non-NULL `struct bpf_sock *` for these hooks
    // (the socket being connected or bound); reading `mark` is allowed for sock_addr programs.
    let mark = unsafe {
        let sk = (*sa).__bindgen_anon_1.sk;
        if sk.is_null() {
            return Pod::Other;
        }
        read_volatile(addr_of!((*sk).mark))
    };
    if mark == AGENT_MARK && from_agent() {
        return Pod::Other;
    }
    // An MPTCP socket connects and binds through a TCP subflow, which is what these hooks see
    // (with protocol TCP); the helper finds the MPTCP socket behind a subflow (kernel ≥ 5.19).
    // SAFETY: `sk` is the hook's socket, non-NULL (checked above); the helper only reads it.
    let mptcp = !unsafe { bpf_skc_to_mptcp_sock((*sa).__bindgen_anon_1.sk as *mut c_void) }.is_null();
    // SAFETY: bpf_get_netns_cookie accepts the sock_addr context (kernel ≥ 5.7).
    let netns = unsafe { bpf_get_netns_cookie(sa as *mut c_void) };
    // SAFETY: the value is copied out before any other map operation could invalidate it.
    match unsafe { ENROLLED.get(&netns) } {
        // MPTCP or not, nothing leaves a pod the agent has not learned yet.
        None => Pod::Unknown,
        Some(pod) if pod.mode == mode::CAPTURE && mptcp => Pod::Uncarried,
        Some(pod) if pod.mode == mode::CAPTURE => Pod::Capture(*pod),
        Some(_) => Pod::Other,
    }
}

/// Whether the running process is an agent: its cgroup is one the agents wrote into `AGENTS`.
fn from_agent() -> bool {
    // SAFETY: bpf_get_current_cgroup_id takes no arguments; allowed for cgroup sock_addr hooks.
    let id = unsafe { bpf_get_current_cgroup_id() };
    id != 0 && (AGENTS.get(0) == Some(&id) || AGENTS.get(1) == Some(&id))
}

fn is_loopback4(ip: u32) -> bool {
    ip.to_ne_bytes()[0] == 127
}

fn user_ip6(sa: *mut bpf_sock_addr) -> [u32; 4] {
    // SAFETY: context pointer; user_ip6 is read one u32 word at a time, as the verifier requires.
    unsafe {
        [
            read_volatile(addr_of!((*sa).user_ip6[0])),
            read_volatile(addr_of!((*sa).user_ip6[1])),
            read_volatile(addr_of!((*sa).user_ip6[2])),
            read_volatile(addr_of!((*sa).user_ip6[3])),
        ]
    }
}

/// Destination port of the connect, host byte order. `user_port` is read as a full u32 (narrow
/// reads of it are rejected by newer kernels) and holds the port in network order.
fn dst_port(sa: *mut bpf_sock_addr) -> u16 {
    // SAFETY: context pointer, see `pod_of`.
    let raw = unsafe { read_volatile(addr_of!((*sa).user_port)) };
    u16::from_be(raw as u16)
}

fn redirect_port(sa: *mut bpf_sock_addr) {
    // SAFETY: writing user_port is allowed for connect hooks; network order in the low 16 bits.
    unsafe { write_volatile(addr_of_mut!((*sa).user_port), u32::from(OUTBOUND_PORT.to_be())) };
}

/// Stores the original destination on the socket (for sock_ops and getpeername).
fn remember(ctx: &SockAddrContext, orig: &OrigDst) -> Result<(), i32> {
    // SAFETY: the context's `sk` is the connecting socket (checked non-NULL in `pod_of`); the
    // helper creates the storage if missing and returns NULL only when it cannot.
    let slot = unsafe { SOCK_ORIG.get_or_insert_ptr_mut(ctx, None) };
    if slot.is_null() {
        return Err(-1);
    }
    // SAFETY: a non-NULL pointer from bpf_sk_storage_get points at this socket's value.
    unsafe { *slot = *orig };
    Ok(())
}

fn try_connect4(ctx: &SockAddrContext, pod: &EnrolledPod) -> Result<(), i32> {
    let sa = ctx.sock_addr;
    // SAFETY: context pointer, see `pod_of`.
    let ip = unsafe { read_volatile(addr_of!((*sa).user_ip4)) };
    let port = dst_port(sa);
    if !capture_ipv4(ip, pod, port) {
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

fn try_connect6(ctx: &SockAddrContext, pod: &EnrolledPod) -> Result<(), i32> {
    let sa = ctx.sock_addr;
    let ip = user_ip6(sa);
    let port = dst_port(sa);
    if ip[0] == 0 && ip[1] == 0 && ip[2] == V4_MAPPED_PREFIX {
        // A dual-stack socket connecting to an IPv4 destination: the connect goes out as IPv4 and
        // is accepted by the agent's 127.0.0.1 listener.
        if !capture_ipv4(ip[3], pod, port) {
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

/// The original destination stored on this socket by connect4/6, if it was captured.
fn recalled(ctx: &SockAddrContext) -> Option<OrigDst> {
    // SAFETY: the context's `sk` is the socket getpeername() was called on; without the create
    // flag the helper only looks up, returning NULL when the socket has no storage.
    let slot = unsafe { SOCK_ORIG.get_ptr_mut(ctx) };
    // SAFETY: non-NULL pointers from bpf_sk_storage_get point at this socket's value; copied out.
    (!slot.is_null()).then(|| unsafe { *slot })
}

#[cgroup_sock_addr(getpeername4)]
pub fn meshless_getpeername4(ctx: SockAddrContext) -> i32 {
    if let Some(orig) = recalled(&ctx) {
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
    if let Some(orig) = recalled(&ctx) {
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
