//! A real Kubernetes API server for the tests and `demo --kube`: kube-apiserver v1.20.2 built
//! offline from Debian bookworm's `kubernetes` source package with Debian's Go 1.19, and etcd
//! 3.4 from Debian's `etcd-server` package. No registry ships a kube-apiserver binary these
//! machines can reach, so the build is part of the setup; the result is cached outside the clone
//! (`$MESHLESS_KUBE_CACHE`, default `~/.cache/meshless/kube-v1.20.2`) so only the first run on a
//! machine pays for it (about six minutes on two cores).
//!
//! Each step skips itself when its output exists, so an interrupted build resumes.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::setup::run_cmd;

const VERSION: &str = "v1.20.2";

/// The binaries a test cluster needs.
pub struct KubeBins {
    pub apiserver: PathBuf,
    pub etcd: PathBuf,
    /// kubectl 1.20 (Debian's kubernetes-client), whose built-in kustomize applies `deploy/`.
    pub kubectl: PathBuf,
}

fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("MESHLESS_KUBE_CACHE") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/root"));
    home.join(".cache/meshless").join(format!("kube-{VERSION}"))
}

fn step(what: &str) {
    eprintln!("setup: {what}");
}

/// Returns the cached binaries, building what is missing.
pub fn ensure() -> Result<KubeBins> {
    let dir = cache_dir();
    let bin = dir.join("bin");
    let bins = KubeBins { apiserver: bin.join("kube-apiserver"), etcd: bin.join("etcd"), kubectl: bin.join("kubectl") };
    if runs(&bins.apiserver) && runs(&bins.etcd) && runs(&bins.kubectl) {
        step(&format!("kube-apiserver {VERSION} and etcd present in {}, skipping", bin.display()));
        return Ok(bins);
    }
    std::fs::create_dir_all(&bin).with_context(|| format!("creating {}", bin.display()))?;
    let apt = PrivateApt::new(&dir)?;
    let root = dir.join("root");
    if !runs(&bins.etcd) {
        step("fetching etcd from Debian's etcd-server package");
        apt.extract(&["etcd-server"], &root)?;
        std::fs::copy(root.join("usr/bin/etcd"), &bins.etcd).context("copying etcd")?;
    }
    if !runs(&bins.kubectl) {
        step("fetching kubectl 1.20 from Debian's kubernetes-client package");
        apt.extract(&["kubernetes-client"], &root)?;
        std::fs::copy(root.join("usr/bin/kubectl"), &bins.kubectl).context("copying kubectl")?;
    }
    if !runs(&bins.apiserver) {
        build_apiserver(&dir, &apt, &root, &bins.apiserver)?;
    }
    if !runs(&bins.apiserver) || !runs(&bins.etcd) || !runs(&bins.kubectl) {
        bail!("the kube-apiserver/etcd build in {} produced no working binaries", dir.display());
    }
    // Go, the packages and the source tree are several hundred MB; the binaries are all later
    // runs need.
    let _ = std::fs::remove_dir_all(&root);
    let _ = std::fs::remove_dir_all(dir.join("debs"));
    Ok(bins)
}

/// Whether `bin` exists and answers its version question.
fn runs(bin: &Path) -> bool {
    let args: &[&str] = if bin.ends_with("kubectl") { &["version", "--client"] } else { &["--version"] };
    bin.exists() && Command::new(bin).args(args).output().map(|o| o.status.success()).unwrap_or(false)
}

fn build_apiserver(dir: &Path, apt: &PrivateApt, root: &Path, out: &Path) -> Result<()> {
    let go_root = root.join("usr/lib/go-1.19");
    let reflect2 = root.join("usr/share/gocode/src/github.com/modern-go/reflect2");
    if !go_root.join("bin/go").exists() || !reflect2.exists() {
        step("fetching Go 1.19 and reflect2 1.0.2 from Debian (private root, nothing installed system-wide)");
        apt.extract(&["golang-1.19-go", "golang-1.19-src", "golang-github-modern-go-reflect2-dev"], root)?;
    }
    let src = dir.join("src");
    let tree = src.join("kubernetes");
    if !tree.join("Makefile").exists() {
        step("fetching Debian bookworm's kubernetes source package");
        std::fs::create_dir_all(&src)?;
        apt.source_download("kubernetes", &src)?;
        let orig = std::fs::read_dir(&src)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.ends_with(".orig.tar.gz")))
            .context("the kubernetes source package has no .orig.tar.gz")?;
        let staging = src.join("unpack");
        let _ = std::fs::remove_dir_all(&staging);
        std::fs::create_dir_all(&staging)?;
        run_cmd(Command::new("tar").arg("-xzf").arg(&orig).arg("-C").arg(&staging))?;
        // The tarball holds one top-level directory; its name varies between releases.
        let top = std::fs::read_dir(&staging)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.join("Makefile").exists())
            .context("no Makefile in the kubernetes source tree")?;
        std::fs::rename(&top, &tree)?;
        let _ = std::fs::remove_dir_all(&staging);
    }
    // Kubernetes 1.20 vendors reflect2 v1.0.1, which crashes the server under Go >= 1.18 on the
    // first custom-resource write; Debian's 1.0.2 is the fixed one.
    let vendored = tree.join("vendor/github.com/modern-go/reflect2");
    if !vendored.join(".meshless-1.0.2").exists() {
        step("replacing the vendored reflect2 1.0.1 with 1.0.2 (Go >= 1.18 crash fix)");
        let _ = std::fs::remove_dir_all(&vendored);
        run_cmd(Command::new("cp").arg("-r").arg(&reflect2).arg(&vendored))?;
        let _ = std::fs::remove_file(vendored.join("go.mod"));
        let _ = std::fs::remove_file(vendored.join("go.sum"));
        std::fs::write(vendored.join(".meshless-1.0.2"), "")?;
    }
    step(&format!("building kube-apiserver {VERSION} (about six minutes on two cores)"));
    let path = format!("{}:{}", go_root.join("bin").display(), std::env::var("PATH").unwrap_or_default());
    run_cmd(
        Command::new("make")
            .current_dir(&tree)
            .args(["WHAT=cmd/kube-apiserver", &format!("KUBE_GIT_VERSION={VERSION}"), "KUBE_GIT_TREE_STATE=clean"])
            .env("GOROOT", &go_root)
            .env("PATH", path)
            .env("CGO_ENABLED", "0")
            .env("GOPROXY", "off")
            .env("GOFLAGS", "-mod=vendor")
            .env("GOCACHE", dir.join("gocache"))
            .env("GOPATH", dir.join("gopath")),
    )?;
    let built = tree.join("_output/bin/kube-apiserver");
    let built = if built.exists() { built } else { tree.join("_output/local/go/bin/kube-apiserver") };
    std::fs::copy(&built, out).with_context(|| format!("copying {}", built.display()))?;
    // The tree and Go's build cache are 2+ GB; the binary is all later runs need.
    let _ = std::fs::remove_dir_all(&src);
    let _ = std::fs::remove_dir_all(dir.join("gocache"));
    Ok(())
}

/// apt with its own source list and package lists, so the system's apt state is untouched
/// (the system lists have no deb-src lines).
struct PrivateApt {
    options: Vec<String>,
}

impl PrivateApt {
    fn new(dir: &Path) -> Result<PrivateApt> {
        let apt = dir.join("apt");
        let lists = apt.join("lists");
        std::fs::create_dir_all(lists.join("partial"))?;
        let sources = apt.join("sources.list");
        std::fs::write(
            &sources,
            "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm main\n\
             deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm main\n\
             deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian-security bookworm-security main\n\
             deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian-security bookworm-security main\n",
        )?;
        let options = vec![
            format!("-oDir::Etc::SourceList={}", sources.display()),
            "-oDir::Etc::SourceParts=/dev/null".to_string(),
            format!("-oDir::State::Lists={}", lists.display()),
            format!("-oDir::Cache::archives={}", apt.join("archives").display()),
        ];
        std::fs::create_dir_all(apt.join("archives/partial"))?;
        let fresh = std::fs::read_dir(&lists)?.filter_map(|e| e.ok()).any(|e| {
            e.file_name().to_string_lossy().ends_with("_Sources")
                && e.metadata()
                    .and_then(|m| m.modified())
                    .is_ok_and(|t| t.elapsed().is_ok_and(|a| a.as_secs() < 86_400))
        });
        let apt = PrivateApt { options };
        if !fresh {
            run_cmd(Command::new("apt-get").args(&apt.options).args(["update", "-qq"]))?;
        }
        Ok(apt)
    }

    fn extract(&self, packages: &[&str], root: &Path) -> Result<()> {
        let debs = root.with_file_name("debs");
        std::fs::create_dir_all(&debs)?;
        std::fs::create_dir_all(root)?;
        run_cmd(Command::new("apt-get").current_dir(&debs).args(&self.options).arg("download").args(packages))?;
        for pkg in packages {
            let deb = std::fs::read_dir(&debs)?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .find(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(&format!("{pkg}_"))))
                .with_context(|| format!("apt-get download left no .deb for {pkg}"))?;
            run_cmd(Command::new("dpkg").arg("-x").arg(&deb).arg(root))?;
        }
        Ok(())
    }

    fn source_download(&self, package: &str, into: &Path) -> Result<()> {
        run_cmd(Command::new("apt-get").current_dir(into).args(&self.options).args([
            "source",
            "--download-only",
            "-qq",
            package,
        ]))
    }
}
