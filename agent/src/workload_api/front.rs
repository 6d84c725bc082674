//! What stands between the Workload API socket and the gRPC server: who the caller is, bound when
//! it connects, and an HTTP/2 front that makes the socket usable by every gRPC client.
//!
//! **The caller.** The kernel names the connecting process (`SO_PEERCRED`) and, on Linux ≥ 6.5,
//! hands a pidfd for it (`SO_PEERPIDFD`; `pidfd_open` at accept otherwise). A call is answered
//! only while that very process is alive: a process that connects, hands the socket on and exits
//! cannot have its pid reused by a process of another pod to be answered with that pod's key.
//!
//! **The `:authority`.** gRPC clients on a unix socket send the socket's path as `:authority`
//! (grpc-core percent-encoded, grpc-java and grpc-swift as is), which the HTTP/2 server under
//! tonic refuses with a stream reset (hyperium/h2#487). The front decodes each header block the
//! client sends (HPACK) and replaces an `:authority` that is not a valid authority — a path, a
//! percent-encoded path, an empty one — with `localhost`, re-encoding the block as literals; every
//! other frame passes unchanged, and the server's side is copied as is. Only this socket is
//! fronted: the tunnel's HTTP/2 server keeps h2's checks.

use std::io;
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, DuplexStream, ReadBuf};
use tokio::net::UnixStream;

/// The process that opened a Workload API connection.
#[derive(Debug, Clone)]
pub struct Caller {
    pub pid: i32,
    /// `None` when the kernel gave no pidfd and `pidfd_open` failed: never answered.
    pidfd: Option<Arc<OwnedFd>>,
}

impl Caller {
    /// The peer of `stream`, as the kernel names it.
    pub fn of(stream: &UnixStream) -> Option<Caller> {
        let pid = stream.peer_cred().ok()?.pid()?;
        let pidfd = peer_pidfd(stream).or_else(|| pidfd_open(pid)).map(Arc::new);
        Some(Caller { pid, pidfd })
    }

    /// Whether the process that connected is still running (not exited and reaped), so that
    /// `pid` still names it.
    pub fn alive(&self) -> bool {
        let Some(fd) = &self.pidfd else { return false };
        // SAFETY: pidfd_send_signal with signal 0 only checks; the fd is owned and open.
        let r = unsafe {
            libc::syscall(libc::SYS_pidfd_send_signal, fd.as_raw_fd(), 0, std::ptr::null::<libc::siginfo_t>(), 0)
        };
        r == 0
    }
}

fn peer_pidfd(stream: &UnixStream) -> Option<OwnedFd> {
    let mut fd: libc::c_int = -1;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `fd`.
    let r = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERPIDFD,
            (&mut fd as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    // SAFETY: on success the kernel returned a new pidfd this process owns.
    (r == 0 && fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd) })
}

fn pidfd_open(pid: i32) -> Option<OwnedFd> {
    // SAFETY: pidfd_open returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    // SAFETY: a non-negative result is a new pidfd this process owns.
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// The server's end of one fronted connection: what tonic reads and writes, and who connected.
pub struct Fronted {
    io: DuplexStream,
    caller: Caller,
}

impl tonic::transport::server::Connected for Fronted {
    type ConnectInfo = Caller;
    fn connect_info(&self) -> Caller {
        self.caller.clone()
    }
}

impl AsyncRead for Fronted {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Fronted {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// How many bytes the front buffers between the client and the server, each way.
const BUFFER: usize = 64 * 1024;

/// Fronts `client`: returns the server's end, and relays on a task until either side closes
/// (`permit`, the connection's place under the limit, is held until then).
pub fn front(client: UnixStream, caller: Caller, permit: tokio::sync::OwnedSemaphorePermit) -> Fronted {
    let (server_end, ours) = tokio::io::duplex(BUFFER);
    tokio::spawn(async move {
        let (from_client, mut to_client) = client.into_split();
        let (from_server, to_server) = tokio::io::split(ours);
        let upstream = async {
            let r = rewrite(from_client, to_server).await;
            if let Err(e) = &r {
                tracing::debug!(error = %e, "Workload API connection closed by the front");
            }
        };
        let downstream = async {
            let mut from_server = from_server;
            let _ = tokio::io::copy(&mut from_server, &mut to_client).await;
            let _ = to_client.shutdown().await;
        };
        // Either direction ending ends the connection (h2 closes both ways together).
        tokio::select! {
            _ = upstream => {}
            _ = downstream => {}
        }
        drop(permit);
    });
    Fronted { io: server_end, caller }
}

/// Accepts connections on `listener` (the socket `what` names, for logs), at most `limit` open at
/// once, each admitted by `admit` (closed otherwise), its caller named by the kernel, and fronted
/// (see [`front`]) for the gRPC server reading `tx`.
pub async fn accept(
    listener: tokio::net::UnixListener,
    tx: tokio::sync::mpsc::Sender<io::Result<Fronted>>,
    what: &'static str,
    limit: usize,
    admit: fn(&UnixStream) -> bool,
) {
    let open = Arc::new(tokio::sync::Semaphore::new(limit));
    let mut refusing = false;
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!(what, error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        if !admit(&stream) {
            continue;
        }
        let Ok(permit) = open.clone().try_acquire_owned() else {
            if !std::mem::replace(&mut refusing, true) {
                tracing::warn!(what, limit, "too many connections; closing new ones");
            }
            continue;
        };
        refusing = false;
        let Some(caller) = Caller::of(&stream) else {
            tracing::warn!(what, "the kernel does not name the connecting process; closing");
            continue;
        };
        if tx.send(Ok(front(stream, caller, permit))).await.is_err() {
            return;
        }
    }
}

const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// A header block larger than this closes the connection (h2's own limit is 16 KiB of headers).
const MAX_BLOCK: usize = 64 * 1024;
/// HTTP/2's default and minimum SETTINGS_MAX_FRAME_SIZE: what the re-encoded block is cut to.
const FRAME: usize = 16 * 1024;

fn bad(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_string())
}

/// Copies the client's frames to the server, header blocks rewritten.
async fn rewrite(mut from: impl AsyncRead + Unpin, mut to: impl AsyncWrite + Unpin) -> io::Result<()> {
    let mut preface = [0u8; 24];
    from.read_exact(&mut preface).await?;
    if &preface != PREFACE {
        return Err(bad("not an HTTP/2 connection preface"));
    }
    to.write_all(&preface).await?;
    let mut decoder = loona_hpack::Decoder::new();
    // (stream, END_STREAM of the HEADERS frame, the block so far)
    let mut block: Option<(u32, u8, Vec<u8>)> = None;
    loop {
        let mut head = [0u8; 9];
        match from.read_exact(&mut head).await {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let (kind, flags) = (head[3], head[4]);
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        if block.is_some() && kind != CONTINUATION {
            return Err(bad("a frame inside a header block"));
        }
        if kind != HEADERS && kind != CONTINUATION {
            // Passed through without buffering the payload.
            to.write_all(&head).await?;
            tokio::io::copy(&mut (&mut from).take(len as u64), &mut to).await?;
            continue;
        }
        if len > MAX_BLOCK {
            return Err(bad("header block too large"));
        }
        let mut payload = vec![0u8; len];
        from.read_exact(&mut payload).await?;
        let fragment = match kind {
            HEADERS => {
                block = Some((stream, flags & END_STREAM, Vec::new()));
                fragment(flags, &payload)?
            }
            _ => match &block {
                Some((s, ..)) if *s == stream => &payload[..],
                _ => return Err(bad("CONTINUATION without its HEADERS")),
            },
        };
        let (_, _, buf) = block.as_mut().expect("set above");
        buf.extend_from_slice(fragment);
        if buf.len() > MAX_BLOCK {
            return Err(bad("header block too large"));
        }
        if flags & END_HEADERS != 0 {
            let (stream, end_stream, buf) = block.take().expect("set above");
            let headers = decoder.decode(&buf).map_err(|e| bad(&format!("header block: {e}")))?;
            write_block(&mut to, stream, end_stream, &literal_block(&headers)).await?;
        }
    }
}

/// The header block fragment of a HEADERS frame: padding and priority fields removed.
fn fragment(flags: u8, payload: &[u8]) -> io::Result<&[u8]> {
    let mut p = payload;
    let mut pad = 0usize;
    if flags & PADDED != 0 {
        let (&n, rest) = p.split_first().ok_or_else(|| bad("HEADERS padding"))?;
        pad = n as usize;
        p = rest;
    }
    if flags & PRIORITY != 0 {
        p = p.get(5..).ok_or_else(|| bad("HEADERS priority"))?;
    }
    p.get(..p.len().checked_sub(pad).ok_or_else(|| bad("HEADERS padding"))?).ok_or_else(|| bad("HEADERS padding"))
}

/// The headers as one block of literals without indexing (RFC 7541 6.2.2): no dynamic table
/// state to keep in step with the server. An `:authority` that is not a valid authority becomes
/// `localhost`.
fn literal_block(headers: &[(Vec<u8>, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in headers {
        let value: &[u8] = if name == b":authority" && http::uri::Authority::try_from(value.as_slice()).is_err() {
            b"localhost"
        } else {
            value
        };
        out.push(0x00);
        for s in [name.as_slice(), value] {
            out.extend(loona_hpack::encoder::encode_integer(s.len(), 7));
            out.extend_from_slice(s);
        }
    }
    out
}

/// Writes `block` as a HEADERS frame and as many CONTINUATION frames as it needs.
async fn write_block(to: &mut (impl AsyncWrite + Unpin), stream: u32, end_stream: u8, block: &[u8]) -> io::Result<()> {
    let chunks: Vec<&[u8]> = if block.is_empty() { vec![&[]] } else { block.chunks(FRAME).collect() };
    for (i, chunk) in chunks.iter().enumerate() {
        let kind = if i == 0 { HEADERS } else { CONTINUATION };
        let mut flags = if i == 0 { end_stream } else { 0 };
        if i + 1 == chunks.len() {
            flags |= END_HEADERS;
        }
        let len = (chunk.len() as u32).to_be_bytes();
        let sid = stream.to_be_bytes();
        to.write_all(&[len[1], len[2], len[3], kind, flags, sid[0], sid[1], sid[2], sid[3]]).await?;
        to.write_all(chunk).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = (payload.len() as u32).to_be_bytes();
        let sid = stream.to_be_bytes();
        let mut f = vec![len[1], len[2], len[3], kind, flags, sid[0], sid[1], sid[2], sid[3]];
        f.extend_from_slice(payload);
        f
    }

    /// Runs `input` through the front and decodes the header blocks it forwards.
    async fn through(input: Vec<u8>) -> (io::Result<()>, Vec<Vec<(Vec<u8>, Vec<u8>)>>, Vec<u8>) {
        let mut out = Vec::new();
        let r = rewrite(&input[..], &mut out).await;
        let mut blocks = Vec::new();
        let mut decoder = loona_hpack::Decoder::new();
        let mut rest = out.get(24..).unwrap_or_default();
        let mut block = Vec::new();
        let mut others = Vec::new();
        while rest.len() >= 9 {
            let len = u32::from_be_bytes([0, rest[0], rest[1], rest[2]]) as usize;
            let (kind, flags, payload) = (rest[3], rest[4], &rest[9..9 + len]);
            if kind == HEADERS || kind == CONTINUATION {
                block.extend_from_slice(payload);
                if flags & END_HEADERS != 0 {
                    blocks.push(decoder.decode(&block).unwrap());
                    block.clear();
                }
            } else {
                others.extend_from_slice(&rest[..9 + len]);
            }
            rest = &rest[9 + len..];
        }
        (r, blocks, others)
    }

    fn request(authority: &str) -> Vec<(Vec<u8>, Vec<u8>)> {
        [
            (":method", "POST"),
            (":scheme", "http"),
            (":authority", authority),
            (":path", "/SpiffeWorkloadAPI/FetchX509SVID"),
            ("workload.spiffe.io", "true"),
        ]
        .iter()
        .map(|(n, v)| (n.as_bytes().to_vec(), v.as_bytes().to_vec()))
        .collect()
    }

    fn encoded(headers: &[(Vec<u8>, Vec<u8>)]) -> Vec<u8> {
        loona_hpack::Encoder::new().encode(headers.iter().map(|(n, v)| (&n[..], &v[..])))
    }

    #[tokio::test]
    async fn a_socket_path_as_authority_becomes_localhost_and_nothing_else_changes() {
        for (sent, want) in [
            ("%2Frun%2Fmeshless%2Fworkload.sock", "localhost"),
            ("/run/meshless/workload.sock", "localhost"),
            ("", "localhost"),
            ("localhost", "localhost"),
            ("spire-agent.example:8081", "spire-agent.example:8081"),
        ] {
            let mut input = PREFACE.to_vec();
            input.extend(frame(0x4, 0, 0, &[])); // SETTINGS
            let block = encoded(&request(sent));
            // Split over HEADERS (padded, with priority) and a CONTINUATION.
            let mut headers = vec![3u8, 0, 0, 0, 0, 16];
            headers.extend_from_slice(&block[..5]);
            headers.extend_from_slice(&[0, 0, 0]);
            input.extend(frame(HEADERS, PADDED | PRIORITY, 1, &headers));
            input.extend(frame(CONTINUATION, END_HEADERS, 1, &block[5..]));
            input.extend(frame(0x0, END_STREAM, 1, b"\0\0\0\0\0"));
            let (r, blocks, others) = through(input).await;
            r.unwrap();
            assert_eq!(blocks, vec![request(want)], "authority {sent:?}");
            assert_eq!(others, [frame(0x4, 0, 0, &[]), frame(0x0, END_STREAM, 1, b"\0\0\0\0\0")].concat());
        }
    }

    #[tokio::test]
    async fn malformed_input_closes_the_connection_with_an_error_and_never_panics() {
        let cases: Vec<Vec<u8>> = vec![
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            [PREFACE.to_vec(), frame(HEADERS, END_HEADERS | PADDED, 1, &[200, 1, 2])].concat(),
            [PREFACE.to_vec(), frame(HEADERS, END_HEADERS, 1, &[0xff, 0xff, 0xff, 0xff, 0xff, 0x7f])].concat(),
            [PREFACE.to_vec(), frame(CONTINUATION, END_HEADERS, 1, &[0x82])].concat(),
            [PREFACE.to_vec(), frame(HEADERS, 0, 1, &[0x82]), frame(0x0, 0, 1, b"x")].concat(),
            [PREFACE.to_vec(), frame(HEADERS, 0, 1, &[0x82]), frame(CONTINUATION, END_HEADERS, 3, &[0x82])].concat(),
            [PREFACE.to_vec(), vec![0x02, 0x00, 0x00, HEADERS, 0, 0, 0, 0, 1]].concat(),
        ];
        for input in cases {
            let (r, ..) = through(input.clone()).await;
            assert!(r.is_err(), "accepted {input:?}");
        }
        // A connection that ends between frames is a clean close.
        let (r, ..) = through(PREFACE.to_vec()).await;
        r.unwrap();
    }
}
