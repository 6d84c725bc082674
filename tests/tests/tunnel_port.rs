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
    "16",
];

/// The handshake and first-CONNECT deadlines above, the keepalive's, in seconds; and the
/// scheduling slack allowed beyond a deadline (two shared cores, a load running meanwhile).
const DEADLINE_S: f64 = 2.0;
const KEEPALIVE_INTERVAL_S: f64 = 1.0;
const KEEPALIVE_TIMEOUT_S: f64 = 2.0;
const SLACK_S: f64 = 3.0;

/// Node 2's log line saying its tunnel connection from `peer` (the client's address and port, as
/// the client saw it) was refused or failed for `why`.
fn cut_of(mesh: &meshless_tests::mesh::Mesh, peer: &str, why: &str) -> Option<serde_json::Value> {
    let peer: std::net::SocketAddr = peer.parse().expect("a socket address");
    let same = |logged: &str| {
        logged
            .parse::<std::net::SocketAddr>()
            .is_ok_and(|a| a.port() == peer.port() && a.ip().to_canonical() == peer.ip())
    };
    mesh.wait_log(2, "inbound tunnel connection refused or failed", |l| {
        l["span"]["peer"].as_str().is_some_and(same) && l["error"].as_str().is_some_and(|e| e.contains(why))
    })
}

/// Seconds since the Unix epoch of an RFC 3339 UTC timestamp as the agent logs them
/// (`2026-01-02T03:04:05.123456Z`).
fn unix_seconds(t: &str) -> Option<f64> {
    let (date, time) = t.strip_suffix('Z')?.split_once('T')?;
    let d: Vec<i64> = date.split('-').map(|p| p.parse().ok()).collect::<Option<_>>()?;
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let h: Vec<i64> = hms.split(':').map(|p| p.parse().ok()).collect::<Option<_>>()?;
    let ([y, m, day], [hh, mm, ss]) = (<[i64; 3]>::try_from(d).ok()?, <[i64; 3]>::try_from(h).ok()?);
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((m + 9) % 12) + 2) / 5 + day - 1;
    let days = era * 146097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719468;
    let frac: f64 = format!("0.{frac}").parse().ok()?;
    Some((days * 86400 + hh * 3600 + mm * 60 + ss) as f64 + frac)
}

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
    // Each peer is cut by the bound it tests, at that bound's deadline, as node 2's agent logs
    // for that very connection (its own address and port).
    for (mode, child) in slow {
        let (_, result, out, err) = finish(child);
        let local = result["local"].as_str().unwrap_or_else(|| panic!("{mode}: no local address: {out} {err}"));
        let cut = |why: &str| {
            cut_of(mesh, local, why).unwrap_or_else(|| {
                panic!("{mode} ({local}) was not cut with {why:?}; node2's log:\n{}", mesh.log_summary(2))
            })
        };
        match mode {
            // Cut at the handshake deadline (2 s), or the first-CONNECT one (2 s), not left open.
            "tcp-idle" | "tls-idle" | "preface-idle" => {
                let after = result["closed_after_s"].as_f64().unwrap_or_else(|| panic!("{mode}: {out} {err}"));
                assert!(
                    (DEADLINE_S..=DEADLINE_S + SLACK_S).contains(&after),
                    "{mode} was closed after {after} s, not at the {DEADLINE_S} s deadline"
                );
                cut(if mode == "preface-idle" {
                    "no CONNECT within the deadline"
                } else {
                    "tunnel handshake timed out"
                });
            }
            // A peer that stops reading stops answering pings: the keepalive cuts it, one interval
            // plus the timeout (at most) after it stopped, while it was still there.
            _ => {
                let num = |k: &str| result[k].as_f64().unwrap_or_else(|| panic!("{mode}: no {k}: {out} {err}"));
                let (paused_at, paused_for) = (num("paused_at_unix_s"), num("paused_after_s") - num("paused_at_s"));
                let line = cut("peer stopped answering keepalive pings");
                let at = line["timestamp"].as_str().and_then(unix_seconds).expect("log lines carry a timestamp");
                let window = (KEEPALIVE_TIMEOUT_S - 0.5)..=(KEEPALIVE_INTERVAL_S + KEEPALIVE_TIMEOUT_S + SLACK_S);
                assert!(
                    window.contains(&(at - paused_at)) && at - paused_at < paused_for,
                    "{mode} was cut {:.3} s after it stopped reading (paused for {paused_for:.3} s), not within {window:?}",
                    at - paused_at
                );
            }
        }
    }
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

    // Eight idle handshakes from a source never seen (node 1's own address): an unknown source
    // holds at most a quarter of a peer's 16 at a time, so four are refused at once.
    let flood = || -> (usize, usize) {
        let idle: Vec<std::process::Child> = (0..8).map(|_| background(&mut setup.peer(&bins, "tcp-idle"))).collect();
        // Meanwhile another source (a pod) is served.
        let (ok, out, err) = run(tb.pod(1, 1).command(&bins.testbin).unwrap().args(["send", to, "served"]));
        assert!(ok && out == "served<6 bytes>", "{err}");
        let results: Vec<serde_json::Value> = idle.into_iter().map(|c| finish(c).1).collect();
        let closed: Vec<f64> = results.iter().map(|r| r["closed_after_s"].as_f64().unwrap_or(f64::MAX)).collect();
        let at_once = closed.iter().filter(|t| **t < 1.0).count();
        let at_deadline = closed.iter().filter(|t| (DEADLINE_S..=DEADLINE_S + SLACK_S).contains(*t)).count();
        (at_once, at_deadline)
    };
    assert_eq!(flood(), (4, 4), "four refused at once, four cut at the 2 s deadline");

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
    // Having completed a handshake, that address is a peer of the mesh: its full share of 16.
    assert_eq!(flood(), (0, 8), "a known peer's eight handshakes all get a place");
}

/// One pod may hold only `--max-pod-connections` connections through its agent: beyond, a new
/// connection is refused at once (the pod's other connections, and other pods, are unaffected);
/// once some close, it may connect again.
#[test]
fn one_pod_cannot_hold_more_connections_through_the_agent_than_its_cap() {
    use std::io::BufRead as _;
    let Some(bins) = support::privileged("pod_connection_cap") else {
        return;
    };
    let tb = meshless_tests::Testbed::new(meshless_tests::Layout { label: "podcap", pods: &[1, 1] }).expect("testbed");
    let _mesh =
        meshless_tests::mesh::Mesh::start(&tb, &bins, &|_| true, &["--max-pod-connections", "4"]).expect("agents");
    let (client, server) = (tb.pod(1, 1), tb.pod(2, 1));
    tb.spawn(server.command(&bins.testbin).unwrap().args(["echo-serve", "7000"])).unwrap();
    meshless_tests::mesh::wait_listening(&server.netns, 7000).unwrap();
    let to = sockaddr(server.ipv4.into(), 7000);
    let mut holder = client
        .command(&bins.testbin)
        .unwrap()
        .args(["hold", &to, "4"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    std::io::BufReader::new(holder.stdout.take().unwrap()).read_line(&mut first).unwrap();
    assert_eq!(first.trim(), r#"{"held":4}"#, "four connections fit under the cap");
    let (ok, out, err) = run(client.command(&bins.testbin).unwrap().args(["send", &to, "one-too-many"]));
    assert!(!ok, "a fifth connection of the pod got through: {out} {err}");
    drop(holder.stdin.take());
    let _ = holder.wait();
    let again = meshless_tests::wait_for(Duration::from_secs(10), || {
        let (ok, out, _) = run(client.command(&bins.testbin).unwrap().args(["send", &to, "after"]));
        (ok && out == "after<5 bytes>").then_some(())
    });
    assert!(again.is_some(), "once its connections closed, the pod connects again");
}
