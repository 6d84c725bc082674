//! Kubernetes: where the agent learns its pods and policies in a cluster.
//!
//! - [`source`]: the [`crate::workloads::WorkloadSource`] fed by watches of the API server (this
//!   node's pods, the cluster's pods in compact form, namespaces, the policy resources). It builds
//!   the same [`crate::workloads::Directory`] the state file does.
//! - [`cni`]: the other half of `meshless-cni`, the chained CNI plugin: records of the pods'
//!   network namespaces, received on a unix socket and kept on disk so nothing is lost while the
//!   agent is away.
//! - [`crd`]: the policy resources (generated from the policy model's Rust types) and their status.
//! - [`tokens`]: the issuer's node authentication by ServiceAccount token (TokenReview).

pub mod cni;
pub mod crd;
pub mod objects;
pub mod source;
pub mod tokens;

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubeconfig {path}: {source}")]
    Kubeconfig { path: PathBuf, source: kube::config::KubeconfigError },
    #[error("Kubernetes client configuration: {0}")]
    Config(String),
    #[error("Kubernetes API: {0}")]
    Api(#[from] kube::Error),
    #[error("CNI records in {path}: {source}")]
    Cni { path: PathBuf, source: std::io::Error },
    #[error("mesh settings (--root-namespace): {0}")]
    Mesh(#[from] crate::policy::Invalid),
}

/// A client from `kubeconfig`, or else the usual inference (in-cluster service account, then
/// `$KUBECONFIG`, then `~/.kube/config`).
pub async fn client(kubeconfig: Option<&Path>) -> Result<kube::Client, Error> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .map_err(|source| Error::Kubeconfig { path: path.into(), source })?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|source| Error::Kubeconfig { path: path.into(), source })?
        }
        None => kube::Config::infer().await.map_err(|e| Error::Config(e.to_string()))?,
    };
    Ok(kube::Client::try_from(config)?)
}
