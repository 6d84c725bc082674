//! The issuer client: a [`CertificateSource`] that sends the node's CSRs to `meshless issuer` over
//! gRPC (HTTP/2) and mutual TLS, presenting the node's credential and requiring the issuer's
//! SPIFFE ID. gRPC because the SPIFFE Workload API the agent serves is gRPC already (one stack),
//! Istio's CA speaks it, and its schema gives both sides typed messages and deadlines.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::ClientConfig;
use tonic::transport::{Channel, Endpoint};

use super::verify::{ServerVerifier, Trust};
use super::{ca, provider, read_certs, BoxFuture, Bundle, CertificateSource, Error, SpiffeId, TrustDomain, ALPN_H2};
use crate::proto::issuer::{issuer_client, BundleRequest, BundleResponse, SignJwtRequest, SignRequest};

/// Deadline of one call to the issuer (connect included).
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// How the agent proves to the issuer which node it runs on.
#[derive(Debug, Clone)]
pub enum NodeProof {
    /// A node credential directory (`node.pem`, `node-key.pem`; `meshless ca node`), shown as the
    /// TLS client certificate.
    Credentials(std::path::PathBuf),
    /// A file holding a projected ServiceAccount token (re-read for every call: the kubelet
    /// rotates it), sent as a bearer token.
    Token(std::path::PathBuf),
}

pub struct IssuerClient {
    addr: String,
    token: Option<std::path::PathBuf>,
    trust: Arc<Trust>,
    channel: Channel,
    bootstrap: Bundle,
}

impl IssuerClient {
    /// A client of the issuer at `addr` (`host:port`), proving its node with `proof` and
    /// trusting `bundle` (the CA directory's `bundle.pem`) until the issuer hands out a newer one.
    pub fn new(addr: &str, proof: &NodeProof, bundle: &Path, td: &TrustDomain) -> Result<IssuerClient, Error> {
        let roots = ca::read_bundle(bundle)?;
        // The JWT authorities come with the issuer's first answer.
        let bootstrap = Bundle { trust_domain: td.clone(), roots, signer: String::new(), jwks: Vec::new() };
        let trust = Arc::new(Trust::new(&bootstrap, provider())?);
        let bad = |path: &Path, detail: String| Error::NodeCredential { path: path.display().to_string(), detail };
        let verifier = Arc::new(ServerVerifier { trust: trust.clone(), expected: ca::issuer_id(td) });
        let builder = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let (mut tls, token) = match proof {
            NodeProof::Credentials(credential_dir) => {
                let cred = |file: &str| credential_dir.join(file);
                let chain = read_certs(&cred("node.pem")).map_err(|e| bad(&cred("node.pem"), e))?;
                let key_pem = zeroize::Zeroizing::new(
                    std::fs::read(cred("node-key.pem")).map_err(|e| bad(&cred("node-key.pem"), e.to_string()))?,
                );
                let key: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut key_pem.as_slice())
                    .map_err(|e| bad(&cred("node-key.pem"), e.to_string()))?
                    .ok_or_else(|| bad(&cred("node-key.pem"), "no private key".into()))?;
                (builder.with_client_auth_cert(chain, key)?, None)
            }
            NodeProof::Token(path) => {
                // Fail at start on a missing file, not at the first renewal.
                read_token(path)?;
                (builder.with_no_client_auth(), Some(path.clone()))
            }
        };
        tls.alpn_protocols = vec![ALPN_H2.to_vec()];
        let tls = Arc::new(tls);
        let endpoint = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| Error::Unreachable { addr: addr.into(), detail: e.to_string() })?
            .connect_timeout(CALL_TIMEOUT)
            .timeout(CALL_TIMEOUT);
        let target = addr.to_string();
        let channel = endpoint.connect_with_connector_lazy(tower::service_fn(move |_| {
            let (tls, target) = (tls.clone(), target.clone());
            async move {
                let tcp = tokio::net::TcpStream::connect(&target).await?;
                tcp.set_nodelay(true)?;
                let name = match target.parse::<SocketAddr>() {
                    Ok(a) => ServerName::IpAddress(a.ip().into()),
                    Err(_) => {
                        ServerName::try_from(target.rsplit_once(':').map(|(h, _)| h).unwrap_or(&target).to_string())
                            .map_err(|e| std::io::Error::other(e.to_string()))?
                    }
                };
                let stream = tokio_rustls::TlsConnector::from(tls).connect(name, tcp).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }));
        Ok(IssuerClient { addr: addr.into(), token, trust, channel, bootstrap })
    }

    /// A request carrying the token, when the node proves itself with one.
    fn request<T>(&self, message: T) -> Result<tonic::Request<T>, Error> {
        let mut req = tonic::Request::new(message);
        if let Some(path) = &self.token {
            let value = format!("Bearer {}", read_token(path)?.as_str());
            let value = value.parse().map_err(|_| Error::NodeCredential {
                path: path.display().to_string(),
                detail: "the token is not a valid header value".into(),
            })?;
            req.metadata_mut().insert("authorization", value);
        }
        Ok(req)
    }

    fn unreachable(&self, status: tonic::Status) -> Error {
        match status.code() {
            tonic::Code::PermissionDenied
            | tonic::Code::Unauthenticated
            | tonic::Code::InvalidArgument
            | tonic::Code::FailedPrecondition => Error::Refused(status.message().to_string()),
            _ => Error::Unreachable { addr: self.addr.clone(), detail: status.to_string() },
        }
    }

    fn bundle_of(&self, b: Option<BundleResponse>) -> Result<Bundle, Error> {
        let b = b.ok_or_else(|| Error::Bundle("the issuer sent no bundle".into()))?;
        let bundle = Bundle {
            trust_domain: TrustDomain::new(&b.trust_domain).map_err(|e| Error::Bundle(e.to_string()))?,
            roots: b.roots.into_iter().map(CertificateDer::from).collect(),
            signer: b.signer,
            jwks: b.jwks,
        };
        // The issuer may rotate roots, never move the node to another trust domain.
        if bundle.trust_domain != self.bootstrap.trust_domain {
            return Err(Error::Bundle(format!(
                "the issuer sent a bundle for trust domain {}; this node serves {}: refused",
                bundle.trust_domain, self.bootstrap.trust_domain
            )));
        }
        // Our own trust follows too: after a rotation the issuer presents a new chain.
        self.trust.update(&bundle)?;
        Ok(bundle)
    }
}

fn read_token(path: &Path) -> Result<zeroize::Zeroizing<String>, Error> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::NodeCredential { path: path.display().to_string(), detail: e.to_string() })?;
    Ok(zeroize::Zeroizing::new(text.trim().to_string()))
}

impl CertificateSource for IssuerClient {
    fn sign<'a>(
        &'a self,
        id: &'a SpiffeId,
        csr: &'a [u8],
    ) -> BoxFuture<'a, Result<(Vec<CertificateDer<'static>>, Bundle), Error>> {
        Box::pin(async move {
            let mut client = issuer_client::IssuerClient::new(self.channel.clone());
            let req = self.request(SignRequest { csr: csr.to_vec(), spiffe_id: id.to_string() })?;
            let resp = client.sign(req).await.map_err(|s| self.unreachable(s))?.into_inner();
            let chain = resp.chain.into_iter().map(CertificateDer::from).collect();
            Ok((chain, self.bundle_of(resp.bundle)?))
        })
    }

    fn bundle(&self) -> BoxFuture<'_, Result<Bundle, Error>> {
        Box::pin(async move {
            let mut client = issuer_client::IssuerClient::new(self.channel.clone());
            let resp =
                client.bundle(self.request(BundleRequest {})?).await.map_err(|s| self.unreachable(s))?.into_inner();
            self.bundle_of(Some(resp))
        })
    }

    fn bootstrap(&self) -> Result<Bundle, Error> {
        Ok(self.bootstrap.clone())
    }

    fn sign_jwt<'a>(
        &'a self,
        id: &'a SpiffeId,
        audience: &'a [String],
    ) -> BoxFuture<'a, Result<(String, Bundle), Error>> {
        Box::pin(async move {
            let mut client = issuer_client::IssuerClient::new(self.channel.clone());
            let req = self.request(SignJwtRequest { spiffe_id: id.to_string(), audience: audience.to_vec() })?;
            let resp = client.sign_jwt(req).await.map_err(|s| self.unreachable(s))?.into_inner();
            Ok((resp.token, self.bundle_of(resp.bundle)?))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A bundle for another trust domain never replaces the node's trust.
    #[tokio::test]
    async fn a_bundle_of_another_trust_domain_is_refused() {
        let dir = std::env::temp_dir().join(format!("meshless-client-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let td = TrustDomain::new("cluster.local").unwrap();
        ca::init(&dir, &td).unwrap();
        let token = dir.join("token");
        std::fs::write(&token, "t").unwrap();
        let client = IssuerClient::new("127.0.0.1:1", &NodeProof::Token(token), &dir.join("bundle.pem"), &td).unwrap();
        let roots = client.bootstrap.roots.iter().map(|c| c.to_vec()).collect::<Vec<_>>();
        let foreign = BundleResponse {
            trust_domain: "evil.example".into(),
            roots: roots.clone(),
            signer: "x".into(),
            jwks: vec![],
        };
        let err = client.bundle_of(Some(foreign)).unwrap_err().to_string();
        assert!(err.contains("evil.example") && err.contains("refused"), "{err}");
        let own = BundleResponse { trust_domain: "cluster.local".into(), roots, signer: "x".into(), jwks: vec![] };
        assert!(client.bundle_of(Some(own)).is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
