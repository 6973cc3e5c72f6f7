//! The queues a subscription needs: its own queue (declared with `--declare`, otherwise it must
//! exist), a retry queue where copies wait out their backoff, and a dead-letter queue. The retry
//! and dead-letter queues are the sidecar's own: they are created when missing whatever
//! `--declare` says, and never redeclared with different arguments when present.
//!
//! Each declaration runs on its own short-lived channel: a refused declaration (404, 406) closes
//! the channel it ran on, and that must never be the consuming one.

use lapin::options::QueueDeclareOptions;
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Connection, ErrorKind};

use lapin::ExchangeKind;
use lapin::options::{ExchangeDeclareOptions, QueueBindOptions};

use crate::config::{ExchangeType, QueueType};

/// What one subscription consumes and where its retries and dead letters go.
#[derive(Debug, Clone)]
pub struct QueueSpec {
    pub queue: String,
    pub retry_queue: String,
    pub dead_letter_queue: String,
    pub declare: bool,
    pub queue_type: QueueType,
    pub single_active_consumer: bool,
    pub exchange: Option<(String, ExchangeType)>,
    pub binding_keys: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    #[error("queue {0:?} does not exist (start with --declare to create it)")]
    Missing(String),
    #[error(
        "{what} {name:?} exists with different arguments than requested ({detail}); delete it or change the conflicting settings"
    )]
    Conflict {
        what: &'static str,
        name: String,
        detail: String,
    },
    #[error("declaring {queue:?}: {error}")]
    Broker { queue: String, error: lapin::Error },
}

fn reply_code(e: &lapin::Error) -> Option<u16> {
    match e.kind() {
        ErrorKind::ProtocolError(p) => Some(p.get_id()),
        _ => None,
    }
}

/// Declares `name` (passively: only checks that it exists) on a channel of its own, and returns
/// its ready messages and consumers.
async fn declare_on_fresh_channel(
    connection: &Connection,
    name: &str,
    passive: bool,
    arguments: FieldTable,
) -> Result<(u32, u32), lapin::Error> {
    let channel = connection.create_channel().await?;
    let r = channel
        .queue_declare(
            name.into(),
            QueueDeclareOptions {
                passive,
                durable: true,
                ..QueueDeclareOptions::default()
            },
            arguments,
        )
        .await;
    if channel.status().connected() {
        let _ = channel.close(200, "declared".into()).await;
    }
    r.map(|q| (q.message_count(), q.consumer_count()))
}

/// Ready messages and consumers of `queue`, by a passive declare on a short-lived channel (a
/// refused one closes its channel, which must never be a consuming one).
pub(crate) async fn inspect(
    connection: &Connection,
    queue: &str,
) -> Result<(u32, u32), lapin::Error> {
    declare_on_fresh_channel(connection, queue, true, FieldTable::default()).await
}

/// Declares `name` if it is missing; leaves an existing queue as it is.
async fn ensure(
    connection: &Connection,
    name: &str,
    arguments: FieldTable,
) -> Result<(), TopologyError> {
    match inspect(connection, name).await {
        Ok(_) => return Ok(()),
        // A non-replicated queue whose node is down (in a cluster, the node this sidecar first
        // declared it on). It exists, so consuming goes on: copies that cannot reach it are not
        // confirmed, and their originals are held and requeued until the node is back.
        Err(e) if reply_code(&e) == Some(404) && node_down(&e) => {
            tracing::warn!(queue = name, error = %e, "the queue's node is down; consuming anyway, copies to it wait until it is back");
            return Ok(());
        }
        Err(e) if reply_code(&e) == Some(404) => {}
        Err(error) => {
            return Err(TopologyError::Broker {
                queue: name.into(),
                error,
            });
        }
    }
    declare(connection, name, arguments).await
}

/// Whether a 404 says the queue exists but its node is down: RabbitMQ 3.x says "home node … is
/// down or inaccessible", 4.x "queue … process is stopped by supervisor".
fn node_down(e: &lapin::Error) -> bool {
    let text = e.to_string();
    text.contains("is down or inaccessible") || text.contains("process is stopped by supervisor")
}

async fn declare(
    connection: &Connection,
    name: &str,
    arguments: FieldTable,
) -> Result<(), TopologyError> {
    declare_on_fresh_channel(connection, name, false, arguments)
        .await
        .map(|_| ())
        .map_err(|error| refused("queue", name, error))
}

/// A refused declaration of `what` (`queue`, `exchange`) `name`: a 406 is a conflict with what
/// exists, anything else a broker error.
fn refused(what: &'static str, name: &str, error: lapin::Error) -> TopologyError {
    match reply_code(&error) {
        Some(406) => TopologyError::Conflict {
            what,
            name: name.into(),
            detail: broker_text(&error),
        },
        _ => TopologyError::Broker {
            queue: name.into(),
            error,
        },
    }
}

/// The broker's own words (`PRECONDITION_FAILED - inequivalent arg 'type' ...`), which name the
/// difference exactly.
fn broker_text(e: &lapin::Error) -> String {
    match e.kind() {
        ErrorKind::ProtocolError(p) => p.get_message().as_str().to_string(),
        _ => e.to_string(),
    }
}

fn exchange_kind(t: ExchangeType) -> ExchangeKind {
    match t {
        ExchangeType::Direct => ExchangeKind::Direct,
        ExchangeType::Topic => ExchangeKind::Topic,
        ExchangeType::Fanout => ExchangeKind::Fanout,
        ExchangeType::Headers => ExchangeKind::Headers,
    }
}

/// Declares the exchange (durable; an equal existing one is fine, a different one is refused by
/// the broker) and binds the queue with every binding key (idempotent).
async fn declare_exchange_and_bind(
    connection: &Connection,
    spec: &QueueSpec,
    name: &str,
    kind: ExchangeType,
) -> Result<(), TopologyError> {
    let channel = connection
        .create_channel()
        .await
        .map_err(|error| TopologyError::Broker {
            queue: name.into(),
            error,
        })?;
    let declared = channel
        .exchange_declare(
            name.into(),
            exchange_kind(kind),
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await;
    if let Err(error) = declared {
        return Err(refused("exchange", name, error));
    }
    let keys: Vec<&str> = if spec.binding_keys.is_empty() {
        vec![""]
    } else {
        spec.binding_keys.iter().map(String::as_str).collect()
    };
    for key in keys {
        channel
            .queue_bind(
                spec.queue.as_str().into(),
                name.into(),
                key.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|error| TopologyError::Broker {
                queue: spec.queue.clone(),
                error,
            })?;
    }
    let _ = channel.close(200, "bound".into()).await;
    Ok(())
}

fn text(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

/// The delivery limit `--declare` gives a quorum queue: RabbitMQ 4's default, set explicitly so
/// that 3.x bounds returns the same way (it has no default).
pub const DECLARED_DELIVERY_LIMIT: u32 = 20;

/// The arguments `--declare` gives the consumed queue: its type, single active consumer, and a
/// dead-letter exchange (the default exchange, routing to the dead-letter queue) so that nothing
/// the broker removes (past a quorum queue's delivery limit, a message TTL, a length limit) is
/// dropped. A quorum queue gets an explicit delivery limit and at-least-once dead-lettering (a
/// message is kept until the dead-letter queue has it; RabbitMQ requires `reject-publish`
/// overflow for that).
pub fn queue_arguments(spec: &QueueSpec) -> FieldTable {
    let mut args = earlier_queue_arguments(spec);
    args.insert("x-dead-letter-exchange".into(), text(""));
    args.insert(
        "x-dead-letter-routing-key".into(),
        text(&spec.dead_letter_queue),
    );
    if spec.queue_type == QueueType::Quorum {
        args.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongInt(DECLARED_DELIVERY_LIMIT as i32),
        );
        args.insert("x-dead-letter-strategy".into(), text("at-least-once"));
        args.insert("x-overflow".into(), text("reject-publish"));
    }
    args
}

/// What earlier versions of the sidecar declared: type and single active consumer only. A queue declared so
/// is kept (its arguments cannot change), with a warning that says how to give it a dead-letter
/// exchange by policy.
fn earlier_queue_arguments(spec: &QueueSpec) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), text(spec.queue_type.as_str()));
    if spec.single_active_consumer {
        args.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
    }
    args
}

/// The retry queue: expired copies go back to the consumed queue through the default exchange.
///
/// A quorum queue with at-least-once dead-lettering, whatever the consumed queue's type: RabbitMQ
/// dead-letters from classic queues at most once, and a classic retry queue dropped every copy
/// that fell due while a quorum queue it returns to had no leader yet (a broker restart). With
/// at-least-once the retry queue keeps a copy until the consumed queue has confirmed it; that
/// strategy requires `reject-publish` overflow.
pub fn retry_queue_arguments(queue: &str) -> FieldTable {
    let mut retry = FieldTable::default();
    retry.insert("x-queue-type".into(), text("quorum"));
    retry.insert("x-dead-letter-exchange".into(), text(""));
    retry.insert("x-dead-letter-routing-key".into(), text(queue));
    retry.insert("x-dead-letter-strategy".into(), text("at-least-once"));
    retry.insert("x-overflow".into(), text("reject-publish"));
    retry
}

/// Makes sure every queue of `spec` exists: the dead-letter queue first (the consumed queue's
/// dead-letter exchange routes to it), then the retry queue, then the consumed queue.
pub async fn prepare(connection: &Connection, spec: &QueueSpec) -> Result<(), TopologyError> {
    let mut dead = FieldTable::default();
    if spec.declare {
        dead.insert("x-queue-type".into(), text(spec.queue_type.as_str()));
    }
    ensure(connection, &spec.dead_letter_queue, dead).await?;
    ensure(
        connection,
        &spec.retry_queue,
        retry_queue_arguments(&spec.queue),
    )
    .await?;
    if spec.declare {
        declare_consumed(connection, spec).await?;
        if let Some((exchange, kind)) = &spec.exchange {
            declare_exchange_and_bind(connection, spec, exchange, *kind).await?;
        }
    } else {
        match inspect(connection, &spec.queue).await {
            Ok(_) => {}
            Err(e) if reply_code(&e) == Some(404) => {
                return Err(TopologyError::Missing(spec.queue.clone()));
            }
            Err(error) => {
                return Err(TopologyError::Broker {
                    queue: spec.queue.clone(),
                    error,
                });
            }
        }
    }
    Ok(())
}

/// Declares the consumed queue. One an earlier version declared (without a dead-letter exchange
/// and delivery limit) is refused with 406 and kept as it is, with a warning. A queue that
/// differs in more than that is a conflict, reported with the broker's words about the rest (its
/// first complaint would only name the dead-letter exchange).
async fn declare_consumed(connection: &Connection, spec: &QueueSpec) -> Result<(), TopologyError> {
    match declare(connection, &spec.queue, queue_arguments(spec)).await {
        Err(TopologyError::Conflict { .. }) => {}
        other => return other,
    }
    declare(connection, &spec.queue, earlier_queue_arguments(spec)).await?;
    tracing::warn!(
        queue = %spec.queue,
        fix = %dead_letter_policy_command(&spec.queue, &spec.dead_letter_queue),
        "the queue was declared by an earlier release, without a dead-letter exchange: unless a policy gives it one, a message the broker removes (past a quorum queue's delivery limit) is dropped; its arguments cannot change, a policy can add one"
    );
    Ok(())
}

/// The `rabbitmqctl` command that gives `queue` a dead-letter exchange routing to
/// `dead_letter_queue` by policy (a queue's own arguments cannot change once declared).
pub fn dead_letter_policy_command(queue: &str, dead_letter_queue: &str) -> String {
    let pattern = format!("^{}$", regex_escape(queue));
    let definition = serde_json::json!({
        "dead-letter-exchange": "",
        "dead-letter-routing-key": dead_letter_queue,
    });
    format!(
        "rabbitmqctl set_policy --apply-to queues {queue}-dead-letter '{pattern}' '{definition}'"
    )
}

fn regex_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if "\\.+*?()|[]{}^$".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}
