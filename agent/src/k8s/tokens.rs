//! Node authentication in a cluster: the agent shows its projected ServiceAccount token (audience
//! `meshless-issuer`, bound to the agent's pod), and the issuer asks the API server who that is
//! (TokenReview), then which node that pod runs on — istiod's NodeAuthorizer: the caller must be
//! the node agent's ServiceAccount, its token bound to a live agent pod, and the node is that pod's
//! `spec.nodeName`. The issuer then signs only identities of pods scheduled there.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::objects::Pod;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::api::PostParams;
use kube::Api;
use parking_lot::Mutex;

use crate::identity::BoxFuture;
use crate::issuer::{Caller, NodeAuthenticator, Refusal};

/// The audience agents request their token for (and the issuer requires).
pub const AUDIENCE: &str = "meshless-issuer";
/// A reviewed token's node is remembered this long (agents renew many certificates at once).
const CACHE: Duration = Duration::from_secs(60);

pub struct ServiceAccountTokens {
    pub client: kube::Client,
    /// The agents' ServiceAccount: `(namespace, name)`.
    pub agent: (String, String),
    pub audience: String,
    cache: Mutex<HashMap<String, (String, Instant)>>,
}

impl ServiceAccountTokens {
    pub fn new(client: kube::Client, agent: (String, String), audience: String) -> ServiceAccountTokens {
        ServiceAccountTokens { client, agent, audience, cache: Mutex::default() }
    }

    async fn review(&self, token: &str) -> Result<String, Refusal> {
        let refuse = Refusal::Unauthenticated;
        let review = TokenReview {
            spec: TokenReviewSpec { token: Some(token.to_string()), audiences: Some(vec![self.audience.clone()]) },
            ..Default::default()
        };
        let answer = Api::<TokenReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| Refusal::Unavailable(format!("cannot review the token: {e}")))?;
        let status = answer.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            return Err(refuse(format!(
                "the API server does not accept the token for audience {}: {}",
                self.audience,
                status.error.unwrap_or_else(|| "not authenticated".into())
            )));
        }
        // The API server says which of the asked audiences the token is for: ours must be one.
        if !status.audiences.as_ref().is_some_and(|a| a.contains(&self.audience)) {
            return Err(refuse(format!(
                "the token is not for audience {} (it is for {:?})",
                self.audience, status.audiences
            )));
        }
        let user = status.user.unwrap_or_default();
        let username = user.username.unwrap_or_default();
        let want = format!("system:serviceaccount:{}:{}", self.agent.0, self.agent.1);
        if username != want {
            return Err(refuse(format!("the token is {username}'s, not the node agent's ({want})")));
        }
        let extra = user.extra.unwrap_or_default();
        let one = |k: &str| extra.get(k).and_then(|v| v.first()).cloned();
        let (Some(pod), Some(uid)) =
            (one("authentication.kubernetes.io/pod-name"), one("authentication.kubernetes.io/pod-uid"))
        else {
            return Err(refuse("the token is not bound to a pod (use a projected ServiceAccount token)".into()));
        };
        let agent_pod = Api::<Pod>::namespaced(self.client.clone(), &self.agent.0)
            .get_opt(&pod)
            .await
            .map_err(|e| Refusal::Unavailable(format!("cannot look up agent pod {pod}: {e}")))?
            .ok_or_else(|| refuse(format!("agent pod {}/{pod} does not exist", self.agent.0)))?;
        if agent_pod.metadata.uid.as_deref() != Some(uid.as_str()) {
            return Err(refuse(format!("the token was bound to an earlier pod named {pod}")));
        }
        let phase = agent_pod.status.as_ref().and_then(|s| s.phase.as_deref());
        if phase != Some("Running") {
            return Err(refuse(format!("agent pod {pod} is not running (phase {phase:?})")));
        }
        agent_pod
            .spec
            .and_then(|s| s.node_name)
            .filter(|n| !n.is_empty())
            .ok_or_else(|| refuse(format!("agent pod {pod} is not scheduled on a node")))
    }
}

impl NodeAuthenticator for ServiceAccountTokens {
    fn authenticate<'a>(&'a self, caller: &'a Caller<'a>) -> BoxFuture<'a, Result<String, Refusal>> {
        Box::pin(async move {
            let refuse = |why: &str| Refusal::Unauthenticated(why.into());
            let header = caller
                .metadata
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .ok_or_else(|| refuse("no ServiceAccount token was presented"))?;
            let token = header
                .strip_prefix("Bearer ")
                .ok_or_else(|| refuse("the authorization header is not a bearer token"))?;
            if let Some((node, at)) = self.cache.lock().get(token) {
                if at.elapsed() < CACHE {
                    return Ok(node.clone());
                }
            }
            let node = self.review(token).await?;
            let mut cache = self.cache.lock();
            cache.retain(|_, (_, at)| at.elapsed() < CACHE);
            cache.insert(token.to_string(), (node.clone(), Instant::now()));
            Ok(node)
        })
    }
}
