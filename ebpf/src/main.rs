//! meshless's kernel programs.
//!
//! | program | hook | what it does |
//! |---|---|---|
//! | `meshless_connect4` / `meshless_connect6` | `cgroup/connect4`, `cgroup/connect6` | for a TCP connect from an enrolled pod to anything but loopback or the pod itself, store the original destination on the socket and rewrite it to the pod-local outbound listener (127.0.0.1:15001 / [::1]:15001); from a pod the agent does not know yet, refuse TCP connects beyond loopback (`EPERM`) |
//! | `meshless_sock_ops` | `sock_ops`, `TCP_CONNECT_CB` | once the source is known, file the original destination in the pod's own map under (source address, source port, family) for the agent to read after `accept()` |
//! | `meshless_getpeername4` / `6` | `cgroup/getpeername4`, `6` | show a captured socket the peer it dialed |
//! | `meshless_bind4` / `6` | `cgroup/bind4`, `6` | refuse apps in enrolled or unknown pods the agent's ports (15001, 15006, 15008) |
//! | `meshless_sk_lookup` | `sk_lookup`, in each enrolled pod's netns | steer TCP arriving at the pod from outside (not loopback, not 15008) to the agent's 15006 listener in the pod; STRICT pods drop it when no agent listens, PERMISSIVE pods pass it; DISABLE pods and announced probes pass |
//! | `meshless_probe_sock_ops` | `sock_ops` on the probe cgroup (the kubelet's) | announce each probe connection's 4-tuple, so it alone reaches the app |
//!
//! The cgroup programs attach to the cgroup that holds the node's pods (the probe program to the
//! kubelet's cgroup); sk_lookup attaches to each enrolled pod's netns. The maps are documented in [`maps`].
//! The programs fail *closed* for enrolled pods: a connect that should be captured but cannot be
//! recorded is refused, never sent out unchanged.
#![no_std]
#![no_main]

mod connect;
mod maps;
mod sk_lookup;
mod sock_ops;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any program that could reach this; it exists to satisfy no_std.
    loop {}
}

#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
