//! The HTTP API (hyper, HTTP/1.1 keep-alive): ingest wires, SQL, health and metrics.
//!
//! [`serve`] takes a bound listener and a shutdown future (mini-redis style), so tests bind
//! `127.0.0.1:0` and run the real server. Every request has a body bound, a time limit and a
//! place in a bounded set of concurrent requests; past that bound the answer is 503 with
//! `Retry-After`, never unbounded memory.
//!
//! - [`respond`]: JSON answers and `{"code","message"}` errors;
//! - [`routes`]: the route table;
//! - [`ingest_routes`], [`sql`], [`ops`]: the handlers.

pub mod activation;
pub mod billing;
pub mod ingest_routes;
pub mod limits;
pub mod ops;
pub mod rejected;
pub mod respond;
pub mod routes;
pub mod sql;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::config::Config;
use crate::error::ErrorKind;
use crate::ingest::Ingestor;
use crate::metrics::Metrics;
use crate::query::QueryEngine;
use respond::{HttpError, HttpResponse};

/// Everything the handlers share.
pub struct AppState {
    /// The validated config.
    pub config: Arc<Config>,
    /// Publishes ingested events.
    pub ingestor: Ingestor,
    /// Runs SQL.
    pub query: Arc<QueryEngine>,
    /// Counters for `/metrics`.
    pub metrics: Arc<Metrics>,
    /// The admin key (`NORTHSTAR_ADMIN_KEY`); admin routes are closed without one.
    pub admin_key: Option<String>,
    /// Keys of services allowed on the limits API (config `serviceKeys`, `NORTHSTAR_SERVICE_KEY`).
    pub service_keys: Vec<String>,
    /// The usage meter and limits.
    pub meter: Arc<crate::meter::Meter>,
    /// Time for answers and stored records.
    pub clock: crate::clock::Clock,
    /// Versioned activation results.
    pub activation: std::sync::Arc<crate::activation::ActivationStore>,
    /// The activation question of the config.
    pub question: crate::activation::Question,
    /// The onboarding engine and flags.
    pub onboarding: std::sync::Arc<crate::onboarding::Onboarding>,
    /// Where the meter, archive and pipelines are, for `POST /v1/usage/verify`.
    pub verify: crate::meter::verify::Positions,
    /// What `/healthz` reports.
    pub health: ops::Health,
    /// Bounds concurrent requests.
    pub permits: Arc<Semaphore>,
    /// The billing sink and upgrade path, when the config has `billing`.
    pub billing: Option<Arc<crate::billing::Billing>>,
}

impl AppState {
    /// Checks `Authorization: Bearer <service or admin key>` in constant time.
    pub fn require_service(&self, request_auth: Option<&str>) -> Result<(), HttpError> {
        let token = crate::ingest::auth::bearer_token(request_auth).ok_or_else(|| {
            HttpError::new(
                ErrorKind::Unauthorized,
                "missing_service_key",
                "send Authorization: Bearer <service key>",
            )
        })?;
        let mut valid = false;
        for key in self.service_keys.iter().chain(self.admin_key.iter()) {
            valid |= bool::from(token.as_bytes().ct_eq(key.as_bytes()));
        }
        if valid {
            Ok(())
        } else if self.ingestor.write_keys().source_of(token).is_some() {
            Err(HttpError::new(
                ErrorKind::Forbidden,
                "write_key_not_allowed",
                "write keys may only send events; use a service key",
            ))
        } else {
            Err(HttpError::new(
                ErrorKind::Unauthorized,
                "invalid_service_key",
                "invalid service key",
            ))
        }
    }

    /// Checks `Authorization: Bearer <admin key>` in constant time.
    pub fn require_admin(&self, request_auth: Option<&str>) -> Result<(), HttpError> {
        let Some(admin) = &self.admin_key else {
            return Err(HttpError::new(
                ErrorKind::Forbidden,
                "admin_disabled",
                "the admin API is closed: start northstar with NORTHSTAR_ADMIN_KEY set",
            ));
        };
        let token = crate::ingest::auth::bearer_token(request_auth).ok_or_else(|| {
            HttpError::new(
                ErrorKind::Unauthorized,
                "missing_admin_key",
                "send Authorization: Bearer <admin key>",
            )
        })?;
        if bool::from(token.as_bytes().ct_eq(admin.as_bytes())) {
            Ok(())
        } else if self.ingestor.write_keys().source_of(token).is_some() {
            Err(HttpError::new(
                ErrorKind::Forbidden,
                "write_key_not_allowed",
                "write keys may only send events; use the admin key",
            ))
        } else {
            Err(HttpError::new(
                ErrorKind::Unauthorized,
                "invalid_admin_key",
                "invalid admin key",
            ))
        }
    }
}

/// Serves HTTP on `listener` until `shutdown` resolves, then lets requests in flight finish.
pub async fn serve(
    listener: TcpListener,
    state: Arc<AppState>,
    shutdown: impl Future<Output = ()>,
) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(pair) => pair,
                    Err(error) => {
                        tracing::warn!(%error, "accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let state = state.clone();
                let service = service_fn(move |request| {
                    let state = state.clone();
                    async move { Ok::<_, std::convert::Infallible>(handle(state, request, peer).await) }
                });
                let connection = http1::Builder::new()
                    .keep_alive(true)
                    .header_read_timeout(std::time::Duration::from_secs(10))
                    .timer(hyper_util::rt::TokioTimer::new())
                    .serve_connection(TokioIo::new(stream), service);
                let connection = graceful.watch(connection);
                tokio::spawn(async move {
                    if let Err(error) = connection.await {
                        tracing::debug!(%error, "connection ended with an error");
                    }
                });
            }
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    if tokio::time::timeout(std::time::Duration::from_secs(30), graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("requests still running after 30 s; closing them");
    }
}

/// One request: admission, body, route, time limit.
async fn handle(
    state: Arc<AppState>,
    request: Request<Incoming>,
    peer: SocketAddr,
) -> HttpResponse {
    let Ok(_permit) = state.permits.clone().try_acquire_owned() else {
        return respond::error(&HttpError::new(
            ErrorKind::Unavailable,
            "overloaded",
            "too many requests in flight; retry shortly",
        ));
    };
    let route = routes::route(request.method(), request.uri().path());
    let (parts, body) = request.into_parts();
    let limit = route.body_limit(&state.config);
    let timeout = state.config.ingest.request_timeout.get();
    let work = async {
        let body: Bytes = match Limited::new(body, limit).collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(error) => {
                let too_large = error
                    .downcast_ref::<http_body_util::LengthLimitError>()
                    .is_some();
                let (kind, code, message) = if too_large {
                    (
                        ErrorKind::TooLarge,
                        "payload_too_large",
                        format!("request body is over {limit} bytes"),
                    )
                } else {
                    (
                        ErrorKind::InvalidInput,
                        "invalid_body",
                        format!("could not read the request body: {error}"),
                    )
                };
                return route.finish(respond::error(&HttpError::new(kind, code, message)));
            }
        };
        let response = routes::dispatch(&state, &route, &parts, body).await;
        route.finish(response)
    };
    // The limits routes answer from memory (a consume's publish has its own ack timeout), so
    // they skip the per-request timer that the routes which wait on bodies and I/O need.
    let response = if route.answers_from_memory() {
        work.await
    } else {
        match tokio::time::timeout(timeout, work).await {
            Ok(response) => response,
            Err(_) => route.finish(respond::error(&HttpError::new(
                ErrorKind::Unavailable,
                "request_timeout",
                format!("the request took longer than {timeout:?}; retry"),
            ))),
        }
    };
    state
        .metrics
        .http_answered(route.family(), response.status().as_u16());
    tracing::debug!(%peer, route = route.family(), status = response.status().as_u16(), "answered");
    response
}
