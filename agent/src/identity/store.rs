//! The node's certificate store: one live X.509-SVID per enrolled pod, renewed before it expires,
//! and the TLS configurations that present whichever certificate is current.
//!
//! A certificate is issued when its pod is enrolled (before its first connection leaves), then
//! renewed at `--renew-fraction` of its lifetime (default ½, with ±10 % jitter so a node's pods do
//! not renew at once). A failed renewal is retried with exponential backoff (1 s doubling to 60 s,
//! or to a quarter of the lifetime if that is shorter) while the current certificate keeps serving; past its expiry the pod's identity fails closed
//! (its handshakes fail, with one clear log line) until a renewal succeeds. The trust bundle is
//! refreshed from the source every `--bundle-refresh`; when the source names a new signing CA (a
//! root rotation), every certificate is renewed within seconds. The TLS configurations read the
//! current certificate through a resolver at each handshake: a renewed certificate is used by the
//! next handshake without rebuilding anything; client configurations are kept per destination
//! identity so that TLS session resumption works.

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwapOption;
use parking_lot::Mutex;
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, ServerConfig, SignatureScheme};
use tokio::sync::{watch, Notify};
use tracing::{error, info, warn};

use super::verify::{ClientVerifier, ServerVerifier, Trust};
use super::{key_and_csr, Bundle, CertificateSource, Error, SpiffeId, Svid, TrustDomain, ALPN_H2};

/// How certificates are kept fresh.
#[derive(Clone, Debug)]
pub struct Rotation {
    /// Renew at this fraction of a certificate's lifetime.
    pub renew_fraction: f64,
    /// How often the trust bundle is fetched again.
    pub bundle_refresh: Duration,
}

const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(60);
/// After the signing CA changes, certificates are renewed within this long (spread out).
const RESIGN_SPREAD: Duration = Duration::from_secs(5);

/// A certificate as issued.
pub struct Issued {
    pub svid: Svid,
    pub key: Arc<CertifiedKey>,
    pub not_after: SystemTime,
    pub serial: String,
    /// When this agent took it (the pod's last rotation).
    pub installed: SystemTime,
}

/// One pod's identity: its current certificate (none once expired), swapped in place.
pub struct LiveCert {
    pub id: SpiffeId,
    /// The pod it belongs to, for logs.
    pub pod: String,
    current: ArcSwapOption<Issued>,
    schedule: Mutex<Schedule>,
    /// Bumped at every renewal and at expiry (the Workload API and the pool watch it).
    generation: watch::Sender<u64>,
}

struct Schedule {
    /// When to renew next (or retry a failed renewal).
    next: Instant,
    failures: u32,
    not_after: SystemTime,
    /// The certificate's lifetime: retries are spaced at most a quarter of it apart.
    lifetime: Duration,
    expired: bool,
}

impl LiveCert {
    /// The certificate to present, if there is a valid one.
    pub fn certified(&self) -> Option<Arc<CertifiedKey>> {
        self.current.load().as_ref().map(|i| i.key.clone())
    }

    pub fn issued(&self) -> Option<Arc<Issued>> {
        self.current.load_full()
    }

    pub fn generation(&self) -> u64 {
        *self.generation.borrow()
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }
}

/// The certificates of this node's pods.
pub struct Identities {
    source: Arc<dyn CertificateSource>,
    pub trust: Arc<Trust>,
    pub trust_domain: TrustDomain,
    rotation: Rotation,
    live: Mutex<Vec<Weak<LiveCert>>>,
    wake: Notify,
    /// JWT-SVIDs handed out, per (identity, audiences), with when to sign a new one.
    jwts: Mutex<HashMap<JwtKey, (String, SystemTime)>>,
    /// What the metrics count of certificates.
    pub counts: CertCounts,
}

/// Certificates signed (first ones and renewals), renewals, and requests that failed.
#[derive(Debug, Default)]
pub struct CertCounts {
    pub signed: std::sync::atomic::AtomicU64,
    pub rotations: std::sync::atomic::AtomicU64,
    pub errors: std::sync::atomic::AtomicU64,
}

/// A JWT-SVID's identity and its sorted, deduplicated audiences.
type JwtKey = (SpiffeId, Vec<String>);

/// JWT-SVIDs kept for reuse, at most (then the expired go, then all).
const MAX_CACHED_JWTS: usize = 4096;
/// JWT-SVIDs kept per identity (audience sets), at most (then that identity's go).
const MAX_JWTS_PER_IDENTITY: usize = 32;

impl Identities {
    /// Fetches the trust bundle from `source` (or starts from its locally configured one when it
    /// cannot be reached) and returns the store; its [`Identities::run`] task keeps certificates
    /// fresh.
    pub async fn new(source: Arc<dyn CertificateSource>, rotation: Rotation) -> Result<Arc<Identities>, Error> {
        let bundle = match source.bundle().await {
            Ok(b) => b,
            Err(e) => {
                warn!(error = %e, "cannot reach the certificate source; starting from the configured trust bundle");
                source.bootstrap()?
            }
        };
        let trust = Arc::new(Trust::new(&bundle, super::provider())?);
        Ok(Arc::new(Identities {
            source,
            trust,
            trust_domain: bundle.trust_domain,
            rotation,
            live: Mutex::new(Vec::new()),
            wake: Notify::new(),
            jwts: Mutex::new(HashMap::new()),
            counts: CertCounts::default(),
        }))
    }

    /// A JWT-SVID for `id` and `audience` (deduplicated, order ignored): the one handed out
    /// before while more than half its life is left, else a new one from the source, checked as
    /// a relying party would check it (signed by a published authority, for this identity and
    /// every audience asked for) before anyone gets it.
    pub async fn jwt_svid(&self, id: &SpiffeId, audience: &[String]) -> Result<String, Error> {
        let mut audience = audience.to_vec();
        audience.sort();
        audience.dedup();
        let key = (id.clone(), audience);
        let now = SystemTime::now();
        if let Some((token, renew_at)) = self.jwts.lock().get(&key) {
            if *renew_at > now {
                return Ok(token.clone());
            }
        }
        let (token, bundle) = self.source.sign_jwt(id, &key.1).await?;
        // As any bundle from the source: a new signing CA re-issues the certificates too.
        self.follow(&bundle);
        let bad = |why: String| Error::BadCertificate(format!("JWT-SVID for {id}: {why}"));
        let first = key.1.first().ok_or_else(|| bad("no audience".into()))?;
        let valid =
            super::jwt::validate(&token, first, |td| self.trust.jwks(td), now).map_err(|e| bad(e.to_string()))?;
        if valid.sub != *id || !key.1.iter().all(|a| valid.audience.contains(a)) {
            return Err(bad(format!("issued for {} and {:?}", valid.sub, valid.audience)));
        }
        let expiry = SystemTime::UNIX_EPOCH + Duration::from_secs(valid.expiry);
        let renew_at = now + expiry.duration_since(now).unwrap_or_default() / 2;
        let mut cache = self.jwts.lock();
        // One identity's many audience sets cannot push the others' tokens out.
        if cache.keys().filter(|(i, _)| i == id).count() >= MAX_JWTS_PER_IDENTITY {
            cache.retain(|(i, _), _| i != id);
        }
        if cache.len() >= MAX_CACHED_JWTS {
            cache.retain(|_, (_, r)| *r > now);
            if cache.len() >= MAX_CACHED_JWTS {
                cache.clear();
            }
        }
        cache.insert(key, (token.clone(), renew_at));
        Ok(token)
    }

    /// Issues the first certificate of `pod` (with identity `id`) and keeps it renewed for as
    /// long as the returned handle lives.
    pub async fn issue(&self, pod: &str, id: &SpiffeId) -> Result<Arc<LiveCert>, Error> {
        let issued = self.sign(id).await?;
        let cert = Arc::new(LiveCert {
            id: id.clone(),
            pod: pod.to_string(),
            schedule: Mutex::new(Schedule {
                next: self.renewal_time(issued.not_after),
                failures: 0,
                not_after: issued.not_after,
                lifetime: life(issued.not_after),
                expired: false,
            }),
            current: ArcSwapOption::new(Some(Arc::new(issued))),
            generation: watch::channel(1).0,
        });
        self.live.lock().push(Arc::downgrade(&cert));
        self.wake.notify_one();
        Ok(cert)
    }

    /// TLS contexts for a pod presenting `cert`.
    pub fn pod_tls(&self, cert: Arc<LiveCert>) -> Result<PodTls, Error> {
        PodTls::new(cert, self.trust.clone(), &self.trust_domain)
    }

    async fn sign(&self, id: &SpiffeId) -> Result<Issued, Error> {
        use std::sync::atomic::Ordering::Relaxed;
        let result = self.sign_checked(id).await;
        match &result {
            Ok(_) => self.counts.signed.fetch_add(1, Relaxed),
            Err(_) => self.counts.errors.fetch_add(1, Relaxed),
        };
        result
    }

    async fn sign_checked(&self, id: &SpiffeId) -> Result<Issued, Error> {
        let (key, csr) = key_and_csr(id)?;
        let (chain, bundle) = self.source.sign(id, &csr).await?;
        self.follow(&bundle);
        // The spiffe crate checks what came back: an X.509-SVID (leaf rules, one SPIFFE ID) whose
        // public key is the one generated here.
        let der: Vec<u8> = chain.iter().flat_map(|c| c.iter().copied()).collect();
        let key_der = zeroize::Zeroizing::new(key.serialize_der());
        let checked =
            spiffe::X509Svid::parse_from_der(&der, &key_der).map_err(|e| Error::BadCertificate(e.to_string()))?;
        if checked.spiffe_id() != id {
            return Err(Error::BadCertificate(format!("asked for {id}, got {}", checked.spiffe_id())));
        }
        let svid = Svid::new(id.clone(), chain, key);
        let certified = svid.certified_key(self.trust.provider())?;
        Ok(Issued {
            not_after: svid.not_after(),
            serial: svid.serial(),
            key: certified,
            svid,
            installed: SystemTime::now(),
        })
    }

    /// Takes a bundle from the source; a new signing CA makes every certificate renew soon.
    fn follow(&self, bundle: &Bundle) {
        let previous = self.trust.signer();
        match self.trust.update(bundle) {
            Ok(false) => {}
            Ok(true) => {
                info!(roots = bundle.roots.len(), signer = %bundle.signer, "trust bundle updated");
                if bundle.signer != previous {
                    self.resign_all();
                }
            }
            Err(e) => warn!(error = %e, "the issuer's trust bundle is not usable; keeping the previous one"),
        }
    }

    fn resign_all(&self) {
        let now = Instant::now();
        for cert in self.live() {
            let spread = Duration::from_millis(fastrand::u64(0..RESIGN_SPREAD.as_millis() as u64));
            cert.schedule.lock().next = now + spread;
        }
        info!("the signing CA changed; re-issuing every certificate");
        self.wake.notify_one();
    }

    fn live(&self) -> Vec<Arc<LiveCert>> {
        let mut live = self.live.lock();
        live.retain(|w| w.strong_count() > 0);
        live.iter().filter_map(Weak::upgrade).collect()
    }

    /// When to renew a certificate valid until `not_after`: at the configured fraction of the
    /// time left, ±10 % of it.
    fn renewal_time(&self, not_after: SystemTime) -> Instant {
        let left = not_after.duration_since(SystemTime::now()).unwrap_or_default();
        let jitter = 0.1 * (fastrand::f64() * 2.0 - 1.0);
        let fraction = (self.rotation.renew_fraction.clamp(0.05, 0.95) + jitter).clamp(0.0, 1.0);
        Instant::now() + left.mul_f64(fraction)
    }

    /// Keeps every live certificate fresh and the bundle current, until the process ends.
    pub async fn run(self: Arc<Self>) {
        let mut refresh = tokio::time::interval(self.rotation.bundle_refresh);
        refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let next = self.next_wake();
            tokio::select! {
                _ = tokio::time::sleep_until(next.into()) => {}
                _ = self.wake.notified() => continue,
                _ = refresh.tick() => {
                    match self.source.bundle().await {
                        Ok(bundle) => self.follow(&bundle),
                        Err(e) => warn!(error = %e, "cannot refresh the trust bundle; keeping the current one"),
                    }
                    continue;
                }
            }
            let now = Instant::now();
            let due: Vec<Arc<LiveCert>> = self.live().into_iter().filter(|c| self.expire_or_due(c, now)).collect();
            let renewals = due.iter().map(|c| self.renew(c));
            futures_util::future::join_all(renewals).await;
        }
    }

    fn next_wake(&self) -> Instant {
        let far = Instant::now() + Duration::from_secs(3600);
        self.live()
            .iter()
            .map(|c| {
                let s = c.schedule.lock();
                let expiry = if s.expired { far } else { instant_of(s.not_after) };
                s.next.min(expiry)
            })
            .min()
            .unwrap_or(far)
    }

    /// Marks `cert` expired if it is (failing closed), and says whether a renewal is due.
    fn expire_or_due(&self, cert: &LiveCert, now: Instant) -> bool {
        let mut s = cert.schedule.lock();
        if !s.expired && SystemTime::now() >= s.not_after {
            s.expired = true;
            cert.current.store(None);
            cert.generation.send_modify(|g| *g += 1);
            error!(pod = %cert.pod, id = %cert.id,
                "certificate expired and could not be renewed; this identity's connections fail until the issuer is reachable again");
        }
        s.next <= now
    }

    async fn renew(&self, cert: &LiveCert) {
        match self.sign(&cert.id).await {
            Ok(issued) => {
                let mut s = cert.schedule.lock();
                let recovered = s.expired;
                s.next = self.renewal_time(issued.not_after);
                s.not_after = issued.not_after;
                s.lifetime = life(issued.not_after);
                s.failures = 0;
                s.expired = false;
                info!(pod = %cert.pod, id = %cert.id, serial = %issued.serial, recovered, "certificate renewed");
                self.counts.rotations.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                cert.current.store(Some(Arc::new(issued)));
                cert.generation.send_modify(|g| *g += 1);
            }
            Err(e) => {
                let mut s = cert.schedule.lock();
                let cap = RETRY_MAX.min(s.lifetime / 4).max(RETRY_FIRST);
                let delay = RETRY_FIRST.saturating_mul(1 << s.failures.min(6)).min(cap);
                s.failures += 1;
                s.next = Instant::now() + delay;
                let left = s.not_after.duration_since(SystemTime::now()).unwrap_or_default();
                warn!(pod = %cert.pod, id = %cert.id, error = %e, attempt = s.failures, retry_in_ms = delay.as_millis() as u64,
                    valid_for_s = left.as_secs(), "certificate renewal failed; the current certificate keeps serving");
            }
        }
    }
}

/// The time left to a certificate just issued: its lifetime, as far as renewal is concerned.
fn life(not_after: SystemTime) -> Duration {
    not_after.duration_since(SystemTime::now()).unwrap_or_default()
}

fn instant_of(t: SystemTime) -> Instant {
    match t.duration_since(SystemTime::now()) {
        Ok(d) => Instant::now() + d,
        Err(_) => Instant::now(),
    }
}

/// TLS contexts of one pod: the server side of its tunnel listener, and client contexts per
/// destination identity (kept, so that session resumption works). Both present the pod's
/// current certificate.
pub struct PodTls {
    pub id: SpiffeId,
    pub cert: Arc<LiveCert>,
    pub server: Arc<ServerConfig>,
    trust: Arc<Trust>,
    /// Client contexts by destination identity, with the certificate generation they were made
    /// for: a renewed certificate starts fresh ones, so that no session resumed from an earlier
    /// handshake carries the old certificate's identity.
    clients: Mutex<HashMap<SpiffeId, (u64, Arc<ClientConfig>)>>,
}

/// Presents a pod's current certificate (none once it expired: the handshake then fails).
#[derive(Debug)]
struct Current(Arc<LiveCert>);

impl std::fmt::Debug for LiveCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveCert").field("id", &self.id.to_string()).field("pod", &self.pod).finish()
    }
}

impl rustls::server::ResolvesServerCert for Current {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.certified()
    }
}

impl rustls::client::ResolvesClientCert for Current {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        self.0.certified()
    }
    fn has_certs(&self) -> bool {
        true
    }
}

impl PodTls {
    pub fn new(cert: Arc<LiveCert>, trust: Arc<Trust>, td: &TrustDomain) -> Result<PodTls, Error> {
        let verifier = Arc::new(ClientVerifier { trust: trust.clone(), trust_domain: td.clone() });
        let mut server = ServerConfig::builder_with_provider(trust.provider().clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(Arc::new(Current(cert.clone())));
        server.alpn_protocols = vec![ALPN_H2.to_vec()];
        Ok(PodTls { id: cert.id.clone(), cert, server: Arc::new(server), trust, clients: Mutex::new(HashMap::new()) })
    }

    /// A client context presenting this pod's certificate and accepting only `peer`. Kept per
    /// destination (TLS sessions resume) until this pod's certificate is renewed.
    pub fn client(&self, peer: &SpiffeId) -> Result<Arc<ClientConfig>, Error> {
        let generation = self.cert.generation();
        let mut clients = self.clients.lock();
        if let Some((g, cfg)) = clients.get(peer) {
            if *g == generation {
                return Ok(cfg.clone());
            }
        }
        let verifier = Arc::new(ServerVerifier { trust: self.trust.clone(), expected: peer.clone() });
        let mut cfg = ClientConfig::builder_with_provider(self.trust.provider().clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_cert_resolver(Arc::new(Current(self.cert.clone())));
        cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
        let cfg = Arc::new(cfg);
        clients.insert(peer.clone(), (generation, cfg.clone()));
        Ok(cfg)
    }

    /// Drops the client context of `peer` (and so its resumable sessions): the next connection
    /// makes a full handshake, seeing the peer's current certificate.
    pub fn forget_client(&self, peer: &SpiffeId) {
        self.clients.lock().remove(peer);
    }
}

/// The certificate store of a test: a development CA made in a scratch directory (removed once
/// loaded) for `cluster.local`, one-hour certificates. Unit tests of the data path and the pod
/// lifecycle build their identities with it.
#[cfg(test)]
pub(crate) async fn test_identities(name: &str) -> Arc<Identities> {
    use super::ca::{self, LocalCa, Signer};
    let dir = std::env::temp_dir().join(format!("meshless-ids-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    ca::init(&dir, &TrustDomain::new("cluster.local").expect("a valid trust domain")).expect("a CA directory");
    let source =
        Arc::new(LocalCa { signer: Signer::load(&dir).expect("the CA loads"), ttl: Duration::from_secs(3600) });
    let rotation = Rotation { renew_fraction: 0.5, bundle_refresh: Duration::from_secs(3600) };
    let ids = Identities::new(source, rotation).await.expect("the store starts");
    std::fs::remove_dir_all(&dir).expect("the scratch CA directory is removed");
    ids
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::ca::{self, LocalCa};
    use crate::identity::workload_id;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// A local CA that can be made unreachable.
    struct Flaky {
        ca: LocalCa,
        down: AtomicBool,
    }

    impl CertificateSource for Flaky {
        fn sign<'a>(
            &'a self,
            id: &'a SpiffeId,
            csr: &'a [u8],
        ) -> crate::identity::BoxFuture<'a, Result<(Vec<rustls::pki_types::CertificateDer<'static>>, Bundle), Error>>
        {
            Box::pin(async move {
                if self.down.load(Ordering::SeqCst) {
                    return Err(Error::Unreachable { addr: "test".into(), detail: "down".into() });
                }
                self.ca.sign(id, csr).await
            })
        }
        fn bundle(&self) -> crate::identity::BoxFuture<'_, Result<Bundle, Error>> {
            self.ca.bundle()
        }
        fn bootstrap(&self) -> Result<Bundle, Error> {
            self.ca.bootstrap()
        }
    }

    fn flaky(name: &str, ttl: Duration) -> (Arc<Flaky>, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("meshless-store-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        ca::init(&dir, &TrustDomain::new("cluster.local").unwrap()).unwrap();
        let signer = ca::Signer::load(&dir).unwrap();
        (Arc::new(Flaky { ca: LocalCa { signer, ttl }, down: AtomicBool::new(false) }), dir)
    }

    /// Rotation, failure, expiry and recovery on a real clock, with three-second certificates
    /// renewed at half their life.
    #[tokio::test]
    async fn certificates_renew_keep_serving_while_the_issuer_is_down_fail_closed_at_expiry_and_recover() {
        let (source, dir) = flaky("rotate", Duration::from_secs(3));
        let rotation = Rotation { renew_fraction: 0.5, bundle_refresh: Duration::from_secs(3600) };
        let ids = Identities::new(source.clone(), rotation).await.unwrap();
        tokio::spawn(ids.clone().run());
        let id = workload_id(&ids.trust_domain, "default", "a").unwrap();
        let cert = ids.issue("default/a", &id).await.unwrap();
        let first = cert.issued().unwrap().serial.clone();
        let mut changes = cert.subscribe();
        // Renewed on its own, before expiry (the 5-minute back-dating does not count as life).
        tokio::time::timeout(Duration::from_secs(10), changes.changed()).await.expect("renewed in time").unwrap();
        let second = cert.issued().expect("still valid").serial.clone();
        assert_ne!(first, second, "a renewal is a new certificate");
        // The issuer goes down: the current certificate keeps serving until it expires…
        source.down.store(true, Ordering::SeqCst);
        let until = cert.issued().unwrap().not_after;
        tokio::time::timeout(Duration::from_secs(10), changes.wait_for(|_| cert.certified().is_none()))
            .await
            .expect("it fails closed at expiry")
            .unwrap();
        assert!(SystemTime::now() >= until, "not before the certificate's end");
        // …and comes back by itself once the issuer does.
        source.down.store(false, Ordering::SeqCst);
        tokio::time::timeout(Duration::from_secs(10), changes.wait_for(|_| cert.certified().is_some()))
            .await
            .expect("recovered by itself")
            .unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn client_configs_are_kept_per_destination_so_sessions_resume() {
        let (source, dir) = flaky("clients", Duration::from_secs(3600));
        let rotation = Rotation { renew_fraction: 0.5, bundle_refresh: Duration::from_secs(3600) };
        let ids = Identities::new(source, rotation).await.unwrap();
        let id = workload_id(&ids.trust_domain, "default", "a").unwrap();
        let tls = ids.pod_tls(ids.issue("default/a", &id).await.unwrap()).unwrap();
        let b = workload_id(&ids.trust_domain, "default", "b").unwrap();
        let c = workload_id(&ids.trust_domain, "default", "c").unwrap();
        assert!(Arc::ptr_eq(&tls.client(&b).unwrap(), &tls.client(&b).unwrap()), "one config per destination");
        assert!(!Arc::ptr_eq(&tls.client(&b).unwrap(), &tls.client(&c).unwrap()));
        let before = tls.client(&b).unwrap();
        tls.forget_client(&b);
        assert!(!Arc::ptr_eq(&before, &tls.client(&b).unwrap()), "forgotten: a fresh config, no old session");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
