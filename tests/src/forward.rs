//! A host loopback port forwarded to a port on a network namespace's loopback, as
//! `kubectl port-forward` reaches a pod's: how the demo and the dashboard tests open a node's
//! admin endpoint (127.0.0.1:15000 inside the node's namespace) in a browser on the host. Each
//! connection gets a thread that enters the namespace (setns(2) moves only the calling thread)
//! to connect, then copies both ways. Everything stays on loopback.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use anyhow::{Context, Result};

use crate::Netns;

/// Connections a forward carries at once (a browser opens a handful); more are closed.
const MAX_CONNECTIONS: usize = 64;

/// A carried connection: the client's stream and, once connected, the upstream one.
type Carried = (TcpStream, Option<TcpStream>);

/// A running forward; stops (and closes what it carries) when dropped.
pub struct Forward {
    /// The host address to open: `127.0.0.1:<port>`.
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    open: Arc<Mutex<Vec<Carried>>>,
    accept: Option<JoinHandle<()>>,
}

impl Forward {
    /// Forwards `listen` (on the host; port 0 picks one) to `127.0.0.1:port` in `netns`.
    pub fn start(netns: &Netns, port: u16, listen: SocketAddr) -> Result<Forward> {
        assert!(listen.ip().is_loopback(), "a forward listens on loopback only");
        let ns = Arc::new(File::open(netns.path()).with_context(|| format!("opening netns {}", netns.name))?);
        let listener = TcpListener::bind(listen).with_context(|| format!("binding {listen}"))?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let open: Arc<Mutex<Vec<Carried>>> = Default::default();
        let accept = {
            let (stop, open) = (stop.clone(), open.clone());
            std::thread::spawn(move || {
                for client in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(client) = client else {
                        // Out of descriptors, say: not a reason to spin.
                        std::thread::sleep(std::time::Duration::from_millis(50));
                        continue;
                    };
                    let (ns, open, stop) = (ns.clone(), open.clone(), stop.clone());
                    std::thread::spawn(move || {
                        let _ = carry(&ns, port, client, &open, &stop);
                    });
                }
            })
        };
        Ok(Forward { addr, stop, open, accept: Some(accept) })
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// Connects to `127.0.0.1:port` from inside `ns` and copies between it and `client`. Every
/// stream it opens is listed in `open` (under the lock, and only while not stopped), so the
/// forward's drop shuts them all.
fn carry(
    ns: &File,
    port: u16,
    client: TcpStream,
    open: &Mutex<Vec<Carried>>,
    stop: &AtomicBool,
) -> std::io::Result<()> {
    {
        let mut open = open.lock().unwrap();
        open.retain(|(s, _)| s.peer_addr().is_ok());
        if open.len() >= MAX_CONNECTIONS || stop.load(Ordering::SeqCst) {
            return Ok(());
        }
        open.push((client.try_clone()?, None));
    }
    // SAFETY: setns(2) on a descriptor this thread holds open; it moves this thread only, which
    // does nothing else afterwards but copy.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let upstream = TcpStream::connect(("127.0.0.1", port))?;
    {
        let mut open = open.lock().unwrap();
        if stop.load(Ordering::SeqCst) {
            return Ok(());
        }
        let me = client.peer_addr().ok();
        if let Some(entry) = open.iter_mut().find(|(s, _)| s.peer_addr().ok() == me) {
            entry.1 = Some(upstream.try_clone()?);
        }
    }
    let (mut up_read, mut client_write) = (upstream.try_clone()?, client.try_clone()?);
    let back = std::thread::spawn(move || {
        let _ = copy(&mut up_read, &mut client_write);
        let _ = client_write.shutdown(Shutdown::Write);
    });
    let (mut client_read, mut up_write) = (client, upstream);
    let _ = copy(&mut client_read, &mut up_write);
    let _ = up_write.shutdown(Shutdown::Write);
    let _ = back.join();
    Ok(())
}

/// `std::io::copy`, flushing each read through at once (server-sent events must not wait).
fn copy(from: &mut TcpStream, to: &mut TcpStream) -> std::io::Result<()> {
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = from.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        to.write_all(&buf[..n])?;
    }
}

impl Drop for Forward {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the stop.
        let _ = TcpStream::connect(self.addr);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        for (client, upstream) in self.open.lock().unwrap().drain(..) {
            let _ = client.shutdown(Shutdown::Both);
            if let Some(u) = upstream {
                let _ = u.shutdown(Shutdown::Both);
            }
        }
    }
}
