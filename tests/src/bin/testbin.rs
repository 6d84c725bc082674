//! `meshless-testbin`: the unmodified applications run inside testbed pods — plain blocking std
//! sockets, no knowledge of meshless. Servers run until killed; clients are bounded in count and
//! time and print one JSON line of results.
//!
//! ```text
//! meshless-testbin http-serve <port> <body>      HTTP/1.1 server answering every GET with <body>
//! meshless-testbin echo-serve <port>             echoes bytes; on EOF echoes "<n bytes>" and closes
//! meshless-testbin sink <port>                   reads to EOF, then answers the byte count
//! meshless-testbin send <addr> <text>            sends text, half-closes, prints the reply
//! meshless-testbin peer <addr> <text>            as send, but first prints getpeername() and a newline
//! meshless-testbin bulk <addr> <seconds>         one stream to a sink; prints {"gbit_per_s":..}
//! meshless-testbin rr <addr> <size> <count>      request/response on one connection; prints p50/p99
//! ```

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let a = |i: usize| -> &str {
        args.get(i).map(String::as_str).unwrap_or_else(|| {
            eprintln!("meshless-testbin: missing argument {i}; see the usage in the source header");
            std::process::exit(2)
        })
    };
    let res = match a(0) {
        "http-serve" => {
            let body: &'static [u8] = Box::leak(a(2).as_bytes().to_vec().into_boxed_slice());
            serve(a(1), move |s| http(s, body))
        }
        "echo-serve" => serve(a(1), echo),
        "sink" => serve(a(1), sink),
        "send" => send(a(1), a(2), false),
        "peer" => send(a(1), a(2), true),
        "bulk" => bulk(a(1), a(2).parse().expect("seconds")),
        "rr" => rr(a(1), a(2).parse().expect("size"), a(3).parse().expect("count")),
        other => {
            eprintln!("meshless-testbin: unknown command {other}");
            std::process::exit(2)
        }
    };
    if let Err(e) = res {
        eprintln!("meshless-testbin: {e}");
        std::process::exit(1);
    }
}

fn serve(
    port: &str,
    handle: impl Fn(TcpStream) -> std::io::Result<()> + Send + Sync + Copy + 'static,
) -> std::io::Result<()> {
    // Dual-stack: [::] accepts IPv4 too (bindv6only is 0 in the testbed's namespaces).
    let l = TcpListener::bind(format!("[::]:{port}"))?;
    eprintln!("listening on {}", l.local_addr()?);
    for s in l.incoming() {
        let s = s?;
        std::thread::spawn(move || {
            if let Err(e) = handle(s) {
                eprintln!("connection: {e}");
            }
        });
    }
    Ok(())
}

fn http(s: TcpStream, body: &[u8]) -> std::io::Result<()> {
    let peer = s.peer_addr()?;
    let mut r = BufReader::new(s.try_clone()?);
    let mut w = s;
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let request_line = line.trim_end().to_string();
        // Skip headers.
        loop {
            line.clear();
            if r.read_line(&mut line)? == 0 || line == "\r\n" || line == "\n" {
                break;
            }
        }
        eprintln!("{peer} {request_line}");
        write!(w, "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nContent-Type: text/plain\r\n\r\n", body.len())?;
        w.write_all(body)?;
    }
}

fn echo(mut s: TcpStream) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0usize;
    loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        total += n;
        s.write_all(&buf[..n])?;
    }
    // Half-close seen: the write side is still open, prove it by writing after EOF.
    write!(s, "<{total} bytes>")?;
    s.shutdown(Shutdown::Write)
}

fn sink(mut s: TcpStream) -> std::io::Result<()> {
    let mut buf = vec![0u8; 256 * 1024];
    let mut total: u64 = 0;
    loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    write!(s, "{total}")?;
    s.shutdown(Shutdown::Write)
}

fn connect(addr: &str) -> std::io::Result<TcpStream> {
    let addr: SocketAddr = addr.parse().map_err(|e| std::io::Error::other(format!("{addr}: {e}")))?;
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    s.set_write_timeout(Some(Duration::from_secs(20)))?;
    Ok(s)
}

fn send(addr: &str, text: &str, show_peer: bool) -> std::io::Result<()> {
    let mut s = connect(addr)?;
    if show_peer {
        println!("{}", s.peer_addr()?);
    }
    s.write_all(text.as_bytes())?;
    s.shutdown(Shutdown::Write)?;
    let mut out = Vec::new();
    s.read_to_end(&mut out)?;
    std::io::stdout().write_all(&out)?;
    Ok(())
}

fn bulk(addr: &str, seconds: f64) -> std::io::Result<()> {
    let mut s = connect(addr)?;
    let buf = vec![0x5au8; 256 * 1024];
    let start = Instant::now();
    let limit = Duration::from_secs_f64(seconds);
    let mut sent: u64 = 0;
    while start.elapsed() < limit {
        s.write_all(&buf)?;
        sent += buf.len() as u64;
    }
    s.shutdown(Shutdown::Write)?;
    let mut reply = String::new();
    s.read_to_string(&mut reply)?;
    let secs = start.elapsed().as_secs_f64();
    let received: u64 = reply.trim().parse().map_err(|_| std::io::Error::other(format!("bad sink reply {reply:?}")))?;
    if received != sent {
        return Err(std::io::Error::other(format!("sink received {received} of {sent} bytes")));
    }
    println!("{{\"bytes\":{sent},\"seconds\":{secs:.3},\"gbit_per_s\":{:.3}}}", sent as f64 * 8.0 / secs / 1e9);
    Ok(())
}

fn rr(addr: &str, size: usize, count: usize) -> std::io::Result<()> {
    let mut s = connect(addr)?;
    s.set_nodelay(true)?;
    let req = vec![0xa5u8; size];
    let mut resp = vec![0u8; size];
    let mut samples = Vec::with_capacity(count);
    let deadline = Instant::now() + Duration::from_secs(120);
    // Warm-up round trips are not counted.
    for i in 0..count + 100 {
        if Instant::now() > deadline {
            return Err(std::io::Error::other("request/response run exceeded 120 s"));
        }
        let t = Instant::now();
        s.write_all(&req)?;
        s.read_exact(&mut resp)?;
        if i >= 100 {
            samples.push(t.elapsed().as_nanos() as u64);
        }
        if resp != req {
            return Err(std::io::Error::other("echo returned different bytes"));
        }
    }
    samples.sort_unstable();
    let pct = |p: f64| samples[((samples.len() as f64 * p) as usize).min(samples.len() - 1)] as f64 / 1000.0;
    println!("{{\"count\":{count},\"p50_us\":{:.1},\"p99_us\":{:.1}}}", pct(0.50), pct(0.99));
    Ok(())
}
