//! The SPIFFE Workload API, served on a unix socket (`--workload-api-socket`): an application in a
//! local pod fetches its own X.509-SVID (certificate chain and key) and the trust bundles, and
//! gets a new message whenever either changes. The caller is identified by the kernel, never by
//! what it says: the process that connected (bound at accept, [`front::Caller`]) must still be
//! running at each call, and its cgroup names its pod (the pod whose cgroup contains it). A
//! process outside every enrolled pod gets PermissionDenied, and a pod only ever gets its own
//! SVID. Any gRPC client can call it: the [`front`] accepts the socket path as `:authority`.
//! Connections and streams are bounded. JWT-SVIDs too: signed by the issuer for the calling pod's
//! identity and the audiences it asks for, their bundles streamed, and tokens validated.

pub(crate) mod front;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;

use tokio_stream::Stream;
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use crate::cgroup::Cgroups;
use crate::identity::jwt;
use crate::identity::store::Identities;
use crate::identity::verify::Trust;
use crate::local::{LocalPod, LocalPods};
use crate::proto::workload::spiffe_workload_api_server::{SpiffeWorkloadApi, SpiffeWorkloadApiServer};
use crate::proto::workload::{
    JwtBundlesRequest, JwtBundlesResponse, Jwtsvid, JwtsvidRequest, JwtsvidResponse, ValidateJwtsvidRequest,
    ValidateJwtsvidResponse, X509BundlesRequest, X509BundlesResponse, X509svid, X509svidRequest, X509svidResponse,
};

/// The header every Workload API call must carry (so a browser or a confused proxy cannot call it).
const SECURITY_HEADER: &str = "workload.spiffe.io";

struct Api {
    pods: LocalPods,
    trust: Arc<Trust>,
    /// Signs JWT-SVIDs (through the node's certificate source).
    identities: Arc<Identities>,
    cgroups: Cgroups,
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
        let cgroup = (self.cgroups.of_pid(pid))
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

    async fn fetch_jwtsvid(&self, request: Request<JwtsvidRequest>) -> Result<Response<JwtsvidResponse>, Status> {
        let pod = self.caller(&request)?;
        let req = request.into_inner();
        if req.audience.is_empty() || req.audience.len() > jwt::MAX_AUDIENCES {
            return Err(Status::invalid_argument(format!("give 1 to {} audiences", jwt::MAX_AUDIENCES)));
        }
        if req.audience.iter().any(|a| a.is_empty() || a.len() > 256) {
            return Err(Status::invalid_argument("an audience is 1 to 256 characters"));
        }
        // A pod has one identity; asking for another is asking for what it may not have.
        if !req.spiffe_id.is_empty() && req.spiffe_id != pod.tls.id.to_string() {
            warn!(pod = %pod.key, asked = %req.spiffe_id, "Workload API: a JWT-SVID for another identity refused");
            return Err(Status::permission_denied(format!("this pod's identity is {}", pod.tls.id)));
        }
        let token = self.identities.jwt_svid(&pod.tls.id, &req.audience).await.map_err(|e| {
            warn!(pod = %pod.key, error = %e, "Workload API: no JWT-SVID");
            Status::unavailable(format!("no JWT-SVID: {e}"))
        })?;
        info!(pod = %pod.key, id = %pod.tls.id, audiences = req.audience.len(), "Workload API: JWT-SVID handed out");
        let svid = Jwtsvid { spiffe_id: pod.tls.id.to_string(), svid: token, hint: String::new() };
        Ok(Response::new(JwtsvidResponse { svids: vec![svid] }))
    }

    type FetchJWTBundlesStream = Streamed<JwtBundlesResponse>;

    async fn fetch_jwt_bundles(
        &self,
        request: Request<JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        self.caller(&request)?;
        let (trust, mut changes) = (self.trust.clone(), self.trust.subscribe());
        let stream = async_stream::stream! {
            loop {
                let bundles = trust.all_jwks().into_iter().map(|(td, jwks)| (td.id_string(), jwks)).collect();
                yield Ok(JwtBundlesResponse { bundles });
                if changes.changed().await.is_err() {
                    return;
                }
            }
        };
        Ok(Response::new(Box::pin(stream)))
    }

    async fn validate_jwtsvid(
        &self,
        request: Request<ValidateJwtsvidRequest>,
    ) -> Result<Response<ValidateJwtsvidResponse>, Status> {
        let pod = self.caller(&request)?;
        let req = request.into_inner();
        if req.audience.is_empty() || req.svid.is_empty() {
            return Err(Status::invalid_argument("give the token and the audience to validate it for"));
        }
        let trust = &self.trust;
        match jwt::validate(&req.svid, &req.audience, |td| trust.jwks(td), std::time::SystemTime::now()) {
            Ok(v) => Ok(Response::new(ValidateJwtsvidResponse {
                spiffe_id: v.sub.to_string(),
                claims: Some(to_struct(v.claims)),
            })),
            Err(e) => {
                info!(pod = %pod.key, why = %e, "Workload API: a JWT-SVID did not validate");
                Err(Status::invalid_argument(e.to_string()))
            }
        }
    }
}

/// JSON claims as the protobuf `Struct` the Workload API returns them in.
fn to_struct(map: serde_json::Map<String, serde_json::Value>) -> prost_types::Struct {
    fn value(v: serde_json::Value) -> prost_types::Value {
        use prost_types::value::Kind;
        let kind = match v {
            serde_json::Value::Null => Kind::NullValue(0),
            serde_json::Value::Bool(b) => Kind::BoolValue(b),
            serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
            serde_json::Value::String(s) => Kind::StringValue(s),
            serde_json::Value::Array(a) => {
                Kind::ListValue(prost_types::ListValue { values: a.into_iter().map(value).collect() })
            }
            serde_json::Value::Object(o) => Kind::StructValue(to_struct(o)),
        };
        prost_types::Value { kind: Some(kind) }
    }
    prost_types::Struct { fields: map.into_iter().map(|(k, v)| (k, value(v))).collect() }
}

/// `<run dir>/workload-api/workload.sock`: alone in its directory, which pods mount (never the
/// run directory, whose control sockets are the agent's alone).
pub fn default_socket(run_dir: &Path) -> PathBuf {
    run_dir.join("workload-api").join("workload.sock")
}

/// Serves the Workload API on `socket` (replacing a stale socket file) until the task is dropped.
/// A caller's process is placed by `cgroups` (resolved from the agent's cgroup namespace, so a
/// contained agent reads pods' cgroups as the host names them).
pub fn serve(
    socket: &Path,
    pods: LocalPods,
    identities: Arc<Identities>,
    cgroups: Cgroups,
) -> Result<(), crate::Error> {
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
    let api = Api { pods, trust: identities.trust.clone(), identities, cgroups };
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<front::Fronted>>(16);
    tokio::spawn(front::accept(listener, tx, "Workload API", MAX_CONNECTIONS, |_| true));
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
