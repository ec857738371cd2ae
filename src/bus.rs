//! The bus: NATS JetStream, the log of record.
//!
//! - [`budget`] sizes the JetStream store and the streams (retention);
//! - [`embedded`] runs a real `nats-server` as a child process when no `--nats-url` is given;
//! - [`streams`] creates or updates the streams and the durable consumers northstar needs;
//! - [`publisher`] publishes accepted and rejected messages and waits for every ack;
//! - [`follower`] reads the stream in order for state derived from it (meter, identities).

pub mod budget;
pub mod embedded;
pub mod follower;
pub mod publisher;
pub mod streams;
pub mod watch;

use std::time::Duration;

use crate::error::{Classify, ErrorKind};

pub use embedded::EmbeddedNats;
pub use publisher::Publisher;
pub(crate) use streams::{ensure_streams, subject_for};

/// Failures talking to NATS.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// The embedded nats-server could not be started.
    #[error("cannot start nats-server: {0}")]
    Spawn(String),
    /// No connection to the server.
    #[error("cannot connect to NATS at {url}: {source}")]
    Connect {
        /// Where we tried.
        url: String,
        /// Why it failed.
        source: async_nats::ConnectError,
    },
    /// The connection is down right now; the client reconnects on its own.
    #[error("the event stream is unavailable (NATS disconnected); retry shortly")]
    Disconnected,
    /// The connection is up but JetStream does not answer (a full disk turned it off); the
    /// embedded server is restarted once there is room (see [`watch`]).
    #[error(
        "the event stream is unavailable (JetStream does not answer; a full disk turns it off); retry shortly"
    )]
    JetStreamDown,
    /// JetStream did not ack in time or refused the message.
    #[error("the event stream did not store the events: {0}")]
    Publish(String),
    /// A JetStream management call failed.
    #[error("JetStream {action} failed: {message}")]
    Management {
        /// What we were doing.
        action: &'static str,
        /// What the server or client said.
        message: String,
    },
}

impl Classify for BusError {
    fn kind(&self) -> ErrorKind {
        ErrorKind::Unavailable
    }

    fn code(&self) -> &'static str {
        "stream_unavailable"
    }
}

/// Connects to NATS with the options every northstar connection uses. `url` may name several
/// servers of one cluster, comma separated (`nats://a:4222,nats://b:4222`): the client picks
/// one and moves to another when it goes away.
pub async fn connect(url: &str) -> Result<async_nats::Client, BusError> {
    let servers = server_addrs(url)?;
    async_nats::ConnectOptions::new()
        .name("northstar")
        .connection_timeout(Duration::from_secs(5))
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connect(servers)
        .await
        .map_err(|source| BusError::Connect {
            url: url.to_string(),
            source,
        })
}

/// The servers a comma-separated `url` names; an error names the one that does not parse.
pub fn server_addrs(url: &str) -> Result<Vec<async_nats::ServerAddr>, BusError> {
    let servers: Vec<&str> = url
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    if servers.is_empty() {
        return Err(BusError::Management {
            action: "connect",
            message: "--nats-url names no server".into(),
        });
    }
    servers
        .into_iter()
        .map(|server| {
            server
                .parse::<async_nats::ServerAddr>()
                .map_err(|e| BusError::Management {
                    action: "connect",
                    message: format!("`{server}` is not a NATS server address: {e}"),
                })
        })
        .collect()
}

/// Connects, waiting up to `wait` for a server that is still starting.
pub async fn connect_ready(url: &str, wait: Duration) -> Result<async_nats::Client, BusError> {
    let client = connect(url).await?;
    let deadline = tokio::time::Instant::now() + wait;
    while client.connection_state() != async_nats::connection::State::Connected {
        if tokio::time::Instant::now() > deadline {
            return Err(BusError::Management {
                action: "connect",
                message: format!("no NATS server answered at {url} within {wait:?}"),
            });
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(client)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_comma_separated_url_names_each_server_of_a_cluster() {
        let servers = server_addrs("nats://127.0.0.1:4222, nats://127.0.0.1:4223,").unwrap();
        assert_eq!(servers.len(), 2);
        assert_eq!(servers[1].port(), 4223);
        let error = server_addrs("nats://127.0.0.1:4222,nats://[bad").unwrap_err();
        assert!(error.to_string().contains("nats://[bad"), "{error}");
        assert!(server_addrs(" , ").is_err());
    }
}
