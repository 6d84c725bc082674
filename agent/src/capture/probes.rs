//! Health probes: which cgroup's connections to pods are the kubelet's probes
//! (`--probe-cgroup none|auto|<path>`), and the check that it does not hold the pods.

use std::path::{Path, PathBuf};

use tracing::info;

use super::Error;

/// Resolves `--probe-cgroup`: `none`, `auto` (the cgroup of a running process named `kubelet`),
/// or a path.
pub fn probe_cgroup(spec: &str) -> Result<Option<PathBuf>, Error> {
    match spec {
        "none" | "" => Ok(None),
        "auto" => {
            let found = kubelet_cgroup();
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

/// The cgroup2 directory of the first process named `kubelet`.
fn kubelet_cgroup() -> Option<PathBuf> {
    let mount = cgroup2_mount()?;
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        e.file_name().to_str()?.parse::<u32>().ok()?;
        let comm = std::fs::read_to_string(e.path().join("comm")).ok()?;
        if comm.trim_end() != "kubelet" {
            return None;
        }
        let cgroups = std::fs::read_to_string(e.path().join("cgroup")).ok()?;
        let rel = cgroups.lines().find_map(|l| l.strip_prefix("0::"))?;
        Some(mount.join(rel.trim_start_matches('/')))
    })
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
