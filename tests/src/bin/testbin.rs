//! `meshless-testbin`: the unmodified applications run inside testbed pods — plain blocking std
//! sockets, no knowledge of meshless. Servers run until killed; clients are bounded in count and
//! time and print one JSON line of results.
//!
//! ```text
//! meshless-testbin http-serve <port> <body>      HTTP/1.1 server answering every GET with <body>
//! meshless-testbin echo-serve <port>             echoes bytes; on EOF echoes "<n bytes>" and closes
//! meshless-testbin reset-serve <port>            reads 4 bytes, answers "ok", then resets (RST)
//! meshless-testbin tag-serve <port> <tag>        reads to EOF, answers <tag>, closes
//! meshless-testbin addr-serve <port>             reads to EOF, answers the client address it sees, closes
//! meshless-testbin sink <port>                   reads to EOF, then answers the byte count
//! meshless-testbin send <addr> <text>            sends text, half-closes, prints the reply
//! meshless-testbin peer <addr> <text>            as send, but first prints getpeername() and a newline
//! meshless-testbin end <addr> <text>             as send, then says how the reply ended: {"end":"eof|reset|…","reply":…}
//! meshless-testbin send-rst <addr> <text>        sends text, then resets the connection (RST)
//! meshless-testbin wait-end <addr> <text>        sends text (no half-close), says how the other side ended it (20 s at most)
//! meshless-testbin send-mptcp <addr> <text>      as send, over an MPTCP socket
//! meshless-testbin send-marked <addr> <text> <mark>  as send, the socket marked <mark> (SO_MARK) first
//! meshless-testbin watch-serve <port>            per connection, prints how it ended: {"end":"eof|reset|…","got":…}
//! meshless-testbin bulk <addr> <seconds>         one stream to a sink; prints {"gbit_per_s":..}
//! meshless-testbin rr <addr> <size> <count>      request/response on one connection; prints p50/p99
//! meshless-testbin crr <addr> <count>            connect + request + response + close, sequentially, to an
//!                                                echo server; prints p50/p99 and connections per second
//! meshless-testbin storm <addr> <n>              n connects at once (a barrier), each one request; prints
//!                                                the completion p50/p99/max
//! meshless-testbin hold <addr> <n>               opens n connections (one round trip each), prints {"held":n},
//!                                                keeps them until stdin closes (at most 600 s)
//! meshless-testbin stream <addr> <seconds> <ms>  a new connection with one request every <ms> for <seconds>;
//!                                                prints {"ok":..,"failed":..}, failures on stderr
//! meshless-testbin longlived <addr> <seconds> [<progress file>]
//!                                                one connection, a round trip every 50 ms for <seconds>,
//!                                                then a clean close; prints {"rounds":..} or fails; keeps
//!                                                the count of completed rounds in <progress file>
//! meshless-testbin flood <addr> <count>          non-blocking connects closed at once (RST), as fast as it
//!                                                can, at most <count> and 60 s; prints {"attempts":..}
//! meshless-testbin same-port <port> <src1> <dst1> <src2> <dst2>
//!                                                two connects from one port on two local addresses, at
//!                                                once; prints each reply
//! ```

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

fn main() {
    raise_nofile();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let a = |i: usize| -> &str {
        args.get(i).map(String::as_str).unwrap_or_else(|| {
            eprintln!("meshless-testbin: missing argument {i}; see the usage in the source header");
            std::process::exit(2)
        })
    };
    let n = |i: usize| -> u64 { a(i).parse().unwrap_or_else(|_| panic!("argument {i} must be a number")) };
    let res = match a(0) {
        "http-serve" => {
            let body: &'static [u8] = Box::leak(a(2).as_bytes().to_vec().into_boxed_slice());
            serve(a(1), move |s| http(s, body))
        }
        "echo-serve" => serve(a(1), echo),
        "reset-serve" => serve(a(1), reset_after_read),
        "tag-serve" => {
            let tag: &'static [u8] = Box::leak(a(2).as_bytes().to_vec().into_boxed_slice());
            serve(a(1), move |mut s| {
                s.read_to_end(&mut Vec::new())?;
                s.write_all(tag)
            })
        }
        "addr-serve" => serve(a(1), |mut s| {
            s.read_to_end(&mut Vec::new())?;
            let peer = s.peer_addr()?;
            s.write_all(peer.ip().to_canonical().to_string().as_bytes())
        }),
        "sink" => serve(a(1), sink),
        "send" => send(a(1), a(2), false),
        "peer" => send(a(1), a(2), true),
        "end" => end(a(1), a(2)),
        "wait-end" => wait_end(a(1), a(2)),
        "send-mptcp" => send_mptcp(a(1), a(2)),
        "send-marked" => send_marked(a(1), a(2), a(3)),
        "send-rst" => connect(a(1)).and_then(|mut s| {
            s.write_all(a(2).as_bytes())?;
            std::thread::sleep(Duration::from_millis(200));
            rst(s);
            Ok(())
        }),
        "watch-serve" => serve(a(1), |mut s| {
            let (how, got) = read_to_end_or_reset(&mut s);
            println!("{}", serde_json::json!({"end": how, "got": String::from_utf8_lossy(&got)}));
            std::io::stdout().flush()
        }),
        "bulk" => bulk(a(1), a(2).parse().expect("seconds")),
        "rr" => rr(a(1), n(2) as usize, n(3) as usize),
        "crr" => crr(a(1), n(2) as usize),
        "storm" => storm(a(1), n(2) as usize),
        "hold" => hold(a(1), n(2) as usize),
        "stream" => stream(a(1), n(2), n(3)),
        "longlived" => longlived(a(1), n(2), args.get(3).map(std::path::Path::new)),
        "flood" => flood(a(1), n(2)),
        "same-port" => same_port(n(1) as u16, [(a(2), a(3)), (a(4), a(5))]),
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

/// Holding thousands of connections needs more than the default 1024 descriptors.
fn raise_nofile() {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local rlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
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
        let Ok(s) = s else { continue };
        std::thread::Builder::new()
            .stack_size(64 << 10)
            .spawn(move || {
                if let Err(e) = handle(s) {
                    eprintln!("connection: {e}");
                }
            })
            .ok();
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
    let mut buf = vec![0u8; 16 * 1024];
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

fn reset_after_read(mut s: TcpStream) -> std::io::Result<()> {
    let mut b = [0u8; 4];
    s.read_exact(&mut b)?;
    s.write_all(b"ok")?;
    std::thread::sleep(Duration::from_millis(100));
    rst(s);
    Ok(())
}

/// Closes with a reset: SO_LINGER 0.
fn rst(s: TcpStream) {
    let l = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: setsockopt on a socket we own, with a valid linger struct and its size.
    unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&s),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&l as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
    drop(s);
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

/// `ip:port`, or `[fe80::…%iface]:port` for an IPv6 link-local address on interface `iface`.
fn parse(addr: &str) -> std::io::Result<SocketAddr> {
    let bad = |e: &dyn std::fmt::Display| std::io::Error::other(format!("{addr}: {e}"));
    let Some((ip, rest)) = addr.strip_prefix('[').and_then(|a| a.split_once('%')) else {
        return addr.parse().map_err(|e| bad(&e));
    };
    let (iface, port) = rest.split_once("]:").ok_or_else(|| bad(&"expected [ip%iface]:port"))?;
    let ip: std::net::Ipv6Addr = ip.parse().map_err(|e| bad(&e))?;
    let port: u16 = port.parse().map_err(|e| bad(&e))?;
    let name = std::ffi::CString::new(iface).map_err(|e| bad(&e))?;
    // SAFETY: if_nametoindex reads the NUL-terminated name and nothing else.
    let scope = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if scope == 0 {
        return Err(bad(&std::io::Error::last_os_error()));
    }
    Ok(SocketAddr::V6(std::net::SocketAddrV6::new(ip, port, 0, scope)))
}

fn connect(addr: &str) -> std::io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&parse(addr)?, Duration::from_secs(5))?;
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

/// One request/response on a new connection (half-close, read to EOF); the reply.
fn exchange(addr: &str, text: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut s = connect(addr)?;
    s.set_nodelay(true)?;
    s.write_all(text)?;
    s.shutdown(Shutdown::Write)?;
    let mut out = Vec::new();
    s.read_to_end(&mut out)?;
    Ok(out)
}

/// Reads until the peer ends the connection; how it ended ("eof", "reset" or the error) and what
/// came before.
fn read_to_end_or_reset(s: &mut TcpStream) -> (String, Vec<u8>) {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let how = loop {
        match s.read(&mut buf) {
            Ok(0) => break "eof".to_string(),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break "reset".to_string(),
            Err(e) => break format!("error: {e}"),
        }
    };
    (how, out)
}

fn end(addr: &str, text: &str) -> std::io::Result<()> {
    let reset = |e: &std::io::Error| e.kind() == std::io::ErrorKind::ConnectionReset;
    // A reset before the request was even out (a refusal can be that quick, even before
    // connect_timeout has seen the connection up) is still a reset.
    let sent = connect(addr).and_then(|mut s| {
        s.write_all(text.as_bytes())?;
        s.shutdown(Shutdown::Write)?;
        Ok(s)
    });
    let (how, out) = match sent {
        Err(e) if reset(&e) => ("reset".to_string(), Vec::new()),
        Err(e) => return Err(e),
        Ok(mut s) => read_to_end_or_reset(&mut s),
    };
    println!("{}", serde_json::json!({"end": how, "reply": String::from_utf8_lossy(&out)}));
    Ok(())
}

/// Connects, sends `text` without ending its side, and waits (20 s at most) for the other side to
/// end: prints `{"end": "eof" | "reset" | "error: …"}` — how an app reading to end-of-stream
/// would see its connection end.
fn wait_end(addr: &str, text: &str) -> std::io::Result<()> {
    let mut s = connect(addr)?;
    s.write_all(text.as_bytes())?;
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    let (how, got) = read_to_end_or_reset(&mut s);
    println!("{}", serde_json::json!({"end": how, "got": String::from_utf8_lossy(&got)}));
    Ok(())
}

fn send_mptcp(addr: &str, text: &str) -> std::io::Result<()> {
    const IPPROTO_MPTCP: i32 = 262;
    let to = parse(addr)?;
    let s = socket2::Socket::new(
        socket2::Domain::for_address(to),
        socket2::Type::STREAM,
        Some(socket2::Protocol::from(IPPROTO_MPTCP)),
    )?;
    send_on(s, addr, text)
}

/// As `send`, on a socket carrying the mark `mark` (what only the agent's sockets should carry).
fn send_marked(addr: &str, text: &str, mark: &str) -> std::io::Result<()> {
    use std::os::fd::AsRawFd as _;
    let mark: u32 = mark.parse().map_err(|_| std::io::Error::other("mark: a number"))?;
    let to = parse(addr)?;
    let s = socket2::Socket::new(socket2::Domain::for_address(to), socket2::Type::STREAM, None)?;
    // SAFETY: setsockopt reads 4 bytes from `mark` on an open socket.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_MARK,
            (&mark as *const u32).cast(),
            std::mem::size_of::<u32>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    send_on(s, addr, text)
}

/// Connects `s` to `addr`, sends `text`, half-closes and prints the reply.
fn send_on(s: socket2::Socket, addr: &str, text: &str) -> std::io::Result<()> {
    let addr = parse(addr)?;
    s.connect_timeout(&addr.into(), Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    let mut s: TcpStream = s.into();
    s.write_all(text.as_bytes())?;
    s.shutdown(Shutdown::Write)?;
    let mut out = Vec::new();
    s.read_to_end(&mut out)?;
    std::io::stdout().write_all(&out)
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

/// p50, p99 and max of samples in nanoseconds, in microseconds.
fn percentiles(mut samples: Vec<u64>) -> (f64, f64, f64) {
    samples.sort_unstable();
    let pct = |p: f64| samples[((samples.len() as f64 * p) as usize).min(samples.len() - 1)] as f64 / 1000.0;
    (pct(0.50), pct(0.99), *samples.last().unwrap_or(&0) as f64 / 1000.0)
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
    let (p50, p99, _) = percentiles(samples);
    println!("{{\"count\":{count},\"p50_us\":{p50:.1},\"p99_us\":{p99:.1}}}");
    Ok(())
}

fn crr(addr: &str, count: usize) -> std::io::Result<()> {
    let want = b"GET / HTTP/1.0\r\n\r\n<18 bytes>";
    let mut samples = Vec::with_capacity(count);
    let deadline = Instant::now() + Duration::from_secs(120);
    let start = Instant::now();
    for _ in 0..count {
        if Instant::now() > deadline {
            return Err(std::io::Error::other("connect/request run exceeded 120 s"));
        }
        let t = Instant::now();
        let reply = exchange(addr, &want[..18])?;
        samples.push(t.elapsed().as_nanos() as u64);
        if reply != want {
            return Err(std::io::Error::other(format!("unexpected reply {:?}", String::from_utf8_lossy(&reply))));
        }
    }
    let per_s = count as f64 / start.elapsed().as_secs_f64();
    let (p50, p99, _) = percentiles(samples);
    println!("{{\"count\":{count},\"p50_us\":{p50:.1},\"p99_us\":{p99:.1},\"conn_per_s\":{per_s:.0}}}");
    Ok(())
}

fn storm(addr: &str, n: usize) -> std::io::Result<()> {
    let barrier = Arc::new(Barrier::new(n + 1));
    let addr: &'static str = Box::leak(addr.to_string().into_boxed_str());
    let threads: Vec<_> = (0..n)
        .map(|_| {
            let b = barrier.clone();
            std::thread::spawn(move || {
                b.wait();
                let t = Instant::now();
                let ok = exchange(addr, b"storm").map(|r| r == b"storm<5 bytes>").unwrap_or(false);
                (t.elapsed().as_nanos() as u64, ok)
            })
        })
        .collect();
    barrier.wait();
    let results: Vec<(u64, bool)> = threads.into_iter().map(|t| t.join().unwrap_or((0, false))).collect();
    let failed = results.iter().filter(|(_, ok)| !ok).count();
    let (p50, p99, max) = percentiles(results.iter().map(|(t, _)| *t).collect());
    println!("{{\"count\":{n},\"failed\":{failed},\"p50_us\":{p50:.1},\"p99_us\":{p99:.1},\"max_us\":{max:.1}}}");
    Ok(())
}

fn hold(addr: &str, n: usize) -> std::io::Result<()> {
    let mut held = Vec::with_capacity(n);
    for i in 0..n {
        let mut s = connect(addr)?;
        s.write_all(b"x")?;
        let mut b = [0u8; 1];
        s.read_exact(&mut b).map_err(|e| std::io::Error::other(format!("connection {i}: {e}")))?;
        held.push(s);
    }
    println!("{{\"held\":{n}}}");
    std::io::stdout().flush()?;
    // Until the parent closes our stdin (or 600 s pass).
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = std::io::stdin().read_to_end(&mut Vec::new());
        let _ = tx.send(());
    });
    let _ = rx.recv_timeout(Duration::from_secs(600));
    drop(held);
    Ok(())
}

fn stream(addr: &str, seconds: u64, every_ms: u64) -> std::io::Result<()> {
    let start = Instant::now();
    let (mut ok, mut failed) = (0u64, 0u64);
    let mut samples = Vec::new();
    let mut i = 0u64;
    while start.elapsed() < Duration::from_secs(seconds.min(300)) {
        let text = format!("req-{i}");
        let t = Instant::now();
        match exchange(addr, text.as_bytes()) {
            Ok(r) if r == format!("{text}<{} bytes>", text.len()).as_bytes() => {
                ok += 1;
                samples.push(t.elapsed().as_nanos() as u64);
            }
            Ok(r) => {
                failed += 1;
                eprintln!("request {i}: unexpected reply {:?}", String::from_utf8_lossy(&r));
            }
            Err(e) => {
                failed += 1;
                eprintln!("request {i} at {:.3}s: {e}", start.elapsed().as_secs_f64());
            }
        }
        i += 1;
        std::thread::sleep(Duration::from_millis(every_ms));
    }
    let (p50, p99, max) = if samples.is_empty() { (0.0, 0.0, 0.0) } else { percentiles(samples) };
    println!("{{\"ok\":{ok},\"failed\":{failed},\"p50_us\":{p50:.1},\"p99_us\":{p99:.1},\"max_us\":{max:.1}}}");
    Ok(())
}

fn longlived(addr: &str, seconds: u64, progress: Option<&std::path::Path>) -> std::io::Result<()> {
    // Written whole and renamed into place, so a reader never sees a partial count.
    let report = |rounds: u64| -> std::io::Result<()> {
        let Some(path) = progress else { return Ok(()) };
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, rounds.to_string())?;
        std::fs::rename(&tmp, path)
    };
    let mut s = connect(addr)?;
    s.set_nodelay(true)?;
    let start = Instant::now();
    let mut rounds = 0u64;
    let mut sent = 0usize;
    while start.elapsed() < Duration::from_secs(seconds.min(300)) {
        let msg = format!("round-{rounds:08}");
        s.write_all(msg.as_bytes())?;
        sent += msg.len();
        let mut back = vec![0u8; msg.len()];
        s.read_exact(&mut back).map_err(|e| std::io::Error::other(format!("round {rounds}: {e}")))?;
        if back != msg.as_bytes() {
            return Err(std::io::Error::other(format!("round {rounds}: echo differs")));
        }
        rounds += 1;
        report(rounds)?;
        std::thread::sleep(Duration::from_millis(50));
    }
    s.shutdown(Shutdown::Write)?;
    let mut tail = String::new();
    s.read_to_string(&mut tail)?;
    if tail != format!("<{sent} bytes>") {
        return Err(std::io::Error::other(format!("the clean close was not echoed: {tail:?}")));
    }
    println!("{{\"rounds\":{rounds}}}");
    Ok(())
}

fn flood(addr: &str, count: u64) -> std::io::Result<()> {
    let addr = parse(addr)?;
    let start = Instant::now();
    let mut attempts = 0u64;
    while attempts < count && start.elapsed() < Duration::from_secs(60) {
        let s = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None)?;
        s.set_nonblocking(true)?;
        let _ = s.connect(&addr.into());
        s.set_linger(Some(Duration::ZERO))?;
        drop(s);
        attempts += 1;
    }
    println!("{{\"attempts\":{attempts},\"seconds\":{:.3}}}", start.elapsed().as_secs_f64());
    Ok(())
}

/// Two sockets bound to the same port on two local addresses, connected at once to two servers;
/// each must reach its own.
fn same_port(port: u16, pairs: [(&str, &str); 2]) -> std::io::Result<()> {
    let mut socks = Vec::new();
    for (src, dst) in pairs {
        let src: IpAddr = src.parse().map_err(|e| std::io::Error::other(format!("{src}: {e}")))?;
        let dst = parse(dst)?;
        let s = socket2::Socket::new(socket2::Domain::for_address(dst), socket2::Type::STREAM, None)?;
        s.set_reuse_address(true)?;
        s.bind(&SocketAddr::new(src, port).into())?;
        s.set_nonblocking(true)?;
        match s.connect(&dst.into()) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
            Err(e) => return Err(e),
        }
        socks.push(s);
    }
    for s in socks {
        s.set_nonblocking(false)?;
        s.set_read_timeout(Some(Duration::from_secs(20)))?;
        let mut s: TcpStream = s.into();
        // Wait for the connect to finish (a blocking write does).
        s.write_all(b"same-port")?;
        s.shutdown(Shutdown::Write)?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        println!("{out}");
    }
    Ok(())
}
