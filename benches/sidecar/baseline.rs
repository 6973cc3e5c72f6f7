//! The two baselines the sidecar is measured against, both bare `lapin` consumers in this process
//! with the sidecar's prefetch:
//!
//! 1. ack only: the ceiling of the broker and the client library on this machine;
//! 2. POST each message to the app with the same concurrency limit (a semaphore), ack on 2xx,
//!    requeue otherwise: the sidecar's work without its metrics, health, traces or policy.

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

use crate::rig::{self, Recorder};

/// What a bare consumer does with each delivery.
#[derive(Clone)]
pub enum Work {
    /// Record the receipt and ack (baseline 1).
    AckOnly(Arc<Recorder>),
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
            Work::AckOnly(_) => (None, Arc::new(Semaphore::new(1))),
        };
        loop {
            let delivery = tokio::select! {
                _ = stop.cancelled() => break,
                d = consumer.next() => match d {
                    Some(Ok(d)) => d,
                    _ => break,
                },
            };
            match (&work, &client) {
                (Work::AckOnly(rec), _) => {
                    rec.record(&delivery.data, "");
                    let _ = delivery.acker.ack(BasicAckOptions::default()).await;
                }
                (Work::Post { url, .. }, Some(client)) => {
                    let permit = slots.clone().acquire_owned().await.expect("never closed");
                    let (client, url) = (client.clone(), url.clone());
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
                            let _ = delivery.acker.ack(BasicAckOptions::default()).await;
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
