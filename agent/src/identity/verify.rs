//! Trust and verification: one bundle of roots per trust domain, swapped atomically when a root
//! rotation changes it, and the rustls verifiers of both sides of a tunnel.
//!
//! A peer's certificate must chain (webpki) to the bundle of the trust domain of its SPIFFE ID
//! (never a flat store mixing trust domains), be within its validity, be an X.509-SVID leaf
//! (not a CA, key usage digitalSignature and no certificate or CRL signing, exactly one URI SAN
//! that is a SPIFFE ID), carry the extended key usage of its role (serverAuth for the tunnel
//! server, clientAuth for its client), and have the SPIFFE ID expected: exactly the destination
//! pod's on the client side, an ID of the trust domain on the server side.

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};
use x509_parser::extensions::ParsedExtension;

use super::{Bundle, Error, SpiffeId, TrustDomain};

/// The webpki side of one trust domain's bundle: its root store and the client verifier on it.
struct Roots {
    store: Arc<RootCertStore>,
    clients: Arc<dyn ClientCertVerifier>,
}

/// A snapshot of what is trusted: one bundle per trust domain (the spiffe crate's bundle set,
/// never a flat store mixing trust domains), and the verifiers built from each.
pub struct TrustSet {
    bundles: spiffe::X509BundleSet,
    by_domain: HashMap<TrustDomain, Roots>,
    /// The signing CA the trust domain's issuer named last.
    pub signer: String,
    /// Each trust domain's JWT authorities (a JWKS), where it has any.
    jwks: HashMap<TrustDomain, Vec<u8>>,
}

/// What this agent trusts, shared by every verifier; readers never block.
pub struct Trust {
    set: ArcSwap<TrustSet>,
    provider: Arc<CryptoProvider>,
    /// Bumped at every change (the Workload API streams bundle updates).
    version: tokio::sync::watch::Sender<u64>,
}

impl Trust {
    pub fn new(bundle: &Bundle, provider: Arc<CryptoProvider>) -> Result<Trust, Error> {
        let set = build(bundle, &provider)?;
        Ok(Trust { set: ArcSwap::new(Arc::new(set)), provider, version: tokio::sync::watch::channel(0).0 })
    }

    /// Replaces the bundle of `bundle`'s trust domain; true if the roots or the signer changed
    /// (a change of the JWT authorities alone is published, and re-issues nothing).
    pub fn update(&self, bundle: &Bundle) -> Result<bool, Error> {
        let current = self.set.load();
        let same_roots = current.roots(&bundle.trust_domain) == bundle.roots;
        let same_jwks = current.jwks(&bundle.trust_domain).unwrap_or_default() == bundle.jwks;
        let x509_changed = !same_roots || current.signer != bundle.signer;
        if !x509_changed && same_jwks {
            return Ok(false);
        }
        self.set.store(Arc::new(build(bundle, &self.provider)?));
        self.version.send_modify(|v| *v += 1);
        Ok(x509_changed)
    }

    /// The JWT authorities (a JWKS) of `td`, if it has any.
    pub fn jwks(&self, td: &TrustDomain) -> Option<Vec<u8>> {
        self.set.load().jwks(td)
    }

    /// Every trust domain with its JWT authorities (an empty JWKS where it has none).
    pub fn all_jwks(&self) -> Vec<(TrustDomain, Vec<u8>)> {
        let set = self.set.load();
        set.bundles.iter().map(|(td, _)| (td.clone(), set.jwks(td).unwrap_or_else(|| super::jwt::jwks(&[])))).collect()
    }

    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.version.subscribe()
    }

    /// Every trust domain with its roots.
    pub fn all(&self) -> Vec<(TrustDomain, Vec<CertificateDer<'static>>)> {
        let set = self.set.load();
        set.bundles.iter().map(|(td, _)| (td.clone(), set.roots(td))).collect()
    }

    pub fn signer(&self) -> String {
        self.set.load().signer.clone()
    }

    /// The roots of `td` (for the Workload API and logs).
    pub fn roots(&self, td: &TrustDomain) -> Vec<CertificateDer<'static>> {
        self.set.load().roots(td)
    }

    pub fn provider(&self) -> &Arc<CryptoProvider> {
        &self.provider
    }
}

impl TrustSet {
    fn jwks(&self, td: &TrustDomain) -> Option<Vec<u8>> {
        self.jwks.get(td).cloned()
    }

    fn roots(&self, td: &TrustDomain) -> Vec<CertificateDer<'static>> {
        self.bundles
            .get(td)
            .map(|b| b.authorities().iter().map(|c| CertificateDer::from(c.as_bytes().to_vec())).collect())
            .unwrap_or_default()
    }
}

fn build(bundle: &Bundle, provider: &Arc<CryptoProvider>) -> Result<TrustSet, Error> {
    if bundle.roots.is_empty() {
        return Err(Error::Bundle(format!("no root for trust domain {}", bundle.trust_domain)));
    }
    let ders: Vec<&[u8]> = bundle.roots.iter().map(|c| c.as_ref()).collect();
    let x509 = spiffe::X509Bundle::from_x509_authorities(bundle.trust_domain.clone(), &ders)
        .map_err(|e| Error::Bundle(format!("{}: {e}", bundle.trust_domain)))?;
    let mut bundles = spiffe::X509BundleSet::new();
    bundles.add_bundle(x509);
    let mut store = RootCertStore::empty();
    for root in &bundle.roots {
        store.add(root.clone()).map_err(|e| Error::Bundle(format!("a root of {}: {e}", bundle.trust_domain)))?;
    }
    let store = Arc::new(store);
    let clients = WebPkiClientVerifier::builder_with_provider(store.clone(), provider.clone())
        .build()
        .map_err(|e| Error::Bundle(e.to_string()))?;
    let mut by_domain = HashMap::new();
    by_domain.insert(bundle.trust_domain.clone(), Roots { store, clients });
    let mut jwks = HashMap::new();
    if !bundle.jwks.is_empty() {
        jwks.insert(bundle.trust_domain.clone(), bundle.jwks.clone());
    }
    Ok(TrustSet { bundles, by_domain, signer: bundle.signer.clone(), jwks })
}

/// The role a certificate is checked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Server,
    Client,
}

/// Checks that `cert` is an X.509-SVID leaf fit for `role`, and returns its SPIFFE ID.
pub fn check_leaf(cert: &CertificateDer<'_>, role: Role) -> Result<SpiffeId, String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert).map_err(|e| format!("unparsable certificate: {e}"))?;
    let (mut digital_signature, mut server_auth, mut client_auth) = (false, false, false);
    for ext in parsed.extensions() {
        match ext.parsed_extension() {
            ParsedExtension::BasicConstraints(bc) if bc.ca => {
                return Err("a CA certificate is not an X.509-SVID leaf".into())
            }
            ParsedExtension::KeyUsage(ku) => {
                if ku.key_cert_sign() || ku.crl_sign() {
                    return Err("an X.509-SVID leaf may not sign certificates or CRLs".into());
                }
                digital_signature = ku.digital_signature();
            }
            ParsedExtension::ExtendedKeyUsage(eku) => {
                server_auth = eku.server_auth;
                client_auth = eku.client_auth;
            }
            _ => {}
        }
    }
    if !digital_signature {
        return Err("the certificate lacks the digitalSignature key usage".into());
    }
    match role {
        Role::Server if !server_auth => return Err("the certificate lacks the serverAuth extended key usage".into()),
        Role::Client if !client_auth => return Err("the certificate lacks the clientAuth extended key usage".into()),
        _ => {}
    }
    super::spiffe_id_of(cert)
}

/// Client side of the tunnel: the server must present exactly `expected`.
#[derive(Debug)]
pub struct ServerVerifier {
    pub trust: Arc<Trust>,
    pub expected: SpiffeId,
}

impl std::fmt::Debug for Trust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trust").field("signer", &self.signer()).finish()
    }
}

impl ServerCertVerifier for ServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let id = check_leaf(end_entity, Role::Server).map_err(rustls::Error::General)?;
        if id != self.expected {
            return Err(rustls::Error::General(format!("peer presented SPIFFE ID {id}, expected {}", self.expected)));
        }
        let set = self.trust.set.load();
        let roots = set
            .by_domain
            .get(id.trust_domain())
            .ok_or_else(|| rustls::Error::General(format!("no trust bundle for trust domain {}", id.trust_domain())))?;
        let cert = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &roots.store,
            intermediates,
            now,
            self.trust.provider.signature_verification_algorithms.all,
        )?;
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
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.trust.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.trust.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// Server side of the tunnel: a client certificate is mandatory, chains to the bundle of its own
/// trust domain, and that trust domain is `trust_domain`.
#[derive(Debug)]
pub struct ClientVerifier {
    pub trust: Arc<Trust>,
    pub trust_domain: TrustDomain,
}

impl ClientCertVerifier for ClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // Hints are optional in TLS 1.3; the roots change at run time.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let id = check_leaf(end_entity, Role::Client).map_err(rustls::Error::General)?;
        if !id.is_member_of(&self.trust_domain) {
            return Err(rustls::Error::General(format!(
                "client SPIFFE ID {id} is not in trust domain {}",
                self.trust_domain
            )));
        }
        let set = self.trust.set.load();
        let roots = set
            .by_domain
            .get(id.trust_domain())
            .ok_or_else(|| rustls::Error::General(format!("no trust bundle for trust domain {}", id.trust_domain())))?;
        roots.clients.verify_client_cert(end_entity, intermediates, now)
    }

    fn client_auth_mandatory(&self) -> bool {
        true
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
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.trust.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.trust.provider.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{ca, provider, workload_id};
    use rcgen::{
        BasicConstraints, CertificateParams, DistinguishedName as Dn, ExtendedKeyUsagePurpose as Eku, IsCa, Issuer,
        KeyPair, KeyUsagePurpose as Ku, SanType,
    };
    use std::time::Duration;

    fn td(name: &str) -> TrustDomain {
        TrustDomain::new(name).unwrap()
    }

    /// A throwaway CA (root signing leaves directly) and the trust it gives.
    struct TestCa {
        key: KeyPair,
        cert: CertificateDer<'static>,
        td: TrustDomain,
    }

    impl TestCa {
        fn new(name: &str) -> TestCa {
            let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
            let mut p = CertificateParams::default();
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            p.key_usages = vec![Ku::KeyCertSign, Ku::CrlSign];
            let cert = p.self_signed(&key).unwrap().der().clone();
            TestCa { key, cert, td: td(name) }
        }

        fn trust(&self) -> Arc<Trust> {
            let b = Bundle {
                trust_domain: self.td.clone(),
                roots: vec![self.cert.clone()],
                signer: "t".into(),
                jwks: vec![],
            };
            Arc::new(Trust::new(&b, provider()).unwrap())
        }

        /// A leaf shaped by `edit` (starting from a good X.509-SVID for `uris`).
        fn leaf(&self, uris: &[&str], edit: impl FnOnce(&mut CertificateParams)) -> CertificateDer<'static> {
            let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
            let mut p = CertificateParams::default();
            p.distinguished_name = Dn::new();
            p.subject_alt_names =
                uris.iter().map(|u| SanType::URI(rcgen::string::Ia5String::try_from(*u).unwrap())).collect();
            p.is_ca = IsCa::ExplicitNoCa;
            p.key_usages = vec![Ku::DigitalSignature];
            p.extended_key_usages = vec![Eku::ServerAuth, Eku::ClientAuth];
            let now = time::OffsetDateTime::now_utc();
            p.not_before = now - time::Duration::minutes(5);
            p.not_after = now + time::Duration::hours(1);
            edit(&mut p);
            let issuer = Issuer::from_ca_cert_der(&self.cert, &self.key).unwrap();
            p.signed_by(&key, &issuer).unwrap().der().clone()
        }
    }

    const ID: &str = "spiffe://cluster.local/ns/default/sa/server";

    /// Both directions: the tunnel client's check of a server and the server's check of a client.
    fn both(trust: &Arc<Trust>, cert: &CertificateDer<'_>) -> (Result<(), String>, Result<(), String>) {
        let expected = SpiffeId::new(ID).unwrap();
        let sv = ServerVerifier { trust: trust.clone(), expected };
        let name = ServerName::try_from("198.19.2.10").unwrap();
        let server =
            sv.verify_server_cert(cert, &[], &name, &[], UnixTime::now()).map(|_| ()).map_err(|e| e.to_string());
        let cv = ClientVerifier { trust: trust.clone(), trust_domain: td("cluster.local") };
        let client = cv.verify_client_cert(cert, &[], UnixTime::now()).map(|_| ()).map_err(|e| e.to_string());
        (server, client)
    }

    #[test]
    fn a_good_svid_passes_both_ways_and_each_flaw_is_refused_both_ways() {
        let ca = TestCa::new("cluster.local");
        let trust = ca.trust();
        let good = ca.leaf(&[ID], |_| {});
        assert_eq!(both(&trust, &good), (Ok(()), Ok(())), "control: a good X.509-SVID");
        let later = time::OffsetDateTime::now_utc() + time::Duration::hours(2);
        let earlier = time::OffsetDateTime::now_utc() - time::Duration::hours(2);
        let foreign = TestCa::new("cluster.local");
        let other_td = TestCa::new("other.local");
        let cases: Vec<(&str, CertificateDer<'static>, &Arc<Trust>)> = vec![
            (
                "expired",
                ca.leaf(&[ID], |p| {
                    p.not_before = earlier;
                    p.not_after = earlier + time::Duration::minutes(1)
                }),
                &trust,
            ),
            (
                "not yet valid",
                ca.leaf(&[ID], |p| {
                    p.not_before = later;
                    p.not_after = later + time::Duration::hours(1)
                }),
                &trust,
            ),
            ("other trust domain", other_td.leaf(&["spiffe://other.local/ns/default/sa/server"], |_| {}), &trust),
            ("untrusted CA", foreign.leaf(&[ID], |_| {}), &trust),
            ("no EKU", ca.leaf(&[ID], |p| p.extended_key_usages = vec![]), &trust),
            ("no digitalSignature", ca.leaf(&[ID], |p| p.key_usages = vec![Ku::KeyEncipherment]), &trust),
            ("two URI SANs", ca.leaf(&[ID, "spiffe://cluster.local/ns/default/sa/other"], |_| {}), &trust),
            ("a CA certificate", ca.leaf(&[ID], |p| p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained)), &trust),
        ];
        for (what, cert, trust) in cases {
            let (server, client) = both(trust, &cert);
            assert!(server.is_err(), "{what}: the tunnel client must refuse it as a server certificate");
            assert!(client.is_err(), "{what}: the tunnel server must refuse it as a client certificate");
        }
        // Each role's EKU on its own.
        let server_only = ca.leaf(&[ID], |p| p.extended_key_usages = vec![Eku::ServerAuth]);
        let (server, client) = both(&trust, &server_only);
        assert!(server.is_ok() && client.unwrap_err().contains("clientAuth"));
        let client_only = ca.leaf(&[ID], |p| p.extended_key_usages = vec![Eku::ClientAuth]);
        let (server, client) = both(&trust, &client_only);
        assert!(client.is_ok() && server.unwrap_err().contains("serverAuth"));
    }

    #[test]
    fn the_client_requires_the_expected_id_and_trust_follows_a_bundle_update() {
        let ca_a = TestCa::new("cluster.local");
        let ca_b = TestCa::new("cluster.local");
        let trust = ca_a.trust();
        let sv = |id: &str| ServerVerifier { trust: trust.clone(), expected: SpiffeId::new(id).unwrap() };
        let name = ServerName::try_from("198.19.2.10").unwrap();
        let cert_a = ca_a.leaf(&[ID], |_| {});
        let e = sv("spiffe://cluster.local/ns/default/sa/other")
            .verify_server_cert(&cert_a, &[], &name, &[], UnixTime::now())
            .unwrap_err()
            .to_string();
        assert!(e.contains("expected spiffe://cluster.local/ns/default/sa/other"), "{e}");
        // B's leaf is trusted once B's root joins the bundle, and no longer once A's leaves it.
        let cert_b = ca_b.leaf(&[ID], |_| {});
        assert!(sv(ID).verify_server_cert(&cert_b, &[], &name, &[], UnixTime::now()).is_err());
        let both_roots = Bundle {
            trust_domain: td("cluster.local"),
            roots: vec![ca_a.cert.clone(), ca_b.cert.clone()],
            signer: "b".into(),
            jwks: vec![],
        };
        assert!(trust.update(&both_roots).unwrap(), "a new root is a change");
        // New JWT authorities alone are published (the version moves) but re-issue nothing.
        let version = *trust.subscribe().borrow();
        let with_jwks = Bundle { jwks: br#"{"keys":[]}"#.to_vec(), ..both_roots.clone() };
        assert!(!trust.update(&with_jwks).unwrap(), "no X.509 change");
        assert_eq!(*trust.subscribe().borrow(), version + 1);
        assert_eq!(trust.jwks(&td("cluster.local")), Some(br#"{"keys":[]}"#.to_vec()));
        assert!(!trust.update(&with_jwks).unwrap());
        assert_eq!(*trust.subscribe().borrow(), version + 1, "nothing new, nothing published");
        assert!(sv(ID).verify_server_cert(&cert_b, &[], &name, &[], UnixTime::now()).is_ok());
        assert!(sv(ID).verify_server_cert(&cert_a, &[], &name, &[], UnixTime::now()).is_ok());
        let only_b = Bundle {
            trust_domain: td("cluster.local"),
            roots: vec![ca_b.cert.clone()],
            signer: "b".into(),
            jwks: vec![],
        };
        trust.update(&only_b).unwrap();
        assert!(sv(ID).verify_server_cert(&cert_a, &[], &name, &[], UnixTime::now()).is_err(), "A is retired");
        assert!(!trust.update(&only_b).unwrap(), "the same bundle again is no change");
    }

    #[test]
    fn leaves_from_the_ca_directory_are_good_svids() {
        let dir = std::env::temp_dir().join(format!("meshless-verify-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        ca::init(&dir, &td("cluster.local")).unwrap();
        let signer = ca::Signer::load(&dir).unwrap();
        let trust = Arc::new(Trust::new(&signer.bundle(), provider()).unwrap());
        let id = workload_id(&td("cluster.local"), "default", "server").unwrap();
        let svid = signer.issue(&id, Duration::from_secs(3600)).unwrap();
        let sv = ServerVerifier { trust: trust.clone(), expected: id };
        let name = ServerName::try_from("198.19.2.10").unwrap();
        sv.verify_server_cert(&svid.chain[0], &svid.chain[1..], &name, &[], UnixTime::now())
            .expect("leaf + intermediate chain to the root");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
