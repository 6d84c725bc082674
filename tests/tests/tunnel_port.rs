//! Port 15008 against hostile peers and overload, as root on the namespace testbed with real
//! agents: slow and stalled peers are cut at the deadlines while other clients are served, the
//! handshake cap refuses a flood from one source, oversized headers and too many streams are
//! refused. The misbehaving client is `meshless-peer`, presenting a genuine certificate of the
//! trust domain (so what cuts it is the bound under test, not authentication).

mod support;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use meshless_tests::mesh::run_ok;
use meshless_tests::sockaddr;
use support::{background, echo_pair, finish, run, Pair};

/// Short deadlines, so the test sees them act.
const LIMITS: [&str; 10] = [
    "--handshake-timeout",
    "2s",
    "--request-timeout",
    "2s",
    "--keepalive-interval",
    "1s",
    "--keepalive-timeout",
    "2s",
    "--max-handshakes-per-source",
    "4",
];

/// A client pod and a server pod with an echo server, node 2's agent with short deadlines, and
/// what `meshless-peer` needs to attack the server pod's tunnel port from node 1's address.
struct Setup {
    pair: Pair,
    cert: PathBuf,
    key: PathBuf,
    tunnel: String,
}

impl Setup {
    fn new(label: &str, bins: &support::Bins) -> Setup {
        let pair = echo_pair(label, bins, &LIMITS);
        run_ok(
            std::process::Command::new(&bins.meshless)
                .args([
                    "ca",
                    "issue",
                    "--id",
                    "spiffe://cluster.local/ns/default/sa/peer",
                    "--name",
                    "peer",
                    "--ca-dir",
                ])
                .arg(&pair.mesh.ca_dir)
                .arg("--out")
                .arg(&pair.tb.dir),
        )
        .unwrap();
        let tunnel = sockaddr(pair.tb.pod(2, 1).ipv4.into(), 15008);
        Setup { cert: pair.tb.dir.join("peer.pem"), key: pair.tb.dir.join("peer-key.pem"), tunnel, pair }
    }

    /// `meshless-peer <mode>` against the server pod, run from node 1's own address.
    fn peer(&self, bins: &support::Bins, mode: &str) -> std::process::Command {
        let mut cmd = self.pair.tb.node(1).netns.command(&bins.peer, None).unwrap();
        cmd.args([mode, &self.tunnel]).arg(&self.cert).arg(&self.key).arg(&self.pair.to);
        cmd
    }
}

#[test]
fn slow_and_stalled_peers_are_cut_at_the_deadlines_while_others_are_served() {
    let Some(bins) = support::privileged("slowloris") else {
        return;
    };
    let setup = Setup::new("slow", &bins);
    let Pair { tb, mesh, to } = &setup.pair;
    // The misbehaving peers, and meanwhile a pod's mesh traffic.
    let started = Instant::now();
    let slow: Vec<(&str, std::process::Child)> = ["tcp-idle", "tls-idle", "preface-idle", "no-read"]
        .into_iter()
        .map(|m| (m, background(&mut setup.peer(&bins, m))))
        .collect();
    let stream = background(tb.pod(1, 1).command(&bins.testbin).unwrap().args(["stream", to, "6", "20"]));
    let (ok, result, _, err) = finish(stream);
    assert!(ok && result["failed"] == 0, "other clients must be served meanwhile: {result} {err}");
    assert!(result["ok"].as_u64().unwrap_or(0) > 100, "{result}");
    for (mode, child) in slow {
        let (_, result, out, err) = finish(child);
        match mode {
            // Cut at the handshake deadline (2 s), not left open.
            "tcp-idle" | "tls-idle" | "preface-idle" => {
                let after = result["closed_after_s"].as_f64().unwrap_or_else(|| panic!("{mode}: {out} {err}"));
                assert!(after < 10.0, "{mode} was held for {after} s: the deadline did not act");
            }
            // A peer that stops reading stops answering pings: the keepalive cuts it.
            _ => assert!(result["paused_after_s"].is_number(), "{mode}: {out} {err}"),
        }
    }
    let cut = |why: &str| mesh.log_lines(2).iter().any(|l| l["error"].as_str().is_some_and(|e| e.contains(why)));
    assert!(cut("tunnel handshake timed out"), "the handshake deadline did not cut the idle peers");
    assert!(cut("no CONNECT within the deadline"), "the first-CONNECT deadline did not cut the idle preface");
    assert!(cut("peer stopped answering keepalive pings"), "the keepalive did not cut the peer that stopped reading");
    assert!(started.elapsed() < Duration::from_secs(50));
}

#[test]
fn a_handshake_flood_from_one_source_is_capped_and_oversized_headers_and_excess_streams_are_refused() {
    let Some(bins) = support::privileged("overload") else {
        return;
    };
    let setup = Setup::new("overload", &bins);
    let Pair { tb, to, .. } = &setup.pair;
    let peer = |mode: &str| -> serde_json::Value {
        let (_, out, _) = run(&mut setup.peer(&bins, mode));
        serde_json::from_str(out.trim()).unwrap_or_default()
    };

    // Eight idle handshakes from one source, at most four at a time: four are refused at once.
    let idle: Vec<std::process::Child> = (0..8).map(|_| background(&mut setup.peer(&bins, "tcp-idle"))).collect();
    // Meanwhile another source (a pod) is served.
    let (ok, out, err) = run(tb.pod(1, 1).command(&bins.testbin).unwrap().args(["send", to, "served"]));
    assert!(ok && out == "served<6 bytes>", "{err}");
    let results: Vec<serde_json::Value> = idle.into_iter().map(|c| finish(c).1).collect();
    let closed: Vec<f64> = results.iter().map(|r| r["closed_after_s"].as_f64().unwrap_or(f64::MAX)).collect();
    let at_once = closed.iter().filter(|t| **t < 1.0).count();
    let at_deadline = closed.iter().filter(|t| (1.5..10.0).contains(*t)).count();
    assert_eq!((at_once, at_deadline), (4, 4), "four refused at once, four cut at the 2 s deadline: {results:?}");

    // A header list beyond 64 KiB is refused.
    let big = peer("big-headers");
    let outcome = big["outcome"].as_str().unwrap_or_default().to_string();
    assert!(outcome.starts_with("refused") || outcome == "status 431", "a 100 KiB header got through: {big}");
    // At most 100 streams at once on one connection; the rest are refused.
    let many = peer("many-streams");
    assert_eq!(many["ok"], 100, "{many}");
    assert_eq!(many["refused"], 50, "{many}");
    // Control: a well-behaved peer with the same certificate is served.
    let good = peer("ok");
    assert_eq!(good["reply"], "hello", "{good}");
}
