//! `meshless-wlclient <endpoint>`: a workload fetching its X.509-SVID from the SPIFFE Workload API
//! with the `spiffe` crate's own client (`X509Source`), as an application in a pod would. Prints
//! one JSON line: the SPIFFE ID, the leaf's serial, the number of roots of its trust domain, or
//! the error. Bounded to 10 s. `meshless-wlclient <endpoint> with-key` adds the private key
//! (`key_der_b64`): what the dashboard security test searches the agent's output for.
//!
//! `meshless-wlclient orphan <socket path> <go file>`: the PID-reuse attack. Connects, hands the
//! connection to a child it starts, prints `{"parent": <pid>}` and exits. The child waits (30 s at
//! most) until `<go file>` exists, then asks for an X.509-SVID on the inherited connection (plain
//! HTTP/2, no client library) and prints `{"spiffe_id": …}` or `{"grpc_status": …}`.

use std::time::Duration;

use serde_json::json;
use spiffe::X509Source;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("orphan") if args.len() == 4 => return orphan(&args[2], &args[3]),
        Some("call-fd") if args.len() == 4 => return call_fd(&args[2], &args[3]).await,
        _ => {}
    }
    let endpoint = std::env::args().nth(1).unwrap_or_else(|| {
        eprintln!("usage: meshless-wlclient unix:///path/to/workload.sock");
        std::process::exit(2)
    });
    let out = match tokio::time::timeout(Duration::from_secs(10), X509Source::builder().endpoint(&endpoint).build())
        .await
    {
        Err(_) => json!({"error": "no X.509-SVID within 10 s"}),
        Ok(Err(e)) => json!({"error": e.to_string()}),
        Ok(Ok(source)) => match (source.svid(), source.bundle_set()) {
            (Ok(svid), Ok(bundles)) => {
                let serial = x509_parser::parse_x509_certificate(svid.leaf().as_bytes())
                    .map(|(_, c)| c.raw_serial_as_string())
                    .unwrap_or_default();
                let roots = bundles.get(svid.spiffe_id().trust_domain()).map(|b| b.authorities().len()).unwrap_or(0);
                let mut out = json!({"spiffe_id": svid.spiffe_id().to_string(), "serial": serial, "roots": roots, "chain": svid.cert_chain().len()});
                if args.get(2).map(String::as_str) == Some("with-key") {
                    use base64::Engine as _;
                    out["key_der_b64"] =
                        base64::engine::general_purpose::STANDARD.encode(svid.private_key().as_ref()).into();
                }
                out
            }
            (Err(e), _) | (_, Err(e)) => json!({"error": e.to_string()}),
        },
    };
    println!("{out}");
}

fn orphan(socket: &str, go: &str) {
    use std::os::fd::AsRawFd as _;
    let stream = std::os::unix::net::UnixStream::connect(socket).expect("connecting to the Workload API");
    let fd = stream.as_raw_fd();
    // SAFETY: clears FD_CLOEXEC on a descriptor this process owns, so the child inherits it.
    unsafe { libc::fcntl(fd, libc::F_SETFD, 0) };
    let exe = std::env::current_exe().expect("own path");
    let child = std::process::Command::new(exe).args(["call-fd", &fd.to_string(), go]).spawn().expect("child");
    std::mem::forget(child);
    println!("{}", json!({"parent": std::process::id()}));
    std::process::exit(0);
}

async fn call_fd(fd: &str, go: &str) {
    use std::os::fd::FromRawFd as _;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !std::path::Path::new(go).exists() {
        if std::time::Instant::now() > deadline {
            println!("{}", json!({"error": "never told to go"}));
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // SAFETY: the descriptor was inherited from the parent, which no longer uses it.
    let stream = unsafe { std::os::unix::net::UnixStream::from_raw_fd(fd.parse().expect("fd")) };
    stream.set_nonblocking(true).expect("nonblocking");
    let stream = tokio::net::UnixStream::from_std(stream).expect("tokio stream");
    let out = match tokio::time::timeout(Duration::from_secs(10), fetch_raw(stream)).await {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => json!({"error": e}),
        Err(_) => json!({"error": "no answer within 10 s"}),
    };
    println!("{out}");
}

/// One FetchX509SVID over HTTP/2 by hand: the first message's SPIFFE ID, or the gRPC status.
async fn fetch_raw(stream: tokio::net::UnixStream) -> Result<serde_json::Value, String> {
    let (client, conn) = h2::client::handshake(stream).await.map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let mut client = client.ready().await.map_err(|e| e.to_string())?;
    let request = http::Request::post("http://localhost/SpiffeWorkloadAPI/FetchX509SVID")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("workload.spiffe.io", "true")
        .body(())
        .map_err(|e| e.to_string())?;
    let (response, mut send) = client.send_request(request, false).map_err(|e| e.to_string())?;
    send.send_data(bytes::Bytes::from_static(&[0, 0, 0, 0, 0]), true).map_err(|e| e.to_string())?;
    let response = response.await.map_err(|e| e.to_string())?;
    let status = |h: &http::HeaderMap| h.get("grpc-status").map(|s| s.to_str().unwrap_or("?").to_string());
    if let Some(code) = status(response.headers()) {
        return Ok(json!({"grpc_status": code}));
    }
    let mut body = response.into_body();
    let mut buf = Vec::new();
    while let Some(chunk) = body.data().await {
        buf.extend_from_slice(&chunk.map_err(|e| e.to_string())?);
        if buf.len() >= 5 && buf.len() >= 5 + u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize {
            let svid = field(&buf[5..], 1).ok_or("no svids")?;
            let id = field(svid, 1).ok_or("no spiffe_id")?;
            return Ok(json!({"spiffe_id": String::from_utf8_lossy(id)}));
        }
    }
    let trailers = body.trailers().await.map_err(|e| e.to_string())?.unwrap_or_default();
    Ok(json!({"grpc_status": status(&trailers)}))
}

/// The first length-delimited field `number` of a protobuf message.
fn field(mut msg: &[u8], number: u64) -> Option<&[u8]> {
    fn varint(b: &mut &[u8]) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let (&byte, rest) = b.split_first()?;
            *b = rest;
            v |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    }
    while !msg.is_empty() {
        let key = varint(&mut msg)?;
        match key & 7 {
            0 => {
                varint(&mut msg)?;
            }
            2 => {
                let len = varint(&mut msg)? as usize;
                let value = msg.get(..len)?;
                msg = &msg[len..];
                if key >> 3 == number {
                    return Some(value);
                }
            }
            _ => return None,
        }
    }
    None
}
