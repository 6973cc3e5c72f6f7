//! The RabbitMQ management API: is this consumer tag the queue's active consumer?
//! (`consumer_details[].active` of `GET /api/queues/{vhost}/{queue}`), and what a queue and the
//! broker are (type, arguments, policy, version) for the dead-letter tooling. Credentials come
//! from the URL's user info and are sent as basic auth; they never appear in logs.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::{Request, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;

use crate::encode::path_segment;

#[derive(Debug, Clone)]
pub struct Management {
    base: String,
    authorization: Option<String>,
    vhost: String,
    client: Client<HttpConnector, Empty<Bytes>>,
}

impl Management {
    pub fn new(url: Uri) -> Management {
        let authority = url.authority().map(|a| a.as_str()).unwrap_or("");
        let (userinfo, hostport) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, authority),
        };
        let authorization = userinfo.map(|u| format!("Basic {}", BASE64.encode(u.as_bytes())));
        Management {
            base: format!(
                "{}://{hostport}{}",
                url.scheme_str().unwrap_or("http"),
                url.path().trim_end_matches('/')
            ),
            authorization,
            vhost: "%2F".into(),
            client: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    /// The API `--management-url` names, asked about the virtual host of the first broker node
    /// (every node of one configuration serves the same one); `None` without the flag.
    pub fn from_config(config: &crate::config::Config) -> Option<Management> {
        let url = config.management_url.as_ref()?;
        let api = Management::new(url.0.clone());
        Some(match config.nodes.first() {
            Some(node) => api.with_vhost(&node.uri.vhost),
            None => api,
        })
    }

    /// The same API, asked about the virtual host `vhost` (the default is `/`).
    pub fn with_vhost(mut self, vhost: &str) -> Management {
        self.vhost = path_segment(vhost);
        self
    }

    /// Whether `tag` is the active consumer of the queue the API described as `queue` (the answer
    /// of [`Management::queue`]); `None` when it does not say.
    pub fn consumer_active(queue: &serde_json::Value, tag: &str) -> Option<bool> {
        queue
            .get("consumer_details")?
            .as_array()?
            .iter()
            .find(|c| c.get("consumer_tag").and_then(|t| t.as_str()) == Some(tag))
            .and_then(|c| c.get("active").and_then(|a| a.as_bool()))
    }

    /// `GET /api/queues/{vhost}/{queue}`; `None` when the API cannot answer.
    pub async fn queue(&self, queue: &str) -> Option<serde_json::Value> {
        self.get(&format!(
            "/api/queues/{}/{}",
            self.vhost,
            path_segment(queue)
        ))
        .await
    }

    /// `GET /api/overview` (among others, `rabbitmq_version`); `None` when the API cannot answer.
    pub async fn overview(&self) -> Option<serde_json::Value> {
        self.get("/api/overview").await
    }

    async fn get(&self, path: &str) -> Option<serde_json::Value> {
        let mut req = Request::get(format!("{}{path}", self.base))
            .body(Empty::new())
            .ok()?;
        if let Some(auth) = &self.authorization {
            req.headers_mut()
                .insert(hyper::header::AUTHORIZATION, auth.parse().ok()?);
        }
        let resp = tokio::time::timeout(Duration::from_secs(3), self.client.request(req))
            .await
            .ok()?
            .ok()?;
        if !resp.status().is_success() {
            return None;
        }
        let body = Limited::new(resp.into_body(), 4 << 20)
            .collect()
            .await
            .ok()?
            .to_bytes();
        serde_json::from_slice(&body).ok()
    }
}
