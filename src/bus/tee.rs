//! The events archiver's feed: the followers' delivery of the events stream, handed on.
//!
//! nats-server delivers each event once, to the followers' consumer; the follower loop applies
//! it to the in-process state and then passes the message itself (payload and ack handle) to
//! the events archiver through a bounded channel. The archiver acks that consumer (AckAll)
//! after each commit, exactly as it acked its own consumer before: the commit protocol is
//! unchanged, only the second delivery is gone.
//!
//! The archiver resumes from its manifest, which may be behind what the followers have read
//! (after a failed commit, or on start). It then asks for a [`Rewind`]: the follower loop
//! repositions the consumer (its parts skip what they already have) and marks the point in the
//! feed with [`Feed::Rewound`]; the archiver drops everything before its own marker.

use tokio::sync::mpsc;

/// What travels from the follower loop to the archiver.
// Markers are rare and messages are every event: boxing the message would cost an allocation
// per event to save channel slots' size.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Feed {
    /// The next stream message, in order.
    Message(async_nats::jetstream::Message),
    /// The rewind with this token took effect: what follows is delivered anew after it.
    Rewound(u64),
}

/// The archiver's request to be fed again after `after_seq`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rewind {
    /// Last sequence the archiver holds (its manifest's, on a restart).
    pub after_seq: u64,
    /// Echoed in [`Feed::Rewound`].
    pub token: u64,
}

/// The follower loop's end.
pub struct Tee {
    /// Where messages go (bounded: a full channel holds the follower loop back).
    pub feed: mpsc::Sender<Feed>,
    /// Rewinds asked for by the archiver.
    pub rewinds: mpsc::UnboundedReceiver<Rewind>,
}

/// The archiver's end.
pub struct FeedReceiver {
    /// Messages, in stream order, and rewind markers.
    pub messages: mpsc::Receiver<Feed>,
    /// Where to ask for a rewind.
    pub rewinds: mpsc::UnboundedSender<Rewind>,
}

/// A feed holding at most `capacity` messages in flight.
pub fn channel(capacity: usize) -> (Tee, FeedReceiver) {
    let (feed, messages) = mpsc::channel(capacity);
    let (rewinds_tx, rewinds) = mpsc::unbounded_channel();
    (
        Tee { feed, rewinds },
        FeedReceiver {
            messages,
            rewinds: rewinds_tx,
        },
    )
}

impl FeedReceiver {
    /// Asks to be fed again after `after_seq`, and returns the messages that follow the rewind
    /// (everything received before its marker is dropped). Ends when the follower loop is gone.
    pub fn rewind(
        &mut self,
        after_seq: u64,
        token: u64,
    ) -> impl futures::Stream<Item = async_nats::jetstream::Message> + Send + '_ {
        // A send fails only when the follower loop is gone; the stream then ends at once.
        let _ = self.rewinds.send(Rewind { after_seq, token });
        let mut synced = false;
        let messages = &mut self.messages;
        futures::stream::poll_fn(move |cx| {
            loop {
                match messages.poll_recv(cx) {
                    std::task::Poll::Pending => return std::task::Poll::Pending,
                    std::task::Poll::Ready(None) => return std::task::Poll::Ready(None),
                    std::task::Poll::Ready(Some(Feed::Rewound(seen))) => {
                        synced |= seen == token;
                    }
                    std::task::Poll::Ready(Some(Feed::Message(message))) => {
                        if synced {
                            return std::task::Poll::Ready(Some(message));
                        }
                    }
                }
            }
        })
    }
}
