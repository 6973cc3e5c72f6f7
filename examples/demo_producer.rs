//! Demo producer for the compose stack: publishes a steady stream of messages for rabbit-sidecar.
//!
//! Every message goes to the default exchange with the queue name as routing key, carries a
//! `message_id`, a `timestamp` (what `rabbit_sidecar_message_age_seconds` is computed from), a
//! content type and a W3C `traceparent` header naming a fresh trace, so a message can be followed
//! from here through the sidecar's spans to the app in the trace backend.
//!
//! Publishes are confirmed and `mandatory`: the producer does not declare the queue (the sidecar
//! does, with `--declare`), so until it exists the broker returns each message and the producer
//! says so instead of losing them silently. Connection losses are retried with capped exponential
//! backoff and jitter, trying each URL of `AMQP_URL` in turn.
//!
//! Environment: `AMQP_URL` (comma-separated, default `amqp://guest:guest@127.0.0.1:5672/%2f`),
//! `DEMO_QUEUE` (default `demo`), `DEMO_RATE` (messages per second, default 5),
//! `DEMO_COUNT` (stop after this many confirmed messages; default: run forever).
//!
//! Run: `DEMO_RATE=20 cargo run --example demo_producer`

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
use rand::Rng;

struct Settings {
    urls: Vec<String>,
    queue: String,
    period: Duration,
    count: Option<u64>,
}

impl Settings {
    fn from_env() -> Result<Self, String> {
        let urls: Vec<String> = env_or("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f")
            .split(',')
            .map(str::trim)
            .filter(|url| !url.is_empty())
            .map(str::to_owned)
            .collect();
        if urls.is_empty() {
            return Err("AMQP_URL: no URL given".into());
        }
        let rate: f64 = env_or("DEMO_RATE", "5")
            .parse()
            .map_err(|e| format!("DEMO_RATE: {e}"))?;
        if !(rate > 0.0 && rate <= 10_000.0) {
            return Err(format!("DEMO_RATE: {rate} is not in (0, 10000]"));
        }
        let count = match std::env::var("DEMO_COUNT") {
            Ok(raw) => Some(raw.parse().map_err(|e| format!("DEMO_COUNT: {e}"))?),
            Err(_) => None,
        };
        Ok(Self {
            urls,
            queue: env_or("DEMO_QUEUE", "demo"),
            period: Duration::from_secs_f64(1.0 / rate),
            count,
        })
    }
}

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

/// Why publishing on a channel stopped.
enum Stopped {
    /// `DEMO_COUNT` messages were confirmed.
    Done,
    /// The connection or channel failed; reconnect.
    Lost(lapin::Error),
}

/// A fresh W3C trace context: version 00, random non-zero trace and parent ids, sampled.
fn new_traceparent() -> String {
    let mut rng = rand::rng();
    let trace_id: u128 = rng.random_range(1..=u128::MAX);
    let span_id: u64 = rng.random_range(1..=u64::MAX);
    format!("00-{trace_id:032x}-{span_id:016x}-01")
}

async fn connect(settings: &Settings) -> Connection {
    let mut backoff = Duration::from_millis(250);
    let mut attempt: usize = 0;
    loop {
        let node = attempt % settings.urls.len();
        attempt += 1;
        match Connection::connect(&settings.urls[node], ConnectionProperties::default()).await {
            Ok(connection) => {
                tracing::info!(node, "connected to the broker");
                return connection;
            }
            Err(error) => {
                // Jitter keeps a fleet of producers from reconnecting in lockstep after an outage.
                let jitter = rand::rng().random_range(0..=backoff.as_millis() as u64 / 2);
                let wait = backoff + Duration::from_millis(jitter);
                tracing::warn!(%error, wait_ms = wait.as_millis() as u64, "connect failed, retrying");
                tokio::time::sleep(wait).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    }
}

async fn publish_loop(settings: &Settings, channel: &Channel, sent: &mut u64) -> Stopped {
    if let Err(error) = channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
    {
        return Stopped::Lost(error);
    }
    let mut ticker = tokio::time::interval(settings.period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        if settings.count.is_some_and(|count| *sent >= count) {
            return Stopped::Done;
        }
        ticker.tick().await;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let message_id = format!("demo-{}-{}", now.as_millis(), *sent);
        let traceparent = new_traceparent();
        let mut headers = FieldTable::default();
        headers.insert(
            "traceparent".into(),
            AMQPValue::LongString(LongString::from(traceparent.as_str())),
        );
        let properties = BasicProperties::default()
            .with_message_id(message_id.as_str().into())
            .with_timestamp(now.as_secs())
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_headers(headers);
        let body = format!(
            r#"{{"seq":{},"message_id":"{}","produced_at_ms":{}}}"#,
            *sent,
            message_id,
            now.as_millis()
        );
        let confirm = match channel
            .basic_publish(
                "".into(),
                settings.queue.as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                body.as_bytes(),
                properties,
            )
            .await
        {
            Ok(pending) => pending.await,
            Err(error) => return Stopped::Lost(error),
        };
        match confirm {
            Ok(Confirmation::Ack(None)) => {
                *sent += 1;
                tracing::debug!(%message_id, %traceparent, "published");
                if (*sent).is_multiple_of(100) {
                    tracing::info!(sent = *sent, "published and confirmed");
                }
            }
            Ok(Confirmation::Ack(Some(_returned))) => {
                // Returned by the broker: acked, but no queue was bound to the routing key.
                tracing::warn!(
                    queue = %settings.queue,
                    "queue does not exist yet (the sidecar declares it with --declare); message dropped"
                );
            }
            Ok(Confirmation::Nack(_)) => {
                tracing::warn!(%message_id, "broker nacked the message; not counted")
            }
            Ok(Confirmation::NotRequested) => {
                unreachable!("confirm_select succeeded on this channel")
            }
            Err(error) => return Stopped::Lost(error),
        }
    }
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            // lapin logs each returned message in full at WARN; the line below says it shorter.
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,lapin::returned_messages=error".into()),
        )
        .init();
    let settings = match Settings::from_env() {
        Ok(settings) => settings,
        Err(problem) => {
            eprintln!("demo_producer: bad configuration: {problem}");
            std::process::exit(64);
        }
    };
    tracing::info!(
        queue = %settings.queue,
        period_ms = settings.period.as_millis() as u64,
        "demo producer starting"
    );
    let mut sent = 0u64;
    loop {
        let connection = tokio::select! {
            connection = connect(&settings) => connection,
            _ = tokio::signal::ctrl_c() => break,
        };
        let channel = match connection.create_channel().await {
            Ok(channel) => channel,
            Err(error) => {
                tracing::warn!(%error, "could not open a channel, reconnecting");
                continue;
            }
        };
        let stopped = tokio::select! {
            stopped = publish_loop(&settings, &channel, &mut sent) => stopped,
            _ = tokio::signal::ctrl_c() => Stopped::Done,
        };
        match stopped {
            Stopped::Done => {
                let _ = channel.close(200, "done".into()).await;
                let _ = connection.close(200, "done".into()).await;
                break;
            }
            Stopped::Lost(error) => tracing::warn!(%error, "lost the broker, reconnecting"),
        }
    }
    tracing::info!(sent, "demo producer stopped");
}
