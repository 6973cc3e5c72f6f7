//! Publishing a copy the broker must confirm: retry and dead-letter copies, and the copies the
//! dead-letter tooling moves. Always through the default exchange to a queue by name, mandatory
//! (a missing queue is an error, not a silent drop), persistent as its properties say.

use std::future::Future;
use std::time::Duration;

use lapin::options::BasicPublishOptions;
use lapin::{BasicProperties, Channel, Confirmation};

/// How long a publish may take to be handed over, and then its confirm to come back (a blocked
/// connection waits here).
pub(crate) const CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);

/// Publishes `body` with `props` to `queue` on `channel` (which has publisher confirms on), and
/// returns without waiting for the confirm: the returned future is the broker's answer, so a
/// caller may have several copies waiting at once.
pub(crate) async fn send(
    channel: &Channel,
    queue: &str,
    body: &[u8],
    props: BasicProperties,
) -> Result<impl Future<Output = Result<(), String>> + Send + 'static, String> {
    let sent = tokio::time::timeout(
        CONFIRM_TIMEOUT,
        channel.basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            },
            body,
            props,
        ),
    )
    .await;
    let confirm = match sent {
        Ok(Ok(confirm)) => confirm,
        Ok(Err(e)) => return Err(e.to_string()),
        Err(_) => return Err(format!("could not publish within {CONFIRM_TIMEOUT:?}")),
    };
    let queue = queue.to_string();
    Ok(async move {
        match tokio::time::timeout(CONFIRM_TIMEOUT, confirm).await {
            Ok(Ok(Confirmation::Ack(None))) => Ok(()),
            Ok(Ok(Confirmation::Ack(Some(_)))) => Err(format!(
                "queue {queue:?} does not exist: the copy was returned"
            )),
            Ok(Ok(Confirmation::Nack(_))) => {
                Err(format!("the broker refused the copy to {queue:?} (nack)"))
            }
            Ok(Ok(Confirmation::NotRequested)) => Err("publisher confirms are off".into()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!(
                "no confirm within {CONFIRM_TIMEOUT:?} (is the connection blocked?)"
            )),
        }
    })
}

/// [`send`], then wait for the broker's answer.
pub(crate) async fn publish(
    channel: &Channel,
    queue: &str,
    body: &[u8],
    props: BasicProperties,
) -> Result<(), String> {
    send(channel, queue, body, props).await?.await
}
