//! `meshless csi`: a CSI node plugin that gives pods the Workload API socket as an ephemeral
//! inline volume, so a pod reaches it without a hostPath (which needs privileges pod security
//! forbids, and exposes whatever path it names).
//!
//! The kubelet calls `NodePublishVolume` for a pod's volume of driver `csi.meshless.io`; the
//! plugin bind-mounts the Workload API socket's directory (never the socket file: the agent
//! re-creates the socket when it restarts, and a file mount would keep the old one) onto the
//! volume's target path, then remounts it read-only, nosuid, nodev, noexec. `NodeUnpublishVolume`
//! unmounts it and removes the directory it made (never recursively: a failed unmount must not
//! delete through the mount). What the volume exposes is that directory alone: the socket, whose
//! answers depend on the calling process (its own SVID only).
//!
//! It runs in a privileged container of the agent's DaemonSet pod (mount propagation back to the
//! host needs it; the agent itself stays unprivileged), registered with the kubelet by
//! `node-driver-registrar`. Only the kubelet's user may call it (root, checked on every
//! connection), and only target paths in the kubelet's pods directory (`--target-root`) of the
//! shape kubelet uses are accepted. The kubelet before 1.26 sends the socket's path as
//! `:authority`; the Workload API's HTTP/2 front (`workload_api::front`) serves here too.

use std::path::{Component, Path, PathBuf};

use tonic::{Request, Response, Status};
use tracing::{info, warn};

use crate::proto::csi::identity_server::{Identity, IdentityServer};
use crate::proto::csi::node_server::{Node, NodeServer};
use crate::proto::csi::{
    volume_capability, GetPluginCapabilitiesRequest, GetPluginCapabilitiesResponse, GetPluginInfoRequest,
    GetPluginInfoResponse, NodeGetCapabilitiesRequest, NodeGetCapabilitiesResponse, NodeGetInfoRequest,
    NodeGetInfoResponse, NodePublishVolumeRequest, NodePublishVolumeResponse, NodeUnpublishVolumeRequest,
    NodeUnpublishVolumeResponse, ProbeRequest, ProbeResponse,
};
use crate::workload_api::front;

/// The driver's name, as the CSIDriver object and pods' volumes name it.
pub const DRIVER: &str = "csi.meshless.io";

/// `meshless csi`: serve the CSI node plugin.
#[derive(clap::Args, Debug, Clone)]
pub struct CsiArgs {
    /// Where the kubelet (through node-driver-registrar) reaches the plugin.
    #[arg(long, env = "MESHLESS_CSI_SOCKET", default_value = "/var/lib/kubelet/plugins/csi.meshless.io/csi.sock")]
    pub socket: PathBuf,
    /// This node's name (the CSI node ID).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,
    /// The directory of the Workload API socket (the agent's `<run-dir>/workload-api`): what
    /// each volume shows.
    #[arg(long, env = "MESHLESS_WORKLOAD_API_DIR", default_value = "/run/meshless/workload-api")]
    pub workload_api_dir: PathBuf,
    /// The kubelet's pods directory: every target path lies below it.
    #[arg(long, env = "MESHLESS_CSI_TARGET_ROOT", default_value = "/var/lib/kubelet/pods")]
    pub target_root: PathBuf,
    #[arg(long, env = "MESHLESS_LOG_FORMAT", value_enum, default_value_t = crate::config::LogFormat::Text)]
    pub log_format: crate::config::LogFormat,
    #[arg(long, env = "MESHLESS_LOG", default_value = "info")]
    pub log: String,
}

#[derive(Clone)]
struct Plugin {
    node: String,
    source: PathBuf,
    root: PathBuf,
}

/// Serves the plugin on `args.socket` until the task is dropped.
pub fn serve(args: &CsiArgs) -> Result<(), crate::Error> {
    let err = |e| crate::Error::Io(format!("CSI socket {}", args.socket.display()), e);
    if !args.workload_api_dir.is_dir() {
        return Err(crate::Error::Io(
            format!("--workload-api-dir {}", args.workload_api_dir.display()),
            std::io::Error::other("not a directory (the agent creates it; mount the host's /run/meshless here)"),
        ));
    }
    if let Some(dir) = args.socket.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    let _ = std::fs::remove_file(&args.socket);
    let listener = tokio::net::UnixListener::bind(&args.socket).map_err(err)?;
    std::fs::set_permissions(&args.socket, std::os::unix::fs::PermissionsExt::from_mode(0o600)).map_err(err)?;
    let plugin =
        Plugin { node: args.node_name.clone(), source: args.workload_api_dir.clone(), root: args.target_root.clone() };
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<front::Fronted>>(4);
    tokio::spawn(front::accept(listener, tx, "CSI", MAX_CONNECTIONS, kubelets));
    tokio::spawn(async move {
        if let Err(e) = tonic::transport::Server::builder()
            .add_service(IdentityServer::new(plugin.clone()))
            .add_service(NodeServer::new(plugin))
            .serve_with_incoming(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
        {
            warn!(error = %e, "the CSI plugin stopped");
        }
    });
    info!(socket = %args.socket.display(), driver = DRIVER, "CSI node plugin serving");
    Ok(())
}

/// Connections at once (the kubelet and the registrar use one or two).
const MAX_CONNECTIONS: usize = 16;

/// Only the kubelet's user (root, or the plugin's own) may call the plugin.
fn kubelets(stream: &tokio::net::UnixStream) -> bool {
    // SAFETY: geteuid(2) has no arguments and cannot fail.
    let ours = unsafe { libc::geteuid() };
    match stream.peer_cred() {
        Ok(c) if c.uid() == 0 || c.uid() == ours => true,
        other => {
            warn!(peer = ?other.map(|c| c.uid()).ok(), "CSI: a caller that is not the kubelet's user; closing");
            false
        }
    }
}

#[tonic::async_trait]
impl Identity for Plugin {
    async fn get_plugin_info(
        &self,
        _: Request<GetPluginInfoRequest>,
    ) -> Result<Response<GetPluginInfoResponse>, Status> {
        Ok(Response::new(GetPluginInfoResponse {
            name: DRIVER.into(),
            vendor_version: env!("CARGO_PKG_VERSION").into(),
            manifest: Default::default(),
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _: Request<GetPluginCapabilitiesRequest>,
    ) -> Result<Response<GetPluginCapabilitiesResponse>, Status> {
        // A node plugin alone: no controller service, no topology.
        Ok(Response::new(GetPluginCapabilitiesResponse { capabilities: vec![] }))
    }

    async fn probe(&self, _: Request<ProbeRequest>) -> Result<Response<ProbeResponse>, Status> {
        Ok(Response::new(ProbeResponse { ready: Some(self.source.is_dir()) }))
    }
}

#[tonic::async_trait]
impl Node for Plugin {
    async fn node_publish_volume(
        &self,
        request: Request<NodePublishVolumeRequest>,
    ) -> Result<Response<NodePublishVolumeResponse>, Status> {
        let req = request.into_inner();
        let target = self.check_publish(&req).map_err(|why| {
            warn!(volume = %req.volume_id, target = %req.target_path, why, "CSI: publish refused");
            Status::invalid_argument(why)
        })?;
        let (source, t) = (self.source.clone(), target.clone());
        tokio::task::spawn_blocking(move || publish(&source, &t))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| {
            warn!(volume = %req.volume_id, target = %target.display(), error = %e, "CSI: publish failed");
            Status::internal(format!("mounting the Workload API at {}: {e}", target.display()))
        })?;
        let pod = req.volume_context.get("csi.storage.k8s.io/pod.name").cloned().unwrap_or_default();
        info!(volume = %req.volume_id, pod, target = %target.display(), "CSI: Workload API volume published");
        Ok(Response::new(NodePublishVolumeResponse {}))
    }

    async fn node_unpublish_volume(
        &self,
        request: Request<NodeUnpublishVolumeRequest>,
    ) -> Result<Response<NodeUnpublishVolumeResponse>, Status> {
        let req = request.into_inner();
        let target = self.check_target(&req.target_path).map_err(Status::invalid_argument)?;
        let t = target.clone();
        tokio::task::spawn_blocking(move || unpublish(&t))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| Status::internal(format!("unmounting {}: {e}", target.display())))?;
        info!(volume = %req.volume_id, target = %target.display(), "CSI: Workload API volume unpublished");
        Ok(Response::new(NodeUnpublishVolumeResponse {}))
    }

    async fn node_get_capabilities(
        &self,
        _: Request<NodeGetCapabilitiesRequest>,
    ) -> Result<Response<NodeGetCapabilitiesResponse>, Status> {
        // No staging, no stats: the kubelet calls publish and unpublish only.
        Ok(Response::new(NodeGetCapabilitiesResponse { capabilities: vec![] }))
    }

    async fn node_get_info(&self, _: Request<NodeGetInfoRequest>) -> Result<Response<NodeGetInfoResponse>, Status> {
        Ok(Response::new(NodeGetInfoResponse {
            node_id: self.node.clone(),
            max_volumes_per_node: 0,
            accessible_topology: None,
        }))
    }
}

impl Plugin {
    /// A publish request is for an ephemeral inline volume, read-only, a plain mount, at a
    /// target path of the kubelet's shape whose pod UID is the one the kubelet names.
    fn check_publish(&self, req: &NodePublishVolumeRequest) -> Result<PathBuf, String> {
        if req.volume_context.get("csi.storage.k8s.io/ephemeral").map(String::as_str) != Some("true") {
            return Err("only ephemeral inline volumes are served (csi.storage.k8s.io/ephemeral: true; the CSIDriver \
                        object sets podInfoOnMount)"
                .into());
        }
        if !req.readonly {
            return Err("the volume must be readOnly: true".into());
        }
        let capability = req.volume_capability.as_ref().ok_or("no volume capability")?;
        match &capability.access_type {
            Some(volume_capability::AccessType::Mount(m)) if m.fs_type.is_empty() && m.mount_flags.is_empty() => {}
            Some(volume_capability::AccessType::Mount(_)) => return Err("no fsType or mount flags may be set".into()),
            _ => return Err("only a mount volume is served (not a block device)".into()),
        }
        let target = self.check_target(&req.target_path)?;
        if let Some(uid) = req.volume_context.get("csi.storage.k8s.io/pod.uid") {
            if pod_uid(&self.root, &target) != Some(uid.as_str()) {
                return Err(format!("the target path is not pod {uid}'s"));
            }
        }
        Ok(target)
    }

    /// `<root>/<pod uid>/volumes/kubernetes.io~csi/<volume>/mount`, with no `.`, `..` or
    /// symbolic link on the way.
    fn check_target(&self, target: &str) -> Result<PathBuf, String> {
        let path = Path::new(target);
        if !path.is_absolute() || path.components().any(|c| matches!(c, Component::ParentDir | Component::CurDir)) {
            return Err(format!("{target}: not an absolute, normal path"));
        }
        let rest = path.strip_prefix(&self.root).map_err(|_| format!("{target}: not below {}", self.root.display()))?;
        let parts: Vec<_> = rest.components().collect();
        let shaped = parts.len() == 5
            && parts[1].as_os_str() == "volumes"
            && parts[2].as_os_str() == "kubernetes.io~csi"
            && parts[4].as_os_str() == "mount";
        if !shaped {
            return Err(format!("{target}: not <pods>/<uid>/volumes/kubernetes.io~csi/<volume>/mount"));
        }
        // Each directory on the way is a real directory (a pod cannot point the mount elsewhere).
        let mut at = self.root.clone();
        for part in &parts[..4] {
            at.push(part);
            match std::fs::symlink_metadata(&at) {
                Ok(m) if m.file_type().is_dir() => {}
                Ok(_) => return Err(format!("{}: not a directory", at.display())),
                // Unpublishing what is gone already is fine; publishing needs the parent.
                Err(_) => {}
            }
        }
        Ok(path.to_path_buf())
    }
}

/// The pod UID in a checked target path.
fn pod_uid<'a>(root: &Path, target: &'a Path) -> Option<&'a str> {
    target.strip_prefix(root).ok()?.components().next()?.as_os_str().to_str()
}

/// Bind-mounts `source` on `target` read-only (creating `target`, not its parents); already
/// mounted there: nothing to do.
fn publish(source: &Path, target: &Path) -> std::io::Result<()> {
    use nix::mount::{mount, umount2, MntFlags, MsFlags};
    use std::os::unix::fs::DirBuilderExt as _;
    let parent = target.parent().ok_or_else(|| std::io::Error::other("no parent"))?;
    if !std::fs::symlink_metadata(parent)?.is_dir() {
        return Err(std::io::Error::other(format!("{} is not a directory", parent.display())));
    }
    match std::fs::DirBuilder::new().mode(0o750).create(target) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            if !std::fs::symlink_metadata(target)?.is_dir() {
                return Err(std::io::Error::other("the target exists and is not a directory"));
            }
            if is_mount_point(target)? {
                return Ok(());
            }
        }
        Err(e) => return Err(e),
    }
    mount(Some(source), target, None::<&str>, MsFlags::MS_BIND, None::<&str>).map_err(std::io::Error::from)?;
    let ro = MsFlags::MS_BIND
        | MsFlags::MS_REMOUNT
        | MsFlags::MS_RDONLY
        | MsFlags::MS_NOSUID
        | MsFlags::MS_NODEV
        | MsFlags::MS_NOEXEC;
    if let Err(e) = mount(None::<&str>, target, None::<&str>, ro, None::<&str>) {
        // Never leave a writable bind behind.
        let _ = umount2(target, MntFlags::MNT_DETACH);
        return Err(e.into());
    }
    Ok(())
}

/// Unmounts `target` if mounted and removes the directory (not what is in it).
fn unpublish(target: &Path) -> std::io::Result<()> {
    use nix::mount::{umount2, MntFlags};
    if !target.exists() {
        return Ok(());
    }
    while is_mount_point(target)? {
        umount2(target, MntFlags::empty()).map_err(std::io::Error::from)?;
    }
    match std::fs::remove_dir(target) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Whether `path` is a mount point (its device differs from its parent's, or the mount table
/// lists it: a bind mount from the same filesystem keeps the device).
fn is_mount_point(path: &Path) -> std::io::Result<bool> {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo")?;
    let wanted = path.to_string_lossy();
    Ok(mounts.lines().any(|l| l.split(' ').nth(4).is_some_and(|m| unescape(m) == wanted)))
}

/// Mount points in mountinfo escape space, tab, newline and backslash as octal.
fn unescape(s: &str) -> String {
    s.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::csi::identity_client::IdentityClient;
    use crate::proto::csi::node_client::NodeClient;
    use crate::proto::csi::volume_capability::{AccessType, MountVolume};
    use crate::proto::csi::VolumeCapability;

    /// Mounts need root; under CI=true their absence fails the test.
    fn root() -> bool {
        // SAFETY: geteuid(2) has no arguments and cannot fail.
        let root = unsafe { libc::geteuid() } == 0;
        if !root {
            assert_ne!(
                std::env::var("CI").as_deref(),
                Ok("true"),
                "the CSI mount test needs root (CI=true: it must run)"
            );
            eprintln!("skipping the CSI mount test: not root");
        }
        root
    }

    async fn channel(socket: PathBuf) -> tonic::transport::Channel {
        tonic::transport::Endpoint::from_static("http://localhost")
            .connect_with_connector(tower::service_fn(move |_| {
                let socket = socket.clone();
                async move { tokio::net::UnixStream::connect(socket).await.map(hyper_util::rt::TokioIo::new) }
            }))
            .await
            .unwrap()
    }

    /// Unmounts what the test mounted, also when it fails.
    struct Cleanup(PathBuf);

    impl Drop for Cleanup {
        fn drop(&mut self) {
            let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
            let prefix = self.0.to_string_lossy().to_string();
            for m in mountinfo.lines().filter_map(|l| l.split(' ').nth(4)).filter(|m| m.starts_with(&prefix)) {
                let _ = nix::mount::umount2(Path::new(m), nix::mount::MntFlags::MNT_DETACH);
            }
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[tokio::test]
    async fn the_kubelet_publishes_a_read_only_workload_api_volume_and_bad_requests_are_refused() {
        if !root() {
            return;
        }
        let dir = std::env::temp_dir().join(format!("meshless-csi-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let _cleanup = Cleanup(dir.clone());
        let (source, pods) = (dir.join("workload-api"), dir.join("pods"));
        std::fs::create_dir_all(&source).unwrap();
        let wl = tokio::net::UnixListener::bind(source.join("workload.sock")).unwrap();
        let volume = pods.join("uid-1/volumes/kubernetes.io~csi/spiffe");
        std::fs::create_dir_all(&volume).unwrap();
        let args = CsiArgs {
            socket: dir.join("plugins/csi.sock"),
            node_name: "node-1".into(),
            workload_api_dir: source.clone(),
            target_root: pods.clone(),
            log_format: crate::config::LogFormat::Text,
            log: "info".into(),
        };
        serve(&args).unwrap();
        let ch = channel(args.socket.clone()).await;
        let (mut identity, mut node) = (IdentityClient::new(ch.clone()), NodeClient::new(ch));
        let info = identity.get_plugin_info(GetPluginInfoRequest {}).await.unwrap().into_inner();
        assert_eq!(info.name, DRIVER);
        assert_eq!(identity.probe(ProbeRequest {}).await.unwrap().into_inner().ready, Some(true));
        assert_eq!(node.node_get_info(NodeGetInfoRequest {}).await.unwrap().into_inner().node_id, "node-1");
        let caps = node.node_get_capabilities(NodeGetCapabilitiesRequest {}).await.unwrap().into_inner();
        assert!(caps.capabilities.is_empty(), "no staging: the kubelet publishes directly");

        // What the kubelet sends for `csi: {driver: csi.meshless.io, readOnly: true}`.
        let target = volume.join("mount");
        let request = |target: &Path| NodePublishVolumeRequest {
            volume_id: "csi-0123".into(),
            target_path: target.to_string_lossy().into(),
            volume_capability: Some(VolumeCapability {
                access_type: Some(AccessType::Mount(MountVolume::default())),
                access_mode: None,
            }),
            readonly: true,
            volume_context: [
                ("csi.storage.k8s.io/ephemeral", "true"),
                ("csi.storage.k8s.io/pod.uid", "uid-1"),
                ("csi.storage.k8s.io/pod.name", "web-1"),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
            ..Default::default()
        };
        for _ in 0..2 {
            // Twice: the kubelet repeats a publish; one mount only.
            node.node_publish_volume(request(&target)).await.unwrap();
        }
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let ours: Vec<_> = mounts.lines().filter(|l| l.split(' ').nth(4) == target.to_str()).collect();
        assert_eq!(ours.len(), 1, "{ours:?}");
        let options = ours[0].split(' ').nth(5).unwrap();
        for o in ["ro", "nosuid", "nodev", "noexec"] {
            assert!(options.split(',').any(|x| x == o), "{o} missing: {options}");
        }
        // The socket is reachable through the volume; nothing can be written there.
        let connected = tokio::net::UnixStream::connect(target.join("workload.sock"));
        let (client, accepted) = tokio::join!(connected, wl.accept());
        assert!(client.is_ok() && accepted.is_ok());
        let write = std::fs::write(target.join("planted"), b"x").unwrap_err();
        assert_eq!(write.raw_os_error(), Some(libc::EROFS), "{write}");

        // Refused: not ephemeral, writable, a block device, another pod's UID, paths elsewhere.
        let refused = |r: NodePublishVolumeRequest| {
            let mut node = node.clone();
            async move { node.node_publish_volume(r).await.unwrap_err() }
        };
        let mut r = request(&target);
        r.volume_context.remove("csi.storage.k8s.io/ephemeral");
        assert!(refused(r).await.message().contains("ephemeral"));
        let mut r = request(&target);
        r.readonly = false;
        assert!(refused(r).await.message().contains("readOnly"));
        let mut r = request(&target);
        r.volume_capability.as_mut().unwrap().access_type = Some(AccessType::Block(Default::default()));
        assert!(refused(r).await.message().contains("block"));
        let mut r = request(&target);
        r.volume_context.insert("csi.storage.k8s.io/pod.uid".into(), "uid-2".into());
        assert!(refused(r).await.message().contains("not pod uid-2's"));
        for elsewhere in [
            dir.join("elsewhere/mount"),
            pods.join("uid-1/volumes/kubernetes.io~csi/spiffe/../../../../../etc/mount"),
            pods.join("uid-1/volumes/other/spiffe/mount"),
        ] {
            let e = refused(request(&elsewhere)).await;
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{}: {e:?}", elsewhere.display());
        }
        // A symbolic link on the way is refused.
        std::fs::create_dir_all(pods.join("uid-3/volumes")).unwrap();
        std::os::unix::fs::symlink(&dir, pods.join("uid-3/volumes/kubernetes.io~csi")).unwrap();
        let mut r = request(&pods.join("uid-3/volumes/kubernetes.io~csi/x/mount"));
        r.volume_context.insert("csi.storage.k8s.io/pod.uid".into(), "uid-3".into());
        assert!(refused(r).await.message().contains("not a directory"));

        // Unpublished: unmounted and the directory gone, the source untouched; again is fine.
        let unpublish =
            NodeUnpublishVolumeRequest { volume_id: "csi-0123".into(), target_path: target.to_string_lossy().into() };
        node.node_unpublish_volume(unpublish.clone()).await.unwrap();
        node.node_unpublish_volume(unpublish).await.unwrap();
        assert!(!target.exists());
        assert!(source.join("workload.sock").exists(), "the Workload API's directory is never touched");
    }
}
