//! The data path of one enrolled pod: its outbound listener (captured connections → a pooled
//! HBONE stream with the pod's own identity, or plaintext passthrough to destinations outside the
//! mesh), its tunnel listener (mTLS → the inbound decision → delivery into the pod) and its
//! plaintext listener (what sk_lookup steered here → the mode and the inbound decision with an
//! unauthenticated source → delivery, or a reset). Reads the workload store without locks; every
//! connection runs in a task of its pod's tracker.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use meshless_common::TUNNEL_PORT;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, info_span, warn, Instrument};

use crate::authorize::{self, Request};
use crate::config::TunnelLimits;
use crate::handover::{Listeners, Role};
use crate::limits::HandshakeLimiter;
use crate::local::{LiveGuard, LocalPod, OwnedPeer};
use crate::netns::{self, Netns};
use crate::policy::Peer;
use crate::pool::{Pool, PoolKey};
use crate::telemetry::{Conn, ConnLabels, Detail, End, Flags, Party, Reporter, Security};
use crate::tunnel::{self, ActivityGuard, Ended, Inbound};
use crate::workloads::{canonical, Store, Workload};

/// What the data path needs, built once by the app and inputs by every pod's listeners
/// (ztunnel's `ProxyInputs`). The data path imports nothing of the app or the pod lifecycle.
pub struct Inputs {
    pub limits: TunnelLimits,
    pub store: Arc<Store>,
    /// The agent's own netns, where threads return after creating sockets in a pod's.
    pub home: Netns,
    pub pool: Pool,
    pub handshakes: Arc<HandshakeLimiter>,
    /// Inbound decisions, counted.
    pub decisions: Arc<authorize::Stats>,
    /// Connection metrics and the access log.
    pub telemetry: Arc<crate::telemetry::Telemetry>,
}

/// Source address of deliveries into a pod (the app sees connections from 127.0.0.6).
const DELIVERY_SOURCE_V4: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 6);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Starts the accept loops of `pod`'s listeners; they stop when `accepting` is cancelled.
pub fn serve_pod(
    inputs: &Arc<Inputs>,
    pod: &Arc<LocalPod>,
    listeners: Listeners,
    accepting: &CancellationToken,
) -> std::io::Result<()> {
    for (spec, l) in listeners.0 {
        l.set_nonblocking(true)?;
        let l = TcpListener::from_std(l)?;
        let (inputs, pod, accepting) = (inputs.clone(), pod.clone(), accepting.clone());
        match spec.role {
            Role::Outbound => tokio::spawn(accept_loop(l, accepting, "outbound", move |sock, peer| {
                // The app's connection: from here on, the agent dying resets it.
                tunnel::arm_reset(&sock);
                if over_budget(&inputs, &pod, "outbound") {
                    return tunnel::reset(sock);
                }
                let span = info_span!("outbound", pod = %pod.key, %peer);
                pod.conns.spawn(outbound(inputs.clone(), pod.clone(), sock, peer).instrument(span));
            })),
            Role::Tunnel => tokio::spawn(accept_loop(l, accepting, "tunnel", move |sock, peer| {
                let span = info_span!("inbound", pod = %pod.key, %peer);
                pod.conns.spawn(tunnel_connection(inputs.clone(), pod.clone(), sock, peer).instrument(span));
            })),
            Role::Inbound => tokio::spawn(accept_loop(l, accepting, "plaintext", move |sock, peer| {
                tunnel::arm_reset(&sock);
                if over_budget(&inputs, &pod, "plaintext") {
                    return tunnel::reset(sock);
                }
                let span = info_span!("plaintext", pod = %pod.key, %peer);
                pod.conns.spawn(plaintext_connection(inputs.clone(), pod.clone(), sock, peer).instrument(span));
            })),
            // Never a pod's: filed under the node's key, taken by the admin endpoint.
            Role::Admin | Role::Metrics => continue,
        };
    }
    Ok(())
}

/// Whether `pod` carries as many connections as one pod may (`--max-pod-connections`: its
/// outbound and plaintext connections, tunnel connections and their streams): then a new one is
/// refused at once, so one pod cannot take the agent's memory or descriptors from the others.
fn over_budget(inputs: &Inputs, pod: &LocalPod, what: &'static str) -> bool {
    let open = pod.conns.len();
    if open < inputs.limits.max_pod_connections {
        return false;
    }
    debug!(pod = %pod.key, what, open, limit = inputs.limits.max_pod_connections,
        "the pod carries as many connections as it may; refusing a new one");
    true
}

/// Accepts on `listener` until `accepting` is cancelled, handing each connection to `handle`.
/// Accept errors (fd limits, aborted handshakes) are logged and retried after a pause instead of
/// ending the listener.
async fn accept_loop(
    listener: TcpListener,
    accepting: CancellationToken,
    what: &'static str,
    handle: impl Fn(TcpStream, SocketAddr),
) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = accepting.cancelled() => return,
        };
        match accepted {
            Ok((sock, peer)) => handle(sock, peer),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionAborted => {}
            Err(e) => {
                warn!(what, error = %e, "accept failed; retrying");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Opens a TCP connection from inside `ns` (a pod's netns), marked as the agent's (never captured).
async fn connect_from(
    home: &Netns,
    ns: &Netns,
    bind: Option<SocketAddr>,
    to: SocketAddr,
) -> std::io::Result<TcpStream> {
    let sock = ns.run(home, || -> std::io::Result<socket2::Socket> {
        let s = netns::agent_socket(&to)?;
        if let Some(b) = bind {
            // The source port is picked at connect, per destination, not at bind (where every
            // delivery from 127.0.0.6 would share one ephemeral range across all destinations).
            if b.is_ipv4() {
                nix::sys::socket::setsockopt(&s, nix::sys::socket::sockopt::IpBindAddressNoPort, &true)?;
            }
            s.bind(&b.into())?;
        }
        Ok(s)
    })??;
    let sock = TcpSocket::from_std_stream(sock.into());
    tokio::time::timeout(CONNECT_TIMEOUT, sock.connect(to))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, format!("connect to {to} timed out")))?
}

async fn outbound(inputs: Arc<Inputs>, pod: Arc<LocalPod>, app: TcpStream, peer: SocketAddr) {
    let Some(dst) = pod.orig.take(peer) else {
        warn!("no original destination recorded for this connection; resetting it");
        tunnel::reset(app);
        return;
    };
    // A connection the app reset while it waited in the accept queue (a connect flood, an app
    // that gave up) needs no upstream: opening one would only cost the destination a stream.
    if let Ok(Some(e)) = app.take_error() {
        debug!(error = %e, "the app's connection ended before it was accepted");
        return;
    }
    let dst = SocketAddr::new(canonical(dst.ip()), dst.port());
    // The app's socket was redirected to the outbound listener on loopback: its address as the
    // access log names it is the pod's (of the destination's family), with the app's port.
    let peer = app_addr(&pod, dst, peer);
    let dir = inputs.store.load();
    let dst_pod = dir.pod_by_ip(dst.ip()).filter(|p| p.mesh).cloned();
    let Some(dst_pod) = dst_pod else {
        // A Service's virtual IP: one of its endpoints.
        if let Some(front) = dir.pod_by_ip(dst.ip()).is_none().then(|| dir.services.get(dst).cloned()).flatten() {
            drop(dir);
            return to_service(inputs, pod, app, peer, dst, front).await;
        }
        // Not a mesh destination: pass through, in plaintext, from the pod's own netns.
        debug!(dst_addr = %dst, "passthrough (destination is not in the mesh)");
        let destination = dir.pod_by_ip(dst.ip()).map(|w| Party::pod(w)).unwrap_or_else(Party::unknown);
        drop(dir);
        let labels = |flags| outbound_labels(&pod, destination.clone(), None, flags, Security::None);
        let detail =
            || Detail { src_addr: Some(peer), dst_addr: Some(dst), transport: "passthrough", ..Detail::default() };
        match connect_from(&inputs.home, &pod.netns, None, dst).await {
            Ok(up) => {
                let conn = inputs.telemetry.open(labels(Flags::None), detail());
                passthrough(app, up, &pod.stop, conn).await
            }
            Err(e) => {
                warn!(dst_addr = %dst, error = %e, "passthrough connect failed");
                inputs.telemetry.refused(labels(Flags::Connect), detail());
                tunnel::reset(app);
            }
        }
        return;
    };
    drop(dir);
    let src_id = pod.tls.id.clone();
    let labels = |flags| outbound_labels(&pod, Party::pod(&dst_pod), None, flags, Security::MutualTls);
    let detail = || Detail { src_addr: Some(peer), dst_addr: Some(dst), transport: "hbone", ..Detail::default() };
    match hbone_stream(&inputs, &pod, dst, &dst_pod, None).await {
        Ok(pooled) => {
            info!(src_id = %src_id, dst_id = %dst_pod.identity, dst_addr = %dst, "outbound connection over HBONE");
            let conn = inputs.telemetry.open(labels(Flags::None), detail());
            let ended = pooled.stream.splice(app, &pod.stop).await;
            log_end("outbound", &ended);
            close(conn, &ended, Reporter::Source);
        }
        Err(e) => {
            warn!(src_id = %src_id, dst_id = %dst_pod.identity, dst_addr = %dst, error = %e,
                "HBONE connect failed; resetting the app's connection");
            inputs.telemetry.refused(labels(flags(&e)), detail());
            tunnel::reset(app);
        }
    }
}

/// The address of the app's end of a captured connection: the pod's address of `dst`'s family,
/// and the port of the app's socket (`peer`, on loopback).
fn app_addr(pod: &LocalPod, dst: SocketAddr, peer: SocketAddr) -> SocketAddr {
    let w = pod.workload();
    let ip = w.ips.iter().find(|ip| ip.is_ipv4() == dst.is_ipv4()).or(w.ips.first()).copied().unwrap_or(peer.ip());
    SocketAddr::new(ip, peer.port())
}

/// The labels of a connection `pod` opens to `destination`.
fn outbound_labels(
    pod: &LocalPod,
    destination: Party,
    service: Option<Arc<str>>,
    flags: Flags,
    security: Security,
) -> ConnLabels {
    ConnLabels {
        reporter: Reporter::Source,
        source: Party::pod(&pod.workload()),
        destination,
        service,
        flags,
        security,
    }
}

/// The labels of a connection from `source` that `pod` (this node's) receives.
fn inbound_labels(
    source: Party,
    pod: &Workload,
    service: Option<Arc<str>>,
    flags: Flags,
    security: Security,
) -> ConnLabels {
    ConnLabels { reporter: Reporter::Destination, source, destination: Party::pod(pod), service, flags, security }
}

/// Istio's response flag for a connection a tunnel error ended.
fn flags(e: &tunnel::Error) -> Flags {
    match e {
        tunnel::Error::Tls(_) | tunnel::Error::PeerId(_) => Flags::TlsFailure,
        _ => Flags::Connect,
    }
}

/// Counts a spliced connection's end. `up` (the app's side to the tunnel) is from the source on
/// the source's node and from the destination on the destination's.
fn close(conn: Option<Conn>, ended: &Ended, reporter: Reporter) {
    let Some(conn) = conn else { return };
    match ended {
        Ended::Clean(up, down) => match reporter {
            Reporter::Source => conn.close(*up, *down, End::Fin),
            Reporter::Destination => conn.close(*down, *up, End::Fin),
        },
        // The destination refused the CONNECT (policy, or no app): counted on the label set it
        // opened with (counters only grow), its flow and log line say refused and why.
        Ended::Reset(e, ..) if e.kind() == std::io::ErrorKind::ConnectionRefused => conn.refused_by_peer(e.to_string()),
        // What was carried until the reset counts (as on a clean end).
        Ended::Reset(_, up, down) => match reporter {
            Reporter::Source => conn.close(*up, *down, End::Rst),
            Reporter::Destination => conn.close(*down, *up, End::Rst),
        },
        Ended::Cancelled => conn.close(0, 0, End::Rst),
    }
}

/// A CONNECT stream from `pod` to `dst` (an address of `dst_pod`) over a pooled HBONE connection
/// that requires `dst_pod`'s identity.
async fn hbone_stream(
    inputs: &Arc<Inputs>,
    pod: &Arc<LocalPod>,
    dst: SocketAddr,
    dst_pod: &Arc<Workload>,
    service: Option<&str>,
) -> Result<crate::pool::PooledStream, tunnel::Error> {
    let tunnel_addr = SocketAddr::new(dst.ip(), TUNNEL_PORT);
    let key = PoolKey { src: pod.cookie, dst: tunnel_addr, dst_id: dst_pod.identity.clone() };
    let connect = || async {
        for fresh in [false, true] {
            let tcp = connect_from(&inputs.home, &pod.netns, None, tunnel_addr).await.map_err(tunnel::Error::Tcp)?;
            let _ = netns::tunnel_keepalive(&tcp);
            let tls = pod.tls.client(&dst_pod.identity).map_err(|e| tunnel::Error::Connect(e.to_string()))?;
            let started = std::time::Instant::now();
            let shaken = tunnel::handshake(tcp, tls, tunnel_addr, &inputs.limits).await;
            inputs.telemetry.handshake("client", shaken.as_ref().map(|_| started.elapsed()).map_err(|e| e.kind()));
            let conn = shaken?;
            // A resumed session shows the certificate of its first handshake; once that one has
            // expired, shake hands in full to see the peer's current one.
            if conn.peer_not_after > std::time::SystemTime::now() || fresh {
                return Ok(conn);
            }
            pod.tls.forget_client(&dst_pod.identity);
        }
        unreachable!("the second attempt always returns")
    };
    inputs.pool.stream(&key, dst, service, pod.tls.cert.generation(), connect).await
}

/// Endpoints tried for one connection to a Service before the app sees a reset.
const SERVICE_ATTEMPTS: usize = 3;

/// A connection to a Service's virtual IP `vip`: carried to one of its endpoints — over HBONE,
/// requiring the endpoint pod's identity, when the endpoint is in the mesh; in plaintext from the
/// pod's netns otherwise, as a call to that address would be (a STRICT endpoint's kernel refuses
/// plaintext, so it is never reached that way). An endpoint that cannot be reached (its node, its
/// agent, or its app refusing) is skipped for the next, up to [`SERVICE_ATTEMPTS`].
async fn to_service(
    inputs: Arc<Inputs>,
    pod: Arc<LocalPod>,
    app: TcpStream,
    peer: SocketAddr,
    vip: SocketAddr,
    front: Arc<crate::workloads::services::Frontend>,
) {
    let client = pod.workload().ips.first().copied().unwrap_or(vip.ip());
    let host = crate::telemetry::service_host(&front.service.namespace, &front.service.name);
    let labels = |dst: Option<&Workload>, flags, security| {
        let destination = dst.map(Party::pod).unwrap_or_else(Party::unknown);
        outbound_labels(&pod, destination, Some(host.clone()), flags, security)
    };
    let detail = |dst: SocketAddr, transport| Detail {
        src_addr: Some(peer),
        dst_addr: Some(dst),
        transport,
        ..Detail::default()
    };
    let mut tried = Vec::new();
    while tried.len() < SERVICE_ATTEMPTS {
        let Some(backend) = front.pick(client, &tried) else { break };
        tried.push(backend.addr);
        let _in_flight = crate::workloads::services::InFlight::new(&backend);
        let (service, endpoint) = (&front.service, backend.addr);
        match backend.pod.as_ref().filter(|p| p.mesh) {
            Some(dst_pod) => {
                let name = service.to_string();
                let answered = match hbone_stream(&inputs, &pod, endpoint, dst_pod, Some(&name)).await {
                    Ok(pooled) => pooled.stream.answered().await.map(|s| (s, pooled._guard)).map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                };
                match answered {
                    Ok((stream, _guard)) => {
                        info!(src_id = %pod.tls.id, dst_id = %dst_pod.identity, %service, %vip, dst_addr = %endpoint,
                              "outbound connection to a Service over HBONE");
                        let conn = inputs
                            .telemetry
                            .open(labels(Some(dst_pod), Flags::None, Security::MutualTls), detail(endpoint, "hbone"));
                        let ended = stream.splice(app, &pod.stop).await;
                        log_end("outbound", &ended);
                        close(conn, &ended, Reporter::Source);
                        return;
                    }
                    Err(e) => {
                        warn!(%service, dst_addr = %endpoint, error = %e, "Service endpoint failed; trying another")
                    }
                }
            }
            None => match connect_from(&inputs.home, &pod.netns, None, endpoint).await {
                Ok(up) => {
                    info!(%service, %vip, dst_addr = %endpoint, "outbound connection to a Service endpoint outside the mesh (plaintext)");
                    let conn = inputs.telemetry.open(
                        labels(backend.pod.as_deref(), Flags::None, Security::None),
                        detail(endpoint, "passthrough"),
                    );
                    passthrough(app, up, &pod.stop, conn).await;
                    return;
                }
                Err(e) => warn!(%service, dst_addr = %endpoint, error = %e, "Service endpoint failed; trying another"),
            },
        }
    }
    warn!(service = %front.service, %vip, tried = tried.len(), "no endpoint of the Service could be reached; resetting");
    inputs.telemetry.refused(labels(None, Flags::Connect, Security::MutualTls), detail(vip, "hbone"));
    tunnel::reset(app);
}

/// Plaintext that sk_lookup steered to the pod's 15006: the mode, then policy with an
/// unauthenticated source, then delivery to the app (or a reset, at once).
async fn plaintext_connection(inputs: Arc<Inputs>, pod: Arc<LocalPod>, tcp: TcpStream, from: SocketAddr) {
    // sk_lookup hands the connection to this listener as it was addressed: the accepted socket's
    // local address is the original destination.
    let target = match tcp.local_addr() {
        Ok(a) => SocketAddr::new(canonical(a.ip()), a.port()),
        Err(e) => {
            debug!(error = %e, "plaintext connection gone before it was read");
            return;
        }
    };
    let from = SocketAddr::new(canonical(from.ip()), from.port());
    let workload = pod.workload();
    let policy = pod.policy();
    let req = Request { peer: Peer::Plaintext { ip: from.ip() }, dst: &workload, target, from, service: None };
    let dir = inputs.store.load();
    let outcome = authorize::decide(&req, &policy, dir.policies.settings.dry_run);
    let mode = policy.mode_for(target.port());
    let verdict = authorize::record(&inputs.decisions, &req, mode, &outcome);
    // The source as a workload when a pod has its address; its identity is unknown (plaintext).
    let source = dir.pod_by_ip(from.ip()).map(|w| Party::peer(Some(w), "unknown")).unwrap_or_else(Party::unknown);
    drop(dir);
    let labels = |flags| inbound_labels(source.clone(), &workload, None, flags, Security::None);
    let detail = || inbound_detail(from, target, "plaintext", mode.as_str(), &verdict, &outcome.why);
    if !outcome.admit {
        inputs.telemetry.refused(labels(Flags::Deny), detail());
        tunnel::reset(tcp);
        return;
    }
    let app = match connect_from(&inputs.home, &pod.netns, delivery_source(target), target).await {
        Ok(app) => app,
        Err(e) => {
            warn!(src_addr = %from, dst_addr = %target, error = %e, "delivery to the app failed");
            inputs.telemetry.refused(labels(Flags::Connect), detail());
            tunnel::reset(tcp);
            return;
        }
    };
    let live = pod.track(OwnedPeer::Plaintext { ip: from.ip() }, target);
    let conn = inputs.telemetry.open(labels(Flags::None), detail());
    passthrough(tcp, app, &live.cancel, conn).await;
}

/// An inbound connection's access log detail: the decision made for it.
fn inbound_detail(
    from: SocketAddr,
    target: SocketAddr,
    transport: &'static str,
    mode: &'static str,
    verdict: &authorize::Verdict,
    why: &str,
) -> Detail {
    Detail {
        src_addr: Some(from),
        dst_addr: Some(target),
        transport,
        mode: Some(mode),
        decision: Some(verdict.decision),
        policy: Some(verdict.policy.clone()),
        rule: Some(verdict.rule),
        reason: Some(why.to_string()),
    }
}

/// Where deliveries into the pod come from: 127.0.0.6 for IPv4 (so the app can tell the mesh's
/// deliveries from its own loopback traffic); for IPv6 the kernel's choice (the pod's address).
fn delivery_source(target: SocketAddr) -> Option<SocketAddr> {
    match target.ip() {
        IpAddr::V4(_) => Some(SocketAddr::from((DELIVERY_SOURCE_V4, 0))),
        IpAddr::V6(_) => None,
    }
}

fn log_end(what: &'static str, ended: &Ended) {
    match ended {
        Ended::Clean(up, down) => debug!(what, bytes_up = up, bytes_down = down, "connection closed"),
        Ended::Reset(e, ..)
            if matches!(e.kind(), std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::TimedOut) =>
        {
            warn!(what, error = %e, "the destination's agent refused or did not answer; the app's connection was reset")
        }
        Ended::Reset(e, up, down) => debug!(what, error = %e, bytes_up = up, bytes_down = down, "connection reset"),
        Ended::Cancelled => debug!(what, "connection reset at the drain deadline"),
    }
}

/// Copies both ways between two plain TCP connections (`a`, the side the connection came from:
/// the app's on the source node, the peer's on the destination node); a failure on one side
/// resets the other. The end is counted on `conn`.
async fn passthrough(mut a: TcpStream, mut b: TcpStream, stop: &CancellationToken, conn: Option<Conn>) {
    use tunnel::AppSide as _;
    a.arm_reset();
    b.arm_reset();
    let copied = tokio::select! {
        r = tokio::io::copy_bidirectional(&mut a, &mut b) => r,
        _ = stop.cancelled() => Err(std::io::Error::other("drain deadline")),
    };
    match copied {
        Ok((tx, rx)) => {
            debug!(bytes_out = tx, bytes_in = rx, "passthrough closed");
            a.disarm_reset();
            b.disarm_reset();
            // a → b is from the source on either node (the source's app, or the peer).
            if let Some(c) = conn {
                c.close(tx, rx, End::Fin);
            }
        }
        Err(e) => {
            debug!(error = %e, "passthrough reset");
            if let Some(c) = conn {
                c.close(0, 0, End::Rst);
            }
            tunnel::reset(a);
            tunnel::reset(b);
        }
    }
}

/// One connection on a pod's tunnel port: the handshake cap, then HBONE.
async fn tunnel_connection(inputs: Arc<Inputs>, pod: Arc<LocalPod>, tcp: TcpStream, peer: SocketAddr) {
    let Some(permit) = inputs.handshakes.try_acquire(canonical(peer.ip())) else {
        debug!(refused_total = inputs.handshakes.refused(), "too many TLS handshakes in progress; refusing");
        tunnel::reset(tcp);
        return;
    };
    let _ = tcp.set_nodelay(true);
    let _ = netns::tunnel_keepalive(&tcp);
    let handler = {
        let (inputs, pod) = (inputs.clone(), pod.clone());
        move |inbound: Inbound, guard: ActivityGuard| {
            let (inputs, pod) = (inputs.clone(), pod.clone());
            let span = info_span!("stream", src_id = %inbound.peer);
            async move { inbound_stream(inputs, pod, inbound, peer, guard).await }.instrument(span)
        }
    };
    let limits = &inputs.limits;
    let (started, shaken) = (std::time::Instant::now(), Arc::new(std::sync::atomic::AtomicBool::new(false)));
    let done = {
        let (telemetry, shaken) = (inputs.telemetry.clone(), shaken.clone());
        move || {
            permit.established();
            drop(permit);
            shaken.store(true, std::sync::atomic::Ordering::Relaxed);
            telemetry.handshake("server", Ok(started.elapsed()));
        }
    };
    let served = tunnel::serve(tcp, pod.tls.server.clone(), limits, done, pod.draining.clone(), &pod.conns, handler);
    if let Err(e) = served.await {
        if !shaken.load(std::sync::atomic::Ordering::Relaxed) {
            inputs.telemetry.handshake("server", Err(e.kind()));
        }
        warn!(error = %e, "inbound tunnel connection refused or failed");
    }
}

/// Decides one inbound CONNECT, then connects to the app inside the pod and splices.
async fn inbound_stream(
    inputs: Arc<Inputs>,
    pod: Arc<LocalPod>,
    mut inbound: Inbound,
    from: SocketAddr,
    _guard: ActivityGuard,
) {
    let target = match inbound.target {
        Ok(t) => SocketAddr::new(canonical(t.ip()), t.port()),
        Err(reason) => {
            warn!(reason, "bad HBONE request");
            inbound.refuse(StatusCode::BAD_REQUEST);
            return;
        }
    };
    let workload = pod.workload();
    let src = inbound.peer.clone();
    if over_budget(&inputs, &pod, "inbound stream") {
        inbound.refuse(StatusCode::SERVICE_UNAVAILABLE);
        return;
    }
    if pod.tls.cert.certified().is_none() {
        warn!(src_id = %src, "refusing HBONE request: this pod's certificate expired and is not renewed yet");
        inbound.refuse(StatusCode::SERVICE_UNAVAILABLE);
        return;
    }
    let policy = pod.policy();
    let from = SocketAddr::new(canonical(from.ip()), from.port());
    let service = inbound.service.take();
    let req = Request {
        peer: Peer::Authenticated { id: &src, ip: Some(from.ip()) },
        dst: &workload,
        target,
        from,
        service: service.as_deref(),
    };
    let dir = inputs.store.load();
    let outcome = authorize::decide(&req, &policy, dir.policies.settings.dry_run);
    let mode = policy.mode_for(target.port());
    let verdict = authorize::record(&inputs.decisions, &req, mode, &outcome);
    // The source's workload from the address its tunnel came from; its identity from its
    // certificate.
    let source = Party::peer(dir.pod_by_ip(from.ip()).map(|w| &**w), &src.to_string());
    // The Service the caller says it called (its baggage), as a label only if this pod is one of
    // that Service's endpoints: a caller cannot make up label values.
    let host = service
        .as_deref()
        .and_then(|s| s.split_once('/'))
        .map(|(ns, n)| crate::workloads::services::ServiceKey { namespace: ns.into(), name: n.into() })
        .filter(|k| dir.services.selects(k, &workload.key))
        .map(|k| crate::telemetry::service_host(&k.namespace, &k.name));
    let labels = |flags| inbound_labels(source.clone(), &workload, host.clone(), flags, Security::MutualTls);
    drop(dir);
    let detail = || inbound_detail(from, target, "hbone", mode.as_str(), &verdict, &outcome.why);
    if !outcome.admit {
        inputs.telemetry.refused(labels(Flags::Deny), detail());
        inbound.refuse(outcome.status);
        return;
    }
    // A stream the client reset already (a HEADERS + RST_STREAM flood) costs no app connection;
    // one reset while connecting drops the connect.
    if inbound.is_reset() {
        debug!(src_id = %src, dst_addr = %target, "the client reset the stream before delivery");
        return;
    }
    let connected = tokio::select! {
        app = connect_from(&inputs.home, &pod.netns, delivery_source(target), target) => app,
        _ = inbound.reset() => {
            debug!(src_id = %src, dst_addr = %target, "the client reset the stream while it was being delivered");
            return;
        }
    };
    let app = match connected {
        Ok(app) => app,
        Err(e) => {
            warn!(src_id = %src, dst_addr = %target, error = %e, "delivery to the app failed");
            inputs.telemetry.refused(labels(Flags::Connect), detail());
            inbound.refuse(StatusCode::SERVICE_UNAVAILABLE);
            return;
        }
    };
    match inbound.accept() {
        Ok(stream) => {
            debug!(src_id = %src, dst_id = %pod.tls.id, dst_addr = %target, "inbound connection delivered");
            let live: LiveGuard = pod.track(OwnedPeer::Authenticated { id: src.clone(), ip: from.ip() }, target);
            let conn = inputs.telemetry.open(labels(Flags::None), detail());
            let ended = stream.splice(app, &live.cancel).await;
            log_end("inbound", &ended);
            close(conn, &ended, Reporter::Destination);
        }
        Err(e) => {
            debug!(error = %e, "client went away before the CONNECT answer");
            tunnel::reset(app);
        }
    }
}
