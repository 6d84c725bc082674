//! Network namespaces and the agent's sockets inside them. All `unsafe` of the agent lives here,
//! but for the registration of the kernel log ring buffer in `capture`.
//!
//! The agent runs in its node's netns and holds sockets inside every local pod's netns. A socket
//! belongs to the netns its creating thread was in at `socket()` time, so [`Netns::run`] moves the
//! calling thread into the pod's netns, runs a short synchronous closure (create, bind), and moves
//! it back — no other code runs on that thread meanwhile.

use std::fs::File;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd};
use std::path::Path;

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use meshless_common::AGENT_MARK;

/// `SO_NETNS_COOKIE` (Linux ≥ 5.14), not yet in every libc release.
const SO_NETNS_COOKIE: libc::c_int = 71;

#[derive(Debug)]
pub struct Netns {
    file: File,
}

impl Netns {
    pub fn open(path: &Path) -> io::Result<Netns> {
        let file = File::open(path)
            .map_err(|e| io::Error::new(e.kind(), format!("network namespace {}: {e}", path.display())))?;
        Ok(Netns { file })
    }

    /// The netns of the calling thread.
    pub fn current() -> io::Result<Netns> {
        Netns::open(Path::new("/proc/thread-self/ns/net"))
    }

    /// Runs `f` with the calling thread inside this netns, then returns the thread to `home`,
    /// also when `f` panics (a guard does it while unwinding).
    pub fn run<T>(&self, home: &Netns, f: impl FnOnce() -> T) -> io::Result<T> {
        setns(&self.file)?;
        let _back = ReturnHome(home);
        Ok(f())
    }
}

/// Returns the thread to the agent's netns when dropped, on return or while unwinding.
struct ReturnHome<'a>(&'a Netns);

impl Drop for ReturnHome<'_> {
    fn drop(&mut self) {
        if let Err(e) = setns(&self.0.file) {
            // The thread would keep running in a pod's netns: every later socket on it would be
            // created in the wrong place. There is no safe way on; stop the process.
            eprintln!("fatal: cannot return to the agent's network namespace: {e}");
            std::process::abort();
        }
    }
}

impl AsFd for Netns {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.file.as_fd()
    }
}

fn setns(file: &File) -> io::Result<()> {
    // SAFETY: setns(2) on an open netns fd only changes the calling thread's netns; the fd stays
    // valid for the call because we borrow the File.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A TCP socket marked as the agent's own (never captured), non-blocking.
pub fn agent_socket(addr: &SocketAddr) -> io::Result<Socket> {
    let s = Socket::new(Domain::for_address(*addr), Type::STREAM.nonblocking(), Some(Protocol::TCP))?;
    s.set_mark(AGENT_MARK)?;
    s.set_tcp_nodelay(true)?;
    Ok(s)
}

/// TCP keepalive for tunnel connections: a peer that vanished without a FIN is found in about
/// a minute even when HTTP/2 is idle and no PING is in flight.
pub fn tunnel_keepalive(s: &impl AsFd) -> io::Result<()> {
    use std::time::Duration;
    let ka = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(30))
        .with_interval(Duration::from_secs(10))
        .with_retries(3);
    socket2::SockRef::from(s).set_tcp_keepalive(&ka)
}

/// A listening socket bound to `addr`; IPv6 wildcard listeners are dual-stack, IPv6 loopback
/// ones are v6-only. No SO_REUSEPORT: a successor agent gets these very sockets handed over
/// (`handover`), and no app in the pod can join the port.
pub fn listener(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let s = agent_socket(&addr)?;
    s.set_reuse_address(true)?;
    if let SocketAddr::V6(v6) = addr {
        s.set_only_v6(!v6.ip().is_unspecified())?;
    }
    s.bind(&SockAddr::from(addr)).map_err(|e| io::Error::new(e.kind(), format!("binding {addr}: {e}")))?;
    s.listen(4096)?;
    Ok(s.into())
}

/// Whether an error from creating or binding an IPv6 socket means the netns has no IPv6.
pub fn ipv6_unavailable(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EAFNOSUPPORT) | Some(libc::EADDRNOTAVAIL))
}

/// The cookie of the netns the calling thread is in (what the kernel programs see).
pub fn current_cookie() -> io::Result<u64> {
    let probe = Socket::new(Domain::IPV4, Type::DGRAM, None)?;
    netns_cookie(&probe)
}

/// The cookie of the netns at `path` (blocks: the calling thread enters it for a moment).
pub fn cookie_of(path: &Path) -> io::Result<u64> {
    Netns::open(path)?.run(&Netns::current()?, current_cookie)?
}

/// The cookie of the netns a socket lives in (what the kernel programs see).
pub fn netns_cookie(sock: &impl AsFd) -> io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt(2) writes at most `len` bytes into `cookie`, a valid, aligned u64 we
    // own; `len` tells it the size. The fd is borrowed for the duration of the call.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listeners_have_a_netns_cookie_and_the_same_netns_gives_the_same_cookie() {
        let a = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let b = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let (ca, cb) = (netns_cookie(&a).unwrap(), netns_cookie(&b).unwrap());
        assert_ne!(ca, 0);
        assert_eq!(ca, cb);
    }

    /// A panic inside `run` must not leave the thread in the pod's netns (later sockets on the
    /// thread would be made there). Needs CAP_SYS_ADMIN for a netns of its own (root in CI).
    #[test]
    fn a_panic_inside_run_returns_the_thread_home() {
        let home = Netns::current().unwrap();
        let other = std::thread::spawn(|| {
            // SAFETY: unshare(2) only moves this (short-lived) thread into a new netns.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            Netns::current()
        })
        .join()
        .unwrap();
        let other = match other {
            Ok(ns) => ns,
            Err(e) if !matches!(std::env::var("CI").as_deref(), Ok("true" | "1")) => {
                eprintln!("skipped: cannot make a netns ({e}); run as root");
                return;
            }
            Err(e) => panic!("cannot make a netns under CI=true: {e}"),
        };
        let cookie = || netns_cookie(&std::net::TcpListener::bind("127.0.0.1:0").unwrap()).unwrap();
        let at_home = cookie();
        let inside = other.run(&home, cookie).unwrap();
        assert_ne!(inside, at_home, "run enters the other netns");
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            other.run(&home, || panic!("a bug inside a pod's netns")).unwrap()
        }));
        assert!(panicked.is_err());
        assert_eq!(cookie(), at_home, "after a panic inside run the thread is back in the agent's netns");
    }
}
