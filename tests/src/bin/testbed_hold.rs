//! `meshless-testbed-hold <label>`: what an interrupted long-running command (the bench, the
//! demo) looks like to its clean-up. It installs [`meshless_tests::clean_up_on_interrupt`], builds
//! a one-node, one-pod testbed, starts a process in the pod, prints
//! `{"testbed": "<its name prefix>", "pid": <the process>}` and waits (60 s at most) to be
//! interrupted.

use std::io::Write as _;
use std::time::Duration;

use meshless_tests::{clean_up_on_interrupt, Layout, Testbed};

fn main() {
    let label = std::env::args().nth(1).unwrap_or_else(|| "hold".into());
    clean_up_on_interrupt().expect("the interrupt handler");
    let tb = Testbed::new(Layout { label: &label, pods: &[1] }).expect("a testbed");
    let pod = tb.pod(1, 1);
    let pid = tb.spawn(pod.command("sleep").expect("a command in the pod").arg("60")).expect("sleep in the pod");
    println!("{}", serde_json::json!({"testbed": format!("ml-{}-{label}", std::process::id()), "pid": pid}));
    std::io::stdout().flush().expect("stdout");
    std::thread::sleep(Duration::from_secs(60));
}
