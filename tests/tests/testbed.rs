//! The testbed itself: pods on different nodes reach each other through their nodes, over IPv4
//! and IPv6, and everything it made is gone after drop.

mod support;

use std::path::Path;

use meshless_tests::{Layout, Testbed};

#[test]
fn pods_reach_pods_on_other_nodes_and_cleanup_removes_everything() {
    let Some(bins) = support::privileged("testbed") else {
        return;
    };
    let tb = Testbed::new(Layout { label: "tb", pods: &[1, 1] }).expect("building testbed");
    let (client, server) = (tb.pod(1, 1), tb.pod(2, 1));
    let pid = tb.spawn(server.command(&bins.testbin).unwrap().args(["echo-serve", "7000"])).unwrap();
    meshless_tests::mesh::wait_listening(&server.netns, 7000).unwrap();
    for ip in [server.ipv4.to_string(), format!("[{}]", server.ipv6)] {
        let out =
            client.command(&bins.testbin).unwrap().args(["send", &format!("{ip}:7000"), "ping"]).output().unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "ping<4 bytes>",
            "pod on node1 should reach pod on node2 at {ip}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    tb.stop(pid);
    let names: Vec<String> = tb.pods().map(|p| p.netns.name.clone()).collect();
    let cgroup = tb.cgroup_root.clone();
    drop(tb);
    for n in names {
        assert!(!Path::new("/run/netns").join(&n).exists(), "netns {n} left behind");
    }
    assert!(!cgroup.exists(), "cgroup {} left behind", cgroup.display());
}
