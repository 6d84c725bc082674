//! The flow table: what this node's connections did, in bounded memory. The last flows (each
//! connection as it ended, with its decision) in a ring, and aggregates per (source, destination
//! workload and address, port, transport, verdict, deciding policy and rule) with counts and
//! first/last seen, the least recently seen
//! aggregate evicted when the table is full; and per minute of the last hour, how many
//! connections and bytes went over mTLS. It feeds the `/api/flows` JSON of the admin endpoint,
//! the dashboard and `meshless report`.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::Arc;

use serde::Serialize;

/// The default capacity (recent flows, and aggregates): about 1 MiB at most.
pub const DEFAULT_CAPACITY: usize = 1024;

/// One connection, as it ended.
#[derive(Debug, Clone, Serialize)]
pub struct Flow {
    /// When it ended (Unix milliseconds).
    pub at_ms: u64,
    /// `inbound` (this node's pod was called) or `outbound`.
    pub direction: &'static str,
    /// The source: its SPIFFE ID, or for plaintext its address.
    pub source: Arc<str>,
    pub source_workload: Arc<str>,
    pub source_namespace: Arc<str>,
    pub destination: Arc<str>,
    pub destination_workload: Arc<str>,
    pub destination_namespace: Arc<str>,
    /// The destination's address (what the dashboard's why-denied view asks the policy about).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub destination_addr: Option<IpAddr>,
    pub port: u16,
    /// `hbone`, `plaintext` or `passthrough`.
    pub transport: &'static str,
    /// `allow`, `deny`, `dry_run_deny` (inbound decisions), `carried`, `failed` or `refused`
    /// (outbound; refused: the destination answered the CONNECT with an error).
    pub verdict: &'static str,
    #[serde(skip_serializing_if = "str::is_empty")]
    pub policy: Arc<str>,
    pub rule: i64,
    #[serde(skip_serializing_if = "str::is_empty")]
    pub reason: Arc<str>,
    pub bytes_sent: u64,
    pub bytes_recv: u64,
    pub duration_ms: u64,
}

/// What flows are aggregated by.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct FlowKey {
    pub direction: &'static str,
    pub source: Arc<str>,
    pub destination_namespace: Arc<str>,
    pub destination_workload: Arc<str>,
    /// The destination pod's address (replicas of one workload are told apart).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub destination_addr: Option<IpAddr>,
    pub port: u16,
    pub transport: &'static str,
    pub verdict: &'static str,
    /// The deciding policy and rule.
    #[serde(skip_serializing_if = "str::is_empty")]
    pub policy: Arc<str>,
    pub rule: i64,
}

impl FlowKey {
    fn of(f: &Flow) -> FlowKey {
        FlowKey {
            direction: f.direction,
            source: f.source.clone(),
            destination_namespace: f.destination_namespace.clone(),
            destination_workload: f.destination_workload.clone(),
            destination_addr: f.destination_addr,
            port: f.port,
            transport: f.transport,
            verdict: f.verdict,
            policy: f.policy.clone(),
            rule: f.rule,
        }
    }
}

/// What the flows of one key add up to.
#[derive(Debug, Clone, Serialize)]
pub struct Seen {
    pub source_workload: Arc<str>,
    pub source_namespace: Arc<str>,
    /// The reason of the last flow.
    #[serde(skip_serializing_if = "str::is_empty")]
    pub reason: Arc<str>,
    pub connections: u64,
    pub bytes: u64,
    pub first_ms: u64,
    pub last_ms: u64,
}

/// Flows of one key (one JSON object: the key's fields and what they add up to).
#[derive(Debug, Clone, Serialize)]
pub struct Aggregate {
    #[serde(flatten)]
    pub key: FlowKey,
    #[serde(flatten)]
    pub seen: Seen,
}

/// Connections and bytes over a span of time, and how many of them went over mTLS.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Share {
    pub connections: u64,
    pub mtls_connections: u64,
    pub bytes: u64,
    pub mtls_bytes: u64,
}

impl Share {
    fn add(&mut self, o: &Share) {
        self.connections += o.connections;
        self.mtls_connections += o.mtls_connections;
        self.bytes += o.bytes;
        self.mtls_bytes += o.mtls_bytes;
    }
}

/// Minutes of history kept for [`FlowTable::share`].
pub const WINDOW_MINUTES: usize = 60;

/// The table: `capacity` recent flows and as many aggregates (0: off).
pub struct FlowTable {
    capacity: usize,
    recent: VecDeque<Flow>,
    aggregates: HashMap<FlowKey, Seen>,
    /// Per minute (Unix minute, its figures), a ring indexed by minute modulo its length.
    minutes: [(u64, Share); WINDOW_MINUTES],
    /// Flows recorded since start (the table holds the last `capacity`): the newest flow's
    /// sequence number, the first being 1.
    pub total: u64,
}

impl FlowTable {
    pub fn new(capacity: usize) -> FlowTable {
        FlowTable {
            capacity,
            recent: VecDeque::with_capacity(capacity.min(1024)),
            aggregates: HashMap::new(),
            minutes: [(0, Share::default()); WINDOW_MINUTES],
            total: 0,
        }
    }

    pub fn record(&mut self, flow: Flow) {
        if self.capacity == 0 {
            return;
        }
        self.total += 1;
        let minute = flow.at_ms / 60_000;
        let slot = &mut self.minutes[minute as usize % WINDOW_MINUTES];
        if slot.0 != minute {
            *slot = (minute, Share::default());
        }
        let (bytes, mtls) = (flow.bytes_sent + flow.bytes_recv, flow.transport == "hbone");
        slot.1.add(&Share {
            connections: 1,
            mtls_connections: mtls as u64,
            bytes,
            mtls_bytes: if mtls { bytes } else { 0 },
        });
        let key = FlowKey::of(&flow);
        match self.aggregates.get_mut(&key) {
            Some(a) => {
                a.connections += 1;
                a.bytes += flow.bytes_sent + flow.bytes_recv;
                a.last_ms = flow.at_ms;
                a.reason = flow.reason.clone();
            }
            None => {
                if self.aggregates.len() >= self.capacity {
                    self.evict();
                }
                self.aggregates.insert(
                    key,
                    Seen {
                        source_workload: flow.source_workload.clone(),
                        source_namespace: flow.source_namespace.clone(),
                        reason: flow.reason.clone(),
                        connections: 1,
                        bytes: flow.bytes_sent + flow.bytes_recv,
                        first_ms: flow.at_ms,
                        last_ms: flow.at_ms,
                    },
                );
            }
        }
        if self.recent.len() >= self.capacity {
            self.recent.pop_front();
        }
        self.recent.push_back(flow);
    }

    /// Drops the least recently seen eighth of the aggregates (one scan per eighth, not per
    /// insert, so a table full of distinct keys costs O(1) per flow on average).
    fn evict(&mut self) {
        let drop = (self.capacity / 8).max(1);
        let mut seen: Vec<u64> = self.aggregates.values().map(|a| a.last_ms).collect();
        let cut = drop.min(seen.len()) - 1;
        let (_, nth, _) = seen.select_nth_unstable(cut);
        let oldest = *nth;
        let mut left = drop;
        self.aggregates.retain(|_, a| {
            if left > 0 && a.last_ms <= oldest {
                left -= 1;
                false
            } else {
                true
            }
        });
    }

    /// The recent flows, newest first, that `keep` keeps.
    pub fn recent(&self, keep: impl Fn(&Flow) -> bool) -> Vec<Flow> {
        self.recent.iter().rev().filter(|f| keep(f)).cloned().collect()
    }

    /// The flows recorded after sequence number `after` (oldest first; the newest `max` of them
    /// when more are held), each with its sequence number.
    pub fn since(&self, after: u64, max: usize) -> Vec<(u64, Flow)> {
        let first = self.total + 1 - self.recent.len() as u64;
        let start = after.saturating_add(1).max(first).max((self.total + 1).saturating_sub(max as u64));
        let skip = (start - first) as usize;
        self.recent.iter().enumerate().skip(skip).map(|(i, f)| (first + i as u64, f.clone())).collect()
    }

    /// Connections ended in the last `minutes` minutes up to `now_ms` (whole minutes: the
    /// current one and the `minutes - 1` before it), and their mTLS share.
    pub fn share(&self, now_ms: u64, minutes: usize) -> Share {
        let now = now_ms / 60_000;
        let oldest = now.saturating_sub(minutes.clamp(1, WINDOW_MINUTES) as u64 - 1);
        let mut out = Share::default();
        for (minute, s) in &self.minutes {
            if (oldest..=now).contains(minute) && *minute != 0 {
                out.add(s);
            }
        }
        out
    }

    /// The aggregates, most recently seen first.
    #[cfg(test)]
    pub fn aggregates(&self) -> Vec<Aggregate> {
        let mut out = self.aggregates_unsorted();
        out.sort_by_key(|a| std::cmp::Reverse(a.seen.last_ms));
        out
    }

    /// The aggregates, in no order (a copy: sort it outside the table's lock).
    pub fn aggregates_unsorted(&self) -> Vec<Aggregate> {
        self.aggregates.iter().map(|(k, s)| Aggregate { key: k.clone(), seen: s.clone() }).collect()
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn len(&self) -> (usize, usize) {
        (self.recent.len(), self.aggregates.len())
    }

    /// An upper bound of the heap the table holds: its entries and the strings only it holds
    /// (label strings shared with live connections or other entries are counted once per entry,
    /// so this over-counts).
    pub fn bytes(&self) -> usize {
        let text = |s: &Arc<str>| s.len() + 16;
        let flow = |f: &Flow| {
            std::mem::size_of::<Flow>()
                + [&f.source, &f.source_workload, &f.source_namespace, &f.destination, &f.destination_workload]
                    .iter()
                    .map(|s| text(s))
                    .sum::<usize>()
                + text(&f.destination_namespace)
                + text(&f.policy)
                + text(&f.reason)
        };
        let entry = std::mem::size_of::<FlowKey>() + std::mem::size_of::<Seen>() + 8;
        let aggregate = |(k, s): (&FlowKey, &Seen)| {
            [&k.source, &k.destination_namespace, &k.destination_workload, &k.policy]
                .iter()
                .chain([&s.source_workload, &s.source_namespace, &s.reason].iter())
                .map(|s| text(s))
                .sum::<usize>()
        };
        self.recent.capacity() * std::mem::size_of::<Flow>()
            + self.recent.iter().map(|f| flow(f) - std::mem::size_of::<Flow>()).sum::<usize>()
            + self.aggregates.capacity() * entry
            + self.aggregates.iter().map(aggregate).sum::<usize>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow(i: u64) -> Flow {
        let s = |v: String| -> Arc<str> { v.into() };
        Flow {
            at_ms: i,
            direction: "inbound",
            source: s(format!("spiffe://cluster.local/ns/ns-{}/sa/sa-{i}", i % 100)),
            source_workload: s(format!("client-{i}")),
            source_namespace: s(format!("ns-{}", i % 100)),
            destination: s("spiffe://cluster.local/ns/shop/sa/api".into()),
            destination_workload: s("api".into()),
            destination_namespace: s("shop".into()),
            destination_addr: None,
            port: 8080,
            transport: "hbone",
            verdict: if i.is_multiple_of(3) { "deny" } else { "allow" },
            policy: s("shop/api-allow".into()),
            rule: 0,
            reason: s("ALLOW rule matched".into()),
            bytes_sent: 100,
            bytes_recv: 200,
            duration_ms: 1,
        }
    }

    #[test]
    fn a_million_distinct_flows_keep_the_table_within_capacity_and_two_mib() {
        let mut t = FlowTable::new(DEFAULT_CAPACITY);
        for i in 0..1_000_000 {
            t.record(flow(i));
        }
        let (recent, aggregates) = t.len();
        assert!(recent <= DEFAULT_CAPACITY && aggregates <= DEFAULT_CAPACITY);
        assert_eq!(recent, DEFAULT_CAPACITY, "the ring is full");
        assert!(t.bytes() <= 2 << 20, "{} bytes", t.bytes());
        assert_eq!(t.total, 1_000_000);
        // The newest are kept: the last flow is there, in both views.
        assert_eq!(t.recent(|_| true)[0].at_ms, 999_999);
        assert_eq!(t.aggregates()[0].seen.last_ms, 999_999);
    }

    #[test]
    fn flows_of_one_key_add_up_and_off_records_nothing() {
        let mut t = FlowTable::new(16);
        let mut f = flow(7);
        for at in 0..5 {
            f.at_ms = at;
            t.record(f.clone());
        }
        let a = &t.aggregates()[0];
        assert_eq!((a.seen.connections, a.seen.bytes, a.seen.first_ms, a.seen.last_ms), (5, 1500, 0, 4));
        assert_eq!(t.recent(|f| f.verdict == "deny").len(), 0);
        assert_eq!(t.recent(|f| f.verdict == "allow").len(), 5);
        // Sequence numbers: five flows, 1 to 5.
        let seqs = |after, max| t.since(after, max).iter().map(|(n, _)| *n).collect::<Vec<_>>();
        assert_eq!(seqs(0, 10), [1, 2, 3, 4, 5]);
        assert_eq!(seqs(3, 10), [4, 5]);
        assert_eq!(seqs(0, 2), [4, 5], "the newest when more are held");
        assert_eq!(seqs(5, 10), Vec::<u64>::new());
        let mut off = FlowTable::new(0);
        off.record(flow(1));
        assert_eq!((off.len(), off.total), ((0, 0), 0));
    }
}

#[cfg(test)]
mod window_tests {
    use super::tests_support::flow_at;
    use super::*;

    #[test]
    fn the_mtls_share_counts_the_minutes_asked_for_and_forgets_older_ones() {
        let mut t = FlowTable::new(8);
        let minute = 60_000;
        let base = 1_000 * minute;
        t.record(flow_at(base, "hbone", 100));
        t.record(flow_at(base + 2 * minute, "plaintext", 50));
        t.record(flow_at(base + 4 * minute + 1, "hbone", 10));
        let now = base + 4 * minute + 5;
        assert_eq!(t.share(now, 5), Share { connections: 3, mtls_connections: 2, bytes: 160, mtls_bytes: 110 });
        assert_eq!(t.share(now, 3), Share { connections: 2, mtls_connections: 1, bytes: 60, mtls_bytes: 10 });
        // An hour on, the ring's slot is reused: the old minute is gone.
        t.record(flow_at(base + 60 * minute, "plaintext", 1));
        assert_eq!(
            t.share(base + 60 * minute, 60),
            Share { connections: 3, mtls_connections: 1, bytes: 61, mtls_bytes: 10 }
        );
    }
}

#[cfg(test)]
mod tests_support {
    use super::*;

    pub fn flow_at(at_ms: u64, transport: &'static str, bytes: u64) -> Flow {
        let s: Arc<str> = Arc::from("x");
        Flow {
            at_ms,
            direction: "inbound",
            source: s.clone(),
            source_workload: s.clone(),
            source_namespace: s.clone(),
            destination: s.clone(),
            destination_workload: s.clone(),
            destination_namespace: s.clone(),
            destination_addr: None,
            port: 1,
            transport,
            verdict: "allow",
            policy: s.clone(),
            rule: -1,
            reason: s,
            bytes_sent: bytes,
            bytes_recv: 0,
            duration_ms: 0,
        }
    }
}
