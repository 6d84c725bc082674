//! The flow table: what this node's connections did, in bounded memory. The last flows (each
//! connection as it ended, with its decision) in a ring, and aggregates per (source, destination
//! workload, port, transport, verdict) with counts and first/last seen, the least recently seen
//! aggregate evicted when the table is full. It feeds the `/flows` JSON of the admin endpoint.

use std::collections::{HashMap, VecDeque};
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
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    direction: &'static str,
    source: Arc<str>,
    destination_namespace: Arc<str>,
    destination_workload: Arc<str>,
    port: u16,
    transport: &'static str,
    verdict: &'static str,
}

/// Flows of one key.
#[derive(Debug, Clone, Serialize)]
pub struct Aggregate {
    pub direction: &'static str,
    pub source: Arc<str>,
    pub source_workload: Arc<str>,
    pub source_namespace: Arc<str>,
    pub destination_workload: Arc<str>,
    pub destination_namespace: Arc<str>,
    pub port: u16,
    pub transport: &'static str,
    pub verdict: &'static str,
    /// The deciding policy, rule and reason of the last flow.
    #[serde(skip_serializing_if = "str::is_empty")]
    pub policy: Arc<str>,
    pub rule: i64,
    #[serde(skip_serializing_if = "str::is_empty")]
    pub reason: Arc<str>,
    pub connections: u64,
    pub bytes: u64,
    pub first_ms: u64,
    pub last_ms: u64,
}

/// The table: `capacity` recent flows and as many aggregates (0: off).
pub struct FlowTable {
    capacity: usize,
    recent: VecDeque<Flow>,
    aggregates: HashMap<Key, Aggregate>,
    /// Flows recorded since start (the table holds the last `capacity`).
    pub total: u64,
}

impl FlowTable {
    pub fn new(capacity: usize) -> FlowTable {
        FlowTable {
            capacity,
            recent: VecDeque::with_capacity(capacity.min(1024)),
            aggregates: HashMap::new(),
            total: 0,
        }
    }

    pub fn record(&mut self, flow: Flow) {
        if self.capacity == 0 {
            return;
        }
        self.total += 1;
        let key = Key {
            direction: flow.direction,
            source: flow.source.clone(),
            destination_namespace: flow.destination_namespace.clone(),
            destination_workload: flow.destination_workload.clone(),
            port: flow.port,
            transport: flow.transport,
            verdict: flow.verdict,
        };
        match self.aggregates.get_mut(&key) {
            Some(a) => {
                a.connections += 1;
                a.bytes += flow.bytes_sent + flow.bytes_recv;
                a.last_ms = flow.at_ms;
                a.policy = flow.policy.clone();
                a.rule = flow.rule;
                a.reason = flow.reason.clone();
            }
            None => {
                if self.aggregates.len() >= self.capacity {
                    self.evict();
                }
                self.aggregates.insert(
                    key,
                    Aggregate {
                        direction: flow.direction,
                        source: flow.source.clone(),
                        source_workload: flow.source_workload.clone(),
                        source_namespace: flow.source_namespace.clone(),
                        destination_workload: flow.destination_workload.clone(),
                        destination_namespace: flow.destination_namespace.clone(),
                        port: flow.port,
                        transport: flow.transport,
                        verdict: flow.verdict,
                        policy: flow.policy.clone(),
                        rule: flow.rule,
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

    /// The aggregates, most recently seen first.
    #[cfg(test)]
    pub fn aggregates(&self) -> Vec<Aggregate> {
        let mut out = self.aggregates_unsorted();
        out.sort_by_key(|a| std::cmp::Reverse(a.last_ms));
        out
    }

    /// The aggregates, in no order (a copy: sort it outside the table's lock).
    pub fn aggregates_unsorted(&self) -> Vec<Aggregate> {
        self.aggregates.values().cloned().collect()
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
        let aggregate = |a: &Aggregate| {
            std::mem::size_of::<Aggregate>()
                + std::mem::size_of::<Key>()
                + 8
                + [&a.source, &a.source_workload, &a.source_namespace, &a.destination_workload]
                    .iter()
                    .map(|s| text(s))
                    .sum::<usize>()
                + text(&a.destination_namespace)
                + text(&a.policy)
                + text(&a.reason)
        };
        self.recent.capacity() * std::mem::size_of::<Flow>()
            + self.recent.iter().map(|f| flow(f) - std::mem::size_of::<Flow>()).sum::<usize>()
            + self.aggregates.capacity() * (std::mem::size_of::<Aggregate>() + std::mem::size_of::<Key>() + 8)
            + self
                .aggregates
                .values()
                .map(|a| aggregate(a) - std::mem::size_of::<Aggregate>() - std::mem::size_of::<Key>() - 8)
                .sum::<usize>()
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
        assert_eq!(t.aggregates()[0].last_ms, 999_999);
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
        assert_eq!((a.connections, a.bytes, a.first_ms, a.last_ms), (5, 1500, 0, 4));
        assert_eq!(t.recent(|f| f.verdict == "deny").len(), 0);
        assert_eq!(t.recent(|f| f.verdict == "allow").len(), 5);
        let mut off = FlowTable::new(0);
        off.record(flow(1));
        assert_eq!((off.len(), off.total), ((0, 0), 0));
    }
}
