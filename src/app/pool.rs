//! Keep-alive HTTP/1 connections to one app address.
//!
//! A subscription POSTs every message to one URL, so its pool is a stack of idle connections to
//! one address. hyper-util's general-purpose client did the same job at about 8,000 instructions
//! per message, an eighth of the sidecar's own work: it keys connections by scheme and authority
//! and hashes that key twice per request (byte by byte, with SipHash), clones the URI on the way,
//! and spawns a task for each request whose connection is still reading its response when the
//! answer arrives, to put it back later (`docs/performance.md`, Profiling).
//!
//! What it kept, this keeps: a connection is reused while it lives and closed once it has been
//! unused for [`IDLE_TIMEOUT`] (a task looks every [`IDLE_TIMEOUT`], so between one and two of
//! them); a request that a reused connection never started (the app closed it
//! while idle) goes again on another one, since the app cannot have seen it; connecting gives up
//! after [`CONNECT_TIMEOUT`]; `TCP_NODELAY` is set. There are never more connections than
//! requests in flight at once: a connection is made only when none is idle.

use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// How long connecting to the app may take before it counts as unreachable.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long an unused connection is kept.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

type Sender = SendRequest<Full<Bytes>>;

/// Why a request got no answer.
#[derive(Debug)]
pub enum SendError {
    /// No connection could be made: nothing listens, or it did not answer in time. Says which,
    /// in a few words.
    Connect(String),
    /// The connection failed while the request was sent or its answer read.
    Http(hyper::Error),
}

/// The idle connections to one `host:port`. Cloning shares them.
#[derive(Clone, Debug)]
pub struct Pool {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    host: String,
    port: u16,
    idle: Mutex<Vec<Idle>>,
}

#[derive(Debug)]
struct Idle {
    sender: Sender,
    since: Instant,
}

impl Pool {
    /// A pool for `host` (a name, an IPv4 address, or an IPv6 address with or without brackets)
    /// and `port`. Within a tokio runtime it also starts a task that closes connections left
    /// idle for [`IDLE_TIMEOUT`]; it ends with the last clone of the pool.
    pub fn new(host: &str, port: u16) -> Pool {
        let inner = Arc::new(Inner {
            host: host.trim_matches(['[', ']']).to_owned(),
            port,
            idle: Mutex::new(Vec::new()),
        });
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(reap(Arc::downgrade(&inner)));
        }
        Pool { inner }
    }

    /// Sends `request` (origin-form URI, `Host` header set) on an idle connection, or on a new
    /// one when none is idle. Dropping the future abandons the request and its connection.
    pub async fn send(
        &self,
        request: Request<Full<Bytes>>,
    ) -> Result<Response<Incoming>, SendError> {
        let mut request = request;
        // Each turn either takes an idle connection off the stack or makes a new one, and a new
        // one is never tried twice: the loop ends.
        loop {
            let (mut sender, reused) = match self.inner.take_idle() {
                Some(sender) => (sender, true),
                None => (self.inner.connect().await?, false),
            };
            // A reused connection may still be reading the last answer's body: wait for it. An
            // error means it has closed since; the next one is tried.
            if reused && sender.ready().await.is_err() {
                continue;
            }
            match sender.try_send_request(request).await {
                Ok(response) => {
                    self.inner.put_idle(sender);
                    return Ok(response);
                }
                Err(mut e) => match e.take_message() {
                    // Never written: the app has not seen it, so it can go on another connection.
                    Some(unsent) if reused => request = unsent,
                    _ => return Err(SendError::Http(e.into_error())),
                },
            }
        }
    }

    /// Connections kept idle now (for tests).
    #[cfg(test)]
    fn idle_count(&self) -> usize {
        self.inner.lock().len()
    }
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Idle>> {
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The most recently used live connection (the one most likely still open), dropping the
    /// closed on the way. Expiry is the reaper's: no clock is read per message here.
    fn take_idle(&self) -> Option<Sender> {
        let mut idle = self.lock();
        while let Some(entry) = idle.pop() {
            if !entry.sender.is_closed() {
                return Some(entry.sender);
            }
        }
        None
    }

    fn put_idle(&self, sender: Sender) {
        if !sender.is_closed() {
            self.lock().push(Idle {
                sender,
                since: Instant::now(),
            });
        }
    }

    async fn connect(&self) -> Result<Sender, SendError> {
        let stream = match tokio::time::timeout(
            CONNECT_TIMEOUT,
            TcpStream::connect((self.host.as_str(), self.port)),
        )
        .await
        {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                return Err(SendError::Connect("connection refused".to_string()));
            }
            Ok(Err(e)) => return Err(SendError::Connect(format!("cannot connect: {e}"))),
            Err(_) => {
                return Err(SendError::Connect(format!(
                    "no connection within {CONNECT_TIMEOUT:?}"
                )));
            }
        };
        let _ = stream.set_nodelay(true);
        let (sender, connection) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| SendError::Connect(e.to_string()))?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "a connection to the app ended");
            }
        });
        Ok(sender)
    }
}

/// Closes connections idle for [`IDLE_TIMEOUT`], every [`IDLE_TIMEOUT`], until the pool is gone.
async fn reap(pool: Weak<Inner>) {
    let mut tick = tokio::time::interval(IDLE_TIMEOUT);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(inner) = pool.upgrade() else {
            return;
        };
        inner
            .lock()
            .retain(|e| !e.sender.is_closed() && e.since.elapsed() < IDLE_TIMEOUT);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::TcpListener;

    fn post() -> Request<Full<Bytes>> {
        Request::post("/")
            .header(hyper::header::HOST, "127.0.0.1")
            .body(Full::new(Bytes::from_static(b"x")))
            .unwrap()
    }

    /// How the test app treats a connection after answering on it.
    #[derive(Clone, Copy)]
    enum After {
        KeepAlive,
        /// `Connection: close` on the answer, then close.
        CloseSaying,
        /// Keep-alive on the answer, then close without a word once the client is idle.
        CloseSilently,
    }

    /// An app that answers every request with 200, counting the connections it accepted and
    /// those it closed.
    async fn app(after: After) -> (u16, Arc<AtomicUsize>, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let closed = Arc::new(AtomicUsize::new(0));
        let (a, c) = (accepted.clone(), closed.clone());
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                a.fetch_add(1, Ordering::SeqCst);
                let c = c.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    // One request fits one read here: a small POST on loopback.
                    while let Ok(n) = socket.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        let answer: &[u8] = match after {
                            After::CloseSaying => {
                                b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                            }
                            _ => b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
                        };
                        if socket.write_all(answer).await.is_err() {
                            break;
                        }
                        if !matches!(after, After::KeepAlive) {
                            break;
                        }
                    }
                    drop(socket);
                    c.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        (port, accepted, closed)
    }

    #[tokio::test]
    async fn one_connection_serves_requests_one_after_another() {
        let (port, accepted, _) = app(After::KeepAlive).await;
        let pool = Pool::new("127.0.0.1", port);
        for _ in 0..5 {
            let response = pool.send(post()).await.unwrap();
            assert_eq!(response.status(), 200);
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        assert_eq!(pool.idle_count(), 1);
    }

    #[tokio::test]
    async fn requests_at_once_get_connections_of_their_own_which_are_kept() {
        let (port, accepted, _) = app(After::KeepAlive).await;
        let pool = Pool::new("127.0.0.1", port);
        let calls: Vec<_> = (0..4).map(|_| pool.send(post())).collect();
        for response in futures_util::future::join_all(calls).await {
            assert_eq!(response.unwrap().status(), 200);
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 4);
        assert_eq!(pool.idle_count(), 4);
        pool.send(post()).await.unwrap();
        assert_eq!(accepted.load(Ordering::SeqCst), 4, "an idle one is reused");
    }

    #[tokio::test]
    async fn a_connection_the_app_closes_after_answering_is_not_kept() {
        let (port, accepted, _) = app(After::CloseSaying).await;
        let pool = Pool::new("127.0.0.1", port);
        for i in 1..=3 {
            let response = pool.send(post()).await.unwrap();
            assert_eq!(response.status(), 200, "request {i}");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_connection_the_app_closed_while_idle_is_not_used_and_the_request_still_goes() {
        let (port, accepted, closed) = app(After::CloseSilently).await;
        let pool = Pool::new("127.0.0.1", port);
        for i in 1..=3 {
            let response = pool.send(post()).await.unwrap();
            assert_eq!(response.status(), 200, "request {i}");
            // Wait, with a deadline, until the app has closed the idle connection.
            let deadline = Instant::now() + Duration::from_secs(5);
            while closed.load(Ordering::SeqCst) < i {
                assert!(
                    Instant::now() < deadline,
                    "the app did not close connection {i}"
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn nothing_listening_is_a_connect_error() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let pool = Pool::new("127.0.0.1", port);
        match pool.send(post()).await {
            Err(SendError::Connect(_)) => {}
            other => panic!("expected a connect error, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn ipv6_hosts_may_keep_their_brackets() {
        let pool = Pool::new("[::1]", 1);
        assert_eq!(pool.inner.host, "::1");
    }
}
