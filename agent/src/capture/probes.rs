//! Health probes: which cgroup's connections to pods are the kubelet's probes
//! (`--probe-cgroup none|auto|<path>`), and the check that it does not hold the pods.

use std::path::{Path, PathBuf};

use tracing::{info, warn};

use super::Error;

/// Resolves `--probe-cgroup`: `none`, `auto` (the kubelet's cgroup, see [`pick_kubelet`]), or a
/// path. `pods` is the cgroup holding the node's pods.
pub fn probe_cgroup(spec: &str, pods: &Path) -> Result<Option<PathBuf>, Error> {
    match spec {
        "none" | "" => Ok(None),
        "auto" => {
            let found = cgroup2_mount().and_then(|mount| pick_kubelet(&kubelet_candidates(&mount), pods));
            match &found {
                Some(p) => {
                    info!(cgroup = %p.display(), "health probes: the kubelet's cgroup is exempt from inbound capture")
                }
                None => {
                    info!("health probes: no kubelet process found; no connection is exempt (--probe-cgroup sets one)")
                }
            }
            Ok(found)
        }
        path => Ok(Some(PathBuf::from(path))),
    }
}

/// A process named `kubelet`, as /proc describes it.
#[derive(Debug, Clone)]
struct Candidate {
    pid: u32,
    /// Real user ID.
    uid: Option<u32>,
    /// The executable's file name (`/proc/<pid>/exe`).
    exe: Option<String>,
    cgroup: PathBuf,
}

/// Every process named `kubelet`.
fn kubelet_candidates(mount: &Path) -> Vec<Candidate> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .flatten()
        .filter_map(|e| {
            let pid = e.file_name().to_str()?.parse::<u32>().ok()?;
            let comm = std::fs::read_to_string(e.path().join("comm")).ok()?;
            if comm.trim_end() != "kubelet" {
                return None;
            }
            let status = std::fs::read_to_string(e.path().join("status")).unwrap_or_default();
            let uid = status
                .lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok());
            let exe = std::fs::read_link(e.path().join("exe"))
                .ok()
                .and_then(|p| p.file_name().and_then(|n| n.to_str()).map(str::to_string));
            let cgroups = std::fs::read_to_string(e.path().join("cgroup")).ok()?;
            let rel = cgroups.lines().find_map(|l| l.strip_prefix("0::"))?;
            Some(Candidate { pid, uid, exe, cgroup: mount.join(rel.trim_start_matches('/')) })
        })
        .collect()
}

/// The kubelet among processes named `kubelet`: run by root, from an executable named
/// `kubelet`, in a cgroup that neither holds nor sits inside the pods' (a copied binary in a user
/// session, or one in a pod, is skipped, not trusted — nor made the agent's reason to fail); the
/// one in a systemd unit `kubelet.service` preferred.
fn pick_kubelet(candidates: &[Candidate], pods: &Path) -> Option<PathBuf> {
    let fits = |c: &&Candidate| {
        let ok = c.uid == Some(0)
            && c.exe.as_deref() == Some("kubelet")
            && !c.cgroup.starts_with(pods)
            && !pods.starts_with(&c.cgroup);
        if !ok {
            warn!(pid = c.pid, uid = ?c.uid, exe = ?c.exe, cgroup = %c.cgroup.display(),
                "health probes: a process named kubelet that is not the node's kubelet; skipped");
        }
        ok
    };
    let fitting: Vec<&Candidate> = candidates.iter().filter(fits).collect();
    let unit = fitting.iter().find(|c| c.cgroup.file_name().is_some_and(|n| n == "kubelet.service"));
    unit.or(fitting.first()).map(|c| c.cgroup.clone())
}

fn cgroup2_mount() -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|l| {
        let (pre, post) = l.split_once(" - ")?;
        let point = pre.split_whitespace().nth(4)?;
        (post.split_whitespace().next() == Some("cgroup2")).then(|| PathBuf::from(point))
    })
}

/// The probe cgroup must not hold the pods: their connections would pass as probes.
pub(super) fn check_probe_cgroup(probes: &Path, pods: &Path) -> Result<(), Error> {
    let bad = |msg: &str| Error::Cgroup { path: probes.into(), source: std::io::Error::other(msg.to_string()) };
    let meta = std::fs::metadata(probes).map_err(|source| Error::Cgroup { path: probes.into(), source })?;
    if !meta.is_dir() || !probes.join("cgroup.procs").exists() {
        return Err(bad("the probe cgroup is not a cgroup2 directory"));
    }
    let (probes, pods) = (probes.canonicalize().unwrap_or(probes.into()), pods.canonicalize().unwrap_or(pods.into()));
    if pods.starts_with(&probes) || probes.starts_with(&pods) {
        return Err(bad(&format!(
            "the probe cgroup and the pods' cgroup {} contain one another; the probe cgroup must hold only the kubelet",
            pods.display()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn candidate(pid: u32, uid: u32, exe: &str, cgroup: &str) -> Candidate {
        Candidate { pid, uid: Some(uid), exe: Some(exe.into()), cgroup: cgroup.into() }
    }

    #[test]
    fn only_the_node_s_kubelet_is_trusted_with_the_probes() {
        let pods = Path::new("/sys/fs/cgroup/kubepods.slice");
        let user_copy = candidate(10, 1000, "kubelet", "/sys/fs/cgroup/user.slice/user-1000.slice/session-3.scope");
        let in_a_pod = candidate(11, 0, "kubelet", "/sys/fs/cgroup/kubepods.slice/kubepods-pod1.slice/cri-x.scope");
        let renamed = candidate(12, 0, "sh", "/sys/fs/cgroup/system.slice/evil.service");
        let holds_pods = candidate(13, 0, "kubelet", "/sys/fs/cgroup");
        let plain = candidate(14, 0, "kubelet", "/sys/fs/cgroup/system.slice/other.scope");
        let unit = candidate(15, 0, "kubelet", "/sys/fs/cgroup/system.slice/kubelet.service");
        let all = [user_copy.clone(), in_a_pod.clone(), renamed.clone(), holds_pods.clone()];
        assert_eq!(pick_kubelet(&all, pods), None, "no candidate is the kubelet: none is trusted");
        let with_plain = [all.to_vec(), vec![plain.clone()]].concat();
        assert_eq!(pick_kubelet(&with_plain, pods), Some(plain.cgroup.clone()));
        let with_unit = [vec![plain], all.to_vec(), vec![unit.clone()]].concat();
        assert_eq!(pick_kubelet(&with_unit, pods), Some(unit.cgroup), "the kubelet.service unit is preferred");
    }
}
