//! Reading a dead-letter queue without losing anything: `basic.get` without auto-ack, one message
//! at a time, up to a budget fixed when the browse starts (so neither new dead letters nor the
//! browse's own refreshed copies are read twice). What the caller keeps is held unacknowledged and
//! given back when the browse ends by closing the channel it was read on: one return per message
//! per browse, the same return the broker makes when the process dies. Closing rather than
//! `basic.nack` with requeue, because a quorum queue (3.10, measured) puts nacked messages at its
//! back but a closed channel's messages back in their places; a classic queue keeps the order
//! either way. What the caller moves is acked only after the broker confirmed the copy
//! ([`Browser::publish`], then [`Browser::remove`]).
//!
//! A message whose return would bring it too close to the queue's delivery limit is not given
//! back but refreshed (see [`super::limit`]).

use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicGetOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Channel};

use super::Failure;
use super::letter::refresh_properties;
use super::session::{Session, lost};
use crate::broker::confirm;
use crate::broker::facts::QueueFacts;
use crate::headers::{DELIVERY_COUNT, int_header};

pub struct Browser {
    /// The channel messages are read on; what it holds goes back to the queue when it closes.
    channel: Channel,
    /// Publisher confirms: refreshed and replayed copies.
    publisher: Channel,
    queue: String,
    facts: QueueFacts,
    budget: u64,
    pub fetched: u64,
    pub refreshed: u64,
}

impl Browser {
    /// Starts a browse of `queue` that reads at most `budget` messages.
    pub async fn open(
        session: &Session,
        queue: &str,
        facts: QueueFacts,
        budget: u64,
    ) -> Result<Browser, Failure> {
        let channel = session.connection.create_channel().await.map_err(lost)?;
        let publisher = session.connection.create_channel().await.map_err(lost)?;
        publisher
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(lost)?;
        Ok(Browser {
            channel,
            publisher,
            queue: queue.to_string(),
            facts,
            budget,
            fetched: 0,
            refreshed: 0,
        })
    }

    /// The next message; `None` once the budget is spent or the queue has no more ready.
    pub async fn next(&mut self) -> Result<Option<Delivery>, Failure> {
        if self.fetched >= self.budget {
            return Ok(None);
        }
        let got = self
            .channel
            .basic_get(
                self.queue.as_str().into(),
                BasicGetOptions { no_ack: false },
            )
            .await
            .map_err(lost)?;
        Ok(got.map(|m| {
            self.fetched += 1;
            m.delivery
        }))
    }

    /// Leaves `delivery` in the queue: held and given back when the browse ends, or refreshed
    /// when that return would leave it too close to the delivery limit.
    pub async fn keep(&mut self, delivery: &Delivery) -> Result<(), Failure> {
        let count = int_header(delivery.properties.headers().as_ref(), DELIVERY_COUNT).unwrap_or(0);
        if !self.facts.at_risk(count) {
            return Ok(());
        }
        let queue = self.queue.clone();
        match self
            .publish(
                &queue,
                &delivery.data,
                refresh_properties(&delivery.properties),
            )
            .await
        {
            Ok(()) => {
                self.remove(delivery).await?;
                self.refreshed += 1;
                Ok(())
            }
            Err(e) => Err(Failure::Unavailable(format!(
                "a dead letter near the delivery limit could not be refreshed: {e}"
            ))),
        }
    }

    /// Removes `delivery` from the queue for good. Only after its copy was confirmed.
    pub async fn remove(&self, delivery: &Delivery) -> Result<(), Failure> {
        self.channel
            .basic_ack(delivery.delivery_tag, BasicAckOptions::default())
            .await
            .map_err(lost)
    }

    /// Publishes a copy to `queue` and waits for the broker's confirm.
    pub async fn publish(
        &self,
        queue: &str,
        body: &[u8],
        props: BasicProperties,
    ) -> Result<(), String> {
        confirm::publish(&self.publisher, queue, body, props).await
    }

    /// Publishes a copy and returns without waiting for the confirm: the returned future is the
    /// broker's answer.
    pub async fn send(
        &self,
        queue: &str,
        body: &[u8],
        props: BasicProperties,
    ) -> Result<impl Future<Output = Result<(), String>> + Send + 'static, String> {
        confirm::send(&self.publisher, queue, body, props).await
    }

    /// Gives back everything held, one return each, by closing the channels.
    pub async fn finish(self) -> Result<(), Failure> {
        let mut result = Ok(());
        for channel in [&self.channel, &self.publisher] {
            if channel.status().connected()
                && let Err(e) = channel.close(200, "browse done".into()).await
            {
                result = Err(lost(e));
            }
        }
        result
    }
}
