//! The testbed itself: pods on different nodes reach each other through their nodes, over IPv4
//! and IPv6, and everything it made is gone after drop.

mod support;

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use meshless_tests::mesh::Mesh;
use meshless_tests::{Layout, Testbed};

/// The veth interfaces of the test's own network namespace (the testbed's live in its own).
fn own_veths() -> String {
    let out = std::process::Command::new("ip").args(["-o", "link", "show", "type", "veth"]).output().unwrap();
    assert!(out.status.success(), "ip link: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.split_whitespace().nth(1).unwrap_or("").to_string() + "\n")
        .collect()
}

/// Pids of processes whose network namespace is one of `inodes`.
fn processes_in(inodes: &[u64]) -> Vec<String> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().bytes().all(|b| b.is_ascii_digit()))
        .filter(|e| std::fs::metadata(e.path().join("ns/net")).is_ok_and(|m| inodes.contains(&m.ino())))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

#[test]
fn pods_reach_pods_on_other_nodes_and_cleanup_removes_everything() {
    let Some(bins) = support::privileged("testbed") else {
        return;
    };
    let veths_before = own_veths();
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

    // Then everything a test leaves for the drop: agents and the issuer running (with their
    // programs attached and pinned), a server in a pod, a process left in a node's netns.
    let mesh = Mesh::start(&tb, &bins, &|_| true, &[]).expect("starting the agents");
    let server_pid = tb.spawn(server.command(&bins.testbin).unwrap().args(["echo-serve", "7000"])).unwrap();
    meshless_tests::mesh::wait_listening(&server.netns, 7000).unwrap();
    let mut stray = tb.node(1).netns.command("sleep", None).unwrap().arg("60").spawn().expect("a stray process");
    let mut pids: Vec<u32> = mesh.agents.clone();
    pids.extend([mesh.issuer, server_pid, stray.id()]);
    let mut names: Vec<String> = tb.pods().map(|p| p.netns.name.clone()).collect();
    names.extend(tb.nodes.iter().map(|n| n.netns.name.clone()));
    names.push(tb.fabric.name.clone());
    let inodes: Vec<u64> = names
        .iter()
        .map(|n| std::fs::metadata(Path::new("/run/netns").join(n)).expect("the netns exists").ino())
        .collect();
    let (cgroup, bpf_root, dir) = (tb.cgroup_root.clone(), tb.bpf_root.clone(), tb.dir.clone());
    // Control: what must go is there.
    assert!(own_veths() == veths_before, "the testbed put veths into the test's own netns");
    for i in [1, 2] {
        let pin = tb.bpf_dir(i).join(format!("v{}/maps/ORIG_DST", meshless_common::LAYOUT_VERSION));
        assert!(pin.exists(), "node{i}'s agent pinned no {}", pin.display());
    }
    assert!(processes_in(&inodes).len() >= pids.len(), "the processes run in the testbed's namespaces");
    assert!(!tb.node(1).netns.sh("ip -o link show type veth").unwrap().stdout.is_empty(), "node1 has veths");

    drop(mesh);
    drop(tb);
    for n in &names {
        assert!(!Path::new("/run/netns").join(n).exists(), "netns {n} left behind");
    }
    // A namespace with a process left in it lives on, with its veths, even once unnamed; with none
    // (and no name) the kernel frees it and destroys its veths.
    let left = processes_in(&inodes);
    assert!(left.is_empty(), "processes left in the testbed's namespaces: {left:?}");
    for pid in pids {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists() || meshless_tests::mesh::is_zombie(pid),
            "process {pid} left running"
        );
    }
    assert_eq!(own_veths(), veths_before, "veths left behind");
    assert!(!cgroup.exists(), "cgroup {} left behind", cgroup.display());
    assert!(!bpf_root.exists(), "BPF pins left behind in {}", bpf_root.display());
    if std::env::var_os("MESHLESS_TESTBED_KEEP_DIR").is_none() {
        assert!(!dir.exists(), "scratch directory {} left behind", dir.display());
    }
    let _ = stray.wait(); // killed with its netns (checked above): reap it
}
