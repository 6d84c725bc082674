//! Capture: loads the kernel programs, attaches them to the node's pod cgroup, enrolls pods by
//! netns cookie, and hands the agent the original destination of each captured connection.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use aya::maps::{HashMap, MapData};
use aya::programs::{CgroupAttachMode, CgroupSockAddr, SockOps};
use aya::{Ebpf, EbpfLoader};
use meshless_common::{maps, mode, programs, EnrolledPod, OrigDst, OrigDstKey, AF_INET, AF_INET6};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("loading the eBPF object: {0} (is the kernel ≥ 5.15 with BPF enabled, and are we root?)")]
    Load(#[from] aya::EbpfError),
    #[error("eBPF program {name}: {source}")]
    Program { name: &'static str, source: aya::programs::ProgramError },
    #[error("eBPF map {name}: {source}")]
    Map { name: &'static str, source: aya::maps::MapError },
    #[error("eBPF object has no map or program {0}: the agent and its embedded object disagree")]
    Missing(&'static str),
    #[error("cgroup {path}: {source} (it must be a directory in a cgroup2 mount)")]
    Cgroup { path: PathBuf, source: std::io::Error },
    #[error("this agent binary was built with AYA_BUILD_SKIP=1 and carries no eBPF programs")]
    NoObject,
}

/// The embedded kernel programs (built by build.rs).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/meshless-ebpf"));

pub struct Capture {
    /// Keeps programs and their cgroup links alive; dropping it detaches them.
    _ebpf: Ebpf,
    enrolled: Mutex<HashMap<MapData, u64, EnrolledPod>>,
    orig: Mutex<HashMap<MapData, OrigDstKey, OrigDst>>,
}

impl Capture {
    /// Loads the programs and attaches them to `cgroup_parent`, the cgroup holding the node's pods.
    pub fn attach(cgroup_parent: &Path, kernel_log: bool) -> Result<Capture, Error> {
        if OBJECT.is_empty() {
            return Err(Error::NoObject);
        }
        let cgroup = std::fs::File::open(cgroup_parent)
            .map_err(|source| Error::Cgroup { path: cgroup_parent.into(), source })?;
        // aya-log levels: 0 silences every log statement in the kernel programs (the default);
        // 5 (trace) lets them all through to the agent's tracing output.
        let level: u8 = if kernel_log { 5 } else { 0 };
        let mut ebpf = EbpfLoader::new().override_global(aya_log::LEVEL, &level, true).load(OBJECT)?;
        if kernel_log {
            match aya_log::EbpfLogger::init(&mut ebpf) {
                Ok(logger) => spawn_kernel_logger(logger),
                Err(e) => tracing::warn!(error = %e, "kernel program logging unavailable"),
            }
        }
        for name in [programs::CONNECT4, programs::CONNECT6, programs::GETPEERNAME4, programs::GETPEERNAME6] {
            let prog: &mut CgroupSockAddr = ebpf
                .program_mut(name)
                .ok_or(Error::Missing(name))?
                .try_into()
                .map_err(|source| Error::Program { name, source })?;
            prog.load().map_err(|source| Error::Program { name, source })?;
            // On kernels ≥ 5.7 aya attaches through bpf_link, which takes no attach flags and
            // coexists with other programs on the same hook (a CNI's); `Single` passes flag 0.
            prog.attach(&cgroup, CgroupAttachMode::Single).map_err(|source| Error::Program { name, source })?;
        }
        let name = programs::SOCK_OPS;
        let prog: &mut SockOps = ebpf
            .program_mut(name)
            .ok_or(Error::Missing(name))?
            .try_into()
            .map_err(|source| Error::Program { name, source })?;
        prog.load().map_err(|source| Error::Program { name, source })?;
        prog.attach(&cgroup, CgroupAttachMode::Single).map_err(|source| Error::Program { name, source })?;

        let enrolled = take_map(&mut ebpf, maps::ENROLLED)?;
        let orig = take_map(&mut ebpf, maps::ORIG_DST)?;
        tracing::info!(cgroup = %cgroup_parent.display(), "eBPF capture attached (connect4/6, getpeername4/6, sock_ops)");
        Ok(Capture { _ebpf: ebpf, enrolled: Mutex::new(enrolled), orig: Mutex::new(orig) })
    }

    /// Starts capturing the outbound TCP of the pod whose netns has `cookie`.
    pub fn enroll(&self, cookie: u64, ips: &[IpAddr]) -> Result<(), Error> {
        let mut pod = EnrolledPod { mode: mode::CAPTURE, ..Default::default() };
        for ip in ips {
            match ip {
                IpAddr::V4(v4) => pod.ipv4 = u32::from_ne_bytes(v4.octets()),
                IpAddr::V6(v6) => pod.ipv6 = words(v6),
            }
        }
        self.enrolled
            .lock()
            .expect("enrolled map lock")
            .insert(cookie, pod, 0)
            .map_err(|source| Error::Map { name: maps::ENROLLED, source })
    }

    /// The original destination of the connection accepted from `peer` on a listener in the pod
    /// netns `cookie`; the entry is removed (each is read once).
    pub fn take_orig_dst(&self, cookie: u64, peer: SocketAddr) -> Option<SocketAddr> {
        let family = if peer.is_ipv4() || is_v4_mapped(peer.ip()) { AF_INET } else { AF_INET6 };
        let key = OrigDstKey { netns_cookie: cookie, src_port: peer.port(), family, _pad: 0 };
        let mut map = self.orig.lock().expect("orig map lock");
        let orig = map.get(&key, 0).ok()?;
        let _ = map.remove(&key);
        Some(orig_to_addr(&orig))
    }
}

fn take_map<K: aya::Pod, V: aya::Pod>(ebpf: &mut Ebpf, name: &'static str) -> Result<HashMap<MapData, K, V>, Error> {
    let map = ebpf.take_map(name).ok_or(Error::Missing(name))?;
    HashMap::try_from(map).map_err(|source| Error::Map { name, source })
}

fn spawn_kernel_logger(logger: aya_log::EbpfLogger<&'static dyn log::Log>) {
    // SAFETY: the logger owns the ring buffer's fd and is moved into the AsyncFd, so the fd stays
    // open for as long as it is registered with the reactor.
    let registered = unsafe { tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) };
    let Ok(mut fd) = registered else {
        tracing::warn!("kernel program logging: cannot poll the log ring buffer");
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

fn is_v4_mapped(ip: IpAddr) -> bool {
    matches!(ip, IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some())
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
}
