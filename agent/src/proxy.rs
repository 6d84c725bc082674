//! The proxy: per local pod, an outbound listener (127.0.0.1:15001, [::1]:15001) and the tunnel
//! listener ([::]:15008), all inside the pod's netns; outbound connections go over HBONE with the
//! pod's own identity, inbound tunnel streams are delivered into the pod.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use meshless_common::{INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT, TUNNEL_PORT};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tracing::{debug, info, info_span, warn, Instrument};

use crate::capture::Capture;
use crate::identity::{Ca, PodTls, SpiffeId, SVID_TTL};
use crate::netns::{self, Netns};
use crate::state::{self, State};
use crate::tunnel::{self, Decision, H2Stream};

/// Source address of deliveries into a pod (the app sees connections from 127.0.0.6).
const DELIVERY_SOURCE_V4: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 6);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Copy buffer per direction: large, so bulk transfers move in few system calls.
const COPY_BUF: usize = 256 << 10;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("pod {pod}: {source}")]
    Netns { pod: String, source: std::io::Error },
    #[error("pod {pod}: cannot listen on {addr} inside its netns: {source} (is another agent or app using the port?)")]
    Listen { pod: String, addr: SocketAddr, source: std::io::Error },
    #[error("pod {pod}: identity: {source}")]
    Identity { pod: String, source: crate::identity::Error },
    #[error(transparent)]
    Capture(#[from] crate::capture::Error),
}

/// A pod of this node, enrolled: its netns, its identity and its listeners.
pub struct LocalPod {
    pub pod: state::Pod,
    netns: Netns,
    cookie: u64,
    tls: PodTls,
}

pub struct Proxy {
    state: State,
    home: Netns,
    capture: Capture,
    pods: Vec<Arc<LocalPod>>,
}

struct Listeners {
    outbound: Vec<std::net::TcpListener>,
    tunnel: std::net::TcpListener,
}

impl Proxy {
    /// Prepares every local enrolled pod (netns, listeners, certificate), attaches the capture and
    /// enrolls the pods, then serves until the returned future is dropped.
    pub async fn run(state: State, ca: Ca, kernel_log: bool) -> Result<(), Error> {
        let home = Netns::current().map_err(|source| Error::Netns { pod: "<agent>".into(), source })?;
        let bundle = ca.bundle();
        let mut prepared = Vec::new();
        for pod in state.local_pods().filter(|p| p.enrolled) {
            let key = pod.key();
            let path = pod.netns.as_ref().expect("validated: local enrolled pods have a netns");
            let netns = Netns::open(path).map_err(|source| Error::Netns { pod: key.clone(), source })?;
            let listeners = netns
                .run(&home, || open_listeners(&key))
                .map_err(|source| Error::Netns { pod: key.clone(), source })??;
            let cookie =
                netns::netns_cookie(&listeners.tunnel).map_err(|source| Error::Netns { pod: key.clone(), source })?;
            let svid =
                ca.issue(&pod.identity, SVID_TTL).map_err(|source| Error::Identity { pod: key.clone(), source })?;
            let tls = PodTls::new(&svid, &bundle, &state.trust_domain)
                .map_err(|source| Error::Identity { pod: key.clone(), source })?;
            info!(pod = %key, id = %svid.id, netns_cookie = cookie, "workload certificate issued");
            prepared.push((Arc::new(LocalPod { pod: pod.clone(), netns, cookie, tls }), listeners));
        }
        let capture = Capture::attach(&state.cgroup_parent, kernel_log)?;
        for (pod, _) in &prepared {
            capture.enroll(pod.cookie, &pod.pod.ips)?;
        }
        let proxy = Arc::new(Proxy { state, home, capture, pods: prepared.iter().map(|(p, _)| p.clone()).collect() });
        let mut tasks = tokio::task::JoinSet::new();
        for (pod, listeners) in prepared {
            for l in listeners.outbound {
                let l = TcpListener::from_std(l).map_err(|source| Error::Netns { pod: pod.pod.key(), source })?;
                tasks.spawn(outbound_loop(proxy.clone(), pod.clone(), l));
            }
            let l = TcpListener::from_std(listeners.tunnel)
                .map_err(|source| Error::Netns { pod: pod.pod.key(), source })?;
            tasks.spawn(tunnel_loop(proxy.clone(), pod.clone(), l));
        }
        info!(node = %proxy.state.node, pods = proxy.pods.len(), "agent ready");
        while tasks.join_next().await.is_some() {}
        Ok(())
    }
}

fn open_listeners(pod: &str) -> Result<Listeners, Error> {
    let listen =
        |addr: SocketAddr| netns::listener(addr).map_err(|source| Error::Listen { pod: pod.to_string(), addr, source });
    Ok(Listeners {
        outbound: vec![
            listen(SocketAddr::from((Ipv4Addr::LOCALHOST, OUTBOUND_PORT)))?,
            listen(SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, OUTBOUND_PORT)))?,
        ],
        tunnel: listen(SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, TUNNEL_PORT)))?,
    })
}

/// Accepts on `listener` forever, handing each connection to `handle`. Accept errors (fd limits,
/// aborted handshakes) are logged and retried after a pause instead of ending the listener.
async fn accept_loop(
    pod: Arc<LocalPod>,
    listener: TcpListener,
    what: &'static str,
    handle: impl Fn(TcpStream, SocketAddr),
) {
    loop {
        match listener.accept().await {
            Ok((sock, peer)) => handle(sock, peer),
            Err(e) => {
                warn!(pod = %pod.pod.key(), what, error = %e, "accept failed; retrying");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn outbound_loop(proxy: Arc<Proxy>, pod: Arc<LocalPod>, listener: TcpListener) {
    accept_loop(pod.clone(), listener, "outbound", |sock, peer| {
        let span = info_span!("outbound", pod = %pod.pod.key(), %peer);
        tokio::spawn(outbound(proxy.clone(), pod.clone(), sock, peer).instrument(span));
    })
    .await
}

/// Opens a TCP connection from inside `pod`'s netns, marked as the agent's (never captured).
async fn connect_from(
    proxy: &Proxy,
    ns: &Netns,
    bind: Option<SocketAddr>,
    to: SocketAddr,
) -> std::io::Result<TcpStream> {
    let sock = ns.run(&proxy.home, || -> std::io::Result<socket2::Socket> {
        let s = netns::agent_socket(&to)?;
        if let Some(b) = bind {
            s.bind(&b.into())?;
        }
        Ok(s)
    })??;
    let sock = TcpSocket::from_std_stream(sock.into());
    tokio::time::timeout(CONNECT_TIMEOUT, sock.connect(to))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, format!("connect to {to} timed out")))?
}

async fn outbound(proxy: Arc<Proxy>, pod: Arc<LocalPod>, app: TcpStream, peer: SocketAddr) {
    let Some(dst) = proxy.capture.take_orig_dst(pod.cookie, peer) else {
        warn!("no original destination recorded for this connection; closing it");
        return;
    };
    let dst = SocketAddr::new(state::canonical(dst.ip()), dst.port());
    let dst_pod = proxy.state.pod_by_ip(dst.ip()).filter(|p| p.enrolled);
    let Some(dst_pod) = dst_pod else {
        // Not a mesh destination: pass through, in plaintext, from the pod's own netns.
        debug!(dst_addr = %dst, "passthrough (destination is not in the mesh)");
        match connect_from(&proxy, &pod.netns, None, dst).await {
            Ok(up) => copy(app, up, "passthrough").await,
            Err(e) => warn!(dst_addr = %dst, error = %e, "passthrough connect failed"),
        }
        return;
    };
    let dst_id = dst_pod.identity.clone();
    let tunnel_addr = SocketAddr::new(dst.ip(), TUNNEL_PORT);
    let result = async {
        let tcp = connect_from(&proxy, &pod.netns, None, tunnel_addr).await.map_err(|e| e.to_string())?;
        let tls = pod.tls.client(&dst_id).map_err(|e| e.to_string())?;
        tunnel::connect(tcp, tls, dst).await.map_err(|e| e.to_string())
    }
    .await;
    match result {
        Ok(stream) => {
            info!(src_id = %pod.tls.id, dst_id = %dst_id, dst_addr = %dst, "outbound connection over HBONE");
            splice(stream, app, "outbound").await;
        }
        Err(e) => {
            warn!(src_id = %pod.tls.id, dst_id = %dst_id, dst_addr = %dst, error = %e, "HBONE connect failed; closing the app's connection")
        }
    }
}

async fn tunnel_loop(proxy: Arc<Proxy>, pod: Arc<LocalPod>, listener: TcpListener) {
    accept_loop(pod.clone(), listener, "tunnel", |sock, peer| {
        let _ = sock.set_nodelay(true);
        let span = info_span!("inbound", pod = %pod.pod.key(), %peer);
        let (proxy, pod) = (proxy.clone(), pod.clone());
        tokio::spawn(
            async move {
                let decide = {
                    let (proxy, pod) = (proxy.clone(), pod.clone());
                    move |src: SpiffeId, target: Result<SocketAddr, &'static str>| {
                        let (proxy, pod) = (proxy.clone(), pod.clone());
                        async move { decide(&proxy, &pod, src, target).await }
                    }
                };
                let carry = |stream: H2Stream, (app, src, target): (TcpStream, SpiffeId, SocketAddr)| async move {
                    let span = info_span!("stream", src_id = %src, dst_addr = %target);
                    splice(stream, app, "inbound").instrument(span).await
                };
                if let Err(e) = tunnel::serve(sock, pod.tls.server.clone(), decide, carry).await {
                    warn!(error = %e, "inbound tunnel connection refused or failed");
                }
            }
            .instrument(span),
        );
    })
    .await
}

/// Decides one inbound CONNECT: the target must be this pod, then connects to the app inside it.
async fn decide(
    proxy: &Proxy,
    pod: &LocalPod,
    src: SpiffeId,
    target: Result<SocketAddr, &'static str>,
) -> Decision<(TcpStream, SpiffeId, SocketAddr)> {
    let target = match target {
        Ok(t) => SocketAddr::new(state::canonical(t.ip()), t.port()),
        Err(reason) => {
            warn!(src_id = %src, reason, "bad HBONE request");
            return Decision::Refuse(StatusCode::BAD_REQUEST);
        }
    };
    if let Err((status, why)) = check_target(&pod.pod.ips, target) {
        warn!(src_id = %src, dst_addr = %target, why, "refusing HBONE request");
        return Decision::Refuse(status);
    }
    let bind = match target.ip() {
        IpAddr::V4(_) => Some(SocketAddr::from((DELIVERY_SOURCE_V4, 0))),
        IpAddr::V6(_) => None,
    };
    match connect_from(proxy, &pod.netns, bind, target).await {
        Ok(app) => {
            info!(src_id = %src, dst_id = %pod.tls.id, dst_addr = %target, "inbound connection authorized");
            Decision::Accept((app, src, target))
        }
        Err(e) => {
            warn!(src_id = %src, dst_addr = %target, error = %e, "delivery to the app failed");
            Decision::Refuse(StatusCode::SERVICE_UNAVAILABLE)
        }
    }
}

async fn splice(stream: H2Stream, app: TcpStream, what: &'static str) {
    match stream.splice(app).await {
        Ok((tx, rx)) => debug!(what, bytes_to_tunnel = tx, bytes_from_tunnel = rx, "connection closed"),
        Err(e) => debug!(what, error = %e, "connection ended with an error"),
    }
}

/// Whether an inbound CONNECT may be delivered: only to this pod's own addresses, and never to
/// the agent's ports (a CONNECT there would loop through the agent).
fn check_target(pod_ips: &[IpAddr], target: SocketAddr) -> Result<(), (StatusCode, &'static str)> {
    if [OUTBOUND_PORT, INBOUND_PLAINTEXT_PORT, TUNNEL_PORT].contains(&target.port()) {
        return Err((StatusCode::BAD_REQUEST, "target is one of the agent's ports"));
    }
    if !pod_ips.contains(&target.ip()) {
        return Err((StatusCode::MISDIRECTED_REQUEST, "target is not this pod"));
    }
    Ok(())
}

/// Copies both ways until both sides are done; an EOF on one side half-closes the other.
async fn copy<A, B>(mut a: A, mut b: B, what: &'static str)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    match tokio::io::copy_bidirectional_with_sizes(&mut a, &mut b, COPY_BUF, COPY_BUF).await {
        Ok((tx, rx)) => debug!(what, bytes_out = tx, bytes_in = rx, "connection closed"),
        Err(e) => debug!(what, error = %e, "connection ended with an error"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inbound_targets_are_limited_to_the_pods_own_addresses_and_app_ports() {
        let ips: Vec<IpAddr> = vec!["198.19.2.11".parse().unwrap(), "fd6d:6c00:2::11".parse().unwrap()];
        assert!(check_target(&ips, "198.19.2.11:8080".parse().unwrap()).is_ok());
        assert!(check_target(&ips, "[fd6d:6c00:2::11]:8080".parse().unwrap()).is_ok());
        let refused = |t: &str| check_target(&ips, t.parse().unwrap()).unwrap_err().0;
        assert_eq!(refused("198.19.2.12:8080"), StatusCode::MISDIRECTED_REQUEST, "another pod");
        assert_eq!(refused("127.0.0.1:8080"), StatusCode::MISDIRECTED_REQUEST, "loopback of the pod");
        for port in [15001, 15006, 15008] {
            assert_eq!(refused(&format!("198.19.2.11:{port}")), StatusCode::BAD_REQUEST, "agent port {port}");
        }
    }
}
