//! JWT-SVIDs (the SPIFFE JWT-SVID standard): a compact JWS signed with ES256 by the trust
//! domain's JWT authority — a P-256 key of its own in the CA directory, never the X.509 CA's —
//! whose public key is published as a JWKS in the trust bundle.
//!
//! Hand-written on ring, which rustls already links: a token is three base64url parts and one
//! ECDSA signature over two of them; a JOSE crate would add a dependency tree (and another
//! crypto backend) for that. What is accepted is kept narrow on purpose: header fields `alg`
//! (ES256 only), `kid` and `typ` (`JWT`/`JOSE`); `sub` a SPIFFE ID of a known trust domain;
//! `aud` naming the audience; `exp` in the future; `nbf`, if present, in the past.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ring::rand::SystemRandom;
use ring::signature::{
    EcdsaKeyPair, KeyPair as _, UnparsedPublicKey, ECDSA_P256_SHA256_FIXED, ECDSA_P256_SHA256_FIXED_SIGNING,
};
use serde_json::{json, Map, Value};

use super::{SpiffeId, TrustDomain};

/// A token longer than this is refused unread.
pub const MAX_TOKEN: usize = 16 << 10;
/// Audiences per token, at most.
pub const MAX_AUDIENCES: usize = 16;

/// Why a token was not accepted (said to the caller; never contains key material).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("JWT-SVID not valid: {0}")]
pub struct Invalid(pub String);

fn invalid(why: impl Into<String>) -> Invalid {
    Invalid(why.into())
}

/// The trust domain's JWT authority: signs JWT-SVIDs.
pub struct Authority {
    pair: EcdsaKeyPair,
    kid: String,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority").field("kid", &self.kid).finish_non_exhaustive()
    }
}

impl Authority {
    /// The authority of a PKCS#8 P-256 key (DER).
    pub fn from_pkcs8(der: &[u8]) -> Result<Authority, String> {
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, der, &SystemRandom::new())
            .map_err(|e| format!("not a PKCS#8 ECDSA P-256 key: {e}"))?;
        let kid = thumbprint(pair.public_key().as_ref());
        Ok(Authority { pair, kid })
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The public key as a JWK (RFC 7517), `kid` its RFC 7638 thumbprint.
    pub fn jwk(&self) -> Value {
        let point = self.pair.public_key().as_ref();
        json!({
            "kty": "EC", "crv": "P-256", "use": "jwt-svid", "kid": self.kid,
            "x": URL_SAFE_NO_PAD.encode(&point[1..33]), "y": URL_SAFE_NO_PAD.encode(&point[33..65]),
        })
    }

    /// A JWT-SVID for `sub`, for `audience` (1 to [`MAX_AUDIENCES`]), valid for `ttl`.
    pub fn sign(&self, sub: &SpiffeId, audience: &[String], ttl: Duration) -> Result<String, String> {
        if audience.is_empty() || audience.len() > MAX_AUDIENCES {
            return Err(format!("1 to {MAX_AUDIENCES} audiences, not {}", audience.len()));
        }
        let now = unix(SystemTime::now());
        let header = json!({ "alg": "ES256", "kid": self.kid, "typ": "JWT" });
        let claims = json!({ "sub": sub.to_string(), "aud": audience, "iat": now, "exp": now + ttl.as_secs().max(1) });
        let input = format!("{}.{}", b64_json(&header), b64_json(&claims));
        let sig = self.pair.sign(&SystemRandom::new(), input.as_bytes()).map_err(|e| format!("signing: {e}"))?;
        Ok(format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref())))
    }
}

/// A JWKS document (`{"keys": [...]}`) of these keys, as the bundle carries it.
pub fn jwks(keys: &[Value]) -> Vec<u8> {
    serde_json::to_vec(&json!({ "keys": keys })).unwrap_or_default()
}

/// What a valid token says.
#[derive(Debug, Clone, PartialEq)]
pub struct Validated {
    pub sub: SpiffeId,
    pub audience: Vec<String>,
    /// Seconds since the Unix epoch.
    pub expiry: u64,
    /// Every claim, as sent.
    pub claims: Map<String, Value>,
}

/// Validates `token` for `audience` against the JWKS of its subject's trust domain
/// (`jwks_of`), at `now`.
pub fn validate(
    token: &str,
    audience: &str,
    jwks_of: impl Fn(&TrustDomain) -> Option<Vec<u8>>,
    now: SystemTime,
) -> Result<Validated, Invalid> {
    if token.len() > MAX_TOKEN {
        return Err(invalid(format!("longer than {MAX_TOKEN} bytes")));
    }
    let mut parts = token.split('.');
    let (Some(h), Some(p), Some(s), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err(invalid("not a compact JWS (three dot-separated parts)"));
    };
    let header = decode_json(h, "header")?;
    for key in header.keys() {
        if !["alg", "kid", "typ"].contains(&key.as_str()) {
            return Err(invalid(format!("header field {key:?} is not allowed")));
        }
    }
    if header.get("alg").and_then(Value::as_str) != Some("ES256") {
        return Err(invalid("alg must be ES256"));
    }
    if let Some(typ) = header.get("typ") {
        if typ != "JWT" && typ != "JOSE" {
            return Err(invalid("typ must be JWT or JOSE"));
        }
    }
    let kid = header.get("kid").and_then(Value::as_str).ok_or_else(|| invalid("no kid in the header"))?;
    let claims = decode_json(p, "claims")?;
    let sub = claims.get("sub").and_then(Value::as_str).ok_or_else(|| invalid("no sub claim"))?;
    let sub = SpiffeId::new(sub).map_err(|e| invalid(format!("sub is not a SPIFFE ID: {e}")))?;
    let jwks = jwks_of(sub.trust_domain())
        .ok_or_else(|| invalid(format!("no JWT bundle for trust domain {}", sub.trust_domain())))?;
    let point = find_key(&jwks, kid)?;
    let sig = URL_SAFE_NO_PAD.decode(s).map_err(|_| invalid("the signature is not base64url"))?;
    let input = &token[..h.len() + 1 + p.len()];
    UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, &point)
        .verify(input.as_bytes(), &sig)
        .map_err(|_| invalid("the signature does not verify"))?;
    let aud: Vec<String> = match claims.get("aud") {
        Some(Value::String(a)) => vec![a.clone()],
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).map(str::to_owned).collect(),
        _ => return Err(invalid("no aud claim")),
    };
    if !aud.iter().any(|a| a == audience) {
        return Err(invalid(format!("audience {audience:?} is not among the token's")));
    }
    let now = unix(now);
    let expiry = claims.get("exp").and_then(Value::as_u64).ok_or_else(|| invalid("no exp claim"))?;
    if expiry <= now {
        return Err(invalid("expired"));
    }
    if claims.get("nbf").and_then(Value::as_u64).is_some_and(|nbf| nbf > now) {
        return Err(invalid("not valid yet (nbf)"));
    }
    Ok(Validated { sub, audience: aud, expiry, claims })
}

/// The expiry of a token this agent was given (not validated: for caching only).
pub fn expiry_unverified(token: &str) -> Option<u64> {
    let claims = decode_json(token.split('.').nth(1)?, "claims").ok()?;
    claims.get("exp").and_then(Value::as_u64)
}

/// The uncompressed point (04‖x‖y) of key `kid` in a JWKS.
fn find_key(jwks: &[u8], kid: &str) -> Result<Vec<u8>, Invalid> {
    let doc: Value = serde_json::from_slice(jwks).map_err(|_| invalid("the JWT bundle is not JSON"))?;
    let key = doc
        .get("keys")
        .and_then(Value::as_array)
        .and_then(|keys| keys.iter().find(|k| k.get("kid").and_then(Value::as_str) == Some(kid)))
        .ok_or_else(|| invalid(format!("no key {kid:?} in the trust domain's JWT bundle")))?;
    if key.get("kty").and_then(Value::as_str) != Some("EC") || key.get("crv").and_then(Value::as_str) != Some("P-256") {
        return Err(invalid(format!("key {kid:?} is not an EC P-256 key")));
    }
    let coord = |name: &str| {
        key.get(name)
            .and_then(Value::as_str)
            .and_then(|c| URL_SAFE_NO_PAD.decode(c).ok())
            .filter(|c| c.len() == 32)
            .ok_or_else(|| invalid(format!("key {kid:?}: {name} is not a 32-byte coordinate")))
    };
    let mut point = vec![4u8];
    point.extend(coord("x")?);
    point.extend(coord("y")?);
    Ok(point)
}

fn decode_json(part: &str, what: &str) -> Result<Map<String, Value>, Invalid> {
    let bytes = URL_SAFE_NO_PAD.decode(part).map_err(|_| invalid(format!("the {what} is not base64url")))?;
    match serde_json::from_slice(&bytes) {
        Ok(Value::Object(m)) => Ok(m),
        _ => Err(invalid(format!("the {what} is not a JSON object"))),
    }
}

fn b64_json(v: &Value) -> String {
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap_or_default())
}

/// The RFC 7638 thumbprint of a P-256 public key (04‖x‖y).
fn thumbprint(point: &[u8]) -> String {
    let canonical = format!(
        r#"{{"crv":"P-256","kty":"EC","x":"{}","y":"{}"}}"#,
        URL_SAFE_NO_PAD.encode(&point[1..33]),
        URL_SAFE_NO_PAD.encode(&point[33..65])
    );
    URL_SAFE_NO_PAD.encode(ring::digest::digest(&ring::digest::SHA256, canonical.as_bytes()))
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn authority() -> Authority {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        Authority::from_pkcs8(&key.serialize_der()).unwrap()
    }

    #[test]
    fn a_signed_token_validates_for_its_audience_and_nothing_else_does() {
        let (a, other) = (authority(), authority());
        let td = TrustDomain::new("cluster.local").unwrap();
        let sub = SpiffeId::new("spiffe://cluster.local/ns/shop/sa/web").unwrap();
        let bundle = jwks(&[a.jwk()]);
        let jwks_of = |t: &TrustDomain| (t == &td).then(|| bundle.clone());
        let now = SystemTime::now();
        let token = a.sign(&sub, &["db".into(), "cache".into()], Duration::from_secs(300)).unwrap();
        let ok = validate(&token, "cache", jwks_of, now).unwrap();
        assert_eq!((ok.sub, ok.audience.len()), (sub.clone(), 2));
        assert!(ok.expiry >= unix(now) + 299);
        let refused = |t: &str, aud: &str, at: SystemTime| validate(t, aud, jwks_of, at).unwrap_err().0;
        assert!(refused(&token, "other", now).contains("audience"));
        assert!(refused(&token, "db", now + Duration::from_secs(301)).contains("expired"));
        // Signed by a key the bundle does not hold (same kid forged, or its own).
        let foreign = other.sign(&sub, &["db".into()], Duration::from_secs(300)).unwrap();
        assert!(refused(&foreign, "db", now).contains("no key"));
        let forged = format!("{}.{}", token.rsplit_once('.').unwrap().0, foreign.rsplit_once('.').unwrap().1);
        assert!(refused(&forged, "db", now).contains("does not verify"));
        // Claims changed under the signature.
        let mut parts: Vec<&str> = token.split('.').collect();
        let evil = b64_json(&json!({"sub": "spiffe://cluster.local/ns/shop/sa/admin", "aud": ["db"], "exp": u64::MAX}));
        parts[1] = &evil;
        assert!(refused(&parts.join("."), "db", now).contains("does not verify"));
        // Other trust domains, algorithms and shapes.
        let elsewhere =
            a.sign(&SpiffeId::new("spiffe://evil.example/x").unwrap(), &["db".into()], Duration::from_secs(60));
        assert!(refused(&elsewhere.unwrap(), "db", now).contains("no JWT bundle"));
        let none_alg =
            format!("{}.{}.", b64_json(&json!({"alg": "none", "kid": a.kid()})), token.split('.').nth(1).unwrap());
        assert!(refused(&none_alg, "db", now).contains("ES256"));
        for junk in ["", "a.b", "a.b.c.d", "!!.??.##", &"x".repeat(MAX_TOKEN + 1)] {
            assert!(validate(junk, "db", jwks_of, now).is_err(), "{junk:.20}");
        }
        assert_eq!(expiry_unverified(&token), Some(ok.expiry));
        assert!(a.sign(&sub, &[], Duration::from_secs(1)).is_err(), "an audience is required");
    }
}
