//! Hands a message to the app over HTTP and classifies the answer. Knows nothing of AMQP: it gets a
//! body and headers and returns an [`Outcome`].
//!
//! "Unreachable" is reserved for "nothing listens": connection refused, or a connection reset
//! before any answer *and* a fresh probe of the app failing too. A reset while the app still
//! accepts connections is the message's fault (the app crashed or closed on it), so it is a
//! retryable failure that spends an attempt: otherwise a message that kills the app would pause
//! and resume the consumer forever.

use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{CONTENT_LENGTH, HOST, HeaderMap, HeaderValue, RETRY_AFTER};
use hyper::{Method, Request, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use super::pool::{CONNECT_TIMEOUT, IDLE_TIMEOUT, Pool, SendError};
use super::retry_after;
use crate::policy::{Outcome, RetryReason};

/// How much of an error answer's body is kept for the dead letter's `last error` header.
const ERROR_BODY_LIMIT: usize = 512;

/// The answer to one dispatch.
#[derive(Debug, Clone)]
pub struct Answer {
    pub outcome: Outcome,
    pub elapsed: Duration,
    /// A short, single-line description for logs and dead-letter headers: the start of an error
    /// body, or what went wrong on the wire.
    pub detail: String,
    /// The wait a 429 or 503 asked for with `Retry-After` (uncapped); `None` when absent or
    /// malformed.
    pub retry_after: Option<Duration>,
}

/// The HTTP client to the app, with its target and deadline.
#[derive(Clone, Debug)]
pub struct Dispatcher {
    pool: Pool,
    target: Uri,
    /// The target in origin form (`/path?query`), as an HTTP/1 request line carries it.
    path: Uri,
    /// The `Host` header of every request, worked out once for callers to reuse.
    host: Option<HeaderValue>,
    timeout: Duration,
    probe: Prober,
}

impl Dispatcher {
    pub fn new(target: Uri, timeout: Duration, health_url: Option<Uri>) -> Self {
        let (host, port) = address(&target);
        let pool = Pool::new(host, port);
        let path = target
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/")
            .parse()
            .unwrap_or_else(|_| Uri::from_static("/"));
        let probe = Prober::new(target.clone(), health_url);
        let host = target.host().and_then(|h| {
            let value = match target.port() {
                Some(port) if Some(port.as_u16()) != default_port(&target) => format!("{h}:{port}"),
                _ => h.to_owned(),
            };
            HeaderValue::from_str(&value).ok()
        });
        Dispatcher {
            pool,
            target,
            path,
            host,
            timeout,
            probe,
        }
    }

    pub fn target(&self) -> &Uri {
        &self.target
    }

    /// The `Host` header of every request, worked out once. A caller that builds the same
    /// headers for many requests puts it in them once; where it is missing, `dispatch` adds it.
    pub fn host(&self) -> Option<&HeaderValue> {
        self.host.as_ref()
    }

    /// POSTs `body` with `headers` (with [`Dispatcher::host`] among them, or it is added) to the
    /// target and waits at most the handler timeout. `headers` may carry a `Content-Length`,
    /// which must then be the body's length: the HTTP client frames the body by it. Without one,
    /// the client adds it.
    pub async fn dispatch(&self, body: Bytes, mut headers: HeaderMap) -> Answer {
        let started = Instant::now();
        debug_assert!(
            content_length_fits(&headers, body.len()),
            "a Content-Length that is not the body's"
        );
        if let Some(host) = &self.host
            && !headers.contains_key(HOST)
        {
            headers.insert(HOST, host.clone());
        }
        let mut request = Request::builder()
            .method(Method::POST)
            .uri(self.path.clone())
            .body(Full::new(body))
            .expect("a valid URI and method always build a request");
        *request.headers_mut() = headers;
        let call = async {
            match self.pool.send(request).await {
                Ok(response) => {
                    let status = response.status().as_u16();
                    let outcome = Outcome::from_status(status);
                    let retry_after = match status {
                        429 | 503 => response
                            .headers()
                            .get(RETRY_AFTER)
                            .and_then(|v| v.to_str().ok())
                            .and_then(|v| retry_after::parse(v, SystemTime::now())),
                        _ => None,
                    };
                    let detail = if matches!(outcome, Outcome::Success { .. }) {
                        // The answer is in the status; a huge body is neither read nor kept.
                        String::new()
                    } else {
                        error_body(response.into_body()).await
                    };
                    (outcome, detail, retry_after)
                }
                Err(SendError::Connect(reason)) => (Outcome::Unreachable, reason, None),
                Err(SendError::Http(e)) => {
                    let detail = format!("connection closed before an answer: {}", error_chain(&e));
                    if self.probe.probe().await {
                        (
                            Outcome::Retryable {
                                reason: RetryReason::ConnectionReset,
                                status: None,
                            },
                            detail,
                            None,
                        )
                    } else {
                        (Outcome::Unreachable, detail, None)
                    }
                }
            }
        };
        let (outcome, detail, retry_after) = match tokio::time::timeout(self.timeout, call).await {
            Ok(r) => r,
            Err(_) => (
                Outcome::Retryable {
                    reason: RetryReason::Timeout,
                    status: None,
                },
                format!("no answer within {:?}", self.timeout),
                None,
            ),
        };
        Answer {
            outcome,
            elapsed: started.elapsed(),
            detail,
            retry_after,
        }
    }
}

/// Whether `headers` has no `Content-Length`, or exactly one that says `len`.
fn content_length_fits(headers: &HeaderMap, len: usize) -> bool {
    let mut given = headers.get_all(CONTENT_LENGTH).iter();
    match (given.next(), given.next()) {
        (None, _) => true,
        (Some(v), None) => v.to_str().ok().and_then(|v| v.parse().ok()) == Some(len),
        (Some(_), Some(_)) => false,
    }
}

/// Where the app listens: the target's host (an IPv6 address without its brackets) and port,
/// the scheme's default when the URL names none.
fn address(uri: &Uri) -> (&str, u16) {
    let host = uri.host().unwrap_or("127.0.0.1").trim_matches(['[', ']']);
    (
        host,
        uri.port_u16().or_else(|| default_port(uri)).unwrap_or(80),
    )
}

fn default_port(uri: &Uri) -> Option<u16> {
    match uri.scheme_str() {
        Some("http") => Some(80),
        Some("https") => Some(443),
        _ => None,
    }
}

async fn error_body(body: hyper::body::Incoming) -> String {
    let mut body = body;
    let mut buf = Vec::new();
    let read = async {
        while buf.len() < ERROR_BODY_LIMIT {
            match body.frame().await {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        buf.extend_from_slice(&data);
                    }
                }
                _ => break,
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_millis(500), read).await;
    buf.truncate(ERROR_BODY_LIMIT);
    single_line(&String::from_utf8_lossy(&buf))
}

fn single_line(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect::<String>()
        .trim()
        .to_string()
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    single_line(&out)
}

/// The client the prober asks the app's health URL with (keep-alive, `TCP_NODELAY`, the same
/// timeouts as the pool messages go through).
fn app_client() -> Client<HttpConnector, Full<Bytes>> {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(IDLE_TIMEOUT)
        .build(connector)
}

/// Tells whether the app is up: a GET to its health URL answering 2xx, or, without one, a TCP
/// connection to the target being accepted.
#[derive(Clone, Debug)]
pub struct Prober {
    target: Uri,
    health_url: Option<Uri>,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl Prober {
    pub fn new(target: Uri, health_url: Option<Uri>) -> Self {
        Prober {
            target,
            health_url,
            client: app_client(),
        }
    }

    pub async fn probe(&self) -> bool {
        let deadline = Duration::from_secs(2);
        match &self.health_url {
            Some(url) => {
                let request = Request::get(url.clone())
                    .body(Full::new(Bytes::new()))
                    .expect("a valid URI always builds a request");
                matches!(
                    tokio::time::timeout(deadline, self.client.request(request)).await,
                    Ok(Ok(r)) if r.status().is_success()
                )
            }
            None => {
                let (host, port) = address(&self.target);
                matches!(
                    tokio::time::timeout(deadline, tokio::net::TcpStream::connect((host, port)))
                        .await,
                    Ok(Ok(_))
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_address_is_the_host_without_brackets_and_the_port_or_the_schemes_default() {
        let at = |url: &str| {
            let uri: Uri = url.parse().unwrap();
            let (host, port) = address(&uri);
            (host.to_owned(), port)
        };
        assert_eq!(at("http://127.0.0.1:8080/in"), ("127.0.0.1".into(), 8080));
        assert_eq!(at("http://app/in"), ("app".into(), 80));
        assert_eq!(at("http://[::1]:9000/"), ("::1".into(), 9000));
    }

    #[test]
    fn a_content_length_fits_only_when_it_is_the_bodys_length() {
        let mut h = HeaderMap::new();
        assert!(content_length_fits(&h, 5));
        h.insert(CONTENT_LENGTH, HeaderValue::from(5));
        assert!(content_length_fits(&h, 5));
        assert!(!content_length_fits(&h, 16_384));
        h.append(CONTENT_LENGTH, HeaderValue::from(5));
        assert!(!content_length_fits(&h, 5));
        h.insert(CONTENT_LENGTH, HeaderValue::from_static("five"));
        assert!(!content_length_fits(&h, 5));
    }
}
