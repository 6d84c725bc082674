//! Independent clients in Python: PyPI's `spiffe` package (grpcio underneath) and the Prometheus
//! project's `prometheus-client` (its OpenMetrics parser), each in a virtualenv the tests create
//! once per machine (`~/.cache/meshless/py-<package>-<version>`, built aside and renamed into
//! place, so a failed or concurrent install never leaves half a venv).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

/// The `spiffe` release the tests use (its grpcio comes with it).
const SPIFFE: &str = "spiffe==0.3.2";
/// The Prometheus project's Python client, for its OpenMetrics parser.
const PROMETHEUS: &str = "prometheus-client==0.20.0";

/// The venv's python, with `spiffe` installed.
pub fn spiffe_python() -> Result<PathBuf> {
    python_with(SPIFFE)
}

/// The venv's python, with `prometheus-client` installed.
pub fn prometheus_python() -> Result<PathBuf> {
    python_with(PROMETHEUS)
}

/// A virtualenv's python with `package` (`name==version`) installed.
fn python_with(package: &str) -> Result<PathBuf> {
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/root"));
    let venv = home.join(".cache/meshless").join(format!("py-{}", package.replace("==", "-")));
    let python = venv.join("bin/python");
    if python.exists() {
        return Ok(python);
    }
    let building = venv.with_extension(format!("building-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&building);
    run(
        Command::new("python3").args(["-m", "venv"]).arg(&building),
        "python3 -m venv (is python3-venv installed? `cargo xtask setup`)",
    )?;
    run(
        Command::new(building.join("bin/pip")).args(["install", "--quiet", "--disable-pip-version-check", package]),
        &format!("pip install {package} (PyPI must be reachable)"),
    )?;
    // A venv's scripts name its own path: move it only as a whole, then check it runs from there.
    if let Err(e) = std::fs::rename(&building, &venv) {
        let _ = std::fs::remove_dir_all(&building);
        if !python.exists() {
            return Err(e).context("placing the virtualenv");
        }
    }
    Ok(python)
}

/// `tests/py/<name>`.
pub fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("py").join(name)
}

fn run(cmd: &mut Command, what: &str) -> Result<()> {
    let out = cmd.output().with_context(|| what.to_string())?;
    if !out.status.success() {
        bail!("{what}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}
