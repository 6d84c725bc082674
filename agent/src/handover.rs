//! Upgrades without loss: a starting agent takes over the listening sockets of the agent running
//! before it, over a unix socket (`<run dir>/handover.sock`, SOCK_SEQPACKET, the sockets passed as
//! SCM_RIGHTS).
//!
//! The sequence: the successor connects and says hello; the predecessor sends every pod's
//! listening sockets (duplicates: the sockets themselves, with their accept queues); the successor
//! enrolls its pods with them, attaches its kernel programs, starts serving, and answers
//! "adopted". Only then does the predecessor stop accepting: connections already queued are
//! accepted by the successor from the same sockets, so none is refused, and the predecessor keeps
//! carrying its established connections until they end or its drain deadline passes. Tunnel peers
//! get a GOAWAY and open new streams on connections the successor accepts. If the successor dies
//! before "adopted", the predecessor simply goes on.

use std::collections::HashMap;
use std::io;
use std::io::IoSlice;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::socket::{
    self, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType, UnixAddr,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

use crate::netns;
use crate::workloads::PodKey;

/// The agent's listening sockets of one pod.
pub struct Listeners(pub Vec<(ListenerSpec, std::net::TcpListener)>);

/// How long either side waits for the other at each step.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);
/// Sockets per message (the kernel's SCM_MAX_FD is 253).
const FDS_PER_MESSAGE: usize = 200;
const MAX_MESSAGE: usize = 256 << 10;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("hand-over socket {path}: {source}")]
    Socket { path: PathBuf, source: io::Error },
    #[error("hand-over protocol: {0}")]
    Protocol(String),
}

/// What a listening socket is for, so the successor can give it to the right pod.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListenerSpec {
    pub pod: PodKey,
    pub role: Role,
    pub addr: SocketAddr,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    /// 15001: captured outbound connections.
    Outbound,
    /// 15008: the HBONE tunnel.
    Tunnel,
    /// 15006: plaintext steered here by sk_lookup.
    Inbound,
    /// The node's admin endpoint (15000), in the agent's own netns, filed under [`node_key`]:
    /// handed over rather than shared with SO_REUSEPORT, so no other process of the node's user
    /// can bind beside it and answer `/readyz` for the agent.
    Admin,
    /// The metrics endpoint (15020), handed over like the admin endpoint.
    Metrics,
}

/// The key the agent's own (not a pod's) listeners are filed under.
pub fn node_key() -> PodKey {
    PodKey { namespace: String::new(), name: String::new() }
}

#[derive(Serialize, Deserialize)]
enum Message {
    Hello {
        version: u32,
        /// The successor takes the metrics listener too (an older successor does not say so,
        /// and is not sent a listener role it cannot read).
        #[serde(default)]
        metrics: bool,
    },
    /// The sockets of this message, in order, described.
    Listeners {
        specs: Vec<ListenerSpec>,
        last: bool,
        /// How many hand-overs came before the sender's own start (an older sender does not say).
        #[serde(default)]
        takeovers: u64,
    },
    Adopted,
}

const VERSION: u32 = 1;

/// How many times an agent on this node took over from a running one, up to this agent: the
/// node's agent restarts without a dropped connection (set once, by [`receive`]).
static TAKEOVERS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// This node's agent hand-overs, up to and including this agent's own start.
pub fn takeovers() -> u64 {
    TAKEOVERS.load(std::sync::atomic::Ordering::Relaxed)
}

/// Listeners received from a predecessor, waiting to be claimed by their pods.
#[derive(Default)]
pub struct Inherited(HashMap<(PodKey, u64), Vec<(ListenerSpec, std::net::TcpListener)>>);

impl Inherited {
    /// Files `listeners` (all of one pod, whose netns has `cookie`) to be claimed.
    pub fn put(&mut self, cookie: u64, listeners: Vec<(ListenerSpec, std::net::TcpListener)>) {
        for (spec, l) in listeners {
            self.0.entry((spec.pod.clone(), cookie)).or_default().push((spec, l));
        }
    }

    /// The listeners of `pod` if they live in the netns `cookie` (a pod re-created under the same
    /// name has another netns, and gets fresh listeners).
    pub fn take(&mut self, pod: &PodKey, cookie: u64) -> Option<Listeners> {
        self.0.remove(&(pod.clone(), cookie)).map(Listeners)
    }

    /// Closes what nobody claimed; returns how many.
    pub fn release(&mut self) -> usize {
        let n = self.0.values().map(Vec::len).sum();
        self.0.clear();
        n
    }

    pub fn len(&self) -> usize {
        self.0.values().map(Vec::len).sum()
    }
}

/// The successor's open line to its predecessor, to say "adopted" once serving.
pub struct Predecessor(OwnedFd);

impl Predecessor {
    pub fn adopted(self) -> Result<(), Error> {
        send(&self.0, &Message::Adopted, &[])
    }
}

pub fn socket_path(run_dir: &Path) -> PathBuf {
    run_dir.join("handover.sock")
}

/// Successor side: takes over the listeners of the agent serving `path`, if one runs there.
pub fn receive(path: &Path) -> Result<Option<(Inherited, Predecessor)>, Error> {
    if !path.exists() {
        return Ok(None);
    }
    let err = |e: nix::Error| Error::Socket { path: path.into(), source: e.into() };
    let fd = socket::socket(AddressFamily::Unix, SockType::SeqPacket, SockFlag::SOCK_CLOEXEC, None).map_err(err)?;
    let addr = UnixAddr::new(path).map_err(err)?;
    match socket::connect(fd.as_raw_fd(), &addr) {
        Ok(()) => {}
        // A socket file left by an agent that died: nobody to take over from.
        Err(nix::Error::ECONNREFUSED) | Err(nix::Error::ENOENT) => return Ok(None),
        Err(e) => return Err(err(e)),
    }
    set_timeout(&fd).map_err(err)?;
    send(&fd, &Message::Hello { version: VERSION, metrics: true }, &[])?;
    let mut inherited = Inherited::default();
    let mut before: u64;
    loop {
        let (msg, fds) = recv(&fd)?;
        let Message::Listeners { specs, last, takeovers } = msg else {
            return Err(Error::Protocol("expected listeners".into()));
        };
        before = takeovers;
        if specs.len() != fds.len() {
            return Err(Error::Protocol(format!("{} listeners described, {} sent", specs.len(), fds.len())));
        }
        for (spec, fd) in specs.into_iter().zip(fds) {
            let listener = std::net::TcpListener::from(fd);
            match netns::netns_cookie(&listener) {
                Ok(cookie) => inherited.put(cookie, vec![(spec, listener)]),
                Err(e) => warn!(pod = %spec.pod, error = %e, "inherited listener has no netns cookie; closing it"),
            }
        }
        if last {
            break;
        }
    }
    TAKEOVERS.store(before.saturating_add(1), std::sync::atomic::Ordering::Relaxed);
    info!(
        listeners = inherited.len(),
        takeovers = before.saturating_add(1),
        "took over the listeners of the running agent"
    );
    Ok(Some((inherited, Predecessor(fd))))
}

/// A successor's request, for the predecessor's main loop.
pub struct Request {
    /// Answer with duplicates of every listener.
    pub listeners: oneshot::Sender<Vec<(ListenerSpec, std::net::TcpListener)>>,
    /// Fires once the successor serves; the predecessor then stops accepting.
    pub adopted: oneshot::Receiver<()>,
}

/// Predecessor side: binds `path` (replacing a predecessor's socket file) and serves successors
/// on a thread of its own, passing each request to the main loop.
pub fn serve(path: &Path) -> Result<mpsc::Receiver<Request>, Error> {
    let err = |e: io::Error| Error::Socket { path: path.into(), source: e };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
        // The run directory is the agent's alone (pods mount only its `workload-api`).
        std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700)).map_err(err)?;
    }
    let _ = std::fs::remove_file(path);
    let fd = socket::socket(AddressFamily::Unix, SockType::SeqPacket, SockFlag::SOCK_CLOEXEC, None)
        .map_err(|e| err(e.into()))?;
    socket::bind(fd.as_raw_fd(), &UnixAddr::new(path).map_err(|e| err(e.into()))?).map_err(|e| err(e.into()))?;
    // Only the agent's own user may take the listeners: the socket is that user's alone, and
    // every peer's credentials are checked as well (`serve_one`).
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).map_err(err)?;
    socket::listen(&fd, socket::Backlog::new(4).expect("valid backlog")).map_err(|e| err(e.into()))?;
    let (tx, rx) = mpsc::channel(1);
    let path = path.to_path_buf();
    std::thread::Builder::new()
        .name("meshless-handover".into())
        .spawn(move || loop {
            let conn = match socket::accept(fd.as_raw_fd()) {
                // SAFETY: accept(2) returned a new descriptor that nothing else owns.
                Ok(raw) => unsafe { OwnedFd::from_raw_fd(raw) },
                Err(e) => {
                    warn!(path = %path.display(), error = %e, "hand-over socket: accept failed");
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            };
            if let Err(e) = serve_one(&conn, &tx) {
                warn!(error = %e, "a successor's hand-over failed; this agent goes on serving");
            }
        })
        .map_err(err)?;
    Ok(rx)
}

fn serve_one(conn: &OwnedFd, tx: &mpsc::Sender<Request>) -> Result<(), Error> {
    let peer =
        socket::getsockopt(conn, socket::sockopt::PeerCredentials).map_err(|e| Error::Protocol(e.to_string()))?;
    // SAFETY: geteuid(2) has no arguments and cannot fail.
    let ours = unsafe { libc::geteuid() };
    if peer.uid() != ours {
        return Err(Error::Protocol(format!(
            "the peer (pid {}, uid {}) is not the agent's user (uid {ours}): refused",
            peer.pid(),
            peer.uid()
        )));
    }
    set_timeout(conn).map_err(|e| Error::Protocol(e.to_string()))?;
    let metrics = match recv(conn)?.0 {
        Message::Hello { version: VERSION, metrics } => metrics,
        Message::Hello { version, .. } => return Err(Error::Protocol(format!("successor speaks version {version}"))),
        _ => return Err(Error::Protocol("expected hello".into())),
    };
    let (listeners_tx, listeners_rx) = oneshot::channel();
    let (adopted_tx, adopted) = oneshot::channel();
    tx.blocking_send(Request { listeners: listeners_tx, adopted })
        .map_err(|_| Error::Protocol("agent is shutting down".into()))?;
    let mut listeners = listeners_rx.blocking_recv().map_err(|_| Error::Protocol("agent is shutting down".into()))?;
    listeners.retain(|(spec, _)| metrics || spec.role != Role::Metrics);
    info!(listeners = listeners.len(), "handing the listeners over to a successor");
    let mut chunks = listeners.chunks(FDS_PER_MESSAGE).peekable();
    if chunks.peek().is_none() {
        send(conn, &Message::Listeners { specs: vec![], last: true, takeovers: takeovers() }, &[])?;
    }
    while let Some(chunk) = chunks.next() {
        let specs = chunk.iter().map(|(s, _)| s.clone()).collect();
        let fds: Vec<RawFd> = chunk.iter().map(|(_, l)| l.as_raw_fd()).collect();
        send(conn, &Message::Listeners { specs, last: chunks.peek().is_none(), takeovers: takeovers() }, &fds)?;
    }
    // The successor enrolls, attaches and starts serving before it answers.
    match recv(conn)?.0 {
        Message::Adopted => {
            let _ = adopted_tx.send(());
            Ok(())
        }
        _ => Err(Error::Protocol("expected adopted".into())),
    }
}

fn set_timeout(fd: &OwnedFd) -> nix::Result<()> {
    let tv = nix::sys::time::TimeVal::new(STEP_TIMEOUT.as_secs() as i64, 0);
    socket::setsockopt(fd, socket::sockopt::ReceiveTimeout, &tv)?;
    socket::setsockopt(fd, socket::sockopt::SendTimeout, &tv)
}

fn send(fd: &OwnedFd, msg: &Message, fds: &[RawFd]) -> Result<(), Error> {
    let body = serde_json::to_vec(msg).map_err(|e| Error::Protocol(e.to_string()))?;
    let iov = [IoSlice::new(&body)];
    let cmsg = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &cmsg };
    socket::sendmsg::<()>(fd.as_raw_fd(), &iov, cmsgs, MsgFlags::empty(), None)
        .map_err(|e| Error::Protocol(format!("send: {e}")))?;
    Ok(())
}

fn recv(fd: &OwnedFd) -> Result<(Message, Vec<OwnedFd>), Error> {
    let mut body = vec![0u8; MAX_MESSAGE];
    let mut cmsg = nix::cmsg_space!([RawFd; FDS_PER_MESSAGE]);
    let (n, fds) = {
        let mut iov = [io::IoSliceMut::new(&mut body)];
        let msg = socket::recvmsg::<()>(fd.as_raw_fd(), &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC)
            .map_err(|e| Error::Protocol(format!("receive: {e}")))?;
        let mut fds = Vec::new();
        for c in msg.cmsgs().map_err(|e| Error::Protocol(e.to_string()))? {
            if let ControlMessageOwned::ScmRights(raw) = c {
                // SAFETY: SCM_RIGHTS installed these descriptors in this process for us alone.
                fds.extend(raw.into_iter().map(|r| unsafe { OwnedFd::from_raw_fd(r) }));
            }
        }
        (msg.bytes, fds)
    };
    if n == 0 {
        return Err(Error::Protocol("the other agent closed the hand-over socket".into()));
    }
    let msg = serde_json::from_slice(&body[..n]).map_err(|e| Error::Protocol(format!("bad message: {e}")))?;
    Ok((msg, fds))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two agents in one process: the successor receives working duplicates of the listeners
    /// (a connection queued before the hand-over is accepted on the received socket), and the
    /// predecessor learns "adopted".
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn listeners_are_handed_over_with_their_queues() {
        let dir = std::env::temp_dir().join(format!("meshless-handover-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = socket_path(&dir);
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let pod = PodKey { namespace: "default".into(), name: "a".into() };
        let spec = ListenerSpec { pod: pod.clone(), role: Role::Outbound, addr };
        let mut requests = serve(&path).unwrap();
        let queued = std::net::TcpStream::connect(addr).unwrap();
        let predecessor = tokio::spawn(async move {
            let req = requests.recv().await.unwrap();
            req.listeners.send(vec![(spec, l.try_clone().unwrap())]).unwrap();
            req.adopted.await.is_ok()
        });
        let p = path.clone();
        let (mut inherited, line) = tokio::task::spawn_blocking(move || receive(&p)).await.unwrap().unwrap().unwrap();
        let cookie = netns::current_cookie().unwrap();
        let Listeners(mut got) = inherited.take(&pod, cookie).expect("the pod's listener was handed over");
        assert_eq!(got.len(), 1);
        let (spec, received) = got.pop().unwrap();
        assert_eq!((spec.role, spec.addr), (Role::Outbound, addr));
        let (_, peer) = received.accept().unwrap();
        assert_eq!(peer, queued.local_addr().unwrap(), "the connection queued before the hand-over");
        line.adopted().unwrap();
        assert!(predecessor.await.unwrap(), "the predecessor learns that the successor serves");
        assert!(receive(&dir.join("nobody.sock")).unwrap().is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Connects to the hand-over socket `path` as user nobody and says Hello; the exit code says
    /// what happened: 2 the connect was refused, 3 closed without an answer, 0 answered.
    fn as_nobody(path: &Path) -> Option<i32> {
        let script = "import socket, sys\n\
            s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)\n\
            s.settimeout(5)\n\
            try:\n    s.connect(sys.argv[1])\nexcept PermissionError:\n    sys.exit(2)\n\
            try:\n    s.send(b'{\"Hello\":{\"version\":1}}')\n    data = s.recv(65536)\nexcept OSError:\n    data = b''\n\
            sys.exit(0 if data else 3)\n";
        let out = std::process::Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3", "-c", script])
            .arg(path)
            .output();
        match out {
            Ok(o) if o.status.code().is_some() => o.status.code(),
            _ => None,
        }
    }

    /// Only the agent's user may take the listeners over: the socket is 0600, and a peer of
    /// another user that reaches it anyway (the mode changed, another mount) is refused by its
    /// credentials before anything is handed out. Needs root (to act as another user).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn only_the_agent_s_user_may_take_the_listeners() {
        use std::os::unix::fs::PermissionsExt as _;
        // SAFETY: geteuid(2) has no arguments and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            assert!(!matches!(std::env::var("CI").as_deref(), Ok("true" | "1")), "needs root under CI");
            eprintln!("skipped: needs root to act as another user");
            return;
        }
        let dir = std::env::temp_dir().join(format!("meshless-handover-peer-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = socket_path(&dir);
        let mut requests = serve(&path).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777, 0o700, "the run directory");
        assert_eq!(as_nobody(&path), Some(2), "another user cannot even connect");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
        assert_eq!(as_nobody(&path), Some(3), "another user that connects is refused without an answer");
        assert!(requests.try_recv().is_err(), "nothing was handed to another user's successor");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
