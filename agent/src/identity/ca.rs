//! The CA directory (`meshless ca init`), what signs with it, and its rotation.
//!
//! ```text
//! <dir>/trust-domain              the trust domain
//! <dir>/root.pem, root-key.pem    the root (10 years); needed only by `ca init` and `ca rotate`
//! <dir>/intermediate.pem, -key    the signing CA of workload certificates (the issuer's)
//! <dir>/bundle.pem                the roots to trust (two during a rotation)
//! <dir>/node-ca.pem, -key         signs node credentials, which only the issuer trusts
//! <dir>/next/…                    a root and intermediate being introduced (`ca rotate add`)
//! <dir>/retired/…                 the previous root and intermediate (`ca rotate switch`)
//! ```
//!
//! Node agents get `bundle.pem` and their own node credential (`meshless ca node`), never a CA key.
//! A root rotation goes in three steps, each safe on its own: `add` (the new root is trusted beside
//! the old one; the old intermediate still signs), `switch` (the new intermediate signs; agents
//! re-issue their certificates), `retire` (only the new root is trusted).

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType, SerialNumber,
    PKCS_ECDSA_P256_SHA256,
};
use rustls::pki_types::CertificateDer;

use super::{
    jwt, pem, read_certs, write_private, BoxFuture, Bundle, CertificateSource, Error, SpiffeId, Svid, TrustDomain,
    BACKDATE,
};

const TRUST_DOMAIN: &str = "trust-domain";
const ROOT: &str = "root";
const INTERMEDIATE: &str = "intermediate";
const NODE_CA: &str = "node-ca";
const BUNDLE: &str = "bundle.pem";
/// The JWT authority's key (PKCS#8 PEM): signs JWT-SVIDs, apart from the X.509 CA keys.
const JWT_KEY: &str = "jwt-key.pem";
const NEXT: &str = "next";
const RETIRED: &str = "retired";

const ROOT_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
const INTERMEDIATE_TTL: Duration = Duration::from_secs(5 * 365 * 24 * 3600);
const NODE_CREDENTIAL_TTL: Duration = Duration::from_secs(365 * 24 * 3600);

/// The SPIFFE ID of the issuer's own serving certificate.
pub fn issuer_id(td: &TrustDomain) -> SpiffeId {
    SpiffeId::from_segments(td.clone(), &["meshless", "issuer"]).expect("a valid SPIFFE ID")
}

/// The SPIFFE ID in a node credential (signed by the node CA, which only the issuer trusts: it can
/// never pass as a workload).
pub fn node_id(td: &TrustDomain, node: &str) -> Result<SpiffeId, Error> {
    Ok(SpiffeId::from_segments(td.clone(), &["meshless", "node", node])?)
}

fn dir_str(dir: &Path) -> String {
    dir.display().to_string()
}

fn write_err(dir: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |source| Error::CaWrite { dir: dir_str(dir), source }
}

fn now() -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc()
}

fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    super::provider().secure_random.fill(&mut bytes).expect("the system's random number generator");
    bytes[0] &= 0x7f; // positive
    SerialNumber::from_slice(&bytes)
}

fn ca_params(cn: &str, td: &TrustDomain, ttl: Duration, path_len: Option<u8>) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "meshless");
    dn.push(DnType::CommonName, cn);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(match path_len {
        Some(n) => BasicConstraints::Constrained(n),
        None => BasicConstraints::Unconstrained,
    });
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    params.not_before = now() - BACKDATE;
    params.not_after = now() + ttl;
    params.serial_number = Some(random_serial());
    // The trust domain is recorded as a URI SAN of the CA, as SPIFFE bundles do.
    if let Ok(uri) = rcgen::string::Ia5String::try_from(td.id_string()) {
        params.subject_alt_names = vec![SanType::URI(uri)];
    }
    params
}

/// Parameters of a leaf certificate for `id`: `id` the only URI SAN, digitalSignature, TLS server
/// and client auth, valid from [`BACKDATE`] ago for `ttl`.
fn leaf_params(id: &SpiffeId, ttl: Duration, client_only: bool) -> Result<CertificateParams, Error> {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    let uri = rcgen::string::Ia5String::try_from(id.to_string())
        .map_err(|source| Error::Issue { id: id.to_string(), source })?;
    params.subject_alt_names = vec![SanType::URI(uri)];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = if client_only {
        vec![ExtendedKeyUsagePurpose::ClientAuth]
    } else {
        vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth]
    };
    params.use_authority_key_identifier_extension = true;
    params.not_before = now() - BACKDATE;
    params.not_after = now() + ttl;
    params.serial_number = Some(random_serial());
    Ok(params)
}

/// A certificate and its key, as `<name>.pem` / `<name>-key.pem`.
struct Pair {
    cert: CertificateDer<'static>,
    key: KeyPair,
}

impl Pair {
    fn generate_ca(
        cn: &str,
        td: &TrustDomain,
        ttl: Duration,
        path_len: Option<u8>,
        parent: Option<&Pair>,
    ) -> Result<Pair, Error> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(Error::KeyGen)?;
        let params = ca_params(cn, td, ttl, path_len);
        let issue = |source| Error::Issue { id: cn.to_string(), source };
        let cert = match parent {
            None => params.self_signed(&key).map_err(issue)?,
            Some(p) => params.signed_by(&key, &p.issuer()?).map_err(issue)?,
        };
        Ok(Pair { cert: cert.der().clone(), key })
    }

    fn issuer(&self) -> Result<Issuer<'_, &KeyPair>, Error> {
        Issuer::from_ca_cert_der(&self.cert, &self.key).map_err(|e| Error::CaInvalid {
            dir: String::new(),
            file: "CA certificate".into(),
            detail: e.to_string(),
        })
    }

    fn write(&self, dir: &Path, name: &str) -> Result<(), Error> {
        fs::write(dir.join(format!("{name}.pem")), pem("CERTIFICATE", &self.cert)).map_err(write_err(dir))?;
        let key = zeroize::Zeroizing::new(self.key.serialize_pem());
        write_private(&dir.join(format!("{name}-key.pem")), key.as_bytes()).map_err(write_err(dir))
    }

    fn read(dir: &Path, name: &str) -> Result<Pair, Error> {
        let file = |f: String| dir.join(f);
        let missing = |f: &str, source| Error::CaMissing { dir: dir_str(dir), file: f.into(), source };
        let invalid = |f: &str, detail: String| Error::CaInvalid { dir: dir_str(dir), file: f.into(), detail };
        let cert_file = format!("{name}.pem");
        let key_file = format!("{name}-key.pem");
        let cert = read_certs(&file(cert_file.clone()))
            .map_err(|e| match fs::metadata(file(cert_file.clone())) {
                Err(source) => missing(&cert_file, source),
                Ok(_) => invalid(&cert_file, e),
            })?
            .remove(0);
        let key_pem =
            zeroize::Zeroizing::new(fs::read_to_string(file(key_file.clone())).map_err(|e| missing(&key_file, e))?);
        let key = KeyPair::from_pem(&key_pem).map_err(|e| invalid(&key_file, e.to_string()))?;
        Ok(Pair { cert, key })
    }
}

/// Creates a new CA directory: root, intermediate, node-credential CA, bundle.
pub fn init(dir: &Path, td: &TrustDomain) -> Result<(), Error> {
    if dir.join(TRUST_DOMAIN).exists() || dir.join(format!("{ROOT}-key.pem")).exists() {
        return Err(Error::CaExists(dir_str(dir)));
    }
    fs::create_dir_all(dir).map_err(write_err(dir))?;
    let root = Pair::generate_ca(&format!("meshless root CA for {td}"), td, ROOT_TTL, None, None)?;
    let intermediate =
        Pair::generate_ca(&format!("meshless intermediate CA for {td}"), td, INTERMEDIATE_TTL, Some(0), Some(&root))?;
    let node_ca = Pair::generate_ca(&format!("meshless node credential CA for {td}"), td, ROOT_TTL, Some(0), None)?;
    fs::write(dir.join(TRUST_DOMAIN), format!("{td}\n")).map_err(write_err(dir))?;
    root.write(dir, ROOT)?;
    intermediate.write(dir, INTERMEDIATE)?;
    node_ca.write(dir, NODE_CA)?;
    fs::write(dir.join(BUNDLE), pem("CERTIFICATE", &root.cert)).map_err(write_err(dir))?;
    let jwt = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(Error::KeyGen)?;
    write_private(&dir.join(JWT_KEY), zeroize::Zeroizing::new(jwt.serialize_pem()).as_bytes())
        .map_err(write_err(dir))?;
    Ok(())
}

/// The JWT authority of a CA directory, if it has one (CA directories made before JWT-SVIDs
/// have none: the issuer then signs X.509-SVIDs only).
fn read_jwt_authority(dir: &Path) -> Result<Option<jwt::Authority>, Error> {
    let path = dir.join(JWT_KEY);
    let text = match fs::read_to_string(&path) {
        Ok(t) => zeroize::Zeroizing::new(t),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(Error::CaMissing { dir: dir_str(dir), file: JWT_KEY.into(), source }),
    };
    let invalid = |detail: String| Error::CaInvalid { dir: dir_str(dir), file: JWT_KEY.into(), detail };
    let key = KeyPair::from_pem(&text).map_err(|e| invalid(e.to_string()))?;
    jwt::Authority::from_pkcs8(&zeroize::Zeroizing::new(key.serialize_der())).map(Some).map_err(invalid)
}

pub fn trust_domain(dir: &Path) -> Result<TrustDomain, Error> {
    let text = fs::read_to_string(dir.join(TRUST_DOMAIN)).map_err(|source| Error::CaMissing {
        dir: dir_str(dir),
        file: TRUST_DOMAIN.into(),
        source,
    })?;
    TrustDomain::new(text.trim()).map_err(|e| Error::CaInvalid {
        dir: dir_str(dir),
        file: TRUST_DOMAIN.into(),
        detail: e.to_string(),
    })
}

/// The roots of a bundle file.
pub fn read_bundle(path: &Path) -> Result<Vec<CertificateDer<'static>>, Error> {
    read_certs(path).map_err(Error::Bundle)
}

/// The node-credential CA certificate (what the issuer trusts to authenticate nodes).
pub fn node_ca(dir: &Path) -> Result<CertificateDer<'static>, Error> {
    read_certs(&dir.join(format!("{NODE_CA}.pem"))).map(|mut c| c.remove(0)).map_err(|detail| Error::CaInvalid {
        dir: dir_str(dir),
        file: format!("{NODE_CA}.pem"),
        detail,
    })
}

/// Issues the credential of node `node` (a client certificate signed by the node CA), as PEM
/// (certificate, key). The key is generated here, handed to the node's agent and nothing else.
pub fn node_credential(dir: &Path, node: &str) -> Result<(String, zeroize::Zeroizing<String>), Error> {
    let td = trust_domain(dir)?;
    let node_ca = Pair::read(dir, NODE_CA)?;
    let id = node_id(&td, node)?;
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(Error::KeyGen)?;
    let mut params = leaf_params(&id, NODE_CREDENTIAL_TTL, true)?;
    params.distinguished_name.push(DnType::CommonName, node);
    let cert =
        params.signed_by(&key, &node_ca.issuer()?).map_err(|source| Error::Issue { id: id.to_string(), source })?;
    Ok((cert.pem(), zeroize::Zeroizing::new(key.serialize_pem())))
}

/// What signs workload certificates: the intermediate, with the bundle to hand out.
pub struct Signer {
    pub trust_domain: TrustDomain,
    intermediate: Pair,
    roots: Vec<CertificateDer<'static>>,
    signer: String,
    jwt: Option<jwt::Authority>,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("trust_domain", &self.trust_domain.to_string())
            .field("signer", &self.signer)
            .finish()
    }
}

impl Signer {
    /// Loads the intermediate and the bundle of a CA directory (the root key is not read).
    pub fn load(dir: &Path) -> Result<Signer, Error> {
        let trust_domain = trust_domain(dir)?;
        let intermediate = Pair::read(dir, INTERMEDIATE)?;
        let roots = read_bundle(&dir.join(BUNDLE))?;
        let signer = crate::identity::serial_of(&intermediate.cert);
        let jwt = read_jwt_authority(dir)?;
        Ok(Signer { trust_domain, intermediate, roots, signer, jwt })
    }

    pub fn bundle(&self) -> Bundle {
        Bundle {
            trust_domain: self.trust_domain.clone(),
            roots: self.roots.clone(),
            signer: self.signer.clone(),
            jwks: self.jwt.as_ref().map(|a| jwt::jwks(&[a.jwk()])).unwrap_or_default(),
        }
    }

    /// Signs a JWT-SVID for `id` (of this trust domain) and `audience`, valid for `ttl`.
    pub fn sign_jwt(&self, id: &SpiffeId, audience: &[String], ttl: Duration) -> Result<String, Error> {
        if id.trust_domain() != &self.trust_domain {
            return Err(Error::Refused(format!("{id} is not in trust domain {}", self.trust_domain)));
        }
        let authority = self.jwt.as_ref().ok_or_else(|| {
            Error::Refused(format!("the CA directory has no {JWT_KEY}: this trust domain issues no JWT-SVIDs"))
        })?;
        authority.sign(id, audience, ttl).map_err(Error::Refused)
    }

    /// Signs a certificate for `id` with the public key of `csr` (DER; its signature is verified,
    /// its requested names and extensions are ignored): `id` is the only name. Returns the chain,
    /// leaf first.
    pub fn sign_csr(&self, csr: &[u8], id: &SpiffeId, ttl: Duration) -> Result<Vec<CertificateDer<'static>>, Error> {
        let csr = CertificateSigningRequestParams::from_der(&csr.into())
            .map_err(|e| Error::Refused(format!("the CSR is not valid: {e}")))?;
        if csr.public_key.algorithm() != &PKCS_ECDSA_P256_SHA256 {
            return Err(Error::Refused("the CSR's key must be ECDSA P-256".into()));
        }
        self.sign_key(&csr.public_key, id, ttl)
    }

    fn sign_key(
        &self,
        key: &impl PublicKeyData,
        id: &SpiffeId,
        ttl: Duration,
    ) -> Result<Vec<CertificateDer<'static>>, Error> {
        if id.trust_domain() != &self.trust_domain {
            return Err(Error::Refused(format!("{id} is not in trust domain {}", self.trust_domain)));
        }
        let params = leaf_params(id, ttl, false)?;
        let cert = params
            .signed_by(key, &self.intermediate.issuer()?)
            .map_err(|source| Error::Issue { id: id.to_string(), source })?;
        Ok(vec![cert.der().clone(), self.intermediate.cert.clone()])
    }

    /// Issues an SVID with a key generated here (the issuer's own certificate, `ca issue`, the
    /// development CA).
    pub fn issue(&self, id: &SpiffeId, ttl: Duration) -> Result<Svid, Error> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(Error::KeyGen)?;
        let chain = self.sign_key(&key, id, ttl)?;
        Ok(Svid::new(id.clone(), chain, key))
    }
}

/// The development mode's certificate source: the agent signs its pods' CSRs itself with a CA
/// directory it can read (which means the node holds a CA key: never in production).
pub struct LocalCa {
    pub signer: Signer,
    pub ttl: Duration,
}

impl CertificateSource for LocalCa {
    fn sign<'a>(
        &'a self,
        id: &'a SpiffeId,
        csr: &'a [u8],
    ) -> BoxFuture<'a, Result<(Vec<CertificateDer<'static>>, Bundle), Error>> {
        Box::pin(async move { Ok((self.signer.sign_csr(csr, id, self.ttl)?, self.signer.bundle())) })
    }

    fn bundle(&self) -> BoxFuture<'_, Result<Bundle, Error>> {
        Box::pin(async move { Ok(self.signer.bundle()) })
    }

    fn bootstrap(&self) -> Result<Bundle, Error> {
        Ok(self.signer.bundle())
    }

    fn sign_jwt<'a>(
        &'a self,
        id: &'a SpiffeId,
        audience: &'a [String],
    ) -> BoxFuture<'a, Result<(String, Bundle), Error>> {
        Box::pin(async move { Ok((self.signer.sign_jwt(id, audience, JWT_SVID_TTL)?, self.signer.bundle())) })
    }
}

/// Lifetime of a JWT-SVID (the issuer's `--jwt-svid-ttl` default): bearer tokens live short.
pub const JWT_SVID_TTL: Duration = Duration::from_secs(300);

/// A step of a root rotation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RotateStage {
    /// Create a new root and intermediate and trust the new root beside the old one.
    Add,
    /// Sign with the new intermediate (agents re-issue their certificates); both roots trusted.
    Switch,
    /// Trust only the new root.
    Retire,
}

/// Performs one step of a root rotation; returns what it did, for the operator.
pub fn rotate(dir: &Path, stage: RotateStage) -> Result<String, Error> {
    let td = trust_domain(dir)?;
    let next = dir.join(NEXT);
    let retired = dir.join(RETIRED);
    let rot = |m: &str| Error::Rotation(m.to_string());
    match stage {
        RotateStage::Add => {
            if next.exists() {
                return Err(rot("a rotation is already under way (next/ exists): run `switch`"));
            }
            if retired.exists() {
                return Err(rot("the previous rotation is not finished (retired/ exists): run `retire`"));
            }
            let root = Pair::generate_ca(&format!("meshless root CA for {td}"), &td, ROOT_TTL, None, None)?;
            let intermediate = Pair::generate_ca(
                &format!("meshless intermediate CA for {td}"),
                &td,
                INTERMEDIATE_TTL,
                Some(0),
                Some(&root),
            )?;
            let tmp = dir.join("next.tmp");
            let _ = fs::remove_dir_all(&tmp);
            fs::create_dir_all(&tmp).map_err(write_err(dir))?;
            root.write(&tmp, ROOT)?;
            intermediate.write(&tmp, INTERMEDIATE)?;
            fs::rename(&tmp, &next).map_err(write_err(dir))?;
            let mut bundle = read_bundle(&dir.join(BUNDLE))?;
            bundle.push(root.cert.clone());
            write_bundle(dir, &bundle)?;
            Ok(format!(
                "added a new root (serial {}); agents now trust both roots. When every agent has the new \
                 bundle, run `meshless ca rotate switch`",
                crate::identity::serial_of(&root.cert)
            ))
        }
        RotateStage::Switch => {
            if !next.exists() {
                return Err(rot("no new root to switch to: run `add` first"));
            }
            fs::create_dir_all(&retired).map_err(write_err(dir))?;
            for name in [ROOT, INTERMEDIATE] {
                for file in [format!("{name}.pem"), format!("{name}-key.pem")] {
                    fs::rename(dir.join(&file), retired.join(&file)).map_err(write_err(dir))?;
                    fs::rename(next.join(&file), dir.join(&file)).map_err(write_err(dir))?;
                }
            }
            fs::remove_dir_all(&next).map_err(write_err(dir))?;
            Ok("the new intermediate signs now; agents re-issue their certificates. When every certificate \
                has been re-issued, run `meshless ca rotate retire`"
                .into())
        }
        RotateStage::Retire => {
            if !retired.exists() {
                return Err(rot("nothing to retire: run `add` and `switch` first"));
            }
            let old = Pair::read(&retired, ROOT)?;
            let bundle: Vec<_> = read_bundle(&dir.join(BUNDLE))?.into_iter().filter(|c| *c != old.cert).collect();
            write_bundle(dir, &bundle)?;
            fs::remove_dir_all(&retired).map_err(write_err(dir))?;
            Ok(format!(
                "retired the old root (serial {}); only the new root is trusted",
                crate::identity::serial_of(&old.cert)
            ))
        }
    }
}

fn write_bundle(dir: &Path, roots: &[CertificateDer<'static>]) -> Result<(), Error> {
    let text: String = roots.iter().map(|c| pem("CERTIFICATE", c)).collect();
    let tmp = dir.join("bundle.pem.tmp");
    fs::write(&tmp, text).map_err(write_err(dir))?;
    fs::rename(&tmp, dir.join(BUNDLE)).map_err(write_err(dir))
}

/// Paths an issuer watches for changes (a rotation step).
pub fn watched_files(dir: &Path) -> Vec<PathBuf> {
    vec![dir.join(BUNDLE), dir.join(format!("{INTERMEDIATE}.pem"))]
}

#[cfg(test)]
mod tests {
    use super::*;

    pub fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("meshless-ca-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    fn td() -> TrustDomain {
        TrustDomain::new("cluster.local").unwrap()
    }

    #[test]
    fn init_writes_private_keys_0600_and_refuses_to_overwrite() {
        let dir = tmp("init");
        init(&dir, &td()).unwrap();
        assert!(matches!(init(&dir, &td()), Err(Error::CaExists(_))));
        for key in ["root-key.pem", "intermediate-key.pem", "node-ca-key.pem", "jwt-key.pem"] {
            let mode = std::os::unix::fs::PermissionsExt::mode(&fs::metadata(dir.join(key)).unwrap().permissions());
            assert_eq!(mode & 0o777, 0o600, "{key} must be private");
        }
        assert_eq!(trust_domain(&dir).unwrap(), td());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_jwt_authority_signs_for_its_trust_domain_only_and_is_published_in_the_bundle() {
        let dir = tmp("jwt");
        init(&dir, &td()).unwrap();
        let signer = Signer::load(&dir).unwrap();
        let id = crate::identity::workload_id(&td(), "shop", "web").unwrap();
        let token = signer.sign_jwt(&id, &["db".into()], JWT_SVID_TTL).unwrap();
        let bundle = signer.bundle();
        let valid =
            jwt::validate(&token, "db", |t| (t == &td()).then(|| bundle.jwks.clone()), std::time::SystemTime::now());
        assert_eq!(valid.unwrap().sub, id);
        let foreign = SpiffeId::new("spiffe://evil.example/ns/shop/sa/web").unwrap();
        assert!(signer.sign_jwt(&foreign, &["db".into()], JWT_SVID_TTL).is_err());
        // A CA directory made before JWT-SVIDs: X.509 only, and said so.
        fs::remove_file(dir.join(JWT_KEY)).unwrap();
        let old = Signer::load(&dir).unwrap();
        assert!(old.bundle().jwks.is_empty());
        assert!(old.sign_jwt(&id, &["db".into()], JWT_SVID_TTL).unwrap_err().to_string().contains("no jwt-key.pem"));
        fs::write(dir.join(JWT_KEY), "not a key").unwrap();
        assert!(matches!(Signer::load(&dir), Err(Error::CaInvalid { .. })));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_csr_is_signed_for_the_requested_id_only_with_the_requesters_key() {
        let dir = tmp("sign");
        init(&dir, &td()).unwrap();
        let signer = Signer::load(&dir).unwrap();
        let id = crate::identity::workload_id(&td(), "shop", "web").unwrap();
        let (key, csr) = crate::identity::key_and_csr(&id).unwrap();
        let chain = signer.sign_csr(&csr, &id, Duration::from_secs(60)).unwrap();
        assert_eq!(chain.len(), 2, "leaf + intermediate");
        assert_eq!(crate::identity::spiffe_id_of(&chain[0]).unwrap(), id);
        let (_, leaf) = x509_parser::parse_x509_certificate(&chain[0]).unwrap();
        assert_eq!(leaf.public_key().raw, key.subject_public_key_info().as_slice(), "the requester's key");
        let lifetime = leaf.validity().not_after.timestamp() - leaf.validity().not_before.timestamp();
        assert_eq!(lifetime, 60 + BACKDATE.as_secs() as i64, "the lifetime asked for, back-dated for skew");
        let other_td = crate::identity::workload_id(&TrustDomain::new("other.local").unwrap(), "a", "b").unwrap();
        assert!(signer.sign_csr(&csr, &other_td, Duration::from_secs(60)).is_err(), "another trust domain");
        assert!(signer.sign_csr(b"not a csr", &id, Duration::from_secs(60)).is_err(), "garbage");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_rotation_goes_add_switch_retire_and_refuses_steps_out_of_order() {
        let dir = tmp("rotate");
        init(&dir, &td()).unwrap();
        let before = Signer::load(&dir).unwrap();
        assert!(rotate(&dir, RotateStage::Switch).is_err(), "switch before add");
        assert!(rotate(&dir, RotateStage::Retire).is_err(), "retire before switch");
        rotate(&dir, RotateStage::Add).unwrap();
        assert!(rotate(&dir, RotateStage::Add).is_err(), "add twice");
        let added = Signer::load(&dir).unwrap();
        assert_eq!(added.bundle().roots.len(), 2, "both roots trusted");
        assert_eq!(added.bundle().signer, before.bundle().signer, "the old intermediate still signs");
        rotate(&dir, RotateStage::Switch).unwrap();
        let switched = Signer::load(&dir).unwrap();
        assert_ne!(switched.bundle().signer, before.bundle().signer, "the new intermediate signs");
        assert_eq!(switched.bundle().roots.len(), 2);
        rotate(&dir, RotateStage::Retire).unwrap();
        let retired = Signer::load(&dir).unwrap();
        assert_eq!(retired.bundle().roots.len(), 1, "only the new root");
        assert_eq!(retired.bundle().roots[0], added.bundle().roots[1]);
        fs::remove_dir_all(&dir).unwrap();
    }
}
