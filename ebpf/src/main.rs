//! meshless's kernel programs.
//!
//! | program | hook | what it does |
//! |---|---|---|
//! | `meshless_connect4` / `meshless_connect6` | `cgroup/connect4`, `cgroup/connect6` | for a TCP connect from an enrolled pod to anything but loopback or the pod itself, remember the original destination and rewrite it to the pod-local outbound listener (127.0.0.1:15001 / [::1]:15001) |
//! | `meshless_sock_ops` | `sock_ops`, `TCP_CONNECT_CB` | once the source port is known, file the original destination under (netns cookie, source port, family) for the agent to read after `accept()` |
//!
//! Both attach to the cgroup that holds the node's pods. The maps are documented in [`maps`].
//! Every program fails *open*: an error inside a program lets the application's connect proceed
//! unchanged rather than failing it.
#![no_std]
#![no_main]

mod connect;
mod maps;
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
