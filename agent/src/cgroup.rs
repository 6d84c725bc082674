//! Where processes are in the cgroup v2 hierarchy, as paths under the agent's mount of it.
//!
//! `/proc/<pid>/cgroup` names a process's cgroup relative to the *reader's* cgroup namespace
//! root. On a host that root is the hierarchy's root; in a container with its own cgroup
//! namespace (containerd's default on cgroup v2, so a DaemonSet's) it is the container's own
//! cgroup, and every other process shows as `/../../kubepods.slice/…`. [`Cgroups`] finds where
//! the agent's namespace root lies under its mount of the hierarchy (`/sys/fs/cgroup`, the host's
//! mounted in), so a pod's process resolves to the same path as the pod's cgroup found from its
//! UID, whatever namespace the agent runs in.

use std::io;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Component, Path, PathBuf};

/// The agent's view of the cgroup v2 hierarchy.
#[derive(Debug, Clone)]
pub struct Cgroups {
    /// The agent's cgroup namespace root, as a path under `mount`.
    ns_root: PathBuf,
    /// The agent's own cgroup, if it could be found under `mount`.
    own: Option<PathBuf>,
}

/// How many cgroups a search below the pods' cgroup looks at, at most.
const SEARCH_LIMIT: usize = 100_000;

impl Cgroups {
    /// Finds the mount holding `pods` (the pods' cgroup parent) and where the agent's cgroup
    /// namespace lies in it: the agent's cgroup as `/proc/self/cgroup` names it if that lists the
    /// agent, else the cgroup below `pods` that lists it (a namespace hides where it is).
    pub fn detect(pods: &Path) -> io::Result<Cgroups> {
        let mounts = std::fs::read_to_string("/proc/self/mounts")?;
        let mount = cgroup2_mounts(&mounts)
            .filter(|m| pods.starts_with(m))
            .max_by_key(|m| m.as_os_str().len())
            .or_else(|| cgroup2_mounts(&mounts).next())
            .ok_or_else(|| io::Error::other("no cgroup2 mount"))?;
        let rel = own_relative(&std::fs::read_to_string("/proc/self/cgroup")?)
            .ok_or_else(|| io::Error::other("/proc/self/cgroup has no cgroup v2 line"))?;
        let pid = std::process::id().to_string();
        let lists_us = |dir: &Path| {
            std::fs::read_to_string(dir.join("cgroup.procs")).is_ok_and(|p| p.lines().any(|l| l.trim() == pid))
        };
        let named = resolve(&mount, &rel);
        let own = match named.filter(|d| lists_us(d)) {
            Some(d) => Some(d),
            None => search(pods, &lists_us),
        };
        // The namespace root is the agent's cgroup less the part the namespace shows of it.
        let ns_root = match &own {
            Some(own) => {
                let shown = Path::new(&rel).components().filter(|c| matches!(c, Component::Normal(_))).count();
                own.ancestors().nth(shown).map(Path::to_path_buf).unwrap_or_else(|| mount.clone())
            }
            None => mount.clone(),
        };
        Ok(Cgroups { ns_root, own })
    }

    /// The cgroup of process `pid`, as a path under the mount; `None` if it cannot be read.
    pub fn of_pid(&self, pid: i32) -> Option<PathBuf> {
        let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
        resolve(&self.ns_root, &own_relative(&text)?)
    }

    /// The agent's own cgroup's inode (what `bpf_get_current_cgroup_id` returns for its
    /// sockets), if the agent is in the hierarchy the pods are.
    pub fn own_id(&self) -> io::Result<Option<u64>> {
        self.own.as_ref().map(|d| std::fs::metadata(d).map(|m| m.ino())).transpose()
    }
}

/// The cgroup v2 mount points in `/proc/self/mounts`.
fn cgroup2_mounts(mounts: &str) -> impl Iterator<Item = PathBuf> + '_ {
    mounts.lines().filter_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.len() > 2 && f[2] == "cgroup2").then(|| PathBuf::from(f[1]))
    })
}

/// The cgroup v2 path of a `/proc/<pid>/cgroup` text (`0::<path>`).
fn own_relative(text: &str) -> Option<String> {
    text.lines().find_map(|l| l.strip_prefix("0::")).map(|p| p.trim().to_owned())
}

/// `rel` (a path from `/proc/<pid>/cgroup`, maybe with `..` above the namespace root) under
/// `root`, lexically; `None` if it climbs above the mount's root or names a deleted cgroup.
fn resolve(root: &Path, rel: &str) -> Option<PathBuf> {
    if rel.ends_with(" (deleted)") {
        return None;
    }
    let mut out = root.to_path_buf();
    for c in Path::new(rel).components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::ParentDir => {
                if !out.pop() {
                    return None;
                }
            }
            Component::RootDir | Component::CurDir => {}
            Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

/// Breadth first below `top`, bounded: the first cgroup `wanted` accepts.
fn search(top: &Path, wanted: &dyn Fn(&Path) -> bool) -> Option<PathBuf> {
    let (mut level, mut seen) = (vec![top.to_path_buf()], 0usize);
    while !level.is_empty() && seen < SEARCH_LIMIT {
        let mut next = Vec::new();
        for d in level {
            seen += 1;
            if wanted(&d) {
                return Some(d);
            }
            let children = std::fs::read_dir(&d).into_iter().flatten().flatten();
            next.extend(children.filter(|e| e.file_type().is_ok_and(|t| t.is_dir())).map(|e| e.path()));
        }
        level = next;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_from_another_cgroup_namespace_resolve_under_the_mount() {
        let root = Path::new("/sys/fs/cgroup/kubepods.slice/agent-pod/agent");
        // Seen from the agent's namespace, a pod's process is above and beside it.
        assert_eq!(resolve(root, "/../../pod-b/app"), Some(PathBuf::from("/sys/fs/cgroup/kubepods.slice/pod-b/app")));
        assert_eq!(resolve(Path::new("/sys/fs/cgroup"), "/a/b"), Some(PathBuf::from("/sys/fs/cgroup/a/b")));
        assert_eq!(resolve(Path::new("/"), "/../.."), None, "above the hierarchy's root");
        assert_eq!(resolve(Path::new("/sys/fs/cgroup"), "/a (deleted)"), None);
        assert_eq!(own_relative("1:name=x:/\n0::/user.slice/s\n"), Some("/user.slice/s".into()));
    }
}
