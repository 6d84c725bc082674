//! A long-running command interrupted (SIGINT from Ctrl-C, SIGTERM) leaves nothing behind: the
//! processes it started are stopped and its testbeds removed — namespaces, cgroups, pinned
//! programs, files. `meshless-testbed-hold` stands for the bench and the demo's show: it installs
//! the same handler (`clean_up_on_interrupt`), builds a testbed and runs a process in a pod.

mod support;

use std::io::BufRead as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use meshless_tests::wait_for;

#[test]
fn an_interrupted_run_stops_its_processes_and_removes_its_testbeds() {
    let Some(bins) = support::privileged("interrupt") else {
        return;
    };
    let hold = bins.testbin.with_file_name("meshless-testbed-hold");
    for (signal, name) in [(libc::SIGINT, "SIGINT"), (libc::SIGTERM, "SIGTERM")] {
        let mut child = Command::new(&hold)
            .arg("hold")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", hold.display()));
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let ready: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|_| panic!("{name}: the holder did not start: {line:?}"));
        let (testbed, pid) = (ready["testbed"].as_str().unwrap().to_string(), ready["pid"].as_u64().unwrap());
        let netns = || -> Vec<String> {
            let names: Vec<String> = std::fs::read_dir("/run/netns")
                .map(|rd| rd.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
                .unwrap_or_default();
            names.into_iter().filter(|n| n.starts_with(&format!("{testbed}-"))).collect()
        };
        assert!(!netns().is_empty(), "{name}: the testbed's namespaces exist while it runs");
        let cgroup = meshless_tests::cgroup2_mount().unwrap().join("meshless-testbed").join(&testbed["ml-".len()..]);
        assert!(cgroup.exists(), "{name}: the testbed's cgroup exists while it runs");

        // SAFETY: kill(2) on the child this test started and has not reaped.
        unsafe { libc::kill(child.id() as i32, signal) };
        let status = child.wait().unwrap();
        let stderr = {
            let mut s = String::new();
            std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut s).unwrap();
            s
        };
        assert_eq!(status.code(), Some(130), "{name}: exits with 130 after cleaning up: {stderr}");
        let gone = wait_for(Duration::from_secs(5), || {
            let alive = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .is_ok_and(|s| s.rsplit_once(')').is_some_and(|(_, r)| !r.trim_start().starts_with('Z')));
            (!alive).then_some(())
        });
        assert!(gone.is_some(), "{name}: the process it ran in a pod still runs");
        assert_eq!(netns(), Vec::<String>::new(), "{name}: namespaces left behind");
        assert!(!cgroup.exists(), "{name}: cgroup {} left behind", cgroup.display());
        assert!(!Path::new("/sys/fs/bpf/meshless-test").join(&testbed["ml-".len()..]).exists(), "{name}: pins left");
        assert!(!std::env::temp_dir().join(&testbed).exists(), "{name}: files left behind");
    }
}
