//! `dead-letters purge --yes`: deletes every ready dead letter of the queue (`queue.purge`).
//! Refuses without `--yes`, before connecting. Messages held unacknowledged at that moment (by a
//! running `list` or `replay`) are not ready and survive the purge.

use super::report::PurgeReport;
use super::session::{Session, lost};
use super::{Failure, Outcome, Target};

pub async fn run(target: &Target, yes: bool) -> Outcome {
    if !yes {
        return Outcome::failed(Failure::Usage(format!(
            "refusing to purge {:?} without --yes: its dead letters would be gone for good (see them first with `rabbit-sidecar dead-letters list`)",
            target.dead_letter_queue
        )));
    }
    let session = match Session::open(&target.config).await {
        Ok(s) => s,
        Err(f) => return Outcome::failed(f),
    };
    let result = purge(&session, target).await;
    session.close().await;
    match result {
        Ok(purged) => Outcome {
            report: Some(Box::new(PurgeReport {
                dead_letter_queue: target.dead_letter_queue.clone(),
                purged,
            })),
            failure: None,
        },
        Err(f) => Outcome::failed(f),
    }
}

async fn purge(session: &Session, target: &Target) -> Result<u64, Failure> {
    session
        .queue(&target.dead_letter_queue, "dead-letter queue")
        .await?;
    let channel = session.connection.create_channel().await.map_err(lost)?;
    let purged = channel
        .queue_purge(
            target.dead_letter_queue.as_str().into(),
            lapin::options::QueuePurgeOptions::default(),
        )
        .await
        .map_err(lost)?;
    let _ = channel.close(200, "purged".into()).await;
    Ok(u64::from(purged))
}
