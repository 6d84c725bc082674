//! Capture: the kernel programs and their pinned state.
//!
//! The programs attach to the cgroup holding the node's pods through bpf links, and the links and
//! maps are pinned under `<bpf dir>/v<LAYOUT_VERSION>/` (`maps/`, `links/`), so they outlive the
//! agent: while no agent runs, enrolled pods' connects are still rewritten to the pod-local
//! listener, where nobody listens, and fail (never plaintext); pods the agent never learned stay
//! unable to connect out. A starting agent adopts the pinned maps (the pods stay enrolled), attaches
//! its own programs, and only then unpins every earlier link — its predecessor's, or stale ones a
//! crash left behind — so there is no moment without capture. The pinned `CGROUP` map records
//! which cgroup the directory belongs to, so two agents can never share one by mistake.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use aya::maps::{Array, HashMap, HashOfMaps, Map, MapData};
use aya::programs::links::FdLink;
use aya::programs::{CgroupAttachMode, CgroupSockAddr, SockOps};
use aya::{Ebpf, EbpfLoader};
use meshless_common::{
    maps, mode, programs, EnrolledPod, OrigDst, OrigDstKey, AF_INET, AF_INET6, LAYOUT_VERSION, ORIG_DST_PER_POD,
};
use tracing::{info, warn};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("loading the eBPF object: {0} (is the kernel ≥ 5.19 with BPF and BTF enabled, and are we root?)")]
    Load(#[from] aya::EbpfError),
    #[error("eBPF program {name}: {source}")]
    Program { name: &'static str, source: aya::programs::ProgramError },
    #[error("eBPF map {name}: {source}")]
    Map { name: &'static str, source: aya::maps::MapError },
    #[error("eBPF object has no map or program {0}: the agent and its embedded object disagree")]
    Missing(&'static str),
    #[error("cgroup {path}: {source} (it must be a directory in a cgroup2 mount)")]
    Cgroup { path: PathBuf, source: std::io::Error },
    #[error("BPF pin directory {path}: {msg}")]
    Pins { path: PathBuf, msg: String },
    #[error("this agent binary was built with AYA_BUILD_SKIP=1 and carries no eBPF programs")]
    NoObject,
}

/// The embedded kernel programs (built by build.rs).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/meshless-ebpf"));

/// `statfs(2)` magic of the BPF file system.
const BPF_FS_MAGIC: i64 = 0xcafe4a11;
/// Where a BPF file system is mounted when the machine has none.
const DEFAULT_BPFFS: &str = "/sys/fs/bpf";
/// Name of the pinned array recording the cgroup (by inode number) a pin directory serves.
const CGROUP_MAP: &str = "CGROUP";

pub struct Capture {
    /// `<bpf dir>/v<LAYOUT_VERSION>`.
    dir: PathBuf,
    cgroup_path: PathBuf,
    ebpf: Mutex<Ebpf>,
    enrolled: Mutex<HashMap<MapData, u64, EnrolledPod>>,
    orig: Mutex<HashOfMaps<MapData, u64, MapData>>,
}

/// A pod's own original-destination map, read by the agent after `accept()`.
pub struct PodOrig(Mutex<HashMap<MapData, OrigDstKey, OrigDst>>);

impl Capture {
    /// Opens (or creates) the pinned maps under `bpf_dir` for the cgroup `cgroup_parent`, and
    /// loads the programs without attaching them yet ([`Capture::attach`] does).
    pub fn load(bpf_dir: &Path, cgroup_parent: &Path, kernel_log: bool) -> Result<Capture, Error> {
        if OBJECT.is_empty() {
            return Err(Error::NoObject);
        }
        let cgroup_ino = std::fs::metadata(cgroup_parent)
            .and_then(|m| if m.is_dir() { Ok(m.ino()) } else { Err(std::io::Error::other("not a directory")) })
            .map_err(|source| Error::Cgroup { path: cgroup_parent.into(), source })?;
        // The root cgroup has no cgroup.type: attaching there would capture every process.
        if !cgroup_parent.join("cgroup.type").exists() {
            return Err(Error::Cgroup {
                path: cgroup_parent.into(),
                source: std::io::Error::other(
                    "is the root of a cgroup2 hierarchy (or not a cgroup2 directory); give the cgroup \
                     that holds this node's pods, not one that holds every process of the machine",
                ),
            });
        }
        ensure_bpffs(bpf_dir)?;
        let dir = bpf_dir.join(format!("v{LAYOUT_VERSION}"));
        for sub in ["maps", "links"] {
            std::fs::create_dir_all(dir.join(sub)).map_err(|e| pins(&dir, format!("creating {sub}/: {e}")))?;
        }
        claim_for_cgroup(&dir, cgroup_parent, cgroup_ino)?;

        // aya-log levels: 0 silences every log statement in the kernel programs (the default);
        // 5 (trace) lets them all through to the agent's tracing output.
        let level: u8 = if kernel_log { 5 } else { 0 };
        let map_paths: Vec<(&str, PathBuf)> = maps::PINNED.iter().map(|m| (*m, dir.join("maps").join(m))).collect();
        let mut loader = EbpfLoader::new();
        loader.override_global(aya_log::LEVEL, &level, true);
        for (name, path) in &map_paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(OBJECT)?;
        if kernel_log {
            match aya_log::EbpfLogger::init(&mut ebpf) {
                Ok(logger) => spawn_kernel_logger(logger),
                Err(e) => warn!(error = %e, "kernel program logging unavailable"),
            }
        }
        let enrolled = HashMap::try_from(take(&mut ebpf, maps::ENROLLED)?)
            .map_err(|source| Error::Map { name: maps::ENROLLED, source })?;
        let orig = HashOfMaps::try_from(take(&mut ebpf, maps::ORIG_DST)?)
            .map_err(|source| Error::Map { name: maps::ORIG_DST, source })?;
        Ok(Capture {
            dir,
            cgroup_path: cgroup_parent.into(),
            ebpf: Mutex::new(ebpf),
            enrolled: Mutex::new(enrolled),
            orig: Mutex::new(orig),
        })
    }

    /// Attaches every program to the pods' cgroup and pins the links, then unpins the links pinned
    /// before (a predecessor's, or a crash's leftovers) and removes older layout versions. The
    /// programs of both overlap for a moment; they are idempotent, so nothing is seen twice.
    pub fn attach(&self) -> Result<(), Error> {
        let mut ebpf = self.ebpf.lock().expect("ebpf lock");
        let links = self.dir.join("links");
        let earlier: Vec<PathBuf> = std::fs::read_dir(&links)
            .map_err(|e| pins(&links, e.to_string()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        let cgroup = std::fs::File::open(&self.cgroup_path)
            .map_err(|source| Error::Cgroup { path: self.cgroup_path.clone(), source })?;
        let stamp = format!(
            "{}-{}",
            std::process::id(),
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0)
        );
        let pin = |name: &'static str, link: FdLink| -> Result<(), Error> {
            let path = links.join(format!("{name}@{stamp}"));
            // The pin keeps the link (and so the attachment) alive; our handle closes on drop.
            link.pin(&path).map(drop).map_err(|e| pins(&path, e.to_string()))
        };
        for name in [
            programs::CONNECT4,
            programs::CONNECT6,
            programs::GETPEERNAME4,
            programs::GETPEERNAME6,
            programs::BIND4,
            programs::BIND6,
        ] {
            let prog: &mut CgroupSockAddr = ebpf
                .program_mut(name)
                .ok_or(Error::Missing(name))?
                .try_into()
                .map_err(|source| Error::Program { name, source })?;
            prog.load().map_err(|source| Error::Program { name, source })?;
            // On kernels ≥ 5.7 aya attaches through bpf_link, which takes no attach flags and
            // coexists with other programs on the same hook (a CNI's); `Single` passes flag 0.
            let id =
                prog.attach(&cgroup, CgroupAttachMode::Single).map_err(|source| Error::Program { name, source })?;
            let link = prog.take_link(id).map_err(|source| Error::Program { name, source })?;
            pin(name, FdLink::try_from(link).map_err(|e| pins(&links, format!("{name}: {e}")))?)?;
        }
        let name = programs::SOCK_OPS;
        let prog: &mut SockOps = ebpf
            .program_mut(name)
            .ok_or(Error::Missing(name))?
            .try_into()
            .map_err(|source| Error::Program { name, source })?;
        prog.load().map_err(|source| Error::Program { name, source })?;
        let id = prog.attach(&cgroup, CgroupAttachMode::Single).map_err(|source| Error::Program { name, source })?;
        let link = prog.take_link(id).map_err(|source| Error::Program { name, source })?;
        pin(name, FdLink::try_from(link).map_err(|e| pins(&links, format!("{name}: {e}")))?)?;

        for old in &earlier {
            if let Err(e) = std::fs::remove_file(old) {
                warn!(link = %old.display(), error = %e, "cannot unpin an earlier link");
            }
        }
        let stale_layouts = remove_other_layouts(&self.dir);
        info!(
            cgroup = %self.cgroup_path.display(),
            pins = %self.dir.display(),
            replaced_links = earlier.len(),
            stale_layouts,
            "eBPF capture attached (connect4/6, getpeername4/6, bind4/6, sock_ops)"
        );
        Ok(())
    }

    /// Starts capturing the outbound TCP of the pod whose netns has `cookie`, and returns the
    /// pod's original-destination map (an existing one is adopted: it may hold entries of
    /// connections waiting in a listener handed over by a predecessor).
    pub fn enroll(&self, cookie: u64, ips: &[IpAddr]) -> Result<PodOrig, Error> {
        let inner = {
            let mut outer = self.orig.lock().expect("orig map lock");
            match outer.get(&cookie, 0) {
                Ok(existing) => existing,
                Err(e) if absent(&e) => {
                    let obj = aya_obj::Map::new_from_params(
                        aya_obj::generated::bpf_map_type::BPF_MAP_TYPE_LRU_HASH as u32,
                        std::mem::size_of::<OrigDstKey>() as u32,
                        std::mem::size_of::<OrigDst>() as u32,
                        ORIG_DST_PER_POD,
                        0,
                    );
                    let inner = MapData::create(obj, "meshless_orig", None)
                        .map_err(|source| Error::Map { name: maps::ORIG_DST, source })?;
                    outer.insert(cookie, &inner, 0).map_err(|source| Error::Map { name: maps::ORIG_DST, source })?;
                    inner
                }
                Err(source) => return Err(Error::Map { name: maps::ORIG_DST, source }),
            }
        };
        let inner =
            HashMap::try_from(Map::LruHashMap(inner)).map_err(|source| Error::Map { name: maps::ORIG_DST, source })?;
        let mut pod = EnrolledPod { mode: mode::CAPTURE, ..Default::default() };
        for ip in ips {
            match ip {
                IpAddr::V4(v4) => pod.ipv4 = u32::from_ne_bytes(v4.octets()),
                IpAddr::V6(v6) => pod.ipv6 = words(v6),
            }
        }
        self.set(cookie, pod)?;
        Ok(PodOrig(Mutex::new(inner)))
    }

    /// Marks the netns `cookie` as a pod the agent knows and leaves alone.
    pub fn bypass(&self, cookie: u64) -> Result<(), Error> {
        self.drop_orig(cookie)?;
        self.set(cookie, EnrolledPod { mode: mode::BYPASS, ..Default::default() })
    }

    /// Forgets the netns `cookie`: its entry and its pending original destinations are removed
    /// (a pod that is gone; if it still runs, it is unknown again and cannot connect out).
    pub fn forget(&self, cookie: u64) -> Result<(), Error> {
        let removed = self.enrolled.lock().expect("enrolled map lock").remove(&cookie);
        match removed {
            Err(source) if !absent(&source) => return Err(Error::Map { name: maps::ENROLLED, source }),
            _ => {}
        }
        self.drop_orig(cookie)
    }

    /// Every netns cookie with pinned state (to find stale ones after a restart).
    pub fn cookies(&self) -> HashSet<u64> {
        let mut all: HashSet<u64> =
            self.enrolled.lock().expect("enrolled map lock").keys().filter_map(Result::ok).collect();
        all.extend(self.orig.lock().expect("orig map lock").keys().filter_map(Result::ok));
        all
    }

    fn set(&self, cookie: u64, pod: EnrolledPod) -> Result<(), Error> {
        self.enrolled
            .lock()
            .expect("enrolled map lock")
            .insert(cookie, pod, 0)
            .map_err(|source| Error::Map { name: maps::ENROLLED, source })
    }

    fn drop_orig(&self, cookie: u64) -> Result<(), Error> {
        match self.orig.lock().expect("orig map lock").remove(&cookie) {
            Err(source) if !absent(&source) => Err(Error::Map { name: maps::ORIG_DST, source }),
            _ => Ok(()),
        }
    }
}

impl PodOrig {
    /// The original destination of the connection accepted from `peer`; the entry is removed
    /// (each is read once).
    pub fn take(&self, peer: SocketAddr) -> Option<SocketAddr> {
        let key = orig_key(peer);
        let mut map = self.0.lock().expect("pod orig map lock");
        let orig = map.get(&key, 0).ok()?;
        let _ = map.remove(&key);
        Some(orig_to_addr(&orig))
    }
}

/// The key sock_ops files a connection under, from the peer address the agent accepted.
fn orig_key(peer: SocketAddr) -> OrigDstKey {
    match peer {
        SocketAddr::V4(v4) => {
            OrigDstKey { addr: [u32::from_ne_bytes(v4.ip().octets()), 0, 0, 0], port: v4.port(), family: AF_INET }
        }
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => {
                OrigDstKey { addr: [u32::from_ne_bytes(v4.octets()), 0, 0, 0], port: v6.port(), family: AF_INET }
            }
            None => OrigDstKey { addr: words(v6.ip()), port: v6.port(), family: AF_INET6 },
        },
    }
}

/// Whether a map error only says the key is not there.
fn absent(e: &aya::maps::MapError) -> bool {
    match e {
        aya::maps::MapError::KeyNotFound => true,
        aya::maps::MapError::SyscallError(s) => s.io_error.raw_os_error() == Some(libc::ENOENT),
        _ => false,
    }
}

fn pins(path: &Path, msg: String) -> Error {
    Error::Pins { path: path.into(), msg }
}

fn take(ebpf: &mut Ebpf, name: &'static str) -> Result<Map, Error> {
    ebpf.take_map(name).ok_or(Error::Missing(name))
}

/// Makes sure `bpf_dir` is on a BPF file system, mounting one at /sys/fs/bpf if the machine has
/// none there and `bpf_dir` is below it (as Cilium does).
fn ensure_bpffs(bpf_dir: &Path) -> Result<(), Error> {
    let on_bpffs = |p: &Path| nix::sys::statfs::statfs(p).map(|s| s.filesystem_type().0 == BPF_FS_MAGIC);
    let existing = bpf_dir.ancestors().find(|p| p.exists()).unwrap_or(Path::new("/"));
    if on_bpffs(existing).unwrap_or(false) {
        return Ok(());
    }
    if !bpf_dir.starts_with(DEFAULT_BPFFS) {
        return Err(pins(bpf_dir, "is not on a BPF file system; mount one (`mount -t bpf bpf /sys/fs/bpf`)".into()));
    }
    std::fs::create_dir_all(DEFAULT_BPFFS).map_err(|e| pins(Path::new(DEFAULT_BPFFS), e.to_string()))?;
    nix::mount::mount(Some("bpf"), DEFAULT_BPFFS, Some("bpf"), nix::mount::MsFlags::empty(), None::<&str>)
        .map_err(|e| pins(Path::new(DEFAULT_BPFFS), format!("mounting a BPF file system: {e}")))?;
    info!(path = DEFAULT_BPFFS, "mounted a BPF file system (the machine had none)");
    Ok(())
}

/// Records (first use) or checks (later uses) which cgroup the pin directory serves.
fn claim_for_cgroup(dir: &Path, cgroup: &Path, ino: u64) -> Result<(), Error> {
    let path = dir.join(CGROUP_MAP);
    let name = CGROUP_MAP;
    if path.exists() {
        let data = MapData::from_pin(&path).map_err(|source| Error::Map { name, source })?;
        let arr: Array<MapData, u64> =
            Array::try_from(Map::Array(data)).map_err(|source| Error::Map { name, source })?;
        let owner = arr.get(&0, 0).map_err(|source| Error::Map { name, source })?;
        if owner != ino {
            return Err(pins(
                dir,
                format!(
                    "belongs to another cgroup (inode {owner}), not {} (inode {ino}); give each node's agent its own --bpf-dir",
                    cgroup.display()
                ),
            ));
        }
        return Ok(());
    }
    let mut arr: Array<MapData, u64> = Array::create(1, 0).map_err(|source| Error::Map { name, source })?;
    arr.set(0, ino, 0).map_err(|source| Error::Map { name, source })?;
    arr.pin(&path).map_err(|e| pins(&path, e.to_string()))
}

/// Removes pin directories of other layout versions (unpinning their links detaches them).
fn remove_other_layouts(ours: &Path) -> usize {
    let Some(parent) = ours.parent() else { return 0 };
    let Ok(entries) = std::fs::read_dir(parent) else { return 0 };
    let mut removed = 0;
    for e in entries.flatten() {
        let p = e.path();
        let is_layout = p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with('v'));
        if is_layout && p != ours {
            match std::fs::remove_dir_all(&p) {
                Ok(()) => removed += 1,
                Err(e) => warn!(path = %p.display(), error = %e, "cannot remove a stale pin directory"),
            }
        }
    }
    removed
}

/// Removes everything meshless pinned under `bpf_dir`: the programs detach, the maps go.
/// Enrolled pods then connect directly again (`meshless uninstall`).
pub fn uninstall(bpf_dir: &Path) -> Result<bool, Error> {
    if !bpf_dir.exists() {
        return Ok(false);
    }
    std::fs::remove_dir_all(bpf_dir).map_err(|e| pins(bpf_dir, e.to_string()))?;
    Ok(true)
}

fn spawn_kernel_logger(logger: aya_log::EbpfLogger<&'static dyn log::Log>) {
    // SAFETY: the logger owns the ring buffer's fd and is moved into the AsyncFd, so the fd stays
    // open for as long as it is registered with the reactor.
    let registered = unsafe { tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) };
    let Ok(mut fd) = registered else {
        warn!("kernel program logging: cannot poll the log ring buffer");
        return;
    };
    tokio::spawn(async move {
        loop {
            let Ok(mut guard) = fd.readable_mut().await else {
                return;
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
}

fn words(v6: &Ipv6Addr) -> [u32; 4] {
    let o = v6.octets();
    std::array::from_fn(|i| u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]]))
}

/// Converts the kernel's record back to an address.
pub fn orig_to_addr(o: &OrigDst) -> SocketAddr {
    let ip = if o.family == AF_INET {
        IpAddr::V4(Ipv4Addr::from(o.addr[0].to_ne_bytes()))
    } else {
        let mut b = [0u8; 16];
        for (i, w) in o.addr.iter().enumerate() {
            b[4 * i..4 * i + 4].copy_from_slice(&w.to_ne_bytes());
        }
        IpAddr::V6(Ipv6Addr::from(b))
    };
    SocketAddr::new(ip, o.port)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_address_words_round_trip() {
        let v4: Ipv4Addr = "198.19.2.10".parse().unwrap();
        let o = OrigDst {
            addr: [u32::from_ne_bytes(v4.octets()), 0, 0, 0],
            port: 8080,
            family: AF_INET,
            ..Default::default()
        };
        assert_eq!(orig_to_addr(&o), "198.19.2.10:8080".parse().unwrap());
        let v6: Ipv6Addr = "fd6d:6c00:2::10".parse().unwrap();
        let o = OrigDst { addr: words(&v6), port: 80, family: AF_INET6, ..Default::default() };
        assert_eq!(orig_to_addr(&o), "[fd6d:6c00:2::10]:80".parse().unwrap());
    }

    #[test]
    fn the_agent_looks_up_a_connection_by_its_full_source() {
        let a = orig_key("198.19.1.11:40000".parse().unwrap());
        let b = orig_key("198.19.1.200:40000".parse().unwrap());
        assert_ne!(a, b, "two sources sharing a port are two keys");
        assert_eq!(a.addr[0], u32::from_ne_bytes([198, 19, 1, 11]), "network order, as the kernel writes it");
        assert_eq!((a.port, a.family), (40000, AF_INET));
        let v6 = orig_key("[fd6d:6c00:1::11]:40000".parse().unwrap());
        assert_eq!((v6.family, v6.addr), (AF_INET6, words(&"fd6d:6c00:1::11".parse().unwrap())));
        assert_eq!(orig_key("[::ffff:198.19.1.11]:40000".parse().unwrap()), a, "v4-mapped is the IPv4 source");
    }
}
