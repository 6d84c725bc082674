//! Workload identity: SPIFFE IDs, X.509-SVIDs for this node's pods, and how they are obtained,
//! rotated, presented and verified.
//!
//! Every pod gets `spiffe://<trust-domain>/ns/<ns>/sa/<sa>` as the only URI SAN of an ECDSA P-256
//! leaf. The key is generated on the node, kept in memory only (zeroized on drop) and never leaves
//! it but to the pod itself (the Workload API); a [`CertificateSource`] signs a CSR for it: the
//! node-scoped issuer ([`client`], the default) or, in an explicit development mode, a CA held by
//! the agent ([`ca::LocalCa`]). [`store`] renews each certificate before it expires and swaps it in
//! place, so the next TLS handshake presents it; [`verify`] checks peers against one trust bundle
//! per trust domain, by chain, validity, key usage, extended key usage and SPIFFE ID.
//!
//! | module | concern |
//! |---|---|
//! | [`ca`] | the CA directory: root, intermediate, node-credential CA, signing, rotation stages |
//! | [`verify`] | trust bundles per trust domain and the rustls verifiers of both sides |
//! | [`store`] | the node's certificates: issuance, rotation, fail-closed expiry, TLS configs |
//! | [`client`] | the issuer client (a [`CertificateSource`] over gRPC + mTLS) |

pub mod ca;
pub mod client;
pub mod jwt;
pub mod store;
pub mod verify;

use std::fs;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType, PKCS_ECDSA_P256_SHA256};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::sign::CertifiedKey;
pub use spiffe::{SpiffeId, TrustDomain};
use zeroize::Zeroizing;

pub use store::PodTls;

/// Default lifetime of a workload certificate (the issuer's `--svid-ttl`).
pub const SVID_TTL: Duration = Duration::from_secs(24 * 3600);
/// How far notBefore is back-dated, against clock skew between nodes.
pub const BACKDATE: Duration = Duration::from_secs(5 * 60);
/// ALPN of HBONE: HTTP/2 over mTLS.
pub const ALPN_H2: &[u8] = b"h2";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("CA directory {dir}: cannot read {file}: {source} (create a CA with `meshless ca init --out {dir}`)")]
    CaMissing { dir: String, file: String, source: std::io::Error },
    #[error("CA directory {dir}: {file} is not valid: {detail}")]
    CaInvalid { dir: String, file: String, detail: String },
    #[error("writing into {dir}: {source}")]
    CaWrite { dir: String, source: std::io::Error },
    #[error("CA directory {0} already holds a CA; refusing to overwrite it")]
    CaExists(String),
    #[error("CA rotation: {0}")]
    Rotation(String),
    #[error("issuing a certificate for {id}: {source}")]
    Issue { id: String, source: rcgen::Error },
    #[error("generating a key: {0}")]
    KeyGen(rcgen::Error),
    #[error("invalid SPIFFE ID: {0}")]
    SpiffeId(#[from] spiffe::SpiffeIdError),
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("certificate from the issuer: {0}")]
    BadCertificate(String),
    #[error("the issuer refused: {0}")]
    Refused(String),
    #[error("the issuer at {addr} is unreachable: {detail}")]
    Unreachable { addr: String, detail: String },
    #[error("node credential {path}: {detail}")]
    NodeCredential { path: String, detail: String },
    #[error("trust bundle: {0}")]
    Bundle(String),
}

/// `spiffe://<td>/ns/<namespace>/sa/<service account>`.
pub fn workload_id(
    td: &TrustDomain,
    namespace: &str,
    service_account: &str,
) -> Result<SpiffeId, spiffe::SpiffeIdError> {
    SpiffeId::from_segments(td.clone(), &["ns", namespace, "sa", service_account])
}

/// The one SPIFFE ID in a certificate's URI SANs. More than one URI SAN is invalid (X.509-SVID).
pub fn spiffe_id_of(cert: &CertificateDer<'_>) -> Result<SpiffeId, String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert).map_err(|e| format!("unparsable certificate: {e}"))?;
    let san = parsed
        .subject_alternative_name()
        .map_err(|e| format!("bad subjectAltName: {e}"))?
        .ok_or("certificate has no subjectAltName, so no SPIFFE ID")?;
    let mut uris = san.value.general_names.iter().filter_map(|n| match n {
        x509_parser::extensions::GeneralName::URI(u) => Some(*u),
        _ => None,
    });
    let uri = uris.next().ok_or("certificate has no URI SAN, so no SPIFFE ID")?;
    if uris.next().is_some() {
        return Err("certificate has more than one URI SAN; an X.509-SVID has exactly one".into());
    }
    SpiffeId::new(uri).map_err(|e| format!("URI SAN {uri:?} is not a SPIFFE ID: {e}"))
}

/// The end of a certificate's validity.
pub fn not_after(cert: &CertificateDer<'_>) -> Result<SystemTime, String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert).map_err(|e| format!("unparsable certificate: {e}"))?;
    let secs = parsed.validity().not_after.timestamp();
    Ok(SystemTime::UNIX_EPOCH + Duration::from_secs(secs.max(0) as u64))
}

/// A certificate's serial number, as hex (for logs: which certificate a peer presented).
pub fn serial_of(cert: &CertificateDer<'_>) -> String {
    x509_parser::parse_x509_certificate(cert).map(|(_, c)| c.raw_serial_as_string()).unwrap_or_default()
}

/// The crypto provider of every TLS context: ring, TLS 1.3 suites only.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A boxed future, for the asynchronous methods of object-safe traits.
pub type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

/// What a CA says about trust: the roots to trust for its trust domain, and which CA signs now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bundle {
    pub trust_domain: TrustDomain,
    pub roots: Vec<CertificateDer<'static>>,
    /// Identifies the signing CA; when it changes, certificates are re-issued.
    pub signer: String,
    /// The trust domain's JWT authorities as a JWKS (empty: no JWT-SVIDs).
    pub jwks: Vec<u8>,
}

/// Where the agent gets its pods' certificates signed. The key is generated on the node; only a
/// CSR leaves it. Injected, so tests can build the real agent with a CA of their own.
pub trait CertificateSource: Send + Sync + 'static {
    /// Signs `csr` (DER, PKCS#10) for `id`: the certificate chain (leaf first) and the bundle.
    fn sign<'a>(
        &'a self,
        id: &'a SpiffeId,
        csr: &'a [u8],
    ) -> BoxFuture<'a, Result<(Vec<CertificateDer<'static>>, Bundle), Error>>;
    /// The current trust bundle (polled to follow a root rotation).
    fn bundle(&self) -> BoxFuture<'_, Result<Bundle, Error>>;
    /// The bundle configured locally, to start with when the source cannot be reached.
    fn bootstrap(&self) -> Result<Bundle, Error>;
    /// Signs a JWT-SVID for `id` and `audience`: the token and the bundle.
    fn sign_jwt<'a>(
        &'a self,
        id: &'a SpiffeId,
        audience: &'a [String],
    ) -> BoxFuture<'a, Result<(String, Bundle), Error>> {
        let _ = (id, audience);
        Box::pin(async { Err(Error::Refused("this certificate source issues no JWT-SVIDs".into())) })
    }
}

/// A fresh ECDSA P-256 key and a CSR for `id` signed with it.
pub fn key_and_csr(id: &SpiffeId) -> Result<(KeyPair, Vec<u8>), Error> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(Error::KeyGen)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    let uri = rcgen::string::Ia5String::try_from(id.to_string())
        .map_err(|source| Error::Issue { id: id.to_string(), source })?;
    params.subject_alt_names = vec![SanType::URI(uri)];
    let csr = params.serialize_request(&key).map_err(|source| Error::Issue { id: id.to_string(), source })?;
    Ok((key, csr.der().to_vec()))
}

/// A workload's certificate chain and key. The key is zeroized on drop and never appears in
/// `Debug` output or logs.
pub struct Svid {
    pub id: SpiffeId,
    pub chain: Vec<CertificateDer<'static>>,
    key: Zeroizing<Vec<u8>>,
}

impl std::fmt::Debug for Svid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Svid").field("id", &self.id.to_string()).field("key", &"<redacted>").finish()
    }
}

impl Svid {
    /// An SVID from a chain and the PKCS#8 DER of its key (taken over and zeroized on drop).
    pub fn new(id: SpiffeId, chain: Vec<CertificateDer<'static>>, key: KeyPair) -> Svid {
        Svid { id, chain, key: Zeroizing::new(key.serialize_der()) }
    }

    /// PEM of the certificate chain and of the private key (for `meshless ca issue`).
    pub fn to_pem(&self) -> (String, Zeroizing<String>) {
        let chain = self.chain.iter().map(|c| pem("CERTIFICATE", c)).collect();
        (chain, Zeroizing::new(pem("PRIVATE KEY", &self.key)))
    }

    /// The PKCS#8 DER of the key, for the one place that hands it out: the pod's own Workload API.
    pub fn key_der(&self) -> &[u8] {
        &self.key
    }

    /// The chain and key ready for rustls.
    pub fn certified_key(&self, provider: &CryptoProvider) -> Result<Arc<CertifiedKey>, Error> {
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key.to_vec()));
        let key = provider.key_provider.load_private_key(key)?;
        Ok(Arc::new(CertifiedKey::new(self.chain.clone(), key)))
    }

    pub fn not_after(&self) -> SystemTime {
        self.chain.first().and_then(|c| not_after(c).ok()).unwrap_or(SystemTime::UNIX_EPOCH)
    }

    pub fn serial(&self) -> String {
        self.chain.first().map(serial_of).unwrap_or_default()
    }
}

pub fn pem(label: &str, der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// Every certificate of a PEM file.
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let text = fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut text.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no CERTIFICATE block", path.display()));
    }
    Ok(certs)
}

/// Writes a private file (mode 0600), failing if it exists.
pub fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
    f.write_all(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn td() -> TrustDomain {
        TrustDomain::new("cluster.local").unwrap()
    }

    #[test]
    fn workload_ids_follow_the_kubernetes_shape_and_reject_bad_segments() {
        assert_eq!(workload_id(&td(), "shop", "web").unwrap().to_string(), "spiffe://cluster.local/ns/shop/sa/web");
        assert!(workload_id(&td(), "a/b", "web").is_err(), "a namespace cannot smuggle a path separator");
        assert!(workload_id(&td(), "", "web").is_err());
    }

    /// Fails if `text` holds the SVID's private key in any form Debug or a log could print it:
    /// the DER bytes as a Debug list, as hex, or as base64 (PEM body).
    pub fn assert_key_not_in(text: &str, svid: &Svid) {
        use base64::Engine as _;
        let der = svid.key_der();
        let as_list = format!("{:?}", der);
        let as_list = &as_list[1..as_list.len() - 1];
        let as_hex: String = der.iter().map(|b| format!("{b:02x}")).collect();
        let as_b64 = base64::engine::general_purpose::STANDARD.encode(der);
        for (form, needle) in [("a Debug byte list", as_list), ("hex", &as_hex), ("base64", &as_b64[20..60])] {
            assert!(!text.contains(needle), "the private key appears as {form} in: {text}");
        }
    }

    fn some_svid() -> Svid {
        let id = workload_id(&td(), "d", "s").unwrap();
        let (key, _) = key_and_csr(&id).unwrap();
        let cert = CertificateParams::new(Vec::<String>::new()).unwrap().self_signed(&key).unwrap();
        Svid::new(id, vec![cert.der().clone()], key)
    }

    #[test]
    fn the_key_never_shows_in_debug_output_and_the_check_catches_a_key_that_leaks() {
        let svid = some_svid();
        assert_key_not_in(&format!("{svid:?}"), &svid);
        // A Debug that printed the key bytes, and the PEM of the key, are both caught.
        let leaky = format!("Svid {{ key: {:?} }}", svid.key_der());
        assert!(std::panic::catch_unwind(|| assert_key_not_in(&leaky, &svid)).is_err());
        let (_, pem) = svid.to_pem();
        assert!(std::panic::catch_unwind(|| assert_key_not_in(&pem, &svid)).is_err());
    }

    #[test]
    fn a_csr_carries_the_nodes_own_key_and_the_id() {
        let id = workload_id(&td(), "shop", "web").unwrap();
        let (key, csr) = key_and_csr(&id).unwrap();
        let parsed = rcgen::CertificateSigningRequestParams::from_der(&csr.as_slice().into()).unwrap();
        assert_eq!(rcgen::PublicKeyData::der_bytes(&parsed.public_key), rcgen::PublicKeyData::der_bytes(&key));
    }
}
