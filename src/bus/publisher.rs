//! Publishing with acks: a request is answered only after JetStream has stored every message.

use async_nats::connection::State;
use async_nats::jetstream::{self, message::PublishMessage};
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::Semaphore;

use super::BusError;
use crate::config::StreamSettings;

/// Most publishes awaiting their ack at once, over all requests; async-nats' default of 5,000
/// is below one busy second.
const MAX_ACKS_IN_FLIGHT: usize = 65_536;

/// Publishes a request may have in flight before it must wait its turn. Each request takes all
/// the permits it needs at once, below the client's own limit, so requests queue in order
/// instead of each holding part of the client's permits and all waiting on each other.
const GATE_PERMITS: usize = MAX_ACKS_IN_FLIGHT - 4_096;

/// One message to publish, with its dedup id.
#[derive(Debug, Clone)]
pub struct Outgoing {
    /// Subject (`events.<shard>.<type>` or `rejected.<source>`).
    pub subject: String,
    /// `Nats-Msg-Id`: JetStream drops a second message with the same id within the window.
    pub msg_id: String,
    /// Message body.
    pub payload: Bytes,
}

/// What JetStream did with a set of messages.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PublishReport {
    /// Messages newly stored.
    pub stored: usize,
    /// Positions of the messages whose id was already in the stream (stored before; not again).
    pub duplicates: Vec<usize>,
    /// Highest stream sequence among the acks.
    pub last_seq: u64,
    /// Each message's stream sequence, in the order given (a duplicate's is the first copy's).
    pub sequences: Vec<u64>,
}

/// Publishes to JetStream and waits for acks.
#[derive(Clone)]
pub struct Publisher {
    client: async_nats::Client,
    js: jetstream::Context,
    gate: Arc<Semaphore>,
}

impl Publisher {
    /// A publisher over `client`, waiting up to the stream's `ackTimeout` for each ack.
    pub fn new(client: async_nats::Client, settings: &StreamSettings) -> Self {
        let js = jetstream::context::ContextBuilder::new()
            .timeout(settings.ack_timeout.get())
            .max_ack_inflight(MAX_ACKS_IN_FLIGHT)
            .backpressure_on_inflight(true)
            .build(client.clone());
        Self {
            client,
            js,
            gate: Arc::new(Semaphore::new(GATE_PERMITS)),
        }
    }

    /// The JetStream context, for management calls.
    pub fn jetstream(&self) -> &jetstream::Context {
        &self.js
    }

    /// Whether the connection to NATS is up right now.
    pub fn is_connected(&self) -> bool {
        self.client.connection_state() == State::Connected
    }

    /// Publishes every message and returns once all are acked. On error some messages may
    /// be stored and others not; the caller answers 503 and the client's retry is made
    /// harmless by the message ids.
    pub async fn publish_all(&self, messages: Vec<Outgoing>) -> Result<PublishReport, BusError> {
        if !self.is_connected() {
            return Err(BusError::Disconnected);
        }
        let wanted = u32::try_from(messages.len().clamp(1, GATE_PERMITS)).unwrap_or(1);
        let _turn = self
            .gate
            .acquire_many(wanted)
            .await
            .map_err(|e| BusError::Publish(e.to_string()))?;
        let mut acks = Vec::with_capacity(messages.len());
        for message in messages {
            let publish = PublishMessage::build()
                .payload(message.payload)
                .message_id(message.msg_id);
            let ack = self
                .js
                .send_publish(message.subject, publish)
                .await
                .map_err(|e| BusError::Publish(e.to_string()))?;
            acks.push(ack);
        }
        let mut report = PublishReport {
            sequences: Vec::with_capacity(acks.len()),
            ..PublishReport::default()
        };
        for (index, ack) in acks.into_iter().enumerate() {
            let ack = ack.await.map_err(|e| BusError::Publish(e.to_string()))?;
            if ack.duplicate {
                report.duplicates.push(index);
            } else {
                report.stored += 1;
            }
            report.last_seq = report.last_seq.max(ack.sequence);
            report.sequences.push(ack.sequence);
        }
        Ok(report)
    }
}
