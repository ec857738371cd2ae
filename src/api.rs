//! The HTTP API (hyper, HTTP/1.1 keep-alive): ingest wires, SQL, health and metrics.
//!
//! [`serve`] takes a bound listener and a shutdown future (mini-redis style), so tests bind
//! `127.0.0.1:0` and run the real server. Every request has a body bound (a larger declared
//! `Content-Length` is refused before reading), a body timeout (408), a time limit, and a
//! place in a bounded set of concurrent requests taken once its body is in; past that bound
//! the answer is 503 with `Retry-After`, never unbounded memory. Each client address has its
//! own bounds on connections and requests in progress ([`admission`]; past them, the
//! connection is closed or the answer is 429), so no one client takes every place.
//!
//! - [`admission`]: per-client bounds on connections and requests;
//! - [`respond`]: JSON answers and `{"code","message"}` errors;
//! - [`routes`]: the route table;
//! - [`ingest_routes`], [`sql`], [`ops`]: the handlers.

pub mod activation;
pub mod admission;
pub mod billing;
pub mod dashboard;
pub mod erasures;
pub mod ingest_routes;
pub mod insights;
pub mod limits;
pub mod ops;
pub mod portal_events;
pub mod posthog_flags;
pub mod rejected;
pub mod respond;
pub mod routes;
pub mod sql;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Limited};
use hyper::body::{Body, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::config::Config;
use crate::error::ErrorKind;
use crate::ingest::Ingestor;
use crate::ingest::auth::is_one_of;
use crate::metrics::Metrics;
use crate::query::QueryEngine;
use respond::{HttpError, HttpResponse};
use routes::Route;

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
    /// Read-only keys of analysts (config `analystKeys`, `NORTHSTAR_ANALYST_KEY`).
    pub analyst_keys: Vec<String>,
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
    /// Holdout experiments of the aha threshold.
    pub experiments: Arc<crate::experiments::Experiments>,
    /// The erasure log (`DELETE /v1/persons/{id}`).
    pub erasures: Arc<crate::erasure::Erasures>,
    /// Where the meter, archive and pipelines are, for `POST /v1/usage/verify`.
    pub verify: crate::meter::verify::Positions,
    /// What `/healthz` reports.
    pub health: ops::Health,
    /// Bounds concurrent requests (taken once a request's body is in).
    pub permits: Arc<Semaphore>,
    /// The billing sink and upgrade path, when the config has `billing`.
    pub billing: Option<Arc<crate::billing::Billing>>,
    /// Signs and checks portal tokens.
    pub portal: Arc<crate::portal::PortalKeys>,
    /// Places for open portal event streams (`metering.portalMaxStreams`).
    pub portal_streams: Arc<Semaphore>,
    /// Turns true when the server stops: open event streams end.
    pub stopping: tokio::sync::watch::Receiver<bool>,
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
        if is_one_of(token, self.service_keys.iter().chain(self.admin_key.iter())) {
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

    /// The customer a portal token grants: from `Authorization: Bearer pt_…`, or `?token=`
    /// (a browser's `EventSource` cannot send headers).
    pub fn portal_grant(
        &self,
        parts: &http::request::Parts,
    ) -> Result<crate::portal::Grant, HttpError> {
        let header = parts
            .headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        let from_query = || {
            form_urlencoded::parse(parts.uri.query().unwrap_or_default().as_bytes())
                .find(|(k, _)| k == "token")
                .map(|(_, v)| v.into_owned())
        };
        let token = crate::ingest::auth::bearer_token(header)
            .map(str::to_string)
            .or_else(from_query)
            .ok_or_else(|| {
                HttpError::new(
                    ErrorKind::Unauthorized,
                    "missing_portal_token",
                    "send Authorization: Bearer <portal token>, or ?token=",
                )
            })?;
        self.portal
            .verify(&token, self.clock.now_micros())
            .map_err(|error| {
                let code = match error {
                    crate::portal::TokenError::Invalid => "invalid_portal_token",
                    crate::portal::TokenError::Expired(_) => "portal_token_expired",
                };
                HttpError::new(ErrorKind::Unauthorized, code, error.to_string())
            })
    }

    /// Checks `Authorization: Bearer <analyst or admin key>` in constant time: the reads of
    /// the event history.
    pub fn require_reader(&self, request_auth: Option<&str>) -> Result<(), HttpError> {
        let token = crate::ingest::auth::bearer_token(request_auth);
        if token.is_some_and(|token| is_one_of(token, &self.analyst_keys)) {
            return Ok(());
        }
        self.require_admin(request_auth).map_err(|error| {
            if error.code == "missing_admin_key" {
                HttpError::new(
                    ErrorKind::Unauthorized,
                    "missing_key",
                    "send Authorization: Bearer <analyst or admin key>",
                )
            } else {
                error
            }
        })
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
        let service = is_one_of(token, &self.service_keys);
        let analyst = is_one_of(token, &self.analyst_keys);
        if bool::from(token.as_bytes().ct_eq(admin.as_bytes())) {
            Ok(())
        } else if analyst {
            Err(HttpError::new(
                ErrorKind::Forbidden,
                "analyst_key_not_allowed",
                "analyst keys may only read (SQL, insights, people); use the admin key",
            ))
        } else if service {
            Err(HttpError::new(
                ErrorKind::Forbidden,
                "service_key_not_allowed",
                "service keys may use the limits API only; use the admin key",
            ))
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
    let clients = admission::Clients::new(&state.config.ingest);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(pair) => pair,
                    Err(error) => {
                        tracing::warn!(%error, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let Some(connection_slot) = clients.connect(peer.ip()) else {
                    tracing::debug!(%peer, "connection refused: the client has its bound open");
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let state = state.clone();
                let clients = clients.clone();
                let service = service_fn(move |request| {
                    let state = state.clone();
                    let clients = clients.clone();
                    async move {
                        Ok::<_, std::convert::Infallible>(handle(state, clients, request, peer).await)
                    }
                });
                let connection = http1::Builder::new()
                    .keep_alive(true)
                    .header_read_timeout(HEADER_TIMEOUT)
                    .timer(hyper_util::rt::TokioTimer::new())
                    .serve_connection(TokioIo::new(stream), service);
                let connection = graceful.watch(connection);
                tokio::spawn(async move {
                    let _connection_slot = connection_slot;
                    if let Err(error) = connection.await {
                        tracing::debug!(%error, "connection ended with an error");
                    }
                });
            }
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    if tokio::time::timeout(Duration::from_secs(30), graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("requests still running after 30 s; closing them");
    }
}

/// How long a client may take to send a request's headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// One request, answered and counted.
async fn handle(
    state: Arc<AppState>,
    clients: Arc<admission::Clients>,
    request: Request<Incoming>,
    peer: SocketAddr,
) -> HttpResponse {
    let started = std::time::Instant::now();
    let route = routes::route(request.method(), request.uri().path());
    let response = route.finish(answer(&state, &clients, &route, request, peer).await);
    state.metrics.http_answered(
        route.family(),
        response.status().as_u16(),
        started.elapsed(),
    );
    tracing::debug!(%peer, route = route.family(), status = response.status().as_u16(), "answered");
    response
}

/// Admission, body, route, within the request's time limit. A request takes a place of its
/// client at once, but a place among the concurrent requests only once its body is in (and
/// `/healthz` and `/metrics` take none), so a client that announces a body and sends none
/// costs only its own places, and only until the body timeout.
async fn answer(
    state: &Arc<AppState>,
    clients: &Arc<admission::Clients>,
    route: &Route,
    request: Request<Incoming>,
    peer: SocketAddr,
) -> HttpResponse {
    let Some(client_slot) = clients.begin_request(peer.ip()) else {
        return respond::error(&HttpError::new(
            ErrorKind::RateLimited,
            "too_many_requests_from_client",
            format!(
                "this client has {} requests in progress already (ingest.maxRequestsPerClient); retry shortly",
                clients.max_requests()
            ),
        ));
    };
    let settings = &state.config.ingest;
    let started = Instant::now();
    let timeout = settings.request_timeout.get();
    let deadline = started + timeout;
    let body_deadline = (started + settings.body_timeout.get()).min(deadline);
    let (parts, body) = request.into_parts();
    let limit = route.body_limit(&state.config);
    let body = match read_body(body, limit, parts.uri.path(), body_deadline).await {
        Ok(body) => body,
        Err(response) => return response,
    };
    let permit = if route.takes_a_request_place() {
        match state.permits.clone().try_acquire_owned() {
            Ok(permit) => Some(permit),
            Err(_) => {
                return respond::error(&HttpError::new(
                    ErrorKind::Unavailable,
                    "overloaded",
                    "too many requests in flight; retry shortly",
                ));
            }
        }
    } else {
        None
    };
    let work = {
        let (state, route) = (state.clone(), route.clone());
        async move {
            let _places = (client_slot, permit);
            routes::dispatch(&state, &route, &parts, body).await
        }
    };
    let timed_out = || {
        respond::error(&HttpError::new(
            ErrorKind::Unavailable,
            "request_timeout",
            format!("the request took longer than {timeout:?}; retry"),
        ))
    };
    if route.finishes_after_its_answer() {
        // The work keeps its places until it ends; only the answer is bounded.
        match tokio::time::timeout_at(deadline.into(), tokio::spawn(work)).await {
            Ok(Ok(response)) => response,
            Ok(Err(error)) => {
                tracing::error!(%error, route = route.family(), "request handler failed");
                respond::error(&HttpError::new(
                    ErrorKind::Internal,
                    "internal_error",
                    "the request failed; retry",
                ))
            }
            Err(_) => timed_out(),
        }
    } else {
        tokio::time::timeout_at(deadline.into(), work)
            .await
            .unwrap_or_else(|_| timed_out())
    }
}

/// The body, at most `limit` bytes, in by `deadline`. A declared `Content-Length` over the
/// limit is refused before anything is read; a body that is not in by the deadline gets 408.
async fn read_body(
    body: Incoming,
    limit: usize,
    path: &str,
    deadline: Instant,
) -> Result<Bytes, HttpResponse> {
    let limit_bytes = u64::try_from(limit).unwrap_or(u64::MAX);
    let declared = body.size_hint().lower();
    if declared > limit_bytes {
        return Err(closing(respond::error(&HttpError::new(
            ErrorKind::TooLarge,
            "payload_too_large",
            format!("Content-Length is {declared} bytes; {path} accepts at most {limit} bytes"),
        ))));
    }
    match tokio::time::timeout_at(deadline.into(), Limited::new(body, limit).collect()).await {
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(error)) => {
            let too_large = error
                .downcast_ref::<http_body_util::LengthLimitError>()
                .is_some();
            let (kind, code, message) = if too_large {
                (
                    ErrorKind::TooLarge,
                    "payload_too_large",
                    format!("request body is over {limit} bytes, the limit of {path}"),
                )
            } else {
                (
                    ErrorKind::InvalidInput,
                    "invalid_body",
                    format!("could not read the request body: {error}"),
                )
            };
            Err(respond::error(&HttpError::new(kind, code, message)))
        }
        Err(_) => Err(closing(respond::error(&HttpError::new(
            ErrorKind::RequestTimeout,
            "body_timeout",
            "the request body did not arrive in time (ingest.bodyTimeout); send it faster or in smaller requests",
        )))),
    }
}

/// `Connection: close` on an answer given before the body was read: what is left of the body
/// is not read, so the connection cannot carry another request.
fn closing(mut response: HttpResponse) -> HttpResponse {
    response.headers_mut().insert(
        http::header::CONNECTION,
        http::HeaderValue::from_static("close"),
    );
    response
}
