//! The HBONE tunnel: HTTP/2 `CONNECT` over mutual TLS 1.3 to the destination pod's port 15008.
//!
//! Client side: [`handshake`] opens one TLS + HTTP/2 connection presenting the source pod's SVID
//! and requiring the destination pod's SPIFFE ID (the pool keeps it for many streams), and
//! [`open`] sends one `CONNECT` with `:authority` = the original destination `ip:port`.
//! Server side: [`serve`] verifies the client, bounds the HTTP/2 session (header list, streams,
//! deadlines, keepalive, idle) and hands each CONNECT to a handler as an [`Inbound`].
//! [`H2Stream::splice`] joins a CONNECT stream to the application's connection: a clean end on
//! one side is a clean end on the other (END_STREAM ⇄ FIN), a failure or reset on one side is a
//! reset on the other (RST_STREAM ⇄ TCP RST), so a truncated transfer never looks complete.
//!
//! The seams: both ends of the tunnel run over any `AsyncRead + AsyncWrite` transport (a TCP
//! socket in the agent, an in-memory pipe in tests and fuzzing), and the application side of a
//! splice is an [`AppSide`] (a TCP socket in the agent, a unix socket pair in tests; the kernel
//! fast path will be a third).

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use h2::{Reason, RecvStream, SendStream};
use http::{Method, Request, Response, StatusCode};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::{TunnelLimits, MAX_HEADER_LIST};
use crate::identity::{spiffe_id_of, SpiffeId};

/// Flow-control windows: large enough that one stream is not window-bound on a fast link.
const STREAM_WINDOW: u32 = 4 << 20;
const CONNECTION_WINDOW: u32 = 16 << 20;
const MAX_FRAME: u32 = 256 << 10;
/// Data a stream may have queued for sending before it waits (hyper's and ztunnel's bound).
const MAX_SEND_BUFFER: usize = 400 << 10;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("TCP connect to the peer's tunnel port failed: {0}")]
    Tcp(io::Error),
    #[error("connecting to the peer failed: {0}")]
    Connect(String),
    #[error("TLS with the peer failed: {0}")]
    Tls(io::Error),
    #[error("tunnel handshake timed out (is port 15008 reachable? a NetworkPolicy may block it)")]
    Timeout,
    #[error("no CONNECT within the deadline after the HTTP/2 preface")]
    NoRequest,
    #[error("HTTP/2 with the peer failed: {0}")]
    H2(#[from] h2::Error),
    #[error("peer certificate: {0}")]
    PeerId(String),
    #[error("building the CONNECT request: {0}")]
    Request(#[from] http::Error),
    #[error("peer stopped answering keepalive pings")]
    KeepaliveTimeout,
}

impl Error {
    /// The kind of failure, as a metric label.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Tcp(_) => "tcp",
            Error::Connect(_) => "connect",
            Error::Tls(_) => "tls",
            Error::Timeout => "timeout",
            Error::NoRequest => "no_request",
            Error::H2(_) => "h2",
            Error::PeerId(_) => "peer_identity",
            Error::Request(_) => "request",
            Error::KeepaliveTimeout => "keepalive_timeout",
        }
    }

    /// Whether the CONNECT was certainly not processed by the peer, so it may be sent again on
    /// another connection: the connection was going away or gone before the stream started.
    pub fn retryable(&self) -> bool {
        match self {
            Error::H2(e) => e.is_go_away() || e.reason() == Some(Reason::REFUSED_STREAM) || e.is_io(),
            _ => false,
        }
    }
}

fn client_builder(limits: &TunnelLimits) -> h2::client::Builder {
    let mut b = h2::client::Builder::new();
    b.initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_header_list_size(MAX_HEADER_LIST)
        .max_send_buffer_size(MAX_SEND_BUFFER)
        .initial_max_send_streams(limits.max_streams as usize)
        .enable_push(false);
    b
}

fn server_builder(limits: &TunnelLimits) -> h2::server::Builder {
    let mut b = h2::server::Builder::new();
    b.initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_header_list_size(MAX_HEADER_LIST)
        .max_send_buffer_size(MAX_SEND_BUFFER)
        .max_concurrent_streams(limits.max_streams)
        // Streams the client resets before this side accepted them. h2's default (20) guards
        // against rapid-reset floods by killing the whole connection; but a pooled tunnel carries
        // many apps, and apps reset connections all the time (a client agent relays each reset),
        // so a burst of them while this agent is busy must not take every other stream down.
        // Still bounded: such streams cost only their state until accepted.
        .max_pending_accept_reset_streams(PENDING_ACCEPT_RESETS);
    b
}

/// See `server_builder`.
const PENDING_ACCEPT_RESETS: usize = 1024;

/// The HBONE `CONNECT` request for `target`.
pub fn connect_request(target: SocketAddr) -> Result<Request<()>, http::Error> {
    Request::builder().method(Method::CONNECT).uri(target.to_string()).version(http::Version::HTTP_2).body(())
}

/// The W3C `baggage` header naming the Service a call went through (`ns/name`), as ztunnel
/// carries it: for the destination's telemetry only, never for a decision.
const BAGGAGE: &str = "baggage";

fn with_service(mut req: Request<()>, service: Option<&str>) -> Request<()> {
    if let Some((ns, name)) = service.and_then(|s| s.split_once('/')) {
        if let Ok(v) = http::HeaderValue::from_str(&format!("k8s.namespace.name={ns},k8s.service.name={name}")) {
            req.headers_mut().insert(BAGGAGE, v);
        }
    }
    req
}

/// The Service a CONNECT says it went through (`ns/name`), if its baggage names one in the shape
/// of Kubernetes names.
pub fn service_of<B>(req: &Request<B>) -> Option<String> {
    let value = req.headers().get(BAGGAGE)?.to_str().ok()?;
    let field = |key: &str| {
        value.split(',').filter_map(|kv| kv.trim().split_once('=')).find(|(k, _)| *k == key).map(|(_, v)| v)
    };
    let ok = |v: &str| {
        !v.is_empty()
            && v.len() <= 253
            && v.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
    };
    let (ns, name) = (field("k8s.namespace.name")?, field("k8s.service.name")?);
    (ok(ns) && ok(name)).then(|| format!("{ns}/{name}"))
}

/// Parses the target of an HBONE request: method CONNECT, authority `ip:port`.
pub fn parse_target<B>(req: &Request<B>) -> Result<SocketAddr, &'static str> {
    if req.method() != Method::CONNECT {
        return Err("HBONE requests must use CONNECT");
    }
    let authority = req.uri().authority().ok_or("CONNECT without :authority")?;
    authority.as_str().parse().map_err(|_| ":authority must be ip:port")
}

/// Counts what is in progress on a connection (streams), and tells when it has been idle.
#[derive(Clone)]
pub struct Activity(Arc<watch::Sender<usize>>);

/// Held while a stream is in progress; dropping it ends the stream's share of the activity.
pub struct ActivityGuard(Arc<watch::Sender<usize>>);

impl Default for Activity {
    fn default() -> Self {
        Activity(Arc::new(watch::channel(0).0))
    }
}

impl Activity {
    pub fn enter(&self) -> ActivityGuard {
        self.0.send_modify(|n| *n += 1);
        ActivityGuard(self.0.clone())
    }

    pub fn active(&self) -> usize {
        *self.0.borrow()
    }

    /// Resolves once nothing has been in progress for `idle`.
    pub async fn idle_for(&self, idle: Duration) {
        let mut rx = self.0.subscribe();
        loop {
            let _ = rx.wait_for(|n| *n == 0).await;
            match tokio::time::timeout(idle, rx.wait_for(|n| *n > 0)).await {
                Err(_) => return,
                Ok(_) => continue,
            }
        }
    }
}

impl Drop for ActivityGuard {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n -= 1);
    }
}

/// Sends a PING every `interval` and resolves when one is not answered within `timeout` (or the
/// connection can no longer send them): the peer is gone or half-open.
async fn keepalive(mut ping: h2::PingPong, interval: Duration, timeout: Duration) {
    loop {
        tokio::time::sleep(interval).await;
        match tokio::time::timeout(timeout, ping.ping(h2::Ping::opaque())).await {
            Ok(Ok(_pong)) => {}
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "keepalive ping failed");
                return;
            }
            Err(_) => {
                tracing::debug!("keepalive ping not answered in time");
                return;
            }
        }
    }
}

/// A client connection to a peer's tunnel port: clone the handle to open streams.
pub struct ClientConn {
    pub send: h2::client::SendRequest<Bytes>,
    /// Flips to true when the connection has ended (closed, failed, or keepalive timed out).
    pub closed: watch::Receiver<bool>,
    /// Dropping this sender closes the connection at once (held for that alone, never read).
    pub _close: tokio::sync::oneshot::Sender<()>,
    /// When the peer's certificate expires: no new stream may use the connection after that.
    pub peer_not_after: SystemTime,
}

/// Opens a tunnel connection over `tcp` (connected to the peer's 15008): TLS presenting our
/// certificate (from `tls`), HTTP/2 preface, all within the handshake deadline. The connection is
/// driven by a task of its own with keepalive pings.
pub async fn handshake<IO>(
    tcp: IO,
    tls: Arc<rustls::ClientConfig>,
    peer: SocketAddr,
    limits: &TunnelLimits,
) -> Result<ClientConn, Error>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (peer_not_after, (send, mut conn)) = tokio::time::timeout(limits.handshake_timeout, async {
        let name = ServerName::IpAddress(peer.ip().into());
        let tls = tokio_rustls::TlsConnector::from(tls).connect(name, tcp).await.map_err(Error::Tls)?;
        let not_after = peer_not_after(tls.get_ref().1.peer_certificates())?;
        Ok::<_, Error>((not_after, client_builder(limits).handshake::<_, Bytes>(tls).await?))
    })
    .await
    .map_err(|_| Error::Timeout)??;
    let (closed_tx, closed) = watch::channel(false);
    let (close, close_rx) = tokio::sync::oneshot::channel::<()>();
    let ping = conn.ping_pong().expect("a new connection has its ping-pong");
    let (interval, timeout) = (limits.keepalive_interval, limits.keepalive_timeout);
    tokio::spawn(async move {
        tokio::select! {
            r = &mut conn => if let Err(e) = r {
                tracing::debug!(error = %e, "HBONE client connection ended with an error");
            },
            _ = keepalive(ping, interval, timeout) => tracing::debug!("HBONE client connection: peer stopped answering pings; closing"),
            _ = close_rx => {}
        }
        let _ = closed_tx.send(true);
    });
    Ok(ClientConn { send, closed, _close: close, peer_not_after })
}

/// The end of validity of a peer's (verified) certificate.
fn peer_not_after(certs: Option<&[rustls::pki_types::CertificateDer<'static>]>) -> Result<SystemTime, Error> {
    let leaf = certs.and_then(|c| c.first()).ok_or_else(|| Error::PeerId("none presented".into()))?;
    crate::identity::not_after(leaf).map_err(Error::PeerId)
}

/// Opens one CONNECT stream to `target` on a tunnel connection. The stream is returned as soon
/// as the request is sent: the application's first bytes follow at once instead of a round trip
/// later, and the answer (within `timeout`) is awaited before anything is passed back — a refusal
/// then resets the application's connection, as a failed connect would. Errors here mean nothing
/// reached the peer, so the caller may retry elsewhere.
pub async fn open(
    send: &h2::client::SendRequest<Bytes>,
    target: SocketAddr,
    service: Option<&str>,
    timeout: Duration,
) -> Result<H2Stream, Error> {
    let mut send = send.clone().ready().await?;
    let (response, stream) = send.send_request(with_service(connect_request(target)?, service), false)?;
    Ok(H2Stream { send: stream, recv: Recv::Answer { response, timeout } })
}

/// One CONNECT received by the tunnel server, waiting for the handler's decision.
pub struct Inbound {
    /// The authenticated SPIFFE ID of the client certificate.
    pub peer: SpiffeId,
    /// The Service the caller says the call went through (telemetry only).
    pub service: Option<String>,
    /// The CONNECT target, or why the request was not a valid HBONE request.
    pub target: Result<SocketAddr, &'static str>,
    respond: h2::server::SendResponse<Bytes>,
    body: RecvStream,
}

impl Inbound {
    /// Answers 200 and returns the stream to splice.
    pub fn accept(mut self) -> Result<H2Stream, Error> {
        let send = self.respond.send_response(status_only(StatusCode::OK), false)?;
        Ok(H2Stream { send, recv: Recv::Ready(self.body) })
    }

    /// Whether the client has reset the stream already (a HEADERS + RST_STREAM flood sends both
    /// at once): then nothing is delivered for it.
    pub fn is_reset(&mut self) -> bool {
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        self.respond.poll_reset(&mut cx).is_ready()
    }

    /// Resolves when the client resets the stream (or the connection goes), so that work for it
    /// (connecting to the app) can be dropped at once.
    pub async fn reset(&mut self) {
        let _ = std::future::poll_fn(|cx| self.respond.poll_reset(cx)).await;
    }

    /// Answers with `status` and ends the stream.
    pub fn refuse(mut self, status: StatusCode) {
        let _ = self.respond.send_response(status_only(status), true);
    }
}

/// Serves HBONE on one accepted TCP connection: TLS (client certificate verified by `tls`) and
/// the HTTP/2 preface within the handshake deadline, the first CONNECT within the request
/// deadline, then every CONNECT goes to `handler` in a task of its own (spawned on `tasks`, so
/// whoever drains them waits for the streams too). The connection ends when
/// the peer closes it, stops answering pings, stays idle past the idle timeout, or `drain` fires
/// (then a GOAWAY lets the streams in progress finish). `handshake_done` is called as soon as the
/// TLS handshake and preface are done, with the peer's identity verified (it frees the handshake's
/// place and marks the source as a peer of the mesh).
pub async fn serve<IO, H, F>(
    tcp: IO,
    tls: Arc<rustls::ServerConfig>,
    limits: &TunnelLimits,
    handshake_done: impl FnOnce() + Send,
    drain: CancellationToken,
    tasks: &tokio_util::task::TaskTracker,
    handler: H,
) -> Result<(), Error>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Fn(Inbound, ActivityGuard) -> F,
    F: Future<Output = ()> + Send + 'static,
{
    let (peer, peer_not_after, mut conn) = tokio::time::timeout(limits.handshake_timeout, async {
        let tls = tokio_rustls::TlsAcceptor::from(tls).accept(tcp).await.map_err(Error::Tls)?;
        let (peer, not_after) = {
            let (_, c) = tls.get_ref();
            let cert =
                c.peer_certificates().and_then(|c| c.first()).ok_or_else(|| Error::PeerId("none presented".into()))?;
            tracing::debug!(
                peer_serial = %crate::identity::serial_of(cert),
                resumed = c.handshake_kind() == Some(rustls::HandshakeKind::Resumed),
                "TLS handshake with a tunnel client"
            );
            (spiffe_id_of(cert).map_err(Error::PeerId)?, peer_not_after(c.peer_certificates())?)
        };
        Ok::<_, Error>((peer, not_after, server_builder(limits).handshake::<_, Bytes>(tls).await?))
    })
    .await
    .map_err(|_| Error::Timeout)??;
    handshake_done();
    tracing::debug!(peer_id = %peer, "tunnel connection accepted");
    let activity = Activity::default();
    let mut first = true;
    let ping = conn.ping_pong().expect("a new connection has its ping-pong");
    let keepalive = keepalive(ping, limits.keepalive_interval, limits.keepalive_timeout);
    tokio::pin!(keepalive);
    let idle = activity.idle_for(limits.idle_timeout);
    tokio::pin!(idle);
    let mut draining = false;
    loop {
        let next = tokio::select! {
            next = conn.accept() => next,
            _ = tokio::time::sleep(limits.request_timeout), if first => return Err(Error::NoRequest),
            _ = &mut keepalive => {
                conn.abrupt_shutdown(Reason::NO_ERROR);
                return Err(Error::KeepaliveTimeout);
            }
            _ = &mut idle, if !draining => {
                tracing::debug!("tunnel connection idle; closing it");
                conn.graceful_shutdown();
                draining = true;
                continue;
            }
            _ = drain.cancelled(), if !draining => {
                // GOAWAY: the peer opens new streams elsewhere; streams already sent are still
                // accepted below until the final GOAWAY, so none is lost.
                conn.graceful_shutdown();
                draining = true;
                continue;
            }
        };
        let Some(next) = next else { return Ok(()) };
        let (req, respond) = next?;
        first = false;
        let target = parse_target(&req);
        let service = service_of(&req);
        let inbound = Inbound { peer: peer.clone(), service, target, respond, body: req.into_body() };
        if SystemTime::now() >= peer_not_after {
            // The client's certificate expired since the handshake: it must come back with a new one.
            inbound.refuse(StatusCode::UNAUTHORIZED);
            if !draining {
                conn.graceful_shutdown();
                draining = true;
            }
            continue;
        }
        tasks.spawn(handler(inbound, activity.enter()));
    }
}

fn status_only(status: StatusCode) -> Response<()> {
    let mut r = Response::new(());
    *r.status_mut() = status;
    r
}

/// One HBONE CONNECT stream. [`H2Stream::splice`] joins it to the application's connection.
pub struct H2Stream {
    send: SendStream<Bytes>,
    recv: Recv,
}

/// The receiving side of a stream: ready, or (client side) behind the answer to the CONNECT.
enum Recv {
    Ready(RecvStream),
    Answer { response: h2::client::ResponseFuture, timeout: Duration },
}

impl Recv {
    async fn ready(self) -> io::Result<RecvStream> {
        match self {
            Recv::Ready(r) => Ok(r),
            Recv::Answer { response, timeout } => {
                let response = tokio::time::timeout(timeout, response)
                    .await
                    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "peer did not answer the CONNECT in time"))?
                    .map_err(h2_io)?;
                if response.status() != StatusCode::OK {
                    return Err(io::Error::new(
                        io::ErrorKind::ConnectionRefused,
                        format!("peer refused the CONNECT with status {}", response.status()),
                    ));
                }
                Ok(response.into_body())
            }
        }
    }
}

/// Reads from the TCP side start this big and double up to the maximum while reads fill them;
/// an idle connection holds no buffer at all (it waits for readability first).
const MIN_CHUNK: usize = 16 << 10;
const MAX_CHUNK: usize = 256 << 10;

fn h2_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        e.into_io().unwrap_or_else(|| io::Error::other("HTTP/2 I/O error"))
    } else {
        io::Error::new(io::ErrorKind::ConnectionReset, e)
    }
}

/// How a spliced connection ended.
#[derive(Debug)]
pub enum Ended {
    /// Both directions finished cleanly (FIN / END_STREAM both ways); bytes (TCP→tunnel,
    /// tunnel→TCP).
    Clean(u64, u64),
    /// One side failed or was reset: the other side was reset too; the bytes carried until then
    /// (TCP→tunnel, tunnel→TCP).
    Reset(io::Error, u64, u64),
    /// Stopped from outside (drain deadline): both sides were reset.
    Cancelled,
}

impl H2Stream {
    /// Copies both ways between `tcp` and this stream until both directions have ended, handing
    /// buffers to and from h2 as `Bytes` (no intermediate copy). A clean end of one direction is
    /// passed on as such (TCP EOF → END_STREAM, END_STREAM → TCP FIN) while the other goes on. An
    /// error or reset on either side resets both: RST_STREAM to the peer, TCP RST to the app.
    /// Waits for the peer's answer to the CONNECT (client side): the stream once the peer has
    /// reached the app, or the refusal. Where another destination can still be tried (a
    /// Service's next endpoint) this comes before the app's first byte is sent.
    pub async fn answered(self) -> io::Result<H2Stream> {
        let recv = self.recv.ready().await?;
        Ok(H2Stream { send: self.send, recv: Recv::Ready(recv) })
    }

    pub async fn splice<A: AppSide>(self, tcp: A, cancel: &CancellationToken) -> Ended {
        let H2Stream { mut send, recv } = self;
        tcp.arm_reset();
        // Counted as they go, so a connection that ends in a reset still says what it carried.
        let (mut up, mut down) = (0u64, 0u64);
        let result = tokio::select! {
            r = async { tokio::try_join!(upload(&tcp, &mut send, &mut up), download(&tcp, recv, &mut down)) } => r,
            _ = cancel.cancelled() => {
                send.send_reset(Reason::CANCEL);
                tcp.reset();
                return Ended::Cancelled;
            }
        };
        match result {
            Ok(((), ())) => {
                tcp.disarm_reset();
                Ended::Clean(up, down)
            }
            Err(e) => {
                send.send_reset(Reason::CANCEL);
                tcp.reset();
                Ended::Reset(e, up, down)
            }
        }
    }
}

/// The application's side of a spliced connection, read and written without a buffer held while
/// it is idle (readiness first, then a non-blocking read into a fresh buffer): the shape of
/// tokio's socket types, so a TCP socket and a unix socket implement it as they are.
pub trait AppSide: Send + Sync {
    fn readable(&self) -> impl Future<Output = io::Result<()>> + Send;
    fn try_read_buf(&self, buf: &mut BytesMut) -> io::Result<usize>;
    fn writable(&self) -> impl Future<Output = io::Result<()>> + Send;
    fn try_write(&self, data: &[u8]) -> io::Result<usize>;
    /// Passes a clean end on (TCP FIN).
    fn shutdown_write(&self) -> io::Result<()>;
    /// Ends the connection so the application sees a failure, not a clean end (TCP RST).
    fn reset(self);
    /// From now on, until [`AppSide::disarm_reset`], a close this side did not choose (the agent
    /// killed, OOM-killed) resets the connection: the application never takes a cut connection
    /// for a complete one.
    fn arm_reset(&self) {}
    /// Both directions ended cleanly: closing is a clean end again (FIN after the data).
    fn disarm_reset(&self) {}
}

impl AppSide for TcpStream {
    fn readable(&self) -> impl Future<Output = io::Result<()>> + Send {
        TcpStream::readable(self)
    }
    fn try_read_buf(&self, buf: &mut BytesMut) -> io::Result<usize> {
        TcpStream::try_read_buf(self, buf)
    }
    fn writable(&self) -> impl Future<Output = io::Result<()>> + Send {
        TcpStream::writable(self)
    }
    fn try_write(&self, data: &[u8]) -> io::Result<usize> {
        TcpStream::try_write(self, data)
    }
    fn shutdown_write(&self) -> io::Result<()> {
        socket2::SockRef::from(self).shutdown(std::net::Shutdown::Write)
    }
    fn reset(self) {
        reset(self)
    }
    fn arm_reset(&self) {
        arm_reset(self)
    }
    fn disarm_reset(&self) {
        let _ = socket2::SockRef::from(self).set_linger(None);
    }
}

/// A unix stream socket as the application's side: what tests (and fuzzing) splice into.
impl AppSide for UnixStream {
    fn readable(&self) -> impl Future<Output = io::Result<()>> + Send {
        UnixStream::readable(self)
    }
    fn try_read_buf(&self, buf: &mut BytesMut) -> io::Result<usize> {
        UnixStream::try_read_buf(self, buf)
    }
    fn writable(&self) -> impl Future<Output = io::Result<()>> + Send {
        UnixStream::writable(self)
    }
    fn try_write(&self, data: &[u8]) -> io::Result<usize> {
        UnixStream::try_write(self, data)
    }
    fn shutdown_write(&self) -> io::Result<()> {
        socket2::SockRef::from(self).shutdown(std::net::Shutdown::Write)
    }
    /// Unix sockets have no reset: the connection is closed; the peer sees ECONNRESET only if it
    /// had unread data. Tests tell the two ends apart by [`Ended`].
    fn reset(self) {
        drop(self)
    }
}

/// Application → tunnel; `total` counts the bytes read from the app.
async fn upload<A: AppSide>(tcp: &A, send: &mut SendStream<Bytes>, total: &mut u64) -> io::Result<()> {
    let mut chunk = MIN_CHUNK;
    loop {
        tokio::select! {
            r = tcp.readable() => r?,
            reason = std::future::poll_fn(|cx| send.poll_reset(cx)) => {
                let why = reason.map(|r| format!("peer reset the stream ({r:?})")).unwrap_or_else(|e| e.to_string());
                return Err(io::Error::new(io::ErrorKind::ConnectionReset, why));
            }
        }
        let mut buf = BytesMut::with_capacity(chunk);
        let n = match tcp.try_read_buf(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        if n == 0 {
            send.send_data(Bytes::new(), true).map_err(h2_io)?;
            return Ok(());
        }
        *total += n as u64;
        chunk = if n == chunk {
            (chunk * 2).min(MAX_CHUNK)
        } else if n < chunk / 4 {
            (chunk / 2).max(MIN_CHUNK)
        } else {
            chunk
        };
        let mut data = buf.freeze();
        while !data.is_empty() {
            send.reserve_capacity(data.len());
            // Capacity already assigned is used first: poll_capacity only wakes when the
            // capacity *grows*, so waiting on it with capacity in hand could hang forever.
            let granted = match send.capacity() {
                0 => std::future::poll_fn(|cx| send.poll_capacity(cx)).await,
                n => Some(Ok(n)),
            };
            let granted = match granted {
                Some(Ok(n)) => n,
                Some(Err(e)) => return Err(h2_io(e)),
                None => return Err(io::Error::new(io::ErrorKind::ConnectionReset, "HBONE stream closed by the peer")),
            };
            if granted == 0 {
                tokio::task::yield_now().await;
                continue;
            }
            send.send_data(data.split_to(granted.min(data.len())), false).map_err(h2_io)?;
        }
    }
}

/// Tunnel → application; `total` counts the bytes written to the app.
async fn download<A: AppSide>(tcp: &A, recv: Recv, total: &mut u64) -> io::Result<()> {
    let mut recv = recv.ready().await?;
    while let Some(data) = recv.data().await {
        let data = data.map_err(h2_io)?;
        // The data is ours now: give the window back so the peer may send more meanwhile.
        let _ = recv.flow_control().release_capacity(data.len());
        write_all(tcp, &data).await?;
        *total += data.len() as u64;
    }
    // The peer's END_STREAM: a clean end of this direction, passed on as FIN.
    tcp.shutdown_write()?;
    Ok(())
}

async fn write_all<A: AppSide>(tcp: &A, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        tcp.writable().await?;
        match tcp.try_write(data) {
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Makes the kernel reset `tcp` (RST) if it is closed before [`AppSide::disarm_reset`]: SO_LINGER
/// with a zero timeout, which the kernel applies also when it closes the descriptors of an agent
/// that died. One setsockopt; the app's socket is the other end, so it sees ECONNRESET, never a
/// clean EOF, when the agent carrying its connection is gone.
pub fn arm_reset(tcp: &TcpStream) {
    let _ = socket2::SockRef::from(tcp).set_linger(Some(Duration::ZERO));
}

/// Closes `tcp` with a reset (RST), so the application sees a failure, not a clean end.
pub fn reset(tcp: TcpStream) {
    let _ = socket2::SockRef::from(&tcp).set_linger(Some(Duration::ZERO));
    drop(tcp);
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn connect_request_carries_the_target_as_authority() {
        for target in ["198.19.2.10:8080", "[fd6d:6c00:2::10]:80"] {
            let t: SocketAddr = target.parse().unwrap();
            let req = connect_request(t).unwrap();
            assert_eq!(req.method(), Method::CONNECT);
            assert_eq!(req.uri().authority().unwrap().as_str(), target);
            assert_eq!(parse_target(&req), Ok(t), "round trip of {target}");
        }
    }

    #[test]
    fn bad_hbone_requests_are_rejected_with_a_reason() {
        let get = Request::builder().method(Method::GET).uri("http://198.19.2.10:80/").body(()).unwrap();
        assert_eq!(parse_target(&get), Err("HBONE requests must use CONNECT"));
        let name = Request::builder().method(Method::CONNECT).uri("example.com:80").body(()).unwrap();
        assert_eq!(parse_target(&name), Err(":authority must be ip:port"));
    }

    use crate::identity::{workload_id, PodTls, TrustDomain};

    /// Two ends of a loopback TCP connection: (the agent's end, the app's end).
    async fn tcp_pair() -> (TcpStream, TcpStream) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let app = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (agent, _) = l.accept().await.unwrap();
        (agent, app)
    }

    struct Pki {
        client: PodTls,
        server: PodTls,
        server_id: SpiffeId,
    }

    async fn pki(name: &str) -> Pki {
        let td = TrustDomain::new("cluster.local").unwrap();
        let ids = crate::identity::store::test_identities(&format!("tunnel-{name}")).await;
        let (cid, sid) =
            (workload_id(&td, "default", "client").unwrap(), workload_id(&td, "default", "server").unwrap());
        let client = ids.pod_tls(ids.issue("default/client", &cid).await.unwrap()).unwrap();
        let server = ids.pod_tls(ids.issue("default/server", &sid).await.unwrap()).unwrap();
        Pki { client, server, server_id: sid }
    }

    fn limits() -> TunnelLimits {
        TunnelLimits::default()
    }

    /// The next report of the test server, within 10 s.
    async fn next<T>(rx: &mut tokio::sync::mpsc::UnboundedReceiver<T>, what: &str) -> T {
        tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .unwrap_or_else(|_| panic!("no report of {what} within 10 s"))
            .unwrap_or_else(|| panic!("the test server ended before reporting {what}"))
    }

    /// What the test app behind the server does with a stream.
    #[derive(Clone, Copy)]
    enum App {
        /// Echoes, then writes "<n>" after the client's EOF, then closes cleanly.
        Echo,
        /// Reads a little, then resets the connection.
        ResetAfterRead,
    }

    /// Runs an HBONE server on loopback; CONNECTs to port 1 are refused with 503. Reports the
    /// client IDs it saw, and how each splice ended.
    async fn server(
        tls: Arc<rustls::ServerConfig>,
        app: App,
    ) -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<String>, tokio::sync::mpsc::UnboundedReceiver<String>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (ids_tx, ids) = tokio::sync::mpsc::unbounded_channel();
        let (ends_tx, ends) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let (tcp, _) = l.accept().await.unwrap();
                let (tls, ids_tx, ends_tx) = (tls.clone(), ids_tx.clone(), ends_tx.clone());
                tokio::spawn(async move {
                    let handler = move |inbound: Inbound, _guard: ActivityGuard| {
                        let _ = ids_tx.send(inbound.peer.to_string());
                        let ends_tx = ends_tx.clone();
                        async move {
                            match inbound.target {
                                Ok(t) if t.port() == 1 => inbound.refuse(StatusCode::SERVICE_UNAVAILABLE),
                                Ok(_) => {
                                    let stream = inbound.accept().unwrap();
                                    let (agent_end, mut app_side) = tcp_pair().await;
                                    tokio::spawn(async move {
                                        match app {
                                            App::Echo => {
                                                let mut all = Vec::new();
                                                app_side.read_to_end(&mut all).await.unwrap();
                                                app_side.write_all(&all).await.unwrap();
                                                app_side
                                                    .write_all(format!("<{}>", all.len()).as_bytes())
                                                    .await
                                                    .unwrap();
                                                app_side.shutdown().await.unwrap();
                                            }
                                            App::ResetAfterRead => {
                                                let mut b = [0u8; 4];
                                                let _ = app_side.read_exact(&mut b).await;
                                                reset(app_side);
                                            }
                                        }
                                    });
                                    let ended = stream.splice(agent_end, &CancellationToken::new()).await;
                                    let _ = ends_tx.send(format!("{ended:?}"));
                                }
                                Err(_) => inbound.refuse(StatusCode::BAD_REQUEST),
                            }
                        }
                    };
                    let tasks = tokio_util::task::TaskTracker::new();
                    let _ = serve(tcp, tls, &limits(), || (), CancellationToken::new(), &tasks, handler).await;
                });
            }
        });
        (addr, ids, ends)
    }

    /// A stream over a new connection; the connection lives as long as the returned handle.
    async fn client_stream(p: &Pki, addr: SocketAddr, target: &str) -> Result<(H2Stream, ClientConn), Error> {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let conn = handshake(tcp, p.client.client(&p.server_id).unwrap(), addr, &limits()).await?;
        Ok((open(&conn.send, target.parse().unwrap(), None, Duration::from_secs(5)).await?, conn))
    }

    #[test]
    fn the_service_travels_as_baggage_and_only_kubernetes_shaped_names_are_read() {
        let target: SocketAddr = "198.19.2.10:8080".parse().unwrap();
        let req = with_service(connect_request(target).unwrap(), Some("shop/web-v2"));
        assert_eq!(service_of(&req).as_deref(), Some("shop/web-v2"));
        assert_eq!(service_of(&connect_request(target).unwrap()), None);
        for bad in [
            "k8s.namespace.name=shop",
            "k8s.namespace.name=Shop,k8s.service.name=web",
            "k8s.namespace.name=a,k8s.service.name=x y",
        ] {
            let mut req = connect_request(target).unwrap();
            req.headers_mut().insert(BAGGAGE, http::HeaderValue::from_str(bad).unwrap());
            assert_eq!(service_of(&req), None, "{bad}");
        }
    }

    #[tokio::test]
    async fn hbone_carries_bytes_both_ways_with_half_close_and_the_client_identity() {
        let p = pki("echo").await;
        let (addr, mut seen, mut ends) = server(p.server.server.clone(), App::Echo).await;
        let payload: Vec<u8> = (0..3_000_000u32).map(|i| i as u8).collect();
        let (s, _conn) = client_stream(&p, addr, "127.0.0.1:8080").await.unwrap();
        // The client app's connection, spliced onto the stream as the outbound proxy does.
        let (agent_end, app) = tcp_pair().await;
        let splice = tokio::spawn(async move { s.splice(agent_end, &CancellationToken::new()).await });
        let (mut r, mut w) = app.into_split();
        let writer = async {
            w.write_all(&payload).await.unwrap();
            w.shutdown().await.unwrap();
        };
        let mut back = Vec::new();
        let reader = r.read_to_end(&mut back);
        let (_, n) = tokio::join!(writer, reader);
        n.unwrap();
        let suffix = format!("<{}>", payload.len());
        assert_eq!(back.len(), payload.len() + suffix.len(), "all bytes must come back, then the count sent after EOF");
        assert!(back[..payload.len()] == payload[..], "bytes must come back unchanged");
        assert_eq!(&back[payload.len()..], suffix.as_bytes());
        match splice.await.unwrap() {
            Ended::Clean(up, down) => {
                assert_eq!((up, down), (payload.len() as u64, back.len() as u64), "splice reports what it carried")
            }
            other => panic!("a clean exchange must end cleanly, got {other:?}"),
        }
        assert_eq!(next(&mut seen, "the client identity").await, "spiffe://cluster.local/ns/default/sa/client");
        assert!(next(&mut ends, "the server's end").await.starts_with("Clean"), "the server side ended cleanly too");
    }

    /// The relay seam: client and server of HBONE over an in-memory pipe (no socket), each
    /// stream spliced into a unix socket pair standing for the app; what fuzzing and the kernel
    /// fast path build on.
    #[tokio::test]
    async fn hbone_runs_over_an_in_memory_pipe_into_unix_socket_apps() {
        let p = pki("pipe").await;
        let (client_io, server_io) = tokio::io::duplex(64 << 10);
        let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel();
        let (ends_tx, mut ends) = tokio::sync::mpsc::unbounded_channel();
        let server_tls = p.server.server.clone();
        let server = tokio::spawn(async move {
            let handler = move |inbound: Inbound, _guard: ActivityGuard| {
                let seen_tx = seen_tx.clone();
                async move {
                    let _ = seen_tx.send((inbound.peer.to_string(), inbound.target));
                    let stream = inbound.accept().unwrap();
                    let (agent_end, app) = UnixStream::pair().unwrap();
                    // The server's app echoes upper-cased and closes after the client's EOF.
                    tokio::spawn(async move {
                        let (mut r, mut w) = app.into_split();
                        let mut all = Vec::new();
                        r.read_to_end(&mut all).await.unwrap();
                        w.write_all(&all.to_ascii_uppercase()).await.unwrap();
                        w.shutdown().await.unwrap();
                    });
                    stream.splice(agent_end, &CancellationToken::new()).await
                }
            };
            let tasks = tokio_util::task::TaskTracker::new();
            serve(
                server_io,
                server_tls,
                &limits(),
                || (),
                CancellationToken::new(),
                &tasks,
                |i, g| {
                    let (f, ends_tx) = (handler(i, g), ends_tx.clone());
                    async move {
                        let _ = ends_tx.send(format!("{:?}", f.await));
                    }
                },
            )
            .await
        });
        let target: SocketAddr = "198.19.2.10:8080".parse().unwrap();
        let conn = handshake(client_io, p.client.client(&p.server_id).unwrap(), target, &limits()).await.unwrap();
        let stream = open(&conn.send, target, Some("shop/web"), Duration::from_secs(5)).await.unwrap();
        let (agent_end, app) = UnixStream::pair().unwrap();
        let splice = tokio::spawn(async move { stream.splice(agent_end, &CancellationToken::new()).await });
        let (mut r, mut w) = app.into_split();
        w.write_all(b"hello").await.unwrap();
        w.shutdown().await.unwrap();
        let mut back = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), r.read_to_end(&mut back)).await.unwrap().unwrap();
        assert_eq!(back, b"HELLO");
        assert!(matches!(splice.await.unwrap(), Ended::Clean(5, 5)));
        let (peer, to) = next(&mut seen, "the CONNECT").await;
        assert_eq!((peer.as_str(), to), ("spiffe://cluster.local/ns/default/sa/client", Ok(target)));
        assert_eq!(next(&mut ends, "the server's end").await, "Clean(5, 5)", "the server side ends cleanly");
        drop(conn);
        let _ = tokio::time::timeout(Duration::from_secs(10), server).await.expect("the server ends with the pipe");
    }

    /// A client that opens a CONNECT and resets it at once gets nothing delivered: the server
    /// sees the reset while it would still be connecting to the app.
    #[tokio::test]
    async fn a_stream_reset_by_the_client_is_dropped_before_delivery() {
        let p = pki("rapid-reset").await;
        let (client_io, server_io) = tokio::io::duplex(64 << 10);
        let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel();
        let server_tls = p.server.server.clone();
        tokio::spawn(async move {
            let tasks = tokio_util::task::TaskTracker::new();
            let handler = move |mut inbound: Inbound, _guard: ActivityGuard| {
                let seen_tx = seen_tx.clone();
                async move {
                    // Stands for the connect to the app, which the reset must cut short.
                    let outcome = tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(30)) => "delivered",
                        _ = inbound.reset() => "dropped",
                    };
                    let _ = seen_tx.send((outcome, inbound.is_reset()));
                }
            };
            serve(server_io, server_tls, &limits(), || (), CancellationToken::new(), &tasks, handler).await
        });
        let target: SocketAddr = "198.19.2.10:8080".parse().unwrap();
        let conn = handshake(client_io, p.client.client(&p.server_id).unwrap(), target, &limits()).await.unwrap();
        let mut send = conn.send.clone().ready().await.unwrap();
        let (_response, mut stream) = send.send_request(connect_request(target).unwrap(), false).unwrap();
        stream.send_reset(h2::Reason::CANCEL);
        let got = tokio::time::timeout(Duration::from_secs(10), seen.recv()).await.expect("the handler ended");
        assert_eq!(got, Some(("dropped", true)), "the reset stream was dropped, not delivered");
    }

    #[tokio::test]
    async fn a_reset_on_the_far_side_reaches_the_app_as_a_reset_not_an_eof() {
        let p = pki("reset").await;
        let (addr, _seen, mut ends) = server(p.server.server.clone(), App::ResetAfterRead).await;
        let (s, _conn) = client_stream(&p, addr, "127.0.0.1:8080").await.unwrap();
        let (agent_end, mut app) = tcp_pair().await;
        let splice = tokio::spawn(async move { s.splice(agent_end, &CancellationToken::new()).await });
        app.write_all(b"ping").await.unwrap();
        let mut buf = Vec::new();
        let err = app.read_to_end(&mut buf).await.expect_err("the app must see an error, not a clean EOF");
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset, "{err}");
        // The 4 bytes reached the server's app before it reset: counted all the same.
        assert!(matches!(splice.await.unwrap(), Ended::Reset(_, 4, _)));
        assert!(next(&mut ends, "the server's end").await.starts_with("Reset"), "the server side saw its app's reset");
    }

    #[tokio::test]
    async fn refused_connects_and_wrong_peer_identities_fail_the_client() {
        let p = pki("refuse").await;
        let (addr, _seen, _ends) = server(p.server.server.clone(), App::Echo).await;
        // The refusal arrives after the stream opened: the app's connection is reset.
        let (s, _conn) = client_stream(&p, addr, "127.0.0.1:1").await.unwrap();
        let (agent_end, mut app) = tcp_pair().await;
        match s.splice(agent_end, &CancellationToken::new()).await {
            Ended::Reset(e, ..) => {
                assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused);
                assert!(e.to_string().contains("status 503"), "{e}");
            }
            other => panic!("a refused CONNECT must reset the app's connection, got {other:?}"),
        }
        let err = app.read(&mut [0u8; 8]).await.expect_err("the app sees a reset");
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
        // The client expects another identity than the server presents: the handshake fails.
        let other = workload_id(&TrustDomain::new("cluster.local").unwrap(), "default", "someone-else").unwrap();
        let tcp = TcpStream::connect(addr).await.unwrap();
        let err = handshake(tcp, p.client.client(&other).unwrap(), addr, &limits()).await.err().unwrap();
        assert!(err.to_string().contains("expected spiffe://cluster.local/ns/default/sa/someone-else"), "got {err}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_that_accepts_and_stalls_times_out_on_both_sides() {
        let p = pki("stall").await;
        // Client side: the peer accepts TCP and never speaks TLS.
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let _held = tokio::spawn(async move { l.accept().await });
        let tcp = TcpStream::connect(addr).await.unwrap();
        let err = handshake(tcp, p.client.client(&p.server_id).unwrap(), addr, &limits()).await;
        assert!(matches!(err, Err(Error::Timeout)), "client must give up on a silent peer");
        // Server side: a client connects and never sends a ClientHello.
        let (agent_end, _silent_client) = tcp_pair().await;
        let limits = limits();
        let tasks = tokio_util::task::TaskTracker::new();
        let served = serve(
            agent_end,
            p.server.server.clone(),
            &limits,
            || (),
            CancellationToken::new(),
            &tasks,
            |_, _| async {},
        );
        assert!(matches!(served.await, Err(Error::Timeout)), "server must give up on a silent client");
    }

    #[tokio::test]
    async fn idle_activity_is_reported_after_the_last_guard_is_gone() {
        let a = Activity::default();
        let g = a.enter();
        assert_eq!(a.active(), 1);
        let idle = tokio::time::timeout(Duration::from_millis(100), a.idle_for(Duration::from_millis(10))).await;
        assert!(idle.is_err(), "not idle while a guard is held");
        drop(g);
        let idle = tokio::time::timeout(Duration::from_secs(5), a.idle_for(Duration::from_millis(10))).await;
        assert!(idle.is_ok(), "idle once the guard is dropped");
    }
}
