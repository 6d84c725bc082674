//! Reads what the kernel programs filed in the agents' pinned maps, with bpf(2) directly (the
//! machine has no bpftool, and the tests need only "list the entries of one pinned map"): so a
//! test can assert the kernel state it is about rather than what a client loop counted.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

use anyhow::{Context, Result};
use meshless_common::{EnrolledPod, OrigDst, OrigDstKey, AF_INET, LAYOUT_VERSION};

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_MAP_GET_FD_BY_ID: libc::c_long = 14;
/// Bound on the entries read from one map (the largest pinned map holds 8192).
const MAX_KEYS: usize = 1 << 16;

/// `union bpf_attr`, as the zero-filled words the commands used here read their fields from.
type Attr = [u64; 16];

fn bpf(cmd: libc::c_long, attr: &mut Attr) -> io::Result<libc::c_long> {
    // SAFETY: bpf(2) reads (and for lookups writes through the pointers in) `attr`, a live,
    // zero-initialised buffer of the size passed; every pointer in it points to a live buffer of
    // the size the map's key or value needs.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), std::mem::size_of::<Attr>()) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn owned(fd: libc::c_long) -> OwnedFd {
    // SAFETY: bpf(2) just returned this new descriptor, which nothing else owns.
    unsafe { OwnedFd::from_raw_fd(fd as i32) }
}

/// Opens a pinned map.
fn pinned(path: &Path) -> Result<OwnedFd> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())?;
    let mut attr: Attr = [0; 16];
    attr[0] = c.as_ptr() as u64;
    Ok(owned(bpf(BPF_OBJ_GET, &mut attr).with_context(|| format!("opening pinned map {}", path.display()))?))
}

/// Every key of a map (bounded).
fn keys(map: &OwnedFd, key_size: usize) -> io::Result<Vec<Vec<u8>>> {
    let mut out: Vec<Vec<u8>> = Vec::new();
    while out.len() < MAX_KEYS {
        let mut next = vec![0u8; key_size];
        let mut attr: Attr = [0; 16];
        attr[0] = map.as_raw_fd() as u64;
        // No key: the first one.
        attr[1] = out.last().map_or(0, |k| k.as_ptr() as u64);
        attr[2] = next.as_mut_ptr() as u64;
        match bpf(BPF_MAP_GET_NEXT_KEY, &mut attr) {
            Ok(_) => out.push(next),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => break,
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

fn lookup(map: &OwnedFd, key: &[u8], value_size: usize) -> io::Result<Option<Vec<u8>>> {
    let mut value = vec![0u8; value_size];
    let mut attr: Attr = [0; 16];
    attr[0] = map.as_raw_fd() as u64;
    attr[1] = key.as_ptr() as u64;
    attr[2] = value.as_mut_ptr() as u64;
    match bpf(BPF_MAP_LOOKUP_ELEM, &mut attr) {
        Ok(_) => Ok(Some(value)),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

fn map_by_id(id: u32) -> io::Result<OwnedFd> {
    let mut attr: Attr = [0; 16];
    attr[0] = id as u64;
    bpf(BPF_MAP_GET_FD_BY_ID, &mut attr).map(owned)
}

fn read<T: Copy>(bytes: &[u8]) -> T {
    assert_eq!(bytes.len(), std::mem::size_of::<T>());
    // SAFETY: the length matches, and T is one of meshless_common's #[repr(C)] map types, made of
    // integers only, for which every bit pattern is valid.
    unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) }
}

fn addr(words: [u32; 4], family: u16, port: u16) -> SocketAddr {
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_ne_bytes()).collect();
    let ip: IpAddr = if family == AF_INET {
        Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]).into()
    } else {
        Ipv6Addr::from(<[u8; 16]>::try_from(bytes.as_slice()).expect("16 bytes")).into()
    };
    SocketAddr::new(ip, port)
}

/// One pending connection a pod's kernel program filed for the agent: its source (the key) and
/// the original destination the application dialed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    /// The pod's netns cookie: which pod's own map holds the entry.
    pub pod_map: u64,
    /// The IPv4 address of that pod, as the agent enrolled it (`ENROLLED`).
    pub pod: Option<Ipv4Addr>,
    pub src: SocketAddr,
    pub orig_dst: SocketAddr,
}

/// Every entry of every pod's original-destination map (the inner maps of `ORIG_DST`) pinned
/// under the agent's BPF directory `bpf_dir`: the connections captured and not yet accepted.
pub fn pending_connections(bpf_dir: &Path) -> Result<Vec<Pending>> {
    let maps = bpf_dir.join(format!("v{LAYOUT_VERSION}")).join("maps");
    let enrolled = pinned(&maps.join(meshless_common::maps::ENROLLED))?;
    let outer = pinned(&maps.join(meshless_common::maps::ORIG_DST))?;
    let mut out = Vec::new();
    for cookie in keys(&outer, 8).context("listing the pods of ORIG_DST")? {
        // From user space, a map-in-map lookup answers the inner map's id.
        let Some(id) = lookup(&outer, &cookie, 4)? else { continue }; // unenrolled meanwhile
        let inner = map_by_id(read::<u32>(&id)).context("opening a pod's ORIG_DST map")?;
        let pod_map = read::<u64>(&cookie);
        let pod = lookup(&enrolled, &cookie, std::mem::size_of::<EnrolledPod>())?
            .map(|v| read::<EnrolledPod>(&v).ipv4)
            .filter(|ip| *ip != 0)
            .map(|ip| Ipv4Addr::from(ip.to_ne_bytes()));
        for key in keys(&inner, std::mem::size_of::<OrigDstKey>())? {
            let Some(value) = lookup(&inner, &key, std::mem::size_of::<OrigDst>())? else { continue };
            let (k, v) = (read::<OrigDstKey>(&key), read::<OrigDst>(&value));
            out.push(Pending {
                pod_map,
                pod,
                src: addr(k.addr, k.family, k.port),
                orig_dst: addr(v.addr, v.family, v.port),
            });
        }
    }
    Ok(out)
}
