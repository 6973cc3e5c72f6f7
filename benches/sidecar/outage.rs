//! A dependency outage: the app stays up but answers 503 to everything for a while (its database
//! is down, say) under a steady flow of messages, then recovers. Reported: how many requests a
//! second the sick app got, how many messages were dead-lettered although nothing was wrong with
//! them, and how long after the recovery the backlog (the queue and its retry queue) was gone.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;

use crate::failover::Timing;
use crate::rig::{self, App, Broker, QueueKind, SidecarProc};

/// Ready messages in `queue` (a passive declare on a channel of its own), `None` if it cannot
/// tell.
async fn ready(broker: &Broker, queue: &str) -> Option<u32> {
    let ch = broker.conn.create_channel().await.ok()?;
    let q = ch
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .ok()?;
    let _ = ch.close(200, "".into()).await;
    Some(q.message_count())
}

/// `outage` of 503s under `rate` messages a second, with the sidecar's defaults (`extra` flags
/// added).
pub async fn dependency_outage(
    app: &App,
    kind: QueueKind,
    outage: Duration,
    rate: f64,
    extra: &[&str],
) -> Result<Timing, String> {
    let broker = Broker::connect().await?;
    let q = rig::unique("outage");
    broker.declare(&q, kind, false).await;
    let (retry, dead) = (format!("{q}.retry"), format!("{q}.dead-letter"));
    app.rec.reset();
    let result = async {
        let mut args: Vec<String> = ["--queue", &q, "--target-url", &app.url("/outage")]
            .iter()
            .map(|s| s.to_string())
            .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        let sidecar = SidecarProc::start(&args, &[]).await?;
        let stop = Arc::new(AtomicBool::new(false));
        let feeder = {
            // The rig's channel: it has publisher confirms on.
            let (ch, q, stop) = (broker.ch.clone(), q.clone(), stop.clone());
            tokio::spawn(async move {
                rig::publish_at_rate(&ch, &q, 1_000_000, 64, rate, &stop).await
            })
        };
        // A healthy second first, then the outage.
        tokio::time::sleep(Duration::from_secs(1)).await;
        app.set_status(503);
        let before = app.rec.count();
        let sick_since = Instant::now();
        tokio::time::sleep(outage).await;
        let sick_requests = app.rec.count() - before;
        let sick_rps = sick_requests as f64 / sick_since.elapsed().as_secs_f64();
        app.set_status(200);
        let t0 = Instant::now();
        stop.store(true, Ordering::Relaxed);
        let published = feeder
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("publishing: {e}"))?;
        // The backlog is gone when the queue and the retry queue are empty twice in a row (a
        // copy moves between them).
        let deadline = t0 + Duration::from_secs(120);
        let mut empty_in_a_row = 0;
        let recovered = loop {
            let q_ready = ready(&broker, &q).await;
            let r_ready = ready(&broker, &retry).await;
            if q_ready == Some(0) && r_ready == Some(0) {
                empty_in_a_row += 1;
                if empty_in_a_row == 2 {
                    break Some(t0.elapsed().as_secs_f64());
                }
            } else {
                empty_in_a_row = 0;
            }
            if Instant::now() > deadline {
                break None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let dead_lettered = ready(&broker, &dead).await.unwrap_or(0);
        drop(sidecar);
        Ok(Timing {
            name: "dependency_outage",
            what: "app answers 503 to everything, then recovers → queue and retry queue empty",
            seconds: recovered,
            target_s: None,
            note: format!(
                "{:.0} s outage at {rate:.0} msg/s ({published} published): the sick app got {sick_rps:.0} requests/s; {dead_lettered} dead-lettered",
                outage.as_secs_f64()
            ),
        })
    }
    .await;
    app.set_status(200);
    broker.cleanup().await;
    result
}
