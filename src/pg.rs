//! The Postgres wire: psql, BI tools, notebooks and drivers read the same tables as
//! `/v1/sql`, with the same sandbox.
//!
//! - [`auth`]: a read key as the password, the session bound, cancel requests;
//! - [`gate`]: read-only statements within the bounds, and Postgres error codes;
//! - [`session`]: the tables under `pg_catalog`'s eyes, and each statement's time and row
//!   bounds;
//! - [`information_schema`]: `information_schema.columns` in Postgres type names.
//!
//! Off unless `sql.pgListen` (or `--pg-listen`) is set; loopback is the expected address.
//! Sessions run on the query threads, never on the threads that ack ingest.

pub mod auth;
pub mod gate;
pub mod information_schema;
pub mod session;

use std::net::SocketAddr;
use std::sync::Arc;

use pgwire::api::auth::DefaultServerParameterProvider;
use pgwire::api::{PgWireServerHandlers, RandomPidSecretKeyGenerator};
use pgwire::tokio::{TlsAcceptor, process_socket};
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinHandle;

use crate::config::{PgTls, SqlSettings};
use crate::query::QueryEngine;
pub use auth::Keys;
use auth::{Cancels, KeyLogin};
use session::{Gated, StatementBounds};

/// Why the Postgres wire could not start.
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    /// The address could not be bound.
    #[error("binding the Postgres wire to {addr}: {source}")]
    Bind {
        /// `sql.pgListen`.
        addr: SocketAddr,
        /// What the OS said.
        source: std::io::Error,
    },
    /// No key would let anyone in.
    #[error(
        "the Postgres wire needs a key to log in with: set NORTHSTAR_ANALYST_KEY (or analystKeys in the config) or NORTHSTAR_ADMIN_KEY"
    )]
    NoKeys,
    /// `sql.pgTls` names files that are not a certificate and key.
    #[error("sql.pgTls: {0}")]
    Tls(String),
    /// The engine's tables could not be shown to `pg_catalog`.
    #[error("setting up the Postgres catalog: {0}")]
    Catalog(String),
}

/// The shared parts of every session.
struct Shared {
    gated: Arc<Gated>,
    keys: Arc<Keys>,
    cancels: Arc<Cancels>,
    ids: Arc<RandomPidSecretKeyGenerator>,
    parameters: Arc<DefaultServerParameterProvider>,
    sessions: Arc<Semaphore>,
    max_sessions: usize,
}

/// One session's handlers: the shared ones, its login, and its place under the bound.
struct SessionHandlers {
    gated: Arc<Gated>,
    login: Arc<KeyLogin>,
    cancels: Arc<Cancels>,
    _permit: Option<OwnedSemaphorePermit>,
}

impl PgWireServerHandlers for SessionHandlers {
    fn simple_query_handler(&self) -> Arc<impl pgwire::api::query::SimpleQueryHandler> {
        self.gated.clone()
    }

    fn extended_query_handler(&self) -> Arc<impl pgwire::api::query::ExtendedQueryHandler> {
        self.gated.clone()
    }

    fn startup_handler(&self) -> Arc<impl pgwire::api::auth::StartupHandler> {
        self.login.clone()
    }

    fn cancel_handler(&self) -> Arc<impl pgwire::api::cancel::CancelHandler> {
        self.cancels.clone()
    }
}

impl Shared {
    fn session(&self) -> SessionHandlers {
        let permit = self.sessions.clone().try_acquire_owned().ok();
        let refusal = permit.is_none().then(|| {
            format!(
                "sorry, too many clients already: {} Postgres sessions are open, the bound sql.pgMaxSessions",
                self.max_sessions
            )
        });
        SessionHandlers {
            gated: self.gated.clone(),
            login: Arc::new(KeyLogin {
                keys: self.keys.clone(),
                cancels: self.cancels.clone(),
                ids: self.ids.clone(),
                parameters: self.parameters.clone(),
                refusal,
            }),
            cancels: self.cancels.clone(),
            _permit: permit,
        }
    }
}

/// The Postgres wire bound and checked, before anything else starts: an address in use, no
/// key to log in with, or a bad certificate is said at once.
pub struct Prepared {
    listener: TcpListener,
    keys: Keys,
    tls: Option<TlsAcceptor>,
}

impl Prepared {
    /// Binds `sql.pgListen`, checks there is a key to log in with, loads `sql.pgTls`.
    pub async fn bind(
        addr: SocketAddr,
        keys: Keys,
        settings: &SqlSettings,
    ) -> Result<Self, PgError> {
        if keys.is_empty() {
            return Err(PgError::NoKeys);
        }
        let tls = settings.pg_tls.as_ref().map(tls_acceptor).transpose()?;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| PgError::Bind { addr, source })?;
        Ok(Self {
            listener,
            keys,
            tls,
        })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.local_addr().ok()
    }

    /// Serves until `stop` turns true. Each session runs on the query threads.
    pub fn start(
        self,
        engine: &QueryEngine,
        settings: &SqlSettings,
        mut stop: watch::Receiver<bool>,
    ) -> Result<JoinHandle<()>, PgError> {
        let Self {
            listener,
            keys,
            tls,
        } = self;
        let ctx = session::context(engine).map_err(|e| PgError::Catalog(e.to_string()))?;
        let Some(threads) = engine.query_threads() else {
            return Err(PgError::Catalog("the query threads are gone".into()));
        };
        let shared = Shared {
            gated: Arc::new(Gated::new(
                ctx,
                StatementBounds {
                    timeout: settings.timeout.get(),
                    max_rows: settings.max_rows,
                },
            )),
            keys: Arc::new(keys),
            cancels: Arc::default(),
            ids: Arc::default(),
            parameters: Arc::new(parameters()),
            sessions: Arc::new(Semaphore::new(settings.pg_max_sessions)),
            max_sessions: settings.pg_max_sessions,
        };
        Ok(tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    accepted = listener.accept() => accepted,
                    _ = stop.wait_for(|stopped| *stopped) => return,
                };
                let (socket, peer) = match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        tracing::warn!(%error, "accepting a Postgres session failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let handlers = shared.session();
                let tls = tls.clone();
                threads.spawn(async move {
                    if let Err(error) = process_socket(socket, tls, handlers).await {
                        tracing::debug!(%peer, %error, "a Postgres session ended with an error");
                    }
                });
            }
        }))
    }
}

/// What a session is told at login: the Postgres version the wire speaks for.
fn parameters() -> DefaultServerParameterProvider {
    let mut parameters = DefaultServerParameterProvider::default();
    parameters.server_version = format!("{}-northstar", session::POSTGRES_VERSION);
    parameters
}

/// The TLS acceptor of `sql.pgTls`: a session that asks for TLS gets it, one that does not
/// stays plain.
fn tls_acceptor(tls: &PgTls) -> Result<TlsAcceptor, PgError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(&tls.cert_file)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| PgError::Tls(format!("certFile {}: {e}", tls.cert_file.display())))?;
    let key = PrivateKeyDer::from_pem_file(&tls.key_file)
        .map_err(|e| PgError::Tls(format!("keyFile {}: {e}", tls.key_file.display())))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .and_then(|builder| builder.with_no_client_auth().with_single_cert(certs, key))
        .map_err(|e| PgError::Tls(e.to_string()))?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}
