//! The pin directory under the BPF file system: where maps and links live across agent restarts
//! (`<bpf dir>/v<layout>/{maps,links,links/netns}`), which cgroup it serves, older layouts, and
//! `meshless uninstall`.

use std::path::{Path, PathBuf};

use aya::maps::{Array, Map, MapData};
use tracing::{info, warn};

use super::Error;

/// `statfs(2)` magic of the BPF file system.
const BPF_FS_MAGIC: i64 = 0xcafe4a11;
/// Where a BPF file system is mounted when the machine has none.
const DEFAULT_BPFFS: &str = "/sys/fs/bpf";
/// Name of the pinned array recording the cgroup (by inode number) a pin directory serves.
const CGROUP_MAP: &str = "CGROUP";

pub(super) fn pins(path: &Path, msg: String) -> Error {
    Error::Pins { path: path.into(), msg }
}

/// A name part that orders pins by who made them and when: `<pid>-<nanoseconds>`.
pub(super) fn stamp() -> String {
    format!(
        "{}-{}",
        std::process::id(),
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0)
    )
}

/// The pinned sk_lookup links of the netns `cookie`.
pub(super) fn netns_links(dir: &Path, cookie: u64) -> Vec<PathBuf> {
    let prefix = format!("{cookie}@");
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| e.file_name().to_str().is_some_and(|n| n.starts_with(&prefix)))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}

/// Makes sure `bpf_dir` is on a BPF file system, mounting one at /sys/fs/bpf if the machine has
/// none there and `bpf_dir` is below it (as Cilium does).
pub(super) fn ensure_bpffs(bpf_dir: &Path) -> Result<(), Error> {
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
pub(super) fn claim_for_cgroup(dir: &Path, cgroup: &Path, ino: u64) -> Result<(), Error> {
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
pub(super) fn remove_other_layouts(ours: &Path) -> usize {
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
