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
//!
//! Inbound, each enrolled pod's netns gets the `sk_lookup` program (its link pinned under
//! `links/netns/<cookie>@…`), the pod's addresses and mode in `INBOUND`, and its 15006 listener in
//! `INBOUND_LISTENERS`. The listener leaves that map when its socket closes, so with no agent a
//! STRICT pod drops plaintext and a PERMISSIVE one passes it. Health probes are announced by a
//! `sock_ops` program on the probe cgroup (the kubelet's), pinned like the others.
//!
//! Parts: this file (load, attach, the per-pod maps), [`pins`] (the pin directory: bpffs, the
//! cgroup claim, layouts, uninstall), [`probes`] (the probe cgroup). The pod lifecycle reaches
//! all of it through [`crate::kernel::Kernel`].

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

use aya::maps::{Array, HashMap, HashOfMaps, Map, MapData, SockHash};
use aya::programs::links::FdLink;
use aya::programs::{CgroupAttachMode, CgroupSockAddr, SkLookup, SockOps};
use aya::{Ebpf, EbpfLoader};
use meshless_common::PortMode;
use meshless_common::{
    maps, mode, programs, EnrolledPod, InboundPod, OrigDst, OrigDstKey, PodAddr, AF_INET, AF_INET6, AGENT_SLOTS,
    LAYOUT_VERSION, MAX_PORT_MODES, MAX_PROBE_PORTS, ORIG_DST_PER_POD,
};
use parking_lot::Mutex;
use tracing::{info, warn};

use crate::policy::Mode;

mod pins;
mod probes;

pub use pins::uninstall;
use pins::{claim_for_cgroup, ensure_bpffs, netns_links, pins, remove_other_layouts, stamp};
use probes::check_probe_cgroup;
pub use probes::probe_cgroup;

/// A pod's mode as the kernel's `INBOUND` map holds it.
// The policy engine gives a pod at most as many per-port modes as the kernel keeps.
const _: () = assert!(crate::policy::MAX_PORT_MODES == MAX_PORT_MODES);

/// What the agent writes into a pod's `INBOUND` entries besides its mode.
#[derive(Clone, Copy, Default)]
struct Extras {
    probe_ports: [u16; MAX_PROBE_PORTS],
    port_modes: [PortMode; MAX_PORT_MODES],
}

fn kernel_mode(mode: Mode) -> u32 {
    match mode {
        Mode::Strict => meshless_common::inbound::STRICT,
        Mode::Permissive => meshless_common::inbound::PERMISSIVE,
        Mode::Disable => meshless_common::inbound::DISABLE,
    }
}

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
    #[error("{0} per-port modes: the kernel keeps at most {MAX_PORT_MODES} per pod")]
    PortModes(usize),
    #[error("BPF pin directory {path}: {msg}")]
    Pins { path: PathBuf, msg: String },
    #[error("this agent binary was built with AYA_BUILD_SKIP=1 and carries no eBPF programs")]
    NoObject,
}

/// The embedded kernel programs (built by build.rs).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/meshless-ebpf"));

pub struct Capture {
    /// `<bpf dir>/v<LAYOUT_VERSION>`.
    dir: PathBuf,
    cgroup_path: PathBuf,
    /// The kubelet's cgroup, whose connections to pods are health probes.
    probe_cgroup: Option<PathBuf>,
    ebpf: Mutex<Ebpf>,
    enrolled: Mutex<HashMap<MapData, u64, EnrolledPod>>,
    orig: Mutex<HashOfMaps<MapData, u64, MapData>>,
    inbound: Mutex<HashMap<MapData, PodAddr, InboundPod>>,
    listeners: Mutex<SockHash<MapData, u64>>,
    /// Each pod's declared probe ports, as written into its `INBOUND` entries.
    /// Each pod's declared probe ports and per-port modes, as written into its `INBOUND`
    /// entries (kept across mode changes).
    extras: Mutex<std::collections::HashMap<u64, Extras>>,
}

/// Writes this agent's cgroup id into `AGENTS` (over the older of the two slots, keeping a
/// predecessor's during a hand-over), so its own marked sockets are told from a pod's.
fn register_agent(ebpf: &mut Ebpf, id: u64) -> Result<(), Error> {
    let name = maps::AGENTS;
    let map = ebpf.map_mut(name).ok_or(Error::Missing(name))?;
    let mut agents: Array<&mut MapData, u64> = Array::try_from(map).map_err(|source| Error::Map { name, source })?;
    let get = |a: &Array<&mut MapData, u64>, i: u32| a.get(&i, 0).unwrap_or(0);
    if (0..AGENT_SLOTS).any(|i| get(&agents, i) == id) {
        return Ok(());
    }
    let next = get(&agents, AGENT_SLOTS) as u32 % AGENT_SLOTS;
    agents.set(next, id, 0).map_err(|source| Error::Map { name, source })?;
    agents.set(AGENT_SLOTS, u64::from((next + 1) % AGENT_SLOTS), 0).map_err(|source| Error::Map { name, source })?;
    info!(cgroup_id = id, slot = next, "the agent's cgroup is registered with the kernel programs");
    Ok(())
}

/// A pod's own original-destination map, read by the agent after `accept()`. (`None`: a pod
/// without capture, which a fake kernel in tests hands out.)
pub struct PodOrig(Option<Mutex<HashMap<MapData, OrigDstKey, OrigDst>>>);

impl Capture {
    /// Opens (or creates) the pinned maps under `bpf_dir` for the cgroup `cgroup_parent`, and
    /// loads the programs without attaching them yet ([`Capture::attach`] does).
    pub fn load(
        bpf_dir: &Path,
        cgroup_parent: &Path,
        cgroups: &crate::cgroup::Cgroups,
        probe_cgroup: Option<&Path>,
        kernel_log: bool,
    ) -> Result<Capture, Error> {
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
        if let Some(probes) = probe_cgroup {
            check_probe_cgroup(probes, cgroup_parent)?;
        }
        ensure_bpffs(bpf_dir)?;
        let dir = bpf_dir.join(format!("v{LAYOUT_VERSION}"));
        for sub in ["maps", "links", "links/netns"] {
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
        let inbound = HashMap::try_from(take(&mut ebpf, maps::INBOUND)?)
            .map_err(|source| Error::Map { name: maps::INBOUND, source })?;
        let listeners = SockHash::try_from(take(&mut ebpf, maps::INBOUND_LISTENERS)?)
            .map_err(|source| Error::Map { name: maps::INBOUND_LISTENERS, source })?;
        // The agent's own cgroup (found below the pods' one when a cgroup namespace hides it).
        let own = cgroups.own_id().map_err(|source| Error::Cgroup { path: cgroup_parent.into(), source })?;
        match own {
            Some(id) => register_agent(&mut ebpf, id)?,
            None => info!("the agent runs outside the pods' cgroup: the kernel programs never see its sockets"),
        }
        // Loaded now: pods are enrolled (and their netns attached) before `attach`.
        let name = programs::SK_LOOKUP;
        let prog: &mut SkLookup = ebpf
            .program_mut(name)
            .ok_or(Error::Missing(name))?
            .try_into()
            .map_err(|source| Error::Program { name, source })?;
        prog.load().map_err(|source| Error::Program { name, source })?;
        Ok(Capture {
            dir,
            cgroup_path: cgroup_parent.into(),
            probe_cgroup: probe_cgroup.map(Path::to_path_buf),
            ebpf: Mutex::new(ebpf),
            enrolled: Mutex::new(enrolled),
            orig: Mutex::new(orig),
            inbound: Mutex::new(inbound),
            extras: Mutex::default(),
            listeners: Mutex::new(listeners),
        })
    }

    /// Attaches every program to the pods' cgroup and pins the links, then unpins the links pinned
    /// before (a predecessor's, or a crash's leftovers) and removes older layout versions. The
    /// programs of both overlap for a moment; they are idempotent, so nothing is seen twice.
    pub fn attach(&self) -> Result<(), Error> {
        let mut ebpf = self.ebpf.lock();
        let links = self.dir.join("links");
        let earlier: Vec<PathBuf> = std::fs::read_dir(&links)
            .map_err(|e| pins(&links, e.to_string()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| !p.is_dir())
            .collect();
        let cgroup = std::fs::File::open(&self.cgroup_path)
            .map_err(|source| Error::Cgroup { path: self.cgroup_path.clone(), source })?;
        let stamp = stamp();
        let pin = |name: &'static str, link: FdLink| -> Result<(), Error> {
            let path = links.join(format!("{name}@{stamp}"));
            // The pin keeps the link (and so the attachment) alive; our handle closes on drop.
            link.pin(&path).map(drop).map_err(|e| pins(&path, e.to_string()))
        };
        // Load, attach with bpf_link and pin one cgroup program (`$ty`: its aya type). On kernels
        // ≥ 5.7 aya attaches through bpf_link, which takes no attach flags and coexists with other
        // programs on the same hook (a CNI's); `Single` passes flag 0.
        macro_rules! attach_cgroup {
            ($ty:ty, $name:expr, $cgroup:expr) => {{
                let name: &'static str = $name;
                let prog: &mut $ty = ebpf
                    .program_mut(name)
                    .ok_or(Error::Missing(name))?
                    .try_into()
                    .map_err(|source| Error::Program { name, source })?;
                prog.load().map_err(|source| Error::Program { name, source })?;
                let id =
                    prog.attach($cgroup, CgroupAttachMode::Single).map_err(|source| Error::Program { name, source })?;
                let link = prog.take_link(id).map_err(|source| Error::Program { name, source })?;
                pin(name, FdLink::try_from(link).map_err(|e| pins(&links, format!("{name}: {e}")))?)?;
            }};
        }
        for name in [
            programs::CONNECT4,
            programs::CONNECT6,
            programs::GETPEERNAME4,
            programs::GETPEERNAME6,
            programs::BIND4,
            programs::BIND6,
        ] {
            attach_cgroup!(CgroupSockAddr, name, &cgroup);
        }
        attach_cgroup!(SockOps, programs::SOCK_OPS, &cgroup);
        if let Some(path) = &self.probe_cgroup {
            let probes = std::fs::File::open(path).map_err(|source| Error::Cgroup { path: path.clone(), source })?;
            attach_cgroup!(SockOps, programs::PROBE_SOCK_OPS, &probes);
        }

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
            probe_cgroup = ?self.probe_cgroup,
            "eBPF capture attached (connect4/6, getpeername4/6, bind4/6, sock_ops; sk_lookup per pod)"
        );
        Ok(())
    }

    /// Steers the inbound plaintext of the pod whose netns is `netns` (cookie `cookie`, addresses
    /// `ips`) to `listener` (its [::]:15006), as `mode` says: the listener goes into the socket
    /// map, the addresses into `INBOUND`, and the sk_lookup program is attached to the netns (its
    /// link pinned, replacing the link of an earlier agent, so there is no gap).
    pub fn steer(
        &self,
        cookie: u64,
        netns: &impl AsFd,
        ips: &[IpAddr],
        mode: Mode,
        listener: &impl AsRawFd,
    ) -> Result<(), Error> {
        let name = maps::INBOUND_LISTENERS;
        self.listeners.lock().insert(cookie, listener.as_raw_fd(), 0).map_err(|source| Error::Map { name, source })?;
        self.apply_mode(cookie, netns, ips, mode)
    }

    /// Holds the inbound of a pod the agent cannot serve (no certificate, a port taken) as the
    /// kernel does while no agent runs: its mode in `INBOUND`, the sk_lookup program attached,
    /// and no listener, so STRICT drops plaintext and PERMISSIVE passes it to the app. A failure
    /// never lifts steering.
    pub fn guard(&self, cookie: u64, netns: &impl AsFd, ips: &[IpAddr], mode: Mode) -> Result<(), Error> {
        self.remove_listener(cookie)?;
        self.apply_mode(cookie, netns, ips, mode)
    }

    /// Writes the pod's mode on its addresses and attaches the sk_lookup program to its netns —
    /// or, for DISABLE, takes the program off (nothing of the pod's inbound is captured). With
    /// the program attached, a connection to an address of the netns that meshless does not
    /// know (IPv6 link-local, a secondary or SLAAC address) is dropped, not passed.
    pub fn apply_mode(&self, cookie: u64, netns: &impl AsFd, ips: &[IpAddr], mode: Mode) -> Result<(), Error> {
        self.set_mode(cookie, ips, mode)?;
        let disabled = meshless_common::inbound::DISABLE as u16;
        let ports_disabled = self
            .extras
            .lock()
            .get(&cookie)
            .is_none_or(|e| e.port_modes.iter().all(|p| p.port == 0 || p.mode == disabled));
        if mode == Mode::Disable && ports_disabled {
            self.unpin_lookup(cookie);
            return Ok(());
        }
        self.attach_lookup(cookie, netns)
    }

    /// Attaches the sk_lookup program to the netns `cookie` and pins the link, then unpins the
    /// links pinned for it before (so there is no moment without one).
    fn attach_lookup(&self, cookie: u64, netns: &impl AsFd) -> Result<(), Error> {
        let dir = self.dir.join("links/netns");
        let earlier = netns_links(&dir, cookie);
        let name = programs::SK_LOOKUP;
        let mut ebpf = self.ebpf.lock();
        let prog: &mut SkLookup = ebpf
            .program_mut(name)
            .ok_or(Error::Missing(name))?
            .try_into()
            .map_err(|source| Error::Program { name, source })?;
        let id = prog.attach(netns.as_fd()).map_err(|source| Error::Program { name, source })?;
        let link = prog.take_link(id).map_err(|source| Error::Program { name, source })?;
        let path = dir.join(format!("{cookie}@{}", stamp()));
        FdLink::from(link).pin(&path).map(drop).map_err(|e| pins(&path, e.to_string()))?;
        for old in earlier {
            let _ = std::fs::remove_file(old);
        }
        Ok(())
    }

    /// The ports the pod `cookie` declares for its kubelet probes (the first
    /// [`MAX_PROBE_PORTS`]): only connections the probe cgroup opens to one of them pass its
    /// inbound program. Written into the pod's `INBOUND` entries now and at every mode change.
    pub fn set_probe_ports(&self, cookie: u64, ports: &[u16]) -> Result<(), Error> {
        let mut fixed = [0u16; MAX_PROBE_PORTS];
        for (slot, port) in fixed.iter_mut().zip(ports) {
            *slot = *port;
        }
        self.set_extras(cookie, |e| e.probe_ports = fixed)
    }

    /// The ports of pod `cookie` whose mode is not the pod's (`portLevelMtls`; at most
    /// [`MAX_PORT_MODES`], the policy engine makes sure): written into its `INBOUND` entries now
    /// and at every mode change.
    pub fn set_port_modes(&self, cookie: u64, modes: &[(u16, Mode)]) -> Result<(), Error> {
        if modes.len() > MAX_PORT_MODES {
            return Err(Error::PortModes(modes.len()));
        }
        let mut fixed = [PortMode::default(); MAX_PORT_MODES];
        for (slot, (port, mode)) in fixed.iter_mut().zip(modes) {
            *slot = PortMode { port: *port, mode: kernel_mode(*mode) as u16 };
        }
        self.set_extras(cookie, |e| e.port_modes = fixed)
    }

    fn set_extras(&self, cookie: u64, change: impl FnOnce(&mut Extras)) -> Result<(), Error> {
        let extras = {
            let mut all = self.extras.lock();
            let e = all.entry(cookie).or_default();
            change(e);
            *e
        };
        let name = maps::INBOUND;
        let mut map = self.inbound.lock();
        let mine: Vec<(PodAddr, InboundPod)> =
            map.iter().filter_map(Result::ok).filter(|(_, v)| v.cookie == cookie).collect();
        for (key, value) in mine {
            let value = InboundPod { probe_ports: extras.probe_ports, port_modes: extras.port_modes, ..value };
            map.insert(key, value, 0).map_err(|source| Error::Map { name, source })?;
        }
        Ok(())
    }

    /// Sets the inbound mode of the pod `cookie` on every one of its addresses (and forgets
    /// addresses it no longer has). Applies to the next connection the kernel looks up.
    fn set_mode(&self, cookie: u64, ips: &[IpAddr], mode: Mode) -> Result<(), Error> {
        let name = maps::INBOUND;
        let mode = kernel_mode(mode);
        let mut map = self.inbound.lock();
        let wanted: Vec<PodAddr> = ips.iter().map(|ip| pod_addr(*ip)).collect();
        let stale: Vec<PodAddr> = map
            .iter()
            .filter_map(Result::ok)
            .filter(|(k, v)| v.cookie == cookie && !wanted.contains(k))
            .map(|(k, _)| k)
            .collect();
        let Extras { probe_ports, port_modes } = self.extras.lock().get(&cookie).copied().unwrap_or_default();
        for key in wanted {
            map.insert(key, InboundPod { cookie, mode, _pad: 0, probe_ports, port_modes }, 0)
                .map_err(|source| Error::Map { name, source })?;
        }
        for key in stale {
            let _ = map.remove(&key);
        }
        Ok(())
    }

    /// Starts capturing the outbound TCP of the pod whose netns has `cookie`, and returns the
    /// pod's original-destination map (an existing one is adopted: it may hold entries of
    /// connections waiting in a listener handed over by a predecessor).
    pub fn enroll(&self, cookie: u64, ips: &[IpAddr]) -> Result<PodOrig, Error> {
        let inner = {
            let mut outer = self.orig.lock();
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
        Ok(PodOrig(Some(Mutex::new(inner))))
    }

    /// Marks the netns `cookie` as a pod the agent knows and leaves alone.
    pub fn bypass(&self, cookie: u64) -> Result<(), Error> {
        self.drop_orig(cookie)?;
        self.unsteer(cookie)?;
        self.set(cookie, EnrolledPod { mode: mode::BYPASS, ..Default::default() })
    }

    /// Forgets the netns `cookie`: its entry and its pending original destinations are removed
    /// (a pod that is gone; if it still runs, it is unknown again and cannot connect out).
    pub fn forget(&self, cookie: u64) -> Result<(), Error> {
        let removed = self.enrolled.lock().remove(&cookie);
        match removed {
            Err(source) if !absent(&source) => return Err(Error::Map { name: maps::ENROLLED, source }),
            _ => {}
        }
        self.unsteer(cookie)?;
        self.extras.lock().remove(&cookie);
        self.drop_orig(cookie)
    }

    /// Takes the pod `cookie`'s inbound out of the kernel: its sk_lookup link, its addresses and
    /// its listener. Its plaintext then reaches the app directly (a pod leaving the mesh).
    pub fn unsteer(&self, cookie: u64) -> Result<(), Error> {
        self.unpin_lookup(cookie);
        self.set_mode_none(cookie)?;
        self.remove_listener(cookie)
    }

    /// Unpins the netns `cookie`'s sk_lookup links: the program leaves that netns.
    fn unpin_lookup(&self, cookie: u64) {
        for link in netns_links(&self.dir.join("links/netns"), cookie) {
            let _ = std::fs::remove_file(link);
        }
    }

    /// Takes the pod `cookie`'s plaintext listener out of the socket map (absent is fine).
    fn remove_listener(&self, cookie: u64) -> Result<(), Error> {
        match self.listeners.lock().remove(&cookie) {
            Err(source) if !absent(&source) => Err(Error::Map { name: maps::INBOUND_LISTENERS, source }),
            _ => Ok(()),
        }
    }

    fn set_mode_none(&self, cookie: u64) -> Result<(), Error> {
        let mut map = self.inbound.lock();
        let ours: Vec<PodAddr> =
            map.iter().filter_map(Result::ok).filter(|(_, v)| v.cookie == cookie).map(|(k, _)| k).collect();
        for key in ours {
            match map.remove(&key) {
                Err(source) if !absent(&source) => return Err(Error::Map { name: maps::INBOUND, source }),
                _ => {}
            }
        }
        Ok(())
    }

    /// Every netns cookie with pinned state (to find stale ones after a restart).
    pub fn cookies(&self) -> HashSet<u64> {
        let mut all: HashSet<u64> = self.enrolled.lock().keys().filter_map(Result::ok).collect();
        all.extend(self.orig.lock().keys().filter_map(Result::ok));
        all.extend(self.inbound.lock().iter().filter_map(Result::ok).map(|(_, v)| v.cookie));
        if let Ok(entries) = std::fs::read_dir(self.dir.join("links/netns")) {
            all.extend(entries.flatten().filter_map(|e| {
                e.file_name().to_str().and_then(|n| n.split('@').next()).and_then(|c| c.parse::<u64>().ok())
            }));
        }
        all
    }

    fn set(&self, cookie: u64, pod: EnrolledPod) -> Result<(), Error> {
        self.enrolled.lock().insert(cookie, pod, 0).map_err(|source| Error::Map { name: maps::ENROLLED, source })
    }

    fn drop_orig(&self, cookie: u64) -> Result<(), Error> {
        match self.orig.lock().remove(&cookie) {
            Err(source) if !absent(&source) => Err(Error::Map { name: maps::ORIG_DST, source }),
            _ => Ok(()),
        }
    }
}

impl PodOrig {
    /// A map that holds nothing (a fake kernel's).
    #[cfg(test)]
    pub fn none() -> PodOrig {
        PodOrig(None)
    }

    /// The original destination of the connection accepted from `peer`; the entry is removed
    /// (each is read once).
    pub fn take(&self, peer: SocketAddr) -> Option<SocketAddr> {
        let key = orig_key(peer);
        let mut map = self.0.as_ref()?.lock();
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

fn pod_addr(ip: IpAddr) -> PodAddr {
    match crate::workloads::canonical(ip) {
        IpAddr::V4(v4) => PodAddr { addr: [u32::from_ne_bytes(v4.octets()), 0, 0, 0], family: AF_INET.into() },
        IpAddr::V6(v6) => PodAddr { addr: words(&v6), family: AF_INET6.into() },
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

fn take(ebpf: &mut Ebpf, name: &'static str) -> Result<Map, Error> {
    ebpf.take_map(name).ok_or(Error::Missing(name))
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
