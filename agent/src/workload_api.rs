//! The SPIFFE Workload API, served on a unix socket (`--workload-api-socket`): an application in a
//! local pod fetches its own X.509-SVID (certificate chain and key) and the trust bundles, and
//! gets a new message whenever either changes. The caller is identified by the kernel, never by
//! what it says: the process that connected (bound at accept, [`front::Caller`]) must still be
//! running at each call, and its cgroup names its pod (the pod whose cgroup contains it). A
//! process outside every enrolled pod gets PermissionDenied, and a pod only ever gets its own
//! SVID. Any gRPC client can call it: the [`front`] accepts the socket path as `:authority`.
//! Connections and streams are bounded. JWT-SVIDs are not served (Unimplemented).

mod front;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;

use tokio_stream::Stream;
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use crate::identity::verify::Trust;
use crate::local::{LocalPod, LocalPods};
use crate::proto::workload::spiffe_workload_api_server::{SpiffeWorkloadApi, SpiffeWorkloadApiServer};
use crate::proto::workload::{
    JwtBundlesRequest, JwtBundlesResponse, JwtsvidRequest, JwtsvidResponse, ValidateJwtsvidRequest,
    ValidateJwtsvidResponse, X509BundlesRequest, X509BundlesResponse, X509svid, X509svidRequest, X509svidResponse,
};

/// The header every Workload API call must carry (so a browser or a confused proxy cannot call it).
const SECURITY_HEADER: &str = "workload.spiffe.io";

struct Api {
    pods: LocalPods,
    trust: Arc<Trust>,
    cgroup_root: PathBuf,
}

type Streamed<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

impl Api {
    /// The enrolled pod the caller of `request` runs in.
    fn caller<T>(&self, request: &Request<T>) -> Result<Arc<LocalPod>, Status> {
        if request.metadata().get(SECURITY_HEADER).and_then(|v| v.to_str().ok()) != Some("true") {
            return Err(Status::invalid_argument(format!("missing the {SECURITY_HEADER}: true header")));
        }
        let caller = request
            .extensions()
            .get::<front::Caller>()
            .ok_or_else(|| Status::permission_denied("the caller's process is unknown"))?;
        let pid = caller.pid;
        let gone = || {
            warn!(pid, "Workload API: the process that opened the connection has exited");
            Status::permission_denied(
                "the process that opened this connection has exited; its pid may name another process now",
            )
        };
        // Alive before and after reading its cgroup: the pid named that process throughout.
        if !caller.alive() {
            return Err(gone());
        }
        let cgroup = cgroup_of(pid, &self.cgroup_root)
            .ok_or_else(|| Status::permission_denied(format!("cannot read the cgroup of pid {pid}")))?;
        if !caller.alive() {
            return Err(gone());
        }
        let pods = self.pods.load();
        let pod = pods
            .iter()
            .filter(|p| p.workload().cgroup.as_ref().is_some_and(|c| cgroup.starts_with(c)))
            .max_by_key(|p| p.workload().cgroup.as_ref().map(|c| c.as_os_str().len()))
            .cloned();
        pod.ok_or_else(|| {
            warn!(pid, cgroup = %cgroup.display(), "Workload API: the caller is not in an enrolled pod");
            Status::permission_denied("the caller is not in a pod of this node's mesh")
        })
    }
}

/// Certificates as the Workload API carries them: DER, concatenated.
fn der_concat(certs: &[rustls::pki_types::CertificateDer<'_>]) -> Vec<u8> {
    certs.iter().flat_map(|c| c.iter().copied()).collect()
}

fn bundles(trust: &Trust) -> X509BundlesResponse {
    X509BundlesResponse {
        crl: vec![],
        bundles: trust.all().into_iter().map(|(td, r)| (td.id_string(), der_concat(&r))).collect(),
    }
}

/// The absolute cgroup path of `pid` (cgroup v2), read from the agent's cgroup namespace.
fn cgroup_of(pid: i32, root: &Path) -> Option<PathBuf> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let rel = text.lines().find_map(|l| l.strip_prefix("0::"))?;
    Some(root.join(rel.trim_start_matches('/')))
}

fn x509_response(pod: &LocalPod, trust: &Trust) -> Option<X509svidResponse> {
    let issued = pod.tls.cert.issued()?;
    let td = pod.tls.id.trust_domain().clone();
    let bundle = der_concat(&trust.roots(&td));
    let svid = X509svid {
        spiffe_id: pod.tls.id.to_string(),
        x509_svid: der_concat(&issued.svid.chain),
        x509_svid_key: issued.svid.key_der().to_vec(),
        bundle,
        hint: String::new(),
    };
    Some(X509svidResponse { svids: vec![svid], crl: vec![], federated_bundles: HashMap::new() })
}

#[tonic::async_trait]
impl SpiffeWorkloadApi for Api {
    type FetchX509SVIDStream = Streamed<X509svidResponse>;

    async fn fetch_x509svid(
        &self,
        request: Request<X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        let pod = self.caller(&request)?;
        info!(pod = %pod.key, id = %pod.tls.id, "Workload API: X.509-SVID requested");
        let (trust, mut certs, mut roots) = (self.trust.clone(), pod.tls.cert.subscribe(), self.trust.subscribe());
        let stream = async_stream::stream! {
            loop {
                // Sent when there is a valid certificate; an expired one sends nothing until renewed.
                if let Some(r) = x509_response(&pod, &trust) {
                    yield Ok(r);
                }
                tokio::select! {
                    c = certs.changed() => if c.is_err() { return },
                    r = roots.changed() => if r.is_err() { return },
                }
            }
        };
        Ok(Response::new(Box::pin(stream)))
    }

    type FetchX509BundlesStream = Streamed<X509BundlesResponse>;

    async fn fetch_x509_bundles(
        &self,
        request: Request<X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        self.caller(&request)?;
        let (trust, mut roots) = (self.trust.clone(), self.trust.subscribe());
        let stream = async_stream::stream! {
            loop {
                yield Ok(bundles(&trust));
                if roots.changed().await.is_err() {
                    return;
                }
            }
        };
        Ok(Response::new(Box::pin(stream)))
    }

    async fn fetch_jwtsvid(&self, _request: Request<JwtsvidRequest>) -> Result<Response<JwtsvidResponse>, Status> {
        Err(Status::unimplemented("meshless serves X.509-SVIDs only"))
    }

    type FetchJWTBundlesStream = Streamed<JwtBundlesResponse>;

    async fn fetch_jwt_bundles(
        &self,
        _request: Request<JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        Err(Status::unimplemented("meshless serves X.509-SVIDs only"))
    }

    async fn validate_jwtsvid(
        &self,
        _request: Request<ValidateJwtsvidRequest>,
    ) -> Result<Response<ValidateJwtsvidResponse>, Status> {
        Err(Status::unimplemented("meshless serves X.509-SVIDs only"))
    }
}

/// `<run dir>/workload-api/workload.sock`: alone in its directory, which pods mount (never the
/// run directory, whose control sockets are the agent's alone).
pub fn default_socket(run_dir: &Path) -> PathBuf {
    run_dir.join("workload-api").join("workload.sock")
}

/// Serves the Workload API on `socket` (replacing a stale socket file) until the task is dropped.
pub fn serve(socket: &Path, pods: LocalPods, trust: Arc<Trust>) -> Result<(), crate::Error> {
    let err = |e| crate::Error::Io(format!("Workload API socket {}", socket.display()), e);
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
        // Anyone may reach the socket; what a caller gets is decided per caller.
        std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o755)).map_err(err)?;
    }
    let _ = std::fs::remove_file(socket);
    let listener = tokio::net::UnixListener::bind(socket).map_err(err)?;
    // Any local process may connect; who it is decides what it gets.
    std::fs::set_permissions(socket, std::os::unix::fs::PermissionsExt::from_mode(0o666)).map_err(err)?;
    let cgroup_root = cgroup2_root().unwrap_or_else(|| PathBuf::from("/sys/fs/cgroup"));
    let api = Api { pods, trust, cgroup_root };
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<front::Fronted>>(16);
    tokio::spawn(accept(listener, tx));
    tokio::spawn(async move {
        if let Err(e) = tonic::transport::Server::builder()
            .max_concurrent_streams(Some(MAX_STREAMS))
            .concurrency_limit_per_connection(MAX_STREAMS as usize)
            .add_service(SpiffeWorkloadApiServer::new(api))
            .serve_with_incoming(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
        {
            warn!(error = %e, "the Workload API stopped");
        }
    });
    info!(socket = %socket.display(), "Workload API serving");
    Ok(())
}

/// Connections open at once on the socket; more are closed at accept (logged once per burst).
const MAX_CONNECTIONS: usize = 1024;
/// Streams at once on one connection.
const MAX_STREAMS: u32 = 16;

/// Accepts connections, names their caller and fronts them (see [`front`]), within
/// [`MAX_CONNECTIONS`].
async fn accept(listener: tokio::net::UnixListener, tx: tokio::sync::mpsc::Sender<std::io::Result<front::Fronted>>) {
    let open = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let mut refusing = false;
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                warn!(error = %e, "Workload API: accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = open.clone().try_acquire_owned() else {
            if !std::mem::replace(&mut refusing, true) {
                warn!(limit = MAX_CONNECTIONS, "Workload API: too many connections; closing new ones");
            }
            continue;
        };
        refusing = false;
        let Some(caller) = front::Caller::of(&stream) else {
            warn!("Workload API: the kernel does not name the connecting process; closing");
            continue;
        };
        let fronted = front::front(stream, caller, permit);
        if tx.send(Ok(fronted)).await.is_err() {
            return;
        }
    }
}

/// Where the cgroup v2 hierarchy is mounted.
fn cgroup2_root() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    mounts.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.len() > 2 && f[2] == "cgroup2").then(|| PathBuf::from(f[1]))
    })
}
