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
/// A refused token is refused again without asking the API server for this long.
const NEGATIVE_CACHE: Duration = Duration::from_secs(10);
/// Tokens remembered at most (each map); beyond, the oldest half is forgotten.
const MAX_CACHED: usize = 10_000;
/// TokenReviews in flight at most: a flood of made-up tokens cannot become a flood of API
/// requests; beyond, callers are told to retry.
const MAX_REVIEWS: usize = 16;

pub struct ServiceAccountTokens {
    pub client: kube::Client,
    /// The agents' ServiceAccount: `(namespace, name)`.
    pub agent: (String, String),
    pub audience: String,
    cache: Mutex<HashMap<String, (String, Instant)>>,
    refused: Mutex<HashMap<String, (Refusal, Instant)>>,
    reviews: tokio::sync::Semaphore,
}

impl ServiceAccountTokens {
    pub fn new(client: kube::Client, agent: (String, String), audience: String) -> ServiceAccountTokens {
        ServiceAccountTokens {
            client,
            agent,
            audience,
            cache: Mutex::default(),
            refused: Mutex::default(),
            reviews: tokio::sync::Semaphore::new(MAX_REVIEWS),
        }
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
            if let Some((refusal, at)) = self.refused.lock().get(token) {
                if at.elapsed() < NEGATIVE_CACHE {
                    return Err(refusal.clone());
                }
            }
            let Ok(_permit) = self.reviews.try_acquire() else {
                return Err(Refusal::Unavailable("too many tokens under review at once; retry".into()));
            };
            match self.review(token).await {
                Ok(node) => {
                    remember(&self.cache, token, node.clone(), CACHE);
                    Ok(node)
                }
                // Only the API server's verdict is remembered, never its being unreachable.
                Err(refusal @ Refusal::Unauthenticated(_)) => {
                    remember(&self.refused, token, refusal.clone(), NEGATIVE_CACHE);
                    Err(refusal)
                }
                Err(e) => Err(e),
            }
        })
    }
}

/// Remembers `value` for `token`, dropping expired entries and, when still full, the oldest half.
fn remember<V>(map: &Mutex<HashMap<String, (V, Instant)>>, token: &str, value: V, ttl: Duration) {
    let mut map = map.lock();
    map.retain(|_, (_, at)| at.elapsed() < ttl);
    if map.len() >= MAX_CACHED {
        let mut ages: Vec<Instant> = map.values().map(|(_, at)| *at).collect();
        ages.sort();
        let cut = ages[ages.len() / 2];
        map.retain(|_, (_, at)| *at > cut);
    }
    map.insert(token.to_string(), (value, Instant::now()));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembered_tokens_expire_and_a_full_map_forgets_the_oldest_half() {
        let map: Mutex<HashMap<String, (u8, Instant)>> = Mutex::default();
        for i in 0..MAX_CACHED {
            map.lock().insert(format!("t{i}"), (0, Instant::now() - Duration::from_millis((MAX_CACHED - i) as u64)));
        }
        remember(&map, "new", 1, Duration::from_secs(60));
        let m = map.lock();
        assert!(m.len() <= MAX_CACHED / 2 + 1, "{}", m.len());
        assert!(m.contains_key("new") && m.contains_key(&format!("t{}", MAX_CACHED - 1)) && !m.contains_key("t0"));
        drop(m);
        remember(&map, "newer", 2, Duration::from_millis(0));
        assert_eq!(map.lock().len(), 1, "expired entries are dropped first");
    }
}
