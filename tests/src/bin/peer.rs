//! `meshless-peer`: a misbehaving (or, as a control, well-behaved) client of a pod's tunnel port
//! 15008, for the hostile-peer tests. It presents a genuine certificate of the trust domain, then
//! does one thing the agent must bound. Prints one JSON line; bounded to 60 s.
//!
//! ```text
//! meshless-peer <mode> <addr> <cert.pem> <key.pem> [<target ip:port>]
//!   tcp-idle      connects and sends nothing; reports when the server closed
//!   tls-idle      completes TLS, then sends nothing (no HTTP/2 preface); reports when closed
//!   preface-idle  completes TLS and the HTTP/2 preface, then sends no CONNECT; reports when closed
//!   no-read       opens a CONNECT to <target>, sends a little, then stops reading the socket
//!                 altogether (no pings answered) for 8 s; reports when it paused (since its start
//!                 and as Unix time) and when it gave up
//! The idle modes and no-read also report their connection's own address ("local"), by which the
//! server's log names them.
//!   big-headers   sends a CONNECT with a 100 KiB header; reports the outcome
//!   many-streams  opens 150 CONNECT streams at once, before the server's SETTINGS can limit it;
//!                 reports how many were answered 200 and how many refused
//!   ok            one CONNECT to <target>, one echo round trip; reports the reply
//!   handshakes    TLS handshakes one after the other for 3 s, each on a new TCP connection: full
//!                 ones, then resumed ones (TLS 1.3 session resumption); reports both rates
//! ```

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde_json::json;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 4 {
        eprintln!("usage: meshless-peer <mode> <addr> <cert.pem> <key.pem> [<target>]");
        std::process::exit(2);
    }
    let out = tokio::time::timeout(Duration::from_secs(60), run(&args)).await;
    match out {
        Ok(Ok(v)) => println!("{v}"),
        Ok(Err(e)) => println!("{}", json!({"error": e.to_string()})),
        Err(_) => println!("{}", json!({"error": "still open after 60 s"})),
    }
}

async fn run(args: &[String]) -> Result<serde_json::Value> {
    let (mode, addr) = (args[0].as_str(), args[1].parse::<std::net::SocketAddr>()?);
    let target = args.get(4).map(|t| t.parse::<std::net::SocketAddr>()).transpose()?;
    let start = Instant::now();
    let tcp = match TcpStream::connect(addr).await {
        // Reset as soon as accepted: the server refused it at once.
        Err(e) if mode == "tcp-idle" && e.kind() == io::ErrorKind::ConnectionReset => {
            return Ok(json!({"closed_after_s": start.elapsed().as_secs_f64()}))
        }
        other => other?,
    };
    let local = tcp.local_addr()?.to_string();
    if mode == "tcp-idle" {
        closed(tcp).await?;
        return Ok(json!({"closed_after_s": start.elapsed().as_secs_f64(), "local": local}));
    }
    if mode == "handshakes" {
        drop(tcp);
        let full = handshake_rate(addr, &args[2], &args[3], false).await?;
        let resumed = handshake_rate(addr, &args[2], &args[3], true).await?;
        return Ok(json!({"full_per_s": full.0, "resumed_per_s": resumed.0, "resumed_share": resumed.1}));
    }
    let paused = Arc::new(AtomicBool::new(false));
    let io = Pausable { inner: tcp, paused: paused.clone() };
    let tls = tls_config(&args[2], &args[3])?;
    let name = ServerName::IpAddress(addr.ip().into());
    let mut tls = tokio_rustls::TlsConnector::from(tls).connect(name, io).await?;
    if mode == "tls-idle" {
        // The server speaks first (its HTTP/2 SETTINGS): read on until it closes.
        let (mut buf, mut n) = ([0u8; 4096], 0);
        while let Ok(got @ 1..) = tls.read(&mut buf).await {
            n += got;
        }
        return Ok(json!({"closed_after_s": start.elapsed().as_secs_f64(), "bytes": n, "local": local}));
    }
    let mut builder = h2::client::Builder::new();
    builder.initial_max_send_streams(1000).max_header_list_size(1 << 20);
    let (send, mut conn) = builder.handshake::<_, Bytes>(tls).await?;
    match mode {
        "preface-idle" => {
            let r = (&mut conn).await;
            Ok(json!({"closed_after_s": start.elapsed().as_secs_f64(), "result": format!("{r:?}"), "local": local}))
        }
        "big-headers" => {
            tokio::spawn(async move {
                let _ = conn.await;
            });
            let mut req = connect_request(target.ok_or("big-headers needs a target")?);
            req.headers_mut().insert("x-big", http::HeaderValue::from_str(&"a".repeat(100 << 10))?);
            let mut send = send.ready().await?;
            let outcome = match send.send_request(req, false) {
                Ok((resp, _)) => match resp.await {
                    Ok(r) => format!("status {}", r.status().as_u16()),
                    Err(e) => format!("refused: {e}"),
                },
                Err(e) => format!("refused: {e}"),
            };
            Ok(json!({"outcome": outcome}))
        }
        "many-streams" => {
            let target = target.ok_or("many-streams needs a target")?;
            // Every request is queued before the connection task first runs, so before the
            // server's SETTINGS (and its stream limit) are known to this client.
            let mut send = send;
            let mut pending = Vec::new();
            for _ in 0..150 {
                let (resp, stream) = send.send_request(connect_request(target), false)?;
                pending.push((resp, stream));
            }
            tokio::spawn(async move {
                let _ = conn.await;
            });
            let (mut ok, mut refused, mut other) = (0, 0, 0);
            let mut keep = Vec::new();
            for (resp, stream) in pending {
                match tokio::time::timeout(Duration::from_secs(10), resp).await {
                    Ok(Ok(r)) if r.status() == http::StatusCode::OK => {
                        ok += 1;
                        keep.push((r, stream));
                    }
                    Ok(Err(e)) if e.reason() == Some(h2::Reason::REFUSED_STREAM) => refused += 1,
                    _ => other += 1,
                }
            }
            Ok(json!({"ok": ok, "refused": refused, "other": other}))
        }
        "no-read" | "ok" => {
            let driver = tokio::spawn(async move { (&mut conn).await.map_err(|e| e.to_string()) });
            let mut send = send.ready().await?;
            let (resp, mut stream) = send.send_request(connect_request(target.ok_or("needs a target")?), false)?;
            let resp = resp.await?;
            if resp.status() != http::StatusCode::OK {
                return Ok(json!({"status": resp.status().as_u16()}));
            }
            stream.send_data(Bytes::from_static(b"hello"), false)?;
            let mut body = resp.into_body();
            let first = body.data().await.ok_or("no echo")??;
            if mode == "ok" {
                return Ok(json!({"reply": String::from_utf8_lossy(&first)}));
            }
            // Stop reading the socket altogether: no data, no pings, no pong answered.
            paused.store(true, Ordering::SeqCst);
            let paused_at_s = start.elapsed().as_secs_f64();
            let paused_at_unix_s = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs_f64();
            for _ in 0..64 {
                let _ = stream.send_data(Bytes::from(vec![0u8; 64 << 10]), false);
            }
            tokio::time::sleep(Duration::from_secs(8)).await;
            driver.abort();
            Ok(json!({
                "paused_at_s": paused_at_s,
                "paused_at_unix_s": paused_at_unix_s,
                "paused_after_s": start.elapsed().as_secs_f64(),
                "local": local,
            }))
        }
        other => Err(format!("unknown mode {other}").into()),
    }
}

fn connect_request(target: std::net::SocketAddr) -> http::Request<()> {
    http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(target.to_string())
        .version(http::Version::HTTP_2)
        .body(())
        .expect("valid request")
}

/// Handshakes per second over 3 s, with a session cache shared by all (resume) or none; and the
/// share of handshakes that did resume.
async fn handshake_rate(addr: std::net::SocketAddr, cert: &str, key: &str, resume: bool) -> Result<(f64, f64)> {
    let mut cfg = (*tls_config(cert, key)?).clone();
    if !resume {
        cfg.resumption = rustls::client::Resumption::disabled();
    }
    let cfg = Arc::new(cfg);
    let start = Instant::now();
    let (mut n, mut resumed) = (0u32, 0u32);
    while start.elapsed() < Duration::from_secs(3) {
        let tcp = TcpStream::connect(addr).await?;
        let name = ServerName::IpAddress(addr.ip().into());
        let mut tls = tokio_rustls::TlsConnector::from(cfg.clone()).connect(name, tcp).await?;
        if tls.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed) {
            resumed += 1;
        }
        // The HTTP/2 preface and an empty SETTINGS frame; the server's SETTINGS come after its
        // session tickets, so once they are read the next connection can resume.
        use tokio::io::AsyncWriteExt as _;
        tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00").await?;
        let mut buf = [0u8; 64];
        tokio::time::timeout(Duration::from_secs(1), tls.read(&mut buf)).await??;
        n += 1;
    }
    Ok((n as f64 / start.elapsed().as_secs_f64(), resumed as f64 / n.max(1) as f64))
}

/// Waits until the server closes `tcp` (EOF or reset).
async fn closed(mut tcp: TcpStream) -> Result<()> {
    let mut buf = [0u8; 64];
    loop {
        match tcp.read(&mut buf).await {
            Ok(0) | Err(_) => return Ok(()),
            Ok(_) => {}
        }
    }
}

/// A stream whose reads can be stopped: once paused, it never yields data again (the socket is
/// left unread, as by a peer that hangs).
struct Pausable {
    inner: TcpStream,
    paused: Arc<AtomicBool>,
}

impl AsyncRead for Pausable {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if self.paused.load(Ordering::SeqCst) {
            return Poll::Pending;
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Pausable {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A TLS 1.3 client presenting `cert`/`key`, accepting any server certificate (the tests are
/// about what the server bounds, not about whom the client trusts).
fn tls_config(cert: &str, key: &str) -> Result<Arc<rustls::ClientConfig>> {
    let chain: Vec<CertificateDer<'static>> =
        rustls_pemfile::certs(&mut std::fs::read(cert)?.as_slice()).collect::<io::Result<_>>()?;
    let key: PrivateKeyDer<'static> =
        rustls_pemfile::private_key(&mut std::fs::read(key)?.as_slice())?.ok_or("no private key")?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider)))
        .with_client_auth_cert(chain, key)?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(cfg))
}

#[derive(Debug)]
struct AnyServer(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> std::result::Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> std::result::Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(rustls::PeerIncompatible::Tls12NotOffered))
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> std::result::Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
