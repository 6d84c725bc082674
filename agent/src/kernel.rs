//! What the pod lifecycle asks of the node's kernel, as one trait: enter a pod's network
//! namespace, open the agent's listening sockets there, and keep the capture maps in step
//! (enroll, steer, mode, bypass, forget). [`Node`] does it for real (setns and the eBPF maps of
//! [`Capture`]); the lifecycle's unit tests use a fake that records the state, so every
//! transition (enroll, fail, retry, update, unenroll) runs without root.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener};
use std::path::Path;
use std::sync::Arc;

use meshless_common::{INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT, TUNNEL_PORT};

use crate::capture::{self, Capture, PodOrig};
use crate::handover::{ListenerSpec, Listeners, Role};
use crate::netns::{self, Netns};
use crate::policy::Mode;
use crate::workloads::PodKey;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("network namespace: {0}")]
    Netns(io::Error),
    #[error("cannot listen on {addr} inside its netns: {source} (is another agent or app using the port?)")]
    Listen { addr: SocketAddr, source: io::Error },
    #[error("kernel maps: {0}")]
    Capture(#[from] capture::Error),
}

pub trait Kernel: Send + Sync + 'static {
    /// Opens the pod's network namespace at `path`; returns it and its cookie (its key in the
    /// kernel maps).
    fn pod_netns(&self, path: &Path) -> Result<(Netns, u64), Error>;
    /// Opens the agent's listeners of `pod` inside `netns`, but for the roles `have` already
    /// holds (handed over by a predecessor).
    fn listeners(&self, netns: &Netns, pod: &PodKey, have: Listeners) -> Result<Listeners, Error>;
    /// Captures the outbound TCP of the netns `cookie` (addresses `ips`); returns the pod's
    /// original-destination map.
    fn enroll(&self, cookie: u64, ips: &[IpAddr]) -> Result<PodOrig, Error>;
    /// Steers the pod's inbound plaintext to `listener` (its 15006), as `mode` says.
    fn steer(
        &self,
        cookie: u64,
        netns: &Netns,
        ips: &[IpAddr],
        mode: Mode,
        listener: &TcpListener,
    ) -> Result<(), Error>;
    /// Holds the inbound of a pod the agent cannot serve as the kernel does with no agent:
    /// STRICT drops plaintext, PERMISSIVE passes it (no listener). A failure never lifts steering.
    fn guard(&self, cookie: u64, netns: &Netns, ips: &[IpAddr], mode: Mode) -> Result<(), Error>;
    /// Sets the inbound mode of every address of the pod (DISABLE: nothing of its inbound is
    /// captured; otherwise a connection to an address of its netns meshless does not know is
    /// dropped).
    fn set_mode(&self, cookie: u64, netns: &Netns, ips: &[IpAddr], mode: Mode) -> Result<(), Error>;
    /// The ports the pod's own spec declares for its kubelet probes: the only ones a probe
    /// passes to (from before the pod is steered, and kept across mode changes).
    fn probe_ports(&self, cookie: u64, ports: &[u16]) -> Result<(), Error>;
    /// The ports whose mode is not the pod's (`portLevelMtls`), kept across mode changes; set
    /// before the mode, so the pod's first steered connection finds them.
    fn port_modes(&self, cookie: u64, modes: &[(u16, Mode)]) -> Result<(), Error>;
    /// A pod outside the mesh: known, its connections pass untouched.
    fn bypass(&self, cookie: u64) -> Result<(), Error>;
    /// Removes every kernel entry of the netns `cookie`.
    fn forget(&self, cookie: u64) -> Result<(), Error>;
}

/// The real kernel: the eBPF maps and programs of [`Capture`], and `setns` into pods' netns
/// from the agent's own (`home`).
pub struct Node {
    pub capture: Arc<Capture>,
    pub home: Netns,
}

impl Kernel for Node {
    fn pod_netns(&self, path: &Path) -> Result<(Netns, u64), Error> {
        let netns = Netns::open(path).map_err(Error::Netns)?;
        let cookie = netns.run(&self.home, netns::current_cookie).map_err(Error::Netns)?.map_err(Error::Netns)?;
        Ok((netns, cookie))
    }

    fn listeners(&self, netns: &Netns, pod: &PodKey, have: Listeners) -> Result<Listeners, Error> {
        netns.run(&self.home, || open_listeners(pod, have)).map_err(Error::Netns)?
    }

    fn enroll(&self, cookie: u64, ips: &[IpAddr]) -> Result<PodOrig, Error> {
        Ok(self.capture.enroll(cookie, ips)?)
    }

    fn steer(
        &self,
        cookie: u64,
        netns: &Netns,
        ips: &[IpAddr],
        mode: Mode,
        listener: &TcpListener,
    ) -> Result<(), Error> {
        Ok(self.capture.steer(cookie, netns, ips, mode, listener)?)
    }

    fn guard(&self, cookie: u64, netns: &Netns, ips: &[IpAddr], mode: Mode) -> Result<(), Error> {
        Ok(self.capture.guard(cookie, netns, ips, mode)?)
    }

    fn set_mode(&self, cookie: u64, netns: &Netns, ips: &[IpAddr], mode: Mode) -> Result<(), Error> {
        Ok(self.capture.apply_mode(cookie, netns, ips, mode)?)
    }

    fn port_modes(&self, cookie: u64, modes: &[(u16, Mode)]) -> Result<(), Error> {
        Ok(self.capture.set_port_modes(cookie, modes)?)
    }

    fn probe_ports(&self, cookie: u64, ports: &[u16]) -> Result<(), Error> {
        Ok(self.capture.set_probe_ports(cookie, ports)?)
    }

    fn bypass(&self, cookie: u64) -> Result<(), Error> {
        Ok(self.capture.bypass(cookie)?)
    }

    fn forget(&self, cookie: u64) -> Result<(), Error> {
        Ok(self.capture.forget(cookie)?)
    }
}

/// Opens the agent's listeners inside the calling thread's netns (a pod's), but for the roles
/// `have` already holds: 127.0.0.1:15001 and [::1]:15001 (outbound capture), [::]:15006
/// (plaintext steered by sk_lookup) and [::]:15008 (tunnel), both dual-stack. A pod without IPv6
/// gets the IPv4 ones only.
fn open_listeners(pod: &PodKey, have: Listeners) -> Result<Listeners, Error> {
    let listen = |role: Role, addr: SocketAddr| {
        netns::listener(addr).map(|l| (ListenerSpec { pod: pod.clone(), role, addr }, l))
    };
    let err = |addr| move |source| Error::Listen { addr, source };
    let mut out = have.0;
    let missing = |out: &Vec<(ListenerSpec, TcpListener)>, role| !out.iter().any(|(s, _)| s.role == role);
    if missing(&out, Role::Outbound) {
        let v4 = SocketAddr::from((Ipv4Addr::LOCALHOST, OUTBOUND_PORT));
        out.push(listen(Role::Outbound, v4).map_err(err(v4))?);
        let v6 = SocketAddr::from((Ipv6Addr::LOCALHOST, OUTBOUND_PORT));
        match listen(Role::Outbound, v6) {
            Ok(l) => out.push(l),
            Err(e) if netns::ipv6_unavailable(&e) => {}
            Err(e) => return Err(err(v6)(e)),
        }
    }
    for (role, port) in [(Role::Inbound, INBOUND_PLAINTEXT_PORT), (Role::Tunnel, TUNNEL_PORT)] {
        if !missing(&out, role) {
            continue;
        }
        let any6 = SocketAddr::from((Ipv6Addr::UNSPECIFIED, port));
        match listen(role, any6) {
            Ok(l) => out.push(l),
            Err(e) if netns::ipv6_unavailable(&e) => {
                let any4 = SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
                out.push(listen(role, any4).map_err(err(any4))?);
            }
            Err(e) => return Err(err(any6)(e)),
        }
    }
    Ok(Listeners(out))
}
