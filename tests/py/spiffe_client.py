"""An application asking the SPIFFE Workload API with PyPI's `spiffe` package (grpcio underneath),
default settings, as a workload in a pod would: `python spiffe_client.py unix:///path/to/socket`.

Prints one JSON line: its SPIFFE ID, the chain's length and whether the chain verifies against
the trust domain's bundle (signatures and validity, leaf to a bundle root); or the error and the
gRPC status code it came with.

`python spiffe_client.py <socket> jwt <audience>`: a JWT-SVID for the audience instead, validated
here against the JWT bundle the Workload API gives (the package's own validator: signature, kid,
audience, expiry), then by the Workload API itself (ValidateJWTSVID) for the audience, for
another audience, and tampered with.
"""

import datetime
import json
import sys

from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from spiffe import WorkloadApiClient


def signed_by(cert, issuer):
    key = issuer.public_key()
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm))
        elif isinstance(key, rsa.RSAPublicKey):
            key.verify(cert.signature, cert.tbs_certificate_bytes, padding.PKCS1v15(), cert.signature_hash_algorithm)
        else:
            return False
    except Exception:
        return False
    return cert.issuer == issuer.subject


def verifies(chain, roots):
    now = datetime.datetime.now(datetime.timezone.utc)
    if any(not (c.not_valid_before_utc <= now <= c.not_valid_after_utc) for c in chain):
        return False
    if any(not signed_by(chain[i], chain[i + 1]) for i in range(len(chain) - 1)):
        return False
    return any(signed_by(chain[-1], root) for root in roots)


def jwt(socket, audience):
    from spiffe import JwtSvid

    with WorkloadApiClient(socket_path=socket, default_timeout=10) as client:
        svid = client.fetch_jwt_svid(audience={audience})
        bundles = client.fetch_jwt_bundles()
        td = svid.spiffe_id.trust_domain
        bundle = bundles.get_bundle_for_trust_domain(td)
        checked = JwtSvid.parse_and_validate(svid.token, bundle, {audience})

        def server_says(token, aud):
            try:
                client.validate_jwt_svid(token, aud)
                return "valid"
            except Exception as e:  # noqa: BLE001 - the test reads what the server said
                cause = e.__cause__
                return str(cause.code()) if hasattr(cause, "code") else type(e).__name__

        header, claims, sig = svid.token.split(".")
        tampered = ".".join([header, claims, ("A" if sig[0] != "A" else "B") + sig[1:]])
        return {
            "spiffe_id": str(svid.spiffe_id),
            "validated_id": str(checked.spiffe_id),
            "audience": sorted(checked.audience),
            "bundle_keys": len(bundle.jwt_authorities) if bundle else 0,
            "server_valid": server_says(svid.token, audience),
            "server_other_audience": server_says(svid.token, audience + "-other"),
            "server_tampered": server_says(tampered, audience),
        }


def main():
    if len(sys.argv) > 3 and sys.argv[2] == "jwt":
        try:
            out = jwt(sys.argv[1], sys.argv[3])
        except Exception as e:  # noqa: BLE001 - the test reads what went wrong
            cause = e.__cause__
            code = cause.code() if hasattr(cause, "code") else None
            out = {"error": type(e).__name__, "message": str(e), "code": str(code)}
        print(json.dumps(out))
        return
    try:
        with WorkloadApiClient(socket_path=sys.argv[1], default_timeout=10) as client:
            context = client.fetch_x509_context()
            svid = context.default_svid
            bundle = context.x509_bundle_set.get_bundle_for_trust_domain(svid.spiffe_id.trust_domain)
            roots = bundle.x509_authorities if bundle else set()
            out = {
                "spiffe_id": str(svid.spiffe_id),
                "chain": len(svid.cert_chain),
                "roots": len(roots),
                "verified": verifies(svid.cert_chain, roots),
            }
    except Exception as e:  # noqa: BLE001 - the test reads what went wrong
        cause = e.__cause__
        code = cause.code() if hasattr(cause, "code") else None
        out = {"error": type(e).__name__, "message": str(e), "code": str(code)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
