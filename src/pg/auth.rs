//! Who may open a Postgres session, and how a session's running statement is cancelled.
//!
//! A session logs in with a password that is one of northstar's read keys (the admin key or
//! an analyst key), compared in constant time and never logged; the user name is free. Past
//! `sql.pgMaxSessions` a session is refused before it authenticates (`53300`), as Postgres
//! refuses one past `max_connections`.

use std::collections::HashMap;
use std::fmt::Debug;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use futures::{Sink, SinkExt};
use pgwire::api::auth::{
    DefaultServerParameterProvider, StartupHandler, finish_authentication, protocol_negotiation,
    save_startup_parameters_to_metadata,
};
use pgwire::api::cancel::CancelHandler;
use pgwire::api::{
    ClientInfo, PgWireConnectionState, PidSecretKeyGenerator, RandomPidSecretKeyGenerator,
};
use pgwire::error::{ErrorInfo, PgWireError, PgWireResult};
use pgwire::messages::cancel::CancelRequest;
use pgwire::messages::startup::Authentication;
use pgwire::messages::{PgWireBackendMessage, PgWireFrontendMessage};
use tokio::sync::watch;

/// The keys a session may log in with.
#[derive(Clone, Default)]
pub struct Keys {
    keys: Vec<String>,
}

impl Keys {
    /// The admin key, if set, and the analyst keys; empty ones are dropped.
    pub fn new(admin: Option<&str>, analysts: &[String]) -> Self {
        let keys = admin
            .into_iter()
            .chain(analysts.iter().map(String::as_str))
            .filter(|k| !k.is_empty())
            .map(str::to_string)
            .collect();
        Self { keys }
    }

    /// Whether no key would let anyone in.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Whether `password` is one of the keys: every key is compared, in constant time.
    fn admit(&self, password: &str) -> bool {
        crate::ingest::auth::is_one_of(password, &self.keys)
    }
}

impl Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Keys({} keys)", self.keys.len())
    }
}

/// Logs sessions in with a key as the password.
pub(crate) struct KeyLogin {
    pub(crate) keys: Arc<Keys>,
    pub(crate) cancels: Arc<Cancels>,
    pub(crate) ids: Arc<RandomPidSecretKeyGenerator>,
    pub(crate) parameters: Arc<DefaultServerParameterProvider>,
    /// Why this session is refused before it logs in (the session bound), if it is.
    pub(crate) refusal: Option<String>,
}

#[async_trait]
impl StartupHandler for KeyLogin {
    async fn on_startup<C>(
        &self,
        client: &mut C,
        message: PgWireFrontendMessage,
    ) -> PgWireResult<()>
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        match message {
            PgWireFrontendMessage::Startup(ref startup) => {
                protocol_negotiation(client, startup).await?;
                save_startup_parameters_to_metadata(client, startup);
                if let Some(refusal) = &self.refusal {
                    return Err(PgWireError::UserError(Box::new(ErrorInfo::new(
                        "FATAL".into(),
                        "53300".into(),
                        refusal.clone(),
                    ))));
                }
                client.set_state(PgWireConnectionState::AuthenticationInProgress);
                client
                    .send(PgWireBackendMessage::Authentication(
                        Authentication::CleartextPassword,
                    ))
                    .await?;
            }
            PgWireFrontendMessage::PasswordMessageFamily(password) => {
                let password = password.into_password()?;
                if !self.keys.admit(&password.password) {
                    let user = client
                        .metadata()
                        .get(pgwire::api::METADATA_USER)
                        .cloned()
                        .unwrap_or_default();
                    tracing::info!(%user, peer = %client.socket_addr(), "postgres login refused: not a read key");
                    return Err(PgWireError::InvalidPassword(user));
                }
                let (pid, secret) = self.ids.generate(client);
                client.set_pid_and_secret_key(pid, secret);
                self.cancels.register(client);
                finish_authentication(client, self.parameters.as_ref()).await?;
            }
            _ => {}
        }
        Ok(())
    }
}

/// Each session's cancel signal, by the process id and secret key it was given at login.
#[derive(Default)]
pub(crate) struct Cancels {
    sessions: Mutex<HashMap<(i32, Bytes), watch::Sender<u64>>>,
}

/// A session's cancel signal: each cancel request bumps it; a statement stops when it moves.
#[derive(Clone)]
pub(crate) struct CancelSignal(pub(crate) watch::Receiver<u64>);

/// Removes a session from [`Cancels`] when the session ends.
struct Registered {
    cancels: Arc<Cancels>,
    key: (i32, Bytes),
}

impl Drop for Registered {
    fn drop(&mut self) {
        if let Ok(mut sessions) = self.cancels.sessions.lock() {
            sessions.remove(&self.key);
        }
    }
}

impl Cancels {
    fn register<C: ClientInfo>(self: &Arc<Self>, client: &C) {
        let (pid, secret) = client.pid_and_secret_key();
        let key = (pid, secret.to_bytes());
        let (signal, receiver) = watch::channel(0);
        if let Ok(mut sessions) = self.sessions.lock() {
            sessions.insert(key.clone(), signal);
        }
        let extensions = client.session_extensions();
        extensions.insert(CancelSignal(receiver));
        extensions.insert(Registered {
            cancels: self.clone(),
            key,
        });
    }
}

#[async_trait]
impl CancelHandler for Cancels {
    async fn on_cancel_request(&self, request: CancelRequest) {
        let key = (request.pid, request.secret_key.to_bytes());
        if let Ok(sessions) = self.sessions.lock()
            && let Some(signal) = sessions.get(&key)
        {
            signal.send_modify(|n| *n += 1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_read_keys_log_in() {
        let keys = Keys::new(
            Some("admin-key-0123456789"),
            &["analyst-key-0123456".into()],
        );
        assert!(keys.admit("admin-key-0123456789"));
        assert!(keys.admit("analyst-key-0123456"));
        assert!(!keys.admit("analyst-key-012345"));
        assert!(!keys.admit(""));
        assert!(Keys::new(Some(""), &[]).is_empty());
    }
}
