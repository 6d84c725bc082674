//! Workload identity: SPIFFE IDs, the local CA of the embedded mode, X.509-SVIDs for local pods,
//! and the rustls configurations that present them and verify peers by SPIFFE ID.
//!
//! Every pod gets `spiffe://<trust-domain>/ns/<ns>/sa/<sa>` as the only URI SAN of an ECDSA P-256
//! leaf signed by the CA. Peers are verified by chain (webpki, against the trust bundle) *and* by
//! SPIFFE ID: the client side requires exactly the destination pod's ID, the server side requires
//! an ID in the trust domain. TLS 1.3 only.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType, PKCS_ECDSA_P256_SHA256,
};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::sign::CertifiedKey;
use rustls::{
    ClientConfig, DigitallySignedStruct, DistinguishedName as TlsDn, RootCertStore, ServerConfig, SignatureScheme,
};
pub use spiffe::{SpiffeId, TrustDomain};

/// Default lifetime of a workload certificate.
pub const SVID_TTL: Duration = Duration::from_secs(24 * 3600);
const CA_CERT_FILE: &str = "ca.pem";
const CA_KEY_FILE: &str = "ca-key.pem";
/// ALPN of HBONE: HTTP/2 over mTLS.
pub const ALPN_H2: &[u8] = b"h2";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("CA directory {dir}: cannot read {file}: {source} (create a CA with `meshless ca init --out {dir}`)")]
    CaMissing { dir: PathBuf, file: &'static str, source: std::io::Error },
    #[error("CA directory {dir}: {file} is not a valid PEM {what}: {detail}")]
    CaInvalid { dir: PathBuf, file: &'static str, what: &'static str, detail: String },
    #[error("writing the CA into {dir}: {source}")]
    CaWrite { dir: PathBuf, source: std::io::Error },
    #[error("CA directory {0} already holds a CA; refusing to overwrite it")]
    CaExists(PathBuf),
    #[error("issuing a certificate for {id}: {source}")]
    Issue { id: String, source: rcgen::Error },
    #[error("generating a key: {0}")]
    KeyGen(rcgen::Error),
    #[error("invalid SPIFFE ID: {0}")]
    SpiffeId(#[from] spiffe::SpiffeIdError),
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("TLS client verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
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

/// The crypto provider of every TLS context: ring, TLS 1.3 suites only.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A boxed future, for the asynchronous methods of object-safe traits.
pub type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

/// Where the agent gets its pods' certificates: the local CA of the embedded mode today, the
/// node-scoped issuer later. Injected, so tests can build the real agent with a CA of their own.
pub trait CertificateSource: Send + Sync + 'static {
    /// A fresh X.509-SVID (new key) for `id`.
    fn issue<'a>(&'a self, id: &'a SpiffeId) -> BoxFuture<'a, Result<Svid, Error>>;
    /// The roots peers' certificates must chain to.
    fn bundle(&self) -> Vec<CertificateDer<'static>>;
}

/// The local CA as a [`CertificateSource`], issuing certificates valid for `ttl`.
pub struct LocalCa {
    pub ca: Ca,
    pub ttl: Duration,
}

impl CertificateSource for LocalCa {
    fn issue<'a>(&'a self, id: &'a SpiffeId) -> BoxFuture<'a, Result<Svid, Error>> {
        Box::pin(async move { self.ca.issue(id, self.ttl) })
    }

    fn bundle(&self) -> Vec<CertificateDer<'static>> {
        self.ca.bundle()
    }
}

/// The local certificate authority of the embedded mode.
pub struct Ca {
    cert: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    /// Creates a new root CA (ECDSA P-256, 10 years) and writes `ca.pem` and `ca-key.pem` (0600).
    pub fn init(dir: &Path, trust_domain: &TrustDomain) -> Result<(), Error> {
        let wr = |source| Error::CaWrite { dir: dir.into(), source };
        if dir.join(CA_KEY_FILE).exists() {
            return Err(Error::CaExists(dir.into()));
        }
        fs::create_dir_all(dir).map_err(wr)?;
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(Error::KeyGen)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "meshless");
        dn.push(DnType::CommonName, format!("meshless root CA for {trust_domain}"));
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::minutes(5);
        params.not_after = now + time::Duration::days(3650);
        // The trust domain is recorded as a URI SAN of the CA, as SPIFFE bundles do.
        if let Ok(uri) = rcgen::string::Ia5String::try_from(trust_domain.id_string()) {
            params.subject_alt_names = vec![SanType::URI(uri)];
        }
        let cert = params.self_signed(&key).map_err(|source| Error::Issue { id: trust_domain.id_string(), source })?;
        fs::write(dir.join(CA_CERT_FILE), cert.pem()).map_err(wr)?;
        write_private(&dir.join(CA_KEY_FILE), key.serialize_pem().as_bytes()).map_err(wr)?;
        Ok(())
    }

    pub fn load(dir: &Path) -> Result<Ca, Error> {
        let read = |file: &'static str| {
            fs::read_to_string(dir.join(file)).map_err(|source| Error::CaMissing { dir: dir.into(), file, source })
        };
        let (cert_pem, key_pem) = (read(CA_CERT_FILE)?, read(CA_KEY_FILE)?);
        let invalid = |file, what, detail: String| Error::CaInvalid { dir: dir.into(), file, what, detail };
        let key = KeyPair::from_pem(&key_pem).map_err(|e| invalid(CA_KEY_FILE, "private key", e.to_string()))?;
        let cert = rustls_pemfile::certs(&mut cert_pem.as_bytes())
            .next()
            .ok_or_else(|| invalid(CA_CERT_FILE, "certificate", "no CERTIFICATE block".into()))?
            .map_err(|e| invalid(CA_CERT_FILE, "certificate", e.to_string()))?;
        let issuer =
            Issuer::from_ca_cert_der(&cert, key).map_err(|e| invalid(CA_CERT_FILE, "CA certificate", e.to_string()))?;
        Ok(Ca { cert, issuer })
    }

    /// The trust bundle: the CA certificate.
    pub fn bundle(&self) -> Vec<CertificateDer<'static>> {
        vec![self.cert.clone()]
    }

    /// Issues an X.509-SVID for `id`: fresh ECDSA P-256 key, `id` as the only URI SAN, valid from
    /// five minutes ago (clock skew) for `ttl`, usable for both TLS client and server auth.
    pub fn issue(&self, id: &SpiffeId, ttl: Duration) -> Result<Svid, Error> {
        let issue_err = |source| Error::Issue { id: id.to_string(), source };
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(Error::KeyGen)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        let uri = rcgen::string::Ia5String::try_from(id.to_string()).map_err(issue_err)?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyAgreement];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::minutes(5);
        params.not_after = now + ttl;
        let cert = params.signed_by(&key, &self.issuer).map_err(issue_err)?;
        Ok(Svid { id: id.clone(), chain: vec![cert.der().clone()], key: PrivatePkcs8KeyDer::from(key.serialize_der()) })
    }
}

fn pem(label: &str, der: &[u8]) -> String {
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

pub fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
    f.write_all(data)
}

/// A workload's certificate chain and key. The key never appears in `Debug` output or logs.
pub struct Svid {
    pub id: SpiffeId,
    pub chain: Vec<CertificateDer<'static>>,
    key: PrivatePkcs8KeyDer<'static>,
}

impl std::fmt::Debug for Svid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Svid").field("id", &self.id.to_string()).field("key", &"<redacted>").finish()
    }
}

impl Svid {
    /// PEM of the certificate chain and of the private key (for `meshless ca issue`).
    pub fn to_pem(&self) -> (String, String) {
        let chain = self.chain.iter().map(|c| pem("CERTIFICATE", c)).collect();
        (chain, pem("PRIVATE KEY", self.key.secret_pkcs8_der()))
    }

    fn certified_key(&self, provider: &CryptoProvider) -> Result<Arc<CertifiedKey>, Error> {
        let key = provider.key_provider.load_private_key(PrivateKeyDer::Pkcs8(self.key.clone_key()))?;
        Ok(Arc::new(CertifiedKey::new(self.chain.clone(), key)))
    }
}

/// TLS contexts of one local pod: the server side of its tunnel listener, and what is needed to
/// build a client context towards a given destination identity.
pub struct PodTls {
    pub id: SpiffeId,
    pub server: Arc<ServerConfig>,
    client_key: Arc<CertifiedKey>,
    roots: Arc<RootCertStore>,
    provider: Arc<CryptoProvider>,
}

impl PodTls {
    pub fn new(svid: &Svid, bundle: &[CertificateDer<'static>], td: &TrustDomain) -> Result<PodTls, Error> {
        let provider = provider();
        let mut roots = RootCertStore::empty();
        for c in bundle {
            roots.add(c.clone())?;
        }
        let roots = Arc::new(roots);
        let key = svid.certified_key(&provider)?;
        let inner = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone()).build()?;
        let verifier = Arc::new(SpiffeClientVerifier { inner, trust_domain: td.clone() });
        let mut server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(Arc::new(Fixed(key.clone())));
        server.alpn_protocols = vec![ALPN_H2.to_vec()];
        Ok(PodTls { id: svid.id.clone(), server: Arc::new(server), client_key: key, roots, provider })
    }

    /// A client context presenting this pod's certificate and accepting only `peer`.
    pub fn client(&self, peer: &SpiffeId) -> Result<Arc<ClientConfig>, Error> {
        let verifier = Arc::new(SpiffeServerVerifier {
            roots: self.roots.clone(),
            expected: peer.clone(),
            provider: self.provider.clone(),
        });
        let mut cfg = ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_cert_resolver(Arc::new(Fixed(self.client_key.clone())));
        cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
        Ok(Arc::new(cfg))
    }
}

/// Always presents the same certificate (server and client side).
#[derive(Debug)]
struct Fixed(Arc<CertifiedKey>);

impl rustls::server::ResolvesServerCert for Fixed {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

impl rustls::client::ResolvesClientCert for Fixed {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
    fn has_certs(&self) -> bool {
        true
    }
}

/// Client-side verification of the tunnel peer: chain to the bundle (webpki) and exactly the
/// expected SPIFFE ID. DNS/IP names play no part: SVIDs carry only the URI SAN.
#[derive(Debug)]
struct SpiffeServerVerifier {
    roots: Arc<RootCertStore>,
    expected: SpiffeId,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        let id = spiffe_id_of(end_entity).map_err(rustls::Error::General)?;
        if id != self.expected {
            return Err(rustls::Error::General(format!("peer presented SPIFFE ID {id}, expected {}", self.expected)));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(rustls::PeerIncompatible::Tls12NotOffered))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// Server-side verification of tunnel clients: webpki chain to the bundle (mandatory client
/// certificate) and a SPIFFE ID in our trust domain.
#[derive(Debug)]
struct SpiffeClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    trust_domain: TrustDomain,
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn root_hint_subjects(&self) -> &[TlsDn] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner.verify_client_cert(end_entity, intermediates, now)?;
        let id = spiffe_id_of(end_entity).map_err(rustls::Error::General)?;
        if !id.is_member_of(&self.trust_domain) {
            return Err(rustls::Error::General(format!(
                "client SPIFFE ID {id} is not in trust domain {}",
                self.trust_domain
            )));
        }
        Ok(ClientCertVerified::assertion())
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn td() -> TrustDomain {
        TrustDomain::new("cluster.local").unwrap()
    }

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("meshless-identity-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn workload_ids_follow_the_kubernetes_shape_and_reject_bad_segments() {
        assert_eq!(workload_id(&td(), "shop", "web").unwrap().to_string(), "spiffe://cluster.local/ns/shop/sa/web");
        assert!(workload_id(&td(), "a/b", "web").is_err(), "a namespace cannot smuggle a path separator");
        assert!(workload_id(&td(), "", "web").is_err());
    }

    #[test]
    fn issued_svid_carries_exactly_the_spiffe_id_and_chains_to_the_ca() {
        let dir = tmp("issue");
        Ca::init(&dir, &td()).unwrap();
        assert!(matches!(Ca::init(&dir, &td()), Err(Error::CaExists(_))), "init must not overwrite a CA");
        let mode = std::os::unix::fs::PermissionsExt::mode(&fs::metadata(dir.join(CA_KEY_FILE)).unwrap().permissions());
        assert_eq!(mode & 0o777, 0o600, "CA key must be private");
        let ca = Ca::load(&dir).unwrap();
        let id = workload_id(&td(), "default", "client").unwrap();
        let svid = ca.issue(&id, SVID_TTL).unwrap();
        assert_eq!(spiffe_id_of(&svid.chain[0]).unwrap(), id);
        let (_, cert) = x509_parser::parse_x509_certificate(&svid.chain[0]).unwrap();
        let lifetime = cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp();
        assert_eq!(lifetime, 24 * 3600 + 300, "24 h plus 5 min of back-dating for clock skew");
        assert_key_not_in(&format!("{svid:?}"), &svid);
        // Chains to the bundle: the client verifier accepts it.
        let tls = PodTls::new(&svid, &ca.bundle(), &td()).unwrap();
        let v = WebPkiClientVerifier::builder_with_provider(tls.roots.clone(), provider()).build().unwrap();
        v.verify_client_cert(&svid.chain[0], &[], UnixTime::now()).expect("SVID must chain to the CA");
        fs::remove_dir_all(&dir).unwrap();
    }

    /// Fails if `text` holds the SVID's private key in any form Debug or a log could print it:
    /// the DER bytes as a Debug list, as hex, or as base64 (PEM body).
    fn assert_key_not_in(text: &str, svid: &Svid) {
        use base64::Engine as _;
        let der = svid.key.secret_pkcs8_der();
        let as_list = format!("{:?}", der);
        let as_list = &as_list[1..as_list.len() - 1];
        let as_hex: String = der.iter().map(|b| format!("{b:02x}")).collect();
        let as_b64 = base64::engine::general_purpose::STANDARD.encode(der);
        for (form, needle) in [("a Debug byte list", as_list), ("hex", &as_hex), ("base64", &as_b64[20..60])] {
            assert!(!text.contains(needle), "the private key appears as {form} in: {text}");
        }
    }

    #[test]
    fn the_key_check_catches_a_key_that_leaks() {
        let dir = tmp("leak");
        Ca::init(&dir, &td()).unwrap();
        let svid = Ca::load(&dir).unwrap().issue(&workload_id(&td(), "d", "s").unwrap(), SVID_TTL).unwrap();
        // A Debug that printed the key bytes, and the PEM of the key, are both caught.
        let leaky = format!("Svid {{ key: {:?} }}", svid.key.secret_pkcs8_der());
        assert!(std::panic::catch_unwind(|| assert_key_not_in(&leaky, &svid)).is_err());
        let (_, pem) = svid.to_pem();
        assert!(std::panic::catch_unwind(|| assert_key_not_in(&pem, &svid)).is_err());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn ca_load_errors_say_what_to_do() {
        let dir = tmp("missing");
        let err = Ca::load(&dir).err().unwrap().to_string();
        assert!(err.contains("meshless ca init --out"), "{err}");
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join(CA_CERT_FILE), "garbage").unwrap();
        fs::write(dir.join(CA_KEY_FILE), "garbage").unwrap();
        let err = Ca::load(&dir).err().unwrap().to_string();
        assert!(err.contains("not a valid PEM"), "{err}");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn server_verifier_requires_the_expected_id_and_the_right_ca() {
        let (d1, d2) = (tmp("v1"), tmp("v2"));
        Ca::init(&d1, &td()).unwrap();
        Ca::init(&d2, &td()).unwrap();
        let (ca, foreign) = (Ca::load(&d1).unwrap(), Ca::load(&d2).unwrap());
        let want = workload_id(&td(), "default", "server").unwrap();
        let other = workload_id(&td(), "default", "intruder").unwrap();
        let v = SpiffeServerVerifier { roots: Arc::new(roots(&ca)), expected: want.clone(), provider: provider() };
        let name = ServerName::try_from("198.19.2.10").unwrap();
        let check = |svid: &Svid| v.verify_server_cert(&svid.chain[0], &[], &name, &[], UnixTime::now());
        check(&ca.issue(&want, SVID_TTL).unwrap()).expect("right CA, right ID");
        let e = check(&ca.issue(&other, SVID_TTL).unwrap()).unwrap_err().to_string();
        assert!(e.contains("expected spiffe://cluster.local/ns/default/sa/server"), "{e}");
        assert!(check(&foreign.issue(&want, SVID_TTL).unwrap()).is_err(), "a foreign CA must be refused");
        fs::remove_dir_all(&d1).unwrap();
        fs::remove_dir_all(&d2).unwrap();
    }

    fn roots(ca: &Ca) -> RootCertStore {
        let mut r = RootCertStore::empty();
        r.add(ca.bundle()[0].clone()).unwrap();
        r
    }
}
