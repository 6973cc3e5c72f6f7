//! The two baselines the sidecar is measured against, both bare `lapin` consumers in this process
//! with the sidecar's prefetch:
//!
//! 1. ack only: what the broker and the client library manage with one `basic.ack` per message;
//!
//! and the broker's ceiling: ack only, one `basic.ack(multiple=true)` per [`CEILING_BATCH`]
//! messages (and for what is left after 5 ms without a delivery), no HTTP: what the broker manages
//! when acks cost it next to nothing, the most any consumer of this machine's broker can reach;
//! 2. POST each message to the app with the same concurrency limit (a semaphore), ack on 2xx,
//!    requeue otherwise: the sidecar's work without its metrics, health, traces or policy. It runs
//!    as a child process of the bench ([`BareProc`], this same binary with
//!    `--bare-consumer`), like the sidecar: in the bench's own process the POST would go to an
//!    app on the same tokio runtime, often without leaving the thread, a shortcut no deployed
//!    consumer has. Its CPU time is measured the same way as the sidecar's.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::Full;
use hyper::{Method, Request, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions};
use lapin::types::FieldTable;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::rig::{self, ProcStats, Recorder};

/// Messages per `basic.ack(multiple=true)` of the ceiling case.
pub const CEILING_BATCH: u64 = 32;

/// What a bare consumer does with each delivery.
#[derive(Clone)]
pub enum Work {
    /// Record the receipt and ack (baseline 1).
    AckOnly(Arc<Recorder>),
    /// Record the receipt; ack every [`CEILING_BATCH`] with one multiple ack (the ceiling).
    AckBatched(Arc<Recorder>),
    /// POST to the app, ack on 2xx (baseline 2); the app records the receipt.
    Post { url: Uri, concurrency: usize },
}

/// Consumes `queue` until `stop` is cancelled. Returns once the consumer is registered; the work
/// runs on a spawned task.
pub async fn start(
    queue: &str,
    prefetch: u16,
    work: Work,
    stop: CancellationToken,
) -> Result<tokio::task::JoinHandle<()>, String> {
    let conn = rig::connect().await.map_err(|e| e.to_string())?;
    let ch = conn.create_channel().await.map_err(|e| e.to_string())?;
    ch.basic_qos(prefetch, BasicQosOptions::default())
        .await
        .map_err(|e| e.to_string())?;
    let mut consumer = ch
        .basic_consume(
            queue.into(),
            rig::unique("bare").as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| e.to_string())?;
    // Both ack on the channel, as the sidecar does, rather than through each delivery's `Acker`:
    // lapin hands an `Acker`'s ack to its internal RPC task, which spawns a task to send it, and
    // that costs more than the rest of the ack (see docs/performance.md). The baselines are the
    // same work done the cheapest way, so that the sidecar's ratio to them is the cost of what it
    // adds.
    let ch = Arc::new(ch);
    Ok(tokio::spawn(async move {
        let (client, slots) = match &work {
            Work::Post { concurrency, .. } => {
                let mut connector = HttpConnector::new();
                connector.set_nodelay(true);
                let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
                    .pool_idle_timeout(Duration::from_secs(30))
                    .build(connector);
                (Some(client), Arc::new(Semaphore::new(*concurrency)))
            }
            Work::AckOnly(_) | Work::AckBatched(_) => (None, Arc::new(Semaphore::new(1))),
        };
        // The ceiling's unacked receipts: how many, and the last tag.
        let (mut pending, mut last) = (0u64, 0u64);
        loop {
            let delivery = tokio::select! {
                _ = stop.cancelled() => break,
                // Nothing came for 5 ms: ack what is left (the end of a drain, a slow trickle).
                _ = tokio::time::sleep(Duration::from_millis(5)), if pending > 0 => {
                    let _ = ch.basic_ack(last, BasicAckOptions { multiple: true }).await;
                    pending = 0;
                    continue;
                }
                d = consumer.next() => match d {
                    Some(Ok(d)) => d,
                    _ => break,
                },
            };
            match (&work, &client) {
                (Work::AckOnly(rec), _) => {
                    rec.record(&delivery.data, "");
                    let _ = ch
                        .basic_ack(delivery.delivery_tag, BasicAckOptions::default())
                        .await;
                }
                (Work::AckBatched(rec), _) => {
                    rec.record(&delivery.data, "");
                    (pending, last) = (pending + 1, delivery.delivery_tag);
                    if pending == CEILING_BATCH {
                        let _ = ch.basic_ack(last, BasicAckOptions { multiple: true }).await;
                        pending = 0;
                    }
                }
                (Work::Post { url, .. }, Some(client)) => {
                    let permit = slots.clone().acquire_owned().await.expect("never closed");
                    let (client, url, ch) = (client.clone(), url.clone(), ch.clone());
                    tokio::spawn(async move {
                        let request = Request::builder()
                            .method(Method::POST)
                            .uri(url)
                            .header("content-type", "application/octet-stream")
                            .body(Full::new(Bytes::copy_from_slice(&delivery.data)))
                            .expect("a valid request");
                        let ok = matches!(
                            tokio::time::timeout(Duration::from_secs(30), client.request(request)).await,
                            Ok(Ok(r)) if r.status().is_success()
                        );
                        if ok {
                            let _ = ch
                                .basic_ack(delivery.delivery_tag, BasicAckOptions::default())
                                .await;
                        } else {
                            let _ = delivery
                                .acker
                                .nack(BasicNackOptions {
                                    requeue: true,
                                    multiple: false,
                                })
                                .await;
                        }
                        drop(permit);
                    });
                }
                (Work::Post { .. }, None) => unreachable!("a POST worker always has a client"),
            }
        }
        let _ = ch.close(200, "".into()).await;
        let _ = conn.close(200, "".into()).await;
    }))
}

/// Baseline 2 in a process of its own: this bench binary run with `--bare-consumer`. It stops
/// when its stdin closes (this handle is dropped) and is killed by its PID if it lingers.
pub struct BareProc {
    child: std::process::Child,
}

impl BareProc {
    /// Starts the consumer and waits until it is registered with the broker.
    pub async fn start(
        queue: &str,
        url: &str,
        concurrency: usize,
        prefetch: u16,
    ) -> Result<BareProc, String> {
        use std::io::BufRead as _;
        use std::process::{Command, Stdio};
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let mut child = Command::new(exe)
            .args([
                "--bare-consumer",
                queue,
                url,
                &concurrency.to_string(),
                &prefetch.to_string(),
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("cannot start the bare consumer: {e}"))?;
        let stdout = child.stdout.take().expect("piped");
        let mut proc = BareProc { child };
        let line = tokio::task::spawn_blocking(move || {
            let mut line = String::new();
            std::io::BufReader::new(stdout)
                .read_line(&mut line)
                .map(|_| line)
        });
        match tokio::time::timeout(Duration::from_secs(30), line).await {
            Ok(Ok(Ok(l))) if l.trim() == "ready" => Ok(proc),
            other => {
                proc.stop().await;
                Err(format!("the bare consumer did not start: {other:?}"))
            }
        }
    }

    pub fn stats(&self) -> ProcStats {
        ProcStats::read(self.child.id())
    }

    /// Closes its stdin and waits (at most 10 s) for it to exit; kills it otherwise.
    pub async fn stop(&mut self) {
        drop(self.child.stdin.take());
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for BareProc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The `--bare-consumer QUEUE URL CONCURRENCY PREFETCH` mode: consume with [`Work::Post`], say
/// `ready` on stdout once registered, stop when stdin closes.
pub async fn serve(args: &[String]) -> Result<(), String> {
    let [queue, url, concurrency, prefetch] = args else {
        return Err("--bare-consumer QUEUE URL CONCURRENCY PREFETCH".into());
    };
    let url = url.parse().map_err(|_| format!("bad URL {url:?}"))?;
    let concurrency = concurrency.parse().map_err(|_| "bad concurrency")?;
    let prefetch = prefetch.parse().map_err(|_| "bad prefetch")?;
    let stop = CancellationToken::new();
    let task = start(
        queue,
        prefetch,
        Work::Post { url, concurrency },
        stop.clone(),
    )
    .await?;
    println!("ready");
    // Blocks until the bench closes our stdin (or dies).
    let _ = tokio::task::spawn_blocking(|| {
        let mut sink = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink)
    })
    .await;
    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    Ok(())
}
