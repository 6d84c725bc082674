//! `meshless issuer`: the CA service. It signs node agents' CSRs with the intermediate CA of a CA
//! directory (the root key is never read), after authorizing each request by node: the caller is
//! authenticated (a [`NodeAuthenticator`]: the node credential of the embedded mode, a
//! ServiceAccount token in Kubernetes later) and may only obtain the identity of a pod the workload
//! directory schedules on that node — istiod's NodeAuthorizer rule. Every refusal is logged with
//! its reason. The CA directory is watched: a rotation step (`meshless ca rotate`) takes effect
//! without a restart, and agents follow it through the bundle the issuer hands out.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rustls::pki_types::CertificateDer;
use rustls::server::WebPkiClientVerifier;
use rustls::sign::CertifiedKey;
use rustls::{RootCertStore, ServerConfig};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::{debug, info, warn};

use crate::identity::{ca, provider, BoxFuture, Error as IdentityError, SpiffeId, Svid, TrustDomain, ALPN_H2};
use crate::limits::HandshakeLimiter;
use crate::proto::issuer::issuer_server::{Issuer, IssuerServer};
use crate::proto::issuer::{BundleRequest, BundleResponse, SignJwtRequest, SignJwtResponse, SignRequest, SignResponse};
use crate::workloads::{Directory, WorkloadSource};

#[derive(clap::Args, Debug, Clone)]
pub struct IssuerConfig {
    /// The CA directory (`meshless ca init`); its intermediate signs, its root key is not read.
    #[arg(long, env = "MESHLESS_CA_DIR")]
    pub ca_dir: PathBuf,
    /// The workload directory: which pod runs on which node (the state file of the embedded mode).
    #[arg(long, env = "MESHLESS_STATE", required_unless_present = "kube", conflicts_with = "kube")]
    pub state: Option<PathBuf>,
    /// Learn which pod runs on which node from the Kubernetes API (instead of --state); the
    /// issuer then also reports the policy resources' status.
    #[arg(long, env = "MESHLESS_KUBE")]
    pub kube: bool,
    /// kubeconfig file; default: in-cluster service account, then $KUBECONFIG.
    #[arg(long, env = "MESHLESS_KUBECONFIG", requires = "kube")]
    pub kubeconfig: Option<PathBuf>,
    /// How agents prove their node: `credentials` (node certificates, `meshless ca node`) or
    /// `tokens` (projected ServiceAccount tokens of the agent pods, reviewed with the API server;
    /// needs --kube).
    #[arg(long, env = "MESHLESS_NODE_AUTH", value_enum, default_value_t = NodeAuth::Credentials)]
    pub node_auth: NodeAuth,
    /// The agents' ServiceAccount, `<namespace>/<name>` (with --node-auth tokens).
    #[arg(long, env = "MESHLESS_AGENT_SERVICE_ACCOUNT", default_value = "meshless-system/meshless-agent")]
    pub agent_service_account: String,
    #[arg(long, env = "MESHLESS_ISSUER_LISTEN", default_value = "0.0.0.0:15012")]
    pub listen: SocketAddr,
    /// Lifetime of the workload certificates it signs.
    #[arg(long, env = "MESHLESS_SVID_TTL", value_parser = humantime::parse_duration, default_value = "24h")]
    pub svid_ttl: Duration,
    /// Lifetime of the JWT-SVIDs it signs (bearer tokens: keep it short).
    #[arg(long, env = "MESHLESS_JWT_SVID_TTL", value_parser = humantime::parse_duration, default_value = "5m")]
    pub jwt_svid_ttl: Duration,
    #[arg(long, env = "MESHLESS_LOG_FORMAT", value_enum, default_value_t = crate::config::LogFormat::Text)]
    pub log_format: crate::config::LogFormat,
    #[arg(long, env = "MESHLESS_LOG", default_value = "info")]
    pub log: String,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeAuth {
    Credentials,
    Tokens,
}

/// Who is calling: what the TLS handshake proved, and the request's metadata (tokens).
pub struct Caller<'a> {
    /// The client certificate chain, verified against the node-credential CA, if one was shown.
    pub certs: Option<&'a [CertificateDer<'static>]>,
    pub metadata: &'a tonic::metadata::MetadataMap,
}

/// Why a certificate request is refused; each kind is its own gRPC status.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Refusal {
    /// The caller did not prove it is a node (`UNAUTHENTICATED`).
    #[error("{0}")]
    Unauthenticated(String),
    /// The node may not hold the identity (`PERMISSION_DENIED`).
    #[error("{0}")]
    PermissionDenied(String),
    /// The caller could not be checked: the API server did not answer (`UNAVAILABLE`; the agent
    /// retries).
    #[error("{0}")]
    Unavailable(String),
}

impl From<Refusal> for Status {
    fn from(r: Refusal) -> Status {
        match r {
            Refusal::Unauthenticated(m) => Status::unauthenticated(m),
            Refusal::PermissionDenied(m) => Status::permission_denied(m),
            Refusal::Unavailable(m) => Status::unavailable(m),
        }
    }
}

/// Authenticates the node a request comes from. The embedded mode uses node credentials; the
/// Kubernetes mode reviews ServiceAccount tokens.
pub trait NodeAuthenticator: Send + Sync + 'static {
    /// The node's name, or why the caller is not a node.
    fn authenticate<'a>(&'a self, caller: &'a Caller<'a>) -> BoxFuture<'a, Result<String, Refusal>>;
}

/// Node credentials of the embedded mode: a client certificate signed by the CA directory's
/// node-credential CA (verified in the TLS handshake) naming `spiffe://<td>/meshless/node/<node>`.
pub struct NodeCredentials {
    pub trust_domain: TrustDomain,
}

impl NodeAuthenticator for NodeCredentials {
    fn authenticate<'a>(&'a self, caller: &'a Caller<'a>) -> BoxFuture<'a, Result<String, Refusal>> {
        Box::pin(async move {
            let refuse = |why: String| Refusal::Unauthenticated(why);
            let leaf = caller
                .certs
                .and_then(|c| c.first())
                .ok_or_else(|| refuse("no node credential was presented".into()))?;
            let id = crate::identity::spiffe_id_of(leaf).map_err(|e| refuse(e.to_string()))?;
            let node = id
                .path()
                .strip_prefix("/meshless/node/")
                .filter(|n| !n.is_empty() && !n.contains('/') && id.is_member_of(&self.trust_domain))
                .ok_or_else(|| {
                    refuse(format!("{id} is not a node credential of trust domain {}", self.trust_domain))
                })?;
            Ok(node.to_string())
        })
    }
}

struct Service {
    signer: Arc<ArcSwap<ca::Signer>>,
    directory: watch::Receiver<Arc<Directory>>,
    auth: Arc<dyn NodeAuthenticator>,
    ttl: Duration,
    jwt_ttl: Duration,
}

impl Service {
    fn bundle(&self) -> BundleResponse {
        let b = self.signer.load().bundle();
        BundleResponse {
            trust_domain: b.trust_domain.to_string(),
            roots: b.roots.iter().map(|c| c.to_vec()).collect(),
            signer: b.signer,
            jwks: b.jwks,
        }
    }

    /// Whether `node` may hold `id`: some pod scheduled on `node` has that identity.
    fn authorize(&self, node: &str, id: &SpiffeId) -> Result<(), Refusal> {
        let dir = self.directory.borrow().clone();
        if dir.pods().any(|p| p.node == node && p.mesh && &p.identity == id) {
            return Ok(());
        }
        if dir.pods().any(|p| &p.identity == id) {
            Err(Refusal::PermissionDenied(format!("no pod with identity {id} is scheduled on node {node}")))
        } else {
            Err(Refusal::PermissionDenied(format!("no pod has identity {id}")))
        }
    }
}

#[tonic::async_trait]
impl Issuer for Service {
    async fn sign(&self, request: Request<SignRequest>) -> Result<Response<SignResponse>, Status> {
        let (node, id) = self.node_and_id(&request, &request.get_ref().spiffe_id).await?;
        let req = request.into_inner();
        let chain = self.signer.load().sign_csr(&req.csr, &id, self.ttl).map_err(|e| {
            warn!(node = %node, id = %id, error = %e, "refused a certificate request");
            Status::invalid_argument(e.to_string())
        })?;
        info!(node = %node, id = %id, serial = %crate::identity::serial_of(&chain[0]), ttl_s = self.ttl.as_secs(), "issued a certificate");
        Ok(Response::new(SignResponse {
            chain: chain.iter().map(|c| c.to_vec()).collect(),
            bundle: Some(self.bundle()),
        }))
    }

    async fn bundle(&self, _request: Request<BundleRequest>) -> Result<Response<BundleResponse>, Status> {
        Ok(Response::new(self.bundle()))
    }

    async fn sign_jwt(&self, request: Request<SignJwtRequest>) -> Result<Response<SignJwtResponse>, Status> {
        let (node, id) = self.node_and_id(&request, &request.get_ref().spiffe_id).await?;
        let audience = request.into_inner().audience;
        let token = self.signer.load().sign_jwt(&id, &audience, self.jwt_ttl).map_err(|e| {
            warn!(node = %node, id = %id, error = %e, "refused a JWT-SVID request");
            Status::failed_precondition(e.to_string())
        })?;
        info!(node = %node, id = %id, audiences = audience.len(), ttl_s = self.jwt_ttl.as_secs(), "issued a JWT-SVID");
        Ok(Response::new(SignJwtResponse { token, bundle: Some(self.bundle()) }))
    }
}

impl Service {
    /// The authenticated node calling, and the identity it asks for, which must be one of its
    /// pods' (the same check for X.509- and JWT-SVIDs).
    async fn node_and_id<T>(&self, request: &Request<T>, requested: &str) -> Result<(String, SpiffeId), Status> {
        let certs = request.peer_certs();
        let caller = Caller { certs: certs.as_deref().map(|c| c.as_slice()), metadata: request.metadata() };
        let node = match self.auth.authenticate(&caller).await {
            Ok(node) => node,
            Err(why) => {
                warn!(why = %why, "refused a certificate request: the caller is not an authenticated node");
                return Err(why.into());
            }
        };
        let id = match SpiffeId::new(requested) {
            Ok(id) => id,
            Err(e) => {
                warn!(node = %node, requested = %requested, "refused a certificate request: not a SPIFFE ID");
                return Err(Status::invalid_argument(format!("not a SPIFFE ID: {e}")));
            }
        };
        if let Err(why) = self.authorize(&node, &id) {
            warn!(node = %node, id = %id, why = %why, "refused a certificate request");
            return Err(why.into());
        }
        Ok((node, id))
    }
}

/// The issuer's own serving certificate, re-issued when the signer changes.
#[derive(Debug)]
struct OwnCert(ArcSwap<CertifiedKey>);

impl rustls::server::ResolvesServerCert for OwnCert {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.load_full())
    }
}

fn own_cert(signer: &ca::Signer) -> Result<Arc<CertifiedKey>, IdentityError> {
    let svid: Svid = signer.issue(&ca::issuer_id(&signer.trust_domain), Duration::from_secs(24 * 3600))?;
    svid.certified_key(&provider())
}

/// Runs the issuer until `shutdown` resolves.
pub async fn run(
    config: IssuerConfig,
    workloads: Box<dyn WorkloadSource>,
    auth: Arc<dyn NodeAuthenticator>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), crate::Error> {
    let signer = ca::Signer::load(&config.ca_dir)?;
    let node_ca = ca::node_ca(&config.ca_dir)?;
    let directory = workloads.start().await?;
    let own = Arc::new(OwnCert(ArcSwap::new(own_cert(&signer)?)));
    let mut roots = RootCertStore::empty();
    roots.add(node_ca).map_err(|e| IdentityError::Bundle(e.to_string()))?;
    // Certificates are optional at the TLS layer; the authenticator decides (a token may do).
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .allow_unauthenticated()
        .build()
        .map_err(|e| IdentityError::Bundle(e.to_string()))?;
    let mut tls = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(IdentityError::from)?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(own.clone());
    tls.alpn_protocols = vec![ALPN_H2.to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));

    let signer = Arc::new(ArcSwap::from_pointee(signer));
    tokio::spawn(watch_ca_dir(config.ca_dir.clone(), signer.clone(), own));
    let service =
        Service { signer: signer.clone(), directory, auth, ttl: config.svid_ttl, jwt_ttl: config.jwt_svid_ttl };

    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|e| crate::Error::Io(format!("listening on {}", config.listen), e))?;
    let (tx, rx) = mpsc::channel(64);
    let handshakes = handshake_limiter();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, peer)) = listener.accept().await else { continue };
            // Bounded handshakes in flight, in all and per source address: a few sources holding
            // handshakes open cannot keep the nodes out.
            let Some(slot) = handshakes.try_acquire(peer.ip()) else {
                debug!(%peer, "issuer: too many TLS handshakes in flight; connection closed");
                continue;
            };
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                let _slot = slot;
                match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok::<_, std::io::Error>(tls)).await;
                    }
                    Ok(Err(e)) => warn!(%peer, error = %e, "issuer: TLS handshake failed"),
                    Err(_) => warn!(%peer, "issuer: TLS handshake timed out"),
                }
            });
        }
    });
    let b = signer.load().bundle();
    info!(listen = %config.listen, trust_domain = %b.trust_domain, roots = b.roots.len(), signer = %b.signer,
        svid_ttl_s = config.svid_ttl.as_secs(), "issuer ready");
    tonic::transport::Server::builder()
        .max_concurrent_streams(Some(64))
        .concurrency_limit_per_connection(64)
        .add_service(IssuerServer::new(service))
        .serve_with_incoming_shutdown(ReceiverStream::new(rx), shutdown)
        .await
        .map_err(|e| crate::Error::Io("serving the issuer".into(), std::io::Error::other(e)))
}

/// Handshakes in flight on the issuer's port at most, and from one source address.
const MAX_HANDSHAKES: usize = 256;
const MAX_HANDSHAKES_PER_SOURCE: usize = 16;

/// The tunnel port's limiter, with every source counted as unknown (the issuer never marks one
/// known): unknown sources share half its places, a quarter of a source's share each — so these
/// are the issuer's caps, in all and per source.
fn handshake_limiter() -> Arc<HandshakeLimiter> {
    HandshakeLimiter::new(2 * MAX_HANDSHAKES, 4 * MAX_HANDSHAKES_PER_SOURCE)
}

/// Reloads the signer when a rotation step changes the CA directory.
async fn watch_ca_dir(dir: PathBuf, signer: Arc<ArcSwap<ca::Signer>>, own: Arc<OwnCert>) {
    let stamp = |d: &Path| -> Vec<Option<SystemTime>> {
        ca::watched_files(d).iter().map(|f| std::fs::metadata(f).and_then(|m| m.modified()).ok()).collect()
    };
    let mut last = stamp(&dir);
    let mut renew_own = tokio::time::interval(Duration::from_secs(12 * 3600));
    renew_own.tick().await;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(500)) => {
                let now = stamp(&dir);
                if now == last {
                    continue;
                }
                // Let a rotation step finish writing.
                tokio::time::sleep(Duration::from_millis(200)).await;
                last = stamp(&dir);
            }
            _ = renew_own.tick() => {}
        }
        match ca::Signer::load(&dir) {
            Ok(new) => {
                match own_cert(&new) {
                    Ok(c) => own.0.store(c),
                    Err(e) => warn!(error = %e, "cannot re-issue the issuer's own certificate"),
                }
                let b = new.bundle();
                info!(roots = b.roots.len(), signer = %b.signer, "CA directory reloaded");
                signer.store(Arc::new(new));
            }
            Err(e) => warn!(error = %e, "CA directory changed but cannot be loaded; signing with the previous CA"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;
    use crate::limits::HandshakePermit;

    #[test]
    fn handshakes_in_flight_are_bounded_per_source_and_in_all_and_given_back() {
        let h = handshake_limiter();
        let a: IpAddr = [198, 18, 0, 2].into();
        let mine: Vec<HandshakePermit> = (0..MAX_HANDSHAKES_PER_SOURCE).map(|_| h.try_acquire(a).unwrap()).collect();
        assert!(h.try_acquire(a).is_none(), "one source holds at most its share");
        let others: Vec<HandshakePermit> = (0..MAX_HANDSHAKES - MAX_HANDSHAKES_PER_SOURCE)
            .map(|i| h.try_acquire(IpAddr::from([10, 0, (i / 200) as u8, (i % 200) as u8])).unwrap())
            .collect();
        assert!(h.try_acquire([192, 0, 2, 1].into()).is_none(), "and all sources at most the total");
        drop(mine);
        assert!(h.try_acquire(a).is_some(), "given back when the handshakes end");
        drop(others);
        assert_eq!(h.sources_in_flight(), 0, "no source is remembered once it has nothing in flight");
    }
}
