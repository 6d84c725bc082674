//! The HBONE tunnel: HTTP/2 `CONNECT` over mutual TLS 1.3 to the destination pod's port 15008.
//!
//! The client side ([`connect`]) opens one TLS connection presenting the source pod's SVID,
//! requires the destination pod's SPIFFE ID, and sends `CONNECT` with `:authority` = the original
//! destination `ip:port`. The server side ([`serve`]) accepts streams and hands each to a callback
//! that decides (status code) and delivers. [`H2Stream::splice`] joins a CONNECT stream to a TCP
//! connection, with half-close mapped to HTTP/2 END_STREAM.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use http::{Method, Request, Response, StatusCode};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::identity::{spiffe_id_of, SpiffeId};

/// Flow-control windows: large enough that one stream is not window-bound on a fast link.
const STREAM_WINDOW: u32 = 4 << 20;
const CONNECTION_WINDOW: u32 = 16 << 20;
const MAX_FRAME: u32 = 256 << 10;
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("TLS with the peer failed: {0}")]
    Tls(io::Error),
    #[error("tunnel handshake timed out (is port 15008 reachable? a NetworkPolicy may block it)")]
    Timeout,
    #[error("HTTP/2 with the peer failed: {0}")]
    H2(#[from] h2::Error),
    #[error("peer refused the CONNECT with status {0}")]
    Refused(StatusCode),
    #[error("peer certificate: {0}")]
    PeerId(String),
    #[error("building the CONNECT request: {0}")]
    Request(#[from] http::Error),
}

fn client_builder() -> h2::client::Builder {
    let mut b = h2::client::Builder::new();
    b.initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .enable_push(false);
    b
}

fn server_builder() -> h2::server::Builder {
    let mut b = h2::server::Builder::new();
    b.initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_concurrent_streams(1000);
    b
}

/// The HBONE `CONNECT` request for `target`.
pub fn connect_request(target: SocketAddr) -> Result<Request<()>, http::Error> {
    Request::builder().method(Method::CONNECT).uri(target.to_string()).version(http::Version::HTTP_2).body(())
}

/// Parses the target of an HBONE request: method CONNECT, authority `ip:port`.
pub fn parse_target<B>(req: &Request<B>) -> Result<SocketAddr, &'static str> {
    if req.method() != Method::CONNECT {
        return Err("HBONE requests must use CONNECT");
    }
    let authority = req.uri().authority().ok_or("CONNECT without :authority")?;
    authority.as_str().parse().map_err(|_| ":authority must be ip:port")
}

/// Opens an HBONE stream to `target` over `tcp` (already connected to the peer's 15008).
pub async fn connect(tcp: TcpStream, tls: Arc<rustls::ClientConfig>, target: SocketAddr) -> Result<H2Stream, Error> {
    // One deadline for TLS, the HTTP/2 preface and the peer's answer: a peer that accepts TCP
    // and then stalls must not hold the application's connection forever.
    tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
        let name = ServerName::IpAddress(target.ip().into());
        let tls = tokio_rustls::TlsConnector::from(tls).connect(name, tcp).await.map_err(Error::Tls)?;
        let (send_request, conn) = client_builder().handshake(tls).await?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "HBONE client connection ended with an error");
            }
        });
        let mut send_request = send_request.ready().await?;
        let (response, send) = send_request.send_request(connect_request(target)?, false)?;
        let response = response.await?;
        if response.status() != StatusCode::OK {
            return Err(Error::Refused(response.status()));
        }
        Ok(H2Stream::new(send, response.into_body()))
    })
    .await
    .map_err(|_| Error::Timeout)?
}

/// What the server side decided for one CONNECT stream.
pub enum Decision<T> {
    /// Answer 200 and hand the stream and `T` (the delivery socket) to the copier.
    Accept(T),
    /// Answer with this status and close the stream.
    Refuse(StatusCode),
}

/// Serves HBONE on one accepted TLS connection: verifies the client (by the `ServerConfig`),
/// then runs `decide` for every CONNECT and `carry` for each accepted one.
pub async fn serve<D, DF, T, C, CF>(
    tcp: TcpStream,
    tls: Arc<rustls::ServerConfig>,
    decide: D,
    carry: C,
) -> Result<(), Error>
where
    D: Fn(SpiffeId, Result<SocketAddr, &'static str>) -> DF + Clone + Send + 'static,
    DF: Future<Output = Decision<T>> + Send,
    T: Send + 'static,
    C: Fn(H2Stream, T) -> CF + Clone + Send + 'static,
    CF: Future<Output = ()> + Send,
{
    let accept = tokio_rustls::TlsAcceptor::from(tls).accept(tcp);
    let tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, accept).await.map_err(|_| Error::Timeout)?.map_err(Error::Tls)?;
    let peer = {
        let (_, conn) = tls.get_ref();
        let cert =
            conn.peer_certificates().and_then(|c| c.first()).ok_or_else(|| Error::PeerId("none presented".into()))?;
        spiffe_id_of(cert).map_err(Error::PeerId)?
    };
    let mut conn = tokio::time::timeout(HANDSHAKE_TIMEOUT, server_builder().handshake(tls))
        .await
        .map_err(|_| Error::Timeout)??;
    while let Some(next) = conn.accept().await {
        let (req, mut respond) = next?;
        let (decide, carry, peer) = (decide.clone(), carry.clone(), peer.clone());
        tokio::spawn(async move {
            let target = parse_target(&req);
            match decide(peer, target).await {
                Decision::Refuse(status) => {
                    let _ = respond.send_response(status_only(status), true);
                }
                Decision::Accept(upstream) => match respond.send_response(status_only(StatusCode::OK), false) {
                    Ok(send) => carry(H2Stream::new(send, req.into_body()), upstream).await,
                    Err(e) => {
                        tracing::debug!(error = %e, "client went away before the CONNECT answer")
                    }
                },
            }
        });
    }
    Ok(())
}

fn status_only(status: StatusCode) -> Response<()> {
    let mut r = Response::new(());
    *r.status_mut() = status;
    r
}

/// One HBONE CONNECT stream. [`H2Stream::splice`] joins it to a TCP connection: reading EOF from
/// the TCP side sends END_STREAM (half-close), and the peer's END_STREAM shuts down writing on the
/// TCP side, while the other direction goes on.
pub struct H2Stream {
    send: SendStream<Bytes>,
    recv: RecvStream,
}

/// How much is read from the TCP side at once; each read becomes HTTP/2 DATA without a copy.
const READ_CHUNK: usize = 256 << 10;

fn h2_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        e.into_io().unwrap_or_else(|| io::Error::other("HTTP/2 I/O error"))
    } else {
        io::Error::other(e)
    }
}

impl H2Stream {
    fn new(send: SendStream<Bytes>, recv: RecvStream) -> H2Stream {
        H2Stream { send, recv }
    }

    /// Copies both ways between `tcp` and this stream until both directions have ended, handing
    /// buffers to and from h2 as `Bytes` (no intermediate copy). An error in either direction ends
    /// both (the stream is reset). Returns the bytes carried (TCP→tunnel, tunnel→TCP).
    pub async fn splice(self, mut tcp: TcpStream) -> io::Result<(u64, u64)> {
        let H2Stream { mut send, mut recv } = self;
        let (mut rd, mut wr) = tcp.split();
        let up = async {
            let mut buf = BytesMut::new();
            let mut total = 0u64;
            loop {
                buf.reserve(READ_CHUNK);
                let n = rd.read_buf(&mut buf).await?;
                if n == 0 {
                    send.send_data(Bytes::new(), true).map_err(h2_io)?;
                    return Ok::<u64, io::Error>(total);
                }
                total += n as u64;
                let mut chunk = buf.split().freeze();
                while !chunk.is_empty() {
                    send.reserve_capacity(chunk.len());
                    // Capacity already assigned is used first: poll_capacity only wakes when the
                    // capacity *grows*, so waiting on it with capacity in hand could hang forever.
                    let granted = match send.capacity() {
                        0 => std::future::poll_fn(|cx| send.poll_capacity(cx)).await,
                        n => Some(Ok(n)),
                    };
                    let granted = match granted {
                        Some(Ok(n)) => n,
                        Some(Err(e)) => return Err(h2_io(e)),
                        None => {
                            return Err(io::Error::new(io::ErrorKind::BrokenPipe, "HBONE stream closed by the peer"))
                        }
                    };
                    if granted == 0 {
                        tokio::task::yield_now().await;
                        continue;
                    }
                    send.send_data(chunk.split_to(granted.min(chunk.len())), false).map_err(h2_io)?;
                }
            }
        };
        let down = async {
            let mut total = 0u64;
            while let Some(data) = recv.data().await {
                let data = data.map_err(h2_io)?;
                // The data is ours now: give the window back so the peer may send more meanwhile.
                let _ = recv.flow_control().release_capacity(data.len());
                wr.write_all(&data).await?;
                total += data.len() as u64;
            }
            wr.shutdown().await?;
            Ok::<u64, io::Error>(total)
        };
        tokio::try_join!(up, down)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    use crate::identity::{workload_id, Ca, PodTls, TrustDomain, SVID_TTL};

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
        _dir: std::path::PathBuf,
    }

    fn pki(name: &str) -> Pki {
        let dir = std::env::temp_dir().join(format!("meshless-tunnel-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let td = TrustDomain::new("cluster.local").unwrap();
        Ca::init(&dir, &td).unwrap();
        let ca = Ca::load(&dir).unwrap();
        let (cid, sid) =
            (workload_id(&td, "default", "client").unwrap(), workload_id(&td, "default", "server").unwrap());
        let client = PodTls::new(&ca.issue(&cid, SVID_TTL).unwrap(), &ca.bundle(), &td).unwrap();
        let server = PodTls::new(&ca.issue(&sid, SVID_TTL).unwrap(), &ca.bundle(), &td).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        Pki { client, server, server_id: sid, _dir: dir }
    }

    /// Runs an HBONE server on loopback whose streams echo, then send "<n>" after the client's
    /// END_STREAM; CONNECTs to port 1 are refused with 503. Reports the client IDs it saw.
    async fn echo_server(tls: Arc<rustls::ServerConfig>) -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<String>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let (tcp, _) = l.accept().await.unwrap();
                let (tls, tx) = (tls.clone(), tx.clone());
                tokio::spawn(async move {
                    let decide = move |id: SpiffeId, target: Result<SocketAddr, &'static str>| {
                        let _ = tx.send(id.to_string());
                        async move {
                            match target {
                                Ok(t) if t.port() == 1 => Decision::Refuse(StatusCode::SERVICE_UNAVAILABLE),
                                Ok(_) => Decision::Accept(()),
                                Err(_) => Decision::Refuse(StatusCode::BAD_REQUEST),
                            }
                        }
                    };
                    // Deliver to an "app" that echoes, then writes its byte count after EOF.
                    let carry = |s: H2Stream, ()| async move {
                        let (app, mut app_side) = tcp_pair().await;
                        tokio::spawn(async move {
                            let mut all = Vec::new();
                            app_side.read_to_end(&mut all).await.unwrap();
                            app_side.write_all(&all).await.unwrap();
                            app_side.write_all(format!("<{}>", all.len()).as_bytes()).await.unwrap();
                            app_side.shutdown().await.unwrap();
                        });
                        s.splice(app).await.unwrap();
                    };
                    let _ = serve(tcp, tls, decide, carry).await;
                });
            }
        });
        (addr, rx)
    }

    #[tokio::test]
    async fn hbone_carries_bytes_both_ways_with_half_close_and_the_client_identity() {
        let p = pki("echo");
        let (addr, mut seen) = echo_server(p.server.server.clone()).await;
        let payload: Vec<u8> = (0..3_000_000u32).map(|i| i as u8).collect();
        let tcp = TcpStream::connect(addr).await.unwrap();
        let s = connect(tcp, p.client.client(&p.server_id).unwrap(), "127.0.0.1:8080".parse().unwrap()).await.unwrap();
        // The client app's connection, spliced onto the stream as the outbound proxy does.
        let (agent_end, app) = tcp_pair().await;
        let splice = tokio::spawn(s.splice(agent_end));
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
        let (up, down) = splice.await.unwrap().unwrap();
        assert_eq!((up, down), (payload.len() as u64, back.len() as u64), "splice reports what it carried");
        assert_eq!(seen.recv().await.unwrap(), "spiffe://cluster.local/ns/default/sa/client");
    }

    #[tokio::test]
    async fn refused_connects_and_wrong_peer_identities_fail_the_client() {
        let p = pki("refuse");
        let (addr, _seen) = echo_server(p.server.server.clone()).await;
        let tcp = TcpStream::connect(addr).await.unwrap();
        let err =
            connect(tcp, p.client.client(&p.server_id).unwrap(), "127.0.0.1:1".parse().unwrap()).await.err().unwrap();
        assert!(matches!(err, Error::Refused(StatusCode::SERVICE_UNAVAILABLE)), "got {err}");
        // The client expects another identity than the server presents: the handshake fails.
        let other = workload_id(&TrustDomain::new("cluster.local").unwrap(), "default", "someone-else").unwrap();
        let tcp = TcpStream::connect(addr).await.unwrap();
        let err =
            connect(tcp, p.client.client(&other).unwrap(), "127.0.0.1:8080".parse().unwrap()).await.err().unwrap();
        assert!(err.to_string().contains("expected spiffe://cluster.local/ns/default/sa/someone-else"), "got {err}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_that_accepts_and_stalls_times_out_on_both_sides() {
        let p = pki("stall");
        // Client side: the peer accepts TCP and never speaks TLS.
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let _held = tokio::spawn(async move { l.accept().await });
        let tcp = TcpStream::connect(addr).await.unwrap();
        let err = connect(tcp, p.client.client(&p.server_id).unwrap(), "127.0.0.1:8080".parse().unwrap()).await;
        assert!(matches!(err, Err(Error::Timeout)), "client must give up on a silent peer");
        // Server side: a client connects and never sends a ClientHello.
        let (agent_end, _silent_client) = tcp_pair().await;
        let served = serve(agent_end, p.server.server.clone(), |_, _| async { Decision::Accept(()) }, |_, ()| async {});
        assert!(matches!(served.await, Err(Error::Timeout)), "server must give up on a silent client");
    }

    #[test]
    fn bad_hbone_requests_are_rejected_with_a_reason() {
        let get = Request::builder().method(Method::GET).uri("http://198.19.2.10:80/").body(()).unwrap();
        assert_eq!(parse_target(&get), Err("HBONE requests must use CONNECT"));
        let name = Request::builder().method(Method::CONNECT).uri("example.com:80").body(()).unwrap();
        assert_eq!(parse_target(&name), Err(":authority must be ip:port"));
    }
}
