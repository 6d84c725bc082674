//! `sk_lookup` (attached to each enrolled pod's netns): steer TCP connections that arrive at the
//! pod from outside it to the agent's plaintext listener in the pod ([::]:15006), so no plaintext
//! reaches a STRICT pod's app, and PERMISSIVE plaintext is decided by policy first.
//!
//! The program runs when the kernel looks for a listening socket for a new connection (a SYN),
//! never for packets of established ones. It leaves alone: anything that is not TCP; connections
//! from inside the pod (from loopback or the pod's own address: its own connections, and the
//! agent's deliveries, which it makes from inside the pod); the tunnel port 15008 (mTLS, served by the agent itself);
//! DISABLE pods and ports (the agent takes the program off a DISABLE pod's netns too; a port's
//! own mode, from `portLevelMtls`, overrides the pod's); and health probes from the
//! probe cgroup. When no agent listens (its listener socket is gone from the map), a STRICT pod
//! drops the connection (the client sees a reset at once) and a PERMISSIVE pod lets it through.
//!
//! The program runs only in enrolled pods' netns, so a connection to an address the agent did not
//! list for the pod (its IPv6 link-local address, a secondary or SLAAC address, another
//! interface's) is dropped: meshless cannot tell which pod's listener it belongs to, and plaintext
//! must never reach a STRICT app by an address meshless does not know.

use core::ptr::{addr_of, read_volatile};

use aya_ebpf::{macros::sk_lookup, programs::SkLookupContext};
use meshless_common::{inbound, InboundPod, PodAddr, ProbeKey, AF_INET, TUNNEL_PORT};

use crate::maps::{INBOUND, INBOUND_LISTENERS, PROBES};

const SK_DROP: u32 = 0;
const SK_PASS: u32 = 1;
const IPPROTO_TCP: u32 = 6;
/// The loopback device's index, the same in every netns.
const LOOPBACK_IFINDEX: u32 = 1;

#[sk_lookup]
pub fn meshless_sk_lookup(ctx: SkLookupContext) -> u32 {
    let l = ctx.lookup;
    // SAFETY: `l` is the program's context pointer, valid for the invocation; each field is read
    // at its own offset with its own width, as the verifier requires for bpf_sk_lookup.
    let (protocol, ifindex, local_port) = unsafe {
        (
            read_volatile(addr_of!((*l).protocol)),
            read_volatile(addr_of!((*l).ingress_ifindex)),
            read_volatile(addr_of!((*l).local_port)),
        )
    };
    if protocol != IPPROTO_TCP || ifindex == LOOPBACK_IFINDEX || local_port == u32::from(TUNNEL_PORT) {
        return SK_PASS;
    }
    // SAFETY: as above.
    let family = unsafe { read_volatile(addr_of!((*l).family)) };
    let local = addresses(&ctx, family, true);
    let remote = addresses(&ctx, family, false);
    // From inside the pod: its own connections to its own address, and the agent's deliveries
    // (from 127.0.0.6, or over IPv6 from the pod's address). Packets from outside cannot carry
    // these sources: the kernel drops them as martians on the way in.
    if remote == local || is_loopback(family, &remote) {
        return SK_PASS;
    }
    // SAFETY: the value is copied out at once.
    let Some(pod) = (unsafe { INBOUND.get(&PodAddr { addr: local, family }) }).copied() else {
        return SK_DROP; // an address of this enrolled netns that meshless does not know: fail closed
    };
    // The port's own mode (portLevelMtls), else the pod's.
    let mode = pod.mode_for(local_port as u16);
    if mode == inbound::DISABLE || probe(&ctx, &pod, family, local, remote, local_port as u16) {
        return SK_PASS;
    }
    match INBOUND_LISTENERS.redirect_sk_lookup(&ctx, pod.cookie, 0) {
        Ok(()) => SK_PASS,
        // No agent listens: STRICT never lets plaintext through; PERMISSIVE does.
        Err(_) if mode == inbound::STRICT => SK_DROP,
        Err(_) => SK_PASS,
    }
}

fn is_loopback(family: u32, addr: &[u32; 4]) -> bool {
    if family == u32::from(AF_INET) {
        addr[0].to_ne_bytes()[0] == 127
    } else {
        *addr == [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])]
    }
}

/// The local (destination) or remote (source) address of the connection, in the layout of
/// [`PodAddr`]: IPv4 in the first word.
fn addresses(ctx: &SkLookupContext, family: u32, local: bool) -> [u32; 4] {
    let l = ctx.lookup;
    // SAFETY: context pointer; full-width reads of the address fields (each word on its own).
    unsafe {
        if family == u32::from(AF_INET) {
            let ip =
                if local { read_volatile(addr_of!((*l).local_ip4)) } else { read_volatile(addr_of!((*l).remote_ip4)) };
            [ip, 0, 0, 0]
        } else if local {
            [
                read_volatile(addr_of!((*l).local_ip6[0])),
                read_volatile(addr_of!((*l).local_ip6[1])),
                read_volatile(addr_of!((*l).local_ip6[2])),
                read_volatile(addr_of!((*l).local_ip6[3])),
            ]
        } else {
            [
                read_volatile(addr_of!((*l).remote_ip6[0])),
                read_volatile(addr_of!((*l).remote_ip6[1])),
                read_volatile(addr_of!((*l).remote_ip6[2])),
                read_volatile(addr_of!((*l).remote_ip6[3])),
            ]
        }
    }
}

/// Whether this connection is one the probe cgroup announced (taken: each passes once), to a
/// port the pod's own spec declares for its probes: a probe naming another pod's address (an
/// `httpGet.host`) cannot open a way into a port that pod does not probe.
fn probe(
    ctx: &SkLookupContext,
    pod: &InboundPod,
    family: u32,
    local: [u32; 4],
    remote: [u32; 4],
    local_port: u16,
) -> bool {
    if local_port == 0 || !pod.probe_ports.contains(&local_port) {
        return false;
    }
    let l = ctx.lookup;
    // SAFETY: context pointer; remote_port is a 16-bit field in network byte order.
    let remote_port = u16::from_be(unsafe { read_volatile(addr_of!((*l).remote_port)) });
    let key = ProbeKey { client: remote, server: local, client_port: remote_port, server_port: local_port, family };
    // SAFETY: the value is not used; only whether the key exists.
    if unsafe { PROBES.get(&key) }.is_none() {
        return false;
    }
    let _ = PROBES.remove(&key);
    true
}
