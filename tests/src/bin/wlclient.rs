//! `meshless-wlclient <endpoint>`: a workload fetching its X.509-SVID from the SPIFFE Workload API
//! with the `spiffe` crate's own client (`X509Source`), as an application in a pod would. Prints
//! one JSON line: the SPIFFE ID, the leaf's serial, the number of roots of its trust domain, or
//! the error. Bounded to 10 s.

use std::time::Duration;

use serde_json::json;
use spiffe::X509Source;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let endpoint = std::env::args().nth(1).unwrap_or_else(|| {
        eprintln!("usage: meshless-wlclient unix:///path/to/workload.sock");
        std::process::exit(2)
    });
    let out = match tokio::time::timeout(Duration::from_secs(10), X509Source::builder().endpoint(&endpoint).build())
        .await
    {
        Err(_) => json!({"error": "no X.509-SVID within 10 s"}),
        Ok(Err(e)) => json!({"error": e.to_string()}),
        Ok(Ok(source)) => match (source.svid(), source.bundle_set()) {
            (Ok(svid), Ok(bundles)) => {
                let serial = x509_parser::parse_x509_certificate(svid.leaf().as_bytes())
                    .map(|(_, c)| c.raw_serial_as_string())
                    .unwrap_or_default();
                let roots = bundles.get(svid.spiffe_id().trust_domain()).map(|b| b.authorities().len()).unwrap_or(0);
                json!({"spiffe_id": svid.spiffe_id().to_string(), "serial": serial, "roots": roots, "chain": svid.cert_chain().len()})
            }
            (Err(e), _) | (_, Err(e)) => json!({"error": e.to_string()}),
        },
    };
    println!("{out}");
}
